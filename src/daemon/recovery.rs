//! Start-up recovery: every non-terminal journaled run is decided by the pure recovery table
//! (`fsm::recover`) from what the host observes, then the sweep removes what no active run
//! owns (containers labelled for this instance, checkouts, private container files).

use std::collections::HashSet;
use std::path::Path;

use tracing::{info, warn};

use super::run_task::Start;
use super::Ctx;
use crate::control::client::ControlError;
use crate::control::wire::EventRequest;
use crate::effects::container::{ContainerState, FoundContainer};
use crate::effects::git;
use crate::effects::git::repo_proxy_url;
use crate::fsm::{
    recover, ContainerObservation, Observations, Phase, RecoveryDecision, RunSecrets, RunState,
};
use crate::journal::{Record, Slot};

/// How long recovery waits for the server to say whether a run is still running.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One run to resume, with how to start its task.
pub(crate) struct Resume {
    pub first: Record,
    pub last: Record,
    pub secrets: RunSecrets,
    pub start: Start,
}

/// What recovery found: runs to resume and everything active runs own (for the sweep).
pub(crate) struct Recovered {
    pub resume: Vec<Resume>,
    pub owned_containers: HashSet<String>,
    pub owned_runs: HashSet<i64>,
}

/// Decides every active run. Quarantined runs are kept (bytes and host traces) and never
/// acted on.
pub(crate) async fn recover_runs(ctx: &Ctx) -> Result<Recovered, String> {
    let active = ctx.journal.active().map_err(|e| e.to_string())?;
    // Stopped containers still hold the output of runs whose sender had not drained at the
    // crash; they are replayed (and so kept from the sweep) below.
    let containers = if active.is_empty() {
        Vec::new()
    } else {
        ctx.engine
            .find_instance_containers()
            .await
            .unwrap_or_else(|e| {
                warn!("cannot list this instance's containers ({e}); no output is replayed");
                Vec::new()
            })
    };
    let mut recovered = Recovered {
        resume: Vec::new(),
        owned_containers: HashSet::new(),
        owned_runs: HashSet::new(),
    };
    for slot in active {
        let last = match slot {
            Slot::Quarantined(q) => {
                warn!(
                    run_id = q.run_id,
                    seq = q.seq,
                    "unreadable journal record quarantined: {} (no action taken; see `windshift-runner journal verify`)",
                    q.error
                );
                ctx.metrics.recovery_decision("quarantined");
                recovered.owned_runs.insert(q.run_id);
                continue;
            }
            Slot::Record(r) => r,
        };
        let run_id = last.run_id;
        recovered.owned_runs.insert(run_id);
        let history = ctx.journal.records(run_id).map_err(|e| e.to_string())?;
        let first = match history.first() {
            Some(Slot::Record(r)) => r.clone(),
            _ => last.clone(),
        };
        let secrets = first.secrets.clone().unwrap_or_default();
        for secret in secrets.env.values() {
            crate::redact::register_secret(secret);
        }
        if let Some(name) = last.state.container().map(|c| c.name.as_str()) {
            recovered.owned_containers.insert(name.to_owned());
        }
        let observations = observe(ctx, &last.state, &secrets).await;
        let decision = recover(&last.state, &observations);
        let label = decision.label();
        ctx.metrics.recovery_decision(label);
        info!(
            run_id,
            decision = label,
            "recovering run ({})",
            last.state.describe()
        );
        let replay = if decision.replays_output() {
            replay_sources(&containers, run_id)
        } else {
            Vec::new()
        };
        let start = match decision {
            RecoveryDecision::Nothing => continue,
            RecoveryDecision::Feed(events) => Start::Feed(events),
            RecoveryDecision::Redo(effects) => Start::Effects(effects),
            RecoveryDecision::Reattach { name, feed } => Start::Reattach { name, feed },
        };
        // The run's output is replayed before it acts on the decision (F5): events queued in
        // the previous process's memory died with it, the container's logs did not.
        let start = if replay.is_empty() {
            start
        } else {
            recovered.owned_containers.extend(replay.iter().cloned());
            Start::Replay {
                containers: replay,
                then: Box::new(start),
            }
        };
        recovered.resume.push(Resume {
            first,
            last,
            secrets,
            start,
        });
    }
    Ok(recovered)
}

