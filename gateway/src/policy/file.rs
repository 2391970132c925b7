//! The policy file format (TOML, version 1) and its errors, each with file, line and column.
//!
//! The text is first read into a tree that remembers where every key and value is written
//! (`tree`), then validated table by table, so one run reports every problem in the file: an
//! unknown key in one rule does not hide a bad CIDR in another. Only a TOML syntax error stops
//! the walk, since there is no tree to walk after it.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use super::{
    Credential, DEFAULT_LISTEN, HttpRule, NetRule, Policy, PortRange, Protocol, SecretSource,
    UnixRule, lint,
    tree::{self, Key, Node, Span, Value},
};
use crate::tunnel::authority::canonical_host;

/// Every problem found in one policy file (errors, and the warnings found beside them).
#[derive(Debug)]
pub struct PolicyError {
    pub file: PathBuf,
    pub errors: Vec<Located>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    /// The policy loads, but something in it does not do what it seems to.
    Warning,
}

/// One problem, at a line and column (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: usize,
    pub col: usize,
    pub severity: Severity,
    pub message: String,
}

impl Located {
    /// `FILE:LINE:COL: message`, or `FILE:LINE:COL: warning: message`.
    pub fn render(&self, file: &Path) -> String {
        let level = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        format!(
            "{}:{}:{}: {level}{}",
            file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(&e.render(&self.file))?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// A valid policy with what `check` and `explain` show beside it.
#[derive(Debug)]
pub struct Checked {
    pub file: PathBuf,
    pub policy: Policy,
    pub warnings: Vec<Located>,
    /// The line of each `[[http.allow]]` rule, by rule index.
    pub http_lines: Vec<usize>,
}

/// Reads and validates a policy file; warnings are logged.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let checked = check(path)?;
    for w in &checked.warnings {
        tracing::warn!("{}", w.render(path));
    }
    Ok(checked.policy)
}

/// Reads and validates a policy file, keeping the warnings and rule lines. Only a regular
/// file of at most [`crate::trusted_file::MAX_FILE_BYTES`] is read, and a FIFO is not waited
/// on (a reload reads it in the supervisor, which handles the signals).
pub fn check(path: &Path) -> Result<Checked, PolicyError> {
    let text =
        crate::trusted_file::read_to_string(path, "the policy file").map_err(|e| PolicyError {
            file: path.to_owned(),
            errors: vec![Located {
                line: 1,
                col: 1,
                severity: Severity::Error,
                message: format!("cannot read policy file: {e}"),
            }],
        })?;
    check_text(path, &text)
}

/// Validates policy text; `path` only names the file in messages.
pub fn check_text(path: &Path, text: &str) -> Result<Checked, PolicyError> {
    let mut d = Diag::new(text);
    let built = match tree::parse(text) {
        Ok(root) => convert(&root, &mut d),
        Err((span, message)) => {
            d.error(&span, message);
            None
        }
    };
    d.found.sort_by_key(|l| (l.line, l.col));
    let has_errors = d.found.iter().any(|l| l.severity == Severity::Error);
    match built {
        Some((policy, http_lines)) if !has_errors => Ok(Checked {
            file: path.to_owned(),
            policy,
            warnings: d.found,
            http_lines,
        }),
        _ => Err(PolicyError {
            file: path.to_owned(),
            errors: d.found,
        }),
    }
}

/// Validates policy text into a policy (warnings dropped).
#[cfg(test)]
pub fn parse(path: &Path, text: &str) -> Result<Policy, PolicyError> {
    check_text(path, text).map(|c| c.policy)
}

/// What was found so far, with the text to turn spans into lines and columns.
struct Diag<'a> {
    text: &'a str,
    /// Where each line starts, so that finding a line takes log time (large policies have many rules).
    line_starts: Vec<usize>,
    found: Vec<Located>,
}

impl<'a> Diag<'a> {
    fn new(text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            text,
            line_starts,
            found: Vec::new(),
        }
    }

    fn push(&mut self, span: &Span, severity: Severity, message: String) {
        let at = span.start.min(self.text.len());
        let line = self.line_of(span);
        let start = self.line_starts[line - 1];
        let col = self.text[start..at].chars().count() + 1;
        self.found.push(Located {
            line,
            col,
            severity,
            message,
        });
    }

    fn error(&mut self, span: &Span, message: impl Into<String>) {
        self.push(span, Severity::Error, message.into());
    }

    fn warning(&mut self, span: &Span, message: impl Into<String>) {
        self.push(span, Severity::Warning, message.into());
    }

    /// The 1-based line `span` starts on.
    fn line_of(&self, span: &Span) -> usize {
        let at = span.start.min(self.text.len());
        self.line_starts.partition_point(|&start| start <= at)
    }
}

/// A value and where it is written.
#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    span: Span,
}

/// One table of the file, with the keys it may hold.
struct Table<'v> {
    /// How messages name it: `[[http.allow]]`, `[credentials.github]`, `the top level`.
    name: Cow<'static, str>,
    span: Span,
    entries: &'v [(Key<'v>, Value<'v>)],
}

