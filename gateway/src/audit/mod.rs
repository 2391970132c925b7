//! The audit log: JSON Lines, one record per decision, appended and flushed as it happens.
//!
//! Every line is sealed into a hash chain (`seq`, `prev`: see [`chain`]) by the one writer
//! thread, which is the single point of order. Size-based rotation renames `FILE` to `FILE.1`
//! (and `FILE.1` to `FILE.2`, …) and carries the chain on in a new `FILE`.

mod chain;
pub mod cli;
mod escape;
mod files;
mod line;
mod query;
mod record;
mod trust;
mod verify;

use std::{
    fs::File,
    io::Write as _,
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, mpsc},
    time::{Duration, Instant},
};

use chain::{Chain, Resume};
pub use query::View as RecordView;
pub use record::{KernelFields, Layer, ProxyFields, Record, ReloadFields, Verdict, now_rfc3339};
pub use trust::Untrusted;

/// The longest a queued record waits before the writer picks it up under load. Each batch
/// costs a wakeup and a write whatever its size (at 1 ms, 0.8 µs of the writer's CPU per
/// tunnel request more than at 5 ms, ~2 % of a request). What a gateway killed outright loses
/// is the records of this window, and a proxy record is written only once the upstream has
/// answered, so requests still in flight at the kill, lost either way, are most of it.
const COALESCE: Duration = Duration::from_millis(5);

/// The longest a busy writer keeps the file's lock across batches before letting another
/// gateway that shares the file have a turn. Holding it saves each batch the lock, unlock
/// and rotation check (four system calls, on a thread just woken from its sleep).
const LEASE: Duration = Duration::from_millis(20);

/// The most record bytes that may wait for the writer. Past it, appending waits until the
/// writer has caught up: a flood of records (one sandbox refused a million times a second)
/// slows whoever makes records, rather than growing the gateway's memory until the kernel
/// kills it, and every sandbox's way out with it. Nothing queued is ever dropped.
const MAX_BACKLOG: usize = 32 << 20;

/// What sealing adds to a record at most: `"seq":` and 20 digits, `,"prev":"`, 64 hex
/// digits, `",` and the newline.
const CHAIN_FIELDS: usize = 6 + 20 + 9 + 64 + 2 + 1;

