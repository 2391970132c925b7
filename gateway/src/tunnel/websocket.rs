//! WebSocket upgrades: forwarded after the request was checked, turned into a blind pipe only
//! after the upstream answers a real 101 for this handshake.

use base64::Engine as _;
use hyper::{HeaderMap, Response, StatusCode, header, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use sha1::{Digest as _, Sha1};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub fn is_request(headers: &HeaderMap) -> bool {
    let has = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// True when the upstream's answer completes this client's handshake (RFC 6455 4.2.2).
pub fn accepted<B>(request: &HeaderMap, resp: &Response<B>) -> bool {
    let Some(key) = request.get(header::SEC_WEBSOCKET_KEY) else {
        return false;
    };
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && resp
            .headers()
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|v| v.as_bytes() == want.as_bytes())
}

/// Copies bytes both ways once both sides have switched protocols.
pub fn pipe(client: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!("websocket upgrade: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!("websocket pipe: {e}");
        }
    });
}
