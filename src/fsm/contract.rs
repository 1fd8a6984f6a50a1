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

/// Most bytes of an agent's `error` message or `finish` summary a signal keeps. The text is
/// the attacker's, is journaled with every signal record and ends up in the report; the server
/// caps both fields again (spec 2.6, RichText policy). 8 KiB keeps any real summary whole.
pub const MAX_SIGNAL_TEXT_BYTES: usize = 8 * 1024;
/// Most bytes of a `finish` outcome or an event type a signal keeps (the known values are a
/// few bytes; a longer one can never equal them, so cutting it changes no verdict).
pub const MAX_SIGNAL_LABEL_BYTES: usize = 128;
/// What replaces the cut-off end of an over-long signal text.
pub const TRUNCATED_MARK: &str = " …[truncated by the runner]";

/// `text` cut to at most `max` bytes at a UTF-8 boundary, with [`TRUNCATED_MARK`] appended
/// when anything was cut (so the result is at most `max + TRUNCATED_MARK.len()` bytes).
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED_MARK}", &text[..end])
}

/// Classifies one stdout line. `None` for blank lines, non-JSON lines and JSON without a
/// non-empty string `type` (such lines are still forwarded as `stdout` events, spec 5.4, but
/// do not count as contract events). Texts are cut to [`MAX_SIGNAL_TEXT_BYTES`] and labels to
/// [`MAX_SIGNAL_LABEL_BYTES`]: a signal's size does not depend on how long the line was.
pub fn classify_stdout_line(line: &str) -> Option<AgentSignal> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let obj = value.as_object()?;
    let event_type = obj.get("type")?.as_str()?;
    if event_type.is_empty() {
        return None;
    }
    let text = |key: &str, max: usize| {
        truncate_text(
            obj.get(key).and_then(|v| v.as_str()).unwrap_or_default(),
            max,
        )
    };
    Some(match event_type {
        "finish" => AgentSignal::Finish {
            outcome: text("outcome", MAX_SIGNAL_LABEL_BYTES),
            summary: text("summary", MAX_SIGNAL_TEXT_BYTES),
        },
        "error" => AgentSignal::Error {
            message: text("message", MAX_SIGNAL_TEXT_BYTES),
        },
        SESSION_IDLE => AgentSignal::SessionIdle,
        other => AgentSignal::Event {
            event_type: truncate_text(other, MAX_SIGNAL_LABEL_BYTES),
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
    fn long_texts_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_SIGNAL_TEXT_BYTES); // 2 bytes each: twice the limit
        let line = serde_json::json!({"type": "error", "message": long}).to_string();
        let Some(AgentSignal::Error { message }) = classify_stdout_line(&line) else {
            panic!("not an error signal");
        };
        assert!(message.ends_with(TRUNCATED_MARK));
        assert!(message.len() <= MAX_SIGNAL_TEXT_BYTES + TRUNCATED_MARK.len());
        assert!(long.starts_with(message.trim_end_matches(TRUNCATED_MARK)));
        // An odd limit falls inside a character and moves back to its start.
        assert_eq!(truncate_text("aé", 2), format!("a{TRUNCATED_MARK}"));
        assert_eq!(truncate_text("short", 5), "short");

        let line = serde_json::json!({
            "type": "finish",
            "outcome": "blocked".repeat(100),
            "summary": "s".repeat(MAX_SIGNAL_TEXT_BYTES + 1),
        })
        .to_string();
        let Some(AgentSignal::Finish { outcome, summary }) = classify_stdout_line(&line) else {
            panic!("not a finish signal");
        };
        assert!(outcome.len() <= MAX_SIGNAL_LABEL_BYTES + TRUNCATED_MARK.len());
        assert_ne!(outcome, "blocked");
        assert_eq!(summary.len(), MAX_SIGNAL_TEXT_BYTES + TRUNCATED_MARK.len());
        let line = serde_json::json!({"type": "x".repeat(10_000)}).to_string();
        let Some(AgentSignal::Event { event_type }) = classify_stdout_line(&line) else {
            panic!("not an event signal");
        };
        assert!(event_type.len() <= MAX_SIGNAL_LABEL_BYTES + TRUNCATED_MARK.len());
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
