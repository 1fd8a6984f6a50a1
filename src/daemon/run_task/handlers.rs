//! The effect handlers of a run outside its container phase: prepare, checkout removal,
//! head inspection, push, events, the report, and the terminal clean-up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::{Interrupted, RunTask, StopRequest, ABANDONED};
use crate::control::client::ControlError;
use crate::control::wire::{EventRequest, ReportRequest};
use crate::effects::git::{
    self, cache_objects, repo_proxy_url, run_paths, validate_slug, RepoGitError, RunRepo,
    RunWorkspaceRequest, WsToml,
};
use crate::effects::session::remove_dir;
use crate::fsm::{Checkout, CheckoutRepo, Effect, Event, RepoHead, RunState};
use crate::redact::redact;

impl RunTask {
    pub(super) async fn prepare(&mut self) -> Result<Vec<Effect>, Interrupted> {
        let plan = self.last.state.plan().clone();
        let Some(token) = self.token() else {
            return self
                .commit(Event::CheckoutFailed {
                    error: "no WS_TOKEN for git-proxy auth".into(),
                })
                .await;
        };
        let mut repos = Vec::new();
        for repo in &plan.repos {
            let Some(remote_url) = repo_proxy_url(&self.ctx.cfg.api_url, &plan, &repo.slug) else {
                // Before any git work: the run fails at once with the validator's reason.
                let why = validate_slug(&repo.slug)
                    .err()
                    .map_or_else(|| "want owner/name".to_owned(), |e| e.problem);
                return self
                    .commit(Event::CheckoutFailed {
                        error: format!("invalid repo slug: {why}"),
                    })
                    .await;
            };
            repos.push(RunRepo {
                workspace_id: repo.workspace_id,
                slug: repo.slug.clone(),
                base_ref: if repo.base_ref.is_empty() {
                    "main".into()
                } else {
                    repo.base_ref.clone()
                },
                continue_branch: repo.continue_branch.clone(),
                remote_url,
            });
        }
        let env: HashMap<String, String> = plan.container_env(&self.secrets).into_iter().collect();
        // If this future is dropped (shutdown), the blocking prepare stops retrying too.
        let retry = self.git_retry();
        let _cancel_if_dropped = retry.cancel_on_drop();
        let request = RunWorkspaceRequest {
            root: self.ctx.cfg.cache_root.display().to_string(),
            run_id: self.run_id,
            repos,
            token,
            policy: self.ctx.git_policy,
            ws_toml: WsToml::from_run_env(&env),
            retry: retry.clone(),
            ..Default::default()
        };
        let work = tokio::task::spawn_blocking(move || git::prepare_run_workspace(&request));
        let (result, mut extra) = self.with_stops(work, Some(&retry)).await?;
        let event = match result {
            Some(Ok(Ok(ws))) => Event::CheckoutReady {
                checkout: Checkout {
                    root: ws.mount_path.display().to_string(),
                    repos: ws
                        .repos
                        .iter()
                        .map(|r| CheckoutRepo {
                            slug: r.slug.clone(),
                            path: r.output.checkout_path.display().to_string(),
                            branch: r.output.branch.clone(),
                            base_commit: r.output.base_commit.clone(),
                        })
                        .collect(),
                },
            },
            Some(Ok(Err(e))) => Event::CheckoutFailed {
                error: redact(&e.to_string()).into_owned(),
            },
            Some(Err(e)) => Event::CheckoutFailed {
                error: format!("prepare task failed: {e}"),
            },
            None => Event::CheckoutFailed {
                error: ABANDONED.into(),
            },
        };
        extra.extend(self.commit(event).await?);
        Ok(extra)
    }

