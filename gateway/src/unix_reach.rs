//! Whether the sandbox's user could put another socket where a `[[unix.allow]]` path points.
//! The kernel judges a connect by the path as the sandbox wrote it, not by the socket it
//! resolves to: a user who may replace an entry on the way (the socket, a directory, a link)
//! could point the allowed path at any socket it may reach, such as docker.sock through its
//! group. Such a path is refused before anything starts, and by a reload.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{
    policy::{Policy, UnixRule},
    tunnel::SandboxReader,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "[[unix.allow]] path {path}: {why}, so the sandbox could put a link to another socket in its place, and connect to that through the allowed path: allow a socket whose directories only root may write, or run the sandbox as another user"
)]
pub struct Replaceable {
    pub path: PathBuf,
    pub why: String,
}

/// The first allowed socket path `reader` (named `who` in the answer) could replace.
pub fn check(policy: &Policy, reader: &SandboxReader, who: &str) -> Result<(), Replaceable> {
    for rule in &policy.unix {
        if let UnixRule::Path(path) = rule
            && let Some(why) = replaceable_by_whom(path, reader, who)
        {
            return Err(Replaceable {
                path: path.clone(),
                why,
            });
        }
    }
    Ok(())
}

/// How the sandbox's user may change what a directory or file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// It owns it, and may chmod it whatever its mode.
    Owner { uid: u32 },
    /// Everyone may write it.
    Everyone { mode: u32 },
    /// An access ACL, whose mask the group bits are, may name the user or one of its groups.
    Acl { mode: u32 },
    /// Its group, one of the user's, may write it.
    Group { gid: u32, mode: u32 },
}

/// How messages name the user judged: the sandbox's own.
pub const THE_SANDBOX_USER: &str = "the sandbox's user";

impl Writer {
    /// What it is, the user judged named `who` ("the sandbox's user").
    pub fn describe(&self, who: &str) -> String {
        match self {
            Self::Owner { uid } => format!("it is owned by uid {uid}, {who}"),
            Self::Everyone { mode } => format!("everyone may write it (mode {mode:o})"),
            Self::Acl { mode } => {
                format!("it has an access ACL that may let {who} write it (mode {mode:o})")
            }
            Self::Group { gid, mode } => {
                format!("group {gid}, a group of {who}, may write it (mode {mode:o})")
            }
        }
    }
}

/// How `reader` may change what `path` holds: its owner (who may chmod it), let in by the
/// mode, or maybe by an access ACL (whose mask the group bits are, and which may name the
/// user). A directory's entries, or a file's contents.
pub fn writer(path: &Path, meta: &std::fs::Metadata, reader: &SandboxReader) -> Option<Writer> {
    let mode = meta.mode() & 0o7777;
    let group_may = mode & 0o020 != 0;
    if let SandboxReader::User { uid, .. } = reader
        && meta.uid() == *uid
    {
        return Some(Writer::Owner { uid: *uid });
    }
    if mode & 0o002 != 0 {
        return Some(Writer::Everyone { mode });
    }
    if group_may && crate::tunnel::has_acl(path) {
        return Some(Writer::Acl { mode });
    }
    match reader {
        SandboxReader::User { groups, .. } if group_may && groups.contains(&meta.gid()) => {
            Some(Writer::Group {
                gid: meta.gid(),
                mode,
            })
        }
        _ => None,
    }
}

/// May `reader` write `path` (change what a directory holds): [`writer`] says how.
pub(crate) fn may_write(path: &Path, meta: &std::fs::Metadata, reader: &SandboxReader) -> bool {
    writer(path, meta, reader).is_some()
}

fn owned_by(meta: &std::fs::Metadata, reader: &SandboxReader) -> bool {
    matches!(reader, SandboxReader::User { uid, .. } if meta.uid() == *uid)
}

/// Why `reader` could replace an entry on the way to `path`; `None` when it could not.
pub fn replaceable_by(path: &Path, reader: &SandboxReader) -> Option<String> {
    replaceable_by_whom(path, reader, THE_SANDBOX_USER)
}

