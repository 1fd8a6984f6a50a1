//! Shared harness for daemon tests: an in-process devserver, a local git repo behind its git
//! proxy, and the real `windshift-runner` binary as a child process driving real containers
//! of the locally built test agent image.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use windshift_devserver::types::{EnqueueRepo, EnqueueRun, RunView, StoredEvent};
use windshift_devserver::{DevServer, DevServerConfig, RunningDevServer};

pub const IMAGE: &str = "windshift-test-agent:dev";
pub const SLUG: &str = "acme/app";

pub struct Harness {
    pub dev: Option<RunningDevServer>,
    pub tmp: tempfile::TempDir,
    pub pool_id: i64,
    pub token: String,
    pub name: String,
    pub base_commit: String,
    dev_addr: std::net::SocketAddr,
    dev_cfg: DevServerConfig,
    /// Every runner process this harness started, so a failing test does not leak them.
    runners: std::sync::Mutex<Vec<u32>>,
}

/// Runs git in `dir` with a throwaway identity and no user config; panics on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A short unique name for this test (container names, runner names).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{:x}", std::process::id(), nanos)
}

impl Harness {
    pub async fn start(test: &str) -> Harness {
        Self::start_with(test, |_| {}).await
    }

    pub async fn start_with(test: &str, tune: impl FnOnce(&mut DevServerConfig)) -> Harness {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src-repo");
        std::fs::create_dir_all(&src).unwrap();
        git(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("README.md"), "hello\n").unwrap();
        git(&src, &["add", "README.md"]);
        git(&src, &["commit", "-q", "-m", "initial"]);
        let base_commit = git(&src, &["rev-parse", "HEAD"]);

        let mut cfg = DevServerConfig::new(tmp.path().join("devserver"));
        cfg.reaper_interval = Duration::from_secs(1);
        tune(&mut cfg);
        let dev = DevServer::start(cfg.clone())
            .await
            .expect("devserver starts");
        let core = dev.core().clone();
        let (pool, token, _) = core
            .provision("pool", SLUG, &src.display().to_string())
            .await
            .expect("pool, token and repo");
        let dev_addr = dev.addr();
        Harness {
            dev: Some(dev),
            tmp,
            pool_id: pool.id,
            token,
            name: unique(test),
            base_commit,
            dev_addr,
            dev_cfg: cfg,
            runners: Default::default(),
        }
    }

