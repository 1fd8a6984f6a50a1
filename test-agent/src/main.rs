//! windshift-test-agent: a scripted stand-in for windshift-agent that speaks the JSONL
//! contract v1 (spec 6). It reads commands from stdin, writes events to stdout, and does what
//! the prompt's script says. The script language is documented in docs/containers.md and in
//! [`HELP`]; the runner's container tests drive every scenario through it.

use serde_json::{json, Map, Value};
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HELP: &str = "\
windshift-test-agent: reads {\"type\":\"prompt\",\"message\":SCRIPT} lines on stdin.
SCRIPT: commands separated by ';' or newlines; words split on whitespace, \"double quotes\"
group words (\\\" and \\\\ escape inside them); key=value words are options.
  say TEXT                  content event
  event TYPE [k=v ...]      any event {\"type\":TYPE, k:v}
  commit [file=F] [msg=M] [content=C]   write /workspace/F, git add + commit
  finish OUTCOME [SUMMARY]  finish event
  error MESSAGE             error event
  exit CODE                 exit at once with CODE (no session_idle)
  sleep MS                  sleep (an abort or stdin EOF interrupts it)
  hang                      ignore abort and stdin EOF, never exit
  ignore-term               ignore SIGTERM from now on (only SIGKILL ends a later hang)
  flood N                   N content events with seq 0..N-1
  bigline BYTES             one content event line of at least BYTES bytes
  raw TEXT                  TEXT verbatim on stdout (not JSON)
  stderr TEXT               TEXT on stderr
  noidle                    do not emit session_idle when this script ends
  probe [connect=IP:PORT]   probe event with sandbox facts
  write PATH [content=C]    try to write PATH; escape event
  forkbomb [max=N]          spawn sleeping children until refused; escape event
  alloc MIB                 allocate and touch MIB MiB; alloc_progress events, escape event
  plant-hook [name=H]       write an executable /workspace/.git/hooks/H; escape event
  plant-insteadof URL       add url.URL.insteadOf=https:// to /workspace/.git/config; escape event
  symlink TARGET LINK       replace LINK (removed first, even a directory) by a symlink to TARGET
  mkfifo PATH               replace PATH by a named pipe
  rm PATH                   remove PATH (a directory recursively); missing is fine
  mv FROM TO                rename FROM to TO
  git ARG ...               run git ARG ... in /workspace (no ARG may hold =); tool_done event
  errflood N [bytes=B]      N error events, each distinct, of at least B bytes (default 16)
  env NAME ...              env event: {\"type\":\"env\",\"vars\":{NAME: value or null}}
After the script the agent emits session_idle (unless noidle), then waits: abort is
acknowledged silently, stdin EOF exits 0.";

/// Count of abort commands seen; a script compares it with the value at its start.
static ABORTS: AtomicU64 = AtomicU64::new(0);
/// Set once stdin reached EOF (the runner's "exit now").
static STDIN_EOF: AtomicBool = AtomicBool::new(false);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--sleeper") => loop {
            // A fork-bomb child: occupies one pid until killed.
            std::thread::sleep(Duration::from_secs(3600));
        },
        Some("--help") | Some("-h") => {
            println!("{HELP}");
            return;
        }
        _ => {}
    }

    // WSR_TEST_AGENT_SILENT=1: print no contract line of its own (no entrypoint lifecycle, no
    // `starting`, no `session_idle`), so a script such as `exit 0` exits without a single
    // contract event (verdict table row 2).
    let silent = std::env::var("WSR_TEST_AGENT_SILENT").is_ok_and(|v| v == "1");

    // The entrypoint's lifecycle line (spec 6.2), printed before anything else.
    if !silent {
        emit(json!({
            "type": "lifecycle",
            "phase": "entrypoint",
            "run_id": std::env::var("AGENT_RUN_ID").unwrap_or_default(),
        }));
    }

    let (prompts_tx, prompts_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || read_commands(prompts_tx));

    // One run at a time, repeated prompts allowed (spec 6.1).
    while let Ok(script) = prompts_rx.recv() {
        let aborts_at_start = ABORTS.load(Ordering::SeqCst);
        let mut run = Run {
            aborts_at_start,
            hang: false,
            idle: true,
            children: Vec::new(),
        };
        if !silent {
            emit(json!({"type": "starting"}));
        }
        let finished = run.execute(&script);
        run.reap_children();
        if finished && run.idle && !silent {
            emit(json!({"type": "session_idle"}));
        }
    }
    // stdin closed: the contract's "exit now".
    std::process::exit(0);
}

