//! Interop with a real authorization server: oidc-provider 9 (npm), run by
//! this test over HTTPS with a CA made here, one client per authentication
//! method. For every method the proxy gets a token, and an upstream that
//! verifies the JWT access token (signature against the provider's JWKS,
//! `exp`, `aud`, `scope`, `iss`) answers 200 to a request sent through it.
//!
//! Needs `node` and `npm ci --prefix tests/interop` (done by `.ci/run`); a
//! missing Node fails the test loudly.

use std::sync::Arc;

use crate::support::oidc::*;
use crate::support::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Verifies an RS256 JWT access token for [`API`] with scope `read`;
/// returns its claims or why not.
fn verify_jwt(token: &str, keys: &Keys, issuer: &str) -> Result<serde_json::Value, String> {
    let (_, claims) = verify_access_token(token, keys, issuer)?;
    if !has_audience(&claims, API) {
        return Err(format!("aud {}", claims["aud"]));
    }
    let scope = claims["scope"].as_str().unwrap_or("");
    if !scope.split(' ').any(|s| s == "read") {
        return Err(format!("scope {scope:?}"));
    }
    Ok(claims)
}

/// An HTTPS upstream that answers 200 with the token's `client_id` only
/// for a valid JWT access token, else 401 with the reason.
async fn jwt_upstream(pki: &Pki, keys: Keys, issuer: String) -> std::net::SocketAddr {
    let keys = Arc::new(keys);
    serve(
        Some(pki.server_config(&["localhost"])),
        move |req: Request<Incoming>| {
            let keys = Arc::clone(&keys);
            let issuer = issuer.clone();
            async move {
                let token = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned);
                let _ = req.into_body().collect().await;
                let result = match token {
                    Some(t) => verify_jwt(&t, &keys, &issuer),
                    None => Err("no bearer token".into()),
                };
                match result {
                    Ok(claims) => json(
                        200,
                        &serde_json::json!({ "client_id": claims["client_id"] }).to_string(),
                    ),
                    Err(why) => {
                        let mut r: Response<BoxBody> =
                            json(401, &serde_json::json!({ "error": why }).to_string());
                        r.headers_mut().insert("x-why", "invalid".parse().unwrap());
                        r
                    }
                }
            }
        },
    )
    .await
}

/// One profile and its route `<name>.test`.
fn profile(name: &str, endpoint: &str, client_id: &str, auth: &str, upstream: u16) -> String {
    format!(
        r#"
[profiles.{name}]
{endpoint}
client_id = "{client_id}"
ca_file = "ca.pem"
scopes = ["read", "write"]
resources = ["{API}"]
{auth}

[[routes]]
host = "{name}.test"
upstream = "https://localhost:{upstream}"
profile = "{name}"
ca_file = "ca.pem"
"#
    )
}

