//! Idle footprint (docs/PERFORMANCE.md, "Idle footprint"): the real runner
//! (`target/release/windshift-runner run`) and the floor (`examples/idle_floor.rs`, tokio +
//! reqwest doing the same polling) run side by side against one in-process devserver with the
//! same poll and heartbeat intervals; after a warm-up, RSS and CPU time are sampled from /proc
//! over WINDOW seconds. Rounds are repeated; medians are printed.
//!
//! Build first: `cargo build --release --bin windshift-runner --example idle_floor`, then
//! `cargo run --release --example idle_bench -- [ROUNDS] [WINDOW_SECS] [POLL_MS] [HEARTBEAT_MS]`
//! (defaults 3, 60, 1000, 5000). Needs Docker (the runner checks its network and image at boot).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use windshift_devserver::types::{CreatePool, MintToken};
use windshift_devserver::{DevServer, DevServerConfig};

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resident set (KiB) and user+system CPU ticks of a process, from /proc.
fn sample(pid: u32) -> (u64, u64) {
    let rss = status_kib(pid, "VmRSS:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (rss, ticks)
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn release_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release"))
}

struct Measured {
    rss_kib: f64,
    /// Private (anonymous) resident memory: heap and stacks, without mapped code.
    anon_kib: f64,
    peak_rss_kib: f64,
    cpu_pct: f64,
}

async fn measure(child: &Child, warmup: Duration, window: Duration) -> Measured {
    tokio::time::sleep(warmup).await;
    let (_, t0) = sample(child.id());
    let mut rss = Vec::new();
    let steps = window.as_secs().max(1);
    for _ in 0..steps {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(sample(child.id()).0 as f64);
    }
    let (_, t1) = sample(child.id());
    let anon_kib = status_kib(child.id(), "RssAnon:") as f64;
    let peak = rss.iter().cloned().fold(0.0, f64::max);
    Measured {
        rss_kib: median(rss),
        anon_kib,
        peak_rss_kib: peak,
        cpu_pct: (t1 - t0) as f64 / ticks_per_sec() / window.as_secs_f64() * 100.0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(3);
    let window = Duration::from_secs(args.next().and_then(|v| v.parse().ok()).unwrap_or(60));
    let poll_ms: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let beat_ms: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let bin = release_dir();
    let runner_bin = bin.join("windshift-runner");
    let floor_bin = bin.join("examples/idle_floor");
    for b in [&runner_bin, &floor_bin] {
        if !b.exists() {
            eprintln!(
                "missing {}: run `cargo build --release --bin windshift-runner --example idle_floor` first",
                b.display()
            );
            std::process::exit(2);
        }
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dev = DevServer::start(DevServerConfig::new(tmp.path().join("dev")))
        .await
        .expect("devserver");
    let core = dev.core().clone();
    let pool = core
        .create_pool(&CreatePool {
            name: "idle".into(),
            max_concurrent_runs: 0,
        })
        .expect("pool");
    println!(
        "idle footprint: {rounds} rounds, {}s window after 5s warm-up, poll {poll_ms} ms, heartbeat {beat_ms} ms",
        window.as_secs()
    );
    let (mut r_rss, mut r_peak, mut r_cpu, mut f_rss, mut f_peak, mut f_cpu) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut r_anon, mut f_anon) = (vec![], vec![]);
    for round in 0..rounds {
        let token = |_: ()| {
            core.mint_token(pool.id, &MintToken::default())
                .expect("token")
                .token
        };
        let dir = tmp.path().join(format!("runner-{round}"));
        let mut runner = Command::new(&runner_bin)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WS_API_URL", dev.api_url())
            .env("WSRUNNER_ALLOW_INSECURE", "1")
            .env("WSRUNNER_REGISTRATION_TOKEN", token(()))
            .env("WSRUNNER_IMAGE", "windshift-test-agent:dev")
            .env("WSRUNNER_NETWORK", "none")
            .env("WSRUNNER_NAME", format!("idle-{round}"))
            .env("WSRUNNER_CACHE_ROOT", dir.join("cache"))
            .env("WSRUNNER_JOURNAL_DIR", dir.join("journal"))
            .env("WSRUNNER_POLL_INTERVAL", format!("{poll_ms}ms"))
            .env("WSRUNNER_HEARTBEAT_INTERVAL", format!("{beat_ms}ms"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("runner starts");
        let mut floor = Command::new(&floor_bin)
            .args([poll_ms.to_string(), beat_ms.to_string()])
            .env("WS_API_URL", dev.api_url())
            .env("FLOOR_TOKEN", token(()))
            .stdout(Stdio::null())
            .spawn()
            .expect("floor starts");
        let warm = Duration::from_secs(5);
        let (r, f) = tokio::join!(
            measure(&runner, warm, window),
            measure(&floor, warm, window)
        );
        for c in [&runner, &floor] {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let _ = runner.wait();
        let _ = floor.wait();
        println!(
            "round {round}: runner RSS {:.1} MiB (peak {:.1}, anon {:.1}) CPU {:.2}% | floor RSS {:.1} MiB (peak {:.1}, anon {:.1}) CPU {:.2}%",
            r.rss_kib / 1024.0,
            r.peak_rss_kib / 1024.0,
            r.anon_kib / 1024.0,
            r.cpu_pct,
            f.rss_kib / 1024.0,
            f.peak_rss_kib / 1024.0,
            f.anon_kib / 1024.0,
            f.cpu_pct
        );
        r_anon.push(r.anon_kib);
        f_anon.push(f.anon_kib);
        r_rss.push(r.rss_kib);
        r_peak.push(r.peak_rss_kib);
        r_cpu.push(r.cpu_pct);
        f_rss.push(f.rss_kib);
        f_peak.push(f.peak_rss_kib);
        f_cpu.push(f.cpu_pct);
    }
    let (rr, fr) = (median(r_rss), median(f_rss));
    let (ra, fa) = (median(r_anon), median(f_anon));
    println!(
        "median anonymous RSS: runner {:.1} MiB, floor {:.1} MiB ({:.2}x)",
        ra / 1024.0,
        fa / 1024.0,
        ra / fa
    );
    println!(
        "median: runner RSS {:.1} MiB (peak {:.1}), CPU {:.2}% | floor RSS {:.1} MiB (peak {:.1}), CPU {:.2}% | RSS ratio {:.2}x",
        rr / 1024.0,
        median(r_peak) / 1024.0,
        median(r_cpu),
        fr / 1024.0,
        median(f_peak) / 1024.0,
        median(f_cpu),
        rr / fr
    );
    dev.stop().await;
}
