//! Per-run overhead (docs/PERFORMANCE.md, "Per-run overhead"): a no-op agent run end to end
//! through the real runner (`target/release/windshift-runner run`), from claim to accepted
//! report, against the floor — the same steps done by `scripts/bench/floor_run.sh` (git fetch
//! into a bare cache, clone to the checkout, `docker run` of the same image, push, one HTTP
//! POST) — in the same invocation, alternating, with warm caches. Both durations come from the
//! devserver's own records (`started_at_ms` at claim, `ended_at_ms` at the accepted report).
//!
//! Build first: `cargo build --release --bin windshift-runner`, then
//! `cargo run --release --example overhead_bench -- [ROUNDS]` (default 7). Needs Docker, the
//! test agent image (`scripts/build-test-agent-image.sh`), `jq` and `curl`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use windshift_devserver::types::{
    CreatePool, CreateRepo, EnqueueRepo, EnqueueRun, MintToken, RunView,
};
use windshift_devserver::{Core, DevServer, DevServerConfig};

const IMAGE: &str = "windshift-test-agent:dev";
const SLUG: &str = "bench/app";
/// The no-op agent: one small commit (so both sides push), then finish.
const PROMPT: &str = r#"commit file=noop.txt msg="noop"; finish completed "noop""#;

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

/// Waits until the runner finished the run (polled every 20 ms; durations use server stamps).
async fn wait_final(core: &Core, id: i64) -> RunView {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = core.run(id).expect("run");
        if !matches!(r.status.as_str(), "queued" | "running") {
            return r;
        }
        assert!(Instant::now() < deadline, "runner run {id} did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Next to this example's own directory (target/<profile>/examples/..), so a separate
    // CARGO_TARGET_DIR works too.
    let runner_bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("windshift-runner")))
        .unwrap_or_else(|| root.join("target/release/windshift-runner"));
    let floor = root.join("scripts/bench/floor_run.sh");
    if !runner_bin.exists() {
        eprintln!(
            "missing {}: cargo build --release --bin windshift-runner",
            runner_bin.display()
        );
        std::process::exit(2);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("lib")).expect("src");
    git(&src, &["init", "-q", "-b", "main"]);
    // A small real-looking repository: 200 files.
    for i in 0..200 {
        std::fs::write(
            src.join(format!("lib/f{i}.rs")),
            format!("pub fn f{i}() {{}}\n"),
        )
        .unwrap();
    }
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
    let pool = |name: &str| {
        core.create_pool(&CreatePool {
            name: name.into(),
            max_concurrent_runs: 0,
        })
        .expect("pool")
        .id
    };
    let (runner_pool, floor_pool) = (pool("runner"), pool("floor"));
    let mint = |p| {
        core.mint_token(p, &MintToken::default())
            .expect("token")
            .token
    };
    let enqueue = |p| {
        core.enqueue(&EnqueueRun {
            pool_id: p,
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
    };

    // The floor's credential: register once, outside the measured part.
    let reg = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
        ])
        .arg(format!(
            r#"{{"registration_token":"{}","name":"floor"}}"#,
            mint(floor_pool)
        ))
        .arg(format!("{}/runner/register", dev.api_url()))
        .output()
        .expect("curl");
    let floor_cred = serde_json::from_slice::<serde_json::Value>(&reg.stdout)
        .ok()
        .and_then(|v| v.get("credential")?.as_str().map(str::to_owned))
        .expect("floor credential");
    let floor_cache = tmp.path().join("floor-cache");

    let dir = tmp.path().join("runner");
    let mut runner = Command::new(&runner_bin)
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WS_API_URL", dev.api_url())
        .env("WSRUNNER_ALLOW_INSECURE", "1")
        .env("WSRUNNER_REGISTRATION_TOKEN", mint(runner_pool))
        .env("WSRUNNER_IMAGE", IMAGE)
        .env("WSRUNNER_NETWORK", "none")
        .env("WSRUNNER_NAME", "overhead")
        .env("WSRUNNER_CACHE_ROOT", dir.join("cache"))
        .env("WSRUNNER_JOURNAL_DIR", dir.join("journal"))
        .env("WSRUNNER_POLL_INTERVAL", "200ms")
        // `cli` or `api` (default auto: the API when the socket answers), to compare drivers.
        .env(
            "WSRUNNER_ENGINE_DRIVER",
            std::env::var("WSRUNNER_ENGINE_DRIVER").unwrap_or_default(),
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("runner");

    let run_floor = |id: i64| {
        let out = Command::new(&floor)
            .arg(dev.api_url())
            .arg(&floor_cred)
            .arg(&floor_cache)
            .arg(IMAGE)
            .output()
            .expect("floor script");
        assert!(out.status.success(), "floor run {id}: {out:?}");
        core.run(id).expect("run")
    };
    let took = |r: &RunView| (r.ended_at_ms.unwrap_or(0) - r.started_at_ms.unwrap_or(0)) as f64;

    // Warm-up: fills both bare caches and the page cache; not measured.
    let w = wait_final(&core, enqueue(runner_pool)).await;
    assert_eq!(w.status, "succeeded", "warm-up runner run: {w:?}");
    let w = run_floor(enqueue(floor_pool));
    assert_eq!(w.status, "succeeded", "warm-up floor run: {w:?}");

    println!(
        "per-run overhead: {rounds} rounds, warm caches, claim → accepted report (server clock)"
    );
    let (mut rs, mut fs) = (vec![], vec![]);
    for round in 0..rounds {
        let r = wait_final(&core, enqueue(runner_pool)).await;
        assert_eq!(r.status, "succeeded", "{r:?}");
        let f = run_floor(enqueue(floor_pool));
        assert_eq!(f.status, "succeeded", "{f:?}");
        println!(
            "round {round}: runner {:.0} ms | floor {:.0} ms | ratio {:.2}",
            took(&r),
            took(&f),
            took(&r) / took(&f)
        );
        rs.push(took(&r));
        fs.push(took(&f));
    }
    let (r, f) = (median(rs), median(fs));
    println!(
        "median: runner {r:.0} ms, floor {f:.0} ms, ratio {:.2}",
        r / f
    );
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(runner.id() as i32, libc::SIGTERM);
    }
    let _ = runner.wait();
    dev.stop().await;
}
