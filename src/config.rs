//! Runner configuration: every variable of spec 4.7 with upstream's defaults, plus ours.
//!
//! Each setting is a command-line flag with an environment-variable fallback (flags win), so
//! `--help` documents both. Values are parsed into [`RunnerConfig`]; [`RunnerConfig::validate`]
//! turns them into a [`ValidConfig`] or a [`ConfigError`] naming the variable and the fix.
//! Upstream treats an empty variable like an unset one for settings with defaults; clap does
//! the same for `env` fallbacks only when told to, so every defaulted setting passes through
//! [`non_empty_or`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Default upstream values (spec 4.7).
pub const DEFAULT_CACHE_ROOT: &str = "/var/lib/windshift-runner/cache";
pub const DEFAULT_JOURNAL_DIR: &str = "/var/lib/windshift-runner/journal";
pub const DEFAULT_NETWORK: &str = "coding-agent-egress";
/// The guide's documented default (spec 11: follow the guide, not the newest code's 10 s).
pub const DEFAULT_POLL_INTERVAL: &str = "2s";
pub const DEFAULT_HEARTBEAT_INTERVAL: &str = "30s";
/// Ours: how long SIGTERM lets in-flight runs finish before cancelling them. The systemd unit's
/// TimeoutStopSec must exceed it.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10m";
/// Ours: a per-run wall-clock limit, below the server's 8 h backstop so the runner, not the
/// reaper, reports the verdict.
pub const DEFAULT_RUN_TIMEOUT: &str = "7h30m";
/// Ours: how long the runner stays silent (no claim, no heartbeat) after a claim whose answer
/// was lost, so the server's reaper (90 s liveness window, checked about once a minute) fails
/// a run it may have handed us unseen. "0" turns the pause off.
pub const DEFAULT_LEASE_YIELD: &str = "160s";
/// Ours: idle bare caches older than this are evicted (upstream never evicts).
pub const DEFAULT_CACHE_MAX_AGE: &str = "168h";
/// Ours: `doctor` warns below this much free space on the cache or journal filesystem.
pub const DEFAULT_DISK_FREE_WARN: &str = "10g";
/// Ours: terminal runs older than this are archived out of the journal.
pub const DEFAULT_JOURNAL_RETENTION: &str = "336h";
/// `WSRUNNER_JOURNAL_MAX_BYTES` default: about 60,000 terminal runs of a typical size.
pub const DEFAULT_JOURNAL_MAX_BYTES: u64 = 1 << 30;
/// The smallest budget accepted: sled works in 512 KiB segments and needs some of them.
pub const MIN_JOURNAL_MAX_BYTES: u64 = 8 << 20;

/// `WSRUNNER_JOURNAL_MAX_BYTES`: a byte count (k, m, g suffixes), `0` for no budget.
fn journal_max_bytes(text: Option<String>) -> Result<Option<u64>, ConfigError> {
    let Some(text) = text else {
        return Ok(Some(DEFAULT_JOURNAL_MAX_BYTES));
    };
    if text.trim() == "0" {
        return Ok(None);
    }
    crate::effects::engine_api::parse_bytes(&text)
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n >= MIN_JOURNAL_MAX_BYTES)
        .map(Some)
        .ok_or_else(|| {
            invalid(
                "WSRUNNER_JOURNAL_MAX_BYTES",
                &text,
                "must be a byte count of at least 8m, e.g. 512m or 2g (k, m, g are KiB, MiB, GiB), or 0 for no budget",
            )
        })
}
/// Ours: how long a git network step (cache fetch/clone, ls-remote, push) keeps retrying
/// transient failures, from its first failure; `0` means one attempt.
pub const DEFAULT_GIT_RETRY_TIMEOUT: &str = "3m";

