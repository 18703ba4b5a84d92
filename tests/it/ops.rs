//! Operations tests: the admin listener (`/healthz`, `/readyz`, `/metrics`)
//! end to end, the exposition checked by `promtool`, and a real Prometheus
//! server scraping the proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

// ---------------------------------------------------------------- helpers

/// Polls `check` until it gives `Ok`, at most `within`; the last `Err` (what
/// was seen instead) goes into the panic message.
async fn until<T>(
    within: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last seen:\n{seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A loopback port with nothing listening: bind, note, close.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// GETs `path` on the admin listener: (status, content type, body).
async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String, String) {
    let r = direct_client()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} on the admin listener: {e}"));
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ctype, r.text().await.unwrap())
}

/// A sample of the Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses one sample line: `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_owned();
    if name.is_empty() {
        return Err("no metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start();
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=').ok_or("label without '='")?;
            let key = s[..eq].trim().to_owned();
            let mut chars = s[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value not quoted")?
                .chars();
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")? {
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        other => return Err(format!("bad escape \\{other:?}")),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            s = chars.as_str().trim_start();
            s = s.strip_prefix(',').unwrap_or(s);
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("duplicate label {key}"));
            }
        }
    }
    if !rest.starts_with(|c: char| c.is_ascii_whitespace()) {
        return Err("no space before the value".into());
    }
    let v = rest.split_ascii_whitespace().next().ok_or("no value")?;
    let value = match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// One scrape of `/metrics`, parsed.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|e| panic!("bad sample line {l:?}: {e}")))
            .collect();
        Self { text, samples }
    }

    /// The sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
    }

    fn named(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// `# TYPE` lines: family → type.
    fn types(&self) -> BTreeMap<&str, &str> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect()
    }
}

async fn scrape(admin: SocketAddr) -> Scrape {
    let (status, ctype, body) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    assert!(
        ctype.starts_with("text/plain") && ctype.contains("version=0.0.4"),
        "/metrics content type {ctype:?}"
    );
    Scrape::parse(body)
}

/// Runs `tool --version`; a missing tool fails the test, never skips it.
fn require_tool(tool: &str) -> String {
    let out = Command::new(tool)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "`{tool}` is required by this test but cannot be run ({e}); \
             install the Debian package `prometheus` (provides promtool and prometheus)"
            )
        });
    assert!(
        out.status.success(),
        "`{tool} --version` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().unwrap_or_default().to_owned()
}

/// Proxies `n` sequential GETs to `url`, each expected to answer `want`.
async fn get_n(client: &reqwest::Client, url: &str, n: usize, want: u16) {
    for _ in 0..n {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), want, "GET {url}");
    }
}

