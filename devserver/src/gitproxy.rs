//! The git smart-HTTP proxy (spec 2.9) in front of local bare repositories, driving
//! `git http-backend` as a CGI program.
//!
//! Auth is the run token (Basic password, else Basic username, else Bearer). The token must be
//! bound to a `running` run that holds a grant for the repo; pushes may update only the run's
//! granted ref, checked on the receive-pack command list before git sees the pack.

use std::process::Stdio;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use tokio::io::AsyncWriteExt;

use crate::core::{ApiError, Core, STATUS_RUNNING};

/// Bodies are capped (upstream: 2 GiB; the devserver buffers bodies, so it stays smaller).
const MAX_GIT_BODY: usize = 512 * 1024 * 1024;

fn unauthorized(msg: &str) -> Response {
    let mut resp = ApiError::unauthorized(msg).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"windshift-git-proxy\""),
    );
    resp
}

/// The run token from the request: Basic password, else Basic username, else Bearer.
fn token_from(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':').unwrap_or((text.as_str(), ""));
        let t = if !pass.is_empty() { pass } else { user };
        (!t.is_empty()).then(|| t.to_string())
    } else if scheme.eq_ignore_ascii_case("bearer") {
        (!rest.is_empty()).then(|| rest.to_string())
    } else {
        None
    }
}

/// Ref names a receive-pack request wants to update (the pkt-line command list before the
/// flush packet). `None` when the list is malformed.
pub fn receive_pack_refs(body: &[u8]) -> Option<Vec<String>> {
    let mut refs = Vec::new();
    let mut pos = 0;
    loop {
        let len_hex = body.get(pos..pos + 4)?;
        let len = usize::from_str_radix(std::str::from_utf8(len_hex).ok()?, 16).ok()?;
        if len == 0 {
            return Some(refs);
        }
        if len < 4 {
            return None;
        }
        let line = body.get(pos + 4..pos + len)?;
        pos += len;
        let line = line.split(|b| *b == 0).next().unwrap_or(line);
        let text = std::str::from_utf8(line).ok()?.trim_end_matches('\n');
        if text.starts_with("shallow ") {
            continue;
        }
        if text == "push-cert" || text.starts_with("push-cert") {
            // Signed pushes carry their own block; the devserver refuses them rather than
            // parse a second format.
            return None;
        }
        let mut parts = text.splitn(3, ' ');
        let (_old, _new, name) = (parts.next()?, parts.next()?, parts.next()?);
        refs.push(name.to_string());
    }
}

pub async fn handle(
    State(core): State<Arc<Core>>,
    Path((_ws, owner, repo, tail)): Path<(String, String, String, String)>,
    req: Request,
) -> Response {
    match handle_inner(core, owner, repo, tail, req).await {
        Ok(r) => r,
        Err(r) => r,
    }
}

async fn handle_inner(
    core: Arc<Core>,
    owner: String,
    repo: String,
    tail: String,
    req: Request,
) -> Result<Response, Response> {
    core.check_harness().map_err(IntoResponse::into_response)?;
    let tail = tail.trim_start_matches('/').to_string();
    let service_ok = matches!(
        tail.as_str(),
        "info/refs" | "git-upload-pack" | "git-receive-pack"
    );
    if !service_ok {
        return Err(ApiError::not_found("unsupported git path").into_response());
    }
    let token = token_from(req.headers()).ok_or_else(|| unauthorized("missing run token"))?;
    let (run_id, status, grants) = match core.run_for_token(&token) {
        Some(r) => r,
        // A token that was never minted (or belongs to nothing) is an auth failure.
        None => return Err(unauthorized("invalid run token")),
    };
    if status != STATUS_RUNNING {
        return Err(ApiError::forbidden("agent run is not running").into_response());
    }
    let repo_name = repo.trim_end_matches(".git").to_string();
    let slug = format!("{owner}/{repo_name}");
    let Some(grant) = grants.iter().find(|g| g.slug == slug) else {
        return Err(
            ApiError::forbidden(format!("run has no git grant for {slug}")).into_response(),
        );
    };
    if !core.repo_exists(&slug) {
        return Err(ApiError::not_found(format!("repository {slug} not found")).into_response());
    }
    let granted_branch = if grant.continue_branch.is_empty() {
        format!("agent-runs/run-{run_id}")
    } else {
        grant.continue_branch.clone()
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), MAX_GIT_BODY)
        .await
        .map_err(|_| ApiError::bad_request("git request body too large").into_response())?;
    if tail == "git-receive-pack" {
        if method != Method::POST {
            return Err(ApiError::bad_request("receive-pack needs POST").into_response());
        }
        if headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity")
        {
            return Err(
                ApiError::bad_request("compressed push bodies are not supported").into_response(),
            );
        }
        let refs = receive_pack_refs(&body).ok_or_else(|| {
            ApiError::bad_request("malformed receive-pack command list").into_response()
        })?;
        if core.is_test_run(run_id) {
            return Err(
                ApiError::forbidden("this run has no push grant (ephemeral test run)")
                    .into_response(),
            );
        }
        let allowed = format!("refs/heads/{granted_branch}");
        if let Some(bad) = refs.iter().find(|r| **r != allowed) {
            return Err(ApiError::forbidden(format!(
                "push to {bad} is not allowed: this run may push only {allowed}"
            ))
            .into_response());
        }
    }
    let is_push = tail == "git-receive-pack";
    let answer = run_backend(&core, &method, &slug, &tail, &query, &headers, body, run_id)
        .await
        .map_err(IntoResponse::into_response)?;
    if is_push {
        core.pushes_served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(answer)
}

