//! One request: validate, decide, attach the credential, forward, stream the answer back.

use std::{net::SocketAddr, sync::Arc};

use http_body_util::BodyExt as _;
use hyper::{
    Method, Request, Response, StatusCode, Uri, Version, body::Incoming, header,
    header::HeaderValue,
};

use super::{
    Body, Secrets, Snapshot, Tunnel,
    authority::Authority,
    body_scan, coded_scan, form_override, headers, late_cut, local_response, path_forms,
    pool::{self, UpstreamError},
    private::is_private,
    response_scan,
    rules::Rule,
    upstream::{self, PrivateUpstream},
    websocket,
};
use crate::audit::{ProxyFields, Verdict};

/// What a refusal says: status, audit reason.
struct Refusal(StatusCode, &'static str);

/// The audit reason when no rule allows a request.
const NOT_ALLOWLISTED: &str = "not-allowlisted";
/// A request the tunnel would read, toward a host a passthrough rule splices.
const PASSTHROUGH_ONLY: &str = "passthrough-only";
/// A plain HTTP request under a rule whose credential goes over HTTPS only: it would cross
/// the network unencrypted.
pub const CREDENTIAL_OVER_PLAIN_HTTP: &str = "credential-over-plain-http";
/// The upstream answered a WebSocket handshake with a 101 whose Sec-WebSocket-Accept is wrong.
const BAD_WEBSOCKET_ACCEPT: &str = "bad-websocket-accept";

/// Where a request that passed every check goes.
#[derive(Clone, Copy)]
enum Route<'a> {
    /// The first matching rule: its upstream pool and its credential.
    Rule(&'a Rule),
    /// Learn mode and no rule matched: no credential, recorded `would-deny`.
    Learn,
}

impl<'a> Route<'a> {
    fn credential(self) -> Option<&'a str> {
        match self {
            Route::Rule(rule) => rule.spec.credential.as_deref(),
            Route::Learn => None,
        }
    }

    /// The record of a request this route forwarded and the upstream answered.
    fn verdict<B>(self, resp: &Response<B>) -> (Verdict, &'static str) {
        match self {
            Route::Learn if resp.extensions().get::<PrivateUpstream>().is_some() => {
                (Verdict::WouldDeny, "private-address")
            }
            route => route.let_through(),
        }
    }

    /// The record of a request this route let through, before any answer.
    fn let_through(self) -> (Verdict, &'static str) {
        match self {
            Route::Rule(_) => (Verdict::Allow, "allowlisted"),
            Route::Learn => (Verdict::WouldDeny, NOT_ALLOWLISTED),
        }
    }
}

/// The record of a request let through, while it waits for the upstream's answer. hyper
/// drops a request's future when its client goes away (or closes its sending side) before
/// the answer, and the request may have left already: dropped unanswered, this writes the
/// record anyway, with no status, since none was relayed.
struct Unanswered<'a> {
    tunnel: &'a Tunnel,
    client: SocketAddr,
    record: Option<(Verdict, &'static str, ProxyFields)>,
}

impl Unanswered<'_> {
    /// The upstream answered (or failed): the caller records that instead.
    fn answered(mut self) -> ProxyFields {
        self.record
            .take()
            .map(|(_, _, fields)| fields)
            .unwrap_or_default()
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some((verdict, reason, fields)) = self.record.take() {
            self.tunnel.record(verdict, reason, self.client, fields);
        }
    }
}

