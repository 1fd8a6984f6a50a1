//! Faults around the daemon: the credential revoked at runtime, SIGKILL at random moments, a
//! crash while the server is down, a restart after the server already reaped the run, and git
//! proxy errors during a push or a prepare.

mod daemon_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use daemon_support::*;
use windshift_devserver::types::Faults;

fn phase_count(h: &Harness, id: i64, phase: &str) -> usize {
    h.phases(id).iter().filter(|p| *p == phase).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credential_stops_claiming_and_exits_77_without_a_retry_storm() {
    let h = Harness::start("revoke").await;
    let id = h.enqueue(r#"say go; sleep 3000; finish completed "done""#);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut runner = h.runner(&[("WSRUNNER_METRICS_ADDR", &addr)]);
    h.wait_run(id, Duration::from_secs(60), "the run running", |r| {
        r.status == "running"
    })
    .await;
    let instance = h.instance_id().expect("the runner registered");
    h.dev().core().revoke_instance(instance).expect("revoke");
    let revoked_at = Instant::now();
    let log_before = h.log().lines().count();

    // While the run in flight settles, /healthz says why the runner is unhealthy.
    h.wait_until(Duration::from_secs(10), "/healthz 503 credential", || {
        http_get(port, "/healthz")
            .is_some_and(|(s, body)| s == 503 && body.contains("credential rejected"))
    })
    .await;
    let code = wait_exit(&mut runner, Duration::from_secs(60)).await;
    assert_eq!(code, 77, "{}", h.log());
    let elapsed = revoked_at.elapsed().as_secs() + 1;

    // No retry storm: after the revoke, at most a claim, the run's own calls and one
    // heartbeat rejection per heartbeat interval (1 s) are logged.
    let after: Vec<String> = h
        .log()
        .lines()
        .skip(log_before)
        .filter(|l| l.contains("401"))
        .map(str::to_owned)
        .collect();
    assert!(
        (after.len() as u64) <= elapsed + 8,
        "{} rejection lines in {elapsed} s:\n{}",
        after.len(),
        after.join("\n")
    );
    let claims_after = after.iter().filter(|l| l.contains("claim")).count();
    assert!(
        claims_after <= 1,
        "claims after the revoke:\n{}",
        after.join("\n")
    );
    assert!(h.log().contains("register again"), "{}", h.log());
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}

/// SIGKILL at a random moment of a run, then a restart: the invariants of daemon_crash.rs.
/// `WSR_CRASH_ITERATIONS` (default 5) and `WSR_CRASH_SEED` (printed) tune and reproduce it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_keeps_every_invariant() {
    let iterations: u32 = std::env::var("WSR_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut seed: u64 = std::env::var("WSR_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    eprintln!("WSR_CRASH_SEED={seed}");
    let mut next = move || {
        // xorshift64: reproducible from the printed seed.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // A kill that lands while an idle claim is on the wire leaves the unresolved-claim mark,
    // and the next start yields its lease (F6). A short liveness window and yield keep that
    // within the wait below instead of the default 160 s.
    let h = Harness::start_with("crash-random", |cfg| {
        cfg.liveness_window = Duration::from_secs(6)
    })
    .await;
    let yield_env = [("WSRUNNER_LEASE_YIELD", "10s")];
    for i in 0..iterations {
        let id = h.enqueue(&format!(
            r#"say start; sleep 1500; commit file=w{i}.txt msg="work {i}"; finish completed "kept""#
        ));
        let mut first = h.runner(&yield_env);
        // Somewhere between start-up and the report (a run takes ~3-5 s here).
        let delay = Duration::from_millis(300 + next() % 5000);
        let started = Instant::now();
        while started.elapsed() < delay {
            if first.try_wait().expect("try_wait").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = first.kill();
        let _ = first.wait();
        eprintln!(
            "iteration {i}: killed after {delay:?}, run {id} was {}",
            h.run(id).status
        );

        let ready = h.ready_count();
        let mut second = h.runner(&yield_env);
        h.wait_ready(ready + 1).await;
        let run = h.wait_final(id).await;
        assert_eq!(
            run.status,
            "succeeded",
            "iteration {i} (kill after {delay:?}): {run:?}\n{}",
            h.log()
        );
        assert!(run.reported.is_some(), "reported by the runner, not reaped");
        let branch = format!("agent-runs/run-{id}");
        assert_eq!(run.branch, branch);
        let pushed = h.remote_branch(&branch).expect("the work was pushed");
        assert_eq!(h.subject(&pushed), format!("work {i}"));
        assert_eq!(phase_count(&h, id, "succeeded"), 1, "one verdict");
        assert!(phase_count(&h, id, "pushed") <= 1, "no duplicate push");

        h.stop_and_check_clean(&mut second).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_server_is_down_completes_once_both_are_back() {
    let mut h = Harness::start("crash-server-down").await;
    let id = h.enqueue(
        r#"say start; sleep 6000; commit file=down.txt msg="survived"; finish completed "ok""#,
    );
    let mut first = h.runner(&[]);
    h.wait_until(Duration::from_secs(60), "the agent running", || {
        h.has_container_for(id) && h.agent_printed(id, "start")
    })
    .await;
    let _ = first.kill();
    let _ = first.wait();
    h.stop_dev().await;

    // The runner starts without the server: it must not give up, and must keep the agent.
    let mut second = h.runner(&[]);
    h.wait_until(
        Duration::from_secs(60),
        "recovery without the server",
        || h.log().contains("decision=\"reattach\"") || h.log().contains("decision=reattach"),
    )
    .await;
    h.restart_dev().await;
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    let branch = format!("agent-runs/run-{id}");
    let pushed = h.remote_branch(&branch).expect("pushed");
    assert_eq!(h.subject(&pushed), "survived");
    assert_eq!(phase_count(&h, id, "succeeded"), 1);

    h.stop_and_check_clean(&mut second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_server_reaped_the_run_abandons_it_cleanly() {
    let h = Harness::start_with("reaped", |cfg| {
        cfg.liveness_window = Duration::from_secs(3);
        cfg.reaper_interval = Duration::from_millis(500);
    })
    .await;
    let id = h.enqueue(r#"say start; sleep 120000; finish completed "never""#);
    let mut first = h.runner(&[]);
    h.wait_until(Duration::from_secs(60), "the container running", || {
        h.has_container_for(id) && h.run(id).status == "running"
    })
    .await;
    let _ = first.kill();
    let _ = first.wait();
    let run = h
        .wait_run(id, Duration::from_secs(30), "the reaper", |r| {
            r.status == "failed"
        })
        .await;
    assert!(run.error.contains("lease expired"), "{run:?}");

    let mut second = h.runner(&[]);
    h.wait_until(Duration::from_secs(30), "the run abandoned", || {
        h.log().contains("decision=\"abandon\"") || h.log().contains("decision=abandon")
    })
    .await;
    h.wait_until(Duration::from_secs(30), "the container removed", || {
        h.containers().is_empty()
    })
    .await;
    h.wait_until(Duration::from_secs(10), "the checkout removed", || {
        h.checkouts().is_empty()
    })
    .await;
    signal(&second, libc::SIGTERM);
    assert_eq!(wait_exit(&mut second, Duration::from_secs(30)).await, 0);
    let run = h.run(id);
    assert_eq!(run.status, "failed");
    assert!(
        run.reported.is_none(),
        "no report after the reaper: {run:?}"
    );
    let (state, describe) = h.journal_state(id).expect("journaled");
    assert_eq!(state, "failed", "{describe}");
    assert!(describe.contains("abandoned"), "{describe}");
    let verify = h.journal_verify();
    assert!(verify.status.success(), "{verify:?}");
}

/// An idle runner whose server disappeared still stops promptly on SIGTERM: a claim or a
/// heartbeat retrying an unreachable server does not hold up the shutdown for its whole
/// retry budget (two minutes by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_server_gone_stops_without_waiting_out_retries() {
    let mut h = Harness::start("gone-stop").await;
    let mut runner = h.runner(&[]);
    h.wait_ready(1).await;
    h.stop_dev().await;
    // Let the claim loop and a heartbeat both start retrying against the dead address.
    h.wait_until(Duration::from_secs(30), "calls retrying", || {
        h.log().contains("retrying control-plane call")
    })
    .await;
    signal(&runner, libc::SIGTERM);
    // Far below the client's 120 s retry budget, which an unfixed runner waits out.
    let code = wait_exit(&mut runner, Duration::from_secs(30)).await;
    assert_eq!(code, 0, "{}", h.log());
}

fn git_faults(prefix: String, faults: Faults) -> Faults {
    Faults {
        only_path_prefix: Some(prefix),
        ..faults
    }
}

/// F7: a push that meets 5xx answers from the git proxy is retried, and the run succeeds with
/// exactly the agent's commit, pushed once. Only the receive-pack POST is faulted, so prepare
/// passes and the window certainly covers the push; the test closes it after the runner has
/// seen a refused attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_git_proxy_5xx_during_the_push_is_retried_and_the_run_succeeds() {
    let h = Harness::start("gitretry-push").await;
    let core = h.dev().core().clone();
    let id = h.enqueue(r#"commit file=agent.txt msg="agent change"; finish completed "done""#);
    let ws = h.run(id).repos[0].workspace_id;
    *core.faults.lock().unwrap() = git_faults(
        format!("/api/git-proxy/{ws}/acme/app/git-receive-pack"),
        Faults {
            error_5xx_probability: 1.0,
            ..Default::default()
        },
    );
    let mut runner = h.runner(&[]);
    h.wait_until(Duration::from_secs(120), "a refused push attempt", || {
        core.faults_injected.load(Ordering::Relaxed) >= 1
            && h.log().contains("git step failed transiently; retrying")
    })
    .await;
    assert_eq!(core.pushes_served.load(Ordering::Relaxed), 0);
    *core.faults.lock().unwrap() = Faults::default();

    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{id}"))
        .expect("branch pushed");
    assert_eq!(h.subject(&pushed), "agent change");
    assert_eq!(core.pushes_served.load(Ordering::Relaxed), 1, "one push");
    assert_eq!(phase_count(&h, id, "pushed"), 1, "{:?}", h.phases(id));
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
}

/// A cancel reaches a prepare that is waiting out a git-proxy outage: with a one-hour retry
/// budget, only the cancel can end the run, and it ends canceled, not failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_a_prepare_retrying_through_a_git_outage() {
    let h = Harness::start("gitretry-cancel").await;
    let core = h.dev().core().clone();
    *core.faults.lock().unwrap() = git_faults(
        "/api/git-proxy/".into(),
        Faults {
            outage_until_ms: Some(windshift_devserver::core::now_ms() + 3_600_000),
            ..Default::default()
        },
    );
    let id = h.enqueue(r#"finish completed "never runs""#);
    let mut runner = h.runner(&[("WSRUNNER_GIT_RETRY_TIMEOUT", "1h")]);
    h.wait_until(Duration::from_secs(60), "prepare retrying", || {
        core.faults_injected.load(Ordering::Relaxed) >= 1
            && h.log().contains("git step failed transiently; retrying")
    })
    .await;
    core.cancel(id, false).expect("cancel");
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "canceled", "{run:?}\n{}", h.log());
    assert_eq!(run.error, "context canceled");
    // The retry's own log line may come just after the report: the run task reports the
    // stop without waiting for the blocking git step to notice it.
    h.wait_until(Duration::from_secs(30), "the git retry to stop", || {
        h.log()
            .contains("git retry stopped: the operation was cancelled")
    })
    .await;
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
}

/// Chaos finding F10: an outage shorter than the server's liveness window must not get the
/// runner's runs reaped. The heartbeat used to back off like any call (steps up to 30 s), so
/// the first beat after the server came back could land past the window; now a failing beat
/// is tried again at least every heartbeat interval (at most 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_shorter_than_the_lease_never_gets_the_run_reaped() {
    // Outage 18 s, lease 22 s: with the old backoff (0.5, 1, 2, 4, 8, 16 s steps) no beat
    // lands between the outage's end and the lease's end.
    let lease = Duration::from_secs(22);
    let outage = Duration::from_secs(18);
    let h = Harness::start_with("outage-lease", |cfg| cfg.liveness_window = lease).await;
    let id = h.enqueue(r#"say ready; sleep 30000; finish completed "outlived the outage""#);
    let mut runner = h.runner(&[]);
    h.wait_until(Duration::from_secs(60), "the agent running", || {
        h.events(id)
            .iter()
            .any(|e| e.payload_json.contains("ready"))
    })
    .await;

    let until = windshift_devserver::core::now_ms() + outage.as_millis() as i64;
    h.dev().core().faults.lock().unwrap().outage_until_ms = Some(until);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert!(run.reported.is_some(), "reported by the runner, not reaped");
    signal(&runner, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut runner, Duration::from_secs(60)).await,
        0,
        "{}",
        h.log()
    );
}
