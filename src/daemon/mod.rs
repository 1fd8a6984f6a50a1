//! The runner daemon (`windshift-runner run`): start-up in spec 4.1's order, journal recovery
//! before the first claim, then the claim loop, the heartbeat loop and one task per run, with
//! one shutdown path (drain on the first signal, cancel on the second).
//!
//! Exit codes: 0 clean stop, 1 fatal runtime error, 77 credential rejected at runtime
//! ([`crate::control::EXIT_CREDENTIAL_REJECTED`]), 78 configuration error
//! ([`crate::control::EXIT_CONFIG`]).

pub mod ctl;
mod failpoint;
pub mod http;
mod recovery;
mod run_task;
pub mod systemd;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn, Instrument};

use crate::config::ValidConfig;
use crate::control::client::{Client, ClientConfig, ControlError, Preflight};
use crate::control::credential::{
    obtain_credential, CredentialError, CredentialInputs, CredentialSource,
};
use crate::control::events::{EventSender, EventSenderConfig};
use crate::control::{EXIT_CONFIG, EXIT_CREDENTIAL_REJECTED};
use crate::effects::container::{
    sanitize_name_part, BootImageCheck, ContainerError, Engine, NetworkStatus,
};
use crate::effects::git::TransportPolicy;
use crate::fsm::{Event, RunPlan};
use crate::journal::{commit_event_async, now_ms, Journal, SledJournal};
use crate::metrics::{Health, Metrics};
use run_task::{RunTask, Start, StopRequest};
use systemd::Notifier;

/// How long an in-flight claim may still take once a shutdown was asked for.
const SHUTDOWN_CLAIM_GRACE: Duration = Duration::from_secs(5);

/// Exit code for a fatal runtime error (journal, Docker, server unreachable at registration).
pub const EXIT_FATAL: i32 = 1;

/// Shutdown requests: the first asks to drain, the second to cancel at once.
#[derive(Clone)]
pub struct Shutdown {
    level: Arc<watch::Sender<u8>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            level: Arc::new(watch::channel(0).0),
        }
    }
}

impl Shutdown {
    /// One more request: 1 = drain, 2 = cancel now.
    pub fn request(&self) {
        self.level.send_modify(|l| *l = (*l + 1).min(2));
    }

    pub fn level(&self) -> u8 {
        *self.level.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u8> {
        self.level.subscribe()
    }

    /// SIGTERM and SIGINT each count as one request.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                this.request();
                match this.level() {
                    1 => info!("signal received: draining (no new claims; a second signal cancels in-flight runs)"),
                    _ => warn!("second signal: cancelling in-flight runs now"),
                }
            }
        });
        Ok(())
    }
}

/// How the daemon runs beyond its configuration.
pub struct DaemonOptions {
    /// Take one run, finish it, exit 0 (ephemeral hosts).
    pub once: bool,
    pub notifier: Notifier,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    /// Abort-to-kill grace of the JSONL handshake (spec 6.4: 10 s).
    pub grace: Duration,
    /// Pause between report attempts once the client's own retry budget is spent.
    pub report_retry_pause: Duration,
    /// Client tuning (retry budgets); `None` uses the documented defaults.
    pub client: Option<ClientConfig>,
}

impl DaemonOptions {
    pub fn new(shutdown: Shutdown) -> Self {
        DaemonOptions {
            once: false,
            notifier: Notifier::from_env(),
            shutdown,
            metrics: Arc::new(Metrics::default()),
            grace: crate::effects::agent_driver::DEFAULT_GRACE,
            report_retry_pause: Duration::from_secs(30),
            client: None,
        }
    }
}

/// What every run task shares.
pub(crate) struct Ctx {
    pub cfg: ValidConfig,
    pub client: Client,
    pub events: EventSender,
    pub journal: Arc<dyn Journal>,
    pub engine: Engine,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub grace: Duration,
    pub report_retry_pause: Duration,
    pub git_policy: TransportPolicy,
    /// Private (0700) per-container files: env file while creating, stdin FIFO, progress.
    pub containers_dir: PathBuf,
    /// `ctl pause|resume` (persisted in the control directory).
    pub pause: ctl::Pause,
}

impl Ctx {
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.level() > 0
    }
}

