//! The policy compiled into the programs' maps, and replaced in them without a gap.
//!
//! `[[network.allow]]` and `[[unix.allow]]` live in two buffers each (`NET_ALLOW_0/1`,
//! `UNIX_ALLOW_0/1`); the `ACTIVE` array names the one in force, and the programs read it
//! once per verdict. A new policy is written into the other buffer completely, then one
//! update of `ACTIVE` puts it in force, then the old buffer is emptied. At no moment do the
//! programs see an empty set, a half-written one, or the union of two policies.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, MapData, MapError, SkStorage, lpm_trie::Key,
    },
};
use gateway_common::{
    ANY_UID, IPPROTO_TCP, IPPROTO_UDP, MAX_PORT_RULES, NET_ALLOW_ENTRIES, PortRule, PortRules,
    SandboxConfig, UNIX_ALLOW_ENTRIES, UNIX_PATH_MAX, UnixPath,
};
use ipnet::IpNet;

use super::{KernelError, Target, batch};
use crate::policy::{NetRule, Policy, Protocol, UnixRule};

const NET_MAPS: [&str; 2] = ["NET_ALLOW_0", "NET_ALLOW_1"];
const UNIX_MAPS: [&str; 2] = ["UNIX_ALLOW_0", "UNIX_ALLOW_1"];

fn map_err(map: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError::Map { map, source }
}

fn batch_err(map: &'static str, e: std::io::Error) -> KernelError {
    KernelError::Raw(format!("writing the policy into the {map} map: {e}"))
}

/// Writes the sandbox's identity and the tunnel's address, and tags the tunnel's listener;
/// set once, never reloaded.
pub(super) fn configure(ebpf: &mut Ebpf, target: &Target<'_>) -> Result<(), KernelError> {
    let mut config: Array<_, SandboxConfig> = ebpf
        .map_mut("CONFIG")
        .ok_or_else(|| super::missing("CONFIG"))?
        .try_into()
        .map_err(map_err("CONFIG"))?;
    let cfg = SandboxConfig {
        cgroup_id: target.cgroup_id,
        tunnel_addr: mapped(target.tunnel.ip()).octets(),
        tunnel_port: target.tunnel.port(),
        _pad: [0; 2],
        tunnel_uid: target.tunnel_uid.unwrap_or(ANY_UID),
        tunnel_netns: own_netns_cookie()?,
    };
    config.set(0, cfg, 0).map_err(map_err("CONFIG"))?;
    // The tag the programs look for on the socket that would take a connection to the tunnel.
    // Only this process holds the map, and the tag goes when the socket closes.
    let mut listener: SkStorage<_, u32> = ebpf
        .map_mut("TUNNEL_LISTENER")
        .ok_or_else(|| super::missing("TUNNEL_LISTENER"))?
        .try_into()
        .map_err(map_err("TUNNEL_LISTENER"))?;
    listener
        .insert(&target.tunnel_listener, 1, 0)
        .map_err(map_err("TUNNEL_LISTENER"))
}

