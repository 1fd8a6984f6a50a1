//! Security issue 11, item 5: the agent decides how many signal lines it prints, and every one
//! that changes the verdict-relevant facts used to be a journal record holding the whole run
//! state (the prompt included): 2,000 short distinct `error` lines with a 100 KB prompt grew
//! the journal by 263 MB. The run task now journals at most `AGENT_RECORD_BUDGET` agent
//! records per container attempt and coalesces the rest, journaled before the exit
//! (docs/journal.md, "Agent output budget"). These tests drive the real daemon, Docker and the
//! devserver: the journal stays small, every line still reaches the server, and the verdict is
//! the one spec 6.5 gives for the last signals, also across a runner crash past the budget.

mod daemon_support;

use std::path::Path;
use std::time::Duration;

use daemon_support::*;
use windshift_runner::fsm::{AGENT_RECORD_BUDGET, MAX_COALESCED_RECORDS};
use windshift_runner::journal::{agent_records, Journal, SledJournal, Slot};

/// The prompt's padding: the size of the prompt every journal record carries in its state.
const PROMPT_PAD: usize = 100_000;

/// Records a run costs besides its agent's: claim, checkout, container start, exit, heads,
/// push, report intent and answer (7 here), with room for a recovery's extra transitions.
const OTHER_RECORDS: usize = 10;

/// Bytes on disk per record of a ~100 KB state (the prompt plus at most two 8 KiB signal
/// texts). sled is log-structured: a flush appends the changed page fragment, and a page
/// consolidation writes the whole leaf again; 16 signal records measured ~229 KB each, so
/// 2.5 times the state leaves a margin without hiding a per-signal leak.
const BYTES_PER_RECORD: u64 = 5 * (PROMPT_PAD as u64 + 16 * 1024) / 2;

/// The journal growth a run may cause whatever its agent prints:
/// (8 + 5 + 10) records × 2.5 × 116 KiB ≈ 6.7 MB, against the 263 MB the flood used to cost
/// (a bound per run that does not depend on how many lines the agent prints).
fn journal_budget() -> u64 {
    (AGENT_RECORD_BUDGET as u64 + MAX_COALESCED_RECORDS as u64 + OTHER_RECORDS as u64)
        * BYTES_PER_RECORD
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A script that pads the prompt to ~100 KB with one harmless event line first.
fn padded(script: &str) -> String {
    format!("event pad filler={}; {script}", "x".repeat(PROMPT_PAD))
}

/// (records of the run, records its agent's output caused), read from the stopped runner's
/// journal.
fn journal_counts(h: &Harness, id: i64) -> (usize, u32) {
    let journal = SledJournal::open_existing(&h.journal_dir()).expect("journal opens");
    let slots = journal.records(id).expect("records");
    let containers: Vec<String> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Record(r) => match &r.state {
                windshift_runner::fsm::RunState::Running { container, .. } => {
                    Some(container.name.clone())
                }
                _ => None,
            },
            Slot::Quarantined(q) => panic!("quarantined record {q:?}"),
        })
        .collect();
    let mut names = containers.clone();
    names.dedup();
    let agent = names.iter().map(|n| agent_records(&slots, n)).sum();
    (slots.len(), agent)
}

/// Error lines of the agent the server stored (each distinct line at least once).
fn error_lines(h: &Harness, id: i64) -> std::collections::BTreeSet<String> {
    h.events(id)
        .iter()
        .filter(|e| e.event_type == "stdout")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.payload_json).ok())
        .filter(|v| v["type"] == "error")
        .filter_map(|v| v["message"].as_str().map(str::to_owned))
        .collect()
}

async fn wait_final_long(h: &Harness, id: i64) -> windshift_devserver::types::RunView {
    // 2,000 events at the instance's 20 requests/s take about 100 s to deliver, and the
    // verdict goes out only after them.
    h.wait_run(id, Duration::from_secs(300), "a terminal status", |r| {
        !matches!(r.status.as_str(), "queued" | "running")
    })
    .await
}

