//! DPoP (RFC 9449) against a real authorization server: oidc-provider 9
//! (tests/interop/oidc.mjs), whose `dpop-*` clients must prove possession
//! of a key at the token endpoint and get access tokens bound to it
//! (`cnf.jkt`). For each client authentication method, a profile with
//! `dpop = true` gets such a token, and an HTTPS upstream here checks every
//! request it is sent: `Authorization: DPoP <token>` with a token signed by
//! the provider, and a `DPoP` proof that is signed by the key the token is
//! bound to and names this request (htm, htu, ath, a fresh jti). The proof
//! checks are written here from RFC 9449 and RFC 7638, independent of the
//! proxy's own code.
//!
//! Needs `node` and `npm ci --prefix tests/interop`, like tests/it/interop.rs.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use crate::support::oidc::*;
use crate::support::*;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json as j};

/// The client secrets of the fixture's clients, beside its TLS files.
fn write_files(pki: &Pki, dir: &Path) {
    write_tls_files(pki, dir);
    std::fs::write(dir.join("basic-secret"), "basic-secret\n").unwrap();
    std::fs::write(dir.join("post-secret"), "p:o+s%t/&x y\n").unwrap();
    std::fs::write(
        dir.join("hs-secret"),
        "jwt-hs-secret-that-is-long-enough-for-hs256-0123456789\n",
    )
    .unwrap();
}

/// Verifies the provider's RS256 JWT access token for [`API`]; returns its
/// claims.
fn verify_dpop_access_token(token: &str, keys: &Keys, issuer: &str) -> Result<Value, String> {
    let (_, claims) =
        verify_access_token(token, keys, issuer).map_err(|e| format!("access token: {e}"))?;
    if !has_audience(&claims, API) {
        return Err(format!("access token aud {}", claims["aud"]));
    }
    Ok(claims)
}

/// A JWK member that must be a base64url string.
fn member<'a>(jwk: &'a Value, name: &str) -> Result<&'a str, String> {
    let v = jwk[name]
        .as_str()
        .ok_or_else(|| format!("jwk without {name}"))?;
    B64.decode(v)
        .map_err(|_| format!("jwk {name} is not base64url"))?;
    Ok(v)
}

/// RFC 7638 thumbprint: base64url(SHA-256) of the required members in
/// lexicographic order, no whitespace.
fn thumbprint(jwk: &Value) -> Result<String, String> {
    let canonical = match jwk["kty"].as_str() {
        Some("EC") => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["crv"].as_str().ok_or("EC jwk without crv")?,
            member(jwk, "x")?,
            member(jwk, "y")?
        ),
        Some("OKP") => format!(
            r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#,
            jwk["crv"].as_str().ok_or("OKP jwk without crv")?,
            member(jwk, "x")?
        ),
        Some("RSA") => format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            member(jwk, "e")?,
            member(jwk, "n")?
        ),
        other => return Err(format!("jwk kty {other:?}")),
    };
    Ok(sha256_b64(canonical.as_bytes()))
}

fn sha256_b64(data: &[u8]) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// Checks a proof's signature with the public key in its own header.
fn verify_proof_signature(header: &Value, input: &str, sig: &[u8]) -> Result<(), String> {
    use ring::signature::{self as s, UnparsedPublicKey};
    let jwk = &header["jwk"];
    let b = |name: &str| B64.decode(member(jwk, name)?).map_err(|e| e.to_string());
    let ok = match (header["alg"].as_str(), jwk["kty"].as_str()) {
        (Some("ES256"), Some("EC")) if jwk["crv"] == "P-256" => {
            let mut point = vec![4u8];
            point.extend(b("x")?);
            point.extend(b("y")?);
            UnparsedPublicKey::new(&s::ECDSA_P256_SHA256_FIXED, point).verify(input.as_bytes(), sig)
        }
        (Some("EdDSA"), Some("OKP")) if jwk["crv"] == "Ed25519" => {
            UnparsedPublicKey::new(&s::ED25519, b("x")?).verify(input.as_bytes(), sig)
        }
        (Some(alg @ ("RS256" | "PS256")), Some("RSA")) => {
            let params = if alg == "PS256" {
                &s::RSA_PSS_2048_8192_SHA256
            } else {
                &s::RSA_PKCS1_2048_8192_SHA256
            };
            s::RsaPublicKeyComponents {
                n: b("n")?,
                e: b("e")?,
            }
            .verify(params, input.as_bytes(), sig)
        }
        (alg, kty) => return Err(format!("proof alg {alg:?} with a {kty:?} jwk")),
    };
    ok.map_err(|_| "proof signature does not verify with its jwk".to_owned())
}