async fn assert_route_ok(client: &reqwest::Client, name: &str, client_id: &str) {
    let r = client
        .get(format!("http://{name}.test/resource"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{name}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["client_id"], client_id, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_method_against_oidc_provider() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_tls_files(&pki, dir.path());
    let provider = start_provider(dir.path(), &[]);
    let issuer = provider.issuer.clone();
    let keys = fetch_jwks(&issuer, &dir.path().join("ca.pem")).await;
    assert!(!keys.is_empty());
    let upstream = jwt_upstream(&pki, keys, issuer.clone()).await.port();

    std::fs::write(dir.path().join("basic-secret"), "basic-secret\n").unwrap();
    std::fs::write(dir.path().join("post-secret"), "p:o+s%t/&x y\n").unwrap();
    std::fs::write(
        dir.path().join("hs-secret"),
        "jwt-hs-secret-that-is-long-enough-for-hs256-0123456789\n",
    )
    .unwrap();
    // A federated assertion as a workload identity system would mount it:
    // here signed with the pkjwt-ec client's key, for the token endpoint.
    let ec =
        token_injector::token::assertion::SigningKey::load(&dir.path().join("ec.pem")).unwrap();
    let federated = token_injector::token::assertion::client_assertion(
        "pkjwt-ec",
        &format!("{issuer}/token"),
        token_injector::token::assertion::Signer::Key(&ec),
        token_injector::token::assertion::Alg::ES256,
        Some("ec-1"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("federated.jwt"),
        format!("{}\n", federated.expose()),
    )
    .unwrap();

    let token_url = format!("token_url = \"{issuer}/token\"");
    let by_issuer = format!("issuer = \"{issuer}\"");
    // (profile, endpoint, client id, auth keys)
    let cases: Vec<(&str, &str, &str, String)> = vec![
        ("basic", &token_url, "basic", "client_secret_file = \"basic-secret\"".into()),
        (
            "post",
            &token_url,
            "post",
            "auth_method = \"client_secret_post\"\nclient_secret_file = \"post-secret\"".into(),
        ),
        (
            "hs",
            &token_url,
            "jwt-hs",
            "auth_method = \"client_secret_jwt\"\nclient_secret_file = \"hs-secret\"".into(),
        ),
        (
            "rsa",
            &token_url,
            "pkjwt-rsa",
            "auth_method = \"private_key_jwt\"\nprivate_key_file = \"rsa.pem\"\nkey_id = \"rsa-1\"".into(),
        ),
        (
            "rsa-pkcs1",
            &token_url,
            "pkjwt-rsa",
            format!(
                "auth_method = \"private_key_jwt\"\nprivate_key_file = \"rsa-pkcs1.pem\"\nsigning_alg = \"RS256\"\nassertion_audience = \"{issuer}\""
            ),
        ),
        (
            "ec",
            &token_url,
            "pkjwt-ec",
            "auth_method = \"private_key_jwt\"\nprivate_key_file = \"ec.pem\"\nkey_id = \"ec-1\"".into(),
        ),
        (
            "ec-sec1",
            &by_issuer,
            "pkjwt-ec",
            "auth_method = \"private_key_jwt\"\nprivate_key_file = \"ec-sec1.pem\"".into(),
        ),
        (
            "federated",
            &token_url,
            "pkjwt-ec",
            "auth_method = \"private_key_jwt\"\nclient_assertion_file = \"federated.jwt\"".into(),
        ),
        (
            "mtls",
            &token_url,
            "tls",
            "auth_method = \"tls_client_auth\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"".into(),
        ),
        ("discovered", &by_issuer, "basic", "client_secret_file = \"basic-secret\"".into()),
    ];
    let mut text =
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n".to_owned();
    for (name, endpoint, client_id, auth) in &cases {
        text.push_str(&profile(name, endpoint, client_id, auth, upstream));
    }
    let config =
        token_injector::config::from_text(&text, dir.path(), Vec::<(String, String)>::new())
            .unwrap_or_else(|e| panic!("{e}"));
    let app = token_injector::start(config).await.unwrap();
    let client = proxied_client(app.proxy_addr());
    for (name, _, client_id, _) in &cases {
        assert_route_ok(&client, name, client_id).await;
    }
    app.shutdown().await;
    drop(provider);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_falls_back_to_openid_configuration() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_tls_files(&pki, dir.path());
    let provider = start_provider(dir.path(), &[("OIDC_FIXTURE_NO_RFC8414", Some("1"))]);
    let issuer = provider.issuer.clone();
    let keys = fetch_jwks(&issuer, &dir.path().join("ca.pem")).await;
    let upstream = jwt_upstream(&pki, keys, issuer.clone()).await.port();
    std::fs::write(dir.path().join("basic-secret"), "basic-secret\n").unwrap();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        profile(
            "oidc",
            &format!("issuer = \"{issuer}\""),
            "basic",
            "client_secret_file = \"basic-secret\"",
            upstream
        )
    );
    let config =
        token_injector::config::from_text(&text, dir.path(), Vec::<(String, String)>::new())
            .unwrap();
    let app = token_injector::start(config).await.unwrap();
    assert_route_ok(&proxied_client(app.proxy_addr()), "oidc", "basic").await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_reported_with_the_servers_reason() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_tls_files(&pki, dir.path());
    let provider = start_provider(dir.path(), &[]);
    std::fs::write(dir.path().join("bad-secret"), "not-the-secret\n").unwrap();
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
        profile(
            "bad",
            &format!("token_url = \"{}/token\"", provider.issuer),
            "basic",
            "client_secret_file = \"bad-secret\"",
            1
        )
    );
    let config =
        token_injector::config::from_text(&text, dir.path(), Vec::<(String, String)>::new())
            .unwrap();
    let app = token_injector::start(config).await.unwrap();
    let r = proxied_client(app.proxy_addr())
        .get("http://bad.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("profile \"bad\""), "{body}");
    assert!(body.contains("invalid_client"), "{body}");
    assert!(!body.contains("not-the-secret"), "{body}");
    app.shutdown().await;
}
