//! The JSONL agent driver (spec 5.4 and 6): writes the prompt, turns the container's output
//! into `stdout`/`stderr` events and [`AgentSignal`]s, and runs the shutdown handshake
//! (abort, stdin close, grace, kill). It decides no verdict: the caller folds the signals and
//! the [`DriveResult`] into one with `crate::fsm`.
//!
//! It reaches the engine only through [`ContainerEngine`] (`effects::engine`).
//!
//! Re-attach design (docs/containers.md), two engine drivers behind
//! [`Engine`](super::container::Engine):
//! - API driver: the container is created with stdin open and `StdinOnce=false`, so stdin is
//!   never closed by a client going away. Stdin is an attach connection in this process; a
//!   re-attached runner simply attaches again. Output is a logs stream in this process. The
//!   runner cannot close stdin, so the handshake's "close stdin" is a stop (SIGTERM, SIGKILL
//!   after the grace), and [`DriveResult::ended_by_runner_at_handshake`] tells the caller when
//!   that stop ended an agent that had finished its session.
//! - CLI driver: `create -i` (stdin closed for good when the attached client goes); stdin is
//!   held by a detached `<docker> attach` process reading a FIFO in the run's private
//!   directory, so a new runner process can open the FIFO again. Closing stdin = killing it.
//!
//! Both read the output from the container's start, so a re-attached driver skips the lines it
//! already saw, counted per stream.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::container::{ContainerError, ContainerState, LINE_OVERHEAD};
use super::engine::{ContainerEngine, Logs, OutputStream, StdinPort};
use crate::fsm::contract::{classify_stdout_line, AgentSignal};
use crate::redact::redact;

/// The line limit of spec 5.4 (a line, newline included, may not exceed it).
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Grace between stdin close (or a stop request) and the kill (spec 6.4).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// The stop's grace after `session_idle` (API driver), at most [`DriveOptions::grace`]: the
/// session is over, so an agent that is PID 1 without a SIGTERM handler (deaf to SIGTERM) is
/// not kept the whole grace for nothing; a contract agent exits on SIGTERM at once, as it
/// would on the EOF the CLI driver sends. A cancel or a degraded stream keeps the full grace.
pub const IDLE_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for the container to leave `created` after start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the output readers may take to finish once the container stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What the driver tells its caller, in the order the lines arrived per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverOutput {
    /// An event for the server: `event_type` is `stdout` or `stderr`, `payload_json` the agent's
    /// JSON line verbatim or `{"line":"<raw>"}` (spec 5.4). `line` is the 1-based raw line
    /// number in its stream: journal the highest seen to re-attach without duplicates.
    Event {
        event_type: String,
        payload_json: String,
        line: u64,
    },
    /// A verdict-relevant fact from a stdout line (follows that line's `Event`).
    Signal(AgentSignal),
    /// A line exceeded [`MAX_LINE_BYTES`]; the stream's rest is drained and discarded.
    StreamDegraded { stream: String },
}

/// How to drive one container.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// The prompt to send once at start (`None` on a re-attach after it was sent).
    pub prompt: Option<String>,
    /// Grace before the kill (spec 6.4: 10 s).
    pub grace: Duration,
    /// Raw lines of each stream already seen by an earlier driver (re-attach).
    pub skip_stdout_lines: u64,
    pub skip_stderr_lines: u64,
    /// Report the signals (only the signals, no events) of the skipped stdout lines too: the
    /// caller coalesced signals in memory that died with the previous process, and folds the
    /// whole stream again (docs/journal.md, "Agent output budget").
    pub resignal_skipped: bool,
    /// Written just before the API driver's stop ends the handshake after `session_idle` or a
    /// degraded stream: a runner that dies before harvesting the exit leaves it for recovery,
    /// which then judges the stop's exit code as this driver would (see
    /// [`DriveResult::ended_by_runner_at_handshake`]).
    pub handshake_marker: Option<PathBuf>,
}

/// The file name of [`DriveOptions::handshake_marker`] in a run's container directory.
pub const HANDSHAKE_STOP_FILE: &str = "handshake-stop";

