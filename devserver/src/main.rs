//! `windshift-devserver`: serve the local control plane, or drive a running one through its
//! admin HTTP API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;
use windshift_devserver::types::*;
use windshift_devserver::{DevServer, DevServerConfig, TlsFiles};

#[derive(Parser, Debug)]
#[command(
    name = "windshift-devserver",
    version,
    about = "Local stand-in for the Windshift control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the runner protocol, the git proxy and the admin API.
    Serve(ServeArgs),
    /// Talk to a running devserver's admin API.
    Admin {
        /// Admin API base, e.g. http://127.0.0.1:8787/admin
        #[arg(
            long,
            env = "WSDEV_ADMIN_URL",
            default_value = "http://127.0.0.1:8787/admin"
        )]
        url: String,
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value = "./devserver-data")]
    data_dir: PathBuf,
    /// WS_API_URL put into job env (default: this server's own /api URL).
    #[arg(long)]
    public_api_url: Option<String>,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, default_value_t = 90)]
    liveness_secs: u64,
    #[arg(long, default_value_t = 60)]
    reaper_secs: u64,
    #[arg(long, default_value_t = 8 * 3600)]
    max_run_secs: u64,
    #[arg(long, default_value_t = 20.0)]
    rate_per_sec: f64,
    #[arg(long, default_value_t = 100.0)]
    rate_burst: f64,
    /// Add LLM_BASE_URL/LLM_API_KEY to job env.
    #[arg(long)]
    llm_proxy: bool,
}

