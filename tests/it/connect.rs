//! CONNECT tunnels end to end: refused by default with an explanation,
//! allowed destinations tunnelled untouched (a real TLS handshake with the
//! destination through the proxy, no token added), hosts with a route
//! refused unless the route allows it, counted in /metrics, failures named,
//! and open tunnels kept past the proxy's connection timers but closed by a
//! shutdown within the drain bound.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, Mode, Pki, World};

/// What a TLS destination saw: (path, Authorization header).
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A TLS server for `localhost` on 127.0.0.1 that answers `inside <path>`.
async fn destination(pki: &Pki) -> (SocketAddr, Log) {
    let log: Log = Arc::default();
    let l = Arc::clone(&log);
    let addr = support::serve(
        Some(pki.server_config(&["localhost"])),
        move |req: Request<Incoming>| {
            let l = Arc::clone(&l);
            async move {
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned());
                let path = req.uri().path().to_owned();
                l.lock().unwrap().push((path.clone(), auth));
                Response::new(support::full(format!("inside {path}")))
            }
        },
    )
    .await;
    (addr, log)
}

/// The world's config with `[proxy]` keys added.
fn config(world: &World, proxy_keys: &str, route_extra: &str, extra: &str) -> String {
    world.config(route_extra, extra).replacen(
        "drain_timeout = \"5s\"\n",
        &format!("drain_timeout = \"5s\"\n{proxy_keys}\n"),
        1,
    )
}

/// The head and body of the proxy's answer to a CONNECT.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `CONNECT target` on `stream` and reads the answer: the head byte
/// by byte (what follows a 200 belongs to the tunnel), then a body of
/// `Content-Length`.
async fn connect_on(stream: &mut TcpStream, target: &str) -> Answer {
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("CONNECT answer within 10 s")
            .unwrap();
        assert_eq!(n, 1, "connection closed in the head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut answer = Answer {
        status,
        headers,
        body: String::new(),
    };
    if let Some(len) = answer.header("content-length") {
        let mut body = vec![0u8; len.parse().unwrap()];
        stream.read_exact(&mut body).await.unwrap();
        answer.body = String::from_utf8(body).unwrap();
    }
    answer
}

