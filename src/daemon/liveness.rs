//! Liveness: the heartbeat loop (spec 4.4), the systemd watchdog and the health verdict,
//! over one [`Liveness`] value and one [`HeartbeatPolicy`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::systemd::Notifier;
use super::{outcome_label, Ctx, Runs, StopRequest};
use crate::control::client::{ControlError, RetryPolicy};
use crate::journal::now_ms;
use crate::metrics::Health;

/// Every number of the heartbeat, in one place. From `WSRUNNER_HEARTBEAT_INTERVAL`:
///
/// - a beat every interval while the server answers;
/// - while beats fail, the next attempt comes after the retry gap (the interval, at most
///   [`HeartbeatPolicy::MAX_RETRY_GAP`]), and the client's own retries of one beat are no
///   further apart (so liveness returns within seconds of the server's return);
/// - failures are logged when they start, then at most every
///   [`HeartbeatPolicy::FAILURE_LOG_EVERY`] (or every interval, if longer);
/// - the runner is healthy (and pings the systemd watchdog) while the server was reached
///   within two intervals; the heartbeat loop counts as stuck
///   [`HeartbeatPolicy::STUCK_GRACE`] past that;
/// - the watchdog checks at least every interval, at most every
///   [`HeartbeatPolicy::MAX_CHECK_EVERY`], twice per systemd watchdog period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HeartbeatPolicy {
    pub interval: Duration,
}

impl HeartbeatPolicy {
    pub const MAX_RETRY_GAP: Duration = Duration::from_secs(10);
    pub const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);
    pub const STUCK_GRACE: Duration = Duration::from_secs(5);
    pub const MAX_CHECK_EVERY: Duration = Duration::from_secs(5);
    pub const MIN_CHECK_EVERY: Duration = Duration::from_millis(100);

    pub(crate) fn new(interval: Duration) -> Self {
        HeartbeatPolicy { interval }
    }

    /// The longest pause between heartbeat attempts while they fail.
    pub(crate) fn retry_gap(&self) -> Duration {
        self.interval.min(Self::MAX_RETRY_GAP)
    }

    /// The client's retries of one beat (`base`: its configured budget), no further apart
    /// than the retry gap.
    pub(crate) fn client_retry(&self, base: RetryPolicy) -> RetryPolicy {
        let gap = self.retry_gap();
        RetryPolicy {
            initial: base.initial.min(gap),
            max_interval: base.max_interval.min(gap),
            ..base
        }
    }

    /// The wait before the next beat after `failures` failed ones in a row.
    pub(crate) fn wait_before_next(&self, failures: u64) -> Duration {
        if failures > 0 {
            self.retry_gap()
        } else {
            self.interval
        }
    }

    /// How often a run of failures is logged.
    pub(crate) fn failure_log_every(&self) -> Duration {
        Self::FAILURE_LOG_EVERY.max(self.interval)
    }

    /// How long without a contact the runner still counts as reaching the server.
    pub(crate) fn contact_window(&self) -> Duration {
        self.interval * 2
    }

    /// How long without a turn the heartbeat loop counts as stuck.
    pub(crate) fn stuck_after(&self) -> Duration {
        self.contact_window() + Self::STUCK_GRACE
    }

    /// How often the watchdog checks (`systemd_timeout`: `WATCHDOG_USEC`, if set).
    pub(crate) fn check_every(&self, systemd_timeout: Option<Duration>) -> Duration {
        systemd_timeout
            .map(|t| t / 2)
            .unwrap_or(Self::MAX_CHECK_EVERY)
            .min(Self::MAX_CHECK_EVERY)
            .min(self.interval)
            .max(Self::MIN_CHECK_EVERY)
    }
}

/// What the runner knows of its own liveness, shared by the claim loop, the heartbeat loop
/// and the watchdog. Unix ms.
#[derive(Debug)]
pub(crate) struct Liveness {
    /// The last successful call to the server (claim or heartbeat).
    last_contact: AtomicI64,
    /// The heartbeat loop's last turn (the watchdog's sign that it is not stuck).
    heartbeat_turn: AtomicI64,
    /// Until when the runner deliberately stays silent (0: not yielding).
    yielding_until: AtomicI64,
}

