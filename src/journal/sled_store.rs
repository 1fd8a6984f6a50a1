//! The sled-backed journal, schema 3.
//!
//! Every key starts with the run's identity scope (u32 big-endian: 0 for runs of no known
//! identity, written before schema 2 or through the unscoped view) and the run key
//! ([`run_key`]). Trees:
//! - `v2.records` ((scope, run, seq) → the record without its plan, see [`encode_stored`]):
//!   the records of runs in flight,
//! - `v3.runs` ((scope, run) → every record of a terminal run, in seq order, packed into one
//!   value, see [`encode_pack`]): the append that makes a run terminal moves its records here
//!   in the same transaction, so a terminal run is a handful of keys (its pack, plan, secrets
//!   and `v2.ended` entry) instead of one per record; sled's open follows the number of keys,
//! - `v2.plans` ((scope, run) → the run's plan, stored once: it never changes),
//! - `v2.secrets` ((scope, run) → the run's secrets, masked by every printer),
//! - `v2.active` ((scope, run) → last seq; non-terminal runs only: start-up reads this),
//! - `v2.ended` ((scope, run) → terminal time and last seq: what retention and the size budget
//!   walk),
//! - `v2.identities` (identity key → its scope and what it names, [`JournalIdentity`]),
//! - `meta` (`schema`, `next_scope`, `unresolved_claim`: unix ms of a claim whose answer may
//!   have been lost, see `Journal::set_unresolved_claim`; `pack_cleanup` while a migration
//!   that committed still has per-seq copies of packed records to delete).
//!
//! A reader merges a run's pack with any per-seq records it still has (by seq), so a run
//! packed by a migration that has not deleted the per-seq copies yet, or given a raw record
//! after its end by an import, reads the same.
//!
//! Schema 2 (the same trees without `v3.runs`: every record under its own key) and schema 1
//! (trees `records`, `active`, `ended`, keyed by run alone, whole state in every record) are
//! migrated on open; see [`SledJournal::open`] and docs/journal.md.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{
    decode_record, parse_record_key, run_key, ExportLine, Journal, JournalError, Quarantined,
    Record, Slot, SCHEMA_VERSION,
};
use crate::fsm::{Event, RunSecrets, RunState};

/// `meta` key of the unresolved-claim mark.
const UNRESOLVED_CLAIM: &str = "unresolved_claim";
/// `meta` key of the next identity scope to hand out (scope 0 is "no identity").
const NEXT_SCOPE: &str = "next_scope";
/// The oldest schema this build opens (and migrates).
pub const OLDEST_SCHEMA: u32 = 1;
/// Schema 1's trees, dropped once a migration has committed.
const V1_TREES: [&str; 3] = ["records", "active", "ended"];
const T_RECORDS: &str = "v2.records";
const T_PLANS: &str = "v2.plans";
const T_SECRETS: &str = "v2.secrets";
const T_ACTIVE: &str = "v2.active";
const T_ENDED: &str = "v2.ended";
const T_IDENTITIES: &str = "v2.identities";
const T_RUNS: &str = "v3.runs";
/// The trees of this schema (a migration from schema 1 rebuilds them all).
const TREES: [&str; 7] = [
    T_RECORDS,
    T_PLANS,
    T_SECRETS,
    T_ACTIVE,
    T_ENDED,
    T_IDENTITIES,
    T_RUNS,
];
/// `meta` key set by a migration's commit point while per-seq copies of packed records are
/// left to delete (removed once they are).
const PACK_CLEANUP: &str = "pack_cleanup";
/// The first byte of a packed run (`v3.runs`), the pack format's version.
const PACK_FORMAT: u8 = 1;
/// Runs packed per sled batch by a migration.
const PACK_CHUNK: usize = 100;

/// Who the journal's runs belong to: the server (its API base URL) and the runner instance
/// (named by a fingerprint of the credential its registration issued: one per registration,
/// known whether the credential came from registering, the credential file or the env; the
/// instance id is recorded too when this process registered). Run ids are unique only per
/// server, so the journal keys runs by identity and run id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalIdentity {
    pub server: String,
    /// `sha256:` + the first 16 hex digits of SHA-256(credential): names the instance without
    /// holding the secret.
    pub credential: String,
    pub instance_id: Option<i64>,
}

impl JournalIdentity {
    pub fn new(server: &str, credential: &str, instance_id: Option<i64>) -> JournalIdentity {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(credential.trim().as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        JournalIdentity {
            server: server.trim().trim_end_matches('/').to_owned(),
            credential: format!("sha256:{hex}"),
            instance_id,
        }
    }

    /// The key runs are scoped by (the instance id is not part of it: it is not always known).
    pub fn key(&self) -> String {
        format!("{} {}", self.server, self.credential)
    }
}

/// An identity the journal holds runs for (`journal list` and friends show it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub scope: u32,
    pub server: String,
    pub credential: String,
    #[serde(default)]
    pub instance_id: Option<i64>,
}

impl IdentityInfo {
    fn legacy() -> IdentityInfo {
        IdentityInfo {
            scope: 0,
            server: String::new(),
            credential: String::new(),
            instance_id: None,
        }
    }

    /// One line for humans: `server https://ws/api, instance 7 (credential sha256:…)`.
    pub fn describe(&self) -> String {
        if self.scope == 0 {
            return "no recorded identity (written before journal schema 2)".into();
        }
        let instance = match self.instance_id {
            Some(id) => format!("instance {id} (credential {})", self.credential),
            None => format!("instance with credential {}", self.credential),
        };
        format!("server {}, {instance}", self.server)
    }
}

/// Which runs a [`SledJournal`] handle sees.
#[derive(Clone, Debug)]
enum View {
    /// Every identity; a run id is looked up in the identity that holds it (its active run
    /// first, else the newest identity). New runs get no identity. Offline tools and tests.
    Any,
    /// One identity: what the daemon uses ([`SledJournal::scoped`]).
    Scope(u32, Arc<str>),
}

/// The size budget ([`SledJournal::set_size_budget`]), shared by every handle of one journal.
#[derive(Debug, Default)]
struct Budget {
    max_bytes: AtomicU64,
    /// A run became terminal since the last check (only then can pruning free anything).
    check: AtomicBool,
}

/// The sled journal. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct SledJournal {
    db: sled::Db,
    meta: sled::Tree,
    records: sled::Tree,
    plans: sled::Tree,
    secrets: sled::Tree,
    active: sled::Tree,
    ended: sled::Tree,
    identities: sled::Tree,
    /// Terminal runs' records, one packed value per run.
    runs: sled::Tree,
    path: PathBuf,
    view: View,
    budget: Arc<Budget>,
    /// The last state of each run in flight this process has read or written: an append whose
    /// state is what replaying its event on that state gives stores no state.
    states: Arc<Mutex<HashMap<[u8; 12], RunState>>>,
    /// Keeps the files sled creates while running private (set by [`SledJournal::open`]).
    modes: Option<Arc<Mutex<PrivateModes>>>,
}

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub runs: usize,
    pub records: usize,
}

/// What opening did to the stored schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    None,
    /// A journal of schema `from` now is schema [`SCHEMA_VERSION`]: from 1, `runs` runs and
    /// their `records` records rewritten; from 2, the `records` records of `runs` terminal
    /// runs packed.
    Migrated {
        from: u32,
        runs: usize,
        records: usize,
    },
}

