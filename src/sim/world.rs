//! The simulated world around the runner: the journal's storage (a [`MemJournal`] that the
//! schedule can crash at any record), the server, the container engine and git. All in
//! memory, all driven by the simulation's virtual clock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::journal::{Journal, JournalError, MemJournal, Record, Slot};

/// The journal the simulated runner writes: a [`MemJournal`] that survives runner deaths,
/// and dies with the runner at the schedule's crash record.
pub struct CrashJournal {
    pub mem: MemJournal,
    appends: AtomicU32,
    crash_at: AtomicU32,
    before_flush: AtomicBool,
    crashed: AtomicBool,
}

impl CrashJournal {
    pub fn new() -> CrashJournal {
        CrashJournal {
            mem: MemJournal::new(),
            appends: AtomicU32::new(0),
            crash_at: AtomicU32::new(0),
            before_flush: AtomicBool::new(false),
            crashed: AtomicBool::new(false),
        }
    }

    /// Arms a crash at the `record`-th append from now on (0: none).
    pub fn arm(&self, record: u32, before_flush: bool) {
        let done = self.appends.load(Ordering::SeqCst);
        self.crash_at.store(done + record, Ordering::SeqCst);
        self.before_flush.store(before_flush, Ordering::SeqCst);
    }

    /// The runner died at its crash record (its process must stop acting now).
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// The restart: what was not flushed is gone; the next process may write again.
    pub fn restart(&self) {
        self.mem.crash();
        self.crashed.store(false, Ordering::SeqCst);
    }

    pub fn appends(&self) -> u32 {
        self.appends.load(Ordering::SeqCst)
    }

    /// The last durable seq of `run_id` (what a restarted process would read).
    pub fn durable_seq(&self, run_id: i64) -> u64 {
        self.mem.durable_seq(run_id)
    }
}

