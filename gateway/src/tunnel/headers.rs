//! Header rules at the boundary: what is ambiguous (refused), what is hop-by-hop (dropped).

use std::borrow::Cow;

use hyper::{
    HeaderMap, Method,
    header::{self, HeaderName, HeaderValue},
};

use super::path_forms;

/// Why a request is refused with 400 before any rule is consulted.
pub fn ambiguity(headers: &HeaderMap) -> Option<&'static str> {
    // One pass over the values (a handful per request) rather than a lookup for each name.
    let (mut lengths, mut chunked, mut hosts, mut types) = (0, false, 0, 0);
    for name in headers.iter().map(|(name, _)| name) {
        if *name == header::CONTENT_LENGTH {
            lengths += 1;
        } else if *name == header::TRANSFER_ENCODING {
            chunked = true;
        } else if *name == header::HOST {
            hosts += 1;
        } else if *name == header::CONTENT_TYPE {
            types += 1;
        }
    }
    if lengths > 1 {
        return Some("duplicate-content-length");
    }
    if lengths == 1 && chunked {
        return Some("content-length-and-transfer-encoding");
    }
    if hosts > 1 {
        return Some("duplicate-host");
    }
    // Servers take the first, the last, or both joined: each would read the body its way.
    if types > 1 {
        return Some("duplicate-content-type");
    }
    None
}

/// Why a request is refused with 400 for a header that some frameworks take as its real
/// method or path (Symfony, Laravel, ASP.NET, IIS rewrite, Express's method-override):
/// rules would have judged another request than the one the upstream serves. A method
/// override naming the request's own method changes nothing and passes (frameworks
/// upper-case it, so case is ignored). Names with `_` are refused too: CGI-style servers
/// (WSGI, Rack, PHP) read `_` as `-`, so `X_HTTP_Method_Override` is an override there, and
/// `X_Api_Key` the credential's header beside the one the tunnel sets (nginx and Apache
/// drop such headers by default, so clients do not rely on them).
pub fn refused_header(method: &Method, headers: &HeaderMap) -> Option<&'static str> {
    // One pass over the headers (a handful per request) rather than a lookup for each.
    headers
        .iter()
        .find_map(|(name, value)| match name.as_str() {
            "x-original-url" | "x-rewrite-url" => Some("override-header"),
            "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-original-method" => {
                let same = value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(method.as_str().as_bytes());
                (!same).then_some("override-header")
            }
            name if name.contains('_') => Some("underscore-in-header-name"),
            _ => None,
        })
}

/// Why a request is refused with 400 for a query parameter that frameworks take as its real
/// method (`_method`: Laravel and Symfony read it from the query of a POST, Rails and
/// Express's method-override from a form): a rule allowing POST would let a DELETE through.
/// Names are decoded and read as PHP and Rack read them (`.method`, `[_method]`), in any
/// case; the request's own method passes.
pub fn override_parameter(method: &Method, query: Option<&str>) -> Option<&'static str> {
    let query = query?;
    // ASP.NET decodes IIS's `%uXXXX` in names too; no standard client sends one.
    if unicode_escape(query) {
        return Some("unicode-escape");
    }
    let refused = url::form_urlencoded::parse(query.as_bytes()).any(|(name, value)| {
        super::form_override::names_a_method(name.as_bytes())
            && !value.trim().eq_ignore_ascii_case(method.as_str())
    });
    refused.then_some("override-parameter")
}

