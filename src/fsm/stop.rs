//! What a stop (a cancel, the drain deadline, the run timeout) does, phase by phase: the one
//! place that decides it. [`transition`](super::transition) asks `decide` before the
//! per-state rules, which then only ever see runs that are not stopping. Pure.

use super::machine::{to_report, Effect, Event, Rejected, RunState, StopReason, Transition};
use super::phase::Phase;
use super::verdict::Verdict;

/// What a stop does when it arrives in a phase (docs/journal.md, "States, phases and the
/// effect in flight").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// Record it. The phase's effect is cut short by the daemon (the prepare's or the push's
    /// git call is killed) and its outcome, when it arrives, reports the stop.
    Record,
    /// Record it and kill the container that may be running; its exit reports the stop.
    RecordAndKill,
    /// The verdict is decided (or the run ended): there is nothing left to stop.
    NotApplicable,
}

/// The stop rule of each phase.
pub fn on_stop(phase: Phase) -> OnStop {
    match phase {
        Phase::PreparingCheckout | Phase::InspectingHeads | Phase::Pushing => OnStop::Record,
        Phase::StartingContainer | Phase::AgentRunning => OnStop::RecordAndKill,
        Phase::Reporting | Phase::Ended => OnStop::NotApplicable,
    }
}

/// The stop `event` asks for, if it is one.
pub fn reason(event: &Event) -> Option<StopReason> {
    match event {
        Event::CancelRequested { force } => Some(StopReason::Canceled { force: *force }),
        Event::DrainDeadlinePassed => Some(StopReason::Drain),
        Event::RunTimeoutPassed => Some(StopReason::Timeout),
        _ => None,
    }
}

/// The stop rules applied to `(state, event)` of a run that is not terminal: `Some` when they
/// decide the pair, `None` to leave it to the per-state rules.
///
/// - A stop in a phase that can still be stopped is recorded (and kills a container that may
///   run); a second stop is refused as `AlreadyStopping` (the heartbeat repeats abort ids
///   until the run is final); after the verdict a stop is not applicable.
/// - While a stop is recorded, a fresh attempt of the phase's effect (recovery's
///   `PrepareStarted` / `ContainerStarting`) is refused as `AlreadyStopping`, and the outcome
///   that ends the phase's work, whatever it is, reports the stop's verdict instead.
pub(super) fn decide(state: &RunState, event: &Event) -> Option<Transition> {
    let phase = state.phase();
    if let Some(reason) = reason(event) {
        return Some(record(state, event, phase, reason));
    }
    let stop = state.stop_pending()?;
    if is_fresh_attempt(phase, event) {
        return Some(Err(Rejected::AlreadyStopping {
            state: state.kind(),
            event: event.kind(),
        }));
    }
    if ends_the_phase(phase, event) {
        return Some(Ok(to_report(
            state.plan().clone(),
            Verdict::stopped(stop),
            true,
        )));
    }
    None
}

/// A container that reports its start after a stop was recorded is killed at once.
pub(super) fn on_container_started(stop: Option<StopReason>, container: &str) -> Vec<Effect> {
    stop.map(|_| Effect::KillContainer {
        name: container.to_owned(),
    })
    .into_iter()
    .collect()
}

fn record(state: &RunState, event: &Event, phase: Phase, reason: StopReason) -> Transition {
    let kill = match on_stop(phase) {
        OnStop::NotApplicable => {
            return Err(Rejected::NotApplicable {
                state: state.kind(),
                event: event.kind(),
            })
        }
        OnStop::Record => None,
        OnStop::RecordAndKill => state.container().map(|c| c.name.clone()),
    };
    if state.stop_pending().is_some() {
        return Err(Rejected::AlreadyStopping {
            state: state.kind(),
            event: event.kind(),
        });
    }
    let mut next = state.clone();
    match &mut next {
        RunState::Claimed { stop, .. }
        | RunState::Prepared { stop, .. }
        | RunState::Running { stop, .. } => *stop = Some(reason),
        // `on_stop` refused these above.
        RunState::Pushed { .. } | RunState::Reported { .. } | RunState::Failed { .. } => {
            return Err(Rejected::NotApplicable {
                state: state.kind(),
                event: event.kind(),
            })
        }
    }
    let effects = kill
        .map(|name| Effect::KillContainer { name })
        .into_iter()
        .collect();
    Ok((next, effects))
}

/// A fresh attempt of the phase's own effect.
fn is_fresh_attempt(phase: Phase, event: &Event) -> bool {
    matches!(
        (phase, event),
        (Phase::PreparingCheckout, Event::PrepareStarted)
            | (Phase::StartingContainer, Event::ContainerStarting)
    )
}

/// The outcomes that end a phase's work (the answers to its effect in flight). Under a stop
/// each reports the stop: a push that went through before a cancel landed still reports
/// `canceled`, without a branch, so the server opens no pull request (documented choice).
fn ends_the_phase(phase: Phase, event: &Event) -> bool {
    matches!(
        (phase, event),
        (
            Phase::PreparingCheckout,
            Event::CheckoutReady { .. } | Event::CheckoutFailed { .. }
        ) | (
            Phase::StartingContainer,
            Event::ContainerStartFailed { .. }
                | Event::ContainerExited { .. }
                | Event::ContainerVanished
        ) | (
            Phase::AgentRunning,
            Event::ContainerExited { .. } | Event::ContainerVanished
        ) | (
            Phase::InspectingHeads,
            Event::HeadsInspected { .. } | Event::PushSkipped | Event::PushFailed { .. }
        ) | (
            Phase::Pushing,
            Event::PushDone { .. } | Event::PushSkipped | Event::PushFailed { .. }
        )
    )
}
