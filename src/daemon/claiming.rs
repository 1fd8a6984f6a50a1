//! Claiming (spec 4.3): the claim loop with its backoff, the persist-then-send mark of a
//! claim in flight, the lease yield after a lost answer (F6), idle-cache eviction between
//! claims, and journaling a claimed run before its task starts.

use std::time::Duration;

use backoff::backoff::Backoff;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{outcome_label, Ctx, Start, Supervisor};
use crate::control::client::ControlError;
use crate::fsm::{Event, RunPlan};
use crate::journal::{commit_event_async, now_ms};
use crate::metrics::Health;

/// How long an in-flight claim may still take once a shutdown was asked for.
const SHUTDOWN_CLAIM_GRACE: Duration = Duration::from_secs(5);

impl Supervisor {
    /// Journals a freshly claimed job and starts its task.
    pub(super) async fn start_claimed(
        &mut self,
        job: crate::control::wire::JobSpec,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let instance = self.ctx.engine.instance().to_owned();
        let (mut plan, secrets) = RunPlan::from_job(&job, &instance);
        plan.apply_host_defaults(&crate::fsm::plan::HostDefaults {
            llm_model: self.ctx.cfg.llm_model.clone(),
        });
        // Every secret-shaped value is masked wherever it could be printed, not only the run
        // token (as recovery does; the run task forgets them when the run ends).
        for secret in secrets.env.values() {
            crate::redact::register_secret(secret);
        }
        if plan.prompt.trim().is_empty() {
            plan.prompt = self.ctx.cfg.initial_prompt.clone();
        }
        let run_id = plan.run_id;
        info!(run_id, kind = %plan.kind, repos = plan.repos.len(), "claimed a run");
        let committed = commit_event_async(
            self.ctx.journal.clone(),
            None,
            Event::Claimed { plan },
            now_ms(),
            Some(secrets.clone()),
        )
        .await;
        match committed {
            Ok(c) => {
                let Some(record) = c.record else { return };
                super::failpoint::crash_failpoint(&record);
                self.spawn_run(
                    record.clone(),
                    record,
                    secrets,
                    Start::Effects(c.effects),
                    Some(permit),
                );
            }
            Err(e) => {
                // Without a journal record the run cannot be carried safely: say so to the
                // server rather than let it wait for the reaper.
                self.ctx.metrics.journal_error();
                error!(run_id, "cannot journal the claimed run: {e}");
                let report = crate::control::wire::ReportRequest {
                    status: crate::control::wire::STATUS_FAILED.into(),
                    error: format!("runner journal unavailable: {e}"),
                    ..Default::default()
                };
                let _ = self.ctx.control.report(run_id, &report).await;
            }
        }
    }
}