impl<'v> Table<'v> {
    /// `value` as a table that may hold `keys` (any key when `None`). A value that is no
    /// table and every unknown key are reported.
    fn of(
        d: &mut Diag<'_>,
        value: &'v Value<'v>,
        name: impl Into<Cow<'static, str>>,
        keys: Option<&[&str]>,
    ) -> Option<Self> {
        let name = name.into();
        let Node::Table(entries) = &value.node else {
            d.error(
                &value.span,
                format!("{name} must be a table, found {}", value.kind()),
            );
            return None;
        };
        if let Some(keys) = keys {
            for (k, _) in entries {
                if keys.contains(&k.name.as_ref()) {
                    continue;
                }
                let hint = match lint::did_you_mean(&k.name, keys) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("expected one of {}", list(keys)),
                };
                d.error(
                    &k.span,
                    format!("unknown key `{}` {}: {hint}", k.name, place(&name)),
                );
            }
        }
        Some(Self {
            name,
            span: value.span.clone(),
            entries,
        })
    }

    fn entry(&self, key: &str) -> Option<&'v (Key<'v>, Value<'v>)> {
        self.entries.iter().find(|(k, _)| k.name == key)
    }

    fn get(&self, key: &str) -> Option<&'v Value<'v>> {
        self.entry(key).map(|(_, v)| v)
    }

    fn missing(&self, d: &mut Diag<'_>, key: &str, example: &str) {
        d.error(
            &self.span,
            format!(
                "missing required key `{key}` {}: add {example}",
                place(&self.name)
            ),
        );
    }

    fn wrong_type(d: &mut Diag<'_>, key: &str, expected: &str, found: &Value<'_>) {
        d.error(
            &found.span,
            format!("`{key}` must be {expected}, found {}", found.kind()),
        );
    }

    fn string(&self, d: &mut Diag<'_>, key: &str) -> Option<At<&'v str>> {
        let v = self.get(key)?;
        match &v.node {
            Node::String(s) => Some(At {
                value: s.as_ref(),
                span: v.span.clone(),
            }),
            _ => {
                Self::wrong_type(d, key, "a string", v);
                None
            }
        }
    }

    fn integer(&self, d: &mut Diag<'_>, key: &str) -> Option<At<i64>> {
        let v = self.get(key)?;
        match &v.node {
            Node::Integer(i) => Some(At {
                value: *i,
                span: v.span.clone(),
            }),
            _ => {
                Self::wrong_type(d, key, "an integer", v);
                None
            }
        }
    }

    /// A boolean, `false` when absent; `None` when it is something else.
    fn boolean(&self, d: &mut Diag<'_>, key: &str) -> Option<bool> {
        let Some(v) = self.get(key) else {
            return Some(false);
        };
        match &v.node {
            Node::Boolean(b) => Some(*b),
            _ => {
                Self::wrong_type(d, key, "true or false", v);
                None
            }
        }
    }

    fn array(&self, d: &mut Diag<'_>, key: &str, expected: &str) -> Option<At<&'v [Value<'v>]>> {
        let v = self.get(key)?;
        match &v.node {
            Node::Array(items) => Some(At {
                value: items.as_slice(),
                span: v.span.clone(),
            }),
            _ => {
                Self::wrong_type(d, key, expected, v);
                None
            }
        }
    }

    /// An array of strings; `Err` when it is there but wrong (each bad item reported).
    fn strings(&self, d: &mut Diag<'_>, key: &str) -> Result<Option<At<Vec<At<&'v str>>>>, ()> {
        let Some(items) = self.array(d, key, "an array of strings") else {
            return if self.get(key).is_some() {
                Err(())
            } else {
                Ok(None)
            };
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items.value {
            match &item.node {
                Node::String(s) => out.push(At {
                    value: s.as_ref(),
                    span: item.span.clone(),
                }),
                _ => {
                    d.error(
                        &item.span,
                        format!(
                            "each entry of `{key}` must be a string, found {}",
                            item.kind()
                        ),
                    );
                    ok = false;
                }
            }
        }
        if !ok {
            return Err(());
        }
        Ok(Some(At {
            value: out,
            span: items.span,
        }))
    }

    /// An optional array of strings whose absence means "any": an empty array would read the
    /// same, so it is refused with `empty`. `Err` when wrong or empty; absent gives no items.
    fn nonempty_strings(
        &self,
        d: &mut Diag<'_>,
        key: &str,
        empty: &str,
    ) -> Result<Vec<At<&'v str>>, ()> {
        match self.strings(d, key)? {
            None => Ok(Vec::new()),
            Some(list) if list.value.is_empty() => {
                d.error(&list.span, empty);
                Err(())
            }
            Some(list) => Ok(list.value),
        }
    }

    /// A sub-table such as `[tunnel]`; `None` when absent or wrong.
    fn table(&self, d: &mut Diag<'_>, key: &str, keys: Option<&[&str]>) -> Option<Table<'v>> {
        let v = self.get(key)?;
        Table::of(d, v, format!("[{key}]"), keys)
    }

    /// The tables of an array of tables such as `[[http.allow]]`.
    fn tables(&self, d: &mut Diag<'_>, key: &str, name: &str) -> Vec<&'v Value<'v>> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        match &v.node {
            Node::Array(items) => items
                .iter()
                .filter(|item| {
                    let table = matches!(item.node, Node::Table(_));
                    if !table {
                        d.error(
                            &item.span,
                            format!("each {name} entry must be a table, found {}", item.kind()),
                        );
                    }
                    table
                })
                .collect(),
            _ => {
                d.error(
                    &v.span,
                    format!(
                        "`{}` must be an array of tables (write each entry under its own {name} header), found {}",
                        self.qualified(key),
                        v.kind()
                    ),
                );
                Vec::new()
            }
        }
    }

    fn qualified(&self, key: &str) -> String {
        match self
            .name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
        {
            Some(parent) => format!("{parent}.{key}"),
            None => key.to_owned(),
        }
    }
}

/// `in [tunnel]`, `at the top level`.
fn place(table: &str) -> String {
    if table.starts_with('[') {
        format!("in {table}")
    } else {
        format!("at {table}")
    }
}

fn list(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

const TOP_KEYS: &[&str] = &[
    "version",
    "name",
    "tunnel",
    "network",
    "unix",
    "http",
    "credentials",
    "tls",
];
const TUNNEL_KEYS: &[&str] = &["listen", "max_request_body"];
const NET_RULE_KEYS: &[&str] = &["cidr", "ports", "protocol"];
const UNIX_RULE_KEYS: &[&str] = &["path"];
const HTTP_RULE_KEYS: &[&str] = &[
    "host",
    "port",
    "methods",
    "paths",
    "credential",
    "private",
    "connect",
    "passthrough",
    "plain_http",
];
const CREDENTIAL_KEYS: &[&str] = &[
    "env",
    "file",
    "header",
    "format",
    "basic_user",
    "placeholder",
];
const TLS_KEYS: &[&str] = &["upstream_ca"];

/// The whole file; `None` when some part could not be built (its errors are in `d`).
fn convert(root: &Value<'_>, d: &mut Diag<'_>) -> Option<(Policy, Vec<usize>)> {
    let top = Table::of(d, root, "the top level", Some(TOP_KEYS))?;
    let version_ok = match top.get("version") {
        None => {
            d.error(
                &(0..0),
                "missing required key `version`: start the file with `version = 1`",
            );
            false
        }
        Some(v) => match &v.node {
            Node::Integer(1) => true,
            Node::Integer(n) => {
                d.error(
                    &v.span,
                    format!("unsupported policy version {n}: this gateway reads version 1"),
                );
                false
            }
            _ => {
                Table::wrong_type(d, "version", "the integer 1", v);
                false
            }
        },
    };
    let name = match top.string(d, "name") {
        Some(n) if valid_name(n.value) => Some(n.value.to_owned()),
        Some(n) => {
            d.error(
                &n.span,
                "bad name: use 1-64 letters, digits, `-`, `_` or `.`",
            );
            None
        }
        None if top.get("name").is_some() => None,
        None => Some("sandbox".to_owned()),
    };
    let (tunnel_listen, max_request_body) = tunnel(d, &top)?;

    let network_table = top.table(d, "network", Some(&["allow"]));
    let mut network = Vec::new();
    let mut network_at = Vec::new();
    let mut network_ok = top.get("network").is_none() || network_table.is_some();
    for (index, v) in network_table
        .map(|t| t.tables(d, "allow", "[[network.allow]]"))
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        match net_rule(d, v) {
            Some(rule) => {
                network.push(rule);
                network_at.push(Place {
                    index,
                    span: v.span.clone(),
                });
            }
            None => network_ok = false,
        }
    }
    duplicate_net_rules(d, &network, &network_at);

    let unix_table = top.table(d, "unix", Some(&["allow"]));
    let mut unix = Vec::new();
    let mut unix_ok = top.get("unix").is_none() || unix_table.is_some();
    for v in unix_table
        .map(|t| t.tables(d, "allow", "[[unix.allow]]"))
        .unwrap_or_default()
    {
        match unix_rule(d, v) {
            Some(r) => unix.push(r),
            None => unix_ok = false,
        }
    }

    let (credentials, credential_names, credentials_ok) = credentials(d, &top);

    let http_table = top.table(d, "http", Some(&["allow"]));
    let mut http = Vec::new();
    let mut http_at = Vec::new();
    let mut used_credentials = Vec::new();
    let mut http_ok = top.get("http").is_none() || http_table.is_some();
    for (index, v) in http_table
        .map(|t| t.tables(d, "allow", "[[http.allow]]"))
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        match http_rule(d, v, &credential_names, &mut used_credentials) {
            Some(rule) => {
                http.push(rule);
                http_at.push(Place {
                    index,
                    span: v.span.clone(),
                });
            }
            None => http_ok = false,
        }
    }
    http_lints(d, &http, &http_at, http_ok);
    for (name, span) in &credential_names {
        if !used_credentials.iter().any(|u| u == name) {
            d.warning(
                span,
                format!(
                    "credential `{name}` is not named by any [[http.allow]] rule: it is never attached (its variable is only removed from CMD's environment)"
                ),
            );
        }
    }

    let upstream_ca = match top.table(d, "tls", Some(TLS_KEYS)) {
        None => top.get("tls").is_none().then(Vec::new),
        Some(tls) => match tls.strings(d, "upstream_ca") {
            Ok(list) => Some(
                list.map(|l| l.value.iter().map(|p| PathBuf::from(p.value)).collect())
                    .unwrap_or_default(),
            ),
            Err(()) => None,
        },
    };

    if !(version_ok && network_ok && unix_ok && credentials_ok && http_ok) {
        return None;
    }
    let http_lines = http_at.iter().map(|n| d.line_of(&n.span)).collect();
    Some((
        Policy {
            name: name?,
            tunnel_listen,
            max_request_body,
            network,
            unix,
            http,
            credentials,
            upstream_ca: upstream_ca?,
        },
        http_lines,
    ))
}

fn tunnel(d: &mut Diag<'_>, top: &Table<'_>) -> Option<(SocketAddr, Option<u64>)> {
    let default: SocketAddr = DEFAULT_LISTEN.parse().ok()?;
    let Some(t) = top.table(d, "tunnel", Some(TUNNEL_KEYS)) else {
        return Some((default, None));
    };
    let listen = match t.string(d, "listen") {
        None => default,
        Some(l) => listen_address("tunnel.listen", l.value).unwrap_or_else(|e| {
            d.error(&l.span, e);
            default
        }),
    };
    let max = t
        .integer(d, "max_request_body")
        .and_then(|m| match u64::try_from(m.value) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                d.error(
                    &m.span,
                    "tunnel.max_request_body must be a positive number of bytes",
                );
                None
            }
        });
    Some((listen, max))
}

