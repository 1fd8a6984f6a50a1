//! One run end to end through the real daemon with rootful Podman as the engine CLI, and one
//! with rootless Podman (the runner and its podman as a non-root user).
//! Ignored in the Docker pass; scripts/test-podman.sh (called by scripts/test.sh when podman
//! is installed) runs the first with `WSR_TEST_ENGINE=podman`, the test images copied into
//! Podman's store and Podman's rlimit defaults pinned for this host, and the second in its
//! rootless leg, as a throwaway user with subordinate uid/gid ranges.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rootful podman: run through scripts/test-podman.sh"]
async fn a_run_through_podman_is_pushed_reported_and_cleaned_up() {
    assert_eq!(
        engine_cli(),
        "podman",
        "run this test through scripts/test-podman.sh (WSR_TEST_ENGINE=podman)"
    );
    let h = Harness::start("podman").await;
    let id = h.enqueue(r#"commit file=agent.txt msg="podman change"; finish completed "done""#);
    let mut runner = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{id}"))
        .expect("branch pushed");
    assert_eq!(h.subject(&pushed), "podman change");
    // A second run is cancelled while its agent hangs: podman's container is killed.
    // `hang` ignores abort and stdin EOF, so only the runner's kill of the container ends it;
    // the container is looked up with `podman ps`, which Docker's containers never reach.
    let hung = h.enqueue("say ready; hang");
    h.wait_until(
        Duration::from_secs(120),
        "the hung run's podman container",
        || h.has_container_for(hung),
    )
    .await;
    h.dev().core().cancel(hung, false).expect("cancel");
    let run = h.wait_final(hung).await;
    assert_eq!(run.status, "canceled", "{run:?}\n{}", h.log());
    h.wait_until(Duration::from_secs(60), "no container left", || {
        h.containers().is_empty()
    })
    .await;

    signal(&runner, libc::SIGTERM);
    let code = wait_exit(&mut runner, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{}", h.log());
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
    let verify = h.journal_verify();
    assert!(verify.status.success(), "{verify:?}");
}

/// Rootless Podman (docs/containers.md, "Rootless Podman"): the runner sees it, says so in its
/// log and in `doctor`, and runs the agent with its uid mapped to the runner's, so the agent
/// writes the checkout (a file, and git's objects and index in `.git`) and the run is pushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs rootless podman as a non-root user: run through scripts/test-podman.sh"]
async fn rootless_podman_agent_writes_its_checkout_and_the_run_succeeds() {
    assert_eq!(
        engine_cli(),
        "podman",
        "run this test through scripts/test-podman.sh (WSR_TEST_ENGINE=podman)"
    );
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_ne!(uid, 0, "the rootless leg runs this test as a non-root user");
    let h = Harness::start("rootless").await;

    // `doctor` names rootless Podman and what the runner does about it.
    let doctor = std::process::Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .arg("doctor")
        .env_clear()
        .envs(
            [
                "PATH",
                "HOME",
                "XDG_RUNTIME_DIR",
                "CONTAINERS_CONF",
                "WSRUNNER_ENGINE_DRIVER",
            ]
            .iter()
            .filter_map(|n| std::env::var(n).ok().map(|v| (*n, v))),
        )
        .env("WS_API_URL", h.api_url())
        .env("WSRUNNER_ALLOW_INSECURE", "1")
        .env("WSRUNNER_REGISTRATION_TOKEN", &h.token)
        .env("WSRUNNER_IMAGE", IMAGE)
        .env("WSRUNNER_NETWORK", "none")
        .env("WSRUNNER_DOCKER", "podman")
        .env("WSRUNNER_CACHE_ROOT", h.cache_root())
        .env("WSRUNNER_JOURNAL_DIR", h.journal_dir())
        .env("WSRUNNER_CTL_DIR", h.tmp.path().join("ctl"))
        .output()
        .expect("doctor runs");
    let text = String::from_utf8_lossy(&doctor.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(" rootless"))
        .unwrap_or_else(|| panic!("no rootless line:\n{text}"));
    assert!(
        line.contains("rootless Podman") && line.contains("--userns=keep-id:uid=1000,gid=1000"),
        "{line}\n{text}"
    );

    let id = h.enqueue(r#"commit file=agent.txt msg="rootless change"; finish completed "done""#);
    let mut runner = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    let log = h.log();
    assert!(
        log.contains("rootless Podman: agent containers run with --userns=keep-id"),
        "{log}"
    );
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{id}"))
        .expect("branch pushed");
    assert_eq!(h.subject(&pushed), "rootless change");
    // The file the agent wrote into /workspace is in the pushed commit.
    let repo = h
        .dev()
        .core()
        .repos()
        .into_iter()
        .find(|r| r.slug == SLUG)
        .unwrap();
    let content = git(
        std::path::Path::new(&repo.bare_path),
        &[
            "--git-dir",
            &repo.bare_path,
            "show",
            &format!("{pushed}:agent.txt"),
        ],
    );
    assert_eq!(content, "rootless change");

    signal(&runner, libc::SIGTERM);
    let code = wait_exit(&mut runner, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{}", h.log());
    // What the agent wrote belongs to the runner's uid, so the checkout is removed.
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
    let verify = h.journal_verify();
    assert!(verify.status.success(), "{verify:?}");
}
