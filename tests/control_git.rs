//! The devserver's git proxy with real git: clone with the run token, push to the granted ref,
//! refusal of any other ref, and a finalized run's token no longer working.

#[path = "control_support/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use common::*;
use windshift_devserver::types::{CreateRepo, EnqueueRepo, EnqueueRun};
use windshift_runner::control::wire::{ReportRequest, STATUS_SUCCEEDED};

fn git(dir: &Path, args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com");
    if let Some(t) = token {
        // The token goes in a header through env config, never in argv or the URL.
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{t}"));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {basic}"),
            );
    }
    cmd.output().expect("git runs")
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "git failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn seed_repo(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    ok(git(&src, &["init", "-q", "-b", "main"], None));
    std::fs::write(src.join("README"), "hello\n").unwrap();
    ok(git(&src, &["add", "."], None));
    ok(git(&src, &["commit", "-q", "-m", "init"], None));
    src
}

// Multi-threaded: the test runs blocking git commands while the in-process server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_push_granted_ref_refuse_others_and_token_dies_with_the_run() {
    let ts = TestServer::start().await;
    let src = seed_repo(ts.dir.path());
    let core = ts.server.core().clone();
    core.create_repo(&CreateRepo {
        slug: "acme/widget".into(),
        path: src.display().to_string(),
    })
    .await
    .unwrap();
    core.create_repo(&CreateRepo {
        slug: "acme/other".into(),
        path: src.display().to_string(),
    })
    .await
    .unwrap();
    let (c, pool, _) = ts.registered().await;
    let run = core
        .enqueue(&EnqueueRun {
            pool_id: pool,
            prompt: "p".into(),
            repos: vec![EnqueueRepo {
                slug: "acme/widget".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap()
        .id;
    let job = c.claim().await.unwrap().unwrap();
    assert_eq!(job.run_id, run);
    let repo = &job.repos[0];
    assert_eq!(
        (
            repo.slug.as_str(),
            repo.base_ref.as_str(),
            repo.workspace_id
        ),
        ("acme/widget", "main", 1)
    );
    assert_eq!(
        job.repo.as_ref(),
        Some(repo),
        "deprecated repo mirrors repos[0]"
    );
    let token = job.run_token().unwrap().to_string();
    let url = format!(
        "{}/git-proxy/{}/acme/widget.git",
        ts.api_url(),
        repo.workspace_id
    );
    let work = ts.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // No credentials: 401 with the Basic challenge.
    let resp = reqwest::get(format!("{url}/info/refs?service=git-upload-pack"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Basic realm=\"windshift-git-proxy\""
    );
    // Only three tails exist.
    let resp = reqwest::Client::new()
        .get(format!("{url}/HEAD"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    // A repo the run has no grant for: 403.
    let other = format!(
        "{}/git-proxy/1/acme/other/info/refs?service=git-upload-pack",
        ts.api_url()
    );
    let resp = reqwest::Client::new()
        .get(other)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);

    // Clone with the token.
    ok(git(&work, &["clone", "-q", &url, "clone"], Some(&token)));
    let clone = work.join("clone");
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "hello\n"
    );
    std::fs::write(clone.join("CHANGE"), "x\n").unwrap();
    ok(git(&clone, &["add", "."], None));
    ok(git(&clone, &["commit", "-q", "-m", "change"], None));
    let head = ok(git(&clone, &["rev-parse", "HEAD"], None));

    // Push to the granted ref works.
    let granted = format!("HEAD:refs/heads/agent-runs/run-{run}");
    ok(git(&clone, &["push", "-q", &url, &granted], Some(&token)));
    let bare = ts.dir.path().join("devserver/repos/acme/widget.git");
    assert_eq!(
        ok(git(
            &bare,
            &["rev-parse", &format!("refs/heads/agent-runs/run-{run}")],
            None
        )),
        head
    );
    // Push to any other ref is refused, and main is unchanged.
    let main_before = ok(git(&bare, &["rev-parse", "refs/heads/main"], None));
    let out = git(
        &clone,
        &["push", "-q", &url, "HEAD:refs/heads/main"],
        Some(&token),
    );
    assert!(!out.status.success(), "push to main must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ok(git(&bare, &["rev-parse", "refs/heads/main"], None)),
        main_before
    );

    // Finalize: the token stops working.
    c.report(
        run,
        &ReportRequest {
            status: STATUS_SUCCEEDED.into(),
            branch: format!("agent-runs/run-{run}"),
            base_commit: main_before.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let out = git(&work, &["clone", "-q", &url, "after"], Some(&token));
    assert!(!out.status.success(), "clone after finalize must fail");
    let resp = reqwest::Client::new()
        .get(format!("{url}/info/refs?service=git-upload-pack"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let view = core.run(run).unwrap();
    assert_eq!(
        (view.branch, view.base_commit),
        (format!("agent-runs/run-{run}"), main_before)
    );
    drop(core);
    ts.server.stop().await;
}
