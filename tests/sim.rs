//! The seeded deterministic simulation (src/sim, docs/simulation.md): thousands of schedules
//! with crashes at any journal record, outages, git-proxy errors, cancels, drains and lost
//! claim answers, each checked against the chaos suite's invariants; a failing seed replays
//! byte for byte; each chaos finding (docs/RELIABILITY.md) is a named seed that fails with
//! the rule the runner had before its fix.
//!
//! `WSR_SIM_SCHEDULES=N` (default 2,500 per shard, four shards) runs more: the long mode.
//! `WSR_SIM_WIDE=1` draws wider schedules (more runs, concurrency, faults).
//! `WSR_SIM_SEED=S` prints the trace of one seed (`WSR_SIM_WIDE=1` for a wide one).

use windshift_runner::sim::{run_scenario, run_seed, run_seeds, Finding, Outcome, Rules, Scenario};

/// Each finding's seed: the first seed whose schedule breaks an invariant under the rule the
/// runner had before the fix (found by scanning seeds from 0 with `Rules::without`).
const FINDING_SEEDS: &[(Finding, u64)] = &[
    (Finding::F5LostOutputTail, 3),
    (Finding::F6ForgottenClaim, 20),
    (Finding::F7TransientGit, 14),
    (Finding::F8SlowShutdown, 720),
    (Finding::F9HungDrain, 123),
    (Finding::F10ReapedByOutage, 731),
    (Finding::DeadlineBeforeReport, 3929),
    (Finding::AgentJournalFlood, 32),
    (Finding::UnjournaledStartVerdict, 147),
    (Finding::StopWaitsOnAgent, 114),
];

fn schedules_per_shard() -> u64 {
    std::env::var("WSR_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| n.div_ceil(4))
        .unwrap_or(2_500)
}

fn shard(index: u64) {
    let per = schedules_per_shard();
    let first = index * per;
    let wide = std::env::var("WSR_SIM_WIDE").is_ok_and(|v| v == "1");
    let failing = run_seeds(first, per, wide, &Rules::current());
    if let Some(worst) = failing.first() {
        panic!(
            "{} of {per} schedules broke an invariant; seeds {:?}; replay one with WSR_SIM_SEED={}\n{}\n--- trace ---\n{}",
            failing.len(),
            failing.iter().map(|o| o.seed).take(20).collect::<Vec<_>>(),
            worst.seed,
            worst.violations.join("\n"),
            worst.trace_text()
        );
    }
}

#[test]
fn schedules_shard_0_keep_every_invariant() {
    shard(0);
}

#[test]
fn schedules_shard_1_keep_every_invariant() {
    shard(1);
}

#[test]
fn schedules_shard_2_keep_every_invariant() {
    shard(2);
}

#[test]
fn schedules_shard_3_keep_every_invariant() {
    shard(3);
}

/// A tool, not a check: `WSR_SIM_SEED=S cargo test --test sim one_seed -- --ignored --nocapture`.
#[test]
#[ignore = "a tool: prints the trace of the seed WSR_SIM_SEED names"]
fn one_seed_prints_its_trace_when_asked() {
    let seed: u64 = std::env::var("WSR_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("set WSR_SIM_SEED to the seed to replay");
    let wide = std::env::var("WSR_SIM_WIDE").is_ok_and(|v| v == "1");
    let outcome = run_scenario(seed, Scenario::generate(seed, wide), &Rules::current());
    println!("{}", outcome.trace_text());
    assert!(outcome.violations.is_empty(), "{:?}", outcome.violations);
}

#[test]
fn each_finding_has_a_seed_that_fails_without_its_fix_and_passes_with_it() {
    use strum::IntoEnumIterator;
    for finding in Finding::iter() {
        let Some((_, seed)) = FINDING_SEEDS.iter().find(|(f, _)| *f == finding) else {
            panic!("{finding:?} has no named seed");
        };
        let fixed = run_seed(*seed, &Rules::current());
        assert!(
            fixed.violations.is_empty(),
            "{finding:?} seed {seed} with the fix: {:?}\n{}",
            fixed.violations,
            fixed.trace_text()
        );
        let broken = run_seed(*seed, &Rules::without(finding));
        assert!(
            !broken.violations.is_empty(),
            "{finding:?} seed {seed} passed without the fix\n{}",
            broken.trace_text()
        );
    }
}

fn same_trace(a: &Outcome, b: &Outcome) -> bool {
    a.trace_text() == b.trace_text() && a.violations == b.violations
}

#[test]
fn a_seed_replays_byte_for_byte() {
    // Seeds with crashes, outages and drains among them; and a failing one (F5's without its
    // fix), whose replay is what a developer chasing it gets.
    for seed in [3, 123, 147, 731, 3929] {
        let a = run_seed(seed, &Rules::current());
        let b = run_seed(seed, &Rules::current());
        assert!(same_trace(&a, &b), "seed {seed} replayed differently");
        assert!(
            a.trace.len() > 10,
            "seed {seed} did something: {}",
            a.trace_text()
        );
    }
    let a = run_seed(3, &Rules::without(Finding::F5LostOutputTail));
    let b = run_seed(3, &Rules::without(Finding::F5LostOutputTail));
    assert!(!a.violations.is_empty());
    assert!(same_trace(&a, &b), "the failing seed replayed differently");
}

#[test]
fn schedules_cover_crashes_at_many_records_and_every_fault_kind() {
    // The generator is worth its schedules only if they reach the faults.
    use std::collections::{BTreeSet, HashSet};
    use windshift_runner::sim::Fault;
    let mut kinds = HashSet::new();
    let mut crash_records = BTreeSet::new();
    let mut crashed = 0;
    for seed in 0..400 {
        for fault in Scenario::from_seed(seed).faults {
            if let Fault::Crash { record, .. } = fault {
                crash_records.insert(record);
            }
            kinds.insert(std::mem::discriminant(&fault));
        }
        crashed += u32::from(run_seed(seed, &Rules::current()).crashes > 0);
    }
    assert_eq!(kinds.len(), 6, "every fault kind is drawn");
    assert!(
        crash_records.len() >= 25,
        "crash records drawn: {crash_records:?}"
    );
    assert!(
        crashed >= 80,
        "only {crashed} of 400 schedules crashed the runner"
    );
}
