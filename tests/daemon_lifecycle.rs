//! The daemon's run lifecycle beyond the happy path, with the real binary, the devserver and
//! real containers: remote cancel (soft and force), drain within and past its deadline, a
//! second signal, concurrency, and `--once`.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;

/// An agent that keeps talking (one line a second) for a minute, so the runner learns of a
/// force-cancel from an event answered 409.
fn chatty_prompt() -> String {
    let mut script = String::new();
    for i in 0..60 {
        script.push_str(&format!("say tick{i}; sleep 1000; "));
    }
    script.push_str(r#"finish completed "too late""#);
    script
}

async fn wait_started(h: &Harness, id: i64) {
    h.wait_run(id, Duration::from_secs(60), "the run running", |r| {
        r.status == "running"
    })
    .await;
    h.wait_until(Duration::from_secs(60), "the agent container", || {
        h.has_container_for(id)
            && h.events(id)
                .iter()
                .any(|e| e.payload_json.contains("starting"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_cancel_reports_canceled_and_kills_an_agent_that_ignores_abort() {
    let h = Harness::start("cancel-soft").await;
    // `hang` ignores the abort command and stdin EOF: only the kill after the grace ends it.
    let id = h.enqueue("say ready; hang");
    let mut runner = h.runner(&[]);
    wait_started(&h, id).await;

    h.dev().core().cancel(id, false).expect("cancel");
    let asked = std::time::Instant::now();
    let run = h
        .wait_run(id, Duration::from_secs(40), "the canceled verdict", |r| {
            r.status != "running"
        })
        .await;
    assert_eq!(run.status, "canceled", "{run:?}\n{}", h.log());
    assert_eq!(run.error, "context canceled");
    assert!(run.reported.is_some(), "reported by the runner");
    // Grace (10 s) plus a few seconds.
    h.wait_until(Duration::from_secs(15), "the container removed", || {
        h.containers().is_empty()
    })
    .await;
    assert!(asked.elapsed() < Duration::from_secs(60));
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
    assert_eq!(
        h.journal_state(id).map(|s| s.0).as_deref(),
        Some("reported")
    );

    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_cancel_is_noticed_and_the_run_abandoned_cleanly() {
    let h = Harness::start("cancel-force").await;
    let id = h.enqueue(&chatty_prompt());
    let mut runner = h.runner(&[]);
    wait_started(&h, id).await;

    h.dev().core().cancel(id, true).expect("force cancel");
    assert_eq!(h.run(id).status, "canceled");
    h.wait_until(
        Duration::from_secs(40),
        "the run abandoned in the journal",
        || h.journal_state(id).is_some_and(|s| s.0 == "failed"),
    )
    .await;
    let (_, describe) = h.journal_state(id).unwrap();
    assert!(describe.contains("abandoned"), "{describe}");
    h.wait_until(Duration::from_secs(20), "the container removed", || {
        h.containers().is_empty()
    })
    .await;
    h.wait_until(Duration::from_secs(10), "the checkout removed", || {
        h.checkouts().is_empty()
    })
    .await;
    let run = h.run(id);
    assert_eq!(run.status, "canceled");
    assert_eq!(run.error, "force-canceled by admin");
    assert!(
        run.reported.is_none(),
        "no verdict after a force-cancel: {run:?}"
    );

    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    let verify = h.journal_verify();
    assert!(verify.status.success(), "{verify:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_the_run_in_flight_and_claims_nothing_new() {
    let h = Harness::start("drain-ok").await;
    let id = h.enqueue(r#"sleep 3000; commit file=d.txt msg="drained"; finish completed "ok""#);
    let mut runner = h.runner(&[
        ("WSRUNNER_CONCURRENCY", "2"),
        ("WSRUNNER_DRAIN_TIMEOUT", "60s"),
    ]);
    wait_started(&h, id).await;
    signal(&runner, libc::SIGTERM);
    h.wait_until(Duration::from_secs(10), "the drain to start", || {
        h.log().contains("draining")
    })
    .await;
    // A free slot exists (concurrency 2), but a draining runner claims nothing.
    let second = h.enqueue(r#"finish completed "never""#);
    let code = wait_exit(&mut runner, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{}", h.log());
    let run = h.run(id);
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert!(h.remote_branch(&format!("agent-runs/run-{id}")).is_some());
    assert_eq!(h.run(second).status, "queued", "{}", h.log());
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_past_its_deadline_cancels_and_reports_canceled() {
    let h = Harness::start("drain-late").await;
    let id = h.enqueue(r#"sleep 120000; finish completed "too late""#);
    let mut runner = h.runner(&[("WSRUNNER_DRAIN_TIMEOUT", "2s")]);
    wait_started(&h, id).await;
    signal(&runner, libc::SIGTERM);
    let code = wait_exit(&mut runner, Duration::from_secs(60)).await;
    assert_eq!(code, 0, "{}", h.log());
    let run = h.run(id);
    assert_eq!(run.status, "canceled", "{run:?}\n{}", h.log());
    assert_eq!(run.error, "context canceled");
    assert!(h.log().contains("drain deadline passed"), "{}", h.log());
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cancels_at_once() {
    let h = Harness::start("drain-twice").await;
    let id = h.enqueue(r#"sleep 120000; finish completed "too late""#);
    let mut runner = h.runner(&[("WSRUNNER_DRAIN_TIMEOUT", "10m")]);
    wait_started(&h, id).await;
    signal(&runner, libc::SIGTERM);
    h.wait_until(Duration::from_secs(10), "the drain to start", || {
        h.log().contains("draining in-flight runs")
    })
    .await;
    assert_eq!(h.run(id).status, "running", "the first signal only drains");
    signal(&runner, libc::SIGTERM);
    let code = wait_exit(&mut runner, Duration::from_secs(40)).await;
    assert_eq!(code, 0, "{}", h.log());
    let run = h.run(id);
    assert_eq!(run.status, "canceled", "{run:?}\n{}", h.log());
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_runs_at_once_with_concurrency_three() {
    let h = Harness::start("concurrency").await;
    let ids: Vec<i64> = (0..3)
        .map(|i| {
            h.enqueue(&format!(
                r#"sleep 4000; commit file=c{i}.txt msg="run {i}"; finish completed "ok {i}""#
            ))
        })
        .collect();
    let mut runner = h.runner(&[("WSRUNNER_CONCURRENCY", "3")]);
    let mut runs = Vec::new();
    for id in &ids {
        runs.push(h.wait_final(*id).await);
    }
    for run in &runs {
        assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    }
    // Every pair of running intervals overlaps.
    let latest_start = runs.iter().filter_map(|r| r.started_at_ms).max().unwrap();
    let earliest_end = runs.iter().filter_map(|r| r.ended_at_ms).min().unwrap();
    assert!(
        latest_start < earliest_end,
        "the three runs ran at the same time: {:?}",
        runs.iter()
            .map(|r| (r.started_at_ms, r.ended_at_ms))
            .collect::<Vec<_>>()
    );
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_takes_one_run_finishes_it_and_exits() {
    let h = Harness::start("once").await;
    let first = h.enqueue(r#"commit file=o.txt msg="once"; finish completed "one""#);
    let mut runner = h.runner_args(&["--once"], &[]);
    // The second run is enqueued once the first is claimed: --once must leave it alone.
    h.wait_run(
        first,
        Duration::from_secs(60),
        "the first run claimed",
        |r| r.status != "queued",
    )
    .await;
    let second = h.enqueue(r#"finish completed "not this one""#);
    let code = wait_exit(&mut runner, Duration::from_secs(90)).await;
    assert_eq!(code, 0, "{}", h.log());
    assert_eq!(h.run(first).status, "succeeded", "{}", h.log());
    assert_eq!(h.run(second).status, "queued");
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
}
