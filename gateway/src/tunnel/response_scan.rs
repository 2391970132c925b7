//! Secrets in answers. An upstream that sends the request's credential back (a debugging
//! endpoint that echoes headers, an error page quoting the request) would hand the sandbox
//! what it must never hold. An answer's headers are checked before it is relayed; its body
//! as it streams, cut before the chunk that would carry the secret, and the cut recorded.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::HeaderMap;
use memchr::memmem;

use super::{
    body_scan::{BoxError, with_held},
    coded_scan::Coding,
    late_cut,
};

/// The reason of an answer, or the rest of one, not relayed for carrying the secret.
pub const SECRET_IN_RESPONSE: &str = "secret-in-response";

/// The reason of an answer not relayed, or cut, because its body could not be read for the
/// secret: content-encoded in a way the scan does not decode (brotli, zstd, two codings, a
/// transfer coding besides `chunked`), or not decoding as its coding says. The client would
/// decode what the check could not.
pub const ENCODED_RESPONSE: &str = "encoded-response";

/// How an answer's body is read for the secret, judged on its head: as it is, or decoded
/// (`Some`); `Err` with the reason it is refused: it carries a secret (in its reason phrase,
/// a header's name or value), or its body could not be read for one.
pub fn read_head<B: Body>(
    echoes: &Echoes,
    resp: &hyper::Response<B>,
) -> Result<Option<Coding>, &'static str> {
    let reason = resp.extensions().get::<hyper::ext::ReasonPhrase>();
    if echoes.in_headers(resp.headers()) || reason.is_some_and(|r| echoes.found_in(r.as_bytes())) {
        return Err(SECRET_IN_RESPONSE);
    }
    if resp.body().is_end_stream() {
        return Ok(None);
    }
    let headers = resp.headers();
    // hyper takes only `chunked` off a transfer coding: `gzip, chunked` would reach the
    // scan compressed, and the client (the header is dropped as hop-by-hop, the bytes not).
    let transfer_coded = headers
        .get_all(hyper::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|c| {
            !c.is_empty()
                && !c.eq_ignore_ascii_case(b"chunked")
                && !c.eq_ignore_ascii_case(b"identity")
        });
    if transfer_coded {
        return Err(ENCODED_RESPONSE);
    }
    Coding::of(headers).map_err(|()| ENCODED_RESPONSE)
}

/// The error that ends a body carrying the secret: the client's connection is cut.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's answer carries the credential's secret")]
pub struct SecretInResponse;

/// The texts of the policy's credentials that an answer must not carry (none empty), and
/// the length of the shortest.
#[derive(Clone)]
pub struct Echoes(Arc<[Bytes]>, usize);

/// Haystacks up to this long are searched from each place the text's first byte occurs:
/// most header values are this short, and setting up `memmem`'s searcher would cost more
/// than the search.
const SHORT: usize = 64;

impl Echoes {
    /// `None` when there is nothing to look for.
    pub fn new(echoes: &Arc<[Bytes]>) -> Option<Self> {
        let shortest = |e: &[Bytes]| e.iter().map(Bytes::len).min();
        if echoes.iter().any(Bytes::is_empty) {
            // Every place would match an empty text; a credential never makes one.
            let echoes: Vec<Bytes> = echoes.iter().filter(|e| !e.is_empty()).cloned().collect();
            return shortest(&echoes).map(|n| Self(echoes.into(), n));
        }
        shortest(echoes).map(|n| Self(echoes.clone(), n))
    }

    pub fn in_headers(&self, headers: &HeaderMap) -> bool {
        headers.iter().any(|(name, value)| {
            self.found_in(name.as_str().as_bytes()) || self.found_in(value.as_bytes())
        })
    }

    /// The length of the longest text.
    pub(super) fn longest(&self) -> usize {
        self.0.iter().map(Bytes::len).max().unwrap_or(0)
    }