/// Every `windshift-runner run` setting. Field docs become `--help` text.
#[derive(Args, Clone, Default)]
pub struct RunnerConfig {
    /// Windshift API base URL ending in /api (e.g. https://windshift.example.com/api).
    #[arg(long, env = "WS_API_URL", hide_env_values = true)]
    pub api_url: Option<String>,
    /// One-time pool registration token (wsrt_…); needed only until a credential is stored.
    /// Environment only (`WSRUNNER_REGISTRATION_TOKEN`, [`RunnerConfig::read_secrets_from_env`]).
    #[arg(skip)]
    pub registration_token: Option<String>,
    /// Per-instance credential (wsrc_…) injected directly; skips registration when accepted.
    /// Environment only (`WSRUNNER_CREDENTIAL`).
    #[arg(skip)]
    pub credential: Option<String>,
    /// `--credential` / `--registration-token` are parsed only to be refused (exit 78): a
    /// secret in argv is visible in the process list. Hidden from `--help`.
    #[arg(long = "credential", hide = true, num_args = 0..=1, default_missing_value = "")]
    pub argv_credential: Option<String>,
    #[arg(long = "registration-token", hide = true, num_args = 0..=1, default_missing_value = "")]
    pub argv_registration_token: Option<String>,
    /// Where the credential is stored and reused [default: <cache root>/credential].
    #[arg(long, env = "WSRUNNER_CREDENTIAL_FILE")]
    pub credential_file: Option<PathBuf>,
    /// Exactly 1 allows a plaintext http:// WS_API_URL (local development only).
    #[arg(long, env = "WSRUNNER_ALLOW_INSECURE")]
    pub allow_insecure: Option<String>,
    /// Display name sent at registration [default: hostname, else windshift-runner].
    #[arg(long, env = "WSRUNNER_NAME")]
    pub name: Option<String>,
    /// Default agent image for coding_agent runs (else CODING_AGENT_RUNNER_IMAGE).
    #[arg(long, env = "WSRUNNER_IMAGE")]
    pub image: Option<String>,
    /// Comma-separated exact image references allowed as per-run overrides.
    #[arg(long, env = "WSRUNNER_ALLOWED_IMAGES")]
    pub allowed_images: Option<String>,
    /// Exactly 1 accepts an agent image without the org.windshift.agent-contract label.
    #[arg(long, env = "WSRUNNER_ALLOW_UNLABELED_IMAGE")]
    pub allow_unlabeled_image: Option<String>,
    /// Docker-compatible CLI (docker, or a rootful podman); else CODING_AGENT_DOCKER_BINARY [default: docker].
    #[arg(long, env = "WSRUNNER_DOCKER")]
    pub docker: Option<String>,
    /// Triage helper; git work runs in-process, this is checked by `doctor` [default: windshift-triage].
    #[arg(long, env = "WSRUNNER_TRIAGE_BIN")]
    pub triage_bin: Option<String>,
    /// Bare-clone cache and checkout root; else CODING_AGENT_WORKTREE_ROOT [default: /var/lib/windshift-runner/cache].
    #[arg(long, env = "WSRUNNER_CACHE_ROOT")]
    pub cache_root: Option<PathBuf>,
    /// How often to check for work when idle, Go duration syntax [default: 2s].
    #[arg(long, env = "WSRUNNER_POLL_INTERVAL")]
    pub poll_interval: Option<String>,
    /// How often to renew the runner lease, Go duration syntax [default: 30s].
    #[arg(long, env = "WSRUNNER_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// Fallback prompt, used only when a job carries none.
    #[arg(long, env = "WSRUNNER_INITIAL_PROMPT")]
    pub initial_prompt: Option<String>,
    /// Runs executed at once [default: 1].
    #[arg(long, env = "WSRUNNER_CONCURRENCY")]
    pub concurrency: Option<String>,
    /// How long SIGTERM lets in-flight runs finish before they are cancelled [default: 10m].
    #[arg(long, env = "WSRUNNER_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Silence after a claim whose answer was lost, so the server reaps a run it may have
    /// handed out unseen; "0" disables [default: 160s].
    #[arg(long, env = "WSRUNNER_LEASE_YIELD")]
    pub lease_yield: Option<String>,
    /// Wall-clock limit of one run; past it the run is cancelled and reported [default: 7h30m].
    #[arg(long, env = "WSRUNNER_RUN_TIMEOUT")]
    pub run_timeout: Option<String>,
    /// Docker network for agent containers; else CODING_AGENT_NETWORK [default: coding-agent-egress].
    #[arg(long, env = "WSRUNNER_NETWORK")]
    pub network: Option<String>,
    /// Max processes per agent container; else CODING_AGENT_PIDS_LIMIT [default: 512].
    #[arg(long, env = "WSRUNNER_PIDS_LIMIT")]
    pub pids_limit: Option<String>,
    /// Memory (and memory+swap) limit per agent container; else CODING_AGENT_MEMORY [default: 4g].
    #[arg(long, env = "WSRUNNER_MEMORY")]
    pub memory: Option<String>,
    /// CPU limit per agent container; else CODING_AGENT_CPUS [default: 2].
    #[arg(long, env = "WSRUNNER_CPUS")]
    pub cpus: Option<String>,
    /// Journal (sled) directory [default: /var/lib/windshift-runner/journal].
    #[arg(long, env = "WSRUNNER_JOURNAL_DIR")]
    pub journal_dir: Option<PathBuf>,
    /// Terminal runs older than this are archived out of the journal [default: 336h].
    #[arg(long, env = "WSRUNNER_JOURNAL_RETENTION")]
    pub journal_retention: Option<String>,
    /// Size budget of the journal on disk: past it the oldest terminal runs are deleted
    /// (never a run in flight); `0` is no budget [default: 1g].
    #[arg(long, env = "WSRUNNER_JOURNAL_MAX_BYTES")]
    pub journal_max_bytes: Option<String>,
    /// Idle bare caches older than this are evicted [default: 168h].
    #[arg(long, env = "WSRUNNER_CACHE_MAX_AGE")]
    pub cache_max_age: Option<String>,
    /// Total disk use of the bare caches above which idle ones are evicted, oldest-used first
    /// (k/m/g suffixes; 0 = no cap) [default: 0].
    #[arg(long, env = "WSRUNNER_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<String>,
    /// Agent images pulled for per-run overrides (WSRUNNER_ALLOWED_IMAGES, never WSRUNNER_IMAGE)
    /// are removed after this long unused; 0 = never [default: 0].
    #[arg(long, env = "WSRUNNER_IMAGE_PRUNE_AFTER")]
    pub image_prune_after: Option<String>,
    /// `doctor` warns when the cache or journal filesystem has less free space (k/m/g) [default: 10g].
    #[arg(long, env = "WSRUNNER_DISK_FREE_WARN")]
    pub disk_free_warn: Option<String>,
    /// How long a git network step retries HTTP 5xx/429 and connection errors, 0 = never [default: 3m].
    #[arg(long, env = "WSRUNNER_GIT_RETRY_TIMEOUT")]
    pub git_retry_timeout: Option<String>,
    /// Address for /metrics (Prometheus) and /healthz, e.g. 127.0.0.1:9464 [default: off].
    #[arg(long, env = "WSRUNNER_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "WSRUNNER_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Model id put into a coding agent's env as LLM_MODEL when the server sends none; else
    /// CODING_AGENT_LLM_MODEL.
    #[arg(long, env = "WSRUNNER_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// Which name supplied each Option A-capable setting ([`RunnerConfig::apply_option_a`]).
    #[arg(skip)]
    pub origins: Vec<Origin>,
    // -- Container hardening (security issue 11, docs/containers.md).
    /// Exactly 1 accepts WSRUNNER_NETWORK=host (agents share the host's network stack).
    #[arg(long, env = "WSRUNNER_ALLOW_HOST_NETWORK")]
    pub allow_host_network: Option<String>,
    /// OCI runtime for agent containers, passed as --runtime (e.g. runsc) [default: the engine's].
    #[arg(long, env = "WSRUNNER_RUNTIME")]
    pub runtime: Option<String>,
    /// Bytes one agent container may print before it is stopped (k/m/g suffixes) [default: 256m].
    #[arg(long, env = "WSRUNNER_AGENT_OUTPUT_LIMIT")]
    pub agent_output_limit: Option<String>,
    /// Private (0700) directory of the `ctl` socket and the persisted pause [default: ctl beside the journal dir].
    #[arg(long, env = "WSRUNNER_CTL_DIR")]
    pub ctl_dir: Option<PathBuf>,
    /// Engine driver: api (the engine's API socket), cli (the WSRUNNER_DOCKER binary) or auto
    /// (the API when its socket answers, else the CLI) [default: auto].
    #[arg(long, env = "WSRUNNER_ENGINE_DRIVER")]
    pub engine_driver: Option<String>,
}

