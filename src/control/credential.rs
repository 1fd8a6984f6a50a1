//! The runner credential's lifecycle (spec 4.2): use `WSRUNNER_CREDENTIAL`, else the
//! credential file, each probed with one heartbeat; otherwise check the file can be written
//! *before* spending the single-use registration token, register, and persist atomically
//! (temp file, fsync, rename; 0600 in a 0700 directory).
//!
//! Inputs come as a plain struct so the daemon's config and the tests drive it alike.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::client::{Client, ControlError};
use crate::redact::{redact, register_secret};

/// What the lifecycle needs to know (from `WSRUNNER_*`).
#[derive(Clone, Default)]
pub struct CredentialInputs {
    /// `WSRUNNER_CREDENTIAL`.
    pub credential: Option<String>,
    /// `WSRUNNER_CREDENTIAL_FILE` (default `<WSRUNNER_CACHE_ROOT>/credential`).
    pub credential_file: PathBuf,
    /// `WSRUNNER_REGISTRATION_TOKEN`.
    pub registration_token: Option<String>,
    /// `WSRUNNER_NAME`.
    pub name: String,
}

impl std::fmt::Debug for CredentialInputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialInputs")
            .field(
                "credential",
                &self.credential.as_ref().map(|_| crate::redact::MASK),
            )
            .field("credential_file", &self.credential_file)
            .field(
                "registration_token",
                &self
                    .registration_token
                    .as_ref()
                    .map(|_| crate::redact::MASK),
            )
            .field("name", &self.name)
            .finish()
    }
}

/// Where the credential in use came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// `WSRUNNER_CREDENTIAL`.
    Env,
    /// The credential file.
    File,
    /// Registered now; `persisted` is false when the file write failed after registering
    /// (the credential then lives only in memory and a restart needs a new token).
    Registered {
        instance_id: i64,
        pool_id: i64,
        persisted: bool,
    },
}

/// The outcome: the credential is installed on the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObtainedCredential {
    pub source: CredentialSource,
    /// Non-fatal problems boot should log (probe unreachable, persist failed, …).
    pub warnings: Vec<String>,
}

/// Why no credential could be obtained. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("no usable runner credential and WSRUNNER_REGISTRATION_TOKEN is not set: mint a registration token for the runner pool in Windshift and set WSRUNNER_REGISTRATION_TOKEN (the credential will be saved to {file})")]
    NoToken { file: String },
    #[error("the registration token was rejected (invalid, expired or already used): mint a new registration token for the runner pool and set WSRUNNER_REGISTRATION_TOKEN ({detail})")]
    TokenRejected { detail: String },
    #[error("the credential file {path} is not writable ({reason}); the registration token was NOT used. Fix the permissions or set WSRUNNER_CREDENTIAL_FILE to a writable path")]
    FileNotWritable { path: String, reason: String },
    #[error("cannot register with the Windshift server: {detail}. Check WS_API_URL and that this host can reach it over HTTPS")]
    Unreachable { detail: String },
    #[error("registration failed: {0}")]
    Server(ControlError),
}

