//! The request path: resolve the route → read its token → rewrite headers →
//! forward over TLS → stream the answer back.
//!
//! Routing (which route, which profile) is decided before any rewriting;
//! the token is read lock-free from the profile's store; nothing here waits
//! on the network except the upstream itself, or the one shared token fetch
//! when a profile has no usable token at all.

pub mod authorize;
pub mod build;
pub mod dpop;
pub mod error;
pub mod headers;
pub mod pool;
pub mod tunnel;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Incoming};

use crate::config::{Unmatched, UpstreamTarget};
use crate::errors;
use crate::metrics::RouteMetrics;
use crate::route;
use crate::token::{self, store::Invalidated};

use authorize::{Authorize, Verdict};
pub use error::{ERROR_HEADER, Error, Kind};
use pool::Client;

/// A response body to the app: the upstream's stream, or bytes we hold.
pub type Body = Either<pool::Body, Full<Bytes>>;

/// A request body to an upstream: the app's stream, or bytes we hold.
pub type Outgoing = Either<Incoming, Full<Bytes>>;

/// Which listener a request came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The `HTTP_PROXY` listener: route by the request's target host.
    Forward,
    /// A route's dedicated listener, by the route's `host` value; resolved
    /// against the current config on each request, so reloads apply.
    Dedicated(Arc<str>),
}

/// Where a request was resolved to.
#[derive(Clone, Copy)]
enum Resolved {
    Route(usize),
    Passthrough,
}

/// One route, ready for the request path.
pub struct Route {
    pub label: String,
    target: Target,
    store: Arc<token::Store>,
    /// Attaches the store's credential to each request sent.
    authorize: Box<dyn Authorize>,
    client: Client,
    /// `client`'s pool of a fixed upstream, held so that requests look
    /// nothing up (`None`: same-host routes, by the request's host).
    host: Option<Arc<pool::Host>>,
    /// HTTP/1.1 only, for upgrades (there is no `Upgrade` in HTTP/2).
    upgrade_client: Client,
    /// Whether the proxy sets `Host` itself: only when `client` speaks
    /// HTTP/1.1 alone. A pool that may speak HTTP/2 adds `Host` on its
    /// HTTP/1 connections; over HTTP/2 the authority travels as
    /// `:authority` only (nginx refuses a `host` beside it as a duplicate).
    own_host: bool,
    metrics: RouteMetrics,
}

enum Target {
    Fixed {
        authority: Authority,
        host_header: HeaderValue,
        base_path: String,
    },
    SameHost,
}

impl Route {
    pub fn new(
        label: String,
        upstream: &UpstreamTarget,
        store: Arc<token::Store>,
        client: Client,
        metrics: RouteMetrics,
    ) -> Self {
        let target = match upstream {
            UpstreamTarget::Fixed {
                authority,
                base_path,
            } => Target::Fixed {
                authority: authority.clone(),
                host_header: HeaderValue::from_str(authority.as_str())
                    .expect("an authority is a valid header value"),
                base_path: base_path.clone(),
            },
            UpstreamTarget::SameHost => Target::SameHost,
        };
        let host = match &target {
            Target::Fixed { authority, .. } => Some(client.pin(&Scheme::HTTPS, authority)),
            Target::SameHost => None,
        };
        Self {
            label,
            target,
            store,
            authorize: Box::new(authorize::Header::bearer()),
            upgrade_client: client.clone(),
            client,
            host,
            own_host: true,
            metrics,
        }
    }

    /// How the credential is attached (default: `Authorization: Bearer`).
    pub fn with_authorize(mut self, authorize: impl Authorize) -> Self {
        self.authorize = Box::new(authorize);
        self
    }

    /// The protocol `client` was built for: who sets `Host`.
    pub fn with_protocol(mut self, protocol: crate::config::UpstreamProtocol) -> Self {
        self.own_host = protocol == crate::config::UpstreamProtocol::Http1;
        self
    }

    /// The client for upgrade requests, when the route's own pool may speak
    /// HTTP/2 (ALPN `auto` or `http2`).
    pub fn with_upgrade_client(mut self, client: Client) -> Self {
        self.upgrade_client = client;
        self
    }
}

