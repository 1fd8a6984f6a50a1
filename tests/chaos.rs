//! Chaos suite (issue 7): the real `windshift-runner` binary against the devserver with the
//! test agent in real containers, under injected faults, with invariants checked after every
//! iteration from the devserver's records, Docker, the cache directory and the journal.
//!
//! Knobs (environment):
//! - `WSR_CHAOS_ITERATIONS` (default 20, the CI size);
//! - `WSR_CHAOS_SEED` (default: from the clock; always printed, and printed again on failure);
//! - `WSR_CHAOS_LONG=1`: long mode (outages up to 3 minutes, a 60 s lease window);
//! - `WSR_CHAOS_MAX_MINUTES`: stop after the iteration that crosses this budget;
//! - `WSR_CHAOS_FIRST_ITERATION=<n>`: resume a seed's run at iteration n (earlier plans are
//!   drawn, not run);
//! - `WSR_CHAOS_SUMMARY=<file>`: also write the summary table there;
//!
//! Long run: `WSR_CHAOS_LONG=1 WSR_CHAOS_ITERATIONS=500 cargo test --release --test chaos --
//! --nocapture` (see docs/RELIABILITY.md, "Chaos").

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use windshift_devserver::types::{EnqueueRepo, EnqueueRun, Faults, RunView};
use windshift_devserver::{DevServer, DevServerConfig, RunningDevServer};

const IMAGE: &str = "windshift-test-agent:dev";
const SLUG: &str = "acme/app";
const LABEL_INSTANCE: &str = "org.windshift.runner.instance";
/// What the runner logs when it yields its lease (src/daemon/mod.rs, F6).
const LEASE_YIELD_LINE: &str = "yielding the lease";
const TERMINAL: [&str; 4] = ["succeeded", "failed", "canceled", "killed"];
const REAPED: &str = "runner lease expired (missed heartbeat)";
/// The cache tmpfs size: small, so filling it is quick, big enough for the test repo.
// mode=0750: a tmpfs root is 1777 by default, which the runner refuses as a cache root.
const CACHE_TMPFS: &str = "size=48m,mode=0750";

/// xorshift64*: a tiny seeded PRNG, so a seed replays the same fault plan.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Sigkill,
    Error5xx,
    Storm429,
    DroppedConnections,
    Latency,
    Outage,
    DevserverRestart,
    Cancel,
    ForceCancel,
    SigtermDrain,
    DiskFull,
}

/// One step of an iteration's timeline, at a delay from the previous step.
#[derive(Debug, Clone)]
enum Step {
    Kill { down_ms: u64 },
    FaultsOn { faults: Faults },
    FaultsOff,
    OutageFor { secs: u64 },
    RestartDevserver { down_ms: u64 },
    Cancel { which: usize, force: bool },
    Drain,
    ReleaseDisk,
}

struct RunRecord {
    id: i64,
    tag: String,
    flood: u64,
    iteration: usize,
}

struct Chaos {
    tmp: tempfile::TempDir,
    dev: Option<RunningDevServer>,
    dev_cfg: DevServerConfig,
    addr: SocketAddr,
    pool_id: i64,
    token: String,
    name: String,
    cache_root: PathBuf,
    journal_dir: PathBuf,
    log_path: PathBuf,
    runner: Option<Child>,
    /// When the current runner process was spawned.
    spawned_at: Instant,
    tmpfs: bool,
    liveness: Duration,
}

