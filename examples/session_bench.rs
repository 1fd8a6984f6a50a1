//! Host cost of concurrent runs (docs/PERFORMANCE.md, "Host memory and processes per
//! concurrent run"): the real runner (`target/release/windshift-runner run`) with N agents
//! running at once, once on the CLI engine driver and once on the Engine API driver, in the
//! same invocation. Measured per round: the runner's RSS while idle, then (with N agents
//! started) the runner's RSS plus that of every process it keeps (its descendants), and how
//! many such processes there are.
//!
//! Build first: `cargo build --release --bin windshift-runner --example session_bench`, then
//! `target/release/examples/session_bench [ROUNDS]` (default 3). Needs Docker with its API
//! socket and the test agent image (`scripts/build-test-agent-image.sh`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use windshift_devserver::types::{CreatePool, CreateRepo, EnqueueRepo, EnqueueRun, MintToken};
use windshift_devserver::{Core, DevServer, DevServerConfig};

const IMAGE: &str = "windshift-test-agent:dev";
const SLUG: &str = "bench/app";
/// Up, then idle until the cancel's abort ends the sleep.
const PROMPT: &str = r#"say up; sleep 600000; finish completed "late""#;
const CONCURRENCY: [usize; 3] = [1, 4, 16];

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=b", "-c", "user.email=b@example.com"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

/// Resident set size of a process in KiB (0 when it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Every live descendant of `root` (children, their children, …).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The command name may hold spaces: the fields after its closing parenthesis.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Sample {
    idle_kib: u64,
    runner_kib: u64,
    children_kib: u64,
    children: usize,
}

struct Bench {
    core: std::sync::Arc<Core>,
    api_url: String,
    runner_bin: PathBuf,
    dir: PathBuf,
}

