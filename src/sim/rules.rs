//! The runner's rules the simulation runs: by default the real ones, read from the code the
//! daemon runs (the recovery table's replay rule, the stop table, the heartbeat policy, the
//! git retry classifier, the agent-record budget). [`Rules::without`] swaps one for the rule
//! the runner had before a chaos finding was fixed, so a finding's seed is shown to fail
//! without its fix (tests/sim.rs).

use std::time::Duration;

use crate::control::client::{ClientConfig, RetryPolicy};
use crate::daemon::liveness::HeartbeatPolicy;
use crate::daemon::run_task::stops::{self, Stop, StopAction, StopRequest, Waiting};
use crate::effects::git::{classify_git_stderr, Transience};
use crate::fsm::{RecoveryDecision, AGENT_RECORD_BUDGET};

/// A chaos finding (docs/RELIABILITY.md) or a security/container case whose fix the
/// simulation checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumIter, strum::IntoStaticStr)]
pub enum Finding {
    /// Agent events queued in memory at a crash are replayed from the container's logs for
    /// every recovery decision but abandon and re-attach.
    F5LostOutputTail,
    /// A claim the server answered but the runner never journaled ends in a lease yield, so
    /// the server reaps it instead of keeping it running for hours.
    F6ForgottenClaim,
    /// Transient git-proxy errors are retried within the git retry budget.
    F7TransientGit,
    /// The claim call yields to a shutdown instead of waiting out its retry budget.
    F8SlowShutdown,
    /// A drain past its deadline ends even while the report is still retrying.
    F9HungDrain,
    /// A failing heartbeat is retried at least every retry gap, so an outage shorter than
    /// the lease does not get runs reaped.
    F10ReapedByOutage,
    /// Found by this simulation: a drain deadline that reached a run in its container phase
    /// still bounds the report that follows (before, a report retrying against a server
    /// that was down kept the drain going for minutes).
    DeadlineBeforeReport,
    /// Security issue, item 5: the journal bytes of a run are bounded whatever the agent
    /// prints (the agent-record budget).
    AgentJournalFlood,
    /// Found by this simulation: a container whose start the previous process never
    /// journaled, and which printed its finish and exited while no runner watched, is judged
    /// on its output (its start is journaled before the replay feeds its signals).
    UnjournaledStartVerdict,
    /// Trust boundary: a stop of an agent that ignores abort and SIGTERM ends with the kill
    /// after the grace; nothing waits on the agent.
    StopWaitsOnAgent,
}

/// See the module docs.
#[derive(Clone)]
pub struct Rules {
    pub(super) name: &'static str,
    pub(super) replays_output: fn(&RecoveryDecision) -> bool,
    pub(super) stop_decide: fn(Stop, Waiting) -> StopAction,
    pub(super) heartbeat_call: RetryPolicy,
    pub(super) heartbeat_wait: fn(&HeartbeatPolicy, u64) -> Duration,
    pub(super) git_transient: fn(&str) -> bool,
    pub(super) agent_record_budget: u32,
    pub(super) yields_lease: bool,
    pub(super) claim_yields_to_shutdown: bool,
    pub(super) kill_after_grace: bool,
    pub(super) journals_unjournaled_start: bool,
    pub(super) deadline_bounds_report: bool,
}

/// The heartbeat interval the simulation runs with (the documented default).
pub(super) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

impl Rules {
    /// The rules the daemon runs today.
    pub fn current() -> Rules {
        let policy = HeartbeatPolicy::new(HEARTBEAT_INTERVAL);
        Rules {
            name: "current",
            replays_output: RecoveryDecision::replays_output,
            stop_decide: stops::decide,
            heartbeat_call: policy.client_retry(ClientConfig::new("").heartbeat_retry),
            heartbeat_wait: HeartbeatPolicy::wait_before_next,
            git_transient: |stderr| classify_git_stderr(stderr) == Transience::Transient,
            agent_record_budget: AGENT_RECORD_BUDGET,
            yields_lease: true,
            claim_yields_to_shutdown: true,
            kill_after_grace: true,
            journals_unjournaled_start: true,
            deadline_bounds_report: true,
        }
    }

    /// The current rules with `finding`'s fix taken out (the runner's rule before it).
    pub fn without(finding: Finding) -> Rules {
        let mut rules = Rules::current();
        rules.name = finding.into();
        match finding {
            // Only a re-attach read the container's output again.
            Finding::F5LostOutputTail => rules.replays_output = |_| false,
            Finding::F6ForgottenClaim => rules.yields_lease = false,
            // Every git failure failed the step at once.
            Finding::F7TransientGit => rules.git_transient = |_| false,
            Finding::F8SlowShutdown => rules.claim_yields_to_shutdown = false,
            // The report phase let a drain stop pass until the report's retries ran out (and
            // nothing bounded it later either).
            Finding::F9HungDrain => {
                rules.deadline_bounds_report = false;
                rules.stop_decide = |stop, waiting| match (stop, waiting) {
                    (Stop::Request(StopRequest::CancelNow), Waiting::Report) => StopAction::Ignore,
                    _ => stops::decide(stop, waiting),
                }
            }
            // The heartbeat used the claim's retry policy and waited a whole interval after
            // a failed call.
            Finding::F10ReapedByOutage => {
                rules.heartbeat_call = ClientConfig::new("").retry;
                rules.heartbeat_wait = |policy, _| policy.interval;
            }
            // Every agent signal was journaled.
            Finding::AgentJournalFlood => rules.agent_record_budget = u32::MAX,
            // A stop waited for the agent to exit.
            Finding::StopWaitsOnAgent => rules.kill_after_grace = false,
            Finding::UnjournaledStartVerdict => rules.journals_unjournaled_start = false,
            Finding::DeadlineBeforeReport => rules.deadline_bounds_report = false,
        }
        rules
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}
