//! Security issue 11 against the real engine: images are checked for every job kind and never
//! reach the CLI as a flag, engine children carry none of the runner's secrets, the agent's
//! output is capped, the agent network we create keeps agents apart, `--runtime` is checked.

mod container_support;

use container_support::*;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use windshift_runner::effects::agent_driver::{self, DriveOptions, DriverOutput};
use windshift_runner::effects::container::{
    ContainerConfig, ContainerError, Engine, LaunchKind, NetworkStatus,
};
use windshift_runner::fsm::contract::AgentSignal;

fn engine_with(instance: &str, tune: impl FnOnce(&mut ContainerConfig)) -> (Engine, Cleanup) {
    let (engine, cleanup) = test_engine(instance);
    let mut cfg = engine.cfg.clone();
    tune(&mut cfg);
    (Engine::new(cfg), cleanup)
}

fn inspect(name: &str, format: &str) -> String {
    let out = engine_command()
        .args(["inspect", "--format", format, name])
        .output()
        .expect("inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn container_jobs_face_the_allowlist() {
    let instance = unique_instance("kinds");
    let (engine, _cleanup) = engine_with(&instance, |c| {
        c.allowed_images = vec![IMAGE_UNLABELED.into()];
    });
    let kind = LaunchKind::Container;
    assert_eq!(
        engine
            .check_job_image(kind, Some(IMAGE))
            .await
            .expect("default"),
        IMAGE
    );
    assert!(matches!(
        engine.check_job_image(kind, Some(IMAGE_WRONG_LABEL)).await,
        Err(ContainerError::ImageNotAllowed { .. })
    ));
    // Allowed: a container job's image needs no JSONL contract label (it speaks none).
    assert_eq!(
        engine
            .check_job_image(kind, Some(IMAGE_UNLABELED))
            .await
            .expect("allowed container image"),
        IMAGE_UNLABELED
    );
    assert!(matches!(
        engine.check_job_image(kind, None).await,
        Err(ContainerError::NoContainerImage)
    ));
    // The same unlabeled image as a coding agent's is refused without the opt-in.
    assert!(matches!(
        engine
            .check_job_image(LaunchKind::CodingAgent, Some(IMAGE_UNLABELED))
            .await,
        Err(ContainerError::Unlabeled { .. })
    ));
}

#[tokio::test]
async fn an_image_that_looks_like_a_flag_never_reaches_the_engine() {
    let instance = unique_instance("dash");
    let (engine, _cleanup) = engine_with(&instance, |c| {
        c.allowed_images = vec!["--privileged".into()];
    });
    for kind in [LaunchKind::CodingAgent, LaunchKind::Container] {
        let err = engine
            .check_job_image(kind, Some("--privileged"))
            .await
            .expect_err("refused");
        assert!(
            err.to_string().contains("is not an image reference"),
            "{err}"
        );
    }
    let dir = tempfile::tempdir().expect("dir");
    for image in ["--privileged", "-v/:/host", "alpine latest", "UPPER:1"] {
        let mut s = spec(601, LaunchKind::Container, None);
        s.image = image.into();
        let err = engine.create(&s, dir.path()).await.expect_err(image);
        assert!(
            matches!(err, ContainerError::BadImage { .. }),
            "{image}: {err}"
        );
    }
    assert!(
        engine
            .find_instance_containers()
            .await
            .expect("ps")
            .is_empty(),
        "no container was created"
    );
    // The `--` the argv now carries is accepted by the engine: a normal create still works.
    let name = engine
        .create(&spec(602, LaunchKind::Container, None), dir.path())
        .await
        .expect("create with --");
    // Podman reports locally loaded images under `localhost/`.
    assert_eq!(
        inspect(&name, "{{.Config.Image}}").trim_start_matches("localhost/"),
        IMAGE
    );
}

/// The pids of processes whose argv holds every one of `words`.
fn pids_with_args(words: &[&str]) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if words.iter().all(|w| args.contains(&w.as_bytes())) {
            pids.push(pid);
        }
    }
    pids
}

fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .expect("environ readable")
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

#[tokio::test]
async fn long_lived_engine_children_carry_no_runner_secret() {
    // The runner's own environment holds its credential (as under systemd's EnvironmentFile).
    std::env::set_var("WSRUNNER_CREDENTIAL", "wsrc_test_secret_for_environ_check");
    std::env::set_var("ANTHROPIC_API_KEY", "sk-test-secret");
    let instance = unique_instance("environ");
    let (engine, _cleanup) = test_engine(&instance);
    let run_dir = tempfile::tempdir().expect("run dir");
    let name = engine
        .create(&spec(611, LaunchKind::CodingAgent, None), run_dir.path())
        .await
        .expect("create");
    let stdin = agent_driver::start(&engine, &name, run_dir.path(), true)
        .await
        .expect("start");
    let (tx, mut rx) = mpsc::channel(1024);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let drive_engine = engine.clone();
    let drive_name = name.clone();
    let driver = tokio::spawn(async move {
        let options = DriveOptions {
            prompt: Some("sleep 20000; finish completed".into()),
            grace: Duration::from_secs(3),
            ..DriveOptions::default()
        };
        agent_driver::drive(
            &drive_engine,
            &drive_name,
            stdin,
            options,
            std::future::pending::<()>(),
            tx,
        )
        .await
    });
    let mut found = (Vec::new(), Vec::new());
    if engine.uses_api() {
        // The API driver keeps no child at all: stdin and output are connections of this
        // process, so no process can carry a secret (or die with the runner's container).
        assert!(
            wait_until(Duration::from_secs(30), || {
                let engine = engine.clone();
                let name = name.clone();
                async move {
                    matches!(
                        engine.state(&name).await,
                        Ok(Some(
                            windshift_runner::effects::container::ContainerState::Running
                        ))
                    )
                }
            })
            .await,
            "the container did not start"
        );
        assert!(pids_with_args(&["attach", &name]).is_empty());
        assert!(pids_with_args(&["logs", &name]).is_empty());
        engine.kill(&name).await.expect("kill");
        driver.await.expect("driver").expect("drive ends");
        drain.await.expect("drain");
        assert!(
            pids_with_args(&[&name]).is_empty(),
            "no engine child is left"
        );
        return;
    }
    assert!(
        wait_until(Duration::from_secs(30), || {
            found = (
                pids_with_args(&["attach", &name]),
                pids_with_args(&["logs", "--follow", &name]),
            );
            let ready = !found.0.is_empty() && !found.1.is_empty();
            async move { ready }
        })
        .await,
        "the attach and logs processes did not appear"
    );
    for pid in found.0.iter().chain(&found.1) {
        let env = environ(*pid);
        assert!(
            env.iter().all(|v| !v.starts_with("WSRUNNER_")
                && !v.contains("wsrc_")
                && !v.starts_with("ANTHROPIC_API_KEY")),
            "engine child {pid} inherited a secret: {env:?}"
        );
        assert!(env.iter().any(|v| v.starts_with("PATH=")), "{env:?}");
    }
    engine.kill(&name).await.expect("kill");
    driver.await.expect("driver").expect("drive ends");
    drain.await.expect("drain");
}

async fn drive_to_end(engine: &Engine, script: &str, run_id: i64, grace: Duration) -> Driven {
    run_script(
        engine,
        &spec(run_id, LaunchKind::CodingAgent, None),
        script,
        grace,
    )
    .await
}

