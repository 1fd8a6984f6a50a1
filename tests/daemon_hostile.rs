//! Hostile agents against the real daemon, real containers and the devserver (security issue
//! 11, docs/SECURITY.md): each test is an attack an agent that has read our source would try
//! on what the runner does with its checkout after it exits. None may reach past the
//! container: no other repository's commit is pushed, no host file's text leaves the host,
//! no pipe wedges the runner, and every stop ends a stalled push within seconds.

mod daemon_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use daemon_support::*;
use windshift_devserver::types::{CreateRepo, EnqueueRepo, Faults};

/// Another workspace's repository on this host: a bare cache at the path an attacker can
/// predict (`<cache>/<ws>/<owner>/<repo>/.bare`), holding a secret commit in a pack and in
/// `packed-refs` under the names of this test's run branches, plus a work tree with `.git`.
struct Victim {
    bare: PathBuf,
    work: PathBuf,
    secret: String,
}

const SECRET_TEXT: &str = "VICTIM-SECRET-CONTENT-4c1d";

impl Victim {
    fn plant(h: &Harness, runs: std::ops::RangeInclusive<i64>) -> Victim {
        let work = h.tmp.path().join("victim-work");
        std::fs::create_dir_all(&work).expect("mkdir");
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("secret.txt"), format!("{SECRET_TEXT}\n")).expect("write");
        git(&work, &["add", "secret.txt"]);
        git(&work, &["commit", "-q", "-m", "victim secret"]);
        let secret = git(&work, &["rev-parse", "HEAD"]);
        for run in runs {
            git(&work, &["branch", &format!("agent-runs/run-{run}")]);
        }
        let bare = h.cache_root().join("2/victim/secret/.bare");
        std::fs::create_dir_all(bare.parent().expect("parent")).expect("mkdir");
        git(
            h.tmp.path(),
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().expect("utf8"),
                bare.to_str().expect("utf8"),
            ],
        );
        git(&bare, &["repack", "-a", "-d", "-q"]);
        git(&bare, &["pack-refs", "--all"]);
        git(&work, &["repack", "-a", "-d", "-q"]);
        Victim { bare, work, secret }
    }
}

