//! States, events, effects and the transition function of one run. Pure: no IO, no clock, no
//! randomness. Time and observations arrive as event data.

use serde::{Deserialize, Serialize};
use serde_json::json;
use strum::{Display, EnumDiscriminants, EnumIter};

use super::contract::{AgentSignal, STARTING};
use super::plan::RunPlan;
use super::stop;
use super::verdict::{decide_on_exit, with_push, Status, Verdict};
use crate::protocol::ReportRequest;

/// One prepared repo checkout (the output of `windshift-triage prepare`, spec 4.10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutRepo {
    pub slug: String,
    pub path: String,
    pub branch: String,
    pub base_commit: String,
}

/// The prepared workspace: `root` is mounted at `/workspace` (the checkout itself for one
/// repo, `<cache>/.workspaces/run-<id>` for several, spec 4.9).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    pub root: String,
    pub repos: Vec<CheckoutRepo>,
}

/// A repo's head commit after the agent ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoHead {
    pub slug: String,
    pub head: String,
}

/// Why the runner is stopping a run before it ends by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum StopReason {
    /// The server asked (heartbeat `abort`, spec 4.5); `force` when the admin force-canceled.
    Canceled { force: bool },
    /// The runner is shutting down and the drain deadline passed (spec 4.6).
    Drain,
    /// The runner's own per-run wall-clock limit passed (spec 9.9).
    Timeout,
}

/// The agent's `finish` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finish {
    pub outcome: String,
    pub summary: String,
}

/// What the agent's stdout said so far: only the facts the verdict table needs (spec 6.5).
#[derive(Debug, Clone, Default, Eq, Serialize, Deserialize)]
pub struct AgentFacts {
    /// Some stdout line had a non-empty `type` (row 2).
    pub saw_contract_event: bool,
    /// A stdout line exceeded 1 MiB and the rest was discarded (row 3).
    pub degraded: bool,
    /// The last `finish` event (rows 4 and 6).
    pub finish: Option<Finish>,
    /// The last `error` event's message (rows 5 and 7).
    pub last_error: Option<String>,
    /// `session_idle` was seen: the driver is in the shutdown handshake (spec 6.4).
    pub idle: bool,
    /// The agent's `starting` event was seen: it got past its configuration checks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
}

/// Equality leaves `started` out: it only sharpens the error text of an exit 2, and journals
/// written before it existed lack it, so their replay (`journal verify`) must still match.
impl PartialEq for AgentFacts {
    fn eq(&self, other: &Self) -> bool {
        let AgentFacts {
            saw_contract_event,
            degraded,
            finish,
            last_error,
            idle,
            started: _,
        } = self;
        *saw_contract_event == other.saw_contract_event
            && *degraded == other.degraded
            && *finish == other.finish
            && *last_error == other.last_error
            && *idle == other.idle
    }
}

/// Intent: checkout preparation attempt `attempt` was started (or is about to be).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareStarted {
    pub attempt: u32,
}

/// Intent: container `name` (attempt `attempt`) is being started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStarting {
    pub name: String,
    pub attempt: u32,
}

/// Intent: these repo heads are being pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushStarting {
    pub heads: Vec<RepoHead>,
}

/// Intent: the report of `verdict` is being sent (attempt counts retries across restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportStarting {
    pub verdict: Verdict,
    pub attempt: u32,
}

/// The container has exited with a succeeded verdict; what is left is the push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfterExit {
    pub exit_code: Option<i32>,
    /// The verdict before the push outcome is added.
    pub verdict: Verdict,
    /// Set once the heads are known and the push is handed out.
    pub push: Option<PushStarting>,
}

/// The durable state of one run. Reported and Failed are terminal.
///
/// `Pushed` is the report phase of every run whose verdict is decided, pushed or not: a failed
/// agent run still goes through `Pushed` (with a failed verdict) to `Reported`. `Failed` means
/// the run ended *without* the server accepting our verdict (abandoned after a 409, report
/// rejected for good).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, EnumDiscriminants)]
#[serde(tag = "state", rename_all = "snake_case")]
#[strum_discriminants(
    name(StateKind),
    derive(EnumIter, Display, Hash, Serialize, Deserialize)
)]
#[strum_discriminants(serde(rename_all = "snake_case"))]
#[strum_discriminants(strum(serialize_all = "snake_case"))]
pub enum RunState {
    Claimed {
        plan: RunPlan,
        prepare: PrepareStarted,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop: Option<StopReason>,
    },
    Prepared {
        plan: RunPlan,
        checkout: Checkout,
        container: ContainerStarting,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop: Option<StopReason>,
    },
    Running {
        plan: RunPlan,
        checkout: Checkout,
        container: ContainerStarting,
        agent: AgentFacts,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop: Option<StopReason>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<AfterExit>,
    },
    Pushed {
        plan: RunPlan,
        report: ReportStarting,
    },
    Reported {
        plan: RunPlan,
        verdict: Verdict,
    },
    Failed {
        plan: RunPlan,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verdict: Option<Verdict>,
    },
}

