//! The run state machine: the exhaustive state × event table, the verdict rules (spec 6.5,
//! 5.4, 4.9) and the recovery table.

use std::collections::BTreeMap;

use strum::IntoEnumIterator;
use windshift_runner::control::wire::{JobSpec, RepoSpec, KIND_ACTION_CONTAINER};
use windshift_runner::fsm::*;

fn plan_with(repos: &[&str], kind: &str) -> RunPlan {
    let mut job = JobSpec {
        run_id: 42,
        kind: kind.into(),
        image: "agent:local".into(),
        initial_prompt: "do it".into(),
        repos: repos
            .iter()
            .map(|slug| RepoSpec {
                workspace_id: 1,
                slug: (*slug).into(),
                base_ref: "main".into(),
                continue_branch: String::new(),
            })
            .collect(),
        ..Default::default()
    };
    job.env.insert("WS_TOKEN".into(), "tok-0123456789".into());
    RunPlan::from_job(&job, "h1").0
}

fn plan() -> RunPlan {
    plan_with(&["acme/app"], "")
}

const BASE: &str = "1111111111111111111111111111111111111111";
const HEAD: &str = "2222222222222222222222222222222222222222";

fn checkout_for(plan: &RunPlan) -> Checkout {
    Checkout {
        root: "/cache/run-42".into(),
        repos: plan
            .repos
            .iter()
            .map(|r| CheckoutRepo {
                slug: r.slug.clone(),
                path: format!("/cache/run-42/{}", r.slug),
                branch: plan.branch_for(r),
                base_commit: BASE.into(),
            })
            .collect(),
    }
}

/// Folds events from a claim, panicking with context on a rejection.
fn run(plan: RunPlan, events: &[Event]) -> (RunState, Vec<Effect>) {
    let (mut state, mut all) = claim(plan);
    for e in events {
        let (next, effects) = transition(&state, e)
            .unwrap_or_else(|r| panic!("{e:?} rejected in {}: {r}", state.describe()));
        state = next;
        all.extend(effects);
    }
    (state, all)
}

fn sig(line: &str) -> Event {
    Event::AgentSignal {
        signal: windshift_runner::fsm::contract::classify_stdout_line(line).expect("contract line"),
    }
}

fn ready(plan: &RunPlan) -> Event {
    Event::CheckoutReady {
        checkout: checkout_for(plan),
    }
}

fn exited(code: i32) -> Event {
    Event::ContainerExited { code: Some(code) }
}

fn reports(effects: &[Effect]) -> Vec<ReportRequest> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Report(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

use windshift_runner::control::wire::ReportRequest;

fn lifecycle_phases(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::SendEvent {
                event_type,
                payload_json,
            } if event_type == "lifecycle" => {
                let v: serde_json::Value = serde_json::from_str(payload_json).unwrap();
                Some(v["phase"].as_str().unwrap().to_owned())
            }
            _ => None,
        })
        .collect()
}

// ---------- the exhaustive table ----------

/// One representative state per kind (plus the post-exit Running variants below).
fn sample_state(kind: StateKind) -> RunState {
    let p = plan();
    match kind {
        StateKind::Claimed => claim(p).0,
        StateKind::Prepared => run(p.clone(), &[ready(&p)]).0,
        StateKind::Running => run(p.clone(), &[ready(&p), Event::ContainerStarted]).0,
        StateKind::Pushed => run(p.clone(), &[Event::CheckoutFailed { error: "x".into() }]).0,
        StateKind::Reported => {
            run(
                p.clone(),
                &[
                    Event::CheckoutFailed { error: "x".into() },
                    Event::ReportAccepted,
                ],
            )
            .0
        }
        StateKind::Failed => run(p, &[Event::RunNoLongerRunning]).0,
    }
}

fn sample_event(kind: EventKind) -> Event {
    let p = plan();
    match kind {
        EventKind::Claimed => Event::Claimed { plan: p },
        EventKind::PrepareStarted => Event::PrepareStarted,
        EventKind::CheckoutReady => ready(&p),
        EventKind::CheckoutFailed => Event::CheckoutFailed {
            error: "boom".into(),
        },
        EventKind::ContainerStarting => Event::ContainerStarting,
        EventKind::ContainerStarted => Event::ContainerStarted,
        EventKind::ContainerExited => exited(0),
        EventKind::ContainerVanished => Event::ContainerVanished,
        EventKind::ContainerStartFailed => Event::ContainerStartFailed {
            error: "image refused".into(),
        },
        EventKind::AgentSignal => sig(r#"{"type":"starting"}"#),
        EventKind::StreamDegraded => Event::StreamDegraded,
        EventKind::HeadsInspected => Event::HeadsInspected {
            heads: vec![RepoHead {
                slug: "acme/app".into(),
                head: HEAD.into(),
            }],
        },
        EventKind::PushDone => Event::PushDone {
            heads: vec![RepoHead {
                slug: "acme/app".into(),
                head: HEAD.into(),
            }],
        },
        EventKind::PushSkipped => Event::PushSkipped,
        EventKind::PushFailed => Event::PushFailed {
            error: "denied".into(),
        },
        EventKind::ReportAccepted => Event::ReportAccepted,
        EventKind::ReportRejected409 => Event::ReportRejected409,
        EventKind::ReportFailed => Event::ReportFailed {
            error: "503".into(),
            retryable: true,
        },
        EventKind::CancelRequested => Event::CancelRequested { force: false },
        EventKind::DrainDeadlinePassed => Event::DrainDeadlinePassed,
        EventKind::RunTimeoutPassed => Event::RunTimeoutPassed,
        EventKind::RunNoLongerRunning => Event::RunNoLongerRunning,
    }
}

/// The expected table for the representative states: `Ok(next kind)` or the rejection name.
fn expected(state: StateKind, event: EventKind) -> Result<StateKind, &'static str> {
    use EventKind as E;
    use StateKind as S;
    if state.is_terminal() {
        return Err("Terminal");
    }
    if event == E::Claimed {
        return Err("AlreadyClaimed");
    }
    if event == E::RunNoLongerRunning {
        return Ok(S::Failed);
    }
    let stop = matches!(
        event,
        E::CancelRequested | E::DrainDeadlinePassed | E::RunTimeoutPassed
    );
    match (state, event) {
        (S::Claimed, E::PrepareStarted) => Ok(S::Claimed),
        (S::Claimed, E::CheckoutReady) => Ok(S::Prepared),
        (S::Claimed, E::CheckoutFailed) => Ok(S::Pushed),
        (S::Claimed, _) if stop => Ok(S::Claimed),
        (S::Prepared, E::ContainerStarting) => Ok(S::Prepared),
        (S::Prepared, E::ContainerStarted) => Ok(S::Running),
        // exit 0 without a single contract event: failed, straight to the report.
        (S::Prepared, E::ContainerExited | E::ContainerVanished | E::ContainerStartFailed) => {
            Ok(S::Pushed)
        }
        (S::Prepared, _) if stop => Ok(S::Prepared),
        (S::Running, E::AgentSignal | E::StreamDegraded) => Ok(S::Running),
        (S::Running, E::ContainerExited | E::ContainerVanished) => Ok(S::Pushed),
        (S::Running, _) if stop => Ok(S::Running),
        (S::Pushed, E::ReportAccepted) => Ok(S::Reported),
        (S::Pushed, E::ReportRejected409) => Ok(S::Failed),
        (S::Pushed, E::ReportFailed) => Ok(S::Pushed),
        _ => Err("NotApplicable"),
    }
}

