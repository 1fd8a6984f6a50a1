//! The JSONL agent driver (spec 5.4 and 6): writes the prompt, turns the container's output
//! into `stdout`/`stderr` events and [`AgentSignal`]s, and runs the shutdown handshake
//! (abort, stdin close, grace, kill). It decides no verdict: the caller folds the signals and
//! the [`DriveResult`] into one with `crate::fsm`.
//!
//! Re-attach design (docs/containers.md): the container is created with `create -i` (stdin
//! open, closed for good when the attached client goes) and started detached. Its stdin is
//! held by a detached `<docker> attach` process that reads a FIFO in the run's private
//! directory, so the runner can die and a new runner can open the FIFO again. Output is read
//! with `<docker> logs --follow`, which replays from the start: a re-attached driver skips the
//! lines it already saw, counted per stream. Closing stdin = killing the attach process.

use std::future::Future;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::container::{ContainerError, ContainerState, Engine, LINE_OVERHEAD};
use crate::fsm::contract::{classify_stdout_line, AgentSignal};
use crate::redact::redact;

/// The line limit of spec 5.4 (a line, newline included, may not exceed it).
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// Grace between stdin close (or a stop request) and the kill (spec 6.4).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
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
}

impl Default for DriveOptions {
    fn default() -> Self {
        DriveOptions {
            prompt: None,
            grace: DEFAULT_GRACE,
            skip_stdout_lines: 0,
            skip_stderr_lines: 0,
            resignal_skipped: false,
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
    /// The runner killed the container after the grace period.
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

/// The container's stdin: a FIFO read by a detached `<docker> attach` process.
pub struct StdinChannel {
    fifo: PathBuf,
    holder_pid: i32,
    /// Present when this process spawned the holder (so it can reap it).
    holder: Option<std::process::Child>,
}

const FIFO_NAME: &str = "stdin.fifo";
const HOLDER_PID_FILE: &str = "stdin-holder.pid";

impl StdinChannel {
    /// Attaches a detached stdin holder to a started container. `run_dir` must be a private
    /// (0700) directory owned by this run attempt.
    pub fn open(engine: &Engine, name: &str, run_dir: &Path) -> io::Result<StdinChannel> {
        let fifo = run_dir.join(FIFO_NAME);
        match std::fs::remove_file(&fifo) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "run dir path has a NUL"))?;
        // SAFETY: mkfifo with a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Read-write so the holder itself keeps a writer: it never sees EOF while the runner
        // is away, only when it is killed on purpose.
        let stdin = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)?;
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(&engine.cfg.docker)
            // Long-lived: it must not carry the runner's secrets (docs/containers.md).
            .env_clear()
            .envs(super::container::engine_env())
            .args(["attach", "--sig-proxy=false", name])
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C or group kill aimed at the runner spares it.
            .process_group(0)
            .spawn()?;
        let holder_pid =
            i32::try_from(child.id()).map_err(|_| io::Error::other("holder pid out of range"))?;
        std::fs::write(run_dir.join(HOLDER_PID_FILE), format!("{holder_pid}\n"))?;
        Ok(StdinChannel {
            fifo,
            holder_pid,
            holder: Some(child),
        })
    }

