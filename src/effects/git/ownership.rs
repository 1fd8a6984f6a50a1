//! Handing a checkout to the container user (uid/gid 1000, spec 4.10).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::error::GitError;

/// The uid and gid the agent container runs as.
pub const AGENT_UID: u32 = 1000;
pub const AGENT_GID: u32 = 1000;

/// As root, or with CAP_CHOWN (the systemd unit grants it to a non-root service user): changes
/// the owner of everything under `checkout` (and `extra_dir` itself, the
/// multi-repo workspace root) to 1000:1000, never following symlinks, so a symlink in the
/// repository cannot redirect the chown onto a host file.
/// Not root: checks instead that uid 1000, gid 1000 or others can read and traverse it.
pub fn hand_to_agent(checkout: &Path, extra_dir: Option<&Path>) -> Result<(), GitError> {
    // SAFETY: geteuid has no preconditions.
    let can_chown = unsafe { libc::geteuid() } == 0 || has_effective_cap_chown();
    if !can_chown {
        for dir in std::iter::once(checkout).chain(extra_dir) {
            let meta = std::fs::metadata(dir)
                .map_err(|e| GitError::io(format!("stat {}", dir.display()), e))?;
            if !readable_by_agent(meta.uid(), meta.gid(), meta.mode()) {
                return Err(GitError::NotReadableByAgent {
                    path: dir.to_owned(),
                    mode: meta.mode() & 0o7777,
                });
            }
        }
        return Ok(());
    }
    chown_tree(checkout)?;
    if let Some(dir) = extra_dir {
        lchown(dir)?;
    }
    Ok(())
}

/// CAP_CHOWN (capability 0) in this process's effective set, read from /proc/self/status.
fn has_effective_cap_chown() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & 1 == 1)
}

/// Whether a directory with this owner, group and mode can be read and traversed by
/// uid 1000 / gid 1000 (pure; used when triage is not root).
pub fn readable_by_agent(uid: u32, gid: u32, mode: u32) -> bool {
    let rx = |shift: u32| (mode >> shift) & 0o5 == 0o5;
    (uid == AGENT_UID && rx(6)) || (gid == AGENT_GID && rx(3)) || rx(0)
}

fn lchown(path: &Path) -> Result<(), GitError> {
    std::os::unix::fs::lchown(path, Some(AGENT_UID), Some(AGENT_GID))
        .map_err(|e| GitError::io(format!("chown {}", path.display()), e))
}

fn chown_tree(root: &Path) -> Result<(), GitError> {
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        lchown(&path)?;
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| GitError::io(format!("stat {}", path.display()), e))?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path)
                .map_err(|e| GitError::io(format!("list {}", path.display()), e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| GitError::io(format!("list {}", path.display()), e))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readability_rule() {
        assert!(readable_by_agent(1000, 0, 0o700));
        assert!(!readable_by_agent(1000, 0, 0o300));
        assert!(readable_by_agent(0, 1000, 0o750));
        assert!(!readable_by_agent(0, 1000, 0o710));
        assert!(readable_by_agent(0, 0, 0o755));
        assert!(!readable_by_agent(0, 0, 0o750));
        assert!(!readable_by_agent(0, 0, 0o751));
    }
}
