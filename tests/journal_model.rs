//! Model test: random event sequences with simulated crashes against the in-memory journal
//! and a reference model (proptest-state-machine).
//!
//! Invariants checked after every step: the journal's view equals the model's; terminal
//! states absorb; at most one verdict per run; no effect is handed out before the record
//! announcing it is durable; replay reproduces every recorded state.

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use windshift_runner::control::wire::ReportRequest;
use windshift_runner::fsm::{self, Effect, Event, RunState};
use windshift_runner::journal::{
    commit_event, encode_record, replay_run, CommitError, Journal, MemJournal, Record, Slot,
    SCHEMA_VERSION,
};

const RUNS: [i64; 3] = [100, 101, 103];

#[derive(Clone, Debug)]
enum Step {
    /// Feed `event` to `run`; with `crash_before_flush` the process dies after the append and
    /// before the flush (the effects are never handed out).
    Feed {
        run: i64,
        event: Event,
        crash_before_flush: bool,
    },
    /// Crash and restart between steps.
    Reboot,
}

/// The reference: each run's last durable state.
#[derive(Clone, Debug, Default)]
struct Model {
    runs: BTreeMap<i64, RunState>,
}

struct ModelRef;

impl ReferenceStateMachine for ModelRef {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let mut choices = Vec::new();
        for run in RUNS {
            let (plan, _) = common::plan_and_secrets(run);
            for event in common::plausible_events(&plan, state.runs.get(&run)) {
                choices.push((run, event));
            }
        }
        prop_oneof![
            12 => (prop::sample::select(choices), 0..6u8).prop_map(|((run, event), c)| Step::Feed {
                run,
                event,
                crash_before_flush: c == 0,
            }),
            1 => Just(Step::Reboot),
        ]
        .boxed()
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        if let Step::Feed {
            run,
            event,
            crash_before_flush: false,
        } = step
        {
            if let Ok((next, _)) = fsm::apply(state.runs.get(run), event) {
                state.runs.insert(*run, next);
            }
        }
        state
    }
}

/// The system under test: the in-memory journal plus the runner's in-memory view of it.
struct Runner {
    journal: MemJournal,
    last: BTreeMap<i64, Record>,
    /// Every report handed out, per run.
    reports: BTreeMap<i64, Vec<ReportRequest>>,
    clock: i64,
}

impl Runner {
    /// A restart: forget memory, lose unflushed writes, rebuild from the journal.
    fn reboot(&mut self) {
        self.journal.crash();
        self.last.clear();
        for run in self.journal.run_ids().unwrap() {
            let slots = self.journal.records(run).unwrap();
            match slots.last() {
                Some(Slot::Record(r)) => {
                    self.last.insert(run, r.clone());
                }
                other => panic!("unexpected slot after reboot: {other:?}"),
            }
        }
        // Start-up reads only the active index: it must name exactly the non-terminal runs.
        let mut active: Vec<i64> = self
            .journal
            .active()
            .unwrap()
            .iter()
            .map(Slot::run_id)
            .collect();
        active.sort();
        let expected: Vec<i64> = self
            .last
            .iter()
            .filter(|(_, r)| !r.state.is_terminal())
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(active, expected, "active index after reboot");
    }
}

struct JournalModelTest;

impl StateMachineTest for JournalModelTest {
    type SystemUnderTest = Runner;
    type Reference = ModelRef;

    fn init_test(_: &Model) -> Runner {
        Runner {
            journal: MemJournal::new(),
            last: BTreeMap::new(),
            reports: BTreeMap::new(),
            clock: 1_700_000_000_000,
        }
    }

