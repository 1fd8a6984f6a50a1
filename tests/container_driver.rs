//! The JSONL driver against the real daemon and the test agent: every agent scenario's
//! events and signals, the 1 MiB limit, floods, cancel and re-attach.

mod container_support;

use container_support::*;
use std::time::Duration;
use tokio::sync::mpsc;
use windshift_runner::effects::agent_driver::{self, DriveOptions, DriverOutput, StdinChannel};
use windshift_runner::effects::container::LaunchKind;
use windshift_runner::fsm::contract::AgentSignal;

const GRACE: Duration = Duration::from_secs(3);

#[tokio::test]
async fn commit_then_completed_lands_a_commit_in_the_checkout() {
    let (engine, _cleanup) = test_engine(&unique_instance("commit"));
    let co = checkout();
    let base = git(&co.path, &["rev-parse", "HEAD"]);
    let driven = run_script(
        &engine,
        &spec(101, LaunchKind::CodingAgent, Some(&co.path)),
        r#"commit file=a.txt msg=hello; finish completed "did it""#,
        GRACE,
    )
    .await;
    assert_eq!(
        driven.result.judged_exit_code(),
        Some(0),
        "{:?}",
        driven.outputs
    );
    let done = driven.of_type("tool_done");
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0]["ok"], true,
        "git inside the image failed: {}",
        done[0]
    );
    let signals = driven.signals();
    assert_eq!(
        signals[0],
        AgentSignal::Event {
            event_type: "lifecycle".into()
        }
    );
    assert!(signals.contains(&AgentSignal::Finish {
        outcome: "completed".into(),
        summary: "did it".into()
    }));
    assert_eq!(signals.last(), Some(&AgentSignal::SessionIdle));
    assert!(driven.result.saw_contract_event && driven.result.saw_session_idle);
    assert!(!driven.result.killed_after_grace && !driven.result.cancelled);
    let head = git(&co.path, &["rev-parse", "HEAD"]);
    assert_ne!(head, base);
    assert_eq!(git(&co.path, &["log", "-1", "--format=%s"]), "hello");
    assert_eq!(git(&co.path, &["rev-parse", "HEAD~1"]), base);
}

#[tokio::test]
async fn no_change_leaves_head_at_base() {
    let (engine, _cleanup) = test_engine(&unique_instance("nochange"));
    let co = checkout();
    let base = git(&co.path, &["rev-parse", "HEAD"]);
    let driven = run_script(
        &engine,
        &spec(102, LaunchKind::CodingAgent, Some(&co.path)),
        "say nothing to do; finish completed",
        GRACE,
    )
    .await;
    assert_eq!(driven.result.judged_exit_code(), Some(0));
    assert_eq!(git(&co.path, &["rev-parse", "HEAD"]), base);
    assert_eq!(git(&co.path, &["status", "--porcelain"]), "");
    assert!(driven.signals().contains(&AgentSignal::Finish {
        outcome: "completed".into(),
        summary: String::new()
    }));
}

#[tokio::test]
async fn blocked_and_error_are_signalled() {
    let (engine, _cleanup) = test_engine(&unique_instance("blocked"));
    let driven = run_script(
        &engine,
        &spec(103, LaunchKind::CodingAgent, None),
        r#"finish blocked "no access to the repo""#,
        GRACE,
    )
    .await;
    assert_eq!(driven.result.judged_exit_code(), Some(0));
    assert!(driven.signals().contains(&AgentSignal::Finish {
        outcome: "blocked".into(),
        summary: "no access to the repo".into()
    }));

    let driven = run_script(
        &engine,
        &spec(104, LaunchKind::CodingAgent, None),
        "error broker down",
        GRACE,
    )
    .await;
    assert_eq!(driven.result.judged_exit_code(), Some(0));
    let signals = driven.signals();
    assert!(signals.contains(&AgentSignal::Error {
        message: "broker down".into()
    }));
    assert!(!signals
        .iter()
        .any(|s| matches!(s, AgentSignal::Finish { .. })));
}

#[tokio::test]
async fn exit_code_is_reported_without_idle() {
    let (engine, _cleanup) = test_engine(&unique_instance("exit"));
    let driven = run_script(
        &engine,
        &spec(105, LaunchKind::CodingAgent, None),
        "say bye; exit 7",
        GRACE,
    )
    .await;
    assert_eq!(driven.result.exit_code, Some(7));
    assert!(!driven.result.saw_session_idle);
    assert!(!driven.result.killed_after_grace);
    assert!(driven.result.saw_contract_event);
}