/// A short label for a control-plane error, for metrics.
pub(crate) fn outcome_label(e: &ControlError) -> String {
    match e {
        ControlError::CredentialRejected(s) => format!("http_{}", s.status),
        ControlError::Status(s) if s.status >= 500 => "http_5xx".into(),
        ControlError::Status(s) => format!("http_{}", s.status),
        ControlError::Transport { .. } => "network".into(),
        _ => "error".into(),
    }
}

/// A start-up failure: the exit code and what to tell the operator.
struct BootError {
    code: i32,
    message: String,
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

/// Runs the daemon to its end and returns the process exit code.
pub async fn run(cfg: ValidConfig, opts: DaemonOptions) -> i32 {
    let notifier = opts.notifier.clone();
    let _ = notifier.status("starting");
    match boot(cfg, &opts).await {
        Err(e) => {
            error!("{}", e.message);
            let _ = notifier.status(&format!("failed to start: {}", e.message));
            e.code
        }
        Ok(ctx) => serve(ctx, opts).await,
    }
}

async fn boot(cfg: ValidConfig, opts: &DaemonOptions) -> Result<Arc<Ctx>, BootError> {
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
    // A failing heartbeat is tried again at least every heartbeat interval (at most 10 s
    // apart), so liveness returns within seconds of the server's return.
    let beat_gap = heartbeat_retry_gap(cfg.heartbeat_interval);
    client_cfg.heartbeat_retry.max_interval = client_cfg.heartbeat_retry.max_interval.min(beat_gap);
    client_cfg.heartbeat_retry.initial = client_cfg.heartbeat_retry.initial.min(beat_gap);
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

    // 4. The journal.
    let journal_dir = cfg.journal_dir.clone();
    let journal = tokio::task::spawn_blocking(move || SledJournal::open(&journal_dir))
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
        client,
        events,
        journal: Arc::new(journal),
        engine,
        metrics: opts.metrics.clone(),
        shutdown: opts.shutdown.clone(),
        grace: opts.grace,
        report_retry_pause: opts.report_retry_pause,
        git_policy,
        containers_dir,
        pause,
    }))
}

/// Live run tasks: their stop channels, by run id.
type Runs = Arc<Mutex<HashMap<i64, mpsc::UnboundedSender<StopRequest>>>>;

struct Supervisor {
    ctx: Arc<Ctx>,
    runs: Runs,
    tasks: JoinSet<()>,
    slots: Arc<Semaphore>,
    /// Unix ms of the last successful call to the server (claim or heartbeat).
    last_contact: Arc<AtomicI64>,
    /// Unix ms of the heartbeat loop's last turn (the watchdog's liveness signal).
    heartbeat_tick: Arc<AtomicI64>,
    /// Unix ms until which the runner deliberately stays silent (0: not yielding).
    yielding_until: Arc<AtomicI64>,
    /// A claim's answer may have been lost: yield the lease once no run is in flight.
    yield_pending: bool,
}

impl Supervisor {
    fn spawn_run(
        &mut self,
        first: crate::journal::Record,
        last: crate::journal::Record,
        secrets: crate::fsm::RunSecrets,
        start: Start,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let run_id = last.run_id;
        let (tx, rx) = mpsc::unbounded_channel();
        self.runs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(run_id, tx);
        let task = RunTask::new(self.ctx.clone(), &first, last, secrets, rx);
        let span = task.span();
        let runs = self.runs.clone();
        let metrics = self.ctx.metrics.clone();
        metrics.run_started();
        self.tasks.spawn(
            async move {
                let status = task.drive(start).await;
                runs.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&run_id);
                metrics.run_finished(status.as_deref().unwrap_or("interrupted"));
                drop(permit);
            }
            .instrument(span),
        );
    }

    fn in_flight(&self) -> usize {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn stop_all(&self, stop: StopRequest) {
        for tx in self.runs.lock().unwrap_or_else(|e| e.into_inner()).values() {
            let _ = tx.send(stop);
        }
    }

    /// Journals a freshly claimed job and starts its task.
    async fn start_claimed(
        &mut self,
        job: crate::control::wire::JobSpec,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let instance = self.ctx.engine.cfg.instance.clone();
        let (mut plan, secrets) = RunPlan::from_job(&job, &instance);
        plan.apply_host_defaults(&crate::fsm::plan::HostDefaults {
            llm_model: self.ctx.cfg.llm_model.clone(),
        });
        // Every secret-shaped value is masked wherever it could be printed, not only the run
        // token (as recovery does; the run task forgets them when the run ends).
        for secret in secrets.env.values() {
            crate::redact::register_secret(secret);
        }
        if plan.prompt.trim().is_empty() {
            plan.prompt = self.ctx.cfg.initial_prompt.clone();
        }
        let run_id = plan.run_id;
        info!(run_id, kind = %plan.kind, repos = plan.repos.len(), "claimed a run");
        let committed = commit_event_async(
            self.ctx.journal.clone(),
            None,
            Event::Claimed { plan },
            now_ms(),
            Some(secrets.clone()),
        )
        .await;
        match committed {
            Ok(c) => {
                let Some(record) = c.record else { return };
                failpoint::crash_failpoint(&record);
                self.spawn_run(
                    record.clone(),
                    record,
                    secrets,
                    Start::Effects(c.effects),
                    Some(permit),
                );
            }
            Err(e) => {
                // Without a journal record the run cannot be carried safely: say so to the
                // server rather than let it wait for the reaper.
                self.ctx.metrics.journal_error();
                error!(run_id, "cannot journal the claimed run: {e}");
                let report = crate::control::wire::ReportRequest {
                    status: crate::control::wire::STATUS_FAILED.into(),
                    error: format!("runner journal unavailable: {e}"),
                    ..Default::default()
                };
                let _ = self.ctx.client.report(run_id, &report).await;
            }
        }
    }
}

