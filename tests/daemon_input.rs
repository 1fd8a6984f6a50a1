//! Hostile or broken input refused by the real `windshift-runner` binary (security issue 11):
//! claim answers with a bad run id, env values a container cannot carry and duplicate repos;
//! secrets passed as flags; a cache root other users can write.

mod daemon_support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use daemon_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use windshift_devserver::types::EnqueueRepo;

/// The runner binary with a clean environment plus `env`, run to its exit.
fn runner_output(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("runner runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn secret_flags_are_not_offered_and_are_refused_without_echoing_the_value() {
    for cmd in ["run", "doctor"] {
        let (code, help) = runner_output(&[cmd, "--help"], &[]);
        assert_eq!(code, 0, "{help}");
        assert!(help.contains("--credential-file"), "{help}");
        assert!(
            !help.contains("--credential ") && !help.contains("--credential\n"),
            "{help}"
        );
        assert!(!help.contains("--registration-token"), "{help}");
    }
    let secret = "wsrc_argvsecret0123456789abcdef";
    for (flag, var) in [
        ("--credential", "WSRUNNER_CREDENTIAL"),
        ("--registration-token", "WSRUNNER_REGISTRATION_TOKEN"),
    ] {
        for args in [
            vec!["run", flag, secret],
            vec!["run", &format!("{flag}={secret}")],
            vec!["run", flag],
        ] {
            let (code, out) =
                runner_output(&args, &[("WS_API_URL", "https://windshift.invalid/api")]);
            assert_eq!(code, 78, "{args:?}: {out}");
            assert!(out.contains(flag) && out.contains(var), "{args:?}: {out}");
            assert!(out.contains("process list"), "{out}");
            assert!(!out.contains("argvsecret"), "value echoed: {out}");
        }
    }
}

#[test]
fn a_cache_root_others_can_write_or_a_symlink_stops_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path().join("elsewhere"), &link).unwrap();
    let journal = tmp.path().join("journal");
    for (root, want) in [(&cache, "chmod 0750"), (&link, "symlink")] {
        let root_s = root.display().to_string();
        let (code, out) = runner_output(
            &["run"],
            &[
                ("WS_API_URL", "https://windshift.invalid/api"),
                ("WSRUNNER_CACHE_ROOT", &root_s),
                ("WSRUNNER_JOURNAL_DIR", &journal.display().to_string()),
            ],
        );
        assert_eq!(code, 78, "{out}");
        assert!(out.contains(want) && out.contains(&root_s), "{out}");
    }
    assert!(
        !tmp.path().join("elsewhere").exists(),
        "followed the symlink"
    );
    assert!(!journal.exists(), "refused before anything was opened");
    // A missing root is created 0750.
    let fresh = tmp.path().join("fresh/cache");
    windshift_runner::cache_root::ensure(&fresh).unwrap();
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o750
    );
}

