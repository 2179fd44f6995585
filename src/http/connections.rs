//! The connections the HTTP endpoint holds, each bounded: at most `[http] max_connections` open (the
//! rest wait in the kernel's accept queue), request headers within `[http] header_timeout_s` (also
//! the wait for the next request on a kept-alive connection), and a stop that lets open requests end.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::HttpConfig;
use crate::metrics::{Metrics, Refused};
use crate::shutdown::Shutdown;

pub struct Connections {
    listener: TcpListener,
    open: Arc<Semaphore>,
    http1: http1::Builder,
    metrics: Metrics,
}

impl Connections {
    pub fn new(listener: TcpListener, cfg: &HttpConfig, metrics: Metrics) -> Self {
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(cfg.header_timeout);
        Connections { listener, open: Arc::new(Semaphore::new(cfg.max_connections)), http1, metrics }
    }

    /// Accepts and serves until `shutdown`; then closes idle connections and waits for open requests.
    pub async fn serve(self, app: Router, shutdown: Shutdown) {
        let graceful = GracefulShutdown::new();
        loop {
            // A connection slot first, so a flood waits in the kernel instead of in our memory.
            let slot = tokio::select! {
                slot = self.open.clone().acquire_owned() => slot,
                _ = shutdown.wait() => break,
            };
            let Ok(slot) = slot else { break };
            let stream = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = shutdown.wait() => break,
            };
            let stream = match stream {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            };
            let conn = self.http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
            let conn = graceful.watch(conn);
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    closed_with(&e, &metrics);
                }
                drop(slot);
            });
        }
        drop(self.listener);
        graceful.shutdown().await;
    }
}

fn closed_with(e: &hyper::Error, metrics: &Metrics) {
    if e.is_timeout() {
        metrics.http_refused(Refused::HeaderTimeout);
        tracing::debug!("HTTP connection closed: request headers not complete within [http] header_timeout_s");
    } else {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// A client that gave up before being accepted is no fault; running out of file descriptors is
/// (then wait, as other connections close, instead of spinning).
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "cannot accept HTTP connections (out of file descriptors? raise LimitNOFILE or lower [http] max_connections)");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
