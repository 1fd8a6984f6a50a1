//! The runner protocol client (spec section 2): `GET /version`, register, claim, events,
//! result, heartbeat, with the improvements of section 9:
//! - 429 and 5xx (and transport errors) are retried with exponential backoff on every call,
//!   `Retry-After` taking precedence, each within a configurable budget;
//! - every authenticated call is paced by one token bucket per instance (20/s, burst 100);
//! - a 401 (or 403 on claim/heartbeat) at runtime flips a shared [`AuthState`], so the daemon
//!   can stop claiming and exit with [`super::EXIT_CREDENTIAL_REJECTED`].
//!
//! TLS is rustls with the platform's roots; `SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured by
//! `rustls-native-certs` (when either is set it loads only from them), which the TLS contract
//! test checks with a CA generated in the test.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backoff::backoff::Backoff;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::ratelimit::{RateLimit, RateLimiter};
use super::wire::*;
use crate::redact::{redact, register_secret};

/// The hint that follows `WS_API_URL must be https://`.
pub const INSECURE_URL_HINT: &str =
    "use an HTTPS URL ending in /api, or set WSRUNNER_ALLOW_INSECURE=1 only for local development";

/// How much of an error body an error keeps (upstream's `HTTPStatusError` keeps 4 KiB).
const BODY_EXCERPT_BYTES: usize = 4096;

/// The largest claim answer read: it carries the run's prompt (persona, skills index), which
/// may run to a few MiB. Read incrementally; a longer body is refused, never buffered.
pub const MAX_CLAIM_BODY_BYTES: usize = 16 << 20;
/// The largest answer read from every other call (their bodies are a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A retry budget: exponential backoff from `initial` (doubling, capped at `max_interval`),
/// giving up once `max_elapsed` has passed. `max_elapsed = 0` means a single attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_interval: Duration,
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub const NONE: RetryPolicy = RetryPolicy {
        initial: Duration::ZERO,
        max_interval: Duration::ZERO,
        max_elapsed: Duration::ZERO,
    };

    pub fn new(initial: Duration, max_interval: Duration, max_elapsed: Duration) -> Self {
        Self {
            initial,
            max_interval,
            max_elapsed,
        }
    }

    pub(crate) fn backoff(&self) -> backoff::ExponentialBackoff {
        backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial.max(Duration::from_millis(1)))
            .with_max_interval(self.max_interval.max(self.initial))
            .with_multiplier(2.0)
            .with_randomization_factor(0.2)
            .with_max_elapsed_time(Some(self.max_elapsed))
            .build()
    }
}

/// Everything the client is told; [`ClientConfig::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `WS_API_URL`, including `/api`.
    pub api_url: String,
    /// `WSRUNNER_ALLOW_INSECURE=1`: permit `http://`.
    pub allow_insecure: bool,
    /// Per-request timeout for the control plane (upstream: 60 s).
    pub control_timeout: Duration,
    /// Per-request timeout for register (upstream: 30 s).
    pub register_timeout: Duration,
    /// Claim and events.
    pub retry: RetryPolicy,
    /// Heartbeat: a short maximum interval, so the first beat after an outage comes within
    /// seconds of the server's return instead of after a long backoff step (which could
    /// push the gap past the server's liveness window and get runs reaped).
    pub heartbeat_retry: RetryPolicy,
    /// The result: the verdict matters most, so its budget is longer (upstream: 2 min, 5xx
    /// only; we also retry 429).
    pub result_retry: RetryPolicy,
    /// Register (short: a token is single-use and a lost answer cannot be replayed).
    pub register_retry: RetryPolicy,
    /// Per-instance pacing of authenticated calls.
    pub rate: RateLimit,
    pub user_agent: String,
}

