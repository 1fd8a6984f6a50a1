//! The offline journal tools: `windshift-runner journal list | show <run> | replay | verify |
//! export | import | archive | migrate`. Exit codes: 0 clean, 1 findings, 2 cannot run.
//!
//! Runs are kept per identity (server and runner instance); every command walks each identity
//! and says whose runs it shows. A journal of an older schema is read through a migrated
//! temporary copy (the tools never migrate in place, except `migrate`).
//!
//! sled holds an exclusive lock on its directory while a runner runs; the tools detect that,
//! say so, and offer `--copy` (copy the directory to a temp dir and open the copy).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::json;

use super::{
    export_all, import_lines, replay_run, ExportLine, IdentityInfo, Journal, JournalError,
    Migration, Record, SledJournal, Slot, OLDEST_SCHEMA, SCHEMA_VERSION,
};
use crate::fsm::{describe_verdict, Event};

pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_FINDINGS: i32 = 1;
pub const EXIT_CANNOT_RUN: i32 = 2;

/// Where the runner keeps its journal unless told otherwise.
pub const DEFAULT_DB: &str = "/var/lib/windshift-runner/journal";

/// `windshift-runner journal …`
#[derive(Args, Debug)]
pub struct JournalArgs {
    /// The journal directory (the runner's sled database).
    #[arg(long, global = true, env = "WSRUNNER_JOURNAL_DIR", default_value = DEFAULT_DB)]
    pub db: PathBuf,
    /// Copy the database to a private temp dir and open the copy (use while a runner holds
    /// the lock; the copy is a consistent-enough snapshot for diagnosis).
    #[arg(long, global = true)]
    pub copy: bool,
    /// Machine-readable output (JSON; `export` is always JSON Lines).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: JournalCommand,
}

#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// One line per run: state, records, last change, verdict.
    List,
    /// A run's timeline: seq, time, time since the previous record, event, resulting state.
    Show { run: i64 },
    /// Fold every run's records through the state machine and report divergences.
    Replay,
    /// Check invariants: contiguous seqs, legal transitions, consistent indexes, no stale
    /// active run, unreadable records (quarantined, listed, not fatal).
    Verify {
        /// An active run whose last record is older than this is a finding.
        #[arg(long, default_value_t = 14)]
        retention_days: u32,
    },
    /// Every record as JSON Lines, secrets masked (importable with `journal import`).
    Export,
    /// Import an export into an empty journal at --db (creating it, mode 0700).
    Import { file: PathBuf },
    /// Retention: archive terminal runs that ended more than N days ago to a JSONL file
    /// (secrets masked), then delete them from the journal.
    Archive {
        #[arg(long)]
        older_than_days: u32,
        #[arg(long)]
        to: PathBuf,
    },
    /// Migrate a journal of an older schema in place (the runner does this when it starts;
    /// stop the runner first).
    Migrate,
}

/// Runs a journal command, writing its report to `out` and problems to `err`.
/// Returns the process exit code.
pub fn run(args: &JournalArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match run_inner(args, out, err) {
        Ok(code) => code,
        Err(message) => {
            let _ = writeln!(
                err,
                "windshift-runner journal: {}",
                crate::redact::redact(&message)
            );
            EXIT_CANNOT_RUN
        }
    }
}