    pub fn dev(&self) -> &RunningDevServer {
        self.dev.as_ref().expect("devserver running")
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.dev_addr)
    }

    pub fn cache_root(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.tmp.path().join("journal")
    }

    pub fn enqueue(&self, prompt: &str) -> i64 {
        self.enqueue_with(prompt, |_| {})
    }

    pub fn enqueue_with(&self, prompt: &str, tune: impl FnOnce(&mut EnqueueRun)) -> i64 {
        let mut req = EnqueueRun {
            pool_id: self.pool_id,
            repos: vec![EnqueueRepo {
                slug: SLUG.into(),
                base_ref: "main".into(),
                continue_branch: String::new(),
            }],
            prompt: prompt.into(),
            image: String::new(),
            kind: String::new(),
            ..Default::default()
        };
        tune(&mut req);
        self.dev().core().enqueue(&req).expect("enqueue").id
    }

    pub fn run(&self, id: i64) -> RunView {
        self.dev().core().run(id).expect("run exists")
    }

    pub fn events(&self, id: i64) -> Vec<StoredEvent> {
        self.dev().core().events(id).expect("events")
    }

    /// The runner binary with the harness's settings; `extra` overrides them.
    pub fn runner(&self, extra: &[(&str, &str)]) -> Child {
        self.runner_args(&[], extra)
    }

    /// The runner binary with extra `run` arguments (e.g. `--once`).
    pub fn runner_args(&self, args: &[&str], extra: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("runner.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_windshift-runner"));
        cmd.arg("run")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WS_API_URL", self.api_url())
            .env("WSRUNNER_ALLOW_INSECURE", "1")
            .env("WSRUNNER_REGISTRATION_TOKEN", &self.token)
            .env("WSRUNNER_IMAGE", IMAGE)
            .env("WSRUNNER_NETWORK", "none")
            .env("WSRUNNER_NAME", &self.name)
            .env("WSRUNNER_CACHE_ROOT", self.cache_root())
            .env("WSRUNNER_JOURNAL_DIR", self.journal_dir())
            .env("WSRUNNER_POLL_INTERVAL", "200ms")
            .env("WSRUNNER_HEARTBEAT_INTERVAL", "1s")
            .env("WSRUNNER_MEMORY", "256m")
            .env("WSRUNNER_CPUS", "1")
            .env("RUST_LOG", "info,windshift_runner=debug")
            .env("WSRUNNER_DOCKER", engine_cli())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Podman's per-host settings (scripts/test-podman.sh) must reach the runner's podman.
        if let Ok(conf) = std::env::var("CONTAINERS_CONF") {
            cmd.env("CONTAINERS_CONF", conf);
        }
        // The engine driver and socket a test pass selects (WSRUNNER_ENGINE_DRIVER=cli tests
        // the CLI driver; scripts/test-podman.sh points CONTAINER_HOST at podman's service).
        // HOME and XDG_RUNTIME_DIR: where rootless Podman keeps its store and its runtime
        // state (scripts/test-podman.sh's rootless leg runs the tests as a non-root user).
        for name in [
            "WSRUNNER_ENGINE_DRIVER",
            "DOCKER_HOST",
            "CONTAINER_HOST",
            "HOME",
            "XDG_RUNTIME_DIR",
        ] {
            if let Ok(value) = std::env::var(name) {
                cmd.env(name, value);
            }
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("runner starts");
        self.runners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        child
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("runner.log")).unwrap_or_default()
    }

    /// Waits until `check` holds for the run, or fails with the runner's log.
    pub async fn wait_run(
        &self,
        id: i64,
        timeout: Duration,
        what: &str,
        check: impl Fn(&RunView) -> bool,
    ) -> RunView {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id);
            if check(&run) {
                return run;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; run: {run:?}\n--- runner log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_final(&self, id: i64) -> RunView {
        self.wait_run(id, Duration::from_secs(120), "a terminal status", |r| {
            !matches!(r.status.as_str(), "queued" | "running")
        })
        .await
    }

    /// The commit the devserver's bare repo has at `branch`, if any.
    pub fn remote_branch(&self, branch: &str) -> Option<String> {
        let repo = self
            .dev()
            .core()
            .repos()
            .into_iter()
            .find(|r| r.slug == SLUG)?;
        let out = Command::new("git")
            .args(["--git-dir", &repo.bare_path, "rev-parse", "--verify", "-q"])
            .arg(format!("refs/heads/{branch}^{{commit}}"))
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `git log` subject of a commit in the devserver's bare repo.
    pub fn subject(&self, sha: &str) -> String {
        let repo = self
            .dev()
            .core()
            .repos()
            .into_iter()
            .find(|r| r.slug == SLUG)
            .unwrap();
        git(
            Path::new(&repo.bare_path),
            &[
                "--git-dir",
                &repo.bare_path,
                "log",
                "-1",
                "--format=%s",
                sha,
            ],
        )
    }

    /// Containers labelled for runner instances of this test (any state).
    pub fn containers(&self) -> Vec<String> {
        let out = Command::new(engine_cli())
            .args(["ps", "-a", "--format", "{{.Names}}"])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|n| n.starts_with(&format!("wsr-{}", self.name)))
            .map(str::to_owned)
            .collect()
    }

    /// Checkouts left under the cache (per-run dirs and multi-repo roots).
    pub fn checkouts(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let runs = self.cache_root().join("1/acme/app/runs");
        for dir in [runs, self.cache_root().join(".workspaces")] {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                found.extend(rd.flatten().map(|e| e.path()));
            }
        }
        found
    }

    pub fn journal_verify(&self) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
            .args(["journal", "--db"])
            .arg(self.journal_dir())
            .arg("verify")
            .output()
            .expect("journal verify runs")
    }
}

impl Harness {
    /// Stops the in-process devserver (its state stays in its data directory).
    pub async fn stop_dev(&mut self) {
        if let Some(dev) = self.dev.take() {
            dev.stop().await;
        }
    }

