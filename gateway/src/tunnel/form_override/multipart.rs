//! A multipart body's part heads: the `name` a `Content-Disposition` gives a part, read as
//! PHP and Rack read it. Part contents are not looked at (an uploaded file may quote any
//! form). A head is judged whole, when its blank line comes: the chunk that ends it never
//! leaves if it names a method, and without its end no server takes the part.

/// Longer part heads are refused rather than read in part.
const MAX_HEAD: usize = 16 << 10;

/// The `boundary` parameter of a multipart Content-Type (lower-cased), if it is one that
/// servers agree on: not empty, and of RFC 2046's characters. Otherwise Rack reads the body
/// as urlencoded, and so does the caller.
pub fn boundary(kind: &[u8]) -> Option<Vec<u8>> {
    let at = kind.windows(8).position(|w| w == b"boundary")? + 8;
    let rest = kind[at..]
        .trim_ascii_start()
        .strip_prefix(b"=")?
        .trim_ascii_start();
    let value = match rest.strip_prefix(b"\"") {
        Some(quoted) => &quoted[..quoted.iter().position(|&b| b == b'"')?],
        None => {
            let end = rest
                .iter()
                .position(|&b| matches!(b, b';' | b',') || b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            &rest[..end]
        }
    };
    let bchars = |b: &u8| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(b);
    (!value.is_empty() && value.len() <= 70 && value.iter().all(bchars)).then(|| value.to_vec())
}

pub struct Parts {
    /// `--` and the boundary, lower-cased: a line starting with it opens a part's head.
    delimiter: Vec<u8>,
    /// The start of the current line (as much as the delimiter needs), in a part's content.
    line: Vec<u8>,
    /// The head being read, when in one.
    head: Option<Vec<u8>>,
}

impl Parts {
    pub fn new(boundary: Vec<u8>) -> Self {
        let mut delimiter = b"--".to_vec();
        delimiter.extend(boundary);
        Self {
            delimiter,
            line: Vec::new(),
            head: None,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        chunk.iter().any(|&b| self.byte(b))
    }

    fn byte(&mut self, b: u8) -> bool {
        if let Some(head) = &mut self.head {
            head.push(b);
            if head.ends_with(b"\n\n")
                || head.ends_with(b"\n\r\n")
                || head == b"\r\n"
                || head == b"\n"
            {
                let head = self.head.take().unwrap_or_default();
                return names_a_method(&head);
            }
            return head.len() > MAX_HEAD;
        }
        if b == b'\n' {
            let line = std::mem::take(&mut self.line);
            if line
                .trim_ascii_end()
                .to_ascii_lowercase()
                .starts_with(&self.delimiter)
            {
                self.head = Some(Vec::new());
            }
        } else if self.line.len() <= self.delimiter.len() + 2 {
            self.line.push(b);
        }
        false
    }
}

/// Whether a part's head has a `Content-Disposition` (also as part of a longer header name,
/// as Rack 2's unanchored match reads it) whose `name` is one of the method's.
fn names_a_method(head: &[u8]) -> bool {
    unfolded(head).iter().any(|line| {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return false;
        };
        let field = line[..colon].to_ascii_lowercase();
        field.windows(19).any(|w| w == b"content-disposition") && {
            let names = disposition_names(&line[colon + 1..]);
            names.iter().any(|n| super::names_a_method(n))
        }
    })
}

/// The head's header lines, a line that starts with a space or tab, or has no colon, joined
/// to the one before it (folding, and PHP's reading of a colon-less line).
fn unfolded(head: &[u8]) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for raw in head.split(|&b| b == b'\n') {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.trim_ascii().is_empty() {
            continue;
        }
        let continues = raw[0] == b' ' || raw[0] == b'\t' || !raw.contains(&b':');
        match lines.last_mut() {
            Some(last) if continues => last.extend_from_slice(raw),
            _ => lines.push(raw.to_vec()),
        }
    }
    lines
}

/// Every name a disposition value gives: `name` (quoted with `\` escapes, single-quoted as
/// PHP reads it, or bare, also cut at a space as PHP cuts it), RFC 2231's `name*`, and the
/// `name*0`, `name*1`... pieces joined. Parameters are split outside quotes only.
fn disposition_names(value: &[u8]) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    let mut pieces: Vec<(u32, Vec<u8>)> = Vec::new();
    for (key, value, quoted) in params(value) {
        let key = key.trim_ascii().to_ascii_lowercase();
        if key == b"name" {
            if !quoted && let Some(cut) = value.split(|b| b.is_ascii_whitespace()).next() {
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
        while i < text.len() && text[i].is_ascii_whitespace() {
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
            value = value.trim_ascii().to_vec();
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
