//! End to end through the real daemon: register → claim → prepare → container → push →
//! report, against the devserver with the test agent in real containers.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_claimed_prepared_run_pushed_and_reported() {
    let h = Harness::start("e2e").await;
    let id = h.enqueue(
        r#"say "working"; commit file=agent.txt msg="agent change"; finish completed "did it""#,
    );
    let mut runner = h.runner(&[("WSRUNNER_METRICS_ADDR", "127.0.0.1:0")]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert_eq!(run.branch, format!("agent-runs/run-{id}"));
    assert_eq!(run.base_commit, h.base_commit);
    assert_eq!(run.summary, "did it");
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{id}"))
        .expect("branch pushed");
    assert_ne!(pushed, h.base_commit);
    assert_eq!(h.subject(&pushed), "agent change");

    // Events arrive in order: claimed, worktree_ready, the agent's lines, pushed.
    let events = h.events(id);
    let phases = h.phases(id);
    let pos = |p: &str| phases.iter().position(|x| x == p);
    assert!(pos("claimed") < pos("worktree_ready"), "{phases:?}");
    assert!(pos("worktree_ready") < pos("pushed"), "{phases:?}");
    let stdout: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e.event_type == "stdout")
        .filter_map(|e| serde_json::from_str(&e.payload_json).ok())
        .collect();
    let types: Vec<&str> = stdout
        .iter()
        .filter_map(|v| v.get("type")?.as_str())
        .collect();
    let order = ["lifecycle", "starting", "content", "finish", "session_idle"];
    let mut at = 0;
    for t in &types {
        if at < order.len() && *t == order[at] {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "agent events in order: {types:?}");

    // Nothing left behind, and the journal is clean.
    signal(&runner, libc::SIGTERM);
    let code = wait_exit(&mut runner, Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{}", h.log());
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
    let verify = h.journal_verify();
    assert!(verify.status.success(), "{verify:?}");
    assert!(h.log().contains("registered as instance"), "{}", h.log());
}
