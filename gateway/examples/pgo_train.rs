//! The training run of a profile-guided release build (`cargo xtask build --release`): the
//! instrumented gateway runs this program in a sandbox (`gateway run`), and its tunnel
//! carries, to loopback upstreams this program serves outside, the work a deployed tunnel
//! does most, in about the mix it does it:
//! - kept-alive plain-HTTP requests with a credential attached (GETs; POSTs whose bodies
//!   stream up; chunked answers streamed down), the agent's own `Authorization` dropped;
//! - requests the policy refuses (wrong path, wrong method, unlisted host);
//! - HTTPS through CONNECT, intercepted, to an upstream that speaks HTTP/2 and to one that
//!   speaks only HTTP/1.1, with new TLS connections along the way;
//! - HTTPS through CONNECT to a `passthrough` rule, spliced after the SNI check.
//!
//! Every answer is checked, and so is the audit log: a run whose requests did not do what they
//! should fails, rather than teach the compiler an error path.
//!
//! `pgo_train GATEWAY` (as root): serves the upstreams, writes a policy, runs `GATEWAY run`
//! with itself inside as the client (`pgo_train drive ...`), all under a new directory in
//! the temporary directory that is removed at the end; the gateway's CA and audit log stay in
//! there too, never the host's. Loopback only. `PGO_TRAIN_SCALE=N` multiplies the number of
//! requests (default 1: about 95,000).

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::net::{TcpListener, TcpStream};

/// Plain-HTTP clients, each on one kept-alive connection, and requests each.
const PLAIN_CLIENTS: usize = 32;
const PLAIN_REQUESTS: usize = 2_800;
/// HTTPS clients, the TLS connections each opens in turn, and requests on each.
const TLS_CLIENTS: usize = 8;
const TLS_CONNECTIONS: usize = 12;
const TLS_REQUESTS: usize = 60;
const TOKEN: &str = "pgo-training-token";
/// What the tunnel attaches (the credential's default format) and what the agent sends.
const INJECTED: &str = "Bearer pgo-training-token";
const AGENTS_OWN: &str = "Bearer made-up-by-the-agent";
/// The longest a training run of scale 1 may take (about 20 s here); past it, it fails.
const DEADLINE: Duration = Duration::from_secs(300);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scale: usize = match std::env::var("PGO_TRAIN_SCALE") {
        Ok(n) => n.parse().context("PGO_TRAIN_SCALE must be a number")?,
        Err(_) => 1,
    };
    ensure!(scale > 0, "PGO_TRAIN_SCALE must be 1 or more");
    match args.as_slice() {
        [gateway] => train(Path::new(gateway), scale),
        [drive, plain, upstream_ca] if drive == "drive" => {
            drive_requests(plain.parse()?, Path::new(upstream_ca), scale)
        }
        _ => bail!("usage: pgo_train GATEWAY (as root)"),
    }
}

