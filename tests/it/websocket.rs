//! WebSocket (HTTP/1.1 upgrade) through a route, end to end: the app
//! speaks plain `ws://` to the proxy, the upstream is a WebSocket server over
//! real TLS. The token is set on the upgrade request, then frames flow both
//! ways untouched; an upstream that refuses the upgrade is answered as is.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use crate::support::{self, Mode, World};

/// What the WebSocket upstream saw of each upgrade request.
#[derive(Clone, Debug)]
struct Upgrade {
    path: String,
    authorization: Option<String>,
    host: Option<String>,
}

type Log = Arc<Mutex<Vec<Upgrade>>>;

/// A WebSocket echo server over TLS for `localhost`, offering ALPN `h2` and
/// `http/1.1` (an HTTP/2 pool would pick h2 and could not upgrade). Paths
/// under `/refuse` get 403, the first request to `/once401` gets 401; the
/// rest are echoed until the client closes.
async fn ws_upstream(world: &World) -> (SocketAddr, Log) {
    let mut config = (*world.pki.server_config(&["localhost"])).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    ws_server(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
}

/// The same over plain TCP (a `ws://` host reached by passthrough).
async fn ws_plain() -> (SocketAddr, Log) {
    ws_server(None).await
}

// tungstenite's handshake callback returns its (large) error response.
#[allow(clippy::result_large_err)]
async fn ws_server(acceptor: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let l = Arc::clone(&log);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, log) = (acceptor.clone(), Arc::clone(&l));
            tokio::spawn(async move {
                let check = move |req: &Request, mut res: Response| {
                    let header =
                        |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                    log.lock().unwrap().push(Upgrade {
                        path: req.uri().path().to_owned(),
                        authorization: header("authorization"),
                        host: header("host"),
                    });
                    let once = req.uri().path() == "/once401"
                        && log
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|u| u.path == "/once401")
                            .count()
                            == 1;
                    if once {
                        let mut refusal = ErrorResponse::new(Some("stale token".into()));
                        *refusal.status_mut() = StatusCode::UNAUTHORIZED;
                        return Err(refusal);
                    }
                    if req.uri().path().starts_with("/refuse") {
                        let mut refusal = ErrorResponse::new(Some("no upgrade for you".into()));
                        *refusal.status_mut() = StatusCode::FORBIDDEN;
                        return Err(refusal);
                    }
                    res.headers_mut()
                        .insert("x-upstream", "ws-echo".parse().unwrap());
                    Ok(res)
                };
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(tcp).await
                            && let Ok(ws) = tokio_tungstenite::accept_hdr_async(tls, check).await
                        {
                            echo(ws).await;
                        }
                    }
                    None => {
                        if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await {
                            echo(ws).await;
                        }
                    }
                }
            });
        }
    });
    (addr, log)
}

/// Echoes text and binary messages; tungstenite answers pings and the
/// close handshake itself.
async fn echo<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// The world's config plus a route `ws.test` to the WebSocket upstream
/// (with `route_keys`) and `[proxy]` keys.
fn config(world: &World, ws: SocketAddr, proxy_keys: &str, route_keys: &str) -> String {
    let route = format!(
        "[[routes]]\nhost = \"ws.test\"\nupstream = \"https://localhost:{}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\n{route_keys}\n",
        ws.port()
    );
    world.config("", &route).replacen(
        "drain_timeout = \"5s\"\n",
        &format!("drain_timeout = \"5s\"\n{proxy_keys}\n"),
        1,
    )
}

/// The app's side: `ws://ws.test{path}` over a plain connection to the
/// proxy, as with `HTTP_PROXY`, carrying its own Authorization header.
async fn open(
    proxy: SocketAddr,
    path: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TcpStream>,
        tungstenite::handshake::client::Response,
    ),
    tungstenite::Error,
> {
    open_url(proxy, &format!("ws://ws.test{path}")).await
}

async fn open_url(
    proxy: SocketAddr,
    url: &str,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<TcpStream>,
        tungstenite::handshake::client::Response,
    ),
    tungstenite::Error,
> {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer the-apps-own".parse().unwrap());
    let tcp = TcpStream::connect(proxy).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, tcp),
    )
    .await
    .expect("handshake within 10 s")
}

async fn next(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a message within 10 s")
        .expect("the stream is open")
        .expect("a valid frame")
}

async fn metrics(admin: SocketAddr) -> String {
    support::scrape(admin).await
}

fn metric(text: &str, series: &str) -> Option<f64> {
    support::metric_value(text, series)
}

