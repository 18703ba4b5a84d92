//! The admin listener, apart from the data plane: `/metrics` (Prometheus
//! text), `/healthz` (200 while serving), `/readyz` (a latch: 503 until
//! every profile in use has held a valid token once, then 200 for good, so
//! a token-endpoint blip never takes the app's pod out of its Service).
//! Nothing here shows a token or a secret.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::token::Store;

/// Time for a request head on the admin listener; scrapers and probes send
/// theirs at once.
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent admin connections; more are closed on accept.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Readiness: the stores of the profiles in use, and the latch.
#[derive(Default)]
pub struct Status {
    stores: ArcSwap<Vec<Arc<Store>>>,
    /// False until the first config's stores are set: the admin listener
    /// is up before them, and "no profiles yet" must not read as ready.
    configured: AtomicBool,
    latched: AtomicBool,
}

impl Status {
    /// The profiles in use now (after start or a reload).
    pub fn set_stores(&self, stores: Vec<Arc<Store>>) {
        self.stores.store(Arc::new(stores));
        self.configured.store(true, Ordering::Release);
    }

    /// True once every profile in use has held a valid token, and from then
    /// on for good.
    pub fn ready(&self) -> bool {
        if self.latched.load(Ordering::Acquire) {
            return true;
        }
        if !self.configured.load(Ordering::Acquire) {
            return false;
        }
        let all = self.stores.load().iter().all(|s| s.ever_valid());
        if all {
            self.latched.store(true, Ordering::Release);
        }
        all
    }

    /// The `/readyz` body: each profile's state, when its token is valid
    /// until, and its last error. Never a token.
    pub fn json(&self) -> String {
        let ready = self.ready();
        let mut profiles = serde_json::Map::new();
        for store in self.stores.load().iter() {
            let token = store.peek();
            let usable = store.current().is_some();
            let state = match (&token, usable) {
                (_, true) => "valid",
                (Some(_), false) => "expired",
                (None, _) if store.ever_valid() => "expired",
                (None, _) => "pending",
            };
            // A static credential has no expiry to show.
            let until = token
                .as_ref()
                .filter(|t| !t.is_permanent())
                .map(|t| t.expires_unix());
            let mut p = serde_json::Map::new();
            p.insert("state".into(), state.into());
            p.insert(
                "valid_until".into(),
                until
                    .map(|u| humantime::format_rfc3339_seconds(u).to_string().into())
                    .unwrap_or(serde_json::Value::Null),
            );
            p.insert(
                "valid_until_unix".into(),
                until
                    .and_then(|u| u.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs().into())
                    .unwrap_or(serde_json::Value::Null),
            );
            p.insert(
                "failing_since".into(),
                store
                    .failing_since()
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string().into())
                    .unwrap_or(serde_json::Value::Null),
            );
            p.insert(
                "last_error".into(),
                store
                    .last_error()
                    .map(Into::into)
                    .unwrap_or(serde_json::Value::Null),
            );
            profiles.insert(store.profile().to_string(), p.into());
        }
        serde_json::json!({ "ready": ready, "profiles": profiles }).to_string()
    }
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    // HTTP/1 only: probes and scrapers speak it, and hyper's head timer then
    // runs from the start of each connection, so a silent one is closed.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT);
    let open = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Beyond the cap: close at once rather than queue.
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let metrics = Arc::clone(&metrics);
        let status = Arc::clone(&status);
        let service = service_fn(move |req| {
            let response = respond(&req, &metrics, &status);
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = conn.await;
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics, status: &Status) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let code = if status.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(code, "application/json", status.json())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_before_the_first_config_nor_while_a_profile_is_pending() {
        let status = Status::default();
        assert!(!status.ready(), "no stores set yet is not ready");
        let store = Arc::new(Store::new("billing", Duration::from_secs(1)));
        status.set_stores(vec![Arc::clone(&store)]);
        assert!(!status.ready(), "a profile without a token is not ready");
        let json: serde_json::Value = serde_json::from_str(&status.json()).unwrap();
        assert_eq!(json["profiles"]["billing"]["state"], "pending");
        let empty = Status::default();
        empty.set_stores(Vec::new());
        assert!(empty.ready(), "a config without profiles in use is ready");
    }
}
