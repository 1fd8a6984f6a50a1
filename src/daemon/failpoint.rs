//! Test failpoints: with `WSRUNNER_TEST_CRASH_AFTER=<point>` the runner kills itself with
//! SIGKILL at that point, so the crash tests can stop it at an exact durable state.
//!
//! Compiled in with the `test-failpoints` cargo feature (on by default, so `cargo build`,
//! the test suite and the README test command have it); a build with
//! `--no-default-features` has no failpoints and ignores the variable.

#[cfg(feature = "test-failpoints")]
use crate::fsm::Event;
use crate::journal::Record;
#[cfg(feature = "test-failpoints")]
use tracing::error;

#[cfg(not(feature = "test-failpoints"))]
pub(crate) fn crash_failpoint(_record: &Record) {}

#[cfg(not(feature = "test-failpoints"))]
pub(crate) fn crash_failpoint_at(_point: &str) {}

#[cfg(feature = "test-failpoints")]
pub(crate) use enabled::{crash_failpoint, crash_failpoint_at};

#[cfg(feature = "test-failpoints")]
mod enabled {
    use super::*;
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
    pub(super) fn failpoint_matches(point: &str, event: &Event) -> bool {
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
}

#[cfg(all(test, feature = "test-failpoints"))]
mod tests {
    use super::enabled::failpoint_matches;
    use crate::fsm::contract::AgentSignal;
    use crate::fsm::Event;

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
