//! The upstream connection pool, on hyper's `client::conn` (it replaced
//! hyper-util's legacy client, issue 19).
//!
//! - **One `Host` per upstream.** A route with a fixed upstream holds its
//!   `Host` from build time, so the request path hashes nothing; only
//!   `upstream = "same-host"` routes and passthrough look a host up by
//!   authority (a lock-free map, copied on insert).
//! - **Connection starts are bounded by waiters.** A request that finds no
//!   idle connection queues as a waiter and starts a connect only while
//!   fewer connects are under way than requests waiting. The connect is a
//!   task of its own, not the request's: whichever connection comes first,
//!   freed or new, goes to the oldest waiter, and a connection that finishes
//!   with nobody waiting is kept idle. hyper-util raced a connect against
//!   every checkout and kept the loser (3,809 connections opened for 1,024
//!   clients in `bench/run.sh scale`).
//! - **HTTP/1.1 and HTTP/2 apart.** HTTP/1.1 connections are a LIFO idle
//!   stack (the most recently used is warm; the rest age out); an HTTP/1.1
//!   connection comes back when its response body ends, not through a task
//!   per request. HTTP/2 is one multiplexed connection per upstream, read
//!   lock-free, opened on demand by one connect at a time.
//! - **What the old pool gave is kept:** `upstream.pool_idle_timeout` (on
//!   checkout and by a reaper task), a request not yet written to a pooled
//!   connection that closed is sent on another one, ALPN and the client
//!   certificate per `Client`, connect and TLS bounds from the connector,
//!   and HTTP/2 keep-alive pings.
//!
//! The per-host lock guards only a few pushes and pops (never an await or a
//! syscall); a checkout takes it once, a release once.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::uri::{Authority, Parts, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Outgoing;
use super::upstream::{Connector, Stream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP connect, TLS handshake or the HTTP/2 handshake; shared by the
    /// requests that waited for the same connection.
    #[error("connecting failed")]
    Connect(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// Sending the request or reading the response head.
    #[error("request failed")]
    Request(#[source] hyper::Error),
    /// The pool went away (a reload dropped it) while the request waited.
    #[error("the connection pool was closed")]
    Closed,
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }

    fn connect(e: impl Into<BoxError>) -> Self {
        Error::Connect(Arc::from(e.into()))
    }
}

/// What a pool speaks, chosen per route (`upstream_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// ALPN decides per connection (h2 preferred).
    Auto,
    Http1,
    Http2,
}

/// Settings of one `Client`.
pub struct Settings {
    pub protocol: Protocol,
    pub idle_timeout: Duration,
    /// Add `Host` on HTTP/1.1 connections when the request has none.
    pub set_host: bool,
    /// The largest response head.
    pub max_header_bytes: usize,
    /// Read buffer ceiling of an HTTP/1.1 connection (hyper grows the
    /// buffer only while reads fill it, so small responses keep 8 KiB).
    /// Each read's buffer lives until the app has been sent what it holds,
    /// so this is also what a streaming response holds at most.
    pub read_buffer_bytes: usize,
}

/// Connections one request may take when each closes before the request
/// is written to it.
const MAX_TAKES: usize = 8;

/// HTTP/2 pings on a connection with streams open: a dead peer is noticed
/// within interval + timeout rather than at the response timeout of every
/// stream on it.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of upstream connections with one set of TLS settings (trust,
/// ALPN, client certificate). Cheap to clone.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    /// TCP and TLS, bounded by `connect_timeout` + `tls_timeout`.
    connector: Connector,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    protocol: Protocol,
    set_host: bool,
    idle_timeout: Duration,
    hosts: ArcSwap<HashMap<Key, Arc<Host>>>,
    reaper: AtomicBool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    https: bool,
    authority: Authority,
}

const PROTO_UNKNOWN: u8 = 0;
const PROTO_H1: u8 = 1;
const PROTO_H2: u8 = 2;