#[allow(clippy::too_many_arguments)]
async fn run_backend(
    core: &Core,
    method: &Method,
    slug: &str,
    tail: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
    run_id: i64,
) -> Result<Response, ApiError> {
    let mut cmd = tokio::process::Command::new(&core.cfg.git_bin);
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &core.cfg.data_dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &core.repos_dir)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{slug}.git/{tail}"))
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", query)
        // An authenticated REMOTE_USER is what enables receive-pack in http-backend.
        .env("REMOTE_USER", format!("run-{run_id}"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        cmd.env("CONTENT_TYPE", ct);
    }
    if let Some(ce) = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        cmd.env("HTTP_CONTENT_ENCODING", ce);
    }
    if let Some(gp) = headers.get("git-protocol").and_then(|v| v.to_str().ok()) {
        cmd.env("GIT_PROTOCOL", gp);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| ApiError::internal(format!("cannot run git http-backend: {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| ApiError::internal("no stdin for git http-backend"))?;
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
        let _ = stdin.shutdown().await;
    });
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| ApiError::internal(format!("git http-backend failed: {e}")))?;
    let _ = writer.await;
    parse_cgi(&out.stdout).ok_or_else(|| {
        ApiError::internal(format!(
            "git http-backend gave no valid answer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })
}

/// Turns CGI output (headers, blank line, body) into a response.
fn parse_cgi(out: &[u8]) -> Option<Response> {
    let (head_end, body_start) = if let Some(i) = find(out, b"\r\n\r\n") {
        (i, i + 4)
    } else {
        let i = find(out, b"\n\n")?;
        (i, i + 2)
    };
    let head = std::str::from_utf8(&out[..head_end]).ok()?;
    let mut status = StatusCode::OK;
    let mut builder = Response::builder();
    for line in head.lines() {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.split_whitespace().next()?.parse().ok()?;
            status = StatusCode::from_u16(code).ok()?;
        } else {
            builder = builder.header(name.trim(), value);
        }
    }
    builder
        .status(status)
        .body(Body::from(out[body_start..].to_vec()))
        .ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &str) -> String {
        format!("{:04x}{s}", s.len() + 4)
    }

    #[test]
    fn receive_pack_command_list_is_parsed() {
        let z = "0".repeat(40);
        let body = format!(
            "{}{}0000PACK...",
            pkt(&format!(
                "{z} {} refs/heads/agent-runs/run-1\0report-status\n",
                "1".repeat(40)
            )),
            pkt(&format!("{z} {} refs/heads/main\n", "2".repeat(40))),
        );
        assert_eq!(
            receive_pack_refs(body.as_bytes()),
            Some(vec![
                "refs/heads/agent-runs/run-1".to_string(),
                "refs/heads/main".to_string()
            ])
        );
    }

    #[test]
    fn malformed_command_list_is_refused() {
        assert_eq!(receive_pack_refs(b"zzzz"), None);
        assert_eq!(receive_pack_refs(b"0009ab"), None);
    }

    #[test]
    fn tokens_come_from_basic_password_then_user_then_bearer() {
        let mut h = HeaderMap::new();
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {}", enc("oauth2:tok1")).parse().unwrap(),
        );
        assert_eq!(token_from(&h).as_deref(), Some("tok1"));
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {}", enc("tok2:")).parse().unwrap(),
        );
        assert_eq!(token_from(&h).as_deref(), Some("tok2"));
        h.insert(header::AUTHORIZATION, "bearer tok3".parse().unwrap());
        assert_eq!(token_from(&h).as_deref(), Some("tok3"));
    }
}
