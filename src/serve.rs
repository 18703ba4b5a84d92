//! Accept loops: one per listener, a task per connection, HTTP/1.1 and h2c
//! on every port. On shutdown a loop stops accepting, lets its connections
//! finish their in-flight requests within the drain bound, then returns.
//!
//! This module also owns the client-side limits ([`Limits`]): how many
//! connections may be open, how long a request head may take to arrive, how
//! long a connection may sit idle, how long a request may take until its
//! response head, and how long a response body may stall. Each bites on one
//! connection or request only; the others keep being served.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::config::Config;
use crate::head::{Fed, Refusal, Scan};
use crate::proxy::tunnel::Scope;
use crate::proxy::{self, Entry, Proxy};

/// Client-side limits, from `[proxy]` and `upstream.body_idle_timeout`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    pub request_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_connections: usize,
}

impl Limits {
    pub fn new(config: &Config) -> Self {
        Self {
            header_read_timeout: config.proxy.header_read_timeout,
            idle_timeout: config.proxy.idle_timeout,
            tunnel_idle_timeout: config.proxy.tunnel_idle_timeout,
            request_timeout: config.proxy.request_timeout,
            body_idle_timeout: config.upstream.body_idle_timeout,
            max_header_bytes: config.proxy.max_header_bytes,
            max_headers: config.proxy.max_headers,
            max_connections: config.proxy.max_connections,
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // hyper's own header timer also runs while a keep-alive
            // connection waits for its next request, so it would cut idle
            // connections at the header bound: `Activity` keeps both apart.
            .header_read_timeout(None)
            // An app that closes its side after sending (or goes away
            // mid-request) does not cancel the upstream exchange: the answer
            // is written or fails, and a short upstream body is then read
            // out so its pooled connection is kept (see `Tracked`).
            .half_close(true)
            // A head that does not fit the read buffer is answered 431.
            .max_buf_size(self.max_header_bytes)
            .max_headers(self.max_headers);
        builder
            .http2()
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX));
        builder
    }
}

/// What all proxy listeners share: the limits of the config running now
/// and the count of open client connections.
pub struct Connections {
    limits: ArcSwap<Limits>,
    open: AtomicUsize,
    open_gauge: IntGauge,
    refused: IntCounter,
}

impl Connections {
    pub fn new(limits: Limits, open_gauge: IntGauge, refused: IntCounter) -> Self {
        Self {
            limits: ArcSwap::from_pointee(limits),
            open: AtomicUsize::new(0),
            open_gauge,
            refused,
        }
    }

    /// Applies to connections accepted from now on.
    pub fn set_limits(&self, limits: Limits) {
        if **self.limits.load() != limits {
            self.limits.store(Arc::new(limits));
        }
    }

    /// Counts a new connection, or refuses it when `max_connections` are open.
    fn admit(self: &Arc<Self>, max: usize) -> Option<ConnectionGuard> {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.refused.inc();
            return None;
        }
        self.open_gauge.inc();
        Some(ConnectionGuard(Arc::clone(self)))
    }
}

/// Counts an open client connection until dropped.
struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.open_gauge.dec();
    }
}

