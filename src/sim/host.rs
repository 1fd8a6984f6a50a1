//! The simulated runner host: its processes (each start to each death), the claim loop, the
//! heartbeat, the run tasks and their event senders, over the world of `world.rs`. Every
//! transition goes through the real `journal::commit_event` (the pure state machine plus the
//! journal), every decision through the rules of `rules.rs`; only the IO is simulated.
//!
//! One actor acts at a time at a virtual instant; actors due at the same instant go in an
//! order drawn from the seed. Nothing reads a real clock or a thread, so a seed replays its
//! trace byte for byte.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::Duration;

use super::rules::{Rules, HEARTBEAT_INTERVAL};
use super::scenario::{AgentScript, Ending, Fault, Rng, Scenario};
use super::world::{
    agent_sha, Container, ContainerPhase, CrashJournal, Engine, FinalBy, Git, Server, ServerRun,
    ServerStatus, BASE_SHA, PROXY_503,
};
use crate::control::client::{ClientConfig, RetryPolicy};
use crate::control::wire::{JobSpec, RepoSpec};
use crate::daemon::liveness::HeartbeatPolicy;
use crate::daemon::run_task::stops::{
    bounded_after_deadline, Stop, StopAction, StopRequest, Waiting, AFTER_DEADLINE_GRACE,
};
use crate::effects::agent_driver::DEFAULT_GRACE;
use crate::effects::git::DEFAULT_GIT_RETRY;
use crate::fsm::{
    self, contract, AgentBudget, Checkout, CheckoutRepo, ContainerObservation, Effect, Event,
    Observations, RecoveryDecision, RepoHead, RunPlan, RunState,
};
use crate::journal::{agent_records, commit_event, CommitError, Journal, Record, Slot};

const INSTANCE: &str = "sim-host";
const POLL_MS: i64 = 2_000;
const LEASE_YIELD_MS: i64 = 160_000;
const GIT_STEP_MS: i64 = 300;
/// A schedule that has not settled by then is stuck (the server's duration backstop is 8 h;
/// everything here settles in minutes).
pub(super) const HORIZON_MS: i64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Actor {
    Enqueue(usize),
    Fault(usize),
    Reaper,
    Boot,
    Agent(i64, u32),
    Claim(u32),
    Heartbeat(u32),
    DrainDeadline(u32),
    Task(u32, i64),
    Sender(u32, i64),
}

/// A line waiting in a run's event sender.
#[derive(Debug, Clone)]
struct Outgoing {
    /// The container and line number of an agent line (`None`: a runner event).
    source: Option<(String, usize)>,
    text: String,
}

#[derive(Debug, Clone)]
enum GitStep {
    Prepare,
    Inspect,
    Push(Vec<RepoHead>),
}

#[derive(Debug, Clone)]
enum Busy {
    Idle,
    Git {
        step: GitStep,
        at: i64,
        failing_since: Option<i64>,
        attempt: u32,
        cancelled: bool,
    },
    Container {
        name: String,
        cursor: usize,
    },
    Flush(crate::control::wire::ReportRequest),
    Call {
        report: crate::control::wire::ReportRequest,
        first: i64,
        attempt: u32,
    },
}

impl Busy {
    fn waiting(&self) -> Waiting {
        match self {
            Busy::Idle => Waiting::NextEffect,
            Busy::Git { .. } | Busy::Container { .. } => Waiting::Step,
            Busy::Flush(_) | Busy::Call { .. } => Waiting::Report,
        }
    }
}

struct Task {
    last: Record,
    queue: VecDeque<Effect>,
    stops: VecDeque<StopRequest>,
    busy: Busy,
    budget: Option<AgentBudget>,
    sender: VecDeque<Outgoing>,
    /// The server answered 409 to an event: the run is final there.
    refused: bool,
    /// When a cancel-now reached the task (it bounds a later report).
    cancel_now_at: Option<i64>,
}

impl Task {
    fn new(last: Record) -> Task {
        Task {
            last,
            queue: VecDeque::new(),
            stops: VecDeque::new(),
            busy: Busy::Idle,
            budget: None,
            sender: VecDeque::new(),
            refused: false,
            cancel_now_at: None,
        }
    }
}

#[derive(Default)]
struct Heartbeat {
    call_started: Option<i64>,
    attempt: u32,
    failures: u64,
}

/// One runner process.
struct Host {
    gen: u32,
    tasks: BTreeMap<i64, Task>,
    draining: bool,
    deadline_at: Option<i64>,
    yield_until: Option<i64>,
    yield_pending: bool,
    claim_call_until: Option<i64>,
    heartbeat: Heartbeat,
}

/// What the invariants need beyond the world's end state.
#[derive(Default)]
pub(super) struct Ledger {
    /// Every line each run's containers printed: (attempt, line).
    pub printed: BTreeMap<i64, Vec<(u32, String)>>,
    pub lease_yields: u32,
    pub crashes: u32,
    pub drains: Vec<(i64, Option<i64>)>,
    /// Runs the server handed out whose claim the runner never journaled.
    pub unseen: BTreeSet<i64>,
}

/// One schedule in flight.
pub(super) struct Sim {
    pub rules: Rules,
    pub scenario: Scenario,
    rng: Rng,
    pub now: i64,
    wake: BinaryHeap<Reverse<(i64, u64, Actor)>>,
    pub journal: CrashJournal,
    pub server: Server,
    pub engine: Engine,
    pub git: Git,
    host: Option<Host>,
    gen: u32,
    claims: u32,
    crashes_left: VecDeque<(u32, bool)>,
    pub trace: Vec<String>,
    pub violations: Vec<String>,
    pub ledger: Ledger,
    pub settled: bool,
}

fn name_of(run_id: i64, attempt: u32) -> String {
    fsm::names::container_name(INSTANCE, run_id, attempt)
}