/// One upstream (scheme and authority) of a `Client`: its idle HTTP/1.1
/// connections, its HTTP/2 connection, the requests waiting for either.
pub struct Host {
    /// `scheme://authority/`, what the connector dials.
    dial: Uri,
    /// `Host` for HTTP/1.1 requests that have none (the default port left out).
    host_header: HeaderValue,
    /// What the last connection negotiated: whether to look for HTTP/2 first.
    proto: AtomicU8,
    h2: ArcSwapOption<http2::SendRequest<Outgoing>>,
    /// Set by each HTTP/2 request, cleared by the reaper: an HTTP/2
    /// connection unused for a whole reaper period is closed.
    h2_used: AtomicBool,
    /// Held by a route (fixed upstream): never dropped from the map.
    pinned: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    idle: Vec<Idle>,
    /// Each gets a connection and whether it has served a request before.
    waiters: VecDeque<oneshot::Sender<Result<(Conn, bool), Error>>>,
    connecting: usize,
}

struct Idle {
    tx: http1::SendRequest<Outgoing>,
    since: Instant,
}

enum Conn {
    H1(http1::SendRequest<Outgoing>),
    H2(http2::SendRequest<Outgoing>),
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host").field("dial", &self.dial).finish()
    }
}

impl Client {
    pub fn new(connector: Connector, settings: Settings) -> Self {
        let mut h1 = http1::Builder::new();
        h1.max_buf_size(settings.read_buffer_bytes.max(settings.max_header_bytes))
            .max_header_size(settings.max_header_bytes);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            shared: Arc::new(Shared {
                connector,
                h1,
                h2,
                protocol: settings.protocol,
                set_host: settings.set_host,
                idle_timeout: settings.idle_timeout,
                hosts: ArcSwap::from_pointee(HashMap::new()),
                reaper: AtomicBool::new(false),
            }),
        }
    }

    /// The pool of one upstream, for a route to hold: requests through it
    /// look nothing up.
    pub fn pin(&self, scheme: &Scheme, authority: &Authority) -> Arc<Host> {
        let host = self.host(*scheme == Scheme::HTTPS, authority);
        host.pinned.store(true, Ordering::Relaxed);
        host
    }

    fn host(&self, https: bool, authority: &Authority) -> Arc<Host> {
        let key = Key {
            https,
            authority: authority.clone(),
        };
        if let Some(h) = self.shared.hosts.load().get(&key) {
            return Arc::clone(h);
        }
        let new = Arc::new(Host::new(&key));
        let mut chosen = Arc::clone(&new);
        self.shared.hosts.rcu(|hosts| {
            let mut hosts = HashMap::clone(hosts);
            chosen = Arc::clone(hosts.entry(key.clone()).or_insert_with(|| Arc::clone(&new)));
            hosts
        });
        chosen
    }

    /// Opens one connection to `host` ahead of its first request (at
    /// start-up and after a reload, while tokens are being fetched), unless
    /// one is pooled or opening. A failure is only logged: the first
    /// request connects again.
    pub fn preconnect(&self, host: &Arc<Host>) {
        let mut state = host.lock();
        if !state.idle.is_empty() || state.connecting > 0 || host.live_h2().is_some() {
            return;
        }
        state.connecting += 1;
        spawn_connect(Arc::clone(&self.shared), Arc::clone(host));
    }

    /// Sends `req` (an absolute URI) to `host`, or to the host its URI
    /// names. The response body gives an HTTP/1.1 connection back to the
    /// pool when it ends.
    pub async fn send(
        &self,
        host: Option<&Arc<Host>>,
        req: Request<Outgoing>,
    ) -> Result<Response<Body>, Error> {
        match host {
            Some(h) => self.send_to(h, req).await,
            None => {
                let uri = req.uri();
                let Some(authority) = uri.authority() else {
                    return Err(Error::connect("the request URI has no host"));
                };
                let host = self.host(uri.scheme() != Some(&Scheme::HTTP), authority);
                self.send_to(&host, req).await
            }
        }
    }

    async fn send_to(
        &self,
        host: &Arc<Host>,
        mut req: Request<Outgoing>,
    ) -> Result<Response<Body>, Error> {
        let absolute = req.uri().clone();
        // Each turn takes another connection because the last one closed
        // before the request went out on it; an upstream that closes every
        // connection at once must not make that an endless loop.
        for _ in 0..MAX_TAKES {
            if host.proto.load(Ordering::Relaxed) == PROTO_H2 {
                let tx = host.h2.load();
                if let Some(tx) = tx.as_deref().filter(|tx| !tx.is_closed()) {
                    let tx = tx.clone();
                    match self.send_h2(host, tx, req).await {
                        Ok(r) => return Ok(r),
                        Err(Retry::Again(r)) => {
                            req = r;
                            continue;
                        }
                        Err(Retry::Fail(e)) => return Err(e),
                    }
                }
            }
            let (conn, reused) = self.checkout(host).await?;
            let mut tx = match conn {
                Conn::H2(tx) => match self.send_h2(host, tx, req).await {
                    Ok(r) => return Ok(r),
                    Err(Retry::Again(r)) => {
                        req = r;
                        continue;
                    }
                    Err(Retry::Fail(e)) => return Err(e),
                },
                Conn::H1(tx) => tx,
            };
            if !tx.is_ready()
                && let Err(e) = tx.ready().await
            {
                // Closed while idle, or it closed after its last response:
                // nothing was sent, so take another. A new connection that
                // closes before its first request would again.
                if reused {
                    continue;
                }
                return Err(Error::Request(e));
            }
            if self.shared.set_host && !req.headers().contains_key(header::HOST) {
                req.headers_mut()
                    .insert(header::HOST, host.host_header.clone());
            }
            origin_form(req.uri_mut());
            match tx.try_send_request(req).await {
                Ok(response) => {
                    let lease = Lease {
                        tx,
                        host: Arc::clone(host),
                    };
                    return Ok(wrap(response, Some(lease)));
                }
                Err(mut e) => match e.take_message() {
                    // Not written: the connection closed under it. A fresh
                    // connection that does this would again; a pooled one
                    // was just stale.
                    Some(mut r) if reused => {
                        *r.uri_mut() = absolute.clone();
                        req = r;
                    }
                    _ => return Err(Error::Request(e.into_error())),
                },
            }
        }
        Err(Error::connect(format!(
            "the upstream closed {MAX_TAKES} connections in a row before a request could be sent"
        )))
    }

    async fn send_h2(
        &self,
        host: &Arc<Host>,
        mut tx: http2::SendRequest<Outgoing>,
        req: Request<Outgoing>,
    ) -> Result<Response<Body>, Retry> {
        host.h2_used.store(true, Ordering::Relaxed);
        match tx.try_send_request(req).await {
            Ok(response) => Ok(wrap(response, None)),
            Err(mut e) => match e.take_message() {
                Some(r) => {
                    // The connection is gone (GOAWAY, closed): forget it and
                    // open another.
                    host.forget_h2(&tx);
                    Err(Retry::Again(r))
                }
                None => Err(Retry::Fail(Error::Request(e.into_error()))),
            },
        }
    }

    /// An idle HTTP/1.1 connection, the HTTP/2 one, or the first to come
    /// free or finish connecting. The bool: whether it was pooled.
    async fn checkout(&self, host: &Arc<Host>) -> Result<(Conn, bool), Error> {
        let waiting = {
            let mut state = host.lock();
            if !state.idle.is_empty() {
                let now = Instant::now();
                while let Some(idle) = state.idle.pop() {
                    if !idle.tx.is_closed() && now - idle.since < self.shared.idle_timeout {
                        return Ok((Conn::H1(idle.tx), true));
                    }
                }
            }
            if let Some(tx) = host.live_h2() {
                return Ok((Conn::H2(tx), true));
            }
            let (tx, rx) = oneshot::channel();
            // Requests that gave up (their deadline) no longer count.
            state.waiters.retain(|w| !w.is_closed());
            state.waiters.push_back(tx);
            let h2 = self.shared.protocol == Protocol::Http2
                || host.proto.load(Ordering::Relaxed) == PROTO_H2;
            let wanted = if h2 { 1 } else { state.waiters.len() };
            if state.connecting < wanted {
                state.connecting += 1;
                spawn_connect(Arc::clone(&self.shared), Arc::clone(host));
            }
            rx
        };
        match waiting.await {
            Ok(conn) => conn,
            Err(_) => Err(Error::Closed),
        }
    }
}

