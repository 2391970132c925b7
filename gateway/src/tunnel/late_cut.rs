//! A request body the tunnel cuts (a placeholder in it, or past `max_request_body`) after
//! the upstream has already answered. The answer was relayed and recorded as let through,
//! so the refusal reaches no client and no other record: it is recorded here, with no status.
//! Cut before the answer, the request fails and the proxy records the refusal itself.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::body_scan::{BoxError, PlaceholderInBody};

/// Writes the refusal's record: `reason`, verdict deny, status null.
pub type Record = Box<dyn FnOnce(&'static str) + Send>;

/// Shared by the body and the request that sends it.
pub struct Watch(Mutex<State>);

enum State {
    /// No answer yet; a cut now fails the request, which the proxy records.
    Waiting(Record),
    /// A cut before the answer was seen: recorded when the answer comes, if it does.
    CutEarly(Record, &'static str),
    Answered(Record),
    Done,
}

impl Watch {
    pub fn new(record: Record) -> Arc<Self> {
        Arc::new(Self(Mutex::new(State::Waiting(record))))
    }

    /// The upstream answered: a cut from now on is recorded where it happens, and one that
    /// came just before the answer is recorded now.
    pub fn answered(&self) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *state = match std::mem::replace(&mut *state, State::Done) {
            State::Waiting(record) => State::Answered(record),
            State::CutEarly(record, reason) => {
                record(reason);
                State::Done
            }
            done => done,
        };
    }

    fn cut(&self, reason: &'static str) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *state = match std::mem::replace(&mut *state, State::Done) {
            State::Waiting(record) => State::CutEarly(record, reason),
            State::Answered(record) => {
                record(reason);
                State::Done
            }
            other => other,
        };
    }
}

/// Passes `inner` through and tells `watch` when the tunnel itself ended it.
pub struct Watched<B> {
    inner: B,
    watch: Arc<Watch>,
}

impl<B> Watched<B> {
    pub fn new(inner: B, watch: Arc<Watch>) -> Self {
        Self { inner, watch }
    }
}

/// Why the tunnel ended a body, if it did (not the client).
fn tunnel_cut(e: &BoxError) -> Option<&'static str> {
    if e.downcast_ref::<PlaceholderInBody>().is_some() {
        Some("placeholder-to-unlisted-host")
    } else if e
        .downcast_ref::<http_body_util::LengthLimitError>()
        .is_some()
    {
        Some("request-body-too-large")
    } else {
        None
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Err(e)) = &frame
            && let Some(reason) = tunnel_cut(e)
        {
            self.watch.cut(reason);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> (Arc<Watch>, Arc<Mutex<Vec<&'static str>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = seen.clone();
        let w = Watch::new(Box::new(move |r| into.lock().unwrap().push(r)));
        (w, seen)
    }

    #[test]
    fn recorded_once_whichever_comes_first() {
        // Cut before any answer, and no answer: the proxy records the failed request.
        let (w, seen) = watch();
        w.cut("placeholder-to-unlisted-host");
        drop(w);
        assert!(seen.lock().unwrap().is_empty());
        // Cut just before an answer that still came.
        let (w, seen) = watch();
        w.cut("request-body-too-large");
        w.answered();
        assert_eq!(*seen.lock().unwrap(), ["request-body-too-large"]);
        // Cut after the answer.
        let (w, seen) = watch();
        w.answered();
        w.cut("placeholder-to-unlisted-host");
        w.cut("placeholder-to-unlisted-host");
        assert_eq!(*seen.lock().unwrap(), ["placeholder-to-unlisted-host"]);
        // Answered, never cut.
        let (w, seen) = watch();
        w.answered();
        assert!(seen.lock().unwrap().is_empty());
    }
}
