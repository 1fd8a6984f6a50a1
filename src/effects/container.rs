//! The container engine behind one interface ([`Engine`]): its API socket when that answers
//! (`engine_api.rs`), else its CLI (`docker`, or rootful `podman`), chosen at start
//! (`WSRUNNER_ENGINE_DRIVER`, docs/containers.md "Engine drivers"). The CLI driver lives
//! here: the hardened argv of spec 5.1/5.2, the env file of 5.3, the agent network of 4.1
//! step 4, the image contract label of 4.8, and the names, labels and lifecycle calls that let
//! a restarted runner find, re-attach to, kill and remove its containers.
//!
//! Only CLI features docker and podman share are used. Secrets never reach an argv: job env
//! goes through a 0600 env file in a private 0700 directory, deleted as soon as `create` read it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::agent_driver::StdinChannel;
use super::engine::{EngineFuture, LogSource, Logs, StdinPort};
use crate::redact::redact;

/// The image label naming the agent contract version (spec 4.8).
pub const CONTRACT_LABEL: &str = "org.windshift.agent-contract";
/// The contract version this runner speaks.
pub const CONTRACT_VERSION: &str = "v1";
/// Labels on every container this runner creates (ours, not upstream's).
pub const LABEL_INSTANCE: &str = "org.windshift.runner.instance";
pub const LABEL_RUN_ID: &str = "org.windshift.runner.run-id";
pub const LABEL_ATTEMPT: &str = "org.windshift.runner.attempt";
/// The agent network upstream always uses (spec 4.1).
pub const DEFAULT_NETWORK: &str = "coding-agent-egress";
/// Docker's bridge option that switches inter-container traffic (docs/containers.md).
pub const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";
const ICC_OFF: &str = "com.docker.network.bridge.enable_icc=false";

/// The warning for an agent network whose containers can reach each other.
pub fn icc_warning(network: &str) -> String {
    format!("agent network {network} allows inter-container traffic: the agents of different runs can reach each other; recreate it with `docker network create -o {ICC_OFF} {network}` (the runner creates it so when it is missing)")
}
/// Network names that are never created, only warned about (spec 4.1).
pub const BUILTIN_NETWORKS: [&str; 3] = ["bridge", "host", "none"];
const NETWORK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a single engine CLI call (inspect, create, kill, …) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// What went wrong talking to the engine; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("could not run the container CLI {docker:?}: {source}; install docker or podman, or set WSRUNNER_DOCKER")]
    Spawn {
        docker: String,
        source: std::io::Error,
    },
    #[error("`{docker} {what}` failed: {detail}")]
    Cli {
        docker: String,
        what: String,
        detail: String,
    },
    #[error("`{docker} {what}` did not finish within {secs} s; is the engine daemon healthy?")]
    Timeout {
        docker: String,
        what: String,
        secs: u64,
    },
    #[error("env variable {key:?} has a value with a newline; the env file format (spec 5.3) cannot carry it, remove the newline from the job env")]
    EnvNewline { key: String },
    #[error("env variable name {key:?} is not valid: use letters, digits and '_', not starting with a digit")]
    EnvKey { key: String },
    #[error("writing the env file in {dir}: {source}")]
    EnvFile {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("image {image} is not in the runner image allowlist")]
    ImageNotAllowed { image: String },
    #[error("Image is required: set WSRUNNER_IMAGE or send an image with the job")]
    NoImage,
    #[error("container job has no image")]
    NoContainerImage,
    #[error("image {image} has no {CONTRACT_LABEL} label; set WSRUNNER_ALLOW_UNLABELED_IMAGE=1 to accept it")]
    Unlabeled { image: String },
    #[error("image {image} speaks agent contract {found:?} but this runner speaks {CONTRACT_VERSION:?}; upgrade the runner or pin a matching image")]
    WrongContract { image: String, found: String },
    #[error("image {image} is not available and could not be pulled: {detail}")]
    ImageUnavailable { image: String, detail: String },
    #[error("{origin} {image:?} is not an image reference: it {why}; use [registry[:port]/]name[:tag][@sha256:<digest>]")]
    BadImage {
        origin: String,
        image: String,
        why: &'static str,
    },
    #[error("container runtime {runtime:?} (WSRUNNER_RUNTIME) is not known to the engine, which has: {available}; install and register it with the engine, or unset WSRUNNER_RUNTIME")]
    UnknownRuntime { runtime: String, available: String },
    #[error("engine API call {what} failed: {detail}")]
    Api { what: String, detail: String },
    #[error("invalid {name}={value:?}: {why}")]
    Config {
        name: &'static str,
        value: String,
        why: &'static str,
    },
}

/// Engine and sandbox settings (spec 4.7 plus our tunables; defaults equal upstream's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerConfig {
    /// The CLI binary (`WSRUNNER_DOCKER`).
    pub docker: String,
    /// `WSRUNNER_NETWORK`.
    pub network: String,
    /// `WSRUNNER_PIDS_LIMIT`.
    pub pids_limit: u32,
    /// `WSRUNNER_MEMORY`; also used as `--memory-swap` so the container gets no swap.
    pub memory: String,
    /// `WSRUNNER_CPUS`.
    pub cpus: String,
    /// `WSRUNNER_IMAGE`.
    pub default_image: String,
    /// `WSRUNNER_ALLOWED_IMAGES` (exact references).
    pub allowed_images: Vec<String>,
    /// `WSRUNNER_ALLOW_UNLABELED_IMAGE=1`.
    pub allow_unlabeled: bool,
    /// The runner instance these containers belong to (names and labels).
    pub instance: String,
    /// `WSRUNNER_RUNTIME`: passed as `--runtime` (e.g. gVisor's `runsc`).
    pub runtime: Option<String>,
    /// `WSRUNNER_AGENT_OUTPUT_LIMIT`: bytes one container may print before it is stopped.
    pub output_limit: u64,
    /// `WSRUNNER_ENGINE_DRIVER`: the engine API, the CLI, or the API when its socket answers.
    pub driver: DriverChoice,
    /// The API socket; `None`: from `DOCKER_HOST`/`CONTAINER_HOST` or the engine's default.
    pub api_socket: Option<String>,
    /// Where the use of per-run override images is recorded ([`ImageUse`]); `None`: nowhere,
    /// and nothing is ever pruned.
    pub image_use_file: Option<PathBuf>,
}

/// Which engine driver runs (`WSRUNNER_ENGINE_DRIVER`, docs/containers.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriverChoice {
    /// The API when its socket answers at start, else the CLI (with a warning).
    #[default]
    Auto,
    Api,
    Cli,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        ContainerConfig {
            docker: "docker".into(),
            network: DEFAULT_NETWORK.into(),
            pids_limit: 512,
            memory: "4g".into(),
            cpus: "2".into(),
            default_image: String::new(),
            allowed_images: Vec::new(),
            allow_unlabeled: false,
            instance: "default".into(),
            runtime: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            driver: DriverChoice::Auto,
            api_socket: None,
            image_use_file: None,
        }
    }
}

impl ContainerConfig {
    /// Reads the settings from a variable lookup (unset or empty means default, spec 4.7).
    pub fn from_lookup(
        instance: &str,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ContainerError> {
        let get = |name: &str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut cfg = ContainerConfig {
            instance: sanitize_name_part(instance),
            ..ContainerConfig::default()
        };
        if let Some(v) = get("WSRUNNER_DOCKER") {
            cfg.docker = v;
        }
        if let Some(v) = get("WSRUNNER_ENGINE_DRIVER") {
            cfg.driver = match v.as_str() {
                "auto" => DriverChoice::Auto,
                "api" => DriverChoice::Api,
                "cli" => DriverChoice::Cli,
                _ => {
                    return Err(ContainerError::Config {
                        name: "WSRUNNER_ENGINE_DRIVER",
                        value: v,
                        why: "must be auto, api or cli",
                    })
                }
            };
        }
        if let Some(v) = get("WSRUNNER_NETWORK") {
            if v == "host" && get("WSRUNNER_ALLOW_HOST_NETWORK").as_deref() != Some("1") {
                return Err(ContainerError::Config {
                    name: "WSRUNNER_NETWORK",
                    value: v,
                    why: "host networking gives the agent the host's network stack; set WSRUNNER_ALLOW_HOST_NETWORK=1 to accept it",
                });
            }
            cfg.network = v;
        }
        if let Some(v) = get("WSRUNNER_RUNTIME") {
            if !valid_runtime_name(&v) {
                return Err(ContainerError::Config {
                    name: "WSRUNNER_RUNTIME",
                    value: v,
                    why:
                        "must be a runtime name like runsc ([A-Za-z0-9._-], not starting with '-')",
                });
            }
            cfg.runtime = Some(v);
        }
        if let Some(v) = get("WSRUNNER_AGENT_OUTPUT_LIMIT") {
            cfg.output_limit = parse_output_limit(&v).ok_or(ContainerError::Config {
                name: "WSRUNNER_AGENT_OUTPUT_LIMIT",
                value: v,
                why: "must be a byte count of at least 64k, like 256m or 1g",
            })?;
        }
        if let Some(v) = get("WSRUNNER_PIDS_LIMIT") {
            cfg.pids_limit = v
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(ContainerError::Config {
                    name: "WSRUNNER_PIDS_LIMIT",
                    value: v,
                    why: "must be a positive whole number",
                })?;
        }
        if let Some(v) = get("WSRUNNER_MEMORY") {
            let ok = v.len() > 1
                && v[..v.len() - 1].chars().all(|c| c.is_ascii_digit())
                && v.ends_with(['b', 'k', 'm', 'g', 'B', 'K', 'M', 'G'])
                || !v.is_empty() && v.chars().all(|c| c.is_ascii_digit());
            if !ok {
                return Err(ContainerError::Config {
                    name: "WSRUNNER_MEMORY",
                    value: v,
                    why: "must be a byte count like 4g, 512m or 1073741824",
                });
            }
            cfg.memory = v;
        }
        if let Some(v) = get("WSRUNNER_CPUS") {
            if !v.parse::<f64>().is_ok_and(|c| c > 0.0 && c.is_finite()) {
                return Err(ContainerError::Config {
                    name: "WSRUNNER_CPUS",
                    value: v,
                    why: "must be a positive number like 2 or 1.5",
                });
            }
            cfg.cpus = v;
        }
        if let Some(v) = get("WSRUNNER_IMAGE") {
            check_image_ref("WSRUNNER_IMAGE", &v)?;
            cfg.default_image = v;
        }
        if let Some(v) = get("WSRUNNER_ALLOWED_IMAGES") {
            cfg.allowed_images = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            for image in &cfg.allowed_images {
                check_image_ref("WSRUNNER_ALLOWED_IMAGES", image)?;
            }
        }
        cfg.allow_unlabeled = get("WSRUNNER_ALLOW_UNLABELED_IMAGE").as_deref() == Some("1");
        Ok(cfg)
    }

    /// Reads the settings from the process environment.
    pub fn from_env(instance: &str) -> Result<Self, ContainerError> {
        Self::from_lookup(instance, |name| std::env::var(name).ok())
    }
}

pub use crate::fsm::names::{container_name, sanitize_name_part};

/// Which launch shape a job gets (spec 5.1 vs 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchKind {
    /// `coding_agent`: stdin kept open for the JSONL commands, `/home/agent` tmpfs.
    CodingAgent,
    /// `action_container` / `ci_task`: no stdin, no home tmpfs.
    Container,
}

