//! A method named in a POST's body: Rails (Rack's MethodOverride), Laravel, Symfony,
//! Express's method-override and ASP.NET MVC take a `_method` (or `X-HTTP-Method-Override`)
//! field as the request's real method, so a rule allowing POST to a path would let a DELETE
//! of it through. The body streams on unbuffered; the chunk that completes such a field
//! never leaves, and the request is aborted, as for a placeholder in a body.
//!
//! Read every way those frameworks may parse it ([`Form`]): an urlencoded body field by
//! field, names percent-decoded and normalised as PHP, Rack and qs do (`urlencoded`); a
//! multipart body line by line for `Content-Disposition` names (`multipart`); a JSON body by
//! its top-level keys, as Laravel reads it (`json`). A compressed form is refused before it
//! leaves (Express would inflate it); compressed JSON passes unread.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::{HeaderMap, Method, header};

use super::body_scan::BoxError;

mod json;
mod multipart;
mod urlencoded;

/// The error that ends a body carrying a method override; the proxy answers 400
/// `override-parameter`.
#[derive(Debug, thiserror::Error)]
#[error("the request body names another method in a `_method` field")]
pub struct MethodInForm;

/// Field names frameworks take as the method: Rails, Laravel, Symfony and Express read
/// `_method`; ASP.NET MVC also the header's name as a form field.
const NAMES: [&[u8]; 4] = [
    b"_method",
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
];

/// Which readers a POST body gets: every way one of those frameworks may parse it, since
/// they do not agree on its Content-Type (Rack cuts the media type at `,` too, PHP at a
/// space, Laravel takes anything containing `/json` as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    urlencoded: bool,
    multipart: bool,
    json: bool,
}

impl Form {
    pub fn of(method: &Method, headers: &HeaderMap) -> Option<Self> {
        if method != Method::POST {
            return None;
        }
        let Some(kind) = headers.get(header::CONTENT_TYPE) else {
            // Rack parses a POST with no type as a form.
            return Some(Self {
                urlencoded: true,
                ..Self::default()
            });
        };
        let kind = kind.as_bytes().to_ascii_lowercase();
        // The media type, cut where any of them cuts it (`;`, `,`, a space).
        let media = kind
            .split(|&b| matches!(b, b';' | b',') || b.is_ascii_whitespace())
            .next()
            .unwrap_or_default();
        let has = |text: &[u8]| kind.windows(text.len()).any(|w| w == text);
        let mut form = Self {
            json: has(b"/json") || has(b"+json"),
            ..Self::default()
        };
        if media.is_empty() || media.starts_with(b"application/x-www-form-urlencoded") {
            form.urlencoded = true;
        } else if media.starts_with(b"multipart/") {
            form.multipart = true;
            // Without a boundary it reads, Rack reads the body as urlencoded.
            form.urlencoded = !multipart::plain_boundary(&kind);
        }
        (form != Self::default()).then_some(form)
    }

    /// Whether this is a form (urlencoded or multipart) compressed: it could not be read, and
    /// Express inflates it. A compressed JSON body passes unread (npm sends its audits so;
    /// Laravel, which reads `_method` from JSON, does not inflate).
    pub fn compressed_form(&self, headers: &HeaderMap) -> bool {
        (self.urlencoded || self.multipart)
            && headers
                .get_all(header::CONTENT_ENCODING)
                .iter()
                .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
    }
}

/// Whether a decoded query or form field name is one frameworks take as the method.
pub fn names_a_method(name: &[u8]) -> bool {
    Name::of(name).is_override()
}

/// A field name, read byte by byte (decoded) as frameworks normalise it: leading spaces and
/// brackets skipped (PHP, Rack 2), `.` and space as `_` (PHP), cut at NUL (PHP's C strings),
/// a trailing `]` ignored (Rack 2) and one `[]` or `[N]` after it (Express's qs makes an
/// array, method-override takes its first value), any case.
#[derive(Clone, Copy)]
struct Name {
    state: NameState,
    /// For each of [`NAMES`], how much of it the name is so far; `None` once it is not.
    matched: [Option<usize>; NAMES.len()],
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NameState {
    Leading,
    Text,
    /// After `]`.
    Closed,
    /// Inside a `[...]` after the name.
    Index,
    Indexed,
    /// Cut at NUL: what follows is not read.
    Ended,
    /// Nested or otherwise not a plain field.
    Other,
}

impl Name {
    fn new() -> Self {
        Self {
            state: NameState::Leading,
            matched: [Some(0); NAMES.len()],
        }
    }

    fn of(bytes: &[u8]) -> Self {
        let mut name = Self::new();
        bytes.iter().for_each(|&b| name.push(b));
        name
    }

