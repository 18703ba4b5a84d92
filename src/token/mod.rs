//! Token sources, one per credential profile.
//!
//! - [`client`] makes the token request for the profile's auth method;
//! - [`response`] parses the answer;
//! - [`store`] holds the current token: the refresher writes, the request
//!   path reads lock-free through `arc-swap`;
//! - [`refresh`] is the per-profile background task and its pure policy.

pub mod assertion;
pub mod client;
pub mod federation;
pub mod grant;
pub mod observe;
pub mod refresh;
pub mod response;
pub mod source;
pub mod static_credential;
pub mod store;

#[cfg(test)]
mod lifecycle_tests;

use std::fmt;
use std::time::{Duration, SystemTime};

// tokio's clock, so that tests can run a token's whole life in paused time;
// outside tests it is `std::time::Instant` itself.
use tokio::time::Instant;

use bytes::Bytes;
use http::HeaderValue;

pub use client::Client;
pub use observe::Observe;
pub use refresh::Policy;
pub use response::FetchError;
pub use source::{Attempt, Source};
pub use store::{Store, Unavailable};

/// A usable credential (an access token, or a static one) with its header
/// values prebuilt once, so attaching it costs a reference-count increment.
/// Debug shows times only, never the value.
pub struct Token {
    /// `Bearer <value>`, the common case.
    header: HeaderValue,
    /// `<value>` alone, sharing `header`'s bytes.
    value: HeaderValue,
    expires_at: Instant,
    usable_until: Instant,
    refresh_at: Instant,
    expires_unix: SystemTime,
    /// A static credential: it never expires.
    permanent: bool,
    /// The DPoP key the token is bound to: requests carrying it sign their
    /// proofs with this key (a rotated key file binds only later tokens).
    dpop: Option<Box<DpopBinding>>,
}

/// A DPoP-bound token's key, with what its proofs and header repeat
/// (computed once per token, not per request).
struct DpopBinding {
    key: std::sync::Arc<crate::dpop::ProofKey>,
    /// base64url(SHA-256(token)), the proofs' `ath`.
    ath: String,
    /// `DPoP <token>`, marked sensitive.
    header: HeaderValue,
}

/// Builds `Bearer <value>` and `<value>`, both marked sensitive (hpack never
/// indexes them and Debug prints "Sensitive"), sharing one allocation.
fn header_values(value: &str) -> Option<(HeaderValue, HeaderValue)> {
    let mut bytes = Vec::with_capacity(7 + value.len());
    bytes.extend_from_slice(b"Bearer ");
    bytes.extend_from_slice(value.as_bytes());
    let bytes = Bytes::from(bytes);
    let mut header = HeaderValue::from_maybe_shared(bytes.clone()).ok()?;
    let mut value = HeaderValue::from_maybe_shared(bytes.slice(7..)).ok()?;
    header.set_sensitive(true);
    value.set_sensitive(true);
    Some((header, value))
}

impl Token {
    /// Builds a token obtained by a request sent at `sent` (the conservative
    /// start of its lifetime). Fails only if the value cannot be a header.
    pub fn new(
        access_token: &crate::secret::Secret,
        sent: Instant,
        lifetime: Duration,
        policy: &Policy,
        jitter: f64,
    ) -> Result<Self, FetchError> {
        let (header, value) = header_values(access_token.expose()).ok_or_else(|| {
            FetchError::InvalidResponse("access_token is not a valid header value".into())
        })?;
        let now_wall = SystemTime::now();
        let elapsed = sent.elapsed();
        Ok(Self {
            header,
            value,
            permanent: false,
            expires_at: sent + lifetime,
            usable_until: sent + lifetime.saturating_sub(policy.skew(lifetime)),
            // Never in the past: a token adopted from the shared cache late
            // in its life must not make the task renew in a tight loop.
            refresh_at: (sent + policy.refresh_in(lifetime, jitter))
                .max(Instant::now() + refresh::MIN_REFRESH),
            expires_unix: now_wall - elapsed + lifetime,
            dpop: None,
        })
    }

