//! An upstream response body that gives its HTTP/1.1 connection back to the pool once read
//! to the end: only then is the connection free for the next request. A body dropped early
//! drops the connection with it, since unread bytes would still be on the wire.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::pool::{H1Conn, Host};

pub struct UpstreamBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
}

/// Where the connection goes when the body ends.
pub(super) struct GiveBack {
    pub(super) host: Arc<Host>,
    pub(super) conn: H1Conn,
}

impl UpstreamBody {
    pub(super) fn new(inner: Incoming, give_back: Option<GiveBack>) -> Self {
        let mut body = Self { inner, give_back };
        // An empty body may never be polled (HEAD, 204, Content-Length: 0).
        if body.inner.is_end_stream() {
            body.ended();
        }
        body
    }

    fn ended(&mut self) {
        if let Some(GiveBack { host, conn }) = self.give_back.take() {
            host.give_back(conn);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.ended(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.ended(),
            Some(Ok(_)) => {}
            Some(Err(_)) => self.give_back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
