//! Doors the connect/sendmsg hooks do not see: inbound connections and datagrams, wildcard
//! addresses, ptrace, raw sockets, source routing, sockets bound to another device,
//! multicast joins and ICMP error queues. Each test fails on a build without its fix.

mod support;

use std::{
    io::Read as _,
    net::{Shutdown, TcpStream},
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use support::{live::Live, *};

#[test]
fn listening_on_a_wildcard_address_is_refused() {
    let run = Run::new("listen", &policy("listen", ""));
    let out = run.python(
        r#"
def bind_any4():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", 0))
def bind_any6():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::", 0))
def bind_loopback():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
report("bind-any4", bind_any4)
report("bind-any6", bind_any6)
report("bind-loopback", bind_loopback)
"#,
    );
    out.assert_refused("bind-any4");
    out.assert_refused("bind-any6");
    out.assert_open("bind-loopback");
    let pid = out.pid();
    for hook in ["bind4", "bind6"] {
        assert!(
            out.audit.iter().any(|r| r["hook"] == hook
                && r["reason"] == "bind-not-loopback"
                && r["pid"].as_u64() == Some(pid)),
            "{}",
            out.describe()
        );
    }
}

/// listen() on an unbound socket binds it to the wildcard address without any bind hook.
/// The packet backstop drops the incoming SYN, so nobody connects in to read what the
/// sandbox would send.
#[test]
fn a_host_process_cannot_connect_in() {
    let run = Run::new("connect-in", &policy("connect-in", ""));
    let script = format!(
        r#"{PRELUDE}
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.listen(8)
print(s.getsockname()[1], flush=True)
s.settimeout(8)
try:
    c, _ = s.accept()
    c.sendall(b"secret data from the sandbox")
    print("accepted", flush=True)
except OSError as e:
    print("no-connection", flush=True)
"#
    );
    let mut gateway = run
        .command(&["python3", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = gateway.stdout.take().unwrap();
    let mut first = String::new();
    let mut byte = [0u8; 1];
    // {"pid": N}\n then the port
    let mut lines = 0;
    while lines < 2 {
        stdout.read_exact(&mut byte).unwrap();
        if byte[0] == b'\n' {
            lines += 1;
        }
        first.push(byte[0] as char);
    }
    let port: u16 = first.lines().nth(1).unwrap().trim().parse().unwrap();
    let mut received = Vec::new();
    if let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
    {
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let _ = stream.read_to_end(&mut received);
        let _ = stream.shutdown(Shutdown::Both);
    }
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    gateway.wait().unwrap();
    assert!(received.is_empty(), "received {received:?}");
    assert_eq!(rest.trim(), "no-connection");
    let audit = run.audit_records();
    assert!(
        audit.iter().any(|r| r["hook"] == "skb_ingress"
            && r["reason"] == "inbound-connection"
            && r["uid"] == 65534),
        "{audit:?}"
    );
}

#[test]
fn zero_addresses_are_loopback_and_refused() {
    let v4 = HostTcp::bind("0.0.0.0:0");
    let v6 = HostTcp::bind("[::]:0");
    let run = Run::new("zero", &policy("zero", ""));
    let out = run.python(&format!(
        r#"
report("zero4", lambda: socket.create_connection(("0.0.0.0", {p4}), timeout=3))
report("zero6", lambda: socket.create_connection(("::", {p6}), timeout=3))
"#,
        p4 = v4.port,
        p6 = v6.port
    ));
    out.assert_refused("zero4");
    out.assert_refused("zero6");
    out.assert_audited("connect4", &format!("0.0.0.0:{}", v4.port));
    out.assert_audited("connect6", &format!("[::]:{}", v6.port));
    assert_eq!(v4.accepted() + v6.accepted(), 0);
}

#[test]
fn ptrace_out_of_the_sandbox_is_refused() {
    // A process of the same uid outside the sandbox: ordinary permissions would allow it.
    let mut outsider = Command::new("sleep");
    outsider.arg("30");
    // SAFETY: setgid/setuid between fork and exec.
    unsafe {
        outsider.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut outsider = outsider.spawn().unwrap();
    let run = Run::new("ptrace", &policy("ptrace", ""));
    let out = run.python(&format!(
        r#"
libc = ctypes.CDLL(None, use_errno=True)
def attach():
    if libc.ptrace(16, {pid}, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
def signal():
    os.kill({pid}, 0)
report("ptrace", attach)
report("signal", signal)
"#,
        pid = outsider.id()
    ));
    let _ = outsider.kill();
    let _ = outsider.wait();
    out.assert_refused("ptrace");
    out.assert_refused("signal");
}

/// A raw socket needs CAP_NET_RAW, which no sandboxed process can hold: it never runs as
/// root, and it cannot make a user namespace to be root in (seccomp). The cgroup's
/// sock_create program refuses raw sockets anyway: here a root process, holding
/// CAP_NET_RAW, joins the running sandbox's cgroup and is refused.
#[test]
fn raw_sockets_are_refused_even_to_a_process_holding_cap_net_raw() {
    let run = Run::new("rawcap", &policy("rawcap", ""));
    let go = run.scratch.dir.join("go");
    let mut live = Live::python(
        &run,
        &format!(
            r#"
say("cgroup", open("/proc/self/cgroup").read().split("::", 1)[1].strip())
wait_for({go:?})
"#
        ),
        &[],
    );
    let cgroup = cgroup2_root().join(
        live.until("cgroup")
            .as_str()
            .unwrap()
            .trim_start_matches('/'),
    );
    let procs = cgroup.join("cgroup.procs");
    let mut root = Command::new("python3");
    root.args([
        "-c",
        r#"
import json, os, socket
def attempt(proto):
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, proto).close()
        return {"ok": True}
    except OSError as e:
        return {"ok": False, "errno": e.errno}
print(json.dumps({"pid": os.getpid(), "raw": attempt(socket.IPPROTO_UDP),
                  "icmp": attempt(socket.IPPROTO_ICMP)}), flush=True)
"#,
    ]);
    // SAFETY: only writes this process's pid into a file, then execs.
    unsafe {
        root.pre_exec(move || std::fs::write(&procs, std::process::id().to_string()));
    }
    let joined = root.output().unwrap();
    std::fs::write(&go, "").unwrap();
    let out = live.finish();
    let report: serde_json::Value = serde_json::from_slice(&joined.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}\n{}",
            String::from_utf8_lossy(&joined.stdout),
            String::from_utf8_lossy(&joined.stderr),
            out.describe()
        )
    });
    for kind in ["raw", "icmp"] {
        assert_eq!(
            report[kind],
            serde_json::json!({"ok": false, "errno": EPERM}),
            "{kind} socket of a root process in the sandbox's cgroup\n{}",
            out.describe()
        );
    }
    assert!(
        out.audit
            .iter()
            .any(|r| r["reason"] == "raw-socket" && r["pid"] == report["pid"]),
        "{}",
        out.describe()
    );
}

/// A test host in a network namespace, one veth hop away. Removed on drop.
struct TestHost {
    netns: String,
    host_if: String,
    peer_if: String,
    v4: String,
    v6: String,
}

impl TestHost {
    fn new() -> Self {
        let id = std::process::id() % 50_000;
        let netns = format!("gwsr{id}");
        let host_if = format!("gwh{id}");
        let peer_if = format!("gwn{id}");
        let octet = id % 250 + 1;
        let v4_host = format!("10.254.{octet}.1");
        let v4 = format!("10.254.{octet}.2");
        let v6_host = format!("fd00:254:{octet:x}::1");
        let v6 = format!("fd00:254:{octet:x}::2");
        let ip = |args: &str| {
            let out = Command::new("ip")
                .args(args.split_whitespace())
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args}: {out:?}");
        };
        ip(&format!("netns add {netns}"));
        let host = Self {
            netns: netns.clone(),
            host_if: host_if.clone(),
            peer_if: peer_if.clone(),
            v4: v4.clone(),
            v6: v6.clone(),
        };
        ip(&format!("link add {host_if} type veth peer name {peer_if}"));
        ip(&format!("link set {peer_if} netns {netns}"));
        ip(&format!("addr add {v4_host}/30 dev {host_if}"));
        ip(&format!("addr add {v6_host}/64 dev {host_if} nodad"));
        ip(&format!("link set {host_if} up"));
        ip(&format!("-n {netns} addr add {v4}/30 dev {peer_if}"));
        ip(&format!("-n {netns} addr add {v6}/64 dev {peer_if} nodad"));
        ip(&format!("-n {netns} link set {peer_if} up"));
        ip(&format!("-n {netns} link set lo up"));
        host
    }
}