// Raw settings may hold the registration token and the credential: never print them.
impl std::fmt::Debug for RunnerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunnerConfig").finish_non_exhaustive()
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that passed validation. Secrets are kept out of `Debug`.
#[derive(Clone)]
pub struct ValidConfig {
    pub api_url: String,
    pub allow_insecure: bool,
    pub registration_token: Option<String>,
    pub credential: Option<String>,
    pub credential_file: PathBuf,
    pub name: String,
    pub image: String,
    pub allowed_images: Vec<String>,
    pub allow_unlabeled_image: bool,
    pub docker: String,
    pub triage_bin: String,
    pub cache_root: PathBuf,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    pub initial_prompt: String,
    pub concurrency: usize,
    pub drain_timeout: Duration,
    /// Zero: off.
    pub lease_yield: Duration,
    pub run_timeout: Duration,
    pub network: String,
    pub pids_limit: u32,
    pub memory: String,
    pub cpus: String,
    pub journal_dir: PathBuf,
    pub journal_retention: Duration,
    /// `None`: no budget (`WSRUNNER_JOURNAL_MAX_BYTES=0`).
    pub journal_max_bytes: Option<u64>,
    pub cache_max_age: Duration,
    /// `WSRUNNER_CACHE_MAX_BYTES` (none: no total-size cap).
    pub cache_max_bytes: Option<u64>,
    /// `WSRUNNER_IMAGE_PRUNE_AFTER` (none: override images are never pruned).
    pub image_prune_after: Option<Duration>,
    /// `WSRUNNER_DISK_FREE_WARN`: doctor's free-space warning threshold.
    pub disk_free_warn: u64,
    /// Budget of git's network steps across transient failures (zero: one attempt).
    pub git_retry_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// The host's default `LLM_MODEL` for coding agents (none: the server must send one).
    pub llm_model: Option<String>,
    /// Which name supplied each Option A-capable setting (empty when not read from the env).
    pub origins: Vec<Origin>,
    /// Container hardening (security issue 11): `WSRUNNER_RUNTIME`, `WSRUNNER_AGENT_OUTPUT_LIMIT`.
    pub runtime: Option<String>,
    pub agent_output_limit: u64,
    /// `ctl` socket and pause file (docs/daemon.md, "Pause and resume").
    pub ctl_dir: PathBuf,
    /// `WSRUNNER_ENGINE_DRIVER` (docs/containers.md, "Engine drivers").
    pub engine_driver: crate::effects::container::DriverChoice,
}

impl std::fmt::Debug for ValidConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "set" } else { "unset" };
        f.debug_struct("ValidConfig")
            .field("api_url", &crate::redact::redact(&self.api_url))
            .field("allow_insecure", &self.allow_insecure)
            .field("registration_token", &set(&self.registration_token))
            .field("credential", &set(&self.credential))
            .field("credential_file", &self.credential_file)
            .field("name", &self.name)
            .field("image", &self.image)
            .field("allowed_images", &self.allowed_images)
            .field("allow_unlabeled_image", &self.allow_unlabeled_image)
            .field("docker", &self.docker)
            .field("cache_root", &self.cache_root)
            .field("poll_interval", &self.poll_interval)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("concurrency", &self.concurrency)
            .field("drain_timeout", &self.drain_timeout)
            .field("lease_yield", &self.lease_yield)
            .field("run_timeout", &self.run_timeout)
            .field("network", &self.network)
            .field("pids_limit", &self.pids_limit)
            .field("memory", &self.memory)
            .field("cpus", &self.cpus)
            .field("journal_dir", &self.journal_dir)
            .field("journal_retention", &self.journal_retention)
            .field("journal_max_bytes", &self.journal_max_bytes)
            .field("cache_max_age", &self.cache_max_age)
            .field("git_retry_timeout", &self.git_retry_timeout)
            .field("metrics_addr", &self.metrics_addr)
            .field("log_format", &self.log_format)
            .field("llm_model", &self.llm_model)
            .field("runtime", &self.runtime)
            .field("agent_output_limit", &self.agent_output_limit)
            .field("cache_max_bytes", &self.cache_max_bytes)
            .field("image_prune_after", &self.image_prune_after)
            .field("disk_free_warn", &self.disk_free_warn)
            .field("ctl_dir", &self.ctl_dir)
            .finish()
    }
}

/// A setting that cannot be used; the message names the variable and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("required environment variable WS_API_URL is not set: set it to your Windshift API base URL ending in /api (e.g. https://windshift.example.com/api)")]
    MissingApiUrl,
    #[error("WS_API_URL must be https:// (got {scheme}://…): use an HTTPS URL ending in /api, or set WSRUNNER_ALLOW_INSECURE=1 only for local development")]
    InsecureApiUrl { scheme: String },
    #[error("WS_API_URL {url:?} is not an http(s) URL: use the form https://host/api")]
    BadApiUrl { url: String },
    #[error("{flag} is refused: a secret on the command line is visible in the process list; set {var} in the environment instead (e.g. the systemd EnvironmentFile or the compose env_file)")]
    SecretFlag {
        flag: &'static str,
        var: &'static str,
    },
    #[error("invalid {var} {value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// The trimmed value, or `default` when the setting is unset or empty (upstream's rule).
fn non_empty_or(value: &Option<String>, default: &str) -> String {
    match value.as_deref().map(str::trim) {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => default.to_owned(),
    }
}

/// `Some(trimmed)` when set and non-empty.
fn non_empty(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A Go duration where zero is meaningful (it turns the feature off).
fn go_duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    parse_go_duration(value).map_err(|e| {
        invalid(
            var,
            value,
            format!("{e}; use Go duration syntax such as 500ms, 10s, 5m or 1h30m"),
        )
    })
}

/// A byte count: digits, optionally with k, m or g (KiB, MiB, GiB), like `WSRUNNER_MEMORY`.
fn byte_count(var: &'static str, value: &str) -> Result<u64, ConfigError> {
    crate::effects::engine_api::parse_bytes(value.trim())
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| invalid(var, value, "must be a byte count like 50g, 512m or 0"))
}

fn positive_duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = go_duration(var, value)?;
    if d.is_zero() {
        return Err(invalid(var, value, "must be greater than zero"));
    }
    Ok(d)
}

impl ValidConfig {
    /// The container engine settings these options select, for runner instance `instance`
    /// (the daemon's engine and doctor's probe engine are the same shape).
    pub fn container_config(
        &self,
        instance: impl Into<String>,
    ) -> crate::effects::container::ContainerConfig {
        crate::effects::container::ContainerConfig {
            docker: self.docker.clone(),
            network: self.network.clone(),
            pids_limit: self.pids_limit,
            memory: self.memory.clone(),
            cpus: self.cpus.clone(),
            default_image: self.image.clone(),
            allowed_images: self.allowed_images.clone(),
            image_use_file: Some(
                self.cache_root
                    .join(crate::effects::container::IMAGE_USE_FILE),
            ),
            allow_unlabeled: self.allow_unlabeled_image,
            instance: instance.into(),
            runtime: self.runtime.clone(),
            output_limit: self.agent_output_limit,
            driver: self.engine_driver,
            api_socket: None,
        }
    }
}

/// `WSRUNNER_LEASE_YIELD`: "0" turns it off; otherwise a duration. A pause shorter than the
/// server's liveness window (90 s upstream) cannot let its reaper act; it is not refused,
/// because tests pair a short pause with a devserver whose window is short too.
fn lease_yield(value: &str) -> Result<Duration, ConfigError> {
    const VAR: &str = "WSRUNNER_LEASE_YIELD";
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    positive_duration(VAR, value)
}