fn git(dir: &Path, args: &[&str]) -> String {
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

impl Chaos {
    async fn start(liveness: Duration) -> Chaos {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = tmp.path().join("src-repo");
        std::fs::create_dir_all(&src).expect("src dir");
        git(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("README.md"), "chaos\n").expect("write");
        git(&src, &["add", "README.md"]);
        git(&src, &["commit", "-q", "-m", "initial"]);

        let mut dev_cfg = DevServerConfig::new(tmp.path().join("devserver"));
        dev_cfg.liveness_window = liveness;
        dev_cfg.reaper_interval = Duration::from_secs(1);
        let dev = DevServer::start(dev_cfg.clone())
            .await
            .expect("devserver starts");
        let addr = dev.addr();
        // A restart must come back on the same address: the runner keeps its WS_API_URL.
        dev_cfg.listen = addr;
        let core = dev.core().clone();
        let (pool, token, _) = core
            .provision("chaos", SLUG, &src.display().to_string())
            .await
            .expect("pool, token and repo");

        let cache_root = tmp.path().join("cache");
        std::fs::create_dir_all(&cache_root).expect("cache dir");
        let tmpfs = mount_tmpfs(&cache_root);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Chaos {
            journal_dir: tmp.path().join("journal"),
            log_path: tmp.path().join("runner.log"),
            name: format!("chaos-{}-{nanos:x}", std::process::id()),
            tmp,
            dev: Some(dev),
            dev_cfg,
            addr,
            pool_id: pool.id,
            token,
            cache_root,
            runner: None,
            spawned_at: Instant::now(),
            tmpfs,
            liveness,
        }
    }

    fn dev(&self) -> &RunningDevServer {
        self.dev.as_ref().expect("devserver running")
    }

    fn start_runner(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("runner log");
        let child = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WS_API_URL", format!("http://{}/api", self.addr))
            .env("WSRUNNER_ALLOW_INSECURE", "1")
            .env("WSRUNNER_REGISTRATION_TOKEN", &self.token)
            .env("WSRUNNER_IMAGE", IMAGE)
            .env("WSRUNNER_NETWORK", "none")
            .env("WSRUNNER_NAME", &self.name)
            .env("WSRUNNER_CACHE_ROOT", &self.cache_root)
            .env("WSRUNNER_JOURNAL_DIR", &self.journal_dir)
            .env("WSRUNNER_POLL_INTERVAL", self.poll_interval())
            .env("WSRUNNER_HEARTBEAT_INTERVAL", "1s")
            .env("WSRUNNER_DRAIN_TIMEOUT", "3s")
            // The lease yield (F6) must outlast this devserver's liveness window.
            .env(
                "WSRUNNER_LEASE_YIELD",
                format!("{}s", self.liveness.as_secs() + 5),
            )
            .env("WSRUNNER_CONCURRENCY", "2")
            .env("WSRUNNER_MEMORY", "256m")
            .env("WSRUNNER_CPUS", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("runner starts");
        self.runner = Some(child);
        self.spawned_at = Instant::now();
    }

    fn signal_runner(&self, sig: i32) {
        if let Some(child) = &self.runner {
            // SAFETY: kill(2) on the pid of a child we own and have not reaped yet.
            unsafe {
                libc::kill(child.id() as i32, sig);
            }
        }
    }

    /// Waits for the runner to exit; `None` if it did not within `timeout` (then killed).
    async fn wait_runner_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.runner.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn restart_devserver(&mut self, down: Duration) {
        if let Some(dev) = self.dev.take() {
            dev.stop().await;
        }
        tokio::time::sleep(down).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match DevServer::start(self.dev_cfg.clone()).await {
                Ok(dev) => {
                    self.dev = Some(dev);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("chaos: devserver restart retry: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("devserver cannot restart on {}: {e}", self.addr),
            }
        }
    }

    fn set_faults(&self, faults: Faults) {
        *self
            .dev()
            .core()
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = faults;
    }

    fn enqueue(&self, prompt: &str) -> i64 {
        self.dev()
            .core()
            .enqueue(&EnqueueRun {
                pool_id: self.pool_id,
                repos: vec![EnqueueRepo {
                    slug: SLUG.into(),
                    base_ref: "main".into(),
                    continue_branch: String::new(),
                }],
                prompt: prompt.into(),
                ..Default::default()
            })
            .expect("enqueue")
            .id
    }

    fn run(&self, id: i64) -> RunView {
        self.dev().core().run(id).expect("run exists")
    }

    fn bare_repo(&self) -> String {
        self.dev()
            .core()
            .repos()
            .into_iter()
            .find(|r| r.slug == SLUG)
            .expect("repo")
            .bare_path
    }

    /// Every ref in the devserver's bare repository, with its commit subject.
    fn remote_refs(&self) -> BTreeMap<String, String> {
        let bare = self.bare_repo();
        let out = Command::new("git")
            .args([
                "--git-dir",
                &bare,
                "for-each-ref",
                "--format=%(refname) %(subject)",
            ])
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("git for-each-ref");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(r, s)| (r.to_owned(), s.to_owned()))
            .collect()
    }

    /// Containers (any state) labelled for this chaos runner's instance.
    fn containers(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args([
                "ps",
                "-a",
                "--filter",
                &format!("label={LABEL_INSTANCE}"),
                "--format",
                &format!("{{{{.Names}}}} {{{{.Label \"{LABEL_INSTANCE}\"}}}}"),
            ])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(_, inst)| inst.starts_with(&format!("{}-", self.name)))
            .map(|(n, _)| n.to_owned())
            .collect()
    }

    /// Per-run checkouts, multi-repo roots and private container directories left behind.
    fn leftovers(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for dir in [
            self.cache_root.join("1/acme/app/runs"),
            self.cache_root.join(".workspaces"),
            self.cache_root.join(".containers"),
        ] {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                found.extend(rd.flatten().map(|e| e.path()));
            }
        }
        found
    }

    fn filler(&self) -> PathBuf {
        self.cache_root.join("chaos-disk-filler")
    }

    /// Fills the cache file system until the kernel says it is full.
    fn fill_disk(&self) {
        let mut f = std::fs::File::create(self.filler()).expect("filler");
        let chunk = vec![0xa5u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 4096];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
    }

    fn release_disk(&self) {
        let _ = std::fs::remove_file(self.filler());
    }

    fn journal_verify(&self) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
            .args(["journal", "--db"])
            .arg(&self.journal_dir)
            .arg("verify")
            .output()
            .expect("journal verify runs")
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The runner's claim poll: 200 ms in CI mode, to put claims in the way of every fault;
    /// 1 s in long mode, where each lease yield after a kill mid-claim costs the 60 s lease
    /// plus 5 s (the default is 10 s; a kill then lands mid-claim even less often).
    fn poll_interval(&self) -> &'static str {
        if self.liveness > Duration::from_secs(30) {
            "1s"
        } else {
            "200ms"
        }
    }

    /// How many log lines of the runner contain `needle`.
    fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Lines of the runner log saying the server refused the rest of a run's events (409).
    fn dropped_after_verdict(&self, run_id: i64) -> bool {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let key = format!("run_id={run_id}");
        log.lines().any(|l| {
            l.contains("server ended the run")
                && l.match_indices(&key)
                    .any(|(at, _)| !l[at + key.len()..].starts_with(|c: char| c.is_ascii_digit()))
        })
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        if let Some(mut child) = self.runner.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in self.containers() {
            let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        }
        if self.tmpfs {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.cache_root)
                .output();
        }
    }
}

