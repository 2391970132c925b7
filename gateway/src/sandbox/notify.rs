//! Answers the sandbox's seccomp notifications: every one is a refusal, audited, then EPERM.
//! A call through a foreign ABI (i386 `int 0x80`, x32) also kills its process: the filter's
//! rules cover the native ABI only, so no such call may go on.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use libseccomp::{ScmpArch, ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags, notify_id_valid};

use crate::audit::{AuditLog, KernelFields, Layer, Record, Verdict};

/// Serves notifications until `stop` is set or every sandboxed process has exited.
pub fn serve(listener: OwnedFd, audit: AuditLog, sandbox: String, stop: Arc<AtomicBool>) {
    let fd = listener.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 200) };
        if ready <= 0 {
            continue;
        }
        if pfd.revents & libc::POLLHUP != 0 && pfd.revents & libc::POLLIN == 0 {
            return;
        }
        let req = match ScmpNotifReq::receive(fd) {
            Ok(r) => r,
            // The caller may have been killed between poll and receive.
            Err(_) => continue,
        };
        let foreign = foreign_abi(&req);
        let record = describe(&req, &sandbox, foreign.clone());
        if let Err(e) = audit.append(&record) {
            tracing::error!("{e}");
        }
        if foreign.is_some()
            && let Err(e) = kill_caller(fd, &req)
        {
            tracing::error!(pid = req.pid, "killing a foreign-ABI caller: {e}");
        }
        let resp = ScmpNotifResp::new_error(req.id, -libc::EPERM, ScmpNotifRespFlags::empty());
        // A caller that went away meanwhile makes respond fail; nothing to refuse then.
        let _ = resp.respond(fd);
    }
}

/// x32 system call numbers are the x86_64 ones with this bit set, under the native arch.
const X32_SYSCALL_BIT: i32 = 0x4000_0000;

/// `x86/359`: the ABI and number of a call made through another ABI than the native one.
/// libseccomp sends these to the filter's bad-arch action: i386 calls by their arch, and x32
/// calls, which carry the native x86_64 arch, by the x32 bit in their number.
fn foreign_abi(req: &ScmpNotifReq) -> Option<String> {
    let nr = req.data.syscall.as_raw_syscall();
    let arch = req.data.arch;
    if arch != ScmpArch::native() {
        let name = match arch {
            ScmpArch::X86 => "x86".to_owned(),
            ScmpArch::X32 => "x32".to_owned(),
            other => format!("{other:?}").to_lowercase(),
        };
        return Some(format!("{name}/{nr}"));
    }
    (arch == ScmpArch::X8664 && nr & X32_SYSCALL_BIT != 0)
        .then(|| format!("x32/{}", nr & !X32_SYSCALL_BIT))
}

/// Kills the process that made the notified call. The pidfd is opened first, then the
/// notification checked still pending: only then is the pidfd known to name the caller and
/// not a later process that got its pid.
fn kill_caller(listener: RawFd, req: &ScmpNotifReq) -> io::Result<()> {
    // The notification names a thread: PIDFD_THREAD opens it whether it leads its process
    // or not (Linux 6.9; the gateway needs 6.12).
    // SAFETY: pidfd_open takes a pid and flags.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, req.pid, libc::PIDFD_THREAD) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open just returned this fd; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    notify_id_valid(listener, req.id).map_err(io::Error::other)?;
    // SAFETY: a valid pidfd, no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            libc::PIDFD_SIGNAL_THREAD_GROUP,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn describe(req: &ScmpNotifReq, sandbox: &str, foreign: Option<String>) -> Record {
    let name = match foreign {
        // The number is another ABI's: naming it by the native table would mislead.
        Some(_) => "foreign".into(),
        None => req
            .data
            .syscall
            .get_name()
            .unwrap_or_else(|_| "unknown".into()),
    };
    let args = req.data.args;
    let (hook, reason, proto) = match (foreign, name.as_str()) {
        (Some(abi), _) => ("seccomp", "foreign-syscall-abi", abi),
        (None, name) => native(name, args),
    };
    let mut rec = Record::new(Layer::Kernel, Verdict::Deny, sandbox, reason);
    rec.kernel = Some(KernelFields {
        hook,
        pid: req.pid,
        uid: proc_uid(req.pid).unwrap_or(u32::MAX),
        comm: std::fs::read_to_string(format!("/proc/{}/comm", req.pid))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default(),
        proto,
        dst: None,
    });
    tracing::debug!(syscall = %name, pid = req.pid, "refused by seccomp");
    rec
}

/// Hook, reason and proto of a native call the filter's rules refused.
fn native(name: &str, args: [u64; 6]) -> (&'static str, &'static str, String) {
    match name {
        "io_uring_setup" => ("io_uring_setup", "io-uring", "io_uring".to_owned()),
        "unshare" => ("unshare", "namespace", namespaces(args[0])),
        "clone" => ("clone", "namespace", namespaces(args[0])),
        "ioctl" => ("ioctl", "terminal-injection", request_name(args[1])),
        _ => (
            "sock_create",
            "socket-family",
            format!("{}/{}/{}", family_name(args[0]), args[1] & 0xf, args[2]),
        ),
    }
}

/// The name of a refused ioctl request, read as the kernel reads it (lower 32 bits).
fn request_name(request: u64) -> String {
    let request = request & 0xffff_ffff;
    super::confine::TERMINAL_INPUT
        .iter()
        .find(|(r, _)| *r == request)
        .map_or_else(|| format!("{request:#x}"), |(_, name)| (*name).to_owned())
}

/// The namespace flags in a clone or unshare `flags` argument, as `user+net`.
fn namespaces(flags: u64) -> String {
    let named: Vec<&str> = super::confine::NAMESPACES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    named.join("+")
}

fn proc_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn family_name(family: u64) -> String {
    match family {
        16 => "netlink".into(),
        17 => "packet".into(),
        40 => "vsock".into(),
        44 => "xdp".into(),
        30 => "tipc".into(),
        21 => "rds".into(),
        43 => "smc".into(),
        31 => "bluetooth".into(),
        f => format!("af{f}"),
    }
}
