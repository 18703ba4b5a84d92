//! Interop with a real authorization server: oidc-provider 9 (npm), run by
//! this test over HTTPS with a CA made here, one client per authentication
//! method. For every method the proxy gets a token, and an upstream that
//! verifies the JWT access token (signature against the provider's JWKS,
//! `exp`, `aud`, `scope`, `iss`) answers 200 to a request sent through it.
//!
//! Needs `node` and `npm ci --prefix tests/interop` (done by `.ci/run`); a
//! missing Node fails the test loudly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

const API: &str = "https://api.test";

/// The oidc-provider child process; killed on drop.
struct Provider {
    child: Child,
    issuer: String,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

fn start_provider(dir: &Path, no_rfc8414: bool) -> Provider {
    assert!(
        interop_dir().join("node_modules/oidc-provider").exists(),
        "oidc-provider is not installed: run `npm ci --prefix tests/interop` (bash .ci/run does)"
    );
    let mut cmd = Command::new("node");
    cmd.arg(interop_dir().join("oidc.mjs"))
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if no_rfc8414 {
        cmd.env("OIDC_FIXTURE_NO_RFC8414", "1");
    }
    let mut child = cmd
        .spawn()
        .expect("cannot run `node`: Node.js is required for the interop tests");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|_| panic!("oidc fixture did not start: {line:?}"));
    Provider {
        child,
        issuer: ready["issuer"].as_str().unwrap().to_owned(),
    }
}

/// Writes the fixture's TLS files: server cert for localhost, the CA, and a
/// client certificate for tls_client_auth.
fn write_tls_files(pki: &Pki, dir: &Path) {
    let (cert, key) = pki.leaf_pem(&["localhost"]);
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    pki.write_ca(dir);
    let (cert, key) = pki.leaf_pem(&["tls-client.test"]);
    std::fs::write(dir.join("client.pem"), cert).unwrap();
    std::fs::write(dir.join("client.key"), key).unwrap();
}

/// The provider's RSA signing keys from its JWKS, by kid.
async fn fetch_jwks(issuer: &str, ca: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .no_proxy()
        .build()
        .unwrap();
    let jwks: serde_json::Value = serde_json::from_slice(
        &client
            .get(format!("{issuer}/jwks"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kty"] == "RSA")
        .map(|k| {
            let b = |f: &str| B64.decode(k[f].as_str().unwrap()).unwrap();
            (k["kid"].as_str().unwrap_or("").to_owned(), b("n"), b("e"))
        })
        .collect()
}

/// Verifies an RS256 JWT access token; returns its claims or why not.
fn verify_jwt(
    token: &str,
    keys: &[(String, Vec<u8>, Vec<u8>)],
    issuer: &str,
) -> Result<serde_json::Value, String> {
    let mut parts = token.split('.');
    let (h, p, s) = match (parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s)) => (h, p, s),
        _ => return Err("not a JWT".into()),
    };
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(h).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let kid = header["kid"].as_str().unwrap_or("");
    let (_, n, e) = keys
        .iter()
        .find(|(k, _, _)| k == kid)
        .ok_or("unknown kid")?;
    let sig = B64.decode(s).map_err(|e| e.to_string())?;
    ring::signature::RsaPublicKeyComponents { n, e }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            format!("{h}.{p}").as_bytes(),
            &sig,
        )
        .map_err(|_| "bad signature".to_owned())?;
    let claims: serde_json::Value =
        serde_json::from_slice(&B64.decode(p).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if claims["exp"].as_u64().unwrap_or(0) <= now {
        return Err("expired".into());
    }
    if claims["aud"] != API
        && !claims["aud"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == API))
    {
        return Err(format!("aud {}", claims["aud"]));
    }
    if claims["iss"] != issuer {
        return Err(format!("iss {}", claims["iss"]));
    }
    let scope = claims["scope"].as_str().unwrap_or("");
    if !scope.split(' ').any(|s| s == "read") {
        return Err(format!("scope {scope:?}"));
    }
    Ok(claims)
}

/// An HTTPS upstream that answers 200 with the token's `client_id` only
/// for a valid JWT access token, else 401 with the reason.
async fn jwt_upstream(
    pki: &Pki,
    keys: Vec<(String, Vec<u8>, Vec<u8>)>,
    issuer: String,
) -> std::net::SocketAddr {
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
    let provider = start_provider(dir.path(), false);
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
    let provider = start_provider(dir.path(), true);
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
    let provider = start_provider(dir.path(), false);
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
