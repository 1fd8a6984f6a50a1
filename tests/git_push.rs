//! Push: exactly the agent's commit lands, repeats are harmless, never forced, and nothing
//! planted in the checkout takes part. The remote is served over real smart HTTP with Basic
//! auth (`git http-backend`), so the askpass path and the token handling are exercised.

mod git_support;

use std::path::{Path, PathBuf};

use git_support::{commit_file, files_containing, git, GitHttpServer, Origin};
use windshift_runner::effects::git::{
    branch_head, prepare, push, remote_ref_sha, GitError, PrepareOutput, PrepareRequest,
    PushRequest, RepoCache, TransportPolicy,
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

    // `.git` replaced by a gitdir file naming the cache.
    let git_dir = out.checkout_path.join(".git");
    std::fs::rename(&git_dir, out.checkout_path.join("moved-git")).expect("move");
    std::fs::write(&git_dir, format!("gitdir: {}\n", cache.bare().display())).expect("gitdir");
    let err = push(&fx.push_request(&out)).expect_err("gitdir file");
    assert!(matches!(err, GitError::UnsafeCheckout { .. }), "{err}");
    std::fs::remove_file(&git_dir).expect("rm gitdir file");

    // `.git` replaced by a symlink to the cache.
    std::os::unix::fs::symlink(cache.bare(), &git_dir).expect("symlink .git");
    let err = push(&fx.push_request(&out)).expect_err("symlinked .git");
    assert!(matches!(err, GitError::UnsafeCheckout { .. }), "{err}");
    assert_eq!(fx.origin.sha("refs/heads/agent-runs/run-7"), None);
}

/// Another workspace's repository with a commit this run must never be able to push.
struct Victim {
    bare: PathBuf,
    secret_commit: String,
}

impl Victim {
    fn create(parent: &Path) -> Self {
        let victim = Origin::create(parent, "victim.git");
        let secret_commit = victim.advance("main", "secret.txt", "VICTIM-SECRET-7d1e\n");
        Self {
            bare: victim.bare,
            secret_commit,
        }
    }
}

/// The origin (served over HTTP) holds `commit` as an object, reachable or not.
fn origin_has_object(fx: &Fixture, commit: &str) -> bool {
    std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "--git-dir"])
        .arg(&fx.origin.bare)
        .args(["cat-file", "-e", commit])
        .status()
        .expect("cat-file")
        .success()
}

/// Issue 11 attack 1: the agent borrows another workspace's objects (alternates, or
/// symlinked `objects/pack`, fan-out dirs, `packed-refs`, `refs`) and points its run branch at
/// the victim's commit. Nothing may follow those links: the push fails and the victim's
/// commit reaches no remote.
#[test]
fn another_workspaces_objects_cannot_be_exfiltrated_through_the_checkout() {
    let fx = Fixture::new();
    let victim = Victim::create(fx._tmp.path());
    let secret = victim.secret_commit.clone();
    let run_ref = |run: i64| format!("refs/heads/agent-runs/run-{run}");
    type Plant = fn(&Path, &Path, &str, &str);
    let attacks: [(&str, Plant); 5] = [
        ("alternates", |git_dir, victim, _branch_file, secret| {
            std::fs::write(
                git_dir.join("objects/info/alternates"),
                format!("{}\n", victim.join("objects").display()),
            )
            .expect("alternates");
            set_ref(git_dir, secret);
        }),
        (
            "symlinked objects/pack and fan-out dirs",
            |git_dir, victim, _, secret| {
                let objects = git_dir.join("objects");
                std::fs::remove_dir_all(objects.join("pack")).expect("rm pack");
                std::os::unix::fs::symlink(victim.join("objects/pack"), objects.join("pack"))
                    .expect("symlink pack");
                for entry in std::fs::read_dir(victim.join("objects")).expect("ls") {
                    let name = entry.expect("entry").file_name();
                    if name.len() == 2 {
                        let _ = std::fs::remove_dir_all(objects.join(&name));
                        std::os::unix::fs::symlink(
                            victim.join("objects").join(&name),
                            objects.join(&name),
                        )
                        .expect("symlink fan-out");
                    }
                }
                set_ref(git_dir, secret);
            },
        ),
        (
            "symlinked packed-refs",
            |git_dir, victim, branch_file, _| {
                // The victim's packed refs, under the run branch's name.
                std::fs::remove_file(git_dir.join(branch_file)).expect("rm loose ref");
                let _ = std::fs::remove_file(git_dir.join("packed-refs"));
                std::os::unix::fs::symlink(victim.join("packed-refs"), git_dir.join("packed-refs"))
                    .expect("symlink packed-refs");
            },
        ),
        ("symlinked refs", |git_dir, victim, _, _| {
            std::fs::remove_dir_all(git_dir.join("refs")).expect("rm refs");
            std::os::unix::fs::symlink(victim.join("refs"), git_dir.join("refs"))
                .expect("symlink refs");
        }),
        (
            "a run branch naming an object the checkout lacks",
            |git_dir, _, _, secret| {
                set_ref(git_dir, secret);
            },
        ),
    ];
    // The victim's packed-refs lists its secret commit under the run branches' names.
    for run in 20..25 {
        git(
            fx._tmp.path(),
            &[
                "--git-dir",
                victim.bare.to_str().expect("utf8"),
                "update-ref",
                &run_ref(run),
                &secret,
            ],
        );
    }
    git(
        fx._tmp.path(),
        &[
            "--git-dir",
            victim.bare.to_str().expect("utf8"),
            "pack-refs",
            "--all",
        ],
    );
    for (i, (name, plant)) in attacks.iter().enumerate() {
        let run = 20 + i as i64;
        let out = fx.prepare(run);
        agent_commit(&out.checkout_path, "x.txt");
        let git_dir = out.checkout_path.join(".git");
        let branch_file = format!("refs/heads/agent-runs/run-{run}");
        plant(&git_dir, &victim.bare, &branch_file, &secret);
        for cache_objects in [
            None,
            Some(
                RepoCache::new(&fx.root, 3, "acme", "widgets")
                    .bare()
                    .join("objects"),
            ),
        ] {
            let req = PushRequest {
                cache_objects,
                ..fx.push_request(&out)
            };
            let result = push(&req);
            assert!(result.is_err(), "{name}: the push went through: {result:?}");
        }
        assert_eq!(fx.origin.sha(&run_ref(run)), None, "{name}");
        assert!(
            !origin_has_object(&fx, &secret),
            "{name}: the victim's commit reached the remote"
        );
    }
}