/// The tunnel's address as `key` gives it: IP:PORT on loopback, else the message to show.
pub fn listen_address(key: &str, text: &str) -> Result<SocketAddr, String> {
    match text.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_loopback() => Ok(a),
        Ok(_) => Err(format!(
            "{key} must be a loopback address (127.0.0.0/8 or [::1])"
        )),
        Err(_) => Err(format!("bad {key} `{text}`: expected IP:PORT")),
    }
}

pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn net_rule(d: &mut Diag<'_>, value: &Value<'_>) -> Option<NetRule> {
    let t = Table::of(d, value, "[[network.allow]]", Some(NET_RULE_KEYS))?;
    let cidr_at = t.string(d, "cidr");
    let cidr = match &cidr_at {
        None => {
            if t.get("cidr").is_none() {
                t.missing(d, "cidr", "cidr = \"10.0.0.5/32\"");
            }
            None
        }
        Some(c) => cidr(d, c),
    };
    let protocol = match t.string(d, "protocol") {
        None if t.get("protocol").is_some() => None,
        None => Some(Protocol::Tcp),
        Some(p) => match p.value {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            other => {
                d.error(
                    &p.span,
                    format!("bad protocol `{other}`: expected \"tcp\" or \"udp\""),
                );
                None
            }
        },
    };
    let ports = match t.array(d, "ports", "an array of ports (write ports = [5432])") {
        None => {
            if t.get("ports").is_none() {
                t.missing(
                    d,
                    "ports",
                    "ports = [PORT] (numbers or \"8000-8100\" ranges)",
                );
            }
            None
        }
        Some(items) => {
            let mut ports = Vec::new();
            let mut ok = true;
            for p in items.value {
                let parsed = match &p.node {
                    Node::Integer(n) => PortRange::number(*n),
                    Node::String(s) => PortRange::parse(s),
                    _ => Err(format!(
                        "a port must be a number or a \"first-last\" range, found {}",
                        p.kind()
                    )),
                };
                match parsed {
                    Ok(r) => ports.push(r),
                    Err(m) => {
                        d.error(&p.span, m);
                        ok = false;
                    }
                }
            }
            if items.value.is_empty() {
                d.error(&items.span, "ports must list at least one port");
                ok = false;
            }
            ok.then_some(ports)
        }
    };
    let rule = NetRule {
        cidr: cidr?,
        ports: ports?,
        protocol: protocol?,
    };
    if let Some(c) = &cidr_at
        && let Some(why) = huge_range(&rule, c.value)
    {
        d.warning(&c.span, why);
    }
    Some(rule)
}

