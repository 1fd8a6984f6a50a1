//! `windshift-runner ctl` against the real daemon: the socket's modes, a pause that holds
//! across a restart (no claim while a run is queued, heartbeats go on), resume, `status` with
//! a run in flight, a pause that lets that run finish, malformed requests, and `ctl` with no
//! runner.

mod daemon_support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use daemon_support::*;

fn ctl_dir(h: &Harness) -> PathBuf {
    // The default: `ctl` beside the journal directory.
    h.journal_dir().parent().unwrap().join("ctl")
}

/// Runs `windshift-runner ctl <args>` as an operator would: (exit code, stdout, stderr).
fn ctl(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .arg("ctl")
        .args(args)
        .env_clear()
        .env("WSRUNNER_JOURNAL_DIR", h.journal_dir())
        .output()
        .expect("ctl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `pause` line of `windshift-runner doctor` run with the runner's settings.
fn doctor_pause_line(h: &Harness) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
        .arg("doctor")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WS_API_URL", h.api_url())
        .env("WSRUNNER_ALLOW_INSECURE", "1")
        .env("WSRUNNER_IMAGE", IMAGE)
        .env("WSRUNNER_NETWORK", "none")
        .env("WSRUNNER_DOCKER", engine_cli())
        .env("WSRUNNER_CACHE_ROOT", h.cache_root())
        .env("WSRUNNER_JOURNAL_DIR", h.journal_dir())
        .output()
        .expect("doctor runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some("pause"))
        .unwrap_or_else(|| panic!("no pause line in\n{text}"))
        .to_owned()
}

fn ok_ctl(h: &Harness, args: &[&str]) -> String {
    let (code, out, err) = ctl(h, args);
    assert_eq!(code, 0, "ctl {args:?}: {out}{err}\n{}", h.log());
    out
}

/// Claim calls the runner has made (every outcome).
fn claims(port: u16) -> f64 {
    let text = http_get(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("windshift_runner_requests_total{call=\"claim\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn last_heartbeat(h: &Harness) -> i64 {
    h.dev()
        .core()
        .instances()
        .into_iter()
        .find(|i| i.name == h.name)
        .and_then(|i| i.last_heartbeat_at_ms)
        .unwrap_or(0)
}

/// While paused: the server records two more heartbeats (more than ten poll intervals at
/// 200 ms), and through all of it `queued` stays queued and the runner sends no claim.
async fn assert_paused_while_heartbeating(h: &Harness, port: u16, queued: i64) {
    let claims_before = claims(port);
    let mut beats = vec![last_heartbeat(h)];
    h.wait_until(
        Duration::from_secs(20),
        "two heartbeats while paused",
        || {
            let run = h.run(queued);
            assert_eq!(
                run.status,
                "queued",
                "a paused runner claimed: {run:?}\n{}",
                h.log()
            );
            assert_eq!(
                claims(port),
                claims_before,
                "a paused runner sent a claim\n{}",
                h.log()
            );
            let beat = last_heartbeat(h);
            if beat > *beats.last().unwrap() {
                beats.push(beat);
            }
            beats.len() >= 3
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_survives_a_restart_and_resume_claims_again() {
    let h = Harness::start("ctl-pause").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = [("WSRUNNER_METRICS_ADDR", addr.as_str())];
    let mut runner = h.runner(&env);
    h.wait_ready(1).await;

    // The socket is 0600 in a 0700 directory.
    let dir = ctl_dir(&h);
    let sock = std::fs::metadata(dir.join("ctl.sock")).expect("ctl.sock exists");
    assert!(sock.file_type().is_socket());
    assert_eq!(sock.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let status = ok_ctl(&h, &["status"]);
    assert!(status.contains("claims:  claiming"), "{status}");
    assert!(status.contains("0 in flight, 1 slot(s)"), "{status}");

    let paused = ok_ctl(&h, &["pause"]);
    assert!(paused.contains("claims:  paused since"), "{paused}");
    let file = std::fs::metadata(dir.join("paused")).expect("the pause is persisted");
    assert_eq!(file.permissions().mode() & 0o777, 0o600);
    let text = http_get(port, "/metrics").unwrap().1;
    assert_eq!(
        metric(&text, "windshift_runner_paused"),
        Some(1.0),
        "{text}"
    );
    let (code, body) = http_get(port, "/healthz").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("paused"), "{body}");
    // Pausing twice is fine and keeps the first time.
    assert_eq!(ok_ctl(&h, &["pause"]), paused);

    let line = doctor_pause_line(&h);
    assert!(
        line.starts_with("WARN pause") && line.contains("ctl resume"),
        "{line}"
    );
    let id = h.enqueue(r#"commit file=p.txt msg="after resume"; finish completed "ok""#);
    assert_paused_while_heartbeating(&h, port, id).await;

    // A restart keeps the pause.
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
    let (code, _, err) = ctl(&h, &["status"]);
    assert_eq!(code, 3, "ctl against a stopped runner: {err}");
    assert!(err.contains("windshift-runner is not running"), "{err}");
    let mut runner = h.runner(&env);
    h.wait_ready(2).await;
    assert!(h.log().contains("paused (persisted)"), "{}", h.log());
    let status = ok_ctl(&h, &["status"]);
    assert!(status.contains("claims:  paused since"), "{status}");
    h.wait_until(
        Duration::from_secs(10),
        "metrics of the new process",
        || {
            http_get(port, "/metrics")
                .is_some_and(|(_, t)| metric(&t, "windshift_runner_paused") == Some(1.0))
        },
    )
    .await;
    assert_paused_while_heartbeating(&h, port, id).await;

    let resumed = ok_ctl(&h, &["resume"]);
    assert!(resumed.contains("claims:  claiming"), "{resumed}");
    assert!(!dir.join("paused").exists());
    let line = doctor_pause_line(&h);
    assert!(line.starts_with("PASS pause"), "{line}");
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{}", h.log());
    let text = http_get(port, "/metrics").unwrap().1;
    assert_eq!(
        metric(&text, "windshift_runner_paused"),
        Some(0.0),
        "{text}"
    );
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
}

/// Sends raw bytes on the control socket and returns the answer line.
fn raw_request(h: &Harness, bytes: &[u8]) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(ctl_dir(h).join("ctl.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The runner may answer and close before a long request is fully written.
    let _ = s.write_all(bytes);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_run_in_flight_and_a_pause_lets_it_finish() {
    let h = Harness::start("ctl-status").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut runner = h.runner(&[("WSRUNNER_METRICS_ADDR", addr.as_str())]);
    let id = h.enqueue(r#"say start; sleep 3000; finish completed "done""#);
    h.wait_until(Duration::from_secs(60), "the agent running", || {
        h.agent_printed(id, "start")
    })
    .await;

    let json: serde_json::Value = serde_json::from_str(&ok_ctl(&h, &["--json", "status"])).unwrap();
    let status = &json["status"];
    assert_eq!(status["paused"], false, "{json}");
    assert_eq!(status["health"], "healthy", "{json}");
    let row = &status["runs"][0];
    assert_eq!(row["id"], id, "{json}");
    assert_eq!(row["state"], "running", "{json}");
    assert!(row["since_ms"].as_i64().unwrap() > 0, "{json}");
    let container = row["container"].as_str().unwrap().to_owned();
    assert!(
        container.starts_with("wsr-") && container.contains(&format!("-run-{id}-")),
        "{json}"
    );
    let text = ok_ctl(&h, &["status"]);
    assert!(
        text.lines().any(|l| l.starts_with(&format!("{id} "))
            && l.contains("running")
            && l.ends_with(&container)),
        "{text}"
    );

    // Paused with a run in flight: it finishes; the next one waits.
    ok_ctl(&h, &["pause"]);
    let next = h.enqueue(r#"finish completed "later""#);
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded", "{}", h.log());
    assert_paused_while_heartbeating(&h, port, next).await;

    // Malformed requests get an error answer; the runner goes on.
    for bad in [
        &b"garbage\n"[..],
        b"{\"cmd\":\"reboot\"}\n",
        b"\xff\xfe\n",
        &[b'{'; 10_000][..],
    ] {
        let answer = raw_request(&h, bad);
        assert_eq!(answer["ok"], false, "{answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
    }
    let status = ok_ctl(&h, &["status"]);
    assert!(status.contains("claims:  paused"), "{status}");
    assert!(status.contains("0 in flight"), "{status}");
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
}
