//! Hostile and malformed requests from the app side, sent as raw bytes over
//! TCP (an HTTP client library would refuse to send most of them). Each test
//! runs two upstreams: the route's (`api.test`, which checks tokens) and a
//! plain recorder standing for "another host", with `unmatched =
//! "passthrough"` so that a request which escapes routing would reach it.
//! A token must never reach anything but the route's upstream, and the proxy
//! must answer the next request after each of them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    w: World,
    app: token_injector::Running,
    other: SocketAddr,
    other_seen: Arc<Mutex<Vec<Seen>>>,
}

async fn setup(extra: &str) -> Setup {
    setup_with(|_| extra.to_owned()).await
}

/// Like `setup`, with config text that may name the world's upstream.
async fn setup_with(extra: impl FnOnce(&World) -> String) -> Setup {
    let w = World::new(Mode::Issue(60.0)).await;
    let (other, other_seen) = recorder().await;
    let text = w.config("", &extra(&w)).replace(
        "drain_timeout = \"5s\"",
        "drain_timeout = \"5s\"\nunmatched = \"passthrough\"",
    );
    let app = w.start(&text).await;
    Setup {
        w,
        app,
        other,
        other_seen,
    }
}

/// Writes `bytes` on a fresh connection and reads until the proxy closes it
/// (or 10 s pass); the whole answer as lossy text.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The proxy may answer and close before reading everything we send.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the proxy closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {answer:?}"))
}

fn error_header(answer: &str) -> Option<String> {
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("x-token-injector-error: ")
            .map(str::to_owned)
    })
}

impl Setup {
    /// The valid tokens the route's upstream received, in order.
    fn upstream_tokens(&self) -> Vec<String> {
        self.w
            .upstream
            .seen()
            .iter()
            .filter_map(|s| {
                s.authorization
                    .as_deref()?
                    .strip_prefix("Bearer ")
                    .map(str::to_owned)
            })
            .filter(|t| self.w.tokens.state.was_issued(t))
            .collect()
    }

    fn other_requests(&self) -> Vec<Seen> {
        self.other_seen.lock().unwrap().clone()
    }

    fn assert_other_got_no_token(&self) {
        for s in self.other_requests() {
            assert_eq!(s.authorization, None, "a token reached another host: {s:?}");
        }
    }

    /// The proxy still routes a plain request with a token.
    async fn assert_still_serves(&self) {
        let before = self.w.upstream.seen().len();
        let r = proxied_client(self.app.proxy_addr())
            .get("http://api.test/next")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(self.w.upstream.seen().len(), before + 1);
    }

    fn upstream_host(&self) -> String {
        format!("localhost:{}", self.w.upstream.addr.port())
    }
}