#[tokio::test]
async fn non_json_and_stderr_lines_are_wrapped() {
    let (engine, _cleanup) = test_engine(&unique_instance("raw"));
    let driven = run_script(
        &engine,
        &spec(106, LaunchKind::CodingAgent, None),
        r#"raw "plain text, not json"; raw "   "; stderr "warning: something"; raw "[1,2]""#,
        GRACE,
    )
    .await;
    let stdout = driven.payloads("stdout");
    assert!(
        stdout.contains(&serde_json::json!({"line": "plain text, not json"})),
        "{stdout:?}"
    );
    // Valid JSON is forwarded verbatim even without a type; blank lines are skipped.
    assert!(stdout.contains(&serde_json::json!([1, 2])));
    assert!(!stdout
        .iter()
        .any(|p| p == &serde_json::json!({"line": "   "})));
    assert_eq!(
        driven.payloads("stderr"),
        vec![serde_json::json!({"line": "warning: something"})]
    );
}

#[tokio::test]
async fn a_line_over_one_mib_degrades_the_stream_once() {
    let (engine, _cleanup) = test_engine(&unique_instance("bigline"));
    let driven = run_script(
        &engine,
        &spec(107, LaunchKind::CodingAgent, None),
        "say before; bigline 1200000; say after; finish completed",
        GRACE,
    )
    .await;
    assert!(driven.result.stream_degraded);
    assert_eq!(driven.result.judged_exit_code(), Some(0));
    let degraded: Vec<_> = driven
        .outputs
        .iter()
        .filter(|o| matches!(o, DriverOutput::StreamDegraded { stream } if stream == "stdout"))
        .collect();
    assert_eq!(degraded.len(), 1);
    let texts: Vec<String> = driven
        .payloads("stdout")
        .iter()
        .filter_map(|p| p.get("line").and_then(|l| l.as_str()).map(str::to_owned))
        .collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(texts[0].starts_with("[runner] stdout scan aborted:"));
    assert!(texts[0].ends_with("remaining output will be drained and discarded"));
    // Nothing after the long line is forwarded.
    assert!(driven
        .of_type("content")
        .iter()
        .all(|p| p["text"] == "before"));
}

#[tokio::test]
async fn a_flood_of_events_arrives_complete_and_in_order() {
    let (engine, _cleanup) = test_engine(&unique_instance("flood"));
    let driven = run_script(
        &engine,
        &spec(108, LaunchKind::CodingAgent, None),
        "flood 5000; finish completed",
        GRACE,
    )
    .await;
    let seqs: Vec<u64> = driven
        .of_type("content")
        .iter()
        .filter_map(|p| p["seq"].as_u64())
        .collect();
    assert_eq!(seqs, (0..5000).collect::<Vec<u64>>());
    assert!(!driven.result.stream_degraded);
    assert_eq!(driven.result.judged_exit_code(), Some(0));
}

#[tokio::test]
async fn container_kind_runs_without_stdin() {
    let (engine, _cleanup) = test_engine(&unique_instance("kind"));
    // No stdin: the agent sees EOF at once, prints its lifecycle line and exits 0.
    let driven = run_script(&engine, &spec(109, LaunchKind::Container, None), "", GRACE).await;
    assert_eq!(driven.result.judged_exit_code(), Some(0));
    assert_eq!(driven.of_type("lifecycle").len(), 1);
    assert_eq!(driven.of_type("lifecycle")[0]["run_id"], "109");
}

/// Starts a container running `script` and drives it in a task that can be cancelled.
async fn start_for_cancel(
    engine: &windshift_runner::effects::container::Engine,
    run_id: i64,
) -> (String, tempfile::TempDir, Option<StdinChannel>) {
    let run_dir = tempfile::tempdir().expect("run dir");
    let name = engine
        .create(&spec(run_id, LaunchKind::CodingAgent, None), run_dir.path())
        .await
        .expect("create");
    let stdin = agent_driver::start(engine, &name, run_dir.path(), true)
        .await
        .expect("start");
    (name, run_dir, stdin)
}

#[tokio::test]
async fn cancel_of_an_agent_ignoring_abort_kills_the_container() {
    let (engine, _cleanup) = test_engine(&unique_instance("cancel-hang"));
    let (name, _dir, stdin) = start_for_cancel(&engine, 110).await;
    let (tx, mut rx) = mpsc::channel(64);
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let options = DriveOptions {
        // Deaf to the stop's SIGTERM too (it is not PID 1 under the engine's init).
        prompt: Some("ignore-term; say started; hang".into()),
        grace: GRACE,
        ..DriveOptions::default()
    };
    let eng = engine.clone();
    let nm = name.clone();
    let driver = tokio::spawn(async move {
        agent_driver::drive(
            &eng,
            &nm,
            stdin,
            options,
            async {
                let _ = cancel_rx.await;
            },
            tx,
        )
        .await
    });
    // Cancel once the agent is demonstrably working.
    loop {
        match rx.recv().await {
            Some(DriverOutput::Event { payload_json, .. }) if payload_json.contains("started") => {
                break
            }
            Some(_) => {}
            None => panic!("driver ended before the agent started"),
        }
    }
    cancel_tx.send(()).expect("driver listens");
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let result = driver.await.expect("join").expect("drive");
    drain.await.expect("drain");
    assert!(result.cancelled);
    assert!(result.killed_after_grace, "a hanging agent must be killed");
    assert_eq!(result.exit_code, Some(137));
    assert!(
        wait_until(GRACE + Duration::from_secs(10), || async {
            !is_running(&name)
        })
        .await,
        "container still running after grace"
    );
}

