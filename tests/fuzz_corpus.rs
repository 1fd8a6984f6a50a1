//! Replays the committed fuzz corpora (fuzz/corpus/<target>) through the fuzz targets' bodies
//! (`windshift_runner::fuzzing`) on stable, so every input a fuzzer ever kept, and every
//! crash it found, stays a regression test without cargo-fuzz or nightly.
//!
//! The bodies assert their own invariants (they panic on a broken one); the named seeds
//! below also pin the outcome, so a body that silently stopped checking would be noticed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use windshift_runner::fsm::Status;
use windshift_runner::fuzzing::{
    agent_verdict, go_duration, journal_decode, triage_args, wire_json, FuzzOutcome, TriageOutcome,
    VerdictOutcome, WireOutcome,
};

/// Every file of a target's corpus, as (file name, bytes), sorted by name.
fn corpus(target: &str, min_files: usize) -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("read {name}: {e}"));
            (name, data)
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= min_files,
        "corpus missing: found {} files in {}",
        files.len(),
        dir.display()
    );
    files
}

#[test]
fn journal_decode_corpus_replays_without_panics_and_with_the_expected_outcomes() {
    for (name, data) in corpus("journal_decode", 8) {
        let outcome = journal_decode(&data);
        match name.as_str() {
            "seed-full-run" => assert!(
                matches!(outcome, FuzzOutcome::Decoded { records, findings: 0 } if records > 5),
                "{name}: {outcome:?}"
            ),
            "seed-first-record" => assert_eq!(
                outcome,
                FuzzOutcome::Decoded {
                    records: 1,
                    findings: 0
                },
                "{name}"
            ),
            "seed-out-of-order" => assert!(
                matches!(outcome, FuzzOutcome::Decoded { records: 2, findings } if findings >= 1),
                "{name}: {outcome:?}"
            ),
            "seed-diverging" => assert_eq!(
                outcome,
                FuzzOutcome::Decoded {
                    records: 2,
                    findings: 1
                },
                "{name}"
            ),
            "seed-future-schema" | "seed-truncated" | "seed-garbage" | "seed-empty" => {
                assert_eq!(outcome, FuzzOutcome::Quarantined, "{name}")
            }
            // Inputs the fuzzer kept: not panicking is the property.
            _ => {}
        }
    }
}

#[test]
fn wire_json_corpus_replays_and_decodes_each_seed_as_its_type() {
    for (name, data) in corpus("wire_json", 8) {
        let outcome = wire_json(&data);
        // Every object decodes as a claim response (a missing `job` is no work, as in Go)
        // and as a version response (all its fields are optional).
        let object = data.first() == Some(&b'{');
        let expect = |job, heartbeat, error_body| WireOutcome {
            job,
            claim: object,
            heartbeat,
            version: object,
            error_body,
        };
        match name.as_str() {
            "seed-job" | "seed-ci-no-image" => {
                assert_eq!(outcome, expect(true, true, true), "{name}")
            }
            "seed-claim-job" | "seed-claim-empty" | "seed-heartbeat" | "seed-error-secret"
            | "seed-version" => assert_eq!(outcome, expect(false, true, true), "{name}"),
            "seed-html" => assert_eq!(outcome, WireOutcome::default(), "{name}"),
            _ => {}
        }
    }
}

#[test]
fn agent_verdict_corpus_replays_and_seeds_reach_the_spec_verdicts() {
    for (name, data) in corpus("agent_verdict", 7) {
        let outcome = agent_verdict(&data);
        let reported = |status| VerdictOutcome {
            terminal: "reported".into(),
            status: Some(status),
            rejected: 0,
        };
        match name.as_str() {
            "seed-finish" => assert_eq!(outcome, reported(Status::Succeeded), "{name}"),
            "seed-blocked-one-repo" | "seed-error-exit1-two-repos" | "seed-no-contract" => {
                assert_eq!(outcome, reported(Status::Failed), "{name}")
            }
            "seed-cancel-then-exit" => {
                assert_eq!(outcome.terminal, "reported", "{name}: {outcome:?}");
                assert_eq!(outcome.status, Some(Status::Canceled), "{name}");
                assert!(outcome.rejected >= 1, "{name}: second report accepted");
            }
            "seed-ci-degraded" => {
                assert_eq!(outcome.status, Some(Status::Failed), "{name}: {outcome:?}")
            }
            "seed-abandon" => assert_eq!(
                outcome,
                VerdictOutcome {
                    terminal: "failed".into(),
                    status: None,
                    rejected: 1,
                },
                "{name}"
            ),
            _ => {}
        }
    }
}

#[test]
fn triage_args_corpus_replays_and_seeds_parse_as_expected() {
    for (name, data) in corpus("triage_args", 7) {
        let outcome = triage_args(&data);
        let expected = match name.as_str() {
            "seed-prepare-valid" | "seed-prepare-dest" => TriageOutcome::Prepare { valid: true },
            "seed-prepare-hostile" => TriageOutcome::Prepare { valid: false },
            "seed-push-valid" => TriageOutcome::Push { valid: true },
            // git refuses a branch named HEAD; validation now says so up front.
            "regress-branch-head" => TriageOutcome::Push { valid: false },
            "seed-help" => TriageOutcome::Help,
            "seed-bad-int" => TriageOutcome::FlagError,
            "seed-bad-sub" => TriageOutcome::BadSubcommand,
            _ => continue,
        };
        assert_eq!(outcome, expected, "{name}");
    }
}

#[test]
fn go_duration_corpus_replays_and_seeds_parse_as_go_does() {
    for (name, data) in corpus("go_duration", 10) {
        let outcome = go_duration(&data);
        let expected = match name.as_str() {
            "seed-1h30m" => Some(Duration::from_secs(5400)),
            "seed-500ms" => Some(Duration::from_millis(500)),
            "seed-0" | "seed--0" => Some(Duration::ZERO),
            "seed-1.5h" => Some(Duration::from_secs(5400)),
            "seed-2h45m0.5s" => Some(Duration::from_millis(9_900_500)),
            "seed-300__s" => Some(Duration::from_micros(300)),
            "seed-1ns" => Some(Duration::from_nanos(1)),
            "seed-.5s" => Some(Duration::from_millis(500)),
            "seed-9223372036854775807ns" => Some(Duration::from_nanos(i64::MAX as u64)),
            "seed-minus-zero-unit" => Some(Duration::ZERO),
            // Regressions: `-` and `-.` were read as zero; the fraction of a huge value
            // overflowed u128 (a panic in debug builds, a wrong value in release).
            "seed-9223372036854775808ns"
            | "seed-10"
            | "seed-1e3s"
            | "seed-minus-only"
            | "seed-minus-dot"
            | "seed-minus-space"
            | "seed-frac-overflow" => None,
            _ => continue,
        };
        assert_eq!(outcome, expected, "{name}");
    }
}