impl Default for DriveOptions {
    fn default() -> Self {
        DriveOptions {
            prompt: None,
            grace: DEFAULT_GRACE,
            skip_stdout_lines: 0,
            skip_stderr_lines: 0,
            resignal_skipped: false,
            handshake_marker: None,
        }
    }
}

/// What happened, for the verdict (spec 6.5) and the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriveResult {
    /// The container's exit code; `None` when it could not be learned (container gone).
    pub exit_code: Option<i32>,
    /// The run was cancelled (the caller's cancel future completed first).
    pub cancelled: bool,
    /// A line over 1 MiB degraded a stream (verdict row 3).
    pub stream_degraded: bool,
    /// A stdout line with a non-empty `type` was seen (verdict row 2), this session.
    pub saw_contract_event: bool,
    /// `session_idle` arrived.
    pub saw_session_idle: bool,
    /// The runner (or the engine's stop) killed the container after the grace period: it
    /// hung. Not set for an end at the handshake (see `ended_by_runner_at_handshake`).
    pub killed_after_grace: bool,
    /// The kernel killed it for memory.
    pub oom_killed: bool,
    /// Writing the prompt failed (the container was killed; spec 6.1: the run fails).
    pub prompt_error: Option<String>,
    /// Raw lines seen per stream, skipped ones included (the re-attach resume point).
    pub stdout_lines: u64,
    pub stderr_lines: u64,
    /// The agent printed more than `WSRUNNER_AGENT_OUTPUT_LIMIT`: the runner stopped it.
    pub output_limit_hit: bool,
    /// The runner stopped the running container (cancel, or the API driver's end of the
    /// handshake in place of closing stdin).
    pub stopped_by_runner: bool,
    /// The runner's stop ended the agent at the end of the handshake, after `session_idle` or
    /// a degraded stream (API driver, where the CLI driver closes stdin): the caller judges
    /// the exit as the clean exit the closed stdin would have given (0). Never after a
    /// cancel, the output limit or an OOM kill.
    pub ended_by_runner_at_handshake: bool,
}

impl DriveResult {
    /// The exit code the verdict judges: 0 when the runner's stop ended an agent that had
    /// finished its session ([`DriveResult::ended_by_runner_at_handshake`]), else the real one.
    pub fn judged_exit_code(&self) -> Option<i32> {
        match self.exit_code {
            Some(_) if self.ended_by_runner_at_handshake => Some(0),
            code => code,
        }
    }
}

/// The output budget of one container, shared by its two stream readers: every byte read
/// counts, skipped (already forwarded) lines included, so a re-attach or a replay reading the
/// logs from the start finds the same total; each line costs [`LINE_OVERHEAD`] more.
struct OutputBudget {
    limit: u64,
    used: AtomicU64,
    /// Told once when the budget is first exceeded (the meter then kills the container).
    exceeded: Mutex<Option<oneshot::Sender<()>>>,
    /// The readers report the agent error and the degraded stream themselves (a replay);
    /// while a container runs, its meter does.
    readers_signal: bool,
}

impl OutputBudget {
    fn new(limit: u64, exceeded: Option<oneshot::Sender<()>>, readers_signal: bool) -> Arc<Self> {
        Arc::new(OutputBudget {
            limit,
            used: AtomicU64::new(0),
            exceeded: Mutex::new(exceeded),
            readers_signal,
        })
    }
    /// Charges `cost`; true when this charge crossed the limit.
    fn charge(&self, cost: u64) -> bool {
        let before = self.used.fetch_add(cost, Ordering::Relaxed);
        let crossed = before <= self.limit && before.saturating_add(cost) > self.limit;
        if crossed {
            if let Some(tx) = self.exceeded.lock().ok().and_then(|mut t| t.take()) {
                let _ = tx.send(());
            }
        }
        crossed
    }
    fn over(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.limit
    }
}

/// The message (event and agent error) when the output limit stops a container.
pub fn output_limit_message(limit: u64) -> String {
    format!("the agent printed more than {limit} bytes of output (WSRUNNER_AGENT_OUTPUT_LIMIT); the runner stopped its container and discarded the rest; raise WSRUNNER_AGENT_OUTPUT_LIMIT if this much output is expected")
}

/// The container's stdin as its engine provides it: an attach connection of this process
/// (API driver), a FIFO read by a detached `<docker> attach` process (CLI driver), or a
/// stand-in's.
pub struct StdinChannel {
    port: Box<dyn StdinPort>,
}

