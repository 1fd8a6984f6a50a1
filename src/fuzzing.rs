//! Fuzz target bodies. Each `fuzz/fuzz_targets/<name>.rs` is a one-line call into a function
//! here, so `tests/fuzz_corpus.rs` replays the committed corpus through the same code on
//! stable, and every input a fuzzer ever kept stays a regression test.
//!
//! A body panics only when an invariant of the code under test is broken (that is the
//! finding); bad input itself must come back as an error value. Bodies do no IO and touch
//! no global state (no secret registration), so inputs replay identically.

use std::time::Duration;

use crate::config::{parse_go_duration, DurationError};
use crate::control::client::{parse_retry_after_value, ControlError, StatusError};
use crate::control::wire::{ClaimResponse, ErrorBody, HeartbeatResponse, JobSpec, VersionResponse};
use crate::effects::git::validate::{
    run_branch, validate_abs_path, validate_branch_name, validate_commit_id,
    validate_prepare_inputs, validate_remote_url, validate_slug, PrepareInputs, RemoteScheme,
    TransportPolicy,
};
use crate::fsm::contract::{classify_stdout_line, AgentSignal};
use crate::fsm::machine::{
    claim, transition, AgentFacts, Checkout, CheckoutRepo, Event, Rejected, RepoHead, RunState,
    StateKind,
};
use crate::fsm::phase::Phase;
use crate::fsm::plan::RunPlan;
use crate::fsm::verdict::{Status, Verdict};
use crate::triage_cli::{parse_command, Flags, Kind, TriageCommand, PREPARE_FLAGS, PUSH_FLAGS};

pub use crate::journal::{fuzz_decode_and_replay as journal_decode, FuzzOutcome};

/// True when `text` holds a Windshift shaped secret (`wsrt_`/`wsrc_` followed by an
/// alphanumeric character), i.e. something [`crate::redact::redact`] should have masked.
pub fn contains_shaped_secret(text: &str) -> bool {
    ["wsrt_", "wsrc_"].iter().any(|prefix| {
        text.match_indices(prefix).any(|(i, _)| {
            text.as_bytes()
                .get(i + prefix.len())
                .is_some_and(u8::is_ascii_alphanumeric)
        })
    })
}

// ---------------------------------------------------------------------------------------------
// wire_json: JobSpec / claim / heartbeat / version / error-body decoding.

/// Which wire types the input decoded as (for the corpus test's expectations).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WireOutcome {
    pub job: bool,
    pub claim: bool,
    pub heartbeat: bool,
    pub version: bool,
    pub error_body: bool,
}

/// Decodes the input as every JSON body the runner reads from the server. Checks: decoding
/// never panics; what decodes re-encodes to the same value; a job becomes a plan without
/// secret values, whose journal form round-trips and whose first transition does not panic;
/// `JobSpec`'s Debug shows no env value; the client's error path (status + body → error
/// text) shows no shaped secret.
pub fn wire_json(data: &[u8]) -> WireOutcome {
    let mut out = WireOutcome::default();
    if let Ok(job) = serde_json::from_slice::<JobSpec>(data) {
        out.job = true;
        check_job(&job);
    }
    if let Ok(claimed) = serde_json::from_slice::<ClaimResponse>(data) {
        out.claim = true;
        let again: ClaimResponse = round_trip(&claimed, "ClaimResponse");
        assert_eq!(again, claimed, "ClaimResponse round trip");
        if let Some(job) = &claimed.job {
            check_job(job);
        }
    }
    if let Ok(beat) = serde_json::from_slice::<HeartbeatResponse>(data) {
        out.heartbeat = true;
        let again: HeartbeatResponse = round_trip(&beat, "HeartbeatResponse");
        assert_eq!(again, beat, "HeartbeatResponse round trip");
    }
    if let Ok(version) = serde_json::from_slice::<VersionResponse>(data) {
        out.version = true;
        let again: VersionResponse = round_trip(&version, "VersionResponse");
        assert_eq!(again, version, "VersionResponse round trip");
    }
    if let Ok(body) = serde_json::from_slice::<ErrorBody>(data) {
        out.error_body = true;
        let again: ErrorBody = round_trip(&body, "ErrorBody");
        // `details` is free JSON: serde_json's float parsing is not exact without its
        // float_roundtrip feature, so only the typed fields are compared.
        assert_eq!(
            (&again.error, &again.code, &again.request_id),
            (&body.error, &body.code, &body.request_id),
            "ErrorBody round trip"
        );
    }
    check_status_error(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(wait) = parse_retry_after_value(text) {
            assert!(wait <= Duration::from_secs(300), "Retry-After is capped");
        }
    }
    out
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T, what: &str) -> T {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|e| panic!("{what} encodes: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{what} re-decodes: {e}"))
}

