//! `push` (spec 4.11 "Push"): never from the checkout the agent touched, never forced, and
//! idempotent: a remote branch already at the commit counts as pushed, which is also what
//! makes retrying a push across a transient network error safe.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::agent_tree::AgentGitDir;
use super::cmd::{GitSession, Reach};
use super::error::GitError;
use super::retry::GitRetry;
use super::validate::{
    validate_abs_path, validate_branch_name, validate_commit_id, validate_remote_url, RemoteScheme,
    TransportPolicy,
};

/// Everything `push` needs.
#[derive(Clone, Default)]
pub struct PushRequest {
    /// The checkout the agent worked in.
    pub checkout: PathBuf,
    /// The branch to push (the run branch or the continuation branch).
    pub branch: String,
    /// Where to push: `--remote-url` (askpass) or `--proxy-url` (proxy).
    pub remote_url: String,
    /// The run token; empty means no authentication.
    pub token: String,
    /// The base commit; when the branch is still there, nothing is pushed.
    pub skip_if_head: String,
    pub policy: TransportPolicy,
    /// Budget and cancel switch for `ls-remote` + `push` across transient network errors;
    /// a cancel also kills the git call under way.
    pub retry: GitRetry,
    /// The run's own bare cache's `objects` directory: the snapshot borrows the base history
    /// from it instead of copying the checkout's packs. `None` copies everything.
    pub cache_objects: Option<PathBuf>,
}

impl std::fmt::Debug for PushRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushRequest")
            .field("checkout", &self.checkout)
            .field("branch", &self.branch)
            .field("remote_url", &self.remote_url)
            .field(
                "token",
                &if self.token.is_empty() {
                    ""
                } else {
                    crate::redact::MASK
                },
            )
            .field("skip_if_head", &self.skip_if_head)
            .field("policy", &self.policy)
            .field("retry", &self.retry)
            .field("cache_objects", &self.cache_objects)
            .finish()
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    /// The commit now on the remote branch (empty when skipped, as triage prints it).
    pub head_sha: String,
    /// The branch was still at `skip_if_head`: no new commits, nothing pushed.
    pub skipped: bool,
    /// The remote branch was already at `head_sha` (a repeat after a crash); nothing sent.
    pub already_on_remote: bool,
}

