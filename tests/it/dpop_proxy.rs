//! DPoP through the proxy (issue 17), end to end: the app sends plain
//! HTTP without credentials; the upstream is the strict resource server of
//! support/dpop_server.rs, which checks every proof as RFC 9449 §4.3 and §7
//! say (signature, typ, htm, htu, iat window, jti replay, ath, the token's
//! binding to the key) and can demand nonces or run a skewed clock. The
//! token endpoint is the World's, which answers a request with a proof with
//! a DPoP token.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::support::dpop_server::{self, Log, Nonce, Reject, Verifier};
use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

/// An EC P-256 DPoP key in `dir/dpop.pem`; its thumbprint.
fn write_dpop_key(dir: &std::path::Path) -> String {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let path = dir.join("dpop.pem");
    std::fs::write(&path, kp.serialize_pem()).unwrap();
    let key = token_injector::keys::SigningKey::load(&path).unwrap();
    token_injector::dpop::ProofKey::new(key, None)
        .unwrap()
        .thumbprint()
        .to_owned()
}

/// A strict DPoP upstream over TLS for `localhost` (HTTP/1.1, or h2 only),
/// accepting the tokens the World issued, bound to `jkt`.
async fn strict(
    w: &World,
    jkt: &str,
    h2: bool,
    tune: impl FnOnce(Verifier) -> Verifier,
) -> (String, Arc<Verifier>, Arc<Log>) {
    let tokens = Arc::clone(&w.tokens.state);
    let verifier = Arc::new(tune(Verifier::tokens(move |t| tokens.valid(t)).jkt(jkt)));
    let mut tls = Arc::unwrap_or_clone(w.pki.server_config(&["localhost"]));
    if h2 {
        tls.alpn_protocols = vec![b"h2".to_vec()];
    }
    let (addr, log) = dpop_server::start(Some(Arc::new(tls)), Arc::clone(&verifier)).await;
    (format!("https://localhost:{}", addr.port()), verifier, log)
}

/// Profile `main` with DPoP and its key file, and route `api.test` to
/// `upstream` with `route_extra` lines.
fn config(w: &World, upstream: &str, route_extra: &str) -> String {
    format!(
        r#"{sections}
[profiles.main]
token_url = "{token_url}"
client_id = "{CLIENT_ID}"
client_secret_file = "client-secret"
ca_file = "ca.pem"
dpop = true
dpop_key_file = "dpop.pem"

[[routes]]
host = "api.test"
upstream = "{upstream}"
profile = "main"
ca_file = "ca.pem"
{route_extra}
"#,
        sections = test_sections("5s"),
        token_url = w.tokens.url(),
    )
}

fn metric(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
}

/// 1,000 requests, 16 at a time: 1,000 accepted proofs with 1,000 distinct
/// `jti`, all for one token, which was fetched once with a proof of its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_its_own_proof() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) = strict(&w, &jkt, false, |v| v).await;
    let run = w.start(&config(&w, &upstream, "")).await;
    let client = proxied_client(run.proxy_addr());
    for batch in 0..(1000 / 16 + 1) {
        let n = (1000 - batch * 16).min(16);
        let answers =
            join_all((0..n).map(|i| client.get(format!("http://api.test/items/{i}")).send())).await;
        for a in answers {
            assert_eq!(a.unwrap().status(), 200);
        }
    }
    let entries = log.wait_for(1000, WAIT).await;
    assert!(log.rejections().is_empty(), "{:?}", log.rejections());
    let mut jtis = log.jtis();
    assert_eq!(jtis.len(), 1000);
    jtis.sort();
    jtis.dedup();
    assert_eq!(jtis.len(), 1000, "a jti was reused");
    let tokens: std::collections::BTreeSet<_> = entries
        .iter()
        .map(|e| e.outcome.as_ref().unwrap().token.clone())
        .collect();
    assert_eq!(tokens.len(), 1);
    assert_eq!(w.tokens.state.count(), 1);
    let m = scrape(run.admin_addr()).await;
    assert_eq!(
        metric(&m, "token_injector_dpop_proofs_total{profile=\"main\"}"),
        1001.0,
        "one proof per request and one for the token request"
    );
}

