//! The run's effect handlers outside its container phase. Each performs its one effect and
//! returns the one event that is its outcome; the run loop journals it. The git steps come
//! back as a [`Step`] (work the loop awaits while it watches stops), built from a copy of
//! what they need, so nothing here holds the run's state while the loop journals a stop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::{Interrupted, RunTask, Step, ABANDONED};
use crate::control::client::ControlError;
use crate::control::wire::ReportRequest;
use crate::effects::git::{
    self, cache_objects, repo_proxy_url, run_paths, validate_slug, RepoGitError, RunRepo,
    RunWorkspaceRequest, WsToml,
};
use crate::fsm::{Checkout, CheckoutRepo, Event, RepoHead};
use crate::redact::redact;

impl RunTask {
    /// A fresh retry budget for one git step (`WSRUNNER_GIT_RETRY_TIMEOUT`).
    fn git_retry(&self) -> git::GitRetry {
        git::GitRetry::new(git::RetryPolicy {
            max_elapsed: self.ctx.cfg.git_retry_timeout,
            ..git::DEFAULT_GIT_RETRY
        })
    }

    fn token(&self) -> Option<String> {
        self.secrets
            .env
            .get("WS_TOKEN")
            .filter(|t| !t.trim().is_empty())
            .cloned()
    }

    /// The checkout of a run past its container (where heads are read and pushed).
    fn checkout(&self) -> Checkout {
        self.state().checkout().cloned().unwrap_or_default()
    }

