//! The engine wrapper against the real daemon: the argv golden test (spec 5.1/5.2), the env
//! file, the network, the image contract label checks and finding/removing containers.

mod container_support;

use container_support::*;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use windshift_runner::effects::container::{
    create_argv, write_env_file, BootImageCheck, ContainerConfig, ContainerError, ContainerState,
    Engine, LaunchKind, NetworkStatus,
};

#[test]
fn argv_matches_spec_5_1_and_5_2_in_order() {
    let cfg = ContainerConfig {
        instance: "host1".into(),
        ..ContainerConfig::default()
    };
    let mut s = spec(
        42,
        LaunchKind::CodingAgent,
        Some(Path::new("/cache/runs/42/repo")),
    );
    s.image = "ghcr.io/acme/agent:1".into();
    let argv = create_argv(&cfg, &s, Path::new("/run/env/agent.env"));
    let expected: Vec<&str> = vec![
        "create",
        "-i",
        "--name",
        "wsr-host1-run-42-1",
        "--label",
        "org.windshift.runner.instance=host1",
        "--label",
        "org.windshift.runner.run-id=42",
        "--label",
        "org.windshift.runner.attempt=1",
        // spec 5.1 items 2-7, verbatim and in order
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--user=1000:1000",
        "--read-only",
        "--tmpfs=/tmp:rw,nosuid,nodev,size=256m,mode=1777",
        "--network=coding-agent-egress",
        "--pids-limit=512",
        "--memory=4g",
        "--memory-swap=4g",
        "--cpus=2",
        "--tmpfs=/home/agent:rw,nosuid,nodev,size=512m,mode=1777",
        "--env-file",
        "/run/env/agent.env",
        "-v",
        "/cache/runs/42/repo:/workspace:Z",
        "--",
        "ghcr.io/acme/agent:1",
    ];
    assert_eq!(argv, expected);

    let mut c = spec(43, LaunchKind::Container, None);
    c.image = "alpine:3".into();
    c.extra_args = vec!["--init".into()];
    let argv = create_argv(&cfg, &c, Path::new("/e"));
    let expected: Vec<&str> = vec![
        "create",
        "--name",
        "wsr-host1-run-43-1",
        "--label",
        "org.windshift.runner.instance=host1",
        "--label",
        "org.windshift.runner.run-id=43",
        "--label",
        "org.windshift.runner.attempt=1",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--user=1000:1000",
        "--read-only",
        "--tmpfs=/tmp:rw,nosuid,nodev,size=256m,mode=1777",
        "--network=coding-agent-egress",
        "--pids-limit=512",
        "--memory=4g",
        "--memory-swap=4g",
        "--cpus=2",
        "--env-file",
        "/e",
        "--init",
        "--",
        "alpine:3",
    ];
    assert_eq!(argv, expected);
}

#[test]
fn tunables_reach_the_argv() {
    let cfg = ContainerConfig::from_lookup("h", |name| match name {
        "WSRUNNER_NETWORK" => Some("none".into()),
        "WSRUNNER_PIDS_LIMIT" => Some("100".into()),
        "WSRUNNER_MEMORY" => Some("1g".into()),
        "WSRUNNER_CPUS" => Some("0.5".into()),
        _ => None,
    })
    .expect("valid");
    let argv = create_argv(
        &cfg,
        &spec(1, LaunchKind::CodingAgent, None),
        Path::new("/e"),
    );
    for flag in [
        "--network=none",
        "--pids-limit=100",
        "--memory=1g",
        "--memory-swap=1g",
        "--cpus=0.5",
    ] {
        assert!(argv.iter().any(|a| a == flag), "{flag} missing in {argv:?}");
    }
}

#[test]
fn env_file_is_private_and_vanishes() {
    let parent = tempfile::tempdir().expect("tempdir");
    let mut env = BTreeMap::new();
    env.insert("WS_TOKEN".to_owned(), "wsrc_secretvalue".to_owned());
    let file = write_env_file(parent.path(), &env, 7).expect("written");
    let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(file.path()), 0o600);
    assert_eq!(mode(file.dir()), 0o700);
    let text = std::fs::read_to_string(file.path()).expect("read");
    assert_eq!(text, "WS_TOKEN=wsrc_secretvalue\nAGENT_RUN_ID=7\n");
    let (path, dir) = (file.path().to_owned(), file.dir().to_owned());
    drop(file);
    assert!(!path.exists() && !dir.exists());
}

