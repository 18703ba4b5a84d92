//! The demo's authorization server: HS256 JWTs (signed and checked with
//! ring's HMAC) and the token endpoint that issues them to the one demo
//! client (client credentials, `client_secret_basic`).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ring::hmac;
use serde_json::{Value, json};

use super::{
    AUDIENCE, Answer, CLIENT_ID, LOG_TARGET, SCOPE, TOKEN_PATH, json_response, now_unix, random_hex,
};

/// The most the token endpoint reads of a request body.
const MAX_BODY: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// JWTs: HS256 with ring's HMAC.

/// Signs `claims` as a compact HS256 JWT.
pub fn encode_jwt(key: &hmac::Key, claims: &Value) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": "demo"});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let tag = hmac::sign(key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// A JWT taken apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub header: Value,
    pub claims: Value,
    /// True when the header says HS256 and the HMAC under `key` matches.
    pub signature_valid: bool,
}

/// Decodes a compact JWT and checks its HS256 signature against `key`.
/// Does not judge `exp`: the echo shows it instead.
pub fn decode_jwt(token: &str, key: &hmac::Key) -> Result<Decoded, &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (expected three dot-separated parts)");
    };
    let part = |p: &str| -> Result<Value, &'static str> {
        let bytes = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "not a JWT (a part is not base64url)")?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err("not a JWT (a part is not a JSON object)"),
        }
    };
    let header = part(h)?;
    let claims = part(c)?;
    let signature_valid = header.get("alg").and_then(Value::as_str) == Some("HS256")
        && URL_SAFE_NO_PAD.decode(s).is_ok_and(|sig| {
            let input_len = h.len() + 1 + c.len();
            hmac::verify(key, &token.as_bytes()[..input_len], &sig).is_ok()
        });
    Ok(Decoded {
        header,
        claims,
        signature_valid,
    })
}

// ---------------------------------------------------------------------------
// The token endpoint.

/// What the token endpoint knows: the one client and the signing key.
pub(super) struct Issuer {
    pub(super) issuer: String,
    pub(super) client_secret: String,
    pub(super) key: hmac::Key,
    pub(super) lifetime: Duration,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Answer {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Equality that takes the same time wherever the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks `Authorization: Basic` (RFC 6749 §2.3.1: id and secret each
/// form-url-encoded, then Base64) against the demo client.
fn basic_auth_ok(headers: &HeaderMap, client_id: &str, client_secret: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, b64)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(raw) = STANDARD.decode(b64.trim()) else {
        return false;
    };
    let Some(colon) = raw.iter().position(|b| *b == b':') else {
        return false;
    };
    let decode = |b: &[u8]| -> String {
        form_urlencoded::parse(&[b"x=", b].concat())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (decode(&raw[..colon]), decode(&raw[colon + 1..]));
    // Both compared, always, so timing tells nothing about which failed.
    let id_ok = same(id.as_bytes(), client_id.as_bytes());
    let secret_ok = same(secret.as_bytes(), client_secret.as_bytes());
    id_ok & secret_ok
}

pub(super) async fn token_endpoint(issuer: Arc<Issuer>, req: Request<Incoming>) -> Answer {
    if req.uri().path() != TOKEN_PATH {
        return oauth_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the demo token endpoint is /oauth2/token",
        );
    }
    if req.method() != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
    }
    if !basic_auth_ok(req.headers(), CLIENT_ID, &issuer.client_secret) {
        tracing::warn!(
            target: LOG_TARGET,
            "demo token endpoint refused a request: wrong client credentials"
        );
        let mut resp = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"token-injector demo\""),
        );
        return resp;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable body",
            );
        }
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let param = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if param("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "the demo issues client_credentials tokens only",
        );
    }
    let scope = param("scope").unwrap_or(SCOPE).to_owned();
    let jti = match random_hex(8) {
        Ok(j) => j,
        Err(_) => {
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "no randomness",
            );
        }
    };
    let iat = now_unix();
    let lifetime = issuer.lifetime.as_secs();
    let claims = json!({
        "iss": issuer.issuer,
        "sub": CLIENT_ID,
        "aud": AUDIENCE,
        "scope": scope,
        "iat": iat,
        "exp": iat + lifetime,
        "jti": jti,
    });
    let token = encode_jwt(&issuer.key, &claims);
    tracing::info!(
        target: LOG_TARGET,
        "demo token endpoint issued a token (jti {jti}, expires in {lifetime} s)"
    );
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[b; 32])
    }

    fn claims() -> Value {
        json!({"iss": "https://localhost:1", "sub": CLIENT_ID, "aud": AUDIENCE,
               "scope": SCOPE, "iat": 100, "exp": 120, "jti": "abc"})
    }

    #[test]
    fn jwt_round_trip_verifies() {
        let k = key(1);
        let t = encode_jwt(&k, &claims());
        assert_eq!(t.split('.').count(), 3);
        let d = decode_jwt(&t, &k).unwrap();
        assert_eq!(d.claims, claims());
        assert_eq!(d.header["alg"], "HS256");
        assert!(d.signature_valid);
        // The proxy reads exp from it, as from any JWT.
        assert_eq!(crate::token::response::jwt_exp(&t), Some(120));
    }

    #[test]
    fn jwt_with_another_key_or_changed_claims_does_not_verify() {
        let t = encode_jwt(&key(1), &claims());
        assert!(!decode_jwt(&t, &key(2)).unwrap().signature_valid);

        let parts: Vec<&str> = t.split('.').collect();
        let mut forged = claims();
        forged["sub"] = json!("someone-else");
        let body = URL_SAFE_NO_PAD.encode(forged.to_string());
        let tampered = format!("{}.{}.{}", parts[0], body, parts[2]);
        let d = decode_jwt(&tampered, &key(1)).unwrap();
        assert_eq!(d.claims["sub"], "someone-else");
        assert!(!d.signature_valid);

        // alg "none" with an empty signature is never valid.
        let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let unsigned = format!("{none}.{}.", parts[1]);
        assert!(!decode_jwt(&unsigned, &key(1)).unwrap().signature_valid);
    }

    #[test]
    fn non_jwts_are_refused() {
        for t in [
            "opaque",
            "a.b",
            "a.b.c.d",
            "!!.??.x",
            "eyJhIjoxfQ.bm90IGpzb24.x",
        ] {
            assert!(decode_jwt(t, &key(1)).is_err(), "{t}");
        }
    }

    #[test]
    fn basic_auth_checks_id_and_secret() {
        let mut h = HeaderMap::new();
        let set = |h: &mut HeaderMap, id: &str, secret: &str| {
            let v = format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")));
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        };
        set(&mut h, CLIENT_ID, "s3cret");
        assert!(basic_auth_ok(&h, CLIENT_ID, "s3cret"));
        assert!(!basic_auth_ok(&h, CLIENT_ID, "s3cre"));
        set(&mut h, "other", "s3cret");
        assert!(!basic_auth_ok(&h, CLIENT_ID, "s3cret"));
        // Form-url-encoded parts, as RFC 6749 §2.3.1 sends them.
        set(&mut h, "demo%2Dclient", "a+b");
        assert!(basic_auth_ok(&h, "demo-client", "a b"));
        assert!(!basic_auth_ok(&HeaderMap::new(), CLIENT_ID, "s3cret"));
    }
}
