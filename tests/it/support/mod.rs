//! End-to-end test fixtures: a per-run CA (rcgen), a TLS token endpoint
//! that counts requests and can fail in every way, a TLS upstream that
//! checks the bearer token against what the endpoint issued, and helpers to
//! start the proxy in-process on 127.0.0.1.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod dpop_server;
pub mod google;
pub mod google_sts;
pub mod oidc;
// Only the fleet tests (tests/fleet, tests/bin/fleet.rs) start Redis.
#[allow(dead_code)]
pub mod redis;
pub mod reload;

pub type BoxBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A certificate authority made for this test run: the demo's own
/// (`token_injector::demo::pki::Ca`), so fixtures and demo share one PKI.
pub struct Pki {
    ca: token_injector::demo::pki::Ca,
    pub ca_pem: String,
}

impl Pki {
    pub fn new() -> Self {
        let ca = token_injector::demo::pki::Ca::new("token-injector test CA").unwrap();
        let ca_pem = ca.pem().to_owned();
        Self { ca, ca_pem }
    }

    /// A server config for `localhost` that requires a client certificate
    /// issued by this CA (no ALPN set).
    pub fn mtls_server_config(&self) -> rustls::ServerConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key) = self.leaf_pem(&["localhost"]);
        let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap()
    }

    /// A server config with a leaf for `names`, offering HTTP/1.1.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        self.ca.server_config(names, &[b"http/1.1"]).unwrap()
    }

    /// A leaf certificate and its PKCS#8 key, both PEM, for `names`.
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let leaf = self.ca.leaf(names).unwrap();
        (leaf.cert_pem, leaf.key_pem)
    }

    pub fn write_ca(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

/// Serves `handler` on 127.0.0.1 over TLS (or plain when `tls` is None).
pub async fn serve<F, Fut>(tls: Option<Arc<rustls::ServerConfig>>, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            });
        }
    });
    addr
}

/// How the fake token endpoint answers.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Issue tokens of this lifetime (seconds, may be fractional).
    Issue(f64),
    /// Answer this status with an OAuth error body.
    Fail(u16),
    /// Never answer.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
    /// Like a caching server: hand back the last token while it is valid,
    /// each time with the full `expires_in` again.
    Cached(f64),
}

#[derive(Default)]
pub struct TokenState {
    pub requests: AtomicUsize,
    pub counter: Mutex<Option<watch::Sender<usize>>>,
    pub mode: Mutex<Option<Mode>>,
    /// Delay before answering (cold-start and renewal-waiting tests).
    pub delay: Mutex<Duration>,
    /// token → when it expires.
    pub issued: Mutex<HashMap<String, Instant>>,
    pub last_authorization: Mutex<Option<String>>,
    /// The `x-client` header of the last token request (token_headers).
    pub last_x_client: Mutex<Option<String>>,
    pub last_form: Mutex<Vec<(String, String)>>,
}

impl TokenState {
    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = Some(m);
    }
    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    /// Whether `token` was issued here and is not expired now.
    pub fn valid(&self, token: &str) -> bool {
        self.issued
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|exp| Instant::now() < *exp)
    }
    pub fn was_issued(&self, token: &str) -> bool {
        self.issued.lock().unwrap().contains_key(token)
    }
    /// Waits until at least `n` token requests have arrived.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) {
        let mut rx = self.counter.lock().unwrap().as_ref().unwrap().subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("token endpoint did not see {n} requests within {within:?}"))
            .unwrap();
    }
}

pub struct TokenServer {
    pub addr: SocketAddr,
    pub state: Arc<TokenState>,
}

impl TokenServer {
    pub async fn start(pki: &Pki, mode: Mode) -> Self {
        let state = Arc::new(TokenState::default());
        *state.counter.lock().unwrap() = Some(watch::Sender::new(0));
        state.set_mode(mode);
        let s = Arc::clone(&state);
        let addr = serve(Some(pki.server_config(&["localhost"])), move |req| {
            let s = Arc::clone(&s);
            async move { token_handler(s, req).await }
        })
        .await;
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}/oauth2/token", self.addr.port())
    }
}

