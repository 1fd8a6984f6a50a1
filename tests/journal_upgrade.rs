//! Journals written by an earlier release: the build opens them, migrates them to its schema
//! and resumes the run they hold in flight (real daemon, devserver and Docker).
//!
//! The fixtures in `tests/fixtures/journal-v1/` were written by the release before schema 2
//! (see the README there). `make_fixtures` below is how: kept so the next schema change can
//! make the previous release's fixtures the same way (run it at the old commit).

mod daemon_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon_support::*;

/// The run that is in flight when the runner dies (right after its claim is journaled).
const INFLIGHT_PROMPT: &str = r#"commit file=work.txt msg="agent work"; finish completed "kept""#;
/// The runner name of the fixtures' runner (part of container names).
const FIXTURE_RUNNER: &str = "journal-fixture";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Writes `terminal/` (three runs the daemon finished: succeeded with a push, succeeded without
/// changes, failed) and `inflight/` (one run the daemon claimed and journaled, then was killed
/// by the `claimed` failpoint) under `$WSR_MAKE_JOURNAL_FIXTURES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes fixtures; run by hand with WSR_MAKE_JOURNAL_FIXTURES=DIR"]
async fn make_fixtures() {
    let out = PathBuf::from(std::env::var("WSR_MAKE_JOURNAL_FIXTURES").expect("set the dir"));

    let mut h = Harness::start("fixture-terminal").await;
    h.name = FIXTURE_RUNNER.into();
    let ids = [
        h.enqueue(r#"commit file=a.txt msg="one"; finish completed "pushed""#),
        h.enqueue(r#"finish completed "nothing to change""#),
        h.enqueue(r#"error "it broke"; exit 3"#),
    ];
    let mut runner = h.runner(&[]);
    for id in ids {
        let run = h.wait_final(id).await;
        eprintln!("run {id}: {} {}", run.status, run.error);
    }
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    copy_dir(&h.journal_dir(), &out.join("terminal"));

    let mut h = Harness::start("fixture-inflight").await;
    h.name = FIXTURE_RUNNER.into();
    let id = h.enqueue(INFLIGHT_PROMPT);
    let mut runner = h.runner(&[("WSRUNNER_TEST_CRASH_AFTER", "claimed")]);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(90)).await, -1);
    assert_eq!(h.run(id).status, "running");
    copy_dir(&h.journal_dir(), &out.join("inflight"));
}
