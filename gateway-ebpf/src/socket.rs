//! Socket creation: TCP and UDP over inet/inet6; no raw, ICMP, SCTP or other protocols.
//!
//! The cgroup `sock_create` hook sees only inet/inet6 sockets; the sandbox's seccomp filter
//! refuses the other families before a socket exists.

use aya_ebpf::{
    bindings::bpf_sock, helpers::bpf_get_current_cgroup_id, macros::cgroup_sock,
    programs::SockContext,
};
use gateway_common::{Hook, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::event::{Target, emit};

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const SOCK_STREAM: i32 = 1;
const SOCK_DGRAM: i32 = 2;
const SOCK_RAW: i32 = 3;
const IPPROTO_ICMP: i32 = 1;
const IPPROTO_ICMPV6: i32 = 58;

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

/// `None` when the sandbox may create this socket, else why not.
#[inline(always)]
fn verdict(family: i32, sock_type: i32, protocol: i32) -> Option<Reason> {
    match family {
        AF_INET | AF_INET6 => inet_verdict(sock_type, protocol),
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
    if ok {
        None
    } else {
        Some(Reason::SocketProtocol)
    }
}
