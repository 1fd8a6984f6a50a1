//! `windshift-runner doctor`: checks a host's setup before (or while) the runner runs, one
//! line per check with the fix in words, and a non-zero exit when anything fails.
//!
//! The checks follow the start-up sequence (spec 4.1) and Windshift's troubleshooting list
//! (docs/deploy.md maps each symptom to a check). Doctor never spends the registration token
//! (a credential is probed with one heartbeat, spec 4.2), never pulls an image, never creates
//! the agent network, the cache or the journal: it only looks.
//!
//! Architecture invariant: doctor output goes through [`crate::redact`]; no secret is printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{ConfigError, RunnerConfig, ValidConfig};
use crate::control::client::{validate_api_url, Client, ClientConfig, Preflight, RetryPolicy};
use crate::effects::container::{ContainerError, Engine, BUILTIN_NETWORKS, CONTRACT_VERSION};
use crate::journal::{JournalError, SledJournal};
use crate::redact::{redact, register_secret};

/// Below this much free space on the cache or journal filesystem a check fails.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// How long one engine, git or HTTP call of doctor may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
    /// Not run because an earlier check it depends on failed.
    Skip,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        }
    }
}

/// One check's result: what was found and, for WARN/FAIL, what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Short stable name (`api-url`, `server`, `credential`, …).
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn skip(name: &'static str, why: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Skip,
            detail: why.into(),
            fix: None,
        }
    }

    /// The one output line (redacted).
    pub fn line(&self) -> String {
        let mut text = format!("{} {:<11} {}", self.status.label(), self.name, self.detail);
        if let Some(fix) = &self.fix {
            text.push_str(" | fix: ");
            text.push_str(fix);
        }
        redact(&text).into_owned()
    }
}

/// Every check's result, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.status == Status::Fail)
    }

    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// Writes one line per check and a summary line.
    pub fn render(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for c in &self.checks {
            writeln!(out, "{}", c.line())?;
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        writeln!(
            out,
            "doctor: {} passed, {} warnings, {} failed, {} skipped",
            count(Status::Pass),
            count(Status::Warn),
            count(Status::Fail),
            count(Status::Skip)
        )
    }

    /// The process exit code: 0 when nothing failed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.failed())
    }
}

/// Tunables (tests lower the thresholds; operators keep the defaults).
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub min_free_bytes: u64,
    /// Whether this process runs inside a container (`/.dockerenv` or `/run/.containerenv`).
    pub in_container: bool,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            in_container: Path::new("/.dockerenv").exists()
                || Path::new("/run/.containerenv").exists(),
        }
    }
}

/// Runs every check. `hostname` is only used for the default display name.
pub async fn run(raw: &RunnerConfig, hostname: Option<&str>, opts: &DoctorOptions) -> Report {
    for secret in [&raw.registration_token, &raw.credential]
        .into_iter()
        .flatten()
    {
        if !secret.trim().is_empty() {
            register_secret(secret.trim());
        }
    }
    let mut report = Report::default();
    let checks = &mut report.checks;

    // WS_API_URL first: the rest of the configuration is still checked when only the URL is
    // wrong, so one doctor run shows every problem.
    let (cfg, url_ok) = match raw.validate(hostname) {
        Ok(cfg) => (cfg, true),
        Err(
            e @ (ConfigError::MissingApiUrl
            | ConfigError::InsecureApiUrl { .. }
            | ConfigError::BadApiUrl { .. }),
        ) => {
            checks.push(Check::fail("api-url", e.to_string(), url_fix(&e)));
            let mut patched = raw.clone();
            patched.api_url = Some("https://windshift.invalid/api".into());
            match patched.validate(hostname) {
                Ok(cfg) => (cfg, false),
                Err(other) => {
                    checks.push(Check::fail(
                        "config",
                        other.to_string(),
                        "correct the named variable in runner.env (or the flag) and run doctor again",
                    ));
                    return report;
                }
            }
        }
        Err(other) => {
            checks.push(Check::fail(
                "config",
                other.to_string(),
                "correct the named variable in runner.env (or the flag) and run doctor again",
            ));
            return report;
        }
    };

    checks.extend(option_a_checks(&cfg));

    let client = if url_ok {
        checks.push(api_url_check(&cfg));
        checks.push(loopback_check(&cfg, opts));
        let mut ccfg = ClientConfig::new(cfg.api_url.clone());
        ccfg.allow_insecure = cfg.allow_insecure;
        ccfg.control_timeout = CALL_TIMEOUT;
        ccfg.register_timeout = CALL_TIMEOUT;
        ccfg.retry = RetryPolicy::NONE;
        ccfg.heartbeat_retry = RetryPolicy::NONE;
        match Client::new(ccfg) {
            Ok(c) => Some(c),
            Err(e) => {
                checks.push(Check::fail(
                    "server",
                    format!("cannot set up the HTTP client: {e}"),
                    "fix WS_API_URL",
                ));
                None
            }
        }
    } else {
        None
    };
    let server_ok = match &client {
        Some(client) => {
            let check = server_check(client, &cfg).await;
            let ok = check.status != Status::Fail;
            checks.push(check);
            ok
        }
        None => {
            checks.push(Check::skip("server", "WS_API_URL is not usable"));
            false
        }
    };
    match (&client, server_ok) {
        (Some(client), true) => checks.push(credential_check(client, &cfg).await),
        _ => checks.push(Check::skip(
            "credential",
            "the server is not reachable, so the credential cannot be probed",
        )),
    }
    checks.push(credential_file_check(&cfg, opts));

    let engine = Engine::new(cfg.container_config("doctor"));
    let docker = docker_check(&engine).await;
    let docker_ok = docker.status == Status::Pass;
    checks.push(docker);
    checks.push(engine_driver_check(&engine).await);
    if docker_ok {
        checks.push(network_check(&engine).await);
        checks.push(image_check(&engine, &cfg).await);
        let host = engine.engine_host().await;
        checks.push(rootless_check(host));
        checks.push(if host.userns_mode().is_some() {
            Check::pass(
                "userns",
                "rootless Podman maps the agent's uid 1000 to the runner's own uid: no other host account owns the agents' processes",
            )
        } else {
            userns_check(&engine, opts).await
        });
    } else {
        checks.push(Check::skip(
            "rootless",
            "the container engine is not usable",
        ));
        checks.push(Check::skip("network", "the container engine is not usable"));
        checks.push(Check::skip("image", "the container engine is not usable"));
        checks.push(Check::skip("userns", "the container engine is not usable"));
    }

    checks.push(dir_check(
        "cache",
        &cfg.cache_root,
        "WSRUNNER_CACHE_ROOT",
        opts,
        cfg.disk_free_warn,
    ));
    checks.push(cache_perms_check(&cfg.cache_root));
    checks.push(dir_check(
        "journal-dir",
        &cfg.journal_dir,
        "WSRUNNER_JOURNAL_DIR",
        opts,
        cfg.disk_free_warn,
    ));
    checks.push(journal_check(&cfg.journal_dir));
    checks.extend(disk_use_checks(&cfg));
    if docker_ok {
        checks.push(container_logs_check(&engine).await);
        checks.push(images_check(&engine, &cfg).await);
    } else {
        checks.push(Check::skip(
            "disk-logs",
            "the container engine is not usable",
        ));
        checks.push(Check::skip(
            "disk-images",
            "the container engine is not usable",
        ));
    }
    checks.push(pause_check(&cfg.ctl_dir));
    checks.push(git_check().await);
    checks.push(triage_check(&cfg.triage_bin));
    report
}

