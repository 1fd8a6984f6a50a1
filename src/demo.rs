//! `windshift-runner demo`: the whole job on one machine with no set-up. An embedded
//! devserver on loopback stands in for Windshift, a local git repository for the SCM, and the
//! locally built test agent image for the agent. One run goes through the real daemon; then
//! the run's journal timeline, the server's verdict and the pushed commit are printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use windshift_devserver::types::{EnqueueRepo, EnqueueRun};
use windshift_devserver::{DevServer, DevServerConfig};

use crate::config::{LogFormat, RunnerConfig};
use crate::daemon::{self, systemd::Notifier, DaemonOptions, Shutdown};
use crate::journal::tools::{self as journal_tools, JournalArgs, JournalCommand};

/// The test agent image the demo runs (built by scripts/build-test-agent-image.sh).
pub const DEMO_IMAGE: &str = "windshift-test-agent:dev";
const SLUG: &str = "demo/hello";
/// What the scripted agent does: say something, commit a file, finish.
const PROMPT: &str = "say \"Reading the repository\"; \
    commit file=GREETING.md content=\"Hello from the windshift-runner demo\\n\" msg=\"Add a greeting\"; \
    finish completed \"Added GREETING.md\"";

/// Demo options.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep the demo's working directory (journal, cache, devserver data) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Docker-compatible CLI.
    #[arg(long, env = "WSRUNNER_DOCKER", default_value = "docker")]
    pub docker: String,
}

/// Runs the demo; returns the exit code.
pub fn run(args: &DemoArgs) -> i32 {
    crate::logging::init(LogFormat::Text);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("demo: {e}");
            1
        }
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

async fn demo(args: &DemoArgs) -> Result<(), String> {
    step("Checking Docker and the test agent image");
    ensure_docker(&args.docker)?;
    ensure_image(&args.docker)?;

    let work = tempfile::Builder::new()
        .prefix("windshift-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a working directory: {e}"))?;
    let root = work.path().to_owned();

    step("Starting the embedded devserver and a local git repository");
    let source = root.join("source-repo");
    make_source_repo(&source)?;
    let dev = DevServer::start(DevServerConfig::new(root.join("devserver")))
        .await
        .map_err(|e| format!("devserver: {e}"))?;
    let core = dev.core().clone();
    let (pool, token, repo) = core
        .provision("demo", SLUG, &source.display().to_string())
        .await
        .map_err(|e| format!("set up the devserver: {e:?}"))?;
    let run = core
        .enqueue(&EnqueueRun {
            pool_id: pool.id,
            repos: vec![EnqueueRepo {
                slug: SLUG.into(),
                base_ref: "main".into(),
                continue_branch: String::new(),
            }],
            prompt: PROMPT.into(),
            ..Default::default()
        })
        .map_err(|e| format!("enqueue: {e:?}"))?;
    println!("    devserver  {}", dev.api_url());
    println!("    repository {SLUG} (from {})", source.display());
    println!("    run        #{} queued for pool {}", run.id, pool.id);

    step("Running windshift-runner until the run is reported");
    let journal_dir = root.join("journal");
    let config = RunnerConfig {
        api_url: Some(dev.api_url()),
        allow_insecure: Some("1".into()),
        registration_token: Some(token),
        name: Some("demo-runner".into()),
        image: Some(DEMO_IMAGE.into()),
        docker: Some(args.docker.clone()),
        cache_root: Some(root.join("cache")),
        journal_dir: Some(journal_dir.clone()),
        // The scripted agent needs no network at all.
        network: Some("none".into()),
        poll_interval: Some("250ms".into()),
        heartbeat_interval: Some("2s".into()),
        memory: Some("512m".into()),
        cpus: Some("1".into()),
        ..Default::default()
    };
    let config = config
        .validate(Some("demo"))
        .map_err(|e| format!("configuration: {e}"))?;
    let mut options = DaemonOptions::new(Shutdown::default());
    options.once = true;
    options.notifier = Notifier::disabled();
    let code = tokio::time::timeout(Duration::from_secs(300), daemon::run(config, options))
        .await
        .map_err(|_| "the run did not finish within 5 minutes".to_owned())?;
    if code != 0 {
        return Err(format!("the runner exited with code {code}"));
    }

    step(&format!("Journal timeline of run #{}", run.id));
    let journal_args = JournalArgs {
        db: journal_dir,
        // A copy: the journal's lock may outlive the daemon by a moment.
        copy: true,
        json: false,
        command: JournalCommand::Show { run: run.id },
    };
    let mut out = std::io::stdout();
    journal_tools::run(&journal_args, &mut out, &mut std::io::stderr());
    let _ = out.flush();

    step("The server's verdict");
    let view = core.run(run.id).map_err(|e| format!("read run: {e:?}"))?;
    println!("    status      {}", view.status);
    if !view.error.is_empty() {
        println!("    error       {}", view.error);
    }
    println!("    summary     {}", view.summary);
    println!("    branch      {}", view.branch);
    println!("    base commit {}", view.base_commit);

    step("The pushed commit");
    if view.branch.is_empty() {
        println!("    (no branch was pushed)");
    } else {
        let log = git_output(
            Path::new(&repo.bare_path),
            &[
                "log",
                "-1",
                "--stat",
                "--format=commit %H%nAuthor: %an <%ae>%n%n    %s%n",
                &format!("refs/heads/{}", view.branch),
            ],
        )?;
        println!("{log}");
    }
    dev.stop().await;

    if args.keep {
        let kept = work.keep();
        println!("\nKept the demo's files in {}", kept.display());
    }
    if view.status != "succeeded" {
        return Err(format!("the run ended {}: {}", view.status, view.error));
    }
    println!("\nDemo complete: the run was claimed, prepared, run in a hardened container, pushed and reported.");
    Ok(())
}

fn ensure_docker(docker: &str) -> Result<(), String> {
    let out = Command::new(docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .map_err(|e| {
            format!("cannot run `{docker}`: {e}. Install Docker Engine (or set WSRUNNER_DOCKER)")
        })?;
    if !out.status.success() {
        return Err(format!(
            "the Docker daemon is not reachable: {}. Start it, and make sure this user may use it",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Builds the test agent image with the repository's script when it is missing.
fn ensure_image(docker: &str) -> Result<(), String> {
    let present = Command::new(docker)
        .args(["image", "inspect", DEMO_IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        println!("    {DEMO_IMAGE} is present");
        return Ok(());
    }
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/build-test-agent-image.sh");
    if !script.exists() {
        return Err(format!(
            "the image {DEMO_IMAGE} is missing and {} is not here: run the demo from a source checkout (cargo run --release -- demo)",
            script.display()
        ));
    }
    println!("    building {DEMO_IMAGE} (first run only, about a minute)");
    let status = Command::new("bash")
        .arg(&script)
        .env("WSRUNNER_DOCKER", docker)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed", script.display()));
    }
    Ok(())
}

fn make_source_repo(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    git_output(dir, &["init", "-q", "-b", "main"])?;
    std::fs::write(
        dir.join("README.md"),
        "# hello\n\nA tiny repository for the windshift-runner demo.\n",
    )
    .map_err(|e| format!("write README.md: {e}"))?;
    git_output(dir, &["add", "README.md"])?;
    git_output(dir, &["commit", "-q", "-m", "Initial commit"])?;
    Ok(())
}

fn git_output(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Demo",
            "-c",
            "user.email=demo@example.invalid",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
}