/// Points the checkout's run branch (whatever its name) at `id` by rewriting every loose ref
/// under `refs/heads/agent-runs`.
fn set_ref(git_dir: &Path, id: &str) {
    let dir = git_dir.join("refs/heads/agent-runs");
    for entry in std::fs::read_dir(&dir).expect("ls refs") {
        std::fs::write(entry.expect("entry").path(), format!("{id}\n")).expect("write ref");
    }
}

/// Issue 11 attack 2: a root-only host file linked into `.git` (as `shallow`, `packed-refs`,
/// or pulled in by `include.path`) must never be read, so its text can appear in no error.
#[test]
fn host_file_contents_never_reach_an_error() {
    let fx = Fixture::new();
    let host_secret = fx._tmp.path().join("host-secret");
    let secret_text = "HOST-SECRET-LINE-93bf0c";
    std::fs::write(&host_secret, format!("{secret_text}\n")).expect("secret");
    for (i, target) in ["shallow", "packed-refs", "include"].iter().enumerate() {
        let run = 40 + i as i64;
        let out = fx.prepare(run);
        let commit = agent_commit(&out.checkout_path, "x.txt");
        let git_dir = out.checkout_path.join(".git");
        let result = match *target {
            "include" => {
                git(
                    &out.checkout_path,
                    &[
                        "config",
                        "include.path",
                        host_secret.to_str().expect("utf8"),
                    ],
                );
                // Never read: the push succeeds with the agent's real commit.
                let pushed = push(&fx.push_request(&out)).expect("config is not read");
                assert_eq!(pushed.head_sha, commit);
                continue;
            }
            other => {
                let _ = std::fs::remove_file(git_dir.join(other));
                std::os::unix::fs::symlink(&host_secret, git_dir.join(other)).expect("symlink");
                push(&fx.push_request(&out))
            }
        };
        let err = result.expect_err(target);
        for text in [err.to_string(), err.public_summary(), format!("{err:?}")] {
            assert!(!text.contains(secret_text), "{target}: {text}");
        }
        assert!(
            matches!(err, GitError::UnsafeCheckout { .. }),
            "{target}: {err}"
        );
    }
}

