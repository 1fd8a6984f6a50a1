//! The work in flight inside each milestone state, and the accessors the daemon, the journal
//! tools and the control socket read a run through, so that nothing outside `fsm` matches on
//! the states' fields. Pure; computed from the state, never journaled.
//!
//! The milestones are the customer's (Claimed → Prepared → Running → Pushed → Reported /
//! Failed); a [`Phase`] names what the runner is doing while in one. docs/journal.md ("States,
//! phases and the effect in flight") has the table, with what recovery does in each.

use strum::{Display, EnumIter};

use super::machine::{
    Checkout, ContainerStarting, Effect, RepoHead, RunState, StateKind, StopReason,
};
use super::verdict::Verdict;

/// What a run is doing inside its milestone state: the one effect whose outcome it awaits.
///
/// A stop is orthogonal ([`RunState::stop_pending`]): the phase's effect stays in flight (a
/// container is killed, a git call cut short) and its outcome reports the stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, Display)]
#[strum(serialize_all = "snake_case")]
pub enum Phase {
    /// `Claimed`: the checkout is being prepared (`Effect::Prepare`).
    PreparingCheckout,
    /// `Prepared`: the container is being created and started (`Effect::StartContainer`).
    StartingContainer,
    /// `Running`: the agent runs; its signals are journaled until the container exits.
    AgentRunning,
    /// `Running`: the container exited with a succeeded verdict and repos to push; the heads
    /// are being read (`Effect::InspectHeads`). The exit itself is no resting phase: the
    /// record that takes it hands out the inspection, or goes straight to reporting.
    InspectingHeads,
    /// `Running`: the changed heads are being pushed (`Effect::Push`).
    Pushing,
    /// `Pushed`: the verdict is decided and being reported (`Effect::Report`).
    Reporting,
    /// `Reported` or `Failed`: nothing is in flight.
    Ended,
}

impl Phase {
    /// The milestone state this phase belongs to (`Ended` belongs to both terminal states;
    /// it answers `Reported`).
    pub fn milestone(self) -> StateKind {
        match self {
            Phase::PreparingCheckout => StateKind::Claimed,
            Phase::StartingContainer => StateKind::Prepared,
            Phase::AgentRunning | Phase::InspectingHeads | Phase::Pushing => StateKind::Running,
            Phase::Reporting => StateKind::Pushed,
            Phase::Ended => StateKind::Reported,
        }
    }
}

impl RunState {
    /// What the run is doing now (see [`Phase`]).
    pub fn phase(&self) -> Phase {
        match self {
            RunState::Claimed { .. } => Phase::PreparingCheckout,
            RunState::Prepared { .. } => Phase::StartingContainer,
            RunState::Running { after: None, .. } => Phase::AgentRunning,
            RunState::Running {
                after: Some(after), ..
            } => match after.push {
                None => Phase::InspectingHeads,
                Some(_) => Phase::Pushing,
            },
            RunState::Pushed { .. } => Phase::Reporting,
            RunState::Reported { .. } | RunState::Failed { .. } => Phase::Ended,
        }
    }

    /// The stop (cancel, drain deadline, run timeout) recorded and not yet reported, if any.
    /// Once the verdict is decided there is nothing left to stop: `None` from `Pushed` on.
    pub fn stop_pending(&self) -> Option<StopReason> {
        match self {
            RunState::Claimed { stop, .. }
            | RunState::Prepared { stop, .. }
            | RunState::Running { stop, .. } => *stop,
            RunState::Pushed { .. } | RunState::Reported { .. } | RunState::Failed { .. } => None,
        }
    }

    /// The container the state names: `Prepared` and every `Running` phase, also after the
    /// container's exit (the name stays in the state until the report).
    pub fn container(&self) -> Option<&ContainerStarting> {
        match self {
            RunState::Prepared { container, .. } | RunState::Running { container, .. } => {
                Some(container)
            }
            _ => None,
        }
    }

    /// The container whose exit is still to be judged: the agent's, while it runs. Its
    /// signals count toward the verdict; a re-attach must find this name.
    pub fn current_container(&self) -> Option<&str> {
        match self {
            RunState::Running {
                container,
                after: None,
                ..
            } => Some(&container.name),
            _ => None,
        }
    }

    /// The prepared checkout (`Prepared` and `Running`); empty (no root, no repos) for a run
    /// without repos.
    pub fn checkout(&self) -> Option<&Checkout> {
        match self {
            RunState::Prepared { checkout, .. } | RunState::Running { checkout, .. } => {
                Some(checkout)
            }
            _ => None,
        }
    }

    /// The heads being pushed, once the push intent is recorded ([`Phase::Pushing`]).
    pub fn pushing_heads(&self) -> Option<&[RepoHead]> {
        match self {
            RunState::Running {
                after: Some(after), ..
            } => after.push.as_ref().map(|push| push.heads.as_slice()),
            _ => None,
        }
    }

    /// The verdict the server accepted (`Reported` only; a `Failed` run may carry a verdict
    /// the server never took).
    pub fn accepted_verdict(&self) -> Option<&Verdict> {
        match self {
            RunState::Reported { verdict, .. } => Some(verdict),
            _ => None,
        }
    }

    /// The effect whose intent this state records and whose outcome it awaits: what was
    /// handed out on entering the phase (a running agent's is its container's start, which
    /// lasts until the exit). `None` once the run has ended.
    pub fn effect_in_flight(&self) -> Option<Effect> {
        match self {
            RunState::Claimed { prepare, .. } => Some(Effect::Prepare {
                attempt: prepare.attempt,
            }),
            RunState::Prepared { container, .. }
            | RunState::Running {
                container,
                after: None,
                ..
            } => Some(Effect::StartContainer {
                name: container.name.clone(),
                attempt: container.attempt,
            }),
            RunState::Running {
                after: Some(after), ..
            } => Some(match &after.push {
                None => Effect::InspectHeads,
                Some(push) => Effect::Push {
                    heads: push.heads.clone(),
                },
            }),
            RunState::Pushed { report, .. } => Some(Effect::Report(report.verdict.to_report())),
            RunState::Reported { .. } | RunState::Failed { .. } => None,
        }
    }
}