/// Request-path settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub unmatched: Unmatched,
    pub response_timeout: Duration,
    /// How long a request may wait for a token fetch already under way.
    pub token_wait: Duration,
    pub replay_buffer: usize,
}

pub struct Proxy {
    routes: Vec<Route>,
    table: route::Table,
    /// Route index by `host` value, for dedicated listeners.
    dedicated: HashMap<Arc<str>, usize>,
    settings: Settings,
    passthrough: Client,
    /// Requests that matched no route (label "-").
    unrouted: RouteMetrics,
    /// CONNECT policy and tunnel metrics.
    tunnels: tunnel::Tunnels,
}

impl Proxy {
    pub fn new(
        routes: Vec<Route>,
        table: route::Table,
        settings: Settings,
        passthrough: Client,
        unrouted: RouteMetrics,
    ) -> Self {
        let dedicated = routes
            .iter()
            .enumerate()
            .map(|(i, r)| (Arc::from(r.label.as_str()), i))
            .collect();
        Self {
            routes,
            table,
            dedicated,
            settings,
            passthrough,
            unrouted,
            tunnels: tunnel::Tunnels::deny_all(),
        }
    }

    /// Opens a connection to each fixed upstream ahead of its first
    /// request, so that request pays no TCP and TLS handshake.
    pub fn preconnect(&self) {
        for r in &self.routes {
            if let Some(host) = &r.host {
                r.client.preconnect(host);
            }
        }
    }

    /// Sets the CONNECT policy (default: every CONNECT refused).
    pub fn with_tunnels(mut self, tunnels: tunnel::Tunnels) -> Self {
        self.tunnels = tunnels;
        self
    }

