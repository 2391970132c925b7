//! `gateway policy explain`: what the tunnel would decide for one request, without any network.
//! Every step is the tunnel's own code (its rules, authority parsing, path and private-address
//! checks), taken in the tunnel's order, so the two cannot disagree.

use std::fmt;

use hyper::{Method, Uri};

use super::Checked;
use crate::tunnel::{
    CREDENTIAL_OVER_PLAIN_HTTP, authority::Authority, headers, private::is_private, rules::Rules,
};

/// What the tunnel would do with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        /// The rule's index, as audit records give it (0 is the first `[[http.allow]]`).
        rule: usize,
        line: usize,
        credential: Option<String>,
        /// HTTPS through a passthrough rule: spliced, method and path never seen.
        passthrough: bool,
    },
    Deny {
        /// Why, for people.
        why: String,
        /// The audit record's `reason`.
        reason: &'static str,
    },
}

/// A decision with the file it was made from, printable as one line.
pub struct Explanation<'a> {
    pub checked: &'a Checked,
    pub decision: Decision,
}

impl fmt::Display for Explanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.decision {
            Decision::Allow {
                rule,
                line,
                credential,
                passthrough,
            } => {
                write!(
                    f,
                    "allow: rule {rule} ({}:{line}), ",
                    self.checked.file.display()
                )?;
                if *passthrough {
                    f.write_str(
                        "passthrough: TLS is spliced unread, method and path are not checked, no credential is attached",
                    )
                } else {
                    match credential {
                        Some(c) => write!(f, "credential {c}"),
                        None => f.write_str("no credential"),
                    }
                }
            }
            Decision::Deny { why, reason } => write!(f, "deny: {why} ({reason})"),
        }
    }
}

/// Decides `METHOD URL` under the checked policy. `Err` is a usage error (bad method or URL).
/// An `https` URL is decided the way clients send it through a proxy: a CONNECT to its host
/// and port, then the request inside the intercepted session.
pub fn explain(checked: &Checked, method: &str, url: &str) -> Result<Decision, String> {
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| format!("bad method `{method}`: expected an HTTP method such as GET"))?;
    let bad_url = || {
        format!(
            "bad URL `{url}`: expected an absolute http:// or https:// URL, like https://api.example.com/path"
        )
    };
    let uri: Uri = url.parse().map_err(|_| bad_url())?;
    let (scheme, default_port) = match uri.scheme_str() {
        Some("http") => ("http", 80),
        Some("https") => ("https", 443),
        _ => return Err(bad_url()),
    };
    let authority = uri.authority().ok_or_else(bad_url)?;
    let rules = Rules::new(&checked.policy.http).map_err(|e| e.to_string())?;
    let line = |index: usize| checked.http_lines.get(index).copied().unwrap_or(0);
    let deny = |why: String, reason| Ok(Decision::Deny { why, reason });
    if authority.as_str().contains('@') {
        return deny("the URL carries a user name".into(), "userinfo-in-uri");
    }
    let Some(target) = Authority::parse(authority.as_str(), default_port) else {
        return deny(
            format!("`{}` is not a valid host", authority.as_str()),
            "bad-host",
        );
    };
    let path = uri.path();
    let request = format!("{method} {url}");
    if scheme == "http" && target.port == 443 {
        return deny(
            "plain HTTP to port 443, where a rule means HTTPS".into(),
            "http-to-port-443",
        );
    }

    if scheme == "https" || method == Method::CONNECT {
        // The CONNECT: the first rule for the host and port, whatever the method and path.
        let Some(rule) = rules.for_authority(&target) else {
            return deny(format!("no rule matches {request}"), "not-allowlisted");
        };
        if method == Method::CONNECT || rule.spec.passthrough {
            if let Some(d) = private_refusal(rule, &target, &line) {
                return Ok(d);
            }
            return Ok(Decision::Allow {
                rule: rule.index,
                line: line(rule.index),
                credential: rule.spec.credential.clone(),
                passthrough: rule.spec.passthrough,
            });
        }
    }
    if let Some(reason) = headers::path_ambiguity(path) {
        return deny(
            format!("the path `{path}` could reach another resource upstream"),
            reason,
        );
    }
    if let Some(reason) = headers::override_parameter(&method, uri.query()) {
        return deny(
            "the query names another method (`_method`), which frameworks would serve".into(),
            reason,
        );
    }
    if method == Method::TRACE {
        return deny(
            "the tunnel refuses TRACE whatever the rules say".into(),
            "trace-refused",
        );
    }
    let Some(rule) = rules.decide(&method, &target, path) else {
        return deny(format!("no rule matches {request}"), "not-allowlisted");
    };
    if scheme == "http" && rule.spec.credential_needs_tls() {
        return deny(
            format!(
                "rule {} (line {}) matches, but its credential goes over HTTPS only and the rule does not say plain_http = true",
                rule.index,
                line(rule.index)
            ),
            CREDENTIAL_OVER_PLAIN_HTTP,
        );
    }
    if let Some(d) = private_refusal(rule, &target, &line) {
        return Ok(d);
    }
    Ok(Decision::Allow {
        rule: rule.index,
        line: line(rule.index),
        credential: rule.spec.credential.clone(),
        passthrough: false,
    })
}