impl LaunchKind {
    /// The job kind's launch shape (an empty kind is `coding_agent`, spec 5.2).
    pub fn for_job_kind(kind: &str) -> Self {
        if kind.is_empty() || kind == crate::control::wire::KIND_CODING_AGENT {
            LaunchKind::CodingAgent
        } else {
            LaunchKind::Container
        }
    }
}

/// One container to create.
#[derive(Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub run_id: i64,
    pub attempt: u32,
    pub kind: LaunchKind,
    pub image: String,
    /// Job env (spec 5.3); `AGENT_RUN_ID` is added and always wins.
    pub env: BTreeMap<String, String>,
    /// Mounted at `/workspace` when present.
    pub checkout: Option<PathBuf>,
    /// Extra engine arguments before the image (empty on the remote runner, spec 5.1 item 6).
    pub extra_args: Vec<String>,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Env values may be secrets: print only the keys.
        f.debug_struct("ContainerSpec")
            .field("run_id", &self.run_id)
            .field("attempt", &self.attempt)
            .field("kind", &self.kind)
            .field("image", &self.image)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("checkout", &self.checkout)
            .field("extra_args", &self.extra_args)
            .finish()
    }
}

/// The baseline sandbox flags every job kind gets (spec 5.1 item 2), in upstream's order.
pub fn baseline_flags(cfg: &ContainerConfig) -> Vec<String> {
    let mut flags = vec![
        "--cap-drop=ALL".into(),
        "--security-opt=no-new-privileges".into(),
        "--user=1000:1000".into(),
        "--read-only".into(),
        "--tmpfs=/tmp:rw,nosuid,nodev,size=256m,mode=1777".into(),
        format!("--network={}", cfg.network),
        format!("--pids-limit={}", cfg.pids_limit),
        format!("--memory={}", cfg.memory),
        format!("--memory-swap={}", cfg.memory),
        format!("--cpus={}", cfg.cpus),
    ];
    if let Some(runtime) = &cfg.runtime {
        flags.push(format!("--runtime={runtime}"));
    }
    flags
}

/// Spec 5.1 items 2–7 (5.2 for container kinds): sandbox flags, env file, mount, extras, image.
pub fn sandbox_args(cfg: &ContainerConfig, spec: &ContainerSpec, env_file: &Path) -> Vec<String> {
    let mut args = baseline_flags(cfg);
    if spec.kind == LaunchKind::CodingAgent {
        args.push("--tmpfs=/home/agent:rw,nosuid,nodev,size=512m,mode=1777".into());
    }
    args.push("--env-file".into());
    args.push(env_file.display().to_string());
    if let Some(checkout) = &spec.checkout {
        args.push("-v".into());
        args.push(format!("{}:/workspace:Z", checkout.display()));
    }
    args.extend(spec.extra_args.iter().cloned());
    // `--` ends the options (docker and podman both parse with pflag): the image can never be
    // read as a flag, on top of the reference check in `Engine::create`.
    args.push("--".into());
    args.push(spec.image.clone());
    args
}

/// Our additions before the sandbox flags: the deterministic name and the finding labels.
pub fn identity_args(cfg: &ContainerConfig, spec: &ContainerSpec) -> Vec<String> {
    vec![
        "--name".into(),
        container_name(&cfg.instance, spec.run_id, spec.attempt),
        "--label".into(),
        format!("{LABEL_INSTANCE}={}", cfg.instance),
        "--label".into(),
        format!("{LABEL_RUN_ID}={}", spec.run_id),
        "--label".into(),
        format!("{LABEL_ATTEMPT}={}", spec.attempt),
    ]
}

/// The full `create` argv: `create [-i]`, identity, then spec 5.1/5.2 items 2–7 in order.
/// `create -i` + a separate start replaces upstream's `run -i --rm` so that the container
/// outlives the runner process and can be re-attached (docs/containers.md).
pub fn create_argv(cfg: &ContainerConfig, spec: &ContainerSpec, env_file: &Path) -> Vec<String> {
    create_argv_with_logs(cfg, spec, env_file, &[])
}

/// [`create_argv`] with engine-specific arguments after the identity: the engine-side log
/// cap ([`log_backstop_args`]) and rootless Podman's user namespace ([`userns_args`]).
pub fn create_argv_with_logs(
    cfg: &ContainerConfig,
    spec: &ContainerSpec,
    env_file: &Path,
    engine_args: &[String],
) -> Vec<String> {
    let mut argv = vec!["create".to_owned()];
    if spec.kind == LaunchKind::CodingAgent {
        argv.push("-i".into());
    }
    argv.extend(identity_args(cfg, spec));
    argv.extend(engine_args.iter().cloned());
    argv.extend(sandbox_args(cfg, spec, env_file));
    argv
}

/// A 0600 env file in its own private 0700 directory; both vanish on drop.
pub struct EnvFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl EnvFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The private directory holding the file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Validates an env key (what the env file format and the engines accept).
fn valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Renders the env file text: job env, then `AGENT_RUN_ID` which always wins (spec 5.3).
pub fn render_env_file(
    env: &BTreeMap<String, String>,
    run_id: i64,
) -> Result<String, ContainerError> {
    let mut text = String::new();
    for (key, value) in env {
        if !valid_env_key(key) {
            return Err(ContainerError::EnvKey { key: key.clone() });
        }
        if value.contains(['\n', '\r']) {
            return Err(ContainerError::EnvNewline { key: key.clone() });
        }
        if key == "AGENT_RUN_ID" {
            continue;
        }
        text.push_str(key);
        text.push('=');
        text.push_str(value);
        text.push('\n');
    }
    text.push_str(&format!("AGENT_RUN_ID={run_id}\n"));
    Ok(text)
}

/// Writes the env file (0600) into a fresh private directory (0700) under `parent`.
pub fn write_env_file(
    parent: &Path,
    env: &BTreeMap<String, String>,
    run_id: i64,
) -> Result<EnvFile, ContainerError> {
    let text = render_env_file(env, run_id)?;
    let io_err = |source| ContainerError::EnvFile {
        dir: parent.to_owned(),
        source,
    };
    let dir = tempfile::Builder::new()
        .prefix("windshift-agent-env-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(io_err)?;
    let path = dir.path().join("agent.env");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err)?;
    file.write_all(text.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    Ok(EnvFile { dir, path })
}

// ---- Issue 11: image references, engine environment, runtime, output limit (docs/containers.md)

/// Longest image reference accepted (docker's name limit is 255; tag and digest come on top).
pub const MAX_IMAGE_REF: usize = 512;
/// Default of `WSRUNNER_AGENT_OUTPUT_LIMIT` (bytes the agent may print, both streams).
pub const DEFAULT_OUTPUT_LIMIT: u64 = 256 << 20;
/// Smallest `WSRUNNER_AGENT_OUTPUT_LIMIT` accepted.
pub const MIN_OUTPUT_LIMIT: u64 = 64 << 10;
/// What each output line costs against the limit beyond its own bytes: about the engine's
/// per-line log record (json-file wraps each line in JSON with its stream and a timestamp),
/// so that the limit bounds the engine's log file too, not only the agent's bytes.
pub const LINE_OVERHEAD: u64 = 80;

/// Why an image reference is refused (`None`: it is a valid
/// `[registry[:port]/]name[:tag][@sha256:<64 hex>]` reference).
pub fn image_ref_problem(image: &str) -> Option<&'static str> {
    if image.is_empty() {
        return Some("is empty");
    }
    if image.len() > MAX_IMAGE_REF {
        return Some("is longer than 512 characters");
    }
    if image.starts_with('-') {
        return Some("starts with '-' (it would be read as a flag)");
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("contains whitespace or control characters");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Some("has a digest that is not @sha256:<64 lowercase hex digits>");
        }
    }
    // A ':' after the last '/' starts the tag (a ':' before it is a registry port).
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = tag.len() <= 128
            && tag.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphanumeric() || c == '_' || (i > 0 && (c == '.' || c == '-'))
            })
            && !tag.is_empty();
        if !ok {
            return Some("has a tag that is not [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}");
        }
    }
    if name.len() > 255 {
        return Some("has a name longer than 255 characters");
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains(['.', ':']) || first == "localhost" {
            if !valid_registry(first) {
                return Some("has a registry that is not host[:port]");
            }
            parts.remove(0);
        }
    }
    if !parts.iter().all(|p| valid_path_component(p)) {
        return Some(
            "has a name component that is not lowercase [a-z0-9] joined by '.', '_', '__' or '-'",
        );
    }
    None
}

/// `host[:port]`: dot-separated DNS labels, an optional numeric port.
fn valid_registry(text: &str) -> bool {
    let (host, port) = match text.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.split('.').all(label_ok)
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// One path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn valid_path_component(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &part[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-')) {
            return false;
        }
    }
    true
}

/// Checks an image reference, naming the setting or job field it came from.
pub fn check_image_ref(source: &str, image: &str) -> Result<(), ContainerError> {
    match image_ref_problem(image) {
        None => Ok(()),
        Some(why) => Err(ContainerError::BadImage {
            origin: source.to_owned(),
            image: image.chars().take(80).collect(),
            why,
        }),
    }
}

/// A runtime name for `--runtime`: `[A-Za-z0-9._-]`, not starting with `-`, at most 64.
pub fn valid_runtime_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses `WSRUNNER_AGENT_OUTPUT_LIMIT`: bytes, or a number with k, m or g (KiB, MiB, GiB),
/// the same byte grammar as `WSRUNNER_MEMORY`.
pub fn parse_output_limit(text: &str) -> Option<u64> {
    super::engine_api::parse_bytes(text)
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n >= MIN_OUTPUT_LIMIT && *n <= 1 << 50)
}

