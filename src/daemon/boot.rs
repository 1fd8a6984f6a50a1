//! Start-up in spec 4.1's order: the cache root, the server URL, the container engine (the
//! agent network, the runtime, the image contract), the credential, the journal, a persisted
//! pause. A failure names its exit code and what to tell the operator.

use std::sync::Arc;

use tracing::{info, warn};

use super::liveness::HeartbeatPolicy;
use super::{ctl, Ctx, DaemonOptions, EXIT_FATAL};
use crate::config::ValidConfig;
use crate::control::client::{Client, ClientConfig, Preflight};
use crate::control::credential::{
    obtain_credential, CredentialError, CredentialInputs, CredentialSource,
};
use crate::control::events::{EventSender, EventSenderConfig};
use crate::control::EXIT_CONFIG;
use crate::effects::clock::SystemClock;
use crate::effects::container::{
    sanitize_name_part, BootImageCheck, ContainerError, Engine, NetworkStatus,
};
use crate::effects::git::{SystemGit, TransportPolicy};
use crate::journal::{JournalIdentity, SledJournal};

/// A start-up failure: the exit code and what to tell the operator.
pub(super) struct BootError {
    pub(super) code: i32,
    pub(super) message: String,
}

fn boot_err(code: i32, message: impl Into<String>) -> BootError {
    BootError {
        code,
        message: message.into(),
    }
}

/// The runner instance name used in container names and labels: the display name plus a
/// short hash of the journal directory, so two runners on one host never sweep each other's
/// containers, and a restarted runner finds its own.
pub fn instance_name(cfg: &ValidConfig) -> String {
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let mut hash: u32 = 0x811c_9dc5;
    for b in cfg.journal_dir.to_string_lossy().bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    sanitize_name_part(&format!("{}-{:08x}", cfg.name, hash))
}

