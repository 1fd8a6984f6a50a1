//! The run loop's container phase: start the container (or re-attach to it), drive it to
//! its end while forwarding its output, and journal what decides the verdict; and the
//! start-up replay of stopped containers' output. The container work itself (start,
//! re-attach, the driver, the files beside it) is `effects::session`; here the loop
//! journals the container's events and routes the stops' effects: a kill while the driver
//! is attached becomes the driver's stop (abort, grace, kill).

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::super::failpoint::crash_failpoint_at;
use super::{Interrupted, RunTask, Waiting};
use crate::effects::agent_driver::{self, DriveOptions, DriveResult, DriverOutput};
use crate::effects::container::{ContainerSpec, LaunchKind};
use crate::effects::session::{self, Driver, Launch, Progress};
use crate::fsm::{Effect, Event, RunState};

/// Routes effects handed out while a driver is attached: a kill is the driver's stop; the
/// rest go to the run loop's queue.
fn route_attached(effects: Vec<Effect>, driver: &mut Driver, queue: &mut Vec<Effect>) {
    for effect in effects {
        match effect {
            Effect::KillContainer { .. } => driver.stop_agent(),
            other => queue.push(other),
        }
    }
}

impl RunTask {
    /// Starts (`reattach`: re-attaches to) container `name` and drives it to its end, then
    /// journals its exit. Returns the effects to queue.
    pub(super) async fn container_phase(
        &mut self,
        name: &str,
        reattach: bool,
    ) -> Result<Vec<Effect>, Interrupted> {
        let plan = self.state().plan().clone();
        let coding = plan.is_coding_agent();
        let dir = self.output.container_dir(name);
        let mut effects = Vec::new();
        let mut options = DriveOptions {
            grace: self.ctx.grace,
            handshake_marker: Some(dir.join(agent_driver::HANDSHAKE_STOP_FILE)),
            ..Default::default()
        };
        // A kill handed out before the driver is attached is given to it once it is.
        let mut stop_at_attach = Vec::new();
        let stdin = if reattach {
            // Signals the previous process coalesced died with it: fold the whole stream.
            options.resignal_skipped = self.journal.agent_budget_spent(name).await;
            let attached = session::reattach(
                &*self.ctx.engine,
                self.run_id,
                name,
                &dir,
                coding,
                &plan.prompt,
            )
            .await;
            (options.skip_stdout_lines, options.skip_stderr_lines) = attached.skip;
            attached.stdin
        } else {
            let launch = Launch {
                spec: self.container_spec(&plan),
                job_image: &plan.image,
                coding,
                prompt: &plan.prompt,
            };
            match session::start(&*self.ctx.engine, name, &dir, launch).await {
                Ok(stdin) => {
                    // Test failpoint: the agent runs with its prompt, its start not journaled.
                    crash_failpoint_at("container-started-unjournaled");
                    stop_at_attach = self.journal.commit(Event::ContainerStarted).await?;
                    stdin
                }
                Err(error) => {
                    warn!(
                        run_id = self.run_id,
                        container = name,
                        "container did not start: {error}"
                    );
                    return self
                        .journal
                        .commit(Event::ContainerStartFailed { error })
                        .await;
                }
            }
        };

        let (out_tx, mut out_rx) = mpsc::channel::<DriverOutput>(1024);
        let mut driver = Driver::spawn(&*self.ctx.engine, name, stdin, options, out_tx);
        route_attached(stop_at_attach, &mut driver, &mut effects);
        // A stop journaled before the container started (or before a restart) applies now.
        if self.state().stop_pending().is_some() {
            driver.stop_agent();
        }
        let mut progress = Progress::load(&dir);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let result: Result<DriveResult, String> = loop {
            tokio::select! {
                biased;
                Some(output) = out_rx.recv() => {
                    if let Some(event) = self.output.forward(output, &mut progress).await {
                        let more = self.journal.commit_agent(event).await?;
                        route_attached(more, &mut driver, &mut effects);
                    }
                }
                result = driver.ended() => break result,
                action = self.stops.next(Waiting::Step) => {
                    let more = self.apply_stop(action).await?;
                    route_attached(more, &mut driver, &mut effects);
                }
                _ = tick.tick() => {
                    progress.save_delivered(self.output.delivered());
                    if self.output.server_stopped() {
                        warn!(run_id = self.run_id, "the server says the run is no longer running; abandoning it");
                        let more = self.journal.commit(Event::RunNoLongerRunning).await?;
                        route_attached(more, &mut driver, &mut effects);
                    }
                }
            }
        };
        while let Ok(output) = out_rx.try_recv() {
            if let Some(event) = self.output.forward(output, &mut progress).await {
                self.journal.commit_agent(event).await?;
            }
        }
        let exit = session::exit_event(&*self.ctx.engine, self.run_id, name, result).await;
        effects.extend(self.journal.commit(exit).await?);
        // The result is durable. The container goes once its output is delivered: until
        // then its logs are the only copy of the queued lines that a crash would lose (F5).
        self.output.container_done(name, progress).await;
        Ok(effects)
    }