#[tokio::test]
async fn cancel_of_a_cooperative_agent_ends_it_by_abort_and_eof() {
    let (engine, _cleanup) = test_engine(&unique_instance("cancel-coop"));
    let (name, _dir, stdin) = start_for_cancel(&engine, 111).await;
    let (tx, mut rx) = mpsc::channel(64);
    let options = DriveOptions {
        prompt: Some("say started; sleep 120000; say never".into()),
        // The API driver cannot close stdin: its end is the stop, which waits the grace.
        grace: if engine.uses_api() {
            GRACE
        } else {
            Duration::from_secs(30)
        },
        ..DriveOptions::default()
    };
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let eng = engine.clone();
    let nm = name.clone();
    let driver = tokio::spawn(async move {
        agent_driver::drive(
            &eng,
            &nm,
            stdin,
            options,
            async {
                let _ = cancel_rx.await;
            },
            tx,
        )
        .await
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv().await {
            Some(DriverOutput::Event { payload_json, .. }) if payload_json.contains("started") => {
                break
            }
            Some(o) => seen.push(o),
            None => panic!("driver ended early: {seen:?}"),
        }
    }
    cancel_tx.send(()).expect("driver listens");
    let mut rest = Vec::new();
    while let Some(o) = rx.recv().await {
        rest.push(o);
    }
    let result = driver.await.expect("join").expect("drive");
    assert!(result.cancelled);
    if engine.uses_api() {
        // No EOF through the API: the abort ended the script, the runner's stop the agent.
        assert!(result.stopped_by_runner, "{result:?}");
        assert!(
            !result.ended_by_runner_at_handshake,
            "a cancel is not a handshake end"
        );
    } else {
        assert!(!result.killed_after_grace, "the agent honours abort + EOF");
        assert_eq!(result.exit_code, Some(0));
    }
    assert!(!rest.iter().any(
        |o| matches!(o, DriverOutput::Event { payload_json, .. } if payload_json.contains("never"))
    ));
    assert!(
        !result.saw_session_idle,
        "an aborted run emits no session_idle"
    );
    assert!(!is_running(&name));
}

#[tokio::test]
async fn reattach_after_the_driver_dies_collects_the_rest() {
    let (engine, _cleanup) = test_engine(&unique_instance("reattach"));
    let run_dir = tempfile::tempdir().expect("run dir");
    let name = engine
        .create(&spec(112, LaunchKind::CodingAgent, None), run_dir.path())
        .await
        .expect("create");
    let stdin = agent_driver::start(&engine, &name, run_dir.path(), true)
        .await
        .expect("start");
    // First driver: sees the first part, then dies (its task is aborted mid-run).
    let (tx, mut rx) = mpsc::channel(64);
    let options = DriveOptions {
        prompt: Some(r#"say one; sleep 2500; say two; finish completed "after reattach""#.into()),
        grace: GRACE,
        ..DriveOptions::default()
    };
    let eng = engine.clone();
    let nm = name.clone();
    let first = tokio::spawn(async move {
        agent_driver::drive(&eng, &nm, stdin, options, std::future::pending::<()>(), tx).await
    });
    let mut last_stdout_line;
    loop {
        match rx.recv().await {
            Some(DriverOutput::Event {
                event_type,
                payload_json,
                line,
            }) if event_type == "stdout" => {
                last_stdout_line = line;
                if payload_json.contains("\"one\"") {
                    break;
                }
            }
            Some(_) => {}
            None => panic!("first driver ended early"),
        }
    }
    first.abort();
    let _ = first.await;
    drop(rx);
    assert!(
        is_running(&name),
        "the agent keeps running without a driver"
    );

    // Second driver: re-opens stdin and skips what was seen.
    let stdin = StdinChannel::reattach(&engine, &name, run_dir.path()).await;
    assert!(stdin.is_some(), "the stdin holder survives the driver");
    let (tx, mut rx) = mpsc::channel(64);
    let collector = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(o) = rx.recv().await {
            all.push(o);
        }
        all
    });
    let options = DriveOptions {
        prompt: None,
        grace: GRACE,
        skip_stdout_lines: last_stdout_line,
        ..DriveOptions::default()
    };
    let result = agent_driver::drive(
        &engine,
        &name,
        stdin,
        options,
        std::future::pending::<()>(),
        tx,
    )
    .await
    .expect("re-attached drive");
    let outputs = collector.await.expect("collector");
    let texts: Vec<String> = outputs
        .iter()
        .filter_map(|o| match o {
            DriverOutput::Event {
                event_type,
                payload_json,
                ..
            } if event_type == "stdout" => Some(payload_json.clone()),
            _ => None,
        })
        .collect();
    assert!(
        !texts.iter().any(|t| t.contains("\"one\"")),
        "no duplicates: {texts:?}"
    );
    assert!(texts.iter().any(|t| t.contains("\"two\"")), "{texts:?}");
    assert!(outputs.contains(&DriverOutput::Signal(AgentSignal::Finish {
        outcome: "completed".into(),
        summary: "after reattach".into()
    })));
    assert!(result.saw_session_idle);
    // Abort + EOF through the re-opened stdin let the agent exit by itself.
    assert_eq!(result.judged_exit_code(), Some(0));
    assert!(!result.killed_after_grace);
}

