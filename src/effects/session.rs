//! The container session of a run, beside the engine: start (create, start, the prompt
//! written once) or re-attach, the JSONL driver as its own task, the exit it is judged as,
//! the replay of a stopped container's output, and where the output goes ([`RunOutput`]:
//! events to the server, signals back for the journal, stopped containers kept until their
//! output is delivered). The host-side files beside each container (its private 0700
//! directory, the prompt marker, the forwarded-output [`Progress`]) let a re-attach or a
//! replay after a crash neither lose nor repeat what the agent was sent or printed.
//!
//! Nothing here writes the journal: the run loop (src/daemon/run_task) journals the events
//! this returns. The engine is reached only through [`ContainerEngine`], so the tests below
//! drive this code over the in-memory engine.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::control::events::{Delivery, RunEvents, RunEventsSummary};
use crate::control::wire::EventRequest;
use crate::effects::agent_driver::{self, DriveOptions, DriveResult, DriverOutput, StdinChannel};
use crate::effects::container::{container_name, ContainerError, ContainerSpec, ContainerState};
use crate::effects::engine::ContainerEngine;
use crate::fsm::Event;
use crate::redact::redact;

/// Line counters of the agent's output already forwarded, kept beside the container's
/// private files so a re-attach after a crash resumes without re-sending them.
pub(crate) const PROGRESS_FILE: &str = "forwarded-lines";
/// Marks that the prompt was written to the agent's stdin (spec 6.1: exactly once).
pub(crate) const PROMPT_SENT_FILE: &str = "prompt-sent";

pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

pub(crate) fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("remove {}: {e}", dir.display());
        }
    }
}

/// How far a container's output got: the raw line numbers handed to the event sender, each
/// with the sender's count of accepted events right after it, and the last line numbers the
/// server is known to have answered, saved in the container's private directory. A re-attach
/// or a recovery replay resumes after the saved numbers: delivery is at-least-once across a
/// crash (lines answered after the last save are sent again), exact across a clean stop.
pub(crate) struct Progress {
    dir: PathBuf,
    pub(crate) stdout: u64,
    pub(crate) stderr: u64,
    /// (accepted count after the line, stdout, stderr), oldest first, not yet answered.
    marks: VecDeque<(u64, u64, u64)>,
    /// The numbers of the last line the server answered, and the numbers in the file.
    delivered: (u64, u64),
    saved: (u64, u64),
}

impl Progress {
    pub(crate) fn load(dir: &Path) -> Progress {
        let (stdout, stderr) = read_progress(dir);
        Progress {
            dir: dir.to_owned(),
            stdout,
            stderr,
            marks: VecDeque::new(),
            delivered: (stdout, stderr),
            saved: (stdout, stderr),
        }
    }

    /// Line `line` of `stream` was handed to the sender, which has now accepted `accepted`.
    pub(crate) fn forwarded(&mut self, stream: &str, line: u64, accepted: u64) {
        match stream {
            "stderr" => self.stderr = self.stderr.max(line),
            _ => self.stdout = self.stdout.max(line),
        }
        // The same count means nothing was sent in between: keep only the latest numbers.
        match self.marks.back_mut() {
            Some(last) if last.0 == accepted => *last = (accepted, self.stdout, self.stderr),
            _ => self.marks.push_back((accepted, self.stdout, self.stderr)),
        }
    }

    /// Saves the line numbers of everything the server has answered (`completed` of the
    /// sender's calls, a prefix in order).
    pub(crate) fn save_delivered(&mut self, completed: u64) {
        while let Some(&(accepted, stdout, stderr)) = self.marks.front() {
            if accepted > completed {
                break;
            }
            self.delivered = (stdout, stderr);
            self.marks.pop_front();
        }
        let now = self.delivered;
        if now == self.saved {
            return;
        }
        let tmp = self.dir.join(format!("{PROGRESS_FILE}.tmp"));
        let text = format!("{} {}\n", now.0, now.1);
        if std::fs::write(&tmp, text).is_ok()
            && std::fs::rename(&tmp, self.dir.join(PROGRESS_FILE)).is_ok()
        {
            self.saved = now;
        }
    }
}

/// Writes the prompt command (spec 6.1) and records that it was written.
pub(crate) async fn send_prompt(
    stdin: Option<&StdinChannel>,
    prompt: &str,
    dir: &Path,
) -> Result<(), String> {
    let stdin = stdin.ok_or("the container's stdin is not attached")?;
    let line = serde_json::json!({"type": "prompt", "message": prompt}).to_string();
    stdin.send(&line).await.map_err(|e| e.to_string())?;
    std::fs::write(dir.join(PROMPT_SENT_FILE), b"1\n").map_err(|e| e.to_string())
}

