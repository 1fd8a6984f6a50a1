//! The floor for the idle-footprint benchmark (docs/PERFORMANCE.md, "Idle footprint"): the
//! least a runner can be while idle — a tokio + reqwest program (same TLS features as the
//! runner) that registers, then polls `POST /runner/claim` and `POST /runner/heartbeat` at the
//! given intervals, and does nothing else.
//!
//! `WS_API_URL=… FLOOR_TOKEN=wsrt_… cargo run --release --example idle_floor -- [POLL_MS] [HEARTBEAT_MS]`

use std::time::Duration;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let poll_ms: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let heartbeat_ms: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let (Ok(api), Ok(token)) = (std::env::var("WS_API_URL"), std::env::var("FLOOR_TOKEN")) else {
        eprintln!("idle_floor: set WS_API_URL and FLOOR_TOKEN (a registration token)");
        std::process::exit(2);
    };
    let http = reqwest::Client::new();
    let reg: serde_json::Value = match http
        .post(format!("{api}/runner/register"))
        .json(&serde_json::json!({"registration_token": token, "name": "idle-floor"}))
        .send()
        .await
    {
        Ok(resp) => resp.json().await.unwrap_or_default(),
        Err(e) => {
            eprintln!("idle_floor: register failed: {e}");
            std::process::exit(1);
        }
    };
    let Some(cred) = reg
        .get("credential")
        .and_then(|c| c.as_str())
        .map(str::to_owned)
    else {
        eprintln!("idle_floor: register answered without a credential");
        std::process::exit(1);
    };
    let mut poll = tokio::time::interval(Duration::from_millis(poll_ms));
    let mut beat = tokio::time::interval(Duration::from_millis(heartbeat_ms));
    loop {
        let path = tokio::select! {
            _ = poll.tick() => "claim",
            _ = beat.tick() => "heartbeat",
        };
        let _ = http
            .post(format!("{api}/runner/{path}"))
            .bearer_auth(&cred)
            .send()
            .await
            .map(|r| r.bytes());
    }
}
