//! A method named in a POST's body: Rails (Rack's MethodOverride), Laravel, Symfony,
//! Express's method-override and ASP.NET MVC take a `_method` (or `X-HTTP-Method-Override`)
//! field as the request's real method, so a rule allowing POST to a path would let a DELETE
//! of it through. The body streams on unbuffered; the chunk that completes such a field
//! never leaves, and the request is aborted, as for a placeholder in a body.
//!
//! Read the way those frameworks parse: an `application/x-www-form-urlencoded` body (also a
//! POST with no or an empty Content-Type, and a multipart one without a boundary, which Rack
//! reads as one) field by field, names percent-decoded and normalised as PHP and Rack do; a
//! `multipart/*` body by its parts' `Content-Disposition` names; a JSON body (Laravel) by its
//! keys. A compressed such body is refused before it leaves (Express would inflate it).

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

/// Field names frameworks take as the method: Rails, Laravel, Symfony and Express read
/// `_method`; ASP.NET MVC also the header's name as a form field.
const NAMES: [&[u8]; 4] = [
    b"_method",
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
];

/// How a POST body is read for the override, if it is one a framework parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Urlencoded,
    Multipart,
    /// Laravel takes `_method` from a JSON body's top-level keys too.
    Json,
}

impl Form {
    pub fn of(method: &Method, headers: &HeaderMap) -> Option<Self> {
        if method != Method::POST {
            return None;
        }
        let Some(kind) = headers.get(header::CONTENT_TYPE) else {
            return Some(Self::Urlencoded);
        };
        let kind = kind.as_bytes().to_ascii_lowercase();
        let media = kind
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let has = |text: &[u8]| kind.windows(text.len()).any(|w| w == text);
        // Rack parses a POST with an empty type as a form, and a multipart one without a
        // boundary as urlencoded.
        if media.is_empty() || media == b"application/x-www-form-urlencoded" {
            Some(Self::Urlencoded)
        } else if media.starts_with(b"multipart/") {
            Some(if has(b"boundary=") {
                Self::Multipart
            } else {
                Self::Urlencoded
            })
        } else if has(b"/json") || has(b"+json") {
            Some(Self::Json)
        } else {
            None
        }
    }

    /// Whether such a body is compressed: it could not be read (Express inflates it).
    pub fn encoded(headers: &HeaderMap) -> bool {
        headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
    }
}

/// A field name, read byte by byte (decoded) as frameworks normalise it: leading spaces and
/// brackets skipped (PHP, Rack 2), `.` and space as `_` (PHP), trailing `]` ignored (Rack 2,
/// Express's qs), any case. A JSON key is taken as it is (`strict`).
#[derive(Clone, Copy)]
struct Name {
    strict: bool,
    started: bool,
    closed: bool,
    /// For each of [`NAMES`], how much of it the name is so far; `None` once it is not.
    matched: [Option<usize>; NAMES.len()],
}

impl Name {
    fn new(strict: bool) -> Self {
        Self {
            strict,
            started: false,
            closed: false,
            matched: [Some(0); NAMES.len()],
        }
    }

    fn push(&mut self, b: u8) {
        if !self.strict {
            if !self.started && matches!(b, b' ' | b'[' | b']') {
                return;
            }
            self.started = true;
            if b == b']' {
                self.closed = true;
                return;
            }
            if self.closed {
                // `_method][x]` is a nested key: a hash, no method.
                self.matched = [None; NAMES.len()];
                return;
            }
        }
        let b = match b {
            b'.' | b' ' if !self.strict => b'_',
            b => b.to_ascii_lowercase(),
        };
        for (m, name) in self.matched.iter_mut().zip(NAMES) {
            *m = m.filter(|&k| name.get(k) == Some(&b)).map(|k| k + 1);
        }
    }

    fn is_override(&self) -> bool {
        self.matched
            .iter()
            .zip(NAMES)
            .any(|(m, name)| *m == Some(name.len()))
    }

