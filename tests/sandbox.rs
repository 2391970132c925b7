//! Every door out of the sandbox, tried from inside by an unprivileged process, against the
//! real gateway binary as root. Run by `cargo xtask test` (README.md).

mod support;

use std::{
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    process::Stdio,
};

use support::*;

#[test]
fn tcp_to_loopback_services_is_refused_and_audited() {
    let v4 = HostTcp::bind("127.0.0.1:0");
    let v6 = HostTcp::bind("[::1]:0");
    let run = Run::new("tcp", &policy("tcp-doors", ""));
    let out = run.python(&format!(
        r#"
report("v4", lambda: socket.create_connection(("127.0.0.1", {p4}), timeout=3))
report("v6", lambda: socket.create_connection(("::1", {p6}), timeout=3))
"#,
        p4 = v4.port,
        p6 = v6.port
    ));
    out.assert_refused("v4");
    out.assert_refused("v6");
    out.assert_audited("connect4", &format!("127.0.0.1:{}", v4.port));
    out.assert_audited("connect6", &format!("[::1]:{}", v6.port));
    assert_eq!(v4.accepted() + v6.accepted(), 0, "{}", out.describe());
}

#[test]
fn tunnel_port_on_another_loopback_address_is_refused() {
    let run = Run::new("tunnel-alias", &policy("tunnel-alias", ""));
    let out = run.python(
        r#"
report("alias", lambda: socket.create_connection(("127.0.0.2", TUNNEL_PORT), timeout=3))
report("tunnel", lambda: socket.create_connection(("127.0.0.1", TUNNEL_PORT), timeout=3))
"#,
    );
    out.assert_refused("alias");
    out.assert_open("tunnel");
    let tunnel_port = out
        .audit
        .iter()
        .find(|r| r["hook"] == "connect4")
        .and_then(|r| r["dst"].as_str())
        .map(str::to_owned);
    assert!(
        tunnel_port.is_some_and(|d| d.starts_with("127.0.0.2:")),
        "{}",
        out.describe()
    );
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    let v4 = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("mapped", &policy("mapped", ""));
    let out = run.python(&format!(
        r#"
def mapped():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(("::ffff:127.0.0.1", {p}))
report("mapped", mapped)
def mapped_tunnel():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(("::ffff:127.0.0.1", TUNNEL_PORT))
report("mapped-tunnel", mapped_tunnel)
"#,
        p = v4.port
    ));
    out.assert_refused("mapped");
    out.assert_open("mapped-tunnel");
    out.assert_audited("connect6", &format!("[::ffff:127.0.0.1]:{}", v4.port));
    assert_eq!(v4.accepted(), 0);
}

#[test]
fn udp_sendto_and_connect_send_are_refused() {
    let udp = HostUdp::bind("127.0.0.1:0");
    let run = Run::new("udp", &policy("udp-doors", ""));
    let out = run.python(&format!(
        r#"
P = {p}
def sendto4():
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", P))
def connect_send4():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", P))
    s.send(b"x")
def sendto_mapped():
    socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b"x", ("::ffff:127.0.0.1", P))
def connect_send_mapped():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.connect(("::ffff:127.0.0.1", P))
    s.send(b"x")
report("sendto4", sendto4)
report("connect-send4", connect_send4)
report("sendto-mapped", sendto_mapped)
report("connect-send-mapped", connect_send_mapped)
"#,
        p = udp.port
    ));
    for door in [
        "sendto4",
        "connect-send4",
        "sendto-mapped",
        "connect-send-mapped",
    ] {
        out.assert_refused(door);
    }
    let dst4 = format!("127.0.0.1:{}", udp.port);
    let dst6 = format!("[::ffff:127.0.0.1]:{}", udp.port);
    out.assert_audited("sendmsg4", &dst4);
    out.assert_audited("connect4", &dst4);
    out.assert_audited("connect6", &dst6);
    // A mapped destination on an inet6 UDP socket reaches the kernel's IPv4 path: sendmsg4.
    let sendmsg4 = out
        .audit
        .iter()
        .filter(|r| r["hook"] == "sendmsg4" && r["dst"] == dst4.as_str())
        .count();
    assert_eq!(sendmsg4, 2, "{}", out.describe());
    assert_eq!(udp.received(), 0, "{}", out.describe());
}

#[test]
fn tcp_fast_open_is_refused() {
    let v4 = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("tfo", &policy("tfo", ""));
    let out = run.python(&format!(
        r#"
def tfo():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.sendto(b"GET / HTTP/1.0\r\n\r\n", socket.MSG_FASTOPEN, ("127.0.0.1", {p}))
report("tfo", tfo)
"#,
        p = v4.port
    ));
    out.assert_refused("tfo");
    out.assert_audited("connect4", &format!("127.0.0.1:{}", v4.port));
    assert_eq!(v4.accepted(), 0);
}

#[test]
fn io_uring_cannot_submit_a_connect() {
    let v4 = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("io-uring", &policy("io-uring", ""));
    // io_uring_setup is the door: without a ring no IORING_OP_CONNECT can be submitted.
    let out = run.python(
        r#"
libc = ctypes.CDLL(None, use_errno=True)
def setup():
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 8, params)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
report("io_uring_setup", setup)
"#,
    );
    out.assert_refused("io_uring_setup");
    assert!(
        out.audit
            .iter()
            .any(|r| r["hook"] == "io_uring_setup" && r["pid"].as_u64() == Some(out.pid())),
        "{}",
        out.describe()
    );
    assert_eq!(v4.accepted(), 0);
}

/// No new namespaces: in a network namespace of its own the sandbox could make the kernel
/// record tunnel clients (address, port) that an outside process then connects from. Both
/// doors, unshare and clone with a CLONE_NEW* flag, are refused and audited; clone3, whose
/// flags seccomp cannot read, fails with ENOSYS, and threads and processes still start
/// through clone.
#[test]
fn new_namespaces_are_refused() {
    let run = Run::new("namespaces", &policy("namespaces", ""));
    let out = run.python(
        r#"
import subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17
def unshare():
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
report("unshare", unshare)
def clone():
    pid = libc.syscall(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.waitpid(pid, 0)
report("clone", clone)
def clone3():
    args = ctypes.create_string_buffer(88)
    if libc.syscall(435, args, 88) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
report("clone3", clone3)
t = threading.Thread(target=lambda: None); t.start(); t.join()
print(json.dumps({"child": subprocess.run(["true"]).returncode}), flush=True)
"#,
    );
    out.assert_refused("unshare");
    out.assert_refused("clone");
    assert_eq!(out.door("clone3")["errno"], 38, "{}", out.describe());
    assert!(
        out.lines.iter().any(|l| l["child"] == 0),
        "threads and processes still start\n{}",
        out.describe()
    );
    for (hook, namespaces) in [("unshare", "user+net"), ("clone", "user")] {
        assert!(
            out.audit.iter().any(|r| r["hook"] == hook
                && r["reason"] == "namespace"
                && r["proto"] == namespaces),
            "no {hook} record for {namespaces}\n{}",
            out.describe()
        );
    }
}

/// The seccomp rules are written for the native x86_64 ABI; a 64-bit process can still make
/// i386 system calls with `int 0x80` (and x32 ones by number), which those rules never see.
/// Such a call, here socket(AF_PACKET) as i386 call 359, must be recorded and its process
/// killed before the call returns, not killed silently by the filter's default.
#[test]
fn foreign_syscall_abi_is_recorded_and_killed() {
    let run = Run::new("foreign-abi", &policy("foreign-abi", ""));
    let out = run.python(
        r#"
import mmap
code = bytes([
    0x53,                          # push rbx
    0xb8, 0x67, 0x01, 0x00, 0x00,  # mov eax, 359 (i386 socket)
    0xbb, 0x11, 0x00, 0x00, 0x00,  # mov ebx, 17 (AF_PACKET)
    0xb9, 0x03, 0x00, 0x00, 0x00,  # mov ecx, 3 (SOCK_RAW)
    0x31, 0xd2,                    # xor edx, edx
    0xcd, 0x80,                    # int 0x80
    0x5b,                          # pop rbx
    0xc3,                          # ret
])
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
call = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
print(json.dumps({"before": True}), flush=True)
print(json.dumps({"after": call()}), flush=True)
"#,
    );
    assert!(
        out.lines.iter().any(|l| l["before"] == true),
        "{}",
        out.describe()
    );
    assert!(
        !out.lines.iter().any(|l| l.get("after").is_some()),
        "the process went on after an i386 call\n{}",
        out.describe()
    );
    let pid = out.pid();
    assert!(
        out.audit.iter().any(|r| r["layer"] == "kernel"
            && r["verdict"] == "deny"
            && r["hook"] == "seccomp"
            && r["reason"] == "foreign-syscall-abi"
            && r["proto"] == "x86/359"
            && r["pid"].as_u64() == Some(pid)
            && r["uid"].as_u64() == Some(65534)
            && r["comm"] == "python3"),
        "no foreign-syscall-abi record for pid {pid}\n{}",
        out.describe()
    );
    // Killed by the gateway, not by the filter's default (SIGSYS).
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGKILL),
        "{}",
        out.describe()
    );

    // An x32 call carries the native arch with bit 30 set in its number: socket is x32 41.
    let out = run.python(
        r#"
libc = ctypes.CDLL(None, use_errno=True)
print(json.dumps({"before": True}), flush=True)
print(json.dumps({"after": libc.syscall(0x40000000 | 41, 17, 3, 0)}), flush=True)
"#,
    );
    let pid = out.pid();
    assert!(
        out.audit
            .iter()
            .any(|r| r["reason"] == "foreign-syscall-abi"
                && r["proto"] == "x32/41"
                && r["pid"].as_u64() == Some(pid)),
        "no x32 record for pid {pid}\n{}",
        out.describe()
    );
    assert!(
        !out.lines.iter().any(|l| l.get("after").is_some()),
        "{}",
        out.describe()
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGKILL));
}

