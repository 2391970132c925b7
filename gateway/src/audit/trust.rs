//! Whose files the audit log trusts. The gateway writes as root in directories a sandbox's
//! user may also write (/tmp): a link planted at the log's path would make root append to any
//! file, and a log file (or rotated file) the sandbox's user made would let it rewrite the
//! records that accuse it, chain and all. So the writer opens every file without following a
//! symbolic link and takes it only if it is a regular file of its own that nobody else may
//! write, in a directory nobody else can swap it out of; readers skip, with a warning, any
//! file that neither root nor they own or that others could have written.

use std::{
    fmt,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Why a file of the log is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A symbolic link: whoever made it chooses which file is written or read.
    Symlink,
    /// A directory, FIFO, socket or device.
    NotRegular,
    /// Owned by someone else, who may rewrite it whatever its mode.
    Owner { uid: u32 },
    /// Writable by its group or by everyone.
    Writable { mode: u32 },
    /// The writers' lock file, which others may open, and so hold the lock.
    Openable { mode: u32 },
    /// A directory on its path owned by someone else, who may replace what is in it.
    DirectoryOwner { dir: PathBuf, uid: u32 },
    /// A directory on its path anyone may write, without the sticky bit that would keep
    /// them from replacing what others put there.
    DirectoryWritable { dir: PathBuf, mode: u32 },
    /// A symbolic link on its path made by someone else, who may point it anywhere.
    LinkOwner { link: PathBuf, uid: u32 },
    /// Its own directory others may write, sticky or not: they could plant a file or
    /// directory under a name rotation needs, and stop the records.
    DirectoryShared { dir: PathBuf, mode: u32 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Symlink => write!(f, "it is a symbolic link"),
            Self::NotRegular => write!(f, "it is not a regular file"),
            Self::Owner { uid } => write!(f, "it is owned by uid {uid}, who may rewrite it"),
            Self::Writable { mode } => {
                write!(f, "it is writable by group or others (mode {mode:04o})")
            }
            Self::Openable { mode } => write!(
                f,
                "others may open it (mode {mode:04o}) and hold the writers' lock"
            ),
            Self::DirectoryOwner { dir, uid } => write!(
                f,
                "its directory {} is owned by uid {uid}, who may replace the file",
                dir.display()
            ),
            Self::DirectoryWritable { dir, mode } => write!(
                f,
                "its directory {} is writable by others without the sticky bit (mode {mode:04o}), so anyone may replace the file",
                dir.display()
            ),
            Self::DirectoryShared { dir, mode } => write!(
                f,
                "its directory {} may be written by others than root (mode {mode:04o}, by group or others, or through an ACL), who could plant a file or directory under a name the log rotates to and stop the records",
                dir.display()
            ),
            Self::LinkOwner { link, uid } => write!(
                f,
                "{} on its path is a symbolic link owned by uid {uid}, who may point it anywhere",
                link.display()
            ),
        }
    }
}

impl Problem {
    /// What the operator can do about it.
    pub fn remedy(&self) -> &'static str {
        match self {
            Self::Writable { .. } => {
                "if its records are the gateway's, chmod go-w it; else move it away, or choose a path in a directory only root can write"
            }
            Self::Openable { .. } => "chmod 600 it, or remove it (the gateway makes it anew)",
            Self::Symlink | Self::NotRegular | Self::Owner { .. } => {
                "move it away (it is not the gateway's), or choose a path in a directory only root can write"
            }
            Self::DirectoryOwner { .. }
            | Self::DirectoryWritable { .. }
            | Self::DirectoryShared { .. }
            | Self::LinkOwner { .. } => {
                "choose a path in a directory only root can write (such as /var/log/gateway)"
            }
        }
    }
}

/// A file of the log the gateway will not use, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("refusing the audit log file {}: {problem}; {}", .path.display(), .problem.remedy())]
pub struct Untrusted {
    pub path: PathBuf,
    pub problem: Problem,
}

/// A file's open failed: it is not trusted, or the system said no.
#[derive(Debug)]
pub enum OpenError {
    Untrusted(Problem),
    Io(io::Error),
}

impl OpenError {
    /// As an I/O error; an untrusted file's carries [`Untrusted`], naming `path`.
    pub fn at(self, path: &Path) -> io::Error {
        match self {
            Self::Untrusted(problem) => io::Error::other(Untrusted {
                path: path.to_owned(),
                problem,
            }),
            Self::Io(e) => e,
        }
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Judges an open file: regular, owned by one of `owners`, written by nobody else.
fn judge(file: &File, owners: &[u32]) -> Result<(), OpenError> {
    judge_meta(&file.metadata()?, owners)
}

/// [`judge`] on what `stat` or `lstat` said.
fn judge_meta(meta: &std::fs::Metadata, owners: &[u32]) -> Result<(), OpenError> {
    if !meta.file_type().is_file() {
        return Err(OpenError::Untrusted(Problem::NotRegular));
    }
    if !owners.contains(&meta.uid()) {
        return Err(OpenError::Untrusted(Problem::Owner { uid: meta.uid() }));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(OpenError::Untrusted(Problem::Writable { mode }));
    }
    Ok(())
}

/// Opening a link with O_NOFOLLOW fails with ELOOP.
fn link_refused(e: io::Error) -> OpenError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        OpenError::Untrusted(Problem::Symlink)
    } else {
        OpenError::Io(e)
    }
}

/// What is already at the log's path, judged without opening it: a link, not a file, someone
/// else's, or writable by others. Nothing there is fine.
pub fn check_existing(path: &Path) -> Result<(), OpenError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.file_type().is_symlink() {
        return Err(OpenError::Untrusted(Problem::Symlink));
    }
    judge_meta(&meta, &[euid()])
}

