//! The unix-socket programs, loaded and attached without aya: aya 0.14 knows no
//! `BPF_CGROUP_UNIX_*` attach types (Linux 6.7+), so this file parses the same object with
//! aya-obj, points its map references at the maps aya already created, and makes the three
//! bpf(2) calls aya would have made with the right attach type.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::{Ebpf, maps::Map, programs::links::PinnedLink};

use super::{KernelError, OBJECT};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_UNIX_CONNECT: u32 = 49;
const BPF_CGROUP_UNIX_SENDMSG: u32 = 50;

/// (program in the object, attach type)
const UNIX_PROGRAMS: [(&str, u32); 2] = [
    ("connect_unix", BPF_CGROUP_UNIX_CONNECT),
    ("sendmsg_unix", BPF_CGROUP_UNIX_SENDMSG),
];

/// The prefix of `union bpf_attr` that BPF_PROG_LOAD reads; the kernel zero-fills the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Loads, attaches and pins the unix programs; returns the pinned links.
pub(super) fn attach(
    ebpf: &Ebpf,
    cgroup: &File,
    pin_dir: &Path,
) -> Result<Vec<PinnedLink>, KernelError> {
    let mut obj = aya_obj::Object::parse(OBJECT).map_err(|e| unix_err("parse", e))?;
    // relocate_maps borrows the object mutably, so it gets its own copies of the definitions,
    // each with the fd of the map aya already created under that name.
    let defs = obj
        .maps
        .iter()
        .map(|(name, def)| {
            let map = ebpf.map(name).ok_or_else(|| super::missing(name))?;
            Ok((name.clone(), map_fd(map)?, def.clone()))
        })
        .collect::<Result<Vec<(String, RawFd, aya_obj::Map)>, KernelError>>()?;
    let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(
        defs.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)),
        &text_sections,
    )
    .map_err(|e| unix_err("relocating maps", e))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| unix_err("relocating calls", e))?;

    let mut links = Vec::new();
    for (name, attach_type) in UNIX_PROGRAMS {
        let program = obj.programs.get(name).ok_or_else(|| super::missing(name))?;
        let function = obj
            .functions
            .get(&program.function_key())
            .ok_or_else(|| super::missing(name))?;
        let prog = load(name, &function.instructions, &obj.license, attach_type)?;
        let link = link_create(&prog, cgroup, attach_type).map_err(|e| io_err(name, e))?;
        let path = pin_dir.join(name);
        pin(&link, &path).map_err(|e| io_err(name, e))?;
        links.push(
            PinnedLink::from_pin(&path).map_err(|source| KernelError::Link {
                program: if attach_type == BPF_CGROUP_UNIX_CONNECT {
                    "connect_unix"
                } else {
                    "sendmsg_unix"
                },
                source,
            })?,
        );
    }
    Ok(links)
}

fn map_fd(map: &Map) -> Result<RawFd, KernelError> {
    let data = match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::RingBuf(d)
        | Map::SkStorage(d) => d,
        _ => {
            return Err(KernelError::Raw(
                "unexpected map type in the eBPF object".into(),
            ));
        }
    };
    Ok(data.fd().as_fd().as_raw_fd())
}

fn load(
    name: &str,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
    attach_type: u32,
) -> Result<OwnedFd, KernelError> {
    let mut prog_name = [0u8; 16];
    let n = name.len().min(15);
    prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    // SAFETY: attr points at valid memory for the call's duration; the kernel returns a new
    // fd that we own.
    let error = match unsafe { bpf(BPF_PROG_LOAD, &attr) } {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    // Load again with the verifier's log, only to explain the failure.
    let mut log = vec![0u8; 4 << 20];
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    // SAFETY: as above.
    let _ = unsafe { bpf(BPF_PROG_LOAD, &attr) };
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let verifier = String::from_utf8_lossy(&log[end.saturating_sub(2000)..end]);
    let hint = if error.raw_os_error() == Some(libc::EINVAL) {
        " (unix socket hooks need Linux 6.7 or later)"
    } else {
        ""
    };
    Err(KernelError::Raw(format!(
        "loading eBPF program {name}: {error}{hint}\n{verifier}"
    )))
}

/// Attaches a loaded program to a cgroup through a bpf link (also for programs aya loaded
/// but cannot hand back as a pinnable link).
pub(super) fn link_create(
    prog: &impl std::os::fd::AsRawFd,
    cgroup: &File,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    // SAFETY: as in `load`.
    unsafe { bpf(BPF_LINK_CREATE, &attr) }
}

pub(super) fn pin(link: &OwnedFd, path: &Path) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let attr = ObjPinAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: as in `load`; BPF_OBJ_PIN returns 0, not an fd, so close nothing.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &attr, size_of::<ObjPinAttr>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// bpf(2) for commands that return a new fd.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<OwnedFd> {
    // SAFETY: the caller passes a correctly laid out attr for `cmd`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: the kernel just gave us this fd.
        Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
    }
}

fn unix_err(what: &str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Raw(format!("preparing the unix socket programs ({what}): {e}"))
}

pub(super) fn io_err(name: &str, e: std::io::Error) -> KernelError {
    KernelError::Raw(format!("attaching eBPF program {name}: {e}"))
}