    /// Prepare: the run's workspace (caches, checkouts, ws.toml) → `checkout_ready` or
    /// `checkout_failed`.
    pub(super) fn prepare(&self) -> Step {
        let plan = self.state().plan().clone();
        let Some(token) = self.token() else {
            return Step::done(Event::CheckoutFailed {
                error: "no WS_TOKEN for git-proxy auth".into(),
            });
        };
        let mut repos = Vec::new();
        for repo in &plan.repos {
            let Some(remote_url) = repo_proxy_url(&self.ctx.cfg.api_url, &plan, &repo.slug) else {
                // Before any git work: the run fails at once with the validator's reason.
                let why = validate_slug(&repo.slug)
                    .err()
                    .map_or_else(|| "want owner/name".to_owned(), |e| e.problem);
                return Step::done(Event::CheckoutFailed {
                    error: format!("invalid repo slug: {why}"),
                });
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
        let retry = self.git_retry();
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
        // If the work is dropped (shutdown, abandoned), the blocking prepare stops retrying.
        let cancel_if_dropped = retry.cancel_on_drop();
        let git = self.ctx.git.clone();
        let work = async move {
            let _cancel_if_dropped = cancel_if_dropped;
            let prepared =
                tokio::task::spawn_blocking(move || git.prepare_run_workspace(&request)).await;
            match prepared {
                Ok(Ok(ws)) => Event::CheckoutReady {
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
                Ok(Err(e)) => Event::CheckoutFailed {
                    error: redact(&e.to_string()).into_owned(),
                },
                Err(e) => Event::CheckoutFailed {
                    error: format!("prepare task failed: {e}"),
                },
            }
        };
        Step {
            work: Box::pin(work),
            retry: Some(retry),
            abandoned: Event::CheckoutFailed {
                error: ABANDONED.into(),
            },
        }
    }

    /// Removes every path this run may have checked out (idempotent; no event).
    pub(super) async fn remove_checkout(&self) {
        let paths = run_paths(&self.ctx.cfg.cache_root, self.run_id, self.state().plan());
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

    /// Reads each repo's run branch head → `heads_inspected` or `push_failed`.
    pub(super) fn inspect_heads(&self) -> Step {
        let checkout = self.checkout();
        let run_id = self.run_id;
        let git = self.ctx.git.clone();
        let work = async move {
            let read = tokio::task::spawn_blocking(move || {
                let mut heads = Vec::new();
                for repo in &checkout.repos {
                    let head = git
                        .branch_head(Path::new(&repo.path), &repo.branch)
                        .map_err(|e| RepoGitError::new(&repo.slug, e))?;
                    heads.push(RepoHead {
                        slug: repo.slug.clone(),
                        head,
                    });
                }
                Ok::<_, RepoGitError>(heads)
            })
            .await;
            match read {
                Ok(Ok(heads)) => Event::HeadsInspected { heads },
                Ok(Err(e)) => Event::PushFailed {
                    error: e.report(run_id, "reading the run branch"),
                },
                Err(e) => Event::PushFailed {
                    error: format!("head inspection task failed: {e}"),
                },
            }
        };
        Step {
            work: Box::pin(work),
            retry: None,
            abandoned: Event::PushFailed {
                error: ABANDONED.into(),
            },
        }
    }

    /// Pushes each repo's run branch → `push_done`, `push_skipped` (nothing new) or
    /// `push_failed`.
    pub(super) fn push(&self, heads: Vec<RepoHead>) -> Step {
        let plan = self.state().plan().clone();
        let checkout = self.checkout();
        let token = self.token().unwrap_or_default();
        // One budget and cancel switch for the run's pushes.
        let retry = self.git_retry();
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
        let run_id = self.run_id;
        // Dropping the work cancels the pushes (and kills the git call under way).
        let cancel_if_dropped = retry.cancel_on_drop();
        let git = self.ctx.git.clone();
        let work = async move {
            let _cancel_if_dropped = cancel_if_dropped;
            let pushed = tokio::task::spawn_blocking(move || {
                let mut pushed = Vec::new();
                for (request, head) in requests.iter().zip(&heads) {
                    let outcome = git
                        .push(request)
                        .map_err(|e| RepoGitError::new(&head.slug, e))?;
                    if !outcome.skipped {
                        pushed.push(RepoHead {
                            slug: head.slug.clone(),
                            head: outcome.head_sha,
                        });
                    }
                }
                Ok::<_, RepoGitError>(pushed)
            })
            .await;
            match pushed {
                Ok(Ok(pushed)) if pushed.is_empty() => Event::PushSkipped,
                Ok(Ok(pushed)) => Event::PushDone { heads: pushed },
                Ok(Err(e)) => Event::PushFailed {
                    error: e.report(run_id, "push"),
                },
                Err(e) => Event::PushFailed {
                    error: format!("push task failed: {e}"),
                },
            }
        };
        Step {
            work: Box::pin(work),
            retry: Some(retry),
            abandoned: Event::PushFailed {
                error: ABANDONED.into(),
            },
        }
    }

    /// Sends the verdict → `report_accepted`, `report_rejected409` or `report_failed`. A
    /// rejected credential or a shutdown leaves the run for the next start (the report
    /// intent is journaled, so it is sent again).
    pub(super) async fn report(&mut self, report: ReportRequest) -> Result<Event, Interrupted> {
        // Every event goes out before the verdict: after it the server answers 409.
        if let Some(finish) = self.output.finish_events() {
            let summary = self.while_reporting(finish).await?;
            if let Some(why) = summary.stopped {
                debug!(run_id = self.run_id, "event stream ended early: {why}");
            }
        }
        // Every event was delivered or refused for good: nothing is left to replay.
        self.output.settle().await;
        // The client retries within its budget (minutes). A drain past its deadline must not
        // wait that out: the report intent is journaled, so the next start sends it again.
        let control = self.ctx.control.clone();
        let run_id = self.run_id;
        let answer = self
            .while_reporting(control.report(run_id, &report))
            .await?;
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
                            _ = self.ctx.clock.sleep(pause) => {}
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
        Ok(event)
    }

    /// The run is terminal: drop every trace on the host (containers of any attempt, private
    /// files, checkout) and forget its secrets.
    pub(super) async fn finish_terminal(&mut self) {
        self.output.finish_terminal().await;
        self.remove_checkout().await;
        for secret in self.secrets.env.values() {
            crate::redact::forget_secret(secret);
        }
    }
}