/// Mounts a small tmpfs on the cache root (for the full-disk fault). Logs why when it cannot.
fn mount_tmpfs(dir: &Path) -> bool {
    match Command::new("mount")
        .args(["-t", "tmpfs", "-o", CACHE_TMPFS, "tmpfs"])
        .arg(dir)
        .output()
    {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "chaos: full-disk faults SKIPPED: cannot mount a tmpfs on {} ({})",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("chaos: full-disk faults SKIPPED: cannot run mount ({e})");
            false
        }
    }
}

/// The fault plan of one iteration: what happens, in order, and at which delays.
struct Plan {
    faults: Vec<Fault>,
    disk_full: bool,
    steps: Vec<(u64, Step)>,
    runs: Vec<(String, u64)>,
}

fn draw_plan(rng: &mut Rng, iteration: usize, long: bool, tmpfs: bool) -> Plan {
    let mut faults = Vec::new();
    let mut steps: Vec<(u64, Step)> = Vec::new();
    let count = rng.range(1, 2) as usize;
    let runs = (0..count)
        .map(|k| {
            let flood = rng.range(10, 120);
            let tag = format!("chaos it{iteration} run{k}");
            let sleep = if rng.chance(0.6) {
                format!("sleep {}; ", rng.range(300, 4000))
            } else {
                String::new()
            };
            let prompt = format!(
                "{sleep}flood {flood}; commit file=chaos-{iteration}-{k}.txt msg=\"{tag}\"; finish completed \"ok\""
            );
            (prompt, flood)
        })
        .collect::<Vec<_>>();
    let disk_full = tmpfs && rng.chance(0.08);
    if disk_full {
        faults.push(Fault::DiskFull);
    }
    let mut any = disk_full;
    let mut pick = |p: f64, rng: &mut Rng| {
        let yes = rng.chance(p);
        any |= yes;
        yes
    };
    let kill = pick(0.35, rng);
    let net = pick(0.4, rng);
    let restart = pick(0.12, rng);
    let cancel = pick(0.15, rng);
    let drain = pick(0.12, rng);
    let (kill, net, restart, cancel, drain) = if any {
        (kill, net, restart, cancel, drain)
    } else {
        match rng.range(0, 4) {
            0 => (true, false, false, false, false),
            1 => (false, true, false, false, false),
            2 => (false, false, true, false, false),
            3 => (false, false, false, true, false),
            _ => (false, false, false, false, true),
        }
    };
    if net {
        let fault = match rng.range(0, 4) {
            0 => Fault::Error5xx,
            1 => Fault::Storm429,
            2 => Fault::DroppedConnections,
            3 => Fault::Latency,
            _ => Fault::Outage,
        };
        faults.push(fault);
        let at = rng.range(0, 2500);
        if fault == Fault::Outage {
            let secs = if long && rng.chance(0.1) {
                rng.range(30, 180)
            } else {
                rng.range(1, 5)
            };
            steps.push((at, Step::OutageFor { secs }));
        } else {
            let p = rng.range(20, 60) as f64 / 100.0;
            let faults = Faults {
                error_5xx_probability: if fault == Fault::Error5xx { p } else { 0.0 },
                rate_429_probability: if fault == Fault::Storm429 { p } else { 0.0 },
                drop_connection_probability: if fault == Fault::DroppedConnections {
                    p
                } else {
                    0.0
                },
                added_latency_ms: if fault == Fault::Latency {
                    rng.range(100, 1500)
                } else {
                    0
                },
                outage_until_ms: None,
                only_path_prefix: None,
                ..Faults::default()
            };
            steps.push((at, Step::FaultsOn { faults }));
            steps.push((at + rng.range(1000, 5000), Step::FaultsOff));
        }
    }
    if kill {
        faults.push(Fault::Sigkill);
        let down_ms = rng.range(0, 2000);
        steps.push((rng.range(0, 4500), Step::Kill { down_ms }));
    }
    if restart {
        faults.push(Fault::DevserverRestart);
        let down_ms = rng.range(0, 2000);
        steps.push((rng.range(0, 4000), Step::RestartDevserver { down_ms }));
    }
    if cancel {
        let force = rng.chance(0.4);
        faults.push(if force {
            Fault::ForceCancel
        } else {
            Fault::Cancel
        });
        let which = rng.range(0, count as u64 - 1) as usize;
        steps.push((rng.range(200, 4000), Step::Cancel { which, force }));
    }
    if drain {
        faults.push(Fault::SigtermDrain);
        steps.push((rng.range(200, 4000), Step::Drain));
    }
    if disk_full {
        steps.push((rng.range(1000, 4000), Step::ReleaseDisk));
    }
    steps.sort_by_key(|(at, _)| *at);
    Plan {
        faults,
        disk_full,
        steps,
        runs,
    }
}