/// The journal budget's crash path (docs/journal.md): a replay asked to `resignal_skipped`
/// reports the signals of the skipped stdout lines exactly as the live reader saw them, and
/// no event of a skipped line (nothing is sent twice); without it, skipped lines yield nothing.
#[tokio::test]
async fn a_replay_resignals_skipped_lines_without_their_events() {
    let (engine, _cleanup) = test_engine(&unique_instance("resignal"));
    let driven = run_script(
        &engine,
        &spec(112, LaunchKind::CodingAgent, None),
        r#"error first; raw "not json"; error second; finish completed "the end"; say after"#,
        GRACE,
    )
    .await;
    assert_eq!(
        driven.result.judged_exit_code(),
        Some(0),
        "{:?}",
        driven.outputs
    );
    let live = driven.signals();
    assert!(live.len() >= 5, "{live:?}");
    let lines = driven.result.stdout_lines;

    let replayed = |resignal: bool| {
        let engine = engine.clone();
        let name = driven.name.clone();
        async move {
            let (tx, mut rx) = mpsc::channel(1024);
            let counts = agent_driver::replay(&engine, &name, lines, 0, resignal, tx)
                .await
                .expect("replay");
            let mut all = Vec::new();
            while let Some(o) = rx.recv().await {
                all.push(o);
            }
            (counts, all)
        }
    };
    let (counts, outputs) = replayed(true).await;
    assert_eq!(counts.0, lines);
    let stdout_events = outputs
        .iter()
        .filter(|o| matches!(o, DriverOutput::Event { event_type, .. } if event_type == "stdout"))
        .count();
    assert_eq!(stdout_events, 0, "no event of a skipped line: {outputs:?}");
    let signals: Vec<AgentSignal> = outputs
        .iter()
        .filter_map(|o| match o {
            DriverOutput::Signal(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(signals, live, "the same signals, in order");

    let (_, outputs) = replayed(false).await;
    assert!(
        !outputs.iter().any(|o| matches!(o, DriverOutput::Signal(_))),
        "{outputs:?}"
    );
}

/// Through the API driver stdin stays open across clients (StdinOnce=false), so a finished
/// session is ended by a stop. The test agent is deaf to SIGTERM as PID 1; with the engine's
/// init as PID 1 it gets the SIGTERM and ends with 143 at once, instead of the SIGKILL (137)
/// after the stop's grace.
#[tokio::test]
async fn the_stop_ending_a_session_reaches_the_agent_through_the_engines_init() {
    let (engine, _cleanup) = test_engine(&unique_instance("init"));
    if !engine.uses_api() || !engine.runs_init().await {
        eprintln!("skipped: only the API driver on an engine with an init (Docker) runs one");
        return;
    }
    let driven = run_script(
        &engine,
        &spec(120, LaunchKind::CodingAgent, None),
        r#"finish completed "done""#,
        Duration::from_secs(30),
    )
    .await;
    let r = &driven.result;
    assert!(r.saw_session_idle && r.stopped_by_runner, "{r:?}");
    assert_eq!(r.exit_code, Some(143), "SIGTERM, not the SIGKILL: {r:?}");
    assert!(
        r.ended_by_runner_at_handshake && !r.killed_after_grace,
        "{r:?}"
    );
    assert_eq!(r.judged_exit_code(), Some(0));
}
