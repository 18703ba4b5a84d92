//! `[cache]`: the Redis server (or Sentinel set) a fleet shares tokens
//! through, its credentials, TLS and the key that encrypts every entry.

use std::time::Duration;

use crate::config::raw::RawCache;
use crate::config::{Cache, RedisTarget};

use super::Validator;

/// Commands larger than this would not fit a Redis key comfortably.
const MAX_PREFIX: usize = 128;

impl Validator<'_> {
    pub(super) fn cache(&mut self, c: RawCache) -> Option<Cache> {
        let mut ok = true;
        let target = match (&c.redis_url, &c.sentinels, &c.master_name) {
            (Some(u), None, None) => self.redis_url(u),
            (None, Some(list), Some(name)) => self.sentinels(list, name),
            (None, None, None) => {
                self.problem(
                    "cache.redis_url",
                    "missing; [cache] needs redis_url, or sentinels and master_name",
                );
                None
            }
            (Some(_), _, _) => {
                self.problem(
                    "cache.redis_url",
                    "set together with sentinels/master_name; use one or the other",
                );
                None
            }
            (None, Some(_), None) => {
                self.problem("cache.master_name", "missing; sentinels need master_name");
                None
            }
            (None, None, Some(_)) => {
                self.problem("cache.sentinels", "missing; master_name needs sentinels");
                None
            }
        };
        let tls = match &target {
            Some(RedisTarget::Url(u)) => u.scheme() == "rediss",
            _ => c.ca_file.is_some(),
        };
        let ca_file = self.ca_file("cache.ca_file", c.ca_file.as_deref());
        if ca_file.is_some() && !tls {
            self.problem(
                "cache.ca_file",
                "set for a redis:// URL, which does not use TLS; use rediss://",
            );
            ok = false;
        }
        let client_cert = match self.client_cert(
            "cache",
            c.client_cert_file.as_deref(),
            c.client_key_file.as_deref(),
        ) {
            Ok(cert) => cert,
            Err(()) => {
                ok = false;
                None
            }
        };
        if client_cert.is_some() && !tls {
            self.problem(
                "cache.client_cert_file",
                "mutual TLS needs TLS to Redis: use rediss:// (or ca_file with sentinels)",
            );
            ok = false;
        }
        if let Some(user) = &c.username
            && (user.is_empty() || user.chars().any(|ch| ch.is_whitespace() || ch.is_control()))
        {
            self.problem("cache.username", "must be a non-empty name without spaces");
            ok = false;
        }
        if c.username.is_some() && c.password_file.is_none() {
            self.problem(
                "cache.username",
                "set without password_file; an ACL user needs its password",
            );
            ok = false;
        }
        let password_file = match c.password_file.as_deref() {
            None => None,
            Some(p) => {
                let path = self.readable_file("cache.password_file", p);
                match crate::secret::Source::File(path.clone()).read() {
                    Ok(_) => {}
                    Err(e) => {
                        self.problem("cache.password_file", e.to_string());
                        ok = false;
                    }
                }
                Some(path)
            }
        };
        let encryption_key_file = match c.encryption_key_file.as_deref() {
            None => {
                self.problem(
                    "cache.encryption_key_file",
                    "missing; shared tokens are encrypted with it (32 bytes, raw or base64: openssl rand -base64 32)",
                );
                None
            }
            Some(p) => {
                let path = self.path(p);
                match crate::secret::read_key32(&path) {
                    Ok(_) => Some(path),
                    Err(e) => {
                        self.problem("cache.encryption_key_file", e);
                        None
                    }
                }
            }
        };
        let key_prefix = c.key_prefix.unwrap_or_else(|| "token-injector".to_owned());
        if key_prefix.is_empty()
            || key_prefix.len() > MAX_PREFIX
            || !key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
        {
            self.problem(
                "cache.key_prefix",
                format!("{key_prefix:?}: expected 1 to {MAX_PREFIX} letters, digits or - _ . : /"),
            );
            ok = false;
        }
        let operation_timeout =
            self.duration("cache.operation_timeout", c.operation_timeout, "250ms");
        if operation_timeout < Duration::from_millis(1)
            || operation_timeout > Duration::from_secs(10)
        {
            self.problem(
                "cache.operation_timeout",
                "out of range; expected 1ms to 10s",
            );
            ok = false;
        }
        Some(Cache {
            target: target?,
            username: c.username,
            password_file,
            tls,
            ca_file,
            client_cert,
            encryption_key_file: encryption_key_file?,
            key_prefix,
            operation_timeout,
        })
        .filter(|_| ok)
    }

    fn redis_url(&mut self, u: &str) -> Option<RedisTarget> {
        let key = "cache.redis_url";
        match url::Url::parse(u) {
            Ok(url) if url.password().is_some() => {
                self.problem(
                    key,
                    "must not contain a password; use password_file (and username)",
                );
                None
            }
            Ok(url) if !url.username().is_empty() => {
                self.problem(key, "must not contain user information; use username");
                None
            }
            Ok(url)
                if matches!(url.scheme(), "redis" | "rediss")
                    && url.host().is_some()
                    && url.query().is_none()
                    && url.fragment().is_none() =>
            {
                let db = url.path().trim_start_matches('/');
                if !db.is_empty() && db.parse::<u16>().is_err() {
                    self.problem(
                        key,
                        format!("{db:?} is not a database number (the path is /DB, e.g. /0)"),
                    );
                    return None;
                }
                Some(RedisTarget::Url(url))
            }
            Ok(_) => {
                self.problem(
                    key,
                    format!("{u:?}: expected redis://HOST:PORT/DB or rediss://HOST:PORT/DB"),
                );
                None
            }
            Err(e) => {
                self.problem(key, format!("invalid URL {u:?}: {e}"));
                None
            }
        }
    }

    fn sentinels(&mut self, list: &[String], master_name: &str) -> Option<RedisTarget> {
        let mut sentinels = Vec::new();
        if list.is_empty() {
            self.problem("cache.sentinels", "empty; list at least one HOST:PORT");
            return None;
        }
        for (i, s) in list.iter().enumerate() {
            let parsed = s
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .filter(|(h, p)| !h.is_empty() && *p != 0);
            match parsed {
                Some((h, p)) => sentinels.push((h.to_owned(), p)),
                None => self.problem(
                    format!("cache.sentinels[{i}]"),
                    format!("{s:?}: expected HOST:PORT, e.g. \"10.0.0.5:26379\""),
                ),
            }
        }
        if master_name.is_empty() || master_name.chars().any(char::is_whitespace) {
            self.problem(
                "cache.master_name",
                "must be a non-empty name without spaces",
            );
            return None;
        }
        (sentinels.len() == list.len()).then(|| RedisTarget::Sentinel {
            sentinels,
            master_name: master_name.to_owned(),
            db: 0,
        })
    }
}