impl TestHost {
    /// The index of the host's side of the link.
    fn ifindex(&self) -> u32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host_if))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A neighbour entry on the host's side: `addr` is the test host's link address.
    fn answer_for(&self, addr: &str) {
        let out = Command::new("ip")
            .args(["-n", &self.netns, "-j", "link", "show", &self.peer_if])
            .output()
            .unwrap();
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mac = links[0]["address"].as_str().unwrap();
        let status = Command::new("ip")
            .args([
                "neigh",
                "replace",
                addr,
                "lladdr",
                mac,
                "dev",
                &self.host_if,
            ])
            .args(["nud", "permanent"])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Counts TCP and UDP packets (and IPv6 routing headers) arriving on the test host's
/// interface until told to stop; given markers (hex), the frames that contain one of them
/// instead, whatever their protocol.
const SNIFFER: &str = r#"
import socket, struct, sys, os, time, select
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
print("ready", flush=True)
stop = sys.argv[1]
markers = [bytes.fromhex(m) for m in sys.argv[2:]]
seen = 0
deadline = time.time() + 30
while not os.path.exists(stop) and time.time() < deadline:
    r, _, _ = select.select([s], [], [], 0.05)
    if not r:
        continue
    frame = s.recv(65535)
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if markers:
        seen += any(m in frame for m in markers)
    elif ethertype == 0x0800 and frame[14 + 9] in (6, 17):
        seen += 1
    elif ethertype == 0x86DD and frame[14 + 6] in (6, 17, 43):
        seen += 1
print(seen, flush=True)
"#;

/// [`SNIFFER`] running in a test host's namespace.
struct Sniffer {
    child: std::process::Child,
    output: std::io::BufReader<std::process::ChildStdout>,
    stop: std::path::PathBuf,
}

impl Sniffer {
    fn start(host: &TestHost, run: &Run, markers: &[&[u8]]) -> Self {
        let stop = run.scratch.dir.join("stop-sniffer");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.netns, "python3", "-c", SNIFFER])
            .arg(&stop)
            .stdout(Stdio::piped());
        for marker in markers {
            cmd.arg(
                marker
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>(),
            );
        }
        let mut child = cmd.spawn().unwrap();
        let output = wait_for_line(&mut child, "ready");
        Self {
            child,
            output,
            stop,
        }
    }

    /// What it counted, once packets still on their way have had time to arrive.
    fn count(mut self) -> usize {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(&self.stop, "").unwrap();
        let mut count = String::new();
        self.output.read_to_string(&mut count).unwrap();
        self.child.wait().unwrap();
        count.trim().parse().unwrap()
    }
}