    /// A credential attached as it is and never renewed (`grant = "static"`).
    /// `None` if it cannot be a header value.
    pub fn permanent(credential: &crate::secret::Secret) -> Option<Self> {
        let (header, value) = header_values(credential.expose())?;
        // Far enough to never matter, near enough to never overflow.
        let forever = Duration::from_secs(100 * 365 * 24 * 3600);
        let now = Instant::now();
        Some(Self {
            header,
            value,
            expires_at: now + forever,
            usable_until: now + forever,
            refresh_at: now + forever,
            expires_unix: SystemTime::now() + forever,
            permanent: true,
            dpop: None,
        })
    }

    /// Never lets a re-issued copy of `held` be used or live longer than
    /// `held` itself.
    pub(crate) fn cap_to(&mut self, held: &Token, now: Instant) {
        self.expires_at = self.expires_at.min(held.expires_at);
        self.usable_until = self.usable_until.min(held.usable_until);
        self.expires_unix = self.expires_unix.min(held.expires_unix);
        // Renew while the token is still usable, halfway to that point, so
        // requests never find it unusable before the renewal has run.
        let halfway = now + self.usable_until.saturating_duration_since(now) / 2;
        self.refresh_at = self.refresh_at.min(halfway);
    }

    /// Binds the token to the DPoP key it was issued for.
    pub fn bound_to(mut self, key: Option<std::sync::Arc<crate::dpop::ProofKey>>) -> Self {
        self.dpop = key.and_then(|key| {
            let mut bytes = Vec::with_capacity(5 + self.value.len());
            bytes.extend_from_slice(b"DPoP ");
            bytes.extend_from_slice(self.value.as_bytes());
            let mut header = HeaderValue::from_maybe_shared(Bytes::from(bytes)).ok()?;
            header.set_sensitive(true);
            Some(Box::new(DpopBinding {
                ath: crate::dpop::ath(self.value.as_bytes()),
                key,
                header,
            }))
        });
        self
    }

    /// The DPoP key the token is bound to, if any.
    #[inline]
    pub fn dpop_key(&self) -> Option<&crate::dpop::ProofKey> {
        self.dpop.as_ref().map(|b| &*b.key)
    }

    /// The `ath` of a DPoP-bound token's proofs.
    #[inline]
    pub fn dpop_ath(&self) -> Option<&str> {
        self.dpop.as_ref().map(|b| b.ath.as_str())
    }

    /// `Authorization: DPoP <token>` of a DPoP-bound token.
    #[inline]
    pub fn dpop_header(&self) -> Option<&HeaderValue> {
        self.dpop.as_ref().map(|b| &b.header)
    }

    /// The `Authorization` value, `Bearer …`, marked sensitive.
    #[inline]
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// The credential alone, without a prefix, marked sensitive.
    #[inline]
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }

    /// Whether this is a static credential that never expires.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// Whether the token may still be sent: not past expiry minus the skew.
    #[inline]
    pub fn usable_at(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// When the token stops being sent (expiry minus the skew).
    pub fn usable_until(&self) -> Instant {
        self.usable_until
    }

    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    pub fn refresh_at(&self) -> Instant {
        self.refresh_at
    }

    /// Expiry on the wall clock, for status pages and metrics.
    pub fn expires_unix(&self) -> SystemTime {
        self.expires_unix
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("header", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("usable_until", &self.usable_until)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    #[test]
    fn token_debug_redacts_and_header_is_sensitive() {
        let policy = Policy::for_tests();
        let t = Token::new(
            &Secret::new("abc.def".into()),
            Instant::now(),
            Duration::from_secs(60),
            &policy,
            0.0,
        )
        .unwrap();
        assert!(t.header().is_sensitive());
        assert!(t.value().is_sensitive());
        assert_eq!(t.header().as_bytes(), b"Bearer abc.def");
        assert_eq!(t.value().as_bytes(), b"abc.def");
        assert!(!format!("{:?}", t.value()).contains("abc.def"));
        assert!(!format!("{t:?}").contains("abc.def"));
        assert!(!format!("{:?}", t.header()).contains("abc.def"));
    }
}
