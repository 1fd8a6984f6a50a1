//! The container engine as the daemon and a run's container session use it: the container
//! lifecycle (create, start, state, wait, kill, stop, remove, find by label), the per-run
//! image check, the output streams, the agent's stdin and the idle-image prune. The daemon
//! holds it as `Ctx::engine` (`Arc<dyn ContainerEngine>`) and `effects::session` and
//! `effects::agent_driver` work only through it, so a test or a simulation can stand in for
//! the engine ([`super::mem_engine::MemEngine`]); [`Engine`] (CLI and API drivers) is the
//! real one, its code paths unchanged. Boot-only checks (network, runtime, the default
//! image) and `doctor`'s queries stay on the concrete [`Engine`].

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncRead;

use super::agent_driver::StdinChannel;
use super::container::{
    ContainerError, ContainerSpec, ContainerState, Engine, FoundContainer, ImagePrune, LaunchKind,
};

/// One engine call in flight.
pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One stream of a container's output, from its start.
pub type OutputStream = Box<dyn AsyncRead + Unpin + Send>;

/// A container's output as two byte streams, from its start, whichever driver reads it.
pub struct Logs {
    pub stdout: OutputStream,
    pub stderr: OutputStream,
    /// What feeds the two streams: ends them early, or says how they ended.
    pub source: Box<dyn LogSource>,
}

/// What feeds a [`Logs`] pair (a `logs` child, an in-process connection, memory).
pub trait LogSource: Send {
    /// Ends the reading early.
    fn kill(&mut self) -> EngineFuture<'_, ()>;
    /// Waits for the source to end; the error says why it failed.
    fn finish(self: Box<Self>) -> EngineFuture<'static, Result<(), String>>;
}

/// The agent's stdin as an engine provides it (wrapped in [`StdinChannel`]).
pub trait StdinPort: Send + Sync {
    /// Writes one command line (the newline is added).
    fn send<'a>(&'a self, line: &'a str) -> EngineFuture<'a, io::Result<()>>;
    /// Whether closing this port leaves the container's stdin open (the handshake then stops
    /// the container instead).
    fn survives_close(&self) -> bool;
    /// Closes the port: for good (the agent sees EOF) unless [`StdinPort::survives_close`].
    fn close(self: Box<Self>) -> EngineFuture<'static, ()>;
}

pub trait ContainerEngine: Send + Sync {
    /// A handle a spawned task can own (the engine's state is shared: this is cheap).
    fn shared(&self) -> Arc<dyn ContainerEngine>;
    /// The runner instance its containers belong to (names and labels).
    fn instance(&self) -> &str;
    /// `WSRUNNER_AGENT_OUTPUT_LIMIT`: bytes one container may print before it is stopped.
    fn output_limit(&self) -> u64;
    /// The engine's program, as error messages name it (`WSRUNNER_DOCKER`).
    fn program(&self) -> &str;

    /// Per-run image choice and check for every job kind (spec 4.8): the image to run.
    fn check_job_image<'a>(
        &'a self,
        kind: LaunchKind,
        requested: Option<&'a str>,
    ) -> EngineFuture<'a, Result<String, ContainerError>>;
    /// Creates the container, idempotent per (run, attempt); its name comes back.
    fn create<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        env_dir: &'a Path,
    ) -> EngineFuture<'a, Result<String, ContainerError>>;
    /// Starts a created container (no-op when it already runs).
    fn start<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>>;
    /// The container's state, `None` when no such container exists.
    fn state<'a>(
        &'a self,
        name: &'a str,
    ) -> EngineFuture<'a, Result<Option<ContainerState>, ContainerError>>;
    /// Waits until the container stopped and returns its exit code (`None` if it is gone).
    fn wait_exit<'a>(
        &'a self,
        name: &'a str,
    ) -> EngineFuture<'a, Result<Option<i32>, ContainerError>>;
    /// SIGKILL; a container that is not running is fine.
    fn kill<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>>;
    /// SIGTERM, then SIGKILL after `grace`; a stopped or missing container is fine.
    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> EngineFuture<'a, Result<(), ContainerError>>;
    /// Removes the container, killing it first if needed; a missing one is fine.
    fn remove<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>>;
    /// Every container labelled for this runner instance, running or not.
    fn find_instance_containers(
        &self,
    ) -> EngineFuture<'_, Result<Vec<FoundContainer>, ContainerError>>;
    /// The container's output from its start (`follow`: until it stops).
    fn open_logs<'a>(
        &'a self,
        name: &'a str,
        follow: bool,
    ) -> EngineFuture<'a, Result<Logs, ContainerError>>;
    /// Attaches to a started container's stdin; `run_dir` is the run attempt's private
    /// (0700) directory, where an engine may keep what a later process needs to re-attach.
    fn attach_stdin<'a>(
        &'a self,
        name: &'a str,
        run_dir: &'a Path,
    ) -> EngineFuture<'a, io::Result<StdinChannel>>;
    /// Stdin again after the runner restarted; `None` when it is closed for good.
    fn reattach_stdin<'a>(
        &'a self,
        name: &'a str,
        run_dir: &'a Path,
    ) -> EngineFuture<'a, Option<StdinChannel>>;
    /// Removes the override images no run used for `after` (`WSRUNNER_IMAGE_PRUNE_AFTER`).
    fn prune_idle_images(&self, after: Duration) -> EngineFuture<'_, ImagePrune>;
}

