//! token-injector: an egress sidecar that injects cached, proactively renewed
//! OAuth 2.0 client-credentials tokens into an app's plain-HTTP requests and
//! forwards them over TLS.
//!
//! Modules by responsibility:
//! - [`config`]: TOML + environment → validated, typed [`config::Config`];
//! - [`secret`]: secret values that never print, and where they come from;
//! - [`route`]: host → route lookup, pure;
//! - [`token`]: per-profile token client, store and refresh task;
//! - [`proxy`]: the request path and its upstream pools;
//! - [`serve`]: accept loops and graceful shutdown;
//! - [`tls`]: trust roots and rustls client settings.
//!
//! [`start`] builds everything from a config and returns a [`Running`]
//! handle; `main.rs` and the end-to-end tests both use it.

pub mod config;
pub mod proxy;
pub mod route;
pub mod secret;
pub mod serve;
pub mod tls;
pub mod token;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use config::Config;

/// Why the proxy could not start. Token endpoints being down is not one of
/// them: the proxy starts and answers 503 until tokens arrive.
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
}

/// A running proxy. Dropping it without [`Running::shutdown`] aborts the
/// background tasks.
pub struct Running {
    proxy_addr: SocketAddr,
    route_addrs: Vec<(String, SocketAddr)>,
    stores: BTreeMap<String, Arc<token::Store>>,
    shutdown: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    refreshers: Vec<JoinHandle<()>>,
}

/// Binds every listener, starts one refresh task per profile in use and the
/// accept loops. Returns once all listeners are bound.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let policy = token::Policy::try_new(&config.tokens).map_err(StartError::Policy)?;
    let mut stores = BTreeMap::new();
    let mut refreshers = Vec::new();
    for profile in config.profiles_in_use() {
        let store = Arc::new(token::Store::new(
            &profile.name,
            config.tokens.unauthorized_refresh_interval,
        ));
        let client = Arc::new(token::Client::new(
            profile,
            config.tokens.request_timeout,
            policy.default_lifetime(),
        )?);
        refreshers.push(tokio::spawn(token::refresh::run(
            Arc::clone(&store),
            client,
            policy.clone(),
        )));
        stores.insert(profile.name.clone(), store);
    }

    let mut pools = proxy::upstream::Pools::default();
    let mut routes = Vec::with_capacity(config.routes.len());
    for (i, r) in config.routes.iter().enumerate() {
        let client = pools
            .get(r.ca_file.as_ref(), r.protocol, &config.upstream)
            .map_err(|source| StartError::Tls {
                key: format!("routes[{i}].ca_file"),
                source,
            })?;
        let store = Arc::clone(&stores[&r.profile]);
        routes.push(proxy::Route::new(
            r.label.clone(),
            &r.upstream,
            store,
            client,
        ));
    }
    let passthrough = pools
        .get(None, config::UpstreamProtocol::Auto, &config.upstream)
        .map_err(|source| StartError::Tls {
            key: "proxy".into(),
            source,
        })?;
    let table = route::Table::new(config.routes.iter().map(|r| &r.host));
    let settings = proxy::Settings {
        unmatched: config.proxy.unmatched,
        response_timeout: config.upstream.response_timeout,
        // A fetch under way ends within the request timeout; allow a little more.
        token_wait: config.tokens.request_timeout + Duration::from_millis(500),
        replay_buffer: config.upstream.replay_buffer,
    };
    let proxy = Arc::new(proxy::Proxy::new(routes, table, settings, passthrough));

    let (shutdown, _) = watch::channel(false);
    let drain = config.proxy.drain_timeout;
    let mut listeners = Vec::new();
    let bind = |key: String, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { key, addr, source })
    };
    let listener = bind("proxy.listen".into(), config.proxy.listen).await?;
    let proxy_addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let mut bound = vec![(listener, proxy::Entry::Forward)];
    let mut route_addrs = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        if let Some(addr) = r.listen {
            let listener = bind(format!("routes[{i}].listen"), addr).await?;
            route_addrs.push((
                r.label.clone(),
                listener
                    .local_addr()
                    .expect("bound listener has an address"),
            ));
            bound.push((listener, proxy::Entry::Route(i)));
        }
    }
    for (listener, entry) in bound {
        listeners.push(tokio::spawn(serve::accept_loop(
            listener,
            Arc::clone(&proxy),
            entry,
            shutdown.subscribe(),
            drain,
        )));
    }
    tracing::info!(
        %proxy_addr,
        routes = config.routes.len(),
        profiles = stores.len(),
        "token-injector listening"
    );
    Ok(Running {
        proxy_addr,
        route_addrs,
        stores,
        shutdown,
        listeners,
        refreshers,
    })
}

impl Running {
    /// The bound address of `proxy.listen` (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The bound address of the dedicated listener of the route with `host`.
    pub fn route_addr(&self, host: &str) -> Option<SocketAddr> {
        self.route_addrs
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, a)| *a)
    }

    /// The token store of a profile in use.
    pub fn store(&self, profile: &str) -> Option<&Arc<token::Store>> {
        self.stores.get(profile)
    }

    /// Stops accepting, waits for in-flight requests (each listener bounded
    /// by `proxy.drain_timeout`), then stops the refresh tasks.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for l in self.listeners.drain(..) {
            let _ = l.await;
        }
        for r in self.refreshers.drain(..) {
            r.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for task in self.listeners.iter().chain(&self.refreshers) {
            task.abort();
        }
    }
}