impl ClientConfig {
    pub fn new(api_url: impl Into<String>) -> Self {
        Self {
            api_url: api_url.into(),
            allow_insecure: false,
            control_timeout: Duration::from_secs(60),
            register_timeout: Duration::from_secs(30),
            retry: RetryPolicy::new(
                Duration::from_millis(500),
                Duration::from_secs(30),
                Duration::from_secs(120),
            ),
            heartbeat_retry: RetryPolicy::new(
                Duration::from_millis(500),
                Duration::from_secs(10),
                Duration::from_secs(120),
            ),
            result_retry: RetryPolicy::new(
                Duration::from_secs(1),
                Duration::from_secs(30),
                Duration::from_secs(600),
            ),
            register_retry: RetryPolicy::new(
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
            ),
            rate: RateLimit::UPSTREAM,
            user_agent: format!("windshift-runner/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A non-2xx answer: status, the parsed error body when there is one, and a redacted excerpt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusError {
    pub endpoint: &'static str,
    pub status: u16,
    pub body: Option<ErrorBody>,
    /// First 4 KiB of the body, redacted.
    pub excerpt: String,
    pub retry_after: Option<Duration>,
}

impl StatusError {
    /// The error of a non-2xx answer, from its status and raw body: the body is parsed as an
    /// [`ErrorBody`] when it is one (its text redacted) and kept as a redacted excerpt either
    /// way. Pure, so the fuzz target (`fuzzing::wire_json`) reaches the client's parsing path.
    pub fn from_response(
        endpoint: &'static str,
        status: u16,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> StatusError {
        let parsed = serde_json::from_slice::<ErrorBody>(body).ok().map(|mut b| {
            b.error = redact(&b.error).into_owned();
            b
        });
        StatusError {
            endpoint,
            status,
            body: parsed,
            excerpt: redact(&excerpt(body)).into_owned(),
            retry_after,
        }
    }

    fn message(&self) -> String {
        match &self.body {
            Some(b) if !b.error.is_empty() => {
                if b.code.is_empty() {
                    b.error.clone()
                } else {
                    format!("{} ({})", b.error, b.code)
                }
            }
            _ => self.excerpt.clone(),
        }
    }
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: HTTP {}: {}",
            self.endpoint,
            self.status,
            redact(&self.message())
        )
    }
}

/// Errors of the control-plane client. Every text is redacted.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("WS_API_URL must be https:// — {INSECURE_URL_HINT}")]
    InsecureUrl,
    #[error("WS_API_URL {url:?} is not usable: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// 401 on any authenticated call, or 403 on claim/heartbeat (pool unavailable): the
    /// credential no longer works. [`AuthState`] records it.
    #[error("{0} — the runner credential was rejected (revoked instance or disabled pool); register this runner again with a new registration token")]
    CredentialRejected(Box<StatusError>),
    #[error("{0}")]
    Status(Box<StatusError>),
    #[error("{endpoint}: cannot reach the Windshift server: {message}")]
    Transport {
        endpoint: &'static str,
        message: String,
    },
    #[error("{endpoint}: unexpected answer from the server: {message}")]
    Decode {
        endpoint: &'static str,
        message: String,
    },
    /// A success answer longer than the cap ([`MAX_CLAIM_BODY_BYTES`], [`MAX_BODY_BYTES`]);
    /// not retried (the same call would get the same answer).
    #[error("{endpoint}: the server answered with a body over {limit} bytes; refused unread (check that WS_API_URL points at the Windshift server)")]
    BodyTooLarge {
        endpoint: &'static str,
        limit: usize,
    },
    #[error("GET {url}: {detail}. WS_API_URL must be the Windshift API base including the /api suffix (for example https://windshift.example.com/api), not the bare host and not /rest/api/v1")]
    Preflight { url: String, detail: String },
    #[error("no runner credential is set: load or register one first")]
    NoCredential,
}

impl ControlError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ControlError::Status(s) | ControlError::CredentialRejected(s) => Some(s.status),
            _ => None,
        }
    }

    /// The parsed error body, when the server sent one.
    pub fn error_body(&self) -> Option<&ErrorBody> {
        match self {
            ControlError::Status(s) | ControlError::CredentialRejected(s) => s.body.as_ref(),
            _ => None,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            ControlError::Transport { .. } => true,
            ControlError::Status(s) => s.status == 429 || s.status >= 500,
            _ => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ControlError::Status(s) => s.retry_after,
            _ => None,
        }
    }
}

