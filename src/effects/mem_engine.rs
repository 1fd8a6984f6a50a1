//! An in-memory [`ContainerEngine`]: containers with the engine's state machine (created →
//! running → exited, removed), each running an [`AgentScript`] (output lines per stream and
//! how it ends) instead of a process, its stdin recorded, kill and stop honoured, its logs
//! readable from the start with or without follow. Nothing runs in the background and no
//! clock is read except tokio's for a stop's grace, so a test on paused time is
//! deterministic.
//!
//! It is a stand-in for unit tests of the code above the engine (`effects::session`,
//! `effects::agent_driver`, the run loop) and for the simulation; never for tests that
//! claim to test containers: those run the real [`super::container::Engine`].

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};

use super::agent_driver::StdinChannel;
use super::container::{
    check_image_ref, container_name, ContainerError, ContainerSpec, ContainerState, FoundContainer,
    ImagePrune, LaunchKind, DEFAULT_OUTPUT_LIMIT,
};
use super::engine::{ContainerEngine, EngineFuture, LogSource, Logs, StdinPort};

/// Exit code of an agent ended by SIGKILL (the engine's 128 + 9).
pub const KILLED: i32 = 137;
/// Exit code of an agent ended by SIGTERM (128 + 15).
pub const TERMINATED: i32 = 143;

/// How a scripted agent ends once it has printed its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentEnd {
    /// It exits with this code right after printing.
    Exit(i32),
    /// It waits for its stdin to close (the handshake's EOF), then exits with this code.
    ExitAtEof(i32),
    /// It never exits by itself: only a stop or a kill ends it.
    Never,
}

/// What the agent in a container does: prints `stdout` and `stderr` (each line gets its
/// newline) once it runs, or once its first stdin line (the prompt) arrived when
/// `reads_prompt`, then ends as `end` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentScript {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub reads_prompt: bool,
    pub end: AgentEnd,
    /// A stop's SIGTERM is ignored: only the SIGKILL after the grace ends it.
    pub ignores_term: bool,
}

impl Default for AgentScript {
    /// A contract agent that prints nothing and exits 0 at the handshake's EOF.
    fn default() -> Self {
        AgentScript {
            stdout: Vec::new(),
            stderr: Vec::new(),
            reads_prompt: true,
            end: AgentEnd::ExitAtEof(0),
            ignores_term: false,
        }
    }
}

impl AgentScript {
    /// A contract agent that finishes with `outcome`, goes idle and exits 0 at EOF.
    pub fn finishing(outcome: &str, summary: &str) -> Self {
        AgentScript::default()
            .stdout(serde_json::json!({"type": "starting"}).to_string())
            .stdout(
                serde_json::json!({"type": "finish", "outcome": outcome, "summary": summary})
                    .to_string(),
            )
            .stdout(serde_json::json!({"type": "session_idle"}).to_string())
    }

    pub fn stdout(mut self, line: impl Into<String>) -> Self {
        self.stdout.push(line.into());
        self
    }

    pub fn stderr(mut self, line: impl Into<String>) -> Self {
        self.stderr.push(line.into());
        self
    }

    pub fn ending(mut self, end: AgentEnd) -> Self {
        self.end = end;
        self
    }

    pub fn ignoring_term(mut self) -> Self {
        self.ignores_term = true;
        self
    }

    /// It prints as soon as it runs (a container job, no prompt).
    pub fn without_prompt(mut self) -> Self {
        self.reads_prompt = false;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Exited(i32),
}

struct Container {
    run_id: i64,
    attempt: u32,
    status: Status,
    script: AgentScript,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Lines written to its stdin, over every attach.
    stdin_lines: usize,
    stdin_open: bool,
    printed: bool,
}

impl Container {
    /// Prints the script's lines, then ends if the script says so.
    fn print(&mut self) {
        if self.printed {
            return;
        }
        self.printed = true;
        for line in &self.script.stdout {
            self.stdout.extend_from_slice(line.as_bytes());
            self.stdout.push(b'\n');
        }
        for line in &self.script.stderr {
            self.stderr.extend_from_slice(line.as_bytes());
            self.stderr.push(b'\n');
        }
        if let AgentEnd::Exit(code) = self.script.end {
            self.status = Status::Exited(code);
        }
    }

    fn end(&mut self, code: i32) {
        if self.status == Status::Running {
            self.status = Status::Exited(code);
        }
    }
}

#[derive(Default)]
struct World {
    containers: BTreeMap<String, Container>,
    /// The script of each run's containers; `default_script` for the others.
    scripts: HashMap<i64, AgentScript>,
    default_script: AgentScript,
    /// Removed containers, in order.
    removed: Vec<String>,
    /// Every line written to each container's stdin; kept after its removal.
    stdin: HashMap<String, Vec<String>>,
    prunes: u32,
    /// Woken on every change (output, state, removal).
    wakers: Vec<Waker>,
}

impl World {
    fn changed(&mut self) {
        for waker in self.wakers.drain(..) {
            waker.wake();
        }
    }