// --- Option A fallbacks ---------------------------------------------------------------------
// The guide's Option A (agents on the Windshift host) configures the same engine settings as
// `CODING_AGENT_*`. Moving such a host to this runner should not mean renaming them, so each is
// read when the runner's own variable is unset or empty. Precedence: flag, then the runner's
// variable, then the Option A one, then the default. `CODING_AGENT_WS_API_URL` is a server
// setting (the address handed to agents) and is not read (docs/deploy.md).

/// Where a setting's value came from: a flag, a variable name, or `"default"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The setting, as the start-up log and doctor name it (e.g. `image`).
    pub setting: &'static str,
    pub from: &'static str,
}

/// One setting that an Option A variable can supply.
struct OptionA {
    setting: &'static str,
    flag: &'static str,
    own: &'static str,
    option_a: &'static str,
    get: fn(&RunnerConfig) -> Option<String>,
    set: fn(&mut RunnerConfig, String),
}

macro_rules! option_a {
    ($setting:literal, $field:ident, $own:literal, $theirs:literal) => {
        OptionA {
            setting: $setting,
            flag: concat!("--", $setting),
            own: $own,
            option_a: $theirs,
            get: |c| c.$field.clone(),
            set: |c, v| c.$field = Some(v),
        }
    };
}

const OPTION_A: [OptionA; 8] = [
    option_a!(
        "image",
        image,
        "WSRUNNER_IMAGE",
        "CODING_AGENT_RUNNER_IMAGE"
    ),
    OptionA {
        setting: "cache-root",
        flag: "--cache-root",
        own: "WSRUNNER_CACHE_ROOT",
        option_a: "CODING_AGENT_WORKTREE_ROOT",
        get: |c| c.cache_root.as_ref().map(|p| p.display().to_string()),
        set: |c, v| c.cache_root = Some(PathBuf::from(v)),
    },
    option_a!(
        "docker",
        docker,
        "WSRUNNER_DOCKER",
        "CODING_AGENT_DOCKER_BINARY"
    ),
    option_a!(
        "network",
        network,
        "WSRUNNER_NETWORK",
        "CODING_AGENT_NETWORK"
    ),
    option_a!(
        "pids-limit",
        pids_limit,
        "WSRUNNER_PIDS_LIMIT",
        "CODING_AGENT_PIDS_LIMIT"
    ),
    option_a!("memory", memory, "WSRUNNER_MEMORY", "CODING_AGENT_MEMORY"),
    option_a!("cpus", cpus, "WSRUNNER_CPUS", "CODING_AGENT_CPUS"),
    option_a!(
        "llm-model",
        llm_model,
        "WSRUNNER_LLM_MODEL",
        "CODING_AGENT_LLM_MODEL"
    ),
];

impl RunnerConfig {
    /// [`RunnerConfig::apply_option_a`] with the process environment.
    pub fn read_option_a_from_env(&mut self) {
        self.apply_option_a(|name| std::env::var(name).ok());
    }

    /// Fills each unset (or empty) Option A-capable setting from its `CODING_AGENT_*` variable
    /// and records in `origins` which name supplied every one. A value equal to the runner's
    /// own variable is credited to it (clap does not say whether the flag repeated it).
    pub fn apply_option_a(&mut self, env: impl Fn(&str) -> Option<String>) {
        let set = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
        self.origins.clear();
        for row in &OPTION_A {
            let from = match set((row.get)(self)) {
                Some(v) if set(env(row.own)).is_some_and(|e| e.trim() == v.trim()) => row.own,
                Some(_) => row.flag,
                None => match set(env(row.option_a)) {
                    Some(v) => {
                        (row.set)(self, v);
                        row.option_a
                    }
                    None => "default",
                },
            };
            self.origins.push(Origin {
                setting: row.setting,
                from,
            });
        }
    }

    /// The variable to name in an error about `own`'s value: the Option A name when that
    /// supplied it.
    fn var(&self, own: &'static str) -> &'static str {
        OPTION_A
            .iter()
            .find(|row| row.own == own)
            .filter(|row| {
                self.origins
                    .iter()
                    .any(|o| o.setting == row.setting && o.from == row.option_a)
            })
            .map_or(own, |row| row.option_a)
    }
}

impl ValidConfig {
    /// `image from CODING_AGENT_RUNNER_IMAGE, docker default, …` for the start-up log and doctor.
    pub fn origins_line(&self) -> String {
        let parts: Vec<String> = self
            .origins
            .iter()
            .map(|o| match o.from {
                "default" => format!("{} default", o.setting),
                from => format!("{} from {from}", o.setting),
            })
            .collect();
        parts.join(", ")
    }
}

/// A model id goes into the agent's env file: one printable line, bounded.
fn llm_model(var: &'static str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(model) = value else { return Ok(None) };
    if model.len() > 256 || model.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            var,
            &model.chars().take(80).collect::<String>(),
            "must be a model id of at most 256 characters without spaces or control characters",
        ));
    }
    Ok(Some(model))
}

impl RunnerConfig {
    /// Reads the two secret settings, which have no command-line flag.
    pub fn read_secrets_from_env(&mut self) {
        self.registration_token = std::env::var("WSRUNNER_REGISTRATION_TOKEN").ok();
        self.credential = std::env::var("WSRUNNER_CREDENTIAL").ok();
    }