/// Reads stdin commands: prompts go to the main loop, aborts bump the counter, EOF ends it.
fn read_commands(prompts: mpsc::Sender<String>) {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock();
    let mut buf = String::new();
    loop {
        buf.clear();
        match lines.read_line(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(value) = serde_json::from_str::<Value>(buf.trim()) else {
            continue; // malformed lines are ignored (spec 6.1)
        };
        match value.get("type").and_then(Value::as_str) {
            Some("prompt") => {
                let message = value
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                if prompts.send(message).is_err() {
                    break;
                }
            }
            Some("abort") => {
                ABORTS.fetch_add(1, Ordering::SeqCst);
            }
            _ => {} // unknown command types are ignored
        }
    }
    STDIN_EOF.store(true, Ordering::SeqCst);
    // Dropping the sender wakes the main loop, which then exits.
}

fn emit(value: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn emit_raw(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

struct Run {
    aborts_at_start: u64,
    hang: bool,
    idle: bool,
    children: Vec<Child>,
}

/// One parsed command: its words and its key=value options.
struct Step {
    words: Vec<String>,
    opts: Map<String, Value>,
}

impl Step {
    fn word(&self, i: usize) -> Option<&str> {
        self.words.get(i).map(String::as_str)
    }
    fn rest(&self, from: usize) -> String {
        self.words.get(from..).unwrap_or_default().join(" ")
    }
    fn opt(&self, key: &str) -> Option<&str> {
        self.opts.get(key).and_then(Value::as_str)
    }
    fn number(&self, i: usize, what: &str) -> Result<u64, String> {
        let raw = self.word(i).ok_or_else(|| format!("missing {what}"))?;
        raw.parse()
            .map_err(|_| format!("{what} must be a number, got {raw:?}"))
    }
}

impl Run {
    fn interrupted(&self) -> bool {
        !self.hang
            && (ABORTS.load(Ordering::SeqCst) > self.aborts_at_start
                || STDIN_EOF.load(Ordering::SeqCst))
    }

    /// Runs the script; false when an abort or EOF cut it short.
    fn execute(&mut self, script: &str) -> bool {
        let steps = match parse_script(script) {
            Ok(steps) => steps,
            Err(message) => {
                emit(json!({"type": "error", "message": format!("test agent script: {message}")}));
                return true;
            }
        };
        for step in steps {
            if self.interrupted() {
                return false;
            }
            if let Err(message) = self.step(&step) {
                emit(json!({"type": "error", "message": format!("test agent: {message}")}));
            }
        }
        !self.interrupted()
    }

    fn step(&mut self, step: &Step) -> Result<(), String> {
        let name = step.word(0).unwrap_or_default();
        match name {
            "say" => emit(json!({"type": "content", "text": step.rest(1)})),
            "event" => {
                let mut obj = step.opts.clone();
                let kind = step.word(1).ok_or("event needs a TYPE")?;
                obj.insert("type".into(), Value::String(kind.to_owned()));
                emit(Value::Object(obj));
            }
            "commit" => self.commit(step),
            "finish" => emit(json!({
                "type": "finish",
                "outcome": step.word(1).ok_or("finish needs an OUTCOME")?,
                "summary": step.rest(2),
            })),
            "error" => emit(json!({"type": "error", "message": step.rest(1)})),
            "exit" => {
                let code = step.number(1, "exit CODE")?;
                std::process::exit(i32::try_from(code).unwrap_or(255));
            }
            "sleep" => {
                let until = Instant::now() + Duration::from_millis(step.number(1, "sleep MS")?);
                while Instant::now() < until && !self.interrupted() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            "ignore-term" => {
                // As PID 1 SIGTERM is ignored anyway; under the engine's init it is not, so a
                // test of the kill after the grace needs an agent that ignores it itself.
                extern "C" {
                    fn signal(signum: i32, handler: usize) -> usize;
                }
                const SIGTERM: i32 = 15;
                const SIG_IGN: usize = 1;
                // SAFETY: installs the ignore disposition; no handler code runs.
                unsafe { signal(SIGTERM, SIG_IGN) };
            }
            "hang" => {
                self.hang = true;
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            "flood" => {
                let count = step.number(1, "flood N")?;
                let mut out = std::io::stdout().lock();
                for seq in 0..count {
                    let line =
                        json!({"type": "content", "seq": seq, "text": format!("flood {seq}")});
                    let _ = writeln!(out, "{line}");
                }
                let _ = out.flush();
            }
            "bigline" => {
                let bytes = step.number(1, "bigline BYTES")?;
                let text = "x".repeat(usize::try_from(bytes).unwrap_or(usize::MAX / 2));
                emit(json!({"type": "content", "text": text}));
            }
            "raw" => emit_raw(&step.rest(1)),
            "stderr" => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{}", step.rest(1));
            }
            "noidle" => self.idle = false,
            "probe" => emit(probe(step.opt("connect"))),
            "write" => {
                let path = step.word(1).ok_or("write needs a PATH")?;
                let content = step
                    .opt("content")
                    .unwrap_or("written by windshift-test-agent\n");
                let result = std::fs::write(path, content);
                emit(escape_report("write", path, result.map(|_| json!(null))));
            }
            "forkbomb" => self.forkbomb(step.opt("max")),
            "alloc" => alloc(step.number(1, "alloc MIB")?),
            "plant-hook" => {
                let name = step.opt("name").unwrap_or("pre-push");
                let path = format!("/workspace/.git/hooks/{name}");
                let script = "#!/bin/sh\n# planted by windshift-test-agent: must never run on the host\ntouch \"${WSR_PLANTED_HOOK_MARKER:-/tmp/windshift-planted-hook-ran}\"\n";
                let result = write_executable(&path, script);
                emit(escape_report(
                    "plant-hook",
                    &path,
                    result.map(|_| json!(null)),
                ));
            }
            "plant-insteadof" => {
                let url = step.word(1).ok_or("plant-insteadof needs a URL")?;
                let path = "/workspace/.git/config";
                let entry = format!("[url \"{url}\"]\n\tinsteadOf = https://\n");
                let result = std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(entry.as_bytes()));
                emit(escape_report(
                    "plant-insteadof",
                    path,
                    result.map(|_| json!(null)),
                ));
            }
            "symlink" => {
                let target = step.word(1).ok_or("symlink needs a TARGET")?;
                let link = step.word(2).ok_or("symlink needs a LINK")?;
                remove_any(link);
                let result = std::os::unix::fs::symlink(target, link);
                emit(escape_report("symlink", link, result.map(|_| json!(null))));
            }
            "mkfifo" => {
                let path = step.word(1).ok_or("mkfifo needs a PATH")?;
                remove_any(path);
                let result = mkfifo(path);
                emit(escape_report("mkfifo", path, result.map(|_| json!(null))));
            }
            "rm" => remove_any(step.word(1).ok_or("rm needs a PATH")?),
            "mv" => {
                let from = step.word(1).ok_or("mv needs FROM")?;
                let to = step.word(2).ok_or("mv needs TO")?;
                let result = std::fs::rename(from, to);
                emit(escape_report("mv", to, result.map(|_| json!(null))));
            }
            "git" => {
                let args: Vec<&str> = (1..).map_while(|i| step.word(i)).collect();
                let (ok, output) = match Command::new("git")
                    .args(&args)
                    .current_dir("/workspace")
                    .output()
                {
                    Ok(out) => (
                        out.status.success(),
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ),
                    ),
                    Err(e) => (false, format!("git: {e}")),
                };
                emit(
                    json!({"type": "tool_done", "id": "git", "tool": "git", "ok": ok, "output": output}),
                );
            }
            "errflood" => {
                let count = step.number(1, "errflood N")?;
                let bytes: usize = step.opt("bytes").and_then(|b| b.parse().ok()).unwrap_or(16);
                let mut out = std::io::stdout().lock();
                for seq in 0..count {
                    let mut message = format!("agent error number {seq} ");
                    while message.len() < bytes {
                        message.push('e');
                    }
                    let line = json!({"type": "error", "message": message});
                    let _ = writeln!(out, "{line}");
                }
                let _ = out.flush();
            }
            "env" => {
                let mut vars = Map::new();
                for name in (1..).map_while(|i| step.word(i)) {
                    let value = std::env::var(name)
                        .map(Value::String)
                        .unwrap_or(Value::Null);
                    vars.insert(name.to_owned(), value);
                }
                emit(json!({"type": "env", "vars": vars}));
            }
            other => return Err(format!("unknown command {other:?} (see --help)")),
        }
        Ok(())
    }

    fn commit(&mut self, step: &Step) {
        let file = step.opt("file").unwrap_or("agent.txt");
        let msg = step.opt("msg").unwrap_or("test agent commit");
        let content = step.opt("content").unwrap_or(msg);
        emit(
            json!({"type": "tool_start", "id": "commit", "tool": "commit", "args": {"file": file, "msg": msg}}),
        );
        let mut output = String::new();
        let mut ok = std::fs::write(format!("/workspace/{file}"), format!("{content}\n"))
            .map_err(|e| output.push_str(&format!("write {file}: {e}\n")))
            .is_ok();
        for args in [
            vec!["add", "--", file],
            vec![
                "-c",
                "user.name=windshift-agent",
                "-c",
                "user.email=agent@windshift.local",
                "commit",
                "-q",
                "-m",
                msg,
            ],
        ] {
            if !ok {
                break;
            }
            match Command::new("git")
                .args(&args)
                .current_dir("/workspace")
                .output()
            {
                Ok(out) => {
                    output.push_str(&String::from_utf8_lossy(&out.stdout));
                    output.push_str(&String::from_utf8_lossy(&out.stderr));
                    ok = out.status.success();
                }
                Err(e) => {
                    output.push_str(&format!("git: {e}\n"));
                    ok = false;
                }
            }
        }
        emit(
            json!({"type": "tool_done", "id": "commit", "tool": "commit", "ok": ok, "output": output}),
        );
    }

    fn forkbomb(&mut self, max: Option<&str>) {
        let max: usize = max.and_then(|m| m.parse().ok()).unwrap_or(100_000);
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        let mut error = Value::Null;
        while self.children.len() < max {
            match Command::new(&exe)
                .arg("--sleeper")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => self.children.push(child),
                Err(e) => {
                    error = Value::String(e.to_string());
                    break;
                }
            }
        }
        let spawned = self.children.len();
        emit(json!({
            "type": "escape",
            "attempt": "fork",
            "target": "pids",
            "succeeded": error.is_null(),
            "spawned": spawned,
            "error": error,
        }));
        self.reap_children();
    }

    fn reap_children(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
        }
        for mut child in self.children.drain(..) {
            let _ = child.wait();
        }
    }
}

