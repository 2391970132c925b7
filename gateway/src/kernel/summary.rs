//! Repeated kernel refusals, recorded once a second instead of one by one.
//!
//! A sandbox can make a refusal in a microsecond (a `sendto` loop); a record each would be
//! ~60 MB of log a second, which fills the disk (and then the tunnel fails closed, for every
//! sandbox sharing the log) or, with rotation, pushes the rest of the history out. So within
//! each second the first refusal of a kind is recorded whole and the others of that kind are
//! counted, and written as one record with `repeats` when the second ends. Past
//! [`DISTINCT_PER_WINDOW`] kinds in one second (a flood that varies its destination), the
//! rest are only counted, in one `refusals-suppressed` record. Nothing goes uncounted.

use std::collections::HashMap;

use crate::audit::{KernelFields, Layer, Record, Verdict};

/// The different refusals one sandbox may have recorded whole in a window (a second).
pub const DISTINCT_PER_WINDOW: usize = 256;

/// What makes two refusals the same kind: all of their fields but the process id.
type Kind = (String, KernelFields);

#[derive(Default)]
pub struct Summary {
    /// Each kind recorded this window: how many came after its record, and the last one's
    /// process.
    seen: HashMap<Kind, (u64, u32)>,
    /// Refusals of kinds past the limit, this window.
    suppressed: u64,
}

impl Summary {
    /// The record to write for refusal `record` (a kernel refusal), or `None` when it is
    /// counted instead.
    pub fn admit(&mut self, mut record: Record) -> Option<Record> {
        let Some(mut fields) = record.kernel.take() else {
            return Some(record);
        };
        let pid = std::mem::take(&mut fields.pid);
        let kind = (std::mem::take(&mut record.reason), fields);
        if let Some((repeats, last)) = self.seen.get_mut(&kind) {
            *repeats += 1;
            *last = pid;
            return None;
        }
        if self.seen.len() >= DISTINCT_PER_WINDOW {
            self.suppressed += 1;
            return None;
        }
        let (reason, mut fields) = kind.clone();
        self.seen.insert(kind, (0, pid));
        fields.pid = pid;
        record.reason = reason;
        record.kernel = Some(fields);
        Some(record)
    }

    /// The refusals counted this window and not yet recorded.
    pub fn pending(&self) -> u64 {
        self.seen.values().map(|(repeats, _)| repeats).sum::<u64>() + self.suppressed
    }

    /// The records of what was counted this window (`sandbox`'s), and a new window.
    pub fn close_window(&mut self, sandbox: &str) -> Vec<Record> {
        let mut records: Vec<Record> = self
            .seen
            .drain()
            .filter(|(_, (repeats, _))| *repeats > 0)
            .map(|((reason, mut fields), (repeats, pid))| {
                fields.pid = pid;
                let mut record = Record::new(Layer::Kernel, Verdict::Deny, sandbox, &reason);
                record.kernel = Some(fields);
                record.repeats = Some(repeats);
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
        records
            .iter()
            .map(|r| r.suppressed.or(r.repeats).unwrap_or(1))
            .sum()
    }

    #[test]
    fn the_first_of_a_kind_is_recorded_whole_and_the_rest_counted_at_the_window_s_end() {
        let mut s = Summary::default();
        let mut written: Vec<Record> = Vec::new();
        for i in 0..1000 {
            written.extend(s.admit(refusal(100 + i % 3, "127.0.0.1:9")));
        }
        written.extend(s.admit(refusal(7, "127.0.0.1:10")));
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
        assert!(s.admit(refusal(1, "127.0.0.1:9")).is_some());
        assert!(s.close_window("box").is_empty());
    }

    #[test]
    fn kinds_past_the_limit_are_only_counted() {
        let mut s = Summary::default();
        let mut written: Vec<Record> = Vec::new();
        for port in 0..DISTINCT_PER_WINDOW + 100 {
            for _ in 0..2 {
                written.extend(s.admit(refusal(1, &format!("127.0.0.1:{port}"))));
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

    #[test]
    fn a_record_without_kernel_fields_passes_as_it_is() {
        let mut s = Summary::default();
        let r = Record::new(Layer::Kernel, Verdict::Deny, "box", "events-lost");
        assert!(s.admit(r.clone()).is_some());
        assert!(s.admit(r).is_some());
        assert!(s.close_window("box").is_empty());
    }
}