impl RunState {
    pub fn kind(&self) -> StateKind {
        StateKind::from(self)
    }

    pub fn plan(&self) -> &RunPlan {
        match self {
            RunState::Claimed { plan, .. }
            | RunState::Prepared { plan, .. }
            | RunState::Running { plan, .. }
            | RunState::Pushed { plan, .. }
            | RunState::Reported { plan, .. }
            | RunState::Failed { plan, .. } => plan,
        }
    }

    pub fn is_terminal(&self) -> bool {
        self.kind().is_terminal()
    }

    /// The verdict, once decided.
    pub fn verdict(&self) -> Option<&Verdict> {
        match self {
            RunState::Pushed { report, .. } => Some(&report.verdict),
            RunState::Reported { verdict, .. } => Some(verdict),
            RunState::Failed { verdict, .. } => verdict.as_ref(),
            _ => None,
        }
    }

    /// A one-line human description of the state and its intent.
    pub fn describe(&self) -> String {
        match self {
            RunState::Claimed { prepare, stop, .. } => {
                format!(
                    "claimed, prepare attempt {} started{}",
                    prepare.attempt,
                    stop_note(stop)
                )
            }
            RunState::Prepared {
                container, stop, ..
            } => {
                format!(
                    "prepared, container {} starting{}",
                    container.name,
                    stop_note(stop)
                )
            }
            RunState::Running {
                container,
                after: None,
                stop,
                ..
            } => {
                format!("running in container {}{}", container.name, stop_note(stop))
            }
            RunState::Running {
                after: Some(after),
                stop,
                ..
            } => match &after.push {
                None => format!("container exited, inspecting heads{}", stop_note(stop)),
                Some(push) => format!(
                    "push of {} starting{}",
                    push.heads
                        .iter()
                        .map(|h| format!("{}@{}", h.slug, short(&h.head)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    stop_note(stop)
                ),
            },
            RunState::Pushed { report, .. } => format!(
                "report {} starting (attempt {})",
                describe_verdict(&report.verdict),
                report.attempt
            ),
            RunState::Reported { verdict, .. } => format!("reported {}", describe_verdict(verdict)),
            RunState::Failed { reason, .. } => format!("failed: {reason}"),
        }
    }
}

fn stop_note(stop: &Option<StopReason>) -> String {
    match stop {
        None => String::new(),
        Some(StopReason::Canceled { force: false }) => ", cancel requested".into(),
        Some(StopReason::Canceled { force: true }) => ", force-cancel requested".into(),
        Some(StopReason::Drain) => ", drain deadline passed".into(),
        Some(StopReason::Timeout) => ", run timeout passed".into(),
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// `succeeded`, or `failed ("…")`.
pub fn describe_verdict(v: &Verdict) -> String {
    if v.error.is_empty() {
        v.status.as_wire().to_owned()
    } else {
        format!("{} ({:?})", v.status.as_wire(), v.error)
    }
}

impl StateKind {
    pub fn is_terminal(self) -> bool {
        matches!(self, StateKind::Reported | StateKind::Failed)
    }
}

/// Something that happened to a run: an effect's outcome, a control-plane fact, a deadline.
/// Text in events (errors) is already redacted by whoever produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, EnumDiscriminants)]
#[serde(tag = "event", rename_all = "snake_case")]
#[strum_discriminants(
    name(EventKind),
    derive(EnumIter, Display, Hash, Serialize, Deserialize)
)]
#[strum_discriminants(serde(rename_all = "snake_case"))]
#[strum_discriminants(strum(serialize_all = "snake_case"))]
pub enum Event {
    /// The run was claimed; always the first event of a run.
    Claimed {
        plan: RunPlan,
    },
    /// (Re)start the checkout with a fresh attempt (recovery of a partial prepare).
    PrepareStarted,
    CheckoutReady {
        checkout: Checkout,
    },
    CheckoutFailed {
        error: String,
    },
    /// (Re)start the container with a fresh attempt and name (recovery).
    ContainerStarting,
    ContainerStarted,
    /// The container exited; `None` when no exit code is available (reported as -1).
    ContainerExited {
        code: Option<i32>,
    },
    /// The container is gone without an exit code we could collect.
    ContainerVanished,
    /// The container could not be created or started (image refused by the allow-list or
    /// the contract label, no image, no prompt, engine error). Nothing ran.
    ContainerStartFailed {
        error: String,
    },
    AgentSignal {
        signal: AgentSignal,
    },
    /// A stdout line exceeded 1 MiB; the rest of the stream was discarded (spec 5.4).
    StreamDegraded,
    /// The repos' heads after the agent (the answer to [`Effect::InspectHeads`]).
    HeadsInspected {
        heads: Vec<RepoHead>,
    },
    PushDone {
        heads: Vec<RepoHead>,
    },
    /// Nothing to push: every head equals its base (spec 4.9 "no_changes").
    PushSkipped,
    PushFailed {
        error: String,
    },
    ReportAccepted,
    /// The result call got 409: the run is no longer running on the server.
    ReportRejected409,
    ReportFailed {
        error: String,
        retryable: bool,
    },
    CancelRequested {
        force: bool,
    },
    DrainDeadlinePassed,
    RunTimeoutPassed,
    /// The server answered 409 to an event or says the run is final: abandon without report.
    RunNoLongerRunning,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        EventKind::from(self)
    }
}

/// Work the caller must do after the transition's record is flushed. Effects carry the
/// run's identity implicitly: the caller knows which run it stepped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Prepare the checkout (attempt `attempt`; the previous attempt's leftovers are removed
    /// first by a preceding `RemoveCheckout`).
    Prepare { attempt: u32 },
    /// Remove the run's checkout / workspace root (idempotent).
    RemoveCheckout,
    /// Start (and attach to) the agent container with this deterministic name.
    StartContainer { name: String, attempt: u32 },
    /// Stop the container: abort + close stdin, then kill after the grace period (spec 6.4).
    KillContainer { name: String },
    /// Read the repos' head commits (local, read-only); answer with `HeadsInspected`.
    InspectHeads,
    /// Push these heads to the run branch; answer with `PushDone`/`PushSkipped`/`PushFailed`.
    Push { heads: Vec<RepoHead> },
    /// Send the result call; answer with `ReportAccepted`/`ReportRejected409`/`ReportFailed`.
    Report(ReportRequest),
    /// Send one run event (spec 2.5), e.g. `lifecycle` worktree_ready/pushed/no_changes/push_failed.
    SendEvent {
        event_type: String,
        payload_json: String,
    },
}

