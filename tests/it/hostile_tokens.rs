//! Hostile and broken token endpoints, end to end: a good token first, then
//! the endpoint goes bad in one way. The proxy must stay up, keep sending the
//! token it holds until that expires, then answer 503 `token_unavailable`
//! naming the profile and the cause, log and count the cause by reason, and
//! recover on its own when the endpoint is healthy again.
//!
//! The fake endpoint here speaks raw HTTP/1.1 over TLS so it can send what a
//! well-behaved server library would not: lies about lengths, resets, bodies
//! that never end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::support::{
    Pki, TokenState, Upstream, direct_client, error_kind, eventually, proxied_client,
};

/// Lifetime of the good token the proxy holds when the endpoint goes bad.
/// Renewal starts at half of it; it is sent until 90 % of it (the skew is
/// at most a tenth of the lifetime).
const LIFETIME: f64 = 3.0;

/// What the endpoint does with the next token request.
#[derive(Clone, Debug)]
enum Answer {
    /// A good Bearer token of this lifetime (seconds).
    Token(f64),
    /// These bytes as the whole response, then the connection is closed.
    Raw(Vec<u8>),
    /// Accepts the TCP connection and never starts TLS.
    StallHandshake,
    /// Reads the request and never answers.
    Hang,
    /// The status line, headers and part of the body, then nothing.
    HangMidBody,
    /// Reads the request, then a TCP reset.
    ResetBeforeHead,
    /// The status line, headers and part of the body, then a TCP reset.
    ResetMidBody,
    /// 200 with a chunked body that never ends.
    Endless,
}

struct EndpointState {
    answer: Mutex<Answer>,
    /// Tokens issued, shared with the upstream, which accepts only those.
    tokens: Arc<TokenState>,
    /// When each token request arrived.
    arrivals: Mutex<Vec<Instant>>,
    count: watch::Sender<usize>,
    /// The most body bytes one `Endless` answer wrote.
    streamed: AtomicUsize,
}

struct Endpoint {
    port: u16,
    state: Arc<EndpointState>,
}

impl Endpoint {
    async fn start(pki: &Pki, first: Answer) -> Self {
        let state = Arc::new(EndpointState {
            answer: Mutex::new(first),
            tokens: Arc::new(TokenState::default()),
            arrivals: Mutex::new(Vec::new()),
            count: watch::Sender::new(0),
            streamed: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&["localhost"]));
        let s = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(connection(tcp, acceptor.clone(), Arc::clone(&s)));
            }
        });
        Self { port, state }
    }

    fn set(&self, a: Answer) {
        *self.state.answer.lock().unwrap() = a;
    }

    fn requests(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until the endpoint has seen at least `n` requests.
    async fn wait_for(&self, n: usize, within: Duration) {
        let mut rx = self.state.count.subscribe();
        tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("no {n} token requests within {within:?}"))
            .unwrap();
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.state.arrivals.lock().unwrap().clone()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request per connection: reads it whole, answers as told, closes.
async fn connection(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    s: Arc<EndpointState>,
) {
    if matches!(*s.answer.lock().unwrap(), Answer::StallHandshake) {
        s.arrivals.lock().unwrap().push(Instant::now());
        s.count.send_modify(|n| *n += 1);
        let _held = tcp;
        return std::future::pending().await;
    }
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let answer = s.answer.lock().unwrap().clone();
    s.arrivals.lock().unwrap().push(Instant::now());
    s.count.send_modify(|n| *n += 1);
    match answer {
        Answer::Token(lifetime) => {
            let token = format!("tok-{:016x}", fastrand::u64(..));
            s.tokens.issued.lock().unwrap().insert(
                token.clone(),
                Instant::now() + Duration::from_secs_f64(lifetime),
            );
            let body = format!(
                r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{lifetime}}}"#
            );
            let _ = tls.write_all(&response(200, &[], body.as_bytes())).await;
            let _ = tls.shutdown().await;
        }
        Answer::Raw(bytes) => {
            let _ = tls.write_all(&bytes).await;
            let _ = tls.shutdown().await;
        }
        Answer::Hang | Answer::StallHandshake => std::future::pending().await,
        Answer::HangMidBody => {
            let _ = tls.write_all(PARTIAL).await;
            let _ = tls.flush().await;
            std::future::pending().await
        }
        Answer::ResetBeforeHead => {
            // SO_LINGER 0: closing sends RST instead of FIN.
            let _ = tls.get_ref().0.set_zero_linger();
            drop(tls);
        }
        Answer::ResetMidBody => {
            let _ = tls.write_all(PARTIAL).await;
            let _ = tls.flush().await;
            // An RST discards what the peer has not read yet, so the head
            // must be read first. Nothing here can observe that; a pause
            // makes it near certain (and a reset before the head is the
            // other case, so a miss shows as the wrong message, not a hang).
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = tls.get_ref().0.set_zero_linger();
            drop(tls);
        }
        Answer::Endless => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                        transfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            if tls.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let data = vec![b'a'; 64 * 1024];
            let mut frame = format!("{:x}\r\n", 17).into_bytes();
            frame.extend_from_slice(b"{\"access_token\":\"\r\n");
            let _ = tls.write_all(&frame).await;
            let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
            frame.extend_from_slice(&data);
            frame.extend_from_slice(b"\r\n");
            // Until the reader hangs up; bounded by the test's own timeout.
            let mut written = 0;
            while tls.write_all(&frame).await.is_ok() {
                written += data.len();
                s.streamed.fetch_max(written, Ordering::SeqCst);
            }
        }
    }
}