#[tokio::test]
async fn create_reads_the_env_file_then_deletes_it_and_keeps_secrets_off_argv() {
    let (engine, _cleanup) = test_engine(&unique_instance("envfile"));
    let env_parent = tempfile::tempdir().expect("tempdir");
    let mut s = spec(301, LaunchKind::CodingAgent, None);
    s.env
        .insert("WS_TOKEN".into(), "wsrc_envfiletestsecret".into());
    s.env.insert("AGENT_RUN_ID".into(), "999".into());
    let name = engine.create(&s, env_parent.path()).await.expect("create");
    assert_eq!(
        std::fs::read_dir(env_parent.path()).expect("dir").count(),
        0,
        "env file deleted"
    );
    let argv = create_argv(&engine.cfg, &s, Path::new("/x"));
    assert!(!argv.iter().any(|a| a.contains("wsrc_envfiletestsecret")));
    let out = engine_command()
        .args(["inspect", "--format", "{{json .Config.Env}}", &name])
        .output()
        .expect("inspect");
    let env: Vec<String> = serde_json::from_slice(&out.stdout).expect("env json");
    assert!(env.contains(&"WS_TOKEN=wsrc_envfiletestsecret".to_owned()));
    assert!(
        env.contains(&"AGENT_RUN_ID=301".to_owned()),
        "AGENT_RUN_ID wins: {env:?}"
    );
    // Idempotent for the same (run, attempt): the existing container is reused.
    assert_eq!(
        engine.create(&s, env_parent.path()).await.expect("again"),
        name
    );
    // A value with a newline is refused before anything is created.
    let mut bad = spec(302, LaunchKind::CodingAgent, None);
    bad.env.insert("MULTI".into(), "a\nb".into());
    let err = engine
        .create(&bad, env_parent.path())
        .await
        .expect_err("newline");
    assert!(matches!(err, ContainerError::EnvNewline { .. }), "{err}");
    assert_eq!(
        engine
            .state(&windshift_runner::effects::container::container_name(
                &engine.cfg.instance,
                302,
                1
            ))
            .await
            .expect("state"),
        None
    );
}

fn label_engine(default_image: &str, allowed: &[&str], allow_unlabeled: bool) -> Engine {
    Engine::new(ContainerConfig {
        default_image: default_image.into(),
        allowed_images: allowed.iter().map(|s| s.to_string()).collect(),
        allow_unlabeled,
        docker: engine_cli(),
        driver: engine_driver(),
        ..ContainerConfig::default()
    })
}

#[tokio::test]
async fn contract_label_checks_follow_spec_4_8() {
    // Boot check.
    assert_eq!(
        label_engine(IMAGE, &[], false)
            .boot_check_image()
            .await
            .expect("ok"),
        BootImageCheck::Ok
    );
    assert!(matches!(
        label_engine(IMAGE_UNLABELED, &[], false)
            .boot_check_image()
            .await,
        Err(ContainerError::Unlabeled { .. })
    ));
    assert_eq!(
        label_engine(IMAGE_UNLABELED, &[], true)
            .boot_check_image()
            .await
            .expect("allowed"),
        BootImageCheck::UnlabeledAllowed
    );
    let wrong = label_engine(IMAGE_WRONG_LABEL, &[], true)
        .boot_check_image()
        .await;
    assert!(
        matches!(&wrong, Err(ContainerError::WrongContract { found, .. }) if found == "v0"),
        "{wrong:?}"
    );
    // Not local and not pullable (no registry here): boot only warns and skips.
    let missing = "windshift-test-agent:does-not-exist";
    assert!(matches!(
        label_engine(missing, &[], false)
            .boot_check_image()
            .await
            .expect("skipped"),
        BootImageCheck::Skipped { .. }
    ));
    assert_eq!(
        label_engine("", &[], false)
            .boot_check_image()
            .await
            .expect("warn"),
        BootImageCheck::NoDefaultImage
    );

    // Per-run check: the default is always allowed, overrides need the allow-list.
    let engine = label_engine(IMAGE, &[IMAGE_UNLABELED, IMAGE_WRONG_LABEL, missing], false);
    assert_eq!(engine.check_run_image(None).await.expect("default"), IMAGE);
    assert_eq!(
        engine.check_run_image(Some(IMAGE)).await.expect("default"),
        IMAGE
    );
    let not_allowed = label_engine(IMAGE, &[], true)
        .check_run_image(Some(IMAGE_UNLABELED))
        .await;
    assert!(
        matches!(&not_allowed, Err(ContainerError::ImageNotAllowed { .. })),
        "{not_allowed:?}"
    );
    assert_eq!(
        not_allowed.expect_err("refused").to_string(),
        format!("image {IMAGE_UNLABELED} is not in the runner image allowlist")
    );
    assert!(matches!(
        engine.check_run_image(Some(IMAGE_UNLABELED)).await,
        Err(ContainerError::Unlabeled { .. })
    ));
    assert!(matches!(
        engine.check_run_image(Some(IMAGE_WRONG_LABEL)).await,
        Err(ContainerError::WrongContract { .. })
    ));
    // Per run, a pull failure fails the run.
    assert!(matches!(
        engine.check_run_image(Some(missing)).await,
        Err(ContainerError::ImageUnavailable { .. })
    ));
    let lenient = label_engine(IMAGE, &[IMAGE_UNLABELED], true);
    assert_eq!(
        lenient
            .check_run_image(Some(IMAGE_UNLABELED))
            .await
            .expect("allowed"),
        IMAGE_UNLABELED
    );
    assert!(matches!(
        label_engine("", &[], false).check_run_image(None).await,
        Err(ContainerError::NoImage)
    ));
}

