//! The upstream pool (src/proxy/pool.rs) seen from an upstream that counts
//! its TCP connections and can hold TLS handshakes and responses (and close
//! the connection after one, `/hold-close`): connects
//! are bounded by the requests waiting, a connection that comes free goes
//! to a waiting request before a new one finishes connecting, and idle
//! connections close after `upstream.pool_idle_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http::Response;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

/// A TLS upstream. Each TCP connection is counted when accepted; its TLS
/// handshake then waits for a permit of `handshakes`. `/hold` answers once
/// `release` is notified; every answer names its connection in `x-conn`.
struct Gated {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    accepted_event: Arc<Notify>,
    handshakes: Arc<Semaphore>,
    held: Arc<Notify>,
    release: Arc<Notify>,
    closed: Arc<AtomicUsize>,
    closed_event: Arc<Notify>,
}

impl Gated {
    async fn start(pki: &Pki, permits: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&["localhost"]));
        let g = Gated {
            addr,
            accepted: Arc::default(),
            accepted_event: Arc::default(),
            handshakes: Arc::new(Semaphore::new(permits)),
            held: Arc::default(),
            release: Arc::default(),
            closed: Arc::default(),
            closed_event: Arc::default(),
        };
        let (accepted, accepted_event, handshakes) = (
            Arc::clone(&g.accepted),
            Arc::clone(&g.accepted_event),
            Arc::clone(&g.handshakes),
        );
        let (held, release, closed, closed_event) = (
            Arc::clone(&g.held),
            Arc::clone(&g.release),
            Arc::clone(&g.closed),
            Arc::clone(&g.closed_event),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let id = accepted.fetch_add(1, Ordering::SeqCst) + 1;
                accepted_event.notify_waiters();
                let (acceptor, handshakes) = (acceptor.clone(), Arc::clone(&handshakes));
                let (held, release) = (Arc::clone(&held), Arc::clone(&release));
                let (closed, closed_event) = (Arc::clone(&closed), Arc::clone(&closed_event));
                tokio::spawn(async move {
                    let permit = handshakes.acquire_owned().await.unwrap();
                    permit.forget();
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                            let (held, release) = (Arc::clone(&held), Arc::clone(&release));
                            async move {
                                let path = req.uri().path();
                                let close = path == "/hold-close";
                                if path == "/hold" || close {
                                    let released = release.notified();
                                    held.notify_one();
                                    released.await;
                                }
                                let mut response = Response::builder();
                                if close {
                                    response = response.header("connection", "close");
                                }
                                Ok::<_, std::convert::Infallible>(
                                    response
                                        .header("x-conn", id.to_string())
                                        .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                    closed_event.notify_waiters();
                });
            }
        });
        g
    }

    /// Waits until `n` TCP connections have been accepted.
    async fn accepted(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let event = self.accepted_event.notified();
                if self.accepted.load(Ordering::SeqCst) >= n {
                    return;
                }
                event.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} connections accepted"));
    }

    /// Waits until `n` connections have closed.
    async fn closed(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let event = self.closed_event.notified();
                if self.closed.load(Ordering::SeqCst) >= n {
                    return;
                }
                event.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} connections closed"));
    }
}

fn route(name: &str, port: u16) -> String {
    format!(
        "[[routes]]\nhost = \"{name}\"\nupstream = \"https://localhost:{port}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\nupstream_protocol = \"http1\"\n"
    )
}

async fn get(client: &reqwest::Client, url: &str) -> String {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}: {:?}", error_kind(&r));
    let conn = r.headers()["x-conn"].to_str().unwrap().to_owned();
    assert_eq!(r.text().await.unwrap(), "ok");
    conn
}

/// `get` on a task of its own, for a request that waits while the test
/// goes on.
fn spawn_get(client: &reqwest::Client, url: &'static str) -> tokio::task::JoinHandle<String> {
    let client = client.clone();
    tokio::spawn(async move { get(&client, url).await })
}

