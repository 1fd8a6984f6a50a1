//! The bare-clone cache (spec 4.11 layout) and what keeps it healthy: cloning into a temp
//! dir then renaming, stale lock cleanup, one re-clone when a fetch fails, retries across
//! transient network errors, and eviction.
//!
//! ```text
//! <root>/<workspace_id>/<owner>/<repo>/.bare          bare cache (never mounted)
//! <root>/<workspace_id>/<owner>/<repo>/.cache.lock    flock(2) target, see lock.rs
//! <root>/<workspace_id>/<owner>/<repo>/runs/<run_id>  per-run checkout
//! <root>/.workspaces/run-<id>/<dir>                   multi-repo checkouts
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::cmd::{GitSession, Reach};
use super::error::GitError;
use super::lock::CacheLock;
use super::retry::GitRetry;

/// Name of the bare repository inside a repo cache directory.
pub const BARE_DIR: &str = ".bare";
/// Name of the lock file next to `.bare`.
pub const LOCK_FILE: &str = ".cache.lock";
/// Prefix of a bare clone in progress; renamed to `.bare` once complete.
const CLONE_TMP_PREFIX: &str = ".bare.tmp-";
/// Prefix of a replaced cache waiting to be deleted.
const CLONE_OLD_PREFIX: &str = ".bare.old-";

/// Default age after which an idle repo cache is evicted (`WSRUNNER_CACHE_MAX_AGE`).
pub const DEFAULT_CACHE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// The directory of one (workspace, owner, repo) cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoCache {
    dir: PathBuf,
}

impl RepoCache {
    /// The cache for `owner/repo` in `workspace_id` under `root`. Inputs must be validated.
    pub fn new(root: &Path, workspace_id: i64, owner: &str, repo: &str) -> Self {
        Self {
            dir: root.join(workspace_id.to_string()).join(owner).join(repo),
        }
    }

    /// `<root>/<ws>/<owner>/<repo>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/.bare`.
    pub fn bare(&self) -> PathBuf {
        self.dir.join(BARE_DIR)
    }

    /// `<dir>/.cache.lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join(LOCK_FILE)
    }

    /// `<dir>/runs`.
    pub fn runs_dir(&self) -> PathBuf {
        self.dir.join("runs")
    }

    /// `<dir>/runs/<run_id>`: the default checkout of a single-repo run.
    pub fn run_checkout(&self, run_id: i64) -> PathBuf {
        self.runs_dir().join(run_id.to_string())
    }
}

/// `<root>/.workspaces/run-<id>`: the `/workspace` of a multi-repo run.
pub fn workspace_root(root: &Path, run_id: i64) -> PathBuf {
    root.join(".workspaces").join(format!("run-{run_id}"))
}

/// What [`clean_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleCleanup {
    pub lock_files: Vec<PathBuf>,
    pub temp_dirs: Vec<PathBuf>,
}

/// Removes leftovers of killed processes: half-made clones (`.bare.tmp-*`, `.bare.old-*`)
/// and every `*.lock` file inside `.bare`. Holding `_lock` proves no other runner process is
/// using the cache, and git children die with their parent (see cmd.rs), so any git lock
/// file still present belongs to a dead process.
pub fn clean_stale(cache: &RepoCache, _lock: &CacheLock) -> Result<StaleCleanup, GitError> {
    let mut report = StaleCleanup::default();
    let entries = match std::fs::read_dir(cache.dir()) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(GitError::io(format!("list {}", cache.dir().display()), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(CLONE_TMP_PREFIX) || name.starts_with(CLONE_OLD_PREFIX) {
            remove_path(&entry.path())?;
            report.temp_dirs.push(entry.path());
        }
    }
    collect_lock_files(&cache.bare(), &mut report.lock_files)?;
    for file in &report.lock_files {
        std::fs::remove_file(file)
            .map_err(|e| GitError::io(format!("remove stale {}", file.display()), e))?;
    }
    if !report.lock_files.is_empty() || !report.temp_dirs.is_empty() {
        tracing::warn!(
            cache = %cache.dir().display(),
            lock_files = report.lock_files.len(),
            temp_dirs = report.temp_dirs.len(),
            "removed leftovers of an interrupted git operation"
        );
    }
    Ok(report)
}

fn collect_lock_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), GitError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(GitError::io(format!("list {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            collect_lock_files(&path, out)?;
        } else if kind.is_file() && entry.file_name().to_string_lossy().ends_with(".lock") {
            out.push(path);
        }
    }
    Ok(())
}