    /// Checks every setting and resolves defaults. `hostname` is the machine's name (passed in
    /// so validation stays free of IO).
    pub fn validate(&self, hostname: Option<&str>) -> Result<ValidConfig, ConfigError> {
        if self.argv_credential.is_some() {
            return Err(ConfigError::SecretFlag {
                flag: "--credential",
                var: "WSRUNNER_CREDENTIAL",
            });
        }
        if self.argv_registration_token.is_some() {
            return Err(ConfigError::SecretFlag {
                flag: "--registration-token",
                var: "WSRUNNER_REGISTRATION_TOKEN",
            });
        }
        let allow_insecure = self.allow_insecure.as_deref() == Some("1");
        let api_url = non_empty(&self.api_url).ok_or(ConfigError::MissingApiUrl)?;
        let api_url = api_url.trim_end_matches('/').to_owned();
        let lower = api_url.to_ascii_lowercase();
        if !lower.starts_with("https://") {
            if lower.starts_with("http://") {
                if !allow_insecure {
                    return Err(ConfigError::InsecureApiUrl {
                        scheme: "http".into(),
                    });
                }
            } else {
                return Err(ConfigError::BadApiUrl { url: api_url });
            }
        }

        let cache_root = self
            .cache_root
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT));
        if !cache_root.is_absolute() {
            return Err(invalid(
                self.var("WSRUNNER_CACHE_ROOT"),
                &cache_root.display().to_string(),
                "must be an absolute path",
            ));
        }
        let credential_file = self
            .credential_file
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| cache_root.join("credential"));
        let journal_dir = self
            .journal_dir
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNAL_DIR));

        let ctl_dir = ctl_dir(self.ctl_dir.as_deref(), Some(&journal_dir));
        if ctl_dir.join(CTL_SOCKET).as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "WSRUNNER_CTL_DIR",
                &ctl_dir.display().to_string(),
                "is too long for a unix socket path: choose a path under 100 bytes",
            ));
        }
        let concurrency_text = non_empty_or(&self.concurrency, "1");
        let concurrency = concurrency_text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                invalid(
                    "WSRUNNER_CONCURRENCY",
                    &concurrency_text,
                    "must be a whole number from 1 to 64",
                )
            })?;
        let pids_text = non_empty_or(&self.pids_limit, "512");
        let pids_limit = pids_text
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                invalid(
                    self.var("WSRUNNER_PIDS_LIMIT"),
                    &pids_text,
                    "must be a positive whole number",
                )
            })?;
        let memory = non_empty_or(&self.memory, "4g");
        if !is_docker_memory(&memory) {
            return Err(invalid(
                self.var("WSRUNNER_MEMORY"),
                &memory,
                "must be a number with an optional unit b, k, m or g (e.g. 4g)",
            ));
        }
        let cpus = non_empty_or(&self.cpus, "2");
        if !cpus.parse::<f64>().is_ok_and(|c| c > 0.0 && c.is_finite()) {
            return Err(invalid(
                self.var("WSRUNNER_CPUS"),
                &cpus,
                "must be a positive number (e.g. 2 or 1.5)",
            ));
        }
        let network = non_empty_or(&self.network, DEFAULT_NETWORK);
        let metrics_addr = match non_empty(&self.metrics_addr) {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "WSRUNNER_METRICS_ADDR",
                    &text,
                    "must be an address with a port, e.g. 127.0.0.1:9464",
                )
            })?),
        };
        let log_format = match non_empty_or(&self.log_format, "text").as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "WSRUNNER_LOG_FORMAT",
                    other,
                    "must be text or json",
                ))
            }
        };
        let allowed_images: Vec<String> = non_empty(&self.allowed_images)
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let name = non_empty(&self.name)
            .or_else(|| {
                hostname
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "windshift-runner".to_owned());
        let (runtime, agent_output_limit) = self.container_hardening(&network, &allowed_images)?;

        Ok(ValidConfig {
            api_url,
            allow_insecure,
            registration_token: non_empty(&self.registration_token),
            credential: non_empty(&self.credential),
            credential_file,
            name,
            image: non_empty(&self.image).unwrap_or_default(),
            allowed_images,
            allow_unlabeled_image: self.allow_unlabeled_image.as_deref() == Some("1"),
            docker: non_empty_or(&self.docker, "docker"),
            triage_bin: non_empty_or(&self.triage_bin, "windshift-triage"),
            cache_root,
            poll_interval: positive_duration(
                "WSRUNNER_POLL_INTERVAL",
                &non_empty_or(&self.poll_interval, DEFAULT_POLL_INTERVAL),
            )?,
            heartbeat_interval: positive_duration(
                "WSRUNNER_HEARTBEAT_INTERVAL",
                &non_empty_or(&self.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL),
            )?,
            initial_prompt: non_empty(&self.initial_prompt).unwrap_or_default(),
            concurrency,
            drain_timeout: positive_duration(
                "WSRUNNER_DRAIN_TIMEOUT",
                &non_empty_or(&self.drain_timeout, DEFAULT_DRAIN_TIMEOUT),
            )?,
            lease_yield: lease_yield(&non_empty_or(&self.lease_yield, DEFAULT_LEASE_YIELD))?,
            run_timeout: positive_duration(
                "WSRUNNER_RUN_TIMEOUT",
                &non_empty_or(&self.run_timeout, DEFAULT_RUN_TIMEOUT),
            )?,
            network,
            pids_limit,
            memory,
            cpus,
            journal_dir,
            journal_retention: positive_duration(
                "WSRUNNER_JOURNAL_RETENTION",
                &non_empty_or(&self.journal_retention, DEFAULT_JOURNAL_RETENTION),
            )?,
            journal_max_bytes: journal_max_bytes(non_empty(&self.journal_max_bytes))?,
            cache_max_age: positive_duration(
                "WSRUNNER_CACHE_MAX_AGE",
                &non_empty_or(&self.cache_max_age, DEFAULT_CACHE_MAX_AGE),
            )?,
            cache_max_bytes: match byte_count(
                "WSRUNNER_CACHE_MAX_BYTES",
                &non_empty_or(&self.cache_max_bytes, "0"),
            )? {
                0 => None,
                n => Some(n),
            },
            image_prune_after: Some(go_duration(
                "WSRUNNER_IMAGE_PRUNE_AFTER",
                &non_empty_or(&self.image_prune_after, "0"),
            )?)
            .filter(|d| !d.is_zero()),
            disk_free_warn: byte_count(
                "WSRUNNER_DISK_FREE_WARN",
                &non_empty_or(&self.disk_free_warn, DEFAULT_DISK_FREE_WARN),
            )?,
            git_retry_timeout: go_duration(
                "WSRUNNER_GIT_RETRY_TIMEOUT",
                &non_empty_or(&self.git_retry_timeout, DEFAULT_GIT_RETRY_TIMEOUT),
            )?,
            metrics_addr,
            log_format,
            llm_model: llm_model(self.var("WSRUNNER_LLM_MODEL"), non_empty(&self.llm_model))?,
            origins: self.origins.clone(),
            runtime,
            agent_output_limit,
            ctl_dir,
            engine_driver: match non_empty(&self.engine_driver).as_deref() {
                None | Some("auto") => crate::effects::container::DriverChoice::Auto,
                Some("api") => crate::effects::container::DriverChoice::Api,
                Some("cli") => crate::effects::container::DriverChoice::Cli,
                Some(other) => {
                    return Err(invalid(
                        "WSRUNNER_ENGINE_DRIVER",
                        other,
                        "must be auto, api or cli",
                    ))
                }
            },
        })
    }

    /// The container settings of security issue 11 (docs/containers.md): image references,
    /// the host network opt-in, the runtime name and the output limit.
    fn container_hardening(
        &self,
        network: &str,
        allowed_images: &[String],
    ) -> Result<(Option<String>, u64), ConfigError> {
        use crate::effects::container as c;
        let image = non_empty(&self.image);
        for (var, image) in image.iter().map(|i| ("WSRUNNER_IMAGE", i)).chain(
            allowed_images
                .iter()
                .map(|i| ("WSRUNNER_ALLOWED_IMAGES", i)),
        ) {
            if let Some(why) = c::image_ref_problem(image) {
                return Err(invalid(var, image, format!("{why}: use an image reference [registry[:port]/]name[:tag][@sha256:<digest>]")));
            }
        }
        if network == "host" && self.allow_host_network.as_deref() != Some("1") {
            return Err(invalid("WSRUNNER_NETWORK", network, "host networking gives every agent the host's network stack (its services on 127.0.0.1, no isolation); use a dedicated network, or set WSRUNNER_ALLOW_HOST_NETWORK=1 to accept it"));
        }
        let runtime = non_empty(&self.runtime);
        if let Some(r) = runtime.as_deref().filter(|r| !c::valid_runtime_name(r)) {
            return Err(invalid(
                "WSRUNNER_RUNTIME",
                r,
                "must be a runtime name like runsc or runc ([A-Za-z0-9._-], not starting with '-')",
            ));
        }
        let limit = match non_empty(&self.agent_output_limit) {
            None => c::DEFAULT_OUTPUT_LIMIT,
            Some(text) => c::parse_output_limit(&text).ok_or_else(|| {
                invalid("WSRUNNER_AGENT_OUTPUT_LIMIT", &text, "must be a byte count of at least 64k, e.g. 256m or 1g (k, m, g are KiB, MiB, GiB)")
            })?,
        };
        Ok((runtime, limit))
    }
}