impl Tunnel {
    pub(super) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
        inner: Option<Authority>,
    ) -> Response<Body> {
        if self.audit.has_failed() {
            // Whatever the tunnel let through now would go unrecorded: it lets nothing
            // through. The writer logged its failure; this refusal cannot be recorded.
            return local_response(StatusCode::SERVICE_UNAVAILABLE, "audit-log-failed");
        }
        if req.method() == Method::CONNECT && inner.is_none() {
            return self.connect(req, client);
        }
        let mut fields = ProxyFields {
            method: Some(req.method().as_str().to_owned()),
            path: req.uri().path_and_query().map(|p| p.as_str().to_owned()),
            // Inside a session the CONNECT target is known even when the request's own
            // Host is refused.
            host: inner.as_ref().map(|a| a.host.clone()),
            port: inner.as_ref().map(|a| a.port),
            ..Default::default()
        };
        let (scheme, target) = match target_of(&req, inner.as_ref()) {
            Ok(t) => t,
            Err(Refusal(status, reason)) => return self.refuse(status, reason, client, fields),
        };
        fields.host = Some(target.host.clone());
        fields.port = Some(target.port);
        if let Some(reason) = headers::ambiguity(req.headers())
            .or_else(|| headers::refused_header(req.method(), req.headers()))
            .or_else(|| headers::override_parameter(req.method(), req.uri().query()))
            .or_else(|| headers::path_ambiguity(req.uri().path()))
        {
            return self.refuse(StatusCode::BAD_REQUEST, reason, client, fields);
        }
        if req.method() == Method::TRACE {
            return self.refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "trace-refused",
                client,
                fields,
            );
        }
        if req.method() == Method::CONNECT {
            // Inside a session (the only place left for one): a CONNECT forwarded upstream
            // has no defined body, and an upstream that leaves the bytes unread would take
            // them for the next request on the pooled connection, credential attached.
            return self.refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "connect-in-session",
                client,
                fields,
            );
        }
        // Each request decides with the policy in force when it arrives, and keeps that one
        // snapshot to the end, whatever a reload puts in force meanwhile.
        let snapshot = self.policy.current();
        // A passthrough rule's host is spliced, never read: a CONNECT to it is decided by
        // its first rule alone, so a request the tunnel would read (absolute-form on the
        // proxy port, or one inside a session reaching such a rule) is refused rather than
        // decided by the methods, paths and credential of whichever rule it matches.
        let decided = snapshot
            .rules
            .decide(req.method(), &target, req.uri().path());
        if decided.is_some_and(|r| r.spec.passthrough)
            || (inner.is_none() && snapshot.rules.spliced(&target))
        {
            return self.refuse(StatusCode::FORBIDDEN, PASSTHROUGH_ONLY, client, fields);
        }
        let route = match decided {
            Some(rule) => {
                fields.rule = Some(rule.index);
                fields.credential = rule.spec.credential.clone();
                if scheme == "http" && rule.spec.credential_needs_tls() {
                    return self.refuse(
                        StatusCode::FORBIDDEN,
                        CREDENTIAL_OVER_PLAIN_HTTP,
                        client,
                        fields,
                    );
                }
                Route::Rule(rule)
            }
            None if self.learn => Route::Learn,
            None => return self.refuse(StatusCode::FORBIDDEN, NOT_ALLOWLISTED, client, fields),
        };
        self.forward(req, scheme, &target, &snapshot, route, client, fields)
            .await
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one request's parts, each borrowed from a different owner"
    )]
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        scheme: &'static str,
        target: &Authority,
        snapshot: &Snapshot,
        route: Route<'_>,
        client: SocketAddr,
        fields: ProxyFields,
    ) -> Response<Body> {
        let ws = websocket::is_request(req.headers());
        if ws && !http_body::Body::is_end_stream(req.body()) {
            // A handshake has no body (RFC 6455, 4.1), and an upgrade's connection is never
            // closed after the exchange: the body could be a second request no rule checked.
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "websocket-with-body",
                client,
                fields,
            );
        }
        // The pipe outlives this connection: it holds a connection permit of its own.
        let ws_permit = match ws.then(|| self.session_permit()) {
            Some(None) => {
                return self.refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too-many-connections",
                    client,
                    fields,
                );
            }
            permit => permit.flatten(),
        };
        let client_upgrade = ws.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Before the tunnel adds its own headers: a `Connection` naming them must not take
        // the credential or `Accept-Encoding: identity` off again.
        headers::strip_hop_by_hop(&mut parts.headers, ws);
        headers::strip_forwarding(&mut parts.headers);
        if let Err(Refusal(status, reason)) =
            credentials(&snapshot.secrets, &mut parts, target, route.credential())
        {
            return self.refuse(status, reason, client, fields);
        }
        parts.uri = match upstream_uri(&parts.uri, scheme, target) {
            Some(u) => u,
            None => return self.refuse(StatusCode::BAD_REQUEST, "bad-uri", client, fields),
        };
        parts.version = Version::HTTP_11;
        // An upstream may hand a secret back to any request, through whichever rule or
        // name reaches it (a stored-request inspector, a log page), whichever sandbox made
        // it, and after a reload took the secret out of the policy. So every answer (and
        // WebSocket message) is checked for every secret the gateway has held, as the set
        // is when the request leaves; compressed, it could not be, so while there is any
        // secret to look for, no answer may be.
        let echoes = self.echoes.current();
        if echoes.is_some() {
            // The answer is checked for the secret as it streams, which only works on the
            // bytes as the client will read them: no compression.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        // The Host upstream is generated from the checked authority, never copied.
        parts.headers.remove(header::HOST);
        // The tunnel answered `100 Continue` itself and sends the body at once: an upstream
        // that answered the expectation with a final status would take that body for the
        // next request on the connection, one no rule checked.
        parts.headers.remove(header::EXPECT);
        let request_headers = ws.then(|| parts.headers.clone());
        // Placeholders of credentials this host's rule does not name must not leave in the
        // body or a WebSocket's messages either; headers and URL were checked above.
        // (A bodiless request, most of them, has nothing to scan.)
        let unlisted = || -> Vec<String> {
            snapshot
                .secrets
                .iter()
                .filter(|s| route.credential() != Some(s.name.as_str()))
                .filter_map(|s| Some(s.placeholder.as_ref()?.value.clone()))
                .collect()
        };
        let ws_unlisted = if ws { unlisted() } else { Vec::new() };
        if !ws_unlisted.is_empty() || (ws && echoes.is_some()) {
            // Compressed messages could not be read for placeholders or the secret: none
            // are negotiated.
            parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
        }
        let bodiless = http_body::Body::is_end_stream(&body);
        let unlisted = if bodiless { Vec::new() } else { unlisted() };
        let exchange = if ws {
            pool::Exchange::Upgrade
        } else if !bodiless && ignores_bodies(&parts.method) {
            // An upstream that ignores such a body would read it as the next request on the
            // connection, one no rule checked: nothing may follow it there.
            pool::Exchange::Last
        } else {
            pool::Exchange::Pooled
        };
        let form = if bodiless {
            None
        } else {
            form_override::Form::of(&parts.method, &parts.headers)
        };
        if form
            .as_ref()
            .is_some_and(|f| f.compressed_form(&parts.headers))
        {
            // Compressed, the form could not be read for a method override.
            return self.refuse(
                StatusCode::BAD_REQUEST,
                "encoded-request-body",
                client,
                fields,
            );
        }
        let scanned = !unlisted.is_empty() || form.is_some();
        let body: upstream::RequestBody = if bodiless {
            body.map_err(Into::into).boxed()
        } else if unlisted.is_empty() {
            // Trailers would reach an HTTP/2 upstream (hyper drops them toward HTTP/1.1)
            // past every header check: none go.
            body.map_frame(without_trailers).map_err(Into::into).boxed()
        } else {
            body_scan::Scanned::new(body, unlisted).boxed()
        };
        let body = match form {
            Some(form) => form_override::Scanned::new(body, form).boxed(),
            None => body,
        };
        let body: upstream::RequestBody = match snapshot.max_request_body {
            None => body,
            Some(limit) => {
                let declared = parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                if declared.is_some_and(|n| n > limit) {
                    return self.refuse(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request-body-too-large",
                        client,
                        fields,
                    );
                }
                // A chunked body is cut off, and the upstream request aborted, at the limit.
                http_body_util::Limited::new(body, limit as usize).boxed()
            }
        };
        // A body the tunnel may cut: if that happens after the answer, nothing else records it.
        let (body, watch) = if scanned || snapshot.max_request_body.is_some() {
            let watch = late_cut::Watch::new(self.deny_later(client, fields.clone()));
            let body = late_cut::Watched::new(body, watch.clone()).boxed();
            (body, Some(watch))
        } else {
            (body, None)
        };
        let rule = match route {
            Route::Rule(rule) => Some(rule.index),
            Route::Learn => None,
        };
        let (verdict, reason) = route.let_through();
        let unanswered = Unanswered {
            tunnel: self,
            client,
            record: Some((verdict, reason, fields)),
        };
        let sent = self
            .pools
            .pool(snapshot, rule)
            .send(Request::from_parts(parts, body), exchange)
            .await;
        let mut fields = unanswered.answered();
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return match watch.as_ref().and_then(|w| w.failed()) {
                    Some(reason) => self.refuse_after_leaving(
                        route.let_through(),
                        late_cut::status(reason),
                        reason,
                        client,
                        fields,
                    ),
                    None => self.upstream_failed(&e, route, target, client, fields),
                };
            }
        };
        let coding = match echoes.as_ref().map(|e| response_scan::read_head(e, &resp)) {
            Some(Err(refused)) => {
                fields.status = Some(resp.status().as_u16());
                return self.refuse_after_leaving(
                    route.verdict(&resp),
                    StatusCode::BAD_GATEWAY,
                    refused,
                    client,
                    fields,
                );
            }
            Some(Ok(coding)) => coding,
            None => None,
        };
        // After the answer's record, whatever way it goes: a cut then comes after it.
        let _answered = late_cut::AnsweredOnDrop(watch);
        if let (Some(client_upgrade), Some(sent_headers), Some(permit)) =
            (client_upgrade, request_headers, ws_permit)
            && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            if !websocket::accepted(&sent_headers, &resp) {
                // The handshake left, credential attached, as for any upstream failure.
                let (verdict, reason) = match route {
                    Route::Rule(_) => (Verdict::Allow, BAD_WEBSOCKET_ACCEPT),
                    Route::Learn => route.verdict(&resp),
                };
                fields.status = Some(StatusCode::BAD_GATEWAY.as_u16());
                self.record(verdict, reason, client, fields);
                return local_response(StatusCode::BAD_GATEWAY, BAD_WEBSOCKET_ACCEPT);
            }
            let (verdict, reason) = route.verdict(&resp);
            let up = (!ws_unlisted.is_empty()).then(|| websocket::FrameScan::new(ws_unlisted));
            let down = echoes.map(websocket::EchoScan::new);
            // A WebSocket with nothing to look for stays a blind pipe.
            let scans = (up.is_some() || down.is_some()).then(|| websocket::Scans {
                up,
                down,
                refused: self.ws_refusal(client, fields.clone()),
            });
            fields.status = Some(101);
            self.record(verdict, reason, client, fields);
            if self.audit.has_failed() {
                // The log failed while the handshake went: the pipe would go unrecorded.
                return local_response(StatusCode::SERVICE_UNAVAILABLE, "audit-log-failed");
            }
            websocket::pipe(client_upgrade, hyper::upgrade::on(&mut resp), scans, permit);
            let (parts, _) = resp.into_parts();
            return Response::from_parts(
                parts,
                http_body_util::Empty::<bytes::Bytes>::new()
                    .map_err(|n| match n {})
                    .boxed(),
            );
        }
        let (verdict, reason) = route.verdict(&resp);
        let (mut parts, body) = resp.into_parts();
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            // hyper read the body by its chunks (RFC 9112, 6.3); a Content-Length beside
            // them would give the client another length than the body it gets.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        headers::strip_hop_by_hop(&mut parts.headers, false);
        fields.status = Some(parts.status.as_u16());
        let fields = super::prepared(fields, client);
        let mut fields = super::write_record(&self.audit, &self.sandbox, verdict, reason, fields);
        let body = match echoes {
            Some(echoes) => {
                // A cut has no status of its own: the client saw the answer's.
                fields.status = None;
                let cut = self.deny_later_prepared(fields);
                match coding {
                    None => response_scan::Scanned::new(body, echoes, cut).boxed(),
                    Some(coding) => coded_scan::Scanned::new(body, coding, echoes, cut).boxed(),
                }
            }
            None => body.map_err(Into::into).boxed(),
        };
        Response::from_parts(parts, body)
    }

    /// The answer and the record when the upstream could not be reached or failed. A
    /// request the policy let through stays `allow` (for learn mode, `would-deny`): it may
    /// have left, credential attached, before the upstream failed; the reason and status
    /// say how it ended. Only what the tunnel itself stopped is `deny`.
    fn upstream_failed(
        &self,
        e: &UpstreamError,
        route: Route<'_>,
        target: &Authority,
        client: SocketAddr,
        mut fields: ProxyFields,
    ) -> Response<Body> {
        let dialed = upstream::dial_error(e);
        let (status, reason) = match dialed {
            Some(upstream::DialError::Private { .. }) => (StatusCode::FORBIDDEN, "private-address"),
            Some(upstream::DialError::Timeout { .. }) => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream-timeout")
            }
            _ => (StatusCode::BAD_GATEWAY, "upstream-error"),
        };
        tracing::info!(host = %target, "upstream: {}", error_chain(e));
        if matches!(dialed, Some(upstream::DialError::Private { .. })) {
            return self.refuse(status, reason, client, fields);
        }
        fields.status = Some(status.as_u16());
        match route {
            Route::Rule(_) => self.record(Verdict::Allow, reason, client, fields),
            // The author still learns that the agent wanted it.
            Route::Learn => {
                let would = match dialed {
                    Some(upstream::DialError::Connect { addr, .. }) if is_private(addr.ip()) => {
                        "private-address"
                    }
                    _ => NOT_ALLOWLISTED,
                };
                self.record(Verdict::WouldDeny, would, client, fields);
            }
        }
        local_response(status, reason)
    }

    /// What records a refusal that comes after the request's own record, with no status:
    /// a body cut after the answer (see [`late_cut`]), a WebSocket cut after its upgrade.
    fn deny_later(&self, client: SocketAddr, fields: ProxyFields) -> late_cut::Record {
        self.deny_later_prepared(super::prepared(fields, client))
    }

    /// [`Self::deny_later`] for fields a record has already carried.
    fn deny_later_prepared(&self, fields: ProxyFields) -> late_cut::Record {
        let shared = self.shared.clone();
        Box::new(move |reason| {
            super::write_record(
                &shared.audit,
                &shared.sandbox,
                Verdict::Deny,
                reason,
                fields,
            );
        })
    }

    /// What records a WebSocket cut after its upgrade: a refusal with no status of its own
    /// (the client saw the 101; then its connection closed).
    fn ws_refusal(&self, client: SocketAddr, fields: ProxyFields) -> websocket::Refused {
        let record = self.deny_later(client, fields);
        Box::new(move |cut| {
            record(match cut {
                websocket::Cut::Placeholder => "placeholder-to-unlisted-host",
                websocket::Cut::Secret => response_scan::SECRET_IN_RESPONSE,
                websocket::Cut::Extension => "websocket-extension",
                websocket::Cut::NotAFrame => "websocket-not-a-frame",
                websocket::Cut::HeldTooLong => "websocket-held-too-long",
            })
        })
    }

    /// The answer and records when the tunnel stops a request after it left (its head, with
    /// the credential attached, and maybe part of its body) or refuses the upstream's answer
    /// to it: the request's own record, `verdict` with the status `fields` hold (the
    /// upstream's, or none), then the refusal.
    fn refuse_after_leaving(
        &self,
        (verdict, reason): (Verdict, &'static str),
        status: StatusCode,
        refused: &'static str,
        client: SocketAddr,
        fields: ProxyFields,
    ) -> Response<Body> {
        let fields = super::prepared(fields, client);
        let mut fields = super::write_record(&self.audit, &self.sandbox, verdict, reason, fields);
        fields.status = Some(status.as_u16());
        super::write_record(&self.audit, &self.sandbox, Verdict::Deny, refused, fields);
        local_response(status, refused)
    }

    pub(super) fn refuse(
        &self,
        status: StatusCode,
        reason: &'static str,
        client: SocketAddr,
        mut fields: ProxyFields,
    ) -> Response<Body> {
        fields.status = Some(status.as_u16());
        self.record(Verdict::Deny, reason, client, fields);
        local_response(status, reason)
    }
}