/// The run's containers that have output to replay (any attempt, oldest first): every one
/// that exists and was started. Found by label, because a state past the exit (the report
/// phase) no longer names its container.
fn replay_sources(containers: &[FoundContainer], run_id: i64) -> Vec<String> {
    let mut found: Vec<&FoundContainer> = containers
        .iter()
        .filter(|c| c.run_id == Some(run_id) && c.state != ContainerState::Created)
        .collect();
    found.sort_by_key(|c| c.attempt);
    found.into_iter().map(|c| c.name.clone()).collect()
}

/// Gathers the facts the recovery table needs.
async fn observe(ctx: &Ctx, state: &RunState, secrets: &RunSecrets) -> Observations {
    let mut obs = Observations {
        container: ContainerObservation::Gone,
        checkout_present: false,
        remote_heads: Vec::new(),
        server_says_final: false,
    };
    if let Some(name) = state.container().map(|c| c.name.as_str()) {
        obs.container = match ctx.engine.state(name).await {
            Ok(Some(ContainerState::Running)) => ContainerObservation::Running,
            Ok(Some(ContainerState::Other(s))) if s == "paused" || s == "restarting" => {
                ContainerObservation::Running
            }
            // The previous process stopped it at the end of the handshake (API driver) and
            // died before harvesting: judged as the driver would have (docs/containers.md).
            Ok(Some(ContainerState::Exited {
                oom_killed: false, ..
            })) if ctx
                .containers_dir
                .join(name)
                .join(crate::effects::agent_driver::HANDSHAKE_STOP_FILE)
                .exists() =>
            {
                ContainerObservation::Exited { code: Some(0) }
            }
            Ok(Some(ContainerState::Exited { code, .. })) => {
                ContainerObservation::Exited { code: Some(code) }
            }
            Ok(_) => ContainerObservation::Gone,
            Err(e) => {
                warn!(
                    container = name,
                    "cannot inspect the container ({e}); treating it as gone"
                );
                ContainerObservation::Gone
            }
        };
    }
    if let Some(checkout) = state.checkout() {
        obs.checkout_present = !checkout.root.is_empty() && Path::new(&checkout.root).exists();
    }
    let token = secrets.env.get("WS_TOKEN").cloned().unwrap_or_default();
    if let (Some(heads), Some(checkout)) = (state.pushing_heads(), state.checkout()) {
        let plan = state.plan();
        for head in heads {
            let Some(repo) = checkout.repos.iter().find(|r| r.slug == head.slug) else {
                continue;
            };
            let Some(remote) = repo_proxy_url(&ctx.cfg.api_url, plan, &repo.slug) else {
                continue;
            };
            let branch = repo.branch.clone();
            let token = token.clone();
            let policy = ctx.git_policy;
            let sha = tokio::task::spawn_blocking(move || {
                git::remote_ref_sha(&remote, &branch, &token, policy)
            })
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
            obs.remote_heads.push((head.slug.clone(), sha));
        }
    }
    // Is the run still running on the server? There is no status endpoint (spec 2.8); an
    // informational event answers it: 409/403/404 mean the run is final or no longer ours.
    // A report phase needs no probe: the report itself learns it.
    if state.phase() != Phase::Reporting {
        let probe = EventRequest {
            event_type: "lifecycle".into(),
            payload_json:
                serde_json::json!({"phase": "runner_recovered", "state": state.kind().to_string()})
                    .to_string(),
        };
        // Bounded: with the server down, the client's own retry budget would hold every
        // recovery (and so the first claim) for minutes; the run task learns of a final run
        // later from its events or its report anyway.
        let answer = tokio::time::timeout(
            PROBE_TIMEOUT,
            ctx.client.send_event(state.plan().run_id, &probe),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ControlError::Transport {
                endpoint: "events",
                message: format!("no answer within {PROBE_TIMEOUT:?}"),
            })
        });
        match answer {
            Ok(()) => {}
            Err(e) if matches!(e.status(), Some(409 | 403 | 404)) => obs.server_says_final = true,
            Err(ControlError::CredentialRejected(_)) => {}
            Err(e) => warn!(
                run_id = state.plan().run_id,
                "cannot ask the server about the run ({e}); assuming it still runs"
            ),
        }
    }
    obs
}

