//! Pure validation of everything triage takes from outside: slugs, branch names, ids, remote
//! URLs and paths. No IO, no panics on any input, so a fuzz target can call
//! [`validate_prepare_inputs`] directly.

use std::path::{Component, Path, PathBuf};

/// What was wrong with an input, naming the field and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ValidationError {
    /// The flag or field at fault, e.g. `--repo`.
    pub field: &'static str,
    /// What is wrong with it and how to fix it.
    pub problem: String,
}

impl ValidationError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// Longest slug segment accepted. Forges cap repository names near 100 characters; the
/// margin keeps paths well under PATH_MAX.
const MAX_SEGMENT_LEN: usize = 200;
/// Longest branch name accepted (git itself allows more, the forges do not).
const MAX_BRANCH_LEN: usize = 255;

/// Splits and checks an `owner/name` slug (spec 4.9 step 2, 4.10 `--repo`).
///
/// Each segment is one path component made of ASCII letters, digits, `.`, `_` and `-`; it
/// is neither `.` nor `..` and does not start with `-`. Exactly one `/` separates them.
pub fn validate_slug(slug: &str) -> Result<(String, String), ValidationError> {
    const FIELD: &str = "--repo";
    if slug.is_empty() {
        return Err(ValidationError::new(
            FIELD,
            "is required (owner/name, e.g. acme/widgets)",
        ));
    }
    let Some((owner, repo)) = slug.split_once('/') else {
        return Err(ValidationError::new(
            FIELD,
            format!("{slug:?} is not owner/name (no '/')"),
        ));
    };
    if repo.contains('/') {
        // Newer servers accept GitLab-style group/sub/project slugs (spec 11), but the
        // git-proxy route has exactly one owner and one repo segment.
        let shown: String = slug.chars().take(120).collect();
        return Err(ValidationError::new(
            FIELD,
            format!(
                "{shown:?} has more than two segments: the Windshift git-proxy route \
                 (/git-proxy/<workspace>/<owner>/<repo>) supports owner/repo slugs only, so no \
                 runner can fetch or push a nested group repository yet"
            ),
        ));
    }
    for (what, seg) in [("owner", owner), ("repo name", repo)] {
        check_slug_segment(slug, what, seg)?;
    }
    Ok((owner.to_owned(), repo.to_owned()))
}

fn check_slug_segment(slug: &str, what: &str, seg: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "--repo";
    if seg.is_empty() {
        return Err(ValidationError::new(
            FIELD,
            format!("{slug:?}: the {what} is empty"),
        ));
    }
    if seg == "." || seg == ".." {
        return Err(ValidationError::new(
            FIELD,
            format!("{slug:?}: the {what} must not be '.' or '..'"),
        ));
    }
    if seg.starts_with('-') {
        return Err(ValidationError::new(
            FIELD,
            format!("{slug:?}: the {what} must not start with '-'"),
        ));
    }
    if seg.len() > MAX_SEGMENT_LEN {
        return Err(ValidationError::new(
            FIELD,
            format!("the {what} is longer than {MAX_SEGMENT_LEN} characters"),
        ));
    }
    if let Some(bad) = seg
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ValidationError::new(
            FIELD,
            format!(
                "{:?}: the {what} contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed",
                slug.escape_debug().to_string()
            ),
        ));
    }
    Ok(())
}

/// Checks a branch name (base ref, continuation branch, push branch) against git's
/// `check-ref-format` rules plus the spec's continuation rule (4.11 step 7): no leading `-`,
/// no whitespace, none of `:?*[\~^`.
pub fn validate_branch_name(field: &'static str, name: &str) -> Result<(), ValidationError> {
    let fail = |problem: String| Err(ValidationError::new(field, problem));
    if name.is_empty() {
        return fail("is empty; give a branch name such as main".into());
    }
    if name.len() > MAX_BRANCH_LEN {
        return fail(format!("is longer than {MAX_BRANCH_LEN} bytes"));
    }
    let shown = name.escape_debug().to_string();
    if name.starts_with('-') {
        return fail(format!("{shown:?} must not start with '-'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || ":?*[\\~^".contains(*c))
    {
        return fail(format!(
            "{shown:?} contains {c:?}; whitespace, control characters and :?*[\\~^ are not allowed in branch names"
        ));
    }
    if name.contains("..") || name.contains("@{") || name == "@" {
        return fail(format!("{shown:?} contains '..' or '@{{' or is '@'"));
    }
    // `git check-ref-format --branch HEAD` fails: git would refuse the branch much later.
    if name == "HEAD" {
        return fail("\"HEAD\" is not a valid branch name; give a branch such as main".into());
    }
    if name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return fail(format!("{shown:?} has an empty path component"));
    }
    if name.ends_with('.') {
        return fail(format!("{shown:?} must not end with '.'"));
    }
    for comp in name.split('/') {
        if comp.starts_with('.') {
            return fail(format!(
                "{shown:?}: component {comp:?} must not start with '.'"
            ));
        }
        if comp.ends_with(".lock") {
            return fail(format!(
                "{shown:?}: component {comp:?} must not end with '.lock'"
            ));
        }
    }
    Ok(())
}

/// Checks a commit id given by the caller (`--skip-if-head`): 40 or 64 hex digits.
pub fn validate_commit_id(field: &'static str, sha: &str) -> Result<(), ValidationError> {
    if (sha.len() == 40 || sha.len() == 64) && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ValidationError::new(
            field,
            format!(
                "{:?} is not a full commit id (40 or 64 hex digits)",
                sha.escape_debug().to_string()
            ),
        ))
    }
}

/// Which remotes a git call may reach (spec 4.11's protocol allow-list, plus our dev rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportPolicy {
    /// `--allow-file-url`: `file://` URLs and absolute paths are accepted (tests only).
    pub allow_file_url: bool,
    /// `WSRUNNER_ALLOW_INSECURE=1`: a plain `http://` remote is accepted (dev servers and the
    /// same-host deployment of spec 10). `https` stays the only protocol otherwise.
    pub allow_insecure_http: bool,
}