fn run_inner(args: &JournalArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32, String> {
    if let JournalCommand::Import { file } = &args.command {
        return import(&args.db, file, out);
    }
    if let JournalCommand::Migrate = &args.command {
        if args.copy {
            return Err("migrate changes the journal; it cannot run on a --copy".into());
        }
        if !args.db.join("conf").exists() && !args.db.join("db").exists() {
            return Err(JournalError::Missing {
                path: args.db.display().to_string(),
            }
            .to_string());
        }
        let (_, migration) = SledJournal::open_reporting(&args.db).map_err(|e| e.to_string())?;
        let text = match migration {
            Migration::None => format!("the journal is already schema {SCHEMA_VERSION}\n"),
            Migration::Migrated {
                from,
                runs,
                records,
            } => format!(
                "migrated schema {from} to {SCHEMA_VERSION}: {runs} runs, {records} records\n"
            ),
        };
        emit(out, &text)?;
        return Ok(EXIT_CLEAN);
    }
    if let JournalCommand::Archive {
        older_than_days,
        to,
    } = &args.command
    {
        if args.copy {
            return Err("archive changes the journal; it cannot run on a --copy".into());
        }
        let journal = open(&args.db)?;
        let cutoff = super::now_ms() - i64::from(*older_than_days) * 86_400_000;
        let summary = journal
            .archive_terminal_before(cutoff, to)
            .map_err(|e| e.to_string())?;
        emit(
            out,
            &format!(
                "archived {} runs ({} records) to {}\n",
                summary.runs,
                summary.records,
                to.display()
            ),
        )?;
        return Ok(EXIT_CLEAN);
    }
    let (mut copy_guard, dir) = if args.copy {
        let (guard, dir) = copy_db(&args.db)?;
        (Some(guard), dir)
    } else {
        (None, args.db.clone())
    };
    let (journal, stored_schema) = match SledJournal::open_existing(&dir) {
        Err(JournalError::NeedsMigration { schema, .. }) => {
            // Read an older journal through a migrated copy: the original stays as the older
            // runner left it (it may still need to open it).
            let (guard, copy) = copy_db(&dir)?;
            let journal = SledJournal::open(&copy).map_err(|e| e.to_string())?;
            let _ = writeln!(
                err,
                "note: {} is journal schema {schema}; reading a migrated copy (the runner \
                 migrates it in place when it starts)",
                args.db.display()
            );
            copy_guard = Some(guard);
            (journal, schema)
        }
        other => {
            let journal = other.map_err(|e| open_error(e, &dir))?;
            let schema = journal.stored_schema().map_err(|e| e.to_string())?;
            (journal, schema)
        }
    };
    let _keep_copy = copy_guard;
    register_secrets(&journal);
    match &args.command {
        JournalCommand::List => list(&journal, args.json, out),
        JournalCommand::Show { run } => show(&journal, *run, args.json, out),
        JournalCommand::Replay => replay(&journal, args.json, out),
        JournalCommand::Verify { retention_days } => {
            let findings =
                verify(&journal, *retention_days, super::now_ms()).map_err(|e| e.to_string())?;
            let schema = format!(
                "schema {stored_schema} (this build writes {SCHEMA_VERSION}, opens {OLDEST_SCHEMA} to {SCHEMA_VERSION})"
            );
            if !args.json {
                emit(out, &format!("journal {schema}\n"))?;
            }
            report_findings_with(
                "verify",
                &findings,
                args.json.then_some(stored_schema),
                args.json,
                out,
            )
        }
        JournalCommand::Export => {
            for line in export_all(&journal).map_err(|e| e.to_string())? {
                emit(out, &line.to_json_line())?;
            }
            Ok(EXIT_CLEAN)
        }
        JournalCommand::Import { .. }
        | JournalCommand::Archive { .. }
        | JournalCommand::Migrate => Err("unreachable: handled above".into()),
    }
}

/// Each identity's view, with its description (`None` for runs of no recorded identity).
fn views(journal: &SledJournal) -> Result<Vec<(Option<String>, SledJournal)>, String> {
    Ok(journal
        .identities()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|info: &IdentityInfo| {
            let label = (info.scope != 0).then(|| info.describe());
            (label, journal.view_of(info))
        })
        .collect())
}

fn open_error(e: JournalError, dir: &Path) -> String {
    match e {
        JournalError::Locked { .. } => format!(
            "{e}\n  a live runner holds this journal; read a snapshot instead:\n    \
             windshift-runner journal --db {} --copy <command>",
            dir.display()
        ),
        other => other.to_string(),
    }
}

fn open(dir: &Path) -> Result<SledJournal, String> {
    SledJournal::open_existing(dir).map_err(|e| open_error(e, dir))
}

/// Copies the db directory into a fresh 0700 temp dir. sled files are append-mostly and
/// recovered on open, so a copy taken under a live runner opens like after a crash.
fn copy_db(src: &Path) -> Result<(tempfile::TempDir, PathBuf), String> {
    if !src.is_dir() {
        return Err(JournalError::Missing {
            path: src.display().to_string(),
        }
        .to_string());
    }
    let tmp = tempfile::Builder::new()
        .prefix("wsr-journal-copy-")
        .tempdir()
        .map_err(|e| format!("cannot create a temp dir for --copy: {e}"))?;
    let dest = tmp.path().join("journal");
    copy_dir(src, &dest).map_err(|e| format!("cannot copy {}: {e}", src.display()))?;
    Ok((tmp, dest))
}

fn copy_dir(src: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let to = dest.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    Ok(())
}

