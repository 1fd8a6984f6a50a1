//! The recovery table (brief, "Recovery at start-up"): what to do with a journaled run that
//! was not terminal when the runner stopped, given what the host observes now. Pure.

use serde::{Deserialize, Serialize};

use super::machine::{Effect, Event, RepoHead, RunState};

/// What the daemon saw of a run's container (by its deterministic name and labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "container", rename_all = "snake_case")]
pub enum ContainerObservation {
    Running,
    Exited { code: Option<i32> },
    Gone,
}

/// Facts the daemon gathers at start-up for one run before asking [`recover`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observations {
    /// The container named in the state's intent, if the state has one.
    pub container: ContainerObservation,
    /// The run's checkout (workspace root) exists on disk.
    pub checkout_present: bool,
    /// Where each repo's run branch points on the remote (`None`: branch absent/unknown).
    pub remote_heads: Vec<(String, Option<String>)>,
    /// The server answered 409 (the run is no longer running there).
    pub server_says_final: bool,
}

/// What to do with a run at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryDecision {
    /// Terminal: nothing to do.
    Nothing,
    /// Feed these events, in order, through the journal (each a journaled transition) and
    /// run the effects they hand out.
    Feed(Vec<Event>),
    /// Re-run these effects: their intent is already durable and they are idempotent.
    Redo(Vec<Effect>),
    /// The container is still running: feed `feed` first (if any), then re-attach to
    /// `name`'s stdin/stdout and carry on.
    Reattach { name: String, feed: Vec<Event> },
}

impl RecoveryDecision {
    /// The decision's name in the log and the metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RecoveryDecision::Nothing => "nothing",
            RecoveryDecision::Feed(events) => match events.first() {
                Some(Event::RunNoLongerRunning) => "abandon",
                Some(Event::PrepareStarted) => "prepare_again",
                Some(Event::ContainerStarting) => "start_container_again",
                Some(Event::ContainerExited { .. }) => "harvest_exit",
                Some(Event::ContainerVanished) => "container_gone",
                Some(Event::PushDone { .. }) => "push_already_landed",
                _ => "feed",
            },
            RecoveryDecision::Redo(effects) => match effects.first() {
                Some(Effect::Report(_)) => "report_again",
                Some(Effect::Push { .. }) => "push_again",
                _ => "redo",
            },
            RecoveryDecision::Reattach { .. } => "reattach",
        }
    }

    /// Whether the run's stopped containers' output is read again before the decision is
    /// acted on (chaos finding F5): lines the previous process read and queued died with it,
    /// the container's logs did not. Not for an abandon (the server refuses the run's events)
    /// nor a re-attach (the driver reads the output from the saved progress itself).
    pub fn replays_output(&self) -> bool {
        match self {
            RecoveryDecision::Feed(events) => {
                !matches!(events.first(), Some(Event::RunNoLongerRunning))
            }
            RecoveryDecision::Redo(_) => true,
            RecoveryDecision::Nothing | RecoveryDecision::Reattach { .. } => false,
        }
    }
}

/// The recovery decision for `state`, from what the host observes.
pub fn recover(state: &RunState, obs: &Observations) -> RecoveryDecision {
    if state.is_terminal() {
        return RecoveryDecision::Nothing;
    }
    if obs.server_says_final {
        return RecoveryDecision::Feed(vec![Event::RunNoLongerRunning]);
    }
    match state {
        RunState::Claimed { stop: Some(_), .. } => {
            // A stop was asked for while preparing: finish the stop instead of preparing again.
            RecoveryDecision::Feed(vec![Event::CheckoutFailed {
                error: "prepare interrupted by a runner restart".into(),
            }])
        }
        // Prepare not started, partial or finished unseen: wipe and prepare again.
        RunState::Claimed { .. } => RecoveryDecision::Feed(vec![Event::PrepareStarted]),
        RunState::Prepared {
            container, stop, ..
        } => match obs.container {
            ContainerObservation::Running => RecoveryDecision::Reattach {
                name: container.name.clone(),
                feed: vec![Event::ContainerStarted],
            },
            ContainerObservation::Exited { code } => {
                RecoveryDecision::Feed(vec![Event::ContainerExited { code }])
            }
            ContainerObservation::Gone if stop.is_some() => {
                RecoveryDecision::Feed(vec![Event::ContainerVanished])
            }
            // Nothing external happened yet (or it left no trace): start a fresh attempt.
            ContainerObservation::Gone => RecoveryDecision::Feed(vec![Event::ContainerStarting]),
        },
        RunState::Running {
            container,
            after: None,
            ..
        } => match obs.container {
            ContainerObservation::Running => RecoveryDecision::Reattach {
                name: container.name.clone(),
                feed: Vec::new(),
            },
            ContainerObservation::Exited { code } => {
                RecoveryDecision::Feed(vec![Event::ContainerExited { code }])
            }
            ContainerObservation::Gone => RecoveryDecision::Feed(vec![Event::ContainerVanished]),
        },
        RunState::Running {
            after: Some(after),
            stop,
            ..
        } => match (&after.push, stop) {
            (None, Some(_)) => RecoveryDecision::Feed(vec![Event::PushSkipped]),
            (None, None) if obs.checkout_present => {
                RecoveryDecision::Redo(vec![Effect::InspectHeads])
            }
            (None, None) => RecoveryDecision::Feed(vec![Event::PushFailed {
                error: "the checkout disappeared before the push (runner restart)".into(),
            }]),
            (Some(push), _) => {
                let at_sha = |h: &RepoHead| {
                    obs.remote_heads
                        .iter()
                        .any(|(slug, sha)| slug == &h.slug && sha.as_deref() == Some(&h.head))
                };
                if push.heads.iter().all(at_sha) {
                    RecoveryDecision::Feed(vec![Event::PushDone {
                        heads: push.heads.clone(),
                    }])
                } else if obs.checkout_present {
                    RecoveryDecision::Redo(vec![Effect::Push {
                        heads: push.heads.clone(),
                    }])
                } else {
                    RecoveryDecision::Feed(vec![Event::PushFailed {
                        error: "the checkout disappeared before the push finished (runner restart)"
                            .into(),
                    }])
                }
            }
        },
        // Report again: the server's compare-and-swap makes a repeat harmless.
        RunState::Pushed { report, .. } => {
            RecoveryDecision::Redo(vec![Effect::Report(report.verdict.to_report())])
        }
        RunState::Reported { .. } | RunState::Failed { .. } => RecoveryDecision::Nothing,
    }
}
