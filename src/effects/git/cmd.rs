//! The one place git is started. Every invocation gets the hardening of spec 4.11: protocol
//! allow-lists, no hooks, no credential helpers, no fsmonitor, no system or user config, no
//! terminal prompts, a scrubbed environment, and the token only through a per-session askpass
//! script reading it from the environment.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::error::GitError;
use super::retry::GitRetry;
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

/// How long a local git call (clone from the cache, index-pack, fetch between two local
/// repositories, rev-parse) may take before it is killed. Generous for a large repository;
/// what matters is that no local call can wait forever (a pipe, a stuck filesystem).
pub(crate) const LOCAL_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// The same for a call that talks to the remote (a cold clone of a large repository);
/// `http.lowSpeedTime` ends a dead transfer long before this.
pub(crate) const REMOTE_DEADLINE: Duration = Duration::from_secs(90 * 60);
/// What is kept of a git child's stdout and stderr; the rest is read and dropped so the
/// child never blocks on a full pipe. Ref listings of the run's own branch are tiny.
const STDOUT_CAP: usize = 16 << 20;
const STDERR_CAP: usize = 64 << 10;

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
    /// A stop switch: once cancelled, a running git child is killed (its whole process
    /// group) and the call fails with [`GitError::Stopped`].
    cancel: Option<GitRetry>,
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
            cancel: None,
        })
    }

    /// Kills the running git child when `switch` is cancelled (a stop or a dropped caller).
    pub(crate) fn with_cancel(mut self, switch: &GitRetry) -> Self {
        self.cancel = Some(switch.clone());
        self
    }

    /// A scratch directory private to this session (0700), removed with it.
    pub(crate) fn scratch(&self) -> &Path {
        self.private.path()
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
            // A redirect would replay the askpass answer (the run token) to another origin.
            .args(["-c", "http.followRedirects=false"])
            // A transfer that moves nothing for five minutes is dead, not slow.
            .args(["-c", "http.lowSpeedLimit=1", "-c", "http.lowSpeedTime=300"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so a stop kills git's helpers (remote-https, upload-pack,
        // pack-objects) with it.
        cmd.process_group(0);
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
        let deadline = match reach {
            Reach::Local => LOCAL_DEADLINE,
            Reach::Remote => REMOTE_DEADLINE,
        };
        run_bounded(
            self.command(reach, args),
            what,
            deadline,
            self.cancel.as_ref(),
        )
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

/// Runs `cmd` to its end, its deadline or a cancel of `cancel`, whichever comes first; on the
/// last two its process group is killed. Output is captured up to the caps.
pub(crate) fn run_bounded(
    mut cmd: Command,
    what: &str,
    deadline: Duration,
    cancel: Option<&GitRetry>,
) -> Result<Output, GitError> {
    let mut child = cmd.spawn().map_err(|source| GitError::Spawn {
        what: what.to_owned(),
        source,
    })?;
    let stdout = capture(child.stdout.take(), STDOUT_CAP);
    let stderr = capture(child.stderr.take(), STDERR_CAP);
    let until = Instant::now() + deadline;
    let mut pause = Duration::from_millis(2);
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                kill_group(&mut child);
                return Err(GitError::io(format!("wait for git {what}"), source));
            }
        }
        if cancel.is_some_and(GitRetry::is_cancelled) {
            kill_group(&mut child);
            return Err(GitError::Stopped {
                what: what.to_owned(),
            });
        }
        if Instant::now() >= until {
            kill_group(&mut child);
            return Err(GitError::TimedOut {
                what: what.to_owned(),
                after: deadline,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    // A helper git started may still hold the pipes after git itself exited: take what
    // arrived within a moment rather than wait on it.
    let collect =
        |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Reads `pipe` on a thread: the first `cap` bytes are kept, the rest drained.
fn capture(
    pipe: Option<impl std::io::Read + Send + 'static>,
    cap: usize,
) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        if let Some(mut pipe) = pipe {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = cap.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
        }
        let _ = tx.send(kept);
    });
    rx
}

/// Kills the child's whole process group (it leads one, see `command`) and reaps it.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill has no memory preconditions; the group is the unreaped child's own.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
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

    /// Security issue, item 6: git children inherit none of the runner's environment (its
    /// credential, the registration token, the LLM key): only the pass-through names and what
    /// the session sets. Run for real, printing the child's environment through an alias.
    #[test]
    fn a_git_child_carries_none_of_the_runners_environment() {
        let s = GitSession::new(
            Some("tok-env-test"),
            TransportPolicy::default(),
            RemoteScheme::Https,
        )
        .expect("session");
        let mut cmd = s.command(Reach::Remote, ["-c", "alias.show-env=!env", "show-env"]);
        let out = cmd.output().expect("git runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let child: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
            .collect();
        let set: Vec<String> = cmd
            .get_envs()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        // What git and the alias's shell add themselves.
        let added_by_git =
            |k: &str| k.starts_with("GIT_") || ["PWD", "OLDPWD", "SHLVL", "_"].contains(&k);
        for key in &child {
            assert!(
                PASSTHROUGH_ENV.contains(&key.as_str()) || set.contains(key) || added_by_git(key),
                "the git child inherited {key}"
            );
        }
        // The test process has variables of its own (cargo's), so the filter did something.
        let parents_own = std::env::vars()
            .map(|(k, _)| k)
            .find(|k| k.starts_with("CARGO_"))
            .expect("cargo sets CARGO_* for tests");
        assert!(!child.contains(&parents_own), "{parents_own} reached git");
    }

    /// A loopback HTTP listener, one connection at a time, that answers every request with
    /// `reply` and records each request's head. Ends with the test process.
    fn http_listener(
        reply: impl Fn() -> String + Send + 'static,
    ) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut head = String::new();
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                    line.clear();
                }
                log.lock().expect("log").push(head);
                let _ = (&stream).write_all(reply().as_bytes());
            }
        });
        (port, seen)
    }

    /// Security issue, item 6: a proxy answer that redirects elsewhere is an error, never a
    /// second request: following it would hand the askpass answer (the run token) to whatever
    /// origin the redirect names. Real git against two loopback listeners; the same request
    /// from unhardened git does follow the redirect, so the fixture can tell.
    #[test]
    fn a_redirect_from_the_proxy_is_not_followed_and_the_token_goes_nowhere() {
        let token = "tok-redirect-0123456789";
        // The redirect's target asks for credentials, as a real origin would, and records.
        let (elsewhere, reached) = http_listener(|| {
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
                .to_owned()
        });
        let (proxy, asked) = http_listener(move || {
            format!(
                "HTTP/1.1 302 Found\r\n\
                 Location: http://127.0.0.1:{elsewhere}/r.git/info/refs?service=git-receive-pack\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        });
        let url = format!("http://127.0.0.1:{proxy}/r.git");
        let dev = TransportPolicy {
            allow_file_url: false,
            allow_insecure_http: true,
        };

        // The fixture works: git without the hardening follows the redirect.
        let plain = Command::new("git")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .args(["ls-remote", &url])
            .stdin(Stdio::null())
            .output()
            .expect("git runs");
        assert!(!plain.status.success());
        let followed = reached.lock().expect("log").len();
        assert!(followed >= 1, "unhardened git did not follow the redirect");

        let s = GitSession::new(Some(token), dev, RemoteScheme::Http).expect("session");
        let out = s
            .output(Reach::Remote, "ls-remote", ["ls-remote", url.as_str()])
            .expect("git runs");
        assert!(!out.status.success(), "a redirect must fail the call");
        assert!(
            asked.lock().expect("log").len() >= 2,
            "the hardened call never reached the proxy"
        );
        let after = reached.lock().expect("log").clone();
        assert_eq!(
            after.len(),
            followed,
            "the hardened call followed the redirect: {after:?}"
        );
        assert!(!after
            .iter()
            .any(|head| head.to_ascii_lowercase().contains("authorization")));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains(token), "{stderr}");
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
            // A redirect would replay the askpass answer (the run token) to another origin.
            "http.followRedirects=false",
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
}