/// Serves `listener` until `shutdown` turns true, then drains for at most
/// `drain` before dropping what is left.
pub async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<ArcSwap<Proxy>>,
    entry: Entry,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    connections: Arc<Connections>,
) {
    let entry = Arc::new(entry);
    let mut limits = connections.limits.load_full();
    let mut builder = limits.builder();
    let graceful = GracefulShutdown::new();
    // Every connection holds a receiver until it and any tunnel opened on it
    // end: `closed()` tells the drain when all are gone.
    let (held, _) = watch::channel(());
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let current = connections.limits.load_full();
                    if !Arc::ptr_eq(&current, &limits) {
                        builder = current.builder();
                        limits = current;
                    }
                    // Over the limit: close at once rather than queue; the
                    // app sees a closed connection and the refusal is counted.
                    let Some(open) = connections.admit(limits.max_connections) else {
                        tracing::debug!(max = limits.max_connections, "too many client connections; closing a new one");
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let activity = Arc::new(Activity::new());
                    let io = TrackedIo { inner: stream, activity: Arc::clone(&activity), head: Some(Scan::new()), sniff: true };
                    // A tunnel outlives the connection's HTTP exchange: it
                    // keeps the connection counted until it ends.
                    let hold: Arc<dyn Send + Sync> = Arc::new((open, held.subscribe()));
                    let scope = Scope::new(shutdown.clone(), drain, Arc::clone(&hold), limits.tunnel_idle_timeout);
                    let service = service(Arc::clone(&proxy), Arc::clone(&entry), Arc::clone(&activity), scope, limits.request_timeout, limits.body_idle_timeout);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
                    let conn = graceful.watch(conn);
                    let (header, idle) = (limits.header_read_timeout, limits.idle_timeout);
                    tokio::spawn(async move {
                        let _hold = hold;
                        tokio::select! {
                            ended = conn => if let Err(e) = ended {
                                tracing::debug!(error = %e, "client connection ended with an error");
                            },
                            why = activity.expired(header, idle) => {
                                // Nothing is in flight: dropping the
                                // connection loses no response.
                                tracing::debug!(limit = why, "closing client connection");
                            }
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't exit.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    let deadline = Instant::now() + drain;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "connections still open after the drain timeout; closing them"
        );
        return;
    }
    // Tunnels (CONNECT, upgrades) left hyper when they switched; each closes
    // itself at the drain bound, a moment after this deadline at most.
    if tokio::time::timeout_at(deadline + TUNNEL_CLOSE_GRACE, held.closed())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "tunnels still open after the drain timeout");
    }
}

/// How long past the drain bound the listener waits for tunnels to close
/// themselves (they start their own drain timer when they see the signal).
const TUNNEL_CLOSE_GRACE: Duration = Duration::from_millis(250);

type Served = Response<Tracked>;

/// The per-connection service: the config current when a request arrives,
/// bounded by `request_timeout` until its response head, with a body that
/// keeps the connection busy until it ends.
fn service(
    proxy: Arc<ArcSwap<Proxy>>,
    entry: Arc<Entry>,
    activity: Arc<Activity>,
    scope: Scope,
    deadline: Duration,
    body_idle: Duration,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Served,
    Error = Infallible,
    Future = impl Future<Output = Result<Served, Infallible>> + Send,
> + Clone
+ Send {
    service_fn(move |mut req: Request<Incoming>| {
        if req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE) {
            // Only requests that may open a tunnel carry its scope, which
            // keeps the connection busy until the tunnel (or the request) ends.
            req.extensions_mut()
                .insert(scope.with_busy(activity.busy()));
        }
        // A reload swaps the config without touching this connection.
        let proxy = proxy.load_full();
        let entry = Arc::clone(&entry);
        let busy = activity.busy();
        let refused = activity.take_refusal(req.method().as_str(), req.uri().path());
        async move {
            if let Some(why) = refused {
                let response =
                    proxy.refuse(proxy::Error::new(proxy::Kind::BadRequest, why.message()));
                return Ok(response.map(|body| Tracked::new(body, busy, body_idle, false)));
            }
            let connect = req.method() == Method::CONNECT;
            // Over HTTP/2 a CONNECT tunnel is one stream; its scope keeps the
            // connection busy while it lives, and then the timers apply again.
            let http1 = req.version() != Version::HTTP_2;
            // hyper keeps a box the size of this future for the
            // connection's whole life; boxing the handler's ~4 KiB state
            // apart frees it once the response head is out, so an idle or
            // streaming connection does not hold it.
            let response = Box::pin(proxy.handle(&entry, req, deadline)).await;
            if http1
                && ((connect && response.status().is_success())
                    || response.status() == StatusCode::SWITCHING_PROTOCOLS)
            {
                // A tunnel carries bytes past hyper: never idle, never a head.
                busy.activity.tunnel();
            }
            // Only an HTTP/1.1 upstream connection is lost with an unread
            // body; an HTTP/2 stream is just reset.
            let drain = response.version() == http::Version::HTTP_11;
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, busy, body_idle, drain)))
        }
    })
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Where a connection is between requests, for the header and idle bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head: since accept, or since its first byte
    /// arrived after an idle spell.
    Head(Instant),
    /// No request in flight and no byte of the next one, since then.
    Idle(Instant),
    /// Requests in flight (or a tunnel): no connection-level bound.
    Busy,
}

