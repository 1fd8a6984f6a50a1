//! Real-sled crash test: the test binary re-executes itself as a child that journals
//! transitions and dies abruptly (process::exit without destructors, SIGKILL from itself,
//! abort, or SIGKILL from the parent) at a random moment. The parent reopens the journal and
//! checks that every record the child reported as flushed is there, sequences are contiguous,
//! and `journal verify` is clean. 200 iterations by default; set WSR_CRASH_ITERATIONS for more.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use windshift_runner::fsm::{self, RunState};
use windshift_runner::journal::tools::verify;
use windshift_runner::journal::{commit_event, Journal, Record, SledJournal, Slot, SCHEMA_VERSION};

const CHILD_DB: &str = "WSR_CRASH_CHILD_DB";
const CHILD_SEED: &str = "WSR_CRASH_CHILD_SEED";

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The child's body. Runs only when re-executed by the parent (it is `#[ignore]`d so the
/// normal run skips it).
#[test]
#[ignore = "child process of journal_crash_recovery; runs only when re-executed"]
fn crash_child() {
    let (Ok(db), Ok(seed)) = (std::env::var(CHILD_DB), std::env::var(CHILD_SEED)) else {
        return;
    };
    let mut rng = Rng(seed.parse::<u64>().unwrap_or(1) | 1);
    let journal = SledJournal::open(Path::new(&db)).expect("child opens the journal");
    let mut last: std::collections::BTreeMap<i64, Record> = Default::default();
    let mut next_run = 1;
    for run in journal.run_ids().unwrap() {
        next_run = next_run.max(run + 1);
        if let Some(Slot::Record(r)) = journal.records(run).unwrap().pop() {
            if !r.state.is_terminal() {
                last.insert(run, r);
            }
        }
    }
    let steps = 1 + rng.below(25);
    let mut out = std::io::stdout().lock();
    for step in 0..steps + 1000 {
        let run = if last.is_empty() || rng.below(4) == 0 {
            next_run += 1;
            next_run - 1
        } else {
            *last
                .keys()
                .nth(rng.below(last.len() as u64) as usize)
                .unwrap()
        };
        let (plan, secrets) = common::plan_and_secrets(run);
        let prev = last.get(&run);
        let choices = common::plausible_events(&plan, prev.map(|r| &r.state));
        let event = choices[rng.below(choices.len() as u64) as usize].clone();
        if step == steps {
            // The abrupt end: sometimes right after an append that was never flushed.
            if let Ok((state, _)) = fsm::apply(prev.map(|r| &r.state), &event) {
                let record = Record {
                    schema: SCHEMA_VERSION,
                    run_id: run,
                    seq: prev.map_or(1, |r| r.seq + 1),
                    at_ms: windshift_runner::journal::now_ms(),
                    event,
                    state,
                    secrets: None,
                };
                let _ = journal.append(&record);
            }
            match rng.below(4) {
                0 => std::process::exit(0),
                1 => unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                },
                2 => std::process::abort(),
                // 3: keep going until the parent kills us.
                _ => {}
            }
            continue;
        }
        if let Ok(committed) = commit_event(
            &journal,
            prev,
            event,
            windshift_runner::journal::now_ms(),
            Some(secrets),
        ) {
            if let Some(record) = committed.record {
                writeln!(out, "flushed {} {}", record.run_id, record.seq).unwrap();
                out.flush().unwrap();
                if record.state.is_terminal() {
                    last.remove(&run);
                } else {
                    last.insert(run, record);
                }
            }
        }
    }
    std::process::exit(0);
}

#[test]
fn journal_crash_recovery() {
    let iterations: u64 = std::env::var("WSR_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let mut db = dir.path().join("journal-0");
    let exe = std::env::current_exe().unwrap();
    let base_seed = std::env::var("WSR_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 7919);
    let mut flushed: Vec<(i64, u64)> = Vec::new();
    let mut parent_rng = Rng(base_seed | 1);
    for i in 0..iterations {
        let seed = base_seed.wrapping_add(i * 104_729);
        // A fresh database every 25 iterations keeps each reopen (and verify) small while
        // still restarting on top of earlier crashes most of the time.
        if i % 25 == 0 {
            db = dir.path().join(format!("journal-{}", i / 25));
            flushed.clear();
        }
        let mut child = Command::new(&exe)
            .args([
                "crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, &db)
            .env(CHILD_SEED, seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("re-execute the test binary");
        let kill_after = 1 + parent_rng.below(30);
        let reader = BufReader::new(child.stdout.take().unwrap());
        let mut seen = 0;
        for line in reader.lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            if parts.next() != Some("flushed") {
                continue;
            }
            let run: i64 = parts.next().unwrap().parse().unwrap();
            let seq: u64 = parts.next().unwrap().parse().unwrap();
            flushed.push((run, seq));
            seen += 1;
            if seen == kill_after {
                let _ = child.kill();
                break;
            }
        }
        let status = child.wait().unwrap();
        let _ = status;

        let journal = SledJournal::open(&db)
            .unwrap_or_else(|e| panic!("iteration {i} (seed {seed}): reopen failed: {e}"));
        for &(run, seq) in &flushed {
            let slots = journal.records(run).unwrap();
            assert!(
                slots
                    .iter()
                    .any(|s| matches!(s, Slot::Record(r) if r.seq == seq)),
                "iteration {i} (seed {seed}): flushed record run {run} seq {seq} is missing"
            );
        }
        let findings = verify(&journal, 14, windshift_runner::journal::now_ms()).unwrap();
        assert!(
            findings.is_empty(),
            "iteration {i} (seed {seed}): verify found {findings:#?}"
        );
        drop(journal);
    }
    assert!(
        !flushed.is_empty(),
        "the children flushed nothing: the test exercised nothing"
    );
    // Runs reached terminal states, so the ended index and absorb rules were exercised.
    let journal = SledJournal::open(&db).unwrap();
    let terminal = journal
        .run_ids()
        .unwrap()
        .into_iter()
        .filter(|r| {
            matches!(journal.records(*r).unwrap().last(),
                Some(Slot::Record(rec)) if matches!(rec.state, RunState::Reported { .. } | RunState::Failed { .. }))
        })
        .count();
    assert!(terminal > 0 || iterations < 25);
}
