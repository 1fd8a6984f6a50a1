//! `windshift-runner ctl pause|resume|status`: a local control socket, no network listener.
//!
//! The socket `ctl.sock` (0600) lives in the control directory (0700, `WSRUNNER_CTL_DIR`,
//! default `ctl` beside the journal directory). Only the runner's own user and root may
//! connect: the directory and socket modes say so, and the peer's uid is checked again on
//! every connection. One JSON line in, one JSON line out:
//!
//! ```text
//! {"cmd":"pause"}   {"cmd":"resume"}   {"cmd":"status"}
//! {"ok":true,"status":{...}}           {"ok":false,"error":"..."}
//! ```
//!
//! A pause is persisted as the file `paused` (0600, written atomically) in the same directory,
//! so it survives a restart until `resume` removes it. Paused: no claims; heartbeats, runs in
//! flight and SIGTERM drain go on as before.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use super::{Ctx, Runs};
use crate::config::CTL_SOCKET;
use crate::journal::{now_ms, Slot};
use crate::metrics::Health;

/// The pause file's name in the control directory.
pub const PAUSE_FILE: &str = "paused";
/// Longest request line the runner reads; anything longer is refused.
const MAX_REQUEST: usize = 4096;
/// Longest answer `ctl` reads.
const MAX_RESPONSE: u64 = 1 << 20;
/// A client that sends nothing within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `pause` waits for a claim already sent to be answered before replying.
const PAUSE_CLAIM_WAIT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait for a turn.
const MAX_CONNECTIONS: usize = 8;

/// `ctl` exit codes: done; the runner answered with an error or could not be talked to;
/// the runner is not running (no socket, or nobody listening on it).
pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_NOT_RUNNING: i32 = 3;

/// The pause file's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PauseFile {
    since_ms: i64,
}

/// Whether the runner is paused, shared by the claim loop and the socket.
pub(crate) struct Pause {
    dir: PathBuf,
    /// `Some(since_ms)` while paused.
    state: watch::Sender<Option<i64>>,
    /// Held by the claim loop from the pause check until a claimed run is started, so a
    /// `pause` that returned leaves no claim behind it.
    pub(crate) claim_gate: Arc<tokio::sync::Mutex<()>>,
}

impl Pause {
    /// Reads the persisted pause from `dir`. A pause file that cannot be parsed still
    /// pauses: the operator asked for it, and `resume` clears it.
    pub(crate) fn load(dir: &Path) -> Result<Pause, String> {
        let path = dir.join(PAUSE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<PauseFile>(&bytes) {
                Ok(f) => Some(f.since_ms),
                Err(e) => {
                    warn!(file = %path.display(), "unreadable pause file ({e}); staying paused until `windshift-runner ctl resume`");
                    Some(0)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(format!(
                    "cannot read the pause file {}: {e} (check WSRUNNER_CTL_DIR's owner and mode)",
                    path.display()
                ))
            }
        };
        Ok(Pause {
            dir: dir.to_path_buf(),
            state: watch::channel(state).0,
            claim_gate: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.state.borrow().is_some()
    }

    fn since(&self) -> Option<i64> {
        *self.state.borrow()
    }

    /// Waits until resumed, or until `shutdown` changes.
    pub(crate) async fn wait_resumed(&self, shutdown: &mut watch::Receiver<u8>) {
        let mut rx = self.state.subscribe();
        tokio::select! {
            _ = rx.wait_for(|s| s.is_none()) => {}
            _ = shutdown.changed() => {}
        }
    }

    /// Persists the pause (atomically, flushed) before it takes effect.
    async fn pause(&self) -> Result<(), String> {
        if self.is_paused() {
            return Ok(());
        }
        let since_ms = now_ms();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_pause_file(&dir, since_ms))
            .await
            .map_err(|e| format!("pause task failed: {e}"))??;
        self.state.send_replace(Some(since_ms));
        Ok(())
    }

    async fn resume(&self) -> Result<(), String> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || remove_pause_file(&dir))
            .await
            .map_err(|e| format!("resume task failed: {e}"))??;
        self.state.send_replace(None);
        Ok(())
    }
}

fn write_pause_file(dir: &Path, since_ms: i64) -> Result<(), String> {
    let path = dir.join(PAUSE_FILE);
    let fail = |e: std::io::Error| format!("cannot write the pause file {}: {e}", path.display());
    // tempfile creates 0600; rename makes the file appear whole or not at all.
    let mut tmp = tempfile::Builder::new()
        .prefix(".paused-")
        .tempfile_in(dir)
        .map_err(fail)?;
    let body = serde_json::to_vec(&PauseFile { since_ms }).unwrap_or_default();
    tmp.write_all(&body).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(&path).map_err(|e| fail(e.error))?;
    sync_dir(dir).map_err(fail)
}