/// A 200 that promises 100 bytes of JSON and sends 17.
const PARTIAL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
    content-length: 100\r\nconnection: close\r\n\r\n{\"access_token\":\"";

/// A whole response with a correct content-length.
fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn json200(body: &str) -> Answer {
    Answer::Raw(response(
        200,
        &[("content-type", "application/json")],
        body.as_bytes(),
    ))
}

struct World {
    endpoint: Endpoint,
    upstream: Upstream,
    _dir: tempfile::TempDir,
    app: token_injector::Running,
}

/// The `[tokens]` keys of most tests: fast retries, and a timeout generous
/// enough for a loaded test machine.
const FAST: &str = "request_timeout = \"3s\"\nretry_max = \"200ms\"";

/// The proxy with profile `main` and route `api.test` in front of a
/// token-checking upstream; `tokens` adds keys to the `[tokens]` table.
async fn world(first: Answer, tokens: &str) -> World {
    let pki = Pki::new();
    let endpoint = Endpoint::start(&pki, first).await;
    let upstream = Upstream::start(&pki, Arc::clone(&endpoint.state.tokens)).await;
    let dir = tempfile::tempdir().unwrap();
    pki.write_ca(dir.path());
    std::fs::write(dir.path().join("client-secret"), "secret\n").unwrap();
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[tokens]
retry_initial = "50ms"
{tokens}

[profiles.main]
token_url = "https://localhost:{port}/oauth2/token"
client_id = "svc"
client_secret_file = "client-secret"
ca_file = "ca.pem"

[[routes]]
host = "api.test"
upstream = "https://localhost:{up}"
profile = "main"
ca_file = "ca.pem"
"#,
        port = endpoint.port,
        up = upstream.addr.port(),
    );
    let config =
        token_injector::config::from_text(&text, dir.path(), Vec::<(String, String)>::new())
            .unwrap_or_else(|e| panic!("config invalid:\n{e}"));
    let app = token_injector::start(config).await.unwrap();
    World {
        endpoint,
        upstream,
        _dir: dir,
        app,
    }
}

impl World {
    async fn get(&self) -> reqwest::Response {
        proxied_client(self.app.proxy_addr())
            .get("http://api.test/")
            .send()
            .await
            .unwrap()
    }

    /// The token the upstream saw last.
    fn last_token(&self) -> String {
        let seen = self.upstream.seen();
        let auth = seen.last().unwrap().authorization.clone().unwrap();
        auth.strip_prefix("Bearer ").unwrap().to_owned()
    }

