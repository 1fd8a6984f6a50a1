//! The container engine driven through its HTTP API on a unix socket (Docker Engine API; rootful
//! Podman serves the same compat API on `podman.sock`), with the `bollard` client. It makes the
//! same container the CLI driver makes (`create_body` mirrors `container::create_argv`), but
//! with `OpenStdin=true, StdinOnce=false`: the agent's stdin stays open when an attached client
//! goes away, so a runner that dies (process or container) loses no session and a new runner
//! attaches again. No helper process lives per run: stdin is an in-process attach connection,
//! output an in-process logs stream (docs/containers.md).
//!
//! Every call is bounded by the caller's timeout, not the client's (whose only timeout is on the
//! response head): the client's is set far out so a long `wait` or `logs --follow` never trips.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as ApiError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, CreateImageOptions, KillContainerOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt, DuplexStream};

use super::container::{
    container_name, render_env_file, ContainerConfig, ContainerError, ContainerSpec,
    ContainerState, FoundContainer, LaunchKind, CONTRACT_LABEL, ICC_OPTION, LABEL_ATTEMPT,
    LABEL_INSTANCE, LABEL_RUN_ID,
};
use crate::redact::redact;

/// How long one API call (inspect, create, kill, …) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The client's own timeout on a response head: far out, see the module comment.
const CLIENT_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Buffer of each in-process output pipe (stdout and stderr of one logs stream).
const PIPE_BUFFER: usize = 64 * 1024;

/// A connection to the engine's API socket (the API version is negotiated on first use).
pub struct ApiDriver {
    /// The socket path (without `unix://`).
    pub socket: String,
    raw: Docker,
    negotiated: tokio::sync::OnceCell<Docker>,
}

impl std::fmt::Debug for ApiDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiDriver")
            .field("socket", &self.socket)
            .finish()
    }
}

/// The error of one API call, named and redacted (engine messages can quote env or args).
fn api_err(what: impl Into<String>, e: ApiError) -> ContainerError {
    ContainerError::Api {
        what: what.into(),
        detail: redact(&e.to_string()).into_owned(),
    }
}

