//! Journal performance report (docs/PERFORMANCE.md):
//! 1. per-transition commit latency (one sled transaction + blocking flush) against a raw
//!    4 KiB write + fsync in the same directory, measured in the same run;
//! 2. journal open time (open + read the active-runs index, what start-up does) with 100,000
//!    terminal and 100 active runs (`JOURNAL_BENCH_TERMINAL` changes the terminal count), and
//!    its size on disk per run (`du -sb`).
//!
//! `cargo run --release --example journal_bench -- [DIR] [ROUNDS]`
//! DIR defaults to a fresh dir under target/ (the same disk as the build); ROUNDS to 3.
//! Each round prints its numbers; the last lines are the medians across rounds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use windshift_runner::control::wire::{JobSpec, RepoSpec};
use windshift_runner::fsm::{self, Checkout, CheckoutRepo, Event, RepoHead, RunPlan};
use windshift_runner::journal::{commit_event, Journal, Record, SledJournal, SCHEMA_VERSION};

const TRANSITIONS: usize = 2_000;
/// Default number of terminal runs in the start-up journal (`JOURNAL_BENCH_TERMINAL`).
const TERMINAL_RUNS: i64 = 100_000;
const ACTIVE_RUNS: i64 = 100;
const OPENS: usize = 5;

fn plan(run_id: i64) -> RunPlan {
    let mut job = JobSpec {
        run_id,
        // Server prompts carry a persona and a skills index: a few KiB is typical.
        initial_prompt: "Fix the failing test and explain the change. ".repeat(100),
        repos: vec![RepoSpec {
            workspace_id: 1,
            slug: "acme/app".into(),
            base_ref: "main".into(),
            continue_branch: String::new(),
        }],
        ..Default::default()
    };
    job.env
        .insert("WS_TOKEN".into(), "bench-token-0123456789".into());
    job.env
        .insert("WS_API_URL".into(), "https://ws.example/api".into());
    RunPlan::from_job(&job, "bench").0
}

