//! Configuration: figment layering (defaults → TOML → `TOKEN_INJECTOR_*`
//! environment) into a serde mirror ([`raw`]), then validated once into the
//! typed [`Config`]. Every problem is collected and reported together, each
//! naming its key, so `token-injector check` shows them all in one pass.
//!
//! - `types.rs`: the typed sections ([`Proxy`], [`Tokens`], [`Profile`],
//!   [`Route`], …) and their small helpers;
//! - `load.rs`: the figment layering and the environment overrides;
//! - `raw.rs`: the serde mirror, every key optional, unknown keys refused;
//! - `validate/`: the mirror into [`Config`], one file per section;
//! - `error.rs`: [`Error`] and [`Problem`], what `check` prints.
//!
//! Besides [`crate::route`] (host patterns) and [`crate::secret`] (where
//! secrets come from), it uses [`crate::keys`] and [`crate::tls`] only to
//! check that keys and certificates load; nothing in the crate that uses
//! the config is used here.

mod error;
mod load;
mod raw;
mod types;
mod validate;

use std::path::Path;

pub use error::{Error, Problem};
pub use load::ENV_PREFIX;
pub use types::{
    Admin, Assertion, BasicEncoding, Cache, CacheMode, ClientAuth, ClientCert, Config, Dpop,
    Endpoint, Exchange, GRANTS, Grant, METHODS, Profile, Proxy, RedisTarget, Route, Static,
    Subject, Tokens, Unmatched, Upstream, UpstreamProtocol, UpstreamTarget,
};

/// Loads `path` with overrides from the process environment.
pub fn load(path: &Path) -> Result<Config, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    from_text(&text, base, std::env::vars())
}

/// Parses and validates TOML text with the given environment overrides.
/// Relative file paths in the config are resolved against `base_dir`.
pub fn from_text(
    text: &str,
    base_dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, Error> {
    let raw = load::layered(text, env).map_err(Error::Invalid)?;
    validate::config(raw, base_dir).map_err(Error::Invalid)
}

#[cfg(test)]
mod tests;