async fn stop(h: &Harness, mut runner: std::process::Child) {
    signal(&runner, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut runner, Duration::from_secs(60)).await,
        0,
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_flood_costs_a_bounded_journal_and_the_last_finish_decides() {
    let h = Harness::start("budget-flood").await;
    let runner = h.runner(&[]);
    h.wait_ready(1).await;
    let before = dir_size(&h.journal_dir());
    let id = h.enqueue(&padded(
        r#"errflood 2000 bytes=200; commit file=work.txt msg="agent work";
           finish completed "done after the flood""#,
    ));
    let run = wait_final_long(&h, id).await;
    let grown = dir_size(&h.journal_dir()).saturating_sub(before);

    // Spec 6.5 row 6: a finish (completed) decides, whatever errors came before it.
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert_eq!(run.summary, "done after the flood");
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{id}"))
        .expect("the agent's work was pushed");
    assert_eq!(h.subject(&pushed), "agent work");
    // The budget bounds the journal, not what the server sees: every error line arrived.
    assert_eq!(error_lines(&h, id).len(), 2000, "{}", h.log());
    assert!(
        h.log().contains("reached its journal budget"),
        "the budget was reached\n{}",
        h.log()
    );
    assert!(
        grown < journal_budget(),
        "the journal grew by {grown} bytes, over the budget of {} bytes",
        journal_budget()
    );
    stop(&h, runner).await;

    let (records, agent) = journal_counts(&h, id);
    assert!(
        agent as usize <= AGENT_RECORD_BUDGET as usize + MAX_COALESCED_RECORDS,
        "the agent's output caused {agent} records"
    );
    assert!(
        records <= AGENT_RECORD_BUDGET as usize + MAX_COALESCED_RECORDS + OTHER_RECORDS,
        "{records} records"
    );
    let verify = h.journal_verify();
    assert!(verify.status.success(), "journal verify: {verify:?}");
    eprintln!(
        "journal growth {grown} bytes (budget {}), {records} records, {agent} from the agent",
        journal_budget()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_flood_without_finish_reports_the_last_error() {
    let h = Harness::start("budget-errors").await;
    let runner = h.runner(&[]);
    let id = h.enqueue(&padded("errflood 300 bytes=64"));
    let run = wait_final_long(&h, id).await;
    // Spec 6.5 row 5: the last error, although it came long after the budget was spent.
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert!(
        run.error
            .starts_with("agent error: agent error number 299 "),
        "{run:?}\n{}",
        h.log()
    );
    stop(&h, runner).await;
    let (_, agent) = journal_counts(&h, id);
    assert!(
        agent as usize <= AGENT_RECORD_BUDGET as usize + MAX_COALESCED_RECORDS,
        "{agent}"
    );
}

/// The coalesced signals live in memory until the exit. The runner is killed after it read
/// (and delivered) the agent's finish past the budget, so the next runner skips that line
/// (its saved progress is past it): it must see that the journal's budget is spent and fold
/// the container's whole stdout again, or the finish is lost and the run fails on the last
/// error. `harvest`: the container exits while no runner watches (recovery replays its logs);
/// otherwise it still runs (recovery re-attaches).
async fn crash_past_the_budget(harvest: bool) {
    let h = Harness::start(if harvest {
        "budget-harvest"
    } else {
        "budget-reattach"
    })
    .await;
    let mut first = h.runner(&[]);
    // The sleep outlasts the delivery of the flood (~10 s at 20 requests/s).
    let script = if harvest {
        r#"errflood 300 bytes=64; finish completed "finished before the crash";
           sleep 20000; exit 0"#
    } else {
        r#"errflood 300 bytes=64; finish completed "finished before the crash"; sleep 40000"#
    };
    let id = h.enqueue(&padded(script));
    // The finish's raw stdout line: every stdout line is one stored event here (no content
    // lines to merge), so it is the number of stdout events up to the finish.
    let finish_line = {
        let mut line = 0;
        h.wait_until(Duration::from_secs(120), "the finish delivered", || {
            let events = h.events(id);
            let stdout: Vec<_> = events.iter().filter(|e| e.event_type == "stdout").collect();
            match stdout
                .iter()
                .position(|e| e.payload_json.contains(r#""type":"finish""#))
            {
                Some(i) => {
                    line = i as u64 + 1;
                    true
                }
                None => false,
            }
        })
        .await;
        line
    };
    let container = h
        .containers()
        .into_iter()
        .find(|n| n.contains(&format!("-run-{id}-")))
        .expect("the run's container");
    let progress = h
        .cache_root()
        .join(".containers")
        .join(&container)
        .join("forwarded-lines");
    h.wait_until(
        Duration::from_secs(30),
        "the saved progress past the finish line",
        || {
            std::fs::read_to_string(&progress)
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
                .is_some_and(|n| n >= finish_line)
        },
    )
    .await;
    let _ = first.kill();
    let _ = first.wait();
    let (_, agent_before) = journal_counts(&h, id);
    assert_eq!(
        agent_before, AGENT_RECORD_BUDGET,
        "the budget was spent and nothing past it journaled before the crash"
    );

    if harvest {
        h.wait_until(
            Duration::from_secs(60),
            "the agent exited unwatched",
            || {
                let out = std::process::Command::new(engine_cli())
                    .args(["inspect", "--format", "{{.State.Status}}", &container])
                    .output()
                    .expect("inspect");
                String::from_utf8_lossy(&out.stdout).trim() == "exited"
            },
        )
        .await;
    }

    let runner = h.runner(&[]);
    let run = wait_final_long(&h, id).await;
    let decision = if harvest { "harvest_exit" } else { "reattach" };
    assert!(
        h.log().contains(&format!("decision=\"{decision}\"")),
        "{}",
        h.log()
    );
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert_eq!(run.summary, "finished before the crash");
    stop(&h, runner).await;
    let (_, agent) = journal_counts(&h, id);
    assert!(
        agent as usize <= AGENT_RECORD_BUDGET as usize + MAX_COALESCED_RECORDS,
        "the budget counted the first process's records too: {agent}"
    );
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    let verify = h.journal_verify();
    assert!(verify.status.success(), "journal verify: {verify:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_past_the_budget_keeps_the_coalesced_finish_on_reattach() {
    crash_past_the_budget(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_past_the_budget_keeps_the_coalesced_finish_on_replay() {
    crash_past_the_budget(true).await;
}