impl Bench {
    fn start_runner(&self, name: &str, driver: &str, n: usize) -> Child {
        let pool = self
            .core
            .create_pool(&CreatePool {
                name: name.into(),
                max_concurrent_runs: 0,
            })
            .expect("pool")
            .id;
        let token = self
            .core
            .mint_token(pool, &MintToken::default())
            .expect("token")
            .token;
        let dir = self.dir.join(name);
        let child = Command::new(&self.runner_bin)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WS_API_URL", &self.api_url)
            .env("WSRUNNER_ALLOW_INSECURE", "1")
            .env("WSRUNNER_REGISTRATION_TOKEN", token)
            .env("WSRUNNER_IMAGE", IMAGE)
            .env("WSRUNNER_NETWORK", "none")
            .env("WSRUNNER_NAME", name)
            .env("WSRUNNER_CACHE_ROOT", dir.join("cache"))
            .env("WSRUNNER_JOURNAL_DIR", dir.join("journal"))
            .env("WSRUNNER_POLL_INTERVAL", "200ms")
            .env("WSRUNNER_CONCURRENCY", n.to_string())
            .env("WSRUNNER_ENGINE_DRIVER", driver)
            .env("WSRUNNER_MEMORY", "64m")
            .env("WSRUNNER_CPUS", "0.5")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("runner");
        // Ready once it registered (its pool then has an instance).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.core.instances().iter().any(|i| i.name == name) {
            assert!(Instant::now() < deadline, "runner {name} never registered");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn enqueue(&self, pool_of: &str, n: usize) -> Vec<i64> {
        let pool = self
            .core
            .pools()
            .into_iter()
            .find(|p| p.name == pool_of)
            .expect("the runner's pool")
            .id;
        (0..n)
            .map(|_| {
                self.core
                    .enqueue(&EnqueueRun {
                        pool_id: pool,
                        repos: vec![EnqueueRepo {
                            slug: SLUG.into(),
                            base_ref: "main".into(),
                            continue_branch: String::new(),
                        }],
                        prompt: PROMPT.into(),
                        ..Default::default()
                    })
                    .expect("enqueue")
                    .id
            })
            .collect()
    }

    fn agent_up(&self, id: i64) -> bool {
        self.core.events(id).is_ok_and(|events| {
            events
                .iter()
                .any(|e| e.event_type == "stdout" && e.payload_json.contains(r#""text":"up""#))
        })
    }

    fn round(&self, name: &str, driver: &str, n: usize) -> Sample {
        let mut runner = self.start_runner(name, driver, n);
        std::thread::sleep(Duration::from_secs(1));
        let idle_kib = rss_kib(runner.id());
        let ids = self.enqueue(name, n);
        let deadline = Instant::now() + Duration::from_secs(300);
        while !ids.iter().all(|id| self.agent_up(*id)) {
            assert!(Instant::now() < deadline, "{name}: agents not all up");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Let start-up transients (CLI calls of the create/start) end.
        std::thread::sleep(Duration::from_secs(2));
        let children = descendants(runner.id());
        let sample = Sample {
            idle_kib,
            runner_kib: rss_kib(runner.id()),
            children_kib: children.iter().map(|p| rss_kib(*p)).sum(),
            children: children.len(),
        };
        for id in &ids {
            let _ = self.core.cancel(*id, false);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while ids.iter().any(|id| {
            self.core
                .run(*id)
                .is_ok_and(|r| matches!(r.status.as_str(), "queued" | "running"))
        }) {
            assert!(Instant::now() < deadline, "{name}: runs not finished");
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(runner.id() as i32, libc::SIGTERM);
        }
        let _ = runner.wait();
        sample
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let runner_bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("windshift-runner")))
        .unwrap_or_else(|| root.join("target/release/windshift-runner"));
    if !runner_bin.exists() {
        eprintln!(
            "missing {}: cargo build --release --bin windshift-runner",
            runner_bin.display()
        );
        std::process::exit(2);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("src");
    git(&src, &["init", "-q", "-b", "main"]);
    std::fs::write(src.join("README.md"), "bench\n").expect("write");
    git(&src, &["add", "."]);
    git(&src, &["commit", "-q", "-m", "initial"]);
    let dev = DevServer::start(DevServerConfig::new(tmp.path().join("dev")))
        .await
        .expect("devserver");
    let core = dev.core().clone();
    core.create_repo(&CreateRepo {
        slug: SLUG.into(),
        path: src.display().to_string(),
    })
    .await
    .expect("repo");
    let bench = Bench {
        core,
        api_url: dev.api_url(),
        runner_bin,
        dir: tmp.path().join("runners"),
    };
    println!("host cost of concurrent runs: {rounds} rounds each, medians (RSS in MiB)");
    println!(
        "driver n | runner idle | runner loaded | kept children | their RSS | extra RSS per run"
    );
    let bench = std::sync::Arc::new(bench);
    for n in CONCURRENCY {
        for driver in ["cli", "api"] {
            let mut samples = Vec::new();
            for round in 0..rounds {
                let name = format!("bench-{driver}-{n}-{round}");
                let b = bench.clone();
                let s = tokio::task::spawn_blocking(move || b.round(&name, driver, n))
                    .await
                    .expect("round");
                samples.push(s);
            }
            let mib = |f: &dyn Fn(&Sample) -> u64| {
                median(samples.iter().map(|s| f(s) as f64 / 1024.0).collect())
            };
            let per_run = median(
                samples
                    .iter()
                    .map(|s| {
                        (s.runner_kib + s.children_kib).saturating_sub(s.idle_kib) as f64
                            / 1024.0
                            / n as f64
                    })
                    .collect(),
            );
            let children = median(samples.iter().map(|s| s.children as f64).collect());
            println!(
                "{driver:>6} {n:>2} | {:>11.1} | {:>13.1} | {:>13.0} | {:>9.1} | {:>17.2}",
                mib(&|s| s.idle_kib),
                mib(&|s| s.runner_kib),
                children,
                mib(&|s| s.children_kib),
                per_run
            );
        }
    }
    dev.stop().await;
}