async fn token_handler(s: Arc<TokenState>, req: Request<Incoming>) -> Response<BoxBody> {
    // A request with a DPoP proof gets a DPoP token (the proof itself is
    // checked by the servers in dpop.rs and support/dpop_server.rs).
    let token_type = if req.headers().contains_key("dpop") {
        "DPoP"
    } else {
        "Bearer"
    };
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    *s.last_x_client.lock().unwrap() = req
        .headers()
        .get("x-client")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    // A token exchange is answered with its issued_token_type (RFC 8693).
    let issued_type = if form
        .iter()
        .any(|(k, v)| k == "grant_type" && v.ends_with(":token-exchange"))
    {
        r#","issued_token_type":"urn:ietf:params:oauth:token-type:access_token""#
    } else {
        ""
    };
    *s.last_authorization.lock().unwrap() = auth;
    *s.last_form.lock().unwrap() = form;
    let n = s.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let delay = *s.delay.lock().unwrap();
    let mode = s.mode.lock().unwrap().clone().unwrap();
    if let Some(tx) = s.counter.lock().unwrap().as_ref() {
        tx.send_replace(n);
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match mode {
        Mode::Issue(lifetime) => {
            let token = format!("tok-{n}-{:016x}", fastrand::u64(..));
            s.issued.lock().unwrap().insert(
                token.clone(),
                Instant::now() + Duration::from_secs_f64(lifetime),
            );
            json(
                200,
                &format!(
                    r#"{{"access_token":"{token}","token_type":"{token_type}","expires_in":{lifetime}{issued_type}}}"#
                ),
            )
        }
        Mode::Fail(status) => json(
            status,
            r#"{"error":"server_error","error_description":"down for test"}"#,
        ),
        Mode::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Mode::Garbage => json(200, "<html>not json</html>"),
        Mode::Cached(lifetime) => {
            let now = Instant::now();
            let mut issued = s.issued.lock().unwrap();
            let live = issued
                .iter()
                .filter(|(_, exp)| now < **exp)
                .max_by_key(|(_, exp)| **exp)
                .map(|(t, _)| t.clone());
            let token = live.unwrap_or_else(|| {
                let t = format!("tok-{n}-{:016x}", fastrand::u64(..));
                issued.insert(t.clone(), now + Duration::from_secs_f64(lifetime));
                t
            });
            json(
                200,
                &format!(
                    r#"{{"access_token":"{token}","token_type":"{token_type}","expires_in":{lifetime}{issued_type}}}"#
                ),
            )
        }
    }
}

pub fn json(status: u16, body: &str) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap()
}

/// `n` random alphanumeric characters (made-up tokens).
pub fn random(n: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(n)
        .collect()
}

/// A request's whole body (empty if it could not be read).
pub async fn read_body(body: Incoming) -> Bytes {
    body.collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// A header's value as text (`?` if it is not).
pub fn header_of(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| v.to_str().unwrap_or("?").to_owned())
}

/// Waits until `done` holds for what `received` holds, re-checking at each
/// new `count`; panics after `within` with what arrived, naming the fake
/// (`name`).
pub async fn wait_on<T: std::fmt::Debug>(
    name: &str,
    count: &watch::Sender<usize>,
    received: &Mutex<Vec<T>>,
    within: Duration,
    what: &str,
    done: impl Fn(&[T]) -> bool,
) {
    let mut rx = count.subscribe();
    let waited =
        tokio::time::timeout(within, rx.wait_for(|_| done(&received.lock().unwrap()))).await;
    if waited.is_err() {
        panic!(
            "{name}: {what}: not within {within:?}; received:\n{:#?}",
            received.lock().unwrap()
        );
    }
}

