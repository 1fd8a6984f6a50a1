//! Wire shapes, field by field: the requests the client sends (captured by a bare TCP server)
//! and the responses the devserver returns (read as raw JSON), against spec sections 2 and 3.

#[path = "control_support/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use windshift_runner::control::wire::*;

#[derive(Debug, Clone)]
struct Captured {
    head: String,
    body: Vec<u8>,
}

impl Captured {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Answers every request with `answer` (status line + JSON) and records it.
async fn capture_server(answer: &'static str) -> (String, Arc<Mutex<Vec<Captured>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let head_end = loop {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i);
                }
            };
            let Some(i) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            let mut body = buf[i + 4..].to_vec();
            while body.len() < len {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            seen2.lock().unwrap().push(Captured { head, body });
            let (status, json) = answer.split_once('|').unwrap();
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                json.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    (format!("http://{addr}/api"), seen)
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_and_heartbeat_send_no_body_and_a_bearer_credential() {
    let (url, seen) = capture_server("200 OK|{\"job\":null,\"abort\":[],\"queue_depth\":0}").await;
    let c = client_no_retry(&url);
    c.set_credential("wsrc_abc123");
    assert_eq!(c.claim().await.unwrap(), None);
    c.heartbeat().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen[0].head.starts_with("POST /api/runner/claim HTTP/1.1"),
        "{}",
        seen[0].head
    );
    assert!(seen[1]
        .head
        .starts_with("POST /api/runner/heartbeat HTTP/1.1"));
    for req in &seen {
        assert_eq!(
            req.header("authorization").as_deref(),
            Some("Bearer wsrc_abc123")
        );
        assert!(req.body.is_empty());
        assert_eq!(req.header("content-type"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_events_and_result_bodies_match_the_spec() {
    let (url, seen) = capture_server(
        "200 OK|{\"ok\":true,\"credential\":\"wsrc_x\",\"instance_id\":1,\"pool_id\":2}",
    )
    .await;
    let c = client_no_retry(&url);
    c.register("wsrt_tok", "host-1").await.unwrap();
    c.register("wsrt_tok", "").await.unwrap();
    c.set_credential("wsrc_cred");
    c.send_event(
        7,
        &EventRequest {
            event_type: "stdout".into(),
            payload_json: r#"{"type":"content","text":"hi"}"#.into(),
        },
    )
    .await
    .unwrap();
    c.report(
        7,
        &ReportRequest {
            status: STATUS_SUCCEEDED.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.report(
        7,
        &ReportRequest {
            status: STATUS_SUCCEEDED.into(),
            branch: "agent-runs/run-7".into(),
            base_commit: "c".repeat(40),
            summary: "s".into(),
            repos: vec![
                RepoResult {
                    repo_slug: "a/b".into(),
                    branch: "agent-runs/run-7".into(),
                    base_commit: "c".repeat(40),
                },
                RepoResult {
                    repo_slug: "a/c".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    // register: unauthenticated, JSON, name omitted when empty.
    assert!(seen[0].head.starts_with("POST /api/runner/register "));
    assert_eq!(seen[0].header("authorization"), None);
    assert_eq!(
        seen[0].header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        seen[0].json(),
        serde_json::json!({"registration_token":"wsrt_tok","name":"host-1"})
    );
    assert_eq!(keys(&seen[1].json()), vec!["registration_token"]);
    // events: type + payload_json as a string (JSON text, not an object).
    assert!(seen[2].head.starts_with("POST /api/runner/runs/7/events "));
    let ev = seen[2].json();
    assert_eq!(keys(&ev), vec!["payload_json", "type"]);
    assert!(ev["payload_json"].is_string());
    assert_eq!(
        seen[2].header("authorization").as_deref(),
        Some("Bearer wsrc_cred")
    );
    // result: empty fields omitted; repos entries without changes carry only repo_slug.
    assert!(seen[3].head.starts_with("POST /api/runner/runs/7/result "));
    assert_eq!(seen[3].json(), serde_json::json!({"status":"succeeded"}));
    let full = seen[4].json();
    assert_eq!(
        keys(&full),
        vec!["base_commit", "branch", "repos", "status", "summary"]
    );
    assert_eq!(
        keys(&full["repos"][0]),
        vec!["base_commit", "branch", "repo_slug"]
    );
    assert_eq!(full["repos"][1], serde_json::json!({"repo_slug":"a/c"}));
}

#[tokio::test]
async fn devserver_responses_have_the_spec_shapes() {
    let ts = TestServer::start().await;
    let pool = ts.pool(0);
    let http = reqwest::Client::new();
    let api = ts.api_url();
    // /version
    let v: Value = http
        .get(format!("{api}/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()));
    // register: 201, credential string wsrc_+64 hex, ints.
    let resp = http
        .post(format!("{api}/runner/register"))
        .json(&serde_json::json!({"registration_token": ts.token(pool), "name":"<i>n</i>"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let reg: Value = resp.json().await.unwrap();
    assert_eq!(keys(&reg), vec!["credential", "instance_id", "pool_id"]);
    let cred = reg["credential"].as_str().unwrap().to_string();
    assert!(
        cred.starts_with("wsrc_")
            && cred[5..].len() == 64
            && cred[5..].bytes().all(|b| b.is_ascii_hexdigit())
    );
    assert!(reg["instance_id"].is_i64() && reg["pool_id"].as_i64() == Some(pool));
    let name = ts.server.core().instances()[0].name.clone();
    assert_eq!(name, "n", "HTML is stripped from the name");
    // claim with no work: exactly {"job": null}.
    let claim: Value = http
        .post(format!("{api}/runner/claim"))
        .bearer_auth(&cred)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(claim, serde_json::json!({"job": null}));
    // heartbeat: abort omitted when empty, queue_depth an int.
    let run = ts.enqueue(pool);
    let hb: Value = http
        .post(format!("{api}/runner/heartbeat"))
        .header("authorization", format!("  BEARER {cred} "))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hb, serde_json::json!({"queue_depth": 1}));
    // claim with a job: run_id int; env object of strings; omitted workspace_path; repo/repos
    // absent for a run without repos.
    let claim: Value = http
        .post(format!("{api}/runner/claim"))
        .bearer_auth(&cred)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = &claim["job"];
    assert_eq!(job["run_id"].as_i64(), Some(run));
    assert_eq!(keys(job), vec!["env", "image", "initial_prompt", "run_id"]);
    assert!(job["env"]
        .as_object()
        .unwrap()
        .values()
        .all(Value::is_string));
    // events ok body and error body shape.
    let ok: Value = http
        .post(format!("{api}/runner/runs/{run}/events"))
        .bearer_auth(&cred)
        .json(&serde_json::json!({"type":"x","payload_json":"{}"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ok, serde_json::json!({"ok": true}));
    let resp = http
        .post(format!("{api}/runner/runs/999/events"))
        .bearer_auth(&cred)
        .json(&serde_json::json!({"type":"x","payload_json":"{}"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(keys(&err), vec!["code", "error", "request_id"]);
    assert_eq!(err["code"], "NOT_FOUND");
    assert!(err["error"].is_string());
    // The runner's own ErrorBody parses it (unknown fields would be ignored too).
    let parsed: ErrorBody = serde_json::from_value(err).unwrap();
    assert_eq!(parsed.code, "NOT_FOUND");
    ts.server.stop().await;
}