    fn push(&mut self, b: u8) {
        use NameState::*;
        self.state = match (self.state, b) {
            (Ended | Other, _) => return,
            (_, 0) => Ended,
            (Leading, b' ' | b'[' | b']') => Leading,
            (Text | Closed, b']') => Closed,
            (Closed | Text, b'[') if self.is_whole() => Index,
            (Index, b'0'..=b'9') => Index,
            (Index, b']') => Indexed,
            (Leading | Text, _) => {
                let b = match b {
                    b'.' | b' ' => b'_',
                    b => b.to_ascii_lowercase(),
                };
                for (m, name) in self.matched.iter_mut().zip(NAMES) {
                    *m = m.filter(|&k| name.get(k) == Some(&b)).map(|k| k + 1);
                }
                Text
            }
            _ => Other,
        };
    }

    fn is_whole(&self) -> bool {
        self.matched
            .iter()
            .zip(NAMES)
            .any(|(m, name)| *m == Some(name.len()))
    }

    fn is_override(&self) -> bool {
        use NameState::*;
        matches!(self.state, Text | Closed | Indexed | Ended) && self.is_whole()
    }
}

/// The body's readers, fed the same chunks.
struct Readers {
    urlencoded: Option<urlencoded::Fields>,
    multipart: Option<multipart::Parts>,
    json: Option<json::Keys>,
}

impl Readers {
    fn new(form: Form) -> Self {
        Self {
            urlencoded: form.urlencoded.then(urlencoded::Fields::new),
            multipart: form.multipart.then(multipart::Parts::default),
            json: form.json.then(json::Keys::default),
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> bool {
        // Each reader sees the whole chunk: none stops the others' state short.
        let a = self.urlencoded.as_mut().is_some_and(|r| r.feed(chunk));
        let b = self.multipart.as_mut().is_some_and(|r| r.feed(chunk));
        let c = self.json.as_mut().is_some_and(|r| r.feed(chunk));
        a || b || c
    }
}

/// Passes `inner` through, ending it with [`MethodInForm`] at the chunk that names a method.
pub struct Scanned<B> {
    inner: B,
    readers: Readers,
    done: bool,
}

impl<B> Scanned<B> {
    pub fn new(inner: B, form: Form) -> Self {
        Self {
            inner,
            readers: Readers::new(form),
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
                let found = frame.data_ref().is_some_and(|data| this.readers.feed(data));
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

    fn form(kind: Option<&str>) -> Option<Form> {
        let mut h = HeaderMap::new();
        if let Some(k) = kind {
            h.insert(header::CONTENT_TYPE, k.parse().unwrap());
        }
        Form::of(&Method::POST, &h)
    }

    /// Whether the body passes with `kind`, whole and split at every byte.
    async fn passes(kind: &str, body: &str) -> bool {
        let form = form(Some(kind)).expect("a type the scan reads");
        let whole = Scanned::new(Chunks::of(&[body]), form.clone())
            .collect()
            .await
            .is_ok();
        for at in (1..body.len()).filter(|&at| body.is_char_boundary(at)) {
            let (a, b) = body.split_at(at);
            let split = Scanned::new(Chunks::of(&[a, b]), form.clone())
                .collect()
                .await
                .is_ok();
            assert_eq!(whole, split, "{kind} {body:?} split at {at}");
        }
        whole
    }

    const URLENCODED: &str = "application/x-www-form-urlencoded";
    const MULTIPART: &str = "multipart/form-data; boundary=BB";

    fn part(disposition: &str, content: &str) -> String {
        format!("--BB\r\n{disposition}\r\n\r\n{content}\r\n--BB--\r\n")
    }

    #[tokio::test]
    async fn a_method_field_is_caught_however_a_framework_spells_it() {
        for body in [
            "_method=DELETE",
            "title=x&_method=delete&b=2",
            "title=x&%5Fmethod=DELETE",
            "title=x&%5f%6Dethod=PUT",
            "a=1;_METHOD=patch",
            "_method=",
            // Rack's `& *`, Rack 2's brackets, PHP's `.`, space and NUL, qs's arrays,
            // ASP.NET's `%u` and field name.
            "a=1&  _method=DELETE",
            "[_method]=DELETE",
            "_method]=DELETE",
            ".method=DELETE",
            "+_method=DELETE",
            "_method%00x=DELETE",
            "%5B_method%5D=DELETE",
            "_method[]=DELETE",
            "_method[5]=DELETE",
            "[_method][]=DELETE",
            "%u005Fmethod=DELETE",
            "X-HTTP-Method-Override=DELETE",
            "a%=x&_method=DELETE",
        ] {
            assert!(!passes(URLENCODED, body).await, "{body:?}");
        }
        for disposition in [
            r#"Content-Disposition: form-data; name="_method""#,
            "content-disposition: form-data; NAME=_method",
            "Content-Disposition: form-data; name= _method",
            r#"Content-Disposition: form-data; name="_m\ethod""#,
            "Content-Disposition: form-data; name='_method'",
            r#"Content-Disposition: form-data; name=".method""#,
            "Content-Disposition: form-data; name*=UTF-8''%5Fmethod",
            r#"Content-Disposition: form-data; name*0="_me"; name*1="thod""#,
            r#"Content-Disposition: form-data; "x=";name=_method"#,
            "Content-Disposition: form-data; name=_method x",
            "Content-Disposition: form-data;\r\n name=\"_method\"",
            "Content-Disposition: form-data; na\r\nme=\"_method\"",
            r#"X-Content-Disposition: form-data; name="_method""#,
            // PHP's whitespace includes \v and \f; a line starting with one continues.
            "Content-Disposition: form-data; name=\"x\"\r\n\x0bX: ; name=\"_method\"",
            "Content-Disposition: form-data; name=_method\x0bjunk",
            "Content-Disposition: form-data; name=\x0b\"_method\"",
            "Content-Disposition: form-data; name=\"_method\0\"",
        ] {
            assert!(
                !passes(MULTIPART, &part(disposition, "DELETE")).await,
                "{disposition:?}"
            );
        }
        // Part structures Rack and PHP read, which a boundary-tracking reader could miss.
        for body in [
            "--BB\r\n\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nx\r\n--BB--\r\n",
            " --BB\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nx\r\n--BB--\r\n",
            "--BB\r\nX-A: 1\n\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nx",
            "x--BB\r\n\t--BB\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nx",
        ] {
            assert!(!passes(MULTIPART, body).await, "{body:?}");
        }
        for body in [
            r#"{"_method":"DELETE"}"#,
            r#"{"a": 1, "_method" : "DELETE"}"#,
            r#"{"\u005fmethod":"DELETE"}"#,
        ] {
            assert!(!passes("application/json", body).await, "{body:?}");
        }
    }

    #[tokio::test]
    async fn other_fields_values_and_file_contents_pass() {
        for body in [
            "title=_method%3DDELETE&body=x",
            "my_method=DELETE",
            "_methods=DELETE",
            "_method",
            "_method][x]=DELETE",
            "_method[x]=DELETE",
            "a=%zz&b=1",
            "",
        ] {
            assert!(passes(URLENCODED, body).await, "{body:?}");
        }
        let view = r#"<input type="hidden" name="_method" value="delete">"#;
        for body in [
            part(r#"Content-Disposition: form-data; name="title""#, "_method"),
            part(
                r#"Content-Disposition: form-data; name="file"; filename="_method""#,
                view,
            ),
        ] {
            assert!(passes(MULTIPART, &body).await, "{body:?}");
        }
        for body in [
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x","arguments":{"_method":"DELETE","X-HTTP-Method-Override":"PATCH"}}}"#,
            r#"["_method", "x"]"#,
            r#"{"note": "_method"}"#,
            r#"{"_METHOD":"DELETE"}"#,
        ] {
            assert!(passes("application/json", body).await, "{body:?}");
        }
    }

    #[test]
    fn which_readers_a_post_gets() {
        let urlencoded = Some(Form {
            urlencoded: true,
            ..Form::default()
        });
        assert_eq!(form(None), urlencoded);
        assert_eq!(form(Some("")), urlencoded);
        assert_eq!(form(Some(" ; x=1")), urlencoded);
        assert_eq!(
            form(Some("application/x-www-form-urlencoded; charset=utf-8")),
            urlencoded
        );
        // Cut at `,` (Rack) and at a space (PHP).
        assert_eq!(
            form(Some("application/x-www-form-urlencoded, text/plain")),
            urlencoded
        );
        assert_eq!(
            form(Some("application/x-www-form-urlencoded x")),
            urlencoded
        );
        let multipart = |urlencoded| {
            Some(Form {
                multipart: true,
                urlencoded,
                ..Form::default()
            })
        };
        assert_eq!(
            form(Some("Multipart/Form-Data; boundary=BB")),
            multipart(false)
        );
        assert_eq!(
            form(Some("multipart/mixed; boundary=\"a b\"")),
            multipart(false)
        );
        // A boundary servers may read differently, or not at all (Rack then reads the
        // body as urlencoded): both readers.
        for kind in [
            "multipart/form-data",
            "multipart/form-data; boundary=\"\"",
            "multipart/form-data; boundary =BB",
            "multipart/form-data; boundary=B@B",
            "multipart/form-data; charset=boundary; boundary=BB",
            "multipart/form-data; BOUNDARY=AA; boundary=BB",
        ] {
            assert_eq!(form(Some(kind)), multipart(true), "{kind}");
        }
        let json = Some(Form {
            json: true,
            ..Form::default()
        });
        assert_eq!(form(Some("application/json")), json);
        assert_eq!(form(Some("application/vnd.api+json")), json);
        // Laravel takes anything containing `/json` as JSON.
        assert_eq!(
            form(Some("application/x-www-form-urlencoded; x=/json")),
            Some(Form {
                urlencoded: true,
                json: true,
                ..Form::default()
            })
        );
        assert_eq!(form(Some("application/octet-stream")), None);
        assert_eq!(form(Some("application/x-git-upload-pack-request")), None);
        assert_eq!(Form::of(&Method::PUT, &HeaderMap::new()), None);
    }

    #[test]
    fn only_compressed_forms_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert!(form(Some(URLENCODED)).unwrap().compressed_form(&h));
        assert!(form(Some(MULTIPART)).unwrap().compressed_form(&h));
        // npm sends its audits as gzipped JSON.
        assert!(!form(Some("application/json")).unwrap().compressed_form(&h));
    }
}
