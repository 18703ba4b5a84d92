//! Byte tunnels: CONNECT to destinations `proxy.connect_allow` lists, and
//! protocol upgrades (WebSocket) on routed requests.
//!
//! A CONNECT tunnel carries the app's own TLS: the proxy cannot see inside,
//! so it adds no token. It is therefore refused unless the operator listed
//! the destination, and refused for a host that has a route (the app would
//! silently skip token injection) unless that route sets `allow_connect`.
//!
//! An upgrade is an ordinary routed request up to the upstream's `101`: the
//! token is set on it like on any other. After the `101` both sides are
//! spliced together and bytes flow untouched.
//!
//! Tunnels outlive the HTTP exchange that opened them, so they get a
//! [`Scope`] from the listener: the shutdown signal, the drain bound, and a
//! hold that keeps the client connection counted while the tunnel lives.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::error::{Error, Kind};
use super::{Body, Entry, headers};
use crate::config::Config;
use crate::metrics::TunnelMetrics;
use crate::route::{self, Pattern, Table};

/// What a listener lends the tunnels opened on one of its connections.
#[derive(Clone)]
pub struct Scope {
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    /// `proxy.tunnel_idle_timeout`.
    idle: Duration,
    /// Keeps the client connection counted (and its listener's drain
    /// waiting) until the tunnel ends.
    _hold: Arc<dyn Send + Sync>,
    /// Keeps the connection busy (no idle or header timer) while the
    /// tunnel lives: an HTTP/2 CONNECT stream shares its connection.
    _busy: Option<Arc<dyn Send + Sync>>,
}

impl Scope {
    pub fn new(
        shutdown: watch::Receiver<bool>,
        drain: Duration,
        hold: Arc<dyn Send + Sync>,
        idle: Duration,
    ) -> Self {
        Self {
            shutdown,
            drain,
            idle,
            _hold: hold,
            _busy: None,
        }
    }

    /// This scope for one request, holding `busy` as long as it lives.
    pub fn with_busy(&self, busy: impl Send + Sync + 'static) -> Self {
        Self {
            _busy: Some(Arc::new(busy)),
            ..self.clone()
        }
    }

    /// Resolves `drain` after the listener is told to stop.
    async fn cut(&mut self) {
        let _ = self.shutdown.wait_for(|stop| *stop).await;
        tokio::time::sleep(self.drain).await;
    }
}

/// The CONNECT policy of one config, and the tunnel metrics.
pub struct Tunnels {
    /// `proxy.connect_allow`; every entry has a port.
    allow: Table,
    /// Route hosts without their ports, by route index.
    route_hosts: Table,
    /// `allow_connect` by route index.
    route_allows: Vec<bool>,
    connect_timeout: Duration,
    metrics: TunnelMetrics,
}

impl Tunnels {
    pub fn new(config: &Config, metrics: TunnelMetrics) -> Self {
        // Validated when the config was loaded.
        let allow: Vec<Pattern> = config
            .proxy
            .connect_allow
            .iter()
            .filter_map(|e| Pattern::parse(e).ok())
            .collect();
        let hosts: Vec<Pattern> = config.routes.iter().map(|r| any_port(&r.host)).collect();
        Self {
            allow: Table::new(&allow),
            route_hosts: Table::new(&hosts),
            route_allows: config.routes.iter().map(|r| r.allow_connect).collect(),
            connect_timeout: config.upstream.connect_timeout,
            metrics,
        }
    }

    /// Refuses every CONNECT; metrics in no registry.
    pub fn deny_all() -> Self {
        Self {
            allow: Table::default(),
            route_hosts: Table::default(),
            route_allows: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            metrics: TunnelMetrics::detached(),
        }
    }

