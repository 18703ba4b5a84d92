//! gRPC end to end: a tonic client speaks h2c to the proxy (a route's
//! dedicated listener, or the forward listener with an authority override),
//! the proxy adds the token and forwards over TLS + h2 to an upstream that
//! frames gRPC by hand, so every header and trailer it sees or sends is
//! explicit. Unary, server-streaming and bidirectional calls; trailers
//! (`grpc-status`, `grpc-message`, custom ones) and `grpc-timeout` intact;
//! a 401 is passed on, counted, and not retried.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, BoxBody, Pki, TokenState};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

// ---- the client side: raw bytes through tonic, no protobuf ----

/// Messages are raw bytes; tonic does the gRPC framing.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/test.Echo/{method}").parse().unwrap()
}

async fn grpc_client(endpoint: Endpoint) -> tonic::client::Grpc<Channel> {
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

/// A unary call; like generated clients, waits for the channel first.
async fn unary(
    client: &mut tonic::client::Grpc<Channel>,
    req: tonic::Request<Bytes>,
    method: &str,
) -> Result<tonic::Response<Bytes>, Status> {
    client.ready().await.unwrap();
    client.unary(req, path(method), Raw).await
}

// ---- the upstream: gRPC framed by hand over TLS + h2 ----

/// What the upstream saw of one call.
#[derive(Clone, Debug)]
struct Call {
    path: String,
    version: http::Version,
    authorization: Option<String>,
    te: Option<String>,
    grpc_timeout: Option<String>,
    content_type: Option<String>,
    custom: Option<String>,
    /// base64url SHA-256 of the client certificate of the connection.
    client_x5t: Option<String>,
}

#[derive(Default)]
struct GrpcState {
    calls: Mutex<Vec<Call>>,
    force_401: AtomicUsize,
    /// Calls to refuse as a gRPC server does: HTTP 200, trailers-only,
    /// grpc-status 16 (UNAUTHENTICATED).
    force_unauthenticated: AtomicUsize,
    connections: AtomicUsize,
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// Splits complete length-prefixed messages off the front of `buf`.
fn messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

fn trailers(status: u32, message: Option<&str>, extra: &[(&'static str, &str)]) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    if let Some(m) = message {
        t.insert("grpc-message", HeaderValue::from_str(m).unwrap());
    }
    for (k, v) in extra {
        t.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    t
}

type Sender = mpsc::Sender<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>>;

/// A response whose frames the handler sends as it goes.
fn streamed() -> (Sender, Response<BoxBody>) {
    let (tx, rx) = mpsc::channel(16);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let body = http_body_util::StreamBody::new(stream).boxed();
    let response = Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap();
    (tx, response)
}

/// `grpc-timeout` per the gRPC HTTP/2 spec: digits and a unit.
fn parse_timeout(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

async fn handle(
    state: Arc<GrpcState>,
    tokens: Arc<TokenState>,
    client_x5t: Option<String>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .map(|v| v.to_str().unwrap_or("?").to_owned())
    };
    let call = Call {
        path: req.uri().path().to_owned(),
        version: req.version(),
        authorization: header("authorization"),
        te: header("te"),
        grpc_timeout: header("grpc-timeout"),
        content_type: header("content-type"),
        custom: header("x-custom-bin").or(header("x-custom")),
        client_x5t,
    };
    state.calls.lock().unwrap().push(call.clone());
    let token_ok = call
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| tokens.valid(t));
    let forced = state
        .force_401
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let unauthenticated = state
        .force_unauthenticated
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if unauthenticated {
        return Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "16")
            .header("grpc-message", "invalid token")
            .body(support::full(""))
            .unwrap();
    }
    if !token_ok || forced {
        // What an auth gateway in front of a gRPC service answers.
        return Response::builder()
            .status(401)
            .header("www-authenticate", "Bearer error=\"invalid_token\"")
            .body(support::full(""))
            .unwrap();
    }
    let deadline = call.grpc_timeout.as_deref().and_then(parse_timeout);
    let method = call.path.rsplit('/').next().unwrap_or("").to_owned();
    let (tx, response) = streamed();
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut requests = Vec::new();
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move { tx.send(Ok(Frame::data(frame(&b)))).await.is_ok() }
        };
        // Reads the request stream; a chat acknowledges each message as it
        // arrives, so both directions are open at once.
        while let Some(f) = body.frame().await {
            let Ok(f) = f else { return };
            if let Ok(data) = f.into_data() {
                buf.extend_from_slice(&data);
            }
            for m in messages(&mut buf) {
                if method == "Chat" {
                    let mut ack = b"ack:".to_vec();
                    ack.extend_from_slice(&m);
                    if !send(ack.into()).await {
                        return;
                    }
                }
                requests.push(m);
            }
        }
        let end = |t: HeaderMap| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Ok(Frame::trailers(t))).await;
            }
        };
        match method.as_str() {
            "Unary" => {
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(requests.first().map(|b| &b[..]).unwrap_or(b""));
                send(out.into()).await;
                end(trailers(0, None, &[("x-served-by", "upstream")])).await;
            }
            "Count" => {
                let n: usize = requests
                    .first()
                    .and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
                    .unwrap_or(0);
                for i in 0..n {
                    send(format!("item-{i}").into()).await;
                }
                end(trailers(0, None, &[("x-count", &n.to_string())])).await;
            }
            "Chat" => {
                let n = requests.len().to_string();
                end(trailers(0, None, &[("x-chat-messages", &n)])).await;
            }
            "Fail" => {
                send(Bytes::from_static(b"partial")).await;
                end(trailers(5, Some("no such thing: caf%C3%A9"), &[])).await;
            }
            "Slow" => {
                // Honours the caller's deadline as a gRPC server does.
                let wait = deadline.unwrap_or(Duration::from_secs(10));
                tokio::time::sleep(wait.min(Duration::from_secs(10))).await;
                end(trailers(4, Some("deadline exceeded upstream"), &[])).await;
            }
            _ => end(trailers(12, Some("unknown method"), &[])).await,
        }
    });
    response
}

