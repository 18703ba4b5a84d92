//! The JWT bearer grant (RFC 7523 §2.1) and token exchange (RFC 8693)
//! against a real authorization server: oidc-provider 9 with both grants
//! registered by tests/interop/oidc.mjs, which checks every assertion claim
//! (signature with the fixture's keys, iss, sub, aud, exp, iat, lifetime,
//! jti replay) and every token exchange parameter (see
//! tests/interop/README.md). Each route's HTTPS upstream here verifies the
//! access token the proxy attaches (RS256 against the provider's JWKS, iss,
//! exp) and answers with its claims, so the test sees what the provider
//! made of the proxy's request: `sub`, `act`, `aud`, the client.
//!
//! Needs `node` and `npm ci --prefix tests/interop`, like tests/it/interop.rs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::support::oidc::*;
use crate::support::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json as j};

const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TT_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The `iss` the fixture wants in assertions signed with bearer-*.pem.
const BEARER_ISSUER: &str = "bearer-issuer";
/// The `iss` the fixture wants in "external" JWTs signed with subject-ec.pem.
const SUBJECT_ISSUER: &str = "subject-issuer";

/// The client secrets of the fixture's clients, beside its TLS files.
fn write_files(pki: &Pki, dir: &Path) {
    write_tls_files(pki, dir);
    std::fs::write(dir.join("bearer-basic-secret"), "bearer-basic-secret\n").unwrap();
    std::fs::write(dir.join("exchange-basic-secret"), "exchange-basic-secret\n").unwrap();
    std::fs::write(dir.join("short-secret"), "short-secret\n").unwrap();
}

/// Verifies an access token of the provider (RS256 against its JWKS, `iss`,
/// `exp`, `typ`); returns its claims. `aud` is left to each test.
fn verify_at_jwt(token: &str, keys: &Keys, issuer: &str) -> Result<Value, String> {
    let (header, claims) = verify_access_token(token, keys, issuer)?;
    if header["typ"] != "at+jwt" {
        return Err(format!("header {header}"));
    }
    Ok(claims)
}

/// An HTTPS upstream that answers a request carrying a valid access token
/// of the provider with 200 and `{"scheme", "claims", "at"}` (`at`: when,
/// in Unix seconds), anything else with 401 and why.
async fn claims_upstream(pki: &Pki, keys: Keys, issuer: String) -> u16 {
    let keys = Arc::new(keys);
    serve(
        Some(pki.server_config(&["localhost"])),
        move |req: Request<Incoming>| {
            let keys = Arc::clone(&keys);
            let issuer = issuer.clone();
            async move {
                let auth = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let _ = req.into_body().collect().await;
                let result = match auth.split_once(' ') {
                    Some((scheme, token)) => {
                        verify_at_jwt(token, &keys, &issuer).map(|c| (scheme.to_owned(), c))
                    }
                    None => Err(format!("no token: {auth:?}")),
                };
                match result {
                    Ok((scheme, claims)) => json(
                        200,
                        &j!({ "scheme": scheme, "claims": claims, "at": now() }).to_string(),
                    ),
                    Err(why) => json(401, &j!({ "error": why }).to_string()),
                }
            }
        },
    )
    .await
    .port()
}

/// An ES256 JWT with `claims`, signed here (not by the proxy's code) with
/// the PKCS#8 P-256 key in `key`.
fn sign_es256(key: &Path, kid: Option<&str>, claims: &Value) -> String {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let der = pem_der(&std::fs::read_to_string(key).unwrap());
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).unwrap();
    let mut header = j!({ "alg": "ES256", "typ": "JWT" });
    if let Some(kid) = kid {
        header["kid"] = kid.into();
    }
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = pair.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", B64.encode(sig.as_ref()))
}

/// A fresh random `jti`.
fn jti() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 12];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    B64.encode(b)
}

