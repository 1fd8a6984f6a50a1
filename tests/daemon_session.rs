//! The agent keeps its session through a SIGKILL of the runner process (issue 12): the test
//! agent's `sleep` ends at once on stdin EOF and, after its script, the agent waits for EOF, so
//! any EOF while no runner is alive would end the run early (`say` lines missing, no commit).
//! After the restart the run must succeed with every line delivered once and nothing left.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;

const PROMPT: &str = r#"say one; sleep 3000; say two; sleep 1500; say three; commit file=work.txt msg="agent work"; finish completed "kept""#;

fn said(h: &Harness, id: i64, word: &str) -> usize {
    h.events(id)
        .iter()
        .filter(|e| e.event_type == "stdout")
        .filter(|e| {
            serde_json::from_str::<serde_json::Value>(&e.payload_json)
                .is_ok_and(|v| v["type"] == "content" && v["text"] == word)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_runner_mid_run_keeps_the_agents_session() {
    let h = Harness::start("session-sigkill").await;
    let id = h.enqueue(PROMPT);
    let mut first = h.runner(&[]);
    h.wait_until(Duration::from_secs(60), "the agent said one", || {
        said(&h, id, "one") == 1
    })
    .await;
    // Mid-run: the agent sleeps (an EOF now would end it).
    signal(&first, libc::SIGKILL);
    assert_eq!(wait_exit(&mut first, Duration::from_secs(30)).await, -1);
    assert!(h.has_container_for(id), "the agent outlives the runner");
    assert_eq!(said(&h, id, "two"), 0, "killed before the agent went on");

    let mut second = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert_eq!(run.branch, format!("agent-runs/run-{id}"), "{run:?}");
    let pushed = h
        .remote_branch(&run.branch)
        .expect("the agent's work was pushed");
    assert_eq!(h.subject(&pushed), "agent work");
    // "one" was delivered before the kill; delivery is at least once across a crash (the
    // saved progress may lag the last event by up to a second), so it may come again.
    assert!(said(&h, id, "one") >= 1);
    // Printed while the restarted runner drove the session: exactly once.
    for word in ["two", "three"] {
        assert_eq!(said(&h, id, word), 1, "{word} delivered once\n{}", h.log());
    }
    signal(&second, libc::SIGTERM);
    assert_eq!(wait_exit(&mut second, Duration::from_secs(30)).await, 0);
    assert!(h.containers().is_empty(), "orphans: {:?}", h.containers());
    assert!(h.checkouts().is_empty(), "leftovers: {:?}", h.checkouts());
}
