//! What a stop does to a run: the one table (`decide`) from the stop and what the run is
//! waiting on to what happens, and the stop source the run loop reads (`Stops`: requests
//! from the supervisor and the run's own time limit).
//!
//! The state machine decides what a journaled stop means in each state (spec 4.5, 4.6); this
//! table decides only whether a stop is journaled now, ignored, or leaves the run for the
//! next start.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use crate::fsm::Event;

/// A stop asked of a running run from outside its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopRequest {
    /// The server listed the run in the heartbeat `abort` list (spec 4.5).
    Cancel,
    /// Cancel at once: the drain deadline passed, or a second signal came (spec 4.6).
    CancelNow,
}

/// A stop the run loop reads: a request, or the run's own time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Request(StopRequest),
    /// `WSRUNNER_RUN_TIMEOUT` passed (from the claim time, across restarts).
    RunTimeout,
}

/// What the run is doing when a stop arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// Between two effects.
    NextEffect,
    /// A step whose outcome a stop changes: git work or the container.
    Step,
    /// Replaying stopped containers' output at start-up.
    Replay,
    /// Sending the verdict (the run's events first).
    Report,
}

/// What a stop does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StopAction {
    /// Journal the event; the state machine decides what it means in the run's state.
    Journal(Event),
    /// Nothing: a cancel cannot change a verdict already decided.
    Ignore,
    /// Stop here and leave the run for the next start (what it was doing is journaled).
    LeaveForNextStart,
}

/// The one place that decides what a stop does.
///
/// | stop \ waiting | next effect | step | replay | report |
/// |---|---|---|---|---|
/// | cancel | journal `cancel_requested` | journal `cancel_requested` | journal `cancel_requested` | ignore |
/// | cancel now (drain deadline, second signal) | journal `drain_deadline_passed` | journal `drain_deadline_passed` | leave for next start | leave for next start |
/// | run timeout | (not watched) | journal `run_timeout_passed` | (not watched) | (not watched) |
///
/// A cancel-now taken earlier (in a step, say) still bounds a later replay or report: it
/// leaves for the next start [`AFTER_DEADLINE_GRACE`] after the cancel-now came (`Stops`).
pub(crate) fn decide(stop: Stop, waiting: Waiting) -> StopAction {
    use StopAction::*;
    use Waiting::*;
    match (stop, waiting) {
        (Stop::Request(StopRequest::Cancel), Report) => Ignore,
        (Stop::Request(StopRequest::Cancel), _) => Journal(Event::CancelRequested { force: false }),
        (Stop::Request(StopRequest::CancelNow), NextEffect | Step) => {
            Journal(Event::DrainDeadlinePassed)
        }
        (Stop::Request(StopRequest::CancelNow), Replay | Report) => LeaveForNextStart,
        (Stop::RunTimeout, _) => Journal(Event::RunTimeoutPassed),
    }
}

/// How long a report or a replay may still take once the drain deadline (or a second signal)
/// has passed, when that stop came while the run was busy with something else: the run then
/// leaves for the next start, its report intent journaled. Long enough for one answer from a
/// server that is up, so a drain does not leave a verdict behind that the server would reap.
pub(crate) const AFTER_DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// Whether a cancel-now received earlier still bounds this wait ([`AFTER_DEADLINE_GRACE`]):
/// the waits it would leave at once if it came now.
pub(crate) fn bounded_after_deadline(waiting: Waiting) -> bool {
    matches!(waiting, Waiting::Replay | Waiting::Report)
}

/// Sleeps until `at`; never returns for `None` (a deadline not set).
pub(super) async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the run's time limit is watched while waiting on this.
fn watches_run_timeout(waiting: Waiting) -> bool {
    waiting == Waiting::Step
}

/// The stops of one run: the supervisor's requests and the run's time limit.
pub(super) struct Stops {
    requests: mpsc::UnboundedReceiver<StopRequest>,
    /// The supervisor went away: no more requests, only the time limit.
    closed: bool,
    deadline: tokio::time::Instant,
    deadline_fired: bool,
    /// When a cancel-now (drain deadline, second signal) arrived: it bounds later waits too.
    cancel_now_at: Option<tokio::time::Instant>,
}

impl Stops {
    pub(super) fn new(requests: mpsc::UnboundedReceiver<StopRequest>, remaining: Duration) -> Self {
        Stops {
            requests,
            closed: false,
            deadline: tokio::time::Instant::now() + remaining,
            deadline_fired: false,
            cancel_now_at: None,
        }
    }

    fn received(&mut self, request: StopRequest) -> Stop {
        if request == StopRequest::CancelNow {
            self.cancel_now_at
                .get_or_insert_with(tokio::time::Instant::now);
        }
        Stop::Request(request)
    }

    /// A request already waiting, decided for `waiting` (between effects: no wait).
    pub(super) fn try_next(&mut self, waiting: Waiting) -> Option<StopAction> {
        match self.requests.try_recv() {
            Ok(request) => {
                let stop = self.received(request);
                Some(decide(stop, waiting))
            }
            Err(_) => None,
        }
    }

