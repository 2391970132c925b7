//! Socket creation: TCP and UDP over inet/inet6, unix, and netlink route; nothing else.
//!
//! The cgroup `sock_create` hook sees only inet/inet6, so the BPF LSM `socket_create` hook
//! (global, filtered to the sandbox's cgroup) covers every other family.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::bpf_get_current_cgroup_id,
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
};
use gateway_common::{Hook, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::event::{Target, config, emit};

const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const AF_PACKET: i32 = 17;
const SOCK_STREAM: i32 = 1;
const SOCK_DGRAM: i32 = 2;
const SOCK_RAW: i32 = 3;
const SOCK_TYPE_MASK: i32 = 0xf;
const NETLINK_ROUTE: i32 = 0;
const IPPROTO_ICMP: i32 = 1;
const IPPROTO_ICMPV6: i32 = 58;
const EPERM: i32 = 1;

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands cgroup_sock programs a valid bpf_sock.
    let (family, sock_type, protocol) = unsafe {
        let sk: &bpf_sock = &*ctx.sock;
        (sk.family as i32, sk.type_ as i32, sk.protocol as i32)
    };
    match verdict(family, sock_type, protocol) {
        None => 1,
        Some(reason) => {
            // SAFETY: helper without preconditions.
            let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
            let target = Target::socket(family as u32, sock_type as u32, protocol as u32);
            emit(Hook::SockCreate, reason, cgroup_id, &target);
            0
        }
    }
}

/// `int socket_create(int family, int type, int protocol, int kern)`
#[lsm(hook = "socket_create")]
pub fn socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return retval;
    }
    if kern != 0 {
        return 0;
    }
    let Some(cfg) = config() else {
        return 0;
    };
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if cgroup_id != cfg.cgroup_id {
        return 0;
    }
    let sock_type = sock_type & SOCK_TYPE_MASK;
    match verdict(family, sock_type, protocol) {
        None => 0,
        Some(reason) => {
            let target = Target::socket(family as u32, sock_type as u32, protocol as u32);
            emit(Hook::SockCreate, reason, cgroup_id, &target);
            -EPERM
        }
    }
}

/// `None` when the sandbox may create this socket, else why not.
#[inline(always)]
fn verdict(family: i32, sock_type: i32, protocol: i32) -> Option<Reason> {
    match family {
        AF_UNIX => None,
        AF_NETLINK if protocol == NETLINK_ROUTE => None,
        AF_INET | AF_INET6 => inet_verdict(sock_type, protocol),
        AF_PACKET => Some(Reason::PacketSocket),
        _ => Some(Reason::SocketFamily),
    }
}

#[inline(always)]
fn inet_verdict(sock_type: i32, protocol: i32) -> Option<Reason> {
    if sock_type == SOCK_RAW {
        return Some(Reason::RawSocket);
    }
    if protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 {
        return Some(Reason::IcmpSocket);
    }
    let ok = match sock_type {
        SOCK_STREAM => protocol == 0 || protocol == IPPROTO_TCP as i32,
        SOCK_DGRAM => protocol == 0 || protocol == IPPROTO_UDP as i32,
        _ => false,
    };
    if ok { None } else { Some(Reason::SocketProtocol) }
}
