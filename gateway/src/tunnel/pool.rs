//! The upstream connections of one rule (or of learn mode) on one worker thread, driven
//! through hyper's connection halves directly: a request costs a lock and a pop, where the
//! legacy client added a checkout future, a pooled wrapper and a task per request to put
//! the connection back.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::{
    Method, Request, Response, Uri,
    client::conn::{TrySendError, http1, http2},
    header::{self, HeaderValue},
    http::{
        Extensions,
        uri::{Authority, PathAndQuery, Scheme},
    },
};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{client::legacy::connect::Connection as _, rt::TokioExecutor};
use rustls::ClientConfig;
use tower_service::Service as _;

use super::{
    pooled_body::{GiveBack, UpstreamBody},
    upstream::{DialError, Dialer, PrivateUpstream, RequestBody},
};

// Past MAX_KEPT, an HTTP/1.1 connection is closed when its response ends, an HTTP/2 one
// when its requests end.
use super::upstream::MAX_KEPT;
/// An idle connection older than this is closed rather than reused (the legacy default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// A new upstream connection in all: the lookup and each TCP connect (each bounded by the
/// dialer too), then the TLS handshake and HTTP/2's, which an upstream that never answers
/// would otherwise hold, with the request and its client's connection permit, for ever.
const DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a pool closes what has been idle too long, since nothing else would close a
/// connection to a host the sandbox stopped naming.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Why a request got no response from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Dialing or the TLS handshake failed; a [`super::upstream::DialError`] in the chain
    /// says why when the dialer refused or could not connect.
    #[error("connecting upstream")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP handshake or exchange failed.
    #[error("upstream HTTP")]
    Http(#[source] hyper::Error),
}

/// What becomes of an upstream connection once its exchange is over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Exchange {
    /// Kept for the next request once the response has been read to the end.
    Pooled,
    /// Closed after this exchange, on both ends (`Connection: close`): nothing may follow
    /// this request on the connection.
    Last,
    /// A connection of its own, never pooled: after a 101 it belongs to the upgrade.
    Upgrade,
}

pub struct Pool {
    /// HTTP/1.1 or HTTP/2 as the upstream offers by ALPN.
    connector: HttpsConnector<Dialer>,
    /// HTTP/1.1 only: upgrades (WebSocket) do not exist on an HTTP/2 connection.
    upgrade: HttpsConnector<Dialer>,
    hosts: Mutex<Hosts>,
    /// Connections the sandbox keeps, in this pool and its others, at most [`MAX_KEPT`].
    idle: Arc<AtomicUsize>,
}

/// Keyed by scheme and authority: a rule may match several hosts, learn mode any.
#[derive(Default)]
struct Hosts {
    /// The host of the last request, found without hashing: most rules name one host.
    last: Option<(Scheme, Authority, Arc<Host>)>,
    all: HashMap<(Scheme, Authority), Arc<Host>>,
}

/// The connections to one scheme and authority.
pub(super) struct Host {
    conns: Mutex<Conns>,
    /// Made once per host rather than formatted per request.
    header: Option<HeaderValue>,
    /// The pool's count of kept connections.
    idle: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Conns {
    /// Shared by every request while it stays open.
    h2: Option<H2Conn>,
    /// Sweeps since a request last used `h2`: one idle for [`IDLE_TIMEOUT`] is dropped.
    h2_quiet_sweeps: u32,
    /// Most recently used last: the warmest connection is reused first, the coldest age out.
    idle: Vec<Idle>,
    /// The pool is gone: nothing is kept any more.
    released: bool,
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

#[derive(Clone)]
struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    private: bool,
}

pub(super) struct H1Conn {
    sender: http1::SendRequest<RequestBody>,
    /// Learn mode dialed a private address: every response says so.
    private: bool,
}

enum Conn {
    H1(H1Conn),
    H2(H2Conn),
}

/// A request the connection gave back unsent, or the error that ended it.
struct Failed {
    error: hyper::Error,
    unsent: Option<Request<RequestBody>>,
}

impl From<TrySendError<Request<RequestBody>>> for Failed {
    fn from(mut e: TrySendError<Request<RequestBody>>) -> Self {
        Self {
            unsent: e.take_message(),
            error: e.into_error(),
        }
    }
}

impl Pool {
    /// A pool made on a worker's runtime sweeps itself there until it is dropped. `kept`
    /// counts the connections the sandbox keeps, in all its pools.
    pub fn new(tls: &ClientConfig, dialer: &Dialer, kept: &Arc<AtomicUsize>) -> Arc<Self> {
        let builder = || {
            HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
        };
        let pool = Arc::new(Self {
            connector: builder().enable_http2().wrap_connector(dialer.clone()),
            upgrade: builder().wrap_connector(dialer.clone()),
            hosts: Mutex::default(),
            idle: kept.clone(),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep_while_alive(Arc::downgrade(&pool)));
        }
        pool
    }