/// The config's fixed tables, then one profile (its keys in `body`) and its
/// route `<name>.test` per entry.
fn config_text(profiles: &[(&str, String)], upstream: u16) -> String {
    let mut text = test_sections("5s");
    for (name, body) in profiles {
        text.push_str(&format!(
            r#"
[profiles.{name}]
ca_file = "ca.pem"
{body}

[[routes]]
host = "{name}.test"
upstream = "https://localhost:{upstream}"
profile = "{name}"
ca_file = "ca.pem"
"#
        ));
    }
    text
}

/// A request through the proxy to route `<name>.test`: the upstream's
/// answer (scheme, claims) for a 200, else a panic with the body.
async fn through(client: &reqwest::Client, name: &str) -> Value {
    let r = client
        .get(format!("http://{name}.test/resource"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{name}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// GET `path` on the admin listener: status and JSON body.
async fn admin_json(admin: SocketAddr, path: &str) -> (u16, Value, String) {
    let r = direct_client()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_against_oidc_provider() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_files(&pki, dir.path());
    let provider = start_provider(dir.path(), &[]);
    let issuer = provider.issuer.clone();
    let keys = fetch_signing_keys(&issuer, &dir.path().join("ca.pem")).await;
    let upstream = claims_upstream(&pki, keys, issuer.clone()).await;

    // A ready-made assertion, as another system would mount it: signed
    // here, for the token endpoint, valid for an hour (the fixture's limit).
    let t = now();
    let assertion = sign_es256(
        &dir.path().join("bearer-ec.pem"),
        Some("bearer-ec-1"),
        &j!({
            "iss": BEARER_ISSUER,
            "sub": "file-subject",
            "aud": format!("{issuer}/token"),
            "iat": t,
            "exp": t + 3600,
            "jti": jti(),
        }),
    );
    std::fs::write(dir.path().join("assertion.jwt"), format!("{assertion}\n")).unwrap();

    let token_url = format!("token_url = \"{issuer}/token\"");
    // (profile, its keys, expected: sub, client_id, assertion iss, scope)
    let cases: Vec<(&str, String, [&str; 4])> = vec![
        (
            // RS256 with a key id; a public client: client_id only.
            "rs256",
            format!(
                r#"grant = "jwt_bearer"
{token_url}
client_id = "bearer-none"
private_key_file = "bearer-rsa.pem"
signing_alg = "RS256"
key_id = "bearer-rsa-1"
assertion_issuer = "{BEARER_ISSUER}"
assertion_subject = "alice-rs256"
scopes = ["read"]
resources = ["{API}"]"#
            ),
            ["alice-rs256", "bearer-none", BEARER_ISSUER, "read"],
        ),
        (
            // PS256 with the same RSA key, the endpoint by discovery, a
            // confidential client (client_secret_basic by default when a
            // secret is set), iss defaulting to the client_id.
            "ps256",
            format!(
                r#"grant = "jwt_bearer"
issuer = "{issuer}"
client_id = "bearer-basic"
client_secret_file = "bearer-basic-secret"
private_key_file = "bearer-rsa.pem"
signing_alg = "PS256"
key_id = "bearer-rsa-1"
assertion_subject = "alice-ps256"
scopes = ["read", "write"]"#
            ),
            ["alice-ps256", "bearer-basic", "bearer-basic", "read write"],
        ),
        (
            // ES256 without a key id (the fixture tries its keys by alg),
            // aud = the issuer, and no client at all.
            "es256",
            format!(
                r#"grant = "jwt_bearer"
{token_url}
private_key_file = "bearer-ec.pem"
assertion_issuer = "{BEARER_ISSUER}"
assertion_subject = "alice-es256"
assertion_audience = "{issuer}"
scopes = ["write"]"#
            ),
            ["alice-es256", "anonymous", BEARER_ISSUER, "write"],
        ),
        (
            // tls_client_auth.
            "tls",
            format!(
                r#"grant = "jwt_bearer"
{token_url}
client_id = "bearer-tls"
auth_method = "tls_client_auth"
client_cert_file = "client.pem"
client_key_file = "client.key"
private_key_file = "bearer-ec.pem"
key_id = "bearer-ec-1"
assertion_issuer = "{BEARER_ISSUER}"
assertion_subject = "alice-tls"
scopes = ["read"]"#
            ),
            ["alice-tls", "bearer-tls", BEARER_ISSUER, "read"],
        ),
        (
            "file",
            format!(
                r#"grant = "jwt_bearer"
{token_url}
client_id = "bearer-none"
assertion_file = "assertion.jwt"
scopes = ["read"]"#
            ),
            ["file-subject", "bearer-none", BEARER_ISSUER, "read"],
        ),
        (
            // A DPoP-bound token (the proof itself is checked in
            // interop_dpop.rs; here only that the grant binds it).
            "dpop",
            format!(
                r#"grant = "jwt_bearer"
{token_url}
client_id = "dpop-bearer-none"
dpop = true
private_key_file = "bearer-rsa.pem"
assertion_issuer = "{BEARER_ISSUER}"
assertion_subject = "alice-dpop"
scopes = ["read"]"#
            ),
            ["alice-dpop", "dpop-bearer-none", BEARER_ISSUER, "read"],
        ),
    ];
    let profiles: Vec<(&str, String)> = cases.iter().map(|(n, b, _)| (*n, b.clone())).collect();
    let app = start_in(dir.path(), &config_text(&profiles, upstream)).await;
    let client = proxied_client(app.proxy_addr());
    for (name, _, [sub, client_id, assertion_iss, scope]) in &cases {
        let v = through(&client, name).await;
        let c = &v["claims"];
        if *name == "dpop" {
            assert_eq!(v["scheme"], "DPoP", "{name}: {v}");
            assert!(c["cnf"]["jkt"].is_string(), "{name}: {v}");
        } else {
            assert_eq!(v["scheme"], "Bearer", "{name}: {v}");
            assert!(c["cnf"].is_null(), "{name}: {v}");
        }
        assert_eq!(c["sub"], *sub, "{name}: {v}");
        assert_eq!(c["client_id"], *client_id, "{name}: {v}");
        assert_eq!(c["assertion_iss"], *assertion_iss, "{name}: {v}");
        assert_eq!(c["scope"], *scope, "{name}: {v}");
        assert_eq!(c["aud"], API, "{name}: {v}");
    }
    let (status, ready, body) = admin_json(app.admin_addr(), "/readyz").await;
    assert_eq!(status, 200, "{body}");
    for (name, _, _) in &cases {
        assert_eq!(ready["profiles"][name]["state"], "valid", "{body}");
    }
    assert!(!body.contains(&assertion), "{body}");
    app.shutdown().await;
    drop(provider);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_against_oidc_provider() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_files(&pki, dir.path());
    // The `short` client's tokens live 4 s, so the chain renews in the test.
    let provider = start_provider(dir.path(), &[("OIDC_FIXTURE_SHORT_TTL", Some("4"))]);
    let issuer = provider.issuer.clone();
    let keys = fetch_signing_keys(&issuer, &dir.path().join("ca.pem")).await;
    let upstream = claims_upstream(&pki, keys, issuer.clone()).await;

    // A Kubernetes-style ServiceAccount token and an actor's token, both
    // from the fixture's "external" issuer.
    let subject_key = dir.path().join("subject-ec.pem");
    let t = now();
    let sa = sign_es256(
        &subject_key,
        Some("subject-ec-1"),
        &j!({
            "iss": SUBJECT_ISSUER,
            "sub": "system:serviceaccount:apps:billing",
            "aud": issuer,
            "iat": t,
            "exp": t + 600,
        }),
    );
    std::fs::write(dir.path().join("sa.jwt"), format!("{sa}\n")).unwrap();
    let actor = sign_es256(
        &subject_key,
        None,
        &j!({
            "iss": SUBJECT_ISSUER,
            "sub": "gateway",
            "aud": format!("{issuer}/token"),
            "exp": t + 600,
        }),
    );
    std::fs::write(dir.path().join("actor.jwt"), format!("{actor}\n")).unwrap();

    let token_url = format!("token_url = \"{issuer}/token\"");
    let profiles: Vec<(&str, String)> = vec![
        (
            // A subject file; a JWT requested (the answer's token_type is
            // N_A) for another audience.
            "file",
            format!(
                r#"grant = "token_exchange"
{token_url}
client_id = "exchange-basic"
client_secret_file = "exchange-basic-secret"
subject_token_file = "sa.jwt"
subject_token_type = "{TT_JWT}"
requested_token_type = "{TT_JWT}"
audience = "https://other-api.test"
scopes = ["read"]"#
            ),
        ),
        (
            // An actor token; a public client; an access token by default.
            "actor",
            format!(
                r#"grant = "token_exchange"
{token_url}
client_id = "exchange-none"
subject_token_file = "sa.jwt"
subject_token_type = "{TT_JWT}"
actor_token_file = "actor.jwt"
actor_token_type = "{TT_JWT}"
resources = ["{API}"]"#
            ),
        ),
        (
            // A chain: `a` gets short-lived client_credentials tokens...
            "a",
            format!(
                r#"{token_url}
client_id = "short"
client_secret_file = "short-secret"
scopes = ["read", "write"]"#
            ),
        ),
        (
            // ... and `b` exchanges whichever `a` holds (subject type
            // access_token by default).
            "b",
            format!(
                r#"grant = "token_exchange"
issuer = "{issuer}"
client_id = "exchange-basic"
client_secret_file = "exchange-basic-secret"
subject_profile = "a"
scopes = ["read"]"#
            ),
        ),
    ];
    let app = start_in(dir.path(), &config_text(&profiles, upstream)).await;
    let client = proxied_client(app.proxy_addr());

    let v = through(&client, "file").await;
    let c = &v["claims"];
    assert_eq!(c["sub"], "system:serviceaccount:apps:billing", "{v}");
    assert_eq!(c["aud"], "https://other-api.test", "{v}");
    assert_eq!(c["client_id"], "exchange-basic", "{v}");
    assert_eq!(c["scope"], "read", "{v}");
    assert_eq!(c["exchanged_from"]["token_type"], TT_JWT, "{v}");
    assert_eq!(c["exchanged_from"]["iss"], SUBJECT_ISSUER, "{v}");
    assert!(c["act"].is_null(), "{v}");
    // token_type N_A: still sent as a bearer token.
    assert_eq!(v["scheme"], "Bearer", "{v}");

    let v = through(&client, "actor").await;
    let c = &v["claims"];
    assert_eq!(c["sub"], "system:serviceaccount:apps:billing", "{v}");
    assert_eq!(
        c["act"],
        j!({ "sub": "gateway", "iss": SUBJECT_ISSUER }),
        "{v}"
    );
    assert_eq!(c["aud"], API, "{v}");
    assert_eq!(c["client_id"], "exchange-none", "{v}");
    assert_eq!(v["scheme"], "Bearer", "{v}");

    // The chain: b's token is made from a's current one (sub and
    // exchanged_from name a's client and token), it is never used after
    // the token it came from expired, and when a renews, b renews too.
    let mut a_tokens = HashSet::new();
    let mut b_tokens = HashSet::new();
    let mut b_subjects = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    while a_tokens.len() < 3 || b_subjects.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the chain did not renew: a {a_tokens:?}, b's subjects {b_subjects:?}"
        );
        let a = through(&client, "a").await;
        assert_eq!(a["claims"]["sub"], "short", "{a}");
        a_tokens.insert(a["claims"]["jti"].as_str().unwrap().to_owned());
        let b = through(&client, "b").await;
        let c = &b["claims"];
        assert_eq!(c["sub"], "short", "{b}");
        assert_eq!(c["client_id"], "exchange-basic", "{b}");
        assert_eq!(c["scope"], "read", "{b}");
        assert!(c["act"].is_null(), "{b}");
        let from = &c["exchanged_from"];
        assert_eq!(from["token_type"], TT_ACCESS_TOKEN, "{b}");
        assert_eq!(from["client_id"], "short", "{b}");
        assert_eq!(from["iss"], issuer.as_str(), "{b}");
        // Whole seconds on both sides: a second of slack.
        let used_at = b["at"].as_u64().unwrap();
        let subject_exp = from["exp"].as_u64().unwrap();
        assert!(
            used_at <= subject_exp + 1,
            "b's token used at {used_at}, after its subject expired at {subject_exp}: {b}"
        );
        b_tokens.insert(c["jti"].as_str().unwrap().to_owned());
        b_subjects.insert(from["jti"].as_str().unwrap().to_owned());
        // Polling pace only: the loop ends on what it sees, not on time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        b_tokens.len() >= b_subjects.len(),
        "{b_tokens:?} {b_subjects:?}"
    );

    let (status, ready, body) = admin_json(app.admin_addr(), "/readyz").await;
    assert_eq!(status, 200, "{body}");
    for name in ["file", "actor", "a", "b"] {
        assert_eq!(ready["profiles"][name]["state"], "valid", "{body}");
    }
    assert!(!body.contains(&sa) && !body.contains(&actor), "{body}");
    app.shutdown().await;
    drop(provider);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_grant_names_the_step() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_files(&pki, dir.path());
    let provider = start_provider(dir.path(), &[]);
    let issuer = provider.issuer.clone();

    // An expired subject token.
    let t = now();
    let expired = sign_es256(
        &dir.path().join("subject-ec.pem"),
        Some("subject-ec-1"),
        &j!({
            "iss": SUBJECT_ISSUER,
            "sub": "system:serviceaccount:apps:billing",
            "aud": issuer,
            "iat": t - 600,
            "exp": t - 60,
        }),
    );
    std::fs::write(dir.path().join("expired.jwt"), format!("{expired}\n")).unwrap();

    let token_url = format!("token_url = \"{issuer}/token\"");
    let profiles: Vec<(&str, String)> = vec![
        (
            "bad",
            format!(
                r#"grant = "token_exchange"
{token_url}
client_id = "exchange-basic"
client_secret_file = "exchange-basic-secret"
subject_token_file = "expired.jwt"
subject_token_type = "{TT_JWT}""#
            ),
        ),
        (
            // A chain whose subject profile fails.
            "chained",
            format!(
                r#"grant = "token_exchange"
{token_url}
client_id = "exchange-basic"
client_secret_file = "exchange-basic-secret"
subject_profile = "bad""#
            ),
        ),
        (
            // An assertion whose iss the server does not accept.
            "bad-iss",
            format!(
                r#"grant = "jwt_bearer"
{token_url}
client_id = "bearer-none"
private_key_file = "bearer-ec.pem"
assertion_issuer = "somebody-else"
assertion_subject = "alice""#
            ),
        ),
    ];
    let app = start_in(dir.path(), &config_text(&profiles, 1)).await;
    let admin = app.admin_addr();

    let (ready, body) = eventually(Duration::from_secs(15), || async {
        let (status, ready, body) = admin_json(admin, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        let failed = ["bad", "chained", "bad-iss"]
            .iter()
            .all(|p| ready["profiles"][p]["last_error"].is_string());
        failed.then_some((ready, body))
    })
    .await;
    let last_error = |p: &str| {
        ready["profiles"][p]["last_error"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let bad = last_error("bad");
    assert!(bad.contains("invalid_grant"), "{body}");
    // The server's own words: which token, which check.
    assert!(
        bad.contains("subject_token") && bad.contains("expired"),
        "{body}"
    );
    let chained = last_error("chained");
    assert!(chained.contains("\"bad\""), "the chain's step: {body}");
    let bad_iss = last_error("bad-iss");
    assert!(bad_iss.contains("invalid_grant"), "{body}");
    assert!(bad_iss.contains("somebody-else"), "{body}");
    assert!(!body.contains(&expired), "{body}");

    // The app is told too, with the profile's name.
    let client = proxied_client(app.proxy_addr());
    for name in ["bad", "chained", "bad-iss"] {
        let r = client
            .get(format!("http://{name}.test/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let text = r.text().await.unwrap();
        assert!(text.contains(&format!("profile \"{name}\"")), "{text}");
        assert!(!text.contains(&expired), "{text}");
    }
    app.shutdown().await;
    drop(provider);
}
