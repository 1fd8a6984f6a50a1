//! The shipped monitoring (deploy/monitoring/): every metric name the alert rules and the
//! Grafana dashboard use is exported by a running runner, and promtool accepts the rules and
//! every dashboard query. A rule or panel for a metric that does not exist fails here.

mod daemon_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use daemon_support::*;

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/monitoring")
        .join(file)
}

/// Every `windshift_*` identifier in `text` (PromQL in the rules, annotations included).
/// The rules' only other metric is `up`, which Prometheus itself records per target.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("windshift_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Every `expr` string of the dashboard's panels and variables' queries.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(monitoring("grafana-dashboard.json")).unwrap();
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Metric families a `/metrics` text declares (`# TYPE name kind`), with the sample names a
/// histogram adds.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_use_only_exported_metrics() {
    let rules = std::fs::read_to_string(monitoring("alerts.yml")).unwrap();
    for alert in [
        "WindshiftRunnerDown",
        "WindshiftRunnerCredentialRejected",
        "WindshiftRunnerHeartbeatFailing",
        "WindshiftRunnerRunsFailing",
        "WindshiftRunnerQueueWithoutFreeSlot",
        "WindshiftRunnerDiskLow",
        "WindshiftRunnerJournalErrors",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "no {alert} rule"
        );
    }
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    assert!(
        exprs.len() >= 10,
        "the dashboard has too few queries: {exprs:?}"
    );
    let mut used = metric_names(&rules);
    for e in &exprs {
        used.extend(metric_names(e));
    }
    assert!(used.len() >= 10, "{used:?}");

    let h = Harness::start("monitoring").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut runner = h.runner(&[
        ("WSRUNNER_METRICS_ADDR", addr.as_str()),
        ("WSRUNNER_CONCURRENCY", "2"),
    ]);
    let mut text = String::new();
    h.wait_until(
        Duration::from_secs(30),
        "/metrics of a healthy runner",
        || {
            text = http_get(port, "/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            metric(&text, "windshift_runner_healthy") == Some(1.0)
                && metric(&text, "windshift_runner_queue_depth").is_some()
        },
    )
    .await;
    let have = exported(&text);
    let missing: Vec<&String> = used.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "deploy/monitoring uses metrics the runner does not export: {missing:?}\n{text}"
    );
    // The values the free-slot and disk rules compute with.
    assert_eq!(metric(&text, "windshift_runner_slots"), Some(2.0), "{text}");
    assert_eq!(
        metric(&text, "windshift_runner_paused"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "windshift_runner_credential_rejected"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "windshift_runner_journal_errors_total"),
        Some(0.0),
        "{text}"
    );
    for dir in ["cache", "journal"] {
        let free = metric(
            &text,
            &format!("windshift_runner_filesystem_free_bytes{{dir=\"{dir}\"}}"),
        );
        let size = metric(
            &text,
            &format!("windshift_runner_filesystem_size_bytes{{dir=\"{dir}\"}}"),
        );
        assert!(
            matches!((free, size), (Some(f), Some(s)) if s > 0.0 && f <= s),
            "{dir}: {text}"
        );
    }
    signal(&runner, libc::SIGTERM);
    assert_eq!(wait_exit(&mut runner, Duration::from_secs(30)).await, 0);
}

#[test]
fn the_name_scan_finds_what_a_rule_uses() {
    let names = metric_names(
        "sum(windshift_runner_slots{a=\"b\"}) - xwindshift_no + windshift_runner_x_bucket",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["windshift_runner_slots", "windshift_runner_x_bucket"]
    );
}

/// promtool (Debian's `prometheus` package; .ci/run installs it and runs the rules check
/// itself) checks the rules, and every dashboard query as a recording rule.
#[test]
fn promtool_accepts_the_rules_and_the_dashboard_queries() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIP: promtool not installed (apt-get install prometheus); .ci/run installs it and runs `promtool check rules`");
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(monitoring("alerts.yml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool check rules: {out:?}");

    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    let tmp = tempfile::tempdir().unwrap();
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        // Grafana's variables, as Grafana would fill them in.
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("label_values(", "count by (instance) (")
            .replace(", instance)", ")");
        let quoted = serde_json::to_string(&e).unwrap();
        yaml.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {quoted}\n"
        ));
    }
    let file = tmp.path().join("dashboard-rules.yml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "dashboard queries: {out:?}");
}