fn plan_for(run_id: i64) -> (RunPlan, fsm::RunSecrets) {
    let mut job = JobSpec {
        run_id,
        image: "agent:local".into(),
        initial_prompt: "fix the bug".into(),
        repos: vec![RepoSpec {
            workspace_id: 7,
            slug: "acme/app".into(),
            base_ref: "main".into(),
            continue_branch: String::new(),
        }],
        ..Default::default()
    };
    job.env
        .insert("WS_TOKEN".into(), format!("sim-run-token-{run_id}"));
    RunPlan::from_job(&job, INSTANCE)
}

/// The nominal wait before retry `attempt` (1-based) of `policy`, jittered ±20% by `rng`
/// (the backoff crate's randomization factor).
fn backoff_ms(policy: &RetryPolicy, attempt: u32, rng: &mut Rng) -> i64 {
    let initial = policy.initial.as_millis().max(1) as i64;
    let cap = policy.max_interval.as_millis().max(initial as u128) as i64;
    let nominal = initial
        .saturating_mul(1i64 << attempt.saturating_sub(1).min(30))
        .min(cap);
    nominal * (80 + rng.below(41) as i64) / 100
}

impl Sim {
    pub fn new(seed: u64, scenario: Scenario, rules: Rules) -> Sim {
        let mut sim = Sim {
            rules,
            rng: Rng::new(seed),
            now: 0,
            wake: BinaryHeap::new(),
            journal: CrashJournal::new(),
            server: Server::default(),
            engine: Engine::default(),
            git: Git::default(),
            host: None,
            gen: 0,
            claims: 0,
            crashes_left: VecDeque::new(),
            trace: Vec::new(),
            violations: Vec::new(),
            ledger: Ledger::default(),
            settled: false,
            scenario,
        };
        for (i, run) in sim.scenario.runs.clone().iter().enumerate() {
            sim.at(run.enqueue_at, Actor::Enqueue(i));
        }
        for (i, fault) in sim.scenario.faults.clone().iter().enumerate() {
            match fault {
                Fault::Crash {
                    record,
                    before_flush,
                } => sim.crashes_left.push_back((*record, *before_flush)),
                Fault::Outage { at, len } => sim.server.outages.push((*at, at + len)),
                Fault::GitFlaky { at, len } => sim.git.flaky.push((*at, at + len)),
                Fault::Cancel { at, .. } | Fault::Drain { at, .. } => sim.at(*at, Actor::Fault(i)),
                Fault::LoseClaimAnswer { .. } => {}
            }
        }
        if let Some((record, before)) = sim.crashes_left.pop_front() {
            sim.journal.arm(record, before);
        }
        sim.at(0, Actor::Boot);
        sim.at(1_000, Actor::Reaper);
        sim
    }

    fn at(&mut self, when: i64, actor: Actor) {
        let order = self.rng.next_u64();
        self.wake.push(Reverse((when.max(self.now), order, actor)));
    }

    fn note(&mut self, what: impl AsRef<str>) {
        self.trace
            .push(format!("{:>8} {}", self.now, what.as_ref()));
    }

    fn violation(&mut self, what: String) {
        self.note(format!("VIOLATION {what}"));
        self.violations.push(what);
    }

    /// Runs the schedule until the world settles or the horizon passes.
    pub fn run(&mut self) {
        while let Some(Reverse((when, _, actor))) = self.wake.pop() {
            if when > HORIZON_MS {
                break;
            }
            self.now = when;
            self.act(actor);
            if self.host.is_some() && self.journal.crashed() {
                self.die();
            }
            self.maybe_exit_drain();
            if self.is_settled() {
                self.settled = true;
                return;
            }
        }
    }

    fn is_settled(&self) -> bool {
        let Some(host) = &self.host else {
            return false;
        };
        self.server.runs.len() == self.scenario.runs.len()
            && self
                .server
                .runs
                .values()
                .all(|r| matches!(r.status, ServerStatus::Final { .. }))
            && host.tasks.is_empty()
            && !host.yield_pending
            && host.yield_until.is_none_or(|t| t <= self.now)
            && self.journal.active().map(|a| a.is_empty()).unwrap_or(false)
    }

    fn act(&mut self, actor: Actor) {
        let gen = self.host.as_ref().map(|h| h.gen);
        match actor {
            Actor::Enqueue(i) => {
                let id = i as i64 + 1;
                self.server.runs.insert(
                    id,
                    ServerRun {
                        status: ServerStatus::Queued,
                        agent_lines: Vec::new(),
                        runner_events: 0,
                        cancel_requested: false,
                        reports_accepted: 0,
                    },
                );
                self.note(format!("server queues run {id}"));
            }
            Actor::Fault(i) => self.fault(i),
            Actor::Reaper => {
                for id in self.server.reap(self.now) {
                    self.note(format!("server reaps run {id} (lease expired)"));
                }
                self.at(self.now + 1_000, Actor::Reaper);
            }
            Actor::Boot => self.boot(),
            Actor::Agent(run, attempt) => self.agent(run, attempt),
            Actor::Claim(g) if Some(g) == gen => self.claim(),
            Actor::Heartbeat(g) if Some(g) == gen => self.heartbeat(),
            Actor::DrainDeadline(g) if Some(g) == gen => self.drain_deadline(),
            Actor::Task(g, run) if Some(g) == gen => self.task(run),
            Actor::Sender(g, run) if Some(g) == gen => self.send(run),
            // An actor of a process that died.
            _ => {}
        }
    }

    fn fault(&mut self, i: usize) {
        match self.scenario.faults[i].clone() {
            Fault::Cancel { run, force, .. } => {
                let id = run as i64 + 1;
                let Some(srv) = self.server.runs.get_mut(&id) else {
                    return;
                };
                if matches!(srv.status, ServerStatus::Final { .. }) {
                    return;
                }
                srv.cancel_requested = true;
                if force {
                    srv.status = ServerStatus::Final {
                        status: "canceled".into(),
                        by: FinalBy::ForceCancel,
                    };
                }
                self.note(format!("server cancels run {id} (force {force})"));
            }
            Fault::Drain { deadline, .. } => {
                let Some(host) = self.host.as_mut() else {
                    return;
                };
                if host.draining {
                    return;
                }
                host.draining = true;
                let gen = host.gen;
                self.ledger.drains.push((self.now + deadline, None));
                self.note(format!("SIGTERM: draining, deadline in {deadline} ms"));
                self.at(self.now + deadline, Actor::DrainDeadline(gen));
            }
            _ => {}
        }
    }

