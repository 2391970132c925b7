//! The tunnel: the one address the sandbox may reach. An HTTP/1.1 forward proxy that decides
//! every request against `[[http.allow]]`, attaches credentials at this boundary, and serves
//! only connections the kernel says a sandbox made.

pub mod authority;
mod body_scan;
mod ca;
mod connect;
mod credentials;
mod guard;
pub(crate) mod headers;
pub(crate) mod private;
mod proxy;
pub mod rules;
mod snapshot;
mod upstream;
mod websocket;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
};

pub use ca::{LocalCa, state_dir};
pub use credentials::{CredentialError, Placeholders, Secrets};
pub use snapshot::{PolicyHandle, Snapshot};

use self::{authority::Authority, guard::HeadGuard, snapshot::WorkerPools};
use crate::{
    audit::{AuditLog, Layer, ProxyFields, Record, Verdict},
    policy::Policy,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Longest a client may take to send a request head (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted; hyper answers 431 beyond it.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Open client connections per sandbox.
const MAX_CONNECTIONS: usize = 1024;

/// Tells whether a sandbox made the TCP connection that arrived from `peer`.
pub trait ClientIdentity: Send + Sync + 'static {
    fn claim(&self, peer: SocketAddr) -> bool;
}

pub fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A connection a sandbox made, on its way to the worker that serves it.
type Accepted = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// What every worker thread of the tunnel shares.
pub struct Shared {
    sandbox: String,
    /// Rules, secrets and upstream settings: replaced whole by a reload.
    policy: PolicyHandle,
    ca: Arc<LocalCa>,
    audit: AuditLog,
    identity: Box<dyn ClientIdentity>,
    connections: Arc<Semaphore>,
    /// Learn mode (`run --learn`): what no rule allows is forwarded without a credential and
    /// recorded `would-deny` instead of refused. Every other refusal stands.
    learn: bool,
}

/// One worker: the shared state plus upstream connection pools of its own, so a request and
/// the pooled connection it uses are driven by the same thread (no cross-thread wakeups).
pub struct Tunnel {
    shared: Arc<Shared>,
    pools: WorkerPools,
}

impl std::ops::Deref for Tunnel {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Tunnel {
    pub fn new(
        policy: &Policy,
        secrets: Secrets,
        ca: Arc<LocalCa>,
        audit: AuditLog,
        identity: Box<dyn ClientIdentity>,
        learn: bool,
    ) -> anyhow::Result<Self> {
        let snapshot = Snapshot::new(policy, secrets)?;
        let pools = WorkerPools::new(&snapshot);
        Ok(Self {
            shared: Arc::new(Shared {
                sandbox: policy.name.clone(),
                policy: PolicyHandle::new(snapshot),
                ca,
                audit,
                identity,
                connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
                learn,
            }),
            pools,
        })
    }

    /// Where a reload puts the next snapshot.
    pub fn policy_handle(&self) -> PolicyHandle {
        self.policy.clone()
    }

    fn worker(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            pools: WorkerPools::new(&self.policy.current()),
        }
    }

    /// Serves `listener` on one thread per CPU, each with its own single-threaded runtime,
    /// until `stop` turns true. The first thread accepts, checks the client's identity and
    /// hands connections out in turn, so load is spread evenly whatever the kernel wakes.
    /// Join the returned threads after stopping.
    pub fn spawn_workers(
        self,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
        let listener = listener.into_std()?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut senders = Vec::with_capacity(threads);
        let mut inboxes = Vec::with_capacity(threads);
        for _ in 0..threads {
            let (tx, rx) = mpsc::unbounded_channel::<Accepted>();
            senders.push(tx);
            inboxes.push(rx);
        }
        let mut workers = vec![self];
        for _ in 1..threads {
            workers.push(workers[0].worker());
        }
        let mut listener = Some(listener);
        let mut handles = Vec::with_capacity(threads);
        for (i, (worker, inbox)) in workers.into_iter().zip(inboxes).enumerate() {
            let acceptor = listener.take().map(|l| (l, senders.clone()));
            let stop = stop.clone();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = std::thread::Builder::new()
                .name(format!("tunnel-{i}"))
                .spawn(move || {
                    runtime.block_on(Arc::new(worker).run_worker(inbox, acceptor, stop));
                })?;
            handles.push(handle);
        }
        Ok(handles)
    }

    async fn run_worker(
        self: Arc<Self>,
        mut inbox: mpsc::UnboundedReceiver<Accepted>,
        acceptor: Option<(std::net::TcpListener, Vec<mpsc::UnboundedSender<Accepted>>)>,
        mut stop: watch::Receiver<bool>,
    ) {
        if let Some((listener, workers)) = acceptor {
            match TcpListener::from_std(listener) {
                Ok(l) => {
                    tokio::spawn(self.clone().accept(l, workers, stop.clone()));
                }
                Err(e) => {
                    tracing::error!("tunnel listener: {e}");
                    return;
                }
            }
        }
        loop {
            let (stream, peer, permit) = tokio::select! {
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
            let tunnel = self.clone();
            tokio::spawn(async move {
                tunnel.serve_http(stream, peer, None).await;
                drop(permit);
            });
        }
    }

    /// Accepts until `stop` turns true; only connections a sandbox made are served.
    async fn accept(
        self: Arc<Self>,
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
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            if !self.identity.claim(peer) {
                // No sandbox made this connection: another local user must not borrow the
                // credentials. Closed before a byte is read.
                self.record(Verdict::Deny, "not-a-sandbox", peer, ProxyFields::default());
                drop(stream);
                continue;
            }
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.record(
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
            if workers[next].send((stream, peer, permit)).is_err() {
                return;
            }
        }
    }

    /// Serves HTTP/1.1 on one client stream. `inner` is the CONNECT target when the stream
    /// is an intercepted TLS session.
    async fn serve_http<S>(self: Arc<Self>, io: S, client: SocketAddr, inner: Option<Authority>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tunnel = self.clone();
        let service = service_fn(move |req| {
            let tunnel = tunnel.clone();
            let inner = inner.clone();
            async move {
                let close = guard::closes_connection(req.headers())
                    || req.method() == hyper::Method::CONNECT;
                let mut resp = tunnel.handle(req, client, inner).await;
                if close && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let served = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(HeadGuard::new(io)), service)
            .with_upgrades()
            .await;
        if let Err(e) = served {
            tracing::debug!(%client, "tunnel connection: {e}");
            if e.is_parse() || e.is_timeout() || is_ambiguous(&e) {
                self.record(
                    Verdict::Deny,
                    "malformed-request",
                    client,
                    ProxyFields::default(),
                );
            }
        }
    }

    /// Appends one proxy record. A failed write is logged loudly; the request it describes
    /// was already refused or answered.
    fn record(&self, verdict: Verdict, reason: &str, client: SocketAddr, mut fields: ProxyFields) {
        fields.client = Some(client);
        let mut record = Record::new(Layer::Proxy, verdict, &self.sandbox, reason);
        record.proxy = Some(fields);
        if let Err(e) = self.audit.append(&record) {
            tracing::error!("{e}");
        }
    }
}

fn is_ambiguous(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::InvalidData;
        }
        cur = err.source();
    }
    false
}

/// A response the tunnel makes itself. The reason goes in a header so clients and people
/// can tell a gateway refusal from an upstream's answer.
pub fn local_response(status: StatusCode, reason: &str) -> Response<Body> {
    let body = format!(
        "gateway: {} ({reason})\n",
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(reason) {
        resp.headers_mut().insert("x-gateway-reason", v);
    }
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