fn not_found(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A Docker byte count (`4g`, `512m`, `1073741824`; binary units like the CLI's).
pub fn parse_bytes(text: &str) -> Option<i64> {
    let text = text.trim();
    let (digits, shift) = match text.as_bytes().last()? {
        b'b' | b'B' => (&text[..text.len() - 1], 0),
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i64>().ok()?.checked_mul(1 << shift)
}

/// The engine-side log cap as a `LogConfig` (the API form of `container::log_backstop_args`).
pub fn log_config(driver: &str, limit: u64) -> Option<HostConfigLogConfig> {
    let args = super::container::log_backstop_args(driver, limit);
    if args.is_empty() {
        return None;
    }
    let config = args
        .chunks(2)
        .filter_map(|pair| pair.get(1)?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some(HostConfigLogConfig {
        typ: Some(driver.to_owned()),
        config: Some(config),
    })
}

/// The create body of one container: the same hardening as `container::create_argv` (spec 5.1
/// items 2–7, 5.2), flag by flag, plus our name labels; stdin open and never closed by a client
/// for `coding_agent`. The env goes in the body (no env file); it is checked like the env file.
/// `userns`: the user namespace mode (`container::EngineHost::userns_mode`, rootless Podman's
/// keep-id), the API form of the CLI's `--userns`.
pub fn create_body(
    cfg: &ContainerConfig,
    spec: &ContainerSpec,
    facts: &CreateFacts,
) -> Result<ContainerCreateBody, ContainerError> {
    if !spec.extra_args.is_empty() {
        return Err(ContainerError::Api {
            what: "create".into(),
            detail: "extra engine arguments are CLI arguments; the API driver cannot pass them (set WSRUNNER_ENGINE_DRIVER=cli)".into(),
        });
    }
    let env: Vec<String> = render_env_file(&spec.env, spec.run_id)?
        .lines()
        .map(str::to_owned)
        .collect();
    let bad = |name: &'static str, value: &str| ContainerError::Config {
        name,
        value: value.to_owned(),
        why: "the API driver cannot read it",
    };
    let memory = parse_bytes(&cfg.memory).ok_or_else(|| bad("WSRUNNER_MEMORY", &cfg.memory))?;
    let nano_cpus = cfg
        .cpus
        .parse::<f64>()
        .ok()
        .filter(|c| *c > 0.0 && c.is_finite())
        .map(|c| (c * 1e9).round() as i64)
        .ok_or_else(|| bad("WSRUNNER_CPUS", &cfg.cpus))?;
    let mut tmpfs = HashMap::new();
    tmpfs.insert(
        "/tmp".to_owned(),
        "rw,nosuid,nodev,size=256m,mode=1777".to_owned(),
    );
    let coding = spec.kind == LaunchKind::CodingAgent;
    if coding {
        tmpfs.insert(
            "/home/agent".to_owned(),
            "rw,nosuid,nodev,size=512m,mode=1777".to_owned(),
        );
    }
    let labels = HashMap::from([
        (LABEL_INSTANCE.to_owned(), cfg.instance.clone()),
        (LABEL_RUN_ID.to_owned(), spec.run_id.to_string()),
        (LABEL_ATTEMPT.to_owned(), spec.attempt.to_string()),
    ]);
    let host_config = HostConfig {
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(tmpfs),
        network_mode: Some(cfg.network.clone()),
        pids_limit: Some(i64::from(cfg.pids_limit)),
        memory: Some(memory),
        memory_swap: Some(memory),
        nano_cpus: Some(nano_cpus),
        runtime: cfg.runtime.clone(),
        binds: spec
            .checkout
            .as_ref()
            .map(|c| vec![format!("{}:/workspace:Z", c.display())]),
        log_config: log_config(&facts.log_driver, cfg.output_limit),
        // The engine's init as PID 1 (docker-init, i.e. tini) when it has one: the agent then
        // gets the SIGTERM of a stop instead of ignoring it as PID 1 does, so the stop that
        // ends a finished session (stdin stays open, StdinOnce=false) takes no grace.
        init: facts.init.then_some(true),
        userns_mode: facts.userns.clone(),
        ..Default::default()
    };
    Ok(ContainerCreateBody {
        image: Some(spec.image.clone()),
        user: Some("1000:1000".into()),
        env: Some(env),
        labels: Some(labels),
        // Stdin open for the JSONL commands and NOT closed when a client detaches
        // (StdinOnce=false): the session survives the death of whoever holds it.
        open_stdin: Some(coding),
        stdin_once: Some(false),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        tty: Some(false),
        host_config: Some(host_config),
        ..Default::default()
    })
}

/// What the engine's `info` says that the driver uses.
#[derive(Debug, Clone, Default)]
pub struct ApiInfo {
    /// The runtimes it lists (sorted).
    pub runtimes: Vec<String>,
    /// Its default log driver (`""` when it does not say).
    pub log_driver: String,
    /// Whether it has an init binary it injects on request (`HostConfig.Init`).
    pub has_init: bool,
    /// `SecurityOptions` lists `name=rootless` (rootless Docker, and Podman's compat API).
    pub rootless: bool,
    pub cgroups_v1: bool,
}

/// Facts about the engine that shape every create, learned once per engine.
#[derive(Debug, Clone, Default)]
pub struct CreateFacts {
    /// The engine's default log driver (`""` when it could not be learned).
    pub log_driver: String,
    /// Run the engine's init as PID 1 (API driver on an engine that has one).
    pub init: bool,
    /// `HostConfig.UsernsMode` (rootless Podman's keep-id mapping), else the engine's default.
    pub userns: Option<String>,
}

/// The (unused) output side of an attach connection.
type AttachOutput = Pin<Box<dyn futures_util::Stream<Item = Result<LogOutput, ApiError>> + Send>>;

/// The container's stdin: one attach connection (stdin only) in this process.
pub struct ApiStdin {
    input: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
    /// The attach's (empty) output side, held so the connection stays up.
    _output: std::sync::Mutex<AttachOutput>,
}

impl ApiStdin {
    /// Writes one command line; the agent gets it as one line.
    pub async fn send(&self, line: &str) -> std::io::Result<()> {
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        let mut input = self.input.lock().await;
        let write = async {
            input.write_all(&data).await?;
            input.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(30), write).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the agent did not read its stdin for 30 s",
            )),
        }
    }
}