    /// Answers a CONNECT: 200 and a tunnel to an allowed destination, else
    /// the error. `routes` is the proxy's route table, to find a route for
    /// the destination's host and port.
    pub async fn connect(
        &self,
        entry: &Entry,
        routes: &Table,
        req: Request<Incoming>,
    ) -> Response<Body> {
        match self.open(entry, routes, req).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        }
    }

    async fn open(
        &self,
        entry: &Entry,
        routes: &Table,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Error> {
        let (host, port) = match self.check(entry, routes, req.uri()) {
            Ok(dest) => dest,
            Err(e) => {
                self.metrics.connect_refused.inc();
                return Err(e);
            }
        };
        let host = route::normalize(host).into_owned();
        // `[::1]` in the request; the socket wants the bare address.
        let dial = host.trim_start_matches('[').trim_end_matches(']');
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((dial, port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.connect_failed.inc();
                return Err(Error::new(
                    Kind::UpstreamUnreachable,
                    format!("cannot connect to {host}:{port}: {e}"),
                ));
            }
            Err(_) => {
                self.metrics.connect_failed.inc();
                return Err(Error::new(
                    Kind::UpstreamTimeout,
                    format!(
                        "connecting to {host}:{port} took longer than upstream.connect_timeout ({:?})",
                        self.connect_timeout
                    ),
                ));
            }
        };
        let _ = stream.set_nodelay(true);
        self.metrics.connect_allowed.inc();
        let client = hyper::upgrade::on(&mut req);
        let scope = req.extensions_mut().remove::<Scope>();
        drop(req);
        let gauge = self.metrics.open_connect.clone();
        tokio::spawn(async move {
            match client.await {
                Ok(client) => {
                    tracing::debug!(destination = %format_args!("{host}:{port}"), "CONNECT tunnel open");
                    splice(TokioIo::new(client), stream, scope, gauge, "CONNECT").await;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT tunnel: the client connection did not switch")
                }
            }
        });
        Ok(Response::new(Either::Right(Full::new(Bytes::new()))))
    }

    /// The destination of an allowed CONNECT, or why it is refused.
    fn check<'r>(
        &self,
        entry: &Entry,
        routes: &Table,
        target: &'r Uri,
    ) -> Result<(&'r str, u16), Error> {
        if let Entry::Dedicated(_) = entry {
            return Err(Error::new(
                Kind::NoRoute,
                "CONNECT is not served on a route's own listener",
            ));
        }
        let (host, port) = connect_target(target)?;
        if self.allow.lookup(host, port).is_none() {
            return Err(Error::new(
                Kind::NoRoute,
                format!(
                    "CONNECT to {host}:{port} is not allowed: token injection needs plain HTTP to the proxy \
                     (use http:// URLs; the proxy forwards them over TLS), and proxy.connect_allow does not list this destination"
                ),
            ));
        }
        // The route plain requests to this host:port would take decides;
        // else a route for the host on another port.
        let route = routes
            .lookup(host, port)
            .or_else(|| self.route_hosts.lookup(host, port));
        if let Some(i) = route
            && !self.route_allows.get(i).copied().unwrap_or(false)
        {
            return Err(Error::new(
                Kind::NoRoute,
                format!(
                    "CONNECT to {host}:{port} is not allowed: {host} has a route, and a tunnel would carry no token; \
                     send plain http:// requests to the proxy (or set allow_connect = true on the route)"
                ),
            ));
        }
        Ok((host, port))
    }

    pub fn metrics(&self) -> &TunnelMetrics {
        &self.metrics
    }
}

/// The `host:port` of a CONNECT request.
fn connect_target(target: &Uri) -> Result<(&str, u16), Error> {
    let authority = target.authority().ok_or_else(|| {
        Error::new(
            Kind::BadRequest,
            "a CONNECT request needs a host:port target",
        )
    })?;
    if authority.as_str().contains('@') {
        return Err(Error::new(
            Kind::BadRequest,
            "userinfo (user@) in the CONNECT target is not allowed",
        ));
    }
    let host = authority.host();
    if !route::valid_request_host(host) {
        return Err(Error::new(
            Kind::BadRequest,
            "invalid host in the CONNECT target",
        ));
    }
    let port = authority.port_u16().ok_or_else(|| {
        Error::new(
            Kind::BadRequest,
            "the CONNECT target needs a port (host:port)",
        )
    })?;
    Ok((host, port))
}

/// `pattern` without its port: matches the same hosts on every port.
fn any_port(pattern: &Pattern) -> Pattern {
    let text = pattern.to_string();
    let bare = match pattern.port() {
        Some(p) => text
            .strip_suffix(&format!(":{p}"))
            .unwrap_or(&text)
            .to_owned(),
        None => return pattern.clone(),
    };
    Pattern::parse(&bare).unwrap_or_else(|_| pattern.clone())
}