/// `htu` is the URL as sent upstream: the base path joined, the port kept
/// (not the default), the query left out; the strict server compares it
/// with the URL it received, normalised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htu_is_the_url_as_sent_upstream() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) = strict(&w, &jkt, false, |v| v).await;
    let run = w.start(&config(&w, &format!("{upstream}/base/"), "")).await;
    let client = proxied_client(run.proxy_addr());
    let r = client
        .post("http://api.test/items/7?x=1&y=two")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client.delete("http://api.test/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let accepted = log.accepted();
    assert_eq!(accepted.len(), 2, "{:?}", log.rejections());
    assert_eq!(accepted[0]["htm"], "POST");
    assert_eq!(accepted[0]["htu"], format!("{upstream}/base/items/7"));
    assert_eq!(accepted[1]["htm"], "DELETE");
    assert_eq!(accepted[1]["htu"], format!("{upstream}/base/"));
    assert!(log.entries()[0].url.ends_with("/base/items/7?x=1&y=two"));
}

/// An upstream 401 for the token (not the proof): a new token, and the
/// retry carries a new proof for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_gets_a_new_proof() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let tokens = Arc::clone(&w.tokens.state);
    // The first token issued ("tok-1-…") is refused as unknown.
    let verifier = Verifier::tokens(move |t| tokens.valid(t) && !t.starts_with("tok-1-")).jkt(&jkt);
    let (addr, log) = dpop_server::start(
        Some(w.pki.server_config(&["localhost"])),
        Arc::new(verifier),
    )
    .await;
    let upstream = format!("https://localhost:{}", addr.port());
    let run = w.start(&config(&w, &upstream, "")).await;
    let r = proxied_client(run.proxy_addr())
        .get("http://api.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let entries = log.entries();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries[0].outcome.as_ref().unwrap_err(),
        &Reject::UnknownToken
    );
    let retry = entries[1].outcome.as_ref().unwrap();
    assert!(retry.token.as_deref().unwrap().starts_with("tok-2-"));
    let jti = |e: &dpop_server::Entry| e.claims.as_ref().unwrap()["jti"].clone();
    assert_ne!(jti(&entries[0]), jti(&entries[1]));
    assert_ne!(
        entries[0].claims.as_ref().unwrap()["ath"],
        retry.claims["ath"],
        "the new proof is for the new token"
    );
    assert_eq!(w.tokens.state.count(), 2);
}

