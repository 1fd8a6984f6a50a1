//! deploy/install.sh and deploy/windshift-runner.service, exercised for real in a throwaway
//! root: installed twice (idempotent), verified by systemd-analyze, uninstalled.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A throwaway root with the user database files useradd needs and a docker group.
fn fake_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    fs::create_dir_all(&etc).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        fs::write(etc.join(f), "").unwrap();
    }
    let out = Command::new("groupadd")
        .args(["--root"])
        .arg(root.path())
        .args(["--system", "docker"])
        .output()
        .expect("groupadd runs");
    assert!(out.status.success(), "groupadd: {out:?}");
    root
}

fn bin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in [
        ("windshift-runner", env!("CARGO_BIN_EXE_windshift-runner")),
        ("windshift-triage", env!("CARGO_BIN_EXE_windshift-triage")),
    ] {
        fs::copy(path, dir.path().join(name)).unwrap();
    }
    dir
}

fn install(root: &Path, extra: &[&str]) -> std::process::Output {
    let bins = bin_dir();
    Command::new("bash")
        .arg(repo().join("deploy/install.sh"))
        .arg("--root")
        .arg(root)
        .arg("--bin-dir")
        .arg(bins.path())
        .args(extra)
        .output()
        .expect("install.sh runs")
}

/// The enable symlink points at /etc/… of the target root, so test the link itself.
fn is_enabled(root: &Path) -> bool {
    root.join("etc/systemd/system/multi-user.target.wants/windshift-runner.service")
        .symlink_metadata()
        .is_ok()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn assert_root_user() {
    // install.sh refuses to run without root, as upstream's does.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "deploy tests need root (CI and the dev machines run as root)"
    );
}

#[test]
fn install_twice_is_idempotent_and_keeps_runner_env() {
    assert_root_user();
    let root = fake_root();
    let r = root.path();
    let first = install(r, &[]);
    assert!(first.status.success(), "first install: {first:?}");

    let env_file = r.join("etc/windshift-runner/runner.env");
    let unit = r.join("etc/systemd/system/windshift-runner.service");
    let state = r.join("var/lib/windshift-runner");
    assert_eq!(mode(&r.join("usr/local/bin/windshift-runner")), 0o755);
    assert_eq!(mode(&r.join("usr/local/bin/windshift-triage")), 0o755);
    assert_eq!(mode(&env_file), 0o640);
    for dir in [state.clone(), state.join("cache"), state.join("journal")] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let passwd = fs::read_to_string(r.join("etc/passwd")).unwrap();
    let uid: u32 = passwd
        .lines()
        .find(|l| l.starts_with("windshift-runner:"))
        .and_then(|l| l.split(':').nth(2))
        .and_then(|u| u.parse().ok())
        .expect("service user created");
    assert_eq!(fs::metadata(&state).unwrap().uid(), uid);
    let group = fs::read_to_string(r.join("etc/group")).unwrap();
    assert!(
        group
            .lines()
            .any(|l| l.starts_with("docker:") && l.ends_with("windshift-runner")),
        "user is in the docker group: {group}"
    );
    let unit_text = fs::read_to_string(&unit).unwrap();
    assert!(unit_text.contains("ExecStart=/usr/local/bin/windshift-runner run"));
    assert!(!unit_text.contains('@'), "placeholders substituted");
    assert!(is_enabled(r));

    // The operator edits runner.env; a re-run (upgrade) must keep it and change nothing else.
    fs::write(&env_file, "WS_API_URL=https://edited.example/api\n").unwrap();
    let second = install(r, &[]);
    assert!(second.status.success(), "second install: {second:?}");
    assert_eq!(
        fs::read_to_string(&env_file).unwrap(),
        "WS_API_URL=https://edited.example/api\n"
    );
    assert_eq!(fs::read_to_string(&unit).unwrap(), unit_text);
    let passwd2 = fs::read_to_string(r.join("etc/passwd")).unwrap();
    assert_eq!(
        passwd2
            .lines()
            .filter(|l| l.starts_with("windshift-runner:"))
            .count(),
        1,
        "user not duplicated"
    );
}

#[test]
fn no_enable_installs_without_enabling() {
    assert_root_user();
    let root = fake_root();
    let out = install(root.path(), &["--no-enable"]);
    assert!(out.status.success(), "{out:?}");
    assert!(root
        .path()
        .join("etc/systemd/system/windshift-runner.service")
        .exists());
    assert!(!is_enabled(root.path()));
}

#[test]
fn uninstall_removes_unit_and_binaries_and_purge_removes_state() {
    assert_root_user();
    let root = fake_root();
    let r = root.path();
    assert!(install(r, &[]).status.success());
    let out = Command::new("bash")
        .arg(repo().join("deploy/install.sh"))
        .arg("--root")
        .arg(r)
        .arg("--uninstall")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!r
        .join("etc/systemd/system/windshift-runner.service")
        .exists());
    assert!(!is_enabled(r));
    assert!(!r.join("usr/local/bin/windshift-runner").exists());
    assert!(
        r.join("etc/windshift-runner/runner.env").exists(),
        "config kept"
    );
    assert!(r.join("var/lib/windshift-runner").exists(), "state kept");

    let out = Command::new("bash")
        .arg(repo().join("deploy/install.sh"))
        .arg("--root")
        .arg(r)
        .args(["--uninstall", "--purge"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!r.join("etc/windshift-runner").exists());
    assert!(!r.join("var/lib/windshift-runner").exists());
}

#[test]
fn bad_arguments_are_refused_with_the_reason() {
    assert_root_user();
    let root = fake_root();
    let out = install(root.path(), &["--prefix", "relative/bin"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prefix must be absolute"));
    let out = Command::new("bash")
        .arg(repo().join("deploy/install.sh"))
        .arg("--root")
        .arg(root.path())
        .arg("--bin-dir")
        .arg(root.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("windshift-runner is missing"));
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    assert_root_user();
    let root = fake_root();
    let r = root.path();
    assert!(install(r, &[]).status.success());
    // Point ExecStart at the installed binary inside the throwaway root, so verify can check
    // that the command exists; everything else is verified as installed.
    let unit = fs::read_to_string(r.join("etc/systemd/system/windshift-runner.service")).unwrap();
    let bin = r.join("usr/local/bin");
    let rendered = unit.replace("/usr/local/bin", &bin.display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("windshift-runner.service");
    fs::write(&path, rendered).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (.ci/run installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
