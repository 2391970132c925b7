//! A JSON body's top-level keys: Laravel reads `_method` (exactly) from a JSON body as from
//! a form. Deeper keys are left alone: an MCP tool call's arguments may name anything.

/// The key frameworks read, exactly.
const KEY: &[u8] = b"_method";

#[derive(Default)]
pub struct Keys {
    /// Objects and arrays open around the current byte.
    depth: usize,
    in_string: bool,
    escape: Option<Escape>,
    /// The current string so far, while it may still be [`KEY`].
    string: Option<Vec<u8>>,
    /// The last string, at depth 1, was [`KEY`]: a `:` now makes it a key.
    key: bool,
}

#[derive(Clone, Copy)]
enum Escape {
    Backslash,
    Unicode(u8, u32),
}

impl Keys {
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        chunk.iter().any(|&b| self.byte(b))
    }

    fn byte(&mut self, b: u8) -> bool {
        if !self.in_string {
            match b {
                b'"' => {
                    self.in_string = true;
                    self.string = Some(Vec::with_capacity(KEY.len()));
                    self.key = false;
                }
                b':' if self.key => return true,
                b'{' | b'[' => {
                    self.depth += 1;
                    self.key = false;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    self.key = false;
                }
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ => self.key = false,
            }
            return false;
        }
        let c = match self.escape {
            Some(Escape::Backslash) if b == b'u' => {
                self.escape = Some(Escape::Unicode(0, 0));
                return false;
            }
            Some(Escape::Backslash) => {
                self.escape = None;
                b
            }
            Some(Escape::Unicode(n, value)) => {
                let value = (value << 4) | (b as char).to_digit(16).unwrap_or(0xff);
                if n < 3 {
                    self.escape = Some(Escape::Unicode(n + 1, value));
                    return false;
                }
                self.escape = None;
                u8::try_from(value)
                    .ok()
                    .filter(u8::is_ascii)
                    .unwrap_or(0xff)
            }
            None if b == b'\\' => {
                self.escape = Some(Escape::Backslash);
                return false;
            }
            None if b == b'"' => {
                self.in_string = false;
                self.key = self.depth == 1 && self.string.take().as_deref() == Some(KEY);
                return false;
            }
            None => b,
        };
        if let Some(s) = &mut self.string {
            if s.len() < KEY.len() && KEY[s.len()] == c {
                s.push(c);
            } else {
                self.string = None;
            }
        }
        false
    }
}