/// A warning for a `[[network.allow]]` range wider than an IPv4 /8 or an IPv6 /32: the
/// kernel lets the sandbox reach all of it directly.
fn huge_range(rule: &NetRule, written: &str) -> Option<String> {
    let widest = match rule.cidr {
        ipnet::IpNet::V4(_) => 8,
        ipnet::IpNet::V6(_) => 32,
    };
    if rule.cidr.prefix_len() >= widest {
        return None;
    }
    let mut ports = rule.ports.clone();
    ports.sort_unstable();
    let mut next = 1u32;
    for r in &ports {
        if u32::from(r.first) <= next {
            next = next.max(u32::from(r.last) + 1);
        }
    }
    let which = if next > u32::from(u16::MAX) {
        "on every port".to_owned()
    } else {
        let list: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
        let one = matches!(rule.ports.as_slice(), [p] if p.first == p.last);
        format!("on port{} {}", if one { "" } else { "s" }, list.join(", "))
    };
    Some(format!(
        "cidr `{written}` opens the kernel to that whole range directly, {which}: connections to it bypass the tunnel, so no [[http.allow]] rule, credential or private-address check applies to them and they are not audited as requests; list only the addresses the sandbox needs"
    ))
}

fn cidr(d: &mut Diag<'_>, c: &At<&str>) -> Option<ipnet::IpNet> {
    if let Ok(net) = c.value.parse::<ipnet::IpNet>() {
        if net.trunc() != net {
            d.warning(
                &c.span,
                format!("`{}` has host bits set: it means {}", c.value, net.trunc()),
            );
        }
        return Some(net.trunc());
    }
    if let Ok(ip) = c.value.parse::<IpAddr>() {
        return Some(ipnet::IpNet::from(ip));
    }
    d.error(
        &c.span,
        format!(
            "bad CIDR `{}`: expected an address or prefix like \"10.0.0.0/8\"",
            c.value
        ),
    );
    None
}

/// Where a valid rule is: its index among all rules of its kind, and its span.
struct Place {
    index: usize,
    span: Span,
}