    /// Handles one request; every failure becomes a response here. The
    /// exchange after routing is bounded by `deadline` (`proxy.request_timeout`)
    /// up to the response head, and counted under its route either way.
    pub async fn handle(
        &self,
        entry: &Entry,
        req: Request<Incoming>,
        deadline: Duration,
    ) -> Response<Body> {
        let started = Instant::now();
        if req.method() == Method::CONNECT {
            let response =
                match tokio::time::timeout(deadline, self.tunnels.connect(entry, &self.table, req))
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Error::new(
                        Kind::UpstreamTimeout,
                        format!("no answer within proxy.request_timeout ({deadline:?})"),
                    )
                    .into_response(),
                };
            let status = response.status().as_u16();
            self.unrouted
                .observe(status, started.elapsed().as_secs_f64());
            tracing::debug!(route = "-", status, "CONNECT");
            return response;
        }
        let (route, response) = match self.resolve(entry, &req) {
            Err(e) => (None, e.into_response()),
            Ok(target) => {
                let route = match target {
                    Resolved::Route(i) => Some(i),
                    Resolved::Passthrough => None,
                };
                let until = Until {
                    at: tokio::time::Instant::now() + deadline,
                    after: deadline,
                };
                let exchange = match target {
                    Resolved::Route(i) => self.forward(&self.routes[i], req, until).await,
                    Resolved::Passthrough => self.passthrough(req, until).await,
                };
                let response = match exchange {
                    Ok(r) => r,
                    Err(e) => e.into_response(),
                };
                (route, response)
            }
        };
        let elapsed = started.elapsed();
        let status = response.status().as_u16();
        let route = route.map(|i| &self.routes[i]);
        route
            .map(|r| &r.metrics)
            .unwrap_or(&self.unrouted)
            .observe(status, elapsed.as_secs_f64());
        tracing::debug!(
            route = route.map(|r| r.label.as_str()).unwrap_or("-"),
            status,
            duration_us = elapsed.as_micros() as u64,
            "request"
        );
        response
    }

    /// Answers a request refused before routing (a bad head found by the
    /// connection), counted like any unrouted answer. The connection closes
    /// after it: what follows such a head cannot be trusted to be framed.
    pub fn refuse(&self, error: Error) -> Response<Body> {
        let mut response = error.into_response();
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        self.unrouted.observe(response.status().as_u16(), 0.0);
        tracing::debug!(
            status = response.status().as_u16(),
            "request refused before routing"
        );
        response
    }

    /// Where a request goes, decided before anything waits.
    fn resolve(&self, entry: &Entry, req: &Request<Incoming>) -> Result<Resolved, Error> {
        headers::check_framing(req.headers())?;
        match entry {
            Entry::Dedicated(label) => self
                .dedicated
                .get(label)
                .map(|&i| Resolved::Route(i))
                .ok_or_else(|| {
                    Error::new(
                        Kind::NoRoute,
                        "this listener's route was removed by a reload",
                    )
                }),
            Entry::Forward => {
                let (host, port) = target_host(req)?;
                match self.table.lookup(host, port) {
                    Some(i) => Ok(Resolved::Route(i)),
                    None if self.settings.unmatched == Unmatched::Passthrough => {
                        Ok(Resolved::Passthrough)
                    }
                    None => Err(Error::new(
                        Kind::NoRoute,
                        format!("no route for host {host:?}"),
                    )),
                }
            }
        }
    }

    async fn forward(
        &self,
        route: &Route,
        mut req: Request<Incoming>,
        until: Until,
    ) -> Result<Response<Body>, Error> {
        let upgrade = tunnel::Upgrade::take(&mut req);
        let response = self.exchange(route, req, upgrade.as_ref(), until).await?;
        Ok(match upgrade {
            Some(u) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                u.switch(response, self.tunnels.metrics())
            }
            _ => finish(response),
        })
    }

    /// The token on the request, the request upstream, the response head
    /// back (after one retry with a fresh token on a 401).
    async fn exchange(
        &self,
        route: &Route,
        req: Request<Incoming>,
        upgrade: Option<&tunnel::Upgrade>,
        until: Until,
    ) -> Result<Response<pool::Body>, Error> {
        let token = match route.store.current() {
            Some(t) => t,
            None => {
                until
                    .bound(async {
                        route
                            .store
                            .get(self.settings.token_wait)
                            .await
                            .map_err(|e| Error::new(Kind::TokenUnavailable, e.to_string()))
                    })
                    .await?
            }
        };
        let (mut parts, body) = req.into_parts();
        let (uri, host_header) = upstream_uri(&route.target, &parts.uri, &parts.headers)?;
        headers::strip_hop_by_hop(&mut parts.headers);
        if route.own_host || upgrade.is_some() {
            parts.headers.insert(header::HOST, host_header);
        } else {
            parts.headers.remove(header::HOST);
        }
        route
            .authorize
            .authorize(&token, &parts.method, &uri, &mut parts.headers);
        let client = match upgrade {
            Some(u) => {
                u.restore(&mut parts.headers);
                Via {
                    client: &route.upgrade_client,
                    host: None,
                    until,
                }
            }
            None => Via {
                client: &route.client,
                host: route.host.as_ref(),
                until,
            },
        };

        // Buffer small bodies so a 401 (or a stale pooled connection) can be
        // retried; stream the rest.
        let bytes = match until
            .bound(replayable(body, self.settings.replay_buffer))
            .await?
        {
            Replay::Stream(body) => {
                let request = outgoing(parts.method, uri, parts.headers, Either::Left(body));
                let response = self.send(client, request, Some(&route.metrics)).await?;
                // The body is gone: a proof refused for its nonce is not
                // sent again, but the next request carries the nonce.
                let verdict = route
                    .authorize
                    .observe(response.status(), response.headers());
                if !proof_refused(route, verdict) && refuses_token(&response) {
                    // The body is gone, so no retry (gRPC calls land here),
                    // but the next request must not carry the refused token.
                    // Rate-limited like the retry path's refetch.
                    let _ = route.store.invalidate(&token);
                }
                return Ok(response);
            }
            Replay::Buffered(bytes) => bytes,
        };
        let mut response = self
            .send_replayable(
                client,
                &parts.method,
                &uri,
                &parts.headers,
                &bytes,
                Some((&route.metrics, &*route.authorize, &token)),
            )
            .await?;
        let mut verdict = route
            .authorize
            .observe(response.status(), response.headers());
        if let Verdict::Resend(_) = verdict {
            // The upstream refused the proof, not the token, and said how
            // a new one can pass (a nonce, its clock): once more, same token.
            route.authorize.resending();
            route
                .authorize
                .authorize(&token, &parts.method, &uri, &mut parts.headers);
            drop(response);
            response = self
                .send_replayable(
                    client,
                    &parts.method,
                    &uri,
                    &parts.headers,
                    &bytes,
                    Some((&route.metrics, &*route.authorize, &token)),
                )
                .await?;
            verdict = route
                .authorize
                .observe(response.status(), response.headers());
        }
        if proof_refused(route, verdict) {
            // Never drop a token for its proof: a new token would not help.
            return Ok(response);
        }
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        // The upstream refused our token: drop it, get a fresh one, retry once.
        match route.store.invalidate(&token) {
            Invalidated::RateLimited => return Ok(response),
            Invalidated::Refetching | Invalidated::AlreadyReplaced => {}
        }
        let fresh = match until
            .bound(async { Ok(route.store.get(self.settings.token_wait).await) })
            .await?
        {
            Ok(t) => t,
            Err(_) => return Ok(response),
        };
        tracing::debug!(route = %route.label, "upstream answered 401; retrying with a fresh token");
        route
            .authorize
            .authorize(&fresh, &parts.method, &uri, &mut parts.headers);
        drop(response);
        route.metrics.unauthorized_retry();
        let response = self
            .send_replayable(
                client,
                &parts.method,
                &uri,
                &parts.headers,
                &bytes,
                Some((&route.metrics, &*route.authorize, &fresh)),
            )
            .await?;
        // Learn a nonce for later requests; no third attempt.
        proof_refused(
            route,
            route
                .authorize
                .observe(response.status(), response.headers()),
        );
        Ok(response)
    }

    /// Sends a request whose body we hold. An idempotent one is sent once
    /// more if the upstream closed the connection before answering: a pooled
    /// connection the upstream had just dropped (its keep-alive timeout, or
    /// a server that closes after each response without `Connection: close`).
    /// hyper-util retries only requests not yet written to such a connection;
    /// this covers the ones that were. Both attempts share one deadline.
    /// `route` (its metrics, and how to attach the credential again to the
    /// re-sent request) is `None` for passthrough requests.
    async fn send_replayable(
        &self,
        client: Via<'_>,
        method: &Method,
        uri: &Uri,
        headers: &http::HeaderMap,
        body: &Bytes,
        route: Option<(&RouteMetrics, &dyn Authorize, &token::Token)>,
    ) -> Result<Response<pool::Body>, Error> {
        let metrics = route.map(|(m, _, _)| m);
        let request = || {
            outgoing(
                method.clone(),
                uri.clone(),
                headers.clone(),
                Either::Right(Full::new(body.clone())),
            )
        };
        let deadline = tokio::time::Instant::now() + self.settings.response_timeout;
        match self.attempt(client, request(), deadline).await {
            Err(Failure::Upstream(e)) if method.is_idempotent() && closed_before_answer(&e) => {
                tracing::debug!(
                    upstream = uri.authority().map(|a| a.as_str()).unwrap_or("upstream"),
                    "upstream closed the connection before answering; retrying once"
                );
                let mut again = request();
                if let Some((_, authorize, token)) = route {
                    // Each request sent gets its credential attached anew.
                    authorize.authorize(token, method, uri, again.headers_mut());
                }
                self.attempt(client, again, deadline)
                    .await
                    .map_err(|f| self.failure(f, uri, metrics))
            }
            other => other.map_err(|f| self.failure(f, uri, metrics)),
        }
    }

    async fn send(
        &self,
        client: Via<'_>,
        request: Request<Outgoing>,
        metrics: Option<&RouteMetrics>,
    ) -> Result<Response<pool::Body>, Error> {
        // A cheap clone (shared bytes), to name the upstream in an error.
        let uri = request.uri().clone();
        let deadline = tokio::time::Instant::now() + self.settings.response_timeout;
        self.attempt(client, request, deadline)
            .await
            .map_err(|f| self.failure(f, &uri, metrics))
    }

    async fn attempt(
        &self,
        client: Via<'_>,
        request: Request<Outgoing>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<pool::Body>, Failure> {
        let until = client.until;
        // One timer, for whichever bound comes first.
        let (at, request_bound) = if until.at < deadline {
            (until.at, true)
        } else {
            (deadline, false)
        };
        match tokio::time::timeout_at(at, client.client.send(client.host, request)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(Failure::Upstream(e)),
            Err(_) if request_bound => Err(Failure::RequestTimeout(until)),
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// Counts a failed exchange and turns it into the app's error.
    fn failure(&self, failure: Failure, uri: &Uri, metrics: Option<&RouteMetrics>) -> Error {
        let upstream = uri.authority().map(|a| a.as_str()).unwrap_or("upstream");
        match failure {
            Failure::Upstream(e) => {
                if let Some(m) = metrics {
                    m.upstream_error(if e.is_connect() {
                        "connect"
                    } else {
                        "protocol"
                    });
                }
                upstream_error(upstream, &e)
            }
            Failure::RequestTimeout(until) => until.error(),
            Failure::Timeout => {
                if let Some(m) = metrics {
                    m.upstream_error("timeout");
                }
                Error::new(
                    Kind::UpstreamTimeout,
                    format!(
                        "{upstream} did not answer within {:?}",
                        self.settings.response_timeout
                    ),
                )
            }
        }
    }

    /// `unmatched = "passthrough"`: forward as a plain proxy, no token added.
    async fn passthrough(
        &self,
        mut req: Request<Incoming>,
        until: Until,
    ) -> Result<Response<Body>, Error> {
        let upgrade = tunnel::Upgrade::take(&mut req);
        let (mut parts, body) = req.into_parts();
        if parts.uri.authority().is_none() {
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .ok_or_else(|| Error::new(Kind::BadRequest, "request has no target host"))?;
            let pq = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            parts.uri = format!("http://{host}{pq}")
                .parse()
                .map_err(|_| Error::new(Kind::BadRequest, "invalid Host header"))?;
        } else if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            // RFC 9112 §3.2.2: a proxy replaces Host with the absolute URI's
            // authority, so the host we connect to and the one named agree.
            parts.headers.insert(header::HOST, host);
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        // Upgrades (ws://) pass through to plain http:// targets only: to an
        // https:// one this pool may speak HTTP/2, which has no Upgrade.
        let upgrade = upgrade.filter(|_| parts.uri.scheme() == Some(&Scheme::HTTP));
        if let Some(u) = &upgrade {
            u.restore(&mut parts.headers);
        }
        let response = if body.is_end_stream() {
            // No body to lose: a stale pooled connection may be retried.
            self.send_replayable(
                Via {
                    client: &self.passthrough,
                    host: None,
                    until,
                },
                &parts.method,
                &parts.uri,
                &parts.headers,
                &Bytes::new(),
                None,
            )
            .await?
        } else {
            let request = outgoing(parts.method, parts.uri, parts.headers, Either::Left(body));
            let via = Via {
                client: &self.passthrough,
                host: None,
                until,
            };
            self.send(via, request, None).await?
        };
        Ok(match upgrade {
            Some(u) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                u.switch(response, self.tunnels.metrics())
            }
            _ => finish(response),
        })
    }
}

/// The pool a request goes through, its upstream there when the route
/// holds it, and the request's deadline.
#[derive(Clone, Copy)]
struct Via<'a> {
    client: &'a Client,
    host: Option<&'a Arc<pool::Host>>,
    until: Until,
}

