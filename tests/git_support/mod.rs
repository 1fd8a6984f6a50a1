//! Shared fixtures for the git integration tests: origin repositories made with real git,
//! and a tiny HTTP server running `git http-backend` behind Basic auth.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// Runs test-side git (not the hardened one under test) and returns trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .args(["-c", "safe.directory=*", "-c", "init.defaultBranch=main"])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Commits `content` to `file` in the work tree `dir` and returns the new commit.
pub fn commit_file(dir: &Path, file: &str, content: &str) -> String {
    std::fs::write(dir.join(file), content).expect("write file");
    git(dir, &["add", "--", file]);
    git(dir, &["commit", "--quiet", "-m", &format!("change {file}")]);
    git(dir, &["rev-parse", "HEAD"])
}

/// A bare origin repository `<parent>/<name>` with one commit on `main`, plus a work tree
/// (`<parent>/<name>-work`) used to push further commits to it.
pub struct Origin {
    pub bare: PathBuf,
    pub work: PathBuf,
}

impl Origin {
    pub fn create(parent: &Path, name: &str) -> Self {
        let bare = parent.join(name);
        let work = parent.join(format!("{name}-work"));
        std::fs::create_dir_all(&work).expect("mkdir work");
        git(
            parent,
            &["init", "--quiet", "--bare", bare.to_str().expect("utf8")],
        );
        git(&work, &["init", "--quiet"]);
        commit_file(&work, "README.md", "hello\n");
        git(
            &work,
            &["remote", "add", "origin", bare.to_str().expect("utf8")],
        );
        git(&work, &["push", "--quiet", "origin", "main"]);
        Self { bare, work }
    }

    /// Adds a commit on `branch` (creating it from the current HEAD if needed), pushes it and
    /// returns it.
    pub fn advance(&self, branch: &str, file: &str, content: &str) -> String {
        git(&self.work, &["checkout", "--quiet", "-B", branch]);
        let sha = commit_file(&self.work, file, content);
        git(
            &self.work,
            &["push", "--quiet", "--force", "origin", branch],
        );
        sha
    }

    pub fn sha(&self, reference: &str) -> Option<String> {
        let out = Command::new("git")
            .args(["-c", "safe.directory=*", "--git-dir"])
            .arg(&self.bare)
            .args(["rev-parse", "--verify", "--quiet", reference])
            .output()
            .expect("rev-parse");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn file_url(&self) -> String {
        format!("file://{}", self.bare.display())
    }
}

/// Every file under `dir` whose contents include `needle` (binary files included).
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).expect("list").flatten() {
                stack.push(e.path());
            }
        } else if meta.is_file() {
            let bytes = std::fs::read(&p).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(p);
            }
        }
    }
    hits
}

/// The credentials one HTTP request carried (`None` when it had no Authorization header).
pub type SeenAuth = Option<(String, String)>;

/// Smart-HTTP git server on 127.0.0.1 serving every repository under `project_root` through
/// `git http-backend`, requiring Basic auth with password `token`.
pub struct GitHttpServer {
    pub base_url: String,
    pub seen: Arc<Mutex<Vec<SeenAuth>>>,
}

impl GitHttpServer {
    pub fn start(project_root: &Path, token: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<SeenAuth>>> = Arc::default();
        let root = project_root.to_owned();
        let token = token.to_owned();
        let seen_in = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (root, token, seen) = (root.clone(), token.clone(), seen_in.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &root, &token, &seen);
                });
            }
        });
        Self { base_url, seen }
    }

    pub fn url(&self, repo_rel: &str) -> String {
        format!("{}/{repo_rel}", self.base_url)
    }

    pub fn seen(&self) -> Vec<SeenAuth> {
        self.seen.lock().expect("lock").clone()
    }
}

fn serve(
    stream: TcpStream,
    root: &Path,
    token: &str,
    seen: &Mutex<Vec<SeenAuth>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        read_chunked(&mut reader)?
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut b = vec![0; len];
        reader.read_exact(&mut b)?;
        b
    };
    let auth = header("authorization")
        .and_then(|v| v.strip_prefix("Basic ").map(str::to_owned))
        .and_then(|b64| decode_base64(&b64))
        .and_then(|raw| {
            let text = String::from_utf8(raw).ok()?;
            let (u, p) = text.split_once(':')?;
            Some((u.to_owned(), p.to_owned()))
        });
    seen.lock().expect("lock").push(auth.clone());
    let Some((user, pass)) = auth.filter(|(_, p)| p == token) else {
        writer.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    };
    let _ = pass;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", &user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(ct) = header("content-type") {
        cmd.env("CONTENT_TYPE", ct);
    }
    if let Some(enc) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", enc);
    }
    if let Some(proto) = header("git-protocol") {
        cmd.env("GIT_PROTOCOL", proto);
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().expect("stdin");
    let writer_thread = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output()?;
    let _ = writer_thread.join();
    let cgi = out.stdout;
    let split = cgi
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| cgi.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let (head, body) = match split {
        Some((i, n)) => (
            String::from_utf8_lossy(&cgi[..i]).into_owned(),
            &cgi[i + n..],
        ),
        None => (String::new(), &cgi[..]),
    };
    let mut status = "200 OK".to_owned();
    let mut out_headers = String::new();
    for h in head.lines() {
        if let Some(s) = h.strip_prefix("Status:") {
            status = s.trim().to_owned();
        } else if !h.is_empty() {
            out_headers.push_str(h);
            out_headers.push_str("\r\n");
        }
    }
    write!(
        writer,
        "HTTP/1.1 {status}\r\n{out_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    writer.write_all(body)?;
    writer.flush()
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line)?;
        let size = usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)
            .unwrap_or(0);
        if size == 0 {
            let mut end = String::new();
            reader.read_line(&mut end)?;
            return Ok(body);
        }
        let mut chunk = vec![0; size];
        reader.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk);
        let mut crlf = String::new();
        reader.read_line(&mut crlf)?;
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim().bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}
