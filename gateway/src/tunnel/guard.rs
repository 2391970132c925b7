//! Stream wrappers around what clients send.
//!
//! `HeadGuard` refuses a request head that hyper's lenient parser would accept but another
//! parser could read differently (bare LF line ends, obs-fold continuation lines): such a
//! request is ambiguous, so the connection is closed before anything is forwarded.
//! `Prefixed` replays bytes already read (a TLS ClientHello) in front of a stream.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// At the start of a line; `first` for the request line.
    LineStart {
        first: bool,
    },
    InLine,
    /// Saw CR, want LF.
    Cr {
        line_was_empty: bool,
    },
    /// The head ended; the body and later requests pass unchecked (see module docs).
    Done,
}

pub struct HeadGuard<S> {
    inner: S,
    state: Head,
}

impl<S> HeadGuard<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: Head::LineStart { first: true },
        }
    }

    fn scan(&mut self, bytes: &[u8]) -> io::Result<()> {
        for &b in bytes {
            self.state = match (self.state, b) {
                (Head::Done, _) => return Ok(()),
                (Head::Cr { line_was_empty }, b'\n') => {
                    if line_was_empty {
                        Head::Done
                    } else {
                        Head::LineStart { first: false }
                    }
                }
                (Head::Cr { .. }, _) => return Err(ambiguous("CR without LF")),
                (_, b'\n') => return Err(ambiguous("bare LF line end")),
                (Head::LineStart { first: false }, b' ' | b'\t') => {
                    return Err(ambiguous("obs-fold continuation line"));
                }
                (Head::LineStart { .. } | Head::InLine, b'\r') => {
                    let line_was_empty = matches!(self.state, Head::LineStart { first: false });
                    Head::Cr { line_was_empty }
                }
                (Head::LineStart { .. } | Head::InLine, _) => Head::InLine,
            };
        }
        Ok(())
    }
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
            && self.state != Head::Done
        {
            let fresh = buf.filled()[before..].to_vec();
            self.scan(&fresh)?;
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

    fn check(head: &[u8]) -> io::Result<()> {
        HeadGuard::new(()).scan(head)
    }

    #[test]
    fn strict_heads() {
        assert!(check(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nbody\nwith LF").is_ok());
        assert!(check(b"GET http://a/ HTTP/1.1\nHost: a\r\n\r\n").is_err());
        assert!(check(b"GET http://a/ HTTP/1.1\r\nHost: a\n\n").is_err());
        assert!(check(b"GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n").is_err());
        assert!(check(b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n").is_err());
    }
}