/// What a failed HTTP/2 send leaves: the request back when it was not
/// sent. Returned once per failure, never stored, so its size is moot.
#[allow(clippy::large_enum_variant)]
enum Retry {
    Again(Request<Outgoing>),
    Fail(Error),
}

/// A plain function, so that `connect` can start more connects without
/// its future's type depending on itself.
fn spawn_connect(shared: Arc<Shared>, host: Arc<Host>) {
    tokio::spawn(connect(shared, host));
}

/// Opens one connection to `host` and hands it on: HTTP/1.1 to the oldest
/// waiter (or idle), HTTP/2 to every waiter and to later requests.
async fn connect(shared: Arc<Shared>, host: Arc<Host>) {
    shared.start_reaper();
    match shared.open(&host).await {
        Ok(Conn::H1(tx)) => {
            host.proto.store(PROTO_H1, Ordering::Relaxed);
            let mut state = host.lock();
            state.connecting -= 1;
            host.hand_h1(&mut state, tx, false);
            // Requests that waited for an HTTP/2 connect (this upstream
            // spoke h2 before) each need a connect of their own now.
            while state.connecting < state.waiters.len() {
                state.connecting += 1;
                spawn_connect(Arc::clone(&shared), Arc::clone(&host));
            }
        }
        Ok(Conn::H2(tx)) => {
            host.proto.store(PROTO_H2, Ordering::Relaxed);
            host.h2_used.store(true, Ordering::Relaxed);
            let tx = match host.live_h2() {
                // Connects raced before the first one said h2: keep one.
                Some(current) => current,
                None => {
                    host.h2.store(Some(Arc::new(tx.clone())));
                    tx
                }
            };
            let mut state = host.lock();
            state.connecting -= 1;
            for w in state.waiters.drain(..) {
                let _ = w.send(Ok((Conn::H2(tx.clone()), false)));
            }
        }
        Err(e) => {
            tracing::debug!(upstream = %host.dial, error = %crate::errors::chain(&*e), "connecting to the upstream failed");
            let mut state = host.lock();
            state.connecting -= 1;
            let h2 = shared.protocol == Protocol::Http2
                || host.proto.load(Ordering::Relaxed) == PROTO_H2;
            if h2 {
                // Every waiter waited on this one connect.
                for w in state.waiters.drain(..) {
                    let _ = w.send(Err(Error::Connect(Arc::clone(&e))));
                }
            } else {
                // Each waiter started its own connect: this one fails one.
                while let Some(w) = state.waiters.pop_front() {
                    if w.send(Err(Error::Connect(Arc::clone(&e)))).is_ok() {
                        break;
                    }
                }
            }
        }
    }
}

