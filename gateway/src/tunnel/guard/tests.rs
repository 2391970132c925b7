//! The guard's scan, and the guard in front of hyper.

use super::*;

fn check(stream: &[u8]) -> Result<(), Refusal> {
    HeadGuard::new((), Arc::default()).scan(stream)
}

#[test]
fn strict_heads() {
    assert!(check(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n").is_ok());
    assert!(check(b"GET http://a/ HTTP/1.1\nHost: a\r\n\r\n").is_err());
    assert!(check(b"GET http://a/ HTTP/1.1\r\nHost: a\n\n").is_err());
    assert!(check(b"GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n").is_err());
    assert!(check(b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n").is_err());
    let cl_te =
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(check(cl_te).is_err());
    let two_cl = b"POST http://a/ HTTP/1.1\r\ncontent-length: 3\r\nContent-Length: 3\r\n\r\nabc";
    assert!(check(two_cl).is_err());
    let cl = |v: &str| format!("POST http://a/ HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
    assert!(check(cl("030").as_bytes()).is_ok());
    assert!(check(cl("3, 3").as_bytes()).is_err());
    assert!(check(cl("+3").as_bytes()).is_err());
    assert!(check(cl("").as_bytes()).is_err());
    assert!(check(cl(&format!("{}3", "0".repeat(250))).as_bytes()).is_err());
}

/// The same verdict whichever reads the stream arrives in.
#[test]
fn split_reads() {
    let streams: [&[u8]; 6] = [
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nGET http://a/ HTTP/1.1\r\n\r\n",
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 2\r\n\r\n\n\nGET http://a/ HTTP/1.1\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\n\r\nGET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nX: a\r\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\n\r\nPOST http://a/ HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nx",
        b"CONNECT a:443 HTTP/1.1\r\n\r\n\n\n\r",
    ];
    for stream in streams {
        let whole = check(stream).is_ok();
        for at in 0..=stream.len() {
            let mut guard = HeadGuard::new((), Arc::default());
            let split = guard
                .scan(&stream[..at])
                .and_then(|()| guard.scan(&stream[at..]));
            assert_eq!(split.is_ok(), whole, "{stream:?} split at {at}");
        }
    }
    let long = format!(
        "GET http://a/ HTTP/1.1\r\nX: {}\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        "y".repeat(1000)
    );
    assert!(check(long.as_bytes()).is_err());
}

#[test]
fn every_head_on_a_keep_alive_connection() {
    // A body may hold anything; the head after it is checked.
    let ok = b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\n\r\na\nb\n\nGET http://a/ HTTP/1.1\r\n\r\n";
    assert!(check(ok).is_ok());
    let second_bad = b"GET http://a/ HTTP/1.1\r\n\r\nGET http://a/ HTTP/1.1\nHost: a\r\n\r\n";
    assert!(check(second_bad).is_err());
    let after_body = b"POST http://a/ HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
    assert!(check(after_body).is_err());
    // After a chunked body the tunnel closes the connection; the guard stops there.
    let chunked = b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\nx";
    assert!(check(chunked).is_ok());
}

/// What each refused head is called, and how much of the stream hyper gets: everything before
/// the head, and of the head no more than stops short of a whole one.
#[test]
fn refusals_and_what_hyper_keeps() {
    let before = |s: &[u8], part: &[u8]| {
        s.windows(part.len())
            .position(|w| w == part)
            .expect("in the stream")
    };
    let fold = b"GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n";
    let lf = b"GET http://a/ HTTP/1.1\r\n\r\nGET http://a/ HTTP/1.1\nHost: a\r\n\r\n";
    let cr = b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n";
    let cl_te =
        b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc";
    let two_cl = b"POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc";
    let cl_list = b"POST http://a/ HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc";
    // hyper skips empty lines before a request line: a lone LF is nothing to it.
    let lone_lf = b"GET http://a/ HTTP/1.1\r\n\r\n\nGET";
    let cases: [(&[u8], &str, usize); 7] = [
        (fold, "obs-fold", before(fold, b" b")),
        (lf, "bare-lf", before(lf, b"\nHost")),
        (cr, "bare-cr", before(cr, b"b\r")),
        (
            cl_te,
            "content-length-and-transfer-encoding",
            cl_te.len() - 4,
        ),
        (two_cl, "duplicate-content-length", two_cl.len() - 4),
        (
            cl_list,
            "invalid-content-length",
            before(cl_list, b"\n\r\n"),
        ),
        (lone_lf, "bare-lf", lone_lf.len() - 3),
    ];
    for (stream, reason, keep) in cases {
        assert_eq!(
            check(stream),
            Err(Refusal { reason, keep }),
            "{}",
            String::from_utf8_lossy(stream)
        );
    }
}

/// The stream between hyper and a scripted client: each read takes the next of `reads`
/// (and waits for ever once they are all taken); what is written is kept.
#[derive(Default)]
struct Wire {
    reads: std::collections::VecDeque<Vec<u8>>,
    written: Vec<u8>,
    shut: bool,
}

struct Client(Arc<std::sync::Mutex<Wire>>);

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut wire = self.0.lock().unwrap();
        let Some(chunk) = wire.reads.front_mut() else {
            return Poll::Pending;
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.drain(..n);
        if chunk.is_empty() {
            wire.reads.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.lock().unwrap().written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.lock().unwrap().shut = true;
        Poll::Ready(Ok(()))
    }
}

/// hyper behind the guard, as the tunnel runs it: the paths it served and what the client
/// got, for `stream` arriving in the given reads.
async fn serve(reads: &[&[u8]], report: Arc<Report>) -> (Vec<String>, Wire) {
    use http_body_util::BodyExt as _;
    let wire = Arc::new(std::sync::Mutex::new(Wire {
        reads: reads.iter().map(|r| r.to_vec()).collect(),
        ..Default::default()
    }));
    let served = Arc::new(std::sync::Mutex::new(Vec::new()));
    let paths = served.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        paths.lock().unwrap().push(req.uri().path().to_owned());
        async move {
            req.into_body().collect().await?;
            Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"ok"),
            )))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(
            hyper_util::rt::TokioIo::new(HeadGuard::new(Client(wire.clone()), report)),
            service,
        )
        .with_upgrades();
    let done = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
    assert!(done.is_ok(), "the connection did not end: {reads:?}");
    let paths = served.lock().unwrap().clone();
    let wire = std::mem::take(&mut *wire.lock().unwrap());
    (paths, wire)
}

/// Whichever reads a stream arrives in: the requests before a refused head are served, the
/// client gets their responses and then the guard's 400, and nothing after it is served.
#[tokio::test]
async fn requests_before_a_refused_head_are_served_and_it_is_answered() {
    let refused: [(&str, &[u8]); 9] = [
        ("obs-fold", b"GET /bad HTTP/1.1\r\nX: a\r\n b\r\n\r\n"),
        ("bare-lf", b"GET /bad HTTP/1.1\nX: a\r\n\r\n"),
        ("bare-lf", b"GET /bad HTTP/1.1\r\nX: a\n\r\n"),
        ("bare-lf", b"\nGET /bad HTTP/1.1\r\n\r\n"),
        ("bare-cr", b"GET /bad HTTP/1.1\r\nX: a\rb\r\n\r\n"),
        ("bare-cr", b"\r\rGET /bad HTTP/1.1\r\n\r\n"),
        (
            "content-length-and-transfer-encoding",
            b"POST /bad HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "duplicate-content-length",
            b"POST /bad HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello",
        ),
        (
            "invalid-content-length",
            b"POST /bad HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
        ),
    ];
    let before: [(&[u8], &[&str]); 3] = [
        (b"", &[]),
        (b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n", &["/first"]),
        (
            b"POST /first HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\n\r\n",
            &["/first", "/next"],
        ),
    ];
    let after = b"GET /after HTTP/1.1\r\n\r\n";
    for (reason, head) in refused {
        for (good, paths) in before {
            let stream = [good, head, after].concat();
            for at in 0..=stream.len() {
                let (one, two) = stream.split_at(at);
                let reads: Vec<&[u8]> = [one, two].into_iter().filter(|r| !r.is_empty()).collect();
                let report = Arc::new(Report::default());
                let (served, wire) = serve(&reads, report.clone()).await;
                let what = format!("{} split at {at}", String::from_utf8_lossy(&stream));
                assert_eq!(served, paths, "{what}");
                let answers = wire
                    .written
                    .windows(9)
                    .filter(|w| w == b"HTTP/1.1 ")
                    .count();
                assert_eq!(answers, paths.len() + 1, "{what}");
                assert!(wire.written.ends_with(&answer(reason)), "{what}");
                assert!(wire.shut, "{what}");
                assert_eq!(report.refused(), Some(reason), "{what}");
                assert!(report.answered(), "{what}");
            }
        }
    }
}
