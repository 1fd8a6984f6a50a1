//! Shared test helpers: run plans and plausible event choices for each state.
#![allow(dead_code)]

use windshift_runner::control::wire::{JobSpec, RepoSpec, KIND_ACTION_CONTAINER};
use windshift_runner::fsm::*;

pub const BASE: &str = "1111111111111111111111111111111111111111";
pub const HEAD: &str = "2222222222222222222222222222222222222222";
pub const TOKEN: &str = "run-token-test-7f3a9c2b";

/// A plan for `run_id`; the flavour varies with the id: one repo, two repos, no repo
/// (coding agent), container kind.
pub fn plan_and_secrets(run_id: i64) -> (RunPlan, RunSecrets) {
    let repos: &[&str] = match run_id.rem_euclid(4) {
        0 => &["acme/app"],
        1 => &["acme/app", "acme/lib"],
        _ => &[],
    };
    let mut job = JobSpec {
        run_id,
        kind: if run_id.rem_euclid(4) == 3 {
            KIND_ACTION_CONTAINER.into()
        } else {
            String::new()
        },
        image: "agent:local".into(),
        initial_prompt: "fix the bug".into(),
        repos: repos
            .iter()
            .map(|s| RepoSpec {
                workspace_id: 7,
                slug: (*s).into(),
                base_ref: "main".into(),
                continue_branch: String::new(),
            })
            .collect(),
        ..Default::default()
    };
    job.env.insert("WS_TOKEN".into(), TOKEN.into());
    job.env.insert("WS_WORKSPACE_KEY".into(), "ACME".into());
    RunPlan::from_job(&job, "test-host")
}

pub fn checkout_for(plan: &RunPlan) -> Checkout {
    Checkout {
        root: format!("/cache/.workspaces/run-{}", plan.run_id),
        repos: plan
            .repos
            .iter()
            .map(|r| CheckoutRepo {
                slug: r.slug.clone(),
                path: format!("/cache/.workspaces/run-{}/{}", plan.run_id, r.slug),
                branch: plan.branch_for(r),
                base_commit: BASE.into(),
            })
            .collect(),
    }
}

fn signal(line: &str) -> Event {
    Event::AgentSignal {
        signal: contract::classify_stdout_line(line).expect("contract line"),
    }
}

fn heads(plan: &RunPlan, sha: &str) -> Vec<RepoHead> {
    plan.repos
        .iter()
        .map(|r| RepoHead {
            slug: r.slug.clone(),
            head: sha.into(),
        })
        .collect()
}

/// Events worth trying in `state` (mostly applicable ones, a few that must be rejected).
pub fn plausible_events(plan: &RunPlan, state: Option<&RunState>) -> Vec<Event> {
    let Some(state) = state else {
        return vec![Event::Claimed { plan: plan.clone() }];
    };
    let mut out = match state {
        RunState::Claimed { .. } => vec![
            Event::CheckoutReady {
                checkout: checkout_for(plan),
            },
            Event::CheckoutReady {
                checkout: checkout_for(plan),
            },
            Event::CheckoutFailed {
                error: "git fetch failed".into(),
            },
            Event::PrepareStarted,
            Event::ContainerStarted,
        ],
        RunState::Prepared { .. } => vec![
            Event::ContainerStarted,
            Event::ContainerStarted,
            Event::ContainerStarting,
            Event::ContainerExited { code: Some(125) },
            Event::ContainerVanished,
        ],
        RunState::Running { after: None, .. } => vec![
            signal(r#"{"type":"starting"}"#),
            signal(r#"{"type":"finish","outcome":"completed","summary":"done"}"#),
            signal(r#"{"type":"finish","outcome":"blocked","summary":"stuck"}"#),
            signal(r#"{"type":"error","message":"broker down"}"#),
            signal(r#"{"type":"session_idle"}"#),
            Event::StreamDegraded,
            Event::ContainerExited { code: Some(0) },
            Event::ContainerExited { code: Some(0) },
            Event::ContainerExited { code: Some(1) },
            Event::ContainerVanished,
            Event::RunTimeoutPassed,
        ],
        RunState::Running {
            after: Some(AfterExit { push: None, .. }),
            ..
        } => vec![
            Event::HeadsInspected {
                heads: heads(plan, HEAD),
            },
            Event::HeadsInspected {
                heads: heads(plan, BASE),
            },
            Event::PushSkipped,
        ],
        RunState::Running { .. } => vec![
            Event::PushDone {
                heads: heads(plan, HEAD),
            },
            Event::PushDone {
                heads: heads(plan, HEAD),
            },
            Event::PushFailed {
                error: "remote rejected".into(),
            },
        ],
        RunState::Pushed { .. } => vec![
            Event::ReportAccepted,
            Event::ReportAccepted,
            Event::ReportFailed {
                error: "503 from server".into(),
                retryable: true,
            },
            Event::ReportFailed {
                error: "400 bad request".into(),
                retryable: false,
            },
            Event::ReportRejected409,
        ],
        RunState::Reported { .. } | RunState::Failed { .. } => {
            vec![Event::ReportAccepted, Event::ContainerStarted]
        }
    };
    out.push(Event::CancelRequested { force: false });
    out.push(Event::DrainDeadlinePassed);
    out.push(Event::RunNoLongerRunning);
    out
}

/// A deterministic walk from claim to a terminal state, choosing the first plausible
/// applicable event that moves the run forward along `script` choices.
pub fn happy_path(plan: &RunPlan) -> Vec<Event> {
    let mut events = vec![Event::Claimed { plan: plan.clone() }];
    let mut script = Vec::new();
    if !plan.repos.is_empty() {
        script.push(Event::CheckoutReady {
            checkout: checkout_for(plan),
        });
    }
    script.push(Event::ContainerStarted);
    script.push(signal(r#"{"type":"lifecycle","phase":"entrypoint"}"#));
    script.push(signal(
        r#"{"type":"finish","outcome":"completed","summary":"done"}"#,
    ));
    script.push(signal(r#"{"type":"session_idle"}"#));
    script.push(Event::ContainerExited { code: Some(0) });
    if !plan.repos.is_empty() {
        script.push(Event::HeadsInspected {
            heads: heads(plan, HEAD),
        });
        script.push(Event::PushDone {
            heads: heads(plan, HEAD),
        });
    }
    script.push(Event::ReportAccepted);
    events.extend(script);
    events
}