/// Removes containers labelled for this instance, checkouts and private container files that
/// no active run owns.
pub(crate) async fn sweep(
    ctx: &Ctx,
    owned_containers: &HashSet<String>,
    owned_runs: &HashSet<i64>,
) {
    match ctx.engine.find_instance_containers().await {
        Ok(found) => {
            for c in found {
                if owned_containers.contains(&c.name) {
                    continue;
                }
                info!(container = %c.name, "sweep: removing a container no active run owns");
                if let Err(e) = ctx.engine.remove(&c.name).await {
                    warn!(container = %c.name, "sweep: removal failed: {e}");
                }
            }
        }
        Err(e) => warn!("sweep: cannot list this instance's containers: {e}"),
    }
    let root = ctx.cfg.cache_root.clone();
    let containers_dir = ctx.containers_dir.clone();
    let owned_runs = owned_runs.clone();
    let owned_containers = owned_containers.clone();
    let removed = tokio::task::spawn_blocking(move || {
        let mut removed = Vec::new();
        for path in stale_checkouts(&root, &owned_runs) {
            if std::fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        }
        if let Ok(entries) = std::fs::read_dir(&containers_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !owned_containers.contains(&name)
                    && std::fs::remove_dir_all(entry.path()).is_ok()
                {
                    removed.push(entry.path());
                }
            }
        }
        removed
    })
    .await
    .unwrap_or_default();
    for path in removed {
        info!(path = %path.display(), "sweep: removed a leftover no active run owns");
    }
}

/// Checkouts under the cache (`<ws>/<owner>/<repo>/runs/<id>`, `.workspaces/run-<id>`) whose
/// run is not active.
fn stale_checkouts(root: &Path, owned: &HashSet<i64>) -> Vec<std::path::PathBuf> {
    let mut stale = Vec::new();
    let dirs = |p: &Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for ws in dirs(root) {
        let name = ws.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref() == Some(".workspaces") {
            for run in dirs(&ws) {
                let id = run
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("run-"))
                    .and_then(|n| n.parse::<i64>().ok());
                if id.is_some_and(|id| !owned.contains(&id)) {
                    stale.push(run);
                }
            }
            continue;
        }
        if name.as_deref().is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        for owner in dirs(&ws) {
            for repo in dirs(&owner) {
                for run in dirs(&repo.join("runs")) {
                    let id = run
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.parse::<i64>().ok());
                    if id.is_some_and(|id| !owned.contains(&id)) {
                        stale.push(run);
                    }
                }
            }
        }
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(name: &str, run_id: i64, attempt: u32, state: ContainerState) -> FoundContainer {
        FoundContainer {
            name: name.into(),
            run_id: Some(run_id),
            attempt: Some(attempt),
            state,
        }
    }

    #[test]
    fn replay_sources_are_the_runs_started_containers_oldest_first() {
        let exited = ContainerState::Exited {
            code: 0,
            oom_killed: false,
        };
        let all = vec![
            found("b", 7, 2, exited.clone()),
            found("a", 7, 1, ContainerState::Other("dead".into())),
            found("never-started", 7, 3, ContainerState::Created),
            found("other-run", 8, 1, exited),
        ];
        assert_eq!(replay_sources(&all, 7), vec!["a", "b"]);
        assert!(replay_sources(&all, 9).is_empty());
    }
}
