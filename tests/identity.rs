//! The kernel's record of which sandbox made each TCP connection to the tunnel: the
//! `tunnel_clients` sock_ops program and its `TUNNEL_CLIENTS` map, read straight from the
//! running gateway's map. The gateway is stopped (SIGSTOP) while the sandbox connects, so
//! the tunnel cannot accept and claim the connections before the test looks. Run by
//! `cargo xtask test` (README.md).

mod support;

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::fs::MetadataExt as _,
    process::{Child, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use gateway_common::ClientKey;
use serde_json::Value;
use support::*;

/// Connects to the tunnel (and elsewhere) as `CONNECTS()` says, reports the source ports, and
/// resets every connection when told to.
const CLIENT: &str = r#"
import struct
HOST = TUNNEL[0].split("//")[-1].strip("[]")
def wait_for(path):
    deadline = time.time() + 30
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.05)
print("ready", flush=True)
wait_for(GO)
conns, ports = [], {}
for name, family, host, port in CONNECTS():
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect((host, port))
    conns.append(s)
    ports[name] = s.getsockname()[1]
ports["tunnel"] = TUNNEL_PORT
print(json.dumps({"ports": ports}), flush=True)
wait_for(CLOSE)
for s in conns:
    # A reset takes the socket straight to TCP_CLOSE, without waiting for the tunnel.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("closed", flush=True)
wait_for(DONE)
"#;

/// Stops a process for as long as it lives.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        signal(pid, libc::SIGSTOP);
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the pid is our own child.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, sig) }, 0);
}

/// One sandbox that connects as `connects` says (Python tuples `(name, family, host, port)`,
/// with HOST and TUNNEL_PORT in scope), with the gateway stopped.
struct Session {
    run: Run,
    gateway: Child,
    reader: BufReader<ChildStdout>,
    clients: HashMap<MapData, ClientKey, u64>,
    cgroup_id: u64,
    stopped: Option<Stopped>,
    ports: Value,
}

impl Session {
    fn start(tag: &str, extra_policy: &str, connects: &str) -> Self {
        let run = Run::new(tag, &policy(tag, extra_policy));
        let path = |name: &str| run.scratch.dir.join(name).to_str().unwrap().to_owned();
        let script = format!(
            "{PRELUDE}\nGO = {:?}\nCLOSE = {:?}\nDONE = {:?}\nCONNECTS = lambda: {connects}\n{CLIENT}",
            path("go"),
            path("close"),
            path("done")
        );
        let mut gateway = run
            .command(&["python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(gateway.stdout.take().unwrap());
        let sandbox_pid = read_json(&mut reader, "pid")["pid"].as_u64().unwrap();
        wait_for_reader_line(&mut reader, "ready");
        let clients = tunnel_clients_of(gateway.id());
        let cgroup_id = cgroup_id_of(sandbox_pid as u32);
        let stopped = Some(Stopped::new(gateway.id()));
        std::fs::write(run.scratch.dir.join("go"), "").unwrap();
        let ports = read_json(&mut reader, "ports")["ports"].clone();
        Self {
            run,
            gateway,
            reader,
            clients,
            cgroup_id,
            stopped,
            ports,
        }
    }

    fn port(&self, name: &str) -> u16 {
        self.ports[name].as_u64().unwrap() as u16
    }

    fn lookup(&self, addr: IpAddr, port: u16) -> Option<u64> {
        self.clients.get(&key(addr, port), 0).ok()
    }

    /// Resets the sandbox's connections and waits until the sandbox says so.
    fn close(&mut self) {
        std::fs::write(self.run.scratch.dir.join("close"), "").unwrap();
        wait_for_reader_line(&mut self.reader, "closed");
    }

    fn finish(mut self) {
        self.stopped.take();
        std::fs::write(self.run.scratch.dir.join("done"), "").unwrap();
        let status = self.gateway.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A failed assertion must not leave a stopped gateway and a waiting sandbox behind.
        self.stopped.take();
        let _ = std::fs::write(self.run.scratch.dir.join("done"), "");
        let _ = self.gateway.wait();
    }
}

fn read_json(reader: &mut BufReader<ChildStdout>, field: &str) -> Value {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "sandbox exited before reporting `{field}`"
        );
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && !v[field].is_null()
        {
            return v;
        }
    }
}

