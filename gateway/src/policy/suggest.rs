//! `gateway policy suggest`: a policy that would have allowed exactly what an audit log saw
//! (learn mode's `would-deny` records, `allow` records, and the kernel's refusals of TCP and
//! UDP), written for a person to review, never to be trusted as it comes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use glob::Pattern;

use super::{DEFAULT_LISTEN, Protocol};
use crate::audit::RecordView;

/// Up to this many distinct paths under one first segment are listed as they are; more
/// become the deepest directory they share followed by `/**`.
const EXACT_PATHS: usize = 4;

/// The `name` when the records name no sandbox.
const FALLBACK_NAME: &str = "suggested";

/// What the log showed the sandbox reaching, or trying to reach.
#[derive(Debug, Default)]
pub struct Seen {
    sandboxes: BTreeSet<String>,
    http: BTreeMap<(String, u16), HostSeen>,
    /// The kernel's refusals: ports by address and protocol.
    network: BTreeMap<(IpAddr, Protocol), BTreeSet<u16>>,
    /// Records that went into the suggestion.
    used: usize,
}

/// Requests to one host and port.
#[derive(Debug, Default)]
struct HostSeen {
    methods: BTreeSet<String>,
    /// Without the query: rules never see it.
    paths: BTreeSet<String>,
    /// Learn mode reached it at a private address.
    private: bool,
    /// A passthrough rule spliced it.
    passthrough: bool,
    records: usize,
}

impl Seen {
    /// Takes one record into account; records that show nothing a rule could allow (other
    /// refusals, notes) are left out.
    pub fn add(&mut self, r: &RecordView) {
        let used = match r.layer.as_str() {
            "proxy" => self.add_proxy(r),
            "kernel" => self.add_kernel(r),
            _ => false,
        };
        if used {
            self.used += 1;
            if let Some(s) = &r.sandbox {
                self.sandboxes.insert(s.clone());
            }
        }
    }

    fn add_proxy(&mut self, r: &RecordView) -> bool {
        let (private, passthrough) = match (r.verdict.as_str(), r.reason.as_deref()) {
            ("would-deny", Some("not-allowlisted")) | ("allow", Some("allowlisted")) => {
                (false, false)
            }
            ("would-deny", Some("private-address")) => (true, false),
            ("allow", Some("passthrough")) => (false, true),
            _ => return false,
        };
        let (Some(host), Some(port)) = (&r.host, r.port) else {
            return false;
        };
        let request = match (&r.method, &r.path) {
            // `OPTIONS *` and the like: no path a glob could name.
            (Some(m), Some(p)) if p.starts_with('/') => {
                Some((m.clone(), p.split('?').next().unwrap_or(p).to_owned()))
            }
            _ if passthrough => None,
            _ => return false,
        };
        let seen = self.http.entry((host.clone(), port)).or_default();
        seen.records += 1;
        seen.private |= private;
        seen.passthrough |= passthrough;
        if let Some((method, path)) = request.filter(|_| !passthrough) {
            seen.methods.insert(method);
            seen.paths.insert(path);
        }
        true
    }

    fn add_kernel(&mut self, r: &RecordView) -> bool {
        let hook_ok = matches!(
            r.hook.as_deref(),
            Some("connect4" | "connect6" | "sendmsg4" | "sendmsg6")
        );
        if r.verdict != "deny" || r.reason.as_deref() != Some("not-allowlisted") || !hook_ok {
            return false;
        }
        let protocol = match r.proto.as_deref() {
            Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            _ => return false,
        };
        let Some(dst) = r.dst.as_deref().and_then(|d| d.parse::<SocketAddr>().ok()) else {
            return false;
        };
        // The kernel judges an IPv4-mapped address as the IPv4 address it is.
        let ip = dst.ip().to_canonical();
        self.network
            .entry((ip, protocol))
            .or_default()
            .insert(dst.port());
        true
    }

    /// The sandboxes whose records went into the suggestion.
    pub fn sandboxes(&self) -> &BTreeSet<String> {
        &self.sandboxes
    }

    /// The policy file, starting with the comments a reviewer needs.
    pub fn render(&self, source: &Path, name: &str) -> String {
        let mut out = header(source, name, self.used);
        let _ = writeln!(out, "version = 1\nname = {}\n", quote(name));
        let _ = writeln!(out, "[tunnel]\nlisten = {}", quote(DEFAULT_LISTEN));
        for ((host, port), seen) in &self.http {
            out.push('\n');
            out.push_str(&http_rule(host, *port, seen));
        }
        for ((ip, protocol), ports) in &self.network {
            out.push('\n');
            out.push_str(&network_rule(*ip, *protocol, ports));
        }
        out
    }
}

