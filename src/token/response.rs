//! Parsing a token endpoint's answer (RFC 6749 §5.1 and §5.2) into a token
//! and its lifetime. Pure: status and bytes in, result out.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::secret::Secret;

/// Tokens claiming to live longer are renewed as if they lived this long.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A successful answer.
#[derive(Debug)]
pub struct Parsed {
    pub access_token: Secret,
    /// How long the token lives from when the request was sent.
    pub lifetime: Duration,
    pub scope: Option<String>,
    /// When the token was issued, if before this attempt: a token adopted
    /// from the shared cache, whose `lifetime` counts from then. `None`: it
    /// counts from when the request was sent.
    pub issued: Option<tokio::time::Instant>,
    /// The DPoP key the token is bound to (RFC 9449), for a DPoP profile.
    pub dpop: Option<std::sync::Arc<crate::dpop::ProofKey>>,
}

/// Why a token request failed. Never holds a secret or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Secret(String),
    #[error("token request timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the token endpoint: {0}")]
    Connect(String),
    /// The connection failed after the status and headers had arrived.
    #[error("the token response broke off: {0}")]
    Interrupted(String),
    #[error("token endpoint answered HTTP {status}{}", describe(.error, .description))]
    Rejected {
        status: u16,
        error: Option<String>,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("invalid token response: {0}")]
    InvalidResponse(String),
    #[error("issuer discovery failed: {0}")]
    Discovery(String),
    /// A chain's subject profile had no token to exchange.
    #[error("{0}")]
    Subject(String),
    /// One step of several failed (workload identity federation: the STS
    /// exchange, the impersonation).
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        source: Box<FetchError>,
    },
}

fn describe(error: &Option<String>, description: &Option<String>) -> String {
    match (error, description) {
        (Some(e), Some(d)) => format!(": {e} ({d})"),
        (Some(e), None) => format!(": {e}"),
        (None, _) => " without an OAuth error body".into(),
    }
}

impl FetchError {
    /// A bounded label for metrics: the RFC 6749 error code when the server
    /// gave a known one, else the kind of failure.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Secret(_) => "secret",
            FetchError::Timeout(_) => "timeout",
            // Either way the connection failed; the message tells which.
            FetchError::Connect(_) | FetchError::Interrupted(_) => "connect",
            FetchError::InvalidResponse(_) => "invalid_response",
            FetchError::Discovery(_) => "discovery",
            FetchError::Subject(_) => "subject",
            FetchError::Step { source, .. } => source.reason(),
            FetchError::Rejected { error, .. } => match error.as_deref() {
                Some("invalid_request") => "invalid_request",
                Some("invalid_client") => "invalid_client",
                Some("invalid_grant") => "invalid_grant",
                Some("unauthorized_client") => "unauthorized_client",
                Some("unsupported_grant_type") => "unsupported_grant_type",
                Some("invalid_scope") => "invalid_scope",
                Some("invalid_target") => "invalid_target",
                Some("temporarily_unavailable") => "temporarily_unavailable",
                Some("server_error") => "server_error",
                // RFC 9449 §5 and §8.
                Some("invalid_dpop_proof") => "invalid_dpop_proof",
                Some("use_dpop_nonce") => "use_dpop_nonce",
                Some(_) => "other",
                None => "http_status",
            },
        }
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Rejected { retry_after, .. } => *retry_after,
            FetchError::Step { source, .. } => source.retry_after(),
            _ => None,
        }
    }
}

/// Text from the server, made safe for one log line.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// Parses an answer. `now_unix` is the wall clock in seconds, for a JWT's
/// `exp`; `default_lifetime` applies when neither `expires_in` nor `exp` says.
pub fn parse(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    now_unix: u64,
    default_lifetime: Duration,
) -> Result<Parsed, FetchError> {
    parse_as(
        status,
        body,
        retry_after,
        now_unix,
        default_lifetime,
        Expect::default(),
    )
}

