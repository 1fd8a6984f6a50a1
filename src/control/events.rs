//! The event sender (spec 2.5, improving on section 9.11): events are never silently lost.
//!
//! - One queue and one worker per run, so events reach the server in the order they were
//!   produced.
//! - Every call goes through the client, which paces all authenticated calls of the instance
//!   with one token bucket and retries 429/5xx with backoff.
//! - Memory is bounded (event count and bytes). When the backlog grows past a threshold,
//!   consecutive agent `content` text events are merged into one (valid JSON, order kept)
//!   instead of being dropped; when it is full anyway, [`RunEvents::send`] waits
//!   (backpressure on the agent's output reader) rather than drop.
//! - A 409 (run no longer running) or 403/404 ends sending for that run; what is left is
//!   counted and logged once. A 400 (payload refused) or an exhausted retry budget is counted
//!   and logged per event.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::client::{Client, ControlError};
use super::wire::EventRequest;

/// Server-side cap on `payload_json` (256 KiB).
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Tuning of the sender; [`Default`] suits the upstream limit of 20 requests/s.
#[derive(Debug, Clone, Copy)]
pub struct EventSenderConfig {
    /// Backlog length (per run) from which consecutive content events are merged.
    pub merge_backlog: usize,
    /// Backlog length (per run) at which `send` waits.
    pub max_backlog: usize,
    /// Backlog bytes (per run) at which `send` waits.
    pub max_backlog_bytes: usize,
    /// A merged payload never grows past this.
    pub max_merged_payload: usize,
}

impl Default for EventSenderConfig {
    fn default() -> Self {
        Self {
            merge_backlog: 100,
            max_backlog: 5_000,
            max_backlog_bytes: 16 * 1024 * 1024,
            max_merged_payload: 64 * 1024,
        }
    }
}

/// Counters for metrics (all runs of the instance).
#[derive(Debug, Default)]
pub struct EventCounters {
    /// Accepted by the server.
    pub sent: AtomicU64,
    /// Events folded into a previous queued event.
    pub merged: AtomicU64,
    /// Not sent because the server answered 409/403/404 for the run (run no longer ours).
    pub dropped_after_409: AtomicU64,
    /// Refused by the server with 400 (too big, not JSON).
    pub rejected: AtomicU64,
    /// Given up after the retry budget, or the credential was rejected.
    pub failed: AtomicU64,
}

/// A snapshot of [`EventCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCountsSnapshot {
    pub sent: u64,
    pub merged: u64,
    pub dropped_after_409: u64,
    pub rejected: u64,
    pub failed: u64,
}

