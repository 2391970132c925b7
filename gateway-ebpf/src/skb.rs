//! The packet backstop: every packet a sandbox socket sends or receives, judged as it really
//! is on the wire, after anything that could have rerouted it since the connect hook.
//!
//! - Source routing (IPv4 options, IPv6 extension headers) re-routes a packet after connect4/6
//!   approved its destination: no IPv4 options, and IPv6 carries only TCP, UDP or ICMPv6.
//! - Peers: loopback or a `[[network.allow]]` entry (address, port and protocol).
//! - No inbound connections: an accepted connection never passes a connect hook, so the
//!   sandbox neither receives a SYN nor answers one; nor datagrams from the host's loopback
//!   but from a listed peer.
//! - Loopback addresses only on the loopback device: a socket bound to another device would
//!   take a destination the address hooks approved as loopback onto that device's wire.
//! - A SYN to the tunnel's address and port only where the gateway's own listener takes it:
//!   the connect hook checked that once, but a SYN is retried, and the gateway may die (and
//!   another process bind its port) between the check and the SYN.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use gateway_common::{Hook, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    event::{Target, Who, config, emit_as},
    listener::is_the_tunnel,
    net::{address_listed, allowed_by_policy, is_loopback, mapped},
};

const PASS: i32 = 1;
const DROP: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    judge(&ctx, Hook::SkbEgress).unwrap_or(DROP)
}

#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    judge(&ctx, Hook::SkbIngress).unwrap_or(DROP)
}

/// What the judgement needs from the IP header.
struct Packet {
    family: u32,
    /// The other end: destination on egress, source on ingress.
    peer: [u8; 16],
    protocol: u8,
    /// Offset of the TCP/UDP header, or None for a non-first fragment.
    l4: Option<usize>,
}

#[inline(always)]
fn judge(ctx: &SkBuffContext, hook: Hook) -> Result<i32, i64> {
    let egress = hook == Hook::SkbEgress;
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let packet = match ethertype {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(0)?;
            if version_ihl & 0x0f != 5 {
                return Ok(refuse(ctx, hook, Reason::IpOptions, AF_INET, [0; 16], 0, 0));
            }
            let frag: u16 = u16::from_be(ctx.load(6)?);
            let peer: [u8; 4] = ctx.load(if egress { 16 } else { 12 })?;
            Packet {
                family: AF_INET,
                peer: mapped(peer),
                protocol: ctx.load(9)?,
                l4: if frag & 0x1fff == 0 { Some(20) } else { None },
            }
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(6)?;
            let peer: [u8; 16] = ctx.load(if egress { 24 } else { 8 })?;
            if next != IPPROTO_TCP && next != IPPROTO_UDP && next != IPPROTO_ICMPV6 {
                return Ok(refuse(
                    ctx,
                    hook,
                    Reason::Ipv6ExtensionHeader,
                    AF_INET6,
                    peer,
                    0,
                    next,
                ));
            }
            Packet {
                family: AF_INET6,
                peer,
                protocol: next,
                l4: Some(40),
            }
        }
        _ => return Ok(DROP),
    };

    let mut port = 0u16;
    if let Some(l4) = packet.l4
        && (packet.protocol == IPPROTO_TCP || packet.protocol == IPPROTO_UDP)
    {
        let ports: [u8; 4] = ctx.load(l4)?;
        port = if egress {
            u16::from_be_bytes([ports[2], ports[3]])
        } else {
            u16::from_be_bytes([ports[0], ports[1]])
        };
        if packet.protocol == IPPROTO_TCP {
            let flags: u8 = ctx.load(l4 + 13)?;
            let syn = flags & TCP_SYN != 0;
            let ack = flags & TCP_ACK != 0;
            if syn && (ack == egress) {
                return Ok(refuse(
                    ctx,
                    hook,
                    Reason::InboundConnection,
                    packet.family,
                    packet.peer,
                    port,
                    packet.protocol,
                ));
            }
            // Only a connection's SYN pays for the listener lookup, and only toward the tunnel.
            if syn
                && egress
                && let Some(cfg) = config()
                && port == cfg.tunnel_port
                && packet.peer == cfg.tunnel_addr
                && !is_the_tunnel(ctx.skb.skb.cast(), cfg)
            {
                return Ok(refuse(
                    ctx,
                    hook,
                    Reason::NotTheTunnel,
                    packet.family,
                    packet.peer,
                    port,
                    packet.protocol,
                ));
            }
        }
    }

    if is_loopback(&packet.peer) {
        // SAFETY: the kernel hands cgroup_skb programs a valid __sk_buff.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if ifindex != LOOPBACK_IFINDEX {
            // The address hooks approved a loopback destination, and the socket was then
            // bound to a device (SO_BINDTODEVICE, IP_UNICAST_IF, IP_PKTINFO): the kernel
            // would put it on that device's wire, to whoever answers for 127.0.0.1 there.
            return Ok(refuse(
                ctx,
                hook,
                Reason::LoopbackOffLoopback,
                packet.family,
                packet.peer,
                port,
                packet.protocol,
            ));
        }
        // TCP from loopback belongs to a connection a connect hook approved (an inbound SYN
        // was refused above). A datagram reaches a bound socket with no such approval: from
        // the host's loopback only a listed peer may send one.
        if egress || packet.protocol != IPPROTO_UDP {
            return Ok(PASS);
        }
    }
    let listed = match packet.l4 {
        Some(_) => allowed_by_policy(&packet.peer, port, packet.protocol as u32),
        // Later fragments carry no ports; the first one was judged with them.
        None => address_listed(&packet.peer),
    };
    if listed {
        return Ok(PASS);
    }
    Ok(refuse(
        ctx,
        hook,
        Reason::NotAllowlisted,
        packet.family,
        packet.peer,
        port,
        packet.protocol,
    ))
}

#[inline(always)]
fn refuse(
    ctx: &SkBuffContext,
    hook: Hook,
    reason: Reason,
    family: u32,
    peer: [u8; 16],
    port: u16,
    protocol: u8,
) -> i32 {
    let mut target = Target::socket(family, 0, protocol as u32);
    target.addr = peer;
    target.port = port as u32;
    // Packet hooks may run in softirq context: only the socket's owner is known.
    emit_as(
        &Who::socket_owner(ctx.get_socket_uid()),
        hook,
        reason,
        0,
        &target,
    );
    DROP
}