    /// Finds the stdin holder a previous runner process left for `name`; `None` when it is
    /// gone (then the container's stdin is closed for good).
    pub fn reopen(name: &str, run_dir: &Path) -> Option<StdinChannel> {
        let pid: i32 = std::fs::read_to_string(run_dir.join(HOLDER_PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // Guard against pid reuse: the process must still be our attach for this container.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args.iter().any(|a| *a == b"attach") && args.contains(&name.as_bytes());
        let fifo = run_dir.join(FIFO_NAME);
        (ours && fifo.exists()).then_some(StdinChannel {
            fifo,
            holder_pid: pid,
            holder: None,
        })
    }

    /// Writes one command line. Fails when nobody reads the FIFO any more.
    pub async fn send(&self, line: &str) -> io::Result<()> {
        let fifo = self.fifo.clone();
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        let write = tokio::task::spawn_blocking(move || -> io::Result<()> {
            use std::io::Write;
            // Non-blocking open fails with ENXIO instead of hanging when no reader is left.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)?;
            let mut written = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while written < data.len() {
                match file.write(&data[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "the agent did not read its stdin for 30 s",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        write
            .await
            .map_err(|e| io::Error::other(format!("stdin writer task failed: {e}")))?
    }

    /// Closes the container's stdin for good (the agent sees EOF) by ending the holder.
    pub async fn close(mut self) {
        // SAFETY: plain kill(2) on a pid we verified or spawned.
        unsafe {
            libc::kill(self.holder_pid, libc::SIGKILL);
        }
        if let Some(mut child) = self.holder.take() {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        let _ = std::fs::remove_file(&self.fifo);
    }
}

/// Starts a created container and, for `coding_agent`, attaches the stdin holder.
pub async fn start(
    engine: &Engine,
    name: &str,
    run_dir: &Path,
    with_stdin: bool,
) -> Result<Option<StdinChannel>, ContainerError> {
    engine.start(name).await?;
    if !with_stdin {
        return Ok(None);
    }
    StdinChannel::open(engine, name, run_dir)
        .map(Some)
        .map_err(|e| ContainerError::Cli {
            docker: engine.cfg.docker.clone(),
            what: format!("attach {name}"),
            detail: format!("could not attach the stdin holder: {e}"),
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
    mut idle: Option<oneshot::Sender<()>>,
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
                let _ = tx.send(());
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
                        let _ = tx.send(());
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
    idle: &mut Option<oneshot::Sender<()>>,
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
                    let _ = tx.send(());
                }
            }
            send(DriverOutput::Signal(signal)).await;
        }
    }
}

/// Counts a running container's whole output (`<docker> logs --follow`, both streams, the
/// same cost as the readers: bytes plus [`LINE_OVERHEAD`] a line) and, once past
/// `WSRUNNER_AGENT_OUTPUT_LIMIT`, kills the container and reports the limit as the agent's
/// error and a degraded stream. Returns whether the limit was passed.
async fn meter(
    engine: Engine,
    name: String,
    out: mpsc::Sender<DriverOutput>,
) -> Result<bool, ContainerError> {
    use tokio::io::AsyncReadExt;
    let mut logs = engine.command(&["logs", "--follow", &name]);
    let mut logs = logs.spawn().map_err(|source| ContainerError::Spawn {
        docker: engine.cfg.docker.clone(),
        source,
    })?;
    let (Some(stdout), Some(stderr)) = (logs.stdout.take(), logs.stderr.take()) else {
        return Err(ContainerError::Spawn {
            docker: engine.cfg.docker.clone(),
            source: io::Error::other("logs pipes missing"),
        });
    };
    let (hit_tx, hit_rx) = oneshot::channel();
    let budget = OutputBudget::new(engine.cfg.output_limit, Some(hit_tx), false);
    let count = |mut reader: Box<dyn AsyncRead + Unpin + Send>, budget: Arc<OutputBudget>| async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = reader.read(&mut buf).await {
            let lines = buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
            budget.charge(n as u64 + lines * LINE_OVERHEAD);
        }
    };
    // The readers own the budget: when both end without a hit, its sender drops.
    let readers = tokio::spawn(async move {
        tokio::join!(
            count(Box::new(stdout), budget.clone()),
            count(Box::new(stderr), budget)
        );
    });
    let hit = hit_rx.await.is_ok();
    if hit {
        tracing::warn!(
            container = %name,
            limit = engine.cfg.output_limit,
            "agent output limit (WSRUNNER_AGENT_OUTPUT_LIMIT) exceeded: killing the container"
        );
        engine.kill(&name).await?;
        let message = output_limit_message(engine.cfg.output_limit);
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
    let _ = logs.wait().await;
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
    engine: &Engine,
    name: &str,
    skip_stdout: u64,
    skip_stderr: u64,
    resignal_skipped: bool,
    out: mpsc::Sender<DriverOutput>,
) -> Result<(u64, u64), ContainerError> {
    let mut logs = engine.command(&["logs", name]);
    let mut logs = logs.spawn().map_err(|source| ContainerError::Spawn {
        docker: engine.cfg.docker.clone(),
        source,
    })?;
    let (Some(stdout), Some(stderr)) = (logs.stdout.take(), logs.stderr.take()) else {
        return Err(ContainerError::Spawn {
            docker: engine.cfg.docker.clone(),
            source: io::Error::other("logs pipes missing"),
        });
    };
    // The container is stopped already: an exceeded budget only reports.
    let budget = OutputBudget::new(engine.cfg.output_limit, None, true);
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
        let _ = logs.kill().await;
        return Err(ContainerError::Timeout {
            docker: engine.cfg.docker.clone(),
            what: format!("logs {name}"),
            secs: DRAIN_TIMEOUT.as_secs(),
        });
    };
    let status = logs.wait().await.map_err(|source| ContainerError::Spawn {
        docker: engine.cfg.docker.clone(),
        source,
    })?;
    if !status.success() {
        return Err(ContainerError::Cli {
            docker: engine.cfg.docker.clone(),
            what: format!("logs {name}"),
            detail: format!("exited with {status}"),
        });
    }
    Ok((lines.0.max(skip_stdout), lines.1.max(skip_stderr)))
}

/// Drives a started container to its end: prompt, output, handshake, exit code (spec 6.4).
/// `stdin` is `None` for container kinds (spec 5.2) or when the stdin holder is gone. When
/// `cancel` completes first, the run is aborted. The container is left in place (stopped):
/// the caller removes it after recording the result.
pub async fn drive(
    engine: &Engine,
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
                    docker: engine.cfg.docker.clone(),
                    what: format!("start {name}"),
                    detail: "the container did not start within 60 s".into(),
                })
            }
            None => {
                return Err(ContainerError::Cli {
                    docker: engine.cfg.docker.clone(),
                    what: format!("logs {name}"),
                    detail: "the container is gone".into(),
                })
            }
            Some(_) => break,
        }
    }
    let mut logs = engine.command(&["logs", "--follow", name]);
    let mut logs = logs.spawn().map_err(|source| ContainerError::Spawn {
        docker: engine.cfg.docker.clone(),
        source,
    })?;
    let (Some(stdout), Some(stderr)) = (logs.stdout.take(), logs.stderr.take()) else {
        return Err(ContainerError::Spawn {
            docker: engine.cfg.docker.clone(),
            source: io::Error::other("logs pipes missing"),
        });
    };
    let (idle_tx, idle_rx) = oneshot::channel();
    // The forwarding readers go at the pace the server takes events; the meter reads the
    // same output at full speed, so the limit holds on what the agent writes.
    let budget = OutputBudget::new(engine.cfg.output_limit, None, false);
    let meter_task = tokio::spawn(meter(engine.clone(), name.to_owned(), out.clone()));
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
    if !prompt_failed {
        tokio::pin!(cancel);
        let idle = async {
            // A dropped sender (stdout ended without idle) must not count as idle.
            if idle_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = &mut cancel => result.cancelled = true,
            _ = idle => {}
            joined = &mut stdout_task => stdout_stats = Some(joined.unwrap_or_default()),
        }
    }

    // Step 2: abort if cancelled or stdout still open, then close stdin.
    let stdout_open = stdout_stats.is_none() && !prompt_failed;
    if let Some(channel) = stdin {
        if result.cancelled || stdout_open {
            let _ = channel.send(r#"{"type":"abort"}"#).await;
        }
        channel.close().await;
    } else if result.cancelled {
        // No stdin (container kinds): ask politely, the engine kills after the grace.
        let secs = options.grace.as_secs().to_string();
        let _ = engine
            .cli(
                &["stop", "--time", &secs, name],
                options.grace + Duration::from_secs(60),
            )
            .await;
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
            let _ = logs.kill().await;
            tracing::warn!(
                container = name,
                "output drain did not finish in 60 s after the container stopped"
            );
            result.stream_degraded = true;
            (StreamStats::default(), StreamStats::default())
        }
    };
    let _ = logs.wait().await;
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
    Ok(result)
}
