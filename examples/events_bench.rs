//! Events under the server's rate limit (docs/PERFORMANCE.md, "Events"): an agent that writes
//! 10,000 `content` lines at once, sent through the runner's event sender (the same client,
//! pacing, ordering and merging the daemon uses) to the devserver, whose limit is upstream's
//! 20 requests/s (burst 100). Checks that the text the server stored is every line, in order,
//! and reports the time to drain, the requests made and the merges done.
//!
//! `cargo run --release --example events_bench -- [EVENTS] [ROUNDS]` (defaults 10000, 3).

use std::time::{Duration, Instant};

use windshift_devserver::types::{CreatePool, EnqueueRun, MintToken};
use windshift_devserver::{DevServer, DevServerConfig};
use windshift_runner::control::wire::EventRequest;
use windshift_runner::control::{Client, ClientConfig, EventSender, EventSenderConfig};

fn line(i: usize) -> String {
    format!("line {i:05}\n")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(3);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dev = DevServer::start(DevServerConfig::new(tmp.path().join("dev")))
        .await
        .expect("devserver");
    let core = dev.core().clone();
    println!("{events} content events per round, server limit 20 req/s burst 100, {rounds} rounds");
    let mut drains = Vec::new();
    for round in 0..rounds {
        // A fresh pool and instance per round: the rate bucket starts full each time.
        let pool = core
            .create_pool(&CreatePool {
                name: format!("bench-{round}"),
                max_concurrent_runs: 0,
            })
            .expect("pool");
        let token = core
            .mint_token(pool.id, &MintToken::default())
            .expect("token")
            .token;
        let mut cfg = ClientConfig::new(dev.api_url());
        cfg.allow_insecure = true;
        let client = Client::new(cfg).expect("client");
        let reg = client
            .register(&token, &format!("bench-{round}"))
            .await
            .expect("register");
        client.set_credential(&reg.credential);
        let run = core
            .enqueue(&EnqueueRun {
                pool_id: pool.id,
                prompt: "events".into(),
                ..Default::default()
            })
            .expect("enqueue");
        let job = client.claim().await.expect("claim").expect("a job");
        assert_eq!(job.run_id, run.id);

        let sender = EventSender::new(client.clone(), EventSenderConfig::default());
        let stream = sender.open_run(run.id);
        let t = Instant::now();
        for i in 0..events {
            // What the driver forwards for one agent line: a `stdout` event, the line verbatim.
            let payload = serde_json::json!({"type": "content", "text": line(i)}).to_string();
            stream
                .send(EventRequest {
                    event_type: "stdout".into(),
                    payload_json: payload,
                })
                .await;
        }
        let queued = t.elapsed();
        let summary = stream.finish().await;
        let drained = t.elapsed();
        assert_eq!(
            summary.stopped, None,
            "the server accepted the run's events"
        );

        // None lost, none reordered: the stored texts concatenate to every line in order.
        let stored = core.events(run.id).expect("events");
        let texts: Vec<String> = stored
            .iter()
            .filter(|e| e.event_type == "stdout")
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.payload_json).ok())
            .filter_map(|v| v.get("text")?.as_str().map(str::to_owned))
            .collect();
        let expected: String = (0..events).map(line).collect();
        let got: String = texts.concat();
        assert!(
            got == expected,
            "stored text differs: {} bytes stored, {} expected",
            got.len(),
            expected.len()
        );
        let counts = sender.counters();
        println!(
            "round {round}: queued in {:.2} s, drained in {:.2} s; {} requests stored, {} merges, none lost (text identical, {} bytes)",
            queued.as_secs_f64(),
            drained.as_secs_f64(),
            texts.len(),
            counts.merged,
            got.len()
        );
        drains.push(drained);
    }
    drains.sort();
    let unmerged = Duration::from_secs_f64((events as f64 - 100.0).max(0.0) / 20.0);
    println!(
        "median drain {:.2} s (sending each event as its own request would take {:.0} s at 20 req/s)",
        drains[drains.len() / 2].as_secs_f64(),
        unmerged.as_secs_f64()
    );
    dev.stop().await;
}
