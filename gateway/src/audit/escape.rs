//! What `gateway audit` prints to an auditor's terminal. Records hold what sandboxed
//! processes chose (a process name set with prctl, a unix socket path, a request path): in
//! the table, control characters, backslashes and format characters are shown escaped, so a
//! record can neither move the cursor or recolour the terminal, nor reorder what is shown
//! with bidi overrides, hide text behind zero-width characters, or pass a literal `\u{1b}`
//! off as an escaped ESC. `--json` writes C1 controls, DEL and format characters as `\uXXXX`
//! escapes: valid JSON with the same value.

use std::io::{self, Write};

/// Unicode's format characters (general category Cf, as of Unicode 15.1: soft hyphen, bidi
/// marks, embeddings, overrides and isolates, zero-width characters, the byte order mark,
/// interlinear annotations, tags) and the line and paragraph separators (U+2028, U+2029),
/// which some terminals take as line breaks.
const FORMAT: &[(char, char)] = &[
    ('\u{ad}', '\u{ad}'),
    ('\u{600}', '\u{605}'),
    ('\u{61c}', '\u{61c}'),
    ('\u{6dd}', '\u{6dd}'),
    ('\u{70f}', '\u{70f}'),
    ('\u{890}', '\u{891}'),
    ('\u{8e2}', '\u{8e2}'),
    ('\u{180e}', '\u{180e}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{2028}', '\u{202e}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{fff9}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0001}', '\u{e0001}'),
    ('\u{e0020}', '\u{e007f}'),
];

/// A format character, or a line or paragraph separator.
fn is_format(c: char) -> bool {
    // Everything listed is above U+00AC: ASCII and Latin-1 letters cost one comparison.
    c >= '\u{ad}' && FORMAT.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// A table cell: control characters (C0, DEL, C1), backslashes and format characters
/// escaped as Rust writes them (`\u{1b}`, `\\`, `\u{202e}`, `\n`); `-` for an empty field.
pub fn printable(s: &str) -> String {
    if s.is_empty() {
        return "-".into();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\\' || is_format(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes a record's JSON line for `--json`, with C1 controls, DEL and format characters as
/// `\uXXXX` escapes (a pair of them above U+FFFF). serde_json escapes only what JSON
/// requires (below U+0020, `"` and `\`), so these reach the file raw; JSON allows them only
/// inside strings, where an escape is the same value. Bytes that are not UTF-8 are written as
/// they are.
pub fn write_json_line(line: &[u8], out: &mut dyn Write) -> io::Result<()> {
    if line.is_ascii() && !line.contains(&0x7f) {
        return out.write_all(line);
    }
    let mut buf = Vec::with_capacity(line.len() + 32);
    for chunk in line.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) || is_format(c) {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(buf, "\\u{unit:04x}")?;
                }
            } else {
                let mut utf8 = [0u8; 4];
                buf.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
        buf.extend_from_slice(chunk.invalid());
    }
    out.write_all(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_table_is_sorted_and_holds_the_bidi_controls() {
        assert!(FORMAT.windows(2).all(|w| w[0].1 < w[1].0));
        for c in ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}') {
            assert!(is_format(c), "{c:?}");
        }
        for c in [
            'a', 'é', '中', '\u{ac}', '\u{ae}', '\u{2030}', '\u{fffd}', '😀',
        ] {
            assert!(!is_format(c), "{c:?}");
        }
    }

    #[test]
    fn json_escapes_keep_bytes_that_are_not_utf8() {
        let mut out = Vec::new();
        write_json_line(b"{\"a\":\"\xff\xc2\x9b\x7f\"}", &mut out).unwrap();
        assert_eq!(out, b"{\"a\":\"\xff\\u009b\\u007f\"}");
    }
}
