//! Replays the committed fuzz corpus (fuzz/corpus/journal_decode) through the fuzz target's
//! body on stable, so every input the fuzzer ever kept stays a regression test.

use std::path::Path;

use windshift_runner::journal::{fuzz_decode_and_replay, FuzzOutcome};

#[test]
fn journal_decode_corpus_replays_without_panics_and_with_the_expected_outcomes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/journal_decode");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let data = std::fs::read(&path).unwrap();
        let outcome = fuzz_decode_and_replay(&data);
        seen += 1;
        match name.as_str() {
            "seed-full-run" => assert!(
                matches!(outcome, FuzzOutcome::Decoded { records, findings: 0 } if records > 5),
                "{name}: {outcome:?}"
            ),
            "seed-first-record" => {
                assert_eq!(
                    outcome,
                    FuzzOutcome::Decoded {
                        records: 1,
                        findings: 0
                    },
                    "{name}"
                )
            }
            "seed-out-of-order" => assert!(
                matches!(outcome, FuzzOutcome::Decoded { records: 2, findings } if findings >= 1),
                "{name}: {outcome:?}"
            ),
            "seed-diverging" => {
                assert_eq!(
                    outcome,
                    FuzzOutcome::Decoded {
                        records: 2,
                        findings: 1
                    },
                    "{name}"
                )
            }
            "seed-future-schema" | "seed-truncated" | "seed-garbage" | "seed-empty" => {
                assert_eq!(outcome, FuzzOutcome::Quarantined, "{name}")
            }
            // Inputs the fuzzer kept: not panicking is the property.
            _ => {}
        }
    }
    assert!(
        seen >= 8,
        "corpus missing: found {seen} files in {}",
        dir.display()
    );
}
