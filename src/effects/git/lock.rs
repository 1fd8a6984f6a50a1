//! A cross-process exclusive lock per repo cache: `flock(2)` on `<repo dir>/.cache.lock`.
//!
//! The kernel drops the lock when its holder dies, so a killed triage never leaves the cache
//! locked. Eviction may delete the lock file while others wait on the old inode; after
//! locking we therefore check that the path still names the inode we locked, and retry if not.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::GitError;

/// How often a busy lock is re-tried.
const POLL: Duration = Duration::from_millis(50);

/// Held while the guard lives; released on drop (closing the descriptor).
#[derive(Debug)]
pub struct CacheLock {
    _file: File,
    path: PathBuf,
}

impl CacheLock {
    /// Waits up to `timeout` for the lock at `path`, creating the file and its parents.
    pub fn acquire(path: &Path, timeout: Duration) -> Result<Self, GitError> {
        let started = Instant::now();
        loop {
            if let Some(lock) = Self::try_acquire_inner(path, true)? {
                return Ok(lock);
            }
            if started.elapsed() >= timeout {
                return Err(GitError::LockTimeout {
                    path: path.to_owned(),
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Takes the lock only if nobody holds it; `None` when it is busy or the file is gone.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>, GitError> {
        Self::try_acquire_inner(path, false)
    }

    fn try_acquire_inner(path: &Path, create: bool) -> Result<Option<Self>, GitError> {
        if create {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| GitError::io(format!("create {}", parent.display()), e))?;
            }
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            // Evicted between mkdir and open: the caller retries.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(GitError::io(format!("open lock {}", path.display()), e)),
        };
        // SAFETY: flock on a descriptor we own; no memory is shared with the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(None),
                _ => Err(GitError::io(format!("flock {}", path.display()), err)),
            };
        }
        // The lock file may have been unlinked (eviction) after we opened it.
        let held = file
            .metadata()
            .map_err(|e| GitError::io(format!("stat lock {}", path.display()), e))?;
        match std::fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => Ok(Some(Self {
                _file: file,
                path: path.to_owned(),
            })),
            _ => Ok(None),
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_waits_and_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/.cache.lock");
        let first = CacheLock::acquire(&path, Duration::from_secs(1)).expect("first");
        assert!(CacheLock::try_acquire(&path).expect("try").is_none());
        let err = CacheLock::acquire(&path, Duration::from_millis(120)).expect_err("busy");
        assert!(matches!(err, GitError::LockTimeout { .. }));
        drop(first);
        assert!(CacheLock::try_acquire(&path).expect("try").is_some());
    }

    #[test]
    fn a_lock_on_an_unlinked_file_is_not_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".cache.lock");
        let held = CacheLock::acquire(&path, Duration::from_secs(1)).expect("lock");
        std::fs::remove_file(&path).expect("unlink");
        drop(held);
        // The path is gone: try_acquire does not create it.
        assert!(CacheLock::try_acquire(&path).expect("try").is_none());
        // acquire recreates it and locks the new inode.
        let again = CacheLock::acquire(&path, Duration::from_secs(1)).expect("relock");
        assert!(again.path().exists());
    }
}
