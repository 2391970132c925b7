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
    time::{Duration, Instant},
};

use libseccomp::{ScmpArch, ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags, notify_id_valid};

use crate::{
    audit::{AuditLog, KernelFields, Layer, Record, Verdict},
    kernel::summary::Summary,
};

/// Serves notifications until `stop` is set or every sandboxed process has exited. Repeated
/// refusals are counted within each second, as the kernel's are ([`Summary`]). Returns how
/// many refusals it could not record, the log having failed: `gateway cleanup` reports them
/// as lost.
pub fn serve(listener: OwnedFd, audit: AuditLog, sandbox: String, stop: Arc<AtomicBool>) -> u64 {
    let mut records = Records {
        audit,
        sandbox,
        summary: Summary::default(),
        window: Instant::now(),
        unrecorded: 0,
    };
    records.answer(&listener, &stop);
    let last = records.summary.close_window(&records.sandbox);
    records.write(last);
    records.unrecorded
}

/// The notifier's refusals on their way to the log.
struct Records {
    audit: AuditLog,
    sandbox: String,
    summary: Summary<Kind>,
    /// When the summary's window opened.
    window: Instant,
    unrecorded: u64,
}

impl Records {
    fn write(&mut self, records: impl IntoIterator<Item = Record>) {
        for record in records {
            if let Err(e) = self.audit.append(&record) {
                if self.unrecorded == 0 {
                    tracing::error!("{e}");
                }
                self.unrecorded += record.refusals();
            }
        }
    }

    fn answer(&mut self, listener: &OwnedFd, stop: &AtomicBool) {
        let fd = listener.as_raw_fd();
        while !stop.load(Ordering::Relaxed) {
            if self.window.elapsed() >= WINDOW {
                let counted = self.summary.close_window(&self.sandbox);
                self.write(counted);
                self.window = Instant::now();
            }
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
            let record = describe(&req, &self.sandbox, foreign.clone());
            let kind = (
                record.reason.clone(),
                record.kernel.clone().map(|mut k| {
                    k.pid = 0;
                    k
                }),
            );
            let admitted = self.summary.admit(kind, req.pid, || record);
            self.write(admitted);
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
}

/// What makes two refusals the same: their reason and fields but the process id.
type Kind = (String, Option<KernelFields>);

/// How long repeats of a refusal are counted before their record is written.
const WINDOW: Duration = Duration::from_secs(1);

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
        (None, name) => native(name, args, req.pid),
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
fn native(name: &str, args: [u64; 6], pid: u32) -> (&'static str, &'static str, String) {
    match name {
        "request_key" => ("request_key", "kernel-keyring", key_type(pid, args[0])),
        "add_key" => ("add_key", "kernel-keyring", key_type(pid, args[0])),
        "keyctl" => (
            "keyctl",
            "kernel-keyring",
            format!("keyctl/{}", args[0] as u32),
        ),
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
    use super::confine::{CONSOLE, CONSOLE_MASK, TERMINAL_INPUT};
    let request = request & 0xffff_ffff;
    if let Some((_, name)) = TERMINAL_INPUT.iter().find(|(r, _)| *r == request) {
        return (*name).to_owned();
    }
    match CONSOLE.iter().find(|(r, _)| *r == request & CONSOLE_MASK) {
        Some((_, range)) => format!("{range}/{request:#x}"),
        None => format!("{request:#x}"),
    }
}

/// The key type a request_key or add_key names (`dns_resolver` is the one that looks names
/// up), read from the caller's memory while the call waits for its refusal. Only recorded,
/// never used to decide: the caller could change it meanwhile, and is refused whatever it
/// names. `?` when it cannot be read or holds more than a type name's characters.
fn key_type(pid: u32, addr: u64) -> String {
    const MAX: u64 = 64;
    const PAGE: u64 = 4096;
    // One read that ends on the string's page or before: a read that reached an unmapped
    // page would fail whole.
    let len = MAX.min(PAGE - addr % PAGE) as usize;
    let mut buf = [0u8; MAX as usize];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: reads at most `len` bytes into our own buffer; the remote address is only
    // dereferenced by the kernel, in the caller's address space.
    let read = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    let Ok(read) = usize::try_from(read) else {
        return "?".into();
    };
    let bytes = &buf[..read];
    let Some(end) = bytes.iter().position(|&b| b == 0) else {
        return "?".into();
    };
    let name = &bytes[..end];
    if name.is_empty()
        || !name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return "?".into();
    }
    String::from_utf8_lossy(name).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_named_by_its_lower_32_bits() {
        assert_eq!(request_name(0x5412), "TIOCSTI");
        assert_eq!(request_name(0x1_0000_5412), "TIOCSTI");
        assert_eq!(request_name(0x541C), "TIOCLINUX");
        assert_eq!(request_name(0x4B49), "KD/0x4b49");
        assert_eq!(request_name(0x1_0000_5606), "VT/0x5606");
    }

    #[test]
    fn a_key_type_is_read_from_the_callers_memory() {
        let pid = std::process::id();
        let read = |s: &std::ffi::CStr| key_type(pid, s.as_ptr() as u64);
        assert_eq!(read(c"dns_resolver"), "dns_resolver");
        assert_eq!(read(c"user"), "user");
        assert_eq!(read(c""), "?");
        assert_eq!(read(c"not a\ntype"), "?");
        let long = std::ffi::CString::new("x".repeat(100)).unwrap();
        assert_eq!(read(&long), "?");
        assert_eq!(key_type(pid, 8), "?");
    }
}
