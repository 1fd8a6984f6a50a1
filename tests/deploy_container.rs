//! The runner container image as operators deploy it (deploy/Dockerfile, deploy/compose.yml):
//! built offline on this machine, run with the Docker socket and the same-path state mount
//! against the in-process devserver, it completes a real run whose agent container is a
//! sibling on the host daemon; killed and restarted mid-run, it recovers the run.
//!
//! The runner container uses `--network host` so it reaches the devserver on 127.0.0.1; the
//! agent containers use `WSRUNNER_NETWORK=none` (the test agent needs no network).

mod daemon_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use daemon_support::*;

const RUNNER_IMAGE: &str = "windshift-runner:local";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs")
}

/// Builds (or confirms up to date) the runner image with the project's own script.
async fn build_image() {
    let out = tokio::task::spawn_blocking(|| {
        Command::new(repo_root().join("scripts/build-runner-image.sh"))
            .current_dir(repo_root())
            .env("RUNNER_TAG", RUNNER_IMAGE)
            .output()
            .expect("build-runner-image.sh runs")
    })
    .await
    .expect("build thread");
    assert!(
        out.status.success(),
        "building the runner image failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The runner container, removed on drop.
struct RunnerContainer {
    name: String,
}

impl RunnerContainer {
    /// Starts the image like deploy/compose.yml does: socket, same-path state volume,
    /// restart policy. Secrets go through the docker CLI's environment, never its argv.
    fn start(h: &Harness, state: &Path) -> RunnerContainer {
        let name = unique("wsr-runner-ctr");
        let state_mount = format!("{0}:{0}", state.display());
        let settings = [
            ("WS_API_URL", h.api_url()),
            ("WSRUNNER_ALLOW_INSECURE", "1".into()),
            ("WSRUNNER_IMAGE", IMAGE.into()),
            ("WSRUNNER_NETWORK", "none".into()),
            ("WSRUNNER_NAME", h.name.clone()),
            (
                "WSRUNNER_CACHE_ROOT",
                state.join("cache").display().to_string(),
            ),
            (
                "WSRUNNER_JOURNAL_DIR",
                state.join("journal").display().to_string(),
            ),
            ("WSRUNNER_POLL_INTERVAL", "200ms".into()),
            ("WSRUNNER_HEARTBEAT_INTERVAL", "1s".into()),
            ("WSRUNNER_MEMORY", "256m".into()),
            ("WSRUNNER_CPUS", "1".into()),
            ("RUST_LOG", "info,windshift_runner=debug".into()),
        ];
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d", "--name", &name, "--network", "host"])
            .args(["--restart", "unless-stopped"])
            .args(["-v", "/var/run/docker.sock:/var/run/docker.sock"])
            .args(["-v", &state_mount])
            // Passed by name: the CLI takes the value from its own environment.
            .args(["-e", "WSRUNNER_REGISTRATION_TOKEN"])
            .env("WSRUNNER_REGISTRATION_TOKEN", &h.token);
        for (key, value) in &settings {
            cmd.args(["-e", &format!("{key}={value}")]);
        }
        let out = cmd
            .arg(RUNNER_IMAGE)
            .arg("run")
            .output()
            .expect("docker run");
        assert!(out.status.success(), "docker run: {out:?}");
        RunnerContainer { name }
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text
    }

    fn started_at(&self) -> String {
        let out = docker(&["inspect", "--format", "{{.State.StartedAt}}", &self.name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RunnerContainer {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    logs: impl Fn() -> String,
    check: impl Fn() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n--- runner container log ---\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for a terminal status; on timeout fails with the runner container's log.
async fn wait_final(
    h: &Harness,
    runner: &RunnerContainer,
    id: i64,
) -> windshift_devserver::types::RunView {
    wait_for(
        &format!("run {id} to finish"),
        Duration::from_secs(180),
        || format!("{:?}\n{}", h.run(id), runner.logs()),
        || !matches!(h.run(id).status.as_str(), "queued" | "running"),
    )
    .await;
    h.run(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_image_completes_a_run_and_recovers_one_across_a_restart() {
    build_image().await;
    let h = Harness::start("ctr").await;
    // The same absolute path on the host and in the runner container: the host daemon
    // bind-mounts each checkout into the agent container by this path.
    let state = h.tmp.path().join("var-lib-windshift-runner");
    std::fs::create_dir_all(&state).unwrap();
    let runner = RunnerContainer::start(&h, &state);

    // 1. A run end to end: registered, claimed, prepared, agent container, pushed, reported.
    let first =
        h.enqueue(r#"say "hi"; commit file=one.txt msg="from the image"; finish completed "ok""#);
    let run = wait_final(&h, &runner, first).await;
    assert_eq!(run.status, "succeeded", "{run:?}\n{}", runner.logs());
    assert!(run.reported.is_some(), "reported by the runner");
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{first}"))
        .expect("branch pushed");
    assert_eq!(h.subject(&pushed), "from the image");
    // The credential was persisted on the volume (a restart needs no new token).
    assert!(state.join("cache/credential").is_file());

    // 2. A run whose agent is sleeping (its first line reached the server, so the prompt was
    //    delivered) when the runner container is killed. The test agent's `sleep` ends at
    //    once on stdin EOF, and after its script it waits for EOF: only a session that kept
    //    its stdin through the kill says "after the restart" and commits three.txt.
    let second = h.enqueue(
        r#"commit file=two.txt msg="before the restart"; say "sleeping now"; sleep 6000; say "after the restart"; commit file=three.txt msg="after the restart"; finish completed "kept""#,
    );
    wait_for(
        "the second run's agent to be sleeping",
        Duration::from_secs(120),
        || runner.logs(),
        || {
            h.events(second)
                .iter()
                .any(|e| e.payload_json.contains("sleeping now"))
        },
    )
    .await;
    let before = runner.started_at();
    // SIGKILL (no drain): a crash. The restart policy may bring it back by itself; `start`
    // makes sure it is, as an operator would.
    let out = docker(&["kill", &runner.name]);
    assert!(out.status.success(), "docker kill: {out:?}");
    let out = docker(&["start", &runner.name]);
    assert!(out.status.success(), "docker start: {out:?}");
    assert_ne!(
        runner.started_at(),
        before,
        "the runner container restarted"
    );

    let run = wait_final(&h, &runner, second).await;
    let logs = runner.logs();
    assert_eq!(run.status, "succeeded", "{run:?}\n{logs}");
    assert!(run.reported.is_some(), "reported by the runner, not reaped");
    // The restarted runner took the run over from its journal and attached again to the
    // agent, which never saw EOF (the API driver: no process held its stdin) and finished
    // its session: all its output arrived once and its last commit is pushed.
    let decision = "recovering run";
    assert!(
        logs.lines().any(|l| l.contains(decision)
            && l.contains(&format!("run_id={second}"))
            && l.contains("decision=\"reattach\"")),
        "the restarted runner re-attached to run {second}\n{logs}"
    );
    let events = h.events(second);
    let count = |line: &str| {
        events
            .iter()
            .filter(|e| e.event_type == "stdout")
            .filter(|e| {
                serde_json::from_str::<serde_json::Value>(&e.payload_json)
                    .is_ok_and(|v| v["type"] == "content" && v["text"] == line)
            })
            .count()
    };
    // Delivered before the kill; at least once across a crash (the saved progress may lag the
    // last delivered event), so it may come again.
    assert!(count("sleeping now") >= 1, "{logs}");
    // Printed while the restarted runner drove the live session: exactly once.
    assert_eq!(count("after the restart"), 1, "{logs}");
    let pushed = h
        .remote_branch(&format!("agent-runs/run-{second}"))
        .expect("branch pushed after the restart");
    assert_eq!(h.subject(&pushed), "after the restart");
    // Registered once: the restart reused the stored credential.
    assert_eq!(h.dev().core().instances().len(), 1, "one instance");

    // 3. Stopped cleanly: no orphan agent container, the journal verifies.
    let out = docker(&["stop", "--time", "60", &runner.name]);
    assert!(out.status.success(), "docker stop: {out:?}");
    wait_for(
        "agent containers to be removed",
        Duration::from_secs(30),
        || runner.logs(),
        || h.containers().is_empty(),
    )
    .await;
    let runs = state.join("cache/1/acme/app/runs");
    let left: Vec<_> = std::fs::read_dir(&runs)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "checkouts left: {left:?}");
    let verify = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(["journal", "--db"])
        .arg(state.join("journal"))
        .arg("verify")
        .output()
        .expect("journal verify runs");
    assert!(verify.status.success(), "journal verify: {verify:?}");
    assert!(
        !runner.logs().contains(&h.token),
        "the registration token reached the log"
    );
}

/// deploy/compose.yml keeps what Windshift's example requires (checked as text: no YAML
/// parser or compose binary is assumed on the test host).
#[test]
fn the_compose_file_matches_windshifts_example() {
    let compose = std::fs::read_to_string(repo_root().join("deploy/compose.yml")).unwrap();
    let active: Vec<&str> = compose
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    for needed in [
        "restart: unless-stopped",
        "- /var/run/docker.sock:/var/run/docker.sock",
        "- /var/lib/windshift-runner:/var/lib/windshift-runner",
        "WS_API_URL: https://windshift.example.com/api",
        "WSRUNNER_REGISTRATION_TOKEN: wsrt_your_one_time_token",
        "WSRUNNER_IMAGE: ghcr.io/windshiftapp/windshift-agent:latest",
        "WSRUNNER_CREDENTIAL_FILE: /var/lib/windshift-runner/cache/credential",
        "stop_grace_period: 11m",
    ] {
        assert!(active.contains(&needed), "compose.yml lacks {needed:?}");
    }
}
