//! The README's main-job command, `windshift-runner demo`, run as a newcomer would: one
//! command, an embedded devserver, a local repo, the test agent image, a real run.

use std::process::Command;

#[test]
fn demo_runs_one_job_end_to_end_and_prints_the_evidence() {
    let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .arg("demo")
        .env("RUST_LOG", "warn")
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed\n{stdout}\n{stderr}");
    for expected in [
        "==> Journal timeline of run #1",
        "report_accepted",
        "status      succeeded",
        "branch      agent-runs/run-1",
        "Add a greeting",
        "GREETING.md",
        "Demo complete",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    for text in [&stdout, &stderr] {
        assert_no_secret(text);
    }
}

/// No `wsrt_`/`wsrc_` followed by secret material (only the masked form may appear).
fn assert_no_secret(text: &str) {
    for prefix in ["wsrt_", "wsrc_"] {
        for (i, _) in text.match_indices(prefix) {
            let next = text[i + prefix.len()..].chars().next();
            assert!(
                !next.is_some_and(|c| c.is_ascii_hexdigit()),
                "a secret leaked: {}",
                &text[i..(i + 12).min(text.len())]
            );
        }
    }
}
