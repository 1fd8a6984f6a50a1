//! `windshift-triage`: git prepare/push helper (spec 4.10). Arrives with the effects issue.
fn main() {
    eprintln!("windshift-triage: not built yet");
    std::process::exit(1);
}