impl Journal for CrashJournal {
    fn append(&self, record: &Record) -> Result<(), JournalError> {
        if self.crashed() {
            return Err(JournalError::Io("the runner process is dead".into()));
        }
        self.mem.append(record)?;
        let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.crash_at.load(Ordering::SeqCst) && self.before_flush.load(Ordering::SeqCst) {
            self.crashed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), JournalError> {
        if self.crashed() {
            return Err(JournalError::Io("killed before the flush".into()));
        }
        self.mem.flush()?;
        if self.appends() == self.crash_at.load(Ordering::SeqCst) {
            // Killed after the flush, before the effects run.
            self.crashed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn active(&self) -> Result<Vec<Slot>, JournalError> {
        self.mem.active()
    }

    fn run_ids(&self) -> Result<Vec<i64>, JournalError> {
        self.mem.run_ids()
    }

    fn records(&self, run_id: i64) -> Result<Vec<Slot>, JournalError> {
        self.mem.records(run_id)
    }

    fn set_unresolved_claim(&self, since_ms: Option<i64>) -> Result<(), JournalError> {
        self.mem.set_unresolved_claim(since_ms)
    }

    fn unresolved_claim(&self) -> Result<Option<i64>, JournalError> {
        self.mem.unresolved_claim()
    }
}

/// A run as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerStatus {
    Queued,
    Running,
    /// Final: the runner's report, the reaper (`lease expired`) or a force-cancel.
    Final {
        status: String,
        by: FinalBy,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalBy {
    Report,
    Reaper,
    ForceCancel,
}

#[derive(Debug, Clone)]
pub struct ServerRun {
    pub status: ServerStatus,
    /// The agent lines the runner forwarded, in the order the server stored them.
    pub agent_lines: Vec<String>,
    /// Runner events of its own (lifecycle).
    pub runner_events: u32,
    /// A user asked to cancel: listed in every heartbeat's `abort` until final.
    pub cancel_requested: bool,
    /// Results the server accepted (at most one, by its compare-and-swap).
    pub reports_accepted: u32,
}

/// The server: a queue, run statuses, the lease and its reaper.
#[derive(Debug, Default)]
pub struct Server {
    pub runs: BTreeMap<i64, ServerRun>,
    /// Unreachable windows `[from, to)`.
    pub outages: Vec<(i64, i64)>,
    /// The last time the runner's instance was heard from (heartbeat or claim).
    pub last_contact_ms: i64,
}

/// The server's liveness window (the devserver's and upstream's lease).
pub const LIVENESS_WINDOW_MS: i64 = 60_000;

impl Server {
    pub fn up(&self, now: i64) -> bool {
        !self.outages.iter().any(|(a, b)| (*a..*b).contains(&now))
    }

    /// When the outage covering `now` ends.
    pub fn back_at(&self, now: i64) -> i64 {
        self.outages
            .iter()
            .filter(|(a, b)| (*a..*b).contains(&now))
            .map(|(_, b)| *b)
            .max()
            .unwrap_or(now)
    }

    pub fn is_final(&self, run_id: i64) -> bool {
        matches!(
            self.runs.get(&run_id).map(|r| &r.status),
            Some(ServerStatus::Final { .. })
        )
    }

    /// Hands out the oldest queued run.
    pub fn claim(&mut self, now: i64) -> Option<i64> {
        self.last_contact_ms = now;
        let (&id, run) = self
            .runs
            .iter_mut()
            .find(|(_, r)| r.status == ServerStatus::Queued)?;
        run.status = ServerStatus::Running;
        Some(id)
    }

    /// The runner's result call: accepted once, then 409.
    pub fn report(&mut self, run_id: i64, status: &str) -> bool {
        let Some(run) = self.runs.get_mut(&run_id) else {
            return false;
        };
        if run.status != ServerStatus::Running {
            return false;
        }
        run.status = ServerStatus::Final {
            status: status.to_owned(),
            by: FinalBy::Report,
        };
        run.reports_accepted += 1;
        true
    }

    /// Fails every running run once the instance was silent past the window.
    pub fn reap(&mut self, now: i64) -> Vec<i64> {
        if now - self.last_contact_ms <= LIVENESS_WINDOW_MS {
            return Vec::new();
        }
        let mut reaped = Vec::new();
        for (id, run) in &mut self.runs {
            if run.status == ServerStatus::Running {
                run.status = ServerStatus::Final {
                    status: "failed".into(),
                    by: FinalBy::Reaper,
                };
                reaped.push(*id);
            }
        }
        reaped
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerPhase {
    Created,
    Running,
    Exited(i32),
}

/// One agent container.
#[derive(Debug, Clone)]
pub struct Container {
    pub run_id: i64,
    pub attempt: u32,
    pub phase: ContainerPhase,
    /// Everything it printed (what `docker logs` returns).
    pub log: Vec<String>,
    /// The next script line it prints.
    pub next_line: usize,
    /// Asked to stop (abort line, stdin closed, SIGTERM) at this time.
    pub stop_asked_at: Option<i64>,
}

/// The engine: containers by name, and the per-container output progress files the runner
/// keeps in its state directory (they survive its death, like the files on disk).
#[derive(Debug, Default)]
pub struct Engine {
    pub containers: BTreeMap<String, Container>,
    /// Agent lines of each container the server has (the runner's `forwarded-lines` file).
    pub forwarded: BTreeMap<String, usize>,
}

impl Engine {
    pub fn of_run(&self, run_id: i64) -> Vec<String> {
        let mut found: Vec<(&String, &Container)> = self
            .containers
            .iter()
            .filter(|(_, c)| c.run_id == run_id)
            .collect();
        found.sort_by_key(|(_, c)| c.attempt);
        found.into_iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Git: the runs' checkouts (the run branch head each points at) and the remote's branches.
#[derive(Debug, Default)]
pub struct Git {
    pub checkouts: BTreeMap<i64, String>,
    pub remote: BTreeMap<String, String>,
    /// Windows `[from, to)` in which the git proxy answers 503.
    pub flaky: Vec<(i64, i64)>,
    /// Every ref a push wrote, with the run that pushed it.
    pub pushes: Vec<(i64, String, String)>,
}

/// What git prints when the proxy answers 503 (the sample the real classifier is tested on).
pub const PROXY_503: &str =
    "fatal: unable to access 'http://127.0.0.1/git-proxy/7/acme/app/': The requested URL returned error: 503";

impl Git {
    pub fn failing(&self, now: i64) -> bool {
        self.flaky.iter().any(|(a, b)| (*a..*b).contains(&now))
    }
}

/// The base commit of every simulated repo.
pub const BASE_SHA: &str = "1111111111111111111111111111111111111111";

/// The commit the agent of `run_id` makes.
pub fn agent_sha(run_id: i64) -> String {
    format!("{:040x}", 0xa9e_0000 + run_id)
}