/// The `ctl` socket's file name inside the control directory.
pub const CTL_SOCKET: &str = "ctl.sock";
/// `sun_path` holds 108 bytes with the NUL; leave room.
const MAX_SOCKET_PATH: usize = 104;

/// The control directory: `WSRUNNER_CTL_DIR`, else `ctl` beside the journal directory
/// (`/var/lib/windshift-runner/ctl` by default). Shared by `run`, `ctl` and `doctor`.
pub fn ctl_dir(
    ctl_dir: Option<&std::path::Path>,
    journal_dir: Option<&std::path::Path>,
) -> PathBuf {
    if let Some(dir) = ctl_dir.filter(|p| !p.as_os_str().is_empty()) {
        return dir.to_path_buf();
    }
    let journal = journal_dir
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new(DEFAULT_JOURNAL_DIR));
    journal
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .join("ctl")
}

/// Docker's memory syntax: digits with an optional b/k/m/g suffix (either case).
fn is_docker_memory(text: &str) -> bool {
    let digits = text.trim_end_matches(|c: char| "bkmgBKMG".contains(c));
    let suffix_len = text.len() - digits.len();
    suffix_len <= 1 && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Why a duration string is not Go duration syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("negative durations are not allowed")]
    Negative,
    #[error("missing unit in duration (use ns, us, ms, s, m or h)")]
    MissingUnit,
    #[error("unknown unit {0:?} in duration (use ns, us, ms, s, m or h)")]
    UnknownUnit(String),
    #[error("malformed number in duration")]
    BadNumber,
    #[error("duration is too large")]
    Overflow,
}

/// Parses Go's `time.ParseDuration` syntax (`300ms`, `1.5h`, `2h45m`, `0`), as upstream's
/// variables use it. Negative values are refused: every duration here is a positive interval.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    // One optional sign, as in Go: `-x` is valid exactly when `x` is; only `-0…` survives
    // the refusal of negative values.
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let magnitude = parse_unsigned_go_duration(unsigned)?;
    if negative && !magnitude.is_zero() {
        return Err(DurationError::Negative);
    }
    Ok(magnitude)
}

