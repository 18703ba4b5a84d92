//! The oidc-provider 9 fixture (tests/interop/oidc.mjs) shared by the
//! interop tests (tests/it/interop*.rs): the child process, its TLS files,
//! its JWKS, and the checks of the JWT access tokens it issues, written
//! here independently of the proxy's own code.
//!
//! Needs `node` and `npm ci --prefix tests/interop` (done by `.ci/run`); a
//! missing Node fails the test loudly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use serde_json::Value;

use super::Pki;

/// The resource (`aud`) the interop profiles ask tokens for.
pub const API: &str = "https://api.test";

/// The provider's RSA signing keys: (kid, n, e).
pub type Keys = Vec<(String, Vec<u8>, Vec<u8>)>;

/// The oidc-provider child process; killed on drop.
pub struct Provider {
    child: Child,
    pub issuer: String,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Starts the fixture on the files in `dir`; each `env` entry sets
/// (`Some`) or removes (`None`) one of the fixture's environment variables.
pub fn start_provider(dir: &Path, env: &[(&str, Option<&str>)]) -> Provider {
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
    for (name, value) in env {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    let mut child = cmd
        .spawn()
        .expect("cannot run `node`: Node.js is required for the interop tests");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let ready: Value = serde_json::from_str(&line)
        .unwrap_or_else(|_| panic!("oidc fixture did not start: {line:?}"));
    Provider {
        child,
        issuer: ready["issuer"].as_str().unwrap().to_owned(),
    }
}

/// Writes the fixture's TLS files: server cert for localhost, the CA, and a
/// client certificate for tls_client_auth.
pub fn write_tls_files(pki: &Pki, dir: &Path) {
    let (cert, key) = pki.leaf_pem(&["localhost"]);
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    pki.write_ca(dir);
    let (cert, key) = pki.leaf_pem(&["tls-client.test"]);
    std::fs::write(dir.join("client.pem"), cert).unwrap();
    std::fs::write(dir.join("client.key"), key).unwrap();
}

/// The provider's RSA signing keys from its JWKS, by kid.
pub async fn fetch_jwks(issuer: &str, ca: &Path) -> Keys {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .no_proxy()
        .build()
        .unwrap();
    let body = client
        .get(format!("{issuer}/jwks"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let jwks: Value = serde_json::from_slice(&body).unwrap();
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

/// [`fetch_jwks`], asserting that the JWKS has an RSA key.
pub async fn fetch_signing_keys(issuer: &str, ca: &Path) -> Keys {
    let keys = fetch_jwks(issuer, ca).await;
    assert!(!keys.is_empty(), "no RSA key in the provider's JWKS");
    keys
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A compact JWS's (header, payload, signing input, signature).
pub fn split_jws(jws: &str) -> Result<(Value, Value, String, Vec<u8>), String> {
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS".into());
    };
    let json = |part: &str, what: &str| -> Result<Value, String> {
        let bytes = B64.decode(part).map_err(|e| format!("{what}: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{what}: {e}"))
    };
    let sig = B64.decode(s).map_err(|e| format!("signature: {e}"))?;
    Ok((
        json(h, "header")?,
        json(p, "payload")?,
        format!("{h}.{p}"),
        sig,
    ))
}

/// Verifies a JWT access token of the provider: RS256 with the JWKS key
/// its `kid` names, `exp` in the future, `iss` the provider. Returns its
/// (header, claims); `aud`, `scope` and the rest are left to each test.
pub fn verify_access_token(
    token: &str,
    keys: &Keys,
    issuer: &str,
) -> Result<(Value, Value), String> {
    let (header, claims, input, sig) = split_jws(token)?;
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let kid = header["kid"].as_str().unwrap_or("");
    let (_, n, e) = keys
        .iter()
        .find(|(k, _, _)| k == kid)
        .ok_or("unknown kid")?;
    ring::signature::RsaPublicKeyComponents { n, e }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            input.as_bytes(),
            &sig,
        )
        .map_err(|_| "bad signature".to_owned())?;
    if claims["exp"].as_u64().unwrap_or(0) <= now() {
        return Err("expired".into());
    }
    if claims["iss"] != issuer {
        return Err(format!("iss {}", claims["iss"]));
    }
    Ok((header, claims))
}

/// Whether the claims' `aud` is `aud` or an array holding it.
pub fn has_audience(claims: &Value, aud: &str) -> bool {
    claims["aud"] == aud
        || claims["aud"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == aud))
}

/// The DER inside a one-block PEM file.
pub fn pem_der(pem: &str) -> Vec<u8> {
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    STANDARD.decode(b64).unwrap()
}
