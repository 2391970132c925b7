//! Which sandbox a client connection of the tunnel came from, as the `tunnel_clients`
//! sock_ops program recorded it when the client connected.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use aya::{
    maps::{HashMap, MapData, MapError},
    sys::SyscallError,
};
use gateway_common::ClientKey;

/// The `TUNNEL_CLIENTS` map of one sandbox. Cheap to clone; clones share the map.
#[derive(Clone)]
pub struct TunnelClients {
    map: Arc<Mutex<HashMap<MapData, ClientKey, u64>>>,
}

impl TunnelClients {
    pub(super) fn new(map: HashMap<MapData, ClientKey, u64>) -> Self {
        Self {
            map: Arc::new(Mutex::new(map)),
        }
    }

    /// The cgroup id of the sandbox that made the connection whose client end is `peer`, or
    /// `None` when no sandbox made it. Each connection is claimed once: the entry is removed,
    /// so a second claim of the same peer gets `None`. A map error also gives `None` (the
    /// connection is refused), with a warning.
    pub fn claim(&self, peer: SocketAddr) -> Option<u64> {
        let key = key(peer);
        let mut map = match self.map.lock() {
            Ok(map) => map,
            // A panic elsewhere while holding the lock cannot leave the kernel map torn.
            Err(poisoned) => poisoned.into_inner(),
        };
        let cgroup_id = match map.get(&key, 0) {
            Ok(id) => id,
            Err(MapError::KeyNotFound) => return None,
            Err(e) => {
                tracing::warn!(%peer, "cannot look up the tunnel client: {}", describe(&e));
                return None;
            }
        };
        // Only the remover owns the claim: the kernel may have removed the entry meanwhile
        // (the client's socket closed).
        match map.remove(&key) {
            Ok(()) => Some(cgroup_id),
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                None
            }
            Err(e) => {
                tracing::warn!(%peer, "cannot remove the tunnel client: {}", describe(&e));
                None
            }
        }
    }
}

/// aya's syscall errors name the call but not the errno in their Display.
fn describe(e: &MapError) -> String {
    match e {
        MapError::SyscallError(SyscallError { call, io_error }) => format!("{call}: {io_error}"),
        e => e.to_string(),
    }
}

/// The key the kernel wrote: IPv4 as `::ffff:a.b.c.d`, port in host byte order.
fn key(peer: SocketAddr) -> ClientKey {
    let addr = match peer.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    ClientKey {
        addr: addr.octets(),
        port: peer.port(),
        _pad: [0; 6],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_mapped_ipv6_peers_give_the_same_key() {
        let v4 = key("127.0.0.1:40000".parse().unwrap());
        let mapped = key("[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(v4, mapped);
        assert_eq!(
            v4.addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]
        );
        assert_eq!(v4.port, 40000);
    }

    #[test]
    fn ipv6_peer_is_kept() {
        let k = key("[::1]:443".parse().unwrap());
        assert_eq!(k.addr, std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(k.port, 443);
    }
}