/// Why an event was not applied. Every (state, event) pair is either a transition or one of
/// these; the caller journals nothing for a rejection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the run is {state} (terminal); terminal states absorb every event ({event} ignored)")]
    Terminal { state: StateKind, event: EventKind },
    #[error("event {event} does not apply in state {state}")]
    NotApplicable { state: StateKind, event: EventKind },
    #[error("the run is already stopping; {event} ignored in state {state}")]
    AlreadyStopping { state: StateKind, event: EventKind },
    #[error("the run was already claimed; a claimed event may only start a run")]
    AlreadyClaimed { state: StateKind },
    #[error("a run's first event must be claimed, got {event}")]
    NotClaimedYet { event: EventKind },
}

/// The outcome of a transition.
pub type Transition = Result<(RunState, Vec<Effect>), Rejected>;

/// The first transition: a claimed run. Runs with repos start by preparing the checkout;
/// runs without go straight to starting the container; a container job without an image
/// (spec 5.2) or with refused input ([`RunPlan::refusal`]) fails at once.
pub fn claim(plan: RunPlan) -> (RunState, Vec<Effect>) {
    // Refused claim input (bad env entry, duplicate repo) fails before any checkout or push.
    if let Some(why) = plan.refusal() {
        return to_report(plan, Verdict::failed(why), false);
    }
    if !plan.is_coding_agent() && plan.image.trim().is_empty() {
        return to_report(plan, Verdict::failed("container job has no image"), false);
    }
    if plan.repos.is_empty() {
        return start_container(plan, Checkout::default(), 1, None, Vec::new());
    }
    (
        RunState::Claimed {
            plan,
            prepare: PrepareStarted { attempt: 1 },
            stop: None,
        },
        vec![Effect::Prepare { attempt: 1 }],
    )
}