    fn wait_on(&mut self, cx: &Context<'_>) {
        if !self.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            self.wakers.push(cx.waker().clone());
        }
    }
}

struct Inner {
    instance: String,
    output_limit: u64,
    default_image: String,
    allowed_images: Vec<String>,
    world: Mutex<World>,
}

/// The in-memory engine; clones share one world.
#[derive(Clone)]
pub struct MemEngine {
    inner: Arc<Inner>,
}

impl Default for MemEngine {
    fn default() -> Self {
        MemEngine::new("mem")
    }
}

/// The default image of a [`MemEngine`].
pub const MEM_IMAGE: &str = "mem-agent:1";

fn no_such(name: &str) -> ContainerError {
    ContainerError::Cli {
        docker: "mem".into(),
        what: format!("inspect {name}"),
        detail: "no such container".into(),
    }
}

impl MemEngine {
    /// An engine for runner instance `instance`, default image [`MEM_IMAGE`], the default
    /// output limit.
    pub fn new(instance: &str) -> Self {
        MemEngine::with_limit(instance, DEFAULT_OUTPUT_LIMIT)
    }

    /// [`MemEngine::new`] with its own output limit (the driver's meter reads it).
    pub fn with_limit(instance: &str, output_limit: u64) -> Self {
        MemEngine {
            inner: Arc::new(Inner {
                instance: instance.to_owned(),
                output_limit,
                default_image: MEM_IMAGE.into(),
                allowed_images: Vec::new(),
                world: Mutex::new(World::default()),
            }),
        }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.inner.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The script the containers of `run_id` run (set before they are created).
    pub fn script_run(&self, run_id: i64, script: AgentScript) {
        self.world().scripts.insert(run_id, script);
    }

    /// The script of containers whose run has none of its own.
    pub fn script_default(&self, script: AgentScript) {
        self.world().default_script = script;
    }

    /// Every line written to container `name`'s stdin, over every attach (also after its
    /// removal).
    pub fn stdin_lines(&self, name: &str) -> Vec<String> {
        self.world().stdin.get(name).cloned().unwrap_or_default()
    }

    /// How many prompt commands (spec 6.1) container `name` was sent: exactly one is right.
    pub fn prompts_sent(&self, name: &str) -> usize {
        self.stdin_lines(name)
            .iter()
            .filter(|l| l.contains(r#""type":"prompt""#))
            .count()
    }

    /// Whether container `name`'s stdin was closed for good.
    pub fn stdin_closed(&self, name: &str) -> bool {
        self.world()
            .containers
            .get(name)
            .is_some_and(|c| !c.stdin_open)
    }

    /// The containers that exist now, by name.
    pub fn containers(&self) -> Vec<String> {
        self.world().containers.keys().cloned().collect()
    }

    /// The containers removed so far, in order.
    pub fn removed(&self) -> Vec<String> {
        self.world().removed.clone()
    }

    /// How often the idle images were pruned.
    pub fn prunes(&self) -> u32 {
        self.world().prunes
    }

    /// Ends a running container as if its process died with `code` (an OOM kill, a crash).
    pub fn exit(&self, name: &str, code: i32) {
        let mut world = self.world();
        if let Some(c) = world.containers.get_mut(name) {
            c.end(code);
        }
        world.changed();
    }

    fn state_of(&self, name: &str) -> Option<ContainerState> {
        self.world().containers.get(name).map(|c| match c.status {
            Status::Created => ContainerState::Created,
            Status::Running => ContainerState::Running,
            Status::Exited(code) => ContainerState::Exited {
                code,
                oom_killed: false,
            },
        })
    }

    fn kill_now(&self, name: &str) {
        let mut world = self.world();
        if let Some(c) = world.containers.get_mut(name) {
            c.end(KILLED);
        }
        world.changed();
    }

    /// Closes `name`'s stdin for good: an agent waiting for the EOF exits.
    fn close_stdin(&self, name: &str) {
        let mut world = self.world();
        if let Some(c) = world.containers.get_mut(name) {
            c.stdin_open = false;
            if let (Status::Running, AgentEnd::ExitAtEof(code)) = (c.status, c.script.end) {
                c.status = Status::Exited(code);
            }
        }
        world.changed();
    }

    fn write_stdin(&self, name: &str, line: &str) -> io::Result<()> {
        let mut world = self.world();
        let c = world
            .containers
            .get_mut(name)
            .filter(|c| c.status == Status::Running && c.stdin_open)
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "nobody reads the stdin"))?;
        c.stdin_lines += 1;
        if c.script.reads_prompt && c.stdin_lines == 1 {
            c.print();
        }
        world
            .stdin
            .entry(name.to_owned())
            .or_default()
            .push(line.to_owned());
        world.changed();
        Ok(())
    }

    fn port(&self, name: &str) -> io::Result<StdinChannel> {
        let world = self.world();
        match world.containers.get(name) {
            None => Err(io::Error::new(io::ErrorKind::NotFound, "no such container")),
            Some(c) if !c.stdin_open || matches!(c.status, Status::Exited(_)) => Err(
                io::Error::new(io::ErrorKind::BrokenPipe, "the container's stdin is closed"),
            ),
            Some(_) => Ok(StdinChannel::new(Box::new(MemStdin {
                engine: self.clone(),
                name: name.to_owned(),
            }))),
        }
    }

    /// Waits until `name` is no longer running: its exit code, `None` when it is gone.
    async fn exited(&self, name: &str) -> Option<i32> {
        std::future::poll_fn(|cx| {
            let mut world = self.world();
            match world.containers.get(name).map(|c| c.status) {
                None => Poll::Ready(None),
                Some(Status::Exited(code)) => Poll::Ready(Some(code)),
                Some(_) => {
                    world.wait_on(cx);
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// A [`MemEngine`] container's stdin. Dropped without `close` (a runner that died), the
/// container's stdin stays open for the next attach.
struct MemStdin {
    engine: MemEngine,
    name: String,
}

impl StdinPort for MemStdin {
    fn send<'a>(&'a self, line: &'a str) -> EngineFuture<'a, io::Result<()>> {
        Box::pin(async move { self.engine.write_stdin(&self.name, line) })
    }

    fn survives_close(&self) -> bool {
        false
    }

    fn close(self: Box<Self>) -> EngineFuture<'static, ()> {
        Box::pin(async move { self.engine.close_stdin(&self.name) })
    }
}

/// One stream of a [`MemEngine`] container's output, read from its start.
struct MemLogReader {
    engine: MemEngine,
    name: String,
    stderr: bool,
    offset: usize,
    follow: bool,
    ended: Arc<AtomicBool>,
}

impl AsyncRead for MemLogReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ended.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        let mut world = this.engine.world();
        let Some(c) = world.containers.get(&this.name) else {
            return Poll::Ready(Ok(())); // removed: the stream ends
        };
        let data = if this.stderr { &c.stderr } else { &c.stdout };
        if this.offset < data.len() {
            let n = buf.remaining().min(data.len() - this.offset);
            buf.put_slice(&data[this.offset..this.offset + n]);
            this.offset += n;
            return Poll::Ready(Ok(()));
        }
        if !this.follow || c.status != Status::Running {
            return Poll::Ready(Ok(()));
        }
        world.wait_on(cx);
        Poll::Pending
    }
}

/// Ends a [`MemEngine`] logs pair early.
struct MemLogSource {
    engine: MemEngine,
    ended: Arc<AtomicBool>,
}

impl LogSource for MemLogSource {
    fn kill(&mut self) -> EngineFuture<'_, ()> {
        self.ended.store(true, Ordering::SeqCst);
        self.engine.world().changed();
        Box::pin(async {})
    }

    fn finish(self: Box<Self>) -> EngineFuture<'static, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

impl ContainerEngine for MemEngine {
    fn shared(&self) -> Arc<dyn ContainerEngine> {
        Arc::new(self.clone())
    }

    fn instance(&self) -> &str {
        &self.inner.instance
    }

    fn output_limit(&self) -> u64 {
        self.inner.output_limit
    }

    fn program(&self) -> &str {
        "mem"
    }

    /// The real rules without the engine: a valid reference, the default image or one in
    /// the allowlist; no contract label to read.
    fn check_job_image<'a>(
        &'a self,
        kind: LaunchKind,
        requested: Option<&'a str>,
    ) -> EngineFuture<'a, Result<String, ContainerError>> {
        Box::pin(async move {
            let requested = requested.map(str::trim).filter(|s| !s.is_empty());
            let image = match (kind, requested) {
                (_, Some(image)) => image.to_owned(),
                (LaunchKind::CodingAgent, None) => self.inner.default_image.clone(),
                (LaunchKind::Container, None) => return Err(ContainerError::NoContainerImage),
            };
            check_image_ref("the job's image", &image)?;
            if image != self.inner.default_image && !self.inner.allowed_images.contains(&image) {
                return Err(ContainerError::ImageNotAllowed { image });
            }
            Ok(image)
        })
    }

    fn create<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        _env_dir: &'a Path,
    ) -> EngineFuture<'a, Result<String, ContainerError>> {
        Box::pin(async move {
            if spec.image.trim().is_empty() {
                return Err(match spec.kind {
                    LaunchKind::CodingAgent => ContainerError::NoImage,
                    LaunchKind::Container => ContainerError::NoContainerImage,
                });
            }
            let name = container_name(&self.inner.instance, spec.run_id, spec.attempt);
            let mut world = self.world();
            if !world.containers.contains_key(&name) {
                let script = world
                    .scripts
                    .get(&spec.run_id)
                    .unwrap_or(&world.default_script)
                    .clone();
                let container = Container {
                    run_id: spec.run_id,
                    attempt: spec.attempt,
                    status: Status::Created,
                    script,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    stdin_lines: 0,
                    stdin_open: spec.kind == LaunchKind::CodingAgent,
                    printed: false,
                };
                world.containers.insert(name.clone(), container);
                world.changed();
            }
            Ok(name)
        })
    }

