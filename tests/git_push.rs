//! Push: exactly the agent's commit lands, repeats are harmless, never forced, and nothing
//! planted in the checkout takes part. The remote is served over real smart HTTP with Basic
//! auth (`git http-backend`), so the askpass path and the token handling are exercised.

mod git_support;

use std::path::{Path, PathBuf};

use git_support::{commit_file, files_containing, git, GitHttpServer, Origin};
use windshift_runner::effects::git::{
    prepare, push, remote_ref_sha, GitError, PrepareOutput, PrepareRequest, PushRequest, RepoCache,
    TransportPolicy,
};

const TOKEN: &str = "run-token-5f2d9c81e0a7b3c4";
const DEV: TransportPolicy = TransportPolicy {
    allow_file_url: false,
    allow_insecure_http: true,
};

struct Fixture {
    _tmp: tempfile::TempDir,
    origin: Origin,
    server: GitHttpServer,
    root: PathBuf,
    remote: String,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let served = tmp.path().join("served");
        std::fs::create_dir_all(&served).expect("mkdir");
        let origin = Origin::create(&served, "widgets.git");
        let server = GitHttpServer::start(&served, TOKEN);
        let remote = server.url("widgets.git");
        let root = tmp.path().join("cache");
        Self {
            _tmp: tmp,
            origin,
            server,
            root,
            remote,
        }
    }

    fn prepare(&self, run_id: i64) -> PrepareOutput {
        prepare(&PrepareRequest {
            root: self.root.to_string_lossy().into_owned(),
            workspace_id: 3,
            slug: "acme/widgets".into(),
            remote_url: self.remote.clone(),
            run_id,
            token: TOKEN.into(),
            policy: DEV,
            ..PrepareRequest::default()
        })
        .expect("prepare over authenticated http")
    }

    fn push_request(&self, out: &PrepareOutput) -> PushRequest {
        PushRequest {
            checkout: out.checkout_path.clone(),
            branch: out.branch.clone(),
            remote_url: self.remote.clone(),
            token: TOKEN.into(),
            skip_if_head: out.base_commit.clone(),
            policy: DEV,
            ..PushRequest::default()
        }
    }
}

/// What the agent does: commit in its checkout.
fn agent_commit(checkout: &Path, file: &str) -> String {
    git(checkout, &["config", "user.name", "agent"]);
    git(checkout, &["config", "user.email", "agent@example.invalid"]);
    commit_file(checkout, file, "agent work\n")
}

#[test]
fn push_lands_exactly_the_agents_commit_and_a_repeat_is_harmless() {
    let fx = Fixture::new();
    let out = fx.prepare(1);
    let commit = agent_commit(&out.checkout_path, "feature.txt");

    let pushed = push(&fx.push_request(&out)).expect("push");
    assert_eq!(pushed.head_sha, commit);
    assert!(!pushed.skipped && !pushed.already_on_remote);
    assert_eq!(
        fx.origin.sha("refs/heads/agent-runs/run-1").as_deref(),
        Some(commit.as_str())
    );
    assert_eq!(
        fx.origin.sha("refs/heads/main"),
        Some(out.base_commit.clone()),
        "nothing else moved"
    );

    // The same push again (say, replayed after a crash) is done, not an error.
    let again = push(&fx.push_request(&out)).expect("repeat");
    assert_eq!(again.head_sha, commit);
    assert!(again.already_on_remote && !again.skipped);

    assert_eq!(
        remote_ref_sha(&fx.remote, "agent-runs/run-1", TOKEN, DEV).expect("ls-remote"),
        Some(commit)
    );
    assert_eq!(
        remote_ref_sha(&fx.remote, "agent-runs/run-404", TOKEN, DEV).expect("ls-remote"),
        None
    );
}

#[test]
fn the_token_goes_through_askpass_and_is_stored_nowhere() {
    let fx = Fixture::new();
    let out = fx.prepare(2);
    agent_commit(&out.checkout_path, "x.txt");
    push(&fx.push_request(&out)).expect("push");

    let seen = fx.server.seen();
    assert!(
        seen.iter().any(|a| a.is_none()),
        "git first asks without credentials"
    );
    let authed: Vec<_> = seen.iter().flatten().collect();
    assert!(!authed.is_empty());
    for (user, pass) in authed {
        assert_eq!((user.as_str(), pass.as_str()), ("oauth2", TOKEN));
    }
    let cache = RepoCache::new(&fx.root, 3, "acme", "widgets");
    assert_eq!(
        files_containing(&cache.bare(), TOKEN),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        files_containing(&out.checkout_path, TOKEN),
        Vec::<PathBuf>::new()
    );
    // No askpass script or config with the token survives in the temp dir either.
    let leaked: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("list temp dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("windshift-git-")
        })
        .flat_map(|e| files_containing(&e.path(), TOKEN))
        .collect();
    assert!(leaked.is_empty(), "{leaked:?}");
}

#[test]
fn a_wrong_token_fails_clearly_without_echoing_it() {
    let fx = Fixture::new();
    let out = fx.prepare(3);
    agent_commit(&out.checkout_path, "x.txt");
    let wrong = "wrong-token-8a7b6c5d4e3f";
    let err = push(&PushRequest {
        token: wrong.into(),
        ..fx.push_request(&out)
    })
    .expect_err("refused");
    assert!(matches!(err, GitError::AuthFailed { .. }), "{err}");
    assert!(!err.to_string().contains(wrong));
    assert_eq!(fx.origin.sha("refs/heads/agent-runs/run-3"), None);
}