/// An address written in the URL is what the tunnel would dial (unless the rule says
/// `connect`): a private one is refused at dial time without `private = true`. Names are
/// not resolved here.
fn private_refusal(
    rule: &crate::tunnel::rules::Rule,
    target: &Authority,
    line: &dyn Fn(usize) -> usize,
) -> Option<Decision> {
    let ip = target.ip()?;
    (rule.spec.connect.is_none() && !rule.spec.private && is_private(ip)).then(|| {
        Decision::Deny {
            why: format!(
                "rule {} (line {}) matches, but {ip} is a private address and the rule does not say private = true",
                rule.index,
                line(rule.index)
            ),
            reason: "private-address",
        }
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::file::check_text;

    const POLICY: &str = r#"version = 1
[[http.allow]]
host = "api.github.com"
methods = ["GET"]
paths = ["/repos/**"]
credential = "gh"

[[http.allow]]
host = "splice.test"
passthrough = true

[[http.allow]]
host = "10.0.0.1"
port = 80

[[http.allow]]
host = "plain.test"
port = 8080
credential = "gh"

[[http.allow]]
host = "opted.test"
port = 8080
credential = "gh"
plain_http = true

[credentials.gh]
env = "GITHUB_TOKEN"
"#;

    fn decide(method: &str, url: &str) -> Result<String, String> {
        let checked = check_text(Path::new("p.toml"), POLICY).unwrap();
        explain(&checked, method, url).map(|d| {
            Explanation {
                checked: &checked,
                decision: d,
            }
            .to_string()
        })
    }

    #[test]
    fn allow_names_rule_line_and_credential() {
        assert_eq!(
            decide("GET", "https://api.github.com/repos/acme/x?page=2").unwrap(),
            "allow: rule 0 (p.toml:2), credential gh"
        );
        assert_eq!(
            decide("GET", "https://API.GitHub.com./repos/a").unwrap(),
            "allow: rule 0 (p.toml:2), credential gh"
        );
    }

    #[test]
    fn deny_names_the_reason() {
        assert_eq!(
            decide("POST", "https://api.github.com/repos/acme/x").unwrap(),
            "deny: no rule matches POST https://api.github.com/repos/acme/x (not-allowlisted)"
        );
        assert!(
            decide("GET", "https://example.com/")
                .unwrap()
                .ends_with("(not-allowlisted)")
        );
        assert!(
            decide("GET", "https://api.github.com/repos/../user")
                .unwrap()
                .ends_with("(dot-segment-in-path)")
        );
        assert!(
            decide("TRACE", "https://api.github.com/repos/x")
                .unwrap()
                .ends_with("(trace-refused)")
        );
        assert!(
            decide("GET", "http://10.0.0.1/")
                .unwrap()
                .ends_with("(private-address)")
        );
        assert!(
            decide("GET", "http://api.github.com:443/repos/x")
                .unwrap()
                .ends_with("(http-to-port-443)")
        );
        assert_eq!(
            decide("GET", "http://plain.test:8080/x").unwrap(),
            "deny: rule 3 (line 16) matches, but its credential goes over HTTPS only and the rule does not say plain_http = true (credential-over-plain-http)"
        );
        assert_eq!(
            decide("GET", "http://opted.test:8080/x").unwrap(),
            "allow: rule 4 (p.toml:21), credential gh"
        );
        assert_eq!(
            decide("GET", "https://plain.test:8080/x").unwrap(),
            "allow: rule 3 (p.toml:16), credential gh"
        );
    }

    #[test]
    fn paths_are_matched_as_the_tunnel_reads_them() {
        // `/repos/**` spans segments however they are written; a single `*` would not.
        assert_eq!(
            decide("GET", "https://api.github.com/repos/a%2Fb").unwrap(),
            "allow: rule 0 (p.toml:2), credential gh"
        );
        let checked = check_text(
            Path::new("p.toml"),
            "version = 1\n[[http.allow]]\nhost = \"h.test\"\npaths = [\"/v1/*\", \"/f/*.json\"]\n",
        )
        .unwrap();
        let reason = |url: &str| match explain(&checked, "GET", url).unwrap() {
            Decision::Deny { reason, .. } => reason,
            Decision::Allow { .. } => "allow",
        };
        assert_eq!(reason("https://h.test/v1/admin"), "allow");
        assert_eq!(
            reason("https://h.test/v1/admin%2Fdelete_all"),
            "not-allowlisted"
        );
        assert_eq!(reason("https://h.test/f/secret;.json"), "not-allowlisted");
        assert_eq!(
            reason("https://h.test/v1/%25252e%25252e"),
            "encoded-path-separator"
        );
        assert_eq!(reason("https://h.test/v1/..%3b"), "dot-segment-in-path");
        assert_eq!(reason("https://h.test/v1/%c0%ae"), "encoded-path-separator");
        // nginx merges `//`: `/v1//x` is `/v1/x` there; `/v1/*` cannot match it as sent.
        assert_eq!(reason("https://h.test/v1//x"), "not-allowlisted");
        assert_eq!(reason("https://h.test/v1/%u002e"), "unicode-escape");
        assert_eq!(
            reason("https://h.test/v1/a%ef%bc%8fb"),
            "lookalike-path-separator"
        );
        assert_eq!(
            reason("https://h.test/v1/x?_method=DELETE"),
            "override-parameter"
        );
    }

    #[test]
    fn passthrough_is_decided_by_host_alone() {
        assert!(
            decide("DELETE", "https://splice.test/anything")
                .unwrap()
                .starts_with("allow: rule 1 (p.toml:8), passthrough")
        );
    }

    #[test]
    fn usage_errors() {
        assert!(decide("GET", "api.github.com/repos").is_err());
        assert!(decide("GET", "ftp://api.github.com/").is_err());
        assert!(decide("G ET", "https://api.github.com/").is_err());
    }
}
