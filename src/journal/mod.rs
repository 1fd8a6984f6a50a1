//! The run journal: one versioned record per state transition, committed in one transaction
//! and flushed before the transition's effects are handed out.
//!
//! - [`Record`]: schema version, run id, contiguous per-run `seq` (from 1), caller-supplied
//!   wall-clock time, the event and the state it produced, and (first record only) the run's
//!   secrets in a dedicated field that every printer and exporter masks.
//! - [`Journal`]: the storage trait; [`SledJournal`] is the real one, [`MemJournal`] an
//!   in-memory one that loses unflushed writes on [`MemJournal::crash`] (property tests).
//! - [`commit_event`]: transition + append + flush, the only way effects are handed out.
//! - [`tools`]: the offline `windshift-runner journal …` commands.
//!
//! Architecture invariant: the journal orders by `seq`, never by clock; `at_ms` is for humans.

mod export;
mod mem;
mod sled_store;
pub mod tools;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::fsm::{self, Effect, Event, Rejected, RunSecrets, RunState};

pub use export::{
    export_all, export_lines, import_lines, ExportLine, EXPORT_FORMAT, EXPORT_VERSION,
};
pub use mem::MemJournal;
pub use sled_store::{
    decode_pack, decode_stored, encode_pack, encode_stored, ArchiveSummary, IdentityInfo,
    JournalIdentity, Migration, PackDamage, SledJournal, OLDEST_SCHEMA,
};

/// The record schema this build writes. It opens journals of [`OLDEST_SCHEMA`] to this one,
/// migrating older ones on open (docs/journal.md, "Compatibility"). Schema 2: runs keyed by
/// identity and run id; the plan and secrets stored once per run, records without them.
/// Schema 3: a terminal run's records packed into one value (`v3.runs`); records written
/// under schema 2 keep their number (their stored form is the same).
pub const SCHEMA_VERSION: u32 = 3;

/// One journaled transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub schema: u32,
    pub run_id: i64,
    /// Contiguous per run, starting at 1.
    pub seq: u64,
    /// Wall-clock time of the transition in Unix milliseconds, supplied by the caller.
    pub at_ms: i64,
    pub event: Event,
    /// The state `event` produced (replay recomputes and compares it).
    pub state: RunState,
    /// Secrets that must survive a restart (first record only). Masked by every printer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<RunSecrets>,
}

impl Record {
    /// The record with its secrets masked: what exports and printers use.
    pub fn redacted(&self) -> Record {
        let mut r = self.clone();
        r.secrets = r.secrets.as_ref().map(RunSecrets::redacted);
        r
    }
}

/// Encodes a record (JSON: self-describing, so old records stay readable as fields are added).
pub fn encode_record(record: &Record) -> Vec<u8> {
    // Serializing these plain data types cannot fail; fall back to an empty vec defensively.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes a record, refusing records from a newer schema.
pub fn decode_record(bytes: &[u8]) -> Result<Record, String> {
    let record: Record =
        serde_json::from_slice(bytes).map_err(|e| format!("not a journal record: {e}"))?;
    if record.schema < OLDEST_SCHEMA || record.schema > SCHEMA_VERSION {
        return Err(format!(
            "record schema {} is not supported by this build (supports {OLDEST_SCHEMA}..={SCHEMA_VERSION})",
            record.schema
        ));
    }
    Ok(record)
}

/// A stored record, or the bytes of one that could not be read.
// Slots are read a run at a time; boxing the common variant would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Record(Record),
    Quarantined(Quarantined),
}

impl Slot {
    pub fn seq(&self) -> u64 {
        match self {
            Slot::Record(r) => r.seq,
            Slot::Quarantined(q) => q.seq,
        }
    }
    pub fn run_id(&self) -> i64 {
        match self {
            Slot::Record(r) => r.run_id,
            Slot::Quarantined(q) => q.run_id,
        }
    }
}

/// An unreadable record: kept byte for byte, never acted on, shown by `journal verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub run_id: i64,
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub error: String,
}