/// Why a path is refused: dot segments, encoded dots or backslashes, NUL — anything an
/// upstream could resolve to a path other than the one the rule was matched against. An
/// encoded `/` is allowed (npm names scoped packages `/@scope%2fname`): rules match it in
/// every reading (see [`super::path_forms`]), and dot segments are looked for with it
/// decoded as well, so `/a%2f..%2fadmin` is refused whichever way the upstream reads it.
/// Servers that decode twice or more are covered by looking at the path with `%25` decoded
/// until none is left; servers that take `;` as the start of a segment's parameters (`..;/`)
/// by ignoring them, `%3b` included (a server may decode before it splits them off); and
/// lenient UTF-8 decoders, which read overlong forms such as `%c0%ae` as `.`, by refusing
/// such forms of the characters that matter here.
pub fn path_ambiguity(path: &str) -> Option<&'static str> {
    // Without an escape, a backslash or a dot nothing below can match: most paths, checked
    // in one pass with no copy (this runs on every request).
    let plain = !path
        .bytes()
        .any(|b| matches!(b, b'%' | b'\\' | b'.') || !b.is_ascii());
    if plain && path.starts_with('/') {
        return None;
    }
    let lower = path.to_ascii_lowercase();
    let decoded = path_forms::collapse_encoded_percent(&lower);
    let encoded = ["%5c", "%00", "%2e"].iter().any(|e| decoded.contains(e));
    if encoded || path.contains('\\') || overlong_special(&decoded) {
        return Some("encoded-path-separator");
    }
    if unicode_escape(&decoded) {
        return Some("unicode-escape");
    }
    // Decoded, `?` and `#` end the path and CR or LF end the line: a server or front that
    // decodes before it forwards or routes (nginx's `$uri`) would send a shorter path, or a
    // header of the client's making, than the one the rule matched.
    if ["%3f", "%23"].iter().any(|e| decoded.contains(e)) {
        return Some("encoded-path-delimiter");
    }
    if encoded_control(&decoded) {
        return Some("encoded-control-character");
    }
    if lookalike_separator(path.as_bytes()) {
        return Some("lookalike-path-separator");
    }
    // A dot segment as sent stays one here: this reading only adds separators. (Most paths
    // have no escape: nothing to copy.)
    let separated = if decoded.contains('%') {
        Cow::Owned(decoded.replace("%3b", ";").replace("%2f", "/"))
    } else {
        Cow::Borrowed(&*decoded)
    };
    let dot_segment = separated
        .split('/')
        .any(|seg| matches!(seg.split(';').next(), Some("." | "..")));
    if dot_segment {
        return Some("dot-segment-in-path");
    }
    if !path.starts_with('/') && path != "*" {
        return Some("relative-path");
    }
    if path.contains('%') {
        return in_decodings(path);
    }
    None
}

/// An escape of an ASCII control character (`%01`-`%1f`, `%7f`; `%00` is refused as a
/// separator) in lower-cased text.
fn encoded_control(text: &str) -> bool {
    text.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && (matches!(w[1], b'0' | b'1') && w[2].is_ascii_hexdigit() || w[1..] == *b"7f")
    })
}

/// IIS's own escape, `%uXXXX` (`%u002e` is `.`, either case), which no standard decoder
/// reads: the upstream could see another path than the rule did. Never sent by an ordinary
/// client.
fn unicode_escape(text: &str) -> bool {
    text.as_bytes().windows(6).any(|w| {
        w[0] == b'%' && w[1].eq_ignore_ascii_case(&b'u') && w[2..].iter().all(u8::is_ascii_hexdigit)
    })
}

/// Characters that Unicode compatibility normalisation (NFKC, which some frameworks apply
/// to paths) or Windows' best-fit mapping (IIS, ASP.NET; `¥` and `₩` in the Japanese and
/// Korean code pages) turn into `/`, `\`, `;`, `%`, or a `.` or `..`: `／` in a segment would
/// become a separator after the rule matched it as text. Every NFKC mapping of the kind is
/// here but those that only end in dots after other text (`⒈` is `1.`) or make three (`…`,
/// a name, which titles use).
const LOOKALIKES: &[char] = &[
    '\u{2024}', '\u{2025}', '\u{fe30}', '\u{fe52}', '\u{ff0e}', // . and ..
    '\u{ff0f}', '\u{2215}', '\u{2044}', '\u{29f8}', // /
    '\u{2100}', '\u{2101}', '\u{2105}', '\u{2106}', // a/c, a/s, c/o, c/u
    '\u{ff3c}', '\u{fe68}', '\u{2216}', '\u{29f5}', '\u{29f9}', '\u{a5}', '\u{20a9}', // \
    '\u{ff1b}', '\u{fe54}', '\u{fe14}', '\u{37e}', // ;
    '\u{ff05}', '\u{fe6a}', // %
];

/// Whether `bytes`, read as UTF-8 (invalid sequences skipped), hold one of [`LOOKALIKES`].
fn lookalike_separator(bytes: &[u8]) -> bool {
    !bytes.is_ascii() && String::from_utf8_lossy(bytes).contains(LOOKALIKES)
}