/// A request body's trailers, as an empty chunk.
fn without_trailers(frame: hyper::body::Frame<bytes::Bytes>) -> hyper::body::Frame<bytes::Bytes> {
    if frame.is_trailers() {
        hyper::body::Frame::data(bytes::Bytes::new())
    } else {
        frame
    }
}

/// Checks where placeholders are and sets the named credential; the agent's own value for
/// that header is dropped, a placeholder in it included. A placeholder anywhere else is
/// refused: in the URL, toward a host whose rule does not name its credential, and in any
/// other header even toward its own host, where it is never swapped for the secret (an
/// upstream that echoes headers back would hand the sandbox the secret).
fn credentials(
    secrets: &Secrets,
    parts: &mut hyper::http::request::Parts,
    target: &Authority,
    named: Option<&str>,
) -> Result<(), Refusal> {
    let named = match named {
        Some(name) => Some(secrets.get(name).ok_or(Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unknown-credential",
        ))?),
        None => None,
    };
    // The host goes upstream as the tunnel spells it (in DNS, SNI and Host, whatever the
    // request said), and inside a session the URI holds no host at all; the method is
    // nowhere else.
    let in_target = secrets
        .placeholder_in(&target.host)
        .or_else(|| secrets.placeholder_in(parts.method.as_str()));
    if let Some(secret) = in_target {
        let listed = named.is_some_and(|n| n.name == secret.name);
        return Err(Refusal(StatusCode::FORBIDDEN, placeholder_in_url(listed)));
    }
    let mut uri = None;
    for secret in secrets.iter() {
        let Some(p) = &secret.placeholder else {
            continue;
        };
        let listed = named.is_some_and(|n| n.name == secret.name);
        if carries(
            uri.get_or_insert_with(|| parts.uri.to_string()).as_bytes(),
            &p.value,
        ) {
            return Err(Refusal(StatusCode::FORBIDDEN, placeholder_in_url(listed)));
        }
        for (name, value) in &parts.headers {
            // Header names are lowercase; the placeholder may not be.
            let in_name = name
                .as_str()
                .as_bytes()
                .windows(p.value.len())
                .any(|w| w.eq_ignore_ascii_case(p.value.as_bytes()));
            if !in_name && !carries(value.as_bytes(), &p.value) {
                continue;
            }
            if !listed {
                return Err(Refusal(
                    StatusCode::FORBIDDEN,
                    "placeholder-to-unlisted-host",
                ));
            }
            if *name != secret.header {
                return Err(Refusal(
                    StatusCode::FORBIDDEN,
                    "placeholder-in-other-header",
                ));
            }
        }
    }
    if let Some(secret) = named {
        parts.headers.remove(&secret.header);
        parts
            .headers
            .insert(secret.header.clone(), secret.header_value());
    }
    Ok(())
}

