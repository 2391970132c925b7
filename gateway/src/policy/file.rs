//! The policy file format (TOML, version 1) and its errors, each with file, line and column.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    Credential, DEFAULT_LISTEN, HttpRule, NetRule, Policy, PortRange, Protocol, SecretSource,
    UnixRule,
};

/// Every problem found in one policy file.
#[derive(Debug)]
pub struct PolicyError {
    pub file: PathBuf,
    pub errors: Vec<Located>,
}

/// One problem, at a line and column (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                e.line,
                e.col,
                e.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Spanned<i64>,
    name: Option<Spanned<String>>,
    #[serde(default)]
    tunnel: RawTunnel,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    unix: RawUnix,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    credentials: BTreeMap<String, Spanned<RawCredential>>,
    #[serde(default)]
    tls: RawTls,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: Option<Spanned<String>>,
    max_request_body: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    allow: Vec<Spanned<RawNetRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetRule {
    cidr: Spanned<String>,
    ports: Spanned<Vec<Spanned<RawPort>>>,
    #[serde(default)]
    protocol: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUnix {
    #[serde(default)]
    allow: Vec<Spanned<RawUnixRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnixRule {
    path: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    allow: Vec<Spanned<RawHttpRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpRule {
    host: Spanned<String>,
    port: Option<Spanned<i64>>,
    #[serde(default)]
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    credential: Option<Spanned<String>>,
    #[serde(default)]
    private: bool,
    connect: Option<Spanned<String>>,
    #[serde(default)]
    passthrough: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    env: Option<String>,
    file: Option<PathBuf>,
    header: Option<String>,
    format: Option<String>,
    basic_user: Option<String>,
    placeholder: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    #[serde(default)]
    upstream_ca: Vec<PathBuf>,
}

/// Reads and validates a policy file.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: path.to_owned(),
        errors: vec![Located {
            line: 1,
            col: 1,
            message: format!("cannot read policy file: {e}"),
        }],
    })?;
    parse(path, &text)
}

/// Validates policy text; `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Policy, PolicyError> {
    let mut errs = Errors {
        text,
        found: Vec::new(),
    };
    let policy = match toml::from_str::<RawPolicy>(text) {
        Ok(raw) => convert(raw, &mut errs),
        Err(e) => {
            errs.at(e.span().unwrap_or(0..0), e.message().to_owned());
            None
        }
    };
    match policy {
        Some(p) if errs.found.is_empty() => Ok(p),
        _ => Err(PolicyError {
            file: path.to_owned(),
            errors: errs.found,
        }),
    }
}

struct Errors<'a> {
    text: &'a str,
    found: Vec<Located>,
}

impl Errors<'_> {
    fn at(&mut self, span: Range<usize>, message: String) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.found.push(Located { line, col, message });
    }
}

fn convert(raw: RawPolicy, errs: &mut Errors<'_>) -> Option<Policy> {
    if *raw.version.get_ref() != 1 {
        errs.at(
            raw.version.span(),
            format!(
                "unsupported policy version {}: this gateway reads version 1",
                raw.version.get_ref()
            ),
        );
    }
    let name = match raw.name {
        Some(n) if valid_name(n.get_ref()) => n.into_inner(),
        Some(n) => {
            errs.at(
                n.span(),
                "bad name: use 1-64 letters, digits, `-`, `_` or `.`".into(),
            );
            String::new()
        }
        None => "sandbox".to_owned(),
    };
    let tunnel_listen = match raw.tunnel.listen {
        None => DEFAULT_LISTEN.parse().ok()?,
        Some(l) => match l.get_ref().parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => a,
            Ok(_) => {
                errs.at(
                    l.span(),
                    "tunnel.listen must be a loopback address (127.0.0.0/8 or [::1])".into(),
                );
                DEFAULT_LISTEN.parse().ok()?
            }
            Err(_) => {
                errs.at(
                    l.span(),
                    format!("bad tunnel.listen `{}`: expected IP:PORT", l.get_ref()),
                );
                DEFAULT_LISTEN.parse().ok()?
            }
        },
    };
    let max_request_body =
        raw.tunnel
            .max_request_body
            .and_then(|m| match u64::try_from(*m.get_ref()) {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    errs.at(
                        m.span(),
                        "tunnel.max_request_body must be a positive number of bytes".into(),
                    );
                    None
                }
            });
    let network = raw
        .network
        .allow
        .into_iter()
        .filter_map(|r| net_rule(r.into_inner(), errs))
        .collect();
    let unix = raw
        .unix
        .allow
        .into_iter()
        .filter_map(|r| unix_rule(r.into_inner(), errs))
        .collect();
    let mut credentials = BTreeMap::new();
    for (name, c) in raw.credentials {
        let span = c.span();
        if let Some(c) = credential(&name, c.into_inner(), span, errs) {
            credentials.insert(name, c);
        }
    }
    let http = raw
        .http
        .allow
        .into_iter()
        .filter_map(|r| http_rule(r.into_inner(), &credentials, errs))
        .collect();
    Some(Policy {
        name,
        tunnel_listen,
        max_request_body,
        network,
        unix,
        http,
        credentials,
        upstream_ca: raw.tls.upstream_ca,
    })
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn net_rule(raw: RawNetRule, errs: &mut Errors<'_>) -> Option<NetRule> {
    let cidr = match raw.cidr.get_ref().parse::<ipnet::IpNet>() {
        Ok(c) => Some(c.trunc()),
        Err(_) => match raw.cidr.get_ref().parse::<std::net::IpAddr>() {
            Ok(ip) => Some(ipnet::IpNet::from(ip)),
            Err(_) => {
                errs.at(
                    raw.cidr.span(),
                    format!(
                        "bad CIDR `{}`: expected an address or prefix like \"10.0.0.0/8\"",
                        raw.cidr.get_ref()
                    ),
                );
                None
            }
        },
    };
    let protocol = match raw.protocol.as_ref().map(|p| p.get_ref().as_str()) {
        None | Some("tcp") => Some(Protocol::Tcp),
        Some("udp") => Some(Protocol::Udp),
        Some(other) => {
            let span = raw.protocol.as_ref().map_or(0..0, Spanned::span);
            errs.at(
                span,
                format!("bad protocol `{other}`: expected \"tcp\" or \"udp\""),
            );
            None
        }
    };
    let ports_span = raw.ports.span();
    let mut ports = Vec::new();
    for p in raw.ports.into_inner() {
        let parsed = match p.get_ref() {
            RawPort::Number(n) => u16::try_from(*n)
                .map_err(|_| format!("bad port {n}: expected 1-65535"))
                .and_then(|n| PortRange::parse(&n.to_string())),
            RawPort::Text(t) => PortRange::parse(t),
        };
        match parsed {
            Ok(r) => ports.push(r),
            Err(m) => errs.at(p.span(), m),
        }
    }
    if ports.is_empty() {
        errs.at(ports_span, "ports must list at least one port".into());
        return None;
    }
    Some(NetRule {
        cidr: cidr?,
        ports,
        protocol: protocol?,
    })
}