/// What decoding the path whole (every escape, not only `%25`), once or again, reveals:
/// an escape of `.`, `/`, `\`, `;` or NUL, or an overlong form of one (`%25%32%65` and
/// `%2%65` read as `%2e` after one decode, which the checks above, looking at the path's own
/// escapes, cannot see), or else one of [`LOOKALIKES`]. One pass over the decodings serves
/// both. Bounded: a path still changing after four decodes is refused.
fn in_decodings(path: &str) -> Option<&'static str> {
    let mut lookalike = false;
    let mut hidden = None;
    let still_changing = path_forms::in_decodings(path.as_bytes(), 4, |form| {
        lookalike |= lookalike_separator(form);
        hidden = form
            .windows(3)
            .filter(|w| w[0] == b'%')
            .filter_map(|w| u8::from_str_radix(std::str::from_utf8(&w[1..]).ok()?, 16).ok())
            .find_map(escaped_reason)
            .or_else(|| {
                overlong_special(&String::from_utf8_lossy(form).to_ascii_lowercase())
                    .then_some("encoded-path-separator")
            });
        hidden.is_some()
    })
    .is_none();
    if still_changing {
        return Some("encoded-path-separator");
    }
    hidden.or(lookalike.then_some("lookalike-path-separator"))
}

/// The refusal of an escape of `byte` that a decode reveals: one that changes how the path
/// splits or ends, or a control character.
fn escaped_reason(byte: u8) -> Option<&'static str> {
    match byte {
        b'.' | b'/' | b'\\' | b';' | 0 => Some("encoded-path-separator"),
        b'?' | b'#' => Some("encoded-path-delimiter"),
        0x01..=0x1f | 0x7f => Some("encoded-control-character"),
        _ => None,
    }
}

/// A run of escapes (lower case) that a lenient UTF-8 decoder reads as `.`, `/`, `\`, `;`,
/// `%` or NUL: an overlong form (`%c0%ae`, `%e0%80%af`, `%c1%9c`), also with continuation
/// bytes whose top bits are wrong (such decoders only mask them). Valid UTF-8 never encodes
/// these in more than one byte, so no UTF-8 name is refused; a Latin-1 one could be (`%c0%6e`,
/// "Àn"), rarely, and is refused rather than guessed at.
fn overlong_special(path: &str) -> bool {
    let bytes = path.as_bytes();
    let escaped = |i: usize| -> Option<u8> {
        let hex = bytes.get(i + 1..i + 3)?;
        (bytes[i] == b'%')
            .then(|| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .flatten()
    };
    (0..bytes.len()).any(|i| {
        let Some(lead) = escaped(i) else {
            return false;
        };
        // A lead byte of 2 to 6 bytes (5 and 6 as the first UTF-8 allowed).
        let len = lead.leading_ones() as usize;
        if !(2..=6).contains(&len) {
            return false;
        }
        let mut value = u32::from(lead & (0x7f >> len));
        for k in 1..len {
            match escaped(i + 3 * k) {
                Some(cont) => value = (value << 6) | u32::from(cont & 0x3f),
                None => return false,
            }
        }
        matches!(value, 0x2e | 0x2f | 0x5c | 0x3b | 0x25 | 0x3f | 0x23 | 0)
    })
}

/// Hop-by-hop headers, `Upgrade` (kept only for a WebSocket request, which sets it anew)
/// and `HTTP2-Settings` (h2c is never forwarded).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str())
}

/// [`is_hop_by_hop`] for a lower-case name as text (a policy's credential `header`).
pub fn is_hop_by_hop_name(name: &str) -> bool {
    // A match on the text, quicker than a scan of the list: every name of every message
    // comes through here.
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "http2-settings"
    )
}

/// The names [`is_hop_by_hop_name`] takes, in lower case.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Removes hop-by-hop headers, those the Connection header names, `Upgrade` (kept only for a
/// WebSocket request) and `HTTP2-Settings` (h2c is never forwarded).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_websocket_upgrade: bool) {
    // This runs on every request and response. Without a hop-by-hop header there is no
    // Connection header either (it is one), so one pass over the names settles most
    // requests; most answers carry only `Connection: keep-alive`, which names a hop-by-hop
    // header itself. Nothing is allocated unless a message has several Connection headers.
    if let Some(first) = headers.keys().find(|k| is_hop_by_hop(k)).cloned() {
        let mut values = headers.get_all(header::CONNECTION).iter();
        let listed = values.next().cloned();
        let more: Vec<HeaderValue> = values.cloned().collect();
        for value in listed.iter().chain(&more) {
            let Ok(value) = value.to_str() else {
                continue;
            };
            for name in value.split(',').map(str::trim) {
                // Hop-by-hop names go below, without parsing the name here.
                if !HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                    headers.remove(name);
                }
            }
        }
        // One name at a time, so that nothing is collected: usually there is one
        // (Connection), and there are at most as many passes as hop-by-hop names.
        headers.remove(&first);
        while let Some(name) = headers.keys().find(|k| is_hop_by_hop(k)).cloned() {
            headers.remove(&name);
        }
    }
    if keep_websocket_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

