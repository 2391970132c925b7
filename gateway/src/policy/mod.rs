//! The policy as plain data: what a sandbox may reach. No I/O here; `file` reads TOML.

pub mod explain;
mod file;
mod lint;
mod ports;
pub mod suggest;
mod tree;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use ipnet::IpNet;

#[cfg(test)]
pub use file::parse;
pub use file::{
    Checked, Located, PolicyError, Severity, check, check_text, listen_address, load, valid_name,
};
pub use ports::PortRange;

/// Default tunnel address: loopback, ephemeral port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The sandbox's name in audit records.
    pub name: String,
    pub tunnel_listen: SocketAddr,
    /// Largest request body the tunnel forwards, in bytes; no limit when `None`.
    pub max_request_body: Option<u64>,
    pub network: Vec<NetRule>,
    pub unix: Vec<UnixRule>,
    pub http: Vec<HttpRule>,
    pub credentials: BTreeMap<String, Credential>,
    pub upstream_ca: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A `[[network.allow]]` entry: direct kernel-level access, no proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct NetRule {
    pub cidr: IpNet,
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
}

/// A `[[unix.allow]]` entry: a host unix socket the sandbox may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixRule {
    Path(PathBuf),
    /// Written `@name` in the policy.
    Abstract(Vec<u8>),
}

/// A `[[http.allow]]` rule, enforced by the tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRule {
    pub host: String,
    pub port: u16,
    pub methods: Vec<String>,
    pub paths: Vec<String>,
    pub credential: Option<String>,
    pub private: bool,
    pub connect: Option<SocketAddr>,
    pub passthrough: bool,
    /// The credential may be attached to plain HTTP requests too, where it crosses the
    /// network unencrypted; without it, they are refused.
    pub plain_http: bool,
}

impl HttpRule {
    /// Its credential may not be attached to a plain HTTP request.
    pub fn credential_needs_tls(&self) -> bool {
        self.credential.is_some() && !self.plain_http
    }
}

#[cfg(test)]
impl HttpRule {
    /// A rule for `host`:443 with these methods and paths and every other key at its default.
    pub(crate) fn for_test(host: &str, methods: &[&str], paths: &[&str]) -> Self {
        Self {
            host: host.into(),
            port: 443,
            methods: methods.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
            credential: None,
            private: false,
            connect: None,
            passthrough: false,
            plain_http: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

/// Where a credential's secret comes from and how it is attached. Holds no secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub source: SecretSource,
    pub header: String,
    pub format: String,
    pub basic_user: Option<String>,
    pub placeholder: Option<String>,
}

/// `3 http rules` or `1 network rule`.
pub fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

impl Policy {
    /// `3 http rules, 1 network rule, 2 credentials`, and unix sockets when any.
    pub fn summary(&self) -> String {
        let mut parts = vec![
            count(self.http.len(), "http rule"),
            count(self.network.len(), "network rule"),
            count(self.credentials.len(), "credential"),
        ];
        if !self.unix.is_empty() {
            parts.push(count(self.unix.len(), "unix socket"));
        }
        parts.join(", ")
    }

    /// Environment variables that hold secrets; `run` removes them from CMD's environment.
    pub fn secret_env_vars(&self) -> impl Iterator<Item = &str> {
        self.credentials.values().filter_map(|c| match &c.source {
            SecretSource::Env(var) => Some(var.as_str()),
            SecretSource::File(_) => None,
        })
    }
}
