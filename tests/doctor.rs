//! `windshift-runner doctor` as an operator runs it: the real binary against the in-process
//! devserver and the real Docker daemon, for a healthy host and for each broken setup the
//! troubleshooting list names. Every case checks the exit code, the exact FAIL line, and that
//! no secret reaches the output.

mod daemon_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use daemon_support::*;
use windshift_devserver::types::RegisterBody;

struct Doctor {
    code: i32,
    out: String,
}

impl Doctor {
    /// The line of check `name` (panics with the whole report when absent).
    fn line(&self, name: &str) -> &str {
        self.out
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{}", self.out))
    }
    fn status(&self, name: &str) -> &str {
        self.line(name).split_whitespace().next().unwrap_or("")
    }
    fn assert_status(&self, name: &str, want: &str) {
        assert_eq!(self.status(name), want, "{name}:\n{}", self.out);
    }
}

/// The environment of a healthy host: the devserver, the test agent image, writable dirs.
fn healthy_env(h: &Harness) -> Vec<(String, String)> {
    [
        ("WS_API_URL", h.api_url()),
        ("WSRUNNER_ALLOW_INSECURE", "1".into()),
        ("WSRUNNER_IMAGE", IMAGE.into()),
        ("WSRUNNER_NETWORK", "none".into()),
        ("WSRUNNER_CACHE_ROOT", h.cache_root().display().to_string()),
        (
            "WSRUNNER_JOURNAL_DIR",
            h.journal_dir().display().to_string(),
        ),
        (
            "WSRUNNER_TRIAGE_BIN",
            env!("CARGO_BIN_EXE_windshift-triage").into(),
        ),
        // Below the 2 GiB failure floor: a shared test machine's free space is not the test.
        ("WSRUNNER_DISK_FREE_WARN", "1g".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn doctor(env: Vec<(String, String)>) -> Doctor {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_windshift-runner"))
            .arg("doctor")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .output()
            .expect("doctor runs");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Doctor {
            code: out.status.code().unwrap_or(-1),
            out: text,
        }
    })
    .await
    .expect("doctor thread")
}

fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
}

fn register(h: &Harness) -> String {
    h.dev()
        .core()
        .register(&RegisterBody {
            registration_token: h.token.clone(),
            name: h.name.clone(),
        })
        .expect("register with the pool token")
        .credential
}

/// Checks that must pass on a healthy host (the rest may only warn, for reasons of this test
/// setup: plain http, a loopback server, the built-in `none` network, a tmp dir off-volume).
const MUST_PASS: [&str; 10] = [
    "server",
    "credential",
    "docker",
    "image",
    "cache",
    "journal-dir",
    "journal",
    "git",
    "triage",
    "cred-file",
];
/// `userns` warns on a host whose uid 1000 is a login account (see its own test).
/// `engine-driver` warns where the engine serves no API socket (the CLI driver runs).
const MAY_WARN: [&str; 7] = [
    "engine-driver",
    "api-url",
    "reachable",
    "network",
    "cred-file",
    "llm-model",
    "userns",
];

