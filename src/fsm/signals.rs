//! The journal budget of agent output: how many records one container attempt's output may
//! cause, and the coalescing of the signals past it. Pure: no IO.
//!
//! Every agent signal that changes the verdict-relevant facts ([`AgentFacts`]) is a journal
//! record holding the whole run state (the prompt included), and the agent decides how many it
//! prints. So the run task journals at most [`AGENT_RECORD_BUDGET`] such records per container
//! attempt; past that, [`AgentBudget`] folds the signals in memory into a [`SignalFold`], and
//! the fold is journaled (at most [`MAX_COALESCED_RECORDS`] records) right before the
//! container's exit is. The verdict does not change, because the facts are a fold that only
//! remembers, per kind, the latest value or whether it was seen:
//!
//! - `finish` and `error`: the last one wins (spec 6.5 rows 4–7 read the last of each);
//! - any contract event, `session_idle` and a degraded stream: seen or not (rows 2 and 3);
//! - and the kinds are independent of each other.
//!
//! Applying the fold's events after the journaled ones therefore gives the same facts as
//! applying every signal in order (`tests/fsm.rs` checks it for random streams).
//!
//! [`AgentFacts`]: super::AgentFacts

use super::contract::AgentSignal;
use super::machine::Event;

/// Journal records one container attempt's output may cause before its signals are coalesced
/// (an ordinary agent needs 3–5: its first contract event, `finish`, `session_idle`, an error
/// or two). With the coalesced ones at the exit a container costs at most
/// `AGENT_RECORD_BUDGET + MAX_COALESCED_RECORDS` records, whatever it prints. Each record
/// carries the state with its prompt and costs about twice its size on disk (sled rewrites
/// pages), so the number is kept small: past it nothing is lost, signals only wait for the exit.
pub const AGENT_RECORD_BUDGET: u32 = 8;

/// Most records a [`SignalFold`] turns into (one per fact kind).
pub const MAX_COALESCED_RECORDS: usize = 5;

/// The latest value of each verdict-relevant fact among signals not journaled one by one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignalFold {
    /// The first plain contract event (only its "seen" matters).
    event: Option<AgentSignal>,
    /// The last `finish`.
    finish: Option<AgentSignal>,
    /// The last `error`.
    error: Option<AgentSignal>,
    idle: bool,
    degraded: bool,
    /// How many agent events were folded in.
    folded: u64,
}

impl SignalFold {
    /// Folds in an agent event (`AgentSignal` or `StreamDegraded`); anything else is handed
    /// back untouched.
    pub fn push(&mut self, event: Event) -> Option<Event> {
        match event {
            Event::AgentSignal { signal } => match signal {
                AgentSignal::Event { .. } => {
                    self.event.get_or_insert(signal);
                }
                AgentSignal::Finish { .. } => self.finish = Some(signal),
                AgentSignal::Error { .. } => self.error = Some(signal),
                AgentSignal::SessionIdle => self.idle = true,
            },
            Event::StreamDegraded => self.degraded = true,
            other => return Some(other),
        }
        self.folded += 1;
        None
    }

    pub fn is_empty(&self) -> bool {
        self.folded == 0
    }

    /// How many agent events were folded in since the fold was last taken.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// The events that, applied after the journaled ones, give the facts of the whole stream
    /// (at most [`MAX_COALESCED_RECORDS`]).
    pub fn events(&self) -> Vec<Event> {
        let signals = [&self.event, &self.error, &self.finish]
            .into_iter()
            .flatten()
            .cloned()
            .chain(self.idle.then_some(AgentSignal::SessionIdle));
        let mut out: Vec<Event> = signals
            .map(|signal| Event::AgentSignal { signal })
            .collect();
        if self.degraded {
            out.push(Event::StreamDegraded);
        }
        out
    }
}

/// One container attempt's journal budget: how many records its output caused so far and
/// the fold of what came past the budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentBudget {
    container: String,
    journaled: u32,
    limit: u32,
    pending: SignalFold,
}

impl AgentBudget {
    /// The budget of `container`, whose output already caused `journaled` records (counted
    /// from the journal after a restart, so the budget spans every runner process).
    pub fn new(container: impl Into<String>, journaled: u32, limit: u32) -> AgentBudget {
        AgentBudget {
            container: container.into(),
            journaled,
            limit,
            pending: SignalFold::default(),
        }
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    /// Records the output caused so far (journaled one by one).
    pub fn journaled(&self) -> u32 {
        self.journaled
    }

    /// No more records one by one: further agent events are folded.
    pub fn spent(&self) -> bool {
        self.journaled >= self.limit
    }

    /// The event to journal now, or `None` when it was folded (the budget is spent). Call
    /// [`AgentBudget::recorded`] when journaling it wrote a record.
    pub fn admit(&mut self, event: Event) -> Option<Event> {
        if !self.spent() {
            return Some(event);
        }
        self.pending.push(event)
    }

    /// An admitted event changed the state: it cost one record.
    pub fn recorded(&mut self) {
        self.journaled = self.journaled.saturating_add(1);
    }

    /// What was folded so far.
    pub fn pending(&self) -> &SignalFold {
        &self.pending
    }

    /// The folded events to journal before the container's exit; the fold is emptied.
    pub fn take_pending(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.pending).events()
    }
}

/// Whether a record of `event` counts against its container's budget.
pub fn is_agent_event(event: &Event) -> bool {
    matches!(event, Event::AgentSignal { .. } | Event::StreamDegraded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(n: u32) -> Event {
        Event::AgentSignal {
            signal: AgentSignal::Error {
                message: format!("e{n}"),
            },
        }
    }

    #[test]
    fn a_budget_admits_up_to_its_limit_then_folds() {
        let mut budget = AgentBudget::new("c", 0, 2);
        for n in 0..2 {
            assert_eq!(budget.admit(error(n)), Some(error(n)));
            budget.recorded();
        }
        assert!(budget.spent());
        for n in 2..100 {
            assert_eq!(budget.admit(error(n)), None);
        }
        // A non-agent event is never folded.
        assert_eq!(
            budget.admit(Event::ContainerStarted),
            Some(Event::ContainerStarted)
        );
        assert_eq!(budget.pending().folded(), 98);
        assert_eq!(budget.take_pending(), vec![error(99)]);
        assert!(budget.pending().is_empty());
    }

    #[test]
    fn a_fold_keeps_one_event_per_fact() {
        let mut fold = SignalFold::default();
        for event in [
            Event::AgentSignal {
                signal: AgentSignal::Event {
                    event_type: "a".into(),
                },
            },
            Event::AgentSignal {
                signal: AgentSignal::Event {
                    event_type: "b".into(),
                },
            },
            error(1),
            Event::AgentSignal {
                signal: AgentSignal::SessionIdle,
            },
            Event::StreamDegraded,
            error(2),
        ] {
            assert_eq!(fold.push(event), None);
        }
        let events = fold.events();
        assert_eq!(events.len(), 4, "{events:?}");
        assert!(events.len() <= MAX_COALESCED_RECORDS);
        assert!(events.contains(&error(2)));
        assert!(!events.contains(&error(1)));
    }
}
