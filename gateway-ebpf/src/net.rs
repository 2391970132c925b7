//! connect4/6 and sendmsg4/6 on the sandbox cgroup: the tunnel and `[[network.allow]]` only.
//! "The tunnel" is its address and port taken by the gateway's own listener: once the gateway
//! is gone, whatever else binds that port is refused (`listener.rs`).

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid},
    macros::{cgroup_sock_addr, map},
    maps::{LpmTrie, lpm_trie::Key},
    programs::SockAddrContext,
};
use gateway_common::{
    ANY_UID, Hook, IPPROTO_TCP, MAX_PORT_RULES, NET_ALLOW_ENTRIES, PortRules, Reason,
};

use crate::{
    event::{Target, active, config, emit},
    listener::is_the_tunnel,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const ALLOW: i32 = 1;
const DENY: i32 = 0;

/// `[[network.allow]]`, keyed by IPv6 (IPv4 as `::ffff:a.b.c.d`, prefix + 96), twice: the
/// one `ACTIVE` names is in force, the other is where a reload writes the next policy.
#[map]
static NET_ALLOW_0: LpmTrie<[u8; 16], PortRules> = LpmTrie::with_max_entries(NET_ALLOW_ENTRIES, 0);
#[map]
static NET_ALLOW_1: LpmTrie<[u8; 16], PortRules> = LpmTrie::with_max_entries(NET_ALLOW_ENTRIES, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    judge4(&ctx, Hook::Connect4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    judge4(&ctx, Hook::Sendmsg4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    judge6(&ctx, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    judge6(&ctx, Hook::Sendmsg6)
}

/// Listening is for loopback only: a socket bound to a wildcard or external address could
/// take connections from other hosts.
#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    let (addr, port, protocol) = addr4(&ctx);
    judge_bind(Hook::Bind4, AF_INET, addr, port, protocol)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    let (addr, port, protocol) = addr6(&ctx);
    judge_bind(Hook::Bind6, AF_INET6, addr, port, protocol)
}

#[inline(always)]
fn judge_bind(hook: Hook, family: u32, addr: [u8; 16], port: u16, protocol: u32) -> i32 {
    if is_loopback(&addr) {
        return ALLOW;
    }
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let mut target = Target::socket(family, 0, protocol);
    target.port = port as u32;
    target.addr = addr;
    emit(hook, Reason::BindNotLoopback, cgroup_id, &target);
    DENY
}

/// `::` or `::ffff:0.0.0.0`.
#[inline(always)]
fn is_unspecified(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    let mapped = addr[10] == 0xff && addr[11] == 0xff;
    let zero_head = addr[10] == 0 && addr[11] == 0;
    (mapped || zero_head) && addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0
}

/// 127.0.0.0/8 (as `::ffff:127.x.y.z`) or `::1`.
#[inline(always)]
pub fn is_loopback(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    let mut zero_head = true;
    while i < 10 {
        if addr[i] != 0 {
            zero_head = false;
        }
        i += 1;
    }
    if !zero_head {
        return false;
    }
    let mapped_v4 = addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127;
    let v6_one = addr[10] == 0
        && addr[11] == 0
        && addr[12] == 0
        && addr[13] == 0
        && addr[14] == 0
        && addr[15] == 1;
    mapped_v4 || v6_one
}

/// IPv4 as `::ffff:a.b.c.d` from four bytes in network order.
#[inline(always)]
pub fn mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12] = v4[0];
    addr[13] = v4[1];
    addr[14] = v4[2];
    addr[15] = v4[3];
    addr
}

#[inline(always)]
fn judge4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let (addr, port, protocol) = addr4(ctx);
    judge(ctx, hook, AF_INET, addr, port, protocol)
}

#[inline(always)]
fn addr4(ctx: &SockAddrContext) -> ([u8; 16], u16, u32) {
    // SAFETY: the kernel hands sock_addr programs a valid bpf_sock_addr.
    let (ip, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.protocol)
    };
    (mapped(ip.to_ne_bytes()), port_of(port), protocol)
}

#[inline(always)]
fn judge6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let (addr, port, protocol) = addr6(ctx);
    // A v4-mapped address is judged as the IPv4 address it is: the map and the tunnel
    // address use the same mapped form, so the lookup below is already the IPv4 verdict.
    judge(ctx, hook, AF_INET6, addr, port, protocol)
}

#[inline(always)]
fn addr6(ctx: &SockAddrContext) -> ([u8; 16], u16, u32) {
    // SAFETY: as in judge4; user_ip6 is read word by word as the verifier requires.
    let (w, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
            sa.user_port,
            sa.protocol,
        )
    };
    (ip6(w), port_of(port), protocol)
}

/// An IPv6 address from the four 32-bit words the kernel hands programs (network order).
#[inline(always)]
pub(crate) fn ip6(w: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    addr
}

#[inline(always)]
fn port_of(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn judge(
    ctx: &SockAddrContext,
    hook: Hook,
    family: u32,
    addr: [u8; 16],
    port: u16,
    protocol: u32,
) -> i32 {
    let Some(cfg) = config() else {
        return DENY;
    };
    let to_tunnel_port = protocol == IPPROTO_TCP as u32 && port == cfg.tunnel_port;
    // 0.0.0.0 and :: reach the loopback address: judged as the tunnel for who may connect,
    // whatever `[[network.allow]]` says of them.
    let wrong_user = to_tunnel_port
        && (addr == cfg.tunnel_addr || is_unspecified(&addr))
        && cfg.tunnel_uid != ANY_UID
        && bpf_get_current_uid_gid() as u32 != cfg.tunnel_uid;
    let refused = if wrong_user {
        Some(Reason::NotTheSandboxUser)
    } else if to_tunnel_port && addr == cfg.tunnel_addr {
        if is_the_tunnel(ctx.sock_addr.cast(), cfg) {
            return ALLOW;
        }
        Some(Reason::NotTheTunnel)
    } else {
        None
    };
    if let Some(reason) = refused {
        // SAFETY: helper without preconditions.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        let mut target = Target::socket(family, 0, protocol);
        target.port = port as u32;
        target.addr = addr;
        emit(hook, reason, cgroup_id, &target);
        return DENY;
    }
    if allowed_by_policy(&addr, port, protocol) {
        return ALLOW;
    }
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let mut target = Target::socket(family, 0, protocol);
    target.port = port as u32;
    target.addr = addr;
    emit(hook, Reason::NotAllowlisted, cgroup_id, &target);
    DENY
}

/// The entries of the `[[network.allow]]` entry in force that covers `addr`.
#[inline(always)]
fn lookup(addr: &[u8; 16]) -> Option<&'static PortRules> {
    let key = Key::new(128, *addr);
    match active()? {
        0 => NET_ALLOW_0.get(key),
        1 => NET_ALLOW_1.get(key),
        _ => None,
    }
}

/// Does a `[[network.allow]]` entry cover this address, port and protocol?
#[inline(always)]
pub fn allowed_by_policy(addr: &[u8; 16], port: u16, protocol: u32) -> bool {
    let Some(rules) = lookup(addr) else {
        return false;
    };
    let count = rules.count as usize;
    let mut i = 0;
    while i < MAX_PORT_RULES {
        if i >= count {
            break;
        }
        let r = &rules.rules[i];
        if r.protocol as u32 == protocol && r.first <= port && port <= r.last {
            return true;
        }
        i += 1;
    }
    false
}

/// Does any `[[network.allow]]` entry cover this address, whatever the port?
#[inline(always)]
pub fn address_listed(addr: &[u8; 16]) -> bool {
    lookup(addr).is_some_and(|rules| rules.count > 0)
}
