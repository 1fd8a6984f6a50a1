//! The run plan: the parts of a claimed [`JobSpec`] the state machine needs, with every secret
//! moved out into [`RunSecrets`] so that plans can be printed, journaled and exported freely.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::protocol::{JobSpec, RepoSpec, KIND_CODING_AGENT};

/// Env keys that always hold a secret (spec 3: `WS_TOKEN` is the run token, `LLM_API_KEY` is
/// the run token again when the binding has an LLM grant).
const SECRET_ENV_KEYS: [&str; 2] = ["WS_TOKEN", "LLM_API_KEY"];

/// Env key suffixes treated as secrets even though spec 3 does not list them today: a newer
/// server may forward more credentials, and over-masking costs nothing.
const SECRET_ENV_SUFFIXES: [&str; 5] =
    ["_TOKEN", "_API_KEY", "_SECRET", "_PASSWORD", "_CREDENTIAL"];

/// The agent's model id variable (spec 6.3: windshift-agent exits 2 without it).
pub const LLM_MODEL: &str = "LLM_MODEL";

/// Env the runner host supplies when the server does not (`WSRUNNER_LLM_MODEL`). Passed in as
/// data so the plan stays a pure function of the claim and the host's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostDefaults {
    pub llm_model: Option<String>,
}

/// What the runner needs to carry a claimed run through its life. Holds no secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPlan {
    pub run_id: i64,
    /// The effective job kind (`coding_agent` when the server sent none).
    pub kind: String,
    /// The image to run; empty means the runner's default agent image (coding_agent only).
    #[serde(default)]
    pub image: String,
    /// Repos to check out, primary first (`repos`, else the deprecated `repo`).
    #[serde(default)]
    pub repos: Vec<RepoSpec>,
    /// The initial prompt written to the agent's stdin.
    #[serde(default)]
    pub prompt: String,
    /// The container env without secret values (those live in [`RunSecrets`]).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// This runner instance's name: part of the deterministic container name and labels, so a
    /// restarted runner finds its own containers and never another instance's.
    #[serde(default)]
    pub instance: String,
    /// Why the runner refuses this job before doing any work (claim input it cannot carry
    /// safely), set by [`RunPlan::from_job`]; [`crate::fsm::claim`] reports it as the run's
    /// failure. Never holds an env value, only its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl RunPlan {
    /// Splits a claimed job into the plan and the secrets it carried. `instance` is the runner
    /// instance name used in container names (see [`RunPlan::container_name`]).
    pub fn from_job(job: &JobSpec, instance: &str) -> (RunPlan, RunSecrets) {
        let token = job.run_token().map(str::to_owned);
        let mut env = BTreeMap::new();
        let mut secret_env = BTreeMap::new();
        let mut refused = None;
        for (key, value) in &job.env {
            // An entry a container env cannot carry is dropped (its value may be a secret: it
            // is kept nowhere) and the run is refused, naming only the key.
            if let Some(why) = env_entry_problem(key, value) {
                refused.get_or_insert(why);
                continue;
            }
            let is_secret = SECRET_ENV_KEYS.contains(&key.as_str())
                || SECRET_ENV_SUFFIXES.iter().any(|s| key.ends_with(s))
                || token.as_deref().is_some_and(|t| t == value);
            if is_secret {
                secret_env.insert(key.clone(), value.clone());
            } else {
                env.insert(key.clone(), value.clone());
            }
        }
        let plan = RunPlan {
            run_id: job.run_id,
            kind: job.effective_kind().to_owned(),
            image: job.image.clone(),
            repos: job.effective_repos(),
            prompt: job.initial_prompt.clone(),
            env,
            instance: instance.to_owned(),
            refused,
        };
        (plan, RunSecrets { env: secret_env })
    }

    /// Adds the host's defaults to a coding agent's env where the claim left the key out (or
    /// blank): the server's value always wins. Called before the plan is journaled, so the
    /// journal shows exactly the env the agent got.
    pub fn apply_host_defaults(&mut self, defaults: &HostDefaults) {
        if !self.is_coding_agent() {
            return;
        }
        if let Some(model) = &defaults.llm_model {
            let present = self
                .env
                .get(LLM_MODEL)
                .is_some_and(|v| !v.trim().is_empty());
            if !present {
                self.env.insert(LLM_MODEL.into(), model.clone());
            }
        }
    }

    /// Why the job must fail before any work, if it must: a refused env entry, or a repos
    /// list naming one repository twice (both checkouts would share a directory and a push
    /// could carry the wrong one). Pure; [`crate::fsm::claim`] calls it.
    pub fn refusal(&self) -> Option<String> {
        if let Some(why) = &self.refused {
            return Some(why.clone());
        }
        let mut seen = std::collections::BTreeSet::new();
        for repo in &self.repos {
            if !seen.insert(slug_identity(&repo.slug)) {
                return Some(format!(
                    "the job lists repository {} more than once (slugs compare case-insensitively); the runner refuses it",
                    shown(&repo.slug)
                ));
            }
        }
        None
    }

    /// True for the coding-agent kind (JSONL contract, spec 6.5 verdict table); every other
    /// kind is a plain container job (spec 5.2, 5.4).
    pub fn is_coding_agent(&self) -> bool {
        self.kind == KIND_CODING_AGENT
    }

    /// The deterministic container name for an attempt (`names::container_name`, which the
    /// engine uses too).
    pub fn container_name(&self, attempt: u32) -> String {
        super::names::container_name(&self.instance, self.run_id, attempt)
    }

    /// The branch a repo's work is pushed to: its continuation branch, else
    /// `agent-runs/run-<id>` (spec 3, 4.9).
    pub fn branch_for(&self, repo: &RepoSpec) -> String {
        if repo.continue_branch.is_empty() {
            format!("agent-runs/run-{}", self.run_id)
        } else {
            repo.continue_branch.clone()
        }
    }

    /// The full container env: the plan's env, the secrets, and `AGENT_RUN_ID`, which always
    /// wins (spec 5.3).
    pub fn container_env(&self, secrets: &RunSecrets) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.extend(secrets.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.insert("AGENT_RUN_ID".into(), self.run_id.to_string());
        env
    }
}

