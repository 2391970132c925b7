//! Unix-domain connects and datagrams from the sandbox to a socket address (path or
//! abstract name): refused unless the policy lists it.
//!
//! These are cgroup sock_addr programs for the unix attach types (Linux 6.7+). aya 0.14 has
//! no such attach types, so the programs sit in sections aya can parse and userspace loads
//! them itself with the right expected attach type (see gateway/src/kernel/unix.rs).

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_probe_read_kernel},
    macros::{cgroup_sock_addr, map},
    maps::HashMap,
    programs::SockAddrContext,
};
use gateway_common::{Hook, Reason, UNIX_ALLOW_ENTRIES, UNIX_PATH_MAX, UnixPath};

use crate::event::{Target, active, emit};

const AF_UNIX: u16 = 1;
const ALLOW: i32 = 1;
const DENY: i32 = 0;
/// `offsetof(struct sockaddr_un, sun_path)`
const SUN_PATH_OFFSET: usize = 2;
/// `struct bpf_sock_addr_kern { struct sock *sk; struct sockaddr *uaddr; u64 tmp_reg;
/// void *t_ctx; u32 uaddrlen; }`: the context behind `bpf_sock_addr`, unchanged since the
/// unix hooks were added. Unix programs can reach the address only through it.
const UADDR_OFFSET: usize = 8;
const UADDRLEN_OFFSET: usize = 32;

/// `[[unix.allow]]`, twice, like `NET_ALLOW_n`: the one `ACTIVE` names is in force.
#[map]
static UNIX_ALLOW_0: HashMap<UnixPath, u8> = HashMap::with_max_entries(UNIX_ALLOW_ENTRIES, 0);
#[map]
static UNIX_ALLOW_1: HashMap<UnixPath, u8> = HashMap::with_max_entries(UNIX_ALLOW_ENTRIES, 0);

/// Loaded with attach type `BPF_CGROUP_UNIX_CONNECT`.
#[cgroup_sock_addr(connect4)]
pub fn connect_unix(ctx: SockAddrContext) -> i32 {
    judge(&ctx, Hook::UnixConnect)
}

/// Loaded with attach type `BPF_CGROUP_UNIX_SENDMSG`.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg_unix(ctx: SockAddrContext) -> i32 {
    judge(&ctx, Hook::UnixSendmsg)
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let kern = ctx.sock_addr as *const u8;
    // SAFETY: reads of kernel memory go through the checked helper; a failed read refuses.
    let Ok(address) =
        (unsafe { bpf_probe_read_kernel(kern.wrapping_add(UADDR_OFFSET) as *const *const u8) })
    else {
        return DENY;
    };
    // SAFETY: as above.
    let Ok(addrlen) =
        (unsafe { bpf_probe_read_kernel(kern.wrapping_add(UADDRLEN_OFFSET) as *const u32) })
    else {
        return DENY;
    };
    // SAFETY: as above.
    let Ok(family) = (unsafe { bpf_probe_read_kernel(address as *const u16) }) else {
        return DENY;
    };
    let mut key = UnixPath {
        bytes: [0; UNIX_PATH_MAX],
        _pad: [0; 4],
    };
    // The kernel's copy of the address lives in a sockaddr_storage, so a full sun_path read
    // stays inside it; only bytes before addrlen are copied into the key below.
    // SAFETY: as above.
    let Ok(raw) = (unsafe {
        bpf_probe_read_kernel(address.wrapping_add(SUN_PATH_OFFSET) as *const [u8; UNIX_PATH_MAX])
    }) else {
        return DENY;
    };
    let len = (addrlen as i64 - SUN_PATH_OFFSET as i64).clamp(0, UNIX_PATH_MAX as i64) as usize;
    // A path ends at its first NUL; an abstract name is every byte up to addrlen. Bytes are
    // copied as the loop finds them, so each place it can stop leads straight to the lookup
    // (a search loop followed by a copy loop had the verifier walk the copy once per length:
    // 0.38 s a program).
    let mut used = 0;
    if raw[0] != 0 {
        while used < UNIX_PATH_MAX && used < len && raw[used] != 0 {
            key.bytes[used] = raw[used];
            used += 1;
        }
    } else {
        while used < UNIX_PATH_MAX && used < len {
            key.bytes[used] = raw[used];
            used += 1;
        }
    }
    let used = used as u32;
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by reference: a 112-byte copy would crowd the 512-byte BPF stack"
    )]
    let listed = match active() {
        Some(0) => UNIX_ALLOW_0.get_ptr(&key).is_some(),
        Some(1) => UNIX_ALLOW_1.get_ptr(&key).is_some(),
        _ => false,
    };
    if family == AF_UNIX && used > 0 && listed {
        return ALLOW;
    }
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let mut target = Target::socket(AF_UNIX as u32, 0, 0);
    target.path = Some((&key.bytes, used));
    emit(hook, Reason::NotAllowlisted, cgroup_id, &target);
    DENY
}
