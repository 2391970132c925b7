//! Repeated kernel refusals, recorded once a second instead of one by one.
//!
//! A sandbox can make a refusal in a microsecond (a `sendto` loop); a record each would be
//! ~60 MB of log a second, which fills the disk (and then the tunnel fails closed, for every
//! sandbox sharing the log) or, with rotation, pushes the rest of the history out. So within
//! each second the first refusal of a kind is recorded whole and the others of that kind are
//! counted, and written as one record with `repeats` when the second ends. Past
//! [`DISTINCT_PER_WINDOW`] kinds in one second (a flood that varies its destination), the
//! rest are only counted, in one `refusals-suppressed` record. Nothing goes uncounted.

use std::{collections::HashMap, hash::Hash};

use crate::audit::{Layer, Record, Verdict, now_rfc3339};

/// The different refusals one sandbox may have recorded whole in a window (a second).
pub const DISTINCT_PER_WINDOW: usize = 256;

/// Refusals counted within a window, by their kind `K`: whatever makes two refusals the
/// same but for the process that made them.
pub struct Summary<K> {
    seen: HashMap<K, Seen>,
    /// Refusals of kinds past the limit, this window.
    suppressed: u64,
}

/// A kind recorded this window.
struct Seen {
    /// Its record, for the one that says how many came after it.
    record: Record,
    repeats: u64,
    last_pid: u32,
}

impl<K> Default for Summary<K> {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            suppressed: 0,
        }
    }
}

impl<K: Hash + Eq> Summary<K> {
    /// The record to write for a refusal of kind `kind` by process `pid`, or `None` when it
    /// is counted instead. `record` makes it (a kernel refusal's), only for the first of its
    /// kind in the window: a flood costs a lookup per refusal, not a record.
    pub fn admit(&mut self, kind: K, pid: u32, record: impl FnOnce() -> Record) -> Option<Record> {
        if let Some(seen) = self.seen.get_mut(&kind) {
            seen.repeats += 1;
            seen.last_pid = pid;
            return None;
        }
        if self.seen.len() >= DISTINCT_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        let record = record();
        let seen = Seen {
            record: record.clone(),
            repeats: 0,
            last_pid: pid,
        };
        self.seen.insert(kind, seen);
        Some(record)
    }

    /// The refusals counted this window and not yet recorded.
    pub fn pending(&self) -> u64 {
        self.seen.values().map(|s| s.repeats).sum::<u64>() + self.suppressed
    }

    /// The records of what was counted this window (`sandbox`'s), and a new window.
    pub fn close_window(&mut self, sandbox: &str) -> Vec<Record> {
        let ts = now_rfc3339();
        let mut records: Vec<Record> = self
            .seen
            .drain()
            .filter(|(_, seen)| seen.repeats > 0)
            .map(|(_, seen)| {
                let mut record = seen.record;
                record.ts.clone_from(&ts);
                if let Some(fields) = &mut record.kernel {
                    fields.pid = seen.last_pid;
                }
                record.repeats = Some(seen.repeats);
                record
            })
            .collect();
        if self.suppressed > 0 {
            let mut record =
                Record::new(Layer::Kernel, Verdict::Deny, sandbox, "refusals-suppressed");
            record.suppressed = Some(std::mem::take(&mut self.suppressed));
            records.push(record);
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::KernelFields;

    type Kind = (String, KernelFields);

    /// A refusal and its kind: its reason and fields but the pid.
    fn admit(s: &mut Summary<Kind>, r: Record) -> Option<Record> {
        let mut fields = r.kernel.clone().unwrap();
        let pid = std::mem::take(&mut fields.pid);
        s.admit((r.reason.clone(), fields), pid, || r)
    }

    fn refusal(pid: u32, dst: &str) -> Record {
        let mut r = Record::new(Layer::Kernel, Verdict::Deny, "box", "not-allowlisted");
        r.kernel = Some(KernelFields {
            hook: "sendmsg4",
            pid,
            uid: 65534,
            comm: "python3".into(),
            proto: "udp".into(),
            dst: Some(dst.into()),
        });
        r
    }

    /// Every refusal counted: as a record of its own, in a record's `repeats`, or in
    /// `suppressed`.
    fn counted(records: &[Record]) -> u64 {
        records.iter().map(Record::refusals).sum()
    }

    #[test]
    fn the_first_of_a_kind_is_recorded_whole_and_the_rest_counted_at_the_window_s_end() {
        let mut s = Summary::<Kind>::default();
        let mut written: Vec<Record> = Vec::new();
        for i in 0..1000 {
            written.extend(admit(&mut s, refusal(100 + i % 3, "127.0.0.1:9")));
        }
        written.extend(admit(&mut s, refusal(7, "127.0.0.1:10")));
        assert_eq!(written.len(), 2);
        assert_eq!(s.pending(), 999);
        assert_eq!(written[0].kernel.as_ref().unwrap().pid, 100);
        assert_eq!(written[0].repeats, None);
        let closed = s.close_window("box");
        assert_eq!(closed.len(), 1, "only the kind that repeated");
        let r = &closed[0];
        assert_eq!(
            (r.reason.as_str(), r.repeats),
            ("not-allowlisted", Some(999))
        );
        let k = r.kernel.as_ref().unwrap();
        assert_eq!((k.pid, k.dst.as_deref()), (100, Some("127.0.0.1:9")));
        written.extend(closed);
        assert_eq!(counted(&written), 1001);
        // A new window records the kind whole again.
        assert!(admit(&mut s, refusal(1, "127.0.0.1:9")).is_some());
        assert!(s.close_window("box").is_empty());
    }

    #[test]
    fn kinds_past_the_limit_are_only_counted() {
        let mut s = Summary::<Kind>::default();
        let mut written: Vec<Record> = Vec::new();
        for port in 0..DISTINCT_PER_WINDOW + 100 {
            for _ in 0..2 {
                written.extend(admit(&mut s, refusal(1, &format!("127.0.0.1:{port}"))));
            }
        }
        assert_eq!(written.len(), DISTINCT_PER_WINDOW);
        assert_eq!(s.pending(), DISTINCT_PER_WINDOW as u64 + 200);
        let closed = s.close_window("box");
        assert_eq!(closed.len(), DISTINCT_PER_WINDOW + 1);
        let last = closed.last().unwrap();
        assert_eq!(
            (last.reason.as_str(), last.suppressed, last.kernel.is_none()),
            ("refusals-suppressed", Some(200), true)
        );
        written.extend(closed);
        assert_eq!(counted(&written), 2 * (DISTINCT_PER_WINDOW as u64 + 100));
    }
}
