//! HTTP surface: the runner protocol under `/api`, the git proxy, and the admin API under
//! `/admin`. Faults are injected in front of `/api` only (the git proxy included), so the admin
//! API stays usable while a test simulates an outage; `Faults::only_path_prefix` narrows them
//! to some routes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::core::{now_ms, ApiError, Core};
use crate::types::*;

/// Control-plane body cap (`runnerControlMaxBodyBytes`).
const MAX_CONTROL_BODY: usize = 1024 * 1024;

/// Marker: the connection must be closed without an answer (fault injection).
#[derive(Clone, Copy)]
pub struct DropConnection;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorAnswer {
            error: self.message,
            code: self.code.to_string(),
            request_id: format!("req-{:016x}", rand::thread_rng().gen::<u64>()),
        };
        let mut resp = (status, Json(body)).into_response();
        if self.status == 429 {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

type Shared = Arc<Core>;

pub fn router(core: Shared) -> Router {
    let api = Router::new()
        .route("/version", get(version))
        .route("/runner/register", post(register))
        .route("/runner/claim", post(claim))
        .route("/runner/heartbeat", post(heartbeat))
        .route("/runner/runs/{id}/events", post(event))
        .route("/runner/runs/{id}/result", post(result))
        .route(
            "/git-proxy/{ws}/{owner}/{repo}/{*tail}",
            any(crate::gitproxy::handle),
        )
        .layer(axum::middleware::from_fn_with_state(core.clone(), faults));
    let admin = Router::new()
        .route("/pools", post(admin_create_pool).get(admin_pools))
        .route("/pools/{id}/tokens", post(admin_mint_token))
        .route("/pools/{id}/enable", post(admin_enable_pool))
        .route("/pools/{id}/disable", post(admin_disable_pool))
        .route("/repos", post(admin_create_repo).get(admin_repos))
        .route("/runs", post(admin_enqueue).get(admin_runs))
        .route("/runs/{id}", get(admin_run))
        .route("/runs/{id}/events", get(admin_events))
        .route("/runs/{id}/cancel", post(admin_cancel))
        .route("/instances", get(admin_instances))
        .route("/instances/{id}/revoke", post(admin_revoke))
        .route("/harness", post(admin_harness))
        .route("/faults", get(admin_faults_get).put(admin_faults_put))
        .route("/reap", post(admin_reap));
    Router::new()
        .nest("/api", api)
        .nest("/admin", admin)
        .with_state(core)
}

async fn faults(State(core): State<Shared>, req: Request, next: Next) -> Response {
    let f = core
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    // Inside the nested `/api` router the path has lost its `/api` prefix.
    let full_path = format!("/api{}", req.uri().path());
    if !fault_applies(&f, &full_path) {
        return next.run(req).await;
    }
    if f.added_latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(f.added_latency_ms)).await;
    }
    let injected = || {
        core.faults_injected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    if f.outage_until_ms.map(|t| t > now_ms()).unwrap_or(false) {
        injected();
        return ApiError::new(503, "SERVICE_UNAVAILABLE", "injected outage").into_response();
    }
    let (drop_roll, err_roll, rate_roll): (f64, f64, f64) = {
        let mut rng = rand::thread_rng();
        (rng.gen(), rng.gen(), rng.gen())
    };
    if drop_roll < f.drop_connection_probability {
        injected();
        let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
        resp.extensions_mut().insert(DropConnection);
        return resp;
    }
    if err_roll < f.error_5xx_probability {
        injected();
        return ApiError::internal("injected server error").into_response();
    }
    if rate_roll < f.rate_429_probability {
        injected();
        return ApiError::rate_limited().into_response();
    }
    next.run(req).await
}

/// Whether the fault settings cover a request for `full_path` (e.g. `/api/runner/claim`).
pub fn fault_applies(f: &Faults, full_path: &str) -> bool {
    match f.only_path_prefix.as_deref() {
        Some(prefix) if !prefix.is_empty() => full_path.starts_with(prefix),
        _ => true,
    }
}

fn parse_body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.len() > MAX_CONTROL_BODY {
        return Err(ApiError::bad_request("invalid request body"));
    }
    serde_json::from_slice(bytes).map_err(|_| ApiError::bad_request("invalid request body"))
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::bad_request("invalid request body"))
}

fn auth_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

async fn version() -> Json<Version> {
    Json(Version {
        version: format!("windshift-devserver {}", env!("CARGO_PKG_VERSION")),
    })
}

async fn register(State(core): State<Shared>, req: Request) -> Result<Response, ApiError> {
    core.check_harness()?;
    core.register_rate_check()?;
    let bytes = read_body(req.into_body(), MAX_CONTROL_BODY + 1).await?;
    let body: RegisterBody = parse_body(&bytes)?;
    let out = core.register(&body)?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn claim(State(core): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    core.check_harness()?;
    let id = core.authenticate(auth_header(&headers))?;
    let job = core.claim(id)?;
    if job.is_some() {
        let mut f = core.faults.lock().unwrap_or_else(|e| e.into_inner());
        if f.lose_claim_answers > 0 {
            f.lose_claim_answers -= 1;
            let mut resp = StatusCode::INTERNAL_SERVER_ERROR.into_response();
            resp.extensions_mut().insert(DropConnection);
            return Ok(resp);
        }
    }
    Ok(Json(ClaimAnswer { job }).into_response())
}

async fn heartbeat(
    State(core): State<Shared>,
    headers: HeaderMap,
) -> Result<Json<HeartbeatAnswer>, ApiError> {
    core.check_harness()?;
    let id = core.authenticate(auth_header(&headers))?;
    Ok(Json(core.heartbeat(id)?))
}

fn parse_run_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("run id {raw:?} is not a number")))
}

