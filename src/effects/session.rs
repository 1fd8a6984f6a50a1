//! The container session's host-side files: the private (0700) per-container directory, the
//! prompt marker and the forwarded-output progress, which let a re-attach or a replay after a
//! crash neither lose nor repeat what the agent was sent or printed.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::effects::agent_driver::StdinChannel;

/// Line counters of the agent's output already forwarded, kept beside the container's
/// private files so a re-attach after a crash resumes without re-sending them.
pub(crate) const PROGRESS_FILE: &str = "forwarded-lines";
/// Marks that the prompt was written to the agent's stdin (spec 6.1: exactly once).
pub(crate) const PROMPT_SENT_FILE: &str = "prompt-sent";

pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

pub(crate) fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("remove {}: {e}", dir.display());
        }
    }
}

/// How far a container's output got: the raw line numbers handed to the event sender, each
/// with the sender's count of accepted events right after it, and the last line numbers the
/// server is known to have answered, saved in the container's private directory. A re-attach
/// or a recovery replay resumes after the saved numbers: delivery is at-least-once across a
/// crash (lines answered after the last save are sent again), exact across a clean stop.
pub(crate) struct Progress {
    dir: PathBuf,
    pub(crate) stdout: u64,
    pub(crate) stderr: u64,
    /// (accepted count after the line, stdout, stderr), oldest first, not yet answered.
    marks: VecDeque<(u64, u64, u64)>,
    /// The numbers of the last line the server answered, and the numbers in the file.
    delivered: (u64, u64),
    saved: (u64, u64),
}

impl Progress {
    pub(crate) fn load(dir: &Path) -> Progress {
        let (stdout, stderr) = read_progress(dir);
        Progress {
            dir: dir.to_owned(),
            stdout,
            stderr,
            marks: VecDeque::new(),
            delivered: (stdout, stderr),
            saved: (stdout, stderr),
        }
    }

    /// Line `line` of `stream` was handed to the sender, which has now accepted `accepted`.
    pub(crate) fn forwarded(&mut self, stream: &str, line: u64, accepted: u64) {
        match stream {
            "stderr" => self.stderr = self.stderr.max(line),
            _ => self.stdout = self.stdout.max(line),
        }
        // The same count means nothing was sent in between: keep only the latest numbers.
        match self.marks.back_mut() {
            Some(last) if last.0 == accepted => *last = (accepted, self.stdout, self.stderr),
            _ => self.marks.push_back((accepted, self.stdout, self.stderr)),
        }
    }

    /// Saves the line numbers of everything the server has answered (`completed` of the
    /// sender's calls, a prefix in order).
    pub(crate) fn save_delivered(&mut self, completed: u64) {
        while let Some(&(accepted, stdout, stderr)) = self.marks.front() {
            if accepted > completed {
                break;
            }
            self.delivered = (stdout, stderr);
            self.marks.pop_front();
        }
        let now = self.delivered;
        if now == self.saved {
            return;
        }
        let tmp = self.dir.join(format!("{PROGRESS_FILE}.tmp"));
        let text = format!("{} {}\n", now.0, now.1);
        if std::fs::write(&tmp, text).is_ok()
            && std::fs::rename(&tmp, self.dir.join(PROGRESS_FILE)).is_ok()
        {
            self.saved = now;
        }
    }
}

/// Writes the prompt command (spec 6.1) and records that it was written.
pub(crate) async fn send_prompt(
    stdin: Option<&StdinChannel>,
    prompt: &str,
    dir: &Path,
) -> Result<(), String> {
    let stdin = stdin.ok_or("the container's stdin is not attached")?;
    let line = serde_json::json!({"type": "prompt", "message": prompt}).to_string();
    stdin.send(&line).await.map_err(|e| e.to_string())?;
    std::fs::write(dir.join(PROMPT_SENT_FILE), b"1\n").map_err(|e| e.to_string())
}

pub(crate) fn read_progress(dir: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(dir.join(PROGRESS_FILE)).unwrap_or_default();
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}
