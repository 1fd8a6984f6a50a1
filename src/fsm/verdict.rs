//! The verdict: what the run reports (spec 2.6), decided by the agent contract table (spec 6.5),
//! the container-kind rules (spec 5.4) and then the push outcome (spec 4.9). Pure.

use serde::{Deserialize, Serialize};

use super::machine::{AgentFacts, Checkout, RepoHead, StopReason};
use super::plan::{RunPlan, LLM_MODEL};
use crate::protocol::{
    RepoResult, ReportRequest, STATUS_CANCELED, STATUS_FAILED, STATUS_SUCCEEDED,
};

/// Terminal statuses this runner produces. `killed` is never produced (spec 9.12: no upstream
/// path sets it either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    Canceled,
}

impl Status {
    pub fn as_wire(self) -> &'static str {
        match self {
            Status::Succeeded => STATUS_SUCCEEDED,
            Status::Failed => STATUS_FAILED,
            Status::Canceled => STATUS_CANCELED,
        }
    }
}

/// The error text of a canceled run (spec 4.5, 6.5 row 1): Go's context error, kept verbatim
/// because users and dashboards match on it.
pub const CANCELED_ERROR: &str = "context canceled";

/// A run's verdict, exactly what goes into `POST /runner/runs/{id}/result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub status: Status,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub branch: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_commit: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<RepoResult>,
}

impl Verdict {
    pub fn succeeded(summary: impl Into<String>) -> Verdict {
        Verdict {
            status: Status::Succeeded,
            error: String::new(),
            summary: summary.into(),
            branch: String::new(),
            base_commit: String::new(),
            repos: Vec::new(),
        }
    }

    pub fn failed(error: impl Into<String>) -> Verdict {
        Verdict {
            status: Status::Failed,
            error: error.into(),
            ..Verdict::succeeded("")
        }
    }

    pub fn canceled() -> Verdict {
        Verdict {
            status: Status::Canceled,
            error: CANCELED_ERROR.into(),
            ..Verdict::succeeded("")
        }
    }

    /// The verdict of a run stopped by the runner: a cancel or a drain reports `canceled`
    /// (spec 4.5, 4.6); the runner's own wall-clock limit reports `failed` (spec 9.9).
    pub fn stopped(reason: StopReason) -> Verdict {
        match reason {
            StopReason::Canceled { .. } | StopReason::Drain => Verdict::canceled(),
            StopReason::Timeout => {
                Verdict::failed("run exceeded the runner's wall-clock limit (RUN_TIMEOUT)")
            }
        }
    }

    /// The wire body of the result call.
    pub fn to_report(&self) -> ReportRequest {
        ReportRequest {
            status: self.status.as_wire().to_owned(),
            error: self.error.clone(),
            container_id: String::new(),
            branch: self.branch.clone(),
            base_commit: self.base_commit.clone(),
            summary: self.summary.clone(),
            repos: self.repos.clone(),
        }
    }
}