async fn event(
    State(core): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<Ok>, ApiError> {
    core.check_harness()?;
    let instance = core.authenticate(auth_header(req.headers()))?;
    let run_id = parse_run_id(&id)?;
    let bytes = read_body(req.into_body(), MAX_CONTROL_BODY + 1).await?;
    let body: EventBody = parse_body(&bytes)?;
    core.event(instance, run_id, &body)?;
    Ok(Json(Ok { ok: true }))
}

async fn result(
    State(core): State<Shared>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<Ok>, ApiError> {
    core.check_harness()?;
    let instance = core.authenticate(auth_header(req.headers()))?;
    let run_id = parse_run_id(&id)?;
    let bytes = read_body(req.into_body(), MAX_CONTROL_BODY + 1).await?;
    let body: ResultBody = parse_body(&bytes)?;
    core.result(instance, run_id, &body)?;
    Ok(Json(Ok { ok: true }))
}

// ----- admin -----

fn admin_json<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

async fn admin_create_pool(
    State(core): State<Shared>,
    body: Bytes,
) -> Result<Json<Pool>, ApiError> {
    Ok(Json(core.create_pool(&admin_json(&body)?)?))
}

async fn admin_pools(State(core): State<Shared>) -> Json<Vec<Pool>> {
    Json(core.pools())
}

async fn admin_mint_token(
    State(core): State<Shared>,
    Path(id): Path<i64>,
    body: Bytes,
) -> Result<Json<MintedToken>, ApiError> {
    let req: MintToken = if body.is_empty() {
        MintToken::default()
    } else {
        admin_json(&body)?
    };
    Ok(Json(core.mint_token(id, &req)?))
}

async fn admin_enable_pool(
    State(core): State<Shared>,
    Path(id): Path<i64>,
) -> Result<Json<Pool>, ApiError> {
    Ok(Json(core.set_pool_enabled(id, true)?))
}

async fn admin_disable_pool(
    State(core): State<Shared>,
    Path(id): Path<i64>,
) -> Result<Json<Pool>, ApiError> {
    Ok(Json(core.set_pool_enabled(id, false)?))
}

async fn admin_create_repo(
    State(core): State<Shared>,
    body: Bytes,
) -> Result<Json<Repo>, ApiError> {
    Ok(Json(core.create_repo(&admin_json(&body)?).await?))
}

async fn admin_repos(State(core): State<Shared>) -> Json<Vec<Repo>> {
    Json(core.repos())
}

async fn admin_enqueue(State(core): State<Shared>, body: Bytes) -> Result<Json<RunView>, ApiError> {
    Ok(Json(core.enqueue(&admin_json(&body)?)?))
}

async fn admin_runs(State(core): State<Shared>) -> Json<Vec<RunView>> {
    Json(core.runs())
}

async fn admin_run(
    State(core): State<Shared>,
    Path(id): Path<i64>,
) -> Result<Json<RunView>, ApiError> {
    Ok(Json(core.run(id)?))
}

async fn admin_events(
    State(core): State<Shared>,
    Path(id): Path<i64>,
) -> Result<Json<Vec<StoredEvent>>, ApiError> {
    Ok(Json(core.events(id)?))
}

#[derive(Deserialize)]
struct CancelQuery {
    #[serde(default)]
    force: bool,
}

async fn admin_cancel(
    State(core): State<Shared>,
    Path(id): Path<i64>,
    Query(q): Query<CancelQuery>,
) -> Result<Json<RunView>, ApiError> {
    Ok(Json(core.cancel(id, q.force)?))
}

async fn admin_instances(State(core): State<Shared>) -> Json<Vec<InstanceView>> {
    Json(core.instances())
}

async fn admin_revoke(
    State(core): State<Shared>,
    Path(id): Path<i64>,
) -> Result<Json<InstanceView>, ApiError> {
    Ok(Json(core.revoke_instance(id)?))
}

async fn admin_harness(State(core): State<Shared>, body: Bytes) -> Result<Json<Harness>, ApiError> {
    let h: Harness = admin_json(&body)?;
    core.set_harness(h.enabled)?;
    Ok(Json(h))
}

async fn admin_faults_get(State(core): State<Shared>) -> Json<Faults> {
    Json(
        core.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    )
}

async fn admin_faults_put(
    State(core): State<Shared>,
    body: Bytes,
) -> Result<Json<Faults>, ApiError> {
    let f: Faults = admin_json(&body)?;
    for p in [
        f.error_5xx_probability,
        f.rate_429_probability,
        f.drop_connection_probability,
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::bad_request(
                "probabilities must be between 0 and 1",
            ));
        }
    }
    *core.faults.lock().unwrap_or_else(|e| e.into_inner()) = f.clone();
    Ok(Json(f))
}

async fn admin_reap(State(core): State<Shared>) -> Result<Json<Vec<i64>>, ApiError> {
    Ok(Json(core.reap()?))
}
