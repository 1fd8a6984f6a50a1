//! Git effects: the bare-clone cache, per-run checkouts and pushes (spec 4.9–4.11).
//!
//! Synchronous on purpose: every step is a git subprocess or a filesystem call, and the
//! `windshift-triage` binary uses it directly. The daemon calls it from `spawn_blocking`
//! (or runs `windshift-triage` as a child, which is what makes a cancel kill it).
//!
//! Each operation is idempotent for a (run id, step, attempt): prepare wipes and remakes the
//! checkout; push checks the remote branch and treats "already at the sha" as done. That is
//! what lets the network steps retry on transient failures (retry.rs).
//! See docs/git.md for the layout, the hardening and the recovery rules.

mod agent_tree;
mod cache;
mod cmd;
mod error;
mod lock;
mod ops;
mod ownership;
mod prepare;
mod push;
mod retry;
mod run_paths;
pub mod validate;
mod workspace;
mod wstoml;

pub use agent_tree::{
    AgentGitDir, CopiedObjects, TreeStats, MAX_COPY_BYTES, MAX_GIT_DEPTH, MAX_GIT_ENTRIES,
};
pub use cache::{
    clean_stale, disk_use, evict, evict_idle, tree_bytes, workspace_root, EvictionReport,
    RepoCache, StaleCleanup, BARE_DIR, DEFAULT_CACHE_MAX_AGE, LOCK_FILE,
};
pub use error::{GitError, RepoGitError};
pub use lock::CacheLock;
pub use ops::{GitOps, SystemGit};
pub use ownership::{hand_to_agent, readable_by_agent, AGENT_GID, AGENT_UID};
pub use prepare::{prepare, GitTransport, PrepareOutput, PrepareRequest, DEFAULT_LOCK_TIMEOUT};
pub use push::{branch_head, push, remote_ref_sha, PushOutcome, PushRequest};
pub use retry::{
    classify_git_stderr, CancelOnDrop, GitRetry, RetryPolicy, Transience, DEFAULT_GIT_RETRY,
};
pub use run_paths::{cache_objects, repo_proxy_url, run_paths};
pub use validate::{
    run_branch, validate_branch_name, validate_prepare_inputs, validate_slug, PrepareInputs,
    TransportPolicy, ValidatedPrepare, ValidationError,
};
pub use workspace::{
    prepare_run_workspace, remove_run_workspace, workspace_dir_names, PreparedRepo, RunRepo,
    RunWorkspace, RunWorkspaceRequest,
};
pub use wstoml::{server_url_from_api, WsToml};

/// The Windshift git-proxy URL of a repo (spec 4.9 step 3):
/// `<WS_API_URL without trailing slash>/git-proxy/<workspace_id>/<owner>/<repo>`.
pub fn git_proxy_url(ws_api_url: &str, workspace_id: i64, owner: &str, repo: &str) -> String {
    format!(
        "{}/git-proxy/{workspace_id}/{owner}/{repo}",
        ws_api_url.trim_end_matches('/')
    )
}
