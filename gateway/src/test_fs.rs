//! Scratch directories, modes and access ACLs for the unit tests of the checks that judge who
//! may reach or replace a file (secret files, unix socket paths, the audit log, policy files).

use std::{
    os::unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    path::{Path, PathBuf},
};

/// A directory removed, with all in it, on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    /// A new directory under the system's temporary one, mode 0755.
    pub fn new(tag: &str) -> Self {
        let dir = Self(std::env::temp_dir().join(format!(
            "gateway-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        )));
        std::fs::create_dir(&dir.0).unwrap();
        chmod(&dir.0, 0o755);
        dir
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Sets `path`'s access ACL: (tag, permissions, id) entries in the kernel's xattr layout
/// (tags: 0x01 owner, 0x02 named user, 0x04 group, 0x10 mask, 0x20 others).
pub fn set_acl(path: &Path, entries: &[(u16, u16, u32)]) {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let set = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            acl.as_ptr().cast(),
            acl.len(),
            0,
        )
    };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
}

/// `f(path)` on another thread: its result, or `None` when it has not returned within a few
/// seconds (it waits on a FIFO no one writes; the thread is left waiting).
pub fn within_seconds<T: Send + 'static>(path: &Path, f: fn(&Path) -> T) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_owned();
    std::thread::spawn(move || tx.send(f(&path)));
    rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
}
