//! One run, driven from its journal: commit an event (transaction + flush), then hand the
//! effects the transition returned to their handlers; each handler's outcome is the next
//! event. The order is the crash-tolerance rule: nothing leaves the host before the record
//! announcing it is durable.
//!
//! The loop and the journal side live here; the effect handlers in `handlers.rs`, the
//! container phase (start, re-attach, output, replay) in `container.rs`.

mod container;
mod handlers;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn, Span};

use super::Ctx;
use crate::control::events::{Delivery, RunEvents};
use crate::effects::git::{self};
use crate::effects::session::Progress;
use crate::fsm::{AgentBudget, Effect, Event, RunSecrets, RunState, AGENT_RECORD_BUDGET};
use crate::journal::{agent_records, commit_event_async, now_ms, CommitError, Record};

/// A stop asked of a running run from outside its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopRequest {
    /// The server listed the run in the heartbeat `abort` list (spec 4.5).
    Cancel,
    /// The drain deadline passed, or a second signal asked to cancel at once (spec 4.6).
    Drain,
}

impl StopRequest {
    fn event(self) -> Event {
        match self {
            StopRequest::Cancel => Event::CancelRequested { force: false },
            StopRequest::Drain => Event::DrainDeadlinePassed,
        }
    }
}

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

pub(crate) struct RunTask {
    ctx: Arc<Ctx>,
    run_id: i64,
    last: Record,
    secrets: RunSecrets,
    events: Option<RunEvents>,
    stops: mpsc::UnboundedReceiver<StopRequest>,
    /// When the run's own wall-clock limit passes (from the claim time, across restarts).
    deadline: tokio::time::Instant,
    deadline_fired: bool,
    /// Stopped containers whose output was handed to the event sender but may not be
    /// delivered yet. Their logs are the only copy of that output after a crash, so they are
    /// removed only once the sender has drained (see [`RunTask::settle_output`]).
    pending_output: Vec<(String, Progress)>,
    /// The run's event stream progress, kept after `events` is consumed (report, shutdown).
    delivery: Delivery,
    /// The journal budget of the current container's output (docs/journal.md).
    agent_budget: Option<AgentBudget>,
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
        let elapsed_ms = (now_ms() - first.at_ms).max(0) as u64;
        let remaining = ctx
            .cfg
            .run_timeout
            .saturating_sub(Duration::from_millis(elapsed_ms));
        let events = ctx.events.open_run(run_id);
        let delivery = events.delivery();
        let events = Some(events);
        // The state is logged per line, not as a span field: the fmt layer appends every
        // re-recorded field value, which would turn the span prefix into the whole history.
        let span = tracing::info_span!("run", run_id);
        RunTask {
            ctx,
            run_id,
            last,
            secrets,
            events,
            stops,
            deadline: tokio::time::Instant::now() + remaining,
            deadline_fired: false,
            pending_output: Vec::new(),
            delivery,
            agent_budget: None,
            span,
        }
    }

    pub(crate) fn span(&self) -> Span {
        self.span.clone()
    }

    /// Drives the run until it is terminal (or interrupted: shutdown, credential revoked,
    /// journal failure). Returns the final status for metrics (`None` when interrupted).
    pub(crate) async fn drive(mut self, start: Start) -> Option<String> {
        let outcome = self.drive_inner(start).await;
        match outcome {
            Ok(()) => {
                self.finish_terminal().await;
                let status = match &self.last.state {
                    RunState::Reported { verdict, .. } => verdict.status.as_wire().to_owned(),
                    _ => "abandoned".to_owned(),
                };
                info!(
                    run_id = self.run_id,
                    status,
                    "run finished: {}",
                    self.last.state.describe()
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
                        self.last.state.describe()
                    ),
                    Interrupted::Shutdown => info!(
                        run_id = self.run_id,
                        "shutting down; run left in the journal for the next start ({})",
                        self.last.state.describe()
                    ),
                }
                // Flush what is queued, briefly: a server that is down must not hold up a
                // shutdown (the verdict-relevant facts are journaled already).
                if let Some(events) = self.events.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), events.finish()).await;
                }
                // Then stop sending and record exactly how far the stopped containers' output
                // got, so the next start replays the rest and repeats nothing.
                self.delivery.halt(Duration::from_secs(5)).await;
                let completed = self.delivery.completed();
                for (_, progress) in &mut self.pending_output {
                    progress.save_delivered(completed);
                }
                None
            }
        }
    }

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
                    queue.extend(self.commit(event).await?);
                }
            }
            Start::Reattach { name, feed } => {
                for event in feed {
                    queue.extend(self.commit(event).await?);
                }
                // A stop journaled before the restart hands out a kill here; the re-attached
                // driver performs it (abort, grace, kill) instead, see `stop_pending`.
                queue.retain(|e| !matches!(e, Effect::KillContainer { .. }));
                match &self.last.state {
                    RunState::Running {
                        container,
                        after: None,
                        ..
                    } if container.name == name => {
                        queue.extend(self.run_container(&name, true).await?);
                    }
                    other => {
                        // Recovery decided from a state the feed did not lead to (a
                        // concurrent transition): let the next start-up decide again.
                        return Err(Interrupted::Journal(format!(
                            "cannot re-attach to {name} in state {}",
                            other.describe()
                        )));
                    }
                }
            }
            Start::Replay { .. } => {
                return Err(Interrupted::Journal(
                    "internal: a replay nested in a replay".into(),
                ))
            }
        }
        loop {
            while let Ok(stop) = self.stops.try_recv() {
                queue.extend(self.commit(stop.event()).await?);
            }
            let Some(effect) = queue.pop_front() else {
                break;
            };
            let next = match effect {
                Effect::Prepare { .. } => self.prepare().await?,
                Effect::RemoveCheckout => {
                    self.remove_checkout().await;
                    Vec::new()
                }
                Effect::StartContainer { name, .. } => self.run_container(&name, false).await?,
                Effect::KillContainer { name } => {
                    // Outside a driver (the container is not attached here): kill it directly.
                    if let Err(e) = self.ctx.engine.kill(&name).await {
                        warn!(container = %name, "kill failed: {e}");
                    }
                    Vec::new()
                }
                Effect::InspectHeads => self.inspect_heads().await?,
                Effect::Push { heads } => self.push(heads).await?,
                Effect::Report(report) => self.report(report).await?,
                Effect::SendEvent {
                    event_type,
                    payload_json,
                } => {
                    self.send_event(event_type, payload_json).await;
                    Vec::new()
                }
            };
            queue.extend(next);
        }
        if self.last.state.is_terminal() {
            Ok(())
        } else {
            // Every non-terminal state hands out an effect; an empty queue here is a bug in
            // the wiring, not in the run: keep it for recovery rather than guess.
            Err(Interrupted::Journal(format!(
                "no effect left to run in state {:?}",
                self.last.state.describe()
            )))
        }
    }

    /// Journals one event (transaction + flush) and returns the effects to run now. A
    /// container's exit is preceded by the agent signals coalesced past its journal budget,
    /// so the exit is judged on every signal (docs/journal.md, "Agent output budget").
    async fn commit(&mut self, event: Event) -> Result<Vec<Effect>, Interrupted> {
        if matches!(event, Event::ContainerExited { .. }) {
            self.commit_coalesced().await?;
        }
        self.commit_record(event).await
    }

    async fn commit_record(&mut self, event: Event) -> Result<Vec<Effect>, Interrupted> {
        let started = Instant::now();
        let kind = event.kind();
        match commit_event_async(
            self.ctx.journal.clone(),
            Some(self.last.clone()),
            event,
            now_ms(),
            None,
        )
        .await
        {
            Ok(committed) => {
                if let Some(record) = committed.record {
                    self.ctx.metrics.journal_commit(started.elapsed());
                    super::failpoint::crash_failpoint(&record);
                    self.span
                        .record("state", tracing::field::display(record.state.kind()));
                    debug!(run_id = self.run_id, event = %kind, seq = record.seq, "{}", record.state.describe());
                    self.last = record;
                }
                Ok(committed.effects)
            }
            Err(CommitError::Rejected(r)) => {
                debug!(run_id = self.run_id, "event not applied: {r}");
                Ok(Vec::new())
            }
            Err(CommitError::Journal(e)) => {
                self.ctx.metrics.journal_error();
                Err(Interrupted::Journal(e.to_string()))
            }
        }
    }

    /// Waits for the next stop: a request from outside, or the run's own time limit.
    async fn next_stop(&mut self) -> Event {
        let deadline = self.deadline;
        let fired = self.deadline_fired;
        tokio::select! {
            stop = self.stops.recv() => match stop {
                Some(stop) => stop.event(),
                // The supervisor went away: no more stops, only the deadline.
                None => {
                    if fired {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep_until(deadline).await;
                    self.deadline_fired = true;
                    Event::RunTimeoutPassed
                }
            },
            _ = tokio::time::sleep_until(deadline), if !fired => {
                self.deadline_fired = true;
                warn!(run_id = self.run_id, "the run exceeded WSRUNNER_RUN_TIMEOUT; stopping it");
                Event::RunTimeoutPassed
            }
        }
    }

    /// Awaits `work` while journaling stops that arrive meanwhile. The effects those stops
    /// hand out are returned for the queue; the state machine decides what the stop means
    /// once the outcome is known. A stop cancels `retry`, which ends a wait between retries
    /// and kills the git call under way; if the work still has not ended
    /// [`ABANDON_AFTER`] later (it is stuck on something no kill reaches), it is abandoned:
    /// `None` comes back and the caller records a failure, so no stop waits on the effect.
    async fn with_stops<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        retry: Option<&git::GitRetry>,
    ) -> Result<(Option<T>, Vec<Effect>), Interrupted> {
        tokio::pin!(work);
        let mut extra = Vec::new();
        let mut abandon_at: Option<tokio::time::Instant> = None;
        loop {
            let abandon = async {
                match abandon_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut work => return Ok((Some(out), extra)),
                stop = self.next_stop() => {
                    // Journaled first: the outcome that the cancel hastens must find it.
                    let more = self.commit(stop).await?;
                    if let Some(retry) = retry {
                        retry.cancel();
                    }
                    abandon_at.get_or_insert_with(|| tokio::time::Instant::now() + ABANDON_AFTER);
                    extra.extend(more);
                }
                () = abandon => {
                    warn!(
                        run_id = self.run_id,
                        "the step did not end within {ABANDON_AFTER:?} of the stop; abandoning it"
                    );
                    return Ok((None, extra));
                }
            }
        }
    }

    /// A fresh retry budget for one git step (`WSRUNNER_GIT_RETRY_TIMEOUT`).
    fn git_retry(&self) -> git::GitRetry {
        git::GitRetry::new(git::RetryPolicy {
            max_elapsed: self.ctx.cfg.git_retry_timeout,
            ..git::DEFAULT_GIT_RETRY
        })
    }

    fn token(&self) -> Option<String> {
        self.secrets
            .env
            .get("WS_TOKEN")
            .filter(|t| !t.trim().is_empty())
            .cloned()
    }

    /// Journals an agent event (signal, degradation) within the current container's budget,
    /// or folds it in memory once the budget is spent: the agent decides how many it prints,
    /// and each record carries the whole state.
    async fn commit_agent(&mut self, event: Event) -> Result<(), Interrupted> {
        let Some(name) = current_container(&self.last.state) else {
            // Not in the container phase: the state machine refuses it; nothing is written.
            self.commit_record(event).await?;
            return Ok(());
        };
        let budget = self.agent_budget_for(&name).await;
        let Some(event) = budget.admit(event) else {
            return Ok(());
        };
        let before = self.last.seq;
        self.commit_record(event).await?;
        if self.last.seq != before {
            let run_id = self.run_id;
            let budget = self.agent_budget_for(&name).await;
            budget.recorded();
            if budget.spent() {
                warn!(
                    run_id,
                    container = %name,
                    records = budget.journaled(),
                    "the agent's output reached its journal budget; further signals are \
                     coalesced and journaled when the container exits"
                );
            }
        }
        Ok(())
    }

    /// Journals the signals coalesced past the current container's budget (at most one per
    /// fact kind) so that the exit that follows is judged on them.
    async fn commit_coalesced(&mut self) -> Result<(), Interrupted> {
        let Some(name) = current_container(&self.last.state) else {
            return Ok(());
        };
        let Some(budget) = self
            .agent_budget
            .as_mut()
            .filter(|b| b.container() == name && !b.pending().is_empty())
        else {
            return Ok(());
        };
        let folded = budget.pending().folded();
        let events = budget.take_pending();
        info!(
            run_id = self.run_id,
            container = %name,
            folded,
            records = events.len(),
            "journaling the agent signals coalesced past the journal budget"
        );
        for event in events {
            self.commit_record(event).await?;
        }
        Ok(())
    }

    /// The budget of container `name`, counting the records its output already caused in
    /// the journal (so a restart continues where the previous process stopped). A journal
    /// that cannot be read counts as spent: folding loses no verdict, writing might overrun.
    async fn agent_budget_for(&mut self, name: &str) -> &mut AgentBudget {
        if self.agent_budget.as_ref().map(AgentBudget::container) != Some(name) {
            let journal = self.ctx.journal.clone();
            let run_id = self.run_id;
            let read = tokio::task::spawn_blocking(move || journal.records(run_id)).await;
            let used = match read {
                Ok(Ok(slots)) => agent_records(&slots, name),
                Ok(Err(e)) => {
                    warn!(
                        run_id = self.run_id,
                        "cannot count the agent's records ({e}); its journal budget counts as spent"
                    );
                    AGENT_RECORD_BUDGET
                }
                Err(e) => {
                    warn!(
                        run_id = self.run_id,
                        "journal read task failed ({e}); the agent's journal budget counts as spent"
                    );
                    AGENT_RECORD_BUDGET
                }
            };
            debug!(
                run_id = self.run_id,
                container = name,
                used,
                "agent journal budget"
            );
            self.agent_budget = Some(AgentBudget::new(name, used, AGENT_RECORD_BUDGET));
        }
        self.agent_budget
            .get_or_insert_with(|| AgentBudget::new(name, AGENT_RECORD_BUDGET, AGENT_RECORD_BUDGET))
    }
}

/// The container whose exit is still to be judged, if the run is in its container phase.
pub(super) fn current_container(state: &RunState) -> Option<String> {
    match state {
        RunState::Running {
            container,
            after: None,
            ..
        } => Some(container.name.clone()),
        _ => None,
    }
}

fn stop_pending(state: &RunState) -> bool {
    matches!(
        state,
        RunState::Prepared { stop: Some(_), .. } | RunState::Running { stop: Some(_), .. }
    )
}