#[test]
fn source_routed_packets_never_leave() {
    let udp4 = HostUdp::bind("127.0.0.1:0");
    let udp6 = HostUdp::bind("[::1]:0");
    let host = TestHost::new();
    let run = Run::new(
        "source-route",
        &policy(
            "source-route",
            &format!(
                "[[network.allow]]\ncidr = \"127.0.0.1/32\"\nports = [{p4}]\nprotocol = \"udp\"\n\
                 [[network.allow]]\ncidr = \"::1/128\"\nports = [{p6}]\nprotocol = \"udp\"\n",
                p4 = udp4.port,
                p6 = udp6.port
            ),
        ),
    );
    let sniffer = Sniffer::start(&host, &run, &[]);
    let out = run.python(&format!(
        r#"
hop = socket.inet_aton("{v4}")
lsrr = bytes([1, 131, 7, 4]) + hop
def tcp_lsrr():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, lsrr)
    s.settimeout(2)
    s.connect(("127.0.0.1", TUNNEL_PORT))
def udp_lsrr_sockopt():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, lsrr)
    s.sendto(b"x", ("127.0.0.1", {p4}))
def udp_lsrr_cmsg():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendmsg([b"x"], [(socket.IPPROTO_IP, 7, lsrr)], 0, ("127.0.0.1", {p4}))
def udp_rthdr6():
    srh = bytes([0, 4, 4, 1, 1, 0, 0, 0]) + bytes(16) + socket.inet_pton(socket.AF_INET6, "{v6}")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, 57, srh)
    s.sendto(b"x", ("::1", {p6}))
