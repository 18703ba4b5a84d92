//! Upstreams that fail in the ways real ones do: nothing listening, a reset
//! in the middle of a body, certificates that must not be trusted, bodies
//! that trickle, and servers that drop pooled connections. The proxy answers
//! with its own error where it can, never falls back to an unverified
//! connection, streams what it gets, and keeps serving afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use http::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A route `name` to `https://localhost:{port}` trusting the test CA.
fn route(name: &str, port: u16) -> String {
    format!(
        "[[routes]]\nhost = \"{name}\"\nupstream = \"https://localhost:{port}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\n"
    )
}

/// The proxy still routes a plain request with a token.
async fn assert_still_serves(w: &World, app: &token_injector::Running) {
    let before = w.upstream.seen().len();
    let r = proxied_client(app.proxy_addr())
        .get("http://api.test/next")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(w.upstream.seen().len(), before + 1);
}

/// What a raw TLS upstream does on each connection, given the connection's
/// number (from 1) and the request's number on it (from 1).
#[derive(Clone, Copy, Debug)]
enum Script {
    /// Answer every request; close after each one without `Connection: close`.
    CloseAfterEach,
    /// Keep-alive with a 100 ms idle timeout: close an idle connection
    /// cleanly and notify `RawStats::closed`.
    IdleTimeout,
    /// Answer the first request on a connection; read the second and close
    /// without answering (a keep-alive timeout racing the next request),
    /// with no TLS close_notify, as many servers close.
    DropSecond,
    /// The same, closing cleanly with close_notify.
    DropSecondCleanly,
    /// Send a head promising 100000 bytes and 10 of them; reset the
    /// connection when `RawStats::reset` is notified.
    ResetMidBody,
}

#[derive(Default)]
struct RawStats {
    connections: AtomicUsize,
    reset: tokio::sync::Notify,
    closed: tokio::sync::Notify,
    /// Request lines seen, in order.
    requests: Mutex<Vec<String>>,
}

/// A TLS upstream written with raw bytes, for behaviour hyper's server
/// would not produce.
async fn raw_upstream(pki: &Pki, script: Script) -> (SocketAddr, Arc<RawStats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&["localhost"]));
    let stats = Arc::new(RawStats::default());
    let st = Arc::clone(&stats);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            st.connections.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let st = Arc::clone(&st);
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut on_connection = 0;
                loop {
                    let next = if matches!(script, Script::IdleTimeout) && on_connection > 0 {
                        let idle = Duration::from_millis(100);
                        match tokio::time::timeout(idle, read_head(&mut tls, &mut buf)).await {
                            Ok(next) => next,
                            Err(_) => {
                                let _ = tls.shutdown().await;
                                st.closed.notify_one();
                                return;
                            }
                        }
                    } else {
                        read_head(&mut tls, &mut buf).await
                    };
                    let Some(line) = next else {
                        return;
                    };
                    st.requests.lock().unwrap().push(line);
                    on_connection += 1;
                    match (script, on_connection) {
                        (Script::DropSecond, 2) => return,
                        (Script::DropSecondCleanly, 2) => {
                            let _ = tls.shutdown().await;
                            return;
                        }
                        (Script::ResetMidBody, _) => {
                            let _ = tls
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n0123456789",
                                )
                                .await;
                            let _ = tls.flush().await;
                            st.reset.notified().await;
                            let (tcp, _) = tls.into_inner();
                            let _ = tcp.set_zero_linger();
                            drop(tcp);
                            return;
                        }
                        _ => {}
                    }
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = tls.flush().await;
                    if let Script::CloseAfterEach = script {
                        let _ = tls.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (addr, stats)
}

/// Reads one request head (bodies are not used by these upstreams, except
/// that a Content-Length body is skipped); returns its request line.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return head.lines().next().map(str::to_owned);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn connection_refused_is_502_and_the_proxy_serves_on() {
    let w = World::new(Mode::Issue(60.0)).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let app = w.start(&w.config("", &route("dead.test", dead))).await;
    let client = proxied_client(app.proxy_addr());
    for _ in 0..3 {
        let r = client.get("http://dead.test/").send().await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
    }
    assert_still_serves(&w, &app).await;
    app.shutdown().await;
}

