//! The route table: which route, if any, a request's target host belongs to.
//!
//! Pure lookup, no I/O. Exact hosts live in a hash map; `*.suffix` wildcards
//! are tried longest suffix first. A pattern with a port matches only that
//! port and wins over the same pattern without one.

use std::collections::HashMap;
use std::fmt;

/// A route's `host` value, parsed: `api.example.com`, `api.example.com:8443`,
/// `*.example.com` or `*.example.com:443`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pattern {
    wildcard: bool,
    /// Lower case, no trailing dot; for a wildcard, the part after `*.`.
    name: String,
    port: Option<u16>,
}

impl Pattern {
    /// Parses a route host. The error says what is wrong, for `check`.
    pub fn parse(input: &str) -> Result<Self, String> {
        let (wildcard, rest) = match input.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, input),
        };
        let (host, port) = split_host_port(rest)
            .ok_or_else(|| format!("invalid port in host pattern {input:?}"))?;
        let name = normalize(host);
        if name.is_empty() {
            return Err(format!("empty host in {input:?}"));
        }
        if !valid_host(&name) {
            return Err(format!(
                "invalid host {input:?}: expected a DNS name, an IP address, or *.suffix"
            ));
        }
        if wildcard && name.starts_with('[') {
            return Err(format!(
                "a wildcard cannot apply to an IP address: {input:?}"
            ));
        }
        Ok(Self {
            wildcard,
            name: name.into_owned(),
            port,
        })
    }

    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The port the pattern is limited to, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Splits `host[:port]`, keeping IPv6 brackets. `None` for a bad port.
pub fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let (host, rest) = s.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok()?))),
            None if rest.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// Lower case without a trailing dot; borrows when already normal, which is
/// the common case on the request path.
pub fn normalize(host: &str) -> std::borrow::Cow<'_, str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// Whether a host taken from a request (any case, maybe one trailing dot)
/// is a DNS name or an IP literal: no userinfo, no stray characters, no
/// empty labels. Requests with anything else are refused before routing.
pub fn valid_request_host(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty() && valid_host(host)
}

fn valid_host(name: &str) -> bool {
    if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Maps hosts to route indices.
#[derive(Debug, Default)]
pub struct Table {
    exact: HashMap<String, usize>,
    exact_port: HashMap<(String, u16), usize>,
    /// (suffix with leading dot, port, index), longest suffix first.
    wildcards: Vec<(String, Option<u16>, usize)>,
}

impl Table {
    /// Builds the table. Duplicate patterns are rejected by config validation
    /// first; here the first one wins.
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a Pattern>) -> Self {
        let mut table = Table::default();
        for (i, p) in patterns.into_iter().enumerate() {
            match (p.wildcard, p.port) {
                (false, None) => {
                    table.exact.entry(p.name.clone()).or_insert(i);
                }
                (false, Some(port)) => {
                    table.exact_port.entry((p.name.clone(), port)).or_insert(i);
                }
                (true, port) => table.wildcards.push((format!(".{}", p.name), port, i)),
            }
        }
        // Longest suffix first; with equal suffixes the port-specific one first.
        table.wildcards.sort_by(|a, b| {
            b.0.len()
                .cmp(&a.0.len())
                .then(b.1.is_some().cmp(&a.1.is_some()))
        });
        table
    }

    /// Finds the route for `host` (as sent, any case, maybe a trailing dot)
    /// and `port` (the request's port, default applied by the caller).
    pub fn lookup(&self, host: &str, port: u16) -> Option<usize> {
        let host = normalize(host);
        let host: &str = &host;
        if !self.exact_port.is_empty() {
            // Allocates only when port-specific routes exist.
            if let Some(&i) = self.exact_port.get(&(host.to_owned(), port)) {
                return Some(i);
            }
        }
        if let Some(&i) = self.exact.get(host) {
            return Some(i);
        }
        self.wildcards
            .iter()
            .find(|(suffix, p, _)| {
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && p.is_none_or(|p| p == port)
            })
            .map(|&(_, _, i)| i)
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.exact_port.is_empty() && self.wildcards.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(hosts: &[&str]) -> Table {
        let pats: Vec<Pattern> = hosts.iter().map(|h| Pattern::parse(h).unwrap()).collect();
        Table::new(&pats)
    }

    #[test]
    fn lookup_table() {
        let t = table(&[
            "api.example.com",
            "api.example.com:8443",
            "*.example.com",
            "*.deep.example.com",
            "*.ports.test:443",
            "[::1]",
            "127.0.0.1",
        ]);
        let cases: &[(&str, u16, Option<usize>)] = &[
            ("api.example.com", 80, Some(0)),
            ("API.Example.COM", 80, Some(0)),
            ("api.example.com.", 80, Some(0)),
            ("api.example.com", 8443, Some(1)),
            ("a.example.com", 80, Some(2)),
            ("a.b.example.com", 80, Some(2)),
            ("x.deep.example.com", 80, Some(3)),
            ("example.com", 80, None),
            ("badexample.com", 80, None),
            ("a.ports.test", 443, Some(4)),
            ("a.ports.test", 80, None),
            ("[::1]", 80, Some(5)),
            ("127.0.0.1", 80, Some(6)),
            ("api.example.com.evil.test", 80, None),
        ];
        for (host, port, want) in cases {
            assert_eq!(t.lookup(host, *port), *want, "{host}:{port}");
        }
    }

    #[test]
    fn request_hosts_are_names_or_ip_literals() {
        for good in [
            "api.test",
            "API.Test.",
            "127.0.0.1",
            "[::1]",
            "xn--bcher-kva.test",
            "a_b.test",
        ] {
            assert!(valid_request_host(good), "{good:?} should be accepted");
        }
        for bad in [
            "",
            ".",
            "evil@api.test",
            "api.test..",
            "a..b",
            "[::1",
            "[zz]",
            "b\u{fc}cher.test",
            "api.test;x",
            "api.test%2f",
            "api test",
        ] {
            assert!(!valid_request_host(bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn parse_rejects_bad_patterns() {
        for bad in [
            "",
            "*.",
            "a b",
            "a..b",
            "host:99999",
            "host:x",
            "*.[::1]",
            "[zz]",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            Pattern::parse("API.test.:81").unwrap().to_string(),
            "api.test:81"
        );
    }
}
