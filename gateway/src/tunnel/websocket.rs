//! WebSocket upgrades: forwarded after the request was checked, turned into a pipe only after
//! the upstream answers a real 101 for this handshake. The pipe is blind unless a direction
//! may carry what must not pass: placeholders up, the attached credential's secret down.

use base64::Engine as _;
use hyper::{HeaderMap, Response, StatusCode, header, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub use super::{
    ws_echo::EchoScan,
    ws_scan::{Cut, FrameScan},
};

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

/// What is read of a WebSocket's frames before they are passed on, and who is told, once,
/// why the WebSocket was cut.
pub struct Scans {
    /// The client's frames, for placeholders of credentials this host's rule does not name.
    pub up: Option<FrameScan>,
    /// The upstream's frames, for the secret of the credential attached toward it.
    pub down: Option<EchoScan>,
    pub refused: Refused,
}

/// Copies bytes both ways once both sides have switched protocols. With `scans`, a direction
/// that has a scan is read as frames first; when what it carries may not be passed on, both
/// sides are closed and `refused` is told why. Without, the bytes are copied unread.
pub fn pipe(
    client: OnUpgrade,
    upstream: OnUpgrade,
    scans: Option<Scans>,
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
        let Some(Scans { up, down, refused }) = scans else {
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!("websocket pipe: {e}");
            }
            return;
        };
        let (mut from_client, mut to_client) = tokio::io::split(client);
        let (mut from_upstream, mut to_upstream) = tokio::io::split(upstream);
        let up = async {
            match up {
                Some(scan) => scanned_copy(&mut from_client, &mut to_upstream, scan).await,
                None => plain_copy(&mut from_client, &mut to_upstream).await,
            }
        };
        let down = async {
            match down {
                Some(scan) => scanned_copy(&mut from_upstream, &mut to_client, scan).await,
                None => plain_copy(&mut from_upstream, &mut to_client).await,
            }
        };
        tokio::pin!(up);
        tokio::pin!(down);
        // Both directions run to their end unless one is cut; then dropping both halves
        // closes both connections at once.
        let cut = tokio::select! {
            cut = &mut up => match cut {
                Some(cut) => Some(cut),
                None => down.await,
            },
            cut = &mut down => match cut {
                Some(cut) => Some(cut),
                None => up.await,
            },
        };
        if let Some(cut) = cut {
            refused(cut);
        }
    });
}

/// Told, once, why a WebSocket was cut.
pub type Refused = Box<dyn FnOnce(Cut) + Send>;

/// Copies one direction unread, then passes its end on.
async fn plain_copy<R, W>(from: &mut R, to: &mut W) -> Option<Cut>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::io::copy(from, to).await;
    let _ = to.shutdown().await;
    None
}

/// A direction's reader: given each read, what of it may be relayed now, or why the pipe is
/// cut.
trait Relay {
    fn relayable<'a>(&'a mut self, read: &'a [u8]) -> Result<&'a [u8], Cut>;
}

/// The client's frames: each read is passed on whole once scanned.
impl Relay for FrameScan {
    fn relayable<'a>(&'a mut self, read: &'a [u8]) -> Result<&'a [u8], Cut> {
        self.feed(read).map(|()| read)
    }
}

/// The upstream's frames: relayed as far as each read shows they do not carry the secret.
/// Bytes still held back when the upstream ends are an unfinished frame: never relayed.
impl Relay for EchoScan {
    fn relayable<'a>(&'a mut self, read: &'a [u8]) -> Result<&'a [u8], Cut> {
        self.feed(read)
    }
}

/// Copies one direction through its reader; stops with the reason when a read may not be
/// relayed.
async fn scanned_copy<R, W>(from: &mut R, to: &mut W, mut scan: impl Relay) -> Option<Cut>
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
        let relayed = match scan.relayable(&buf[..n]) {
            Ok(relayed) => relayed,
            Err(cut) => return Some(cut),
        };
        if !relayed.is_empty() && to.write_all(relayed).await.is_err() {
            return None;
        }
    }
}
