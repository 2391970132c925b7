//! One canonical form for the host a request names, so rules match what will be dialled:
//! lower case, no trailing dot, IDNA, no userinfo, numeric IPv4 forms normalised.

use std::{fmt, net::IpAddr};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Authority {
    /// A lower-case ASCII domain or the textual form of an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl Authority {
    /// Parses `host[:port]` as found in a URI, a CONNECT target or a Host header.
    pub fn parse(text: &str, default_port: u16) -> Option<Self> {
        // Byte loops here and below: the text is short, and `str` searches cost more to set
        // up than to run on it (this runs on every request).
        if text.is_empty() || has_byte(text, b'@') {
            return None;
        }
        let (host, port) = split_port(text)?;
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
            None => default_port,
        };
        Some(Self {
            host: canonical_host(host)?,
            port,
        })
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// Whether `text` (a URI's authority) is exactly this authority's [`Display`] form, so
    /// that it can be sent as it is; compared without formatting one.
    ///
    /// [`Display`]: fmt::Display
    pub fn is_written_as(&self, text: &str) -> bool {
        let Some((host, port)) = text.rsplit_once(':') else {
            return false;
        };
        let host = if self.is_ipv6() {
            host.strip_prefix('[').and_then(|h| h.strip_suffix(']'))
        } else {
            Some(host)
        };
        host == Some(self.host.as_str())
            && port.bytes().all(|b| b.is_ascii_digit())
            && !(port.len() > 1 && port.starts_with('0'))
            && port.parse() == Ok(self.port)
    }

    /// A canonical host has a colon only when it is an IPv6 address.
    fn is_ipv6(&self) -> bool {
        self.host.contains(':')
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ipv6() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn split_port(text: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            p => Some((host, Some(p.strip_prefix(':')?))),
        };
    }
    let colon = |b: &u8| *b == b':';
    match (
        text.bytes().position(|b| colon(&b)),
        text.bytes().rposition(|b| colon(&b)),
    ) {
        (Some(first), Some(last)) if first == last => {
            Some((&text[..last], Some(&text[last + 1..])))
        }
        (Some(_), _) => None,
        (None, _) => Some((text, None)),
    }
}

/// Whether `text` holds `byte`.
pub(super) fn has_byte(text: &str, byte: u8) -> bool {
    text.bytes().any(|b| b == byte)
}

/// The longest host name DNS can carry (RFC 1035), in its usual text form.
const MAX_NAME: usize = 253;

/// The canonical host, or `None` when it is not a valid host name or address.
pub fn canonical_host(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    // Longer is no name at all, and would cost every `*.` rule lookup its square.
    if host.is_empty() || host.ends_with('.') || host.len() > MAX_NAME {
        return None;
    }
    if is_plain_name(host) {
        return Some(host.to_owned());
    }
    // Plain dotted-decimal, already in its canonical spelling: std takes exactly four
    // decimal octets without leading zeros, so no octal or other spelling gets here.
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some(host.to_owned());
    }
    if let Ok(v6) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::Ipv6Addr>()
    {
        return Some(canonical_ip(IpAddr::V6(v6)));
    }
    // The WHATWG host parser applies IDNA and reads every IPv4 spelling (0x7f.1, 2130706433).
    match url::Host::parse(host).ok()? {
        url::Host::Domain(d) if d.len() > MAX_NAME => None,
        url::Host::Domain(d) => d
            .split('.')
            .all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            .then_some(d),
        url::Host::Ipv4(ip) => Some(ip.to_string()),
        url::Host::Ipv6(ip) => Some(canonical_ip(IpAddr::V6(ip))),
    }
}

/// Already canonical: lower-case LDH labels, none empty or punycode, and a last label that
/// is not a number (so no IPv4 spelling hides in it). Most requests take this path.
fn is_plain_name(host: &str) -> bool {
    let mut labels = host.split('.');
    let last = &host[host
        .bytes()
        .rposition(|b| b == b'.')
        .map_or(0, |dot| dot + 1)..];
    let last_is_alpha = last.bytes().any(|b| b.is_ascii_lowercase()) && !last.starts_with("0x");
    last_is_alpha
        && labels.all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with("xn--")
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// IPv4-mapped IPv6 is written as the IPv4 address it is.
fn canonical_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        let a = |t| Authority::parse(t, 443).map(|a| a.to_string());
        assert_eq!(a("API.GitHub.com"), Some("api.github.com:443".into()));
        assert_eq!(
            a("api.github.com.:8443"),
            Some("api.github.com:8443".into())
        );
        assert_eq!(a("0x7f.1:80"), Some("127.0.0.1:80".into()));
        assert_eq!(a("2130706433"), Some("127.0.0.1:443".into()));
        assert_eq!(a("[::FFFF:127.0.0.1]:80"), Some("127.0.0.1:80".into()));
        assert_eq!(a("[::1]"), Some("[::1]:443".into()));
        assert_eq!(
            a("bücher.example"),
            Some("xn--bcher-kva.example:443".into())
        );
        assert_eq!(a("user@host"), None);
        assert_eq!(a("host:0"), None);
        assert_eq!(a("host:99999"), None);
        assert_eq!(a("a..b"), None);
        assert_eq!(a("0x7f.0x1"), Some("127.0.0.1:443".into()));
        assert_eq!(
            a("xn--bcher-kva.example"),
            Some("xn--bcher-kva.example:443".into())
        );
        assert_eq!(a("a.b-c_d.example"), Some("a.b-c_d.example:443".into()));
        assert_eq!(a(""), None);
        // One colon outside brackets, before the port.
        assert_eq!(a("host:80"), Some("host:80".into()));
        assert_eq!(a("host:"), None);
        assert_eq!(a("::1"), None);
        assert_eq!(a("a:b:80"), None);
        assert_eq!(a("[::1]:"), None);
        assert_eq!(a("10.0.0.1:80"), Some("10.0.0.1:80".into()));
        assert_eq!(a("010.0.0.1"), Some("8.0.0.1:443".into()));
        assert_eq!(a("127.0.0.01"), Some("127.0.0.1:443".into()));
        // 253 characters at most, as DNS carries them; IDNA may lengthen a name past that.
        let longest = format!("{}tests", "a.".repeat(124));
        assert_eq!(longest.len(), 253);
        assert!(canonical_host(&longest).is_some());
        assert!(canonical_host(&format!("{longest}.")).is_some());
        assert_eq!(canonical_host(&format!("a{longest}")), None);
        // 120 labels of 2 bytes each, 7 in punycode.
        let wide = format!("{}.test", ["ü"; 120].join("."));
        assert!(wide.len() < 253 * 2);
        assert_eq!(canonical_host(&wide), None);
    }

    #[test]
    fn written_as_its_display_form_only() {
        for (text, port) in [
            ("api.github.com", 443),
            ("127.0.0.1", 8080),
            ("[::1]", 443),
            ("[2001:db8::1]", 80),
        ] {
            let a = Authority::parse(text, port).unwrap();
            assert!(a.is_written_as(&a.to_string()), "{a}");
            for other in [
                text.to_owned(),
                format!("{text}:0{port}"),
                format!("{text}:+{port}"),
                format!("{text}:{}", port + 1),
                format!("x{text}:{port}"),
            ] {
                assert!(!a.is_written_as(&other), "{a} as {other}");
            }
            if text.starts_with('[') {
                let bare = format!("{}:{port}", text.trim_matches(['[', ']']));
                assert!(!a.is_written_as(&bare), "{a} as {bare}");
            }
        }
    }
}