/// Why one exchange with an upstream failed.
enum Failure {
    Upstream(pool::Error),
    /// `upstream.response_timeout`.
    Timeout,
    /// `proxy.request_timeout` came first.
    RequestTimeout(Until),
}

/// The end of a request's time (`proxy.request_timeout`) up to its response
/// head. Each wait of the exchange is bounded by it on its own, rather than
/// the whole exchange under one more timer: a wait that is ready at once
/// (a token in the store, a request without a body) arms no timer, and the
/// wait for the upstream arms one, for whichever of this and
/// `upstream.response_timeout` ends first.
#[derive(Clone, Copy)]
struct Until {
    at: tokio::time::Instant,
    after: Duration,
}

impl Until {
    fn error(self) -> Error {
        Error::new(
            Kind::UpstreamTimeout,
            format!(
                "no response within proxy.request_timeout ({:?})",
                self.after
            ),
        )
    }

    async fn bound<T>(self, wait: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        tokio::time::timeout_at(self.at, wait)
            .await
            .unwrap_or_else(|_| Err(self.error()))
    }
}

/// An HTTP/1.1 request as the upstream client sends it.
fn outgoing(
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: Outgoing,
) -> Request<Outgoing> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    request
}

/// Whether the upstream closed or reset the connection before any response
/// head arrived, after the request was sent on it: what a stale pooled
/// connection looks like (a clean EOF, or over TLS usually an EOF without
/// close_notify, or a reset). Connect failures are not this.
fn closed_before_answer(e: &pool::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    errors::causes(e).any(|err| {
        err.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
            || err.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                        // rustls: closed without close_notify, as many servers do.
                        | std::io::ErrorKind::UnexpectedEof
                )
            })
    })
}

