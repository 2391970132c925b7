//! Refusal events from the ring buffer, turned into kernel audit records.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use gateway_common::{COMM_LEN, Event, Hook, Reason, UNIX_PATH_MAX};
use tokio::{io::unix::AsyncFd, sync::watch};

use super::summary::Summary;
use crate::audit::{AuditError, AuditLog, KernelFields, Layer, Record, Verdict};
use crate::sandbox::state;

const AF_UNIX: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

pub struct EventReader {
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

/// The per-CPU count of refusals that found the ring full, and how much of it is reported.
struct LostCounter {
    map: PerCpuArray<MapData, u64>,
    reported: u64,
    mark: ReportedMark,
}

/// How much of the lost count is in the log, kept in a file of the run's state for a
/// `gateway cleanup` after a crash, which reports only the rest. It is written once the
/// `events-lost` record is in the file (after a sync, on a thread of its own: the reader
/// never waits on the writer), so a crash in between has some refusals counted twice,
/// never none.
struct ReportedMark {
    path: PathBuf,
    /// The total last written, so that a slow thread does not write an older one over it.
    written: Arc<Mutex<u64>>,
}

impl ReportedMark {
    fn after_sync(&self, audit: &AuditLog, total: u64) {
        let (audit, path, written) = (audit.clone(), self.path.clone(), self.written.clone());
        std::thread::spawn(move || {
            if audit.sync().is_err() {
                return;
            }
            let mut written = written.lock().unwrap_or_else(PoisonError::into_inner);
            if total > *written {
                match write_lost_mark(&path, total) {
                    Ok(()) => *written = total,
                    Err(e) => tracing::warn!(
                        "cannot record how many lost events are reported ({}): a cleanup after a crash would report them again: {e}",
                        path.display()
                    ),
                }
            }
        });
    }
}

/// Writes `total` as the part of the lost count the log holds (see [`ReportedMark`]).
pub fn write_lost_mark(path: &Path, total: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, total.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Adds `n` to the count of refusals taken and not recorded, in the run's state directory
/// `state_dir` ([`state::UNRECORDED`]), for `gateway cleanup` to report as lost.
pub fn add_unrecorded(state_dir: &Path, n: u64) -> std::io::Result<()> {
    let path = state_dir.join(state::UNRECORDED);
    let before = read_lost_mark(&path)?;
    write_lost_mark(&path, before + n)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// The part of the lost count the log holds: 0 when no mark was written.
pub fn read_lost_mark(path: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

impl EventReader {
    pub(super) fn new(ring: RingBuf<MapData>, lost: PerCpuArray<MapData, u64>) -> Self {
        Self { ring, lost }
    }

    /// Writes a record per event until `stop` turns true, then drains what is left.
    /// `state_dir`: the run's state directory, where the reader says how much of the lost
    /// count the log holds ([`state::LOST_REPORTED`]) and, if it stops on a failed log, how
    /// many refusals it took off the ring without recording them ([`state::UNRECORDED`]),
    /// for `gateway cleanup` to report as lost.
    pub async fn run(
        self,
        audit: AuditLog,
        sandbox: String,
        stop: watch::Receiver<bool>,
        state_dir: PathBuf,
    ) -> Result<(), AuditError> {
        let mut lost = LostCounter {
            map: self.lost,
            reported: 0,
            mark: ReportedMark {
                path: state_dir.join(state::LOST_REPORTED),
                written: Arc::default(),
            },
        };
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged while the
        // AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register(self.ring) }.map_err(|e| AuditError::Write {
            path: audit.path().to_owned(),
            error: e.into_parts().1,
        })?;
        let mut taken = Taken::default();
        let read = read(ring, &audit, &sandbox, stop, &mut lost, &mut taken).await;
        if read.is_err() {
            // Off the ring, in no record: only this count is left of them.
            let unrecorded = taken.unrecorded + taken.summary.pending();
            if unrecorded > 0 {
                tracing::warn!(
                    unrecorded,
                    "kernel refusals taken off the ring were not recorded: the log failed"
                );
                if let Err(e) = add_unrecorded(&state_dir, unrecorded) {
                    tracing::error!(
                        "cannot keep the count of {unrecorded} unrecorded refusals: {e}"
                    );
                }
            }
        }
        read
    }
}

/// What the reader took off the ring and has not recorded yet.
#[derive(Default)]
struct Taken {
    summary: Summary<EventKind>,
    /// Ticks since the window opened.
    open_for: u32,
    /// Refusals whose record (or count) the log refused.
    unrecorded: u64,
}

/// The ticks a window stays open at most while the log is backed up: the counts of a longer
/// one would be lost at a crash.
const MAX_WINDOW_TICKS: u32 = 10;

async fn read(
    mut ring: AsyncFd<RingBuf<MapData>>,
    audit: &AuditLog,
    sandbox: &str,
    mut stop: watch::Receiver<bool>,
    lost: &mut LostCounter,
    taken: &mut Taken,
) -> Result<(), AuditError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                if let Ok(mut guard) = guard {
                    // Backed up or not, the next event or tick comes back here.
                    drain(guard.get_inner_mut(), audit, sandbox, taken)?;
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                // Events left in the ring while the log was backed up. A log backed up
                // keeps the second open, for a while: its counts are written at a later
                // tick, and this async thread does not wait on the writer.
                let backed_up = drain(ring.get_mut(), audit, sandbox, taken)?;
                taken.open_for += 1;
                if !backed_up || taken.open_for >= MAX_WINDOW_TICKS {
                    close_window(taken, audit, sandbox)?;
                }
                lost.report(audit, sandbox)?;
            }
            _ = stop.changed() => {
                // The last of them, waiting for the writer if need be.
                while drain(ring.get_mut(), audit, sandbox, taken)? {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                close_window(taken, audit, sandbox)?;
                return lost.report(audit, sandbox);
            }
        }
    }
}

