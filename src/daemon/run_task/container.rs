//! The container phase of a run: create and start (or re-attach), write the prompt once,
//! drive the container to its end while forwarding its output, and replay a stopped
//! container's output after a crash.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{stop_pending, Interrupted, RunTask, StopRequest};
use crate::control::events::RunEvents;
use crate::control::wire::EventRequest;
use crate::effects::agent_driver::{self, DriveOptions, DriveResult, DriverOutput, StdinChannel};
use crate::effects::container::{ContainerSpec, LaunchKind};
use crate::effects::session::{
    create_private_dir, read_progress, remove_dir, send_prompt, Progress, PROMPT_SENT_FILE,
};
use crate::fsm::{AgentBudget, Effect, Event, RunState, AGENT_RECORD_BUDGET};
use crate::redact::redact;

impl RunTask {
    pub(super) fn container_dir(&self, name: &str) -> PathBuf {
        self.ctx.containers_dir.join(name)
    }

    /// Creates, starts (or re-attaches to) and drives the container to its end, forwarding
    /// its output and journaling what decides the verdict.
    pub(super) async fn run_container(
        &mut self,
        name: &str,
        reattach: bool,
    ) -> Result<Vec<Effect>, Interrupted> {
        let plan = self.last.state.plan().clone();
        let coding = plan.is_coding_agent();
        let dir = self.container_dir(name);
        let mut effects = Vec::new();
        let mut stdin;
        let mut options = DriveOptions {
            grace: self.ctx.grace,
            handshake_marker: Some(dir.join(agent_driver::HANDSHAKE_STOP_FILE)),
            ..Default::default()
        };
        if reattach {
            // API driver: a new attach (the container's stdin never closed); CLI driver: the
            // stdin holder the previous process left.
            stdin = StdinChannel::reattach(&self.ctx.engine, name, &dir).await;
            if stdin.is_none() && coding {
                // The runner died between starting the container and spawning its stdin
                // holder (or the holder died): attach a new one. The container was created
                // with stdin open and not closed on detach, so the agent still waits there
                // for its prompt; without this the run would hang until RUN_TIMEOUT.
                let _ = create_private_dir(&dir);
                match StdinChannel::attach(&self.ctx.engine, name, &dir).await {
                    Ok(channel) => stdin = Some(channel),
                    Err(e) => warn!(
                        run_id = self.run_id,
                        container = name,
                        "cannot attach a new stdin holder: {e}"
                    ),
                }
            }
            let (out, err) = read_progress(&dir);
            options.skip_stdout_lines = out;
            options.skip_stderr_lines = err;
            // Signals the previous process coalesced died with it: fold the whole stream.
            options.resignal_skipped = self.agent_budget_for(name).await.spent();
            info!(
                run_id = self.run_id,
                container = name,
                stdin = stdin.is_some(),
                "re-attached to the running container"
            );
            // The runner may have died between starting the container and writing the prompt.
            if coding && !dir.join(PROMPT_SENT_FILE).exists() {
                if let Err(e) = send_prompt(stdin.as_ref(), &plan.prompt, &dir).await {
                    warn!(
                        run_id = self.run_id,
                        "writing the prompt after re-attach failed: {e}; killing the container (the agent can never receive its prompt)"
                    );
                    stdin = None;
                    // Without a prompt the agent waits on an open stdin forever (found by the
                    // chaos suite: SIGKILL between `start` and the stdin holder). Killing the
                    // container ends the run as failed (spec 6.1) instead of hanging it.
                    if let Err(e) = self.ctx.engine.kill(name).await {
                        warn!(run_id = self.run_id, "cannot kill the container: {e}");
                    }
                }
            }
        } else {
            let started = self.create_and_start(name, &dir, coding).await;
            // The prompt is written here rather than by the driver so that a marker can
            // record it: a re-attach after a crash then neither loses nor repeats it.
            let started = match started {
                Ok(channel) if coding => send_prompt(channel.as_ref(), &plan.prompt, &dir)
                    .await
                    .map(|()| channel)
                    .map_err(|e| format!("writing the prompt to the agent failed: {e}")),
                other => other,
            };
            match started {
                Ok(channel) => stdin = channel,
                Err(error) => {
                    warn!(
                        run_id = self.run_id,
                        container = name,
                        "container did not start: {error}"
                    );
                    let _ = self.ctx.engine.remove(name).await;
                    remove_dir(&dir);
                    return self.commit(Event::ContainerStartFailed { error }).await;
                }
            }
            for effect in self.commit(Event::ContainerStarted).await? {
                if !matches!(effect, Effect::KillContainer { .. }) {
                    effects.push(effect);
                }
            }
            // A fresh attempt: its output has caused no record yet.
            self.agent_budget = Some(AgentBudget::new(name, 0, AGENT_RECORD_BUDGET));
        }

        let (out_tx, mut out_rx) = mpsc::channel::<DriverOutput>(1024);
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let mut cancel_tx = Some(cancel_tx);
        let engine = self.ctx.engine.clone();
        let driver_name = name.to_owned();
        let mut driver = tokio::spawn(async move {
            agent_driver::drive(
                &engine,
                &driver_name,
                stdin,
                options,
                async {
                    let _ = cancel_rx.await;
                },
                out_tx,
            )
            .await
        });
        // A stop journaled before the container started (or before a restart) applies now.
        if stop_pending(&self.last.state) {
            if let Some(tx) = cancel_tx.take() {
                let _ = tx.send(());
            }
        }
        let mut progress = Progress::load(&dir);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let result: Result<DriveResult, String> = loop {
            tokio::select! {
                biased;
                Some(output) = out_rx.recv() => self.forward(output, &mut progress).await?,
                joined = &mut driver => {
                    break match joined {
                        Ok(Ok(r)) => Ok(r),
                        Ok(Err(e)) => Err(redact(&e.to_string()).into_owned()),
                        Err(e) => Err(format!("driver task failed: {e}")),
                    };
                }
                stop = self.next_stop() => {
                    for effect in self.commit(stop).await? {
                        match effect {
                            Effect::KillContainer { .. } => {
                                if let Some(tx) = cancel_tx.take() {
                                    let _ = tx.send(());
                                }
                            }
                            other => effects.push(other),
                        }
                    }
                }
                _ = tick.tick() => {
                    progress.save_delivered(self.delivery.completed());
                    if self.events.as_ref().is_some_and(RunEvents::is_stopped) {
                        warn!(run_id = self.run_id, "the server says the run is no longer running; abandoning it");
                        for effect in self.commit(Event::RunNoLongerRunning).await? {
                            match effect {
                                Effect::KillContainer { .. } => {
                                    if let Some(tx) = cancel_tx.take() {
                                        let _ = tx.send(());
                                    }
                                }
                                other => effects.push(other),
                            }
                        }
                    }
                }
            }
        };
        while let Ok(output) = out_rx.try_recv() {
            self.forward(output, &mut progress).await?;
        }
        let exit = match &result {
            Ok(r) => {
                if let Some(e) = &r.prompt_error {
                    warn!(
                        run_id = self.run_id,
                        "writing the prompt failed: {}",
                        redact(e)
                    );
                }
                debug!(run_id = self.run_id, ?r, "container finished");
                // The runner's own stop after session_idle (API driver: no stdin to close)
                // is judged as the clean exit a closed stdin would have given.
                match r.judged_exit_code() {
                    Some(code) => Event::ContainerExited { code: Some(code) },
                    None => Event::ContainerVanished,
                }
            }
            Err(e) => {
                warn!(
                    run_id = self.run_id,
                    container = name,
                    "driving the container failed: {e}"
                );
                match self.ctx.engine.state(name).await {
                    Ok(Some(crate::effects::container::ContainerState::Exited {
                        code, ..
                    })) => Event::ContainerExited { code: Some(code) },
                    _ => Event::ContainerVanished,
                }
            }
        };
        effects.extend(self.commit(exit).await?);
        // The result is durable. The container (with its private files) goes once the sender
        // has delivered its output: until then its logs are the only copy of the queued lines
        // that a crash would lose (F5); recovery replays them from there.
        progress.save_delivered(self.delivery.completed());
        self.pending_output.push((name.to_owned(), progress));
        if self.events.as_ref().is_none_or(|e| e.backlog() == 0) {
            self.settle_output().await;
        }
        Ok(effects)
    }