/// A full run: claim → prepare → container → finish → push → report (11 transitions).
fn events(plan: &RunPlan) -> Vec<Event> {
    let sig = |l: &str| Event::AgentSignal {
        signal: fsm::contract::classify_stdout_line(l).unwrap_or(fsm::AgentSignal::SessionIdle),
    };
    let head = vec![RepoHead {
        slug: "acme/app".into(),
        head: "2".repeat(40),
    }];
    vec![
        Event::Claimed { plan: plan.clone() },
        Event::CheckoutReady {
            checkout: Checkout {
                root: "/cache/run".into(),
                repos: vec![CheckoutRepo {
                    slug: "acme/app".into(),
                    path: "/cache/run".into(),
                    branch: plan.branch_for(&plan.repos[0]),
                    base_commit: "1".repeat(40),
                }],
            },
        },
        Event::ContainerStarted,
        sig(r#"{"type":"starting"}"#),
        sig(r#"{"type":"error","message":"transient"}"#),
        sig(r#"{"type":"finish","outcome":"completed","summary":"fixed"}"#),
        sig(r#"{"type":"session_idle"}"#),
        Event::ContainerExited { code: Some(0) },
        Event::HeadsInspected {
            heads: head.clone(),
        },
        Event::PushDone { heads: head },
        Event::ReportAccepted,
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// p50 and p99 of commit_event (transaction + flush) over TRANSITIONS transitions.
fn commit_latency(dir: &Path) -> (Duration, Duration) {
    let j = SledJournal::open(&dir.join("latency")).expect("open");
    let mut samples = Vec::with_capacity(TRANSITIONS);
    let mut run = 1;
    while samples.len() < TRANSITIONS {
        let p = plan(run);
        let mut last: Option<Record> = None;
        for event in events(&p) {
            let t = Instant::now();
            let c = commit_event(&j, last.as_ref(), event, 0, None).expect("commit");
            let dt = t.elapsed();
            if c.record.is_some() {
                samples.push(dt);
            }
            last = c.record.or(last);
        }
        run += 1;
    }
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// p50 and p99 of a raw 4 KiB write + fsync (append to one file, like a WAL).
fn raw_fsync_latency(dir: &Path) -> (Duration, Duration) {
    let mut f = std::fs::File::create(dir.join("raw.bin")).expect("create");
    let block = vec![0xabu8; 4096];
    let mut samples = Vec::with_capacity(TRANSITIONS);
    for _ in 0..TRANSITIONS {
        let t = Instant::now();
        f.write_all(&block).expect("write");
        f.sync_all().expect("fsync");
        samples.push(t.elapsed());
    }
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// Builds the terminal + 100 active journal once (one flush per run), then times
/// open + active() OPENS times and returns the median, and the time the build took.
fn open_time(dir: &Path, terminal_runs: i64) -> (Duration, usize) {
    let path = dir.join("open");
    let built = Instant::now();
    {
        let j = SledJournal::open(&path).expect("open");
        for run in 1..=(terminal_runs + ACTIVE_RUNS) {
            let p = plan(run);
            let evs = events(&p);
            let upto = if run > terminal_runs { 4 } else { evs.len() };
            let mut last: Option<Record> = None;
            for event in &evs[..upto] {
                let (state, _) = fsm::apply(last.as_ref().map(|r| &r.state), event).expect("legal");
                if last.as_ref().is_some_and(|l| l.state == state) {
                    continue;
                }
                let record = Record {
                    schema: SCHEMA_VERSION,
                    run_id: run,
                    seq: last.as_ref().map_or(1, |r| r.seq + 1),
                    at_ms: 0,
                    event: event.clone(),
                    state,
                    secrets: None,
                };
                j.append(&record).expect("append");
                last = Some(record);
            }
            // One flush per run, as a runner flushes every commit (flushing every 1,000 runs
            // instead left sled 0.34.7 deadlocked in a flush twice while building 100,000).
            j.flush().expect("flush");
        }
        j.flush().expect("flush");
    }
    let size = std::process::Command::new("du")
        .arg("-sb")
        .arg(&path)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let bytes: f64 = size
        .split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or(0.0);
    println!(
        "built the start-up journal ({terminal_runs} terminal + {ACTIVE_RUNS} active runs) in {:.1} s: {size} ({:.1} KiB on disk per run)",
        built.elapsed().as_secs_f64(),
        bytes / 1024.0 / (terminal_runs + ACTIVE_RUNS) as f64
    );
    let mut times = Vec::new();
    let mut active = 0;
    for _ in 0..OPENS {
        let t = Instant::now();
        let j = SledJournal::open(&path).expect("open");
        active = j.active().expect("active").len();
        times.push(t.elapsed());
        drop(j);
    }
    times.sort();
    (times[times.len() / 2], active)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir: PathBuf = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/journal-bench"));
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(3);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    println!(
        "journal bench in {} ({rounds} rounds, {TRANSITIONS} samples each)",
        dir.display()
    );
    let (mut c50, mut c99, mut r50, mut r99) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        let rd = dir.join(format!("round-{round}"));
        std::fs::create_dir_all(&rd).expect("round dir");
        let (rp50, rp99) = raw_fsync_latency(&rd);
        let (cp50, cp99) = commit_latency(&rd);
        println!(
            "round {round}: commit p50 {:.0} us p99 {:.0} us | raw 4KiB write+fsync p50 {:.0} us p99 {:.0} us",
            us(cp50), us(cp99), us(rp50), us(rp99)
        );
        c50.push(us(cp50));
        c99.push(us(cp99));
        r50.push(us(rp50));
        r99.push(us(rp99));
    }
    let terminal_runs: i64 = std::env::var("JOURNAL_BENCH_TERMINAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TERMINAL_RUNS);
    let (open, active) = open_time(&dir, terminal_runs);
    println!(
        "median: commit p50 {:.0} us, p99 {:.0} us; raw write+fsync p50 {:.0} us, p99 {:.0} us",
        median(c50),
        median(c99),
        median(r50),
        median(r99)
    );
    println!(
        "open + read active index, {terminal_runs} terminal + {ACTIVE_RUNS} active runs: median of {OPENS} = {:.1} ms ({active} active found)",
        open.as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
}
