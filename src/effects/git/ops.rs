//! The git work of a run as the run loop uses it: prepare the workspace, read a run
//! branch's head, push it. The run loop calls it through this trait (`Ctx::git`, from
//! `spawn_blocking`), so a test or a simulation can stand in for git; [`SystemGit`] runs the
//! real thing.

use std::path::Path;

use super::{GitError, PushOutcome, PushRequest, RunWorkspace, RunWorkspaceRequest};

pub trait GitOps: Send + Sync {
    /// Caches, checkouts and `ws.toml` of a run (spec 4.9).
    fn prepare_run_workspace(&self, req: &RunWorkspaceRequest) -> Result<RunWorkspace, GitError>;
    /// The commit a run branch points at, read without trusting the agent's `.git`.
    fn branch_head(&self, checkout: &Path, branch: &str) -> Result<String, GitError>;
    /// Pushes a run branch (spec 4.10), skipped when it did not move.
    fn push(&self, req: &PushRequest) -> Result<PushOutcome, GitError>;
}

/// Git as a subprocess, hardened (`cmd.rs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemGit;

impl GitOps for SystemGit {
    fn prepare_run_workspace(&self, req: &RunWorkspaceRequest) -> Result<RunWorkspace, GitError> {
        super::prepare_run_workspace(req)
    }

    fn branch_head(&self, checkout: &Path, branch: &str) -> Result<String, GitError> {
        super::branch_head(checkout, branch)
    }

    fn push(&self, req: &PushRequest) -> Result<PushOutcome, GitError> {
        super::push(req)
    }
}