report("tcp-lsrr", tcp_lsrr)
report("udp-lsrr-sockopt", udp_lsrr_sockopt)
report("udp-lsrr-cmsg", udp_lsrr_cmsg)
report("udp-rthdr6", udp_rthdr6)
"#,
        v4 = host.v4,
        v6 = host.v6,
        p4 = udp4.port,
        p6 = udp6.port
    ));
    assert_eq!(
        sniffer.count(),
        0,
        "packets reached the first hop\n{}",
        out.describe()
    );
    for door in [
        "tcp-lsrr",
        "udp-lsrr-sockopt",
        "udp-lsrr-cmsg",
        "udp-rthdr6",
    ] {
        assert_eq!(out.door(door)["ok"], false, "{door}\n{}", out.describe());
    }
    assert_eq!(udp4.received() + udp6.received(), 0);
    let audited = |reason: &str| {
        out.audit
            .iter()
            .any(|r| r["hook"] == "skb_egress" && r["reason"] == reason && r["uid"] == 65534)
    };
    // Linux itself refuses IPv4 source routes (IP_OPTIONS/IP_RETOPTS with LSRR) to callers
    // without CAP_NET_RAW, so those doors fail before a packet exists; the backstop's
    // ip-options check stands behind that. The IPv6 routing header needs no privilege and
    // is the backstop's to stop.
    assert!(audited("ipv6-extension-header"), "{}", out.describe());
}