#[tokio::test]
async fn websocket_gets_the_token_and_echoes_both_ways() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (ws_addr, log) = ws_upstream(&world).await;
    // Short connection timers: an open WebSocket must not be cut by them.
    // The route's pool would speak HTTP/2; the upgrade goes over HTTP/1.1.
    let text = config(
        &world,
        ws_addr,
        "header_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"",
        "upstream_protocol = \"http2\"",
    );
    let proxy = world.start(&text).await;
    let admin = proxy.admin_addr();

    let (mut ws, response) = open(proxy.proxy_addr(), "/chat?room=1").await.unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-upstream"], "ws-echo");
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/chat");
    assert_eq!(
        seen.host.as_deref(),
        Some(format!("localhost:{}", ws_addr.port()).as_str())
    );
    let token = seen
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .expect("a bearer token on the upgrade request");
    assert_ne!(token, "the-apps-own");
    assert!(
        world.tokens.state.valid(token),
        "not an issued token: {token}"
    );

    for i in 0..5 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text(text));
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000 * (i + 1)).collect();
        ws.send(Message::binary(bytes.clone())).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::binary(bytes));
    }
    let m = metrics(admin).await;
    assert_eq!(
        metric(&m, "token_injector_tunnels_open{kind=\"upgrade\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "token_injector_requests_total{code=\"101\",route=\"ws.test\"}"
        ),
        Some(1.0)
    );

    // Quiet for well past both connection bounds: the passing time is the test.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("still here"));

    // A close handshake, answered by the upstream through the proxy.
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason, "bye");
        }
        other => panic!("expected the close echoed, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .is_none(),
        "the stream ends after the close"
    );
    support::eventually(Duration::from_secs(10), || async {
        (metric(
            &metrics(admin).await,
            "token_injector_tunnels_open{kind=\"upgrade\"}",
        ) == Some(0.0))
        .then_some(())
    })
    .await;
    assert_eq!(log.lock().unwrap().len(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstream_refusing_the_upgrade_reaches_the_app_as_is() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (ws_addr, log) = ws_upstream(&world).await;
    let proxy = world.start(&config(&world, ws_addr, "", "")).await;

    match open(proxy.proxy_addr(), "/refuse").await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            assert!(
                response.headers().get("x-token-injector-error").is_none(),
                "the upstream's answer, not the proxy's"
            );
            // The upstream's body (tungstenite reads it raw, chunk framing and all).
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(body.contains("no upgrade for you"), "{body:?}");
        }
        Err(e) => panic!("expected the upstream's 403, got {e}"),
        Ok(_) => panic!("the upgrade was refused upstream"),
    }
    // It still carried the token.
    let seen = log.lock().unwrap()[0].clone();
    let token = seen.authorization.unwrap();
    assert!(
        world
            .tokens
            .state
            .valid(token.strip_prefix("Bearer ").unwrap())
    );

    // A host without a route is refused by the proxy, no upgrade attempted.
    let request = "ws://nowhere.test/x".into_client_request().unwrap();
    let tcp = TcpStream::connect(proxy.proxy_addr()).await.unwrap();
    match tokio_tungstenite::client_async(request, tcp).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            assert_eq!(response.headers()["x-token-injector-error"], "no_route");
        }
        other => panic!("expected 403 no_route, got {:?}", other.map(|_| ())),
    }
    assert_eq!(log.lock().unwrap().len(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn many_websockets_at_once_each_echo_their_own() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (ws_addr, log) = ws_upstream(&world).await;
    let proxy = world.start(&config(&world, ws_addr, "", "")).await;
    let addr = proxy.proxy_addr();
    let sessions = (0..8).map(|n| {
        tokio::spawn(async move {
            let (mut ws, _) = open(addr, &format!("/s/{n}")).await.unwrap();
            for i in 0..20 {
                let text = format!("session {n} message {i}");
                ws.send(Message::text(text.clone())).await.unwrap();
                assert_eq!(next(&mut ws).await, Message::text(text));
            }
            ws.close(None).await.unwrap();
        })
    });
    for s in sessions {
        s.await.unwrap();
    }
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 8);
    assert!(seen.iter().all(|u| {
        u.authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| world.tokens.state.valid(t))
    }));
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upgrade_refused_with_401_is_retried_with_a_fresh_token() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (ws_addr, log) = ws_upstream(&world).await;
    let proxy = world.start(&config(&world, ws_addr, "", "")).await;
    let (mut ws, response) = open(proxy.proxy_addr(), "/once401").await.unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("after retry")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("after retry"));
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let tokens: Vec<&str> = seen
        .iter()
        .map(|u| {
            u.authorization
                .as_deref()
                .unwrap()
                .strip_prefix("Bearer ")
                .unwrap()
        })
        .collect();
    assert_ne!(tokens[0], tokens[1], "the retry carries a fresh token");
    assert!(world.tokens.state.was_issued(tokens[0]));
    assert!(world.tokens.state.valid(tokens[1]));
    assert_eq!(world.tokens.state.count(), 2);
    // An open WebSocket would hold the shutdown for the drain time.
    drop(ws);
    proxy.shutdown().await;
}

#[tokio::test]
async fn passthrough_upgrades_to_plain_ws_hosts_carry_no_token() {
    let world = World::new(Mode::Issue(300.0)).await;
    let (plain, log) = ws_plain().await;
    let text = world.config("", "").replacen(
        "drain_timeout = \"5s\"\n",
        "drain_timeout = \"5s\"\nunmatched = \"passthrough\"\n",
        1,
    );
    let proxy = world.start(&text).await;
    let (mut ws, response) = open_url(
        proxy.proxy_addr(),
        &format!("ws://127.0.0.1:{}/p", plain.port()),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        ws.send(Message::binary(vec![i; 100])).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::binary(vec![i; 100]));
    }
    ws.close(None).await.unwrap();
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/p");
    // The app's own header, untouched: passthrough adds no token.
    assert_eq!(seen.authorization.as_deref(), Some("Bearer the-apps-own"));
    drop(ws);
    proxy.shutdown().await;
}