/// Removes a file, symlink or directory tree; a missing path is fine.
pub(crate) fn remove_path(path: &Path) -> Result<(), GitError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(GitError::io(format!("stat {}", path.display()), e)),
    };
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(GitError::io(format!("remove {}", path.display()), e)),
    }
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}", std::process::id())
}

/// Clones `remote` bare into a temp dir next to `.bare`, sets `gc.auto 0`, then renames it
/// into place, replacing (after the rename succeeded) any previous cache.
fn clone_bare_into_place(
    session: &GitSession,
    cache: &RepoCache,
    remote: &str,
    _lock: &CacheLock,
) -> Result<(), GitError> {
    let tmp = cache
        .dir()
        .join(format!("{CLONE_TMP_PREFIX}{}", unique_suffix()));
    let result = (|| {
        session.run(
            Reach::Remote,
            "clone --bare",
            [
                "clone".as_ref(),
                "--bare".as_ref(),
                "--quiet".as_ref(),
                "--".as_ref(),
                std::ffi::OsStr::new(remote),
                tmp.as_os_str(),
            ],
        )?;
        session.run(
            Reach::Local,
            "config gc.auto",
            [
                "--git-dir".as_ref(),
                tmp.as_os_str(),
                "config".as_ref(),
                "gc.auto".as_ref(),
                "0".as_ref(),
            ],
        )?;
        let bare = cache.bare();
        let old = cache
            .dir()
            .join(format!("{CLONE_OLD_PREFIX}{}", unique_suffix()));
        let had_old = bare.exists();
        if had_old {
            std::fs::rename(&bare, &old)
                .map_err(|e| GitError::io(format!("move aside {}", bare.display()), e))?;
        }
        std::fs::rename(&tmp, &bare)
            .map_err(|e| GitError::io(format!("rename clone into {}", bare.display()), e))?;
        if had_old {
            remove_path(&old)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = remove_path(&tmp);
    }
    result
}

/// Brings the bare cache up to date for `branch` and returns the branch's commit
/// (spec 4.11 steps 2–4). The caller holds the cache lock.
///
/// Recovery: a missing or half-made `.bare` (no `HEAD`) is cloned afresh; a fetch or
/// rev-parse that fails for a reason other than a missing branch, refused credentials or a
/// transient network error triggers one fresh clone (swapped in only if it succeeds) and one
/// retry. A transient failure (HTTP 5xx/429, a dropped connection…) is retried as a whole
/// within `retry`'s budget instead: a new clone cannot fix the network.
pub(crate) fn refresh_cache(
    session: &GitSession,
    cache: &RepoCache,
    remote: &str,
    branch: &str,
    lock: &CacheLock,
    retry: &GitRetry,
) -> Result<String, GitError> {
    retry.run("cache fetch", || {
        refresh_cache_once(session, cache, remote, branch, lock)
    })
}

fn refresh_cache_once(
    session: &GitSession,
    cache: &RepoCache,
    remote: &str,
    branch: &str,
    lock: &CacheLock,
) -> Result<String, GitError> {
    clean_stale(cache, lock)?;
    let mut fresh = false;
    if !cache.bare().join("HEAD").is_file() {
        remove_path(&cache.bare())?;
        clone_bare_into_place(session, cache, remote, lock)?;
        fresh = true;
    }
    match fetch_branch(session, cache, remote, branch) {
        Ok(sha) => Ok(sha),
        Err(e @ (GitError::RemoteBranchMissing { .. } | GitError::AuthFailed { .. })) => Err(e),
        Err(e) if fresh || e.is_transient() => Err(e),
        Err(first) => {
            tracing::warn!(
                cache = %cache.dir().display(),
                error = %first,
                "cache fetch failed; re-cloning it once"
            );
            clone_bare_into_place(session, cache, remote, lock).map_err(|clone_err| {
                // A re-clone that met a network hiccup is retried like any transient error.
                if clone_err.is_transient() {
                    return clone_err;
                }
                GitError::Command {
                    what: "fetch into the cache (and the re-clone after it)".into(),
                    status: "failed".into(),
                    stderr: format!("fetch: {first}; re-clone: {clone_err}"),
                }
            })?;
            fetch_branch(session, cache, remote, branch)
        }
    }
}

fn fetch_branch(
    session: &GitSession,
    cache: &RepoCache,
    remote: &str,
    branch: &str,
) -> Result<String, GitError> {
    let bare = cache.bare();
    let git_dir = ["--git-dir".as_ref(), bare.as_os_str()];
    // Follow a changed remote URL (the proxy URL is derived from WS_API_URL).
    session.run(
        Reach::Local,
        "remote set-url (cache)",
        git_dir
            .iter()
            .copied()
            .chain(["remote", "set-url", "origin", remote].map(std::ffi::OsStr::new)),
    )?;
    let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
    let out = session.output(
        Reach::Remote,
        "fetch",
        git_dir.iter().copied().chain(
            ["fetch", "--prune", "--quiet", "origin", refspec.as_str()].map(std::ffi::OsStr::new),
        ),
    )?;
    if !out.status.success() {
        let stderr = session.redact(String::from_utf8_lossy(&out.stderr).trim());
        if stderr.contains("couldn't find remote ref") {
            return Err(GitError::RemoteBranchMissing {
                branch: branch.to_owned(),
                stderr,
            });
        }
        return Err(session.failure("fetch", &out));
    }
    let rev = format!("refs/heads/{branch}^{{commit}}");
    session.run(
        Reach::Local,
        "rev-parse base",
        git_dir
            .iter()
            .copied()
            .chain(["rev-parse", "--verify", "--quiet", rev.as_str()].map(std::ffi::OsStr::new)),
    )
}

/// What [`evict_idle`] / [`evict`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EvictionReport {
    /// Repo cache directories removed for their age.
    pub removed: Vec<PathBuf>,
    /// Repo cache directories removed, oldest-used first, to bring the total under the cap.
    pub removed_for_size: Vec<PathBuf>,
    /// Caches skipped because another process held their lock.
    pub busy: Vec<PathBuf>,
    /// Caches kept because a run uses them or they were used recently.
    pub kept: Vec<PathBuf>,
    /// Disk use of the caches left (bytes, `.bare` and the lock), after the eviction.
    pub bytes_left: u64,
}

/// Removes every `<root>/<ws>/<owner>/<repo>` whose `runs/` is empty and whose last fetch
/// (`.bare/FETCH_HEAD`, else `.bare`, else the directory) is at least `max_age` before
/// `now`. Each cache is checked and removed under its lock; a busy lock skips the cache.
pub fn evict_idle(
    root: &Path,
    max_age: Duration,
    now: SystemTime,
) -> Result<EvictionReport, GitError> {
    evict(root, max_age, None, now)
}

/// [`evict_idle`], then, when `max_bytes` is set (`WSRUNNER_CACHE_MAX_BYTES`) and the caches
/// left use more disk than that, removes idle caches oldest-used first until they fit. A
/// cache in use (a checkout under `runs/`) or locked by another process is never removed;
/// it still counts, so the caches may stay above the cap while those runs go on.
pub fn evict(
    root: &Path,
    max_age: Duration,
    max_bytes: Option<u64>,
    now: SystemTime,
) -> Result<EvictionReport, GitError> {
    let mut report = EvictionReport::default();
    let mut left = Vec::new();
    for ws_dir in workspace_dirs(root)? {
        for owner_dir in subdirs(&ws_dir)? {
            for repo_dir in subdirs(&owner_dir)? {
                let removed = remove_if(&repo_dir, &mut report, |repo_dir| {
                    let idle_for = last_used(repo_dir).and_then(|t| now.duration_since(t).ok());
                    Ok(runs_empty(repo_dir)? && idle_for.is_some_and(|d| d >= max_age))
                })?;
                if removed {
                    tracing::info!(cache = %repo_dir.display(), "evicted idle repo cache");
                    report.removed.push(repo_dir);
                } else {
                    left.push(repo_dir);
                }
            }
            let _ = std::fs::remove_dir(&owner_dir); // only succeeds when empty
        }
        let _ = std::fs::remove_dir(&ws_dir);
    }
    let mut sized: Vec<(Option<SystemTime>, u64, PathBuf)> = left
        .into_iter()
        .map(|dir| (last_used(&dir), cache_bytes(&dir), dir))
        .collect();
    let mut total: u64 = sized.iter().map(|(_, bytes, _)| bytes).sum();
    if let Some(cap) = max_bytes {
        // Oldest-used first; a cache whose use time cannot be read goes first too.
        sized.sort_by_key(|(used, _, _)| *used);
        for (_, bytes, dir) in &sized {
            if total <= cap {
                break;
            }
            let removed = remove_if(dir, &mut report, runs_empty)?;
            if removed {
                total = total.saturating_sub(*bytes);
                tracing::info!(cache = %dir.display(), bytes, cap, "evicted repo cache: the caches were over WSRUNNER_CACHE_MAX_BYTES");
                report.removed_for_size.push(dir.clone());
                report.kept.retain(|k| k != dir);
            }
        }
        if total > cap {
            tracing::warn!(
                bytes = total,
                cap,
                "repo caches stay above WSRUNNER_CACHE_MAX_BYTES: the rest are in use or locked"
            );
        }
    }
    report.bytes_left = total;
    Ok(report)
}

/// Disk use of the repo caches under `root` (bytes): `(caches, checkouts)`, the checkouts
/// being every `runs/<id>` and the multi-repo roots under `.workspaces` (for `doctor`).
pub fn disk_use(root: &Path) -> (u64, u64) {
    let (mut caches, mut checkouts) = (0, 0);
    let dirs = workspace_dirs(root).unwrap_or_default();
    for ws_dir in dirs {
        for owner_dir in subdirs(&ws_dir).unwrap_or_default() {
            for repo_dir in subdirs(&owner_dir).unwrap_or_default() {
                caches += cache_bytes(&repo_dir);
                checkouts += tree_bytes(&repo_dir.join("runs"));
            }
        }
    }
    checkouts += tree_bytes(&root.join(".workspaces"));
    (caches, checkouts)
}

/// The numbered workspace directories under the cache root (nothing else is a cache).
fn workspace_dirs(root: &Path) -> Result<Vec<PathBuf>, GitError> {
    Ok(subdirs(root)?
        .into_iter()
        .filter(|dir| {
            dir.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<i64>().ok())
                .is_some_and(|id| id > 0)
        })
        .collect())
}