/// Appends the record of kernel refusals `record`, or counts them as taken and unrecorded.
fn append_refusals(audit: &AuditLog, record: &Record, taken: &mut u64) -> Result<(), AuditError> {
    audit.append(record).inspect_err(|_| {
        *taken += record.refusals();
    })
}

/// Writes what was counted this second.
fn close_window(taken: &mut Taken, audit: &AuditLog, sandbox: &str) -> Result<(), AuditError> {
    taken.open_for = 0;
    let mut result = Ok(());
    for record in taken.summary.close_window(sandbox) {
        match result {
            Ok(()) => result = append_refusals(audit, &record, &mut taken.unrecorded),
            // Counted, not tried: the log has failed.
            Err(_) => taken.unrecorded += record.refusals(),
        }
    }
    result
}

impl LostCounter {
    fn report(&mut self, audit: &AuditLog, sandbox: &str) -> Result<(), AuditError> {
        let total: u64 = match self.map.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().sum(),
            Err(e) => {
                tracing::warn!("cannot read the lost-event counter: {e}");
                return Ok(());
            }
        };
        if total > self.reported {
            let lost = total - self.reported;
            tracing::warn!(
                lost,
                "kernel refusals were not reported: the event ring was full"
            );
            self.reported = total;
            audit.append(&lost_record(sandbox, lost))?;
            self.mark.after_sync(audit, total);
        }
        Ok(())
    }
}

/// Records the ring's events (or counts them in `summary`) until it is empty (`false`) or
/// the log is backed up (`true`): then the rest stay in the ring, whose overflow the kernel
/// counts as lost, and this async thread never waits on the writer.
fn drain(
    ring: &mut RingBuf<MapData>,
    audit: &AuditLog,
    sandbox: &str,
    taken: &mut Taken,
) -> Result<bool, AuditError> {
    loop {
        // A failed log leaves the rest in the ring, for `gateway cleanup`.
        audit.check()?;
        if audit.backed_up() {
            return Ok(true);
        }
        let Some(item) = ring.next() else {
            return Ok(false);
        };
        let Some(ev) = event(&item) else {
            continue;
        };
        if let Some(record) = taken
            .summary
            .admit(EventKind::of(&ev), ev.pid, || describe(&ev, sandbox))
        {
            append_refusals(audit, &record, &mut taken.unrecorded)?;
        }
    }
}

