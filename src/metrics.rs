//! Metrics in a registry of our own (never the process-global one), one
//! struct per subsystem. Label values come from the config (route hosts,
//! profile names) or from small fixed sets, never from what clients send.
//! The request path uses pre-resolved children: an atomic add, no lookup.

use std::sync::OnceLock;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Request durations: a proxy hop is sub-millisecond, so from 100 µs.
const REQUEST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];
/// Token fetches cross the network to an authorization server: from 10 ms.
const FETCH_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Everything `/metrics` shows.
pub struct Metrics {
    registry: Registry,
    pub tokens: TokenMetrics,
    pub proxy: ProxyMetrics,
    pub cache: CacheMetrics,
    pub config_reloads: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let tokens = TokenMetrics::register(&registry);
        let proxy = ProxyMetrics::register(&registry);
        let cache = CacheMetrics::register(&registry);
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "token_injector_config_reloads_total",
                "Configuration reloads, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(config_reloads.clone()))
            .expect("unique metric");
        for result in ["success", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        let build = IntGaugeVec::new(
            Opts::new("token_injector_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build)).expect("unique metric");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Self {
            registry,
            tokens,
            proxy,
            cache,
            config_reloads,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding our own well-formed families cannot fail.
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    v
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let v = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(v.clone()))
        .expect("unique metric");
    v
}

/// Removes every series of `vec` whose label `name` has `value`, whatever
/// its other labels (reasons, codes, kinds seen at run time).
fn remove_series_with(vec: &IntCounterVec, name: &str, value: &str) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get(name) == Some(&value) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// Redis operations are bounded by `cache.operation_timeout` (250 ms by
/// default): from 100 µs on loopback to a few seconds.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The shared token cache (`[cache]`, Redis). Series appear once a profile
/// shares; `token_injector_shared_cache_up` once `[cache]` is configured.
#[derive(Clone)]
pub struct CacheMetrics {
    registry: Registry,
    reads: IntCounterVec,
    fallbacks: IntCounterVec,
    leases: IntCounterVec,
    errors: IntCounterVec,
    operations: HistogramVec,
    up: IntGauge,
    up_registered: std::sync::Arc<std::sync::Mutex<bool>>,
}

impl CacheMetrics {
    fn register(r: &Registry) -> Self {
        Self {
            registry: r.clone(),
            reads: counter_vec(
                r,
                "token_injector_shared_cache_reads_total",
                "Reads of a profile's shared cache entry, by result (hit, miss, stale, undecryptable, error).",
                &["profile", "result"],
            ),
            fallbacks: counter_vec(
                r,
                "token_injector_shared_cache_fallbacks_total",
                "Token fetches made alone because the shared cache (Redis) could not be used.",
                &["profile"],
            ),
            leases: counter_vec(
                r,
                "token_injector_shared_cache_leases_total",
                "Renewal leases, by outcome: won (this replica fetched), waited (another replica's token was adopted), taken_over (the holder's lease expired).",
                &["profile", "outcome"],
            ),
            errors: counter_vec(
                r,
                "token_injector_shared_cache_errors_total",
                "Failed Redis operations, by kind (timeout, connect, auth, readonly, response, other).",
                &["kind"],
            ),
            operations: histogram_vec(
                r,
                "token_injector_shared_cache_operation_duration_seconds",
                "Duration of Redis operations, by operation (get, set, lease, release, delete, ping, probe), failed ones included.",
                &["op"],
                REDIS_BUCKETS,
            ),
            up: IntGauge::new(
                "token_injector_shared_cache_up",
                "1 while the last Redis operation succeeded, 0 while sharing is degraded and replicas fetch alone.",
            )
            .expect("valid metric"),
            up_registered: Default::default(),
        }
    }

    /// Sets `token_injector_shared_cache_up`, registering it the first time.
    pub fn set_up(&self, up: bool) {
        if let Ok(mut registered) = self.up_registered.lock()
            && !*registered
        {
            *registered = self.registry.register(Box::new(self.up.clone())).is_ok();
        }
        self.up.set(i64::from(up));
    }

    /// Removes `token_injector_shared_cache_up`: `[cache]` was removed by a
    /// reload, and a last 0 must not keep the degraded alert firing.
    pub fn clear_up(&self) {
        if let Ok(mut registered) = self.up_registered.lock()
            && *registered
        {
            let _ = self.registry.unregister(Box::new(self.up.clone()));
            *registered = false;
        }
    }

    pub fn read(&self, profile: &str, result: &str) {
        self.reads.with_label_values(&[profile, result]).inc();
    }

    pub fn fallback(&self, profile: &str) {
        self.fallbacks.with_label_values(&[profile]).inc();
    }

    pub fn lease(&self, profile: &str, outcome: &str) {
        self.leases.with_label_values(&[profile, outcome]).inc();
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    pub fn operation(&self, op: &str, seconds: f64) {
        self.operations.with_label_values(&[op]).observe(seconds);
    }

    /// Drops the series of a profile removed by a reload.
    pub fn forget(&self, profile: &str) {
        let _ = self.fallbacks.remove_label_values(&[profile]);
        remove_series_with(&self.reads, "profile", profile);
        remove_series_with(&self.leases, "profile", profile);
    }
}

/// Token source metrics, labelled by profile.
pub struct TokenMetrics {
    fetch_total: IntCounterVec,
    fetch_duration: HistogramVec,
    expiry: GaugeVec,
    consecutive_failures: IntGaugeVec,
    fetch_errors: IntCounterVec,
    coalesced: IntCounterVec,
    dpop_proofs: IntCounterVec,
    dpop_nonce_retries: IntCounterVec,
    dpop_errors: IntCounterVec,
}

impl TokenMetrics {
    fn register(r: &Registry) -> Self {
        let expiry = GaugeVec::new(
            Opts::new(
                "token_injector_token_expiry_timestamp_seconds",
                "When the current token of a profile expires, in seconds since the epoch.",
            ),
            &["profile"],
        )
        .expect("valid metric");
        r.register(Box::new(expiry.clone())).expect("unique metric");
        let consecutive_failures = IntGaugeVec::new(
            Opts::new(
                "token_injector_token_fetch_consecutive_failures",
                "Token fetches that failed in a row, per profile; 0 after a success.",
            ),
            &["profile"],
        )
        .expect("valid metric");
        r.register(Box::new(consecutive_failures.clone()))
            .expect("unique metric");
        Self {
            fetch_total: counter_vec(
                r,
                "token_injector_token_fetch_total",
                "Token requests to the authorization server, by profile and result.",
                &["profile", "result"],
            ),
            fetch_duration: histogram_vec(
                r,
                "token_injector_token_fetch_duration_seconds",
                "Duration of token requests, by profile.",
                &["profile"],
                FETCH_BUCKETS,
            ),
            expiry,
            consecutive_failures,
            fetch_errors: counter_vec(
                r,
                "token_injector_token_fetch_errors_total",
                "Failed token requests, by profile and reason (OAuth error code, timeout, connect, invalid_response, ...).",
                &["profile", "reason"],
            ),
            coalesced: counter_vec(
                r,
                "token_injector_token_requests_coalesced_total",
                "Requests that waited for a token fetch already in flight instead of starting one.",
                &["profile"],
            ),
            dpop_proofs: counter_vec(
                r,
                "token_injector_dpop_proofs_total",
                "DPoP proofs signed, by profile (token requests and proxied requests).",
                &["profile"],
            ),
            dpop_nonce_retries: counter_vec(
                r,
                "token_injector_dpop_nonce_retries_total",
                "Requests sent again with a new DPoP proof after a server asked for a nonce (or refused a proof for our clock), by profile and side (token_endpoint, upstream).",
                &["profile", "side"],
            ),
            dpop_errors: counter_vec(
                r,
                "token_injector_dpop_errors_total",
                "DPoP proofs a server still refused (invalid_dpop_proof, use_dpop_nonce after the one retry) or that could not be signed (signing), by profile.",
                &["profile", "reason"],
            ),
        }
    }

    /// The DPoP counters of one profile, resolved once (a DPoP profile's
    /// series appear when it starts).
    pub fn dpop(&self, profile: &str) -> DpopMetrics {
        DpopMetrics {
            name: profile.into(),
            proofs: self.dpop_proofs.with_label_values(&[profile]),
            nonce_token_endpoint: self
                .dpop_nonce_retries
                .with_label_values(&[profile, "token_endpoint"]),
            nonce_upstream: self
                .dpop_nonce_retries
                .with_label_values(&[profile, "upstream"]),
            errors: self.dpop_errors.clone(),
        }
    }

    /// The children of one profile, resolved once.
    pub fn profile(&self, profile: &str) -> ProfileMetrics {
        let p = &[profile];
        ProfileMetrics {
            name: profile.to_owned(),
            success: self.fetch_total.with_label_values(&[profile, "success"]),
            error: self.fetch_total.with_label_values(&[profile, "error"]),
            duration: self.fetch_duration.with_label_values(p),
            expiry: self.expiry.with_label_values(p),
            consecutive_failures: self.consecutive_failures.with_label_values(p),
            fetch_errors: self.fetch_errors.clone(),
            coalesced: self.coalesced.with_label_values(p),
        }
    }

    /// Drops the series of a profile removed by a reload.
    pub fn forget(&self, profile: &str) {
        let _ = self.fetch_total.remove_label_values(&[profile, "success"]);
        let _ = self.fetch_total.remove_label_values(&[profile, "error"]);
        let _ = self.fetch_duration.remove_label_values(&[profile]);
        let _ = self.expiry.remove_label_values(&[profile]);
        let _ = self.consecutive_failures.remove_label_values(&[profile]);
        let _ = self.coalesced.remove_label_values(&[profile]);
        remove_series_with(&self.fetch_errors, "profile", profile);
        let _ = self.dpop_proofs.remove_label_values(&[profile]);
        remove_series_with(&self.dpop_nonce_retries, "profile", profile);
        remove_series_with(&self.dpop_errors, "profile", profile);
    }
}

/// One DPoP profile's counters.
#[derive(Clone)]
pub struct DpopMetrics {
    name: std::sync::Arc<str>,
    pub proofs: IntCounter,
    pub nonce_token_endpoint: IntCounter,
    pub nonce_upstream: IntCounter,
    errors: IntCounterVec,
}

impl std::fmt::Debug for DpopMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopMetrics")
            .field("profile", &self.name)
            .finish()
    }
}

impl DpopMetrics {
    /// A proof a server still refused, or one that could not be signed.
    pub fn error(&self, reason: &str) {
        self.errors.with_label_values(&[&*self.name, reason]).inc();
    }