/// Removes whatever is at `path` (file, symlink, pipe or directory tree); missing is fine.
fn remove_any(path: &str) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let _ = std::fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// The agent image has no coreutils: make the pipe with the syscall itself.
fn mkfifo(path: &str) -> std::io::Result<()> {
    let c_path = std::ffi::CString::new(path)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    extern "C" {
        fn mkfifo(path: *const std::os::raw::c_char, mode: u32) -> i32;
    }
    // SAFETY: c_path is a valid NUL-terminated string for the duration of the call.
    if unsafe { mkfifo(c_path.as_ptr(), 0o644) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn write_executable(path: &str, content: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, content)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

fn escape_report(attempt: &str, target: &str, result: std::io::Result<Value>) -> Value {
    let (succeeded, error) = match result {
        Ok(_) => (true, Value::Null),
        Err(e) => (false, Value::String(e.to_string())),
    };
    json!({"type": "escape", "attempt": attempt, "target": target, "succeeded": succeeded, "error": error})
}

fn alloc(mib: u64) {
    const CHUNK: usize = 1 << 20;
    let mut held: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        // Touch every page so the memory is really charged to the cgroup.
        let mut chunk = vec![0u8; CHUNK];
        for page in chunk.chunks_mut(4096) {
            page[0] = 1;
        }
        held.push(chunk);
        if (i + 1) % 16 == 0 {
            emit(json!({"type": "alloc_progress", "mib": i + 1}));
        }
    }
    emit(
        json!({"type": "escape", "attempt": "memory", "target": "memory", "succeeded": true, "mib": held.len()}),
    );
}

fn read_trimmed(path: &str) -> Value {
    match std::fs::read_to_string(path) {
        Ok(s) => Value::String(s.trim().to_owned()),
        Err(_) => Value::Null,
    }
}

/// The first readable file of the list (cgroup v2 path first, then v1).
fn first_readable(paths: &[&str]) -> Value {
    paths
        .iter()
        .map(|p| read_trimmed(p))
        .find(|v| !v.is_null())
        .unwrap_or(Value::Null)
}

/// `{"uid":…,"gid":…,"mode":"1777"}` of a path, or null.
fn owner_and_mode(path: &str) -> Value {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            json!({"uid": m.uid(), "gid": m.gid(), "mode": format!("{:o}", m.mode() & 0o7777)})
        }
        Err(_) => Value::Null,
    }
}

