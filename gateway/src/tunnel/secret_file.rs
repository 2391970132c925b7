//! Who else can get at a credential's secret file, judged before it is read, as the CA key
//! is (`ca::owner_only`): the user the sandboxed command runs as must not be able to read it
//! (it would hold the secret itself), and no one but root may write a directory on its way
//! (the file could be replaced, by a link to any file root can read, whose contents the
//! tunnel would then send upstream).

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

use super::credentials::Whose;

/// Who runs in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxReader {
    /// One user, with the groups it may hold (primary and supplementary).
    User { uid: u32, groups: Vec<u32> },
    /// Not known (a `serve` sandbox without `user`): only what everyone may read is known to
    /// be readable inside.
    Anyone,
}

impl SandboxReader {
    /// `uid` with `gid` and, when the user database knows the uid, its other groups.
    pub fn user(uid: u32, gid: Option<u32>) -> Self {
        let mut groups: Vec<u32> = gid.into_iter().collect();
        if let Ok(Some(u)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            && let Ok(name) = CString::new(u.name.as_bytes())
            && let Ok(found) =
                nix::unistd::getgrouplist(&name, gid.map_or(u.gid, nix::unistd::Gid::from_raw))
        {
            groups.extend(found.into_iter().map(|g| g.as_raw()));
        }
        groups.sort_unstable();
        groups.dedup();
        Self::User { uid, groups }
    }
}

/// How a secret file could reach someone it must not. Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exposure {
    /// The sandbox's user owns it: it may read it, or chmod it and then read it.
    OwnedBySandboxUser {
        uid: u32,
    },
    /// Its group is one of the sandbox user's and may read it.
    GroupReadable {
        gid: u32,
        mode: u32,
    },
    WorldReadable {
        mode: u32,
    },
    /// An access ACL whose mask lets named users or groups read it.
    Acl {
        mode: u32,
    },
    /// A directory on its path belongs to someone else than root.
    DirectoryOwned {
        dir: PathBuf,
        uid: u32,
        mode: u32,
    },
    /// A directory on its path is writable by group or others (and not sticky).
    DirectoryWritable {
        dir: PathBuf,
        mode: u32,
    },
    /// An entry on its path, in a sticky directory others may write, belongs to someone else
    /// than root: its owner may replace it.
    EntryOwned {
        entry: PathBuf,
        uid: u32,
    },
    /// Group or others may write it: the credential could be set from outside.
    Writable {
        mode: u32,
    },
    /// Another user than root owns it, and may write it whatever its mode.
    OwnedByOther {
        uid: u32,
    },
}

impl Exposure {
    /// What is wrong, after "secret file FILE ", for the user `whose` (the sandbox's own, or
    /// another sandbox's).
    pub fn why(&self, whose: Whose) -> String {
        let (user, command) = (whose.user(), whose.command());
        match self {
            Self::OwnedBySandboxUser { uid } => format!(
                "is owned by uid {uid}, {user}, so {command} could read the secret itself (or chmod the file and then read it)"
            ),
            Self::GroupReadable { gid, mode } => format!(
                "is readable by group {gid} (mode {mode:o}), a group of {user}, so {command} could read the secret itself"
            ),
            Self::WorldReadable { mode } => format!(
                "is readable by everyone (mode {mode:o}), so {command} could read the secret itself"
            ),
            Self::Acl { mode } => format!(
                "has an access ACL that lets other users read it (mode {mode:o}), so {command} may read the secret itself"
            ),
            Self::DirectoryOwned { dir, uid, mode } => format!(
                "is in directory {}, which uid {uid} owns (mode {mode:o}), so the file could be replaced, e.g. by a link to another file that the tunnel would then send upstream",
                dir.display()
            ),
            Self::DirectoryWritable { dir, mode } => format!(
                "is in directory {}, which others may write (mode {mode:o}), so the file could be replaced, e.g. by a link to another file that the tunnel would then send upstream",
                dir.display()
            ),
            Self::EntryOwned { entry, uid } => format!(
                "is reached through {}, which uid {uid} owns in a directory others may write, so it could be replaced, e.g. by a link to another file that the tunnel would then send upstream",
                entry.display()
            ),
            Self::Writable { mode } => format!(
                "may be written by others than root (mode {mode:o}), so someone else could set the credential the tunnel sends"
            ),
            Self::OwnedByOther { uid } => format!(
                "is owned by uid {uid}, who may write it whatever its mode, so someone else than root could set the credential the tunnel sends"
            ),
        }
    }

