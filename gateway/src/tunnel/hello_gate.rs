//! A spliced (passthrough) session's handshake, watched until the name the upstream acts on
//! is known to be the one checked. A TLS 1.3 server may answer the first ClientHello with a
//! HelloRetryRequest, after which the client sends a second ClientHello and the server reads
//! its SNI again (RFC 8446, 4.1.2 says it must not change; a server need not check). So the
//! client's bytes after its first ClientHello are held until the server's first ServerHello
//! shows whether it is a retry, and after a retry the second ClientHello is checked as the
//! first was. (An attacker need not wait for the retry: the second ClientHello may come
//! right behind the first, which is why nothing after the first passes unjudged.)
//!
//! Only the record layer (RFC 8446, 5.1: type, version, 16-bit length) and the ServerHello's
//! fixed head (4.1.3: type, length, version, random) are read here; ClientHellos are parsed
//! by rustls, and their extension list and names as sent by tls-parser (rustls shows
//! neither). What a server does after the handshake (TLS 1.2 renegotiation, encrypted)
//! cannot be seen in a splice; an Encrypted ClientHello is refused, since its inner name
//! cannot be.

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
    /// A ClientHello with an encrypted inner one (ECH) or an encrypted name (ESNI).
    EncryptedHello,
    /// Either side closed or failed: nothing to record.
    Closed,
}

impl Refused {
    /// The audit reason of a refusal the tunnel records; `None` for a side that closed.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Refused::SniMismatch => Some("sni-mismatch"),
            Refused::NotTls => Some("not-tls"),
            Refused::EncryptedHello => Some("encrypted-client-hello"),
            Refused::Closed => None,
        }
    }
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

/// Where the first ClientHello ends in `seen` (the bytes read before it was judged), after
/// the record that completes it, and its handshake message, joined from its records.
/// `None` when that record carries more than the ClientHello, which no client sends.
pub fn first_hello(seen: &[u8]) -> Option<(usize, Vec<u8>)> {
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
            std::cmp::Ordering::Equal => Some((at, message)),
            std::cmp::Ordering::Greater => None,
        };
    }
    None
}

/// ECH (RFC 9849) and the ESNI draft before it: the name the server acts on travels
/// encrypted, where no check can see it.
const ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const ENCRYPTED_SERVER_NAME: u16 = 0xffce;
const SERVER_NAME: u16 = 0;

/// Judges a ClientHello (its whole handshake message) for a splice to `host` (canonical:
/// lower case, no trailing dot): the name the upstream acts on must be the one checked,
/// spelled as checked. For an IP address no `server_name` at all may come, since a server
/// that routes by name would follow one; for a name, exactly one, `host` in any case and
/// without a trailing dot, so that a front comparing names as written routes where the
/// rule meant. (rustls, which read the hello first, gives neither an IP address nor a
/// trailing dot.) A ClientHello with an encrypted inner one is refused whatever it says
/// outside: a front that decrypts it (a CDN) serves the inner name, any site it hosts.
/// Clients that send ECH only as GREASE (browsers) are refused too: GREASE cannot be told
/// from the real thing, by design.
pub fn judge_splice(message: &[u8], host: &str) -> Result<(), Refused> {
    let hello = read_hello(message).ok_or(Refused::NotTls)?;
    if hello
        .types
        .iter()
        .any(|&t| t == ENCRYPTED_CLIENT_HELLO || t == ENCRYPTED_SERVER_NAME)
    {
        return Err(Refused::EncryptedHello);
    }
    let ip = host.parse::<std::net::IpAddr>().is_ok();
    let fits = match hello.names.as_slice() {
        [] => ip && !hello.types.contains(&SERVER_NAME),
        [name] => !ip && name.eq_ignore_ascii_case(host.as_bytes()),
        _ => false,
    };
    fits.then_some(()).ok_or(Refused::SniMismatch)
}

/// What a splice judges of a ClientHello.
struct Hello {
    /// Extension types, in order.
    types: Vec<u16>,
    /// The `server_name` extension's names, as sent.
    names: Vec<Vec<u8>>,
}