#[tokio::test]
async fn output_past_the_limit_stops_the_container_and_replay_agrees() {
    let instance = unique_instance("limit");
    let (engine, _cleanup) = engine_with(&instance, |c| c.output_limit = 64 << 10);
    let started = Instant::now();
    // `hang` ignores abort and EOF: only the runner's kill ends it before the 30 s grace.
    // 2000 lines are about 4x the limit: past it, yet within the engine log's 8x.
    let driven = drive_to_end(&engine, "flood 2000; hang", 621, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "killed at the limit, not after the grace"
    );
    let r = &driven.result;
    assert!(r.output_limit_hit && r.stream_degraded, "{r:?}");
    assert!(!r.killed_after_grace, "{r:?}");
    assert_eq!(r.exit_code, Some(137), "SIGKILL: {r:?}");
    let content = driven.of_type("content").len();
    assert!(
        driven.of_type("lifecycle").len() == 1 && driven.of_type("content")[0]["seq"] == 0,
        "the engine log lost no line"
    );
    assert!(
        (100..2000).contains(&content),
        "forwarded up to the limit only: {content}"
    );
    let errors: Vec<_> = driven
        .signals()
        .into_iter()
        .filter_map(|s| match s {
            AgentSignal::Error { message } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("WSRUNNER_AGENT_OUTPUT_LIMIT") && errors[0].contains("65536 bytes"),
        "{errors:?}"
    );
    // The engine-side backstop sits above the runner's limit (json-file: 2x, 5 files).
    if inspect(&driven.name, "{{.HostConfig.LogConfig.Type}}") == "json-file" {
        let config = inspect(&driven.name, "{{json .HostConfig.LogConfig.Config}}");
        assert!(config.contains(r#""max-size":"131072""#), "{config}");
        assert!(config.contains(r#""max-file":"5""#), "{config}");
    }

    // Replay past what was read forwards nothing and reports no second limit.
    let (tx, mut rx) = mpsc::channel(1024);
    let counts = agent_driver::replay(
        &engine,
        &driven.name,
        r.stdout_lines,
        r.stderr_lines,
        false,
        tx,
    )
    .await
    .expect("replay");
    // The logs a replay reads hold at least what the follow read. They may hold more: a
    // container killed mid-flood can end the engine's follow stream before its log copier
    // wrote the last lines (seen on Docker 20.10), and the replay's read of the whole log
    // finds them. Either way nothing past the limit is forwarded again.
    assert!(
        counts.0 >= r.stdout_lines && counts.1 >= r.stderr_lines,
        "{counts:?} against {:?}",
        (r.stdout_lines, r.stderr_lines)
    );
    assert!(rx.recv().await.is_none(), "nothing new after the limit");
    // Replay from the start finds the limit at the same line.
    let (tx, mut rx) = mpsc::channel(100_000);
    agent_driver::replay(&engine, &driven.name, 0, 0, false, tx)
        .await
        .expect("replay all");
    let mut replayed = Vec::new();
    while let Some(o) = rx.recv().await {
        replayed.push(o);
    }
    let limit_events = |outs: &[DriverOutput]| {
        outs.iter()
            .filter(|o| matches!(o, DriverOutput::Event { payload_json, .. } if payload_json.contains("WSRUNNER_AGENT_OUTPUT_LIMIT")))
            .count()
    };
    assert_eq!(limit_events(&replayed), 1);
    assert_eq!(
        replayed
            .iter()
            .filter(|o| matches!(o, DriverOutput::Event { payload_json, .. } if payload_json.contains("\"content\"")))
            .count(),
        content,
        "replay cuts at the same line"
    );

    // One long line crosses the limit mid-line the same way.
    let driven = drive_to_end(
        &engine,
        "bigline 300000; hang",
        622,
        Duration::from_secs(30),
    )
    .await;
    assert!(driven.result.output_limit_hit, "{:?}", driven.result);
    assert_eq!(driven.result.exit_code, Some(137));
    assert!(driven.of_type("content").is_empty());

    // Below the limit nothing changes.
    let driven = drive_to_end(
        &engine,
        "flood 50; finish completed",
        623,
        Duration::from_secs(5),
    )
    .await;
    assert!(!driven.result.output_limit_hit, "{:?}", driven.result);
    assert_eq!(driven.of_type("content").len(), 50);
    assert_eq!(driven.result.judged_exit_code(), Some(0));
}

fn container_ip(name: &str, network: &str) -> String {
    inspect(
        name,
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
    )
}

struct RemoveNet(String);
impl Drop for RemoveNet {
    fn drop(&mut self) {
        let _ = engine_command().args(["network", "rm", &self.0]).output();
    }
}

/// A probe from a fresh container on `engine`'s network to a closed port of `peer`.
async fn probe_peer(engine: &Engine, peer_ip: &str, run_id: i64) -> serde_json::Value {
    let driven = drive_to_end(
        engine,
        &format!("probe connect={peer_ip}:7; finish completed"),
        run_id,
        Duration::from_secs(5),
    )
    .await;
    driven.of_type("probe")[0]["connect"].clone()
}

#[tokio::test]
async fn agents_on_the_created_network_cannot_reach_each_other() {
    let created = format!("wsr-test-icc-{}", unique_instance("icc"));
    let plain = format!("wsr-test-plain-{}", unique_instance("icc"));
    let _g1 = RemoveNet(created.clone());
    let _g2 = RemoveNet(plain.clone());
    let instance = unique_instance("icc");
    let (engine, _cleanup) = engine_with(&instance, |c| c.network = created.clone());
    assert_eq!(
        engine.ensure_network().await.expect("create"),
        NetworkStatus::Created
    );
    if engine_cli() == "podman" {
        // Podman's bridge networks have no inter-container switch: the runner creates a plain
        // one and warns (docs/containers.md). What it can still check is that it says so.
        assert!(engine.network_allows_icc(&created).await.expect("inspect"));
        return;
    }
    assert!(!engine.network_allows_icc(&created).await.expect("inspect"));
    // An existing network is used as is (and reported as allowing ICC).
    let out = engine_command()
        .args(["network", "create", &plain])
        .output()
        .expect("create plain");
    assert!(out.status.success(), "{out:?}");
    let (plain_engine, _c2) =
        engine_with(&unique_instance("icc-plain"), |c| c.network = plain.clone());
    assert_eq!(
        plain_engine.ensure_network().await.expect("present"),
        NetworkStatus::Present
    );
    assert!(plain_engine
        .network_allows_icc(&plain)
        .await
        .expect("inspect"));

    let dir = tempfile::tempdir().expect("dir");
    let mut results = Vec::new();
    for (e, net, id) in [(&engine, &created, 631), (&plain_engine, &plain, 633)] {
        // The peer waits on its stdin for a prompt that never comes: it stays running.
        let peer = e
            .create(&spec(id, LaunchKind::CodingAgent, None), dir.path())
            .await
            .expect("peer");
        e.start(&peer).await.expect("start peer");
        let ip = container_ip(&peer, net);
        assert!(!ip.is_empty(), "peer has an address on {net}");
        results.push(probe_peer(e, &ip, id + 1).await);
    }
    // ICC off drops the packets (a timeout); ICC on lets the peer's kernel refuse the port.
    let (isolated, open) = (&results[0], &results[1]);
    assert_eq!(isolated["connected"], false, "{isolated}");
    let err = isolated["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(err.contains("timed out"), "isolated: {isolated}");
    let err = open["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        err.contains("refused"),
        "the control network reaches the peer: {open}"
    );
}

#[tokio::test]
async fn a_runtime_the_engine_lists_runs_and_a_bogus_one_is_refused() {
    let (engine, _cleanup) = engine_with(&unique_instance("runtime"), |c| {
        c.runtime = Some("runc".into())
    });
    engine.check_runtime().await.expect("runc is listed");
    let driven = drive_to_end(&engine, "finish completed", 641, Duration::from_secs(5)).await;
    assert_eq!(driven.result.judged_exit_code(), Some(0));
    // Podman records the OCI runtime of a container as "oci" whatever its binary.
    let want = if engine_cli() == "podman" {
        "oci"
    } else {
        "runc"
    };
    assert_eq!(inspect(&driven.name, "{{.HostConfig.Runtime}}"), want);

    let (bogus, _c) = engine_with(&unique_instance("runtime-bad"), |c| {
        c.runtime = Some("no-such-runtime".into())
    });
    let err = bogus.check_runtime().await.expect_err("refused");
    assert!(
        matches!(err, ContainerError::UnknownRuntime { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("no-such-runtime") && text.contains("runc"),
        "{text}"
    );
}

/// `windshift-runner run` with a base environment (an unreachable plain-http server) plus
/// `extra`; returns the exit code and everything it printed.
fn runner_start(extra: &[(&str, &str)]) -> (i32, String) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_windshift-runner"));
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WS_API_URL", "http://127.0.0.1:9/api")
        .env("WSRUNNER_ALLOW_INSECURE", "1")
        .env("WSRUNNER_IMAGE", IMAGE)
        .env("WSRUNNER_NETWORK", "none")
        .env("WSRUNNER_DOCKER", engine_cli())
        .env("WSRUNNER_CACHE_ROOT", tmp.path().join("cache"))
        .env("WSRUNNER_JOURNAL_DIR", tmp.path().join("journal"))
        .envs(extra.iter().copied());
    let out = cmd.output().expect("runner runs");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn unsafe_engine_settings_stop_the_runner_at_start_with_exit_78() {
    for (extra, says) in [
        (
            &[("WSRUNNER_NETWORK", "host")][..],
            "WSRUNNER_ALLOW_HOST_NETWORK=1",
        ),
        (&[("WSRUNNER_IMAGE", "--privileged")][..], "WSRUNNER_IMAGE"),
        (
            &[("WSRUNNER_ALLOWED_IMAGES", "alpine:3,-v/:/host")][..],
            "WSRUNNER_ALLOWED_IMAGES",
        ),
        (
            &[("WSRUNNER_RUNTIME", "--privileged")][..],
            "WSRUNNER_RUNTIME",
        ),
        (
            &[("WSRUNNER_AGENT_OUTPUT_LIMIT", "lots")][..],
            "WSRUNNER_AGENT_OUTPUT_LIMIT",
        ),
        // Refused by the engine check at boot, naming what the engine has.
        (&[("WSRUNNER_RUNTIME", "no-such-runtime")][..], "runc"),
    ] {
        let (code, text) = runner_start(extra);
        assert_eq!(code, 78, "{extra:?}: {text}");
        assert!(
            text.contains(says),
            "{extra:?} should mention {says}: {text}"
        );
    }
}

/// The log file(s) the engine keeps for a container, with their total size: Docker's
/// `LogPath` (json-file/local) plus its rotated `<path>.N`, Podman's k8s-file path. `None`
/// when the engine names no file (another log driver).
fn engine_log_bytes(name: &str) -> Option<(String, u64)> {
    let path = ["{{.LogPath}}", "{{.HostConfig.LogConfig.Path}}"]
        .iter()
        .map(|format| inspect(name, format))
        .find(|p| p.starts_with('/'))?;
    let file = std::path::Path::new(&path);
    let base = file.file_name()?.to_string_lossy().into_owned();
    let mut total = 0;
    for entry in std::fs::read_dir(file.parent()?).ok()?.flatten() {
        let other = entry.file_name().to_string_lossy().into_owned();
        if other == base || other.starts_with(&format!("{base}.")) {
            total += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    Some((path, total))
}

/// An agent that floods while no runner meters it (the runner is down, so nothing stops it at
/// WSRUNNER_AGENT_OUTPUT_LIMIT): the engine's own log cap still bounds what stays on disk,
/// at the 10x of `log_backstop_args`, however much the agent printed.
#[tokio::test]
async fn an_unmetered_flood_stays_within_the_engine_log_cap() {
    let instance = unique_instance("logcap");
    let limit: u64 = 64 << 10;
    let (engine, _cleanup) = engine_with(&instance, |c| c.output_limit = limit);
    let run_dir = tempfile::tempdir().expect("run dir");
    let name = engine
        .create(&spec(631, LaunchKind::CodingAgent, None), run_dir.path())
        .await
        .expect("create");
    let stdin = agent_driver::start(&engine, &name, run_dir.path(), true)
        .await
        .expect("start")
        .expect("stdin");
    // 60000 lines of about 50 bytes: ~3 MB printed, far past 10x the limit (640 KiB).
    let prompt = serde_json::json!({"type": "prompt", "message": "flood 60000; exit 0"});
    stdin.send(&prompt.to_string()).await.expect("prompt");
    let exit = tokio::time::timeout(Duration::from_secs(120), engine.wait_exit(&name))
        .await
        .expect("the flood ends")
        .expect("wait");
    assert_eq!(exit, Some(0));
    stdin.close().await;
    let Some((path, bytes)) = engine_log_bytes(&name) else {
        eprintln!(
            "SKIP: the engine names no log file for {name} (log driver {:?})",
            engine.log_driver().await
        );
        return;
    };
    // The cap is per file; a file may pass it by the line that crossed it.
    assert!(
        bytes <= 10 * limit + (64 << 10),
        "{path}: {bytes} bytes kept, the cap is 10 x {limit}"
    );
    // The flood really was bigger than what was kept: the oldest lines are gone.
    let out = engine_command()
        .args(["logs", &name])
        .output()
        .expect("logs");
    let kept = String::from_utf8_lossy(&out.stdout).lines().count();
    eprintln!("{path}: {bytes} bytes on disk, {kept} of 60000 lines kept");
    assert!(kept < 60000, "{kept} lines kept of 60000");
}

/// `WSRUNNER_IMAGE_PRUNE_AFTER`: an override image the runner pulled and no run used for that
/// long is removed from the engine's store; the default image never is, even when the use
/// file says it is idle; an override the operator put there (not pulled) stays.
#[tokio::test]
async fn idle_pulled_override_images_are_pruned_never_the_default() {
    use windshift_runner::effects::container::{ImageUse, ImageUseEntry};
    let instance = unique_instance("prune");
    let tag = |t: &str| format!("windshift-test-agent:{t}-{}", std::process::id());
    let (pulled, placed) = (tag("pulled"), tag("placed"));
    for image in [&pulled, &placed] {
        let out = engine_command()
            .args(["tag", IMAGE, image])
            .output()
            .expect("tag");
        assert!(out.status.success(), "{out:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(".agent-images.json");
    let (engine, _cleanup) = engine_with(&instance, |c| {
        c.allowed_images = vec![pulled.clone(), placed.clone()];
        c.image_use_file = Some(file.clone());
    });
    let mut uses = ImageUse::default();
    let old = ImageUseEntry {
        pulled: true,
        last_used_ms: 1_000,
    };
    uses.images.insert(pulled.clone(), old.clone());
    uses.images.insert(IMAGE.to_owned(), old.clone());
    uses.images.insert(
        placed.clone(),
        ImageUseEntry {
            pulled: false,
            ..old
        },
    );
    uses.store(&file).expect("store");
    // A run using the pulled image now makes it recent: nothing goes.
    let checked = engine
        .check_job_image(LaunchKind::CodingAgent, Some(&pulled))
        .await
        .expect("allowed");
    assert_eq!(checked, pulled);
    let report = engine.prune_idle_images(Duration::from_secs(3600)).await;
    assert!(report.removed.is_empty(), "{report:?}");
    // Idle for longer than the setting: the pulled override goes, the rest stays.
    let mut uses = ImageUse::load(&file);
    uses.images.get_mut(&pulled).expect("recorded").last_used_ms = 1_000;
    uses.store(&file).expect("store");
    let report = engine.prune_idle_images(Duration::from_secs(3600)).await;
    assert_eq!(report.removed, vec![pulled.clone()], "{report:?}");
    assert!(engine.image_size(&pulled).await.is_none(), "pruned");
    assert!(
        engine.image_size(IMAGE).await.is_some(),
        "the default image stays"
    );
    assert!(
        engine.image_size(&placed).await.is_some(),
        "not pulled by the runner"
    );
    let left = ImageUse::load(&file);
    assert!(!left.images.contains_key(&pulled));
    assert!(left.images.contains_key(IMAGE) && left.images.contains_key(&placed));
    let _ = engine_command().args(["rmi", &placed]).output();
}