/// Whether a request header tells an upstream where the request came from or which host,
/// scheme or prefix it was for. The client's own would route an upstream that trusts them
/// (a proxy-fix middleware) by a host or prefix no rule judged, or pass it as a trusted
/// local address.
fn is_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    // Rails reads Client-IP, go-chi True-Client-IP, CDNs set CF-Connecting-IP and
    // Fastly-Client-IP, Envoy its x-envoy-* (an original path among them).
    name == "forwarded"
        || name.starts_with("x-forwarded")
        || name.ends_with("client-ip")
        || matches!(
            name,
            "x-real-ip" | "cf-connecting-ip" | "x-original-host" | "x-host"
        )
        || name.starts_with("x-envoy-")
}

/// Removes the client's [`is_forwarding`] headers. One pass over the names when there are
/// none, as on nearly every request.
pub fn strip_forwarding(headers: &mut HeaderMap) {
    while let Some(name) = headers.keys().find(|k| is_forwarding(k)).cloned() {
        headers.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_are_stripped_and_others_kept() {
        let mut headers = HeaderMap::new();
        for name in [
            "forwarded",
            "x-forwarded",
            "x-forwarded-host",
            "x-forwarded-for",
            "x-real-ip",
            "true-client-ip",
            "client-ip",
            "x-client-ip",
            "x-cluster-client-ip",
            "cf-connecting-ip",
            "fastly-client-ip",
            "x-original-host",
            "x-host",
            "x-envoy-original-path",
            "x-kept",
            "accept",
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("127.0.0.1"),
            );
        }
        strip_forwarding(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-kept"]);
    }

    #[test]
    fn paths() {
        assert_eq!(path_ambiguity("/repos/acme/x"), None);
        assert!(path_ambiguity("/repos/acme/../admin").is_some());
        assert!(path_ambiguity("/repos/acme/%2e%2e/admin").is_some());
        assert_eq!(path_ambiguity("/@types%2fnode"), None);
        assert!(path_ambiguity("/a%2F..%2Fadmin").is_some());
        assert!(path_ambiguity("/a%5cb").is_some());
        // Decoded, these end the path or the line.
        assert_eq!(
            path_ambiguity("/files/secret%3F.json"),
            Some("encoded-path-delimiter")
        );
        assert_eq!(path_ambiguity("/a%2523b"), Some("encoded-path-delimiter"));
        assert_eq!(
            path_ambiguity("/x%0d%0aX-Injected:%20yes"),
            Some("encoded-control-character")
        );
        assert_eq!(path_ambiguity("/a%7Fb"), Some("encoded-control-character"));
        assert_eq!(path_ambiguity("/a%1fb"), Some("encoded-control-character"));
        assert_eq!(path_ambiguity("/a%20b%2Bc%40d"), None);
        // The same once the escape's own characters are decoded, and overlong.
        for path in [
            "/files/secret%25%33%66.json",
            "/files/secret%3%66.json",
            "/files/a%2%33.json",
        ] {
            assert_eq!(
                path_ambiguity(path),
                Some("encoded-path-delimiter"),
                "{path}"
            );
        }
        for path in ["/files/secret%0%61x.json", "/files/secret%25%30%61x.json"] {
            assert_eq!(
                path_ambiguity(path),
                Some("encoded-control-character"),
                "{path}"
            );
        }
        assert!(path_ambiguity("/files/secret%c0%bf.json").is_some());
        assert!(path_ambiguity("/a/./b").is_some());
        // Path parameters (Tomcat and Spring read `..;x` as `..`).
        assert!(path_ambiguity("/repos/acme/..;/admin").is_some());
        assert!(path_ambiguity("/repos/acme/.;x/b").is_some());
        assert_eq!(path_ambiguity("/repos/acme/a;v=1"), None);
        // Decoded twice.
        assert!(path_ambiguity("/repos/acme/%252e%252e/admin").is_some());
        assert!(path_ambiguity("/a%252f..%252fadmin").is_some());
        assert!(path_ambiguity("/a%255cb").is_some());
        assert_eq!(path_ambiguity("/discount/100%25"), None);
        // Decoded three times and more.
        assert_eq!(
            path_ambiguity("/public/%25252e%25252e/admin"),
            Some("encoded-path-separator")
        );
        assert_eq!(
            path_ambiguity("/public/%2525252E/admin"),
            Some("encoded-path-separator")
        );
        assert_eq!(
            path_ambiguity("/a%2525252f..%2525252fadmin"),
            Some("dot-segment-in-path")
        );
        assert_eq!(path_ambiguity("/discount/100%252525"), None);
        // Decoded whole, not only `%25`: the hex digits may be escapes too (found by review).
        for path in [
            "/v1/%25%32%65%25%32%65",
            "/v1/admin%25%32%46delete_all",
            "/v1/%2%65%2%65/admin",
            "/v1/%%32%65%%32%65/admin",
            "/v1/a%25%33%62/b",
            "/v1/a%25%35%43b",
            "/v1/a%25%63%30%25%61%65b",
        ] {
            assert_eq!(
                path_ambiguity(path),
                Some("encoded-path-separator"),
                "{path}"
            );
        }
        assert_eq!(path_ambiguity("/v1/%25%34%31"), None);
        assert_eq!(path_ambiguity("/v1/caf%C3%A9"), None);
        // An encoded `;` starts parameters too.
        assert_eq!(
            path_ambiguity("/public/..%3b/admin"),
            Some("dot-segment-in-path")
        );
        assert_eq!(
            path_ambiguity("/public/.%3Bx/admin"),
            Some("dot-segment-in-path")
        );
        assert_eq!(
            path_ambiguity("/public/..%253b/admin"),
            Some("dot-segment-in-path")
        );
        assert_eq!(path_ambiguity("/public/a%3bv=1"), None);
    }

    #[test]
    fn overlong_utf8() {
        for path in [
            "/public/%c0%ae%c0%ae/admin",
            "/public/%C0%AE%C0%AE/admin",
            "/public/..%c0%afadmin",
            "/public/%e0%80%ae%e0%80%ae/admin",
            "/public/%f0%80%80%ae./admin",
            "/public/%f8%80%80%80%ae./admin",
            "/public/..%c1%9cadmin",
            "/public/..%c0%bbx/admin",
            "/public/%c0%80",
            // A decoder that only masks continuation bytes.
            "/public/%c0%6e%c0%6e/admin",
            // Decoded twice first.
            "/public/%25c0%25ae%25c0%25ae/admin",
        ] {
            assert_eq!(
                path_ambiguity(path),
                Some("encoded-path-separator"),
                "{path}"
            );
        }
        // Real UTF-8, and a lead byte that leads nowhere.
        for path in [
            "/wiki/caf%c3%a9",
            "/wiki/%e2%80%a6",
            "/wiki/%f0%9f%98%80",
            "/wiki/%c0",
            "/wiki/%c0x",
            "/wiki/%ff%ae",
        ] {
            assert_eq!(path_ambiguity(path), None, "{path}");
        }
    }

    #[test]
    fn iis_escapes_and_lookalike_separators() {
        for path in [
            "/v1/%u002e%u002e/admin",
            "/v1/%U002F",
            "/v1/%25u002e",
            "/v1/%u0061dmin",
        ] {
            assert_eq!(path_ambiguity(path), Some("unicode-escape"), "{path}");
        }
        for path in [
            "/v1/a\u{ff0f}b",
            "/v1/a%ef%bc%8fb",
            "/v1/a%EF%BC%8Fb",
            "/v1/a%25ef%25bc%258fb",
            "/v1/%e2%88%95admin",
            "/v1/\u{2024}\u{2024}/admin",
            "/v1/%ef%bc%8e%ef%bc%8e/admin",
            "/v1/%ef%bc%bcadmin",
            "/v1/..%cd%be/admin",
            "/v1/100%ef%bc%85",
            "/v1/%EF%B8%B0/x",
            "/v1/%E2%84%85",
            "/v1/a%c2%a5b",
        ] {
            assert_eq!(
                path_ambiguity(path),
                Some("lookalike-path-separator"),
                "{path}"
            );
        }
        // Other non-ASCII names, encoded or not, and a literal `%u` not followed by hex.
        for path in [
            "/wiki/%e6%97%a5%e6%9c%ac",
            "/wiki/日本",
            "/caf%c3%a9",
            "/a%25ub",
        ] {
            assert_eq!(path_ambiguity(path), None, "{path}");
        }
    }

    #[test]
    fn override_parameters() {
        let post = Method::POST;
        for query in [
            "_method=DELETE",
            "a=1&_method=put",
            "%5Fmethod=DELETE",
            "_METHOD=DELETE",
            "_method=",
            "x-http-method-override=PATCH",
            ".method=DELETE",
            "%2Emethod=DELETE",
            "+_method=DELETE",
            "_method%00=DELETE",
            "_method[]=DELETE",
        ] {
            assert_eq!(
                override_parameter(&post, Some(query)),
                Some("override-parameter"),
                "{query}"
            );
        }
        for query in ["_method=post", "method=DELETE", "q=_method%3DDELETE", "a=1"] {
            assert_eq!(override_parameter(&post, Some(query)), None, "{query}");
        }
        assert_eq!(override_parameter(&post, None), None);
        assert_eq!(
            override_parameter(&post, Some("%u0058-HTTP-Method-Override=DELETE")),
            Some("unicode-escape")
        );
    }

    #[test]
    fn override_headers() {
        let with = |name: &str, value: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-kept", "1".parse().unwrap());
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            h
        };
        let get = Method::GET;
        for (name, value) in [
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-HTTP-Method", "PUT"),
            ("X-Method-Override", "POST"),
            ("x-http-method-override", "GET, DELETE"),
            ("x-http-method-override", ""),
            ("X-Original-URL", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("X-Original-Method", "DELETE"),
            // Even naming the request's own path: no rule looked at it.
            ("X-Original-URL", "/public/x"),
        ] {
            assert_eq!(
                refused_header(&get, &with(name, value)),
                Some("override-header"),
                "{name}: {value}"
            );
        }
        assert_eq!(
            refused_header(&get, &with("X-HTTP-Method-Override", "GET")),
            None
        );
        assert_eq!(
            refused_header(&get, &with("X-HTTP-Method-Override", " get ")),
            None
        );
        assert_eq!(
            refused_header(&Method::DELETE, &with("X-HTTP-Method", "DELETE")),
            None
        );
        assert_eq!(refused_header(&get, &with("x-other", "DELETE")), None);
        // A second value overrides as well as the first.
        let mut two = with("X-HTTP-Method-Override", "GET");
        two.append("x-http-method-override", "DELETE".parse().unwrap());
        assert_eq!(refused_header(&get, &two), Some("override-header"));
        for name in ["X_HTTP_Method_Override", "x_api_key", "authorization_"] {
            assert_eq!(
                refused_header(&get, &with(name, "GET")),
                Some("underscore-in-header-name"),
                "{name}"
            );
        }
    }

    #[test]
    fn ambiguous_framing_and_routing_headers() {
        let of = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            ambiguity(&h)
        };
        let one = [
            ("host", "a.test"),
            ("content-length", "1"),
            ("content-type", "x/y"),
        ];
        assert_eq!(of(&one), None);
        assert_eq!(of(&[("transfer-encoding", "chunked")]), None);
        for (twice, reason) in [
            ("content-length", "duplicate-content-length"),
            ("host", "duplicate-host"),
            ("content-type", "duplicate-content-type"),
        ] {
            let mut pairs = one.to_vec();
            pairs.push((twice, "2"));
            assert_eq!(of(&pairs), Some(reason), "{twice}");
        }
        let both = [("content-length", "1"), ("transfer-encoding", "chunked")];
        assert_eq!(of(&both), Some("content-length-and-transfer-encoding"));
    }

    #[test]
    fn the_hop_by_hop_list_and_match_agree() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop_name(name), "{name}");
        }
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert("http2-settings", "AAA".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic x".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        h.append(
            header::CONNECTION,
            "X-Other-Hop , keep-alive".parse().unwrap(),
        );
        h.insert("x-other-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        let mut ws = HeaderMap::new();
        ws.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        ws.insert(header::UPGRADE, "websocket".parse().unwrap());
        ws.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut ws, true);
        assert_eq!(ws.len(), 3);
        assert_eq!(ws[header::UPGRADE], "websocket");
        assert_eq!(ws[header::CONNECTION], "upgrade");
    }
}