/// Which name supplied each Option A-capable setting, and the agent's default model id
/// (docs/deploy.md "Moving from Option A").
fn option_a_checks(cfg: &ValidConfig) -> Vec<Check> {
    let mut checks = Vec::new();
    if !cfg.origins.is_empty() {
        checks.push(Check::pass("settings", cfg.origins_line()));
    }
    let from = cfg
        .origins
        .iter()
        .find(|o| o.setting == "llm-model")
        .map_or("WSRUNNER_LLM_MODEL", |o| o.from);
    checks.push(match &cfg.llm_model {
        Some(model) => Check::pass(
            "llm-model",
            format!("coding agents the server sends no LLM_MODEL get {model} (from {from})"),
        ),
        None => Check::warn(
            "llm-model",
            "no host default model id (WSRUNNER_LLM_MODEL and CODING_AGENT_LLM_MODEL are unset): \
             windshift-agent images exit with code 2 unless the server sends LLM_MODEL",
            "set WSRUNNER_LLM_MODEL to the model id of your LLM connection, unless the server sends one with every run",
        ),
    });
    checks
}

fn url_fix(e: &ConfigError) -> String {
    match e {
        ConfigError::MissingApiUrl => {
            "set WS_API_URL in runner.env to https://<your windshift host>/api".into()
        }
        ConfigError::InsecureApiUrl { .. } => "use an HTTPS URL ending in /api, or set WSRUNNER_ALLOW_INSECURE=1 only for local development".into(),
        _ => "use the form https://windshift.example.com/api".into(),
    }
}

fn api_url_check(cfg: &ValidConfig) -> Check {
    match validate_api_url(&cfg.api_url, cfg.allow_insecure) {
        Err(e) => Check::fail(
            "api-url",
            e.to_string(),
            "use the form https://windshift.example.com/api",
        ),
        Ok(api) if !api.warnings.is_empty() => Check::warn(
            "api-url",
            format!("{}: {}", api.url, api.warnings.join("; ")),
            if cfg.allow_insecure {
                "use https:// in production; WSRUNNER_ALLOW_INSECURE=1 is for local development"
            } else {
                "point WS_API_URL at the API base ending in /api"
            },
        ),
        Ok(api) => Check::pass("api-url", api.url),
    }
}

