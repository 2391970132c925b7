//! `[[http.allow]]` matching: default deny, the first rule that matches wins.

use glob::{MatchOptions, Pattern};
use hyper::Method;

use super::authority::{Authority, canonical_host};
use crate::policy::HttpRule;

/// A rule prepared for matching: host canonical, methods upper case, globs compiled.
pub struct Rule {
    pub index: usize,
    pub spec: HttpRule,
    host: HostPattern,
    methods: Vec<String>,
    paths: Vec<Pattern>,
}

enum HostPattern {
    Exact(String),
    /// `*.example.com`: any name below example.com, at any depth, not example.com itself.
    Below(String),
}

pub struct Rules(Vec<Rule>);

pub(crate) const GLOB: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl Rules {
    /// Compiles the policy's rules; `policy::load` has already validated them.
    pub fn new(rules: &[HttpRule]) -> anyhow::Result<Self> {
        let mut out = Vec::with_capacity(rules.len());
        for (index, spec) in rules.iter().enumerate() {
            let host = match spec.host.strip_prefix("*.") {
                Some(base) => HostPattern::Below(canonical(base)?),
                None => HostPattern::Exact(canonical(&spec.host)?),
            };
            let paths = spec
                .paths
                .iter()
                .map(|p| Pattern::new(p))
                .collect::<Result<_, _>>()?;
            out.push(Rule {
                index,
                host,
                methods: spec
                    .methods
                    .iter()
                    .map(|m| m.to_ascii_uppercase())
                    .collect(),
                paths,
                spec: spec.clone(),
            });
        }
        Ok(Self(out))
    }

    /// The first rule allowing this request. `path` excludes the query.
    pub fn decide(&self, method: &Method, target: &Authority, path: &str) -> Option<&Rule> {
        self.0.iter().find(|r| {
            r.matches_authority(target)
                && (r.methods.is_empty() || r.methods.iter().any(|m| m == method.as_str()))
                && (r.paths.is_empty() || r.paths.iter().any(|p| p.matches_with(path, GLOB)))
        })
    }

    /// The first rule for this host and port, whatever the method and path: decides whether a
    /// CONNECT is intercepted, spliced or refused.
    pub fn for_authority(&self, target: &Authority) -> Option<&Rule> {
        self.0.iter().find(|r| r.matches_authority(target))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.0.iter()
    }
}

impl Rule {
    fn matches_authority(&self, target: &Authority) -> bool {
        self.spec.port == target.port
            && match &self.host {
                HostPattern::Exact(h) => *h == target.host,
                HostPattern::Below(base) => target
                    .host
                    .strip_suffix(base.as_str())
                    .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.')),
            }
    }
}

fn canonical(host: &str) -> anyhow::Result<String> {
    canonical_host(host).ok_or_else(|| anyhow::anyhow!("rule host `{host}` is not a valid name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, methods: &[&str], paths: &[&str]) -> HttpRule {
        HttpRule::for_test(host, methods, paths)
    }

    fn at(host: &str) -> Authority {
        Authority::parse(host, 443).unwrap()
    }

    #[test]
    fn first_match_wins_and_default_denies() {
        let rules = Rules::new(&[
            rule("api.github.com", &["GET"], &["/repos/acme/**"]),
            rule("*.github.com", &["get", "POST"], &[]),
        ])
        .unwrap();
        let hit = |m: &str, h: &str, p: &str| {
            rules
                .decide(&Method::from_bytes(m.as_bytes()).unwrap(), &at(h), p)
                .map(|r| r.index)
        };
        assert_eq!(hit("GET", "api.github.com", "/repos/acme/x/y"), Some(0));
        assert_eq!(hit("GET", "API.GITHUB.COM.", "/repos/acme/x"), Some(0));
        assert_eq!(hit("POST", "api.github.com", "/repos/acme/x"), Some(1));
        assert_eq!(hit("GET", "a.b.github.com", "/"), Some(1));
        assert_eq!(hit("GET", "github.com", "/"), None);
        assert_eq!(hit("GET", "evilgithub.com", "/"), None);
        assert_eq!(hit("DELETE", "api.github.com", "/repos/acme/x"), None);
        assert_eq!(hit("GET", "api.github.com:8443", "/repos/acme/x"), None);
        assert_eq!(hit("GET", "example.com", "/"), None);
    }

    #[test]
    fn single_star_stays_in_one_segment() {
        let rules = Rules::new(&[rule("h.test", &[], &["/v1/*/items"])]).unwrap();
        let get = Method::GET;
        assert!(rules.decide(&get, &at("h.test"), "/v1/a/items").is_some());
        assert!(rules.decide(&get, &at("h.test"), "/v1/a/b/items").is_none());
    }
}