struct ActivityState {
    phase: Phase,
    in_flight: usize,
    tunnel: bool,
}

const PROTO_UNKNOWN: u8 = 0;
const PROTO_H1: u8 = 1;
const PROTO_H2: u8 = 2;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One connection's activity, fed by its reads and its requests, watched
/// by the task that serves it.
struct Activity {
    state: Mutex<ActivityState>,
    /// Mirrors `phase == Idle`, so that reads, the common case, skip the
    /// lock unless they end an idle spell.
    idle: AtomicBool,
    proto: AtomicU8,
    /// Bytes of the HTTP/2 preface seen while `proto` is still unknown: a
    /// first read may hold only part of it (even just `P`, which is also
    /// the start of `POST`).
    preface_seen: AtomicU8,
    /// A [`Refusal`] found in the head being read, for the request it
    /// belongs to (0: none), with that head's request line.
    refusal: AtomicU8,
    refused_line: Mutex<Vec<u8>>,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                phase: Phase::Head(Instant::now()),
                in_flight: 0,
                tunnel: false,
            }),
            idle: AtomicBool::new(false),
            proto: AtomicU8::new(PROTO_UNKNOWN),
            preface_seen: AtomicU8::new(0),
            refusal: AtomicU8::new(0),
            refused_line: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived from the client.
    fn on_read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut proto = self.proto.load(Ordering::Relaxed);
        if proto == PROTO_UNKNOWN {
            let seen = usize::from(self.preface_seen.load(Ordering::Relaxed));
            let want = &H2_PREFACE[seen..];
            let n = bytes.len().min(want.len());
            proto = if bytes[..n] != want[..n] {
                PROTO_H1
            } else if seen + n == H2_PREFACE.len() {
                PROTO_H2
            } else {
                // Still a prefix of the preface: undecided, and a head to
                // the header bound until it is decided.
                self.preface_seen.store((seen + n) as u8, Ordering::Relaxed);
                PROTO_UNKNOWN
            };
            self.proto.store(proto, Ordering::Relaxed);
            if proto == PROTO_H2 {
                // The preface opens a connection, not a request: until its
                // first stream the connection is idle, not slow to send a
                // head (clients such as gRPC's connect before they call).
                let mut s = self.lock();
                if let Phase::Head(_) = s.phase {
                    s.phase = Phase::Idle(Instant::now());
                    self.idle.store(true, Ordering::Release);
                }
            }
        }
        // HTTP/2 frames between streams (pings, settings) are not a request
        // head; its connections stay idle until a stream opens.
        if proto == PROTO_H2 || !self.idle.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        if let Phase::Idle(_) = s.phase {
            s.phase = Phase::Head(Instant::now());
            self.idle.store(false, Ordering::Release);
        }
    }

    /// Records the verdict of a head that just ended (a clean head clears
    /// an earlier refusal: that one was not for the request to come).
    fn head_ended(&self, verdict: Option<Refusal>, line: &[u8]) {
        let code = match verdict {
            None => {
                if self.refusal.load(Ordering::Relaxed) != 0 {
                    self.refusal.store(0, Ordering::Relaxed);
                }
                return;
            }
            Some(Refusal::ContentLengthWithTransferEncoding) => 1,
            Some(Refusal::BareLf) => 2,
        };
        let mut kept = self.refused_line.lock().unwrap_or_else(|e| e.into_inner());
        kept.clear();
        kept.extend_from_slice(line);
        self.refusal.store(code, Ordering::Release);
    }

    /// The refusal found in the head of the request now being served, if
    /// that head is this request's (same method, the path in its line).
    fn take_refusal(&self, method: &str, path: &str) -> Option<Refusal> {
        if self.refusal.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let why = match self.refusal.swap(0, Ordering::Acquire) {
            1 => Refusal::ContentLengthWithTransferEncoding,
            2 => Refusal::BareLf,
            _ => return None,
        };
        let kept = self.refused_line.lock().unwrap_or_else(|e| e.into_inner());
        crate::head::belongs_to(&kept, method, path).then_some(why)
    }

    /// A request head was parsed: busy until the guard drops.
    fn busy(self: &Arc<Self>) -> BusyGuard {
        let mut s = self.lock();
        s.in_flight += 1;
        s.phase = Phase::Busy;
        self.idle.store(false, Ordering::Release);
        drop(s);
        BusyGuard {
            activity: Arc::clone(self),
        }
    }

    fn tunnel(&self) {
        self.lock().tunnel = true;
    }

    fn done(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 && !s.tunnel {
            s.phase = Phase::Idle(Instant::now());
            self.idle.store(true, Ordering::Release);
        }
    }

    /// Resolves, naming the limit, once the connection has waited too long
    /// for a request head or has been idle too long.
    ///
    /// Phase changes do not wake this watcher: that cost a wake-up of the
    /// connection's task and a timer reset per request. It looks at the
    /// phase at least every `min(header, idle)` instead. That is never too
    /// late: a phase that begins after a look ends no sooner than a whole
    /// bound later, and the next look is at most that far away. A phase
    /// that has not changed since the last look is held to its bound exactly.
    async fn expired(&self, header: Duration, idle: Duration) -> &'static str {
        let period = header.min(idle);
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        loop {
            (&mut sleep).await;
            let now = Instant::now();
            let next = match self.lock().phase {
                Phase::Head(since) if since + header <= now => return "proxy.header_read_timeout",
                Phase::Idle(since) if since + idle <= now => return "proxy.idle_timeout",
                Phase::Head(since) => (since + header).min(now + period),
                Phase::Idle(since) => (since + idle).min(now + period),
                Phase::Busy => now + period,
            };
            sleep.as_mut().reset(next);
        }
    }
}