#[derive(Subcommand, Debug)]
enum AdminAction {
    /// Create a runner pool.
    PoolCreate {
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value_t = 0)]
        max_concurrent_runs: i64,
    },
    /// List pools.
    Pools,
    /// Enable or disable a pool.
    PoolEnable {
        id: i64,
    },
    PoolDisable {
        id: i64,
    },
    /// Mint a single-use registration token (printed once).
    TokenMint {
        pool_id: i64,
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// Import a local git repository as owner/name behind the git proxy.
    RepoCreate {
        slug: String,
        path: String,
    },
    /// Enqueue a run.
    RunEnqueue {
        #[arg(long)]
        pool_id: i64,
        /// owner/name[@base_ref]; repeat for multi-repo runs.
        #[arg(long = "repo")]
        repos: Vec<String>,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value = "")]
        image: String,
        #[arg(long, default_value = "")]
        kind: String,
        /// KEY=VALUE; repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// An ephemeral test run: no push grant (spec 11).
        #[arg(long)]
        test_run: bool,
    },
    /// List runs.
    Runs,
    /// Show one run with its result.
    Run {
        id: i64,
    },
    /// Show a run's events.
    Events {
        id: i64,
    },
    /// Cancel a run (soft: abort via heartbeat; --force: also end it server-side).
    Cancel {
        id: i64,
        #[arg(long)]
        force: bool,
    },
    /// List runner instances.
    Instances,
    /// Revoke a runner instance's credential.
    Revoke {
        id: i64,
    },
    /// Switch the coding-agent harness on or off (off: every runner call answers 503).
    Harness {
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Set fault injection (all omitted values reset to 0).
    Faults {
        #[arg(long, default_value_t = 0.0)]
        error_5xx: f64,
        #[arg(long, default_value_t = 0.0)]
        rate_429: f64,
        #[arg(long, default_value_t = 0.0)]
        drop: f64,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Full outage for this many seconds from now.
        #[arg(long)]
        outage_secs: Option<u64>,
        /// Fault only requests whose path starts with this (e.g. /api/git-proxy/).
        #[arg(long)]
        only_path_prefix: Option<String>,
    },
    /// Run one reaper sweep now.
    Reap,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Admin { url, action } => match admin(&url, action).await {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                0
            }
            Err(e) => {
                eprintln!("windshift-devserver admin: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

async fn serve(a: ServeArgs) -> i32 {
    let mut cfg = DevServerConfig::new(a.data_dir);
    cfg.listen = a.listen;
    cfg.public_api_url = a.public_api_url;
    cfg.tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    cfg.liveness_window = Duration::from_secs(a.liveness_secs);
    cfg.reaper_interval = Duration::from_secs(a.reaper_secs.max(1));
    cfg.max_run_duration = Duration::from_secs(a.max_run_secs);
    cfg.rate_per_sec = a.rate_per_sec;
    cfg.rate_burst = a.rate_burst;
    cfg.llm_proxy = a.llm_proxy;
    let server = match DevServer::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("windshift-devserver: {e}");
            return 78;
        }
    };
    eprintln!(
        "windshift-devserver listening: WS_API_URL={}",
        server.api_url()
    );
    eprintln!("admin API: {}", server.admin_url());
    let _ = tokio::signal::ctrl_c().await;
    server.stop().await;
    0
}

async fn admin(base: &str, action: AdminAction) -> Result<Value, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| e.to_string())?;
    let base = base.trim_end_matches('/');
    let (method, path, body): (reqwest::Method, String, Option<Value>) = match action {
        AdminAction::PoolCreate {
            name,
            max_concurrent_runs,
        } => (
            reqwest::Method::POST,
            "/pools".into(),
            Some(
                serde_json::to_value(CreatePool {
                    name,
                    max_concurrent_runs,
                })
                .map_err(|e| e.to_string())?,
            ),
        ),
        AdminAction::Pools => (reqwest::Method::GET, "/pools".into(), None),
        AdminAction::PoolEnable { id } => {
            (reqwest::Method::POST, format!("/pools/{id}/enable"), None)
        }
        AdminAction::PoolDisable { id } => {
            (reqwest::Method::POST, format!("/pools/{id}/disable"), None)
        }
        AdminAction::TokenMint { pool_id, ttl_secs } => (
            reqwest::Method::POST,
            format!("/pools/{pool_id}/tokens"),
            Some(serde_json::json!({ "ttl_secs": ttl_secs })),
        ),
        AdminAction::RepoCreate { slug, path } => {
            let abs =
                std::fs::canonicalize(&path).map_err(|e| format!("repository path {path}: {e}"))?;
            (
                reqwest::Method::POST,
                "/repos".into(),
                Some(serde_json::json!({"slug": slug, "path": abs.display().to_string()})),
            )
        }
        AdminAction::RunEnqueue {
            pool_id,
            repos,
            prompt,
            image,
            kind,
            env,
            test_run,
        } => {
            let repos: Vec<EnqueueRepo> = repos
                .iter()
                .map(|r| {
                    let (slug, base) = r.split_once('@').unwrap_or((r, ""));
                    EnqueueRepo {
                        slug: slug.into(),
                        base_ref: base.into(),
                        continue_branch: String::new(),
                    }
                })
                .collect();
            let mut env_map = BTreeMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("--env {kv:?} must be KEY=VALUE"))?;
                env_map.insert(k.to_string(), v.to_string());
            }
            let req = EnqueueRun {
                pool_id,
                repos,
                prompt,
                image,
                kind,
                env: env_map,
                workspace_id: None,
                test_run,
            };
            (
                reqwest::Method::POST,
                "/runs".into(),
                Some(serde_json::to_value(req).map_err(|e| e.to_string())?),
            )
        }
        AdminAction::Runs => (reqwest::Method::GET, "/runs".into(), None),
        AdminAction::Run { id } => (reqwest::Method::GET, format!("/runs/{id}"), None),
        AdminAction::Events { id } => (reqwest::Method::GET, format!("/runs/{id}/events"), None),
        AdminAction::Cancel { id, force } => (
            reqwest::Method::POST,
            format!("/runs/{id}/cancel?force={force}"),
            None,
        ),
        AdminAction::Instances => (reqwest::Method::GET, "/instances".into(), None),
        AdminAction::Revoke { id } => (
            reqwest::Method::POST,
            format!("/instances/{id}/revoke"),
            None,
        ),
        AdminAction::Harness { state } => (
            reqwest::Method::POST,
            "/harness".into(),
            Some(serde_json::json!({"enabled": state == "on"})),
        ),
        AdminAction::Faults {
            error_5xx,
            rate_429,
            drop,
            latency_ms,
            outage_secs,
            only_path_prefix,
        } => {
            let f = Faults {
                error_5xx_probability: error_5xx,
                rate_429_probability: rate_429,
                drop_connection_probability: drop,
                added_latency_ms: latency_ms,
                outage_until_ms: outage_secs
                    .map(|s| windshift_devserver::core::now_ms() + (s as i64) * 1000),
                only_path_prefix,
                ..Faults::default()
            };
            (
                reqwest::Method::PUT,
                "/faults".into(),
                Some(serde_json::to_value(f).map_err(|e| e.to_string())?),
            )
        }
        AdminAction::Reap => (reqwest::Method::POST, "/reap".into(), None),
    };
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("cannot reach {base}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("unexpected answer {text:?}: {e}"))
}