fn assert_healthy(d: &Doctor) {
    assert_eq!(d.code, 0, "{}", d.out);
    for line in d.out.lines().filter(|l| !l.starts_with("doctor:")) {
        let mut words = line.split_whitespace();
        let (status, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        match status {
            "PASS" => {}
            "WARN" if MAY_WARN.contains(&name) => {}
            _ => panic!("unexpected {status} for {name}:\n{}", d.out),
        }
    }
    for name in MUST_PASS {
        if name == "cred-file" && d.status(name) == "WARN" {
            // Only when this test itself runs in a container without a volume for /tmp.
            assert!(
                d.line(name).contains("not on a mounted volume"),
                "{}",
                d.out
            );
            continue;
        }
        d.assert_status(name, "PASS");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_host_with_a_stored_credential_passes_every_check() {
    let h = Harness::start("doctor-ok").await;
    let credential = register(&h);
    std::fs::create_dir_all(h.cache_root()).unwrap();
    std::fs::write(h.cache_root().join("credential"), format!("{credential}\n")).unwrap();
    let d = doctor(healthy_env(&h)).await;
    assert_healthy(&d);
    assert!(
        d.line("credential").contains("credential file"),
        "{}",
        d.out
    );
    assert!(d.line("server").contains("Windshift"), "{}", d.out);
    assert!(d.line("image").contains("agent contract v1"), "{}", d.out);
    assert!(d.out.contains("doctor: "), "summary line: {}", d.out);
    assert!(
        !d.out.contains(&credential),
        "credential printed:\n{}",
        d.out
    );

    // The same credential injected through the environment.
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &credential);
    std::fs::remove_file(h.cache_root().join("credential")).unwrap();
    let d = doctor(env).await;
    assert_healthy(&d);
    assert!(
        d.line("credential").contains("WSRUNNER_CREDENTIAL"),
        "{}",
        d.out
    );
    assert!(
        !d.out.contains(&credential),
        "credential printed:\n{}",
        d.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_token_is_reported_but_never_spent() {
    let h = Harness::start("doctor-token").await;
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_REGISTRATION_TOKEN", &h.token);
    let d = doctor(env).await;
    assert_healthy(&d);
    assert!(
        d.line("credential").contains("will be used on first start"),
        "{}",
        d.out
    );
    assert!(!d.out.contains(&h.token), "token printed:\n{}", d.out);
    // Still single-use and unused: registering with it now works.
    register(&h);
    assert!(
        h.dev().core().instances().len() == 1,
        "doctor must not have registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_without_allow_insecure_fails_the_url_check() {
    let h = Harness::start("doctor-http").await;
    let mut env = healthy_env(&h);
    env.retain(|(k, _)| k != "WSRUNNER_ALLOW_INSECURE");
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("api-url", "FAIL");
    assert!(
        d.line("api-url").contains("WS_API_URL must be https://"),
        "{}",
        d.out
    );
    assert!(
        d.line("api-url").contains("WSRUNNER_ALLOW_INSECURE=1"),
        "{}",
        d.out
    );
    // The rest of the host is still checked.
    d.assert_status("docker", "PASS");
    d.assert_status("image", "PASS");
    // Which engine driver runs, and why.
    let driver = d.line("engine-driver");
    assert!(
        driver.contains("API driver on unix://") || driver.contains("CLI driver ("),
        "{}",
        d.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_the_server_check() {
    let h = Harness::start("doctor-unreachable").await;
    // A port nothing listens on: bind, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = healthy_env(&h);
    set(
        &mut env,
        "WS_API_URL",
        &format!("http://127.0.0.1:{port}/api"),
    );
    set(&mut env, "WSRUNNER_REGISTRATION_TOKEN", &h.token);
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("server", "FAIL");
    assert!(d.line("server").contains("cannot reach"), "{}", d.out);
    assert!(d.line("server").contains("fix:"), "{}", d.out);
    d.assert_status("credential", "SKIP");
    assert!(!d.out.contains(&h.token), "token printed:\n{}", d.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_credential_without_a_token_fails() {
    let h = Harness::start("doctor-badcred").await;
    let bogus = format!("wsrc_{}", "7".repeat(64));
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &bogus);
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("credential", "FAIL");
    let line = d.line("credential");
    assert!(
        line.contains("WSRUNNER_CREDENTIAL was rejected"),
        "{}",
        d.out
    );
    assert!(
        line.contains("WSRUNNER_REGISTRATION_TOKEN is not set"),
        "{}",
        d.out
    );
    assert!(!d.out.contains(&bogus), "credential printed:\n{}", d.out);

    // A revoked instance's stored credential is rejected the same way.
    let credential = register(&h);
    let instance = h.dev().core().instances()[0].id;
    h.dev().core().revoke_instance(instance).unwrap();
    std::fs::create_dir_all(h.cache_root()).unwrap();
    std::fs::write(h.cache_root().join("credential"), &credential).unwrap();
    let d = doctor(healthy_env(&h)).await;
    assert_eq!(d.code, 1, "{}", d.out);
    assert!(
        d.line("credential").contains("credential file")
            && d.line("credential").contains("rejected"),
        "{}",
        d.out
    );
    assert!(
        !d.out.contains(&credential),
        "credential printed:\n{}",
        d.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cache_dir_fails() {
    let h = Harness::start("doctor-cache").await;
    let credential = register(&h);
    // Tests run as root, so permissions alone cannot make a directory unwritable: put a
    // regular file where a directory of the path should be.
    let blocker = h.tmp.path().join("blocker");
    std::fs::write(&blocker, "not a directory").unwrap();
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &credential);
    set(
        &mut env,
        "WSRUNNER_CACHE_ROOT",
        &blocker.join("cache").display().to_string(),
    );
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("cache", "FAIL");
    assert!(d.line("cache").contains("is not writable"), "{}", d.out);
    assert!(d.line("cache").contains("WSRUNNER_CACHE_ROOT"), "{}", d.out);
    // The credential file lives under the cache root by default: it cannot persist either.
    d.assert_status("cred-file", "FAIL");
    assert!(
        d.line("cred-file")
            .contains("ask for a new token after every restart"),
        "{}",
        d.out
    );
    assert!(!blocker.join("cache").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_without_pulling() {
    let h = Harness::start("doctor-image").await;
    let credential = register(&h);
    let missing = format!("windshift-doctor-missing-{}:none", unique("img"));
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &credential);
    set(&mut env, "WSRUNNER_IMAGE", &missing);
    let d = doctor(env.clone()).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("image", "FAIL");
    assert!(d.line("image").contains("is not present"), "{}", d.out);
    assert!(d.line("image").contains("docker pull"), "{}", d.out);

    // An unlabelled image is refused unless allowed.
    set(&mut env, "WSRUNNER_IMAGE", "windshift-test-agent:unlabeled");
    let d = doctor(env.clone()).await;
    assert_eq!(d.code, 1, "{}", d.out);
    assert!(
        d.line("image")
            .contains("has no org.windshift.agent-contract label"),
        "{}",
        d.out
    );
    set(&mut env, "WSRUNNER_ALLOW_UNLABELED_IMAGE", "1");
    let d = doctor(env).await;
    d.assert_status("image", "WARN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_docker_cli_fails_and_skips_the_engine_checks() {
    let h = Harness::start("doctor-docker").await;
    let credential = register(&h);
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &credential);
    set(&mut env, "WSRUNNER_DOCKER", "/nonexistent/docker");
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("docker", "FAIL");
    assert!(d.line("docker").contains("WSRUNNER_DOCKER"), "{}", d.out);
    d.assert_status("image", "SKIP");
    d.assert_status("network", "SKIP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_held_by_a_running_runner_is_fine() {
    let h = Harness::start("doctor-held").await;
    let mut runner = h.runner(&[]);
    // Wait until the runner has opened its journal (and so holds sled's lock).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !journal_exists(&h.journal_dir()) || h.dev().core().instances().is_empty() {
        assert!(
            Instant::now() < deadline,
            "runner never started:\n{}",
            h.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = doctor(healthy_env(&h)).await;
    let _ = runner.kill();
    let _ = runner.wait();
    d.assert_status("journal", "PASS");
    assert!(
        d.line("journal").contains("held by a running runner"),
        "{}",
        d.out
    );
    // The runner stored its credential; doctor finds and accepts it.
    d.assert_status("credential", "PASS");
    assert_eq!(d.code, 0, "{}", d.out);

    // Stopped: the journal opens cleanly.
    let d = doctor(healthy_env(&h)).await;
    assert!(d.line("journal").contains("opens cleanly"), "{}", d.out);
}

fn journal_exists(dir: &Path) -> bool {
    dir.join("conf").exists() || dir.join("db").exists()
}

/// Option A hosts (the guide's `CODING_AGENT_*` names): doctor says which name supplied each
/// setting, uses them, and names the Option A variable when its value is bad. Without any
/// model id it warns that windshift-agent exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_a_names_are_used_and_reported() {
    let h = Harness::start("doctor-option-a").await;
    let credential = register(&h);
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &credential);
    let d = doctor(env.clone()).await;
    d.assert_status("llm-model", "WARN");
    assert!(
        d.line("llm-model").contains("exit with code 2"),
        "{}",
        d.out
    );
    assert!(
        d.line("llm-model").contains("WSRUNNER_LLM_MODEL"),
        "{}",
        d.out
    );
    assert!(
        d.line("settings").contains("image from WSRUNNER_IMAGE"),
        "{}",
        d.out
    );

    env.retain(|(k, _)| k != "WSRUNNER_IMAGE" && k != "WSRUNNER_NETWORK");
    set(&mut env, "CODING_AGENT_RUNNER_IMAGE", IMAGE);
    set(&mut env, "CODING_AGENT_NETWORK", "none");
    set(&mut env, "CODING_AGENT_LLM_MODEL", "model-from-option-a");
    set(&mut env, "WSRUNNER_MEMORY", "");
    set(&mut env, "CODING_AGENT_MEMORY", "512m");
    let d = doctor(env.clone()).await;
    assert_healthy(&d);
    let settings = d.line("settings");
    for want in [
        "image from CODING_AGENT_RUNNER_IMAGE",
        "network from CODING_AGENT_NETWORK",
        "memory from CODING_AGENT_MEMORY",
        "llm-model from CODING_AGENT_LLM_MODEL",
        "cache-root from WSRUNNER_CACHE_ROOT",
        "cpus default",
    ] {
        assert!(settings.contains(want), "{want}:\n{}", d.out);
    }
    d.assert_status("llm-model", "PASS");
    assert!(
        d.line("llm-model").contains("model-from-option-a"),
        "{}",
        d.out
    );
    // The image check looked at the Option A image.
    assert!(d.line("image").contains(IMAGE), "{}", d.out);

    set(&mut env, "CODING_AGENT_PIDS_LIMIT", "many");
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("config", "FAIL");
    assert!(
        d.line("config")
            .contains("invalid CODING_AGENT_PIDS_LIMIT \"many\""),
        "{}",
        d.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_root_others_can_write_fails() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::start("doctor-cache-perms").await;
    let credential = register(&h);
    std::fs::create_dir_all(h.cache_root()).unwrap();
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &credential);
    // Owned by the runner and 0750 (what start-up creates): passes.
    std::fs::set_permissions(h.cache_root(), std::fs::Permissions::from_mode(0o750)).unwrap();
    let d = doctor(env.clone()).await;
    d.assert_status("cache-perms", "PASS");
    std::fs::set_permissions(h.cache_root(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    d.assert_status("cache-perms", "FAIL");
    let line = d.line("cache-perms");
    assert!(line.contains("chmod 0750"), "{}", d.out);
    assert!(
        line.contains(&h.cache_root().display().to_string()),
        "{}",
        d.out
    );
    assert!(!d.out.contains(&credential), "{}", d.out);
}

/// Security issue 11: the `userns` line follows the host's /etc/passwd and the engine's
/// SecurityOptions exactly as the pure decision does; on a host whose uid 1000 is a login
/// account (this CI host's is) and no userns-remap, it warns and says how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_1000_login_account_without_userns_remap_warns() {
    let h = Harness::start("doctor-userns").await;
    let d = doctor(healthy_env(&h)).await;
    let passwd = std::fs::read_to_string("/etc/passwd").expect("passwd");
    let info = Command::new(engine_cli())
        .args(["info", "--format", "{{json .SecurityOptions}}"])
        .output()
        .expect("docker info");
    let security = String::from_utf8_lossy(&info.stdout).into_owned();
    let expected = windshift_runner::doctor::userns_decision(&passwd, &security);
    let line = d.line("userns");
    match windshift_runner::doctor::uid1000_login_account(&passwd) {
        Some(user) if !security.contains("name=userns") => {
            d.assert_status("userns", "WARN");
            assert!(line.contains(&user) && line.contains("environ"), "{line}");
            assert!(line.contains("userns-remap"), "{line}");
        }
        _ => d.assert_status("userns", "PASS"),
    }
    assert_eq!(
        d.status("userns"),
        expected.status.label(),
        "{line} vs {expected:?}"
    );
}

/// Security issue 11: an existing agent network whose containers can reach each other warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_network_with_inter_container_traffic_warns() {
    let h = Harness::start("doctor-icc").await;
    let name = unique("wsr-doctor-icc");
    let out = Command::new(engine_cli())
        .args(["network", "create", &name])
        .output()
        .expect("network create");
    assert!(out.status.success(), "{out:?}");
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_NETWORK", &name);
    let d = doctor(env).await;
    let _ = Command::new(engine_cli())
        .args(["network", "rm", &name])
        .output();
    d.assert_status("network", "WARN");
    assert!(
        d.line("network").contains("allows inter-container traffic")
            && d.line("network").contains("enable_icc=false"),
        "{}",
        d.out
    );
}

/// The `disk-*` lines: what the caches, checkouts, journal, container logs and agent images
/// use, the cache cap and the free-space threshold (docs/deploy.md, "Disk"). A bare cache of
/// 1 MiB and a run checkout of 2 MiB under it; a journal file of 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_what_uses_the_disk_and_warns_below_the_threshold() {
    let h = Harness::start("doctor-disk").await;
    let credential = register(&h);
    let repo = h.cache_root().join("1/acme/app");
    std::fs::create_dir_all(repo.join(".bare")).unwrap();
    std::fs::create_dir_all(repo.join("runs/5")).unwrap();
    std::fs::write(repo.join(".bare/pack"), vec![7u8; 1 << 20]).unwrap();
    std::fs::write(repo.join("runs/5/big"), vec![7u8; 2 << 20]).unwrap();
    std::fs::create_dir_all(h.journal_dir()).unwrap();
    std::fs::write(h.journal_dir().join("blob"), vec![7u8; 1 << 20]).unwrap();
    let mut env = healthy_env(&h);
    set(&mut env, "WSRUNNER_CREDENTIAL", &credential);
    set(
        &mut env,
        "WSRUNNER_ALLOWED_IMAGES",
        "windshift-test-agent:v0",
    );
    let d = doctor(env.clone()).await;
    assert_healthy(&d);
    let caches = d.line("disk-caches");
    assert!(
        caches.contains("use 1.0 MiB") && caches.contains("WSRUNNER_CACHE_MAX_BYTES is off"),
        "{}",
        d.out
    );
    assert!(d.line("disk-checkouts").contains("2.0 MiB"), "{}", d.out);
    assert!(d.line("disk-journal").contains("uses 1.0 MiB"), "{}", d.out);
    d.assert_status("disk-logs", "PASS");
    let images = d.line("disk-images");
    assert!(
        images.contains(&format!("{IMAGE} ")) && images.contains("(default, never pruned)"),
        "{}",
        d.out
    );
    assert!(
        images.contains("windshift-test-agent:v0") && images.contains("(override)"),
        "{}",
        d.out
    );
    assert!(
        images.contains("never pruned (WSRUNNER_IMAGE_PRUNE_AFTER is off)"),
        "{images}"
    );

    // Over the cache cap, and below the free-space threshold: warnings naming the settings.
    set(&mut env, "WSRUNNER_CACHE_MAX_BYTES", "512k");
    set(&mut env, "WSRUNNER_DISK_FREE_WARN", "1000000g");
    set(&mut env, "WSRUNNER_IMAGE_PRUNE_AFTER", "72h");
    let d = doctor(env.clone()).await;
    d.assert_status("disk-caches", "WARN");
    assert!(
        d.line("disk-caches")
            .contains("above WSRUNNER_CACHE_MAX_BYTES (512.0 KiB)"),
        "{}",
        d.out
    );
    for name in ["cache", "journal-dir"] {
        d.assert_status(name, "WARN");
        assert!(
            d.line(name).contains("WSRUNNER_DISK_FREE_WARN"),
            "{}",
            d.out
        );
    }
    assert!(
        d.line("disk-images").contains("after 72h unused"),
        "{}",
        d.out
    );
    assert_eq!(d.code, 0, "warnings only: {}", d.out);

    // A byte count that is not one is refused, naming the variable.
    set(&mut env, "WSRUNNER_CACHE_MAX_BYTES", "lots");
    let d = doctor(env).await;
    assert_eq!(d.code, 1, "{}", d.out);
    assert!(d.out.contains("WSRUNNER_CACHE_MAX_BYTES"), "{}", d.out);
}
