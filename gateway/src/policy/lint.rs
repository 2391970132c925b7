//! Checks that look at more than one value: "did you mean", duplicate rules, and rules that
//! an earlier rule shadows. Shadowing is judged soundly but not completely: a warning means
//! the rule can never be the first match; some shadowed rules go unreported (glob patterns
//! are only compared in the simple cases below).

use crate::{
    policy::HttpRule,
    tunnel::{
        authority::canonical_host,
        path_forms::{PathForms, PathGlob},
    },
};

/// The candidate closest to `word`, when it is close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    let limit = match word.chars().count() {
        0..=2 => 0,
        3..=5 => 1,
        _ => 2,
    };
    candidates
        .iter()
        .map(|c| (edit_distance(&word, &c.to_ascii_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j] (optimal string alignment).
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// A rule's host as matched: one name, or every name below a domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Host {
    Exact(String),
    Below(String),
}

/// `name` is strictly below `base` (as the tunnel matches `*.base`).
fn below(name: &str, base: &str) -> bool {
    name.strip_suffix(base)
        .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
}

/// The domains strictly above `name`: `a.b.c` gives `b.c`, then `c`.
fn parents(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('.').map(move |(i, _)| &name[i + 1..])
}

/// A rule in the form the comparisons need, computed once.
struct Prepared {
    host: Option<Host>,
    port: u16,
    passthrough: bool,
    /// Upper case, sorted, no repeats; empty is any method.
    methods: Vec<String>,
    /// Sorted, no repeats; empty is any path.
    paths: Vec<String>,
    /// The paths compiled as the tunnel matches them, for literal probes.
    patterns: Vec<Option<PathGlob>>,
}

impl Prepared {
    fn new(rule: &HttpRule) -> Self {
        let host = match rule.host.strip_prefix("*.") {
            Some(base) => canonical_host(base).map(Host::Below),
            None => canonical_host(&rule.host).map(Host::Exact),
        };
        let mut methods: Vec<String> = rule
            .methods
            .iter()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        methods.sort();
        methods.dedup();
        let mut paths = rule.paths.clone();
        paths.sort();
        paths.dedup();
        let patterns = paths.iter().map(|p| PathGlob::new(p).ok()).collect();
        Self {
            host,
            port: rule.port,
            passthrough: rule.passthrough,
            methods,
            paths,
            patterns,
        }
    }

    /// Every host and port `b` matches, `self` matches too.
    fn authority_covers(&self, b: &Prepared) -> bool {
        self.port == b.port
            && match (&self.host, &b.host) {
                (Some(Host::Exact(x)), Some(Host::Exact(y))) => x == y,
                (Some(Host::Below(base)), Some(Host::Exact(y))) => below(y, base),
                (Some(Host::Below(x)), Some(Host::Below(y))) => x == y || below(y, x),
                _ => false,
            }
    }

    /// Every method `b` allows, `self` allows too.
    fn methods_cover(&self, b: &Prepared) -> bool {
        self.methods.is_empty()
            || (!b.methods.is_empty() && b.methods.iter().all(|m| self.methods.contains(m)))
    }

    /// Every path `b` allows, `self` allows too.
    fn paths_cover(&self, b: &Prepared) -> bool {
        self.paths.is_empty()
            || (!b.paths.is_empty()
                && b.paths.iter().all(|pb| {
                    self.paths
                        .iter()
                        .zip(&self.patterns)
                        .any(|(pa, compiled)| path_covers_compiled(pa, compiled.as_ref(), pb))
                }))
    }

    fn shadows(&self, b: &Prepared) -> bool {
        self.authority_covers(b) && self.methods_cover(b) && self.paths_cover(b)
    }

    fn same_match(&self, b: &Prepared) -> bool {
        self.host.is_some()
            && self.host == b.host
            && self.port == b.port
            && self.methods == b.methods
            && self.paths == b.paths
    }
}

fn has_glob_syntax(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Every path the glob `b` matches, the glob `a` (compiled: `compiled`) matches too. Only
/// decided in the simple cases: the same text, a literal `b` that `a` matches (as the
/// tunnel matches a path: a path `b` matches reads as `b` does, every way), or `a` of the
/// form `LITERAL/**` and `b` starting with `LITERAL/` (each reading keeps that prefix).
fn path_covers_compiled(a: &str, compiled: Option<&PathGlob>, b: &str) -> bool {
    if a == b {
        return true;
    }
    if !has_glob_syntax(b) {
        return compiled.is_some_and(|p| p.matches(&PathForms::new(b)));
    }
    match a.strip_suffix("/**") {
        Some(prefix) if !has_glob_syntax(prefix) => {
            b.len() > prefix.len() && b.starts_with(prefix) && b[prefix.len()..].starts_with('/')
        }
        _ => false,
    }
}

/// How an earlier rule makes a later one moot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Both match exactly the same requests (an error).
    Duplicate,
    /// The earlier one matches every request the later one would.
    Shadowed,
    /// The earlier one is passthrough for the same hosts: the later one never sees HTTPS.
    SplicedBefore,
    /// The later one is passthrough, but the earlier one decides CONNECTs to its hosts.
    InterceptedBefore,
}

/// For each rule, the first earlier rule (by position in `rules`) that makes it moot, and
/// how; duplicates first, then shadowing, then the passthrough cases. Only earlier rules for
/// the same port and a covering host are compared, found by lookup, so a policy of many
/// rules for different hosts is checked in about linear time.
pub fn conflicts(rules: &[&HttpRule]) -> Vec<Option<(usize, Conflict)>> {
    let prepared: Vec<Prepared> = rules.iter().map(|r| Prepared::new(r)).collect();
    // Earlier rules by port, `*.` or not, and host name (borrowed from `prepared`).
    let mut seen: std::collections::HashMap<(u16, bool, &str), Vec<usize>> = Default::default();
    let mut out = Vec::with_capacity(rules.len());
    for (k, b) in prepared.iter().enumerate() {
        let mut candidates: Vec<usize> = Vec::new();
        if let Some(host) = &b.host {
            // Earlier rules for the same host pattern, and `*.PARENT` ones above it.
            let key = match host {
                Host::Exact(h) => (b.port, false, h.as_str()),
                Host::Below(h) => (b.port, true, h.as_str()),
            };
            if let Some(v) = seen.get(&key) {
                candidates.extend(v);
            }
            for parent in parents(key.2) {
                if let Some(v) = seen.get(&(b.port, true, parent)) {
                    candidates.extend(v);
                }
            }
            candidates.sort_unstable();
            seen.entry(key).or_default().push(k);
        }
        let first = |test: fn(&Prepared, &Prepared) -> bool| {
            candidates.iter().copied().find(|&j| test(&prepared[j], b))
        };
        let found = first(Prepared::same_match)
            .map(|j| (j, Conflict::Duplicate))
            .or_else(|| first(Prepared::shadows).map(|j| (j, Conflict::Shadowed)))
            .or_else(|| {
                first(|a, b| a.passthrough && a.authority_covers(b))
                    .map(|j| (j, Conflict::SplicedBefore))
            })
            .or_else(|| {
                first(|a, b| b.passthrough && !a.passthrough && a.authority_covers(b))
                    .map(|j| (j, Conflict::InterceptedBefore))
            });
        out.push(found);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_covers(a: &str, b: &str) -> bool {
        path_covers_compiled(a, PathGlob::new(a).ok().as_ref(), b)
    }

    fn shadows(a: &HttpRule, b: &HttpRule) -> bool {
        Prepared::new(a).shadows(&Prepared::new(b))
    }

    fn same_match(a: &HttpRule, b: &HttpRule) -> bool {
        Prepared::new(a).same_match(&Prepared::new(b))
    }

    fn conflict(a: &HttpRule, b: &HttpRule) -> Option<Conflict> {
        conflicts(&[a, b])[1].map(|(j, c)| {
            assert_eq!(j, 0);
            c
        })
    }

    fn rule(host: &str, methods: &[&str], paths: &[&str]) -> HttpRule {
        HttpRule::for_test(host, methods, paths)
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("methods", "methods"), 0);
        assert_eq!(edit_distance("method", "methods"), 1);
        assert_eq!(edit_distance("listne", "listen"), 1);
        assert_eq!(edit_distance("hots", "host"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn did_you_mean_near_misses_only() {
        let keys = ["host", "port", "methods", "paths", "credential", "private"];
        assert_eq!(did_you_mean("method", &keys), Some("methods"));
        assert_eq!(did_you_mean("Methods", &keys), Some("methods"));
        assert_eq!(did_you_mean("hots", &keys), Some("host"));
        assert_eq!(did_you_mean("credentails", &keys), Some("credential"));
        assert_eq!(did_you_mean("path", &keys), Some("paths"));
        assert_eq!(did_you_mean("timeout", &keys), None);
        assert_eq!(did_you_mean("xy", &keys), None);
        assert_eq!(did_you_mean("tls", &["tunnel", "http", "name"]), None);
    }

    #[test]
    fn path_cover_cases() {
        assert!(path_covers("/repos/**", "/repos/acme/*"));
        assert!(path_covers("/repos/**", "/repos/x"));
        assert!(path_covers("/**", "/anything/**"));
        assert!(path_covers("/v1/*", "/v1/messages"));
        assert!(path_covers("/a/*", "/a/*"));
        assert!(!path_covers("/v1/*", "/v1/a/b"));
        assert!(!path_covers("/repos/**", "/repo*/x"));
        assert!(!path_covers("/a/*", "/a/**"));
        assert!(!path_covers("/a/*/c", "/a/b*/c"));
        // The tunnel reads `%2f` as `/` and drops `;parameters` too: `/v1/*` never matches
        // these, so a rule for them is not shadowed.
        assert!(!path_covers("/v1/*", "/v1/a%2fb"));
        assert!(!path_covers("/files/*.json", "/files/a;.json"));
        assert!(path_covers("/**", "/@scope%2fname"));
        assert!(path_covers("/@scope%2f*", "/@scope%2fname"));
    }

    #[test]
    fn shadowing() {
        let any_github = rule("*.github.com", &[], &[]);
        let api_get = rule("api.github.com", &["GET"], &["/repos/**"]);
        assert!(shadows(&any_github, &api_get));
        assert!(!shadows(&api_get, &any_github));
        // Methods: an empty list is any method, which a list never covers.
        assert!(shadows(
            &rule("h.test", &["get", "POST"], &[]),
            &rule("h.test", &["GET"], &[])
        ));
        assert!(!shadows(
            &rule("h.test", &["GET"], &[]),
            &rule("h.test", &[], &[])
        ));
        // Paths: narrower globs under a `/**` prefix are covered, other globs are not judged.
        assert!(shadows(
            &rule("h.test", &[], &["/v1/**"]),
            &rule("h.test", &[], &["/v1/a/*", "/v1/b"])
        ));
        assert!(!shadows(
            &rule("h.test", &[], &["/v1/**"]),
            &rule("h.test", &[], &["/v1/a", "/v2/b"])
        ));
        assert!(!shadows(
            &rule("h.test", &[], &["/**"]),
            &rule("h.test", &[], &[])
        ));
        // Hosts: wildcards cover names strictly below them, not the base name.
        assert!(!shadows(
            &rule("*.github.com", &[], &[]),
            &rule("github.com", &[], &[])
        ));
        assert!(shadows(
            &rule("*.github.com", &[], &[]),
            &rule("*.api.github.com", &[], &[])
        ));
        assert!(shadows(
            &rule("API.GitHub.com.", &[], &[]),
            &rule("api.github.com", &["GET"], &[])
        ));
        // Ports must agree.
        let mut other_port = rule("h.test", &[], &[]);
        other_port.port = 8443;
        assert!(!shadows(&rule("h.test", &[], &[]), &other_port));
    }

    #[test]
    fn conflicts_find_the_first_earlier_rule_by_lookup() {
        let rules = [
            rule("x.test", &["GET"], &[]),
            rule("*.github.com", &["GET"], &[]),
            rule("*.api.github.com", &[], &[]),
            rule("a.api.github.com", &["GET"], &["/x"]),
            rule("github.com", &["GET"], &[]),
            rule("x.test", &["get"], &[]),
        ];
        let refs: Vec<&HttpRule> = rules.iter().collect();
        assert_eq!(
            conflicts(&refs),
            [
                None,
                None,
                None,
                // Both wildcards cover it; the first one listed is named.
                Some((1, Conflict::Shadowed)),
                None,
                Some((0, Conflict::Duplicate)),
            ]
        );
    }

    #[test]
    fn same_match_ignores_order_and_case() {
        assert!(same_match(
            &rule("h.test", &["GET", "post"], &["/b", "/a"]),
            &rule("H.test", &["POST", "GET"], &["/a", "/b"])
        ));
        assert!(!same_match(
            &rule("h.test", &["GET"], &[]),
            &rule("h.test", &[], &[])
        ));
    }

    #[test]
    fn passthrough_order() {
        let mut splice = rule("h.test", &[], &["/a"]);
        splice.passthrough = true;
        let normal = rule("h.test", &["GET"], &[]);
        assert_eq!(conflict(&splice, &normal), Some(Conflict::SplicedBefore));
        assert_eq!(
            conflict(&normal, &splice),
            Some(Conflict::InterceptedBefore)
        );
        let mut other = rule("other.test", &[], &[]);
        other.passthrough = true;
        assert_eq!(conflict(&normal, &other), None);
    }
}
