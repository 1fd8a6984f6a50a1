//! Retrying git's network steps (fetch, clone, ls-remote, push) on transient failures.
//!
//! Git exits 128 for every error, so the decision is made on its (already redacted) stderr:
//! HTTP 5xx/408/429, dropped or refused connections, timeouts and broken transfers are
//! transient; authentication, a missing repository or branch, a rejected push and anything we
//! do not recognise are permanent and fail at once. The budget is the control client's
//! [`RetryPolicy`] (exponential backoff through the `backoff` crate), counted from a step's
//! first failure. The wait between attempts is interruptible: [`GitRetry::cancel`] (or
//! dropping the [`CancelOnDrop`] guard) ends it at once, so a cancelled run never sits out the
//! budget inside `spawn_blocking`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;

use super::error::GitError;
pub use crate::control::client::RetryPolicy;

/// The default budget of a git network step: first wait 1 s, doubling up to 30 s between
/// attempts, no new attempt once 3 minutes have passed since the step first failed.
pub const DEFAULT_GIT_RETRY: RetryPolicy = RetryPolicy {
    initial: Duration::from_secs(1),
    max_interval: Duration::from_secs(30),
    max_elapsed: Duration::from_secs(180),
};

/// Whether a failed git call is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transience {
    /// The remote or the network had a bad moment: retry within the budget.
    Transient,
    /// Retrying cannot help (credentials, missing repo or branch, rejected push, unknown).
    Permanent,
}

/// Text that settles the matter as permanent whatever else git printed.
const PERMANENT_MARKERS: &[&str] = &[
    "could not read Username",
    "could not read Password",
    "Authentication failed",
    "not found",
    "couldn't find remote ref",
    "does not appear to be a git repository",
    "[rejected]",
    "[remote rejected]",
    "non-fast-forward",
    "fetch first",
    "src refspec",
    "No space left on device",
];

/// Text of a network or server hiccup (curl's and git's wording).
const TRANSIENT_MARKERS: &[&str] = &[
    "Empty reply from server",
    "Couldn't connect to server",
    "Failed to connect",
    "Connection refused",
    "Connection reset",
    "Connection timed out",
    "Operation timed out",
    "timed out",
    "Operation too slow",
    "RPC failed",
    "early EOF",
    "the remote end hung up unexpectedly",
    "unexpected disconnect",
    "transfer closed with",
    "Recv failure",
    "Send failure",
    "Broken pipe",
    "SSL_ERROR_SYSCALL",
    "GnuTLS recv error",
    "was not closed cleanly",
    "Could not resolve host",
    "Temporary failure in name resolution",
];

/// Classifies git's stderr. HTTP status codes decide first (a 4xx other than 408/429 is
/// permanent even inside an "RPC failed" line), then the permanent markers, then the transient
/// ones; anything unrecognised is permanent, so a local fault is never retried for minutes.
pub fn classify_git_stderr(stderr: &str) -> Transience {
    let codes = http_codes(stderr);
    if codes
        .iter()
        .any(|&c| (400..500).contains(&c) && c != 408 && c != 429)
    {
        return Transience::Permanent;
    }
    if PERMANENT_MARKERS.iter().any(|m| stderr.contains(m)) {
        return Transience::Permanent;
    }
    if codes.iter().any(|&c| c >= 500 || c == 408 || c == 429)
        || TRANSIENT_MARKERS.iter().any(|m| stderr.contains(m))
    {
        return Transience::Transient;
    }
    Transience::Permanent
}

/// HTTP status codes git reports: `returned error: NNN` (curl) and `HTTP NNN` (RPC failed).
fn http_codes(stderr: &str) -> Vec<u16> {
    let mut codes = Vec::new();
    for marker in ["returned error: ", "HTTP "] {
        let mut rest = stderr;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if digits.len() == 3 {
                if let Ok(code) = digits.parse() {
                    codes.push(code);
                }
            }
        }
    }
    codes
}

impl GitError {
    /// True when the failure looks like a network or server hiccup worth retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            GitError::Command { stderr, .. } => {
                classify_git_stderr(stderr) == Transience::Transient
            }
            _ => false,
        }
    }
}

#[derive(Default)]
struct Shared {
    cancelled: Mutex<bool>,
    wake: Condvar,
    retries: AtomicU64,
}

/// The retry budget of one operation (a prepare, a push) plus its cancel switch and a count
/// of the retries it made. Clones share the switch and the count.
#[derive(Clone)]
pub struct GitRetry {
    policy: RetryPolicy,
    shared: Arc<Shared>,
}

impl Default for GitRetry {
    fn default() -> Self {
        Self::new(DEFAULT_GIT_RETRY)
    }
}

impl std::fmt::Debug for GitRetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitRetry")
            .field("policy", &self.policy)
            .field("cancelled", &self.is_cancelled())
            .field("retries", &self.retries())
            .finish()
    }
}