    /// Counters registered nowhere (tests, tools).
    pub fn detached() -> Self {
        TokenMetrics::register(&Registry::new()).dpop("-")
    }
}

/// One profile's token metrics.
#[derive(Clone)]
pub struct ProfileMetrics {
    name: String,
    success: IntCounter,
    error: IntCounter,
    duration: Histogram,
    expiry: Gauge,
    consecutive_failures: IntGauge,
    fetch_errors: IntCounterVec,
    pub coalesced: IntCounter,
}

impl ProfileMetrics {
    pub fn fetched(&self, seconds: f64, expires_unix: f64) {
        self.success.inc();
        self.duration.observe(seconds);
        self.expiry.set(expires_unix);
        self.consecutive_failures.set(0);
    }

    /// A token adopted from the shared cache: not a request to the
    /// authorization server, so only the expiry and failure gauges move.
    pub fn adopted(&self, expires_unix: f64) {
        self.expiry.set(expires_unix);
        self.consecutive_failures.set(0);
    }

    pub fn failed(&self, seconds: f64, reason: &str, consecutive: u32) {
        self.error.inc();
        self.duration.observe(seconds);
        self.consecutive_failures.set(i64::from(consecutive));
        self.fetch_errors
            .with_label_values(&[self.name.as_str(), reason])
            .inc();
    }
}

/// Status codes with a pre-resolved counter per route; others take the
/// labelled lookup.
const COMMON_CODES: [u16; 16] = [
    200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 429, 500, 502, 503, 504,
];

/// Request path metrics, labelled by route host.
pub struct ProxyMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    unauthorized_retries: IntCounterVec,
    upstream_errors: IntCounterVec,
    pub open_connections: IntGauge,
    /// Client connections closed at accept because `proxy.max_connections`
    /// were open.
    pub refused_connections: IntCounter,
    pub tunnels: TunnelMetrics,
}

