//! `/metrics` and `/healthz` over HTTP while the daemon runs: run, claim and request
//! counters, queue depth, journal commit latency, recovery decisions after a crash, and
//! health that follows the server's reachability.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_the_daemon() {
    let mut h = Harness::start("metrics").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = [("WSRUNNER_METRICS_ADDR", addr.as_str())];
    let id = h.enqueue(r#"commit file=m.txt msg="metered"; finish completed "ok""#);
    let queued = h.enqueue(r#"finish completed "later""#);
    let mut runner = h.runner(&env);
    h.wait_until(Duration::from_secs(20), "/healthz 200", || {
        http_get(port, "/healthz").is_some_and(|(s, _)| s == 200)
    })
    .await;
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{}", h.log());
    let run2 = h.wait_final(queued).await;
    assert_eq!(run2.status, "succeeded", "{}", h.log());

    let mut text = String::new();
    h.wait_until(
        Duration::from_secs(10),
        "metrics of two finished runs and an empty poll",
        || {
            text = http_get(port, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            // Both runs finished, and the claim loop polled an empty queue since.
            metric(
                &text,
                "windshift_runner_runs_finished_total{status=\"succeeded\"}",
            ) == Some(2.0)
                && metric(
                    &text,
                    "windshift_runner_requests_total{call=\"claim\",outcome=\"no_work\"}",
                ) >= Some(1.0)
                && metric(&text, "windshift_runner_events_sent_total") >= Some(4.0)
        },
    )
    .await;
    assert!(
        metric(
            &text,
            "windshift_runner_requests_total{call=\"claim\",outcome=\"ok\"}"
        ) >= Some(2.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "windshift_runner_requests_total{call=\"claim\",outcome=\"no_work\"}"
        ) >= Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "windshift_runner_requests_total{call=\"report\",outcome=\"ok\"}"
        ) == Some(2.0),
        "{text}"
    );
    assert!(
        metric(&text, "windshift_runner_queue_depth").is_some(),
        "{text}"
    );
    // Every run sends lifecycle and agent events; the sender's totals reach /metrics.
    assert!(
        metric(&text, "windshift_runner_events_sent_total") >= Some(4.0),
        "{text}"
    );
    assert!(
        metric(&text, "windshift_runner_journal_commit_seconds_count") > Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "windshift_runner_runs_in_flight"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "windshift_runner_healthy"),
        Some(1.0),
        "{text}"
    );

    // The server goes away: unhealthy within two heartbeat intervals (plus the check period).
    h.stop_dev().await;
    let mut reason = String::new();
    h.wait_until(
        Duration::from_secs(15),
        "/healthz 503 while the server is down",
        || match http_get(port, "/healthz") {
            Some((503, body)) => {
                reason = body;
                true
            }
            _ => false,
        },
    )
    .await;
    assert!(reason.contains("has not been reached"), "{reason}");
    h.restart_dev().await;
    h.wait_until(
        Duration::from_secs(15),
        "/healthz 200 once the server is back",
        || http_get(port, "/healthz").is_some_and(|(s, _)| s == 200),
    )
    .await;

    // A crash with the container running: the restarted runner counts a re-attach.
    let id = h.enqueue(r#"say start; sleep 2500; finish completed "after the crash""#);
    // Killed once the agent has spoken: a container that exists but has not started yet
    // would be recovered by starting it, not by a re-attach.
    h.wait_until(Duration::from_secs(60), "the agent running", || {
        h.has_container_for(id) && h.agent_printed(id, "start")
    })
    .await;
    let _ = runner.kill();
    let _ = runner.wait();
    let mut runner = h.runner(&env);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{}", h.log());
    h.wait_until(
        Duration::from_secs(10),
        "the recovery decision counted",
        || {
            let text = http_get(port, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            metric(
                &text,
                "windshift_runner_recovery_decisions_total{decision=\"reattach\"}",
            ) == Some(1.0)
        },
    )
    .await;
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
}