/// The target host and port of a request on the forward listener: the
/// absolute-form URI's authority, else the `Host` header.
fn target_host(req: &Request<Incoming>) -> Result<(&str, u16), Error> {
    let default_port = if req.uri().scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    if let Some(authority) = req.uri().authority() {
        // RFC 9110 §4.2.4: userinfo in an http(s) URI is to be treated as an
        // error; refusing it also keeps `user@host` spellings out of routing.
        if authority.as_str().contains('@') {
            return Err(Error::new(
                Kind::BadRequest,
                "userinfo (user@) in the request URI is not allowed",
            ));
        }
        let host = authority.host();
        if !route::valid_request_host(host) {
            return Err(Error::new(
                Kind::BadRequest,
                "invalid host in the request URI",
            ));
        }
        return Ok((host, authority.port_u16().unwrap_or(default_port)));
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| {
            Error::new(
                Kind::BadRequest,
                "request has no target host (absolute URI or Host header)",
            )
        })?;
    // A Host header is `host[:port]` and nothing else: no userinfo, no
    // characters a DNS name or IP literal cannot hold.
    let (name, port) = route::split_host_port(host)
        .filter(|(h, _)| route::valid_request_host(h))
        .ok_or_else(|| Error::new(Kind::BadRequest, "invalid Host header"))?;
    Ok((name, port.unwrap_or(default_port)))
}

