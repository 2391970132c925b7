//! Stream wrappers around what clients send.
//!
//! `HeadGuard` closes a connection whose request head hyper's lenient parser would accept but
//! another parser could read differently: bare LF or bare CR line ends, obs-fold continuation
//! lines, two Content-Lengths, Content-Length with Transfer-Encoding (hyper silently picks
//! one). hyper still parses every request; the guard only follows the byte stream far enough
//! to know where each head starts: after a head with Content-Length it skips that many body
//! bytes, after one with no body it checks the next head, and after a chunked, upgrade or
//! CONNECT request it stops, because the tunnel closes such connections after the response
//! (`closes_connection`) or hands them over to a tunnel of their own.
//! `Prefixed` replays bytes already read (a TLS ClientHello) in front of a stream.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Enough of a header line to read its name and a Content-Length value.
const KEEP: usize = 256;

#[derive(Default)]
struct Head {
    cr: bool,
    request_line_seen: bool,
    content_lengths: usize,
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// CONNECT or Upgrade: the stream stops being HTTP after this head.
    switches: bool,
}

enum State {
    Head(Head),
    Body(u64),
    /// Past the last head this connection will carry.
    Done,
}

pub struct HeadGuard<S> {
    inner: S,
    state: State,
    /// The start of the current header line (at most [`KEEP`] bytes), kept across lines
    /// and heads so that its buffer is allocated once per connection.
    line: Vec<u8>,
    /// Whether part of a request head has arrived and the rest not yet: when hyper's header
    /// timer fires, a slow head (refused) rather than an idle keep-alive connection (closed).
    mid_head: Arc<AtomicBool>,
}