/// Where audit records go when `--audit-log` is not given.
pub const DEFAULT_LOG: &str = "/var/log/gateway/audit.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened for appending.
    // The reason is in the message, not a source too: `{:#}` would print it twice.
    #[error("cannot open audit log {path}: {error}")]
    Open {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file of the log, or a directory on its path, is not one the gateway can trust: a
    /// symbolic link, not a regular file, someone else's, or writable by others.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
    /// A record could not be written. It stays failed: from then on the tunnel lets nothing
    /// through (it could not record it) and every append reports this.
    #[error("cannot write audit log {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// An append-only audit log shared by the kernel event reader, the seccomp notifier and the
/// tunnel. Records are serialized by the caller and written by one writer thread, which
/// appends whatever has queued up in a single write, within [`COALESCE`]: the tunnel's
/// request path never waits on the file. [`AuditLog::sync`] waits until everything queued
/// before it is written; a write error is reported by every later call.
///
/// Several gateways may share one log: records are written under an exclusive `flock`, which
/// a writer keeps across batches while busy (at most [`LEASE`]) and gives up whenever it has
/// nothing queued; a writer that finds the file grown (or replaced by rotation) since its last
/// write picks the chain up from the file's last line.
#[derive(Clone)]
pub struct AuditLog {
    path: PathBuf,
    tx: mpsc::Sender<Queued>,
    /// The writer's first failure; every later append reports it (a log with a hole in it
    /// must not look healthy).
    failed: Arc<OnceLock<String>>,
    backlog: Arc<Backlog>,
}

/// The bytes queued for the writer, bounded by [`MAX_BACKLOG`].
#[derive(Default)]
struct Backlog {
    state: Mutex<BacklogState>,
    room: Condvar,
}

#[derive(Default)]
struct BacklogState {
    bytes: usize,
    /// The writer thread ended: waiting for it would be for ever.
    writer_gone: bool,
}

impl Backlog {
    /// Counts `n` more bytes queued, once there is room for them (a record larger than the
    /// whole bound goes alone).
    fn reserve(&self, n: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while state.bytes > 0 && state.bytes + n > MAX_BACKLOG && !state.writer_gone {
            state = self
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.bytes += n;
    }

    /// The writer is done with `n` bytes (written or failed).
    fn release(&self, n: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.bytes = state.bytes.saturating_sub(n);
        self.room.notify_all();
    }
}

/// Held by the writer thread: however it ends, appenders stop waiting for it, and the log
/// counts as failed, so that the tunnel lets nothing more through unrecorded. (It ends of
/// itself only once every handle to the log is gone, and then nobody asks.)
struct WriterAlive(Arc<Backlog>, Arc<OnceLock<String>>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        let _ = self.1.set("the audit writer thread stopped".into());
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.writer_gone = true;
        self.0.room.notify_all();
    }
}

enum Queued {
    Record(Vec<u8>),
    Sync(mpsc::Sender<()>),
}

impl AuditLog {
    /// Opens `path` for appending, without rotation.
    #[allow(
        dead_code,
        reason = "the API without rotation; `run` passes its option to open_with"
    )]
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_with(path, None)
    }

    /// Opens `path` for appending. With `max_bytes`, a record that would take the file past
    /// that size goes to a new file instead, after `FILE` becomes `FILE.1` (see [`files`]).
    pub fn open_with(path: &Path, max_bytes: Option<u64>) -> Result<Self, AuditError> {
        let open_err = |source: std::io::Error| match source
            .get_ref()
            .and_then(|e| e.downcast_ref::<Untrusted>())
        {
            Some(untrusted) => AuditError::Untrusted(untrusted.clone()),
            None => AuditError::Open {
                path: path.to_owned(),
                error: source,
            },
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(open_err)?;
        }
        trust::check_directories(path)
            .and_then(|()| trust::check_existing(path))
            .and_then(|()| trust::check_own_directory(path))
            .map_err(|e| open_err(e.at(path)))?;
        let writer = Writer::open(path, max_bytes).map_err(open_err)?;
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(OnceLock::new());
        let writer_failed = failed.clone();
        let backlog = Arc::new(Backlog::default());
        let alive = WriterAlive(backlog.clone(), failed.clone());
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_queued(writer, &rx, &writer_failed, &alive.0))
            .map_err(open_err)?;
        Ok(Self {
            path: path.to_owned(),
            tx,
            failed,
            backlog,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record; it reaches the file as one line, so lines never interleave.
    pub fn append(&self, record: &Record) -> Result<(), AuditError> {
        // Sized for a typical proxy record, so serializing does not grow it step by step.
        let mut line = Vec::with_capacity(512);
        line::write(record, &mut line);
        self.queue(line)
    }

    /// Queues the proxy record of `fields`, stamped now: [`append`](Self::append) of the
    /// same record, without building one (the tunnel writes one per request).
    pub fn append_proxy(
        &self,
        verdict: Verdict,
        sandbox: &str,
        reason: &str,
        fields: &ProxyFields,
    ) -> Result<(), AuditError> {
        let mut line = Vec::with_capacity(512);
        line::write_proxy_now(&mut line, verdict, sandbox, reason, fields);
        self.queue(line)
    }

    fn queue(&self, line: Vec<u8>) -> Result<(), AuditError> {
        self.check()?;
        self.backlog.reserve(line.len());
        self.tx.send(Queued::Record(line)).map_err(|_| self.gone())
    }

    /// Whether records wait for the writer in numbers: three quarters of [`MAX_BACKLOG`].
    /// The kernel event reader then leaves events in the kernel's ring, which counts what no
    /// longer fits as lost, rather than wait here on its async thread; the rest of the room
    /// stays for the tunnel's records, whose makers do wait.
    pub fn backed_up(&self) -> bool {
        let state = self
            .backlog
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.bytes >= MAX_BACKLOG / 4 * 3 && !state.writer_gone
    }

    /// Whether a write has failed: records are being lost.
    pub fn has_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Returns once every record queued before this call is in the file.
    pub fn sync(&self) -> Result<(), AuditError> {
        let (done_tx, done_rx) = mpsc::channel();
        self.tx
            .send(Queued::Sync(done_tx))
            .map_err(|_| self.gone())?;
        done_rx.recv().map_err(|_| self.gone())?;
        self.check()
    }

    /// Marks the log failed, as a write error would.
    #[cfg(test)]
    pub(crate) fn fail_for_test(&self) {
        let _ = self.failed.set("failed by a test".into());
    }

    /// The log's failure, if it has failed.
    pub fn check(&self) -> Result<(), AuditError> {
        match self.failed.get() {
            None => Ok(()),
            Some(e) => Err(AuditError::Write {
                path: self.path.clone(),
                error: std::io::Error::other(e.clone()),
            }),
        }
    }

    fn gone(&self) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            error: std::io::Error::other("the audit writer thread stopped"),
        }
    }
}

