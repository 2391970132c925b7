//! `_method` in a POST's form body: Rails (Rack's MethodOverride), Express's method-override
//! and Laravel take it as the request's real method, so a rule allowing POST to a path would
//! let a DELETE of it through. The body streams on unbuffered; the chunk that completes such
//! a field never leaves, and the request is aborted, as for a placeholder in a body.
//!
//! Read the way those frameworks parse forms: an `application/x-www-form-urlencoded` body
//! (or a POST with no Content-Type, which Rack parses as one) field by field, with the name
//! percent-decoded; a `multipart/form-data` body by its parts' `name=`.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{HeaderMap, Method, header};

use super::body_scan::BoxError;

/// The error that ends a body carrying a method override; the proxy answers 400
/// `override-parameter`.
#[derive(Debug, thiserror::Error)]
#[error("the request body names another method in a `_method` field")]
pub struct MethodInForm;

/// The field name frameworks read (compared in any case, which is stricter than they are).
const NAME: &[u8] = b"_method";

/// How a POST body is read for the override, if it is one a framework parses as a form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Urlencoded,
    Multipart,
}

impl Form {
    pub fn of(method: &Method, headers: &HeaderMap) -> Option<Self> {
        if method != Method::POST {
            return None;
        }
        let Some(kind) = headers.get(header::CONTENT_TYPE) else {
            return Some(Self::Urlencoded);
        };
        let kind = kind.as_bytes().trim_ascii_start();
        let is = |prefix: &[u8]| {
            kind.len() >= prefix.len() && kind[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        if is(b"application/x-www-form-urlencoded") {
            Some(Self::Urlencoded)
        } else if is(b"multipart/form-data") {
            Some(Self::Multipart)
        } else {
            None
        }
    }
}

/// Field by field through an urlencoded body, across chunks, holding nothing back: only the
/// `=` after a name completes a field, and it is checked before its chunk is passed on.
#[derive(Default)]
struct Fields {
    in_value: bool,
    /// The name so far is `NAME[..matched]` (decoded); `None` once it is not.
    matched: Option<usize>,
    /// Hex digits of an escape in the name, and how many.
    escape: Option<(u8, u8)>,
}

impl Fields {
    fn new() -> Self {
        Self {
            matched: Some(0),
            ..Self::default()
        }
    }

    fn name_byte(&mut self, b: u8) {
        self.matched = self
            .matched
            .filter(|&m| NAME.get(m).is_some_and(|n| n.eq_ignore_ascii_case(&b)))
            .map(|m| m + 1);
    }

    /// Whether `chunk` completes a field named `_method` that has a value.
    fn feed(&mut self, chunk: &[u8]) -> bool {
        for &b in chunk {
            if matches!(b, b'&' | b';') {
                *self = Self::new();
                continue;
            }
            if self.in_value {
                continue;
            }
            if let Some((digits, value)) = self.escape {
                let Some(d) = (b as char).to_digit(16) else {
                    // Not an escape after all: the name is not `_method`.
                    self.escape = None;
                    self.matched = None;
                    continue;
                };
                let value = (value << 4) | d as u8;
                if digits == 1 {
                    self.escape = None;
                    self.name_byte(value);
                } else {
                    self.escape = Some((1, value));
                }
                continue;
            }
            match b {
                b'=' => {
                    if self.matched == Some(NAME.len()) {
                        return true;
                    }
                    self.in_value = true;
                }
                b'%' => self.escape = Some((0, 0)),
                b'+' => self.name_byte(b' '),
                _ => self.name_byte(b),
            }
        }
        false
    }
}

/// A part named `_method` in a multipart body: its `name="_method"` (or unquoted), found
/// across chunks by keeping the end of the previous one.
struct Parts {
    tail: Vec<u8>,
}

const PART_NAMES: [&[u8]; 2] = [b"name=\"_method\"", b"name=_method"];

impl Parts {
    fn feed(&mut self, chunk: &[u8]) -> bool {
        let keep = PART_NAMES[0].len() - 1;
        self.tail.extend_from_slice(chunk);
        let found = PART_NAMES.iter().any(|n| {
            self.tail
                .windows(n.len())
                .any(|w| w.eq_ignore_ascii_case(n))
        });
        let drop = self.tail.len().saturating_sub(keep);
        self.tail.drain(..drop);
        found
    }
}

enum Reader {
    Urlencoded(Fields),
    Multipart(Parts),
}

/// Passes `inner` through, ending it with [`MethodInForm`] at the chunk that names a method.
pub struct Scanned<B> {
    inner: B,
    reader: Reader,
    done: bool,
}

impl<B> Scanned<B> {
    pub fn new(inner: B, form: Form) -> Self {
        let reader = match form {
            Form::Urlencoded => Reader::Urlencoded(Fields::new()),
            Form::Multipart => Reader::Multipart(Parts { tail: Vec::new() }),
        };
        Self {
            inner,
            reader,
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
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                let found = frame.data_ref().is_some_and(|data| match &mut this.reader {
                    Reader::Urlencoded(fields) => fields.feed(data),
                    Reader::Multipart(parts) => parts.feed(data),
                });
                if found {
                    this.done = true;
                    return Poll::Ready(Some(Err(MethodInForm.into())));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::{super::body_scan::Chunks, *};

    async fn passes(form: Form, chunks: &[&str]) -> bool {
        Scanned::new(Chunks::of(chunks), form)
            .collect()
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_method_field_is_caught_whole_split_or_encoded() {
        for chunks in [
            &["_method=DELETE"][..],
            &["title=x&_method=delete&b=2"],
            &["title=x&_met", "hod", "=DELETE"],
            &["title=x&%5Fmethod=DELETE"],
            &["title=x&%5", "f%6Dethod=PUT"],
            &["a=1;_METHOD=patch"],
            &["_method="],
        ] {
            assert!(!passes(Form::Urlencoded, chunks).await, "{chunks:?}");
        }
        for chunks in [
            &["--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE"][..],
            &[
                "--b\r\nContent-Disposition: form-data; name=\"_me",
                "thod\"\r\n\r\nDELETE",
            ],
            &["--b\r\ncontent-disposition: form-data; NAME=_method\r\n\r\nDELETE"],
        ] {
            assert!(!passes(Form::Multipart, chunks).await, "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn other_fields_and_values_pass() {
        for chunks in [
            &["title=_method%3DDELETE&body=x"][..],
            &["my_method=DELETE"],
            &["_methods=DELETE"],
            &["_method"],
            &["x=1&_method%5B%5D=DELETE"],
            &["a=%zz&b=1"],
            &[],
        ] {
            assert!(passes(Form::Urlencoded, chunks).await, "{chunks:?}");
        }
        assert!(
            passes(
                Form::Multipart,
                &["--b\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\n_method"]
            )
            .await
        );
    }

    #[test]
    fn which_posts_are_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(Form::of(&Method::POST, &h), Some(Form::Urlencoded));
        assert_eq!(Form::of(&Method::PUT, &h), None);
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        assert_eq!(Form::of(&Method::POST, &h), None);
        h.insert(
            header::CONTENT_TYPE,
            "Multipart/Form-Data; boundary=b".parse().unwrap(),
        );
        assert_eq!(Form::of(&Method::POST, &h), Some(Form::Multipart));
        h.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=utf-8"
                .parse()
                .unwrap(),
        );
        assert_eq!(Form::of(&Method::POST, &h), Some(Form::Urlencoded));
    }
}
