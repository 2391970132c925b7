//! The policy compiled into the programs' maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
};
use gateway_common::{
    IPPROTO_TCP, IPPROTO_UDP, MAX_PORT_RULES, PortRule, PortRules, SandboxConfig, UNIX_PATH_MAX,
    UnixPath,
};
use ipnet::IpNet;

use super::{KernelError, Target};
use crate::policy::{NetRule, Protocol, UnixRule};

pub(super) fn fill(ebpf: &mut Ebpf, target: &Target<'_>) -> Result<(), KernelError> {
    let map_err = |map| move |source| KernelError::Map { map, source };

    let mut config: Array<_, SandboxConfig> = ebpf
        .map_mut("CONFIG")
        .ok_or_else(|| super::missing("CONFIG"))?
        .try_into()
        .map_err(map_err("CONFIG"))?;
    let cfg = SandboxConfig {
        cgroup_id: target.cgroup_id,
        tunnel_addr: mapped(target.tunnel.ip()).octets(),
        tunnel_port: target.tunnel.port(),
        _pad: [0; 6],
    };
    config.set(0, cfg, 0).map_err(map_err("CONFIG"))?;

    let mut net: LpmTrie<_, [u8; 16], PortRules> = ebpf
        .map_mut("NET_ALLOW")
        .ok_or_else(|| super::missing("NET_ALLOW"))?
        .try_into()
        .map_err(map_err("NET_ALLOW"))?;
    for (prefix_len, addr, rules) in compile_net_allow(&target.policy.network)? {
        net.insert(&Key::new(prefix_len, addr), rules, 0)
            .map_err(map_err("NET_ALLOW"))?;
    }

    let mut unix: HashMap<_, UnixPath, u8> = ebpf
        .map_mut("UNIX_ALLOW")
        .ok_or_else(|| super::missing("UNIX_ALLOW"))?
        .try_into()
        .map_err(map_err("UNIX_ALLOW"))?;
    for rule in &target.policy.unix {
        unix.insert(unix_key(rule), 1, 0)
            .map_err(map_err("UNIX_ALLOW"))?;
    }
    Ok(())
}

/// `sun_path` as the unix programs see it: a path up to its NUL, an abstract name after its
/// leading NUL, zero-padded.
fn unix_key(rule: &UnixRule) -> UnixPath {
    let mut key = UnixPath {
        bytes: [0; UNIX_PATH_MAX],
        _pad: [0; 4],
    };
    let raw: Vec<u8> = match rule {
        UnixRule::Path(p) => p.as_os_str().as_encoded_bytes().to_vec(),
        UnixRule::Abstract(name) => std::iter::once(0).chain(name.iter().copied()).collect(),
    };
    let n = raw.len().min(UNIX_PATH_MAX);
    key.bytes[..n].copy_from_slice(&raw[..n]);
    key
}

/// IPv4 as `::ffff:a.b.c.d`, the one form the programs compare.
fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn net_key(net: &IpNet) -> (u32, [u8; 16]) {
    match net {
        IpNet::V4(n) => (
            u32::from(n.prefix_len()) + 96,
            n.network().to_ipv6_mapped().octets(),
        ),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
    }
}

/// (prefix length, address) as the LPM trie keys it.
type LpmKey = (u32, [u8; 16]);
/// (protocol, first port, last port)
type RuleTuple = (u8, u16, u16);

/// LPM entries for `[[network.allow]]`. The kernel returns only the longest matching prefix,
/// so each entry also carries the rules of every shorter prefix that covers it.
pub fn compile_net_allow(
    rules: &[NetRule],
) -> Result<Vec<(u32, [u8; 16], PortRules)>, KernelError> {
    let mut own: BTreeMap<LpmKey, BTreeSet<RuleTuple>> = BTreeMap::new();
    for rule in rules {
        let proto = match rule.protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        };
        let set = own.entry(net_key(&rule.cidr)).or_default();
        for p in &rule.ports {
            set.insert((proto, p.first, p.last));
        }
    }
    let mut out = Vec::with_capacity(own.len());
    for &(len, addr) in own.keys() {
        let mut merged = BTreeSet::new();
        for shorter in 0..=len {
            if let Some(set) = own.get(&(shorter, truncate(addr, shorter))) {
                merged.extend(set.iter().copied());
            }
        }
        if merged.len() > MAX_PORT_RULES {
            return Err(KernelError::Policy(format!(
                "[[network.allow]]: the addresses of {} are covered by {} port rules; \
                 at most {MAX_PORT_RULES} may apply to one address",
                Ipv6Addr::from(addr),
                merged.len()
            )));
        }
        let mut value = PortRules::default();
        for (i, (protocol, first, last)) in merged.into_iter().enumerate() {
            value.rules[i] = PortRule {
                first,
                last,
                protocol,
                _pad: [0; 3],
            };
            value.count = i as u32 + 1;
        }
        out.push((len, addr, value));
    }
    Ok(out)
}

fn truncate(addr: [u8; 16], bits: u32) -> [u8; 16] {
    let v = u128::from_be_bytes(addr);
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    (v & mask).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PortRange;

    fn rule(cidr: &str, port: u16, protocol: Protocol) -> NetRule {
        NetRule {
            cidr: cidr.parse().unwrap(),
            ports: vec![PortRange::single(port)],
            protocol,
        }
    }

    #[test]
    fn longer_prefix_inherits_covering_rules() {
        let entries = compile_net_allow(&[
            rule("10.0.0.0/8", 22, Protocol::Tcp),
            rule("10.1.0.0/16", 53, Protocol::Udp),
            rule("192.168.0.0/16", 80, Protocol::Tcp),
        ])
        .unwrap();
        let find = |len| entries.iter().find(|e| e.0 == len).unwrap();
        let (_, _, narrow) = find(96 + 16);
        let got: Vec<_> = narrow.rules[..narrow.count as usize]
            .iter()
            .map(|r| (r.protocol, r.first))
            .collect();
        assert!(got.contains(&(IPPROTO_TCP, 22)) && got.contains(&(IPPROTO_UDP, 53)));
        assert_eq!(got.len(), 2, "192.168/16 must not leak into 10.1/16");
    }

    #[test]
    fn ipv4_is_stored_mapped() {
        let entries = compile_net_allow(&[rule("127.0.0.1/32", 5432, Protocol::Tcp)]).unwrap();
        assert_eq!(entries[0].0, 128);
        assert_eq!(
            Ipv6Addr::from(entries[0].1),
            "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn too_many_rules_for_one_address_is_an_error() {
        let rules: Vec<_> = (1..=17)
            .map(|p| rule("10.0.0.0/8", p, Protocol::Tcp))
            .collect();
        assert!(compile_net_allow(&rules).is_err());
    }
}