/// Issue 11 attack 3: a named pipe (or a device) in `.git` is refused at once; nothing opens
/// it, so nothing blocks on it.
#[test]
fn pipes_and_devices_in_git_are_refused_without_blocking() {
    let fx = Fixture::new();
    let mut cases = vec!["packed-refs", "objects/pack/pack-0000.pack", "refs/heads/x"];
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        cases.push("device");
    }
    for (i, rel) in cases.iter().enumerate() {
        let run = 50 + i as i64;
        let out = fx.prepare(run);
        agent_commit(&out.checkout_path, "x.txt");
        let git_dir = out.checkout_path.join(".git");
        let status = if *rel == "device" {
            std::process::Command::new("mknod")
                .arg(git_dir.join("hooks/null"))
                .args(["c", "1", "3"])
                .status()
        } else {
            let _ = std::fs::remove_file(git_dir.join(rel));
            std::process::Command::new("mkfifo")
                .arg(git_dir.join(rel))
                .status()
        };
        assert!(status.expect("mknod/mkfifo").success(), "{rel}");
        let req = fx.push_request(&out);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(push(&req).map(|o| o.head_sha));
        });
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{rel}: the push blocked"));
        let err = result.expect_err(rel);
        assert!(
            matches!(err, GitError::UnsafeCheckout { .. }),
            "{rel}: {err}"
        );
        assert!(
            branch_head(&out.checkout_path, &out.branch).is_err(),
            "{rel}: inspection reads past it"
        );
    }
}

/// Issue 11 attack 4: the checkout directory itself replaced by a symlink (the multi-repo
/// workspace root is the agent's) is refused.
#[test]
fn a_checkout_directory_replaced_by_a_symlink_is_refused() {
    let fx = Fixture::new();
    let victim = Victim::create(fx._tmp.path());
    let out = fx.prepare(60);
    let moved = out.checkout_path.with_extension("moved");
    std::fs::rename(&out.checkout_path, &moved).expect("move");
    std::os::unix::fs::symlink(&victim.bare, &out.checkout_path).expect("symlink checkout");
    let err = push(&fx.push_request(&out)).expect_err("symlinked checkout");
    assert!(matches!(err, GitError::UnsafeCheckout { .. }), "{err}");
    assert!(branch_head(&out.checkout_path, &out.branch).is_err());
    assert!(!origin_has_object(&fx, &victim.secret_commit));
}

/// The agent's own objects are copied, re-indexed and checked: a run whose agent repacked its
/// history (so its commit lives in a pack the cache lacks) pushes like any other, through the
/// cache-borrowing path and the copy-everything path alike.
#[test]
fn an_agent_that_repacked_still_pushes_its_commit() {
    let fx = Fixture::new();
    for (run, with_cache) in [(70, false), (71, true)] {
        let out = fx.prepare(run);
        let commit = agent_commit(&out.checkout_path, &format!("f{run}.txt"));
        git(&out.checkout_path, &["repack", "-a", "-d", "-q"]);
        let cache_objects = with_cache.then(|| {
            RepoCache::new(&fx.root, 3, "acme", "widgets")
                .bare()
                .join("objects")
        });
        let pushed = push(&PushRequest {
            cache_objects,
            ..fx.push_request(&out)
        })
        .expect("push");
        assert_eq!(pushed.head_sha, commit);
        assert_eq!(
            fx.origin.sha(&format!("refs/heads/agent-runs/run-{run}")),
            Some(commit)
        );
    }
}

/// Crafted ref text and an absurdly deep `.git`: the runner's own parser refuses a symbolic
/// run branch, a ref that is no object id and an oversized ref file, and the walk refuses
/// nesting past its depth limit; none of the agent's text reaches the server's summary.
#[test]
fn crafted_refs_and_deep_nesting_are_refused_in_the_runners_words() {
    let fx = Fixture::new();
    let crafted = "CRAFTED-REF-TEXT-51ab";
    let big = format!("{}\n", "a".repeat(8192));
    let bad_refs: [(&str, String); 3] = [
        ("symbolic ref", format!("ref: refs/heads/{crafted}\n")),
        ("not an object id", format!("{crafted}\n")),
        ("oversized ref file", big),
    ];
    for (i, (what, text)) in bad_refs.iter().enumerate() {
        let run = 80 + i as i64;
        let out = fx.prepare(run);
        agent_commit(&out.checkout_path, "x.txt");
        let loose = out.checkout_path.join(".git/refs/heads").join(&out.branch);
        std::fs::write(&loose, text).expect("write ref");
        let err = push(&fx.push_request(&out)).expect_err(what);
        assert!(
            matches!(err, GitError::UnsafeCheckout { .. }),
            "{what}: {err}"
        );
        assert!(!err.public_summary().contains(crafted), "{what}");
        assert!(
            branch_head(&out.checkout_path, &out.branch).is_err(),
            "{what}"
        );
        assert_eq!(fx.origin.sha(&format!("refs/heads/{}", out.branch)), None);
    }

    let out = fx.prepare(90);
    agent_commit(&out.checkout_path, "x.txt");
    let mut deep = out.checkout_path.join(".git/deep");
    for _ in 0..30 {
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).expect("deep dirs");
    let err = push(&fx.push_request(&out)).expect_err("too deep");
    assert!(err.to_string().contains("nested deeper"), "{err}");
}
