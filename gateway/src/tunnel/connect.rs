//! CONNECT: the target must have a rule; its TLS ClientHello must name the same host. Then the
//! session is intercepted with a leaf from the local CA (rules apply per request inside), or
//! spliced when the rule says `passthrough = true`. In learn mode a target without a rule is
//! intercepted too, so the method and path of every request inside are seen and recorded.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::BodyExt as _;
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::{
    Body, Tunnel,
    authority::{Authority, canonical_host},
    guard::Prefixed,
    hello_gate, upstream,
};
use crate::{
    audit::{ProxyFields, Verdict},
    policy::HttpRule,
};

/// A ClientHello larger than this is not a ClientHello.
const MAX_HELLO: usize = 64 * 1024;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

impl Tunnel {
    pub(super) fn connect(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<Body> {
        let mut fields = ProxyFields {
            method: Some("CONNECT".into()),
            ..Default::default()
        };
        let Some(target) = req
            .uri()
            .authority()
            .and_then(|a| Authority::parse(a.as_str(), 443))
            .filter(|_| {
                req.uri().scheme().is_none()
                    && req
                        .uri()
                        .path_and_query()
                        .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
            })
        else {
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "bad-connect-target",
                client,
                fields,
            );
        };
        fields.host = Some(target.host.clone());
        fields.port = Some(target.port);
        let snapshot = self.policy.current();
        // A splice is decided here, once; requests inside an intercepted session are each
        // decided on their own, with the policy in force when they arrive.
        let rule = snapshot.rules.for_authority(&target);
        // The name would leave as it is: in DNS, in the SNI of a splice, in the Host of
        // every request inside.
        if let Some(secret) = snapshot.secrets.placeholder_in(&target.host) {
            let listed = rule.is_some_and(|r| r.spec.credential.as_ref() == Some(&secret.name));
            return self.refuse(
                StatusCode::FORBIDDEN,
                super::proxy::placeholder_in_url(listed),
                client,
                fields,
            );
        }
        let splice = match rule {
            Some(rule) => rule
                .spec
                .passthrough
                .then(|| (rule.index, rule.spec.clone())),
            None if self.learn => None,
            None => return self.refuse(StatusCode::FORBIDDEN, "not-allowlisted", client, fields),
        };
        let Some(permit) = self.session_permit() else {
            return self.refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-connections",
                client,
                fields,
            );
        };
        let on_upgrade = hyper::upgrade::on(req);
        let tunnel = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = match on_upgrade.await {
                Ok(up) => TokioIo::new(up),
                Err(e) => {
                    tracing::debug!("CONNECT upgrade: {e}");
                    return;
                }
            };
            tunnel.tls_session(io, target, splice, client, fields).await;
        });
        Response::new(
            http_body_util::Empty::<bytes::Bytes>::new()
                .map_err(|n| match n {})
                .boxed(),
        )
    }

    /// `splice`: the passthrough rule (index and spec) to splice to; else the session is
    /// intercepted.
    async fn tls_session<S>(
        self: Arc<Self>,
        mut io: S,
        target: Authority,
        splice: Option<(usize, HttpRule)>,
        client: SocketAddr,
        mut fields: ProxyFields,
    ) where
        S: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let hello = tokio::time::timeout(HELLO_TIMEOUT, read_client_hello(&mut io)).await;
        let (hello, sni) =
            match hello.unwrap_or_else(|_| Err(anyhow::anyhow!("no ClientHello in time"))) {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(%client, "CONNECT {target}: {e}");
                    self.record(Verdict::Deny, "not-tls", client, fields);
                    return;
                }
            };
        if !sni_matches(sni.as_deref(), &target) {
            self.record(Verdict::Deny, "sni-mismatch", client, fields);
            return;
        }
        if let Some((rule, spec)) = splice {
            fields.rule = Some(rule);
            // Judged before dialing: a hello refused here opens nothing upstream.
            let judge = |message: &[u8]| hello_gate::judge_splice(message, &target.host);
            let first = hello_gate::first_hello(&hello)
                .ok_or(hello_gate::Refused::NotTls)
                .and_then(|(end, message)| judge(&message).map(|()| end));
            let hello_end = match first {
                Ok(end) => end,
                Err(refused) => {
                    if let Some(reason) = refused.reason() {
                        self.record(Verdict::Deny, reason, client, fields);
                    }
                    return;
                }
            };
            match upstream::dial_raw(&spec, &target.host, target.port, &self.upstream).await {
                Ok(mut up) => {
                    self.record(Verdict::Allow, "passthrough", client, fields.clone());
                    if self.audit.has_failed() {
                        // The log failed since the CONNECT came (its record may not have
                        // been queued): a splice now would go unrecorded.
                        return;
                    }
                    let opened = hello_gate::open(&mut io, &mut up, &hello, hello_end, &judge);
                    match tokio::time::timeout(HELLO_TIMEOUT, opened).await {
                        Ok(Ok(())) => {
                            let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
                        }
                        Ok(Err(refused)) => {
                            if let Some(reason) = refused.reason() {
                                self.record(Verdict::Deny, reason, client, fields);
                            }
                        }
                        // Cut by the tunnel, with the client's later bytes held back: the
                        // record says the session ended there, not after a whole handshake.
                        Err(_) => {
                            self.record(Verdict::Deny, "tls-handshake-timeout", client, fields);
                        }
                    }
                }
                Err(e) => {
                    // As for intercepted requests: refused here is `deny`, a let-through
                    // whose upstream failed stays `allow`.
                    let (verdict, reason) = match e {
                        upstream::DialError::Private { .. } => (Verdict::Deny, "private-address"),
                        _ => (Verdict::Allow, "upstream-error"),
                    };
                    tracing::info!(host = %target, "passthrough: {e}");
                    self.record(verdict, reason, client, fields);
                }
            }
            return;
        }
        // Nothing has gone upstream yet; the records say why the session carried nothing,
        // most often a client that does not trust the gateway's CA.
        let config = match self.ca.server_config(&target.host) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("minting a certificate for {target}: {e:#}");
                self.record(Verdict::Deny, "certificate-error", client, fields);
                return;
            }
        };
        let handshake = tokio_rustls::TlsAcceptor::from(config).accept(Prefixed::new(hello, io));
        let tls = match tokio::time::timeout(HELLO_TIMEOUT, handshake)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("handshake not finished in time")))
        {
            Ok(t) => t,
            Err(e) => {
                tracing::info!(%client, "TLS with the sandbox for {target}: {e}");
                self.record(Verdict::Deny, "client-tls-failed", client, fields);
                return;
            }
        };
        self.serve_http(tls, client, Some(target)).await;
    }
}

/// Whether a ClientHello's SNI names the CONNECT target. Clients send no SNI for an IP
/// address.
fn sni_matches(sni: Option<&str>, target: &Authority) -> bool {
    match sni {
        Some(name) => canonical_host(name).as_deref() == Some(target.host.as_str()),
        None => target.ip().is_some(),
    }
}

/// Reads until a whole ClientHello has arrived; returns the bytes read and the SNI.
async fn read_client_hello<S: AsyncRead + Unpin>(
    io: &mut S,
) -> anyhow::Result<(Vec<u8>, Option<String>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = io.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed before a ClientHello");
        seen.extend_from_slice(&chunk[..n]);
        anyhow::ensure!(seen.len() <= MAX_HELLO, "ClientHello too large");
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                return Ok((seen, sni));
            }
            Ok(None) => continue,
            Err((e, _alert)) => anyhow::bail!("not a TLS ClientHello: {e}"),
        }
    }
}