/// What a request asked for beyond a bearer token.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect<'a> {
    /// A DPoP-bound token: the answer's `token_type` must be `DPoP`.
    pub dpop: bool,
    /// A token exchange (RFC 8693 §2.2.1): `token_type` `N_A` is allowed
    /// (the issued token is not an access token, but is used as one), and
    /// `issued_token_type` must be present, and equal the requested type
    /// when one was asked for.
    pub exchange: Option<Option<&'a str>>,
}

/// [`parse`], for a request that asked for more (see [`Expect`]).
pub fn parse_as(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    now_unix: u64,
    default_lifetime: Duration,
    expect: Expect<'_>,
) -> Result<Parsed, FetchError> {
    let dpop = expect.dpop;
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        let field = |k: &str| {
            json.as_ref()
                .and_then(|j| j.get(k))
                .and_then(Value::as_str)
                .map(clean)
        };
        return Err(FetchError::Rejected {
            status,
            error: field("error"),
            description: field("error_description"),
            retry_after,
        });
    }
    let invalid = |m: &str| FetchError::InvalidResponse(m.to_owned());
    let Some(Value::Object(obj)) = json else {
        return Err(if body.is_empty() {
            invalid("empty body")
        } else {
            invalid("body is not a JSON object")
        });
    };
    let token = match obj.get("access_token") {
        Some(Value::String(t)) if !t.is_empty() => t,
        Some(_) => return Err(invalid("access_token is not a non-empty string")),
        None => return Err(invalid("no access_token")),
    };
    if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(invalid(
            "access_token has characters not allowed in an HTTP header",
        ));
    }
    match obj.get("token_type") {
        // Asked for DPoP (RFC 9449 §5): anything else means the server
        // ignored the proof and issued a token any holder could use.
        Some(Value::String(t)) if dpop && t.eq_ignore_ascii_case("dpop") => {}
        _ if dpop => {
            return Err(invalid(
                "token_type is not DPoP although a DPoP proof was sent (does the server support DPoP for this client?)",
            ));
        }
        // RFC 6749 requires it, but some servers leave it out; Bearer is meant.
        None => {}
        Some(Value::String(t)) if expect.exchange.is_some() && t == "N_A" => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("dpop") => {
            return Err(invalid("token_type DPoP is not supported"));
        }
        Some(Value::String(t)) => {
            return Err(FetchError::InvalidResponse(format!(
                "token_type {:?} is not Bearer",
                clean(t)
            )));
        }
        Some(_) => return Err(invalid("token_type is not a string")),
    }
    let expires_in = match obj.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_f64().unwrap_or(f64::NAN)),
        Some(Value::String(s)) => Some(
            s.trim()
                .parse::<f64>()
                .map_err(|_| invalid("expires_in is not a number"))?,
        ),
        Some(_) => return Err(invalid("expires_in is not a number")),
    };
    let expires_in = match expires_in {
        Some(secs) if secs.is_finite() && secs > 0.0 => Some(Duration::from_secs_f64(
            secs.min(MAX_LIFETIME.as_secs_f64()),
        )),
        Some(_) => return Err(invalid("expires_in must be a positive number of seconds")),
        None => None,
    };
    let jwt_left = match jwt_exp(token) {
        Some(exp) if exp <= now_unix => return Err(invalid("the token's JWT exp is already past")),
        Some(exp) => Some(Duration::from_secs(exp - now_unix)),
        None => None,
    };
    // The shorter of what the server said and what the token itself says:
    // a server that hands back a cached token may report a fresh expires_in.
    let lifetime = match (expires_in, jwt_left) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => default_lifetime,
    }
    .min(MAX_LIFETIME);
    if let Some(requested) = expect.exchange {
        match (
            obj.get("issued_token_type").and_then(Value::as_str),
            requested,
        ) {
            (None, _) => return Err(invalid("issued_token_type is missing (RFC 8693 §2.2.1)")),
            (Some(issued), Some(want)) if issued != want => {
                return Err(FetchError::InvalidResponse(format!(
                    "issued_token_type {:?} is not the requested {want:?}",
                    clean(issued)
                )));
            }
            _ => {}
        }
    }
    let scope = obj.get("scope").and_then(Value::as_str).map(clean);
    Ok(Parsed {
        access_token: Secret::new(token.clone()),
        lifetime,
        scope,
        issued: None,
        dpop: None,
    })
}