impl super::engine::StdinPort for ApiStdin {
    fn send<'a>(&'a self, line: &'a str) -> super::engine::EngineFuture<'a, std::io::Result<()>> {
        Box::pin(ApiStdin::send(self, line))
    }

    fn survives_close(&self) -> bool {
        true
    }

    /// Drops the connection only; the container's stdin stays open.
    fn close(self: Box<Self>) -> super::engine::EngineFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A container's output as two byte streams, fed in-process from one logs connection.
pub struct ApiLogs {
    pub stdout: DuplexStream,
    pub stderr: DuplexStream,
    /// The task moving frames into the two pipes; it ends with the logs stream.
    pub task: tokio::task::JoinHandle<Result<(), String>>,
}

impl ApiDriver {
    /// A client for the socket at `path` (no I/O yet).
    pub fn connect(path: &str) -> Result<ApiDriver, String> {
        let raw =
            Docker::connect_with_unix(path, CLIENT_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|e| e.to_string())?;
        Ok(ApiDriver {
            socket: path.trim_start_matches("unix://").to_owned(),
            raw,
            negotiated: Default::default(),
        })
    }

    /// The client, its API version negotiated with the engine once (docker 20.10 speaks 1.41,
    /// newer engines refuse too old a version: the lower of the two is used).
    async fn docker(&self) -> Result<&Docker, ContainerError> {
        self.negotiated
            .get_or_try_init(|| async {
                match tokio::time::timeout(CALL_TIMEOUT, self.raw.clone().negotiate_version()).await
                {
                    Ok(Ok(docker)) => Ok(docker),
                    Ok(Err(e)) => Err(api_err(format!("version ({})", self.socket), e)),
                    Err(_) => Err(self.timeout("version")),
                }
            })
            .await
    }

    fn timeout(&self, what: &str) -> ContainerError {
        ContainerError::Api {
            what: what.to_owned(),
            detail: format!(
                "no answer within {} s from {}; is the engine daemon healthy?",
                CALL_TIMEOUT.as_secs(),
                self.socket
            ),
        }
    }

    /// Runs one call with [`CALL_TIMEOUT`].
    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<Result<T, ApiError>, ContainerError> {
        tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| self.timeout(what))
    }

