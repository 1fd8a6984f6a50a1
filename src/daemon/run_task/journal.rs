//! The run's side of the journal: the last committed record and the commits only the run
//! loop makes. A container's agent events go through the agent-record budget
//! (docs/journal.md, "Agent output budget"): journaled until the budget is spent, then
//! folded in memory and journaled just before the container's exit.

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::super::failpoint::crash_failpoint;
use super::{Ctx, Interrupted};
use crate::fsm::{AgentBudget, Effect, Event, RunState, AGENT_RECORD_BUDGET};
use crate::journal::{agent_records, commit_event_async, CommitError, Record};

pub(super) struct RunJournal {
    ctx: Arc<Ctx>,
    run_id: i64,
    /// The last committed record: the run's state as the journal has it.
    pub(super) last: Record,
    /// The journal budget of the current container's output.
    agent_budget: Option<AgentBudget>,
}

impl RunJournal {
    pub(super) fn new(ctx: Arc<Ctx>, last: Record) -> Self {
        RunJournal {
            ctx,
            run_id: last.run_id,
            last,
            agent_budget: None,
        }
    }

    pub(super) fn state(&self) -> &RunState {
        &self.last.state
    }

    /// Journals one event (transaction + flush) and returns the effects to run now. A
    /// container's exit is preceded by the agent signals coalesced past its journal budget,
    /// so the exit is judged on every signal.
    pub(super) async fn commit(&mut self, event: Event) -> Result<Vec<Effect>, Interrupted> {
        if matches!(event, Event::ContainerExited { .. }) {
            self.commit_coalesced().await?;
        }
        let started = matches!(event, Event::ContainerStarted);
        let effects = self.commit_record(event).await?;
        if started {
            if let Some(name) = self.last.state.current_container().map(str::to_owned) {
                // A fresh attempt: its output has caused no record yet.
                self.agent_budget = Some(AgentBudget::new(&name, 0, AGENT_RECORD_BUDGET));
            }
        }
        Ok(effects)
    }

    async fn commit_record(&mut self, event: Event) -> Result<Vec<Effect>, Interrupted> {
        let started = Instant::now();
        let kind = event.kind();
        match commit_event_async(
            self.ctx.journal.clone(),
            Some(self.last.clone()),
            event,
            self.ctx.clock.now_ms(),
            None,
        )
        .await
        {
            Ok(committed) => {
                if let Some(record) = committed.record {
                    self.ctx.metrics.journal_commit(started.elapsed());
                    crash_failpoint(&record);
                    debug!(run_id = self.run_id, event = %kind, seq = record.seq, "{}", record.state.describe());
                    self.last = record;
                }
                Ok(committed.effects)
            }
            Err(CommitError::Rejected(r)) => {
                debug!(run_id = self.run_id, "event not applied: {r}");
                Ok(Vec::new())
            }
            Err(CommitError::Journal(e)) => {
                self.ctx.metrics.journal_error();
                Err(Interrupted::Journal(e.to_string()))
            }
        }
    }

    /// Journals an agent event (signal, degradation) within the current container's budget,
    /// or folds it in memory once the budget is spent: the agent decides how many it prints,
    /// and each record carries the whole state. Returns the effects to run now.
    pub(super) async fn commit_agent(&mut self, event: Event) -> Result<Vec<Effect>, Interrupted> {
        let Some(name) = self.last.state.current_container().map(str::to_owned) else {
            // Not in the container phase: the state machine refuses it; nothing is written.
            return self.commit_record(event).await;
        };
        let budget = self.agent_budget_for(&name).await;
        let Some(event) = budget.admit(event) else {
            return Ok(Vec::new());
        };
        let before = self.last.seq;
        let effects = self.commit_record(event).await?;
        if self.last.seq != before {
            let run_id = self.run_id;
            let budget = self.agent_budget_for(&name).await;
            budget.recorded();
            if budget.spent() {
                warn!(
                    run_id,
                    container = %name,
                    records = budget.journaled(),
                    "the agent's output reached its journal budget; further signals are \
                     coalesced and journaled when the container exits"
                );
            }
        }
        Ok(effects)
    }

    /// Journals the signals coalesced past the current container's budget (at most one per
    /// fact kind) so that the exit that follows is judged on them.
    async fn commit_coalesced(&mut self) -> Result<(), Interrupted> {
        let Some(name) = self.last.state.current_container().map(str::to_owned) else {
            return Ok(());
        };
        let Some(budget) = self
            .agent_budget
            .as_mut()
            .filter(|b| b.container() == name && !b.pending().is_empty())
        else {
            return Ok(());
        };
        let folded = budget.pending().folded();
        let events = budget.take_pending();
        info!(
            run_id = self.run_id,
            container = %name,
            folded,
            records = events.len(),
            "journaling the agent signals coalesced past the journal budget"
        );
        for event in events {
            self.commit_record(event).await?;
        }
        Ok(())
    }

    /// Whether container `name`'s budget is spent, counting the records its output already
    /// caused in the journal (a previous process coalesced past it in memory, and that died).
    pub(super) async fn agent_budget_spent(&mut self, name: &str) -> bool {
        self.agent_budget_for(name).await.spent()
    }

    /// The budget of container `name`, counting the records its output already caused in
    /// the journal (so a restart continues where the previous process stopped). A journal
    /// that cannot be read counts as spent: folding loses no verdict, writing might overrun.
    async fn agent_budget_for(&mut self, name: &str) -> &mut AgentBudget {
        if self.agent_budget.as_ref().map(AgentBudget::container) != Some(name) {
            let journal = self.ctx.journal.clone();
            let run_id = self.run_id;
            let read = tokio::task::spawn_blocking(move || journal.records(run_id)).await;
            let used = match read {
                Ok(Ok(slots)) => agent_records(&slots, name),
                Ok(Err(e)) => {
                    warn!(
                        run_id = self.run_id,
                        "cannot count the agent's records ({e}); its journal budget counts as spent"
                    );
                    AGENT_RECORD_BUDGET
                }
                Err(e) => {
                    warn!(
                        run_id = self.run_id,
                        "journal read task failed ({e}); the agent's journal budget counts as spent"
                    );
                    AGENT_RECORD_BUDGET
                }
            };
            debug!(
                run_id = self.run_id,
                container = name,
                used,
                "agent journal budget"
            );
            self.agent_budget = Some(AgentBudget::new(name, used, AGENT_RECORD_BUDGET));
        }
        self.agent_budget
            .get_or_insert_with(|| AgentBudget::new(name, AGENT_RECORD_BUDGET, AGENT_RECORD_BUDGET))
    }
}
