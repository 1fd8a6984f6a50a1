//! The container session's real code (start, re-attach, the driver, the exit as judged,
//! replay, `RunOutput`) over the in-memory engine: no Docker. What these prove is the
//! session's and the driver's logic; the engine's own behaviour is proved against real
//! engines by tests/container_*.rs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::effects::container::{ContainerSpec, LaunchKind};
use crate::effects::engine::ContainerEngine;
use crate::effects::mem_engine::{AgentEnd, AgentScript, MemEngine, KILLED, MEM_IMAGE};
use crate::fsm::contract::AgentSignal;

const INSTANCE: &str = "t";
const PROMPT: &str = "fix the bug";
const GRACE: Duration = Duration::from_secs(3);

fn spec(run_id: i64, attempt: u32) -> ContainerSpec {
    ContainerSpec {
        run_id,
        attempt,
        kind: LaunchKind::CodingAgent,
        image: MEM_IMAGE.into(),
        env: BTreeMap::new(),
        checkout: None,
        extra_args: Vec::new(),
    }
}

fn launch(run_id: i64) -> Launch<'static> {
    Launch {
        spec: spec(run_id, 1),
        job_image: "",
        coding: true,
        prompt: PROMPT,
    }
}

fn prompt_line() -> String {
    serde_json::json!({"type": "prompt", "message": PROMPT}).to_string()
}

/// The container name and private directory of `run_id`'s first attempt under `root`.
fn container(root: &tempfile::TempDir, run_id: i64) -> (String, PathBuf) {
    let name = container_name(INSTANCE, run_id, 1);
    let dir = root.path().join(&name);
    (name, dir)
}

fn options() -> DriveOptions {
    DriveOptions {
        grace: GRACE,
        ..DriveOptions::default()
    }
}

/// Everything a driver or a replay sends, once its sender is gone.
fn collect(mut rx: mpsc::Receiver<DriverOutput>) -> tokio::task::JoinHandle<Vec<DriverOutput>> {
    tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(output) = rx.recv().await {
            all.push(output);
        }
        all
    })
}

/// The (stream, line number, payload) of each event.
fn events(outputs: &[DriverOutput]) -> Vec<(String, u64, String)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            DriverOutput::Event {
                event_type,
                payload_json,
                line,
            } => Some((event_type.clone(), *line, payload_json.clone())),
            _ => None,
        })
        .collect()
}