    // ---- processes ------------------------------------------------------------------------

    fn die(&mut self) {
        self.host = None;
        self.journal.restart();
        self.ledger.crashes += 1;
        self.note("runner killed (SIGKILL)");
        if let Some((record, before)) = self.crashes_left.pop_front() {
            self.journal.arm(record, before);
        }
        let after = self.rng.range(500, 5_000);
        self.at(self.now + after, Actor::Boot);
    }

    fn maybe_exit_drain(&mut self) {
        let Some(host) = &self.host else { return };
        if !host.draining || !host.tasks.is_empty() {
            return;
        }
        if !self.rules.claim_yields_to_shutdown
            && host.claim_call_until.is_some_and(|t| t > self.now)
        {
            return;
        }
        let deadline_at = host.deadline_at;
        self.host = None;
        if let Some(d) = self.ledger.drains.last_mut() {
            d.1 = Some(self.now);
        }
        self.note(format!(
            "drained; runner exits (deadline passed: {})",
            deadline_at.is_some()
        ));
        self.at(self.now + 2_000, Actor::Boot);
    }

    fn boot(&mut self) {
        if self.host.is_some() {
            return;
        }
        self.gen += 1;
        let gen = self.gen;
        self.host = Some(Host {
            gen,
            tasks: BTreeMap::new(),
            draining: false,
            deadline_at: None,
            yield_until: None,
            yield_pending: false,
            claim_call_until: None,
            heartbeat: Heartbeat::default(),
        });
        self.note(format!("runner starts (process {gen})"));
        if self.rules.yields_lease && matches!(self.journal.unresolved_claim(), Ok(Some(_))) {
            self.host_mut().yield_pending = true;
            self.note("unresolved claim mark: the lease will be yielded");
        }
        let active = self.journal.active().unwrap_or_default();
        let mut owned: BTreeSet<String> = BTreeSet::new();
        let mut owned_runs: BTreeSet<i64> = BTreeSet::new();
        for slot in active {
            let Slot::Record(last) = slot else { continue };
            if self
                .recover_run(last, &mut owned, &mut owned_runs)
                .is_none()
            {
                return;
            }
        }
        // The sweep: what no active run owns goes.
        let stale: Vec<String> = self
            .engine
            .containers
            .keys()
            .filter(|n| !owned.contains(*n))
            .cloned()
            .collect();
        for name in stale {
            self.note(format!("sweep removes container {name}"));
            self.engine.containers.remove(&name);
            self.engine.forwarded.remove(&name);
        }
        let stale: Vec<i64> = self
            .git
            .checkouts
            .keys()
            .filter(|r| !owned_runs.contains(*r))
            .copied()
            .collect();
        for run in stale {
            self.note(format!("sweep removes the checkout of run {run}"));
            self.git.checkouts.remove(&run);
        }
        self.at(self.now, Actor::Claim(gen));
        self.at(self.now, Actor::Heartbeat(gen));
    }

    fn host_mut(&mut self) -> &mut Host {
        self.host.as_mut().expect("a live runner process")
    }

    fn gen(&self) -> u32 {
        self.host.as_ref().map_or(0, |h| h.gen)
    }

    /// Recovery of one active run; `None` when the process died doing it.
    fn recover_run(
        &mut self,
        last: Record,
        owned: &mut BTreeSet<String>,
        owned_runs: &mut BTreeSet<i64>,
    ) -> Option<()> {
        let run_id = last.run_id;
        owned_runs.insert(run_id);
        let state = last.state.clone();
        if let Some(c) = state.container() {
            owned.insert(c.name.clone());
        }
        let obs = self.observe(&state);
        let decision = fsm::recover(&state, &obs);
        self.note(format!(
            "recovery: run {run_id} ({}) → {}",
            state.describe(),
            decision.label()
        ));
        let replay: Vec<String> = if (self.rules.replays_output)(&decision) {
            self.engine
                .of_run(run_id)
                .into_iter()
                .filter(|n| self.engine.containers[n].phase != ContainerPhase::Created)
                .collect()
        } else {
            Vec::new()
        };
        owned.extend(replay.iter().cloned());
        let gen = self.gen();
        self.host_mut().tasks.insert(run_id, Task::new(last));
        for name in &replay {
            let unjournaled = matches!(
                &self.task_mut(run_id)?.last.state,
                RunState::Prepared { container, .. } if &container.name == name
            );
            if unjournaled && self.rules.journals_unjournaled_start {
                // It printed, so it started: journal that before its signals are fed.
                let effects = self.commit(run_id, Event::ContainerStarted)?;
                self.route(run_id, effects);
            }
            let from = self.engine.forwarded.get(name).copied().unwrap_or(0);
            let log = self.engine.containers[name].log.clone();
            let current =
                self.task_mut(run_id)?.last.state.current_container() == Some(name.as_str());
            // Past the budget the previous process folded signals in memory, which died with
            // it: fold the whole stdout again (signals only).
            let resignal = current && self.budget_spent(run_id, name);
            for (i, line) in log.iter().enumerate() {
                // The exit is judged on every signal: those of the current container whose
                // exit is not harvested yet are fed again (re-folding gives the same facts).
                if current && (i >= from || resignal) {
                    if let Some(signal) = contract::classify_stdout_line(line) {
                        self.commit_agent(run_id, name, Event::AgentSignal { signal })?;
                    }
                }
                if i >= from {
                    self.queue_line(run_id, Some((name.clone(), i)), line.clone());
                }
            }
        }
        match decision {
            RecoveryDecision::Nothing => {
                self.host_mut().tasks.remove(&run_id);
                return Some(());
            }
            RecoveryDecision::Feed(events) => {
                for event in events {
                    let effects = self.commit(run_id, event)?;
                    self.task_mut(run_id)?.queue.extend(effects);
                }
            }
            RecoveryDecision::Redo(effects) => self.task_mut(run_id)?.queue.extend(effects),
            RecoveryDecision::Reattach { name, feed } => {
                for event in feed {
                    let effects = self.commit(run_id, event)?;
                    self.task_mut(run_id)?.queue.extend(effects);
                }
                let cursor = self.engine.forwarded.get(&name).copied().unwrap_or(0);
                if self.budget_spent(run_id, &name) {
                    let log = self.engine.containers[&name].log.clone();
                    for line in log.iter().take(cursor) {
                        if let Some(signal) = contract::classify_stdout_line(line) {
                            self.commit_agent(run_id, &name, Event::AgentSignal { signal })?;
                        }
                    }
                }
                let task = self.task_mut(run_id)?;
                task.queue
                    .retain(|e| !matches!(e, Effect::KillContainer { .. }));
                task.busy = Busy::Container {
                    name: name.clone(),
                    cursor,
                };
                if task.last.state.stop_pending().is_some() {
                    self.kill_container(&name);
                }
            }
        }
        self.at(self.now, Actor::Task(gen, run_id));
        Some(())
    }

