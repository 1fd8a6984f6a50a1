//! Run workspaces: one checkout for a single-repo run, `<root>/.workspaces/run-<id>/<dir>`
//! per repo for a multi-repo run (spec 4.9), with `ws.toml` written everywhere.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use super::cache::{remove_path, workspace_root};
use super::error::GitError;
use super::prepare::{prepare, GitTransport, PrepareOutput, PrepareRequest, DEFAULT_LOCK_TIMEOUT};
use super::retry::GitRetry;
use super::validate::{validate_slug, TransportPolicy};
use super::wstoml::WsToml;

/// Names a multi-repo workspace never gives a repo directory: the workspace root holds a
/// `ws.toml` of its own.
const RESERVED_DIR_NAMES: &[&str] = &["ws.toml"];

/// The sibling directory name of each repo, in order (spec 9 point 7, decided here): the
/// last slug segment; when that name is taken (by an earlier repo or a reserved name), the
/// first free of `<name>-2`, `<name>-3`, …. Deterministic, and the primary repo always gets
/// the plain name.
pub fn workspace_dir_names(slugs: &[&str]) -> Vec<String> {
    let mut used: HashSet<String> = RESERVED_DIR_NAMES.iter().map(|s| s.to_string()).collect();
    slugs
        .iter()
        .map(|slug| {
            let base = slug.rsplit('/').next().unwrap_or(slug).to_owned();
            let mut name = base.clone();
            let mut n = 2u64;
            while used.contains(&name) {
                name = format!("{base}-{n}");
                n += 1;
            }
            used.insert(name.clone());
            name
        })
        .collect()
}

/// One repo of a run, as the JobSpec gives it plus the remote the runner derived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRepo {
    pub workspace_id: i64,
    pub slug: String,
    pub base_ref: String,
    pub continue_branch: String,
    pub remote_url: String,
}

/// Everything needed to prepare a run's `/workspace`.
#[derive(Clone)]
pub struct RunWorkspaceRequest {
    pub root: String,
    pub run_id: i64,
    /// Primary first.
    pub repos: Vec<RunRepo>,
    pub token: String,
    pub policy: TransportPolicy,
    pub lock_timeout: Duration,
    /// Written into each checkout (and the workspace root of a multi-repo run).
    pub ws_toml: Option<WsToml>,
    /// Shared by every repo's prepare: one cancel switch and one retry count for the run.
    pub retry: GitRetry,
}

impl Default for RunWorkspaceRequest {
    fn default() -> Self {
        Self {
            root: String::new(),
            run_id: 0,
            repos: Vec::new(),
            token: String::new(),
            policy: TransportPolicy::default(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            ws_toml: None,
            retry: GitRetry::default(),
        }
    }
}

/// One prepared repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedRepo {
    pub slug: String,
    pub remote_url: String,
    pub output: PrepareOutput,
}

/// A prepared run workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunWorkspace {
    /// What becomes `/workspace`: the checkout (one repo) or the workspace root (several).
    pub mount_path: PathBuf,
    /// True for a multi-repo workspace (events then carry a `repo` field).
    pub multi_repo: bool,
    /// Primary first.
    pub repos: Vec<PreparedRepo>,
}

/// Prepares every repo of a run and writes `ws.toml`. Idempotent: a repeat rebuilds the
/// workspace from the caches.
pub fn prepare_run_workspace(req: &RunWorkspaceRequest) -> Result<RunWorkspace, GitError> {
    if req.repos.is_empty() {
        return Err(GitError::Invalid(super::validate::ValidationError::new(
            "repos",
            "a run workspace needs at least one repo",
        )));
    }
    for repo in &req.repos {
        validate_slug(&repo.slug)?;
    }
    let multi_repo = req.repos.len() > 1;
    let ws_root = workspace_root(std::path::Path::new(&req.root), req.run_id);
    let names: Vec<String> = if multi_repo {
        let slugs: Vec<&str> = req.repos.iter().map(|r| r.slug.as_str()).collect();
        remove_path(&ws_root)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&ws_root)
            .map_err(|e| GitError::io(format!("create {}", ws_root.display()), e))?;
        workspace_dir_names(&slugs)
    } else {
        vec![String::new()]
    };
    let mut prepared = Vec::with_capacity(req.repos.len());
    for (repo, name) in req.repos.iter().zip(&names) {
        let dest_dir = if multi_repo {
            ws_root.join(name).to_string_lossy().into_owned()
        } else {
            String::new()
        };
        let output = prepare(&PrepareRequest {
            root: req.root.clone(),
            workspace_id: repo.workspace_id,
            slug: repo.slug.clone(),
            remote_url: repo.remote_url.clone(),
            base_ref: repo.base_ref.clone(),
            continue_branch: repo.continue_branch.clone(),
            dest_dir,
            run_id: req.run_id,
            token: req.token.clone(),
            transport: GitTransport::Proxy,
            policy: req.policy,
            lock_timeout: req.lock_timeout,
            retry: req.retry.clone(),
        })?;
        if let Some(cfg) = &req.ws_toml {
            cfg.write_into(&output.checkout_path)?;
        }
        prepared.push(PreparedRepo {
            slug: repo.slug.clone(),
            remote_url: repo.remote_url.clone(),
            output,
        });
    }
    let mount_path = if multi_repo {
        if let Some(cfg) = &req.ws_toml {
            cfg.write_into(&ws_root)?;
        }
        ws_root
    } else {
        prepared[0].output.checkout_path.clone()
    };
    Ok(RunWorkspace {
        mount_path,
        multi_repo,
        repos: prepared,
    })
}

/// Removes a run's checkouts (spec 4.9 step 6 / multi-repo cleanup). Idempotent.
pub fn remove_run_workspace(workspace: &RunWorkspace) -> Result<(), GitError> {
    for repo in &workspace.repos {
        remove_path(&repo.output.checkout_path)?;
    }
    if workspace.multi_repo {
        remove_path(&workspace.mount_path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_are_unique_and_deterministic() {
        assert_eq!(workspace_dir_names(&["a/api", "b/web"]), ["api", "web"]);
        assert_eq!(
            workspace_dir_names(&["a/api", "b/api", "c/api", "d/api-2"]),
            ["api", "api-2", "api-3", "api-2-2"]
        );
        assert_eq!(workspace_dir_names(&["a/ws.toml"]), ["ws.toml-2"]);
    }
}
