//! The seeded deterministic simulation of a runner host (docs/simulation.md).
//!
//! A seed draws a schedule ([`Scenario`]: runs with their agents' scripts, the concurrency,
//! faults: crashes at any journal record, server outages, git-proxy 503 windows, cancels,
//! drains, lost claim answers). [`run_seed`] plays it against an in-memory world (server,
//! engine, git, clock, and a [`MemJournal`](crate::journal::MemJournal) that dies at the
//! crash record) with the daemon's own rules ([`Rules`]: the state machine and journal
//! through `journal::commit_event`, the recovery table, the stop table, the heartbeat policy,
//! the git retry classifier, the agent-record budget), then checks the chaos suite's
//! invariants. The same seed gives the same trace, byte for byte.
//!
//! What it does not run: the async run task, the container session and the HTTP client
//! themselves (the real-Docker chaos suite, tests/chaos.rs, covers those end to end); here
//! their decisions are the real ones and their IO is simulated.

mod host;
mod rules;
mod scenario;
mod world;

pub use rules::{Finding, Rules};
pub use scenario::{AgentScript, Ending, Fault, Rng, Scenario};

use host::Sim;
use world::{agent_sha, FinalBy, ServerStatus};

use crate::fsm::{Event, RunState};
use crate::journal::{replay_run, Journal, Slot};

/// Most records a run may take whatever its agent prints: each attempt's fixed transitions
/// (claim, prepare, start, exit, push, report: about a dozen), its agent records
/// (`AGENT_RECORD_BUDGET` plus the coalesced ones) and the retries of a few restarts.
pub const MAX_RECORDS_PER_RUN: usize = 64;

/// What one schedule did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub rules: &'static str,
    pub scenario: Scenario,
    /// One line per action, in order: the replay of a seed is compared on it.
    pub trace: Vec<String>,
    /// Broken invariants (empty: the schedule passed).
    pub violations: Vec<String>,
    pub crashes: u32,
    pub records: u32,
}

impl Outcome {
    /// The trace as one text (what a failing seed prints).
    pub fn trace_text(&self) -> String {
        let mut s = format!(
            "seed {} rules {}\n{:?}\n",
            self.seed, self.rules, self.scenario
        );
        for line in &self.trace {
            s.push_str(line);
            s.push('\n');
        }
        s
    }
}

/// Plays the schedule of `seed` under `rules` and checks every invariant.
pub fn run_seed(seed: u64, rules: &Rules) -> Outcome {
    run_scenario(seed, Scenario::from_seed(seed), rules)
}

/// Plays `scenario` (its actors ordered by `seed`) under `rules`, and checks every invariant.
pub fn run_scenario(seed: u64, scenario: Scenario, rules: &Rules) -> Outcome {
    let mut sim = Sim::new(seed, scenario, rules.clone());
    sim.run();
    check(&mut sim);
    Outcome {
        seed,
        rules: rules.name(),
        scenario: sim.scenario.clone(),
        trace: std::mem::take(&mut sim.trace),
        violations: std::mem::take(&mut sim.violations),
        crashes: sim.ledger.crashes,
        records: sim.journal.appends(),
    }
}