    fn observe(&self, state: &RunState) -> Observations {
        let run_id = state.plan().run_id;
        let container = match state
            .container()
            .and_then(|c| self.engine.containers.get(&c.name))
        {
            Some(c) => match c.phase {
                ContainerPhase::Running => ContainerObservation::Running,
                ContainerPhase::Exited(code) => ContainerObservation::Exited { code: Some(code) },
                ContainerPhase::Created => ContainerObservation::Gone,
            },
            None => ContainerObservation::Gone,
        };
        let branch = format!("agent-runs/run-{run_id}");
        Observations {
            container,
            checkout_present: self.git.checkouts.contains_key(&run_id),
            remote_heads: vec![("acme/app".into(), self.git.remote.get(&branch).cloned())],
            // The probe: a server that does not answer says nothing.
            server_says_final: self.server.up(self.now) && self.server.is_final(run_id),
        }
    }

    // ---- journal --------------------------------------------------------------------------

    fn task_mut(&mut self, run_id: i64) -> Option<&mut Task> {
        self.host.as_mut()?.tasks.get_mut(&run_id)
    }

    /// The run loop's commit; `None` when the process died at this record.
    fn commit(&mut self, run_id: i64, event: Event) -> Option<Vec<Effect>> {
        if matches!(event, Event::ContainerExited { .. }) {
            let pending = self
                .task_mut(run_id)?
                .budget
                .as_mut()
                .map(AgentBudget::take_pending)
                .unwrap_or_default();
            for event in pending {
                self.commit_record(run_id, event)?;
            }
        }
        self.commit_record(run_id, event)
    }

    fn commit_record(&mut self, run_id: i64, event: Event) -> Option<Vec<Effect>> {
        let now = self.now;
        let task = self.host.as_mut()?.tasks.get_mut(&run_id)?;
        let kind = event.kind();
        match commit_event(&self.journal, Some(&task.last), event, now, None) {
            Ok(committed) => {
                let mut line = None;
                if let Some(record) = committed.record {
                    line = Some(format!(
                        "run {run_id} seq {} {kind}: {}",
                        record.seq,
                        record.state.describe()
                    ));
                    task.last = record;
                }
                if let Some(line) = line {
                    self.note(line);
                }
                if self.journal.crashed() {
                    return None;
                }
                Some(committed.effects)
            }
            Err(CommitError::Rejected(_)) => Some(Vec::new()),
            Err(CommitError::Journal(_)) => None,
        }
    }

    /// An agent event within its container's journal budget, else folded (as
    /// `daemon::run_task::journal::commit_agent`).
    fn commit_agent(&mut self, run_id: i64, name: &str, event: Event) -> Option<Vec<Effect>> {
        let limit = self.rules.agent_record_budget;
        let needs_budget = self
            .task_mut(run_id)?
            .budget
            .as_ref()
            .map(|b| b.container())
            != Some(name);
        if needs_budget {
            let used = agent_records(&self.journal.records(run_id).unwrap_or_default(), name);
            self.task_mut(run_id)?.budget = Some(AgentBudget::new(name, used, limit));
        }
        let task = self.task_mut(run_id)?;
        let budget = task.budget.as_mut()?;
        let Some(event) = budget.admit(event) else {
            return Some(Vec::new());
        };
        let before = task.last.seq;
        let effects = self.commit_record(run_id, event)?;
        let task = self.task_mut(run_id)?;
        if task.last.seq != before {
            if let Some(b) = task.budget.as_mut() {
                b.recorded();
            }
        }
        Some(effects)
    }

    /// Whether container `name`'s journal budget is spent, counted from the journal.
    fn budget_spent(&self, run_id: i64, name: &str) -> bool {
        let used = agent_records(&self.journal.records(run_id).unwrap_or_default(), name);
        used >= self.rules.agent_record_budget
    }

    /// Nothing leaves the host before the record announcing it is durable.
    fn check_durable(&mut self, run_id: i64, what: &str) {
        let Some(seq) = self.task_mut(run_id).map(|t| t.last.seq) else {
            return;
        };
        let durable = self.journal.durable_seq(run_id);
        if durable < seq {
            self.violation(format!(
                "run {run_id}: {what} before its record (seq {seq}) was durable (durable {durable})"
            ));
        }
    }

    // ---- the claim loop and the heartbeat ---------------------------------------------------