    /// One GET whose JSON answer is read untyped: Podman's compat API reports states the
    /// typed models refuse (`stopped`), so inspect and list go through here. A plain
    /// HTTP/1.0 request on a fresh connection: no chunking, the body ends with the
    /// connection. `path` is built from checked names only.
    async fn raw_get(&self, path: &str) -> Result<(u16, serde_json::Value), ContainerError> {
        use tokio::io::AsyncReadExt;
        let work = async {
            let mut stream = tokio::net::UnixStream::connect(&self.socket).await?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: engine\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut data = Vec::new();
            // Inspect answers are a few KiB; a list of this instance's containers stays small.
            stream.take(64 << 20).read_to_end(&mut data).await?;
            Ok::<_, std::io::Error>(data)
        };
        let data = tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| self.timeout(path))?
            .map_err(|e| ContainerError::Api {
                what: format!("GET {path}"),
                detail: format!("{e} (socket {})", self.socket),
            })?;
        let bad = |why: &str| ContainerError::Api {
            what: format!("GET {path}"),
            detail: why.to_owned(),
        };
        let split = data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| bad("the engine's answer has no header end"))?;
        let head = String::from_utf8_lossy(&data[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad("the engine's answer has no status code"))?;
        let body = &data[split + 4..];
        let value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    }

    /// Inspects a container untyped; `None` when it does not exist.
    async fn inspect_raw(&self, name: &str) -> Result<Option<serde_json::Value>, ContainerError> {
        if !valid_name(name) {
            return Ok(None);
        }
        let path = format!("/containers/{name}/json");
        let mut answer = self.raw_get(&path).await?;
        // Podman answers 500 ("read /proc/<pid>/cgroup: no such process") while a container
        // is exiting: asked again a moment later, it reports the exit.
        for _ in 0..5 {
            if answer.0 < 500 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            answer = self.raw_get(&path).await?;
        }
        match answer {
            (200, value) => Ok(Some(value)),
            (404, _) => Ok(None),
            (status, value) => Err(ContainerError::Api {
                what: format!("inspect {name}"),
                detail: format!(
                    "status {status}: {}",
                    redact(value["message"].as_str().unwrap_or("no message"))
                ),
            }),
        }
    }

    /// Whether the engine answers a ping (start-up selection and `doctor`).
    pub async fn ping(&self) -> Result<(), ContainerError> {
        let docker = self.docker().await?;
        self.call("ping", docker.ping())
            .await?
            .map(|_| ())
            .map_err(|e| api_err("ping", e))
    }

    pub async fn create(
        &self,
        cfg: &ContainerConfig,
        spec: &ContainerSpec,
        facts: &CreateFacts,
    ) -> Result<(), ContainerError> {
        let body = create_body(cfg, spec, facts)?;
        let name = container_name(&cfg.instance, spec.run_id, spec.attempt);
        let docker = self.docker().await?;
        let options = CreateContainerOptions {
            name: Some(name),
            ..Default::default()
        };
        match self
            .call(
                "create",
                docker.create_container(Some(options.clone()), body.clone()),
            )
            .await?
        {
            Ok(_) => Ok(()),
            // `create` does not pull (the CLI does): pull once, then create again.
            Err(e) if not_found(&e) => {
                self.pull(&spec.image).await.map_err(|detail| {
                    ContainerError::ImageUnavailable {
                        image: spec.image.clone(),
                        detail,
                    }
                })?;
                self.call("create", docker.create_container(Some(options), body))
                    .await?
                    .map(|_| ())
                    .map_err(|e| api_err("create", e))
            }
            Err(e) => Err(api_err("create", e)),
        }
    }

    /// Pulls an image; the error text on failure.
    pub async fn pull(&self, image: &str) -> Result<(), String> {
        let docker = self.docker().await.map_err(|e| e.to_string())?;
        let options = CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..Default::default()
        };
        let mut stream = docker.create_image(Some(options), None, None);
        let pull = async {
            while let Some(item) = stream.next().await {
                item.map_err(|e| redact(&e.to_string()).into_owned())?;
            }
            Ok(())
        };
        tokio::time::timeout(CALL_TIMEOUT * 5, pull)
            .await
            .map_err(|_| "the pull did not finish within 600 s".to_owned())?
    }

    pub async fn start(&self, name: &str) -> Result<(), ContainerError> {
        let docker = self.docker().await?;
        self.call("start", docker.start_container(name, None))
            .await?
            .map_err(|e| api_err(format!("start {name}"), e))
    }

    pub async fn state(&self, name: &str) -> Result<Option<ContainerState>, ContainerError> {
        Ok(self
            .inspect_raw(name)
            .await?
            .map(|info| state_of(&info["State"])))
    }

    /// Waits for the container to stop (the API's wait, no polling); `None` when it is gone.
    pub async fn wait_exit(&self, name: &str) -> Result<Option<i32>, ContainerError> {
        let docker = self.docker().await?;
        let options = WaitContainerOptions {
            condition: "not-running".into(),
        };
        let mut stream = docker.wait_container(name, Some(options));
        match stream.next().await {
            Some(Ok(response)) => Ok(Some(response.status_code as i32)),
            Some(Err(ApiError::DockerContainerWaitError { code, .. })) => Ok(Some(code as i32)),
            Some(Err(e)) if not_found(&e) => Ok(None),
            Some(Err(e)) => {
                // A broken wait connection: the state says what happened.
                tracing::debug!(container = name, "wait failed: {e}");
                Ok(match self.state(name).await? {
                    Some(ContainerState::Exited { code, .. }) => Some(code),
                    _ => None,
                })
            }
            None => Ok(match self.state(name).await? {
                Some(ContainerState::Exited { code, .. }) => Some(code),
                _ => None,
            }),
        }
    }

    /// SIGTERM, then SIGKILL after `grace` (the engine does both); a stopped or missing
    /// container is fine.
    pub async fn stop(&self, name: &str, grace: Duration) -> Result<(), ContainerError> {
        let docker = self.docker().await?;
        let options = StopContainerOptions {
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
            signal: None,
        };
        let result = tokio::time::timeout(
            grace + CALL_TIMEOUT,
            docker.stop_container(name, Some(options)),
        )
        .await
        .map_err(|_| self.timeout("stop"))?;
        match result {
            Ok(()) => Ok(()),
            Err(ApiError::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            }) => Ok(()),
            Err(e) => Err(api_err(format!("stop {name}"), e)),
        }
    }

    pub async fn kill(&self, name: &str) -> Result<(), ContainerError> {
        let docker = self.docker().await?;
        let options = KillContainerOptions {
            signal: "SIGKILL".into(),
        };
        match self
            .call("kill", docker.kill_container(name, Some(options)))
            .await?
        {
            Ok(()) => Ok(()),
            Err(e) => match self.state(name).await? {
                None | Some(ContainerState::Exited { .. }) | Some(ContainerState::Created) => {
                    Ok(())
                }
                Some(_) => Err(api_err(format!("kill {name}"), e)),
            },
        }
    }

    pub async fn remove(&self, name: &str) -> Result<(), ContainerError> {
        let docker = self.docker().await?;
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self
            .call("remove", docker.remove_container(name, Some(options)))
            .await?
        {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => {
                if self.state(name).await?.is_none() {
                    Ok(())
                } else {
                    Err(api_err(format!("remove {name}"), e))
                }
            }
        }
    }

    /// Every container labelled for `instance`, running or not.
    pub async fn find(&self, instance: &str) -> Result<Vec<FoundContainer>, ContainerError> {
        let filters = serde_json::json!({ "label": [format!("{LABEL_INSTANCE}={instance}")] });
        let path = format!(
            "/containers/json?all=1&filters={}",
            percent_encode(&filters.to_string())
        );
        let list = match self.raw_get(&path).await? {
            (200, serde_json::Value::Array(list)) => list,
            (status, value) => {
                return Err(ContainerError::Api {
                    what: "list containers".into(),
                    detail: format!(
                        "status {status}: {}",
                        redact(value["message"].as_str().unwrap_or("no list"))
                    ),
                })
            }
        };
        let mut found = Vec::new();
        for summary in list {
            let Some(name) = summary["Names"][0]
                .as_str()
                .map(|n| n.trim_start_matches('/').to_owned())
            else {
                continue;
            };
            // The summary's state has no exit code: inspect each (as the CLI driver does).
            let Some(info) = self.inspect_raw(&name).await? else {
                continue; // removed between list and inspect
            };
            let label = |key: &str| info["Config"]["Labels"][key].as_str().map(str::to_owned);
            found.push(FoundContainer {
                run_id: label(LABEL_RUN_ID).and_then(|v| v.parse().ok()),
                attempt: label(LABEL_ATTEMPT).and_then(|v| v.parse().ok()),
                state: state_of(&info["State"]),
                name,
            });
        }
        Ok(found)
    }

    /// The network's driver and its options, `None` when it does not exist.
    pub async fn network(
        &self,
        name: &str,
    ) -> Result<Option<(String, HashMap<String, String>)>, ContainerError> {
        let docker = self.docker().await?;
        match self
            .call("network inspect", docker.inspect_network(name, None))
            .await?
        {
            Ok(net) => Ok(Some((
                net.driver.unwrap_or_default(),
                net.options.unwrap_or_default(),
            ))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(api_err(format!("network inspect {name}"), e)),
        }
    }

    /// Creates a bridge network, with inter-container traffic off when `icc_off`; the engine's
    /// error text on failure (the caller decides about the plain-bridge fallback).
    pub async fn create_network(&self, name: &str, icc_off: bool) -> Result<(), String> {
        let docker = self.docker().await.map_err(|e| e.to_string())?;
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            options: icc_off.then(|| HashMap::from([(ICC_OPTION.to_owned(), "false".to_owned())])),
            ..Default::default()
        };
        match self
            .call("network create", docker.create_network(request))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(redact(&e.to_string()).into_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// What the engine's `info` says that the driver uses.
    pub async fn info(&self) -> Result<ApiInfo, ContainerError> {
        use bollard::models::SystemInfoCgroupVersionEnum;
        let docker = self.docker().await?;
        let info = self
            .call("info", docker.info())
            .await?
            .map_err(|e| api_err("info", e))?;
        let mut runtimes: Vec<String> = info.runtimes.unwrap_or_default().into_keys().collect();
        runtimes.sort();
        Ok(ApiInfo {
            runtimes,
            log_driver: info.logging_driver.unwrap_or_default(),
            // Docker names its init (`docker-init`); Podman's compat API says "" (its
            // catatonit is optional and often not installed), so Podman runs without one.
            has_init: info.init_binary.is_some_and(|b| !b.trim().is_empty()),
            rootless: info
                .security_options
                .unwrap_or_default()
                .iter()
                .any(|o| super::container::security_option_is_rootless(o)),
            cgroups_v1: info.cgroup_version == Some(SystemInfoCgroupVersionEnum::_1),
        })
    }

    /// Whether the engine is Podman: its compat `/version` lists a "Podman Engine"
    /// component, Docker's an "Engine".
    pub async fn is_podman(&self) -> Result<bool, ContainerError> {
        let docker = self.docker().await?;
        Ok(match self.call("version", docker.version()).await? {
            Ok(version) => version
                .components
                .unwrap_or_default()
                .iter()
                .any(|c| c.name.contains("Podman")),
            Err(_) => false,
        })
    }

    /// Removes an image, not forced; a missing one is fine.
    pub async fn remove_image(&self, image: &str) -> Result<(), ContainerError> {
        let docker = self.docker().await?;
        match self
            .call(
                "image remove",
                docker.remove_image(
                    image,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                ),
            )
            .await?
        {
            Ok(_) => Ok(()),
            Err(ApiError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(api_err(format!("image remove {image}"), e)),
        }
    }

    /// Bytes the image takes in the engine's store (`None`: not there).
    pub async fn image_size(&self, image: &str) -> Option<u64> {
        let docker = self.docker().await.ok()?;
        let info = self
            .call("image inspect", docker.inspect_image(image))
            .await
            .ok()?
            .ok()?;
        info.size.and_then(|s| u64::try_from(s).ok())
    }

    /// The image's contract label (`""` when absent); an error when the image is not local.
    pub async fn contract_label(&self, image: &str) -> Result<String, ContainerError> {
        let docker = self.docker().await?;
        let info = self
            .call("image inspect", docker.inspect_image(image))
            .await?
            .map_err(|e| api_err(format!("image inspect {image}"), e))?;
        Ok(info
            .config
            .and_then(|c| c.labels)
            .and_then(|mut l| l.remove(CONTRACT_LABEL))
            .unwrap_or_default())
    }

    /// Attaches to the container's stdin (only): a new connection each time, any number of
    /// times over the container's life.
    pub async fn attach_stdin(&self, name: &str) -> Result<ApiStdin, ContainerError> {
        let docker = self.docker().await?;
        let options = AttachContainerOptions {
            stdin: true,
            stream: true,
            ..Default::default()
        };
        let attached = self
            .call("attach", docker.attach_container(name, Some(options)))
            .await?
            .map_err(|e| api_err(format!("attach {name}"), e))?;
        Ok(ApiStdin {
            input: tokio::sync::Mutex::new(attached.input),
            _output: std::sync::Mutex::new(attached.output),
        })
    }

    /// The container's output from its start (`follow`: until it stops), split in-process
    /// into a stdout and a stderr byte stream.
    pub async fn logs(&self, name: &str, follow: bool) -> Result<ApiLogs, ContainerError> {
        let docker = self.docker().await?.clone();
        let (mut out_w, stdout) = tokio::io::duplex(PIPE_BUFFER);
        let (mut err_w, stderr) = tokio::io::duplex(PIPE_BUFFER);
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            let options = LogsOptions {
                follow,
                stdout: true,
                stderr: true,
                ..Default::default()
            };
            let mut stream = docker.logs(&name, Some(options));
            while let Some(item) = stream.next().await {
                let written = match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        out_w.write_all(&message).await
                    }
                    Ok(LogOutput::StdErr { message }) => err_w.write_all(&message).await,
                    Ok(LogOutput::StdIn { .. }) => Ok(()),
                    Err(e) => return Err(redact(&e.to_string()).into_owned()),
                };
                // A reader that went away ends the stream (nobody needs the rest).
                if written.is_err() {
                    return Ok(());
                }
            }
            Ok(())
        });
        Ok(ApiLogs {
            stdout,
            stderr,
            task,
        })
    }
}