fn check_job(job: &JobSpec) {
    let again: JobSpec = round_trip(job, "JobSpec");
    assert_eq!(&again, job, "JobSpec round trip");

    // Debug masks env values: compare against the Debug of the same job with blank values,
    // so a value that also appears in another field is not a false alarm.
    let shown = format!("{job:?}");
    let mut blank = job.clone();
    blank.env.values_mut().for_each(String::clear);
    let shown_blank = format!("{blank:?}");
    for value in job.env.values().filter(|v| v.len() >= 4) {
        assert!(
            !shown.contains(value.as_str()) || shown_blank.contains(value.as_str()),
            "JobSpec Debug shows an env value"
        );
    }

    let (plan, secrets) = RunPlan::from_job(job, "fuzz");
    for key in ["WS_TOKEN", "LLM_API_KEY"] {
        assert!(!plan.env.contains_key(key), "plan keeps secret {key}");
    }
    if let Some(token) = job.run_token() {
        assert!(
            plan.env.values().all(|v| v != token),
            "plan keeps the run token under another key"
        );
    }
    let env = plan.container_env(&secrets);
    assert_eq!(env.get("AGENT_RUN_ID"), Some(&job.run_id.to_string()));
    // A value a container env cannot carry never reaches it, nor the refusal text (which
    // holds no raw NUL or line break, so never such a value).
    for (key, value) in &job.env {
        if crate::fsm::plan::env_entry_problem(key, value).is_some() {
            assert!(
                !env.contains_key(key) || key == "AGENT_RUN_ID",
                "bad env {key:?} kept"
            );
            let why = plan.refused.as_deref().unwrap_or_default();
            assert!(
                !why.contains(['\0', '\n', '\r']),
                "refusal echoes raw input"
            );
        }
    }

    let journaled: RunPlan = round_trip(&plan, "RunPlan");
    assert_eq!(journaled, plan, "RunPlan round trip");

    let name = plan.container_name(1);
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)),
        "container name {name:?} is not a valid Docker name"
    );
    let (state, _effects) = claim(plan);
    let stored: RunState = round_trip(&state, "RunState");
    assert_eq!(stored, state, "claimed state round trip");
}