/// `localhost` inside a container is not the Windshift server (seed troubleshooting: "agent
/// can't reach Windshift").
fn loopback_check(cfg: &ValidConfig, opts: &DoctorOptions) -> Check {
    let host = reqwest::Url::parse(&cfg.api_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.starts_with("127.")
        || host == "[::1]"
        || host == "::1";
    if !loopback {
        return Check::pass(
            "reachable",
            format!("WS_API_URL host {host} is not a loopback address"),
        );
    }
    if cfg.network == "host" && !opts.in_container {
        return Check::pass(
            "reachable",
            format!("WS_API_URL host {host} is loopback and WSRUNNER_NETWORK=host"),
        );
    }
    let mut detail = format!(
        "WS_API_URL host {host} is a loopback address: inside a container localhost is the container itself, not your Windshift server"
    );
    if opts.in_container {
        detail.push_str(" (doctor itself runs in a container)");
    }
    Check::warn(
        "reachable",
        detail,
        "use the server's real host name, or on the same host a shared Docker network and the server's service name (e.g. http://windshift:8080/api); a runner container on 127.0.0.1 needs --network host",
    )
}

async fn server_check(client: &Client, cfg: &ValidConfig) -> Check {
    match client.preflight().await {
        Ok(Preflight::Ok { version }) => Check::pass(
            "server",
            format!("{}/version answered: Windshift {version}", cfg.api_url),
        ),
        Ok(Preflight::Unreachable { message }) => Check::fail(
            "server",
            format!("cannot reach {}/version: {message}", cfg.api_url),
            "check WS_API_URL, DNS, firewalls and outbound HTTPS from this host (and from this container, if the runner runs in one)",
        ),
        Err(e) => Check::fail(
            "server",
            e.to_string(),
            "WS_API_URL must be the API base ending in /api of a Windshift server",
        ),
    }
}

/// Spec 4.2 without registering: the injected credential, else the file, each probed with one
/// heartbeat; with neither, report whether a registration token is ready for the first start.
async fn credential_check(client: &Client, cfg: &ValidConfig) -> Check {
    let mut rejected = Vec::new();
    if let Some(c) = cfg.credential.as_deref() {
        match probe(client, c, "WSRUNNER_CREDENTIAL").await {
            Probe::Accepted(check) | Probe::Unsure(check) => return check,
            Probe::Rejected(why) => rejected.push(why),
        }
    }
    match std::fs::read_to_string(&cfg.credential_file) {
        Ok(text) if !text.trim().is_empty() => {
            register_secret(text.trim());
            let what = format!("the credential file {}", cfg.credential_file.display());
            match probe(client, text.trim(), &what).await {
                Probe::Accepted(check) | Probe::Unsure(check) => return check,
                Probe::Rejected(why) => rejected.push(why),
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Check::fail(
                "credential",
                format!(
                    "cannot read the credential file {}: {e}",
                    cfg.credential_file.display()
                ),
                "make it readable by the runner user (0600, owned by that user)",
            )
        }
    }
    let mut detail = if rejected.is_empty() {
        "no stored credential".to_owned()
    } else {
        rejected.join("; ")
    };
    if cfg.registration_token.is_some() {
        detail.push_str(&format!(
            "; the registration token in WSRUNNER_REGISTRATION_TOKEN will be used on first start and the credential saved to {} (doctor does not use it)",
            cfg.credential_file.display()
        ));
        if rejected.is_empty() {
            Check::pass("credential", detail)
        } else {
            Check::warn(
                "credential",
                detail,
                "make sure the registration token is fresh (single use, expires); remove the rejected credential",
            )
        }
    } else {
        Check::fail(
            "credential",
            format!("{detail}, and WSRUNNER_REGISTRATION_TOKEN is not set"),
            "mint a registration token for the runner pool in Windshift and set WSRUNNER_REGISTRATION_TOKEN",
        )
    }
}

enum Probe {
    Accepted(Check),
    Unsure(Check),
    Rejected(String),
}

async fn probe(client: &Client, credential: &str, what: &str) -> Probe {
    match client.probe_credential(credential).await {
        Ok(_) => Probe::Accepted(Check::pass(
            "credential",
            format!("{what} is accepted by the server"),
        )),
        Err(e) if matches!(e.status(), Some(401 | 403)) => Probe::Rejected(format!(
            "{what} was rejected by the server (HTTP {}: revoked or wrong pool)",
            e.status().unwrap_or(401)
        )),
        Err(e) => Probe::Unsure(Check::warn(
            "credential",
            format!("{what} could not be verified: {e}"),
            "check the server's health; the runner will retry with this credential",
        )),
    }
}

/// The credential must survive restarts (seed troubleshooting: "keeps asking for a
/// registration token").
fn credential_file_check(cfg: &ValidConfig, opts: &DoctorOptions) -> Check {
    let file = &cfg.credential_file;
    let fix = "make the directory writable by the runner user or set WSRUNNER_CREDENTIAL_FILE to a writable, persisted path";
    if file.is_dir() {
        return Check::fail(
            "cred-file",
            format!("{} is a directory", file.display()),
            fix,
        );
    }
    let writable = if file.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(file)
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        probe_dir_writable(file.parent().unwrap_or(Path::new("/")))
    };
    if let Err(why) = writable {
        return Check::fail(
            "cred-file",
            format!("the credential file {} cannot be written: {why}; the runner would register, fail to persist and ask for a new token after every restart", file.display()),
            fix,
        );
    }
    if opts.in_container && mount_point_of(file).as_deref() == Some(Path::new("/")) {
        return Check::warn(
            "cred-file",
            format!("{} is writable but not on a mounted volume: it is lost when the container is recreated", file.display()),
            "mount /var/lib/windshift-runner as a volume at the same path (see deploy/compose.yml)",
        );
    }
    Check::pass("cred-file", format!("{} is writable", file.display()))
}

/// The longest mount point containing `path` (from /proc/self/mountinfo).
fn mount_point_of(path: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
}

/// The nearest existing ancestor of `path` (itself if it exists).
fn existing_ancestor(path: &Path) -> Option<&Path> {
    path.ancestors().find(|p| p.exists())
}

/// Creates and removes a temp file in the nearest existing ancestor of `dir` (nothing else is
/// created), so the answer is the kernel's, root and read-only mounts included.
fn probe_dir_writable(dir: &Path) -> Result<(), String> {
    let Some(existing) = existing_ancestor(dir) else {
        return Err("no part of the path exists".into());
    };
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    tempfile::Builder::new()
        .prefix(".doctor-probe-")
        .tempfile_in(existing)
        .map(drop)
        .map_err(|e| format!("{}: {e}", existing.display()))
}

fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

fn dir_check(
    name: &'static str,
    dir: &Path,
    var: &str,
    opts: &DoctorOptions,
    warn_below: u64,
) -> Check {
    if let Err(why) = probe_dir_writable(dir) {
        return Check::fail(
            name,
            format!("{} is not writable: {why}", dir.display()),
            format!("create it owned by the runner user (0700), or set {var} to a writable path"),
        );
    }
    let Some(existing) = existing_ancestor(dir) else {
        return Check::fail(
            name,
            format!("{} does not exist", dir.display()),
            format!("set {var}"),
        );
    };
    let state = if existing == dir {
        "writable".to_owned()
    } else {
        format!("will be created (under writable {})", existing.display())
    };
    match free_bytes(existing) {
        Some(free) if free < opts.min_free_bytes => Check::fail(
            name,
            format!(
                "{} {state}, but only {} free (need {})",
                dir.display(),
                gib(free),
                gib(opts.min_free_bytes)
            ),
            "free disk space (old checkouts, docker images: `docker system prune`) or move it to a larger disk",
        ),
        Some(free) if free < warn_below => Check::warn(
            name,
            format!(
                "{} {state}, but only {} free, below WSRUNNER_DISK_FREE_WARN ({})",
                dir.display(),
                gib(free),
                gib(warn_below)
            ),
            "free disk space (lower WSRUNNER_CACHE_MAX_AGE or set WSRUNNER_CACHE_MAX_BYTES, WSRUNNER_IMAGE_PRUNE_AFTER, `docker image prune`) or grow the disk; the `disk-*` lines say what uses it",
        ),
        Some(free) => Check::pass(name, format!("{} {state}, {} free", dir.display(), gib(free))),
        None => Check::warn(
            name,
            format!("{} {state}; free space unknown", dir.display()),
            "check free space by hand (df)",
        ),
    }
}

/// Bytes for people: B, KiB, MiB or GiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What the runner keeps on disk besides the engine's store: the bare caches (against
/// `WSRUNNER_CACHE_MAX_BYTES`), the run checkouts, the journal (docs/deploy.md, "Disk").
fn disk_use_checks(cfg: &ValidConfig) -> Vec<Check> {
    let (caches, checkouts) = crate::effects::git::disk_use(&cfg.cache_root);
    let age = go_duration_text(cfg.cache_max_age);
    let caches_check = match cfg.cache_max_bytes {
        Some(cap) if caches > cap => Check::warn(
            "disk-caches",
            format!(
                "bare caches in {} use {}, above WSRUNNER_CACHE_MAX_BYTES ({}); idle ones are evicted between runs, the rest are in use",
                cfg.cache_root.display(),
                human_bytes(caches),
                human_bytes(cap)
            ),
            "if it stays so, raise WSRUNNER_CACHE_MAX_BYTES or check for runs that do not end",
        ),
        Some(cap) => Check::pass(
            "disk-caches",
            format!(
                "bare caches in {} use {} (cap WSRUNNER_CACHE_MAX_BYTES {}, idle ones evicted after {age})",
                cfg.cache_root.display(),
                human_bytes(caches),
                human_bytes(cap)
            ),
        ),
        None => Check::pass(
            "disk-caches",
            format!(
                "bare caches in {} use {} (no total cap: WSRUNNER_CACHE_MAX_BYTES is off; idle ones evicted after {age})",
                cfg.cache_root.display(),
                human_bytes(caches)
            ),
        ),
    };
    let journal = crate::effects::git::tree_bytes(&cfg.journal_dir);
    vec![
        caches_check,
        Check::pass(
            "disk-checkouts",
            format!(
                "run checkouts use {} (removed when their run ends, and at start after a crash)",
                human_bytes(checkouts)
            ),
        ),
        Check::pass(
            "disk-journal",
            format!(
                "the journal in {} uses {} (terminal runs archived after {})",
                cfg.journal_dir.display(),
                human_bytes(journal),
                go_duration_text(cfg.journal_retention)
            ),
        ),
    ]
}

/// A duration as hours, minutes or seconds (for the disk lines).
fn go_duration_text(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs >= 60 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// The engine's log files of the runner's containers (any instance), where the engine says
/// where they are (Docker's json-file/local `LogPath`; rotated files `<path>.N` included).
async fn container_logs_check(engine: &Engine) -> Check {
    let filter = format!("label={}", crate::effects::container::LABEL_INSTANCE);
    let names = match engine
        .cli(
            &["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"],
            CALL_TIMEOUT,
        )
        .await
    {
        Ok(out) if out.success => out.stdout,
        _ => {
            return Check::skip(
                "disk-logs",
                "the engine did not list the runner's containers",
            );
        }
    };
    let names: Vec<&str> = names
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let (mut bytes, mut known, mut unknown) = (0u64, 0usize, 0usize);
    for name in &names {
        let path = match engine
            .cli(
                &["container", "inspect", "--format", "{{.LogPath}}", name],
                CALL_TIMEOUT,
            )
            .await
        {
            Ok(out) if out.success => out.stdout.trim().to_owned(),
            _ => String::new(),
        };
        let path = Path::new(&path);
        match std::fs::metadata(path) {
            Ok(meta) if path.is_absolute() => {
                known += 1;
                bytes += meta.len();
                let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                if let (Some(dir), Some(file_name)) = (path.parent(), file_name) {
                    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                        let other = entry.file_name().to_string_lossy().into_owned();
                        if other.starts_with(&format!("{file_name}.")) {
                            bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                        }
                    }
                }
            }
            _ => unknown += 1,
        }
    }
    let limit = human_bytes(engine.cfg.output_limit);
    let mut detail = format!(
        "{} runner container(s); their engine logs use {} where the engine says where they are ({known} of them); each is capped near WSRUNNER_AGENT_OUTPUT_LIMIT ({limit}) and removed with its container",
        names.len(),
        human_bytes(bytes),
    );
    if unknown > 0 {
        detail.push_str(&format!(
            "; {unknown} log(s) not readable here (another log driver, or not root)"
        ));
    }
    Check::pass("disk-logs", detail)
}

/// The agent images in the engine's store: the default one (never pruned) and the per-run
/// overrides, with what `WSRUNNER_IMAGE_PRUNE_AFTER` does about the ones the runner pulled.
async fn images_check(engine: &Engine, cfg: &ValidConfig) -> Check {
    let uses = crate::effects::container::ImageUse::load(
        &cfg.cache_root
            .join(crate::effects::container::IMAGE_USE_FILE),
    );
    let mut parts = Vec::new();
    let mut total = 0u64;
    let mut images: Vec<&str> = Vec::new();
    if !cfg.image.is_empty() {
        images.push(&cfg.image);
    }
    for image in cfg.allowed_images.iter().chain(uses.images.keys()) {
        if !images.contains(&image.as_str()) {
            images.push(image);
        }
    }
    for image in images {
        let Some(size) = engine.image_size(image).await else {
            continue;
        };
        total += size;
        let role = if image == cfg.image {
            "default, never pruned"
        } else if uses.images.get(image).is_some_and(|e| e.pulled) {
            "override, pulled by the runner"
        } else {
            "override"
        };
        parts.push(format!("{image} {} ({role})", human_bytes(size)));
    }
    let prune = match cfg.image_prune_after {
        Some(after) => format!(
            "override images the runner pulled are removed after {} unused (WSRUNNER_IMAGE_PRUNE_AFTER)",
            go_duration_text(after)
        ),
        None => "override images are never pruned (WSRUNNER_IMAGE_PRUNE_AFTER is off)".into(),
    };
    let list = if parts.is_empty() {
        "none in the engine's store".to_owned()
    } else {
        parts.join(", ")
    };
    Check::pass(
        "disk-images",
        format!("agent images use {}: {list}; {prune}", human_bytes(total)),
    )
}

/// The cache root's owner and mode, as the daemon checks them at start (src/cache_root.rs).
fn cache_perms_check(root: &Path) -> Check {
    match crate::cache_root::check(root) {
        Ok(crate::cache_root::Found::Ok) => Check::pass(
            "cache-perms",
            format!("{} is owned by the runner (or root) and not writable by others", root.display()),
        ),
        Ok(crate::cache_root::Found::Missing) => Check::pass(
            "cache-perms",
            format!("{} will be created with mode 0750", root.display()),
        ),
        Err(e) => Check::fail(
            "cache-perms",
            format!("{e}; the runner refuses to start (exit 78)"),
            "give the runner user sole write access (chown to it, chmod 0750) or set WSRUNNER_CACHE_ROOT to such a directory",
        ),
    }
}

/// Whether `ctl pause` left the runner paused (the persisted pause file).
fn pause_check(ctl_dir: &Path) -> Check {
    let file = ctl_dir.join(crate::daemon::ctl::PAUSE_FILE);
    match std::fs::symlink_metadata(&file) {
        Ok(_) => Check::warn(
            "pause",
            format!(
                "the runner is paused ({} exists): it claims no runs",
                file.display()
            ),
            "run `windshift-runner ctl resume` when it should take work again",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::pass("pause", "not paused"),
        Err(e) => Check::warn(
            "pause",
            format!(
                "cannot tell whether the runner is paused: {}: {e}",
                file.display()
            ),
            "run doctor as the runner's user, or check WSRUNNER_CTL_DIR",
        ),
    }
}

fn journal_check(dir: &Path) -> Check {
    if !dir.join("conf").exists() && !dir.join("db").exists() {
        return Check::pass(
            "journal",
            format!(
                "no journal yet at {}; the runner creates it on first start",
                dir.display()
            ),
        );
    }
    match SledJournal::open_existing(dir) {
        Ok(journal) => {
            drop(journal);
            Check::pass("journal", format!("{} opens cleanly", dir.display()))
        }
        Err(JournalError::Locked { .. }) => Check::pass(
            "journal",
            format!("{} is held by a running runner (fine if the service is running)", dir.display()),
        ),
        Err(JournalError::NeedsMigration { schema, .. }) => Check::pass(
            "journal",
            format!(
                "{} is journal schema {schema} (an older release); the runner migrates it when it starts",
                dir.display()
            ),
        ),
        Err(e) => Check::fail(
            "journal",
            format!("{} cannot be opened: {e}", dir.display()),
            "stop the runner and run `windshift-runner journal --db <dir> verify`; see docs/journal.md",
        ),
    }
}

async fn docker_check(engine: &Engine) -> Check {
    let docker = engine.cfg.docker.clone();
    let out = engine
        .cli(
            &[
                "version",
                "--format",
                "{{.Client.Version}} {{.Server.Version}}",
            ],
            CALL_TIMEOUT,
        )
        .await;
    match out {
        Err(ContainerError::Spawn { source, .. }) => Check::fail(
            "docker",
            format!("cannot run the container CLI {docker:?}: {source}"),
            "install the docker CLI (or rootful podman) and/or set WSRUNNER_DOCKER (CODING_AGENT_DOCKER_BINARY on an Option A host); in the runner image it is /usr/bin/docker",
        ),
        Err(e) => Check::fail(
            "docker",
            e.to_string(),
            "check that the Docker daemon is running and healthy",
        ),
        Ok(out) if out.success => {
            let mut v = out.stdout.split_whitespace();
            let client = v.next().unwrap_or("?").to_owned();
            let server = v.next().unwrap_or("?").to_owned();
            Check::pass("docker", format!("{docker} client {client}, daemon {server} reachable"))
        }
        // Podman without a service to talk to (rootless, local engine) has no Client/Server.
        Ok(out) if out.stderr.contains("can't evaluate field Client") => {
            match engine
                .cli(&["version", "--format", "{{.Version}}"], CALL_TIMEOUT)
                .await
            {
                Ok(local) if local.success => Check::pass(
                    "docker",
                    format!("{docker} {} (local engine, no daemon) works", local.stdout.trim()),
                ),
                _ => Check::fail(
                    "docker",
                    format!("the engine does not answer: {}", first_line(&out.stderr)),
                    "check that `podman info` works as the runner's user",
                ),
            }
        }
        Ok(out) if out.stderr.to_ascii_lowercase().contains("permission denied") => Check::fail(
            "docker",
            format!("permission denied talking to the Docker daemon: {}", first_line(&out.stderr)),
            "add the runner user to the docker group (systemd), or mount the daemon's socket at /var/run/docker.sock (container); with Podman mount /run/podman/podman.sock",
        ),
        Ok(out) => Check::fail(
            "docker",
            format!("the Docker daemon is not reachable: {}", first_line(&out.stderr)),
            "start the Docker daemon, or mount its socket at /var/run/docker.sock (DOCKER_HOST is honoured)",
        ),
    }
}

/// Which engine driver runs and why (docs/containers.md, "Engine drivers").
async fn engine_driver_check(engine: &Engine) -> Check {
    match engine.api() {
        Some(api) => match api.ping().await {
            Ok(()) => Check::pass("engine-driver", engine.driver_note().to_owned()),
            Err(e) => Check::fail(
                "engine-driver",
                format!("{}, which does not answer: {e}", engine.driver_note()),
                "start the engine (or its API service), or set WSRUNNER_ENGINE_DRIVER=cli",
            ),
        },
        None => Check::warn(
            "engine-driver",
            engine.driver_note().to_owned(),
            "serve the engine's API socket (see the detail) so that agent sessions survive any runner death",
        ),
    }
}

fn first_line(text: &str) -> &str {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

async fn network_check(engine: &Engine) -> Check {
    let name = engine.cfg.network.as_str();
    if BUILTIN_NETWORKS.contains(&name) {
        let what = match name {
            "none" => "agent containers get no network at all (they cannot reach Windshift or a model API)",
            "host" => "agent containers share the host's network stack, egress unfiltered",
            _ => "the default bridge, egress unfiltered",
        };
        return Check::warn(
            "network",
            format!("WSRUNNER_NETWORK={name} is a built-in network: {what}"),
            "use a dedicated network (default coding-agent-egress) with your own egress rules",
        );
    }
    match engine.cli(&["network", "inspect", "--format", "{{.Driver}} internal={{.Internal}}", name], CALL_TIMEOUT).await {
        Ok(out) if out.success => match engine.network_allows_icc(name).await {
            Ok(true) => Check::warn(
                "network",
                format!("agent network {name} exists ({}) but allows inter-container traffic", out.stdout.trim()),
                crate::effects::container::icc_warning(name),
            ),
            _ => Check::pass(
                "network",
                format!("agent network {name} exists ({}), inter-container traffic off", out.stdout.trim()),
            ),
        },
        Ok(_) => Check::warn(
            "network",
            format!("agent network {name} does not exist; the runner will create it at start as a plain bridge with UNFILTERED egress"),
            format!("create it yourself with egress rules, e.g. `docker network create {name}` plus firewall rules, or an internal network shared with Windshift"),
        ),
        Err(e) => Check::fail("network", e.to_string(), "check the Docker daemon"),
    }
}

async fn image_check(engine: &Engine, cfg: &ValidConfig) -> Check {
    let image = cfg.image.as_str();
    if image.is_empty() {
        return Check::fail(
            "image",
            "WSRUNNER_IMAGE (or Option A's CODING_AGENT_RUNNER_IMAGE) is not set: coding runs without an image never start",
            "set WSRUNNER_IMAGE to the agent image (e.g. ghcr.io/windshiftapp/windshift-agent:latest)",
        );
    }
    match engine.contract_label(image).await {
        Err(ContainerError::Cli { detail, .. } | ContainerError::Api { detail, .. }) => Check::fail(
            "image",
            format!("image {image} is not present on the Docker daemon ({})", first_line(&detail)),
            format!("`docker pull {image}` (or load/build it) on the daemon that starts jobs; doctor does not pull"),
        ),
        Err(e) => Check::fail("image", e.to_string(), "check the Docker daemon"),
        Ok(label) if label == CONTRACT_VERSION => Check::pass(
            "image",
            format!("{image} is present, agent contract {CONTRACT_VERSION}"),
        ),
        Ok(label) if label.is_empty() && cfg.allow_unlabeled_image => Check::warn(
            "image",
            format!("{image} has no org.windshift.agent-contract label (accepted: WSRUNNER_ALLOW_UNLABELED_IMAGE=1)"),
            "label the image org.windshift.agent-contract=v1",
        ),
        Ok(label) if label.is_empty() => Check::fail(
            "image",
            format!("{image} has no org.windshift.agent-contract label; the runner refuses it"),
            "use an agent image labelled org.windshift.agent-contract=v1, or set WSRUNNER_ALLOW_UNLABELED_IMAGE=1",
        ),
        Ok(label) => Check::fail(
            "image",
            format!("{image} speaks agent contract {label:?}, this runner speaks {CONTRACT_VERSION:?}"),
            "upgrade the runner or pin a matching image",
        ),
    }
}

// -- uid 1000 on the host (security issue 11) ----------------------------------------------

/// The login account with uid 1000 in `passwd` text, if any: agents run as uid 1000, so
/// without user-namespace remapping that host user owns the agent's processes and can read
/// their `/proc/<pid>/environ` (the run token). Shells like `nologin` or `false` do not count.
pub fn uid1000_login_account(passwd: &str) -> Option<String> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.trim().split(':').collect();
        let [user, _, uid, _, _, _, shell, ..] = fields.as_slice() else {
            return None;
        };
        let shell = shell.trim();
        let no_login = ["nologin", "false", "sync", "shutdown", "halt"]
            .iter()
            .any(|n| shell.rsplit('/').next() == Some(*n));
        (*uid == "1000" && !user.starts_with('#') && !no_login).then(|| (*user).to_owned())
    })
}