impl ProxyMetrics {
    fn register(r: &Registry) -> Self {
        let open_connections = IntGauge::new(
            "token_injector_client_connections_open",
            "Client connections currently open on the proxy listeners.",
        )
        .expect("valid metric");
        r.register(Box::new(open_connections.clone()))
            .expect("unique metric");
        let refused_connections = IntCounter::new(
            "token_injector_client_connections_refused_total",
            "Client connections closed on accept because proxy.max_connections were open.",
        )
        .expect("valid metric");
        r.register(Box::new(refused_connections.clone()))
            .expect("unique metric");
        Self {
            requests: counter_vec(
                r,
                "token_injector_requests_total",
                "Requests answered, by route host and status code (route \"-\": no route).",
                &["route", "code"],
            ),
            duration: histogram_vec(
                r,
                "token_injector_request_duration_seconds",
                "Time to response headers, by route host.",
                &["route"],
                REQUEST_BUCKETS,
            ),
            unauthorized_retries: counter_vec(
                r,
                "token_injector_upstream_unauthorized_retries_total",
                "Requests retried with a fresh token after an upstream 401.",
                &["route"],
            ),
            upstream_errors: counter_vec(
                r,
                "token_injector_upstream_errors_total",
                "Upstream exchanges that failed, by route and kind (connect, timeout, protocol).",
                &["route", "kind"],
            ),
            open_connections,
            refused_connections,
            tunnels: TunnelMetrics::register(r),
        }
    }