/// The transport a remote URL uses, once it passed [`validate_remote_url`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteScheme {
    Https,
    Http,
    File,
}

/// Checks a tokenless remote URL: `https://host/...`; `http://` only under
/// [`TransportPolicy::allow_insecure_http`]; `file://` or an absolute path only under
/// [`TransportPolicy::allow_file_url`]. Credentials in the URL are refused: the token travels
/// through askpass only.
pub fn validate_remote_url(
    field: &'static str,
    url: &str,
    policy: TransportPolicy,
) -> Result<RemoteScheme, ValidationError> {
    if url.is_empty() {
        return Err(ValidationError::new(field, "is required"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ValidationError::new(
            field,
            "contains whitespace or control characters",
        ));
    }
    let lower = url.to_ascii_lowercase();
    let (scheme, rest) = if let Some(rest) = lower.strip_prefix("https://") {
        (RemoteScheme::Https, rest)
    } else if let Some(rest) = lower.strip_prefix("http://") {
        if !policy.allow_insecure_http {
            return Err(ValidationError::new(
                field,
                "plain http:// remotes need WSRUNNER_ALLOW_INSECURE=1 (dev servers only); use https://",
            ));
        }
        (RemoteScheme::Http, rest)
    } else if lower.starts_with("file://") || url.starts_with('/') {
        if !policy.allow_file_url {
            return Err(ValidationError::new(
                field,
                "file URLs and local paths are refused (only --allow-file-url, for tests, permits them)",
            ));
        }
        return Ok(RemoteScheme::File);
    } else {
        return Err(ValidationError::new(
            field,
            "must be an https:// URL (ssh, git://, ext:: and other transports are refused)",
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(ValidationError::new(
            field,
            "must not carry credentials (user@ or user:password@); the token goes in --token-file",
        ));
    }
    if authority.is_empty() {
        return Err(ValidationError::new(field, "has no host"));
    }
    Ok(scheme)
}

/// Checks that `path` is absolute and clean: no `.`/`..` components and no NUL.
pub fn validate_abs_path(field: &'static str, path: &Path) -> Result<(), ValidationError> {
    if path.as_os_str().is_empty() {
        return Err(ValidationError::new(
            field,
            "is required (an absolute path)",
        ));
    }
    if !path.is_absolute() {
        return Err(ValidationError::new(
            field,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || path.to_string_lossy().contains("/./")
    {
        return Err(ValidationError::new(
            field,
            format!("{} must not contain '.' or '..' components", path.display()),
        ));
    }
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(ValidationError::new(field, "contains a NUL byte"));
    }
    if path.parent().is_none() {
        return Err(ValidationError::new(
            field,
            "must not be the filesystem root",
        ));
    }
    Ok(())
}

/// The run branch of spec 4.11 step 7: `agent-runs/run-<id>`.
pub fn run_branch(run_id: i64) -> String {
    format!("agent-runs/run-{run_id}")
}

/// The raw prepare inputs as they arrive from flags or a JobSpec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareInputs<'a> {
    pub root: &'a str,
    pub workspace_id: i64,
    pub slug: &'a str,
    pub remote_url: &'a str,
    pub base_ref: &'a str,
    pub continue_branch: &'a str,
    pub dest_dir: &'a str,
    pub run_id: i64,
    pub policy: TransportPolicy,
}

/// Prepare inputs that passed [`validate_prepare_inputs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedPrepare {
    pub root: PathBuf,
    pub workspace_id: i64,
    pub owner: String,
    pub repo: String,
    /// The branch fetched into the cache and cut from: the continuation branch, else the base.
    pub fetch_branch: String,
    /// The branch the checkout is on: the continuation branch, else `agent-runs/run-<id>`.
    pub work_branch: String,
    /// Where the checkout goes.
    pub checkout: PathBuf,
    pub remote_scheme: RemoteScheme,
}

/// Validates every prepare input (spec 4.10/4.11 step 1) without touching the filesystem.
pub fn validate_prepare_inputs(
    input: &PrepareInputs<'_>,
) -> Result<ValidatedPrepare, ValidationError> {
    let root = PathBuf::from(input.root);
    validate_abs_path("--root", &root)?;
    if input.workspace_id <= 0 {
        return Err(ValidationError::new(
            "--workspace-id",
            format!(
                "must be a positive workspace id (got {})",
                input.workspace_id
            ),
        ));
    }
    if input.run_id <= 0 {
        return Err(ValidationError::new(
            "--run-id",
            format!("must be a positive run id (got {})", input.run_id),
        ));
    }
    let (owner, repo) = validate_slug(input.slug)?;
    let remote_scheme = validate_remote_url("--remote-url", input.remote_url, input.policy)?;
    let base_ref = if input.base_ref.is_empty() {
        "main"
    } else {
        input.base_ref
    };
    validate_branch_name("--base-ref", base_ref)?;
    let (fetch_branch, work_branch) = if input.continue_branch.is_empty() {
        (base_ref.to_owned(), run_branch(input.run_id))
    } else {
        validate_branch_name("--continue-branch", input.continue_branch)?;
        (
            input.continue_branch.to_owned(),
            input.continue_branch.to_owned(),
        )
    };
    let checkout = if input.dest_dir.is_empty() {
        super::cache::RepoCache::new(&root, input.workspace_id, &owner, &repo)
            .run_checkout(input.run_id)
    } else {
        let dest = PathBuf::from(input.dest_dir);
        validate_abs_path("--dest-dir", &dest)?;
        // The checkout is `rm -rf`ed before cloning: keep that inside the cache root, where
        // the runner always places it (`<root>/.workspaces/run-<id>/<dir>`).
        if !dest.starts_with(&root) || dest == root {
            return Err(ValidationError::new(
                "--dest-dir",
                format!(
                    "{} must be inside the cache root {} (it is wiped before cloning)",
                    dest.display(),
                    root.display()
                ),
            ));
        }
        dest
    };
    Ok(ValidatedPrepare {
        root,
        workspace_id: input.workspace_id,
        owner,
        repo,
        fetch_branch,
        work_branch,
        checkout,
        remote_scheme,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(
            validate_slug("acme/widgets"),
            Ok(("acme".into(), "widgets".into()))
        );
        assert!(validate_slug("acme/.github").is_ok());
        for bad in [
            "",
            "acme",
            "acme/",
            "/widgets",
            "a/b/c",
            "../x",
            "a/..",
            "a/.",
            "-a/b",
            "a/-b",
            "a b/c",
            "a/b\n",
            "a/b\0",
            "a/wid gets",
            "a\\b/c",
            "ä/b",
        ] {
            let err = validate_slug(bad).expect_err(bad);
            assert_eq!(err.field, "--repo", "{bad:?}");
        }
    }

    #[test]
    fn nested_group_slugs_say_the_proxy_route_is_owner_repo_only() {
        for nested in ["group/sub/project", "a/b/c/d"] {
            let err = validate_slug(nested).expect_err(nested).problem;
            assert!(err.contains("more than two segments"), "{err}");
            assert!(err.contains("supports owner/repo slugs only"), "{err}");
        }
        let long = format!("g/{}", "s/".repeat(500));
        assert!(validate_slug(&long).unwrap_err().problem.len() < 400);
    }

    #[test]
    fn branches() {
        for good in [
            "main",
            "agent-runs/run-7",
            "feature/x.y",
            "release-1.0",
            "a@b",
        ] {
            assert!(validate_branch_name("--base-ref", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            "HEAD",
            "a b",
            "a:b",
            "a?b",
            "a*b",
            "a[b",
            "a\\b",
            "a~b",
            "a^b",
            "a..b",
            "a/",
            "/a",
            "a//b",
            "a.",
            ".a",
            "a/.b",
            "a.lock",
            "a/b.lock/c",
            "@",
            "a@{b",
            "a\tb",
            "a\u{7f}",
            "a\u{a0}b",
        ] {
            assert!(
                validate_branch_name("--continue-branch", bad).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(validate_branch_name("--base-ref", &"x".repeat(300)).is_err());
    }

    #[test]
    fn remote_urls() {
        let strict = TransportPolicy::default();
        assert_eq!(
            validate_remote_url("--remote-url", "https://h/api/git-proxy/1/a/b", strict),
            Ok(RemoteScheme::Https)
        );
        for bad in [
            "",
            "http://h/x",
            "file:///tmp/x",
            "/tmp/x",
            "ssh://h/x",
            "git@h:x",
            "ext::sh -c x",
            "https://user:pw@h/x",
            "https://tok@h/x",
            "https:///x",
            "https://h/x y",
        ] {
            assert!(
                validate_remote_url("--remote-url", bad, strict).is_err(),
                "{bad:?} accepted"
            );
        }
        let dev = TransportPolicy {
            allow_file_url: true,
            allow_insecure_http: true,
        };
        assert_eq!(
            validate_remote_url("--remote-url", "http://127.0.0.1:9/x", dev),
            Ok(RemoteScheme::Http)
        );
        assert_eq!(
            validate_remote_url("--remote-url", "/tmp/x.git", dev),
            Ok(RemoteScheme::File)
        );
    }

    #[test]
    fn prepare_inputs_pick_branches_and_paths() {
        let input = PrepareInputs {
            root: "/cache",
            workspace_id: 3,
            slug: "acme/widgets",
            remote_url: "https://h/x",
            base_ref: "",
            run_id: 42,
            ..Default::default()
        };
        let v = validate_prepare_inputs(&input).expect("valid");
        assert_eq!(v.fetch_branch, "main");
        assert_eq!(v.work_branch, "agent-runs/run-42");
        assert_eq!(v.checkout, PathBuf::from("/cache/3/acme/widgets/runs/42"));

        let cont = PrepareInputs {
            continue_branch: "feature/pr-9",
            dest_dir: "/cache/.workspaces/run-42/widgets",
            ..input.clone()
        };
        let v = validate_prepare_inputs(&cont).expect("valid");
        assert_eq!(v.fetch_branch, "feature/pr-9");
        assert_eq!(v.work_branch, "feature/pr-9");
        assert_eq!(
            v.checkout,
            PathBuf::from("/cache/.workspaces/run-42/widgets")
        );

        for (bad, field) in [
            (
                PrepareInputs {
                    root: "",
                    ..input.clone()
                },
                "--root",
            ),
            (
                PrepareInputs {
                    root: "rel",
                    ..input.clone()
                },
                "--root",
            ),
            (
                PrepareInputs {
                    root: "/a/../b",
                    ..input.clone()
                },
                "--root",
            ),
            (
                PrepareInputs {
                    root: "/",
                    ..input.clone()
                },
                "--root",
            ),
            (
                PrepareInputs {
                    workspace_id: 0,
                    ..input.clone()
                },
                "--workspace-id",
            ),
            (
                PrepareInputs {
                    run_id: -1,
                    ..input.clone()
                },
                "--run-id",
            ),
            (
                PrepareInputs {
                    continue_branch: "-f",
                    ..input.clone()
                },
                "--continue-branch",
            ),
            (
                PrepareInputs {
                    dest_dir: "x/y",
                    ..input.clone()
                },
                "--dest-dir",
            ),
            (
                PrepareInputs {
                    dest_dir: "/etc",
                    ..input.clone()
                },
                "--dest-dir",
            ),
            (
                PrepareInputs {
                    dest_dir: "/cache",
                    ..input.clone()
                },
                "--dest-dir",
            ),
            (
                PrepareInputs {
                    dest_dir: "/cachex/y",
                    ..input.clone()
                },
                "--dest-dir",
            ),
            (
                PrepareInputs {
                    remote_url: "",
                    ..input.clone()
                },
                "--remote-url",
            ),
        ] {
            assert_eq!(validate_prepare_inputs(&bad).expect_err(field).field, field);
        }
    }
}

#[cfg(test)]
mod never_panics {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn on_any_input(
            root in ".{0,40}", slug in ".{0,40}", remote in ".{0,40}", base in ".{0,40}",
            cont in ".{0,40}", dest in ".{0,40}", ws in any::<i64>(), run in any::<i64>(),
            file_ok in any::<bool>(), http_ok in any::<bool>(),
        ) {
            let input = PrepareInputs {
                root: &root, workspace_id: ws, slug: &slug, remote_url: &remote, base_ref: &base,
                continue_branch: &cont, dest_dir: &dest, run_id: run,
                policy: TransportPolicy { allow_file_url: file_ok, allow_insecure_http: http_ok },
            };
            if let Ok(v) = validate_prepare_inputs(&input) {
                // Whatever passes stays inside the root (or the given absolute dest).
                prop_assert!(v.checkout.is_absolute());
                prop_assert!(!v.checkout.components().any(|c| matches!(c, Component::ParentDir)));
                prop_assert!(validate_branch_name("b", &v.work_branch).is_ok());
            }
        }
    }
}