/// What happened to the runner's connection in one iteration.
#[derive(Default)]
struct Exposure {
    /// Sum of windows in which the runner could not heartbeat (dead, server down, outage).
    unreachable: Duration,
    force_canceled: Vec<i64>,
    /// Set when the runner did not exit 0 after a SIGTERM drain.
    drain_failed: Option<String>,
    killed: bool,
    devserver_restarted: bool,
    /// Lease yields the runner logged during the iteration.
    lease_yields: usize,
}

#[derive(Default)]
struct Tally {
    iterations: usize,
    runs: usize,
    faults: BTreeMap<Fault, usize>,
    statuses: BTreeMap<String, usize>,
    reported: usize,
    reaped: usize,
    duplicate_events: usize,
    events_dropped_after_verdict: usize,
    /// Runs the server handed out but the runner never saw (claim answer lost, or a crash
    /// before it was journaled: F6), reaped after the runner yielded its lease.
    unseen_reaped_after_yield: usize,
    /// Lease yields the runner made (F6's remedy).
    lease_yields: usize,
    violations: Vec<String>,
}

async fn execute(chaos: &mut Chaos, plan: &Plan, ids: &[i64], exposure: &mut Exposure) {
    let mut now = 0;
    for (at, step) in &plan.steps {
        if std::env::var("WSR_CHAOS_TRACE").is_ok() {
            eprintln!(
                "chaos: step at {at} ms: {step:?} (runner pid {:?})",
                chaos.runner.as_ref().map(|c| c.id())
            );
        }
        if *at > now {
            tokio::time::sleep(Duration::from_millis(at - now)).await;
            now = *at;
        }
        let began = Instant::now();
        match step {
            Step::Kill { down_ms } => {
                chaos.signal_runner(libc::SIGKILL);
                let _ = chaos.wait_runner_exit(Duration::from_secs(10)).await;
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                chaos.start_runner();
                exposure.killed = true;
                exposure.unreachable += began.elapsed();
            }
            Step::FaultsOn { faults, .. } => chaos.set_faults(faults.clone()),
            Step::FaultsOff => chaos.set_faults(Faults::default()),
            Step::OutageFor { secs } => {
                let until = windshift_devserver::core::now_ms() + (*secs as i64) * 1000;
                chaos.set_faults(Faults {
                    outage_until_ms: Some(until),
                    ..Default::default()
                });
                tokio::time::sleep(Duration::from_secs(*secs)).await;
                chaos.set_faults(Faults::default());
                exposure.unreachable += began.elapsed();
            }
            Step::RestartDevserver { down_ms } => {
                chaos
                    .restart_devserver(Duration::from_millis(*down_ms))
                    .await;
                exposure.devserver_restarted = true;
                exposure.unreachable += began.elapsed();
            }
            Step::Cancel { which, force } => {
                if let Some(id) = ids.get(*which) {
                    if let Ok(view) = chaos.dev().core().cancel(*id, *force) {
                        if *force && view.status == "canceled" {
                            exposure.force_canceled.push(*id);
                        }
                    }
                }
            }
            Step::Drain => {
                // A SIGTERM in the first milliseconds after exec, before the runtime installed
                // its handler, ends the process by the default action (like a crash, which
                // recovery handles); the drain under test is that of a started runner.
                let up = chaos.spawned_at + Duration::from_secs(1);
                tokio::time::sleep_until(up.into()).await;
                chaos.signal_runner(libc::SIGTERM);
                let code = chaos.wait_runner_exit(Duration::from_secs(90)).await;
                // F9 (fixed): a drain past its deadline must end even while a report or
                // an event flush is still retrying.
                if code != Some(0) {
                    exposure.drain_failed = Some(format!("exit {code:?}"));
                }
                chaos.start_runner();
                exposure.unreachable += began.elapsed();
            }
            Step::ReleaseDisk => chaos.release_disk(),
        }
        now += began.elapsed().as_millis() as u64;
    }
}

