//! The audit log: JSON Lines, one record per decision, appended and flushed as it happens.

mod record;

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

pub use record::{KernelFields, Layer, ProxyFields, Record, Verdict};

/// The longest a queued record waits before the writer picks it up under load.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(1);

/// Where audit records go when `--audit-log` is not given.
pub const DEFAULT_LOG: &str = "/var/log/gateway/audit.jsonl";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened for appending.
    #[error("cannot open audit log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record could not be written; the gateway treats this as fatal.
    #[error("cannot write audit log {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An append-only audit log shared by the kernel event reader, the seccomp notifier and the
/// tunnel. Records are serialized by the caller and written by one writer thread, which
/// appends whatever has queued up in a single write, within a millisecond: the tunnel's
/// request path never waits on the file. [`AuditLog::sync`] waits until everything queued
/// before it is written; a write error is reported by every later call.
#[derive(Clone)]
pub struct AuditLog {
    path: PathBuf,
    tx: mpsc::Sender<Queued>,
    failed: Arc<Mutex<Option<String>>>,
}

enum Queued {
    Line(Vec<u8>),
    Sync(mpsc::Sender<()>),
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(open_err)?;
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(Mutex::new(None));
        let writer_failed = failed.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_queued(file, &rx, &writer_failed))
            .map_err(open_err)?;
        Ok(Self {
            path: path.to_owned(),
            tx,
            failed,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record; it reaches the file as one write, so lines never interleave.
    pub fn append(&self, record: &Record) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record).expect("audit records always serialize");
        line.push(b'\n');
        self.check()?;
        self.tx.send(Queued::Line(line)).map_err(|_| self.gone())
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

    fn check(&self) -> Result<(), AuditError> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(e) => Err(AuditError::Write {
                path: self.path.clone(),
                source: std::io::Error::other(e.clone()),
            }),
        }
    }

    fn gone(&self) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            source: std::io::Error::other("the audit writer thread stopped"),
        }
    }
}

fn write_queued(mut file: File, rx: &mpsc::Receiver<Queued>, failed: &Mutex<Option<String>>) {
    let mut batch = Vec::new();
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(q) = next {
            match q {
                Queued::Line(line) => batch.extend_from_slice(&line),
                Queued::Sync(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        if !batch.is_empty() {
            if let Err(e) = file.write_all(&batch) {
                tracing::error!("cannot write the audit log: {e}");
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        // Under load, let records gather for a moment: one wakeup and one write per batch
        // instead of per record. A record waits at most this long to reach the file.
        std::thread::sleep(COALESCE);
    }
}
