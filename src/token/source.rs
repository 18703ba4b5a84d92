//! Where a profile's tokens come from, as the refresh loop sees it.
//!
//! The loop ([`super::refresh::run`]) only needs "something that answers a
//! token request"; the grant client is one such thing, and tests give the
//! loop a scripted source so a token's whole life runs in paused time.

use std::future::Future;

use super::FetchError;
use super::response::Parsed;

/// Something that can be asked for a fresh token. One call is one attempt:
/// the loop decides when to call again.
pub trait Source: Send + Sync + 'static {
    fn fetch(&self) -> impl Future<Output = Result<Parsed, FetchError>> + Send;
}

impl Source for super::Client {
    fn fetch(&self) -> impl Future<Output = Result<Parsed, FetchError>> + Send {
        super::Client::fetch(self)
    }
}
