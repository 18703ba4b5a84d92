//! `[upstream]`: timeouts and buffers of the connections to upstreams.

use crate::config::Upstream;
use crate::config::raw::RawUpstream;

use super::{MAX_HEADER_BYTES, MIN_HEADER_BYTES, Validator};

/// `upstream.max_header_bytes`: haproxy's default buffer; hyper's own
/// default (~400 KiB) let each pooled connection's read buffer grow to that
/// size under large bodies (60-73 MiB at 128 connections with 64 KiB bodies).
const DEFAULT_UPSTREAM_HEADER_BYTES: usize = 16 * 1024;

/// `upstream.read_buffer_bytes`: a 64 KiB body and its head arrive in one
/// or two reads, so they reach the app in one or two writes (32 KiB: three,
/// for 7 % more CPU per 64 KiB response and 6-9 MiB less peak RSS at 128
/// connections; docs/src/benchmarks.md).
const DEFAULT_READ_BUFFER_BYTES: usize = 68 * 1024;

impl Validator<'_> {
    pub(super) fn upstream(&mut self, u: RawUpstream) -> Upstream {
        let upstream = Upstream {
            connect_timeout: self.duration("upstream.connect_timeout", u.connect_timeout, "5s"),
            tls_timeout: self.duration("upstream.tls_timeout", u.tls_timeout, "10s"),
            response_timeout: self.duration("upstream.response_timeout", u.response_timeout, "60s"),
            pool_idle_timeout: self.duration(
                "upstream.pool_idle_timeout",
                u.pool_idle_timeout,
                "90s",
            ),
            body_idle_timeout: self.duration(
                "upstream.body_idle_timeout",
                u.body_idle_timeout,
                "5m",
            ),
            replay_buffer: u
                .replay_buffer
                .unwrap_or(64 * 1024)
                .try_into()
                .unwrap_or(usize::MAX),
            max_header_bytes: self.count(
                "upstream.max_header_bytes",
                u.max_header_bytes,
                DEFAULT_UPSTREAM_HEADER_BYTES,
                MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
            ),
            read_buffer_bytes: self.count(
                "upstream.read_buffer_bytes",
                u.read_buffer_bytes,
                DEFAULT_READ_BUFFER_BYTES,
                MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
            ),
        };
        for (key, d) in [
            ("upstream.connect_timeout", upstream.connect_timeout),
            ("upstream.tls_timeout", upstream.tls_timeout),
            ("upstream.response_timeout", upstream.response_timeout),
            ("upstream.body_idle_timeout", upstream.body_idle_timeout),
        ] {
            if d.is_zero() {
                self.problem(key, "must be greater than zero");
            }
        }
        upstream
    }
}
