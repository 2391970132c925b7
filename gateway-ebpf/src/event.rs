//! Maps shared by every program, and the one way refusals reach userspace.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use gateway_common::{COMM_LEN, Event, Hook, Reason, SandboxConfig, UNIX_PATH_MAX};

#[map]
pub static CONFIG: Array<SandboxConfig> = Array::with_max_entries(1, 0);

/// Which policy buffer (`NET_ALLOW_n` and `UNIX_ALLOW_n`) is in force. A reload fills the
/// other buffer completely, then switches both sets at once by writing this one value; any
/// value but 0 or 1 refuses everything.
#[map]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Refusals whose event did not fit in `EVENTS`; userspace reports the sum.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn config() -> Option<&'static SandboxConfig> {
    CONFIG.get(0)
}

/// The policy buffer in force; read once per verdict, so one verdict never mixes two policies.
#[inline(always)]
pub fn active() -> Option<u32> {
    ACTIVE.get(0).copied()
}

/// What an event says about the destination or the socket.
pub struct Target<'a> {
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    pub port: u32,
    pub addr: [u8; 16],
    pub path: Option<(&'a [u8; UNIX_PATH_MAX], u32)>,
}

impl Target<'_> {
    pub const fn socket(family: u32, sock_type: u32, protocol: u32) -> Self {
        Self {
            family,
            sock_type,
            protocol,
            port: 0,
            addr: [0; 16],
            path: None,
        }
    }
}

/// Who caused an event: the current task, or only a socket's owner for packet hooks,
/// which may run in another task's context (softirq) and cannot ask for the current one.
pub struct Who {
    pub pid: u32,
    pub uid: u32,
    pub comm: [u8; COMM_LEN],
}

impl Who {
    #[inline(always)]
    pub fn current() -> Self {
        Self {
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            uid: bpf_get_current_uid_gid() as u32,
            comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
        }
    }

    #[inline(always)]
    pub const fn socket_owner(uid: u32) -> Self {
        Self {
            pid: 0,
            uid,
            comm: [0; COMM_LEN],
        }
    }
}

/// A refusal by the current task.
#[inline(always)]
pub fn emit(hook: Hook, reason: Reason, cgroup_id: u64, target: &Target<'_>) {
    emit_as(&Who::current(), hook, reason, cgroup_id, target);
}

#[inline(always)]
pub fn emit_as(who: &Who, hook: Hook, reason: Reason, cgroup_id: u64, target: &Target<'_>) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no concurrent writer on this CPU.
            unsafe { *lost += 1 };
        }
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable Event in the ring buffer; every field is
    // written before submit.
    unsafe {
        (*ev).cgroup_id = cgroup_id;
        (*ev).hook = hook as u32;
        (*ev).reason = reason as u32;
        (*ev).pid = who.pid;
        (*ev).uid = who.uid;
        (*ev).family = target.family;
        (*ev).sock_type = target.sock_type;
        (*ev).protocol = target.protocol;
        (*ev).port = target.port;
        (*ev).addr = target.addr;
        (*ev).comm = who.comm;
        match target.path {
            Some((path, len)) => {
                (*ev).path = *path;
                (*ev).path_len = len;
            }
            None => {
                (*ev).path = [0; UNIX_PATH_MAX];
                (*ev).path_len = 0;
            }
        }
    }
    entry.submit(0);
}
