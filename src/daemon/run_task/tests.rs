//! The real run task, claim to report, over stand-ins for the world: `MemEngine`,
//! `MemJournal`, a recording control plane, a git that moves the branch, and a stub events
//! endpoint. What it proves is the run loop's routing through the seams; the real engine,
//! git and server are proved by the daemon_* integration tests.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{RunTask, Start};
use crate::config::RunnerConfig;
use crate::control::client::{AuthState, Client, ClientConfig};
use crate::control::events::{EventSender, EventSenderConfig};
use crate::control::plane::{CallFuture, ControlPlane};
use crate::control::wire::{HeartbeatResponse, JobSpec, RepoSpec, ReportRequest};
use crate::daemon::liveness::HeartbeatPolicy;
use crate::daemon::{ctl, Ctx, Shutdown};
use crate::effects::clock::SystemClock;
use crate::effects::container::container_name;
use crate::effects::git::{
    GitError, GitOps, PrepareOutput, PreparedRepo, PushOutcome, PushRequest, RunWorkspace,
    RunWorkspaceRequest, TransportPolicy,
};
use crate::effects::mem_engine::{AgentScript, MemEngine};
use crate::fsm::{Event, RunPlan};
use crate::journal::{commit_event_async, now_ms, Journal, MemJournal};
use crate::metrics::Metrics;

const BASE: &str = "1111111111111111111111111111111111111111";
const HEAD: &str = "2222222222222222222222222222222222222222";

/// Records the reports; claims nothing.
#[derive(Default)]
struct RecordingControl {
    reports: Mutex<Vec<(i64, ReportRequest)>>,
}

impl ControlPlane for RecordingControl {
    fn claim(&self) -> CallFuture<'_, Option<JobSpec>> {
        Box::pin(async { Ok(None) })
    }

    fn heartbeat(&self) -> CallFuture<'_, HeartbeatResponse> {
        Box::pin(async { Ok(HeartbeatResponse::default()) })
    }

    fn report<'a>(&'a self, run_id: i64, report: &'a ReportRequest) -> CallFuture<'a, ()> {
        self.reports.lock().unwrap().push((run_id, report.clone()));
        Box::pin(async { Ok(()) })
    }

    fn auth_state(&self) -> AuthState {
        AuthState::default()
    }

    fn lost_claim_answers(&self) -> u64 {
        0
    }
}

/// A checkout directory per run whose branch moved from `BASE` to `HEAD`; pushes recorded.
struct MovedBranchGit {
    root: std::path::PathBuf,
    pushes: Mutex<Vec<String>>,
}

impl GitOps for MovedBranchGit {
    fn prepare_run_workspace(&self, req: &RunWorkspaceRequest) -> Result<RunWorkspace, GitError> {
        let checkout = self.root.join(format!("run-{}", req.run_id));
        std::fs::create_dir_all(&checkout).expect("checkout dir");
        Ok(RunWorkspace {
            mount_path: checkout.clone(),
            multi_repo: false,
            repos: vec![PreparedRepo {
                slug: "acme/app".into(),
                remote_url: "http://127.0.0.1:9/git/acme/app.git".into(),
                output: PrepareOutput {
                    checkout_path: checkout,
                    branch: crate::effects::git::validate::run_branch(req.run_id),
                    base_commit: BASE.into(),
                },
            }],
        })
    }

    fn branch_head(&self, _checkout: &Path, _branch: &str) -> Result<String, GitError> {
        Ok(HEAD.into())
    }

    fn push(&self, req: &PushRequest) -> Result<PushOutcome, GitError> {
        self.pushes.lock().unwrap().push(req.branch.clone());
        Ok(PushOutcome {
            head_sha: HEAD.into(),
            skipped: false,
            already_on_remote: false,
        })
    }
}