    /// The container of the attempt the run is prepared for.
    fn container_spec(&self, plan: &crate::fsm::RunPlan) -> ContainerSpec {
        let state = self.state();
        let checkout = state
            .checkout()
            .filter(|c| !c.root.is_empty())
            .map(|c| PathBuf::from(&c.root));
        let attempt = state.container().map_or(1, |c| c.attempt);
        ContainerSpec {
            run_id: self.run_id,
            attempt,
            kind: LaunchKind::for_job_kind(&plan.kind),
            image: plan.image.clone(),
            env: plan.container_env(&self.secrets),
            checkout,
            extra_args: Vec::new(),
        }
    }

    /// Whether `name` is the run's current container and its exit is not yet judged, so its
    /// agent signals still count toward the verdict.
    fn judges_container(&self, name: &str) -> bool {
        self.state().current_container() == Some(name)
    }

    /// Whether `name` is the container the run is prepared to start, journaled as starting
    /// but not as started.
    fn started_unjournaled(&self, name: &str) -> bool {
        matches!(self.state(), RunState::Prepared { container, .. } if container.name == name)
    }

    /// Recovery: forwards, in order, what each stopped container printed after the saved
    /// progress, through the normal event sender. While the run is still in its container
    /// phase (its exit not yet harvested), the signals and stream degradation of the run's
    /// current container are journaled too: the previous process may have died before
    /// reading the agent's last lines (say, a `finish` printed while no runner watched), and
    /// the exit must be judged with them. Lines it did read are folded again with the same
    /// result (a finish or error: the last one wins; idle and degraded stick), and a repeat
    /// that changes nothing is not journaled. Past the container phase the verdict is
    /// journaled and signals are not fed. A cancel that arrives meanwhile is journaled and
    /// its effects returned for the queue; a cancel-now leaves the run (and the container)
    /// for the next start, which replays again.
    pub(super) async fn replay_output(
        &mut self,
        containers: &[String],
    ) -> Result<Vec<Effect>, Interrupted> {
        let mut extra = Vec::new();
        for name in containers {
            if self.started_unjournaled(name) {
                // It printed, so it started: the previous process died between its start and
                // that record. Journal the start first, so its signals count toward the
                // verdict of its exit (found by the simulation, docs/simulation.md).
                extra.extend(self.journal.commit(Event::ContainerStarted).await?);
            }
            let dir = self.output.container_dir(name);
            let mut progress = Progress::load(&dir);
            // Past the budget the previous process coalesced signals in memory, which died
            // with it: fold the container's whole stdout again (signals only).
            let resignal =
                self.judges_container(name) && self.journal.agent_budget_spent(name).await;
            let (tx, mut rx) = mpsc::channel::<DriverOutput>(1024);
            let reader = session::spawn_replay(&*self.ctx.engine, name, &progress, resignal, tx);
            let (after_stdout, after_stderr) = (progress.stdout, progress.stderr);
            let mut forwarded = 0u64;
            loop {
                let output = tokio::select! {
                    biased;
                    output = rx.recv() => output,
                    action = self.stops.next(Waiting::Replay) => {
                        extra.extend(self.apply_stop(action).await?);
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
                if let Some(event) = self.output.forward(output, &mut progress).await {
                    extra.extend(self.journal.commit_agent(event).await?);
                }
            }
            session::replay_ended(reader, self.run_id, name).await;
            info!(
                run_id = self.run_id,
                container = %name,
                forwarded,
                after_stdout,
                after_stderr,
                "replayed the container's output past the saved progress"
            );
            self.output.keep_until_delivered(name, progress);
        }
        Ok(extra)
    }
}