/// [`parse_go_duration`] after the sign.
fn parse_unsigned_go_duration(mut s: &str) -> Result<Duration, DurationError> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(DurationError::BadNumber);
    }
    let mut total_nanos: u128 = 0;
    while !s.is_empty() {
        let num_len = s
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let (num, rest) = s.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(DurationError::BadNumber);
        }
        let unit_len = rest
            .bytes()
            .take_while(|b| !(b.is_ascii_digit() || *b == b'.'))
            .count();
        let (unit, rest) = rest.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "" => return Err(DurationError::MissingUnit),
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => return Err(DurationError::UnknownUnit(other.to_owned())),
        };
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        let int_value: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| DurationError::Overflow)?
        };
        let mut nanos = int_value
            .checked_mul(unit_nanos)
            .ok_or(DurationError::Overflow)?;
        // Fractions are exact to the nanosecond: scale digit by digit, as Go does.
        let mut scale = unit_nanos;
        for digit in frac_part.bytes().take(30) {
            scale /= 10;
            nanos = nanos
                .checked_add(u128::from(digit - b'0') * scale)
                .ok_or(DurationError::Overflow)?;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or(DurationError::Overflow)?;
        s = rest;
    }
    // Go durations are int64 nanoseconds.
    if total_nanos > i64::MAX as u128 {
        return Err(DurationError::Overflow);
    }
    Ok(Duration::from_nanos(total_nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base() -> RunnerConfig {
        RunnerConfig {
            api_url: Some("https://ws.example.com/api".into()),
            ..Default::default()
        }
    }

    #[test]
    fn go_durations_parse_like_go() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("2s", Duration::from_secs(2)),
            ("1h30m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("300ms", Duration::from_millis(300)),
            ("2h45m10.5s", Duration::from_millis(9_910_500)),
            ("1us", Duration::from_micros(1)),
            ("1µs", Duration::from_micros(1)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            ("+5m", Duration::from_secs(300)),
            (".5s", Duration::from_millis(500)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn lease_yield_defaults_turns_off_with_zero_and_names_itself_when_bad() {
        let cfg = base().validate(Some("h")).unwrap();
        assert_eq!(cfg.lease_yield, Duration::from_secs(160));
        let mut off = base();
        off.lease_yield = Some("0".into());
        assert_eq!(off.validate(Some("h")).unwrap().lease_yield, Duration::ZERO);
        let mut bad = base();
        bad.lease_yield = Some("soon".into());
        let err = bad.validate(Some("h")).unwrap_err().to_string();
        assert!(err.contains("WSRUNNER_LEASE_YIELD"), "{err}");
    }

    #[test]
    fn bad_go_durations_are_refused_with_a_reason() {
        assert_eq!(parse_go_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_go_duration("10"), Err(DurationError::MissingUnit));
        assert_eq!(
            parse_go_duration("7d"),
            Err(DurationError::UnknownUnit("d".into()))
        );
        assert_eq!(parse_go_duration("-5s"), Err(DurationError::Negative));
        assert_eq!(parse_go_duration("1..5s"), Err(DurationError::BadNumber));
        assert_eq!(parse_go_duration("s"), Err(DurationError::BadNumber));
        assert_eq!(
            parse_go_duration("99999999999999999999h"),
            Err(DurationError::Overflow)
        );
    }

    proptest! {
        #[test]
        fn duration_parser_never_panics(text in "\\PC{0,24}") {
            let _ = parse_go_duration(&text);
        }

        #[test]
        fn whole_units_round_trip(h in 0u64..1000, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}s{ms}ms");
            let want = Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms);
            prop_assert_eq!(parse_go_duration(&text), Ok(want));
        }
    }

    #[test]
    fn defaults_match_upstream() {
        let c = base().validate(Some("host-1")).unwrap();
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        // Ours: no cache size cap, no image pruning, doctor warns below 10 GiB free.
        assert_eq!(c.cache_max_bytes, None);
        assert_eq!(c.image_prune_after, None);
        assert_eq!(c.disk_free_warn, 10 << 30);
        let mut set = base();
        set.cache_max_bytes = Some("50g".into());
        set.image_prune_after = Some("72h".into());
        let c2 = set.validate(None).unwrap();
        assert_eq!(c2.cache_max_bytes, Some(50 << 30));
        assert_eq!(c2.image_prune_after, Some(Duration::from_secs(72 * 3600)));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.cache_root, PathBuf::from(DEFAULT_CACHE_ROOT));
        assert_eq!(
            c.credential_file,
            PathBuf::from(DEFAULT_CACHE_ROOT).join("credential")
        );
        assert_eq!(c.docker, "docker");
        assert_eq!(c.triage_bin, "windshift-triage");
        assert_eq!(c.network, DEFAULT_NETWORK);
        assert_eq!(
            (c.pids_limit, c.memory.as_str(), c.cpus.as_str()),
            (512, "4g", "2")
        );
        assert_eq!(c.name, "host-1");
        assert_eq!(c.concurrency, 1);
        assert!(!c.allow_insecure && !c.allow_unlabeled_image);
        assert_eq!(c.git_retry_timeout, Duration::from_secs(180));
    }

    #[test]
    fn git_retry_timeout_accepts_zero_and_refuses_garbage() {
        let mut c = base();
        c.git_retry_timeout = Some("0".into());
        assert_eq!(c.validate(None).unwrap().git_retry_timeout, Duration::ZERO);
        c.git_retry_timeout = Some("90s".into());
        assert_eq!(
            c.validate(None).unwrap().git_retry_timeout,
            Duration::from_secs(90)
        );
        c.git_retry_timeout = Some("3".into());
        let err = c.validate(None).unwrap_err().to_string();
        assert!(err.contains("WSRUNNER_GIT_RETRY_TIMEOUT"), "{err}");
    }

    #[test]
    fn empty_values_fall_back_to_defaults() {
        let mut c = base();
        c.poll_interval = Some("  ".into());
        c.docker = Some(String::new());
        c.name = Some(String::new());
        let v = c.validate(None).unwrap();
        assert_eq!(v.poll_interval, Duration::from_secs(2));
        assert_eq!(v.docker, "docker");
        assert_eq!(v.name, "windshift-runner");
    }

    #[test]
    fn http_needs_allow_insecure_exactly_1() {
        let mut c = base();
        c.api_url = Some("http://127.0.0.1:8080/api".into());
        let err = c.validate(None).unwrap_err().to_string();
        assert!(err.starts_with("WS_API_URL must be https://"), "{err}");
        assert!(err.contains("WSRUNNER_ALLOW_INSECURE=1"), "{err}");
        c.allow_insecure = Some("true".into());
        assert!(c.validate(None).is_err());
        c.allow_insecure = Some("1".into());
        assert!(c.validate(None).unwrap().allow_insecure);
    }

    #[test]
    fn missing_api_url_names_the_variable() {
        let err = RunnerConfig::default().validate(None).unwrap_err();
        assert_eq!(err, ConfigError::MissingApiUrl);
        assert!(err
            .to_string()
            .contains("required environment variable WS_API_URL is not set"));
    }

    #[test]
    fn invalid_values_are_fatal_and_name_the_variable() {
        type Mutation = fn(&mut RunnerConfig);
        let cases: [(&str, Mutation); 10] = [
            ("WSRUNNER_CACHE_MAX_BYTES", |c| {
                c.cache_max_bytes = Some("50 gigs".into())
            }),
            ("WSRUNNER_IMAGE_PRUNE_AFTER", |c| {
                c.image_prune_after = Some("a week".into())
            }),
            ("WSRUNNER_DISK_FREE_WARN", |c| {
                c.disk_free_warn = Some("-1".into())
            }),
            ("WSRUNNER_POLL_INTERVAL", |c| {
                c.poll_interval = Some("10".into())
            }),
            ("WSRUNNER_HEARTBEAT_INTERVAL", |c| {
                c.heartbeat_interval = Some("0s".into())
            }),
            ("WSRUNNER_CONCURRENCY", |c| c.concurrency = Some("0".into())),
            ("WSRUNNER_PIDS_LIMIT", |c| c.pids_limit = Some("-1".into())),
            ("WSRUNNER_MEMORY", |c| c.memory = Some("lots".into())),
            ("WSRUNNER_CPUS", |c| c.cpus = Some("NaN".into())),
            ("WSRUNNER_METRICS_ADDR", |c| {
                c.metrics_addr = Some("9464".into())
            }),
        ];
        for (var, set) in cases {
            let mut c = base();
            set(&mut c);
            let err = c.validate(None).unwrap_err().to_string();
            assert!(err.contains(var), "{var}: {err}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let mut c = base();
        c.registration_token = Some(format!("wsrt_{}", "a".repeat(64)));
        c.credential = Some(format!("wsrc_{}", "b".repeat(64)));
        let dbg = format!("{:?}", c.validate(None).unwrap());
        assert!(!dbg.contains("aaaa") && !dbg.contains("bbbb"), "{dbg}");
    }

    fn with_env(c: &mut RunnerConfig, vars: &[(&str, &str)]) {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        c.apply_option_a(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()));
    }

    /// What clap leaves in the fields when a runner variable (not a flag) is set.
    fn own_env(c: &mut RunnerConfig, vars: &[(&str, &str)]) {
        for (k, v) in vars {
            let v = Some(v.to_string());
            match *k {
                "WSRUNNER_IMAGE" => c.image = v,
                "WSRUNNER_CACHE_ROOT" => c.cache_root = v.map(PathBuf::from),
                "WSRUNNER_DOCKER" => c.docker = v,
                "WSRUNNER_NETWORK" => c.network = v,
                "WSRUNNER_PIDS_LIMIT" => c.pids_limit = v,
                "WSRUNNER_MEMORY" => c.memory = v,
                "WSRUNNER_CPUS" => c.cpus = v,
                "WSRUNNER_LLM_MODEL" => c.llm_model = v,
                other => panic!("{other}"),
            }
        }
    }

    const OPTION_A_ENV: [(&str, &str); 8] = [
        (
            "CODING_AGENT_RUNNER_IMAGE",
            "ghcr.io/windshiftapp/windshift-agent:latest",
        ),
        (
            "CODING_AGENT_WORKTREE_ROOT",
            "/var/lib/windshift/coding-agent",
        ),
        ("CODING_AGENT_DOCKER_BINARY", "podman"),
        ("CODING_AGENT_NETWORK", "bridge"),
        ("CODING_AGENT_PIDS_LIMIT", "256"),
        ("CODING_AGENT_MEMORY", "2g"),
        ("CODING_AGENT_CPUS", "1.5"),
        ("CODING_AGENT_LLM_MODEL", "gpt-x"),
    ];

    #[test]
    fn option_a_names_fill_unset_settings_and_say_so() {
        let mut c = base();
        c.network = Some(String::new()); // empty means unset
        with_env(&mut c, &OPTION_A_ENV);
        let v = c.validate(None).unwrap();
        assert_eq!(v.image, "ghcr.io/windshiftapp/windshift-agent:latest");
        assert_eq!(
            v.cache_root,
            PathBuf::from("/var/lib/windshift/coding-agent")
        );
        assert_eq!(
            v.credential_file,
            PathBuf::from("/var/lib/windshift/coding-agent/credential")
        );
        assert_eq!(v.docker, "podman");
        assert_eq!(v.network, "bridge");
        assert_eq!(
            (v.pids_limit, v.memory.as_str(), v.cpus.as_str()),
            (256, "2g", "1.5")
        );
        assert_eq!(v.llm_model.as_deref(), Some("gpt-x"));
        let line = v.origins_line();
        for want in [
            "image from CODING_AGENT_RUNNER_IMAGE",
            "cache-root from CODING_AGENT_WORKTREE_ROOT",
            "docker from CODING_AGENT_DOCKER_BINARY",
            "network from CODING_AGENT_NETWORK",
            "pids-limit from CODING_AGENT_PIDS_LIMIT",
            "memory from CODING_AGENT_MEMORY",
            "cpus from CODING_AGENT_CPUS",
            "llm-model from CODING_AGENT_LLM_MODEL",
        ] {
            assert!(line.contains(want), "{want}: {line}");
        }
    }

    #[test]
    fn the_runners_own_variable_beats_the_option_a_one() {
        let own = [
            ("WSRUNNER_IMAGE", "mine:1"),
            ("WSRUNNER_CACHE_ROOT", "/srv/cache"),
            ("WSRUNNER_DOCKER", "docker"),
            ("WSRUNNER_NETWORK", "none"),
            ("WSRUNNER_PIDS_LIMIT", "100"),
            ("WSRUNNER_MEMORY", "1g"),
            ("WSRUNNER_CPUS", "3"),
            ("WSRUNNER_LLM_MODEL", "mine-model"),
        ];
        let mut c = base();
        own_env(&mut c, &own);
        let env: Vec<(&str, &str)> = OPTION_A_ENV.iter().chain(own.iter()).copied().collect();
        with_env(&mut c, &env);
        let v = c.validate(None).unwrap();
        assert_eq!(v.image, "mine:1");
        assert_eq!(v.cache_root, PathBuf::from("/srv/cache"));
        assert_eq!(v.docker, "docker");
        assert_eq!(v.network, "none");
        assert_eq!(
            (v.pids_limit, v.memory.as_str(), v.cpus.as_str()),
            (100, "1g", "3")
        );
        assert_eq!(v.llm_model.as_deref(), Some("mine-model"));
        assert!(!v.origins_line().contains("CODING_AGENT_"));
        assert!(
            v.origins_line().contains("image from WSRUNNER_IMAGE"),
            "{}",
            v.origins_line()
        );
        // A bad Option A value that lost is never looked at.
        let mut c = base();
        own_env(&mut c, &[("WSRUNNER_MEMORY", "1g")]);
        with_env(
            &mut c,
            &[("CODING_AGENT_MEMORY", "lots"), ("WSRUNNER_MEMORY", "1g")],
        );
        assert_eq!(c.validate(None).unwrap().memory, "1g");
    }

    #[test]
    fn a_flag_beats_both_names() {
        let mut c = base();
        c.image = Some("flag:1".into());
        c.memory = Some("3g".into());
        with_env(
            &mut c,
            &[
                ("WSRUNNER_IMAGE", "own:1"),
                ("CODING_AGENT_RUNNER_IMAGE", "theirs:1"),
                ("CODING_AGENT_MEMORY", "2g"),
            ],
        );
        let v = c.validate(None).unwrap();
        assert_eq!((v.image.as_str(), v.memory.as_str()), ("flag:1", "3g"));
        let line = v.origins_line();
        assert!(line.contains("image from --image"), "{line}");
        assert!(line.contains("memory from --memory"), "{line}");
        assert!(line.contains("cpus default"), "{line}");
    }

    #[test]
    fn bad_option_a_values_name_the_option_a_variable() {
        let cases = [
            ("CODING_AGENT_WORKTREE_ROOT", "relative/dir"),
            ("CODING_AGENT_PIDS_LIMIT", "0"),
            ("CODING_AGENT_MEMORY", "lots"),
            ("CODING_AGENT_CPUS", "-1"),
            ("CODING_AGENT_LLM_MODEL", "two words"),
        ];
        for (var, value) in cases {
            let mut c = base();
            with_env(&mut c, &[(var, value)]);
            let err = c.validate(None).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid {var} ")), "{var}: {err}");
        }
        // The runner's own name when the runner's own variable held it.
        let mut c = base();
        c.memory = Some("lots".into());
        with_env(&mut c, &[("WSRUNNER_MEMORY", "lots")]);
        let err = c.validate(None).unwrap_err().to_string();
        assert!(err.contains("WSRUNNER_MEMORY"), "{err}");
    }

    #[test]
    fn llm_model_is_optional_and_one_clean_line() {
        let mut c = base();
        assert_eq!(c.validate(None).unwrap().llm_model, None);
        c.llm_model = Some(" claude-x ".into());
        assert_eq!(
            c.validate(None).unwrap().llm_model.as_deref(),
            Some("claude-x")
        );
        c.llm_model = Some("a\nLLM_BASE_URL=http://evil".into());
        let err = c.validate(None).unwrap_err().to_string();
        assert!(err.contains("WSRUNNER_LLM_MODEL"), "{err}");
        c.llm_model = Some("m".repeat(300));
        assert!(c.validate(None).is_err());
    }

    #[test]
    fn secret_flags_are_refused_naming_the_variable() {
        let mut c = base();
        c.argv_credential = Some("wsrc_flagsecret".into());
        let e = c.validate(None).unwrap_err().to_string();
        assert!(
            e.contains("WSRUNNER_CREDENTIAL") && !e.contains("flagsecret"),
            "{e}"
        );
        let mut c = base();
        c.argv_registration_token = Some(String::new());
        let e = c.validate(None).unwrap_err().to_string();
        assert!(
            e.contains("--registration-token") && e.contains("process list"),
            "{e}"
        );
    }

    #[test]
    fn allowed_images_split_on_commas() {
        let mut c = base();
        c.allowed_images = Some(" a:1, ,b:2 ".into());
        assert_eq!(c.validate(None).unwrap().allowed_images, vec!["a:1", "b:2"]);
    }
}