/// The only variables an engine CLI child gets (docs/containers.md): what docker and podman
/// need to find their daemon, config, credentials helpers and proxies. Everything else of the
/// runner's environment (its credential, the registration token, LLM keys) stays out.
pub const ENGINE_ENV: [&str; 27] = [
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "DOCKER_API_VERSION",
    "CONTAINER_HOST",
    "CONTAINER_CONNECTION",
    "CONTAINERS_CONF",
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_REGISTRIES_CONF",
    "REGISTRY_AUTH_FILE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// The environment of an engine child, from a variable lookup: [`ENGINE_ENV`] entries only.
pub fn engine_env_from(
    get: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Vec<(&'static str, std::ffi::OsString)> {
    ENGINE_ENV
        .iter()
        .filter_map(|name| get(name).map(|v| (*name, v)))
        .collect()
}

/// The environment of an engine child, from this process's environment.
pub fn engine_env() -> Vec<(&'static str, std::ffi::OsString)> {
    engine_env_from(|name| std::env::var_os(name))
}

/// The engine-side log cap for a log driver, far enough above the runner's own limit that
/// replay by line count keeps working (docs/containers.md). json-file and local keep the
/// current file and 4 rotated ones of 2× the limit, which `logs` reads in order: no line is
/// dropped before the log holds 8× the limit (the runner stops the agent at 1×; a log record
/// is at most about 7× the bytes it charges), and the disk holds at most 10×. Podman's
/// k8s-file (conmon) truncates at its cap, so it gets the 10× in one file. Other drivers
/// (journald, syslog, …) take no such option and get nothing.
pub fn log_backstop_args(driver: &str, limit: u64) -> Vec<String> {
    match driver {
        "json-file" | "local" => vec![
            "--log-opt".into(),
            format!("max-size={}", limit.saturating_mul(2)),
            "--log-opt".into(),
            "max-file=5".into(),
        ],
        "k8s-file" => vec![
            "--log-opt".into(),
            format!("max-size={}", limit.saturating_mul(10)),
        ],
        _ => Vec::new(),
    }
}

/// The user namespace rootless Podman gives every agent container: the runner's own uid and
/// gid appear as 1000:1000 inside, the uid the agent runs as (spec 5.1), so the checkout the
/// runner made (owned by the runner) is the agent's to write, and what the agent writes is the
/// runner's to read and remove. Without it, rootless Podman maps uid 1000 to a subordinate uid
/// that owns nothing in the checkout (docs/containers.md, "Rootless Podman").
pub const ROOTLESS_PODMAN_USERNS: &str = "keep-id:uid=1000,gid=1000";

/// What the engine reports about how it runs: whether it is Podman, rootless, and on cgroups
/// v1 (where rootless engines cannot apply memory, pids or CPU limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EngineHost {
    pub podman: bool,
    pub rootless: bool,
    pub cgroups_v1: bool,
}

impl EngineHost {
    /// The `--userns` value agent containers get: keep-id for rootless Podman, else none
    /// (rootful engines map uid 1000 to host uid 1000, or remap it by their own settings).
    pub fn userns_mode(&self) -> Option<&'static str> {
        (self.podman && self.rootless).then_some(ROOTLESS_PODMAN_USERNS)
    }

    /// What the operator should know about this engine (`None`: nothing special), with its
    /// severity: `true` when it is a warning.
    pub fn note(&self) -> Option<(bool, String)> {
        let limits = if self.cgroups_v1 {
            "; this host has cgroups v1, where a rootless engine cannot apply the memory, pids and CPU limits (WSRUNNER_MEMORY, WSRUNNER_PIDS_LIMIT, WSRUNNER_CPUS are ignored by the engine): move the host to cgroups v2 with controller delegation, or run the engine rootful"
        } else {
            ""
        };
        match (self.rootless, self.podman) {
            (false, _) => None,
            (true, true) => Some((
                self.cgroups_v1,
                format!("rootless Podman: agent containers run with --userns={ROOTLESS_PODMAN_USERNS}, so the runner's uid is the agent's uid 1000 and the checkout is writable{limits}"),
            )),
            (true, false) => Some((
                true,
                format!("rootless Docker: the agent's uid 1000 maps to a subordinate uid that cannot write the checkout, and Docker has no keep-id mapping; run Docker rootful or use rootless Podman (docs/containers.md){limits}"),
            )),
        }
    }
}

/// Reads [`EngineHost`] from `info --format '{{json .}}'` of either CLI: Podman's
/// (`host.security.rootless`, `host.cgroupVersion` "v1"/"v2") or Docker's (`SecurityOptions`
/// listing `name=rootless`, `CgroupVersion` "1"/"2"). `None` when it is neither.
pub fn parse_engine_info(json: &str) -> Option<EngineHost> {
    let info: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
    if let Some(host) = info.get("host").filter(|h| h.is_object()) {
        return Some(EngineHost {
            podman: true,
            rootless: host
                .pointer("/security/rootless")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            cgroups_v1: host.get("cgroupVersion").and_then(|v| v.as_str()) == Some("v1"),
        });
    }
    let options = info.get("SecurityOptions")?.as_array()?;
    Some(EngineHost {
        podman: false,
        rootless: options
            .iter()
            .filter_map(|o| o.as_str())
            .any(security_option_is_rootless),
        cgroups_v1: info.get("CgroupVersion").and_then(|v| v.as_str()) == Some("1"),
    })
}

/// Whether one `SecurityOptions` entry (`name=rootless` or `name=rootless,...`) says rootless.
pub fn security_option_is_rootless(option: &str) -> bool {
    option.split(',').next() == Some("name=rootless")
}

/// The `create` arguments of the engine's user namespace ([`EngineHost::userns_mode`]).
pub fn userns_args(host: EngineHost) -> Vec<String> {
    host.userns_mode()
        .map(|mode| vec![format!("--userns={mode}")])
        .unwrap_or_default()
}

/// The file in the cache root recording the override images' use ([`ImageUse`]).
pub const IMAGE_USE_FILE: &str = ".agent-images.json";

/// One per-run override image as [`ImageUse`] records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageUseEntry {
    /// Whether this runner pulled it (it was not in the engine's store at its first use).
    /// Only those are pruned: an image the operator put there stays.
    pub pulled: bool,
    /// Last run that used it, ms since the epoch.
    pub last_used_ms: u64,
}

/// The use of per-run override images (`WSRUNNER_ALLOWED_IMAGES`; never `WSRUNNER_IMAGE`):
/// which ones this runner pulled and when a run last used each, in a small JSON file beside
/// the caches, so that `WSRUNNER_IMAGE_PRUNE_AFTER` can remove the idle ones across restarts
/// (docs/containers.md, "Override images").
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageUse {
    pub images: BTreeMap<String, ImageUseEntry>,
}

impl ImageUse {
    /// Reads the file; a missing or unreadable one is empty (it only ever delays a prune).
    pub fn load(path: &Path) -> ImageUse {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Writes the file atomically (temp file, rename), 0600.
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".agent-images-")
            .tempfile_in(dir)?;
        tmp.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    /// Records a run's use of `image`; `pulled` sticks once true.
    pub fn note(&mut self, image: &str, pulled: bool, now_ms: u64) {
        let entry = self
            .images
            .entry(image.to_owned())
            .or_insert(ImageUseEntry {
                pulled,
                last_used_ms: now_ms,
            });
        entry.pulled |= pulled;
        entry.last_used_ms = entry.last_used_ms.max(now_ms);
    }

    /// The images to prune at `now_ms`: pulled by the runner, unused for `after`, and not
    /// `default_image` (whatever the file says).
    pub fn idle(&self, default_image: &str, after: Duration, now_ms: u64) -> Vec<String> {
        let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.images
            .iter()
            .filter(|(image, e)| {
                e.pulled
                    && image.as_str() != default_image
                    && now_ms.saturating_sub(e.last_used_ms) >= after_ms
            })
            .map(|(image, _)| image.clone())
            .collect()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What [`Engine::prune_idle_images`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImagePrune {
    pub removed: Vec<String>,
    /// Images the engine refused to remove (a container still uses them), with its words.
    pub kept: Vec<(String, String)>,
}

/// A container's state as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, not started yet.
    Created,
    Running,
    /// Stopped with this exit code (`OOMKilled` when the kernel killed it for memory).
    Exited {
        code: i32,
        oom_killed: bool,
    },
    /// Any other engine state (paused, restarting, removing, dead, …), as reported.
    Other(String),
}

/// A container found by its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundContainer {
    pub name: String,
    pub run_id: Option<i64>,
    pub attempt: Option<u32>,
    pub state: ContainerState,
}

/// Result of [`Engine::ensure_network`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkStatus {
    /// It existed already.
    Present,
    /// We created it (egress unfiltered: warned).
    Created,
    /// A built-in name (`bridge`, `host`, `none`): never created, only warned about.
    Builtin,
}

/// Outcome of the boot-time image check (spec 4.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootImageCheck {
    /// Labelled `v1`.
    Ok,
    /// No label, accepted because `WSRUNNER_ALLOW_UNLABELED_IMAGE=1` (warned).
    UnlabeledAllowed,
    /// Inspect and pull failed: warned, check skipped (the per-run check will fail instead).
    Skipped { reason: String },
    /// `WSRUNNER_IMAGE` is empty: warned, coding jobs will fail "Image is required".
    NoDefaultImage,
}