/// What makes two events the same refusal: every field of the record made of them but the
/// process id, taken from the event itself (no record is made of a repeat).
#[derive(PartialEq, Eq, Hash)]
struct EventKind {
    hook: u32,
    reason: u32,
    uid: u32,
    family: u32,
    sock_type: u32,
    protocol: u32,
    port: u32,
    addr: [u8; 16],
    /// Up to its first NUL, the rest zeroed.
    comm: [u8; COMM_LEN],
    /// The meaningful bytes, the rest zeroed; with their count, since an abstract name may
    /// end in NULs (`@x` and `@x\0` are two sockets).
    path: [u8; UNIX_PATH_MAX],
    path_len: usize,
}

impl EventKind {
    fn of(ev: &Event) -> Self {
        let mut comm = [0; COMM_LEN];
        let comm_len = ev.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        comm[..comm_len].copy_from_slice(&ev.comm[..comm_len]);
        let mut path = [0; UNIX_PATH_MAX];
        let path_len = (ev.path_len as usize).min(UNIX_PATH_MAX);
        path[..path_len].copy_from_slice(&ev.path[..path_len]);
        Self {
            hook: ev.hook,
            reason: ev.reason,
            uid: ev.uid,
            family: ev.family,
            sock_type: ev.sock_type,
            protocol: ev.protocol,
            port: ev.port,
            addr: ev.addr,
            comm,
            path,
            path_len,
        }
    }
}

/// The event in one ring item; `None` for an item too short to hold one.
pub(super) fn event(item: &[u8]) -> Option<Event> {
    if item.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: the kernel wrote a whole `Event`; read_unaligned copes with any alignment.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) })
}

/// The record of `lost` refusals the kernel counted but could not queue.
pub fn lost_record(sandbox: &str, lost: u64) -> Record {
    let mut rec = Record::new(Layer::Kernel, Verdict::Deny, sandbox, "events-lost");
    rec.lost = Some(lost);
    rec
}

/// The audit record for one kernel event.
pub fn describe(ev: &Event, sandbox: &str) -> Record {
    let reason = Reason::from_u32(ev.reason).map_or("unknown", Reason::name);
    let hook = Hook::from_u32(ev.hook).map_or("unknown", Hook::name);
    let mut rec = Record::new(Layer::Kernel, Verdict::Deny, sandbox, reason);
    let comm_len = ev
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ev.comm.len());
    rec.kernel = Some(KernelFields {
        hook,
        pid: ev.pid,
        uid: ev.uid,
        comm: String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned(),
        proto: proto_name(ev),
        dst: destination(ev),
    });
    rec
}

fn proto_name(ev: &Event) -> String {
    if Hook::from_u32(ev.hook) == Some(Hook::Setsockopt) {
        // The option refused, as level and name: `ip/35` is IP_ADD_MEMBERSHIP.
        return format!("{}/{}", level_name(ev.sock_type), ev.protocol);
    }
    if Hook::from_u32(ev.hook) == Some(Hook::SockCreate) {
        return format!(
            "{}/{}/{}",
            family_name(ev.family),
            type_name(ev.sock_type),
            ev.protocol
        );
    }
    match (ev.family, ev.protocol) {
        (AF_UNIX, _) => "unix".into(),
        (_, 6) => "tcp".into(),
        (_, 17) => "udp".into(),
        (_, p) => p.to_string(),
    }
}

