//! One run, driven from its journal. The run loop is the only place that commits: it
//! journals an event (transaction + flush), routes the effects the transition hands out and
//! runs them one at a time; each handler performs its one effect and returns one event,
//! which the loop journals next (the container phase also hands back the agent's signals as
//! they come). The order is the crash-tolerance rule: nothing leaves the host before the
//! record announcing it is durable. Stops reach the loop as messages; `stops::decide` says
//! what each does.
//!
//! Files: the loop here; `journal.rs` its commits (with the agent-record budget);
//! `stops.rs` what a stop does; `handlers.rs` the git steps, the report and the terminal
//! clean-up; `container.rs` the container phase and the replay, over `effects::session`.

mod container;
mod handlers;
mod journal;
pub(crate) mod stops;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{error, info, warn, Span};

use super::Ctx;
use crate::effects::git::GitRetry;
use crate::effects::session::RunOutput;
use crate::fsm::{Effect, Event, RunSecrets, RunState};
use crate::journal::Record;
use journal::RunJournal;
pub(crate) use stops::StopRequest;
use stops::{StopAction, Stops, Waiting};

/// How a run task begins: from a claim's effects, or from a recovery decision.
pub(crate) enum Start {
    Effects(Vec<Effect>),
    Feed(Vec<Event>),
    Reattach {
        name: String,
        feed: Vec<Event>,
    },
    /// Recovery: forward what these stopped containers printed past their saved progress
    /// (lines a previous process read but may not have delivered), then begin with `then`.
    Replay {
        containers: Vec<String>,
        then: Box<Start>,
    },
}

/// Why a run task stopped before its run reached a terminal state. The run stays in the
/// journal as it is, and the next start-up recovers it.
#[derive(Debug)]
enum Interrupted {
    Journal(String),
    CredentialRejected,
    Shutdown,
}

/// How long a step may go on after a stop cancelled it before the task stops waiting for it.
const ABANDON_AFTER: Duration = Duration::from_secs(10);
/// The failure text a step abandoned after a stop records.
const ABANDONED: &str = "stopped: the step did not end after the stop and was abandoned";

/// A step the loop awaits while it watches stops: the work (its outcome is the event to
/// journal), the retry switch a stop flips (ends a wait between retries and kills the git
/// call under way), and the event journaled if the work is abandoned.
struct Step {
    work: Pin<Box<dyn Future<Output = Event> + Send>>,
    retry: Option<GitRetry>,
    abandoned: Event,
}

impl Step {
    /// A step whose outcome is already known (refused before any work).
    fn done(event: Event) -> Step {
        Step {
            abandoned: event.clone(),
            work: Box::pin(std::future::ready(event)),
            retry: None,
        }
    }
}

pub(crate) struct RunTask {
    ctx: Arc<Ctx>,
    run_id: i64,
    journal: RunJournal,
    secrets: RunSecrets,
    output: RunOutput,
    stops: Stops,
    span: Span,
}

