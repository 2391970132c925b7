//! The upstream connections of one rule (or of learn mode) on one worker thread, driven
//! through hyper's connection halves directly: a request costs a lock and a pop, where the
//! legacy client added a checkout future, a pooled wrapper and a task per request to put
//! the connection back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
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
    upstream::{Dialer, PrivateUpstream, RequestBody},
};

/// Idle HTTP/1.1 connections kept per host; more are closed when their response ends.
const MAX_IDLE_PER_HOST: usize = 256;
/// An idle connection older than this is closed rather than reused (the legacy default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

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

pub struct Pool {
    /// HTTP/1.1 or HTTP/2 as the upstream offers by ALPN.
    connector: HttpsConnector<Dialer>,
    /// HTTP/1.1 only: upgrades (WebSocket) do not exist on an HTTP/2 connection.
    upgrade: HttpsConnector<Dialer>,
    hosts: Mutex<Hosts>,
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
}

#[derive(Default)]
struct Conns {
    /// Shared by every request while it stays open.
    h2: Option<H2Conn>,
    /// Most recently used last: the warmest connection is reused first, the coldest age out.
    idle: Vec<Idle>,
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
    pub fn new(tls: &ClientConfig, dialer: &Dialer) -> Self {
        let builder = || {
            HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
        };
        Self {
            connector: builder().enable_http2().wrap_connector(dialer.clone()),
            upgrade: builder().wrap_connector(dialer.clone()),
            hosts: Mutex::default(),
        }
    }

    /// Sends `req` (absolute URI) on a pooled connection or a new one. An upgrade gets a
    /// connection of its own, never pooled: after a 101 it belongs to the upgrade.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let uri = req.uri().clone();
        if upgrade {
            let conn = dial(&self.upgrade, &uri, true).await?;
            return conn
                .send(req, host_header(&uri), None)
                .await
                .map_err(|f| UpstreamError::Http(f.error));
        }
        let host = self.host(&uri);
        let (conn, reused) = match host.checkout().await {
            Some(conn) => (conn, true),
            None => (host.dial(&self.connector, &uri).await?, false),
        };
        let failed = match conn.send(req, host.header.clone(), Some(&host)).await {
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
                conn.send(req, host.header.clone(), Some(&host))
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
                })
            })
            .clone();
        hosts.last = Some((scheme.clone(), authority.clone(), host.clone()));
        host
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
                        return Some(Conn::H2(h2.clone()));
                    }
                    conns.h2 = None;
                }
                let idle = conns.idle.pop()?;
                if idle.since.elapsed() > IDLE_TIMEOUT {
                    // Everything below it has been idle longer still.
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
        if conn.sender.is_closed() {
            return;
        }
        let mut conns = self.conns();
        if conns.idle.len() < MAX_IDLE_PER_HOST {
            conns.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn dial(
        &self,
        connector: &HttpsConnector<Dialer>,
        uri: &Uri,
    ) -> Result<Conn, UpstreamError> {
        let conn = dial(connector, uri, false).await?;
        if let Conn::H2(h2) = &conn {
            self.conns().h2 = Some(h2.clone());
        }
        Ok(conn)
    }
}

/// A new connection, its driver spawned on this worker's runtime.
async fn dial(
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
    /// its response body has been read to the end.
    async fn send(
        self,
        mut req: Request<RequestBody>,
        host_header: Option<HeaderValue>,
        pool: Option<&Arc<Host>>,
    ) -> Result<Response<UpstreamBody>, Failed> {
        match self {
            Conn::H2(mut conn) => {
                let resp = conn.sender.try_send_request(req).await?;
                Ok(mark(resp, conn.private).map(|b| UpstreamBody::new(b, None)))
            }
            Conn::H1(mut conn) => {
                origin_form(&mut req, host_header);
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
