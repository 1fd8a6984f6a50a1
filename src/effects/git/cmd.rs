//! The one place git is started. Every invocation gets the hardening of spec 4.11: protocol
//! allow-lists, no hooks, no credential helpers, no fsmonitor, no system or user config, no
//! terminal prompts, a scrubbed environment, and the token only through a per-session askpass
//! script reading it from the environment.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::error::GitError;
use super::validate::{RemoteScheme, TransportPolicy};
use crate::redact::{redact, MASK};

/// Environment variables passed through to git from the caller: tool lookup, temp space,
/// outbound HTTP proxies and custom CA bundles an operator may need. Everything else
/// (GIT_DIR, GIT_ALTERNATE_OBJECT_DIRECTORIES, XDG_CONFIG_HOME, GIT_TRACE…) is dropped.
const PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "TMPDIR",
    "GIT_EXEC_PATH",
    "http_proxy",
    "https_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "GIT_SSL_CAPATH",
];

/// The askpass script: answers git's `Username for …` prompt with `oauth2` and anything
/// else (the password prompt) with `$AGENT_GIT_TOKEN`. The token itself is never written.
const ASKPASS_SCRIPT: &str = "#!/bin/sh\n\
case \"$1\" in\n\
  [Uu]sername*) printf '%s\\n' oauth2 ;;\n\
  *) printf '%s\\n' \"$AGENT_GIT_TOKEN\" ;;\n\
esac\n";

/// Whether a git call talks to the remote or only to local repositories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// Local repositories only (the cache-to-checkout clone, the checkout-to-push-repo
    /// fetch, rev-parse, checkout, config). The file transport is allowed; no token is given.
    Local,
    /// The remote (clone, fetch, ls-remote, push). Protocols follow the transport policy and
    /// the token is offered through askpass.
    Remote,
}

/// One hardened git context: a private 0700 directory with the askpass script and a
/// throwaway global config, removed on drop.
pub(crate) struct GitSession {
    private: tempfile::TempDir,
    askpass: Option<PathBuf>,
    token: Option<String>,
    global_config: PathBuf,
    policy: TransportPolicy,
    remote_scheme: RemoteScheme,
}