    pub(super) fn found_in(&self, bytes: &[u8]) -> bool {
        // Most headers and many chunks are shorter than a secret: no search at all.
        bytes.len() >= self.1 && self.0.iter().any(|e| contains(bytes, e))
    }
}

fn contains(haystack: &[u8], text: &[u8]) -> bool {
    let Some(last) = haystack.len().checked_sub(text.len()) else {
        return false;
    };
    if haystack.len() > SHORT {
        return memmem::find(haystack, text).is_some();
    }
    memchr::memchr_iter(text[0], &haystack[..=last]).any(|at| haystack[at..].starts_with(text))
}

/// Held bytes go out when the next chunk comes or this long after, whatever they are. If
/// only bytes that could begin the secret waited, when they went would tell a client which
/// of the guesses an upstream it controls streams begin the secret, letter by letter (a
/// review recovered one whole so). A secret split across two chunks this far apart in time
/// loses its start before the rest is seen and the answer cut.
pub(super) const RELEASE_AFTER: Duration = Duration::from_millis(20);

/// The timer that lets held bytes go: started over whenever a chunk comes, by then the same
/// way whatever the bytes are. The clock is read only once the body has to wait (most
/// answers end before).
#[derive(Default)]
pub(super) struct Release {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A chunk came: the wait starts at the next poll that finds nothing.
    fresh: bool,
    armed: bool,
}

impl Release {
    pub(super) fn arm(&mut self) {
        self.fresh = true;
    }

    /// Whether the time is up (once per arming); registers for the wakeup if not.
    pub(super) fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        if std::mem::take(&mut self.fresh) {
            let at = tokio::time::Instant::now() + RELEASE_AFTER;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(at),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
        let Some(sleep) = self.sleep.as_mut().filter(|_| self.armed) else {
            return false;
        };
        let fired = sleep.as_mut().poll(cx).is_ready();
        self.armed &= !fired;
        fired
    }
}

/// A stream read for the secret piece by piece: each piece is checked, with the end of the
/// one before, for a secret that spans them.
pub(super) struct Stream {
    echoes: Echoes,
    /// The last bytes read, as many as a secret less one: enough to see one that spans two
    /// pieces.
    tail: Vec<u8>,
    keep: usize,
}

impl Stream {
    pub(super) fn new(echoes: Echoes) -> Self {
        let keep = echoes.longest().saturating_sub(1);
        Self {
            echoes,
            tail: Vec::with_capacity(2 * keep),
            keep,
        }
    }

    /// As many bytes as a secret less one: what is held back of a stream.
    pub(super) fn keep(&self) -> usize {
        self.keep
    }

    /// Whether `piece` completes a secret, here or with what came before.
    pub(super) fn completes(&mut self, piece: &[u8]) -> bool {
        let head = &piece[..piece.len().min(self.keep)];
        let tail_len = self.tail.len();
        self.tail.extend_from_slice(head);
        let spans = self.echoes.found_in(&self.tail);
        self.tail.truncate(tail_len);
        if spans || self.echoes.found_in(piece) {
            return true;
        }
        if piece.len() >= self.keep {
            zeroize::Zeroize::zeroize(&mut self.tail[..]);
            self.tail.clear();
            self.tail
                .extend_from_slice(&piece[piece.len() - self.keep..]);
        } else {
            self.tail.extend_from_slice(piece);
            let excess = self.tail.len().saturating_sub(self.keep);
            zeroize::Zeroize::zeroize(&mut self.tail[..excess]);
            self.tail.drain(..excess);
        }
        false
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.tail[..]);
    }
}