/// `None` when `message` is not one whole ClientHello whose extensions tls-parser reads to
/// the last byte.
fn read_hello(message: &[u8]) -> Option<Hello> {
    use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake};
    let (rest, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))) =
        tls_parser::parse_tls_message_handshake(message).ok()?
    else {
        return None;
    };
    if !rest.is_empty() {
        return None;
    }
    let mut out = Hello {
        types: Vec::new(),
        names: Vec::new(),
    };
    let mut left = hello.ext.unwrap_or_default();
    while !left.is_empty() {
        let (after, TlsExtension::Unknown(kind, data)) =
            tls_parser::parse_tls_extension_unknown(left).ok()?
        else {
            return None;
        };
        if kind.0 == SERVER_NAME {
            let (rest, TlsExtension::SNI(names)) =
                tls_parser::parse_tls_extension_sni_content(data).ok()?
            else {
                return None;
            };
            if !rest.is_empty() {
                return None;
            }
            out.names
                .extend(names.into_iter().map(|(_, name)| name.to_vec()));
        }
        out.types.push(kind.0);
        left = after;
    }
    Some(out)
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

/// After a retry: the client's held bytes must bring a second ClientHello that passes the
/// same judge as the first before anything else of the handshake.
struct RetryWatch {
    records: Records,
    acceptor: rustls::server::Acceptor,
    /// The second ClientHello's handshake message so far.
    message: Vec<u8>,
}

/// Judges a ClientHello by its handshake message.
pub type Judge<'a> = dyn Fn(&[u8]) -> Result<(), Refused> + Sync + 'a;

impl RetryWatch {
    fn new() -> Self {
        Self {
            records: Records::default(),
            acceptor: rustls::server::Acceptor::default(),
            message: Vec::new(),
        }
    }

    /// `Ok(true)` once the second ClientHello passed, `Ok(false)` while it is incomplete.
    fn feed(&mut self, bytes: &[u8], judge: &Judge<'_>) -> Result<bool, Refused> {
        self.records.push(bytes);
        while let Some((kind, record)) = self.records.next() {
            match kind {
                HANDSHAKE => {}
                // The compatibility ChangeCipherSpec, and 0-RTT data the retry discarded.
                CHANGE_CIPHER_SPEC | APPLICATION_DATA => continue,
                _ => return Err(Refused::NotTls),
            }
            self.message.extend_from_slice(&record[5..]);
            let mut rest = &record[..];
            while !rest.is_empty() {
                self.acceptor
                    .read_tls(&mut rest)
                    .map_err(|_| Refused::NotTls)?;
            }
            match self.acceptor.accept() {
                Ok(None) => continue,
                // rustls read it whole and found it sound; the judge reads what it says.
                Ok(Some(_)) => {
                    judge(&self.message)?;
                    return Ok(true);
                }
                Err(_) => return Err(Refused::NotTls),
            }
        }
        Ok(false)
    }
}