/// The side outside the sandbox: upstreams, policy, and `GATEWAY run` of the client.
fn train(gateway: &Path, scale: usize) -> anyhow::Result<()> {
    let work = Workdir::new()?;
    let upstream_tls = UpstreamTls::new(&work.0)?;
    let token = work.0.join("token");
    std::fs::write(&token, TOKEN)?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    // The client runs as the sandbox's user, who may not be able to reach this program where
    // it was built (a checkout under /root): it runs a copy in the work directory.
    let client = work.0.join("pgo_train");
    std::fs::copy(std::env::current_exe()?, &client)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (plain, h2, h1, spliced) = runtime.block_on(async {
        anyhow::Ok((
            serve(None, INJECTED).await?,
            serve(Some(upstream_tls.server(&[b"h2", b"http/1.1"])), INJECTED).await?,
            serve(Some(upstream_tls.server(&[b"http/1.1"])), INJECTED).await?,
            // A spliced connection carries the agent's own header: the tunnel cannot see it.
            serve(Some(upstream_tls.server(&[b"http/1.1"])), AGENTS_OWN).await?,
        ))
    })?;
    let policy = work.0.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"version = 1
name = "pgo-train"

[[http.allow]]
host = "127.0.0.1"
port = {plain}
methods = ["GET", "POST"]
paths = ["/api/**"]
private = true
plain_http = true
credential = "train"

[[http.allow]]
host = "h2.train"
connect = "127.0.0.1:{h2}"
methods = ["GET", "POST"]
paths = ["/api/**"]
private = true
credential = "train"

[[http.allow]]
host = "pt.train"
connect = "127.0.0.1:{spliced}"
private = true
passthrough = true

[[http.allow]]
host = "h1.train"
connect = "127.0.0.1:{h1}"
methods = ["GET", "POST"]
paths = ["/api/**"]
private = true
credential = "train"

[credentials.train]
file = "{token}"

[tls]
upstream_ca = ["{ca}"]
"#,
            plain = plain.port(),
            h2 = h2.port(),
            h1 = h1.port(),
            spliced = spliced.port(),
            token = token.display(),
            ca = upstream_tls.ca_file.display(),
        ),
    )?;
    let audit = work.0.join("audit.jsonl");
    let mut run = Command::new(gateway)
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--audit-log")
        .arg(&audit)
        .arg("--")
        .arg(&client)
        .arg("drive")
        .arg(plain.port().to_string())
        .arg(&upstream_tls.ca_file)
        .env("GATEWAY_STATE_DIR", work.0.join("state"))
        .env("PGO_TRAIN_SCALE", scale.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", gateway.display()))?;
    let status = wait_at_most(&mut run, DEADLINE * scale as u32 + Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "the training run failed: gateway run exited with {status}"
    );
    let mut said = String::new();
    run.stdout
        .take()
        .context("gateway run's output")?
        .read_to_string(&mut said)?;
    let (allowed, refused) = said
        .trim()
        .split_once(' ')
        .and_then(|(a, r)| Some((a.parse::<usize>().ok()?, r.parse::<usize>().ok()?)))
        .with_context(|| format!("the client's count is missing: {said:?}"))?;
    let log = std::fs::read_to_string(&audit)?;
    // One record per request decided; CONNECTs have records of their own.
    let records = |verdict: &str| {
        log.lines()
            .filter(|l| l.contains(r#""layer":"proxy""#) && l.contains(verdict))
            .filter(|l| !l.contains(r#""method":"CONNECT""#))
            .count()
    };
    let (allow_records, deny_records) = (
        records(r#""verdict":"allow""#),
        records(r#""verdict":"deny""#),
    );
    ensure!(
        allowed > 0 && allow_records == allowed && deny_records == refused,
        "the audit log has {allow_records} allow and {deny_records} deny records for the \
         {allowed} requests the client had answered and the {refused} it had refused"
    );
    println!(
        "pgo_train: {allowed} requests answered and {refused} refused through the tunnel, \
         as expected and recorded"
    );
    Ok(())
}

/// A directory of its own under the temporary directory, removed when dropped.
struct Workdir(PathBuf);

impl Workdir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("gateway-pgo-train.{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(Self(dir))
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("pgo_train: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Waits for `child`; past `limit`, stops it (SIGTERM, then SIGKILL 10 s later) and fails.
fn wait_at_most(child: &mut Child, limit: Duration) -> anyhow::Result<ExitStatus> {
    if let Some(status) = exited_within(child, limit)? {
        return Ok(status);
    }
    let pid = nix::unistd::Pid::from_raw(child.id().try_into()?);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    if exited_within(child, Duration::from_secs(10))?.is_none() {
        child.kill()?;
        child.wait()?;
    }
    bail!("the training run took longer than {limit:?} and was stopped");
}

fn exited_within(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        let status = child.try_wait()?;
        if status.is_some() || start.elapsed() >= limit {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The side inside the sandbox: the clients, through the tunnel that `HTTP_PROXY` names.
fn drive_requests(plain_port: u16, upstream_ca: &Path, scale: usize) -> anyhow::Result<()> {
    let proxy =
        std::env::var("HTTP_PROXY").context("HTTP_PROXY is not set: run me in gateway run")?;
    let tunnel: SocketAddr = proxy
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("HTTP_PROXY={proxy} is not http://IP:PORT"))?;
    let config =
        client_config(&std::env::var("SSL_CERT_FILE").context("SSL_CERT_FILE is not set")?)?;
    // Spliced connections reach the upstream itself, whose CA the sandbox is not given.
    let spliced = client_config(upstream_ca)?;
    let upstream = SocketAddr::from(([127, 0, 0, 1], plain_port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clients = async move {
        let mut clients = tokio::task::JoinSet::new();
        for i in 0..PLAIN_CLIENTS {
            clients.spawn(plain_client(tunnel, upstream, i, PLAIN_REQUESTS * scale));
        }
        for i in 0..TLS_CLIENTS {
            let host = if i % 2 == 0 { "h2.train" } else { "h1.train" };
            clients.spawn(tls_client(
                tunnel,
                host,
                config.clone(),
                Tls::Intercepted,
                scale,
            ));
        }
        // Spliced requests leave one record per connection, not per request: not counted.
        clients.spawn(async move {
            tls_client(tunnel, "pt.train", spliced, Tls::Spliced, scale).await?;
            anyhow::Ok(Counts::default())
        });
        let mut counts = Counts::default();
        while let Some(done) = clients.join_next().await {
            counts.add(done??);
        }
        anyhow::Ok(counts)
    };
    let done = runtime
        .block_on(async { tokio::time::timeout(DEADLINE * scale as u32, clients).await })
        .context("the training run took too long")??;
    // For the side outside, which checks them against the audit log.
    println!("{} {}", done.allowed, done.refused);
    Ok(())
}

/// A loopback upstream: `GET` of [`STREAM`] answers in [`EVENTS`] chunks, any other GET `ok`, a POST
/// echoes its body as it arrives. With `tls`, over TLS, HTTP/2 if both sides offer it.
async fn serve(
    tls: Option<Arc<rustls::ServerConfig>>,
    authorization: &'static str,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Some(acceptor) = acceptor else {
                    return answer_http1(TokioIo::new(stream), authorization).await;
                };
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service_fn(|r| answer(r, authorization)))
                        .await;
                } else {
                    answer_http1(io, authorization).await;
                }
            });
        }
    });
    Ok(addr)
}

async fn answer_http1<I>(io: I, authorization: &'static str)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service_fn(|r| answer(r, authorization)))
        .await;
}

type AnswerBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Answers 401 unless the request carries `authorization`, once.
async fn answer(
    request: Request<Incoming>,
    authorization: &'static str,
) -> Result<Response<AnswerBody>, hyper::Error> {
    let sent: Vec<_> = request.headers().get_all("authorization").iter().collect();
    if sent.len() != 1 || sent[0] != authorization {
        // Not the values: the tunnel cuts an answer that carries the secret.
        let mut refused = Response::new(full(Bytes::from(format!(
            "wrong authorization: {} header(s), not the one expected",
            sent.len()
        ))));
        *refused.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(refused);
    }
    let body = if request.method() == Method::POST {
        request.into_body().boxed()
    } else if request.uri().path() == STREAM {
        Events(0).boxed()
    } else {
        full(Bytes::from_static(OK))
    };
    Ok(Response::new(body))
}

const OK: &[u8] = b"ok\n";

fn full(bytes: Bytes) -> AnswerBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn event(n: u8) -> Bytes {
    Bytes::from(format!("data: {n}\n\n"))
}

/// What a request through the tunnel should get back: its status, and the body the upstream
/// answers with (a refusal's is the tunnel's, not checked).
fn answer_for(method: &Method, path: &str, status: StatusCode) -> Option<Bytes> {
    if status != StatusCode::OK {
        None
    } else if method == Method::POST {
        Some(body_for(method))
    } else if path == STREAM {
        Some((1..=EVENTS).flat_map(|n| event(n).to_vec()).collect())
    } else {
        Some(Bytes::from_static(OK))
    }
}

/// The path answered as a server-sent-event stream, and the events it sends.
const STREAM: &str = "/api/stream";
const EVENTS: u8 = 16;

/// A chunked answer of [`EVENTS`] events, each its own frame, as a server-sent-event stream
/// sends.
struct Events(u8);

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.0 == EVENTS {
            return std::task::Poll::Ready(None);
        }
        self.0 += 1;
        std::task::Poll::Ready(Some(Ok(Frame::data(event(self.0)))))
    }
}

/// What one request should get back from the tunnel: mostly GETs, some POSTs with a body,
/// a streamed answer, and one in 25 refused by the rule's paths or methods.
fn expected(i: usize) -> (Method, &'static str, StatusCode) {
    match i % 50 {
        0 => (Method::GET, "/private", StatusCode::FORBIDDEN),
        25 => (Method::DELETE, "/api/items", StatusCode::FORBIDDEN),
        1..=4 => (Method::POST, "/api/items", StatusCode::OK),
        5 => (Method::GET, STREAM, StatusCode::OK),
        _ => (Method::GET, "/api/items/42?fields=name", StatusCode::OK),
    }
}

/// Requests answered by the upstream and refused by the tunnel.
#[derive(Default)]
struct Counts {
    allowed: usize,
    refused: usize,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.allowed += other.allowed;
        self.refused += other.refused;
    }

    fn count(&mut self, status: StatusCode) {
        if status == StatusCode::OK {
            self.allowed += 1;
        } else {
            self.refused += 1;
        }
    }
}

