//! A multipart body's part heads: the `name` a `Content-Disposition` gives a part, read as
//! PHP and Rack read it. Frameworks disagree on where a part's head starts and ends (Rack
//! and PHP take different line ends, whitespace and boundaries), so no part structure is
//! tracked here: every line of the body is judged as if it were a head line, folded lines
//! joined. A line is judged when it ends: the chunk that ends it never leaves if it names a
//! method. So a file whose text quotes a part head naming the method is refused too.

/// The most of a line kept; a longer line that may be a disposition is refused.
const MAX_LINE: usize = 16 << 10;

/// Whitespace as PHP reads it (C's `isspace`), which Rust's ASCII whitespace lacks `\v` of.
pub fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// Whether a multipart Content-Type (lower-cased) has one boundary that every server reads
/// the same: one `boundary` in it, followed at once by `=` and a value of RFC 2046's
/// characters. Otherwise some read none and parse the body as urlencoded (Rack), or read
/// another (PHP takes the first `boundary`, older Rack the last).
pub fn plain_boundary(kind: &[u8]) -> bool {
    let mut at = kind
        .windows(8)
        .enumerate()
        .filter(|(_, w)| *w == b"boundary");
    let (Some((first, _)), None) = (at.next(), at.next()) else {
        return false;
    };
    let Some(rest) = kind[first + 8..].strip_prefix(b"=") else {
        return false;
    };
    let value = match rest.strip_prefix(b"\"") {
        Some(quoted) => match quoted.iter().position(|&b| b == b'"') {
            Some(end) => &quoted[..end],
            None => return false,
        },
        None => &rest[..rest.iter().position(|&b| b == b';').unwrap_or(rest.len())],
    };
    let bchars = |b: &u8| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(b);
    !value.is_empty() && value.len() <= 70 && !value.ends_with(b" ") && value.iter().all(bchars)
}

#[derive(Default)]
pub struct Parts {
    /// The current line, up to [`MAX_LINE`] bytes of it.
    line: Vec<u8>,
    /// Whether the current line is longer than that.
    long: bool,
    /// The line before, with what was folded into it.
    previous: Vec<u8>,
}

impl Parts {
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        let mut rest = chunk;
        while let Some(end) = memchr::memchr(b'\n', rest) {
            self.keep(&rest[..end]);
            if self.line_ends() {
                return true;
            }
            rest = &rest[end + 1..];
        }
        self.keep(rest);
        false
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = MAX_LINE - self.line.len();
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.long |= bytes.len() > room;
    }

    /// Judges the line that just ended, joined to the one before if it continues it (it
    /// starts with whitespace, or has no colon: PHP appends such a line).
    fn line_ends(&mut self) -> bool {
        let line = std::mem::take(&mut self.line);
        let long = std::mem::take(&mut self.long);
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        let continues = line.first().is_some_and(|&b| is_space(b)) || !line.contains(&b':');
        let judged = if continues && !line.iter().all(|&b| is_space(b)) {
            let mut joined = std::mem::take(&mut self.previous);
            joined
                .extend_from_slice(&line[..line.len().min(MAX_LINE - joined.len().min(MAX_LINE))]);
            joined
        } else {
            line.to_vec()
        };
        let found = if long || judged.len() >= MAX_LINE {
            is_disposition(&judged)
        } else {
            names_a_method(&judged)
        };
        self.previous = judged;
        found
    }
}

/// Whether a head line is a `Content-Disposition`, also as part of a longer header name
/// (Rack 2 matches it anywhere in a line).
fn is_disposition(line: &[u8]) -> bool {
    let field = &line[..line.iter().position(|&b| b == b':').unwrap_or(line.len())];
    field
        .windows(19)
        .any(|w| w.eq_ignore_ascii_case(b"content-disposition"))
}

/// Whether a head line is a disposition whose `name` is one of the method's.
fn names_a_method(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    is_disposition(line)
        && disposition_names(&line[colon + 1..])
            .iter()
            .any(|n| super::names_a_method(n))
}