/// Keeps a connection busy while a request or its response body lives.
struct BusyGuard {
    activity: Arc<Activity>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.activity.done();
    }
}

/// The client's socket, reporting reads to the connection's [`Activity`]
/// and checking HTTP/1 request heads hyper would accept but we refuse.
struct TrackedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
    /// Scanning a request head (from its first byte to its blank line).
    head: Option<Scan>,
    /// Until the first read: answer hyper-util's protocol sniff by peeking
    /// (see [`TrackedIo::sniffed_http1`]).
    sniff: bool,
}

impl TrackedIo {
    /// Whether this read is hyper-util's protocol sniff on an HTTP/1
    /// connection, told by peeking at the socket.
    ///
    /// The auto builder reads the first bytes (into a buffer the size of
    /// the HTTP/2 preface) to choose HTTP/1 or HTTP/2, then hands them to
    /// hyper as a prefix. hyper reads that prefix alone into its 8 KiB read
    /// buffer and then wants 8 KiB free behind it, so every HTTP/1
    /// connection's buffer doubled to 16 KiB. A sniff that reads nothing is
    /// taken for HTTP/1 with no prefix, so hyper's own first read gets the
    /// head into 8 KiB. HTTP/2, and a first segment that is still a prefix
    /// of the preface (`P`), are read as before.
    fn sniffed_http1(&mut self, cx: &mut Context<'_>, buf: &ReadBuf<'_>) -> Poll<bool> {
        if !self.sniff || buf.remaining() != H2_PREFACE.len() {
            self.sniff = false;
            return Poll::Ready(false);
        }
        let mut peek = [0u8; H2_PREFACE.len()];
        let mut peeked = ReadBuf::new(&mut peek);
        let polled = ready!(self.inner.poll_peek(cx, &mut peeked));
        self.sniff = false;
        let seen = peeked.filled();
        // An error or the end of the stream is left to the read itself.
        Poll::Ready(polled.is_ok() && !seen.is_empty() && !H2_PREFACE.starts_with(seen))
    }
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if ready!(this.sniffed_http1(cx, buf)) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &buf.filled()[before..];
            // Bytes read while no request is in flight start a new head.
            let new_head = this.activity.idle.load(Ordering::Acquire);
            this.activity.on_read(read);
            // Undecided (a prefix of the HTTP/2 preface) is scanned as
            // HTTP/1 until decided.
            if this.activity.proto.load(Ordering::Relaxed) != PROTO_H2 {
                if new_head {
                    this.head.get_or_insert_with(Scan::new);
                }
                if let Some(scan) = &mut this.head
                    && let Fed::Ended(verdict) = scan.feed(read)
                {
                    this.activity.head_ended(verdict, scan.request_line());
                    this.head = None;
                }
            } else {
                this.head = None;
            }
        }
        polled
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its connection busy until it ends, and fails
/// when the upstream makes it wait longer than `idle` for the next frame.
/// Time the client takes to read is not counted: the timer runs only while
/// the body itself is pending.
///
/// Dropped before its end (the app went away mid-response), an upstream
/// body with at most [`DRAIN_MAX`] bytes left is read to its end in the
/// background, so its pooled connection is reused instead of closed and
/// re-opened with a new TLS handshake (what nginx's
/// `proxy_ignore_client_abort` buys).
pub struct Tracked {
    inner: proxy::Body,
    busy: Option<BusyGuard>,
    idle: Duration,
    /// Armed at the first pending poll after a frame; made on first need,
    /// so bodies that never wait (the proxy's own answers) cost no timer.
    stall: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    ended: bool,
    /// Whether an abandoned rest is worth reading out (HTTP/1.1 upstream).
    drain: bool,
}