/// The invariants after a schedule (docs/simulation.md lists them with the finding each
/// guards).
fn check(sim: &mut Sim) {
    let mut found = Vec::new();
    if !sim.settled {
        let open: Vec<String> = sim
            .server
            .runs
            .iter()
            .filter(|(_, r)| !matches!(r.status, ServerStatus::Final { .. }))
            .map(|(id, r)| format!("run {id} {:?}", r.status))
            .collect();
        let active = sim.journal.active().map(|a| a.len()).unwrap_or(0);
        found.push(format!(
            "stuck: not settled within {} s of virtual time (server: {open:?}; {active} run(s) active in the journal)",
            host::HORIZON_MS / 1000
        ));
    }
    let big_outage = sim.server.outages.iter().any(|(a, b)| {
        b - a
            >= world::LIVENESS_WINDOW_MS
                - Sim::heartbeat_interval_ms()
                - Sim::retry_gap_ms() * 6 / 5
    });
    for (&id, srv) in &sim.server.runs {
        if srv.reports_accepted > 1 {
            found.push(format!(
                "run {id}: {} reports accepted",
                srv.reports_accepted
            ));
        }
        let slots = sim.journal.records(id).unwrap_or_default();
        if slots.len() > MAX_RECORDS_PER_RUN {
            found.push(format!(
                "run {id}: {} journal records (bound {MAX_RECORDS_PER_RUN})",
                slots.len()
            ));
        }
        for finding in replay_run(&slots) {
            found.push(format!("run {id}: journal replay: {finding}"));
        }
        let records: Vec<_> = slots
            .iter()
            .filter_map(|s| match s {
                Slot::Record(r) => Some(r),
                Slot::Quarantined(_) => None,
            })
            .collect();
        let last = records.last().map(|r| &r.state);
        let stopped = records.iter().any(|r| {
            matches!(
                r.event,
                Event::CancelRequested { .. }
                    | Event::DrainDeadlinePassed
                    | Event::RunTimeoutPassed
                    | Event::RunNoLongerRunning
            )
        });
        let ServerStatus::Final { status, by } = &srv.status else {
            continue;
        };
        match by {
            FinalBy::Reaper => {
                let excused =
                    sim.ledger.unseen.contains(&id) || sim.ledger.lease_yields > 0 || big_outage;
                if !excused {
                    found.push(format!(
                        "run {id} was reaped (lease expired) while the runner was reachable"
                    ));
                }
            }
            FinalBy::ForceCancel => {}
            FinalBy::Report => {
                if let Some(RunState::Reported { verdict, .. }) = last {
                    if verdict.status.as_wire() != status {
                        found.push(format!(
                            "run {id}: the server has {status}, the journal {}",
                            verdict.status.as_wire()
                        ));
                    }
                }
                // Every line the agent printed reached the server once, in order (F5).
                let printed: Vec<&String> = sim
                    .ledger
                    .printed
                    .get(&id)
                    .map(|p| {
                        let mut p: Vec<&(u32, String)> = p.iter().collect();
                        p.sort_by_key(|(attempt, _)| *attempt);
                        p.into_iter().map(|(_, l)| l).collect()
                    })
                    .unwrap_or_default();
                let got: Vec<&String> = srv.agent_lines.iter().collect();
                if got != printed {
                    let same = got.iter().zip(&printed).take_while(|(a, b)| a == b).count();
                    found.push(format!(
                        "run {id}: the server has {} agent lines, the agent printed {} (first difference at line {same})",
                        got.len(),
                        printed.len()
                    ));
                }
                // Crashes, outages and transient git errors never change a verdict.
                if !stopped {
                    let script = &sim.scenario.runs[(id - 1) as usize];
                    // Spec 6.5: a finish decides; without one, the last error does.
                    let want = match script.ending {
                        Ending::Completed => "succeeded",
                        Ending::Silent if script.flood == 0 => "succeeded",
                        Ending::Silent | Ending::Blocked | Ending::Crashed => "failed",
                    };
                    if status != want {
                        found.push(format!(
                            "run {id}: reported {status}, its agent's script says {want}"
                        ));
                    }
                    let branch = format!("agent-runs/run-{id}");
                    let pushed = sim.git.remote.get(&branch);
                    if want == "succeeded" && script.commits && pushed != Some(&agent_sha(id)) {
                        found.push(format!(
                            "run {id}: succeeded without its commit on {branch}"
                        ));
                    }
                }
            }
        }
    }
    for (run, branch, _) in &sim.git.pushes {
        if branch != &format!("agent-runs/run-{run}") {
            found.push(format!("run {run} pushed {branch}"));
        }
    }
    if sim.settled {
        if !sim.engine.containers.is_empty() {
            found.push(format!(
                "containers left: {:?}",
                sim.engine.containers.keys().collect::<Vec<_>>()
            ));
        }
        if !sim.git.checkouts.is_empty() {
            found.push(format!(
                "checkouts left: {:?}",
                sim.git.checkouts.keys().collect::<Vec<_>>()
            ));
        }
    }
    for (deadline, exited) in &sim.ledger.drains {
        if let Some(exited) = exited {
            let late = exited - deadline;
            if late > Sim::drain_bound_ms() {
                found.push(format!(
                    "the drain ended {late} ms after its deadline (bound {} ms)",
                    Sim::drain_bound_ms()
                ));
            }
        }
    }
    for v in found {
        sim.violations.push(v);
    }
}

/// Runs `count` seeds from `first` (`wide`: [`Scenario::generate`]'s wide schedules);
/// returns the failing outcomes.
pub fn run_seeds(first: u64, count: u64, wide: bool, rules: &Rules) -> Vec<Outcome> {
    (first..first + count)
        .map(|seed| run_scenario(seed, Scenario::generate(seed, wide), rules))
        .filter(|o| !o.violations.is_empty())
        .collect()
}
