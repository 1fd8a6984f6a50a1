//! The devserver's own JSON types: the protocol bodies it serves (spec sections 2 and 3) and
//! the admin API's bodies. Deliberately independent of the runner crate's `wire` module, so
//! the contract tests compare two implementations of the spec rather than one with itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
}

/// `POST /runner/register` body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RegisterBody {
    #[serde(default)]
    pub registration_token: String,
    #[serde(default)]
    pub name: String,
}

/// `POST /runner/register` 201 answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registered {
    pub credential: String,
    pub instance_id: i64,
    pub pool_id: i64,
}

/// `POST /runner/claim` answer: `job` is always present, null when there is no work.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimAnswer {
    pub job: Option<Job>,
}

/// A claimed job, as `RunService.PrepareRemoteClaim` fills it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Job {
    pub run_id: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workspace_path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub initial_prompt: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<JobRepo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<JobRepo>,
}

/// One repo of a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRepo {
    pub workspace_id: i64,
    pub slug: String,
    pub base_ref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub continue_branch: String,
}

/// `POST /runner/runs/{id}/events` body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventBody {
    #[serde(default, rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub payload_json: String,
}

/// `POST /runner/runs/{id}/result` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultBody {
    #[serde(default)]
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub branch: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_commit: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<ResultRepo>,
}

/// One `repos[]` entry of a result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRepo {
    #[serde(default)]
    pub repo_slug: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub branch: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_commit: String,
}

/// `{"ok": true}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ok {
    pub ok: bool,
}

/// `POST /runner/heartbeat` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abort: Vec<i64>,
    pub queue_depth: i64,
}

/// `restapi.RespondError` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
}

// ----- admin API -----

/// `POST /admin/pools`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreatePool {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub max_concurrent_runs: i64,
}

/// A pool as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub id: i64,
    pub name: String,
    pub max_concurrent_runs: i64,
    pub enabled: bool,
}

/// `POST /admin/pools/{id}/tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MintToken {
    /// Lifetime in seconds; the server default when absent.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A freshly minted registration token (shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MintedToken {
    pub token: String,
    pub display_prefix: String,
    pub expires_at_ms: i64,
}

/// `POST /admin/repos`: import a local repository as a bare repo behind the git proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateRepo {
    /// `owner/name`.
    pub slug: String,
    /// A local git repository (working tree or bare) to clone from.
    pub path: String,
}

/// A repository behind the git proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repo {
    pub slug: String,
    pub bare_path: String,
}

/// `POST /admin/runs`: enqueue a run for a pool.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnqueueRun {
    pub pool_id: i64,
    #[serde(default)]
    pub repos: Vec<EnqueueRepo>,
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Workspace id the run belongs to (default 1).
    #[serde(default)]
    pub workspace_id: Option<i64>,
    /// An ephemeral test run (spec 11): its run token fetches but holds no push grant.
    #[serde(default)]
    pub test_run: bool,
}

/// One repo of an enqueued run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnqueueRepo {
    pub slug: String,
    #[serde(default)]
    pub base_ref: String,
    #[serde(default)]
    pub continue_branch: String,
}

/// A run as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunView {
    pub id: i64,
    pub pool_id: i64,
    pub status: String,
    pub kind: String,
    pub image: String,
    pub prompt: String,
    pub repos: Vec<JobRepo>,
    pub runner_id: Option<i64>,
    pub queued_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    pub error: String,
    pub cancel_requested: bool,
    pub summary: String,
    pub container_id: String,
    /// Branch and base commit kept after the section 7 validation.
    pub branch: String,
    pub base_commit: String,
    pub result_repos: Vec<ResultRepo>,
    /// The result body exactly as the runner reported it (first accepted report).
    pub reported: Option<ResultBody>,
}

/// One stored event of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: u64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload_json: String,
    pub created_at_ms: i64,
}

/// A runner instance as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: i64,
    pub pool_id: i64,
    pub name: String,
    pub status: String,
    pub registered_at_ms: i64,
    pub last_heartbeat_at_ms: Option<i64>,
}

/// Fault injection settings, switchable at runtime (`PUT /admin/faults`). Probabilities are
/// in `0.0..=1.0` and apply to every runner-protocol and git-proxy request, or only to those
/// whose path starts with `only_path_prefix`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Faults {
    #[serde(default)]
    pub error_5xx_probability: f64,
    #[serde(default)]
    pub rate_429_probability: f64,
    #[serde(default)]
    pub drop_connection_probability: f64,
    #[serde(default)]
    pub added_latency_ms: u64,
    /// While set and in the future (unix ms), every request answers 503.
    #[serde(default)]
    pub outage_until_ms: Option<i64>,
    /// The next N claims that hand out a run are carried out, then their connection is
    /// closed without an answer: the run is `running` for an instance that never saw it.
    #[serde(default)]
    pub lose_claim_answers: u32,
    /// When set, faults (latency and outage included) hit only requests whose full path
    /// starts with this, e.g. `/api/git-proxy/` or `/api/runner/claim`; others pass untouched.
    #[serde(default)]
    pub only_path_prefix: Option<String>,
}

/// `POST /admin/harness`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Harness {
    pub enabled: bool,
}
