//! `windshift-triage <prepare|push> [flags]`: the git prepare/push helper of spec 4.10,
//! flag- and output-compatible with upstream, running the library's git effects.
//!
//! Exit codes: 0 success (one JSON object on stdout), 1 runtime error or a missing/unknown
//! subcommand (`windshift-triage: …` on stderr), 2 flag parse error. `-h`/`-help` print the
//! flags and exit 0. Flags use Go syntax: `-flag value`, `--flag value`, `-flag=value`,
//! `--flag=value`; a bool flag alone means true (`-allow-file-url=false` turns it off);
//! parsing stops at the first non-flag argument or `--`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use windshift_runner::effects::git::{
    self, GitTransport, PrepareRequest, PushRequest, TransportPolicy,
};
use windshift_runner::redact::{redact, register_secret};

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
}

struct FlagDef {
    name: &'static str,
    kind: Kind,
    default: &'static str,
    usage: &'static str,
}

const PREPARE_FLAGS: &[FlagDef] = &[
    FlagDef {
        name: "root",
        kind: Kind::Str,
        default: "",
        usage: "absolute cache root (required)",
    },
    FlagDef {
        name: "workspace-id",
        kind: Kind::Int,
        default: "0",
        usage: "workspace id (required, non-zero)",
    },
    FlagDef {
        name: "repo",
        kind: Kind::Str,
        default: "",
        usage: "owner/name",
    },
    FlagDef {
        name: "remote-url",
        kind: Kind::Str,
        default: "",
        usage: "tokenless remote URL (the git-proxy URL)",
    },
    FlagDef {
        name: "base-ref",
        kind: Kind::Str,
        default: "main",
        usage: "branch to cut from",
    },
    FlagDef {
        name: "continue-branch",
        kind: Kind::Str,
        default: "",
        usage: "existing pull-request branch to continue; overrides base-ref",
    },
    FlagDef {
        name: "dest-dir",
        kind: Kind::Str,
        default: "",
        usage: "checkout directory (multi-repo placement)",
    },
    FlagDef {
        name: "run-id",
        kind: Kind::Int,
        default: "0",
        usage: "run id",
    },
    FlagDef {
        name: "token-file",
        kind: Kind::Str,
        default: "",
        usage: "file holding the run token; empty means no auth",
    },
    FlagDef {
        name: "git-transport",
        kind: Kind::Str,
        default: "askpass",
        usage: "askpass or proxy",
    },
    FlagDef {
        name: "allow-file-url",
        kind: Kind::Bool,
        default: "false",
        usage: "allow file:// remotes (tests only)",
    },
];

const PUSH_FLAGS: &[FlagDef] = &[
    FlagDef {
        name: "dest",
        kind: Kind::Str,
        default: "",
        usage: "checkout directory",
    },
    FlagDef {
        name: "branch",
        kind: Kind::Str,
        default: "",
        usage: "branch to push",
    },
    FlagDef {
        name: "token-file",
        kind: Kind::Str,
        default: "",
        usage: "file holding the run token",
    },
    FlagDef {
        name: "git-transport",
        kind: Kind::Str,
        default: "askpass",
        usage: "askpass (push to --remote-url) or proxy (push to --proxy-url)",
    },
    FlagDef {
        name: "proxy-url",
        kind: Kind::Str,
        default: "",
        usage: "git-proxy URL (required with proxy)",
    },
    FlagDef {
        name: "remote-url",
        kind: Kind::Str,
        default: "",
        usage: "remote URL (required with askpass)",
    },
    FlagDef {
        name: "skip-if-head",
        kind: Kind::Str,
        default: "",
        usage: "base commit; skip the push when the branch is still there",
    },
    FlagDef {
        name: "allow-file-url",
        kind: Kind::Bool,
        default: "false",
        usage: "allow file:// remotes (tests only)",
    },
];