impl<S> HeadGuard<S> {
    pub fn new(inner: S, mid_head: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            state: State::Head(Head::default()),
            line: Vec::new(),
            mid_head,
        }
    }

    fn scan(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Body(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Head::default());
                    }
                }
                State::Head(head) => {
                    let (used, next) = head.feed(bytes, &mut self.line)?;
                    bytes = &bytes[used..];
                    if let Some(next) = next {
                        self.state = next;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Head {
    /// Takes bytes up to the end of the head (a line at a time, not a byte at a time: this
    /// runs on every read of every client connection); returns how many it took and, when
    /// the head ended, the next state.
    fn feed(&mut self, bytes: &[u8], line: &mut Vec<u8>) -> io::Result<(usize, Option<State>)> {
        let mut at = 0;
        while at < bytes.len() {
            if self.cr {
                if bytes[at] != b'\n' {
                    return Err(ambiguous("CR without LF"));
                }
                self.cr = false;
                at += 1;
                let next = self.end_line(line);
                line.clear();
                if let Some(next) = next? {
                    return Ok((at, Some(next)));
                }
                continue;
            }
            let rest = &bytes[at..];
            let text = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            let room = KEEP.saturating_sub(line.len());
            line.extend_from_slice(&rest[..text.min(room)]);
            at += text;
            match rest.get(text) {
                Some(b'\n') => return Err(ambiguous("bare LF line end")),
                Some(_) => {
                    self.cr = true;
                    at += 1;
                }
                None => {}
            }
        }
        Ok((at, None))
    }

    fn end_line(&mut self, line: &[u8]) -> io::Result<Option<State>> {
        if !self.request_line_seen {
            // Empty lines before a request line are tolerated by RFC 9112.
            if !line.is_empty() {
                self.request_line_seen = true;
                self.switches |= line.starts_with(b"CONNECT ");
            }
            return Ok(None);
        }
        if line.is_empty() {
            return self.end_head().map(Some);
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(ambiguous("obs-fold continuation line"));
        }
        let Some(colon) = line.iter().position(|&c| c == b':') else {
            return Ok(None); // hyper refuses it
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            // One plain number, as the guard reads it: a list (`30, 30`) or a number too long
            // for the kept line (hyper takes zero-padding of any length) would leave the
            // guard reading the body as the next head.
            let plain = line.len() < KEEP
                && (1..=19).contains(&value.len())
                && value.iter().all(u8::is_ascii_digit);
            if !plain {
                return Err(ambiguous("Content-Length that is not one plain number"));
            }
            self.content_lengths += 1;
            self.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.switches = true;
        }
        Ok(None)
    }

    fn end_head(&self) -> io::Result<State> {
        if self.content_lengths > 1 {
            return Err(ambiguous("two Content-Length headers"));
        }
        if self.content_lengths == 1 && self.transfer_encoding {
            return Err(ambiguous("Content-Length with Transfer-Encoding"));
        }
        if self.switches || self.transfer_encoding {
            return Ok(State::Done);
        }
        Ok(match self.content_length {
            Some(n) if n > 0 => State::Body(n),
            _ => State::Head(Head::default()),
        })
    }
}

/// Requests after which the connection is closed, so that no head goes unchecked.
pub fn closes_connection(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key(hyper::header::TRANSFER_ENCODING)
        || headers.contains_key(hyper::header::UPGRADE)
}

fn ambiguous(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("ambiguous request head: {what}"),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for HeadGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res
            && !matches!(self.state, State::Done)
        {
            self.scan(&buf.filled()[before..])?;
            let mid_head = match &self.state {
                State::Head(head) => head.request_line_seen || head.cr || !self.line.is_empty(),
                State::Body(_) | State::Done => false,
            };
            self.mid_head.store(mid_head, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(stream: &[u8]) -> io::Result<()> {
        HeadGuard::new((), Arc::default()).scan(stream)
    }

    #[test]
    fn strict_heads() {
        assert!(check(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n").is_ok());
        assert!(check(b"GET http://a/ HTTP/1.1\nHost: a\r\n\r\n").is_err());
        assert!(check(b"GET http://a/ HTTP/1.1\r\nHost: a\n\n").is_err());
        assert!(check(b"GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n").is_err());
        assert!(check(b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n").is_err());
        let cl_te =
            b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(check(cl_te).is_err());
        let two_cl =
            b"POST http://a/ HTTP/1.1\r\ncontent-length: 3\r\nContent-Length: 3\r\n\r\nabc";
        assert!(check(two_cl).is_err());
        let cl = |v: &str| format!("POST http://a/ HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
        assert!(check(cl("030").as_bytes()).is_ok());
        assert!(check(cl("3, 3").as_bytes()).is_err());
        assert!(check(cl("+3").as_bytes()).is_err());
        assert!(check(cl("").as_bytes()).is_err());
        assert!(check(cl(&format!("{}3", "0".repeat(250))).as_bytes()).is_err());
    }

    /// The same verdict whichever reads the stream arrives in.
    #[test]
    fn split_reads() {
        let streams: [&[u8]; 6] = [
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nGET http://a/ HTTP/1.1\r\n\r\n",
            b"POST http://a/ HTTP/1.1\r\nContent-Length: 2\r\n\r\n\n\nGET http://a/ HTTP/1.1\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\nGET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\nX: a\r\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\nPOST http://a/ HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n\n\n\r",
        ];
        for stream in streams {
            let whole = check(stream).is_ok();
            for at in 0..=stream.len() {
                let mut guard = HeadGuard::new((), Arc::default());
                let split = guard
                    .scan(&stream[..at])
                    .and_then(|()| guard.scan(&stream[at..]));
                assert_eq!(split.is_ok(), whole, "{stream:?} split at {at}");
            }
        }
        let long = format!(
            "GET http://a/ HTTP/1.1\r\nX: {}\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "y".repeat(1000)
        );
        assert!(check(long.as_bytes()).is_err());
    }

    #[test]
    fn every_head_on_a_keep_alive_connection() {
        // A body may hold anything; the head after it is checked.
        let ok = b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\n\r\na\nb\n\nGET http://a/ HTTP/1.1\r\n\r\n";
        assert!(check(ok).is_ok());
        let second_bad = b"GET http://a/ HTTP/1.1\r\n\r\nGET http://a/ HTTP/1.1\nHost: a\r\n\r\n";
        assert!(check(second_bad).is_err());
        let after_body = b"POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        assert!(check(after_body).is_err());
        // After a chunked body the tunnel closes the connection; the guard stops there.
        let chunked = b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\nx";
        assert!(check(chunked).is_ok());
    }
}
