//! The daemon's run lifecycle beyond the happy path, with the real binary, the devserver and
//! real containers: remote cancel (soft and force), drain within and past its deadline
//! (also while the report phase retries against a failing server), a second signal,
//! concurrency, and `--once`.

mod daemon_support;

use std::process::Child;
use std::time::Duration;

use daemon_support::*;
use windshift_devserver::types::Faults;

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

/// From now on every runner call (and the git proxy) answers 503, until [`heal_server`].
fn fail_server(h: &Harness) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    h.dev()
        .core()
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .outage_until_ms = Some(now + 3_600_000);
}

fn heal_server(h: &Harness) {
    *h.dev()
        .core()
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Faults::default();
}

/// Waits for the runner to exit; kills it and fails with its log otherwise.
async fn exit_code_within(h: &Harness, runner: &mut Child, timeout: Duration) -> i32 {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = runner.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        if std::time::Instant::now() > deadline {
            let _ = runner.kill();
            let _ = runner.wait();
            panic!(
                "the runner did not exit within {timeout:?} of SIGTERM\n--- runner log ---\n{}",
                h.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Chaos finding F9, the part both tests share. The run's verdict is decided and its report
/// phase is retrying against a server that answers 503 to everything. SIGTERM with a 2 s
/// drain must end the process on the drain deadline (the client's retry budget is minutes:
/// 2 min per event, 10 min for the result) with the report intent journaled; the next start,
/// against a healed server, reports that verdict exactly once. Returns the first process's log.
async fn drain_leaves_the_report_to_the_next_start(
    h: &Harness,
    id: i64,
    mut runner: Child,
) -> String {
    h.wait_until(
        Duration::from_secs(60),
        "the report intent journaled",
        || h.journal_state(id).is_some_and(|s| s.0 == "pushed"),
    )
    .await;
    let run = h.run(id);
    assert!(
        run.status == "running" && run.reported.is_none(),
        "the verdict must not reach the server before the drain (outage set too late?): {run:?}\n{}",
        h.log()
    );

    signal(&runner, libc::SIGTERM);
    let code = exit_code_within(h, &mut runner, Duration::from_secs(60)).await;
    let first = h.log();
    assert_eq!(code, 0, "{first}");
    assert!(first.contains("drain deadline passed"), "{first}");
    assert!(
        first.contains("shutting down; run left in the journal for the next start"),
        "{first}"
    );
    let (state, describe) = h.journal_state(id).expect("the run is journaled");
    assert_eq!(state, "pushed", "{describe}");
    assert!(
        describe.starts_with("report succeeded starting"),
        "the report intent, not a terminal state: {describe}"
    );
    let journaled_verdict = h
        .journal_list()
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["run_id"] == id).cloned())
        .and_then(|row| row["verdict"].as_str().map(str::to_owned))
        .expect("a journaled verdict");
    let run = h.run(id);
    assert_eq!(run.status, "running", "{run:?}");
    assert!(run.reported.is_none(), "{run:?}");

    heal_server(h);
    let mut runner = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, journaled_verdict, "{run:?}\n{}", h.log());
    let reported = run
        .reported
        .as_ref()
        .unwrap_or_else(|| panic!("reported by the runner, not reaped: {run:?}\n{}", h.log()));
    assert_eq!(reported.status, journaled_verdict);
    h.wait_until(
        Duration::from_secs(30),
        "the run reported in the journal",
        || h.journal_state(id).is_some_and(|s| s.0 == "reported"),
    )
    .await;
    let log = h.log();
    assert_eq!(
        log.matches("verdict reported").count(),
        1,
        "one report, by the second process\n{log}"
    );
    assert!(!log.contains("already finalized the run (409)"), "{log}");

    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    first
}

/// F9, the result call: every event is delivered before the outage, so the report phase
/// waits only on `POST .../result`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_ends_a_report_retrying_against_a_failing_server() {
    let h = Harness::start("drain-report").await;
    // No repos: after the agent's last line the runner sends no event of its own (no
    // `no_changes`), so nothing but the result call is left when the container exits.
    // `exit 0` skips `session_idle`, which would be one more event.
    let id = h.enqueue_with(
        r#"finish completed "done"; say flushed; sleep 5000; exit 0"#,
        |r| r.repos.clear(),
    );
    let runner = h.runner(&[("WSRUNNER_DRAIN_TIMEOUT", "2s")]);
    h.wait_until(Duration::from_secs(60), "the agent's last event", || {
        h.events(id)
            .iter()
            .any(|e| e.payload_json.contains("flushed"))
    })
    .await;
    fail_server(&h);
    h.wait_until(Duration::from_secs(60), "the result call retrying", || {
        h.log()
            .lines()
            .any(|l| l.contains("retrying control-plane call") && l.contains("\"result\""))
    })
    .await;
    drain_leaves_the_report_to_the_next_start(&h, id, runner).await;
}

/// F9, the event flush before the result: the agent's last events and the runner's
/// `no_changes` are queued during the outage, so the report phase waits on the flush and
/// never reaches the result call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_ends_an_event_flush_retrying_against_a_failing_server() {
    let h = Harness::start("drain-flush").await;
    let id = h.enqueue(r#"say ready; sleep 4000; finish completed "done""#);
    let runner = h.runner(&[("WSRUNNER_DRAIN_TIMEOUT", "2s")]);
    wait_started(&h, id).await;
    fail_server(&h);
    let first = drain_leaves_the_report_to_the_next_start(&h, id, runner).await;
    assert!(
        !first
            .lines()
            .any(|l| l.contains("retrying control-plane call") && l.contains("\"result\"")),
        "the flush, not the result call, was interrupted: {first}"
    );
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

/// Found by the simulation (docs/simulation.md, `DeadlineBeforeReport`): the drain deadline
/// reaches the run while its agent runs, so the stop is taken there (the agent is stopped and
/// the run goes on to report `canceled`); the report then meets a failing server. The drain
/// must still end soon after its deadline (before the fix the report retried for minutes),
/// leaving the report intent for the next start, which reports it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_deadline_taken_by_the_agent_phase_still_bounds_the_report() {
    let h = Harness::start("drain-then-report").await;
    let id = h.enqueue_with(r#"say started; sleep 120000; exit 0"#, |r| r.repos.clear());
    let mut runner = h.runner(&[("WSRUNNER_DRAIN_TIMEOUT", "3s")]);
    h.wait_until(Duration::from_secs(60), "the agent running", || {
        h.agent_printed(id, "started")
    })
    .await;
    fail_server(&h);
    signal(&runner, libc::SIGTERM);
    let code = exit_code_within(&h, &mut runner, Duration::from_secs(30)).await;
    let first = h.log();
    assert_eq!(code, 0, "{first}");
    assert!(first.contains("drain deadline passed"), "{first}");
    let (state, describe) = h.journal_state(id).expect("the run is journaled");
    assert_eq!(state, "pushed", "{describe}\n{first}");
    assert!(describe.starts_with("report canceled"), "{describe}");
    assert!(h.run(id).reported.is_none());

    heal_server(&h);
    let mut runner = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "canceled", "{run:?}\n{}", h.log());
    assert!(run.reported.is_some(), "reported by the runner: {run:?}");
    assert_eq!(
        h.log().matches("verdict reported").count(),
        1,
        "{}",
        h.log()
    );
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}