fn check_status_error(data: &[u8]) {
    for status in [401u16, 409, 429, 500] {
        let error = StatusError::from_response("claim", status, data, None);
        if let Some(body) = &error.body {
            assert!(
                !contains_shaped_secret(&body.error),
                "error body text kept a secret"
            );
        }
        assert!(
            !contains_shaped_secret(&error.excerpt),
            "excerpt kept a secret"
        );
        let text = error.to_string();
        assert!(
            !contains_shaped_secret(&text),
            "status error shows a secret"
        );
        let wrapped = ControlError::Status(Box::new(error)).to_string();
        assert!(
            !contains_shaped_secret(&wrapped),
            "control error shows a secret"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// agent_verdict: agent JSONL lines folded through the state machine to a verdict.

/// What the fold of [`agent_verdict`] ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictOutcome {
    /// The terminal state reached.
    pub terminal: String,
    /// The status of the run's single verdict, when one was decided.
    pub status: Option<Status>,
    /// Events the machine rejected along the way.
    pub rejected: usize,
}

/// Longest script the fold runs; longer inputs are cut (keeps each execution fast).
const MAX_SCRIPT_LINES: usize = 256;

/// The input is a run script. Byte 0 picks the job (bit 0: a `ci_task` container job instead
/// of a coding agent; bits 1–2: 0, 1 or 2 repos); byte 1 the exit code; the rest is lines.
/// A line starting with byte 0x01 is a runner-side event chosen by its second byte (cancel,
/// drain, exit, push outcome, report outcome, …); any other line is an agent stdout line,
/// classified by [`classify_stdout_line`] and folded in as an `AgentSignal`.
///
/// The run starts in Running (after claim, checkout and container start); after the script
/// the run is driven to its end (exit, heads, push, report accepted). Checks: no panic;
/// terminal states absorb every event; once decided the verdict never changes and every
/// report the machine asks for carries it (at most one verdict); every state round-trips
/// through its journal form; the run always reaches a terminal state; for a script of agent
/// lines only, the verdict is the one spec 6.5 gives for those lines.
pub fn agent_verdict(data: &[u8]) -> VerdictOutcome {
    let (setup, exit_byte, script) = match data {
        [a, b, rest @ ..] => (*a, *b, rest),
        [a] => (*a, 0, &[][..]),
        [] => (0, 0, &[][..]),
    };
    let coding_agent = setup & 1 == 0;
    let repo_count = usize::from((setup >> 1) & 3).min(2);
    let exit_code = match exit_byte % 4 {
        0 => Some(0),
        1 => Some(1),
        2 => None,
        _ => Some(i32::from(exit_byte as i8)),
    };
    let plan = fuzz_plan(coding_agent, repo_count);
    let checkout = fuzz_checkout(&plan);

    let mut run = Fold::new();
    let (state, effects) = claim(plan.clone());
    run.accept(None, state, &effects);
    if !plan.repos.is_empty() {
        run.step(&Event::CheckoutReady {
            checkout: checkout.clone(),
        });
    }
    run.step(&Event::ContainerStarted);
    assert!(
        run.state.kind() == StateKind::Running,
        "setup reaches Running, got {}",
        run.state.describe()
    );

    let mut only_agent_lines = true;
    let mut lines_seen = Vec::new();
    for line in script.split(|b| *b == b'\n').take(MAX_SCRIPT_LINES) {
        if let [0x01, rest @ ..] = line {
            only_agent_lines = false;
            let event = runner_event(rest, &plan, &checkout);
            run.step(&event);
            continue;
        }
        let text = String::from_utf8_lossy(line);
        if let Some(signal) = classify_stdout_line(&text) {
            if run.step(&Event::AgentSignal {
                signal: signal.clone(),
            }) {
                lines_seen.push(signal);
            }
        }
    }

    // Drive the run to its end the way the daemon would.
    for _ in 0..8 {
        let next = match run.state.phase() {
            Phase::PreparingCheckout => Event::CheckoutFailed {
                error: "fuzz".into(),
            },
            Phase::StartingContainer => Event::ContainerStarted,
            Phase::AgentRunning => Event::ContainerExited { code: exit_code },
            Phase::InspectingHeads => Event::HeadsInspected {
                heads: changed_heads(&checkout),
            },
            Phase::Pushing => Event::PushDone {
                heads: run.state.pushing_heads().unwrap_or_default().to_vec(),
            },
            Phase::Reporting => Event::ReportAccepted,
            Phase::Ended => break,
        };
        run.step(&next);
    }
    assert!(
        run.state.is_terminal(),
        "the run did not end: stuck in {}",
        run.state.describe()
    );
    // Terminal absorbs.
    for event in [
        Event::ReportAccepted,
        Event::ContainerExited { code: Some(0) },
        Event::CancelRequested { force: true },
        Event::RunNoLongerRunning,
    ] {
        match transition(&run.state, &event) {
            Err(Rejected::Terminal { .. }) => {}
            other => panic!("terminal state accepted {event:?}: {other:?}"),
        }
    }

    if only_agent_lines {
        let expected = spec_verdict(coding_agent, exit_code, &lines_seen);
        let got = run.state.verdict().expect("a clean run has a verdict");
        assert_eq!(
            (got.status, got.error.as_str(), got.summary.as_str()),
            (
                expected.status,
                expected.error.as_str(),
                expected.summary.as_str()
            ),
            "verdict differs from spec 6.5 for the agent lines {lines_seen:?}"
        );
    }
    VerdictOutcome {
        terminal: run.state.kind().to_string(),
        status: run.state.verdict().map(|v| v.status),
        rejected: run.rejected,
    }
}

/// The state being folded plus what the invariants need to remember.
struct Fold {
    state: RunState,
    verdict: Option<Verdict>,
    rejected: usize,
}

impl Fold {
    fn new() -> Fold {
        Fold {
            // Replaced by the claim before any check reads it.
            state: RunState::Failed {
                plan: fuzz_plan(true, 0),
                reason: String::new(),
                verdict: None,
            },
            verdict: None,
            rejected: 0,
        }
    }

    /// Applies one event; true when the machine accepted it.
    fn step(&mut self, event: &Event) -> bool {
        let was_terminal = self.state.is_terminal();
        match transition(&self.state, event) {
            Ok((next, effects)) => {
                assert!(
                    !was_terminal,
                    "terminal state {} accepted {event:?}",
                    self.state.describe()
                );
                self.accept(Some(event), next, &effects);
                true
            }
            Err(rejected) => {
                if was_terminal {
                    assert!(
                        matches!(rejected, Rejected::Terminal { .. }),
                        "terminal rejection has the wrong reason: {rejected}"
                    );
                }
                assert!(!rejected.to_string().is_empty());
                self.rejected += 1;
                false
            }
        }
    }

    fn accept(&mut self, event: Option<&Event>, next: RunState, effects: &[crate::fsm::Effect]) {
        let stored: RunState = round_trip(&next, "RunState");
        assert_eq!(stored, next, "state round trip");
        if let Some(decided) = &self.verdict {
            assert_eq!(
                next.verdict(),
                Some(decided),
                "the verdict changed after it was decided (event {event:?})"
            );
        }
        if let Some(v) = next.verdict() {
            self.verdict = Some(v.clone());
        }
        for effect in effects {
            if let crate::fsm::Effect::Report(body) = effect {
                let decided = self
                    .verdict
                    .as_ref()
                    .expect("a report has a decided verdict");
                assert_eq!(
                    body,
                    &decided.to_report(),
                    "a report carries another verdict"
                );
            }
        }
        self.state = next;
    }
}

fn fuzz_plan(coding_agent: bool, repo_count: usize) -> RunPlan {
    RunPlan {
        run_id: 42,
        kind: if coding_agent {
            "coding_agent"
        } else {
            "ci_task"
        }
        .into(),
        image: if coding_agent { "" } else { "ci:1" }.into(),
        repos: (0..repo_count)
            .map(|i| crate::control::wire::RepoSpec {
                workspace_id: 1,
                slug: format!("acme/repo{i}"),
                base_ref: "main".into(),
                continue_branch: String::new(),
            })
            .collect(),
        prompt: "fuzz".into(),
        env: Default::default(),
        instance: "fuzz".into(),
        refused: None,
    }
}

fn fuzz_checkout(plan: &RunPlan) -> Checkout {
    Checkout {
        root: "/cache/.workspaces/run-42".into(),
        repos: plan
            .repos
            .iter()
            .map(|r| CheckoutRepo {
                slug: r.slug.clone(),
                path: format!("/cache/{}", r.slug),
                branch: plan.branch_for(r),
                base_commit: "a".repeat(40),
            })
            .collect(),
    }
}

fn changed_heads(checkout: &Checkout) -> Vec<RepoHead> {
    checkout
        .repos
        .iter()
        .map(|r| RepoHead {
            slug: r.slug.clone(),
            head: "b".repeat(40),
        })
        .collect()
}

/// A runner-side event picked by the bytes after the 0x01 marker.
fn runner_event(bytes: &[u8], plan: &RunPlan, checkout: &Checkout) -> Event {
    let pick = bytes.first().copied().unwrap_or(0);
    let arg = bytes.get(1).copied().unwrap_or(0);
    match pick % 22 {
        0 => Event::CancelRequested {
            force: arg & 1 == 1,
        },
        1 => Event::DrainDeadlinePassed,
        2 => Event::RunTimeoutPassed,
        3 => Event::StreamDegraded,
        4 => Event::ContainerExited {
            code: (arg != 255).then_some(i32::from(arg as i8)),
        },
        5 => Event::ContainerVanished,
        6 => Event::HeadsInspected {
            heads: if arg & 1 == 1 {
                changed_heads(checkout)
            } else {
                Vec::new()
            },
        },
        7 => Event::PushDone {
            heads: changed_heads(checkout),
        },
        8 => Event::PushSkipped,
        9 => Event::PushFailed {
            error: "remote rejected".into(),
        },
        10 => Event::ReportAccepted,
        11 => Event::ReportRejected409,
        12 => Event::ReportFailed {
            error: "503".into(),
            retryable: arg & 1 == 1,
        },
        13 => Event::RunNoLongerRunning,
        14 => Event::ContainerStarted,
        15 => Event::ContainerStarting,
        16 => Event::PrepareStarted,
        17 => Event::CheckoutReady {
            checkout: checkout.clone(),
        },
        18 => Event::CheckoutFailed {
            error: "clone failed".into(),
        },
        19 => Event::ContainerStartFailed {
            error: "no image".into(),
        },
        20 => Event::Claimed { plan: plan.clone() },
        _ => Event::AgentSignal {
            signal: AgentSignal::SessionIdle,
        },
    }
}

/// Spec 6.5 (coding agents) and 5.4 (other kinds), evaluated straight from the agent lines
/// that were folded in, for runs nothing else interfered with. The push adds nothing to the
/// status, error or summary of such a run.
fn spec_verdict(coding_agent: bool, code: Option<i32>, signals: &[AgentSignal]) -> Verdict {
    let code_text = code.unwrap_or(-1);
    if !coding_agent {
        return match code {
            Some(0) => Verdict::succeeded(""),
            _ => Verdict::failed(format!(
                "docker run exited with code {code_text}: see the run's stderr events"
            )),
        };
    }
    let mut facts = AgentFacts::default();
    for signal in signals {
        facts.saw_contract_event = true;
        match signal {
            AgentSignal::Finish { outcome, summary } => {
                facts.finish = Some(crate::fsm::Finish {
                    outcome: outcome.clone(),
                    summary: summary.clone(),
                })
            }
            AgentSignal::Error { message } => facts.last_error = Some(message.clone()),
            AgentSignal::Event { event_type } => facts.started |= event_type == "starting",
            AgentSignal::SessionIdle => {}
        }
    }
    // windshift-agent's configuration error (spec 6.3); the wording is the verdict module's.
    if code == Some(2) && !facts.started {
        return Verdict::failed(crate::fsm::verdict::agent_config_error(
            &fuzz_plan(true, 0),
            facts.last_error.as_deref(),
        ));
    }
    if code != Some(0) {
        let detail = match &facts.last_error {
            Some(m) => format!("last agent error: {m}"),
            None => "see the run's stderr events".into(),
        };
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
    match (&facts.finish, &facts.last_error) {
        (Some(f), _) if f.outcome == "blocked" => {
            Verdict::failed(format!("agent blocked: {}", f.summary))
        }
        (Some(f), _) => Verdict::succeeded(f.summary.clone()),
        (None, Some(m)) => Verdict::failed(format!("agent error: {m}")),
        (None, None) => Verdict::succeeded(""),
    }
}

// ---------------------------------------------------------------------------------------------
// triage_args: windshift-triage's Go-flag parsing plus branch/slug/URL/path validation.

/// What [`triage_args`] made of its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriageOutcome {
    /// `prepare` flags parsed; `valid` when the inputs passed validation.
    Prepare {
        valid: bool,
    },
    Push {
        valid: bool,
    },
    Help,
    FlagError,
    BadSubcommand,
}

/// The input is a `windshift-triage` command line: NUL-separated arguments. Checks: parsing
/// never panics; parsed flags hold every defined flag with a value of its kind; errors name
/// what was wrong; whatever the validators accept keeps git's ref rules and the slug rules,
/// stays inside the cache root, and carries no credentials. Every argument is also run
/// through each validator on its own.
pub fn triage_args(data: &[u8]) -> TriageOutcome {
    let args: Vec<String> = data
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    for arg in &args {
        check_validators(arg);
    }
    match parse_command(&args) {
        TriageCommand::Prepare(flags) => {
            check_flags(&flags, PREPARE_FLAGS);
            TriageOutcome::Prepare {
                valid: check_prepare(&flags),
            }
        }
        TriageCommand::Push(flags) => {
            check_flags(&flags, PUSH_FLAGS);
            TriageOutcome::Push {
                valid: check_push(&flags),
            }
        }
        TriageCommand::Help(usage) => {
            assert!(usage.starts_with("Usage of windshift-triage "));
            TriageOutcome::Help
        }
        TriageCommand::FlagError { message, usage } => {
            assert!(!message.is_empty() && usage.starts_with("Usage of windshift-triage "));
            TriageOutcome::FlagError
        }
        TriageCommand::BadSubcommand(message) => {
            assert!(message.contains("usage: windshift-triage"));
            TriageOutcome::BadSubcommand
        }
    }
}

fn check_flags(flags: &Flags, defs: &[crate::triage_cli::FlagDef]) {
    for def in defs {
        let value = flags.str(def.name);
        match def.kind {
            Kind::Int => assert!(
                value.parse::<i64>().is_ok(),
                "int flag -{} holds {value:?}",
                def.name
            ),
            Kind::Bool => assert!(
                value == "true" || value == "false",
                "bool flag -{} holds {value:?}",
                def.name
            ),
            Kind::Str => {}
        }
    }
}

fn policy_of(flags: &Flags) -> TransportPolicy {
    TransportPolicy {
        allow_file_url: flags.bool("allow-file-url"),
        allow_insecure_http: false,
    }
}

fn check_prepare(flags: &Flags) -> bool {
    let input = PrepareInputs {
        root: flags.str("root"),
        workspace_id: flags.int("workspace-id"),
        slug: flags.str("repo"),
        remote_url: flags.str("remote-url"),
        base_ref: flags.str("base-ref"),
        continue_branch: flags.str("continue-branch"),
        dest_dir: flags.str("dest-dir"),
        run_id: flags.int("run-id"),
        policy: policy_of(flags),
    };
    match validate_prepare_inputs(&input) {
        Ok(v) => {
            assert!(git_ref_rules_hold(&v.fetch_branch), "{:?}", v.fetch_branch);
            assert!(git_ref_rules_hold(&v.work_branch), "{:?}", v.work_branch);
            assert!(slug_rules_hold(&format!("{}/{}", v.owner, v.repo)));
            assert!(v.workspace_id > 0 && input.run_id > 0);
            assert!(
                v.checkout.starts_with(&v.root) && v.checkout != v.root,
                "checkout {} escapes the cache root {}",
                v.checkout.display(),
                v.root.display()
            );
            assert!(!v
                .checkout
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir)));
            true
        }
        Err(e) => {
            assert!(e.field.starts_with("--") && !e.problem.is_empty(), "{e}");
            false
        }
    }
}

