//! The sled journal's own contract: directory mode, one transaction per transition with
//! sequence checks, the active/ended indexes, retention, schema guard, the async helper.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use windshift_runner::fsm::StateKind;
use windshift_runner::journal::{
    commit_event, commit_event_async, Journal, JournalError, Record, SledJournal, Slot,
};

/// Commits a run's happy path up to (excluding) the last `keep_back` events.
fn commit_run(j: &dyn Journal, run: i64, keep_back: usize, at_ms: i64) -> Record {
    let (plan, secrets) = common::plan_and_secrets(run);
    let events = common::happy_path(&plan);
    let mut last: Option<Record> = None;
    for event in &events[..events.len() - keep_back] {
        let c = commit_event(
            j,
            last.as_ref(),
            event.clone(),
            at_ms,
            Some(secrets.clone()),
        )
        .unwrap();
        last = c.record.or(last);
    }
    last.unwrap()
}

#[test]
fn db_dir_is_created_0700_and_tightened() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/journal");
    drop(SledJournal::open(&db).unwrap());
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o700
    );
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(SledJournal::open(&db).unwrap());
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // The files holding records (and the run token) are 0600.
    let mode = std::fs::metadata(db.join("db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// Every directory and file under `dir`, with its permission bits.
fn modes_under(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, bool, u32)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        out.push((
            entry.path(),
            meta.is_dir(),
            meta.permissions().mode() & 0o7777,
        ));
        if meta.is_dir() {
            modes_under(&entry.path(), out);
        }
    }
}

/// Security issue 11: sled creates `blobs/` 0755 and its files 0644 under the usual umask,
/// at open and while running (a blob file for every large page). After commits, including a
/// run whose prompt forces blobs, every directory of the journal is 0700 and every file 0600.
#[test]
fn every_journal_file_is_0600_and_every_directory_0700_after_commits() {
    // The usual umask, whatever the test harness runs with: it is what sled's files get.
    // SAFETY: umask(2) only swaps the process's mask; this test binary's tests do not depend
    // on it.
    let old = unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("journal");
    let j = SledJournal::open(&db).unwrap();
    commit_run(&j, 1, 0, 1_000);
    // A 600 KB prompt: each record carries it, well past sled's inline limit (a blob file).
    let (mut plan, secrets) = common::plan_and_secrets(2);
    plan.prompt = "p".repeat(600 * 1024);
    let mut last: Option<Record> = None;
    for event in common::happy_path(&plan) {
        let c = commit_event(&j, last.as_ref(), event, 2_000, Some(secrets.clone())).unwrap();
        last = c.record.or(last);
    }
    j.flush().unwrap();
    let mut found = Vec::new();
    modes_under(&db, &mut found);
    unsafe { libc::umask(old) };
    assert!(
        found
            .iter()
            .any(|(p, dir, _)| !dir && p.parent() == Some(&db.join("blobs"))),
        "the large records made sled write blob files: {found:?}"
    );
    let wrong: Vec<_> = found
        .iter()
        .filter(|(_, dir, mode)| *mode != if *dir { 0o700 } else { 0o600 })
        .collect();
    assert!(wrong.is_empty(), "not private: {wrong:?}");
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

#[test]
fn sequence_rules_and_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let j = SledJournal::open(&dir.path().join("db")).unwrap();
    let done = commit_run(&j, 4, 0, 1_000);
    assert_eq!(done.state.kind(), StateKind::Reported);
    let active = commit_run(&j, 8, 3, 2_000);
    assert_eq!(j.active_index().unwrap(), vec![(8, active.seq)]);
    assert_eq!(j.ended_index().unwrap(), vec![(4, done.seq)]);
    let slots = j.active().unwrap();
    assert_eq!(slots, vec![Slot::Record(active.clone())]);

    // A gap, a repeat and an append after terminal are misuse, and change nothing.
    let mut gap = active.clone();
    gap.seq += 2;
    assert!(matches!(j.append(&gap), Err(JournalError::Misuse(m)) if m.contains("not contiguous")));
    assert!(matches!(j.append(&active), Err(JournalError::Misuse(_))));
    let mut after_end = done.clone();
    after_end.seq += 1;
    assert!(matches!(j.append(&after_end), Err(JournalError::Misuse(m)) if m.contains("terminal")));
    assert_eq!(j.records(8).unwrap().len() as u64, active.seq);
    // Only the first record carries the secrets.
    let firsts: Vec<bool> = j
        .records(4)
        .unwrap()
        .iter()
        .map(|s| matches!(s, Slot::Record(r) if r.secrets.is_some()))
        .collect();
    assert!(firsts[0] && firsts[1..].iter().all(|b| !b));
}

#[test]
fn retention_archives_old_terminal_runs_then_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    let j = SledJournal::open(&dir.path().join("db")).unwrap();
    commit_run(&j, 4, 0, 1_000); // old, terminal
    commit_run(&j, 5, 0, 9_000); // recent, terminal
    commit_run(&j, 8, 2, 1_000); // old but active: never archived
    let archive = dir.path().join("archive.jsonl");
    let summary = j.archive_terminal_before(5_000, &archive).unwrap();
    assert_eq!(summary.runs, 1);
    assert_eq!(j.run_ids().unwrap(), vec![5, 8]);
    assert_eq!(j.ended_index().unwrap().len(), 1);
    let text = std::fs::read_to_string(&archive).unwrap();
    assert_eq!(
        text.lines().count(),
        summary.records + 1,
        "header + records"
    );
    assert!(text.lines().next().unwrap().starts_with("{\"header\":"));
    assert!(text
        .lines()
        .skip(1)
        .all(|l| l.starts_with("{\"record\":{\"schema\":3,\"run_id\":4,")));
    assert!(!text.contains(common::TOKEN), "archives are redacted");
    assert_eq!(
        std::fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Nothing left to archive: a second pass is a no-op.
    assert_eq!(j.archive_terminal_before(5_000, &archive).unwrap().runs, 0);
}

