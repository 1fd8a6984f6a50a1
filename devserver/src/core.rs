//! The control plane's state and rules (spec sections 2, 3 and 7), independent of HTTP.
//!
//! One mutex guards the whole state: every claim and finalize is therefore a true
//! compare-and-swap, which is what upstream's SQL `UPDATE … WHERE status = …` gives.
//! The state is persisted in sled after every change (one JSON document); events live in
//! their own tree keyed by run id and a monotonic id, so appending one is cheap.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::*;
use crate::DevServerConfig;

pub const STATUS_QUEUED: &str = "queued";
pub const STATUS_RUNNING: &str = "running";
pub const TERMINAL: [&str; 4] = ["succeeded", "failed", "canceled", "killed"];

/// Upper bound of an event's `payload_json` (`sanitize.LongTextMaxBytes`).
pub const MAX_EVENT_PAYLOAD: usize = 256 * 1024;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An API error: status, machine code and message, rendered as the `restapi` error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(400, "INVALID_INPUT", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> Self {
        Self::new(401, "UNAUTHORIZED", m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(403, "INSUFFICIENT_PERMISSION", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(404, "NOT_FOUND", m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(409, "CONFLICT", m)
    }
    pub fn rate_limited() -> Self {
        Self::new(
            429,
            "RATE_LIMITED",
            "Runner request rate exceeded. Retry shortly.",
        )
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(500, "INTERNAL_ERROR", m)
    }
    pub fn harness_disabled() -> Self {
        Self::new(
            503,
            "SERVICE_UNAVAILABLE",
            "coding-agent harness is disabled on this server",
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PoolRec {
    id: i64,
    name: String,
    max_concurrent_runs: i64,
    enabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RegTokenRec {
    pool_id: i64,
    expires_at_ms: i64,
    used: bool,
    display_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceRec {
    id: i64,
    pool_id: i64,
    name: String,
    credential_sha256: String,
    revoked: bool,
    registered_at_ms: i64,
    last_heartbeat_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRec {
    id: i64,
    pool_id: i64,
    workspace_id: i64,
    status: String,
    kind: String,
    image: String,
    prompt: String,
    env: BTreeMap<String, String>,
    repos: Vec<JobRepo>,
    runner_id: Option<i64>,
    queued_at_ms: i64,
    started_at_ms: Option<i64>,
    ended_at_ms: Option<i64>,
    error: String,
    cancel_requested_at_ms: Option<i64>,
    summary: String,
    container_id: String,
    branch: String,
    base_commit: String,
    result_repos: Vec<ResultRepo>,
    reported: Option<ResultBody>,
    /// SHA-256 of the run token minted at claim.
    token_sha256: Option<String>,
    stall_warned: bool,
    /// An ephemeral test run: no push grant (spec 11).
    #[serde(default)]
    test_run: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    next_pool_id: i64,
    next_instance_id: i64,
    next_run_id: i64,
    pools: BTreeMap<i64, PoolRec>,
    /// Keyed by the SHA-256 hex of the full token.
    reg_tokens: BTreeMap<String, RegTokenRec>,
    instances: BTreeMap<i64, InstanceRec>,
    runs: BTreeMap<i64, RunRec>,
    repos: BTreeMap<String, Repo>,
    /// Round-robin cursor per pool; advances on every claim call.
    rr_cursor: BTreeMap<i64, u64>,
    harness_disabled: bool,
}

/// Token bucket (rate per second, burst) for the server-side limiters.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    fn new(burst: f64) -> Self {
        Self {
            tokens: burst,
            last: std::time::Instant::now(),
        }
    }
    fn take(&mut self, rate_per_sec: f64, burst: f64) -> bool {
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate_per_sec).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// `prefix` + 64 lowercase hex characters (32 random bytes).
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Masks `wsrt_`/`wsrc_` secrets and the given run tokens before text is stored (upstream
/// redacts credentials in events and errors).
pub fn redact_secrets(text: &str, extra: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in extra {
        if !secret.is_empty() {
            out = out.replace(secret, "[REDACTED]");
        }
    }
    for prefix in ["wsrt_", "wsrc_"] {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(prefix) {
            result.push_str(&rest[..i + prefix.len()]);
            let after = &rest[i + prefix.len()..];
            let n = after
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
            if n > 0 {
                result.push_str("[REDACTED]");
            }
            rest = &after[n..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// Removes anything that looks like an HTML tag and caps the length in characters.
fn plain_text(s: &str, max_chars: usize) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.chars().take(max_chars).collect()
}

fn cap(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

fn is_hex_commit(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The whole server core. `HTTP` handlers and the in-process admin handle call into it.
pub struct Core {
    pub cfg: DevServerConfig,
    pub public_api_url: String,
    db: sled::Db,
    events: sled::Tree,
    state: Mutex<State>,
    limiters: Mutex<HashMap<i64, Bucket>>,
    register_limiter: Mutex<Bucket>,
    pub faults: Mutex<Faults>,
    /// Requests answered by an injected fault (error, 429, dropped connection, outage).
    pub faults_injected: AtomicU64,
    /// Pushes (receive-pack requests) that passed the gate and reached `git http-backend`.
    pub pushes_served: AtomicU64,
    pub repos_dir: PathBuf,
}

const STATE_KEY: &[u8] = b"state";

impl Core {
    pub fn open(cfg: DevServerConfig, public_api_url: String) -> Result<Self, String> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
            format!(
                "cannot create the data directory {}: {e}",
                cfg.data_dir.display()
            )
        })?;
        let db = sled::open(cfg.data_dir.join("db")).map_err(|e| {
            format!(
                "cannot open the devserver database in {} (is another devserver using it?): {e}",
                cfg.data_dir.display()
            )
        })?;
        let events = db
            .open_tree("events")
            .map_err(|e| format!("cannot open the events tree: {e}"))?;
        let state = match db.get(STATE_KEY).map_err(|e| e.to_string())? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("the stored devserver state is unreadable: {e}"))?,
            None => State::default(),
        };
        let repos_dir = cfg.data_dir.join("repos");
        std::fs::create_dir_all(&repos_dir).map_err(|e| e.to_string())?;
        let burst = cfg.register_burst;
        Ok(Self {
            cfg,
            public_api_url,
            db,
            events,
            state: Mutex::new(state),
            limiters: Mutex::new(HashMap::new()),
            register_limiter: Mutex::new(Bucket::new(burst)),
            faults: Mutex::new(Faults::default()),
            faults_injected: AtomicU64::new(0),
            pushes_served: AtomicU64::new(0),
            repos_dir,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, st: &State) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec(st).map_err(|e| ApiError::internal(e.to_string()))?;
        self.db
            .insert(STATE_KEY, bytes)
            .map_err(|e| ApiError::internal(format!("state write failed: {e}")))?;
        self.db
            .flush()
            .map_err(|e| ApiError::internal(format!("state flush failed: {e}")))?;
        Ok(())
    }

    pub fn flush(&self) {
        let _ = self.db.flush();
    }

    fn append_event(
        &self,
        run_id: i64,
        event_type: &str,
        payload_json: &str,
    ) -> Result<(), ApiError> {
        let id = self
            .db
            .generate_id()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let ev = StoredEvent {
            id,
            event_type: event_type.to_string(),
            payload_json: payload_json.to_string(),
            created_at_ms: now_ms(),
        };
        let mut key = Vec::with_capacity(16);
        key.extend_from_slice(&run_id.to_be_bytes());
        key.extend_from_slice(&id.to_be_bytes());
        let value = serde_json::to_vec(&ev).map_err(|e| ApiError::internal(e.to_string()))?;
        self.events
            .insert(key, value)
            .map_err(|e| ApiError::internal(format!("event write failed: {e}")))?;
        Ok(())
    }

    fn lifecycle(&self, run_id: i64, payload: serde_json::Value) -> Result<(), ApiError> {
        self.append_event(run_id, "lifecycle", &payload.to_string())
    }

    fn warning(&self, run_id: i64, payload: serde_json::Value) -> Result<(), ApiError> {
        self.append_event(run_id, "warning", &payload.to_string())
    }

    // ----- guards -----

    pub fn check_harness(&self) -> Result<(), ApiError> {
        if self.lock().harness_disabled {
            Err(ApiError::harness_disabled())
        } else {
            Ok(())
        }
    }

    /// Resolves a Bearer credential to an active instance id (401 otherwise), then applies
    /// the per-instance rate limit (429).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<i64, ApiError> {
        let cred = authorization
            .map(str::trim)
            .and_then(|h| {
                let (scheme, rest) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|c| !c.is_empty())
            .ok_or_else(|| ApiError::unauthorized("missing runner credential"))?;
        let hash = sha256_hex(cred);
        let id = {
            let st = self.lock();
            st.instances
                .values()
                .find(|i| i.credential_sha256 == hash && !i.revoked)
                .map(|i| i.id)
        }
        .ok_or_else(|| ApiError::unauthorized("invalid runner credential"))?;
        let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = limiters
            .entry(id)
            .or_insert_with(|| Bucket::new(self.cfg.rate_burst));
        if !bucket.take(self.cfg.rate_per_sec, self.cfg.rate_burst) {
            return Err(ApiError::rate_limited());
        }
        Ok(id)
    }

    // ----- runner protocol -----

    /// The register endpoint's own limiter (upstream: per IP, 5/min, burst 10), applied
    /// before the body is read.
    pub fn register_rate_check(&self) -> Result<(), ApiError> {
        {
            let mut lim = self
                .register_limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !lim.take(
                self.cfg.register_rate_per_min / 60.0,
                self.cfg.register_burst,
            ) {
                return Err(ApiError::new(
                    429,
                    "RATE_LIMITED",
                    "Too many registration attempts. Retry shortly.",
                ));
            }
        }
        Ok(())
    }

    pub fn register(&self, body: &RegisterBody) -> Result<Registered, ApiError> {
        let invalid = || ApiError::unauthorized("invalid or expired registration token");
        let token = body.registration_token.trim();
        if token.is_empty() {
            return Err(invalid());
        }
        let hash = sha256_hex(token);
        let mut st = self.lock();
        let now = now_ms();
        let rec = st.reg_tokens.get(&hash).cloned().ok_or_else(invalid)?;
        if rec.used || rec.expires_at_ms <= now {
            return Err(invalid());
        }
        let pool_ok = st
            .pools
            .get(&rec.pool_id)
            .map(|p| p.enabled)
            .unwrap_or(false);
        if !pool_ok {
            return Err(invalid());
        }
        // Consumed in the same critical section as the instance is created: single use.
        if let Some(r) = st.reg_tokens.get_mut(&hash) {
            r.used = true;
        }
        st.next_instance_id += 1;
        let id = st.next_instance_id;
        let credential = new_secret("wsrc_");
        let name = plain_text(body.name.trim(), 256);
        st.instances.insert(
            id,
            InstanceRec {
                id,
                pool_id: rec.pool_id,
                name: if name.is_empty() {
                    format!("runner-{id}")
                } else {
                    name
                },
                credential_sha256: sha256_hex(&credential),
                revoked: false,
                registered_at_ms: now,
                last_heartbeat_at_ms: None,
            },
        );
        self.save(&st)?;
        Ok(Registered {
            credential,
            instance_id: id,
            pool_id: rec.pool_id,
        })
    }

    fn is_live(&self, inst: &InstanceRec, now: i64) -> bool {
        let window = self.cfg.liveness_window.as_millis() as i64;
        !inst.revoked
            && inst
                .last_heartbeat_at_ms
                .map(|t| now - t <= window)
                .unwrap_or(false)
    }

    pub fn claim(&self, instance_id: i64) -> Result<Option<Job>, ApiError> {
        let mut st = self.lock();
        let now = now_ms();
        let pool_id = st
            .instances
            .get(&instance_id)
            .map(|i| i.pool_id)
            .ok_or_else(|| ApiError::unauthorized("invalid runner credential"))?;
        let pool = st
            .pools
            .get(&pool_id)
            .filter(|p| p.enabled)
            .cloned()
            .ok_or_else(|| ApiError::forbidden("runner pool is unavailable"))?;
        // A claim poll counts as liveness.
        if let Some(i) = st.instances.get_mut(&instance_id) {
            i.last_heartbeat_at_ms = Some(now);
        }
        let running = st
            .runs
            .values()
            .filter(|r| r.pool_id == pool_id && r.status == STATUS_RUNNING)
            .count() as i64;
        if pool.max_concurrent_runs > 0 && running >= pool.max_concurrent_runs {
            self.save(&st)?;
            return Ok(None);
        }
        // Round-robin among live instances, oldest registered first; the cursor advances on
        // every claim call, even when the queue is empty.
        let live: Vec<i64> = st
            .instances
            .values()
            .filter(|i| i.pool_id == pool_id && self.is_live(i, now))
            .map(|i| i.id)
            .collect();
        if live.is_empty() {
            self.save(&st)?;
            return Ok(None);
        }
        let cursor = st.rr_cursor.entry(pool_id).or_insert(0);
        let chosen = live[(*cursor % live.len() as u64) as usize];
        *cursor = cursor.wrapping_add(1);
        if chosen != instance_id {
            self.save(&st)?;
            return Ok(None);
        }
        let Some(run_id) = st
            .runs
            .values()
            .filter(|r| r.pool_id == pool_id && r.status == STATUS_QUEUED)
            .min_by_key(|r| (r.queued_at_ms, r.id))
            .map(|r| r.id)
        else {
            self.save(&st)?;
            return Ok(None);
        };
        let token = hex::encode({
            let mut b = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut b);
            b
        });
        let runner_name = st
            .instances
            .get(&instance_id)
            .map(|i| i.name.clone())
            .unwrap_or_default();
        let run = st
            .runs
            .get_mut(&run_id)
            .ok_or_else(|| ApiError::internal("run vanished"))?;
        run.status = STATUS_RUNNING.into();
        run.runner_id = Some(instance_id);
        run.started_at_ms = Some(now);
        run.token_sha256 = Some(sha256_hex(&token));
        let job = self.job_for(run, &token);
        self.save(&st)?;
        drop(st);
        self.lifecycle(
            run_id,
            serde_json::json!({"phase":"claimed","runner_id":instance_id,"runner_name":runner_name}),
        )?;
        self.lifecycle(
            run_id,
            serde_json::json!({"phase":"token_minted","token_id":run_id,"expires_at":null}),
        )?;
        Ok(Some(job))
    }

    fn job_for(&self, run: &RunRec, token: &str) -> Job {
        let api = self.public_api_url.clone();
        let mut env = run.env.clone();
        let binding = run.kind.is_empty() || run.kind == "coding_agent" || !run.repos.is_empty();
        if binding {
            let id = run.id.to_string();
            let ws = run.workspace_id.to_string();
            let key = format!("DEV-{id}");
            for (k, v) in [
                ("AGENT_RUN_ID", id.clone()),
                ("WS_WORKSPACE_ID", ws),
                ("WINDSHIFT_ITEM_DB_ID", id.clone()),
                ("WS_API_URL", api.clone()),
                ("WS_WORKSPACE_KEY", "DEV".to_string()),
                ("WS_ITEM_NUMBER", id.clone()),
                ("WINDSHIFT_ITEM_ID", key.clone()),
                ("WINDSHIFT_ITEM_KEY", key),
                ("WS_TOKEN", token.to_string()),
            ] {
                env.insert(k.to_string(), v);
            }
            if self.cfg.llm_proxy {
                env.insert(
                    "LLM_BASE_URL".into(),
                    format!("{api}/llm-proxy/{id}/complete"),
                );
                env.insert("LLM_API_KEY".into(), token.to_string());
            }
        }
        Job {
            run_id: run.id,
            workspace_path: String::new(),
            env,
            initial_prompt: run.prompt.clone(),
            kind: run.kind.clone(),
            image: run.image.clone(),
            repo: run.repos.first().cloned(),
            repos: run.repos.clone(),
        }
    }

    /// Ownership check shared by events and result (`ownsRun`).
    fn owns_run(st: &State, instance_id: i64, run_id: i64) -> Result<(), ApiError> {
        let run = st
            .runs
            .get(&run_id)
            .ok_or_else(|| ApiError::not_found("agent run not found"))?;
        if run.runner_id != Some(instance_id) {
            return Err(ApiError::forbidden(
                "agent run is not claimed by this runner",
            ));
        }
        if run.status != STATUS_RUNNING {
            return Err(ApiError::conflict("agent run is not running"));
        }
        Ok(())
    }

    pub fn event(&self, instance_id: i64, run_id: i64, body: &EventBody) -> Result<(), ApiError> {
        let event_type = plain_text(&body.event_type, 100);
        let payload = if body.payload_json.is_empty() {
            "{}".to_string()
        } else {
            body.payload_json.clone()
        };
        if payload.len() > MAX_EVENT_PAYLOAD {
            return Err(ApiError::bad_request(
                "invalid request body: payload_json too large",
            ));
        }
        if serde_json::from_str::<serde_json::Value>(&payload).is_err() {
            return Err(ApiError::bad_request(
                "invalid request body: payload_json is not valid JSON",
            ));
        }
        let st = self.lock();
        Self::owns_run(&st, instance_id, run_id)?;
        // Appended under the state lock so a concurrent finalize cannot interleave (409 after
        // terminal is exact).
        self.append_event(run_id, &event_type, &redact_secrets(&payload, &[]))
    }

    pub fn result(&self, instance_id: i64, run_id: i64, body: &ResultBody) -> Result<(), ApiError> {
        if !TERMINAL.contains(&body.status.as_str()) {
            return Err(ApiError::bad_request(format!(
                "status must be one of succeeded, failed, canceled, killed (got {:?})",
                body.status
            )));
        }
        let mut st = self.lock();
        Self::owns_run(&st, instance_id, run_id)?;
        let run = st
            .runs
            .get_mut(&run_id)
            .ok_or_else(|| ApiError::not_found("agent run not found"))?;
        let now = now_ms();
        run.status = body.status.clone();
        run.ended_at_ms = Some(now);
        run.error = redact_secrets(&plain_text(&body.error, 10_000), &[]);
        run.summary = plain_text(&body.summary, 10_000);
        run.container_id = cap(&body.container_id, 100);
        run.reported = Some(body.clone());
        let expected = format!("agent-runs/run-{run_id}");
        let mut rejected: Vec<serde_json::Value> = Vec::new();
        let (branch, base) = validate_ref(
            &cap(&body.branch, 100),
            &cap(&body.base_commit, 100),
            &expected,
            "",
            &mut rejected,
        );
        run.branch = branch;
        run.base_commit = base;
        run.result_repos = body
            .repos
            .iter()
            .map(|r| {
                let slug = cap(&r.repo_slug, 100);
                let (branch, base_commit) = validate_ref(
                    &cap(&r.branch, 100),
                    &cap(&r.base_commit, 100),
                    &expected,
                    &slug,
                    &mut rejected,
                );
                ResultRepo {
                    repo_slug: slug,
                    branch,
                    base_commit,
                }
            })
            .collect();
        self.save(&st)?;
        drop(st);
        self.lifecycle(run_id, serde_json::json!({"phase": body.status}))?;
        for w in rejected {
            self.warning(run_id, w)?;
        }
        Ok(())
    }

    pub fn heartbeat(&self, instance_id: i64) -> Result<HeartbeatAnswer, ApiError> {
        let mut st = self.lock();
        let pool_id = match st.instances.get_mut(&instance_id) {
            Some(i) => {
                i.last_heartbeat_at_ms = Some(now_ms());
                i.pool_id
            }
            None => return Err(ApiError::unauthorized("invalid runner credential")),
        };
        let abort = st
            .runs
            .values()
            .filter(|r| {
                r.runner_id == Some(instance_id)
                    && r.status == STATUS_RUNNING
                    && r.cancel_requested_at_ms.is_some()
            })
            .map(|r| r.id)
            .collect();
        let queue_depth = st
            .runs
            .values()
            .filter(|r| r.pool_id == pool_id && r.status == STATUS_QUEUED)
            .count() as i64;
        self.save(&st)?;
        Ok(HeartbeatAnswer { abort, queue_depth })
    }

    // ----- git proxy support -----

    /// The run bound to a run token: `Ok(None)` when the token is unknown.
    pub fn run_for_token(&self, token: &str) -> Option<(i64, String, Vec<JobRepo>)> {
        let hash = sha256_hex(token);
        let st = self.lock();
        st.runs
            .values()
            .find(|r| r.token_sha256.as_deref() == Some(hash.as_str()))
            .map(|r| (r.id, r.status.clone(), r.repos.clone()))
    }

    /// True for an ephemeral test run, whose token holds no push grant.
    pub fn is_test_run(&self, run_id: i64) -> bool {
        self.lock().runs.get(&run_id).is_some_and(|r| r.test_run)
    }

    pub fn repo_exists(&self, slug: &str) -> bool {
        self.lock().repos.contains_key(slug)
    }

    // ----- reaper -----

    /// One sweep of the lease reaper and the duration backstop (spec 7).
    pub fn reap(&self) -> Result<Vec<i64>, ApiError> {
        let now = now_ms();
        let window = self.cfg.liveness_window.as_millis() as i64;
        let backstop = self.cfg.max_run_duration.as_millis() as i64;
        let stall = self.cfg.queued_stall_after.as_millis() as i64;
        let mut st = self.lock();
        let mut reaped = Vec::new();
        let mut warnings = Vec::new();
        let instances = st.instances.clone();
        let live_counts: BTreeMap<i64, usize> = st
            .pools
            .keys()
            .map(|p| {
                (
                    *p,
                    instances
                        .values()
                        .filter(|i| i.pool_id == *p && self.is_live(i, now))
                        .count(),
                )
            })
            .collect();
        for run in st.runs.values_mut() {
            if run.status == STATUS_QUEUED && !run.stall_warned && now - run.queued_at_ms > stall {
                run.stall_warned = true;
                let live = live_counts.get(&run.pool_id).copied().unwrap_or(0);
                warnings.push((
                    run.id,
                    serde_json::json!({"phase":"queued_stall","message": format!(
                        "queued for {}s without being claimed — pool {} has {} live runner(s)",
                        (now - run.queued_at_ms) / 1000, run.pool_id, live)}),
                ));
            }
            if run.status != STATUS_RUNNING {
                continue;
            }
            let stale = match run.runner_id.and_then(|id| instances.get(&id)) {
                None => true,
                Some(i) if i.revoked => true,
                Some(i) => match i.last_heartbeat_at_ms {
                    Some(t) => now - t > window,
                    None => now - i.registered_at_ms > window,
                },
            };
            let too_long = run
                .started_at_ms
                .map(|s| now - s > backstop)
                .unwrap_or(false);
            let reason = if stale {
                "runner lease expired (missed heartbeat)"
            } else if too_long {
                "run exceeded the maximum allowed duration (reaped by the orchestrator backstop)"
            } else {
                continue;
            };
            run.status = "failed".into();
            run.error = reason.into();
            run.ended_at_ms = Some(now);
            reaped.push((run.id, reason));
        }
        self.save(&st)?;
        drop(st);
        for (id, reason) in &reaped {
            self.lifecycle(*id, serde_json::json!({"phase":"failed","reason":reason}))?;
        }
        for (id, w) in warnings {
            self.warning(id, w)?;
        }
        Ok(reaped.into_iter().map(|(id, _)| id).collect())
    }

    // ----- admin -----

    pub fn create_pool(&self, req: &CreatePool) -> Result<Pool, ApiError> {
        if req.max_concurrent_runs < 0 {
            return Err(ApiError::bad_request(
                "max_concurrent_runs must be 0 (unlimited) or more",
            ));
        }
        let mut st = self.lock();
        st.next_pool_id += 1;
        let id = st.next_pool_id;
        let rec = PoolRec {
            id,
            name: if req.name.trim().is_empty() {
                format!("pool-{id}")
            } else {
                req.name.trim().to_string()
            },
            max_concurrent_runs: req.max_concurrent_runs,
            enabled: true,
        };
        st.pools.insert(id, rec.clone());
        self.save(&st)?;
        Ok(pool_view(&rec))
    }

    pub fn set_pool_enabled(&self, pool_id: i64, enabled: bool) -> Result<Pool, ApiError> {
        let mut st = self.lock();
        let pool = st
            .pools
            .get_mut(&pool_id)
            .ok_or_else(|| ApiError::not_found(format!("pool {pool_id} not found")))?;
        pool.enabled = enabled;
        let view = pool_view(pool);
        self.save(&st)?;
        Ok(view)
    }

    pub fn pools(&self) -> Vec<Pool> {
        self.lock().pools.values().map(pool_view).collect()
    }

    pub fn mint_token(&self, pool_id: i64, req: &MintToken) -> Result<MintedToken, ApiError> {
        let mut st = self.lock();
        if !st.pools.contains_key(&pool_id) {
            return Err(ApiError::not_found(format!("pool {pool_id} not found")));
        }
        let token = new_secret("wsrt_");
        let ttl = req
            .ttl_secs
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.registration_token_ttl);
        let expires_at_ms = now_ms() + ttl.as_millis() as i64;
        let display_prefix = token.chars().take(13).collect::<String>();
        st.reg_tokens.insert(
            sha256_hex(&token),
            RegTokenRec {
                pool_id,
                expires_at_ms,
                used: false,
                display_prefix: display_prefix.clone(),
            },
        );
        self.save(&st)?;
        Ok(MintedToken {
            token,
            display_prefix,
            expires_at_ms,
        })
    }

    pub fn instances(&self) -> Vec<InstanceView> {
        self.lock().instances.values().map(instance_view).collect()
    }

    pub fn revoke_instance(&self, id: i64) -> Result<InstanceView, ApiError> {
        let mut st = self.lock();
        let inst = st
            .instances
            .get_mut(&id)
            .ok_or_else(|| ApiError::not_found(format!("instance {id} not found")))?;
        inst.revoked = true;
        let view = instance_view(inst);
        self.save(&st)?;
        Ok(view)
    }

    pub fn set_harness(&self, enabled: bool) -> Result<(), ApiError> {
        let mut st = self.lock();
        st.harness_disabled = !enabled;
        self.save(&st)
    }

    /// Imports a local repository as the bare repo `<repos>/<owner>/<name>.git`.
    /// A pool, a fresh registration token for it, and one repository imported from a local
    /// path: what the demo and the runner's tests start from.
    pub async fn provision(
        &self,
        pool_name: &str,
        slug: &str,
        path: &str,
    ) -> Result<(Pool, String, Repo), ApiError> {
        let pool = self.create_pool(&CreatePool {
            name: pool_name.into(),
            max_concurrent_runs: 0,
        })?;
        let token = self.mint_token(pool.id, &MintToken::default())?.token;
        let repo = self
            .create_repo(&CreateRepo {
                slug: slug.into(),
                path: path.into(),
            })
            .await?;
        Ok((pool, token, repo))
    }

    pub async fn create_repo(&self, req: &CreateRepo) -> Result<Repo, ApiError> {
        let slug = req.slug.trim().trim_end_matches(".git").to_string();
        let valid_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let parts: Vec<&str> = slug.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| valid_part(p)) {
            return Err(ApiError::bad_request(format!(
                "repo slug {slug:?} must be owner/name (letters, digits, - _ .)"
            )));
        }
        let dest = self
            .repos_dir
            .join(parts[0])
            .join(format!("{}.git", parts[1]));
        if dest.exists() {
            return Err(ApiError::conflict(format!("repo {slug} already exists")));
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ApiError::internal(e.to_string()))?;
        }
        let out = tokio::process::Command::new(&self.cfg.git_bin)
            .arg("clone")
            .arg("--bare")
            .arg("--quiet")
            .arg("--")
            .arg(&req.path)
            .arg(&dest)
            .output()
            .await
            .map_err(|e| ApiError::internal(format!("cannot run git: {e}")))?;
        if !out.status.success() {
            return Err(ApiError::bad_request(format!(
                "git clone --bare {} failed: {}",
                req.path,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let repo = Repo {
            slug: slug.clone(),
            bare_path: dest.display().to_string(),
        };
        let mut st = self.lock();
        st.repos.insert(slug, repo.clone());
        self.save(&st)?;
        Ok(repo)
    }

    pub fn repos(&self) -> Vec<Repo> {
        self.lock().repos.values().cloned().collect()
    }

    pub fn enqueue(&self, req: &EnqueueRun) -> Result<RunView, ApiError> {
        let kind = req.kind.trim().to_string();
        if !["", "coding_agent", "action_container", "ci_task"].contains(&kind.as_str()) {
            return Err(ApiError::bad_request(format!(
                "kind {kind:?} must be coding_agent, action_container or ci_task"
            )));
        }
        let mut st = self.lock();
        if !st.pools.contains_key(&req.pool_id) {
            return Err(ApiError::not_found(format!(
                "pool {} not found",
                req.pool_id
            )));
        }
        let workspace_id = req.workspace_id.unwrap_or(1);
        let mut repos = Vec::new();
        for r in &req.repos {
            let slug = r.slug.trim().trim_end_matches(".git").to_string();
            // Newer servers accept group/sub/project slugs (spec 11) that no git-proxy route
            // serves: they are handed out as they are, so runners can be tested against them.
            let nested = slug.matches('/').count() > 1;
            if !nested && !st.repos.contains_key(&slug) {
                return Err(ApiError::bad_request(format!(
                    "repo {slug:?} is unknown: create it first (admin repo create)"
                )));
            }
            repos.push(JobRepo {
                workspace_id,
                slug,
                base_ref: if r.base_ref.trim().is_empty() {
                    "main".into()
                } else {
                    r.base_ref.trim().into()
                },
                continue_branch: r.continue_branch.trim().into(),
            });
        }
        st.next_run_id += 1;
        let id = st.next_run_id;
        let run = RunRec {
            id,
            pool_id: req.pool_id,
            workspace_id,
            status: STATUS_QUEUED.into(),
            kind,
            image: req.image.clone(),
            prompt: req.prompt.clone(),
            env: req.env.clone(),
            repos,
            runner_id: None,
            queued_at_ms: now_ms(),
            started_at_ms: None,
            ended_at_ms: None,
            error: String::new(),
            cancel_requested_at_ms: None,
            summary: String::new(),
            container_id: String::new(),
            branch: String::new(),
            base_commit: String::new(),
            result_repos: Vec::new(),
            reported: None,
            token_sha256: None,
            stall_warned: false,
            test_run: req.test_run,
        };
        let view = run_view(&run);
        st.runs.insert(id, run);
        self.save(&st)?;
        drop(st);
        self.lifecycle(
            id,
            serde_json::json!({"phase":"queued","target_pool_id":req.pool_id}),
        )?;
        Ok(view)
    }

    /// Cancels a run: queued runs end at once; running runs get `cancel_requested_at` (the
    /// owner sees them in `abort`), and with `force` are also moved to `canceled`.
    pub fn cancel(&self, run_id: i64, force: bool) -> Result<RunView, ApiError> {
        let mut st = self.lock();
        let run = st
            .runs
            .get_mut(&run_id)
            .ok_or_else(|| ApiError::not_found(format!("run {run_id} not found")))?;
        let now = now_ms();
        let mut event = None;
        if run.status == STATUS_QUEUED {
            run.status = "canceled".into();
            run.error = "canceled while queued".into();
            run.ended_at_ms = Some(now);
            event = Some("canceled while queued");
        } else if run.status == STATUS_RUNNING {
            run.cancel_requested_at_ms.get_or_insert(now);
            if force {
                run.status = "canceled".into();
                run.error = "force-canceled by admin".into();
                run.ended_at_ms = Some(now);
                event = Some("force-canceled by admin");
            }
        } else {
            return Err(ApiError::conflict(format!(
                "run {run_id} is already {}",
                run.status
            )));
        }
        let view = run_view(run);
        self.save(&st)?;
        drop(st);
        if let Some(reason) = event {
            self.lifecycle(
                run_id,
                serde_json::json!({"phase":"canceled","reason":reason}),
            )?;
        }
        Ok(view)
    }

    pub fn runs(&self) -> Vec<RunView> {
        self.lock().runs.values().map(run_view).collect()
    }

    pub fn run(&self, run_id: i64) -> Result<RunView, ApiError> {
        self.lock()
            .runs
            .get(&run_id)
            .map(run_view)
            .ok_or_else(|| ApiError::not_found(format!("run {run_id} not found")))
    }

    pub fn events(&self, run_id: i64) -> Result<Vec<StoredEvent>, ApiError> {
        let mut out = Vec::new();
        for item in self.events.scan_prefix(run_id.to_be_bytes()) {
            let (_, v) = item.map_err(|e| ApiError::internal(e.to_string()))?;
            out.push(serde_json::from_slice(&v).map_err(|e| ApiError::internal(e.to_string()))?);
        }
        Ok(out)
    }
}

/// Branch/base validation of `validateRemoteSCMRefs`: a branch other than the run branch drops
/// both (with a warning); a malformed base alone is dropped.
fn validate_ref(
    branch: &str,
    base: &str,
    expected: &str,
    slug: &str,
    rejected: &mut Vec<serde_json::Value>,
) -> (String, String) {
    if !branch.is_empty() && branch != expected {
        rejected.push(serde_json::json!({
            "phase":"scm_ref_rejected","repo_slug":slug,"branch":branch,
            "reason": format!("branch must be {expected}")}));
        return (String::new(), String::new());
    }
    if !base.is_empty() && !is_hex_commit(base) {
        rejected.push(serde_json::json!({
            "phase":"scm_ref_rejected","repo_slug":slug,"base_commit":base,
            "reason":"base_commit must be 40 or 64 hex characters"}));
        return (branch.to_string(), String::new());
    }
    (branch.to_string(), base.to_string())
}

fn pool_view(p: &PoolRec) -> Pool {
    Pool {
        id: p.id,
        name: p.name.clone(),
        max_concurrent_runs: p.max_concurrent_runs,
        enabled: p.enabled,
    }
}

fn instance_view(i: &InstanceRec) -> InstanceView {
    InstanceView {
        id: i.id,
        pool_id: i.pool_id,
        name: i.name.clone(),
        status: if i.revoked { "revoked" } else { "active" }.into(),
        registered_at_ms: i.registered_at_ms,
        last_heartbeat_at_ms: i.last_heartbeat_at_ms,
    }
}

fn run_view(r: &RunRec) -> RunView {
    RunView {
        id: r.id,
        pool_id: r.pool_id,
        status: r.status.clone(),
        kind: r.kind.clone(),
        image: r.image.clone(),
        prompt: r.prompt.clone(),
        repos: r.repos.clone(),
        runner_id: r.runner_id,
        queued_at_ms: r.queued_at_ms,
        started_at_ms: r.started_at_ms,
        ended_at_ms: r.ended_at_ms,
        error: r.error.clone(),
        cancel_requested: r.cancel_requested_at_ms.is_some(),
        summary: r.summary.clone(),
        container_id: r.container_id.clone(),
        branch: r.branch.clone(),
        base_commit: r.base_commit.clone(),
        result_repos: r.result_repos.clone(),
        reported: r.reported.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_prefix_and_64_hex() {
        let s = new_secret("wsrc_");
        assert_eq!(s.len(), 5 + 64);
        assert!(s[5..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn html_is_stripped_and_capped() {
        assert_eq!(plain_text("<b>hi</b> there", 5), "hi th");
    }

    #[test]
    fn redaction_masks_shaped_secrets() {
        let s = format!("x {} y", new_secret("wsrt_"));
        assert_eq!(redact_secrets(&s, &[]), "x wsrt_[REDACTED] y");
    }

    #[test]
    fn ref_validation_follows_section_7() {
        let mut w = Vec::new();
        let good = "a".repeat(40);
        assert_eq!(
            validate_ref("agent-runs/run-3", &good, "agent-runs/run-3", "", &mut w),
            ("agent-runs/run-3".to_string(), good.clone())
        );
        assert!(w.is_empty());
        assert_eq!(
            validate_ref("feature", &good, "agent-runs/run-3", "", &mut w),
            (String::new(), String::new())
        );
        assert_eq!(
            validate_ref("agent-runs/run-3", "xyz", "agent-runs/run-3", "", &mut w),
            ("agent-runs/run-3".to_string(), String::new())
        );
        assert_eq!(w.len(), 2);
    }
}
