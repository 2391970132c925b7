//! Stream wrappers around what clients send.
//!
//! `HeadGuard` refuses a request head that hyper's lenient parser would accept but another
//! parser could read differently: bare LF or bare CR line ends, obs-fold continuation lines,
//! two Content-Lengths, Content-Length with Transfer-Encoding (hyper silently picks one), a
//! Content-Length that is not one plain number. hyper still parses every request; the guard
//! only follows the byte stream far enough to know where each head starts: after a head with
//! Content-Length it skips that many body bytes, after one with no body it checks the next
//! head, and after a chunked, upgrade or CONNECT request it stops, because the tunnel closes
//! such connections after the response (`closes_connection`) or hands them over to a tunnel
//! of their own.
//!
//! A refused head never reaches hyper whole, so hyper can neither serve it nor answer it; the
//! guard answers it. hyper gets the bytes before it, so requests pipelined ahead of it are
//! served as ever, and the start of the refused head, short of the byte that gave it away:
//! with part of a head in its buffer, hyper reads again only once it has answered every
//! request before it and wants the rest of that head. Then the guard writes its 400, closes
//! its sending side and reports the end of the stream (hyper takes it for a client that left
//! mid-head, and answers nothing). What comes after the refused head is never read. [`Report`]
//! tells the connection's owner, who writes the record.
//!
//! `Prefixed` replays bytes already read (a TLS ClientHello) in front of a stream.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Enough of a header line to read its name and a Content-Length value.
const KEEP: usize = 256;

/// What a connection's guard saw, for its owner once hyper is done with the connection.
#[derive(Default)]
pub struct Report {
    /// Whether part of a request head has arrived and the rest not yet: when hyper's header
    /// timer fires, a slow head (refused) rather than an idle keep-alive connection (closed).
    mid_head: AtomicBool,
    /// Why the guard refused a head, if it did.
    refused: OnceLock<&'static str>,
    /// Whether the client was sent the whole 400 for it.
    answered: AtomicBool,
}

impl Report {
    pub fn mid_head(&self) -> bool {
        self.mid_head.load(Ordering::Relaxed)
    }
    pub fn refused(&self) -> Option<&'static str> {
        self.refused.get().copied()
    }
    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }
}

/// A head the guard refuses: the reason its answer and record name, and how many bytes of
/// what was scanned hyper still gets.
#[derive(Debug, PartialEq)]
struct Refusal {
    reason: &'static str,
    keep: usize,
}

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
    /// A head was refused: its 400, and how much of it the client has been sent.
    Refused {
        answer: Vec<u8>,
        sent: usize,
    },
    /// The 400 is out and the sending side closed; nothing more is read.
    Answered,
}

pub struct HeadGuard<S> {
    inner: S,
    state: State,
    /// The start of the current header line (at most [`KEEP`] bytes), kept across lines
    /// and heads so that its buffer is allocated once per connection.
    line: Vec<u8>,
    report: Arc<Report>,
}

impl<S> HeadGuard<S> {
    pub fn new(inner: S, report: Arc<Report>) -> Self {
        Self {
            inner,
            state: State::Head(Head::default()),
            line: Vec::new(),
            report,
        }
    }