/// Writes `text` to `path` the way a rotation (a kubelet, a Secret update)
/// lands: a new file (`path` + `.tmp`) renamed over the old one, so a
/// reader never sees half of it.
pub fn write_atomically(path: &std::path::Path, text: &str) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// What the upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub authorization: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

#[derive(Default)]
pub struct UpstreamState {
    pub seen: Mutex<Vec<Seen>>,
    /// Answer 401 to this many of the next requests, whatever the token.
    pub force_401: AtomicUsize,
    /// Seen tokens that were not (or no longer) valid.
    pub rejected: AtomicUsize,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
}

impl Upstream {
    /// A TLS upstream for `localhost` that checks bearer tokens against
    /// `tokens`. Paths: `/slow?ms=N` waits; `/bytes?n=N` streams N bytes;
    /// everything else echoes what it saw as JSON. Request bodies are
    /// counted while streaming, never held.
    pub async fn start(pki: &Pki, tokens: Arc<TokenState>) -> Self {
        let state = Arc::new(UpstreamState::default());
        let s = Arc::clone(&state);
        let addr = serve(Some(pki.server_config(&["localhost"])), move |req| {
            let s = Arc::clone(&s);
            let tokens = Arc::clone(&tokens);
            async move { upstream_handler(s, tokens, req).await }
        })
        .await;
        Self { addr, state }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn upstream_handler(
    s: Arc<UpstreamState>,
    tokens: Arc<TokenState>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_len += f.data_ref().map(|d| d.len()).unwrap_or(0),
            Err(_) => break,
        }
    }
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .map(|v| v.to_str().unwrap_or("?").to_owned())
    };
    let authorization = header("authorization");
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        host: header("host"),
        authorization: authorization.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect(),
        body_len,
    };
    s.seen.lock().unwrap().push(seen.clone());
    let token = authorization.as_deref().and_then(|a| {
        a.strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("DPoP "))
    });
    let valid = token.is_some_and(|t| tokens.valid(t));
    if !valid {
        s.rejected.fetch_add(1, Ordering::SeqCst);
    }
    let forced = s
        .force_401
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if !valid || forced {
        return json(401, r#"{"error":"invalid_token"}"#);
    }
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let path = parts.uri.path();
    if path.starts_with("/slow") {
        let ms: u64 = query.get("ms").and_then(|v| v.parse().ok()).unwrap_or(500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if path.starts_with("/bytes") {
        let n: u64 = query.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
        return Response::new(stream_bytes(n));
    }
    if path.starts_with("/redirect") {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header("location", "https://elsewhere.test/")
            .body(full(""))
            .unwrap();
    }
    let echo = serde_json::json!({
        "method": seen.method,
        "path": seen.path,
        "host": seen.host,
        "body_len": body_len,
    });
    json(200, &echo.to_string())
}

/// A body of `n` zero bytes in 64 KiB chunks, produced as it is read.
pub fn stream_bytes(n: u64) -> BoxBody {
    let chunk = Bytes::from(vec![0u8; 64 * 1024]);
    let stream = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(chunk.len() as u64) as usize;
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                    chunk.slice(..take),
                )),
                left - take as u64,
            ))
        }
    });
    http_body_util::StreamBody::new(stream).boxed()
}

/// A plain-HTTP server that records every request (the "other host").
pub async fn recorder() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let addr = serve(None, move |req: Request<Incoming>| {
        let s = Arc::clone(&s);
        async move {
            s.lock().unwrap().push(Seen {
                method: req.method().to_string(),
                path: req.uri().to_string(),
                host: req
                    .headers()
                    .get("host")
                    .map(|v| v.to_str().unwrap().to_owned()),
                authorization: req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned()),
                headers: vec![],
                body_len: 0,
            });
            json(200, r#"{"other":true}"#)
        }
    })
    .await;
    (addr, seen)
}

/// One test's world: CA, token endpoint, upstream, a temp dir with the
/// secret and CA files.
pub struct World {
    pub pki: Pki,
    pub tokens: TokenServer,
    pub upstream: Upstream,
    pub dir: tempfile::TempDir,
}