    fn of(bytes: &[u8], strict: bool) -> Self {
        let mut name = Self::new(strict);
        bytes.iter().for_each(|&b| name.push(b));
        name
    }
}

/// Whether a decoded query or form field name is one frameworks take as the method.
pub fn names_a_method(name: &[u8]) -> bool {
    Name::of(name, false).is_override()
}

/// Field by field through an urlencoded body, across chunks, holding nothing back: only the
/// `=` after a name completes a field, and it is checked before its chunk is passed on.
struct Fields {
    in_value: bool,
    name: Name,
    /// Hex digits of an escape in the name, and how many.
    escape: Option<(u8, u8)>,
}

impl Fields {
    fn new() -> Self {
        Self {
            in_value: false,
            name: Name::new(false),
            escape: None,
        }
    }

    /// Whether `chunk` completes a field naming a method that has a value.
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
                    // Not an escape after all: PHP and Rack keep it as text.
                    self.escape = None;
                    self.name.push(b'%');
                    self.name.push(b);
                    continue;
                };
                let value = (value << 4) | d as u8;
                if digits == 1 {
                    self.escape = None;
                    self.name.push(value);
                } else {
                    self.escape = Some((1, value));
                }
                continue;
            }
            match b {
                b'=' => {
                    if self.name.is_override() {
                        return true;
                    }
                    self.in_value = true;
                }
                b'%' => self.escape = Some((0, 0)),
                b'+' => self.name.push(b' '),
                _ => self.name.push(b),
            }
        }
        false
    }
}

/// A multipart body's parts, by the `name` of each `Content-Disposition` header line, checked
/// when the line ends (before the chunk that ends it leaves); the content of parts is not
/// looked at, so a file that quotes `name="_method"` passes.
struct Parts {
    line: Vec<u8>,
}

/// Longer header lines are refused rather than read in part.
const MAX_LINE: usize = 8 << 10;

impl Parts {
    fn feed(&mut self, chunk: &[u8]) -> bool {
        for &b in chunk {
            if b == b'\n' {
                let found = disposition_names_a_method(&self.line);
                self.line.clear();
                if found {
                    return true;
                }
            } else if self.line.len() <= MAX_LINE {
                self.line.push(b);
            }
        }
        false
    }
}

/// Whether a multipart line is a `Content-Disposition` whose `name` (quoted, with quoted
/// pairs, in single quotes as PHP reads it, or RFC 2231's `name*` and `name*0`, `name*1`...)
/// is one of [`NAMES`].
fn disposition_names_a_method(line: &[u8]) -> bool {
    const HEADER: &[u8] = b"content-disposition:";
    let line = line.trim_ascii();
    if line.len() < HEADER.len() || !line[..HEADER.len()].eq_ignore_ascii_case(HEADER) {
        return false;
    }
    if line.len() > MAX_LINE {
        return true;
    }
    let mut continued: Vec<(u32, Vec<u8>)> = Vec::new();
    for (key, value) in disposition_params(&line[HEADER.len()..]) {
        let key = key.to_ascii_lowercase();
        let value = match key.as_slice() {
            b"name" => value,
            b"name*" => extended_value(&value),
            _ => {
                let Some(rest) = key.strip_prefix(b"name*") else {
                    continue;
                };
                let (digits, decode) = match rest.strip_suffix(b"*") {
                    Some(d) => (d, true),
                    None => (rest, false),
                };
                let Some(n) = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
                else {
                    continue;
                };
                let piece = if decode && n == 0 {
                    extended_value(&value)
                } else if decode {
                    percent_encoding::percent_decode(&value).collect()
                } else {
                    value
                };
                continued.push((n, piece));
                continue;
            }
        };
        if Name::of(&value, false).is_override() {
            return true;
        }
    }
    continued.sort_by_key(|(n, _)| *n);
    let joined: Vec<u8> = continued.into_iter().flat_map(|(_, v)| v).collect();
    !joined.is_empty() && Name::of(&joined, false).is_override()
}