/// Shared flag: set when the server rejected the credential at runtime. The daemon watches
/// it to stop claiming, report unhealthy, and exit with [`super::EXIT_CREDENTIAL_REJECTED`]
/// once in-flight runs settle.
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    inner: Arc<AuthInner>,
}

#[derive(Debug, Default)]
struct AuthInner {
    rejected: AtomicBool,
    detail: Mutex<Option<String>>,
}

impl AuthState {
    pub fn is_rejected(&self) -> bool {
        self.inner.rejected.load(Ordering::SeqCst)
    }
    /// The (redacted) first rejection, for the log line and the health endpoint.
    pub fn rejection(&self) -> Option<String> {
        self.inner
            .detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    fn mark(&self, detail: String) {
        let mut d = self.inner.detail.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_none() {
            *d = Some(detail);
        }
        self.inner.rejected.store(true, Ordering::SeqCst);
    }
    /// A new credential was installed.
    fn reset(&self) {
        *self.inner.detail.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.inner.rejected.store(false, Ordering::SeqCst);
    }
}

/// A validated `WS_API_URL` plus the warnings boot should log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// Without a trailing slash.
    pub url: String,
    pub warnings: Vec<String>,
}

/// Checks `WS_API_URL` (spec 4.1, 2.2): https required unless insecure is allowed; a path
/// not ending in `/api` is only a warning.
pub fn validate_api_url(raw: &str, allow_insecure: bool) -> Result<ApiUrl, ControlError> {
    let trimmed = raw.trim();
    let shown = redact(trimmed).into_owned();
    if trimmed.is_empty() {
        return Err(ControlError::InvalidUrl {
            url: shown,
            reason: "it is empty; set it to the Windshift API base, e.g. https://windshift.example.com/api".into(),
        });
    }
    let lower = trimmed.to_ascii_lowercase();
    let mut warnings = Vec::new();
    if lower.starts_with("http://") {
        if !allow_insecure {
            return Err(ControlError::InsecureUrl);
        }
        warnings.push("WS_API_URL uses plain http:// (WSRUNNER_ALLOW_INSECURE=1): credentials travel unencrypted; use this only for local development".into());
    } else if !lower.starts_with("https://") {
        return Err(if allow_insecure {
            ControlError::InvalidUrl {
                url: shown,
                reason: "it must start with https:// (or http:// for local development)".into(),
            }
        } else {
            ControlError::InsecureUrl
        });
    }
    let parsed = reqwest::Url::parse(trimmed).map_err(|e| ControlError::InvalidUrl {
        url: shown.clone(),
        reason: e.to_string(),
    })?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ControlError::InvalidUrl {
            url: redact(&format!(
                "{}://{}",
                parsed.scheme(),
                parsed.host_str().unwrap_or("")
            ))
            .into_owned(),
            reason: "credentials in the URL are not supported; the runner authenticates with its credential".into(),
        });
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ControlError::InvalidUrl {
            url: shown,
            reason: "it must not have a query or fragment".into(),
        });
    }
    let url = trimmed.trim_end_matches('/').to_string();
    if !parsed.path().trim_end_matches('/').ends_with("/api") {
        warnings.push(format!(
            "WS_API_URL path {:?} does not end in /api: the runner protocol lives under the API base (for example https://windshift.example.com/api)",
            parsed.path()
        ));
    }
    Ok(ApiUrl { url, warnings })
}