/// Journal failures, separated by who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The caller broke the journal's contract (non-contiguous seq, append after terminal).
    #[error("journal misuse: {0}")]
    Misuse(String),
    /// Stored bytes are damaged or from an unsupported schema.
    #[error("journal corruption: {0}")]
    Corruption(String),
    /// Another process (a running windshift-runner) holds the database lock.
    #[error(
        "the journal at {path} is locked by another process (is windshift-runner running?); \
         stop it, or pass --copy to read a copy of the database"
    )]
    Locked { path: String },
    /// The journal is of an older schema and this open may not migrate it (offline tools).
    #[error(
        "the journal at {path} is schema {schema}, written by an older windshift-runner; the \
         runner migrates it when it starts (or run `windshift-runner journal --db {path} migrate` \
         with the runner stopped)"
    )]
    NeedsMigration { path: String, schema: u32 },
    /// The same identity claimed a run id it already ran to the end (message says why/what).
    #[error("{0}")]
    RunIdReused(String),
    /// No journal exists at the path (offline tools never create one).
    #[error("no journal at {path}: pass --db with the runner's journal directory")]
    Missing { path: String },
    #[error("journal I/O error: {0}")]
    Io(String),
    /// An internal invariant broke: a bug in windshift-runner or sled.
    #[error("internal journal bug (please report it): {0}")]
    Bug(String),
}

impl From<sled::Error> for JournalError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => JournalError::Io(io.to_string()),
            sled::Error::Corruption { at, .. } => {
                JournalError::Corruption(format!("sled reports corruption at {at:?}"))
            }
            sled::Error::ReportableBug(s) => JournalError::Bug(s),
            sled::Error::Unsupported(s) => JournalError::Misuse(s),
            sled::Error::CollectionNotFound(_) => {
                JournalError::Misuse("a journal tree is missing".into())
            }
        }
    }
}

/// Journal storage. Appends are visible to reads at once but durable only after `flush`.
pub trait Journal: Send + Sync {
    /// Appends one record in one transaction across the records and the index trees.
    /// `seq` must be the run's last seq + 1 (1 for a new run); a terminal run takes no more.
    fn append(&self, record: &Record) -> Result<(), JournalError>;
    /// Makes every append so far durable. Blocking: call from `spawn_blocking` in async code.
    fn flush(&self) -> Result<(), JournalError>;
    /// The last slot of every non-terminal run, from the active-runs index (no history scan).
    fn active(&self) -> Result<Vec<Slot>, JournalError>;
    /// Every run id with at least one record, ascending (scans history: offline tools only).
    fn run_ids(&self) -> Result<Vec<i64>, JournalError>;
    /// A run's slots in seq order.
    fn records(&self, run_id: i64) -> Result<Vec<Slot>, JournalError>;
    /// Durably records (`Some(since_ms)`) or clears (`None`) that a claim call may have been
    /// answered by the server with a run this journal does not hold (docs/daemon.md, "Claims
    /// the server answered but the runner never saw"). Flushes before returning.
    fn set_unresolved_claim(&self, since_ms: Option<i64>) -> Result<(), JournalError>;
    /// The mark [`Journal::set_unresolved_claim`] left, if any.
    fn unresolved_claim(&self) -> Result<Option<i64>, JournalError>;
}

/// Why an event could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Rejected(#[from] Rejected),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// A committed step: the new state and the effects that may now run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub state: RunState,
    pub effects: Vec<Effect>,
    /// The record written; `None` when the transition changed nothing (not journaled).
    pub record: Option<Record>,
}

/// The persist-then-send step: applies `event` to the run whose last record is `last` (`None`
/// for a new run: `event` must be `Claimed`), appends the record, flushes, and only then
/// returns the effects. `secrets` is stored with the first record only.
pub fn commit_event<J: Journal + ?Sized>(
    journal: &J,
    last: Option<&Record>,
    event: Event,
    at_ms: i64,
    secrets: Option<RunSecrets>,
) -> Result<Committed, CommitError> {
    let (state, effects) = fsm::apply(last.map(|r| &r.state), &event)?;
    if let Some(last) = last {
        if last.state == state && effects.is_empty() {
            return Ok(Committed {
                state,
                effects,
                record: None,
            });
        }
    }
    let record = Record {
        schema: SCHEMA_VERSION,
        run_id: state.plan().run_id,
        seq: last.map_or(1, |r| r.seq + 1),
        at_ms,
        event,
        state: state.clone(),
        secrets: if last.is_none() {
            secrets.filter(|s| !s.is_empty())
        } else {
            None
        },
    };
    journal.append(&record)?;
    journal.flush()?;
    Ok(Committed {
        state,
        effects,
        record: Some(record),
    })
}

/// [`commit_event`] for async callers: the append and the blocking flush run on the blocking
/// pool, so the runtime's workers never wait on the disk.
pub async fn commit_event_async(
    journal: Arc<dyn Journal>,
    last: Option<Record>,
    event: Event,
    at_ms: i64,
    secrets: Option<RunSecrets>,
) -> Result<Committed, CommitError> {
    tokio::task::spawn_blocking(move || {
        commit_event(journal.as_ref(), last.as_ref(), event, at_ms, secrets)
    })
    .await
    .map_err(|e| CommitError::Journal(JournalError::Bug(format!("commit task failed: {e}"))))?
}