/// Runs the lifecycle and installs the resulting credential on `client`.
pub async fn obtain_credential(
    client: &Client,
    inputs: &CredentialInputs,
) -> Result<ObtainedCredential, CredentialError> {
    let mut warnings = Vec::new();
    if let Some(c) = inputs
        .credential
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        register_secret(c);
        if probe(client, c, "WSRUNNER_CREDENTIAL", &mut warnings).await {
            client.set_credential(c);
            return Ok(ObtainedCredential {
                source: CredentialSource::Env,
                warnings,
            });
        }
    }
    match std::fs::read_to_string(&inputs.credential_file) {
        Ok(text) => {
            let c = text.trim();
            if !c.is_empty() {
                register_secret(c);
                if probe(client, c, "the credential file", &mut warnings).await {
                    client.set_credential(c);
                    return Ok(ObtainedCredential {
                        source: CredentialSource::File,
                        warnings,
                    });
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warnings.push(format!(
            "cannot read the credential file {}: {e}; registering instead",
            inputs.credential_file.display()
        )),
    }

    // Register. Writability first: a token must never be spent on a credential we cannot keep.
    check_writable(&inputs.credential_file)?;
    let token = inputs
        .registration_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| CredentialError::NoToken {
            file: inputs.credential_file.display().to_string(),
        })?;
    register_secret(token);
    let resp = client
        .register(token, &inputs.name)
        .await
        .map_err(|e| match e {
            ControlError::Status(ref s) if s.status == 401 => CredentialError::TokenRejected {
                detail: e.to_string(),
            },
            ControlError::Transport { .. } => CredentialError::Unreachable {
                detail: e.to_string(),
            },
            other => CredentialError::Server(other),
        })?;
    client.set_credential(&resp.credential);
    let persisted = match persist_credential(&inputs.credential_file, &resp.credential) {
        Ok(()) => true,
        Err(e) => {
            let msg = format!(
                "registered, but saving the credential to {} failed: {}. The runner keeps it in memory only; after a restart it needs a NEW registration token",
                inputs.credential_file.display(),
                redact(&e.to_string())
            );
            tracing::error!("{msg}");
            warnings.push(msg);
            false
        }
    };
    Ok(ObtainedCredential {
        source: CredentialSource::Registered {
            instance_id: resp.instance_id,
            pool_id: resp.pool_id,
            persisted,
        },
        warnings,
    })
}

/// One heartbeat with the candidate. Accepted: true. 401/403: false (fall through). Any other
/// error: true (use it anyway and let the worker retry, as upstream does), with a warning.
async fn probe(client: &Client, credential: &str, what: &str, warnings: &mut Vec<String>) -> bool {
    match client.probe_credential(credential).await {
        Ok(_) => true,
        Err(ControlError::CredentialRejected(e)) => {
            warnings.push(format!(
                "the credential from {what} was rejected ({e}); trying the next source"
            ));
            false
        }
        Err(e) => {
            warnings.push(format!(
                "could not verify the credential from {what} ({e}); using it anyway"
            ));
            true
        }
    }
}

fn not_writable(path: &Path, reason: impl std::fmt::Display) -> CredentialError {
    CredentialError::FileNotWritable {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Creates the parent (0700) if needed and writes then deletes `<file>.probe` (0600).
pub fn check_writable(file: &Path) -> Result<(), CredentialError> {
    if file.is_dir() {
        return Err(not_writable(file, "it is a directory"));
    }
    let parent = parent_of(file);
    ensure_private_dir(parent).map_err(|e| not_writable(file, e))?;
    let mut probe_name = file.as_os_str().to_owned();
    probe_name.push(".probe");
    let probe = PathBuf::from(probe_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&probe)
        .map_err(|e| not_writable(file, e))?;
    f.write_all(b"probe\n").map_err(|e| not_writable(file, e))?;
    drop(f);
    std::fs::remove_file(&probe).map_err(|e| not_writable(file, e))?;
    Ok(())
}

fn parent_of(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates missing directories with mode 0700. An existing directory is left as it is (it may
/// be shared, e.g. the cache root), but a world-writable one is refused.
fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if meta.permissions().mode() & 0o002 != 0 && meta.permissions().mode() & 0o1000 == 0 {
        return Err(std::io::Error::other(format!(
            "{} is world-writable; use a private directory (0700)",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes `credential\n` atomically: 0600 temp file in the same directory, fsync, rename,
/// fsync the directory.
pub fn persist_credential(file: &Path, credential: &str) -> std::io::Result<()> {
    let parent = parent_of(file);
    ensure_private_dir(parent)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".credential-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(parent)?;
    tmp.write_all(credential.trim().as_bytes())?;
    tmp.write_all(b"\n")?;
    tmp.as_file().sync_all()?;
    tmp.persist(file).map_err(|e| e.error)?;
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_writes_0600_in_a_new_0700_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/credential");
        persist_credential(&file, "wsrc_abc").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "wsrc_abc\n");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(dir.path().join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        // Replacing keeps the mode and leaves no temp files behind.
        persist_credential(&file, "wsrc_def").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "wsrc_def\n");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }

    #[test]
    fn writability_probe_leaves_nothing_and_rejects_directories() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credential");
        check_writable(&file).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let err = check_writable(dir.path()).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }

    #[test]
    fn debug_of_inputs_masks_secrets() {
        let i = CredentialInputs {
            credential: Some("wsrc_zzz".into()),
            registration_token: Some("wsrt_yyy".into()),
            ..Default::default()
        };
        let d = format!("{i:?}");
        assert!(!d.contains("zzz") && !d.contains("yyy"), "{d}");
    }
}
