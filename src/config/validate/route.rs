//! `[[routes]]`: host patterns, upstreams, credential headers, mutual TLS
//! to the upstream, and how routes relate to each other and to
//! `proxy.connect_allow`.

use std::collections::HashMap;
use std::net::SocketAddr;

use http::HeaderName;
use http::uri::Authority;

use crate::config::raw::RawRoute;
use crate::config::{ClientCert, Route, UpstreamProtocol, UpstreamTarget};
use crate::route::Pattern;

use super::Validator;

impl Validator<'_> {
    /// Every route, and the `listen` addresses of those with their own
    /// listener (by key).
    pub(super) fn routes(
        &mut self,
        raw: Vec<RawRoute>,
        declared: &[String],
        dpop: &[String],
        connect_allow: &[String],
    ) -> (Vec<Route>, Vec<(String, SocketAddr)>) {
        let mut routes = Vec::new();
        let mut hosts: HashMap<String, usize> = HashMap::new();
        let mut route_listens = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let profile_known = r.profile.as_ref().is_some_and(|p| declared.contains(p));
            let is_dpop = r.profile.as_ref().is_some_and(|p| dpop.contains(p));
            if let Some(route) = self.route(i, r, profile_known, is_dpop) {
                if route.allow_connect {
                    self.allow_connect(i, &route.host, connect_allow);
                }
                let key = route.host.to_string();
                if let Some(first) = hosts.insert(key.clone(), i) {
                    self.problem(
                        format!("routes[{i}].host"),
                        format!("{key:?} is already the host of routes[{first}]"),
                    );
                }
                if let Some(addr) = route.listen {
                    route_listens.push((format!("routes[{i}].listen"), addr));
                }
                routes.push(route);
            }
        }
        (routes, route_listens)
    }

    fn route(&mut self, i: usize, r: RawRoute, profile_known: bool, dpop: bool) -> Option<Route> {
        let key = |k: &str| format!("routes[{i}].{k}");
        let host = match r.host.as_deref() {
            None => {
                self.problem(key("host"), "missing");
                None
            }
            Some(h) => Pattern::parse(h)
                .map_err(|e| self.problem(key("host"), e))
                .ok(),
        };
        let profile = match r.profile {
            None => {
                self.problem(key("profile"), "missing");
                None
            }
            Some(p) if !profile_known => {
                self.problem(
                    key("profile"),
                    format!("no profile named {p:?} (profiles.{p})"),
                );
                None
            }
            Some(p) => Some(p),
        };
        let upstream = match (&r.upstream, &host) {
            (Some(u), _) => self.upstream_url(&key("upstream"), u),
            (None, Some(h)) if h.is_wildcard() => Some(UpstreamTarget::SameHost),
            (None, Some(h)) => self.upstream_url(&key("host"), &format!("https://{h}")),
            (None, None) => None,
        };
        let listen = r
            .listen
            .as_deref()
            .map(|l| self.addr(&key("listen"), Some(l), "127.0.0.1:0"));
        if matches!(upstream, Some(UpstreamTarget::SameHost))
            && host.as_ref().is_some_and(|h| h.port().is_some())
        {
            // The upstream would be the request host on 443, not the port the
            // pattern names: say where to go instead of guessing.
            self.problem(
                key("upstream"),
                "a wildcard route with a port needs an explicit upstream",
            );
        }
        if listen.is_some() && matches!(upstream, Some(UpstreamTarget::SameHost)) {
            // On its own port the app's Host header would pick the upstream,
            // and the token could go anywhere.
            self.problem(
                key("upstream"),
                "a wildcard route with its own listen port needs an explicit upstream",
            );
        }
        let protocol = match r.upstream_protocol.as_deref().unwrap_or("auto") {
            "auto" => UpstreamProtocol::Auto,
            "http1" => UpstreamProtocol::Http1,
            "http2" => UpstreamProtocol::Http2,
            other => {
                self.one_of(
                    &key("upstream_protocol"),
                    other,
                    &["auto", "http1", "http2"],
                );
                UpstreamProtocol::Auto
            }
        };
        let client_cert = self.client_cert(
            &format!("routes[{i}]"),
            r.client_cert_file.as_deref(),
            r.client_key_file.as_deref(),
        );
        let ca_file = self.ca_file(&key("ca_file"), r.ca_file.as_deref());
        let header = self.credential_header(&key("header"), r.header.as_deref());
        if dpop {
            // RFC 9449 §7.1: the token and its proof go together, in
            // `Authorization: DPoP` and `DPoP`.
            if header
                .as_ref()
                .is_some_and(|h| *h != http::header::AUTHORIZATION)
            {
                self.problem(
                    key("header"),
                    "a DPoP profile's token goes in Authorization (RFC 9449 §7.1)",
                );
            }
            if r.prefix.as_deref().is_some_and(|p| p != "DPoP ") {
                self.problem(
                    key("prefix"),
                    "a DPoP profile's token goes after \"DPoP \" (RFC 9449 §7.1)",
                );
            }
        }
        let default_prefix = if dpop { "DPoP " } else { "Bearer " };
        let prefix = r.prefix.unwrap_or_else(|| default_prefix.to_owned());
        if prefix.starts_with([' ', '\t']) || !prefix.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            self.problem(
                key("prefix"),
                "must be printable ASCII and must not start with a space",
            );
        }
        let host = host?;
        Some(Route {
            label: r.host.unwrap_or_default(),
            host,
            upstream: upstream?,
            profile: profile?,
            listen,
            ca_file,
            client_cert: client_cert.ok()?,
            protocol,
            allow_connect: r.allow_connect.unwrap_or(false),
            header: header?,
            prefix,
        })
    }

    /// A route's `header`: a valid name that is not part of the message's
    /// framing or routing, which the proxy sets itself.
    fn credential_header(&mut self, key: &str, name: Option<&str>) -> Option<HeaderName> {
        let Some(name) = name else {
            return Some(http::header::AUTHORIZATION);
        };
        let Ok(parsed) = HeaderName::try_from(name.to_ascii_lowercase()) else {
            self.problem(key, format!("{name:?} is not a valid header name"));
            return None;
        };
        const RESERVED: [&str; 11] = [
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "upgrade",
            "te",
            "trailer",
            "proxy-authorization",
            "proxy-connection",
            "content-type",
        ];
        if RESERVED.contains(&parsed.as_str()) {
            self.problem(key, format!("{name:?} cannot carry a credential"));
            return None;
        }
        Some(parsed)
    }

    /// A `client_cert_file` and `client_key_file` (of a route, or of
    /// `[cache]`: `section`): both or neither, readable, and a key that fits
    /// the certificate. `Err` when a problem was reported.
    pub(super) fn client_cert(
        &mut self,
        section: &str,
        cert: Option<&str>,
        key_file: Option<&str>,
    ) -> Result<Option<ClientCert>, ()> {
        let key = |k: &str| format!("{section}.{k}");
        let missing = if section == "cache" {
            "missing; mutual TLS to Redis needs client_cert_file and client_key_file"
        } else {
            "missing; mutual TLS to the upstream needs client_cert_file and client_key_file"
        };
        match (cert, key_file) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) => {
                let (cert_file, key_file) = (self.path(c), self.path(k));
                match crate::tls::load_identity(&cert_file, &key_file) {
                    Ok(_) => Ok(Some(ClientCert {
                        cert_file,
                        key_file,
                    })),
                    Err(e) => {
                        let name = if e.is_about_key(&key_file) {
                            "client_key_file"
                        } else {
                            "client_cert_file"
                        };
                        self.problem(key(name), e.to_string());
                        Err(())
                    }
                }
            }
            (Some(_), None) => {
                self.problem(key("client_key_file"), missing);
                Err(())
            }
            (None, Some(_)) => {
                self.problem(key("client_cert_file"), missing);
                Err(())
            }
        }
    }

    /// `allow_connect` on a route whose host no `proxy.connect_allow` entry
    /// covers would do nothing: say so rather than let it look effective.
    fn allow_connect(&mut self, i: usize, host: &Pattern, connect_allow: &[String]) {
        let covered = connect_allow
            .iter()
            .filter_map(|e| Pattern::parse(e).ok())
            .any(|a| hosts_overlap(host, &a));
        if !covered {
            let bare = bare_host(host);
            let example = if host.is_wildcard() {
                format!("*.{}:443", bare.1)
            } else {
                format!("{}:443", bare.1)
            };
            self.problem(
                format!("routes[{i}].allow_connect"),
                format!(
                    "has no effect: no proxy.connect_allow entry covers {host}; add e.g. {example:?} there"
                ),
            );
        }
    }

    fn upstream_url(&mut self, key: &str, u: &str) -> Option<UpstreamTarget> {
        let url = match url::Url::parse(u) {
            Ok(url) => url,
            Err(e) => {
                self.problem(key, format!("invalid URL {u:?}: {e}"));
                return None;
            }
        };
        if url.scheme() != "https" {
            self.problem(
                key,
                format!("{u:?} must be an https:// URL: tokens never travel in clear text"),
            );
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(key, "must not contain user information");
            return None;
        }
        if url.query().is_some() || url.fragment().is_some() {
            self.problem(key, "must not contain a query or fragment");
            return None;
        }
        let host = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let authority = match Authority::try_from(authority.as_str()) {
            Ok(a) => a,
            Err(e) => {
                self.problem(key, format!("invalid authority {authority:?}: {e}"));
                return None;
            }
        };
        let base_path = url.path().trim_end_matches('/').to_owned();
        Some(UpstreamTarget::Fixed {
            authority,
            base_path,
        })
    }
}

/// (wildcard, name) of a host pattern, without its port.
fn bare_host(p: &Pattern) -> (bool, String) {
    let text = p.to_string();
    let text = match p.port() {
        Some(port) => text
            .strip_suffix(&format!(":{port}"))
            .unwrap_or(&text)
            .to_owned(),
        None => text,
    };
    match text.strip_prefix("*.") {
        Some(name) => (true, name.to_owned()),
        None => (false, text),
    }
}

/// Whether some host matches both patterns, whatever the ports.
fn hosts_overlap(a: &Pattern, b: &Pattern) -> bool {
    let ((aw, an), (bw, bn)) = (bare_host(a), bare_host(b));
    let under = |name: &str, suffix: &str| {
        name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
    };
    match (aw, bw) {
        (false, false) => an == bn,
        (true, false) => under(&bn, &an),
        (false, true) => under(&an, &bn),
        (true, true) => an == bn || under(&an, &bn) || under(&bn, &an),
    }
}
