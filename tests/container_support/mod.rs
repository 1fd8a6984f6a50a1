//! Shared helpers for the container tests (real Docker daemon, the locally built test agent
//! image from scripts/build-test-agent-image.sh).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use windshift_runner::effects::agent_driver::{self, DriveOptions, DriveResult, DriverOutput};
use windshift_runner::effects::container::{
    ContainerConfig, ContainerSpec, Engine, LaunchKind, LABEL_INSTANCE,
};
use windshift_runner::fsm::contract::AgentSignal;

pub const IMAGE: &str = "windshift-test-agent:dev";
pub const IMAGE_UNLABELED: &str = "windshift-test-agent:unlabeled";
pub const IMAGE_WRONG_LABEL: &str = "windshift-test-agent:v0";

/// The container CLI the tests drive: `docker` unless `WSR_TEST_ENGINE` names another
/// (scripts/test-podman.sh runs the container tests again with `podman`).
pub fn engine_cli() -> String {
    std::env::var("WSR_TEST_ENGINE")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "docker".into())
}

/// The engine driver of this test pass: `WSRUNNER_ENGINE_DRIVER=cli` (or `api`) forces one,
/// else the API when its socket answers.
pub fn engine_driver() -> windshift_runner::effects::container::DriverChoice {
    use windshift_runner::effects::container::DriverChoice;
    match std::env::var("WSRUNNER_ENGINE_DRIVER").as_deref() {
        Ok("cli") => DriverChoice::Cli,
        Ok("api") => DriverChoice::Api,
        _ => DriverChoice::Auto,
    }
}

/// A command for the tests' own calls to the engine CLI (inspect, ps, rm, diff).
pub fn engine_command() -> std::process::Command {
    std::process::Command::new(engine_cli())
}

/// A runner instance name no other test uses.
pub fn unique_instance(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("t-{tag}-{}-{nanos}", std::process::id())
}

/// Removes every container of the instance when dropped, even when the test panicked.
pub struct Cleanup {
    pub instance: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_instance_containers(&self.instance);
    }
}

pub fn remove_instance_containers(instance: &str) {
    let filter = format!("label={LABEL_INSTANCE}={instance}");
    if let Ok(out) = engine_command()
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    {
        let ids = String::from_utf8_lossy(&out.stdout);
        for id in ids.split_whitespace() {
            let _ = engine_command().args(["rm", "-f", id]).output();
        }
    }
}

/// An engine for a test: `--network none`, small limits so the escape tests are quick.
pub fn test_engine(instance: &str) -> (Engine, Cleanup) {
    let cfg = ContainerConfig {
        network: "none".into(),
        pids_limit: 64,
        memory: "256m".into(),
        cpus: "1".into(),
        default_image: IMAGE.into(),
        instance: instance.to_owned(),
        docker: engine_cli(),
        driver: engine_driver(),
        ..ContainerConfig::default()
    };
    (
        Engine::new(cfg),
        Cleanup {
            instance: instance.to_owned(),
        },
    )
}

/// A git checkout with one commit, owned by 1000:1000 like a prepared run checkout.
pub struct Checkout {
    pub root: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    // The checkout is owned by uid 1000 like a real run checkout; the test runs as root.
    let out = std::process::Command::new("git")
        .args(["-c", "safe.directory=*"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn checkout() -> Checkout {
    let root = tempfile::tempdir().expect("tempdir");
    let path = root.path().join("checkout");
    std::fs::create_dir(&path).expect("mkdir");
    git(&path, &["init", "-q", "-b", "main"]);
    std::fs::write(path.join("README.md"), "base\n").expect("write");
    git(&path, &["add", "README.md"]);
    git(
        &path,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "base",
        ],
    );
    chown_recursive(&path, 1000, 1000);
    Checkout { root, path }
}

pub fn chown_recursive(path: &Path, uid: u32, gid: u32) {
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}"), &path.display().to_string()])
        .status()
        .expect("chown runs");
    assert!(status.success());
}

pub fn spec(run_id: i64, kind: LaunchKind, checkout: Option<&Path>) -> ContainerSpec {
    ContainerSpec {
        run_id,
        attempt: 1,
        kind,
        image: IMAGE.into(),
        env: BTreeMap::new(),
        checkout: checkout.map(Path::to_path_buf),
        extra_args: Vec::new(),
    }
}

/// Everything one drive produced.
pub struct Driven {
    pub outputs: Vec<DriverOutput>,
    pub result: DriveResult,
    pub name: String,
}

impl Driven {
    pub fn signals(&self) -> Vec<AgentSignal> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                DriverOutput::Signal(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
    /// Parsed payloads of the events of one stream.
    pub fn payloads(&self, stream: &str) -> Vec<serde_json::Value> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                DriverOutput::Event {
                    event_type,
                    payload_json,
                    ..
                } if event_type == stream => {
                    Some(serde_json::from_str(payload_json).expect("payloads are valid JSON"))
                }
                _ => None,
            })
            .collect()
    }
    /// Stdout payloads with the given `type`.
    pub fn of_type(&self, kind: &str) -> Vec<serde_json::Value> {
        self.payloads("stdout")
            .into_iter()
            .filter(|p| p.get("type").and_then(|t| t.as_str()) == Some(kind))
            .collect()
    }
}

/// Creates, starts and drives one container running `script`, then returns what happened.
pub async fn run_script(
    engine: &Engine,
    spec: &ContainerSpec,
    script: &str,
    grace: Duration,
) -> Driven {
    let run_dir = tempfile::tempdir().expect("run dir");
    let name = engine.create(spec, run_dir.path()).await.expect("create");
    let with_stdin = spec.kind == LaunchKind::CodingAgent;
    let stdin = agent_driver::start(engine, &name, run_dir.path(), with_stdin)
        .await
        .expect("start");
    let (tx, mut rx) = mpsc::channel(1024);
    let collector = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(o) = rx.recv().await {
            all.push(o);
        }
        all
    });
    let options = DriveOptions {
        prompt: with_stdin.then(|| script.to_owned()),
        grace,
        ..DriveOptions::default()
    };
    let result = agent_driver::drive(
        engine,
        &name,
        stdin,
        options,
        std::future::pending::<()>(),
        tx,
    )
    .await
    .expect("drive");
    let outputs = collector.await.expect("collector");
    Driven {
        outputs,
        result,
        name,
    }
}

/// Polls `check` every 100 ms until it returns true or the deadline passes.
pub async fn wait_until<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `docker ps` (running containers only) lists the name.
pub fn is_running(name: &str) -> bool {
    let out = engine_command()
        .args([
            "ps",
            "--filter",
            &format!("name=^{name}$"),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == name)
}