type Sender<B> = hyper::client::conn::http1::SendRequest<B>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn.with_upgrades());
    Ok(sender)
}

fn body_for(method: &Method) -> Bytes {
    if method == Method::POST {
        Bytes::from(vec![b'x'; 4096])
    } else {
        Bytes::new()
    }
}

/// Plain-HTTP requests through the tunnel on one kept-alive connection, every answer checked.
async fn plain_client(
    tunnel: SocketAddr,
    upstream: SocketAddr,
    client: usize,
    requests: usize,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let sender = &mut connect(tunnel).await?;
    for i in client..client + requests {
        // An unlisted host now and then, on a connection of its own.
        if i % 500 == 0 {
            unlisted_host(tunnel).await?;
            counts.refused += 1;
        }
        let (method, path, status) = expected(i);
        // The tunnel keeps a connection open whatever it decides.
        sender
            .ready()
            .await
            .context("the tunnel closed a kept-alive connection")?;
        let answer = answer_for(&method, path, status);
        let request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{upstream}{path}"))
            .header("host", upstream.to_string())
            .header("authorization", AGENTS_OWN)
            .header("user-agent", "pgo-train")
            .header("accept", "*/*")
            .body(Full::new(body_for(&method)))?;
        check(sender.send_request(request).await?, status, answer, path).await?;
        counts.count(status);
    }
    Ok(counts)
}

