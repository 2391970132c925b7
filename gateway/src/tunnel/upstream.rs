//! Upstream connections: one pooled client per rule, dialing exactly the address that was
//! checked (one lookup, then the private-range check, then that address), TLS by rustls with
//! the system roots plus `[tls] upstream_ca`, HTTP/2 when the upstream offers it.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use tokio::net::TcpStream;

use super::{private::is_private, rules::Rules};
use crate::policy::HttpRule;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A request body on its way upstream: the client's, possibly behind a size limit.
pub type RequestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub type UpstreamClient = Client<HttpsConnector<Dialer>, RequestBody>;

/// The clients of every rule, by rule index, each made on the rule's first request: a
/// policy of thousands of rules costs nothing until they are used, at start and on reload.
pub struct Upstreams {
    tls: ClientConfig,
    dialers: Vec<Dialer>,
    clients: Vec<OnceLock<RuleClients>>,
}

struct RuleClients {
    normal: UpstreamClient,
    /// HTTP/1.1 only: upgrades (WebSocket) do not exist on an HTTP/2 connection.
    upgrade: UpstreamClient,
}

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
    /// Clients for every rule, sharing `tls` (see [`client_tls`]).
    pub fn new(rules: &Rules, tls: &ClientConfig) -> Self {
        let dialers: Vec<Dialer> = rules.iter().map(|r| Dialer::for_rule(&r.spec)).collect();
        Self {
            tls: tls.clone(),
            clients: dialers.iter().map(|_| OnceLock::new()).collect(),
            dialers,
        }
    }

    pub fn client(&self, rule: usize, upgrade: bool) -> UpstreamClient {
        let clients = self.clients[rule].get_or_init(|| {
            let dialer = self.dialers[rule].clone();
            let both = HttpsConnectorBuilder::new()
                .with_tls_config(self.tls.clone())
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(dialer.clone());
            let h1 = HttpsConnectorBuilder::new()
                .with_tls_config(self.tls.clone())
                .https_or_http()
                .enable_http1()
                .wrap_connector(dialer);
            RuleClients {
                normal: Client::builder(TokioExecutor::new()).build(both),
                upgrade: Client::builder(TokioExecutor::new()).build(h1),
            }
        });
        if upgrade {
            clients.upgrade.clone()
        } else {
            clients.normal.clone()
        }
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
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading [tls] upstream_ca {}", path.display()))?
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
    private: bool,
}

impl Dialer {
    fn for_rule(rule: &HttpRule) -> Self {
        Self {
            connect: rule.connect,
            private: rule.private,
        }
    }

    async fn dial(self, uri: Uri) -> Result<TokioIo<TcpStream>, DialError> {
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
                let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|source| DialError::Resolve {
                        host: host.clone(),
                        source,
                    })?
                    .collect();
                if found.is_empty() {
                    return Err(DialError::NoAddress { host });
                }
                if !self.private {
                    // One private answer means the name is not what the rule meant.
                    if let Some(addr) = found.iter().find(|a| is_private(a.ip())) {
                        return Err(DialError::Private { host, addr: *addr });
                    }
                }
                found
            }
        };
        let mut last = None;
        for addr in candidates {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(source)) => last = Some(DialError::Connect { addr, source }),
                Err(_) => last = Some(DialError::Timeout { host: host.clone() }),
            }
        }
        Err(last.unwrap_or(DialError::NoAddress { host }))
    }
}

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().dial(uri))
    }
}

/// The dial error somewhere in a client error's chain, if that is what failed.
pub fn dial_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a DialError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<DialError>() {
            return Some(d);
        }
        cur = e.source();
    }
    None
}

/// Shared for splices (passthrough), which dial without HTTP.
pub async fn dial_raw(rule: &HttpRule, host: &str, port: u16) -> Result<TcpStream, DialError> {
    let uri: Uri = format!("https://{}:{port}/", bracket(host))
        .parse()
        .map_err(|_| DialError::NoHost)?;
    Dialer::for_rule(rule)
        .dial(uri)
        .await
        .map(TokioIo::into_inner)
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}
