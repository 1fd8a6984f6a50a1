//! Reading what the agent left in its checkout's `.git` without trusting it (docs/SECURITY.md).
//!
//! The agent owns every byte of its checkout and has read this code. Host git must never
//! open a path in there: it would follow a symlink the agent planted (another workspace's
//! cache, a root-only host file), block on a pipe, or obey the agent's `.git/config`. So the
//! runner itself reads the few things a push needs, with these rules:
//!
//! - the checkout is reached from its parent (runner-owned, or the run's mount root, which
//!   the agent cannot rename) with `O_NOFOLLOW` on the checkout directory and on every
//!   component below it, so no symlink is followed anywhere;
//! - before anything is read, the whole `.git` tree is walked with `lstat` semantics: a
//!   symlink, pipe, socket or device anywhere in it refuses the push (our own checkouts never
//!   hold one), and so do more entries or depth than any real checkout has;
//! - files are opened `O_NONBLOCK` and must still be regular files once open (`fstat`), so a
//!   pipe swapped in after the walk cannot block the runner;
//! - the branch is read from the loose ref or `packed-refs` by our own parser, and objects
//!   are copied into a runner-owned repository (loose objects by name; packs that the run's
//!   own cache does not already hold, to be re-indexed by `git index-pack`). Nothing else
//!   is read: not `config`, not `shallow`, not alternates, not hooks.
//!
//! Error texts name the offending entry escaped and bounded (the agent chose its name).

use std::ffi::{CStr, OsStr};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::error::GitError;

/// More entries than this in `.git` is not a checkout we made plus an agent's work.
pub const MAX_GIT_ENTRIES: u64 = 1_000_000;
/// Deeper than this is not a ref namespace anyone uses.
pub const MAX_GIT_DEPTH: usize = 24;
/// What the runner copies out of one checkout at most (objects the cache does not hold).
pub const MAX_COPY_BYTES: u64 = 8 << 30;
/// A loose ref file is one object id and a newline.
const MAX_LOOSE_REF_BYTES: u64 = 4096;
/// `packed-refs` of a repository with very many tags stays well under this.
const MAX_PACKED_REFS_BYTES: u64 = 128 << 20;
/// How much of an agent-chosen name an error quotes.
const MAX_NAME_IN_ERROR: usize = 120;

/// An open handle on `<checkout>/.git`, reached without following any symlink.
pub struct AgentGitDir {
    fd: OwnedFd,
    checkout: PathBuf,
}

/// What the walk saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub entries: u64,
    pub bytes: u64,
}

/// What a copy of the objects produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopiedObjects {
    pub loose: u64,
    /// Packs copied (their `.pack` only): the caller re-indexes each with `git index-pack`.
    pub packs: Vec<PathBuf>,
    /// Packs left out because the run's cache holds a pack of the same name.
    pub packs_from_cache: u64,
    pub bytes: u64,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);
const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