/// A fake control plane: version, heartbeat (the credential probe) and claim, whose answers
/// come from `jobs` in turn (then `{"job":null}`); counts claims and records every path.
async fn fake_server(jobs: Vec<String>) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let claims = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(Mutex::new(Vec::new()));
    let (claims2, paths2) = (claims.clone(), paths.clone());
    let jobs = Arc::new(Mutex::new(jobs.into_iter()));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (claims, paths, jobs) = (claims2.clone(), paths2.clone(), jobs.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                paths.lock().unwrap().push(path.clone());
                let body = if path.ends_with("/version") {
                    r#"{"version":"fake"}"#.to_owned()
                } else if path.ends_with("/runner/claim") {
                    claims.fetch_add(1, Ordering::SeqCst);
                    jobs.lock()
                        .unwrap()
                        .next()
                        .unwrap_or_else(|| r#"{"job":null}"#.into())
                } else if path.ends_with("/runner/heartbeat") {
                    r#"{"queue_depth":0}"#.to_owned()
                } else {
                    r#"{"ok":true}"#.to_owned()
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/api"), claims, paths)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_without_a_positive_run_id_is_refused_and_claiming_goes_on() {
    let jobs = [0, -7]
        .iter()
        .map(|id| format!(r#"{{"job":{{"run_id":{id},"initial_prompt":"hi","env":{{"WS_TOKEN":"tok-badid-0123456789"}}}}}}"#))
        .collect();
    let (url, claims, paths) = fake_server(jobs).await;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("runner.log");
    let logf = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WS_API_URL", &url)
        .env("WSRUNNER_ALLOW_INSECURE", "1")
        .env("WSRUNNER_CREDENTIAL", "wsrc_fakecredential0123456789")
        .env("WSRUNNER_IMAGE", IMAGE)
        .env("WSRUNNER_NETWORK", "none")
        .env("WSRUNNER_DOCKER", engine_cli())
        .env("WSRUNNER_CACHE_ROOT", tmp.path().join("cache"))
        .env("WSRUNNER_JOURNAL_DIR", tmp.path().join("journal"))
        .env("WSRUNNER_POLL_INTERVAL", "100ms")
        .env("WSRUNNER_LEASE_YIELD", "1s")
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Both bad answers, each followed by a lease yield, then claiming again.
    while claims.load(Ordering::SeqCst) < 4 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "runner exited {status:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "claims stopped at {}:\n{}",
            claims.load(Ordering::SeqCst),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&child, libc::SIGTERM);
    let code = wait_exit(&mut child, Duration::from_secs(30)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("refused the claimed job"), "{text}");
    assert!(
        text.contains("run_id=0") && text.contains("run_id=-7"),
        "{text}"
    );
    assert_eq!(text.matches("yielding the lease").count(), 2, "{text}");
    assert!(!text.contains("panicked"), "{text}");
    let paths = paths.lock().unwrap().clone();
    assert!(
        !paths.iter().any(|p| p.contains("/runner/runs/")),
        "a run call for a bad id: {paths:?}"
    );
    // Nothing was journaled for the bad ids.
    let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(["journal", "--json", "--db"])
        .arg(tmp.path().join("journal"))
        .arg("list")
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
}

/// Every file under `dir`, read raw, holds no `needle`.
fn assert_absent_in_files(dir: &std::path::Path, needle: &str) {
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} found in {}",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_value_with_nul_fails_the_run_naming_only_its_key() {
    let h = Harness::start("input-nul").await;
    let secret = "sk-nulsecret-0123456789";
    let id = h.enqueue_with(r#"finish completed "ran""#, |r| {
        r.env = BTreeMap::from([
            ("OPENAI_API_KEY".to_owned(), format!("{secret}\0tail")),
            ("PLAIN".to_owned(), "fine".to_owned()),
        ]);
    });
    let mut child = h.runner(&[]);
    let run = h.wait_final(id).await;
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(60)).await, 0);
    assert_eq!(run.status, "failed", "{run:?}");
    assert!(
        run.error.contains("OPENAI_API_KEY") && run.error.contains("NUL"),
        "{run:?}"
    );
    assert!(!run.error.contains("sk-nul"), "{run:?}");
    assert!(!h.has_container_for(id), "a container was started");
    for e in h.events(id) {
        assert!(!format!("{e:?}").contains("sk-nul"), "{e:?}");
    }
    let log = h.log();
    assert!(log.contains("OPENAI_API_KEY"), "{log}");
    assert!(!log.contains("sk-nul"), "{log}");
    assert_absent_in_files(&h.journal_dir(), secret);
    let export = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .args(["journal", "--db"])
        .arg(h.journal_dir())
        .arg("export")
        .output()
        .unwrap();
    let export = String::from_utf8_lossy(&export.stdout);
    assert!(export.contains("OPENAI_API_KEY"), "{export}");
    assert!(!export.contains("sk-nul"), "{export}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_naming_a_repo_twice_fails_and_pushes_nothing() {
    let h = Harness::start("input-dup").await;
    // The scripted agent commits on request, so a run that went ahead would push.
    let id = h.enqueue_with(
        r#"commit file=agent.txt msg="agent change"; finish completed "did it""#,
        |r| {
            r.repos.push(EnqueueRepo {
                slug: SLUG.into(),
                base_ref: "main".into(),
                continue_branch: String::new(),
            });
        },
    );
    let mut child = h.runner(&[]);
    let run = h.wait_final(id).await;
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(60)).await, 0);
    assert_eq!(run.status, "failed", "{run:?}");
    assert!(run.error.contains("more than once"), "{run:?}");
    assert!(run.error.contains(SLUG), "{run:?}");
    assert!(!h.has_container_for(id), "a container was started");
    assert!(h.checkouts().is_empty(), "{:?}", h.checkouts());
    assert_eq!(h.remote_branch(&format!("agent-runs/run-{id}")), None);
    assert!(
        run.branch.is_empty() && run.result_repos.is_empty(),
        "{run:?}"
    );
}