/// A socket made outside the sandbox would be judged as the outside's. pidfd_getfd could
/// take one from a same-uid process outside; Landlock refuses the ptrace access it needs.
#[test]
fn sockets_cannot_be_taken_from_processes_outside() {
    let udp = HostUdp::bind("127.0.0.1:0");
    // Same uid as the sandbox, holding a socket that may send to the listener, as fd 3.
    let holder_script = format!(
        "import socket, os, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.connect(('127.0.0.1', {port}))\n\
         os.dup2(s.fileno(), 3)\n\
         print('ready', flush=True)\n\
         time.sleep(30)\n",
        port = udp.port
    );
    let mut holder = Command::new("/usr/bin/python3");
    holder
        .args(["-c", &holder_script])
        .stdout(Stdio::piped())
        .current_dir("/");
    // SAFETY: setgid/setuid between fork and exec.
    unsafe {
        holder.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut holder = holder.spawn().unwrap();
    let _holder_out = wait_for_line(&mut holder, "ready");
    let run = Run::new("pidfd", &policy("pidfd", ""));
    let out = run.python(&format!(
        r#"
libc = ctypes.CDLL(None, use_errno=True)
def take():
    pidfd = libc.syscall(434, {pid}, 0)
    if pidfd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    fd = libc.syscall(438, pidfd, 3, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.write(fd, b"taken")
report("pidfd_getfd", take)
"#,
        pid = holder.id()
    ));
    let _ = holder.kill();
    let _ = holder.wait();
    out.assert_refused("pidfd_getfd");
    assert_eq!(udp.received(), 0, "{}", out.describe());
}

/// The address hooks approve 127.0.0.1 (the tunnel, or a listed loopback port); a socket
/// bound to another device would then carry that destination onto the device's wire, where
/// whoever answers for 127.0.0.1 receives it. Each variant here reached the test host before.
#[test]
fn loopback_destinations_never_leave_on_another_device() {
    let udp4 = HostUdp::bind("127.0.0.1:0");
    let host = TestHost::new();
    let ifindex = host.ifindex();
    // As a machine on that link could: answer for 127.0.0.1, so the kernel has where to send.
    host.answer_for("127.0.0.1");
    let run = Run::new(
        "loopback-off-device",
        &policy(
            "loopback-off-device",
            &format!(
                "[[network.allow]]\ncidr = \"127.0.0.1/32\"\nports = [{}]\nprotocol = \"udp\"\n",
                udp4.port
            ),
        ),
    );
    let sniffer = Sniffer::start(&host, &run, &[]);
    let out = run.python(&format!(
        r#"
import struct
DEV = b"{dev}"
def bound(kind):
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, DEV)
    s.settimeout(2)
    return s
def tcp_tunnel():
    bound(socket.SOCK_STREAM).connect(("127.0.0.1", TUNNEL_PORT))
def tfo_tunnel():
    s = bound(socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, 34, 1)  # TCP_FASTOPEN_NO_COOKIE: data in the SYN
    s.sendto(b"data in the SYN", socket.MSG_FASTOPEN, ("127.0.0.1", TUNNEL_PORT))
    s.recv(1)
def udp_bound():
    bound(socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {p4}))
def udp_unicast_if():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 50, struct.pack("!I", {ifindex}))  # IP_UNICAST_IF
    s.sendto(b"x", ("127.0.0.1", {p4}))
def udp_pktinfo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pktinfo = struct.pack("=I4s4s", {ifindex}, bytes(4), bytes(4))
    s.sendmsg([b"x"], [(socket.IPPROTO_IP, 8, pktinfo)], 0, ("127.0.0.1", {p4}))  # IP_PKTINFO
report("tcp-tunnel", tcp_tunnel)
report("tfo-tunnel", tfo_tunnel)
report("udp-bound", udp_bound)
report("udp-unicast-if", udp_unicast_if)
report("udp-pktinfo", udp_pktinfo)
"#,
        dev = host.host_if,
        p4 = udp4.port,
    ));
    assert_eq!(
        sniffer.count(),
        0,
        "packets for 127.0.0.1 reached the test host\n{}",
        out.describe()
    );
    for door in [
        "tcp-tunnel",
        "tfo-tunnel",
        "udp-bound",
        "udp-unicast-if",
        "udp-pktinfo",
    ] {
        assert_eq!(out.door(door)["ok"], false, "{door}\n{}", out.describe());
    }
    for proto in ["tcp", "udp"] {
        assert!(
            out.audit.iter().any(|r| r["hook"] == "skb_egress"
                && r["reason"] == "loopback-off-loopback"
                && r["proto"] == proto),
            "no {proto} record\n{}",
            out.describe()
        );
    }
}

/// Joining a multicast group makes the kernel itself send IGMP or MLD reports naming the
/// group (addresses the sandbox chooses) out of the interface the join names. Before the
/// setsockopt program, the test host received reports carrying both groups below.
#[test]
fn multicast_groups_cannot_be_joined() {
    let host = TestHost::new();
    let ifindex = host.ifindex();
    let run = Run::new("multicast-join", &policy("multicast-join", ""));
    // 239.84.79.80 and ff05::5345:4352:4554 end in "TOP" and "SECRET".
    let sniffer = Sniffer::start(&host, &run, &[&[239, 84, 79, 80], b"SECRET"]);
    let out = run.python(&format!(
        r#"
import struct
def ip_add_membership():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mreqn = socket.inet_aton("239.84.79.80") + bytes(4) + struct.pack("=i", {ifindex})
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
def mcast_join_group():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # struct group_req: interface, padding, sockaddr_storage (AF_INET, port 0, group)
    sin = struct.pack("=H2s4s", socket.AF_INET, bytes(2), socket.inet_aton("239.84.79.80"))
    req = struct.pack("=I4x", {ifindex}) + sin.ljust(128, b"\0")
    s.setsockopt(socket.IPPROTO_IP, 42, req)
def ipv6_join_group():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    group = socket.inet_pton(socket.AF_INET6, "ff05::5345:4352:4554")
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group + struct.pack("=I", {ifindex}))
report("ip-add-membership", ip_add_membership)
report("mcast-join-group", mcast_join_group)
report("ipv6-join-group", ipv6_join_group)
time.sleep(1)
"#
    ));
    assert_eq!(
        sniffer.count(),
        0,
        "IGMP or MLD reports named a group\n{}",
        out.describe()
    );
    for door in ["ip-add-membership", "mcast-join-group", "ipv6-join-group"] {
        out.assert_refused(door);
    }
    for proto in ["ip/35", "ip/42", "ipv6/20"] {
        assert!(
            out.audit.iter().any(|r| r["hook"] == "setsockopt"
                && r["reason"] == "multicast-membership"
                && r["proto"] == proto
                && r["uid"] == 65534),
            "no record for {proto}\n{}",
            out.describe()
        );
    }
}