#[tokio::test]
async fn ensure_network_creates_once_and_never_builtins() {
    let name = format!("wsr-test-net-{}", unique_instance("net"));
    let engine = Engine::new(ContainerConfig {
        network: name.clone(),
        docker: engine_cli(),
        driver: engine_driver(),
        ..ContainerConfig::default()
    });
    struct RemoveNet(String);
    impl Drop for RemoveNet {
        fn drop(&mut self) {
            let _ = engine_command().args(["network", "rm", &self.0]).output();
        }
    }
    let _guard = RemoveNet(name.clone());
    assert_eq!(
        engine.ensure_network().await.expect("created"),
        NetworkStatus::Created
    );
    assert_eq!(
        engine.ensure_network().await.expect("present"),
        NetworkStatus::Present
    );
    let driver = engine_command()
        .args(["network", "inspect", "--format", "{{.Driver}}", &name])
        .output()
        .expect("inspect");
    assert_eq!(String::from_utf8_lossy(&driver.stdout).trim(), "bridge");
    for builtin in ["bridge", "host", "none"] {
        let engine = Engine::new(ContainerConfig {
            network: builtin.into(),
            docker: engine_cli(),
            driver: engine_driver(),
            ..ContainerConfig::default()
        });
        assert_eq!(
            engine.ensure_network().await.expect("builtin"),
            NetworkStatus::Builtin
        );
    }
}

#[tokio::test]
async fn find_by_label_sees_states_and_removes_orphans() {
    let instance = unique_instance("find");
    let other = unique_instance("find-other");
    let (engine, _cleanup) = test_engine(&instance);
    let (other_engine, _cleanup_other) = test_engine(&other);
    let dir = tempfile::tempdir().expect("tempdir");

    let running = engine
        .create(&spec(401, LaunchKind::CodingAgent, None), dir.path())
        .await
        .expect("create");
    engine.start(&running).await.expect("start"); // waits on its stdin: stays running
    let exited = engine
        .create(&spec(402, LaunchKind::Container, None), dir.path())
        .await
        .expect("create");
    engine.start(&exited).await.expect("start"); // stdin is /dev/null: exits 0 at once
    let created = engine
        .create(&spec(403, LaunchKind::CodingAgent, None), dir.path())
        .await
        .expect("create");
    let foreign = other_engine
        .create(&spec(401, LaunchKind::CodingAgent, None), dir.path())
        .await
        .expect("create");
    assert!(
        wait_until(std::time::Duration::from_secs(20), || async {
            matches!(
                engine.state(&exited).await,
                Ok(Some(ContainerState::Exited { .. }))
            )
        })
        .await
    );

    let mut found = engine.find_instance_containers().await.expect("find");
    found.sort_by_key(|f| f.run_id);
    let summary: Vec<_> = found
        .iter()
        .map(|f| (f.name.clone(), f.run_id, f.attempt, f.state.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (running.clone(), Some(401), Some(1), ContainerState::Running),
            (
                exited.clone(),
                Some(402),
                Some(1),
                ContainerState::Exited {
                    code: 0,
                    oom_killed: false
                }
            ),
            (created.clone(), Some(403), Some(1), ContainerState::Created),
        ]
    );
    for f in &found {
        engine.remove(&f.name).await.expect("remove");
    }
    assert!(engine
        .find_instance_containers()
        .await
        .expect("find")
        .is_empty());
    assert_eq!(engine.state(&running).await.expect("state"), None);
    // Removing again is fine; the other instance's container is untouched.
    engine.remove(&running).await.expect("idempotent");
    assert_eq!(
        other_engine.state(&foreign).await.expect("state"),
        Some(ContainerState::Created)
    );
    assert_eq!(
        other_engine
            .find_instance_containers()
            .await
            .expect("find")
            .len(),
        1
    );
}