    fn claim(&mut self) {
        let gen = self.gen();
        let now = self.now;
        let concurrency = self.scenario.concurrency;
        let (draining, yield_until, yield_pending, in_flight) = {
            let host = self.host_mut();
            host.claim_call_until = None;
            (
                host.draining,
                host.yield_until,
                host.yield_pending,
                host.tasks.len(),
            )
        };
        if draining {
            return;
        }
        if let Some(until) = yield_until {
            if until > now {
                self.at(until, Actor::Claim(gen));
                return;
            }
            let host = self.host_mut();
            host.yield_until = None;
            host.yield_pending = false;
            let _ = self.journal.set_unresolved_claim(None);
            self.note("lease yield over; claiming again");
        } else if yield_pending {
            if in_flight == 0 {
                self.host_mut().yield_until = Some(now + LEASE_YIELD_MS);
                self.ledger.lease_yields += 1;
                self.note("yielding the lease: no claims, no heartbeats");
                self.at(now + LEASE_YIELD_MS, Actor::Claim(gen));
            } else {
                self.at(now + POLL_MS, Actor::Claim(gen));
            }
            return;
        }
        if in_flight >= concurrency {
            self.at(now + POLL_MS, Actor::Claim(gen));
            return;
        }
        let _ = self.journal.set_unresolved_claim(Some(now));
        if !self.server.up(now) {
            // The call retries inside the client until the server is back or its budget ends.
            let until = self.server.back_at(now).min(now + 120_000);
            self.host_mut().claim_call_until = Some(until);
            let _ = self.journal.set_unresolved_claim(None);
            self.at(until, Actor::Claim(gen));
            return;
        }
        self.claims += 1;
        let lost = self
            .scenario
            .faults
            .iter()
            .any(|f| matches!(f, Fault::LoseClaimAnswer { claim } if *claim == self.claims));
        let Some(run_id) = self.server.claim(now) else {
            let _ = self.journal.set_unresolved_claim(None);
            self.at(now + POLL_MS, Actor::Claim(gen));
            return;
        };
        if lost {
            self.ledger.unseen.insert(run_id);
            self.note(format!("claim answer for run {run_id} lost in transit"));
            if self.rules.yields_lease {
                self.host_mut().yield_pending = true;
            } else {
                let _ = self.journal.set_unresolved_claim(None);
            }
            self.at(now + POLL_MS, Actor::Claim(gen));
            return;
        }
        let (plan, secrets) = plan_for(run_id);
        match commit_event(
            &self.journal,
            None,
            Event::Claimed { plan },
            now,
            Some(secrets),
        ) {
            Ok(committed) => {
                let Some(record) = committed.record else {
                    return;
                };
                self.note(format!("run {run_id} seq 1 claimed"));
                if self.journal.crashed() {
                    if self.journal.durable_seq(run_id) == 0 {
                        self.ledger.unseen.insert(run_id);
                    }
                    return;
                }
                let _ = self.journal.set_unresolved_claim(None);
                let mut task = Task::new(record);
                task.queue.extend(committed.effects);
                self.host_mut().tasks.insert(run_id, task);
                self.at(now, Actor::Task(gen, run_id));
            }
            Err(_) => {
                if self.journal.durable_seq(run_id) == 0 {
                    self.ledger.unseen.insert(run_id);
                }
                return;
            }
        }
        self.at(now + POLL_MS, Actor::Claim(gen));
    }

    fn heartbeat(&mut self) {
        let gen = self.gen();
        let now = self.now;
        let policy = HeartbeatPolicy::new(HEARTBEAT_INTERVAL);
        let call = self.rules.heartbeat_call;
        let wait = self.rules.heartbeat_wait;
        let (yielding, started, had_failed) = {
            let host = self.host_mut();
            let yielding = host.yield_until.filter(|t| *t > now);
            let started = *host.heartbeat.call_started.get_or_insert(now);
            let had_failed = host.heartbeat.attempt > 0 || host.heartbeat.failures > 0;
            (yielding, started, had_failed)
        };
        if let Some(until) = yielding {
            self.host_mut().heartbeat = Heartbeat::default();
            self.at(until, Actor::Heartbeat(gen));
            return;
        }
        if self.server.up(now) {
            self.server.last_contact_ms = now;
            self.host_mut().heartbeat = Heartbeat::default();
            if had_failed {
                // F10: after an outage the server hears from the runner within the retry gap.
                let back = self
                    .server
                    .outages
                    .iter()
                    .filter(|(_, b)| *b <= now)
                    .map(|(_, b)| *b)
                    .max()
                    .unwrap_or(now);
                let late = now - back;
                let allowed = policy.retry_gap().as_millis() as i64 * 6 / 5 + 1_000;
                if late > allowed {
                    self.violation(format!(
                        "the first heartbeat after the outage came {late} ms after the server was back (allowed {allowed} ms)"
                    ));
                }
            }
            let aborts: Vec<i64> = self
                .server
                .runs
                .iter()
                .filter(|(_, r)| r.cancel_requested && r.status == ServerStatus::Running)
                .map(|(id, _)| *id)
                .collect();
            for id in aborts {
                if let Some(task) = self.task_mut(id) {
                    if task.last.state.stop_pending().is_none() && task.stops.is_empty() {
                        task.stops.push_back(StopRequest::Cancel);
                        self.at(now, Actor::Task(gen, id));
                    }
                }
            }
            self.at(
                now + wait(&policy, 0).as_millis() as i64,
                Actor::Heartbeat(gen),
            );
            return;
        }
        let attempt = {
            let host = self.host_mut();
            host.heartbeat.attempt += 1;
            host.heartbeat.attempt
        };
        let delay = backoff_ms(&call, attempt, &mut self.rng);
        if now + delay - started > call.max_elapsed.as_millis() as i64 {
            let host = self.host_mut();
            host.heartbeat.failures += 1;
            host.heartbeat.call_started = None;
            host.heartbeat.attempt = 0;
            let failures = host.heartbeat.failures;
            self.at(
                now + wait(&policy, failures).as_millis() as i64,
                Actor::Heartbeat(gen),
            );
        } else {
            self.at(now + delay, Actor::Heartbeat(gen));
        }
    }

