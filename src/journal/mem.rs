//! An in-memory journal with sled's durability contract made explicit: appends are visible
//! at once but survive [`MemJournal::crash`] only once flushed. For property tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{decode_record, encode_record, Journal, JournalError, Quarantined, Record, Slot};

#[derive(Default)]
struct Inner {
    /// (run, seq) → encoded record, as of the last flush.
    durable: BTreeMap<(i64, u64), Vec<u8>>,
    /// Appends since the last flush, in order.
    pending: Vec<((i64, u64), Vec<u8>)>,
    flushes: u64,
    /// The unresolved-claim mark (durable at once: the trait flushes it).
    unresolved_claim: Option<i64>,
}

impl Inner {
    fn view(&self) -> BTreeMap<(i64, u64), Vec<u8>> {
        let mut all = self.durable.clone();
        for (k, v) in &self.pending {
            all.insert(*k, v.clone());
        }
        all
    }
}

/// See the module docs.
#[derive(Default)]
pub struct MemJournal {
    inner: Mutex<Inner>,
}

impl MemJournal {
    pub fn new() -> MemJournal {
        MemJournal::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates a crash: every append since the last flush is lost.
    pub fn crash(&self) {
        self.lock().pending.clear();
    }

    /// The durable (flushed) records only: what a restarted process would read.
    pub fn durable_records(&self) -> Vec<Record> {
        self.lock()
            .durable
            .values()
            .filter_map(|b| decode_record(b).ok())
            .collect()
    }

    /// The last durable seq of `run_id` (0: none).
    pub fn durable_seq(&self, run_id: i64) -> u64 {
        self.lock()
            .durable
            .range((run_id, 0)..=(run_id, u64::MAX))
            .next_back()
            .map_or(0, |(k, _)| k.1)
    }

    /// Number of flushes so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    /// Stores raw bytes at (run, seq), durable at once (corruption tests).
    pub fn insert_raw(&self, run_id: i64, seq: u64, bytes: Vec<u8>) {
        self.lock().durable.insert((run_id, seq), bytes);
    }
}

fn slot(key: (i64, u64), bytes: &[u8]) -> Slot {
    match decode_record(bytes) {
        Ok(r) if (r.run_id, r.seq) == key => Slot::Record(r),
        Ok(_) => Slot::Quarantined(Quarantined {
            run_id: key.0,
            seq: key.1,
            bytes: bytes.to_vec(),
            error: "record stored under the wrong key".into(),
        }),
        Err(error) => Slot::Quarantined(Quarantined {
            run_id: key.0,
            seq: key.1,
            bytes: bytes.to_vec(),
            error,
        }),
    }
}

impl Journal for MemJournal {
    fn append(&self, record: &Record) -> Result<(), JournalError> {
        let mut inner = self.lock();
        let view = inner.view();
        let last = view
            .range((record.run_id, 0)..=(record.run_id, u64::MAX))
            .next_back();
        let expected = match last {
            None => 1,
            Some((k, bytes)) => {
                if let Slot::Record(r) = slot(*k, bytes) {
                    if r.state.is_terminal() {
                        return Err(JournalError::Misuse(format!(
                            "run {} is already terminal; it takes no more records",
                            record.run_id
                        )));
                    }
                }
                k.1 + 1
            }
        };
        if record.seq != expected {
            return Err(JournalError::Misuse(format!(
                "run {} seq {} is not contiguous (expected {expected})",
                record.run_id, record.seq
            )));
        }
        inner
            .pending
            .push(((record.run_id, record.seq), encode_record(record)));
        Ok(())
    }

    fn flush(&self) -> Result<(), JournalError> {
        let mut inner = self.lock();
        let pending = std::mem::take(&mut inner.pending);
        inner.durable.extend(pending);
        inner.flushes += 1;
        Ok(())
    }

    fn active(&self) -> Result<Vec<Slot>, JournalError> {
        let view = self.lock().view();
        let mut last: BTreeMap<i64, Slot> = BTreeMap::new();
        for (k, v) in &view {
            last.insert(k.0, slot(*k, v));
        }
        Ok(last
            .into_values()
            .filter(|s| !matches!(s, Slot::Record(r) if r.state.is_terminal()))
            .collect())
    }

    fn set_unresolved_claim(&self, since_ms: Option<i64>) -> Result<(), JournalError> {
        let mut inner = self.lock();
        inner.unresolved_claim = since_ms;
        inner.flushes += 1;
        Ok(())
    }

    fn unresolved_claim(&self) -> Result<Option<i64>, JournalError> {
        Ok(self.lock().unresolved_claim)
    }

    fn run_ids(&self) -> Result<Vec<i64>, JournalError> {
        let mut ids: Vec<i64> = self.lock().view().keys().map(|k| k.0).collect();
        ids.dedup();
        Ok(ids)
    }

    fn records(&self, run_id: i64) -> Result<Vec<Slot>, JournalError> {
        Ok(self
            .lock()
            .view()
            .range((run_id, 0)..=(run_id, u64::MAX))
            .map(|(k, v)| slot(*k, v))
            .collect())
    }
}