/// Applies `event` to a run that may not exist yet (`None`): the first event must be
/// `Claimed`. Used by the journal and replay, which start from nothing.
pub fn apply(state: Option<&RunState>, event: &Event) -> Transition {
    match (state, event) {
        (None, Event::Claimed { plan }) => Ok(claim(plan.clone())),
        (None, other) => Err(Rejected::NotClaimedYet {
            event: other.kind(),
        }),
        (Some(state), event) => transition(state, event),
    }
}

/// The transition function: (state, event) → (next state, effects) or a typed rejection.
/// A transition that returns the same state and no effects changed nothing; the caller
/// need not journal it.
pub fn transition(state: &RunState, event: &Event) -> Transition {
    let na = || Rejected::NotApplicable {
        state: state.kind(),
        event: event.kind(),
    };
    if state.is_terminal() {
        return Err(Rejected::Terminal {
            state: state.kind(),
            event: event.kind(),
        });
    }
    if let Event::Claimed { .. } = event {
        return Err(Rejected::AlreadyClaimed {
            state: state.kind(),
        });
    }
    if let Event::RunNoLongerRunning = event {
        return Ok(abandon(state));
    }
    // What a stop does, and what the outcome of a stopping run's phase does, is decided in one
    // place; the rules below only see runs that are not stopping.
    if let Some(decided) = stop::decide(state, event) {
        return decided;
    }
    match state {
        RunState::Claimed { plan, prepare, .. } => match event {
            Event::PrepareStarted => {
                let attempt = prepare.attempt + 1;
                Ok((
                    RunState::Claimed {
                        plan: plan.clone(),
                        prepare: PrepareStarted { attempt },
                        stop: None,
                    },
                    vec![Effect::RemoveCheckout, Effect::Prepare { attempt }],
                ))
            }
            Event::CheckoutReady { checkout } => {
                let events = worktree_ready_events(plan, checkout);
                Ok(start_container(
                    plan.clone(),
                    checkout.clone(),
                    1,
                    None,
                    events,
                ))
            }
            Event::CheckoutFailed { error } => Ok(to_report(
                plan.clone(),
                Verdict::failed(format!("triage prepare: {error}")),
                true,
            )),
            _ => Err(na()),
        },
        RunState::Prepared {
            plan,
            checkout,
            container,
            stop,
        } => match event {
            Event::ContainerStarting => {
                let (next, mut effects) = start_container(
                    plan.clone(),
                    checkout.clone(),
                    container.attempt + 1,
                    None,
                    Vec::new(),
                );
                effects.insert(
                    0,
                    Effect::KillContainer {
                        name: container.name.clone(),
                    },
                );
                Ok((next, effects))
            }
            Event::ContainerStarted => {
                let effects = stop::on_container_started(*stop, &container.name);
                Ok((
                    RunState::Running {
                        plan: plan.clone(),
                        checkout: checkout.clone(),
                        container: container.clone(),
                        agent: AgentFacts::default(),
                        stop: *stop,
                        after: None,
                    },
                    effects,
                ))
            }
            Event::ContainerExited { code } => Ok(on_exit(
                plan,
                checkout,
                &AgentFacts::default(),
                *stop,
                container,
                *code,
            )),
            Event::ContainerVanished => Ok(on_vanished(plan, container)),
            Event::ContainerStartFailed { error } => Ok(to_report(
                plan.clone(),
                Verdict::failed(error.clone()),
                true,
            )),
            _ => Err(na()),
        },
        RunState::Running {
            plan,
            checkout,
            container,
            agent,
            stop,
            after: None,
        } => {
            let with = |agent: AgentFacts, stop: Option<StopReason>| RunState::Running {
                plan: plan.clone(),
                checkout: checkout.clone(),
                container: container.clone(),
                agent,
                stop,
                after: None,
            };
            match event {
                Event::AgentSignal { signal } => {
                    let mut facts = agent.clone();
                    facts.saw_contract_event = true;
                    match signal {
                        AgentSignal::Event { event_type } => {
                            facts.started |= event_type == STARTING;
                        }
                        AgentSignal::Finish { outcome, summary } => {
                            facts.finish = Some(Finish {
                                outcome: outcome.clone(),
                                summary: summary.clone(),
                            })
                        }
                        AgentSignal::Error { message } => facts.last_error = Some(message.clone()),
                        AgentSignal::SessionIdle => facts.idle = true,
                    }
                    Ok((with(facts, *stop), Vec::new()))
                }
                Event::StreamDegraded => {
                    let mut facts = agent.clone();
                    facts.degraded = true;
                    Ok((with(facts, *stop), Vec::new()))
                }
                Event::ContainerExited { code } => {
                    Ok(on_exit(plan, checkout, agent, *stop, container, *code))
                }
                Event::ContainerVanished => Ok(on_vanished(plan, container)),
                _ => Err(na()),
            }
        }
        RunState::Running {
            plan,
            checkout,
            container,
            agent,
            stop: _,
            after: Some(after),
        } => match event {
            Event::HeadsInspected { heads } => {
                if after.push.is_some() {
                    return Err(na());
                }
                let changed: Vec<RepoHead> = heads
                    .iter()
                    .filter(|h| {
                        checkout
                            .repos
                            .iter()
                            .find(|c| c.slug == h.slug)
                            .is_some_and(|c| c.base_commit != h.head)
                    })
                    .cloned()
                    .collect();
                if changed.is_empty() {
                    return Ok(on_pushed(plan, checkout, &after.verdict, &[]));
                }
                let mut next = after.clone();
                next.push = Some(PushStarting {
                    heads: changed.clone(),
                });
                Ok((
                    RunState::Running {
                        plan: plan.clone(),
                        checkout: checkout.clone(),
                        container: container.clone(),
                        agent: agent.clone(),
                        stop: None,
                        after: Some(next),
                    },
                    vec![Effect::Push { heads: changed }],
                ))
            }
            Event::PushDone { heads } => {
                if after.push.is_none() {
                    return Err(na());
                }
                Ok(on_pushed(plan, checkout, &after.verdict, heads))
            }
            Event::PushSkipped => Ok(on_pushed(plan, checkout, &after.verdict, &[])),
            // Also accepted before the push intent: reading the heads can fail too (the agent
            // deleted its branch or broke `.git`), and that is a push failure (spec 4.9).
            Event::PushFailed { error } => {
                let mut effects = vec![lifecycle(
                    plan,
                    None,
                    json!({"phase": "push_failed", "error": error}),
                )];
                let (next, more) = to_report(
                    plan.clone(),
                    Verdict::failed(format!("triage push: {error}")),
                    true,
                );
                effects.extend(more);
                Ok((next, effects))
            }
            _ => Err(na()),
        },
        RunState::Pushed { plan, report } => match event {
            Event::ReportAccepted => Ok((
                RunState::Reported {
                    plan: plan.clone(),
                    verdict: report.verdict.clone(),
                },
                Vec::new(),
            )),
            Event::ReportRejected409 => Ok((
                RunState::Failed {
                    plan: plan.clone(),
                    reason: "abandoned: the server answered 409 to the report (the run was \
                             already final: force-canceled, reaped, or reported before a restart)"
                        .into(),
                    verdict: Some(report.verdict.clone()),
                },
                Vec::new(),
            )),
            Event::ReportFailed { error, retryable } => {
                if *retryable {
                    Ok((
                        RunState::Pushed {
                            plan: plan.clone(),
                            report: ReportStarting {
                                verdict: report.verdict.clone(),
                                attempt: report.attempt + 1,
                            },
                        },
                        vec![Effect::Report(report.verdict.to_report())],
                    ))
                } else {
                    Ok((
                        RunState::Failed {
                            plan: plan.clone(),
                            reason: format!("report rejected for good: {error}"),
                            verdict: Some(report.verdict.clone()),
                        },
                        Vec::new(),
                    ))
                }
            }
            _ => Err(na()),
        },
        RunState::Reported { .. } | RunState::Failed { .. } => Err(Rejected::Terminal {
            state: state.kind(),
            event: event.kind(),
        }),
    }
}