    fn scan(&mut self, mut bytes: &[u8]) -> Result<(), Refusal> {
        let all = bytes.len();
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done | State::Refused { .. } | State::Answered => return Ok(()),
                State::Body(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.state = State::Head(Head::default());
                    }
                }
                State::Head(head) => {
                    let (used, next) = head.feed(bytes, &mut self.line).map_err(|r| Refusal {
                        keep: all - bytes.len() + r.keep,
                        ..r
                    })?;
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
    ///
    /// A refusal keeps back the byte that gave the head away, so that what hyper has of it
    /// is never a whole head (hyper ends lines at a bare LF too), and keeps at least one
    /// byte of the head, so that hyper never takes the connection for idle meanwhile.
    fn feed(
        &mut self,
        bytes: &[u8],
        line: &mut Vec<u8>,
    ) -> Result<(usize, Option<State>), Refusal> {
        let mut at = 0;
        while at < bytes.len() {
            if self.cr {
                // The CR itself went to hyper, in this read or an earlier one.
                if bytes[at] != b'\n' {
                    return Err(refused("bare-cr", at));
                }
                self.cr = false;
                at += 1;
                let next = self.end_line(line);
                line.clear();
                if let Some(next) = next.map_err(|reason| refused(reason, at - 1))? {
                    return Ok((at, Some(next)));
                }
                continue;
            }
            let rest = &bytes[at..];
            // A line that starts with a space or tab continues the one before (obs-fold).
            // Refused at that byte: hyper would take it for a bad header name and answer
            // the head on its own.
            if line.is_empty() && self.request_line_seen && matches!(rest[0], b' ' | b'\t') {
                return Err(refused("obs-fold", at));
            }
            let text = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            let room = KEEP.saturating_sub(line.len());
            line.extend_from_slice(&rest[..text.min(room)]);
            at += text;
            match rest.get(text) {
                Some(b'\n') => {
                    // Before any request line there is nothing else of this head to keep, and
                    // with only empty lines hyper waits for more (it skips them).
                    let lone = !self.request_line_seen && line.is_empty();
                    return Err(refused("bare-lf", at + usize::from(lone)));
                }
                Some(_) => {
                    self.cr = true;
                    at += 1;
                }
                None => {}
            }
        }
        Ok((at, None))
    }

    fn end_line(&mut self, line: &[u8]) -> Result<Option<State>, &'static str> {
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
                return Err("invalid-content-length");
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

    fn end_head(&self) -> Result<State, &'static str> {
        if self.content_lengths > 1 {
            return Err("duplicate-content-length");
        }
        if self.content_lengths == 1 && self.transfer_encoding {
            return Err("content-length-and-transfer-encoding");
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

fn refused(reason: &'static str, keep: usize) -> Refusal {
    Refusal { reason, keep }
}

/// Requests after which the connection is closed, so that no head goes unchecked.
pub fn closes_connection(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key(hyper::header::TRANSFER_ENCODING)
        || headers.contains_key(hyper::header::UPGRADE)
}

/// The tunnel's 400 for a refused head, as bytes: hyper, which writes every other answer,
/// never saw this request.
fn answer(reason: &str) -> Vec<u8> {
    let body = super::refusal_text(hyper::StatusCode::BAD_REQUEST, reason);
    format!(
        "HTTP/1.1 400 Bad Request\r\nx-gateway-reason: {reason}\r\n\
         content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl<S: AsyncRead + AsyncWrite + Unpin> HeadGuard<S> {
    /// Sends the refused head's 400 and closes the sending side; then reports the end of
    /// the stream.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let State::Refused { answer, sent } = &mut self.state {
            while *sent < answer.len() {
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*sent..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *sent += n;
            }
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.report.answered.store(true, Ordering::Relaxed);
            ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            self.state = State::Answered;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.state {
            State::Head(_) | State::Body(_) => {}
            State::Done => return Pin::new(&mut self.inner).poll_read(cx, buf),
            State::Refused { .. } | State::Answered => return self.poll_answer(cx),
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        match self.scan(&buf.filled()[before..]) {
            Ok(()) => {
                let mid_head = match &self.state {
                    State::Head(head) => head.request_line_seen || head.cr || !self.line.is_empty(),
                    _ => false,
                };
                self.report.mid_head.store(mid_head, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Err(refusal) => {
                buf.set_filled(before + refusal.keep);
                let _ = self.report.refused.set(refusal.reason);
                self.state = State::Refused {
                    answer: answer(refusal.reason),
                    sent: 0,
                };
                if refusal.keep > 0 {
                    return Poll::Ready(Ok(()));
                }
                // Nothing new for hyper, which already holds part of the head: it was
                // asking for the rest.
                self.poll_answer(cx)
            }
        }
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
mod tests;