fn unix_rule(raw: RawUnixRule, errs: &mut Errors<'_>) -> Option<UnixRule> {
    let p = raw.path.get_ref();
    let max = gateway_common::UNIX_PATH_MAX - 1;
    if let Some(name) = p.strip_prefix('@') {
        if name.is_empty() || name.len() > max {
            errs.at(raw.path.span(), format!("bad abstract socket name `{p}`"));
            return None;
        }
        return Some(UnixRule::Abstract(name.as_bytes().to_vec()));
    }
    if !p.starts_with('/') || p.len() > max || p.contains('\0') {
        errs.at(
            raw.path.span(),
            format!("bad unix socket path `{p}`: expected an absolute path or @abstract-name"),
        );
        return None;
    }
    Some(UnixRule::Path(PathBuf::from(p)))
}

fn credential(
    name: &str,
    raw: RawCredential,
    span: Range<usize>,
    errs: &mut Errors<'_>,
) -> Option<Credential> {
    let source = match (raw.env, raw.file) {
        (Some(env), None) => SecretSource::Env(env),
        (None, Some(file)) => SecretSource::File(file),
        (None, None) => {
            errs.at(
                span,
                format!("credential `{name}` has no source: set `env` or `file`"),
            );
            return None;
        }
        (Some(_), Some(_)) => {
            errs.at(
                span,
                format!("credential `{name}` has two sources: set only one of `env` and `file`"),
            );
            return None;
        }
    };
    Some(Credential {
        source,
        header: raw.header.unwrap_or_else(|| "Authorization".into()),
        format: raw.format.unwrap_or_else(|| "Bearer {secret}".into()),
        basic_user: raw.basic_user,
        placeholder: raw.placeholder,
    })
}

fn http_rule(
    raw: RawHttpRule,
    credentials: &BTreeMap<String, Credential>,
    errs: &mut Errors<'_>,
) -> Option<HttpRule> {
    let port = match raw.port {
        None => 443,
        Some(p) => match u16::try_from(*p.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                errs.at(
                    p.span(),
                    format!("bad port {}: expected 1-65535", p.get_ref()),
                );
                return None;
            }
        },
    };
    if let Some(c) = &raw.credential
        && !credentials.contains_key(c.get_ref())
    {
        errs.at(
            c.span(),
            format!(
                "unknown credential `{}`: define it under [credentials.{}]",
                c.get_ref(),
                c.get_ref()
            ),
        );
        return None;
    }
    let connect = match raw.connect {
        None => None,
        Some(c) => match c.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.at(
                    c.span(),
                    format!("bad connect `{}`: expected IP:PORT", c.get_ref()),
                );
                return None;
            }
        },
    };
    Some(HttpRule {
        host: raw.host.into_inner().to_ascii_lowercase(),
        port,
        methods: raw.methods.into_iter().map(Spanned::into_inner).collect(),
        paths: raw.paths.into_iter().map(Spanned::into_inner).collect(),
        credential: raw.credential.map(Spanned::into_inner),
        private: raw.private,
        connect,
        passthrough: raw.passthrough,
    })
}

#[cfg(test)]
mod tests;
