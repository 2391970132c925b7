//! Types that cross the kernel boundary, shared by `gateway-ebpf` and `gateway`.
//!
//! Every struct is `#[repr(C)]` with explicit padding so both sides agree on the layout.
#![no_std]

/// Most port rules one CIDR entry can carry; the policy compiler refuses more.
pub const MAX_PORT_RULES: usize = 16;
/// Capacity of each `NET_ALLOW_n` buffer (distinct CIDRs of `[[network.allow]]`).
pub const NET_ALLOW_ENTRIES: u32 = 131_072;
/// Capacity of each `UNIX_ALLOW_n` buffer (`[[unix.allow]]` sockets).
pub const UNIX_ALLOW_ENTRIES: u32 = 1024;
/// Length of `sun_path` in `struct sockaddr_un`.
pub const UNIX_PATH_MAX: usize = 108;
pub const COMM_LEN: usize = 16;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Which program refused: mirrors the `hook` field of a kernel audit record.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    SockCreate = 5,
    UnixConnect = 6,
    UnixSendmsg = 7,
    Bind4 = 8,
    Bind6 = 9,
    SkbEgress = 10,
    SkbIngress = 11,
    Setsockopt = 12,
}

impl Hook {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Connect4,
            2 => Self::Connect6,
            3 => Self::Sendmsg4,
            4 => Self::Sendmsg6,
            5 => Self::SockCreate,
            6 => Self::UnixConnect,
            7 => Self::UnixSendmsg,
            8 => Self::Bind4,
            9 => Self::Bind6,
            10 => Self::SkbEgress,
            11 => Self::SkbIngress,
            12 => Self::Setsockopt,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::SockCreate => "sock_create",
            Self::UnixConnect => "unix_connect",
            Self::UnixSendmsg => "unix_sendmsg",
            Self::Bind4 => "bind4",
            Self::Bind6 => "bind6",
            Self::SkbEgress => "skb_egress",
            Self::SkbIngress => "skb_ingress",
            Self::Setsockopt => "setsockopt",
        }
    }
}

/// Why a program refused: mirrors the `reason` field of a kernel audit record.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    NotAllowlisted = 1,
    RawSocket = 2,
    PacketSocket = 3,
    IcmpSocket = 4,
    SocketFamily = 5,
    SocketProtocol = 6,
    BindNotLoopback = 7,
    IpOptions = 8,
    Ipv6ExtensionHeader = 9,
    InboundConnection = 10,
    /// Joining (or filtering) a multicast group: the kernel itself then sends IGMP or MLD
    /// reports naming the group, which no packet hook sees.
    MulticastMembership = 11,
    /// A packet to or from a loopback address on another device than loopback: steered out
    /// of the host (SO_BINDTODEVICE, IP_UNICAST_IF, IP_PKTINFO) after the address hooks
    /// approved a loopback destination.
    LoopbackOffLoopback = 12,
    /// A connection to the tunnel by another user than the one the sandbox is for (serve's
    /// `user`): its processes' connections could be taken by another sandbox's of that user.
    NotTheSandboxUser = 13,
    /// A connection to the tunnel's address and port that the gateway's own listener would
    /// not take: nothing listens there, or something else does (a host process that bound
    /// the port after the gateway died, the sandbox's own listener in a namespace of its own).
    NotTheTunnel = 14,
    /// Turning on a socket's ICMP error queue (IP_RECVERR, IPV6_RECVERR and their RFC 4884
    /// forms): ICMP errors from any host, and what they quote, would reach the sandbox
    /// without passing the ingress program.
    IcmpErrorQueue = 15,
}

