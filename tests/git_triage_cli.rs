//! `windshift-triage` as the runner calls it (spec 4.10): flags, exit codes, JSON output.

mod git_support;

use std::path::Path;
use std::process::{Command, Output};

use git_support::{commit_file, git, Origin};

fn triage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_windshift-triage"))
        .args(args)
        .env_remove("WSRUNNER_ALLOW_INSECURE")
        .output()
        .expect("run windshift-triage")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_or_unknown_subcommand_exits_1() {
    for args in [&[][..], &["clone"][..]] {
        let out = triage(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).starts_with("windshift-triage: "),
            "{}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn flag_parse_errors_exit_2_and_help_exits_0() {
    for args in [
        &["prepare", "--no-such-flag", "x"][..],
        &["prepare", "--run-id", "twelve"][..],
        &["prepare", "--root"][..],
        &["push", "--allow-file-url=perhaps"][..],
        &["push", "--proxy-url"][..],
    ] {
        let out = triage(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let out = triage(&["push", "-h"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("-skip-if-head"));
}

#[test]
fn runtime_errors_exit_1_naming_the_problem() {
    for (args, needle) in [
        (&["prepare"][..], "--root"),
        (
            &["prepare", "--root", "/tmp/x", "--repo", "a/b"][..],
            "--workspace-id",
        ),
        (
            &[
                "prepare",
                "--root",
                "/tmp/x",
                "--workspace-id",
                "1",
                "--run-id",
                "1",
                "--repo",
                "a/../b",
                "--remote-url",
                "https://h/x",
            ][..],
            "--repo",
        ),
        (
            &[
                "push",
                "--git-transport",
                "proxy",
                "--dest",
                "/x",
                "--branch",
                "b",
            ][..],
            "--proxy-url",
        ),
        (
            &["push", "--dest", "/x", "--branch", "b"][..],
            "--remote-url",
        ),
        (
            &["push", "--git-transport", "carrier-pigeon"][..],
            "--git-transport",
        ),
    ] {
        let out = triage(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(err.starts_with("windshift-triage: "), "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn prepare_then_push_print_the_upstream_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "  some-run-token-value\n").expect("token");
    let url = origin.file_url();
    let root_s = root.to_str().expect("utf8");
    let token_s = token_file.to_str().expect("utf8");

    let out = triage(&[
        "prepare",
        "-root",
        root_s,
        "--workspace-id=4",
        "--repo",
        "acme/widgets",
        "--remote-url",
        &url,
        "--run-id",
        "77",
        "--token-file",
        token_s,
        "--git-transport",
        "proxy",
        "--allow-file-url",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    assert!(stdout.ends_with('\n') && stdout.lines().count() == 1);
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let obj = json.as_object().expect("object");
    assert_eq!(
        obj.keys().map(String::as_str).collect::<Vec<_>>(),
        ["base_commit", "branch", "checkout_path"]
    );
    let base = origin.sha("refs/heads/main").expect("main");
    assert_eq!(json["base_commit"], base.as_str());
    assert_eq!(json["branch"], "agent-runs/run-77");
    let checkout = root.join("4/acme/widgets/runs/77");
    assert_eq!(json["checkout_path"], checkout.to_str().expect("utf8"));

    let push = |extra: &[&str]| {
        let mut args = vec![
            "push",
            "--dest",
            checkout.to_str().expect("utf8"),
            "--branch",
            "agent-runs/run-77",
            "--token-file",
            token_s,
            "--git-transport",
            "proxy",
            "--proxy-url",
            &url,
            "--skip-if-head",
            &base,
            "--allow-file-url",
        ];
        args.extend_from_slice(extra);
        triage(&args)
    };
    let skipped = push(&[]);
    assert_eq!(skipped.status.code(), Some(0), "{}", stderr(&skipped));
    assert_eq!(
        String::from_utf8_lossy(&skipped.stdout),
        "{\"head_sha\":\"\",\"skipped\":true}\n"
    );

    git(&checkout, &["config", "user.name", "agent"]);
    git(
        &checkout,
        &["config", "user.email", "agent@example.invalid"],
    );
    let commit = commit_file(&checkout, "work.txt", "done\n");
    for _ in 0..2 {
        let pushed = push(&[]);
        assert_eq!(pushed.status.code(), Some(0), "{}", stderr(&pushed));
        assert_eq!(
            String::from_utf8_lossy(&pushed.stdout),
            format!("{{\"head_sha\":\"{commit}\",\"skipped\":false}}\n")
        );
    }
    assert_eq!(origin.sha("refs/heads/agent-runs/run-77"), Some(commit));
    let config = std::fs::read_to_string(Path::new(&checkout).join(".git/config")).expect("config");
    assert!(!config.contains("some-run-token-value"));
}

#[test]
fn file_remotes_need_allow_file_url() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let out = triage(&[
        "prepare",
        "--root",
        root.to_str().expect("utf8"),
        "--workspace-id",
        "4",
        "--repo",
        "acme/widgets",
        "--remote-url",
        &origin.file_url(),
        "--run-id",
        "78",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--allow-file-url"),
        "{}",
        stderr(&out)
    );
    assert!(!root.exists());
}