/// The upstream URI (base path joined with the request's path and query) and
/// the `Host` value for it.
fn upstream_uri(
    target: &Target,
    uri: &Uri,
    headers: &http::HeaderMap,
) -> Result<(Uri, HeaderValue), Error> {
    let path_and_query = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let (authority, host_header, base_path) = match target {
        Target::Fixed {
            authority,
            host_header,
            base_path,
        } => (authority.clone(), host_header.clone(), base_path.as_str()),
        Target::SameHost => {
            // The route matched this host, so the host is the route's own.
            let host = match uri.authority() {
                Some(a) => a.host(),
                None => headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(route::split_host_port)
                    .map(|(h, _)| h)
                    .ok_or_else(|| Error::new(Kind::BadRequest, "request has no target host"))?,
            };
            let host = route::normalize(host);
            let authority = Authority::try_from(host.as_ref())
                .map_err(|_| Error::new(Kind::BadRequest, "invalid target host"))?;
            let host_header = HeaderValue::from_str(authority.as_str())
                .map_err(|_| Error::new(Kind::BadRequest, "invalid target host"))?;
            (authority, host_header, "")
        }
    };
    let path_and_query = if base_path.is_empty() {
        path_and_query
    } else {
        let mut joined = BytesMut::with_capacity(base_path.len() + path_and_query.as_str().len());
        joined.extend_from_slice(base_path.as_bytes());
        joined.extend_from_slice(path_and_query.as_str().as_bytes());
        PathAndQuery::from_maybe_shared(joined.freeze())
            .map_err(|_| Error::new(Kind::BadRequest, "invalid request path"))?
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTPS);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path_and_query);
    let uri =
        Uri::from_parts(parts).map_err(|_| Error::new(Kind::BadRequest, "invalid request URI"))?;
    Ok((uri, host_header))
}

