//! `windshift-runner journal …` end to end: the real binary on fixture journals, including a
//! locked database, a corrupted record, a diverging record and secret redaction.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use windshift_runner::journal::{commit_event, encode_stored, Journal, Record, SledJournal};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
}

fn journal(db: &Path, args: &[&str]) -> Output {
    bin()
        .arg("journal")
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("WSRUNNER_JOURNAL_DIR")
        .output()
        .expect("run windshift-runner")
}

fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/journals")
        .join(name)
}

/// A temp dir with the fixture imported through the CLI.
fn imported(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let (code, out, err) = text(&journal(&db, &["import", fixture(name).to_str().unwrap()]));
    assert_eq!(code, 0, "import {name}: {out}{err}");
    assert!(out.contains("imported"), "{out}");
    (dir, db)
}

#[test]
fn list_show_replay_verify_on_a_clean_journal() {
    let (_dir, db) = imported("mixed.jsonl");
    let (code, out, _) = text(&journal(&db, &["list"]));
    assert_eq!(code, 0, "{out}");
    for needle in ["reported", "running", "2024-01-01T00:0"] {
        assert!(out.contains(needle), "list lacks {needle}:\n{out}");
    }
    assert_eq!(out.lines().count(), 5, "header + 4 runs:\n{out}");

    let (code, out, _) = text(&journal(&db, &["show", "6"]));
    assert_eq!(code, 0);
    assert!(out.contains("agent finish (blocked)"), "{out}");
    assert!(out.contains("+1.500s"), "durations between records:\n{out}");
    assert!(out.contains("report failed (will retry): 503"), "{out}");
    assert!(
        out.contains("verdict: failed (\"agent blocked: stuck\")"),
        "{out}"
    );

    let (code, out, _) = text(&journal(&db, &["replay"]));
    assert_eq!(
        (code, out.trim()),
        (0, "replayed 4 runs: every recorded state matches")
    );

    // Run 8 is still active and its last record is from 2024-01-01: past a 1-day retention
    // (clock-independent: "now" is always later than the fixture), within a huge one.
    let (code, out, _) = text(&journal(&db, &["verify", "--retention-days", "1"]));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("run 8: still active") && out.contains("older than the 1-day retention"),
        "{out}"
    );
    let (code, out, _) = text(&journal(&db, &["verify", "--retention-days", "1000000"]));
    assert_eq!(
        (code, out.trim()),
        (
            0,
            "journal schema 3 (this build writes 3, opens 1 to 3)\nverify: clean"
        )
    );

    let (code, out, _) = text(&journal(
        &db,
        &["--json", "verify", "--retention-days", "1000000"],
    ));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["clean"], true);
    assert_eq!(v["schema"], 3);
    let (code, out, _) = text(&journal(&db, &["list", "--json"]));
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 4);
    assert_eq!(rows[0]["run_id"], 5);
    assert_eq!(rows[0]["verdict"], "succeeded");
}

#[test]
fn show_of_an_unknown_run_cannot_run() {
    let (_dir, db) = imported("happy-single-repo.jsonl");
    let (code, _, err) = text(&journal(&db, &["show", "999"]));
    assert_eq!(code, 2);
    assert!(err.contains("run 999 is not in this journal"), "{err}");
}