impl AgentGitDir {
    /// Opens `<checkout>/.git`. The checkout's parent is opened normally (it is runner-owned
    /// or the run's mount root); the checkout and `.git` must be real directories.
    pub fn open(checkout: &Path) -> Result<Self, GitError> {
        let unsafe_because = |reason: String| GitError::UnsafeCheckout {
            path: checkout.to_owned(),
            reason,
        };
        let (Some(parent), Some(name)) = (checkout.parent(), checkout.file_name()) else {
            return Err(unsafe_because("the checkout path has no parent".into()));
        };
        let parent_fd = rustix::fs::open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| GitError::io(format!("open {}", parent.display()), e.into()))?;
        let checkout_fd = match rustix::fs::openat(&parent_fd, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(unsafe_because(
                    "the checkout directory was replaced by a symlink or a file".into(),
                ))
            }
            Err(e) => {
                return Err(GitError::io(
                    format!("open {}", checkout.display()),
                    e.into(),
                ))
            }
        };
        let fd = match rustix::fs::openat(&checkout_fd, ".git", DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::LOOP | Errno::NOTDIR) => {
                return Err(unsafe_because(
                    ".git is not a plain directory (a symlink or a gitdir file)".into(),
                ))
            }
            Err(Errno::NOENT) => return Err(unsafe_because("the checkout has no .git".into())),
            Err(e) => {
                return Err(GitError::io(
                    format!("open {}/.git", checkout.display()),
                    e.into(),
                ))
            }
        };
        Ok(Self {
            fd,
            checkout: checkout.to_owned(),
        })
    }

    fn refuse(&self, reason: String) -> GitError {
        GitError::UnsafeCheckout {
            path: self.checkout.clone(),
            reason,
        }
    }

    /// Walks all of `.git` without following anything and refuses what our checkouts never
    /// hold: symlinks, pipes, sockets, devices, absurd size or depth.
    pub fn check_tree(&self) -> Result<TreeStats, GitError> {
        let mut stats = TreeStats::default();
        let mut stack: Vec<(OwnedFd, String, usize)> =
            vec![(self.dup_root()?, ".git".to_owned(), 0)];
        while let Some((dir, rel, depth)) = stack.pop() {
            for (name, stat) in self.list(&dir, &rel)? {
                stats.entries += 1;
                if stats.entries > MAX_GIT_ENTRIES {
                    return Err(
                        self.refuse(format!(".git holds more than {MAX_GIT_ENTRIES} entries"))
                    );
                }
                let child_rel = format!("{rel}/{}", shown(name.as_bytes()));
                match FileType::from_raw_mode(stat.st_mode) {
                    FileType::RegularFile => {
                        stats.bytes = stats.bytes.saturating_add(stat.st_size.max(0) as u64);
                    }
                    FileType::Directory => {
                        if depth + 1 > MAX_GIT_DEPTH {
                            return Err(self.refuse(format!(
                                ".git is nested deeper than {MAX_GIT_DEPTH} levels"
                            )));
                        }
                        let fd = self.open_dir_at(&dir, &name, &child_rel)?;
                        stack.push((fd, child_rel, depth + 1));
                    }
                    other => {
                        return Err(self.refuse(format!(
                        "{child_rel} is a {}; a checkout's .git holds only files and directories",
                        kind_name(other)
                    )))
                    }
                }
            }
        }
        Ok(stats)
    }

    /// The object id `refs/heads/<branch>` names (the loose ref wins over `packed-refs`, as
    /// in git), or `None` when the branch does not exist. `branch` is validated already.
    pub fn read_branch(&self, branch: &str) -> Result<Option<String>, GitError> {
        let reference = format!("refs/heads/{branch}");
        if let Some(text) = self.read_file(&reference, MAX_LOOSE_REF_BYTES)? {
            let value = String::from_utf8_lossy(&text);
            let value = value.trim_end_matches(['\n', '\r']);
            if value.starts_with("ref:") {
                return Err(self.refuse(format!(
                    "{reference} is a symbolic ref; the run branch must name a commit"
                )));
            }
            return match object_id(value) {
                Some(id) => Ok(Some(id)),
                None => Err(self.refuse(format!("{reference} does not hold an object id"))),
            };
        }
        let Some(packed) = self.read_file("packed-refs", MAX_PACKED_REFS_BYTES)? else {
            return Ok(None);
        };
        for line in packed.split(|b| *b == b'\n') {
            if line.first().is_some_and(|b| *b == b'#' || *b == b'^') {
                continue;
            }
            let Some(space) = line.iter().position(|b| *b == b' ') else {
                continue;
            };
            let (id, name) = (&line[..space], &line[space + 1..]);
            if name.strip_suffix(b"\r").unwrap_or(name) == reference.as_bytes() {
                return match std::str::from_utf8(id).ok().and_then(object_id) {
                    Some(id) => Ok(Some(id)),
                    None => Err(self.refuse(format!(
                        "packed-refs names {reference} with something that is not an object id"
                    ))),
                };
            }
        }
        Ok(None)
    }

    /// Copies the agent's objects into `dest_objects` (a runner-owned `objects` directory):
    /// loose objects by their hex names, and each `pack-*.pack` whose name `cache_packs`
    /// (the run's cache `objects/pack`, reached through alternates) does not hold. Index
    /// files are not copied: the caller rebuilds them from the pack with `git index-pack`,
    /// which checks every object.
    pub fn copy_objects(
        &self,
        dest_objects: &Path,
        cache_packs: Option<&Path>,
    ) -> Result<CopiedObjects, GitError> {
        let mut copied = CopiedObjects::default();
        let Some(objects) = self.open_dir_path("objects")? else {
            return Err(self.refuse(".git/objects is missing".into()));
        };
        for (name, stat) in self.list(&objects, ".git/objects")? {
            let bytes = name.as_bytes();
            let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
            if is_dir && bytes.len() == 2 && bytes.iter().all(u8::is_ascii_hexdigit) {
                let rel = format!(".git/objects/{}", shown(bytes));
                let fan = self.open_dir_at(&objects, &name, &rel)?;
                let dest_dir = dest_objects.join(&name);
                for (file, fstat) in self.list(&fan, &rel)? {
                    let fb = file.as_bytes();
                    let loose = (fb.len() == 38 || fb.len() == 62)
                        && fb
                            .iter()
                            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
                    if !loose || FileType::from_raw_mode(fstat.st_mode) != FileType::RegularFile {
                        continue;
                    }
                    std::fs::create_dir_all(&dest_dir)
                        .map_err(|e| GitError::io(format!("create {}", dest_dir.display()), e))?;
                    copied.bytes +=
                        self.copy_file(&fan, &file, &dest_dir.join(&file), copied.bytes)?;
                    copied.loose += 1;
                }
            } else if is_dir && bytes == b"pack" {
                let pack_dir = self.open_dir_at(&objects, &name, ".git/objects/pack")?;
                let dest_dir = dest_objects.join("pack");
                for (file, fstat) in self.list(&pack_dir, ".git/objects/pack")? {
                    let fb = file.as_bytes();
                    let is_pack = fb.starts_with(b"pack-")
                        && fb.ends_with(b".pack")
                        && fb.len() <= 80
                        && fb[5..fb.len() - 5].iter().all(u8::is_ascii_hexdigit);
                    if !is_pack || FileType::from_raw_mode(fstat.st_mode) != FileType::RegularFile {
                        continue;
                    }
                    if cache_packs.is_some_and(|dir| dir.join(&file).is_file()) {
                        copied.packs_from_cache += 1;
                        continue;
                    }
                    std::fs::create_dir_all(&dest_dir)
                        .map_err(|e| GitError::io(format!("create {}", dest_dir.display()), e))?;
                    let dest = dest_dir.join(&file);
                    copied.bytes += self.copy_file(&pack_dir, &file, &dest, copied.bytes)?;
                    copied.packs.push(dest);
                }
            }
        }
        Ok(copied)
    }

    fn dup_root(&self) -> Result<OwnedFd, GitError> {
        self.fd
            .try_clone()
            .map_err(|e| GitError::io("duplicate the .git handle", e))
    }

    /// Lists a directory: each entry's name and `lstat`, without following anything.
    fn list(
        &self,
        dir: &OwnedFd,
        rel: &str,
    ) -> Result<Vec<(std::ffi::OsString, rustix::fs::Stat)>, GitError> {
        let io = |e: Errno| GitError::io(format!("list {rel}"), e.into());
        let mut entries = Vec::new();
        for entry in rustix::fs::Dir::read_from(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name: &CStr = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io)?;
            entries.push((OsStr::from_bytes(name.to_bytes()).to_owned(), stat));
            if entries.len() as u64 > MAX_GIT_ENTRIES {
                return Err(self.refuse(format!("{rel} holds more than {MAX_GIT_ENTRIES} entries")));
            }
        }
        Ok(entries)
    }

    fn open_dir_at(&self, dir: &OwnedFd, name: &OsStr, rel: &str) -> Result<OwnedFd, GitError> {
        match rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => Ok(fd),
            Err(Errno::LOOP | Errno::NOTDIR) => {
                Err(self.refuse(format!("{rel} is not a plain directory")))
            }
            Err(e) => Err(GitError::io(format!("open {rel}"), e.into())),
        }
    }

    /// Opens `.git/<rel>` as a directory, every component without following; `None` when a
    /// component does not exist.
    fn open_dir_path(&self, rel: &str) -> Result<Option<OwnedFd>, GitError> {
        let mut fd = self.dup_root()?;
        let mut shown_so_far = String::from(".git");
        for part in rel.split('/') {
            shown_so_far.push('/');
            shown_so_far.push_str(part);
            fd = match rustix::fs::openat(&fd, part, DIR_FLAGS, Mode::empty()) {
                Ok(next) => next,
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(self.refuse(format!("{shown_so_far} is not a plain directory")))
                }
                Err(e) => return Err(GitError::io(format!("open {shown_so_far}"), e.into())),
            };
        }
        Ok(Some(fd))
    }

    /// Reads `.git/<rel>` (a regular file of at most `cap` bytes), or `None` when it or a
    /// directory above it does not exist.
    fn read_file(&self, rel: &str, cap: u64) -> Result<Option<Vec<u8>>, GitError> {
        let (dir_rel, name) = match rel.rsplit_once('/') {
            Some((dir, name)) => (Some(dir), name),
            None => (None, rel),
        };
        let dir = match dir_rel {
            Some(d) => match self.open_dir_path(d)? {
                Some(fd) => fd,
                None => return Ok(None),
            },
            None => self.dup_root()?,
        };
        let shown_rel = format!(".git/{rel}");
        let Some(file) = self.open_regular(&dir, OsStr::new(name), &shown_rel)? else {
            return Ok(None);
        };
        let mut text = Vec::new();
        std::fs::File::from(file)
            .take(cap + 1)
            .read_to_end(&mut text)
            .map_err(|e| GitError::io(format!("read {shown_rel}"), e))?;
        if text.len() as u64 > cap {
            return Err(self.refuse(format!("{shown_rel} is larger than {cap} bytes")));
        }
        Ok(Some(text))
    }

    /// Opens a regular file without following, without blocking, and checks it is one.
    fn open_regular(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        rel: &str,
    ) -> Result<Option<OwnedFd>, GitError> {
        let fd = match rustix::fs::openat(dir, name, FILE_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP) => return Err(self.refuse(format!("{rel} is a symlink"))),
            Err(e) => return Err(GitError::io(format!("open {rel}"), e.into())),
        };
        let stat = rustix::fs::fstat(fd.as_fd())
            .map_err(|e| GitError::io(format!("stat {rel}"), e.into()))?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Ok(Some(fd)),
            other => Err(self.refuse(format!(
                "{rel} is a {}, not a regular file",
                kind_name(other)
            ))),
        }
    }

    /// Copies one regular file to a new runner-owned file; returns the bytes copied.
    fn copy_file(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        dest: &Path,
        copied_so_far: u64,
    ) -> Result<u64, GitError> {
        let rel = format!(".git/objects/…/{}", shown(name.as_bytes()));
        let Some(fd) = self.open_regular(dir, name, &rel)? else {
            return Ok(0);
        };
        let budget = MAX_COPY_BYTES.saturating_sub(copied_so_far);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(|e| GitError::io(format!("create {}", dest.display()), e))?;
        let n = std::io::copy(&mut std::fs::File::from(fd).take(budget + 1), &mut out)
            .map_err(|e| GitError::io(format!("copy {rel}"), e))?;
        if n > budget {
            return Err(self.refuse(format!(
                "the agent's objects exceed {} GiB",
                MAX_COPY_BYTES >> 30
            )));
        }
        Ok(n)
    }
}