/// `charset'language'percent-encoded` (RFC 2231): the value, decoded.
fn extended_value(value: &[u8]) -> Vec<u8> {
    let encoded = value.splitn(3, |&b| b == b'\'').nth(2).unwrap_or(value);
    percent_encoding::percent_decode(encoded).collect()
}

/// The `key=value` parameters after the disposition type, values unquoted.
fn disposition_params(text: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = text
        .iter()
        .position(|&b| b == b';')
        .map_or(text.len(), |p| p + 1);
    while i < text.len() {
        let key_end = text[i..]
            .iter()
            .position(|&b| b == b'=' || b == b';')
            .map_or(text.len(), |p| i + p);
        let key = text[i..key_end].trim_ascii().to_vec();
        if key_end >= text.len() || text[key_end] == b';' {
            i = key_end + 1;
            continue;
        }
        i = key_end + 1;
        while i < text.len() && text[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = Vec::new();
        match text.get(i) {
            Some(&quote @ (b'"' | b'\'')) => {
                i += 1;
                while i < text.len() && text[i] != quote {
                    if quote == b'"' && text[i] == b'\\' && i + 1 < text.len() {
                        i += 1;
                    }
                    value.push(text[i]);
                    i += 1;
                }
                // Past the closing quote, to the next parameter.
                i = text[i..]
                    .iter()
                    .position(|&b| b == b';')
                    .map_or(text.len(), |p| i + p + 1);
            }
            _ => {
                let end = text[i..]
                    .iter()
                    .position(|&b| b == b';')
                    .map_or(text.len(), |p| i + p);
                value = text[i..end].trim_ascii().to_vec();
                i = end + 1;
            }
        }
        out.push((key, value));
    }
    out
}

/// A JSON body's top-level and nested keys: a string naming a method followed by `:`.
struct Keys {
    in_string: bool,
    escape: Option<JsonEscape>,
    name: Name,
    /// The last string named a method: a `:` now makes it a key.
    key: bool,
}

#[derive(Clone, Copy)]
enum JsonEscape {
    Backslash,
    Unicode(u8, u32),
}

impl Keys {
    fn feed(&mut self, chunk: &[u8]) -> bool {
        for &b in chunk {
            if !self.in_string {
                match b {
                    b'"' => {
                        self.in_string = true;
                        self.name = Name::new(true);
                        self.key = false;
                    }
                    b':' if self.key => return true,
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    _ => self.key = false,
                }
                continue;
            }
            match self.escape {
                Some(JsonEscape::Backslash) => {
                    if b == b'u' {
                        self.escape = Some(JsonEscape::Unicode(0, 0));
                    } else {
                        self.escape = None;
                        self.name.push(b);
                    }
                }
                Some(JsonEscape::Unicode(n, value)) => {
                    let value = (value << 4) | (b as char).to_digit(16).unwrap_or(0xff);
                    if n == 3 {
                        self.escape = None;
                        self.name.push(
                            u8::try_from(value)
                                .ok()
                                .filter(u8::is_ascii)
                                .unwrap_or(0xff),
                        );
                    } else {
                        self.escape = Some(JsonEscape::Unicode(n + 1, value));
                    }
                }
                None => match b {
                    b'\\' => self.escape = Some(JsonEscape::Backslash),
                    b'"' => {
                        self.in_string = false;
                        self.key = self.name.is_override();
                    }
                    _ => self.name.push(b),
                },
            }
        }
        false
    }
}

enum Reader {
    Urlencoded(Fields),
    Multipart(Parts),
    Json(Keys),
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
            Form::Multipart => Reader::Multipart(Parts { line: Vec::new() }),
            Form::Json => Reader::Json(Keys {
                in_string: false,
                escape: None,
                name: Name::new(true),
                key: false,
            }),
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
                    Reader::Json(keys) => keys.feed(data),
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
    async fn a_method_field_is_caught_whole_split_encoded_or_normalised() {
        for chunks in [
            &["_method=DELETE"][..],
            &["title=x&_method=delete&b=2"],
            &["title=x&_met", "hod", "=DELETE"],
            &["title=x&%5Fmethod=DELETE"],
            &["title=x&%5", "f%6Dethod=PUT"],
            &["a=1;_METHOD=patch"],
            &["_method="],
            // Rack's `& *`, Rack 2's brackets, PHP's `.` and space, qs's `[...]`.
            &["a=1&  _method=DELETE"],
            &["[_method]=DELETE"],
            &["_method]=DELETE"],
            &[".method=DELETE"],
            &["+_method=DELETE"],
            &["%5B_method%5D=DELETE"],
            &["X-HTTP-Method-Override=DELETE"],
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
            &["--b\r\nContent-Disposition: form-data; name= _method\r\n\r\nDELETE"],
            &["--b\r\nContent-Disposition: form-data; name=\"_m\\ethod\"\r\n\r\nx"],
            &["--b\r\nContent-Disposition: form-data; name='_method'\r\n\r\nx"],
            &["--b\r\nContent-Disposition: form-data; name=\".method\"\r\n\r\nx"],
            &["--b\r\nContent-Disposition: form-data; name*=UTF-8''%5Fmethod\r\n\r\nx"],
            &["--b\r\nContent-Disposition: form-data; name*0=\"_me\"; name*1=\"thod\"\r\n\r\nx"],
        ] {
            assert!(!passes(Form::Multipart, chunks).await, "{chunks:?}");
        }
        for chunks in [
            &[r#"{"_method":"DELETE"}"#][..],
            &[r#"{"a": 1, "_met"#, r#"hod" : "DELETE"}"#],
            &[r#"{"\u005fmethod":"DELETE"}"#],
        ] {
            assert!(!passes(Form::Json, chunks).await, "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn other_fields_values_and_file_contents_pass() {
        for chunks in [
            &["title=_method%3DDELETE&body=x"][..],
            &["my_method=DELETE"],
            &["_methods=DELETE"],
            &["_method"],
            &["x=1&_method%5B%5D=DELETE"],
            &["_method][x]=DELETE"],
            &["a=%zz&b=1"],
            &[],
        ] {
            assert!(passes(Form::Urlencoded, chunks).await, "{chunks:?}");
        }
        for chunks in [
            &["--b\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\n_method\r\n"][..],
            // A view template uploaded as a file quotes the field; its content is not read.
            &[
                "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"_method\"\r\n\r\n",
                "<input type=\"hidden\" name=\"_method\" value=\"delete\">\r\n--b--\r\n",
            ],
        ] {
            assert!(passes(Form::Multipart, chunks).await, "{chunks:?}");
        }
        for chunks in [
            &[r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"_method"}}"#][..],
            &[r#"["_method", "x"]"#],
        ] {
            assert!(passes(Form::Json, chunks).await, "{chunks:?}");
        }
    }

    #[test]
    fn which_posts_are_read() {
        let of = |kind: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(k) = kind {
                h.insert(header::CONTENT_TYPE, k.parse().unwrap());
            }
            Form::of(&Method::POST, &h)
        };
        assert_eq!(of(None), Some(Form::Urlencoded));
        assert_eq!(of(Some("")), Some(Form::Urlencoded));
        assert_eq!(of(Some(" ; x=1")), Some(Form::Urlencoded));
        assert_eq!(
            of(Some("application/x-www-form-urlencoded; charset=utf-8")),
            Some(Form::Urlencoded)
        );
        assert_eq!(
            of(Some("Multipart/Form-Data; boundary=b")),
            Some(Form::Multipart)
        );
        assert_eq!(
            of(Some("multipart/mixed; boundary=b")),
            Some(Form::Multipart)
        );
        assert_eq!(of(Some("multipart/form-data")), Some(Form::Urlencoded));
        assert_eq!(of(Some("application/json")), Some(Form::Json));
        assert_eq!(of(Some("application/vnd.api+json")), Some(Form::Json));
        assert_eq!(of(Some("application/octet-stream")), None);
        assert_eq!(of(Some("application/x-git-upload-pack-request")), None);
        assert_eq!(Form::of(&Method::PUT, &HeaderMap::new()), None);
    }
}
