//! Limits and timeouts: each one bites on the connection or request that
//! crosses it, while a normal request on another connection is served.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// The standard test config with extra keys in `[proxy]` and `[upstream]`.
fn config_with(w: &World, proxy: &str, upstream: &str, extra: &str) -> String {
    let text = w.config("", extra);
    let text = text.replacen(
        "drain_timeout = \"5s\"\n",
        &format!("drain_timeout = \"5s\"\n{proxy}\n"),
        1,
    );
    text.replacen(
        "response_timeout = \"5s\"\n",
        &format!("response_timeout = \"5s\"\n{upstream}\n"),
        1,
    )
}

/// A route `host` to a TLS upstream at `addr` (certificate for localhost).
fn route_to(host: &str, addr: SocketAddr) -> String {
    format!(
        r#"
[[routes]]
host = "{host}"
upstream = "https://localhost:{port}"
profile = "main"
ca_file = "ca.pem"
"#,
        port = addr.port()
    )
}

/// A normal request through the proxy on a connection of its own.
async fn normal_request_succeeds(proxy: SocketAddr) {
    let r = proxied_client(proxy)
        .get("http://api.test/normal")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(error_kind(&r).is_none());
}

/// Reads until the peer closes the connection (EOF or reset), at most
/// `within`; returns how long that took and what was read.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Err(_) => panic!(
                "connection still open after {within:?}; read {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one HTTP/1.1 response with a `content-length` body; returns its
/// status line and head.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed before a response: {got:?}");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while got.len() < head_end + len {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    head
}

const GET: &[u8] = b"GET http://api.test/ HTTP/1.1\r\nhost: api.test\r\n\r\n";

#[tokio::test]
async fn header_dribbler_is_closed_after_header_read_timeout() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(&w, "header_read_timeout = \"1s\"", "", ""))
        .await;
    let proxy = app.proxy_addr();

    // One byte of a never-ending head every 100 ms: activity does not
    // extend the bound.
    let mut dribbler = TcpStream::connect(proxy).await.unwrap();
    dribbler
        .write_all(b"GET http://api.test/ HTTP/1.1\r\nhost: api.test\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = dribbler.into_split();
    let dribble = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while writer.write_all(b"x").await.is_ok() {
            tick.tick().await;
        }
    });
    // A connection that never sends a byte is bound the same way.
    let mut silent = TcpStream::connect(proxy).await.unwrap();

    normal_request_succeeds(proxy).await;

    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "dribbler still connected after 5 s");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed too early: {elapsed:?}"
    );
    dribble.await.unwrap();

    let (_, got) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "{got:?}");
    // The proxy still serves new connections afterwards.
    normal_request_succeeds(proxy).await;
    app.shutdown().await;
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(
            &w,
            "max_headers = 20\nmax_header_bytes = 8192",
            "",
            "",
        ))
        .await;
    let proxy = app.proxy_addr();

    let mut many = String::from("GET http://api.test/ HTTP/1.1\r\nhost: api.test\r\n");
    for i in 0..30 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(many.as_bytes()).await.unwrap();
    let (_, got) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");

    let big = format!(
        "GET http://api.test/ HTTP/1.1\r\nhost: api.test\r\nx-big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let mut s = TcpStream::connect(proxy).await.unwrap();
    // The proxy may answer and close before it has read all of it.
    let _ = s.write_all(big.as_bytes()).await;
    let (_, got) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");

    // Within both limits: served, and the upstream saw nothing of the others.
    let mut req = proxied_client(proxy).get("http://api.test/normal");
    for i in 0..15 {
        req = req.header(format!("x-h{i}"), "v");
    }
    assert_eq!(req.send().await.unwrap().status(), 200);
    let seen = w.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/normal");
    app.shutdown().await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let w = World::new(Mode::Issue(60.0)).await;
    // The head bound is shorter than the idle bound: waiting for the next
    // request is idle time, not header time.
    let app = w
        .start(&config_with(
            &w,
            "header_read_timeout = \"300ms\"\nidle_timeout = \"1500ms\"",
            "",
            "",
        ))
        .await;
    let proxy = app.proxy_addr();

    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(GET).await.unwrap();
    let head = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let idle_from = Instant::now();
    // A request on the same connection within the idle bound is served,
    // after more than the header bound.
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.write_all(GET).await.unwrap();
    let head = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let idle_from_2 = Instant::now();
    assert!(idle_from_2 - idle_from >= Duration::from_millis(700));

    normal_request_succeeds(proxy).await;

    let (_, got) = read_until_closed(&mut s, Duration::from_secs(6)).await;
    assert!(got.is_empty(), "{got:?}");
    let idle = idle_from_2.elapsed();
    assert!(
        idle >= Duration::from_millis(1400),
        "closed after {idle:?} idle, before idle_timeout"
    );
    assert!(idle < Duration::from_secs(4), "closed after {idle:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn slow_response_is_not_cut_by_idle_or_header_timeout() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(
            &w,
            "header_read_timeout = \"300ms\"\nidle_timeout = \"500ms\"",
            "",
            "",
        ))
        .await;
    let r = proxied_client(app.proxy_addr())
        .get("http://api.test/slow?ms=1500")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_refused_fast() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(&w, "max_connections = 1", "", ""))
        .await;
    let proxy = app.proxy_addr();
    let refused = app.metrics().proxy.refused_connections.clone();

    let mut first = TcpStream::connect(proxy).await.unwrap();
    first.write_all(GET).await.unwrap();
    assert!(read_response(&mut first).await.starts_with("http/1.1 200"));

    let mut second = TcpStream::connect(proxy).await.unwrap();
    let _ = second.write_all(GET).await;
    let (took, got) = read_until_closed(&mut second, Duration::from_secs(2)).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    assert_eq!(refused.get(), 1);

    // The admitted connection keeps being served.
    first.write_all(GET).await.unwrap();
    assert!(read_response(&mut first).await.starts_with("http/1.1 200"));

    // Its close frees the slot.
    drop(first);
    eventually(Duration::from_secs(5), || async {
        proxied_client(proxy)
            .get("http://api.test/normal")
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn request_timeout_bounds_time_to_response_head() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(&w, "request_timeout = \"1s\"", "", ""))
        .await;
    let proxy = app.proxy_addr();

    // A slow upstream: the response timeout (5 s) would wait longer.
    let slow = {
        let client = proxied_client(proxy);
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client
                .get("http://api.test/slow?ms=4000")
                .send()
                .await
                .unwrap();
            (started.elapsed(), r.status(), error_kind(&r))
        })
    };
    // A client that announces a small (replayable) body and never sends
    // it: nothing else bounds the wait for it.
    let mut stalled = TcpStream::connect(proxy).await.unwrap();
    stalled
        .write_all(b"POST http://api.test/upload HTTP/1.1\r\nhost: api.test\r\ncontent-length: 100\r\n\r\nonly-some")
        .await
        .unwrap();
    let started = Instant::now();

    normal_request_succeeds(proxy).await;

    let head = read_response(&mut stalled).await;
    let took = started.elapsed();
    assert!(head.starts_with("http/1.1 504"), "{head}");
    assert!(
        head.contains("x-token-injector-error: upstream_timeout"),
        "{head}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );

    let (took, status, kind) = slow.await.unwrap();
    assert_eq!(status, 504);
    assert_eq!(kind.as_deref(), Some("upstream_timeout"));
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Both 504s are counted, under their routes (not as unrouted).
    let text = app.metrics().render();
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("token_injector_requests_total{") && l.contains("code=\"504\""))
        .collect();
    let total: f64 = counted
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 2.0, "{counted:?}");
    assert!(
        counted.iter().all(|l| !l.contains("route=\"-\"")),
        "{counted:?}"
    );
    app.shutdown().await;
}

