//! Helpers for the privileged end-to-end tests: run the real `gateway` binary as root, with a
//! real policy file, real eBPF programs on a real cgroup, and real clients inside.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod live;
pub mod upstream;

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    net::{TcpListener, UdpSocket},
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

pub const EPERM: i64 = 1;
pub const EACCES: i64 = 13;

/// Python run inside the sandbox: each door is tried and reported as one JSON line.
pub const PRELUDE: &str = r#"
import socket, os, sys, json, errno, ctypes, time
def report(door, fn):
    try:
        fn()
        print(json.dumps({"door": door, "ok": True}), flush=True)
    except OSError as e:
        print(json.dumps({"door": door, "ok": False, "errno": e.errno}), flush=True)
print(json.dumps({"pid": os.getpid()}), flush=True)
TUNNEL = os.environ["HTTP_PROXY"].rsplit(":", 1)
TUNNEL_PORT = int(TUNNEL[1])
TUNNEL_HOST = TUNNEL[0].split('//')[-1]
"#;

/// Python: `attempt(port)`, whether a TCP connection to 127.0.0.1:`port` opened. After
/// [`PRELUDE`].
pub const ATTEMPT: &str = r#"
def attempt(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False
"#;

/// Python: `status(url)`, the HTTP status urllib gets for `url` through the tunnel, a
/// refused CONNECT's included (urllib reports that one only in its message).
pub const STATUS: &str = r#"
import re, urllib.request, urllib.error
def status(url):
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError as e:
        m = re.search(r"Tunnel connection failed: (\d+)", str(e.reason))
        return int(m.group(1)) if m else repr(e.reason)
"#;

/// A scratch directory the sandbox user can read, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gateway-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A FIFO put in place of the file at `path`: what a policy file must never be read as (an
/// open without O_NONBLOCK waits for a writer that never comes). On drop it is opened for
/// writing and closed, so a reader still blocked on it gets end-of-file instead of waiting
/// forever, and a test that failed does not leave its gateway hung.
pub struct Fifo(pub PathBuf);

impl Fifo {
    pub fn replace(path: &Path) -> Self {
        use std::os::unix::ffi::OsStrExt as _;
        let _ = std::fs::remove_file(path);
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        let made = unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) };
        assert_eq!(made, 0, "mkfifo {}", path.display());
        Self(path.to_owned())
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        use std::os::unix::fs::OpenOptionsExt as _;
        // ENXIO when no one is reading: nothing to release then.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.0);
    }
}

pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gateway")
}

pub fn assert_root() {
    assert!(
        nix_is_root(),
        "the privileged tests must run as root (sudo cargo xtask test); they never skip"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// One `gateway run` with a policy and a command.
pub struct Run {
    pub scratch: Scratch,
    pub policy: PathBuf,
    pub audit: PathBuf,
}

pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub audit: Vec<Value>,
    pub lines: Vec<Value>,
}

impl Run {
    pub fn new(tag: &str, policy: &str) -> Self {
        assert_root();
        let scratch = Scratch::new(tag);
        let policy = scratch.write("policy.toml", policy);
        let audit = scratch.dir.join("audit.jsonl");
        Self {
            scratch,
            policy,
            audit,
        }
    }

    pub fn command(&self, cmd: &[&str]) -> Command {
        self.command_with(&[], cmd)
    }

    /// `gateway run` with extra flags (such as `--learn`) before `--`.
    pub fn command_with(&self, flags: &[&str], cmd: &[&str]) -> Command {
        self.command_as(Some("nobody"), flags, cmd)
    }

    /// `gateway run --user USER` (no `--user` when `None`) with extra flags before `--`.
    pub fn command_as(&self, user: Option<&str>, flags: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(gateway_bin());
        c.arg("run")
            .args(flags)
            .arg("--policy")
            .arg(&self.policy)
            .arg("--audit-log")
            .arg(&self.audit);
        if let Some(user) = user {
            c.arg("--user").arg(user);
        }
        c.arg("--").args(cmd).current_dir("/").stdin(Stdio::null());
        c
    }

    pub fn python(&self, body: &str) -> Finished {
        let script = format!("{PRELUDE}\n{body}");
        self.finish(self.command(&["python3", "-c", &script]).output().unwrap())
    }

    pub fn sh(&self, script: &str) -> Finished {
        self.finish(self.command(&["sh", "-c", script]).output().unwrap())
    }

    pub fn finish(&self, out: Output) -> Finished {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines = json_lines(&stdout);
        Finished {
            status: out.status,
            audit: self.audit_records(),
            stdout,
            stderr,
            lines,
        }
    }

    pub fn audit_records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .map(|t| json_lines(&t))
            .unwrap_or_default()
    }
}