/// A datagram reaches a bound socket with no connect hook asked: from the host's loopback,
/// only a listed peer's may (here the replies of a listed echo server). Before, a host
/// process could send into any loopback UDP socket of the sandbox.
#[test]
fn datagrams_from_the_hosts_loopback_come_only_from_listed_peers() {
    let echo = HostUdp::bind("127.0.0.1:0");
    echo.socket.set_nonblocking(false).unwrap();
    echo.socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let sandbox_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = Run::new(
        "udp-inbound",
        &policy(
            "udp-inbound",
            &format!(
                "[[network.allow]]\ncidr = \"127.0.0.1/32\"\nports = [{}]\nprotocol = \"udp\"\n",
                echo.port
            ),
        ),
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|scope| {
        scope.spawn(|| {
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut buf = [0u8; 64];
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = sender.send_to(b"from the host", ("127.0.0.1", sandbox_port));
                if let Ok((n, from)) = echo.socket.recv_from(&mut buf) {
                    let _ = echo.socket.send_to(&buf[..n], from);
                }
            }
        });
        let out = run.python(&format!(
            r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", {sandbox_port}))
s.settimeout(2)
def inbound():
    s.recv(64)
def listed_reply():
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(2)
    c.sendto(b"ping", ("127.0.0.1", {echo}))
    assert c.recv(64) == b"ping"
report("inbound", inbound)
report("listed-reply", listed_reply)
"#,
            echo = echo.port
        ));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    });
    assert_eq!(out.door("inbound")["ok"], false, "{}", out.describe());
    out.assert_open("listed-reply");
    assert!(
        out.audit.iter().any(|r| r["hook"] == "skb_ingress"
            && r["reason"] == "not-allowlisted"
            && r["proto"] == "udp"),
        "{}",
        out.describe()
    );
}

/// An ICMP error is no packet of the socket's: no `cgroup_skb` ingress program sees it. With
/// IP_RECVERR (or IPV6_RECVERR, or their RFC 4884 variants) a UDP socket reads those errors,
/// the offending datagram's headers and any payload a forged error carries, from its error
/// queue (MSG_ERRQUEUE): data from any host, listed or not. The options are refused and
/// recorded inside; outside, the same user sets each of them.
#[test]
fn icmp_error_queues_cannot_be_read() {
    const RECVERR: &str = r#"
def option(family, level, name):
    def set():
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        s.setsockopt(level, name, 1)
    return set
report("ip-recverr", option(socket.AF_INET, 0, 11))
report("ip-recverr-rfc4884", option(socket.AF_INET, 0, 26))
report("ipv6-recverr", option(socket.AF_INET6, 41, 25))
report("ipv6-recverr-rfc4884", option(socket.AF_INET6, 41, 31))
"#;
    let doors = [
        ("ip-recverr", "ip/11"),
        ("ip-recverr-rfc4884", "ip/26"),
        ("ipv6-recverr", "ipv6/25"),
        ("ipv6-recverr-rfc4884", "ipv6/31"),
    ];
    let control = python_outside(RECVERR);
    for (door, _) in doors {
        control.assert_open(door);
    }
    let run = Run::new("recverr", &policy("recverr", ""));
    let out = run.python(RECVERR);
    let pid = out.pid();
    for (door, proto) in doors {
        out.assert_refused(door);
        assert!(
            out.audit.iter().any(|r| r["hook"] == "setsockopt"
                && r["reason"] == "icmp-error-queue"
                && r["proto"] == proto
                && r["pid"].as_u64() == Some(pid)
                && r["uid"] == 65534),
            "no record for {proto}\n{}",
            out.describe()
        );
    }
}