fn rejection_name(r: &Rejected) -> &'static str {
    match r {
        Rejected::Terminal { .. } => "Terminal",
        Rejected::NotApplicable { .. } => "NotApplicable",
        Rejected::AlreadyStopping { .. } => "AlreadyStopping",
        Rejected::AlreadyClaimed { .. } => "AlreadyClaimed",
        Rejected::NotClaimedYet { .. } => "NotClaimedYet",
    }
}

#[test]
fn every_state_event_pair_is_a_transition_or_a_typed_rejection() {
    let mut pairs = 0;
    for sk in StateKind::iter() {
        let state = sample_state(sk);
        assert_eq!(state.kind(), sk);
        for ek in EventKind::iter() {
            let event = sample_event(ek);
            assert_eq!(event.kind(), ek);
            let got = transition(&state, &event)
                .map(|(next, _)| next.kind())
                .map_err(|r| rejection_name(&r));
            assert_eq!(got, expected(sk, ek), "state {sk} × event {ek}");
            if let Err(r) = transition(&state, &event) {
                // Rejections name the pair so the daemon's log line says what was ignored.
                let text = r.to_string();
                assert!(
                    text.contains(&ek.to_string()) || text.contains("claimed"),
                    "{text}"
                );
            }
            pairs += 1;
        }
    }
    assert_eq!(pairs, StateKind::iter().count() * EventKind::iter().count());
}