/// Checks one request's `Authorization: DPoP` and `DPoP` headers as a
/// resource server would (RFC 9449 §4.3, §7.1); returns what the test
/// asserts on, or why the request is refused.
fn check_request(
    method: &str,
    htu: &str,
    authorization: Option<&str>,
    proofs: &[&str],
    keys: &Keys,
    issuer: &str,
    jtis: &Mutex<HashSet<String>>,
) -> Result<Value, String> {
    let authorization = authorization.ok_or("no Authorization")?;
    let token = authorization
        .strip_prefix("DPoP ")
        .ok_or_else(|| format!("Authorization scheme is not DPoP: {authorization:.12}…"))?;
    let claims = verify_dpop_access_token(token, keys, issuer)?;
    let [proof] = proofs else {
        return Err(format!("{} DPoP headers", proofs.len()));
    };
    let (header, payload, input, sig) = split_jws(proof)?;
    if header["typ"] != "dpop+jwt" {
        return Err(format!("proof typ {}", header["typ"]));
    }
    let jwk = &header["jwk"];
    if !jwk.is_object() {
        return Err("proof header without jwk".into());
    }
    for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
        if jwk.get(private).is_some() {
            return Err(format!("proof jwk has private member {private}"));
        }
    }
    verify_proof_signature(&header, &input, &sig)?;
    let jkt = thumbprint(jwk)?;
    if claims["cnf"]["jkt"] != jkt.as_str() {
        return Err(format!(
            "token cnf {} but the proof key's thumbprint is {jkt}",
            claims["cnf"]
        ));
    }
    if payload["htm"] != method {
        return Err(format!("htm {} for {method}", payload["htm"]));
    }
    if payload["htu"] != htu {
        return Err(format!("htu {} for {htu}", payload["htu"]));
    }
    let ath = sha256_b64(token.as_bytes());
    if payload["ath"] != ath.as_str() {
        return Err(format!("ath {} for {ath}", payload["ath"]));
    }
    let iat = payload["iat"].as_u64().ok_or("proof without numeric iat")?;
    if iat.abs_diff(now()) > 60 {
        return Err(format!("proof iat {iat} is not now"));
    }
    let jti = payload["jti"].as_str().ok_or("proof without jti")?;
    if jti.len() < 16 {
        return Err(format!("proof jti {jti:?} is too short to be unique"));
    }
    if !jtis.lock().unwrap().insert(jti.to_owned()) {
        return Err(format!("proof jti {jti} replayed"));
    }
    Ok(j!({
        "client_id": claims["client_id"],
        "jkt": jkt,
        "cnf_jkt": claims["cnf"]["jkt"],
        "alg": header["alg"],
        "jti": jti,
        "htu": payload["htu"],
        "nonce": payload.get("nonce"),
    }))
}

/// An HTTPS upstream for `localhost` that answers 200 with what
/// [`check_request`] found, or 401 `{"error": why}`. It never sends a
/// `DPoP-Nonce`, so proofs it gets must not carry one.
async fn dpop_upstream(pki: &Pki, keys: Keys, issuer: String) -> u16 {
    let keys = Arc::new(keys);
    let jtis = Arc::new(Mutex::new(HashSet::new()));
    let origin = Arc::new(OnceLock::<String>::new());
    let o = Arc::clone(&origin);
    let addr = serve(
        Some(pki.server_config(&["localhost"])),
        move |req: Request<Incoming>| {
            let (keys, jtis, origin, issuer) = (
                Arc::clone(&keys),
                Arc::clone(&jtis),
                Arc::clone(&o),
                issuer.clone(),
            );
            async move {
                let (parts, body) = req.into_parts();
                let _ = body.collect().await;
                let header = |n: &str| -> Vec<&str> {
                    parts
                        .headers
                        .get_all(n)
                        .iter()
                        .map(|v| v.to_str().unwrap_or("?"))
                        .collect()
                };
                let htu = format!("{}{}", origin.get().unwrap(), parts.uri.path());
                let result = check_request(
                    parts.method.as_str(),
                    &htu,
                    header("authorization").first().copied(),
                    &header("dpop"),
                    &keys,
                    &issuer,
                    &jtis,
                );
                match result {
                    Ok(v) => json(200, &v.to_string()),
                    Err(why) => json(401, &j!({ "error": why }).to_string()),
                }
            }
        },
    )
    .await;
    origin
        .set(format!("https://localhost:{}", addr.port()))
        .unwrap();
    addr.port()
}