impl GitSession {
    /// `token` empty or `None` means no authentication. `remote_scheme` is the scheme of the
    /// remote this session talks to; it decides whether `http` joins the allow-list.
    pub(crate) fn new(
        token: Option<&str>,
        policy: TransportPolicy,
        remote_scheme: RemoteScheme,
    ) -> Result<Self, GitError> {
        let private = tempfile::Builder::new()
            .prefix("windshift-git-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(|e| GitError::io("create the private git session directory", e))?;
        let global_config = private.path().join("gitconfig");
        write_private_file(&global_config, b"", 0o600)?;
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        let askpass = match token {
            Some(_) => {
                let path = private.path().join("askpass.sh");
                write_private_file(&path, ASKPASS_SCRIPT.as_bytes(), 0o700)?;
                Some(path)
            }
            None => None,
        };
        Ok(Self {
            private,
            askpass,
            token,
            global_config,
            policy,
            remote_scheme,
        })
    }

    /// A scratch directory private to this session (0700), removed with it.
    pub(crate) fn scratch(&self) -> &Path {
        self.private.path()
    }

    /// Rewrites the throwaway global config to list `dirs` as `safe.directory`: the
    /// checkout is owned by uid 1000 while triage runs as root (spec 4.11 push step 1).
    pub(crate) fn set_safe_directories(&self, dirs: &[&Path]) -> Result<(), GitError> {
        let mut text = String::from("[safe]\n");
        for dir in dirs {
            text.push_str("\tdirectory = ");
            text.push_str(&quote_config_value(&dir.to_string_lossy()));
            text.push('\n');
        }
        write_private_file(&self.global_config, text.as_bytes(), 0o600)
    }

    /// Masks every known secret, including this session's token, in git's output.
    pub(crate) fn redact(&self, text: &str) -> String {
        let out = redact(text).into_owned();
        match &self.token {
            Some(t) if out.contains(t.as_str()) => out.replace(t.as_str(), MASK),
            _ => out,
        }
    }

    /// The protocols git may use for a call of this reach.
    fn allowed_protocols(&self, reach: Reach) -> (&'static str, &'static str) {
        match reach {
            Reach::Local => ("file", "always"),
            Reach::Remote => match (self.remote_scheme, self.policy.allow_file_url) {
                (RemoteScheme::Http, false) => ("https:http", "never"),
                (RemoteScheme::Http, true) => ("https:http:file", "always"),
                (_, true) => ("https:file", "always"),
                (_, false) => ("https", "never"),
            },
        }
    }

    /// Builds the hardened command; `args` follow the hardening `-c` options.
    pub(crate) fn command<I, S>(&self, reach: Reach, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (allow_protocol, file_allow) = self.allowed_protocols(reach);
        let mut cmd = Command::new("git");
        cmd.env_clear();
        for key in PASSTHROUGH_ENV {
            if let Some(val) = std::env::var_os(key) {
                cmd.env(key, val);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        cmd.env("HOME", self.private.path())
            .env("LC_ALL", "C")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", &self.global_config)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", allow_protocol);
        if reach == Reach::Remote {
            if let (Some(askpass), Some(token)) = (&self.askpass, &self.token) {
                cmd.env("GIT_ASKPASS", askpass)
                    .env("AGENT_GIT_TOKEN", token);
            }
        }
        cmd.args(["-c", "protocol.ext.allow=never"])
            .arg("-c")
            .arg(format!("protocol.file.allow={file_allow}"))
            .args(["-c", "protocol.tar.allow=never"])
            .args(["-c", "core.hooksPath=/dev/null"])
            .args(["-c", "credential.helper="])
            .args(["-c", "core.fsmonitor="])
            // A transfer that moves nothing for five minutes is dead, not slow.
            .args(["-c", "http.lowSpeedLimit=1", "-c", "http.lowSpeedTime=300"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. Git must
        // die with its caller: an orphaned fetch would keep writing into a cache whose lock
        // its dead parent no longer holds.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        cmd
    }

    /// Runs git and returns its raw output, whatever the exit status.
    pub(crate) fn output<I, S>(&self, reach: Reach, what: &str, args: I) -> Result<Output, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(reach, args)
            .output()
            .map_err(|source| GitError::Spawn {
                what: what.to_owned(),
                source,
            })
    }

    /// Runs git and returns its trimmed stdout; a non-zero exit becomes [`GitError::Command`].
    pub(crate) fn run<I, S>(&self, reach: Reach, what: &str, args: I) -> Result<String, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.output(reach, what, args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(self.failure(what, &out))
        }
    }

    /// The typed error for a failed git call, with stderr redacted and classified.
    pub(crate) fn failure(&self, what: &str, out: &Output) -> GitError {
        let stderr = self.redact(String::from_utf8_lossy(&out.stderr).trim());
        if looks_like_auth_failure(&stderr) {
            return GitError::AuthFailed {
                what: what.to_owned(),
                stderr,
            };
        }
        GitError::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            stderr,
        }
    }
}

fn looks_like_auth_failure(stderr: &str) -> bool {
    [
        "Authentication failed",
        "could not read Username",
        "could not read Password",
        "returned error: 401",
        "returned error: 403",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
}

/// Quotes a value for a git config file: double quotes, with `\` and `"` escaped.
fn quote_config_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `bytes` to a new file created with `mode` (never a pre-existing one with looser bits).
fn write_private_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), GitError> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| GitError::io(format!("create {}", path.display()), e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| GitError::io(format!("write {}", path.display()), e))?;
    // The umask may have cleared bits (the askpass must stay executable).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| GitError::io(format!("chmod {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn env_of(cmd: &Command, key: &str) -> Option<String> {
        cmd.get_envs()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
    }

    #[test]
    fn every_call_is_hardened_and_the_token_stays_out_of_argv() {
        let token = "tok-0123456789abcdef";
        let s = GitSession::new(Some(token), TransportPolicy::default(), RemoteScheme::Https)
            .expect("session");
        let cmd = s.command(Reach::Remote, ["fetch", "origin"]);
        let args = args_of(&cmd);
        for needed in [
            "protocol.ext.allow=never",
            "protocol.file.allow=never",
            "protocol.tar.allow=never",
            "core.hooksPath=/dev/null",
            "credential.helper=",
            "core.fsmonitor=",
        ] {
            assert!(args.iter().any(|a| a == needed), "missing {needed}");
        }
        assert!(!args.iter().any(|a| a.contains(token)));
        assert_eq!(env_of(&cmd, "GIT_ALLOW_PROTOCOL").as_deref(), Some("https"));
        assert_eq!(env_of(&cmd, "GIT_CONFIG_NOSYSTEM").as_deref(), Some("1"));
        assert_eq!(env_of(&cmd, "GIT_TERMINAL_PROMPT").as_deref(), Some("0"));
        assert_eq!(env_of(&cmd, "AGENT_GIT_TOKEN").as_deref(), Some(token));
        let askpass = env_of(&cmd, "GIT_ASKPASS").expect("askpass");
        let script = std::fs::read_to_string(&askpass).expect("script");
        assert!(!script.contains(token));
        let dir_mode = std::fs::metadata(s.scratch())
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        let local = s.command(Reach::Local, ["rev-parse", "HEAD"]);
        assert_eq!(env_of(&local, "AGENT_GIT_TOKEN"), None);
        assert_eq!(
            env_of(&local, "GIT_ALLOW_PROTOCOL").as_deref(),
            Some("file")
        );
        assert!(args_of(&local)
            .iter()
            .any(|a| a == "protocol.file.allow=always"));
    }

    #[test]
    fn http_joins_the_allow_list_only_for_an_http_remote() {
        let dev = TransportPolicy {
            allow_file_url: false,
            allow_insecure_http: true,
        };
        let s = GitSession::new(None, dev, RemoteScheme::Http).expect("session");
        let cmd = s.command(Reach::Remote, ["ls-remote"]);
        assert_eq!(
            env_of(&cmd, "GIT_ALLOW_PROTOCOL").as_deref(),
            Some("https:http")
        );
        assert_eq!(env_of(&cmd, "GIT_ASKPASS"), None);
        let s = GitSession::new(None, dev, RemoteScheme::Https).expect("session");
        let cmd = s.command(Reach::Remote, ["ls-remote"]);
        assert_eq!(env_of(&cmd, "GIT_ALLOW_PROTOCOL").as_deref(), Some("https"));
    }

    #[test]
    fn session_redacts_its_token() {
        let s = GitSession::new(
            Some("secret-token-xyz"),
            TransportPolicy::default(),
            RemoteScheme::Https,
        )
        .expect("session");
        assert_eq!(
            s.redact("fatal: secret-token-xyz bad"),
            format!("fatal: {MASK} bad")
        );
    }

    #[test]
    fn config_values_are_quoted() {
        assert_eq!(quote_config_value(r#"/a "b"\c"#), r#""/a \"b\"\\c""#);
    }
}