    /// Sends `req` (absolute URI) on a pooled connection or a new one; what becomes of the
    /// connection afterwards is `exchange`'s.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        exchange: Exchange,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let uri = req.uri().clone();
        if exchange == Exchange::Upgrade {
            let conn = dial(&self.upgrade, &uri, true).await?;
            return conn
                .send(req, host_header(&uri), None, exchange)
                .await
                .map_err(|f| UpstreamError::Http(f.error));
        }
        let host = self.host(&uri);
        let keep = (exchange == Exchange::Pooled).then_some(&host);
        let (conn, reused) = match host.checkout().await {
            Some(conn) => (conn, true),
            None => (host.dial(&self.connector, &uri).await?, false),
        };
        let failed = match conn.send(req, host.header.clone(), keep, exchange).await {
            Ok(resp) => return Ok(resp),
            Err(failed) => failed,
        };
        // The server closed an idle connection as we picked it: the request never left, so
        // it goes once more on a fresh connection instead of failing for a keep-alive race.
        match failed.unsent {
            Some(mut req) if reused => {
                tracing::debug!(%uri, "reused connection closed before sending: {}", failed.error);
                *req.uri_mut() = uri.clone();
                let conn = host.dial(&self.connector, &uri).await?;
                conn.send(req, host.header.clone(), keep, exchange)
                    .await
                    .map_err(|f| UpstreamError::Http(f.error))
            }
            _ => Err(UpstreamError::Http(failed.error)),
        }
    }

    fn host(&self, uri: &Uri) -> Arc<Host> {
        let scheme = uri.scheme().unwrap_or(&Scheme::HTTPS);
        let invalid = Authority::from_static("invalid");
        let authority = uri.authority().unwrap_or(&invalid);
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((s, a, host)) = &hosts.last
            && s == scheme
            && a == authority
        {
            return host.clone();
        }
        let host = hosts
            .all
            .entry((scheme.clone(), authority.clone()))
            .or_insert_with(|| {
                Arc::new(Host {
                    conns: Mutex::default(),
                    header: host_header(uri),
                    idle: self.idle.clone(),
                })
            })
            .clone();
        hosts.last = Some((scheme.clone(), authority.clone(), host.clone()));
        host
    }

    /// Closes the connections idle since before `now - IDLE_TIMEOUT` and those the upstream
    /// closed, and forgets hosts left with nothing that no request holds.
    fn sweep(&self, now: Instant) {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let hosts = &mut *hosts;
        for host in hosts.all.values() {
            host.sweep(now);
        }
        if hosts.last.as_ref().is_some_and(|(_, _, h)| h.is_empty()) {
            hosts.last = None;
        }
        hosts
            .all
            .retain(|_, host| Arc::strong_count(host) > 1 || !host.is_empty());
    }

    /// Idle HTTP/1.1 connections kept, across hosts.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }
}

async fn sweep_while_alive(pool: Weak<Pool>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.sweep(Instant::now());
    }
}