/// Secrets stored in the journal are registered so any text that echoes one is masked too.
fn register_secrets(journal: &SledJournal) {
    if let Ok(ids) = journal.run_ids() {
        for run in ids {
            if let Ok(Some(Slot::Record(first))) =
                journal.records(run).map(|s| s.into_iter().next())
            {
                for value in first.secrets.iter().flat_map(|s| s.env.values()) {
                    crate::redact::register_secret(value);
                }
            }
        }
    }
}

fn emit(out: &mut dyn Write, text: &str) -> Result<(), String> {
    out.write_all(crate::redact::redact(text).as_bytes())
        .map_err(|e| format!("cannot write output: {e}"))
}

fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms}ms"))
}

fn fmt_duration(ms: i64) -> String {
    if ms < 0 {
        return format!("-{}", fmt_duration(-ms));
    }
    if ms < 60_000 {
        format!("+{}.{:03}s", ms / 1000, ms % 1000)
    } else {
        format!("+{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// A short human description of an event.
pub fn describe_event(event: &Event) -> String {
    match event {
        Event::Claimed { plan } => format!(
            "claimed ({}, {} repo{})",
            plan.kind,
            plan.repos.len(),
            if plan.repos.len() == 1 { "" } else { "s" }
        ),
        Event::CheckoutFailed { error } => format!("checkout failed: {error}"),
        Event::ContainerExited { code } => match code {
            Some(c) => format!("container exited with code {c}"),
            None => "container exited (no exit code)".into(),
        },
        Event::AgentSignal { signal } => match signal {
            crate::fsm::AgentSignal::Event { event_type } => format!("agent event {event_type}"),
            crate::fsm::AgentSignal::Finish { outcome, .. } => format!("agent finish ({outcome})"),
            crate::fsm::AgentSignal::Error { message } => format!("agent error: {message}"),
            crate::fsm::AgentSignal::SessionIdle => "agent session_idle".into(),
        },
        Event::PushFailed { error } => format!("push failed: {error}"),
        Event::ReportFailed { error, retryable } => format!(
            "report failed ({}): {error}",
            if *retryable { "will retry" } else { "final" }
        ),
        Event::CancelRequested { force: true } => "force-cancel requested".into(),
        other => other.kind().to_string(),
    }
}

fn list(journal: &SledJournal, as_json: bool, out: &mut dyn Write) -> Result<i32, String> {
    let mut rows = Vec::new();
    let mut quarantined = 0;
    for (identity, journal) in views(journal)? {
        for run in journal.run_ids().map_err(|e| e.to_string())? {
            let slots = journal.records(run).map_err(|e| e.to_string())?;
            let bad = slots
                .iter()
                .filter(|s| matches!(s, Slot::Quarantined(_)))
                .count();
            quarantined += bad;
            let last = slots.iter().rev().find_map(|s| match s {
                Slot::Record(r) => Some(r),
                Slot::Quarantined(_) => None,
            });
            rows.push(json!({
                "run_id": run,
                "records": slots.len(),
                "quarantined": bad,
                "state": last.map(|r| r.state.kind().to_string()),
                "last_at": last.map(|r| fmt_time(r.at_ms)),
                "verdict": last.and_then(|r| r.state.verdict()).map(|v| v.status.as_wire()),
                "describe": last.map(|r| r.state.describe()),
                "identity": identity,
            }));
        }
    }
    if as_json {
        emit(out, &format!("{}\n", serde_json::Value::Array(rows)))?;
    } else {
        emit(
            out,
            &format!(
                "{:<8} {:<9} {:>7}  {:<24}  {}\n",
                "RUN", "STATE", "RECORDS", "LAST (UTC)", "DETAIL"
            ),
        )?;
        let mut shown_identity: Option<&serde_json::Value> = None;
        for row in &rows {
            if !row["identity"].is_null() && shown_identity != Some(&row["identity"]) {
                emit(
                    out,
                    &format!("-- {}\n", row["identity"].as_str().unwrap_or_default()),
                )?;
                shown_identity = Some(&row["identity"]);
            }
            let note = if row["quarantined"].as_u64() > Some(0) {
                format!("  [{} quarantined record(s)]", row["quarantined"])
            } else {
                String::new()
            };
            emit(
                out,
                &format!(
                    "{:<8} {:<9} {:>7}  {:<24}  {}{}\n",
                    row["run_id"].as_i64().unwrap_or_default(),
                    row["state"].as_str().unwrap_or("?"),
                    row["records"].as_u64().unwrap_or_default(),
                    row["last_at"].as_str().unwrap_or("-"),
                    row["describe"].as_str().unwrap_or("unreadable"),
                    note
                ),
            )?;
        }
    }
    Ok(if quarantined > 0 {
        EXIT_FINDINGS
    } else {
        EXIT_CLEAN
    })
}

fn show(
    journal: &SledJournal,
    run: i64,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<i32, String> {
    let mut found = Vec::new();
    for (identity, view) in views(journal)? {
        let slots = view.records(run).map_err(|e| e.to_string())?;
        if !slots.is_empty() {
            found.push((identity, slots));
        }
    }
    if found.is_empty() {
        return Err(format!(
            "run {run} is not in this journal (see `journal list`)"
        ));
    }
    let mut code = EXIT_CLEAN;
    let several = found.len() > 1;
    for (identity, slots) in found {
        if !as_json || several {
            if let Some(identity) = &identity {
                emit(out, &format!("-- {identity}\n"))?;
            }
        }
        code = code.max(show_slots(run, &slots, as_json, out)?);
    }
    Ok(code)
}

fn show_slots(run: i64, slots: &[Slot], as_json: bool, out: &mut dyn Write) -> Result<i32, String> {
    let mut quarantined = 0;
    if as_json {
        let lines: Vec<serde_json::Value> = slots
            .iter()
            .map(|s| serde_json::to_value(ExportLine::from_slot(s)).unwrap_or_default())
            .collect();
        emit(out, &format!("{}\n", serde_json::Value::Array(lines)))?;
        quarantined = slots
            .iter()
            .filter(|s| matches!(s, Slot::Quarantined(_)))
            .count();
    } else {
        if let Some(Slot::Record(first)) = slots.first() {
            let plan = first.state.plan();
            let repos: Vec<&str> = plan.repos.iter().map(|r| r.slug.as_str()).collect();
            emit(
                out,
                &format!(
                    "run {run}: kind {}, image {}, repos [{}], instance {}\n",
                    plan.kind,
                    if plan.image.is_empty() {
                        "(default)"
                    } else {
                        &plan.image
                    },
                    repos.join(", "),
                    if plan.instance.is_empty() {
                        "-"
                    } else {
                        &plan.instance
                    },
                ),
            )?;
        }
        emit(
            out,
            &format!(
                "{:>4}  {:<24}  {:>9}  {:<36}  STATE\n",
                "SEQ", "TIME (UTC)", "SINCE", "EVENT"
            ),
        )?;
        let mut prev: Option<i64> = None;
        for slot in slots {
            match slot {
                Slot::Record(r) => {
                    let since = prev.map_or("-".to_owned(), |p| fmt_duration(r.at_ms - p));
                    prev = Some(r.at_ms);
                    emit(
                        out,
                        &format!(
                            "{:>4}  {:<24}  {:>9}  {:<36}  {}\n",
                            r.seq,
                            fmt_time(r.at_ms),
                            since,
                            describe_event(&r.event),
                            r.state.describe()
                        ),
                    )?;
                }
                Slot::Quarantined(q) => {
                    quarantined += 1;
                    emit(
                        out,
                        &format!(
                            "{:>4}  QUARANTINED ({} bytes): {}\n",
                            q.seq,
                            q.bytes.len(),
                            q.error
                        ),
                    )?;
                }
            }
        }
        if let Some(Slot::Record(last)) = slots.last() {
            if let Some(v) = last.state.verdict() {
                emit(out, &format!("verdict: {}\n", describe_verdict(v)))?;
            }
        }
    }
    Ok(if quarantined > 0 {
        EXIT_FINDINGS
    } else {
        EXIT_CLEAN
    })
}

fn replay(journal: &SledJournal, as_json: bool, out: &mut dyn Write) -> Result<i32, String> {
    let mut findings = Vec::new();
    let mut runs = 0;
    for (identity, journal) in views(journal)? {
        for run in journal.run_ids().map_err(|e| e.to_string())? {
            runs += 1;
            let slots = journal.records(run).map_err(|e| e.to_string())?;
            findings.extend(labelled(&identity, replay_run(&slots)));
        }
    }
    if !as_json && findings.is_empty() {
        emit(
            out,
            &format!("replayed {runs} runs: every recorded state matches\n"),
        )?;
        return Ok(EXIT_CLEAN);
    }
    report_findings("replay", &findings, as_json, out)
}

/// Findings of a known identity's runs say whose runs they are.
fn labelled(identity: &Option<String>, findings: Vec<String>) -> Vec<String> {
    match identity {
        None => findings,
        Some(identity) => findings
            .into_iter()
            .map(|f| format!("{f} [{identity}]"))
            .collect(),
    }
}

fn report_findings(
    what: &str,
    findings: &[String],
    as_json: bool,
    out: &mut dyn Write,
) -> Result<i32, String> {
    report_findings_with(what, findings, None, as_json, out)
}

fn report_findings_with(
    what: &str,
    findings: &[String],
    schema: Option<u32>,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<i32, String> {
    if as_json {
        let mut report =
            json!({"command": what, "clean": findings.is_empty(), "findings": findings});
        if let Some(schema) = schema {
            report["schema"] = json!(schema);
        }
        emit(out, &format!("{report}\n"))?;
    } else if findings.is_empty() {
        emit(out, &format!("{what}: clean\n"))?;
    } else {
        for f in findings {
            emit(out, &format!("{f}\n"))?;
        }
        emit(out, &format!("{what}: {} finding(s)\n", findings.len()))?;
    }
    Ok(if findings.is_empty() {
        EXIT_CLEAN
    } else {
        EXIT_FINDINGS
    })
}

/// The `verify` checks, per identity. Each finding is one human-readable line.
pub fn verify(
    journal: &SledJournal,
    retention_days: u32,
    now_ms: i64,
) -> Result<Vec<String>, JournalError> {
    let mut findings = Vec::new();
    for info in journal.identities()? {
        let label = (info.scope != 0).then(|| info.describe());
        let found = verify_view(&journal.view_of(&info), retention_days, now_ms)?;
        findings.extend(labelled(&label, found));
    }
    Ok(findings)
}

fn verify_view(
    journal: &SledJournal,
    retention_days: u32,
    now_ms: i64,
) -> Result<Vec<String>, JournalError> {
    let mut findings = Vec::new();
    let active = journal.active_index()?;
    let ended = journal.ended_index()?;
    let stale_before = now_ms - i64::from(retention_days) * 86_400_000;
    let ids = journal.run_ids()?;
    for &run in &ids {
        let slots = journal.records(run)?;
        for (i, slot) in slots.iter().enumerate() {
            let expected = i as u64 + 1;
            if slot.seq() != expected {
                findings.push(format!(
                    "run {run}: sequence gap: expected seq {expected}, found {}",
                    slot.seq()
                ));
                break;
            }
        }
        findings.extend(replay_run(&slots));
        let last = slots.last();
        let in_active = active.iter().find(|(r, _)| *r == run).map(|(_, s)| *s);
        let in_ended = ended.iter().find(|(r, _)| *r == run).map(|(_, s)| *s);
        match last {
            Some(Slot::Record(r)) if r.state.is_terminal() => {
                let consistent = in_ended == Some(r.seq) && in_active.is_none();
                findings.extend((!consistent).then(|| {
                    format!(
                        "run {run}: terminal at seq {} but the indexes say active={in_active:?} ended={in_ended:?}",
                        r.seq
                    )
                }));
            }
            Some(last) => {
                if in_active != Some(last.seq()) {
                    findings.push(format!(
                        "run {run}: active at seq {} but the active index says {in_active:?}",
                        last.seq()
                    ));
                }
                if let Slot::Record(r) = last {
                    if r.at_ms < stale_before {
                        findings.push(format!(
                            "run {run}: still active ({}) but its last record is from {}, older than the {retention_days}-day retention",
                            r.state.describe(),
                            fmt_time(r.at_ms)
                        ));
                    }
                }
            }
            None => {}
        }
    }
    for (run, _) in active.iter().chain(ended.iter()) {
        if !ids.contains(run) {
            findings.push(format!("run {run}: in an index but has no records"));
        }
    }
    Ok(findings)
}

fn import(db: &Path, file: &Path, out: &mut dyn Write) -> Result<i32, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let journal = SledJournal::open(db).map_err(|e| e.to_string())?;
    if !journal.run_ids().map_err(|e| e.to_string())?.is_empty() {
        return Err(format!(
            "{} already holds runs; import only into an empty journal",
            db.display()
        ));
    }
    let n = import_lines(&text, &journal)?;
    emit(
        out,
        &format!("imported {n} records into {}\n", db.display()),
    )?;
    Ok(EXIT_CLEAN)
}

/// Reads every record of a journal (helper for tests and tools).
pub fn all_records(journal: &dyn Journal) -> Result<Vec<Record>, JournalError> {
    let mut out = Vec::new();
    for run in journal.run_ids()? {
        for slot in journal.records(run)? {
            if let Slot::Record(r) = slot {
                out.push(r);
            }
        }
    }
    Ok(out)
}