/// A lowercase 40- or 64-hex object id, or `None`.
fn object_id(text: &str) -> Option<String> {
    let ok = (text.len() == 40 || text.len() == 64) && text.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| text.to_ascii_lowercase())
}

/// An agent-chosen name, escaped (no control characters) and bounded, for error texts.
pub(crate) fn shown(name: &[u8]) -> String {
    let text = String::from_utf8_lossy(name);
    let mut out: String = text.escape_debug().take(MAX_NAME_IN_ERROR).collect();
    if text.escape_debug().nth(MAX_NAME_IN_ERROR).is_some() {
        out.push('…');
    }
    out
}

fn kind_name(kind: FileType) -> &'static str {
    match kind {
        FileType::Symlink => "symlink",
        FileType::Fifo => "named pipe",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Directory => "directory",
        FileType::RegularFile => "regular file",
        _ => "special file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_are_hex_of_the_two_lengths() {
        assert_eq!(object_id(&"a".repeat(40)), Some("a".repeat(40)));
        assert_eq!(object_id(&"B".repeat(64)), Some("b".repeat(64)));
        assert_eq!(object_id(&"a".repeat(41)), None);
        assert_eq!(object_id("ref: refs/heads/main"), None);
    }

    #[test]
    fn names_in_errors_are_escaped_and_bounded() {
        assert_eq!(shown(b"a\nb"), "a\\nb");
        let long = shown(&[b'x'; 500]);
        assert!(long.chars().count() <= MAX_NAME_IN_ERROR + 1);
        assert!(long.ends_with('…'));
    }
}
