//! The verdict table (spec 6.5) through the real daemon: each row with the test agent in a
//! real container, plus a per-run image outside the allow-list and an action_container run.

mod daemon_support;

use std::collections::BTreeMap;
use std::time::Duration;

use daemon_support::*;

struct Row {
    name: &'static str,
    prompt: &'static str,
    env: &'static [(&'static str, &'static str)],
    image: &'static str,
    kind: &'static str,
    status: &'static str,
    /// The reported error starts with this.
    error: &'static str,
}

const ROWS: &[Row] = &[
    Row {
        name: "row 2: exit 0 without a contract event",
        prompt: "exit 0",
        env: &[("WSR_TEST_AGENT_SILENT", "1")],
        image: "",
        kind: "",
        status: "failed",
        error: "agent subprocess exited without emitting a single JSONL contract event",
    },
    Row {
        name: "row 3: a line over 1 MiB",
        prompt: r#"bigline 2000000; finish completed "after the big line""#,
        env: &[],
        image: "",
        kind: "",
        status: "failed",
        error: "agent event stream degraded",
    },
    Row {
        name: "row 4: finish blocked",
        prompt: r#"finish blocked "why""#,
        env: &[],
        image: "",
        kind: "",
        status: "failed",
        error: "agent blocked: why",
    },
    Row {
        name: "row 5: error without finish",
        prompt: "error boom",
        env: &[],
        image: "",
        kind: "",
        status: "failed",
        error: "agent error: boom",
    },
    Row {
        name: "row 7: non-zero exit",
        prompt: "exit 3",
        env: &[],
        image: "",
        kind: "",
        status: "failed",
        error: "agent subprocess exited with code 3",
    },
    Row {
        name: "image outside the allow-list",
        prompt: r#"finish completed "never runs""#,
        env: &[],
        image: "windshift-test-agent:v0",
        kind: "",
        status: "failed",
        error: "image windshift-test-agent:v0 is not in the runner image allowlist",
    },
    Row {
        name: "ci_task with an image outside the allow-list (issue 11)",
        prompt: "",
        env: &[],
        image: "windshift-test-agent:v0",
        kind: "ci_task",
        status: "failed",
        error: "image windshift-test-agent:v0 is not in the runner image allowlist",
    },
    Row {
        name: "action_container with a flag for an image (issue 11)",
        prompt: "",
        env: &[],
        image: "--privileged",
        kind: "action_container",
        status: "failed",
        error: "the job's image \"--privileged\" is not an image reference",
    },
    Row {
        name: "action_container: exit 0 succeeds",
        prompt: "",
        env: &[],
        image: IMAGE,
        kind: "action_container",
        status: "succeeded",
        error: "",
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdict_table_rows_through_the_daemon() {
    let h = Harness::start("verdicts").await;
    let ids: Vec<(i64, &Row)> = ROWS
        .iter()
        .map(|row| {
            let id = h.enqueue_with(row.prompt, |req| {
                req.env = row
                    .env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>();
                req.image = row.image.into();
                req.kind = row.kind.into();
            });
            (id, row)
        })
        .collect();
    let mut runner = h.runner(&[("WSRUNNER_CONCURRENCY", "3")]);
    for (id, row) in &ids {
        let run = h.wait_final(*id).await;
        assert_eq!(run.status, row.status, "{}: {run:?}\n{}", row.name, h.log());
        assert!(
            run.error.starts_with(row.error),
            "{}: error {:?} should start with {:?}",
            row.name,
            run.error,
            row.error
        );
        assert!(
            run.reported.is_some(),
            "{}: reported by the runner",
            row.name
        );
        assert_eq!(run.branch, "", "{}: no branch on a failed run", row.name);
    }
    h.stop_and_check_clean(&mut runner).await;
}

/// Row 6: completed with a commit → succeeded with the branch; completed without a change →
/// succeeded without a branch and a `no_changes` lifecycle event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_runs_succeed_with_or_without_a_branch() {
    let h = Harness::start("verdict-ok").await;
    let changed = h.enqueue(r#"commit file=r6.txt msg="row six"; finish completed "changed""#);
    let unchanged = h.enqueue(r#"say "nothing to do"; finish completed "no change""#);
    let mut runner = h.runner(&[("WSRUNNER_CONCURRENCY", "2")]);

    let run = h.wait_final(changed).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    let branch = format!("agent-runs/run-{changed}");
    assert_eq!(run.branch, branch);
    let head = h.remote_branch(&branch).expect("pushed");
    assert_eq!(h.subject(&head), "row six");
    assert!(h.phases(changed).contains(&"pushed".to_owned()));

    let run = h.wait_final(unchanged).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    assert_eq!(run.summary, "no change");
    assert_eq!(run.branch, "", "no branch without a change");
    assert!(h
        .remote_branch(&format!("agent-runs/run-{unchanged}"))
        .is_none());
    let phases = h.phases(unchanged);
    assert!(phases.contains(&"no_changes".to_owned()), "{phases:?}");
    assert!(!phases.contains(&"pushed".to_owned()), "{phases:?}");

    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}

/// Security issue 11: an agent printing past WSRUNNER_AGENT_OUTPUT_LIMIT is stopped at once
/// (its `hang` would outlast any grace) and the run fails naming the variable, while the
/// server got only the output up to the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_limit_fails_the_run_naming_the_variable() {
    let h = Harness::start("verdict-limit").await;
    let id = h.enqueue("flood 20000; hang");
    let mut runner = h.runner(&[("WSRUNNER_AGENT_OUTPUT_LIMIT", "64k")]);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "failed", "{run:?}\n{}", h.log());
    assert!(
        run.error.starts_with("agent subprocess exited with code 137: last agent error: the agent printed more than 65536 bytes of output (WSRUNNER_AGENT_OUTPUT_LIMIT)"),
        "{:?}",
        run.error
    );
    let events = h.events(id);
    let text: String = events.iter().map(|e| e.payload_json.as_str()).collect();
    assert!(
        text.len() < 200_000,
        "only about the limit was forwarded: {}",
        text.len()
    );
    assert!(
        text.contains("[runner] the agent printed more than 65536 bytes"),
        "{text:.2000}"
    );
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    assert!(h.containers().is_empty(), "{:?}", h.containers());
}