impl Liveness {
    pub(crate) fn new(now_ms: i64) -> Self {
        Liveness {
            last_contact: AtomicI64::new(now_ms),
            heartbeat_turn: AtomicI64::new(now_ms),
            yielding_until: AtomicI64::new(0),
        }
    }

    /// A call to the server succeeded.
    pub(crate) fn contacted(&self, now_ms: i64) {
        self.last_contact.store(now_ms, Ordering::Relaxed);
    }

    fn heartbeat_turned(&self, now_ms: i64) {
        self.heartbeat_turn.store(now_ms, Ordering::Relaxed);
    }

    /// A deliberate silence (the lease yield) until `until_ms`; `None` ends it.
    pub(crate) fn yield_until(&self, until_ms: Option<i64>) {
        self.yielding_until
            .store(until_ms.unwrap_or(0), Ordering::Relaxed);
    }

    fn is_yielding(&self, now_ms: i64) -> bool {
        now_ms < self.yielding_until.load(Ordering::Relaxed)
    }

    /// The health verdict at `now_ms` (the credential is judged by the caller).
    fn health(&self, now_ms: i64, policy: &HeartbeatPolicy) -> Health {
        let contact_age = now_ms - self.last_contact.load(Ordering::Relaxed);
        let loop_age = now_ms - self.heartbeat_turn.load(Ordering::Relaxed);
        if loop_age > policy.stuck_after().as_millis() as i64 {
            Health::Unhealthy("the heartbeat loop is stuck".into())
        } else if self.is_yielding(now_ms) {
            Health::Healthy // silent on purpose (yield_lease), not cut off
        } else if contact_age > policy.contact_window().as_millis() as i64 {
            Health::Unhealthy(format!(
                "the Windshift server has not been reached for {} s",
                contact_age / 1000
            ))
        } else {
            Health::Healthy
        }
    }
}

pub(super) async fn heartbeat_loop(
    ctx: Arc<Ctx>,
    runs: Runs,
    liveness: Arc<Liveness>,
    mut stop: watch::Receiver<bool>,
) {
    let policy = ctx.heartbeat;
    // Failures are logged when they start, then at most once a minute (a 1 s interval with
    // the server down must not flood the log), and once more when the server answers again.
    let mut last_failure_log: Option<tokio::time::Instant> = None;
    let mut failures: u64 = 0;
    let mut last_depth: Option<i64> = None;
    loop {
        liveness.heartbeat_turned(now_ms());
        // After a failure the next beat comes sooner than a full interval, so the gap the
        // server sees after an outage stays short.
        tokio::select! {
            _ = ctx.clock.sleep(policy.wait_before_next(failures)) => {}
            _ = stop.changed() => return,
        }
        liveness.heartbeat_turned(now_ms());
        if liveness.is_yielding(now_ms()) {
            continue; // a deliberate silence (yield_lease)
        }
        // The stop signal also interrupts a heartbeat that is retrying an unreachable server.
        let beat = tokio::select! {
            r = ctx.control.heartbeat() => r,
            _ = stop.changed() => return,
        };
        match beat {
            Ok(hb) => {
                liveness.contacted(now_ms());
                ctx.metrics.request("heartbeat", "ok");
                ctx.metrics.set_heartbeat_failures(0);
                ctx.metrics.set_queue_depth(hb.queue_depth);
                if failures > 0 {
                    info!(
                        failed_heartbeats = failures,
                        "heartbeat: the server answers again"
                    );
                    failures = 0;
                    last_failure_log = None;
                }
                let in_flight = runs.lock().unwrap_or_else(|e| e.into_inner()).len();
                if last_depth != Some(hb.queue_depth) {
                    info!(
                        queue_depth = hb.queue_depth,
                        in_flight, "queue depth changed"
                    );
                    last_depth = Some(hb.queue_depth);
                } else {
                    tracing::debug!(queue_depth = hb.queue_depth, in_flight, "heartbeat");
                }
                for run_id in hb.abort {
                    if let Some(tx) = runs.lock().unwrap_or_else(|e| e.into_inner()).get(&run_id) {
                        info!(run_id, "the server asked to cancel the run");
                        let _ = tx.send(StopRequest::Cancel);
                    }
                }
            }
            Err(e) => {
                ctx.metrics.request("heartbeat", &outcome_label(&e));
                failures += 1;
                ctx.metrics.set_heartbeat_failures(failures);
                if last_failure_log.is_none_or(|t| t.elapsed() >= policy.failure_log_every()) {
                    last_failure_log = Some(tokio::time::Instant::now());
                    if let ControlError::CredentialRejected(_) = e {
                        error!(failed_heartbeats = failures, "heartbeat: {e}");
                    } else {
                        warn!(failed_heartbeats = failures, "heartbeat failed: {e}");
                    }
                }
            }
        }
    }
}

