//! Container names, built in one place: the journal records the name the state machine
//! gives an attempt, and the engine creates the container under the same name (it checks
//! they agree), so both must come from one builder with one sanitizer.

/// Keeps a name part to the characters container names allow (`[a-zA-Z0-9_.-]`, anything
/// else becomes `-`), without a leading `-`, `.` or `_`; an empty result is `default`.
pub fn sanitize_name_part(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches(['-', '.', '_']);
    if trimmed.is_empty() {
        "default".into()
    } else {
        trimmed.to_owned()
    }
}

/// The deterministic container name of one run attempt: `wsr-<instance>-run-<id>-<attempt>`.
pub fn container_name(instance: &str, run_id: i64, attempt: u32) -> String {
    format!(
        "wsr-{}-run-{run_id}-{attempt}",
        sanitize_name_part(instance)
    )
}
