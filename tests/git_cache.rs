//! Prepare, the bare cache's crash and concurrency recovery, eviction and multi-repo
//! workspaces, all against real git repositories (file:// remotes, allowed for tests).

mod git_support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use git_support::{git, Origin};
use windshift_runner::effects::git::{
    disk_use, evict, evict_idle, prepare, prepare_run_workspace, remove_run_workspace, CacheLock,
    GitError, PrepareRequest, RepoCache, RunRepo, RunWorkspaceRequest, TransportPolicy, WsToml,
};

const FILE_OK: TransportPolicy = TransportPolicy {
    allow_file_url: true,
    allow_insecure_http: false,
};

fn request(root: &Path, origin: &Origin, slug: &str, run_id: i64) -> PrepareRequest {
    PrepareRequest {
        root: root.to_string_lossy().into_owned(),
        workspace_id: 7,
        slug: slug.into(),
        remote_url: origin.file_url(),
        run_id,
        policy: FILE_OK,
        ..PrepareRequest::default()
    }
}

fn head_of(checkout: &Path) -> String {
    git(checkout, &["rev-parse", "HEAD"])
}

#[test]
fn prepare_from_a_cold_then_a_warm_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let first_main = origin.sha("refs/heads/main").expect("main");

    let out = prepare(&request(&root, &origin, "acme/widgets", 1)).expect("cold prepare");
    let cache = RepoCache::new(&root, 7, "acme", "widgets");
    assert_eq!(out.checkout_path, cache.run_checkout(1));
    assert_eq!(out.branch, "agent-runs/run-1");
    assert_eq!(out.base_commit, first_main);
    assert_eq!(head_of(&out.checkout_path), first_main);
    assert_eq!(
        git(&out.checkout_path, &["symbolic-ref", "HEAD"]),
        "refs/heads/agent-runs/run-1"
    );
    assert_eq!(
        git(&out.checkout_path, &["remote", "get-url", "origin"]),
        origin.file_url()
    );
    assert_eq!(
        std::fs::read_to_string(out.checkout_path.join("README.md")).expect("file"),
        "hello\n"
    );
    assert_eq!(
        git(&cache.bare(), &["config", "gc.auto"]),
        "0",
        "the cache never auto-gcs under a running prepare"
    );
    // Handed to the container user, all the way down.
    for p in [
        out.checkout_path.clone(),
        out.checkout_path.join(".git/config"),
    ] {
        let m = std::fs::metadata(&p).expect("stat");
        assert_eq!((m.uid(), m.gid()), (1000, 1000), "{}", p.display());
    }
    let bare_inode = std::fs::metadata(cache.bare()).expect("bare").ino();

    let second_main = origin.advance("main", "src.txt", "v2\n");
    let out2 = prepare(&request(&root, &origin, "acme/widgets", 2)).expect("warm prepare");
    assert_eq!(out2.base_commit, second_main);
    assert_eq!(head_of(&out2.checkout_path), second_main);
    assert_eq!(
        std::fs::metadata(cache.bare()).expect("bare").ino(),
        bare_inode,
        "a warm prepare fetches into the existing cache"
    );
    // Run 1's checkout is untouched by run 2.
    assert_eq!(head_of(&out.checkout_path), first_main);

    // A repeat of the same run (after a crash) starts from a clean checkout.
    std::fs::write(out2.checkout_path.join("junk"), "x").expect("junk");
    let again = prepare(&request(&root, &origin, "acme/widgets", 2)).expect("repeat");
    assert_eq!(again, out2);
    assert!(!again.checkout_path.join("junk").exists());
}

#[test]
fn continuation_branch_is_fetched_and_checked_out() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let pr_head = origin.advance("feature/pr-9", "pr.txt", "pr\n");
    let root = tmp.path().join("cache");
    let req = PrepareRequest {
        continue_branch: "feature/pr-9".into(),
        ..request(&root, &origin, "acme/widgets", 3)
    };
    let out = prepare(&req).expect("prepare");
    assert_eq!(out.branch, "feature/pr-9");
    assert_eq!(out.base_commit, pr_head);
    assert_eq!(head_of(&out.checkout_path), pr_head);
}

#[test]
fn a_missing_branch_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let req = PrepareRequest {
        base_ref: "does-not-exist".into(),
        ..request(&root, &origin, "acme/widgets", 4)
    };
    let err = prepare(&req).expect_err("no such branch");
    assert!(
        matches!(&err, GitError::RemoteBranchMissing { branch, .. } if branch == "does-not-exist"),
        "{err}"
    );
}