async fn serve(ctx: Arc<Ctx>, opts: DaemonOptions) -> i32 {
    let notifier = opts.notifier.clone();
    let mut sup = Supervisor {
        ctx: ctx.clone(),
        runs: Arc::new(Mutex::new(HashMap::new())),
        tasks: JoinSet::new(),
        slots: Arc::new(Semaphore::new(ctx.cfg.concurrency)),
        last_contact: Arc::new(AtomicI64::new(now_ms())),
        heartbeat_tick: Arc::new(AtomicI64::new(now_ms())),
        yielding_until: Arc::new(AtomicI64::new(0)),
        yield_pending: false,
    };

    ctx.metrics.set_slots(ctx.cfg.concurrency);
    ctx.metrics
        .watch_filesystem("cache", ctx.cfg.cache_root.clone());
    ctx.metrics
        .watch_filesystem("journal", ctx.cfg.journal_dir.clone());
    let (ctl_listener, _ctl_socket) = match ctl::bind(&ctx.cfg.ctl_dir) {
        Ok(bound) => bound,
        Err(e) => {
            error!("{e}");
            return EXIT_FATAL;
        }
    };
    let ctl_server = ctl::serve(ctl_listener, ctx.clone(), sup.runs.clone());

    if let Some(addr) = ctx.cfg.metrics_addr {
        match http::serve(addr, ctx.metrics.clone()).await {
            Ok(bound) => info!(addr = %bound, "serving /metrics and /healthz"),
            Err(e) => warn!(%addr, "cannot serve metrics: {e}"),
        }
    }

    // Recovery before the first claim, then the sweep.
    let recovered = match recovery::recover_runs(&ctx).await {
        Ok(r) => r,
        Err(e) => {
            error!("journal recovery failed: {e}");
            return EXIT_FATAL;
        }
    };
    recovery::sweep(&ctx, &recovered.owned_containers, &recovered.owned_runs).await;
    match ctx.journal.unresolved_claim() {
        Ok(Some(since)) => {
            warn!(
                since_ms = since,
                "the previous process stopped before a claim's answer was journaled; the server may hold a run for this instance that the journal does not know"
            );
            sup.yield_pending = true;
        }
        Ok(None) => {}
        Err(e) => warn!("cannot read the unresolved-claim mark: {e}"),
    }
    let resumed = recovered.resume.len();
    for r in recovered.resume {
        // A slot if one is free; recovered runs beyond the concurrency still run.
        let permit = sup.slots.clone().try_acquire_owned().ok();
        sup.spawn_run(r.first, r.last, r.secrets, r.start, permit);
    }
    info!(resumed, "worker started");
    ctx.metrics.set_health(Health::Healthy);
    let _ = notifier.ready(&format!("ready; {resumed} run(s) resumed from the journal"));

    let (hb_stop_tx, hb_stop_rx) = watch::channel(false);
    let heartbeat = tokio::spawn(heartbeat_loop(
        ctx.clone(),
        sup.runs.clone(),
        sup.last_contact.clone(),
        sup.heartbeat_tick.clone(),
        sup.yielding_until.clone(),
        hb_stop_rx.clone(),
    ));
    let watchdog = tokio::spawn(watchdog_loop(
        ctx.clone(),
        notifier.clone(),
        sup.last_contact.clone(),
        sup.heartbeat_tick.clone(),
        sup.yielding_until.clone(),
        hb_stop_rx,
    ));

    claim_loop(&mut sup, opts.once).await;

    // Drain: no new claims; in-flight runs get the drain timeout, then are cancelled.
    let mut shutdown = ctx.shutdown.subscribe();
    if sup.in_flight() > 0 && ctx.shutting_down() {
        let _ = notifier.stopping(
            ctx.cfg.drain_timeout + Duration::from_secs(120),
            &format!("draining {} run(s)", sup.in_flight()),
        );
        info!(in_flight = sup.in_flight(), drain_timeout = ?ctx.cfg.drain_timeout, "draining in-flight runs");
        let deadline = tokio::time::sleep(ctx.cfg.drain_timeout);
        tokio::pin!(deadline);
        let mut cancelled = ctx.shutdown.level() >= 2;
        if cancelled {
            sup.stop_all(StopRequest::CancelNow);
        }
        loop {
            tokio::select! {
                joined = sup.tasks.join_next() => if joined.is_none() { break },
                _ = &mut deadline, if !cancelled => {
                    warn!("drain deadline passed; cancelling in-flight runs");
                    sup.stop_all(StopRequest::CancelNow);
                    cancelled = true;
                }
                _ = shutdown.changed(), if !cancelled => {
                    if ctx.shutdown.level() >= 2 {
                        sup.stop_all(StopRequest::CancelNow);
                        cancelled = true;
                    }
                }
            }
        }
    } else {
        if ctx.shutting_down() {
            let _ = notifier.stopping(Duration::from_secs(60), "stopping");
        }
        while sup.tasks.join_next().await.is_some() {}
    }
    let _ = hb_stop_tx.send(true);
    let _ = heartbeat.await;
    let _ = watchdog.await;
    ctl_server.abort();
    // Awaited so the task (and the journal it holds through `ctx`) is gone on return: a
    // caller may open the journal right after (the demo prints the run's timeline).
    let _ = ctl_server.await;

    if ctx.client.auth_state().is_rejected() {
        error!(
            "exiting: the runner credential was rejected ({}); register again with a new WSRUNNER_REGISTRATION_TOKEN (remove the stored credential file)",
            ctx.client.auth_state().rejection().unwrap_or_default()
        );
        return EXIT_CREDENTIAL_REJECTED;
    }
    info!("shut down");
    0
}