/// Pushes `refs/heads/<branch>` of the checkout to the remote, never letting git near the
/// checkout itself (see [`super::agent_tree`]): the branch is read and the agent's objects are
/// copied by the runner into a runner-owned snapshot repository (borrowing the run's own cache
/// for the base history), and the push repository fetches from that snapshot with every
/// received object checked (`fetch.fsckObjects`). Nothing the agent planted (symlinks to
/// other repositories or host files, pipes, hooks, `core.hooksPath`, `url.*.insteadOf`,
/// `include.path`, alternates, a `.git` file pointing elsewhere) takes part.
pub fn push(req: &PushRequest) -> Result<PushOutcome, GitError> {
    validate_abs_path("--dest", &req.checkout)?;
    validate_branch_name("--branch", &req.branch)?;
    let scheme = validate_remote_url("--remote-url/--proxy-url", &req.remote_url, req.policy)?;
    if !req.skip_if_head.is_empty() {
        validate_commit_id("--skip-if-head", &req.skip_if_head)?;
    }
    let agent_git = AgentGitDir::open(&req.checkout)?;
    agent_git.check_tree()?;
    let head = agent_git
        .read_branch(&req.branch)?
        .ok_or_else(|| GitError::UnsafeCheckout {
            path: req.checkout.clone(),
            reason: format!("the branch {:?} does not exist in the checkout", req.branch),
        })?;
    if !req.skip_if_head.is_empty() && head.eq_ignore_ascii_case(&req.skip_if_head) {
        return Ok(PushOutcome {
            head_sha: String::new(),
            skipped: true,
            already_on_remote: false,
        });
    }

    let session = GitSession::new(Some(&req.token), req.policy, scheme)?.with_cancel(&req.retry);
    let branch_ref = format!("refs/heads/{}", req.branch);
    let cache_objects = req.cache_objects.as_deref().filter(|p| p.is_dir());

    // The snapshot: our own bare repository holding a copy of the agent's objects.
    let snapshot = session.scratch().join("snapshot.git");
    init_bare(&session, &snapshot, cache_objects)?;
    let copied = agent_git.copy_objects(
        &snapshot.join("objects"),
        cache_objects.map(|o| o.join("pack")).as_deref(),
    )?;
    for pack in &copied.packs {
        session.run(
            Reach::Local,
            "index a pack the agent made",
            [
                "--git-dir".as_ref(),
                snapshot.as_os_str(),
                "index-pack".as_ref(),
                "--strict".as_ref(),
                pack.as_os_str(),
            ],
        )?;
    }
    let kind = session
        .run(
            Reach::Local,
            "check the branch's commit",
            [
                "--git-dir".as_ref(),
                snapshot.as_os_str(),
                "cat-file".as_ref(),
                "-t".as_ref(),
                OsStr::new(&head),
            ],
        )
        .map_err(|_| GitError::UnsafeCheckout {
            path: req.checkout.clone(),
            reason: format!(
                "the branch {:?} names an object the checkout does not hold",
                req.branch
            ),
        })?;
    if kind != "commit" {
        return Err(GitError::UnsafeCheckout {
            path: req.checkout.clone(),
            reason: format!("the branch {:?} names a {kind}, not a commit", req.branch),
        });
    }
    update_ref(&session, &snapshot, &branch_ref, &head)?;

    // The push repository receives only objects the cache lacks, each one checked.
    let push_repo = session.scratch().join("push.git");
    init_bare(&session, &push_repo, cache_objects)?;
    if cache_objects.is_some() && !req.skip_if_head.is_empty() {
        // A ref at the base lets the fetch negotiate: the base history is not sent again.
        let _ = update_ref(
            &session,
            &push_repo,
            "refs/windshift/base",
            &req.skip_if_head,
        );
    }
    let refspec = format!("+{branch_ref}:{branch_ref}");
    session.run(
        Reach::Local,
        "fetch the branch from the snapshot",
        [
            "--git-dir".as_ref(),
            push_repo.as_os_str(),
            "-c".as_ref(),
            "fetch.fsckObjects=true".as_ref(),
            "fetch".as_ref(),
            "--no-tags".as_ref(),
            "--quiet".as_ref(),
            snapshot.as_os_str(),
            OsStr::new(&refspec),
        ],
    )?;
    let fetched = rev_parse(&session, &push_repo, &branch_ref)?;
    if fetched != head {
        return Err(GitError::ShaMismatch {
            expected: head,
            fetched,
        });
    }

    // Each attempt starts by asking the remote, so a push whose answer was lost (a 5xx or a
    // dropped connection after the update landed) counts as done on the next attempt.
    req.retry.run("push", || {
        push_once(&session, req, &push_repo, &head, &branch_ref)
    })
}

/// `git init --bare` at `path`, borrowing `alternate` (the run's cache objects) when given.
fn init_bare(session: &GitSession, path: &Path, alternate: Option<&Path>) -> Result<(), GitError> {
    session.run(
        Reach::Local,
        "init a private repository",
        [
            "init".as_ref(),
            "--bare".as_ref(),
            "--quiet".as_ref(),
            path.as_os_str(),
        ],
    )?;
    if let Some(objects) = alternate {
        let file = path.join("objects/info/alternates");
        let mut line = objects.as_os_str().as_encoded_bytes().to_vec();
        line.push(b'\n');
        std::fs::write(&file, line)
            .map_err(|e| GitError::io(format!("write {}", file.display()), e))?;
    }
    Ok(())
}

fn update_ref(session: &GitSession, repo: &Path, name: &str, id: &str) -> Result<(), GitError> {
    session
        .run(
            Reach::Local,
            "update-ref",
            [
                "--git-dir".as_ref(),
                repo.as_os_str(),
                "update-ref".as_ref(),
                OsStr::new(name),
                OsStr::new(id),
            ],
        )
        .map(|_| ())
}