/// Parsed flag values, every defined flag present (defaults filled in).
struct Flags(BTreeMap<&'static str, String>);

impl Flags {
    fn str(&self, name: &str) -> &str {
        self.0.get(name).map(String::as_str).unwrap_or_default()
    }
    fn int(&self, name: &str) -> i64 {
        self.str(name).parse().unwrap_or_default()
    }
    fn bool(&self, name: &str) -> bool {
        self.str(name) == "true"
    }
}

/// A subcommand body: parsed flags in, the JSON line or an error message out.
type Subcommand = fn(&Flags) -> Result<String, String>;

enum ParseOutcome {
    Flags(Flags),
    Help,
    Error(String),
}

fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `flag` package semantics, for the subset of flag kinds triage uses.
fn parse_flags(defs: &'static [FlagDef], args: &[String]) -> ParseOutcome {
    let mut values: BTreeMap<&'static str, String> = defs
        .iter()
        .map(|d| (d.name, d.default.to_owned()))
        .collect();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" || !arg.starts_with('-') || arg == "-" {
            break;
        }
        let body = arg.strip_prefix("--").unwrap_or(&arg[1..]);
        if body.is_empty() || body.starts_with('-') || body.starts_with('=') {
            return ParseOutcome::Error(format!("bad flag syntax: {arg}"));
        }
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (body, None),
        };
        let Some(def) = defs.iter().find(|d| d.name == name) else {
            if name == "h" || name == "help" {
                return ParseOutcome::Help;
            }
            return ParseOutcome::Error(format!("flag provided but not defined: -{name}"));
        };
        i += 1;
        let value = match (def.kind, inline) {
            (Kind::Bool, None) => "true".to_owned(),
            (Kind::Bool, Some(v)) => match parse_go_bool(&v) {
                Some(b) => b.to_string(),
                None => {
                    return ParseOutcome::Error(format!(
                        "invalid boolean value {v:?} for -{name}: parse error"
                    ))
                }
            },
            (_, Some(v)) => v,
            (_, None) => match args.get(i) {
                Some(v) => {
                    i += 1;
                    v.clone()
                }
                None => return ParseOutcome::Error(format!("flag needs an argument: -{name}")),
            },
        };
        if let Kind::Int = def.kind {
            if value.trim() != value || value.parse::<i64>().is_err() {
                return ParseOutcome::Error(format!(
                    "invalid value {value:?} for flag -{name}: parse error"
                ));
            }
        }
        values.insert(def.name, value);
    }
    ParseOutcome::Flags(Flags(values))
}

fn usage(sub: &str, defs: &[FlagDef]) -> String {
    let mut text = format!("Usage of windshift-triage {sub}:\n");
    for d in defs {
        let kind = match d.kind {
            Kind::Str => " string",
            Kind::Int => " int",
            Kind::Bool => "",
        };
        text.push_str(&format!("  -{}{kind}\n    \t{}", d.name, d.usage));
        if !d.default.is_empty() && d.default != "false" && d.default != "0" {
            text.push_str(&format!(" (default {:?})", d.default));
        }
        text.push('\n');
    }
    text
}

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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(sub) = args.first() else {
        return fail("missing subcommand; usage: windshift-triage <prepare|push> [flags]");
    };
    let (defs, run): (&'static [FlagDef], Subcommand) = match sub.as_str() {
        "prepare" => (PREPARE_FLAGS, run_prepare),
        "push" => (PUSH_FLAGS, run_push),
        other => {
            return fail(&format!(
                "unknown subcommand {other:?}; usage: windshift-triage <prepare|push> [flags]"
            ))
        }
    };
    let flags = match parse_flags(defs, &args[1..]) {
        ParseOutcome::Flags(f) => f,
        ParseOutcome::Help => {
            eprint!("{}", usage(sub, defs));
            return ExitCode::SUCCESS;
        }
        ParseOutcome::Error(msg) => {
            eprintln!("{msg}");
            eprint!("{}", usage(sub, defs));
            return ExitCode::from(2);
        }
    };
    match run(&flags) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(msg) => fail(&msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(defs: &'static [FlagDef], args: &[&str]) -> Result<Flags, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse_flags(defs, &args) {
            ParseOutcome::Flags(f) => Ok(f),
            ParseOutcome::Help => Err("help".into()),
            ParseOutcome::Error(e) => Err(e),
        }
    }

    #[test]
    fn go_flag_syntax_variants() {
        let f = parse(
            PREPARE_FLAGS,
            &[
                "--root",
                "/c",
                "-workspace-id=3",
                "--run-id=9",
                "-repo",
                "a/b",
                "-allow-file-url",
            ],
        )
        .expect("parse");
        assert_eq!(f.str("root"), "/c");
        assert_eq!(f.int("workspace-id"), 3);
        assert_eq!(f.int("run-id"), 9);
        assert_eq!(f.str("repo"), "a/b");
        assert!(f.bool("allow-file-url"));
        assert_eq!(f.str("base-ref"), "main");
        assert_eq!(f.str("git-transport"), "askpass");
        let f = parse(
            PREPARE_FLAGS,
            &["-allow-file-url=false", "stop", "-root", "/x"],
        )
        .expect("p");
        assert!(!f.bool("allow-file-url"));
        assert_eq!(f.str("root"), "", "parsing stops at the first non-flag");
    }

    #[test]
    fn go_flag_errors() {
        for (args, needle) in [
            (&["--nope", "x"][..], "flag provided but not defined: -nope"),
            (&["--root"][..], "flag needs an argument: -root"),
            (
                &["--run-id", "x"][..],
                "invalid value \"x\" for flag -run-id",
            ),
            (&["---root", "/x"][..], "bad flag syntax"),
            (&["-allow-file-url=maybe"][..], "invalid boolean value"),
        ] {
            let err = parse(PREPARE_FLAGS, args).err().expect("error");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert_eq!(parse(PUSH_FLAGS, &["-h"]).err().as_deref(), Some("help"));
    }
}
