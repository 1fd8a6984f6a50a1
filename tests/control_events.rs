//! The event sender against the devserver's rate limiter: nothing lost, order kept, content
//! merged under backlog, sending stops at 409.

#[path = "control_support/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use windshift_runner::control::wire::{EventRequest, ReportRequest, STATUS_SUCCEEDED};
use windshift_runner::control::{Client, EventSender, EventSenderConfig, RateLimit};

fn paced_client(url: &str, per_sec: f64, burst: f64) -> Client {
    let mut cfg = config(url);
    cfg.rate = RateLimit { per_sec, burst };
    cfg.retry = windshift_runner::control::RetryPolicy::new(
        Duration::from_millis(20),
        Duration::from_millis(500),
        Duration::from_secs(60),
    );
    Client::new(cfg).unwrap()
}

fn seq_events(core: &windshift_devserver::Core, run: i64, event_type: &str) -> Vec<i64> {
    core.events(run)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == event_type)
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.payload_json).unwrap();
            v["seq"].as_i64().unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_5000_events_arrives_complete_and_in_order() {
    // Server and client share the limit shape (raised from 20/s so the test stays short).
    let ts = TestServer::start_with(|c| {
        c.rate_per_sec = 1000.0;
        c.rate_burst = 100.0;
    })
    .await;
    let pool = ts.pool(0);
    let client = paced_client(&ts.api_url(), 1000.0, 100.0);
    let r = client.register(&ts.token(pool), "burst").await.unwrap();
    client.set_credential(&r.credential);
    let run = ts.enqueue(pool);
    client.claim().await.unwrap().unwrap();
    let sender = EventSender::new(client.clone(), EventSenderConfig::default());
    let stream = sender.open_run(run);
    for seq in 0..5000 {
        stream
            .send(EventRequest {
                event_type: "tool_done".into(),
                payload_json: format!(r#"{{"seq":{seq}}}"#),
            })
            .await;
    }
    let summary = stream.finish().await;
    assert_eq!(summary.stopped, None);
    let got = seq_events(ts.server.core(), run, "tool_done");
    assert_eq!(got, (0..5000).collect::<Vec<_>>());
    let counts = sender.counters();
    assert_eq!(counts.sent, 5000);
    assert_eq!(
        (counts.failed, counts.rejected, counts.dropped_after_409),
        (0, 0, 0)
    );
    ts.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_faster_than_the_server_recovers_from_429s_without_loss() {
    let ts = TestServer::start_with(|c| {
        c.rate_per_sec = 100.0;
        c.rate_burst = 10.0;
    })
    .await;
    let pool = ts.pool(0);
    let client = paced_client(&ts.api_url(), 100_000.0, 100_000.0);
    let r = client.register(&ts.token(pool), "fast").await.unwrap();
    client.set_credential(&r.credential);
    let run = ts.enqueue(pool);
    client.claim().await.unwrap().unwrap();
    let sender = EventSender::new(client.clone(), EventSenderConfig::default());
    let stream = sender.open_run(run);
    for seq in 0..60 {
        stream
            .send(EventRequest {
                event_type: "tool_start".into(),
                payload_json: format!(r#"{{"seq":{seq}}}"#),
            })
            .await;
    }
    stream.finish().await;
    assert_eq!(
        seq_events(ts.server.core(), run, "tool_start"),
        (0..60).collect::<Vec<_>>()
    );
    assert!(
        client
            .counters()
            .throttled_429
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the server's limiter was hit"
    );
    ts.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_backlog_is_merged_not_dropped_and_409_stops_the_run() {
    let ts = TestServer::start_with(|c| {
        c.rate_per_sec = 1000.0;
        c.rate_burst = 100.0;
    })
    .await;
    let pool = ts.pool(0);
    // A slow client (50/s) makes a backlog form.
    let client = paced_client(&ts.api_url(), 50.0, 5.0);
    let r = client.register(&ts.token(pool), "merge").await.unwrap();
    client.set_credential(&r.credential);
    let run = ts.enqueue(pool);
    client.claim().await.unwrap().unwrap();
    let sender = EventSender::new(
        client.clone(),
        EventSenderConfig {
            merge_backlog: 10,
            ..Default::default()
        },
    );
    let stream = sender.open_run(run);
    let mut expected = String::new();
    for i in 0..400 {
        let text = format!("w{i} \"q\"\n");
        expected.push_str(&text);
        let line = serde_json::json!({"type":"content","text":text}).to_string();
        stream
            .send(EventRequest {
                event_type: "stdout".into(),
                payload_json: line,
            })
            .await;
    }
    let delivery = stream.delivery();
    stream.finish().await;
    // Merged sends count one by one: every call was answered.
    assert_eq!((delivery.accepted(), delivery.completed()), (400, 400));
    let stored: Vec<_> = ts
        .server
        .core()
        .events(run)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "stdout")
        .collect();
    let joined: String = stored
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.payload_json).unwrap();
            assert_eq!(v["type"], "content");
            v["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(joined, expected, "every character arrives, in order");
    let counts = sender.counters();
    assert!(counts.merged > 0, "{counts:?}");
    assert_eq!(counts.sent as usize, stored.len());
    assert_eq!(counts.sent + counts.merged, 400);

    // After the result the server answers 409: the stream stops and counts what it skipped.
    client
        .report(
            run,
            &ReportRequest {
                status: STATUS_SUCCEEDED.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let late = sender.open_run(run);
    for seq in 0..5 {
        late.send(EventRequest {
            event_type: "tool_done".into(),
            payload_json: format!(r#"{{"seq":{seq}}}"#),
        })
        .await;
    }
    let late_delivery = late.delivery();
    let summary = late.finish().await;
    assert!(summary.stopped.unwrap().contains("409"));
    assert_eq!(
        (late_delivery.accepted(), late_delivery.completed()),
        (5, 5),
        "refused for good counts as answered"
    );
    let counts = sender.counters();
    assert_eq!(counts.dropped_after_409, 5);
    assert!(seq_events(ts.server.core(), run, "tool_done").is_empty());
    ts.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_stream_says_exactly_how_many_events_the_server_has() {
    let ts = TestServer::start_with(|c| {
        c.rate_per_sec = 1000.0;
        c.rate_burst = 100.0;
    })
    .await;
    let pool = ts.pool(0);
    // A slow client (20/s) keeps most of the events queued.
    let client = paced_client(&ts.api_url(), 20.0, 1.0);
    let r = client.register(&ts.token(pool), "halt").await.unwrap();
    client.set_credential(&r.credential);
    let run = ts.enqueue(pool);
    client.claim().await.unwrap().unwrap();
    let sender = EventSender::new(client.clone(), EventSenderConfig::default());
    let stream = sender.open_run(run);
    for seq in 0..60 {
        stream
            .send(EventRequest {
                event_type: "tool_done".into(),
                payload_json: format!(r#"{{"seq":{seq}}}"#),
            })
            .await;
    }
    let delivery = stream.delivery();
    assert_eq!(delivery.accepted(), 60);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while delivery.completed() < 5 {
        assert!(std::time::Instant::now() < deadline, "no event delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    delivery.halt(Duration::from_secs(10)).await;
    let completed = delivery.completed();
    assert!(completed < 60, "halted before the end ({completed})");
    // Nothing more goes out once halted, and the count is exactly what the server stored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(delivery.completed(), completed);
    let got = seq_events(ts.server.core(), run, "tool_done");
    assert_eq!(got, (0..completed as i64).collect::<Vec<_>>());
    ts.server.stop().await;
}
