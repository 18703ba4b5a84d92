//! Validation: the serde mirror ([`Raw`]) into the typed [`Config`]. Every
//! problem is collected, each naming its key, and reported together, so
//! `token-injector check` shows them all in one pass. A key with a problem
//! takes its default so the checks after it still run.
//!
//! The [`Validator`] and the helpers every section shares (durations,
//! addresses, counts, paths, files, URLs) are here; each section has its own
//! file: [`proxy`] (`[proxy]`, `[admin]`), [`tokens`], [`upstream`],
//! [`profile`] (`[profiles.*]`: grants and client authentication) and
//! [`route`] (`[[routes]]`) and [`cache`] (`[cache]`, the fleet's Redis).

mod cache;
mod grant;
mod profile;
mod proxy;
mod route;
mod tokens;
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::Raw;
use super::{Config, Problem};

/// No configured duration may exceed this.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// `proxy.max_header_bytes`: hyper's HTTP/1 read buffer cannot be smaller
/// than 8 KiB; above 1 MiB a header flood costs more memory than it is worth.
const MIN_HEADER_BYTES: usize = 8 * 1024;
const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// Validates `raw`, resolving relative file paths against `base_dir`: the
/// typed config, or every problem found.
pub(super) fn config(raw: Raw, base_dir: &Path) -> Result<Config, Vec<Problem>> {
    let mut v = Validator {
        problems: Vec::new(),
        base_dir,
    };
    let config = v.config(raw);
    match config {
        Some(c) if v.problems.is_empty() => Ok(c),
        _ => Err(v.problems),
    }
}

struct Validator<'a> {
    problems: Vec<Problem>,
    base_dir: &'a Path,
}

fn dur(default: &str) -> Duration {
    humantime::parse_duration(default).expect("valid default duration")
}

impl Validator<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// The sections in the order of the file; problems are reported in the
    /// order they are found.
    fn config(&mut self, raw: Raw) -> Option<Config> {
        let proxy = self.proxy(raw.proxy);
        let admin = self.admin(raw.admin);
        let tokens = self.tokens(raw.tokens);
        let upstream = self.upstream(raw.upstream);
        // Whether `[cache]` exists, even with problems of its own: profiles
        // are checked against that, not against whether it validated.
        let has_cache = raw.cache.is_some();

        // Routes are checked against the declared names, so a profile with
        // its own problems does not also fail every route that uses it.
        let declared: Vec<String> = raw.profiles.keys().cloned().collect();
        let dpop: Vec<String> = raw
            .profiles
            .iter()
            .filter(|(_, p)| p.dpop == Some(true))
            .map(|(n, _)| n.clone())
            .collect();
        let cache = raw.cache.and_then(|c| self.cache(c));
        let (profiles, statics) = self.profiles(raw.profiles, has_cache);
        self.chains(&profiles, &declared);
        for (name, p) in &profiles {
            if let crate::config::Grant::TokenExchange(crate::config::Exchange {
                subject: crate::config::Subject::Profile(s),
                ..
            }) = &p.grant
                && statics.contains_key(s)
            {
                self.problem(
                    format!("profiles.{name}.subject_profile"),
                    format!(
                        "{s:?} is a static credential; a subject must be a profile that gets tokens"
                    ),
                );
            }
        }
        let (routes, route_listens) =
            self.routes(raw.routes, &declared, &dpop, &proxy.connect_allow);

        // Every listener address must be distinct (port 0 asks for any port).
        let mut listeners: Vec<(String, SocketAddr)> = vec![
            ("proxy.listen".into(), proxy.listen),
            ("admin.listen".into(), admin.listen),
        ];
        listeners.extend(route_listens);
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| a == addr) {
                self.problem(key.clone(), format!("{addr} is already used by {other}"));
            }
        }

        Some(Config {
            proxy,
            admin,
            tokens,
            upstream,
            profiles,
            statics,
            routes,
            cache,
        })
    }

    fn one_of(&mut self, key: &str, value: &str, allowed: &[&str]) {
        self.problem(
            key,
            format!(
                "unknown value {value:?}; expected one of {}",
                allowed.join(", ")
            ),
        );
    }

    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let value = value.unwrap_or(default);
        value.parse().unwrap_or_else(|_| {
            self.problem(
                key,
                format!("invalid address {value:?}; expected IP:PORT such as \"127.0.0.1:4180\""),
            );
            default.parse().expect("valid default address")
        })
    }

    /// A whole number within `range`, or `default` when unset.
    fn count(
        &mut self,
        key: &str,
        value: Option<u64>,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> usize {
        let Some(v) = value else {
            return default;
        };
        match usize::try_from(v) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                self.problem(
                    key,
                    format!(
                        "{v} is out of range; expected {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn duration(&mut self, key: &str, value: Option<String>, default: &str) -> Duration {
        match value {
            None => dur(default),
            Some(v) => match humantime::parse_duration(&v) {
                // A bound keeps every timer and sum of durations far from overflow.
                Ok(d) if d > MAX_DURATION => {
                    self.problem(key, format!("{v:?} is too long; at most 24h"));
                    dur(default)
                }
                Ok(d) => d,
                Err(_) => {
                    self.problem(
                        key,
                        format!(
                            "invalid duration {v:?}; expected e.g. \"10s\", \"500ms\" or \"5m\""
                        ),
                    );
                    dur(default)
                }
            },
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let path = PathBuf::from(p);
        if path.is_absolute() {
            path
        } else {
            self.base_dir.join(path)
        }
    }

    /// A file that must exist and be readable now.
    fn readable_file(&mut self, key: &str, p: &str) -> PathBuf {
        let path = self.path(p);
        if let Err(e) = std::fs::File::open(&path) {
            self.problem(key, format!("cannot read {}: {e}", path.display()));
        }
        path
    }

    fn ca_file(&mut self, key: &str, p: Option<&str>) -> Option<PathBuf> {
        let p = p?;
        let path = self.path(p);
        if let Err(e) = crate::tls::load_certs(&path) {
            self.problem(key, e.to_string());
        }
        Some(path)
    }

    fn https_url(&mut self, key: &str, u: &str) -> Option<url::Url> {
        match url::Url::parse(u) {
            Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                self.problem(
                    key,
                    "must not contain user information; use client_secret_file or client_secret_env",
                );
                None
            }
            Ok(url) if url.scheme() == "https" && url.host().is_some() => Some(url),
            Ok(_) => {
                self.problem(key, format!("{u:?} must be an https:// URL"));
                None
            }
            Err(e) => {
                self.problem(key, format!("invalid URL {u:?}: {e}"));
                None
            }
        }
    }
}
