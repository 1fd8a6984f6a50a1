//! Git's network steps across transient failures of the devserver's git proxy (F7 in
//! docs/RELIABILITY.md): a push and a prepare retry through a fault window that the test
//! closes once it has seen an attempt fail, and permanent errors fail at once. Real git, a real
//! devserver, real faults on the git routes only.

#[path = "control_support/mod.rs"]
mod common;
mod git_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use git_support::{commit_file, git};
use windshift_devserver::types::{CreateRepo, EnqueueRepo, EnqueueRun, Faults};
use windshift_devserver::RunningDevServer;
use windshift_runner::effects::git::{
    git_proxy_url, prepare, push, GitError, GitRetry, PrepareOutput, PrepareRequest, PushRequest,
    RetryPolicy, TransportPolicy,
};

const DEV: TransportPolicy = TransportPolicy {
    allow_file_url: false,
    allow_insecure_http: true,
};
const SLUG: &str = "acme/widget";
/// Faults on this prefix hit git only; the control-plane calls of the test pass.
const GIT_ROUTES: &str = "/api/git-proxy/";

/// Short waits, long budget: only the test's clearing of the faults ends a retry loop, never
/// the budget running out.
fn quick_retry() -> GitRetry {
    GitRetry::new(RetryPolicy::new(
        Duration::from_millis(20),
        Duration::from_millis(200),
        Duration::from_secs(120),
    ))
}

/// A devserver with `acme/widget` (and `acme/other`, not granted) and a claimed run on it.
struct Fixture {
    ts: TestServer,
    /// The seed repository the devserver's bare repo was made from.
    src: PathBuf,
    run_id: i64,
    token: String,
    remote: String,
    cache: PathBuf,
}