/// A TLS upstream whose bodies send `chunks` chunks `every` apart, then
/// either end or (with `stall`) never send another byte.
async fn chunked_upstream(pki: &Pki, chunks: usize, every: Duration, stall: bool) -> SocketAddr {
    serve(
        Some(pki.server_config(&["localhost"])),
        move |_req| async move {
            let stream = futures_util::stream::unfold(0usize, move |i| async move {
                if i == chunks {
                    if stall {
                        std::future::pending::<()>().await;
                    }
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(every).await;
                }
                Some((
                    Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"chunk;"))),
                    i + 1,
                ))
            });
            let body = http_body_util::StreamBody::new(stream)
                .map_err(|e| match e {})
                .boxed();
            http::Response::new(body)
        },
    )
    .await
}

#[tokio::test]
async fn stalled_response_body_is_cut_after_body_idle_timeout() {
    let w = World::new(Mode::Issue(60.0)).await;
    let stalling = chunked_upstream(&w.pki, 2, Duration::from_millis(50), true).await;
    // Slower than nothing at all, but never idle for a whole second.
    let trickling = chunked_upstream(&w.pki, 6, Duration::from_millis(400), false).await;
    let extra = format!(
        "{}{}",
        route_to("stall.test", stalling),
        route_to("trickle.test", trickling)
    );
    let app = w
        .start(&config_with(&w, "", "body_idle_timeout = \"1s\"", &extra))
        .await;
    let proxy = app.proxy_addr();
    let client = proxied_client(proxy);

    let r = client.get("http://stall.test/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let started = Instant::now();
    let trickle = tokio::spawn({
        let client = client.clone();
        async move {
            let r = client.get("http://trickle.test/").send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }
    });
    normal_request_succeeds(proxy).await;
    let body = tokio::time::timeout(Duration::from_secs(5), r.bytes())
        .await
        .expect("stalled body cut within 5 s");
    assert!(body.is_err(), "stalled body ended cleanly: {body:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "cut after {took:?}");

    // 2 s of body with 400 ms gaps: slow but alive, not cut.
    let trickled = trickle.await.unwrap();
    assert_eq!(&trickled[..], "chunk;".repeat(6).as_bytes());
    app.shutdown().await;
}

#[tokio::test]
async fn hanging_tls_handshake_is_bounded_by_response_timeout() {
    let w = World::new(Mode::Issue(60.0)).await;
    // Accepts TCP and then never says a word: no ServerHello.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            held.push(s);
        }
    });
    let text = config_with(&w, "", "", &route_to("mute.test", mute_addr)).replacen(
        "response_timeout = \"5s\"",
        "response_timeout = \"1s\"",
        1,
    );
    let app = w.start(&text).await;
    let proxy = app.proxy_addr();

    let hung = {
        let client = proxied_client(proxy);
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client.get("http://mute.test/").send().await.unwrap();
            (started.elapsed(), r.status(), error_kind(&r))
        })
    };
    normal_request_succeeds(proxy).await;
    let (took, status, kind) = hung.await.unwrap();
    assert_eq!(status, 504);
    assert_eq!(kind.as_deref(), Some("upstream_timeout"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    held.abort();
    app.shutdown().await;
}

#[tokio::test]
async fn reloaded_limits_apply_to_new_connections() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(&w, "max_connections = 1", "", ""))
        .await;
    let proxy = app.proxy_addr();
    let mut first = TcpStream::connect(proxy).await.unwrap();
    first.write_all(GET).await.unwrap();
    assert!(read_response(&mut first).await.starts_with("http/1.1 200"));
    let mut refused = TcpStream::connect(proxy).await.unwrap();
    let (_, got) = read_until_closed(&mut refused, Duration::from_secs(2)).await;
    assert!(got.is_empty());

    let text = config_with(&w, "max_connections = 2", "", "");
    let config = token_injector::config::from_text(&text, w.dir.path(), Vec::new()).unwrap();
    app.apply(config).unwrap();
    // The same listener, now with room for a second connection.
    assert_eq!(app.proxy_addr(), proxy);
    let mut second = TcpStream::connect(proxy).await.unwrap();
    second.write_all(GET).await.unwrap();
    assert!(read_response(&mut second).await.starts_with("http/1.1 200"));
    first.write_all(GET).await.unwrap();
    assert!(read_response(&mut first).await.starts_with("http/1.1 200"));
    assert_eq!(app.metrics().proxy.refused_connections.get(), 1);
    app.shutdown().await;
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// An h2c (prior knowledge) connection to `addr`, and the task driving it
/// (it ends when the proxy closes the connection).
async fn h2c(addr: SocketAddr) -> (H2Sender, tokio::task::JoinHandle<hyper::Result<()>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

/// An HTTP/2 client that connects early (tonic, grpc-go) may open its first
/// stream long after the preface: that wait is idle time, not a slow head.
#[tokio::test]
async fn h2c_connection_may_wait_past_the_header_bound_before_its_first_stream() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(
            &w,
            "header_read_timeout = \"300ms\"\nidle_timeout = \"5s\"",
            "",
            "",
        ))
        .await;
    let (mut sender, conn) = h2c(app.proxy_addr()).await;
    // The passing of time is what is tested: twice the header bound.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !conn.is_finished(),
        "the connection was closed before its first stream"
    );
    let r = sender
        .send_request(
            http::Request::get("http://api.test/first")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    drop(sender);
    app.shutdown().await;
}