/// `rules` are the valid rules, `at` where each is.
fn duplicate_net_rules(d: &mut Diag<'_>, rules: &[NetRule], at: &[Place]) {
    let mut seen = HashMap::with_capacity(rules.len());
    for (k, rule) in rules.iter().enumerate() {
        let ports = if rule.ports.is_sorted() {
            Cow::Borrowed(rule.ports.as_slice())
        } else {
            let mut ports = rule.ports.clone();
            ports.sort_unstable();
            Cow::Owned(ports)
        };
        let key = (rule.cidr, rule.protocol, ports);
        let Some(a) = seen.get(&key).map(|&first: &usize| &at[first]) else {
            seen.insert(key, k);
            continue;
        };
        let b = &at[k];
        let line = d.line_of(&a.span);
        d.error(
            &b.span,
            format!(
                "duplicate rule: network rule {} allows exactly what network rule {} (line {line}) allows; remove one",
                b.index, a.index
            ),
        );
    }
}

fn unix_rule(d: &mut Diag<'_>, value: &Value<'_>) -> Option<UnixRule> {
    let t = Table::of(d, value, "[[unix.allow]]", Some(UNIX_RULE_KEYS))?;
    let Some(path) = t.string(d, "path") else {
        if t.get("path").is_none() {
            t.missing(
                d,
                "path",
                "path = \"/run/service.sock\" or \"@abstract-name\"",
            );
        }
        return None;
    };
    let p = path.value;
    let max = gateway_common::UNIX_PATH_MAX - 1;
    if let Some(name) = p.strip_prefix('@') {
        if name.is_empty() || name.len() > max {
            d.error(&path.span, format!("bad abstract socket name `{p}`"));
            return None;
        }
        return Some(UnixRule::Abstract(name.as_bytes().to_vec()));
    }
    if !p.starts_with('/') || p.len() > max || p.contains('\0') {
        d.error(
            &path.span,
            format!("bad unix socket path `{p}`: expected an absolute path or @abstract-name"),
        );
        return None;
    }
    Some(UnixRule::Path(PathBuf::from(p)))
}

/// The credentials that are valid, the names of all that are declared (with where), and
/// whether all were valid.
fn credentials(
    d: &mut Diag<'_>,
    top: &Table<'_>,
) -> (BTreeMap<String, Credential>, Vec<(String, Span)>, bool) {
    let mut out = BTreeMap::new();
    let mut names = Vec::new();
    let Some(table) = top.table(d, "credentials", None) else {
        return (out, names, top.get("credentials").is_none());
    };
    let mut ok = true;
    let mut placeholders: Vec<(String, String)> = Vec::new();
    for (key, value) in table.entries {
        names.push((key.name.to_string(), key.span.clone()));
        match credential(d, &key.name, value, &mut placeholders) {
            Some(c) => {
                out.insert(key.name.to_string(), c);
            }
            None => ok = false,
        }
    }
    (out, names, ok)
}

fn credential(
    d: &mut Diag<'_>,
    name: &str,
    value: &Value<'_>,
    placeholders: &mut Vec<(String, String)>,
) -> Option<Credential> {
    let t = Table::of(
        d,
        value,
        format!("[credentials.{name}]"),
        Some(CREDENTIAL_KEYS),
    )?;
    let mut ok = true;
    let env = t.string(d, "env");
    let file = t.string(d, "file");
    let source = match (&env, &file) {
        (Some(env), None) => {
            if !valid_env_name(env.value) {
                d.error(
                    &env.span,
                    format!(
                        "bad env `{}`: expected an environment variable name like \"GITHUB_TOKEN\"",
                        env.value
                    ),
                );
                ok = false;
            }
            Some(SecretSource::Env(env.value.to_owned()))
        }
        (None, Some(file)) => {
            if file.value.is_empty() {
                d.error(
                    &file.span,
                    "`file` must name the file that holds the secret",
                );
                ok = false;
            } else if let Some(readable) = others_may_read(Path::new(file.value)) {
                d.warning(&file.span, readable);
            }
            Some(SecretSource::File(PathBuf::from(file.value)))
        }
        (None, None) => {
            if t.get("env").is_none() && t.get("file").is_none() {
                d.error(
                    &t.span,
                    format!(
                        "credential `{name}` has no source: set `env` (an environment variable) or `file`"
                    ),
                );
            }
            None
        }
        (Some(env), Some(file)) => {
            let later = if file.span.start > env.span.start {
                &file.span
            } else {
                &env.span
            };
            let key_span = t
                .entries
                .iter()
                .find(|(_, v)| v.span == *later)
                .map_or(later, |(k, _)| &k.span);
            d.error(
                key_span,
                format!("credential `{name}` has two sources: set only one of `env` and `file`"),
            );
            None
        }
    };
    let header = match t.string(d, "header") {
        Some(h) => {
            if hyper::header::HeaderName::from_bytes(h.value.as_bytes()).is_err() {
                d.error(
                    &h.span,
                    format!(
                        "bad header name `{}`: expected a name like \"x-api-key\"",
                        h.value
                    ),
                );
                ok = false;
            } else if let Some(why) = unusable_credential_header(h.value) {
                d.error(
                    &h.span,
                    format!(
                        "header `{}` cannot carry a credential: {why}; use the header the API reads it from, such as \"Authorization\" or \"x-api-key\"",
                        h.value
                    ),
                );
                ok = false;
            }
            h.value.to_owned()
        }
        None => {
            ok &= t.get("header").is_none();
            "Authorization".to_owned()
        }
    };
    let format = match t.string(d, "format") {
        Some(f) => {
            if !f.value.contains("{secret}") {
                d.error(
                    &f.span,
                    format!(
                        "format `{}` does not contain {{secret}}, so the secret would never be sent",
                        f.value
                    ),
                );
                ok = false;
            } else if f.value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                d.error(&f.span, "format must not contain control characters");
                ok = false;
            }
            Some(f)
        }
        None => {
            ok &= t.get("format").is_none();
            None
        }
    };
    let basic_user = match t.string(d, "basic_user") {
        Some(u) => {
            if u.value.contains(':') || u.value.bytes().any(|b| b.is_ascii_control()) {
                d.error(
                    &u.span,
                    "basic_user must not contain `:` or control characters",
                );
                ok = false;
            }
            if format.is_some() {
                d.error(
                    &u.span,
                    "set either `format` or `basic_user`, not both: basic_user makes the header \"Basic base64(user:secret)\" itself",
                );
                ok = false;
            }
            Some(u.value.to_owned())
        }
        None => {
            ok &= t.get("basic_user").is_none();
            None
        }
    };
    let placeholder = match t.string(d, "placeholder") {
        Some(p) => {
            if !valid_env_name(p.value) {
                d.error(
                    &p.span,
                    format!(
                        "bad placeholder `{}`: expected an environment variable name like \"GH_TOKEN\"",
                        p.value
                    ),
                );
                ok = false;
            } else if let Some((other, _)) = placeholders.iter().find(|(_, v)| v == p.value) {
                d.error(
                    &p.span,
                    format!(
                        "placeholder `{}` is already the placeholder of credential `{other}`",
                        p.value
                    ),
                );
                ok = false;
            }
            placeholders.push((name.to_owned(), p.value.to_owned()));
            Some(p.value.to_owned())
        }
        None => {
            ok &= t.get("placeholder").is_none();
            None
        }
    };
    if !ok {
        return None;
    }
    Some(Credential {
        source: source?,
        header,
        format: format.map_or_else(|| "Bearer {secret}".to_owned(), |f| f.value.to_owned()),
        basic_user,
        placeholder,
    })
}