impl GitRetry {
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            shared: Arc::default(),
        }
    }

    /// A single attempt, never retried.
    pub fn none() -> Self {
        Self::new(RetryPolicy::NONE)
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Stops retrying: a wait in progress ends now and no further attempt starts. The
    /// attempt already running (a git child) finishes on its own.
    pub fn cancel(&self) {
        *self
            .shared
            .cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        *self
            .shared
            .cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// How many times a step failed transiently and was tried again.
    pub fn retries(&self) -> u64 {
        self.shared.retries.load(Ordering::Relaxed)
    }

    /// A guard that cancels when dropped: the async side holds it, so a dropped caller
    /// future stops the blocking retry loop too.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }

    /// Waits `delay` unless cancelled first; returns true when cancelled.
    fn wait(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let mut cancelled = self
            .shared
            .cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while !*cancelled {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            cancelled = self
                .shared
                .wake
                .wait_timeout(cancelled, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Runs `attempt` until it succeeds, fails permanently, the budget is spent or the
    /// operation is cancelled; the last error is returned. `step` names it in the log.
    pub(crate) fn run<T>(
        &self,
        step: &str,
        mut attempt: impl FnMut() -> Result<T, GitError>,
    ) -> Result<T, GitError> {
        // Built at the first failure, so the budget counts from there, not from the start
        // of a long clone that then broke.
        let mut backoff: Option<(backoff::ExponentialBackoff, Instant)> = None;
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let err = match attempt() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if matches!(err, GitError::Stopped { .. }) {
                // The cancel killed the attempt itself rather than a wait between attempts.
                tracing::info!(
                    step,
                    attempts,
                    "git retry stopped: the operation was cancelled"
                );
                return Err(err);
            }
            if !err.is_transient() || self.policy.max_elapsed.is_zero() {
                return Err(err);
            }
            let (b, started) =
                backoff.get_or_insert_with(|| (self.policy.backoff(), Instant::now()));
            let Some(delay) = b.next_backoff() else {
                return Err(err);
            };
            if started.elapsed() + delay > self.policy.max_elapsed {
                tracing::warn!(step, attempts, error = %err, "git step still failing; retry budget spent");
                return Err(err);
            }
            if self.is_cancelled() {
                // The cancel came while the attempt was failing on its own: the retry stops
                // all the same, and says so like the other two cancel paths.
                tracing::info!(
                    step,
                    attempts,
                    "git retry stopped: the operation was cancelled"
                );
                return Err(err);
            }
            self.shared.retries.fetch_add(1, Ordering::Relaxed);
            // GitError text is redacted already; the log layer redacts again.
            tracing::warn!(
                step,
                attempts,
                delay_ms = delay.as_millis() as u64,
                error = %err,
                "git step failed transiently; retrying"
            );
            if self.wait(delay) {
                tracing::info!(
                    step,
                    attempts,
                    "git retry stopped: the operation was cancelled"
                );
                return Err(err);
            }
        }
    }
}

/// Cancels its [`GitRetry`] when dropped.
pub struct CancelOnDrop(GitRetry);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Transience::{Permanent, Transient};

    // Real git 2.47 stderr, captured against servers answering each status (see git_retry.rs
    // for the same errors produced live through the devserver).
    const SAMPLES: &[(&str, Transience)] = &[
        (
            "fatal: unable to access 'http://127.0.0.1:18977/r.git/': The requested URL returned error: 500",
            Transient,
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:18977/r.git/': The requested URL returned error: 502",
            Transient,
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:18977/r.git/': The requested URL returned error: 503",
            Transient,
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:18977/r.git/': The requested URL returned error: 504",
            Transient,
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:18977/r.git/': The requested URL returned error: 429",
            Transient,
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:18977/r.git/': Empty reply from server",
            Transient,
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:1/r.git/': Failed to connect to 127.0.0.1 port 1 after 0 ms: Couldn't connect to server",
            Transient,
        ),
        (
            "error: RPC failed; HTTP 500 curl 22 The requested URL returned error: 500\n\
             send-pack: unexpected disconnect while reading sideband packet\n\
             fatal: the remote end hung up unexpectedly\nEverything up-to-date",
            Transient,
        ),
        (
            "error: RPC failed; HTTP 429 curl 22 The requested URL returned error: 429\n\
             send-pack: unexpected disconnect while reading sideband packet\n\
             fatal: the remote end hung up unexpectedly",
            Transient,
        ),
        (
            "error: RPC failed; curl 52 Empty reply from server\n\
             fatal: the remote end hung up unexpectedly",
            Transient,
        ),
        (
            "error: RPC failed; curl 18 transfer closed with 996 bytes remaining to read\n\
             fatal: the remote end hung up unexpectedly",
            Transient,
        ),
        (
            "error: RPC failed; curl 56 Recv failure: Connection reset by peer\n\
             fatal: early EOF\nfatal: fetch-pack: invalid index-pack output",
            Transient,
        ),
        (
            "fatal: unable to access 'https://git.example/r.git/': Failed to connect to git.example port 443 after 130001 ms: Connection timed out",
            Transient,
        ),
        (
            "error: RPC failed; curl 28 Operation too slow. Less than 1 bytes/sec transferred the last 300 seconds",
            Transient,
        ),
        (
            "fatal: unable to access 'http://127.0.0.1:18977/r.git/': The requested URL returned error: 403",
            Permanent,
        ),
        (
            "error: RPC failed; HTTP 403 curl 22 The requested URL returned error: 403\n\
             send-pack: unexpected disconnect while reading sideband packet\n\
             fatal: the remote end hung up unexpectedly",
            Permanent,
        ),
        (
            "fatal: repository 'http://127.0.0.1:18977/r.git/' not found",
            Permanent,
        ),
        (
            "fatal: could not read Username for 'http://127.0.0.1:18977': terminal prompts disabled",
            Permanent,
        ),
        (
            "remote: invalid credentials\nfatal: Authentication failed for 'http://127.0.0.1:1/r.git/'",
            Permanent,
        ),
        ("fatal: couldn't find remote ref nosuch", Permanent),
        (
            "To http://127.0.0.1:18978/srv.git\n ! [rejected]        HEAD -> x (fetch first)\n\
             error: failed to push some refs to 'http://127.0.0.1:18978/srv.git'",
            Permanent,
        ),
        (
            " ! [rejected]        HEAD -> x (non-fast-forward)\nerror: failed to push some refs",
            Permanent,
        ),
        (
            " ! [remote rejected] HEAD -> x (pre-receive hook declined)\nerror: failed to push some refs",
            Permanent,
        ),
        (
            "error: src refspec HEAD does not match any\nerror: failed to push some refs to 'x'",
            Permanent,
        ),
        (
            "fatal: 'origin' does not appear to be a git repository\nfatal: Could not read from remote repository.",
            Permanent,
        ),
        ("fatal: write error: No space left on device", Permanent),
        ("fatal: something new and strange", Permanent),
        ("", Permanent),
    ];

    #[test]
    fn real_git_stderr_is_classified() {
        for (stderr, want) in SAMPLES {
            assert_eq!(classify_git_stderr(stderr), *want, "{stderr}");
        }
    }

    #[test]
    fn only_command_errors_with_transient_stderr_are_transient() {
        let cmd = |stderr: &str| GitError::Command {
            what: "fetch".into(),
            status: "exit status: 128".into(),
            stderr: stderr.into(),
        };
        assert!(cmd("The requested URL returned error: 503").is_transient());
        assert!(!cmd("The requested URL returned error: 404").is_transient());
        assert!(!GitError::AuthFailed {
            what: "push".into(),
            stderr: "The requested URL returned error: 503".into(),
        }
        .is_transient());
        assert!(!GitError::RemoteBranchMissing {
            branch: "main".into(),
            stderr: "Empty reply from server".into(),
        }
        .is_transient());
    }

    fn transient() -> GitError {
        GitError::Command {
            what: "ls-remote".into(),
            status: "exit status: 128".into(),
            stderr: "The requested URL returned error: 503".into(),
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy::new(
            Duration::from_millis(1),
            Duration::from_millis(2),
            Duration::from_secs(60),
        )
    }

    #[test]
    fn transient_failures_are_retried_until_success() {
        let retry = GitRetry::new(fast());
        let mut calls = 0;
        let out = retry.run("t", || {
            calls += 1;
            if calls < 4 {
                Err(transient())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(out.expect("succeeds"), 4);
        assert_eq!(retry.retries(), 3);
    }

    #[test]
    fn permanent_failures_and_no_budget_make_one_attempt() {
        let retry = GitRetry::new(fast());
        let mut calls = 0;
        let out: Result<(), _> = retry.run("t", || {
            calls += 1;
            Err(GitError::Command {
                what: "push".into(),
                status: "exit status: 128".into(),
                stderr: "fatal: repository 'x' not found".into(),
            })
        });
        assert!(out.is_err());
        assert_eq!((calls, retry.retries()), (1, 0));

        let none = GitRetry::none();
        let mut calls = 0;
        let out: Result<(), _> = none.run("t", || {
            calls += 1;
            Err(transient())
        });
        assert!(out.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_cancel_ends_the_wait_and_stops_retrying() {
        // A one-hour wait: only the cancel can end this test.
        let retry = GitRetry::new(RetryPolicy::new(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            Duration::from_secs(7200),
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = {
            let retry = retry.clone();
            std::thread::spawn(move || {
                let mut calls = 0;
                let out: Result<(), _> = retry.run("t", || {
                    calls += 1;
                    let _ = tx.send(());
                    Err(transient())
                });
                (out.is_err(), calls)
            })
        };
        rx.recv().expect("first attempt ran");
        drop(retry.cancel_on_drop());
        assert_eq!(worker.join().expect("worker"), (true, 1));
        assert!(retry.is_cancelled());
    }
}