#[tokio::test]
async fn smuggling_shapes_are_refused_with_400_and_never_forwarded() {
    let t = setup("").await;
    // (what, request, whether the proxy itself refuses it: those carry
    // x-token-injector-error; hyper's own parser refuses the others first)
    let cases: &[(&str, &str, bool)] = &[
        (
            "two different Content-Length values",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
            false,
        ),
        (
            "Content-Length abc",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nContent-Length: abc\r\n\r\nabc",
            false,
        ),
        (
            "Content-Length -1",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nContent-Length: -1\r\n\r\n",
            false,
        ),
        (
            "Content-Length 1,2",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nContent-Length: 1,2\r\n\r\nab",
            false,
        ),
        (
            "Content-Length +3",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nContent-Length: +3\r\n\r\nabc",
            false,
        ),
        (
            "Transfer-Encoding gzip, chunked",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            true,
        ),
        (
            "Transfer-Encoding chunked twice",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            true,
        ),
        (
            "Transfer-Encoding chunked, gzip",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
        ),
        (
            "unknown Transfer-Encoding",
            "POST http://api.test/ HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            "POST http://api.test/ HTTP/1.0\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
        ),
        (
            "obsolete line folding",
            "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\nX-Folded: a\r\n b\r\n\r\n",
            false,
        ),
        (
            "space before the colon",
            "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding : chunked\r\n\r\n",
            false,
        ),
    ];
    for (what, request, by_proxy) in cases {
        let answer = raw(t.app.proxy_addr(), request.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{what}: {answer:?}");
        if *by_proxy {
            assert_eq!(
                error_header(&answer).as_deref(),
                Some("bad_request"),
                "{what}: {answer:?}"
            );
        }
    }
    assert!(t.w.upstream.seen().is_empty(), "{:?}", t.w.upstream.seen());
    assert!(t.other_requests().is_empty());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

/// hyper would frame a request with both Content-Length and
/// `Transfer-Encoding: chunked` by the chunked coding (RFC 9112 §6.3 allows
/// that); the proxy refuses it with its own 400 instead, before anything is
/// forwarded, and closes the connection, so the bytes after the chunked body
/// are never taken as a second request.
#[tokio::test]
async fn content_length_with_chunked_is_refused_and_cannot_smuggle() {
    let t = setup("").await;
    let smuggled = format!(
        "GET http://{}/smuggled HTTP/1.1\r\nHost: api.test\r\n\r\n",
        t.other
    );
    for (what, head) in [
        (
            "CL then TE",
            "Content-Length: 4\r\nTransfer-Encoding: chunked",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 4",
        ),
        (
            "lower-case names",
            "transfer-encoding: chunked\r\ncontent-length: 4",
        ),
    ] {
        let request = format!(
            "POST http://api.test/cl-te HTTP/1.1\r\nHost: api.test\r\n{head}\r\n\r\n3\r\nabc\r\n0\r\n\r\n{smuggled}"
        );
        let answer = raw(t.app.proxy_addr(), request.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{what}: {answer:?}");
        assert_eq!(
            error_header(&answer).as_deref(),
            Some("bad_request"),
            "{what}"
        );
        assert!(
            answer.contains("Content-Length and Transfer-Encoding"),
            "{answer:?}"
        );
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            1,
            "{what}: one answer, then the connection closes: {answer:?}"
        );
    }
    assert!(t.w.upstream.seen().is_empty(), "{:?}", t.w.upstream.seen());
    assert!(t.other_requests().is_empty(), "{:?}", t.other_requests());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

/// httparse accepts bare LF line endings; the proxy refuses them with 400
/// (a parser behind a less careful hop could read such a head differently).
#[tokio::test]
async fn bare_lf_line_endings_are_refused() {
    let t = setup("").await;
    for (what, request) in [
        (
            "every line",
            &b"POST http://api.test/lf HTTP/1.1\nHost: api.test\nContent-Length: 3\n\nabc"[..],
        ),
        (
            "one header line",
            b"GET http://api.test/lf HTTP/1.1\r\nHost: api.test\nX-A: b\r\n\r\n",
        ),
    ] {
        let answer = raw(t.app.proxy_addr(), request).await;
        assert_eq!(status(&answer), 400, "{what}: {answer:?}");
        assert_eq!(
            error_header(&answer).as_deref(),
            Some("bad_request"),
            "{what}"
        );
        assert!(answer.contains("bare LF"), "{answer:?}");
    }
    assert!(t.w.upstream.seen().is_empty(), "{:?}", t.w.upstream.seen());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

/// The head check runs on every request of a keep-alive connection, not
/// only the first, and a clean request is not blamed for an earlier one.
#[tokio::test]
async fn a_bad_head_after_a_good_one_on_the_same_connection_is_refused() {
    let t = setup("").await;
    let mut stream = tokio::net::TcpStream::connect(t.app.proxy_addr())
        .await
        .unwrap();
    stream
        .write_all(b"GET http://api.test/first HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    // Read the first answer whole: its head, then Content-Length bytes.
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    let body_len = loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&first));
        first.extend_from_slice(&buf[..n]);
        if let Some(end) = first.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&first[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .expect("the upstream's echo has a Content-Length");
            break end + 4 + len;
        }
    };
    while first.len() < body_len {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0);
        first.extend_from_slice(&buf[..n]);
    }
    let first = String::from_utf8_lossy(&first).to_string();
    assert_eq!(status(&first), 200, "{first:?}");
    stream
        .write_all(b"POST http://api.test/second HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the connection closes after the refusal")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest).to_string();
    assert_eq!(status(&rest), 400, "{rest:?}");
    let paths: Vec<String> = t.w.upstream.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, ["/first"]);
    t.app.shutdown().await;
}