fn header(source: &Path, name: &str, used: usize) -> String {
    format!(
        "\
# Generated by `gateway policy suggest` from the audit log {source} (sandbox {name}, {used}
# records). REVIEW IT BEFORE USE: it allows exactly what was seen, which may include requests
# the agent should never make.
#
# Credentials are left to you: no rule attaches one. Where a host needs one, define it
# under [credentials.NAME] and uncomment that rule's `credential` line.
#
# Paths: per host, the paths that share a first segment are listed as they were requested
# when there are at most {EXACT_PATHS} of them; more become the deepest directory they all share
# followed by `/**` (any path below it). The query string is never part of the path a rule
# sees. One rule per host and port allows each listed method on each listed path.
# `private = true` marks a host whose name resolved to a private address. Each
# [[network.allow]] is one address, port and protocol the kernel refused.

",
        source = source.display(),
        name = quote(name),
    )
}

fn http_rule(host: &str, port: u16, seen: &HostSeen) -> String {
    let mut out = format!(
        "# {} {} seen\n[[http.allow]]\nhost = {}\nport = {port}\n",
        seen.records,
        if seen.records == 1 {
            "record"
        } else {
            "records"
        },
        quote(host)
    );
    if !seen.methods.is_empty() {
        let _ = writeln!(out, "methods = {}", list(seen.methods.iter()));
    }
    let globs = path_globs(&seen.paths);
    if !globs.is_empty() {
        let _ = writeln!(out, "paths = {}", list(globs.iter()));
    }
    if seen.private {
        out.push_str("private = true\n");
    }
    if seen.passthrough {
        out.push_str("passthrough = true\n");
    }
    out.push_str("# credential = \"...\"\n");
    out
}

fn network_rule(ip: IpAddr, protocol: Protocol, ports: &BTreeSet<u16>) -> String {
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let protocol = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    format!(
        "[[network.allow]]\ncidr = \"{ip}/{bits}\"\nports = [{}]\nprotocol = \"{protocol}\"\n",
        ports.join(", ")
    )
}

/// The `paths` globs for the paths one host was asked for, as the header describes.
fn path_globs(paths: &BTreeSet<String>) -> Vec<String> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in paths {
        groups.entry(first_segment(p)).or_default().push(p);
    }
    let mut globs = BTreeSet::new();
    for group in groups.values() {
        if group.len() <= EXACT_PATHS {
            globs.extend(group.iter().map(|p| Pattern::escape(p)));
            continue;
        }
        let dir = common_dir(group);
        globs.insert(format!("{}/**", Pattern::escape(&dir)));
        // `DIR/**` matches what is below DIR, not DIR itself.
        if group.contains(&dir.as_str()) {
            globs.insert(Pattern::escape(&dir));
        }
    }
    globs.into_iter().collect()
}

fn first_segment(path: &str) -> &str {
    let rest = path.trim_start_matches('/');
    rest.split('/').next().unwrap_or(rest)
}

/// The longest run of whole leading segments all `paths` share, as `/a/b`. Paths of one
/// group share their first segment, so it is never the root.
fn common_dir(paths: &[&str]) -> String {
    let split = |p: &'_ str| -> Vec<String> {
        p.trim_start_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect()
    };
    let mut common = paths.first().map(|p| split(p)).unwrap_or_default();
    for p in paths {
        let segments = split(p);
        let shared = common
            .iter()
            .zip(&segments)
            .take_while(|(a, b)| a == b)
            .count();
        common.truncate(shared);
    }
    format!("/{}", common.join("/"))
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let quoted: Vec<String> = items.map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// `gateway policy suggest --from LOG [--sandbox NAME] [-o FILE]`; returns the exit code.
pub fn run(from: &Path, sandbox: Option<&str>, output: Option<&Path>) -> anyhow::Result<i32> {
    let mut seen = Seen::default();
    crate::audit::cli::scan(from, sandbox, |r| {
        seen.add(r);
        Ok(())
    })?;
    let name = match (sandbox, seen.sandboxes().len()) {
        (Some(name), _) => name.to_owned(),
        (None, 0) => FALLBACK_NAME.to_owned(),
        (None, 1) => seen.sandboxes().iter().next().cloned().unwrap_or_default(),
        (None, _) => {
            let names: Vec<&str> = seen.sandboxes().iter().map(String::as_str).collect();
            eprintln!(
                "gateway policy suggest: {} holds records of several sandboxes ({}): pick one with --sandbox NAME",
                from.display(),
                names.join(", ")
            );
            return Ok(2);
        }
    };
    if seen.used == 0 {
        eprintln!(
            "gateway policy suggest: no request or refused connection to learn from in {}; the suggestion allows nothing",
            from.display()
        );
    }
    let text = seen.render(from, &name);
    // Never hand out a policy `run` would refuse.
    super::file::check_text(output.unwrap_or(Path::new("<suggested policy>")), &text).map_err(
        |e| anyhow::anyhow!("the suggested policy is not valid, please report this:\n{e}"),
    )?;
    match output {
        Some(path) => std::fs::write(path, &text)
            .with_context(|| format!("writing the suggested policy to {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(0)
}

#[cfg(test)]
mod tests;