fn remove_pause_file(dir: &Path) -> Result<(), String> {
    let path = dir.join(PAUSE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(format!(
                "cannot remove the pause file {}: {e}",
                path.display()
            ))
        }
    }
    sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates the control directory (0700, ours) and binds `ctl.sock` (0600). Refuses to take
/// over a socket another live runner answers on.
pub(crate) fn bind(dir: &Path) -> Result<(UnixListener, SocketGuard), String> {
    crate::effects::session::create_private_dir(dir).map_err(|e| {
        format!(
            "cannot create the control directory {}: {e} (set WSRUNNER_CTL_DIR to a directory the runner user owns)",
            dir.display()
        )
    })?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(format!(
            "the control directory {} belongs to uid {}, not to the runner (uid {euid}): set WSRUNNER_CTL_DIR to a directory of its own",
            dir.display(),
            meta.uid()
        ));
    }
    let path = dir.join(CTL_SOCKET);
    if std::fs::symlink_metadata(&path).is_ok() {
        if StdUnixStream::connect(&path).is_ok() {
            return Err(format!(
                "another runner is listening on {}: give each runner its own WSRUNNER_CTL_DIR (or WSRUNNER_JOURNAL_DIR parent)",
                path.display()
            ));
        }
        // Left by a runner that did not stop cleanly.
        std::fs::remove_file(&path)
            .map_err(|e| format!("cannot remove the stale {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // The directory is 0700, so the socket was never reachable by others before this.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    Ok((listener, SocketGuard(path)))
}

/// Removes the socket when the daemon ends, so `ctl` says "not running" at once.
#[derive(Debug)]
pub(crate) struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves the socket until the task is aborted.
pub(crate) fn serve(
    listener: UnixListener,
    ctx: Arc<Ctx>,
    runs: Runs,
) -> tokio::task::JoinHandle<()> {
    let turns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(turn) = turns.clone().acquire_owned().await else {
                return;
            };
            let (ctx, runs) = (ctx.clone(), runs.clone());
            tokio::spawn(async move {
                if let Err(e) = connection(stream, &ctx, &runs).await {
                    tracing::debug!("control socket: {e}");
                }
                drop(turn);
            });
        }
    })
}

/// A request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    cmd: String,
}

/// The answer line.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// What `status` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub paused: bool,
    /// Unix ms of the pause (0 when the pause file could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_since_ms: Option<i64>,
    /// `healthy`, `starting` or `unhealthy`.
    pub health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    pub draining: bool,
    pub slots: usize,
    pub runs: Vec<RunRow>,
}

/// One run in flight.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRow {
    pub id: i64,
    /// The journaled state (claimed, prepared, running, pushed), or `unknown`.
    pub state: String,
    /// Unix ms of the transition into that state.
    pub since_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

