//! CMD's stdin, stdout and stderr: the only descriptors it inherits from outside. The cgroup
//! programs judge a socket by the cgroup that created it, so a network socket made outside
//! and handed in as one of them would carry whatever CMD sends, wherever it points, with no
//! hook asked and nothing recorded. `run` refuses to start with one. Connected unix stream
//! sockets pass: they are how systemd gives a service its journal, and their one peer was
//! chosen by whoever started the gateway, not by CMD; a unix datagram socket (which sends
//! to any path), a listening one, or one not connected yet (CMD could connect it anywhere)
//! does not.

use std::{io, os::fd::RawFd};

const STDIO: [(RawFd, &str); 3] = [(0, "stdin"), (1, "stdout"), (2, "stderr")];

/// One of fds 0-2 is a socket of another family than unix.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} (fd {fd}) is a {kind} socket ({family}): the sandbox's programs judge a socket by \
     the cgroup that made it, so CMD could send through this one unchecked and unrecorded; \
     give the command a pipe, a file or a terminal instead (for example `PRODUCER | gateway \
     run ...`, `gateway run ... > FILE`, or `gateway run ... | CONSUMER`)"
)]
pub struct StdioSocket {
    /// `stdin`, `stdout` or `stderr`.
    pub name: &'static str,
    pub fd: RawFd,
    /// `TCP`, `UDP`, or the socket type when the protocol is another.
    pub kind: String,
    /// `AF_INET`, `AF_INET6`, ...
    pub family: String,
}

/// Refuses a network socket, a unix datagram socket or a listening one as stdin, stdout or
/// stderr; a closed descriptor, a file, a pipe, a terminal or a connected unix stream is fine.
pub fn check() -> Result<(), StdioSocket> {
    for (fd, name) in STDIO {
        // Not a socket (or closed): nothing to judge. SO_DOMAIN fails with ENOTSOCK.
        let Ok(family) = int_option(fd, libc::SO_DOMAIN) else {
            continue;
        };
        if family == libc::AF_UNIX {
            // A connected stream (the journal's) reaches its one peer. A datagram socket
            // takes any path `sendto` names, connected or not, and a listening one takes
            // connections from anyone: neither is judged by the sandbox's programs.
            // One not connected yet CMD could connect to any path itself.
            let sock_type = int_option(fd, libc::SO_TYPE).unwrap_or(-1);
            let listening = int_option(fd, libc::SO_ACCEPTCONN).unwrap_or(0) != 0;
            let kind = if sock_type == libc::SOCK_DGRAM {
                "datagram"
            } else if listening {
                "listening"
            } else if !connected(fd) {
                "unconnected"
            } else {
                continue;
            };
            return Err(StdioSocket {
                name,
                fd,
                kind: kind.into(),
                family: "AF_UNIX".into(),
            });
        }
        let protocol = int_option(fd, libc::SO_PROTOCOL).unwrap_or(-1);
        let sock_type = int_option(fd, libc::SO_TYPE).unwrap_or(-1);
        return Err(StdioSocket {
            name,
            fd,
            kind: kind(protocol, sock_type),
            family: family_name(family),
        });
    }
    Ok(())
}

/// Whether the socket has a peer (getpeername fails with ENOTCONN when not).
fn connected(fd: RawFd) -> bool {
    // SAFETY: sockaddr_storage is plain data, valid all zeroes.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into `addr`; a bad fd is an error.
    unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &raw mut len) == 0 }
}

/// An integer SOL_SOCKET option (nix 0.29 has no SO_DOMAIN or SO_PROTOCOL getter).
fn int_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`; a bad fd is an error.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn kind(protocol: libc::c_int, sock_type: libc::c_int) -> String {
    match (protocol, sock_type) {
        (libc::IPPROTO_TCP, _) => "TCP".into(),
        (libc::IPPROTO_UDP, _) => "UDP".into(),
        (libc::IPPROTO_UDPLITE, _) => "UDP-Lite".into(),
        (libc::IPPROTO_SCTP, _) => "SCTP".into(),
        (libc::IPPROTO_MPTCP, _) => "MPTCP".into(),
        (_, libc::SOCK_STREAM) => "stream".into(),
        (_, libc::SOCK_DGRAM) => "datagram".into(),
        (_, libc::SOCK_RAW) => "raw".into(),
        (_, libc::SOCK_SEQPACKET) => "seqpacket".into(),
        (p, t) => format!("type {t} protocol {p}"),
    }
}

fn family_name(family: libc::c_int) -> String {
    match family {
        libc::AF_INET => "AF_INET".into(),
        libc::AF_INET6 => "AF_INET6".into(),
        libc::AF_NETLINK => "AF_NETLINK".into(),
        libc::AF_PACKET => "AF_PACKET".into(),
        libc::AF_VSOCK => "AF_VSOCK".into(),
        libc::AF_TIPC => "AF_TIPC".into(),
        libc::AF_XDP => "AF_XDP".into(),
        f => format!("family {f}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn sockets_are_named_by_protocol_and_family() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = udp.as_raw_fd();
        assert_eq!(int_option(fd, libc::SO_DOMAIN).unwrap(), libc::AF_INET);
        let protocol = int_option(fd, libc::SO_PROTOCOL).unwrap();
        let sock_type = int_option(fd, libc::SO_TYPE).unwrap();
        assert_eq!(kind(protocol, sock_type), "UDP");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(
            int_option(a.as_raw_fd(), libc::SO_DOMAIN).unwrap(),
            libc::AF_UNIX
        );
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(int_option(file.as_raw_fd(), libc::SO_DOMAIN).is_err());
    }
}
