//! Where a profile's tokens come from, as the refresh loop sees it.
//!
//! The loop ([`super::refresh::run`]) only needs "something that answers a
//! token request"; the grant client is one such thing, a shared cache in
//! front of it ([`crate::cache::Shared`]) another, and tests give the loop a
//! scripted source so a token's whole life runs in paused time.

use std::future::Future;
use std::sync::Arc;

use super::response::Parsed;
use super::{FetchError, Token};

/// What the loop holds when it asks for a token. A plain source ignores it;
/// a cache layer uses it to tell a renewed token from the one in hand, and
/// to forget a token an upstream refused.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// The token published now, usable or not.
    pub held: Option<Arc<Token>>,
    /// The last token published, dropped after an upstream refused it (401).
    pub refused: Option<Arc<Token>>,
}

impl Attempt {
    /// Whether `value` (a bare token) is the one held or the one refused.
    pub fn knows(&self, value: &[u8]) -> bool {
        [&self.held, &self.refused]
            .into_iter()
            .flatten()
            .any(|t| t.value().as_bytes() == value)
    }
}

/// Something that can be asked for a fresh token. One call is one attempt:
/// the loop decides when to call again.
pub trait Source: Send + Sync + 'static {
    fn fetch(&self, attempt: Attempt) -> impl Future<Output = Result<Parsed, FetchError>> + Send;

    /// The DPoP key the next token will be bound to, for a DPoP profile: a
    /// shared cache keeps tokens of different keys apart.
    fn dpop_key(&self) -> Option<std::sync::Arc<crate::dpop::ProofKey>> {
        None
    }

    /// Resolves when the token in hand should be renewed before its time:
    /// a chain's subject profile has a new token. Default: never.
    fn renew_early(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

impl Source for super::Client {
    fn fetch(&self, _: Attempt) -> impl Future<Output = Result<Parsed, FetchError>> + Send {
        super::Client::fetch(self)
    }

    fn dpop_key(&self) -> Option<std::sync::Arc<crate::dpop::ProofKey>> {
        super::Client::dpop_key(self)
    }

    fn renew_early(&self) -> impl Future<Output = ()> + Send {
        super::Client::subject_renewed(self)
    }
}
