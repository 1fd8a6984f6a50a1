//! Shared helpers for the control-plane integration tests: an in-process devserver with a
//! private data directory, and clients with short retry budgets.
#![allow(dead_code)]

use std::time::Duration;

use tempfile::TempDir;
use windshift_devserver::types::{CreatePool, EnqueueRun, MintToken};
use windshift_devserver::{DevServer, DevServerConfig, RunningDevServer};
use windshift_runner::control::{Client, ClientConfig, RateLimit, RetryPolicy};

pub struct TestServer {
    pub server: RunningDevServer,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut DevServerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = DevServerConfig::new(dir.path().join("devserver"));
        cfg.register_burst = 1000.0;
        tune(&mut cfg);
        let server = DevServer::start(cfg).await.expect("devserver starts");
        Self { server, dir }
    }

    pub fn api_url(&self) -> String {
        self.server.api_url()
    }

    pub fn pool(&self, max_concurrent_runs: i64) -> i64 {
        self.server
            .core()
            .create_pool(&CreatePool {
                name: "test".into(),
                max_concurrent_runs,
            })
            .expect("pool")
            .id
    }

    pub fn token(&self, pool: i64) -> String {
        self.server
            .core()
            .mint_token(pool, &MintToken::default())
            .expect("token")
            .token
    }

    pub fn enqueue(&self, pool: i64) -> i64 {
        self.server
            .core()
            .enqueue(&EnqueueRun {
                pool_id: pool,
                prompt: "do it".into(),
                image: "agent:test".into(),
                ..Default::default()
            })
            .expect("enqueue")
            .id
    }

    /// A client with a credential registered in a fresh pool (unlimited).
    pub async fn registered(&self) -> (Client, i64, i64) {
        let pool = self.pool(0);
        let (client, instance) = self.register_in(pool).await;
        (client, pool, instance)
    }

    pub async fn register_in(&self, pool: i64) -> (Client, i64) {
        let client = client(&self.api_url());
        let resp = client
            .register(&self.token(pool), "test-runner")
            .await
            .expect("register");
        client.set_credential(&resp.credential);
        (client, resp.instance_id)
    }
}

pub fn config(url: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(url);
    cfg.allow_insecure = true;
    let quick = RetryPolicy::new(
        Duration::from_millis(20),
        Duration::from_millis(200),
        Duration::from_secs(10),
    );
    cfg.retry = quick;
    cfg.heartbeat_retry = quick;
    cfg.result_retry = quick;
    cfg.register_retry = quick;
    cfg
}

pub fn client(url: &str) -> Client {
    Client::new(config(url)).expect("client")
}

/// A client that never retries, to observe each status code as the server sends it.
pub fn client_no_retry(url: &str) -> Client {
    let mut cfg = config(url);
    cfg.retry = RetryPolicy::NONE;
    cfg.heartbeat_retry = RetryPolicy::NONE;
    cfg.result_retry = RetryPolicy::NONE;
    cfg.register_retry = RetryPolicy::NONE;
    cfg.rate = RateLimit {
        per_sec: 100_000.0,
        burst: 100_000.0,
    };
    Client::new(cfg).expect("client")
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
