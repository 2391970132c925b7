//! A request body the tunnel cuts: a placeholder in it, or past `max_request_body`. Cut
//! before the upstream answers, the request fails and the proxy refuses it with the reason
//! kept here ([`Watch::failed`]: an HTTP/2 upstream's error says only that the stream was
//! reset). Cut after the answer was relayed and recorded as let through, the refusal reaches
//! no client and no other record: it is recorded here, with no status.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::StatusCode;

use super::{
    body_scan::{BoxError, PlaceholderInBody},
    form_override::MethodInForm,
};

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

    /// The request failed: why, if the tunnel cut its body (the caller refuses it with that
    /// reason). Nothing is recorded here any more.
    pub fn failed(&self) -> Option<&'static str> {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, State::Done) {
            State::CutEarly(_, reason) => Some(reason),
            _ => None,
        }
    }

    /// The upstream answered, and the answer is recorded: a cut from now on is recorded where
    /// it happens, and one that came just before the answer is recorded now.
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

impl Drop for Watch {
    /// The request went away (its client left) after a cut and before any answer.
    fn drop(&mut self) {
        let state = self.0.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let State::CutEarly(record, reason) = std::mem::replace(state, State::Done) {
            record(reason);
        }
    }
}

/// Tells the watch the upstream answered when dropped: at the end of the request's handling,
/// after the answer's record, whichever way the handling returns.
pub struct AnsweredOnDrop(pub Option<Arc<Watch>>);

impl Drop for AnsweredOnDrop {
    fn drop(&mut self) {
        if let Some(watch) = &self.0 {
            watch.answered();
        }
    }
}

/// The answer to a request whose body the tunnel cut for `reason`.
pub fn status(reason: &str) -> StatusCode {
    match reason {
        TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
        METHOD_IN_FORM => StatusCode::BAD_REQUEST,
        _ => StatusCode::FORBIDDEN,
    }
}

const TOO_LARGE: &str = "request-body-too-large";
const METHOD_IN_FORM: &str = "override-parameter";

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
    } else if e.downcast_ref::<MethodInForm>().is_some() {
        Some(METHOD_IN_FORM)
    } else if e
        .downcast_ref::<http_body_util::LengthLimitError>()
        .is_some()
    {
        Some(TOO_LARGE)
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
        // Cut, then the request failed: the caller refuses it with the reason.
        let (w, seen) = watch();
        w.cut("placeholder-to-unlisted-host");
        assert_eq!(w.failed(), Some("placeholder-to-unlisted-host"));
        drop(w);
        assert!(seen.lock().unwrap().is_empty());
        // Cut, then neither answer nor failure (the client left): recorded as it goes.
        let (w, seen) = watch();
        w.cut("request-body-too-large");
        drop(w);
        assert_eq!(*seen.lock().unwrap(), ["request-body-too-large"]);
    }
}