#[test]
fn invalid_input_is_rejected_before_touching_disk() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    for (req, field) in [
        (request(&root, &origin, "acme/../etc", 5), "--repo"),
        (
            PrepareRequest {
                continue_branch: "--upload-pack=evil".into(),
                ..request(&root, &origin, "acme/w", 5)
            },
            "--continue-branch",
        ),
        (
            PrepareRequest {
                policy: TransportPolicy::default(),
                ..request(&root, &origin, "acme/w", 5)
            },
            "--remote-url",
        ),
    ] {
        match prepare(&req) {
            Err(GitError::Invalid(v)) => assert_eq!(v.field, field),
            other => panic!("expected an input error for {field}, got {other:?}"),
        }
    }
    assert!(!root.exists(), "nothing was created");
}

#[test]
fn two_processes_preparing_the_same_repo_at_once_both_succeed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let spawn = |run_id: &str| {
        Command::new(env!("CARGO_BIN_EXE_windshift-triage"))
            .args(["prepare", "--root"])
            .arg(&root)
            .args([
                "--workspace-id",
                "7",
                "--repo",
                "acme/widgets",
                "--run-id",
                run_id,
            ])
            .args(["--remote-url", &origin.file_url(), "--allow-file-url"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn triage")
    };
    let (a, b) = (spawn("11"), spawn("12"));
    let main = origin.sha("refs/heads/main").expect("main");
    for (child, run) in [(a, 11), (b, 12)] {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(json["base_commit"], main.as_str());
        assert_eq!(json["branch"], format!("agent-runs/run-{run}"));
    }
    let cache = RepoCache::new(&root, 7, "acme", "widgets");
    let leftovers: Vec<String> = std::fs::read_dir(cache.dir())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".bare."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_half_cloned_cache_from_a_killed_process_is_repaired() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let cache = RepoCache::new(&root, 7, "acme", "widgets");
    // A clone interrupted mid-way: a temp dir with partial content, and a `.bare` that a
    // killed upstream-style clone left without HEAD.
    let tmp_clone = cache.dir().join(".bare.tmp-99999-1");
    std::fs::create_dir_all(tmp_clone.join("objects")).expect("tmp clone");
    std::fs::create_dir_all(cache.bare().join("objects/pack")).expect("headless bare");
    std::fs::write(cache.bare().join("objects/pack/partial.pack"), "garbage").expect("pack");

    let out = prepare(&request(&root, &origin, "acme/widgets", 21)).expect("repaired");
    assert_eq!(Some(out.base_commit), origin.sha("refs/heads/main"));
    assert!(cache.bare().join("HEAD").is_file());
    assert!(!tmp_clone.exists());
    assert!(!cache.bare().join("objects/pack/partial.pack").exists());
}

#[test]
fn stale_git_locks_left_by_a_killed_process_are_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let cache = RepoCache::new(&root, 7, "acme", "widgets");
    prepare(&request(&root, &origin, "acme/widgets", 31)).expect("warm up");
    let new_main = origin.advance("main", "a.txt", "a\n");
    let locks = [
        cache.bare().join("refs/heads/main.lock"),
        cache.bare().join("packed-refs.lock"),
        cache.bare().join("config.lock"),
        cache.bare().join("index.lock"),
    ];
    for l in &locks {
        std::fs::write(l, "").expect("plant lock");
    }
    let bare_inode = std::fs::metadata(cache.bare()).expect("bare").ino();
    // Without the cleanup, updating refs/heads/main would fail on main.lock.
    let out = prepare(&request(&root, &origin, "acme/widgets", 32)).expect("prepare");
    assert_eq!(out.base_commit, new_main);
    for l in &locks {
        assert!(!l.exists(), "{} still there", l.display());
    }
    assert_eq!(
        std::fs::metadata(cache.bare()).expect("bare").ino(),
        bare_inode,
        "the locks were cleaned, not papered over by a re-clone"
    );
}

#[test]
fn a_cache_that_fails_to_fetch_is_recloned_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let cache = RepoCache::new(&root, 7, "acme", "widgets");
    prepare(&request(&root, &origin, "acme/widgets", 41)).expect("warm up");
    let new_main = origin.advance("main", "b.txt", "b\n");
    // Corrupt the cache: its config is unparsable, so every git command in it fails.
    std::fs::write(
        cache.bare().join("config"),
        "[core\nthis is not git config\n",
    )
    .expect("corrupt");
    let out = prepare(&request(&root, &origin, "acme/widgets", 42)).expect("recovered");
    assert_eq!(out.base_commit, new_main);
    assert_eq!(git(&cache.bare(), &["config", "gc.auto"]), "0");
}

