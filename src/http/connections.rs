//! The connections the HTTP endpoint holds, each bounded: at most `[http] max_connections` open (when
//! all are taken, the one outside a request for the longest is closed for a newcomer; if every one is
//! inside a request, the rest wait in the kernel's accept queue), request headers within
//! `[http] header_timeout_s` (also the wait for the next request on a kept-alive connection), and a stop
//! that lets open requests end within a second.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

use crate::config::HttpConfig;
use crate::metrics::{Metrics, Refused};
use crate::shutdown::Shutdown;

/// How long a stop waits for open HTTP requests to finish.
const STOP_GRACE: Duration = Duration::from_secs(1);

pub struct Connections {
    listener: TcpListener,
    open: Arc<Semaphore>,
    http1: http1::Builder,
    metrics: Metrics,
    idle: Arc<Mutex<IdleConnections>>,
}

impl Connections {
    pub fn new(listener: TcpListener, cfg: &HttpConfig, metrics: Metrics) -> Self {
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(cfg.header_timeout);
        Connections {
            listener,
            open: Arc::new(Semaphore::new(cfg.max_connections)),
            http1,
            metrics,
            idle: Arc::new(Mutex::new(IdleConnections::default())),
        }
    }

    /// Accepts and serves until `shutdown`; then closes idle connections and waits for open requests.
    pub async fn serve(self, app: Router, shutdown: Shutdown) {
        let graceful = GracefulShutdown::new();
        let mut next_id = 0u64;
        loop {
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
            // Every slot taken: the connection outside a request for the longest (a client holding
            // half-sent headers, or an idle keep-alive) makes room, so /healthz gets in under any load.
            // When every connection is inside a request, the new one waits for a slot.
            let slot = match self.open.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    if lock(&self.idle).evict_longest_idle() {
                        self.metrics.http_refused(Refused::Idle);
                    }
                    let slot = tokio::select! {
                        slot = self.open.clone().acquire_owned() => slot,
                        _ = shutdown.wait() => break,
                    };
                    let Ok(slot) = slot else { break };
                    slot
                }
            };
            next_id += 1;
            let id = next_id;
            let evicted = lock(&self.idle).opened(id);
            let service = Tracked { inner: TowerToHyperService::new(app.clone()), idle: self.idle.clone(), id };
            let conn = self.http1.serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            let (metrics, idle) = (self.metrics.clone(), self.idle.clone());
            tokio::spawn(async move {
                tokio::select! {
                    ended = conn => if let Err(e) = ended {
                        closed_with(&e, &metrics);
                    },
                    _ = evicted => {}
                }
                lock(&idle).closed(id);
                drop(slot);
            });
        }
        drop(self.listener);
        // Idle and half-sent requests close at once and uploads answer 503 (see upload.rs), so this
        // normally ends at once; a client that does not read its answer is not waited for long.
        if tokio::time::timeout(STOP_GRACE, graceful.shutdown()).await.is_err() {
            tracing::warn!(after = ?STOP_GRACE, "HTTP connections still open at stop; closing them");
        }
    }
}

fn lock(idle: &Mutex<IdleConnections>) -> std::sync::MutexGuard<'_, IdleConnections> {
    idle.lock().unwrap_or_else(|e| e.into_inner())
}

/// The open connections that are outside a request (waiting for headers), in the order they became so,
/// each with the means to close it.
#[derive(Default)]
struct IdleConnections {
    /// Connection id → when it became idle (a sequence number) and its closer.
    open: HashMap<u64, (Option<u64>, Option<oneshot::Sender<()>>)>,
    /// (became idle, connection id), oldest first.
    idle: BTreeSet<(u64, u64)>,
    clock: u64,
}

impl IdleConnections {
    /// A new connection, idle until its first request; the receiver resolves if it is evicted.
    fn opened(&mut self, id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.open.insert(id, (None, Some(tx)));
        self.set_idle(id, true);
        rx
    }

    fn set_idle(&mut self, id: u64, idle: bool) {
        self.clock += 1;
        let clock = self.clock;
        let Some((since, _)) = self.open.get_mut(&id) else { return };
        if let Some(t) = since.take() {
            self.idle.remove(&(t, id));
        }
        if idle {
            *since = Some(clock);
            self.idle.insert((clock, id));
        }
    }

    fn closed(&mut self, id: u64) {
        if let Some((Some(t), _)) = self.open.remove(&id) {
            self.idle.remove(&(t, id));
        }
    }

    /// Closes the connection that has been outside a request the longest; false if every one is
    /// inside a request.
    fn evict_longest_idle(&mut self) -> bool {
        let Some(&(t, id)) = self.idle.iter().next() else { return false };
        self.idle.remove(&(t, id));
        match self.open.get_mut(&id) {
            Some((since, closer)) => {
                *since = None;
                closer.take().is_some_and(|c| c.send(()).is_ok())
            }
            None => false,
        }
    }
}

/// The router, marking its connection as inside a request from the headers' arrival until the answer
/// is ready.
struct Tracked {
    inner: TowerToHyperService<Router>,
    idle: Arc<Mutex<IdleConnections>>,
    id: u64,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Tracked {
    type Response = <TowerToHyperService<Router> as hyper::service::Service<hyper::Request<hyper::body::Incoming>>>::Response;
    type Error = <TowerToHyperService<Router> as hyper::service::Service<hyper::Request<hyper::body::Incoming>>>::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        lock(&self.idle).set_idle(self.id, false);
        let answer = self.inner.call(req);
        let (idle, id) = (self.idle.clone(), self.id);
        Box::pin(async move {
            let r = answer.await;
            lock(&idle).set_idle(id, true);
            r
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_outside_a_request_longest_is_evicted_and_one_inside_a_request_never() {
        let mut idle = IdleConnections::default();
        let mut first = idle.opened(1);
        let mut second = idle.opened(2);
        let mut third = idle.opened(3);
        idle.set_idle(1, false); // 1 is inside a request
        assert!(idle.evict_longest_idle());
        assert!(second.try_recv().is_ok(), "2 waited for its headers longest");
        assert!(first.try_recv().is_err() && third.try_recv().is_err());
        idle.set_idle(1, true); // 1 answered: idle again, but after 3
        assert!(idle.evict_longest_idle());
        assert!(third.try_recv().is_ok());
        idle.set_idle(1, false);
        assert!(!idle.evict_longest_idle(), "every connection left is inside a request");
        idle.closed(1);
        idle.closed(2);
        idle.closed(3);
        assert!(idle.open.is_empty() && idle.idle.is_empty());
    }
}
