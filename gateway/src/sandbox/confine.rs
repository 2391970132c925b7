//! Process-level layers under the cgroup programs, set up in the child before exec:
//!
//! - Landlock scopes: no connecting to abstract unix sockets made outside the sandbox, no
//!   signals to processes outside it (and Landlock's ptrace rule: none either).
//! - seccomp: socket families other than unix, inet, inet6 and netlink route, io_uring
//!   (its IORING_OP_SOCKET would bypass the socket filter), and new namespaces (unshare or
//!   clone with a CLONE_NEW* flag; clone3 fails with ENOSYS so clone is used) are refused. The filter
//!   hands each refusal to the gateway through a user-notification fd so it can be audited;
//!   if the gateway is gone the kernel fails the call with ENOSYS, still refused. Calls
//!   through another ABI than the native one (i386 `int 0x80`, x32), which the rules do not
//!   cover, are handed over too: the gateway records them and kills the caller. Typing into
//!   a terminal (ioctl TIOCSTI and TIOCLINUX, and a virtual console's keyboard and VT
//!   ioctls) and the kernel keyring (request_key, add_key,
//!   keyctl: a key request can make the kernel run a helper, a DNS lookup among them,
//!   outside the sandbox) are refused the same way.
//!
//! Everything that allocates happens in [`Confinement::prepare`], before the fork; the child
//! only makes system calls.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use landlock::{CompatLevel, Compatible as _, Ruleset, RulesetAttr as _, Scope};
use libseccomp::{ScmpAction, ScmpFilterContext, ScmpSyscall, scmp_cmp};

use super::SandboxError;

const AF_UNIX: u64 = 1;
const AF_INET: u64 = 2;
const AF_INET6: u64 = 10;
const AF_NETLINK: u64 = 16;
const NETLINK_ROUTE: u64 = 0;
/// The CLONE_NEW* flags of clone and unshare, each with the name an audit record gives it.
pub(super) const NAMESPACES: [(u64, &str); 8] = [
    (0x1000_0000, "user"),
    (0x4000_0000, "net"),
    (0x0002_0000, "mount"),
    (0x2000_0000, "pid"),
    (0x0800_0000, "ipc"),
    (0x0400_0000, "uts"),
    (0x0200_0000, "cgroup"),
    (0x80, "time"),
];

/// The ioctl requests that type into a terminal, each with the name an audit record gives it.
pub(super) const TERMINAL_INPUT: [(u64, &str); 2] = [(0x5412, "TIOCSTI"), (0x541C, "TIOCLINUX")];

/// The virtual console's ioctl ranges (old-style requests, no size or direction bits): the
/// keyboard's ('K', with the fonts and screen maps) and the VT switcher's ('V'), each with
/// the name an audit record gives it. Matched under [`CONSOLE_MASK`].
pub(super) const CONSOLE: [(u64, &str); 2] = [(0x4B00, "KD"), (0x5600, "VT")];
pub(super) const CONSOLE_MASK: u64 = 0xffff_ff00;

/// The kernel keyring's system calls, each refused.
const KEY_CALLS: [&str; 3] = ["request_key", "add_key", "keyctl"];

pub struct Confinement {
    landlock: OwnedFd,
    seccomp: Vec<u8>,
    /// The child sends its seccomp listener fd over `child_end`; the gateway reads `ours`.
    ours: OwnedFd,
    child_end: OwnedFd,
}

/// What the child needs after fork: raw fds and a pointer to the filter.
#[derive(Clone, Copy)]
pub struct ChildSide {
    landlock: RawFd,
    filter: *const libc::sock_filter,
    filter_len: u16,
    child_end: RawFd,
}

// SAFETY: the pointer refers to `Confinement::seccomp`, which outlives the spawn, and is only
// read in the forked child.
unsafe impl Send for ChildSide {}
unsafe impl Sync for ChildSide {}