#[test]
fn eviction_removes_only_idle_caches() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let idle = prepare(&request(&root, &origin, "acme/idle", 51)).expect("idle");
    std::fs::remove_dir_all(&idle.checkout_path).expect("run over");
    prepare(&request(&root, &origin, "acme/in-use", 52)).expect("in use");
    prepare(&request(&root, &origin, "acme/locked", 53)).expect("locked");
    let locked = RepoCache::new(&root, 7, "acme", "locked");
    std::fs::remove_dir_all(locked.run_checkout(53)).expect("run over");
    let held = CacheLock::acquire(&locked.lock_path(), Duration::from_secs(5)).expect("hold");
    std::fs::create_dir_all(root.join(".workspaces/run-99")).expect("ws dir");

    let max_age = Duration::from_secs(7 * 24 * 3600);
    // Right now nothing is old enough.
    let report = evict_idle(&root, max_age, SystemTime::now()).expect("evict");
    assert!(report.removed.is_empty(), "{report:?}");

    let later = SystemTime::now() + max_age + Duration::from_secs(3600);
    let report = evict_idle(&root, max_age, later).expect("evict");
    let idle_cache = RepoCache::new(&root, 7, "acme", "idle");
    let in_use = RepoCache::new(&root, 7, "acme", "in-use");
    assert_eq!(report.removed, vec![idle_cache.dir().to_owned()]);
    assert_eq!(report.busy, vec![locked.dir().to_owned()]);
    assert_eq!(report.kept, vec![in_use.dir().to_owned()]);
    assert!(!idle_cache.dir().exists());
    assert!(in_use.bare().join("HEAD").exists());
    assert!(locked.bare().join("HEAD").exists());
    assert!(
        root.join(".workspaces/run-99").exists(),
        "non-cache dirs are left alone"
    );
    drop(held);

    // An evicted repo is simply cloned again next time.
    let again = prepare(&request(&root, &origin, "acme/idle", 54)).expect("re-clone");
    assert_eq!(Some(again.base_commit), origin.sha("refs/heads/main"));
}

#[test]
fn a_multi_repo_workspace_gets_sibling_dirs_and_ws_toml_everywhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let api = Origin::create(tmp.path(), "api.git");
    let api_fork = Origin::create(tmp.path(), "api-fork.git");
    let web = Origin::create(tmp.path(), "web.git");
    let root = tmp.path().join("cache");
    let repo = |slug: &str, o: &Origin| RunRepo {
        workspace_id: 7,
        slug: slug.into(),
        base_ref: "main".into(),
        continue_branch: String::new(),
        remote_url: o.file_url(),
    };
    let cfg = WsToml {
        server_url: "https://ws.example".into(),
        workspace_key: Some("ACME".into()),
    };
    let req = RunWorkspaceRequest {
        root: root.to_string_lossy().into_owned(),
        run_id: 61,
        repos: vec![
            repo("acme/api", &api),
            repo("other/api", &api_fork),
            repo("acme/web", &web),
        ],
        policy: FILE_OK,
        ws_toml: Some(cfg.clone()),
        ..RunWorkspaceRequest::default()
    };
    let ws = prepare_run_workspace(&req).expect("workspace");
    let ws_root = root.join(".workspaces/run-61");
    assert!(ws.multi_repo);
    assert_eq!(ws.mount_path, ws_root);
    let dirs: Vec<_> = ws
        .repos
        .iter()
        .map(|r| r.output.checkout_path.clone())
        .collect();
    assert_eq!(
        dirs,
        vec![
            ws_root.join("api"),
            ws_root.join("api-2"),
            ws_root.join("web")
        ]
    );
    for (r, origin) in ws.repos.iter().zip([&api, &api_fork, &web]) {
        assert_eq!(
            Some(r.output.base_commit.clone()),
            origin.sha("refs/heads/main")
        );
        assert_eq!(r.output.branch, "agent-runs/run-61");
        assert_eq!(
            std::fs::read_to_string(r.output.checkout_path.join("ws.toml")).expect("ws.toml"),
            cfg.render()
        );
    }
    assert_eq!(
        std::fs::read_to_string(ws_root.join("ws.toml")).expect("root ws.toml"),
        cfg.render()
    );
    assert_eq!(std::fs::metadata(&ws_root).expect("root").uid(), 1000);

    // Preparing again (a retry) rebuilds the same workspace.
    let again = prepare_run_workspace(&req).expect("again");
    assert_eq!(again, ws);
    remove_run_workspace(&ws).expect("remove");
    assert!(!ws_root.exists());

    // A single-repo run mounts the checkout itself.
    let single = prepare_run_workspace(&RunWorkspaceRequest {
        repos: vec![repo("acme/web", &web)],
        run_id: 62,
        ..req
    })
    .expect("single");
    assert!(!single.multi_repo);
    assert_eq!(
        single.mount_path,
        RepoCache::new(&root, 7, "acme", "web").run_checkout(62)
    );
    assert!(single.mount_path.join("ws.toml").is_file());
}