/// The reason for a placeholder in a request's target: toward a host whose rule names its
/// credential it is merely misplaced, anywhere else it would leave.
pub(super) fn placeholder_in_url(listed: bool) -> &'static str {
    if listed {
        "placeholder-in-url"
    } else {
        "placeholder-to-unlisted-host"
    }
}

/// Whether a URI or header value carries `needle` in any case, as sent or percent-decoded
/// up to three times (the path checks assume servers that decode twice or more): a
/// placeholder must not get past the check by being spelt differently.
fn carries(text: &[u8], needle: &str) -> bool {
    let found = |bytes: &[u8]| {
        bytes
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
    };
    found(text) || path_forms::in_decodings(text, 3, found).unwrap_or(false)
}

/// The scheme and authority a request goes to. On the proxy port only absolute-form is
/// accepted and its authority decides; inside an intercepted CONNECT the CONNECT target
/// decides and Host (or an absolute URI) must agree with it.
fn target_of(
    req: &Request<Incoming>,
    inner: Option<&Authority>,
) -> Result<(&'static str, Authority), Refusal> {
    let uri = req.uri();
    let from_uri = match (uri.scheme_str(), uri.authority()) {
        (Some(s), Some(a)) => {
            let (scheme, port) = match s {
                "http" => ("http", 80),
                "https" => ("https", 443),
                _ => return Err(Refusal(StatusCode::BAD_REQUEST, "unsupported-scheme")),
            };
            if super::authority::has_byte(a.as_str(), b'@') {
                return Err(Refusal(StatusCode::BAD_REQUEST, "userinfo-in-uri"));
            }
            let authority = Authority::parse(a.as_str(), port)
                .ok_or(Refusal(StatusCode::BAD_REQUEST, "bad-host"))?;
            // A rule for port 443 (the default) means HTTPS: plain HTTP to it would carry
            // the credential across the network in the clear.
            if scheme == "http" && authority.port == 443 {
                return Err(Refusal(StatusCode::BAD_REQUEST, "http-to-port-443"));
            }
            Some((scheme, authority))
        }
        (None, None) => None,
        _ => return Err(Refusal(StatusCode::BAD_REQUEST, "bad-uri")),
    };
    match inner {
        None => from_uri.ok_or(Refusal(StatusCode::BAD_REQUEST, "not-absolute-form")),
        Some(connect) => {
            if from_uri.as_ref().is_some_and(|(_, a)| a != connect) {
                return Err(Refusal(StatusCode::BAD_REQUEST, "host-mismatch"));
            }
            if let Some(host) = req.headers().get(header::HOST) {
                let same = host
                    .to_str()
                    .ok()
                    .and_then(|h| Authority::parse(h, connect.port))
                    .is_some_and(|h| h == *connect);
                if !same {
                    return Err(Refusal(StatusCode::BAD_REQUEST, "host-mismatch"));
                }
            }
            Ok(("https", connect.clone()))
        }
    }
}

