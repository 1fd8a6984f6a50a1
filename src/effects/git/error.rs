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

    /// A stop (cancel, run timeout, drain deadline, shutdown) killed the git call.
    #[error("git {what} was stopped: the run is being cancelled or the runner is stopping")]
    Stopped { what: String },

    /// A git call ran past its deadline and was killed.
    #[error("git {what} did not finish within {after:?} and was killed")]
    TimedOut { what: String, after: Duration },

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

impl GitError {
    /// The failure in the runner's own words, for the run's error on the server: what failed
    /// and what to do, never git's output (which may quote files the agent wrote) and never
    /// a name the agent chose. The full text ([`std::fmt::Display`]) goes to the log.
    pub fn public_summary(&self) -> String {
        match self {
            GitError::Invalid(e) => format!("invalid input: {e}"),
            GitError::Io { what, .. } => {
                format!(
                    "a filesystem step failed ({}); see the runner log",
                    first_words(what)
                )
            }
            GitError::Spawn { .. } => {
                "could not start git on the runner host (is git installed?)".into()
            }
            GitError::Stopped { .. } | GitError::TimedOut { .. } | GitError::LockTimeout { .. } => {
                self.to_string()
            }
            GitError::Command { what, status, .. } => {
                format!("git {what} failed ({status}); the runner log has the details")
            }
            GitError::RemoteBranchMissing { branch, .. } => {
                format!("the remote has no branch {branch:?}")
            }
            GitError::AuthFailed { what, .. } => format!(
                "the git proxy refused the run's token for {what} (expired run token, or the \
                 run has no push grant for this repository)"
            ),
            GitError::NoPushGrant { branch, .. } => format!(
                "the run has no push grant for {branch:?} (a test run, or the grant was \
                 withdrawn); the git proxy refused the push"
            ),
            GitError::Diverged { branch, .. } => format!(
                "the remote branch {branch:?} has moved on (non-fast-forward); the runner never \
                 force-pushes"
            ),
            GitError::UnsafeCheckout { .. } => "refusing to push: the agent left its checkout's \
                 .git in a state the runner does not read (a symlink, pipe or device inside it, \
                 a replaced directory, or a branch that names no commit); nothing was pushed, \
                 the runner log names the entry"
                .into(),
            GitError::ShaMismatch { expected, fetched } => format!(
                "the commit copied from the checkout ({fetched}) is not the branch's ({expected})"
            ),
            GitError::NotReadableByAgent { .. } => self.to_string(),
        }
    }
}

/// The leading words of a step description, before any path (paths may hold agent names).
fn first_words(what: &str) -> String {
    what.split(['/', '.'])
        .next()
        .unwrap_or_default()
        .trim()
        .chars()
        .take(60)
        .collect()
}

/// A git failure of one repo of the run, kept whole until it is reported.
#[derive(Debug)]
pub struct RepoGitError {
    slug: String,
    error: GitError,
}

impl RepoGitError {
    pub fn new(slug: &str, error: GitError) -> Self {
        Self {
            slug: slug.to_owned(),
            error,
        }
    }

    /// Logs the whole failure for the operator (redacted, bounded by the git layer) and
    /// returns the run's error in the runner's own words: what failed and in which repo,
    /// never git's output, which may quote what the agent left in its checkout.
    pub fn report(&self, run_id: i64, step: &str) -> String {
        tracing::warn!(
            run_id,
            repo = %self.slug,
            "{step} failed: {}",
            crate::redact::redact(&self.error.to_string())
        );
        format!("{}: {}", self.slug, self.error.public_summary())
    }
}
