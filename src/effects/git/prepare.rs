//! `prepare` (spec 4.11 steps 1–8): update the bare cache, make a fresh per-run checkout on
//! the run branch, hand it to uid 1000.

use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cache::{refresh_cache, remove_path, RepoCache};
use super::cmd::{GitSession, Reach};
use super::error::GitError;
use super::lock::CacheLock;
use super::ownership::hand_to_agent;
use super::retry::GitRetry;
use super::validate::{validate_prepare_inputs, PrepareInputs, TransportPolicy, ValidationError};

/// How long a prepare waits for another process's hold on the same repo cache. A cold
/// clone of a large repository under the lock can take many minutes.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `--git-transport`: how triage reaches the remote.
///
/// Both use the same askpass authentication (`oauth2` / the run token). `askpass` pushes to
/// `--remote-url`; `proxy` pushes to `--proxy-url`, the Windshift git proxy
/// (`<WS_API_URL>/git-proxy/<ws>/<owner>/<repo>`), which is what the runner always passes.
/// For `prepare` the remote is `--remote-url` in both cases (the runner passes the proxy URL).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GitTransport {
    #[default]
    Askpass,
    Proxy,
}

impl std::str::FromStr for GitTransport {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "askpass" => Ok(Self::Askpass),
            "proxy" => Ok(Self::Proxy),
            other => Err(ValidationError::new(
                "--git-transport",
                format!("{other:?} is not askpass or proxy"),
            )),
        }
    }
}

/// Everything `prepare` needs. Field meanings and defaults follow the triage flags (4.10).
#[derive(Clone)]
pub struct PrepareRequest {
    pub root: String,
    pub workspace_id: i64,
    /// `owner/name`.
    pub slug: String,
    /// The tokenless remote (the git-proxy URL in production).
    pub remote_url: String,
    /// Empty means `main`.
    pub base_ref: String,
    /// Set on continuation runs: fetched, checked out and pushed instead of the run branch.
    pub continue_branch: String,
    /// Where to put the checkout; empty means `<cache>/runs/<run_id>`.
    pub dest_dir: String,
    pub run_id: i64,
    /// The run token; empty means no authentication. Never leaves this process except as
    /// `AGENT_GIT_TOKEN` in git's environment.
    pub token: String,
    pub transport: GitTransport,
    pub policy: TransportPolicy,
    pub lock_timeout: Duration,
    /// Budget and cancel switch for the cache fetch/clone across transient network errors.
    pub retry: GitRetry,
}

impl Default for PrepareRequest {
    fn default() -> Self {
        Self {
            root: String::new(),
            workspace_id: 0,
            slug: String::new(),
            remote_url: String::new(),
            base_ref: "main".into(),
            continue_branch: String::new(),
            dest_dir: String::new(),
            run_id: 0,
            token: String::new(),
            transport: GitTransport::Askpass,
            policy: TransportPolicy::default(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            retry: GitRetry::default(),
        }
    }
}

impl fmt::Debug for PrepareRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrepareRequest")
            .field("root", &self.root)
            .field("workspace_id", &self.workspace_id)
            .field("slug", &self.slug)
            .field("remote_url", &self.remote_url)
            .field("base_ref", &self.base_ref)
            .field("continue_branch", &self.continue_branch)
            .field("dest_dir", &self.dest_dir)
            .field("run_id", &self.run_id)
            .field(
                "token",
                &if self.token.is_empty() {
                    ""
                } else {
                    crate::redact::MASK
                },
            )
            .field("transport", &self.transport)
            .field("policy", &self.policy)
            .field("retry", &self.retry)
            .finish()
    }
}

impl PrepareRequest {
    /// The borrowed view [`validate_prepare_inputs`] checks.
    pub fn inputs(&self) -> PrepareInputs<'_> {
        PrepareInputs {
            root: &self.root,
            workspace_id: self.workspace_id,
            slug: &self.slug,
            remote_url: &self.remote_url,
            base_ref: &self.base_ref,
            continue_branch: &self.continue_branch,
            dest_dir: &self.dest_dir,
            run_id: self.run_id,
            policy: self.policy,
        }
    }
}

/// The result of a prepare; serialized as triage's output JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrepareOutput {
    pub checkout_path: PathBuf,
    pub branch: String,
    pub base_commit: String,
}

/// Prepares a fresh checkout. Idempotent: a repeat (same run, after a crash or a retry)
/// wipes the previous checkout and makes it again from the cache.
pub fn prepare(req: &PrepareRequest) -> Result<PrepareOutput, GitError> {
    let v = validate_prepare_inputs(&req.inputs())?;
    let session = GitSession::new(Some(&req.token), req.policy, v.remote_scheme)?;
    let cache = RepoCache::new(&v.root, v.workspace_id, &v.owner, &v.repo);
    let lock = CacheLock::acquire(&cache.lock_path(), req.lock_timeout)?;
    let base_commit = refresh_cache(
        &session,
        &cache,
        &req.remote_url,
        &v.fetch_branch,
        &lock,
        &req.retry,
    )?;

    remove_path(&v.checkout)?;
    if let Some(parent) = v.checkout.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(parent)
            .map_err(|e| GitError::io(format!("create {}", parent.display()), e))?;
    }
    let bare = cache.bare();
    session.run(
        Reach::Local,
        "clone from the cache",
        [
            "clone".as_ref(),
            "--no-hardlinks".as_ref(),
            "--no-checkout".as_ref(),
            "--quiet".as_ref(),
            "--".as_ref(),
            bare.as_os_str(),
            v.checkout.as_os_str(),
        ],
    )?;
    // The checkout no longer reads the cache: let other runs of this repo proceed.
    drop(lock);

    in_checkout(
        &session,
        &v.checkout,
        "checkout -B",
        &["checkout", "--quiet", "-B", &v.work_branch, &base_commit],
    )?;
    in_checkout(
        &session,
        &v.checkout,
        "remote set-url",
        &["remote", "set-url", "origin", &req.remote_url],
    )?;
    let extra = if req.dest_dir.is_empty() {
        None
    } else {
        v.checkout.parent()
    };
    hand_to_agent(&v.checkout, extra)?;
    Ok(PrepareOutput {
        checkout_path: v.checkout,
        branch: v.work_branch,
        base_commit,
    })
}

fn in_checkout(
    session: &GitSession,
    checkout: &Path,
    what: &str,
    args: &[&str],
) -> Result<String, GitError> {
    let mut all: Vec<&std::ffi::OsStr> = vec!["-C".as_ref(), checkout.as_os_str()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    session.run(Reach::Local, what, all)
}