/// A request that asks to switch protocols (HTTP/1.1 `Upgrade`), taken
/// apart before it is forwarded.
pub struct Upgrade {
    protocol: HeaderValue,
    client: OnUpgrade,
    scope: Option<Scope>,
}

impl Upgrade {
    /// `Some` for an HTTP/1.1 request with `Connection: upgrade` and an
    /// `Upgrade` header (other than `h2c`, which never crosses TLS). HTTP/2
    /// has no such upgrade: those requests are ordinary.
    pub fn take(req: &mut Request<Incoming>) -> Option<Self> {
        let protocol = req.headers().get(header::UPGRADE)?;
        if req.version() != Version::HTTP_11
            || req.method() == Method::CONNECT
            || !connection_has(req.headers(), "upgrade")
            || protocol.as_bytes().eq_ignore_ascii_case(b"h2c")
        {
            return None;
        }
        let protocol = protocol.clone();
        Some(Self {
            protocol,
            client: hyper::upgrade::on(&mut *req),
            scope: req.extensions_mut().remove::<Scope>(),
        })
    }

    /// Puts the upgrade back on the outgoing headers, after hop-by-hop
    /// stripping removed it.
    pub fn restore(&self, headers: &mut http::HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// The upstream switched: answer 101 with its headers and splice the two
    /// connections once both have switched.
    pub fn switch(
        self,
        mut response: Response<super::pool::Body>,
        metrics: &TunnelMetrics,
    ) -> Response<Body> {
        let upstream = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(p) = protocol {
            parts.headers.insert(header::UPGRADE, p);
        }
        let gauge = metrics.open_upgrade.clone();
        let Upgrade { client, scope, .. } = self;
        tokio::spawn(async move {
            match tokio::try_join!(client, upstream) {
                Ok((client, upstream)) => {
                    splice(
                        TokioIo::new(client),
                        TokioIo::new(upstream),
                        scope,
                        gauge,
                        "upgrade",
                    )
                    .await
                }
                Err(e) => tracing::debug!(error = %e, "upgrade: a connection did not switch"),
            }
        });
        Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
    }
}

/// Whether a `Connection` header line lists `token`.
fn connection_has(headers: &http::HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|line| {
        line.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// Copies both ways until both sides are done, no byte has moved either
/// way for `proxy.tunnel_idle_timeout` (a peer that vanished without a FIN,
/// or a half-closed tunnel whose other side never ends, would otherwise hold
/// its task and connection slot until shutdown), or the listener's drain
/// bound has passed after a shutdown.
async fn splice<A, B>(client: A, other: B, scope: Option<Scope>, open: IntGauge, what: &'static str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    open.inc();
    let _open = GaugeGuard(open);
    let last = Arc::new(LastActive::new());
    let mut client = Watched {
        inner: client,
        last: Arc::clone(&last),
    };
    let mut other = Watched {
        inner: other,
        last: Arc::clone(&last),
    };
    let idle = scope.as_ref().map(|s| s.idle);
    let mut scope = scope;
    let cut = async {
        match &mut scope {
            Some(s) => s.cut().await,
            None => std::future::pending().await,
        }
    };
    let idle_out = async {
        match idle {
            Some(idle) => last.idle_out(idle).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut other) => match copied {
            Ok((up, down)) => tracing::debug!(tunnel = what, bytes_up = up, bytes_down = down, "tunnel closed"),
            Err(e) => tracing::debug!(tunnel = what, error = %e, "tunnel ended with an error"),
        },
        _ = cut => tracing::debug!(tunnel = what, "closing tunnel: shutdown drain bound reached"),
        _ = idle_out => tracing::debug!(tunnel = what, "closing tunnel: no bytes either way within proxy.tunnel_idle_timeout"),
    }
}

/// When a tunnel last moved a byte, in milliseconds since it opened.
struct LastActive {
    opened: tokio::time::Instant,
    at_ms: std::sync::atomic::AtomicU64,
}

impl LastActive {
    fn new() -> Self {
        Self {
            opened: tokio::time::Instant::now(),
            at_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.at_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `idle`.
    async fn idle_out(&self, idle: Duration) {
        loop {
            let at = Duration::from_millis(self.at_ms.load(std::sync::atomic::Ordering::Relaxed));
            let deadline = self.opened + at + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One side of a tunnel, noting each byte moved in [`LastActive`].
struct Watched<T> {
    inner: T,
    last: Arc<LastActive>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct GaugeGuard(IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnels(allow: &[&str], routes: &[(&str, bool)]) -> (Tunnels, Table) {
        let patterns: Vec<Pattern> = routes
            .iter()
            .map(|(h, _)| Pattern::parse(h).unwrap())
            .collect();
        let allow: Vec<Pattern> = allow.iter().map(|a| Pattern::parse(a).unwrap()).collect();
        let t = Tunnels {
            allow: Table::new(&allow),
            route_hosts: Table::new(&patterns.iter().map(any_port).collect::<Vec<_>>()),
            route_allows: routes.iter().map(|(_, a)| *a).collect(),
            connect_timeout: Duration::from_secs(1),
            metrics: TunnelMetrics::detached(),
        };
        (t, Table::new(&patterns))
    }

    /// The error kind of a CONNECT to `target`, or None when allowed.
    fn verdict(t: &(Tunnels, Table), entry: &Entry, target: &str) -> Option<Kind> {
        let uri: Uri = target.parse().unwrap();
        t.0.check(entry, &t.1, &uri).err().map(|e| e.kind)
    }

    #[test]
    fn connect_policy() {
        let t = tunnels(
            &[
                "db.test:5432",
                "*.svc.test:443",
                "routed.test:443",
                "open.test:443",
                "[::1]:8443",
            ],
            &[
                ("routed.test", false),
                ("open.test", true),
                ("other.svc.test:8080", false),
            ],
        );
        let fwd = Entry::Forward;
        let no = Some(Kind::NoRoute);
        let bad = Some(Kind::BadRequest);
        let cases: &[(&str, Option<Kind>)] = &[
            // Listed, exact: any case, a trailing dot.
            ("db.test:5432", None),
            ("DB.Test.:5432", None),
            ("db.test:5433", no),
            ("xdb.test:5432", no),
            // Wildcards: subdomains at any depth, never the bare suffix.
            ("a.svc.test:443", None),
            ("a.b.svc.test:443", None),
            ("svc.test:443", no),
            ("a.svc.test:80", no),
            ("[::1]:8443", None),
            // Not listed at all.
            ("elsewhere.test:443", no),
            // A host with a route: refused unless the route allows it; a
            // route for the host on another port counts too.
            ("routed.test:443", no),
            ("open.test:443", None),
            ("other.svc.test:443", no),
            // Malformed targets.
            ("db.test", bad),
            ("user@db.test:5432", bad),
        ];
        for (target, want) in cases {
            assert_eq!(verdict(&t, &fwd, target), *want, "{target}");
        }
        let dedicated = Entry::Dedicated(Arc::from("open.test"));
        assert_eq!(verdict(&t, &dedicated, "open.test:443"), no);
        let none = (Tunnels::deny_all(), Table::default());
        assert_eq!(verdict(&none, &fwd, "db.test:5432"), no);
    }

    #[test]
    fn refusals_explain_themselves() {
        let t = tunnels(&["routed.test:443"], &[("routed.test", false)]);
        let uri: Uri = "nope.test:443".parse().unwrap();
        let e = t.0.check(&Entry::Forward, &t.1, &uri).unwrap_err();
        assert!(
            e.message.contains("token injection needs plain HTTP"),
            "{}",
            e.message
        );
        assert!(e.message.contains("proxy.connect_allow"), "{}", e.message);
        let uri: Uri = "routed.test:443".parse().unwrap();
        let e = t.0.check(&Entry::Forward, &t.1, &uri).unwrap_err();
        assert!(e.message.contains("has a route"), "{}", e.message);
        assert!(e.message.contains("allow_connect"), "{}", e.message);
    }

    #[test]
    fn any_port_drops_only_the_port() {
        for (with, without) in [
            ("api.test:8443", "api.test"),
            ("*.example.com:443", "*.example.com"),
            ("[::1]:80", "[::1]"),
            ("plain.test", "plain.test"),
        ] {
            let p = Pattern::parse(with).unwrap();
            assert_eq!(any_port(&p).to_string(), without);
        }
    }

    #[test]
    fn connection_tokens_are_matched_case_insensitively() {
        let mut h = http::HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!connection_has(&h, "upgrade"));
        h.append(header::CONNECTION, HeaderValue::from_static("x, Upgrade"));
        assert!(connection_has(&h, "upgrade"));
    }
}