pub(crate) fn read_progress(dir: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(dir.join(PROGRESS_FILE)).unwrap_or_default();
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Where the output of a run's containers goes: events to the server (ordered, paced), the
/// agent's signals back to the caller for the journal, and the stopped containers whose
/// output may not be delivered yet. Their logs are the only copy of that output after a
/// crash (F5), so they are removed only once the sender has drained ([`RunOutput::settle`]).
pub(crate) struct RunOutput {
    run_id: i64,
    engine: Arc<dyn ContainerEngine>,
    containers_dir: PathBuf,
    events: Option<RunEvents>,
    /// The event stream's progress, kept after `events` is consumed (report, shutdown).
    delivery: Delivery,
    pending: Vec<(String, Progress)>,
}

impl RunOutput {
    pub(crate) fn new(
        run_id: i64,
        events: RunEvents,
        engine: Arc<dyn ContainerEngine>,
        containers_dir: PathBuf,
    ) -> Self {
        RunOutput {
            run_id,
            engine,
            containers_dir,
            delivery: events.delivery(),
            events: Some(events),
            pending: Vec::new(),
        }
    }

    /// The private directory of container `name`.
    pub(crate) fn container_dir(&self, name: &str) -> PathBuf {
        self.containers_dir.join(name)
    }

    /// How many of the sender's calls the server has answered (a prefix in order).
    pub(crate) fn delivered(&self) -> u64 {
        self.delivery.completed()
    }

    /// The server said the run is no longer running (its event calls answer so).
    pub(crate) fn server_stopped(&self) -> bool {
        self.events.as_ref().is_some_and(RunEvents::is_stopped)
    }

    /// Queues one event for the server.
    pub(crate) async fn send_event(&self, event_type: String, payload_json: String) {
        if let Some(events) = &self.events {
            events
                .send(EventRequest {
                    event_type,
                    payload_json,
                })
                .await;
        }
    }

    /// One driver output: an event goes to the server; a signal (or the stream's
    /// degradation) comes back as the event to journal.
    pub(crate) async fn forward(
        &self,
        output: DriverOutput,
        progress: &mut Progress,
    ) -> Option<Event> {
        match output {
            DriverOutput::Event {
                event_type,
                payload_json,
                line,
            } => {
                self.send_event(event_type.clone(), payload_json).await;
                progress.forwarded(&event_type, line, self.delivery.accepted());
                None
            }
            DriverOutput::Signal(signal) => Some(Event::AgentSignal { signal }),
            DriverOutput::StreamDegraded { stream } => {
                warn!(
                    run_id = self.run_id,
                    stream, "agent output stream degraded (a line over 1 MiB, or WSRUNNER_AGENT_OUTPUT_LIMIT reached); the rest of the stream is discarded"
                );
                Some(Event::StreamDegraded)
            }
        }
    }

    /// A container stopped and its result is durable: it (with its private files) goes once
    /// the sender has delivered its output; recovery replays from the saved progress until
    /// then.
    pub(crate) async fn container_done(&mut self, name: &str, progress: Progress) {
        self.keep_until_delivered(name, progress);
        if self.events.as_ref().is_none_or(|e| e.backlog() == 0) {
            self.settle().await;
        }
    }

    /// Keeps stopped container `name` until its output is delivered.
    pub(crate) fn keep_until_delivered(&mut self, name: &str, mut progress: Progress) {
        progress.save_delivered(self.delivery.completed());
        self.pending.push((name.to_owned(), progress));
    }

    /// Removes the stopped containers (and their private files) whose output the event sender
    /// has delivered (or the server refused for good). Call only when its backlog is empty.
    pub(crate) async fn settle(&mut self) {
        for (name, _) in std::mem::take(&mut self.pending) {
            if let Err(e) = self.engine.remove(&name).await {
                warn!(
                    container = %name,
                    "container removal failed (the sweep retries): {e}"
                );
            }
            // After the container: a crash in between leaves the container with its saved
            // progress (a replay resumes there), never a container without it.
            remove_dir(&self.container_dir(&name));
        }
    }

    /// Every event goes out (or is refused for good); `None` when already finished.
    pub(crate) fn finish_events(
        &mut self,
    ) -> Option<impl std::future::Future<Output = RunEventsSummary> + Send + 'static> {
        self.events.take().map(RunEvents::finish)
    }

    /// The run is left for the next start: flush what is queued, briefly (a server that is
    /// down must not hold up a shutdown; the verdict-relevant facts are journaled already),
    /// then stop sending and record exactly how far the stopped containers' output got, so
    /// the next start replays the rest and repeats nothing.
    pub(crate) async fn halt(&mut self) {
        if let Some(events) = self.events.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), events.finish()).await;
        }
        self.delivery.halt(Duration::from_secs(5)).await;
        let completed = self.delivery.completed();
        for (_, progress) in &mut self.pending {
            progress.save_delivered(completed);
        }
    }

    /// The run is terminal: every event goes out, then every trace of its containers on the
    /// host goes (containers of any attempt, private files).
    pub(crate) async fn finish_terminal(&mut self) {
        if let Some(finish) = self.finish_events() {
            finish.await;
        }
        if let Ok(found) = self.engine.find_instance_containers().await {
            for c in found.iter().filter(|c| c.run_id == Some(self.run_id)) {
                if let Err(e) = self.engine.remove(&c.name).await {
                    warn!(container = %c.name, "container removal failed (the sweep retries): {e}");
                }
                remove_dir(&self.container_dir(&c.name));
            }
        }
        // Private dirs of attempts whose container was already gone (e.g. removed before a
        // crash, then redone by recovery); found by the chaos suite, else only the next
        // start's sweep removed them.
        let attempt0 = container_name(self.engine.instance(), self.run_id, 0);
        if let Some(prefix) = attempt0.strip_suffix('0') {
            if let Ok(entries) = std::fs::read_dir(&self.containers_dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.strip_prefix(prefix).is_some_and(|attempt| {
                        !attempt.is_empty() && attempt.bytes().all(|b| b.is_ascii_digit())
                    }) {
                        remove_dir(&entry.path());
                    }
                }
            }
        }
    }
}

