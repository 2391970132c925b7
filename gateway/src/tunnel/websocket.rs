//! WebSocket upgrades: forwarded after the request was checked, turned into a blind pipe only
//! after the upstream answers a real 101 for this handshake.

use base64::Engine as _;
use hyper::{HeaderMap, Response, StatusCode, header, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub use super::ws_scan::{Cut, FrameScan};

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

/// Copies bytes both ways once both sides have switched protocols. With `scan`, what the
/// client sends is read as frames first; when it may not be passed on, both sides are closed
/// and `refused` is told why.
pub fn pipe(
    client: OnUpgrade,
    upstream: OnUpgrade,
    scan: Option<(FrameScan, Refused)>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        let _permit = permit;
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!("websocket upgrade: {e}");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        let Some((scan, refused)) = scan else {
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!("websocket pipe: {e}");
            }
            return;
        };
        let (mut from_client, mut to_client) = tokio::io::split(client);
        let (mut from_upstream, mut to_upstream) = tokio::io::split(upstream);
        let down = async {
            let _ = tokio::io::copy(&mut from_upstream, &mut to_client).await;
            let _ = to_client.shutdown().await;
        };
        let up = scanned_copy(&mut from_client, &mut to_upstream, scan);
        tokio::pin!(down);
        tokio::pin!(up);
        // Both directions run to their end unless the client's is cut; then dropping both
        // halves closes both connections at once.
        tokio::select! {
            cut = &mut up => match cut {
                Some(cut) => refused(cut),
                None => down.await,
            },
            () = &mut down => {
                if let Some(cut) = up.await {
                    refused(cut);
                }
            }
        }
    });
}

/// Told, once, why a WebSocket was cut.
pub type Refused = Box<dyn FnOnce(Cut) + Send>;

/// Copies the client's frames upstream, each read scanned before it is passed on; stops
/// with the reason when one may not be.
async fn scanned_copy<R, W>(from: &mut R, to: &mut W, mut scan: FrameScan) -> Option<Cut>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return None;
            }
            Ok(n) => n,
        };
        if let Err(cut) = scan.feed(&buf[..n]) {
            return Some(cut);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return None;
        }
    }
}