#[tokio::test]
async fn reset_mid_response_breaks_that_response_only() {
    let w = World::new(Mode::Issue(60.0)).await;
    let (addr, stats) = raw_upstream(&w.pki, Script::ResetMidBody).await;
    let app = w
        .start(&w.config("", &route("reset.test", addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    let r = client.get("http://reset.test/").send().await.unwrap();
    // The head was already on its way: the app sees the upstream's status,
    // then a body that ends short of its length.
    assert_eq!(r.status(), 200);
    // Reset only once the head has reached the app, so the cut is mid-body.
    stats.reset.notify_one();
    let body = r.bytes().await;
    assert!(body.is_err(), "a cut body must not look complete: {body:?}");
    assert_eq!(
        stats.requests.lock().unwrap().len(),
        1,
        "GET not retried after the head"
    );
    assert_still_serves(&w, &app).await;
    app.shutdown().await;
}

#[tokio::test]
async fn untrusted_certificate_is_502_without_fallback() {
    let w = World::new(Mode::Issue(60.0)).await;
    // Another CA's certificate for the right name.
    let stranger = Pki::new();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    let addr = serve(Some(stranger.server_config(&["localhost"])), move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        async { json(200, "{}") }
    })
    .await;
    let app = w
        .start(&w.config("", &route("stranger.test", addr.port())))
        .await;
    let r = proxied_client(app.proxy_addr())
        .get("http://stranger.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
    assert!(
        r.text()
            .await
            .unwrap()
            .to_lowercase()
            .contains("certificate")
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "no request over unverified TLS"
    );
    assert_still_serves(&w, &app).await;
    app.shutdown().await;
}

#[tokio::test]
async fn wrong_host_certificate_is_502_without_fallback() {
    let w = World::new(Mode::Issue(60.0)).await;
    // Our CA, but a certificate for another name.
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    let addr = serve(Some(w.pki.server_config(&["other.test"])), move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        async { json(200, "{}") }
    })
    .await;
    let app = w
        .start(&w.config("", &route("wrongname.test", addr.port())))
        .await;
    let r = proxied_client(app.proxy_addr())
        .get("http://wrongname.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
    let body = r.text().await.unwrap().to_lowercase();
    assert!(body.contains("certificate"), "{body}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "no request over unverified TLS"
    );
    assert_still_serves(&w, &app).await;
    app.shutdown().await;
}

#[tokio::test]
async fn slow_body_streams_as_it_arrives() {
    let w = World::new(Mode::Issue(60.0)).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let addr = serve(Some(w.pki.server_config(&["localhost"])), move |_req| {
        let rx = rx.lock().unwrap().take();
        async move {
            let Some(rx) = rx else {
                return json(500, "{}");
            };
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                        chunk,
                    )),
                    rx,
                ))
            });
            Response::new(http_body_util::BodyExt::boxed(
                http_body_util::StreamBody::new(stream),
            ))
        }
    })
    .await;
    let app = w
        .start(&w.config("", &route("slow.test", addr.port())))
        .await;
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let mut r = tokio::time::timeout(
        Duration::from_secs(10),
        proxied_client(app.proxy_addr())
            .get("http://slow.test/")
            .send(),
    )
    .await
    .expect("the head arrives before the body ends")
    .unwrap();
    assert_eq!(r.status(), 200);
    // The body is still open upstream (we hold the sender): the first bytes
    // must arrive anyway.
    let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .expect("first bytes arrive before the body ends")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"first");
    tx.send(Bytes::from_static(b"rest")).await.unwrap();
    drop(tx);
    let mut rest = Vec::new();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(10), r.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"rest");
    app.shutdown().await;
}

