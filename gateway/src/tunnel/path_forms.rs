//! The ways an upstream may read a request path, and path globs that must match in each.
//!
//! The tunnel forwards a path as sent, but upstreams do not all route on it as sent: WSGI
//! servers (Flask, Django) decode `%2F` to `/` before routing, so `/v1/admin%2Fdelete_all`,
//! one segment as sent, is two there; Tomcat and Jetty drop each segment's `;parameters`, so
//! `/files/secret;.json` is `/files/secret`; a few servers decode twice (`%252F`); nginx and
//! Tomcat merge `//` into `/`, so `/v1//info`, which `/v1/*/info` matches with an empty `*`,
//! is `/v1/info` there. A glob
//! matched against one of these readings alone lets `/v1/*` or `/files/*.json` reach what
//! the author did not list. So a rule's glob matches a path only if it matches in every
//! reading, and the glob is read the same way as the path (the same text transformation),
//! so a rule written for npm's `/@scope%2fname` still matches it: as sent, and as
//! `/@scope/name` with `%2f` read as `/`. Since the reading as sent is one of them, this can
//! only narrow what a rule allows, never widen it.

use std::borrow::Cow;

use glob::{MatchOptions, Pattern, PatternError};

/// `*` and `?` stay inside one segment; `**` spans segments.
pub(crate) const GLOB: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// The readings besides "as sent": `%2F` as `/`; `;parameters` dropped; both, in either
/// order (`/a;x%2fb/c` is `/a/c` when parameters go first, `/a/b/c` when slashes do); and
/// each of those and the path as sent with `//` merged.
const READINGS: usize = 9;

/// Each reading of `text` other than as sent, `None` where it reads as sent. Every reading
/// first collapses `%25` (a server that decodes twice sees `%252F` as `%2F`).
pub fn readings(text: &str) -> [Option<String>; READINGS] {
    // Most paths have no `%`, `;` or `//`: they read the same every way, and cost nothing.
    if !text.bytes().any(|b| b == b'%' || b == b';') && !text.contains("//") {
        return Default::default();
    }
    let collapsed = collapse_encoded_percent(text);
    let slashes = decode_slashes(&collapsed).into_owned();
    let params = drop_params(&collapsed).into_owned();
    let slashes_then_params = drop_params(&slashes).into_owned();
    let params_then_slashes = decode_slashes(&params).into_owned();
    // A merged reading that merges nothing is its unmerged one: not matched twice.
    let merged = |t: &str| match merge_slashes(t) {
        Cow::Owned(m) => (m != text).then_some(m),
        Cow::Borrowed(_) => None,
    };
    let unmerged = |r: String| (r != text).then_some(r);
    [
        merged(text),
        merged(&slashes),
        merged(&params),
        merged(&slashes_then_params),
        merged(&params_then_slashes),
        unmerged(slashes),
        unmerged(params),
        unmerged(slashes_then_params),
        unmerged(params_then_slashes),
    ]
}

/// Runs of `/` as one.
fn merge_slashes(text: &str) -> Cow<'_, str> {
    if !text.contains("//") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A request path in every reading.
pub struct PathForms<'a> {
    as_sent: &'a str,
    read: [Option<String>; READINGS],
}

impl<'a> PathForms<'a> {
    pub fn new(path: &'a str) -> Self {
        Self {
            as_sent: path,
            read: readings(path),
        }
    }
}

/// A path glob compiled in every reading.
#[derive(Debug)]
pub struct PathGlob {
    as_written: Pattern,
    read: [Option<Pattern>; READINGS],
}

impl PathGlob {
    /// Fails where the glob, or one of its readings, is not a glob (`[;]` loses its `]`).
    pub fn new(text: &str) -> Result<Self, PatternError> {
        let mut read: [Option<Pattern>; READINGS] = Default::default();
        for (slot, r) in read.iter_mut().zip(readings(text)) {
            *slot = r.as_deref().map(Pattern::new).transpose()?;
        }
        Ok(Self {
            as_written: Pattern::new(text)?,
            read,
        })
    }

