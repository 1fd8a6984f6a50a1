//! `push` (spec 4.11 "Push"): never from the checkout the agent touched, never forced, and
//! idempotent: a remote branch already at the commit counts as pushed, which is also what
//! makes retrying a push across a transient network error safe.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

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
    /// Budget and cancel switch for `ls-remote` + `push` across transient network errors.
    pub retry: GitRetry,
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

/// Pushes `refs/heads/<branch>` of the checkout to the remote, through a fresh temporary
/// repository so nothing the agent planted in the checkout (hooks, `core.hooksPath`,
/// `url.*.insteadOf`, a `.git` file pointing elsewhere, alternates) takes part.
pub fn push(req: &PushRequest) -> Result<PushOutcome, GitError> {
    validate_abs_path("--dest", &req.checkout)?;
    validate_branch_name("--branch", &req.branch)?;
    let scheme = validate_remote_url("--remote-url/--proxy-url", &req.remote_url, req.policy)?;
    if !req.skip_if_head.is_empty() {
        validate_commit_id("--skip-if-head", &req.skip_if_head)?;
    }
    let git_dir = checked_git_dir(&req.checkout)?;
    let session = GitSession::new(Some(&req.token), req.policy, scheme)?;
    session.set_safe_directories(&[&req.checkout, &git_dir])?;

    let branch_ref = format!("refs/heads/{}", req.branch);
    let head = rev_parse(&session, &git_dir, &branch_ref).map_err(|e| match e {
        GitError::Command { stderr, .. } => GitError::Command {
            what: format!("find branch {:?} in the checkout", req.branch),
            status: "failed".into(),
            stderr: if stderr.is_empty() {
                "the branch does not exist in the checkout".into()
            } else {
                stderr
            },
        },
        other => other,
    })?;
    if !req.skip_if_head.is_empty() && head.eq_ignore_ascii_case(&req.skip_if_head) {
        return Ok(PushOutcome {
            head_sha: String::new(),
            skipped: true,
            already_on_remote: false,
        });
    }

    let push_repo = session.scratch().join("push.git");
    session.run(
        Reach::Local,
        "init the push repository",
        [
            "init".as_ref(),
            "--bare".as_ref(),
            "--quiet".as_ref(),
            push_repo.as_os_str(),
        ],
    )?;
    let refspec = format!("+{branch_ref}:{branch_ref}");
    session.run(
        Reach::Local,
        "fetch the branch from the checkout",
        [
            "--git-dir".as_ref(),
            push_repo.as_os_str(),
            "fetch".as_ref(),
            "--no-tags".as_ref(),
            "--quiet".as_ref(),
            git_dir.as_os_str(),
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

/// The commit `refs/heads/<branch>` points at in the agent's checkout (read-only, local, with
/// the same hardening and `.git` pointer checks as [`push`]). The daemon's `InspectHeads`
/// step uses it so the push intent it journals names the exact commit.
pub fn branch_head(checkout: &Path, branch: &str) -> Result<String, GitError> {
    validate_abs_path("checkout", checkout)?;
    validate_branch_name("branch", branch)?;
    let git_dir = checked_git_dir(checkout)?;
    let session = GitSession::new(None, TransportPolicy::default(), RemoteScheme::File)?;
    session.set_safe_directories(&[checkout, &git_dir])?;
    rev_parse(&session, &git_dir, &format!("refs/heads/{branch}"))
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

/// `<checkout>/.git`, after checking that the agent has not turned it into a pointer to
/// another repository: it must be a real directory (not a symlink or a `gitdir:` file), with
/// no `commondir`, no alternates, and real `objects`/`refs` directories. Our own checkouts
/// never have any of these, and each could pull another repository's objects (say another
/// workspace's cache, whose path is guessable) into the push.
fn checked_git_dir(checkout: &Path) -> Result<PathBuf, GitError> {
    let unsafe_because = |reason: &str| GitError::UnsafeCheckout {
        path: checkout.to_owned(),
        reason: reason.to_owned(),
    };
    let git_dir = checkout.join(".git");
    let meta = std::fs::symlink_metadata(&git_dir)
        .map_err(|e| GitError::io(format!("stat {}", git_dir.display()), e))?;
    if !meta.is_dir() {
        return Err(unsafe_because(".git is not a plain directory"));
    }
    for (rel, reason) in [
        ("commondir", ".git/commondir points at another repository"),
        (
            "objects/info/alternates",
            ".git/objects/info/alternates borrows objects from elsewhere",
        ),
        (
            "objects/info/http-alternates",
            ".git/objects/info/http-alternates borrows objects from elsewhere",
        ),
    ] {
        if std::fs::symlink_metadata(git_dir.join(rel)).is_ok() {
            return Err(unsafe_because(reason));
        }
    }
    for rel in ["objects", "refs"] {
        match std::fs::symlink_metadata(git_dir.join(rel)) {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(unsafe_because(&format!(
                    ".git/{rel} is missing or not a plain directory"
                )))
            }
        }
    }
    Ok(git_dir)
}
