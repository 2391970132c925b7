//! The tunnel: the one address the sandbox may reach. An HTTP/1.1 forward proxy that decides
//! every request against `[[http.allow]]`, attaches credentials at this boundary, and serves
//! only connections the kernel says a sandbox made.

pub mod authority;
mod body_scan;
mod ca;
mod coded_scan;
mod connect;
mod credentials;
mod echo_registry;
mod form_override;
mod guard;
pub(crate) mod headers;
mod hello_gate;
mod late_cut;
pub(crate) mod path_forms;
mod pool;
mod pooled_body;
pub(crate) mod private;
mod proxy;
mod response_scan;
mod secret_file;
pub use proxy::CREDENTIAL_OVER_PLAIN_HTTP;
pub mod rules;
mod snapshot;
mod upstream;
mod websocket;
mod workers;
mod ws_echo;
mod ws_scan;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};

pub use ca::{LocalCa, state_dir};
pub use credentials::{CredentialError, LoadContext, Placeholders, Secrets, Whose};
pub use echo_registry::EchoRegistry;
pub use secret_file::SandboxReader;
pub(crate) use secret_file::{Exposure, has_acl, replaceable, written_by_others};
pub use snapshot::{PolicyHandle, Snapshot};
pub use workers::{Doorman, MAX_THREADS, spawn_workers, worker_threads};

/// Reads a policy's `[tls] upstream_ca` as the tunnel will, so that a missing or bad file
/// stops `run` or `serve` before anything is created.
pub fn check_upstream_ca(policy: &Policy) -> anyhow::Result<()> {
    upstream::client_tls(&policy.upstream_ca).map(drop)
}

use self::{authority::Authority, guard::HeadGuard, snapshot::WorkerPools};
use crate::{
    audit::{AuditLog, ProxyFields, Verdict},
    policy::Policy,
};

/// What the tunnel answers with; a body cut for carrying a secret ends in an error of its own.
pub type Body = BoxBody<Bytes, body_scan::BoxError>;

/// Longest a client may take to send a request head (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted; hyper answers 431 beyond it.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Open client connections per sandbox.
const MAX_CONNECTIONS: usize = 1024;

/// Tells which sandbox made the TCP connection that arrived from `peer`: the index of its
/// tunnel among those one listener serves, or `None` when no sandbox made it.
pub trait ClientIdentity: Send + Sync + 'static {
    fn claim(&self, peer: SocketAddr) -> Option<usize>;
}

pub fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A connection a sandbox made, on its way to the worker that serves it: the stream, its
/// client, the sandbox's connection permit, and the index of the sandbox's tunnel.
type Accepted = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit, usize);

/// What every worker thread shares about one sandbox.
pub struct Shared {
    sandbox: String,
    /// Rules, secrets and upstream settings: replaced whole by a reload.
    policy: PolicyHandle,
    /// What answers are scanned for: every secret of every sandbox the gateway serves, and
    /// every secret an earlier policy of theirs held.
    echoes: EchoRegistry,
    ca: Arc<LocalCa>,
    audit: AuditLog,
    /// This sandbox's open client connections; another sandbox cannot use them up.
    connections: Arc<Semaphore>,
    /// What its upstream connections may hold: kept connections, name lookups.
    upstream: upstream::Budget,
    /// Learn mode (`run --learn`): what no rule allows is forwarded without a credential and
    /// recorded `would-deny` instead of refused. Every other refusal stands.
    learn: bool,
}

/// One sandbox on one worker: the sandbox's shared state plus upstream connection pools of
/// the worker's own, so a request and the pooled connection it uses are driven by the same
/// thread (no cross-thread wakeups) and sandboxes never share an upstream connection.
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

impl Shared {
    /// A connection permit for a session that outlives its HTTP connection (a CONNECT
    /// session, a WebSocket pipe): hyper ends the connection, and gives its permit back, at
    /// the upgrade. None when the sandbox has no connections left.
    fn session_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }
}

