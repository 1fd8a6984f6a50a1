//! The control plane as the daemon's loops see it: a claim, a heartbeat, a report, and what
//! the client knows of its credential and of claim answers lost in transit. The claim loop,
//! the heartbeat loop and the run loop use this trait (`Ctx::control`), so a test or a
//! simulation can stand in for the server; [`Client`] is the real one.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use super::client::{AuthState, Client, ControlError};
use super::wire::{HeartbeatResponse, JobSpec, ReportRequest};

/// One control-plane call in flight.
pub type CallFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ControlError>> + Send + 'a>>;

pub trait ControlPlane: Send + Sync {
    /// `POST /runner/claim` (spec 4.3): a job, or none queued.
    fn claim(&self) -> CallFuture<'_, Option<JobSpec>>;
    /// `POST /runner/heartbeat` (spec 4.4).
    fn heartbeat(&self) -> CallFuture<'_, HeartbeatResponse>;
    /// `POST /runner/runs/<id>/result` (spec 4.8).
    fn report<'a>(&'a self, run_id: i64, report: &'a ReportRequest) -> CallFuture<'a, ()>;
    /// Whether the credential was rejected, and why.
    fn auth_state(&self) -> AuthState;
    /// Claim answers lost after the request reached the server, so far (F6).
    fn lost_claim_answers(&self) -> u64;
}

impl ControlPlane for Client {
    fn claim(&self) -> CallFuture<'_, Option<JobSpec>> {
        Box::pin(Client::claim(self))
    }

    fn heartbeat(&self) -> CallFuture<'_, HeartbeatResponse> {
        Box::pin(Client::heartbeat(self))
    }

    fn report<'a>(&'a self, run_id: i64, report: &'a ReportRequest) -> CallFuture<'a, ()> {
        Box::pin(Client::report(self, run_id, report))
    }

    fn auth_state(&self) -> AuthState {
        Client::auth_state(self)
    }

    fn lost_claim_answers(&self) -> u64 {
        self.counters().lost_claim_answers.load(Ordering::Relaxed)
    }
}
