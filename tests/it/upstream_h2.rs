//! HTTP/2 on both sides of the proxy. Upstream: ALPN offers h2 and
//! http/1.1 (`upstream_protocol = "auto"`), or only the forced one; h2
//! streams multiplex over one pooled connection. App side: every listener
//! also speaks h2c with prior knowledge, with the same token injection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, BoxBody, Pki, TokenState, error_kind, json, proxied_client};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};

/// Records the ALPN list of every ClientHello, then serves one certificate.
#[derive(Debug)]
struct RecordingResolver {
    key: Arc<CertifiedKey>,
    offered: Arc<Mutex<Vec<Vec<String>>>>,
}

impl ResolvesServerCert for RecordingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello
            .alpn()
            .map(|a| a.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
            .unwrap_or_default();
        self.offered.lock().unwrap().push(offered);
        Some(Arc::clone(&self.key))
    }
}

/// Negotiated ALPN, HTTP version and `authorization` of one request.
type Seen = (Option<String>, http::Version, Option<String>);

#[derive(Default)]
struct H2State {
    /// TCP connections accepted.
    connections: AtomicUsize,
    /// ALPN lists the proxy offered, one per handshake.
    offered: Arc<Mutex<Vec<Vec<String>>>>,
    /// (negotiated ALPN, HTTP version, authorization) per request.
    requests: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A TLS upstream for `localhost` whose ALPN list is `alpn`, serving
/// HTTP/1.1 and HTTP/2 (whichever the connection speaks). `/slow` waits
/// 300 ms so that concurrent requests overlap.
async fn upstream(pki: &Pki, alpn: &[&str], tokens: Arc<TokenState>) -> (SocketAddr, Arc<H2State>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = pki.leaf_pem(&["localhost"]);
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let certified = Arc::new(CertifiedKey::from_der(certs, key, &provider).unwrap());
    let state = Arc::new(H2State::default());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(RecordingResolver {
            key: certified,
            offered: Arc::clone(&state.offered),
        }));
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            s.connections.fetch_add(1, Ordering::SeqCst);
            let (acceptor, s, tokens) = (acceptor.clone(), Arc::clone(&s), Arc::clone(&tokens));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (s, tokens, alpn) = (Arc::clone(&s), Arc::clone(&tokens), alpn.clone());
                    async move { Ok::<_, Infallible>(handle(s, tokens, alpn, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

async fn handle(
    s: Arc<H2State>,
    tokens: Arc<TokenState>,
    alpn: Option<String>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    s.requests
        .lock()
        .unwrap()
        .push((alpn.clone(), req.version(), authorization.clone()));
    let valid = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| tokens.valid(t));
    if !valid {
        return json(401, r#"{"error":"invalid_token"}"#);
    }
    if req.uri().path() == "/slow" {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
    json(
        200,
        &serde_json::json!({
            "version": format!("{:?}", req.version()),
            "alpn": alpn,
        })
        .to_string(),
    )
}

struct World {
    pki: Pki,
    tokens: support::TokenServer,
    dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        let pki = Pki::new();
        let tokens = support::TokenServer::start(&pki, support::Mode::Issue(300.0)).await;
        let dir = tempfile::tempdir().unwrap();
        pki.write_ca(dir.path());
        std::fs::write(dir.path().join("secret"), "s\n").unwrap();
        Self { pki, tokens, dir }
    }

    async fn upstream(&self, alpn: &[&str]) -> (SocketAddr, Arc<H2State>) {
        upstream(&self.pki, alpn, Arc::clone(&self.tokens.state)).await
    }

    /// Starts the proxy with `routes`: (host, upstream address, protocol).
    async fn start(&self, routes: &[(&str, SocketAddr, &str)]) -> token_injector::Running {
        let mut text = format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
drain_timeout = "1s"

[admin]
listen = "127.0.0.1:0"

[upstream]
connect_timeout = "2s"
tls_timeout = "2s"
response_timeout = "5s"

[profiles.main]
token_url = "{}"
client_id = "svc"
client_secret_file = "secret"
ca_file = "ca.pem"
"#,
            self.tokens.url()
        );
        for (host, addr, protocol) in routes {
            text.push_str(&format!(
                "\n[[routes]]\nhost = \"{host}\"\nupstream = \"https://localhost:{}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\nupstream_protocol = \"{protocol}\"\nlisten = \"127.0.0.1:0\"\n",
                addr.port()
            ));
        }
        let config = token_injector::config::from_text(&text, self.dir.path(), Vec::new())
            .unwrap_or_else(|e| panic!("{e}"));
        token_injector::start(config).await.unwrap()
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "{url}: {:?}", error_kind(&r));
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn auto_offers_h2_and_http1_and_uses_what_the_upstream_picks() {
    let w = World::new().await;
    let (both, both_state) = w.upstream(&["h2", "http/1.1"]).await;
    let (h1, h1_state) = w.upstream(&["http/1.1"]).await;
    let running = w
        .start(&[("both.test", both, "auto"), ("h1.test", h1, "auto")])
        .await;
    let client = proxied_client(running.proxy_addr());
    let v = get_json(&client, "http://both.test/").await;
    assert_eq!(v["version"], "HTTP/2.0");
    assert_eq!(v["alpn"], "h2");
    let v = get_json(&client, "http://h1.test/").await;
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["alpn"], "http/1.1");
    for state in [&both_state, &h1_state] {
        assert_eq!(
            *state.offered.lock().unwrap(),
            vec![vec!["h2".to_owned(), "http/1.1".to_owned()]]
        );
    }
    running.shutdown().await;
}

#[tokio::test]
async fn a_route_can_force_http1_or_http2() {
    let w = World::new().await;
    let (a, a_state) = w.upstream(&["h2", "http/1.1"]).await;
    let (b, b_state) = w.upstream(&["h2", "http/1.1"]).await;
    let (h1_only, h1_only_state) = w.upstream(&["http/1.1"]).await;
    let running = w
        .start(&[
            ("one.test", a, "http1"),
            ("two.test", b, "http2"),
            ("mismatch.test", h1_only, "http2"),
        ])
        .await;
    let client = proxied_client(running.proxy_addr());
    let v = get_json(&client, "http://one.test/").await;
    assert_eq!(
        (v["version"].as_str(), v["alpn"].as_str()),
        (Some("HTTP/1.1"), Some("http/1.1"))
    );
    assert_eq!(
        *a_state.offered.lock().unwrap(),
        vec![vec!["http/1.1".to_owned()]]
    );
    let v = get_json(&client, "http://two.test/").await;
    assert_eq!(
        (v["version"].as_str(), v["alpn"].as_str()),
        (Some("HTTP/2.0"), Some("h2"))
    );
    assert_eq!(
        *b_state.offered.lock().unwrap(),
        vec![vec!["h2".to_owned()]]
    );

    // Forcing h2 against an upstream that only speaks HTTP/1.1 fails the
    // handshake: a clear 502, not a hang or a downgrade.
    let started = Instant::now();
    let r = client.get("http://mismatch.test/").send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
    assert!(started.elapsed() < Duration::from_secs(2));
    let body = r.text().await.unwrap();
    eprintln!("h2 forced against an HTTP/1.1-only upstream: {body}");
    assert!(h1_only_state.requests.lock().unwrap().is_empty());
    running.shutdown().await;
}

async fn concurrent(client: &reqwest::Client, url: &str, n: usize) -> Duration {
    let started = Instant::now();
    let calls = (0..n).map(|_| {
        let client = client.clone();
        let url = url.to_owned();
        tokio::spawn(async move { get_json(&client, &url).await })
    });
    for v in futures_util::future::join_all(calls).await {
        assert_eq!(v.unwrap()["version"], "HTTP/2.0");
    }
    started.elapsed()
}

#[tokio::test]
async fn concurrent_requests_share_one_h2_upstream_connection() {
    const N: usize = 32;
    let w = World::new().await;
    let (forced, forced_state) = w.upstream(&["h2", "http/1.1"]).await;
    let (auto, auto_state) = w.upstream(&["h2", "http/1.1"]).await;
    let (cold, cold_state) = w.upstream(&["h2", "http/1.1"]).await;
    let running = w
        .start(&[
            ("forced.test", forced, "http2"),
            ("auto.test", auto, "auto"),
            ("cold.test", cold, "auto"),
        ])
        .await;
    let client = proxied_client(running.proxy_addr());
    // Token first, so the burst does not also measure the token fetch.
    running
        .store("main")
        .unwrap()
        .get(Duration::from_secs(5))
        .await
        .unwrap();

    // Forced h2, cold: the pool lets one connection be made and the rest
    // of the burst waits for it.
    let took = concurrent(&client, "http://forced.test/slow", N).await;
    let conns = forced_state.connections.load(Ordering::SeqCst);
    let overlap = forced_state.max_in_flight.load(Ordering::SeqCst);
    eprintln!(
        "forced h2: {N} requests of 300 ms in {took:?} over {conns} connection(s), {overlap} at once"
    );
    assert_eq!(conns, 1);
    // The streams ran at once (the upstream counts them in flight): a
    // wall-clock bound would say the same, less reliably on a busy machine.
    assert!(overlap >= N / 2, "streams overlapped: {overlap}");

    // auto: once the pool holds the h2 connection, a burst reuses it.
    get_json(&client, "http://auto.test/").await;
    let took = concurrent(&client, "http://auto.test/slow", N).await;
    let conns = auto_state.connections.load(Ordering::SeqCst);
    let overlap = auto_state.max_in_flight.load(Ordering::SeqCst);
    eprintln!(
        "auto (h2 by ALPN): {N} requests in {took:?} over {conns} connection(s), {overlap} at once"
    );
    assert_eq!(conns, 1);
    assert!(overlap >= N / 2, "streams overlapped: {overlap}");

    // auto, cold: each request of the burst may start a connection before
    // ALPN says h2; hyper-util keeps one and the burst still succeeds.
    let took = concurrent(&client, "http://cold.test/slow", N).await;
    let conns = cold_state.connections.load(Ordering::SeqCst);
    eprintln!("auto, cold burst: {N} requests in {took:?} over {conns} connection(s)");
    assert!((1..=N).contains(&conns));
    running.shutdown().await;
}

/// An h2c (prior knowledge) connection from the app to a proxy listener.
async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn h2c_from_the_app_gets_the_same_token_as_http1() {
    let w = World::new().await;
    let (addr, state) = w.upstream(&["http/1.1"]).await;
    let running = w.start(&[("api.test", addr, "auto")]).await;
    let http1 = proxied_client(running.proxy_addr());
    get_json(&http1, "http://api.test/h1").await;

    // Dedicated listener, origin-form request.
    let mut dedicated = h2c(running.route_addr("api.test").unwrap()).await;
    let req = Request::get(format!(
        "http://{}/dedicated",
        running.route_addr("api.test").unwrap()
    ))
    .header("authorization", "Bearer from-the-app")
    .body(Empty::new())
    .unwrap();
    let r = dedicated.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("HTTP/1.1"));

    // Forward listener: the :authority picks the route.
    let mut forward = h2c(running.proxy_addr()).await;
    for path in ["/forward-1", "/forward-2"] {
        let req = Request::get(format!("http://api.test{path}"))
            .body(Empty::new())
            .unwrap();
        let r = forward.send_request(req).await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.headers());
    }
    let req = Request::get("http://unrouted.test/")
        .body(Empty::new())
        .unwrap();
    let r = forward.send_request(req).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-token-injector-error"], "no_route");

    let seen = state.requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    let tokens: Vec<&str> = seen.iter().map(|(_, _, a)| a.as_deref().unwrap()).collect();
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    assert!(
        w.tokens
            .state
            .valid(tokens[0].strip_prefix("Bearer ").unwrap())
    );
    running.shutdown().await;
}
