//! The demo's HTTPS echo upstream: it answers every request with the
//! request as it arrived, the bearer token shortened and its claims decoded.

use std::sync::Arc;

use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ring::hmac;
use serde_json::{Map, Value};

use super::token_endpoint::decode_jwt;
use super::{Answer, LOG_TARGET, json_response, now_unix};

/// How many characters of a token the echo shows.
const SHOWN_TOKEN_CHARS: usize = 12;

/// `Bearer <first 12 chars>…`: enough to tell tokens apart, not to use one.
/// Other schemes show only the scheme.
pub fn redact_authorization(value: &str) -> String {
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        // Never more than half of a short token.
        let n = SHOWN_TOKEN_CHARS.min(rest.chars().count() / 2);
        let shown: String = rest.chars().take(n).collect();
        format!("{scheme} {shown}…")
    } else {
        format!("{scheme} …")
    }
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// The echo's answer, in the order a person reads it.
#[derive(Debug, serde::Serialize)]
pub struct EchoAnswer {
    pub upstream: &'static str,
    pub method: String,
    /// Path and query as the upstream received them.
    pub path: String,
    pub http_version: String,
    /// The `Host` header, else the request's authority (HTTP/2).
    pub host: Option<String>,
    /// Every header as received, `Authorization` shortened, cookies hidden.
    pub headers: Map<String, Value>,
    pub body_bytes: u64,
    pub token: TokenView,
}

/// The bearer token of an echoed request, decoded.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum TokenView {
    Decoded {
        header: Value,
        claims: Value,
        /// HS256 under the demo's signing key.
        signature_valid: bool,
        /// `exp` minus now, in seconds; negative once expired.
        expires_in_s: Option<i64>,
    },
    Undecodable {
        error: &'static str,
    },
    Missing {
        note: &'static str,
    },
}

/// The echo's answer: the request as the upstream received it, the
/// `Authorization` value shortened and its token decoded.
pub fn echo_answer(
    method: &Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &HeaderMap,
    body_bytes: u64,
    key: &hmac::Key,
    now_unix: u64,
) -> EchoAnswer {
    let mut shown = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| {
                let text = String::from_utf8_lossy(v.as_bytes());
                Value::String(match *name {
                    header::AUTHORIZATION => redact_authorization(&text),
                    header::PROXY_AUTHORIZATION | header::COOKIE => "[redacted]".to_owned(),
                    _ => text.into_owned(),
                })
            })
            .collect();
        let value = match <[Value; 1]>::try_from(values) {
            Ok([one]) => one,
            Err(many) => Value::Array(many),
        };
        shown.insert(name.as_str().to_owned(), value);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()));
    let token = match bearer(headers) {
        None => TokenView::Missing {
            note: "no bearer token: this request did not come through token-injector",
        },
        Some(t) => match decode_jwt(t, key) {
            Ok(d) => TokenView::Decoded {
                expires_in_s: d
                    .claims
                    .get("exp")
                    .and_then(Value::as_i64)
                    .map(|e| e.saturating_sub(now_unix as i64)),
                header: d.header,
                claims: d.claims,
                signature_valid: d.signature_valid,
            },
            Err(error) => TokenView::Undecodable { error },
        },
    };
    EchoAnswer {
        upstream: "token-injector demo echo",
        method: method.as_str().to_owned(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned(),
        http_version: format!("{version:?}"),
        host,
        headers: shown,
        body_bytes,
        token,
    }
}

pub(super) async fn echo(key: Arc<hmac::Key>, req: Request<Incoming>) -> Answer {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let answer = echo_answer(
        &parts.method,
        &parts.uri,
        parts.version,
        &parts.headers,
        body_bytes,
        &key,
        now_unix(),
    );
    let (jti, left) = match &answer.token {
        TokenView::Decoded {
            claims,
            expires_in_s,
            ..
        } => (
            claims.get("jti").and_then(Value::as_str).unwrap_or("-"),
            expires_in_s.map_or_else(|| "-".to_owned(), |s| format!("{s} s")),
        ),
        _ => ("-", "-".to_owned()),
    };
    tracing::info!(
        target: LOG_TARGET,
        "demo echo answered {} {} (token jti {jti}, expires in {left})",
        parts.method,
        parts.uri.path()
    );
    json_response(StatusCode::OK, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{AUDIENCE, CLIENT_ID, SCOPE, encode_jwt};
    use serde_json::json;

    fn key(b: u8) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[b; 32])
    }

    fn echo(
        method: &Method,
        uri: &http::Uri,
        version: http::Version,
        headers: &HeaderMap,
        body_bytes: u64,
        key: &hmac::Key,
        now_unix: u64,
    ) -> Value {
        serde_json::to_value(echo_answer(
            method, uri, version, headers, body_bytes, key, now_unix,
        ))
        .unwrap()
    }

    fn claims() -> Value {
        json!({"iss": "https://localhost:1", "sub": CLIENT_ID, "aud": AUDIENCE,
               "scope": SCOPE, "iat": 100, "exp": 120, "jti": "abc"})
    }

    #[test]
    fn authorization_is_shortened() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJl";
        let shown = redact_authorization(&format!("Bearer {token}"));
        assert_eq!(shown, "Bearer eyJhbGciOiJI…");
        assert!(!shown.contains(token));
        // A short token: never more than half of it.
        assert_eq!(redact_authorization("Bearer abcdefgh"), "Bearer abcd…");
        assert_eq!(redact_authorization("Basic dXNlcjpwYXNz"), "Basic …");
        assert_eq!(redact_authorization("Bearer"), "Bearer …");
    }

    #[test]
    fn echo_shows_the_request_and_decodes_the_token_without_showing_it() {
        let k = key(7);
        let token = encode_jwt(&k, &claims());
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "localhost:8443".parse().unwrap());
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers.insert(header::COOKIE, "session=s3cr3t".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", "b".parse().unwrap());
        let uri: http::Uri = "/anything?x=1".parse().unwrap();
        let v = echo(
            &Method::GET,
            &uri,
            http::Version::HTTP_11,
            &headers,
            0,
            &k,
            105,
        );
        let text = v.to_string();
        assert!(!text.contains(&token), "{text}");
        assert!(!text.contains(token.split('.').nth(2).unwrap()), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert_eq!(v["path"], "/anything?x=1");
        assert_eq!(v["host"], "localhost:8443");
        assert_eq!(
            v["headers"]["authorization"],
            redact_authorization(&format!("Bearer {token}"))
        );
        assert_eq!(v["headers"]["x-multi"], json!(["a", "b"]));
        assert_eq!(v["token"]["claims"]["sub"], CLIENT_ID);
        assert_eq!(v["token"]["signature_valid"], true);
        assert_eq!(v["token"]["expires_in_s"], 15);
    }

    #[test]
    fn echo_without_a_token_says_so() {
        let v = echo(
            &Method::POST,
            &"/x".parse().unwrap(),
            http::Version::HTTP_2,
            &HeaderMap::new(),
            3,
            &key(1),
            0,
        );
        assert!(
            v["token"]["note"]
                .as_str()
                .unwrap()
                .contains("no bearer token")
        );
        assert_eq!(v["body_bytes"], 3);
    }
}