/// Relays `inner`, cutting it before the secret. The last bytes of what has come, as many
/// as a secret less one, wait for the next chunk or [`RELEASE_AFTER`], so a secret split
/// across two chunks is seen whole before any of it goes.
pub struct Scanned<B> {
    inner: B,
    stream: Stream,
    /// Not relayed yet: at most [`Stream::keep`] bytes between polls, either the end of
    /// the last chunk as it came (no copy: most answers are one chunk) or copied together.
    held: BytesMut,
    held_slice: Option<Bytes>,
    release: Release,
    /// Trailers that came while bytes were held: relayed after them.
    trailers: Option<HeaderMap>,
    /// Records the cut; taken when it happens. (In a mutex only so the body is `Sync`, as
    /// hyper's boxed bodies must be; only `&mut self` ever touches it.)
    cut: Mutex<Option<late_cut::Record>>,
    done: bool,
}

impl<B> Scanned<B> {
    pub fn new(inner: B, echoes: Echoes, cut: late_cut::Record) -> Self {
        Self {
            inner,
            stream: Stream::new(echoes),
            held: BytesMut::new(),
            held_slice: None,
            release: Release::default(),
            trailers: None,
            cut: Mutex::new(Some(cut)),
            done: false,
        }
    }

    fn cut(&mut self) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        zeroize::Zeroize::zeroize(&mut self.held[..]);
        self.held.clear();
        self.held_slice = None;
        self.trailers = None;
        let cut = self.cut.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(record) = cut.take() {
            record(SECRET_IN_RESPONSE);
        }
        Poll::Ready(Some(Err(SecretInResponse.into())))
    }

    fn release_held(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        if let Some(slice) = self.held_slice.take() {
            return Some(Ok(Frame::data(slice)));
        }
        (!self.held.is_empty()).then(|| Ok(Frame::data(self.held.split().freeze())))
    }

    fn holds(&self) -> bool {
        self.held_slice.is_some() || !self.held.is_empty()
    }
}