fn try_write(path: &str) -> Value {
    match std::fs::write(path, b"probe") {
        Ok(()) => {
            let _ = std::fs::remove_file(path);
            json!({"writable": true, "error": null})
        }
        Err(e) => json!({"writable": false, "error": e.to_string()}),
    }
}

fn probe(connect: Option<&str>) -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.trim().to_owned())
    };
    let first_id = |name: &str| -> Value {
        field(name)
            .and_then(|v| {
                v.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .map(Value::from)
            .unwrap_or(Value::Null)
    };
    let interfaces: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .collect();
    let mounts: Vec<Value> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            match parts.as_slice() {
                [_, target, fstype, options, ..]
                    if ["/", "/tmp", "/home/agent", "/workspace"].contains(target) =>
                {
                    Some(json!({"target": target, "fstype": fstype, "options": options}))
                }
                _ => None,
            }
        })
        .collect();
    let connect_result = connect.map(|addr| match addr.parse::<std::net::SocketAddr>() {
        Ok(sock) => match std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(3)) {
            Ok(_) => json!({"target": addr, "connected": true, "error": null}),
            Err(e) => json!({"target": addr, "connected": false, "error": e.to_string()}),
        },
        Err(e) => json!({"target": addr, "connected": false, "error": format!("bad address: {e}")}),
    });
    let home = std::env::var("HOME").unwrap_or_default();
    json!({
        "type": "probe",
        "uid": first_id("Uid:"),
        "gid": first_id("Gid:"),
        "cap_eff": field("CapEff:"),
        "cap_bnd": field("CapBnd:"),
        "no_new_privs": field("NoNewPrivs:"),
        "cwd": std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
        "home": home,
        "root": try_write("/.windshift-probe"),
        "tmp": try_write("/tmp/.windshift-probe"),
        "home_dir": try_write(&format!("{home}/.windshift-probe")),
        "home_owner": owner_and_mode(&home),
        "workspace": try_write("/workspace/.windshift-probe"),
        "mounts": mounts,
        "interfaces": interfaces,
        "connect": connect_result,
        "pids_max": first_readable(&["/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"]),
        "memory_max": first_readable(&["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]),
        "memory_swap_max": first_readable(&["/sys/fs/cgroup/memory.swap.max", "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"]),
        "cpu_max": first_readable(&["/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"]),
    })
}

/// Splits a script into steps (see [`HELP`]).
fn parse_script(script: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    // Each word with whether a quote began before its first '=' (then it is never an option).
    let mut words: Vec<(String, bool)> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = script.chars();
    let mut finish_step = |words: &mut Vec<(String, bool)>| {
        if words.is_empty() {
            return;
        }
        let mut plain = Vec::new();
        let mut opts = Map::new();
        for (w, was_quoted) in words.drain(..) {
            // Options are unquoted key=value words after the command name, with a plain key.
            match w.split_once('=') {
                Some((k, v))
                    if !was_quoted
                        && !plain.is_empty()
                        && !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
                {
                    opts.insert(k.to_owned(), Value::String(v.to_owned()));
                }
                _ => plain.push(w),
            }
        }
        steps.push(Step { words: plain, opts });
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                // `key="a b"` stays an option; `"a=b"` is a plain word.
                if !word.contains('=') {
                    quoted = true;
                }
                in_word = true;
                loop {
                    match chars.next() {
                        None => return Err("unterminated double quote".into()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => word.push('\n'),
                            Some(other) => word.push(other),
                            None => return Err("dangling backslash".into()),
                        },
                        Some(other) => word.push(other),
                    }
                }
            }
            ';' | '\n' => {
                if in_word {
                    words.push((std::mem::take(&mut word), quoted));
                    in_word = false;
                    quoted = false;
                }
                finish_step(&mut words);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push((std::mem::take(&mut word), quoted));
                    in_word = false;
                    quoted = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push((word, quoted));
    }
    finish_step(&mut words);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_words_quotes_and_options() {
        let steps =
            parse_script(r#"commit file=a.txt msg="hello world"; finish completed "all done""#)
                .expect("parses");
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].words, vec!["commit"]);
        assert_eq!(steps[0].opt("file"), Some("a.txt"));
        assert_eq!(steps[0].opt("msg"), Some("hello world"));
        assert_eq!(steps[1].words, vec!["finish", "completed", "all done"]);
    }

    #[test]
    fn reports_unterminated_quote() {
        assert!(parse_script("say \"oops").is_err());
    }

    #[test]
    fn quoted_semicolon_stays_in_word() {
        let steps = parse_script(r#"raw "a;b"; say x"#).expect("parses");
        assert_eq!(steps[0].rest(1), "a;b");
        assert_eq!(steps.len(), 2);
    }

    #[test]
    fn quoted_key_value_is_a_word() {
        let steps = parse_script(r#"raw "a=b" c=d"#).expect("parses");
        assert_eq!(steps[0].words, vec!["raw", "a=b"]);
        assert_eq!(steps[0].opt("c"), Some("d"));
    }
}