/// WATCHDOG=1 only while the heartbeat loop turns and the server was reached within the
/// contact window; the health verdict follows the same facts.
pub(super) async fn watchdog_loop(
    ctx: Arc<Ctx>,
    notifier: Notifier,
    liveness: Arc<Liveness>,
    mut stop: watch::Receiver<bool>,
) {
    let policy = ctx.heartbeat;
    let every = policy.check_every(notifier.watchdog_timeout());
    let mut seen_events = crate::control::events::EventCountsSnapshot::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        ctx.metrics
            .set_credential_rejected(ctx.control.auth_state().is_rejected());
        let health = if ctx.control.auth_state().is_rejected() {
            Health::Unhealthy(format!(
                "credential rejected: {}",
                ctx.control.auth_state().rejection().unwrap_or_default()
            ))
        } else {
            liveness.health(now_ms(), &policy)
        };
        if health == Health::Healthy && notifier.watchdog_timeout().is_some() {
            let _ = notifier.watchdog_ping();
        }
        ctx.metrics.set_health(health);
        // The event sender keeps its own totals; export what changed since the last turn.
        let now_events = ctx.events.counters();
        ctx.metrics.events(
            now_events.sent - seen_events.sent,
            now_events.merged - seen_events.merged,
            (now_events.dropped_after_409 + now_events.rejected + now_events.failed)
                - (seen_events.dropped_after_409 + seen_events.rejected + seen_events.failed),
        );
        seen_events = now_events;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_numbers_follow_the_interval() {
        let fast = HeartbeatPolicy::new(Duration::from_secs(1));
        assert_eq!(fast.retry_gap(), Duration::from_secs(1));
        assert_eq!(fast.wait_before_next(0), Duration::from_secs(1));
        assert_eq!(fast.failure_log_every(), Duration::from_secs(60));
        assert_eq!(fast.check_every(None), Duration::from_secs(1));
        let slow = HeartbeatPolicy::new(Duration::from_secs(30));
        assert_eq!(slow.retry_gap(), Duration::from_secs(10));
        assert_eq!(slow.wait_before_next(0), Duration::from_secs(30));
        assert_eq!(slow.wait_before_next(3), Duration::from_secs(10));
        assert_eq!(slow.contact_window(), Duration::from_secs(60));
        assert_eq!(slow.stuck_after(), Duration::from_secs(65));
        assert_eq!(slow.check_every(None), Duration::from_secs(5));
        assert_eq!(
            slow.check_every(Some(Duration::from_secs(4))),
            Duration::from_secs(2)
        );
        let retry = slow.client_retry(RetryPolicy::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
            Duration::from_secs(120),
        ));
        assert_eq!(retry.initial, Duration::from_millis(500));
        assert_eq!(retry.max_interval, Duration::from_secs(10));
        assert_eq!(retry.max_elapsed, Duration::from_secs(120));
    }

    #[test]
    fn health_follows_contact_the_loop_and_a_yield() {
        let policy = HeartbeatPolicy::new(Duration::from_secs(1));
        let live = Liveness::new(0);
        assert_eq!(live.health(1_000, &policy), Health::Healthy);
        assert!(
            matches!(live.health(3_000, &policy), Health::Unhealthy(m) if m.contains("not been reached"))
        );
        live.yield_until(Some(10_000));
        live.heartbeat_turned(3_000);
        assert_eq!(live.health(3_000, &policy), Health::Healthy);
        live.yield_until(None);
        // The loop last turned at 3 s: stuck past the 2 s window plus the 5 s grace.
        assert!(
            matches!(live.health(11_000, &policy), Health::Unhealthy(m) if m.contains("stuck"))
        );
        live.contacted(11_000);
        live.heartbeat_turned(11_000);
        assert_eq!(live.health(11_500, &policy), Health::Healthy);
    }
}