impl Shared {
    async fn open(&self, host: &Host) -> Result<Conn, Arc<dyn std::error::Error + Send + Sync>> {
        let mut connector = self.connector.clone();
        let io = tower_service::Service::call(&mut connector, host.dial.clone()).await?;
        if io.is_h2() || self.protocol == Protocol::Http2 {
            // The connector's bound covers TCP and TLS; the HTTP/2
            // handshake (the peer's SETTINGS) gets the same again.
            let handshake = async {
                let (mut tx, conn) = self.h2.handshake(io).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                tx.ready().await?;
                Ok::<_, hyper::Error>(tx)
            };
            match tokio::time::timeout(self.connector.limit(), handshake).await {
                Ok(Ok(tx)) => Ok(Conn::H2(tx)),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(_) => Err(Arc::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the HTTP/2 handshake took too long",
                ))),
            }
        } else {
            let (tx, conn) = self
                .h1
                .handshake::<Stream, Outgoing>(io)
                .await
                .map_err(|e| Arc::new(e) as Arc<dyn std::error::Error + Send + Sync>)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Conn::H1(tx))
        }
    }

    /// Closes idle connections past the idle timeout, from a task that
    /// holds the pool only while it looks (it ends with the pool).
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = self.idle_timeout.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = Weak::upgrade(&pool) else {
                    return;
                };
                pool.reap();
            }
        });
    }

    fn reap(&self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (key, host) in self.hosts.load().iter() {
            let unused = {
                let mut state = host.lock();
                state
                    .idle
                    .retain(|i| !i.tx.is_closed() && now - i.since < self.idle_timeout);
                if !host.h2_used.swap(false, Ordering::Relaxed) {
                    host.h2.store(None);
                }
                state.idle.is_empty() && state.waiters.is_empty() && state.connecting == 0
            };
            if unused
                && !host.pinned.load(Ordering::Relaxed)
                && host.h2.load().is_none()
                && Arc::strong_count(host) == 1
            {
                gone.push(key.clone());
            }
        }
        if !gone.is_empty() {
            self.hosts.rcu(|hosts| {
                let mut hosts = HashMap::clone(hosts);
                for k in &gone {
                    hosts.remove(k);
                }
                hosts
            });
        }
    }
}