/// A warning when the secret file exists and its group or everyone may read it (`run` and
/// `serve` refuse it when the sandbox's user is among them, see `tunnel::secret_file`).
fn others_may_read(file: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mode = std::fs::metadata(file).ok()?.mode() & 0o7777;
    let readable = match (mode & 0o040 != 0, mode & 0o004 != 0) {
        (false, false) => return None,
        (true, false) => "group-readable",
        (false, true) => "world-readable",
        (true, true) => "group- and world-readable",
    };
    let f = file.display();
    Some(format!(
        "secret file {f} is {readable} (mode {mode:o}): whoever can read it has the secret, and gateway run and serve refuse it when the sandbox's user can; make it root's alone: chown root:root {f} && chmod 600 {f}"
    ))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Tokens (RFC 9110 5.6.2) are what a method may be made of.
fn valid_method(m: &str) -> bool {
    !m.is_empty()
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why `host` cannot be a rule's host, if it cannot.
fn host_problem(host: &str) -> Option<String> {
    if host.contains("://") || host.contains('/') {
        return Some(format!(
            "bad host `{host}`: write the host name alone, without scheme or path, e.g. \"api.github.com\""
        ));
    }
    if host.contains('@') {
        return Some(format!(
            "bad host `{host}`: write the host name alone, without user"
        ));
    }
    let (wild, base) = match host.strip_prefix("*.") {
        Some(base) => (true, base),
        None => (false, host),
    };
    if base.contains('*') {
        return Some(format!(
            "bad host pattern `{host}`: `*` may only be the whole first label, as in \"*.github.com\" (any name below github.com)"
        ));
    }
    let is_v6 = base
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::Ipv6Addr>()
        .is_ok();
    if base.contains(':') && !is_v6 {
        return Some(format!(
            "bad host `{host}`: put the port in `port`, not in `host`"
        ));
    }
    let Some(canonical) = canonical_host(base) else {
        return Some(format!(
            "bad host `{host}`: not a valid host name or IP address"
        ));
    };
    if wild && canonical.parse::<IpAddr>().is_ok() {
        return Some(format!(
            "bad host pattern `{host}`: `*.` must be followed by a domain name, not an address"
        ));
    }
    None
}

fn http_rule(
    d: &mut Diag<'_>,
    value: &Value<'_>,
    credential_names: &[(String, Span)],
    used_credentials: &mut Vec<String>,
) -> Option<HttpRule> {
    let t = Table::of(d, value, "[[http.allow]]", Some(HTTP_RULE_KEYS))?;
    let mut ok = true;
    let host = match t.string(d, "host") {
        None => {
            if t.get("host").is_none() {
                t.missing(d, "host", "host = \"api.example.com\"");
            }
            None
        }
        Some(h) => match host_problem(h.value) {
            Some(problem) => {
                d.error(&h.span, problem);
                None
            }
            None => Some(h.value.to_ascii_lowercase()),
        },
    };
    let port = match t.integer(d, "port") {
        None => {
            ok &= t.get("port").is_none();
            443
        }
        Some(p) => match u16::try_from(p.value) {
            Ok(n) if n > 0 => n,
            _ => {
                d.error(&p.span, format!("bad port {}: expected 1-65535", p.value));
                ok = false;
                0
            }
        },
    };
    let methods = t
        .nonempty_strings(
            d,
            "methods",
            "`methods = []` would allow every method: leave `methods` out to allow any, or list them",
        )
        .unwrap_or_else(|()| {
            ok = false;
            Vec::new()
        });
    for m in &methods {
        if !valid_method(m.value) {
            d.error(
                &m.span,
                format!(
                    "bad method `{}`: expected an HTTP method such as \"GET\"",
                    m.value
                ),
            );
            ok = false;
        } else if m.value.eq_ignore_ascii_case("TRACE") {
            d.warning(&m.span, "the tunnel refuses TRACE whatever the rules say");
        } else if m.value.eq_ignore_ascii_case("CONNECT") {
            d.warning(
                &m.span,
                "CONNECT never reaches a method list: the tunnel lets a CONNECT through by host and port, then checks the methods of the requests inside it",
            );
        }
    }
    let methods: Vec<String> = methods.iter().map(|m| m.value.to_owned()).collect();
    let paths = t
        .nonempty_strings(
            d,
            "paths",
            "`paths = []` would allow every path: leave `paths` out to allow any, or list globs",
        )
        .unwrap_or_else(|()| {
            ok = false;
            Vec::new()
        });
    for p in &paths {
        if let Err(e) = glob::Pattern::new(p.value) {
            d.error(
                &p.span,
                format!(
                    "bad path glob `{}`: {} (at character {})",
                    p.value,
                    e.msg,
                    e.pos + 1
                ),
            );
            ok = false;
        } else if class_matches_escapes(p.value) {
            // A glob matches the path as sent: `%73ecret` is no `s` there, and an upstream
            // decodes it to `secret`. A class that admits `%` admits any escaped character.
            d.error(
                &p.span,
                format!(
                    "bad path glob `{}`: a class that matches `%` (negated, `[!...]`, or a range over it, `[ -~]`) would match an escaped form of what it leaves out (`%73` for `s`), which the upstream decodes; list what is allowed instead",
                    p.value
                ),
            );
            ok = false;
        } else if !p.value.starts_with('/') {
            d.error(
                &p.span,
                format!(
                    "bad path glob `{}`: request paths start with `/`, so this never matches; write e.g. \"/{}\"",
                    p.value,
                    p.value.trim_start_matches('*')
                ),
            );
            ok = false;
        } else if let Some((read, e)) = crate::tunnel::path_forms::readings(p.value)
            .into_iter()
            .flatten()
            .find_map(|r| Some((r.clone(), glob::Pattern::new(&r).err()?)))
        {
            // The tunnel matches a glob as it reads a path too (see tunnel::path_forms).
            d.error(
                &p.span,
                format!(
                    "bad path glob `{}`: read as an upstream may read a path (`%2f` as `/`, `;parameters` dropped) it is `{read}`, which is no glob: {}; leave `/` and `;` out of `[...]`",
                    p.value, e.msg
                ),
            );
            ok = false;
        }
    }
    let paths: Vec<String> = paths.iter().map(|p| p.value.to_owned()).collect();
    let credential = match t.string(d, "credential") {
        None => {
            ok &= t.get("credential").is_none();
            None
        }
        Some(c) => {
            used_credentials.push(c.value.to_owned());
            if credential_names.iter().any(|(n, _)| n == c.value) {
                Some(c.value.to_owned())
            } else {
                let names: Vec<&str> = credential_names.iter().map(|(n, _)| n.as_str()).collect();
                let hint = match lint::did_you_mean(c.value, &names) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("define it under [credentials.{}]", c.value),
                };
                d.error(&c.span, format!("unknown credential `{}`: {hint}", c.value));
                ok = false;
                None
            }
        }
    };
    let private = t.boolean(d, "private");
    let passthrough = t.boolean(d, "passthrough");
    let plain_http = t.boolean(d, "plain_http");
    match (t.entry("plain_http"), &credential, plain_http) {
        (Some((k, _)), None, Some(true)) => d.warning(
            &k.span,
            "plain_http only lets a credential go over plain HTTP, and this rule names none",
        ),
        (None, Some(_), _) if port == 80 => d.warning(
            &t.entry("credential").map_or(0..0, |(k, _)| k.span.clone()),
            "the credential is attached over HTTPS only, so plain HTTP requests to port 80 are refused (credential-over-plain-http): set `plain_http = true` if this upstream speaks nothing else (the credential then crosses the network unencrypted)",
        ),
        _ => {}
    }
    let connect = match t.string(d, "connect") {
        None => {
            ok &= t.get("connect").is_none();
            None
        }
        Some(c) => match c.value.parse::<SocketAddr>() {
            Ok(a) => {
                if private != Some(true) && crate::tunnel::private::is_private(a.ip()) {
                    d.warning(
                        &c.span,
                        format!(
                            "connect `{}` is not a public address: it is dialled as written, since the private-address check (`private = true`) applies only to names the tunnel resolves; say `private = true` to make that explicit",
                            c.value
                        ),
                    );
                }
                Some(a)
            }
            Err(_) => {
                d.error(
                    &c.span,
                    format!("bad connect `{}`: expected IP:PORT", c.value),
                );
                ok = false;
                None
            }
        },
    };
    if passthrough == Some(true) {
        let said = |key: &str| t.entry(key).map(|(k, _)| k.span.clone());
        if let Some(span) = said("credential") {
            d.warning(
                &span,
                "a passthrough rule splices TLS unread, so its credential is never attached to HTTPS requests",
            );
        }
        for key in ["methods", "paths"] {
            if let Some(span) = said(key) {
                d.warning(
                    &span,
                    format!(
                        "a passthrough rule splices TLS unread, so `{key}` is not checked for HTTPS requests"
                    ),
                );
            }
        }
    }
    if !ok {
        return None;
    }
    Some(HttpRule {
        host: host?,
        port,
        methods,
        paths,
        credential,
        private: private?,
        connect,
        passthrough: passthrough?,
        plain_http: plain_http?,
    })
}

/// Duplicates (errors) and rules an earlier one shadows (warnings), among the rules that
/// are valid; then, when all are, the tunnel's own compiler, which must accept them.
/// `rules` are the valid rules, `at` where each is.
fn http_lints(d: &mut Diag<'_>, rules: &[HttpRule], at: &[Place], all_valid: bool) {
    let specs: Vec<&HttpRule> = rules.iter().collect();
    for (b, found) in at.iter().zip(lint::conflicts(&specs)) {
        let Some((position, conflict)) = found else {
            continue;
        };
        let a = &at[position];
        let (i, j, l) = (b.index, a.index, d.line_of(&a.span));
        let (severity, message) = match conflict {
            lint::Conflict::Duplicate => (
                Severity::Error,
                format!(
                    "duplicate rule: rule {i} matches exactly the requests rule {j} (line {l}) matches, and the first match wins; remove one"
                ),
            ),
            lint::Conflict::Shadowed => (
                Severity::Warning,
                format!(
                    "rule {i} can never match: rule {j} (line {l}) comes first and matches every request it would"
                ),
            ),
            lint::Conflict::SplicedBefore => (
                Severity::Warning,
                format!(
                    "rule {i} never sees an HTTPS request: passthrough rule {j} (line {l}) comes first and splices every TLS connection to its host and port"
                ),
            ),
            lint::Conflict::InterceptedBefore => (
                Severity::Warning,
                format!(
                    "`passthrough` of rule {i} never takes effect: rule {j} (line {l}) comes first for this host and port, so HTTPS to it is intercepted"
                ),
            ),
        };
        d.push(&b.span, severity, message);
    }
    spliced_beside_credential(d, rules, at);
    if !all_valid {
        return;
    }
    if let Err(e) = crate::tunnel::rules::Rules::new(rules) {
        let at = at.first().map_or(0..0, |n| n.span.clone());
        d.error(&at, format!("the tunnel cannot compile these rules: {e}"));
    }
}

/// A warning for a passthrough rule that reaches an upstream a credential is sent to (the
/// same host, a wildcard over it, or the same `connect`): its answers are spliced unread, so
/// a secret that upstream stores or echoes would reach the sandbox unseen through it.
fn spliced_beside_credential(d: &mut Diag<'_>, rules: &[HttpRule], at: &[Place]) {
    let covers = |wide: &str, host: &str| {
        wide.eq_ignore_ascii_case(host)
            || wide.strip_prefix("*.").is_some_and(|base| {
                let base = format!(".{}", base.to_ascii_lowercase());
                host.to_ascii_lowercase().ends_with(&base)
            })
    };
    for (p, spliced) in rules.iter().enumerate().filter(|(_, r)| r.passthrough) {
        let shared = rules.iter().enumerate().find(|(_, c)| {
            !c.passthrough
                && c.credential.is_some()
                && (covers(&spliced.host, &c.host)
                    || covers(&c.host, &spliced.host)
                    || spliced.connect.is_some() && spliced.connect == c.connect)
        });
        let (Some((c, credentialed)), Some(place)) = (shared, at.get(p)) else {
            continue;
        };
        let Some(other) = at.get(c) else {
            continue;
        };
        let (i, j, l) = (place.index, other.index, d.line_of(&other.span));
        let name = credentialed.credential.as_deref().unwrap_or_default();
        d.push(
            &place.span,
            Severity::Warning,
            format!(
                "passthrough rule {i} splices TLS unread to an upstream rule {j} (line {l}) sends credential `{name}` to: an answer through rule {i} is not checked for the secret, so one that upstream stores or echoes would reach the sandbox; intercept this host instead"
            ),
        );
    }
}

/// Why a credential cannot be sent in header `name`: the tunnel removes it on the way (the
/// secret would never arrive), it frames or routes the request, or the tunnel refuses it
/// from the sandbox and so would refuse what it sets itself.
fn unusable_credential_header(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        hop if crate::tunnel::headers::is_hop_by_hop_name(hop) => {
            Some("the tunnel removes it as hop-by-hop")
        }
        "host" | "content-length" | "content-type" | "content-encoding" | "expect" => {
            Some("it describes the request itself")
        }
        "x-original-url"
        | "x-rewrite-url"
        | "x-http-method-override"
        | "x-http-method"
        | "x-method-override"
        | "x-original-method" => Some("frameworks read it as the request's path or method"),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

/// Whether a `[...]` class in `glob` may match `%`: negated, or naming `%` or a range over
/// it. Such a class matches an escape, whatever it decodes to.
fn class_matches_escapes(glob: &str) -> bool {
    let bytes = glob.as_bytes();
    let mut i = 0;
    while let Some(open) = bytes[i..].iter().position(|&b| b == b'[').map(|p| p + i) {
        let mut j = open + 1;
        if matches!(bytes.get(j), Some(b'!' | b'^')) {
            return true;
        }
        // A `]` right after the opening is a member, not the end.
        if bytes.get(j) == Some(&b']') {
            j += 1;
        }
        let Some(close) = bytes[j..].iter().position(|&b| b == b']').map(|p| p + j) else {
            return false;
        };
        let members = &bytes[open + 1..close];
        let mut k = 0;
        while k < members.len() {
            if members.get(k + 1) == Some(&b'-') && k + 2 < members.len() {
                if (members[k]..=members[k + 2]).contains(&b'%') {
                    return true;
                }
                k += 3;
            } else {
                if members[k] == b'%' {
                    return true;
                }
                k += 1;
            }
        }
        i = close + 1;
    }
    false
}