fn wait_for_reader_line(reader: &mut BufReader<ChildStdout>, want: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "sandbox exited before printing `{want}`"
        );
        if line.trim() == want {
            return;
        }
    }
}

/// The gateway's own `TUNNEL_CLIENTS`, found through the map descriptors it holds.
fn tunnel_clients_of(pid: u32) -> HashMap<MapData, ClientKey, u64> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(text) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let info = MapInfo::from_id(id).unwrap();
        if info.name_as_str() == Some("TUNNEL_CLIENTS") {
            let map = Map::from_map_data(MapData::from_id(id).unwrap()).unwrap();
            return HashMap::try_from(map).unwrap();
        }
    }
    panic!("gateway {pid} holds no TUNNEL_CLIENTS map");
}

/// A cgroup v2 id is the inode number of the cgroup's directory.
fn cgroup_id_of(pid: u32) -> u64 {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("no cgroup v2 line");
    let dir = cgroup2_root().join(path.trim_start_matches('/'));
    std::fs::metadata(dir).unwrap().ino()
}

fn key(addr: IpAddr, port: u16) -> ClientKey {
    let addr = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    ClientKey {
        addr: addr.octets(),
        port,
        _pad: [0; 6],
    }
}

/// Polls until `done` holds or two seconds pass.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

const LOCAL4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const LOCAL6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[test]
fn ipv4_tunnel_clients_are_recorded_until_they_close() {
    let other = HostTcp::bind("127.0.0.1:0");
    let allow = format!(
        "[[network.allow]]\ncidr = \"127.0.0.1/32\"\nports = [{}]\n",
        other.port
    );
    let connects = format!(
        r#"[
    ("v4", socket.AF_INET, HOST, TUNNEL_PORT),
    ("mapped", socket.AF_INET6, "::ffff:" + HOST, TUNNEL_PORT),
    ("other", socket.AF_INET, HOST, {}),
]"#,
        other.port
    );
    let mut s = Session::start("ident-v4", &allow, &connects);

    // A host process outside every sandbox, connected to the same tunnel.
    let host = TcpStream::connect(SocketAddr::new(LOCAL4, s.port("tunnel"))).unwrap();
    let host_port = host.local_addr().unwrap().port();

    assert_eq!(s.lookup(LOCAL4, s.port("v4")), Some(s.cgroup_id));
    // An AF_INET6 socket speaking IPv4 is keyed as the IPv4 client it is.
    assert_eq!(s.lookup(LOCAL4, s.port("mapped")), Some(s.cgroup_id));
    assert_eq!(
        s.lookup(LOCAL4, s.port("other")),
        None,
        "not a tunnel client"
    );
    assert_eq!(s.lookup(LOCAL4, host_port), None, "not a sandbox");
    let entries = s.clients.keys().count();
    assert_eq!(entries, 2, "exactly the two tunnel clients are recorded");

    s.close();
    let (v4, mapped) = (s.port("v4"), s.port("mapped"));
    assert!(
        eventually(|| s.lookup(LOCAL4, v4).is_none() && s.lookup(LOCAL4, mapped).is_none()),
        "closed connections must leave the map"
    );
    assert_eq!(s.clients.keys().count(), 0);
    drop(host);
    assert_eq!(other.accepted(), 1);
    s.finish();
}

#[test]
fn ipv6_tunnel_clients_are_recorded_until_they_close() {
    let mut s = Session::start(
        "ident-v6",
        "[tunnel]\nlisten = \"[::1]:0\"\n",
        r#"[("v6", socket.AF_INET6, HOST, TUNNEL_PORT)]"#,
    );
    let host = TcpStream::connect(SocketAddr::new(LOCAL6, s.port("tunnel"))).unwrap();
    let host_port = host.local_addr().unwrap().port();

    assert_eq!(s.lookup(LOCAL6, s.port("v6")), Some(s.cgroup_id));
    assert_eq!(s.lookup(LOCAL6, host_port), None, "not a sandbox");
    assert_eq!(s.clients.keys().count(), 1);

    s.close();
    let v6 = s.port("v6");
    assert!(
        eventually(|| s.lookup(LOCAL6, v6).is_none()),
        "a closed connection must leave the map"
    );
    drop(host);
    s.finish();
}
