//! token-injector: an egress sidecar that attaches cached, proactively
//! renewed credentials (OAuth 2.0 access tokens, static API keys) to an
//! app's plain-HTTP requests and forwards them over TLS.
//!
//! The data path reads top-down: [`serve`] accepts → [`proxy`] resolves the
//! [`route`], reads the profile's [`token::Store`], attaches the credential
//! ([`proxy::authorize`]) and forwards over its pooled upstream client.
//! Background work never sits on it:
//! - [`config`]: TOML + environment → validated, typed [`config::Config`];
//! - [`secret`]: secret values that never print, and where they come from;
//! - [`keys`]: PEM private keys and the JWS algorithms that fit them;
//! - [`google`]: Google Cloud credential files (service account keys);
//! - [`token`]: per-profile credential sources, stores and renewal tasks;
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` on their own listener;
//! - [`metrics`]: the registry and its per-subsystem metrics;
//! - [`reload`]: config file watching and SIGHUP;
//! - [`tls`]: trust roots and rustls client settings;
//! - [`head`]: the request-head checks before hyper parses;
//! - [`errors`]: an error and its causes on one line;
//! - [`app`]: assembles all of it from a config ([`start`] → [`Running`]),
//!   and swaps in a new config on reload ([`Running::apply`]);
//! - [`demo`]: `token-injector demo`, a self-contained local demo (cargo
//!   feature `demo`, on by default; the production build leaves it out).

pub mod admin;
pub mod app;
pub mod cache;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod dpop;
pub mod errors;
pub mod google;
pub mod head;
pub mod keys;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod secret;
pub mod serve;
pub mod tls;
pub mod token;

pub use app::{Running, StartError, start};