async fn unlisted_host(tunnel: SocketAddr) -> anyhow::Result<()> {
    let mut sender = connect(tunnel).await?;
    let request = Request::get("http://unlisted.train/")
        .header("host", "unlisted.train")
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    check(response, StatusCode::FORBIDDEN, None, "unlisted.train").await
}

/// Fails unless `response` has `status` and, if given, the body `answer`.
async fn check(
    response: Response<Incoming>,
    status: StatusCode,
    answer: Option<Bytes>,
    what: &str,
) -> anyhow::Result<()> {
    let got = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    ensure!(
        got == status,
        "{what}: answered {got}, not {status}: {}",
        String::from_utf8_lossy(&body)
    );
    if let Some(answer) = answer {
        ensure!(
            body == answer,
            "{what}: the answer's body is not the upstream's ({} bytes, not {})",
            body.len(),
            answer.len()
        );
    }
    Ok(())
}

/// Whom a client's TLS reaches through the tunnel.
#[derive(Clone, Copy, PartialEq)]
enum Tls {
    /// The tunnel, which checks each request against the policy.
    Intercepted,
    /// The upstream, spliced to: the upstream answers every request.
    Spliced,
}

/// HTTPS requests through CONNECT to `host`, on a new TLS connection every [`TLS_REQUESTS`]
/// requests.
async fn tls_client(
    tunnel: SocketAddr,
    host: &'static str,
    config: Arc<rustls::ClientConfig>,
    tls: Tls,
    scale: usize,
) -> anyhow::Result<Counts> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut counts = Counts::default();
    for _ in 0..TLS_CONNECTIONS * scale {
        let mut sender = connect(tunnel).await?;
        let authority = format!("{host}:443");
        let request = Request::connect(&authority)
            .header("host", &authority)
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await?;
        ensure!(
            response.status() == StatusCode::OK,
            "CONNECT {authority}: the tunnel answered {}",
            response.status()
        );
        let tunnelled = TokioIo::new(hyper::upgrade::on(response).await?);
        let stream = connector
            .connect(ServerName::try_from(host)?, tunnelled)
            .await
            .with_context(|| format!("TLS to {host} through the tunnel"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        for i in 1..=TLS_REQUESTS {
            let (method, path, mut status) = expected(i);
            if tls == Tls::Spliced {
                status = StatusCode::OK;
            }
            sender
                .ready()
                .await
                .context("the tunnel closed a kept-alive TLS connection")?;
            let answer = answer_for(&method, path, status);
            let request = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", host)
                .header("authorization", AGENTS_OWN)
                .body(Full::new(body_for(&method)))?;
            check(sender.send_request(request).await?, status, answer, path).await?;
            counts.count(status);
        }
    }
    Ok(counts)
}

/// The upstreams' own CA and the certificate for `*.train` it signs.
struct UpstreamTls {
    ca_file: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl UpstreamTls {
    fn new(work: &Path) -> anyhow::Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "pgo training upstream CA");
        let ca = ca.self_signed(&ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut leaf = rcgen::CertificateParams::new(vec![
            "h2.train".into(),
            "h1.train".into(),
            "pt.train".into(),
        ])?;
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf.signed_by(&key, &ca, &ca_key)?;
        let ca_file = work.join("upstream-ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        Ok(Self {
            ca_file,
            chain: vec![leaf.der().clone()],
            key: key.serialize_der(),
        })
    }

    fn server(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(self.key.clone().into());
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), key)
            .expect("rcgen made a certificate rustls takes");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// A client that trusts the certificates of `bundle` (`SSL_CERT_FILE`: the system's roots and
/// the gateway's CA).
fn client_config(bundle: impl AsRef<Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(bundle)? {
        // The system's bundle may hold certificates rustls cannot use; the gateway's it can.
        let _ = roots.add(cert?);
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}