impl Host {
    fn new(key: &Key) -> Self {
        let scheme = if key.https {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let mut parts = Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(key.authority.clone());
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        let dial = Uri::from_parts(parts).expect("scheme and authority make a URI");
        let default_port = if key.https { 443 } else { 80 };
        let host_header = match key.authority.port_u16() {
            Some(p) if p != default_port => HeaderValue::from_str(key.authority.as_str()),
            _ => HeaderValue::from_str(key.authority.host()),
        }
        .expect("an authority is a valid header value");
        Self {
            dial,
            host_header,
            proto: AtomicU8::new(PROTO_UNKNOWN),
            h2: ArcSwapOption::empty(),
            h2_used: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live_h2(&self) -> Option<http2::SendRequest<Outgoing>> {
        self.h2
            .load()
            .as_deref()
            .filter(|tx| !tx.is_closed())
            .cloned()
    }

    fn forget_h2(&self, dead: &http2::SendRequest<Outgoing>) {
        let current = self.h2.load_full();
        if current
            .as_deref()
            .is_some_and(|tx| tx.is_closed() || dead.is_closed())
        {
            self.h2.compare_and_swap(&current, None);
        }
    }

    /// An HTTP/1.1 connection free for a request: to the oldest waiter
    /// still waiting, else idle. `reused`: it has served a request, so one
    /// that closed after its response is dropped here, and the waiter that
    /// finds it closed anyway takes another instead of failing.
    fn hand_h1(&self, state: &mut State, mut tx: http1::SendRequest<Outgoing>, reused: bool) {
        if reused && tx.is_closed() {
            return;
        }
        while let Some(w) = state.waiters.pop_front() {
            match w.send(Ok((Conn::H1(tx), reused))) {
                Ok(()) => return,
                Err(Ok((Conn::H1(back), _))) => tx = back,
                Err(_) => return,
            }
        }
        if !tx.is_closed() {
            state.idle.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }
}

/// An HTTP/1.1 connection lent to one response: back to its host when
/// the body ends or is dropped. A body dropped before its end leaves hyper
/// to decide: it keeps the connection when the rest had already arrived
/// (a small answer read with its head, as a refused 401 is) and closes it
/// otherwise, and a closed one is skipped at checkout.
struct Lease {
    tx: http1::SendRequest<Outgoing>,
    host: Arc<Host>,
}

impl Lease {
    fn release(self) {
        let Lease { tx, host } = self;
        let mut state = host.lock();
        host.hand_h1(&mut state, tx, true);
    }
}

fn wrap(response: Response<Incoming>, lease: Option<Lease>) -> Response<Body> {
    let lease = match lease {
        // An upgraded connection is the tunnel's now.
        Some(_) if response.status() == StatusCode::SWITCHING_PROTOCOLS => None,
        Some(l) if response.body().is_end_stream() => {
            l.release();
            None
        }
        other => other,
    };
    response.map(|inner| Body { inner, lease })
}

/// An upstream response body.
pub struct Body {
    inner: Incoming,
    lease: Option<Lease>,
}

impl Body {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        self.release();
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            // hyper stops polling a body once it reports its end (a
            // Content-Length body after its last byte), so look after
            // each frame, not only for `None`.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `/path?query` for an HTTP/1.1 request line.
fn origin_form(uri: &mut Uri) {
    let path = match uri.path_and_query() {
        Some(p) if p.as_str() != "/" => {
            let mut parts = Parts::default();
            parts.path_and_query = Some(p.clone());
            Uri::from_parts(parts).expect("a path is a URI")
        }
        _ => Uri::default(),
    };
    *uri = path;
}