/// Every name a disposition value gives: `name` (quoted with `\` escapes, single-quoted as
/// PHP reads it, or bare, also cut at whitespace as PHP cuts it), RFC 2231's `name*`, and
/// the `name*0`, `name*1`... pieces joined. Parameters are split outside quotes only.
fn disposition_names(value: &[u8]) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    let mut pieces: Vec<(u32, Vec<u8>)> = Vec::new();
    for (key, value, quoted) in params(value) {
        let key = trim(&key).to_ascii_lowercase();
        if key == b"name" {
            if !quoted && let Some(cut) = value.split(|&b| is_space(b)).next() {
                names.push(cut.to_vec());
            }
            names.push(value);
        } else if key == b"name*" {
            names.push(extended_value(&value));
        } else if let Some(rest) = key.strip_prefix(b"name*") {
            let (digits, encoded) = match rest.strip_suffix(b"*") {
                Some(d) => (d, true),
                None => (rest, false),
            };
            let Some(n) = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok())
            else {
                continue;
            };
            let piece = match (encoded, n) {
                (true, 0) => extended_value(&value),
                (true, _) => percent_encoding::percent_decode(&value).collect(),
                (false, _) => value,
            };
            pieces.push((n, piece));
        }
    }
    if !pieces.is_empty() {
        pieces.sort_by_key(|(n, _)| *n);
        names.push(pieces.into_iter().flat_map(|(_, v)| v).collect());
    }
    names
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| !is_space(b))
        .map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}

/// `charset'language'percent-encoded` (RFC 2231): the value, decoded.
fn extended_value(value: &[u8]) -> Vec<u8> {
    let encoded = value.splitn(3, |&b| b == b'\'').nth(2).unwrap_or(value);
    percent_encoding::percent_decode(encoded).collect()
}

/// The `key=value` parameters after the disposition type: keys and bare values end at `;`
/// outside quotes; a value in `"` (with `\` escapes) or `'` is taken whole, unquoted.
fn params(text: &[u8]) -> Vec<(Vec<u8>, Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut i = 0;
    // Past the disposition type.
    skip_to_semicolon(text, &mut i);
    while i < text.len() {
        let mut key = Vec::new();
        while i < text.len() && !matches!(text[i], b'=' | b';') {
            if matches!(text[i], b'"' | b'\'') {
                // A quoted string where a key should be (`"x=";name=...`): skipped whole.
                let quote = text[i];
                i += 1;
                while i < text.len() && text[i] != quote {
                    i += 1;
                }
                key.push(b'"');
            } else {
                key.push(text[i]);
            }
            i += 1;
        }
        if i >= text.len() || text[i] == b';' {
            i += 1;
            continue;
        }
        i += 1;
        while i < text.len() && is_space(text[i]) {
            i += 1;
        }
        let mut value = Vec::new();
        let quoted = matches!(text.get(i), Some(b'"' | b'\''));
        if quoted {
            let quote = text[i];
            i += 1;
            while i < text.len() && text[i] != quote {
                if quote == b'"' && text[i] == b'\\' && i + 1 < text.len() {
                    i += 1;
                }
                value.push(text[i]);
                i += 1;
            }
            // Past the closing quote, then to the next parameter.
            i += 1;
            skip_to_semicolon(text, &mut i);
        } else {
            while i < text.len() && text[i] != b';' {
                value.push(text[i]);
                i += 1;
            }
            i += 1;
            value = trim(&value).to_vec();
        }
        out.push((key, value, quoted));
    }
    out
}

/// Moves `i` past the next `;` outside quotes (or to the end).
fn skip_to_semicolon(text: &[u8], i: &mut usize) {
    let mut quote = None;
    while *i < text.len() {
        match (quote, text[*i]) {
            (None, b';') => {
                *i += 1;
                return;
            }
            (None, q @ (b'"' | b'\'')) => quote = Some(q),
            (Some(q), b) if b == q => quote = None,
            _ => {}
        }
        *i += 1;
    }
}