impl StdinChannel {
    /// Wraps an engine's stdin.
    pub fn new(port: Box<dyn StdinPort>) -> StdinChannel {
        StdinChannel { port }
    }

    /// Attaches to a running container's stdin through the engine's driver: the API driver
    /// makes a new attach connection; the CLI driver spawns a new holder.
    pub async fn attach(
        engine: &dyn ContainerEngine,
        name: &str,
        run_dir: &Path,
    ) -> io::Result<StdinChannel> {
        engine.attach_stdin(name, run_dir).await
    }

    /// Stdin again after the runner restarted: the API driver attaches again (the container
    /// kept stdin open); the CLI driver finds the holder a previous process left.
    pub async fn reattach(
        engine: &dyn ContainerEngine,
        name: &str,
        run_dir: &Path,
    ) -> Option<StdinChannel> {
        engine.reattach_stdin(name, run_dir).await
    }

    /// Whether closing this channel leaves the container's stdin open (API driver): the
    /// handshake then stops the container instead.
    pub fn survives_close(&self) -> bool {
        self.port.survives_close()
    }

    /// Writes one command line. Fails when nobody reads the stdin any more.
    pub async fn send(&self, line: &str) -> io::Result<()> {
        self.port.send(line).await
    }

    /// CLI driver: closes the container's stdin for good (the agent sees EOF) by ending the
    /// holder. API driver: drops the connection only; the container's stdin stays open.
    pub async fn close(self) {
        self.port.close().await
    }
}

/// Starts a created container and, for `coding_agent`, attaches its stdin.
pub async fn start(
    engine: &dyn ContainerEngine,
    name: &str,
    run_dir: &Path,
    with_stdin: bool,
) -> Result<Option<StdinChannel>, ContainerError> {
    engine.start(name).await?;
    if !with_stdin {
        return Ok(None);
    }
    StdinChannel::attach(engine, name, run_dir)
        .await
        .map(Some)
        .map_err(|e| ContainerError::Api {
            what: format!("attach {name}"),
            detail: format!("could not attach the container's stdin: {e}"),
        })
}

/// What a stream reader found.
#[derive(Default)]
struct StreamStats {
    lines: u64,
    degraded: bool,
    /// The output budget ran out: nothing more of this stream is forwarded.
    limited: bool,
    saw_contract_event: bool,
    saw_session_idle: bool,
}