pub(super) async fn claim_loop(sup: &mut Supervisor, once: bool) {
    let ctx = sup.ctx.clone();
    let mut shutdown = ctx.shutdown.subscribe();
    let mut errors = backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(ctx.cfg.poll_interval)
        .with_max_interval(Duration::from_secs(300).max(ctx.cfg.poll_interval))
        .with_randomization_factor(0.5)
        .with_multiplier(2.0)
        .with_max_elapsed_time(None)
        .build();
    // Idle-cache eviction runs between claims while no run is in flight (so it never races
    // a prepare): the first idle moment after start-up, then every EVICTION_EVERY.
    let mut last_eviction: Option<tokio::time::Instant> = None;
    loop {
        // Reap finished tasks so the set does not grow.
        while let Some(joined) = sup.tasks.try_join_next() {
            if let Err(e) = joined {
                error!("a run task failed: {e}");
            }
        }
        if ctx.shutting_down() || ctx.control.auth_state().is_rejected() {
            return;
        }
        if sup.yield_pending {
            if !yield_lease(sup, &mut shutdown).await {
                return;
            }
            continue;
        }
        if sup.in_flight() == 0 && last_eviction.is_none_or(|t| t.elapsed() >= EVICTION_EVERY) {
            last_eviction = Some(tokio::time::Instant::now());
            evict_idle_caches(&ctx).await;
        }
        let permit = tokio::select! {
            p = sup.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => continue,
        };
        // `ctl pause`: no claim until resumed (runs in flight, heartbeats and drain go on).
        // The gate is held until a claimed run is started, so a pause waits for it.
        let gate = ctx.pause.claim_gate.clone().lock_owned().await;
        if ctx.pause.is_paused() {
            drop((gate, permit));
            ctx.pause.wait_resumed(&mut shutdown).await;
            continue;
        }
        // Persist-then-send for the claim too: a claim is not idempotent, so the journal
        // notes it is in flight before it leaves and forgets it only once the answer (and
        // the run it carries) is journaled.
        if let Err(e) = set_unresolved_claim(&ctx, Some(now_ms())).await {
            drop((gate, permit));
            let wait = errors.next_backoff().unwrap_or(ctx.cfg.poll_interval);
            error!(retry_in = ?wait, "not claiming: the journal cannot record the claim: {e}");
            tokio::select! {
                _ = ctx.clock.sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let lost_before = lost_claim_answers(&ctx);
        // A claim retrying against an unreachable server must not hold up a shutdown for
        // its whole retry budget; one that is merely slow gets a few seconds to answer, so
        // a run the server already handed us is not dropped.
        let claim = ctx.control.claim();
        tokio::pin!(claim);
        let claimed = tokio::select! {
            r = &mut claim => r,
            _ = shutdown.changed() => {
                match tokio::time::timeout(SHUTDOWN_CLAIM_GRACE, &mut claim).await {
                    Ok(r) => r,
                    Err(_) => {
                        // The mark stays: the next start yields the lease.
                        warn!("shutting down: abandoned a claim the server has not answered");
                        return;
                    }
                }
            }
        };
        // A run id that is not positive names no run: it can be neither journaled nor
        // reported, so the answer is refused and treated like a lost one (yield the lease,
        // so the server's reaper fails whatever run it handed out).
        let bad_id = match &claimed {
            Ok(Some(job)) if job.run_id <= 0 => Some(job.run_id),
            _ => None,
        };
        let got_job = matches!(claimed, Ok(Some(_))) && bad_id.is_none();
        if got_job {
            super::failpoint::crash_failpoint_at("claim-answered");
        }
        let lost = lost_claim_answers(&ctx) > lost_before;
        if lost {
            warn!(
                "a claim's answer was lost after the request reached the server; the server may hold a run for this instance that the runner never saw"
            );
            sup.yield_pending = true;
        }
        let wait = match claimed {
            Ok(Some(_)) if bad_id.is_some() => {
                drop(permit);
                sup.liveness.contacted(now_ms());
                ctx.metrics.request("claim", "refused");
                sup.yield_pending = true;
                error!(
                    run_id = bad_id.unwrap_or_default(),
                    "refused the claimed job: its run_id is not a positive number, so it can be neither journaled nor reported; the job is not run (the server's reaper fails it once the lease is yielded)"
                );
                Duration::ZERO
            }
            Ok(Some(job)) => {
                sup.liveness.contacted(now_ms());
                ctx.metrics.request("claim", "ok");
                errors.reset();
                sup.start_claimed(job, permit).await;
                Duration::ZERO
            }
            Ok(None) => {
                sup.liveness.contacted(now_ms());
                ctx.metrics.request("claim", "no_work");
                errors.reset();
                drop(permit);
                ctx.cfg.poll_interval
            }
            Err(e) => {
                drop(permit);
                ctx.metrics.request("claim", &outcome_label(&e));
                if let ControlError::CredentialRejected(_) = e {
                    ctx.metrics.set_credential_rejected(true);
                    // Answered (401/403): nothing was handed out.
                    if !lost {
                        let _ = set_unresolved_claim(&ctx, None).await;
                    }
                    error!("claim: {e}; no further claims");
                    ctx.metrics
                        .set_health(Health::Unhealthy(format!("credential rejected: {e}")));
                    return;
                }
                let wait = errors.next_backoff().unwrap_or(ctx.cfg.poll_interval);
                warn!(retry_in = ?wait, "claim failed: {e}");
                wait
            }
        };
        // A refused claim keeps its mark too, so a restart before the yield still yields.
        if !lost && bad_id.is_none() {
            if let Err(e) = set_unresolved_claim(&ctx, None).await {
                warn!("cannot clear the unresolved-claim mark: {e}");
            }
        }
        drop(gate);
        if got_job {
            if once {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = ctx.clock.sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Claim answers the client lost after the request left, so far (F6).
fn lost_claim_answers(ctx: &Ctx) -> u64 {
    ctx.control.lost_claim_answers()
}

/// Sets or clears the journal's unresolved-claim mark off the async workers (it flushes).
async fn set_unresolved_claim(ctx: &Ctx, since_ms: Option<i64>) -> Result<(), String> {
    let journal = ctx.journal.clone();
    let done = tokio::task::spawn_blocking(move || journal.set_unresolved_claim(since_ms))
        .await
        .map_err(|e| format!("journal task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    if done.is_err() {
        ctx.metrics.journal_error();
    }
    done
}

/// Yields the lease after a claim whose answer was lost (docs/daemon.md): once no run is in
/// flight, the runner neither claims nor heartbeats for `WSRUNNER_LEASE_YIELD`, so the
/// server's reaper fails any run it handed this instance that the runner never saw, instead
/// of leaving it `running` until the 8 h backstop. Runs in flight finish first (they would
/// be reaped too). Returns false when a shutdown came first (the mark stays for next start).
async fn yield_lease(sup: &mut Supervisor, shutdown: &mut watch::Receiver<u8>) -> bool {
    let ctx = sup.ctx.clone();
    if ctx.cfg.lease_yield.is_zero() {
        warn!("WSRUNNER_LEASE_YIELD=0: not pausing; a run the server handed out unseen stays running until the server's backstop");
    } else {
        // Runs in flight keep their heartbeats until they end; no new claim meanwhile.
        while sup.in_flight() > 0 {
            tokio::select! {
                joined = sup.tasks.join_next() => {
                    if let Some(Err(e)) = joined {
                        error!("a run task failed: {e}");
                    }
                }
                _ = shutdown.changed() => {}
            }
            if ctx.shutting_down() {
                return false;
            }
        }
        let pause = ctx.cfg.lease_yield;
        warn!(
            pause = ?pause,
            "yielding the lease: no claims and no heartbeats, so the server reaps a run it may have handed out unseen"
        );
        sup.liveness
            .yield_until(Some(now_ms() + pause.as_millis() as i64));
        let paused = tokio::select! {
            _ = tokio::time::sleep(pause) => true,
            _ = shutdown.changed() => false,
        };
        sup.liveness.yield_until(None);
        if !paused || ctx.shutting_down() {
            return false;
        }
        info!("lease yield over; claiming again");
    }
    if let Err(e) = set_unresolved_claim(&ctx, None).await {
        warn!("cannot clear the unresolved-claim mark: {e}");
    }
    sup.yield_pending = false;
    true
}

/// How often idle repository caches are checked against `WSRUNNER_CACHE_MAX_AGE`.
const EVICTION_EVERY: Duration = Duration::from_secs(600);

async fn evict_idle_caches(ctx: &Ctx) {
    let root = ctx.cfg.cache_root.clone();
    let (max_age, max_bytes) = (ctx.cfg.cache_max_age, ctx.cfg.cache_max_bytes);
    if let Some(after) = ctx.cfg.image_prune_after {
        ctx.engine.prune_idle_images(after).await;
    }
    let report = tokio::task::spawn_blocking(move || {
        crate::effects::git::evict(&root, max_age, max_bytes, std::time::SystemTime::now())
    })
    .await;
    match report {
        Ok(Ok(r)) if !r.removed.is_empty() || !r.removed_for_size.is_empty() => {
            info!(
                removed = r.removed.len() + r.removed_for_size.len(),
                "evicted idle repository caches"
            )
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!("cache eviction failed: {e}"),
        Err(e) => warn!("cache eviction task failed: {e}"),
    }
}