impl Tunnel {
    /// `echoes` is the gateway's one registry, shared by every sandbox it serves: this
    /// sandbox's secrets join it here, and this sandbox's answers are scanned for all of it.
    pub fn new(
        policy: &Policy,
        secrets: Secrets,
        ca: Arc<LocalCa>,
        audit: AuditLog,
        echoes: &EchoRegistry,
        learn: bool,
    ) -> anyhow::Result<Self> {
        let snapshot = Snapshot::new(policy, secrets)?;
        let budget = upstream::Budget::default();
        let pools = WorkerPools::new(&snapshot, &budget);
        Ok(Self {
            shared: Arc::new(Shared {
                sandbox: policy.name.clone(),
                policy: PolicyHandle::new(snapshot, echoes.clone()),
                echoes: echoes.clone(),
                ca,
                audit,
                connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
                upstream: budget,
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
            pools: WorkerPools::new(&self.policy.current(), &self.upstream),
        }
    }

    /// Serves HTTP/1.1 on one client stream. `inner` is the CONNECT target when the stream
    /// is an intercepted TLS session.
    async fn serve_http<S>(self: Arc<Self>, io: S, client: SocketAddr, inner: Option<Authority>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tunnel = self.clone();
        let target = inner.clone();
        let service = service_fn(move |req| {
            let tunnel = tunnel.clone();
            let inner = target.clone();
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
        let report = Arc::new(guard::Report::default());
        let served = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(HeadGuard::new(io, report.clone())), service)
            .with_upgrades()
            .await;
        if let Err(e) = &served {
            tracing::debug!(%client, "tunnel connection: {e}");
        }
        // Inside a session, at least the CONNECT target is known.
        let fields = || ProxyFields {
            host: inner.as_ref().map(|a| a.host.clone()),
            port: inner.as_ref().map(|a| a.port),
            ..Default::default()
        };
        // Whatever hyper made of the refused head's start (an end of stream mid-head, or
        // its own error), the guard's reason is the one to record.
        if let Some(reason) = report.refused() {
            let fields = ProxyFields {
                status: report
                    .answered()
                    .then_some(StatusCode::BAD_REQUEST.as_u16()),
                ..fields()
            };
            self.record(Verdict::Deny, reason, client, fields);
            return;
        }
        if let Err(e) = served {
            // hyper's header timer also ends keep-alive connections idle between requests:
            // only a head that started and did not finish in time is a refusal.
            if e.is_parse() || (e.is_timeout() && report.mid_head()) {
                self.record(Verdict::Deny, "malformed-request", client, fields());
            }
        }
    }

    /// Appends one proxy record. A failed write is logged loudly; the request it describes
    /// was already refused or answered.
    fn record(&self, verdict: Verdict, reason: &str, client: SocketAddr, fields: ProxyFields) {
        record(&self.audit, &self.sandbox, verdict, reason, client, fields);
    }
}

fn record(
    audit: &AuditLog,
    sandbox: &str,
    verdict: Verdict,
    reason: &str,
    client: SocketAddr,
    fields: ProxyFields,
) {
    write_record(audit, sandbox, verdict, reason, prepared(fields, client));
}

/// The fields as a record carries them: with the client, cut to size (once: a cut field
/// is longer than the bound by its marker).
fn prepared(mut fields: ProxyFields, client: SocketAddr) -> ProxyFields {
    fields.client = Some(client);
    fields.bounded()
}

/// Writes a record of [`prepared`] fields, and hands them back for a later record about the
/// same request.
fn write_record(
    audit: &AuditLog,
    sandbox: &str,
    verdict: Verdict,
    reason: &str,
    fields: ProxyFields,
) -> ProxyFields {
    if let Err(e) = audit.append_proxy(verdict, sandbox, reason, &fields) {
        tracing::error!("{e}");
    }
    fields
}

/// A response the tunnel makes itself. The reason goes in a header so clients and people
/// can tell a gateway refusal from an upstream's answer.
pub fn local_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(refusal_text(status, reason)))
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

/// The body of a response the tunnel makes itself.
fn refusal_text(status: StatusCode, reason: &str) -> String {
    format!(
        "gateway: {} ({reason})\n",
        status.canonical_reason().unwrap_or("")
    )
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