/// Sends the first ClientHello (`seen[..hello_end]`), then relays the server's bytes while
/// holding the client's until the server's first ServerHello: a retry makes the second
/// ClientHello pass `judge` before anything held goes. Returns once the handshake can be
/// spliced without looking further, or `Err` with why the session is cut (nothing held has
/// then gone upstream).
pub async fn open<C, U>(
    client: &mut C,
    up: &mut U,
    seen: &[u8],
    hello_end: usize,
    judge: &Judge<'_>,
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
                    // The server ended it before any ServerHello: no session can follow,
                    // and a splice would relay the client's later bytes (another
                    // ClientHello among them) unjudged to whatever still reads them.
                    return Err(Refused::Closed);
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
                        if watch.feed(&held, judge)? {
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
                    && watch.feed(fresh, judge)?
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
        let end = |seen: &[u8]| first_hello(seen).map(|(end, _)| end);
        assert_eq!(end(&seen), Some(whole.len()));
        assert_eq!(first_hello(&seen).unwrap().1, hello);
        // Split over two records.
        let mut split = record(HANDSHAKE, &hello[..30]);
        split.extend_from_slice(&record(HANDSHAKE, &hello[30..]));
        assert_eq!(end(&split), Some(split.len()));
        assert_eq!(first_hello(&split).unwrap().1, hello);
        // A record that carries more than the hello: refused.
        let mut two = hello.clone();
        two.extend_from_slice(&handshake(1, &[8; 10]));
        assert_eq!(end(&record(HANDSHAKE, &two)), None);
    }

    /// rustls's own ClientHello for `name`, as a handshake message.
    fn client_hello(name: &str) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        first_hello(&wire).unwrap().1
    }

    /// A ClientHello naming `sni` as written, which rustls would not send (a trailing dot).
    fn hand_hello(sni: &str) -> Vec<u8> {
        let name = sni.as_bytes();
        let mut list = vec![0];
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
        let mut sni_ext = (list.len() as u16).to_be_bytes().to_vec();
        sni_ext.extend_from_slice(&list);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(4 + sni_ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&sni_ext);
        handshake(1, &body)
    }

    /// `message` with one more extension at the end of its list, lengths mended.
    fn with_extension(message: &[u8], kind: u16, data: &[u8]) -> Vec<u8> {
        let mut added = kind.to_be_bytes().to_vec();
        added.extend_from_slice(&(data.len() as u16).to_be_bytes());
        added.extend_from_slice(data);
        let body = &message[4..];
        // version (2), random (32), session id, cipher suites, compression methods
        let sid = 34 + 1 + usize::from(body[34]);
        let suites = sid + 2 + usize::from(u16::from_be_bytes([body[sid], body[sid + 1]]));
        let exts = suites + 1 + usize::from(body[suites]);
        let old = usize::from(u16::from_be_bytes([body[exts], body[exts + 1]]));
        let mut out = body[..exts].to_vec();
        out.extend_from_slice(&((old + added.len()) as u16).to_be_bytes());
        out.extend_from_slice(&body[exts + 2..]);
        out.extend_from_slice(&added);
        let mut message = vec![1];
        message.extend_from_slice(&(out.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&out);
        message
    }

    #[test]
    fn a_spliced_hello_names_the_checked_host_as_checked_and_nothing_encrypted() {
        let hello = client_hello("api.test");
        assert_eq!(judge_splice(&hello, "api.test"), Ok(()));
        assert_eq!(
            judge_splice(&hello, "other.test"),
            Err(Refused::SniMismatch)
        );
        // Toward an address, no name at all may come.
        assert_eq!(judge_splice(&hello, "127.0.0.1"), Err(Refused::SniMismatch));
        let bare = client_hello("127.0.0.1");
        assert_eq!(judge_splice(&bare, "127.0.0.1"), Ok(()));
        assert_eq!(judge_splice(&bare, "api.test"), Err(Refused::SniMismatch));
        // The name as sent: in any case, but with no trailing dot (rustls reads both away).
        let upper = client_hello("API.test");
        assert_eq!(judge_splice(&upper, "api.test"), Ok(()));
        let dotted = hand_hello("api.test.");
        assert_eq!(judge_splice(&dotted, "api.test"), Err(Refused::SniMismatch));
        assert_eq!(judge_splice(&hand_hello("api.test"), "api.test"), Ok(()));
        for kind in [ENCRYPTED_CLIENT_HELLO, ENCRYPTED_SERVER_NAME] {
            let sealed = with_extension(&hello, kind, &[0, 1, 2, 3]);
            assert_eq!(
                judge_splice(&sealed, "api.test"),
                Err(Refused::EncryptedHello),
                "{kind:#x}"
            );
        }
        // Another extension changes nothing; a list that does not parse to its end refuses.
        let other = with_extension(&hello, 0x7777, &[1]);
        assert_eq!(judge_splice(&other, "api.test"), Ok(()));
        let mut cut = other.clone();
        cut.truncate(cut.len() - 1);
        assert_eq!(judge_splice(&cut, "api.test"), Err(Refused::NotTls));
    }

    #[tokio::test]
    async fn an_upstream_that_ends_before_its_server_hello_ends_the_session() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let hello = record(HANDSHAKE, &handshake(1, &[7; 50]));
        let (mut client, _sandbox) = tokio::io::duplex(64 * 1024);
        let (mut up, mut server) = tokio::io::duplex(64 * 1024);
        let len = hello.len();
        let upstream = tokio::spawn(async move {
            let mut got = vec![0; len];
            server.read_exact(&mut got).await.unwrap();
            // Half-closed: it sends nothing more, and would still read what came.
            server.shutdown().await.unwrap();
            server
        });
        let opened = open(&mut client, &mut up, &hello, len, &|_| Ok(())).await;
        assert_eq!(opened, Err(Refused::Closed));
        drop(upstream.await.unwrap());
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
