//! The daemon's systemd notify protocol, observed on a real notify socket: READY=1 only after
//! journal recovery, WATCHDOG=1 while healthy, STOPPING=1 with EXTEND_TIMEOUT_USEC on SIGTERM.

mod daemon_support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use daemon_support::*;

fn collect_until(
    sock: &UnixDatagram,
    deadline: Instant,
    mut done: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !done(&got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_recovery_watchdog_while_healthy_stopping_on_sigterm() {
    let h = Harness::start("sdnotify").await;
    let sock_path = h.tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // A run in flight when the runner dies, so the next start has something to recover.
    let id = h.enqueue(r#"sleep 1500; commit file=w.txt msg=w; finish completed done"#);
    let mut first = h.runner(&[("WSRUNNER_TEST_CRASH_AFTER", "container_started")]);
    assert_eq!(wait_exit(&mut first, Duration::from_secs(60)).await, -1);

    let sock_str = sock_path.display().to_string();
    let mut runner = h.runner(&[
        ("NOTIFY_SOCKET", sock_str.as_str()),
        ("WATCHDOG_USEC", "2000000"),
    ]);
    let messages = tokio::task::spawn_blocking(move || {
        let got = collect_until(&sock, Instant::now() + Duration::from_secs(60), |m| {
            m.iter().any(|x| x.contains("READY=1"))
                && m.iter().filter(|x| x.contains("WATCHDOG=1")).count() >= 2
        });
        (sock, got)
    });
    let (sock, got) = messages.await.unwrap();
    let ready_at = got
        .iter()
        .position(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {got:?}\n{}", h.log()));
    assert!(
        got.iter()
            .skip(ready_at)
            .filter(|m| m.contains("WATCHDOG=1"))
            .count()
            >= 2,
        "watchdog pings while healthy: {got:?}"
    );
    assert!(got
        .iter()
        .any(|m| m.starts_with("STATUS=") || m.contains("\nSTATUS=")));
    // READY came after the recovery decision was taken and logged.
    let log = h.log();
    let recovered = log.rfind("recovering run").expect("recovery logged");
    let worker = log.rfind("worker started").expect("worker started logged");
    assert!(recovered < worker, "recovery before readiness");
    assert!(
        got[ready_at].contains("1 run(s) resumed"),
        "{}",
        got[ready_at]
    );

    // The run finishes, then SIGTERM: STOPPING=1 (with EXTEND_TIMEOUT_USEC while draining).
    let run = h.wait_final(id).await;
    assert_eq!(run.status, "succeeded");
    let id2 = h.enqueue(r#"sleep 3000; finish completed later"#);
    h.wait_run(
        id2,
        Duration::from_secs(60),
        "the second run running",
        |r| r.status == "running",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&runner, libc::SIGTERM);
    let stopping = tokio::task::spawn_blocking(move || {
        collect_until(&sock, Instant::now() + Duration::from_secs(30), |m| {
            m.iter().any(|x| x.contains("STOPPING=1"))
        })
    })
    .await
    .unwrap();
    let stop = stopping
        .iter()
        .find(|m| m.contains("STOPPING=1"))
        .unwrap_or_else(|| panic!("no STOPPING=1 in {stopping:?}"));
    assert!(stop.contains("EXTEND_TIMEOUT_USEC="), "{stop}");
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(60)).await, 0);
    assert_eq!(h.run(id2).status, "succeeded", "drained, not cancelled");
}
