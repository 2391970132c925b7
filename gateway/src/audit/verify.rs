//! `gateway audit verify`: walks the hash chain and names the first record that was altered,
//! removed or reordered.
//!
//! What the chain proves and what it cannot: each record's `prev` pins the exact bytes of the
//! record before it, and `seq` counts them, so a changed byte, a deleted or inserted line and
//! a swap are all found, in any record but the newest. The newest record is pinned by
//! nothing after it, and cutting records off the end (or off the start of the oldest file)
//! leaves a shorter chain that is still intact: the summary names the first and last `seq`
//! and the newest record's hash so an auditor can compare them with a copy kept elsewhere.

use std::collections::HashMap;

use super::{
    chain::{self, Hash, Link, ZERO},
    files::LogLine,
};

/// An intact chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Intact {
    pub records: u64,
    /// First and last `seq` and the newest record's hash; `None` for an empty log.
    pub span: Option<(u64, u64, Hash)>,
    /// Things an auditor should know that do not break the chain.
    pub notes: Vec<String>,
}

impl Intact {
    pub fn summary(&self) -> String {
        match self.span {
            Some((first, last, head)) => format!(
                "{} records, chain intact from seq {first} to {last} (sha256 of seq {last}: {})",
                self.records,
                chain::hex(&head)
            ),
            None => "0 records: nothing to verify".into(),
        }
    }
}

/// The first problem, as `FILE:LINE: what`.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken(pub String);

struct Entry {
    file: usize,
    number: usize,
    kind: Kind,
}

enum Kind {
    Record {
        seq: u64,
        prev: Hash,
        hash: Hash,
        fragment: Option<Hash>,
    },
    Unchained,
    Malformed,
    Damaged {
        hash: Hash,
        terminated: bool,
    },
}

