//! The floor under the tunnel's cost per request: a bare forward proxy on the same hyper,
//! tokio and allocator, shaped like the tunnel (one single-threaded runtime per worker, the
//! first one accepting and handing connections round-robin, a pool of HTTP/1.1 upstream
//! connections per worker) but with nothing else: no identity, policy, credential lookup,
//! header checks or audit record. `tests/bench/floor.sh` runs it beside the tunnel and nginx
//! to tell what hyper itself costs from what the tunnel adds. A measuring tool only: it
//! listens on 127.0.0.1, forwards every request to the one upstream it is given, and stops
//! when its standard input closes.
//!
//! `hyper_floor UPSTREAM_ADDR`: prints the address it listens on, then, for each line read
//! on standard input, the number of requests answered so far.

use std::{
    cell::RefCell,
    io::BufRead as _,
    net::SocketAddr,
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::Context as _;
use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::http1::{self as client, SendRequest},
    header::{AUTHORIZATION, HeaderValue},
    server::conn::http1 as server,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, sync::mpsc};

// The tunnel's allocator, so the two differ only in what the tunnel does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WORKERS: usize = 2;

static ANSWERED: AtomicU64 = AtomicU64::new(0);

type Idle = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

async fn forward(
    idle: Idle,
    upstream: SocketAddr,
    mut req: Request<Incoming>,
) -> anyhow::Result<Response<Incoming>> {
    req.headers_mut().insert(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer bench-secret-token"),
    );
    let path = req.uri().path_and_query().cloned().context("no path")?;
    *req.uri_mut() = path.into();
    let pooled = idle.borrow_mut().pop();
    let mut sender = match pooled {
        Some(sender) => sender,
        None => {
            let stream = TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) = client::handshake(TokioIo::new(stream)).await?;
            tokio::task::spawn_local(conn);
            sender
        }
    };
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    // The benchmark's upstream sends its short body with the head, so the connection is
    // ready again before the next request is sent on it (hyper queues it otherwise).
    idle.borrow_mut().push(sender);
    ANSWERED.fetch_add(1, Ordering::Relaxed);
    Ok(resp)
}

async fn serve(stream: TcpStream, idle: Idle, upstream: SocketAddr) {
    // An error closes the client's connection, after saying why.
    let service = service_fn(move |req| {
        let idle = idle.clone();
        async move {
            let answer = forward(idle, upstream, req).await;
            if let Err(e) = &answer {
                eprintln!("hyper_floor: {e:#}");
            }
            answer
        }
    });
    let _ = server::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn worker(
    mut inbox: mpsc::UnboundedReceiver<TcpStream>,
    accept: Option<(std::net::TcpListener, Vec<mpsc::UnboundedSender<TcpStream>>)>,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        if let Some((listener, workers)) = accept {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::task::spawn_local(async move {
                let mut next = 0;
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    let _ = workers[next % workers.len()].send(stream);
                    next += 1;
                }
            });
        }
        let idle = Idle::default();
        while let Some(stream) = inbox.recv().await {
            tokio::task::spawn_local(serve(stream, idle.clone(), upstream));
        }
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let upstream: SocketAddr = std::env::args()
        .nth(1)
        .context("usage: hyper_floor UPSTREAM_ADDR")?
        .parse()
        .context("UPSTREAM_ADDR is host:port")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    println!("{}", listener.local_addr()?);
    let (senders, inboxes): (Vec<_>, Vec<_>) =
        (0..WORKERS).map(|_| mpsc::unbounded_channel()).unzip();
    // The first worker accepts, as the tunnel's does; the senders live as long as it does.
    let mut accept = Some((listener, senders));
    for inbox in inboxes {
        let accept = accept.take();
        std::thread::spawn(move || worker(inbox, accept, upstream));
    }
    for line in std::io::stdin().lock().lines() {
        line?;
        println!("{}", ANSWERED.load(Ordering::Relaxed));
    }
    Ok(())
}
