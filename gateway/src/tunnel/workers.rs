//! The tunnel's threads: one listener, one accepting task that asks the kernel which sandbox
//! made each connection, and one single-threaded runtime per CPU serving the connections of
//! every sandbox, each under its own sandbox's policy.

use std::{net::SocketAddr, os::fd::AsRawFd as _, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, watch},
};

use super::{Accepted, ClientIdentity, Shared, Tunnel, record};
use crate::audit::{AuditLog, ProxyFields, Verdict};

/// At most this many unclaimed connections wait for their reset at once, so a flood of them
/// cannot hold the tunnel's descriptors; beyond it they are judged at once.
const MAX_WAITING: usize = 256;

/// The pause before accepting again after running out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a connection no sandbox claimed is held, unread, for its client's reset to land.
const RESET_GRACE: Duration = Duration::from_millis(10);

/// Decides at accept which sandbox a connection belongs to, before a byte of it is read.
pub struct Doorman {
    pub identity: Box<dyn ClientIdentity>,
    /// The `sandbox` of records about connections no sandbox made.
    pub unclaimed: String,
    pub audit: AuditLog,
}

/// Worker threads when the operator names no number: one per CPU, at most this many. Each
/// keeps upstream connections of its own, so on a large host one per CPU would multiply
/// every sandbox's upstream connections (and cold dials) by the CPU count for no agent's
/// gain.
pub const DEFAULT_MAX_THREADS: usize = 4;
/// The most worker threads an operator may ask for.
pub const MAX_THREADS: usize = 256;

/// `threads` worker threads, or the default: one per CPU, at most [`DEFAULT_MAX_THREADS`].
pub fn worker_threads(threads: Option<usize>) -> usize {
    threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(DEFAULT_MAX_THREADS)
    })
}

/// Serves `listener` for `tunnels` (one per sandbox; `doorman.identity` answers indices
/// into it) on `threads` threads, each with its own single-threaded runtime, until `stop`
/// turns true. The first thread accepts, checks the client's identity and hands connections
/// out in turn, so load is spread evenly whatever the kernel wakes. Join the returned
/// threads after stopping.
pub fn spawn_workers(
    tunnels: Vec<Tunnel>,
    doorman: Doorman,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    threads: usize,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    anyhow::ensure!(!tunnels.is_empty(), "the tunnel serves no sandbox");
    anyhow::ensure!(
        (1..=MAX_THREADS).contains(&threads),
        "the tunnel needs 1 to {MAX_THREADS} threads, not {threads}"
    );
    let listener = listener.into_std()?;
    let mut senders = Vec::with_capacity(threads);
    let mut inboxes = Vec::with_capacity(threads);
    for _ in 0..threads {
        let (tx, rx) = mpsc::unbounded_channel::<Accepted>();
        senders.push(tx);
        inboxes.push(rx);
    }
    let door = Arc::new(Door {
        doorman,
        sandboxes: tunnels.iter().map(|t| t.shared.clone()).collect(),
        waiting: Semaphore::new(MAX_WAITING),
    });
    let mut per_worker: Vec<Vec<Arc<Tunnel>>> = Vec::with_capacity(threads);
    for _ in 1..threads {
        per_worker.push(tunnels.iter().map(|t| Arc::new(t.worker())).collect());
    }
    per_worker.insert(0, tunnels.into_iter().map(Arc::new).collect());
    let mut acceptor = Some((listener, senders));
    let mut handles = Vec::with_capacity(threads);
    for (i, (tunnels, inbox)) in per_worker.into_iter().zip(inboxes).enumerate() {
        let accepting = acceptor.take().map(|(l, s)| (l, s, door.clone()));
        let stop = stop.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = std::thread::Builder::new()
            .name(format!("tunnel-{i}"))
            .spawn(move || runtime.block_on(run_worker(tunnels, inbox, accepting, stop)))?;
        handles.push(handle);
    }
    Ok(handles)
}

/// What the accepting task holds: the doorman and each sandbox's connection limit.
struct Door {
    doorman: Doorman,
    sandboxes: Vec<Arc<Shared>>,
    /// Unclaimed connections held for [`RESET_GRACE`].
    waiting: Semaphore,
}

type Acceptor = (
    std::net::TcpListener,
    Vec<mpsc::UnboundedSender<Accepted>>,
    Arc<Door>,
);