    fn apply(mut sut: Runner, _ref_state: &Model, step: Step) -> Runner {
        sut.clock += 1_000;
        match step {
            Step::Reboot => sut.reboot(),
            Step::Feed {
                run,
                event,
                crash_before_flush: true,
            } => {
                // The append happens, the flush does not: a crash loses the record and no
                // effect was ever handed out.
                let last = sut.last.get(&run);
                if let Ok((state, _)) = fsm::apply(last.map(|r| &r.state), &event) {
                    let record = Record {
                        schema: SCHEMA_VERSION,
                        run_id: run,
                        seq: last.map_or(1, |r| r.seq + 1),
                        at_ms: sut.clock,
                        event,
                        state,
                        secrets: None,
                    };
                    sut.journal.append(&record).unwrap();
                }
                sut.reboot();
            }
            Step::Feed {
                run,
                event,
                crash_before_flush: false,
            } => {
                let was_terminal = sut.last.get(&run).is_some_and(|r| r.state.is_terminal());
                let (_, secrets) = common::plan_and_secrets(run);
                let flushes_before = sut.journal.flushes();
                match commit_event(
                    &sut.journal,
                    sut.last.get(&run),
                    event,
                    sut.clock,
                    Some(secrets),
                ) {
                    Ok(committed) => {
                        assert!(!was_terminal, "a terminal run accepted an event");
                        if let Some(record) = &committed.record {
                            // Persist-then-send: by the time effects are returned, the record
                            // (with the intent of every effect) is durable.
                            assert!(sut.journal.flushes() > flushes_before);
                            let durable = sut.journal.durable_records();
                            assert!(durable.contains(record), "effects handed out before flush");
                            assert_eq!(record.secrets.is_some(), record.seq == 1);
                            sut.last.insert(run, record.clone());
                        } else {
                            assert!(committed.effects.is_empty());
                        }
                        for effect in &committed.effects {
                            if let Effect::Report(report) = effect {
                                let seen = sut.reports.entry(run).or_default();
                                if let Some(first) = seen.first() {
                                    assert_eq!(first, report, "run {run} reported two verdicts");
                                }
                                seen.push(report.clone());
                                let verdict = committed.state.verdict().expect("verdict in state");
                                assert_eq!(&verdict.to_report(), report);
                            }
                        }
                    }
                    Err(CommitError::Rejected(rejected)) => {
                        if was_terminal {
                            assert!(
                                matches!(rejected, fsm::Rejected::Terminal { .. }),
                                "{rejected}"
                            );
                        }
                    }
                    Err(CommitError::Journal(e)) => panic!("journal error: {e}"),
                }
            }
        }
        sut
    }

    fn check_invariants(sut: &Runner, model: &Model) {
        let states: BTreeMap<i64, RunState> = sut
            .last
            .iter()
            .map(|(k, r)| (*k, r.state.clone()))
            .collect();
        assert_eq!(states, model.runs, "runner view differs from the model");
        for run in sut.journal.run_ids().unwrap() {
            let slots = sut.journal.records(run).unwrap();
            assert_eq!(
                replay_run(&slots),
                Vec::<String>::new(),
                "replay of run {run}"
            );
            let seqs: Vec<u64> = slots.iter().map(Slot::seq).collect();
            assert_eq!(seqs, (1..=slots.len() as u64).collect::<Vec<_>>());
            // A terminal record is always the last one.
            for slot in &slots[..slots.len().saturating_sub(1)] {
                assert!(matches!(slot, Slot::Record(r) if !r.state.is_terminal()));
            }
        }
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        .. ProptestConfig::default()
    })]
    #[test]
    fn journal_survives_random_crashes(sequential 1..80 => JournalModelTest);
}

#[test]
fn mem_journal_loses_only_unflushed_writes() {
    let journal = MemJournal::new();
    let (plan, secrets) = common::plan_and_secrets(4);
    let events = common::happy_path(&plan);
    let first = commit_event(&journal, None, events[0].clone(), 1, Some(secrets)).unwrap();
    let first = first.record.unwrap();
    let (state, _) = fsm::apply(Some(&first.state), &events[1]).unwrap();
    let second = Record {
        schema: SCHEMA_VERSION,
        run_id: 4,
        seq: 2,
        at_ms: 2,
        event: events[1].clone(),
        state,
        secrets: None,
    };
    journal.append(&second).unwrap();
    assert_eq!(
        journal.records(4).unwrap().len(),
        2,
        "reads see unflushed appends"
    );
    journal.crash();
    assert_eq!(
        journal.records(4).unwrap(),
        vec![Slot::Record(first.clone())]
    );
    // Misuse is refused: a gap in the sequence.
    let mut gap = second.clone();
    gap.seq = 3;
    assert!(journal.append(&gap).is_err());
    // A corrupt record is quarantined, not fatal, and replay stops there.
    journal.insert_raw(4, 2, b"{not json".to_vec());
    let slots = journal.records(4).unwrap();
    assert!(matches!(&slots[1], Slot::Quarantined(q) if q.bytes == b"{not json"));
    assert_eq!(replay_run(&slots).len(), 1);
    assert_ne!(encode_record(&first), Vec::<u8>::new());
}
