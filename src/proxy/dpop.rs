//! A route's DPoP credential (RFC 9449): `Authorization: DPoP <token>` and
//! a fresh proof per request sent, bound to the request's method, its URL
//! as sent upstream and the token (`ath`), signed with the key the token is
//! bound to, with the upstream's latest nonce. An [`Authorize`] like the
//! bearer header, so the request path does not change: it already attaches
//! the credential per attempt (a retry after a 401, a re-send on a stale
//! connection), and each gets a new proof. Every upstream response is
//! shown to [`Authorize::observe`]: a `DPoP-Nonce` is kept, and a proof
//! refused for its nonce (or for our clock) is sent again once with a new
//! proof, keeping the token, which was not at fault.

use std::cell::RefCell;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use super::authorize::{Authorize, Verdict};
use crate::dpop::{Claims, Refusal, Server};
use crate::metrics::DpopMetrics;
use crate::token::Token;

static DPOP: HeaderName = HeaderName::from_static("dpop");
static DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");

thread_local! {
    /// Per worker thread: the proof, the claims' JSON and the `htu`, reused.
    static BUFFERS: RefCell<(String, String, String)> =
        const { RefCell::new((String::new(), String::new(), String::new())) };
}

/// One route's DPoP attachment: what its upstream said about proofs (nonce,
/// clock) and the profile's counters. The key comes with each token.
#[derive(Debug)]
pub struct Dpop {
    server: Server,
    /// The upstream, for the log line when its clock is learned.
    label: String,
    metrics: DpopMetrics,
}

impl Dpop {
    pub fn new(label: &str, metrics: DpopMetrics) -> Self {
        Self {
            server: Server::default(),
            label: label.to_owned(),
            metrics,
        }
    }

    fn proof(&self, token: &Token, method: &Method, uri: &Uri) -> Option<HeaderValue> {
        let key = token.dpop_key()?;
        let scheme = uri.scheme_str().unwrap_or("https");
        let host = uri.host()?;
        let ath = token.dpop_ath()?;
        let nonce = self.server.nonce();
        BUFFERS.with(|b| {
            let (out, scratch, htu) = &mut *b.borrow_mut();
            crate::dpop::write_htu(htu, scheme, host, uri.port_u16(), uri.path());
            let claims = Claims {
                htm: method.as_str(),
                htu,
                iat: self.server.iat(),
                ath: Some(ath),
                nonce: nonce.as_deref().map(String::as_str),
            };
            if key.proof(out, &claims, scratch).is_err() {
                self.metrics.error("signing");
                return None;
            }
            let mut v = HeaderValue::from_str(out).ok()?;
            // Proofs carry `ath`: never indexed by HPACK, never in Debug.
            v.set_sensitive(true);
            self.metrics.proofs.inc();
            Some(v)
        })
    }
}

impl Authorize for Dpop {
    fn authorize(&self, token: &Token, method: &Method, uri: &Uri, headers: &mut HeaderMap) {
        match (token.dpop_header(), self.proof(token, method, uri)) {
            (Some(a), Some(p)) => {
                super::headers::inject_as(headers, &header::AUTHORIZATION, a.clone());
                super::headers::inject_as(headers, &DPOP, p);
            }
            // A token not bound to a key (cannot happen for a DPoP profile)
            // or a signing failure: never send the app's own values.
            _ => {
                headers.remove(header::AUTHORIZATION);
                headers.remove(&DPOP);
            }
        }
    }

    fn observe(&self, status: StatusCode, headers: &HeaderMap) -> Verdict {
        let nonce = headers.get(&DPOP_NONCE).map(HeaderValue::as_bytes);
        if status != StatusCode::UNAUTHORIZED {
            self.server.note_nonce(nonce);
            return Verdict::Fine;
        }
        let Some(why) = dpop_error(headers) else {
            self.server.note_nonce(nonce);
            return Verdict::Fine;
        };
        let date = headers.get(header::DATE).map(HeaderValue::as_bytes);
        if self.server.refused(why, nonce, date, &self.label) {
            Verdict::Resend(why.as_str())
        } else {
            Verdict::ProofRefused(why.as_str())
        }
    }

    fn resending(&self) {
        self.metrics.nonce_upstream.inc();
    }

    fn refused(&self, reason: &'static str) {
        self.metrics.error(reason);
    }
}

/// The `error` of a `DPoP` challenge in `WWW-Authenticate` (RFC 9449 §7.1,
/// §9), when it refuses the proof rather than the token. A header may hold
/// several challenges (`Bearer realm="x", DPoP error="use_dpop_nonce"`).
fn dpop_error(headers: &HeaderMap) -> Option<Refusal> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            challenges(v)
                .into_iter()
                .find(|(scheme, _)| scheme.eq_ignore_ascii_case("dpop"))
                .and_then(|(_, error)| Refusal::from_code(error?))
        })
}

