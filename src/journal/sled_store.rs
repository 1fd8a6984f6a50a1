//! The sled-backed journal.
//!
//! Trees: `records` ((run, seq) → record JSON), `active` (run → last seq, non-terminal runs
//! only: start-up reads this instead of history), `ended` (run → terminal time and last seq:
//! what retention walks), `meta` (schema version; `unresolved_claim`: unix ms of a claim whose
//! answer may have been lost, see `Journal::set_unresolved_claim`).

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{
    decode_record, encode_record, parse_record_key, record_key, run_key, ExportLine, Journal,
    JournalError, Quarantined, Record, Slot, SCHEMA_VERSION,
};

/// `meta` key of the unresolved-claim mark.
const UNRESOLVED_CLAIM: &str = "unresolved_claim";

/// The sled journal. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct SledJournal {
    db: sled::Db,
    meta: sled::Tree,
    records: sled::Tree,
    active: sled::Tree,
    ended: sled::Tree,
    path: PathBuf,
    /// Keeps the files sled creates while running private (set by [`SledJournal::open`]).
    modes: Option<Arc<Mutex<PrivateModes>>>,
}

/// What a retention pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    pub runs: usize,
    pub records: usize,
}

impl SledJournal {
    /// Opens (creating if needed) the journal in `dir`, which is created with mode 0700 and
    /// tightened to 0700 if it exists. sled creates its files and its `blobs/` directory with
    /// the process umask (0644/0755 under the usual 022), at open and later (a blob for every
    /// large page, snapshots); the records hold the run token, so after the open and after
    /// every flush the tree is set to directories 0700 and files 0600 (see [`PrivateModes`]).
    pub fn open(dir: &Path) -> Result<SledJournal, JournalError> {
        fs::create_dir_all(dir).map_err(|e| {
            JournalError::Io(format!("cannot create journal dir {}: {e}", dir.display()))
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| JournalError::Io(format!("cannot set 0700 on {}: {e}", dir.display())))?;
        let mut journal = Self::open_dir(dir)?;
        let mut modes = PrivateModes::default();
        modes.tighten(dir, true);
        journal.modes = Some(Arc::new(Mutex::new(modes)));
        Ok(journal)
    }

    /// Re-applies the private modes to what sled created since the last pass.
    fn keep_private(&self) {
        if let Some(modes) = &self.modes {
            let mut modes = modes.lock().unwrap_or_else(|e| e.into_inner());
            modes.tighten(&self.path, false);
        }
    }

    /// Opens an existing journal (offline tools: never create one by mistake).
    pub fn open_existing(dir: &Path) -> Result<SledJournal, JournalError> {
        if !dir.join("conf").exists() && !dir.join("db").exists() {
            return Err(JournalError::Missing {
                path: dir.display().to_string(),
            });
        }
        Self::open_dir(dir)
    }

    fn open_dir(dir: &Path) -> Result<SledJournal, JournalError> {
        let db = sled::Config::new().path(dir).open().map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                JournalError::Locked {
                    path: dir.display().to_string(),
                }
            }
            other => JournalError::from(other),
        })?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema")? {
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| JournalError::Corruption("meta.schema is not a u32".into()))?;
                if found > SCHEMA_VERSION {
                    return Err(JournalError::Misuse(format!(
                        "the journal was written by a newer windshift-runner (schema {found}, \
                         this build reads up to {SCHEMA_VERSION}); upgrade before opening it"
                    )));
                }
            }
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())?;
            }
        }
        Ok(SledJournal {
            meta,
            records: db.open_tree("records")?,
            active: db.open_tree("active")?,
            ended: db.open_tree("ended")?,
            db,
            path: dir.to_path_buf(),
            modes: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes raw record bytes at (run, seq) and advances the active index to `seq`, without
    /// decoding: the importer uses it to restore quarantined records exactly.
    pub fn import_raw(&self, run_id: i64, seq: u64, bytes: &[u8]) -> Result<(), JournalError> {
        self.records.insert(record_key(run_id, seq), bytes)?;
        if self.ended.get(run_key(run_id))?.is_none() {
            self.active.insert(run_key(run_id), &seq.to_be_bytes())?;
        }
        Ok(())
    }

    /// Raw view of the active index: run → last seq (for `journal verify`).
    pub fn active_index(&self) -> Result<Vec<(i64, u64)>, JournalError> {
        index_entries(&self.active)
    }

    /// Raw view of the ended index: run → last seq.
    pub fn ended_index(&self) -> Result<Vec<(i64, u64)>, JournalError> {
        let mut out = Vec::new();
        for entry in self.ended.iter() {
            let (k, v) = entry?;
            let run = key_run(&k)?;
            let seq = v
                .get(8..16)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| JournalError::Corruption("bad ended index value".into()))?;
            out.push((run, seq));
        }
        Ok(out)
    }

    /// Retention: appends every terminal run that ended before `cutoff_ms` to `archive`
    /// (JSONL, secrets masked, 0600), fsyncs it, then deletes those runs from the journal
    /// and flushes. A crash in between leaves a run both archived and journaled, never lost.
    pub fn archive_terminal_before(
        &self,
        cutoff_ms: i64,
        archive: &Path,
    ) -> Result<ArchiveSummary, JournalError> {
        let mut old = Vec::new();
        for entry in self.ended.iter() {
            let (k, v) = entry?;
            let ended_at = v
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(i64::from_be_bytes)
                .ok_or_else(|| JournalError::Corruption("bad ended index value".into()))?;
            if ended_at < cutoff_ms {
                old.push(key_run(&k)?);
            }
        }
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
        let mut keys = Vec::new();
        for run in &old {
            for slot in self.records(*run)? {
                let line = ExportLine::from_slot(&slot).to_json_line();
                file.write_all(line.as_bytes())
                    .map_err(|e| JournalError::Io(format!("archive write failed: {e}")))?;
                keys.push(record_key(*run, slot.seq()));
                summary.records += 1;
            }
            summary.runs += 1;
        }
        file.sync_all()
            .map_err(|e| JournalError::Io(format!("archive fsync failed: {e}")))?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(&key);
        }
        self.records.apply_batch(batch)?;
        let mut ended = sled::Batch::default();
        for run in &old {
            ended.remove(&run_key(*run));
        }
        self.ended.apply_batch(ended)?;
        self.db.flush()?;
        Ok(summary)
    }

    fn slot_from(&self, key: &[u8], value: &[u8]) -> Result<Slot, JournalError> {
        let (run_id, seq) = parse_record_key(key)
            .ok_or_else(|| JournalError::Corruption(format!("bad record key {key:02x?}")))?;
        Ok(match decode_record(value) {
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
        })
    }
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

