//! A spliced (passthrough) session's handshake, watched until the name the upstream acts on
//! is known to be the one checked. A TLS 1.3 server may answer the first ClientHello with a
//! HelloRetryRequest, after which the client sends a second ClientHello and the server reads
//! its SNI again (RFC 8446, 4.1.2 says it must not change; a server need not check). So the
//! client's bytes after its first ClientHello are held until the server's first ServerHello
//! shows whether it is a retry, and after a retry the second ClientHello is checked as the
//! first was, by rustls. (An attacker need not wait for the retry: the second ClientHello
//! may come right behind the first, which is why nothing after the first passes unjudged.)
//!
//! Only the record layer (RFC 8446, 5.1: type, version, 16-bit length) and the ServerHello's
//! fixed head (4.1.3: type, length, version, random) are read here; ClientHellos are parsed
//! by rustls. What a server does after the handshake (TLS 1.2 renegotiation, encrypted) or
//! inside an Encrypted ClientHello cannot be seen in a splice.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The ServerHello random that marks a HelloRetryRequest (RFC 8446, 4.1.3).
const RETRY_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

const HANDSHAKE: u8 = 22;
const CHANGE_CIPHER_SPEC: u8 = 20;
const APPLICATION_DATA: u8 = 23;
const SERVER_HELLO: u8 = 2;

/// Client bytes held while the server has not answered: more is no handshake.
const MAX_HELD: usize = 128 * 1024;

/// Why a session is cut during its handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// A second ClientHello names another host than the one checked.
    SniMismatch,
    /// Not the TLS the first ClientHello began.
    NotTls,
    /// Either side closed or failed: nothing to record.
    Closed,
}

/// Whole records at the front of a byte stream.
#[derive(Default)]
struct Records {
    buf: Vec<u8>,
}

impl Records {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole record: its type and the record's bytes, header included.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        let len = u16::from_be_bytes([*self.buf.get(3)?, *self.buf.get(4)?]) as usize;
        if self.buf.len() < 5 + len {
            return None;
        }
        let record: Vec<u8> = self.buf.drain(..5 + len).collect();
        Some((record[0], record))
    }
}

/// Where the first ClientHello ends in `seen` (the bytes read before it was judged): after
/// the record that completes it. `None` when that record carries more than the ClientHello,
/// which no client sends.
pub fn first_hello_end(seen: &[u8]) -> Option<usize> {
    let mut records = Records::default();
    records.push(seen);
    let (mut at, mut message) = (0, Vec::new());
    while let Some((kind, record)) = records.next() {
        at += record.len();
        if kind != HANDSHAKE {
            return None;
        }
        message.extend_from_slice(&record[5..]);
        if message.len() < 4 {
            continue;
        }
        let whole = 4 + u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
        return match message.len().cmp(&whole) {
            std::cmp::Ordering::Less => continue,
            std::cmp::Ordering::Equal => Some(at),
            std::cmp::Ordering::Greater => None,
        };
    }
    None
}

/// What the server's first handshake bytes say, once there are enough of them.
enum ServerSaid {
    NotYet,
    Retry,
    /// A ServerHello that is no retry, or anything else: the first ClientHello stands.
    Proceed,
}

#[derive(Default)]
struct ServerWatch {
    records: Records,
    handshake: Vec<u8>,
}

impl ServerWatch {
    fn feed(&mut self, bytes: &[u8]) -> ServerSaid {
        self.records.push(bytes);
        while let Some((kind, record)) = self.records.next() {
            match kind {
                HANDSHAKE => self.handshake.extend_from_slice(&record[5..]),
                // Encrypted: the handshake went on without a retry.
                APPLICATION_DATA => return ServerSaid::Proceed,
                // A middlebox-compatibility ChangeCipherSpec, or an alert that ends it all.
                _ => continue,
            }
            // type (1), length (3), legacy_version (2), random (32)
            if let Some(head) = self.handshake.get(..38) {
                return if head[0] == SERVER_HELLO && head[6..38] == RETRY_RANDOM {
                    ServerSaid::Retry
                } else {
                    ServerSaid::Proceed
                };
            }
        }
        ServerSaid::NotYet
    }
}

/// After a retry: the client's held bytes must bring a second ClientHello whose SNI passes
/// `sni_ok` before anything else of the handshake.
struct RetryWatch {
    records: Records,
    acceptor: rustls::server::Acceptor,
}

impl RetryWatch {
    fn new() -> Self {
        Self {
            records: Records::default(),
            acceptor: rustls::server::Acceptor::default(),
        }
    }