enum Replay {
    Stream(Incoming),
    Buffered(Bytes),
}

/// Reads the body now if it is empty or known to fit `limit`.
async fn replayable(body: Incoming, limit: usize) -> Result<Replay, Error> {
    if body.is_end_stream() {
        return Ok(Replay::Buffered(Bytes::new()));
    }
    match body.size_hint().exact() {
        Some(n) if n <= limit as u64 => body
            .collect()
            .await
            .map(|c| Replay::Buffered(c.to_bytes()))
            .map_err(|e| {
                Error::new(
                    Kind::BadRequest,
                    format!("reading the request body failed: {e}"),
                )
            }),
        _ => Ok(Replay::Stream(body)),
    }
}

/// Whether `verdict` says the upstream refused the route's proof rather than
/// its token (counted: the request is not sent again after this).
fn proof_refused(route: &Route, verdict: Verdict) -> bool {
    match verdict {
        Verdict::Fine => false,
        Verdict::Resend(why) | Verdict::ProofRefused(why) => {
            route.authorize.refused(why);
            true
        }
    }
}

/// Whether the upstream refused the token: HTTP 401, or a gRPC server's
/// trailers-only `UNAUTHENTICATED` (HTTP 200, `grpc-status: 16` in the
/// headers). A status 16 in the trailers of a streamed answer is not seen.
fn refuses_token(response: &Response<pool::Body>) -> bool {
    match response.status() {
        StatusCode::UNAUTHORIZED => true,
        StatusCode::OK => response
            .headers()
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"16"),
        _ => false,
    }
}

/// The upstream's response as the app gets it: hop-by-hop headers removed.
fn finish(response: Response<pool::Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}

fn upstream_error(upstream: &str, e: &pool::Error) -> Error {
    let chain = errors::chain(e);
    let head_too_large = errors::causes(e)
        .filter_map(|e| e.downcast_ref::<hyper::Error>())
        .any(hyper::Error::is_parse_too_large);
    if head_too_large {
        Error::new(
            Kind::UpstreamUnreachable,
            format!("{upstream} sent a response head larger than upstream.max_header_bytes"),
        )
    } else if e.is_connect() {
        Error::new(
            Kind::UpstreamUnreachable,
            format!("cannot connect to {upstream}: {chain}"),
        )
    } else {
        Error::new(
            Kind::UpstreamUnreachable,
            format!("request to {upstream} failed: {chain}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed(authority: &str, base: &str) -> Target {
        Target::Fixed {
            authority: authority.parse().unwrap(),
            host_header: HeaderValue::from_str(authority).unwrap(),
            base_path: base.into(),
        }
    }

    #[test]
    fn upstream_uri_joins_base_path_and_query() {
        let h = http::HeaderMap::new();
        let cases = [
            (
                "",
                "http://app.test/items?x=1",
                "https://api.test/items?x=1",
            ),
            (
                "/v2",
                "http://app.test/items?x=1",
                "https://api.test/v2/items?x=1",
            ),
            ("/v2", "/", "https://api.test/v2/"),
            ("/a/b", "/c/d?e=f&g", "https://api.test/a/b/c/d?e=f&g"),
        ];
        for (base, req, want) in cases {
            let (uri, host) =
                upstream_uri(&fixed("api.test", base), &req.parse().unwrap(), &h).unwrap();
            assert_eq!(uri.to_string(), want);
            assert_eq!(host, "api.test");
        }
    }

    #[test]
    fn same_host_uses_the_request_host() {
        let mut h = http::HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("A.Example.com.:80"));
        let (uri, host) = upstream_uri(&Target::SameHost, &"/x".parse().unwrap(), &h).unwrap();
        assert_eq!(uri.to_string(), "https://a.example.com/x");
        assert_eq!(host, "a.example.com");
    }
}