/// A pseudo-terminal for a test to stand in for the operator's: `(master, slave)`, both
/// close-on-exec.
fn pty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd as _;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds; the name, termios and winsize pointers may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [master, slave] {
        // SAFETY: fcntl on the fds openpty just made.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: openpty made these fds; nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

/// Starts `cmd` in a session of its own whose controlling terminal is `slave`, as an
/// interactive shell's job has its terminal: its children, the sandbox among them, open it
/// as /dev/tty.
fn on_terminal(cmd: &mut std::process::Command, slave: &OwnedFd) {
    let slave = slave.as_raw_fd();
    // SAFETY: setsid and ioctl between fork and exec, on an fd the parent keeps open.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What a terminal's input queue holds: the lines a shell reading it would run next.
fn typed(slave: &OwnedFd) -> String {
    let fd = slave.as_raw_fd();
    // SAFETY: fcntl and read on an fd we own, into a buffer of the length given.
    unsafe {
        libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
        let mut text = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            text.extend_from_slice(&buf[..n as usize]);
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

/// Python: types `echo injected` into the controlling terminal with TIOCSTI, then tries
/// TIOCSTI with upper bits set in its request (the kernel reads only the lower 32) and
/// TIOCLINUX (whose selection paste types into a virtual console).
const TERMINAL_INPUT: &str = r#"
import fcntl
libc = ctypes.CDLL(None, use_errno=True)
tty = os.open("/dev/tty", os.O_RDWR)
def ioctl(request, arg):
    if libc.syscall(16, tty, ctypes.c_ulong(request), ctypes.byref(arg)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
def tiocsti():
    for c in b"echo injected\n":
        fcntl.ioctl(tty, 0x5412, bytes([c]))
report("tiocsti", tiocsti)
report("tiocsti-high-bits", lambda: ioctl(0x1_0000_5412, ctypes.c_char(b"\n")))
report("tioclinux", lambda: ioctl(0x541C, ctypes.c_char(b"\x06")))
# KDSKBSENT: what function key 1 types on a virtual console. VT_ACTIVATE: switch consoles.
report("kdskbsent", lambda: ioctl(0x4B49, ctypes.create_string_buffer(b"\x00echo injected\n", 512)))
report("vt-activate", lambda: ioctl(0x5606, ctypes.c_int(1)))
"#;

/// TIOCSTI puts bytes in a terminal's input queue as if typed: from an operator's
/// interactive root shell, a sandboxed command could type a line that shell runs as root once
/// the command exits. Outside the sandbox, the same user on the same kind of terminal (a pty
/// that is its controlling terminal) gets its line typed (dev.tty.legacy_tiocsti=1 here);
/// inside, TIOCSTI and TIOCLINUX are refused and recorded, upper request bits or not, and
/// nothing reaches the terminal's input.
#[test]
fn the_terminal_cannot_be_typed_into() {
    let (_master, slave) = pty();
    let mut outside_cmd = outside_command(TERMINAL_INPUT);
    on_terminal(&mut outside_cmd, &slave);
    let control = outside(outside_cmd.output().unwrap());
    control.assert_open("tiocsti");
    for door in ["tioclinux", "kdskbsent", "vt-activate"] {
        assert_ne!(
            control.door(door)["errno"],
            EPERM,
            "{door}\n{}",
            control.describe()
        );
    }
    assert!(
        typed(&slave).contains("echo injected\n"),
        "TIOCSTI typed nothing outside the sandbox: the test would prove nothing\n{}",
        control.describe()
    );

    let (_master, slave) = pty();
    let run = Run::new("tiocsti", &policy("tiocsti", ""));
    let mut cmd = run.command(&["python3", "-c", &format!("{PRELUDE}\n{TERMINAL_INPUT}")]);
    on_terminal(&mut cmd, &slave);
    let out = run.finish(cmd.output().unwrap());
    for door in [
        "tiocsti",
        "tiocsti-high-bits",
        "tioclinux",
        "kdskbsent",
        "vt-activate",
    ] {
        assert_eq!(out.door(door)["errno"], EPERM, "{door}\n{}", out.describe());
    }
    let queued = typed(&slave);
    assert!(
        queued.is_empty(),
        "typed into the terminal: {queued:?}\n{}",
        out.describe()
    );
    let pid = out.pid();
    for (request, count) in [
        ("TIOCSTI", 2),
        ("TIOCLINUX", 1),
        ("KD/0x4b49", 1),
        ("VT/0x5606", 1),
    ] {
        let records = out
            .audit
            .iter()
            .filter(|r| {
                r["hook"] == "ioctl"
                    && r["reason"] == "terminal-injection"
                    && r["proto"] == request
                    && r["pid"].as_u64() == Some(pid)
                    && r["uid"].as_u64() == Some(65534)
            })
            .count();
        assert_eq!(records, count, "{request} records\n{}", out.describe());
    }
}

/// The kernel's key requests run /sbin/request-key as root outside the sandbox, and its
/// `dns_resolver` helper looks up whatever name the caller chose: a DNS channel out. Keys
/// are none of the sandbox's business: request_key, add_key and keyctl are refused and
/// recorded. Outside, as the same user, the same calls work (request_key of a key that does
/// not exist fails with ENOKEY: no callout is asked for, so nothing runs and nothing is
/// looked up, here or there).
#[test]
fn the_kernel_keyring_is_out_of_reach() {
    const KEYS: &str = r#"
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    if libc.syscall(nr, *args) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
KEY_SPEC_PROCESS_KEYRING = -2
report("request_key", lambda: call(249, b"user", b"gateway-test-absent", None, 0))
report("add_key", lambda: call(248, b"user", b"gateway-test", b"x", 1, KEY_SPEC_PROCESS_KEYRING))
report("keyctl", lambda: call(250, 0, KEY_SPEC_PROCESS_KEYRING, 1))
"#;
    let control = python_outside(KEYS);
    assert_eq!(
        control.door("request_key")["errno"],
        libc::ENOKEY,
        "{}",
        control.describe()
    );
    control.assert_open("add_key");
    control.assert_open("keyctl");

    let run = Run::new("keys", &policy("keys", ""));
    let out = run.python(KEYS);
    let pid = out.pid();
    for (door, proto) in [
        ("request_key", "user"),
        ("add_key", "user"),
        ("keyctl", "keyctl/0"),
    ] {
        assert_eq!(out.door(door)["errno"], EPERM, "{door}\n{}", out.describe());
        assert!(
            out.audit.iter().any(|r| r["hook"] == door
                && r["reason"] == "kernel-keyring"
                && r["proto"] == proto
                && r["pid"].as_u64() == Some(pid)),
            "no {door} record\n{}",
            out.describe()
        );
    }
}

/// Refusals the gateway's seccomp notifier answers are summarized as the kernel's are: a
/// loop of 3,000 refused `request_key` calls is a record and a count for each second it
/// lasted, and every call is counted.
#[test]
fn repeated_seccomp_refusals_are_counted_not_written_one_by_one() {
    let run = Run::new("keys-flood", &policy("keys-flood", ""));
    let attempts = 3000;
    let out = run.python(&format!(
        r#"
libc = ctypes.CDLL(None, use_errno=True)
refused = 0
for _ in range({attempts}):
    if libc.syscall(249, b"user", b"gateway-test-absent", None, 0) < 0 and ctypes.get_errno() == errno.EPERM:
        refused += 1
print(json.dumps({{"refused": refused}}), flush=True)
"#
    ));
    let refused = out.lines.iter().find_map(|l| l["refused"].as_u64());
    assert_eq!(refused, Some(attempts), "{}", out.describe());
    let pid = out.pid();
    let records: Vec<&serde_json::Value> = out
        .audit
        .iter()
        .filter(|r| r["hook"] == "request_key" && r["reason"] == "kernel-keyring")
        .collect();
    let counted: u64 = records
        .iter()
        .map(|r| r["repeats"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(counted, attempts, "{}", out.describe());
    assert!(records.iter().all(|r| r["pid"].as_u64() == Some(pid)));
    assert!(records.len() <= 40, "{} records", records.len());
}

#[test]
fn host_unix_sockets_are_refused() {
    let scratch = Scratch::new("unix");
    let by_path = HostUnix::bind(&scratch.dir, "host.sock");
    let allowed = HostUnix::bind(&scratch.dir, "allowed.sock");
    let dgram_path = scratch.dir.join("host-dgram.sock");
    let dgram = std::os::unix::net::UnixDatagram::bind(&dgram_path).unwrap();
    dgram.set_nonblocking(true).unwrap();
    std::fs::set_permissions(
        &dgram_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let name = format!("gateway-test-abstract-{}", std::process::id());
    let abstract_listener = {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    };
    let run = Run::new(
        "unix",
        &policy(
            "unix-doors",
            &format!(
                "[[unix.allow]]\npath = {:?}\n",
                allowed.path.to_str().unwrap()
            ),
        ),
    );
    let out = run.python(&format!(
        r#"
def connect(addr):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(addr)
report("path", lambda: connect({path:?}))
report("abstract", lambda: connect("\0{name}"))
report("allowed", lambda: connect({allowed:?}))
report("dgram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"x", {dgram:?}))
# The same host socket under other names: a symlink in a directory the sandbox can write,
# the root as seen through /proc, and a relative path.
link = "/tmp/gateway-test-link-%d" % os.getpid()
os.symlink({path:?}, link)
report("symlink", lambda: connect(link))
os.unlink(link)
report("proc-root", lambda: connect("/proc/self/root" + {path:?}))
os.chdir(os.path.dirname({path:?}))
report("relative", lambda: connect(os.path.basename({path:?})))
"#,
        path = by_path.path.to_str().unwrap(),
        allowed = allowed.path.to_str().unwrap(),
        dgram = dgram_path.to_str().unwrap(),
    ));
    out.assert_refused("path");
    out.assert_refused("abstract");
    out.assert_refused("dgram");
    out.assert_refused("symlink");
    out.assert_refused("proc-root");
    out.assert_refused("relative");
    out.assert_open("allowed");
    out.assert_audited("unix_connect", by_path.path.to_str().unwrap());
    out.assert_audited("unix_connect", &format!("@{name}"));
    out.assert_audited("unix_sendmsg", dgram_path.to_str().unwrap());
    assert_eq!(by_path.accepted(), 0, "{}", out.describe());
    assert_eq!(allowed.accepted(), 1, "{}", out.describe());
    assert!(abstract_listener.accept().is_err(), "{}", out.describe());
    assert!(dgram.recv(&mut [0u8; 16]).is_err(), "{}", out.describe());
}

/// The kernel judges a unix connect by the path as written: an allowed path in a directory
/// the sandbox's user may write could be turned into a link to any socket that user may
/// reach. Such a policy is refused before anything starts.
#[test]
fn an_allowed_socket_path_the_sandbox_could_replace_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let scratch = Scratch::new("unix-replaceable");
    let allowed = HostUnix::bind(&scratch.dir, "svc.sock");
    std::fs::set_permissions(&scratch.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = allowed.path.to_str().unwrap();
    let run = Run::new(
        "unix-replaceable",
        &policy(
            "unix-replaceable",
            &format!("[[unix.allow]]\npath = {path:?}\n"),
        ),
    );
    let out = run.finish(run.command(&["sh", "-c", "echo started"]).output().unwrap());
    let ctx = out.describe();
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(!out.stdout.contains("started"), "CMD ran\n{ctx}");
    for part in [
        format!("[[unix.allow]] path {path}"),
        format!(
            "the sandbox's user may write directory {} (mode 777",
            scratch.dir.display()
        ),
        "put a link to another socket in its place".to_owned(),
    ] {
        assert!(out.stderr.contains(&part), "no {part:?} on stderr\n{ctx}");
    }
    // Only root may write it: the same policy runs.
    std::fs::set_permissions(&scratch.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run.finish(run.command(&["sh", "-c", "echo started"]).output().unwrap());
    assert_eq!(out.stdout, "started\n", "{}", out.describe());
}

#[test]
fn raw_packet_and_icmp_sockets_are_refused() {
    let run = Run::new("raw", &policy("raw", ""));
    let out = run.python(
        r#"
report("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
report("raw6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
report("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
report("icmp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
report("vsock", lambda: socket.socket(40, socket.SOCK_STREAM, 0))
report("mptcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262))
report("udplite", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, 136))
report("sock_diag", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4))
report("netlink-route", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
"#,
    );
    for door in [
        "raw",
        "raw6",
        "packet",
        "icmp",
        "vsock",
        "mptcp",
        "udplite",
        "sock_diag",
    ] {
        out.assert_refused(door);
    }
    out.assert_open("netlink-route");
    let pid = out.pid();
    let audited = |reason: &str, proto_prefix: &str| {
        out.audit.iter().any(|r| {
            r["hook"] == "sock_create"
                && r["reason"] == reason
                && r["pid"].as_u64() == Some(pid)
                && r["proto"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(proto_prefix))
        })
    };
    assert!(audited("socket-family", "packet/"), "{}", out.describe());
    assert!(audited("socket-family", "vsock/"), "{}", out.describe());
    assert!(audited("socket-family", "netlink/"), "{}", out.describe());
    assert!(
        audited("socket-protocol", "inet/stream/262"),
        "{}",
        out.describe()
    );
    assert!(
        audited("socket-protocol", "inet6/dgram/136"),
        "{}",
        out.describe()
    );
}

#[test]
fn sandbox_cannot_leave_its_cgroup() {
    let run = Run::new("cgroup", &policy("cgroup", ""));
    let out = run.python(
        r#"
import pathlib
own = open("/proc/self/cgroup").read().strip().split("::")[-1]
root = [l.split()[4] for l in open("/proc/self/mountinfo") if " - cgroup2 " in l][0]
parent = pathlib.Path(root + own).parent
def write_parent():
    with open(parent / "cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
def write_root():
    with open(pathlib.Path(root) / "cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
def make_child():
    os.mkdir(pathlib.Path(root + own) / "escape")
report("parent", write_parent)
report("root", write_root)
report("child", make_child)
print(json.dumps({"cgroup": own}), flush=True)
"#,
    );
    for door in ["parent", "root", "child"] {
        out.assert_refused(door);
    }
    let cgroup = out.lines.iter().find_map(|l| l["cgroup"].as_str()).unwrap();
    assert!(cgroup.starts_with("/gateway/"), "{}", out.describe());
}

#[test]
fn tunnel_is_reachable_with_curl() {
    let run = Run::new("curl", &policy("curl", ""));
    let out = run.sh(r#"curl -sS -m 5 -o /dev/null -w '%{http_code}' http://service.invalid/"#);
    assert!(out.status.success(), "{}", out.stdout);
    // The tunnel answered through HTTP_PROXY: no rule allows the host, so 403.
    assert_eq!(out.stdout.trim(), "403", "{}", out.stderr);
    let refused = run.audit_records().into_iter().any(|r| {
        r["layer"] == "proxy" && r["reason"] == "not-allowlisted" && r["host"] == "service.invalid"
    });
    assert!(refused, "no proxy record for the refusal");
}

#[test]
fn network_allow_opens_exactly_the_listed_port_and_protocol() {
    let allowed = HostTcp::bind("127.0.0.1:0");
    let other = HostTcp::bind("127.0.0.1:0");
    let udp_same_port = HostUdp::bind(&format!("127.0.0.1:{}", allowed.port));
    let run = Run::new(
        "allow",
        &policy(
            "allow",
            &format!(
                "[[network.allow]]\ncidr = \"127.0.0.0/30\"\nports = [{}]\nprotocol = \"tcp\"\n",
                allowed.port
            ),
        ),
    );
    let out = run.python(&format!(
        r#"
report("allowed", lambda: socket.create_connection(("127.0.0.1", {a}), timeout=3))
report("other-address-in-cidr", lambda: socket.create_connection(("127.0.0.2", {a}), timeout=3))
report("other-port", lambda: socket.create_connection(("127.0.0.1", {o}), timeout=3))
report("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {a})))
report("outside-cidr", lambda: socket.create_connection(("127.0.0.9", {a}), timeout=3))
"#,
        a = allowed.port,
        o = other.port
    ));
    out.assert_open("allowed");
    out.assert_refused("other-port");
    out.assert_refused("udp");
    out.assert_refused("outside-cidr");
    // 127.0.0.2 is inside the CIDR: allowed by the kernel, refused by nobody listening there.
    assert_ne!(out.door("other-address-in-cidr")["errno"], EPERM);
    assert_eq!(allowed.accepted(), 1, "{}", out.describe());
    assert_eq!(other.accepted(), 0);
    assert_eq!(udp_same_port.received(), 0);
    out.assert_audited("connect4", &format!("127.0.0.1:{}", other.port));
    out.assert_audited("sendmsg4", &format!("127.0.0.1:{}", allowed.port));
}

#[test]
fn fail_closed_after_the_gateway_is_killed() {
    let target = HostTcp::bind("127.0.0.1:0");
    let run = Run::new("killed", &policy("killed", ""));
    let go = run.scratch.dir.join("go");
    let script = format!(
        r#"{PRELUDE}
print("ready", flush=True)
deadline = time.time() + 30
while not os.path.exists({go:?}) and time.time() < deadline:
    time.sleep(0.05)
report("after-kill", lambda: socket.create_connection(("127.0.0.1", {p}), timeout=3))
report("tunnel-after-kill", lambda: socket.create_connection(("127.0.0.1", TUNNEL_PORT), timeout=3))
time.sleep(60)
"#,
        go = go.to_str().unwrap(),
        p = target.port
    );
    let mut gateway = run
        .command(&["python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = wait_for_line(&mut gateway, "ready");
    gateway.kill().unwrap();
    assert_eq!(gateway.wait().unwrap().signal(), Some(libc::SIGKILL));
    std::fs::write(&go, "").unwrap();
    let mut results = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        results.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(results[0]["door"], "after-kill");
    assert_eq!(results[0]["ok"], false, "{results:?}");
    assert_eq!(results[0]["errno"], EPERM, "{results:?}");
    // The tunnel died with the gateway: nothing listens there any more.
    assert_eq!(results[1]["ok"], false, "{results:?}");
    assert_eq!(target.accepted(), 0);

    // A later cleanup kills the orphaned sandbox and removes what the run left.
    let cleanup = std::process::Command::new(gateway_bin())
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(cleanup.status.success(), "{cleanup:?}");
    // With tests in parallel another run's start may have cleaned up first; either way
    // nothing of the killed run may remain.
    let text = String::from_utf8_lossy(&cleanup.stdout);
    assert!(
        text.contains("cleaned up killed") || text.contains("nothing to clean up"),
        "{text}"
    );
    let pid = gateway.id();
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/gateway/{pid}")).exists());
    assert!(!std::path::Path::new(&format!("/run/gateway/{pid}")).exists());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    assert_eq!(rest, "", "the sandboxed process outlived cleanup");
}

/// A run whose gateway was SIGKILLed after its sandbox had been refused a few times, and
/// whose sandbox has been refused `wanted` more times since: refusals that only the dead
/// gateway's ring holds.
struct Killed {
    run: Run,
    /// The sandbox's name.
    name: String,
    before: HostTcp,
    after: HostTcp,
    /// The dead gateway's pid, which names its state and pin directories.
    pid: u32,
    /// The sandbox's stdout: one line per refused connection after the kill.
    reader: std::io::BufReader<std::process::ChildStdout>,
    refused_after: usize,
}

impl Killed {
    fn new(tag: &str, wanted: usize) -> Self {
        let before = HostTcp::bind("127.0.0.1:0");
        let after = HostTcp::bind("127.0.0.1:0");
        let run = Run::new(tag, &policy(tag, ""));
        let go = run.scratch.dir.join("go");
        // Refused connections to one loopback port until the gateway is dead, then to
        // another: a record of the second can only come from the ring of a dead gateway.
        let script = format!(
            r#"{PRELUDE}{ATTEMPT}n = 0
deadline = time.time() + 60
while not os.path.exists({go:?}) and time.time() < deadline:
    attempt({before})
    n += 1
    if n == 5:
        print("ready", flush=True)
    time.sleep(0.02)
for i in range(1, 1000):
    opened = attempt({after})
    print(json.dumps({{"after": i, "opened": opened}}), flush=True)
    time.sleep(0.02)
time.sleep(60)
"#,
            go = go.to_str().unwrap(),
            before = before.port,
            after = after.port,
        );
        let mut gateway = run
            .command(&["python3", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut reader = wait_for_line(&mut gateway, "ready");
        let pid = gateway.id();
        gateway.kill().unwrap();
        assert_eq!(gateway.wait().unwrap().signal(), Some(libc::SIGKILL));
        std::fs::write(&go, "").unwrap();
        let mut refused_after = 0;
        while refused_after < wanted {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            assert!(n > 0, "the sandbox exited early");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["opened"], false, "a connection got out: {v}");
            refused_after += 1;
        }
        let killed = Self {
            run,
            name: tag.to_owned(),
            before,
            after,
            pid,
            reader,
            refused_after,
        };
        assert_eq!(
            killed.saved(),
            0,
            "refusals after the kill recorded before cleanup"
        );
        killed
    }

    /// Kernel deny records in the log of refusals after the kill.
    fn saved(&self) -> usize {
        let dst = format!("127.0.0.1:{}", self.after.port);
        self.run
            .audit_records()
            .iter()
            .filter(|r| {
                r["layer"] == "kernel"
                    && r["verdict"] == "deny"
                    && r["sandbox"] == self.name.as_str()
                    && r["hook"] == "connect4"
                    && r["dst"] == dst
                    && r["comm"] == "python3"
                    && r["uid"].as_u64() == Some(65534)
                    && r["reason"] == "not-allowlisted"
            })
            .count()
    }

    /// Refusals after the kill: those the sandbox reported, counting any it reported
    /// until cleanup killed it.
    fn refused_after(&mut self) -> usize {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.reader, &mut rest).unwrap();
        self.refused_after += rest.lines().filter(|l| l.contains("\"after\"")).count();
        self.refused_after
    }

    fn pins(&self) -> std::path::PathBuf {
        format!("/sys/fs/bpf/gateway/{}", self.pid).into()
    }

    fn state(&self) -> std::path::PathBuf {
        format!("/run/gateway/{}", self.pid).into()
    }

    fn assert_saved_and_verified(&mut self) {
        let refused = self.refused_after();
        assert!(!self.pins().exists(), "the pins outlived cleanup");
        assert!(!self.state().exists(), "the state outlived cleanup");
        let records = self.run.audit_records();
        let saved = self.saved();
        let lost: u64 = lost_in(&records);
        // Every refusal after the kill is a record or counted as lost.
        assert!(
            saved as u64 + lost >= refused as u64 && saved > 0,
            "{saved} records + {lost} lost of {refused} refusals after the kill:\n{}",
            joined(&records)
        );
        assert_eq!(self.before.accepted() + self.after.accepted(), 0);
        assert_chain_verifies(&self.run.audit);
    }
}

fn cleanup() -> std::process::Output {
    std::process::Command::new(gateway_bin())
        .arg("cleanup")
        .output()
        .unwrap()
}

/// A gateway killed outright leaves its programs refusing and writing events into a ring
/// that no one reads any more. `gateway cleanup` writes those refusals to the run's own audit
/// log before it unpins anything, as the kernel records the live reader would have written,
/// and the log's hash chain carries on through them.
#[test]
fn refusals_after_the_gateway_is_killed_reach_the_audit_log_at_cleanup() {
    let mut killed = Killed::new("drained", 20);
    let cleanup = cleanup();
    let text = String::from_utf8_lossy(&cleanup.stdout);
    assert!(cleanup.status.success(), "{cleanup:?}");
    killed.assert_saved_and_verified();
    // Another gateway starting meanwhile cleans up (and saves) first; cleanup then has
    // nothing left to do.
    let pid = killed.pid;
    assert!(
        text.contains(&format!("cleaned up drained (gateway pid {pid}): "))
            && text.contains(&format!(
                " refusals saved to {}",
                killed.run.audit.display()
            ))
            || text.contains("nothing to clean up"),
        "{text}"
    );
}

/// When the run's audit log cannot be written, cleanup leaves the run as it is (the sandbox
/// killed, the programs and their unread refusals pinned, the state kept), says what to do
/// and fails; once the log is writable again, the next cleanup saves them.
#[test]
fn cleanup_keeps_the_refusals_pinned_while_the_audit_log_cannot_be_written() {
    let mut killed = Killed::new("unwritable", 10);
    // Immutable: not even root may append to it.
    let chattr = |flag: &str| {
        let out = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&killed.run.audit)
            .output()
            .unwrap();
        assert!(out.status.success(), "chattr {flag}: {out:?}");
    };
    chattr("+i");
    let refused = cleanup();
    chattr("-i");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        stderr.contains("sandbox unwritable")
            && stderr.contains(&format!("make {} writable", killed.run.audit.display()))
            && stderr.contains("run `gateway cleanup` again"),
        "{stderr}"
    );
    assert!(killed.pins().join("EVENTS").exists(), "{stderr}");
    assert!(killed.pins().join("connect4").exists(), "{stderr}");
    assert!(killed.state().join("state.json").exists(), "{stderr}");
    // The sandbox was killed all the same (its stdout ends), and nothing was written.
    killed.refused_after();
    assert_eq!(killed.saved(), 0);

    let retried = cleanup();
    assert!(retried.status.success(), "{retried:?}");
    killed.assert_saved_and_verified();
}

/// When the audit log fails during a run (its disk full), the refusals the kernel made
/// since are still in the programs' ring: `run` does not detach them at exit and destroy
/// them, it fails saying where they are and what to do, and `gateway cleanup` saves them
/// once the log has room. The chain verifies after that.
#[test]
fn refusals_a_full_audit_log_could_not_take_are_saved_by_cleanup() {
    let tag = "log-full";
    let after = HostTcp::bind("127.0.0.1:0");
    let mut run = Run::new(tag, &policy(tag, ""));
    let disk = SmallFs::mount(run.scratch.dir.join("auditfs"), "16k");
    run.audit = disk.0.join("audit.jsonl");
    // Refusals to 200 ports below the ephemeral range (a record is ~300 bytes; repeats of
    // one refusal would make one record) until the log is surely full, then to `after`:
    // only the ring can hold those.
    let script = format!(
        r#"{PRELUDE}{ATTEMPT}opened = sum(attempt(1000 + i) for i in range(200))
time.sleep(1.5)
opened += sum(attempt({after}) for _ in range(20))
print(opened)
"#,
        after = after.port,
    );
    let child = run
        .command(&["python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().last(), Some("0"), "{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/gateway/{pid}"));
    assert!(
        stderr.contains(&format!(
            "its programs stay pinned in {} with the refusals not yet in the log: make {} writable",
            pins.display(),
            run.audit.display()
        )) && stderr.contains("run `gateway cleanup`"),
        "{stderr}"
    );
    let to_after = |records: &[serde_json::Value]| {
        let dst = format!("127.0.0.1:{}", after.port);
        records
            .iter()
            .filter(|r| r["hook"] == "connect4" && r["dst"] == dst && r["sandbox"] == tag)
            .count()
    };
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&run.audit)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    assert_eq!(to_after(&read()), 0, "the log was not full yet");
    // Kept for cleanup: the ring, the lost count, the links and the run's state (unless
    // another test's gateway, starting meanwhile, already tried to clean up: it cannot
    // write the log either, and leaves them too).
    assert!(pins.join("EVENTS").exists(), "{stderr}");
    assert!(pins.join("connect4").exists(), "{stderr}");
    assert!(
        std::path::Path::new(&format!("/run/gateway/{pid}/state.json")).exists(),
        "{stderr}"
    );

    disk.make_room_and_clean_up();
    assert!(!pins.exists(), "the pins outlived cleanup");
    let records = read();
    let lost: u64 = lost_in(&records);
    // The reader took none of them off the ring: the log had failed before. The ring
    // holds them all (a few hundred events; it has room for ~2,000).
    assert_eq!(to_after(&records), 20, "{lost} lost\n{}", joined(&records));
    assert_eq!(after.accepted(), 0);
    assert_chain_verifies(&run.audit);
}

/// Every refusal made after the log failed is, once `gateway cleanup` has run, a record or
/// counted, exactly: the live reader takes none off the ring once the log has failed. The
/// log is filled with the tunnel's refusals here, so that every kernel refusal comes after
/// the failure. (What the reader had counted and not recorded when the log failed is kept
/// as a count: the unit test `refusals_the_failed_log_did_not_take_are_counted`.)
#[test]
fn refusals_after_the_log_failed_are_each_recorded_or_counted() {
    let tag = "log-failed-count";
    let mut run = Run::new(tag, &policy(tag, ""));
    let disk = SmallFs::mount(run.scratch.dir.join("auditfs"), "16k");
    run.audit = disk.0.join("audit.jsonl");
    let attempts = 1000;
    let out = run.python(&format!(
        r#"
last = ""
for i in range(1000):
    c = socket.create_connection((TUNNEL_HOST, TUNNEL_PORT), timeout=10)
    c.sendall(("GET http://nowhere.test/%s HTTP/1.1\r\nHost: nowhere.test\r\n"
               "Connection: close\r\n\r\n" % ("x" * 500)).encode())
    last = c.recv(4096).decode(errors="replace").split("\r\n")[0]
    c.close()
    if " 503 " in last:
        break
{SENDS}
libc = ctypes.CDLL(None, use_errno=True)
keys = sum(libc.syscall(249, b"user", b"gateway-test-absent", None, 0) < 0
           and ctypes.get_errno() == errno.EPERM for _ in range({attempts}))
print(json.dumps({{"last": last, "refused": refused_sends({attempts}, 9), "keys": keys}}),
      flush=True)
"#
    ));
    let ctx = out.describe();
    let printed = |key: &str| {
        out.lines
            .iter()
            .find(|l| !l[key].is_null())
            .map(|l| l[key].clone())
    };
    assert!(
        printed("last").is_some_and(|l| l.as_str().unwrap_or_default().contains(" 503 ")),
        "the log never failed\n{ctx}"
    );
    assert_eq!(printed("refused"), Some(attempts.into()), "{ctx}");
    assert_eq!(printed("keys"), Some(attempts.into()), "{ctx}");
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    let pid = out.pid();
    assert_eq!(refusals_in(&out.audit, pid), 0, "{ctx}");
    disk.make_room_and_clean_up();
    let records = run.audit_records();
    let lost: u64 = lost_in(&records);
    let recorded = refusals_in(&records, pid);
    // The seccomp notifier's refusals were not in the ring: each is counted, as lost.
    let keys: u64 = records
        .iter()
        .filter(|r| r["hook"] == "request_key")
        .map(|r| r["repeats"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(
        recorded + keys + lost,
        2 * attempts,
        "recorded {recorded} + {keys} + lost {lost} != {} refusals\n{ctx}",
        2 * attempts
    );
}

/// The state of a run from a gateway that did not record its audit log: cleanup still
/// removes it, and says that its refusals could not be saved rather than fail.
#[test]
fn cleanup_of_a_run_without_a_recorded_audit_log_says_its_refusals_were_not_saved() {
    assert_root();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let id = format!("old-{}", gone.id());
    let dir = std::path::Path::new("/run/gateway").join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    // As an older gateway wrote it: no `audit_log`; nothing of it left in the kernel.
    let state = serde_json::json!({
        "pid": gone.id(),
        "start_time": 0,
        "sandbox": "old",
        "cgroup_dir": format!("/sys/fs/cgroup/gateway-test-absent/{id}"),
        "pin_dir": format!("/sys/fs/bpf/gateway/{id}"),
        "keep_cgroup": false,
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    let out = cleanup();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.exists(), "the old state outlived cleanup");
    // Another gateway starting meanwhile may have cleaned it up first.
    assert!(
        text.contains(&format!(
            "cleaned up old (gateway pid {}): the refusals its programs made after the gateway died could not be saved: its state, from an older gateway, does not say where its audit log is",
            gone.id()
        )) || text.contains("nothing to clean up"),
        "{text}"
    );
}

/// After `kill -9` the tunnel's port is free while the sandbox still may connect to the
/// tunnel's address (fail closed leaves that one door). An unprivileged host process that
/// binds the port must get nothing: the kernel lets a connection to the tunnel's address
/// through only when the gateway's own listener is the one that would take it. Before the
/// kill, the same connections reach the real tunnel.
fn a_squatter_gets_nothing(tag: &str, listen: &str, attempts: &[(&str, &str, &str)]) {
    let run = Run::new(
        tag,
        &policy(tag, &format!("[tunnel]\nlisten = \"{listen}\"\n")),
    );
    let go = run.scratch.dir.join("go");
    let tries: String = attempts
        .iter()
        .map(|(name, family, host)| {
            format!("report({name:?}, lambda: ask(socket.{family}, {host:?}, {name:?}))\n")
        })
        .collect();
    let script = format!(
        r#"{PRELUDE}
print(json.dumps({{"tunnel_port": TUNNEL_PORT}}), flush=True)
def ask(family, host, name):
    s = socket.socket(family)
    request = b"CONNECT api.github.test:443 HTTP/1.1\r\nHost: api.github.test:443\r\n\r\n"
    if name == "fastopen":
        # Blocking: with a timeout Python makes the socket non-blocking (EINPROGRESS).
        s.sendto(request, socket.MSG_FASTOPEN, (host, TUNNEL_PORT))
        s.settimeout(3)
    else:
        s.settimeout(3)
        s.connect((host, TUNNEL_PORT))
        s.sendall(request)
    answer = s.recv(4096).split(b"\r\n")[0].decode(errors="replace")
    print(json.dumps({{"door": name, "answer": answer}}), flush=True)
{tries}print("ready", flush=True)
deadline = time.time() + 30
while not os.path.exists({go:?}) and time.time() < deadline:
    time.sleep(0.05)
{tries}time.sleep(60)
"#,
        go = go.to_str().unwrap(),
    );
    let mut gateway = run
        .command(&["python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(gateway.stdout.take().unwrap());
    let mut read_until = |stop: &dyn Fn(&str) -> bool| {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            assert!(n > 0, "the sandbox exited early: {lines:?}");
            if stop(line.trim()) {
                return lines;
            }
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                lines.push(v);
            }
        }
    };
    // Through the real tunnel, each way answers: 403, as the policy allows no host.
    let before = read_until(&|l| l == "ready");
    for (name, _, _) in attempts {
        let answer = before
            .iter()
            .find(|v| v["door"] == *name && v.get("answer").is_some())
            .unwrap_or_else(|| panic!("{name}: no answer from the tunnel: {before:?}"));
        assert!(
            answer["answer"]
                .as_str()
                .unwrap()
                .starts_with("HTTP/1.1 403"),
            "{before:?}"
        );
    }
    let port = before
        .iter()
        .find_map(|v| v["tunnel_port"].as_u64())
        .unwrap_or_else(|| panic!("no tunnel port: {before:?}"));
    gateway.kill().unwrap();
    assert_eq!(gateway.wait().unwrap().signal(), Some(libc::SIGKILL));
    let listen: std::net::SocketAddr = listen.parse().unwrap();
    let squatter = Squatter::bind(std::net::SocketAddr::new(listen.ip(), port as u16));
    std::fs::write(&go, "").unwrap();
    let mut after = Vec::new();
    while after.len() < attempts.len() {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(n > 0, "the sandbox exited early: {after:?}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("ok").is_some() {
            after.push(v);
        }
    }
    let squatted = squatter.stop();
    assert!(
        squatted.is_empty(),
        "the squatter got the sandbox's connections: {squatted:?}\nsandbox: {after:?}"
    );
    for (v, (name, _, _)) in after.iter().zip(attempts) {
        assert_eq!(v["door"], *name, "{after:?}");
        assert_eq!(v["ok"], false, "{after:?}");
        assert_eq!(v["errno"], EPERM, "{after:?}");
    }

    let cleanup = std::process::Command::new(gateway_bin())
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(cleanup.status.success(), "{cleanup:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    assert_eq!(rest, "", "the sandboxed process outlived cleanup");
    // These refusals waited in the dead gateway's ring: cleanup wrote them to the run's log
    // before it unpinned anything.
    let records = run.audit_records();
    assert!(
        records.iter().any(|r| r["reason"] == "not-the-tunnel"),
        "{records:?}"
    );
}

#[test]
fn a_squatter_on_the_tunnel_port_gets_nothing_after_the_gateway_is_killed() {
    a_squatter_gets_nothing(
        "squat",
        "127.0.0.1:0",
        &[
            ("v4", "AF_INET", "127.0.0.1"),
            ("mapped", "AF_INET6", "::ffff:127.0.0.1"),
            ("fastopen", "AF_INET", "127.0.0.1"),
        ],
    );
}

#[test]
fn a_squatter_on_an_ipv6_tunnel_port_gets_nothing_after_the_gateway_is_killed() {
    a_squatter_gets_nothing("squat6", "[::1]:0", &[("v6", "AF_INET6", "::1")]);
}

#[test]
fn exit_status_passes_through() {
    let run = Run::new("exit", &policy("exit", ""));
    assert_eq!(run.sh("exit 7").status.code(), Some(7));
    assert_eq!(run.sh("kill -9 $$").status.code(), Some(128 + 9));
}

#[test]
fn sigterm_is_forwarded_to_the_command() {
    let run = Run::new("sigterm", &policy("sigterm", ""));
    let mut gateway = run
        .command(&[
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _reader = wait_for_line(&mut gateway, "ready");
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(gateway.id() as i32, libc::SIGTERM) };
    let status = gateway.wait().unwrap();
    assert_eq!(status.code(), Some(42));
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/gateway/{}", gateway.id())).exists());
}

#[test]
fn a_second_sigterm_kills_a_command_that_ignores_the_first() {
    let run = Run::new("sigterm-twice", &policy("sigterm-twice", ""));
    let mut gateway = run
        .command(&["sh", "-c", "trap '' TERM; echo ready; sleep 60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _reader = wait_for_line(&mut gateway, "ready");
    for _ in 0..2 {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(gateway.id() as i32, libc::SIGTERM) };
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let status = gateway.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status:?}");
}

#[test]
fn credential_variables_are_removed_from_the_sandbox() {
    let run = Run::new(
        "secret-env",
        &policy(
            "secret-env",
            "[credentials.api]\nenv = \"GATEWAY_TEST_SECRET\"\n",
        ),
    );
    let out = run.finish(
        run.command(&["sh", "-c", "env"])
            .env("GATEWAY_TEST_SECRET", "s3cr3t-value-never-inside")
            .env("GATEWAY_TEST_PLAIN", "kept")
            .output()
            .unwrap(),
    );
    assert!(out.status.success());
    assert!(
        !out.stdout.contains("GATEWAY_TEST_SECRET"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("s3cr3t"), "{}", out.stdout);
    assert!(out.stdout.contains("GATEWAY_TEST_PLAIN=kept"));
    for var in [
        "HTTP_PROXY=http://127.0.0.1:",
        "HTTPS_PROXY=http://127.0.0.1:",
        "http_proxy=http://127.0.0.1:",
        "https_proxy=http://127.0.0.1:",
        "NO_PROXY=\n",
        "no_proxy=\n",
        "SSL_CERT_FILE=/run/gateway/",
        "CURL_CA_BUNDLE=",
        "REQUESTS_CA_BUNDLE=",
        "NODE_EXTRA_CA_CERTS=",
        "GIT_SSL_CAINFO=",
    ] {
        assert!(
            out.stdout.contains(var),
            "missing {var:?} in\n{}",
            out.stdout
        );
    }
}

#[test]
fn run_as_non_root_fails_with_the_clear_message() {
    let scratch = Scratch::new("nonroot");
    // A copy the unprivileged user can execute wherever the checkout lives.
    let bin = scratch.dir.join("gateway");
    std::fs::copy(gateway_bin(), &bin).unwrap();
    let policy = scratch.write("p.toml", "version = 1\n");
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["run", "--policy"])
        .arg(&policy)
        .args(["--", "true"]);
    // SAFETY: setgid/setuid between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gateway run needs root (CAP_BPF, CAP_SYS_ADMIN): run it with sudo"),
        "{stderr}"
    );
}

/// A run that cannot bind its tunnel has made nothing, and leaves no state that the next
/// run would take for a crashed gateway's.
#[test]
fn a_run_that_cannot_bind_its_tunnel_leaves_nothing_behind() {
    let scratch = Scratch::new("busy-port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let policy = scratch.write(
        "p.toml",
        &format!("version = 1\n[tunnel]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let child = std::process::Command::new(gateway_bin())
        .args(["run", "--audit-log"])
        .arg(scratch.dir.join("audit.jsonl"))
        .arg("--policy")
        .arg(&policy)
        .args(["--", "true"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Address already in use"), "{stderr}");
    assert!(
        !std::path::Path::new(&format!("/run/gateway/{pid}")).exists(),
        "state left behind\n{stderr}"
    );
}

#[test]
fn inherited_descriptors_are_closed() {
    let run = Run::new("fds", &policy("fds", ""));
    let udp = HostUdp::bind("127.0.0.1:0");
    // A socket opened outside the sandbox and left open across exec, as fd 3 of gateway run.
    let outside = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    outside.connect(("127.0.0.1", udp.port)).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&outside);
    let mut cmd = run.command(&[
        "python3",
        "-c",
        &format!(
            "{PRELUDE}\nprint(json.dumps({{'fds': sorted(int(f) for f in os.listdir('/proc/self/fd'))}}))\nreport('inherited', lambda: os.write(3, b'x'))"
        ),
    ]);
    // SAFETY: dup2/fcntl between fork and exec on fds we own.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let out = run.finish(cmd.output().unwrap());
    let fds = out
        .lines
        .iter()
        .find_map(|l| l["fds"].as_array().cloned())
        .unwrap();
    // 0, 1, 2 and the descriptor listdir itself opened.
    assert_eq!(fds.len(), 4, "{}", out.describe());
    assert_eq!(&fds[..3], &[0, 1, 2]);
    assert_eq!(out.door("inherited")["ok"], false);
    assert_eq!(udp.received(), 0);
}

/// The cgroup programs judge a socket by the cgroup that made it, and only descriptors 0-2
/// reach CMD: a UDP or TCP socket made outside and given as CMD's stdin or stdout would carry
/// whatever CMD writes to wherever it points, unseen. `gateway run` refuses to start with
/// one (exit 2, naming the descriptor, what it is and what to give instead) before it makes
/// anything; CMD never runs and the host's listeners get nothing.
#[test]
fn a_network_socket_as_stdio_is_refused_before_anything_starts() {
    let run = Run::new("stdio-socket", &policy("stdio-socket", ""));
    let udp = HostUdp::bind("127.0.0.1:0");
    let stdin = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stdin.connect(("127.0.0.1", udp.port)).unwrap();
    let out = run.finish(
        run.command(&["sh", "-c", "echo started; echo leaked >&0"])
            .stdin(OwnedFd::from(stdin))
            .output()
            .unwrap(),
    );
    let ctx = out.describe();
    assert_eq!(udp.received(), 0, "CMD wrote through the socket\n{ctx}");
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(!out.stdout.contains("started"), "CMD ran\n{ctx}");
    for part in [
        "stdin (fd 0)",
        "UDP socket (AF_INET)",
        "a pipe, a file or a terminal",
    ] {
        assert!(out.stderr.contains(part), "no {part:?} on stderr\n{ctx}");
    }
    assert!(out.audit.is_empty(), "{ctx}");

    let tcp = HostTcp::bind("[::1]:0");
    let stdout = std::net::TcpStream::connect(("::1", tcp.port)).unwrap();
    let out = run.finish(
        run.command(&["sh", "-c", "echo leaked"])
            .stdout(OwnedFd::from(stdout))
            .output()
            .unwrap(),
    );
    let ctx = out.describe();
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    for part in ["stdout (fd 1)", "TCP socket (AF_INET6)"] {
        assert!(out.stderr.contains(part), "no {part:?} on stderr\n{ctx}");
    }
    let (mut conn, _) = loop {
        match tcp.listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    conn.set_nonblocking(false).unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got).unwrap();
    assert!(
        !got.contains("leaked"),
        "CMD wrote through the socket\n{ctx}"
    );
}

/// A unix socket as stdio is how systemd gives services their journal: it still works.
#[test]
fn a_connected_unix_stream_as_stdio_works_and_other_unix_sockets_do_not() {
    let run = Run::new("stdio-unix", &policy("stdio-unix", ""));
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut &ours, b"from the host\n").unwrap();
    ours.shutdown(std::net::Shutdown::Write).unwrap();
    let out = run.finish(
        run.command(&["sh", "-c", "read line; echo \"got: $line\""])
            .stdin(OwnedFd::from(theirs))
            .output()
            .unwrap(),
    );
    let ctx = out.describe();
    assert!(out.status.success(), "{ctx}");
    assert!(out.stdout.contains("got: from the host"), "{ctx}");
    // A unix datagram socket sends to any path `sendto` names, connected or not, and an
    // unconnected stream could be connected anywhere from inside: refused.
    let (_ours, datagram) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let unconnected = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    for (fd, kind) in [
        (OwnedFd::from(datagram), "datagram"),
        (unconnected, "unconnected"),
    ] {
        let out = run.finish(
            run.command(&["sh", "-c", "echo started"])
                .stdin(fd)
                .output()
                .unwrap(),
        );
        let ctx = out.describe();
        assert_eq!(out.status.code(), Some(2), "{kind}\n{ctx}");
        assert!(!out.stdout.contains("started"), "CMD ran\n{ctx}");
        assert!(
            out.stderr
                .contains(&format!("stdin (fd 0) is a {kind} socket (AF_UNIX)")),
            "{ctx}"
        );
    }
}

#[test]
fn two_sandboxes_do_not_share_allowances() {
    let a = HostTcp::bind("127.0.0.1:0");
    let b = HostTcp::bind("127.0.0.1:0");
    let allow =
        |port: u16| format!("[[network.allow]]\ncidr = \"127.0.0.1/32\"\nports = [{port}]\n");
    let run_a = Run::new("two-a", &policy("two-a", &allow(a.port)));
    let run_b = Run::new("two-b", &policy("two-b", &allow(b.port)));
    let script = |go: &std::path::Path| {
        format!(
            r#"{PRELUDE}
print("ready", flush=True)
deadline = time.time() + 30
while not os.path.exists({go:?}) and time.time() < deadline:
    time.sleep(0.05)
report("a", lambda: socket.create_connection(("127.0.0.1", {pa}), timeout=3))
report("b", lambda: socket.create_connection(("127.0.0.1", {pb}), timeout=3))
"#,
            go = go.to_str().unwrap(),
            pa = a.port,
            pb = b.port
        )
    };
    let go = run_a.scratch.dir.join("go");
    let spawn = |run: &Run| {
        let mut child = run
            .command(&["python3", "-c", &script(&go)])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let reader = wait_for_line(&mut child, "ready");
        (child, reader)
    };
    let (mut child_a, reader_a) = spawn(&run_a);
    let (mut child_b, reader_b) = spawn(&run_b);
    // Both sandboxes are up at once before either tries.
    std::fs::write(&go, "").unwrap();
    let collect = |child: &mut std::process::Child, mut reader: std::io::BufReader<_>| {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
        assert!(child.wait().unwrap().success());
        json_lines(&rest)
    };
    let out_a = collect(&mut child_a, reader_a);
    let out_b = collect(&mut child_b, reader_b);
    let door = |lines: &[serde_json::Value], d: &str| {
        lines.iter().find(|l| l["door"] == d).cloned().unwrap()
    };
    assert_eq!(door(&out_a, "a")["ok"], true, "{out_a:?}");
    assert_eq!(door(&out_a, "b")["errno"], EPERM, "{out_a:?}");
    assert_eq!(door(&out_b, "b")["ok"], true, "{out_b:?}");
    assert_eq!(door(&out_b, "a")["errno"], EPERM, "{out_b:?}");
    assert_eq!(a.accepted(), 1);
    assert_eq!(b.accepted(), 1);
}

/// The `sendmsg4` refusals of process `pid` that `records` stand for: one a record, or as
/// many as a record's `repeats` (those after the first of a second).
fn refusals_in(records: &[serde_json::Value], pid: u64) -> u64 {
    records
        .iter()
        .filter(|r| r["hook"] == "sendmsg4" && r["pid"].as_u64() == Some(pid))
        .map(|r| r["repeats"].as_u64().unwrap_or(1))
        .sum()
}

/// Python: `refused_sends(n, port)`, how many of `n` datagrams to 127.0.0.1 the sandbox
/// refused; `port` is a port or a function of the datagram's index. After [`PRELUDE`].
const SENDS: &str = r#"
def refused_sends(n, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    refused = 0
    for i in range(n):
        try:
            s.sendto(b"x", ("127.0.0.1", port(i) if callable(port) else port))
        except PermissionError:
            refused += 1
    return refused
"#;

/// 20,000 refused datagrams from one sandboxed process, sent to `127.0.0.1:PORT` with PORT
/// the Python expression `port` (of the attempt's index `i`); the run's end, its pid, and
/// the refusals it made as records, suppressed and lost, which must add up to all of them.
fn sendto_flood(tag: &str, port: &str) -> (Finished, u64, [u64; 3]) {
    let run = Run::new(tag, &policy(tag, ""));
    let attempts = 20_000;
    let out = run.python(&format!(
        r#"{SENDS}
print(json.dumps({{"refused": refused_sends({attempts}, lambda i: {port})}}), flush=True)
"#
    ));
    let refused = out.lines.iter().find_map(|l| l["refused"].as_u64());
    assert_eq!(refused, Some(attempts), "{}", out.stdout);
    let pid = out.pid();
    let suppressed = out
        .audit
        .iter()
        .filter(|r| r["reason"] == "refusals-suppressed")
        .filter_map(|r| r["suppressed"].as_u64())
        .sum();
    let counts = [
        refusals_in(&out.audit, pid),
        suppressed,
        lost_in(&out.audit),
    ];
    assert_eq!(
        counts.iter().sum::<u64>(),
        attempts,
        "recorded, suppressed, lost {counts:?} != {attempts} refusals"
    );
    (out, pid, counts)
}

#[test]
fn every_refusal_is_recorded_or_counted_as_lost() {
    let (out, pid, [_, suppressed, _]) = sendto_flood("flood", "9");
    assert_eq!(suppressed, 0);
    // The same refusal 20,000 times is a record and a count for each second it lasted,
    // not 20,000 records.
    let lines = out
        .audit
        .iter()
        .filter(|r| r["hook"] == "sendmsg4" && r["pid"].as_u64() == Some(pid))
        .count();
    assert!(lines <= 20, "{lines} records for one refusal repeated");
}

/// A flood that varies its destination: past 256 different refusals in a second the rest
/// are only counted, in `refusals-suppressed` records; every refusal is still a record, in
/// a record's `repeats`, suppressed or lost, and the log holds a few hundred lines, not a
/// line for each.
#[test]
fn a_flood_of_different_refusals_is_counted_past_the_limit() {
    let (out, _, [_, suppressed, _]) = sendto_flood("flood-wide", "1000 + i % 2000");
    assert!(suppressed > 0, "nothing suppressed");
    let whole = out
        .audit
        .iter()
        .filter(|r| r["hook"] == "sendmsg4" && r["repeats"].is_null())
        .count();
    assert!(
        (256..5000).contains(&whole),
        "{whole} refusals recorded whole"
    );
}

/// A flood of refusals overflows the ring before the gateway is killed and again after:
/// the live reader records what it read and reports the rest as lost; cleanup records what
/// the dead gateway's ring held and reports the rest of the count, without counting again
/// what the live reader reported. Every refusal is a record or counted as lost, once.
#[test]
fn a_flood_across_the_kill_is_recorded_or_counted_as_lost_once() {
    let run = Run::new("flood-kill", &policy("flood-kill", ""));
    let go = run.scratch.dir.join("go");
    let attempts = 20_000;
    let script = format!(
        r#"{PRELUDE}{SENDS}
def flood():
    print(json.dumps({{"refused": refused_sends({attempts}, 9)}}), flush=True)
flood()
deadline = time.time() + 60
while not os.path.exists({go:?}) and time.time() < deadline:
    time.sleep(0.02)
flood()
time.sleep(60)
"#,
        go = go.to_str().unwrap(),
    );
    let mut gateway = run
        .command(&["python3", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(gateway.stdout.take().unwrap());
    let mut next_line = || {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(n > 0, "the sandbox exited early");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let pid = next_line()["pid"].as_u64().unwrap();
    assert_eq!(next_line()["refused"], attempts);
    let counted = |records: &[serde_json::Value]| {
        let recorded = refusals_in(records, pid);
        let lost: u64 = lost_in(records);
        (recorded, lost)
    };
    // The live reader has recorded or counted the first flood, and noted how much of the
    // count is in the log, before the kill.
    let mark = format!("/run/gateway/{}/lost-reported", gateway.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (recorded, lost) = counted(&run.audit_records());
        let marked: u64 = std::fs::read_to_string(&mark)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        if recorded + lost == attempts && marked == lost {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "live: recorded {recorded} + lost {lost} (marked {marked}) != {attempts}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    gateway.kill().unwrap();
    assert_eq!(gateway.wait().unwrap().signal(), Some(libc::SIGKILL));
    std::fs::write(&go, "").unwrap();
    assert_eq!(next_line()["refused"], attempts);

    let cleanup = std::process::Command::new(gateway_bin())
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(cleanup.status.success(), "{cleanup:?}");
    let (recorded, lost) = counted(&run.audit_records());
    assert_eq!(
        recorded + lost,
        2 * attempts,
        "recorded {recorded} + lost {lost} != {} refusals\n{}",
        2 * attempts,
        String::from_utf8_lossy(&cleanup.stdout)
    );
}

/// A secret the sandbox must never read, in a file of its own.
const FILE_SECRET: &str = "gwtest-file-secret-Vb7Nq2Lx";

/// A directory for a credential's secret file, and a policy reading it, with the file's
/// owner, group and mode set as given.
fn secret_file_run(tag: &str, uid: u32, gid: u32, mode: u32) -> (Run, Scratch, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let secrets = Scratch::new(&format!("{tag}-secrets"));
    let file = secrets.write("token", &format!("{FILE_SECRET}\n"));
    std::os::unix::fs::chown(&file, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    let file = file.to_str().unwrap().to_owned();
    let run = Run::new(
        tag,
        &policy(
            tag,
            &format!(
                "[[http.allow]]\nhost = \"api.test\"\ncredential = \"api\"\n[credentials.api]\nfile = {file:?}\n"
            ),
        ),
    );
    (run, secrets, file)
}

/// `sh -c` that says it started, then tries to read `file`.
fn reads(file: &str) -> String {
    format!("echo started; cat {file:?} 2>/dev/null || echo unreadable")
}

/// [`reads`] run in the sandbox as `user`.
fn reads_as(run: &Run, user: &str, file: &str) -> Finished {
    run.finish(
        run.command_as(Some(user), &[], &["sh", "-c", &reads(file)])
            .output()
            .unwrap(),
    )
}

/// The refusal `gateway run` gives before starting anything: exit 2, the credential, the
/// file, `why` and what to do on stderr, and CMD never run.
fn assert_refused_before_start(out: &Finished, file: &str, why: &str) {
    let ctx = out.describe();
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(!out.stdout.contains("started"), "CMD ran\n{ctx}");
    assert!(!out.stdout.contains(FILE_SECRET), "{ctx}");
    assert!(
        !out.stderr.contains(FILE_SECRET),
        "the secret is on stderr\n{ctx}"
    );
    for part in [
        "credential `api`",
        &format!("secret file {file} "),
        why,
        &format!("chown root:root {file} && chmod 600 {file}"),
    ] {
        assert!(out.stderr.contains(part), "no {part:?} on stderr\n{ctx}");
    }
    assert!(out.audit.is_empty(), "{ctx}");
}

#[test]
fn a_secret_file_everyone_may_read_is_refused_before_anything_starts() {
    let (run, _secrets, file) = secret_file_run("secret-file-644", 0, 0, 0o644);
    let out = run.finish(run.command(&["sh", "-c", &reads(&file)]).output().unwrap());
    assert_refused_before_start(&out, &file, "is readable by everyone (mode 644)");
}

#[test]
fn a_root_only_secret_file_is_accepted_and_unreadable_inside() {
    let (run, _secrets, file) = secret_file_run("secret-file-600", 0, 0, 0o600);
    let out = reads_as(&run, "4242", &file);
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(out.stdout, "started\nunreadable\n", "{}", out.describe());
}

#[test]
fn a_secret_file_of_the_sandbox_user_is_refused() {
    let (run, _secrets, file) = secret_file_run("secret-file-owner", 4242, 4242, 0o600);
    let out = reads_as(&run, "4242", &file);
    assert_refused_before_start(&out, &file, "is owned by uid 4242, the sandbox's user");
    assert!(out.stderr.contains("--user"), "{}", out.describe());
    // The default user is the sudo caller: the same file is refused for it too.
    let out = run.finish(
        run.command_as(None, &[], &["sh", "-c", &reads(&file)])
            .env("SUDO_UID", "4242")
            .env("SUDO_GID", "4242")
            .output()
            .unwrap(),
    );
    assert_refused_before_start(&out, &file, "is owned by uid 4242, the sandbox's user");
}

#[test]
fn a_secret_file_a_group_of_the_sandbox_user_may_read_is_refused() {
    let (run, _secrets, file) = secret_file_run("secret-file-group", 0, 4242, 0o640);
    let out = reads_as(&run, "4242", &file);
    assert_refused_before_start(&out, &file, "is readable by group 4242 (mode 640)");
    // nobody is not in group 4242: the file is safe from it.
    let out = run.finish(run.command(&["sh", "-c", &reads(&file)]).output().unwrap());
    assert!(out.status.success(), "{}", out.describe());
    assert_eq!(out.stdout, "started\nunreadable\n", "{}", out.describe());
}

#[test]
fn a_secret_file_in_a_directory_others_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let (run, secrets, file) = secret_file_run("secret-file-dir", 0, 0, 0o600);
    std::fs::set_permissions(&secrets.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run.finish(run.command(&["sh", "-c", &reads(&file)]).output().unwrap());
    let ctx = out.describe();
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(!out.stdout.contains("started"), "CMD ran\n{ctx}");
    for part in [
        "credential `api`",
        &format!(
            "secret file {file} is in directory {}",
            secrets.dir.display()
        ),
        "which others may write (mode 777)",
        "could be replaced",
    ] {
        assert!(out.stderr.contains(part), "no {part:?} on stderr\n{ctx}");
    }
    // Owned by the sandbox's user, it could be replaced from inside.
    std::fs::set_permissions(&secrets.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&secrets.dir, Some(4242), Some(4242)).unwrap();
    let out = reads_as(&run, "4242", &file);
    let ctx = out.describe();
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(out.stderr.contains("which uid 4242 owns"), "{ctx}");
}

/// A link in the middle of the way to the file counts as the file's own directory does: the
/// policy names a link in a root-only directory that leads, through a link in a directory
/// the sandbox's user owns, back to a root-only file; that user could point the middle link
/// at any file root may read, which the tunnel would then send upstream.
#[test]
fn a_secret_file_reached_through_a_link_others_may_replace_is_refused() {
    let (_, secrets, real) = secret_file_run("secret-file-hop", 0, 0, 0o600);
    let hops = Scratch::new("secret-file-hop-links");
    std::os::unix::fs::chown(&hops.dir, Some(4242), Some(4242)).unwrap();
    let hop = hops.dir.join("hop");
    std::os::unix::fs::symlink(&real, &hop).unwrap();
    let named = secrets.dir.join("named");
    std::os::unix::fs::symlink(&hop, &named).unwrap();
    let named = named.to_str().unwrap().to_owned();
    let run = Run::new(
        "secret-file-hop",
        &policy(
            "secret-file-hop",
            &format!(
                "[[http.allow]]\nhost = \"api.test\"\ncredential = \"api\"\n[credentials.api]\nfile = {named:?}\n"
            ),
        ),
    );
    let out = run.finish(run.command(&["sh", "-c", &reads(&real)]).output().unwrap());
    let ctx = out.describe();
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(!out.stdout.contains("started"), "CMD ran\n{ctx}");
    for part in [
        "credential `api`".to_owned(),
        format!(
            "secret file {named} is reached through {}",
            hops.dir.display()
        ),
        "which uid 4242 owns".to_owned(),
    ] {
        assert!(out.stderr.contains(&part), "no {part:?} on stderr\n{ctx}");
    }
    assert!(!out.stderr.contains(FILE_SECRET), "{ctx}");
}

/// Variables whose names look like secrets never reach CMD, unless `--keep-env` names them;
/// one warning names them, never their values.
#[test]
fn secret_looking_variables_are_removed_and_named_in_one_warning() {
    let run = Run::new(
        "secret-names",
        &policy(
            "secret-names",
            "[[http.allow]]\nhost = \"api.test\"\ncredential = \"api\"\n\
             [credentials.api]\nenv = \"GATEWAY_TEST_CRED\"\nplaceholder = \"GATEWAY_TEST_PH_TOKEN\"\n",
        ),
    );
    let removed = [
        ("AWS_SECRET_ACCESS_KEY", "aws-value-Zx81"),
        ("OPENAI_API_KEY", "openai-value-Qp27"),
        ("DB_PASSWORD", "db-value-Lm55"),
        ("gateway_test_token", "lower-value-Tt09"),
    ];
    let kept = [
        ("FOO_BAR", "plain-value"),
        ("LANG", "C.UTF-8"),
        ("KEYBOARD", "us"),
        ("MONKEY", "banana"),
    ];
    let mut cmd = run.command(&["sh", "-c", "env"]);
    cmd.envs(removed).envs(kept);
    cmd.env("GATEWAY_TEST_CRED", "cred-value-Rr31")
        .env("GATEWAY_TEST_PH_TOKEN", "outside-value-Pp44");
    let out = run.finish(cmd.output().unwrap());
    let ctx = out.describe();
    assert!(out.status.success(), "{ctx}");
    for (name, value) in removed {
        assert!(
            !out.stdout.contains(&format!("{name}=")),
            "{name} inside\n{ctx}"
        );
        assert!(!out.stdout.contains(value), "{ctx}");
        assert!(!out.stderr.contains(value), "a value on stderr\n{ctx}");
    }
    for (name, value) in kept {
        assert!(
            out.stdout.contains(&format!("\n{name}={value}\n"))
                || out.stdout.starts_with(&format!("{name}={value}\n")),
            "{name} missing\n{ctx}"
        );
    }
    // The placeholder the gateway sets stays, whatever its name; the credential's own
    // variable goes, as always.
    assert!(
        out.stdout
            .contains("GATEWAY_TEST_PH_TOKEN=gateway-placeholder-api-"),
        "{ctx}"
    );
    assert!(!out.stdout.contains("cred-value"), "{ctx}");
    assert!(!out.stdout.contains("outside-value"), "{ctx}");
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("look like secrets"))
        .collect();
    assert_eq!(warnings.len(), 1, "{ctx}");
    for (name, _) in removed {
        assert!(warnings[0].contains(name), "{name} not named\n{ctx}");
    }
    for name in [
        "FOO_BAR",
        "KEYBOARD",
        "MONKEY",
        "GATEWAY_TEST_PH_TOKEN",
        "GATEWAY_TEST_CRED",
    ] {
        assert!(!warnings[0].contains(name), "{name} named\n{ctx}");
    }
    assert!(warnings[0].contains("--keep-env NAME"), "{ctx}");
}

#[test]
fn keep_env_passes_a_secret_looking_variable_but_never_a_credential_one() {
    let run = Run::new(
        "keep-env",
        &policy(
            "keep-env",
            "[[http.allow]]\nhost = \"api.test\"\ncredential = \"api\"\n\
             [credentials.api]\nenv = \"GATEWAY_TEST_API_TOKEN\"\n",
        ),
    );
    let out = run.finish(
        run.command_with(&["--keep-env", "GITHUB_TOKEN"], &["sh", "-c", "env"])
            .env("GITHUB_TOKEN", "kept-value-Gh12")
            .env("OPENAI_API_KEY", "openai-value-Qp27")
            .env("GATEWAY_TEST_API_TOKEN", "cred-value-Rr31")
            .output()
            .unwrap(),
    );
    let ctx = out.describe();
    assert!(out.status.success(), "{ctx}");
    assert!(
        out.stdout.contains("GITHUB_TOKEN=kept-value-Gh12\n"),
        "{ctx}"
    );
    assert!(!out.stdout.contains("OPENAI_API_KEY"), "{ctx}");
    assert!(!out.stdout.contains("cred-value"), "{ctx}");
    // A credential's variable is never passed, and asking for it is an error.
    let out = run.finish(
        run.command_with(
            &["--keep-env", "GATEWAY_TEST_API_TOKEN"],
            &["sh", "-c", "echo started"],
        )
        .env("GATEWAY_TEST_API_TOKEN", "cred-value-Rr31")
        .output()
        .unwrap(),
    );
    let ctx = out.describe();
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    assert!(!out.stdout.contains("started"), "{ctx}");
    assert!(
        out.stderr.contains("--keep-env GATEWAY_TEST_API_TOKEN")
            && out.stderr.contains("credential `api`"),
        "{ctx}"
    );
    assert!(!out.stderr.contains("cred-value"), "{ctx}");
}