impl RunTask {
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        first: &Record,
        last: Record,
        secrets: RunSecrets,
        stops: mpsc::UnboundedReceiver<StopRequest>,
    ) -> RunTask {
        let run_id = last.run_id;
        let elapsed_ms = (ctx.clock.now_ms() - first.at_ms).max(0) as u64;
        let remaining = ctx
            .cfg
            .run_timeout
            .saturating_sub(Duration::from_millis(elapsed_ms));
        let output = RunOutput::new(
            run_id,
            ctx.events.open_run(run_id),
            ctx.engine.clone(),
            ctx.containers_dir.clone(),
        );
        // The state is logged per line, not as a span field: the fmt layer appends every
        // re-recorded field value, which would turn the span prefix into the whole history.
        let span = tracing::info_span!("run", run_id);
        RunTask {
            journal: RunJournal::new(ctx.clone(), last),
            ctx,
            run_id,
            secrets,
            output,
            stops: Stops::new(stops, remaining),
            span,
        }
    }

    pub(crate) fn span(&self) -> Span {
        self.span.clone()
    }

    fn state(&self) -> &RunState {
        self.journal.state()
    }

    /// Drives the run until it is terminal (or interrupted: shutdown, credential revoked,
    /// journal failure). Returns the final status for metrics (`None` when interrupted).
    pub(crate) async fn drive(mut self, start: Start) -> Option<String> {
        let outcome = self.drive_inner(start).await;
        match outcome {
            Ok(()) => {
                self.finish_terminal().await;
                let status = match self.state().accepted_verdict() {
                    Some(verdict) => verdict.status.as_wire().to_owned(),
                    None => "abandoned".to_owned(),
                };
                info!(
                    run_id = self.run_id,
                    status,
                    "run finished: {}",
                    self.state().describe()
                );
                Some(status)
            }
            Err(why) => {
                match &why {
                    Interrupted::Journal(e) => error!(
                        run_id = self.run_id,
                        "journal failure, run left for recovery at the next start: {e}"
                    ),
                    Interrupted::CredentialRejected => warn!(
                        run_id = self.run_id,
                        "credential rejected; run left in the journal ({})",
                        self.state().describe()
                    ),
                    Interrupted::Shutdown => info!(
                        run_id = self.run_id,
                        "shutting down; run left in the journal for the next start ({})",
                        self.state().describe()
                    ),
                }
                self.output.halt().await;
                None
            }
        }
    }

    /// The run loop: begin as `start` says, then run the queued effects in order, journaling
    /// each handler's event and the stops that arrive between them.
    async fn drive_inner(&mut self, start: Start) -> Result<(), Interrupted> {
        let mut queue: VecDeque<Effect> = VecDeque::new();
        let start = match start {
            // The replayed output is queued before anything the decision produces, so the
            // server gets the agent's lines before the lifecycle events that follow them.
            Start::Replay { containers, then } => {
                queue.extend(self.replay_output(&containers).await?);
                *then
            }
            other => other,
        };
        match start {
            Start::Effects(effects) => queue.extend(effects),
            Start::Feed(events) => {
                for event in events {
                    queue.extend(self.journal.commit(event).await?);
                }
            }
            Start::Reattach { name, feed } => {
                for event in feed {
                    queue.extend(self.journal.commit(event).await?);
                }
                if self.state().current_container() != Some(name.as_str()) {
                    // Recovery decided from a state the feed did not lead to (a concurrent
                    // transition): let the next start-up decide again.
                    return Err(Interrupted::Journal(format!(
                        "cannot re-attach to {name} in state {}",
                        self.state().describe()
                    )));
                }
                // A stop journaled before the restart hands out a kill here; the re-attached
                // driver performs it (abort, grace, kill) once attached, as for any stop the
                // state records (`RunState::stop_pending`).
                queue.retain(|e| !matches!(e, Effect::KillContainer { .. }));
                queue.extend(self.container_phase(&name, true).await?);
            }
            Start::Replay { .. } => {
                return Err(Interrupted::Journal(
                    "internal: a replay nested in a replay".into(),
                ))
            }
        }
        loop {
            while let Some(action) = self.stops.try_next(Waiting::NextEffect) {
                queue.extend(self.apply_stop(action).await?);
            }
            let Some(effect) = queue.pop_front() else {
                break;
            };
            let next = match effect {
                Effect::Prepare { .. } => {
                    let step = self.prepare();
                    self.run_step(step).await?
                }
                Effect::InspectHeads => {
                    let step = self.inspect_heads();
                    self.run_step(step).await?
                }
                Effect::Push { heads } => {
                    let step = self.push(heads);
                    self.run_step(step).await?
                }
                Effect::StartContainer { name, .. } => self.container_phase(&name, false).await?,
                Effect::Report(report) => {
                    let event = self.report(report).await?;
                    self.journal.commit(event).await?
                }
                Effect::RemoveCheckout => {
                    self.remove_checkout().await;
                    Vec::new()
                }
                Effect::KillContainer { name } => {
                    // No driver is attached outside the container phase: kill it directly.
                    if let Err(e) = self.ctx.engine.kill(&name).await {
                        warn!(container = %name, "kill failed: {e}");
                    }
                    Vec::new()
                }
                Effect::SendEvent {
                    event_type,
                    payload_json,
                } => {
                    self.output.send_event(event_type, payload_json).await;
                    Vec::new()
                }
            };
            queue.extend(next);
        }
        if self.state().is_terminal() {
            Ok(())
        } else {
            // Every non-terminal state hands out an effect; an empty queue here is a bug in
            // the wiring, not in the run: keep it for recovery rather than guess.
            Err(Interrupted::Journal(format!(
                "no effect left to run in state {:?}",
                self.state().describe()
            )))
        }
    }

    /// Does what `stops::decide` said; the effects a journaled stop hands out come back.
    async fn apply_stop(&mut self, action: StopAction) -> Result<Vec<Effect>, Interrupted> {
        match action {
            StopAction::Journal(event) => self.journal.commit(event).await,
            StopAction::Ignore => Ok(Vec::new()),
            StopAction::LeaveForNextStart => Err(Interrupted::Shutdown),
        }
    }

    /// Awaits a step while journaling the stops that arrive meanwhile, then journals its
    /// outcome. A stop is journaled first (the outcome it hastens must find it), then cancels
    /// the step's retry; if the work still has not ended [`ABANDON_AFTER`] later (it is stuck
    /// on something no kill reaches), it is abandoned and its failure journaled, so no stop
    /// waits on the effect. Returns the effects of the stops, then of the outcome.
    async fn run_step(&mut self, step: Step) -> Result<Vec<Effect>, Interrupted> {
        let Step {
            mut work,
            retry,
            abandoned,
        } = step;
        let mut effects = Vec::new();
        let mut abandon_at: Option<tokio::time::Instant> = None;
        let event = loop {
            let abandon = stops::sleep_until_or_never(abandon_at);
            tokio::select! {
                event = &mut work => break event,
                action = self.stops.next(Waiting::Step) => {
                    effects.extend(self.apply_stop(action).await?);
                    if let Some(retry) = &retry {
                        retry.cancel();
                    }
                    abandon_at.get_or_insert_with(|| tokio::time::Instant::now() + ABANDON_AFTER);
                }
                () = abandon => {
                    warn!(
                        run_id = self.run_id,
                        "the step did not end within {ABANDON_AFTER:?} of the stop; abandoning it"
                    );
                    break abandoned;
                }
            }
        };
        // Dropping the work (abandoned) cancels its retry too.
        drop(work);
        effects.extend(self.journal.commit(event).await?);
        Ok(effects)
    }

    /// Awaits `work` while the verdict is sent: a stop is ignored or leaves the run for the
    /// next start (`stops::decide` journals nothing while reporting).
    async fn while_reporting<T>(
        &mut self,
        work: impl Future<Output = T>,
    ) -> Result<T, Interrupted> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                action = self.stops.next(Waiting::Report) => match action {
                    StopAction::LeaveForNextStart => return Err(Interrupted::Shutdown),
                    StopAction::Ignore | StopAction::Journal(_) => {}
                },
            }
        }
    }
}

#[cfg(test)]
mod tests;