    /// The children of one route; series appear on first use.
    pub fn route(&self, label: &str) -> RouteMetrics {
        RouteMetrics {
            label: label.to_owned(),
            requests: self.requests.clone(),
            by_code: Default::default(),
            duration: self.duration.with_label_values(&[label]),
            unauthorized_retries: self.unauthorized_retries.clone(),
            upstream_errors: self.upstream_errors.clone(),
        }
    }

    /// Drops the series of a route removed by a reload.
    pub fn forget(&self, label: &str) {
        let _ = self.duration.remove_label_values(&[label]);
        let _ = self.unauthorized_retries.remove_label_values(&[label]);
        // Every code, not only the common ones, and every error kind.
        remove_series_with(&self.requests, "route", label);
        remove_series_with(&self.upstream_errors, "route", label);
    }
}

/// One route's request metrics.
pub struct RouteMetrics {
    label: String,
    requests: IntCounterVec,
    by_code: [OnceLock<IntCounter>; COMMON_CODES.len()],
    duration: Histogram,
    unauthorized_retries: IntCounterVec,
    upstream_errors: IntCounterVec,
}

impl RouteMetrics {
    /// Counts one answered request. Common codes cost one atomic add.
    #[inline]
    pub fn observe(&self, code: u16, seconds: f64) {
        self.duration.observe(seconds);
        match COMMON_CODES.iter().position(|&c| c == code) {
            Some(i) => self.by_code[i]
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[self.label.as_str(), code_str(code)])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[self.label.as_str(), &code.to_string()])
                .inc(),
        }
    }

    pub fn unauthorized_retry(&self) {
        self.unauthorized_retries
            .with_label_values(&[self.label.as_str()])
            .inc();
    }

    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors
            .with_label_values(&[self.label.as_str(), kind])
            .inc();
    }
}

/// CONNECT tunnels and upgraded connections (WebSocket). Fixed label
/// values only: never the destination, which the client chooses.
#[derive(Clone)]
pub struct TunnelMetrics {
    /// CONNECT requests answered 200: the destination was allowed and reached.
    pub connect_allowed: IntCounter,
    /// CONNECT requests refused by policy (403 `no_route`) or malformed (400).
    pub connect_refused: IntCounter,
    /// Allowed CONNECT requests whose destination could not be reached.
    pub connect_failed: IntCounter,
    pub open_connect: IntGauge,
    pub open_upgrade: IntGauge,
}