    /// Removes the stopped containers (and their private files) whose output the event sender
    /// has delivered (or the server refused for good). Call only when its backlog is empty.
    pub(super) async fn settle_output(&mut self) {
        for (name, _) in std::mem::take(&mut self.pending_output) {
            if let Err(e) = self.ctx.engine.remove(&name).await {
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

    /// Recovery: forwards, in order, what each stopped container printed after the saved
    /// progress, through the normal event sender. While the run is still in its container
    /// phase (its exit not yet harvested), the signals and stream degradation of the run's
    /// current container are fed to the state machine too: the previous process may have died
    /// before reading the agent's last lines (say, a `finish` printed while no runner
    /// watched), and the exit must be judged with them. Lines it did read are folded again
    /// with the same result (a finish or error: the last one wins; idle and degraded stick),
    /// and a repeat that changes nothing is not journaled. Past the container phase the
    /// verdict is journaled and signals are not fed. A cancel that arrives meanwhile is
    /// journaled and its effects returned for the queue; a drain past its deadline leaves the
    /// run (and the container) for the next start, which replays again.
    pub(super) async fn replay_output(
        &mut self,
        containers: &[String],
    ) -> Result<Vec<Effect>, Interrupted> {
        let mut extra = Vec::new();
        let mut listening = true;
        for name in containers {
            let dir = self.container_dir(name);
            let mut progress = Progress::load(&dir);
            let (tx, mut rx) = mpsc::channel::<DriverOutput>(1024);
            let engine = self.ctx.engine.clone();
            let reader_name = name.clone();
            let (skip_out, skip_err) = (progress.stdout, progress.stderr);
            // Past the budget the previous process coalesced signals in memory, which died
            // with it: fold the container's whole stdout again (signals only).
            let resignal = self.judges_container(name) && self.agent_budget_for(name).await.spent();
            let reader = tokio::spawn(async move {
                agent_driver::replay(&engine, &reader_name, skip_out, skip_err, resignal, tx).await
            });
            let mut forwarded = 0u64;
            loop {
                let output = tokio::select! {
                    biased;
                    output = rx.recv() => output,
                    stop = self.stops.recv(), if listening => {
                        match stop {
                            Some(StopRequest::Drain) => return Err(Interrupted::Shutdown),
                            Some(StopRequest::Cancel) => {
                                extra.extend(self.commit(StopRequest::Cancel.event()).await?);
                            }
                            None => listening = false,
                        }
                        continue;
                    }
                };
                let Some(output) = output else { break };
                match output {
                    DriverOutput::Event { .. } => forwarded += 1,
                    // Signals count only while this container's exit is still to be judged.
                    DriverOutput::Signal(_) | DriverOutput::StreamDegraded { .. }
                        if !self.judges_container(name) =>
                    {
                        continue
                    }
                    _ => {}
                }
                self.forward(output, &mut progress).await?;
            }
            match reader.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => warn!(
                    run_id = self.run_id,
                    container = %name,
                    "replaying the container's output failed: {}",
                    redact(&e.to_string())
                ),
                Err(e) => warn!(
                    run_id = self.run_id,
                    container = %name,
                    "output replay task failed: {e}"
                ),
            }
            info!(
                run_id = self.run_id,
                container = %name,
                forwarded,
                after_stdout = skip_out,
                after_stderr = skip_err,
                "replayed the container's output past the saved progress"
            );
            progress.save_delivered(self.delivery.completed());
            self.pending_output.push((name.clone(), progress));
        }
        Ok(extra)
    }

    pub(super) async fn create_and_start(
        &self,
        name: &str,
        dir: &Path,
        coding: bool,
    ) -> Result<Option<StdinChannel>, String> {
        let plan = self.last.state.plan();
        if coding && plan.prompt.trim().is_empty() {
            return Err("InitialPrompt is required".into());
        }
        // Every job kind: a valid reference, the allowlist and the contract label (issue 11).
        let kind = LaunchKind::for_job_kind(&plan.kind);
        let image = self
            .ctx
            .engine
            .check_job_image(kind, Some(&plan.image))
            .await
            .map_err(|e| redact(&e.to_string()).into_owned())?;
        let checkout = match &self.last.state {
            RunState::Prepared { checkout, .. } if !checkout.root.is_empty() => {
                Some(PathBuf::from(&checkout.root))
            }
            _ => None,
        };
        let attempt = match &self.last.state {
            RunState::Prepared { container, .. } => container.attempt,
            _ => 1,
        };
        let spec = ContainerSpec {
            run_id: self.run_id,
            attempt,
            kind,
            image,
            env: plan.container_env(&self.secrets),
            checkout,
            extra_args: Vec::new(),
        };
        create_private_dir(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let created = self
            .ctx
            .engine
            .create(&spec, dir)
            .await
            .map_err(|e| redact(&e.to_string()).into_owned())?;
        if created != name {
            return Err(format!(
                "internal: engine named the container {created:?}, the journal {name:?}"
            ));
        }
        agent_driver::start(&self.ctx.engine, name, dir, coding)
            .await
            .map_err(|e| redact(&e.to_string()).into_owned())
    }

    /// Whether `name` is the run's current container and its exit is not yet judged, so its
    /// agent signals still count toward the verdict.
    pub(super) fn judges_container(&self, name: &str) -> bool {
        matches!(
            &self.last.state,
            RunState::Running { container, after: None, .. } if container.name == name
        )
    }

    /// One driver output: events go to the server (ordered, paced), signals to the journal.
    pub(super) async fn forward(
        &mut self,
        output: DriverOutput,
        progress: &mut Progress,
    ) -> Result<(), Interrupted> {
        match output {
            DriverOutput::Event {
                event_type,
                payload_json,
                line,
            } => {
                if let Some(events) = &self.events {
                    events
                        .send(EventRequest {
                            event_type: event_type.clone(),
                            payload_json,
                        })
                        .await;
                }
                progress.forwarded(&event_type, line, self.delivery.accepted());
            }
            DriverOutput::Signal(signal) => {
                self.commit_agent(Event::AgentSignal { signal }).await?;
            }
            DriverOutput::StreamDegraded { stream } => {
                warn!(
                    run_id = self.run_id,
                    stream, "agent output stream degraded (a line over 1 MiB, or WSRUNNER_AGENT_OUTPUT_LIMIT reached); the rest of the stream is discarded"
                );
                self.commit_agent(Event::StreamDegraded).await?;
            }
        }
        Ok(())
    }
}