#[tokio::test]
async fn h2c_connection_is_idle_between_streams_then_closed() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w
        .start(&config_with(
            &w,
            "header_read_timeout = \"300ms\"\nidle_timeout = \"2s\"",
            "",
            "",
        ))
        .await;
    let (mut sender, conn) = h2c(app.proxy_addr()).await;
    let get = || {
        http::Request::get("http://api.test/h2")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let r = sender.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    // Longer than the header bound, well short of the idle bound (2 s, so
    // a stall on a busy machine cannot close the connection under the
    // second stream).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = sender.send_request(get()).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    normal_request_succeeds(app.proxy_addr()).await;
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("h2c connection closed within 5 s")
        .unwrap()
        .ok();
    let idle = idle_from.elapsed();
    assert!(idle >= Duration::from_millis(1900), "closed after {idle:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn hanging_tls_handshake_is_cut_by_tls_timeout() {
    let w = World::new(Mode::Issue(60.0)).await;
    // Accepts TCP and then never says a word: no ServerHello.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            held.push(s);
        }
    });
    // TCP connect and TLS handshake share connect_timeout + tls_timeout.
    let text = config_with(&w, "", "", &route_to("mute.test", mute_addr))
        .replacen("connect_timeout = \"2s\"", "connect_timeout = \"500ms\"", 1)
        .replacen(
            "response_timeout = \"5s\"",
            "response_timeout = \"5s\"\ntls_timeout = \"500ms\"",
            1,
        );
    assert!(
        text.contains("tls_timeout") && text.contains("\"500ms\"\nresponse"),
        "the fixture config changed"
    );
    let app = w.start(&text).await;
    let proxy = app.proxy_addr();
    let started = Instant::now();
    let r = proxied_client(proxy)
        .get("http://mute.test/")
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 502);
    assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
    let body = r.text().await.unwrap();
    assert!(
        body.contains("TLS handshake took longer than 1s"),
        "the body names the cause: {body}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    normal_request_succeeds(proxy).await;
    held.abort();
    app.shutdown().await;
}
