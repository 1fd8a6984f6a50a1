//! Finding F5 (docs/RELIABILITY.md): agent output the runner had read and queued for the
//! server, but not yet delivered, when it was SIGKILLed must still reach the server. The
//! server is slowed down so the event sender falls behind the agent's flood, the runner is
//! killed (failpoint) once the agent's exit is journaled, and a second runner with the server
//! healthy must replay the rest from the container's logs before acting on its recovery
//! decision: every agent line arrives, in order, before the run's later lifecycle events, and
//! the run ends with one verdict reported by the runner and no container left.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;
use windshift_devserver::types::{Faults, StoredEvent};

/// Content events the agent prints at once (seq 0..FLOOD-1).
const FLOOD: u64 = 120;
/// Per-request server latency while the first runner works: with the client's pacing the
/// flood takes tens of seconds to deliver, far longer than the agent takes to finish.
const LATENCY_MS: u64 = 200;

fn set_faults(h: &Harness, faults: Faults) {
    *h.dev()
        .core()
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = faults;
}

fn payload(e: &StoredEvent) -> serde_json::Value {
    serde_json::from_str(&e.payload_json).unwrap_or_default()
}

/// The agent's stdout events (the runner forwards each line as one).
fn agent_lines(events: &[StoredEvent]) -> Vec<(usize, serde_json::Value)> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event_type == "stdout")
        .map(|(i, e)| (i, payload(e)))
        .collect()
}

fn flood_seqs(events: &[StoredEvent]) -> Vec<u64> {
    agent_lines(events)
        .into_iter()
        .filter(|(_, v)| v["type"] == "content")
        .filter_map(|(_, v)| v["seq"].as_u64())
        .collect()
}

/// Where the server stored the lifecycle event with `phase` (first one).
fn phase_at(events: &[StoredEvent], phase: &str) -> Option<usize> {
    events
        .iter()
        .position(|e| e.event_type == "lifecycle" && payload(e)["phase"] == phase)
}