/// While a second connection is still in its TLS handshake, the request
/// that started it is served on the first connection as soon as that one
/// comes free, and a third request that waits meanwhile starts no third
/// connect: connects are bounded by the requests waiting, not one per
/// request that found no idle connection.
#[tokio::test]
async fn a_freed_connection_serves_the_waiting_request_and_no_extra_connect_starts() {
    let w = World::new(Mode::Issue(60.0)).await;
    // One handshake allowed: the second connection hangs in TLS.
    let up = Gated::start(&w.pki, 1).await;
    let app = w
        .start(&w.config("", &route("gated.test", up.addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    assert_eq!(get(&client, "http://gated.test/warm").await, "1");

    // A holds connection 1.
    let held = up.held.notified();
    let a = spawn_get(&client, "http://gated.test/hold");
    held.await;
    // B finds nothing idle: a second connect starts and hangs in TLS.
    let b = spawn_get(&client, "http://gated.test/b");
    up.accepted(2).await;
    // A ends: connection 1 goes to B, which has waited for it.
    up.release.notify_one();
    assert_eq!(a.await.unwrap(), "1");
    assert_eq!(b.await.unwrap(), "1", "B is served on the freed connection");

    // C holds connection 1 again; D waits while the second connect is still
    // under way, so D starts none of its own.
    let held = up.held.notified();
    let c = spawn_get(&client, "http://gated.test/hold");
    held.await;
    let d = spawn_get(&client, "http://gated.test/d");
    // The second handshake completes: D gets connection 2.
    up.handshakes.add_permits(1);
    assert_eq!(d.await.unwrap(), "2");
    up.release.notify_one();
    assert_eq!(c.await.unwrap(), "1");
    // Both connections are pooled now: two at once need no third.
    tokio::join!(
        get(&client, "http://gated.test/x"),
        get(&client, "http://gated.test/y")
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "connections opened");
    app.shutdown().await;
}

/// A connection that closes after its response (`Connection: close`) is
/// not handed to the request waiting for one, and that request is not
/// failed for it: it waits on for the connect it started.
#[tokio::test]
async fn a_connection_closed_after_its_response_is_not_handed_to_a_waiting_request() {
    let w = World::new(Mode::Issue(60.0)).await;
    let up = Gated::start(&w.pki, 1).await;
    let app = w
        .start(&w.config("", &route("closing.test", up.addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    assert_eq!(get(&client, "http://closing.test/warm").await, "1");

    // A holds connection 1, whose answer will close it.
    let held = up.held.notified();
    let a = spawn_get(&client, "http://closing.test/hold-close");
    held.await;
    // B waits; its connect hangs in TLS.
    let b = spawn_get(&client, "http://closing.test/b");
    up.accepted(2).await;
    up.release.notify_one();
    assert_eq!(a.await.unwrap(), "1");
    up.closed(1).await;
    // B still waits for its own connect, not failed by the closed one.
    up.handshakes.add_permits(1);
    assert_eq!(
        b.await.unwrap(),
        "2",
        "B is served on the connection it started"
    );
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "connections opened");
    app.shutdown().await;
}

/// Waves of concurrent requests open no more upstream connections than
/// requests at once (hyper-util's pool opened ~3.7 per client at 1,024).
#[tokio::test]
async fn waves_of_requests_open_no_more_connections_than_requests_at_once() {
    const AT_ONCE: usize = 24;
    let w = World::new(Mode::Issue(60.0)).await;
    let up = Gated::start(&w.pki, usize::MAX >> 4).await;
    let app = w
        .start(&w.config("", &route("waves.test", up.addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    for wave in 0..8 {
        let all = (0..AT_ONCE).map(|i| {
            let c = client.clone();
            async move { get(&c, &format!("http://waves.test/{wave}/{i}")).await }
        });
        futures_util::future::join_all(all).await;
    }
    let opened = up.accepted.load(Ordering::SeqCst);
    assert!(
        (1..=AT_ONCE).contains(&opened),
        "{opened} connections for {AT_ONCE} requests at once"
    );
    app.shutdown().await;
}

/// An idle pooled connection is closed after `upstream.pool_idle_timeout`
/// (by the pool, with no request to notice it), and the next request opens
/// a new one.
#[tokio::test]
async fn an_idle_connection_closes_after_the_pool_idle_timeout() {
    let w = World::new(Mode::Issue(60.0)).await;
    let up = Gated::start(&w.pki, usize::MAX >> 4).await;
    let text = w.config("", &route("idle.test", up.addr.port())).replace(
        "response_timeout = \"5s\"\n",
        "response_timeout = \"5s\"\npool_idle_timeout = \"300ms\"\n",
    );
    let app = w.start(&text).await;
    let client = proxied_client(app.proxy_addr());
    assert_eq!(get(&client, "http://idle.test/one").await, "1");
    let idle_since = Instant::now();
    up.closed(1).await;
    let idle = idle_since.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed after {idle:?}");
    assert_eq!(get(&client, "http://idle.test/two").await, "2");
    app.shutdown().await;
}

/// At start-up each fixed upstream gets a connection before any request
/// (its handshakes overlap the token fetch), and the first request uses it.
#[tokio::test]
async fn start_up_opens_a_connection_to_each_upstream_before_any_request() {
    let w = World::new(Mode::Issue(60.0)).await;
    let up = Gated::start(&w.pki, usize::MAX >> 4).await;
    let app = w
        .start(&w.config("", &route("pre.test", up.addr.port())))
        .await;
    up.accepted(1).await;
    let client = proxied_client(app.proxy_addr());
    assert_eq!(get(&client, "http://pre.test/first").await, "1");
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "connections opened");
    app.shutdown().await;
}