/// Enter Prepared with a container intent and hand out its start.
fn start_container(
    plan: RunPlan,
    checkout: Checkout,
    attempt: u32,
    stop: Option<StopReason>,
    mut effects: Vec<Effect>,
) -> (RunState, Vec<Effect>) {
    let name = plan.container_name(attempt);
    effects.push(Effect::StartContainer {
        name: name.clone(),
        attempt,
    });
    (
        RunState::Prepared {
            plan,
            checkout,
            container: ContainerStarting { name, attempt },
            stop,
        },
        effects,
    )
}

/// Enter the report phase with `verdict`. `checkout` says whether a checkout may exist.
pub(super) fn to_report(
    plan: RunPlan,
    verdict: Verdict,
    checkout: bool,
) -> (RunState, Vec<Effect>) {
    let mut effects = Vec::new();
    if checkout && !plan.repos.is_empty() {
        effects.push(Effect::RemoveCheckout);
    }
    effects.push(Effect::Report(verdict.to_report()));
    (
        RunState::Pushed {
            plan,
            report: ReportStarting {
                verdict,
                attempt: 1,
            },
        },
        effects,
    )
}

fn on_exit(
    plan: &RunPlan,
    checkout: &Checkout,
    agent: &AgentFacts,
    stop: Option<StopReason>,
    container: &ContainerStarting,
    code: Option<i32>,
) -> (RunState, Vec<Effect>) {
    let verdict = decide_on_exit(plan, agent, stop, code);
    if verdict.status == Status::Succeeded && !plan.repos.is_empty() {
        return (
            RunState::Running {
                plan: plan.clone(),
                checkout: checkout.clone(),
                container: container.clone(),
                agent: agent.clone(),
                stop,
                after: Some(AfterExit {
                    exit_code: code,
                    verdict,
                    push: None,
                }),
            },
            vec![Effect::InspectHeads],
        );
    }
    to_report(plan.clone(), verdict, true)
}

