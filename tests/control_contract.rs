//! Client ↔ devserver contract tests over real HTTP: every endpoint and every status code of
//! spec table 2.10, plus the server-side rules of sections 2 and 7 the client relies on.

#[path = "control_support/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use windshift_devserver::types::Faults;
use windshift_runner::control::wire::*;
use windshift_runner::control::{ControlError, Preflight};

fn status_of<T: std::fmt::Debug>(r: Result<T, ControlError>) -> u16 {
    match r {
        Err(e) => e
            .status()
            .unwrap_or_else(|| panic!("expected an HTTP status, got {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

fn code_of<T: std::fmt::Debug>(r: Result<T, ControlError>) -> String {
    let e = r.expect_err("expected an error");
    e.error_body().expect("error body").code.clone()
}

#[tokio::test]
async fn preflight_ok_and_api_suffix_guidance() {
    let ts = TestServer::start().await;
    let c = client(&ts.api_url());
    match c.preflight().await.unwrap() {
        Preflight::Ok { version } => assert!(!version.is_empty()),
        other => panic!("{other:?}"),
    }
    // The bare host (no /api) answers 404 for /version: fatal, with the /api guidance.
    let bare = ts.api_url().trim_end_matches("/api").to_string();
    let err = client(&bare).preflight().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("HTTP 404") && text.contains("/api suffix"),
        "{text}"
    );
    ts.server.stop().await;
}

#[tokio::test]
async fn preflight_unreachable_is_only_a_warning() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let c = client(&format!("http://{addr}/api"));
    assert!(matches!(
        c.preflight().await.unwrap(),
        Preflight::Unreachable { .. }
    ));
}

#[tokio::test]
async fn preflight_during_an_outage_is_only_a_warning() {
    let ts = TestServer::start().await;
    let until = windshift_devserver::core::now_ms() + 60_000;
    ts.server.core().faults.lock().unwrap().outage_until_ms = Some(until);
    match client(&ts.api_url()).preflight().await.unwrap() {
        Preflight::Unreachable { message } => assert!(message.contains("503"), "{message}"),
        other => panic!("a 503 is transient, not fatal: {other:?}"),
    }
    ts.server.stop().await;
}

#[tokio::test]
async fn register_201_then_token_reuse_and_garbage_are_401() {
    let ts = TestServer::start().await;
    let pool = ts.pool(0);
    let token = ts.token(pool);
    let c = client_no_retry(&ts.api_url());
    let r = c.register(&token, "r1").await.expect("201");
    assert!(r.credential.starts_with("wsrc_") && r.credential.len() == 69);
    assert_eq!(r.pool_id, pool);
    assert!(r.instance_id > 0);
    // Single use.
    assert_eq!(status_of(c.register(&token, "r2").await), 401);
    assert_eq!(status_of(c.register("wsrt_nope", "r3").await), 401);
    // An expired token is refused the same way.
    let expired = ts
        .server
        .core()
        .mint_token(
            pool,
            &windshift_devserver::types::MintToken { ttl_secs: Some(0) },
        )
        .unwrap()
        .token;
    assert_eq!(status_of(c.register(&expired, "r4").await), 401);
    ts.server.stop().await;
}

#[tokio::test]
async fn register_malformed_body_is_400_and_ip_limiter_is_429() {
    let ts = TestServer::start_with(|c| {
        c.register_burst = 2.0;
        c.register_rate_per_min = 0.001;
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/runner/register", ts.api_url());
    let r = http.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    ts.server.stop().await;
}

#[tokio::test]
async fn claim_null_then_job_with_env_and_lifecycle_event() {
    let ts = TestServer::start().await;
    let (c, pool, instance) = ts.registered().await;
    assert_eq!(c.claim().await.unwrap(), None);
    let run = ts.enqueue(pool);
    let job = c.claim().await.unwrap().expect("a job");
    assert_eq!(job.run_id, run);
    assert_eq!(job.initial_prompt, "do it");
    assert_eq!(job.image, "agent:test");
    let token = job.run_token().expect("WS_TOKEN minted at claim");
    assert!(token.len() >= 32);
    assert_eq!(job.env["AGENT_RUN_ID"], run.to_string());
    assert_eq!(job.env["WS_API_URL"], ts.api_url());
    for key in [
        "WS_WORKSPACE_ID",
        "WINDSHIFT_ITEM_DB_ID",
        "WS_WORKSPACE_KEY",
        "WS_ITEM_NUMBER",
        "WINDSHIFT_ITEM_ID",
        "WINDSHIFT_ITEM_KEY",
    ] {
        assert!(job.env.contains_key(key), "{key} missing");
    }
    assert!(!job.env.contains_key("LLM_BASE_URL"));
    let events = ts.server.core().events(run).unwrap();
    let claimed = events
        .iter()
        .find(|e| e.payload_json.contains("\"claimed\""))
        .expect("claimed lifecycle event");
    assert_eq!(claimed.event_type, "lifecycle");
    let v: serde_json::Value = serde_json::from_str(&claimed.payload_json).unwrap();
    assert_eq!(v["runner_id"], instance);
    assert_eq!(v["runner_name"], "test-runner");
    assert_eq!(ts.server.core().run(run).unwrap().status, "running");
    // Nothing left.
    assert_eq!(c.claim().await.unwrap(), None);
    ts.server.stop().await;
}

#[tokio::test]
async fn llm_env_is_added_when_the_binding_has_an_llm_grant() {
    let ts = TestServer::start_with(|c| c.llm_proxy = true).await;
    let (c, pool, _) = ts.registered().await;
    let run = ts.enqueue(pool);
    let job = c.claim().await.unwrap().unwrap();
    assert_eq!(
        job.env["LLM_BASE_URL"],
        format!("{}/llm-proxy/{run}/complete", ts.api_url())
    );
    assert_eq!(job.env["LLM_API_KEY"], job.env["WS_TOKEN"]);
    ts.server.stop().await;
}

#[tokio::test]
async fn claim_401_403_and_runtime_revocation_flip_auth_state() {
    let ts = TestServer::start().await;
    let (c, pool, instance) = ts.registered().await;
    // Unknown credential.
    let stranger = client_no_retry(&ts.api_url());
    stranger.set_credential(&format!("wsrc_{}", "0".repeat(64)));
    let e = stranger.claim().await.unwrap_err();
    assert!(matches!(e, ControlError::CredentialRejected(_)), "{e}");
    assert_eq!(e.status(), Some(401));
    assert!(stranger.auth_state().is_rejected());
    // Pool disabled: 403 on claim, which is also a credential-level rejection.
    ts.server.core().set_pool_enabled(pool, false).unwrap();
    let e = c.claim().await.unwrap_err();
    assert_eq!(e.status(), Some(403));
    assert!(c.auth_state().is_rejected());
    ts.server.core().set_pool_enabled(pool, true).unwrap();
    c.set_credential(&{
        // Re-installing resets the flag; use a fresh registration to get a credential again.
        let r = client_no_retry(&ts.api_url())
            .register(&ts.token(pool), "again")
            .await
            .unwrap();
        r.credential
    });
    assert!(!c.auth_state().is_rejected());
    c.heartbeat().await.expect("works before revocation");
    // Revoke at runtime: the next call is 401 and the state says so.
    let me = ts
        .server
        .core()
        .instances()
        .into_iter()
        .map(|i| i.id)
        .max()
        .unwrap();
    assert_ne!(me, instance);
    ts.server.core().revoke_instance(me).unwrap();
    let e = c.heartbeat().await.unwrap_err();
    assert!(matches!(e, ControlError::CredentialRejected(_)));
    assert!(c.auth_state().is_rejected());
    assert!(c.auth_state().rejection().unwrap().contains("401"));
    ts.server.stop().await;
}

#[tokio::test]
async fn per_instance_rate_limit_is_429_with_retry_after_then_retried() {
    // A slow refill (one token per 4 s): the burst runs out within 10 calls and the retrying
    // client's first attempt is refused, however slowly a loaded machine runs them.
    let ts = TestServer::start_with(|c| {
        c.rate_per_sec = 0.25;
        c.rate_burst = 3.0;
    })
    .await;
    let pool = ts.pool(0);
    let reg = client_no_retry(&ts.api_url())
        .register(&ts.token(pool), "x")
        .await
        .unwrap();
    let raw = client_no_retry(&ts.api_url());
    raw.set_credential(&reg.credential);
    let mut saw = None;
    for _ in 0..10 {
        if let Err(e) = raw.heartbeat().await {
            saw = Some(e);
            break;
        }
    }
    let e = saw.expect("the burst is exhausted within 10 calls");
    assert_eq!(e.status(), Some(429));
    assert_eq!(e.error_body().unwrap().code, "RATE_LIMITED");
    if let ControlError::Status(s) = &e {
        assert_eq!(s.retry_after, Some(Duration::from_secs(1)));
    }
    // The retrying client honours Retry-After and gets through.
    let c = client(&ts.api_url());
    c.set_credential(&reg.credential);
    c.heartbeat().await.expect("retried after 429");
    assert!(
        c.counters()
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    ts.server.stop().await;
}

#[tokio::test]
async fn harness_off_is_503_everywhere() {
    let ts = TestServer::start().await;
    let pool = ts.pool(0);
    let run = ts.enqueue(pool);
    let token = ts.token(pool);
    // No retries: each call shows the status the server sent.
    let c = client_no_retry(&ts.api_url());
    let r = c.register(&ts.token(pool), "h").await.unwrap();
    c.set_credential(&r.credential);
    assert_eq!(c.claim().await.unwrap().unwrap().run_id, run);
    ts.server.core().set_harness(false).unwrap();
    assert_eq!(status_of(c.register(&token, "z").await), 503);
    assert_eq!(status_of(c.claim().await), 503);
    assert_eq!(code_of(c.heartbeat().await), "SERVICE_UNAVAILABLE");
    let ev = EventRequest {
        event_type: "log".into(),
        payload_json: "{}".into(),
    };
    assert_eq!(status_of(c.send_event(run, &ev).await), 503);
    let rep = ReportRequest {
        status: STATUS_SUCCEEDED.into(),
        ..Default::default()
    };
    assert_eq!(status_of(c.report(run, &rep).await), 503);
    assert!(
        !c.auth_state().is_rejected(),
        "503 is not a credential problem"
    );
    // The token was not spent while the harness was off; back on, everything works.
    ts.server.core().set_harness(true).unwrap();
    c.register(&token, "z").await.expect("token still valid");
    c.report(run, &rep).await.expect("result accepted");
    ts.server.stop().await;
}

#[tokio::test]
async fn events_200_400_403_404_409() {
    let ts = TestServer::start().await;
    let (c, pool, _) = ts.registered().await;
    let run = ts.enqueue(pool);
    c.claim().await.unwrap().unwrap();
    let raw = client_no_retry(&ts.api_url());
    // Same credential on a no-retry client via a second registration is a different
    // instance; use `c` for ownership cases and `raw` for the stranger.
    let ok = EventRequest {
        event_type: "stdout".into(),
        payload_json: r#"{"type":"content","text":"hi"}"#.into(),
    };
    c.send_event(run, &ok).await.expect("200");
    // Empty payload is stored as {}.
    c.send_event(
        run,
        &EventRequest {
            event_type: "<b>note</b>".into(),
            payload_json: String::new(),
        },
    )
    .await
    .unwrap();
    let stored = ts.server.core().events(run).unwrap();
    let last = stored.last().unwrap();
    assert_eq!(
        (last.event_type.as_str(), last.payload_json.as_str()),
        ("note", "{}")
    );
    // 400: not JSON, too big.
    let bad = EventRequest {
        event_type: "x".into(),
        payload_json: "not json".into(),
    };
    assert_eq!(status_of(c.send_event(run, &bad).await), 400);
    let big = EventRequest {
        event_type: "x".into(),
        payload_json: serde_json::Value::String("a".repeat(256 * 1024)).to_string(),
    };
    assert_eq!(status_of(c.send_event(run, &big).await), 400);
    // 404: unknown run.
    assert_eq!(status_of(c.send_event(999_999, &ok).await), 404);
    // 403: another instance's run.
    let (other, _) = ts.register_in(pool).await;
    assert_eq!(status_of(other.send_event(run, &ok).await), 403);
    assert!(
        !other.auth_state().is_rejected(),
        "403 on events is about the run, not the credential"
    );
    // 401: bad credential.
    raw.set_credential("wsrc_bad");
    assert_eq!(status_of(raw.send_event(run, &ok).await), 401);
    // 409 after the result.
    c.report(
        run,
        &ReportRequest {
            status: STATUS_FAILED.into(),
            error: "agent error: boom".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let e = c.send_event(run, &ok).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(e.to_string().contains("not running"), "{e}");
    ts.server.stop().await;
}

#[tokio::test]
async fn result_200_then_cas_409_and_400_for_non_terminal() {
    let ts = TestServer::start().await;
    let (c, pool, _) = ts.registered().await;
    let run = ts.enqueue(pool);
    c.claim().await.unwrap().unwrap();
    let bad = ReportRequest {
        status: "running".into(),
        ..Default::default()
    };
    assert_eq!(status_of(c.report(run, &bad).await), 400);
    assert_eq!(
        status_of(c.report(424242, &bad.clone()).await),
        400,
        "status is checked first"
    );
    let good = ReportRequest {
        status: STATUS_SUCCEEDED.into(),
        branch: format!("agent-runs/run-{run}"),
        base_commit: "a".repeat(40),
        summary: "done".into(),
        ..Default::default()
    };
    assert_eq!(
        status_of(
            c.report(
                424242,
                &ReportRequest {
                    status: "failed".into(),
                    ..Default::default()
                }
            )
            .await
        ),
        404
    );
    let (other, _) = ts.register_in(pool).await;
    assert_eq!(status_of(other.report(run, &good).await), 403);
    c.report(run, &good).await.expect("200");
    let view = ts.server.core().run(run).unwrap();
    assert_eq!(view.status, "succeeded");
    assert_eq!(view.branch, format!("agent-runs/run-{run}"));
    assert_eq!(view.base_commit, "a".repeat(40));
    assert_eq!(view.summary, "done");
    // A second result changes nothing: the run is no longer running.
    let again = ReportRequest {
        status: STATUS_FAILED.into(),
        ..Default::default()
    };
    assert_eq!(status_of(c.report(run, &again).await), 409);
    assert_eq!(ts.server.core().run(run).unwrap().status, "succeeded");
    let events = ts.server.core().events(run).unwrap();
    let terminal = events
        .iter()
        .filter(|e| e.payload_json.contains("\"succeeded\""))
        .count();
    assert_eq!(terminal, 1, "one terminal lifecycle event");
    ts.server.stop().await;
}

#[tokio::test]
async fn reported_branch_other_than_the_run_branch_is_rejected_with_a_warning() {
    let ts = TestServer::start().await;
    let (c, pool, _) = ts.registered().await;
    let run = ts.enqueue(pool);
    c.claim().await.unwrap().unwrap();
    c.report(
        run,
        &ReportRequest {
            status: STATUS_SUCCEEDED.into(),
            branch: "main".into(),
            base_commit: "b".repeat(40),
            repos: vec![RepoResult {
                repo_slug: "o/r".into(),
                branch: format!("agent-runs/run-{run}"),
                base_commit: "nothex".into(),
            }],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let view = ts.server.core().run(run).unwrap();
    assert_eq!(view.branch, "");
    assert_eq!(view.base_commit, "");
    assert_eq!(view.result_repos[0].branch, format!("agent-runs/run-{run}"));
    assert_eq!(view.result_repos[0].base_commit, "");
    let warnings: Vec<_> = ts
        .server
        .core()
        .events(run)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "warning" && e.payload_json.contains("scm_ref_rejected"))
        .collect();
    assert_eq!(warnings.len(), 2);
    ts.server.stop().await;
}

#[tokio::test]
async fn heartbeat_abort_list_queue_depth_and_force_cancel() {
    let ts = TestServer::start().await;
    let (c, pool, _) = ts.registered().await;
    let run = ts.enqueue(pool);
    let _queued1 = ts.enqueue(pool);
    let _queued2 = ts.enqueue(pool);
    let hb = c.heartbeat().await.unwrap();
    assert_eq!(hb.queue_depth, 3);
    assert!(hb.abort.is_empty());
    c.claim().await.unwrap().unwrap();
    ts.server.core().cancel(run, false).unwrap();
    let hb = c.heartbeat().await.unwrap();
    assert_eq!(hb.abort, vec![run]);
    assert_eq!(hb.queue_depth, 2);
    // The id stays listed until the run is finalized.
    assert_eq!(c.heartbeat().await.unwrap().abort, vec![run]);
    // Force: the server ends the run; the runner's later calls get 409.
    ts.server.core().cancel(run, true).unwrap();
    assert!(c.heartbeat().await.unwrap().abort.is_empty());
    let ev = EventRequest {
        event_type: "x".into(),
        payload_json: "{}".into(),
    };
    assert_eq!(status_of(c.send_event(run, &ev).await), 409);
    let rep = ReportRequest {
        status: STATUS_CANCELED.into(),
        error: "context canceled".into(),
        ..Default::default()
    };
    assert_eq!(status_of(c.report(run, &rep).await), 409);
    let view = ts.server.core().run(run).unwrap();
    assert_eq!(
        (view.status.as_str(), view.error.as_str()),
        ("canceled", "force-canceled by admin")
    );
    ts.server.stop().await;
}

#[tokio::test]
async fn pool_quota_and_round_robin() {
    let ts = TestServer::start().await;
    let pool = ts.pool(1);
    let (a, _) = ts.register_in(pool).await;
    let r1 = ts.enqueue(pool);
    let r2 = ts.enqueue(pool);
    let j1 = a.claim().await.unwrap().expect("first claim");
    assert_eq!(j1.run_id, r1, "oldest queued first");
    assert_eq!(a.claim().await.unwrap(), None, "max_concurrent_runs = 1");
    a.report(
        r1,
        &ReportRequest {
            status: STATUS_SUCCEEDED.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Second live instance: round-robin over live instances, oldest first.
    let (b, _) = ts.register_in(pool).await;
    b.heartbeat().await.unwrap();
    let mut got = None;
    for _ in 0..4 {
        if let Some(j) = b.claim().await.unwrap() {
            got = Some(j);
            break;
        }
    }
    assert_eq!(got.expect("b's turn comes").run_id, r2);
    ts.server.stop().await;
}

#[tokio::test]
async fn lease_reaper_and_backstop_fail_runs() {
    let ts = TestServer::start_with(|c| {
        c.liveness_window = Duration::from_millis(300);
        c.max_run_duration = Duration::from_millis(600);
        c.reaper_interval = Duration::from_secs(3600);
    })
    .await;
    let (c, pool, _) = ts.registered().await;
    let stale = ts.enqueue(pool);
    c.claim().await.unwrap().unwrap();
    // No heartbeat: after the window the reaper fails the run.
    let core = ts.server.core().clone();
    wait_until("lease expiry", Duration::from_secs(10), || {
        core.reap().unwrap().contains(&stale)
    })
    .await;
    let view = core.run(stale).unwrap();
    assert_eq!(view.status, "failed");
    assert_eq!(view.error, "runner lease expired (missed heartbeat)");
    let ev = EventRequest {
        event_type: "x".into(),
        payload_json: "{}".into(),
    };
    assert_eq!(status_of(c.send_event(stale, &ev).await), 409);
    // Backstop: heartbeats keep the runner live, the duration still runs out.
    let long = ts.enqueue(pool);
    c.claim().await.unwrap().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        c.heartbeat().await.unwrap();
        if core.reap().unwrap().contains(&long) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backstop never fired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(core
        .run(long)
        .unwrap()
        .error
        .contains("maximum allowed duration"));
    drop(core);
    ts.server.stop().await;
}

#[tokio::test]
async fn injected_5xx_and_dropped_connections_are_retried() {
    let ts = TestServer::start().await;
    let (c, _, _) = ts.registered().await;
    let core = ts.server.core().clone();
    *core.faults.lock().unwrap() = Faults {
        error_5xx_probability: 1.0,
        ..Default::default()
    };
    let clear = {
        let core = core.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            *core.faults.lock().unwrap() = Faults::default();
        })
    };
    c.heartbeat().await.expect("retried through the 5xx window");
    clear.await.unwrap();
    let retries = c
        .counters()
        .retries
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(retries >= 1, "{retries}");
    // Dropped connections are transport errors, retried too.
    *core.faults.lock().unwrap() = Faults {
        drop_connection_probability: 0.5,
        ..Default::default()
    };
    for _ in 0..10 {
        c.heartbeat()
            .await
            .expect("retried through dropped connections");
    }
    // Full outage window: 503 until it ends.
    *core.faults.lock().unwrap() = Faults {
        outage_until_ms: Some(windshift_devserver::core::now_ms() + 400),
        ..Default::default()
    };
    c.claim().await.expect("outage ends within the budget");
    drop(core);
    ts.server.stop().await;
}

#[tokio::test]
async fn a_500_is_reported_with_status_and_body_when_the_budget_runs_out() {
    let ts = TestServer::start().await;
    let (_, pool, _) = ts.registered().await;
    let r = client_no_retry(&ts.api_url())
        .register(&ts.token(pool), "n")
        .await
        .unwrap();
    let raw = client_no_retry(&ts.api_url());
    raw.set_credential(&r.credential);
    *ts.server.core().faults.lock().unwrap() = Faults {
        error_5xx_probability: 1.0,
        ..Default::default()
    };
    let e = raw.claim().await.unwrap_err();
    assert_eq!(e.status(), Some(500));
    assert_eq!(e.error_body().unwrap().code, "INTERNAL_ERROR");
    assert!(!e.to_string().contains(&r.credential));
    ts.server.stop().await;
}

/// F6: a claim whose connection fails after the request left may have been carried out by the
/// server; only a failed connect proves it never arrived. The daemon yields its lease on the
/// first kind (tests/daemon_lost_claim.rs).
#[tokio::test]
async fn claim_answers_lost_after_sending_are_counted_and_refused_connects_are_not() {
    use std::sync::atomic::Ordering;
    let ts = TestServer::start().await;
    let dropped = client_no_retry(&ts.api_url());
    let pool = ts.pool(0);
    let registered = dropped
        .register(&ts.token(pool), "lost-answer")
        .await
        .expect("register");
    dropped.set_credential(&registered.credential);
    let credential = "wsrc_lostanswertestcredential";

    // Nothing listens on this port: the connect fails, the claim cannot have arrived.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        format!("http://127.0.0.1:{port}/api")
    };
    let refused = client_no_retry(&closed);
    refused.set_credential(credential);
    assert!(refused.claim().await.is_err());
    assert_eq!(
        refused
            .counters()
            .lost_claim_answers
            .load(Ordering::Relaxed),
        0
    );

    // The server takes the request and closes the connection without an answer.
    *ts.server.core().faults.lock().unwrap() = Faults {
        drop_connection_probability: 1.0,
        ..Faults::default()
    };
    assert!(matches!(
        dropped.claim().await,
        Err(ControlError::Transport { .. })
    ));
    assert_eq!(
        dropped
            .counters()
            .lost_claim_answers
            .load(Ordering::Relaxed),
        1
    );
    // Other calls are idempotent or answered by status: never counted.
    let _ = dropped.heartbeat().await;
    assert_eq!(
        dropped
            .counters()
            .lost_claim_answers
            .load(Ordering::Relaxed),
        1
    );
    *ts.server.core().faults.lock().unwrap() = Faults::default();
}