fn key_run(key: &[u8]) -> Result<i64, JournalError> {
    let b: [u8; 8] = key
        .try_into()
        .map_err(|_| JournalError::Corruption(format!("bad index key {key:02x?}")))?;
    Ok((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
}

fn index_entries(tree: &sled::Tree) -> Result<Vec<(i64, u64)>, JournalError> {
    let mut out = Vec::new();
    for entry in tree.iter() {
        let (k, v) = entry?;
        let seq = v
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| JournalError::Corruption("bad active index value".into()))?;
        out.push((key_run(&k)?, seq));
    }
    Ok(out)
}

impl Journal for SledJournal {
    fn append(&self, record: &Record) -> Result<(), JournalError> {
        let bytes = encode_record(record);
        let rkey = run_key(record.run_id);
        let key = record_key(record.run_id, record.seq);
        let terminal = record.state.is_terminal();
        let mut ended_value = [0u8; 16];
        ended_value[..8].copy_from_slice(&record.at_ms.to_be_bytes());
        ended_value[8..].copy_from_slice(&record.seq.to_be_bytes());
        let result =
            (&self.records, &self.active, &self.ended).transaction(|(records, active, ended)| {
                // No IO in here: sled may run this closure more than once.
                if ended.get(rkey)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(format!(
                        "run {} is already terminal; it takes no more records",
                        record.run_id
                    )));
                }
                let last = match active.get(rkey)? {
                    Some(v) => {
                        Some(v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
                            ConflictableTransactionError::Abort("bad active index value".to_owned())
                        })?)
                    }
                    None => None,
                };
                let expected = last.map_or(1, |s| s + 1);
                if record.seq != expected {
                    return Err(ConflictableTransactionError::Abort(format!(
                        "run {} seq {} is not contiguous (expected {expected})",
                        record.run_id, record.seq
                    )));
                }
                records.insert(&key, bytes.as_slice())?;
                if terminal {
                    active.remove(&rkey)?;
                    ended.insert(&rkey, &ended_value)?;
                } else {
                    active.insert(&rkey, &record.seq.to_be_bytes())?;
                }
                Ok(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(msg)) => Err(JournalError::Misuse(msg)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn flush(&self) -> Result<(), JournalError> {
        self.db.flush()?;
        self.keep_private();
        Ok(())
    }

    fn active(&self) -> Result<Vec<Slot>, JournalError> {
        let mut out = Vec::new();
        for (run, seq) in index_entries(&self.active)? {
            let key = record_key(run, seq);
            match self.records.get(key)? {
                Some(v) => out.push(self.slot_from(&key, &v)?),
                None => out.push(Slot::Quarantined(Quarantined {
                    run_id: run,
                    seq,
                    bytes: Vec::new(),
                    error: "the active index points at a missing record".into(),
                })),
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
        for key in self.records.iter().keys() {
            let key = key?;
            if let Some((run, _)) = parse_record_key(&key) {
                if out.last() != Some(&run) {
                    out.push(run);
                }
            }
        }
        Ok(out)
    }

    fn records(&self, run_id: i64) -> Result<Vec<Slot>, JournalError> {
        let mut out = Vec::new();
        for entry in self.records.scan_prefix(run_key(run_id)) {
            let (k, v) = entry?;
            out.push(self.slot_from(&k, &v)?);
        }
        Ok(out)
    }
}