impl Reason {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::NotAllowlisted,
            2 => Self::RawSocket,
            3 => Self::PacketSocket,
            4 => Self::IcmpSocket,
            5 => Self::SocketFamily,
            6 => Self::SocketProtocol,
            7 => Self::BindNotLoopback,
            8 => Self::IpOptions,
            9 => Self::Ipv6ExtensionHeader,
            10 => Self::InboundConnection,
            11 => Self::MulticastMembership,
            12 => Self::LoopbackOffLoopback,
            13 => Self::NotTheSandboxUser,
            14 => Self::NotTheTunnel,
            15 => Self::IcmpErrorQueue,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::NotAllowlisted => "not-allowlisted",
            Self::RawSocket => "raw-socket",
            Self::PacketSocket => "packet-socket",
            Self::IcmpSocket => "icmp-socket",
            Self::SocketFamily => "socket-family",
            Self::SocketProtocol => "socket-protocol",
            Self::BindNotLoopback => "bind-not-loopback",
            Self::IpOptions => "ip-options",
            Self::Ipv6ExtensionHeader => "ipv6-extension-header",
            Self::InboundConnection => "inbound-connection",
            Self::MulticastMembership => "multicast-membership",
            Self::LoopbackOffLoopback => "loopback-off-loopback",
            Self::NotTheSandboxUser => "not-the-sandbox-user",
            Self::NotTheTunnel => "not-the-tunnel",
            Self::IcmpErrorQueue => "icmp-error-queue",
        }
    }
}

/// `SandboxConfig::tunnel_uid` when any user of the sandbox may connect to the tunnel.
pub const ANY_UID: u32 = u32::MAX;

/// Per-sandbox settings, element 0 of the `CONFIG` array.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SandboxConfig {
    /// cgroup v2 id of the sandbox cgroup; LSM programs act only on tasks in it.
    pub cgroup_id: u64,
    /// The tunnel's address as IPv6 (IPv4 as `::ffff:a.b.c.d`), network byte order.
    pub tunnel_addr: [u8; 16],
    /// The tunnel's TCP port, host byte order.
    pub tunnel_port: u16,
    pub _pad: [u8; 2],
    /// The only user whose connections to the tunnel the sandbox may make, or [`ANY_UID`].
    pub tunnel_uid: u32,
    /// The network namespace the tunnel listens in (its `SO_NETNS_COOKIE`): a client socket
    /// in any other one is not the tunnel's, whatever its addresses.
    pub tunnel_netns: u64,
}

/// One `ports`/`protocol` pair of a `[[network.allow]]` entry.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub first: u16,
    pub last: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Value of the `NET_ALLOW` LPM trie: every port rule that applies to addresses under the key.
///
/// Userspace folds the rules of shorter covering prefixes into each entry, so the longest
/// match alone decides.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PortRules {
    pub count: u32,
    pub _pad: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl Default for PortRules {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            rules: [PortRule::default(); MAX_PORT_RULES],
        }
    }
}

/// Key of the `UNIX_ALLOW` hash: `sun_path` as the kernel saw it, zero-padded.
/// A path stops at its first NUL; an abstract name starts with NUL.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct UnixPath {
    pub bytes: [u8; UNIX_PATH_MAX],
    pub _pad: [u8; 4],
}

/// Key of the `TUNNEL_CLIENTS` hash: the source of a TCP connection a sandbox made to the
/// tunnel, as the tunnel sees it as the peer of the accepted connection.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The client's source address as IPv6 (IPv4 as `::ffff:a.b.c.d`), network byte order.
    pub addr: [u8; 16],
    /// The client's source port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// One refusal, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct Event {
    pub cgroup_id: u64,
    pub hook: u32,
    pub reason: u32,
    pub pid: u32,
    pub uid: u32,
    /// Address family of the destination (`AF_INET`, `AF_INET6`, `AF_UNIX`) or of the socket.
    pub family: u32,
    /// Socket type (`SOCK_STREAM`...), for `sock_create`.
    pub sock_type: u32,
    pub protocol: u32,
    /// Destination port, host byte order.
    pub port: u32,
    /// Destination address, network byte order; IPv4 as `::ffff:a.b.c.d` (bytes 12-15).
    pub addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    /// Unix destination, as in [`UnixPath`].
    pub path: [u8; UNIX_PATH_MAX],
    /// Bytes of `path` that are meaningful (abstract names may hold NULs).
    pub path_len: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::SandboxConfig {}
    unsafe impl aya::Pod for super::PortRule {}
    unsafe impl aya::Pod for super::PortRules {}
    unsafe impl aya::Pod for super::UnixPath {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::Event {}
}
