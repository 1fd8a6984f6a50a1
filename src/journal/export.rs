//! The journal export format: JSON Lines, importable back into sled (golden fixtures,
//! retention archives, moving a journal between hosts).
//!
//! ```text
//! {"header":{"format":"windshift-runner-journal","version":2}}
//! {"run":{"run_id":42,"identity":"server https://ws/api, instance 7 (…)"}}   version 2
//! {"record":{"schema":3,"run_id":42,"seq":1,...}}          secrets masked
//! {"quarantined":{"run_id":42,"seq":3,"bytes_hex":"…","error":"…"}}
//! ```
//!
//! Version 2 adds the `run` line before each run of a known identity (it is for humans: an
//! import puts every run in the importing view). Version 1 exports import unchanged.

use serde::{Deserialize, Serialize};

use super::{Journal, JournalError, Record, SledJournal, Slot};

pub const EXPORT_FORMAT: &str = "windshift-runner-journal";
pub const EXPORT_VERSION: u32 = 2;

/// One line of an export.
// Lines are built and written one at a time; boxing the record would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportLine {
    Header {
        format: String,
        version: u32,
    },
    /// Whose run the following lines are (written only for runs of a known identity).
    Run {
        run_id: i64,
        identity: String,
    },
    Record(Record),
    Quarantined {
        run_id: i64,
        seq: u64,
        bytes_hex: String,
        error: String,
    },
}

impl ExportLine {
    pub fn header() -> ExportLine {
        ExportLine::Header {
            format: EXPORT_FORMAT.into(),
            version: EXPORT_VERSION,
        }
    }

    /// The export line of a slot, with secrets masked.
    pub fn from_slot(slot: &Slot) -> ExportLine {
        match slot {
            Slot::Record(r) => ExportLine::Record(r.redacted()),
            Slot::Quarantined(q) => ExportLine::Quarantined {
                run_id: q.run_id,
                seq: q.seq,
                bytes_hex: q.bytes.iter().map(|b| format!("{b:02x}")).collect(),
                error: q.error.clone(),
            },
        }
    }

    /// One JSON line, newline included, passed through the redaction layer.
    pub fn to_json_line(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{}\n", crate::redact::redact(&json))
    }
}

/// Every run of `journal` as export lines (header first), secrets masked.
pub fn export_lines(journal: &dyn Journal) -> Result<Vec<ExportLine>, JournalError> {
    let mut out = vec![ExportLine::header()];
    for run in journal.run_ids()? {
        for slot in journal.records(run)? {
            out.push(ExportLine::from_slot(&slot));
        }
    }
    Ok(out)
}

/// Every run of every identity of a sled journal, each known identity's runs preceded by
/// their `run` line.
pub fn export_all(journal: &SledJournal) -> Result<Vec<ExportLine>, JournalError> {
    let mut out = vec![ExportLine::header()];
    for info in journal.identities()? {
        let view = journal.view_of(&info);
        for run in view.run_ids()? {
            if info.scope != 0 {
                out.push(ExportLine::Run {
                    run_id: run,
                    identity: info.describe(),
                });
            }
            for slot in view.records(run)? {
                out.push(ExportLine::from_slot(&slot));
            }
        }
    }
    Ok(out)
}

/// Imports an export into `journal` (normally a fresh one) and flushes. Records go through
/// the normal append path, so sequence rules are checked; quarantined entries are restored
/// byte for byte. Returns the number of lines imported.
pub fn import_lines(text: &str, journal: &SledJournal) -> Result<usize, String> {
    let mut count = 0;
    let mut saw_header = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(line)
            .map_err(|e| format!("line {n}: not a journal export line: {e}"))?;
        match parsed {
            ExportLine::Header { format, version } => {
                if format != EXPORT_FORMAT || version > EXPORT_VERSION {
                    return Err(format!(
                        "line {n}: unsupported export {format:?} version {version} \
                         (this build reads {EXPORT_FORMAT} up to version {EXPORT_VERSION})"
                    ));
                }
                saw_header = true;
            }
            _ if !saw_header => {
                return Err(format!(
                    "line {n}: the export must start with its header line"
                ))
            }
            ExportLine::Run { .. } => {}
            ExportLine::Record(mut record) => {
                record.schema = super::SCHEMA_VERSION;
                journal
                    .append(&record)
                    .map_err(|e| format!("line {n}: {e}"))?;
                count += 1;
            }
            ExportLine::Quarantined {
                run_id,
                seq,
                bytes_hex,
                ..
            } => {
                let bytes =
                    decode_hex(&bytes_hex).ok_or_else(|| format!("line {n}: bad bytes_hex"))?;
                journal
                    .import_raw(run_id, seq, &bytes)
                    .map_err(|e| format!("line {n}: {e}"))?;
                count += 1;
            }
        }
    }
    if !saw_header {
        return Err("empty export: no header line".into());
    }
    journal.flush().map_err(|e| e.to_string())?;
    Ok(count)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
