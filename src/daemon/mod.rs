//! The runner daemon (`windshift-runner run`): start-up in spec 4.1's order (`boot.rs`),
//! journal recovery before the first claim (`recovery.rs`), then the claim loop
//! (`claiming.rs`), the heartbeat loop and watchdog (`liveness.rs`) and one task per run
//! (`run_task/`), with one shutdown path (drain on the first signal, cancel on the second).
//!
//! Exit codes: 0 clean stop, 1 fatal runtime error, 77 credential rejected at runtime
//! ([`crate::control::EXIT_CREDENTIAL_REJECTED`]), 78 configuration error
//! ([`crate::control::EXIT_CONFIG`]).

mod boot;
mod claiming;
pub mod ctl;
mod failpoint;
pub mod http;
pub(crate) mod liveness;
mod recovery;
pub(crate) mod run_task;
pub mod systemd;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn, Instrument};

use crate::config::ValidConfig;
use crate::control::client::{Client, ClientConfig, ControlError};
use crate::control::events::EventSender;
use crate::control::plane::ControlPlane;
use crate::control::EXIT_CREDENTIAL_REJECTED;
use crate::effects::clock::Clock;
use crate::effects::engine::ContainerEngine;
use crate::effects::git::{GitOps, TransportPolicy};
use crate::journal::{now_ms, Journal};
use crate::metrics::{Health, Metrics};
pub use boot::instance_name;
use liveness::{HeartbeatPolicy, Liveness};
use run_task::{RunTask, Start, StopRequest};
use systemd::Notifier;

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
    /// The control plane as the loops use it (`client`, or a stand-in).
    pub control: Arc<dyn ControlPlane>,
    /// Git as the run loop uses it.
    pub git: Arc<dyn GitOps>,
    /// Wall-clock time and sleeps.
    pub clock: Arc<dyn Clock>,
    pub events: EventSender,
    pub journal: Arc<dyn Journal>,
    /// The container engine as runs use it (the real [`crate::effects::container::Engine`],
    /// or a stand-in).
    pub engine: Arc<dyn ContainerEngine>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    pub grace: Duration,
    pub report_retry_pause: Duration,
    pub git_policy: TransportPolicy,
    /// Every number of the heartbeat (interval, retry gap, health window).
    pub heartbeat: HeartbeatPolicy,
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

/// Runs the daemon to its end and returns the process exit code.
pub async fn run(cfg: ValidConfig, opts: DaemonOptions) -> i32 {
    let notifier = opts.notifier.clone();
    let _ = notifier.status("starting");
    match boot::boot(cfg, &opts).await {
        Err(e) => {
            error!("{}", e.message);
            let _ = notifier.status(&format!("failed to start: {}", e.message));
            e.code
        }
        Ok(ctx) => serve(ctx, opts).await,
    }
}

/// Live run tasks: their stop channels, by run id.
type Runs = Arc<Mutex<HashMap<i64, mpsc::UnboundedSender<StopRequest>>>>;

struct Supervisor {
    ctx: Arc<Ctx>,
    runs: Runs,
    tasks: JoinSet<()>,
    slots: Arc<Semaphore>,
    liveness: Arc<Liveness>,
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
}

async fn serve(ctx: Arc<Ctx>, opts: DaemonOptions) -> i32 {
    let notifier = opts.notifier.clone();
    let mut sup = Supervisor {
        ctx: ctx.clone(),
        runs: Arc::new(Mutex::new(HashMap::new())),
        tasks: JoinSet::new(),
        slots: Arc::new(Semaphore::new(ctx.cfg.concurrency)),
        liveness: Arc::new(Liveness::new(now_ms())),
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
    let heartbeat = tokio::spawn(liveness::heartbeat_loop(
        ctx.clone(),
        sup.runs.clone(),
        sup.liveness.clone(),
        hb_stop_rx.clone(),
    ));
    let watchdog = tokio::spawn(liveness::watchdog_loop(
        ctx.clone(),
        notifier.clone(),
        sup.liveness.clone(),
        hb_stop_rx,
    ));

    claiming::claim_loop(&mut sup, opts.once).await;

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

    if ctx.control.auth_state().is_rejected() {
        error!(
            "exiting: the runner credential was rejected ({}); register again with a new WSRUNNER_REGISTRATION_TOKEN (remove the stored credential file)",
            ctx.control.auth_state().rejection().unwrap_or_default()
        );
        return EXIT_CREDENTIAL_REJECTED;
    }
    info!("shut down");
    0
}