impl Fixture {
    async fn start() -> Self {
        let ts = TestServer::start().await;
        let src = ts.dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        git(&src, &["init", "--quiet", "-b", "main"]);
        commit_file(&src, "README", "hello\n");
        let core = ts.server.core().clone();
        for slug in [SLUG, "acme/other"] {
            core.create_repo(&CreateRepo {
                slug: slug.into(),
                path: src.display().to_string(),
            })
            .await
            .unwrap();
        }
        let (client, pool, _) = ts.registered().await;
        let run_id = core
            .enqueue(&EnqueueRun {
                pool_id: pool,
                prompt: "p".into(),
                repos: vec![EnqueueRepo {
                    slug: SLUG.into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .unwrap()
            .id;
        let job = client.claim().await.unwrap().expect("a job");
        assert_eq!(job.run_id, run_id);
        let token = job.run_token().expect("run token").to_string();
        let remote = git_proxy_url(&ts.api_url(), job.repos[0].workspace_id, "acme", "widget");
        let cache = ts.dir.path().join("cache");
        Self {
            ts,
            src,
            run_id,
            token,
            remote,
            cache,
        }
    }

    fn server(&self) -> &RunningDevServer {
        &self.ts.server
    }

    fn prepare_request(&self, retry: GitRetry) -> PrepareRequest {
        PrepareRequest {
            root: self.cache.to_string_lossy().into_owned(),
            workspace_id: 1,
            slug: SLUG.into(),
            remote_url: self.remote.clone(),
            run_id: self.run_id,
            token: self.token.clone(),
            policy: DEV,
            retry,
            ..PrepareRequest::default()
        }
    }

    fn push_request(&self, out: &PrepareOutput, retry: GitRetry) -> PushRequest {
        PushRequest {
            checkout: out.checkout_path.clone(),
            branch: out.branch.clone(),
            remote_url: self.remote.clone(),
            token: self.token.clone(),
            skip_if_head: out.base_commit.clone(),
            policy: DEV,
            retry,
            cache_objects: None,
        }
    }

    fn set_faults(&self, faults: Faults) {
        *self.server().core().faults.lock().unwrap() = faults;
    }

    fn faults_injected(&self) -> u64 {
        self.server().core().faults_injected.load(Ordering::Relaxed)
    }

    fn pushes_served(&self) -> u64 {
        self.server().core().pushes_served.load(Ordering::Relaxed)
    }

    /// The commit the devserver's bare repo has at `reference`.
    fn served_sha(&self, reference: &str) -> Option<String> {
        let bare = self.ts.dir.path().join("devserver/repos/acme/widget.git");
        let out = std::process::Command::new("git")
            .args(["-c", "safe.directory=*", "--git-dir"])
            .arg(&bare)
            .args(["rev-parse", "--verify", "--quiet", reference])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Moves `main` on the served repo forward (what another developer's push would do).
    fn advance_main(&self) -> String {
        let sha = commit_file(&self.src, "NEWS", "more\n");
        let bare = self.ts.dir.path().join("devserver/repos/acme/widget.git");
        git(
            &self.src,
            &["push", "--quiet", bare.to_str().unwrap(), "main:main"],
        );
        sha
    }
}

fn agent_commit(checkout: &Path, file: &str) -> String {
    git(checkout, &["config", "user.name", "agent"]);
    git(checkout, &["config", "user.email", "agent@example.invalid"]);
    commit_file(checkout, file, "agent work\n")
}

fn git_5xx() -> Faults {
    Faults {
        error_5xx_probability: 1.0,
        only_path_prefix: Some(GIT_ROUTES.into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_can_target_only_the_git_proxy_routes() {
    let fx = Fixture::start().await;
    fx.set_faults(git_5xx());
    let http = reqwest::Client::new();
    let git_answer = http
        .get(format!("{}/info/refs?service=git-upload-pack", fx.remote))
        .bearer_auth(&fx.token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        git_answer.status().as_u16(),
        500,
        "the git route is faulted"
    );
    let version = http
        .get(format!("{}/version", fx.ts.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(version.status().as_u16(), 200, "other routes pass");
    assert_eq!(fx.faults_injected(), 1);

    fx.set_faults(Faults {
        only_path_prefix: Some("/api/version".into()),
        ..git_5xx()
    });
    let version = http
        .get(format!("{}/version", fx.ts.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(version.status().as_u16(), 500);
    let git_answer = http
        .get(format!("{}/info/refs?service=git-upload-pack", fx.remote))
        .bearer_auth(&fx.token)
        .send()
        .await
        .unwrap();
    assert_eq!(git_answer.status().as_u16(), 200);
    fx.ts.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_retries_through_a_5xx_window_and_lands_exactly_once() {
    let fx = Fixture::start().await;
    let out = prepare(&fx.prepare_request(GitRetry::none())).expect("prepare");
    let commit = agent_commit(&out.checkout_path, "feature.txt");

    fx.set_faults(git_5xx());
    let retry = quick_retry();
    let req = fx.push_request(&out, retry.clone());
    let pushing = tokio::task::spawn_blocking(move || push(&req));
    // Deterministic: the window closes only after the server refused an attempt and the
    // runner decided to try again.
    wait_until("a failed push attempt", Duration::from_secs(60), || {
        retry.retries() >= 1 && fx.faults_injected() >= 1
    })
    .await;
    assert_eq!(fx.pushes_served(), 0, "nothing reached git while faulted");
    fx.set_faults(Faults::default());

    let pushed = pushing
        .await
        .unwrap()
        .expect("the push succeeds once the window ends");
    assert_eq!(pushed.head_sha, commit);
    assert!(!pushed.skipped);
    let branch = format!("refs/heads/agent-runs/run-{}", fx.run_id);
    assert_eq!(fx.served_sha(&branch).as_deref(), Some(commit.as_str()));
    assert_eq!(fx.pushes_served(), 1, "exactly one push reached the repo");
    assert_eq!(
        fx.served_sha("refs/heads/main"),
        Some(out.base_commit.clone()),
        "nothing else moved"
    );

    // Faults on the push itself only (the receive-pack POST): the first attempt's ls-remote
    // passes, its push gets a 500, and the retry finds the branch where it must be or pushes.
    let second = agent_commit(&out.checkout_path, "more.txt");
    fx.set_faults(Faults {
        only_path_prefix: Some("/api/git-proxy/1/acme/widget/git-receive-pack".into()),
        ..git_5xx()
    });
    let injected_before = fx.faults_injected();
    let retry = quick_retry();
    let req = fx.push_request(&out, retry.clone());
    let pushing = tokio::task::spawn_blocking(move || push(&req));
    wait_until("a refused receive-pack", Duration::from_secs(60), || {
        retry.retries() >= 1 && fx.faults_injected() > injected_before
    })
    .await;
    fx.set_faults(Faults::default());
    let pushed = pushing.await.unwrap().expect("second push");
    assert_eq!(pushed.head_sha, second);
    assert_eq!(fx.served_sha(&branch).as_deref(), Some(second.as_str()));
    assert_eq!(fx.pushes_served(), 2);
    fx.ts.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_retries_the_cache_clone_and_fetch_through_fault_windows() {
    let fx = Fixture::start().await;

    // Cold cache: the bare clone meets dropped connections ("Empty reply from server").
    fx.set_faults(Faults {
        drop_connection_probability: 1.0,
        only_path_prefix: Some(GIT_ROUTES.into()),
        ..Default::default()
    });
    let retry = quick_retry();
    let req = fx.prepare_request(retry.clone());
    let preparing = tokio::task::spawn_blocking(move || prepare(&req));
    wait_until("a failed clone attempt", Duration::from_secs(60), || {
        retry.retries() >= 1 && fx.faults_injected() >= 1
    })
    .await;
    fx.set_faults(Faults::default());
    let first = preparing.await.unwrap().expect("cold prepare");
    assert_eq!(
        fx.served_sha("refs/heads/main").as_deref(),
        Some(first.base_commit.as_str())
    );

    // Warm cache: main moved on, and the fetch meets an outage (503) first.
    let new_main = fx.advance_main();
    fx.set_faults(Faults {
        outage_until_ms: Some(windshift_devserver::core::now_ms() + 3_600_000),
        only_path_prefix: Some(GIT_ROUTES.into()),
        ..Default::default()
    });
    let injected_before = fx.faults_injected();
    let retry = quick_retry();
    let req = fx.prepare_request(retry.clone());
    let preparing = tokio::task::spawn_blocking(move || prepare(&req));
    wait_until("a failed fetch attempt", Duration::from_secs(60), || {
        retry.retries() >= 1 && fx.faults_injected() > injected_before
    })
    .await;
    fx.set_faults(Faults::default());
    let second = preparing.await.unwrap().expect("warm prepare");
    assert_eq!(
        second.base_commit, new_main,
        "the retried fetch got the new main"
    );
    assert_eq!(git(&second.checkout_path, &["rev-parse", "HEAD"]), new_main);
    fx.ts.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_git_errors_fail_at_once_without_a_retry() {
    let fx = Fixture::start().await;
    let out = prepare(&fx.prepare_request(GitRetry::none())).expect("prepare");
    agent_commit(&out.checkout_path, "feature.txt");

    // 403: the run has no grant for acme/other.
    let retry = quick_retry();
    let other = git_proxy_url(&fx.ts.api_url(), 1, "acme", "other");
    let req = PushRequest {
        remote_url: other,
        ..fx.push_request(&out, retry.clone())
    };
    let err = tokio::task::spawn_blocking(move || push(&req))
        .await
        .unwrap()
        .expect_err("no grant");
    assert!(matches!(err, GitError::AuthFailed { .. }), "{err}");
    assert!(!err.is_transient());
    assert_eq!(retry.retries(), 0, "{err}");

    // 401: a wrong token.
    let retry = quick_retry();
    let req = PrepareRequest {
        token: "not-the-run-token".into(),
        ..fx.prepare_request(retry.clone())
    };
    let err = tokio::task::spawn_blocking(move || prepare(&req))
        .await
        .unwrap()
        .expect_err("bad token");
    assert!(matches!(err, GitError::AuthFailed { .. }), "{err}");
    assert_eq!(retry.retries(), 0, "{err}");

    // A branch the remote does not have.
    let retry = quick_retry();
    let req = PrepareRequest {
        base_ref: "no-such-branch".into(),
        ..fx.prepare_request(retry.clone())
    };
    let err = tokio::task::spawn_blocking(move || prepare(&req))
        .await
        .unwrap()
        .expect_err("missing branch");
    assert!(matches!(err, GitError::RemoteBranchMissing { .. }), "{err}");
    assert_eq!(retry.retries(), 0, "{err}");

    // 404: a path the proxy does not serve ("repository … not found" to git).
    let retry = quick_retry();
    let missing = format!("{}/nothing-here", fx.remote);
    let req = PushRequest {
        remote_url: missing,
        ..fx.push_request(&out, retry.clone())
    };
    let err = tokio::task::spawn_blocking(move || push(&req))
        .await
        .unwrap()
        .expect_err("not found");
    assert!(!err.is_transient(), "{err}");
    assert_eq!(retry.retries(), 0, "{err}");

    assert_eq!(fx.faults_injected(), 0);
    assert_eq!(fx.pushes_served(), 0);
    fx.ts.server.stop().await;
}