fn check_push(flags: &Flags) -> bool {
    let branch = flags.str("branch");
    let remote = flags.str("remote-url");
    let ok_branch = validate_branch_name("--branch", branch).is_ok();
    let ok_remote = validate_remote_url("--remote-url", remote, policy_of(flags)).is_ok();
    let skip = flags.str("skip-if-head");
    let ok_skip = skip.is_empty() || validate_commit_id("--skip-if-head", skip).is_ok();
    ok_branch && ok_remote && ok_skip
}

fn check_validators(arg: &str) {
    if let Ok((owner, repo)) = validate_slug(arg) {
        assert_eq!(format!("{owner}/{repo}"), arg, "slug split loses text");
        assert!(
            slug_rules_hold(arg),
            "slug {arg:?} accepted against the rules"
        );
    }
    match validate_branch_name("--branch", arg) {
        Ok(()) => assert!(git_ref_rules_hold(arg), "branch {arg:?} accepted"),
        Err(e) => assert!(!e.problem.is_empty()),
    }
    if validate_commit_id("--skip-if-head", arg).is_ok() {
        assert!(arg.len() == 40 || arg.len() == 64);
    }
    for policy in [
        TransportPolicy::default(),
        TransportPolicy {
            allow_file_url: true,
            allow_insecure_http: true,
        },
    ] {
        match validate_remote_url("--remote-url", arg, policy) {
            Ok(RemoteScheme::Https | RemoteScheme::Http) => {
                let lower = arg.to_ascii_lowercase();
                let rest = lower
                    .strip_prefix("https://")
                    .or_else(|| lower.strip_prefix("http://"))
                    .expect("an http(s) scheme");
                let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
                assert!(!host.is_empty() && !host.contains('@'), "{arg:?}");
                assert!(!arg.chars().any(char::is_whitespace));
            }
            Ok(RemoteScheme::File) => assert!(policy.allow_file_url),
            Err(e) => assert!(!e.problem.is_empty()),
        }
    }
    let path = std::path::Path::new(arg);
    if validate_abs_path("--root", path).is_ok() {
        assert!(path.is_absolute() && path.parent().is_some());
        assert!(!path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir)));
    }
    if let Ok(id) = arg.parse::<i64>() {
        let branch = run_branch(id);
        assert!(
            validate_branch_name("--branch", &branch).is_ok(),
            "run branch {branch:?} is refused"
        );
    }
}

