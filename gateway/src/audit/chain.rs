//! The hash chain that makes the audit log tamper-evident.
//!
//! Every record line carries `seq` (1, 2, 3, … continuing across runs and rotated files) and
//! `prev`, the hex SHA-256 of the previous record line's exact bytes without its newline (64
//! zeros for the first record of a fresh chain). The writer thread puts both right after the
//! line's opening `{`, so a record is sealed by whoever writes it next.
//!
//! When the writer finds the file ending in something that is not a record (a line cut short
//! by a crash), it ends that line and writes a `chain-restarted` record: it continues the
//! chain from the last complete record and names the fragment by its length and hash, so the
//! fragment is accounted for instead of silently skipped.

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

pub type Hash = [u8; 32];

/// `prev` of the first record of a fresh chain.
pub const ZERO: Hash = [0; 32];

/// The reason of the record that follows a damaged line.
pub const RESTARTED: &str = "chain-restarted";

pub fn hash(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

pub fn hex(h: &Hash) -> String {
    let mut out = Vec::with_capacity(h.len() * 2);
    hex_into(h, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Runs for every record the writer seals: no per-byte formatting, no allocation.
fn hex_into(h: &Hash, out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in h {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
}

/// Lower-case hex only: the writer never writes anything else, so anything else was altered.
pub fn parse_hex(s: &str) -> Option<Hash> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Where the chain stands: the next record's `seq` and `prev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub next_seq: u64,
    pub prev: Hash,
}

impl Chain {
    pub const FRESH: Self = Self {
        next_seq: 1,
        prev: ZERO,
    };

    /// Continues after the record line `line` whose `seq` is `seq`.
    pub fn after(seq: u64, line: &[u8]) -> Self {
        Self {
            next_seq: seq.saturating_add(1),
            prev: hash(line),
        }
    }

    /// Appends `record` (one serialized JSON object, no newline) to `out` as a sealed line:
    /// `"seq":N,"prev":"…",` after its opening brace, then a newline. Advances the chain.
    pub fn seal(&mut self, record: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(record.first(), Some(&b'{'), "records are JSON objects");
        let start = out.len();
        out.extend_from_slice(b"{\"seq\":");
        serde_json::to_writer(&mut *out, &self.next_seq).expect("a number serializes");
        out.extend_from_slice(b",\"prev\":\"");
        hex_into(&self.prev, out);
        out.push(b'"');
        let rest = record.get(1..).unwrap_or(b"}");
        if rest.first() != Some(&b'}') {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        *self = Self::after(self.next_seq, &out[start..]);
        out.push(b'\n');
    }
}

/// The chain fields of one line, as far as they can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// A JSON object with a well-formed `seq` and `prev`.
    Chained {
        seq: u64,
        prev: Hash,
        /// For a `chain-restarted` record: the hash of the damaged line it follows.
        fragment: Option<Hash>,
    },
    /// A JSON object without `seq` and `prev` (written before the log had a chain).
    Unchained,
    /// A JSON object whose `seq` or `prev` is there but malformed.
    Malformed,
    /// Not a JSON object at all: a line cut short, or garbage.
    Damaged,
}

#[derive(Deserialize)]
struct Head {
    seq: Option<Value>,
    prev: Option<Value>,
    reason: Option<Value>,
    fragment_sha256: Option<Value>,
}

pub fn link(line: &[u8]) -> Link {
    let Ok(head) = serde_json::from_slice::<Head>(line) else {
        return Link::Damaged;
    };
    match (head.seq, head.prev) {
        (None, None) => Link::Unchained,
        (Some(seq), Some(prev)) => {
            let (Some(seq), Some(prev)) = (seq.as_u64(), prev.as_str().and_then(parse_hex)) else {
                return Link::Malformed;
            };
            let fragment = match (head.reason, head.fragment_sha256) {
                (Some(Value::String(r)), Some(Value::String(h))) if r == RESTARTED => parse_hex(&h),
                _ => None,
            };
            Link::Chained {
                seq,
                prev,
                fragment,
            }
        }
        _ => Link::Malformed,
    }
}

/// What the writer does before appending to a log whose last lines are known.
#[derive(Debug)]
pub struct Resume {
    pub chain: Chain,
    /// Bytes to write before the next record: a newline that ends a cut-short line, and a
    /// `chain-restarted` record after a damaged one. Empty when the log ends cleanly.
    pub prefix: Vec<u8>,
}

/// The tail of an existing log: its last line and the one before it (when known).
#[derive(Debug, Default)]
pub struct Tail {
    pub before: Option<Vec<u8>>,
    pub last: Option<Vec<u8>>,
    /// Whether the last line ended with a newline.
    pub terminated: bool,
    /// Whether the last line is the file's first (the whole file was read, and it is one
    /// line): a damaged one then follows the previous file's last record.
    pub last_is_first: bool,
}

impl Tail {
    /// The last two lines of `data`, which holds a whole file or its end. `whole` says whether
    /// `data` starts at the file's start (else its first line may be cut and is not used).
    pub fn of(data: &[u8], whole: bool) -> Self {
        if data.is_empty() {
            return Self::default();
        }
        let terminated = data.ends_with(b"\n");
        let body = if terminated {
            &data[..data.len() - 1]
        } else {
            data
        };
        let mut parts = body.rsplitn(3, |&b| b == b'\n');
        let last = parts.next().unwrap_or_default();
        let before = parts.next();
        let complete_before = parts.next().is_some() || whole;
        let last_complete = before.is_some() || whole;
        Self {
            before: before.filter(|_| complete_before).map(<[u8]>::to_vec),
            last: Some(last.to_vec()).filter(|_| last_complete),
            terminated,
            last_is_first: whole && before.is_none(),
        }
    }

    /// How to continue this log. `writable` says whether the tail is in the file about to be
    /// written (a cut-short line there gets its newline), rather than in a rotated one.
    pub fn resume(&self, writable: bool, now: &str) -> Resume {
        self.resume_after(writable, now, Chain::FRESH)
    }

    /// [`resume`](Self::resume), where `earlier` is how the previous file (`FILE.1`) left
    /// the chain: a damaged first line (a crash during the first write after a rotation)
    /// follows that, not a fresh start, which `verify` would take for records out of order.
    pub fn resume_after(&self, writable: bool, now: &str, earlier: Chain) -> Resume {
        let Some(last) = &self.last else {
            return Resume {
                chain: Chain::FRESH,
                prefix: Vec::new(),
            };
        };
        let mut prefix = Vec::new();
        if !self.terminated && writable {
            prefix.push(b'\n');
        }
        let chain = match link(last) {
            Link::Chained { seq, .. } => Chain::after(seq, last),
            Link::Unchained => Chain::FRESH,
            Link::Malformed | Link::Damaged => {
                let mut chain = match self.before.as_deref().map(|b| (b, link(b))) {
                    Some((b, Link::Chained { seq, .. })) => Chain::after(seq, b),
                    None if self.last_is_first => earlier,
                    _ => Chain::FRESH,
                };
                let note = serde_json::json!({
                    "ts": now,
                    "layer": "gateway",
                    "verdict": "note",
                    "sandbox": "",
                    "reason": RESTARTED,
                    "fragment_bytes": last.len(),
                    "fragment_sha256": hex(&hash(last)),
                });
                let note = serde_json::to_vec(&note).expect("a JSON value serializes");
                chain.seal(&note, &mut prefix);
                return Resume { chain, prefix };
            }
        };
        Resume { chain, prefix }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_puts_seq_and_prev_first_and_hashes_the_line() {
        let mut chain = Chain::FRESH;
        let mut out = Vec::new();
        chain.seal(br#"{"ts":"t","reason":"r"}"#, &mut out);
        chain.seal(b"{}", &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                r#"{{"seq":1,"prev":"{}","ts":"t","reason":"r"}}"#,
                "0".repeat(64)
            )
        );
        assert_eq!(
            lines[1],
            format!(
                r#"{{"seq":2,"prev":"{}"}}"#,
                hex(&hash(lines[0].as_bytes()))
            )
        );
        assert_eq!(chain.next_seq, 3);
        assert_eq!(chain.prev, hash(lines[1].as_bytes()));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn hex_round_trips_and_refuses_upper_case() {
        let h = hash(b"x");
        assert_eq!(parse_hex(&hex(&h)), Some(h));
        assert_eq!(parse_hex(&hex(&h).to_uppercase()), None);
        assert_eq!(parse_hex("00"), None);
    }

    #[test]
    fn link_reads_chain_fields() {
        let z = "0".repeat(64);
        assert_eq!(
            link(format!(r#"{{"seq":3,"prev":"{z}"}}"#).as_bytes()),
            Link::Chained {
                seq: 3,
                prev: ZERO,
                fragment: None
            }
        );
        assert_eq!(link(br#"{"ts":"x"}"#), Link::Unchained);
        assert_eq!(link(br#"{"seq":"3","prev":"x"}"#), Link::Malformed);
        assert_eq!(link(br#"{"seq":3}"#), Link::Malformed);
        assert_eq!(link(br#"{"seq":3,"pr"#), Link::Damaged);
        assert_eq!(link(b""), Link::Damaged);
        assert_eq!(link(b"[1]"), Link::Damaged);
    }

    #[test]
    fn tail_finds_the_last_two_complete_lines() {
        let t = Tail::of(b"a\nb\nc\n", true);
        assert_eq!(t.before.as_deref(), Some(&b"b"[..]));
        assert_eq!(t.last.as_deref(), Some(&b"c"[..]));
        assert!(t.terminated);
        let t = Tail::of(b"b\nc", false);
        assert_eq!(
            t.before, None,
            "the first line of a partial read may be cut"
        );
        assert_eq!(t.last.as_deref(), Some(&b"c"[..]));
        assert!(!t.terminated);
        let t = Tail::of(b"only", true);
        assert_eq!((t.before, t.last.as_deref()), (None, Some(&b"only"[..])));
        assert!(Tail::of(b"", true).last.is_none());
    }

    #[test]
    fn resume_continues_a_clean_log() {
        let mut chain = Chain::FRESH;
        let mut log = Vec::new();
        chain.seal(br#"{"a":1}"#, &mut log);
        chain.seal(br#"{"a":2}"#, &mut log);
        let r = Tail::of(&log, true).resume(true, "now");
        assert_eq!(r.chain, chain);
        assert!(r.prefix.is_empty());
    }

    #[test]
    fn resume_after_a_cut_line_ends_it_and_writes_a_restart_record() {
        let mut chain = Chain::FRESH;
        let mut log = Vec::new();
        chain.seal(br#"{"a":1}"#, &mut log);
        let after_first = chain;
        log.extend_from_slice(br#"{"seq":2,"prev":"ab"#);
        let r = Tail::of(&log, true).resume(true, "now");
        assert_eq!(r.prefix[0], b'\n');
        let note = std::str::from_utf8(&r.prefix[1..]).unwrap().trim_end();
        let v: Value = serde_json::from_str(note).unwrap();
        assert_eq!(v["seq"], 2);
        assert_eq!(v["prev"], hex(&after_first.prev));
        assert_eq!(v["reason"], RESTARTED);
        assert_eq!(v["fragment_sha256"], hex(&hash(br#"{"seq":2,"prev":"ab"#)));
        assert_eq!(r.chain, Chain::after(2, note.as_bytes()));
        // In a rotated file the fragment is left as it is.
        let r = Tail::of(&log, true).resume(false, "now");
        assert_eq!(r.prefix[0], b'{');
    }

    #[test]
    fn resume_after_unchained_records_starts_fresh() {
        let r = Tail::of(b"{\"ts\":\"x\"}\n", true).resume(true, "now");
        assert_eq!(r.chain, Chain::FRESH);
        assert!(r.prefix.is_empty());
        let r = Tail::of(b"{\"ts\":\"x\"}", true).resume(true, "now");
        assert_eq!(r.prefix, b"\n");
    }
}