/// The cookie of the network namespace this process (and so the tunnel) is in.
fn own_netns_cookie() -> Result<u64, KernelError> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let probe = std::net::UdpSocket::bind(("127.0.0.1", 0))
        .map_err(|e| KernelError::Raw(format!("reading the network namespace cookie: {e}")))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`, a u64.
    let done = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&probe),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if done != 0 {
        return Err(KernelError::Raw(format!(
            "reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(cookie)
}

/// A policy's map entries, computed before any map is touched: a policy that does not fit is
/// refused while the one in force stays.
pub struct Compiled {
    net: Vec<(LpmKey, PortRules)>,
    unix: Vec<UnixPath>,
}

impl Compiled {
    pub fn new(policy: &Policy) -> Result<Self, KernelError> {
        let net: Vec<_> = compile_net_allow(&policy.network)?
            .into_iter()
            .map(|(len, addr, rules)| ((len, addr), rules))
            .collect();
        if net.len() > NET_ALLOW_ENTRIES as usize {
            return Err(KernelError::Policy(format!(
                "[[network.allow]]: {} distinct CIDRs; the kernel map holds at most \
                 {NET_ALLOW_ENTRIES}",
                net.len()
            )));
        }
        let unix: BTreeSet<_> = policy.unix.iter().map(|r| unix_key(r).bytes).collect();
        if unix.len() > UNIX_ALLOW_ENTRIES as usize {
            return Err(KernelError::Policy(format!(
                "[[unix.allow]]: {} sockets; the kernel map holds at most {UNIX_ALLOW_ENTRIES}",
                unix.len()
            )));
        }
        let unix = unix
            .into_iter()
            .map(|bytes| UnixPath {
                bytes,
                _pad: [0; 4],
            })
            .collect();
        Ok(Self { net, unix })
    }
}

/// The two buffers of each policy map and the switch between them.
pub struct PolicyMaps {
    net: [LpmTrie<MapData, [u8; 16], PortRules>; 2],
    unix: [HashMap<MapData, UnixPath, u8>; 2],
    active: Array<MapData, u32>,
    /// The buffer `ACTIVE` names.
    in_force: usize,
    /// What was written to each buffer, so emptying one deletes by key.
    written: [Written; 2],
}

#[derive(Default)]
struct Written {
    net: Vec<LpmKey>,
    unix: Vec<UnixPath>,
}

impl PolicyMaps {
    /// Takes the maps out of `ebpf`; every program that reads them must be loaded by now.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| super::missing(name))
                .map(|m| (name, m))
        };
        let net = |(name, m)| LpmTrie::try_from(m).map_err(map_err(name));
        let unix = |(name, m)| HashMap::try_from(m).map_err(map_err(name));
        let net = [net(take(NET_MAPS[0])?)?, net(take(NET_MAPS[1])?)?];
        let unix = [unix(take(UNIX_MAPS[0])?)?, unix(take(UNIX_MAPS[1])?)?];
        let (_, active) = take("ACTIVE")?;
        let active: Array<_, u32> = Array::try_from(active).map_err(map_err("ACTIVE"))?;
        let in_force = match active.get(&0, 0).map_err(map_err("ACTIVE"))? {
            0 => 0,
            1 => 1,
            other => {
                return Err(KernelError::Policy(format!(
                    "the ACTIVE map holds {other}, not a policy buffer"
                )));
            }
        };
        Ok(Self {
            net,
            unix,
            active,
            in_force,
            written: Default::default(),
        })
    }

    /// Puts `compiled` in force: [`PolicyMaps::fill_spare`], then [`PolicyMaps::switch`].
    pub fn replace(&mut self, compiled: &Compiled) -> Result<(), KernelError> {
        self.fill_spare(compiled)?;
        self.switch()
    }

    /// Writes `compiled` into the buffer not in force; the programs do not see it yet. On an
    /// error the spare buffer is emptied again.
    pub fn fill_spare(&mut self, compiled: &Compiled) -> Result<(), KernelError> {
        let spare = 1 - self.in_force;
        // Normally empty already; a failed clear of an earlier reload may have left entries.
        self.clear(spare)?;
        let filled = self.fill(spare, compiled);
        if filled.is_err() {
            self.abandon_spare();
        }
        filled
    }

    /// Puts the spare buffer in force with one update of `ACTIVE`. The buffer that was in
    /// force keeps its entries until [`PolicyMaps::clear_retired`].
    pub fn switch(&mut self) -> Result<(), KernelError> {
        let spare = 1 - self.in_force;
        if let Err(e) = self
            .active
            .set(0, spare as u32, 0)
            .map_err(map_err("ACTIVE"))
        {
            self.abandon_spare();
            return Err(e);
        }
        self.in_force = spare;
        Ok(())
    }

    /// Empties the spare buffer of a reload that will not happen.
    pub fn abandon_spare(&mut self) {
        if let Err(e) = self.clear(1 - self.in_force) {
            tracing::warn!("emptying the unused policy buffer: {e}");
        }
    }

    /// Empties the buffer that was in force before the last [`PolicyMaps::replace`]. A program
    /// that read `ACTIVE` just before the switch may still be looking it up: it finds a subset
    /// of the old policy, so it can only refuse more, never allow more.
    pub fn clear_retired(&mut self) -> Result<(), KernelError> {
        self.clear(1 - self.in_force)
    }

    fn fill(&mut self, buffer: usize, compiled: &Compiled) -> Result<(), KernelError> {
        let written = &mut self.written[buffer];
        // Recorded before the write: whatever part of it lands, emptying finds it by key.
        written.net.extend(compiled.net.iter().map(|(key, _)| *key));
        let (keys, values): (Vec<_>, Vec<_>) = compiled
            .net
            .iter()
            .map(|&((len, addr), rules)| (Key::new(len, addr), rules))
            .unzip();
        batch::update(self.net[buffer].map(), &keys, &values)
            .map_err(|e| batch_err(NET_MAPS[buffer], e))?;
        written.unix.extend(compiled.unix.iter().copied());
        let ones = vec![1u8; compiled.unix.len()];
        batch::update(self.unix[buffer].map(), &compiled.unix, &ones)
            .map_err(|e| batch_err(UNIX_MAPS[buffer], e))?;
        Ok(())
    }

    fn clear(&mut self, buffer: usize) -> Result<(), KernelError> {
        let written = std::mem::take(&mut self.written[buffer]);
        let net = &mut self.net[buffer];
        let keys: Vec<Key<[u8; 16]>> = written
            .net
            .iter()
            .map(|&(len, addr)| Key::new(len, addr))
            .collect();
        // In batches while every key is there; from the first one that is not, one by one.
        let deleted = match batch::delete(net.map(), &keys) {
            Ok(()) => keys.len(),
            Err((n, _)) => n,
        };
        for (len, addr) in written.net.into_iter().skip(deleted) {
            match net.remove(&Key::new(len, addr)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(NET_MAPS[buffer])(e)),
            }
        }
        // The buffer must end empty, whatever the bookkeeping says.
        let stray: Vec<Key<[u8; 16]>> = net
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(NET_MAPS[buffer]))?;
        for key in stray {
            net.remove(&key).map_err(map_err(NET_MAPS[buffer]))?;
        }
        let unix = &mut self.unix[buffer];
        let deleted = match batch::delete(unix.map(), &written.unix) {
            Ok(()) => written.unix.len(),
            Err((n, _)) => n,
        };
        for key in written.unix.into_iter().skip(deleted) {
            match unix.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(UNIX_MAPS[buffer])(e)),
            }
        }
        let stray: Vec<UnixPath> = unix
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(UNIX_MAPS[buffer]))?;
        for key in stray {
            unix.remove(&key).map_err(map_err(UNIX_MAPS[buffer]))?;
        }
        Ok(())
    }
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
    // Only lengths that occur can cover anything: a policy of many /32s folds in one step.
    let lengths: BTreeSet<u32> = own.keys().map(|&(len, _)| len).collect();
    let mut out = Vec::with_capacity(own.len());
    for &(len, addr) in own.keys() {
        let mut merged = BTreeSet::new();
        for &shorter in lengths.range(..=len) {
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