/// [`replaceable_by`], the user judged named `who` in the answer. Also how a policy file and
/// its upstream CAs are judged on reload ([`crate::trusted_file`]).
pub fn replaceable_by_whom(path: &Path, reader: &SandboxReader, who: &str) -> Option<String> {
    crate::path_walk::first(path, |l| {
        if !may_write(l.dir, l.dir_meta, reader) {
            return None;
        }
        // In a sticky directory (/tmp) only an entry's owner may replace it; a missing one
        // anyone who may write there may create.
        let sticky = l.dir_meta.mode() & 0o1000 != 0;
        let theirs = l.found.is_none_or(|m| owned_by(m, reader));
        (!sticky || owned_by(l.dir_meta, reader) || theirs).then(|| {
            format!(
                "{who} may write directory {} (mode {:o}, uid {})",
                l.dir.display(),
                l.dir_meta.mode() & 0o7777,
                l.dir_meta.uid()
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fs::{Dir, chmod, set_acl};

    #[test]
    fn a_socket_path_is_judged_by_who_may_replace_each_entry_on_the_way() {
        let dir = Dir::new("unix-reach");
        let sock = dir.0.join("svc.sock");
        std::fs::write(&sock, "").unwrap();
        let sandbox = SandboxReader::User {
            uid: 4242,
            groups: vec![4242],
        };
        assert_eq!(replaceable_by(&sock, &sandbox), None);
        assert_eq!(replaceable_by(&sock, &SandboxReader::Anyone), None);
        // The sandbox's user owns the directory: it may chmod it and swap the socket.
        std::os::unix::fs::chown(&dir.0, Some(4242), None).unwrap();
        assert!(replaceable_by(&sock, &sandbox).is_some());
        assert_eq!(replaceable_by(&sock, &SandboxReader::Anyone), None);
        std::os::unix::fs::chown(&dir.0, Some(0), Some(4242)).unwrap();
        chmod(&dir.0, 0o775);
        assert!(replaceable_by(&sock, &sandbox).is_some());
        // Sticky: another's socket stays; one of its own, or a missing one, does not.
        chmod(&dir.0, 0o1777);
        assert_eq!(replaceable_by(&sock, &sandbox), None);
        assert!(replaceable_by(&dir.0.join("missing.sock"), &sandbox).is_some());
        std::os::unix::fs::lchown(&sock, Some(4242), None).unwrap();
        assert!(replaceable_by(&sock, &sandbox).is_some());
        std::os::unix::fs::lchown(&sock, Some(0), None).unwrap();
        chmod(&dir.0, 0o755);
        // A link on the way, through a directory the sandbox may write.
        let hop = Dir(dir.0.with_extension("hop"));
        std::fs::create_dir(&hop.0).unwrap();
        chmod(&hop.0, 0o777);
        std::os::unix::fs::symlink(&sock, hop.0.join("link")).unwrap();
        let named = dir.0.join("named.sock");
        std::os::unix::fs::symlink(hop.0.join("link"), &named).unwrap();
        let why = replaceable_by(&named, &sandbox).unwrap();
        assert!(why.contains(&hop.0.display().to_string()), "{why}");
        chmod(&hop.0, 0o755);
        assert_eq!(replaceable_by(&named, &sandbox), None);
        // An access ACL naming the user: the group bits are its mask.
        chmod(&dir.0, 0o775);
        std::os::unix::fs::chown(&dir.0, Some(0), Some(0)).unwrap();
        set_acl(
            &dir.0,
            &[
                (0x01, 7, u32::MAX),
                (0x02, 7, 4242),
                (0x04, 5, u32::MAX),
                (0x10, 7, u32::MAX),
                (0x20, 5, u32::MAX),
            ],
        );
        assert!(replaceable_by(&sock, &sandbox).is_some());
    }
}