/// Whether `docker info` SecurityOptions (any text listing them) shows user-namespace remapping.
pub fn engine_remaps_userns(security_options: &str) -> bool {
    security_options.contains("name=userns")
}

/// The `userns` line: WARN when a host login account has uid 1000 and the engine does not remap.
pub fn userns_decision(passwd: &str, security_options: &str) -> Check {
    if engine_remaps_userns(security_options) {
        return Check::pass(
            "userns",
            "the engine remaps user namespaces: the agent's uid 1000 is no host account",
        );
    }
    match uid1000_login_account(passwd) {
        None => Check::pass("userns", "no host login account has uid 1000 (the agents' uid)"),
        Some(user) => Check::warn(
            "userns",
            format!("host account {user:?} has uid 1000, the uid agents run as, and the engine does not remap user namespaces: {user} can read every agent's /proc/<pid>/environ (its WS_TOKEN) and signal it"),
            "enable user-namespace remapping: \"userns-remap\": \"default\" in /etc/docker/daemon.json, then restart Docker (docs/SECURITY.md); or move that account off uid 1000",
        ),
    }
}

/// The `rootless` line: what the runner does about a rootless engine (docs/containers.md,
/// "Rootless Podman").
pub fn rootless_check(host: crate::effects::container::EngineHost) -> Check {
    match host.note() {
        None => Check::pass(
            "rootless",
            "the engine runs rootful: the agent's uid 1000 is host uid 1000 (or the engine's userns-remap), the runner hands it the checkout",
        ),
        Some((false, note)) => Check::pass("rootless", note),
        Some((true, note)) => Check::warn(
            "rootless",
            note,
            "see docs/containers.md, \"Rootless Podman\"",
        ),
    }
}