    /// Starts the devserver again on the same data directory and the same address, so the
    /// runner's `WS_API_URL` still points at it.
    pub async fn restart_dev(&mut self) {
        let mut cfg = self.dev_cfg.clone();
        cfg.listen = self.dev_addr;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match DevServer::start(cfg.clone()).await {
                Ok(dev) => {
                    self.dev = Some(dev);
                    return;
                }
                // The old listener's port may take a moment to be released.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("devserver restart: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("devserver restart failed: {e}"),
            }
        }
    }

    /// Ends a test's last runner with SIGTERM and checks the host is clean: exit 0, no
    /// container or checkout left, `journal verify` clean.
    pub async fn stop_and_check_clean(&self, runner: &mut Child) {
        signal(runner, libc::SIGTERM);
        assert_eq!(
            wait_exit(runner, Duration::from_secs(30)).await,
            0,
            "{}",
            self.log()
        );
        assert!(
            self.containers().is_empty(),
            "orphans: {:?}",
            self.containers()
        );
        assert!(
            self.checkouts().is_empty(),
            "leftovers: {:?}",
            self.checkouts()
        );
        let verify = self.journal_verify();
        assert!(verify.status.success(), "journal verify: {verify:?}");
    }

    /// The devserver instance id of this test's runner (registered under `self.name`).
    pub fn instance_id(&self) -> Option<i64> {
        self.dev()
            .core()
            .instances()
            .into_iter()
            .find(|i| i.name == self.name)
            .map(|i| i.id)
    }

    /// Waits until `check` holds, or fails with `what` and the runner's log.
    pub async fn wait_until(&self, timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\n--- runner log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `journal list --json` of the runner's journal (a copy, so a live runner may hold it).
    pub fn journal_list(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
            .args(["journal", "--copy", "--json", "--db"])
            .arg(self.journal_dir())
            .arg("list")
            .output()
            .expect("journal list runs");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "journal list --json: {e}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// How many times a runner of this test finished start-up (recovery done, loops up).
    pub fn ready_count(&self) -> usize {
        self.log().matches("worker started").count()
    }

    /// Waits until the `n`th runner start-up of this test is done (signals sent earlier
    /// would hit a process that has not installed its handlers yet).
    pub async fn wait_ready(&self, n: usize) {
        self.wait_until(Duration::from_secs(30), "the runner ready", || {
            self.ready_count() >= n
        })
        .await;
    }

    /// The journal's (state, description) of run `id`.
    pub fn journal_state(&self, id: i64) -> Option<(String, String)> {
        let list = self.journal_list();
        let row = list.as_array()?.iter().find(|r| r["run_id"] == id)?.clone();
        Some((
            row["state"].as_str()?.to_owned(),
            row["describe"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// Lifecycle phases the server stored for a run, in order.
    pub fn phases(&self, id: i64) -> Vec<String> {
        self.events(id)
            .iter()
            .filter(|e| e.event_type == "lifecycle")
            .filter_map(|e| {
                serde_json::from_str::<serde_json::Value>(&e.payload_json)
                    .ok()?
                    .get("phase")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Whether the server holds a stdout event of run `id` containing `text`: the agent is
    /// running, so the runner journaled its container as started (a container that exists
    /// but has not started yet is recovered by starting it again, not by a re-attach).
    pub fn agent_printed(&self, id: i64, text: &str) -> bool {
        self.events(id)
            .iter()
            .any(|e| e.event_type == "stdout" && e.payload_json.contains(text))
    }

    /// Whether the runner's container for run `id` exists (any state).
    pub fn has_container_for(&self, id: i64) -> bool {
        self.containers()
            .iter()
            .any(|n| n.contains(&format!("-run-{id}-")))
    }
}

/// The engine CLI the runner under test drives: `docker` unless `WSR_TEST_ENGINE` names
/// another (scripts/test-podman.sh sets `podman`; the runner child inherits
/// `WSRUNNER_DOCKER` from the same script).
pub fn engine_cli() -> String {
    std::env::var("WSR_TEST_ENGINE")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "docker".into())
}

/// A free loopback port (bound and released; the runner binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A plain HTTP/1.0 GET: (status, body); `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The value of a Prometheus sample line starting with `prefix` (name and labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A test that panicked leaves its runners running: kill each one still alive, known
        // by its instance name in its environment (a reused pid belongs to someone else).
        let marker = format!("WSRUNNER_NAME={}", self.name);
        for pid in self
            .runners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let ours = std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
                .unwrap_or(false);
            if ours {
                // SAFETY: kill(2) with a pid we started and a valid signal.
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
        }
        // Remove any container a failed test left behind.
        for name in self.containers() {
            let _ = Command::new(engine_cli())
                .args(["rm", "-f", &name])
                .output();
        }
    }
}

/// Waits for a child to exit within `timeout`; kills it otherwise and panics.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("runner did not exit within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends a signal to a child.
pub fn signal(child: &Child, sig: i32) {
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}