fn skey(scope: u32, run: i64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&scope.to_be_bytes());
    key[4..].copy_from_slice(&run_key(run));
    key
}

fn srkey(scope: u32, run: i64, seq: u64) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..12].copy_from_slice(&skey(scope, run));
    key[12..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn parse_skey(key: &[u8]) -> Option<(u32, i64)> {
    let scope: [u8; 4] = key.get(..4)?.try_into().ok()?;
    let run: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some((
        u32::from_be_bytes(scope),
        (u64::from_be_bytes(run) ^ (1 << 63)) as i64,
    ))
}

fn parse_srkey(key: &[u8]) -> Option<(u32, i64, u64)> {
    if key.len() != 20 {
        return None;
    }
    let (scope, run) = parse_skey(key)?;
    let seq: [u8; 8] = key.get(12..20)?.try_into().ok()?;
    Some((scope, run, u64::from_be_bytes(seq)))
}

/// A terminal run's records packed into one value (`v3.runs`): [`PACK_FORMAT`], then per
/// record its seq (u64 big-endian), its length (u32 big-endian) and its stored bytes (exactly
/// what `v2.records` held: [`encode_stored`], or a quarantined record's bytes), in seq order.
pub fn encode_pack<'a>(records: impl IntoIterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut out = vec![PACK_FORMAT];
    for (seq, bytes) in records {
        out.extend_from_slice(&seq.to_be_bytes());
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&bytes[..len as usize]);
    }
    out
}

/// What is left of a damaged pack: the bytes from where it stops making sense, and why.
pub type PackDamage = (Vec<u8>, String);

/// Inverse of [`encode_pack`]: the (seq, stored bytes) it holds, and, when it is damaged, the
/// bytes from where it stops making sense with what is wrong (kept, quarantined by readers).
pub fn decode_pack(bytes: &[u8]) -> (Vec<(u64, Vec<u8>)>, Option<PackDamage>) {
    let mut out = Vec::new();
    match bytes.first() {
        Some(&PACK_FORMAT) => {}
        Some(other) => {
            return (
                out,
                Some((
                    bytes.to_vec(),
                    format!(
                        "packed run of unknown format {other} (this build reads {PACK_FORMAT})"
                    ),
                )),
            )
        }
        None => return (out, Some((Vec::new(), "empty packed run".into()))),
    }
    let mut at = 1;
    while at < bytes.len() {
        let seq: Option<[u8; 8]> = bytes.get(at..at + 8).and_then(|b| b.try_into().ok());
        let len: Option<[u8; 4]> = bytes.get(at + 8..at + 12).and_then(|b| b.try_into().ok());
        let Some((seq, len)) = seq
            .zip(len)
            .map(|(s, l)| (u64::from_be_bytes(s), u32::from_be_bytes(l)))
        else {
            return (
                out,
                Some((bytes[at..].to_vec(), "packed run cut short".into())),
            );
        };
        let start = at + 12;
        let Some(record) = bytes.get(start..start + len as usize) else {
            return (
                out,
                Some((bytes[at..].to_vec(), "packed run cut short".into())),
            );
        };
        out.push((seq, record.to_vec()));
        at = start + len as usize;
    }
    (out, None)
}

/// One stored record of a run as read: (seq, bytes), or what a damaged pack left.
enum Raw {
    Stored(u64, Vec<u8>),
    Damaged(Quarantined),
}

fn plan_bytes(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record.state.plan()).unwrap_or_default()
}

/// The stored form of a record: the record's JSON without `run_id` (the key holds it), without
/// `secrets` (`v2.secrets` holds them), without the plan in the state and in a `claimed` event
/// when it equals the run's stored plan `plan`, and without the state when `keep_state` is
/// false (the writer checked that replaying the event through `fsm::apply` gives it back).
/// What is left is what changed: the event.
pub fn encode_stored(record: &Record, plan: Option<&[u8]>, keep_state: bool) -> Vec<u8> {
    let Ok(Value::Object(mut obj)) = serde_json::to_value(record) else {
        return Vec::new();
    };
    obj.remove("run_id");
    obj.remove("secrets");
    if !keep_state {
        obj.remove("state");
    }
    if let Some(plan) = plan {
        if plan_bytes(record) == plan {
            if let Some(Value::Object(state)) = obj.get_mut("state") {
                state.remove("plan");
            }
        }
        if let Event::Claimed { plan: p } = &record.event {
            if serde_json::to_vec(p).is_ok_and(|b| b == plan) {
                if let Some(Value::Object(event)) = obj.get_mut("event") {
                    event.remove("plan");
                }
            }
        }
    }
    serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
}

/// Inverse of [`encode_stored`] (and reads a whole schema-1 record too): puts back the run
/// id, the plan (parsed once per run by the caller), on seq 1 the secrets, and a state not
/// stored by replaying the event on `prev` (the run's previous state; `None` before seq 1).
pub fn decode_stored(
    run_id: i64,
    seq: u64,
    bytes: &[u8],
    plan: Option<&Value>,
    secrets: Option<&RunSecrets>,
    prev: Option<&RunState>,
) -> Result<Record, String> {
    let mut value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a journal record: {e}"))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| "not a journal record: not a JSON object".to_owned())?;
    let schema = obj.get("schema").and_then(Value::as_u64).unwrap_or(0);
    if schema < u64::from(OLDEST_SCHEMA) || schema > u64::from(SCHEMA_VERSION) {
        return Err(format!(
            "record schema {schema} is not supported by this build (supports {OLDEST_SCHEMA}..={SCHEMA_VERSION})"
        ));
    }
    obj.entry("run_id").or_insert(Value::from(run_id));
    let missing_plan = || "the record's run has no stored plan".to_owned();
    if let Some(Value::Object(state)) = obj.get_mut("state") {
        if !state.contains_key("plan") {
            state.insert("plan".into(), plan.cloned().ok_or_else(missing_plan)?);
        }
    }
    if let Some(Value::Object(event)) = obj.get_mut("event") {
        if event.get("event").and_then(Value::as_str) == Some("claimed")
            && !event.contains_key("plan")
        {
            event.insert("plan".into(), plan.cloned().ok_or_else(missing_plan)?);
        }
    }
    if !obj.contains_key("state") {
        let event: Event = serde_json::from_value(obj.get("event").cloned().unwrap_or_default())
            .map_err(|e| format!("not a journal record: {e}"))?;
        if seq > 1 && prev.is_none() {
            return Err(
                "the record stores no state and the run's previous state is unknown \
                        (an earlier record is unreadable)"
                    .into(),
            );
        }
        let (state, _) = crate::fsm::apply(prev, &event)
            .map_err(|e| format!("the record stores no state and replaying it fails: {e}"))?;
        let state = serde_json::to_value(&state).map_err(|e| e.to_string())?;
        obj.insert("state".into(), state);
    }
    let mut record: Record =
        serde_json::from_value(value).map_err(|e| format!("not a journal record: {e}"))?;
    if seq == 1 && record.secrets.is_none() {
        record.secrets = secrets.cloned();
    }
    Ok(record)
}

impl SledJournal {
    /// Opens (creating if needed) the journal in `dir`, which is created with mode 0700 and
    /// tightened to 0700 if it exists. A journal of an older schema is migrated first
    /// (crash-safe: see [`SledJournal::migrate_v1`]). sled creates its files and its `blobs/`
    /// directory with the process umask (0644/0755 under the usual 022), at open and later (a
    /// blob for every large page, snapshots); the records hold the run token, so after the open
    /// and after every flush the tree is set to directories 0700 and files 0600 (see
    /// [`PrivateModes`]).
    pub fn open(dir: &Path) -> Result<SledJournal, JournalError> {
        Self::open_reporting(dir).map(|(journal, _)| journal)
    }