impl EventCounters {
    pub fn snapshot(&self) -> EventCountsSnapshot {
        EventCountsSnapshot {
            sent: self.sent.load(Ordering::Relaxed),
            merged: self.merged.load(Ordering::Relaxed),
            dropped_after_409: self.dropped_after_409.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Creates per-run event streams that share the client (and so its pacing).
#[derive(Clone)]
pub struct EventSender {
    client: Client,
    cfg: EventSenderConfig,
    counters: Arc<EventCounters>,
}

impl EventSender {
    pub fn new(client: Client, cfg: EventSenderConfig) -> Self {
        Self {
            client,
            cfg,
            counters: Arc::new(EventCounters::default()),
        }
    }

    pub fn counters(&self) -> EventCountsSnapshot {
        self.counters.snapshot()
    }

    /// Starts the ordered stream of one run (spawns its worker on the current runtime).
    pub fn open_run(&self, run_id: i64) -> RunEvents {
        let queue = Arc::new(RunQueue::default());
        let worker = tokio::spawn(worker(
            self.client.clone(),
            run_id,
            queue.clone(),
            self.counters.clone(),
        ));
        RunEvents {
            run_id,
            queue,
            cfg: self.cfg,
            counters: self.counters.clone(),
            worker,
        }
    }
}

#[derive(Default)]
struct QueueState {
    /// Queued events, each with the number of `send` calls folded into it (merges).
    items: VecDeque<(EventRequest, u64)>,
    bytes: usize,
    closed: bool,
    /// `send` calls folded into the event the worker is sending (0: none in flight).
    in_flight: u64,
    /// `send` calls so far, and how many of them the server has answered (delivered or
    /// refused for good). Events go out in order, so the answered ones are a prefix.
    accepted: u64,
    completed: u64,
    /// Set by [`Delivery::halt`]: the worker takes no further event.
    halted: bool,
    /// Set once the server said the run is not ours/running any more.
    stopped: Option<String>,
}

#[derive(Default)]
struct RunQueue {
    state: Mutex<QueueState>,
    work: Notify,
    space: Notify,
    /// Woken whenever the worker finishes an event.
    idle: Notify,
}

impl RunQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How a run's stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunEventsSummary {
    pub run_id: i64,
    /// Why sending stopped early (the server's 409/403/404), if it did.
    pub stopped: Option<String>,
}

/// The ordered event stream of one run.
pub struct RunEvents {
    run_id: i64,
    queue: Arc<RunQueue>,
    cfg: EventSenderConfig,
    counters: Arc<EventCounters>,
    worker: tokio::task::JoinHandle<()>,
}

impl RunEvents {
    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// True once the server refused the run (409/403/404): later events are not sent.
    pub fn is_stopped(&self) -> bool {
        self.queue.lock().stopped.is_some()
    }

    /// Queues one event. Waits only when the backlog is full; never drops, except after the
    /// server ended the run (counted in `dropped_after_409`).
    pub async fn send(&self, event: EventRequest) {
        let event = normalise(event);
        loop {
            let notified = self.queue.space.notified();
            {
                let mut st = self.queue.lock();
                if st.stopped.is_some() {
                    st.accepted += 1;
                    st.completed += 1;
                    self.counters
                        .dropped_after_409
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if st.items.len() >= self.cfg.merge_backlog {
                    if let Some((last, count)) = st.items.back_mut() {
                        if let Some(merged) =
                            merge_content(last, &event, self.cfg.max_merged_payload)
                        {
                            let grow = merged.payload_json.len() - last.payload_json.len();
                            *last = merged;
                            *count += 1;
                            st.bytes += grow;
                            st.accepted += 1;
                            self.counters.merged.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                let size = event.payload_json.len() + event.event_type.len();
                let full = st.items.len() >= self.cfg.max_backlog
                    || (st.bytes + size > self.cfg.max_backlog_bytes && !st.items.is_empty());
                if !full {
                    st.bytes += size;
                    st.accepted += 1;
                    st.items.push_back((event, 1));
                    drop(st);
                    self.queue.work.notify_one();
                    return;
                }
            }
            notified.await;
        }
    }

    /// Events queued or being sent, not yet answered by the server. Zero means every event
    /// handed to [`RunEvents::send`] so far was delivered (or refused for good): the agent
    /// output progress may be saved only then.
    pub fn backlog(&self) -> usize {
        let st = self.queue.lock();
        st.items.len() + usize::from(st.in_flight > 0)
    }

    /// A handle on this stream's delivery progress that outlives it (see [`Delivery`]).
    pub fn delivery(&self) -> Delivery {
        Delivery {
            queue: self.queue.clone(),
        }
    }

    /// Closes the stream and waits until every queued event was sent (or the run stopped).
    /// Call before reporting the result: after the result the server answers 409.
    pub async fn finish(self) -> RunEventsSummary {
        self.queue.lock().closed = true;
        self.queue.work.notify_one();
        let _ = self.worker.await;
        RunEventsSummary {
            run_id: self.run_id,
            stopped: self.queue.lock().stopped.clone(),
        }
    }
}

/// How far a run's event stream got, readable after the [`RunEvents`] itself was consumed:
/// the agent output progress (docs/daemon.md) is saved from it, so a replay after a restart
/// resumes exactly after the last line the server answered.
#[derive(Clone)]
pub struct Delivery {
    queue: Arc<RunQueue>,
}

impl Delivery {
    /// `send` calls so far (merged ones included).
    pub fn accepted(&self) -> u64 {
        self.queue.lock().accepted
    }

    /// `send` calls the server has answered: delivered, or refused for good (409/403/404,
    /// 400) or given up after the retry budget. Always a prefix of the calls in order.
    pub fn completed(&self) -> u64 {
        self.queue.lock().completed
    }

    /// Stops the worker from taking another event and waits (up to `limit`) for the one in
    /// flight to be answered, so [`Delivery::completed`] stays exact while the process exits.
    pub async fn halt(&self, limit: std::time::Duration) {
        self.queue.lock().halted = true;
        self.queue.work.notify_one();
        let _ = tokio::time::timeout(limit, async {
            loop {
                let idle = self.queue.idle.notified();
                if self.queue.lock().in_flight == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }
}

async fn worker(client: Client, run_id: i64, queue: Arc<RunQueue>, counters: Arc<EventCounters>) {
    loop {
        let notified = queue.work.notified();
        let next = {
            let mut st = queue.lock();
            if st.halted {
                return;
            }
            match st.items.pop_front() {
                Some((ev, count)) => {
                    st.bytes = st
                        .bytes
                        .saturating_sub(ev.payload_json.len() + ev.event_type.len());
                    st.in_flight = count;
                    Some(ev)
                }
                None if st.closed => return,
                None => None,
            }
        };
        let Some(event) = next else {
            notified.await;
            continue;
        };
        queue.space.notify_waiters();
        match client.send_event(run_id, &event).await {
            Ok(()) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if matches!(e.status(), Some(409 | 403 | 404)) => {
                let mut st = queue.lock();
                let left = st.items.len() as u64 + 1;
                let folded: u64 = st.items.iter().map(|(_, count)| count).sum();
                st.completed += folded;
                st.items.clear();
                st.bytes = 0;
                st.stopped = Some(e.to_string());
                drop(st);
                counters
                    .dropped_after_409
                    .fetch_add(left, Ordering::Relaxed);
                tracing::warn!(run_id, error = %e, dropped = left, "server ended the run; no more events are sent for it");
                queue.space.notify_waiters();
            }
            Err(e @ ControlError::CredentialRejected(_)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(run_id, error = %e, "event not sent: credential rejected");
            }
            Err(e) if e.status() == Some(400) => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(run_id, event_type = %event.event_type, error = %e, "server refused an event");
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(run_id, event_type = %event.event_type, error = %e, "event not delivered after retries");
            }
        }
        {
            let mut st = queue.lock();
            st.completed += st.in_flight;
            st.in_flight = 0;
        }
        queue.idle.notify_waiters();
    }
}

/// `payload_json` must be JSON text: an empty payload becomes `{}`, anything that is not
/// JSON is sent as a JSON string holding the text (nothing is lost, and the server accepts it).
fn normalise(mut event: EventRequest) -> EventRequest {
    if event.payload_json.trim().is_empty() {
        event.payload_json = "{}".into();
    } else if serde_json::from_str::<serde::de::IgnoredAny>(&event.payload_json).is_err() {
        event.payload_json = Value::String(std::mem::take(&mut event.payload_json)).to_string();
    }
    event
}

/// The text of an agent `content` event, and the rest of its fields, when `ev` is one: either
/// a `stdout` event whose payload is the raw agent line, or a `content` event.
fn content_parts(ev: &EventRequest) -> Option<(Map<String, Value>, String)> {
    if ev.event_type != "stdout" && ev.event_type != "content" {
        return None;
    }
    let Value::Object(mut obj) = serde_json::from_str::<Value>(&ev.payload_json).ok()? else {
        return None;
    };
    if obj.get("type").and_then(Value::as_str) != Some("content") {
        return None;
    }
    let Value::String(text) = obj.remove("text")? else {
        return None;
    };
    Some((obj, text))
}

/// Merges two consecutive content events of the same shape into one whose text is the
/// concatenation; `None` when they cannot be merged.
pub fn merge_content(
    a: &EventRequest,
    b: &EventRequest,
    max_payload: usize,
) -> Option<EventRequest> {
    if a.event_type != b.event_type {
        return None;
    }
    let (mut rest_a, text_a) = content_parts(a)?;
    let (rest_b, text_b) = content_parts(b)?;
    if rest_a != rest_b {
        return None;
    }
    rest_a.insert("text".into(), Value::String(text_a + &text_b));
    let payload = Value::Object(rest_a).to_string();
    if payload.len() > max_payload.min(MAX_PAYLOAD_BYTES) {
        return None;
    }
    Some(EventRequest {
        event_type: a.event_type.clone(),
        payload_json: payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdout(line: &str) -> EventRequest {
        EventRequest {
            event_type: "stdout".into(),
            payload_json: line.into(),
        }
    }

    #[test]
    fn consecutive_content_lines_merge_into_valid_json_in_order() {
        let a = stdout(r#"{"type":"content","text":"Hel"}"#);
        let b = stdout(r#"{"type":"content","text":"lo \"x\"\n"}"#);
        let m = merge_content(&a, &b, 1 << 20).unwrap();
        let v: Value = serde_json::from_str(&m.payload_json).unwrap();
        assert_eq!(v["type"], "content");
        assert_eq!(v["text"], "Hello \"x\"\n");
        assert_eq!(m.event_type, "stdout");
    }

    #[test]
    fn other_events_or_shapes_do_not_merge() {
        let c = stdout(r#"{"type":"content","text":"a"}"#);
        let tool = stdout(r#"{"type":"tool_start","id":"1"}"#);
        assert!(merge_content(&c, &tool, 1 << 20).is_none());
        assert!(merge_content(&tool, &c, 1 << 20).is_none());
        let other = stdout(r#"{"type":"content","text":"b","role":"x"}"#);
        assert!(merge_content(&c, &other, 1 << 20).is_none());
        let not_json = stdout("plain text");
        assert!(merge_content(&c, &not_json, 1 << 20).is_none());
        let big = stdout(&format!(
            r#"{{"type":"content","text":"{}"}}"#,
            "z".repeat(100)
        ));
        assert!(merge_content(&big, &big, 150).is_none());
    }

    #[test]
    fn payloads_are_made_json() {
        assert_eq!(normalise(stdout("")).payload_json, "{}");
        assert_eq!(normalise(stdout("not json")).payload_json, "\"not json\"");
        assert_eq!(normalise(stdout("{\"a\":1}")).payload_json, "{\"a\":1}");
    }
}