    /// Matches `path` in every reading (see the module's comment).
    pub fn matches(&self, path: &PathForms) -> bool {
        self.as_written.matches_with(path.as_sent, GLOB)
            && self.read.iter().zip(&path.read).all(|pair| match pair {
                // Both read as written and sent: checked just above.
                (None, None) => true,
                (glob, path_read) => glob
                    .as_ref()
                    .unwrap_or(&self.as_written)
                    .matches_with(path_read.as_deref().unwrap_or(path.as_sent), GLOB),
            })
    }
}

/// Checks `text` decoded whole (every escape) once, twice, ... up to `rounds` times, as
/// servers that decode more than once read it, stopping when a decode changes nothing.
/// Whether `check` held for one of those forms; `None` when the text still changed after
/// `rounds` decodes, for the caller to judge.
pub fn in_decodings(
    text: &[u8],
    rounds: usize,
    mut check: impl FnMut(&[u8]) -> bool,
) -> Option<bool> {
    let mut form = Cow::Borrowed(text);
    for _ in 0..rounds {
        if !form.contains(&b'%') {
            return Some(false);
        }
        let next: Vec<u8> = percent_encoding::percent_decode(&form).collect();
        if next == *form {
            return Some(false);
        }
        if check(&next) {
            return Some(true);
        }
        form = next.into();
    }
    None
}

/// `%25` decoded until none is left, in one pass: `%2525` is `%`, `%252e` is `%2e`. No
/// `%25` can overlap another, so the result is what decoding `%25` again and again until
/// nothing changes gives, whatever the order, and each escape that a decoding round would
/// reveal (`%2e`, `%2f`, `%3b`) is in it.
pub fn collapse_encoded_percent(text: &str) -> Cow<'_, str> {
    if !text.contains("%25") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        out.push(c);
        if out.ends_with("%25") {
            out.truncate(out.len() - 2);
        }
    }
    Cow::Owned(out)
}

/// `%2F` and `%2f` as `/`.
fn decode_slashes(text: &str) -> Cow<'_, str> {
    replace_escape(text, b'2', b'f', "/")
}

/// Each segment cut at its first `;` or `%3B` (a server may decode before it splits).
fn drop_params(text: &str) -> Cow<'_, str> {
    let text = replace_escape(text, b'3', b'b', ";");
    if !text.contains(';') {
        return text;
    }
    let kept: Vec<&str> = text
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or(seg))
        .collect();
    Cow::Owned(kept.join("/"))
}