impl ContainerEngine for Engine {
    fn shared(&self) -> Arc<dyn ContainerEngine> {
        Arc::new(self.clone())
    }

    fn instance(&self) -> &str {
        &self.cfg.instance
    }

    fn output_limit(&self) -> u64 {
        self.cfg.output_limit
    }

    fn program(&self) -> &str {
        &self.cfg.docker
    }

    fn check_job_image<'a>(
        &'a self,
        kind: LaunchKind,
        requested: Option<&'a str>,
    ) -> EngineFuture<'a, Result<String, ContainerError>> {
        Box::pin(Engine::check_job_image(self, kind, requested))
    }

    fn create<'a>(
        &'a self,
        spec: &'a ContainerSpec,
        env_dir: &'a Path,
    ) -> EngineFuture<'a, Result<String, ContainerError>> {
        Box::pin(Engine::create(self, spec, env_dir))
    }

    fn start<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(Engine::start(self, name))
    }

    fn state<'a>(
        &'a self,
        name: &'a str,
    ) -> EngineFuture<'a, Result<Option<ContainerState>, ContainerError>> {
        Box::pin(Engine::state(self, name))
    }

    fn wait_exit<'a>(
        &'a self,
        name: &'a str,
    ) -> EngineFuture<'a, Result<Option<i32>, ContainerError>> {
        Box::pin(Engine::wait_exit(self, name))
    }

    fn kill<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(Engine::kill(self, name))
    }

    fn stop<'a>(
        &'a self,
        name: &'a str,
        grace: Duration,
    ) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(Engine::stop(self, name, grace))
    }

    fn remove<'a>(&'a self, name: &'a str) -> EngineFuture<'a, Result<(), ContainerError>> {
        Box::pin(Engine::remove(self, name))
    }

    fn find_instance_containers(
        &self,
    ) -> EngineFuture<'_, Result<Vec<FoundContainer>, ContainerError>> {
        Box::pin(Engine::find_instance_containers(self))
    }

    fn open_logs<'a>(
        &'a self,
        name: &'a str,
        follow: bool,
    ) -> EngineFuture<'a, Result<Logs, ContainerError>> {
        Box::pin(Engine::open_logs(self, name, follow))
    }

    fn attach_stdin<'a>(
        &'a self,
        name: &'a str,
        run_dir: &'a Path,
    ) -> EngineFuture<'a, io::Result<StdinChannel>> {
        Box::pin(Engine::attach_stdin(self, name, run_dir))
    }

    fn reattach_stdin<'a>(
        &'a self,
        name: &'a str,
        run_dir: &'a Path,
    ) -> EngineFuture<'a, Option<StdinChannel>> {
        Box::pin(Engine::reattach_stdin(self, name, run_dir))
    }

    fn prune_idle_images(&self, after: Duration) -> EngineFuture<'_, ImagePrune> {
        Box::pin(Engine::prune_idle_images(self, after))
    }
}