#[test]
fn post_exit_running_variants_never_panic_and_accept_only_push_outcomes() {
    let p = plan();
    let base = [
        ready(&p),
        Event::ContainerStarted,
        sig(r#"{"type":"finish","outcome":"completed","summary":"done"}"#),
        exited(0),
    ];
    let (inspecting, effects) = run(p.clone(), &base);
    assert_eq!(effects.last(), Some(&Effect::InspectHeads));
    let mut with_push = base.to_vec();
    with_push.push(sample_event(EventKind::HeadsInspected));
    let (pushing, effects) = run(p, &with_push);
    assert!(matches!(effects.last(), Some(Effect::Push { heads }) if heads[0].head == HEAD));
    for (state, accepted) in [
        (
            &inspecting,
            &[
                EventKind::HeadsInspected,
                EventKind::PushSkipped,
                EventKind::PushFailed,
                EventKind::CancelRequested,
                EventKind::DrainDeadlinePassed,
                EventKind::RunTimeoutPassed,
                EventKind::RunNoLongerRunning,
            ][..],
        ),
        (
            &pushing,
            &[
                EventKind::PushDone,
                EventKind::PushSkipped,
                EventKind::PushFailed,
                EventKind::CancelRequested,
                EventKind::DrainDeadlinePassed,
                EventKind::RunTimeoutPassed,
                EventKind::RunNoLongerRunning,
            ][..],
        ),
    ] {
        for ek in EventKind::iter() {
            let ok = transition(state, &sample_event(ek)).is_ok();
            assert_eq!(ok, accepted.contains(&ek), "{} × {ek}", state.describe());
        }
    }
}

#[test]
fn the_first_event_must_be_claimed() {
    for ek in EventKind::iter() {
        let r = apply(None, &sample_event(ek));
        if ek == EventKind::Claimed {
            assert_eq!(r.unwrap().0.kind(), StateKind::Claimed);
        } else {
            assert!(matches!(r, Err(Rejected::NotClaimedYet { .. })), "{ek}");
        }
    }
}

#[test]
fn a_repeated_cancel_is_rejected_as_already_stopping() {
    // The heartbeat repeats the abort id until the run is final (spec 2.7).
    let p = plan();
    let (state, effects) = run(
        p.clone(),
        &[
            ready(&p),
            Event::ContainerStarted,
            Event::CancelRequested { force: false },
        ],
    );
    assert!(effects.contains(&Effect::KillContainer {
        name: "wsr-h1-run-42-1".into()
    }));
    assert!(matches!(
        transition(&state, &Event::CancelRequested { force: false }),
        Err(Rejected::AlreadyStopping { .. })
    ));
}

// ---------- verdict rules (spec 6.5) ----------

fn agent_verdict(lines: &[&str], degraded: bool, code: Option<i32>) -> Verdict {
    let p = plan_with(&[], "");
    let mut events = vec![Event::ContainerStarted];
    events.extend(lines.iter().map(|l| sig(l)));
    if degraded {
        events.push(Event::StreamDegraded);
    }
    events.push(Event::ContainerExited { code });
    let (state, effects) = run(p, &events);
    assert_eq!(state.kind(), StateKind::Pushed);
    let verdict = state.verdict().unwrap().clone();
    assert_eq!(reports(&effects), vec![verdict.to_report()]);
    verdict
}

#[test]
fn verdict_row_1_cancel_wins_over_everything() {
    let p = plan_with(&[], "");
    let (state, effects) = run(
        p,
        &[
            Event::ContainerStarted,
            sig(r#"{"type":"finish","outcome":"completed","summary":"ok"}"#),
            Event::CancelRequested { force: false },
            exited(0),
        ],
    );
    let r = &reports(&effects)[0];
    assert_eq!(
        (r.status.as_str(), r.error.as_str()),
        ("canceled", "context canceled")
    );
    assert_eq!(state.verdict().unwrap().status, Status::Canceled);
}

#[test]
fn verdict_row_2_exit_0_without_contract_events_fails() {
    let v = agent_verdict(&[], false, Some(0));
    assert_eq!(v.status, Status::Failed);
    assert!(v
        .error
        .starts_with("agent subprocess exited without emitting a single JSONL contract event — "));
}

#[test]
fn verdict_row_3_degraded_stream_fails() {
    let v = agent_verdict(&[r#"{"type":"starting"}"#], true, Some(0));
    assert!(
        v.error.starts_with("agent event stream degraded — "),
        "{v:?}"
    );
}

#[test]
fn verdict_row_4_blocked_fails_with_summary() {
    let v = agent_verdict(
        &[r#"{"type":"finish","outcome":"blocked","summary":"no access to repo"}"#],
        false,
        Some(0),
    );
    assert_eq!(
        (v.status, v.error.as_str()),
        (Status::Failed, "agent blocked: no access to repo")
    );
}

#[test]
fn verdict_row_5_error_without_finish_fails_with_last_error() {
    let v = agent_verdict(
        &[
            r#"{"type":"error","message":"first"}"#,
            r#"{"type":"error","message":"broker down"}"#,
            r#"{"type":"session_idle"}"#,
        ],
        false,
        Some(0),
    );
    assert_eq!(v.error, "agent error: broker down");
}

#[test]
fn verdict_row_6_completed_needs_info_or_no_finish_succeed() {
    let v = agent_verdict(
        &[
            r#"{"type":"error","message":"transient"}"#,
            r#"{"type":"finish","outcome":"needs_info","summary":"which db?"}"#,
        ],
        false,
        Some(0),
    );
    assert_eq!(
        (v.status, v.summary.as_str(), v.error.as_str()),
        (Status::Succeeded, "which db?", "")
    );
    let v = agent_verdict(
        &[r#"{"type":"lifecycle","phase":"entrypoint"}"#],
        false,
        Some(0),
    );
    assert_eq!((v.status, v.summary.as_str()), (Status::Succeeded, ""));
    assert_eq!(v.to_report().status, "succeeded");
}

#[test]
fn verdict_row_7_nonzero_exit_fails_with_code_or_minus_one() {
    let v = agent_verdict(
        &[
            r#"{"type":"starting"}"#,
            r#"{"type":"finish","outcome":"completed","summary":"x"}"#,
        ],
        false,
        Some(2),
    );
    assert!(
        v.error.starts_with("agent subprocess exited with code 2: "),
        "{v:?}"
    );
    let v = agent_verdict(&[], false, None);
    assert!(
        v.error
            .starts_with("agent subprocess exited with code -1: "),
        "{v:?}"
    );
}

/// Exit 2 before `starting` is windshift-agent's configuration error (spec 6.3): the error
/// names the missing variable from the env the agent got, and what to set.
#[test]
fn exit_2_before_starting_names_the_missing_agent_setting() {
    let verdict_for = |env: &[(&str, &str)], lines: &[&str], code: i32| {
        let mut p = plan_with(&[], "");
        for (k, v) in env {
            p.env.insert((*k).into(), (*v).into());
        }
        let mut events = vec![Event::ContainerStarted];
        events.extend(lines.iter().map(|l| sig(l)));
        events.push(exited(code));
        run(p, &events).0.verdict().unwrap().clone()
    };
    let entrypoint = r#"{"type":"lifecycle","phase":"entrypoint"}"#;

    let v = verdict_for(&[], &[entrypoint], 2);
    assert_eq!(v.status, Status::Failed);
    assert!(
        v.error
            .starts_with("agent subprocess exited with code 2 before its starting event"),
        "{v:?}"
    );
    assert!(
        v.error.contains("LLM_MODEL is not in the agent's env"),
        "{v:?}"
    );
    assert!(v.error.contains("set WSRUNNER_LLM_MODEL"), "{v:?}");

    let v = verdict_for(&[("LLM_MODEL", "m")], &[entrypoint], 2);
    assert!(
        v.error.contains("LLM_BASE_URL is not in the agent's env"),
        "{v:?}"
    );
    assert!(!v.error.contains("LLM_MODEL is not"), "{v:?}");

    let v = verdict_for(
        &[
            ("LLM_MODEL", "m"),
            ("LLM_BASE_URL", "https://h/api/llm-proxy/42/complete"),
        ],
        &[entrypoint, r#"{"type":"error","message":"bad model"}"#],
        2,
    );
    assert!(v.error.contains("was likely refused"), "{v:?}");
    assert!(v.error.ends_with("; last agent error: bad model"), "{v:?}");

    // After `starting`, or with another code, it is row 7 as before.
    let v = verdict_for(&[], &[entrypoint, r#"{"type":"starting"}"#], 2);
    assert!(
        v.error.starts_with("agent subprocess exited with code 2: "),
        "{v:?}"
    );
    let v = verdict_for(&[], &[entrypoint], 3);
    assert!(
        v.error.starts_with("agent subprocess exited with code 3: "),
        "{v:?}"
    );
}

#[test]
fn container_kinds_use_the_simpler_rules() {
    let p = plan_with(&[], KIND_ACTION_CONTAINER);
    let verdict = |events: &[Event]| run(p.clone(), events).0.verdict().unwrap().clone();
    assert_eq!(
        verdict(&[Event::ContainerStarted, exited(0)]).status,
        Status::Succeeded
    );
    assert_eq!(
        verdict(&[Event::ContainerStarted, Event::StreamDegraded, exited(0)]).error,
        "docker run exited 0 but output drain failed (events truncated)"
    );
    assert!(verdict(&[Event::ContainerStarted, exited(3)])
        .error
        .starts_with("docker run exited with code 3"));
    let mut no_image = p.clone();
    no_image.image.clear();
    let (state, _) = claim(no_image);
    assert_eq!(state.verdict().unwrap().error, "container job has no image");
}

// ---------- push outcome (spec 4.9) ----------

fn finished_ok() -> Vec<Event> {
    vec![
        Event::ContainerStarted,
        sig(r#"{"type":"finish","outcome":"completed","summary":"did it"}"#),
        sig(r#"{"type":"session_idle"}"#),
        exited(0),
    ]
}

#[test]
fn success_with_commits_reports_the_run_branch_and_base() {
    let p = plan();
    let mut events = vec![ready(&p)];
    events.extend(finished_ok());
    let head = vec![RepoHead {
        slug: "acme/app".into(),
        head: HEAD.into(),
    }];
    events.push(Event::HeadsInspected {
        heads: head.clone(),
    });
    events.push(Event::PushDone { heads: head });
    let (state, effects) = run(p, &events);
    let r = &reports(&effects)[0];
    assert_eq!(r.status, "succeeded");
    assert_eq!(r.branch, "agent-runs/run-42");
    assert_eq!(r.base_commit, BASE);
    assert_eq!(r.summary, "did it");
    assert!(r.repos.is_empty(), "single-repo runs use the scalar fields");
    assert_eq!(lifecycle_phases(&effects), vec!["worktree_ready", "pushed"]);
    assert!(effects.contains(&Effect::RemoveCheckout));
    let (done, _) = transition(&state, &Event::ReportAccepted).unwrap();
    assert_eq!(done.kind(), StateKind::Reported);
}

#[test]
fn success_without_commits_reports_no_branch() {
    let p = plan();
    let mut events = vec![ready(&p)];
    events.extend(finished_ok());
    events.push(Event::HeadsInspected {
        heads: vec![RepoHead {
            slug: "acme/app".into(),
            head: BASE.into(),
        }],
    });
    let (_, effects) = run(p, &events);
    let r = &reports(&effects)[0];
    assert_eq!(
        (r.status.as_str(), r.branch.as_str(), r.base_commit.as_str()),
        ("succeeded", "", "")
    );
    assert!(!effects.iter().any(|e| matches!(e, Effect::Push { .. })));
    assert_eq!(
        lifecycle_phases(&effects),
        vec!["worktree_ready", "no_changes"]
    );
}

#[test]
fn push_error_fails_the_run_with_triage_push_prefix() {
    let p = plan();
    let mut events = vec![ready(&p)];
    events.extend(finished_ok());
    events.push(sample_event(EventKind::HeadsInspected));
    events.push(Event::PushFailed {
        error: "remote rejected".into(),
    });
    let (_, effects) = run(p, &events);
    let r = &reports(&effects)[0];
    assert_eq!(
        (r.status.as_str(), r.error.as_str()),
        ("failed", "triage push: remote rejected")
    );
    assert_eq!(
        lifecycle_phases(&effects),
        vec!["worktree_ready", "push_failed"]
    );
}

#[test]
fn failed_agent_is_not_pushed() {
    let p = plan();
    let (_, effects) = run(p.clone(), &[ready(&p), Event::ContainerStarted, exited(1)]);
    assert!(!effects
        .iter()
        .any(|e| matches!(e, Effect::Push { .. } | Effect::InspectHeads)));
    assert_eq!(reports(&effects)[0].status, "failed");
}

#[test]
fn multi_repo_lists_every_repo_and_mirrors_the_primary() {
    let mut p = plan_with(&["acme/app", "acme/lib"], "");
    p.repos[1].continue_branch = "feature/lib".into();
    let mut events = vec![ready(&p)];
    events.extend(finished_ok());
    let heads = vec![
        RepoHead {
            slug: "acme/app".into(),
            head: BASE.into(),
        },
        RepoHead {
            slug: "acme/lib".into(),
            head: HEAD.into(),
        },
    ];
    events.push(Event::HeadsInspected { heads });
    events.push(Event::PushDone {
        heads: vec![RepoHead {
            slug: "acme/lib".into(),
            head: HEAD.into(),
        }],
    });
    let (_, effects) = run(p, &events);
    let r = &reports(&effects)[0];
    assert_eq!(r.repos.len(), 2);
    assert_eq!(
        (r.repos[0].repo_slug.as_str(), r.repos[0].branch.as_str()),
        ("acme/app", "")
    );
    assert_eq!(
        (r.repos[1].branch.as_str(), r.repos[1].base_commit.as_str()),
        ("feature/lib", BASE)
    );
    // The scalar fields mirror repos[0], which had no changes.
    assert_eq!((r.branch.as_str(), r.base_commit.as_str()), ("", ""));
    let repos_in_events: Vec<String> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::SendEvent { payload_json, .. } => {
                let v: serde_json::Value = serde_json::from_str(payload_json).unwrap();
                Some(format!("{}:{}", v["phase"].as_str()?, v["repo"].as_str()?))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        repos_in_events,
        vec![
            "worktree_ready:acme/app",
            "worktree_ready:acme/lib",
            "no_changes:acme/app",
            "pushed:acme/lib"
        ]
    );
}

#[test]
fn cancel_during_prepare_or_push_reports_canceled() {
    // Upstream reports failed "triage prepare/push: …"; we report what the user asked for.
    let p = plan();
    let (_, effects) = run(
        p.clone(),
        &[
            Event::CancelRequested { force: false },
            Event::CheckoutFailed {
                error: "killed".into(),
            },
        ],
    );
    assert_eq!(reports(&effects)[0].status, "canceled");
    let mut events = vec![ready(&p)];
    events.extend(finished_ok());
    events.push(sample_event(EventKind::HeadsInspected));
    events.push(Event::DrainDeadlinePassed);
    events.push(sample_event(EventKind::PushDone));
    let (_, effects) = run(p, &events);
    let r = reports(&effects).pop().unwrap();
    assert_eq!(
        (r.status.as_str(), r.error.as_str(), r.branch.as_str()),
        ("canceled", "context canceled", "")
    );
}

#[test]
fn run_timeout_fails_and_kills_the_container() {
    let p = plan_with(&[], "");
    let (state, effects) = run(
        p,
        &[
            Event::ContainerStarted,
            Event::RunTimeoutPassed,
            Event::ContainerExited { code: Some(137) },
        ],
    );
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::KillContainer { .. })));
    assert!(state.verdict().unwrap().error.contains("wall-clock limit"));
}

#[test]
fn report_retry_409_and_permanent_failure() {
    let p = plan_with(&[], "");
    let (pushed, _) = run(p, &[Event::ContainerStarted, exited(0)]);
    let (again, effects) = transition(
        &pushed,
        &Event::ReportFailed {
            error: "503".into(),
            retryable: true,
        },
    )
    .unwrap();
    assert_eq!(
        reports(&effects),
        vec![pushed.verdict().unwrap().to_report()]
    );
    assert!(matches!(&again, RunState::Pushed { report, .. } if report.attempt == 2));
    let (gone, effects) = transition(&again, &Event::ReportRejected409).unwrap();
    assert!(effects.is_empty());
    assert_eq!(gone.kind(), StateKind::Failed);
    let (rejected, _) = transition(
        &again,
        &Event::ReportFailed {
            error: "400 bad status".into(),
            retryable: false,
        },
    )
    .unwrap();
    assert!(matches!(&rejected, RunState::Failed { reason, .. } if reason.contains("400")));
}

#[test]
fn abandon_kills_the_container_and_removes_the_checkout_without_report() {
    let p = plan();
    let (state, effects) = run(
        p.clone(),
        &[
            ready(&p),
            Event::ContainerStarted,
            Event::RunNoLongerRunning,
        ],
    );
    assert_eq!(state.kind(), StateKind::Failed);
    assert!(reports(&effects).is_empty());
    let tail = &effects[effects.len() - 2..];
    assert_eq!(
        tail,
        &[
            Effect::KillContainer {
                name: "wsr-h1-run-42-1".into()
            },
            Effect::RemoveCheckout
        ]
    );
}

#[test]
fn container_restart_uses_a_fresh_attempt_name() {
    let p = plan();
    let (state, effects) = run(p.clone(), &[ready(&p), Event::ContainerStarting]);
    assert!(matches!(&state, RunState::Prepared { container, .. } if container.attempt == 2));
    assert_eq!(
        &effects[effects.len() - 2..],
        &[
            Effect::KillContainer {
                name: "wsr-h1-run-42-1".into()
            },
            Effect::StartContainer {
                name: "wsr-h1-run-42-2".into(),
                attempt: 2
            }
        ]
    );
}

#[test]
fn states_round_trip_through_json() {
    let p = plan();
    let mut events = vec![ready(&p)];
    events.extend(finished_ok());
    events.push(sample_event(EventKind::HeadsInspected));
    let (mut state, _) = claim(p);
    for e in &events {
        state = transition(&state, e).unwrap().0;
        let json = serde_json::to_string(&state).unwrap();
        assert!(!json.contains("tok-0123456789"));
        let back: RunState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let ejson = serde_json::to_string(e).unwrap();
        assert_eq!(&serde_json::from_str::<Event>(&ejson).unwrap(), e);
    }
}

// ---------- recovery table ----------

fn obs(container: ContainerObservation) -> Observations {
    Observations {
        container,
        checkout_present: true,
        remote_heads: Vec::new(),
        server_says_final: false,
    }
}

#[test]
fn recovery_table() {
    let p = plan();
    let gone = obs(ContainerObservation::Gone);
    let running = obs(ContainerObservation::Running);
    // Claimed: wipe and prepare again.
    let claimed = claim(p.clone()).0;
    assert_eq!(
        recover(&claimed, &gone),
        RecoveryDecision::Feed(vec![Event::PrepareStarted])
    );
    let (again, effects) = transition(&claimed, &Event::PrepareStarted).unwrap();
    assert_eq!(
        effects,
        vec![Effect::RemoveCheckout, Effect::Prepare { attempt: 2 }]
    );
    assert!(matches!(again, RunState::Claimed { prepare, .. } if prepare.attempt == 2));
    // Prepared: start the container (fresh attempt), or re-attach / harvest if it exists.
    let prepared = run(p.clone(), &[ready(&p)]).0;
    assert_eq!(
        recover(&prepared, &gone),
        RecoveryDecision::Feed(vec![Event::ContainerStarting])
    );
    assert_eq!(
        recover(&prepared, &running),
        RecoveryDecision::Reattach {
            name: "wsr-h1-run-42-1".into(),
            feed: vec![Event::ContainerStarted]
        }
    );
    // Running: re-attach, harvest the exit, or fail as interrupted.
    let running_state = run(p.clone(), &[ready(&p), Event::ContainerStarted]).0;
    assert!(
        matches!(recover(&running_state, &running), RecoveryDecision::Reattach { feed, .. } if feed.is_empty())
    );
    assert_eq!(
        recover(
            &running_state,
            &obs(ContainerObservation::Exited { code: Some(0) })
        ),
        RecoveryDecision::Feed(vec![exited(0)])
    );
    let decision = recover(&running_state, &gone);
    assert_eq!(
        decision,
        RecoveryDecision::Feed(vec![Event::ContainerVanished])
    );
    let (after, _) = transition(&running_state, &Event::ContainerVanished).unwrap();
    assert!(after.verdict().unwrap().error.contains("disappeared"));
    // Push intent: check the remote ref; push again only if it is not at the sha.
    let mut events = vec![ready(&p)];
    events.extend(finished_ok());
    events.push(sample_event(EventKind::HeadsInspected));
    let pushing = run(p.clone(), &events).0;
    let mut at_sha = gone.clone();
    at_sha.remote_heads = vec![("acme/app".into(), Some(HEAD.into()))];
    assert!(
        matches!(recover(&pushing, &at_sha), RecoveryDecision::Feed(e) if matches!(e[0], Event::PushDone { .. }))
    );
    let mut elsewhere = gone.clone();
    elsewhere.remote_heads = vec![("acme/app".into(), Some(BASE.into()))];
    assert!(
        matches!(recover(&pushing, &elsewhere), RecoveryDecision::Redo(e) if matches!(e[0], Effect::Push { .. }))
    );
    // Pushed / report intent: report again.
    let pushed = run(p.clone(), &[Event::CheckoutFailed { error: "x".into() }]).0;
    assert!(
        matches!(recover(&pushed, &gone), RecoveryDecision::Redo(e) if matches!(e[0], Effect::Report(_)))
    );
    // 409 from the server: abandon.
    let mut final_ = running.clone();
    final_.server_says_final = true;
    assert_eq!(
        recover(&running_state, &final_),
        RecoveryDecision::Feed(vec![Event::RunNoLongerRunning])
    );
    // Terminal: nothing.
    let done = transition(&pushed, &Event::ReportAccepted).unwrap().0;
    assert_eq!(recover(&done, &final_), RecoveryDecision::Nothing);
}

#[test]
fn plan_keeps_env_without_secrets() {
    let p = plan();
    assert_eq!(p.env, BTreeMap::new());
}

#[test]
fn container_start_failure_reports_failed_with_the_reason_and_removes_the_checkout() {
    let p = plan();
    let (state, effects) = run(
        p.clone(),
        &[
            Event::CheckoutReady {
                checkout: checkout_for(&p),
            },
            Event::ContainerStartFailed {
                error: "image other:1 is not in the runner image allowlist".into(),
            },
        ],
    );
    let verdict = state.verdict().expect("verdict decided");
    assert_eq!(verdict.status, Status::Failed);
    assert_eq!(
        verdict.error,
        "image other:1 is not in the runner image allowlist"
    );
    assert!(effects.contains(&Effect::RemoveCheckout));
    assert!(matches!(effects.last(), Some(Effect::Report(r)) if r.status == "failed"));

    // A stop that arrived while starting wins: the user asked to cancel.
    let (state, _) = run(
        p.clone(),
        &[
            Event::CheckoutReady {
                checkout: checkout_for(&p),
            },
            Event::CancelRequested { force: false },
            Event::ContainerStartFailed {
                error: "engine down".into(),
            },
        ],
    );
    assert_eq!(state.verdict().map(|v| v.status), Some(Status::Canceled));
}

#[test]
fn refused_claim_input_fails_before_any_checkout_or_push() {
    let dup = plan_with(&["acme/app", "Acme/App"], "");
    let mut job = JobSpec {
        run_id: 42,
        ..Default::default()
    };
    job.env.insert("LLM_API_KEY".into(), "key\0value".into());
    let nul = RunPlan::from_job(&job, "h1").0;
    for (p, want) in [(dup, "more than once"), (nul, "LLM_API_KEY")] {
        let (state, effects) = claim(p);
        assert_eq!(StateKind::from(&state), StateKind::Pushed, "{state:?}");
        assert_eq!(effects.len(), 1, "{effects:?}");
        let r = &reports(&effects)[0];
        assert_eq!(r.status, "failed");
        assert!(r.error.contains(want), "{}", r.error);
        assert!(!r.error.contains("key\0"), "{}", r.error);
    }
}
// ---------- the agent output journal budget (docs/journal.md) ----------

/// Feeds agent events the way the run task does: each admitted event is a transition (a
/// record when it changed the state), the coalesced rest is applied right before the exit.
/// Returns the state after `exit` and how many records the agent's output caused.
fn through_budget(events: &[Event], limit: u32, exit: &Event) -> (RunState, usize) {
    let p = plan_with(&[], "");
    let (mut state, _) = run(p, &[Event::ContainerStarted]);
    let mut budget = AgentBudget::new("c", 0, limit);
    let mut records = 0;
    let step = |state: &mut RunState, event: &Event| -> bool {
        let (next, _) = transition(state, event).expect("agent events apply while running");
        let changed = next != *state;
        *state = next;
        changed
    };
    for event in events {
        if let Some(event) = budget.admit(event.clone()) {
            if step(&mut state, &event) {
                budget.recorded();
                records += 1;
            }
        }
    }
    let coalesced = budget.take_pending();
    assert!(coalesced.len() <= MAX_COALESCED_RECORDS, "{coalesced:?}");
    for event in &coalesced {
        if step(&mut state, event) {
            records += 1;
        }
    }
    let (state, _) = transition(&state, exit).expect("exit applies while running");
    (state, records)
}

/// The same events, every one journaled (no budget).
fn unbudgeted(events: &[Event], exit: &Event) -> RunState {
    let mut all = vec![Event::ContainerStarted];
    all.extend(events.iter().cloned());
    all.push(exit.clone());
    run(plan_with(&[], ""), &all).0
}

fn agent_event_strategy() -> impl proptest::strategy::Strategy<Value = Event> {
    use proptest::prelude::*;
    prop_oneof![
        (0u8..3).prop_map(|n| Event::AgentSignal {
            signal: AgentSignal::Event {
                event_type: format!("t{n}")
            }
        }),
        (0u8..3, 0u8..4).prop_map(|(o, s)| Event::AgentSignal {
            signal: AgentSignal::Finish {
                outcome: ["completed", "blocked", "needs_info"][o as usize].into(),
                summary: format!("s{s}"),
            }
        }),
        (0u8..6).prop_map(|m| Event::AgentSignal {
            signal: AgentSignal::Error {
                message: format!("e{m}")
            }
        }),
        Just(Event::AgentSignal {
            signal: AgentSignal::SessionIdle
        }),
        Just(Event::StreamDegraded),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever the agent prints and wherever the budget runs out, the coalesced stream ends
    /// in the state (hence the verdict) of the full stream, within the record bound.
    #[test]
    fn the_budget_never_changes_the_verdict(
        events in proptest::collection::vec(agent_event_strategy(), 0..80),
        limit in 0u32..8,
        code in proptest::prelude::prop_oneof![
            proptest::prelude::Just(Some(0)),
            proptest::prelude::Just(Some(1)),
            proptest::prelude::Just(None),
        ],
    ) {
        let exit = Event::ContainerExited { code };
        let (budgeted, records) = through_budget(&events, limit, &exit);
        let full = unbudgeted(&events, &exit);
        proptest::prop_assert_eq!(budgeted.verdict(), full.verdict());
        proptest::prop_assert_eq!(&budgeted, &full);
        proptest::prop_assert!(records <= limit as usize + MAX_COALESCED_RECORDS);
    }
}

#[test]
fn the_last_finish_or_error_decides_after_thousands_of_signals() {
    let errors: Vec<Event> = (0..2000)
        .map(|n| sig(&format!(r#"{{"type":"error","message":"e{n}"}}"#)))
        .collect();
    let exit = exited(0);
    // Row 5: the last error, though only the first errors (the budget) were journaled one by one.
    let (state, records) = through_budget(&errors, AGENT_RECORD_BUDGET, &exit);
    assert_eq!(
        state.verdict().map(|v| v.error.as_str()),
        Some("agent error: e1999")
    );
    assert_eq!(records, AGENT_RECORD_BUDGET as usize + 1);
    // Row 6: a finish after the flood wins over every error.
    let mut then_finish = errors.clone();
    then_finish.push(sig(
        r#"{"type":"finish","outcome":"completed","summary":"done"}"#,
    ));
    then_finish.push(sig(r#"{"type":"session_idle"}"#));
    let (state, records) = through_budget(&then_finish, AGENT_RECORD_BUDGET, &exit);
    let verdict = state.verdict().unwrap();
    assert_eq!(
        (verdict.status, verdict.summary.as_str()),
        (Status::Succeeded, "done")
    );
    assert!(records <= AGENT_RECORD_BUDGET as usize + MAX_COALESCED_RECORDS);
    // Row 4: a blocked finish after the flood.
    let mut blocked = errors;
    blocked.push(sig(
        r#"{"type":"finish","outcome":"blocked","summary":"no access"}"#,
    ));
    let (state, _) = through_budget(&blocked, AGENT_RECORD_BUDGET, &exit);
    assert_eq!(
        state.verdict().map(|v| v.error.as_str()),
        Some("agent blocked: no access")
    );
}

// ---------- phases and the accessors the daemon reads ----------

/// One state per phase (both terminal states for `Ended`), reached through `transition`.
fn phase_samples() -> Vec<RunState> {
    let p = plan();
    let mut to_push = vec![ready(&p)];
    to_push.extend(finished_ok());
    let inspecting = run(p.clone(), &to_push).0;
    to_push.push(sample_event(EventKind::HeadsInspected));
    let pushing = run(p.clone(), &to_push).0;
    vec![
        sample_state(StateKind::Claimed),
        sample_state(StateKind::Prepared),
        sample_state(StateKind::Running),
        inspecting,
        pushing,
        sample_state(StateKind::Pushed),
        sample_state(StateKind::Reported),
        sample_state(StateKind::Failed),
    ]
}

#[test]
fn every_phase_is_reached_and_belongs_to_its_milestone() {
    let samples = phase_samples();
    let reached: Vec<Phase> = samples.iter().map(RunState::phase).collect();
    for phase in Phase::iter() {
        assert!(reached.contains(&phase), "phase {phase} not reached");
    }
    for state in &samples {
        let phase = state.phase();
        if state.is_terminal() {
            assert_eq!(phase, Phase::Ended, "{}", state.describe());
        } else {
            assert_eq!(phase.milestone(), state.kind(), "{}", state.describe());
        }
        check_accessors(state).unwrap();
    }
    let phases: Vec<String> = reached.iter().map(Phase::to_string).collect();
    assert_eq!(
        phases,
        [
            "preparing_checkout",
            "starting_container",
            "agent_running",
            "inspecting_heads",
            "pushing",
            "reporting",
            "ended",
            "ended"
        ]
    );
}

#[test]
fn a_stop_is_recorded_in_every_open_phase_and_kills_only_a_container_that_may_run() {
    // Each phase × each stop: a stop is recorded (and read back) exactly while the verdict is
    // still open, and the phase does not move.
    let stops = [
        (
            Event::CancelRequested { force: true },
            StopReason::Canceled { force: true },
        ),
        (Event::DrainDeadlinePassed, StopReason::Drain),
        (Event::RunTimeoutPassed, StopReason::Timeout),
    ];
    for state in phase_samples() {
        assert_eq!(state.stop_pending(), None);
        for (event, reason) in &stops {
            match (state.phase(), transition(&state, event)) {
                (Phase::Reporting | Phase::Ended, Err(_)) => {}
                (phase, Ok((next, effects))) => {
                    assert_eq!(next.phase(), phase);
                    assert_eq!(next.stop_pending(), Some(*reason));
                    // Only a container that may run is killed, and it is the state's own.
                    let kills: Vec<&Effect> = effects
                        .iter()
                        .filter(|e| matches!(e, Effect::KillContainer { .. }))
                        .collect();
                    match phase {
                        Phase::StartingContainer | Phase::AgentRunning => {
                            assert_eq!(
                                kills,
                                [&Effect::KillContainer {
                                    name: state.container().unwrap().name.clone()
                                }]
                            )
                        }
                        _ => assert!(kills.is_empty(), "{phase}: {effects:?}"),
                    }
                    assert!(matches!(
                        transition(&next, event),
                        Err(Rejected::AlreadyStopping { .. })
                    ));
                }
                (phase, Err(r)) => panic!("{phase} refused a stop: {r}"),
            }
        }
    }
}

/// The accessors agree with the state and with what `transition` accepts.
fn check_accessors(state: &RunState) -> Result<(), String> {
    let phase = state.phase();
    let kind = state.kind();
    let ok = |cond: bool, what: &str| {
        if cond {
            Ok(())
        } else {
            Err(format!("{what} in {phase} ({})", state.describe()))
        }
    };
    ok(
        phase == Phase::Ended || phase.milestone() == kind,
        "phase in another milestone",
    )?;
    ok(state.is_terminal() == (phase == Phase::Ended), "terminal")?;
    ok(
        state.effect_in_flight().is_none() == state.is_terminal(),
        "effect in flight",
    )?;
    ok(
        state.checkout().is_some() == matches!(kind, StateKind::Prepared | StateKind::Running),
        "checkout",
    )?;
    ok(
        state.container().is_some() == matches!(kind, StateKind::Prepared | StateKind::Running),
        "container",
    )?;
    ok(
        state.current_container().is_some() == (phase == Phase::AgentRunning),
        "current container",
    )?;
    ok(
        state.current_container().is_none()
            || state.current_container() == state.container().map(|c| c.name.as_str()),
        "current container is the state's container",
    )?;
    ok(
        state.pushing_heads().is_some() == (phase == Phase::Pushing),
        "pushing heads",
    )?;
    ok(
        state.accepted_verdict().is_some() == (kind == StateKind::Reported),
        "accepted verdict",
    )?;
    ok(
        state.stop_pending().is_none() || !matches!(phase, Phase::Reporting | Phase::Ended),
        "a stop after the verdict",
    )?;
    // Agent signals count exactly while the agent runs.
    let signal = sig(r#"{"type":"error","message":"m"}"#);
    ok(
        transition(state, &signal).is_ok() == (phase == Phase::AgentRunning),
        "agent signal accepted",
    )?;
    match (phase, state.effect_in_flight()) {
        (Phase::PreparingCheckout, Some(Effect::Prepare { .. }))
        | (Phase::StartingContainer | Phase::AgentRunning, Some(Effect::StartContainer { .. }))
        | (Phase::InspectingHeads, Some(Effect::InspectHeads))
        | (Phase::Reporting, Some(Effect::Report(_)))
        | (Phase::Ended, None) => Ok(()),
        (Phase::Pushing, Some(Effect::Push { heads })) => ok(
            Some(heads.as_slice()) == state.pushing_heads(),
            "push effect names the pushing heads",
        ),
        (_, effect) => Err(format!("{phase} has effect {effect:?} in flight")),
    }
}

/// Every kind of event (`sample_event`) plus the variants that steer a run elsewhere.
fn any_events(p: &RunPlan) -> Vec<Event> {
    let heads = |head: &str| -> Vec<RepoHead> {
        p.repos
            .iter()
            .map(|r| RepoHead {
                slug: r.slug.clone(),
                head: head.into(),
            })
            .collect()
    };
    let mut events: Vec<Event> = EventKind::iter().map(sample_event).collect();
    events.extend([
        ready(p),
        exited(1),
        Event::ContainerExited { code: None },
        Event::HeadsInspected { heads: heads(BASE) },
        Event::HeadsInspected { heads: heads(HEAD) },
        Event::PushDone { heads: heads(HEAD) },
        Event::ReportFailed {
            error: "no".into(),
            retryable: false,
        },
    ]);
    events
}

/// The event that moves `state` on as a healthy run would (`n` picks among the choices), so
/// that random sequences reach the late phases too.
fn onward(state: &RunState, p: &RunPlan, n: u8) -> Event {
    let heads = |head: &str| -> Vec<RepoHead> {
        p.repos
            .iter()
            .map(|r| RepoHead {
                slug: r.slug.clone(),
                head: head.into(),
            })
            .collect()
    };
    match state.phase() {
        Phase::PreparingCheckout => ready(p),
        Phase::StartingContainer => Event::ContainerStarted,
        Phase::AgentRunning if n % 3 == 0 => exited(0),
        Phase::AgentRunning => sig(r#"{"type":"finish","outcome":"completed","summary":"ok"}"#),
        Phase::InspectingHeads if n % 4 == 0 => Event::HeadsInspected { heads: heads(BASE) },
        Phase::InspectingHeads => Event::HeadsInspected { heads: heads(HEAD) },
        Phase::Pushing => Event::PushDone {
            heads: state.pushing_heads().unwrap_or_default().to_vec(),
        },
        Phase::Reporting if n % 2 == 0 => Event::ReportFailed {
            error: "503".into(),
            retryable: true,
        },
        Phase::Reporting | Phase::Ended => Event::ReportAccepted,
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Along any event sequence from a claim, the accessors agree with the state, a new
    /// effect in flight is one `transition` handed out, the journaled recovery redo is that
    /// effect, and a stop is read back where it was recorded.
    #[test]
    fn accessors_agree_with_the_transition_function(
        repos in 0usize..3,
        steps in proptest::collection::vec((0u8..10, proptest::prelude::any::<u8>()), 0..40),
    ) {
        let p = plan_with(&["acme/app", "acme/lib"][..repos], "");
        let others = any_events(&p);
        let (mut state, effects) = claim(p.clone());
        proptest::prop_assert!(
            state.effect_in_flight().is_none_or(|e| effects.contains(&e)),
            "claim hands out {:?}", state.effect_in_flight()
        );
        check_accessors(&state).map_err(proptest::test_runner::TestCaseError::fail)?;
        for (pick, n) in steps {
            let event = &match pick {
                0..6 => onward(&state, &p, n),
                _ => others[usize::from(n) % others.len()].clone(),
            };
            let Ok((next, effects)) = transition(&state, event) else {
                continue;
            };
            check_accessors(&next).map_err(proptest::test_runner::TestCaseError::fail)?;
            let in_flight = next.effect_in_flight();
            if in_flight != state.effect_in_flight() || next.phase() != state.phase() {
                // Entering a phase (or a fresh attempt) hands out its effect, except the
                // agent's start, which is the same container start still under way.
                let same_start = state.phase() == Phase::StartingContainer
                    && next.phase() == Phase::AgentRunning
                    && in_flight == state.effect_in_flight();
                proptest::prop_assert!(
                    same_start || in_flight.as_ref().is_none_or(|e| effects.contains(e)),
                    "{} → {}: {:?} not handed out ({:?})",
                    state.describe(), next.describe(), in_flight, effects
                );
            }
            if let Some(reason) = match event {
                Event::CancelRequested { force } => Some(StopReason::Canceled { force: *force }),
                Event::DrainDeadlinePassed => Some(StopReason::Drain),
                Event::RunTimeoutPassed => Some(StopReason::Timeout),
                _ => None,
            } {
                proptest::prop_assert_eq!(next.stop_pending(), Some(reason));
                proptest::prop_assert_eq!(state.stop_pending(), None);
            }
            // What recovery redoes is the effect the state has in flight.
            if let RecoveryDecision::Redo(redo) = recover(&next, &obs(ContainerObservation::Gone)) {
                proptest::prop_assert_eq!(redo, in_flight.into_iter().collect::<Vec<_>>());
            }
            state = next;
        }
    }
}