/// The log's own directory, where rotation makes `FILE.1` … and `FILE` again: nobody else
/// may write it, even with the sticky bit (/tmp), or a file or directory planted under one
/// of those names stops the records. Nor may a group other than root's (Ubuntu's /var/log
/// is root:syslog 0775), or anyone an access ACL names.
pub fn check_own_directory(path: &Path) -> Result<(), OpenError> {
    let written = std::path::absolute(path)?;
    let Some(parent) = written.parent() else {
        return Ok(());
    };
    let dir = std::fs::canonicalize(parent)?;
    let meta = std::fs::metadata(&dir)?;
    let mode = meta.mode() & 0o7777;
    // With an access ACL the group bits are its mask: they say whether any named user or
    // group may write, not only the owning group.
    let group_may = mode & 0o020 != 0 && (meta.gid() != 0 || crate::tunnel::has_acl(&dir));
    if mode & 0o002 != 0 || group_may {
        return Err(OpenError::Untrusted(Problem::DirectoryShared { dir, mode }));
    }
    Ok(())
}

/// Opens (creating it, mode 0640) the log file at `path` for reading and appending, as the
/// writer does: no symbolic link is followed, and the file must be the gateway's own
/// regular file that nobody else may write.
pub fn open_append(path: &Path) -> Result<File, OpenError> {
    // Something that is there and not a file (a FIFO, a device) is not even opened.
    check_existing(path)?;
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(link_refused)?;
    judge(&file, &[euid()])?;
    Ok(file)
}

/// Opens, making it mode 0600, the file whose lock the writers sharing a log take (see
/// [`super::lock_path`]). Nobody but the gateway's user may open it at all: a lock on the
/// log itself can be taken by anyone who may read the log, and would stall the writer.
pub fn open_lock(path: &Path) -> Result<File, OpenError> {
    check_existing(path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(link_refused)?;
    judge(&file, &[euid()])?;
    let mode = file.metadata()?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(OpenError::Untrusted(Problem::Openable { mode }));
    }
    Ok(file)
}

/// Whom a reader trusts: the writer only its own files, `gateway audit` root's too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    Writer,
    Auditor,
}

/// Opens a file of the log for reading: no symbolic link is followed, and the file must be a
/// regular file that nobody but its trusted owner may write.
pub fn open_read(path: &Path, reader: Reader) -> Result<File, OpenError> {
    // A socket or device is not even opened (a socket fails to open with ENXIO, which
    // would stop the reading of every file instead of skipping this one).
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.file_type().is_file()
        && !meta.file_type().is_symlink()
    {
        return Err(OpenError::Untrusted(Problem::NotRegular));
    }
    let file = OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO for reading would wait for a writer.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(link_refused)?;
    let me = euid();
    let owners: &[u32] = match reader {
        Reader::Writer => &[me],
        Reader::Auditor => &[me, 0],
    };
    judge(&file, owners)?;
    Ok(file)
}

/// Checks the directories the log at `path` lives in, each as the kernel reaches it (links
/// followed where they stand, one in the middle of the path as much as the last): each
/// owned by root or the gateway's user, none writable by others without the sticky bit (in
/// a sticky directory such as /tmp only an entry's owner may replace it, and the entry is
/// judged next), and no symbolic link on the way made by anyone else.
pub fn check_directories(path: &Path) -> Result<(), OpenError> {
    let me = euid();
    let trusted = |uid: u32| uid == 0 || uid == me;
    let judge_dir = |dir: &Path, meta: &std::fs::Metadata| {
        let mode = meta.mode() & 0o7777;
        if !trusted(meta.uid()) {
            return Some(Problem::DirectoryOwner {
                dir: dir.to_owned(),
                uid: meta.uid(),
            });
        }
        (mode & 0o002 != 0 && mode & 0o1000 == 0).then(|| Problem::DirectoryWritable {
            dir: dir.to_owned(),
            mode,
        })
    };
    let written = std::path::absolute(path)?;
    let Some(parent) = written.parent() else {
        return Ok(());
    };
    let on_the_way = crate::path_walk::first(parent, |l| {
        judge_dir(l.dir, l.dir_meta).or_else(|| {
            let found = l.found?;
            (found.file_type().is_symlink() && !trusted(found.uid())).then(|| Problem::LinkOwner {
                link: l.entry.to_owned(),
                uid: found.uid(),
            })
        })
    });
    if let Some(problem) = on_the_way {
        return Err(OpenError::Untrusted(problem));
    }
    // The directory the walk ended in holds the log itself.
    let real = std::fs::canonicalize(parent)?;
    match judge_dir(&real, &std::fs::metadata(&real)?) {
        Some(problem) => Err(OpenError::Untrusted(problem)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fs::{Dir, chmod};

    fn scratch(tag: &str) -> Dir {
        Dir::new(&format!("trust-{tag}"))
    }

    /// A root-owned link at the log's directory that leads through a link in a directory
    /// anyone may write: that middle link could be pointed elsewhere.
    #[test]
    fn a_link_in_the_middle_of_the_way_is_judged_where_it_stands() {
        let logs = scratch("logs");
        let open = scratch("open");
        chmod(&open.0, 0o777);
        std::os::unix::fs::symlink(&logs.0, open.0.join("hop")).unwrap();
        let top = scratch("top");
        std::os::unix::fs::symlink(open.0.join("hop"), top.0.join("logs")).unwrap();
        let log = top.0.join("logs").join("audit.jsonl");
        match check_directories(&log) {
            Err(OpenError::Untrusted(Problem::DirectoryWritable { dir, .. })) => {
                assert_eq!(dir, open.0);
            }
            other => panic!("{other:?}"),
        }
        chmod(&open.0, 0o755);
        assert!(check_directories(&log).is_ok());
    }
}
