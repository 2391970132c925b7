//! Placeholders in request bodies: a body on its way to a host whose rule does not name the
//! placeholder's credential is read as it streams, and the request is aborted before the
//! chunk that would carry a placeholder leaves. What came before it has been sent (the body
//! is not buffered), the placeholder itself never is.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// The error that ends a body carrying a placeholder; the proxy finds it in the upstream
/// error's chain and answers 403 `placeholder-to-unlisted-host`.
#[derive(Debug, thiserror::Error)]
#[error("the request body carries a placeholder of a credential this host's rule does not name")]
pub struct PlaceholderInBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The placeholders a stream must not carry, and how much of it to hold back so that one split
/// across two reads is seen whole.
pub struct Needles {
    needles: Vec<Vec<u8>>,
    /// The longest placeholder's length less one.
    pub keep: usize,
}

impl Needles {
    pub fn new(placeholders: Vec<String>) -> Self {
        let needles: Vec<Vec<u8>> = placeholders
            .into_iter()
            .map(String::into_bytes)
            .filter(|n| !n.is_empty())
            .collect();
        let keep = needles
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Self { needles, keep }
    }

    pub fn found_in(&self, bytes: &[u8]) -> bool {
        self.needles
            .iter()
            .any(|n| bytes.windows(n.len()).any(|w| w == n.as_slice()))
    }
}

/// Passes `inner` through, holding back the last `keep` bytes of each chunk until the next
/// one arrives, so a placeholder split across two chunks is seen whole.
pub struct Scanned<B> {
    inner: B,
    needles: Needles,
    /// The tail of what was read, not sent yet.
    held: BytesMut,
    done: bool,
}

impl<B> Scanned<B> {
    pub fn new(inner: B, placeholders: Vec<String>) -> Self {
        Self {
            inner,
            needles: Needles::new(placeholders),
            held: BytesMut::new(),
            done: false,
        }
    }
}

impl<B> Body for Scanned<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        this.held.extend_from_slice(&data);
                        if this.needles.found_in(&this.held) {
                            this.done = true;
                            return Poll::Ready(Some(Err(PlaceholderInBody.into())));
                        }
                        let send = this.held.len().saturating_sub(this.needles.keep);
                        if send > 0 {
                            let out = this.held.split_to(send).freeze();
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    // Trailers end the body: what is held goes first, the trailers are
                    // dropped (a forward proxy has no use for them and they could carry
                    // anything).
                    Err(_trailers) => return Poll::Ready(self.flush()),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => return Poll::Ready(self.flush()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.held.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        with_held(self.inner.size_hint(), self.held.len())
    }
}

/// A scanner's size: what its inner body has left, plus the bytes it holds back.
pub(super) fn with_held(mut hint: SizeHint, held: usize) -> SizeHint {
    let held = held as u64;
    hint.set_lower(hint.lower() + held);
    if let Some(upper) = hint.upper() {
        hint.set_upper(upper + held);
    }
    hint
}

impl<B> Scanned<B> {
    fn flush(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.done = true;
        (!self.held.is_empty()).then(|| Ok(Frame::data(self.held.split().freeze())))
    }
}

/// A body that yields the given chunks one frame each, for the scanners' tests; then ends,
/// or (`then_wait`) waits for ever, as a stream that pauses.
#[cfg(test)]
pub(super) struct Chunks {
    chunks: std::collections::VecDeque<Bytes>,
    ends: bool,
}

#[cfg(test)]
impl Chunks {
    pub(super) fn of_bytes(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks: chunks.into(),
            ends: true,
        }
    }

    pub(super) fn of(chunks: &[&str]) -> Self {
        Self::of_bytes(
            chunks
                .iter()
                .map(|c| Bytes::copy_from_slice(c.as_bytes()))
                .collect(),
        )
    }

    pub(super) fn then_wait(chunks: Vec<Bytes>) -> Self {
        Self {
            chunks: chunks.into(),
            ends: false,
        }
    }
}

#[cfg(test)]
impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.chunks.pop_front() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None if self.ends => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    async fn read(chunks: &[&str]) -> Result<String, String> {
        let body = Chunks::of(chunks);
        match Scanned::new(body, vec!["PH-1234".into()]).collect().await {
            Ok(c) => Ok(String::from_utf8(c.to_bytes().to_vec()).unwrap()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn a_body_without_placeholders_passes_whole() {
        assert_eq!(read(&["hello ", "wor", "ld"]).await.unwrap(), "hello world");
        assert_eq!(
            read(&["PH-123", "5 almost"]).await.unwrap(),
            "PH-1235 almost"
        );
        assert_eq!(read(&[]).await.unwrap(), "");
    }

    #[tokio::test]
    async fn a_placeholder_is_caught_whole_or_split_across_chunks() {
        for chunks in [
            &["token=PH-1234"][..],
            &["token=PH-", "1234&x=1"],
            &["token=P", "H", "-12", "34"],
            &["a lot of text before it ", "and then PH-1234"],
        ] {
            assert!(read(chunks).await.is_err(), "{chunks:?}");
        }
    }
}
