//! How a route's credential is attached to an outgoing request.
//!
//! A route holds one [`Authorize`]: the request path calls it for every
//! attempt it sends (the first, the retry after a 401, the re-send on a stale
//! pooled connection), after the upstream URI is final, so a kind of
//! credential that depends on the method and URI (a DPoP proof) is a new
//! implementation here, not an edit through the request path.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use crate::token::Token;

/// Attaches a credential to an outgoing request.
pub trait Authorize: Send + Sync + 'static {
    /// Sets `token` on `headers` of a request with `method` to `uri` (the
    /// URI as sent upstream), replacing whatever the app sent there.
    fn authorize(&self, token: &Token, method: &Method, uri: &Uri, headers: &mut HeaderMap);

    /// Sees the head of every upstream response to a request it
    /// authorized: what it says about the credential beyond the token.
    #[inline]
    fn observe(&self, _status: StatusCode, _headers: &HeaderMap) -> Verdict {
        Verdict::Fine
    }

    /// The request is sent again after [`Verdict::Resend`].
    fn resending(&self) {}

    /// The upstream refused what [`Verdict::ProofRefused`] names, and the
    /// request is not sent again.
    fn refused(&self, _reason: &'static str) {}
}

/// What a response says beyond its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing: a 401 means the token was refused, as always.
    Fine,
    /// The upstream refused the proof that went with the token, and a new
    /// one can succeed (it gave a nonce, or its clock is known now): send
    /// the request once more with the same token. Says why.
    Resend(&'static str),
    /// The upstream refused the proof, not the token; sending again would
    /// not help, and the token stays.
    ProofRefused(&'static str),
}

/// The credential in one header, after a fixed prefix: `Authorization:
/// Bearer <token>` by default, or e.g. `x-api-key: <key>`.
#[derive(Debug, Clone)]
pub struct Header {
    name: HeaderName,
    prefix: Prefix,
}

#[derive(Debug, Clone)]
enum Prefix {
    /// `Bearer `: the token's prebuilt value, no work per request.
    Bearer,
    /// Nothing: the token's bare prebuilt value.
    None,
    /// Anything else: joined per request (one small allocation).
    Other(Vec<u8>),
}

impl Header {
    /// `prefix` must be valid in a header value (checked by the config).
    pub fn new(name: HeaderName, prefix: &str) -> Self {
        let prefix = match prefix {
            "Bearer " => Prefix::Bearer,
            "" => Prefix::None,
            other => Prefix::Other(other.as_bytes().to_vec()),
        };
        Self { name, prefix }
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer() -> Self {
        Self::new(header::AUTHORIZATION, "Bearer ")
    }

    fn value(&self, token: &Token) -> Option<HeaderValue> {
        match &self.prefix {
            Prefix::Bearer => Some(token.header().clone()),
            Prefix::None => Some(token.value().clone()),
            Prefix::Other(prefix) => {
                let mut v = Vec::with_capacity(prefix.len() + token.value().len());
                v.extend_from_slice(prefix);
                v.extend_from_slice(token.value().as_bytes());
                let mut v = HeaderValue::from_bytes(&v).ok()?;
                v.set_sensitive(true);
                Some(v)
            }
        }
    }
}

impl Authorize for Header {
    #[inline]
    fn authorize(&self, token: &Token, _: &Method, _: &Uri, headers: &mut HeaderMap) {
        match self.value(token) {
            Some(v) => super::headers::inject_as(headers, &self.name, v),
            // Cannot happen with a prefix the config accepted; never send
            // the app's own value in its place.
            None => {
                headers.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn token() -> Token {
        Token::permanent(&Secret::new("k3y.v".into())).unwrap()
    }

    fn attach(h: &Header) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Basic app".parse().unwrap());
        headers.insert("x-api-key", "app-key".parse().unwrap());
        h.authorize(&token(), &Method::GET, &Uri::from_static("/"), &mut headers);
        headers
    }

    #[test]
    fn bearer_replaces_the_apps_authorization() {
        let h = attach(&Header::bearer());
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        assert_eq!(h["authorization"], "Bearer k3y.v");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["x-api-key"], "app-key");
    }

    #[test]
    fn other_header_and_prefixes() {
        let h = attach(&Header::new(HeaderName::from_static("x-api-key"), ""));
        assert_eq!(h["x-api-key"], "k3y.v");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h.get_all("x-api-key").iter().count(), 1);
        // The app's Authorization is not ours to touch on such a route.
        assert_eq!(h["authorization"], "Basic app");
        let h = attach(&Header::new(header::AUTHORIZATION, "Token "));
        assert_eq!(h["authorization"], "Token k3y.v");
        assert!(h["authorization"].is_sensitive());
        assert!(!format!("{h:?}").contains("k3y"));
    }
}
