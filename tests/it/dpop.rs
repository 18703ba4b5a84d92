//! DPoP at the token endpoint (RFC 9449 §5, §8), through the token client
//! against a real HTTPS endpoint on 127.0.0.1 that checks each request's
//! proof and can demand nonces. The client is built directly here; the
//! proxy end to end is in `dpop_proxy.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use token_injector::dpop::ProfileKey;
use token_injector::metrics::DpopMetrics;
use token_injector::token::FetchError;
use token_injector::token::client::{Client, HttpClients};
use token_injector::token::response::Parsed;

use crate::support::*;

/// How the test endpoint answers a request with a valid proof.
#[derive(Clone, Copy)]
enum Answer {
    /// Demand nonce `n-1` until a proof carries it, then issue a DPoP token.
    NonceOnce,
    /// Demand a fresh nonce every time.
    AlwaysNewNonce,
    /// Ignore the proof and issue a Bearer token.
    Bearer,
    /// A server whose clock runs 10 minutes ahead: proofs more than 30 s
    /// from its clock are refused (`invalid_dpop_proof`, with its `Date`).
    Ahead,
}

/// What the endpoint saw: each request's proof payload (None: no proof).
type Seen = Arc<Mutex<Vec<Option<serde_json::Value>>>>;

async fn endpoint(pki: &Pki, answer: Answer) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    let addr = serve(Some(pki.server_config(&["localhost"])), move |req| {
        let log = Arc::clone(&log);
        async move {
            let payload = req
                .headers()
                .get("dpop")
                .and_then(|v| v.to_str().ok())
                .and_then(|p| {
                    let mut it = p.split('.');
                    let header: serde_json::Value =
                        serde_json::from_slice(&B64.decode(it.next()?).ok()?).ok()?;
                    assert_eq!(header["typ"], "dpop+jwt");
                    assert!(header["jwk"].is_object());
                    serde_json::from_slice(&B64.decode(it.next()?).ok()?).ok()
                });
            let n = {
                let mut log = log.lock().unwrap();
                log.push(payload.clone());
                log.len()
            };
            let Some(p) = payload else {
                return json(400, r#"{"error":"invalid_dpop_proof"}"#);
            };
            let nonce_error = |nonce: String| {
                let mut r = json(
                    400,
                    r#"{"error":"use_dpop_nonce","error_description":"Authorization server requires nonce in DPoP proof"}"#,
                );
                r.headers_mut().insert("dpop-nonce", nonce.parse().unwrap());
                r
            };
            match answer {
                Answer::NonceOnce if p["nonce"] != "n-1" => nonce_error("n-1".into()),
                Answer::AlwaysNewNonce => nonce_error(format!("n-{n}")),
                Answer::Bearer => json(
                    200,
                    r#"{"access_token":"b","token_type":"Bearer","expires_in":60}"#,
                ),
                Answer::Ahead => {
                    let now = std::time::SystemTime::now() + Duration::from_secs(600);
                    let unix = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                    let mut r = if p["iat"].as_u64().unwrap().abs_diff(unix) > 30 {
                        json(400, r#"{"error":"invalid_dpop_proof","error_description":"iat"}"#)
                    } else {
                        json(200, r#"{"access_token":"d.p","token_type":"DPoP","expires_in":60}"#)
                    };
                    r.headers_mut()
                        .insert("date", httpdate::fmt_http_date(now).parse().unwrap());
                    r
                }
                Answer::NonceOnce => json(
                    200,
                    r#"{"access_token":"d.p","token_type":"DPoP","expires_in":60}"#,
                ),
            }
        }
    })
    .await;
    (
        format!("https://localhost:{}/oauth2/token", addr.port()),
        seen,
    )
}

async fn fetch(pki: &Pki, url: &str) -> Result<Parsed, FetchError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
    pki.write_ca(dir.path());
    let text = format!(
        "[profiles.p]\ntoken_url = \"{url}\"\nclient_id = \"c\"\nclient_secret_file = \"secret\"\nca_file = \"ca.pem\"\n\
         [[routes]]\nhost = \"api.example\"\nprofile = \"p\"\n"
    );
    let config = token_injector::config::from_text(&text, dir.path(), Vec::new()).unwrap();
    let mut http = HttpClients::new(Duration::from_secs(5));
    let client = Client::new(&config.profiles["p"], &mut http, Duration::from_secs(300))
        .unwrap()
        .with_dpop(
            Arc::new(ProfileKey::new("p", None, None).unwrap()),
            DpopMetrics::detached(),
        );
    client.fetch().await
}

#[tokio::test]
async fn token_request_carries_a_proof_and_retries_once_with_the_nonce() {
    let pki = Pki::new();
    let (url, seen) = endpoint(&pki, Answer::NonceOnce).await;
    let parsed = fetch(&pki, &url).await.unwrap();
    assert_eq!(parsed.access_token.expose(), "d.p");
    assert!(
        parsed.dpop.is_some(),
        "the token carries the key it is bound to"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "one request, one retry with the nonce");
    let (first, second) = (seen[0].as_ref().unwrap(), seen[1].as_ref().unwrap());
    for p in [first, second] {
        assert_eq!(p["htm"], "POST");
        assert_eq!(p["htu"], url.as_str());
        assert!(p.get("ath").is_none(), "no token yet, no ath");
    }
    assert!(first.get("nonce").is_none());
    assert_eq!(second["nonce"], "n-1");
    assert_ne!(first["jti"], second["jti"]);
}

#[tokio::test]
async fn a_server_always_wanting_a_new_nonce_cannot_make_it_loop() {
    let pki = Pki::new();
    let (url, seen) = endpoint(&pki, Answer::AlwaysNewNonce).await;
    let e = fetch(&pki, &url).await.unwrap_err();
    assert_eq!(e.reason(), "use_dpop_nonce", "{e}");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_server_that_ignores_the_proof_is_noticed() {
    let pki = Pki::new();
    let (url, _) = endpoint(&pki, Answer::Bearer).await;
    let e = fetch(&pki, &url).await.unwrap_err();
    assert!(e.to_string().contains("token_type is not DPoP"), "{e}");
}

#[tokio::test]
async fn a_token_endpoint_clock_far_off_is_learned_from_its_date() {
    let pki = Pki::new();
    let (url, seen) = endpoint(&pki, Answer::Ahead).await;
    let parsed = fetch(&pki, &url).await.unwrap();
    assert_eq!(parsed.access_token.expose(), "d.p");
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        2,
        "refused for its iat, then resent on the server's clock"
    );
    let iat = |i: usize| seen[i].as_ref().unwrap()["iat"].as_u64().unwrap();
    assert!(
        (595..=605).contains(&(iat(1) - iat(0))),
        "{} then {}",
        iat(0),
        iat(1)
    );
}
