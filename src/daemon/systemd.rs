//! systemd's notify protocol (`sd_notify(3)`): READY, WATCHDOG, STATUS, STOPPING and
//! EXTEND_TIMEOUT_USEC datagrams to `$NOTIFY_SOCKET`. A no-op when not under systemd.
//!
//! Written by hand instead of a crate: the protocol is one datagram per message, and owning it
//! lets the daemon decide *when* a watchdog ping is honest (only while it is healthy).

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go; `None` when the process is not supervised by systemd.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<NotifyTarget>,
    watchdog: Option<Duration>,
}

#[derive(Debug, Clone)]
enum NotifyTarget {
    Path(PathBuf),
    /// Linux abstract socket (`@name` in `$NOTIFY_SOCKET`).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honouring `$WATCHDOG_PID`: the watchdog is
    /// ours only when it names this process or is absent).
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|raw| {
            let raw = raw.into_encoded_bytes();
            match raw.first() {
                Some(b'@') => Some(NotifyTarget::Abstract(raw[1..].to_vec())),
                Some(b'/') => Some(NotifyTarget::Path(PathBuf::from(
                    String::from_utf8_lossy(&raw).into_owned(),
                ))),
                _ => None,
            }
        });
        let pid_matches = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && pid_matches)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// A notifier that sends nowhere (tests, foreground runs).
    pub fn disabled() -> Self {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// True when running under systemd with a notify socket.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The watchdog timeout systemd expects pings within, if any. Ping at half of it.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one raw notification (`KEY=VALUE` lines). Errors are returned, never fatal to
    /// callers that choose to ignore them.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        match target {
            NotifyTarget::Path(path) => socket.send_to(message.as_bytes(), path)?,
            NotifyTarget::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)?
            }
        };
        Ok(())
    }

    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    pub fn watchdog_ping(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// Announces shutdown and asks for `extend` more time before systemd's stop timeout.
    pub fn stopping(&self, extend: Duration, status: &str) -> io::Result<()> {
        self.notify(&format!(
            "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS={}",
            extend.as_micros(),
            one_line(status)
        ))
    }
}

/// STATUS is one line: newlines would start new assignments.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier_at(path: PathBuf) -> Notifier {
        Notifier {
            target: Some(NotifyTarget::Path(path)),
            watchdog: None,
        }
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_the_socket_in_protocol_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = notifier_at(path);
        n.ready("recovered 2 runs\nready").unwrap();
        assert_eq!(recv(&sock), "READY=1\nSTATUS=recovered 2 runs ready");
        n.watchdog_ping().unwrap();
        assert_eq!(recv(&sock), "WATCHDOG=1");
        n.stopping(Duration::from_secs(90), "draining").unwrap();
        assert_eq!(
            recv(&sock),
            "STOPPING=1\nEXTEND_TIMEOUT_USEC=90000000\nSTATUS=draining"
        );
    }

    #[test]
    fn abstract_socket_is_supported() {
        let name = format!("wsr-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier {
            target: Some(NotifyTarget::Abstract(name.into_bytes())),
            watchdog: None,
        };
        n.status("idle").unwrap();
        assert_eq!(recv(&sock), "STATUS=idle");
    }

    #[test]
    fn disabled_notifier_is_a_no_op() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready("x").unwrap();
    }
}
