//! The running proxy, assembled from a config: each subsystem builds its own
//! part ([`profiles`], [`proxy::Proxy::build`], [`listeners`]), first
//! beside what runs (anything that can fail, so a bad reload changes
//! nothing), then swapped in.
//!
//! [`start`] builds everything from a config and returns a [`Running`]
//! handle; `main.rs` and the end-to-end tests both use it. [`Running::apply`]
//! swaps in a new config: listeners and routes follow it, and profiles whose
//! settings did not change keep their tokens.

mod listeners;
// Public for the fleet benchmark's driver (examples/fleet.rs), which runs
// many replicas' token sides without their listeners.
pub mod profiles;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::{admin, proxy, secret, serve, tls, token};
use profiles::Profiles;

use listeners::Listeners;

/// Why a config could not be started or applied. Token endpoints being
/// down is not one of them: the proxy starts and answers 503 until tokens
/// arrive.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{key}: {source}")]
    Tls { key: String, source: tls::Error },
    #[error(transparent)]
    TokenClient(#[from] token::client::BuildError),
    #[error("tokens: {0}")]
    Policy(String),
    #[error(transparent)]
    Cache(#[from] crate::cache::BuildError),
    #[error("{0}")]
    Dpop(String),
}

impl From<profiles::Error> for StartError {
    fn from(e: profiles::Error) -> Self {
        match e {
            profiles::Error::Client(e) => StartError::TokenClient(e),
            profiles::Error::Policy(p) => StartError::Policy(p),
            profiles::Error::Cache(e) => StartError::Cache(e),
            e @ profiles::Error::Dpop(..) => StartError::Dpop(e.to_string()),
        }
    }
}

impl From<proxy::build::Error> for StartError {
    fn from(e: proxy::build::Error) -> Self {
        StartError::Tls {
            key: e.key,
            source: e.source,
        }
    }
}

/// What the running proxy is made of; changed only under the mutex, by
/// start, apply and shutdown, never on the request path.
struct State {
    config: Option<Config>,
    profiles: Profiles,
    listeners: Listeners,
}

/// Everything a config needs that can fail, built before anything changes.
struct Prepared {
    tokens: profiles::Prepared,
    proxy: proxy::Proxy,
    bound: listeners::Bound,
}

impl State {
    /// Builds `config` beside what runs now, reusing unchanged profiles.
    fn prepare(&self, config: &Config, metrics: &Metrics) -> Result<Prepared, StartError> {
        let tokens = self
            .profiles
            .prepare(config, &metrics.tokens, &metrics.cache)?;
        let proxy = proxy::Proxy::build(config, tokens.stores(), &metrics.proxy, &metrics.tokens)?;
        let bound = self.listeners.prepare(config)?;
        Ok(Prepared {
            tokens,
            proxy,
            bound,
        })
    }
}

/// A running proxy. Dropping it without [`Running::shutdown`] aborts the
/// background tasks.
pub struct Running {
    proxy: Arc<ArcSwap<proxy::Proxy>>,
    /// Client-connection limits and count, shared by all proxy listeners.
    connections: Arc<serve::Connections>,
    metrics: Arc<Metrics>,
    status: Arc<admin::Status>,
    state: Mutex<State>,
    admin_addr: SocketAddr,
    admin_stop: watch::Sender<bool>,
    admin_task: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent data: keep going.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds every listener, starts one refresh task per profile in use, the
/// accept loops and the admin listener. Returns once all are bound.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(admin::Status::default());
    let admin_listener =
        TcpListener::from_std(listeners::bind("admin.listen".into(), config.admin.listen)?)
            .map_err(|source| StartError::Bind {
                key: "admin.listen".into(),
                addr: config.admin.listen,
                source,
            })?;
    let admin_addr = admin_listener
        .local_addr()
        .expect("bound listener has an address");
    let state = State {
        config: None,
        profiles: Profiles::default(),
        listeners: Listeners::default(),
    };
    let prepared = state.prepare(&config, &metrics)?;
    let (admin_stop, admin_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&metrics),
        Arc::clone(&status),
        admin_rx,
    ));
    let connections = Arc::new(serve::Connections::new(
        serve::Limits::new(&config),
        metrics.proxy.open_connections.clone(),
        metrics.proxy.refused_connections.clone(),
    ));
    let Prepared {
        tokens,
        proxy,
        bound,
    } = prepared;
    let running = Running {
        proxy: Arc::new(ArcSwap::from_pointee(proxy)),
        connections,
        metrics,
        status,
        state: Mutex::new(state),
        admin_addr,
        admin_stop,
        admin_task: Some(admin_task),
    };
    // The proxy was seeded above; the rest goes in as at a reload.
    running.commit(config, tokens, None, bound);
    tracing::info!(
        proxy_addr = %running.proxy_addr(),
        admin_addr = %running.admin_addr,
        "token-injector listening"
    );
    Ok(running)
}

impl Running {
    /// Applies a new, already validated config: binds new listeners, swaps
    /// routes atomically, restarts only the profiles whose settings
    /// changed, and lets removed listeners drain. On error nothing changed.
    pub fn apply(&self, config: Config) -> Result<(), StartError> {
        let prepared = lock(&self.state).prepare(&config, &self.metrics)?;
        self.commit(
            config,
            prepared.tokens,
            Some(prepared.proxy),
            prepared.bound,
        );
        Ok(())
    }

    fn commit(
        &self,
        config: Config,
        tokens: profiles::Prepared,
        proxy: Option<proxy::Proxy>,
        bound: listeners::Bound,
    ) {
        // At start and at every reload: secret files others may read.
        secret::warn_exposed(&config.secret_files());
        let mut state = lock(&self.state);
        let stores = state
            .profiles
            .commit(tokens, &self.metrics.tokens, &self.metrics.cache);
        if let Some(proxy) = proxy {
            self.proxy.store(Arc::new(proxy));
        }
        // Upstream handshakes overlap the token fetches just started.
        self.proxy.load().preconnect();
        // New limits apply to connections accepted from now on.
        self.connections.set_limits(serve::Limits::new(&config));
        self.status.set_stores(stores);
        state
            .listeners
            .commit(&config, bound, &self.proxy, &self.connections);
        if let Some(old) = &state.config {
            for r in &old.routes {
                if !config.routes.iter().any(|n| n.label == r.label) {
                    self.metrics.proxy.forget(&r.label);
                }
            }
        }
        state.config = Some(config);
    }

    /// The bound address of `proxy.listen` (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        lock(&self.state)
            .listeners
            .forward_addr()
            .expect("the forward listener always exists")
    }

    /// The config running now.
    pub fn config(&self) -> Option<Config> {
        lock(&self.state).config.clone()
    }

    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound address of the dedicated listener of the route with `host`.
    pub fn route_addr(&self, host: &str) -> Option<SocketAddr> {
        lock(&self.state).listeners.route_addr(host)
    }

    /// The token store of a profile in use.
    pub fn store(&self, profile: &str) -> Option<Arc<token::Store>> {
        lock(&self.state).profiles.store(profile)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, waits for in-flight requests (each listener bounded
    /// by `proxy.drain_timeout`), then stops the refresh tasks.
    pub async fn shutdown(mut self) {
        let tasks = lock(&self.state).listeners.stop_all();
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.admin_stop.send(true);
        if let Some(t) = self.admin_task.take() {
            let _ = t.await;
        }
        lock(&self.state).profiles.abort_all();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.admin_stop.send(true);
        if let Some(t) = &self.admin_task {
            t.abort();
        }
        // The listeners and profiles abort their tasks as they drop.
    }
}