fn container_status(name: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["inspect", "--format", "{{.State.Status}}", name])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Checks that every agent line reached the server in the order the agent printed it. The
/// first runner delivered a prefix; the replay resumes at the saved progress, which may
/// repeat part of that prefix (at-least-once) but never skips or reorders a line.
fn assert_agent_output_complete(h: &Harness, id: i64, events: &[StoredEvent], idle: bool) {
    let seqs = flood_seqs(events);
    // The flood as stored: 0..k from the first runner, then j..FLOOD from the replay, j <= k.
    let restart = seqs
        .windows(2)
        .position(|w| w[1] != w[0] + 1)
        .map_or(seqs.len(), |i| i + 1);
    let (first, second) = seqs.split_at(restart);
    let first_ok = first.iter().enumerate().all(|(i, s)| *s == i as u64);
    let second_ok = second.first().is_none_or(|j| *j as usize <= first.len())
        && second.windows(2).all(|w| w[1] == w[0] + 1);
    let ok = first_ok && second_ok && seqs.last() == Some(&(FLOOD - 1));
    assert!(
        ok,
        "run {id}: the flood must arrive whole and in order (a replayed prefix allowed), got {seqs:?}\n{}",
        h.log()
    );

    // Every agent line, by first arrival, in the order the agent printed it.
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<(usize, serde_json::Value)> = agent_lines(events)
        .into_iter()
        .filter(|(_, v)| seen.insert(v.to_string()))
        .collect();
    let kinds: Vec<String> = firsts
        .iter()
        .map(|(_, v)| v["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut want = vec!["lifecycle".to_owned(), "starting".to_owned()];
    want.extend((0..FLOOD).map(|_| "content".to_owned()));
    want.extend(["tool_start", "tool_done", "finish"].map(str::to_owned));
    if idle {
        want.push("session_idle".to_owned());
    }
    assert_eq!(
        kinds,
        want,
        "run {id}: every agent line arrives once at least, in order\n{}",
        h.log()
    );

    // Nothing the runner emits after the agent's output overtakes it.
    let last_line = agent_lines(events).last().map(|(i, _)| *i).unwrap();
    let terminal = phase_at(events, "succeeded").expect("a terminal event");
    assert!(
        last_line < terminal,
        "run {id}: an agent line arrived after the verdict\n{events:?}"
    );
    if let Some(pushed) = phase_at(events, "pushed") {
        assert!(
            last_line < pushed,
            "run {id}: an agent line arrived after `pushed`\n{events:?}"
        );
    }
}

async fn replay_after_crash(point: &str, decision: &str) {
    // Crash once the finish is journaled, the agent exiting on its own (no session_idle): the
    // container has exited when the next runner looks, and no exit was journaled.
    let harvest = decision == "harvest_exit";
    let prompt = if harvest {
        format!(
            r#"flood {FLOOD}; commit file=work.txt msg="agent work"; finish completed "kept"; exit 0"#
        )
    } else {
        format!(r#"flood {FLOOD}; commit file=work.txt msg="agent work"; finish completed "kept""#)
    };
    let h = Harness::start(&format!("replay-{}", decision.replace('_', "-"))).await;
    set_faults(
        &h,
        Faults {
            added_latency_ms: LATENCY_MS,
            ..Default::default()
        },
    );
    let id = h.enqueue(&prompt);
    let mut first = h.runner(&[("WSRUNNER_TEST_CRASH_AFTER", point)]);
    let code = wait_exit(&mut first, Duration::from_secs(120)).await;
    assert_eq!(code, -1, "killed by the failpoint at {point}\n{}", h.log());
    assert!(
        h.log().contains("test failpoint reached"),
        "the failpoint {point} was reached\n{}",
        h.log()
    );
    // The precondition of the finding: the sender was behind when the runner died.
    let delivered = flood_seqs(&h.events(id)).len() as u64;
    assert!(
        delivered < FLOOD,
        "the slowed server had not received the whole flood at the crash ({delivered})"
    );
    assert_eq!(h.run(id).status, "running", "not final before the restart");
    if harvest {
        let containers = h.containers();
        let name = containers.first().expect("the run's container").clone();
        h.wait_until(
            Duration::from_secs(60),
            "the agent container exited",
            || container_status(&name) == "exited",
        )
        .await;
    }

    set_faults(&h, Faults::default());
    let mut second = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert!(
        h.log().contains(&format!("decision=\"{decision}\""))
            || h.log().contains(&format!("decision={decision}")),
        "recovery decided {decision} after a crash at {point}\n{}",
        h.log()
    );
    assert!(
        h.log()
            .contains("replayed the container's output past the saved progress"),
        "recovery replayed the container's output\n{}",
        h.log()
    );
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert!(run.reported.is_some(), "reported by the runner, not reaped");
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{id}"))
        .expect("the agent's work was pushed");
    assert_eq!(h.subject(&pushed), "agent work");

    let events = h.events(id);
    let terminal = events
        .iter()
        .filter(|e| e.event_type == "lifecycle")
        .filter(|e| {
            ["succeeded", "failed", "canceled", "killed"]
                .iter()
                .any(|p| payload(e)["phase"] == *p)
        })
        .count();
    assert_eq!(terminal, 1, "one terminal event\n{events:?}");
    assert!(
        events
            .iter()
            .filter(|e| e.event_type == "lifecycle" && payload(e)["phase"] == "pushed")
            .count()
            <= 1,
        "no duplicate push announcement"
    );
    assert_agent_output_complete(&h, id, &events, !harvest);

    h.stop_and_check_clean(&mut second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_output_is_replayed_when_the_exited_container_is_harvested() {
    replay_after_crash("agent_signal:finish", "harvest_exit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_output_is_replayed_before_heads_are_inspected_again() {
    replay_after_crash("container_exited", "redo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_output_is_replayed_before_pushing_again() {
    replay_after_crash("heads_inspected", "push_again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_output_is_replayed_before_reporting_again() {
    replay_after_crash("push_done", "report_again").await;
}

/// A clean stop (drain past its deadline) while the report waits for the queued flood: the
/// run stays journaled, the progress saved is exactly what the server answered, and the next
/// start replays only the rest: every line arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_during_the_report_replays_the_rest_without_repeats() {
    let h = Harness::start("replay-drain").await;
    set_faults(
        &h,
        Faults {
            added_latency_ms: LATENCY_MS,
            ..Default::default()
        },
    );
    let id = h.enqueue(&format!(
        r#"flood {FLOOD}; commit file=work.txt msg="agent work"; finish completed "kept""#
    ));
    let mut first = h.runner(&[("WSRUNNER_DRAIN_TIMEOUT", "1s")]);
    h.wait_until(
        Duration::from_secs(120),
        "the report phase (waiting for the queued events)",
        || h.log().contains("event=push_done"),
    )
    .await;
    signal(&first, libc::SIGTERM);
    assert_eq!(wait_exit(&mut first, Duration::from_secs(60)).await, 0);
    assert!(
        h.log().contains("run left in the journal"),
        "the drain left the run for the next start\n{}",
        h.log()
    );
    let delivered = flood_seqs(&h.events(id)).len() as u64;
    assert!(
        delivered < FLOOD,
        "the slowed server had not received the whole flood at the stop ({delivered})"
    );
    assert_eq!(h.run(id).status, "running", "not final before the restart");

    set_faults(&h, Faults::default());
    let mut second = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert!(
        h.log().contains("decision=\"report_again\"") || h.log().contains("decision=report_again"),
        "{}",
        h.log()
    );
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert!(run.reported.is_some(), "reported by the runner, not reaped");
    let events = h.events(id);
    assert_eq!(
        flood_seqs(&events),
        (0..FLOOD).collect::<Vec<_>>(),
        "every flood line exactly once, in order\n{}",
        h.log()
    );
    assert_agent_output_complete(&h, id, &events, true);

    signal(&second, libc::SIGTERM);
    assert_eq!(wait_exit(&mut second, Duration::from_secs(30)).await, 0);
    assert!(h.containers().is_empty(), "orphans: {:?}", h.containers());
    assert!(h.checkouts().is_empty(), "leftovers: {:?}", h.checkouts());
}

/// The runner is down while the agent finishes and exits: recovery harvests the exit
/// (`harvest_exit`), and the finish line the dead process never read must still decide the
/// verdict. The replay feeds the signals it finds to the state machine while the run is
/// still in its container phase; a signal the journal already holds is folded again with
/// the same result (a finish or an error: the last one wins; idle and degraded stick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_printed_while_the_runner_was_down_decides_the_verdict() {
    let h = Harness::start("down-finish").await;
    let id = h.enqueue(
        r#"say working; sleep 4000; commit file=late.txt msg="while the runner was down"; finish completed "finished unseen"; exit 0"#,
    );
    let mut runner = h.runner(&[]);
    h.wait_until(Duration::from_secs(60), "the agent working", || {
        h.events(id)
            .iter()
            .any(|e| e.payload_json.contains("working"))
    })
    .await;
    let _ = runner.kill();
    let _ = runner.wait();
    h.wait_until(
        Duration::from_secs(60),
        "the agent to finish and exit unwatched",
        || {
            h.containers()
                .iter()
                .any(|n| n.contains(&format!("-run-{id}-")) && container_status(n) == "exited")
        },
    )
    .await;

    let mut runner = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert!(h.log().contains("decision=\"harvest_exit\""), "{}", h.log());
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert_eq!(run.summary, "finished unseen");
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{id}"))
        .expect("branch pushed");
    assert_eq!(h.subject(&pushed), "while the runner was down");
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(60)).await, 0);
    assert!(h.containers().is_empty(), "{:?}", h.containers());
    let verify = h.journal_verify();
    assert!(verify.status.success(), "{verify:?}");
}
