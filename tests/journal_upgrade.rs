//! Journals written by an earlier release: the build opens them, migrates them to its schema
//! and resumes the run they hold in flight (real daemon, devserver and Docker).
//!
//! The fixtures in `tests/fixtures/journal-v1/` were written by the release before schema 2,
//! those in `tests/fixtures/journal-v2/` by the release before schema 3 (see the READMEs
//! there). `make_fixtures` below is how: kept so the next schema change can make the previous
//! release's fixtures the same way (run it at the old commit).

mod daemon_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon_support::*;
use windshift_devserver::types::RegisterBody;
use windshift_runner::fsm::{self, Event};
use windshift_runner::journal::{
    commit_event, replay_run, CommitError, ExportLine, Journal, JournalError, JournalIdentity,
    Migration, Record, SledJournal, Slot, SCHEMA_VERSION,
};

fn fixture(name: &str) -> PathBuf {
    fixture_of(1, name)
}

/// A fixture written by the release of journal `schema`.
fn fixture_of(schema: u32, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/journal-v{schema}"))
        .join(name)
}

/// A private copy of a fixture journal (opening migrates in place).
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    copy_fixture_of(1, name)
}

fn copy_fixture_of(schema: u32, name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    copy_dir(&fixture_of(schema, name), &dir);
    (tmp, dir)
}

/// Every record of the view, in (run, seq) order.
fn records_of(j: &SledJournal) -> Vec<Slot> {
    let mut out = Vec::new();
    for run in j.run_ids().unwrap() {
        out.extend(j.records(run).unwrap());
    }
    out
}

/// The records the previous release exported from the fixture (secrets masked), as this
/// build reads them after the migration: the same, at schema 2.
fn exported_v1_records(name: &str) -> Vec<Record> {
    let text = std::fs::read_to_string(fixture(&format!("{name}.export.jsonl"))).unwrap();
    text.lines()
        .filter_map(|l| match serde_json::from_str::<ExportLine>(l).unwrap() {
            ExportLine::Record(mut r) => {
                assert_eq!(r.schema, 1, "the fixture is the previous release's");
                r.schema = SCHEMA_VERSION;
                Some(r)
            }
            _ => None,
        })
        .collect()
}

fn redacted_records(slots: &[Slot]) -> Vec<Record> {
    slots
        .iter()
        .map(|s| match s {
            Slot::Record(r) => r.redacted(),
            Slot::Quarantined(q) => panic!("quarantined after migration: {q:?}"),
        })
        .collect()
}

#[test]
fn v1_journals_migrate_on_open_and_read_back_the_same_history() {
    for name in ["terminal", "inflight"] {
        let (_tmp, dir) = copy_fixture(name);
        let (j, migration) = SledJournal::open_reporting(&dir).unwrap();
        assert!(
            matches!(migration, Migration::Migrated { from: 1, .. }),
            "{name}: {migration:?}"
        );
        assert_eq!(j.stored_schema().unwrap(), SCHEMA_VERSION);
        let slots = records_of(&j);
        assert_eq!(
            redacted_records(&slots),
            exported_v1_records(name),
            "{name}"
        );
        for run in j.run_ids().unwrap() {
            assert_eq!(replay_run(&j.records(run).unwrap()), Vec::<String>::new());
        }
        drop(j);
        // Opening again migrates nothing and reads the same.
        let (j, migration) = SledJournal::open_reporting(&dir).unwrap();
        assert_eq!(migration, Migration::None);
        assert_eq!(redacted_records(&records_of(&j)), exported_v1_records(name));
    }
    let (_tmp, dir) = copy_fixture("inflight");
    let j = SledJournal::open(&dir).unwrap();
    let active = j.active().unwrap();
    assert_eq!(active.len(), 1);
    match &active[0] {
        Slot::Record(r) => {
            assert_eq!(r.state.kind().to_string(), "claimed");
            // The run token survived the migration (stored once, beside the plan).
            assert!(r
                .secrets
                .as_ref()
                .is_some_and(|s| s.env.contains_key("WS_TOKEN")));
        }
        other => panic!("{other:?}"),
    }
}

/// Runs `journal migrate` on `dir` in a child that dies at failpoint `point`.
fn migrate_dying_at(dir: &Path, point: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(["journal", "--db"])
        .arg(dir)
        .arg("migrate")
        .env("WSRUNNER_JOURNAL_FAILPOINT", point)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{point}: the child died: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failpoint"),
        "{point}: {out:?}"
    );
}

