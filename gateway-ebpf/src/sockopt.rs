//! Socket options: no multicast group membership. Joining a group (or changing its source
//! filter) makes the kernel send IGMP or MLD reports that name the group and its sources,
//! addresses the sandbox chooses, out of the interface it names; the kernel sends them
//! itself, so no packet hook ever judges them.

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

#[cgroup_sockopt(setsockopt)]
pub fn setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands sockopt programs a valid bpf_sockopt.
    let (level, optname) = unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) };
    if !is_membership(level, optname) {
        return 1;
    }
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // The option is recorded as level and name (the record's `proto`).
    let target = Target::socket(0, level as u32, optname as u32);
    emit(
        Hook::Setsockopt,
        Reason::MulticastMembership,
        cgroup_id,
        &target,
    );
    0
}

#[inline(always)]
fn is_membership(level: i32, optname: i32) -> bool {
    match level {
        SOL_IP => IP_MEMBERSHIP.contains(&optname),
        SOL_IPV6 => {
            matches!(
                optname,
                IPV6_ADD_MEMBERSHIP | IPV6_DROP_MEMBERSHIP | IPV6_JOIN_ANYCAST | IPV6_LEAVE_ANYCAST
            ) || MCAST.contains(&optname)
        }
        _ => false,
    }
}