/// The upstream over TLS offering only h2, so ALPN picks HTTP/2.
/// With `mutual_tls`, the upstream requires a client certificate from the
/// test CA.
async fn grpc_upstream(
    pki: &Pki,
    tokens: Arc<TokenState>,
    mutual_tls: bool,
) -> (SocketAddr, Arc<GrpcState>) {
    let mut config = if mutual_tls {
        pki.mtls_server_config()
    } else {
        Arc::unwrap_or_clone(pki.server_config(&["localhost"]))
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(GrpcState::default());
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
                let x5t = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| support::x5t_der(c.as_ref()));
                let svc = service_fn(move |req| {
                    let (s, tokens, x5t) = (Arc::clone(&s), Arc::clone(&tokens), x5t.clone());
                    async move { Ok::<_, Infallible>(handle(s, tokens, x5t, req).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

struct World {
    _pki: Pki,
    /// The client certificate (DER) the route presents, with mutual TLS.
    client_cert: Option<Vec<u8>>,
    tokens: support::TokenServer,
    state: Arc<GrpcState>,
    running: token_injector::Running,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        Self::with(false).await
    }

    async fn with(mutual_tls: bool) -> Self {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let pki = Pki::new();
        let tokens = support::TokenServer::start(&pki, support::Mode::Issue(300.0)).await;
        let (addr, state) = grpc_upstream(&pki, Arc::clone(&tokens.state), mutual_tls).await;
        let dir = tempfile::tempdir().unwrap();
        let mut route_extra = String::new();
        let mut client_cert = None;
        if mutual_tls {
            let (cert, key) = pki.leaf_pem(&["grpc-client.test"]);
            std::fs::write(dir.path().join("client.crt"), &cert).unwrap();
            std::fs::write(dir.path().join("client.key"), &key).unwrap();
            route_extra
                .push_str("client_cert_file = \"client.crt\"\nclient_key_file = \"client.key\"\n");
            client_cert = Some(
                CertificateDer::from_pem_slice(cert.as_bytes())
                    .unwrap()
                    .to_vec(),
            );
        }
        pki.write_ca(dir.path());
        std::fs::write(dir.path().join("secret"), "s\n").unwrap();
        let text = format!(
            r#"{sections}
[profiles.main]
token_url = "{token_url}"
client_id = "svc"
client_secret_file = "secret"
ca_file = "ca.pem"

[[routes]]
host = "grpc.test"
upstream = "https://localhost:{port}"
profile = "main"
ca_file = "ca.pem"
listen = "127.0.0.1:0"
{route_extra}
"#,
            sections = support::test_sections("1s"),
            token_url = tokens.url(),
            port = addr.port(),
        );
        let running = support::start_in(dir.path(), &text).await;
        Self {
            _pki: pki,
            client_cert,
            tokens,
            state,
            running,
            _dir: dir,
        }
    }

    fn dedicated(&self) -> Endpoint {
        let addr = self.running.route_addr("grpc.test").unwrap();
        Endpoint::from_shared(format!("http://{addr}")).unwrap()
    }

    fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// The value of a `token_injector_requests_total` series.
    fn requests(&self, code: &str) -> f64 {
        let text = self.running.metrics().render();
        text.lines()
            .filter(|l| l.starts_with("token_injector_requests_total{"))
            .filter(|l| {
                l.contains("route=\"grpc.test\"") && l.contains(&format!("code=\"{code}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The upstream saw a well-formed gRPC request carrying a token it issued.
fn assert_grpc_request(w: &World, call: &Call) {
    assert_eq!(call.version, http::Version::HTTP_2, "{call:?}");
    assert_eq!(call.te.as_deref(), Some("trailers"), "{call:?}");
    assert_eq!(
        call.content_type.as_deref(),
        Some("application/grpc"),
        "{call:?}"
    );
    let token = call
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .expect("bearer token in metadata");
    assert!(w.tokens.state.valid(token), "{call:?}");
}

#[tokio::test]
async fn unary_call_through_the_dedicated_listener_carries_token_and_trailers() {
    let w = World::new().await;
    let mut client = grpc_client(w.dedicated()).await;
    client.ready().await.unwrap();
    let mut req = tonic::Request::new(Bytes::from_static(b"hello"));
    // The app's own credentials are replaced, other metadata goes through.
    req.metadata_mut()
        .insert("authorization", "Bearer app-token".parse().unwrap());
    req.metadata_mut()
        .insert("x-custom", "kept".parse().unwrap());
    let started = Instant::now();
    let resp = unary(&mut client, req, "Unary").await.unwrap();
    eprintln!("unary call: {:?}", started.elapsed());
    assert_eq!(resp.get_ref(), &Bytes::from_static(b"echo:hello"));
    // tonic merges trailers into the response metadata.
    assert_eq!(
        resp.metadata().get("x-served-by").unwrap(),
        "upstream",
        "{:?}",
        resp.metadata()
    );
    let calls = w.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path, "/test.Echo/Unary");
    assert_eq!(calls[0].custom.as_deref(), Some("kept"));
    assert_grpc_request(&w, &calls[0]);

    // An error status and its percent-encoded message arrive in trailers
    // after a data frame.
    let err = unary(&mut client, tonic::Request::new(Bytes::new()), "Fail")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such thing: café");
    assert_eq!(w.requests("200"), 2.0);
    w.running.shutdown().await;
}

#[tokio::test]
async fn server_streaming_call_streams_every_message_and_the_trailers() {
    let w = World::new().await;
    let mut client = grpc_client(w.dedicated()).await;
    client.ready().await.unwrap();
    let resp = client
        .server_streaming(
            tonic::Request::new(Bytes::from_static(b"50")),
            path("Count"),
            Raw,
        )
        .await
        .unwrap();
    let mut stream = resp.into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.push(String::from_utf8(m.to_vec()).unwrap());
    }
    assert_eq!(got.len(), 50);
    assert_eq!(got[0], "item-0");
    assert_eq!(got[49], "item-49");
    let trailers = stream.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("x-count").unwrap(), "50");
    assert_grpc_request(&w, &w.calls()[0]);
    w.running.shutdown().await;
}

#[tokio::test]
async fn bidirectional_stream_interleaves_both_directions() {
    let w = World::new().await;
    let mut client = grpc_client(w.dedicated()).await;
    client.ready().await.unwrap();
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(Bytes::from_static(b"m0")).await.unwrap();
    let resp = client
        .streaming(tonic::Request::new(outbound), path("Chat"), Raw)
        .await
        .unwrap();
    let mut inbound = resp.into_inner();
    // Each next message goes out only after the previous one's ack came
    // back: the call would stall if the proxy buffered either direction.
    for i in 0..10 {
        let ack = tokio::time::timeout(Duration::from_secs(5), inbound.message())
            .await
            .expect("ack within 5s")
            .unwrap()
            .expect("an ack");
        assert_eq!(ack, Bytes::from(format!("ack:m{i}")));
        if i < 9 {
            tx.send(Bytes::from(format!("m{}", i + 1))).await.unwrap();
        }
    }
    drop(tx);
    assert!(inbound.message().await.unwrap().is_none());
    let trailers = inbound.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("x-chat-messages").unwrap(), "10");
    assert_grpc_request(&w, &w.calls()[0]);
    w.running.shutdown().await;
}

#[tokio::test]
async fn deadline_reaches_the_upstream_and_its_status_comes_back() {
    let w = World::new().await;
    let mut client = grpc_client(w.dedicated()).await;
    client.ready().await.unwrap();
    let mut req = tonic::Request::new(Bytes::new());
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = unary(&mut client, req, "Slow").await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(err.message(), "deadline exceeded upstream");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let calls = w.calls();
    let seen = calls[0]
        .grpc_timeout
        .as_deref()
        .expect("grpc-timeout forwarded");
    let d = parse_timeout(seen).expect("well-formed grpc-timeout");
    assert!(
        d > Duration::ZERO && d <= Duration::from_millis(300),
        "{seen}"
    );
    eprintln!("deadline: upstream saw grpc-timeout {seen}, call ended after {took:?}");
    w.running.shutdown().await;
}

/// One good call, then one that the upstream refuses as `refuse` says:
/// the client, the refusal as the app saw it, and the token fetches made
/// before it.
async fn a_call_refused_after_a_good_one(
    w: &World,
    refuse: &AtomicUsize,
) -> (tonic::client::Grpc<Channel>, Status, usize) {
    let mut client = grpc_client(w.dedicated()).await;
    client.ready().await.unwrap();
    unary(
        &mut client,
        tonic::Request::new(Bytes::from_static(b"x")),
        "Unary",
    )
    .await
    .unwrap();
    let fetches = w.tokens.state.count();
    refuse.store(1, Ordering::SeqCst);
    let err = unary(
        &mut client,
        tonic::Request::new(Bytes::from_static(b"x")),
        "Unary",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    (client, err, fetches)
}

/// The refused token was dropped: one new token fetch, and the next call
/// carries the new token.
async fn the_next_call_carries_a_fresh_token(
    w: &World,
    client: &mut tonic::client::Grpc<Channel>,
    fetches: usize,
) {
    w.tokens
        .state
        .wait_for_requests(fetches + 1, Duration::from_secs(10))
        .await;
    assert_eq!(w.tokens.state.count(), fetches + 1);
    unary(
        client,
        tonic::Request::new(Bytes::from_static(b"y")),
        "Unary",
    )
    .await
    .unwrap();
    let calls = w.calls();
    assert_eq!(calls.len(), 3);
    assert_ne!(
        calls[2].authorization, calls[1].authorization,
        "the call after the refusal carries a new token"
    );
}

#[tokio::test]
async fn unauthorized_grpc_call_is_counted_not_retried() {
    let w = World::new().await;
    let (mut client, _, fetches) = a_call_refused_after_a_good_one(&w, &w.state.force_401).await;
    // The request body is a stream: one attempt only, passed through.
    assert_eq!(w.calls().len(), 2);
    assert_eq!(w.requests("401"), 1.0);
    assert_eq!(w.requests("200"), 1.0);
    let text = w.running.metrics().render();
    let retries: f64 = text
        .lines()
        .filter(|l| l.starts_with("token_injector_upstream_unauthorized_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(retries, 0.0);
    the_next_call_carries_a_fresh_token(&w, &mut client, fetches).await;
    w.running.shutdown().await;
}

#[tokio::test]
async fn grpc_through_the_forward_listener_with_an_authority_override() {
    let w = World::new().await;
    let endpoint = Endpoint::from_shared(format!("http://{}", w.running.proxy_addr()))
        .unwrap()
        .origin("http://grpc.test".parse().unwrap());
    let mut client = grpc_client(endpoint).await;
    client.ready().await.unwrap();
    let resp = unary(
        &mut client,
        tonic::Request::new(Bytes::from_static(b"fwd")),
        "Unary",
    )
    .await
    .unwrap();
    assert_eq!(resp.get_ref(), &Bytes::from_static(b"echo:fwd"));
    assert_grpc_request(&w, &w.calls()[0]);
    // One upstream connection for both kinds of call so far.
    let mut client = grpc_client(w.dedicated()).await;
    let resp = unary(
        &mut client,
        tonic::Request::new(Bytes::from_static(b"ded")),
        "Unary",
    )
    .await
    .unwrap();
    assert_eq!(resp.get_ref(), &Bytes::from_static(b"echo:ded"));
    assert_eq!(w.state.connections.load(Ordering::SeqCst), 1);
    w.running.shutdown().await;
}

#[tokio::test]
async fn grpc_to_an_upstream_that_requires_mutual_tls() {
    let w = World::with(true).await;
    let mut client = grpc_client(w.dedicated()).await;
    let resp = unary(
        &mut client,
        tonic::Request::new(Bytes::from_static(b"mtls")),
        "Unary",
    )
    .await
    .unwrap();
    assert_eq!(resp.get_ref(), &Bytes::from_static(b"echo:mtls"));
    client.ready().await.unwrap();
    let mut stream = client
        .server_streaming(
            tonic::Request::new(Bytes::from_static(b"3")),
            path("Count"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while stream.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 3);
    let calls = w.calls();
    assert_eq!(calls.len(), 2);
    let expected = support::x5t_der(w.client_cert.as_deref().unwrap());
    for call in &calls {
        assert_grpc_request(&w, call);
        assert_eq!(call.client_x5t.as_deref(), Some(expected.as_str()));
    }
    assert_eq!(w.state.connections.load(Ordering::SeqCst), 1);
    w.running.shutdown().await;
}

/// A gRPC server refuses a token with HTTP 200 and grpc-status 16 in a
/// trailers-only answer: passed through as is, and the token is dropped so
/// the next call carries a fresh one.
#[tokio::test]
async fn grpc_unauthenticated_drops_the_refused_token() {
    let w = World::new().await;
    let (mut client, err, fetches) =
        a_call_refused_after_a_good_one(&w, &w.state.force_unauthenticated).await;
    assert_eq!(err.message(), "invalid token");
    the_next_call_carries_a_fresh_token(&w, &mut client, fetches).await;
    w.running.shutdown().await;
}
