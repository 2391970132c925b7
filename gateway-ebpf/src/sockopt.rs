//! Socket options the sandbox may not set:
//!
//! - multicast group membership. Joining a group (or changing its source filter) makes the
//!   kernel send IGMP or MLD reports that name the group and its sources, addresses the
//!   sandbox chooses, out of the interface it names; the kernel sends them itself, so no
//!   packet hook ever judges them.
//! - the ICMP error queue. With IP_RECVERR or IPV6_RECVERR (or their RFC 4884 forms) a
//!   socket reads ICMP errors through MSG_ERRQUEUE: what they quote, from any host that
//!   sends one. An ICMP error is no packet of the socket's, so the `cgroup_skb` ingress
//!   program never judges it.

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id, macros::cgroup_sockopt, programs::SockoptContext,
};
use gateway_common::{Hook, Reason};

use crate::event::{Target, emit};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// IP_ADD_MEMBERSHIP (35) through MCAST_MSFILTER (48): every IPv4 membership and source
/// filter option, and the protocol-independent MCAST_* ones.
const IP_MEMBERSHIP: core::ops::RangeInclusive<i32> = 35..=48;
const IPV6_ADD_MEMBERSHIP: i32 = 20;
const IPV6_DROP_MEMBERSHIP: i32 = 21;
/// Anycast joins solicited-node multicast groups, announced by MLD the same way.
const IPV6_JOIN_ANYCAST: i32 = 27;
const IPV6_LEAVE_ANYCAST: i32 = 28;
/// MCAST_JOIN_GROUP (42) through MCAST_MSFILTER (48) at the IPv6 level.
const MCAST: core::ops::RangeInclusive<i32> = 42..=48;
const IP_RECVERR: i32 = 11;
const IP_RECVERR_RFC4884: i32 = 26;
const IPV6_RECVERR: i32 = 25;
const IPV6_RECVERR_RFC4884: i32 = 31;

#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands sockopt programs a valid bpf_sockopt.
    let (level, optname) = unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) };
    let Some(reason) = refused(level, optname) else {
        return 1;
    };
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // The option is recorded as level and name (the record's `proto`).
    let target = Target::socket(0, level as u32, optname as u32);
    emit(Hook::Setsockopt, reason, cgroup_id, &target);
    0
}

#[inline(always)]
fn refused(level: i32, optname: i32) -> Option<Reason> {
    match level {
        SOL_IP if IP_MEMBERSHIP.contains(&optname) => Some(Reason::MulticastMembership),
        SOL_IP if matches!(optname, IP_RECVERR | IP_RECVERR_RFC4884) => {
            Some(Reason::IcmpErrorQueue)
        }
        SOL_IPV6
            if matches!(
                optname,
                IPV6_ADD_MEMBERSHIP | IPV6_DROP_MEMBERSHIP | IPV6_JOIN_ANYCAST | IPV6_LEAVE_ANYCAST
            ) || MCAST.contains(&optname) =>
        {
            Some(Reason::MulticastMembership)
        }
        SOL_IPV6 if matches!(optname, IPV6_RECVERR | IPV6_RECVERR_RFC4884) => {
            Some(Reason::IcmpErrorQueue)
        }
        _ => None,
    }
}