/// When the cache was last fetched into (`.bare/FETCH_HEAD`, else `.bare`, else the dir).
fn last_used(repo_dir: &Path) -> Option<SystemTime> {
    let bare = repo_dir.join(BARE_DIR);
    [bare.join("FETCH_HEAD"), bare, repo_dir.to_owned()]
        .iter()
        .find_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Whether no run checkout is under the cache's `runs/`.
fn runs_empty(repo_dir: &Path) -> Result<bool, GitError> {
    let runs = repo_dir.join("runs");
    match std::fs::read_dir(&runs) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(GitError::io(format!("list {}", runs.display()), e)),
    }
}

/// Disk use of one cache without its run checkouts: everything but `runs/`.
fn cache_bytes(repo_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(repo_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name() != "runs")
        .map(|e| tree_bytes(&e.path()))
        .sum()
}

/// Disk use (allocated blocks) of a tree, symlinks not followed; unreadable parts count 0.
pub fn tree_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

/// Removes the cache under its lock when `evictable` holds with the lock held: `Ok(false)`
/// when it does not, or when another process holds the lock (recorded as busy).
fn remove_if(
    repo_dir: &Path,
    report: &mut EvictionReport,
    evictable: impl Fn(&Path) -> Result<bool, GitError>,
) -> Result<bool, GitError> {
    let lock_path = repo_dir.join(LOCK_FILE);
    let lock = match CacheLock::acquire(&lock_path, Duration::ZERO) {
        Ok(lock) => lock,
        Err(GitError::LockTimeout { .. }) => {
            if !report.busy.iter().any(|b| b == repo_dir) {
                report.busy.push(repo_dir.to_owned());
            }
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    if !evictable(repo_dir)? {
        if !report.kept.iter().any(|k| k == repo_dir) {
            report.kept.push(repo_dir.to_owned());
        }
        return Ok(false);
    }
    let entries = std::fs::read_dir(repo_dir)
        .map_err(|e| GitError::io(format!("list {}", repo_dir.display()), e))?;
    for entry in entries.flatten() {
        if entry.file_name() != LOCK_FILE {
            remove_path(&entry.path())?;
        }
    }
    // Unlink the lock last, while still holding it: waiters notice the inode changed.
    remove_path(&lock_path)?;
    drop(lock);
    let _ = std::fs::remove_dir(repo_dir);
    Ok(true)
}

/// Real subdirectories of `dir` (symlinks are not followed); a missing dir has none.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, GitError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(GitError::io(format!("list {}", dir.display()), e)),
    };
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}