/// Verifies the lines of a log, oldest first; `names` are the files' names for messages.
pub fn verify(
    lines: impl IntoIterator<Item = LogLine>,
    names: &[String],
) -> Result<Intact, Broken> {
    let entries: Vec<Entry> = lines
        .into_iter()
        .map(|l| {
            let kind = match chain::link(&l.bytes) {
                Link::Chained {
                    seq,
                    prev,
                    fragment,
                } => Kind::Record {
                    seq,
                    prev,
                    hash: chain::hash(&l.bytes),
                    fragment,
                },
                Link::Unchained => Kind::Unchained,
                Link::Malformed => Kind::Malformed,
                Link::Damaged => Kind::Damaged {
                    hash: chain::hash(&l.bytes),
                    terminated: l.terminated,
                },
            };
            Entry {
                file: l.file,
                number: l.number,
                kind,
            }
        })
        .collect();
    let loc = |i: usize| {
        let e = &entries[i];
        format!(
            "{}:{}",
            names.get(e.file).map_or("?", String::as_str),
            e.number
        )
    };
    // Where each seq first appears, to tell a reordered record from a removed one.
    let mut first_at: HashMap<u64, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if let Kind::Record { seq, .. } = e.kind {
            first_at.entry(seq).or_insert(i);
        }
    }
    let next_record = |i: usize| {
        entries[i + 1..].iter().find_map(|e| match e.kind {
            Kind::Record { seq, prev, .. } => Some((seq, prev)),
            _ => None,
        })
    };

    let mut notes = Vec::new();
    let mut unchained = 0u64;
    let mut first_unchained = 0;
    let mut records = 0u64;
    let mut first = None;
    // The last record accepted: index, seq, hash.
    let mut last: Option<(usize, u64, Hash)> = None;
    for (i, e) in entries.iter().enumerate() {
        match e.kind {
            Kind::Damaged { hash, terminated } => {
                if let Some(Entry {
                    kind:
                        Kind::Record {
                            seq,
                            fragment: Some(f),
                            ..
                        },
                    ..
                }) = entries.get(i + 1)
                    && *f == hash
                {
                    notes.push(format!(
                        "{}: truncated record, accounted for by the chain-restarted record seq {seq} after it",
                        loc(i)
                    ));
                    continue;
                }
                if !terminated && i + 1 == entries.len() {
                    notes.push(format!(
                        "{}: truncated record at the end of the log, not covered by the chain",
                        loc(i)
                    ));
                    continue;
                }
                return Err(Broken(format!(
                    "{}: not a valid audit record: altered, damaged or inserted",
                    loc(i)
                )));
            }
            Kind::Unchained if last.is_none() => {
                if unchained == 0 {
                    first_unchained = i;
                }
                unchained += 1;
            }
            Kind::Unchained => {
                return Err(Broken(format!(
                    "{}: record without seq and prev inside the chain: inserted or altered",
                    loc(i)
                )));
            }
            Kind::Malformed => {
                return Err(Broken(format!(
                    "{}: record with a malformed seq or prev: altered",
                    loc(i)
                )));
            }
            Kind::Record {
                seq, prev, hash, ..
            } => {
                match last {
                    None => {
                        first = Some(seq);
                        if prev != ZERO {
                            notes.push(format!(
                                "{}: the chain starts at seq {seq} with a prev hash, not at a fresh start: the records before it are not in these files",
                                loc(i)
                            ));
                        }
                    }
                    Some((li, lseq, lhash)) => {
                        let expected = lseq.saturating_add(1);
                        if prev == lhash {
                            if seq != expected {
                                return Err(Broken(format!(
                                    "{}: record seq {seq} was altered: it follows seq {lseq} ({}) by its hash, so its seq should be {expected}",
                                    loc(i),
                                    loc(li)
                                )));
                            }
                        } else if seq == expected {
                            // This record's prev no longer matches the record before it: that
                            // one was altered, or this one's prev was. If the record after this
                            // one still matches this one, this one is as written.
                            let this_intact = next_record(i)
                                .is_some_and(|(s, p)| s == seq.saturating_add(1) && p == hash);
                            return Err(Broken(if this_intact {
                                format!(
                                    "{}: record seq {lseq} was altered (record seq {seq} after it no longer matches its hash)",
                                    loc(li)
                                )
                            } else {
                                format!(
                                    "{}: record seq {seq} was altered or the one before it was (seq {lseq}, {})",
                                    loc(i),
                                    loc(li)
                                )
                            }));
                        } else if seq > expected {
                            if let Some(&j) = first_at.get(&expected).filter(|&&j| j > i) {
                                return Err(Broken(format!(
                                    "{}: record seq {seq} is out of order: seq {expected} comes after it, at {}",
                                    loc(i),
                                    loc(j)
                                )));
                            }
                            let missing = if seq - expected == 1 {
                                format!("record seq {expected} was")
                            } else {
                                format!("records seq {expected} to {} were", seq - 1)
                            };
                            return Err(Broken(format!(
                                "{}: {missing} removed before record seq {seq} (the log goes from seq {lseq} to seq {seq})",
                                loc(i)
                            )));
                        } else if seq == lseq {
                            return Err(Broken(format!(
                                "{}: record seq {seq} appears twice (also at {}): inserted",
                                loc(i),
                                loc(li)
                            )));
                        } else {
                            return Err(Broken(format!(
                                "{}: record seq {seq} is out of order: it comes after seq {lseq} ({})",
                                loc(i),
                                loc(li)
                            )));
                        }
                    }
                }
                last = Some((i, seq, hash));
                records += 1;
            }
        }
    }
    if unchained > 0 {
        if last.is_none() {
            return Err(Broken(format!(
                "{unchained} records and none carries seq and prev: nothing can be verified (written before the log had a chain?)"
            )));
        }
        // Nothing vouches for them: a reader would show them as records all the same.
        return Err(Broken(format!(
            "{}: {unchained} records before seq {} carry no seq and prev (written before the log had a chain, or put there since): not verified",
            loc(first_unchained),
            first.unwrap_or(0)
        )));
    }
    Ok(Intact {
        records,
        span: first
            .zip(last)
            .map(|(first, (_, last, head))| (first, last, head)),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{Chain, Tail};

    const NAMES: [&str; 2] = ["log.1", "log"];

    /// A log of `n` sealed records as lines.
    fn sealed(n: usize) -> Vec<Vec<u8>> {
        let mut chain = Chain::FRESH;
        let mut out = Vec::new();
        for i in 0..n {
            chain.seal(
                format!(r#"{{"ts":"t","layer":"kernel","verdict":"deny","n":{i}}}"#).as_bytes(),
                &mut out,
            );
        }
        out.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    /// One file holding `lines`, each terminated.
    fn one_file(lines: &[Vec<u8>]) -> Vec<LogLine> {
        lines
            .iter()
            .enumerate()
            .map(|(i, b)| LogLine {
                file: 1,
                number: i + 1,
                bytes: b.clone(),
                terminated: true,
            })
            .collect()
    }

    fn check(lines: &[Vec<u8>]) -> Result<Intact, Broken> {
        let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
        verify(one_file(lines), &names)
    }

    fn broken(lines: &[Vec<u8>]) -> String {
        match check(lines) {
            Err(Broken(m)) => m,
            Ok(i) => panic!("verified: {}", i.summary()),
        }
    }

    #[test]
    fn an_intact_log_verifies() {
        let log = sealed(5);
        let intact = check(&log).unwrap();
        assert_eq!(intact.records, 5);
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((1, 5)));
        assert!(intact.notes.is_empty(), "{:?}", intact.notes);
        assert!(
            intact
                .summary()
                .starts_with("5 records, chain intact from seq 1 to 5")
        );
        assert_eq!(
            check(&[]).unwrap().summary(),
            "0 records: nothing to verify"
        );
    }

    #[test]
    fn a_changed_byte_names_the_altered_record() {
        let mut log = sealed(5);
        let at = log[2].windows(4).position(|w| w == b"deny").unwrap();
        log[2][at] = b'D';
        assert_eq!(
            broken(&log),
            "log:3: record seq 3 was altered (record seq 4 after it no longer matches its hash)"
        );
    }

    #[test]
    fn a_changed_prev_is_named_with_its_neighbour() {
        let mut log = sealed(5);
        // The first hex digit of prev in record 3.
        let at = log[2].windows(8).position(|w| w == b"\"prev\":\"").unwrap() + 8;
        log[2][at] = if log[2][at] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            broken(&log),
            "log:3: record seq 3 was altered or the one before it was (seq 2, log:2)"
        );
    }

    #[test]
    fn a_changed_seq_is_altered() {
        let mut log = sealed(5);
        log[2] = String::from_utf8(log[2].clone())
            .unwrap()
            .replacen("\"seq\":3", "\"seq\":9", 1)
            .into_bytes();
        assert_eq!(
            broken(&log),
            "log:3: record seq 9 was altered: it follows seq 2 (log:2) by its hash, so its seq should be 3"
        );
    }

    #[test]
    fn a_broken_line_is_damaged() {
        let mut log = sealed(5);
        log[1].truncate(10);
        assert_eq!(
            broken(&log),
            "log:2: not a valid audit record: altered, damaged or inserted"
        );
    }

    #[test]
    fn a_deleted_line_is_removed() {
        let mut log = sealed(5);
        log.remove(2);
        assert_eq!(
            broken(&log),
            "log:3: record seq 3 was removed before record seq 4 (the log goes from seq 2 to seq 4)"
        );
        let mut log = sealed(6);
        log.drain(1..4);
        assert_eq!(
            broken(&log),
            "log:2: records seq 2 to 4 were removed before record seq 5 (the log goes from seq 1 to seq 5)"
        );
    }

    #[test]
    fn swapped_lines_are_out_of_order() {
        let mut log = sealed(5);
        log.swap(1, 2);
        assert_eq!(
            broken(&log),
            "log:2: record seq 3 is out of order: seq 2 comes after it, at log:3"
        );
        let mut log = sealed(5);
        log.swap(3, 4);
        assert_eq!(
            broken(&log),
            "log:4: record seq 5 is out of order: seq 4 comes after it, at log:5"
        );
    }

    #[test]
    fn a_repeated_line_is_out_of_order() {
        let mut log = sealed(4);
        log.insert(2, log[1].clone());
        assert_eq!(
            broken(&log),
            "log:3: record seq 2 appears twice (also at log:2): inserted"
        );
    }

    #[test]
    fn an_inserted_unchained_line_is_found() {
        let mut log = sealed(4);
        log.insert(2, br#"{"ts":"t","layer":"kernel"}"#.to_vec());
        assert_eq!(
            broken(&log),
            "log:3: record without seq and prev inside the chain: inserted or altered"
        );
    }

    #[test]
    fn the_oldest_records_missing_is_noted() {
        let log = sealed(5);
        let intact = check(&log[2..]).unwrap();
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((3, 5)));
        assert_eq!(intact.notes.len(), 1, "{:?}", intact.notes);
        assert!(intact.notes[0].starts_with("log:1: the chain starts at seq 3"));
    }

    #[test]
    fn a_truncated_last_line_is_noted() {
        let mut log = sealed(3);
        let mut lines = one_file(&log);
        log[2].truncate(20);
        lines[2].bytes = log[2].clone();
        lines[2].terminated = false;
        let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
        let intact = verify(lines.clone(), &names).unwrap();
        assert_eq!(intact.records, 2);
        assert!(intact.notes[0].contains("log:3: truncated record at the end of the log"));
        // With a newline after it, it was not cut off by a crash.
        lines[2].terminated = true;
        assert!(verify(lines, &names).is_err());
    }

    #[test]
    fn a_restart_after_a_cut_line_keeps_the_chain() {
        // What the writer leaves after a crash cut the third record short.
        let log = sealed(3);
        let mut file: Vec<u8> = log[..2].join(&b'\n');
        file.push(b'\n');
        file.extend_from_slice(&log[2][..30]);
        let resume = Tail::of(&file, true).resume(true, "now");
        file.extend_from_slice(&resume.prefix);
        let mut chain = resume.chain;
        chain.seal(br#"{"ts":"t","n":"after"}"#, &mut file);
        let lines: Vec<Vec<u8>> = file
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(lines.len(), 5);
        let intact = check(&lines).unwrap();
        assert_eq!(intact.records, 4, "two, the restart record, one after");
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((1, 4)));
        assert!(
            intact.notes[0].starts_with("log:3: truncated record, accounted for"),
            "{:?}",
            intact.notes
        );
        // A different fragment in its place is not accounted for.
        let mut forged = lines.clone();
        forged[2][5] ^= 1;
        assert_eq!(
            broken(&forged),
            "log:3: not a valid audit record: altered, damaged or inserted"
        );
    }

    #[test]
    fn unchained_records_before_the_chain_are_not_verified() {
        let mut log = vec![br#"{"ts":"old"}"#.to_vec()];
        log.extend(sealed(2));
        assert_eq!(
            broken(&log),
            "log:1: 1 records before seq 1 carry no seq and prev (written before the log had a chain, or put there since): not verified"
        );
        assert!(check(&log[..1]).is_err());
    }

    #[test]
    fn the_chain_crosses_files() {
        let log = sealed(4);
        let mut lines = one_file(&log);
        for l in &mut lines[..2] {
            l.file = 0;
        }
        for (i, l) in lines[2..].iter_mut().enumerate() {
            l.number = i + 1;
        }
        let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
        assert_eq!(verify(lines.clone(), &names).unwrap().records, 4);
        lines.remove(1);
        assert_eq!(
            verify(lines, &names).unwrap_err().0,
            "log:1: record seq 2 was removed before record seq 3 (the log goes from seq 1 to seq 3)"
        );
    }
}