/// One attempt: `ls-remote` (already at the sha → done), then `git push`, then on failure
/// `ls-remote` again (the update may have landed) before classifying the error.
fn push_once(
    session: &GitSession,
    req: &PushRequest,
    push_repo: &Path,
    head: &str,
    branch_ref: &str,
) -> Result<PushOutcome, GitError> {
    let done = || PushOutcome {
        head_sha: head.to_owned(),
        skipped: false,
        already_on_remote: true,
    };
    if ls_remote_branch(session, &req.remote_url, &req.branch)?.as_deref() == Some(head) {
        return Ok(done());
    }
    let target = format!("{head}:{branch_ref}");
    let out = session.output(
        Reach::Remote,
        "push",
        [
            "--git-dir".as_ref(),
            push_repo.as_os_str(),
            "push".as_ref(),
            "--quiet".as_ref(),
            "--no-verify".as_ref(),
            OsStr::new(&req.remote_url),
            OsStr::new(&target),
        ],
    )?;
    if out.status.success() {
        return Ok(PushOutcome {
            head_sha: head.to_owned(),
            skipped: false,
            already_on_remote: false,
        });
    }
    // The update may have landed before the connection broke: the remote decides.
    if let Ok(Some(now)) = ls_remote_branch(session, &req.remote_url, &req.branch) {
        if now == head {
            return Ok(done());
        }
    }
    let stderr = session.redact(String::from_utf8_lossy(&out.stderr).trim());
    if ["non-fast-forward", "fetch first", "[rejected]"]
        .iter()
        .any(|s| stderr.contains(s))
    {
        return Err(GitError::Diverged {
            branch: req.branch.clone(),
            stderr,
        });
    }
    // The ls-remote above authenticated with this token, so a 403 now is the proxy's push
    // gate, not a bad token.
    if stderr.contains("returned error: 403") {
        return Err(GitError::NoPushGrant {
            branch: req.branch.clone(),
            stderr,
        });
    }
    Err(session.failure("push", &out))
}

/// The object id `refs/heads/<branch>` names in the agent's checkout, read by the runner
/// itself (no git, no symlink followed, the whole `.git` checked first; see
/// [`super::agent_tree`]). The daemon's `InspectHeads` step uses it so the push intent it
/// journals names the exact commit; [`push`] checks that it is one.
pub fn branch_head(checkout: &Path, branch: &str) -> Result<String, GitError> {
    validate_abs_path("checkout", checkout)?;
    validate_branch_name("branch", branch)?;
    let agent_git = AgentGitDir::open(checkout)?;
    agent_git.check_tree()?;
    agent_git
        .read_branch(branch)?
        .ok_or_else(|| GitError::UnsafeCheckout {
            path: checkout.to_owned(),
            reason: format!("the branch {branch:?} does not exist in the checkout"),
        })
}

/// The commit `refs/heads/<branch>` points at on the remote, or `None` when the branch does
/// not exist. Recovery uses it to decide whether a journaled push already landed. One
/// attempt, no retry: recovery must not hold the first claim for a retry budget, and an
/// unanswered question only means the (idempotent) push is done again.
pub fn remote_ref_sha(
    remote_url: &str,
    branch: &str,
    token: &str,
    policy: TransportPolicy,
) -> Result<Option<String>, GitError> {
    validate_branch_name("branch", branch)?;
    let scheme: RemoteScheme = validate_remote_url("remote URL", remote_url, policy)?;
    let session = GitSession::new(Some(token), policy, scheme)?;
    ls_remote_branch(&session, remote_url, branch)
}

fn ls_remote_branch(
    session: &GitSession,
    remote_url: &str,
    branch: &str,
) -> Result<Option<String>, GitError> {
    let branch_ref = format!("refs/heads/{branch}");
    let listing = session.run(
        Reach::Remote,
        "ls-remote",
        ["ls-remote", "--heads", "--", remote_url, &branch_ref],
    )?;
    Ok(listing.lines().find_map(|line| {
        let (sha, name) = line.split_once('\t')?;
        (name == branch_ref).then(|| sha.to_owned())
    }))
}

fn rev_parse(session: &GitSession, git_dir: &Path, reference: &str) -> Result<String, GitError> {
    let rev = format!("{reference}^{{commit}}");
    session.run(
        Reach::Local,
        "rev-parse",
        [
            "--git-dir".as_ref(),
            git_dir.as_os_str(),
            "rev-parse".as_ref(),
            "--verify".as_ref(),
            "--quiet".as_ref(),
            OsStr::new(&rev),
        ],
    )
}
