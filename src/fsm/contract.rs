//! The agent JSONL contract v1 (spec 6.2), reduced to what decides a verdict (spec 6.5).
//!
//! The JSONL driver (src/effects) reads stdout lines and asks [`classify_stdout_line`] what each
//! one means; the state machine folds the resulting [`AgentSignal`]s into the verdict. Pure: no IO.

use serde::{Deserialize, Serialize};

/// A verdict-relevant fact from one agent stdout line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub enum AgentSignal {
    /// A JSON line with a non-empty `type` that is none of the kinds below (counts as a
    /// contract event for verdict row 2; the entrypoint's `lifecycle` line is one).
    Event { event_type: String },
    /// `finish`: the agent called its finish tool.
    Finish { outcome: String, summary: String },
    /// `error`: an unrecovered agent error.
    Error { message: String },
    /// `session_idle`: the run ended naturally; the driver starts the shutdown handshake.
    SessionIdle,
}

/// The event the agent prints once a run began (spec 6.2), after its configuration checks.
pub const STARTING: &str = "starting";

/// The idle event type that ends a run (spec 6.2; configurable upstream, this is the default).
pub const SESSION_IDLE: &str = "session_idle";

/// Classifies one stdout line. `None` for blank lines, non-JSON lines and JSON without a
/// non-empty string `type` (such lines are still forwarded as `stdout` events, spec 5.4, but
/// do not count as contract events).
pub fn classify_stdout_line(line: &str) -> Option<AgentSignal> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let obj = value.as_object()?;
    let event_type = obj.get("type")?.as_str()?;
    if event_type.is_empty() {
        return None;
    }
    let text = |key: &str| {
        obj.get(key)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    Some(match event_type {
        "finish" => AgentSignal::Finish {
            outcome: text("outcome"),
            summary: text("summary"),
        },
        "error" => AgentSignal::Error {
            message: text("message"),
        },
        SESSION_IDLE => AgentSignal::SessionIdle,
        other => AgentSignal::Event {
            event_type: other.to_owned(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_contract_lines() {
        assert_eq!(
            classify_stdout_line(r#"{"type":"finish","outcome":"blocked","summary":"no access"}"#),
            Some(AgentSignal::Finish {
                outcome: "blocked".into(),
                summary: "no access".into()
            })
        );
        assert_eq!(
            classify_stdout_line(r#"{"type":"error","message":"broker down"}"#),
            Some(AgentSignal::Error {
                message: "broker down".into()
            })
        );
        assert_eq!(
            classify_stdout_line(r#"{"type":"session_idle"}"#),
            Some(AgentSignal::SessionIdle)
        );
        assert_eq!(
            classify_stdout_line(r#"{"type":"lifecycle","phase":"entrypoint"}"#),
            Some(AgentSignal::Event {
                event_type: "lifecycle".into()
            })
        );
    }

    #[test]
    fn non_contract_lines_are_none() {
        for line in [
            "",
            "hello",
            "[1,2]",
            r#"{"type":""}"#,
            r#"{"type":3}"#,
            r#"{"text":"x"}"#,
        ] {
            assert_eq!(classify_stdout_line(line), None, "{line}");
        }
    }
}