    /// What to do about it. `another_user` is how to run the sandbox as another user.
    pub fn fix(&self, file: &Path, another_user: &str) -> String {
        let f = file.display();
        let own = format!("chown root:root {f} && chmod 600 {f}");
        match self {
            Self::OwnedBySandboxUser { .. } | Self::GroupReadable { .. } => {
                format!("{own}, or {another_user}")
            }
            Self::WorldReadable { .. } | Self::Writable { .. } | Self::OwnedByOther { .. } => own,
            Self::EntryOwned { entry, .. } => format!(
                "keep the file, and every link to it, in a directory only root may write (such as /etc/gateway/secrets), not through {}",
                entry.display()
            ),
            Self::Acl { .. } => format!("setfacl -b {f} && {own}"),
            Self::DirectoryOwned { dir, .. } | Self::DirectoryWritable { dir, .. } => {
                let d = dir.display();
                format!(
                    "chown root:root {d} && chmod go-w {d}, or keep the file in a directory only root may write (such as /etc/gateway/secrets)"
                )
            }
        }
    }
}

/// The first way `file` is exposed to `reader`, if any. A file that cannot be read about
/// is not judged here: reading it fails afterwards with the reason.
pub fn exposure(file: &Path, reader: &SandboxReader) -> Option<Exposure> {
    // Missing now, it could be there when it is read: whoever may write a directory on the
    // way could put it (or a link) there in between.
    let Ok(meta) = std::fs::metadata(file) else {
        return replaceable(file);
    };
    let mode = meta.mode() & 0o7777;
    match reader {
        SandboxReader::User { uid, groups } => {
            if meta.uid() == *uid {
                return Some(Exposure::OwnedBySandboxUser { uid: *uid });
            }
            if mode & 0o040 != 0 && groups.contains(&meta.gid()) && !has_acl(file) {
                return Some(Exposure::GroupReadable {
                    gid: meta.gid(),
                    mode,
                });
            }
        }
        SandboxReader::Anyone => {}
    }
    if mode & 0o004 != 0 {
        return Some(Exposure::WorldReadable { mode });
    }
    // With an ACL the group bits are its mask: named users and groups may read.
    if mode & 0o040 != 0 && has_acl(file) {
        return Some(Exposure::Acl { mode });
    }
    written_by_others(file, &meta)
}

/// How someone other than root (the gateway's user) could change what `file` (of metadata
/// `meta`) holds: write it, or replace it or an entry on the way to it. Also how the policy
/// file and the upstream CAs of a sandbox without `user` are judged on reload
/// ([`crate::trusted_file`]).
pub(crate) fn written_by_others(file: &Path, meta: &std::fs::Metadata) -> Option<Exposure> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(Exposure::Writable { mode });
    }
    let gateway = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != gateway {
        // Its owner may write it whatever the mode says (chmod first).
        return Some(Exposure::OwnedByOther { uid: meta.uid() });
    }
    replaceable(file)
}

/// A directory someone other than root (the gateway's user) may write, among those the file
/// is looked up in (a link in the middle of the path counts as much as the file's own
/// directory); or, in a sticky directory such as /tmp, an entry on the way that someone
/// else owns.
pub(crate) fn replaceable(file: &Path) -> Option<Exposure> {
    let gateway = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == gateway;
    let mut judged: Vec<PathBuf> = Vec::new();
    crate::path_walk::first(file, |l| {
        let mode = l.dir_meta.mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if !judged.iter().any(|d| d == l.dir) {
            if !trusted(l.dir_meta.uid()) {
                return Some(Exposure::DirectoryOwned {
                    dir: l.dir.to_owned(),
                    uid: l.dir_meta.uid(),
                    mode,
                });
            }
            // In a sticky directory (/tmp) only an entry's owner may rename or remove it:
            // the entry is judged below.
            if mode & 0o022 != 0 && !sticky {
                return Some(Exposure::DirectoryWritable {
                    dir: l.dir.to_owned(),
                    mode,
                });
            }
            judged.push(l.dir.to_owned());
        }
        // Missing: not judged here (reading it says why).
        let found = l.found?;
        (sticky && mode & 0o022 != 0 && !trusted(found.uid())).then(|| Exposure::EntryOwned {
            entry: l.entry.to_owned(),
            uid: found.uid(),
        })
    })
}

