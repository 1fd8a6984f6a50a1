//! The typed error of every git effect. Any text that came from git has been redacted
//! before it is stored here.

use std::path::PathBuf;
use std::time::Duration;

use super::validate::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// Bad input; nothing was touched.
    #[error("invalid input: {0}")]
    Invalid(#[from] ValidationError),

    /// A filesystem operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The git binary could not be started at all.
    #[error("could not run git for {what} (is git installed and on PATH?): {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A git command exited non-zero. `stderr` is redacted.
    #[error("git {what} failed ({status}): {stderr}")]
    Command {
        what: String,
        status: String,
        stderr: String,
    },

    /// The branch to fetch or check out does not exist on the remote.
    #[error("remote has no branch {branch:?}: {stderr}")]
    RemoteBranchMissing { branch: String, stderr: String },

    /// The remote refused our credentials (expired run token, missing grant).
    #[error("remote refused authentication for {what}: {stderr}")]
    AuthFailed { what: String, stderr: String },

    /// The git proxy refused the push (HTTP 403) although the same run token just listed the
    /// remote: the run holds no push grant (spec 11: ephemeral test runs get none).
    #[error("the server's git proxy refused to let this run push {branch:?} (HTTP 403, while fetching with the same run token works): the run has no push grant for that branch; ephemeral test runs get none, so their commits are not pushed")]
    NoPushGrant { branch: String, stderr: String },

    /// The remote branch has commits the pushed one does not contain. We never force-push.
    #[error("remote branch {branch:?} has moved on (non-fast-forward); refusing to force-push: {stderr}")]
    Diverged { branch: String, stderr: String },

    /// Another process held the cache lock for too long.
    #[error("cache lock {} still held by another process after {waited:?}; is a prepare hung?", path.display())]
    LockTimeout { path: PathBuf, waited: Duration },

    /// The checkout the agent touched is not safe to push from.
    #[error("refusing to push from {}: {reason}", path.display())]
    UnsafeCheckout { path: PathBuf, reason: String },

    /// The commit fetched into the push repository is not the one the checkout's branch names.
    #[error("fetched {fetched} from the checkout but its branch is at {expected}")]
    ShaMismatch { expected: String, fetched: String },

    /// As non-root, the checkout is not readable by the container user (uid/gid 1000).
    #[error("checkout {} is not readable and traversable by uid 1000, gid 1000 or others (mode {mode:o}); run triage as root or fix the cache root's permissions", path.display())]
    NotReadableByAgent { path: PathBuf, mode: u32 },
}

impl GitError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        GitError::Io {
            what: what.into(),
            source,
        }
    }
}
