//! TLS upstreams for tests through the tunnel: a test CA, the fixture servers of
//! tests/fixtures on 127.0.0.1, and policies whose rules dial them.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

use super::{Finished, Scratch, json_lines, policy};

/// The credential's value: the upstream gets it, nothing else ever shows it.
pub const SECRET: &str = "gwtest-secret-7Hq2xV9kLm4Rt8Zp";
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");
pub const API_CREDENTIAL: &str = "[credentials.api]\nenv = \"API_TOKEN\"\n";

/// Python for a sandboxed client of a server-sent-event stream: `next_event(stream)` returns
/// the next event's data, "end of stream", or "error: ..." (a timeout when the tunnel holds
/// the stream back).
pub const SSE_EVENTS: &str = r#"
def next_event(stream):
    try:
        while True:
            line = stream.readline()
            if not line:
                return "end of stream"
            line = line.decode().strip()
            if line.startswith("data: "):
                return line[len("data: "):]
    except Exception as e:
        return "error: " + repr(e)
"#;

/// Names (and the address) the upstream certificate is valid for.
pub const NAMES: [&str; 6] = [
    "api.test",
    "other.test",
    "git.test",
    "down.test",
    "localhost",
    "127.0.0.1",
];

/// A test CA and one server certificate for every name in `NAMES`, as PEM files.
pub struct Pki {
    pub scratch: Scratch,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let scratch = Scratch::new("pki");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "gateway test upstream CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(NAMES.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "api.test");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
        let ca = scratch.write("upstream-ca.pem", &ca_cert.pem());
        let cert = scratch.write("upstream.pem", &leaf_cert.pem());
        let key = scratch.write("upstream-key.pem", &leaf_key.serialize_pem());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        Self {
            scratch,
            ca,
            cert,
            key,
        }
    }

    /// `curl` arguments that reach an upstream directly, outside any sandbox.
    pub fn direct_curl(&self, name: &str, port: u16) -> Command {
        let mut c = Command::new("curl");
        c.arg("-sS")
            .arg("-m")
            .arg("10")
            .arg("--noproxy")
            .arg("*")
            .arg("--cacert")
            .arg(&self.ca)
            .arg("--resolve")
            .arg(format!("{name}:{port}:127.0.0.1"));
        c
    }
}

/// A fixture server (tests/fixtures) on 127.0.0.1, killed on drop.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
    pub stderr: PathBuf,
}

impl Server {
    pub fn spawn(dir: &Path, name: &str, script: &str, args: &[&OsStr]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut child = Command::new("python3")
            .arg(Path::new(FIXTURES).join(script))
            .arg("--log")
            .arg(&log)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!(
                    "{script} did not start: {line:?}\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            });
        Self {
            child,
            port,
            log,
            stderr,
        }
    }

    /// tests/fixtures/upstream.py over TLS with the test certificate.
    pub fn upstream(pki: &Pki, name: &str) -> Self {
        Self::spawn(
            &pki.scratch.dir,
            name,
            "upstream.py",
            &[
                OsStr::new("--cert"),
                pki.cert.as_os_str(),
                OsStr::new("--key"),
                pki.key.as_os_str(),
            ],
        )
    }

    /// tests/fixtures/git_server.py serving the repositories under `root`.
    pub fn git(pki: &Pki, root: &Path, token: &str) -> Self {
        Self::spawn(
            &pki.scratch.dir,
            "git",
            "git_server.py",
            &[
                OsStr::new("--root"),
                root.as_os_str(),
                OsStr::new("--token"),
                OsStr::new(token),
                OsStr::new("--cert"),
                pki.cert.as_os_str(),
                OsStr::new("--key"),
                pki.key.as_os_str(),
            ],
        )
    }

    /// Every request the server received, in order.
    /// The HTTP requests the server received, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l.get("ws_frame").is_none())
            .collect()
    }

    /// The payloads of the WebSocket frames the server received, as text.
    pub fn ws_frames(&self) -> Vec<String> {
        self.log_lines()
            .iter()
            .filter(|l| l.get("ws_frame").is_some())
            .map(|l| l["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .map(|t| json_lines(&t))
            .unwrap_or_default()
    }

    pub fn paths(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r["path"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "--- upstream log {}\n{}\n--- upstream stderr\n{}",
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

/// What a failed assertion shows: the run's output, then each upstream's log and stderr.
pub fn described(out: &Finished, servers: &[&Server]) -> String {
    let mut text = out.describe();
    for server in servers {
        text.push('\n');
        text.push_str(&server.describe());
    }
    text
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Values of one header of a logged request, by case-insensitive name.
pub fn header<'a>(request: &'a Value, name: &str) -> Vec<&'a str> {
    request["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .filter_map(|h| h[1].as_str())
        .collect()
}

pub fn all_header_values(request: &Value) -> Vec<&str> {
    request["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h[1].as_str())
        .collect()
}

/// An `[[http.allow]]` rule for `host`:443 that dials the upstream on 127.0.0.1.
pub fn rule(host: &str, upstream: u16, extra: &str) -> String {
    format!(
        "[[http.allow]]\nhost = \"{host}\"\nport = 443\nconnect = \"127.0.0.1:{upstream}\"\n{extra}\n"
    )
}

/// A policy with `body` (rules and credentials) that trusts the test CA upstream.
pub fn tunnel_policy(name: &str, pki: &Pki, body: &str) -> String {
    policy(
        name,
        &format!(
            "{body}\n[tls]\nupstream_ca = [{:?}]\n",
            pki.ca.to_str().unwrap()
        ),
    )
}
