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
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz` on their own listener;
//! - [`metrics`]: the registry and its per-subsystem metrics;
//! - [`reload`]: config file watching and SIGHUP;
//! - [`tls`]: trust roots and rustls client settings.
//!
//! [`start`] builds everything from a config and returns a [`Running`]
//! handle; `main.rs` and the end-to-end tests both use it. [`Running::apply`]
//! swaps in a new config: listeners and routes follow it, and profiles whose
//! settings did not change keep their tokens.

pub mod admin;
pub mod config;
pub mod demo;
pub mod head;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod secret;
pub mod serve;
pub mod tls;
pub mod token;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use config::Config;
use metrics::Metrics;

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
}

/// A listener, by what it is for and the address configured for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ListenerKey {
    Forward(SocketAddr),
    Dedicated(String, SocketAddr),
}

impl ListenerKey {
    fn addr(&self) -> SocketAddr {
        match self {
            ListenerKey::Forward(a) | ListenerKey::Dedicated(_, a) => *a,
        }
    }
}

struct ListenerRuntime {
    bound: SocketAddr,
    /// A duplicate of the listening socket, so that a reload which gives
    /// this address another role hands the socket over instead of binding
    /// the address a second time.
    socket: std::net::TcpListener,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct ProfileRuntime {
    /// The settings the store was built from: equal settings keep the token.
    settings: ProfileSettings,
    store: Arc<token::Store>,
    task: JoinHandle<()>,
}

/// What a profile's credential depends on.
#[derive(Debug, Clone, PartialEq)]
enum ProfileSettings {
    Grant(Box<(config::Profile, config::Tokens)>),
    Static(config::Static),
}

/// How a (re)started profile gets its credential.
enum Obtain {
    Grant(Arc<token::Client>),
    Static(std::path::PathBuf),
}

/// What the running proxy is made of; changed only under the mutex, by
/// start, apply and shutdown, never on the request path.
struct State {
    config: Option<Config>,
    profiles: HashMap<String, ProfileRuntime>,
    listeners: HashMap<ListenerKey, ListenerRuntime>,
    /// Listeners removed by a reload, still draining.
    draining: Vec<JoinHandle<()>>,
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

/// Everything a config needs that can fail, built before anything changes.
struct Prepared {
    policy: token::Policy,
    /// Profiles to (re)start: name, settings, store, and how.
    start: Vec<(String, ProfileSettings, Arc<token::Store>, Obtain)>,
    stores: BTreeMap<String, Arc<token::Store>>,
    /// Taken by `start` to seed the swap; else swapped in by `commit`.
    proxy: Option<proxy::Proxy>,
    bind: Vec<(ListenerKey, std::net::TcpListener)>,
}

fn bind(key: String, addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind {
        key: key.clone(),
        addr,
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| StartError::Bind { key, addr, source })?;
    Ok(l)
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves consistent data: keep going.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn listener_keys(config: &Config) -> Vec<(ListenerKey, String)> {
        let mut keys = vec![(
            ListenerKey::Forward(config.proxy.listen),
            "proxy.listen".to_owned(),
        )];
        for (i, r) in config.routes.iter().enumerate() {
            if let Some(addr) = r.listen {
                keys.push((
                    ListenerKey::Dedicated(r.label.clone(), addr),
                    format!("routes[{i}].listen"),
                ));
            }
        }
        keys
    }

    /// Builds `config` beside what runs now, reusing unchanged profiles.
    fn prepare(&self, config: &Config, metrics: &Metrics) -> Result<Prepared, StartError> {
        let policy = token::Policy::try_new(&config.tokens).map_err(StartError::Policy)?;
        let mut start = Vec::new();
        let mut stores = BTreeMap::new();
        let mut token_http = token::client::HttpClients::new(config.tokens.request_timeout);
        let wanted = config
            .profiles_in_use()
            .map(|p| ProfileSettings::Grant(Box::new((p.clone(), config.tokens.clone()))))
            .chain(
                config
                    .statics_in_use()
                    .cloned()
                    .map(ProfileSettings::Static),
            );
        for settings in wanted {
            let name = match &settings {
                ProfileSettings::Grant(g) => g.0.name.clone(),
                ProfileSettings::Static(s) => s.name.clone(),
            };
            let kept = self.profiles.get(&name).filter(|p| p.settings == settings);
            let store = match kept {
                Some(p) => Arc::clone(&p.store),
                None => {
                    let store = Arc::new(
                        token::Store::new(&name, config.tokens.unauthorized_refresh_interval)
                            .with_coalesced_counter(metrics.tokens.profile(&name).coalesced),
                    );
                    let obtain = match &settings {
                        ProfileSettings::Grant(g) => Obtain::Grant(Arc::new(token::Client::new(
                            &g.0,
                            &mut token_http,
                            policy.default_lifetime(),
                        )?)),
                        ProfileSettings::Static(s) => Obtain::Static(s.credential_file.clone()),
                    };
                    start.push((name.clone(), settings, Arc::clone(&store), obtain));
                    store
                }
            };
            stores.insert(name, store);
        }

        let mut pools = proxy::upstream::Pools::default();
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let client = pools
                .get(
                    r.ca_file.as_ref(),
                    r.protocol,
                    r.client_cert.as_ref(),
                    &config.upstream,
                )
                .map_err(|e| StartError::Tls {
                    key: format!("routes[{i}].{}", e.key()),
                    source: e.into_tls(),
                })?;
            // Upgrades (WebSocket) exist only in HTTP/1.1: a pool that
            // speaks HTTP/1.1 alone, with the route's trust and identity.
            let upgrade_client = match r.protocol {
                config::UpstreamProtocol::Http1 => client.clone(),
                _ => pools
                    .get(
                        r.ca_file.as_ref(),
                        config::UpstreamProtocol::Http1,
                        r.client_cert.as_ref(),
                        &config.upstream,
                    )
                    .map_err(|e| StartError::Tls {
                        key: format!("routes[{i}].{}", e.key()),
                        source: e.into_tls(),
                    })?,
            };
            routes.push(
                proxy::Route::new(
                    r.label.clone(),
                    &r.upstream,
                    Arc::clone(&stores[&r.profile]),
                    client,
                    metrics.proxy.route(&r.label),
                )
                .with_authorize(proxy::authorize::Header::new(r.header.clone(), &r.prefix))
                .with_upgrade_client(upgrade_client)
                .with_protocol(r.protocol),
            );
        }
        let passthrough = pools
            .get(None, config::UpstreamProtocol::Auto, None, &config.upstream)
            .map_err(|e| StartError::Tls {
                key: "proxy".into(),
                source: e.into_tls(),
            })?;
        let settings = proxy::Settings {
            unmatched: config.proxy.unmatched,
            response_timeout: config.upstream.response_timeout,
            // A fetch under way ends within the request timeout; allow a little more.
            token_wait: config.tokens.request_timeout + Duration::from_millis(500),
            replay_buffer: config.upstream.replay_buffer,
        };
        let table = route::Table::new(config.routes.iter().map(|r| &r.host));
        let proxy = proxy::Proxy::new(
            routes,
            table,
            settings,
            passthrough,
            metrics.proxy.route("-"),
        )
        .with_tunnels(proxy::tunnel::Tunnels::new(
            config,
            metrics.proxy.tunnels.clone(),
        ));

        let mut bound = Vec::new();
        for (key, name) in Self::listener_keys(config) {
            if self.listeners.contains_key(&key) {
                continue;
            }
            let addr = key.addr();
            // The same fixed address in another role (a renamed route, ports
            // swapped): take over the open socket; binding again would fail.
            let held = (addr.port() != 0)
                .then(|| self.listeners.iter().find(|(k, _)| k.addr() == addr))
                .flatten();
            let socket = match held {
                Some((_, l)) => l.socket.try_clone().map_err(|source| StartError::Bind {
                    key: name,
                    addr,
                    source,
                })?,
                None => bind(name, addr)?,
            };
            bound.push((key, socket));
        }
        Ok(Prepared {
            policy,
            start,
            stores,
            proxy: Some(proxy),
            bind: bound,
        })
    }
}

/// Binds every listener, starts one refresh task per profile in use, the
/// accept loops and the admin listener. Returns once all are bound.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(admin::Status::default());
    let admin_listener = TcpListener::from_std(bind("admin.listen".into(), config.admin.listen)?)
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
        profiles: HashMap::new(),
        listeners: HashMap::new(),
        draining: Vec::new(),
    };
    let mut prepared = state.prepare(&config, &metrics)?;
    let proxy = prepared.proxy.take().expect("prepare builds a proxy");
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
    running.commit(config, prepared);
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
        self.commit(config, prepared);
        Ok(())
    }

    fn commit(&self, config: Config, prepared: Prepared) {
        // At start and at every reload: secret files others may read.
        secret::warn_exposed_files(&config);
        let mut state = lock(&self.state);
        // Profiles no longer in use, or rebuilt: stop their refresh tasks.
        let removed: Vec<String> = state
            .profiles
            .keys()
            .filter(|name| {
                !prepared.stores.contains_key(*name)
                    || prepared.start.iter().any(|(n, _, _, _)| n == *name)
            })
            .cloned()
            .collect();
        for name in removed {
            if let Some(p) = state.profiles.remove(&name) {
                p.task.abort();
                if !prepared.stores.contains_key(&name) {
                    self.metrics.tokens.forget(&name);
                }
            }
        }
        for (name, settings, store, obtain) in prepared.start {
            let metrics = self.metrics.tokens.profile(&name);
            let task = match obtain {
                Obtain::Grant(client) => tokio::spawn(token::refresh::run(
                    Arc::clone(&store),
                    client,
                    prepared.policy.clone(),
                    metrics,
                )),
                Obtain::Static(path) => tokio::spawn(token::static_credential::run(
                    Arc::clone(&store),
                    path,
                    metrics,
                )),
            };
            state.profiles.insert(
                name,
                ProfileRuntime {
                    settings,
                    store,
                    task,
                },
            );
        }
        if let Some(proxy) = prepared.proxy {
            self.proxy.store(Arc::new(proxy));
        }
        // New limits apply to connections accepted from now on.
        self.connections.set_limits(serve::Limits::new(&config));
        self.status
            .set_stores(prepared.stores.into_values().collect());

        let wanted: Vec<ListenerKey> = State::listener_keys(&config)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let stale: Vec<ListenerKey> = state
            .listeners
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        state.draining.retain(|t| !t.is_finished());
        for key in stale {
            if let Some(l) = state.listeners.remove(&key) {
                let handed_over = prepared
                    .bind
                    .iter()
                    .any(|(k, _)| k.addr() == key.addr() && key.addr().port() != 0);
                if handed_over {
                    tracing::info!(addr = %l.bound, "listener takes a new role from the config");
                } else {
                    tracing::info!(addr = %l.bound, "closing listener removed from the config");
                }
                let _ = l.stop.send(true);
                state.draining.push(l.task);
            }
        }
        for (key, std_listener) in prepared.bind {
            let socket = match std_listener.try_clone() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register listener");
                    continue;
                }
            };
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register listener");
                    continue;
                }
            };
            let bound = listener
                .local_addr()
                .expect("bound listener has an address");
            let entry = match &key {
                ListenerKey::Forward(_) => proxy::Entry::Forward,
                ListenerKey::Dedicated(label, _) => {
                    proxy::Entry::Dedicated(Arc::from(label.as_str()))
                }
            };
            let (stop, rx) = watch::channel(false);
            let task = tokio::spawn(serve::accept_loop(
                listener,
                Arc::clone(&self.proxy),
                entry,
                rx,
                config.proxy.drain_timeout,
                Arc::clone(&self.connections),
            ));
            state.listeners.insert(
                key,
                ListenerRuntime {
                    bound,
                    socket,
                    stop,
                    task,
                },
            );
        }
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
            .iter()
            .find(|(k, _)| matches!(k, ListenerKey::Forward(_)))
            .map(|(_, l)| l.bound)
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
        lock(&self.state)
            .listeners
            .iter()
            .find(|(k, _)| matches!(k, ListenerKey::Dedicated(h, _) if h == host))
            .map(|(_, l)| l.bound)
    }

    /// The token store of a profile in use.
    pub fn store(&self, profile: &str) -> Option<Arc<token::Store>> {
        lock(&self.state)
            .profiles
            .get(profile)
            .map(|p| Arc::clone(&p.store))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops accepting, waits for in-flight requests (each listener bounded
    /// by `proxy.drain_timeout`), then stops the refresh tasks.
    pub async fn shutdown(mut self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut state = lock(&self.state);
            let mut tasks: Vec<JoinHandle<()>> = state.draining.drain(..).collect();
            for (_, l) in state.listeners.drain() {
                let _ = l.stop.send(true);
                tasks.push(l.task);
            }
            tasks
        };
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.admin_stop.send(true);
        if let Some(t) = self.admin_task.take() {
            let _ = t.await;
        }
        for (_, p) in lock(&self.state).profiles.drain() {
            p.task.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.admin_stop.send(true);
        if let Some(t) = &self.admin_task {
            t.abort();
        }
        let state = lock(&self.state);
        for l in state.listeners.values() {
            let _ = l.stop.send(true);
            l.task.abort();
        }
        for t in &state.draining {
            t.abort();
        }
        for p in state.profiles.values() {
            p.task.abort();
        }
    }
}