#[tokio::test]
async fn a_coding_run_goes_from_claim_to_report_over_the_stand_ins() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = crate::effects::session::tests::events_server().await;
    let cfg = RunnerConfig {
        api_url: Some(server.url.clone()),
        allow_insecure: Some("1".into()),
        cache_root: Some(root.path().join("cache")),
        ..RunnerConfig::default()
    }
    .validate(Some("host"))
    .expect("config");
    let mut client_cfg = ClientConfig::new(server.url.clone());
    client_cfg.allow_insecure = true;
    let client = Client::new(client_cfg).expect("client");
    client.set_credential("wsrc_run_task_test");
    let engine = MemEngine::new("host");
    engine.script_run(41, AgentScript::finishing("completed", "fixed it"));
    let control = Arc::new(RecordingControl::default());
    let git = Arc::new(MovedBranchGit {
        root: root.path().join("checkouts"),
        pushes: Mutex::new(Vec::new()),
    });
    let journal: Arc<dyn Journal> = Arc::new(MemJournal::new());
    let containers_dir = root.path().join("containers");
    crate::effects::session::create_private_dir(&containers_dir).expect("dir");
    let ctl_dir = root.path().join("ctl");
    std::fs::create_dir_all(&ctl_dir).expect("ctl dir");
    let ctx = Arc::new(Ctx {
        heartbeat: HeartbeatPolicy::new(cfg.heartbeat_interval),
        pause: ctl::Pause::load(&ctl_dir).expect("pause"),
        cfg,
        control: control.clone(),
        git: git.clone(),
        clock: Arc::new(SystemClock),
        events: EventSender::new(client.clone(), EventSenderConfig::default()),
        client,
        journal: journal.clone(),
        engine: Arc::new(engine.clone()),
        metrics: Arc::new(Metrics::default()),
        shutdown: Shutdown::default(),
        grace: Duration::from_secs(3),
        report_retry_pause: Duration::from_millis(100),
        git_policy: TransportPolicy {
            allow_insecure_http: true,
            ..TransportPolicy::default()
        },
        containers_dir: containers_dir.clone(),
    });

    let job = JobSpec {
        run_id: 41,
        initial_prompt: "fix the bug".into(),
        env: [("WS_TOKEN".to_owned(), "run-token-41".to_owned())].into(),
        repos: vec![RepoSpec {
            workspace_id: 1,
            slug: "acme/app".into(),
            ..RepoSpec::default()
        }],
        ..JobSpec::default()
    };
    let (plan, secrets) = RunPlan::from_job(&job, "host");
    let claimed = commit_event_async(
        journal.clone(),
        None,
        Event::Claimed { plan },
        now_ms(),
        Some(secrets.clone()),
    )
    .await
    .expect("claimed");
    let record = claimed.record.expect("record");
    let (_stop_tx, stop_rx) = mpsc::unbounded_channel();
    let task = RunTask::new(ctx, &record, record.clone(), secrets, stop_rx);
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        task.drive(Start::Effects(claimed.effects)),
    )
    .await
    .expect("the run ends");

    let reports = control.reports.lock().unwrap().clone();
    assert_eq!(status.as_deref(), Some("succeeded"), "{reports:?}");
    assert_eq!(reports.len(), 1, "one verdict: {reports:?}");
    let (run_id, report) = &reports[0];
    assert_eq!(*run_id, 41);
    assert_eq!(report.status, "succeeded");
    assert_eq!(report.summary, "fixed it", "the agent's finish line");
    assert_eq!(report.base_commit, BASE);
    assert_eq!(
        *git.pushes.lock().unwrap(),
        std::slice::from_ref(&report.branch)
    );
    let name = container_name("host", 41, 1);
    assert_eq!(
        engine.prompts_sent(&name),
        1,
        "{:?}",
        engine.stdin_lines(&name)
    );
    assert_eq!(engine.removed(), std::slice::from_ref(&name));
    assert!(engine.containers().is_empty());
    assert!(!containers_dir.join(&name).exists());
    // The agent's three lines reached the server, in order.
    let bodies = server.bodies.lock().unwrap().clone();
    let agent_lines: Vec<&String> = bodies
        .iter()
        .filter(|b| {
            ["starting", "finish", "session_idle"]
                .iter()
                .any(|t| b.contains(&format!(r#"\"type\":\"{t}\""#)))
        })
        .collect();
    assert_eq!(agent_lines.len(), 3, "{bodies:#?}");
    assert!(
        agent_lines[0].contains("starting") && agent_lines[1].contains("fixed it"),
        "{bodies:#?}"
    );
    assert!(
        journal.active().expect("active").is_empty(),
        "the run is terminal"
    );
}