/// The verdict once the container is gone, before any push.
///
/// coding_agent: spec 6.5, first matching row wins. Other kinds: spec 5.4.
pub fn decide_on_exit(
    plan: &RunPlan,
    facts: &AgentFacts,
    stop: Option<StopReason>,
    code: Option<i32>,
) -> Verdict {
    if let Some(reason) = stop {
        return Verdict::stopped(reason);
    }
    let code_text = code.unwrap_or(-1);
    if !plan.is_coding_agent() {
        return match code {
            Some(0) if facts.degraded => {
                Verdict::failed("docker run exited 0 but output drain failed (events truncated)")
            }
            Some(0) => Verdict::succeeded(""),
            _ => Verdict::failed(format!(
                "docker run exited with code {code_text}: see the run's stderr events"
            )),
        };
    }
    if code == Some(AGENT_CONFIG_EXIT) && !facts.started {
        return Verdict::failed(agent_config_error(plan, facts.last_error.as_deref()));
    }
    if code != Some(0) {
        let detail = facts
            .last_error
            .as_deref()
            .map(|m| format!("last agent error: {m}"))
            .unwrap_or_else(|| "see the run's stderr events".to_owned());
        return Verdict::failed(format!(
            "agent subprocess exited with code {code_text}: {detail}"
        ));
    }
    if !facts.saw_contract_event {
        return Verdict::failed(
            "agent subprocess exited without emitting a single JSONL contract event — \
             the image must run an agent that speaks the windshift JSONL contract v1 on stdout",
        );
    }
    if facts.degraded {
        return Verdict::failed(
            "agent event stream degraded — a stdout line exceeded 1 MiB and the rest of the \
             output was discarded",
        );
    }
    if let Some(finish) = &facts.finish {
        if finish.outcome == "blocked" {
            return Verdict::failed(format!("agent blocked: {}", finish.summary));
        }
        return Verdict::succeeded(finish.summary.clone());
    }
    if let Some(message) = &facts.last_error {
        return Verdict::failed(format!("agent error: {message}"));
    }
    Verdict::succeeded("")
}

/// windshift-agent's exit code for a configuration error (spec 6.3: `LLM_BASE_URL` or
/// `LLM_MODEL` missing), printed before its `starting` event.
pub const AGENT_CONFIG_EXIT: i32 = 2;

/// The error of a coding agent that exited 2 before `starting` (still row 7's shape): names
/// the likely cause from the env the agent got and what the operator sets.
pub fn agent_config_error(plan: &RunPlan, last_error: Option<&str>) -> String {
    let has = |key: &str| plan.env.get(key).is_some_and(|v| !v.trim().is_empty());
    let cause = if !has(LLM_MODEL) {
        "LLM_MODEL is not in the agent's env: set WSRUNNER_LLM_MODEL (or CODING_AGENT_LLM_MODEL) \
         on the runner host to the model id, or have the server send one"
    } else if !has("LLM_BASE_URL") {
        "LLM_BASE_URL is not in the agent's env: give the agent binding an LLM connection on the \
         Windshift server (it sends LLM_BASE_URL and LLM_API_KEY with the claim)"
    } else {
        "LLM_MODEL or LLM_BASE_URL was likely refused: check the model id (WSRUNNER_LLM_MODEL or \
         the server's) and the binding's LLM connection"
    };
    let detail = last_error
        .map(|m| format!("; last agent error: {m}"))
        .unwrap_or_default();
    format!(
        "agent subprocess exited with code {AGENT_CONFIG_EXIT} before its starting event \
         (an agent configuration error): {cause}{detail}"
    )
}

/// Adds the push outcome to a succeeded verdict (spec 4.9): every pushed repo gets its branch
/// and base commit; the scalar `branch`/`base_commit` mirror the primary repo; `repos` is
/// filled for multi-repo runs only, listing every repo (unpushed ones carry only the slug).
pub fn with_push(
    plan: &RunPlan,
    verdict: &Verdict,
    checkout: &Checkout,
    pushed: &[RepoHead],
) -> Verdict {
    let mut out = verdict.clone();
    let mut results = Vec::new();
    for repo in &plan.repos {
        let was_pushed = pushed.iter().any(|h| h.slug == repo.slug);
        let base = checkout
            .repos
            .iter()
            .find(|c| c.slug == repo.slug)
            .map(|c| c.base_commit.clone())
            .unwrap_or_default();
        results.push(if was_pushed {
            RepoResult {
                repo_slug: repo.slug.clone(),
                branch: plan.branch_for(repo),
                base_commit: base,
            }
        } else {
            RepoResult {
                repo_slug: repo.slug.clone(),
                ..Default::default()
            }
        });
    }
    if let Some(primary) = results.first() {
        out.branch = primary.branch.clone();
        out.base_commit = primary.base_commit.clone();
    }
    if plan.repos.len() > 1 {
        out.repos = results;
    }
    out
}
