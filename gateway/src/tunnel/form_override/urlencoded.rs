//! An urlencoded body, field by field across chunks, holding nothing back: only the `=`
//! after a name completes a field, and it is checked before its chunk is passed on.

use super::Name;

pub struct Fields {
    in_value: bool,
    name: Name,
    /// An escape in the name being read: `%`, then `u` for IIS's `%uXXXX` (ASP.NET decodes
    /// it in form names), then hex digits.
    escape: Option<Vec<u8>>,
}

impl Fields {
    pub fn new() -> Self {
        Self {
            in_value: false,
            name: Name::new(),
            escape: None,
        }
    }

    /// Whether `chunk` completes a field naming a method.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        chunk.iter().any(|&b| self.byte(b))
    }

    fn byte(&mut self, b: u8) -> bool {
        if matches!(b, b'&' | b';') {
            *self = Self::new();
            return false;
        }
        if self.in_value {
            return false;
        }
        if let Some(mut escape) = self.escape.take() {
            let unicode = escape.first() == Some(&b'u');
            let wanted = if unicode { 5 } else { 2 };
            let fits = b.is_ascii_hexdigit() || (escape.is_empty() && matches!(b, b'u' | b'U'));
            if !fits {
                // Not an escape after all: PHP and Rack keep its text, and this byte is read
                // as any other.
                self.name.push(b'%');
                escape.iter().for_each(|&e| self.name.push(e));
                return self.byte(b);
            }
            escape.push(b.to_ascii_lowercase());
            if escape.len() < wanted {
                self.escape = Some(escape);
                return false;
            }
            let hex = std::str::from_utf8(&escape[usize::from(unicode)..]).unwrap_or_default();
            let value = u32::from_str_radix(hex, 16).unwrap_or(0xff);
            // A character beyond ASCII is in no method's name.
            self.name.push(
                u8::try_from(value)
                    .ok()
                    .filter(u8::is_ascii)
                    .unwrap_or(0xff),
            );
            return false;
        }
        match b {
            b'=' => {
                if self.name.is_override() {
                    return true;
                }
                self.in_value = true;
            }
            b'%' => self.escape = Some(Vec::with_capacity(5)),
            b'+' => self.name.push(b' '),
            _ => self.name.push(b),
        }
        false
    }
}
