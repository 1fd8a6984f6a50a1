//! Sandbox facts seen from inside the container (the test agent's probe), and the escape
//! attempts of the test agent: each fails, and nothing outside the checkout changes.

mod container_support;

use container_support::*;
use std::time::Duration;
use windshift_runner::effects::container::LaunchKind;

const GRACE: Duration = Duration::from_secs(3);

fn list_dir(path: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(path)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

/// The container's root filesystem changes, without the mount points Podman itself adds to
/// every container before it starts (`/etc` for hosts/resolv.conf, `/var/tmp`): those are
/// the engine's, not the agent's. Docker adds only the mount point of its init
/// (`/sbin/docker-init`, present when the API driver asks for the engine's init).
fn docker_diff(name: &str) -> String {
    let out = engine_command()
        .args(["diff", name])
        .output()
        .expect("docker diff");
    let podman_made = [
        "C /etc",
        "A /var",
        "A /var/tmp",
        "C /var",
        "A /run",
        "C /run",
    ];
    let docker_init = ["A /sbin", "C /sbin", "A /sbin/docker-init"];
    let engine_made = |l: &str| {
        if engine_cli() == "podman" {
            podman_made.contains(&l)
        } else {
            docker_init.contains(&l)
        }
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !engine_made(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn probe_sees_the_hardened_sandbox() {
    let (engine, _cleanup) = test_engine(&unique_instance("probe"));
    let co = checkout();
    let driven = run_script(
        &engine,
        &spec(201, LaunchKind::CodingAgent, Some(&co.path)),
        "probe connect=10.255.255.1:80; finish completed",
        GRACE,
    )
    .await;
    let probes = driven.of_type("probe");
    assert_eq!(probes.len(), 1, "{:?}", driven.outputs);
    let p = &probes[0];
    assert_eq!(p["uid"], 1000);
    assert_eq!(p["gid"], 1000);
    assert_eq!(p["cap_eff"], "0000000000000000", "no capabilities");
    assert_eq!(p["no_new_privs"], "1");
    assert_eq!(p["cwd"], "/workspace");
    assert_eq!(p["home"], "/home/agent");
    assert_eq!(p["root"]["writable"], false, "read-only root: {p}");
    assert_eq!(p["tmp"]["writable"], true, "/tmp tmpfs: {p}");
    assert_eq!(p["home_dir"]["writable"], true, "/home/agent tmpfs: {p}");
    assert_eq!(p["workspace"]["writable"], true, "the checkout: {p}");
    let mounts = p["mounts"].as_array().expect("mounts");
    for target in ["/tmp", "/home/agent"] {
        assert!(
            mounts
                .iter()
                .any(|m| m["target"] == target && m["fstype"] == "tmpfs"),
            "{target} is a tmpfs: {mounts:?}"
        );
    }
    assert_eq!(p["interfaces"], serde_json::json!(["lo"]), "--network none");
    assert_eq!(p["connect"]["connected"], false);
    assert_eq!(p["pids_max"], "64");
    assert_eq!(p["memory_max"], (256u64 << 20).to_string());
    assert_eq!(
        p["memory_swap_max"],
        (256u64 << 20).to_string(),
        "no swap beyond memory"
    );
}

#[tokio::test]
async fn writes_outside_the_checkout_fail_and_change_nothing() {
    let (engine, _cleanup) = test_engine(&unique_instance("escape-write"));
    let co = checkout();
    let parent_before = list_dir(co.root.path());
    let driven = run_script(
        &engine,
        &spec(202, LaunchKind::CodingAgent, Some(&co.path)),
        "write /etc/passwd; write /outside.txt; write /workspace/../escape.txt; write /usr/local/bin/git; write /proc/sys/kernel/hostname; finish completed",
        GRACE,
    )
    .await;
    let escapes = driven.of_type("escape");
    assert_eq!(escapes.len(), 5, "{escapes:?}");
    for e in &escapes {
        assert_eq!(e["succeeded"], false, "escape succeeded: {e}");
    }
    assert_eq!(
        list_dir(co.root.path()),
        parent_before,
        "nothing new beside the checkout"
    );
    assert_eq!(
        docker_diff(&driven.name),
        "",
        "the container filesystem is unchanged"
    );
    assert_eq!(git(&co.path, &["status", "--porcelain"]), "");
}

#[tokio::test]
async fn fork_bomb_hits_the_pids_limit() {
    let (engine, _cleanup) = test_engine(&unique_instance("escape-fork"));
    let driven = run_script(
        &engine,
        &spec(203, LaunchKind::CodingAgent, None),
        "forkbomb max=1000; finish completed",
        GRACE,
    )
    .await;
    let escapes = driven.of_type("escape");
    assert_eq!(escapes.len(), 1, "{:?}", driven.outputs);
    let e = &escapes[0];
    assert_eq!(e["succeeded"], false, "{e}");
    let spawned = e["spawned"].as_u64().expect("spawned count");
    assert!(spawned < 64, "pids limit 64, spawned {spawned}");
    assert!(e["error"].is_string());
    // The agent survived its own fork bomb and finished normally.
    assert_eq!(driven.result.judged_exit_code(), Some(0));
}

#[tokio::test]
async fn memory_beyond_the_limit_is_refused() {
    let (engine, _cleanup) = test_engine(&unique_instance("escape-mem"));
    let driven = run_script(
        &engine,
        &spec(204, LaunchKind::CodingAgent, None),
        "alloc 1024; finish completed",
        GRACE,
    )
    .await;
    assert!(
        !driven
            .of_type("escape")
            .iter()
            .any(|e| e["succeeded"] == true),
        "allocated past the limit: {:?}",
        driven.of_type("escape")
    );
    let reached = driven
        .of_type("alloc_progress")
        .iter()
        .filter_map(|p| p["mib"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(reached < 256, "got {reached} MiB with a 256 MiB limit");
    assert_eq!(driven.result.exit_code, Some(137), "the kernel kills it");
    // Podman on this cgroup-v1 host reports OOMKilled=false for the same kernel kill (exit 137
    // with the memory limit hit); the runner never relies on the flag (docs/containers.md).
    if engine_cli() == "docker" {
        assert!(driven.result.oom_killed, "{:?}", driven.result);
    }
}

#[tokio::test]
async fn planted_hook_and_insteadof_stay_inside_the_checkout() {
    let (engine, _cleanup) = test_engine(&unique_instance("escape-git"));
    let co = checkout();
    let parent_before = list_dir(co.root.path());
    let driven = run_script(
        &engine,
        &spec(205, LaunchKind::CodingAgent, Some(&co.path)),
        "plant-hook name=pre-push; plant-insteadof https://evil.invalid/; finish completed",
        GRACE,
    )
    .await;
    let escapes = driven.of_type("escape");
    assert_eq!(escapes.len(), 2, "{escapes:?}");
    // Both writes land, but only in the checkout the git side never trusts (issue 4, Git).
    let hook = co.path.join(".git/hooks/pre-push");
    assert!(hook.exists(), "hook written into the checkout");
    let config = std::fs::read_to_string(co.path.join(".git/config")).expect("config");
    assert!(config.contains("insteadOf = https://"), "{config}");
    assert_eq!(list_dir(co.root.path()), parent_before);
    assert_eq!(docker_diff(&driven.name), "");
    assert!(!std::path::Path::new("/tmp/windshift-planted-hook-ran").exists());
}