async fn run_worker(
    tunnels: Vec<Arc<Tunnel>>,
    mut inbox: mpsc::UnboundedReceiver<Accepted>,
    acceptor: Option<Acceptor>,
    mut stop: watch::Receiver<bool>,
) {
    if let Some((listener, workers, door)) = acceptor {
        match TcpListener::from_std(listener) {
            Ok(l) => {
                tokio::spawn(accept(door, l, workers, stop.clone()));
            }
            Err(e) => {
                tracing::error!("tunnel listener: {e}");
                return;
            }
        }
    }
    loop {
        let (stream, peer, permit, sandbox) = tokio::select! {
            next = inbox.recv() => match next {
                Some(a) => a,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let stream = match stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("tunnel connection from {peer}: {e}");
                continue;
            }
        };
        // The index came from the doorman, which only answers indices of `tunnels`.
        let Some(tunnel) = tunnels.get(sandbox).cloned() else {
            continue;
        };
        tokio::spawn(async move {
            tunnel.serve_http(stream, peer, None).await;
            drop(permit);
        });
    }
}

/// Accepts until `stop` turns true; only connections a sandbox made are served, each by its
/// own sandbox's tunnel.
async fn accept(
    door: Arc<Door>,
    listener: TcpListener,
    workers: Vec<mpsc::UnboundedSender<Accepted>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = 0;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("tunnel accept: {e}");
                    if out_of_resources(&e) {
                        // The error stays until descriptors or memory are freed: retrying
                        // at once would spin, and log, as fast as the CPU allows.
                        tokio::select! {
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                            _ = stop.changed() => return,
                        }
                    }
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let claimed = door.doorman.identity.claim(peer);
        let Some((index, sandbox)) = claimed.and_then(|i| Some((i, door.sandboxes.get(i)?))) else {
            tokio::spawn(refuse_unclaimed(door.clone(), stream, peer));
            continue;
        };
        let Ok(permit) = sandbox.connections.clone().try_acquire_owned() else {
            record(
                &sandbox.audit,
                &sandbox.sandbox,
                Verdict::Deny,
                "too-many-connections",
                peer,
                ProxyFields::default(),
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        next = (next + 1) % workers.len();
        if workers[next].send((stream, peer, permit, index)).is_err() {
            return;
        }
    }
}

/// Closes a connection no sandbox claimed, without reading a byte of it, and records it.
///
/// Another local user must not borrow the credentials: `not-a-sandbox`. But the kernel
/// forgets a sandbox's tunnel socket as it closes, so a sandbox client that closed its
/// connection before the tunnel accepted it is not found either: one that reset it, or one
/// that closed it with a FIN (its socket is gone once the FIN is acknowledged, ~40 ms later).
/// Such a connection is never served, and whose it was can no longer be known: it is
/// recorded as `closed-before-accept`, so a sandbox's own closes never read as someone else
/// trying the tunnel. The client forgets its entry just before it sends the reset, hence
/// the wait. A local user who half-closes a connection gets the same record, and nothing
/// else, since no answer ever comes.
async fn refuse_unclaimed(door: Arc<Door>, stream: TcpStream, peer: SocketAddr) {
    // Recorded on drop, so a shutdown during the wait still leaves the record.
    let mut refusal = Unclaimed {
        door: door.clone(),
        peer,
        reason: "not-a-sandbox",
    };
    let mut closed = client_closed(&stream);
    if !closed && let Ok(_waiting) = door.waiting.try_acquire() {
        tokio::time::sleep(RESET_GRACE).await;
        closed = client_closed(&stream);
    }
    if closed {
        refusal.reason = "closed-before-accept";
    }
}

fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Whether the client has reset the connection or sent its FIN. Reads (and clears) the
/// socket's pending error.
fn client_closed(stream: &TcpStream) -> bool {
    let reset = matches!(
        stream.take_error(),
        Ok(Some(e)) if e.kind() == std::io::ErrorKind::ConnectionReset
    );
    reset || tcp_state(stream) == Some(TCP_CLOSE_WAIT)
}

/// Linux's TCP_CLOSE_WAIT (include/net/tcp_states.h): the peer's FIN has arrived.
const TCP_CLOSE_WAIT: u8 = 8;

/// The connection's state, as `TCP_INFO` gives it.
fn tcp_state(stream: &TcpStream) -> Option<u8> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes of a tcp_info into `info`, which is
    // zeroed, so whatever it leaves unwritten is still a valid tcp_info.
    let done = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // SAFETY: zeroed, then at most written by the kernel (above).
    (done == 0).then(|| unsafe { info.assume_init() }.tcpi_state)
}

struct Unclaimed {
    door: Arc<Door>,
    peer: SocketAddr,
    reason: &'static str,
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        self.door.refuse(self.reason, self.peer);
    }
}

impl Door {
    fn refuse(&self, reason: &str, peer: SocketAddr) {
        record(
            &self.doorman.audit,
            &self.doorman.unclaimed,
            Verdict::Deny,
            reason,
            peer,
            ProxyFields::default(),
        );
    }
}