/// One DPoP profile and its route `<name>.test`.
fn profile(name: &str, issuer: &str, client_id: &str, auth: &str, upstream: u16) -> String {
    format!(
        r#"
[profiles.{name}]
token_url = "{issuer}/token"
client_id = "{client_id}"
ca_file = "ca.pem"
scopes = ["read", "write"]
resources = ["{API}"]
dpop = true
{auth}

[[routes]]
host = "{name}.test"
upstream = "https://localhost:{upstream}"
profile = "{name}"
ca_file = "ca.pem"
"#
    )
}

/// (profile, client id, auth keys) for each DPoP client of the fixture.
fn dpop_clients() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "basic",
            "dpop-basic",
            "client_secret_file = \"basic-secret\"",
        ),
        (
            "post",
            "dpop-post",
            "auth_method = \"client_secret_post\"\nclient_secret_file = \"post-secret\"",
        ),
        (
            "hs",
            "dpop-jwt-hs",
            "auth_method = \"client_secret_jwt\"\nclient_secret_file = \"hs-secret\"",
        ),
        (
            "rsa",
            "dpop-pkjwt-rsa",
            "auth_method = \"private_key_jwt\"\nprivate_key_file = \"rsa.pem\"\nkey_id = \"rsa-1\"",
        ),
        (
            "ec",
            "dpop-pkjwt-ec",
            "auth_method = \"private_key_jwt\"\nprivate_key_file = \"ec.pem\"\nkey_id = \"ec-1\"",
        ),
        (
            "mtls",
            "dpop-tls",
            "auth_method = \"tls_client_auth\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"",
        ),
    ]
}

/// Sends `method` to `http://<name>.test<path>` through the proxy; the
/// upstream's 200 answer (what it checked), or a panic with why not.
async fn through(client: &reqwest::Client, method: &str, name: &str, path: &str) -> Value {
    let r = client
        .request(method.parse().unwrap(), format!("http://{name}.test{path}"))
        .body(if method == "GET" { "" } else { "{\"x\":1}" })
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{name}: {method} {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of the series `name{…}` whose labels include all of `labels`
/// (each `key="value"`), whatever their order.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once('}')?;
        let set: Vec<&str> = set.split(',').collect();
        labels
            .iter()
            .all(|want| set.contains(want))
            .then(|| value.trim().parse().ok())?
    })
}