/// Reads one stream line by line and forwards it (spec 5.4). The first `skip` lines are only
/// counted, unless `resignal`: then a skipped stdout line still yields its signal (and a
/// skipped over-long line the degradation), never its event, and never starts the handshake.
async fn pump(
    stream: &'static str,
    reader: impl AsyncRead + Unpin,
    skip: u64,
    resignal: bool,
    out: mpsc::Sender<DriverOutput>,
    mut idle: Option<oneshot::Sender<bool>>,
    budget: Arc<OutputBudget>,
) -> StreamStats {
    let resignal = resignal && stream == "stdout";
    let mut stats = StreamStats::default();
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut line: Vec<u8> = Vec::new();
    let mut overflowing = false;
    let send = |item: DriverOutput| {
        let out = out.clone();
        async move {
            // A caller that stopped listening must not stall the drain.
            let _ = out.send(item).await;
        }
    };
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let (piece, ends_line) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..=i], true),
            None => (chunk, false),
        };
        let used = piece.len();
        let cost = used as u64 + if ends_line { LINE_OVERHEAD } else { 0 };
        let crossed = budget.charge(cost);
        if !stats.limited && budget.over() {
            stats.limited = true;
            line = Vec::new();
            // Only the reader whose bytes crossed reports, once, and not again for a line
            // an earlier runner already reported (re-attach, replay).
            if crossed && stats.lines >= skip {
                let message = output_limit_message(budget.limit);
                send(DriverOutput::Event {
                    event_type: stream.to_owned(),
                    payload_json: serde_json::json!({ "line": format!("[runner] {message}") })
                        .to_string(),
                    line: stats.lines + 1,
                })
                .await;
                if budget.readers_signal {
                    send(DriverOutput::Signal(AgentSignal::Error { message })).await;
                    send(DriverOutput::StreamDegraded {
                        stream: stream.to_owned(),
                    })
                    .await;
                }
            }
            if let Some(tx) = idle.take() {
                let _ = tx.send(false);
            }
        }
        if !overflowing && !stats.degraded && !stats.limited {
            line.extend_from_slice(piece);
            if line.len() > MAX_LINE_BYTES {
                overflowing = true;
                line = Vec::new();
                if stats.lines >= skip {
                    stats.degraded = true;
                    let message = format!("[runner] {stream} scan aborted: token too long (line over 1 MiB); remaining output will be drained and discarded");
                    send(DriverOutput::Event {
                        event_type: stream.to_owned(),
                        payload_json: serde_json::json!({ "line": message }).to_string(),
                        line: stats.lines + 1,
                    })
                    .await;
                    send(DriverOutput::StreamDegraded {
                        stream: stream.to_owned(),
                    })
                    .await;
                    // Nothing on this stream is read any more, so a later session_idle
                    // would be missed: the run is failed anyway (verdict row 3), so the
                    // handshake starts now instead of waiting for an idle that never comes.
                    if let Some(tx) = idle.take() {
                        let _ = tx.send(false);
                    }
                }
            }
        }
        reader.consume(used);
        if ends_line {
            stats.lines += 1;
            if overflowing {
                overflowing = false; // only a skipped (already reported) long line ends here
            } else if !stats.degraded && !stats.limited {
                let raw = std::mem::take(&mut line);
                if stats.lines > skip {
                    handle_line(stream, &raw, stats.lines, &mut stats, &send, &mut idle).await;
                } else if resignal {
                    resignal_line(&raw, &send).await;
                }
            }
        }
    }
    // A last line without a newline still counts.
    if !line.is_empty() && !stats.degraded && !stats.limited && !overflowing {
        stats.lines += 1;
        let raw = std::mem::take(&mut line);
        if stats.lines > skip {
            handle_line(stream, &raw, stats.lines, &mut stats, &send, &mut idle).await;
        } else if resignal {
            resignal_line(&raw, &send).await;
        }
    }
    stats
}

/// The signal of an already forwarded stdout line, if it has one (see `pump`'s `resignal`).
async fn resignal_line<F, Fut>(raw: &[u8], send: &F)
where
    F: Fn(DriverOutput) -> Fut,
    Fut: Future<Output = ()>,
{
    // The same tests as `handle_line`, so a line yields the same signal both ways.
    if serde_json::from_slice::<serde::de::IgnoredAny>(raw).is_err() {
        return;
    }
    if let Some(signal) = classify_stdout_line(&String::from_utf8_lossy(raw)) {
        send(DriverOutput::Signal(signal)).await;
    }
}

async fn handle_line<F, Fut>(
    stream: &'static str,
    raw: &[u8],
    number: u64,
    stats: &mut StreamStats,
    send: &F,
    idle: &mut Option<oneshot::Sender<bool>>,
) where
    F: Fn(DriverOutput) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut bytes = raw;
    while let [rest @ .., b'\n' | b'\r'] = bytes {
        bytes = rest;
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return; // blank lines are skipped (spec 5.4)
    }
    let text = String::from_utf8_lossy(bytes);
    let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
    let payload = if is_json {
        redact(&text).into_owned()
    } else {
        serde_json::json!({ "line": redact(&text) }).to_string()
    };
    send(DriverOutput::Event {
        event_type: stream.to_owned(),
        payload_json: payload,
        line: number,
    })
    .await;
    if stream == "stdout" && is_json {
        if let Some(signal) = classify_stdout_line(&text) {
            stats.saw_contract_event = true;
            if signal == AgentSignal::SessionIdle {
                stats.saw_session_idle = true;
                if let Some(tx) = idle.take() {
                    let _ = tx.send(true);
                }
            }
            send(DriverOutput::Signal(signal)).await;
        }
    }
}