/// What is held may be the start of the secret, and at a cut is the whole of it: wiped, as
/// the tunnel's own copies of the secret are (hyper's read buffers are not).
impl<B> Drop for Scanned<B> {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.held[..]);
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
            if let Some(rest) = this.release_held() {
                return Poll::Ready(Some(rest));
            }
            return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    zeroize::Zeroize::zeroize(&mut this.held[..]);
                    this.held.clear();
                    this.held_slice = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(this.release_held());
                }
                Poll::Pending => {
                    if this.holds() && this.release.fired(cx) {
                        return Poll::Ready(this.release_held());
                    }
                    return Poll::Pending;
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    if this.stream.echoes.in_headers(&trailers) {
                        return this.cut();
                    }
                    this.done = true;
                    if !this.holds() {
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    this.trailers = Some(trailers);
                    return Poll::Ready(this.release_held());
                }
            };
            if this.stream.completes(&data) {
                return this.cut();
            }
            let keep = this.stream.keep();
            this.release.arm();
            if !this.holds() {
                // The usual case: nothing held, the chunk is relayed without a copy.
                let send = data.len().saturating_sub(keep);
                this.held_slice = Some(data.slice(send..)).filter(|t| !t.is_empty());
                if send > 0 {
                    return Poll::Ready(Some(Ok(Frame::data(data.slice(..send)))));
                }
                continue;
            }
            if let Some(slice) = this.held_slice.take() {
                this.held.extend_from_slice(&slice);
            }
            this.held.extend_from_slice(&data);
            let send = this.held.len().saturating_sub(keep);
            if send > 0 {
                return Poll::Ready(Some(Ok(Frame::data(this.held.split_to(send).freeze()))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return !self.holds() && self.trailers.is_none();
        }
        !self.holds() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.len() + self.held_slice.as_ref().map_or(0, Bytes::len);
        with_held(self.inner.size_hint(), held)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::{super::body_scan::Chunks, *};

    fn echoes() -> Echoes {
        Echoes::new(&Arc::from([Bytes::from_static(b"s3cret-value")])).unwrap()
    }

    /// What the client receives frame by frame, and the reasons recorded.
    async fn relay(chunks: &[&str]) -> (Vec<String>, bool, Vec<&'static str>) {
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let record = {
            let recorded = recorded.clone();
            Box::new(move |reason| recorded.lock().unwrap().push(reason))
        };
        let mut scanned = Scanned::new(Chunks::of(chunks), echoes(), record);
        let mut frames = Vec::new();
        let mut failed = false;
        while let Some(frame) = scanned.frame().await {
            match frame {
                Ok(f) => frames.push(String::from_utf8(f.into_data().unwrap().to_vec()).unwrap()),
                Err(_) => failed = true,
            }
        }
        let recorded = recorded.lock().unwrap().clone();
        (frames, failed, recorded)
    }

    #[tokio::test]
    async fn what_is_held_does_not_depend_on_what_it_is() {
        let (frames, failed, recorded) = relay(&["data: first\n\n", "data: second\n\n"]).await;
        assert_eq!(frames.concat(), "data: first\n\ndata: second\n\n");
        assert!(!failed && recorded.is_empty());
        // A start of the secret waits exactly as other text does: when bytes go tells a
        // client nothing of which guesses begin the secret.
        let lengths = |f: &[String]| f.iter().map(String::len).collect::<Vec<_>>();
        let (guess, _, _) = relay(&["a s3c", "ond thing"]).await;
        let (other, _, _) = relay(&["a xyz", "ond thing"]).await;
        assert_eq!(lengths(&guess), lengths(&other));
        assert_eq!(guess.concat(), "a s3cond thing");
    }

    #[tokio::test(start_paused = true)]
    async fn held_bytes_go_after_a_short_wait_whatever_they_are() {
        for text in ["event: s3c", "event: xyz"] {
            let mut scanned = Scanned::new(
                Chunks::then_wait(vec![Bytes::from_static(text.as_bytes())]),
                echoes(),
                Box::new(|_| {}),
            );
            let start = tokio::time::Instant::now();
            let mut got = Vec::new();
            while got.len() < text.len() {
                let frame = scanned.frame().await.unwrap().unwrap();
                got.extend_from_slice(frame.data_ref().unwrap());
            }
            assert_eq!(got, text.as_bytes());
            assert_eq!(start.elapsed(), RELEASE_AFTER, "{text}");
        }
    }

    #[tokio::test]
    async fn the_secret_is_cut_whole_or_split_and_the_cut_recorded_once() {
        for chunks in [
            &["x", "token: s3cret-value"][..],
            &["token: s3cr", "et-value"],
            &["s", "3", "cret-", "value and more"],
        ] {
            let (frames, failed, recorded) = relay(chunks).await;
            assert!(failed, "{chunks:?}");
            assert!(
                frames.iter().all(|f| !f.contains("s3cret-value"))
                    && !frames.concat().contains("s3cret-value"),
                "{chunks:?}: {frames:?}"
            );
            assert_eq!(recorded, [SECRET_IN_RESPONSE], "{chunks:?}");
        }
    }

    #[test]
    fn the_text_is_found_anywhere_in_short_and_long_haystacks() {
        for pad in [0, 1, 20, super::SHORT, 200] {
            let filler = "s".repeat(pad);
            for (hay, found) in [
                (format!("{filler}s3cret-value"), true),
                (format!("s3cret-value{filler}"), true),
                (format!("{filler}s3cret-valu{filler}"), false),
                (format!("{filler}s3cret-valuE"), false),
            ] {
                assert_eq!(echoes().found_in(hay.as_bytes()), found, "{hay}");
            }
        }
        assert!(!echoes().found_in(b""));
    }

    #[test]
    fn headers_are_checked_by_name_and_value() {
        let mut headers = HeaderMap::new();
        headers.insert("x-echo", "Bearer s3cret-value".parse().unwrap());
        assert!(echoes().in_headers(&headers));
        let mut headers = HeaderMap::new();
        headers.insert("x-echo", "Bearer another".parse().unwrap());
        assert!(!echoes().in_headers(&headers));
    }
}
