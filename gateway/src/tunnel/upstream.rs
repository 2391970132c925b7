//! Upstream connections: one pool per rule, dialing exactly the address that was
//! checked (one lookup, then the private-range check, then that address), TLS by rustls with
//! the system roots plus `[tls] upstream_ca`, HTTP/2 when the upstream offers it. Learn mode
//! adds one more pool for requests no rule allows.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use std::{net::ToSocketAddrs as _, sync::atomic::AtomicUsize};
use tokio::{net::TcpStream, sync::Semaphore};

use super::{
    pool::Pool,
    private::{is_link_local, is_private},
    rules::Rules,
};
use crate::policy::HttpRule;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for its name lookup (a turn, then the answer).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Lookups one sandbox may have running at once. Each holds a blocking thread until the
/// resolver answers, however long after its request gave up: the bound keeps a sandbox's
/// slow names from taking every such thread from the other sandboxes.
const MAX_LOOKUPS: usize = 64;
/// Upstream connections one sandbox may keep while no request uses them, across its rules,
/// the worker threads and reloads: each holds a descriptor of the gateway's.
pub const MAX_KEPT: usize = 256;

/// What all of one sandbox's upstream connections draw on, whatever rule, worker thread or
/// policy generation made them.
#[derive(Clone)]
pub struct Budget {
    /// Connections kept (idle HTTP/1.1 ones, each host's HTTP/2 one), at most [`MAX_KEPT`].
    pub kept: Arc<AtomicUsize>,
    lookups: Arc<Semaphore>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            kept: Arc::default(),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
        }
    }
}

/// A request body on its way upstream: the client's, possibly behind a size limit.
pub type RequestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The pools of every rule, by rule index, each made on the rule's first request (a policy
/// of thousands of rules costs nothing until they are used, at start and on reload), and
/// learn mode's pool.
pub struct Upstreams {
    tls: ClientConfig,
    dialers: Vec<Dialer>,
    pools: Vec<OnceLock<Arc<Pool>>>,
    /// For requests no rule allows, in learn mode; it keeps connections per host.
    learn: OnceLock<Arc<Pool>>,
    budget: Budget,
}

/// Found in a response's extensions when learn mode dialed a private address for it: the
/// audit record then says `private-address`, so the suggested rule gets `private = true`.
#[derive(Debug, Clone, Copy)]
pub struct PrivateUpstream;

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(
        "{host} resolves to {addr}, a private address, and the rule does not say private = true"
    )]
    Private { host: String, addr: SocketAddr },
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out connecting to {host}")]
    Timeout { host: String },
    #[error("request URI has no host")]
    NoHost,
}

impl Upstreams {
    /// Pools for every rule, sharing `tls` (see [`client_tls`]).
    pub fn new(rules: &Rules, tls: &ClientConfig, budget: &Budget) -> Self {
        let dialers: Vec<Dialer> = rules
            .iter()
            .map(|r| Dialer::for_rule(&r.spec, &budget.lookups))
            .collect();
        Self {
            tls: tls.clone(),
            pools: dialers.iter().map(|_| OnceLock::new()).collect(),
            dialers,
            learn: OnceLock::new(),
            budget: budget.clone(),
        }
    }

    pub fn pool(&self, rule: usize) -> Arc<Pool> {
        self.pools[rule]
            .get_or_init(|| Pool::new(&self.tls, &self.dialers[rule], &self.budget.kept))
            .clone()
    }

    /// The pool for what learn mode lets through: no `connect`, private addresses dialed
    /// and marked with [`PrivateUpstream`].
    pub fn learn(&self) -> Arc<Pool> {
        self.learn
            .get_or_init(|| {
                let dialer = Dialer {
                    connect: None,
                    private: Private::Mark,
                    lookups: self.budget.lookups.clone(),
                };
                Pool::new(&self.tls, &dialer, &self.budget.kept)
            })
            .clone()
    }
}

/// The upstream TLS settings: system roots plus `[tls] upstream_ca`. Read once per policy.
pub fn client_tls(upstream_ca: &[std::path::PathBuf]) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!("system CA store: {e}");
    }
    let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
    for path in upstream_ca {
        // A regular file of a sane size, not waited on: a reload reads it in the supervisor.
        let pem = crate::trusted_file::read(path, "the CA file")
            .with_context(|| format!("reading [tls] upstream_ca {}", path.display()))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!(
                    "[tls] upstream_ca {} is not PEM certificates",
                    path.display()
                )
            })?;
        anyhow::ensure!(
            !certs.is_empty(),
            "[tls] upstream_ca {} holds no certificate",
            path.display()
        );
        for cert in certs {
            roots.add(cert).with_context(|| {
                format!("[tls] upstream_ca {}: bad certificate", path.display())
            })?;
        }
    }
    Ok(ClientConfig::builder_with_provider(super::crypto())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Resolves once, refuses private addresses unless allowed, dials what it checked.
#[derive(Clone)]
pub struct Dialer {
    connect: Option<SocketAddr>,
    private: Private,
    lookups: Arc<Semaphore>,
}

/// What the dialer does when a name resolves to a private address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Private {
    /// Refuse the request: the rule does not say `private = true`.
    Refuse,
    /// Dial it: the rule says `private = true`.
    Allow,
    /// Dial it and mark the connection (learn mode, no rule to say either way).
    Mark,
}

impl Dialer {
    /// Dials `addr` whatever the host, as a rule with `connect` and `private = true` does.
    #[cfg(test)]
    pub(super) fn pinned(addr: SocketAddr) -> Self {
        Self {
            connect: Some(addr),
            private: Private::Allow,
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
        }
    }

