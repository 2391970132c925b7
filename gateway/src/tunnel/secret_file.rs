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
}

impl Exposure {
    /// What is wrong, after "secret file FILE ".
    pub fn why(&self) -> String {
        match self {
            Self::OwnedBySandboxUser { uid } => format!(
                "is owned by uid {uid}, the sandbox's user, so the sandboxed command could read the secret itself (or chmod the file and then read it)"
            ),
            Self::GroupReadable { gid, mode } => format!(
                "is readable by group {gid} (mode {mode:o}), a group of the sandbox's user, so the sandboxed command could read the secret itself"
            ),
            Self::WorldReadable { mode } => format!(
                "is readable by everyone (mode {mode:o}), so the sandboxed command could read the secret itself"
            ),
            Self::Acl { mode } => format!(
                "has an access ACL that lets other users read it (mode {mode:o}), so the sandboxed command may read the secret itself"
            ),
            Self::DirectoryOwned { dir, uid, mode } => format!(
                "is in directory {}, which uid {uid} owns (mode {mode:o}), so the file could be replaced, e.g. by a link to another file that the tunnel would then send upstream",
                dir.display()
            ),
            Self::DirectoryWritable { dir, mode } => format!(
                "is in directory {}, which others may write (mode {mode:o}), so the file could be replaced, e.g. by a link to another file that the tunnel would then send upstream",
                dir.display()
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
            Self::WorldReadable { .. } => own,
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
    let meta = std::fs::metadata(file).ok()?;
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
    replaceable(file)
}

/// A directory someone other than root (the gateway's user) may write, on the path as
/// written or on the path it resolves to.
fn replaceable(file: &Path) -> Option<Exposure> {
    let gateway = nix::unistd::geteuid().as_raw();
    let written = std::path::absolute(file).ok()?;
    let mut dirs: Vec<PathBuf> = written.ancestors().skip(1).map(Path::to_owned).collect();
    if let Ok(real) = std::fs::canonicalize(file) {
        for d in real.ancestors().skip(1) {
            if !dirs.iter().any(|x| x == d) {
                dirs.push(d.to_owned());
            }
        }
    }
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        if meta.uid() != 0 && meta.uid() != gateway {
            return Some(Exposure::DirectoryOwned {
                dir,
                uid: meta.uid(),
                mode,
            });
        }
        // In a sticky directory (/tmp) only an entry's owner may rename or remove it, and
        // the entry below is judged next.
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Some(Exposure::DirectoryWritable { dir, mode });
        }
    }
    None
}

fn has_acl(file: &Path) -> bool {
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
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn modes_owners_and_directories() {
        let dir = Dir(std::env::temp_dir().join(format!(
            "gateway-secret-file-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )));
        std::fs::create_dir(&dir.0).unwrap();
        chmod(&dir.0, 0o755);
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
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),
            (0x02, 4, 4242),
            (0x04, 0, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        let c_file = CString::new(file.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C strings and a buffer of the given length.
        let set = unsafe {
            libc::setxattr(
                c_file.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                acl.as_ptr().cast(),
                acl.len(),
                0,
            )
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
        assert_eq!(exposure(&file, &other), Some(Exposure::Acl { mode: 0o640 }));
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
        // Missing: not judged here (reading it says why).
        assert_eq!(exposure(&dir.0.join("missing"), &other), None);
    }

    #[test]
    fn messages_say_why_and_what_to_do() {
        let file = Path::new("/etc/gateway/secrets/t");
        let e = Exposure::WorldReadable { mode: 0o644 };
        assert_eq!(
            e.why(),
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