async fn connection(stream: UnixStream, ctx: &Arc<Ctx>, runs: &Runs) -> Result<(), String> {
    // The socket's mode already keeps others out; this holds even if the mode were changed.
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("peer credentials: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if cred.uid() != euid && cred.uid() != 0 {
        return Err(format!("refused a connection from uid {}", cred.uid()));
    }
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let got = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let response = match got {
        Err(_) => refuse("no request line within 5 s"),
        Ok(Err(e)) => refuse(&format!("cannot read the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            refuse("request too long (one JSON line of at most 4096 bytes)")
        }
        Ok(Ok(_)) => handle(&line, ctx, runs).await,
    };
    let mut body = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    body.push(b'\n');
    write
        .write_all(&body)
        .await
        .map_err(|e| format!("cannot answer: {e}"))
}

fn refuse(error: &str) -> Response {
    Response {
        ok: false,
        error: Some(error.to_owned()),
        ..Default::default()
    }
}

/// Parses one request line; never panics on any input.
fn parse(line: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8".to_owned())?;
    let req: Request = serde_json::from_str(text.trim())
        .map_err(|e| format!("the request is not {{\"cmd\":\"pause|resume|status\"}}: {e}"))?;
    match req.cmd.as_str() {
        "pause" | "resume" | "status" => Ok(req.cmd),
        _ => Err("unknown command: expected pause, resume or status".into()),
    }
}

async fn handle(line: &[u8], ctx: &Arc<Ctx>, runs: &Runs) -> Response {
    let cmd = match parse(line) {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    let mut note = None;
    match cmd.as_str() {
        "pause" => {
            let was = ctx.pause.is_paused();
            if let Err(e) = ctx.pause.pause().await {
                return refuse(&e);
            }
            ctx.metrics.set_paused(true);
            if !was {
                info!("paused by `windshift-runner ctl pause`: no new claims until `ctl resume`; runs in flight go on");
            }
            // A claim already on the wire may still bring a run; wait for it to land so the
            // answer is true.
            if tokio::time::timeout(PAUSE_CLAIM_WAIT, ctx.pause.claim_gate.lock())
                .await
                .is_err()
            {
                note = Some("a claim sent before the pause is still waiting for the server's answer; a run it brings will start".into());
            }
        }
        "resume" => {
            let was = ctx.pause.is_paused();
            if let Err(e) = ctx.pause.resume().await {
                return refuse(&e);
            }
            ctx.metrics.set_paused(false);
            if was {
                info!("resumed by `windshift-runner ctl resume`: claiming again");
            }
        }
        _ => {}
    }
    Response {
        ok: true,
        note,
        status: Some(status(ctx, runs).await),
        ..Default::default()
    }
}

async fn status(ctx: &Arc<Ctx>, runs: &Runs) -> Status {
    let mut ids: Vec<i64> = runs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .copied()
        .collect();
    ids.sort_unstable();
    let journal = ctx.journal.clone();
    // The active index only (never the history), off the async workers.
    let active = tokio::task::spawn_blocking(move || journal.active())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let rows = ids
        .into_iter()
        .map(|id| {
            let record = active.iter().find_map(|s| match s {
                Slot::Record(r) if r.run_id == id => Some(r),
                _ => None,
            });
            match record {
                Some(r) => RunRow {
                    id,
                    state: r.state.kind().to_string(),
                    since_ms: r.at_ms,
                    container: r.state.container().map(|c| c.name.clone()),
                },
                None => RunRow {
                    id,
                    state: "unknown".into(),
                    ..Default::default()
                },
            }
        })
        .collect();
    let (health, health_reason) = match ctx.metrics.health() {
        Health::Healthy => ("healthy", None),
        Health::Starting => ("starting", None),
        Health::Unhealthy(why) => ("unhealthy", Some(crate::redact::redact(&why).into_owned())),
    };
    Status {
        paused: ctx.pause.is_paused(),
        paused_since_ms: ctx.pause.since(),
        health: health.into(),
        health_reason,
        draining: ctx.shutting_down(),
        slots: ctx.cfg.concurrency,
        runs: rows,
    }
}

// ---- the `ctl` client -------------------------------------------------------------------

/// Sends one command to the runner whose control directory is `dir`; prints the answer to
/// `out` (text, or the raw JSON line with `json`) and errors to `err`. Returns the exit code.
pub fn client(dir: &Path, cmd: &str, json: bool, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let path = dir.join(CTL_SOCKET);
    let mut stream = match StdUnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            use std::io::ErrorKind::*;
            let (code, msg) = match e.kind() {
                NotFound | ConnectionRefused => (
                    EXIT_NOT_RUNNING,
                    format!(
                        "windshift-runner is not running: no runner listens on {} ({e}); start it, or point WSRUNNER_CTL_DIR / WSRUNNER_JOURNAL_DIR at the runner's",
                        path.display()
                    ),
                ),
                PermissionDenied => (
                    EXIT_ERROR,
                    format!(
                        "permission denied on {}: run ctl as the runner's user (or root)",
                        path.display()
                    ),
                ),
                _ => (EXIT_ERROR, format!("cannot connect to {}: {e}", path.display())),
            };
            let _ = writeln!(err, "windshift-runner ctl: {msg}");
            return code;
        }
    };
    let answer = (|| -> std::io::Result<Vec<u8>> {
        // `pause` may wait up to PAUSE_CLAIM_WAIT for a claim in flight.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut req = serde_json::to_vec(&serde_json::json!({ "cmd": cmd }))?;
        req.push(b'\n');
        stream.write_all(&req)?;
        let mut line = Vec::new();
        BufReader::new(&stream)
            .take(MAX_RESPONSE)
            .read_until(b'\n', &mut line)?;
        Ok(line)
    })();
    let line = match answer {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(
                err,
                "windshift-runner ctl: no answer from {}: {e}",
                path.display()
            );
            return EXIT_ERROR;
        }
    };
    let resp: Response = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(
                err,
                "windshift-runner ctl: the runner's answer is not understood ({e})"
            );
            return EXIT_ERROR;
        }
    };
    if !resp.ok {
        let _ = writeln!(
            err,
            "windshift-runner ctl: the runner refused: {}",
            resp.error.as_deref().unwrap_or("no reason given")
        );
        return EXIT_ERROR;
    }
    if json {
        let _ = out.write_all(&line);
        return EXIT_OK;
    }
    if let Some(note) = &resp.note {
        let _ = writeln!(out, "note: {note}");
    }
    if let Some(status) = &resp.status {
        let _ = write!(out, "{}", render(status));
    }
    EXIT_OK
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The text form of a status.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let claims = match (s.paused, s.paused_since_ms) {
        (true, Some(ms)) if ms > 0 => format!(
            "paused since {} (no new claims; heartbeats and runs in flight go on)",
            time(ms)
        ),
        (true, _) => "paused (no new claims; heartbeats and runs in flight go on)".into(),
        (false, _) if s.draining => "draining (no new claims; stopping)".into(),
        (false, _) => "claiming".into(),
    };
    out.push_str(&format!("claims:  {claims}\n"));
    match &s.health_reason {
        Some(why) => out.push_str(&format!("health:  {}: {why}\n", s.health)),
        None => out.push_str(&format!("health:  {}\n", s.health)),
    }
    out.push_str(&format!(
        "runs:    {} in flight, {} slot(s)\n",
        s.runs.len(),
        s.slots
    ));
    if !s.runs.is_empty() {
        out.push_str(&format!(
            "{:<10} {:<9} {:<21} CONTAINER\n",
            "RUN", "STATE", "SINCE"
        ));
        for r in &s.runs {
            let since = if r.since_ms > 0 {
                time(r.since_ms)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "{:<10} {:<9} {:<21} {}\n",
                r.id,
                r.state,
                since,
                r.container.as_deref().unwrap_or("-")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_what_is_wrong() {
        assert_eq!(parse(b"{\"cmd\":\"pause\"}\n").unwrap(), "pause");
        assert_eq!(parse(b" {\"cmd\":\"status\"} ").unwrap(), "status");
        for bad in [
            &b""[..],
            b"\n",
            b"pause",
            b"{\"cmd\":1}",
            b"{\"cmd\":\"reboot\"}",
            b"{\"cmd\":\"pause\",\"x\":1}",
            b"\xff\xfe",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn pause_file_round_trip_is_private_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!Pause::load(dir.path()).unwrap().is_paused());
        write_pause_file(dir.path(), 1_700_000_000_000).unwrap();
        let mode = std::fs::metadata(dir.path().join(PAUSE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let p = Pause::load(dir.path()).unwrap();
        assert_eq!(p.since(), Some(1_700_000_000_000));
        // No temp file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A damaged file still pauses.
        std::fs::write(dir.path().join(PAUSE_FILE), b"garbage").unwrap();
        assert!(Pause::load(dir.path()).unwrap().is_paused());
        remove_pause_file(dir.path()).unwrap();
        remove_pause_file(dir.path()).unwrap();
        assert!(!Pause::load(dir.path()).unwrap().is_paused());
    }

    #[test]
    fn status_text_names_every_run() {
        let s = Status {
            paused: true,
            paused_since_ms: Some(1_700_000_000_000),
            health: "healthy".into(),
            slots: 2,
            runs: vec![RunRow {
                id: 42,
                state: "running".into(),
                since_ms: 1_700_000_000_000,
                container: Some("wsr-a-run-42-1".into()),
            }],
            ..Default::default()
        };
        let text = render(&s);
        assert!(text.contains("paused since 2023-11-14T22:13:20Z"), "{text}");
        assert!(text.contains("1 in flight, 2 slot(s)"), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with("42 ")
                && l.contains("running")
                && l.ends_with("wsr-a-run-42-1")),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bind_makes_a_private_socket_and_refuses_a_live_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ctl");
        let (listener, guard) = bind(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CTL_SOCKET)), 0o600);
        let e = bind(&dir).unwrap_err();
        assert!(e.contains("another runner is listening"), "{e}");
        // A socket left behind by a killed runner is taken over.
        std::mem::forget(guard);
        drop(listener);
        let (_l, _g) = bind(&dir).unwrap();
    }

    #[test]
    fn ctl_without_a_runner_says_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert_eq!(
            client(dir.path(), "status", false, &mut out, &mut err),
            EXIT_NOT_RUNNING
        );
        assert!(String::from_utf8_lossy(&err).contains("is not running"));
    }
}