    /// `Ok(true)` once the second ClientHello passed, `Ok(false)` while it is incomplete.
    fn feed(
        &mut self,
        bytes: &[u8],
        sni_ok: &(dyn Fn(Option<&str>) -> bool + Sync),
    ) -> Result<bool, Refused> {
        self.records.push(bytes);
        while let Some((kind, record)) = self.records.next() {
            match kind {
                HANDSHAKE => {}
                // The compatibility ChangeCipherSpec, and 0-RTT data the retry discarded.
                CHANGE_CIPHER_SPEC | APPLICATION_DATA => continue,
                _ => return Err(Refused::NotTls),
            }
            let mut rest = &record[..];
            while !rest.is_empty() {
                self.acceptor
                    .read_tls(&mut rest)
                    .map_err(|_| Refused::NotTls)?;
            }
            match self.acceptor.accept() {
                Ok(None) => continue,
                Ok(Some(accepted)) => {
                    return if sni_ok(accepted.client_hello().server_name()) {
                        Ok(true)
                    } else {
                        Err(Refused::SniMismatch)
                    };
                }
                Err(_) => return Err(Refused::NotTls),
            }
        }
        Ok(false)
    }
}

/// Sends the first ClientHello (`seen[..hello_end]`), then relays the server's bytes while
/// holding the client's until the server's first ServerHello: a retry makes the second
/// ClientHello pass `sni_ok` before anything held goes. Returns once the handshake can be
/// spliced without looking further, or `Err` with why the session is cut (nothing held has
/// then gone upstream).
pub async fn open<C, U>(
    client: &mut C,
    up: &mut U,
    seen: &[u8],
    hello_end: usize,
    sni_ok: &(dyn Fn(Option<&str>) -> bool + Sync),
) -> Result<(), Refused>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let closed = |_| Refused::Closed;
    up.write_all(&seen[..hello_end]).await.map_err(closed)?;
    let mut held = seen[hello_end..].to_vec();
    let mut server = ServerWatch::default();
    let mut retry: Option<RetryWatch> = None;
    let (mut from_up, mut from_client) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    loop {
        tokio::select! {
            n = up.read(&mut from_up) => {
                let n = n.map_err(closed)?;
                if n == 0 {
                    // The server ended it: nothing held needs to go.
                    return Ok(());
                }
                client.write_all(&from_up[..n]).await.map_err(closed)?;
                if retry.is_some() {
                    continue;
                }
                match server.feed(&from_up[..n]) {
                    ServerSaid::NotYet => continue,
                    ServerSaid::Proceed => break,
                    ServerSaid::Retry => {
                        let mut watch = RetryWatch::new();
                        if watch.feed(&held, sni_ok)? {
                            break;
                        }
                        retry = Some(watch);
                    }
                }
            }
            n = client.read(&mut from_client) => {
                let n = n.map_err(closed)?;
                if n == 0 {
                    return Err(Refused::Closed);
                }
                let fresh = &from_client[..n];
                held.extend_from_slice(fresh);
                if held.len() > MAX_HELD {
                    return Err(Refused::NotTls);
                }
                if let Some(watch) = retry.as_mut()
                    && watch.feed(fresh, sni_ok)?
                {
                    break;
                }
            }
        }
    }
    up.write_all(&held).await.map_err(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn the_first_hello_ends_with_the_record_that_completes_it() {
        let hello = handshake(1, &[7; 100]);
        let whole = record(HANDSHAKE, &hello);
        let mut seen = whole.clone();
        seen.extend_from_slice(&record(CHANGE_CIPHER_SPEC, &[1]));
        assert_eq!(first_hello_end(&seen), Some(whole.len()));
        // Split over two records.
        let mut split = record(HANDSHAKE, &hello[..30]);
        split.extend_from_slice(&record(HANDSHAKE, &hello[30..]));
        assert_eq!(first_hello_end(&split), Some(split.len()));
        // A record that carries more than the hello: refused.
        let mut two = hello.clone();
        two.extend_from_slice(&handshake(1, &[8; 10]));
        assert_eq!(first_hello_end(&record(HANDSHAKE, &two)), None);
    }

    #[test]
    fn a_retry_is_told_from_a_server_hello() {
        let mut retry_body = vec![3, 3];
        retry_body.extend_from_slice(&RETRY_RANDOM);
        retry_body.extend_from_slice(&[0; 10]);
        let retry = record(HANDSHAKE, &handshake(SERVER_HELLO, &retry_body));
        // Byte by byte, as a server might send it.
        let mut watch = ServerWatch::default();
        let said: Vec<bool> = retry
            .iter()
            .map(|b| matches!(watch.feed(&[*b]), ServerSaid::Retry))
            .collect();
        assert_eq!(said.iter().filter(|r| **r).count(), 1);
        let mut plain_body = vec![3, 3];
        plain_body.extend_from_slice(&[9; 32]);
        plain_body.extend_from_slice(&[0; 10]);
        let plain = record(HANDSHAKE, &handshake(SERVER_HELLO, &plain_body));
        assert!(matches!(
            ServerWatch::default().feed(&plain),
            ServerSaid::Proceed
        ));
    }
}
