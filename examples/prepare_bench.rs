//! Prepare on a large repository (docs/PERFORMANCE.md, "Prepare on a large repository"):
//! the runner's `effects::git::prepare` with a cold cache (bare cache cloned from the remote,
//! then the checkout) and with a warm cache (fetch, then the checkout), against a plain
//! `git clone --no-hardlinks` of the same bare repository, measured in the same run.
//!
//! `cargo run --release --example prepare_bench -- [DIR] [ROUNDS] [FILES] [COMMITS]`
//! DIR (absolute) defaults to target/prepare-bench (the generated repository is kept there between
//! invocations; checkouts are removed); ROUNDS 5, FILES 20000, COMMITS 2000.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use windshift_runner::effects::git::validate::TransportPolicy;
use windshift_runner::effects::git::{prepare, GitTransport, PrepareRequest};

fn git(args: &[&str], dir: &Path) {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

/// Generates a repository with `files` files and `commits` commits through `git fast-import`
/// (seconds instead of minutes): the first commit adds every file, each later commit
/// rewrites 10 of them.
fn generate(bare: &Path, files: usize, commits: usize) {
    std::fs::create_dir_all(bare).expect("bare dir");
    git(&["init", "-q", "--bare", "-b", "main"], bare);
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(bare)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::piped())
        .spawn()
        .expect("git fast-import");
    let mut out = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for c in 0..commits {
        let msg = format!("commit {c}");
        writeln!(out, "commit refs/heads/main").unwrap();
        writeln!(
            out,
            "committer Bench <bench@example.com> {} +0000",
            1_700_000_000 + c
        )
        .unwrap();
        writeln!(out, "data {}\n{msg}", msg.len()).unwrap();
        let touched: Vec<usize> = if c == 0 {
            (0..files).collect()
        } else {
            (0..10).map(|_| (rand() as usize) % files).collect()
        };
        for f in touched {
            let body = format!(
                "// file {f}, revision {c}\n{}\n",
                format!("fn f{f}() -> u64 {{ {} }}\n", rand()).repeat(4)
            );
            writeln!(
                out,
                "M 644 inline src/m{:03}/file{f:05}.rs\ndata {}\n{body}",
                f % 500,
                body.len()
            )
            .unwrap();
        }
    }
    drop(out);
    assert!(child.wait().expect("fast-import").success());
    git(&["repack", "-adq"], bare);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn request(root: &Path, remote: &Path, run_id: i64) -> PrepareRequest {
    PrepareRequest {
        root: root.display().to_string(),
        workspace_id: 1,
        slug: "bench/large".into(),
        remote_url: remote.display().to_string(),
        base_ref: "main".into(),
        run_id,
        transport: GitTransport::Askpass,
        policy: TransportPolicy {
            allow_file_url: true,
            allow_insecure_http: false,
        },
        ..Default::default()
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir: PathBuf = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/prepare-bench"));
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(5);
    let files: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(20_000);
    let commits: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(2_000);
    let bare = dir.join(format!("remote-{files}f-{commits}c.git"));
    if !bare.join("HEAD").exists() {
        let t = Instant::now();
        let _ = std::fs::remove_dir_all(&bare);
        generate(&bare, files, commits);
        println!(
            "generated {files} files / {commits} commits in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let size = Command::new("du")
        .args(["-sh"])
        .arg(&bare)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("remote: {size}; {rounds} rounds");

    let work = dir.join("work");
    let (mut cold, mut warm, mut plain) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("work dir");
        let root = work.join("cache");

        // Each timed step starts with the previous steps' dirty pages written back, so no
        // step pays for another's writeback.
        let sync = || {
            let _ = Command::new("sync").status();
        };
        // Baseline: the plain clone the checkout step amounts to (checkout included).
        sync();
        let t = Instant::now();
        let out = Command::new("git")
            .args(["clone", "-q", "--no-hardlinks"])
            .arg(&bare)
            .arg(work.join("plain"))
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .expect("git clone");
        assert!(out.status.success(), "{out:?}");
        let p = t.elapsed();

        sync();
        let t = Instant::now();
        let c = prepare(&request(&root, &bare, 1000 + round as i64 * 2)).expect("cold prepare");
        let cd = t.elapsed();
        sync();
        let t = Instant::now();
        let w = prepare(&request(&root, &bare, 1001 + round as i64 * 2)).expect("warm prepare");
        let wd = t.elapsed();
        assert_eq!(c.base_commit, w.base_commit);
        // The checkout belongs to the agent's uid now: tell git that is expected.
        let tracked = Command::new("git")
            .args(["-c", "safe.directory=*", "-C"])
            .arg(&w.checkout_path)
            .args(["ls-files"])
            .output()
            .map(|o| o.stdout.iter().filter(|b| **b == b'\n').count())
            .unwrap_or(0);
        assert_eq!(tracked, files, "the warm checkout has every file");
        println!(
            "round {round}: plain clone {:.2} s | prepare cold {:.2} s | prepare warm {:.2} s",
            secs(p),
            secs(cd),
            secs(wd)
        );
        plain.push(p);
        cold.push(cd);
        warm.push(wd);
    }
    let _ = std::fs::remove_dir_all(&work);
    let (p, c, w) = (median(plain), median(cold), median(warm));
    println!(
        "median of {rounds}: plain `git clone --no-hardlinks` {:.2} s; prepare cold {:.2} s ({:.2}x); prepare warm {:.2} s ({:.2}x)",
        secs(p),
        secs(c),
        secs(c) / secs(p),
        secs(w),
        secs(w) / secs(p)
    );
}