impl Host {
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open HTTP/2 connection, else the most recent idle HTTP/1.1 one that is still open.
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = {
                let mut conns = self.conns();
                if let Some(h2) = &conns.h2 {
                    if !h2.sender.is_closed() {
                        let h2 = h2.clone();
                        conns.h2_quiet_sweeps = 0;
                        return Some(Conn::H2(h2));
                    }
                    conns.h2 = None;
                    self.idle.fetch_sub(1, Ordering::Relaxed);
                }
                let idle = conns.idle.pop()?;
                self.idle.fetch_sub(1, Ordering::Relaxed);
                if idle.since.elapsed() > IDLE_TIMEOUT {
                    // Everything below it has been idle longer still.
                    self.idle.fetch_sub(conns.idle.len(), Ordering::Relaxed);
                    conns.idle.clear();
                    return None;
                }
                idle.conn
            };
            if !conn.sender.is_closed() && conn.sender.ready().await.is_ok() {
                return Some(Conn::H1(conn));
            }
        }
    }

    /// Takes back a connection whose response was read to the end.
    pub(super) fn give_back(&self, conn: H1Conn) {
        let mut conns = self.conns();
        if conn.sender.is_closed() || conns.released || !self.take_room() {
            return;
        }
        conns.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Counts one more kept connection, if the pool has room for it.
    fn take_room(&self) -> bool {
        if self.idle.fetch_add(1, Ordering::Relaxed) >= MAX_KEPT {
            self.idle.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn sweep(&self, now: Instant) {
        let mut conns = self.conns();
        let before = conns.idle.len();
        conns.idle.retain(|i| {
            now.saturating_duration_since(i.since) <= IDLE_TIMEOUT && !i.conn.sender.is_closed()
        });
        self.idle
            .fetch_sub(before - conns.idle.len(), Ordering::Relaxed);
        if conns.h2.is_some() {
            conns.h2_quiet_sweeps += 1;
            let quiet = SWEEP_EVERY * conns.h2_quiet_sweeps;
            if quiet > IDLE_TIMEOUT || conns.h2.as_ref().is_some_and(|h2| h2.sender.is_closed()) {
                // Requests still in flight keep the connection until they end.
                conns.h2 = None;
                self.idle.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn is_empty(&self) -> bool {
        let conns = self.conns();
        conns.h2.is_none() && conns.idle.is_empty()
    }

    async fn dial(
        &self,
        connector: &HttpsConnector<Dialer>,
        uri: &Uri,
    ) -> Result<Conn, UpstreamError> {
        let conn = dial(connector, uri, false).await?;
        if let Conn::H2(h2) = &conn {
            let mut conns = self.conns();
            // Another request may have dialed one meanwhile: this one replaces it.
            if !conns.released && (conns.h2.is_some() || self.take_room()) {
                conns.h2 = Some(h2.clone());
                conns.h2_quiet_sweeps = 0;
            }
        }
        Ok(conn)
    }
}

impl Drop for Pool {
    /// A pool goes when a reload replaced it: its kept connections close now and stop
    /// counting against the sandbox, even on a host whose last response is still streaming
    /// (that response's connection is then closed, not kept, when it ends).
    fn drop(&mut self) {
        let hosts = self.hosts.get_mut().unwrap_or_else(PoisonError::into_inner);
        for host in hosts.all.values() {
            host.release();
        }
    }
}

impl Host {
    /// Closes every connection kept here, and stops keeping any: the pool is gone.
    fn release(&self) {
        let mut conns = self.conns();
        let kept = conns.idle.len() + usize::from(conns.h2.is_some());
        conns.idle.clear();
        conns.h2 = None;
        conns.released = true;
        self.idle.fetch_sub(kept, Ordering::Relaxed);
    }
}

impl Drop for Host {
    /// A host goes with its pool, or once swept with nothing pooled; either way its idle
    /// connections no longer count.
    fn drop(&mut self) {
        self.release();
    }
}

/// A new connection, its driver spawned on this worker's runtime.
async fn dial(
    connector: &HttpsConnector<Dialer>,
    uri: &Uri,
    upgrade: bool,
) -> Result<Conn, UpstreamError> {
    let timed_out = || {
        UpstreamError::Connect(Box::new(DialError::Timeout {
            host: uri.host().unwrap_or_default().to_owned(),
        }))
    };
    tokio::time::timeout(DIAL_TIMEOUT, dial_unbounded(connector, uri, upgrade))
        .await
        .map_err(|_| timed_out())?
}

async fn dial_unbounded(
    connector: &HttpsConnector<Dialer>,
    uri: &Uri,
    upgrade: bool,
) -> Result<Conn, UpstreamError> {
    let stream = connector
        .clone()
        .call(uri.clone())
        .await
        .map_err(UpstreamError::Connect)?;
    let connected = stream.connected();
    let mut extras = Extensions::new();
    connected.get_extras(&mut extras);
    let private = extras.get::<PrivateUpstream>().is_some();
    if connected.is_negotiated_h2() {
        let (sender, driver) = http2::handshake(TokioExecutor::new(), stream)
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!("upstream HTTP/2 connection: {e}");
            }
        });
        return Ok(Conn::H2(H2Conn { sender, private }));
    }
    let (sender, driver) = http1::handshake(stream)
        .await
        .map_err(UpstreamError::Http)?;
    if upgrade {
        tokio::spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!("upstream HTTP/1.1 connection: {e}");
            }
        });
    } else {
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!("upstream HTTP/1.1 connection: {e}");
            }
        });
    }
    Ok(Conn::H1(H1Conn { sender, private }))
}

