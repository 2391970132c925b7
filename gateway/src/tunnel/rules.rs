//! `[[http.allow]]` matching: default deny, the first rule that matches wins.
//!
//! Rules are indexed by (host, port) so a decision looks at the rules for that host only: the
//! cost stays flat from ten rules to tens of thousands.

use std::collections::HashMap;

use hyper::Method;

use super::{
    authority::{Authority, canonical_host},
    path_forms::{PathForms, PathGlob},
};
use crate::policy::HttpRule;

/// A rule prepared for matching: host canonical, methods upper case, globs compiled.
pub struct Rule {
    pub index: usize,
    pub spec: HttpRule,
    host: HostPattern,
    methods: Vec<String>,
    /// Each matched in every way an upstream may read a path (see [`super::path_forms`]).
    paths: Vec<PathGlob>,
}

enum HostPattern {
    Exact(String),
    /// `*.example.com`: any name below example.com, at any depth, not example.com itself.
    Below(String),
}

pub struct Rules {
    rules: Vec<Rule>,
    /// Rule indices by exact host, ascending.
    exact: HashMap<String, Vec<usize>>,
    /// Rule indices by the base of `*.base`, ascending.
    below: HashMap<String, Vec<usize>>,
    /// Whether any rule is `passthrough`.
    splices: bool,
}

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
                .map(|p| PathGlob::new(p))
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
        let mut exact: HashMap<_, Vec<usize>> = HashMap::new();
        let mut below: HashMap<_, Vec<usize>> = HashMap::new();
        for rule in &out {
            let (map, host) = match &rule.host {
                HostPattern::Exact(h) => (&mut exact, h),
                HostPattern::Below(base) => (&mut below, base),
            };
            map.entry(host.clone()).or_default().push(rule.index);
        }
        Ok(Self {
            splices: out.iter().any(|r| r.spec.passthrough),
            rules: out,
            exact,
            below,
        })
    }

    /// The first rule allowing this request. `path` excludes the query; a rule's glob must
    /// match it in every way an upstream may read it.
    pub fn decide(&self, method: &Method, target: &Authority, path: &str) -> Option<&Rule> {
        let path = PathForms::new(path);
        self.first_candidate(target, |r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m == method.as_str()))
                && (r.paths.is_empty() || r.paths.iter().any(|p| p.matches(&path)))
        })
    }

    /// The first rule for this host and port, whatever the method and path: decides whether a
    /// CONNECT is intercepted, spliced or refused.
    pub fn for_authority(&self, target: &Authority) -> Option<&Rule> {
        self.first_candidate(target, |_| true)
    }

    /// Whether this host and port is spliced (its first rule is `passthrough`). Most policies
    /// have no such rule, and then nothing is looked up.
    pub fn spliced(&self, target: &Authority) -> bool {
        self.splices
            && self
                .for_authority(target)
                .is_some_and(|r| r.spec.passthrough)
    }

    pub fn get(&self, index: usize) -> Option<&Rule> {
        self.rules.get(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// The first rule, in policy order, whose host and port match `target` and that passes
    /// `test`.
    fn first_candidate(
        &self,
        target: &Authority,
        mut test: impl FnMut(&Rule) -> bool,
    ) -> Option<&Rule> {
        if self.below.is_empty() || target.ip().is_some() {
            // Exact hosts only, already in policy order: nothing to gather or sort, as for
            // most requests.
            return self
                .exact
                .get(target.host.as_str())?
                .iter()
                .map(|&i| &self.rules[i])
                .find(|r| r.spec.port == target.port && test(r));
        }
        self.candidates(target).into_iter().find(|r| test(r))
    }

    /// Every rule whose host and port match `target`, in policy order.
    fn candidates(&self, target: &Authority) -> Vec<&Rule> {
        let mut found: Vec<&Rule> = Vec::new();
        let mut take = |hit: &Vec<usize>| {
            found.extend(
                hit.iter()
                    .map(|&i| &self.rules[i])
                    .filter(|r| r.spec.port == target.port),
            );
        };
        if let Some(hit) = self.exact.get(target.host.as_str()) {
            take(hit);
        }
        // `*.base` matches any name strictly below base: look up every proper suffix that
        // starts after a dot.
        if !self.below.is_empty() && target.ip().is_none() {
            let host = target.host.as_str();
            for (dot, _) in host.match_indices('.') {
                let base = &host[dot + 1..];
                if dot == 0 || base.is_empty() {
                    continue;
                }
                if let Some(hit) = self.below.get(base) {
                    take(hit);
                }
            }
        }
        found.sort_unstable_by_key(|r| r.index);
        found
    }
}

impl Rule {
    /// The rule's host and port test, written plainly: the oracle the index is checked against.
    #[cfg(test)]
    fn matches_authority(&self, target: &Authority) -> bool {
        self.spec.port == target.port
            && match &self.host {
                HostPattern::Exact(h) => *h == target.host,
                HostPattern::Below(base) => {
                    target.ip().is_none()
                        && target
                            .host
                            .strip_suffix(base.as_str())
                            .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
                }
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
    fn the_index_finds_what_a_scan_of_every_rule_finds() {
        let hosts = [
            "api.github.com",
            "*.github.com",
            "github.com",
            "*.api.github.com",
            "*.com",
            "example.com",
            "127.0.0.1",
            "*.xn--bcher-kva.example",
        ];
        let specs: Vec<HttpRule> = hosts
            .iter()
            .flat_map(|h| [rule(h, &[], &[]), rule(h, &["GET"], &["/x"])])
            .collect();
        // With `*.` rules, and with exact hosts only (the lookup that gathers nothing).
        let exact: Vec<HttpRule> = specs
            .iter()
            .filter(|r| !r.host.starts_with("*."))
            .cloned()
            .collect();
        for specs in [&specs, &exact] {
            index_matches_scan(&Rules::new(specs).unwrap());
        }
    }

    fn index_matches_scan(rules: &Rules) {
        for probe in [
            "api.github.com",
            "a.api.github.com",
            "b.a.api.github.com",
            "github.com",
            "x.github.com",
            "com",
            "example.com",
            "evil-github.com",
            "127.0.0.1",
            "0.0.1",
            "bücher.example",
            "a.bücher.example",
            "a.b.c.d.e.f",
            "api.github.com:8443",
        ] {
            let target = at(probe);
            let scan: Vec<usize> = rules
                .iter()
                .filter(|r| r.matches_authority(&target))
                .map(|r| r.index)
                .collect();
            let indexed: Vec<usize> = rules.candidates(&target).iter().map(|r| r.index).collect();
            assert_eq!(indexed, scan, "{probe}");
            let first = rules.for_authority(&target).map(|r| r.index);
            assert_eq!(first, scan.first().copied(), "{probe}");
            let get = rules.decide(&Method::GET, &target, "/x").map(|r| r.index);
            assert_eq!(get, scan.first().copied(), "{probe}");
            let post = rules.decide(&Method::POST, &target, "/x").map(|r| r.index);
            assert_eq!(post, scan.iter().copied().find(|i| i % 2 == 0), "{probe}");
        }
    }

    #[test]
    fn single_star_stays_in_one_segment() {
        let rules = Rules::new(&[rule("h.test", &[], &["/v1/*/items"])]).unwrap();
        let get = Method::GET;
        assert!(rules.decide(&get, &at("h.test"), "/v1/a/items").is_some());
        assert!(rules.decide(&get, &at("h.test"), "/v1/a/b/items").is_none());
    }

    #[test]
    fn a_rule_allows_a_path_only_as_every_upstream_reads_it() {
        let rules = Rules::new(&[
            rule("h.test", &[], &["/v1/*", "/files/*.json", "/@scope%2f*"]),
            rule("h.test", &["GET"], &["/wide/**"]),
            rule("npm.test", &[], &["/**"]),
        ])
        .unwrap();
        let hit = |h: &str, p: &str| rules.decide(&Method::GET, &at(h), p).map(|r| r.index);
        assert_eq!(hit("h.test", "/v1/admin"), Some(0));
        // WSGI servers route this to /v1/admin/delete_all.
        assert_eq!(hit("h.test", "/v1/admin%2Fdelete_all"), None);
        assert_eq!(hit("h.test", "/v1/admin%2fdelete_all"), None);
        assert_eq!(hit("h.test", "/v1/admin%252Fdelete_all"), None);
        // Tomcat and Jetty route this to /files/secret.
        assert_eq!(hit("h.test", "/files/report.json"), Some(0));
        assert_eq!(hit("h.test", "/files/secret;.json"), None);
        assert_eq!(hit("h.test", "/files/secret%3B.json"), None);
        // A rule written with `%2f` keeps matching what it names, and nothing deeper.
        assert_eq!(hit("h.test", "/@scope%2fname"), Some(0));
        assert_eq!(hit("h.test", "/@scope%2fname%2fx"), None);
        assert_eq!(hit("h.test", "/wide/admin%2Fdelete_all;x"), Some(1));
        assert_eq!(hit("npm.test", "/@types%2fnode"), Some(2));
        assert_eq!(hit("npm.test", "/@types%2Fnode/-/node-1.0.0.tgz"), Some(2));
    }
}
