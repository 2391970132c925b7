//! Addresses an upstream may not resolve to unless its rule says `private = true`: a name
//! that is allowed must not become a way into the host, the LAN or the cloud's metadata.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// True for everything that is not a plain public unicast address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => private_v4(v4),
        IpAddr::V6(v6) => private_v6(v6),
    }
}

/// Link-local addresses, where clouds serve instance metadata and its credentials
/// (169.254.169.254, fd00:ec2::254), in every IPv6 form that reaches them. Learn mode, which
/// lets through what no rule allows, still never dials these.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            (seg[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || embedded_v4(v6).is_some_and(|v4| v4.is_link_local())
        }
    }
}

/// The IPv4 address an IPv6 one stands for: mapped, compatible, SIIT-translated
/// (`::ffff:0:a.b.c.d`), NAT64 (well-known and local-use `64:ff9b:1::/48` prefixes, as /96)
/// or 6to4.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let o = ip.octets();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let nat64 = seg[0] == 0x64 && seg[1] == 0xff9b && seg[3..6] == [0; 3] && seg[2] <= 1;
    if seg[..6] == [0, 0, 0, 0, 0, 0] || seg[..6] == [0, 0, 0, 0, 0xffff, 0] || nat64 {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    (seg[0] == 0x2002).then(|| Ipv4Addr::new(o[2], o[3], o[4], o[5]))
}

fn private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_unspecified()
        || a == 0
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254.0.0/16, the cloud metadata address among them
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || ip.is_broadcast()
        || ip.is_multicast()
        || a >= 240
        || ip.is_documentation()
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
}

fn private_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        // A mapped address reaches the IPv4 host it names: judge it as that.
        return private_v4(v4);
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7 (fd00:ec2::254 is metadata)
        || (seg[0] & 0xffc0) == 0xfe80 // link-local
        || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some)
        || (seg[0] == 0x64 && seg[1] == 0xff9b) // NAT64 embeds an IPv4 address
        || seg[0] == 0x2002 // 6to4 embeds an IPv4 address
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x2001 && seg[1] == 0) // Teredo embeds an IPv4 address
        || seg[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated)
        || seg[..6] == [0, 0, 0, 0, 0xffff, 0] // SIIT-translated, where a translator exists
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> bool {
        is_private(s.parse().unwrap())
    }

    #[test]
    fn link_local_in_every_form() {
        let ll = |s: &str| is_link_local(s.parse().unwrap());
        for s in [
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "::ffff:0:169.254.169.254",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(ll(s), "{s} is link-local");
        }
        for s in [
            "127.0.0.1",
            "10.0.0.1",
            "::1",
            "fd00::1",
            "2002:7f00:1::1",
            "8.8.8.8",
        ] {
            assert!(!ll(s), "{s} is not link-local");
        }
    }

    #[test]
    fn private_ranges() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "::127.0.0.1",
            "::ffff:0:8.8.8.8",
            "64:ff9b:1::808:808",
        ] {
            assert!(p(s), "{s} must count as private");
        }
        for s in [
            "8.8.8.8",
            "140.82.112.3",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!p(s), "{s} is public");
        }
    }
}