/// A credential's secret is one line; a file far larger is not one.
pub const MAX_SECRET_BYTES: u64 = 64 << 10;

/// Reads a secret file judged by [`exposure`]: a regular file (a FIFO or a device would
/// block the reload, or never end) of at most [`MAX_SECRET_BYTES`].
pub fn read(path: &Path) -> std::io::Result<Zeroizing<String>> {
    use std::io::Read as _;
    const WHAT: &str = "the secret file";
    let (mut file, len) = crate::trusted_file::open_regular(path, MAX_SECRET_BYTES, WHAT)?;
    // Room for all of it up front: a String that grew would leave an unwiped copy behind.
    let mut text = Zeroizing::new(String::with_capacity(len as usize + 1));
    (&mut file)
        .take(MAX_SECRET_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SECRET_BYTES {
        return Err(crate::trusted_file::too_large(None, MAX_SECRET_BYTES, WHAT));
    }
    Ok(text)
}

pub(crate) fn has_acl(file: &Path) -> bool {
    let Ok(path) = CString::new(file.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: valid C strings; a null buffer of size 0 asks for the value's size only.
    let size = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    size > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fs::{Dir, chmod, set_acl};

    /// Missing when checked, the file could be there when it is read: whoever may write a
    /// directory on the way could put it, or a link to any file, there in between.
    #[test]
    fn a_missing_file_is_judged_by_its_directories() {
        let dir = Dir::new("secret-missing");
        let file = dir.0.join("token");
        assert_eq!(exposure(&file, &SandboxReader::Anyone), None);
        chmod(&dir.0, 0o777);
        assert!(matches!(
            exposure(&file, &SandboxReader::Anyone),
            Some(Exposure::DirectoryWritable { .. })
        ));
    }

    #[test]
    fn modes_owners_and_directories() {
        let dir = Dir::new("secret-file");
        let file = dir.0.join("token");
        std::fs::write(&file, "s").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let my_gid = nix::unistd::getegid().as_raw();
        let other = SandboxReader::User {
            uid: me.wrapping_add(4242),
            groups: vec![my_gid.wrapping_add(4242)],
        };
        chmod(&file, 0o600);
        assert_eq!(exposure(&file, &other), None);
        assert_eq!(exposure(&file, &SandboxReader::Anyone), None);
        // Owned by the sandbox's user: whatever the mode, it may chmod it.
        let owner = SandboxReader::User {
            uid: me,
            groups: vec![],
        };
        chmod(&file, 0o000);
        assert_eq!(
            exposure(&file, &owner),
            Some(Exposure::OwnedBySandboxUser { uid: me })
        );
        chmod(&file, 0o640);
        let in_group = SandboxReader::User {
            uid: me.wrapping_add(4242),
            groups: vec![my_gid],
        };
        assert_eq!(
            exposure(&file, &in_group),
            Some(Exposure::GroupReadable {
                gid: my_gid,
                mode: 0o640
            })
        );
        assert_eq!(exposure(&file, &other), None);
        assert_eq!(exposure(&file, &SandboxReader::Anyone), None);
        chmod(&file, 0o604);
        for reader in [&other, &SandboxReader::Anyone] {
            assert_eq!(
                exposure(&file, reader),
                Some(Exposure::WorldReadable { mode: 0o604 })
            );
        }
        // An ACL letting uid 4242 read: the group bits become its mask.
        chmod(&file, 0o600);
        set_acl(
            &file,
            &[
                (0x01, 6, u32::MAX),
                (0x02, 4, 4242),
                (0x04, 0, u32::MAX),
                (0x10, 4, u32::MAX),
                (0x20, 0, u32::MAX),
            ],
        );
        assert_eq!(exposure(&file, &other), Some(Exposure::Acl { mode: 0o640 }));
        let c_file = CString::new(file.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings.
        let removed =
            unsafe { libc::removexattr(c_file.as_ptr(), c"system.posix_acl_access".as_ptr()) };
        assert_eq!(removed, 0, "{}", std::io::Error::last_os_error());
        chmod(&file, 0o600);
        assert_eq!(exposure(&file, &other), None);
        chmod(&dir.0, 0o777);
        assert_eq!(
            exposure(&file, &other),
            Some(Exposure::DirectoryWritable {
                dir: dir.0.clone(),
                mode: 0o777
            })
        );
        // Sticky, as /tmp: no one may replace another's entry.
        chmod(&dir.0, 0o1777);
        assert_eq!(exposure(&file, &other), None);
        chmod(&dir.0, 0o755);
        // A link: the directory of the link and of its target are both judged.
        let target_dir = Dir(dir.0.with_extension("target"));
        std::fs::create_dir(&target_dir.0).unwrap();
        chmod(&target_dir.0, 0o775);
        let target = target_dir.0.join("real");
        std::fs::write(&target, "s").unwrap();
        chmod(&target, 0o600);
        let link = dir.0.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(
            exposure(&link, &other),
            Some(Exposure::DirectoryWritable {
                dir: target_dir.0.clone(),
                mode: 0o775
            })
        );
        chmod(&target_dir.0, 0o755);
        assert_eq!(exposure(&link, &other), None);
        // A link in the middle: the file's own directory and the target's are root's, the
        // link between them sits where others may write, and could be pointed elsewhere.
        let middle_dir = Dir(dir.0.with_extension("middle"));
        std::fs::create_dir(&middle_dir.0).unwrap();
        chmod(&middle_dir.0, 0o777);
        std::os::unix::fs::symlink(&target, middle_dir.0.join("hop")).unwrap();
        let first = dir.0.join("first");
        std::os::unix::fs::symlink(middle_dir.0.join("hop"), &first).unwrap();
        assert_eq!(
            exposure(&first, &other),
            Some(Exposure::DirectoryWritable {
                dir: middle_dir.0.clone(),
                mode: 0o777
            })
        );
        // Sticky, as /tmp: the link there is judged by its owner.
        chmod(&middle_dir.0, 0o1777);
        assert_eq!(exposure(&first, &other), None);
        let stranger = me.wrapping_add(4242);
        nix::unistd::fchownat(
            None,
            &middle_dir.0.join("hop"),
            Some(nix::unistd::Uid::from_raw(stranger)),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert_eq!(
            exposure(&first, &other),
            Some(Exposure::EntryOwned {
                entry: middle_dir.0.join("hop"),
                uid: stranger
            })
        );
        // Another user's, 0600: its owner may write it all the same.
        std::os::unix::fs::chown(&target, Some(me.wrapping_add(777)), None).unwrap();
        assert_eq!(
            exposure(&target, &other),
            Some(Exposure::OwnedByOther {
                uid: me.wrapping_add(777)
            })
        );
        std::os::unix::fs::chown(&target, Some(me), None).unwrap();
        // Writable by others: the credential could be set from outside.
        chmod(&target, 0o602);
        assert_eq!(
            exposure(&target, &other),
            Some(Exposure::Writable { mode: 0o602 })
        );
        chmod(&target, 0o600);
        // Missing: not judged here (reading it says why).
        assert_eq!(exposure(&dir.0.join("missing"), &other), None);
    }

    #[test]
    fn only_a_regular_file_of_a_secret_s_size_is_read() {
        let dir = Dir::new("secret-read");
        let file = dir.0.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read(&file).unwrap().as_str(), "s3cret\n");
        // A FIFO no one writes: refused at once, not waited on.
        let fifo = dir.0.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let big = dir.0.join("big");
        std::fs::write(&big, vec![b'x'; MAX_SECRET_BYTES as usize + 1]).unwrap();
        let e = read(&big).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn messages_say_why_and_what_to_do() {
        let file = Path::new("/etc/gateway/secrets/t");
        let e = Exposure::WorldReadable { mode: 0o644 };
        assert_eq!(
            e.why(Whose::Own),
            "is readable by everyone (mode 644), so the sandboxed command could read the secret itself"
        );
        assert_eq!(
            e.fix(file, "run CMD as another user (--user)"),
            "chown root:root /etc/gateway/secrets/t && chmod 600 /etc/gateway/secrets/t"
        );
        let e = Exposure::OwnedBySandboxUser { uid: 1000 };
        assert!(
            e.fix(file, "run CMD as another user (--user)")
                .ends_with(", or run CMD as another user (--user)")
        );
    }
}