    fn drain_deadline(&mut self) {
        let gen = self.gen();
        let now = self.now;
        let host = self.host_mut();
        host.deadline_at = Some(now);
        let ids: Vec<i64> = host.tasks.keys().copied().collect();
        for id in &ids {
            if let Some(task) = host.tasks.get_mut(id) {
                task.stops.push_back(StopRequest::CancelNow);
            }
        }
        self.note("drain deadline passed; cancelling in-flight runs");
        for id in ids {
            self.at(now, Actor::Task(gen, id));
        }
    }

    // ---- the agent --------------------------------------------------------------------------

    fn script(&self, run_id: i64) -> AgentScript {
        self.scenario.runs[(run_id - 1) as usize].clone()
    }

    fn agent(&mut self, run_id: i64, attempt: u32) {
        let name = name_of(run_id, attempt);
        let script = self.script(run_id);
        let lines = script.lines();
        let now = self.now;
        let Some(c) = self.engine.containers.get_mut(&name) else {
            return;
        };
        if c.phase != ContainerPhase::Running {
            return;
        }
        let mut exit = None;
        let mut next = None;
        if let Some(asked) = c.stop_asked_at {
            if !script.ignores_abort {
                exit = Some(143);
            } else if self.rules.kill_after_grace {
                let kill_at = asked + DEFAULT_GRACE.as_millis() as i64;
                if now >= kill_at {
                    exit = Some(137);
                } else {
                    next = Some(kill_at);
                }
            }
            // Without the kill after the grace, an agent that ignores the stop hangs.
        } else if c.next_line < lines.len() {
            let i = c.next_line;
            if i + 1 == lines.len() && script.commits && script.ending != Ending::Crashed {
                if let Some(head) = self.git.checkouts.get_mut(&run_id) {
                    *head = agent_sha(run_id);
                }
            }
            let line = lines[i].clone();
            c.log.push(line.clone());
            c.next_line += 1;
            self.ledger
                .printed
                .entry(run_id)
                .or_default()
                .push((attempt, line));
            let flood_line =
                i > script.progress as usize && i <= (script.progress + script.flood) as usize;
            next = Some(now + if flood_line { 1 } else { script.line_gap_ms });
        } else {
            exit = Some(script.exit_code());
        }
        let c = self.engine.containers.get_mut(&name).expect("container");
        if let Some(code) = exit {
            c.phase = ContainerPhase::Exited(code);
            self.note(format!("container {name} exits {code}"));
        }
        if let Some(at) = next {
            self.at(at, Actor::Agent(run_id, attempt));
        }
        if self.host.is_some() {
            let gen = self.gen();
            self.at(now, Actor::Task(gen, run_id));
        }
    }

    fn kill_container(&mut self, name: &str) {
        let now = self.now;
        if let Some(c) = self.engine.containers.get_mut(name) {
            if c.phase == ContainerPhase::Running && c.stop_asked_at.is_none() {
                c.stop_asked_at = Some(now);
                let (run, attempt) = (c.run_id, c.attempt);
                self.note(format!("stop container {name} (abort, grace, kill)"));
                self.at(now, Actor::Agent(run, attempt));
            }
        }
    }

    // ---- the run task -----------------------------------------------------------------------

    fn queue_line(&mut self, run_id: i64, source: Option<(String, usize)>, text: String) {
        let gen = self.gen();
        if let Some(task) = self.task_mut(run_id) {
            let first = task.sender.is_empty();
            task.sender.push_back(Outgoing { source, text });
            if first {
                let now = self.now;
                self.at(now, Actor::Sender(gen, run_id));
            }
        }
    }