/// The container engine, behind one interface for the daemon and the tests: its API over a
/// unix socket when that answers (`api`), else its CLI (docs/containers.md, "Engine drivers").
#[derive(Debug, Clone)]
pub struct Engine {
    pub cfg: ContainerConfig,
    /// What shapes every create (log driver, init), asked once.
    facts: std::sync::Arc<tokio::sync::OnceCell<super::engine_api::CreateFacts>>,
    /// The API driver's `/info`, asked once it answers (the create facts and the host facts
    /// both read it).
    api_info: std::sync::Arc<tokio::sync::OnceCell<super::engine_api::ApiInfo>>,
    /// Rootless or not, and cgroups v1, asked once the engine answers.
    host: std::sync::Arc<tokio::sync::OnceCell<EngineHost>>,
    /// The API driver; `None`: the CLI driver (`cfg.docker`) runs.
    api: Option<std::sync::Arc<super::engine_api::ApiDriver>>,
    /// Which driver runs and why, for the start-up log and `doctor`.
    driver_note: std::sync::Arc<String>,
    /// Serialises the read-modify-write of the image use file between concurrent runs.
    image_use_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The API socket path for an engine CLI flavour, from a variable lookup: `DOCKER_HOST`
/// (`CONTAINER_HOST` first for podman) when it is a `unix://` address, else the engine's
/// default socket. `Err` says why there is none (a tcp:// or ssh:// host).
pub fn api_socket_from(
    docker: &str,
    get: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let podman = Path::new(docker)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("podman"));
    let order: &[&str] = if podman {
        &["CONTAINER_HOST", "DOCKER_HOST"]
    } else {
        &["DOCKER_HOST"]
    };
    for name in order {
        if let Some(value) = get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            return match value.strip_prefix("unix://") {
                Some(path) if !path.is_empty() => Ok(path.to_owned()),
                _ => Err(format!(
                    "{name} is not a unix:// socket, which is all the API driver speaks"
                )),
            };
        }
    }
    // SAFETY: geteuid has no preconditions.
    let rootless = unsafe { libc::geteuid() } != 0;
    let runtime_dir = get("XDG_RUNTIME_DIR").filter(|d| d.starts_with('/'));
    Ok(if podman {
        match runtime_dir {
            // Rootless Podman serves its API in the user's runtime dir.
            Some(dir) if rootless => format!("{}/podman/podman.sock", dir.trim_end_matches('/')),
            _ => "/run/podman/podman.sock".into(),
        }
    } else {
        "/var/run/docker.sock".into()
    })
}

/// What to enable so that the engine serves its API socket.
fn enable_hint(docker: &str) -> &'static str {
    if docker.contains("podman") {
        "start Podman's API service: `systemctl enable --now podman.socket`, or `podman system service --time=0 unix:///run/podman/podman.sock &`"
    } else {
        "enable Docker's API socket: `systemctl enable --now docker.socket` (or set DOCKER_HOST=unix:///path/to/docker.sock)"
    }
}

/// Output of one CLI call.
pub struct CliOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Engine {
    /// The engine with the driver `cfg.driver` selects: for `auto`, the API when its socket
    /// accepts a connection now, else the CLI with a warning saying what to enable.
    pub fn new(cfg: ContainerConfig) -> Self {
        use super::engine_api::ApiDriver;
        let socket = match &cfg.api_socket {
            Some(path) => Ok(path.trim_start_matches("unix://").to_owned()),
            None => api_socket_from(&cfg.docker, |n| std::env::var(n).ok()),
        };
        let cli_note = |why: String| {
            format!(
                "CLI driver ({}): {why}; without the API a hard kill of a runner container ends its agents' sessions; {}",
                cfg.docker,
                enable_hint(&cfg.docker)
            )
        };
        let podman = cfg.docker.contains("podman");
        let (api, note) = match (cfg.driver, socket) {
            (DriverChoice::Cli, _) => (
                None,
                format!("CLI driver ({}): WSRUNNER_ENGINE_DRIVER=cli", cfg.docker),
            ),
            // Podman 4.3's compat API closes a container's stdin when the attached client goes,
            // StdinOnce=false or not (measured): through it a runner's death would end the
            // session, which the CLI driver's holder survives on a host. `api` forces it.
            (DriverChoice::Auto, _) if podman => (
                None,
                format!("CLI driver ({}): Podman's API closes an agent's stdin when the attached runner goes, its CLI's stdin holder does not (set WSRUNNER_ENGINE_DRIVER=api to use the API anyway)", cfg.docker),
            ),
            (choice, Ok(path)) => {
                let answers = std::os::unix::net::UnixStream::connect(&path);
                match (choice, answers) {
                    (DriverChoice::Auto, Err(e)) => {
                        let note =
                            cli_note(format!("no engine API socket answers at {path} ({e})"));
                        tracing::warn!("{note}");
                        (None, note)
                    }
                    _ => match ApiDriver::connect(&path) {
                        Ok(driver) => (
                            Some(std::sync::Arc::new(driver)),
                            format!("API driver on unix://{path}"),
                        ),
                        Err(e) => {
                            let note = cli_note(format!("cannot use the API socket {path}: {e}"));
                            tracing::warn!("{note}");
                            (None, note)
                        }
                    },
                }
            }
            (_, Err(why)) => {
                let note = cli_note(why);
                tracing::warn!("{note}");
                (None, note)
            }
        };
        Engine {
            cfg,
            facts: Default::default(),
            api_info: Default::default(),
            host: Default::default(),
            image_use_lock: Default::default(),
            api,
            driver_note: std::sync::Arc::new(note),
        }
    }

    /// Whether the API driver runs (else the CLI driver).
    pub fn uses_api(&self) -> bool {
        self.api.is_some()
    }

    /// Which driver runs and why (start-up log, `doctor`).
    pub fn driver_note(&self) -> &str {
        &self.driver_note
    }

    /// The API driver, when it runs.
    pub fn api(&self) -> Option<&super::engine_api::ApiDriver> {
        self.api.as_deref()
    }

