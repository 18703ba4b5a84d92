//! Accept loops: one per listener, a task per connection, HTTP/1.1 and h2c
//! on every port. On shutdown a loop stops accepting, lets its connections
//! finish their in-flight requests within the drain bound, then returns.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::proxy::{Entry, Proxy};

/// Serves `listener` until `shutdown` turns true, then drains for at most
/// `drain` before dropping what is left.
pub async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<ArcSwap<Proxy>>,
    entry: Entry,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    open_connections: IntGauge,
) {
    let entry = Arc::new(entry);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Slow clients may not hold a connection open by dribbling headers.
        .header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let proxy = Arc::clone(&proxy);
                    let entry = Arc::clone(&entry);
                    let service = service_fn(move |req| {
                        // The config current when the request arrives; a
                        // reload swaps it without touching this connection.
                        let proxy = proxy.load_full();
                        let entry = Arc::clone(&entry);
                        async move { Ok::<_, Infallible>(proxy.handle(&entry, req).await) }
                    });
                    let open = ConnectionGuard::new(&open_connections);
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _open = open;
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "client connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't exit.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "connections still open after the drain timeout; closing them"
        );
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Counts an open client connection until dropped.
struct ConnectionGuard(IntGauge);

impl ConnectionGuard {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