fn config(text: &str, dir: &Path) -> token_injector::config::Config {
    token_injector::config::from_text(text, dir, Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("config invalid:\n{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_every_auth_method_against_oidc_provider() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_files(&pki, dir.path());
    let provider = start_provider(
        dir.path(),
        &[
            ("OIDC_FIXTURE_NO_RFC8414", None),
            ("OIDC_FIXTURE_DPOP_NONCE", None),
        ],
    );
    let issuer = provider.issuer.clone();
    let keys = fetch_signing_keys(&issuer, &dir.path().join("ca.pem")).await;
    let upstream = dpop_upstream(&pki, keys, issuer.clone()).await;

    let mut text = test_sections("2s");
    for (name, client_id, auth) in dpop_clients() {
        text.push_str(&profile(name, &issuer, client_id, auth, upstream));
    }
    // A client that is not DPoP-bound but sends a proof anyway gets a
    // bound token too; and the token endpoint found by discovery.
    text.push_str(&profile(
        "plain",
        &issuer,
        "basic",
        "client_secret_file = \"basic-secret\"",
        upstream,
    ));
    text.push_str(
        &profile(
            "discovered",
            &issuer,
            "dpop-basic",
            "client_secret_file = \"basic-secret\"",
            upstream,
        )
        .replace(
            &format!("token_url = \"{issuer}/token\""),
            &format!("issuer = \"{issuer}\""),
        ),
    );
    let app = token_injector::start(config(&text, dir.path()))
        .await
        .unwrap();
    let client = proxied_client(app.proxy_addr());
    let origin = format!("https://localhost:{upstream}");

    let mut names: Vec<(&str, &str)> = dpop_clients().iter().map(|c| (c.0, c.1)).collect();
    names.push(("plain", "basic"));
    names.push(("discovered", "dpop-basic"));
    let mut thumbprints = HashSet::new();
    for (name, client_id) in &names {
        let get = through(&client, "GET", name, "/resource?q=1&r=%2F").await;
        let post = through(&client, "POST", name, "/items/42").await;
        for v in [&get, &post] {
            assert_eq!(v["client_id"], *client_id, "{name}: {v}");
            assert_eq!(v["jkt"], v["cnf_jkt"], "{name}: {v}");
            assert_eq!(v["alg"], "ES256", "{name}: the default proof alg: {v}");
            assert!(
                v["nonce"].is_null(),
                "{name}: a nonce nobody asked for: {v}"
            );
        }
        assert_eq!(get["htu"], format!("{origin}/resource"), "{name}");
        assert_eq!(post["htu"], format!("{origin}/items/42"), "{name}");
        assert_eq!(get["jkt"], post["jkt"], "{name}: one key per profile");
        assert_ne!(get["jti"], post["jti"], "{name}");
        thumbprints.insert(get["jkt"].as_str().unwrap().to_owned());
    }
    // Each profile generated a key of its own.
    assert_eq!(thumbprints.len(), names.len(), "{thumbprints:?}");

    let metrics = scrape(app.admin_addr()).await;
    for (name, _) in &names {
        let label = format!("profile=\"{name}\"");
        let proofs = series(&metrics, "token_injector_dpop_proofs_total", &[&label]);
        assert!(
            // Two proxied requests and at least one token request.
            proofs.is_some_and(|n| n >= 3.0),
            "{name}: dpop_proofs_total {proofs:?}\n{metrics}"
        );
        let errors = metrics
            .lines()
            .filter(|l| l.starts_with("token_injector_dpop_errors_total{") && l.contains(&label))
            .filter(|l| !l.trim_end().ends_with(" 0"))
            .collect::<Vec<_>>();
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
    app.shutdown().await;
    drop(provider);
}

/// A PKCS#8 document as PEM `PRIVATE KEY`.
fn pkcs8_pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = "-----BEGIN PRIVATE KEY-----\n".to_owned();
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_key_file_binds_tokens_to_that_key() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_files(&pki, dir.path());
    let provider = start_provider(
        dir.path(),
        &[
            ("OIDC_FIXTURE_NO_RFC8414", None),
            ("OIDC_FIXTURE_DPOP_NONCE", None),
        ],
    );
    let issuer = provider.issuer.clone();
    let keys = fetch_signing_keys(&issuer, &dir.path().join("ca.pem")).await;
    let upstream = dpop_upstream(&pki, keys, issuer.clone()).await;

    // EC P-256, PKCS#8 (rcgen's default key).
    let ec = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("dpop-ec.pem"), ec.serialize_pem()).unwrap();
    let point = ec.public_key_raw();
    assert_eq!((point.len(), point[0]), (65, 4));
    let ec_jwk = j!({
        "kty": "EC", "crv": "P-256",
        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..]),
    });
    // Ed25519, PKCS#8.
    let rng = ring::rand::SystemRandom::new();
    let ed = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    std::fs::write(dir.path().join("dpop-ed.pem"), pkcs8_pem(ed.as_ref())).unwrap();
    let ed_public = {
        use ring::signature::KeyPair;
        ring::signature::Ed25519KeyPair::from_pkcs8(ed.as_ref())
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec()
    };
    let ed_jwk = j!({ "kty": "OKP", "crv": "Ed25519", "x": B64.encode(ed_public) });
    // RSA 2048, PKCS#8: the fixture's own rsa.pem (ring cannot make one).
    let rsa_pem = std::fs::read_to_string(dir.path().join("rsa.pem")).unwrap();
    let rsa_key = ring::signature::RsaKeyPair::from_pkcs8(&pem_der(&rsa_pem)).unwrap();
    let rsa_public = ring::signature::RsaPublicKeyComponents::<Vec<u8>>::from(rsa_key.public());
    let rsa_jwk =
        j!({ "kty": "RSA", "n": B64.encode(&rsa_public.n), "e": B64.encode(&rsa_public.e) });

    // (profile, key file, dpop_alg line, expected alg, expected public JWK)
    let cases = [
        ("ec-file", "dpop-ec.pem", "", "ES256", &ec_jwk),
        (
            "ec-file-alg",
            "dpop-ec.pem",
            "dpop_alg = \"ES256\"",
            "ES256",
            &ec_jwk,
        ),
        (
            "ed-file",
            "dpop-ed.pem",
            "dpop_alg = \"EdDSA\"",
            "EdDSA",
            &ed_jwk,
        ),
        (
            "ps-file",
            "rsa.pem",
            "dpop_alg = \"PS256\"",
            "PS256",
            &rsa_jwk,
        ),
        (
            "rs-file",
            "rsa.pem",
            "dpop_alg = \"RS256\"",
            "RS256",
            &rsa_jwk,
        ),
    ];
    let mut text = test_sections("2s");
    for (name, file, alg, _, _) in &cases {
        text.push_str(&profile(
            name,
            &issuer,
            "dpop-basic",
            &format!("client_secret_file = \"basic-secret\"\ndpop_key_file = \"{file}\"\n{alg}"),
            upstream,
        ));
    }
    let app = token_injector::start(config(&text, dir.path()))
        .await
        .unwrap();
    let client = proxied_client(app.proxy_addr());
    for (name, _, _, alg, jwk) in &cases {
        let expected = thumbprint(jwk).unwrap();
        for method in ["GET", "PUT"] {
            let v = through(&client, method, name, "/bound").await;
            assert_eq!(v["alg"], *alg, "{name}: {v}");
            assert_eq!(
                v["jkt"], expected,
                "{name}: proof jwk is not the file's key: {v}"
            );
            assert_eq!(
                v["cnf_jkt"], expected,
                "{name}: token bound to another key: {v}"
            );
        }
    }
    app.shutdown().await;
    drop(provider);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_nonce_required_by_provider() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    write_files(&pki, dir.path());
    let provider = start_provider(
        dir.path(),
        &[
            ("OIDC_FIXTURE_NO_RFC8414", None),
            ("OIDC_FIXTURE_DPOP_NONCE", Some("1")),
        ],
    );
    let issuer = provider.issuer.clone();
    let keys = fetch_signing_keys(&issuer, &dir.path().join("ca.pem")).await;
    let upstream = dpop_upstream(&pki, keys, issuer.clone()).await;

    // Every method: the provider authenticates the client before it looks
    // at the proof, so the use_dpop_nonce answer has used up a client
    // assertion's jti and the retry needs a new assertion.
    let mut text = test_sections("2s");
    for (name, client_id, auth) in dpop_clients() {
        text.push_str(&profile(name, &issuer, client_id, auth, upstream));
    }
    let app = token_injector::start(config(&text, dir.path()))
        .await
        .unwrap();
    let client = proxied_client(app.proxy_addr());
    for (name, client_id, _) in dpop_clients() {
        for _ in 0..2 {
            let v = through(&client, "GET", name, "/with-nonce").await;
            assert_eq!(v["client_id"], client_id, "{name}: {v}");
            assert_eq!(v["jkt"], v["cnf_jkt"], "{name}: {v}");
            // The token endpoint's nonce is for the token endpoint only.
            assert!(
                v["nonce"].is_null(),
                "{name}: the token endpoint's nonce sent upstream: {v}"
            );
        }
    }
    let metrics = scrape(app.admin_addr()).await;
    for (name, _, _) in dpop_clients() {
        let label = format!("profile=\"{name}\"");
        let retries = series(
            &metrics,
            "token_injector_dpop_nonce_retries_total",
            &[&label, "side=\"token_endpoint\""],
        );
        assert!(
            retries.is_some_and(|n| n >= 1.0),
            "{name}: nonce retries {retries:?}\n{metrics}"
        );
    }
    app.shutdown().await;
    drop(provider);
}