fn write_queued(
    mut writer: Writer,
    rx: &mpsc::Receiver<Queued>,
    failed: &OnceLock<String>,
    backlog: &Backlog,
) {
    let mut batch = Vec::new();
    let mut waiting = Vec::new();
    loop {
        let first = match rx.try_recv() {
            Ok(q) => q,
            Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {
                // Idle: another gateway sharing the file may write until this one has more.
                writer.release();
                match rx.recv() {
                    Ok(q) => q,
                    Err(_) => break,
                }
            }
        };
        let mut next = Some(first);
        while let Some(q) = next {
            match q {
                Queued::Record(record) => batch.push(record),
                Queued::Sync(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            if let Err(e) = writer.write(&batch) {
                tracing::error!("cannot write the audit log: {e}");
                let _ = failed.set(e.to_string());
            }
            backlog.release(batch.iter().map(Vec::len).sum());
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        if writer.lease_ended() {
            writer.release();
        }
        // Under load, let records gather for a moment: one wakeup and one write per batch
        // instead of per record. A record waits at most this long to reach the file.
        std::thread::sleep(COALESCE);
    }
    writer.release();
}

/// The writer thread's file: seals records into the chain, appends them, rotates.
struct Writer {
    path: PathBuf,
    max_bytes: Option<u64>,
    file: File,
    /// Its lock is the log's: see [`lock_path`].
    lock: File,
    /// The file's size after this writer's last write; `None` until the chain has been read
    /// from the file, and again after a failed write.
    end: Option<u64>,
    chain: Chain,
    /// Since when this writer holds the log's lock; `None` while it does not.
    held: Option<Instant>,
}

/// The file whose lock the gateways writing one log take (`FILE.lock`, beside it), not the
/// log itself: anyone who may read the log may lock it, and the writer would wait on them
/// while the tunnel went on letting requests through that nothing recorded. Only the
/// gateway's user may open this one.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Read as well as append: the chain is picked up from the file's last line. Only the
/// gateway's own regular file, which nobody else may write, is taken (see [`trust`]).
fn open_append(path: &Path) -> std::io::Result<File> {
    trust::open_append(path).map_err(|e| e.at(path))
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor that `file` keeps open; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Writer {
    /// Opens the log and reads where its chain stands; a damaged last line is dealt with
    /// (see [`chain`]) before this returns.
    fn open(path: &Path, max_bytes: Option<u64>) -> std::io::Result<Self> {
        let mut writer = Self {
            path: path.to_owned(),
            max_bytes,
            file: open_append(path)?,
            lock: trust::open_lock(&lock_path(path)).map_err(|e| e.at(&lock_path(path)))?,
            end: None,
            chain: Chain::FRESH,
            held: None,
        };
        writer.write(&[])?;
        writer.release();
        Ok(writer)
    }

    /// Seals and appends `records` (serialized JSON objects) under the file's lock, taking it
    /// unless this writer still holds it.
    fn write(&mut self, records: &[Vec<u8>]) -> std::io::Result<()> {
        if self.held.is_none() {
            self.lock()?;
            self.held = Some(Instant::now());
        }
        let written = self.write_locked(records);
        if written.is_err() {
            self.end = None;
            self.release();
        }
        written
    }

    fn lease_ended(&self) -> bool {
        self.held.is_some_and(|since| since.elapsed() >= LEASE)
    }

    /// Lets other gateways sharing the file write; the next batch takes the lock again and
    /// checks whether the file was rotated meanwhile.
    fn release(&mut self) {
        if self.held.take().is_some()
            && let Err(e) = flock(&self.lock, libc::LOCK_UN)
        {
            tracing::error!("cannot unlock the audit log: {e}");
        }
    }

    /// Takes the log's lock, and reopens the file at `path` when a rotation (ours or another
    /// gateway's) moved the one this writer had: rotations happen under the lock.
    fn lock(&mut self) -> std::io::Result<()> {
        flock(&self.lock, libc::LOCK_EX)?;
        let held = self.file.metadata()?;
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == (held.dev(), held.ino()) => {}
            _ => {
                let reopened = open_append(&self.path);
                if reopened.is_err() {
                    flock(&self.lock, libc::LOCK_UN)?;
                }
                self.file = reopened?;
                self.end = None;
            }
        }
        Ok(())
    }

    /// Where the chain stands for a file of `size` bytes that this writer did not just
    /// write: from its last line, or from `FILE.1`'s when it is empty.
    fn resume(&self, size: u64) -> std::io::Result<Resume> {
        let now = record::now_rfc3339();
        if size > 0 {
            let tail = files::tail_of_file(&self.file, size)?;
            let earlier = match tail.last_is_first {
                true => self.resume_rotated(&now)?.chain,
                false => Chain::FRESH,
            };
            return Ok(tail.resume_after(true, &now, earlier));
        }
        self.resume_rotated(&now)
    }

    /// Where `FILE.1` left the chain, or a fresh one without it.
    fn resume_rotated(&self, now: &str) -> std::io::Result<Resume> {
        for gz in [false, true] {
            let rotated = files::rotated(&self.path, 1, gz);
            // Whatever is there (a link too) is judged, not passed over.
            if rotated.symlink_metadata().is_ok() {
                return Ok(files::tail_of_path(&rotated)?.resume(false, now));
            }
        }
        Ok(Resume {
            chain: Chain::FRESH,
            prefix: Vec::new(),
        })
    }

    fn write_locked(&mut self, records: &[Vec<u8>]) -> std::io::Result<()> {
        let mut size = self.file.metadata()?.len();
        // Room for the batch and each line's chain fields, so sealing does not grow it in
        // steps (a busy tunnel's batch is tens of kilobytes).
        let mut out = Vec::with_capacity(records.iter().map(|r| r.len() + CHAIN_FIELDS).sum());
        if self.end != Some(size) {
            let resume = self.resume(size)?;
            self.chain = resume.chain;
            out = resume.prefix;
        }
        let mut pending = records;
        loop {
            let mut taken = 0;
            for record in pending {
                let mark = out.len();
                let before = self.chain;
                self.chain.seal(record, &mut out);
                let over = self
                    .max_bytes
                    .is_some_and(|max| size + out.len() as u64 > max && size + mark as u64 > 0);
                if over {
                    out.truncate(mark);
                    self.chain = before;
                    break;
                }
                taken += 1;
            }
            self.file.write_all(&out)?;
            size += out.len() as u64;
            out.clear();
            pending = &pending[taken..];
            if pending.is_empty() {
                self.end = Some(size);
                return Ok(());
            }
            self.rotate()?;
            size = self.file.metadata()?.len();
            if size > 0 {
                // Another gateway started the new file first: continue after its records.
                let resume = self.resume(size)?;
                self.chain = resume.chain;
                out = resume.prefix;
            }
        }
    }

    /// With the current file locked: `FILE` becomes `FILE.1` (older ones shift up), and a new
    /// `FILE` is opened and locked. The chain carries on unchanged.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        files::shift(&self.path)?;
        std::fs::rename(&self.path, files::rotated(&self.path, 1, false))?;
        // Closing the old file releases its lock; whoever waited on it finds it renamed.
        self.file = open_append(&self.path)?;
        self.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        audit::files::{Lines, LogLine},
        test_fs::chmod,
    };

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gateway-auditlog-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn record(n: usize) -> Record {
        Record::new(Layer::Proxy, Verdict::Deny, "test", &format!("reason-{n}"))
    }

    fn write(log: &AuditLog, range: std::ops::Range<usize>) {
        for n in range {
            log.append(&record(n)).unwrap();
        }
        log.sync().unwrap();
    }

    fn verified(path: &Path) -> verify::Intact {
        let files = files::open_trusted(path).unwrap().read;
        let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
        let lines: Vec<LogLine> = Lines::new(files).map(Result::unwrap).collect();
        verify::verify(lines, &names).unwrap_or_else(|b| panic!("{}", b.0))
    }

    fn values(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn records_carry_seq_and_prev_across_runs() {
        let dir = scratch("runs");
        let path = dir.join("audit.jsonl");
        write(&AuditLog::open(&path).unwrap(), 0..3);
        write(&AuditLog::open(&path).unwrap(), 3..5);
        let v = values(&path);
        assert_eq!(v.len(), 5);
        for (i, r) in v.iter().enumerate() {
            assert_eq!(r["seq"], i as u64 + 1);
            assert_eq!(r["reason"], format!("reason-{i}"));
        }
        assert_eq!(v[0]["prev"], "0".repeat(64));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"seq\":1,\"prev\":\""), "{text}");
        let intact = verified(&path);
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((1, 5)));
        assert!(intact.notes.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_the_chain_and_the_size() {
        let dir = scratch("rotate");
        let path = dir.join("audit.jsonl");
        let line_len = {
            let one = dir.join("one.jsonl");
            write(&AuditLog::open(&one).unwrap(), 0..1);
            std::fs::metadata(&one).unwrap().len()
        };
        // Lines differ by a few bytes (seq digits, timestamp fractions): room for three
        // lines and a half, so every file holds exactly three.
        let max = line_len * 3 + line_len / 2;
        let log = AuditLog::open_with(&path, Some(max)).unwrap();
        write(&log, 0..8);
        write(&AuditLog::open_with(&path, Some(max)).unwrap(), 8..10);
        let files = files::chronological(&path).unwrap();
        assert_eq!(files.len(), 4, "{files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= max, "{f:?}");
        }
        assert_eq!(values(&files::rotated(&path, 3, false))[0]["seq"], 1);
        assert_eq!(values(&path)[0]["seq"], 10);
        let intact = verified(&path);
        assert_eq!(intact.records, 10);
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((1, 10)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_keeps_ten_files() {
        let dir = scratch("keep");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open_with(&path, Some(1)).unwrap();
        write(&log, 0..15);
        let files = files::chronological(&path).unwrap();
        assert_eq!(files.len(), 11);
        assert_eq!(values(&path)[0]["seq"], 15);
        assert_eq!(values(&files::rotated(&path, 10, false))[0]["seq"], 5);
        let intact = verified(&path);
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((5, 15)));
        assert!(
            intact.notes[0].contains("the chain starts at seq 5"),
            "{:?}",
            intact.notes
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cut_last_line_restarts_the_chain_honestly() {
        let dir = scratch("cut");
        let path = dir.join("audit.jsonl");
        write(&AuditLog::open(&path).unwrap(), 0..3);
        let mut text = std::fs::read(&path).unwrap();
        let cut = text.len() - 20;
        text.truncate(cut);
        std::fs::write(&path, &text).unwrap();
        write(&AuditLog::open(&path).unwrap(), 3..4);
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        let restart: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
        assert_eq!(restart["reason"], chain::RESTARTED);
        assert_eq!(restart["seq"], 3, "the cut record's seq is taken again");
        assert_eq!(
            restart["prev"],
            chain::hex(&chain::hash(lines[1].as_bytes()))
        );
        assert_eq!(
            restart["fragment_sha256"],
            chain::hex(&chain::hash(lines[2].as_bytes()))
        );
        let last: serde_json::Value = serde_json::from_str(&lines[4]).unwrap();
        assert_eq!(
            (last["seq"].as_u64(), last["reason"].as_str()),
            (Some(4), Some("reason-3"))
        );
        let intact = verified(&path);
        assert_eq!(intact.records, 4);
        assert!(
            intact.notes[0].contains(":3: truncated record"),
            "{:?}",
            intact.notes
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cut_first_line_after_a_rotation_continues_the_chain_of_the_file_before() {
        let dir = scratch("cut-first");
        let path = dir.join("audit.jsonl");
        write(&AuditLog::open(&path).unwrap(), 0..3);
        // As a crash during the first write after a rotation leaves it: the records in
        // FILE.1, and a new FILE holding the start of one line.
        let rotated = files::rotated(&path, 1, false);
        std::fs::rename(&path, &rotated).unwrap();
        let before = std::fs::read_to_string(&rotated).unwrap();
        std::fs::write(&path, &before.as_bytes()[..40]).unwrap();
        write(&AuditLog::open(&path).unwrap(), 3..4);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&before[..40]), "{text}");
        // The fragment, ended; then the restart and the record.
        let lines: Vec<serde_json::Value> = text
            .lines()
            .skip(1)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let restart = &lines[0];
        assert_eq!(restart["reason"], chain::RESTARTED, "{lines:#?}");
        assert_eq!(restart["seq"], 4, "{lines:#?}");
        let last_before = before.lines().last().unwrap();
        assert_eq!(
            restart["prev"],
            chain::hex(&chain::hash(last_before.as_bytes()))
        );
        assert_eq!(lines[1]["seq"], 5);
        let intact = verified(&path);
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((1, 5)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_writers_on_one_file_share_one_chain() {
        let dir = scratch("two");
        let path = dir.join("audit.jsonl");
        let a = AuditLog::open_with(&path, Some(16 << 10)).unwrap();
        let b = AuditLog::open_with(&path, Some(16 << 10)).unwrap();
        let threads: Vec<_> = [a, b]
            .into_iter()
            .enumerate()
            .map(|(t, log)| {
                std::thread::spawn(move || {
                    for n in 0..200 {
                        log.append(&record(t * 1000 + n)).unwrap();
                        if n % 7 == 0 {
                            log.sync().unwrap();
                        }
                    }
                    log.sync().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let files = files::chronological(&path).unwrap();
        assert!(
            (2..=files::KEEP as usize).contains(&files.len()),
            "{files:?}"
        );
        let intact = verified(&path);
        assert_eq!(intact.records, 400);
        assert_eq!(intact.span.map(|s| (s.0, s.1)), Some((1, 400)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Whether another open file description can take the log's lock now.
    fn lock_is_free(path: &Path) -> bool {
        let probe = File::open(lock_path(path)).unwrap();
        // SAFETY: flock on a descriptor `probe` keeps open; no memory is passed.
        unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }

    #[test]
    fn an_idle_writer_gives_up_the_lock() {
        let dir = scratch("idle");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        write(&log, 0..50);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock_is_free(&path) {
            assert!(Instant::now() < deadline, "the idle writer kept the lock");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_writer_thread_that_ends_leaves_the_log_failed() {
        let dir = scratch("writer-gone");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        assert!(!log.has_failed());
        // However the writer thread ends (a panic included), its guard goes with it.
        drop(WriterAlive(log.backlog.clone(), log.failed.clone()));
        assert!(
            log.has_failed(),
            "the tunnel would go on letting requests through"
        );
        assert!(log.append(&record(0)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reader_locking_the_log_does_not_stall_the_writer() {
        let dir = scratch("reader-lock");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        // What anyone who may read the log can do: lock it, and keep the lock.
        let reader = File::open(&path).unwrap();
        flock(&reader, libc::LOCK_EX).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            write(&log, 0..10);
            done_tx.send(()).unwrap();
        });
        let waited = done_rx.recv_timeout(Duration::from_secs(10));
        // A writer that did wait on it can finish now, whatever the verdict.
        drop(reader);
        writer.join().unwrap();
        assert!(waited.is_ok(), "the writer waited on a reader's lock");
        assert_eq!(verified(&path).records, 10);
        // Only the gateway's user may open the writers' lock file.
        let mode = std::fs::metadata(lock_path(&path)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_busy_writer_lets_another_gateway_write() {
        let dir = scratch("busy");
        let path = dir.join("audit.jsonl");
        let busy = AuditLog::open(&path).unwrap();
        let other = AuditLog::open(&path).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let feeder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // A record every 200 µs, ~25 for each of the writer's 5 ms pauses: its queue
                // never runs dry, so only its lease lets go of the lock, and never grows.
                let mut n: usize = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    busy.append(&record(n)).unwrap();
                    n += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                busy.sync().unwrap();
                n
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            write(&other, 100_000..100_010);
            done_tx.send(()).unwrap();
        });
        let written = done_rx.recv_timeout(Duration::from_secs(10));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let fed = feeder.join().unwrap();
        assert!(
            written.is_ok(),
            "the other gateway's records waited behind a busy writer"
        );
        let intact = verified(&path);
        assert_eq!(intact.records, fed as u64 + 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn appending_waits_for_a_writer_that_cannot_keep_up_and_loses_nothing() {
        let dir = scratch("backlog");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        // Another gateway holds the log's lock: the writer waits, records pile up.
        let holder = File::open(lock_path(&path)).unwrap();
        flock(&holder, libc::LOCK_EX).unwrap();
        let mut big = record(0);
        big.reason = "x".repeat(64 << 10);
        let line = {
            let mut line = Vec::new();
            line::write(&big, &mut line);
            line.len()
        };
        let total = MAX_BACKLOG / line + 64;
        let appended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let appender = {
            let (log, appended) = (log.clone(), appended.clone());
            std::thread::spawn(move || {
                for _ in 0..total {
                    log.append(&big).unwrap();
                    appended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                log.sync().unwrap();
            })
        };
        // Until the appender has done all it can: it stops, or it finishes.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut queued = 0;
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = appended.load(std::sync::atomic::Ordering::Relaxed);
            if now == queued || now == total || Instant::now() > deadline {
                queued = now;
                break;
            }
            queued = now;
        }
        assert!(queued < total, "appending never waited");
        // Past three quarters, the kernel event reader stops taking events off its ring.
        assert!(log.backed_up());
        assert!(
            queued * line <= MAX_BACKLOG + line,
            "{queued} records of {line} bytes queued"
        );
        flock(&holder, libc::LOCK_UN).unwrap();
        appender.join().unwrap();
        assert!(!log.backed_up());
        assert_eq!(verified(&path).records, total as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn refused(path: &Path, max_bytes: Option<u64>) -> String {
        match AuditLog::open_with(path, max_bytes) {
            Ok(_) => panic!("{} was opened", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_symlink_at_the_log_path_is_not_followed() {
        let dir = scratch("symlink");
        let target = dir.join("target");
        std::fs::write(&target, "precious\n").unwrap();
        let link = dir.join("audit.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = refused(&link, None);
        assert!(
            e.contains(&link.display().to_string()) && e.contains("symbolic link"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        let dangling = dir.join("dangling.jsonl");
        std::os::unix::fs::symlink(dir.join("made"), &dangling).unwrap();
        assert!(refused(&dangling, None).contains("symbolic link"));
        assert!(!dir.join("made").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_others_may_write_is_refused() {
        let dir = scratch("writable");
        let path = dir.join("audit.jsonl");
        for mode in [0o666, 0o620, 0o602] {
            std::fs::write(&path, "").unwrap();
            chmod(&path, mode);
            let e = refused(&path, None);
            assert!(e.contains("writable by group or others"), "{mode:o}: {e}");
        }
        chmod(&path, 0o600);
        write(&AuditLog::open(&path).unwrap(), 0..1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_anyone_may_write_is_refused_sticky_or_not() {
        let dir = scratch("dir");
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o777);
        let path = shared.join("audit.jsonl");
        let e = refused(&path, None);
        assert!(
            e.contains(&shared.display().to_string())
                && e.contains("writable by others without the sticky bit"),
            "{e}"
        );
        assert!(!path.exists());
        // Like /tmp: others may still plant entries under the names rotation needs.
        chmod(&shared, 0o1777);
        let e = refused(&path, None);
        assert!(
            e.contains("may be written by others than root (mode 1777"),
            "{e}"
        );
        assert!(!path.exists());
        // Only root's: fine.
        chmod(&shared, 0o755);
        write(&AuditLog::open(&path).unwrap(), 0..1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Ubuntu's /var/log is root:syslog 0775: that group's members could plant entries
    /// under the names rotation needs as well as anyone could in /tmp.
    #[test]
    fn a_directory_another_group_may_write_is_refused() {
        let dir = scratch("group");
        let shared = dir.join("shared");
        std::fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o775);
        let path = shared.join("audit.jsonl");
        nix::unistd::chown(&shared, None, Some(nix::unistd::Gid::from_raw(4))).unwrap();
        let e = refused(&path, None);
        assert!(
            e.contains("may be written by others than root (mode 0775"),
            "{e}"
        );
        assert!(!path.exists());
        // Root's group is root's.
        nix::unistd::chown(&shared, None, Some(nix::unistd::Gid::from_raw(0))).unwrap();
        write(&AuditLog::open(&path).unwrap(), 0..1);
        std::fs::remove_file(&path).unwrap();
        // An access ACL may let in someone the group bits (its mask) do not name.
        crate::test_fs::set_acl(
            &shared,
            &[
                (0x01, 7, u32::MAX),
                (0x02, 7, 65534),
                (0x04, 5, u32::MAX),
                (0x10, 7, u32::MAX),
                (0x20, 5, u32::MAX),
            ],
        );
        let e = refused(&path, None);
        assert!(e.contains("may be written by others"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_planted_rotated_file_is_not_continued() {
        let dir = scratch("planted");
        let path = dir.join("audit.jsonl");
        // A new FILE picks the chain up from FILE.1: not from one others could write.
        let rotated = files::rotated(&path, 1, false);
        std::fs::write(&rotated, "").unwrap();
        chmod(&rotated, 0o666);
        let e = refused(&path, Some(1 << 20));
        assert!(
            e.contains(&rotated.display().to_string()) && e.contains("writable by group or others"),
            "{e}"
        );
        std::fs::remove_file(&rotated).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), &rotated).unwrap();
        std::fs::write(dir.join("elsewhere"), "").unwrap();
        assert!(refused(&path, Some(1 << 20)).contains("symbolic link"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_swapped_in_between_writes_is_refused() {
        let dir = scratch("swapped");
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        write(&log, 0..2);
        // The writer reopens the file at the path when it finds it replaced (by another
        // gateway's rotation), as it takes the lock again after idling.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock_is_free(&path) {
            assert!(Instant::now() < deadline, "the idle writer kept the lock");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::fs::rename(&path, dir.join("moved")).unwrap();
        std::fs::write(&path, "").unwrap();
        chmod(&path, 0o666);
        log.append(&record(2)).unwrap();
        let e = log.sync().unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