    /// Removes every path this run may have checked out (idempotent).
    pub(super) async fn remove_checkout(&self) {
        let paths = run_paths(
            &self.ctx.cfg.cache_root,
            self.run_id,
            self.last.state.plan(),
        );
        let result = tokio::task::spawn_blocking(move || {
            for path in paths {
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("remove {}: {e}", path.display())),
                }
            }
            Ok(())
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(run_id = self.run_id, "checkout removal failed: {e}"),
            Err(e) => warn!(run_id = self.run_id, "checkout removal task failed: {e}"),
        }
    }

    pub(super) async fn inspect_heads(&mut self) -> Result<Vec<Effect>, Interrupted> {
        let checkout = match &self.last.state {
            RunState::Running { checkout, .. } => checkout.clone(),
            _ => Checkout::default(),
        };
        let work = tokio::task::spawn_blocking(move || {
            let mut heads = Vec::new();
            for repo in &checkout.repos {
                let head = git::branch_head(Path::new(&repo.path), &repo.branch)
                    .map_err(|e| RepoGitError::new(&repo.slug, e))?;
                heads.push(RepoHead {
                    slug: repo.slug.clone(),
                    head,
                });
            }
            Ok::<_, RepoGitError>(heads)
        });
        let (result, mut extra) = self.with_stops(work, None).await?;
        let event = match result {
            Some(Ok(Ok(heads))) => Event::HeadsInspected { heads },
            Some(Ok(Err(e))) => Event::PushFailed {
                error: e.report(self.run_id, "reading the run branch"),
            },
            Some(Err(e)) => Event::PushFailed {
                error: format!("head inspection task failed: {e}"),
            },
            None => Event::PushFailed {
                error: ABANDONED.into(),
            },
        };
        extra.extend(self.commit(event).await?);
        Ok(extra)
    }

    pub(super) async fn push(&mut self, heads: Vec<RepoHead>) -> Result<Vec<Effect>, Interrupted> {
        let plan = self.last.state.plan().clone();
        let checkout = match &self.last.state {
            RunState::Running { checkout, .. } => checkout.clone(),
            _ => Checkout::default(),
        };
        let token = self.token().unwrap_or_default();
        // One budget and cancel switch for the run's pushes; dropping this future cancels it
        // (and kills the git call under way).
        let retry = self.git_retry();
        let _cancel_if_dropped = retry.cancel_on_drop();
        let mut requests = Vec::new();
        for head in &heads {
            let Some(repo) = checkout.repos.iter().find(|r| r.slug == head.slug) else {
                continue;
            };
            let remote_url =
                repo_proxy_url(&self.ctx.cfg.api_url, &plan, &repo.slug).unwrap_or_default();
            requests.push(git::PushRequest {
                checkout: PathBuf::from(&repo.path),
                branch: repo.branch.clone(),
                remote_url,
                token: token.clone(),
                skip_if_head: repo.base_commit.clone(),
                policy: self.ctx.git_policy,
                retry: retry.clone(),
                cache_objects: cache_objects(&self.ctx.cfg.cache_root, &plan, &repo.slug),
            });
        }
        let work = tokio::task::spawn_blocking(move || {
            let mut pushed = Vec::new();
            for (request, head) in requests.iter().zip(&heads) {
                let outcome = git::push(request).map_err(|e| RepoGitError::new(&head.slug, e))?;
                if !outcome.skipped {
                    pushed.push(RepoHead {
                        slug: head.slug.clone(),
                        head: outcome.head_sha,
                    });
                }
            }
            Ok::<_, RepoGitError>(pushed)
        });
        let (result, mut extra) = self.with_stops(work, Some(&retry)).await?;
        let event = match result {
            Some(Ok(Ok(pushed))) if pushed.is_empty() => Event::PushSkipped,
            Some(Ok(Ok(pushed))) => Event::PushDone { heads: pushed },
            Some(Ok(Err(e))) => Event::PushFailed {
                error: e.report(self.run_id, "push"),
            },
            Some(Err(e)) => Event::PushFailed {
                error: format!("push task failed: {e}"),
            },
            None => Event::PushFailed {
                error: ABANDONED.into(),
            },
        };
        extra.extend(self.commit(event).await?);
        Ok(extra)
    }

    pub(super) async fn send_event(&mut self, event_type: String, payload_json: String) {
        if let Some(events) = &self.events {
            events
                .send(EventRequest {
                    event_type,
                    payload_json,
                })
                .await;
        }
    }

    pub(super) async fn report(
        &mut self,
        report: ReportRequest,
    ) -> Result<Vec<Effect>, Interrupted> {
        // Every event goes out before the verdict: after it the server answers 409.
        if let Some(events) = self.events.take() {
            let finish = events.finish();
            tokio::pin!(finish);
            let summary = loop {
                tokio::select! {
                    summary = &mut finish => break summary,
                    stop = self.stops.recv() => match stop {
                        // A drain past its deadline: the report intent is journaled.
                        Some(StopRequest::Drain) => return Err(Interrupted::Shutdown),
                        Some(StopRequest::Cancel) => {}
                        None => break finish.await,
                    },
                }
            };
            if let Some(why) = summary.stopped {
                debug!(run_id = self.run_id, "event stream ended early: {why}");
            }
        }
        // Every event was delivered or refused for good: nothing is left to replay.
        self.settle_output().await;
        // The client retries within its budget (minutes). A drain past its deadline must not
        // wait that out: the report intent is journaled, so the next start sends it again.
        let client = self.ctx.client.clone();
        let answer = {
            let call = client.report(self.run_id, &report);
            tokio::pin!(call);
            loop {
                tokio::select! {
                    answer = &mut call => break answer,
                    stop = self.stops.recv() => match stop {
                        Some(StopRequest::Drain) => return Err(Interrupted::Shutdown),
                        // A cancel cannot change a decided verdict; keep reporting it.
                        Some(StopRequest::Cancel) => {}
                        None => break call.await,
                    },
                }
            }
        };
        let event = match answer {
            Ok(()) => {
                self.ctx.metrics.request("report", "ok");
                info!(run_id = self.run_id, status = %report.status, "verdict reported");
                Event::ReportAccepted
            }
            Err(e) => {
                self.ctx
                    .metrics
                    .request("report", &crate::daemon::outcome_label(&e));
                match (&e, e.status()) {
                    (ControlError::CredentialRejected(_), _) => {
                        return Err(Interrupted::CredentialRejected)
                    }
                    (_, Some(409)) => {
                        info!(
                            run_id = self.run_id,
                            "the server already finalized the run (409); nothing to report"
                        );
                        Event::ReportRejected409
                    }
                    (_, Some(400 | 403 | 404)) => Event::ReportFailed {
                        error: e.to_string(),
                        retryable: false,
                    },
                    _ => {
                        warn!(run_id = self.run_id, "report failed, will retry: {e}");
                        if self.ctx.shutting_down() {
                            return Err(Interrupted::Shutdown);
                        }
                        let pause = self.ctx.report_retry_pause;
                        let mut shutdown = self.ctx.shutdown.subscribe();
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = shutdown.changed() => return Err(Interrupted::Shutdown),
                        }
                        Event::ReportFailed {
                            error: e.to_string(),
                            retryable: true,
                        }
                    }
                }
            }
        };
        self.commit(event).await
    }

    /// The run is terminal: drop every trace on the host (containers of any attempt, private
    /// files, checkout) and forget its secrets.
    pub(super) async fn finish_terminal(&mut self) {
        if let Some(events) = self.events.take() {
            events.finish().await;
        }
        if let Ok(found) = self.ctx.engine.find_instance_containers().await {
            for c in found.iter().filter(|c| c.run_id == Some(self.run_id)) {
                if let Err(e) = self.ctx.engine.remove(&c.name).await {
                    warn!(container = %c.name, "container removal failed (the sweep retries): {e}");
                }
                remove_dir(&self.container_dir(&c.name));
            }
        }
        // Private dirs of attempts whose container was already gone (e.g. removed before a
        // crash, then redone by recovery); found by the chaos suite, else only the next
        // start's sweep removed them.
        let attempt0 = crate::effects::container::container_name(
            &self.ctx.engine.cfg.instance,
            self.run_id,
            0,
        );
        if let Some(prefix) = attempt0.strip_suffix('0') {
            if let Ok(entries) = std::fs::read_dir(&self.ctx.containers_dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.strip_prefix(prefix).is_some_and(|attempt| {
                        !attempt.is_empty() && attempt.bytes().all(|b| b.is_ascii_digit())
                    }) {
                        remove_dir(&entry.path());
                    }
                }
            }
        }
        self.remove_checkout().await;
        for secret in self.secrets.env.values() {
            crate::redact::forget_secret(secret);
        }
    }
}
