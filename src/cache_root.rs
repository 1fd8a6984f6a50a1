//! The cache root's owner and mode (`WSRUNNER_CACHE_ROOT`), checked at start by the daemon and
//! reported by `doctor`. The root holds the credential file, every bare cache and every run's
//! checkout, and pushes are built from those caches: a local user who can write it, or who
//! swapped it for a symlink, could plant objects or hooks in what the runner pushes, or read
//! and replace the credential.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// The mode a missing cache root is created with: the runner's, readable by its group.
pub const MODE: u32 = 0o750;

/// What was found at the cache root when it passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Ok,
    /// Nothing there yet ([`ensure`] creates it).
    Missing,
}

/// Looks at the cache root without changing anything: refuses a symlink, a non-directory, a
/// directory owned by another user than the runner's euid (or root), and a group- or
/// world-writable one. The message names the path and the fix.
pub fn check(root: &Path) -> Result<Found, String> {
    let shown = root.display();
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(format!("cannot inspect the cache root {shown}: {e}")),
    };
    if meta.file_type().is_symlink() {
        return Err(format!(
            "the cache root {shown} is a symlink, which whoever owns it can point anywhere: set WSRUNNER_CACHE_ROOT to the real directory"
        ));
    }
    if !meta.is_dir() {
        return Err(format!(
            "the cache root {shown} is not a directory: set WSRUNNER_CACHE_ROOT to a directory"
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(format!(
            "the cache root {shown} is owned by uid {}, not by the runner's user (uid {euid}) or root: `chown <runner user> {shown}`",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "the cache root {shown} is group- or world-writable (mode {mode:04o}): `chmod 0750 {shown}`"
        ));
    }
    Ok(Found::Ok)
}

/// Creates a missing cache root (mode [`MODE`], parents as needed), then [`check`]s it.
pub fn ensure(root: &Path) -> Result<(), String> {
    if check(root)? == Found::Missing {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(MODE)
            .create(root)
            .and_then(|()| std::fs::set_permissions(root, std::fs::Permissions::from_mode(MODE)))
            .map_err(|e| {
                format!(
                    "cannot create the cache root {}: {e} (check WSRUNNER_CACHE_ROOT)",
                    root.display()
                )
            })?;
    }
    check(root).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_roots_are_created_0750_and_pass() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("a/cache");
        assert_eq!(check(&root), Ok(Found::Missing));
        ensure(&root).unwrap();
        let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, MODE);
        assert_eq!(check(&root), Ok(Found::Ok));
        // A tempdir (0700, ours) passes as it is: the tests' cache roots.
        assert_eq!(check(tmp.path()), Ok(Found::Ok));
    }

    #[test]
    fn writable_symlinked_or_file_roots_are_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        std::fs::create_dir(&root).unwrap();
        for mode in [0o777, 0o1777, 0o770] {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = ensure(&root).unwrap_err();
            assert!(
                e.contains("chmod 0750") && e.contains(&root.display().to_string()),
                "{e}"
            );
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check(&root), Ok(Found::Ok));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        let e = ensure(&link).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        std::fs::write(tmp.path().join("file"), "x").unwrap();
        assert!(check(&tmp.path().join("file")).is_err());
    }

    #[test]
    fn a_root_owned_by_another_user_is_refused() {
        // Handing a directory to another user (nobody) needs root.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        std::fs::create_dir(&root).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
        } else {
            eprintln!("skipped: chown needs root");
            return;
        }
        let e = check(&root).unwrap_err();
        assert!(e.contains("uid 65534") && e.contains("chown"), "{e}");
    }
}