#[test]
fn head_equal_to_base_skips_the_push() {
    let fx = Fixture::new();
    let out = fx.prepare(4);
    let outcome = push(&fx.push_request(&out)).expect("push");
    assert!(outcome.skipped);
    assert_eq!(outcome.head_sha, "");
    assert_eq!(fx.origin.sha("refs/heads/agent-runs/run-4"), None);
}

#[test]
fn a_diverged_remote_branch_is_refused_never_forced() {
    let fx = Fixture::new();
    let out = fx.prepare(5);
    agent_commit(&out.checkout_path, "mine.txt");
    // Someone else put a different commit on the branch meanwhile.
    git(&fx.origin.work, &["checkout", "--quiet", "main"]);
    let theirs = fx
        .origin
        .advance("agent-runs/run-5", "theirs.txt", "theirs\n");

    let err = push(&fx.push_request(&out)).expect_err("diverged");
    assert!(
        matches!(&err, GitError::Diverged { branch, .. } if branch == "agent-runs/run-5"),
        "{err}"
    );
    assert!(err.to_string().contains("refusing to force-push"));
    assert_eq!(
        fx.origin.sha("refs/heads/agent-runs/run-5"),
        Some(theirs),
        "the remote branch is untouched"
    );
}

#[test]
fn hooks_config_and_redirects_planted_in_the_checkout_never_take_part() {
    let fx = Fixture::new();
    let out = fx.prepare(6);
    let commit = agent_commit(&out.checkout_path, "x.txt");
    let tmp = tempfile::tempdir().expect("tempdir");
    let marker = tmp.path().join("hook-ran");
    let decoy = tmp.path().join("decoy.git");
    git(
        tmp.path(),
        &["init", "--quiet", "--bare", decoy.to_str().expect("utf8")],
    );

    let hook = format!("#!/bin/sh\necho ran >> {}\n", marker.display());
    let git_dir = out.checkout_path.join(".git");
    let hooks_dir = tmp.path().join("planted-hooks");
    std::fs::create_dir_all(&hooks_dir).expect("hooks dir");
    for dir in [git_dir.join("hooks"), hooks_dir.clone()] {
        for name in [
            "pre-push",
            "reference-transaction",
            "post-checkout",
            "pre-commit",
        ] {
            let path = dir.join(name);
            std::fs::write(&path, &hook).expect("hook");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod");
        }
    }
    let fsmonitor = tmp.path().join("fsmonitor.sh");
    std::fs::write(&fsmonitor, &hook).expect("fsmonitor");
    std::fs::set_permissions(
        &fsmonitor,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let cfg = |k: &str, v: &str| git(&out.checkout_path, &["config", k, v]);
    cfg("core.hooksPath", hooks_dir.to_str().expect("utf8"));
    cfg("core.fsmonitor", fsmonitor.to_str().expect("utf8"));
    cfg(
        &format!("url.file://{}.insteadOf", decoy.display()),
        &fx.remote,
    );
    cfg(
        &format!("url.file://{}.pushInsteadOf", decoy.display()),
        &fx.remote,
    );
    // The planted hook does work when git runs in the checkout normally (proves the trap).
    git(
        &out.checkout_path,
        &["commit", "--quiet", "--allow-empty", "-m", "trap check"],
    );
    assert!(marker.exists(), "the trap is armed");
    std::fs::remove_file(&marker).expect("reset marker");
    let commit_after_trap = git(&out.checkout_path, &["rev-parse", "HEAD"]);
    assert_ne!(commit_after_trap, commit);

    let pushed = push(&fx.push_request(&out)).expect("push");
    assert_eq!(pushed.head_sha, commit_after_trap);
    assert!(
        !marker.exists(),
        "a planted hook or fsmonitor ran during push"
    );
    assert_eq!(
        fx.origin.sha("refs/heads/agent-runs/run-6"),
        Some(commit_after_trap),
        "the push went to the real remote"
    );
    assert_eq!(
        git(
            tmp.path(),
            &["--git-dir", decoy.to_str().expect("utf8"), "for-each-ref"]
        ),
        "",
        "nothing was redirected to the decoy"
    );
}

#[test]
fn a_checkout_pointing_at_another_repository_is_refused() {
    let fx = Fixture::new();
    let out = fx.prepare(7);
    agent_commit(&out.checkout_path, "x.txt");
    let cache = RepoCache::new(&fx.root, 3, "acme", "widgets");

    // Alternates borrowing objects from the cache.
    let alternates = out.checkout_path.join(".git/objects/info/alternates");
    std::fs::write(
        &alternates,
        format!("{}\n", cache.bare().join("objects").display()),
    )
    .expect("alternates");
    let err = push(&fx.push_request(&out)).expect_err("alternates");
    assert!(matches!(err, GitError::UnsafeCheckout { .. }), "{err}");
    std::fs::remove_file(&alternates).expect("rm");

    // `.git` replaced by a gitdir file naming the cache.
    let git_dir = out.checkout_path.join(".git");
    std::fs::rename(&git_dir, out.checkout_path.join("moved-git")).expect("move");
    std::fs::write(&git_dir, format!("gitdir: {}\n", cache.bare().display())).expect("gitdir");
    let err = push(&fx.push_request(&out)).expect_err("gitdir file");
    assert!(matches!(err, GitError::UnsafeCheckout { .. }), "{err}");
    assert_eq!(fx.origin.sha("refs/heads/agent-runs/run-7"), None);
}