/// Whether any repository the devserver serves holds `commit` as an object.
fn any_remote_has(h: &Harness, commit: &str) -> bool {
    h.dev().core().repos().iter().any(|repo| {
        Command::new("git")
            .args(["--git-dir", &repo.bare_path, "cat-file", "-e", commit])
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Everything of a run that left the host or was kept: its error and summary, every event
/// payload, plus the runner's log and the journal export.
fn everything_said(h: &Harness, ids: &[i64]) -> String {
    let mut text = h.log();
    for id in ids {
        let run = h.run(*id);
        text.push_str(&format!("\n{} {}", run.error, run.summary));
        for e in h.events(*id) {
            text.push('\n');
            text.push_str(&e.payload_json);
        }
    }
    let export = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(["journal", "--copy", "--db"])
        .arg(h.journal_dir())
        .arg("export")
        .output()
        .expect("journal export runs");
    text.push_str(&String::from_utf8_lossy(&export.stdout));
    text
}

async fn stop_runner(h: &Harness, runner: &mut std::process::Child) {
    signal(runner, libc::SIGTERM);
    let code = wait_exit(runner, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{}", h.log());
}

/// Attack 1: the agent links its `.git` into another workspace's cache (symlinked
/// `objects/pack`; `packed-refs` naming the run branch) and points the run branch at the
/// victim's commit. The push must be refused and the commit must reach no remote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_workspaces_commit_cannot_be_pushed_through_symlinks() {
    let h = Harness::start("hostile-exfil").await;
    let victim = Victim::plant(&h, 1..=2);
    let git_dir = "/workspace/.git";
    let pack = victim.bare.join("objects/pack");
    let first = h.enqueue(&format!(
        "commit; rm {git_dir}/objects/pack; symlink {} {git_dir}/objects/pack; \
         write {git_dir}/refs/heads/agent-runs/run-1 content={}; finish completed exfil",
        pack.display(),
        victim.secret
    ));
    let second = h.enqueue(&format!(
        "commit; rm {git_dir}/objects/pack; symlink {} {git_dir}/objects/pack; \
         rm {git_dir}/refs/heads/agent-runs/run-2; symlink {} {git_dir}/packed-refs; \
         finish completed exfil",
        pack.display(),
        victim.bare.join("packed-refs").display()
    ));
    assert_eq!(
        (first, second),
        (1, 2),
        "the scripts name the run branches by id"
    );
    let mut runner = h.runner(&[]);
    for id in [first, second] {
        let run = h.wait_final(id).await;
        assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
        assert!(run.error.contains("refusing to push"), "{run:?}");
        assert_eq!(h.remote_branch(&format!("agent-runs/run-{id}")), None);
    }
    assert!(
        !any_remote_has(&h, &victim.secret),
        "the victim's commit reached a remote\n{}",
        h.log()
    );
    assert!(h.log().contains("is a symlink"), "{}", h.log());
    stop_runner(&h, &mut runner).await;
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
}

/// Attack 2: a host file the agent cannot read, linked into `.git` as `shallow` or
/// `packed-refs`, or included from `.git/config`. Its text must appear in no event, error,
/// log line or journal export; the include is simply never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_file_contents_never_leave_the_host() {
    let h = Harness::start("hostile-hostfile").await;
    let secret_text = "HOST-ONLY-LINE-e81f2a90";
    let host_file = h.tmp.path().join("root-only-secret");
    std::fs::write(&host_file, format!("{secret_text}\n")).expect("write");
    std::fs::set_permissions(
        &host_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let git_dir = "/workspace/.git";
    let shallow = h.enqueue(&format!(
        "commit; symlink {} {git_dir}/shallow; finish completed s",
        host_file.display()
    ));
    let packed = h.enqueue(&format!(
        "commit; symlink {} {git_dir}/packed-refs; finish completed p",
        host_file.display()
    ));
    let include = h.enqueue(&format!(
        "commit msg=included; git config include.path {}; finish completed i",
        host_file.display()
    ));
    let mut runner = h.runner(&[]);
    for id in [shallow, packed] {
        let run = h.wait_final(id).await;
        assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    }
    let run = h.wait_final(include).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{include}"))
        .expect("pushed");
    assert_eq!(h.subject(&pushed), "included");
    stop_runner(&h, &mut runner).await;
    let said = everything_said(&h, &[shallow, packed, include]);
    assert!(!said.contains(secret_text), "the host file's text leaked");
}

/// Attack 3: a named pipe as `packed-refs`. Nothing may open it: the run fails at once with
/// a clear error, the next queued run is claimed and succeeds, and SIGTERM stops the runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipe_in_git_wedges_neither_the_run_nor_the_runner() {
    let h = Harness::start("hostile-fifo").await;
    let wedge = h.enqueue("commit; mkfifo /workspace/.git/packed-refs; finish completed w");
    let next = h.enqueue(r#"commit msg="after the pipe"; finish completed n"#);
    let mut runner = h.runner(&[("WSRUNNER_RUN_TIMEOUT", "90s")]);
    let run = h.wait_final(wedge).await;
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert!(run.error.contains("refusing to push"), "{run:?}");
    assert!(h.log().contains("named pipe"), "{}", h.log());
    let run = h.wait_final(next).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    stop_runner(&h, &mut runner).await;
}

/// Attack 4: in a multi-repo run the workspace root is the agent's, so it can replace a
/// repo directory with a symlink to a checkout of another repository. The push must not
/// follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_repo_directory_in_a_multi_repo_run_is_refused() {
    let h = Harness::start("hostile-multi").await;
    let victim = Victim::plant(&h, 1..=1);
    let src = h.tmp.path().join("src-repo");
    h.dev()
        .core()
        .create_repo(&CreateRepo {
            slug: "acme/lib".into(),
            path: src.display().to_string(),
        })
        .await
        .expect("second repo");
    let id = h.enqueue_with(
        &format!(
            "rm /workspace/lib; symlink {} /workspace/lib; finish completed swapped",
            victim.work.display()
        ),
        |req| {
            req.repos.push(EnqueueRepo {
                slug: "acme/lib".into(),
                base_ref: "main".into(),
                continue_branch: String::new(),
            })
        },
    );
    assert_eq!(id, 1);
    let mut runner = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert!(run.error.contains("refusing to push"), "{run:?}");
    assert!(
        !any_remote_has(&h, &victim.secret),
        "the victim's commit reached a remote\n{}",
        h.log()
    );
    stop_runner(&h, &mut runner).await;
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
}

/// The git proxy holds every push's upload for 15 minutes (far longer than git's own 300 s
/// low-speed limit would wait).
fn hold_the_push(h: &Harness) {
    let mut faults = h
        .dev()
        .core()
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *faults = Faults {
        added_latency_ms: 900_000,
        only_path_prefix: Some("/api/git-proxy/1/acme/app/git-receive-pack".into()),
        ..Faults::default()
    };
}

/// Every stop ends a stalled git call within seconds: the git proxy holds the push's upload
/// (far longer than git's own 300 s low-speed limit would wait). A remote cancel ends the
/// run, and then a drain past its deadline ends the process, each while the push hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_drain_end_a_stalled_push_within_seconds() {
    let h = Harness::start("hostile-stall").await;
    hold_the_push(&h);
    let canceled = h.enqueue("commit; finish completed c");
    let drained = h.enqueue("commit; finish completed d");
    let mut runner = h.runner(&[("WSRUNNER_DRAIN_TIMEOUT", "2s")]);
    // The run task logs each journaled state; "push of … starting" is the push intent.
    let push_started = |h: &Harness, id: i64| {
        let run = format!("run_id={id} ");
        h.log()
            .lines()
            .any(|l| l.contains(&run) && l.contains("push of acme/app@"))
    };
    h.wait_until(Duration::from_secs(90), "the first push under way", || {
        push_started(&h, canceled)
    })
    .await;
    h.dev().core().cancel(canceled, false).expect("cancel");
    let run = h
        .wait_run(
            canceled,
            Duration::from_secs(60),
            "the canceled run reported",
            |r| !matches!(r.status.as_str(), "queued" | "running"),
        )
        .await;
    assert_ne!(run.status, "succeeded", "{run:?}");
    // The second run's own push (the first run's state line repeats when its stop is
    // journaled during the push, so a bare count could reach two without it).
    h.wait_until(Duration::from_secs(90), "the second push under way", || {
        push_started(&h, drained)
    })
    .await;
    assert_eq!(h.run(drained).status, "running");
    signal(&runner, libc::SIGTERM);
    let code = wait_exit(&mut runner, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{}", h.log());
    assert!(h.log().contains("was stopped"), "{}", h.log());
}

/// The run timeout ends a stalled push too: the proxy holds the upload far past the limit;
/// the run is reported failed for its timeout within seconds of it, the next run is claimed,
/// and SIGTERM then stops the runner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_timeout_ends_a_stalled_push() {
    let h = Harness::start("hostile-stall-timeout").await;
    hold_the_push(&h);
    let stalled = h.enqueue("commit; finish completed t");
    let next = h.enqueue("finish completed nothing-to-push");
    let mut runner = h.runner(&[("WSRUNNER_RUN_TIMEOUT", "25s")]);
    // The deadline is far below the proxy's 900 s hold: the stop does not wait for the push.
    let run = h
        .wait_run(
            stalled,
            Duration::from_secs(90),
            "the stalled run reported",
            |r| !matches!(r.status.as_str(), "queued" | "running"),
        )
        .await;
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert!(run.error.contains("RUN_TIMEOUT"), "{run:?}");
    assert!(
        h.log().contains("push of acme/app@"),
        "the push never started, so the timeout did not end it\n{}",
        h.log()
    );
    let run = h.wait_final(next).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    stop_runner(&h, &mut runner).await;
}

/// A stop never waits on an effect that no kill reaches: a prepare stuck waiting for the
/// repo cache's lock (held here by another process) is abandoned 10 s after the cancel and
/// the run is reported; then SIGTERM ends the process although that blocking wait goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_abandons_a_step_stuck_where_no_kill_reaches() {
    use windshift_runner::effects::git::{CacheLock, RepoCache};
    let h = Harness::start("hostile-abandon").await;
    let cache = RepoCache::new(&h.cache_root(), 1, "acme", "app");
    std::fs::create_dir_all(cache.lock_path().parent().expect("parent")).expect("mkdir");
    let _held = CacheLock::acquire(&cache.lock_path(), Duration::from_secs(5)).expect("lock");
    let stuck = h.enqueue("commit; finish completed never");
    let mut runner = h.runner(&[]);
    h.wait_until(Duration::from_secs(60), "the prepare started", || {
        h.log().contains("claimed a run")
    })
    .await;
    h.dev().core().cancel(stuck, false).expect("cancel");
    let run = h
        .wait_run(
            stuck,
            Duration::from_secs(60),
            "the canceled run reported",
            |r| !matches!(r.status.as_str(), "queued" | "running"),
        )
        .await;
    assert_eq!(run.status, "canceled", "{run:?}\n{}", h.log());
    assert!(h.log().contains("abandoning it"), "{}", h.log());
    stop_runner(&h, &mut runner).await;
}