/// What the container is started for.
pub(crate) struct Launch<'a> {
    pub spec: ContainerSpec,
    /// The job's own image (checked against the allowlist and the contract label).
    pub job_image: &'a str,
    pub coding: bool,
    pub prompt: &'a str,
}

/// Creates and starts container `name`, and writes the prompt once for a coding agent
/// (recorded, so a re-attach after a crash neither loses nor repeats it). On failure the
/// container and its private files are gone and the reason comes back.
pub(crate) async fn start(
    engine: &dyn ContainerEngine,
    name: &str,
    dir: &Path,
    launch: Launch<'_>,
) -> Result<Option<StdinChannel>, String> {
    let started = create_and_start(engine, name, dir, &launch).await;
    let started = match started {
        Ok(channel) if launch.coding => send_prompt(channel.as_ref(), launch.prompt, dir)
            .await
            .map(|()| channel)
            .map_err(|e| format!("writing the prompt to the agent failed: {e}")),
        other => other,
    };
    if started.is_err() {
        let _ = engine.remove(name).await;
        remove_dir(dir);
    }
    started
}

async fn create_and_start(
    engine: &dyn ContainerEngine,
    name: &str,
    dir: &Path,
    launch: &Launch<'_>,
) -> Result<Option<StdinChannel>, String> {
    if launch.coding && launch.prompt.trim().is_empty() {
        return Err("InitialPrompt is required".into());
    }
    // Every job kind: a valid reference, the allowlist and the contract label (issue 11).
    let image = engine
        .check_job_image(launch.spec.kind, Some(launch.job_image))
        .await
        .map_err(|e| redact(&e.to_string()).into_owned())?;
    let spec = ContainerSpec {
        image,
        ..launch.spec.clone()
    };
    create_private_dir(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let created = engine
        .create(&spec, dir)
        .await
        .map_err(|e| redact(&e.to_string()).into_owned())?;
    if created != name {
        return Err(format!(
            "internal: engine named the container {created:?}, the journal {name:?}"
        ));
    }
    agent_driver::start(engine, name, dir, launch.coding)
        .await
        .map_err(|e| redact(&e.to_string()).into_owned())
}

/// A container found running after a restart, attached again.
pub(crate) struct Reattached {
    pub stdin: Option<StdinChannel>,
    /// Output lines already forwarded (stdout, stderr): not sent again.
    pub skip: (u64, u64),
}

/// Re-attaches to running container `name`: its stdin (API driver: a new attach, the
/// container's stdin never closed; CLI driver: the holder the previous process left), and
/// the prompt if the previous process died before writing it. A container whose prompt can
/// never be written is killed, so the run fails (spec 6.1) instead of hanging.
pub(crate) async fn reattach(
    engine: &dyn ContainerEngine,
    run_id: i64,
    name: &str,
    dir: &Path,
    coding: bool,
    prompt: &str,
) -> Reattached {
    let mut stdin = StdinChannel::reattach(engine, name, dir).await;
    if stdin.is_none() && coding {
        // The runner died between starting the container and spawning its stdin holder (or
        // the holder died): attach a new one. The container was created with stdin open and
        // not closed on detach, so the agent still waits there for its prompt; without this
        // the run would hang until RUN_TIMEOUT.
        let _ = create_private_dir(dir);
        match StdinChannel::attach(engine, name, dir).await {
            Ok(channel) => stdin = Some(channel),
            Err(e) => warn!(
                run_id,
                container = name,
                "cannot attach a new stdin holder: {e}"
            ),
        }
    }
    let skip = read_progress(dir);
    info!(
        run_id,
        container = name,
        stdin = stdin.is_some(),
        "re-attached to the running container"
    );
    // The runner may have died between starting the container and writing the prompt.
    if coding && !dir.join(PROMPT_SENT_FILE).exists() {
        if let Err(e) = send_prompt(stdin.as_ref(), prompt, dir).await {
            warn!(
                run_id,
                "writing the prompt after re-attach failed: {e}; killing the container (the agent can never receive its prompt)"
            );
            stdin = None;
            // Without a prompt the agent waits on an open stdin forever (found by the chaos
            // suite: SIGKILL between `start` and the stdin holder). Killing the container
            // ends the run as failed (spec 6.1) instead of hanging it.
            if let Err(e) = engine.kill(name).await {
                warn!(run_id, "cannot kill the container: {e}");
            }
        }
    }
    Reattached { stdin, skip }
}

/// The JSONL driver of one attached container, running as its own task: its output comes
/// through the channel given to [`Driver::spawn`], its end through [`Driver::ended`].
pub(crate) struct Driver {
    task: tokio::task::JoinHandle<Result<DriveResult, ContainerError>>,
    cancel: Option<oneshot::Sender<()>>,
}

impl Driver {
    pub(crate) fn spawn(
        engine: &dyn ContainerEngine,
        name: &str,
        stdin: Option<StdinChannel>,
        options: DriveOptions,
        output: mpsc::Sender<DriverOutput>,
    ) -> Driver {
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let engine = engine.shared();
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            agent_driver::drive(
                &*engine,
                &name,
                stdin,
                options,
                async {
                    let _ = cancel_rx.await;
                },
                output,
            )
            .await
        });
        Driver {
            task,
            cancel: Some(cancel_tx),
        }
    }

    /// Stops the agent: abort, the grace, then a kill (spec 6.4). Once is enough.
    pub(crate) fn stop_agent(&mut self) {
        if let Some(tx) = self.cancel.take() {
            let _ = tx.send(());
        }
    }

    /// The driver's end (cancel-safe: select it in a loop).
    pub(crate) async fn ended(&mut self) -> Result<DriveResult, String> {
        match (&mut self.task).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(redact(&e.to_string()).into_owned()),
            Err(e) => Err(format!("driver task failed: {e}")),
        }
    }
}

