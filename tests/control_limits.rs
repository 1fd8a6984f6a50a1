//! Response bodies are read with a cap (16 MiB for a claim answer, which carries the prompt;
//! 1 MiB for every other call), incrementally: a tiny HTTP server streams oversized bodies,
//! with and without a declared length, and counts how much of them the client took.

#[path = "control_support/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use windshift_runner::control::client::{ControlError, MAX_BODY_BYTES, MAX_CLAIM_BODY_BYTES};

/// How a response body is sent.
#[derive(Clone, Copy)]
enum Body {
    /// A claim answer whose prompt has this many bytes, length declared.
    ClaimWithPrompt(usize),
    /// This many bytes of JSON-looking junk, streamed with no length (read until close).
    Stream(usize),
    /// A declared length this large, then junk until the client goes away.
    Declared(usize),
}

/// Answers every request with `status` and `body`; returns the URL and the body bytes the
/// server managed to write (the client stopped reading where it falls short).
async fn server(status: &'static str, body: Body) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let w = w.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|x| x == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let (len, total, prefix): (Option<usize>, usize, Vec<u8>) = match body {
                    Body::ClaimWithPrompt(n) => {
                        let j = format!(
                            r#"{{"job":{{"run_id":5,"initial_prompt":"{}"}}}}"#,
                            "p".repeat(n)
                        );
                        (Some(j.len()), j.len(), j.into_bytes())
                    }
                    Body::Stream(n) => (None, n, b"{\"job\":{\"initial_prompt\":\"".to_vec()),
                    Body::Declared(n) => (Some(n), n, b"{\"x\":\"".to_vec()),
                };
                let mut head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
                );
                if let Some(len) = len {
                    head.push_str(&format!("content-length: {len}\r\n"));
                }
                head.push_str("\r\n");
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let filler = vec![b'a'; 64 * 1024];
                let mut sent = 0usize;
                let mut first = prefix.as_slice();
                while sent < total {
                    let piece = if first.is_empty() {
                        &filler[..filler.len().min(total - sent)]
                    } else {
                        std::mem::take(&mut first)
                    };
                    if s.write_all(piece).await.is_err() {
                        break;
                    }
                    sent += piece.len();
                    w.store(sent as u64, Ordering::SeqCst);
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/api"), written)
}

fn too_large(e: &ControlError, want_limit: usize) {
    match e {
        ControlError::BodyTooLarge { limit, .. } => assert_eq!(*limit, want_limit),
        other => panic!("want BodyTooLarge, got {other:?}"),
    }
    assert!(
        e.to_string()
            .contains(&format!("answered with a body over {want_limit} bytes")),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_answer_with_a_large_prompt_is_read_in_full() {
    let (url, _) = server("200 OK", Body::ClaimWithPrompt(3 << 20)).await;
    let c = client_no_retry(&url);
    c.set_credential("wsrc_limits0123456789");
    let job = c
        .claim()
        .await
        .expect("a 3 MiB prompt fits")
        .expect("a job");
    assert_eq!(job.initial_prompt.len(), 3 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_claim_answer_is_cut_at_16_mib_and_counted_as_lost() {
    let total = 256 << 20;
    let (url, written) = server("200 OK", Body::Stream(total)).await;
    let c = client_no_retry(&url);
    c.set_credential("wsrc_limits0123456789");
    let e = tokio::time::timeout(Duration::from_secs(60), c.claim())
        .await
        .expect("the claim ends")
        .unwrap_err();
    too_large(&e, MAX_CLAIM_BODY_BYTES);
    // The server may hold a run we could not read: the daemon yields its lease for it.
    assert_eq!(c.counters().lost_claim_answers.load(Ordering::SeqCst), 1);
    // The client stopped reading near the cap (socket buffers hold a few MiB more).
    wait_until("the server notices", Duration::from_secs(20), || {
        written.load(Ordering::SeqCst) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = written.load(Ordering::SeqCst) as usize;
    assert!(took < 64 << 20, "the server wrote {took} bytes of {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_answers_are_capped_at_1_mib_declared_or_streamed() {
    for body in [Body::Declared(2 << 20), Body::Stream(2 << 20)] {
        let (url, _) = server("200 OK", body).await;
        let c = client_no_retry(&url);
        c.set_credential("wsrc_limits0123456789");
        let e = c.heartbeat().await.unwrap_err();
        too_large(&e, MAX_BODY_BYTES);
        let e = c
            .report(1, &Default::default())
            .await
            .expect_err("result answer too large");
        too_large(&e, MAX_BODY_BYTES);
        let e = c.preflight().await.unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("answered with a body over {MAX_BODY_BYTES} bytes")),
            "{e}"
        );
    }
    // A claim answer may be bigger than 1 MiB, not bigger than 16 MiB.
    let (url, _) = server("200 OK", Body::Declared(MAX_CLAIM_BODY_BYTES + 1)).await;
    let c = client_no_retry(&url);
    c.set_credential("wsrc_limits0123456789");
    too_large(&c.claim().await.unwrap_err(), MAX_CLAIM_BODY_BYTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_error_answer_still_reports_its_status() {
    let (url, _) = server("503 Service Unavailable", Body::Stream(8 << 20)).await;
    let c = client_no_retry(&url);
    c.set_credential("wsrc_limits0123456789");
    let e = c.heartbeat().await.unwrap_err();
    assert_eq!(e.status(), Some(503), "{e:?}");
}
