//! Secret redaction for everything that leaves the process as text: log lines, error
//! messages, journal exports, git output folded into errors.
//!
//! Two mechanisms, because Windshift secrets come in two shapes:
//! - *Shaped* secrets (`wsrt_`/`wsrc_` followed by hex) are recognised by pattern, so they are
//!   redacted even when the runner never saw them as a secret (an operator pasting one into a
//!   URL, a server echoing one back).
//! - *Opaque* secrets (run tokens, LLM keys) have no fixed shape; they are registered with
//!   [`register_secret`] the moment the runner learns them and replaced wherever they appear.

use std::borrow::Cow;
use std::sync::{OnceLock, RwLock};

/// What a redacted secret is replaced with.
pub const MASK: &str = "[REDACTED]";

/// Prefixes of Windshift's shaped secrets: registration tokens and runner credentials.
const SHAPED_PREFIXES: [&str; 2] = ["wsrt_", "wsrc_"];

/// Opaque secrets shorter than this are not registered: masking very short strings would
/// shred ordinary text, and a real run token is far longer.
const MIN_OPAQUE_SECRET_LEN: usize = 8;

fn registry() -> &'static RwLock<Vec<String>> {
    static SECRETS: OnceLock<RwLock<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(|| RwLock::new(Vec::new()))
}

/// Registers an opaque secret (a run token, an LLM key) so every later [`redact`] masks it.
/// Idempotent; empty and very short values are ignored.
pub fn register_secret(secret: &str) {
    let secret = secret.trim();
    if secret.len() < MIN_OPAQUE_SECRET_LEN {
        return;
    }
    let mut secrets = registry().write().unwrap_or_else(|e| e.into_inner());
    if !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_owned());
    }
}

/// Forgets an opaque secret once nothing that could print it remains (the run is over).
pub fn forget_secret(secret: &str) {
    let secret = secret.trim();
    let mut secrets = registry().write().unwrap_or_else(|e| e.into_inner());
    secrets.retain(|s| s != secret);
}

/// Returns `text` with every shaped and registered secret replaced by [`MASK`].
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out: Cow<'_, str> = Cow::Borrowed(text);
    {
        let secrets = registry().read().unwrap_or_else(|e| e.into_inner());
        for secret in secrets.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), MASK));
            }
        }
    }
    if SHAPED_PREFIXES.iter().any(|p| out.contains(p)) {
        out = Cow::Owned(redact_shaped(&out));
    }
    out
}

/// Masks `wsrt_…`/`wsrc_…` followed by at least one alphanumeric character. Upstream secrets
/// are 64 lowercase hex characters, but a truncated or mistyped one is still a secret.
fn redact_shaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let next = SHAPED_PREFIXES
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, *p)))
            .min_by_key(|(i, _)| *i);
        let Some((idx, prefix)) = next else {
            out.push_str(rest);
            return out;
        };
        let after = &rest[idx + prefix.len()..];
        let body_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        out.push_str(&rest[..idx]);
        if body_len == 0 {
            out.push_str(prefix);
        } else {
            out.push_str(prefix);
            out.push_str(MASK);
        }
        rest = &after[body_len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shaped_secrets_are_masked_but_prefix_kept_for_diagnosis() {
        let tok = format!("wsrt_{}", "ab".repeat(32));
        let cred = format!("wsrc_{}", "0f".repeat(32));
        let line = format!("token={tok} and credential {cred}.");
        let red = redact(&line);
        assert_eq!(red, "token=wsrt_[REDACTED] and credential wsrc_[REDACTED].");
    }

    #[test]
    fn bare_prefix_without_body_is_left_alone() {
        assert_eq!(redact("the wsrc_ prefix"), "the wsrc_ prefix");
    }

    #[test]
    fn registered_opaque_secret_is_masked_until_forgotten() {
        let secret = "run-token-4f1c9a2e7d";
        assert_eq!(redact(&format!("x {secret} y")), format!("x {secret} y"));
        register_secret(secret);
        assert_eq!(redact(&format!("x {secret} y")), "x [REDACTED] y");
        forget_secret(secret);
        assert_eq!(redact(&format!("x {secret} y")), format!("x {secret} y"));
    }

    #[test]
    fn short_values_are_not_registered() {
        register_secret("abc");
        assert_eq!(redact("abc abc"), "abc abc");
    }

    #[test]
    fn text_without_secrets_is_borrowed() {
        assert!(matches!(redact("plain text"), Cow::Borrowed(_)));
    }
}
