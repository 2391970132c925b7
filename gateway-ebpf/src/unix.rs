//! Unix-domain connects and datagrams from the sandbox to named or abstract sockets:
//! refused unless the policy lists the path. aya has no cgroup unix hooks, so these are BPF
//! LSM programs filtered to the sandbox's cgroup.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_probe_read_kernel},
    macros::{lsm, map},
    maps::HashMap,
    programs::LsmContext,
};
use gateway_common::{Hook, Reason, UNIX_PATH_MAX, UnixPath};

use crate::event::{Target, config, emit};

const AF_UNIX: u16 = 1;
const EPERM: i32 = 1;
/// `offsetof(struct sockaddr_un, sun_path)`
const SUN_PATH_OFFSET: usize = 2;

#[map]
static UNIX_ALLOW: HashMap<UnixPath, u8> = HashMap::with_max_entries(1024, 0);

/// `int socket_connect(struct socket *sock, struct sockaddr *address, int addrlen)`
#[lsm(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    let address: *const u8 = ctx.arg(1);
    let addrlen: i32 = ctx.arg(2);
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    judge(Hook::UnixConnect, address, addrlen)
}

/// `int socket_sendmsg(struct socket *sock, struct msghdr *msg, int size)`
#[lsm(hook = "socket_sendmsg")]
pub fn socket_sendmsg(ctx: LsmContext) -> i32 {
    let msg: *const u8 = ctx.arg(1);
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    // `struct msghdr` starts with `void *msg_name; int msg_namelen;`, a layout the kernel
    // has kept since its first release. By this hook msg_name points at a kernel copy.
    // SAFETY: reads of kernel memory go through the checked helper.
    let Ok(name) = (unsafe { bpf_probe_read_kernel(msg as *const *const u8) }) else {
        return 0;
    };
    if name.is_null() {
        // Connected socket: its peer was judged at connect.
        return 0;
    }
    // SAFETY: as above.
    let Ok(namelen) = (unsafe { bpf_probe_read_kernel(msg.wrapping_add(8) as *const i32) }) else {
        return -EPERM;
    };
    judge(Hook::UnixSendmsg, name, namelen)
}

#[inline(always)]
fn judge(hook: Hook, address: *const u8, addrlen: i32) -> i32 {
    let Some(cfg) = config() else {
        return 0;
    };
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if cgroup_id != cfg.cgroup_id {
        return 0;
    }
    // SAFETY: reads of kernel memory go through the checked helper.
    let Ok(family) = (unsafe { bpf_probe_read_kernel(address as *const u16) }) else {
        return -EPERM;
    };
    if family != AF_UNIX {
        return 0;
    }
    let mut key = UnixPath {
        bytes: [0; UNIX_PATH_MAX],
        _pad: [0; 4],
    };
    // The kernel's copy of the address lives in a sockaddr_storage, so a full sun_path read
    // stays inside it; bytes past addrlen are cleared below.
    // SAFETY: as above.
    let Ok(raw) = (unsafe {
        bpf_probe_read_kernel(address.wrapping_add(SUN_PATH_OFFSET) as *const [u8; UNIX_PATH_MAX])
    }) else {
        return -EPERM;
    };
    let len = (addrlen as i64 - SUN_PATH_OFFSET as i64).clamp(0, UNIX_PATH_MAX as i64) as usize;
    let abstract_name = raw[0] == 0;
    let mut used = 0u32;
    let mut ended = false;
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        if i >= len || (!abstract_name && raw[i] == 0) {
            ended = true;
        }
        if !ended {
            key.bytes[i] = raw[i];
            used = i as u32 + 1;
        }
        i += 1;
    }
    if UNIX_ALLOW.get_ptr(&key).is_some() {
        return 0;
    }
    let mut target = Target::socket(AF_UNIX as u32, 0, 0);
    target.path = Some((&key.bytes, used));
    emit(hook, Reason::NotAllowlisted, cgroup_id, &target);
    -EPERM
}