impl Confinement {
    /// `abstract_allowed`: the policy lists an abstract socket, so the Landlock scope that
    /// would refuse every outside abstract socket is left to the cgroup unix programs.
    pub fn prepare(abstract_allowed: bool) -> Result<Self, SandboxError> {
        let scopes = if abstract_allowed {
            Scope::Signal.into()
        } else {
            Scope::AbstractUnixSocket | Scope::Signal
        };
        let landlock = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .scope(scopes)
            .and_then(|r| r.create())
            .map_err(|e| {
                SandboxError::Prerequisite(format!(
                    "Landlock scopes are unavailable ({e}): the gateway needs Linux 6.12 or later \
                     with `landlock` in the kernel's lsm= list"
                ))
            })?;
        let landlock: Option<OwnedFd> = landlock.into();
        let landlock = landlock.ok_or_else(|| {
            SandboxError::Prerequisite("Landlock is not enabled in this kernel".into())
        })?;
        let seccomp = seccomp_filter().map_err(|e| {
            SandboxError::Prerequisite(format!(
                "building the seccomp filter: {e}; the gateway needs libseccomp 2.5+ and \
                 seccomp user notification (Linux 5.5+)"
            ))
        })?;
        let (ours, child_end) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SandboxError::Prerequisite(format!("socketpair: {e}")))?;
        Ok(Self {
            landlock,
            seccomp,
            ours,
            child_end,
        })
    }

    pub fn child_side(&self) -> ChildSide {
        ChildSide {
            landlock: self.landlock.as_raw_fd(),
            filter: self.seccomp.as_ptr().cast(),
            filter_len: (self.seccomp.len() / size_of::<libc::sock_filter>()) as u16,
            child_end: self.child_end.as_raw_fd(),
        }
    }

    /// Receives the seccomp listener the child sent before exec.
    pub fn receive_listener(self) -> Result<OwnedFd, SandboxError> {
        drop(self.child_end);
        let mut buf = [0u8; 1];
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(RawFd);
        let msg = nix::sys::socket::recvmsg::<()>(
            self.ours.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| SandboxError::Prerequisite(format!("receiving the seccomp listener: {e}")))?;
        for cmsg in msg.cmsgs().map_err(|e| {
            SandboxError::Prerequisite(format!("receiving the seccomp listener: {e}"))
        })? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg
                && let Some(&fd) = fds.first()
            {
                // SAFETY: SCM_RIGHTS just installed this fd in our table; we own it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        Err(SandboxError::Prerequisite(
            "the sandboxed command exited before installing its seccomp filter".into(),
        ))
    }
}