/// Largest remainder of an abandoned upstream body worth reading to keep
/// its connection, and how long that may take.
pub const DRAIN_MAX: u64 = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// Drains at once, process-wide; beyond it an abandoned body just closes
/// its connection, as before.
static DRAINS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(64);
impl Tracked {
    fn new(inner: proxy::Body, busy: BusyGuard, idle: Duration, drain: bool) -> Self {
        Self {
            inner,
            busy: Some(busy),
            idle,
            stall: None,
            waiting: false,
            ended: false,
            drain,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.drain || self.ended || self.inner.is_end_stream() {
            return;
        }
        let http_body_util::Either::Left(upstream) = &self.inner else {
            return;
        };
        if upstream.size_hint().upper().is_none_or(|n| n > DRAIN_MAX) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(slot) = DRAINS.try_acquire() else {
            return;
        };
        let body = std::mem::replace(
            &mut self.inner,
            http_body_util::Either::Right(http_body_util::Full::new(Bytes::new())),
        );
        runtime.spawn(async move {
            let _slot = slot;
            use http_body_util::BodyExt;
            let mut body = body;
            let discard = async {
                // Frames are dropped as they come: nothing is held.
                while let Some(Ok(_)) = body.frame().await {}
            };
            let _ = tokio::time::timeout(DRAIN_TIME, discard).await;
        });
    }
}

/// The error a stalled response body ends with.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response body made no progress within upstream.body_idle_timeout ({0:?})")]
pub struct BodyStalled(Duration);

impl Body for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.busy = None;
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.busy = None;
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let deadline = Instant::now() + this.idle;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.waiting {
                    this.waiting = true;
                    stall.as_mut().reset(deadline);
                }
                if stall.as_mut().poll(cx).is_ready() {
                    this.busy = None;
                    this.ended = true;
                    tracing::debug!(idle = ?this.idle, "response body stalled; cutting it off");
                    return Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_secs(30);

    async fn expires_within(
        a: &Activity,
        header: Duration,
        idle: Duration,
    ) -> Option<&'static str> {
        tokio::time::timeout(Duration::from_millis(500), a.expired(header, idle))
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_fresh_connection_has_the_header_bound() {
        let a = Activity::new();
        assert_eq!(
            expires_within(&a, SHORT, LONG).await,
            Some("proxy.header_read_timeout")
        );
    }

    #[tokio::test]
    async fn busy_connections_never_expire_and_idle_ones_do() {
        let a = Arc::new(Activity::new());
        let busy = a.busy();
        assert_eq!(expires_within(&a, SHORT, SHORT).await, None);
        drop(busy);
        // Waiting for the next request is idle time, not header time.
        assert_eq!(
            expires_within(&a, SHORT, Duration::from_millis(100)).await,
            Some("proxy.idle_timeout")
        );
        // The first byte of a new head starts the header bound.
        a.on_read(b"G");
        assert_eq!(
            expires_within(&a, SHORT, LONG).await,
            Some("proxy.header_read_timeout")
        );
    }

    /// Starts the watcher (header bound 50 ms, idle 100 ms), makes `change`
    /// after `at` (the watcher must not have fired), and returns why and
    /// when it then fired.
    async fn expiry_with_change_at(
        a: &Activity,
        at: Duration,
        change: impl FnOnce(),
    ) -> (&'static str, Duration) {
        let start = Instant::now();
        let watcher = a.expired(Duration::from_millis(50), Duration::from_millis(100));
        tokio::pin!(watcher);
        tokio::select! {
            why = &mut watcher => panic!("expired before the change: {why}"),
            _ = tokio::time::sleep(at) => {}
        }
        change();
        (watcher.await, start.elapsed())
    }

    /// Phase changes do not wake the watcher; a change while it sleeps is
    /// still held to its own bound, neither early nor late.
    #[tokio::test(start_paused = true)]
    async fn a_phase_that_begins_while_the_watcher_sleeps_keeps_its_bound() {
        // Idle from the start (idle deadline at 100 ms); at 30 ms the first
        // byte of a head arrives: the header bound ends at 80 ms.
        let a = Arc::new(Activity::new());
        drop(a.busy());
        assert_eq!(
            expiry_with_change_at(&a, Duration::from_millis(30), || a.on_read(b"G")).await,
            ("proxy.header_read_timeout", Duration::from_millis(80))
        );
        // Busy, then idle at 40 ms: the idle bound ends at 140 ms.
        let b = Arc::new(Activity::new());
        let busy = b.busy();
        assert_eq!(
            expiry_with_change_at(&b, Duration::from_millis(40), || drop(busy)).await,
            ("proxy.idle_timeout", Duration::from_millis(140))
        );
    }

    #[tokio::test]
    async fn http2_frames_between_streams_are_not_a_head() {
        let a = Arc::new(Activity::new());
        // The preface may come in pieces.
        a.on_read(&H2_PREFACE[..10]);
        a.on_read(&H2_PREFACE[10..]);
        drop(a.busy());
        a.on_read(b"\x00\x00\x08\x06");
        assert_eq!(
            expires_within(&a, SHORT, Duration::from_millis(100)).await,
            Some("proxy.idle_timeout")
        );
    }

    #[test]
    fn a_first_read_of_p_is_not_yet_http2() {
        let a = Activity::new();
        a.on_read(b"P");
        assert_eq!(a.proto.load(Ordering::Relaxed), PROTO_UNKNOWN);
        a.on_read(b"OST / HTTP/1.1\r\n");
        assert_eq!(a.proto.load(Ordering::Relaxed), PROTO_H1);
        let b = Activity::new();
        b.on_read(b"PRI * HTTP/2.0\r\n");
        assert_eq!(b.proto.load(Ordering::Relaxed), PROTO_UNKNOWN);
        b.on_read(b"\r\nSM\r\n\r\n\x00\x00");
        assert_eq!(b.proto.load(Ordering::Relaxed), PROTO_H2);
    }

    /// A client socket and the proxy's side of it, wrapped as served.
    async fn tracked_pair() -> (TcpStream, TrackedIo) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let io = TrackedIo {
            inner: server,
            activity: Arc::new(Activity::new()),
            head: Some(Scan::new()),
            sniff: false,
        };
        (client, io)
    }

