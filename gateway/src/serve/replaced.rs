//! Whether each sandbox's cgroup is still the one its programs are attached to. The
//! `gateway-hold` child stops a plain `rmdir`, but a recursive delete (systemd's cleanup, a
//! container runtime's) removes the child first: a cgroup made again under the name has none
//! of the programs, and whatever is placed in it reaches the network directly. Serve cannot
//! attach to it in time to stop a first connection, so it looks every second, kills what is
//! in such a cgroup, and records it, loudly, each time.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use crate::{
    audit::{AuditLog, Layer, Record, Verdict},
    sandbox::cgroup::{Cgroup, HOLD},
};

/// The reason of the record a replaced cgroup leaves.
pub const REPLACED: &str = "sandbox-cgroup-replaced";

/// Looks at sandbox `name`'s cgroup: a missing hold is made again; a cgroup made anew under
/// its path has its processes killed and is recorded. Returns whether it was replaced.
pub fn check(name: &str, cgroup: &Cgroup, audit: &AuditLog) -> bool {
    let dir = cgroup.dir();
    match std::fs::metadata(dir) {
        Ok(meta) if meta.ino() == cgroup.id() => {
            if !dir.join(HOLD).is_dir()
                && let Err(e) = cgroup.hold()
            {
                tracing::error!(sandbox = %name, "cannot make {HOLD} again: {e}");
            }
            false
        }
        Ok(_) => {
            replaced(name, dir, audit);
            true
        }
        // Gone: nothing can be placed in it until it is made again.
        Err(_) => false,
    }
}

fn replaced(name: &str, dir: &Path, audit: &AuditLog) {
    let killed = std::fs::write(dir.join("cgroup.kill"), "1");
    tracing::error!(
        sandbox = %name,
        cgroup = %dir.display(),
        "the sandbox's cgroup was removed and made again: the new one has none of the sandbox's programs; what was placed in it is killed ({}); stop whatever recreates it, and restart serve",
        match &killed {
            Ok(()) => "done".to_owned(),
            Err(e) => format!("failed: {e}"),
        }
    );
    if let Err(e) = audit.append(&Record::new(Layer::Gateway, Verdict::Deny, name, REPLACED)) {
        tracing::error!("{e}");
    }
}
