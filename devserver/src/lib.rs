//! windshift-devserver: a local stand-in for the Windshift control plane (runner protocol,
//! git proxy, admin API), used by the runner's demo and tests and by anyone trying the runner
//! without a Windshift server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), windshift_devserver::StartError> {
//! use windshift_devserver::{DevServer, DevServerConfig};
//! let server = DevServer::start(DevServerConfig::new("/tmp/devserver-data")).await?;
//! println!("WS_API_URL={}", server.api_url());
//! let pool = server.core().create_pool(&Default::default()).expect("pool");
//! server.stop().await;
//! # Ok(()) }
//! ```

pub mod core;
pub mod gitproxy;
pub mod http;
pub mod types;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

pub use crate::core::{ApiError, Core};

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}
impl std::error::Error for ApiError {}

/// Certificate and key (PEM files) for serving https.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything the devserver can be told. [`DevServerConfig::new`] gives upstream's values.
#[derive(Debug, Clone)]
pub struct DevServerConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// sled database and bare repositories live here (state survives restarts).
    pub data_dir: PathBuf,
    /// The `WS_API_URL` put into job env; default: this server's own `/api` URL.
    pub public_api_url: Option<String>,
    pub tls: Option<TlsFiles>,
    /// Heartbeat window for liveness, round-robin and the reaper (upstream: 90 s).
    pub liveness_window: Duration,
    /// How often the reaper sweeps (upstream: 60 s).
    pub reaper_interval: Duration,
    /// Duration backstop for running runs (upstream: 8 h).
    pub max_run_duration: Duration,
    /// When a queued run gets its one-time stall warning (upstream: 3 min).
    pub queued_stall_after: Duration,
    /// Per-instance limit on authenticated calls (upstream: 20/s, burst 100).
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    /// Limit on register calls (upstream: 5 per minute, burst 10, per IP).
    pub register_rate_per_min: f64,
    pub register_burst: f64,
    /// Default lifetime of a registration token.
    pub registration_token_ttl: Duration,
    /// Put `LLM_BASE_URL`/`LLM_API_KEY` into job env, as a binding with an LLM grant does.
    pub llm_proxy: bool,
    /// git binary used for `http-backend` and repo import.
    pub git_bin: String,
}

impl DevServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            public_api_url: None,
            tls: None,
            liveness_window: Duration::from_secs(90),
            reaper_interval: Duration::from_secs(60),
            max_run_duration: Duration::from_secs(8 * 3600),
            queued_stall_after: Duration::from_secs(180),
            rate_per_sec: 20.0,
            rate_burst: 100.0,
            register_rate_per_min: 5.0,
            register_burst: 10.0,
            registration_token_ttl: Duration::from_secs(24 * 3600),
            llm_proxy: false,
            git_bin: "git".into(),
        }
    }
}

/// Why the devserver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("{0}")]
    State(String),
}

/// The devserver entry point.
pub struct DevServer;

/// A running devserver: its address, its core (for in-process admin calls) and a stop handle.
pub struct RunningDevServer {
    addr: SocketAddr,
    scheme: &'static str,
    core: Arc<Core>,
    tasks: JoinSet<()>,
    stop_tx: tokio::sync::watch::Sender<bool>,
}

impl DevServer {
    pub async fn start(cfg: DevServerConfig) -> Result<RunningDevServer, StartError> {
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| StartError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let tls = match &cfg.tls {
            Some(files) => Some(tls_acceptor(files)?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let public = cfg
            .public_api_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}/api"));
        let core = Arc::new(Core::open(cfg, public).map_err(StartError::State)?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, tls, core.clone(), stop_rx.clone()));
        tasks.spawn(reaper_loop(core.clone(), stop_rx));
        Ok(RunningDevServer {
            addr,
            scheme,
            core,
            tasks,
            stop_tx,
        })
    }
}

impl RunningDevServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The runner's `WS_API_URL` for this server (`…/api`).
    pub fn api_url(&self) -> String {
        format!("{}://{}/api", self.scheme, self.addr)
    }
    /// Base of the admin HTTP API (`…/admin`).
    pub fn admin_url(&self) -> String {
        format!("{}://{}/admin", self.scheme, self.addr)
    }
    /// In-process admin access: pools, tokens, repos, runs, faults, reaper.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }
    /// Stops listening, closes every connection, flushes the state and releases the database
    /// (a new devserver can open the same data directory afterwards).
    pub async fn stop(mut self) {
        let _ = self.stop_tx.send(true);
        while self.tasks.join_next().await.is_some() {}
        self.core.flush();
        // Wait until every connection task has dropped its handle, so sled is closed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&self.core) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| StartError::Tls(format!("cannot read {}: {e}", files.cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            StartError::Tls(format!("bad certificate in {}: {e}", files.cert.display()))
        })?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| StartError::Tls(format!("cannot read key {}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    core: Arc<Core>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let router = http::router(core.clone());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let router = router.clone();
                let tls = tls.clone();
                conns.spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                serve_conn(TokioIo::new(s), router).await;
                            }
                        }
                        None => serve_conn(TokioIo::new(stream), router).await,
                    }
                });
            }
        }
    }
    conns.shutdown().await;
    drop(router);
    drop(core);
}

/// The connection was closed on purpose (fault injection), not answered.
#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}
impl std::error::Error for Dropped {}

async fn serve_conn<I>(io: TokioIo<I>, router: axum::Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        async move {
            let resp = router
                .oneshot(req.map(Body::new))
                .await
                .unwrap_or_else(|never| match never {});
            if resp.extensions().get::<http::DropConnection>().is_some() {
                return Err(Dropped);
            }
            Ok(resp)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

async fn reaper_loop(core: Arc<Core>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(core.cfg.reaper_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                match core.reap() {
                    Ok(ids) if !ids.is_empty() => tracing::warn!(?ids, "reaper failed stale runs"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "reaper sweep failed"),
                }
            }
        }
    }
}