/// What git hosts treat as one repository: `Owner/Repo`, `owner/repo.git` and `owner/repo/`
/// are the same slug.
fn slug_identity(slug: &str) -> String {
    let s = slug.trim().trim_end_matches('/');
    s.strip_suffix(".git").unwrap_or(s).to_lowercase()
}

/// Server text in a message: quoted, escaped and at most 64 characters.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(64).collect();
    let more = if cut.len() < text.len() { "…" } else { "" };
    format!("{cut:?}{more}")
}

/// Why a claim env entry cannot reach a container, naming the key and never the value: a
/// key the env file format and the engines refuse, or a value holding a NUL byte (a process
/// environment cannot carry it) or a line break (the env file is one variable per line).
pub fn env_entry_problem(key: &str, value: &str) -> Option<String> {
    let mut chars = key.chars();
    let key_ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !key_ok {
        return Some(format!(
            "claim env key {} is not a valid variable name (letters, digits, _); the runner refuses the run",
            shown(key)
        ));
    }
    let what = if value.contains('\0') {
        "a NUL byte"
    } else if value.contains(['\n', '\r']) {
        "a line break"
    } else {
        return None;
    };
    Some(format!(
        "claim env {key}: the value holds {what}, which a container environment cannot carry; the runner refuses the run (the value is not shown)"
    ))
}

impl fmt::Debug for RunPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunPlan")
            .field("run_id", &self.run_id)
            .field("kind", &self.kind)
            .field("image", &self.image)
            .field("repos", &self.repos)
            .field("prompt_len", &self.prompt.len())
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("instance", &self.instance)
            .finish()
    }
}

/// Secret env values of a run (the run token and anything shaped like a credential). Kept
/// apart from the plan so that only the journal's dedicated field ever holds them; every
/// printer and exporter masks them ([`RunSecrets::redacted`]).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSecrets {
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl RunSecrets {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
    }

    /// The same keys with every value replaced by [`crate::redact::MASK`].
    pub fn redacted(&self) -> RunSecrets {
        RunSecrets {
            env: self
                .env
                .keys()
                .map(|k| (k.clone(), crate::redact::MASK.to_owned()))
                .collect(),
        }
    }
}

