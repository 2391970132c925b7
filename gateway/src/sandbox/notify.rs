//! Answers the sandbox's seccomp notifications: every one is a refusal, audited, then EPERM.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use libseccomp::{ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags};

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
        let record = describe(&req, &sandbox);
        if let Err(e) = audit.append(&record) {
            tracing::error!("{e}");
        }
        let resp = ScmpNotifResp::new_error(req.id, -libc::EPERM, ScmpNotifRespFlags::empty());
        // A caller that went away meanwhile makes respond fail; nothing to refuse then.
        let _ = resp.respond(fd);
    }
}

fn describe(req: &ScmpNotifReq, sandbox: &str) -> Record {
    let name = req
        .data
        .syscall
        .get_name()
        .unwrap_or_else(|_| "unknown".into());
    let args = req.data.args;
    let (hook, reason, proto) = match name.as_str() {
        "io_uring_setup" => ("io_uring_setup", "io-uring", "io_uring".to_owned()),
        "unshare" => ("unshare", "namespace", namespaces(args[0])),
        "clone" => ("clone", "namespace", namespaces(args[0])),
        _ => (
            "sock_create",
            "socket-family",
            format!("{}/{}/{}", family_name(args[0]), args[1] & 0xf, args[2]),
        ),
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