#[test]
fn export_is_importable_and_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    {
        // A journal holding a real run token.
        let j = SledJournal::open(&db).unwrap();
        let (plan, secrets) = common::plan_and_secrets(4);
        let mut last: Option<Record> = None;
        for event in common::happy_path(&plan) {
            let c = commit_event(
                &j,
                last.as_ref(),
                event,
                1_700_000_000_000,
                Some(secrets.clone()),
            )
            .unwrap();
            last = c.record.or(last);
        }
        let raw = j.records(4).unwrap();
        assert!(format!("{:?}", raw).contains("RunSecrets"));
    }
    let (code, out, _) = text(&journal(&db, &["export", "--json"]));
    assert_eq!(code, 0);
    assert!(!out.contains(common::TOKEN), "export leaked the run token");
    assert!(out.contains("\"WS_TOKEN\":\"[REDACTED]\""), "{out}");
    for args in [&["show", "4"][..], &["list"], &["--json", "show", "4"]] {
        let (_, out, err) = text(&journal(&db, args));
        assert!(
            !out.contains(common::TOKEN) && !err.contains(common::TOKEN),
            "{args:?}"
        );
    }
    // The export imports into a fresh journal and replays clean.
    let file = dir.path().join("export.jsonl");
    std::fs::write(&file, &out).unwrap();
    let db2 = dir.path().join("db2");
    let (code, _, err) = text(&journal(&db2, &["import", file.to_str().unwrap()]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(text(&journal(&db2, &["replay"])).0, 0);
    // Importing twice into the same journal is refused.
    let (code, _, err) = text(&journal(&db2, &["import", file.to_str().unwrap()]));
    assert_eq!(code, 2);
    assert!(err.contains("already holds runs"), "{err}");
}

#[test]
fn corrupted_record_is_quarantined_and_shown_not_fatal() {
    let (_dir, db) = imported("corrupted.jsonl");
    let (code, out, _) = text(&journal(&db, &["verify", "--retention-days", "1000000"]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("run 9 seq 2: quarantined record"), "{out}");
    let (code, out, _) = text(&journal(&db, &["show", "9"]));
    assert_eq!(code, 1);
    assert!(out.contains("QUARANTINED"), "{out}");
    assert!(
        out.contains("reported"),
        "records after the bad one are still shown:\n{out}"
    );
    assert_eq!(text(&journal(&db, &["list"])).0, 1);

    // Garbage written straight into sled over a good record of a clean journal.
    let (_dir2, db2) = imported("happy-single-repo.jsonl");
    {
        let j = SledJournal::open(&db2).unwrap();
        j.import_raw(4, 3, &b"\xff\x00 not a record"[..]).unwrap();
        j.flush().unwrap();
    }
    let (code, out, err) = text(&journal(&db2, &["verify", "--retention-days", "1000000"]));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("run 4 seq 3: quarantined record (not a journal record"),
        "{out}"
    );
}

#[test]
fn diverging_record_is_reported_by_replay() {
    let (_dir, db) = imported("happy-single-repo.jsonl");
    {
        let j = SledJournal::open(&db).unwrap();
        let mut records = windshift_runner::journal::tools::all_records(&j).unwrap();
        let mut bad = records.remove(2);
        // Claim the container started while recording the state before it.
        bad.state = records[0].state.clone();
        j.import_raw(4, bad.seq, &encode_stored(&bad, None, true))
            .unwrap();
        j.flush().unwrap();
    }
    let (code, out, _) = text(&journal(&db, &["replay"]));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("run 4 seq 3: replay diverges"), "{out}");
}

#[test]
fn locked_database_is_explained_and_copy_works() {
    let (_dir, db) = imported("mixed.jsonl");
    let live = SledJournal::open(&db).unwrap(); // a "running runner" holds the lock
    let (code, out, err) = text(&journal(&db, &["list"]));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("locked by another process"), "{err}");
    assert!(err.contains("--copy"), "{err}");
    let (code, out, err) = text(&journal(&db, &["--copy", "list"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("running"), "{out}");
    assert_eq!(live.run_ids().unwrap(), vec![5, 6, 7, 8]);
}

#[test]
fn missing_database_cannot_run_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nope");
    let (code, _, err) = text(&journal(&db, &["list"]));
    assert_eq!(code, 2);
    assert!(err.contains("no journal at"), "{err}");
    assert!(!db.exists());
    let (code, _, err) = text(&journal(&db, &["--copy", "verify"]));
    assert_eq!(code, 2, "{err}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let out = bin()
        .args(["journal", "show", "not-a-number"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"));
}

#[test]
fn archive_moves_old_terminal_runs_to_jsonl_and_keeps_active_ones() {
    let (dir, db) = imported("mixed.jsonl");
    let archive = dir.path().join("archive.jsonl");
    let (code, out, err) = text(&journal(
        &db,
        &[
            "archive",
            "--older-than-days",
            "1",
            "--to",
            archive.to_str().unwrap(),
        ],
    ));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("archived 3 runs"), "{out}");
    let (_, out, _) = text(&journal(&db, &["list", "--json"]));
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        rows.as_array().unwrap().len(),
        1,
        "only the active run 8 stays: {out}"
    );
    assert_eq!(rows[0]["run_id"], 8);
    // The archive is itself an export: it imports and replays.
    let file = archive.clone();
    let restored = dir.path().join("restored");
    assert_eq!(
        text(&journal(&restored, &["import", file.to_str().unwrap()])).0,
        0
    );
    assert_eq!(text(&journal(&restored, &["replay"])).0, 0);
    // Archiving a --copy is refused: it would change nothing real.
    let (code, _, err) = text(&journal(
        &db,
        &[
            "--copy",
            "archive",
            "--older-than-days",
            "1",
            "--to",
            archive.to_str().unwrap(),
        ],
    ));
    assert_eq!(code, 2);
    assert!(err.contains("--copy"), "{err}");
}