#[tokio::test]
async fn absolute_uri_decides_the_route_not_the_host_header() {
    let t = setup("").await;
    // URI names the route, Host names another host: the token goes where the
    // URI points, with the upstream's own Host.
    let req = format!(
        "GET http://api.test/by-uri HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        t.other
    );
    assert_eq!(status(&raw(t.app.proxy_addr(), req.as_bytes()).await), 200);
    let seen = t.w.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].host.as_deref(), Some(t.upstream_host().as_str()));
    assert_eq!(t.upstream_tokens().len(), 1);
    assert!(t.other_requests().is_empty());

    // URI names another host, Host names the route: no token, and not the
    // route's upstream.
    let req = format!(
        "GET http://{}/by-uri HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        t.other
    );
    assert_eq!(status(&raw(t.app.proxy_addr(), req.as_bytes()).await), 200);
    assert_eq!(t.w.upstream.seen().len(), 1);
    let other = t.other_requests();
    assert_eq!(other.len(), 1);
    // A proxy replaces Host with the URI's authority (RFC 9112 §3.2.2).
    assert_eq!(other[0].host.as_deref(), Some(t.other.to_string().as_str()));
    t.assert_other_got_no_token();
    t.app.shutdown().await;
}

/// Sends `GET <target>` with `Host: <host>` and returns the status.
async fn spelled(t: &Setup, target: &str, host: &str) -> u16 {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    status(&raw(t.app.proxy_addr(), req.as_bytes()).await)
}

#[tokio::test]
async fn upper_case_host_reaches_only_the_routes_upstream() {
    let t = setup("").await;
    assert_eq!(spelled(&t, "http://API.TEST/", "API.TEST").await, 200);
    assert_eq!(spelled(&t, "/origin-form", "Api.Test").await, 200);
    assert_eq!(t.upstream_tokens().len(), 2);
    for s in t.w.upstream.seen() {
        assert_eq!(s.host.as_deref(), Some(t.upstream_host().as_str()));
    }
    assert!(t.other_requests().is_empty());
    t.app.shutdown().await;
}

#[tokio::test]
async fn trailing_dot_host_reaches_only_the_routes_upstream() {
    let t = setup("").await;
    assert_eq!(spelled(&t, "http://api.test./", "api.test.").await, 200);
    assert_eq!(spelled(&t, "/origin-form", "api.test.").await, 200);
    assert_eq!(t.upstream_tokens().len(), 2);
    // Two dots is not a host name.
    assert_eq!(spelled(&t, "http://api.test../", "api.test..").await, 400);
    assert_eq!(t.w.upstream.seen().len(), 2);
    assert!(t.other_requests().is_empty());
    t.app.shutdown().await;
}

#[tokio::test]
async fn explicit_default_port_reaches_only_the_routes_upstream() {
    let t = setup("").await;
    assert_eq!(spelled(&t, "http://api.test:80/", "api.test:80").await, 200);
    assert_eq!(spelled(&t, "/origin-form", "api.test:80").await, 200);
    let seen = t.w.upstream.seen();
    assert_eq!(t.upstream_tokens().len(), 2);
    // The upstream sees its own authority, not the app's port.
    assert!(
        seen.iter()
            .all(|s| s.host.as_deref() == Some(t.upstream_host().as_str()))
    );
    assert!(t.other_requests().is_empty());
    t.app.shutdown().await;
}

