//! Crash recovery through the real daemon: the runner is killed (SIGKILL) right after each
//! durable state is journaled, restarted, and must finish the run with exactly one verdict
//! that it reports itself, without losing the agent's work, pushing twice or leaving a
//! container or checkout behind.

mod daemon_support;

use std::time::Duration;

use daemon_support::*;

/// The agent sleeps first so the container is still running when the runner dies.
const PROMPT: &str =
    r#"sleep 1500; commit file=work.txt msg="agent work"; finish completed "kept""#;

async fn crash_then_restart(point: &str, decision: &str) {
    crash_then_restart_when(point, decision, false).await;
}

/// `agent_exits_meanwhile`: the restart waits until the agent has finished and exited while
/// no runner watched it.
async fn crash_then_restart_when(point: &str, decision: &str, agent_exits_meanwhile: bool) {
    let h = Harness::start(&format!("crash-{}", point.replace('_', "-"))).await;
    // An agent that ends by itself once its script is done (not on the runner's stdin EOF).
    let exiting = format!("{PROMPT}; exit 0");
    let id = h.enqueue(if agent_exits_meanwhile {
        &exiting
    } else {
        PROMPT
    });
    let mut first = h.runner(&[("WSRUNNER_TEST_CRASH_AFTER", point)]);
    let code = wait_exit(&mut first, Duration::from_secs(90)).await;
    assert_eq!(code, -1, "killed by the failpoint at {point}\n{}", h.log());
    assert!(
        h.log().contains("test failpoint reached"),
        "the failpoint {point} was reached\n{}",
        h.log()
    );
    assert_eq!(h.run(id).status, "running", "not final before the restart");
    if agent_exits_meanwhile {
        h.wait_until(Duration::from_secs(60), "the agent exited", || {
            h.containers().iter().any(|name| {
                let out = std::process::Command::new(engine_cli())
                    .args(["inspect", "-f", "{{.State.Status}}", name])
                    .output()
                    .expect("engine inspect");
                String::from_utf8_lossy(&out.stdout).trim() == "exited"
            })
        })
        .await;
    }

    let mut second = h.runner(&[]);
    let run = h.wait_final(id).await;
    assert!(
        h.log().contains(&format!("decision=\"{decision}\""))
            || h.log().contains(&format!("decision={decision}")),
        "recovery decided {decision} after a crash at {point}\n{}",
        h.log()
    );
    assert_eq!(
        run.status,
        "succeeded",
        "after a crash at {point}: {run:?}\n{}",
        h.log()
    );
    assert!(run.reported.is_some(), "reported by the runner, not reaped");
    let branch = format!("agent-runs/run-{id}");
    assert_eq!(run.branch, branch);
    let pushed = h
        .remote_branch(&branch)
        .expect("the agent's work was pushed");
    assert_eq!(h.subject(&pushed), "agent work");

    // Exactly one verdict and one push announcement on the server.
    let events = h.events(id);
    let phase_count = |phase: &str| {
        events
            .iter()
            .filter(|e| e.event_type == "lifecycle")
            .filter(|e| e.payload_json.contains(&format!("\"phase\":\"{phase}\"")))
            .count()
    };
    assert_eq!(phase_count("succeeded"), 1, "one terminal event");
    assert!(phase_count("pushed") <= 1, "no duplicate push announcement");

    h.stop_and_check_clean(&mut second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_claim_prepares_again() {
    crash_then_restart("claimed", "prepare_again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_prepare_starts_the_container() {
    crash_then_restart("checkout_ready", "start_container_again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_the_container_runs_reattaches_and_keeps_the_work() {
    crash_then_restart("container_started", "reattach").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_container_exited_harvests_and_pushes() {
    crash_then_restart("container_exited", "redo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_with_the_push_intent_pushes_once() {
    crash_then_restart("heads_inspected", "push_again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_push_reports_again() {
    crash_then_restart("push_done", "report_again").await;
}

/// Found by the simulation (docs/simulation.md): the runner dies after the container started
/// and before that start is journaled, and the agent prints its finish and exits while no
/// runner watches. Recovery harvests the exit; the agent's signals, read again from its logs,
/// decide the verdict (before the fix: "exited without a single JSONL contract event").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_the_start_is_journaled_judges_the_exit_on_the_agents_output() {
    crash_then_restart_when("container-started-unjournaled", "harvest_exit", true).await;
}
