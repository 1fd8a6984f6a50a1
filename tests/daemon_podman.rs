//! One run end to end through the real daemon with rootful Podman as the engine CLI.
//! Ignored in the Docker pass; scripts/test-podman.sh (called by scripts/test.sh when podman
//! is installed) runs it with `WSR_TEST_ENGINE=podman`, the test images copied into Podman's
//! store and Podman's rlimit defaults pinned for this host.

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