/// Folds a run's slots through the pure transition function and compares each recomputed
/// state with the recorded one. Returns one finding per problem (empty = clean).
pub fn replay_run(slots: &[Slot]) -> Vec<String> {
    let mut findings = Vec::new();
    let mut state: Option<RunState> = None;
    for slot in slots {
        let record = match slot {
            Slot::Record(r) => r,
            Slot::Quarantined(q) => {
                findings.push(format!(
                    "run {} seq {}: quarantined record ({}); replay stops here",
                    q.run_id, q.seq, q.error
                ));
                return findings;
            }
        };
        match fsm::apply(state.as_ref(), &record.event) {
            Ok((next, _)) => {
                if next != record.state {
                    findings.push(format!(
                        "run {} seq {}: replay diverges: recorded \"{}\", recomputed \"{}\"",
                        record.run_id,
                        record.seq,
                        record.state.describe(),
                        next.describe()
                    ));
                }
            }
            Err(rejected) => findings.push(format!(
                "run {} seq {}: illegal transition: {rejected}",
                record.run_id, record.seq
            )),
        }
        // Continue from what was recorded, so one divergence is reported once.
        state = Some(record.state.clone());
    }
    findings
}

/// How many of a run's records container `name`'s output caused: the agent signals and
/// stream degradations journaled while it was the running container. What its journal budget
/// (`fsm::AGENT_RECORD_BUDGET`) has used, counted across every runner process.
pub fn agent_records(slots: &[Slot], container: &str) -> u32 {
    let count = slots
        .iter()
        .filter(|slot| match slot {
            Slot::Record(r) => {
                let ran = r.state.kind() == fsm::StateKind::Running
                    && r.state.container().is_some_and(|c| c.name == container);
                ran && fsm::signals::is_agent_event(&r.event)
            }
            Slot::Quarantined(_) => false,
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// What [`fuzz_decode_and_replay`] made of its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FuzzOutcome {
    /// Not a record (or an unsupported schema): it would be quarantined.
    Quarantined,
    /// Decoded; `findings` is what replaying the decoded records reported.
    Decoded { records: usize, findings: usize },
}

/// The fuzz target's body (fuzz/fuzz_targets/journal_decode.rs): splits the input into
/// newline-separated candidate records, decodes each, re-encodes the readable ones (the
/// round trip must be exact), and replays them as one run. Must never panic.
pub fn fuzz_decode_and_replay(data: &[u8]) -> FuzzOutcome {
    let mut slots = Vec::new();
    for (i, chunk) in data.split(|b| *b == b'\n').enumerate() {
        if chunk.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match decode_record(chunk) {
            Ok(record) => {
                let again = decode_record(&encode_record(&record));
                assert_eq!(again.as_ref(), Ok(&record), "record codec round trip");
                slots.push(Slot::Record(record));
            }
            Err(error) => slots.push(Slot::Quarantined(Quarantined {
                run_id: 0,
                seq: i as u64 + 1,
                bytes: chunk.to_vec(),
                error,
            })),
        }
    }
    if slots.iter().all(|s| matches!(s, Slot::Quarantined(_))) {
        return FuzzOutcome::Quarantined;
    }
    let records = slots
        .iter()
        .filter(|s| matches!(s, Slot::Record(_)))
        .count();
    let findings = replay_run(&slots).len();
    FuzzOutcome::Decoded { records, findings }
}

/// Key layout shared by the sled store, the importer and tests: the run id with its sign bit
/// flipped (so negative ids sort first), big-endian, then the seq big-endian.
pub fn run_key(run_id: i64) -> [u8; 8] {
    ((run_id as u64) ^ (1 << 63)).to_be_bytes()
}

/// The records-tree key of (run, seq).
pub fn record_key(run_id: i64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&run_key(run_id));
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Inverse of [`record_key`]; `None` for a key of the wrong length.
pub fn parse_record_key(key: &[u8]) -> Option<(i64, u64)> {
    let run: [u8; 8] = key.get(..8)?.try_into().ok()?;
    let seq: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    if key.len() != 16 {
        return None;
    }
    Some((
        (u64::from_be_bytes(run) ^ (1 << 63)) as i64,
        u64::from_be_bytes(seq),
    ))
}

/// The current time in Unix milliseconds (for callers; the fsm never reads a clock).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