    /// SIGTERM, then SIGKILL after `grace`; a stopped or missing container is fine.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<(), ContainerError> {
        if let Some(api) = &self.api {
            return api.stop(name, grace).await;
        }
        let secs = grace.as_secs().to_string();
        let out = self
            .cli(
                &["stop", "--time", &secs, name],
                grace + Duration::from_secs(60),
            )
            .await?;
        self.unless_still_running("stop", name, out).await
    }

    /// A command for the engine CLI with the given arguments (stdin closed), with only the
    /// [`ENGINE_ENV`] part of the runner's environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.cfg.docker);
        cmd.env_clear()
            .envs(engine_env())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Starts [`Engine::command`]; a failure to start names the engine program.
    fn spawn(&self, args: &[&str]) -> Result<tokio::process::Child, ContainerError> {
        self.command(args)
            .spawn()
            .map_err(|source| ContainerError::Spawn {
                docker: self.cfg.docker.clone(),
                source,
            })
    }

    /// Runs one CLI call with a timeout; a non-zero exit is returned, not an error.
    pub async fn cli(&self, args: &[&str], timeout: Duration) -> Result<CliOutput, ContainerError> {
        let child = self.spawn(args)?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => Err(ContainerError::Timeout {
                docker: self.cfg.docker.clone(),
                what: args.iter().take(3).copied().collect::<Vec<_>>().join(" "),
                secs: timeout.as_secs(),
            }),
            Ok(Err(source)) => Err(ContainerError::Spawn {
                docker: self.cfg.docker.clone(),
                source,
            }),
            Ok(Ok(out)) => Ok(CliOutput {
                success: out.status.success(),
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: redact(String::from_utf8_lossy(&out.stderr).trim()).into_owned(),
            }),
        }
    }

    /// Like [`Engine::cli`] but a non-zero exit is an error naming the call.
    async fn cli_ok(&self, args: &[&str], timeout: Duration) -> Result<String, ContainerError> {
        let out = self.cli(args, timeout).await?;
        if out.success {
            Ok(out.stdout)
        } else {
            Err(ContainerError::Cli {
                docker: self.cfg.docker.clone(),
                what: args.iter().take(2).copied().collect::<Vec<_>>().join(" "),
                detail: if out.stderr.is_empty() {
                    format!("exit code {:?}", out.code)
                } else {
                    out.stderr
                },
            })
        }
    }

    /// Spec 4.1 step 4: make sure the agent network exists (30 s timeout). A network we create
    /// has inter-container traffic off (docker's bridge `enable_icc=false`), so the agents of
    /// two runs cannot reach each other; an existing one is used as is, with a warning when
    /// its inter-container traffic is on.
    pub async fn ensure_network(&self) -> Result<NetworkStatus, ContainerError> {
        let name = self.cfg.network.as_str();
        if BUILTIN_NETWORKS.contains(&name) {
            tracing::warn!(network = name, "agent network is a built-in network; it is used as is, and egress is not filtered by the runner");
            return Ok(NetworkStatus::Builtin);
        }
        if let Some(api) = &self.api {
            return self.ensure_network_api(api, name).await;
        }
        let work = async {
            let inspect = self
                .cli(&["network", "inspect", name], NETWORK_TIMEOUT)
                .await?;
            if inspect.success {
                if let Ok(true) = self.network_allows_icc(name).await {
                    tracing::warn!(network = name, "{}", icc_warning(name));
                }
                return Ok(NetworkStatus::Present);
            }
            tracing::warn!(network = name, "agent network missing: creating it as a bridge without inter-container traffic; EGRESS IS UNFILTERED, restrict it with host firewall rules");
            let mut create = self
                .cli(
                    &[
                        "network", "create", "--driver", "bridge", "-o", ICC_OFF, name,
                    ],
                    NETWORK_TIMEOUT,
                )
                .await?;
            let refused_option = create.stderr.contains("enable_icc")
                || create.stderr.to_lowercase().contains("unsupported");
            if !create.success && !create.stderr.contains("already exists") && refused_option {
                // Podman's bridge (netavark, CNI) has no such switch and refuses the option.
                let plain = self
                    .cli(
                        &["network", "create", "--driver", "bridge", name],
                        NETWORK_TIMEOUT,
                    )
                    .await?;
                if plain.success {
                    tracing::warn!(network = name, refused = %create.stderr, "the engine cannot turn inter-container traffic off: created a plain bridge, agents of different runs can reach each other");
                }
                create = plain;
            }
            if create.success || create.stderr.contains("already exists") {
                Ok(NetworkStatus::Created)
            } else {
                Err(ContainerError::Cli {
                    docker: self.cfg.docker.clone(),
                    what: "network create".into(),
                    detail: create.stderr,
                })
            }
        };
        match tokio::time::timeout(NETWORK_TIMEOUT, work).await {
            Ok(result) => result,
            Err(_) => Err(ContainerError::Timeout {
                docker: self.cfg.docker.clone(),
                what: format!("network inspect/create {name}"),
                secs: NETWORK_TIMEOUT.as_secs(),
            }),
        }
    }

    /// [`Engine::ensure_network`] through the API: the same steps and messages.
    async fn ensure_network_api(
        &self,
        api: &super::engine_api::ApiDriver,
        name: &str,
    ) -> Result<NetworkStatus, ContainerError> {
        if let Some((driver, options)) = api.network(name).await? {
            if icc_allowed(&driver, options.get(ICC_OPTION).map(String::as_str)) {
                tracing::warn!(network = name, "{}", icc_warning(name));
            }
            return Ok(NetworkStatus::Present);
        }
        tracing::warn!(network = name, "agent network missing: creating it as a bridge without inter-container traffic; EGRESS IS UNFILTERED, restrict it with host firewall rules");
        let mut created = api.create_network(name, true).await;
        if let Err(detail) = &created {
            let refused =
                detail.contains("enable_icc") || detail.to_lowercase().contains("unsupported");
            if refused && !detail.contains("already exists") {
                let plain = api.create_network(name, false).await;
                if plain.is_ok() {
                    tracing::warn!(network = name, refused = %detail, "the engine cannot turn inter-container traffic off: created a plain bridge, agents of different runs can reach each other");
                }
                created = plain;
            }
        }
        match created {
            Ok(()) => Ok(NetworkStatus::Created),
            Err(detail) if detail.contains("already exists") => Ok(NetworkStatus::Created),
            Err(detail) => Err(ContainerError::Api {
                what: "network create".into(),
                detail,
            }),
        }
    }

    /// Whether containers on network `name` can reach each other: true unless it is a bridge
    /// with docker's `enable_icc=false` (podman has no such option, so always true there).
    pub async fn network_allows_icc(&self, name: &str) -> Result<bool, ContainerError> {
        if let Some(api) = &self.api {
            return match api.network(name).await? {
                Some((driver, options)) => Ok(icc_allowed(
                    &driver,
                    options.get(ICC_OPTION).map(String::as_str),
                )),
                None => Err(ContainerError::Api {
                    what: format!("network inspect {name}"),
                    detail: "no such network".into(),
                }),
            };
        }
        let format = format!("{{{{.Driver}}}}|{{{{index .Options \"{ICC_OPTION}\"}}}}");
        let out = self
            .cli_ok(
                &["network", "inspect", "--format", &format, name],
                CLI_TIMEOUT,
            )
            .await?;
        let (driver, icc) = out.trim().split_once('|').unwrap_or((out.trim(), ""));
        Ok(icc_allowed(driver, Some(icc.trim())))
    }

    /// The runtimes the engine knows (`docker info` Runtimes; podman: its OCI runtime).
    pub async fn runtimes(&self) -> Result<Vec<String>, ContainerError> {
        if self.api.is_some() {
            return self.api_info().await.map(|info| info.runtimes);
        }
        let docker = self
            .cli(&["info", "--format", "{{json .Runtimes}}"], CLI_TIMEOUT)
            .await?;
        if docker.success {
            if let Ok(serde_json::Value::Object(map)) =
                serde_json::from_str::<serde_json::Value>(docker.stdout.trim())
            {
                return Ok(map.keys().cloned().collect());
            }
        }
        let podman = self
            .cli_ok(
                &["info", "--format", "{{.Host.OCIRuntime.Name}}"],
                CLI_TIMEOUT,
            )
            .await?;
        Ok(podman.split_whitespace().map(str::to_owned).collect())
    }

    /// Boot check of `WSRUNNER_RUNTIME`: the engine must list it.
    pub async fn check_runtime(&self) -> Result<(), ContainerError> {
        let Some(runtime) = &self.cfg.runtime else {
            return Ok(());
        };
        let known = self.runtimes().await?;
        if known.iter().any(|r| r == runtime) {
            Ok(())
        } else {
            Err(ContainerError::UnknownRuntime {
                runtime: runtime.clone(),
                available: if known.is_empty() {
                    "none listed".into()
                } else {
                    known.join(", ")
                },
            })
        }
    }

    /// The engine's default log driver, asked once; `""` when `info` does not say.
    pub async fn log_driver(&self) -> String {
        self.create_facts().await.log_driver
    }

    /// Whether containers get the engine's init as PID 1 (API driver on an engine with one).
    pub async fn runs_init(&self) -> bool {
        self.create_facts().await.init
    }

    /// What shapes every create, asked once: the default log driver, and (API driver) whether
    /// the engine has an init. The CLI driver closes stdin to end a session and needs no init.
    async fn create_facts(&self) -> super::engine_api::CreateFacts {
        self.facts
            .get_or_init(|| async {
                if self.api.is_some() {
                    let info = self.api_info().await.unwrap_or_default();
                    let mut log_driver = info.log_driver;
                    if log_driver.is_empty() {
                        // Podman's compat `/info` leaves LoggingDriver empty (4.3, measured):
                        // its CLI says which driver it is, or no log cap is set through the API.
                        log_driver = self.cli_log_driver().await;
                    }
                    return super::engine_api::CreateFacts {
                        log_driver,
                        init: info.has_init,
                        ..Default::default()
                    };
                }
                super::engine_api::CreateFacts {
                    log_driver: self.cli_log_driver().await,
                    init: false,
                    ..Default::default()
                }
            })
            .await
            .clone()
    }

    /// The API driver's `/info`, asked once it answers (asked again after a failure).
    async fn api_info(&self) -> Result<super::engine_api::ApiInfo, ContainerError> {
        let Some(api) = &self.api else {
            return Ok(Default::default());
        };
        self.api_info.get_or_try_init(|| api.info()).await.cloned()
    }

    /// The default log driver as the CLI's `info` says it (docker, then podman's field);
    /// `""` when neither answers.
    async fn cli_log_driver(&self) -> String {
        for format in ["{{.LoggingDriver}}", "{{.Host.LogDriver}}"] {
            if let Ok(out) = self.cli(&["info", "--format", format], CLI_TIMEOUT).await {
                let driver = out.stdout.trim();
                if out.success && !driver.is_empty() && !driver.contains('<') {
                    return driver.to_owned();
                }
            }
        }
        String::new()
    }

    /// Whether the engine is (rootless) Podman and on cgroups v1, asked once it answers; the
    /// first answer is logged when it needs the operator's attention. An engine that does not
    /// answer counts as rootful Docker this time and is asked again next time.
    pub async fn engine_host(&self) -> EngineHost {
        let found = self
            .host
            .get_or_try_init(|| async {
                let host = self.probe_engine_host().await?;
                match host.note() {
                    Some((true, note)) => tracing::warn!("{note}"),
                    Some((false, note)) => tracing::info!("{note}"),
                    None => {}
                }
                Ok::<_, ContainerError>(host)
            })
            .await;
        found.copied().unwrap_or_default()
    }

    async fn probe_engine_host(&self) -> Result<EngineHost, ContainerError> {
        let podman_cli = Path::new(&self.cfg.docker)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("podman"));
        if let Some(api) = &self.api {
            let info = self.api_info().await?;
            return Ok(EngineHost {
                podman: podman_cli || api.is_podman().await?,
                rootless: info.rootless,
                cgroups_v1: info.cgroups_v1,
            });
        }
        let out = self
            .cli_ok(&["info", "--format", "{{json .}}"], CLI_TIMEOUT)
            .await?;
        parse_engine_info(&out).ok_or_else(|| ContainerError::Cli {
            docker: self.cfg.docker.clone(),
            what: "info".into(),
            detail: "its JSON names neither Podman's host.security nor Docker's SecurityOptions"
                .into(),
        })
    }

    /// The image's contract label (`""` when absent); an error when the image is not local.
    pub async fn contract_label(&self, image: &str) -> Result<String, ContainerError> {
        if let Some(api) = &self.api {
            return api.contract_label(image).await;
        }
        let format = format!("{{{{index .Config.Labels \"{CONTRACT_LABEL}\"}}}}");
        let out = self
            .cli_ok(
                &["image", "inspect", "--format", &format, image],
                CLI_TIMEOUT,
            )
            .await?;
        let value = out.trim();
        // A missing key prints "<no value>" on docker and podman.
        Ok(if value == "<no value>" {
            String::new()
        } else {
            value.to_owned()
        })
    }

    /// Inspect; when that fails, pull and inspect again (spec 4.8).
    async fn label_with_pull(&self, image: &str) -> Result<String, ContainerError> {
        self.label_with_pull_noting(image)
            .await
            .map(|(label, _)| label)
    }

    /// [`Engine::label_with_pull`], and whether it pulled.
    async fn label_with_pull_noting(&self, image: &str) -> Result<(String, bool), ContainerError> {
        if let Ok(label) = self.contract_label(image).await {
            return Ok((label, false));
        }
        if let Some(api) = &self.api {
            api.pull(image)
                .await
                .map_err(|detail| ContainerError::ImageUnavailable {
                    image: image.to_owned(),
                    detail,
                })?;
        } else {
            let pull = self.cli(&["pull", image], CLI_TIMEOUT * 5).await?;
            if !pull.success {
                return Err(ContainerError::ImageUnavailable {
                    image: image.to_owned(),
                    detail: pull.stderr,
                });
            }
        }
        self.contract_label(image)
            .await
            .map(|label| (label, true))
            .map_err(|e| ContainerError::ImageUnavailable {
                image: image.to_owned(),
                detail: e.to_string(),
            })
    }

    /// Records a run's use of an override image ([`ImageUse`]); a file that cannot be written
    /// is logged, never a run's failure.
    async fn note_image_use(&self, image: &str, pulled: bool) {
        let Some(path) = self.cfg.image_use_file.clone() else {
            return;
        };
        let _guard = self.image_use_lock.lock().await;
        let image = image.to_owned();
        let written = tokio::task::spawn_blocking(move || {
            let mut uses = ImageUse::load(&path);
            uses.note(&image, pulled, now_ms());
            uses.store(&path)
        })
        .await;
        if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
            tracing::warn!("cannot record the agent image's use (WSRUNNER_IMAGE_PRUNE_AFTER): {e}");
        }
    }

    /// Removes the override images this runner pulled that no run used for `after`
    /// (`WSRUNNER_IMAGE_PRUNE_AFTER`), never the default image; an image a container still
    /// uses is left to the engine's refusal and tried again next time.
    pub async fn prune_idle_images(&self, after: Duration) -> ImagePrune {
        let mut report = ImagePrune::default();
        let Some(path) = self.cfg.image_use_file.clone() else {
            return report;
        };
        let _guard = self.image_use_lock.lock().await;
        let mut uses = ImageUse::load(&path);
        let idle = uses.idle(&self.cfg.default_image, after, now_ms());
        if idle.is_empty() {
            return report;
        }
        for image in idle {
            match self.remove_image(&image).await {
                Ok(()) => {
                    tracing::info!(
                        image,
                        "pruned an override agent image unused for WSRUNNER_IMAGE_PRUNE_AFTER"
                    );
                    uses.images.remove(&image);
                    report.removed.push(image);
                }
                Err(e) => report.kept.push((image, e.to_string())),
            }
        }
        if let Err(e) = uses.store(&path) {
            tracing::warn!("cannot record the pruned agent images: {e}");
        }
        report
    }

    /// Removes an image (not forced: one a container uses stays); a missing one is fine.
    pub async fn remove_image(&self, image: &str) -> Result<(), ContainerError> {
        check_image_ref("the image to prune", image)?;
        if let Some(api) = &self.api {
            return api.remove_image(image).await;
        }
        let out = self.cli(&["image", "rm", "--", image], CLI_TIMEOUT).await?;
        let lower = out.stderr.to_lowercase();
        if out.success || lower.contains("no such image") || lower.contains("image not known") {
            Ok(())
        } else {
            Err(ContainerError::Cli {
                docker: self.cfg.docker.clone(),
                what: "image rm".into(),
                detail: out.stderr,
            })
        }
    }

    /// Bytes an image takes in the engine's store (`None`: not there, or not said).
    pub async fn image_size(&self, image: &str) -> Option<u64> {
        if let Some(api) = &self.api {
            return api.image_size(image).await;
        }
        let out = self
            .cli(
                &["image", "inspect", "--format", "{{.Size}}", image],
                CLI_TIMEOUT,
            )
            .await
            .ok()?;
        out.success
            .then(|| out.stdout.trim().parse().ok())
            .flatten()
    }

    fn judge_label(&self, image: &str, label: String) -> Result<bool, ContainerError> {
        if label == CONTRACT_VERSION {
            Ok(false)
        } else if label.is_empty() {
            if self.cfg.allow_unlabeled {
                tracing::warn!(
                    image,
                    "image has no agent contract label; accepted (WSRUNNER_ALLOW_UNLABELED_IMAGE=1)"
                );
                Ok(true)
            } else {
                Err(ContainerError::Unlabeled {
                    image: image.to_owned(),
                })
            }
        } else {
            Err(ContainerError::WrongContract {
                image: image.to_owned(),
                found: label,
            })
        }
    }

    /// Boot check of the default image (spec 4.8). An `Err` is fatal for the daemon.
    pub async fn boot_check_image(&self) -> Result<BootImageCheck, ContainerError> {
        // Asked here so that a rootless engine is reported at start, not at the first run.
        self.engine_host().await;
        let image = self.cfg.default_image.as_str();
        if image.is_empty() {
            tracing::warn!("WSRUNNER_IMAGE is empty: coding jobs without an image will fail");
            return Ok(BootImageCheck::NoDefaultImage);
        }
        match self.label_with_pull(image).await {
            Err(ContainerError::ImageUnavailable { detail, .. }) => {
                tracing::warn!(image, %detail, "default image unavailable; contract check skipped at boot");
                Ok(BootImageCheck::Skipped { reason: detail })
            }
            Err(other) => Err(other),
            Ok(label) => Ok(if self.judge_label(image, label)? {
                BootImageCheck::UnlabeledAllowed
            } else {
                BootImageCheck::Ok
            }),
        }
    }

    /// Per-run image choice and check for `coding_agent` (spec 4.8): returns the image to run.
    pub async fn check_run_image(&self, requested: Option<&str>) -> Result<String, ContainerError> {
        self.check_job_image(LaunchKind::CodingAgent, requested)
            .await
    }

    /// Per-run image choice and check for every job kind: a valid reference, the configured
    /// default or one in the allowlist, and the contract label (spec 4.8, applied to container
    /// kinds too). A `coding_agent` job without an image gets the default; a container job
    /// without one is refused.
    pub async fn check_job_image(
        &self,
        kind: LaunchKind,
        requested: Option<&str>,
    ) -> Result<String, ContainerError> {
        let requested = requested.map(str::trim).filter(|s| !s.is_empty());
        let image = match (kind, requested) {
            (_, Some(image)) => image.to_owned(),
            (LaunchKind::CodingAgent, None) => self.cfg.default_image.clone(),
            (LaunchKind::Container, None) => return Err(ContainerError::NoContainerImage),
        };
        if image.is_empty() {
            return Err(ContainerError::NoImage);
        }
        check_image_ref("the job's image", &image)?;
        if image != self.cfg.default_image && !self.cfg.allowed_images.contains(&image) {
            return Err(ContainerError::ImageNotAllowed { image });
        }
        // The contract label names the JSONL agent contract (spec 4.8); container kinds do not
        // speak it, so for them the allowlist is the control (and `create` pulls if needed).
        let pulled = if kind == LaunchKind::CodingAgent {
            let (label, pulled) = self.label_with_pull_noting(&image).await?;
            self.judge_label(&image, label)?;
            pulled
        } else {
            // `create` pulls what is missing.
            self.contract_label(&image).await.is_err()
        };
        if image != self.cfg.default_image {
            self.note_image_use(&image, pulled).await;
        }
        Ok(image)
    }

    /// Creates the container (env file written, read by `create`, then deleted). Idempotent per
    /// (run, attempt): a container that already exists under the name is kept and reused.
    pub async fn create(
        &self,
        spec: &ContainerSpec,
        env_dir: &Path,
    ) -> Result<String, ContainerError> {
        if spec.image.trim().is_empty() {
            return Err(match spec.kind {
                LaunchKind::CodingAgent => ContainerError::NoImage,
                LaunchKind::Container => ContainerError::NoContainerImage,
            });
        }
        check_image_ref("the job's image", &spec.image)?;
        let name = container_name(&self.cfg.instance, spec.run_id, spec.attempt);
        if self.state(&name).await?.is_some() {
            return Ok(name);
        }
        let host = self.engine_host().await;
        if let Some(api) = &self.api {
            // The env goes in the create body: no file ever holds it.
            let mut facts = self.create_facts().await;
            facts.userns = host.userns_mode().map(str::to_owned);
            return api.create(&self.cfg, spec, &facts).await.map(|()| name);
        }
        let mut engine_args = log_backstop_args(&self.log_driver().await, self.cfg.output_limit);
        engine_args.extend(userns_args(host));
        let env_file = write_env_file(env_dir, &spec.env, spec.run_id)?;
        let argv = create_argv_with_logs(&self.cfg, spec, env_file.path(), &engine_args);
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let result = self.cli_ok(&args, CLI_TIMEOUT).await;
        // The engine copied the env at create time: the secrets leave the disk now.
        drop(env_file);
        result.map(|_| name)
    }

    /// Starts a created container (no-op when it already runs).
    pub async fn start(&self, name: &str) -> Result<(), ContainerError> {
        if let Some(api) = &self.api {
            return api.start(name).await;
        }
        self.cli_ok(&["start", name], CLI_TIMEOUT).await.map(|_| ())
    }

    /// The container's state, `None` when no such container exists.
    pub async fn state(&self, name: &str) -> Result<Option<ContainerState>, ContainerError> {
        if let Some(api) = &self.api {
            return api.state(name).await;
        }
        let out = self
            .cli(
                &[
                    "container",
                    "inspect",
                    "--format",
                    "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}",
                    name,
                ],
                CLI_TIMEOUT,
            )
            .await?;
        if !out.success {
            let lower = out.stderr.to_lowercase();
            if lower.contains("no such") || lower.contains("not found") {
                return Ok(None);
            }
            return Err(ContainerError::Cli {
                docker: self.cfg.docker.clone(),
                what: "container inspect".into(),
                detail: out.stderr,
            });
        }
        Ok(Some(parse_state(out.stdout.trim())))
    }

    /// Waits until the container stopped and returns its exit code (`None` if it is gone).
    pub async fn wait_exit(&self, name: &str) -> Result<Option<i32>, ContainerError> {
        if let Some(api) = &self.api {
            return api.wait_exit(name).await;
        }
        let out = self
            .cli(&["wait", name], Duration::from_secs(24 * 3600))
            .await?;
        if out.success {
            if let Ok(code) = out.stdout.trim().parse::<i32>() {
                return Ok(Some(code));
            }
        }
        Ok(match self.state(name).await? {
            Some(ContainerState::Exited { code, .. }) => Some(code),
            _ => None,
        })
    }

    /// Kills the container itself (SIGKILL); a container that is not running is fine.
    pub async fn kill(&self, name: &str) -> Result<(), ContainerError> {
        if let Some(api) = &self.api {
            return api.kill(name).await;
        }
        let out = self.cli(&["kill", name], CLI_TIMEOUT).await?;
        self.unless_still_running("kill", name, out).await
    }

    /// A failed `stop`/`kill` is fine when the container is no longer running (gone, exited
    /// or never started); otherwise it is the CLI's error.
    async fn unless_still_running(
        &self,
        what: &str,
        name: &str,
        out: CliOutput,
    ) -> Result<(), ContainerError> {
        if out.success {
            return Ok(());
        }
        match self.state(name).await? {
            None | Some(ContainerState::Exited { .. }) | Some(ContainerState::Created) => Ok(()),
            Some(_) => Err(ContainerError::Cli {
                docker: self.cfg.docker.clone(),
                what: what.into(),
                detail: out.stderr,
            }),
        }
    }

    /// Removes the container, killing it first if needed; a missing container is fine.
    pub async fn remove(&self, name: &str) -> Result<(), ContainerError> {
        if let Some(api) = &self.api {
            return api.remove(name).await;
        }
        let out = self.cli(&["rm", "-f", name], CLI_TIMEOUT).await?;
        if out.success || self.state(name).await?.is_none() {
            Ok(())
        } else {
            Err(ContainerError::Cli {
                docker: self.cfg.docker.clone(),
                what: "rm -f".into(),
                detail: out.stderr,
            })
        }
    }

    /// The container's output from its start (`follow`: until it stops): an in-process logs
    /// connection (API driver) or a `<docker> logs` child (CLI driver).
    pub async fn open_logs(&self, name: &str, follow: bool) -> Result<Logs, ContainerError> {
        if let Some(api) = self.api() {
            let logs = api.logs(name, follow).await?;
            return Ok(Logs {
                stdout: Box::new(logs.stdout),
                stderr: Box::new(logs.stderr),
                source: Box::new(DriverLogs::Api(logs.task)),
            });
        }
        let args: &[&str] = if follow {
            &["logs", "--follow", name]
        } else {
            &["logs", name]
        };
        let mut child = self.spawn(args)?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ContainerError::Spawn {
                docker: self.cfg.docker.clone(),
                source: std::io::Error::other("logs pipes missing"),
            });
        };
        Ok(Logs {
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            source: Box::new(DriverLogs::Cli(child)),
        })
    }

    /// Attaches to a running container's stdin: the API driver makes a new attach
    /// connection; the CLI driver spawns a new holder ([`Engine::open_stdin_holder`]).
    pub async fn attach_stdin(&self, name: &str, run_dir: &Path) -> std::io::Result<StdinChannel> {
        match self.api() {
            Some(api) => api
                .attach_stdin(name)
                .await
                .map(|stdin| StdinChannel::new(Box::new(stdin)))
                .map_err(|e| std::io::Error::other(e.to_string())),
            None => self.open_stdin_holder(name, run_dir),
        }
    }

    /// Stdin again after the runner restarted: the API driver attaches again (the container
    /// kept stdin open); the CLI driver finds the holder a previous process left.
    pub async fn reattach_stdin(&self, name: &str, run_dir: &Path) -> Option<StdinChannel> {
        match self.api() {
            Some(_) => self.attach_stdin(name, run_dir).await.ok(),
            None => find_stdin_holder(name, run_dir),
        }
    }

    /// Every container labelled for this runner instance, running or not.
    pub async fn find_instance_containers(&self) -> Result<Vec<FoundContainer>, ContainerError> {
        if let Some(api) = &self.api {
            return api.find(&self.cfg.instance).await;
        }
        let filter = format!("label={LABEL_INSTANCE}={}", self.cfg.instance);
        let names = self
            .cli_ok(
                &["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"],
                CLI_TIMEOUT,
            )
            .await?;
        let mut found = Vec::new();
        for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
            let format = format!(
                "{{{{.State.Status}}}} {{{{.State.ExitCode}}}} {{{{.State.OOMKilled}}}}|{{{{index .Config.Labels \"{LABEL_RUN_ID}\"}}}}|{{{{index .Config.Labels \"{LABEL_ATTEMPT}\"}}}}"
            );
            let out = self
                .cli(
                    &["container", "inspect", "--format", &format, name],
                    CLI_TIMEOUT,
                )
                .await?;
            if !out.success {
                continue; // removed between ps and inspect
            }
            let mut parts = out.stdout.trim().split('|');
            let state = parse_state(parts.next().unwrap_or_default());
            let run_id = parts.next().and_then(|v| v.trim().parse().ok());
            let attempt = parts.next().and_then(|v| v.trim().parse().ok());
            found.push(FoundContainer {
                name: name.to_owned(),
                run_id,
                attempt,
                state,
            });
        }
        Ok(found)
    }
}

