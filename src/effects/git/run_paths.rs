//! Where a run's git lives on the host and on the server: the git-proxy URL of each of the
//! plan's repos, the paths its checkout may occupy, and the bare cache a push borrows from.

use std::path::{Path, PathBuf};

use super::{git_proxy_url, validate_slug, workspace_root, RepoCache};
use crate::fsm::RunPlan;

/// The `objects` directory of the run's bare cache for `slug`, which a push borrows the base
/// history from (`None` when the slug is not one of the plan's or does not parse).
pub fn cache_objects(cache_root: &Path, plan: &RunPlan, slug: &str) -> Option<PathBuf> {
    let repo = plan.repos.iter().find(|r| r.slug == slug)?;
    let (owner, name) = slug.split_once('/')?;
    Some(
        RepoCache::new(cache_root, repo.workspace_id, owner, name)
            .bare()
            .join("objects"),
    )
}

/// The git-proxy URL of one of the plan's repos (spec 4.9 step 3); `None` for a bad slug.
pub fn repo_proxy_url(api_url: &str, plan: &RunPlan, slug: &str) -> Option<String> {
    let workspace_id = plan
        .repos
        .iter()
        .find(|r| r.slug == slug)
        .map_or(0, |r| r.workspace_id);
    let (owner, repo) = validate_slug(slug).ok()?;
    Some(git_proxy_url(api_url, workspace_id, &owner, &repo))
}

/// Every path a run's checkout may occupy: each repo's `runs/<id>` and the multi-repo root.
pub fn run_paths(cache_root: &Path, run_id: i64, plan: &RunPlan) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = plan
        .repos
        .iter()
        .filter_map(|r| {
            let (owner, repo) = validate_slug(&r.slug).ok()?;
            Some(RepoCache::new(cache_root, r.workspace_id, &owner, &repo).run_checkout(run_id))
        })
        .collect();
    paths.push(workspace_root(cache_root, run_id));
    paths
}