/// The event a driven container's end is judged as.
pub(crate) async fn exit_event(
    engine: &dyn ContainerEngine,
    run_id: i64,
    name: &str,
    result: Result<DriveResult, String>,
) -> Event {
    match result {
        Ok(r) => {
            if let Some(e) = &r.prompt_error {
                warn!(run_id, "writing the prompt failed: {}", redact(e));
            }
            debug!(run_id, ?r, "container finished");
            // The runner's own stop after session_idle (API driver: no stdin to close) is
            // judged as the clean exit a closed stdin would have given.
            match r.judged_exit_code() {
                Some(code) => Event::ContainerExited { code: Some(code) },
                None => Event::ContainerVanished,
            }
        }
        Err(e) => {
            warn!(
                run_id,
                container = name,
                "driving the container failed: {e}"
            );
            match engine.state(name).await {
                Ok(Some(ContainerState::Exited { code, .. })) => {
                    Event::ContainerExited { code: Some(code) }
                }
                _ => Event::ContainerVanished,
            }
        }
    }
}

/// Reads what stopped container `name` printed past the saved progress into `output`, as a
/// task (`resignal`: fold the skipped stdout again, signals only); see [`replay_ended`].
pub(crate) fn spawn_replay(
    engine: &dyn ContainerEngine,
    name: &str,
    progress: &Progress,
    resignal: bool,
    output: mpsc::Sender<DriverOutput>,
) -> tokio::task::JoinHandle<Result<(u64, u64), ContainerError>> {
    let engine = engine.shared();
    let name = name.to_owned();
    let (skip_out, skip_err) = (progress.stdout, progress.stderr);
    tokio::spawn(async move {
        agent_driver::replay(&*engine, &name, skip_out, skip_err, resignal, output).await
    })
}

/// Waits for a replay's end; a failure is logged (what was read was forwarded).
pub(crate) async fn replay_ended(
    reader: tokio::task::JoinHandle<Result<(u64, u64), ContainerError>>,
    run_id: i64,
    name: &str,
) {
    match reader.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(
            run_id,
            container = %name,
            "replaying the container's output failed: {}",
            redact(&e.to_string())
        ),
        Err(e) => warn!(
            run_id,
            container = %name,
            "output replay task failed: {e}"
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests;