fn on_vanished(plan: &RunPlan, container: &ContainerStarting) -> (RunState, Vec<Effect>) {
    let verdict = Verdict::failed(format!(
        "runner interrupted: container {} disappeared before its exit code could be read",
        container.name
    ));
    to_report(plan.clone(), verdict, true)
}

/// The push step is over (`pushed` lists the repos that were pushed; empty = no changes).
fn on_pushed(
    plan: &RunPlan,
    checkout: &Checkout,
    verdict: &Verdict,
    pushed: &[RepoHead],
) -> (RunState, Vec<Effect>) {
    let mut effects = Vec::new();
    for repo in &checkout.repos {
        let repo_field = (plan.repos.len() > 1).then_some(repo.slug.as_str());
        match pushed.iter().find(|h| h.slug == repo.slug) {
            Some(head) => {
                let branch = plan
                    .repos
                    .iter()
                    .find(|r| r.slug == repo.slug)
                    .map(|r| plan.branch_for(r))
                    .unwrap_or_default();
                effects.push(lifecycle(
                    plan,
                    repo_field,
                    json!({"phase": "pushed", "branch": branch, "head": head.head}),
                ));
            }
            None => effects.push(lifecycle(plan, repo_field, json!({"phase": "no_changes"}))),
        }
    }
    let (next, more) = to_report(
        plan.clone(),
        with_push(plan, verdict, checkout, pushed),
        true,
    );
    effects.extend(more);
    (next, effects)
}

fn worktree_ready_events(plan: &RunPlan, checkout: &Checkout) -> Vec<Effect> {
    checkout
        .repos
        .iter()
        .map(|repo| {
            let repo_field = (plan.repos.len() > 1).then_some(repo.slug.as_str());
            lifecycle(
                plan,
                repo_field,
                json!({
                    "phase": "worktree_ready",
                    "path": repo.path,
                    "branch": repo.branch,
                    "base_commit": repo.base_commit,
                }),
            )
        })
        .collect()
}

/// A `lifecycle` event; multi-repo runs add a `repo` field (spec 4.9).
fn lifecycle(_plan: &RunPlan, repo: Option<&str>, mut payload: serde_json::Value) -> Effect {
    if let (Some(repo), Some(obj)) = (repo, payload.as_object_mut()) {
        obj.insert("repo".into(), json!(repo));
    }
    Effect::SendEvent {
        event_type: "lifecycle".into(),
        payload_json: payload.to_string(),
    }
}

/// The server says the run is no longer running: stop everything, report nothing.
fn abandon(state: &RunState) -> (RunState, Vec<Effect>) {
    let plan = state.plan().clone();
    let mut effects = Vec::new();
    match state {
        RunState::Prepared { container, .. }
        | RunState::Running {
            container,
            after: None,
            ..
        } => effects.push(Effect::KillContainer {
            name: container.name.clone(),
        }),
        _ => {}
    }
    if !plan.repos.is_empty() && !matches!(state, RunState::Pushed { .. }) {
        effects.push(Effect::RemoveCheckout);
    }
    (
        RunState::Failed {
            plan,
            reason: "abandoned: the server says the run is no longer running (409)".into(),
            verdict: state.verdict().cloned(),
        },
        effects,
    )
}