pub(super) async fn boot(cfg: ValidConfig, opts: &DaemonOptions) -> Result<Arc<Ctx>, BootError> {
    if !cfg.origins.is_empty() {
        info!("settings: {}", cfg.origins_line());
    }
    if cfg.llm_model.is_none() {
        warn!("no WSRUNNER_LLM_MODEL (or CODING_AGENT_LLM_MODEL): windshift-agent images exit with code 2 unless the server sends LLM_MODEL");
    }
    // 0. The cache root (credential, caches, checkouts) is ours alone, or nothing starts.
    crate::cache_root::ensure(&cfg.cache_root).map_err(|e| boot_err(EXIT_CONFIG, e))?;

    // 1. The server URL (spec 4.1 steps 1 and 3).
    let mut client_cfg = opts
        .client
        .clone()
        .unwrap_or_else(|| ClientConfig::new(cfg.api_url.clone()));
    client_cfg.api_url = cfg.api_url.clone();
    client_cfg.allow_insecure = cfg.allow_insecure;
    // A failing heartbeat is retried no further apart than the heartbeat policy's gap, so
    // liveness returns within seconds of the server's return.
    let heartbeat = HeartbeatPolicy::new(cfg.heartbeat_interval);
    client_cfg.heartbeat_retry = heartbeat.client_retry(client_cfg.heartbeat_retry);
    let client = Client::new(client_cfg).map_err(|e| boot_err(EXIT_CONFIG, e.to_string()))?;
    if cfg.allow_insecure && cfg.api_url.to_ascii_lowercase().starts_with("http://") {
        warn!("WSRUNNER_ALLOW_INSECURE=1: talking to the server over plain http (local development only)");
    }
    if !cfg.api_url.trim_end_matches('/').ends_with("/api") {
        warn!(api_url = %cfg.api_url, "WS_API_URL does not end in /api; it must be the Windshift API base (e.g. https://host/api)");
    }
    match client.preflight().await {
        Ok(Preflight::Ok { version }) => info!(version, "Windshift server reachable"),
        Ok(Preflight::Unreachable { message }) => {
            warn!("cannot reach the Windshift server yet ({message}); continuing")
        }
        Err(e) => return Err(boot_err(EXIT_CONFIG, e.to_string())),
    }

    // 2. Docker: the agent network and the image contract (spec 4.1 steps 4 and 5).
    let instance = instance_name(&cfg);
    let engine = Engine::new(cfg.container_config(instance.clone()));
    info!(driver = engine.driver_note(), "container engine driver");
    match engine.ensure_network().await {
        Ok(NetworkStatus::Created) => {
            warn!(network = %cfg.network, "created the agent network; its egress is unfiltered: apply your own egress rules")
        }
        Ok(_) => {}
        Err(e) => {
            return Err(boot_err(
                EXIT_FATAL,
                format!("{e} (is the Docker daemon running and may this user talk to it?)"),
            ))
        }
    }
    // WSRUNNER_RUNTIME must be one the engine has (issue 11): refused at start, not per run.
    match engine.check_runtime().await {
        Ok(()) => {}
        Err(e @ ContainerError::UnknownRuntime { .. }) => {
            return Err(boot_err(EXIT_CONFIG, e.to_string()))
        }
        Err(e) => return Err(boot_err(EXIT_FATAL, e.to_string())),
    }
    match engine.boot_check_image().await {
        Ok(BootImageCheck::Ok) => {
            info!(image = %cfg.image, "agent image carries the v1 contract label")
        }
        Ok(BootImageCheck::UnlabeledAllowed) => {
            warn!(image = %cfg.image, "agent image has no contract label; accepted because WSRUNNER_ALLOW_UNLABELED_IMAGE=1")
        }
        Ok(BootImageCheck::Skipped { reason }) => {
            warn!(image = %cfg.image, "agent image not available, contract check skipped: {reason}")
        }
        Ok(BootImageCheck::NoDefaultImage) => {
            warn!("WSRUNNER_IMAGE is empty: coding runs without a per-run image will fail")
        }
        Err(e @ ContainerError::Cli { .. }) | Err(e @ ContainerError::Spawn { .. }) => {
            return Err(boot_err(EXIT_FATAL, e.to_string()))
        }
        Err(e) => return Err(boot_err(EXIT_CONFIG, e.to_string())),
    }

    // 3. The credential (spec 4.1 step 6, 4.2).
    let inputs = CredentialInputs {
        credential: cfg.credential.clone(),
        credential_file: cfg.credential_file.clone(),
        registration_token: cfg.registration_token.clone(),
        name: cfg.name.clone(),
    };
    let mut registered_instance = None;
    match obtain_credential(&client, &inputs).await {
        Ok(got) => {
            for w in &got.warnings {
                warn!("{w}");
            }
            match got.source {
                CredentialSource::Registered {
                    instance_id,
                    pool_id,
                    persisted,
                } => {
                    registered_instance = Some(instance_id);
                    info!("registered as instance {instance_id} in pool {pool_id}");
                    if persisted {
                        info!(file = %cfg.credential_file.display(), "credential saved; the registration token is no longer needed");
                    }
                }
                CredentialSource::Env => info!("using the credential from WSRUNNER_CREDENTIAL"),
                CredentialSource::File => {
                    info!(file = %cfg.credential_file.display(), "using the stored credential")
                }
            }
        }
        Err(e) => {
            let code = match e {
                CredentialError::Unreachable { .. } | CredentialError::Server(_) => EXIT_FATAL,
                _ => EXIT_CONFIG,
            };
            return Err(boot_err(code, e.to_string()));
        }
    }

    // 4. The journal, seen through this server's and instance's identity (run ids are unique
    // per server only; docs/journal.md, "Identity").
    let journal_dir = cfg.journal_dir.clone();
    let identity = client
        .with_credential(|c| JournalIdentity::new(client.base_url(), c, registered_instance))
        .ok_or_else(|| boot_err(EXIT_FATAL, "no runner credential installed"))?;
    let max_bytes = cfg.journal_max_bytes;
    let journal = tokio::task::spawn_blocking(move || {
        let journal = SledJournal::open(&journal_dir)?.scoped(&identity)?;
        journal.set_size_budget(max_bytes);
        Ok::<_, crate::journal::JournalError>(journal)
    })
    .await
    .map_err(|e| boot_err(EXIT_FATAL, format!("journal open task failed: {e}")))?
    .map_err(|e| boot_err(EXIT_FATAL, e.to_string()))?;
    let containers_dir = cfg.cache_root.join(".containers");
    crate::effects::session::create_private_dir(&containers_dir).map_err(|e| {
        boot_err(
            EXIT_FATAL,
            format!(
                "cannot create {}: {e} (check WSRUNNER_CACHE_ROOT)",
                containers_dir.display()
            ),
        )
    })?;
    let git_policy = TransportPolicy {
        allow_insecure_http: cfg.allow_insecure,
        ..TransportPolicy::default()
    };
    let events = EventSender::new(client.clone(), EventSenderConfig::default());
    // 5. A pause persisted by `ctl pause` holds across restarts (read before any claim).
    let pause = ctl::Pause::load(&cfg.ctl_dir).map_err(|e| boot_err(EXIT_FATAL, e))?;
    if pause.is_paused() {
        warn!(ctl_dir = %cfg.ctl_dir.display(), "paused (persisted): no claims until `windshift-runner ctl resume`");
    }
    opts.metrics.set_paused(pause.is_paused());
    Ok(Arc::new(Ctx {
        cfg,
        control: Arc::new(client.clone()),
        git: Arc::new(SystemGit),
        clock: Arc::new(SystemClock),
        client,
        events,
        journal: Arc::new(journal),
        engine: Arc::new(engine),
        metrics: opts.metrics.clone(),
        shutdown: opts.shutdown.clone(),
        grace: opts.grace,
        report_retry_pause: opts.report_retry_pause,
        git_policy,
        heartbeat,
        containers_dir,
        pause,
    }))
}
