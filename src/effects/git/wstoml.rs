//! The `ws.toml` written into every checkout (spec 4.9 step 7): tells the `ws` CLI inside the
//! container which server and workspace to use.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::error::GitError;

/// The content of `ws.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsToml {
    /// `[server] url`.
    pub server_url: String,
    /// `[defaults] workspace_key`, when known.
    pub workspace_key: Option<String>,
}

impl WsToml {
    /// From a run's env: `WS_URL` if present, else `WS_API_URL` without a trailing `/` and
    /// `/api`; the workspace key from `WS_WORKSPACE_KEY`. `None` when neither URL is set.
    pub fn from_run_env(env: &HashMap<String, String>) -> Option<Self> {
        let nonempty = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let server_url = match nonempty("WS_URL") {
            Some(url) => url.to_owned(),
            None => server_url_from_api(nonempty("WS_API_URL")?),
        };
        Some(Self {
            server_url,
            workspace_key: nonempty("WS_WORKSPACE_KEY").map(str::to_owned),
        })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut text = format!("[server]\nurl = {}\n", toml_string(&self.server_url));
        if let Some(key) = &self.workspace_key {
            text.push_str(&format!(
                "\n[defaults]\nworkspace_key = {}\n",
                toml_string(key)
            ));
        }
        text
    }

    /// Writes `<dir>/ws.toml` atomically (temp file in `dir`, fsync, rename) with mode 0644,
    /// replacing any `ws.toml` the repository brought.
    pub fn write_into(&self, dir: &Path) -> Result<(), GitError> {
        let target = dir.join("ws.toml");
        let mut tmp = tempfile::Builder::new()
            .prefix(".ws.toml.")
            .tempfile_in(dir)
            .map_err(|e| GitError::io(format!("create a temp file in {}", dir.display()), e))?;
        tmp.write_all(self.render().as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .and_then(|()| {
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(0o644))
            })
            .map_err(|e| GitError::io(format!("write {}", target.display()), e))?;
        // A directory named ws.toml (from the repository) would make rename fail.
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            super::cache::remove_path(&target)?;
        }
        tmp.persist(&target)
            .map_err(|e| GitError::io(format!("rename into {}", target.display()), e.error))?;
        Ok(())
    }
}

/// `https://h/api/` → `https://h`; a URL not ending in `/api` is kept (minus trailing `/`).
pub fn server_url_from_api(api_url: &str) -> String {
    let trimmed = api_url.trim_end_matches('/');
    trimmed.strip_suffix("/api").unwrap_or(trimmed).to_owned()
}

/// A TOML basic string.
fn toml_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn url_and_key_come_from_the_run_env() {
        let cfg = WsToml::from_run_env(&env(&[
            ("WS_API_URL", "https://ws.example/api/"),
            ("WS_WORKSPACE_KEY", "ACME"),
        ]))
        .expect("config");
        assert_eq!(
            cfg.render(),
            "[server]\nurl = \"https://ws.example\"\n\n[defaults]\nworkspace_key = \"ACME\"\n"
        );
        let cfg = WsToml::from_run_env(&env(&[
            ("WS_API_URL", "https://ws.example/api"),
            ("WS_URL", "https://public.example"),
        ]))
        .expect("config");
        assert_eq!(cfg.render(), "[server]\nurl = \"https://public.example\"\n");
        assert_eq!(WsToml::from_run_env(&env(&[])), None);
    }

    #[test]
    fn values_are_escaped() {
        let cfg = WsToml {
            server_url: "https://h/\"x\"\n[evil]".into(),
            workspace_key: None,
        };
        assert_eq!(
            cfg.render(),
            "[server]\nurl = \"https://h/\\\"x\\\"\\n[evil]\"\n"
        );
    }

    #[test]
    fn written_atomically_with_mode_0644_replacing_the_repos_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ws.toml"), "from the repo").expect("seed");
        let cfg = WsToml {
            server_url: "https://h".into(),
            workspace_key: Some("K".into()),
        };
        cfg.write_into(dir.path()).expect("write");
        let path = dir.path().join("ws.toml");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), cfg.render());
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .filter(|e| e.file_name() != "ws.toml")
            .collect();
        assert!(leftovers.is_empty());
    }
}