impl fmt::Debug for RunSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunSecrets")
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobSpec {
        let mut job = JobSpec {
            run_id: 42,
            initial_prompt: "fix it".into(),
            repos: vec![RepoSpec {
                workspace_id: 1,
                slug: "acme/app".into(),
                base_ref: "main".into(),
                continue_branch: String::new(),
            }],
            ..Default::default()
        };
        job.env
            .insert("WS_TOKEN".into(), "tok-secret-123456".into());
        job.env
            .insert("LLM_API_KEY".into(), "tok-secret-123456".into());
        job.env.insert("WS_WORKSPACE_KEY".into(), "ACME".into());
        job.env.insert("AGENT_RUN_ID".into(), "42".into());
        job
    }

    #[test]
    fn secrets_leave_the_plan_and_come_back_for_the_container() {
        let (plan, secrets) = RunPlan::from_job(&job(), "host-a");
        assert!(!plan.env.contains_key("WS_TOKEN"));
        assert!(!plan.env.contains_key("LLM_API_KEY"));
        assert_eq!(
            plan.env.get("WS_WORKSPACE_KEY").map(String::as_str),
            Some("ACME")
        );
        let json = serde_json::to_string(&plan).unwrap();
        assert!(!json.contains("tok-secret-123456"), "{json}");
        assert!(!format!("{plan:?}").contains("tok-secret"));
        assert!(!format!("{secrets:?}").contains("tok-secret"));
        let env = plan.container_env(&secrets);
        assert_eq!(
            env.get("WS_TOKEN").map(String::as_str),
            Some("tok-secret-123456")
        );
        assert_eq!(env.get("AGENT_RUN_ID").map(String::as_str), Some("42"));
        assert!(!serde_json::to_string(&secrets.redacted())
            .unwrap()
            .contains("tok-secret"));
    }

    #[test]
    fn container_names_are_deterministic_and_docker_safe() {
        let (mut plan, _) = RunPlan::from_job(&job(), "host a/1");
        assert_eq!(plan.container_name(2), "wsr-host-a-1-run-42-2");
        plan.instance.clear();
        assert_eq!(plan.container_name(1), "wsr-default-run-42-1");
    }

    #[test]
    fn continuation_repo_pushes_its_own_branch() {
        let (plan, _) = RunPlan::from_job(&job(), "x");
        assert_eq!(plan.branch_for(&plan.repos[0]), "agent-runs/run-42");
        let mut repo = plan.repos[0].clone();
        repo.continue_branch = "feature/x".into();
        assert_eq!(plan.branch_for(&repo), "feature/x");
    }

    #[test]
    fn host_model_fills_only_a_missing_llm_model() {
        let defaults = HostDefaults {
            llm_model: Some("host-model".into()),
        };
        let (mut plan, _) = RunPlan::from_job(&job(), "x");
        plan.apply_host_defaults(&defaults);
        assert_eq!(
            plan.env.get(LLM_MODEL).map(String::as_str),
            Some("host-model")
        );

        for (sent, want) in [("server-model", "server-model"), ("  ", "host-model")] {
            let mut j = job();
            j.env.insert(LLM_MODEL.into(), sent.into());
            let (mut plan, _) = RunPlan::from_job(&j, "x");
            plan.apply_host_defaults(&defaults);
            assert_eq!(
                plan.env.get(LLM_MODEL).map(String::as_str),
                Some(want),
                "{sent:?}"
            );
        }

        let (mut plain, _) = RunPlan::from_job(&job(), "x");
        plain.apply_host_defaults(&HostDefaults::default());
        assert!(!plain.env.contains_key(LLM_MODEL));
        let mut ci = job();
        ci.kind = "ci_task".into();
        let (mut ci_plan, _) = RunPlan::from_job(&ci, "x");
        ci_plan.apply_host_defaults(&defaults);
        assert!(
            !ci_plan.env.contains_key(LLM_MODEL),
            "only coding agents get it"
        );
    }

    #[test]
    fn env_values_a_container_cannot_carry_refuse_the_run_naming_only_the_key() {
        for (bad, what) in [
            ("sk-live\0-secret-value", "NUL"),
            ("sk-live\n-secret", "line break"),
        ] {
            let mut j = job();
            j.env.insert("OPENAI_API_KEY".into(), bad.into());
            let (plan, secrets) = RunPlan::from_job(&j, "h");
            let why = plan.refusal().expect("refused");
            assert!(
                why.contains("OPENAI_API_KEY") && why.contains(what),
                "{why}"
            );
            assert!(!why.contains("sk-live"), "value echoed: {why}");
            assert!(!secrets.env.contains_key("OPENAI_API_KEY"));
            assert!(!serde_json::to_string(&plan).unwrap().contains("sk-live"));
        }
        let mut j = job();
        j.env.insert("BAD KEY=1".into(), "x".into());
        let why = RunPlan::from_job(&j, "h").0.refusal().expect("refused");
        assert!(why.contains("BAD KEY=1"), "{why}");
        assert_eq!(RunPlan::from_job(&job(), "h").0.refusal(), None);
    }

    #[test]
    fn a_repo_listed_twice_is_refused_case_insensitively() {
        let mut j = job();
        let mut twin = j.repos[0].clone();
        twin.slug = "ACME/App.git".into();
        twin.base_ref = "other".into();
        j.repos.push(twin);
        let why = RunPlan::from_job(&j, "h").0.refusal().expect("refused");
        assert!(
            why.contains("more than once") && why.contains("App"),
            "{why}"
        );
        j.repos[1].slug = "acme/app2".into();
        assert_eq!(RunPlan::from_job(&j, "h").0.refusal(), None);
    }
}