impl TunnelMetrics {
    fn register(r: &Registry) -> Self {
        let connects = counter_vec(
            r,
            "token_injector_connect_tunnels_total",
            "CONNECT requests, by result (allowed, refused, failed).",
            &["result"],
        );
        let open = IntGaugeVec::new(
            Opts::new(
                "token_injector_tunnels_open",
                "Tunnels open now, by kind (connect, upgrade).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        r.register(Box::new(open.clone())).expect("unique metric");
        Self {
            connect_allowed: connects.with_label_values(&["allowed"]),
            connect_refused: connects.with_label_values(&["refused"]),
            connect_failed: connects.with_label_values(&["failed"]),
            open_connect: open.with_label_values(&["connect"]),
            open_upgrade: open.with_label_values(&["upgrade"]),
        }
    }

    /// Metrics in no registry, for a proxy built without [`Metrics`].
    pub fn detached() -> Self {
        let counter = || IntCounter::new("detached", "-").expect("valid metric");
        let gauge = || IntGauge::new("detached", "-").expect("valid metric");
        Self {
            connect_allowed: counter(),
            connect_refused: counter(),
            connect_failed: counter(),
            open_connect: gauge(),
            open_upgrade: gauge(),
        }
    }
}

fn code_str(code: u16) -> &'static str {
    match code {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        _ => "504",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_cache_up_appears_with_cache_and_goes_with_it() {
        let m = Metrics::new();
        assert!(!m.render().contains("token_injector_shared_cache_up"));
        m.cache.set_up(false);
        assert!(m.render().contains("token_injector_shared_cache_up 0"));
        m.cache.clear_up();
        assert!(!m.render().contains("token_injector_shared_cache_up"));
        m.cache.set_up(true);
        assert!(m.render().contains("token_injector_shared_cache_up 1"));
    }

    #[test]
    fn spec_metrics_are_exposed_with_bounded_labels() {
        let m = Metrics::new();
        let p = m.tokens.profile("billing");
        p.fetched(0.02, 1.8e9);
        p.failed(0.5, "invalid_client", 1);
        let r = m.proxy.route("api.example.com");
        r.observe(200, 0.0003);
        r.observe(418, 0.001);
        r.unauthorized_retry();
        m.config_reloads.with_label_values(&["success"]).inc();
        let text = m.render();
        for want in [
            "token_injector_token_fetch_total{profile=\"billing\",result=\"success\"} 1",
            "token_injector_token_fetch_total{profile=\"billing\",result=\"error\"} 1",
            "token_injector_token_fetch_duration_seconds_bucket{profile=\"billing\",le=\"0.01\"} 0",
            "token_injector_token_expiry_timestamp_seconds{profile=\"billing\"} 1800000000",
            "token_injector_token_fetch_consecutive_failures{profile=\"billing\"} 1",
            "token_injector_token_fetch_errors_total{profile=\"billing\",reason=\"invalid_client\"} 1",
            "token_injector_requests_total{code=\"200\",route=\"api.example.com\"} 1",
            "token_injector_requests_total{code=\"418\",route=\"api.example.com\"} 1",
            "token_injector_request_duration_seconds_bucket{route=\"api.example.com\",le=\"0.0001\"} 0",
            "token_injector_upstream_unauthorized_retries_total{route=\"api.example.com\"} 1",
            "token_injector_config_reloads_total{result=\"success\"} 1",
            "token_injector_config_reloads_total{result=\"error\"} 0",
            "token_injector_build_info{version=",
            "token_injector_client_connections_open 0",
            "token_injector_connect_tunnels_total{result=\"allowed\"} 0",
            "token_injector_connect_tunnels_total{result=\"refused\"} 0",
            "token_injector_connect_tunnels_total{result=\"failed\"} 0",
            "token_injector_tunnels_open{kind=\"connect\"} 0",
            "token_injector_tunnels_open{kind=\"upgrade\"} 0",
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
    }

    #[test]
    fn forget_drops_every_series_of_a_route_or_profile() {
        let m = Metrics::new();
        let p = m.tokens.profile("gone");
        p.failed(0.1, "connect", 1);
        m.tokens.profile("kept").failed(0.1, "connect", 1);
        let r = m.proxy.route("gone.test");
        r.observe(418, 0.001);
        r.observe(200, 0.001);
        r.upstream_error("connect");
        m.proxy.route("kept.test").upstream_error("connect");
        m.tokens.forget("gone");
        m.proxy.forget("gone.test");
        let text = m.render();
        assert!(!text.contains("gone"), "{text}");
        assert!(text.contains("profile=\"kept\""), "{text}");
        assert!(text.contains("route=\"kept.test\""), "{text}");
    }

    #[test]
    fn code_str_matches_common_codes() {
        for c in COMMON_CODES {
            assert_eq!(code_str(c), c.to_string());
        }
    }
}