fn seccomp_filter() -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
    // The rules cover the native ABI only. A call through another one (i386 `int 0x80` from
    // a 64-bit process, or an x32 number) takes the bad-arch action, which by default kills
    // the process with nothing recorded: it goes to the gateway instead, which records it
    // and kills the caller (notify.rs).
    ctx.set_act_badarch(ScmpAction::Notify)?;
    for name in ["socket", "socketpair"] {
        let nr = ScmpSyscall::from_name(name)?;
        let deny = ScmpAction::Notify;
        // Allowed: exactly AF_UNIX, AF_INET, AF_INET6, and AF_NETLINK with NETLINK_ROUTE.
        // Compared as 64-bit values, so stray upper bits make a call refused, never allowed.
        // libseccomp takes one comparison per argument and rule, hence one rule per family.
        ctx.add_rule_conditional(deny, nr, &[scmp_cmp!($arg0 > AF_NETLINK)])?;
        for family in (0..AF_NETLINK).filter(|f| ![AF_UNIX, AF_INET, AF_INET6].contains(f)) {
            ctx.add_rule_conditional(deny, nr, &[scmp_cmp!($arg0 == family)])?;
        }
        ctx.add_rule_conditional(
            deny,
            nr,
            &[
                scmp_cmp!($arg0 == AF_NETLINK),
                scmp_cmp!($arg2 != NETLINK_ROUTE),
            ],
        )?;
    }
    ctx.add_rule(
        ScmpAction::Notify,
        ScmpSyscall::from_name("io_uring_setup")?,
    )?;
    // New namespaces: in a network namespace of its own the sandbox could make tunnel-client
    // entries for addresses and ports it then lets an outside process use. A user namespace
    // is what makes the others possible unprivileged; each flag is refused, one rule per
    // flag since libseccomp compares masked values for equality only.
    for name in ["unshare", "clone"] {
        let nr = ScmpSyscall::from_name(name)?;
        for (flag, _) in NAMESPACES {
            ctx.add_rule_conditional(ScmpAction::Notify, nr, &[scmp_cmp!($arg0 & flag == flag)])?;
        }
    }
    // clone3 passes its flags in memory, which seccomp cannot read: it fails as if the
    // kernel lacked it, and the C library falls back to clone, whose flags are checked.
    ctx.add_rule(
        ScmpAction::Errno(libc::ENOSYS),
        ScmpSyscall::from_name("clone3")?,
    )?;
    // Typing into a terminal: TIOCSTI puts bytes in its input queue, TIOCLINUX's selection
    // paste does the same on a virtual console. A sandbox sharing the operator's terminal
    // could type a command for the operator's shell to run after it. The kernel reads the
    // request as an unsigned int, so only its lower 32 bits are compared: upper bits set
    // would not make it another request.
    let ioctl = ScmpSyscall::from_name("ioctl")?;
    for (request, _) in TERMINAL_INPUT {
        ctx.add_rule_conditional(
            ScmpAction::Notify,
            ioctl,
            &[scmp_cmp!($arg1 & 0xffff_ffff == request)],
        )?;
    }
    // On a virtual console, the process whose controlling terminal it is may rebind keys
    // and set what a function key types (KDSKBENT, KDSKBSENT): the operator's next key
    // presses would type the sandbox's command into the shell. No sandboxed tool needs the
    // console's keyboard, fonts or VT switching: both whole ranges are refused.
    for (range, _) in CONSOLE {
        ctx.add_rule_conditional(
            ScmpAction::Notify,
            ioctl,
            &[scmp_cmp!($arg1 & CONSOLE_MASK == range)],
        )?;
    }
    // Keys: a request_key for a type the kernel cannot find makes it run /sbin/request-key
    // as root outside the sandbox, and the dns_resolver type looks up whatever name the
    // caller chose, a DNS channel out. No sandboxed tool needs the kernel's keyrings.
    for name in KEY_CALLS {
        ctx.add_rule(ScmpAction::Notify, ScmpSyscall::from_name(name)?)?;
    }
    // The compiled filter is small, well under a pipe's buffer.
    let (mut read, write) = std::io::pipe()?;
    ctx.export_bpf(&write)?;
    drop(write);
    let mut bpf = Vec::new();
    io::Read::read_to_end(&mut read, &mut bpf)?;
    Ok(bpf)
}

impl ChildSide {
    /// Runs in the forked child after the uid change and no_new_privs.
    pub fn apply(self) -> io::Result<()> {
        // SAFETY: raw system calls on fds and memory prepared before the fork.
        unsafe {
            const LANDLOCK_RESTRICT_SELF: libc::c_long = 446;
            check(libc::syscall(LANDLOCK_RESTRICT_SELF, self.landlock, 0u32))?;
            let prog = libc::sock_fprog {
                len: self.filter_len,
                filter: self.filter.cast_mut(),
            };
            const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_ulong = 1 << 3;
            let listener = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &prog as *const libc::sock_fprog,
            );
            check(listener)?;
            let listener = listener as RawFd;
            send_fd(self.child_end, listener)?;
            libc::close(listener);
            libc::close(self.child_end);
            libc::close(self.landlock);
        }
        Ok(())
    }
}

/// sendmsg with one SCM_RIGHTS fd, built on the stack.
unsafe fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    #[repr(C)]
    union Cmsg {
        buf: [u8; 64],
        _align: libc::cmsghdr,
    }
    let mut data = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cmsg = Cmsg { buf: [0; 64] };
    // SAFETY: the control buffer is aligned for cmsghdr and large enough for one fd.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.buf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize;
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(hdr).cast::<RawFd>(), fd);
        check(libc::sendmsg(sock, &msg, 0) as libc::c_long)?;
    }
    Ok(())
}

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
