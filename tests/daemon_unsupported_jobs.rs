//! Jobs no runner can do yet (spec 11), through the real daemon: a nested group slug fails at
//! once with the reason, and a test run's refused push says the run has no push grant.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;
use windshift_devserver::types::EnqueueRepo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_slugs_and_runs_without_a_push_grant_fail_with_the_reason() {
    let h = Harness::start("unsupported").await;
    let nested = h.enqueue_with(r#"finish completed "never runs""#, |req| {
        req.repos = vec![EnqueueRepo {
            slug: "group/sub/project".into(),
            base_ref: "main".into(),
            continue_branch: String::new(),
        }];
    });
    let test_run = h.enqueue_with(
        r#"commit file=agent.txt msg="agent change"; finish completed "did it""#,
        |req| req.test_run = true,
    );
    let mut runner = h.runner(&[]);

    let run = h.wait_final(nested).await;
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert!(
        run.error.contains("more than two segments")
            && run.error.contains("supports owner/repo slugs only"),
        "{run:?}"
    );
    assert!(
        !h.events(nested).iter().any(|e| e.event_type == "stdout"),
        "no agent ran for the nested slug"
    );

    let run = h.wait_final(test_run).await;
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert!(run.error.contains("no push grant"), "{run:?}");
    assert!(
        !run.error.contains("RPC failed"),
        "no raw git text: {run:?}"
    );
    assert_eq!(
        h.remote_branch(&format!("agent-runs/run-{test_run}")),
        None,
        "nothing was pushed"
    );

    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
}