async fn userns_check(engine: &Engine, opts: &DoctorOptions) -> Check {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let security = match engine
        .cli(
            &["info", "--format", "{{json .SecurityOptions}}"],
            CALL_TIMEOUT,
        )
        .await
    {
        Ok(out) if out.success => out.stdout,
        _ => String::new(),
    };
    let mut check = userns_decision(&passwd, &security);
    if opts.in_container && !engine_remaps_userns(&security) {
        // Only the Docker host's accounts matter, and a container sees its own /etc/passwd.
        check
            .detail
            .push_str(" (checked this container's /etc/passwd: run doctor on the Docker host too)");
    }
    check
}

async fn git_check() -> Check {
    let out = tokio::time::timeout(
        CALL_TIMEOUT,
        tokio::process::Command::new("git")
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() => {
            Check::pass("git", String::from_utf8_lossy(&o.stdout).trim().to_owned())
        }
        Ok(Ok(o)) => Check::fail(
            "git",
            format!(
                "`git --version` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "reinstall git",
        ),
        Ok(Err(e)) => Check::fail(
            "git",
            format!("git is not available: {e}"),
            "install git (apt install git); repo preparation and push need it",
        ),
        Err(_) => Check::fail("git", "`git --version` hung", "reinstall git"),
    }
}

/// Finds `bin` as a path or on PATH, executable.
fn find_executable(bin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(bin))
        .find(|p| executable(p))
}