/// Outcome of the boot preflight that boot may continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preflight {
    /// 200 with a non-empty version.
    Ok { version: String },
    /// Transport error: only a warning upstream; boot continues.
    Unreachable { message: String },
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct ClientCounters {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub throttled_429: AtomicU64,
    /// Claim attempts that may have reached the server but whose answer was lost (the
    /// connection failed after the request was sent, or a 200 body was unreadable): the
    /// server may have handed this instance a run it never learnt about.
    pub lost_claim_answers: AtomicU64,
}

/// The runner protocol client. Cheap to clone; clones share the credential, the pacing
/// bucket and the [`AuthState`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    base: String,
    http: reqwest::Client,
    register_http: reqwest::Client,
    credential: RwLock<Option<String>>,
    auth: AuthState,
    limiter: RateLimiter,
    counters: ClientCounters,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    None,
    /// The installed credential; 401 (and 403 where `forbidden_is_auth`) marks [`AuthState`].
    Runtime {
        forbidden_is_auth: bool,
    },
    /// A candidate credential being probed: rejections do not touch [`AuthState`].
    Probe,
}

impl Client {
    /// Validates the URL and builds the HTTP clients (rustls, platform roots + SSL_CERT_*).
    pub fn new(cfg: ClientConfig) -> Result<Self, ControlError> {
        let api = validate_api_url(&cfg.api_url, cfg.allow_insecure)?;
        let build = |timeout: Duration| {
            reqwest::Client::builder()
                .use_rustls_tls()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(30)))
                .user_agent(cfg.user_agent.clone())
                .build()
                .map_err(|e| ControlError::InvalidUrl {
                    url: api.url.clone(),
                    reason: format!("cannot set up the HTTP client: {e}"),
                })
        };
        let http = build(cfg.control_timeout)?;
        let register_http = build(cfg.register_timeout)?;
        Ok(Self {
            inner: Arc::new(Inner {
                limiter: RateLimiter::new(cfg.rate),
                base: api.url,
                cfg,
                http,
                register_http,
                credential: RwLock::new(None),
                auth: AuthState::default(),
                counters: ClientCounters::default(),
            }),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base
    }
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }
    pub fn auth_state(&self) -> AuthState {
        self.inner.auth.clone()
    }
    pub fn counters(&self) -> &ClientCounters {
        &self.inner.counters
    }

    /// Installs the credential used by every authenticated call (and registers it with the
    /// redaction layer).
    pub fn set_credential(&self, credential: &str) {
        let credential = credential.trim().to_string();
        register_secret(&credential);
        *self
            .inner
            .credential
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(credential);
        self.inner.auth.reset();
    }

    /// Runs `f` on the installed credential (the journal derives its identity's fingerprint
    /// from it); `None` when none is installed. The credential itself is never handed out.
    pub fn with_credential<R>(&self, f: impl FnOnce(&str) -> R) -> Option<R> {
        self.inner
            .credential
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            .map(f)
    }

    pub fn has_credential(&self) -> bool {
        self.inner
            .credential
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// `GET /version` (spec 2.2). A bad status or body is an error (fatal at boot, with the
    /// `/api` guidance); a transport error, a 5xx or a 429 is [`Preflight::Unreachable`].
    pub async fn preflight(&self) -> Result<Preflight, ControlError> {
        let url = format!("{}/version", self.inner.base);
        let resp = match self.inner.http.get(&url).send().await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Preflight::Unreachable {
                    message: redact(&error_chain(&e)).into_owned(),
                })
            }
        };
        let status = resp.status();
        let (bytes, over) = read_capped(resp, MAX_BODY_BYTES).await.unwrap_or_default();
        let fail = |detail: String| ControlError::Preflight {
            url: redact(&url).into_owned(),
            detail,
        };
        // 5xx and 429 say the server is there but busy or restarting: as transient as a
        // refused connection. Fatal here would exit 78, which the unit's
        // RestartPreventExitStatus keeps down for good (found by the chaos suite: a runner
        // restarted during an outage never came back).
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(Preflight::Unreachable {
                message: format!("{} answered HTTP {}", redact(&url), status.as_u16()),
            });
        }
        if status != StatusCode::OK {
            return Err(fail(format!("answered HTTP {}", status.as_u16())));
        }
        if over {
            return Err(fail(format!(
                "answered with a body over {MAX_BODY_BYTES} bytes"
            )));
        }
        match serde_json::from_slice::<VersionResponse>(&bytes) {
            Ok(v) if !v.version.trim().is_empty() => Ok(Preflight::Ok { version: v.version }),
            _ => Err(fail(
                "answered 200 without a JSON body holding a non-empty \"version\"".into(),
            )),
        }
    }

    /// `POST /runner/register` (spec 2.3). 401 means the token is invalid, expired or used.
    pub async fn register(
        &self,
        registration_token: &str,
        name: &str,
    ) -> Result<RegisterResponse, ControlError> {
        register_secret(registration_token.trim());
        let body = RegisterRequest {
            registration_token: registration_token.trim().to_string(),
            name: name.to_string(),
        };
        let resp: RegisterResponse = self
            .call(
                "register",
                Method::POST,
                "/runner/register",
                Some(json_bytes(&body)?),
                Auth::None,
                &self.inner.cfg.register_retry,
                true,
            )
            .await?;
        register_secret(&resp.credential);
        Ok(resp)
    }

    /// `POST /runner/claim` (spec 2.4): `Ok(None)` is "no work".
    pub async fn claim(&self) -> Result<Option<JobSpec>, ControlError> {
        let resp: ClaimResponse = self
            .call(
                "claim",
                Method::POST,
                "/runner/claim",
                None,
                Auth::Runtime {
                    forbidden_is_auth: true,
                },
                &self.inner.cfg.retry,
                false,
            )
            .await?;
        if let Some(job) = &resp.job {
            if let Some(t) = job.run_token() {
                register_secret(t);
            }
            if let Some(k) = job.env.get("LLM_API_KEY") {
                register_secret(k);
            }
        }
        Ok(resp.job)
    }

    /// `POST /runner/runs/{id}/events` (spec 2.5): one event.
    pub async fn send_event(&self, run_id: i64, event: &EventRequest) -> Result<(), ControlError> {
        let body = json_bytes(event)?;
        self.post_run(run_id, "events", body, &self.inner.cfg.retry)
            .await
    }

    /// `POST /runner/runs/{id}/result` (spec 2.6), retried within `result_retry`.
    pub async fn report(&self, run_id: i64, report: &ReportRequest) -> Result<(), ControlError> {
        let body = json_bytes(report)?;
        self.post_run(run_id, "result", body, &self.inner.cfg.result_retry)
            .await
    }

    /// A run-scoped call (`/runner/runs/{id}/<endpoint>`) answered by `{"ok": true}`; a 403
    /// there means "not your run", not a rejected credential (spec 2.10).
    async fn post_run(
        &self,
        run_id: i64,
        endpoint: &'static str,
        body: Vec<u8>,
        policy: &RetryPolicy,
    ) -> Result<(), ControlError> {
        let _: OkResponse = self
            .call(
                endpoint,
                Method::POST,
                &format!("/runner/runs/{run_id}/{endpoint}"),
                Some(body),
                Auth::Runtime {
                    forbidden_is_auth: false,
                },
                policy,
                false,
            )
            .await?;
        Ok(())
    }

    /// `POST /runner/heartbeat` (spec 2.7).
    pub async fn heartbeat(&self) -> Result<HeartbeatResponse, ControlError> {
        self.call(
            "heartbeat",
            Method::POST,
            "/runner/heartbeat",
            None,
            Auth::Runtime {
                forbidden_is_auth: true,
            },
            &self.inner.cfg.heartbeat_retry,
            false,
        )
        .await
    }

    /// One heartbeat with a candidate credential, no retry and no effect on [`AuthState`]
    /// (spec 4.2 probe).
    pub async fn probe_credential(
        &self,
        credential: &str,
    ) -> Result<HeartbeatResponse, ControlError> {
        register_secret(credential.trim());
        self.call_with(
            "heartbeat",
            Method::POST,
            "/runner/heartbeat",
            None,
            Auth::Probe,
            Some(credential.trim()),
            &RetryPolicy::NONE,
            false,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn call<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        auth: Auth,
        policy: &RetryPolicy,
        register: bool,
    ) -> Result<T, ControlError> {
        let cred = match auth {
            Auth::Runtime { .. } => Some(
                self.inner
                    .credential
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .ok_or(ControlError::NoCredential)?,
            ),
            _ => None,
        };
        self.call_with(
            endpoint,
            method,
            path,
            body,
            auth,
            cred.as_deref(),
            policy,
            register,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_with<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        auth: Auth,
        credential: Option<&str>,
        policy: &RetryPolicy,
        register: bool,
    ) -> Result<T, ControlError> {
        let mut backoff = policy.backoff();
        let started = Instant::now();
        loop {
            let result = self
                .attempt(
                    endpoint,
                    method.clone(),
                    path,
                    body.as_deref(),
                    auth,
                    credential,
                    register,
                )
                .await;
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !err.retryable() || policy.max_elapsed.is_zero() {
                return Err(err);
            }
            // The backoff crate computes the delay and enforces the budget; a server's
            // Retry-After wins over the computed delay.
            let Some(computed) = backoff.next_backoff() else {
                return Err(err);
            };
            let delay = err.retry_after().unwrap_or(computed);
            if started.elapsed() + delay > policy.max_elapsed {
                return Err(err);
            }
            self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(endpoint, error = %err, delay_ms = delay.as_millis() as u64, "retrying control-plane call");
            tokio::time::sleep(delay).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        auth: Auth,
        credential: Option<&str>,
        register: bool,
    ) -> Result<T, ControlError> {
        let url = format!("{}{}", self.inner.base, path);
        let http = if register {
            &self.inner.register_http
        } else {
            &self.inner.http
        };
        let mut req = http.request(method, &url);
        if auth != Auth::None {
            let cred = credential.ok_or(ControlError::NoCredential)?;
            self.inner.limiter.acquire().await;
            req = req.header(AUTHORIZATION, format!("Bearer {cred}"));
        }
        if let Some(b) = body {
            req = req
                .header(CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        // A claim is not idempotent: when its answer is lost after the request left, the
        // server may have handed us a run. Only a failed connect proves it never arrived.
        let lost_claim_answer = || {
            if endpoint == "claim" {
                self.inner
                    .counters
                    .lost_claim_answers
                    .fetch_add(1, Ordering::Relaxed);
            }
        };
        let resp = req.send().await.map_err(|e| {
            if !e.is_connect() {
                lost_claim_answer();
            }
            ControlError::Transport {
                endpoint,
                message: redact(&error_chain(&e)).into_owned(),
            }
        })?;
        let status = resp.status();
        let retry_after = parse_retry_after(resp.headers());
        let limit = if endpoint == "claim" {
            MAX_CLAIM_BODY_BYTES
        } else {
            MAX_BODY_BYTES
        };
        let (bytes, over) = read_capped(resp, limit).await.map_err(|e| {
            if status.is_success() {
                lost_claim_answer();
            }
            ControlError::Transport {
                endpoint,
                message: redact(&error_chain(&e)).into_owned(),
            }
        })?;
        // An error answer cut at the cap still says what its status says.
        if status.is_success() && over {
            lost_claim_answer();
            return Err(ControlError::BodyTooLarge { endpoint, limit });
        }
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                lost_claim_answer();
                ControlError::Decode {
                    endpoint,
                    message: redact(&format!("{e}; body: {}", excerpt(&bytes))).into_owned(),
                }
            });
        }
        if status.as_u16() == 429 {
            self.inner
                .counters
                .throttled_429
                .fetch_add(1, Ordering::Relaxed);
        }
        let se = StatusError::from_response(endpoint, status.as_u16(), &bytes, retry_after);
        let is_auth = match auth {
            Auth::Runtime { forbidden_is_auth } => {
                status == StatusCode::UNAUTHORIZED
                    || (forbidden_is_auth && status == StatusCode::FORBIDDEN)
            }
            Auth::Probe => status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
            Auth::None => false,
        };
        if is_auth {
            if matches!(auth, Auth::Runtime { .. }) {
                self.inner.auth.mark(se.to_string());
            }
            return Err(ControlError::CredentialRejected(Box::new(se)));
        }
        Err(ControlError::Status(Box::new(se)))
    }
}

fn json_bytes<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ControlError> {
    serde_json::to_vec(v).map_err(|e| ControlError::Decode {
        endpoint: "encode",
        message: e.to_string(),
    })
}

/// Reads the body in chunks up to `cap` bytes; `true` when it is longer (the rest is left
/// unread: a declared length over the cap is refused before reading anything).
async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Ok((Vec::new(), true));
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf, true));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, false))
}

fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(BODY_EXCERPT_BYTES)];
    String::from_utf8_lossy(cut).trim().to_string()
}

/// `Retry-After` in seconds (the HTTP-date form is not used by Windshift).
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    parse_retry_after_value(headers.get(RETRY_AFTER)?.to_str().ok()?)
}

/// A `Retry-After` header value in seconds, capped at 300 s; `None` when it is not a number.
pub fn parse_retry_after_value(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(secs.min(300)))
}

/// reqwest's error with its sources, which hold the useful part (TLS, DNS, refused).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_refused_with_the_exact_text_unless_insecure() {
        let e = validate_api_url("http://host/api", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "WS_API_URL must be https:// — use an HTTPS URL ending in /api, or set WSRUNNER_ALLOW_INSECURE=1 only for local development"
        );
        let ok = validate_api_url("http://host/api", true).unwrap();
        assert_eq!(ok.url, "http://host/api");
        assert_eq!(ok.warnings.len(), 1);
        assert!(validate_api_url("HTTPS://host/api/", false).is_ok());
        assert!(matches!(
            validate_api_url("ftp://host/api", false),
            Err(ControlError::InsecureUrl)
        ));
    }

    #[test]
    fn missing_api_suffix_warns_but_passes() {
        let u = validate_api_url("https://host", false).unwrap();
        assert!(u.warnings.iter().any(|w| w.contains("/api")), "{u:?}");
        let u = validate_api_url("https://host/rest/api/v1", false).unwrap();
        assert!(!u.warnings.is_empty());
        let u = validate_api_url("https://host/api", false).unwrap();
        assert!(u.warnings.is_empty());
    }

    #[test]
    fn urls_with_userinfo_are_refused_without_echoing_the_secret() {
        let e = validate_api_url("https://u:supersecretpw@host/api", false).unwrap_err();
        assert!(!e.to_string().contains("supersecretpw"), "{e}");
    }

    #[test]
    fn empty_url_names_what_to_do() {
        let e = validate_api_url("  ", false).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
    }

    #[test]
    fn retry_after_is_parsed_in_seconds() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "1".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(1)));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn status_error_display_is_redacted() {
        let secret = format!("wsrc_{}", "a".repeat(64));
        let se = StatusError {
            endpoint: "claim",
            status: 500,
            body: Some(ErrorBody {
                error: format!("boom {secret}"),
                code: "INTERNAL_ERROR".into(),
                ..Default::default()
            }),
            excerpt: String::new(),
            retry_after: None,
        };
        let text = ControlError::Status(Box::new(se)).to_string();
        assert!(!text.contains(&secret), "{text}");
        assert!(text.contains("HTTP 500"));
    }
}
