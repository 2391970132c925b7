//! The tunnel: the one address the sandbox may reach. Until the proxy lands it answers 501.

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("tunnel accept: {e}");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        tokio::spawn(async move {
            let service = service_fn(not_implemented);
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("tunnel connection: {e}");
            }
        });
    }
}

async fn not_implemented(
    _req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = Response::new(Full::new(Bytes::from_static(
        b"gateway tunnel: proxying is not implemented yet\n",
    )));
    *resp.status_mut() = StatusCode::NOT_IMPLEMENTED;
    Ok(resp)
}