/// The `seq` values of the flood's `content` events, in the order the server stored them.
fn flood_seqs(events: &[windshift_devserver::types::StoredEvent]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.event_type == "stdout" || e.event_type == "content")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.payload_json).ok())
        .filter(|v| v.get("type").and_then(|t| t.as_str()) == Some("content"))
        .filter_map(|v| v.get("seq").and_then(|s| s.as_u64()))
        .collect()
}

fn lifecycle_count(events: &[windshift_devserver::types::StoredEvent], phases: &[&str]) -> usize {
    events
        .iter()
        .filter(|e| e.event_type == "lifecycle")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.payload_json).ok())
        .filter(|v| {
            v.get("phase")
                .and_then(|p| p.as_str())
                .is_some_and(|p| phases.contains(&p))
        })
        .count()
}

/// Checks every invariant for the runs of one iteration; returns the violations.
fn check_runs(
    chaos: &Chaos,
    runs: &[RunRecord],
    exposure: &Exposure,
    tally: &mut Tally,
) -> Vec<String> {
    let mut v = Vec::new();
    let refs = chaos.remote_refs();
    let lease_margin = Duration::from_secs(3);
    let reachable = exposure.unreachable + lease_margin < chaos.liveness;
    for r in runs {
        let run = chaos.run(r.id);
        let events = chaos.dev().core().events(r.id).unwrap_or_default();
        *tally.statuses.entry(run.status.clone()).or_default() += 1;
        if !TERMINAL.contains(&run.status.as_str()) {
            v.push(format!("run {}: not terminal ({})", r.id, run.status));
            continue;
        }
        let terminal = lifecycle_count(&events, &TERMINAL);
        if terminal != 1 {
            v.push(format!(
                "run {}: {terminal} terminal lifecycle events",
                r.id
            ));
        }
        let reaped = run.error == REAPED;
        // F6's remedy: a run the runner never saw (no event from it at all) is reaped after
        // the runner yielded its lease. A run it knew must never be reaped that way.
        let unseen_after_yield = reaped && exposure.lease_yields > 0 && events.is_empty();
        if unseen_after_yield {
            tally.unseen_reaped_after_yield += 1;
            eprintln!(
                "chaos: run {} (iteration {}) was handed out unseen and reaped after a lease yield",
                r.id, r.iteration
            );
        }
        if reaped {
            tally.reaped += 1;
            if reachable && !unseen_after_yield {
                v.push(format!(
                    "run {}: reaped although the runner was unreachable only {:?} (lease {:?})",
                    r.id, exposure.unreachable, chaos.liveness
                ));
            }
        }
        if run.reported.is_some() {
            tally.reported += 1;
        } else {
            let excused = reaped
                || exposure.force_canceled.contains(&r.id)
                || run.error == "canceled while queued";
            if !excused {
                v.push(format!(
                    "run {}: {} without a report from the runner (error {:?})",
                    r.id, run.status, run.error
                ));
            }
        }
        let pushed = lifecycle_count(&events, &["pushed"]);
        if pushed > 1 {
            v.push(format!("run {}: {pushed} `pushed` events", r.id));
        }
        let own = format!("refs/heads/agent-runs/run-{}", r.id);
        match refs.get(&own) {
            Some(subject) if subject != &r.tag => v.push(format!(
                "run {}: its branch holds {subject:?}, not its own commit {:?}",
                r.id, r.tag
            )),
            None if run.status == "succeeded" => {
                v.push(format!("run {}: succeeded but its branch is missing", r.id))
            }
            _ => {}
        }
        // Events: the flood's seq values arrive in order with no gap; a missing tail is
        // allowed only if the run ended before (cancel, reap) or the server refused it (409).
        let seqs = flood_seqs(&events);
        let mut next = 0u64;
        let mut dups = 0usize;
        for s in &seqs {
            if *s == next {
                next += 1;
            } else if *s < next {
                dups += 1;
            } else {
                v.push(format!(
                    "run {}: event seq {s} arrived when {next} was expected (lost or reordered)",
                    r.id
                ));
                break;
            }
        }
        if dups > 0 && !exposure.killed && !exposure.devserver_restarted {
            v.push(format!(
                "run {}: {dups} duplicate events without a crash or server restart",
                r.id
            ));
        }
        tally.duplicate_events += dups;
        if next < r.flood {
            let refused = chaos.dropped_after_verdict(r.id);
            if refused {
                tally.events_dropped_after_verdict += (r.flood - next) as usize;
            } else if run.status == "succeeded" {
                v.push(format!(
                    "run {}: succeeded but only {next} of {} flood events arrived",
                    r.id, r.flood
                ));
            }
        }
    }
    // No push to any ref but main and the chaos runs' own branches.
    for name in refs.keys() {
        let ok = name == "refs/heads/main"
            || name
                .strip_prefix("refs/heads/agent-runs/run-")
                .and_then(|id| id.parse::<i64>().ok())
                .is_some();
        if !ok {
            v.push(format!("unexpected ref in the server's repo: {name}"));
        }
    }
    v
}

async fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The seed CI uses when `WSR_CHAOS_SEED` is not set.
const CI_SEED: u64 = 20_261_127;

fn env_u64(name: &str) -> Option<u64> {
    let raw = std::env::var(name).ok()?;
    match raw.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={raw:?} is not a non-negative integer"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_runner_keeps_every_invariant_under_faults() {
    let iterations = env_u64("WSR_CHAOS_ITERATIONS").unwrap_or(20) as usize;
    // CI pins the seed so a red CI run is reproducible from its log and the fault mix is
    // one that is known to pass; anywhere else each run explores a new seed.
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    let seed = env_u64("WSR_CHAOS_SEED").unwrap_or_else(|| {
        if ci {
            return CI_SEED;
        }
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7)
    });
    let long = std::env::var("WSR_CHAOS_LONG").is_ok_and(|v| v == "1");
    let liveness = Duration::from_secs(if long { 60 } else { 15 });
    eprintln!("chaos: seed {seed}, {iterations} iterations, long={long}, lease {liveness:?}");

    let mut chaos = Chaos::start(liveness).await;
    let mut rng = Rng::new(seed);
    let mut tally = Tally::default();
    let mut all_runs: Vec<RunRecord> = Vec::new();
    let started = Instant::now();

    // A time budget for long runs: stop after the iteration that crosses it (the summary says so).
    let budget = env_u64("WSR_CHAOS_MAX_MINUTES").map(|m| Duration::from_secs(m * 60));
    // Resuming a long run: the plans of skipped iterations are drawn (so the generator is
    // where it was) but not executed.
    let first = env_u64("WSR_CHAOS_FIRST_ITERATION").unwrap_or(0) as usize;
    for iteration in 0..iterations {
        if budget.is_some_and(|b| started.elapsed() > b) {
            eprintln!("chaos: time budget reached after {iteration} iterations");
            break;
        }
        let plan = draw_plan(&mut rng, iteration, long, chaos.tmpfs);
        if iteration < first {
            continue;
        }
        for f in &plan.faults {
            *tally.faults.entry(*f).or_default() += 1;
        }
        if chaos.runner.is_none() {
            chaos.start_runner();
        }
        if plan.disk_full {
            // A runner that cannot store the credential it just registered for stops at boot
            // (exit 78, by design): the disk fills once the first start has stored it.
            let stored = chaos.cache_root.join("credential");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stored.exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            chaos.fill_disk();
        }
        let ids: Vec<i64> = plan.runs.iter().map(|(p, _)| chaos.enqueue(p)).collect();
        let runs: Vec<RunRecord> = ids
            .iter()
            .zip(&plan.runs)
            .enumerate()
            .map(|(k, (id, (_, flood)))| RunRecord {
                id: *id,
                tag: format!("chaos it{iteration} run{k}"),
                flood: *flood,
                iteration,
            })
            .collect();
        let mut exposure = Exposure::default();
        let yields_before = chaos.log_count(LEASE_YIELD_LINE);
        execute(&mut chaos, &plan, &ids, &mut exposure).await;
        chaos.release_disk();
        chaos.set_faults(Faults::default());
        let mut violations = Vec::new();
        if let Some(how) = &exposure.drain_failed {
            violations.push(format!(
                "runner did not exit 0 after a SIGTERM drain: {how}"
            ));
        }

        // Room for a lease yield (liveness + 5 s) and the reap after it.
        let settle_for = Duration::from_secs(180) + chaos.liveness * 2;
        let deadline = Instant::now() + settle_for;
        let settled = loop {
            // A runner must not die by itself (e.g. at boot under 5xx): restart it and say so.
            if let Some(Ok(Some(status))) = chaos.runner.as_mut().map(|c| c.try_wait()) {
                violations.push(format!("runner exited by itself: {status}"));
                chaos.runner = None;
                chaos.start_runner();
            }
            if ids
                .iter()
                .all(|id| TERMINAL.contains(&chaos.run(*id).status.as_str()))
            {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if !settled {
            violations.push(format!("runs not terminal within {settle_for:?}"));
        }
        // The runner is idle once its containers and checkouts are gone.
        let idle = wait_for(Duration::from_secs(60), || {
            chaos.containers().is_empty() && chaos.leftovers().is_empty()
        })
        .await;
        if !idle {
            violations.push(format!(
                "runner not idle after the runs ended: containers {:?}, leftovers {:?}",
                chaos.containers(),
                chaos.leftovers()
            ));
        }
        chaos.signal_runner(libc::SIGTERM);
        match chaos.wait_runner_exit(Duration::from_secs(60)).await {
            Some(0) => {}
            other => violations.push(format!("runner exit on SIGTERM when idle: {other:?}")),
        }
        let orphans = chaos.containers();
        if !orphans.is_empty() {
            violations.push(format!("orphan containers: {orphans:?}"));
        }
        let left = chaos.leftovers();
        if !left.is_empty() {
            violations.push(format!("leftover checkouts: {left:?}"));
        }
        let verify = chaos.journal_verify();
        if !verify.status.success() {
            violations.push(format!(
                "journal verify failed: {}{}",
                String::from_utf8_lossy(&verify.stdout),
                String::from_utf8_lossy(&verify.stderr)
            ));
        }
        exposure.lease_yields = chaos.log_count(LEASE_YIELD_LINE) - yields_before;
        tally.lease_yields += exposure.lease_yields;
        violations.extend(check_runs(&chaos, &runs, &exposure, &mut tally));

        tally.iterations += 1;
        tally.runs += runs.len();
        eprintln!(
            "chaos: iteration {iteration}: faults {:?}, runs {:?}, unreachable {:?}, violations {}",
            plan.faults,
            runs.iter()
                .map(|r| {
                    let run = chaos.run(r.id);
                    if run.error.is_empty() {
                        format!("{}={}", r.id, run.status)
                    } else {
                        format!("{}={} ({})", r.id, run.status, run.error)
                    }
                })
                .collect::<Vec<_>>(),
            exposure.unreachable,
            violations.len()
        );
        for v in &violations {
            eprintln!("chaos: VIOLATION (iteration {iteration}, seed {seed}): {v}");
        }
        tally.violations.extend(
            violations
                .into_iter()
                .map(|v| format!("iteration {iteration}: {v}")),
        );
        all_runs.extend(runs);
    }

    let summary = summary(&tally, seed, started.elapsed(), long, chaos.tmpfs);
    eprintln!("{summary}");
    if let Ok(path) = std::env::var("WSR_CHAOS_SUMMARY") {
        let _ = std::fs::write(path, &summary);
    }
    if !tally.violations.is_empty() {
        // Keep the devserver data, journal and runner log for the post-mortem.
        chaos.tmp.disable_cleanup(true);
        let kept = chaos.tmp.path().to_path_buf();
        eprintln!(
            "--- runner log (tail) ---\n{}\n--- end ---",
            chaos.log_tail(200)
        );
        panic!(
            "{} invariant violation(s); reproduce with WSR_CHAOS_SEED={seed} WSR_CHAOS_ITERATIONS={iterations}{} (state was in {})",
            tally.violations.len(),
            if long { " WSR_CHAOS_LONG=1" } else { "" },
            kept.display()
        );
    }
    assert!(
        tally.runs > 0 && all_runs.len() == tally.runs,
        "the suite ran runs"
    );
}

fn summary(t: &Tally, seed: u64, took: Duration, long: bool, tmpfs: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n| chaos summary | |\n|---|---|");
    let _ = writeln!(s, "| seed | {seed} |");
    let _ = writeln!(s, "| mode | {} |", if long { "long" } else { "ci" });
    let _ = writeln!(s, "| iterations | {} |", t.iterations);
    let _ = writeln!(s, "| runs | {} |", t.runs);
    let _ = writeln!(s, "| duration | {:.0} s |", took.as_secs_f64());
    for (fault, n) in &t.faults {
        let _ = writeln!(s, "| fault: {fault:?} | {n} |");
    }
    if !tmpfs {
        let _ = writeln!(s, "| fault: DiskFull | skipped (no tmpfs mount) |");
    }
    for (status, n) in &t.statuses {
        let _ = writeln!(s, "| runs {status} | {n} |");
    }
    let _ = writeln!(s, "| reported by the runner | {} |", t.reported);
    let _ = writeln!(s, "| reaped (lease expired) | {} |", t.reaped);
    let _ = writeln!(
        s,
        "| duplicate events (at-least-once replay) | {} |",
        t.duplicate_events
    );
    let _ = writeln!(
        s,
        "| events refused with 409 after the verdict | {} |",
        t.events_dropped_after_verdict
    );
    let _ = writeln!(s, "| lease yields (F6 remedy) | {} |", t.lease_yields);
    let _ = writeln!(
        s,
        "| runs handed out unseen, reaped after a lease yield (F6) | {} |",
        t.unseen_reaped_after_yield
    );
    let _ = writeln!(s, "| invariant violations | {} |", t.violations.len());
    for v in &t.violations {
        let _ = writeln!(s, "|  - {v} | |");
    }
    s
}