    async fn admin(&self, path: &str) -> (u16, String) {
        let r = direct_client()
            .get(format!("http://{}{path}", self.app.admin_addr()))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The value of `token_injector_token_fetch_errors_total` for `reason`.
    async fn fetch_errors(&self, reason: &str) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        let series = format!(
            r#"token_injector_token_fetch_errors_total{{profile="main",reason="{reason}"}}"#
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }
}

/// One way of going bad: what the endpoint does, the metric reason, and a
/// phrase the 503 body and `/readyz` must carry.
struct Case {
    bad: Answer,
    /// The `[tokens]` keys.
    tokens: &'static str,
    reason: &'static str,
    says: &'static str,
}

/// The whole story for one case; see the module comment.
async fn survives(case: Case) {
    let t0 = Instant::now();
    let w = world(Answer::Token(LIFETIME), case.tokens).await;
    let r = w.get().await;
    assert_eq!(r.status(), 200);
    let first = w.last_token();
    w.endpoint.set(case.bad.clone());
    let good_requests = w.endpoint.requests();

    // The renewal meets the bad endpoint; the held token keeps serving.
    w.endpoint
        .wait_for(good_requests + 1, Duration::from_secs(5))
        .await;
    let r = w.get().await;
    assert_eq!(r.status(), 200, "the held token must still be used");
    assert_eq!(w.last_token(), first);

    // Until it expires: never before 90 % of its lifetime from t0 (it was
    // fetched after t0), then 503 naming the profile and the cause.
    let r = eventually(Duration::from_secs(10), || async {
        let r = w.get().await;
        (r.status() != 200).then_some(r)
    })
    .await;
    let failed_after = t0.elapsed();
    assert!(
        failed_after >= Duration::from_secs_f64(LIFETIME * 0.9),
        "503 after {failed_after:?}: the held token was dropped early"
    );
    assert_eq!(r.status(), 503);
    assert_eq!(error_kind(&r).as_deref(), Some("token_unavailable"));
    let body = r.text().await.unwrap();
    assert!(body.contains(r#"profile "main""#), "{body}");
    assert!(body.contains(case.says), "{body}");
    assert!(!body.contains("oauth2/token"), "{body}");
    for s in w.upstream.seen() {
        assert_eq!(
            s.authorization.as_deref(),
            Some(&*format!("Bearer {first}"))
        );
    }
    assert_eq!(w.upstream.state.rejected.load(Ordering::SeqCst), 0);

    // Logged and counted; readiness stays latched.
    let (status, ready) = w.admin("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let last_error = ready["profiles"]["main"]["last_error"].as_str().unwrap();
    assert!(last_error.contains(case.says), "{last_error}");
    assert!(
        w.fetch_errors(case.reason).await >= 1.0,
        "reason {} not counted",
        case.reason
    );
    let (status, _) = w.admin("/healthz").await;
    assert_eq!(status, 200);

    // Healthy again: recovery without help.
    w.endpoint.set(Answer::Token(60.0));
    eventually(Duration::from_secs(5), || async {
        (w.get().await.status() == 200).then_some(())
    })
    .await;
    let fresh = w.last_token();
    assert_ne!(fresh, first);
    assert!(w.endpoint.state.tokens.valid(&fresh));
    let (_, ready) = w.admin("/readyz").await;
    assert!(ready.contains(r#""last_error":null"#), "{ready}");
    w.app.shutdown().await;
}

fn status_case(status: u16, body: &str, reason: &'static str, says: &'static str) -> Case {
    Case {
        tokens: FAST,
        bad: Answer::Raw(response(
            status,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )),
        reason,
        says,
    }
}

fn invalid(body: &str, says: &'static str) -> Case {
    Case {
        tokens: FAST,
        bad: json200(body),
        reason: "invalid_response",
        says,
    }
}

#[tokio::test]
async fn server_error_500_without_oauth_body() {
    survives(status_case(
        500,
        "internal error",
        "http_status",
        "answered HTTP 500 without an OAuth error body",
    ))
    .await;
}

#[tokio::test]
async fn server_error_500_with_oauth_body() {
    survives(status_case(
        500,
        r#"{"error":"server_error","error_description":"db down"}"#,
        "server_error",
        "answered HTTP 500: server_error (db down)",
    ))
    .await;
}

#[tokio::test]
async fn rate_limited_429() {
    survives(Case {
        tokens: FAST,
        bad: Answer::Raw(response(429, &[("retry-after", "1")], b"slow down")),
        reason: "http_status",
        says: "answered HTTP 429",
    })
    .await;
}

/// A timeout short enough that a hanging renewal fails before the held
/// token expires.
const HANG: &str = "request_timeout = \"1s\"\nretry_max = \"200ms\"";

#[tokio::test]
async fn stalled_tls_handshake_times_out() {
    survives(Case {
        tokens: HANG,
        bad: Answer::StallHandshake,
        reason: "timeout",
        says: "timed out after 1s",
    })
    .await;
}

#[tokio::test]
async fn hang_before_headers_times_out() {
    survives(Case {
        tokens: HANG,
        bad: Answer::Hang,
        reason: "timeout",
        says: "timed out after 1s",
    })
    .await;
}

#[tokio::test]
async fn hang_mid_body_times_out() {
    survives(Case {
        tokens: HANG,
        bad: Answer::HangMidBody,
        reason: "timeout",
        says: "timed out after 1s",
    })
    .await;
}

#[tokio::test]
async fn reset_mid_response() {
    survives(Case {
        tokens: FAST,
        bad: Answer::ResetMidBody,
        reason: "connect",
        says: "the token response broke off",
    })
    .await;
}

#[tokio::test]
async fn reset_before_response() {
    survives(Case {
        tokens: FAST,
        bad: Answer::ResetBeforeHead,
        reason: "connect",
        says: "cannot reach the token endpoint",
    })
    .await;
}

#[tokio::test]
async fn closed_mid_body() {
    // FIN, not RST, before the promised Content-Length.
    let mut bytes = PARTIAL.to_vec();
    bytes.truncate(PARTIAL.len() - 3);
    survives(Case {
        tokens: FAST,
        bad: Answer::Raw(bytes),
        reason: "connect",
        says: "the token response broke off",
    })
    .await;
}

#[tokio::test]
async fn not_http_at_all() {
    survives(Case {
        tokens: FAST,
        bad: Answer::Raw(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        reason: "connect",
        says: "cannot reach the token endpoint",
    })
    .await;
}

#[tokio::test]
async fn html_instead_of_json() {
    survives(Case {
        tokens: FAST,
        bad: Answer::Raw(response(
            200,
            &[("content-type", "text/html")],
            b"<html><body>Login</body></html>",
        )),
        reason: "invalid_response",
        says: "body is not a JSON object",
    })
    .await;
}

#[tokio::test]
async fn truncated_json() {
    survives(invalid(
        r#"{"access_token":"abc","token_type":"Bea"#,
        "body is not a JSON object",
    ))
    .await;
}

#[tokio::test]
async fn expires_in_zero() {
    survives(invalid(
        r#"{"access_token":"abc","token_type":"Bearer","expires_in":0}"#,
        "expires_in must be a positive number",
    ))
    .await;
}

#[tokio::test]
async fn expires_in_negative() {
    survives(invalid(
        r#"{"access_token":"abc","token_type":"Bearer","expires_in":-60}"#,
        "expires_in must be a positive number",
    ))
    .await;
}

#[tokio::test]
async fn expires_in_not_numeric_string() {
    survives(invalid(
        r#"{"access_token":"abc","token_type":"Bearer","expires_in":"soon"}"#,
        "expires_in is not a number",
    ))
    .await;
}

#[tokio::test]
async fn expires_in_tiny_fraction() {
    // 10 ms: dead on arrival, refused rather than renewed in a spin.
    survives(invalid(
        r#"{"access_token":"abc","token_type":"Bearer","expires_in":0.01}"#,
        "the token lives 10ms, less than the minimum 1s",
    ))
    .await;
}

#[tokio::test]
async fn expires_in_under_a_second() {
    survives(invalid(
        r#"{"access_token":"abc","token_type":"Bearer","expires_in":0.9}"#,
        "the token lives 900ms, less than the minimum 1s",
    ))
    .await;
}

#[tokio::test]
async fn jwt_exp_already_past() {
    // A JWT whose own exp is past, whatever expires_in claims.
    let b = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let jwt = format!("{}.{}.sig", b(r#"{"alg":"none"}"#), b(r#"{"exp":1000}"#));
    survives(invalid(
        &format!(r#"{{"access_token":"{jwt}","token_type":"Bearer","expires_in":3600}}"#),
        "the token's JWT exp is already past",
    ))
    .await;
}

#[tokio::test]
async fn token_type_mac_refused() {
    survives(invalid(
        r#"{"access_token":"abc","token_type":"mac","expires_in":60}"#,
        r#"token_type "mac" is not Bearer"#,
    ))
    .await;
}

#[tokio::test]
async fn token_type_dpop_refused() {
    survives(invalid(
        r#"{"access_token":"abc","token_type":"DPoP","expires_in":60}"#,
        "token_type DPoP is not supported",
    ))
    .await;
}

const ILLEGAL: &str = "access_token has characters not allowed in an HTTP header";

#[tokio::test]
async fn access_token_with_crlf_refused() {
    survives(invalid(
        r#"{"access_token":"abc\r\nX-Evil: 1","token_type":"Bearer","expires_in":60}"#,
        ILLEGAL,
    ))
    .await;
}

#[tokio::test]
async fn access_token_with_nul_refused() {
    survives(invalid(
        r#"{"access_token":"abc\u0000def","token_type":"Bearer","expires_in":60}"#,
        ILLEGAL,
    ))
    .await;
}

#[tokio::test]
async fn access_token_non_ascii_refused() {
    survives(invalid(
        r#"{"access_token":"t\u00f6ken","token_type":"Bearer","expires_in":60}"#,
        ILLEGAL,
    ))
    .await;
}

#[tokio::test]
async fn endless_body_is_cut_at_the_limit() {
    let t0 = Instant::now();
    survives(Case {
        tokens: FAST,
        bad: Answer::Endless,
        reason: "invalid_response",
        says: "body larger than 1048576 bytes",
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn endless_body_is_not_read_to_the_end() {
    // The reader stops at the limit while streaming: the writer could not
    // push much more than the limit plus what the sockets buffer.
    let w = world(Answer::Endless, FAST).await;
    w.endpoint.wait_for(2, Duration::from_secs(5)).await;
    let r = w.get().await;
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("body larger than"), "{body}");
    let streamed = w.endpoint.state.streamed.load(Ordering::SeqCst);
    // One attempt reads ~1 MiB; loopback socket buffers hold a few more.
    assert!(streamed < 16 << 20, "{streamed} bytes streamed");
    w.app.shutdown().await;
}

#[tokio::test]
async fn declared_huge_body_refused_before_reading() {
    // Promises 50 MB and sends 1 kB, then closes: refusing on the
    // Content-Length alone gives invalid_response, not a broken body.
    let mut bytes = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
        content-length: 50000000\r\n\r\n{"
        .to_vec();
    bytes.extend_from_slice(&[b' '; 1000]);
    let w = world(Answer::Raw(bytes), FAST).await;
    w.endpoint.wait_for(1, Duration::from_secs(5)).await;
    let r = w.get().await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_kind(&r).as_deref(), Some("token_unavailable"));
    let body = r.text().await.unwrap();
    assert!(body.contains("body larger than 1048576 bytes"), "{body}");
    assert!(w.fetch_errors("invalid_response").await >= 1.0);
    assert_eq!(w.fetch_errors("connect").await, 0.0);
    w.app.shutdown().await;
}

/// Gaps between consecutive token requests from the `from`-th on.
fn gaps(arrivals: &[Instant], from: usize) -> Vec<Duration> {
    arrivals[from..].windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test]
async fn retry_after_is_honoured() {
    // Without the header, the first retries come after 25–100 ms.
    let bad = Answer::Raw(response(
        503,
        &[("retry-after", "1")],
        br#"{"error":"temporarily_unavailable"}"#,
    ));
    let w = world(bad, "request_timeout = \"3s\"\nretry_max = \"5s\"").await;
    w.endpoint.wait_for(3, Duration::from_secs(10)).await;
    for gap in gaps(&w.endpoint.arrivals(), 0) {
        assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
        assert!(gap < Duration::from_millis(2500), "retried after {gap:?}");
    }
    assert!(w.fetch_errors("temporarily_unavailable").await >= 2.0);
    w.app.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_capped_by_retry_max() {
    let bad = Answer::Raw(response(429, &[("retry-after", "3600")], b""));
    let w = world(bad, "request_timeout = \"3s\"\nretry_max = \"400ms\"").await;
    w.endpoint.wait_for(4, Duration::from_secs(10)).await;
    for gap in gaps(&w.endpoint.arrivals(), 0) {
        assert!(gap >= Duration::from_millis(380), "retried after {gap:?}");
        assert!(gap < Duration::from_secs(2), "retried after {gap:?}");
    }
    w.app.shutdown().await;
}

#[tokio::test]
async fn retry_after_http_date_is_honoured() {
    let when = std::time::SystemTime::now() + Duration::from_secs(2);
    let date = httpdate_fmt(when);
    let bad = Answer::Raw(response(503, &[("retry-after", &date)], b""));
    let w = world(bad, "request_timeout = \"3s\"\nretry_max = \"5s\"").await;
    w.endpoint.wait_for(2, Duration::from_secs(10)).await;
    let gap = gaps(&w.endpoint.arrivals(), 0)[0];
    // The date has whole seconds: at least one second away, at most two.
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    assert!(gap < Duration::from_millis(3000), "retried after {gap:?}");
    w.app.shutdown().await;
}

/// An IMF-fixdate, as `Retry-After` carries it.
fn httpdate_fmt(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86400;
    let rem = secs % 86400;
    let (y, m, d) = civil_from_days(days as i64);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[tokio::test]
async fn accepted_shapes_serve_tokens() {
    // Shapes a lenient reading accepts: expires_in as a numeric string or a
    // fraction, huge (capped), missing (the default lifetime), token_type
    // missing or in lower case.
    let shapes = [
        r#"{"access_token":"s1","token_type":"Bearer","expires_in":"3600"}"#,
        r#"{"access_token":"s2","token_type":"bearer","expires_in":59.5}"#,
        r#"{"access_token":"s3","token_type":"Bearer","expires_in":1e300}"#,
        r#"{"access_token":"s4","token_type":"Bearer"}"#,
        r#"{"access_token":"s5","expires_in":60}"#,
    ];
    let w = world(
        Answer::Token(60.0),
        "request_timeout = \"3s\"\nretry_max = \"200ms\"\nunauthorized_refresh_interval = \"0s\"",
    )
    .await;
    for (i, shape) in shapes.iter().enumerate() {
        let token = format!("s{}", i + 1);
        w.endpoint
            .state
            .tokens
            .issued
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now() + Duration::from_secs(60));
        w.endpoint.set(json200(shape));
        let before = w.endpoint.requests();
        // An upstream 401 makes the proxy fetch again at once.
        w.upstream.state.force_401.store(1, Ordering::SeqCst);
        let r = w.get().await;
        assert_eq!(
            r.status(),
            200,
            "{shape} {:?}",
            w.upstream
                .seen()
                .iter()
                .map(|s| s.authorization.clone())
                .collect::<Vec<_>>()
        );
        assert!(w.endpoint.requests() > before, "{shape}");
        assert_eq!(w.last_token(), token, "{shape}");
        let (_, ready) = w.admin("/readyz").await;
        assert!(ready.contains(r#""last_error":null"#), "{shape}: {ready}");
    }
    w.app.shutdown().await;
}

/// Log lines written while a test runs, for one thread's subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn failures_are_logged_with_reason_and_without_tokens() {
    // tracing caches per callsite, for the whole process, whether anyone
    // wants its events. While exactly one Dispatch is registered, a callsite
    // hit for the first time asks the default subscriber of the thread that
    // hit it: if that is another test's thread, which has none, "token fetch
    // failed" is cached as never, for this thread too (tokio-rs/tracing#3611).
    // With a second registered Dispatch, one that enables nothing, every
    // registered Dispatch is asked instead.
    let _second = tracing::Dispatch::new(tracing_subscriber::fmt().with_env_filter("off").finish());
    // The test runtime has one thread: the proxy's tasks log through this
    // thread's default subscriber.
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let w = world(
        json200(r#"{"access_token":"SEKRET-1\r\nX-Evil: 1","token_type":"Bearer"}"#),
        FAST,
    )
    .await;
    w.endpoint.wait_for(2, Duration::from_secs(5)).await;
    w.endpoint.set(json200(
        r#"{"access_token":"SEKRET-2","token_type":"DPoP","expires_in":60}"#,
    ));
    let n = w.endpoint.requests();
    w.endpoint.wait_for(n + 2, Duration::from_secs(5)).await;
    w.endpoint.set(Answer::Token(60.0));
    eventually(Duration::from_secs(5), || async {
        (w.get().await.status() == 200).then_some(())
    })
    .await;
    let good = w.last_token();
    w.app.shutdown().await;

    let text = logs.text();
    let failed: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("token fetch failed"))
        .collect();
    assert!(failed.len() >= 4, "{text}");
    assert!(failed.iter().all(
        |l| l.contains("reason=\"invalid_response\"") || l.contains("reason=invalid_response")
    ));
    assert!(
        failed
            .iter()
            .any(|l| l.contains("not allowed in an HTTP header")),
        "{text}"
    );
    assert!(
        failed.iter().any(|l| l.contains("DPoP is not supported")),
        "{text}"
    );
    for secret in ["SEKRET", good.as_str()] {
        assert!(!text.contains(secret), "{secret} logged:\n{text}");
    }
}