/// Counts a running container's whole output (a second follow of its logs, both streams, the
/// same cost as the readers: bytes plus [`LINE_OVERHEAD`] a line) and, once past
/// `WSRUNNER_AGENT_OUTPUT_LIMIT`, kills the container and reports the limit as the agent's
/// error and a degraded stream. Returns whether the limit was passed.
async fn meter(
    engine: Arc<dyn ContainerEngine>,
    name: String,
    out: mpsc::Sender<DriverOutput>,
) -> Result<bool, ContainerError> {
    use tokio::io::AsyncReadExt;
    let Logs {
        stdout,
        stderr,
        source,
    } = engine.open_logs(&name, true).await?;
    let (hit_tx, hit_rx) = oneshot::channel();
    let budget = OutputBudget::new(engine.output_limit(), Some(hit_tx), false);
    let count = |mut reader: OutputStream, budget: Arc<OutputBudget>| async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            let lines = buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
            budget.charge(n as u64 + lines * LINE_OVERHEAD);
        }
    };
    // The readers own the budget: when both end without a hit, its sender drops.
    let readers = tokio::spawn(async move {
        tokio::join!(count(stdout, budget.clone()), count(stderr, budget));
    });
    let hit = hit_rx.await.is_ok();
    if hit {
        tracing::warn!(
            container = %name,
            limit = engine.output_limit(),
            "agent output limit (WSRUNNER_AGENT_OUTPUT_LIMIT) exceeded: killing the container"
        );
        engine.kill(&name).await?;
        let message = output_limit_message(engine.output_limit());
        let _ = out
            .send(DriverOutput::Signal(AgentSignal::Error { message }))
            .await;
        let _ = out
            .send(DriverOutput::StreamDegraded {
                stream: "stdout".into(),
            })
            .await;
    }
    // Both pipes are at EOF when the sender is dropped without a hit; after a kill they end
    // once the engine's `logs` notices the stop.
    let _ = readers.await;
    let _ = source.finish().await;
    Ok(hit)
}

/// Reads a stopped container's output again from the start (`<docker> logs`, no follow)
/// through the same line reader as [`drive`], skipping the first `skip_stdout`/`skip_stderr`
/// raw lines of each stream, and sends what it finds to `out` (events, signals and
/// degradation, exactly as the live reader would). Recovery uses it to forward the lines a
/// previous runner read but may not have delivered (docs/daemon.md); the caller decides what
/// to do with the signals; with `resignal_skipped` the skipped stdout lines yield their
/// signals too (see [`DriveOptions::resignal_skipped`]). Returns the raw line counts of both
/// streams.
pub async fn replay(
    engine: &dyn ContainerEngine,
    name: &str,
    skip_stdout: u64,
    skip_stderr: u64,
    resignal_skipped: bool,
    out: mpsc::Sender<DriverOutput>,
) -> Result<(u64, u64), ContainerError> {
    let Logs {
        stdout,
        stderr,
        mut source,
    } = engine.open_logs(name, false).await?;
    // The container is stopped already: an exceeded budget only reports.
    let budget = OutputBudget::new(engine.output_limit(), None, true);
    let stdout_task = tokio::spawn(pump(
        "stdout",
        stdout,
        skip_stdout,
        resignal_skipped,
        out.clone(),
        None,
        budget.clone(),
    ));
    let stderr_task = tokio::spawn(pump(
        "stderr",
        stderr,
        skip_stderr,
        false,
        out,
        None,
        budget,
    ));
    let read = async {
        let stdout = stdout_task.await.unwrap_or_default();
        let stderr = stderr_task.await.unwrap_or_default();
        (stdout.lines, stderr.lines)
    };
    let Ok(lines) = tokio::time::timeout(DRAIN_TIMEOUT, read).await else {
        source.kill().await;
        return Err(ContainerError::Timeout {
            docker: engine.program().to_owned(),
            what: format!("logs {name}"),
            secs: DRAIN_TIMEOUT.as_secs(),
        });
    };
    if let Err(detail) = source.finish().await {
        return Err(ContainerError::Api {
            what: format!("logs {name}"),
            detail,
        });
    }
    Ok((lines.0.max(skip_stdout), lines.1.max(skip_stderr)))
}

