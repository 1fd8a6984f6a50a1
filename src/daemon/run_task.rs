//! One run, driven from its journal: commit an event (transaction + flush), then hand the
//! effects the transition returned to their handlers; each handler's outcome is the next
//! event. The order is the crash-tolerance rule: nothing leaves the host before the record
//! announcing it is durable.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn, Span};

use super::Ctx;
use crate::control::client::ControlError;
use crate::control::events::{Delivery, RunEvents};
use crate::control::wire::{EventRequest, ReportRequest};
use crate::effects::agent_driver::{self, DriveOptions, DriveResult, DriverOutput, StdinChannel};
use crate::effects::container::{ContainerSpec, LaunchKind};
use crate::effects::git::{
    self, git_proxy_url, validate_slug, RepoCache, RunRepo, RunWorkspaceRequest, WsToml,
};
use crate::fsm::{
    AgentBudget, Checkout, CheckoutRepo, Effect, Event, RepoHead, RunSecrets, AGENT_RECORD_BUDGET,
};
use crate::journal::{agent_records, commit_event_async, now_ms, CommitError, Record};
use crate::redact::redact;

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

/// Line counters of the agent's output already forwarded, kept beside the container's
/// private files so a re-attach after a crash resumes without re-sending them.
const PROGRESS_FILE: &str = "forwarded-lines";
/// Marks that the prompt was written to the agent's stdin (spec 6.1: exactly once).
const PROMPT_SENT_FILE: &str = "prompt-sent";

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
                let status = match self.last.state.accepted_verdict() {
                    Some(verdict) => verdict.status.as_wire().to_owned(),
                    None => "abandoned".to_owned(),
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
                if self.last.state.current_container() != Some(name.as_str()) {
                    // Recovery decided from a state the feed did not lead to (a concurrent
                    // transition): let the next start-up decide again.
                    return Err(Interrupted::Journal(format!(
                        "cannot re-attach to {name} in state {}",
                        self.last.state.describe()
                    )));
                }
                queue.extend(self.run_container(&name, true).await?);
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
                    crash_failpoint(&record);
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

    async fn prepare(&mut self) -> Result<Vec<Effect>, Interrupted> {
        let plan = self.last.state.plan().clone();
        let Some(token) = self.token() else {
            return self
                .commit(Event::CheckoutFailed {
                    error: "no WS_TOKEN for git-proxy auth".into(),
                })
                .await;
        };
        let mut repos = Vec::new();
        for repo in &plan.repos {
            let Some(remote_url) = repo_proxy_url(&self.ctx.cfg.api_url, &plan, &repo.slug) else {
                // Before any git work: the run fails at once with the validator's reason.
                let why = validate_slug(&repo.slug)
                    .err()
                    .map_or_else(|| "want owner/name".to_owned(), |e| e.problem);
                return self
                    .commit(Event::CheckoutFailed {
                        error: format!("invalid repo slug: {why}"),
                    })
                    .await;
            };
            repos.push(RunRepo {
                workspace_id: repo.workspace_id,
                slug: repo.slug.clone(),
                base_ref: if repo.base_ref.is_empty() {
                    "main".into()
                } else {
                    repo.base_ref.clone()
                },
                continue_branch: repo.continue_branch.clone(),
                remote_url,
            });
        }
        let env: HashMap<String, String> = plan.container_env(&self.secrets).into_iter().collect();
        // If this future is dropped (shutdown), the blocking prepare stops retrying too.
        let retry = self.git_retry();
        let _cancel_if_dropped = retry.cancel_on_drop();
        let request = RunWorkspaceRequest {
            root: self.ctx.cfg.cache_root.display().to_string(),
            run_id: self.run_id,
            repos,
            token,
            policy: self.ctx.git_policy,
            ws_toml: WsToml::from_run_env(&env),
            retry: retry.clone(),
            ..Default::default()
        };
        let work = tokio::task::spawn_blocking(move || git::prepare_run_workspace(&request));
        let (result, mut extra) = self.with_stops(work, Some(&retry)).await?;
        let event = match result {
            Some(Ok(Ok(ws))) => Event::CheckoutReady {
                checkout: Checkout {
                    root: ws.mount_path.display().to_string(),
                    repos: ws
                        .repos
                        .iter()
                        .map(|r| CheckoutRepo {
                            slug: r.slug.clone(),
                            path: r.output.checkout_path.display().to_string(),
                            branch: r.output.branch.clone(),
                            base_commit: r.output.base_commit.clone(),
                        })
                        .collect(),
                },
            },
            Some(Ok(Err(e))) => Event::CheckoutFailed {
                error: redact(&e.to_string()).into_owned(),
            },
            Some(Err(e)) => Event::CheckoutFailed {
                error: format!("prepare task failed: {e}"),
            },
            None => Event::CheckoutFailed {
                error: ABANDONED.into(),
            },
        };
        extra.extend(self.commit(event).await?);
        Ok(extra)
    }

    /// Removes every path this run may have checked out (idempotent).
    async fn remove_checkout(&self) {
        let paths = run_paths(
            &self.ctx.cfg.cache_root,
            self.run_id,
            self.last.state.plan(),
        );
        let result = tokio::task::spawn_blocking(move || {
            for path in paths {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("remove {}: {e}", path.display())),
                }
            }
            Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(run_id = self.run_id, "checkout removal failed: {e}"),
            Err(e) => warn!(run_id = self.run_id, "checkout removal task failed: {e}"),
        }
    }

    fn container_dir(&self, name: &str) -> PathBuf {
        self.ctx.containers_dir.join(name)
    }

    /// Creates, starts (or re-attaches to) and drives the container to its end, forwarding
    /// its output and journaling what decides the verdict.
    async fn run_container(
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
        if self.last.state.stop_pending().is_some() {
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
    async fn settle_output(&mut self) {
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
    async fn replay_output(&mut self, containers: &[String]) -> Result<Vec<Effect>, Interrupted> {
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

    async fn create_and_start(
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
        let checkout = self
            .last
            .state
            .checkout()
            .filter(|c| !c.root.is_empty())
            .map(|c| PathBuf::from(&c.root));
        let attempt = self.last.state.container().map_or(1, |c| c.attempt);
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
    fn judges_container(&self, name: &str) -> bool {
        self.last.state.current_container() == Some(name)
    }

    /// One driver output: events go to the server (ordered, paced), signals to the journal.
    async fn forward(
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

    /// Journals an agent event (signal, degradation) within the current container's budget,
    /// or folds it in memory once the budget is spent: the agent decides how many it prints,
    /// and each record carries the whole state.
    async fn commit_agent(&mut self, event: Event) -> Result<(), Interrupted> {
        let Some(name) = self.last.state.current_container().map(str::to_owned) else {
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
        let Some(name) = self.last.state.current_container().map(str::to_owned) else {
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

    async fn inspect_heads(&mut self) -> Result<Vec<Effect>, Interrupted> {
        let checkout = self.last.state.checkout().cloned().unwrap_or_default();
        let work = tokio::task::spawn_blocking(move || {
            let mut heads = Vec::new();
            for repo in &checkout.repos {
                let head = git::branch_head(Path::new(&repo.path), &repo.branch)
                    .map_err(|e| RepoGitError::new(&repo.slug, e))?;
                heads.push(RepoHead {
                    slug: repo.slug.clone(),
                    head,
                });
            }
            Ok::<_, RepoGitError>(heads)
        });
        let (result, mut extra) = self.with_stops(work, None).await?;
        let event = match result {
            Some(Ok(Ok(heads))) => Event::HeadsInspected { heads },
            Some(Ok(Err(e))) => Event::PushFailed {
                error: e.report(self.run_id, "reading the run branch"),
            },
            Some(Err(e)) => Event::PushFailed {
                error: format!("head inspection task failed: {e}"),
            },
            None => Event::PushFailed {
                error: ABANDONED.into(),
            },
        };
        extra.extend(self.commit(event).await?);
        Ok(extra)
    }

    async fn push(&mut self, heads: Vec<RepoHead>) -> Result<Vec<Effect>, Interrupted> {
        let plan = self.last.state.plan().clone();
        let checkout = self.last.state.checkout().cloned().unwrap_or_default();
        let token = self.token().unwrap_or_default();
        // One budget and cancel switch for the run's pushes; dropping this future cancels it
        // (and kills the git call under way).
        let retry = self.git_retry();
        let _cancel_if_dropped = retry.cancel_on_drop();
        let mut requests = Vec::new();
        for head in &heads {
            let Some(repo) = checkout.repos.iter().find(|r| r.slug == head.slug) else {
                continue;
            };
            let remote_url =
                repo_proxy_url(&self.ctx.cfg.api_url, &plan, &repo.slug).unwrap_or_default();
            requests.push(git::PushRequest {
                checkout: PathBuf::from(&repo.path),
                branch: repo.branch.clone(),
                remote_url,
                token: token.clone(),
                skip_if_head: repo.base_commit.clone(),
                policy: self.ctx.git_policy,
                retry: retry.clone(),
                cache_objects: cache_objects(&self.ctx.cfg.cache_root, &plan, &repo.slug),
            });
        }
        let work = tokio::task::spawn_blocking(move || {
            let mut pushed = Vec::new();
            for (request, head) in requests.iter().zip(&heads) {
                let outcome = git::push(request).map_err(|e| RepoGitError::new(&head.slug, e))?;
                if !outcome.skipped {
                    pushed.push(RepoHead {
                        slug: head.slug.clone(),
                        head: outcome.head_sha,
                    });
                }
            }
            Ok::<_, RepoGitError>(pushed)
        });
        let (result, mut extra) = self.with_stops(work, Some(&retry)).await?;
        let event = match result {
            Some(Ok(Ok(pushed))) if pushed.is_empty() => Event::PushSkipped,
            Some(Ok(Ok(pushed))) => Event::PushDone { heads: pushed },
            Some(Ok(Err(e))) => Event::PushFailed {
                error: e.report(self.run_id, "push"),
            },
            Some(Err(e)) => Event::PushFailed {
                error: format!("push task failed: {e}"),
            },
            None => Event::PushFailed {
                error: ABANDONED.into(),
            },
        };
        extra.extend(self.commit(event).await?);
        Ok(extra)
    }

    async fn send_event(&mut self, event_type: String, payload_json: String) {
        if let Some(events) = &self.events {
            events
                .send(EventRequest {
                    event_type,
                    payload_json,
                })
                .await;
        }
    }

    async fn report(&mut self, report: ReportRequest) -> Result<Vec<Effect>, Interrupted> {
        // Every event goes out before the verdict: after it the server answers 409.
        if let Some(events) = self.events.take() {
            let finish = events.finish();
            tokio::pin!(finish);
            let summary = loop {
                tokio::select! {
                    summary = &mut finish => break summary,
                    stop = self.stops.recv() => match stop {
                        // A drain past its deadline: the report intent is journaled.
                        Some(StopRequest::Drain) => return Err(Interrupted::Shutdown),
                        Some(StopRequest::Cancel) => {}
                        None => break finish.await,
                    },
                }
            };
            if let Some(why) = summary.stopped {
                debug!(run_id = self.run_id, "event stream ended early: {why}");
            }
        }
        // Every event was delivered or refused for good: nothing is left to replay.
        self.settle_output().await;
        // The client retries within its budget (minutes). A drain past its deadline must not
        // wait that out: the report intent is journaled, so the next start sends it again.
        let client = self.ctx.client.clone();
        let answer = {
            let call = client.report(self.run_id, &report);
            tokio::pin!(call);
            loop {
                tokio::select! {
                    answer = &mut call => break answer,
                    stop = self.stops.recv() => match stop {
                        Some(StopRequest::Drain) => return Err(Interrupted::Shutdown),
                        // A cancel cannot change a decided verdict; keep reporting it.
                        Some(StopRequest::Cancel) => {}
                        None => break call.await,
                    },
                }
            }
        };
        let event = match answer {
            Ok(()) => {
                self.ctx.metrics.request("report", "ok");
                info!(run_id = self.run_id, status = %report.status, "verdict reported");
                Event::ReportAccepted
            }
            Err(e) => {
                self.ctx
                    .metrics
                    .request("report", &super::outcome_label(&e));
                match (&e, e.status()) {
                    (ControlError::CredentialRejected(_), _) => {
                        return Err(Interrupted::CredentialRejected)
                    }
                    (_, Some(409)) => {
                        info!(
                            run_id = self.run_id,
                            "the server already finalized the run (409); nothing to report"
                        );
                        Event::ReportRejected409
                    }
                    (_, Some(400 | 403 | 404)) => Event::ReportFailed {
                        error: e.to_string(),
                        retryable: false,
                    },
                    _ => {
                        warn!(run_id = self.run_id, "report failed, will retry: {e}");
                        if self.ctx.shutting_down() {
                            return Err(Interrupted::Shutdown);
                        }
                        let pause = self.ctx.report_retry_pause;
                        let mut shutdown = self.ctx.shutdown.subscribe();
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown.changed() => return Err(Interrupted::Shutdown),
                        }
                        Event::ReportFailed {
                            error: e.to_string(),
                            retryable: true,
                        }
                    }
                }
            }
        };
        self.commit(event).await
    }

    /// The run is terminal: drop every trace on the host (containers of any attempt, private
    /// files, checkout) and forget its secrets.
    async fn finish_terminal(&mut self) {
        if let Some(events) = self.events.take() {
            events.finish().await;
        }
        if let Ok(found) = self.ctx.engine.find_instance_containers().await {
            for c in found.iter().filter(|c| c.run_id == Some(self.run_id)) {
                if let Err(e) = self.ctx.engine.remove(&c.name).await {
                    warn!(container = %c.name, "container removal failed (the sweep retries): {e}");
                }
                remove_dir(&self.container_dir(&c.name));
            }
        }
        // Private dirs of attempts whose container was already gone (e.g. removed before a
        // crash, then redone by recovery); found by the chaos suite, else only the next
        // start's sweep removed them.
        let attempt0 = crate::effects::container::container_name(
            &self.ctx.engine.cfg.instance,
            self.run_id,
            0,
        );
        if let Some(prefix) = attempt0.strip_suffix('0') {
            if let Ok(entries) = std::fs::read_dir(&self.ctx.containers_dir) {
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
        self.remove_checkout().await;
        for secret in self.secrets.env.values() {
            crate::redact::forget_secret(secret);
        }
    }
}

/// Test-only crash hook: with `WSRUNNER_TEST_CRASH_AFTER=<event kind>` (e.g. `container_started`)
/// the process kills itself with SIGKILL right after that event's record is flushed, so the
/// crash tests can stop the runner at an exact durable state. Unset in production.
pub(crate) fn crash_failpoint(record: &Record) {
    if configured_failpoint().is_some_and(|point| failpoint_matches(point, &record.event)) {
        error!(
            run_id = record.run_id,
            seq = record.seq,
            "test failpoint reached: killing the runner"
        );
        kill_self();
    }
}

/// A failpoint outside a journal commit (e.g. `claim-answered`: a claim's answer arrived and
/// is not journaled yet).
pub(crate) fn crash_failpoint_at(point: &str) {
    if crash_failpoint_matches(point) {
        error!(point, "test failpoint reached: killing the runner");
        kill_self();
    }
}

fn crash_failpoint_matches(point: &str) -> bool {
    configured_failpoint() == Some(point)
}

/// `WSRUNNER_TEST_CRASH_AFTER`, read once.
fn configured_failpoint() -> Option<&'static str> {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    POINT
        .get_or_init(|| std::env::var("WSRUNNER_TEST_CRASH_AFTER").ok())
        .as_deref()
}

fn kill_self() {
    // SAFETY: kill(2) on our own pid.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// `<event kind>`, or `agent_signal:<signal>` (`event`, `finish`, `error`, `session_idle`)
/// for one kind of agent signal.
fn failpoint_matches(point: &str, event: &Event) -> bool {
    use crate::fsm::contract::AgentSignal;
    let kind = event.kind().to_string();
    match (point.split_once(':'), event) {
        (None, _) => point == kind,
        (Some((want, signal)), Event::AgentSignal { signal: got }) if want == kind => {
            signal
                == match got {
                    AgentSignal::Event { .. } => "event",
                    AgentSignal::Finish { .. } => "finish",
                    AgentSignal::Error { .. } => "error",
                    AgentSignal::SessionIdle => "session_idle",
                }
        }
        _ => false,
    }
}

/// The git-proxy URL of one of the plan's repos (spec 4.9 step 3); `None` for a bad slug.
/// A git failure of one repo of the run, kept whole until it is reported.
#[derive(Debug)]
struct RepoGitError {
    slug: String,
    error: git::GitError,
}

impl RepoGitError {
    fn new(slug: &str, error: git::GitError) -> Self {
        Self {
            slug: slug.to_owned(),
            error,
        }
    }

    /// Logs the whole failure for the operator (redacted, bounded by the git layer) and
    /// returns the run's error in the runner's own words: what failed and in which repo,
    /// never git's output, which may quote what the agent left in its checkout.
    fn report(&self, run_id: i64, step: &str) -> String {
        warn!(
            run_id,
            repo = %self.slug,
            "{step} failed: {}",
            redact(&self.error.to_string())
        );
        format!("{}: {}", self.slug, self.error.public_summary())
    }
}

/// The `objects` directory of the run's bare cache for `slug`, which a push borrows the base
/// history from (`None` when the slug is not one of the plan's or does not parse).
fn cache_objects(cache_root: &Path, plan: &crate::fsm::RunPlan, slug: &str) -> Option<PathBuf> {
    let repo = plan.repos.iter().find(|r| r.slug == slug)?;
    let (owner, name) = slug.split_once('/')?;
    Some(
        RepoCache::new(cache_root, repo.workspace_id, owner, name)
            .bare()
            .join("objects"),
    )
}

pub(crate) fn repo_proxy_url(
    api_url: &str,
    plan: &crate::fsm::RunPlan,
    slug: &str,
) -> Option<String> {
    let workspace_id = plan
        .repos
        .iter()
        .find(|r| r.slug == slug)
        .map_or(0, |r| r.workspace_id);
    let (owner, repo) = validate_slug(slug).ok()?;
    Some(git_proxy_url(api_url, workspace_id, &owner, &repo))
}

/// Every path a run's checkout may occupy: each repo's `runs/<id>` and the multi-repo root.
pub(crate) fn run_paths(
    cache_root: &Path,
    run_id: i64,
    plan: &crate::fsm::RunPlan,
) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = plan
        .repos
        .iter()
        .filter_map(|r| {
            let (owner, repo) = validate_slug(&r.slug).ok()?;
            Some(RepoCache::new(cache_root, r.workspace_id, &owner, &repo).run_checkout(run_id))
        })
        .collect();
    paths.push(git::workspace_root(cache_root, run_id));
    paths
}

pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn remove_dir(dir: &Path) {
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
struct Progress {
    dir: PathBuf,
    stdout: u64,
    stderr: u64,
    /// (accepted count after the line, stdout, stderr), oldest first, not yet answered.
    marks: VecDeque<(u64, u64, u64)>,
    /// The numbers of the last line the server answered, and the numbers in the file.
    delivered: (u64, u64),
    saved: (u64, u64),
}

impl Progress {
    fn load(dir: &Path) -> Progress {
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
    fn forwarded(&mut self, stream: &str, line: u64, accepted: u64) {
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
    fn save_delivered(&mut self, completed: u64) {
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
async fn send_prompt(stdin: Option<&StdinChannel>, prompt: &str, dir: &Path) -> Result<(), String> {
    let stdin = stdin.ok_or("the container's stdin is not attached")?;
    let line = serde_json::json!({"type": "prompt", "message": prompt}).to_string();
    stdin.send(&line).await.map_err(|e| e.to_string())?;
    std::fs::write(dir.join(PROMPT_SENT_FILE), b"1\n").map_err(|e| e.to_string())
}

fn read_progress(dir: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(dir.join(PROGRESS_FILE)).unwrap_or_default();
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::contract::AgentSignal;

    #[test]
    fn failpoints_match_an_event_kind_or_one_agent_signal() {
        let finish = Event::AgentSignal {
            signal: AgentSignal::Finish {
                outcome: "completed".into(),
                summary: String::new(),
            },
        };
        let idle = Event::AgentSignal {
            signal: AgentSignal::SessionIdle,
        };
        assert!(failpoint_matches("agent_signal", &finish));
        assert!(failpoint_matches("agent_signal:finish", &finish));
        assert!(!failpoint_matches("agent_signal:finish", &idle));
        assert!(failpoint_matches("agent_signal:session_idle", &idle));
        assert!(failpoint_matches(
            "container_started",
            &Event::ContainerStarted
        ));
        assert!(!failpoint_matches(
            "container_started:x",
            &Event::ContainerStarted
        ));
        assert!(!failpoint_matches("push_done", &Event::ContainerStarted));
    }
}
