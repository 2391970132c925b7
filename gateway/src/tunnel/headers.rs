//! Header rules at the boundary: what is ambiguous (refused), what is hop-by-hop (dropped).

use hyper::{
    HeaderMap,
    header::{self, HeaderName, HeaderValue},
};

/// Why a request is refused with 400 before any rule is consulted.
pub fn ambiguity(headers: &HeaderMap) -> Option<&'static str> {
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Some("duplicate-content-length");
    }
    if lengths == 1 && headers.contains_key(header::TRANSFER_ENCODING) {
        return Some("content-length-and-transfer-encoding");
    }
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Some("duplicate-host");
    }
    None
}

/// Why a path is refused: dot segments, encoded dots or backslashes, NUL — anything an
/// upstream could resolve to a path other than the one the rule was matched against. An
/// encoded `/` is allowed (npm names scoped packages `/@scope%2fname`): rules match the path
/// as sent, where it stays inside one segment, and dot segments are looked for with it
/// decoded as well, so `/a%2f..%2fadmin` is refused whichever way the upstream reads it.
/// Servers that decode twice are covered by looking again with `%25` decoded once, and
/// servers that take `;` as the start of a segment's parameters (`..;/`) by ignoring them.
pub fn path_ambiguity(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    let twice = lower.contains("%25").then(|| lower.replace("%25", "%"));
    let encoded = |p: &str| ["%5c", "%00", "%2e"].iter().any(|e| p.contains(e));
    if encoded(&lower) || twice.as_deref().is_some_and(encoded) || path.contains('\\') {
        return Some("encoded-path-separator");
    }
    let dot_segment = |p: &str| {
        p.split('/')
            .any(|seg| matches!(seg.split(';').next(), Some("." | "..")))
    };
    let hides_dots = |p: &str| p.contains("%2f") && dot_segment(&p.replace("%2f", "/"));
    if dot_segment(path) || hides_dots(&lower) || twice.as_deref().is_some_and(hides_dots) {
        return Some("dot-segment-in-path");
    }
    if !path.starts_with('/') && path != "*" {
        return Some("relative-path");
    }
    None
}

/// Hop-by-hop headers, `Upgrade` (kept only for a WebSocket request, which sets it anew)
/// and `HTTP2-Settings` (h2c is never forwarded).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
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

/// Removes hop-by-hop headers, those the Connection header names, `Upgrade` (kept only for a
/// WebSocket request) and `HTTP2-Settings` (h2c is never forwarded).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_websocket_upgrade: bool) {
    // This runs on every request and response: it allocates nothing unless a message has
    // several Connection headers, and the names Connection lists are removed as text (no
    // HeaderName is made).
    let mut values = headers.get_all(header::CONNECTION).iter();
    let first = values.next().cloned();
    let more: Vec<HeaderValue> = values.cloned().collect();
    for value in first.iter().chain(&more) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for name in value.split(',') {
            headers.remove(name.trim());
        }
    }
    // One name at a time, so that nothing is collected: usually there is one (Connection),
    // and there are at most as many passes as hop-by-hop names.
    while let Some(name) = headers.keys().find(|k| is_hop_by_hop(k)).cloned() {
        headers.remove(&name);
    }
    if keep_websocket_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(path_ambiguity("/repos/acme/x"), None);
        assert!(path_ambiguity("/repos/acme/../admin").is_some());
        assert!(path_ambiguity("/repos/acme/%2e%2e/admin").is_some());
        assert_eq!(path_ambiguity("/@types%2fnode"), None);
        assert!(path_ambiguity("/a%2F..%2Fadmin").is_some());
        assert!(path_ambiguity("/a%5cb").is_some());
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