    fn start<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(async move {
            let mut world = self.world();
            let c = world
                .containers
                .get_mut(name)
                .ok_or_else(|| no_such(name))?;
            if c.status == Status::Created {
                c.status = Status::Running;
                if !c.script.reads_prompt {
                    c.print();
                }
            }
            world.changed();
            Ok(())
        })
    }

    fn state<'a>(
        &'a self,
        name: &'a str,
    ) -> EngineFuture<'a, Result<Option<ContainerState>, ContainerError>> {
        Box::pin(async move { Ok(self.state_of(name)) })
    }

    fn wait_exit<'a>(
        &'a self,
        name: &'a str,
    ) -> EngineFuture<'a, Result<Option<i32>, ContainerError>> {
        Box::pin(async move { Ok(self.exited(name).await) })
    }

    fn kill<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(async move {
            self.kill_now(name);
            Ok(())
        })
    }

    /// SIGTERM ends the agent at once unless it ignores it; then the SIGKILL after `grace`.
    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(async move {
            let deaf = {
                let mut world = self.world();
                let Some(c) = world.containers.get_mut(name) else {
                    return Ok(());
                };
                if !c.script.ignores_term {
                    c.end(TERMINATED);
                }
                let deaf = c.status == Status::Running;
                world.changed();
                deaf
            };
            if deaf
                && tokio::time::timeout(grace, self.exited(name))
                    .await
                    .is_err()
            {
                self.kill_now(name);
            }
            Ok(())
        })
    }

    fn remove<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(async move {
            let mut world = self.world();
            if world.containers.remove(name).is_some() {
                world.removed.push(name.to_owned());
            }
            world.changed();
            Ok(())
        })
    }

    fn find_instance_containers(
        &self,
    ) -> EngineFuture<'_, Result<Vec<FoundContainer>, ContainerError>> {
        Box::pin(async move {
            let names = self.containers();
            Ok(names
                .into_iter()
                .filter_map(|name| {
                    let state = self.state_of(&name)?;
                    let world = self.world();
                    let c = world.containers.get(&name)?;
                    Some(FoundContainer {
                        run_id: Some(c.run_id),
                        attempt: Some(c.attempt),
                        name,
                        state,
                    })
                })
                .collect())
        })
    }

    fn open_logs<'a>(
        &'a self,
        name: &'a str,
        follow: bool,
    ) -> EngineFuture<'a, Result<Logs, ContainerError>> {
        Box::pin(async move {
            if !self.world().containers.contains_key(name) {
                return Err(no_such(name));
            }
            let ended = Arc::new(AtomicBool::new(false));
            let reader = |stderr| MemLogReader {
                engine: self.clone(),
                name: name.to_owned(),
                stderr,
                offset: 0,
                follow,
                ended: ended.clone(),
            };
            Ok(Logs {
                stdout: Box::new(reader(false)),
                stderr: Box::new(reader(true)),
                source: Box::new(MemLogSource {
                    engine: self.clone(),
                    ended: ended.clone(),
                }),
            })
        })
    }

    fn attach_stdin<'a>(
        &'a self,
        name: &'a str,
        _run_dir: &'a Path,
    ) -> EngineFuture<'a, io::Result<StdinChannel>> {
        Box::pin(async move { self.port(name) })
    }

    fn reattach_stdin<'a>(
        &'a self,
        name: &'a str,
        _run_dir: &'a Path,
    ) -> EngineFuture<'a, Option<StdinChannel>> {
        Box::pin(async move { self.port(name).ok() })
    }

    fn prune_idle_images(&self, _after: Duration) -> EngineFuture<'_, ImagePrune> {
        Box::pin(async move {
            self.world().prunes += 1;
            ImagePrune::default()
        })
    }
}
