//! A route's DPoP credential (RFC 9449): `Authorization: DPoP <token>` and
//! a fresh proof per request sent, bound to the request's method, its URL
//! as sent upstream and the token (`ath`), with the upstream's latest
//! nonce. An [`Authorize`] like the bearer header, so the request path does
//! not change: it already attaches the credential per attempt (a retry
//! after a 401, a re-send on a stale connection), and each gets a new proof.
//!
//! Issue 17, second step: not yet chosen by the config; the response side
//! (learning nonces on the request path, the `use_dpop_nonce` retry) comes
//! with the wiring.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Uri};

use super::authorize::Authorize;
use crate::dpop::{Claims, ProofKey};
use crate::token::Token;

static DPOP: HeaderName = HeaderName::from_static("dpop");
static DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");

thread_local! {
    /// Per worker thread: the proof and the claims' JSON, reused.
    static BUFFERS: RefCell<(String, String)> = const { RefCell::new((String::new(), String::new())) };
}

/// One route's DPoP attachment: the profile's key and the upstream's nonce.
#[derive(Debug)]
pub struct Dpop {
    key: Arc<ProofKey>,
    nonce: ArcSwapOption<String>,
}

impl Dpop {
    pub fn new(key: Arc<ProofKey>) -> Self {
        Self {
            key,
            nonce: ArcSwapOption::empty(),
        }
    }

    /// Keeps the `DPoP-Nonce` of an upstream response (success or error)
    /// for the next proofs. Whether it changed.
    pub fn note_nonce(&self, headers: &HeaderMap) -> bool {
        let Some(v) = headers.get(&DPOP_NONCE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        if !crate::dpop::valid_nonce(v) {
            return false;
        }
        if self.nonce.load().as_deref().map(String::as_str) == Some(v) {
            return false;
        }
        self.nonce.store(Some(Arc::new(v.to_owned())));
        true
    }

    fn proof(&self, token: &Token, method: &Method, uri: &Uri) -> Option<HeaderValue> {
        let scheme = uri.scheme_str().unwrap_or("https");
        let host = uri.host()?;
        let htu = crate::dpop::htu(scheme, host, uri.port_u16(), uri.path());
        let ath = crate::dpop::ath(token.value().as_bytes());
        let nonce = self.nonce.load();
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = Claims {
            htm: method.as_str(),
            htu: &htu,
            iat,
            ath: Some(&ath),
            nonce: nonce.as_deref().map(String::as_str),
        };
        BUFFERS.with(|b| {
            let (out, scratch) = &mut *b.borrow_mut();
            self.key.proof(out, &claims, scratch).ok()?;
            let mut v = HeaderValue::from_str(out).ok()?;
            // Proofs carry `ath`: never indexed by HPACK, never in Debug.
            v.set_sensitive(true);
            Some(v)
        })
    }
}

impl Authorize for Dpop {
    fn authorize(&self, token: &Token, method: &Method, uri: &Uri, headers: &mut HeaderMap) {
        let mut value = Vec::with_capacity(5 + token.value().len());
        value.extend_from_slice(b"DPoP ");
        value.extend_from_slice(token.value().as_bytes());
        let authorization = HeaderValue::from_bytes(&value).ok().map(|mut v| {
            v.set_sensitive(true);
            v
        });
        match (authorization, self.proof(token, method, uri)) {
            (Some(a), Some(p)) => {
                super::headers::inject_as(headers, &header::AUTHORIZATION, a);
                super::headers::inject_as(headers, &DPOP, p);
            }
            // Cannot happen with a valid token and key; never send the
            // app's own values in their place.
            _ => {
                headers.remove(header::AUTHORIZATION);
                headers.remove(&DPOP);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    fn payload(headers: &HeaderMap) -> serde_json::Value {
        let proof = headers["dpop"].to_str().unwrap();
        let p = proof.split('.').nth(1).unwrap();
        serde_json::from_slice(&B64.decode(p).unwrap()).unwrap()
    }

    fn send(d: &Dpop, method: Method, uri: &str) -> HeaderMap {
        let token = Token::permanent(&crate::secret::Secret::new("tok.en".into())).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer app".parse().unwrap());
        headers.insert("dpop", "app-proof".parse().unwrap());
        d.authorize(&token, &method, &uri.parse().unwrap(), &mut headers);
        headers
    }

    #[test]
    fn each_request_gets_its_own_proof_for_its_method_and_url() {
        let d = Dpop::new(Arc::new(ProofKey::generate().unwrap()));
        let a = send(&d, Method::POST, "https://API.example:443/base/items?x=1");
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
        let b = send(&d, Method::GET, "https://api.example:8443/");
        let q = payload(&b);
        assert_eq!(q["htu"], "https://api.example:8443/");
        assert_ne!(p["jti"], q["jti"]);
    }

    #[test]
    fn nonces_from_responses_go_into_later_proofs() {
        let d = Dpop::new(Arc::new(ProofKey::generate().unwrap()));
        let mut response = HeaderMap::new();
        assert!(!d.note_nonce(&response));
        response.insert("dpop-nonce", "eyJ7S_zG.eyJH0-Z.HX4w-7v".parse().unwrap());
        assert!(d.note_nonce(&response));
        assert!(!d.note_nonce(&response), "unchanged");
        let p = payload(&send(&d, Method::GET, "https://h/"));
        assert_eq!(p["nonce"], "eyJ7S_zG.eyJH0-Z.HX4w-7v");
        // A rotated nonce replaces it; a malformed one is ignored.
        response.insert("dpop-nonce", "n2".parse().unwrap());
        assert!(d.note_nonce(&response));
        for bad in ["", "has space", "q\"uote"] {
            response.insert("dpop-nonce", bad.parse().unwrap());
            assert!(!d.note_nonce(&response), "{bad:?}");
        }
        response.insert(
            "dpop-nonce",
            "x".repeat(crate::dpop::MAX_NONCE + 1).parse().unwrap(),
        );
        assert!(!d.note_nonce(&response));
        assert_eq!(payload(&send(&d, Method::GET, "https://h/"))["nonce"], "n2");
    }
}