/// `text` with each `%HL` (either case of the hex letter `low`) replaced by `with`.
fn replace_escape<'t>(text: &'t str, high: u8, low: u8, with: &str) -> Cow<'t, str> {
    let bytes = text.as_bytes();
    let at = |i: usize| {
        bytes[i] == b'%'
            && bytes.get(i + 1) == Some(&high)
            && bytes
                .get(i + 2)
                .is_some_and(|b| b.to_ascii_lowercase() == low)
    };
    if !(0..bytes.len()).any(at) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        if at(i) {
            out.push_str(with);
            i += 3;
        } else {
            // Up to the next `%`: escapes are ASCII, so that cuts no character in two.
            let from = if bytes[i] == b'%' { i + 1 } else { i };
            let next = text[from..].find('%').map_or(text.len(), |n| from + n);
            out.push_str(&text[i..next]);
            i = next;
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> PathGlob {
        PathGlob::new(text).unwrap()
    }

    fn matches(glob_text: &str, path: &str) -> bool {
        glob(glob_text).matches(&PathForms::new(path))
    }

    #[test]
    fn merged_slashes_are_one_reading() {
        // An empty `*` between two slashes: nginx serves `/v1/info`.
        assert!(!matches("/v1/*/info", "/v1//info"));
        assert!(!matches("/v1/*/info", "/v1/;x/info"));
        assert!(!matches("/v1/*/info", "/v1/%2F/info"));
        assert!(matches("/v1/*/info", "/v1/a/info"));
        // Under `**`, merged or not, it stays inside.
        assert!(matches("/bucket/**", "/bucket//logs//2024/x"));
        assert!(matches("/**", "/https://example.com/article"));
        assert!(!matches("/r/*", "/r//x"));
    }

    #[test]
    fn an_encoded_slash_is_a_separator_for_single_stars() {
        assert!(matches("/v1/*", "/v1/admin"));
        assert!(!matches("/v1/*", "/v1/admin%2Fdelete_all"));
        assert!(!matches("/v1/*", "/v1/admin%2fdelete_all"));
        assert!(!matches("/v1/*/items", "/v1/a%2fb/items"));
        assert!(matches("/v1/**", "/v1/admin%2Fdelete_all"));
        // Decoded twice.
        assert!(!matches("/v1/*", "/v1/admin%252Fdelete_all"));
        assert!(!matches("/v1/*", "/v1/admin%25252fdelete_all"));
    }

    #[test]
    fn npm_scoped_packages_stay_allowed() {
        assert!(matches("/**", "/@types%2fnode"));
        assert!(matches("/**", "/@types%2Fnode/-/node-1.0.0.tgz"));
        assert!(matches("/@types%2fnode", "/@types%2fnode"));
        assert!(matches("/@types%2f*", "/@types%2fnode"));
        assert!(!matches("/@types%2f*", "/@types%2fnode%2fx"));
        // A glob written with `%2f` is not a glob for a real `/`, nor for any segment.
        assert!(!matches("/@types%2fnode", "/@types/node"));
        assert!(!matches("/*", "/@types%2fnode"));
    }

    #[test]
    fn path_parameters_are_dropped_in_one_reading() {
        assert!(matches("/files/*.json", "/files/report.json"));
        assert!(!matches("/files/*.json", "/files/secret;.json"));
        assert!(!matches("/files/*.json", "/files/secret%3b.json"));
        assert!(!matches("/files/*.json", "/files/secret%3B.json"));
        assert!(!matches("/files/*.json", "/files/secret;x/.json"));
        // Parameters a glob allows in every reading.
        assert!(matches("/files/*", "/files/a;v=1"));
        assert!(matches("/files/a;v=1", "/files/a;v=1"));
        assert!(!matches("/files/a;v=1", "/files/a;v=2"));
        assert!(!matches("/files/a;v=1", "/files/a"));
        assert!(matches("/repos/**", "/repos/a;b/c"));
    }

    #[test]
    fn both_orders_of_slashes_and_parameters() {
        // Parameters first: `/a/c`; slashes first: `/a/b/c`.
        assert!(!matches("/a/c", "/a;x%2fb/c"));
        assert!(!matches("/a/*/c", "/a;x%2fb/c"));
        assert!(matches("/a*/**", "/a;x%2fb/c"));
        // A glob is read as the path is: written like the path, it matches in every reading.
        assert!(matches("/a;x%2fb/*", "/a;x%2fb/c"));
    }

    #[test]
    fn other_escapes_and_literal_percents_read_as_sent() {
        assert!(matches("/discount/*", "/discount/100%25"));
        assert!(matches("/discount/100%25", "/discount/100%25"));
        assert!(matches("/a%25/**", "/a%25/x%2fy"));
        assert!(matches("/q/*", "/q/a%20b"));
    }

    #[test]
    fn readings() {
        assert!(super::readings("/v1/x").iter().all(Option::is_none));
        assert_eq!(
            super::readings("/a;x%2Fb/c"),
            [
                None,
                None,
                None,
                None,
                None,
                Some("/a;x/b/c".into()),
                Some("/a/c".into()),
                Some("/a/b/c".into()),
                Some("/a/c".into()),
            ]
        );
        assert_eq!(super::readings("//a")[0].as_deref(), Some("/a"));
        assert_eq!(super::readings("/a;x/;y/b")[2].as_deref(), Some("/a/b"));
        assert_eq!(collapse_encoded_percent("/%2525%252e%25"), "/%%2e%");
        assert_eq!(collapse_encoded_percent("/%%2525"), "/%%");
        assert_eq!(decode_slashes("/é%2fü%2F"), "/é/ü/");
    }

    #[test]
    fn a_glob_whose_reading_is_no_glob_is_refused() {
        assert!(PathGlob::new("/a[;]b").is_err());
        assert!(PathGlob::new("/a[x]b;c").is_ok());
    }
}
