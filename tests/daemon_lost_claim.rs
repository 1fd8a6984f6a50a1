//! Chaos finding F6: a claim the server carried out but whose answer the runner never
//! journaled (the answer was lost in transit, or the runner died before journaling it). The
//! protocol has no "which runs are mine" call, so the runner yields its lease: once idle it
//! stays silent for WSRUNNER_LEASE_YIELD, the server's reaper fails the unseen run, and the
//! runner claims again. Without the yield the run would stay `running` while the instance
//! keeps heartbeating, until the server's 8 h backstop.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;

/// Liveness window of these tests' devserver: longer than a crash-and-restart takes, so the
/// run can only be reaped through the yield, and shorter than the yield.
const LIVENESS: Duration = Duration::from_secs(6);
const YIELD: &str = "10s";
const REAPED: &str = "runner lease expired (missed heartbeat)";

async fn harness(test: &str) -> Harness {
    Harness::start_with(test, |cfg| cfg.liveness_window = LIVENESS).await
}

/// The run the runner never saw is reaped, never reported, never in the journal; the runner
/// then claims and finishes the next run.
async fn unseen_run_is_reaped_then_work_goes_on(
    h: &Harness,
    unseen: i64,
    runner: &mut std::process::Child,
) {
    let run = h
        .wait_run(
            unseen,
            Duration::from_secs(120),
            "the unseen run reaped",
            |r| r.status != "running" && r.status != "queued",
        )
        .await;
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert_eq!(run.error, REAPED, "{run:?}");
    assert!(run.reported.is_none(), "the runner never knew it: {run:?}");
    assert_eq!(h.journal_state(unseen), None, "not in the journal");
    assert!(h.log().contains("yielding the lease"), "{}", h.log());

    let next = h.enqueue(r#"commit file=after.txt msg="after the yield"; finish completed "ok""#);
    let run = h.wait_final(next).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert!(run.reported.is_some());
    assert!(h.log().contains("lease yield over"), "{}", h.log());

    signal(runner, libc::SIGTERM);
    assert_eq!(
        wait_exit(runner, Duration::from_secs(60)).await,
        0,
        "{}",
        h.log()
    );
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    let verify = h.journal_verify();
    assert!(verify.status.success(), "{verify:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_answer_lost_in_transit_is_reaped_after_the_lease_yield() {
    let h = harness("lost-claim").await;
    h.dev().core().faults.lock().unwrap().lose_claim_answers = 1;
    let unseen = h.enqueue(r#"finish completed "never seen""#);
    let mut runner = h.runner(&[("WSRUNNER_LEASE_YIELD", YIELD)]);
    h.wait_until(Duration::from_secs(60), "the claim answer lost", || {
        h.dev().core().faults.lock().unwrap().lose_claim_answers == 0
    })
    .await;
    assert_eq!(
        h.run(unseen).status,
        "running",
        "handed out: {:?}",
        h.run(unseen)
    );
    unseen_run_is_reaped_then_work_goes_on(&h, unseen, &mut runner).await;
    assert!(h.log().contains("a claim's answer was lost"), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_claim_is_journaled_is_reaped_after_restart() {
    let h = harness("crash-claim").await;
    let unseen = h.enqueue(r#"finish completed "never seen""#);
    let mut first = h.runner(&[
        ("WSRUNNER_LEASE_YIELD", YIELD),
        ("WSRUNNER_TEST_CRASH_AFTER", "claim-answered"),
    ]);
    let code = wait_exit(&mut first, Duration::from_secs(60)).await;
    assert_eq!(code, -1, "killed by the failpoint: {}", h.log());
    assert!(h.log().contains("test failpoint reached"), "{}", h.log());
    assert_eq!(h.run(unseen).status, "running");

    let mut runner = h.runner(&[("WSRUNNER_LEASE_YIELD", YIELD)]);
    unseen_run_is_reaped_then_work_goes_on(&h, unseen, &mut runner).await;
    assert!(
        h.log()
            .contains("stopped before a claim's answer was journaled"),
        "{}",
        h.log()
    );
}