/// [`Run::python`]'s script run as nobody outside any sandbox: what each door does without
/// the gateway, so a test can show that the sandbox is what closes it. `HTTP_PROXY` (read by
/// the prelude) names a port nothing listens on.
pub fn outside_command(body: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", &format!("{PRELUDE}\n{body}")])
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .current_dir("/")
        .stdin(Stdio::null());
    c
}

/// The output of an [`outside_command`], with no audit log.
pub fn outside(out: Output) -> Finished {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Finished {
        status: out.status,
        lines: json_lines(&stdout),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        audit: Vec::new(),
    }
}

pub fn python_outside(body: &str) -> Finished {
    outside(outside_command(body).output().unwrap())
}

/// `records`, a line each, for a failure's message.
pub fn joined(records: &[Value]) -> String {
    records
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails unless `gateway audit verify` finds the log at `log` intact.
pub fn assert_chain_verifies(log: &Path) {
    let verify = Command::new(gateway_bin())
        .args(["audit", "verify", "--log"])
        .arg(log)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "the chain does not verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// The refusals the `events-lost` records among `records` count.
pub fn lost_in<'a>(records: impl IntoIterator<Item = &'a Value>) -> u64 {
    records
        .into_iter()
        .filter(|r| r["reason"] == "events-lost")
        .filter_map(|r| r["lost"].as_u64())
        .sum()
}

pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Finished {
    pub fn pid(&self) -> u64 {
        self.lines
            .iter()
            .find_map(|l| l["pid"].as_u64())
            .unwrap_or_else(|| panic!("sandboxed script printed no pid\n{}", self.describe()))
    }

    pub fn door(&self, name: &str) -> &Value {
        self.lines
            .iter()
            .find(|l| l["door"] == name)
            .unwrap_or_else(|| panic!("door `{name}` was not tried\n{}", self.describe()))
    }

    /// The door must have failed with EPERM or EACCES.
    pub fn assert_refused(&self, name: &str) {
        let d = self.door(name);
        assert_eq!(d["ok"], false, "door `{name}` opened\n{}", self.describe());
        let errno = d["errno"].as_i64().unwrap_or(-1);
        assert!(
            errno == EPERM || errno == EACCES,
            "door `{name}` failed with errno {errno}, not EPERM/EACCES\n{}",
            self.describe()
        );
    }

    pub fn assert_open(&self, name: &str) {
        assert_eq!(
            self.door(name)["ok"],
            true,
            "door `{name}` should be open\n{}",
            self.describe()
        );
    }

    /// A kernel deny record with this hook and destination, from the script's own process.
    pub fn assert_audited(&self, hook: &str, dst: &str) {
        let pid = self.pid();
        let found = self.audit.iter().any(|r| {
            r["layer"] == "kernel"
                && r["verdict"] == "deny"
                && r["hook"] == hook
                && r["dst"] == dst
                && r["pid"].as_u64() == Some(pid)
                && r["comm"] == "python3"
                && r["uid"].as_u64() == Some(65534)
                && r["ts"].as_str().is_some_and(|t| t.ends_with('Z'))
                && r["sandbox"].is_string()
                && r["reason"] == "not-allowlisted"
        });
        assert!(
            found,
            "no kernel audit record hook={hook} dst={dst} pid={pid}\n{}",
            self.describe()
        );
    }

    pub fn describe(&self) -> String {
        format!(
            "status: {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- audit\n{}",
            self.status,
            self.stdout,
            self.stderr,
            self.audit
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// A host TCP listener that must see nothing (or something) from the sandbox.
pub struct HostTcp {
    pub listener: TcpListener,
    pub port: u16,
}

impl HostTcp {
    pub fn bind(addr: &str) -> Self {
        let listener = TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        Self { listener, port }
    }

    /// Connections that reached the listener (queued ones count: accept drains the backlog).
    pub fn accepted(&self) -> usize {
        let mut n = 0;
        while self.listener.accept().is_ok() {
            n += 1;
        }
        n
    }
}

pub struct HostUdp {
    pub socket: UdpSocket,
    pub port: u16,
}

impl HostUdp {
    pub fn bind(addr: &str) -> Self {
        let socket = UdpSocket::bind(addr).unwrap();
        socket.set_nonblocking(true).unwrap();
        let port = socket.local_addr().unwrap().port();
        Self { socket, port }
    }

    pub fn received(&self) -> usize {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while self.socket.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

pub struct HostUnix {
    pub listener: UnixListener,
    pub path: PathBuf,
}

impl HostUnix {
    /// A world-connectable socket, so only the sandbox's own rules can refuse it.
    pub fn bind(dir: &Path, name: &str) -> Self {
        let path = dir.join(name);
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        listener.set_nonblocking(true).unwrap();
        Self { listener, path }
    }

    pub fn accepted(&self) -> usize {
        let mut n = 0;
        while self.listener.accept().is_ok() {
            n += 1;
        }
        n
    }
}

/// An unprivileged host process (nobody) that takes the tunnel's address and port once
/// the gateway is gone, and reports every connection it accepts with the first bytes it
/// received: what a squatter on the freed port would get from the sandbox.
pub struct Squatter {
    child: Child,
}

const SQUATTER: &str = r#"
import json, select, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(16)
print(json.dumps({"listening": True}), flush=True)
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        c, peer = s.accept()
        c.settimeout(2)
        try:
            data = c.recv(4096).decode(errors="replace")
        except OSError as e:
            data = "recv: " + str(e)
        print(json.dumps({"accepted": str(peer[:2]), "data": data}), flush=True)
        c.close()
    if sys.stdin in ready:
        break
"#;

impl Squatter {
    /// Binds `addr` as nobody; returns once it listens.
    pub fn bind(addr: std::net::SocketAddr) -> Self {
        let mut child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(["/usr/bin/python3", "-c", SQUATTER])
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.contains("listening") {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the squatter could not take {addr}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self { child }
    }

    /// Stops it; returns one record per connection it accepted.
    pub fn stop(mut self) -> Vec<Value> {
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        json_lines(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Reads lines from a running sandbox's stdout until one matches.
pub fn wait_for_line(child: &mut Child, want: &str) -> BufReader<std::process::ChildStdout> {
    let stdout = child.stdout.take().expect("stdout piped");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        assert!(n > 0, "sandbox exited before printing `{want}`");
        if line.trim() == want {
            return reader;
        }
    }
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next() == Some("cgroup2")).then(|| left.split(' ').nth(4))?
        })
        .expect("cgroup v2 is not mounted");
    PathBuf::from(root)
}

pub fn policy(name: &str, extra: &str) -> String {
    format!("version = 1\nname = \"{name}\"\n{extra}\n")
}

// ---------------------------------------------------------------------------------------
// curl in the sandbox and its replies (upstream.rs has the certificates and servers)

/// A shell function for the sandbox: `r NAME CURL-ARGS...` prints the response between
/// `<<< NAME` and `>>> HTTP_CODE CONNECT_CODE`, then `=== NAME EXIT`.
pub const CURL: &str = r#"
r() {
    n=$1; shift
    echo "<<< $n"
    curl -sS -m 20 -w '\n>>> %{http_code} %{http_connect}\n' "$@"
    echo "=== $n $?"
}
"#;

/// One curl call made by the `r` shell function.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    pub body: String,
    pub code: u16,
    pub connect: u16,
    pub exit: i32,
}

impl Reply {
    /// Refused by policy: 403 on the request, or 403 on the CONNECT that carried it.
    pub fn forbidden(&self) -> bool {
        self.code == 403 || (self.code == 0 && self.connect == 403)
    }
}

pub fn replies(stdout: &str) -> HashMap<String, Reply> {
    let mut all = HashMap::new();
    let mut current: Option<(String, Reply)> = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("<<< ") {
            current = Some((name.to_owned(), Reply::default()));
        } else if let Some(codes) = line.strip_prefix(">>> ") {
            if let Some((_, reply)) = current.as_mut() {
                let mut it = codes.split_whitespace().map(|c| c.parse().unwrap_or(0));
                reply.code = it.next().unwrap_or(0);
                reply.connect = it.next().unwrap_or(0);
            }
        } else if let Some(rest) = line.strip_prefix("=== ") {
            if let Some((name, mut reply)) = current.take() {
                reply.exit = rest
                    .rsplit(' ')
                    .next()
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(-1);
                all.insert(name, reply);
            }
        } else if let Some((_, reply)) = current.as_mut() {
            reply.body.push_str(line);
            reply.body.push('\n');
        }
    }
    all
}

pub fn reply<'a>(replies: &'a HashMap<String, Reply>, name: &str, out: &Finished) -> &'a Reply {
    replies
        .get(name)
        .unwrap_or_else(|| panic!("no reply `{name}`\n{}", out.describe()))
}

pub fn proxy_records(out: &Finished) -> Vec<&Value> {
    out.audit.iter().filter(|r| r["layer"] == "proxy").collect()
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let done = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(done.success(), "mount a tmpfs at {}", dir.display());
        Self(dir)
    }

    /// Gives it `size` in all (`mount -o remount`), keeping what it holds.
    pub fn resize(&self, size: &str) {
        let done = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(done.success(), "resize the tmpfs at {}", self.0.display());
    }
}

impl SmallFs {
    /// Room again, and `gateway cleanup`, which saves the refusals a run that could not
    /// write its log here left pinned (and unpins them).
    pub fn make_room_and_clean_up(&self) {
        self.resize("4m");
        let out = Command::new(gateway_bin()).arg("cleanup").output().unwrap();
        assert!(out.status.success(), "gateway cleanup: {out:?}");
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
