//! Log set-up: tracing with a human format on a terminal and JSON on request, every line passed
//! through [`crate::redact::redact`] on its way out, so no secret reaches a log even when a
//! caller formats one by mistake.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// A writer that redacts each formatted log record before it reaches the inner writer.
/// tracing-subscriber formats a whole event into one buffer and writes it at once, so
/// redaction sees complete lines.
pub struct RedactingWriter<W: Write> {
    inner: W,
}

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.inner
            .write_all(crate::redact::redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Makes [`RedactingWriter`]s around another `MakeWriter` (stderr in production).
#[derive(Clone)]
pub struct RedactingMakeWriter<M> {
    inner: M,
}

impl<M> RedactingMakeWriter<M> {
    pub fn new(inner: M) -> Self {
        RedactingMakeWriter { inner }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMakeWriter<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter {
            inner: self.inner.make_writer(),
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
/// Returns quietly if a subscriber is already installed (tests, embedded demo).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The engine API client logs whole request bodies at debug level, and a container's
    // create body holds the job env (run token, LLM keys): never below warn, whatever
    // RUST_LOG asks (docs/containers.md).
    let filter = match "bollard=warn".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let writer = RedactingMakeWriter::new(io::stderr);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(is_terminal()).try_init(),
    };
}

fn is_terminal() -> bool {
    use std::io::IsTerminal;
    io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn log_lines_never_carry_credentials() {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(RedactingMakeWriter::new(capture.clone()))
            .finish();
        let cred = format!("wsrc_{}", "c".repeat(64));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(credential = %cred, "probing credential {cred}");
        });
        let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(out.contains("probing credential"), "{out}");
        assert!(!out.contains(&cred), "{out}");
        assert!(out.contains("wsrc_[REDACTED]"), "{out}");
    }
}