    /// Waits for the next stop that counts while waiting on `waiting`, and decides it. Never
    /// returns when none can come (the caller selects it against its work).
    pub(super) async fn next(&mut self, waiting: Waiting) -> StopAction {
        let deadline = self.deadline;
        let timeout_armed = watches_run_timeout(waiting) && !self.deadline_fired;
        // A cancel-now that came while the run did something else bounds this wait too.
        let leave_at = self
            .cancel_now_at
            .filter(|_| bounded_after_deadline(waiting))
            .map(|at| at + AFTER_DEADLINE_GRACE);
        if self.closed && !timeout_armed {
            // No request can come: wait for the caller's work, or the bound.
            sleep_until_or_never(leave_at).await;
            return StopAction::LeaveForNextStart;
        }
        let stop = tokio::select! {
            () = sleep_until_or_never(leave_at) => return StopAction::LeaveForNextStart,
            request = self.requests.recv(), if !self.closed => match request {
                Some(request) => self.received(request),
                None => {
                    self.closed = true;
                    if !timeout_armed {
                        sleep_until_or_never(leave_at).await;
                        return StopAction::LeaveForNextStart;
                    }
                    tokio::time::sleep_until(deadline).await;
                    Stop::RunTimeout
                }
            },
            _ = tokio::time::sleep_until(deadline), if timeout_armed => Stop::RunTimeout,
        };
        if stop == Stop::RunTimeout {
            self.deadline_fired = true;
            warn!("the run exceeded WSRUNNER_RUN_TIMEOUT; stopping it");
        }
        decide(stop, waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_is_journaled_except_once_the_verdict_is_decided() {
        let cancel = Stop::Request(StopRequest::Cancel);
        for waiting in [Waiting::NextEffect, Waiting::Step, Waiting::Replay] {
            assert_eq!(
                decide(cancel, waiting),
                StopAction::Journal(Event::CancelRequested { force: false })
            );
        }
        assert_eq!(decide(cancel, Waiting::Report), StopAction::Ignore);
    }

    #[test]
    fn cancel_now_is_journaled_in_work_and_leaves_replay_and_report_for_the_next_start() {
        let now = Stop::Request(StopRequest::CancelNow);
        assert_eq!(
            decide(now, Waiting::Step),
            StopAction::Journal(Event::DrainDeadlinePassed)
        );
        assert_eq!(
            decide(now, Waiting::NextEffect),
            StopAction::Journal(Event::DrainDeadlinePassed)
        );
        assert_eq!(decide(now, Waiting::Replay), StopAction::LeaveForNextStart);
        assert_eq!(decide(now, Waiting::Report), StopAction::LeaveForNextStart);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_now_taken_in_a_step_still_bounds_the_report_that_follows() {
        use futures_util::FutureExt;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stops = Stops::new(rx, Duration::from_secs(3600));
        tx.send(StopRequest::CancelNow).unwrap();
        assert_eq!(
            stops.next(Waiting::Step).await,
            StopAction::Journal(Event::DrainDeadlinePassed)
        );
        // No new request comes: the report still leaves once the grace has passed.
        assert_eq!(stops.next(Waiting::Report).now_or_never(), None);
        let started = tokio::time::Instant::now();
        assert_eq!(
            stops.next(Waiting::Report).await,
            StopAction::LeaveForNextStart
        );
        assert!(started.elapsed() <= AFTER_DEADLINE_GRACE);
        // A plain cancel never bounds a report.
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stops = Stops::new(rx, Duration::from_secs(3600));
        tx.send(StopRequest::Cancel).unwrap();
        let _ = stops.next(Waiting::Step).await;
        let waited =
            tokio::time::timeout(Duration::from_secs(600), stops.next(Waiting::Report)).await;
        assert!(waited.is_err(), "a cancel does not end a report");
    }

    #[tokio::test]
    async fn the_run_timeout_counts_only_in_a_step_and_fires_once() {
        use futures_util::FutureExt;
        let (_tx, rx) = mpsc::unbounded_channel();
        // Already past: a step sees it at once, other waits never do.
        let mut stops = Stops::new(rx, Duration::ZERO);
        assert_eq!(stops.next(Waiting::Report).now_or_never(), None);
        assert_eq!(stops.next(Waiting::Replay).now_or_never(), None);
        assert_eq!(
            stops.next(Waiting::Step).await,
            StopAction::Journal(Event::RunTimeoutPassed)
        );
        assert_eq!(stops.next(Waiting::Step).now_or_never(), None);
    }

    #[tokio::test]
    async fn requests_are_read_in_order_and_a_closed_channel_leaves_the_timeout() {
        use futures_util::FutureExt;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stops = Stops::new(rx, Duration::ZERO);
        tx.send(StopRequest::Cancel).unwrap();
        tx.send(StopRequest::CancelNow).unwrap();
        drop(tx);
        assert_eq!(
            stops.try_next(Waiting::NextEffect),
            Some(StopAction::Journal(Event::CancelRequested { force: false }))
        );
        assert_eq!(
            stops.next(Waiting::Report).now_or_never(),
            Some(StopAction::LeaveForNextStart)
        );
        assert_eq!(stops.next(Waiting::Replay).now_or_never(), None);
        assert_eq!(
            stops.next(Waiting::Step).await,
            StopAction::Journal(Event::RunTimeoutPassed)
        );
    }
}