async fn connect(proxy: SocketAddr, target: &str) -> (Answer, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let answer = connect_on(&mut stream, target).await;
    (answer, stream)
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/1.1 client over TLS to `localhost`, inside an open tunnel, and
/// the task driving its connection (it ends when the tunnel closes).
async fn tls_client<IO>(pki: &Pki, tunnel: IO) -> (Sender, tokio::task::JoinHandle<()>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tunnel)
        .await
        .expect("TLS handshake with the destination through the tunnel");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

/// A proxy that allows `CONNECT` to `localhost:<dest's port>`, with more
/// `[proxy]` keys.
async fn proxy_allowing(
    world: &World,
    dest: SocketAddr,
    proxy_keys: &str,
) -> token_injector::Running {
    let keys = format!(
        "connect_allow = [\"localhost:{}\"]\n{proxy_keys}",
        dest.port()
    );
    world.start(&config(world, &keys, "", "")).await
}

/// A tunnel to `dest` through `proxy`, and an HTTPS client inside it.
async fn tunnel_client(
    world: &World,
    proxy: &token_injector::Running,
    dest: SocketAddr,
) -> (Sender, tokio::task::JoinHandle<()>) {
    let (answer, tunnel) = connect(proxy.proxy_addr(), &format!("localhost:{}", dest.port())).await;
    assert_eq!(answer.status, 200);
    tls_client(&world.pki, tunnel).await
}

async fn get(sender: &mut Sender, path: &str) -> String {
    let req = Request::builder()
        .uri(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

async fn metrics(admin: SocketAddr) -> String {
    support::scrape(admin).await
}

fn metric(text: &str, series: &str) -> Option<f64> {
    support::metric_value(text, series)
}

#[tokio::test]
async fn connect_is_refused_by_default_and_the_connection_stays_usable() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, log) = destination(&world.pki).await;
    let proxy = world.start(&world.config("", "")).await;
    let target = format!("localhost:{}", dest.port());
    let (answer, mut stream) = connect(proxy.proxy_addr(), &target).await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.header("x-token-injector-error"), Some("no_route"));
    assert!(
        answer
            .body
            .contains("token injection needs plain HTTP to the proxy")
            && answer.body.contains("proxy.connect_allow"),
        "{}",
        answer.body
    );
    // Still an HTTP connection: a routed request on it gets its token.
    stream
        .write_all(b"GET http://api.test/after HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        log.lock().unwrap().is_empty(),
        "the destination was reached"
    );
    let m = metrics(proxy.admin_addr()).await;
    assert_eq!(
        metric(
            &m,
            "token_injector_connect_tunnels_total{result=\"refused\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "token_injector_connect_tunnels_total{result=\"allowed\"}"
        ),
        Some(0.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_allowed_destination_is_tunnelled_untouched() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, log) = destination(&world.pki).await;
    let port = dest.port();
    let text = config(
        &world,
        &format!("connect_allow = [\"localhost:{port}\"]"),
        "",
        "",
    );
    let proxy = world.start(&text).await;

    // As an app does it: reqwest with HTTPS_PROXY, TLS to the destination.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(format!("http://{}", proxy.proxy_addr())).unwrap())
        .tls_certs_only([reqwest::Certificate::from_pem(world.pki.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    for i in 0..3 {
        let r = app
            .get(format!("https://localhost:{port}/app/{i}"))
            .header("authorization", "Bearer the-apps-own")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), format!("inside /app/{i}"));
    }

    // By hand, with the host spelled in upper case and a trailing dot:
    // normalised like route hosts; the destination's certificate is checked.
    let (answer, tunnel) = connect(proxy.proxy_addr(), &format!("LocalHost.:{port}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.header("content-length"), None);
    let (mut sender, _conn) = tls_client(&world.pki, tunnel).await;
    assert_eq!(get(&mut sender, "/manual/1").await, "inside /manual/1");
    assert_eq!(get(&mut sender, "/manual/2").await, "inside /manual/2");

    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    // The proxy cannot see inside: the app's header went through as sent,
    // and no request got a token.
    assert_eq!(seen[0].1.as_deref(), Some("Bearer the-apps-own"));
    assert!(seen[3..].iter().all(|(_, auth)| auth.is_none()), "{seen:?}");
    assert_eq!(world.upstream.seen().len(), 0);
    // Open tunnels would hold the shutdown for the drain time.
    drop((app, sender));
    proxy.shutdown().await;
}

#[tokio::test]
async fn wildcard_entries_allow_subdomains_on_their_port_only() {
    let world = World::new(Mode::Issue(300.0)).await;
    // `.invalid` never resolves (RFC 6761): an allowed target fails to
    // connect (502/504), a refused one never tries (403).
    let text = config(&world, "connect_allow = [\"*.tunnel.invalid:443\"]", "", "");
    let proxy = world.start(&text).await;
    for (target, allowed) in [
        ("a.tunnel.invalid:443", true),
        ("A.B.Tunnel.Invalid.:443", true),
        ("tunnel.invalid:443", false),
        ("a.tunnel.invalid:8443", false),
        ("a.xtunnel.invalid:443", false),
    ] {
        let (answer, _) = connect(proxy.proxy_addr(), target).await;
        println!(
            "CONNECT {target}: {} {:?}",
            answer.status,
            answer.header("x-token-injector-error")
        );
        if allowed {
            assert!(
                matches!(
                    (answer.status, answer.header("x-token-injector-error")),
                    (502, Some("upstream_unreachable")) | (504, Some("upstream_timeout"))
                ),
                "{target}: {} {:?} {}",
                answer.status,
                answer.headers,
                answer.body
            );
        } else {
            assert_eq!(answer.status, 403, "{target}: {}", answer.body);
            assert_eq!(answer.header("x-token-injector-error"), Some("no_route"));
        }
    }
    let m = metrics(proxy.admin_addr()).await;
    assert_eq!(
        metric(
            &m,
            "token_injector_connect_tunnels_total{result=\"failed\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "token_injector_connect_tunnels_total{result=\"refused\"}"
        ),
        Some(3.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_host_with_a_route_is_tunnelled_only_if_the_route_allows_it() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, log) = destination(&world.pki).await;
    let port = dest.port();
    let route = |allow: bool| {
        format!(
            "[[routes]]\nhost = \"localhost\"\nupstream = \"{}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\nallow_connect = {allow}\n",
            world.upstream_url()
        )
    };
    let allow = format!("connect_allow = [\"localhost:{port}\"]");

    let proxy = world
        .start(&config(&world, &allow, "", &route(false)))
        .await;
    let (answer, _) = connect(proxy.proxy_addr(), &format!("localhost:{port}")).await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.header("x-token-injector-error"), Some("no_route"));
    assert!(
        answer.body.contains("has a route") && answer.body.contains("allow_connect"),
        "{}",
        answer.body
    );
    proxy.shutdown().await;
    assert!(log.lock().unwrap().is_empty());

    let proxy = world.start(&config(&world, &allow, "", &route(true))).await;
    let (answer, tunnel) = connect(proxy.proxy_addr(), &format!("localhost:{port}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let (mut sender, _conn) = tls_client(&world.pki, tunnel).await;
    assert_eq!(get(&mut sender, "/allowed").await, "inside /allowed");
    assert_eq!(log.lock().unwrap()[0], ("/allowed".to_owned(), None));
    drop(sender);
    proxy.shutdown().await;
}

#[tokio::test]
async fn tunnels_are_counted_and_failures_named() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, _log) = destination(&world.pki).await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = config(
        &world,
        &format!(
            "connect_allow = [\"localhost:{}\", \"127.0.0.1:{closed}\"]",
            dest.port()
        ),
        "",
        "",
    );
    let proxy = world.start(&text).await;
    let admin = proxy.admin_addr();

    let (failed, _) = connect(proxy.proxy_addr(), &format!("127.0.0.1:{closed}")).await;
    assert_eq!(failed.status, 502);
    assert_eq!(
        failed.header("x-token-injector-error"),
        Some("upstream_unreachable")
    );
    assert!(
        failed
            .body
            .contains(&format!("cannot connect to 127.0.0.1:{closed}")),
        "{}",
        failed.body
    );
    let (refused, _) = connect(proxy.proxy_addr(), "elsewhere.test:443").await;
    assert_eq!(refused.status, 403);

    let (mut sender, conn) = tunnel_client(&world, &proxy, dest).await;
    assert_eq!(get(&mut sender, "/x").await, "inside /x");
    let m = metrics(admin).await;
    for (series, want) in [
        (
            "token_injector_connect_tunnels_total{result=\"allowed\"}",
            1.0,
        ),
        (
            "token_injector_connect_tunnels_total{result=\"refused\"}",
            1.0,
        ),
        (
            "token_injector_connect_tunnels_total{result=\"failed\"}",
            1.0,
        ),
        ("token_injector_tunnels_open{kind=\"connect\"}", 1.0),
        (
            "token_injector_requests_total{code=\"200\",route=\"-\"}",
            1.0,
        ),
        (
            "token_injector_requests_total{code=\"403\",route=\"-\"}",
            1.0,
        ),
        (
            "token_injector_requests_total{code=\"502\",route=\"-\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric(&m, series), Some(want), "{series}\n{m}");
    }
    // The open tunnel is still a client connection (the others closed).
    support::eventually(Duration::from_secs(10), || async {
        (metric(
            &metrics(admin).await,
            "token_injector_client_connections_open",
        ) == Some(1.0))
        .then_some(())
    })
    .await;
    // The app closes the tunnel: the gauges come down.
    drop(sender);
    conn.await.unwrap();
    support::eventually(Duration::from_secs(10), || async {
        let m = metrics(admin).await;
        (metric(&m, "token_injector_tunnels_open{kind=\"connect\"}") == Some(0.0)
            && metric(&m, "token_injector_client_connections_open") == Some(0.0))
        .then_some(())
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_open_tunnel_outlives_the_connection_timers() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, _log) = destination(&world.pki).await;
    let text = config(
        &world,
        &format!(
            "connect_allow = [\"localhost:{}\"]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"",
            dest.port()
        ),
        "",
        "",
    );
    let proxy = world.start(&text).await;

    // The timers are live: a silent plain connection is closed.
    let mut silent = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("a silent connection is closed by the header timer")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let cut_after = started.elapsed();
    println!("a silent plain connection was closed after {cut_after:?}");

    let (mut sender, _conn) = tunnel_client(&world, &proxy, dest).await;
    assert_eq!(get(&mut sender, "/first").await, "inside /first");
    // Silent for well past both bounds: the passing time is the test.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(get(&mut sender, "/second").await, "inside /second");
    assert!(
        cut_after < Duration::from_millis(1200),
        "control connection cut after {cut_after:?}"
    );
    drop(sender);
    proxy.shutdown().await;
}

/// A tunnel that carries bytes stays open; one where nothing moves either
/// way for `proxy.tunnel_idle_timeout` is closed, freeing its slot.
#[tokio::test]
async fn a_tunnel_silent_both_ways_is_closed_after_tunnel_idle_timeout() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, _log) = destination(&world.pki).await;
    let text = config(
        &world,
        &format!(
            "connect_allow = [\"localhost:{}\"]\ntunnel_idle_timeout = \"400ms\"",
            dest.port()
        ),
        "",
        "",
    );
    let proxy = world.start(&text).await;
    let (mut sender, conn) = tunnel_client(&world, &proxy, dest).await;
    // Busy for twice the bound: a request every 50 ms keeps it open (the
    // margin under the 400 ms bound absorbs a stall on a busy machine).
    let busy_until = Instant::now() + Duration::from_millis(800);
    let mut n = 0;
    let mut last_byte = Instant::now();
    while Instant::now() < busy_until {
        assert_eq!(
            get(&mut sender, &format!("/{n}")).await,
            format!("inside /{n}")
        );
        last_byte = Instant::now();
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then silent: the proxy closes the tunnel, which ends the TLS client.
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the silent tunnel is closed")
        .unwrap();
    let closed_after = last_byte.elapsed();
    println!("{n} requests over 800 ms kept it open; silent, it closed after {closed_after:?}");
    assert!(
        closed_after >= Duration::from_millis(390),
        "{closed_after:?}"
    );
    let text = metrics(proxy.admin_addr()).await;
    assert_eq!(
        metric(&text, "token_injector_tunnels_open{kind=\"connect\"}"),
        Some(0.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_open_tunnels_within_the_drain_bound() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, _log) = destination(&world.pki).await;
    let text = config(
        &world,
        &format!("connect_allow = [\"localhost:{}\"]", dest.port()),
        "",
        "",
    )
    .replace("drain_timeout = \"5s\"", "drain_timeout = \"400ms\"");
    let proxy = world.start(&text).await;
    let (mut sender, conn) = tunnel_client(&world, &proxy, dest).await;
    assert_eq!(get(&mut sender, "/before").await, "inside /before");

    let started = Instant::now();
    proxy.shutdown().await;
    let took = started.elapsed();
    println!("shutdown with an open tunnel took {took:?} (drain_timeout 400ms)");
    // The tunnel had the drain time to finish, then was closed.
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "shutdown took {took:?}"
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(closed.is_ok(), "the tunnel is still open after shutdown");
    assert!(sender.ready().await.is_err());
}

#[tokio::test]
async fn an_http2_connect_stream_is_a_tunnel_and_keeps_its_connection_busy() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, log) = destination(&world.pki).await;
    let text = config(
        &world,
        &format!(
            "connect_allow = [\"localhost:{}\"]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"",
            dest.port()
        ),
        "",
        "",
    );
    let proxy = world.start(&text).await;
    // h2c with prior knowledge: the CONNECT is one stream of the connection.
    let tcp = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let h2_conn = tokio::spawn(conn);
    let connect = Request::builder()
        .method("CONNECT")
        .uri(format!("localhost:{}", dest.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = h2.send_request(connect).await.unwrap();
    assert_eq!(response.status(), 200);
    let stream = hyper::upgrade::on(response).await.unwrap();
    let (mut sender, _conn) = tls_client(&world.pki, TokioIo::new(stream)).await;
    assert_eq!(get(&mut sender, "/h2/1").await, "inside /h2/1");
    // Quiet past both connection bounds: the open stream keeps it busy.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(get(&mut sender, "/h2/2").await, "inside /h2/2");
    assert!(log.lock().unwrap().iter().all(|(_, auth)| auth.is_none()));

    // Once the tunnel ends, the connection is idle and its timer applies.
    drop(sender);
    let closed = tokio::time::timeout(Duration::from_secs(5), h2_conn).await;
    assert!(closed.is_ok(), "the idle HTTP/2 connection was not closed");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reload_changes_the_policy_for_new_tunnels_and_keeps_open_ones() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, _log) = destination(&world.pki).await;
    let target = format!("localhost:{}", dest.port());
    let allowed = config(&world, &format!("connect_allow = [\"{target}\"]"), "", "");
    let proxy = world.start(&allowed).await;
    let (answer, tunnel) = connect(proxy.proxy_addr(), &target).await;
    assert_eq!(answer.status, 200);
    let (mut sender, _conn) = tls_client(&world.pki, tunnel).await;

    let load = |text: &str| {
        token_injector::config::from_text(text, world.dir.path(), Vec::<(String, String)>::new())
            .unwrap()
    };
    proxy.apply(load(&world.config("", ""))).unwrap();
    let (refused, _) = connect(proxy.proxy_addr(), &target).await;
    assert_eq!(refused.status, 403);
    // The tunnel opened before the reload carries on.
    assert_eq!(
        get(&mut sender, "/after-reload").await,
        "inside /after-reload"
    );

    proxy.apply(load(&allowed)).unwrap();
    let (answer, _) = connect(proxy.proxy_addr(), &target).await;
    assert_eq!(answer.status, 200);
    drop(sender);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_destination_that_never_accepts_is_a_504_within_connect_timeout() {
    let world = World::new(Mode::Issue(300.0)).await;
    // A listener whose accept queue is full: the next connect gets no answer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(0).unwrap();
    let port = full.local_addr().unwrap().port();
    let _queued = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let text = config(
        &world,
        &format!("connect_allow = [\"127.0.0.1:{port}\"]"),
        "",
        "",
    )
    .replace("connect_timeout = \"2s\"", "connect_timeout = \"300ms\"");
    let proxy = world.start(&text).await;
    let started = Instant::now();
    let (answer, _) = connect(proxy.proxy_addr(), &format!("127.0.0.1:{port}")).await;
    let took = started.elapsed();
    println!(
        "CONNECT to a full accept queue answered {} after {took:?}",
        answer.status
    );
    assert_eq!(answer.status, 504, "{}", answer.body);
    assert_eq!(
        answer.header("x-token-injector-error"),
        Some("upstream_timeout")
    );
    assert!(
        answer.body.contains("upstream.connect_timeout"),
        "{}",
        answer.body
    );
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let m = metrics(proxy.admin_addr()).await;
    assert_eq!(
        metric(
            &m,
            "token_injector_connect_tunnels_total{result=\"failed\"}"
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_open_tunnel_holds_its_connection_slot() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (dest, _log) = destination(&world.pki).await;
    let proxy = proxy_allowing(&world, dest, "max_connections = 1").await;
    let (mut sender, conn) = tunnel_client(&world, &proxy, dest).await;
    assert_eq!(get(&mut sender, "/held").await, "inside /held");

    // The tunnel is the one connection allowed: another is closed at once.
    let mut other = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), other.read(&mut buf))
        .await
        .expect("refused at once")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Closing the tunnel frees the slot.
    drop(sender);
    conn.await.unwrap();
    let admin = proxy.admin_addr();
    support::eventually(Duration::from_secs(10), || async {
        (metric(
            &metrics(admin).await,
            "token_injector_client_connections_open",
        ) == Some(0.0))
        .then_some(())
    })
    .await;
    let (answer, _) = connect(proxy.proxy_addr(), &format!("localhost:{}", dest.port())).await;
    assert_eq!(answer.status, 200);
    let m = metrics(admin).await;
    assert_eq!(
        metric(&m, "token_injector_client_connections_refused_total"),
        Some(1.0)
    );
    proxy.shutdown().await;
}