// ---- The CLI driver's stdin holder (docs/containers.md, "Re-attach")

const FIFO_NAME: &str = "stdin.fifo";
const HOLDER_PID_FILE: &str = "stdin-holder.pid";

/// The CLI driver's stdin: a FIFO read by a detached `<docker> attach` process.
struct CliStdin {
    fifo: PathBuf,
    holder_pid: i32,
    /// Present when this process spawned the holder (so it can reap it).
    holder: Option<std::process::Child>,
}

impl Engine {
    /// Attaches a detached stdin holder to a started container. `run_dir` must be a private
    /// (0700) directory owned by this run attempt.
    pub fn open_stdin_holder(&self, name: &str, run_dir: &Path) -> std::io::Result<StdinChannel> {
        let fifo = run_dir.join(FIFO_NAME);
        match std::fs::remove_file(&fifo) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "run dir path has a NUL")
        })?;
        // SAFETY: mkfifo with a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Read-write so the holder itself keeps a writer: it never sees EOF while the runner
        // is away, only when it is killed on purpose.
        let stdin = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)?;
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(&self.cfg.docker)
            // Long-lived: it must not carry the runner's secrets (docs/containers.md).
            .env_clear()
            .envs(engine_env())
            .args(["attach", "--sig-proxy=false", name])
            .stdin(stdin)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C or group kill aimed at the runner spares it.
            .process_group(0)
            .spawn()?;
        let holder_pid = i32::try_from(child.id())
            .map_err(|_| std::io::Error::other("holder pid out of range"))?;
        std::fs::write(run_dir.join(HOLDER_PID_FILE), format!("{holder_pid}\n"))?;
        Ok(StdinChannel::new(Box::new(CliStdin {
            fifo,
            holder_pid,
            holder: Some(child),
        })))
    }
}

