//! Whether a sandbox's user could move its own processes out of the sandbox's cgroup. The
//! kernel lets a process be moved between two cgroups by whoever may write `cgroup.procs` of
//! their nearest common ancestor: a user who may write that file in any cgroup above the
//! sandbox's (a delegated subtree, as systemd's `Delegate=yes` makes) may move itself up
//! there, or into a sibling it makes, where none of the sandbox's programs are.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::tunnel::SandboxReader;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "sandbox cgroup {cgroup}: {procs} may be written by {who} (owner uid {uid}, mode {mode:o}), so a sandboxed process could move itself out of the sandbox into a cgroup without its programs: give serve a cgroup under ancestors whose cgroup.procs only root may write (not inside a subtree delegated to the sandbox's user)"
)]
pub struct Leavable {
    pub cgroup: PathBuf,
    pub procs: PathBuf,
    pub who: &'static str,
    pub uid: u32,
    pub mode: u32,
}

/// Checks every cgroup above `root/path` (the root's own too) that exists. Those serve will
/// make are root's, mode 0755.
pub fn check(root: &Path, path: &Path, reader: &SandboxReader) -> Result<(), Leavable> {
    let cgroup = root.join(path);
    let mut above = Some(root.to_owned());
    let mut parts = path.iter().peekable();
    while let Some(dir) = above {
        let procs = dir.join("cgroup.procs");
        let Ok(meta) = std::fs::metadata(&procs) else {
            // Not made yet: serve makes it, root's.
            break;
        };
        // Without a known user, any owner but root could be the one inside.
        let writable = match reader {
            SandboxReader::User { .. } => crate::unix_reach::may_write(&procs, &meta, reader),
            SandboxReader::Anyone => {
                meta.uid() != 0 || meta.mode() & 0o022 != 0 || crate::tunnel::has_acl(&procs)
            }
        };
        if writable {
            return Err(Leavable {
                cgroup,
                procs,
                who: match reader {
                    SandboxReader::User { .. } => "the sandbox's user",
                    SandboxReader::Anyone => "others than root (and the config gives no `user`)",
                },
                uid: meta.uid(),
                mode: meta.mode() & 0o7777,
            });
        }
        // The sandbox's own cgroup is not above it: moves inside it keep its programs.
        above = match (parts.next(), parts.peek()) {
            (Some(part), Some(_)) => Some(dir.join(part)),
            _ => None,
        };
    }
    Ok(())
}