    /// Routes the effects a commit handed out: a kill is performed at once (the container
    /// session's driver does it), everything else is queued.
    fn route(&mut self, run_id: i64, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::KillContainer { name } => self.kill_container(&name),
                other => {
                    if let Some(task) = self.task_mut(run_id) {
                        task.queue.push_back(other);
                    }
                }
            }
        }
    }

    fn end_task(&mut self, run_id: i64, why: &str) {
        if let Some(host) = self.host.as_mut() {
            host.tasks.remove(&run_id);
        }
        self.note(format!("run {run_id} task ends: {why}"));
    }

    fn task(&mut self, run_id: i64) {
        let _ = self.task_inner(run_id);
    }

    /// One wake of a run task: `None` when it stops acting for now.
    fn task_inner(&mut self, run_id: i64) -> Option<()> {
        let gen = self.gen();
        let now = self.now;
        loop {
            let task = self.task_mut(run_id)?;
            // Stops first, decided for what the task waits on.
            if let Some(request) = task.stops.pop_front() {
                let waiting = task.busy.waiting();
                if request == StopRequest::CancelNow {
                    task.cancel_now_at.get_or_insert(now);
                }
                match (self.rules.stop_decide)(Stop::Request(request), waiting) {
                    StopAction::Journal(event) => {
                        let effects = self.commit(run_id, event)?;
                        self.route(run_id, effects);
                        if let Some(Busy::Git {
                            cancelled,
                            failing_since,
                            at,
                            ..
                        }) = self.task_mut(run_id).map(|t| &mut t.busy)
                        {
                            *cancelled = true;
                            if failing_since.is_some() {
                                // The wait between retries ends at once.
                                *at = now;
                            }
                        }
                    }
                    StopAction::Ignore => {}
                    StopAction::LeaveForNextStart => {
                        self.end_task(run_id, "left in the journal for the next start");
                        return None;
                    }
                }
                continue;
            }
            let busy = task.busy.clone();
            let cancel_now_at = task.cancel_now_at;
            // A cancel-now taken earlier still bounds a report (`stops::AFTER_DEADLINE_GRACE`).
            if let (Some(at), true) = (
                cancel_now_at,
                self.rules.deadline_bounds_report && bounded_after_deadline(busy.waiting()),
            ) {
                let leave_at = at + AFTER_DEADLINE_GRACE.as_millis() as i64;
                if now >= leave_at {
                    self.end_task(run_id, "left in the journal for the next start");
                    return None;
                }
                self.at(leave_at, Actor::Task(gen, run_id));
            }
            let task = self.task_mut(run_id)?;
            match busy {
                Busy::Idle => {
                    let Some(effect) = task.queue.pop_front() else {
                        if task.last.state.is_terminal() {
                            self.finish_terminal(run_id);
                        } else {
                            let what = task.last.state.describe();
                            self.violation(format!("run {run_id}: no effect left in state {what}"));
                            self.end_task(run_id, "stuck");
                        }
                        return None;
                    };
                    if !self.effect(run_id, effect) {
                        return None;
                    }
                }
                Busy::Git { at, .. } => {
                    if self.now < at {
                        return None;
                    }
                    if !self.git_step(run_id) {
                        return None;
                    }
                }
                Busy::Container { name, cursor } => {
                    let Some((log_len, phase, line)) = self
                        .engine
                        .containers
                        .get(&name)
                        .map(|c| (c.log.len(), c.phase, c.log.get(cursor).cloned()))
                    else {
                        let effects = self.commit(run_id, Event::ContainerVanished)?;
                        self.task_mut(run_id)?.busy = Busy::Idle;
                        self.route(run_id, effects);
                        continue;
                    };
                    if let (true, Some(line)) = (cursor < log_len, line) {
                        if let Some(signal) = contract::classify_stdout_line(&line) {
                            let effects =
                                self.commit_agent(run_id, &name, Event::AgentSignal { signal })?;
                            self.route(run_id, effects);
                        }
                        self.queue_line(run_id, Some((name.clone(), cursor)), line);
                        if let Some(Busy::Container { cursor, .. }) =
                            self.task_mut(run_id).map(|t| &mut t.busy)
                        {
                            *cursor += 1;
                        }
                        continue;
                    }
                    if self.task_mut(run_id)?.refused {
                        let effects = self.commit(run_id, Event::RunNoLongerRunning)?;
                        self.task_mut(run_id)?.busy = Busy::Idle;
                        self.route(run_id, effects);
                        self.kill_container(&name);
                        continue;
                    }
                    if let ContainerPhase::Exited(code) = phase {
                        let effects =
                            self.commit(run_id, Event::ContainerExited { code: Some(code) })?;
                        self.task_mut(run_id)?.busy = Busy::Idle;
                        self.route(run_id, effects);
                        continue;
                    }
                    return None;
                }
                Busy::Flush(report) => {
                    if !task.sender.is_empty() && !task.refused {
                        return None; // the sender wakes the task when it has drained
                    }
                    task.sender.clear();
                    task.busy = Busy::Call {
                        report,
                        first: now,
                        attempt: 0,
                    };
                }
                Busy::Call {
                    report,
                    first,
                    attempt,
                } => {
                    self.check_durable(run_id, "the report");
                    let now = self.now;
                    if self.server.up(now) {
                        self.server.last_contact_ms = now;
                        let accepted = self.server.report(run_id, &report.status);
                        self.note(format!(
                            "run {run_id}: report {} → {}",
                            report.status,
                            if accepted { "accepted" } else { "409" }
                        ));
                        let event = if accepted {
                            Event::ReportAccepted
                        } else {
                            Event::ReportRejected409
                        };
                        self.task_mut(run_id)?.busy = Busy::Idle;
                        let effects = self.commit(run_id, event)?;
                        self.route(run_id, effects);
                        continue;
                    }
                    let policy = ClientConfig::new("").result_retry;
                    let delay = backoff_ms(&policy, attempt + 1, &mut self.rng);
                    if now + delay - first > policy.max_elapsed.as_millis() as i64 {
                        self.task_mut(run_id)?.busy = Busy::Idle;
                        let event = Event::ReportFailed {
                            error: "the server did not answer".into(),
                            retryable: true,
                        };
                        let effects = self.commit(run_id, event)?;
                        self.route(run_id, effects);
                        continue;
                    }
                    self.task_mut(run_id)?.busy = Busy::Call {
                        report,
                        first,
                        attempt: attempt + 1,
                    };
                    self.at(now + delay, Actor::Task(gen, run_id));
                    return None;
                }
            }
        }
    }

    /// Starts one effect; `false` when the task must wait (or the process died).
    fn effect(&mut self, run_id: i64, effect: Effect) -> bool {
        let gen = self.gen();
        let now = self.now;
        let git = |step| Busy::Git {
            step,
            at: now + GIT_STEP_MS,
            failing_since: None,
            attempt: 0,
            cancelled: false,
        };
        match effect {
            Effect::Prepare { .. } | Effect::InspectHeads | Effect::Push { .. } => {
                let step = match effect {
                    Effect::Prepare { .. } => GitStep::Prepare,
                    Effect::InspectHeads => GitStep::Inspect,
                    Effect::Push { heads } => GitStep::Push(heads),
                    _ => unreachable!("matched above"),
                };
                self.check_durable(run_id, "a git step");
                if let Some(task) = self.task_mut(run_id) {
                    task.busy = git(step);
                }
                self.at(now + GIT_STEP_MS, Actor::Task(gen, run_id));
                false
            }
            Effect::RemoveCheckout => {
                self.check_durable(run_id, "the checkout removal");
                self.git.checkouts.remove(&run_id);
                true
            }
            Effect::StartContainer { name, attempt } => {
                self.check_durable(run_id, "the container start");
                self.engine.containers.insert(
                    name.clone(),
                    Container {
                        run_id,
                        attempt,
                        phase: ContainerPhase::Running,
                        log: Vec::new(),
                        next_line: 0,
                        stop_asked_at: None,
                    },
                );
                self.note(format!("container {name} starts"));
                let gap = self.script(run_id).line_gap_ms;
                self.at(now + gap, Actor::Agent(run_id, attempt));
                let Some(effects) = self.commit(run_id, Event::ContainerStarted) else {
                    return false;
                };
                let limit = self.rules.agent_record_budget;
                if let Some(task) = self.task_mut(run_id) {
                    task.budget = Some(AgentBudget::new(&name, 0, limit));
                    task.busy = Busy::Container { name, cursor: 0 };
                }
                self.route(run_id, effects);
                true
            }
            Effect::KillContainer { name } => {
                self.kill_container(&name);
                true
            }
            Effect::Report(report) => {
                if let Some(task) = self.task_mut(run_id) {
                    task.busy = Busy::Flush(report);
                }
                true
            }
            Effect::SendEvent { event_type, .. } => {
                self.check_durable(run_id, "a runner event");
                self.queue_line(run_id, None, event_type);
                true
            }
        }
    }

    /// A git step's outcome, now that its time has come; `false` when the task must wait.
    fn git_step(&mut self, run_id: i64) -> bool {
        let gen = self.gen();
        let now = self.now;
        let Some(Busy::Git {
            step,
            failing_since,
            attempt,
            cancelled,
            ..
        }) = self.task_mut(run_id).map(|t| t.busy.clone())
        else {
            return false;
        };
        let branch = format!("agent-runs/run-{run_id}");
        let failed = |error: String| match step {
            GitStep::Prepare => Event::CheckoutFailed { error },
            _ => Event::PushFailed { error },
        };
        let event = if self.git.failing(now) && !matches!(step, GitStep::Inspect) {
            let since = failing_since.unwrap_or(now);
            let budget = DEFAULT_GIT_RETRY.max_elapsed.as_millis() as i64;
            let delay = backoff_ms(&DEFAULT_GIT_RETRY, attempt + 1, &mut self.rng);
            if !cancelled && (self.rules.git_transient)(PROXY_503) && now + delay - since <= budget
            {
                if let Some(task) = self.task_mut(run_id) {
                    task.busy = Busy::Git {
                        step,
                        at: now + delay,
                        failing_since: Some(since),
                        attempt: attempt + 1,
                        cancelled,
                    };
                }
                self.at(now + delay, Actor::Task(gen, run_id));
                return false;
            }
            failed(format!("git: {PROXY_503}"))
        } else if cancelled && failing_since.is_some() {
            failed("stopped while waiting to retry".into())
        } else {
            match step {
                GitStep::Prepare => {
                    self.git.checkouts.insert(run_id, BASE_SHA.into());
                    Event::CheckoutReady {
                        checkout: Checkout {
                            root: format!("/cache/.workspaces/run-{run_id}"),
                            repos: vec![CheckoutRepo {
                                slug: "acme/app".into(),
                                path: format!("/cache/.workspaces/run-{run_id}/acme/app"),
                                branch: branch.clone(),
                                base_commit: BASE_SHA.into(),
                            }],
                        },
                    }
                }
                GitStep::Inspect => match self.git.checkouts.get(&run_id) {
                    Some(head) => Event::HeadsInspected {
                        heads: vec![RepoHead {
                            slug: "acme/app".into(),
                            head: head.clone(),
                        }],
                    },
                    None => failed("the checkout is gone".into()),
                },
                GitStep::Push(heads) => {
                    let mut pushed = Vec::new();
                    for head in heads {
                        if head.head == BASE_SHA {
                            continue;
                        }
                        self.git.remote.insert(branch.clone(), head.head.clone());
                        self.git
                            .pushes
                            .push((run_id, branch.clone(), head.head.clone()));
                        pushed.push(head);
                    }
                    if pushed.is_empty() {
                        Event::PushSkipped
                    } else {
                        Event::PushDone { heads: pushed }
                    }
                }
            }
        };
        if let Some(task) = self.task_mut(run_id) {
            task.busy = Busy::Idle;
        }
        let Some(effects) = self.commit(run_id, event) else {
            return false;
        };
        self.route(run_id, effects);
        true
    }

    fn send(&mut self, run_id: i64) {
        let gen = self.gen();
        let now = self.now;
        let call = self.scenario.event_call_ms;
        let Some(task) = self.task_mut(run_id) else {
            return;
        };
        let Some(front) = task.sender.front().cloned() else {
            return;
        };
        if !self.server.up(now) {
            let retry = self.server.back_at(now).min(now + 2_000);
            self.at(retry, Actor::Sender(gen, run_id));
            return;
        }
        if self.server.is_final(run_id) {
            let task = self.task_mut(run_id).expect("task");
            task.sender.clear();
            task.refused = true;
            self.at(now, Actor::Task(gen, run_id));
            return;
        }
        self.task_mut(run_id).expect("task").sender.pop_front();
        let srv = self.server.runs.get_mut(&run_id).expect("server run");
        match front.source {
            Some((container, line)) => {
                srv.agent_lines.push(front.text);
                // The progress file: the last line the server answered.
                self.engine.forwarded.insert(container, line + 1);
            }
            None => srv.runner_events += 1,
        }
        let empty = self.task_mut(run_id).is_none_or(|t| t.sender.is_empty());
        if empty {
            self.at(now, Actor::Task(gen, run_id));
        } else {
            self.at(now + call, Actor::Sender(gen, run_id));
        }
    }

    /// The run is terminal: its containers (every attempt), progress files and checkout go.
    fn finish_terminal(&mut self, run_id: i64) {
        for name in self.engine.of_run(run_id) {
            self.engine.containers.remove(&name);
            self.engine.forwarded.remove(&name);
        }
        self.git.checkouts.remove(&run_id);
        let what = self
            .task_mut(run_id)
            .map(|t| t.last.state.describe())
            .unwrap_or_default();
        self.end_task(run_id, &format!("terminal ({what})"));
    }

    pub(super) fn heartbeat_interval_ms() -> i64 {
        HEARTBEAT_INTERVAL.as_millis() as i64
    }

    pub(super) fn retry_gap_ms() -> i64 {
        HeartbeatPolicy::new(HEARTBEAT_INTERVAL)
            .retry_gap()
            .as_millis() as i64
    }

    pub(super) fn drain_bound_ms() -> i64 {
        let step = Duration::from_secs(10).as_millis() as i64; // run_task's ABANDON_AFTER
        step.max(DEFAULT_GRACE.as_millis() as i64) + 3_000
    }
}