impl Conn {
    /// Sends on this connection. With `pool`, an HTTP/1.1 connection goes back there once
    /// its response body has been read to the end; [`Exchange::Last`] asks the upstream to
    /// close it after this response.
    async fn send(
        self,
        mut req: Request<RequestBody>,
        host_header: Option<HeaderValue>,
        pool: Option<&Arc<Host>>,
        exchange: Exchange,
    ) -> Result<Response<UpstreamBody>, Failed> {
        match self {
            Conn::H2(mut conn) => {
                let resp = conn.sender.try_send_request(req).await?;
                Ok(mark(resp, conn.private).map(|b| UpstreamBody::new(b, None)))
            }
            Conn::H1(mut conn) => {
                origin_form(&mut req, host_header);
                if exchange == Exchange::Last {
                    // HTTP/2 needs no such header: its frames delimit every body.
                    req.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                let resp = conn.sender.try_send_request(req).await?;
                let resp = mark(resp, conn.private);
                let give_back = pool.map(|host| GiveBack {
                    host: host.clone(),
                    conn,
                });
                Ok(resp.map(|b| UpstreamBody::new(b, give_back)))
            }
        }
    }
}

fn mark<B>(mut resp: Response<B>, private: bool) -> Response<B> {
    if private {
        resp.extensions_mut().insert(PrivateUpstream);
    }
    resp
}

/// HTTP/1.1 names the host in a Host header and the resource in origin-form.
fn origin_form(req: &mut Request<RequestBody>, host: Option<HeaderValue>) {
    if let Some(host) = host {
        req.headers_mut().entry(header::HOST).or_insert(host);
    }
    let uri = req.uri();
    let target = if req.method() == Method::CONNECT {
        uri.authority().map(|a| Uri::from(a.clone()))
    } else {
        Some(Uri::from(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        ))
    };
    if let Some(target) = target {
        *req.uri_mut() = target;
    }
}

/// The Host header for the checked authority in `uri`, default port left out.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    match non_default_port(uri) {
        Some(port) => HeaderValue::try_from(format!("{host}:{port}")).ok(),
        None => HeaderValue::try_from(host).ok(),
    }
}