#[test]
fn a_journal_from_a_newer_schema_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let db = sled::open(&path).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledJournal::open(&path).err().expect("refused");
    assert!(err.to_string().contains("newer windshift-runner"), "{err}");
}

#[test]
fn records_survive_reopen_and_the_async_helper_commits_durably() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (plan, secrets) = common::plan_and_secrets(4);
    let events = common::happy_path(&plan);
    {
        let j: Arc<dyn Journal> = Arc::new(SledJournal::open(&path).unwrap());
        let mut last: Option<Record> = None;
        for event in &events[..4] {
            let c = rt
                .block_on(commit_event_async(
                    j.clone(),
                    last.clone(),
                    event.clone(),
                    5,
                    Some(secrets.clone()),
                ))
                .unwrap();
            last = c.record.or(last);
        }
    }
    let j = SledJournal::open(&path).unwrap();
    let slots = j.records(4).unwrap();
    assert_eq!(slots.len(), 4);
    assert_eq!(j.active().unwrap().len(), 1);
}

#[test]
fn unresolved_claim_mark_survives_a_reopen_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("journal");
    {
        let j = SledJournal::open(&db).unwrap();
        assert_eq!(j.unresolved_claim().unwrap(), None);
        j.set_unresolved_claim(Some(1_234)).unwrap();
    }
    let j = SledJournal::open(&db).unwrap();
    assert_eq!(j.unresolved_claim().unwrap(), Some(1_234));
    j.set_unresolved_claim(None).unwrap();
    drop(j);
    let j = SledJournal::open(&db).unwrap();
    assert_eq!(j.unresolved_claim().unwrap(), None);
}

/// The keys a tree of the journal at `path` holds (opened raw, after the journal closed).
fn raw_keys(path: &std::path::Path, tree: &str) -> Vec<Vec<u8>> {
    let db = sled::open(path).unwrap();
    let tree = db.open_tree(tree).unwrap();
    tree.iter().keys().map(|k| k.unwrap().to_vec()).collect()
}

/// Schema 3: the append that ends a run packs its records into one `v3.runs` value and
/// deletes its per-seq keys in the same transaction; every reader sees the same records.
#[test]
fn a_terminal_run_is_packed_into_one_key_and_reads_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let (plan, secrets) = common::plan_and_secrets(4);
    let mut committed = Vec::new();
    {
        let j = SledJournal::open(&path).unwrap();
        let mut last: Option<Record> = None;
        for event in common::happy_path(&plan) {
            let c = commit_event(&j, last.as_ref(), event, 7, Some(secrets.clone())).unwrap();
            if let Some(r) = &c.record {
                committed.push(Slot::Record(r.clone()));
            }
            last = c.record.or(last);
        }
        assert!(last.unwrap().state.is_terminal());
        commit_run(&j, 8, 2, 9); // in flight: stays one key per record
        assert_eq!(j.records(4).unwrap(), committed);
    }
    let run_4 = windshift_runner::journal::run_key(4);
    let records = raw_keys(&path, "v2.records");
    assert!(
        records.iter().all(|k| k[4..12] != run_4),
        "no per-seq key left for the terminal run"
    );
    assert!(
        !records.is_empty(),
        "the run in flight keeps its per-seq keys"
    );
    let packs = raw_keys(&path, "v3.runs");
    assert_eq!(packs.len(), 1);
    assert_eq!(packs[0][4..12], run_4);
    let j = SledJournal::open(&path).unwrap();
    assert_eq!(j.records(4).unwrap(), committed);
    assert_eq!(j.run_ids().unwrap(), vec![4, 8]);
    assert_eq!(j.active().unwrap().len(), 1);
    assert_eq!(j.ended_index().unwrap(), vec![(4, committed.len() as u64)]);
    let findings = windshift_runner::journal::tools::verify(&j, 14, 10).unwrap();
    assert!(findings.is_empty(), "{findings:?}");
    // A terminal run still takes no more records.
    let Slot::Record(mut after_end) = committed.last().cloned().unwrap() else {
        unreachable!()
    };
    after_end.seq += 1;
    assert!(matches!(j.append(&after_end), Err(JournalError::Misuse(_))));
    assert_eq!(j.records(4).unwrap(), committed);
}

/// A damaged pack is quarantined (kept, listed by verify), never fatal.
#[test]
fn a_damaged_pack_is_quarantined_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let j = SledJournal::open(&path).unwrap();
        commit_run(&j, 4, 0, 1);
        commit_run(&j, 5, 0, 1);
    }
    {
        let db = sled::open(&path).unwrap();
        let packs = db.open_tree("v3.runs").unwrap();
        let key = packs.iter().keys().next().unwrap().unwrap();
        let mut value = packs.get(&key).unwrap().unwrap().to_vec();
        value.truncate(value.len() - 3); // into the last record
        packs.insert(key, value).unwrap();
        db.flush().unwrap();
    }
    let j = SledJournal::open(&path).unwrap();
    let slots = j.records(4).unwrap();
    assert!(
        matches!(slots.last(), Some(Slot::Quarantined(q)) if q.error.contains("cut short")),
        "{slots:?}"
    );
    assert!(j
        .records(5)
        .unwrap()
        .iter()
        .all(|s| matches!(s, Slot::Record(_))));
    let findings = windshift_runner::journal::tools::verify(&j, 14, 10).unwrap();
    assert!(
        findings
            .iter()
            .any(|f| f.contains("run 4") && f.contains("quarantined")),
        "{findings:?}"
    );
}