/// The URI sent upstream: the checked authority, never the client's spelling of it, and the
/// client's path and query as already parsed.
/// Methods whose request body has no defined meaning (RFC 9110, 9.3), which servers are
/// known to leave unread.
fn ignores_bodies(method: &Method) -> bool {
    [Method::GET, Method::HEAD, Method::DELETE, Method::OPTIONS].contains(method)
}

fn upstream_uri(uri: &Uri, scheme: &'static str, target: &Authority) -> Option<Uri> {
    let mut parts = hyper::http::uri::Parts::default();
    parts.scheme = Some(if scheme == "https" {
        hyper::http::uri::Scheme::HTTPS
    } else {
        hyper::http::uri::Scheme::HTTP
    });
    parts.authority = Some(match uri.authority() {
        Some(a) if target.is_written_as(a.as_str()) => a.clone(),
        _ => target.to_string().parse().ok()?,
    });
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).ok()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_is_found_in_a_header_whatever_its_spelling() {
        let p = "gateway-placeholder-api-0a1b";
        for (value, found) in [
            ("Bearer gateway-placeholder-api-0a1b", true),
            ("k=GATEWAY-PLACEHOLDER-API-0A1B", true),
            ("k=%67ateway-placeholder-api-0a1b", true),
            ("k=%2567ateway-placeholder-api-0a1b", true),
            ("k=%252567ateway-placeholder-api-0a1b", true),
            ("k=gateway-placeholder-api-0a1", false),
            ("k=%zz", false),
        ] {
            assert_eq!(carries(value.as_bytes(), p), found, "{value}");
        }
    }
}
