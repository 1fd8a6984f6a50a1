//! A host configured with the guide's Option A names (`CODING_AGENT_*`) through the real
//! daemon: the image and network come from them, and the host's model id reaches an agent
//! whose claim has no `LLM_MODEL`, never replacing one the server sent.

mod daemon_support;

use std::process::Command;
use std::time::Duration;

use daemon_support::*;

/// The `LLM_MODEL` the test agent saw, from its `env` event as the devserver recorded it.
fn agent_model(h: &Harness, id: i64) -> Option<serde_json::Value> {
    h.events(id)
        .iter()
        .filter(|e| e.event_type == "stdout")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.payload_json).ok())
        .find(|v| v.get("type").and_then(|t| t.as_str()) == Some("env"))
        .and_then(|v| v.get("vars")?.get("LLM_MODEL").cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_a_names_configure_the_runner_and_the_model_id_fills_only_a_gap() {
    let h = Harness::start("option-a").await;
    let prompt = r#"env LLM_MODEL; finish completed "looked""#;
    let without = h.enqueue(prompt);
    let with_server_model = h.enqueue_with(prompt, |req| {
        req.env
            .insert("LLM_MODEL".into(), "model-from-server".into());
    });
    let mut runner = h.runner(&[
        // The runner's own names empty (= unset): the Option A ones apply.
        ("WSRUNNER_IMAGE", ""),
        ("WSRUNNER_NETWORK", ""),
        ("CODING_AGENT_RUNNER_IMAGE", IMAGE),
        ("CODING_AGENT_NETWORK", "none"),
        ("CODING_AGENT_LLM_MODEL", "model-from-host"),
    ]);
    for id in [without, with_server_model] {
        let run = h.wait_final(id).await;
        assert_eq!(run.status, "succeeded", "{run:?}\n{}", h.log());
    }
    assert_eq!(
        agent_model(&h, without),
        Some("model-from-host".into()),
        "{:?}",
        h.events(without)
    );
    assert_eq!(
        agent_model(&h, with_server_model),
        Some("model-from-server".into()),
        "{:?}",
        h.events(with_server_model)
    );
    let log = h.log();
    for want in [
        "image from CODING_AGENT_RUNNER_IMAGE",
        "network from CODING_AGENT_NETWORK",
        "llm-model from CODING_AGENT_LLM_MODEL",
    ] {
        assert!(log.contains(want), "{want}:\n{log}");
    }
    assert!(!log.contains("exit with code 2 unless"), "{log}");
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);

    // The added model id is journaled with the plan, like the server's env.
    let export = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(["journal", "--db"])
        .arg(h.journal_dir())
        .arg("export")
        .output()
        .expect("journal export runs");
    assert!(export.status.success(), "{export:?}");
    let text = String::from_utf8_lossy(&export.stdout);
    assert!(text.contains(r#""LLM_MODEL":"model-from-host""#), "{text}");
    assert!(
        text.contains(r#""LLM_MODEL":"model-from-server""#),
        "{text}"
    );
}

/// A bad Option A value stops the runner like the runner's own would: exit 78, naming the
/// Option A variable.
#[test]
fn a_bad_option_a_value_is_a_configuration_error_naming_it() {
    for (var, value) in [
        ("CODING_AGENT_WORKTREE_ROOT", "relative/coding-agent"),
        ("CODING_AGENT_CPUS", "lots"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
            .arg("run")
            .env_clear()
            .env("WS_API_URL", "https://windshift.invalid/api")
            .env(var, value)
            .output()
            .expect("runner runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{var}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid {var} {value:?}")),
            "{var}: {stderr}"
        );
    }
}
