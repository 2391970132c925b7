//! Header rules at the boundary: what is ambiguous (refused), what is hop-by-hop (dropped).

use hyper::{
    HeaderMap,
    header::{self, HeaderName},
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
pub fn path_ambiguity(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    if ["%5c", "%00", "%2e"].iter().any(|e| lower.contains(e)) || path.contains('\\') {
        return Some("encoded-path-separator");
    }
    let dot_segment = |p: &str| p.split('/').any(|seg| seg == "." || seg == "..");
    if dot_segment(path) || (lower.contains("%2f") && dot_segment(&lower.replace("%2f", "/"))) {
        return Some("dot-segment-in-path");
    }
    if !path.starts_with('/') && path != "*" {
        return Some("relative-path");
    }
    None
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, those the Connection header names, `Upgrade` (kept only for a
/// WebSocket request) and `HTTP2-Settings` (h2c is never forwarded).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_websocket_upgrade: bool) {
    let mut drop: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    // One pass over the (few) names present instead of a lookup per hop-by-hop name: this
    // runs on every request and response.
    drop.extend(
        headers
            .keys()
            .filter(|k| {
                HOP_BY_HOP.contains(k) || *k == header::UPGRADE || k.as_str() == "http2-settings"
            })
            .cloned(),
    );
    for name in &drop {
        headers.remove(name);
    }
    if keep_websocket_upgrade {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        headers.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
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
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