/// Finds the stdin holder a previous runner process left for `name`; `None` when it is
/// gone (then the container's stdin is closed for good).
pub fn find_stdin_holder(name: &str, run_dir: &Path) -> Option<StdinChannel> {
    let pid: i32 = std::fs::read_to_string(run_dir.join(HOLDER_PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Guard against pid reuse: the process must still be our attach for this container.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args.iter().any(|a| *a == b"attach") && args.contains(&name.as_bytes());
    let fifo = run_dir.join(FIFO_NAME);
    (ours && fifo.exists()).then(|| {
        StdinChannel::new(Box::new(CliStdin {
            fifo,
            holder_pid: pid,
            holder: None,
        }))
    })
}

impl CliStdin {
    /// Writes one command line. Fails when nobody reads the FIFO any more.
    async fn send_line(&self, line: &str) -> std::io::Result<()> {
        let fifo = self.fifo.clone();
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            // Non-blocking open fails with ENXIO instead of hanging when no reader is left.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)?;
            let mut written = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while written < data.len() {
                match file.write(&data[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the agent did not read its stdin for 30 s",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        write
            .await
            .map_err(|e| std::io::Error::other(format!("stdin writer task failed: {e}")))?
    }

    /// Closes the container's stdin for good (the agent sees EOF) by ending the holder.
    async fn close_holder(self) {
        let CliStdin {
            fifo,
            holder_pid,
            holder,
        } = self;
        // SAFETY: plain kill(2) on a pid we verified or spawned.
        unsafe {
            libc::kill(holder_pid, libc::SIGKILL);
        }
        if let Some(mut child) = holder {
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        let _ = std::fs::remove_file(&fifo);
    }
}

impl StdinPort for CliStdin {
    fn send<'a>(&'a self, line: &'a str) -> EngineFuture<'a, std::io::Result<()>> {
        Box::pin(self.send_line(line))
    }

    fn survives_close(&self) -> bool {
        false
    }

    fn close(self: Box<Self>) -> EngineFuture<'static, ()> {
        Box::pin(self.close_holder())
    }
}

/// What feeds an [`Engine`]'s [`Logs`].
enum DriverLogs {
    /// An in-process logs connection (API driver).
    Api(tokio::task::JoinHandle<Result<(), String>>),
    /// A `<docker> logs` child (CLI driver).
    Cli(tokio::process::Child),
}

impl LogSource for DriverLogs {
    fn kill(&mut self) -> EngineFuture<'_, ()> {
        Box::pin(async move {
            match self {
                DriverLogs::Api(task) => task.abort(),
                DriverLogs::Cli(child) => {
                    let _ = child.kill().await;
                }
            }
        })
    }

    fn finish(self: Box<Self>) -> EngineFuture<'static, Result<(), String>> {
        Box::pin(async move {
            match *self {
                DriverLogs::Api(task) => match task.await {
                    Ok(result) => result,
                    Err(e) if e.is_cancelled() => Ok(()),
                    Err(e) => Err(format!("logs task failed: {e}")),
                },
                DriverLogs::Cli(mut child) => match child.wait().await {
                    Ok(status) if status.success() => Ok(()),
                    Ok(status) => Err(format!("exited with {status}")),
                    Err(e) => Err(e.to_string()),
                },
            }
        })
    }
}

/// Whether a network with this driver and `enable_icc` option value lets containers talk.
fn icc_allowed(driver: &str, icc: Option<&str>) -> bool {
    !matches!(driver, "null" | "none") && icc.map(str::trim) != Some("false")
}

/// Parses `"<status> <exit code> <oom killed>"` from inspect.
fn parse_state(text: &str) -> ContainerState {
    let mut parts = text.split_whitespace();
    let status = parts.next().unwrap_or_default();
    let code = parts.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
    let oom_killed = parts.next() == Some("true");
    match status {
        "created" | "configured" => ContainerState::Created,
        "running" => ContainerState::Running,
        "exited" | "stopped" => ContainerState::Exited { code, oom_killed },
        other => ContainerState::Other(other.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_rejects_newlines_and_bad_keys() {
        let mut env = BTreeMap::new();
        env.insert("A".to_owned(), "x\ny".to_owned());
        assert!(matches!(
            render_env_file(&env, 1),
            Err(ContainerError::EnvNewline { key }) if key == "A"
        ));
        let mut env = BTreeMap::new();
        env.insert("1BAD".to_owned(), "x".to_owned());
        assert!(matches!(
            render_env_file(&env, 1),
            Err(ContainerError::EnvKey { .. })
        ));
    }

    #[test]
    fn agent_run_id_always_wins() {
        let mut env = BTreeMap::new();
        env.insert("AGENT_RUN_ID".to_owned(), "999".to_owned());
        env.insert("WS_TOKEN".to_owned(), "tok=en".to_owned());
        let text = render_env_file(&env, 42).expect("valid env");
        assert_eq!(text, "WS_TOKEN=tok=en\nAGENT_RUN_ID=42\n");
    }

    #[test]
    fn config_defaults_equal_upstream_and_reject_garbage() {
        let cfg = ContainerConfig::from_lookup("host a", |_| None).expect("defaults");
        assert_eq!(cfg.network, "coding-agent-egress");
        assert_eq!(cfg.pids_limit, 512);
        assert_eq!(cfg.memory, "4g");
        assert_eq!(cfg.cpus, "2");
        assert_eq!(cfg.instance, "host-a");
        for (name, value) in [
            ("WSRUNNER_PIDS_LIMIT", "many"),
            ("WSRUNNER_MEMORY", "4 gigs"),
            ("WSRUNNER_CPUS", "-1"),
        ] {
            let err = ContainerConfig::from_lookup("x", |n| (n == name).then(|| value.into()))
                .expect_err("garbage must be rejected");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn image_references_follow_the_grammar() {
        for good in [
            "alpine",
            "alpine:3.20",
            "windshift-test-agent:dev",
            "ghcr.io/windshiftapp/windshift-agent:latest",
            "localhost:5000/a/b_c__d/e-f--g:v1.2-rc_3",
            "registry.example.com:443/team/agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "Registry.Example.com/x/y:TAG",
        ] {
            assert_eq!(image_ref_problem(good), None, "{good}");
        }
        for (bad, why) in [
            ("--privileged", "'-'"),
            ("-v/:/host", "'-'"),
            ("", "empty"),
            ("alpine latest", "whitespace"),
            ("alpine\n", "whitespace"),
            ("alp\u{7}ine", "control"),
            ("Alpine", "lowercase"),
            ("a//b", "lowercase"),
            ("a/b.", "lowercase"),
            ("a/.b", "lowercase"),
            ("a/b---", "lowercase"),
            ("a:", "tag"),
            ("a:-x", "tag"),
            ("a:b/c", "registry"),
            ("a@sha256:abc", "digest"),
            (
                "a@md5:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "digest",
            ),
            ("bad_host.io:port/a", "registry"),
            ("-host.io/a", "'-'"),
        ] {
            let problem = image_ref_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(problem.contains(why), "{bad:?}: {problem}");
        }
        assert!(image_ref_problem(&"a".repeat(600)).is_some());
        assert!(image_ref_problem(&format!("a:{}", "t".repeat(129))).is_some());
        let err = check_image_ref("WSRUNNER_IMAGE", "--privileged").expect_err("refused");
        assert!(err.to_string().contains("WSRUNNER_IMAGE"), "{err}");
    }

    #[test]
    fn engine_children_get_only_the_engine_variables() {
        use std::ffi::OsString;
        let runner_env: BTreeMap<&str, &str> = [
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("DOCKER_HOST", "unix:///run/docker.sock"),
            ("https_proxy", "http://proxy:3128"),
            ("WSRUNNER_CREDENTIAL", "wsrc_secret"),
            ("WSRUNNER_REGISTRATION_TOKEN", "wsrt_secret"),
            ("ANTHROPIC_API_KEY", "sk-secret"),
            ("LD_PRELOAD", "/tmp/evil.so"),
        ]
        .into_iter()
        .collect();
        let env = engine_env_from(|name| runner_env.get(name).map(OsString::from));
        let names: Vec<&str> = env.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["PATH", "HOME", "DOCKER_HOST", "https_proxy"]);
        // The command builder applies exactly that list, on a cleared environment.
        let engine = Engine::new(ContainerConfig::default());
        let cmd = engine.command(&["version"]);
        let std_cmd = cmd.as_std();
        let mut set: Vec<String> = Vec::new();
        for (key, value) in std_cmd.get_envs() {
            let key = key.to_string_lossy().into_owned();
            assert!(ENGINE_ENV.contains(&key.as_str()), "{key} passed");
            if value.is_some() {
                set.push(key);
            }
        }
        let parent = engine_env();
        assert_eq!(set.len(), parent.len());
    }

    #[test]
    fn argv_carries_runtime_backstop_and_double_dash() {
        let cfg = ContainerConfig {
            runtime: Some("runsc".into()),
            output_limit: 1 << 20,
            ..ContainerConfig::default()
        };
        let spec = ContainerSpec {
            run_id: 1,
            attempt: 1,
            kind: LaunchKind::Container,
            image: "alpine:3".into(),
            env: BTreeMap::new(),
            checkout: None,
            extra_args: Vec::new(),
        };
        let logs = log_backstop_args("json-file", cfg.output_limit);
        assert_eq!(
            logs,
            ["--log-opt", "max-size=2097152", "--log-opt", "max-file=5"]
        );
        assert_eq!(
            log_backstop_args("k8s-file", 1 << 20),
            ["--log-opt", "max-size=10485760"]
        );
        assert!(log_backstop_args("journald", 1 << 20).is_empty());
        let argv = create_argv_with_logs(&cfg, &spec, Path::new("/e"), &logs);
        assert!(argv.contains(&"--runtime=runsc".to_owned()), "{argv:?}");
        assert_eq!(&argv[argv.len() - 2..], ["--", "alpine:3"]);
        assert!(argv.windows(2).any(|w| w == ["--log-opt", "max-file=5"]));
    }

    #[test]
    fn hardening_settings_parse_and_refuse() {
        let get = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let cfg = ContainerConfig::from_lookup(
            "x",
            get(&[
                ("WSRUNNER_RUNTIME", "runc"),
                ("WSRUNNER_AGENT_OUTPUT_LIMIT", "64k"),
            ]),
        )
        .expect("valid");
        assert_eq!(cfg.runtime.as_deref(), Some("runc"));
        assert_eq!(cfg.output_limit, 64 << 10);
        assert_eq!(ContainerConfig::default().output_limit, 256 << 20);
        assert_eq!(parse_output_limit("1g"), Some(1 << 30));
        assert_eq!(parse_output_limit("100"), None, "below the minimum");
        assert_eq!(parse_output_limit("12q"), None);
        for pairs in [
            &[("WSRUNNER_NETWORK", "host")][..],
            &[("WSRUNNER_RUNTIME", "--privileged")][..],
            &[("WSRUNNER_IMAGE", "-it")][..],
            &[("WSRUNNER_ALLOWED_IMAGES", "alpine, --rm")][..],
            &[("WSRUNNER_AGENT_OUTPUT_LIMIT", "lots")][..],
        ] {
            assert!(
                ContainerConfig::from_lookup("x", get(pairs)).is_err(),
                "{pairs:?}"
            );
        }
        let host = ContainerConfig::from_lookup(
            "x",
            get(&[
                ("WSRUNNER_NETWORK", "host"),
                ("WSRUNNER_ALLOW_HOST_NETWORK", "1"),
            ]),
        )
        .expect("opted in");
        assert_eq!(host.network, "host");
    }

    #[test]
    fn rootless_podman_maps_the_runner_to_the_agent_uid() {
        // `podman info --format '{{json .}}'` (trimmed) as a rootless user on cgroups v1.
        let podman = r#"{"host":{"cgroupVersion":"v1","security":{"rootless":true,"seccompEnabled":true}},"store":{}}"#;
        let host = parse_engine_info(podman).expect("podman info");
        assert_eq!(
            host,
            EngineHost {
                podman: true,
                rootless: true,
                cgroups_v1: true
            }
        );
        assert_eq!(userns_args(host), ["--userns=keep-id:uid=1000,gid=1000"]);
        let (warn, note) = host.note().expect("noted");
        assert!(warn, "cgroups v1 ignores the limits: {note}");
        assert!(
            note.contains("keep-id") && note.contains("WSRUNNER_MEMORY"),
            "{note}"
        );
        let v2 = r#"{"host":{"cgroupVersion":"v2","security":{"rootless":true}}}"#;
        let (warn, _) = parse_engine_info(v2).unwrap().note().unwrap();
        assert!(!warn);
        // Rootful Podman and rootful Docker: no user namespace flag, nothing to note.
        let rootful = r#"{"host":{"cgroupVersion":"v2","security":{"rootless":false}}}"#;
        let docker = r#"{"SecurityOptions":["name=seccomp,profile=default"],"CgroupVersion":"2"}"#;
        for json in [rootful, docker] {
            let host = parse_engine_info(json).expect("parsed");
            assert!(userns_args(host).is_empty(), "{json}");
            assert_eq!(host.note(), None);
        }
        // Rootless Docker has no keep-id: no flag, and a warning saying what to do.
        let rootless_docker = r#"{"SecurityOptions":["name=seccomp,profile=default","name=rootless"],"CgroupVersion":"2"}"#;
        let host = parse_engine_info(rootless_docker).expect("docker info");
        assert!(host.rootless && !host.podman);
        assert!(userns_args(host).is_empty());
        assert!(host
            .note()
            .is_some_and(|(warn, n)| warn && n.contains("rootless Docker")));
        assert_eq!(parse_engine_info("not json"), None);
        assert_eq!(parse_engine_info("{}"), None);
        // The flag sits before the sandbox flags and the image, like the log options.
        let spec = ContainerSpec {
            run_id: 7,
            attempt: 1,
            kind: LaunchKind::CodingAgent,
            image: "agent:1".into(),
            env: BTreeMap::new(),
            checkout: Some(PathBuf::from("/cache/runs/7")),
            extra_args: Vec::new(),
        };
        let argv = create_argv_with_logs(
            &ContainerConfig::default(),
            &spec,
            Path::new("/e"),
            &userns_args(parse_engine_info(podman).unwrap()),
        );
        let userns = argv
            .iter()
            .position(|a| a.starts_with("--userns="))
            .unwrap();
        let image = argv.iter().position(|a| a == "--").unwrap();
        assert!(userns < image, "{argv:?}");
        assert!(argv.contains(&"/cache/runs/7:/workspace:Z".to_owned()));
        assert!(argv.contains(&"--user=1000:1000".to_owned()));
    }

    #[test]
    fn image_use_prunes_only_idle_pulled_overrides() {
        let hour = Duration::from_secs(3600);
        let mut uses = ImageUse::default();
        uses.note("agent:default", true, 0);
        uses.note("agent:pulled", true, 0);
        uses.note("agent:placed", false, 0);
        uses.note("agent:recent", true, 0);
        uses.note("agent:recent", false, 3_000_000);
        // `pulled` sticks, the last use only moves forwards.
        uses.note("agent:placed", false, 0);
        assert!(uses.images["agent:recent"].pulled);
        uses.note("agent:recent", false, 1);
        assert_eq!(uses.images["agent:recent"].last_used_ms, 3_000_000);
        let idle = uses.idle("agent:default", hour, 3_700_000);
        assert_eq!(idle, ["agent:pulled"]);
        assert!(uses.idle("agent:default", hour, 3_599_999).is_empty());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(IMAGE_USE_FILE);
        assert_eq!(ImageUse::load(&file), ImageUse::default(), "missing: empty");
        uses.store(&file).expect("store");
        assert_eq!(ImageUse::load(&file), uses);
        std::fs::write(&file, "{not json").expect("write");
        assert_eq!(ImageUse::load(&file), ImageUse::default(), "garbage: empty");
    }

    #[test]
    fn names_are_deterministic_and_safe() {
        assert_eq!(container_name("a b/c", 42, 3), "wsr-a-b-c-run-42-3");
        assert_eq!(sanitize_name_part("///"), "default");
    }

    #[test]
    fn parses_states() {
        assert_eq!(parse_state("running 0 false"), ContainerState::Running);
        assert_eq!(
            parse_state("exited 137 true"),
            ContainerState::Exited {
                code: 137,
                oom_killed: true
            }
        );
        assert_eq!(parse_state("created 0 false"), ContainerState::Created);
    }
}