fn signals(outputs: &[DriverOutput]) -> Vec<AgentSignal> {
    outputs
        .iter()
        .filter_map(|o| match o {
            DriverOutput::Signal(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// Starts `run_id`'s container through the session and drives it to its end.
async fn start_and_drive(
    engine: &MemEngine,
    root: &tempfile::TempDir,
    run_id: i64,
) -> (String, Result<DriveResult, String>, Vec<DriverOutput>) {
    let (name, dir) = container(root, run_id);
    let stdin = start(engine, &name, &dir, launch(run_id))
        .await
        .expect("started");
    let (tx, rx) = mpsc::channel(1024);
    let outputs = collect(rx);
    let mut driver = Driver::spawn(engine, &name, stdin, options(), tx);
    let result = driver.ended().await;
    (name, result, outputs.await.expect("collector"))
}

#[tokio::test(start_paused = true)]
async fn the_prompt_is_written_once_and_a_reattach_does_not_repeat_it() {
    let engine = MemEngine::new(INSTANCE);
    engine.script_run(1, AgentScript::finishing("completed", "done"));
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 1);
    let stdin = start(&engine, &name, &dir, launch(1))
        .await
        .expect("started");
    assert_eq!(engine.stdin_lines(&name), [prompt_line()]);
    assert!(
        dir.join(PROMPT_SENT_FILE).exists(),
        "the prompt is recorded"
    );
    // The runner dies: its handle goes, the container's stdin stays open.
    drop(stdin);
    assert!(!engine.stdin_closed(&name));

    let attached = reattach(&engine, 1, &name, &dir, true, PROMPT).await;
    assert!(
        attached.stdin.is_some(),
        "the agent's stdin is attached again"
    );
    assert_eq!(attached.skip, (0, 0));
    assert_eq!(engine.stdin_lines(&name), [prompt_line()], "not repeated");

    let (tx, rx) = mpsc::channel(1024);
    let outputs = collect(rx);
    let mut driver = Driver::spawn(&engine, &name, attached.stdin, options(), tx);
    let result = driver.ended().await;
    let outputs = outputs.await.expect("collector");
    assert_eq!(
        engine.prompts_sent(&name),
        1,
        "{:?}",
        engine.stdin_lines(&name)
    );
    assert!(signals(&outputs).contains(&AgentSignal::SessionIdle));
    assert_eq!(
        exit_event(&engine, 1, &name, result).await,
        Event::ContainerExited { code: Some(0) }
    );
}

#[tokio::test(start_paused = true)]
async fn a_reattach_writes_the_prompt_a_dead_runner_never_wrote() {
    let engine = MemEngine::new(INSTANCE);
    engine.script_run(2, AgentScript::finishing("completed", "done"));
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 2);
    // The previous process created and started the container, then died before the prompt.
    create_private_dir(&dir).expect("dir");
    engine.create(&spec(2, 1), &dir).await.expect("create");
    engine.start(&name).await.expect("start");
    assert!(engine.stdin_lines(&name).is_empty());

    let attached = reattach(&engine, 2, &name, &dir, true, PROMPT).await;
    assert!(attached.stdin.is_some());
    assert_eq!(engine.stdin_lines(&name), [prompt_line()]);
    assert!(dir.join(PROMPT_SENT_FILE).exists());
    // A second re-attach (another crash) finds the record and writes nothing.
    drop(attached);
    let again = reattach(&engine, 2, &name, &dir, true, PROMPT).await;
    assert!(again.stdin.is_some());
    assert_eq!(engine.stdin_lines(&name), [prompt_line()]);
}

#[tokio::test(start_paused = true)]
async fn a_reattach_that_cannot_write_the_prompt_kills_the_container() {
    let engine = MemEngine::new(INSTANCE);
    engine.script_run(3, AgentScript::default().ending(AgentEnd::Never));
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 3);
    create_private_dir(&dir).expect("dir");
    engine.create(&spec(3, 1), &dir).await.expect("create");
    engine.start(&name).await.expect("start");
    // Its stdin closed before any prompt (say the holder died): the agent would wait forever.
    engine
        .attach_stdin(&name, &dir)
        .await
        .expect("attach")
        .close()
        .await;

    let attached = reattach(&engine, 3, &name, &dir, true, PROMPT).await;
    assert!(attached.stdin.is_none());
    assert_eq!(
        engine.state(&name).await.expect("state"),
        Some(ContainerState::Exited {
            code: KILLED,
            oom_killed: false
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_finish_line_yields_its_signal_and_an_exit_code_0_event() {
    let engine = MemEngine::new(INSTANCE);
    engine.script_run(4, AgentScript::finishing("completed", "all green"));
    let root = tempfile::tempdir().expect("tempdir");
    let (name, result, outputs) = start_and_drive(&engine, &root, 4).await;
    let r = result.clone().expect("driven");
    assert_eq!(r.exit_code, Some(0));
    assert!(r.saw_session_idle && r.saw_contract_event);
    assert!(!r.cancelled && !r.killed_after_grace && !r.output_limit_hit);
    assert_eq!(r.stdout_lines, 3);
    assert_eq!(
        signals(&outputs),
        [
            AgentSignal::Event {
                event_type: "starting".into()
            },
            AgentSignal::Finish {
                outcome: "completed".into(),
                summary: "all green".into()
            },
            AgentSignal::SessionIdle,
        ]
    );
    let lines: Vec<u64> = events(&outputs).iter().map(|e| e.1).collect();
    assert_eq!(lines, [1, 2, 3]);
    // The handshake: the abort after session_idle (stdout still open), then EOF.
    assert_eq!(
        engine.stdin_lines(&name),
        [prompt_line(), r#"{"type":"abort"}"#.to_owned()]
    );
    assert!(engine.stdin_closed(&name));
    assert_eq!(
        exit_event(&engine, 4, &name, result).await,
        Event::ContainerExited { code: Some(0) }
    );
}

#[tokio::test(start_paused = true)]
async fn stop_agent_ends_an_agent_that_never_exits_within_the_grace() {
    let engine = MemEngine::new(INSTANCE);
    engine.script_run(
        5,
        AgentScript::default()
            .stdout(r#"{"type":"starting"}"#)
            .ending(AgentEnd::Never)
            .ignoring_term(),
    );
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 5);
    let stdin = start(&engine, &name, &dir, launch(5))
        .await
        .expect("started");
    let (tx, mut rx) = mpsc::channel(1024);
    let mut driver = Driver::spawn(&engine, &name, stdin, options(), tx);
    match rx.recv().await {
        Some(DriverOutput::Event { payload_json, .. }) => {
            assert!(payload_json.contains("starting"))
        }
        other => panic!("expected the agent's first line, got {other:?}"),
    }
    let asked = tokio::time::Instant::now();
    driver.stop_agent();
    driver.stop_agent(); // once is enough; twice is harmless
    let result = tokio::time::timeout(GRACE * 10, driver.ended())
        .await
        .expect("the stop ends the agent");
    let took = asked.elapsed();
    let r = result.clone().expect("driven");
    assert!(
        r.cancelled && r.stopped_by_runner && r.killed_after_grace,
        "{r:?}"
    );
    assert_eq!(r.exit_code, Some(KILLED));
    assert!(!r.ended_by_runner_at_handshake);
    assert!(took >= GRACE && took < GRACE * 2, "took {took:?}");
    assert_eq!(
        engine.stdin_lines(&name).last().map(String::as_str),
        Some(r#"{"type":"abort"}"#)
    );
    assert_eq!(
        exit_event(&engine, 5, &name, result).await,
        Event::ContainerExited { code: Some(KILLED) }
    );
}

#[tokio::test(start_paused = true)]
async fn stop_agent_of_an_agent_that_honours_sigterm_takes_no_grace() {
    let engine = MemEngine::new(INSTANCE);
    engine.script_run(
        6,
        AgentScript::default()
            .stdout(r#"{"type":"starting"}"#)
            .ending(AgentEnd::Never),
    );
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 6);
    let stdin = start(&engine, &name, &dir, launch(6))
        .await
        .expect("started");
    let (tx, mut rx) = mpsc::channel(1024);
    let mut driver = Driver::spawn(&engine, &name, stdin, options(), tx);
    assert!(rx.recv().await.is_some());
    let asked = tokio::time::Instant::now();
    driver.stop_agent();
    let r = tokio::time::timeout(GRACE * 10, driver.ended())
        .await
        .expect("the stop ends the agent")
        .expect("driven");
    assert!(asked.elapsed() < GRACE, "{:?}", asked.elapsed());
    assert!(r.cancelled && !r.killed_after_grace, "{r:?}");
    assert_eq!(r.exit_code, Some(crate::effects::mem_engine::TERMINATED));
}

#[tokio::test(start_paused = true)]
async fn a_replay_after_a_crash_resumes_after_the_saved_progress() {
    let engine = MemEngine::new(INSTANCE);
    let finish = r#"{"type":"finish","outcome":"completed","summary":"ok"}"#;
    engine.script_run(
        7,
        AgentScript::default()
            .stdout(finish)
            .stdout("two")
            .stdout("three")
            .stdout("four")
            .stderr("warned")
            .ending(AgentEnd::Exit(0)),
    );
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 7);
    // The agent ran to its end while the runner that started it died: nothing was driven.
    let stdin = start(&engine, &name, &dir, launch(7))
        .await
        .expect("started");
    drop(stdin);
    assert_eq!(engine.wait_exit(&name).await.expect("wait"), Some(0));
    // The dead process had stdout lines 1-2 and stderr line 1 answered by the server.
    let mut saved = Progress::load(&dir);
    saved.forwarded("stdout", 1, 1);
    saved.forwarded("stdout", 2, 2);
    saved.forwarded("stderr", 1, 3);
    saved.save_delivered(3);
    let progress = Progress::load(&dir);
    assert_eq!((progress.stdout, progress.stderr), (2, 1));

    let (tx, rx) = mpsc::channel(1024);
    let outputs = collect(rx);
    let reader = spawn_replay(&engine, &name, &progress, false, tx);
    replay_ended(reader, 7, &name).await;
    let outputs = outputs.await.expect("collector");
    assert_eq!(
        events(&outputs),
        [
            ("stdout".into(), 3, r#"{"line":"three"}"#.into()),
            ("stdout".into(), 4, r#"{"line":"four"}"#.into()),
        ],
        "resumes after the saved progress and repeats nothing"
    );
    assert!(signals(&outputs).is_empty(), "the finish was read before");

    // With the signals of the skipped lines folded again: the finish, never its event.
    let (tx, rx) = mpsc::channel(1024);
    let outputs = collect(rx);
    let reader = spawn_replay(&engine, &name, &progress, true, tx);
    replay_ended(reader, 7, &name).await;
    let outputs = outputs.await.expect("collector");
    assert_eq!(events(&outputs).len(), 2);
    assert_eq!(
        signals(&outputs),
        [AgentSignal::Finish {
            outcome: "completed".into(),
            summary: "ok".into()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_flooding_past_the_output_limit_is_killed_and_reported() {
    let limit = 4096;
    let engine = MemEngine::with_limit(INSTANCE, limit);
    let mut flood = AgentScript::default().ending(AgentEnd::Never);
    for i in 0..200 {
        flood = flood.stdout(format!("{i:03} {}", "x".repeat(96)));
    }
    engine.script_run(8, flood);
    let root = tempfile::tempdir().expect("tempdir");
    let (name, result, outputs) = start_and_drive(&engine, &root, 8).await;
    let r = result.clone().expect("driven");
    assert!(r.output_limit_hit && r.stream_degraded, "{r:?}");
    // The meter's kill ended it, not the driver's kill after the grace.
    assert!(!r.killed_after_grace, "{r:?}");
    assert_eq!(r.exit_code, Some(KILLED));
    let limit_errors = signals(&outputs)
        .into_iter()
        .filter(|s| {
            matches!(s, AgentSignal::Error { message } if message.contains("WSRUNNER_AGENT_OUTPUT_LIMIT"))
        })
        .count();
    assert_eq!(limit_errors, 1);
    assert!(outputs
        .iter()
        .any(|o| matches!(o, DriverOutput::StreamDegraded { .. })));
    let forwarded = events(&outputs);
    let bytes: usize = forwarded.iter().map(|e| e.2.len()).sum();
    assert!(
        forwarded.len() < 60 && bytes < 2 * limit as usize,
        "{} events, {bytes} bytes forwarded",
        forwarded.len()
    );
    assert!(forwarded
        .last()
        .is_some_and(|e| e.2.contains("[runner]") && e.2.contains("WSRUNNER_AGENT_OUTPUT_LIMIT")));
    assert_eq!(
        exit_event(&engine, 8, &name, result).await,
        Event::ContainerExited { code: Some(KILLED) }
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_drive_is_judged_by_the_engine_state() {
    let engine = MemEngine::new(INSTANCE);
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 9);
    create_private_dir(&dir).expect("dir");
    engine.create(&spec(9, 1), &dir).await.expect("create");
    engine.start(&name).await.expect("start");
    engine.exit(&name, 3);
    assert_eq!(
        exit_event(&engine, 9, &name, Err("lost".into())).await,
        Event::ContainerExited { code: Some(3) }
    );
    engine.remove(&name).await.expect("remove");
    assert_eq!(
        exit_event(&engine, 9, &name, Err("lost".into())).await,
        Event::ContainerVanished
    );
    // A driver that finds the container gone fails, which is judged the same.
    let (tx, _rx) = mpsc::channel(16);
    let mut driver = Driver::spawn(&engine, &name, None, options(), tx);
    let result = driver.ended().await;
    assert!(result.is_err());
    assert_eq!(
        exit_event(&engine, 9, &name, result).await,
        Event::ContainerVanished
    );
}

#[tokio::test(start_paused = true)]
async fn a_start_that_fails_leaves_no_container_and_no_private_dir() {
    let engine = MemEngine::new(INSTANCE);
    let root = tempfile::tempdir().expect("tempdir");
    let (name, dir) = container(&root, 10);
    let refused = Launch {
        job_image: "other-agent:9",
        ..launch(10)
    };
    let err = start(&engine, &name, &dir, refused)
        .await
        .err()
        .expect("refused");
    assert!(err.contains("allowlist"), "{err}");
    assert!(engine.containers().is_empty() && !dir.exists());
    // A coding job without a prompt is refused before anything is created.
    let blank = Launch {
        prompt: " ",
        ..launch(10)
    };
    let err = start(&engine, &name, &dir, blank)
        .await
        .err()
        .expect("refused");
    assert!(err.contains("InitialPrompt"), "{err}");
    assert!(engine.containers().is_empty() && !dir.exists());
}

/// A stand-in for the server's events endpoint: answers every call `{"ok":true}`, once
/// `open`; keeps the request bodies.
pub(crate) struct EventsServer {
    pub(crate) url: String,
    pub(crate) open: Arc<AtomicBool>,
    pub(crate) received: Arc<AtomicUsize>,
    pub(crate) bodies: Arc<std::sync::Mutex<Vec<String>>>,
}

pub(crate) async fn events_server() -> EventsServer {
    let open = Arc::new(AtomicBool::new(true));
    let received = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (gate, count, kept) = (open.clone(), received.clone(), bodies.clone());
    let app = axum::Router::new().fallback(move |body: String| {
        let (gate, count, kept) = (gate.clone(), count.clone(), kept.clone());
        async move {
            while !gate.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            count.fetch_add(1, Ordering::SeqCst);
            kept.lock().unwrap_or_else(|e| e.into_inner()).push(body);
            axum::Json(serde_json::json!({"ok": true}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    EventsServer {
        url: format!("http://{addr}/api"),
        open,
        received,
        bodies,
    }
}

async fn run_output(engine: &MemEngine, run_id: i64, root: &tempfile::TempDir) -> RunOutput {
    let server = events_server().await;
    run_output_to(engine, run_id, root, &server)
}

fn run_output_to(
    engine: &MemEngine,
    run_id: i64,
    root: &tempfile::TempDir,
    server: &EventsServer,
) -> RunOutput {
    use crate::control::client::{Client, ClientConfig};
    use crate::control::events::{EventSender, EventSenderConfig};
    let mut cfg = ClientConfig::new(server.url.clone());
    cfg.allow_insecure = true;
    let client = Client::new(cfg).expect("client");
    client.set_credential("wsrc_session_test");
    let sender = EventSender::new(client, EventSenderConfig::default());
    RunOutput::new(
        run_id,
        sender.open_run(run_id),
        engine.shared(),
        root.path().to_owned(),
    )
}

// Real time from here: the events go over a socket.

#[tokio::test]
async fn a_stopped_container_stays_until_its_output_is_delivered() {
    let engine = MemEngine::new(INSTANCE);
    engine.script_run(11, AgentScript::finishing("completed", "done"));
    let root = tempfile::tempdir().expect("tempdir");
    let server = events_server().await;
    let mut output = run_output_to(&engine, 11, &root, &server);
    let (name, dir) = container(&root, 11);
    assert_eq!(output.container_dir(&name), dir);
    let stdin = start(&engine, &name, &dir, launch(11))
        .await
        .expect("started");
    // The server holds the events: they are not delivered when the container stops.
    server.open.store(false, Ordering::SeqCst);
    let (tx, mut rx) = mpsc::channel(1024);
    let mut driver = Driver::spawn(&engine, &name, stdin, options(), tx);
    let mut progress = Progress::load(&dir);
    while let Some(o) = rx.recv().await {
        output.forward(o, &mut progress).await;
    }
    driver.ended().await.expect("driven");
    output.container_done(&name, progress).await;
    assert_eq!(
        engine.containers(),
        std::slice::from_ref(&name),
        "its logs are the only copy"
    );
    assert!(dir.exists());

    server.open.store(true, Ordering::SeqCst);
    output.finish_events().expect("events").await;
    assert_eq!(server.received.load(Ordering::SeqCst), 3);
    assert_eq!(read_progress(&dir), (0, 0), "saved only when answered");
    output.settle().await;
    assert!(engine.containers().is_empty());
    assert_eq!(engine.removed(), [name]);
    assert!(!dir.exists());
}

#[tokio::test]
async fn finish_terminal_removes_every_attempt_of_the_run_and_its_files() {
    let engine = MemEngine::new(INSTANCE);
    let root = tempfile::tempdir().expect("tempdir");
    let mut output = run_output(&engine, 12, &root).await;
    for attempt in [1, 2] {
        let name = container_name(INSTANCE, 12, attempt);
        let dir = root.path().join(&name);
        create_private_dir(&dir).expect("dir");
        engine
            .create(&spec(12, attempt), &dir)
            .await
            .expect("create");
    }
    // Another run's container and an attempt whose container is gone, files left behind.
    let other = container_name(INSTANCE, 13, 1);
    engine
        .create(&spec(13, 1), root.path())
        .await
        .expect("create");
    let gone = root.path().join(container_name(INSTANCE, 12, 3));
    create_private_dir(&gone).expect("dir");
    let unrelated = root.path().join(container_name(INSTANCE, 120, 1));
    create_private_dir(&unrelated).expect("dir");

    output.finish_terminal().await;
    assert_eq!(engine.containers(), [other]);
    assert!(!gone.exists());
    assert!(unrelated.exists(), "run 120 is not run 12");
    for attempt in [1, 2] {
        assert!(!root
            .path()
            .join(container_name(INSTANCE, 12, attempt))
            .exists());
    }
}
