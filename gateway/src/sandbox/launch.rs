//! Starts CMD inside the sandbox cgroup as the sandbox user, with no way to regain privilege
//! and no descriptor inherited from outside except stdin, stdout and stderr.

use std::{
    ffi::{CString, OsString},
    io,
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

use tokio::process::{Child, Command};

use super::{SandboxError, confine::ChildSide, host, user::SandboxUser};

pub struct Launch<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub user: &'a SandboxUser,
    pub cgroup_procs: &'a Path,
    /// Variables to set; every other variable is inherited unless listed in `remove`.
    pub env: Vec<(String, String)>,
    pub remove: Vec<OsString>,
    pub confine: ChildSide,
}

impl Launch<'_> {
    pub fn spawn(self) -> Result<Child, SandboxError> {
        let procs = CString::new(self.cgroup_procs.as_os_str().as_bytes()).map_err(|_| {
            SandboxError::User(format!("bad cgroup path {}", self.cgroup_procs.display()))
        })?;
        let uid = self.user.uid.as_raw();
        let gid = self.user.gid.as_raw();
        let confine = self.confine;
        let open_files = host::started_with_open_files();
        let mut cmd = Command::new(self.program);
        cmd.args(self.args);
        for var in &self.remove {
            cmd.env_remove(var);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.env("HOME", &self.user.home)
            .env("USER", &self.user.name)
            .env("LOGNAME", &self.user.name);
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(move || enter_sandbox(&procs, uid, gid, confine, open_files));
        }
        cmd.spawn().map_err(|e| SandboxError::Io {
            what: "starting",
            path: self.program.into(),
            source: e,
        })
    }
}

/// Joins the cgroup before anything of CMD runs, so every socket CMD makes is the sandbox's.
/// `open_files`: the (soft, hard) open-file limits CMD gets back, when the gateway raised its
/// own (some programs still use select(), which breaks past 1,024 descriptors).
fn enter_sandbox(
    procs: &CString,
    uid: u32,
    gid: u32,
    confine: ChildSide,
    open_files: Option<(u64, u64)>,
) -> io::Result<()> {
    // SAFETY: plain system calls on valid pointers; errors are checked.
    unsafe {
        if let Some((soft, hard)) = open_files {
            let limits = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            check(libc::setrlimit(libc::RLIMIT_NOFILE, &limits))?;
        }
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(err);
        }
        let groups = [gid];
        check(libc::setgroups(1, groups.as_ptr()))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        confine.apply()?;
        // Mark rather than close: std's exec-error pipe must stay open until exec.
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        check(libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) as i32)?;
    }
    Ok(())
}

fn check(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