#[tokio::test]
async fn upstream_closing_after_each_response_does_not_fail_requests() {
    let w = World::new(Mode::Issue(60.0)).await;
    let (addr, stats) = raw_upstream(&w.pki, Script::CloseAfterEach).await;
    let app = w
        .start(&w.config("", &route("closer.test", addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    for i in 0..20 {
        let r = client
            .get(format!("http://closer.test/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}: {:?}", error_kind(&r));
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    let requests = stats.requests.lock().unwrap().clone();
    // Each request reached the upstream (a retry may add one).
    for i in 0..20 {
        assert!(
            requests.iter().any(|l| l == &format!("GET /{i} HTTP/1.1")),
            "{i}: {requests:?}"
        );
    }
    assert!(stats.connections.load(Ordering::SeqCst) >= 20);
    app.shutdown().await;
}

#[tokio::test]
async fn idempotent_request_on_a_stale_pooled_connection_is_retried_once() {
    for script in [Script::DropSecond, Script::DropSecondCleanly] {
        stale_get_is_retried(script).await;
    }
}

async fn stale_get_is_retried(script: Script) {
    let w = World::new(Mode::Issue(60.0)).await;
    let (addr, stats) = raw_upstream(&w.pki, script).await;
    let app = w
        .start(&w.config("", &route("stale.test", addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    let r = client.get("http://stale.test/one").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(stats.connections.load(Ordering::SeqCst), 1);
    // Goes out on the pooled connection, which the upstream drops unanswered;
    // the proxy sends it again on a new one.
    let r = client.get("http://stale.test/two").send().await.unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{script:?}: {:?}", r.text().await);
    assert_eq!(
        *stats.requests.lock().unwrap(),
        vec![
            "GET /one HTTP/1.1",
            "GET /two HTTP/1.1",
            "GET /two HTTP/1.1"
        ]
    );
    assert_eq!(stats.connections.load(Ordering::SeqCst), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn non_idempotent_request_on_a_stale_connection_is_not_retried() {
    let w = World::new(Mode::Issue(60.0)).await;
    let (addr, stats) = raw_upstream(&w.pki, Script::DropSecond).await;
    let app = w
        .start(&w.config("", &route("stale.test", addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    let r = client.get("http://stale.test/one").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post("http://stale.test/pay")
        .body("once")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
    assert_eq!(
        *stats.requests.lock().unwrap(),
        vec!["GET /one HTTP/1.1", "POST /pay HTTP/1.1"],
        "a POST is sent at most once"
    );
    // The pool recovers: the next request opens a fresh connection.
    let r = client.get("http://stale.test/three").send().await.unwrap();
    assert_eq!(r.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn pool_recovers_after_the_upstream_idle_timeout_closes_a_connection() {
    let w = World::new(Mode::Issue(60.0)).await;
    let (addr, stats) = raw_upstream(&w.pki, Script::IdleTimeout).await;
    let app = w
        .start(&w.config("", &route("idle.test", addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    for round in 0..3 {
        let r = client
            .get(format!("http://idle.test/{round}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "round {round}: {:?}", error_kind(&r));
        tokio::time::timeout(Duration::from_secs(5), stats.closed.notified())
            .await
            .expect("the upstream closes the idle connection");
    }
    // Each round needed a new connection, and no request was lost.
    assert_eq!(stats.connections.load(Ordering::SeqCst), 3);
    let requests = stats.requests.lock().unwrap().clone();
    assert_eq!(
        requests,
        vec!["GET /0 HTTP/1.1", "GET /1 HTTP/1.1", "GET /2 HTTP/1.1"]
    );
    app.shutdown().await;
}

/// An upstream response head larger than `upstream.max_header_bytes` (16 KiB
/// by default, the ceiling of each pooled connection's read buffer) is a
/// 502 naming the key; raising the key lets it through.
#[tokio::test]
async fn oversized_upstream_response_head_is_502_naming_the_limit() {
    let w = World::new(Mode::Issue(60.0)).await;
    let big = serve(Some(w.pki.server_config(&["localhost"])), |_req| async {
        Response::builder()
            .header("x-big", "a".repeat(20 * 1024))
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let routes = route("big.test", big.port());
    for (limit, want) in [("", 502u16), ("max_header_bytes = 32768", 200)] {
        let text = w.config("", &routes).replace(
            "response_timeout = \"5s\"\n",
            &format!("response_timeout = \"5s\"\n{limit}\n"),
        );
        let app = w.start(&text).await;
        let r = proxied_client(app.proxy_addr())
            .get("http://big.test/")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "limit {limit:?}");
        if want == 502 {
            assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
            let body = r.text().await.unwrap();
            assert!(body.contains("upstream.max_header_bytes"), "{body}");
        } else {
            assert_eq!(r.headers()["x-big"].len(), 20 * 1024);
        }
        assert_still_serves(&w, &app).await;
        app.shutdown().await;
    }
}

/// An app that goes away while its request is at the upstream does not cost
/// the upstream connection: the exchange goes on, the answer's short body is
/// read out in the background, and the connection goes back to the pool, so
/// a later request needs no new TCP and TLS handshake (load generators and
/// clients with timeouts abort like this all the time).
#[tokio::test]
async fn app_closing_during_the_exchange_keeps_the_pooled_connection() {
    app_abort_keeps_the_pooled_connection(false).await;
}

/// The same when the app resets its connection: writing the answer fails at
/// once, with the upstream body still unread.
#[tokio::test]
async fn app_resetting_during_the_exchange_keeps_the_pooled_connection() {
    app_abort_keeps_the_pooled_connection(true).await;
}

/// A TLS upstream answering 32 KiB with `x-conn: <connection number>`;
/// requests for `/gated` wait for the returned gate before answering.
/// The third value is notified when a `/gated` request arrives.
async fn gated_upstream(
    pki: &Pki,
) -> (
    SocketAddr,
    Arc<tokio::sync::Notify>,
    Arc<tokio::sync::Notify>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&["localhost"]));
    let gate = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (g, seen) = (Arc::clone(&gate), Arc::clone(&arrived));
    tokio::spawn(async move {
        let mut id = 0usize;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            id += 1;
            let (acceptor, g, seen) = (acceptor.clone(), Arc::clone(&g), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let (g, seen) = (Arc::clone(&g), Arc::clone(&seen));
                    async move {
                        // 32 KiB in two frames; on /gated only once the gate opens.
                        if req.uri().path() == "/gated" {
                            seen.notify_one();
                            g.notified().await;
                        }
                        let chunk = |b| {
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                Bytes::from(vec![b; 16384]),
                            ))
                        };
                        let body = http_body_util::StreamBody::new(futures_util::stream::iter([
                            chunk(b'a'),
                            chunk(b'b'),
                        ]));
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-length", "32768")
                                .header("x-conn", id.to_string())
                                .body(body)
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, gate, arrived)
}

async fn app_abort_keeps_the_pooled_connection(reset: bool) {
    let w = World::new(Mode::Issue(60.0)).await;
    let (addr, gate, arrived) = gated_upstream(&w.pki).await;
    let app = w
        .start(&w.config("", &route("half.test", addr.port())))
        .await;
    let client = proxied_client(app.proxy_addr());
    let r = client.get("http://half.test/full").send().await.unwrap();
    assert_eq!(r.headers()["x-conn"], "1");
    assert_eq!(r.bytes().await.unwrap().len(), 32768);

    // The app sends a request on its own connection and goes away before
    // the answer; the upstream answers only then, to nobody but the proxy.
    let mut tcp = tokio::net::TcpStream::connect(app.proxy_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET http://half.test/gated HTTP/1.1\r\nHost: half.test\r\n\r\n")
        .await
        .unwrap();
    if reset {
        tcp.set_zero_linger().unwrap();
    }
    // Only once the request is at the upstream does the app go away.
    tokio::time::timeout(Duration::from_secs(5), arrived.notified())
        .await
        .expect("the request reached the upstream");
    drop(tcp);
    gate.notify_one();
    // Connection 1 serves again once the proxy has read that answer out.
    // Cancelled mid-exchange, or dropped with its body unread, it would be
    // closed, and no later request would land on it. Two requests at once,
    // so a connection opened while 1 was still busy cannot hide it.
    let conn_of = |path: &'static str| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://half.test{path}"))
                .send()
                .await
                .ok()?;
            let conn = r.headers().get("x-conn")?.to_str().ok()?.to_owned();
            assert_eq!(r.bytes().await.ok()?.len(), 32768);
            Some(conn)
        }
    };
    eventually(Duration::from_secs(5), || async {
        let (a, b) = tokio::join!(conn_of("/full"), conn_of("/full"));
        (a.as_deref() == Some("1") || b.as_deref() == Some("1")).then_some(())
    })
    .await;
    app.shutdown().await;
}