async fn claim_loop(sup: &mut Supervisor, once: bool) {
    let ctx = sup.ctx.clone();
    let mut shutdown = ctx.shutdown.subscribe();
    let mut errors = backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(ctx.cfg.poll_interval)
        .with_max_interval(Duration::from_secs(300).max(ctx.cfg.poll_interval))
        .with_randomization_factor(0.5)
        .with_multiplier(2.0)
        .with_max_elapsed_time(None)
        .build();
    // Idle-cache eviction runs between claims while no run is in flight (so it never races
    // a prepare): the first idle moment after start-up, then every EVICTION_EVERY.
    let mut last_eviction: Option<tokio::time::Instant> = None;
    loop {
        // Reap finished tasks so the set does not grow.
        while let Some(joined) = sup.tasks.try_join_next() {
            if let Err(e) = joined {
                error!("a run task failed: {e}");
            }
        }
        if ctx.shutting_down() || ctx.client.auth_state().is_rejected() {
            return;
        }
        if sup.yield_pending {
            if !yield_lease(sup, &mut shutdown).await {
                return;
            }
            continue;
        }
        if sup.in_flight() == 0 && last_eviction.is_none_or(|t| t.elapsed() >= EVICTION_EVERY) {
            last_eviction = Some(tokio::time::Instant::now());
            evict_idle_caches(&ctx).await;
        }
        let permit = tokio::select! {
            p = sup.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => continue,
        };
        // `ctl pause`: no claim until resumed (runs in flight, heartbeats and drain go on).
        // The gate is held until a claimed run is started, so a pause waits for it.
        let gate = ctx.pause.claim_gate.clone().lock_owned().await;
        if ctx.pause.is_paused() {
            drop((gate, permit));
            ctx.pause.wait_resumed(&mut shutdown).await;
            continue;
        }
        // Persist-then-send for the claim too: a claim is not idempotent, so the journal
        // notes it is in flight before it leaves and forgets it only once the answer (and
        // the run it carries) is journaled.
        if let Err(e) = set_unresolved_claim(&ctx, Some(now_ms())).await {
            drop((gate, permit));
            let wait = errors.next_backoff().unwrap_or(ctx.cfg.poll_interval);
            error!(retry_in = ?wait, "not claiming: the journal cannot record the claim: {e}");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let lost_before = lost_claim_answers(&ctx);
        // A claim retrying against an unreachable server must not hold up a shutdown for
        // its whole retry budget; one that is merely slow gets a few seconds to answer, so
        // a run the server already handed us is not dropped.
        let claim = ctx.client.claim();
        tokio::pin!(claim);
        let claimed = tokio::select! {
            r = &mut claim => r,
            _ = shutdown.changed() => {
                match tokio::time::timeout(SHUTDOWN_CLAIM_GRACE, &mut claim).await {
                    Ok(r) => r,
                    Err(_) => {
                        // The mark stays: the next start yields the lease.
                        warn!("shutting down: abandoned a claim the server has not answered");
                        return;
                    }
                }
            }
        };
        // A run id that is not positive names no run: it can be neither journaled nor
        // reported, so the answer is refused and treated like a lost one (yield the lease,
        // so the server's reaper fails whatever run it handed out).
        let bad_id = match &claimed {
            Ok(Some(job)) if job.run_id <= 0 => Some(job.run_id),
            _ => None,
        };
        let got_job = matches!(claimed, Ok(Some(_))) && bad_id.is_none();
        if got_job {
            failpoint::crash_failpoint_at("claim-answered");
        }
        let lost = lost_claim_answers(&ctx) > lost_before;
        if lost {
            warn!(
                "a claim's answer was lost after the request reached the server; the server may hold a run for this instance that the runner never saw"
            );
            sup.yield_pending = true;
        }
        let wait = match claimed {
            Ok(Some(_)) if bad_id.is_some() => {
                drop(permit);
                sup.last_contact.store(now_ms(), Ordering::Relaxed);
                ctx.metrics.request("claim", "refused");
                sup.yield_pending = true;
                error!(
                    run_id = bad_id.unwrap_or_default(),
                    "refused the claimed job: its run_id is not a positive number, so it can be neither journaled nor reported; the job is not run (the server's reaper fails it once the lease is yielded)"
                );
                Duration::ZERO
            }
            Ok(Some(job)) => {
                sup.last_contact.store(now_ms(), Ordering::Relaxed);
                ctx.metrics.request("claim", "ok");
                errors.reset();
                sup.start_claimed(job, permit).await;
                Duration::ZERO
            }
            Ok(None) => {
                sup.last_contact.store(now_ms(), Ordering::Relaxed);
                ctx.metrics.request("claim", "no_work");
                errors.reset();
                drop(permit);
                ctx.cfg.poll_interval
            }
            Err(e) => {
                drop(permit);
                ctx.metrics.request("claim", &outcome_label(&e));
                if let ControlError::CredentialRejected(_) = e {
                    ctx.metrics.set_credential_rejected(true);
                    // Answered (401/403): nothing was handed out.
                    if !lost {
                        let _ = set_unresolved_claim(&ctx, None).await;
                    }
                    error!("claim: {e}; no further claims");
                    ctx.metrics
                        .set_health(Health::Unhealthy(format!("credential rejected: {e}")));
                    return;
                }
                let wait = errors.next_backoff().unwrap_or(ctx.cfg.poll_interval);
                warn!(retry_in = ?wait, "claim failed: {e}");
                wait
            }
        };
        // A refused claim keeps its mark too, so a restart before the yield still yields.
        if !lost && bad_id.is_none() {
            if let Err(e) = set_unresolved_claim(&ctx, None).await {
                warn!("cannot clear the unresolved-claim mark: {e}");
            }
        }
        drop(gate);
        if got_job {
            if once {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Claim answers the client lost after the request left, so far (F6).
fn lost_claim_answers(ctx: &Ctx) -> u64 {
    ctx.client
        .counters()
        .lost_claim_answers
        .load(Ordering::Relaxed)
}

/// Sets or clears the journal's unresolved-claim mark off the async workers (it flushes).
async fn set_unresolved_claim(ctx: &Ctx, since_ms: Option<i64>) -> Result<(), String> {
    let journal = ctx.journal.clone();
    let done = tokio::task::spawn_blocking(move || journal.set_unresolved_claim(since_ms))
        .await
        .map_err(|e| format!("journal task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    if done.is_err() {
        ctx.metrics.journal_error();
    }
    done
}

/// Yields the lease after a claim whose answer was lost (docs/daemon.md): once no run is in
/// flight, the runner neither claims nor heartbeats for `WSRUNNER_LEASE_YIELD`, so the
/// server's reaper fails any run it handed this instance that the runner never saw, instead
/// of leaving it `running` until the 8 h backstop. Runs in flight finish first (they would
/// be reaped too). Returns false when a shutdown came first (the mark stays for next start).
async fn yield_lease(sup: &mut Supervisor, shutdown: &mut watch::Receiver<u8>) -> bool {
    let ctx = sup.ctx.clone();
    if ctx.cfg.lease_yield.is_zero() {
        warn!("WSRUNNER_LEASE_YIELD=0: not pausing; a run the server handed out unseen stays running until the server's backstop");
    } else {
        // Runs in flight keep their heartbeats until they end; no new claim meanwhile.
        while sup.in_flight() > 0 {
            tokio::select! {
                joined = sup.tasks.join_next() => {
                    if let Some(Err(e)) = joined {
                        error!("a run task failed: {e}");
                    }
                }
                _ = shutdown.changed() => {}
            }
            if ctx.shutting_down() {
                return false;
            }
        }
        let pause = ctx.cfg.lease_yield;
        warn!(
            pause = ?pause,
            "yielding the lease: no claims and no heartbeats, so the server reaps a run it may have handed out unseen"
        );
        sup.yielding_until
            .store(now_ms() + pause.as_millis() as i64, Ordering::Relaxed);
        let paused = tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = shutdown.changed() => false,
        };
        sup.yielding_until.store(0, Ordering::Relaxed);
        if !paused || ctx.shutting_down() {
            return false;
        }
        info!("lease yield over; claiming again");
    }
    if let Err(e) = set_unresolved_claim(&ctx, None).await {
        warn!("cannot clear the unresolved-claim mark: {e}");
    }
    sup.yield_pending = false;
    true
}

/// How often idle repository caches are checked against `WSRUNNER_CACHE_MAX_AGE`.
const EVICTION_EVERY: Duration = Duration::from_secs(600);

async fn evict_idle_caches(ctx: &Ctx) {
    let root = ctx.cfg.cache_root.clone();
    let max_age = ctx.cfg.cache_max_age;
    let report = tokio::task::spawn_blocking(move || {
        crate::effects::git::evict_idle(&root, max_age, std::time::SystemTime::now())
    })
    .await;
    match report {
        Ok(Ok(r)) if !r.removed.is_empty() => {
            info!(removed = r.removed.len(), "evicted idle repository caches")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!("cache eviction failed: {e}"),
        Err(e) => warn!("cache eviction task failed: {e}"),
    }
}

/// The longest pause between heartbeat attempts while they fail: the interval, at most 10 s.
fn heartbeat_retry_gap(interval: Duration) -> Duration {
    interval.min(Duration::from_secs(10))
}

async fn heartbeat_loop(
    ctx: Arc<Ctx>,
    runs: Runs,
    last_contact: Arc<AtomicI64>,
    tick: Arc<AtomicI64>,
    yielding_until: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) {
    let interval = ctx.cfg.heartbeat_interval;
    // Failures are logged when they start, then at most once a minute (a 1 s interval with
    // the server down must not flood the log), and once more when the server answers again.
    let quiet = Duration::from_secs(60).max(interval);
    let mut last_failure_log: Option<tokio::time::Instant> = None;
    let mut failures: u64 = 0;
    let mut last_depth: Option<i64> = None;
    loop {
        tick.store(now_ms(), Ordering::Relaxed);
        // After a failure the next beat comes sooner than a full interval, so the gap the
        // server sees after an outage stays short.
        let wait = if failures > 0 {
            heartbeat_retry_gap(interval)
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        tick.store(now_ms(), Ordering::Relaxed);
        if now_ms() < yielding_until.load(Ordering::Relaxed) {
            continue; // a deliberate silence (yield_lease)
        }
        // The stop signal also interrupts a heartbeat that is retrying an unreachable server.
        let beat = tokio::select! {
            r = ctx.client.heartbeat() => r,
            _ = stop.changed() => return,
        };
        match beat {
            Ok(hb) => {
                last_contact.store(now_ms(), Ordering::Relaxed);
                ctx.metrics.request("heartbeat", "ok");
                ctx.metrics.set_heartbeat_failures(0);
                ctx.metrics.set_queue_depth(hb.queue_depth);
                if failures > 0 {
                    info!(
                        failed_heartbeats = failures,
                        "heartbeat: the server answers again"
                    );
                    failures = 0;
                    last_failure_log = None;
                }
                let in_flight = runs.lock().unwrap_or_else(|e| e.into_inner()).len();
                if last_depth != Some(hb.queue_depth) {
                    info!(
                        queue_depth = hb.queue_depth,
                        in_flight, "queue depth changed"
                    );
                    last_depth = Some(hb.queue_depth);
                } else {
                    tracing::debug!(queue_depth = hb.queue_depth, in_flight, "heartbeat");
                }
                for run_id in hb.abort {
                    if let Some(tx) = runs.lock().unwrap_or_else(|e| e.into_inner()).get(&run_id) {
                        info!(run_id, "the server asked to cancel the run");
                        let _ = tx.send(StopRequest::Cancel);
                    }
                }
            }
            Err(e) => {
                ctx.metrics.request("heartbeat", &outcome_label(&e));
                failures += 1;
                ctx.metrics.set_heartbeat_failures(failures);
                if last_failure_log.is_none_or(|t| t.elapsed() >= quiet) {
                    last_failure_log = Some(tokio::time::Instant::now());
                    if let ControlError::CredentialRejected(_) = e {
                        error!(failed_heartbeats = failures, "heartbeat: {e}");
                    } else {
                        warn!(failed_heartbeats = failures, "heartbeat failed: {e}");
                    }
                }
            }
        }
    }
}

/// WATCHDOG=1 only while the heartbeat loop turns and the server was reached within two
/// heartbeat intervals; the health verdict follows the same facts.
async fn watchdog_loop(
    ctx: Arc<Ctx>,
    notifier: Notifier,
    last_contact: Arc<AtomicI64>,
    tick: Arc<AtomicI64>,
    yielding_until: Arc<AtomicI64>,
    mut stop: watch::Receiver<bool>,
) {
    // Checked at least once per heartbeat interval, so health turns within about two
    // intervals of the last contact, and twice per systemd watchdog period.
    let every = notifier
        .watchdog_timeout()
        .map(|t| t / 2)
        .unwrap_or(Duration::from_secs(5))
        .min(Duration::from_secs(5))
        .min(ctx.cfg.heartbeat_interval)
        .max(Duration::from_millis(100));
    let window = (ctx.cfg.heartbeat_interval * 2).as_millis() as i64;
    let mut seen_events = crate::control::events::EventCountsSnapshot::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let now = now_ms();
        let contact_age = now - last_contact.load(Ordering::Relaxed);
        let loop_age = now - tick.load(Ordering::Relaxed);
        ctx.metrics
            .set_credential_rejected(ctx.client.auth_state().is_rejected());
        let health = if ctx.client.auth_state().is_rejected() {
            Health::Unhealthy(format!(
                "credential rejected: {}",
                ctx.client.auth_state().rejection().unwrap_or_default()
            ))
        } else if loop_age > window + 5_000 {
            Health::Unhealthy("the heartbeat loop is stuck".into())
        } else if now < yielding_until.load(Ordering::Relaxed) {
            Health::Healthy // silent on purpose (yield_lease), not cut off
        } else if contact_age > window {
            Health::Unhealthy(format!(
                "the Windshift server has not been reached for {} s",
                contact_age / 1000
            ))
        } else {
            Health::Healthy
        };
        if health == Health::Healthy && notifier.watchdog_timeout().is_some() {
            let _ = notifier.watchdog_ping();
        }
        ctx.metrics.set_health(health);
        // The event sender keeps its own totals; export what changed since the last turn.
        let now_events = ctx.events.counters();
        ctx.metrics.events(
            now_events.sent - seen_events.sent,
            now_events.merged - seen_events.merged,
            (now_events.dropped_after_409 + now_events.rejected + now_events.failed)
                - (seen_events.dropped_after_409 + seen_events.rejected + seen_events.failed),
        );
        seen_events = now_events;
    }
}