/// A route `dead.test` whose upstream is a closed loopback port.
fn dead_route(port: u16) -> String {
    format!(
        r#"
[[routes]]
host = "dead.test"
upstream = "https://127.0.0.1:{port}"
profile = "main"
"#
    )
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn healthz_is_200_while_serving_and_unknown_paths_are_404() {
    // Health does not depend on tokens: the endpoint is down throughout.
    let w = World::new(Mode::Fail(500)).await;
    let app = w.start(&w.config("", "")).await;
    let admin = app.admin_addr();
    let (status, _, body) = admin_get(admin, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "ok");
    let (status, _, _) = admin_get(admin, "/readyz").await;
    assert_eq!(status, 503, "not ready while the token endpoint is down");
    for path in ["/nope", "/metrics/x", "/healthz/", "/"] {
        let (status, _, body) = admin_get(admin, path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    // A query string does not change the path.
    let (status, _, _) = admin_get(admin, "/healthz?probe=1").await;
    assert_eq!(status, 200);
    app.shutdown().await;
    // After shutdown nothing answers on the admin port any more.
    let after = direct_client()
        .get(format!("http://{admin}/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "healthz answered after shutdown: {after:?}");
}

#[tokio::test]
async fn readyz_latches_and_reports_profile_state_without_secrets() {
    let w = World::new(Mode::Fail(500)).await;
    let app = w.start(&w.config("", "")).await;
    let admin = app.admin_addr();
    let mut bodies: Vec<String> = Vec::new();

    // 1. Endpoint failing from the start: 503, "pending", with the error.
    w.tokens
        .state
        .wait_for_requests(1, Duration::from_secs(5))
        .await;
    let pending = until(
        Duration::from_secs(5),
        "pending with last_error",
        async || {
            let (status, ctype, body) = admin_get(admin, "/readyz").await;
            bodies.push(body.clone());
            assert_eq!(status, 503, "ready without ever holding a token: {body}");
            assert!(ctype.starts_with("application/json"), "{ctype}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            (v["profiles"]["main"]["last_error"].is_string())
                .then_some(v)
                .ok_or(body)
        },
    )
    .await;
    let main = &pending["profiles"]["main"];
    assert_eq!(pending["ready"], false, "{pending}");
    assert_eq!(main["state"], "pending", "{pending}");
    assert!(main["valid_until"].is_null(), "{pending}");
    let err = main["last_error"].as_str().unwrap();
    assert!(err.contains("500"), "last_error names the failure: {err}");
    assert_eq!(
        pending["profiles"].as_object().unwrap().len(),
        1,
        "only the profile in use: {pending}"
    );

    // 2. Endpoint back (2-second tokens): 200, "valid", with valid_until.
    w.tokens.state.set_mode(Mode::Issue(2.0));
    let issued_after = unix_now();
    let valid = until(Duration::from_secs(5), "ready and valid", async || {
        let (status, _, body) = admin_get(admin, "/readyz").await;
        bodies.push(body.clone());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (status == 200 && v["profiles"]["main"]["state"] == "valid")
            .then_some(v)
            .ok_or(format!("{status} {body}"))
    })
    .await;
    let main = &valid["profiles"]["main"];
    assert_eq!(valid["ready"], true, "{valid}");
    assert!(main["last_error"].is_null(), "{valid}");
    let until_text = main["valid_until"]
        .as_str()
        .expect("valid_until is a string");
    let until_unix = humantime::parse_rfc3339(until_text)
        .unwrap_or_else(|e| panic!("valid_until {until_text:?} is not RFC 3339: {e}"))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        until_unix >= issued_after + 2.0 - 1.5 && until_unix <= unix_now() + 2.0 + 1.0,
        "valid_until {until_text} is not ~2 s after issue"
    );
    assert_eq!(
        main["valid_until_unix"].as_f64(),
        Some(until_unix.floor()),
        "{valid}"
    );

    // 3. Endpoint down again and the token runs out: still 200 (the latch),
    //    while the body tells the truth.
    w.tokens.state.set_mode(Mode::Fail(500));
    let expired = until(
        Duration::from_secs(10),
        "expired, still ready",
        async || {
            let (status, _, body) = admin_get(admin, "/readyz").await;
            bodies.push(body.clone());
            assert_eq!(
                status, 200,
                "readiness dropped after a token-endpoint blip: {body}"
            );
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let main = &v["profiles"]["main"];
            (main["state"] == "expired" && main["last_error"].is_string())
                .then_some(v.clone())
                .ok_or(body)
        },
    )
    .await;
    assert_eq!(expired["ready"], true, "{expired}");
    assert!(
        expired["profiles"]["main"]["last_error"]
            .as_str()
            .unwrap()
            .contains("500"),
        "{expired}"
    );
    // The proxy agrees that there is no usable token.
    let r = proxied_client(app.proxy_addr())
        .get("http://api.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let (status, _, body) = admin_get(admin, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    bodies.push(body);

    // Never a token, never the secret, in any of the bodies.
    let issued: Vec<String> = w
        .tokens
        .state
        .issued
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(!issued.is_empty());
    let encoded_secret: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
    for body in &bodies {
        for token in &issued {
            assert!(!body.contains(token.as_str()), "token in /readyz: {body}");
        }
        assert!(!body.contains(SECRET), "secret in /readyz: {body}");
        assert!(!body.contains(&encoded_secret), "secret in /readyz: {body}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn metrics_count_tokens_requests_and_errors_end_to_end() {
    let w = World::new(Mode::Issue(60.0)).await;
    // A slow endpoint keeps the first fetch in flight while a burst arrives.
    *w.tokens.state.delay.lock().unwrap() = Duration::from_millis(300);
    let text = w.config("", &dead_route(closed_port()));
    let started = unix_now();
    let app = w.start(&text).await;
    let admin = app.admin_addr();
    let client = proxied_client(app.proxy_addr());

    // --- cold burst, then steady requests.
    const BURST: usize = 20;
    const STEADY: usize = 7;
    let burst: Vec<_> = (0..BURST)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                c.get(format!("http://api.test/burst/{i}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for t in burst {
        assert_eq!(t.await.unwrap(), 200);
    }
    let fetched_by = unix_now();
    assert_eq!(
        w.tokens.state.count(),
        1,
        "the burst shared one token request"
    );
    get_n(&client, "http://api.test/steady", STEADY, 200).await;
    let n = (BURST + STEADY) as f64;

    // --- a route whose upstream refuses connections; unrouted, wild hosts.
    get_n(&client, "http://dead.test/", 1, 502).await;
    get_n(&client, "http://wild-4a1c9e.unrouted.example/x", 1, 403).await;
    let mut raw = tokio::net::TcpStream::connect(app.proxy_addr())
        .await
        .unwrap();
    raw.write_all(
        b"GET /x HTTP/1.1\r\nHost: wild\"},route=\"injected\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 403") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    let wild_code = &answer[9..12];

    let m = scrape(admin).await;
    let main = [("profile", "main")];
    // Tokens: one fetch, matching the token server's count.
    assert_eq!(
        m.value(
            "token_injector_token_fetch_total",
            &[("profile", "main"), ("result", "success")]
        ),
        w.tokens.state.count() as f64
    );
    assert_eq!(
        m.value(
            "token_injector_token_fetch_total",
            &[("profile", "main"), ("result", "error")]
        ),
        0.0
    );
    assert_eq!(
        m.value("token_injector_token_fetch_duration_seconds_count", &main),
        1.0
    );
    assert!(
        m.value("token_injector_token_fetch_duration_seconds_sum", &main) >= 0.3,
        "the fetch took the endpoint's 300 ms delay"
    );
    assert_eq!(
        m.value(
            "token_injector_token_fetch_duration_seconds_bucket",
            &[("profile", "main"), ("le", "0.25")]
        ),
        0.0
    );
    let expiry = m.value("token_injector_token_expiry_timestamp_seconds", &main);
    assert!(
        expiry >= started + 60.0 - 1.0 && expiry <= fetched_by + 60.0 + 1.0,
        "expiry {expiry} not in [{}, {}]",
        started + 60.0,
        fetched_by + 60.0
    );
    assert_eq!(
        m.value("token_injector_token_fetch_consecutive_failures", &main),
        0.0
    );
    let coalesced = m.value("token_injector_token_requests_coalesced_total", &main);
    assert!(
        coalesced > 0.0 && coalesced <= BURST as f64,
        "coalesced {coalesced} of a cold burst of {BURST}"
    );
    // Requests: by route and code, and the duration histogram.
    let api = [("route", "api.test")];
    assert_eq!(
        m.value(
            "token_injector_requests_total",
            &[("route", "api.test"), ("code", "200")]
        ),
        n
    );
    assert_eq!(
        m.value("token_injector_request_duration_seconds_count", &api),
        n
    );
    assert_eq!(
        m.value(
            "token_injector_request_duration_seconds_bucket",
            &[("route", "api.test"), ("le", "+Inf")]
        ),
        n
    );
    assert_eq!(
        m.value(
            "token_injector_requests_total",
            &[("route", "dead.test"), ("code", "502")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "token_injector_upstream_errors_total",
            &[("route", "dead.test"), ("kind", "connect")]
        ),
        1.0
    );
    // Unrouted requests count under route "-"; the Host a client sent
    // never becomes a label value.
    let unrouted_403 = m
        .get(
            "token_injector_requests_total",
            &[("route", "-"), ("code", "403")],
        )
        .unwrap_or(0.0);
    let unrouted_wild = m
        .get(
            "token_injector_requests_total",
            &[("route", "-"), ("code", wild_code)],
        )
        .unwrap_or(0.0);
    assert!(
        unrouted_403 >= 1.0 && unrouted_wild >= 1.0,
        "unrouted requests not counted under route \"-\":\n{}",
        m.text
    );
    assert_eq!(
        m.value(
            "token_injector_request_duration_seconds_count",
            &[("route", "-")]
        ),
        2.0
    );
    let routes: BTreeSet<&str> = m
        .samples
        .iter()
        .filter_map(|s| s.labels.get("route").map(String::as_str))
        .collect();
    assert_eq!(
        routes,
        BTreeSet::from(["-", "api.test", "dead.test"]),
        "route label values are bounded by the config"
    );
    for s in &m.samples {
        for v in s.labels.values() {
            assert!(
                !v.contains("wild") && !v.contains("injected"),
                "a client-sent host became a label: {s:?}"
            );
        }
    }
    // Build and process metrics.
    assert_eq!(
        m.value(
            "token_injector_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(m.named("token_injector_build_info").len(), 1);
    // The prometheus crate's process collector counts whole CPU seconds, so
    // a short test may well read 0 here.
    assert!(m.value("process_cpu_seconds_total", &[]) >= 0.0);
    assert!(m.value("process_resident_memory_bytes", &[]) > 1e6);
    assert!(m.value("process_open_fds", &[]) > 0.0);
    assert!(m.value("process_start_time_seconds", &[]) <= unix_now());
    assert_eq!(
        m.value(
            "token_injector_config_reloads_total",
            &[("result", "error")]
        ),
        0.0
    );
    // The pooled keep-alive connections of `client` are open.
    assert!(m.value("token_injector_client_connections_open", &[]) >= 1.0);

    // --- the endpoint fails: an upstream 401 drops the token, renewals fail.
    *w.tokens.state.delay.lock().unwrap() = Duration::ZERO;
    w.tokens.state.set_mode(Mode::Fail(500));
    w.upstream.state.force_401.store(1, Ordering::SeqCst);
    get_n(&client, "http://api.test/refused", 1, 401).await;
    let failing = until(
        Duration::from_secs(10),
        "three failures in a row",
        async || {
            let m = scrape(admin).await;
            let consecutive = m.value("token_injector_token_fetch_consecutive_failures", &main);
            (consecutive >= 3.0)
                .then_some(m)
                .ok_or(format!("{consecutive}"))
        },
    )
    .await;
    assert!(
        failing.value(
            "token_injector_token_fetch_errors_total",
            &[("profile", "main"), ("reason", "server_error")]
        ) >= 3.0
    );
    let reasons: Vec<&Sample> = failing.named("token_injector_token_fetch_errors_total");
    assert_eq!(reasons.len(), 1, "only server_error: {reasons:?}");
    assert_eq!(
        failing.value(
            "token_injector_token_fetch_total",
            &[("profile", "main"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        failing.value(
            "token_injector_requests_total",
            &[("route", "api.test"), ("code", "401")]
        ),
        1.0
    );

    // --- recovery: the counters add up to what the token server saw.
    w.tokens.state.set_mode(Mode::Issue(60.0));
    let state = &w.tokens.state;
    let m = until(
        Duration::from_secs(10),
        "recovered, counts settled",
        async || {
            let m = scrape(admin).await;
            let seen = state.count() as f64;
            let ok = m.value(
                "token_injector_token_fetch_total",
                &[("profile", "main"), ("result", "success")],
            );
            let err = m.value(
                "token_injector_token_fetch_total",
                &[("profile", "main"), ("result", "error")],
            );
            (ok == 2.0 && ok + err == seen)
                .then_some(m)
                .ok_or(format!("success {ok} + error {err} vs server {seen}"))
        },
    )
    .await;
    let seen = w.tokens.state.count() as f64;
    let errors = m.value(
        "token_injector_token_fetch_total",
        &[("profile", "main"), ("result", "error")],
    );
    assert!(errors >= 3.0);
    assert_eq!(
        m.value(
            "token_injector_token_fetch_errors_total",
            &[("profile", "main"), ("reason", "server_error")]
        ),
        errors
    );
    assert_eq!(
        m.value("token_injector_token_fetch_duration_seconds_count", &main),
        seen
    );
    assert_eq!(
        m.value("token_injector_token_fetch_consecutive_failures", &main),
        0.0
    );
    assert!(
        m.value("token_injector_token_expiry_timestamp_seconds", &main) > expiry,
        "the new token expires later"
    );
    get_n(&client, "http://api.test/after", 1, 200).await;

    // --- open client connections follow the clients.
    drop(client);
    let hold = tokio::net::TcpStream::connect(app.proxy_addr())
        .await
        .unwrap();
    until(Duration::from_secs(10), "one connection open", async || {
        let v = scrape(admin)
            .await
            .value("token_injector_client_connections_open", &[]);
        (v == 1.0).then_some(()).ok_or(format!("{v}"))
    })
    .await;
    drop(hold);
    until(Duration::from_secs(10), "no connection open", async || {
        let v = scrape(admin)
            .await
            .value("token_injector_client_connections_open", &[]);
        (v == 0.0).then_some(()).ok_or(format!("{v}"))
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn metrics_pass_promtool_check() {
    let version = require_tool("promtool");
    let w = World::new(Mode::Fail(500)).await;
    let app = w.start(&w.config("", &dead_route(closed_port()))).await;
    let admin = app.admin_addr();
    let client = proxied_client(app.proxy_addr());
    // Populate every series: failed and good fetches, 200, 401 retry, 502,
    // 403, an upstream error.
    w.tokens
        .state
        .wait_for_requests(2, Duration::from_secs(5))
        .await;
    w.tokens.state.set_mode(Mode::Issue(60.0));
    until(Duration::from_secs(5), "a token", async || {
        let s = client
            .get("http://api.test/")
            .send()
            .await
            .unwrap()
            .status();
        (s == 200).then_some(()).ok_or(s.to_string())
    })
    .await;
    w.upstream.state.force_401.store(1, Ordering::SeqCst);
    get_n(&client, "http://api.test/retried", 1, 200).await;
    get_n(&client, "http://dead.test/", 1, 502).await;
    get_n(&client, "http://elsewhere.example/", 1, 403).await;
    let m = scrape(admin).await;
    assert_eq!(
        m.value(
            "token_injector_upstream_unauthorized_retries_total",
            &[("route", "api.test")]
        ),
        1.0
    );
    assert!(
        m.value(
            "token_injector_token_fetch_errors_total",
            &[("profile", "main"), ("reason", "server_error")]
        ) >= 2.0
    );
    // The families of the spec, with their types.
    let types = m.types();
    for (family, kind) in [
        ("token_injector_token_fetch_total", "counter"),
        ("token_injector_token_fetch_duration_seconds", "histogram"),
        ("token_injector_token_expiry_timestamp_seconds", "gauge"),
        ("token_injector_requests_total", "counter"),
        ("token_injector_request_duration_seconds", "histogram"),
        (
            "token_injector_upstream_unauthorized_retries_total",
            "counter",
        ),
        ("token_injector_config_reloads_total", "counter"),
    ] {
        assert_eq!(types.get(family), Some(&kind), "{family}\n{}", m.text);
    }

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(m.text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "{version}: `promtool check metrics` exited {} with:\n{problems}\non:\n{}",
        out.status,
        m.text
    );
    app.shutdown().await;
}

/// Kills and reaps a child process when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_admin_listener() {
    require_tool("prometheus");
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w.start(&w.config("", "")).await;
    let client = proxied_client(app.proxy_addr());
    get_n(&client, "http://api.test/", 3, 200).await;
    assert_eq!(w.tokens.state.count(), 1);

    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: token-injector\n    static_configs:\n      \
             - targets: [\"{}\"]\n",
            app.admin_addr()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _prometheus = ChildGuard(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts"),
    );
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let http = direct_client();
    let base = format!("http://127.0.0.1:{port}");
    until(
        Duration::from_secs(20),
        "prometheus ready",
        async || match http.get(format!("{base}/-/ready")).send().await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(format!("{}\n{}", r.status(), log_tail())),
            Err(e) => Err(format!("{e}\n{}", log_tail())),
        },
    )
    .await;

    // The query API's value of `query`: a single sample's value, as text.
    let query = async |q: &str| -> Result<String, String> {
        let url =
            url::Url::parse_with_params(&format!("{base}/api/v1/query"), &[("query", q)]).unwrap();
        let body = http
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        match v["data"]["result"].as_array().map(Vec::as_slice) {
            Some([one]) => one["value"][1]
                .as_str()
                .map(str::to_owned)
                .ok_or(body.clone()),
            _ => Err(body),
        }
    };
    let success = r#"token_injector_token_fetch_total{profile="main",result="success"}"#;
    let want = w.tokens.state.count().to_string();
    until(
        Duration::from_secs(20),
        "the scraped fetch count",
        async || {
            let got = query(success).await?;
            (got == want)
                .then_some(())
                .ok_or(format!("{got} != {want}\n{}", log_tail()))
        },
    )
    .await;
    // The target is healthy: Prometheus parsed the whole exposition.
    let targets: serde_json::Value = serde_json::from_str(
        &http
            .get(format!("{base}/api/v1/targets"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let active = targets["data"]["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{targets}");
    assert_eq!(active[0]["health"], "up", "{targets}");
    assert_eq!(active[0]["lastError"], "", "{targets}");
    assert_eq!(query("up").await.as_deref(), Ok("1"));
    assert_eq!(
        query(r#"token_injector_requests_total{route="api.test",code="200"}"#)
            .await
            .as_deref(),
        Ok("3")
    );

    // A later fetch (an upstream 401 forces one) shows up at the next scrapes.
    w.upstream.state.force_401.store(1, Ordering::SeqCst);
    get_n(&client, "http://api.test/again", 1, 200).await;
    let want = w.tokens.state.count().to_string();
    assert_eq!(want, "2");
    until(Duration::from_secs(10), "the new fetch count", async || {
        let got = query(success).await?;
        (got == want)
            .then_some(())
            .ok_or(format!("{got} != {want}"))
    })
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn reload_counts_and_drops_the_series_of_removed_routes_and_profiles() {
    let w = World::new(Mode::Issue(60.0)).await;
    // Profile `other` points at a closed port: its fetches fail ("connect").
    let extra = format!(
        r#"{dead}
[[routes]]
host = "other.test"
profile = "other"

[profiles.other]
token_url = "https://localhost:{closed}/oauth2/token"
client_id = "other"
client_secret_file = "client-secret"
ca_file = "ca.pem"
"#,
        dead = dead_route(closed_port()),
        closed = closed_port(),
    );
    let full = w.dir.path().join("full.toml");
    std::fs::write(&full, w.config("", &extra)).unwrap();
    let config = token_injector::config::load(&full).unwrap();
    let app = token_injector::start(config).await.unwrap();
    let admin = app.admin_addr();
    let client = proxied_client(app.proxy_addr());
    get_n(&client, "http://api.test/", 1, 200).await;
    get_n(&client, "http://dead.test/", 1, 502).await;
    get_n(&client, "http://other.test/", 1, 503).await;
    let before = until(
        Duration::from_secs(5),
        "a failed fetch of other",
        async || {
            let m = scrape(admin).await;
            m.get(
                "token_injector_token_fetch_errors_total",
                &[("profile", "other"), ("reason", "connect")],
            )
            .filter(|v| *v >= 1.0)
            .map(|_| m)
            .ok_or("no connect error yet".to_owned())
        },
    )
    .await;
    let mentions = |m: &Scrape, label: &str, value: &str| -> Vec<Sample> {
        m.samples
            .iter()
            .filter(|s| s.labels.get(label).map(String::as_str) == Some(value))
            .cloned()
            .collect()
    };
    assert!(!mentions(&before, "route", "dead.test").is_empty());
    assert!(!mentions(&before, "profile", "other").is_empty());
    assert_eq!(
        before.value(
            "token_injector_upstream_errors_total",
            &[("route", "dead.test"), ("kind", "connect")]
        ),
        1.0
    );

    // An invalid edit is refused and counted; everything stays.
    let broken = w.dir.path().join("broken.toml");
    std::fs::write(&broken, "[proxy]\nlisten = 42\n").unwrap();
    assert!(!token_injector::reload::reload(&app, &broken));
    // A valid edit without dead.test, other.test and profile `other`.
    let small = w.dir.path().join("small.toml");
    std::fs::write(&small, w.config("", "")).unwrap();
    assert!(token_injector::reload::reload(&app, &small));

    let m = scrape(admin).await;
    assert_eq!(
        m.value(
            "token_injector_config_reloads_total",
            &[("result", "error")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "token_injector_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        mentions(&m, "route", "dead.test"),
        vec![],
        "series of a removed route"
    );
    assert_eq!(
        mentions(&m, "route", "other.test"),
        vec![],
        "series of a removed route"
    );
    assert_eq!(
        mentions(&m, "profile", "other"),
        vec![],
        "series of a removed profile"
    );
    // The kept route and profile keep their series and their token.
    get_n(&client, "http://api.test/", 1, 200).await;
    let m = scrape(admin).await;
    assert_eq!(
        m.value(
            "token_injector_requests_total",
            &[("route", "api.test"), ("code", "200")]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "token_injector_token_fetch_total",
            &[("profile", "main"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(w.tokens.state.count(), 1, "the kept profile kept its token");
    app.shutdown().await;
}

/// A connection to the admin listener that never sends a request is closed
/// after the admin head timeout (5 s), while probes keep being answered.
#[tokio::test]
async fn silent_admin_connection_is_closed_and_probes_still_answer() {
    let w = World::new(Mode::Issue(60.0)).await;
    let app = w.start(&w.config("", "")).await;
    let admin = app.admin_addr();
    let client = direct_client();
    let mut silent = tokio::net::TcpStream::connect(admin).await.unwrap();
    let started = Instant::now();
    let r = client
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf))
        .await
        .expect("the silent connection was not closed")
        .unwrap_or(0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // hyper may write a 408 before closing; either way the connection ends.
    assert!(n == 0 || buf.starts_with(b"HTTP/1.1 408"), "{n}");
    // A fresh connection: the first probe's pooled one has sat idle for the
    // admin listener's 5 s bound by now and may be closing as a request
    // goes out on it (seen as IncompleteMessage in CI).
    let r = direct_client()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.shutdown().await;
}