    /// [`SledJournal::open`], also saying whether it migrated the journal.
    pub fn open_reporting(dir: &Path) -> Result<(SledJournal, Migration), JournalError> {
        fs::create_dir_all(dir).map_err(|e| {
            JournalError::Io(format!("cannot create journal dir {}: {e}", dir.display()))
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| JournalError::Io(format!("cannot set 0700 on {}: {e}", dir.display())))?;
        let (mut journal, migration) = Self::open_dir(dir, true)?;
        let mut modes = PrivateModes::default();
        modes.tighten(dir, true);
        journal.modes = Some(Arc::new(Mutex::new(modes)));
        Ok((journal, migration))
    }

    /// Re-applies the private modes to what sled created since the last pass.
    fn keep_private(&self) {
        if let Some(modes) = &self.modes {
            let mut modes = modes.lock().unwrap_or_else(|e| e.into_inner());
            modes.tighten(&self.path, false);
        }
    }

    /// Opens an existing journal (offline tools: never create one by mistake, and never
    /// migrate: a journal of an older schema is refused with [`JournalError::NeedsMigration`],
    /// so a look with a newer build leaves the older runner's journal as it was).
    pub fn open_existing(dir: &Path) -> Result<SledJournal, JournalError> {
        if !dir.join("conf").exists() && !dir.join("db").exists() {
            return Err(JournalError::Missing {
                path: dir.display().to_string(),
            });
        }
        Self::open_dir(dir, false).map(|(journal, _)| journal)
    }

    /// The schema a journal directory holds, without migrating it (`journal verify`).
    pub fn stored_schema(&self) -> Result<u32, JournalError> {
        read_schema(&self.meta).map(|s| s.unwrap_or(SCHEMA_VERSION))
    }

    fn open_dir(dir: &Path, migrate: bool) -> Result<(SledJournal, Migration), JournalError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                JournalError::Locked {
                    path: dir.display().to_string(),
                }
            }
            other => JournalError::from(other),
        })?;
        let meta = db.open_tree("meta")?;
        let stored = read_schema(&meta)?;
        let names = db.tree_names();
        let has_v1_trees = V1_TREES.iter().any(|t| names.iter().any(|n| n == t));
        let mut migration = Migration::None;
        match stored {
            Some(found) if found > SCHEMA_VERSION => {
                return Err(JournalError::Misuse(format!(
                    "the journal at {} was written by a newer windshift-runner (schema {found}; \
                     this build opens schemas {OLDEST_SCHEMA} to {SCHEMA_VERSION}); a downgrade \
                     cannot read it: run the newer build, or move the directory aside to start \
                     an empty journal",
                    dir.display()
                )));
            }
            Some(found) if found < SCHEMA_VERSION => {
                if !migrate {
                    return Err(JournalError::NeedsMigration {
                        path: dir.display().to_string(),
                        schema: found,
                    });
                }
                migration = if found == 1 {
                    Self::migrate_v1(&db, &meta)?
                } else {
                    if has_v1_trees {
                        // A migration 1 → 2 of an older build committed and crashed before
                        // it dropped the old trees.
                        for t in V1_TREES {
                            db.drop_tree(t)?;
                        }
                    }
                    Self::migrate_v2(&db, &meta)?
                };
            }
            None if has_v1_trees => {
                // Schema 1 journals always wrote `meta.schema`; trees without it are a v1
                // journal whose meta write never became durable.
                if !migrate {
                    return Err(JournalError::NeedsMigration {
                        path: dir.display().to_string(),
                        schema: 1,
                    });
                }
                migration = Self::migrate_v1(&db, &meta)?;
            }
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(_) => {
                if has_v1_trees && migrate {
                    // A migration committed (this schema is durable) and crashed before it
                    // dropped the old trees.
                    for t in V1_TREES {
                        db.drop_tree(t)?;
                    }
                    db.flush()?;
                }
                if migrate && meta.contains_key(PACK_CLEANUP)? {
                    // ... or before it deleted the per-seq copies of the runs it packed.
                    Self::finish_packing(&db, &meta)?;
                }
            }
        }
        if let Migration::Migrated {
            from,
            runs,
            records,
        } = migration
        {
            tracing::info!(
                from,
                to = SCHEMA_VERSION,
                runs,
                records,
                dir = %dir.display(),
                "migrated the journal to this build's schema"
            );
        }
        let journal = SledJournal {
            meta,
            records: db.open_tree(T_RECORDS)?,
            plans: db.open_tree(T_PLANS)?,
            secrets: db.open_tree(T_SECRETS)?,
            active: db.open_tree(T_ACTIVE)?,
            ended: db.open_tree(T_ENDED)?,
            identities: db.open_tree(T_IDENTITIES)?,
            runs: db.open_tree(T_RUNS)?,
            db,
            path: dir.to_path_buf(),
            view: View::Any,
            budget: Arc::new(Budget::default()),
            states: Arc::default(),
            modes: None,
        };
        Ok((journal, migration))
    }

    /// Schema 1 → 3. This schema's trees are rebuilt from the untouched v1 trees (leftovers
    /// of an earlier attempt are dropped first), the terminal runs are packed
    /// ([`SledJournal::write_packs`]), all is flushed, and only then does `meta.schema` become
    /// 3: that one durable write is the commit point. A crash before it leaves a schema-1
    /// journal that the next open migrates again from scratch; a crash after it, a schema-3
    /// journal whose v1 trees (and per-seq copies of packed records) the next open drops.
    /// Migrated runs get no identity (scope 0): the first [`SledJournal::scoped`] view adopts
    /// those still in flight.
    fn migrate_v1(db: &sled::Db, meta: &sled::Tree) -> Result<Migration, JournalError> {
        for t in TREES {
            db.drop_tree(t)?;
        }
        let records = db.open_tree(T_RECORDS)?;
        let plans = db.open_tree(T_PLANS)?;
        let secrets = db.open_tree(T_SECRETS)?;
        let active = db.open_tree(T_ACTIVE)?;
        let ended = db.open_tree(T_ENDED)?;
        let old_records = db.open_tree("records")?;
        let mut runs = 0;
        let mut count = 0;
        let mut batch = sled::Batch::default();
        let mut plan_of_run: Option<(i64, Vec<u8>)> = None;
        for entry in old_records.iter() {
            let (k, v) = entry?;
            let Some((run, seq)) = parse_record_key(&k) else {
                continue;
            };
            if plan_of_run.as_ref().map(|(r, _)| *r) != Some(run) {
                runs += 1;
                plan_of_run = Some((run, Vec::new()));
            }
            let plan = &mut plan_of_run.as_mut().expect("set above").1;
            let bytes = match decode_record(&v) {
                Ok(r) if r.run_id == run && r.seq == seq => {
                    if plan.is_empty() {
                        *plan = plan_bytes(&r);
                        plans.insert(skey(0, run), plan.as_slice())?;
                        if let Some(s) = r.secrets.as_ref().filter(|s| !s.is_empty()) {
                            let s = serde_json::to_vec(s).unwrap_or_default();
                            secrets.insert(skey(0, run), s)?;
                        }
                    }
                    let mut r = r;
                    r.schema = SCHEMA_VERSION;
                    // History keeps its recorded states: replay still checks them.
                    encode_stored(&r, Some(plan), true)
                }
                // Unreadable stays unreadable, byte for byte (quarantined, shown by verify).
                _ => v.to_vec(),
            };
            batch.insert(&srkey(0, run, seq)[..], bytes);
            count += 1;
            if count % 1_000 == 0 {
                records.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        records.apply_batch(batch)?;
        for (old, new) in [("active", &active), ("ended", &ended)] {
            for entry in db.open_tree(old)?.iter() {
                let (k, v) = entry?;
                new.insert(skey(0, key_run(&k)?), v)?;
            }
        }
        Self::write_packs(db)?;
        db.flush()?;
        migration_failpoint("migration_before_commit");
        Self::commit_schema(db, meta)?;
        migration_failpoint("migration_after_commit");
        for t in V1_TREES {
            db.drop_tree(t)?;
        }
        db.flush()?;
        Self::finish_packing(db, meta)?;
        Ok(Migration::Migrated {
            from: 1,
            runs,
            records: count,
        })
    }

    /// Schema 2 → 3: every terminal run's records are packed into `v3.runs`
    /// ([`SledJournal::write_packs`], the per-seq records stay), flushed, then `meta.schema`
    /// becomes 3 (the commit point, with the `pack_cleanup` mark), and only then are the
    /// per-seq copies deleted ([`SledJournal::finish_packing`]). A crash before the commit
    /// point leaves a schema-2 journal whose records are all still in place (an older build
    /// reads it as it was; the next open packs again, merging what an earlier attempt packed);
    /// a crash after it, a schema-3 journal whose leftover per-seq copies readers merge with
    /// the packs and the next open deletes.
    fn migrate_v2(db: &sled::Db, meta: &sled::Tree) -> Result<Migration, JournalError> {
        let (runs, records) = Self::write_packs(db)?;
        db.flush()?;
        migration_failpoint("migration_before_commit");
        Self::commit_schema(db, meta)?;
        migration_failpoint("migration_after_commit");
        Self::finish_packing(db, meta)?;
        Ok(Migration::Migrated {
            from: 2,
            runs,
            records,
        })
    }

    /// The commit point of a migration: `meta.schema` becomes this build's, with the mark
    /// that per-seq copies of packed records are left to delete, in one durable write.
    fn commit_schema(db: &sled::Db, meta: &sled::Tree) -> Result<(), JournalError> {
        let mut batch = sled::Batch::default();
        batch.insert("schema", &SCHEMA_VERSION.to_be_bytes());
        batch.insert(PACK_CLEANUP, &[1u8]);
        meta.apply_batch(batch)?;
        db.flush()?;
        Ok(())
    }

    /// Packs the records of every terminal run (`v2.ended`) that still has per-seq records
    /// into its `v3.runs` value, merged with what that value already holds; the per-seq
    /// records are left in place ([`SledJournal::finish_packing`] deletes them). Returns the
    /// runs packed and their records.
    fn write_packs(db: &sled::Db) -> Result<(usize, usize), JournalError> {
        let records = db.open_tree(T_RECORDS)?;
        let packs = db.open_tree(T_RUNS)?;
        let ended = db.open_tree(T_ENDED)?;
        let mut batch = sled::Batch::default();
        let (mut runs, mut count, mut pending) = (0, 0, 0);
        for entry in ended.iter() {
            let (k, _) = entry?;
            let mut merged = std::collections::BTreeMap::new();
            for entry in records.scan_prefix(&k) {
                let (rk, v) = entry?;
                if let Some((_, _, seq)) = parse_srkey(&rk) {
                    merged.insert(seq, v.to_vec());
                }
            }
            if merged.is_empty() {
                continue;
            }
            if let Some(old) = packs.get(&k)? {
                let (old, damaged) = decode_pack(&old);
                if damaged.is_some() {
                    continue; // keep the damaged pack and the per-seq records as they are
                }
                for (seq, v) in old {
                    merged.entry(seq).or_insert(v);
                }
            }
            count += merged.len();
            batch.insert(
                &k,
                encode_pack(merged.iter().map(|(s, v)| (*s, v.as_slice()))),
            );
            runs += 1;
            pending += 1;
            if pending == PACK_CHUNK || runs == 1 {
                packs.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
                if runs == 1 {
                    db.flush()?;
                    migration_failpoint("migration_packing");
                }
            }
        }
        packs.apply_batch(batch)?;
        Ok((runs, count))
    }

    /// Deletes the per-seq records that a pack holds too (left by a migration), flushes, and
    /// clears the `pack_cleanup` mark.
    fn finish_packing(db: &sled::Db, meta: &sled::Tree) -> Result<(), JournalError> {
        let records = db.open_tree(T_RECORDS)?;
        let packs = db.open_tree(T_RUNS)?;
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for entry in packs.iter() {
            let (k, v) = entry?;
            let (packed, _) = decode_pack(&v);
            for rk in records.scan_prefix(&k).keys() {
                let rk = rk?;
                let held = parse_srkey(&rk)
                    .is_some_and(|(_, _, seq)| packed.iter().any(|(s, _)| *s == seq));
                if held {
                    batch.remove(rk);
                }
            }
            pending += 1;
            if pending == PACK_CHUNK {
                records.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        records.apply_batch(batch)?;
        db.flush()?;
        meta.remove(PACK_CLEANUP)?;
        db.flush()?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every identity this journal holds runs for (scope 0, no identity, first).
    pub fn identities(&self) -> Result<Vec<IdentityInfo>, JournalError> {
        let mut out = vec![IdentityInfo::legacy()];
        for entry in self.identities.iter() {
            let (_, v) = entry?;
            let info: IdentityInfo = serde_json::from_slice(&v)
                .map_err(|e| JournalError::Corruption(format!("bad identity entry: {e}")))?;
            out.push(info);
        }
        out.sort_by_key(|i| i.scope);
        Ok(out)
    }

    /// The view of one identity's runs (offline tools walk every identity with it).
    pub fn view_of(&self, info: &IdentityInfo) -> SledJournal {
        let mut view = self.clone();
        view.view = View::Scope(info.scope, Arc::from(info.describe()));
        view
    }

    /// The view the daemon uses: runs of `identity` only, with plain run ids, so a run id
    /// another server (or another registration) used before is a new run here. Registers the
    /// identity on first use (recording its instance id once known) and adopts the runs in
    /// flight that have no identity (a journal migrated from schema 1 belonged to this
    /// runner's one server); terminal ones stay where they are.
    pub fn scoped(&self, identity: &JournalIdentity) -> Result<SledJournal, JournalError> {
        let key = identity.key();
        let info = match self.identities.get(key.as_bytes())? {
            Some(v) => {
                let mut info: IdentityInfo = serde_json::from_slice(&v)
                    .map_err(|e| JournalError::Corruption(format!("bad identity entry: {e}")))?;
                if info.instance_id.is_none() && identity.instance_id.is_some() {
                    info.instance_id = identity.instance_id;
                    self.identities.insert(
                        key.as_bytes(),
                        serde_json::to_vec(&info).unwrap_or_default(),
                    )?;
                }
                info
            }
            None => {
                let next = match self.meta.get(NEXT_SCOPE)? {
                    Some(v) => v
                        .as_ref()
                        .try_into()
                        .map(u32::from_be_bytes)
                        .map_err(|_| JournalError::Corruption("meta.next_scope".into()))?,
                    None => 1,
                };
                let info = IdentityInfo {
                    scope: next,
                    server: identity.server.clone(),
                    credential: identity.credential.clone(),
                    instance_id: identity.instance_id,
                };
                self.meta
                    .insert(NEXT_SCOPE, &(next.saturating_add(1)).to_be_bytes())?;
                self.identities.insert(
                    key.as_bytes(),
                    serde_json::to_vec(&info).unwrap_or_default(),
                )?;
                info
            }
        };
        self.adopt_unscoped_active(info.scope)?;
        self.db.flush()?;
        self.keep_private();
        Ok(self.view_of(&info))
    }

    /// Moves every run in flight without an identity into `scope` (one transaction per run).
    fn adopt_unscoped_active(&self, scope: u32) -> Result<(), JournalError> {
        if scope == 0 {
            return Ok(());
        }
        let mut runs = Vec::new();
        for entry in self.active.scan_prefix(0u32.to_be_bytes()) {
            let (k, _) = entry?;
            if let Some((_, run)) = parse_skey(&k) {
                runs.push(run);
            }
        }
        for run in runs {
            let to = skey(scope, run);
            if self.active.contains_key(to)? || self.ended.contains_key(to)? {
                continue; // this identity has its own run with that id: leave both alone
            }
            let from = skey(0, run);
            let mut keys = Vec::new();
            for entry in self.records.scan_prefix(from) {
                let (k, v) = entry?;
                keys.push((k, v));
            }
            let result = (&self.records, &self.plans, &self.secrets, &self.active).transaction(
                |(records, plans, secrets, active)| {
                    for (k, v) in &keys {
                        let mut nk = k.to_vec();
                        nk[..4].copy_from_slice(&scope.to_be_bytes());
                        records.insert(nk, v)?;
                        records.remove(k)?;
                    }
                    for tree in [plans, secrets, active] {
                        if let Some(v) = tree.remove(&from)? {
                            tree.insert(&to, v)?;
                        }
                    }
                    Ok::<(), ConflictableTransactionError<String>>(())
                },
            );
            match result {
                Ok(()) => {}
                Err(TransactionError::Abort(msg)) => return Err(JournalError::Bug(msg)),
                Err(TransactionError::Storage(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The scopes this view reads: its own, or every known one.
    fn scopes(&self) -> Result<Vec<u32>, JournalError> {
        match &self.view {
            View::Scope(s, _) => Ok(vec![*s]),
            View::Any => Ok(self.identities()?.into_iter().map(|i| i.scope).collect()),
        }
    }

    /// The scope that holds (or will hold) `run` in this view.
    fn scope_of(&self, run: i64) -> Result<u32, JournalError> {
        if let View::Scope(s, _) = &self.view {
            return Ok(*s);
        }
        let scopes = self.scopes()?;
        for s in &scopes {
            if self.active.contains_key(skey(*s, run))? {
                return Ok(*s);
            }
        }
        for s in scopes.iter().rev() {
            if self.runs.contains_key(skey(*s, run))?
                || self.records.scan_prefix(skey(*s, run)).next().is_some()
            {
                return Ok(*s);
            }
        }
        Ok(0)
    }

    /// Writes raw record bytes at (run, seq) and advances the active index to `seq`, without
    /// decoding: the importer uses it to restore quarantined records exactly.
    pub fn import_raw(&self, run_id: i64, seq: u64, bytes: &[u8]) -> Result<(), JournalError> {
        let scope = self.scope_of(run_id)?;
        self.records.insert(srkey(scope, run_id, seq), bytes)?;
        if self.ended.get(skey(scope, run_id))?.is_none() {
            self.active
                .insert(skey(scope, run_id), &seq.to_be_bytes())?;
        }
        Ok(())
    }

    /// Raw view of the active index: run → last seq (for `journal verify`).
    pub fn active_index(&self) -> Result<Vec<(i64, u64)>, JournalError> {
        let mut out = Vec::new();
        for scope in self.scopes()? {
            for entry in self.active.scan_prefix(scope.to_be_bytes()) {
                let (k, v) = entry?;
                out.push((key_scoped_run(&k)?, index_seq(&v)?));
            }
        }
        Ok(out)
    }

    /// Raw view of the ended index: run → last seq.
    pub fn ended_index(&self) -> Result<Vec<(i64, u64)>, JournalError> {
        let mut out = Vec::new();
        for scope in self.scopes()? {
            for entry in self.ended.scan_prefix(scope.to_be_bytes()) {
                let (k, v) = entry?;
                out.push((key_scoped_run(&k)?, ended_value(&v)?.1));
            }
        }
        Ok(out)
    }

    /// Terminal runs of this view as (scope, run, ended at ms), oldest first.
    fn ended_runs(&self) -> Result<Vec<(u32, i64, i64)>, JournalError> {
        let mut out = Vec::new();
        for scope in self.scopes()? {
            for entry in self.ended.scan_prefix(scope.to_be_bytes()) {
                let (k, v) = entry?;
                let (s, run) = parse_skey(&k)
                    .ok_or_else(|| JournalError::Corruption("bad ended index key".into()))?;
                out.push((s, run, ended_value(&v)?.0));
            }
        }
        out.sort_by_key(|(s, run, at)| (*at, *s, *run));
        Ok(out)
    }

    /// Deletes whole terminal runs (pack, records, plan, secrets, index entry) in one batch
    /// per tree.
    fn delete_runs(&self, runs: &[(u32, i64)]) -> Result<(), JournalError> {
        let mut records = sled::Batch::default();
        let mut heads = sled::Batch::default();
        for (scope, run) in runs {
            for key in self.records.scan_prefix(skey(*scope, *run)).keys() {
                records.remove(key?);
            }
            heads.remove(&skey(*scope, *run));
        }
        self.records.apply_batch(records)?;
        self.runs.apply_batch(heads.clone())?;
        self.plans.apply_batch(heads.clone())?;
        self.secrets.apply_batch(heads.clone())?;
        self.ended.apply_batch(heads)?;
        Ok(())
    }

    /// Retention: appends every terminal run that ended before `cutoff_ms` to `archive`
    /// (JSONL, secrets masked, 0600), fsyncs it, then deletes those runs from the journal
    /// and flushes. A crash in between leaves a run both archived and journaled, never lost.
    pub fn archive_terminal_before(
        &self,
        cutoff_ms: i64,
        archive: &Path,
    ) -> Result<ArchiveSummary, JournalError> {
        let old: Vec<(u32, i64)> = self
            .ended_runs()?
            .into_iter()
            .filter(|(_, _, at)| *at < cutoff_ms)
            .map(|(s, run, _)| (s, run))
            .collect();
        let mut summary = ArchiveSummary::default();
        if old.is_empty() {
            return Ok(summary);
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(archive)
            .map_err(|e| JournalError::Io(format!("cannot open {}: {e}", archive.display())))?;
        // A new archive starts with the export header, so it imports like any export.
        let empty = file.metadata().map(|m| m.len() == 0).unwrap_or(false);
        if empty {
            file.write_all(ExportLine::header().to_json_line().as_bytes())
                .map_err(|e| JournalError::Io(format!("archive write failed: {e}")))?;
        }
        let identities = self.identities()?;
        for (scope, run) in &old {
            if let Some(info) = identities.iter().find(|i| i.scope == *scope && *scope != 0) {
                let line = ExportLine::Run {
                    run_id: *run,
                    identity: info.describe(),
                };
                file.write_all(line.to_json_line().as_bytes())
                    .map_err(|e| JournalError::Io(format!("archive write failed: {e}")))?;
            }
            for slot in self.scope_records(*scope, *run)? {
                let line = ExportLine::from_slot(&slot).to_json_line();
                file.write_all(line.as_bytes())
                    .map_err(|e| JournalError::Io(format!("archive write failed: {e}")))?;
                summary.records += 1;
            }
            summary.runs += 1;
        }
        file.sync_all()
            .map_err(|e| JournalError::Io(format!("archive fsync failed: {e}")))?;
        self.delete_runs(&old)?;
        self.db.flush()?;
        Ok(summary)
    }

    /// Sets the size budget (`WSRUNNER_JOURNAL_MAX_BYTES`; `None`: no budget). Checked after
    /// a flush that made a run terminal: past the budget, the oldest terminal runs are deleted
    /// (never a run in flight), see [`SledJournal::enforce_size_budget`].
    pub fn set_size_budget(&self, max_bytes: Option<u64>) {
        self.budget
            .max_bytes
            .store(max_bytes.unwrap_or(0), Ordering::Relaxed);
        self.budget.check.store(true, Ordering::Relaxed);
    }

    /// The journal's size on disk (sled's files), in bytes.
    pub fn size_on_disk(&self) -> Result<u64, JournalError> {
        Ok(self.db.size_on_disk()?)
    }

    /// Past the budget, deletes the oldest half of the terminal runs (every identity; runs
    /// in flight are never touched) and flushes. sled is log-structured: its files do not
    /// shrink when records are deleted, the freed space is reused by later writes (and its
    /// files grow in steps), so pruning starts at half the budget and frees generously,
    /// keeping the files under the budget.
    /// Returns the number of runs deleted.
    pub fn enforce_size_budget(&self) -> Result<usize, JournalError> {
        let max = self.budget.max_bytes.load(Ordering::Relaxed);
        if max == 0 {
            return Ok(0);
        }
        let size = self.db.size_on_disk()?;
        if size < max / 2 {
            return Ok(0);
        }
        let mut all = self.clone();
        all.view = View::Any;
        let ended = all.ended_runs()?;
        let n = ended.len().div_ceil(2);
        let victims: Vec<(u32, i64)> = ended.iter().take(n).map(|(s, r, _)| (*s, *r)).collect();
        if victims.is_empty() {
            return Ok(0);
        }
        all.delete_runs(&victims)?;
        self.db.flush()?;
        tracing::warn!(
            size_bytes = size,
            budget_bytes = max,
            runs = victims.len(),
            "journal past half its size budget (WSRUNNER_JOURNAL_MAX_BYTES): deleted the oldest terminal runs"
        );
        Ok(victims.len())
    }

    /// A run's slots in seq order; states not stored are replayed from the previous one.
    fn scope_records(&self, scope: u32, run: i64) -> Result<Vec<Slot>, JournalError> {
        let head = self.head(scope, run)?;
        let mut out: Vec<Slot> = Vec::new();
        let mut prev: Option<RunState> = None;
        for raw in self.raw_records(scope, run)? {
            let slot = match raw {
                Raw::Stored(seq, v) => slot_from(run, seq, &v, &head, prev.as_ref()),
                Raw::Damaged(q) => Slot::Quarantined(q),
            };
            prev = match &slot {
                Slot::Record(r) => Some(r.state.clone()),
                Slot::Quarantined(_) => None,
            };
            out.push(slot);
        }
        Ok(out)
    }

    /// A run's stored records in seq order: its pack (a terminal run) merged with its per-seq
    /// records (a run in flight; or copies a migration has not deleted yet, or a raw record
    /// imported after the end), one per seq. What a damaged pack leaves comes last.
    fn raw_records(&self, scope: u32, run: i64) -> Result<Vec<Raw>, JournalError> {
        let rkey = skey(scope, run);
        let mut damaged = None;
        let mut merged = std::collections::BTreeMap::new();
        if let Some(pack) = self.runs.get(rkey)? {
            let (packed, rest) = decode_pack(&pack);
            merged.extend(packed);
            damaged = rest;
        }
        for entry in self.records.scan_prefix(rkey) {
            let (k, v) = entry?;
            let (_, _, seq) = parse_srkey(&k)
                .ok_or_else(|| JournalError::Corruption(format!("bad record key {k:02x?}")))?;
            // A per-seq record written after the pack (a raw import) wins, as it overwrote
            // the record before packing existed.
            merged.insert(seq, v.to_vec());
        }
        let last = merged.keys().next_back().copied().unwrap_or(0);
        let mut out: Vec<Raw> = merged
            .into_iter()
            .map(|(seq, v)| Raw::Stored(seq, v))
            .collect();
        if let Some((bytes, error)) = damaged {
            out.push(Raw::Damaged(Quarantined {
                run_id: run,
                seq: last + 1,
                bytes,
                error,
            }));
        }
        Ok(out)
    }

    /// The run's stored plan (parsed) and secrets.
    fn head(&self, scope: u32, run: i64) -> Result<Head, JournalError> {
        let (plan, run_plan) = match self.plans.get(skey(scope, run))? {
            Some(v) => (
                serde_json::from_slice(&v).ok(),
                serde_json::from_slice(&v).ok(),
            ),
            None => (None, None),
        };
        let secrets = match self.secrets.get(skey(scope, run))? {
            Some(v) => serde_json::from_slice(&v).ok(),
            None => None,
        };
        Ok(Head {
            plan,
            run_plan,
            secrets,
        })
    }

    fn repeated_run_message(&self, run: i64) -> String {
        match &self.view {
            View::Scope(_, label) => format!(
                "run {run} already ran to the end on this runner for the same server and \
                 runner instance ({label}); a server hands out each run id once, so the server \
                 was most likely restored from a backup (or its database reset) and is \
                 reusing ids. The run is refused so the old run's history stays intact. To \
                 run such runs, register this runner again (a new instance gets its own \
                 journal scope), or archive the old runs out of the journal \
                 (`windshift-runner journal archive --older-than-days 0 --to FILE`, runner \
                 stopped)"
            ),
            View::Any => format!("run {run} is already terminal; it takes no more records"),
        }
    }
}

/// A run's plan (as JSON and parsed) and secrets, read once per run.
struct Head {
    plan: Option<Value>,
    run_plan: Option<crate::fsm::RunPlan>,
    secrets: Option<RunSecrets>,
}

/// The common stored form: only the event (the state is replayed, the plan is the run's).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventOnly {
    schema: u32,
    seq: u64,
    at_ms: i64,
    event: Value,
}

/// Fast path of [`decode_stored`] for an [`EventOnly`] record: no JSON round trip of the plan.
/// `None` when the bytes are not of that form (the general path decides).
fn decode_event_only(
    run_id: i64,
    bytes: &[u8],
    head: &Head,
    prev: Option<&RunState>,
) -> Option<Record> {
    let stored: EventOnly = serde_json::from_slice(bytes).ok()?;
    // The event-only form exists since schema 2 (schema-2 records keep their number).
    if !(2..=SCHEMA_VERSION).contains(&stored.schema) || (stored.seq > 1) != prev.is_some() {
        return None;
    }
    let claimed = stored.event.get("event").and_then(Value::as_str) == Some("claimed");
    let event = if claimed && stored.event.get("plan").is_none() {
        Event::Claimed {
            plan: head.run_plan.clone()?,
        }
    } else {
        serde_json::from_value(stored.event).ok()?
    };
    let (state, _) = crate::fsm::apply(prev, &event).ok()?;
    Some(Record {
        schema: stored.schema,
        run_id,
        seq: stored.seq,
        at_ms: stored.at_ms,
        event,
        state,
        secrets: if stored.seq == 1 {
            head.secrets.clone()
        } else {
            None
        },
    })
}

fn slot_from(run_id: i64, seq: u64, value: &[u8], head: &Head, prev: Option<&RunState>) -> Slot {
    if let Some(r) = decode_event_only(run_id, value, head, prev) {
        if r.seq == seq {
            return Slot::Record(r);
        }
    }
    match decode_stored(
        run_id,
        seq,
        value,
        head.plan.as_ref(),
        head.secrets.as_ref(),
        prev,
    ) {
        Ok(r) if r.run_id == run_id && r.seq == seq => Slot::Record(r),
        Ok(r) => Slot::Quarantined(Quarantined {
            run_id,
            seq,
            bytes: value.to_vec(),
            error: format!(
                "record says run {} seq {} but is stored at run {run_id} seq {seq}",
                r.run_id, r.seq
            ),
        }),
        Err(error) => Slot::Quarantined(Quarantined {
            run_id,
            seq,
            bytes: value.to_vec(),
            error,
        }),
    }
}

fn read_schema(meta: &sled::Tree) -> Result<Option<u32>, JournalError> {
    match meta.get("schema")? {
        Some(v) => v
            .as_ref()
            .try_into()
            .map(|b| Some(u32::from_be_bytes(b)))
            .map_err(|_| JournalError::Corruption("meta.schema is not a u32".into())),
        None => Ok(None),
    }
}

fn index_seq(v: &[u8]) -> Result<u64, JournalError> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| JournalError::Corruption("bad active index value".into()))
}

fn ended_value(v: &[u8]) -> Result<(i64, u64), JournalError> {
    let at = v
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_be_bytes);
    let seq = v
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    at.zip(seq)
        .ok_or_else(|| JournalError::Corruption("bad ended index value".into()))
}

fn key_scoped_run(key: &[u8]) -> Result<i64, JournalError> {
    parse_skey(key)
        .map(|(_, run)| run)
        .ok_or_else(|| JournalError::Corruption(format!("bad index key {key:02x?}")))
}

/// Directories 0700 and files 0600 under the journal directory, kept so as sled adds files.
///
/// The 0700 journal directory already keeps other users out of everything below it; the
/// modes are the second wall (a copied or moved directory keeps its files' modes). A umask
/// around sled's calls would not do: the umask is per process, and other threads create
/// checkouts that the agent's uid must read. So the tree is walked after each flush, but a
/// directory is read only when its mtime moved since its last pass, or the pass came within
/// [`MTIME_SLACK`] of that mtime (file times are coarse: a file created in the same tick as
/// the pass would not move it). Best effort: a file sled removes meanwhile is skipped.
#[derive(Debug, Default)]
struct PrivateModes {
    /// Per directory: its mtime at the last pass and when that pass ran.
    seen: HashMap<PathBuf, (SystemTime, SystemTime)>,
}

const MTIME_SLACK: Duration = Duration::from_secs(2);

impl PrivateModes {
    fn tighten(&mut self, dir: &Path, force: bool) {
        let Ok(meta) = fs::symlink_metadata(dir) else {
            return;
        };
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let settled = self.seen.get(dir).is_some_and(|(seen, passed)| {
            *seen == mtime && passed.duration_since(mtime).is_ok_and(|d| d > MTIME_SLACK)
        });
        let mut subdirs: Vec<PathBuf> = self
            .seen
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .cloned()
            .collect();
        if force || !settled {
            let now = SystemTime::now();
            set_mode(dir, &meta, 0o700);
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Ok(meta) = fs::symlink_metadata(&path) else {
                        continue;
                    };
                    if meta.is_dir() {
                        if !subdirs.contains(&path) {
                            subdirs.push(path);
                        }
                    } else if meta.is_file() {
                        set_mode(&path, &meta, 0o600);
                    }
                }
            }
            self.seen.insert(dir.to_owned(), (mtime, now));
        }
        for sub in subdirs {
            self.tighten(&sub, force);
        }
    }
}

fn set_mode(path: &Path, meta: &fs::Metadata, mode: u32) {
    if meta.permissions().mode() & 0o7777 != mode {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
    }
}

/// Test hook: `WSRUNNER_JOURNAL_FAILPOINT=<name>` aborts the process at that step of a
/// migration (`migration_before_commit`, `migration_after_commit`), as a crash would.
fn migration_failpoint(name: &str) {
    if std::env::var("WSRUNNER_JOURNAL_FAILPOINT").as_deref() == Ok(name) {
        eprintln!("journal failpoint {name} reached: aborting");
        std::process::abort();
    }
}

fn k_array(key: &[u8]) -> [u8; 12] {
    let mut out = [0u8; 12];
    if key.len() == 12 {
        out.copy_from_slice(key);
    }
    out
}

impl SledJournal {
    fn lock_states(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 12], RunState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The append's transaction. A first record also stores the run's plan and secrets (six
    /// trees); later ones touch only the records and the indexes: the plan never changes. The
    /// record that makes a run terminal is not stored under its own key: it and the run's
    /// earlier records are packed into its `v3.runs` value, and the per-seq keys deleted,
    /// in the same transaction.
    fn append_in_tx(
        &self,
        record: &Record,
        rkey: [u8; 12],
        key: [u8; 20],
        plan: &[u8],
        keep_state: bool,
    ) -> Result<(), JournalError> {
        let terminal = record.state.is_terminal();
        let mut ended_value = [0u8; 16];
        ended_value[..8].copy_from_slice(&record.at_ms.to_be_bytes());
        ended_value[8..].copy_from_slice(&record.seq.to_be_bytes());
        let repeated = self.repeated_run_message(record.run_id);
        let same_plan = record.seq == 1 || self.plans.get(rkey)?.is_some_and(|p| p == plan);
        let bytes = if same_plan {
            encode_stored(record, Some(plan), keep_state)
        } else {
            // Not the run's stored plan (an imported history): keep it whole.
            encode_stored(record, None, true)
        };
        let secrets = record
            .secrets
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|s| serde_json::to_vec(s).unwrap_or_default());
        // No IO in the closures: sled may run them more than once.
        let check = |active: &sled::transaction::TransactionalTree,
                     ended: &sled::transaction::TransactionalTree|
         -> Result<(), ConflictableTransactionError<String>> {
            if ended.get(rkey)?.is_some() {
                return Err(ConflictableTransactionError::Abort(repeated.clone()));
            }
            let last = match active.get(rkey)? {
                Some(v) => Some(index_seq(&v).map_err(|_| {
                    ConflictableTransactionError::Abort("bad active index value".to_owned())
                })?),
                None => None,
            };
            let expected = last.map_or(1, |s| s + 1);
            if record.seq != expected {
                return Err(ConflictableTransactionError::Abort(format!(
                    "run {} seq {} is not contiguous (expected {expected})",
                    record.run_id, record.seq
                )));
            }
            Ok(())
        };
        let index = |active: &sled::transaction::TransactionalTree,
                     ended: &sled::transaction::TransactionalTree|
         -> Result<(), ConflictableTransactionError<String>> {
            if terminal {
                active.remove(&rkey)?;
                ended.insert(&rkey, &ended_value)?;
            } else {
                active.insert(&rkey, &record.seq.to_be_bytes())?;
            }
            Ok(())
        };
        // The run's per-seq keys, read before the transaction (it cannot scan); the run's
        // task is its only writer, so they do not change meanwhile.
        let earlier: Vec<sled::IVec> = if terminal && record.seq > 1 {
            self.records
                .scan_prefix(rkey)
                .keys()
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let store = |records: &sled::transaction::TransactionalTree,
                     packs: Option<&sled::transaction::TransactionalTree>|
         -> Result<(), ConflictableTransactionError<String>> {
            let Some(packs) = packs else {
                records.insert(&key, bytes.as_slice())?;
                return Ok(());
            };
            let mut merged = std::collections::BTreeMap::new();
            if let Some(old) = packs.get(rkey)? {
                let (old, damaged) = decode_pack(&old);
                if damaged.is_some() {
                    // Never overwrite what cannot be read: this run stays unpacked.
                    records.insert(&key, bytes.as_slice())?;
                    return Ok(());
                }
                merged.extend(old);
            }
            for k in &earlier {
                if let (Some((_, _, seq)), Some(v)) = (parse_srkey(k), records.remove(k)?) {
                    merged.insert(seq, v.to_vec());
                }
            }
            merged.insert(record.seq, bytes.clone());
            packs.insert(
                &rkey,
                encode_pack(merged.iter().map(|(s, v)| (*s, v.as_slice()))),
            )?;
            Ok(())
        };
        let result = if record.seq == 1 {
            (
                &self.records,
                &self.active,
                &self.ended,
                &self.plans,
                &self.secrets,
                &self.runs,
            )
                .transaction(|(records, active, ended, plans, secret_tree, packs)| {
                    check(active, ended)?;
                    plans.insert(&rkey, plan)?;
                    if let Some(s) = &secrets {
                        secret_tree.insert(&rkey, s.as_slice())?;
                    }
                    store(records, terminal.then_some(packs))?;
                    index(active, ended)
                })
        } else if terminal {
            (&self.records, &self.active, &self.ended, &self.runs).transaction(
                |(records, active, ended, packs)| {
                    check(active, ended)?;
                    store(records, Some(packs))?;
                    index(active, ended)
                },
            )
        } else {
            (&self.records, &self.active, &self.ended).transaction(|(records, active, ended)| {
                check(active, ended)?;
                store(records, None)?;
                index(active, ended)
            })
        };
        match result {
            Ok(()) => {
                let mut states = self.lock_states();
                if terminal {
                    states.remove(&rkey);
                    self.budget.check.store(true, Ordering::Relaxed);
                } else {
                    states.insert(rkey, record.state.clone());
                }
                Ok(())
            }
            Err(TransactionError::Abort(msg)) if msg == repeated && record.seq == 1 => {
                Err(JournalError::RunIdReused(msg))
            }
            Err(TransactionError::Abort(msg)) => Err(JournalError::Misuse(msg)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }
}

fn key_run(key: &[u8]) -> Result<i64, JournalError> {
    let b: [u8; 8] = key
        .try_into()
        .map_err(|_| JournalError::Corruption(format!("bad index key {key:02x?}")))?;
    Ok((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

impl Journal for SledJournal {
    fn append(&self, record: &Record) -> Result<(), JournalError> {
        let scope = self.scope_of(record.run_id)?;
        let rkey = skey(scope, record.run_id);
        let key = srkey(scope, record.run_id, record.seq);
        let plan = plan_bytes(record);
        // The lock is released before the transaction (which takes it again on success).
        let replayed = {
            let states = self.lock_states();
            let prev = states.get(&rkey);
            if record.seq > 1 && prev.is_none() {
                false // not known here (first append after a restart): keep the state
            } else {
                crate::fsm::apply(if record.seq == 1 { None } else { prev }, &record.event)
                    .is_ok_and(|(s, _)| s == record.state)
            }
        };
        self.append_in_tx(record, rkey, key, &plan, !replayed)
    }

    fn flush(&self) -> Result<(), JournalError> {
        self.db.flush()?;
        self.keep_private();
        if self.budget.check.swap(false, Ordering::Relaxed) {
            // Best effort: the commit is durable already; a failed prune is retried at the
            // next terminal run and must not fail this one.
            if let Err(e) = self.enforce_size_budget() {
                self.budget.check.store(true, Ordering::Relaxed);
                tracing::warn!("journal size budget: pruning failed: {e}");
            }
        }
        Ok(())
    }

    fn active(&self) -> Result<Vec<Slot>, JournalError> {
        let mut out = Vec::new();
        for scope in self.scopes()? {
            for entry in self.active.scan_prefix(scope.to_be_bytes()) {
                let (k, v) = entry?;
                let (scope, run) = parse_skey(&k)
                    .ok_or_else(|| JournalError::Corruption("bad active index key".into()))?;
                let seq = index_seq(&v)?;
                // A run in flight has a handful of records (the agent's are budgeted):
                // replaying them gives the last state where it is not stored.
                let slots = self.scope_records(scope, run)?;
                match slots.into_iter().find(|s| s.seq() == seq) {
                    Some(slot) => {
                        if let Slot::Record(r) = &slot {
                            self.lock_states().insert(k_array(&k), r.state.clone());
                        }
                        out.push(slot)
                    }
                    None => out.push(Slot::Quarantined(Quarantined {
                        run_id: run,
                        seq,
                        bytes: Vec::new(),
                        error: "the active index points at a missing record".into(),
                    })),
                }
            }
        }
        Ok(out)
    }

    fn set_unresolved_claim(&self, since_ms: Option<i64>) -> Result<(), JournalError> {
        match since_ms {
            Some(ms) => self.meta.insert(UNRESOLVED_CLAIM, &ms.to_be_bytes())?,
            None => self.meta.remove(UNRESOLVED_CLAIM)?,
        };
        self.db.flush()?;
        self.keep_private();
        Ok(())
    }

    fn unresolved_claim(&self) -> Result<Option<i64>, JournalError> {
        match self.meta.get(UNRESOLVED_CLAIM)? {
            None => Ok(None),
            Some(v) => v
                .as_ref()
                .try_into()
                .map(|b| Some(i64::from_be_bytes(b)))
                .map_err(|_| {
                    JournalError::Corruption("meta.unresolved_claim is not an i64".into())
                }),
        }
    }

    fn run_ids(&self) -> Result<Vec<i64>, JournalError> {
        let mut out: Vec<i64> = Vec::new();
        for scope in self.scopes()? {
            let mut last = None;
            for key in self.records.scan_prefix(scope.to_be_bytes()).keys() {
                if let Some((_, run, _)) = parse_srkey(&key?) {
                    if last != Some(run) {
                        out.push(run);
                        last = Some(run);
                    }
                }
            }
            for key in self.runs.scan_prefix(scope.to_be_bytes()).keys() {
                if let Some((_, run)) = parse_skey(&key?) {
                    out.push(run);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn records(&self, run_id: i64) -> Result<Vec<Slot>, JournalError> {
        self.scope_records(self.scope_of(run_id)?, run_id)
    }
}