/// A container's `State` object as the engine reports it (Podman adds `configured` and
/// `stopped`, which mean what `created` and `exited` mean; the CLI driver maps them the same).
fn state_of(state: &serde_json::Value) -> ContainerState {
    let code = state["ExitCode"]
        .as_i64()
        .and_then(|c| i32::try_from(c).ok())
        .unwrap_or(-1);
    let oom_killed = state["OOMKilled"].as_bool().unwrap_or(false);
    match state["Status"].as_str().unwrap_or("unknown") {
        "created" | "configured" => ContainerState::Created,
        "running" => ContainerState::Running,
        "exited" | "stopped" => ContainerState::Exited { code, oom_killed },
        other => ContainerState::Other(other.chars().take(32).collect()),
    }
}

/// A container name as this runner makes them (`[A-Za-z0-9_.-]`): safe in a URL path.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Percent-encodes a query value (everything but unreserved characters).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::container::{create_argv_with_logs, log_backstop_args};
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    /// Every flag of the CLI's create argv has its field in the API body, with the same value.
    #[test]
    fn create_body_matches_the_cli_argv() {
        let cfg = ContainerConfig {
            runtime: Some("runsc".into()),
            instance: "host1".into(),
            output_limit: 1 << 20,
            ..ContainerConfig::default()
        };
        let mut env = BTreeMap::new();
        env.insert("WS_TOKEN".to_owned(), "tok=en".to_owned());
        let spec = ContainerSpec {
            run_id: 42,
            attempt: 2,
            kind: LaunchKind::CodingAgent,
            image: "ghcr.io/acme/agent:1".into(),
            env,
            checkout: Some(PathBuf::from("/cache/runs/42/repo")),
            extra_args: Vec::new(),
        };
        let argv = create_argv_with_logs(
            &cfg,
            &spec,
            Path::new("/e"),
            &log_backstop_args("json-file", cfg.output_limit),
        );
        let facts = CreateFacts {
            log_driver: "json-file".into(),
            init: true,
            ..Default::default()
        };
        let body = create_body(&cfg, &spec, &facts).expect("body");
        let host = body.host_config.clone().expect("host config");
        let mut seen = 0;
        let mut args = argv.iter().skip(1).peekable();
        while let Some(arg) = args.next() {
            let (flag, value) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_owned(), v.to_owned()),
                _ if matches!(arg.as_str(), "-i" | "--read-only" | "--") => {
                    (arg.clone(), String::new())
                }
                _ if arg.starts_with('-') => {
                    (arg.clone(), args.next().cloned().unwrap_or_default())
                }
                _ => (arg.clone(), String::new()),
            };
            seen += 1;
            match flag.as_str() {
                "-i" => {}
                "--name" => assert_eq!(value, "wsr-host1-run-42-2"),
                "--label" => {
                    let (k, v) = value.split_once('=').expect("label");
                    assert_eq!(body.labels.as_ref().unwrap()[k], v);
                }
                "--log-opt" => {
                    let (k, v) = value.split_once('=').expect("log opt");
                    let lc = host.log_config.as_ref().expect("log config");
                    assert_eq!(lc.config.as_ref().unwrap()[k], v);
                }
                "--cap-drop" => assert_eq!(host.cap_drop, Some(vec![value])),
                "--security-opt" => assert_eq!(host.security_opt, Some(vec![value])),
                "--user" => assert_eq!(body.user.as_deref(), Some(value.as_str())),
                "--read-only" => assert_eq!(host.readonly_rootfs, Some(true)),
                "--tmpfs" => {
                    let (path, opts) = value.split_once(':').expect("tmpfs");
                    assert_eq!(host.tmpfs.as_ref().unwrap()[path], opts);
                }
                "--network" => assert_eq!(host.network_mode.as_deref(), Some(value.as_str())),
                "--pids-limit" => assert_eq!(host.pids_limit, value.parse().ok()),
                "--memory" => assert_eq!(host.memory, parse_bytes(&value)),
                "--memory-swap" => assert_eq!(host.memory_swap, parse_bytes(&value)),
                "--cpus" => assert_eq!(host.nano_cpus, Some(2_000_000_000)),
                "--runtime" => assert_eq!(host.runtime.as_deref(), Some(value.as_str())),
                "--env-file" => assert_eq!(
                    body.env,
                    Some(vec!["WS_TOKEN=tok=en".into(), "AGENT_RUN_ID=42".into()])
                ),
                "-v" => assert_eq!(host.binds, Some(vec![value])),
                "--" => {}
                image => assert_eq!(body.image.as_deref(), Some(image)),
            }
        }
        assert!(seen >= 20, "{argv:?}");
        assert_eq!(host.tmpfs.as_ref().unwrap().len(), 2);
        // The one intended difference: stdin open, and kept open when a client detaches.
        assert_eq!(body.open_stdin, Some(true));
        assert_eq!(body.stdin_once, Some(false));
        assert_eq!(body.attach_stdin, Some(false));
        // The engine's init when it has one (the stop at a session's end then takes no grace).
        assert_eq!(host.init, Some(true));
        // Container kinds: no stdin, no home tmpfs.
        let spec = ContainerSpec {
            kind: LaunchKind::Container,
            ..spec
        };
        let facts = CreateFacts {
            log_driver: "journald".into(),
            init: false,
            ..Default::default()
        };
        let body = create_body(&cfg, &spec, &facts).expect("body");
        assert_eq!(body.open_stdin, Some(false));
        let host = body.host_config.expect("host");
        assert_eq!(host.tmpfs.unwrap().len(), 1);
        assert!(host.log_config.is_none());
        assert_eq!(host.init, None, "no init unless the engine has one");
        assert_eq!(host.userns_mode, None);
        // Rootless Podman: the CLI's --userns is the body's UsernsMode.
        let podman = crate::effects::container::EngineHost {
            podman: true,
            rootless: true,
            cgroups_v1: false,
        };
        let flags = crate::effects::container::userns_args(podman);
        assert_eq!(flags, ["--userns=keep-id:uid=1000,gid=1000"]);
        let body = create_body(
            &cfg,
            &spec,
            &CreateFacts {
                userns: podman.userns_mode().map(str::to_owned),
                ..facts
            },
        )
        .expect("body");
        assert_eq!(
            body.host_config.and_then(|h| h.userns_mode).as_deref(),
            flags[0].strip_prefix("--userns=")
        );
    }

    #[test]
    fn create_body_refuses_what_it_cannot_carry() {
        let cfg = ContainerConfig::default();
        let mut spec = ContainerSpec {
            run_id: 1,
            attempt: 1,
            kind: LaunchKind::Container,
            image: "alpine:3".into(),
            env: BTreeMap::new(),
            checkout: None,
            extra_args: vec!["--init".into()],
        };
        assert!(create_body(&cfg, &spec, &CreateFacts::default()).is_err());
        spec.extra_args.clear();
        spec.env.insert("A".into(), "x\ny".into());
        assert!(matches!(
            create_body(&cfg, &spec, &CreateFacts::default()),
            Err(ContainerError::EnvNewline { .. })
        ));
        assert_eq!(parse_bytes("4g"), Some(4 << 30));
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("1073741824"), Some(1 << 30));
        assert_eq!(parse_bytes("4 gigs"), None);
    }
}