fn triage_check(bin: &str) -> Check {
    match find_executable(bin) {
        Some(p) => Check::pass("triage", format!("{bin} found at {}", p.display())),
        None => Check::warn(
            "triage",
            format!("{bin} not found (as a path or on PATH)"),
            "install windshift-triage next to windshift-runner (install.sh does; the runner image has it) or set WSRUNNER_TRIAGE_BIN; this runner does git work in-process, but agents and operators use the helper",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str, network: &str) -> ValidConfig {
        RunnerConfig {
            api_url: Some(url.into()),
            allow_insecure: Some("1".into()),
            network: Some(network.into()),
            allow_host_network: Some("1".into()),
            ..Default::default()
        }
        .validate(None)
        .unwrap()
    }

    #[test]
    fn uid_1000_login_account_warns_without_userns_remap() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                      ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n";
        assert_eq!(uid1000_login_account(passwd).as_deref(), Some("ubuntu"));
        let c = userns_decision(passwd, r#"["name=seccomp,profile=default"]"#);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(
            c.detail.contains("ubuntu") && c.detail.contains("environ"),
            "{c:?}"
        );
        assert!(
            c.fix.as_deref().is_some_and(|f| f.contains("userns-remap")),
            "{c:?}"
        );
        let remapped = r#"["name=seccomp,profile=default","name=userns"]"#;
        assert_eq!(userns_decision(passwd, remapped).status, Status::Pass);
        for quiet in [
            "svc:x:1000:1000::/var/lib/svc:/usr/sbin/nologin\n",
            "svc:x:1000:1000::/:/bin/false\n",
            "root:x:0:0:root:/root:/bin/bash\nagent:x:1001:1001::/home/agent:/bin/sh\n",
            "garbage without colons\n:::\n",
        ] {
            assert_eq!(uid1000_login_account(quiet), None, "{quiet}");
            assert_eq!(userns_decision(quiet, "[]").status, Status::Pass);
        }
    }

    #[test]
    fn rootless_engines_are_named_with_what_the_runner_does() {
        use crate::effects::container::EngineHost;
        let rootful = rootless_check(EngineHost::default());
        assert_eq!(rootful.status, Status::Pass);
        let podman = rootless_check(EngineHost {
            podman: true,
            rootless: true,
            cgroups_v1: false,
        });
        assert_eq!(podman.status, Status::Pass);
        assert!(
            podman.detail.contains("--userns=keep-id:uid=1000,gid=1000"),
            "{podman:?}"
        );
        let v1 = rootless_check(EngineHost {
            podman: true,
            rootless: true,
            cgroups_v1: true,
        });
        assert_eq!(v1.status, Status::Warn);
        assert!(v1.detail.contains("cgroups v1"), "{v1:?}");
        let docker = rootless_check(EngineHost {
            podman: false,
            rootless: true,
            cgroups_v1: false,
        });
        assert_eq!(docker.status, Status::Warn);
        assert!(docker.detail.contains("rootless Docker"), "{docker:?}");
    }

    #[test]
    fn pause_check_says_when_paused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pause_check(dir.path()).status, Status::Pass);
        std::fs::write(dir.path().join(crate::daemon::ctl::PAUSE_FILE), "{}").unwrap();
        let c = pause_check(dir.path());
        assert_eq!(c.status, Status::Warn);
        assert!(c.line().contains("ctl resume"), "{c:?}");
    }

    #[test]
    fn loopback_api_url_warns_unless_host_network() {
        let opts = DoctorOptions {
            min_free_bytes: 0,
            in_container: false,
        };
        let c = loopback_check(&cfg("http://127.0.0.1:9/api", "coding-agent-egress"), &opts);
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.detail.contains("localhost is the container itself"),
            "{c:?}"
        );
        let c = loopback_check(&cfg("http://localhost:9/api", "host"), &opts);
        assert_eq!(c.status, Status::Pass);
        let c = loopback_check(&cfg("https://ws.example.com/api", "none"), &opts);
        assert_eq!(c.status, Status::Pass);
        let inside = DoctorOptions {
            in_container: true,
            ..opts
        };
        let c = loopback_check(&cfg("http://localhost:9/api", "host"), &inside);
        assert_eq!(c.status, Status::Warn, "{c:?}");
    }

    #[test]
    fn dir_probe_reports_a_file_in_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("file"), "x").unwrap();
        let opts = DoctorOptions {
            min_free_bytes: 0,
            in_container: false,
        };
        let c = dir_check(
            "cache",
            &tmp.path().join("file/cache"),
            "WSRUNNER_CACHE_ROOT",
            &opts,
            0,
        );
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("is not a directory"), "{c:?}");
        let c = dir_check(
            "cache",
            &tmp.path().join("new/cache"),
            "WSRUNNER_CACHE_ROOT",
            &opts,
            0,
        );
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.detail.contains("will be created"), "{c:?}");
        assert!(
            !tmp.path().join("new").exists(),
            "doctor must not create directories"
        );
        let huge = DoctorOptions {
            min_free_bytes: u64::MAX,
            in_container: false,
        };
        let c = dir_check("cache", tmp.path(), "WSRUNNER_CACHE_ROOT", &huge, 0);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("free"), "{c:?}");
        // Above the failure floor but below WSRUNNER_DISK_FREE_WARN: a warning naming it.
        let c = dir_check("cache", tmp.path(), "WSRUNNER_CACHE_ROOT", &opts, u64::MAX);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.detail.contains("WSRUNNER_DISK_FREE_WARN"), "{c:?}");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn lines_are_redacted() {
        let secret = format!("wsrc_{}", "q".repeat(40));
        let c = Check::fail("credential", format!("bad {secret}"), "fix");
        assert!(!c.line().contains(&secret), "{}", c.line());
        assert!(c.line().starts_with("FAIL credential"));
    }
}