/// `git check-ref-format --branch`'s rules (an independent statement of them, plus the
/// spec's no-leading-'-' rule), used to check what `validate_branch_name` accepts.
fn git_ref_rules_hold(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.ends_with('.')
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("@{")
        && name != "@"
        && name != "HEAD"
        && !name
            .bytes()
            .any(|b| b < 0x20 || b == 0x7f || b" ~^:?*[\\".contains(&b))
        && name
            .split('/')
            .all(|c| !c.starts_with('.') && !c.ends_with(".lock"))
}

fn slug_rules_hold(slug: &str) -> bool {
    let parts: Vec<&str> = slug.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && !p.starts_with('-')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

// ---------------------------------------------------------------------------------------------
// go_duration: config::parse_go_duration.

/// Parses the input as a Go duration. Checks: no panic; an accepted duration fits Go's int64
/// nanoseconds; it re-parses from its own canonical spelling and from nanoseconds; a leading
/// `+` changes nothing and a leading `-` is refused unless the value is zero.
pub fn go_duration(data: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(data).ok()?;
    let parsed = parse_go_duration(text);
    // Go's sign rule: `-x` is x negated, so it is valid exactly when x is, and only a zero
    // survives our refusal of negative values.
    // (Only for one bare sign: `- 5s` and `-+5s` are malformed in Go, while the unsigned
    // rest would parse after trimming or as its own sign.)
    let signed_rest = text
        .trim()
        .strip_prefix('-')
        .filter(|rest| !rest.starts_with(|c: char| c.is_whitespace() || c == '+' || c == '-'));
    if let Some(rest) = signed_rest {
        match parse_go_duration(rest) {
            Ok(d) if d.is_zero() => assert_eq!(parsed, Ok(Duration::ZERO), "{text:?}"),
            Ok(_) => assert_eq!(parsed, Err(DurationError::Negative), "{text:?}"),
            Err(_) => assert!(parsed.is_err(), "{text:?} accepted, {rest:?} is not"),
        }
    }
    let Ok(d) = parsed else {
        return None;
    };
    assert!(
        d.as_nanos() <= i64::MAX as u128,
        "{text:?} exceeds int64 ns"
    );
    assert_eq!(parse_go_duration(&format!("{}ns", d.as_nanos())), Ok(d));
    assert_eq!(parse_go_duration(&canonical(d)), Ok(d), "{}", canonical(d));
    let trimmed = text.trim();
    if !trimmed.starts_with(['+', '-']) {
        assert_eq!(parse_go_duration(&format!("+{trimmed}")), Ok(d));
        let negated = parse_go_duration(&format!("-{trimmed}"));
        if d.is_zero() {
            assert_eq!(negated, Ok(Duration::ZERO));
        } else {
            assert!(negated.is_err(), "-{trimmed} accepted");
        }
    }
    Some(d)
}

/// `1h2m3.000000004s`-style spelling of a duration.
fn canonical(d: Duration) -> String {
    let secs = d.as_secs();
    format!(
        "{}h{}m{}.{:09}s",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        d.subsec_nanos()
    )
}