/// An upstream that requires nonces: the first request is refused with
/// `use_dpop_nonce` and sent again once with the nonce, the same token,
/// and the app sees only the 200. A nonce rotated mid-traffic costs one
/// more resend; a nonce given on a 200 is used without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_nonces_are_learned_and_never_cost_the_token() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, verifier, log) =
        strict(&w, &jkt, false, |v| v.nonce(Nonce::Require("n-1".into()))).await;
    let run = w.start(&config(&w, &upstream, "")).await;
    let client = proxied_client(run.proxy_addr());
    let get = || async {
        client
            .get("http://api.test/")
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(get().await, 200);
    assert_eq!(get().await, 200);
    let entries = log.entries();
    assert_eq!(entries.len(), 3, "refused, resent, then right at once");
    assert!(matches!(
        entries[0].outcome,
        Err(Reject::NonceMissing { .. })
    ));
    assert_eq!(entries[1].outcome.as_ref().unwrap().claims["nonce"], "n-1");
    assert_eq!(entries[2].outcome.as_ref().unwrap().claims["nonce"], "n-1");
    let rotated = verifier.rotate_nonce();
    for _ in 0..3 {
        assert_eq!(get().await, 200);
    }
    let entries = log.entries();
    assert_eq!(entries.len(), 7);
    assert!(matches!(entries[3].outcome, Err(Reject::NonceStale { .. })));
    for e in &entries[4..] {
        assert_eq!(
            e.outcome.as_ref().unwrap().claims["nonce"],
            rotated.as_str()
        );
    }
    assert_eq!(
        w.tokens.state.count(),
        1,
        "a nonce demand never drops the token"
    );
    let m = scrape(run.admin_addr()).await;
    assert_eq!(
        metric(
            &m,
            "token_injector_dpop_nonce_retries_total{profile=\"main\",side=\"upstream\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "token_injector_upstream_unauthorized_retries_total{route=\"api.test\"}"
        ),
        0.0
    );
}

/// A server that wants a new nonce every time: one resend per request,
/// then its 401 goes to the app; counted, and the token is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_always_wanting_a_new_nonce_cannot_make_it_loop() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) = strict(&w, &jkt, false, |v| v.nonce(Nonce::AlwaysNew)).await;
    let run = w.start(&config(&w, &upstream, "")).await;
    let client = proxied_client(run.proxy_addr());
    for _ in 0..3 {
        let r = client.get("http://api.test/").send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    assert_eq!(log.entries().len(), 6, "two attempts per request, no more");
    assert_eq!(w.tokens.state.count(), 1);
    let m = scrape(run.admin_addr()).await;
    assert_eq!(
        metric(
            &m,
            "token_injector_dpop_errors_total{profile=\"main\",reason=\"use_dpop_nonce\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "token_injector_dpop_nonce_retries_total{profile=\"main\",side=\"upstream\"}"
        ),
        3.0
    );
}

/// A streamed body cannot be sent again: the nonce demand reaches the app,
/// and the next request carries the nonce at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_request_is_not_resent_but_the_next_carries_the_nonce() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) =
        strict(&w, &jkt, false, |v| v.nonce(Nonce::Require("n-7".into()))).await;
    let text =
        config(&w, &upstream, "").replace("[upstream]\n", "[upstream]\nreplay_buffer = 1024\n");
    let run = w.start(&text).await;
    let client = proxied_client(run.proxy_addr());
    let big = vec![b'x'; 64 * 1024];
    let r = client
        .post("http://api.test/upload")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client.get("http://api.test/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let entries = log.entries();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].outcome.as_ref().unwrap().claims["nonce"], "n-7");
    assert_eq!(w.tokens.state.count(), 1);
}

/// An upstream whose clock runs 10 minutes ahead refuses the first proof
/// for its `iat`; its `Date` tells the proxy the offset, the request is sent
/// again with a proof on the upstream's clock, and later ones are right at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_clock_far_off_is_learned_from_its_date() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, verifier, log) = strict(&w, &jkt, false, |v| v.skew(600).window(30)).await;
    let run = w.start(&config(&w, &upstream, "")).await;
    let client = proxied_client(run.proxy_addr());
    for _ in 0..2 {
        let r = client.get("http://api.test/").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let entries = log.entries();
    assert_eq!(entries.len(), 3, "{:?}", log.rejections());
    assert!(entries[0].outcome.is_err());
    let iat = entries[2].outcome.as_ref().unwrap().claims["iat"]
        .as_i64()
        .unwrap();
    assert!(
        (iat - verifier.now()).abs() <= 5,
        "iat {iat} vs the upstream's {}",
        verifier.now()
    );
    assert_eq!(w.tokens.state.count(), 1);
}

/// HTTP/2 to the upstream, and a gRPC-shaped call (h2c in, HTTP/2 over TLS
/// out, POST to /pkg.Service/Method): each carries a proof for its method
/// and path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_requests_carry_proofs() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) = strict(&w, &jkt, true, |v| v).await;
    let run = w
        .start(&config(
            &w,
            &upstream,
            "upstream_protocol = \"http2\"\nlisten = \"127.0.0.1:0\"",
        ))
        .await;
    let r = proxied_client(run.proxy_addr())
        .get("http://api.test/h2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let port = run.route_addr("api.test").unwrap().port();
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .build()
        .unwrap();
    let r = h2c
        .post(format!("http://127.0.0.1:{port}/demo.Greeter/SayHello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let entries = log.entries();
    assert_eq!(entries.len(), 2, "{:?}", log.rejections());
    for e in &entries {
        assert_eq!(e.version, http::Version::HTTP_2);
        assert!(e.outcome.is_ok(), "{:?}", e.outcome);
    }
    let grpc = &entries[1].outcome.as_ref().unwrap().claims;
    assert_eq!(grpc["htm"], "POST");
    assert_eq!(grpc["htu"], format!("{upstream}/demo.Greeter/SayHello"));
}

/// A WebSocket upgrade request carries a proof too (the strict server
/// answers it 200, not 101: what is checked is the proof on the GET).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_carries_a_proof() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) = strict(&w, &jkt, false, |v| v).await;
    let run = w.start(&config(&w, &upstream, "")).await;
    let r = proxied_client(run.proxy_addr())
        .get("http://api.test/ws")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let accepted = log.accepted();
    assert_eq!(accepted.len(), 1, "{:?}", log.rejections());
    assert_eq!(accepted[0]["htu"], format!("{upstream}/ws"));
}

/// The app's own `Authorization` and `DPoP` never reach the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_credentials_are_replaced() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) = strict(&w, &jkt, false, |v| v).await;
    let run = w.start(&config(&w, &upstream, "")).await;
    let r = proxied_client(run.proxy_addr())
        .get("http://api.test/")
        .header("authorization", "DPoP app-token")
        .header("dpop", "app.proof.value")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", log.rejections());
    let proof = log.entries()[0].outcome.clone().unwrap();
    assert_ne!(proof.token.as_deref(), Some("app-token"));
    assert_eq!(proof.jkt, jkt);
}

/// A key file that stops loading: a reload is refused (naming the key) and
/// requests go on with the key in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_key_file_at_reload_keeps_the_key_in_use() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) = strict(&w, &jkt, false, |v| v).await;
    let text = config(&w, &upstream, "");
    let path = w.dir.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();
    let run = Arc::new(w.start(&text).await);
    let client = proxied_client(run.proxy_addr());
    assert_eq!(
        client
            .get("http://api.test/")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    std::fs::write(
        w.dir.path().join("dpop.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = token_injector::config::load(&path).unwrap_err().to_string();
    assert!(err.contains("profiles.main.dpop_key_file:"), "{err}");
    assert!(!token_injector::reload::reload(&run, &path));
    assert_eq!(
        client
            .get("http://api.test/")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let accepted = log.accepted();
    assert_eq!(accepted.len(), 2);
    assert!(
        log.entries()
            .iter()
            .all(|e| e.outcome.as_ref().unwrap().jkt == jkt)
    );
}

/// Requests sent together before the upstream's first nonce demand came
/// back: each is refused with the nonce and resends once with it, so the
/// app sees only 200s (not just the first to learn the nonce).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_refused_for_a_nonce_all_resend() {
    let w = World::new(Mode::Issue(300.0)).await;
    let jkt = write_dpop_key(w.dir.path());
    let (upstream, _, log) =
        strict(&w, &jkt, false, |v| v.nonce(Nonce::Require("n-c".into()))).await;
    let run = w.start(&config(&w, &upstream, "")).await;
    let client = proxied_client(run.proxy_addr());
    // The token first, so the 16 go out together.
    run.store("main").unwrap().get(WAIT).await.unwrap();
    let answers =
        join_all((0..16).map(|i| client.get(format!("http://api.test/{i}")).send())).await;
    for a in answers {
        assert_eq!(a.unwrap().status(), 200);
    }
    let entries = log.entries();
    let refused = entries.iter().filter(|e| e.outcome.is_err()).count();
    assert_eq!(
        entries.len(),
        16 + refused,
        "one resend per refused request"
    );
    assert!(refused >= 1);
    assert_eq!(w.tokens.state.count(), 1);
}
