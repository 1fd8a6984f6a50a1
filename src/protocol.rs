//! The Windshift runner protocol's JSON bodies, field for field (spec sections 2 and 3).
//!
//! Shared vocabulary: the client sends and parses these, and the state machine keeps the parts
//! of a [`JobSpec`] it needs (the devserver has its own copy of the wire, devserver/src/types.rs,
//! so a change here cannot silently agree with itself). Unknown fields are ignored on input
//! (serde's default), and optional fields are omitted when empty on output, as upstream does.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// `POST /runner/register` request (spec 2.3).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub registration_token: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("registration_token", &crate::redact::MASK)
            .field("name", &self.name)
            .finish()
    }
}

/// `POST /runner/register` 201 response (spec 2.3).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub credential: String,
    pub instance_id: i64,
    pub pool_id: i64,
}

impl fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("credential", &crate::redact::MASK)
            .field("instance_id", &self.instance_id)
            .field("pool_id", &self.pool_id)
            .finish()
    }
}

/// `POST /runner/claim` response: always 200, `job` is null when there is no work (spec 2.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub job: Option<JobSpec>,
}

/// Job kinds (spec 3). An empty kind means `coding_agent`.
pub const KIND_CODING_AGENT: &str = "coding_agent";
pub const KIND_ACTION_CONTAINER: &str = "action_container";
pub const KIND_CI_TASK: &str = "ci_task";

/// A claimed job (spec 3). `env` holds secrets (`WS_TOKEN`, `LLM_API_KEY`), so `Debug` masks
/// every env value.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
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
    /// Deprecated mirror of `repos[0]`; read when `repos` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<RepoSpec>,
}

impl JobSpec {
    /// The repos to check out, primary first: `repos`, else the deprecated `repo`.
    pub fn effective_repos(&self) -> Vec<RepoSpec> {
        if !self.repos.is_empty() {
            self.repos.clone()
        } else {
            self.repo.iter().cloned().collect()
        }
    }

    /// The job kind with the empty default resolved (spec 3).
    pub fn effective_kind(&self) -> &str {
        if self.kind.is_empty() {
            KIND_CODING_AGENT
        } else {
            &self.kind
        }
    }

    /// The per-run token used for git-proxy auth and the LLM proxy, when the server minted one.
    pub fn run_token(&self) -> Option<&str> {
        self.env
            .get("WS_TOKEN")
            .map(String::as_str)
            .filter(|t| !t.trim().is_empty())
    }
}

impl fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_keys: Vec<&String> = self.env.keys().collect();
        f.debug_struct("JobSpec")
            .field("run_id", &self.run_id)
            .field("kind", &self.kind)
            .field("image", &self.image)
            .field("env_keys", &env_keys)
            .field("initial_prompt_len", &self.initial_prompt.len())
            .field("repo", &self.repo)
            .field("repos", &self.repos)
            .finish()
    }
}

/// One repo of a job (spec 3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoSpec {
    #[serde(default)]
    pub workspace_id: i64,
    #[serde(default)]
    pub slug: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_ref: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub continue_branch: String,
}

/// `POST /runner/runs/{id}/events` request: one event (spec 2.5). `payload_json` is JSON
/// *text*, not a nested object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRequest {
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload_json: String,
}

/// Terminal statuses a runner may report (spec 2.6).
pub const STATUS_SUCCEEDED: &str = "succeeded";
pub const STATUS_FAILED: &str = "failed";
pub const STATUS_CANCELED: &str = "canceled";
pub const STATUS_KILLED: &str = "killed";

/// `POST /runner/runs/{id}/result` request (spec 2.6).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRequest {
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
    pub repos: Vec<RepoResult>,
}

/// One entry of `result.repos` (spec 2.6). Repos with no changes carry only `repo_slug`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoResult {
    pub repo_slug: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub branch: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base_commit: String,
}

/// `{"ok": true}`, the success body of events and result (spec 2.5, 2.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkResponse {
    pub ok: bool,
}

/// `POST /runner/heartbeat` response (spec 2.7). `abort` is omitted when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abort: Vec<i64>,
    #[serde(default)]
    pub queue_depth: i64,
}

/// `GET /version` response (spec 2.2): only a non-empty `version` matters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionResponse {
    #[serde(default)]
    pub version: String,
}

/// The server's error body (`restapi.RespondError`, spec 2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_debug_never_shows_env_values() {
        let mut job = JobSpec {
            run_id: 7,
            ..Default::default()
        };
        job.env
            .insert("WS_TOKEN".into(), "secret-run-token-xyz".into());
        let dbg = format!("{job:?}");
        assert!(!dbg.contains("secret-run-token-xyz"), "{dbg}");
        assert!(dbg.contains("WS_TOKEN"));
    }

    #[test]
    fn null_job_means_no_work_and_unknown_fields_are_ignored() {
        let r: ClaimResponse = serde_json::from_str(r#"{"job":null,"extra":1}"#).unwrap();
        assert_eq!(r.job, None);
    }

    #[test]
    fn deprecated_repo_is_used_when_repos_is_empty() {
        let j: JobSpec = serde_json::from_str(
            r#"{"run_id":3,"repo":{"workspace_id":1,"slug":"a/b","base_ref":"main"}}"#,
        )
        .unwrap();
        assert_eq!(j.effective_repos().len(), 1);
        assert_eq!(j.effective_kind(), KIND_CODING_AGENT);
    }

    #[test]
    fn report_omits_empty_fields() {
        let r = ReportRequest {
            status: STATUS_SUCCEEDED.into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"status":"succeeded"}"#
        );
    }
}
