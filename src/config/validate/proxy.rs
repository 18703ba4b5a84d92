//! `[proxy]` and `[admin]`: the listeners and the client-side limits.

use crate::config::raw::{RawAdmin, RawProxy};
use crate::config::{Admin, Proxy, Unmatched};
use crate::route::Pattern;

use super::{MAX_HEADER_BYTES, MIN_HEADER_BYTES, Validator};

const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// hyper sizes its header array by `proxy.max_headers` for every request.
const MAX_HEADERS: usize = 1000;
const MAX_CONNECTIONS: usize = 1_000_000;

impl Validator<'_> {
    pub(super) fn proxy(&mut self, raw: RawProxy) -> Proxy {
        let proxy = Proxy {
            listen: self.addr("proxy.listen", raw.listen.as_deref(), "127.0.0.1:4180"),
            unmatched: match raw.unmatched.as_deref().unwrap_or("deny") {
                "deny" => Unmatched::Deny,
                "passthrough" => Unmatched::Passthrough,
                other => {
                    self.one_of("proxy.unmatched", other, &["deny", "passthrough"]);
                    Unmatched::Deny
                }
            },
            connect_allow: raw.connect_allow.unwrap_or_default(),
            drain_timeout: self.duration("proxy.drain_timeout", raw.drain_timeout, "20s"),
            header_read_timeout: self.duration(
                "proxy.header_read_timeout",
                raw.header_read_timeout,
                "10s",
            ),
            // Above the 90 s idle timeout of Go's and reqwest's pools, so
            // the app drops an idle connection before the proxy closes it.
            idle_timeout: self.duration("proxy.idle_timeout", raw.idle_timeout, "120s"),
            tunnel_idle_timeout: self.duration(
                "proxy.tunnel_idle_timeout",
                raw.tunnel_idle_timeout,
                "1h",
            ),
            // Above token wait + upstream.response_timeout at their defaults.
            request_timeout: self.duration("proxy.request_timeout", raw.request_timeout, "2m"),
            max_header_bytes: self.count(
                "proxy.max_header_bytes",
                raw.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
                MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
            ),
            max_headers: self.count("proxy.max_headers", raw.max_headers, 100, 1..=MAX_HEADERS),
            max_connections: self.count(
                "proxy.max_connections",
                raw.max_connections,
                4096,
                1..=MAX_CONNECTIONS,
            ),
        };
        for (key, d) in [
            ("proxy.header_read_timeout", proxy.header_read_timeout),
            ("proxy.idle_timeout", proxy.idle_timeout),
            ("proxy.tunnel_idle_timeout", proxy.tunnel_idle_timeout),
            ("proxy.request_timeout", proxy.request_timeout),
        ] {
            if d.is_zero() {
                self.problem(key, "must be greater than zero");
            }
        }
        for (i, entry) in proxy.connect_allow.iter().enumerate() {
            match Pattern::parse(entry) {
                Ok(p) if entry.rsplit_once(':').is_some() && !entry.ends_with(']') => drop(p),
                Ok(_) => self.problem(
                    format!("proxy.connect_allow[{i}]"),
                    format!("{entry:?} needs a port, e.g. \"{entry}:443\""),
                ),
                Err(e) => self.problem(format!("proxy.connect_allow[{i}]"), e),
            }
        }
        proxy
    }

    pub(super) fn admin(&mut self, raw: RawAdmin) -> Admin {
        let admin = Admin {
            listen: self.addr("admin.listen", raw.listen.as_deref(), "127.0.0.1:9090"),
            allow_remote: raw.allow_remote.unwrap_or(false),
        };
        if !admin.allow_remote && !admin.listen.ip().is_loopback() {
            self.problem(
                "admin.listen",
                format!(
                    "{} is not a loopback address; set admin.allow_remote = true to expose the admin endpoints",
                    admin.listen
                ),
            );
        }
        admin
    }
}