fn non_default_port(uri: &Uri) -> Option<u16> {
    let port = uri.port_u16()?;
    match (uri.scheme_str(), port) {
        (Some("https"), 443) | (Some("http"), 80) => None,
        _ => Some(port),
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr};

    use http_body_util::{BodyExt as _, Full};
    use hyper::{
        body::Bytes,
        server::conn::{http1 as server, http2 as server2},
        service::service_fn,
    };
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::tunnel::upstream::{Dialer, client_tls};

    /// Serves each connection to a new loopback listener with `serve`; its address, and
    /// how many connections are open.
    async fn listen<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let counted = open.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let open = counted.clone();
                open.fetch_add(1, Ordering::SeqCst);
                let served = serve(stream);
                tokio::spawn(async move {
                    served.await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (addr, open)
    }

    async fn ok(_: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
    }

    /// An HTTP/1.1 server on loopback answering `ok`, and how many connections it has open.
    async fn upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        listen(|stream| async move {
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(ok))
                .await;
        })
        .await
    }

    /// An HTTP/2-only server over TLS on loopback for `h0.test` .. `h{n-1}.test`, the PEM
    /// file of its CA, and how many connections it has open.
    async fn h2_upstream(n: usize) -> (SocketAddr, Arc<AtomicUsize>, std::path::PathBuf) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let names: Vec<String> = (0..n).map(|i| format!("h{i}.test")).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let ca_file = std::env::temp_dir().join(format!(
            "gateway-pool-h2-{}-{}.pem",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::tunnel::crypto())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let (addr, open) = listen(move |stream| {
            let acceptor = acceptor.clone();
            async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    let _ = server2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service_fn(ok))
                        .await;
                }
            }
        })
        .await;
        (addr, open, ca_file)
    }

    fn empty_get(url: &str) -> Request<RequestBody> {
        Request::get(url)
            .body(
                http_body_util::Empty::new()
                    .map_err(|e: Infallible| match e {})
                    .boxed(),
            )
            .unwrap()
    }

    async fn get(pool: &Pool, url: &str) {
        let body = pool
            .send(empty_get(url), Exchange::Pooled)
            .await
            .unwrap()
            .into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "ok");
    }

    async fn until_open(open: &AtomicUsize, want: usize) {
        for _ in 0..500 {
            if open.load(Ordering::SeqCst) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the upstream has {} connections open, not {want}",
            open.load(Ordering::SeqCst)
        );
    }

    #[tokio::test]
    async fn idle_connections_are_capped_across_hosts_and_swept_when_old() {
        let (addr, open) = upstream().await;
        let pool = Pool::new(
            &client_tls(&[]).unwrap(),
            &Dialer::pinned(addr),
            &Arc::default(),
        );
        let hosts = MAX_KEPT + 20;
        for i in 0..hosts {
            get(&pool, &format!("http://h{i}.test:{}/", addr.port())).await;
        }
        assert_eq!(pool.idle_count(), MAX_KEPT);
        until_open(&open, MAX_KEPT).await;

        // Connections idle for less than IDLE_TIMEOUT stay.
        pool.sweep(Instant::now());
        pool.sweep(Instant::now() + IDLE_TIMEOUT / 2);
        assert_eq!(pool.idle_count(), MAX_KEPT);
        get(&pool, &format!("http://h0.test:{}/", addr.port())).await;
        assert_eq!(pool.idle_count(), MAX_KEPT);
        until_open(&open, MAX_KEPT).await;

        pool.sweep(Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1));
        assert_eq!(pool.idle_count(), 0);
        until_open(&open, 0).await;
        let left = pool.hosts.lock().unwrap().all.len();
        assert_eq!(left, 0, "hosts with nothing pooled are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_never_finishes_its_tls_handshake_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(listener.accept().await.unwrap());
            }
        });
        let pool = Pool::new(
            &client_tls(&[]).unwrap(),
            &Dialer::pinned(addr),
            &Arc::default(),
        );
        let req = empty_get(&format!("https://h0.test:{}/", addr.port()));
        let started = tokio::time::Instant::now();
        let sent = tokio::time::timeout(DIAL_TIMEOUT * 2, pool.send(req, Exchange::Pooled))
            .await
            .expect("the dial never timed out");
        let err = sent.err().expect("no answer, no response");
        assert!(
            matches!(
                crate::tunnel::upstream::dial_error(&err),
                Some(DialError::Timeout { .. })
            ),
            "{err:?}"
        );
        assert_eq!(started.elapsed().as_secs(), DIAL_TIMEOUT.as_secs());
    }

    /// A reload drops the pool while a response still streams: what the pool kept stops
    /// counting at once, and the streaming connection is closed, not kept, when it ends.
    #[tokio::test]
    async fn a_dropped_pool_keeps_nothing() {
        let (addr, open) = upstream().await;
        let kept = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new(&client_tls(&[]).unwrap(), &Dialer::pinned(addr), &kept);
        let url = format!("http://h0.test:{}/", addr.port());
        let streaming = pool.send(empty_get(&url), Exchange::Pooled).await.unwrap();
        // A second connection to the same host, kept once its response ends.
        get(&pool, &url).await;
        assert_eq!(kept.load(Ordering::SeqCst), 1);
        until_open(&open, 2).await;
        drop(pool);
        assert_eq!(kept.load(Ordering::SeqCst), 0);
        until_open(&open, 1).await;
        let body = streaming.into_body().collect().await.unwrap();
        assert_eq!(body.to_bytes(), "ok");
        assert_eq!(kept.load(Ordering::SeqCst), 0);
        until_open(&open, 0).await;
    }

    #[tokio::test]
    async fn http2_connections_count_against_the_same_bound() {
        let hosts = MAX_KEPT + 20;
        let (addr, open, ca) = h2_upstream(hosts).await;
        let tls = client_tls(std::slice::from_ref(&ca)).unwrap();
        std::fs::remove_file(&ca).unwrap();
        let pool = Pool::new(&tls, &Dialer::pinned(addr), &Arc::default());
        for i in 0..hosts {
            get(&pool, &format!("https://h{i}.test:{}/", addr.port())).await;
        }
        assert_eq!(pool.idle_count(), MAX_KEPT);
        until_open(&open, MAX_KEPT).await;
        // Used again, a kept connection serves; past IDLE_TIMEOUT unused, it goes.
        get(&pool, &format!("https://h0.test:{}/", addr.port())).await;
        for _ in 0..=IDLE_TIMEOUT.as_secs() / SWEEP_EVERY.as_secs() {
            pool.sweep(Instant::now());
        }
        assert_eq!(pool.idle_count(), 0);
        until_open(&open, 0).await;
    }
}
