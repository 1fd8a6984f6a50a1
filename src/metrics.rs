//! Runner metrics in the Prometheus text exposition format, plus the health verdict behind
//! `/healthz`. Counters and gauges are plain atomics or small maps behind a mutex: the runner
//! updates a handful of them per run, so a metrics crate would buy nothing here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Histogram bucket bounds for journal commit latency, in seconds.
const COMMIT_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A counter family keyed by its label values.
#[derive(Default)]
struct LabeledCounter {
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl LabeledCounter {
    fn inc(&self, labels: &[&str]) {
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        *values.entry(key).or_insert(0) += 1;
    }

    fn get(&self, labels: &[&str]) -> u64 {
        let key: Vec<String> = labels.iter().map(|s| (*s).to_owned()).collect();
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.get(&key).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String, name: &str, help: &str, label_names: &[&str]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        for (labels, value) in values.iter() {
            let pairs: Vec<String> = label_names
                .iter()
                .zip(labels)
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {value}", pairs.join(","));
        }
    }
}

/// A fixed-bucket histogram.
struct Histogram {
    buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, bucket) in COMMIT_BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in COMMIT_BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Every metric the runner exports. One instance per process, shared by reference.
#[derive(Default)]
pub struct Metrics {
    runs_finished: LabeledCounter,
    runs_in_flight: AtomicI64,
    requests: LabeledCounter,
    queue_depth: AtomicI64,
    journal_commit: Histogram,
    recovery_decisions: LabeledCounter,
    events_sent: AtomicU64,
    events_merged: AtomicU64,
    events_dropped: AtomicU64,
    health: Mutex<Health>,
    // Operations (docs/deploy.md, "Monitoring"): what the shipped alerts and dashboard read.
    slots: AtomicI64,
    paused: AtomicI64,
    credential_rejected: AtomicI64,
    heartbeat_failures: AtomicI64,
    journal_errors: AtomicU64,
    /// Filesystems whose free/total bytes are read (statvfs) at each scrape: (label, path).
    filesystems: Mutex<Vec<(&'static str, PathBuf)>>,
}

/// Whether the runner is healthy, with the reason when it is not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Health {
    #[default]
    Starting,
    Healthy,
    Unhealthy(String),
}

impl Metrics {
    pub fn run_started(&self) {
        self.runs_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A run reached a terminal state; `status` is the reported status (or `abandoned`).
    pub fn run_finished(&self, status: &str) {
        self.runs_in_flight.fetch_sub(1, Ordering::Relaxed);
        self.runs_finished.inc(&[status]);
    }

    /// One control-plane call's outcome: `call` is claim/heartbeat/report/events/register,
    /// `outcome` a short word (ok, http_429, http_5xx, network, …).
    pub fn request(&self, call: &str, outcome: &str) {
        self.requests.inc(&[call, outcome]);
    }

    pub fn requests_total(&self, call: &str, outcome: &str) -> u64 {
        self.requests.get(&[call, outcome])
    }

    pub fn set_queue_depth(&self, depth: i64) {
        self.queue_depth.store(depth, Ordering::Relaxed);
    }

    pub fn journal_commit(&self, latency: Duration) {
        self.journal_commit.observe(latency);
    }

    pub fn recovery_decision(&self, decision: &str) {
        self.recovery_decisions.inc(&[decision]);
    }

    /// Adds the event sender's running totals (deltas since the last call).
    pub fn events(&self, sent: u64, merged: u64, dropped: u64) {
        self.events_sent.fetch_add(sent, Ordering::Relaxed);
        self.events_merged.fetch_add(merged, Ordering::Relaxed);
        self.events_dropped.fetch_add(dropped, Ordering::Relaxed);
    }

    /// Run slots of this runner (`WSRUNNER_CONCURRENCY`): free = slots - runs_in_flight.
    pub fn set_slots(&self, slots: usize) {
        self.slots
            .store(i64::try_from(slots).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(i64::from(paused), Ordering::Relaxed);
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed) != 0
    }

    pub fn set_credential_rejected(&self, rejected: bool) {
        self.credential_rejected
            .store(i64::from(rejected), Ordering::Relaxed);
    }

    /// Heartbeats failed in a row (0 after one the server answered).
    pub fn set_heartbeat_failures(&self, failures: u64) {
        self.heartbeat_failures.store(
            i64::try_from(failures).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }

    /// A journal write or flush failed (a run left for recovery, a claim not taken).
    pub fn journal_error(&self) {
        self.journal_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Watches the filesystem holding `path` under the label `dir=<label>`.
    pub fn watch_filesystem(&self, label: &'static str, path: PathBuf) {
        let mut fs = self.filesystems.lock().unwrap_or_else(|e| e.into_inner());
        fs.retain(|(l, _)| *l != label);
        fs.push((label, path));
    }

    pub fn set_health(&self, health: Health) {
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = health;
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.runs_finished.render(
            &mut out,
            "windshift_runner_runs_finished_total",
            "Runs that reached a terminal state, by reported status.",
            &["status"],
        );
        gauge(
            &mut out,
            "windshift_runner_runs_in_flight",
            "Runs currently claimed and not yet terminal.",
            self.runs_in_flight.load(Ordering::Relaxed),
        );
        self.requests.render(
            &mut out,
            "windshift_runner_requests_total",
            "Control-plane calls by call and outcome.",
            &["call", "outcome"],
        );
        gauge(
            &mut out,
            "windshift_runner_queue_depth",
            "Queued runs for this pool, from the last heartbeat.",
            self.queue_depth.load(Ordering::Relaxed),
        );
        self.journal_commit.render(
            &mut out,
            "windshift_runner_journal_commit_seconds",
            "Journal transition commit latency (transaction + flush).",
        );
        self.recovery_decisions.render(
            &mut out,
            "windshift_runner_recovery_decisions_total",
            "Recovery decisions taken at start-up, by decision.",
            &["decision"],
        );
        for (name, help, value) in [
            (
                "windshift_runner_events_sent_total",
                "Run events accepted by the server.",
                &self.events_sent,
            ),
            (
                "windshift_runner_events_merged_total",
                "Agent content events merged into a neighbour under backlog.",
                &self.events_merged,
            ),
            (
                "windshift_runner_events_dropped_total",
                "Run events not delivered: the run was final or not ours (409/403/404), the event was refused (400), or its retry budget ran out.",
                &self.events_dropped,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let healthy = i64::from(self.health() == Health::Healthy);
        gauge(
            &mut out,
            "windshift_runner_healthy",
            "1 when the runner is healthy (see /healthz for the reason when not).",
            healthy,
        );
        for (name, help, value) in [
            (
                "windshift_runner_slots",
                "Runs this runner executes at once (WSRUNNER_CONCURRENCY); free slots = slots - runs_in_flight.",
                &self.slots,
            ),
            (
                "windshift_runner_paused",
                "1 while paused by `windshift-runner ctl pause`: no new claims, heartbeats go on.",
                &self.paused,
            ),
            (
                "windshift_runner_credential_rejected",
                "1 once the server rejected the runner credential (401/403); the runner stops claiming and exits 77.",
                &self.credential_rejected,
            ),
            (
                "windshift_runner_heartbeat_consecutive_failures",
                "Heartbeats failed in a row; 0 after one the server answered.",
                &self.heartbeat_failures,
            ),
        ] {
            gauge(&mut out, name, help, value.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP windshift_runner_journal_errors_total Journal writes or flushes that failed.\n# TYPE windshift_runner_journal_errors_total counter\nwindshift_runner_journal_errors_total {}",
            self.journal_errors.load(Ordering::Relaxed)
        );
        self.render_filesystems(&mut out);
        out
    }

    fn render_filesystems(&self, out: &mut String) {
        let fs = self
            .filesystems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let stats: Vec<(&str, u64, u64)> = fs
            .iter()
            .filter_map(|(label, path)| {
                // f_bavail: what an unprivileged writer (the runner) may still use.
                let st = rustix::fs::statvfs(path.as_path()).ok()?;
                Some((
                    *label,
                    st.f_bavail.saturating_mul(st.f_frsize),
                    st.f_blocks.saturating_mul(st.f_frsize),
                ))
            })
            .collect();
        for (name, help, pick) in [
            (
                "windshift_runner_filesystem_free_bytes",
                "Bytes available to the runner on the filesystem of its cache or journal directory.",
                (|s: &(&str, u64, u64)| s.1) as fn(&(&str, u64, u64)) -> u64,
            ),
            (
                "windshift_runner_filesystem_size_bytes",
                "Size in bytes of the filesystem of the runner's cache or journal directory.",
                |s| s.2,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for s in &stats {
                let _ = writeln!(out, "{name}{{dir=\"{}\"}} {}", s.0, pick(s));
            }
        }
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let m = Metrics::default();
        m.run_started();
        m.run_started();
        m.run_finished("succeeded");
        m.request("claim", "ok");
        m.request("claim", "ok");
        m.request("report", "http_5xx");
        m.set_queue_depth(4);
        m.journal_commit(Duration::from_millis(2));
        m.recovery_decision("reattach");
        m.events(10, 2, 1);
        let text = m.render();
        for line in [
            "windshift_runner_runs_finished_total{status=\"succeeded\"} 1",
            "windshift_runner_runs_in_flight 1",
            "windshift_runner_requests_total{call=\"claim\",outcome=\"ok\"} 2",
            "windshift_runner_requests_total{call=\"report\",outcome=\"http_5xx\"} 1",
            "windshift_runner_queue_depth 4",
            "windshift_runner_journal_commit_seconds_bucket{le=\"0.001\"} 0",
            "windshift_runner_journal_commit_seconds_bucket{le=\"0.0025\"} 1",
            "windshift_runner_journal_commit_seconds_count 1",
            "windshift_runner_recovery_decisions_total{decision=\"reattach\"} 1",
            "windshift_runner_events_sent_total 10",
            "windshift_runner_events_merged_total 2",
            "windshift_runner_events_dropped_total 1",
            "windshift_runner_healthy 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        m.set_health(Health::Healthy);
        assert!(m
            .render()
            .lines()
            .any(|l| l == "windshift_runner_healthy 1"));
    }

    #[test]
    fn operations_gauges_and_filesystems() {
        let m = Metrics::default();
        m.set_slots(3);
        m.set_paused(true);
        m.set_credential_rejected(true);
        m.set_heartbeat_failures(4);
        m.journal_error();
        let dir = tempfile::tempdir().unwrap();
        m.watch_filesystem("cache", dir.path().to_path_buf());
        m.watch_filesystem("journal", dir.path().join("missing"));
        let text = m.render();
        for line in [
            "windshift_runner_slots 3",
            "windshift_runner_paused 1",
            "windshift_runner_credential_rejected 1",
            "windshift_runner_heartbeat_consecutive_failures 4",
            "windshift_runner_journal_errors_total 1",
            "# TYPE windshift_runner_filesystem_free_bytes gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let free = text
            .lines()
            .find_map(|l| l.strip_prefix("windshift_runner_filesystem_free_bytes{dir=\"cache\"} "))
            .and_then(|v| v.parse::<u64>().ok());
        let size = text
            .lines()
            .find_map(|l| l.strip_prefix("windshift_runner_filesystem_size_bytes{dir=\"cache\"} "))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(
            matches!((free, size), (Some(f), Some(s)) if s > 0 && f <= s),
            "{text}"
        );
        // A path that cannot be read is left out, not reported as 0 bytes free.
        assert!(!text.contains("dir=\"journal\""), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.recovery_decision("a\"b\nc");
        assert!(m
            .render()
            .contains("windshift_runner_recovery_decisions_total{decision=\"a\\\"b\\nc\"} 1"));
    }
}
