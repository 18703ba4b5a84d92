//! WebSocket (HTTP/1.1 upgrade) through a route, end to end: the app
//! speaks plain `ws://` to the proxy, the upstream is a WebSocket server over
//! real TLS. The token is set on the upgrade request, then frames flow both
//! ways untouched; an upstream that refuses the upgrade is answered as is.

mod support;

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

use support::{Mode, World};

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
/// under `/refuse` get 403; the rest are echoed until the client closes.
// tungstenite's handshake callback returns its (large) error response.
#[allow(clippy::result_large_err)]
async fn ws_upstream(world: &World) -> (SocketAddr, Log) {
    let mut config = (*world.pki.server_config(&["localhost"])).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
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
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let check = move |req: &Request, mut res: Response| {
                    let header =
                        |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                    log.lock().unwrap().push(Upgrade {
                        path: req.uri().path().to_owned(),
                        authorization: header("authorization"),
                        host: header("host"),
                    });
                    if req.uri().path().starts_with("/refuse") {
                        let mut refusal = ErrorResponse::new(Some("no upgrade for you".into()));
                        *refusal.status_mut() = StatusCode::FORBIDDEN;
                        return Err(refusal);
                    }
                    res.headers_mut()
                        .insert("x-upstream", "ws-echo".parse().unwrap());
                    Ok(res)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, check).await else {
                    return;
                };
                // tungstenite answers pings and the close handshake itself.
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
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
    let mut request = format!("ws://ws.test{path}").into_client_request().unwrap();
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
    support::direct_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
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
