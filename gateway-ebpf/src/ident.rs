//! Which sandbox made a TCP connection to the tunnel. A sock_ops program on the sandbox
//! cgroup records the client's source address and port when it connects to the tunnel;
//! the tunnel looks up the peer of each accepted connection and refuses any that no sandbox
//! made. The entry goes when the socket closes, so a host process that later gets the same
//! source address and port inherits nothing.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock_ops,
    },
    helpers::bpf_get_netns_cookie,
    macros::{map, sock_ops},
    maps::HashMap,
    programs::SockOpsContext,
};
use gateway_common::{ClientKey, SandboxConfig};

use crate::{
    event::config,
    net::{ip6, mapped},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// sock_ops must never interfere with the connection: every path returns this.
const CONTINUE: u32 = 1;

/// Client (source address, source port) -> cgroup id of the sandbox that connected.
///
/// A plain hash, not an LRU one: an entry must stay until the tunnel claims it or the
/// socket closes, and an LRU map may evict live entries before it is full (its free lists
/// are per CPU). Entries are removed deterministically (claim, TCP_CLOSE), so the map holds
/// only connections not yet accepted; if it is ever full the new connection is simply not
/// recorded and the tunnel refuses it (fail closed). The map belongs to one sandbox, which
/// can exhaust only its own.
#[map]
static TUNNEL_CLIENTS: HashMap<ClientKey, u64> = HashMap::with_max_entries(65_536, 0);

#[sock_ops]
pub fn tunnel_clients(ctx: SockOpsContext) -> u32 {
    // SAFETY: the kernel hands sock_ops programs a valid bpf_sock_ops.
    let op = unsafe { load(addr_of!((*ctx.ops).op)) };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_connect(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB {
        on_state(&ctx);
    }
    CONTINUE
}

/// The source port is assigned and the SYN not yet sent: record the client before the
/// tunnel can accept it.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let Some(cfg) = config() else {
        return;
    };
    let Some(key) = tunnel_client(ctx, cfg) else {
        return;
    };
    // The close callback first: an entry without it could outlive its socket.
    // SAFETY: as in tunnel_clients.
    let flags = unsafe { load(addr_of!((*ctx.ops).bpf_sock_ops_cb_flags)) };
    if ctx
        .set_cb_flags((flags | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        return;
    }
    let _ = TUNNEL_CLIENTS.insert(key, cfg.cgroup_id, 0);
}

/// A recorded socket reached TCP_CLOSE (reset, refused, timed out, or its full close):
/// forget it. Called while the socket still holds its addresses and port.
#[inline(always)]
fn on_state(ctx: &SockOpsContext) {
    // SAFETY: as in tunnel_clients; args[1] is the new state for BPF_SOCK_OPS_STATE_CB.
    let new_state = unsafe { load(addr_of!((*ctx.ops).__bindgen_anon_1.args[1])) };
    if new_state != BPF_TCP_CLOSE {
        return;
    }
    let Some(cfg) = config() else {
        return;
    };
    // Only a tunnel connection: another socket of the sandbox may share the source port
    // (toward another destination) and must not remove the tunnel client's entry.
    if let Some(key) = tunnel_client(ctx, cfg) {
        let _ = TUNNEL_CLIENTS.remove(key);
    }
}

/// The key of this socket if its destination is exactly the tunnel.
#[inline(always)]
fn tunnel_client(ctx: &SockOpsContext, cfg: &SandboxConfig) -> Option<ClientKey> {
    let ops = ctx.ops;
    // SAFETY: as in tunnel_clients.
    let (remote_port, local_port) = unsafe {
        (
            load(addr_of!((*ops).remote_port)),
            load(addr_of!((*ops).local_port)),
        )
    };
    // remote_port holds the port in network byte order in the high half (little endian
    // hosts) so that ntohl gives it; local_port is in host byte order.
    let remote_port = u32::from_be(remote_port) as u16;
    if remote_port != cfg.tunnel_port {
        return None;
    }
    let (local, remote) = endpoints(ops)?;
    if remote != cfg.tunnel_addr {
        return None;
    }
    // Only a socket in the tunnel's network namespace reaches the tunnel: in one of its own
    // a sandbox could connect to the same address and port (its own listener) and make an
    // entry for an outside process to connect as, or close one to drop another's entry.
    // SAFETY: the helper only reads the socket behind the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ops.cast()) };
    if netns != cfg.tunnel_netns {
        return None;
    }
    Some(ClientKey {
        addr: local,
        port: local_port as u16,
        _pad: [0; 6],
    })
}

/// (local, remote) addresses as IPv6, IPv4 as `::ffff:a.b.c.d`.
#[inline(always)]
fn endpoints(ops: *mut bpf_sock_ops) -> Option<([u8; 16], [u8; 16])> {
    // SAFETY: as in tunnel_clients.
    let family = unsafe { load(addr_of!((*ops).family)) };
    if family == AF_INET {
        return Some(endpoints4(ops));
    }
    if family != AF_INET6 {
        return None;
    }
    // SAFETY: as above; the ip6 fields are read word by word as the verifier requires.
    let remote = unsafe {
        ip6([
            load(addr_of!((*ops).remote_ip6[0])),
            load(addr_of!((*ops).remote_ip6[1])),
            load(addr_of!((*ops).remote_ip6[2])),
            load(addr_of!((*ops).remote_ip6[3])),
        ])
    };
    if is_v4_mapped(&remote) {
        // An AF_INET6 socket talking IPv4 is connected by tcp_v4_connect, and the IPv4
        // fields are that connection's addresses. (On 6.18 local_ip6 already holds the same
        // mapped source here; the IPv4 fields do not depend on that.)
        return Some(endpoints4(ops));
    }
    // SAFETY: as above.
    let local = unsafe {
        ip6([
            load(addr_of!((*ops).local_ip6[0])),
            load(addr_of!((*ops).local_ip6[1])),
            load(addr_of!((*ops).local_ip6[2])),
            load(addr_of!((*ops).local_ip6[3])),
        ])
    };
    Some((local, remote))
}

#[inline(always)]
fn endpoints4(ops: *mut bpf_sock_ops) -> ([u8; 16], [u8; 16]) {
    // SAFETY: as in tunnel_clients.
    let (local, remote) = unsafe {
        (
            load(addr_of!((*ops).local_ip4)),
            load(addr_of!((*ops).remote_ip4)),
        )
    };
    (mapped(local.to_ne_bytes()), mapped(remote.to_ne_bytes()))
}

#[inline(always)]
pub(crate) fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[10] == 0xff && addr[11] == 0xff
}

/// One 4-byte load of a context field: the verifier refuses wider or merged loads.
///
/// # Safety
/// `field` must point at a `u32` field of the program's `bpf_sock_ops`.
#[inline(always)]
unsafe fn load(field: *const u32) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { read_volatile(field) }
}
