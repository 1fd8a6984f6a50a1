//! `windshift-triage` argument parsing (spec 4.10): Go `flag` package semantics for the
//! subset of flag kinds triage uses. In the library, not the binary, so the fuzz target
//! (`fuzzing::triage_args`) and ordinary tests reach it; the binary only runs what it parsed.
//!
//! Flags use Go syntax: `-flag value`, `--flag value`, `-flag=value`, `--flag=value`; a bool
//! flag alone means true (`-allow-file-url=false` turns it off); parsing stops at the first
//! non-flag argument or `--`. Pure: no IO.

use std::collections::BTreeMap;

/// The value kind of a flag (Go `flag` package: string, int, bool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    Bool,
}

/// One flag a subcommand accepts.
#[derive(Debug)]
pub struct FlagDef {
    pub name: &'static str,
    pub kind: Kind,
    pub default: &'static str,
    pub usage: &'static str,
}

/// The flags of `windshift-triage prepare` (spec 4.10).
pub const PREPARE_FLAGS: &[FlagDef] = &[
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

/// The flags of `windshift-triage push` (spec 4.10).
pub const PUSH_FLAGS: &[FlagDef] = &[
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flags(BTreeMap<&'static str, String>);

impl Flags {
    pub fn str(&self, name: &str) -> &str {
        self.0.get(name).map(String::as_str).unwrap_or_default()
    }
    pub fn int(&self, name: &str) -> i64 {
        self.str(name).parse().unwrap_or_default()
    }
    pub fn bool(&self, name: &str) -> bool {
        self.str(name) == "true"
    }
}

/// What one subcommand's flags parsed into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseOutcome {
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
pub fn parse_flags(defs: &'static [FlagDef], args: &[String]) -> ParseOutcome {
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

/// The `-h` text of a subcommand, in the Go `flag` package's layout.
pub fn usage(sub: &str, defs: &[FlagDef]) -> String {
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

/// What a whole `windshift-triage` command line (without the program name) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TriageCommand {
    Prepare(Flags),
    Push(Flags),
    /// `-h`/`-help`: print this usage on stderr and exit 0.
    Help(String),
    /// A flag error (exit 2): the message, then the usage.
    FlagError {
        message: String,
        usage: String,
    },
    /// A missing or unknown subcommand (exit 1).
    BadSubcommand(String),
}

/// Parses a full command line: the subcommand, then its flags.
pub fn parse_command(args: &[String]) -> TriageCommand {
    let Some(sub) = args.first() else {
        return TriageCommand::BadSubcommand(
            "missing subcommand; usage: windshift-triage <prepare|push> [flags]".into(),
        );
    };
    let defs = match sub.as_str() {
        "prepare" => PREPARE_FLAGS,
        "push" => PUSH_FLAGS,
        other => {
            return TriageCommand::BadSubcommand(format!(
                "unknown subcommand {other:?}; usage: windshift-triage <prepare|push> [flags]"
            ))
        }
    };
    match parse_flags(defs, &args[1..]) {
        ParseOutcome::Flags(flags) if sub == "prepare" => TriageCommand::Prepare(flags),
        ParseOutcome::Flags(flags) => TriageCommand::Push(flags),
        ParseOutcome::Help => TriageCommand::Help(usage(sub, defs)),
        ParseOutcome::Error(message) => TriageCommand::FlagError {
            message,
            usage: usage(sub, defs),
        },
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
            let err = parse(PREPARE_FLAGS, args).expect_err("error");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert_eq!(parse(PUSH_FLAGS, &["-h"]).err().as_deref(), Some("help"));
    }
}