    fn for_rule(rule: &HttpRule, lookups: &Arc<Semaphore>) -> Self {
        Self {
            lookups: lookups.clone(),
            connect: rule.connect,
            private: if rule.private {
                Private::Allow
            } else {
                Private::Refuse
            },
        }
    }

    async fn dial(self, uri: Uri) -> Result<Dialed, DialError> {
        let host = uri
            .host()
            .ok_or(DialError::NoHost)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        // `connect` is the policy author's own address for this host: no lookup to rebind.
        let candidates: Vec<SocketAddr> = match self.connect {
            Some(addr) => vec![addr],
            None => {
                let found = resolve(&self.lookups, &host, port).await?;
                if found.is_empty() {
                    return Err(DialError::NoAddress { host });
                }
                // One private answer means the name is not what the rule meant; learn mode,
                // with no rule, still never goes near the metadata service.
                let refused = match self.private {
                    Private::Refuse => found.iter().find(|a| is_private(a.ip())),
                    Private::Mark => found.iter().find(|a| is_link_local(a.ip())),
                    Private::Allow => None,
                };
                if let Some(addr) = refused {
                    return Err(DialError::Private { host, addr: *addr });
                }
                found
            }
        };
        let mut last = None;
        for addr in candidates {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let private = (self.private == Private::Mark && is_private(addr.ip()))
                        .then_some(PrivateUpstream);
                    return Ok(Dialed {
                        io: TokioIo::new(stream),
                        private,
                    });
                }
                Ok(Err(source)) => last = Some(DialError::Connect { addr, source }),
                Err(_) => last = Some(DialError::Timeout { host: host.clone() }),
            }
        }
        Err(last.unwrap_or(DialError::NoAddress { host }))
    }
}

/// The addresses of `host`, looked up on a blocking thread that keeps its `lookups` turn
/// until the resolver answers, even after the request stopped waiting.
async fn resolve(
    lookups: &Arc<Semaphore>,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, DialError> {
    let name = host.to_owned();
    on_lookup_thread(lookups, host, RESOLVE_TIMEOUT, move || {
        (name.as_str(), port)
            .to_socket_addrs()
            .map(Iterator::collect)
    })
    .await
}

async fn on_lookup_thread<F>(
    lookups: &Arc<Semaphore>,
    host: &str,
    timeout: Duration,
    lookup: F,
) -> Result<Vec<SocketAddr>, DialError>
where
    F: FnOnce() -> std::io::Result<Vec<SocketAddr>> + Send + 'static,
{
    let waited = async {
        let turn = lookups.clone().acquire_owned().await;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            lookup()
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    tokio::time::timeout(timeout, waited)
        .await
        .map_err(|_| DialError::Timeout {
            host: host.to_owned(),
        })?
        .map_err(|source| DialError::Resolve {
            host: host.to_owned(),
            source,
        })
}

/// A dialed upstream connection; tells the pool whether learn mode reached a private
/// address through it.
pub struct Dialed {
    io: TokioIo<TcpStream>,
    private: Option<PrivateUpstream>,
}

impl Connection for Dialed {
    fn connected(&self) -> Connected {
        let connected = self.io.connected();
        match self.private {
            Some(p) => connected.extra(p),
            None => connected,
        }
    }
}

impl hyper::rt::Read for Dialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Dialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl tower_service::Service<Uri> for Dialer {
    type Response = Dialed;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().dial(uri))
    }
}

/// The dial error somewhere in an upstream error's chain, if that is what failed.
pub fn dial_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a DialError> {
    source_of(err)
}

/// The first error of type `T` in `err`'s source chain: what hyper's errors wrap of ours.
pub fn source_of<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// Shared for splices (passthrough), which dial without HTTP.
pub async fn dial_raw(
    rule: &HttpRule,
    host: &str,
    port: u16,
    budget: &Budget,
) -> Result<TcpStream, DialError> {
    let uri: Uri = format!("https://{}:{port}/", bracket(host))
        .parse()
        .map_err(|_| DialError::NoHost)?;
    Dialer::for_rule(rule, &budget.lookups)
        .dial(uri)
        .await
        .map(|d| d.io.into_inner())
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO as an upstream CA (read again by every reload) is refused at once, not waited on.
    #[test]
    fn an_upstream_ca_that_is_a_fifo_is_refused_at_once() {
        let dir = crate::test_fs::Dir::new("upstream-ca-fifo");
        let fifo = dir.0.join("ca.pem");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = crate::test_fs::within_seconds(&fifo, |p| client_tls(&[p.to_owned()]).map(drop))
            .expect("reading a FIFO as an upstream CA waited for a writer")
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "reading [tls] upstream_ca {}: it is not a regular file",
                fifo.display()
            )),
            "{e}"
        );
    }

    /// A lookup the request gave up on keeps its turn until the resolver answers: the bound
    /// is on the threads lookups hold, not on the requests waiting.
    #[tokio::test]
    async fn a_lookup_keeps_its_turn_until_the_resolver_answers() {
        let lookups = Arc::new(Semaphore::new(2));
        let (answer, answered) = std::sync::mpsc::channel::<()>();
        let wait = Duration::from_millis(50);
        let slow = on_lookup_thread(&lookups, "slow.test", wait, move || {
            let _ = answered.recv();
            Ok(Vec::new())
        });
        assert!(matches!(slow.await, Err(DialError::Timeout { .. })));
        assert_eq!(lookups.available_permits(), 1, "still held by the lookup");
        answer.send(()).unwrap();
        for _ in 0..1000 {
            if lookups.available_permits() == 2 {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the turn was not given back once the lookup ended");
    }
}