#[tokio::test]
async fn ipv6_literal_without_a_route_gets_no_token() {
    let t = setup("").await;
    let port = t.other.port();
    // Not routed; passed through to [::1], where nothing of ours listens.
    let code = spelled(&t, &format!("http://[::1]:{port}/"), "api.test").await;
    assert_eq!(code, 502);
    let code = spelled(&t, "/origin-form", &format!("[::1]:{port}")).await;
    assert_eq!(code, 502);
    // A malformed literal is refused outright.
    assert_eq!(spelled(&t, "/origin-form", "[::1").await, 400);
    assert!(t.w.upstream.seen().is_empty());
    assert!(t.other_requests().is_empty());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

#[tokio::test]
async fn userinfo_in_the_uri_is_refused() {
    let t = setup("").await;
    for target in [
        "http://user@api.test/".to_owned(),
        "http://user:pw@api.test/".to_owned(),
        format!("http://api.test@{}/", t.other),
        format!("http://api.test:80@{}/", t.other),
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");
        let answer = raw(t.app.proxy_addr(), req.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{target}: {answer:?}");
        assert_eq!(
            error_header(&answer).as_deref(),
            Some("bad_request"),
            "{target}"
        );
    }
    assert!(t.w.upstream.seen().is_empty());
    assert!(t.other_requests().is_empty());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

#[tokio::test]
async fn userinfo_in_the_host_header_is_refused() {
    let t = setup("").await;
    for host in [
        "evil@api.test".to_owned(),
        format!("api.test@{}", t.other),
        format!("api.test@127.0.0.1:{}", t.other.port()),
    ] {
        let req = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw(t.app.proxy_addr(), req.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{host}: {answer:?}");
        assert_eq!(
            error_header(&answer).as_deref(),
            Some("bad_request"),
            "{host}"
        );
    }
    assert!(t.w.upstream.seen().is_empty());
    assert!(t.other_requests().is_empty());
    t.app.shutdown().await;
}

#[tokio::test]
async fn idn_hosts_route_by_their_punycode_only() {
    let t = setup_with(|w| {
        format!(
            "[[routes]]\nhost = \"xn--bcher-kva.test\"\nupstream = \"{}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\n",
            w.upstream_url()
        )
    })
    .await;
    assert_eq!(
        spelled(&t, "http://xn--bcher-kva.test/", "xn--bcher-kva.test").await,
        200
    );
    assert_eq!(spelled(&t, "/p", "XN--BCHER-KVA.test").await, 200);
    assert_eq!(t.upstream_tokens().len(), 2);
    // Raw UTF-8 in the URI or the Host header: refused, never routed or
    // passed through.
    for req in [
        "GET http://b\u{fc}cher.test/ HTTP/1.1\r\nHost: xn--bcher-kva.test\r\nConnection: close\r\n\r\n",
        "GET /u HTTP/1.1\r\nHost: b\u{fc}cher.test\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw(t.app.proxy_addr(), req.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{req:?}: {answer:?}");
    }
    assert_eq!(t.w.upstream.seen().len(), 2);
    assert!(t.other_requests().is_empty());
    t.app.shutdown().await;
}

#[tokio::test]
async fn huge_uri_is_refused_and_the_proxy_serves_on() {
    let t = setup("").await;
    let path = "a".repeat(100 * 1024);
    let req = format!("GET http://api.test/{path} HTTP/1.1\r\nHost: api.test\r\n\r\n");
    let code = status(&raw(t.app.proxy_addr(), req.as_bytes()).await);
    // 414 from the URI limit (64 KiB), or 431 where a header-size limit
    // is hit first.
    assert!(code == 414 || code == 431, "{code}");
    assert!(t.w.upstream.seen().is_empty());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

#[tokio::test]
async fn thousands_of_headers_are_refused_and_the_proxy_serves_on() {
    let t = setup("").await;
    let mut req = String::from("GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n");
    for i in 0..5000 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let code = status(&raw(t.app.proxy_addr(), req.as_bytes()).await);
    assert_eq!(code, 431, "request header fields too large");
    assert!(t.w.upstream.seen().is_empty());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

#[tokio::test]
async fn invalid_bytes_in_header_values_do_not_break_the_proxy() {
    let t = setup("").await;
    // obs-text (bytes 0x80-0xFF, not UTF-8) is legal in a field value: it is
    // passed on as opaque bytes, and the token still goes with it.
    let mut req = b"GET http://api.test/obs HTTP/1.1\r\nHost: api.test\r\nX-Obs: caf\xe9 \xff\xfe\r\nConnection: close\r\n\r\n".to_vec();
    assert_eq!(status(&raw(t.app.proxy_addr(), &req).await), 200);
    let seen = t.w.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].headers.iter().any(|(k, _)| k == "x-obs"));
    assert_eq!(t.upstream_tokens().len(), 1);
    // Control characters are not: refused by the parser.
    req = b"GET http://api.test/nul HTTP/1.1\r\nHost: api.test\r\nX-Nul: a\x00b\r\n\r\n".to_vec();
    assert_eq!(status(&raw(t.app.proxy_addr(), &req).await), 400);
    // Non-ASCII in Host: refused by the proxy, not routed.
    req = b"GET /h HTTP/1.1\r\nHost: api.test\xff\r\nConnection: close\r\n\r\n".to_vec();
    let answer = raw(t.app.proxy_addr(), &req).await;
    assert_eq!(status(&answer), 400);
    assert_eq!(error_header(&answer).as_deref(), Some("bad_request"));
    assert_eq!(t.w.upstream.seen().len(), 1);
    assert!(t.other_requests().is_empty());
    t.assert_still_serves().await;
    t.app.shutdown().await;
}

#[tokio::test]
async fn connection_header_cannot_strip_the_injected_token() {
    let t = setup("").await;
    for connection in [
        "authorization, close",
        "Authorization, host, close",
        "close, authorization",
    ] {
        let req = format!(
            "GET http://api.test/conn HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer app\r\nConnection: {connection}\r\n\r\n"
        );
        let answer = raw(t.app.proxy_addr(), req.as_bytes()).await;
        assert_eq!(status(&answer), 200, "{connection}: {answer:?}");
    }
    let seen = t.w.upstream.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(t.upstream_tokens().len(), 3, "{seen:?}");
    for s in &seen {
        assert_eq!(s.host.as_deref(), Some(t.upstream_host().as_str()));
    }
    t.app.shutdown().await;
}

#[tokio::test]
async fn redirects_are_returned_untouched_and_not_followed() {
    let t = setup("").await;
    let answer = raw(
        t.app.proxy_addr(),
        b"GET http://api.test/redirect HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 302, "{answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("location: https://elsewhere.test/"),
        "{answer:?}"
    );
    assert_eq!(t.w.upstream.seen().len(), 1, "not followed");
    assert!(t.other_requests().is_empty());
    t.app.shutdown().await;
}

#[tokio::test]
async fn dedicated_listener_ignores_the_hosts_the_app_names() {
    let t = setup_with(|w| {
        format!(
            "[[routes]]\nhost = \"own.test\"\nupstream = \"{}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\nlisten = \"127.0.0.1:0\"\n",
            w.upstream_url()
        )
    })
    .await;
    let port = t.app.route_addr("own.test").unwrap();
    // Whatever host the app names, the route's own upstream gets the
    // request (and the token); the other host gets nothing.
    for req in [
        format!(
            "GET http://{}/abs HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
            t.other
        ),
        format!(
            "GET /origin HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            t.other
        ),
    ] {
        assert_eq!(status(&raw(port, req.as_bytes()).await), 200, "{req:?}");
    }
    let seen = t.w.upstream.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.host.as_deref() == Some(t.upstream_host().as_str()))
    );
    assert_eq!(t.upstream_tokens().len(), 2);
    assert!(t.other_requests().is_empty());
    t.app.shutdown().await;
}