#[test]
fn a_crash_during_the_migration_leaves_a_journal_that_opens_and_migrates() {
    for point in ["migration_before_commit", "migration_after_commit"] {
        let (_tmp, dir) = copy_fixture("terminal");
        migrate_dying_at(&dir, point);
        let (j, migration) = SledJournal::open_reporting(&dir).unwrap();
        match point {
            "migration_before_commit" => assert!(
                matches!(
                    migration,
                    Migration::Migrated {
                        from: 1,
                        runs: 3,
                        ..
                    }
                ),
                "{migration:?}"
            ),
            _ => assert_eq!(migration, Migration::None, "committed before the crash"),
        }
        assert_eq!(
            redacted_records(&records_of(&j)),
            exported_v1_records("terminal"),
            "{point}"
        );
    }
}

#[test]
fn offline_tools_read_a_v1_journal_through_a_copy_and_leave_it_as_it_was() {
    let (_tmp, dir) = copy_fixture("terminal");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
            .args(["journal", "--db"])
            .arg(&dir)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["list"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("reported succeeded") && text.contains("reported failed"),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("schema 1"),
        "{out:?}"
    );
    let out = run(&["verify"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("journal schema 1"),
        "verify reports the stored schema: {out:?}"
    );
    assert!(matches!(
        SledJournal::open_existing(&dir).err(),
        Some(JournalError::NeedsMigration { schema: 1, .. })
    ));
    let out = run(&["migrate"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrated schema 1 to 3: 3 runs"));
    let out = run(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("journal schema 3") && text.contains("verify: clean"),
        "{text}"
    );
}

/// `windshift-runner journal --db DIR ARGS…` (the build under test).
fn tool(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(["journal", "--db"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// The keys of a raw sled tree of the (closed) journal at `dir`, as (scope, run) pairs.
fn raw_runs(dir: &Path, tree: &str) -> Vec<(u32, i64)> {
    let db = sled::open(dir).unwrap();
    let tree = db.open_tree(tree).unwrap();
    tree.iter()
        .keys()
        .map(|k| {
            let k = k.unwrap();
            let scope = u32::from_be_bytes(k[..4].try_into().unwrap());
            let run = (u64::from_be_bytes(k[4..12].try_into().unwrap()) ^ (1 << 63)) as i64;
            (scope, run)
        })
        .collect()
}

#[test]
fn v2_journals_migrate_on_open_pack_their_terminal_runs_and_export_byte_for_byte_the_same() {
    for name in ["terminal", "inflight"] {
        let committed = std::fs::read(fixture_of(2, &format!("{name}.export.jsonl"))).unwrap();
        let (_tmp, dir) = copy_fixture_of(2, name);
        // Read through a migrated copy first: the original is left as it was.
        let out = tool(&dir, &["export"]);
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("schema 2"),
            "{name}: {out:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&committed),
            "{name}: the export is the previous release's, byte for byte"
        );
        let (j, migration) = SledJournal::open_reporting(&dir).unwrap();
        let packed = if name == "terminal" { 3 } else { 0 };
        assert!(
            matches!(migration, Migration::Migrated { from: 2, runs, .. } if runs == packed),
            "{name}: {migration:?}"
        );
        assert_eq!(j.stored_schema().unwrap(), SCHEMA_VERSION);
        for run in j.run_ids().unwrap() {
            assert_eq!(replay_run(&j.records(run).unwrap()), Vec::<String>::new());
        }
        drop(j);
        let out = tool(&dir, &["export"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&committed),
            "{name}: migrated in place, the export is still the same"
        );
        let out = tool(&dir, &["verify"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("journal schema 3"),
            "{name}: {out:?}"
        );
        // The terminal runs are one key each now; a run in flight keeps a key per record.
        assert_eq!(raw_runs(&dir, "v3.runs").len(), packed, "{name}");
        let ended = raw_runs(&dir, "v2.ended");
        assert!(
            raw_runs(&dir, "v2.records")
                .iter()
                .all(|r| !ended.contains(r)),
            "{name}: no per-seq record of a terminal run is left"
        );
        let (_, migration) = SledJournal::open_reporting(&dir).unwrap();
        assert_eq!(migration, Migration::None, "{name}: migrated once");
    }
}

#[test]
fn a_crash_during_the_v2_migration_leaves_a_journal_that_opens_and_migrates() {
    let committed = std::fs::read(fixture_of(2, "terminal.export.jsonl")).unwrap();
    for point in [
        "migration_packing",
        "migration_before_commit",
        "migration_after_commit",
    ] {
        let (_tmp, dir) = copy_fixture_of(2, "terminal");
        migrate_dying_at(&dir, point);
        let records = raw_runs(&dir, "v2.records");
        if point != "migration_after_commit" {
            // Not committed: every per-seq record is still in place, so the release before
            // this one reads the journal exactly as it left it.
            for run in raw_runs(&dir, "v2.ended") {
                assert!(
                    records.contains(&run),
                    "{point}: run {run:?} lost its records"
                );
            }
        }
        let (j, migration) = SledJournal::open_reporting(&dir).unwrap();
        match point {
            "migration_after_commit" => {
                assert_eq!(migration, Migration::None, "committed before the crash")
            }
            _ => assert!(
                matches!(
                    migration,
                    Migration::Migrated {
                        from: 2,
                        runs: 3,
                        ..
                    }
                ),
                "{point}: {migration:?}"
            ),
        }
        drop(j);
        let out = tool(&dir, &["export"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&committed),
            "{point}"
        );
        assert!(tool(&dir, &["verify"]).status.success(), "{point}");
        let ended = raw_runs(&dir, "v2.ended");
        assert!(
            raw_runs(&dir, "v2.records")
                .iter()
                .all(|r| !ended.contains(r)),
            "{point}: the per-seq copies were deleted by the next open"
        );
    }
}

#[test]
fn offline_tools_migrate_a_v2_journal_in_place_on_request() {
    let (_tmp, dir) = copy_fixture_of(2, "terminal");
    let out = tool(&dir, &["verify"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("journal schema 2"),
        "verify reports the stored schema: {out:?}"
    );
    assert!(matches!(
        SledJournal::open_existing(&dir).err(),
        Some(JournalError::NeedsMigration { schema: 2, .. })
    ));
    let out = tool(&dir, &["migrate"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("migrated schema 2 to 3: 3 runs"),
        "{out:?}"
    );
    let out = tool(&dir, &["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("journal schema 3") && text.contains("verify: clean"),
        "{text}"
    );
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_error() {
    let (_tmp, dir) = copy_fixture("terminal");
    {
        let db = sled::open(&dir).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema", &(SCHEMA_VERSION + 1).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let err = SledJournal::open(&dir).err().expect("refused").to_string();
    assert!(
        err.contains("newer windshift-runner") && err.contains("downgrade"),
        "{err}"
    );
}

fn plan(run_id: i64) -> fsm::RunPlan {
    let job = windshift_runner::control::wire::JobSpec {
        run_id,
        initial_prompt: "Fix the test. ".repeat(300),
        ..Default::default()
    };
    fsm::RunPlan::from_job(&job, "host").0
}

/// Claim → container → exit → report: a terminal run in four commits.
fn finish_run(j: &dyn Journal, run_id: i64, at_ms: i64) -> Result<(), CommitError> {
    let mut last: Option<Record> = None;
    for event in [
        Event::Claimed { plan: plan(run_id) },
        Event::ContainerStarted,
        Event::ContainerExited { code: Some(1) },
        Event::ReportAccepted,
    ] {
        let c = commit_event(j, last.as_ref(), event, at_ms, None)?;
        last = c.record.or(last);
    }
    assert!(last.unwrap().state.is_terminal());
    Ok(())
}

#[test]
fn run_ids_are_scoped_by_server_and_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let journal = SledJournal::open(&tmp.path().join("j")).unwrap();
    let a = JournalIdentity::new("https://a.example/api", "wsrc_first", Some(3));
    let b = JournalIdentity::new("https://b.example/api", "wsrc_second", None);
    let ja = journal.scoped(&a).unwrap();
    finish_run(&ja, 1, 10).unwrap();
    // Another server (ids start again at 1): a new run, not "already terminal".
    let jb = journal.scoped(&b).unwrap();
    finish_run(&jb, 1, 20).unwrap();
    assert_eq!(jb.records(1).unwrap().len(), 4);
    // The same identity handing out run 1 again: refused, naming the likely cause.
    let err = match finish_run(&journal.scoped(&a).unwrap(), 1, 30) {
        Err(CommitError::Journal(e @ JournalError::RunIdReused(_))) => e.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(
        err.contains("restored from a backup") && err.contains("register this runner again"),
        "{err}"
    );
    assert!(
        !err.contains("wsrc_"),
        "no credential in the message: {err}"
    );
    // The tools see both identities, each with its run 1.
    let ids = journal.identities().unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids[1]
        .describe()
        .contains("https://a.example/api, instance 3"));
    assert!(!format!("{ids:?}").contains("wsrc_"));
}

#[test]
fn runs_in_flight_without_identity_are_adopted_terminal_ones_are_not() {
    let (_tmp, dir) = copy_fixture("inflight");
    let journal = SledJournal::open(&dir).unwrap();
    let me = JournalIdentity::new("http://127.0.0.1:1/api", "wsrc_x", None);
    let scoped = journal.scoped(&me).unwrap();
    let active = scoped.active().unwrap();
    assert_eq!(active.iter().map(Slot::run_id).collect::<Vec<_>>(), vec![1]);
    drop((scoped, journal));
    let (_tmp2, dir2) = copy_fixture("terminal");
    let journal = SledJournal::open(&dir2).unwrap();
    let scoped = journal.scoped(&me).unwrap();
    assert!(scoped.run_ids().unwrap().is_empty());
    // Run 1 ended under no identity: for this identity it is a new run.
    finish_run(&scoped, 1, 5).unwrap();
}

#[test]
fn the_size_budget_keeps_a_flood_of_terminal_runs_under_it_and_never_prunes_a_run_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let journal = SledJournal::open(&tmp.path().join("j")).unwrap();
    let budget: u64 = 8 << 20;
    journal.set_size_budget(Some(budget));
    let scoped = journal
        .scoped(&JournalIdentity::new(
            "https://ws/api",
            "wsrc_budget",
            Some(1),
        ))
        .unwrap();
    // A run in flight from the start.
    let claimed = commit_event(&scoped, None, Event::Claimed { plan: plan(1) }, 0, None).unwrap();
    let mut max_seen = 0;
    for run in 2..3_000 {
        finish_run(&scoped, run, run).unwrap();
        max_seen = max_seen.max(journal.size_on_disk().unwrap());
    }
    assert!(
        max_seen <= budget,
        "the journal grew to {max_seen} bytes, past its {budget}-byte budget"
    );
    let runs = scoped.run_ids().unwrap();
    assert!(
        runs.len() < 2_999,
        "old terminal runs were pruned ({} left)",
        runs.len()
    );
    assert!(runs.contains(&2_999), "the newest terminal run stays");
    let active = scoped.active().unwrap();
    assert_eq!(active.len(), 1, "the run in flight is never pruned");
    assert_eq!(active[0], Slot::Record(claimed.record.unwrap()));
    let first = runs.iter().find(|r| **r != 1).copied().unwrap();
    assert!(first > 2, "pruned oldest first (oldest left: {first})");
}

/// The run that is in flight when the runner dies (right after its claim is journaled).
const INFLIGHT_PROMPT: &str = r#"commit file=work.txt msg="agent work"; finish completed "kept""#;
/// The run timeout of a resumed fixture run: it counts from the claim, which the fixture
/// recorded when it was written (with the default 7h30m the resumed run timed out as soon as
/// the fixture was that old).
const FIXTURE_RUN_TIMEOUT: &str = "876000h";
/// The runner name of the fixtures' runner (part of container names).
const FIXTURE_RUNNER: &str = "journal-fixture";
/// Where the in-flight fixture's runner kept its journal (and where the upgrade test puts it
/// back: the runner instance name, part of the run's container names, hashes the path).
const INFLIGHT_JOURNAL: &str = "/tmp/wsr-journal-fixture-inflight/journal";

/// Holds the machine-wide lock of the fixtures' runner while alive. Runs of its name share
/// container names (`wsr-journal-fixture-…`), fixed journal paths and a fixed server port,
/// so only one may run at a time, whichever test or checkout starts it: a harness that ends
/// removes every container of the name, another test's running agent included.
struct FixtureRunnerLock(#[allow(dead_code)] std::fs::File);

fn fixture_runner_lock() -> FixtureRunnerLock {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/wsr-journal-fixture.lock")
        .expect("open the fixture lock");
    // SAFETY: flock on a descriptor this function owns; blocks until the lock is free.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    FixtureRunnerLock(file)
}

/// Where the in-flight fixture of `schema` was written (schema 1: [`INFLIGHT_JOURNAL`]); one
/// path per schema (the runs themselves take turns: [`fixture_runner_lock`]).
fn inflight_journal(schema: u32) -> String {
    if schema == 1 {
        INFLIGHT_JOURNAL.to_owned()
    } else {
        format!("/tmp/wsr-journal-fixture-inflight-v{schema}/journal")
    }
}

/// The devserver address of the in-flight fixtures from schema 2 on. From schema 2 a run is
/// kept under its identity (the server URL and the credential's fingerprint), so resuming it
/// takes the same `WS_API_URL` and the same credential (`inflight.credential`, a throwaway
/// test secret, beside the fixture).
const INFLIGHT_SERVER: &str = "127.0.0.1:47817";

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
/// by the `claimed` failpoint; its runner's credential in `inflight.credential`) under
/// `$WSR_MAKE_JOURNAL_FIXTURES`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes fixtures; run by hand with WSR_MAKE_JOURNAL_FIXTURES=DIR"]
async fn make_fixtures() {
    let _only_fixture_runner = fixture_runner_lock();
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

    // A fixed server address and a credential registered here: the run's identity, which
    // the upgrade test presents again to resume it.
    let mut h = Harness::start_with("fixture-inflight", |cfg| {
        cfg.listen = INFLIGHT_SERVER.parse().unwrap();
    })
    .await;
    h.name = FIXTURE_RUNNER.into();
    let credential = {
        let core = h.dev().core().clone();
        core.register(&RegisterBody {
            registration_token: h.token.clone(),
            name: FIXTURE_RUNNER.into(),
        })
        .expect("register")
        .credential
    };
    let id = h.enqueue(INFLIGHT_PROMPT);
    // A fixed journal path: the runner's instance name (in container names) hashes it, so
    // the upgrade test resumes the run with the journal at the same path.
    let journal = inflight_journal(SCHEMA_VERSION);
    let _ = std::fs::remove_dir_all(&journal);
    let mut runner = h.runner(&[
        ("WSRUNNER_TEST_CRASH_AFTER", "claimed"),
        ("WSRUNNER_JOURNAL_DIR", journal.as_str()),
        ("WSRUNNER_CREDENTIAL", credential.as_str()),
    ]);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(90)).await, -1);
    assert_eq!(h.run(id).status, "running");
    copy_dir(Path::new(&journal), &out.join("inflight"));
    std::fs::write(out.join("inflight.credential"), &credential).unwrap();
}

/// Registers the fixtures' runner with `h`'s devserver, claims run `id` for it, and gives the
/// run the token the fixture's journal holds (as if the old runner had claimed it here), and
/// the instance the fixture's credential when there is one (schema 2 on: the run's identity).
/// Returns the instance's credential.
async fn seed_claimed_run(
    h: &mut Harness,
    id: i64,
    fixture_token: &str,
    fixture_credential: Option<&str>,
) -> String {
    let core = h.dev().core().clone();
    let reg = core
        .register(&RegisterBody {
            registration_token: h.token.clone(),
            name: FIXTURE_RUNNER.into(),
        })
        .expect("register");
    core.heartbeat(reg.instance_id).expect("heartbeat");
    assert_eq!(h.enqueue(INFLIGHT_PROMPT), id);
    let job = core.claim(reg.instance_id).expect("claim").expect("a job");
    assert_eq!(job.run_id, id);
    drop(core); // the devserver's database closes only with its last handle
    h.stop_dev().await;
    {
        let db = sled::open(h.tmp.path().join("devserver/db")).unwrap();
        let mut state: serde_json::Value =
            serde_json::from_slice(&db.get("state").unwrap().unwrap()).unwrap();
        state["runs"][id.to_string()]["token_sha256"] =
            windshift_devserver::core::sha256_hex(fixture_token).into();
        if let Some(credential) = fixture_credential {
            state["instances"][reg.instance_id.to_string()]["credential_sha256"] =
                windshift_devserver::core::sha256_hex(credential).into();
        }
        db.insert("state", serde_json::to_vec(&state).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    h.restart_dev().await;
    fixture_credential.map_or(reg.credential, str::to_owned)
}

/// Starts this build on the fixture's journal at `journal` (copied there) as the fixture's
/// instance, and checks that it migrates the journal, resumes run 1 to `succeeded` (pushed
/// and reported by the runner), stops cleanly on SIGTERM, leaves a schema-3 journal and no
/// container.
async fn resume_fixture_run(h: &Harness, credential: &str, journal: &str) {
    let mut runner = h.runner(&[
        ("WSRUNNER_CREDENTIAL", credential),
        ("WSRUNNER_JOURNAL_DIR", journal),
        ("WSRUNNER_RUN_TIMEOUT", FIXTURE_RUN_TIMEOUT),
    ]);
    let run = h.wait_final(1).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert!(run.reported.is_some(), "reported by the runner, not reaped");
    let pushed = h.remote_branch("agent-runs/run-1").expect("pushed");
    assert_eq!(h.subject(&pushed), "agent work");
    assert!(h.log().contains("migrated the journal"), "{}", h.log());
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    let verify = tool(Path::new(journal), &["verify"]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && text.contains("journal schema 3"),
        "{verify:?}"
    );
    assert!(h.containers().is_empty(), "orphans: {:?}", h.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_flight_in_a_v1_journal_is_resumed_to_succeeded_by_this_build() {
    let _only_fixture_runner = fixture_runner_lock();
    let mut h = Harness::start("upgrade-inflight").await;
    h.name = FIXTURE_RUNNER.into();
    // The token the old runner was given, read from a throwaway copy.
    let token = {
        let (_tmp, dir) = copy_fixture("inflight");
        let j = SledJournal::open(&dir).unwrap();
        match j.records(1).unwrap().first() {
            Some(Slot::Record(r)) => r.secrets.as_ref().unwrap().env["WS_TOKEN"].clone(),
            other => panic!("{other:?}"),
        }
    };
    let credential = seed_claimed_run(&mut h, 1, &token, None).await;
    let _ = std::fs::remove_dir_all(INFLIGHT_JOURNAL);
    copy_dir(&fixture("inflight"), Path::new(INFLIGHT_JOURNAL));

    resume_fixture_run(&h, &credential, INFLIGHT_JOURNAL).await;
    let _ = std::fs::remove_dir_all(INFLIGHT_JOURNAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_flight_in_a_v2_journal_is_resumed_to_succeeded_by_this_build() {
    let _only_fixture_runner = fixture_runner_lock();
    // The run is kept under its identity: the same server URL and credential resume it.
    let mut h = Harness::start_with("upgrade-inflight-v2", |cfg| {
        cfg.listen = INFLIGHT_SERVER.parse().unwrap();
    })
    .await;
    h.name = FIXTURE_RUNNER.into();
    let fixture_credential = std::fs::read_to_string(fixture_of(2, "inflight.credential")).unwrap();
    let token = {
        let (_tmp, dir) = copy_fixture_of(2, "inflight");
        let j = SledJournal::open(&dir).unwrap();
        match j.records(1).unwrap().first() {
            Some(Slot::Record(r)) => r.secrets.as_ref().unwrap().env["WS_TOKEN"].clone(),
            other => panic!("{other:?}"),
        }
    };
    let credential = seed_claimed_run(&mut h, 1, &token, Some(fixture_credential.trim())).await;
    let journal = inflight_journal(2);
    let _ = std::fs::remove_dir_all(&journal);
    copy_dir(&fixture_of(2, "inflight"), Path::new(&journal));

    resume_fixture_run(&h, &credential, &journal).await;
    // The resumed run ended: it is packed like any terminal run.
    assert_eq!(raw_runs(Path::new(&journal), "v3.runs").len(), 1);
    let _ = std::fs::remove_dir_all(&journal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_whose_run_ids_start_again_runs_them_with_the_same_journal() {
    let first = Harness::start("ids-first").await;
    let id = first.enqueue(r#"finish completed "first server""#);
    let mut runner = first.runner(&[]);
    assert_eq!(
        first.wait_final(id).await.status,
        "succeeded",
        "{}",
        first.log()
    );
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);

    let second = Harness::start("ids-second").await;
    let journal = first.journal_dir();
    let again = second.enqueue(r#"finish completed "second server""#);
    assert_eq!(again, id, "the second server's ids start again");
    let mut runner = second.runner(&[("WSRUNNER_JOURNAL_DIR", journal.to_str().unwrap())]);
    let run = second.wait_final(again).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", second.log());
    assert_eq!(run.summary, "second server");
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    let list = first.journal_list();
    let rows: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["run_id"] == id)
        .collect();
    assert_eq!(rows.len(), 2, "run {id} of each server: {list}");
    assert_ne!(rows[0]["identity"], rows[1]["identity"]);
}