/// Each challenge of a `WWW-Authenticate` value (RFC 9110 §11.6.1): its
/// scheme and its `error` parameter, if any. Quoted strings may hold
/// commas and `=`; a malformed rest is ignored.
fn challenges(v: &str) -> Vec<(&str, Option<&str>)> {
    let mut out: Vec<(&str, Option<&str>)> = Vec::new();
    let mut rest = v.trim_start();
    while !rest.is_empty() {
        // A token, then either `=` (a parameter of the current challenge)
        // or not (a new scheme).
        let end = rest
            .find(|c: char| c == '=' || c == ',' || c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        let token = &rest[..end];
        rest = rest[end..].trim_start();
        if let Some(after) = rest.strip_prefix('=') {
            let after = after.trim_start();
            let (value, tail) = if let Some(q) = after.strip_prefix('"') {
                // A quoted string: up to the closing quote, escapes skipped.
                let mut close = None;
                let mut escaped = false;
                for (i, c) in q.char_indices() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            close = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let Some(i) = close else { break };
                (&q[..i], &q[i + 1..])
            } else {
                let e = after.find([',', ' ']).unwrap_or(after.len());
                (&after[..e], &after[e..])
            };
            if token.eq_ignore_ascii_case("error")
                && let Some(last) = out.last_mut()
            {
                last.1.get_or_insert(value);
            }
            rest = tail.trim_start();
        } else if !token.is_empty() {
            out.push((token, None));
        }
        rest = rest.trim_start_matches([',', ' ', '\t']);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use std::sync::Arc;

    fn payload(headers: &HeaderMap) -> serde_json::Value {
        let proof = headers["dpop"].to_str().unwrap();
        let p = proof.split('.').nth(1).unwrap();
        serde_json::from_slice(&B64.decode(p).unwrap()).unwrap()
    }

    fn token() -> Token {
        let key = Arc::new(crate::dpop::ProofKey::generate().unwrap());
        Token::permanent(&crate::secret::Secret::new("tok.en".into()))
            .unwrap()
            .bound_to(Some(key))
    }

    fn send(d: &Dpop, token: &Token, method: Method, uri: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer app".parse().unwrap());
        headers.insert("dpop", "app-proof".parse().unwrap());
        d.authorize(token, &method, &uri.parse().unwrap(), &mut headers);
        headers
    }

    fn dpop() -> Dpop {
        Dpop::new("api.example", DpopMetrics::detached())
    }

    #[test]
    fn each_request_gets_its_own_proof_for_its_method_and_url() {
        let (d, t) = (dpop(), token());
        let a = send(
            &d,
            &t,
            Method::POST,
            "https://API.example:443/base/items?x=1",
        );
        assert_eq!(a["authorization"], "DPoP tok.en");
        assert!(a["authorization"].is_sensitive() && a["dpop"].is_sensitive());
        assert_eq!(
            a.get_all("dpop").iter().count(),
            1,
            "the app's proof is replaced"
        );
        let p = payload(&a);
        assert_eq!(p["htm"], "POST");
        assert_eq!(p["htu"], "https://api.example/base/items");
        assert_eq!(p["ath"], crate::dpop::ath(b"tok.en"));
        assert!(p.get("nonce").is_none());
        let b = send(&d, &t, Method::GET, "https://api.example:8443/");
        let q = payload(&b);
        assert_eq!(q["htu"], "https://api.example:8443/");
        assert_ne!(p["jti"], q["jti"]);
        assert_eq!(d.metrics.proofs.get(), 2);
    }

    #[test]
    fn a_token_without_a_key_sends_neither_header() {
        let plain = Token::permanent(&crate::secret::Secret::new("t".into())).unwrap();
        let h = send(&dpop(), &plain, Method::GET, "https://h/");
        assert!(h.get("authorization").is_none() && h.get("dpop").is_none());
    }

    fn answer(status: u16, pairs: &[(&str, &str)]) -> (StatusCode, HeaderMap) {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        (StatusCode::from_u16(status).unwrap(), h)
    }

    #[test]
    fn nonces_from_responses_go_into_later_proofs() {
        let (d, t) = (dpop(), token());
        let (s, h) = answer(200, &[("dpop-nonce", "eyJ7S_zG.eyJH0-Z.HX4w-7v")]);
        assert_eq!(d.observe(s, &h), Verdict::Fine);
        let p = payload(&send(&d, &t, Method::GET, "https://h/"));
        assert_eq!(p["nonce"], "eyJ7S_zG.eyJH0-Z.HX4w-7v");
        // A malformed one is ignored.
        for bad in ["has space", "q\"uote"] {
            let (s, h) = answer(200, &[("dpop-nonce", bad)]);
            d.observe(s, &h);
        }
        let (s, h) = answer(
            200,
            &[("dpop-nonce", &"x".repeat(crate::dpop::MAX_NONCE + 1))],
        );
        d.observe(s, &h);
        assert_eq!(
            payload(&send(&d, &t, Method::GET, "https://h/"))["nonce"],
            "eyJ7S_zG.eyJH0-Z.HX4w-7v"
        );
    }

    #[test]
    fn a_nonce_demand_resends_once_and_never_blames_the_token() {
        let d = dpop();
        let demand = |n: &str| {
            answer(
                401,
                &[
                    (
                        "www-authenticate",
                        "DPoP error=\"use_dpop_nonce\", error_description=\"x\"",
                    ),
                    ("dpop-nonce", n),
                ],
            )
        };
        let (s, h) = demand("n1");
        assert_eq!(d.observe(s, &h), Verdict::Resend("use_dpop_nonce"));
        // The same nonce again (a request sent before the first demand came
        // back): its resend carries it. Each request resends once at most.
        let (s, h) = demand("n1");
        assert_eq!(d.observe(s, &h), Verdict::Resend("use_dpop_nonce"));
        // A demand without a nonce to use: nothing to resend with.
        let (s, h) = answer(
            401,
            &[("www-authenticate", "DPoP error=\"use_dpop_nonce\"")],
        );
        assert_eq!(d.observe(s, &h), Verdict::ProofRefused("use_dpop_nonce"));
        let (s, h) = answer(
            401,
            &[("www-authenticate", "DPoP error=\"invalid_dpop_proof\"")],
        );
        assert_eq!(
            d.observe(s, &h),
            Verdict::ProofRefused("invalid_dpop_proof")
        );
        // A token problem is the token's: the usual 401 path.
        let (s, h) = answer(401, &[("www-authenticate", "DPoP error=\"invalid_token\"")]);
        assert_eq!(d.observe(s, &h), Verdict::Fine);
        let (s, h) = answer(
            401,
            &[("www-authenticate", "Bearer error=\"use_dpop_nonce\"")],
        );
        assert_eq!(d.observe(s, &h), Verdict::Fine);
    }

    #[test]
    fn challenges_are_read_whole() {
        let error = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::WWW_AUTHENTICATE, v.parse().unwrap());
            dpop_error(&h)
        };
        assert_eq!(
            error(r#"Bearer realm="x, y", DPoP error="use_dpop_nonce""#),
            Some(Refusal::UseNonce)
        );
        assert_eq!(
            error(r#"dpop algs="ES256", error = invalid_dpop_proof"#),
            Some(Refusal::InvalidProof)
        );
        // Words inside another parameter are not the error.
        assert_eq!(
            error(r#"DPoP error="invalid_token", error_description="not use_dpop_nonce""#),
            None
        );
        assert_eq!(
            error(r#"Bearer error="use_dpop_nonce", DPoP algs="ES256""#),
            None
        );
        assert_eq!(error(r#"DPoP error="use_dpop_nonce"#), None, "unterminated");
        assert_eq!(error(""), None);
    }

    #[test]
    fn a_proof_refused_by_a_server_with_another_clock_uses_its_clock() {
        let (d, t) = (dpop(), token());
        let ahead = std::time::SystemTime::now() + std::time::Duration::from_secs(600);
        let date = httpdate::fmt_http_date(ahead);
        let (s, h) = answer(
            401,
            &[
                ("www-authenticate", "DPoP error=\"invalid_dpop_proof\""),
                ("date", &date),
            ],
        );
        assert_eq!(d.observe(s, &h), Verdict::Resend("invalid_dpop_proof"));
        let iat = payload(&send(&d, &t, Method::GET, "https://h/"))["iat"]
            .as_u64()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            (iat as i64 - (now as i64 + 600)).abs() <= 2,
            "{iat} vs {now}"
        );
        // A server whose clock agrees refuses for another reason: no resend.
        let (s, h) = answer(
            401,
            &[
                ("www-authenticate", "DPoP error=\"invalid_dpop_proof\""),
                (
                    "date",
                    &httpdate::fmt_http_date(std::time::SystemTime::now()),
                ),
            ],
        );
        assert_eq!(
            d.observe(s, &h),
            Verdict::ProofRefused("invalid_dpop_proof")
        );
    }
}
