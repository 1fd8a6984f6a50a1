//! Golden journals: committed exports (tests/fixtures/journals/*.jsonl) from earlier builds
//! are imported into sled and replayed. A change that can no longer read or replay an old
//! journal fails here. Regenerate (only for a deliberate format change, with a schema bump):
//! `WSR_REGEN_FIXTURES=1 cargo test --test journal_golden -- --ignored regenerate`.

mod common;

use std::path::{Path, PathBuf};

use windshift_runner::fsm::{self, Event, RunState, StateKind};
use windshift_runner::journal::{
    export_lines, import_lines, replay_run, ExportLine, Journal, MemJournal, Record, SledJournal,
    Slot, EXPORT_VERSION, SCHEMA_VERSION,
};

const T0: i64 = 1_704_067_200_000; // 2024-01-01T00:00:00Z

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journals")
}

fn fixtures() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    out.sort();
    out
}

fn parse(text: &str) -> Vec<ExportLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the journal makes of a committed export when it imports it: a version-1 export of
/// schema-1 records comes back as a version-2 export of schema-2 records, otherwise the same
/// (the fixtures hold no identity, so no `run` lines appear). The history is not regenerated:
/// this is the migration, applied to the committed lines.
fn migrated(lines: Vec<ExportLine>) -> Vec<ExportLine> {
    lines
        .into_iter()
        .map(|line| match line {
            ExportLine::Header { format, .. } => ExportLine::Header {
                format,
                version: EXPORT_VERSION,
            },
            ExportLine::Record(mut r) => {
                r.schema = SCHEMA_VERSION;
                ExportLine::Record(r)
            }
            other => other,
        })
        .collect()
}

#[test]
fn golden_journals_import_replay_and_round_trip() {
    let files = fixtures();
    assert!(
        files.len() >= 3,
        "expected the committed golden journals, found {files:?}"
    );
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let journal = SledJournal::open(&dir.path().join("db")).unwrap();
        let imported = import_lines(&text, &journal).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(imported > 0, "{name}");
        let mut findings = Vec::new();
        for run in journal.run_ids().unwrap() {
            findings.extend(replay_run(&journal.records(run).unwrap()));
        }
        if name.starts_with("corrupted") {
            assert_eq!(findings.len(), 1, "{name}: {findings:?}");
            assert!(findings[0].contains("quarantined"), "{findings:?}");
        } else {
            assert!(findings.is_empty(), "{name}: {findings:#?}");
        }
        // What we export now is what was committed (field for field, parsed).
        let again = export_lines(&journal).unwrap();
        assert_eq!(
            again,
            migrated(parse(&text)),
            "{name}: export no longer round-trips"
        );
    }
}

#[test]
fn golden_mixed_journal_has_the_expected_outcomes() {
    let text = std::fs::read_to_string(fixtures_dir().join("mixed.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal = SledJournal::open(&dir.path().join("db")).unwrap();
    import_lines(&text, &journal).unwrap();
    let last = |run: i64| match journal.records(run).unwrap().pop() {
        Some(Slot::Record(r)) => r.state,
        other => panic!("run {run}: {other:?}"),
    };
    let reported = last(5);
    assert_eq!(reported.kind(), StateKind::Reported);
    let verdict = reported.verdict().unwrap();
    assert_eq!(verdict.repos.len(), 2);
    assert_eq!(verdict.branch, "agent-runs/run-5");
    assert_eq!(last(6).verdict().unwrap().error, "agent blocked: stuck");
    assert_eq!(last(7).verdict().unwrap().status, fsm::Status::Canceled);
    assert_eq!(last(8).kind(), StateKind::Running);
    let active: Vec<i64> = journal.active().unwrap().iter().map(Slot::run_id).collect();
    assert_eq!(active, vec![8]);
}

/// Builds the fixture journals with the in-memory journal and the real transition function.
fn build(runs: &[(i64, Vec<Event>)], corrupt: Option<(i64, u64)>) -> String {
    let journal = MemJournal::new();
    for (run, events) in runs {
        let (_, secrets) = common::plan_and_secrets(*run);
        let mut last: Option<Record> = None;
        for (i, event) in events.iter().enumerate() {
            let (state, _) = fsm::apply(last.as_ref().map(|r| &r.state), event).unwrap();
            let record = Record {
                schema: SCHEMA_VERSION,
                run_id: *run,
                seq: i as u64 + 1,
                at_ms: T0 + *run * 60_000 + i as i64 * 1_500,
                event: event.clone(),
                state,
                secrets: (i == 0).then(|| secrets.clone()),
            };
            journal.append(&record).unwrap();
            last = Some(record);
        }
    }
    journal.flush().unwrap();
    if let Some((run, seq)) = corrupt {
        journal.insert_raw(
            run,
            seq,
            b"{\"schema\":1,\"run_id\":9,\"seq\":2,\"event\":{\"ev".to_vec(),
        );
    }
    export_lines(&journal)
        .unwrap()
        .iter()
        .map(ExportLine::to_json_line)
        .collect()
}

#[test]
#[ignore = "regenerates the committed fixtures; run only for a deliberate format change"]
fn regenerate() {
    if std::env::var("WSR_REGEN_FIXTURES").as_deref() != Ok("1") {
        return;
    }
    let dir = fixtures_dir();
    let happy = |run| {
        let (plan, _) = common::plan_and_secrets(run);
        common::happy_path(&plan)
    };
    std::fs::write(
        dir.join("happy-single-repo.jsonl"),
        build(&[(4, happy(4))], None),
    )
    .unwrap();

    let (p6, _) = common::plan_and_secrets(6);
    let blocked = vec![
        Event::Claimed { plan: p6 },
        Event::ContainerStarted,
        sig(r#"{"type":"finish","outcome":"blocked","summary":"stuck"}"#),
        Event::ContainerExited { code: Some(0) },
        Event::ReportFailed {
            error: "503 Service Unavailable".into(),
            retryable: true,
        },
        Event::ReportAccepted,
    ];
    let (p7, _) = common::plan_and_secrets(7);
    let canceled = vec![
        Event::Claimed { plan: p7 },
        Event::ContainerStarted,
        Event::CancelRequested { force: false },
        Event::ContainerExited { code: Some(137) },
        Event::ReportAccepted,
    ];
    let (p8, _) = common::plan_and_secrets(8);
    let active = vec![
        Event::Claimed { plan: p8.clone() },
        Event::CheckoutReady {
            checkout: common::checkout_for(&p8),
        },
        Event::ContainerStarted,
        sig(r#"{"type":"starting"}"#),
    ];
    std::fs::write(
        dir.join("mixed.jsonl"),
        build(
            &[(5, happy(5)), (6, blocked), (7, canceled), (8, active)],
            None,
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("corrupted.jsonl"),
        build(&[(9, happy(9))], Some((9, 2))),
    )
    .unwrap();
}

fn sig(line: &str) -> Event {
    Event::AgentSignal {
        signal: fsm::contract::classify_stdout_line(line).unwrap(),
    }
}

#[test]
fn fixtures_hold_no_secret() {
    for file in fixtures() {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(common::TOKEN), "{}", file.display());
    }
    let _ = RunState::kind;
}