    /// Sends `bytes` and reads exactly them on the proxy's side.
    async fn pass(client: &mut TcpStream, io: &mut TrackedIo, bytes: &[u8]) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(bytes).await.unwrap();
        let mut buf = vec![0u8; bytes.len()];
        io.read_exact(&mut buf).await.unwrap();
    }

    /// Reads once into a buffer of `len` bytes, as hyper-util's sniff does
    /// with the preface's length.
    async fn read_once(io: &mut TrackedIo, len: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; len];
        let n = io.read(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    }

    #[tokio::test]
    async fn the_sniff_of_an_http1_connection_reads_nothing() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut io) = tracked_pair().await;
        io.sniff = true;
        let head = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(head).await.unwrap();
        assert_eq!(read_once(&mut io, H2_PREFACE.len()).await, b"");
        // The head is read whole afterwards, and checked.
        assert_eq!(read_once(&mut io, 8192).await, head);
        assert_eq!(io.activity.proto.load(Ordering::Relaxed), PROTO_H1);
        assert!(io.head.is_none());
    }

    #[tokio::test]
    async fn the_sniff_reads_http2_and_a_lone_p() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut io) = tracked_pair().await;
        io.sniff = true;
        client.write_all(H2_PREFACE).await.unwrap();
        assert_eq!(read_once(&mut io, H2_PREFACE.len()).await, H2_PREFACE);
        let (mut client, mut io) = tracked_pair().await;
        io.sniff = true;
        client.write_all(b"P").await.unwrap();
        assert_eq!(read_once(&mut io, H2_PREFACE.len()).await, b"P");
        // Only the first read is the sniff.
        client.write_all(b"OST / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(
            read_once(&mut io, H2_PREFACE.len()).await,
            b"OST / HTTP/1.1\r\n"
        );
    }

    #[tokio::test]
    async fn a_split_p_does_not_turn_off_the_head_check() {
        let (mut client, mut io) = tracked_pair().await;
        pass(&mut client, &mut io, b"P").await;
        pass(
            &mut client,
            &mut io,
            b"OST /x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await;
        assert_eq!(
            io.activity.take_refusal("POST", "/x"),
            Some(Refusal::ContentLengthWithTransferEncoding)
        );
    }

    /// Body bytes read after an early answer (hyper reading the rest of a
    /// request body while the connection is idle) can look like a head;
    /// their verdict must not land on the next request.
    #[tokio::test]
    async fn body_bytes_read_while_idle_do_not_refuse_the_next_request() {
        let (mut client, mut io) = tracked_pair().await;
        pass(
            &mut client,
            &mut io,
            b"POST /a HTTP/1.1\r\nContent-Length: 9\r\n\r\n",
        )
        .await;
        drop(io.activity.busy());
        // The body's bare LFs run into the next head.
        pass(&mut client, &mut io, b"{\n\"a\":1}").await;
        pass(
            &mut client,
            &mut io,
            b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await;
        let busy = io.activity.busy();
        assert_eq!(io.activity.take_refusal("GET", "/next"), None);
        drop(busy);
        // A body that ends a "head" of its own, then a clean head.
        pass(&mut client, &mut io, b"x\n\n").await;
        pass(&mut client, &mut io, b"GET /again HTTP/1.1\r\n\r\n").await;
        assert_eq!(io.activity.take_refusal("GET", "/again"), None);
    }

    #[tokio::test]
    async fn the_http2_preface_starts_the_idle_bound() {
        let a = Activity::new();
        a.on_read(H2_PREFACE);
        assert_eq!(
            expires_within(&a, SHORT, Duration::from_millis(100)).await,
            Some("proxy.idle_timeout")
        );
    }

    #[tokio::test]
    async fn a_tunnel_stays_busy() {
        let a = Arc::new(Activity::new());
        let busy = a.busy();
        a.tunnel();
        drop(busy);
        assert_eq!(expires_within(&a, SHORT, SHORT).await, None);
    }
}