fn destination(ev: &Event) -> Option<String> {
    match (Hook::from_u32(ev.hook)?, ev.family) {
        (Hook::SockCreate | Hook::Setsockopt, _) => None,
        (_, AF_UNIX) => {
            let len = (ev.path_len as usize).min(ev.path.len());
            let path = &ev.path[..len];
            Some(match path.split_first() {
                // Abstract names are written `@name`, as ss(8) and the policy do.
                Some((0, name)) => format!("@{}", String::from_utf8_lossy(name)),
                _ => String::from_utf8_lossy(path).into_owned(),
            })
        }
        (_, AF_INET) => {
            let ip = Ipv4Addr::new(ev.addr[12], ev.addr[13], ev.addr[14], ev.addr[15]);
            Some(format!("{ip}:{}", ev.port))
        }
        (_, AF_INET6) => Some(format!("[{}]:{}", Ipv6Addr::from(ev.addr), ev.port)),
        _ => None,
    }
}

fn family_name(family: u32) -> String {
    match family {
        1 => "unix".into(),
        2 => "inet".into(),
        10 => "inet6".into(),
        16 => "netlink".into(),
        17 => "packet".into(),
        40 => "vsock".into(),
        f => format!("af{f}"),
    }
}

fn level_name(level: u32) -> String {
    match level {
        0 => "ip".into(),
        41 => "ipv6".into(),
        l => format!("level{l}"),
    }
}

fn type_name(t: u32) -> String {
    match t {
        1 => "stream".into(),
        2 => "dgram".into(),
        3 => "raw".into(),
        5 => "seqpacket".into(),
        t => format!("type{t}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix_connect(pid: u32, name: &[u8]) -> Event {
        let mut path = [0; UNIX_PATH_MAX];
        path[..name.len()].copy_from_slice(name);
        let mut comm = [0; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        Event {
            cgroup_id: 1,
            hook: Hook::UnixConnect as u32,
            reason: Reason::NotAllowlisted as u32,
            pid,
            uid: 65534,
            family: AF_UNIX,
            sock_type: 1,
            protocol: 0,
            port: 0,
            addr: [0; 16],
            comm,
            path,
            path_len: name.len() as u32,
        }
    }

    fn dst(ev: &Event) -> Option<String> {
        describe(ev, "box").kernel.and_then(|k| k.dst)
    }

    /// Same kind, same record but the pid: an abstract name with trailing NULs is another
    /// socket than the name without them, and is recorded as such.
    #[test]
    fn events_of_one_kind_make_one_record_but_for_the_pid() {
        let (a, b) = (unix_connect(1, b"\0x"), unix_connect(2, b"\0x"));
        assert!(EventKind::of(&a) == EventKind::of(&b));
        let padded = unix_connect(1, b"\0x\0\0");
        assert!(EventKind::of(&a) != EventKind::of(&padded));
        assert_ne!(dst(&a), dst(&padded));
        // Bytes past the name's length are not the name.
        let mut stale = unix_connect(3, b"\0x");
        stale.path[5] = b'z';
        stale.comm[10] = b'q';
        assert!(EventKind::of(&a) == EventKind::of(&stale));
    }

    /// Once the log has failed, what the reader counted and could not record is kept as a
    /// count: the record refused, and every count of the window.
    #[test]
    fn refusals_the_failed_log_did_not_take_are_counted() {
        let dir = std::env::temp_dir().join(format!("gateway-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = AuditLog::open(&dir.join("audit.jsonl")).unwrap();
        let mut taken = Taken::default();
        let admit = |taken: &mut Taken, ev: &Event| {
            let record = taken
                .summary
                .admit(EventKind::of(ev), ev.pid, || describe(ev, "box"));
            record.map(|r| append_refusals(&audit, &r, &mut taken.unrecorded))
        };
        for i in 0..5 {
            admit(&mut taken, &unix_connect(i, b"/a")).map(Result::unwrap);
            admit(&mut taken, &unix_connect(i, b"/b")).map(Result::unwrap);
        }
        assert_eq!(taken.summary.pending(), 8);
        audit.fail_for_test();
        assert!(admit(&mut taken, &unix_connect(9, b"/c")).unwrap().is_err());
        assert_eq!(taken.unrecorded, 1);
        assert!(close_window(&mut taken, &audit, "box").is_err());
        assert_eq!((taken.unrecorded, taken.summary.pending()), (9, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