/// The `exp` claim of a token that is a JWT; `None` for opaque tokens.
pub fn jwt_exp(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().filter(|f| *f > 0.0).map(|f| f as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const DEFAULT: Duration = Duration::from_secs(300);

    fn ok(body: &str) -> Result<Parsed, FetchError> {
        parse(200, body.as_bytes(), None, NOW, DEFAULT)
    }

    fn jwt(exp: u64) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b(r#"{"alg":"none"}"#),
            b(&format!(r#"{{"exp":{exp}}}"#))
        )
    }

    #[test]
    fn lifetimes() {
        let cases: &[(&str, Duration)] = &[
            (
                r#"{"access_token":"a","token_type":"Bearer","expires_in":3600}"#,
                Duration::from_secs(3600),
            ),
            (
                r#"{"access_token":"a","token_type":"bearer","expires_in":"60"}"#,
                Duration::from_secs(60),
            ),
            (
                r#"{"access_token":"a","expires_in":1.5}"#,
                Duration::from_millis(1500),
            ),
            (r#"{"access_token":"a"}"#, DEFAULT),
            (r#"{"access_token":"a","expires_in":null}"#, DEFAULT),
            (r#"{"access_token":"a","expires_in":1e12}"#, MAX_LIFETIME),
        ];
        for (body, want) in cases {
            assert_eq!(ok(body).unwrap().lifetime, *want, "{body}");
        }
    }

    #[test]
    fn jwt_exp_bounds_lifetime() {
        let t = jwt(NOW + 30);
        let body = format!(r#"{{"access_token":"{t}","expires_in":3600}}"#);
        assert_eq!(ok(&body).unwrap().lifetime, Duration::from_secs(30));
        let body = format!(r#"{{"access_token":"{t}"}}"#);
        assert_eq!(ok(&body).unwrap().lifetime, Duration::from_secs(30));
        let body = format!(r#"{{"access_token":"{}"}}"#, jwt(NOW - 1));
        assert!(matches!(ok(&body), Err(FetchError::InvalidResponse(_))));
    }

    #[test]
    fn invalid_bodies() {
        for body in [
            "",
            "<html>oops</html>",
            r#"{"access_token":"a""#,
            "[]",
            r#"{"token_type":"Bearer"}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":42}"#,
            r#"{"access_token":"a b"}"#,
            "{\"access_token\":\"a\\r\\nX-Evil: 1\"}",
            r#"{"access_token":"tök"}"#,
            r#"{"access_token":"a","token_type":"mac"}"#,
            r#"{"access_token":"a","token_type":"DPoP"}"#,
            r#"{"access_token":"a","expires_in":0}"#,
            r#"{"access_token":"a","expires_in":-5}"#,
            r#"{"access_token":"a","expires_in":"soon"}"#,
            r#"{"access_token":"a","expires_in":[1]}"#,
        ] {
            assert!(
                matches!(ok(body), Err(FetchError::InvalidResponse(_))),
                "{body:?} should be invalid"
            );
        }
    }

    #[test]
    fn hostile_shapes_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (
                "<html><body>Login</body></html>",
                "body is not a JSON object",
            ),
            (
                r#"{"access_token":"a","token_type":"Bea"#,
                "body is not a JSON object",
            ),
            // Out of f64 range: serde_json refuses the whole document.
            (
                r#"{"access_token":"a","expires_in":1e400}"#,
                "body is not a JSON object",
            ),
            ("", "empty body"),
            (
                r#"{"access_token":"a","expires_in":0}"#,
                "must be a positive number",
            ),
            (
                r#"{"access_token":"a","expires_in":-0.0}"#,
                "must be a positive number",
            ),
            (
                r#"{"access_token":"a","expires_in":-3600}"#,
                "must be a positive number",
            ),
            (
                r#"{"access_token":"a","expires_in":"0"}"#,
                "must be a positive number",
            ),
            (
                r#"{"access_token":"a","expires_in":"-1"}"#,
                "must be a positive number",
            ),
            (
                r#"{"access_token":"a","expires_in":"inf"}"#,
                "must be a positive number",
            ),
            (
                r#"{"access_token":"a","expires_in":"NaN"}"#,
                "must be a positive number",
            ),
            (
                r#"{"access_token":"a","expires_in":"3600s"}"#,
                "expires_in is not a number",
            ),
            (
                r#"{"access_token":"a","expires_in":""}"#,
                "expires_in is not a number",
            ),
            (
                r#"{"access_token":"a","expires_in":true}"#,
                "expires_in is not a number",
            ),
            (
                r#"{"access_token":"a","expires_in":{}}"#,
                "expires_in is not a number",
            ),
            (
                r#"{"access_token":"a","token_type":"DPoP"}"#,
                "token_type DPoP is not supported",
            ),
            (
                r#"{"access_token":"a","token_type":"dpop"}"#,
                "token_type DPoP is not supported",
            ),
            (
                r#"{"access_token":"a","token_type":"N_A"}"#,
                r#"token_type "N_A" is not Bearer"#,
            ),
            (
                r#"{"access_token":"a","token_type":"Bearer "}"#,
                "is not Bearer",
            ),
            (
                r#"{"access_token":"a","token_type":1}"#,
                "token_type is not a string",
            ),
            (
                r#"{"access_token":"a\rb"}"#,
                "not allowed in an HTTP header",
            ),
            (
                r#"{"access_token":"a\nb"}"#,
                "not allowed in an HTTP header",
            ),
            (
                r#"{"access_token":"a\u0000b"}"#,
                "not allowed in an HTTP header",
            ),
            (
                r#"{"access_token":"a\tb"}"#,
                "not allowed in an HTTP header",
            ),
            (
                r#"{"access_token":"\u00e9"}"#,
                "not allowed in an HTTP header",
            ),
            (
                r#"{"access_token":"\u2028"}"#,
                "not allowed in an HTTP header",
            ),
            (
                r#"{"access_token":"a\u007fb"}"#,
                "not allowed in an HTTP header",
            ),
            (
                r#"{"access_token":null}"#,
                "access_token is not a non-empty string",
            ),
            (
                r#"{"access_token":["a"]}"#,
                "access_token is not a non-empty string",
            ),
        ];
        for (body, says) in cases {
            match ok(body) {
                Err(e @ FetchError::InvalidResponse(_)) => {
                    assert_eq!(e.reason(), "invalid_response");
                    assert!(e.to_string().contains(says), "{body:?}: {e}");
                }
                other => panic!("{body:?} should be invalid: {other:?}"),
            }
        }
    }

    #[test]
    fn lenient_shapes_are_accepted() {
        // expires_in as numeric strings (common, though RFC 6749 says a
        // number), fractions, and values past the cap; Bearer in any case.
        let cases: &[(&str, Duration)] = &[
            (
                r#"{"access_token":"a","expires_in":"3600"}"#,
                Duration::from_secs(3600),
            ),
            (
                r#"{"access_token":"a","expires_in":" 90 "}"#,
                Duration::from_secs(90),
            ),
            (
                r#"{"access_token":"a","expires_in":"2.5"}"#,
                Duration::from_millis(2500),
            ),
            (
                r#"{"access_token":"a","expires_in":59.999}"#,
                Duration::from_millis(59_999),
            ),
            (
                r#"{"access_token":"a","expires_in":18446744073709551616}"#,
                MAX_LIFETIME,
            ),
            (
                r#"{"access_token":"a","expires_in":"99999999999999"}"#,
                MAX_LIFETIME,
            ),
            (r#"{"access_token":"a","expires_in":1e300}"#, MAX_LIFETIME),
            (
                r#"{"access_token":"a","token_type":"BEARER","expires_in":5}"#,
                Duration::from_secs(5),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(ok(body).unwrap().lifetime, *want, "{body}");
        }
        // Fields we do not know are ignored, scope is kept, cleaned.
        let p = ok(r#"{"access_token":"a","scope":"r\nw","refresh_token":"x","id":1}"#).unwrap();
        assert_eq!(p.scope.as_deref(), Some("rw"));
    }

    #[test]
    fn error_statuses_keep_status_code_and_retry_after() {
        let cases: &[(u16, &[u8], &str)] = &[
            (500, b"", "http_status"),
            (500, b"<html>boom</html>", "http_status"),
            (500, br#"{"error":"server_error"}"#, "server_error"),
            (502, br#"{"error":"nonsense_code"}"#, "other"),
            (429, b"slow down", "http_status"),
            (
                503,
                br#"{"error":"temporarily_unavailable"}"#,
                "temporarily_unavailable",
            ),
            (400, br#"{"error":42}"#, "http_status"),
            (302, b"", "http_status"),
        ];
        for (status, body, reason) in cases {
            let e = parse(*status, body, Some(Duration::from_secs(3)), NOW, DEFAULT).unwrap_err();
            assert_eq!(e.reason(), *reason, "{status}");
            assert!(e.to_string().contains(&format!("HTTP {status}")), "{e}");
            assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        }
        // A success status with an error body is still judged as a token.
        assert!(ok(r#"{"error":"invalid_client"}"#).is_err());
        // An error description from the server is cut to one short line.
        let long = format!(
            r#"{{"error":"x","error_description":"a
b{}"}}"#,
            "c".repeat(500)
        );
        let e = parse(400, long.as_bytes(), None, NOW, DEFAULT).unwrap_err();
        let text = e.to_string();
        assert!(!text.contains('\n') && text.len() < 300, "{text}");
    }

    #[test]
    fn dpop_asked_for_means_token_type_dpop() {
        let ok = parse_as(
            200,
            br#"{"access_token":"a","token_type":"DPoP","expires_in":60}"#,
            None,
            NOW,
            DEFAULT,
            Expect {
                dpop: true,
                ..Expect::default()
            },
        )
        .unwrap();
        assert_eq!(ok.lifetime, Duration::from_secs(60));
        // A server that ignored the proof: a Bearer token, or none said.
        for body in [
            &br#"{"access_token":"a","token_type":"Bearer","expires_in":60}"#[..],
            br#"{"access_token":"a","expires_in":60}"#,
        ] {
            let e = parse_as(
                200,
                body,
                None,
                NOW,
                DEFAULT,
                Expect {
                    dpop: true,
                    ..Expect::default()
                },
            )
            .unwrap_err();
            assert!(e.to_string().contains("not DPoP"), "{e}");
        }
        // Not asked for: a DPoP token is refused, as before.
        let e = parse_as(
            200,
            br#"{"access_token":"a","token_type":"DPoP"}"#,
            None,
            NOW,
            DEFAULT,
            Expect::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("DPoP is not supported"), "{e}");
    }

    #[test]
    fn error_bodies_name_the_oauth_error() {
        let e = parse(
            400,
            br#"{"error":"invalid_client","error_description":"bad secret"}"#,
            None,
            NOW,
            DEFAULT,
        )
        .unwrap_err();
        assert_eq!(e.reason(), "invalid_client");
        assert_eq!(
            e.to_string(),
            "token endpoint answered HTTP 400: invalid_client (bad secret)"
        );
        let e = parse(503, b"<html>", Some(Duration::from_secs(7)), NOW, DEFAULT).unwrap_err();
        assert_eq!(e.reason(), "http_status");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn broken_connections_count_as_connect() {
        let before = FetchError::Connect("connection refused".into());
        let after = FetchError::Interrupted("connection reset by peer".into());
        assert_eq!(before.reason(), "connect");
        assert_eq!(after.reason(), "connect");
        assert_eq!(
            after.to_string(),
            "the token response broke off: connection reset by peer"
        );
        assert_eq!(after.retry_after(), None);
    }

    #[test]
    fn errors_never_echo_the_token() {
        let e = ok(r#"{"access_token":"SECRET-TOKEN","token_type":"weird"}"#).unwrap_err();
        assert!(!format!("{e} {e:?}").contains("SECRET-TOKEN"));
        let p = ok(r#"{"access_token":"SECRET-TOKEN"}"#).unwrap();
        assert!(!format!("{p:?}").contains("SECRET-TOKEN"));
    }
}