#[test]
fn prepare_waits_for_the_cache_lock_held_by_another_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let cache = RepoCache::new(&root, 7, "acme", "widgets");
    // flock locks belong to an open file description, so this holder conflicts with
    // prepare's own open exactly as another process would.
    let held = CacheLock::acquire(&cache.lock_path(), Duration::from_secs(5)).expect("hold");
    let req = PrepareRequest {
        lock_timeout: Duration::from_millis(300),
        ..request(&root, &origin, "acme/widgets", 71)
    };
    let err = prepare(&req).expect_err("lock is held");
    assert!(matches!(err, GitError::LockTimeout { .. }), "{err}");
    assert!(!cache.bare().exists(), "nothing happened without the lock");
    drop(held);
    prepare(&req).expect("proceeds once released");
}

/// `WSRUNNER_CACHE_MAX_BYTES`: over the cap, idle caches go oldest-used first until the rest
/// fits; a cache with a run checkout and a locked one stay (and still count).
#[test]
fn the_size_cap_evicts_oldest_used_first_but_never_a_cache_in_use() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let origin = Origin::create(tmp.path(), "origin.git");
    let root = tmp.path().join("cache");
    let names = ["oldest", "in-use", "locked", "old", "new"];
    for (i, name) in names.iter().enumerate() {
        let out = prepare(&request(
            &root,
            &origin,
            &format!("acme/{name}"),
            60 + i as i64,
        ))
        .expect("prepare");
        if *name != "in-use" {
            std::fs::remove_dir_all(&out.checkout_path).expect("run over");
        }
    }
    // Last use = the cache's last fetch: oldest, in-use, locked, old, new (an hour apart).
    let base = SystemTime::now() - Duration::from_secs(24 * 3600);
    for (i, name) in names.iter().enumerate() {
        let fetch_head = RepoCache::new(&root, 7, "acme", name)
            .bare()
            .join("FETCH_HEAD");
        std::fs::File::options()
            .write(true)
            .open(&fetch_head)
            .and_then(|f| f.set_modified(base + Duration::from_secs(3600 * i as u64)))
            .expect("set the last use");
    }
    let cache = |name: &str| RepoCache::new(&root, 7, "acme", name);
    let locked = cache("locked");
    let held = CacheLock::acquire(&locked.lock_path(), Duration::from_secs(5)).expect("hold");
    let (caches_before, checkouts) = disk_use(&root);
    assert!(checkouts > 0, "the in-use run's checkout is counted apart");
    let one = caches_before / names.len() as u64;
    // Room for three caches: two of the five must go, and the two oldest idle ones are
    // `oldest` and `old` (`in-use` and `locked` are older than `old` but cannot go).
    let cap = caches_before - 2 * one + one / 2;
    let max_age = Duration::from_secs(7 * 24 * 3600);
    let report = evict(&root, max_age, Some(cap), SystemTime::now()).expect("evict");
    assert!(
        report.removed.is_empty(),
        "nothing is old enough: {report:?}"
    );
    assert_eq!(
        report.removed_for_size,
        vec![
            cache("oldest").dir().to_owned(),
            cache("old").dir().to_owned()
        ],
        "{report:?}"
    );
    assert!(report.busy.contains(&locked.dir().to_owned()), "{report:?}");
    assert!(
        report.kept.contains(&cache("in-use").dir().to_owned()),
        "{report:?}"
    );
    assert!(report.bytes_left <= cap, "{report:?} cap {cap}");
    assert_eq!(report.bytes_left, disk_use(&root).0);
    for name in ["in-use", "locked", "new"] {
        assert!(cache(name).bare().join("HEAD").exists(), "{name} kept");
    }
    for name in ["oldest", "old"] {
        assert!(!cache(name).dir().exists(), "{name} evicted");
    }
    // A cap no idle cache can meet: the in-use and locked caches stay above it.
    let report = evict(&root, max_age, Some(1), SystemTime::now()).expect("evict");
    assert_eq!(report.removed_for_size, vec![cache("new").dir().to_owned()]);
    assert!(report.bytes_left > 1);
    assert!(cache("in-use").bare().join("HEAD").exists());
    assert!(locked.bare().join("HEAD").exists());
    drop(held);
    // Without a cap only age counts.
    let report = evict(&root, max_age, None, SystemTime::now()).expect("evict");
    assert!(report.removed.is_empty() && report.removed_for_size.is_empty());
}
