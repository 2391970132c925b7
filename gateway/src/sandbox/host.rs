//! Host prerequisites: cgroup v2, bpffs and BTF, each found or explained.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use super::SandboxError;

pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The cgroup v2 mount point, read from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf, SandboxError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(SandboxError::io(
        "reading",
        Path::new("/proc/self/mountinfo"),
    ))?;
    cgroup2_in_mountinfo(&info).ok_or_else(|| {
        SandboxError::Prerequisite(
            "no cgroup v2 filesystem is mounted: mount one (`mount -t cgroup2 none /sys/fs/cgroup`) \
             or boot with systemd.unified_cgroup_hierarchy=1"
                .into(),
        )
    })
}

fn cgroup2_in_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(char::from(b)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Mounts bpffs at /sys/fs/bpf unless it is there already.
pub fn ensure_bpffs() -> Result<(), SandboxError> {
    let path = Path::new(BPFFS);
    if is_fs(path, BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(SandboxError::io("creating", path))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        SandboxError::Prerequisite(format!(
            "cannot mount bpffs at {BPFFS} ({e}): the kernel needs CONFIG_BPF_SYSCALL"
        ))
    })
}

fn is_fs(path: &Path, magic: i64) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == magic)
}

/// The kernel must describe itself in BTF for the LSM programs to load.
pub fn check_btf() -> Result<(), SandboxError> {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Ok(())
    } else {
        Err(SandboxError::Prerequisite(
            "/sys/kernel/btf/vmlinux is missing: the gateway needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 2021 are)"
                .into(),
        ))
    }
}

/// The open-file limits the gateway started with, when it raised them.
static STARTED_WITH: OnceLock<(u64, u64)> = OnceLock::new();

/// Raises the gateway's soft limit on open files to its hard limit. The tunnel holds two
/// descriptors per proxied connection and up to 1,024 connections per sandbox; the common
/// default soft limit of 1,024 would run out first, and a sandbox's connections would then
/// wait unaccepted. The sandboxed command gets the limits the gateway started with
/// ([`started_with_open_files`]). A failure is logged: the gateway works, with fewer
/// connections.
pub fn raise_open_files() {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            let _ = STARTED_WITH.set((soft, hard));
        }
        Err(e) => tracing::warn!(
            "cannot raise the open-file limit from {soft} to {hard}: {e}; the tunnel may run \
             out of descriptors before its connection limit"
        ),
    }
}

/// The (soft, hard) open-file limits to give back to a sandboxed command, if the gateway
/// raised its own.
pub fn started_with_open_files() -> Option<(u64, u64)> {
    STARTED_WITH.get().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_in_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let none = "25 24 0:22 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_in_mountinfo(none), None);
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
    }
}
