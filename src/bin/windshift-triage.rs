//! `windshift-triage <prepare|push> [flags]`: the git prepare/push helper of spec 4.10,
//! flag- and output-compatible with upstream, running the library's git effects.
//!
//! Exit codes: 0 success (one JSON object on stdout), 1 runtime error or a missing/unknown
//! subcommand (`windshift-triage: …` on stderr), 2 flag parse error. `-h`/`-help` print the
//! flags and exit 0. The Go-flag parsing lives in `windshift_runner::triage_cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use windshift_runner::effects::git::{
    self, GitTransport, PrepareRequest, PushRequest, TransportPolicy,
};
use windshift_runner::redact::{redact, register_secret};
use windshift_runner::triage_cli::{parse_command, Flags, TriageCommand};

fn read_token(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Ok(String::new());
    }
    let raw = std::fs::read_to_string(path).map_err(|e| format!("read token file {path}: {e}"))?;
    let token = raw.trim().to_owned();
    register_secret(&token);
    Ok(token)
}

fn policy(flags: &Flags) -> TransportPolicy {
    TransportPolicy {
        allow_file_url: flags.bool("allow-file-url"),
        allow_insecure_http: std::env::var("WSRUNNER_ALLOW_INSECURE").as_deref() == Ok("1"),
    }
}

fn run_prepare(flags: &Flags) -> Result<String, String> {
    let transport: GitTransport = flags
        .str("git-transport")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let req = PrepareRequest {
        root: flags.str("root").to_owned(),
        workspace_id: flags.int("workspace-id"),
        slug: flags.str("repo").to_owned(),
        remote_url: flags.str("remote-url").to_owned(),
        base_ref: flags.str("base-ref").to_owned(),
        continue_branch: flags.str("continue-branch").to_owned(),
        dest_dir: flags.str("dest-dir").to_owned(),
        run_id: flags.int("run-id"),
        token: read_token(flags.str("token-file"))?,
        transport,
        policy: policy(flags),
        ..PrepareRequest::default()
    };
    let out = git::prepare(&req).map_err(|e| e.to_string())?;
    let json = serde_json::json!({
        "checkout_path": out.checkout_path.to_string_lossy(),
        "branch": out.branch,
        "base_commit": out.base_commit,
    });
    Ok(json.to_string())
}

fn run_push(flags: &Flags) -> Result<String, String> {
    let transport: GitTransport = flags
        .str("git-transport")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let remote_url = match transport {
        GitTransport::Proxy if flags.str("proxy-url").is_empty() => {
            return Err("--proxy-url is required with --git-transport proxy".into())
        }
        GitTransport::Proxy => flags.str("proxy-url"),
        GitTransport::Askpass if flags.str("remote-url").is_empty() => {
            return Err("--remote-url is required with --git-transport askpass".into())
        }
        GitTransport::Askpass => flags.str("remote-url"),
    };
    if flags.str("dest").is_empty() {
        return Err("--dest is required".into());
    }
    if flags.str("branch").is_empty() {
        return Err("--branch is required".into());
    }
    let req = PushRequest {
        checkout: PathBuf::from(flags.str("dest")),
        branch: flags.str("branch").to_owned(),
        remote_url: remote_url.to_owned(),
        token: read_token(flags.str("token-file"))?,
        skip_if_head: flags.str("skip-if-head").to_owned(),
        policy: policy(flags),
        ..PushRequest::default()
    };
    let out = git::push(&req).map_err(|e| e.to_string())?;
    // serde_json::json! sorts keys; the fixed order below matches upstream's struct order.
    Ok(format!(
        "{{\"head_sha\":{},\"skipped\":{}}}",
        serde_json::Value::String(out.head_sha),
        out.skipped
    ))
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("windshift-triage: {}", redact(msg));
    ExitCode::from(1)
}

/// A subcommand body: parsed flags in, the JSON line or an error message out.
type Subcommand = fn(&Flags) -> Result<String, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (flags, run): (Flags, Subcommand) = match parse_command(&args) {
        TriageCommand::Prepare(flags) => (flags, run_prepare),
        TriageCommand::Push(flags) => (flags, run_push),
        TriageCommand::Help(usage) => {
            eprint!("{usage}");
            return ExitCode::SUCCESS;
        }
        TriageCommand::FlagError { message, usage } => {
            eprintln!("{message}");
            eprint!("{usage}");
            return ExitCode::from(2);
        }
        TriageCommand::BadSubcommand(message) => return fail(&message),
    };
    match run(&flags) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(msg) => fail(&msg),
    }
}