pub const SECRET: &str = "s3cr:et+/%& x";
pub const CLIENT_ID: &str = "billing svc";

impl World {
    pub async fn new(mode: Mode) -> Self {
        let pki = Pki::new();
        let tokens = TokenServer::start(&pki, mode).await;
        let upstream = Upstream::start(&pki, Arc::clone(&tokens.state)).await;
        let dir = tempfile::tempdir().unwrap();
        pki.write_ca(dir.path());
        std::fs::write(dir.path().join("client-secret"), format!("{SECRET}\n")).unwrap();
        Self {
            pki,
            tokens,
            upstream,
            dir,
        }
    }

    pub fn upstream_url(&self) -> String {
        format!("https://localhost:{}", self.upstream.addr.port())
    }

    /// A config with profile `main` and route `api.test` → the upstream,
    /// fast retry timings, plus `extra` TOML appended (more routes, tables).
    pub fn config(&self, route_extra: &str, extra: &str) -> String {
        format!(
            r#"{sections}
[profiles.main]
token_url = "{token_url}"
client_id = "{CLIENT_ID}"
client_secret_file = "client-secret"
ca_file = "ca.pem"
scopes = ["read", "write"]

[[routes]]
host = "api.test"
upstream = "{upstream}"
profile = "main"
ca_file = "ca.pem"
{route_extra}

{extra}
"#,
            sections = test_sections("5s"),
            token_url = self.tokens.url(),
            upstream = self.upstream_url(),
        )
    }

    pub async fn start(&self, text: &str) -> token_injector::Running {
        let config = token_injector::config::from_text(
            text,
            self.dir.path(),
            Vec::<(String, String)>::new(),
        )
        .unwrap_or_else(|e| panic!("config invalid:\n{e}"));
        token_injector::start(config).await.unwrap()
    }
}

/// The test clients speak plain HTTP, but reqwest wants a TLS provider.
fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client that uses the proxy as `HTTP_PROXY`, as apps do.
pub fn proxied_client(proxy: SocketAddr) -> reqwest::Client {
    install_provider();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}")).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A client that talks to an address directly.
pub fn direct_client() -> reqwest::Client {
    install_provider();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub fn error_kind(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("x-token-injector-error")
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Decodes `Basic` credentials into (id, secret), form-decoding each part.
pub fn decode_basic(header: &str) -> (String, String) {
    let b64 = header.strip_prefix("Basic ").expect("Basic credentials");
    let raw = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap();
    let (id, secret) = raw.split_once(':').unwrap();
    let dec = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned()
    };
    (dec(id), dec(secret))
}

/// Polls `check` until it returns Some, at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// base64url(SHA-256(DER)) of a certificate: its RFC 8705 thumbprint,
/// computed here independently of the proxy's own helper.
pub fn x5t_der(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// The admin listener's `/metrics` text.
pub async fn scrape(admin: SocketAddr) -> String {
    direct_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first line of `text` that starts with `series` (a
/// metric name with its labels as rendered).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The `[proxy]`, `[admin]`, `[tokens]` and `[upstream]` tables of a test
/// config: loopback listeners on free ports, this drain bound, fast token
/// retries and short upstream bounds. Profiles and routes follow. Tests edit
/// the text by its lines (`drain_timeout = "5s"`, `response_timeout = "5s"`).
pub fn test_sections(drain_timeout: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
drain_timeout = "{drain_timeout}"

[admin]
listen = "127.0.0.1:0"

[tokens]
request_timeout = "2s"
retry_initial = "50ms"
retry_max = "200ms"
unauthorized_refresh_interval = "1s"

[upstream]
connect_timeout = "2s"
response_timeout = "5s"
"#
    )
}

/// Loads `text` (relative paths from `dir`) and starts the proxy.
pub async fn start_in(dir: &std::path::Path, text: &str) -> token_injector::Running {
    let config = token_injector::config::from_text(text, dir, Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    token_injector::start(config).await.unwrap()
}