/// Drives a started container to its end: prompt, output, handshake, exit code (spec 6.4).
/// `stdin` is `None` for container kinds (spec 5.2) or when the stdin holder is gone. When
/// `cancel` completes first, the run is aborted. The container is left in place (stopped):
/// the caller removes it after recording the result.
pub async fn drive(
    engine: &dyn ContainerEngine,
    name: &str,
    stdin: Option<StdinChannel>,
    options: DriveOptions,
    cancel: impl Future<Output = ()>,
    out: mpsc::Sender<DriverOutput>,
) -> Result<DriveResult, ContainerError> {
    let mut result = DriveResult::default();
    // `logs --follow` on a container that never started would end at once.
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        match engine.state(name).await? {
            Some(ContainerState::Created) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(ContainerState::Created) => {
                return Err(ContainerError::Cli {
                    docker: engine.program().to_owned(),
                    what: format!("start {name}"),
                    detail: "the container did not start within 60 s".into(),
                })
            }
            None => {
                return Err(ContainerError::Cli {
                    docker: engine.program().to_owned(),
                    what: format!("logs {name}"),
                    detail: "the container is gone".into(),
                })
            }
            Some(_) => break,
        }
    }
    let Logs {
        stdout,
        stderr,
        source: mut logs,
    } = engine.open_logs(name, true).await?;
    let (idle_tx, idle_rx) = oneshot::channel();
    // The forwarding readers go at the pace the server takes events; the meter reads the
    // same output at full speed, so the limit holds on what the agent writes.
    let budget = OutputBudget::new(engine.output_limit(), None, false);
    let meter_task = tokio::spawn(meter(engine.shared(), name.to_owned(), out.clone()));
    let mut stdout_task = tokio::spawn(pump(
        "stdout",
        stdout,
        options.skip_stdout_lines,
        options.resignal_skipped,
        out.clone(),
        Some(idle_tx),
        budget.clone(),
    ));
    let stderr_task = tokio::spawn(pump(
        "stderr",
        stderr,
        options.skip_stderr_lines,
        false,
        out.clone(),
        None,
        budget.clone(),
    ));

    let mut prompt_failed = false;
    if let Some(prompt) = &options.prompt {
        let line = serde_json::json!({"type": "prompt", "message": prompt}).to_string();
        let sent = match &stdin {
            Some(channel) => channel.send(&line).await,
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the container has no stdin attached",
            )),
        };
        if let Err(e) = sent {
            result.prompt_error = Some(format!("writing the prompt to the agent failed: {e}"));
            prompt_failed = true;
            engine.kill(name).await?;
        }
    }

    // Wait for session_idle, cancellation or stdout EOF (spec 6.4 step 1).
    let mut stdout_stats = None;
    // The handshake started on the agent's session_idle (true) or on a degraded stream.
    let mut idle_fired = false;
    let mut session_idle = false;
    // A previous process reached the end of the handshake (its marker is written before the
    // stop) and died: the lines that said so are skipped now, so the end goes on from here
    // instead of waiting for an idle that will not come again.
    let marked_before = options
        .handshake_marker
        .as_ref()
        .is_some_and(|m| m.exists());
    if marked_before {
        idle_fired = true;
        session_idle = true;
    }
    if !prompt_failed && !marked_before {
        tokio::pin!(cancel);
        let idle = async {
            // A dropped sender (stdout ended without idle) must not count as idle.
            match idle_rx.await {
                Ok(real) => real,
                Err(_) => std::future::pending::<bool>().await,
            }
        };
        tokio::select! {
            _ = &mut cancel => result.cancelled = true,
            real = idle => {
                idle_fired = true;
                session_idle = real;
            }
            joined = &mut stdout_task => stdout_stats = Some(joined.unwrap_or_default()),
        }
    }

    // Step 2: abort if cancelled or stdout still open, then close stdin. A stdin that no
    // client can close (API driver) is replaced by a stop: SIGTERM, SIGKILL after the grace.
    let stdout_open = stdout_stats.is_none() && !prompt_failed;
    let mut stop = result.cancelled;
    if let Some(channel) = stdin {
        if result.cancelled || stdout_open {
            let _ = channel.send(r#"{"type":"abort"}"#).await;
        }
        stop |= channel.survives_close() && !prompt_failed;
        channel.close().await;
    }
    if stop {
        let running = matches!(
            engine.state(name).await?,
            Some(ContainerState::Running) | Some(ContainerState::Other(_))
        );
        if running && budget.over() {
            // Past the output limit the meter kills (SIGKILL); so does this, so that a stop's
            // SIGTERM (which reaches an agent under the engine's init) never races the kill
            // and the exit is the limit's whatever ends the stream first.
            engine.kill(name).await?;
            result.stopped_by_runner = true;
        } else if running {
            if idle_fired && !result.cancelled {
                if let Some(marker) = &options.handshake_marker {
                    let _ = std::fs::write(marker, b"1\n");
                }
            }
            let grace = if session_idle && !result.cancelled {
                options.grace.min(IDLE_STOP_GRACE)
            } else {
                options.grace
            };
            let asked = tokio::time::Instant::now();
            if let Err(e) = engine.stop(name, grace).await {
                tracing::warn!(container = name, "stopping the container failed: {e}");
            }
            result.stopped_by_runner = true;
            // The engine's SIGKILL after the grace (the agent ignored the SIGTERM).
            result.killed_after_grace = asked.elapsed() >= grace
                && matches!(
                    engine.state(name).await?,
                    Some(ContainerState::Exited { code: 137, .. })
                );
        }
    }

    // Step 3: grace, then kill the container itself.
    let exited = tokio::time::timeout(options.grace, engine.wait_exit(name)).await;
    if !matches!(exited, Ok(Ok(Some(_)))) {
        if let Some(ContainerState::Running) | Some(ContainerState::Other(_)) =
            engine.state(name).await?
        {
            result.killed_after_grace = true;
            engine.kill(name).await?;
        }
    }

    // Step 4: drain both streams (logs --follow ends once the container stopped).
    let drain = async {
        let stdout = match stdout_stats {
            Some(stats) => stats,
            None => stdout_task.await.unwrap_or_default(),
        };
        let stderr = stderr_task.await.unwrap_or_default();
        (stdout, stderr)
    };
    let (stdout, stderr) = match tokio::time::timeout(DRAIN_TIMEOUT, drain).await {
        Ok(both) => both,
        Err(_) => {
            logs.kill().await;
            tracing::warn!(
                container = name,
                "output drain did not finish in 60 s after the container stopped"
            );
            result.stream_degraded = true;
            (StreamStats::default(), StreamStats::default())
        }
    };
    let _ = logs.finish().await;
    // The meter's kill must be done before the exit code is read.
    let metered = match tokio::time::timeout(DRAIN_TIMEOUT, meter_task).await {
        Ok(Ok(Ok(hit))) => hit,
        Ok(Ok(Err(e))) => {
            tracing::warn!(container = name, "the output meter failed: {e}");
            false
        }
        _ => false,
    };
    result.output_limit_hit = metered || budget.over();
    result.stream_degraded |=
        stdout.degraded || stderr.degraded || stdout.limited || stderr.limited;
    result.saw_contract_event = stdout.saw_contract_event;
    result.saw_session_idle = stdout.saw_session_idle;
    result.stdout_lines = stdout.lines.max(options.skip_stdout_lines);
    result.stderr_lines = stderr.lines.max(options.skip_stderr_lines);
    match engine.state(name).await? {
        Some(ContainerState::Exited { code, oom_killed }) => {
            result.exit_code = Some(code);
            result.oom_killed = oom_killed;
        }
        _ => result.exit_code = engine.wait_exit(name).await?,
    }
    // The runner ended an agent whose session was over (spec 6.4: where the CLI driver closes
    // stdin, the API driver stops): its exit code is the stop's, not the agent's, and is
    // judged as 0 (docs/containers.md). An agent that is PID 1 without a SIGTERM handler
    // ignores the SIGTERM and gets the SIGKILL after the grace: that too is such an end. A
    // cancel, the output limit or an OOM kill is not. Giving an agent exit 0 here grants it
    // nothing: it could print session_idle and exit 0 itself.
    result.ended_by_runner_at_handshake = ((result.stopped_by_runner
        && (result.saw_session_idle || result.stream_degraded))
        || marked_before)
        && !result.cancelled
        && !result.output_limit_hit
        && !result.oom_killed;
    // Such an end is no hang: an agent deaf to SIGTERM (PID 1) always gets the stop's SIGKILL.
    result.killed_after_grace &= !result.ended_by_runner_at_handshake;
    Ok(result)
}
