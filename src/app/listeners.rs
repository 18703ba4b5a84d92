//! The proxy's listeners: the forward one (`proxy.listen`) and each route's
//! own (`routes[].listen`). A reload binds the new ones before anything
//! changes, hands a socket over when an address changes role, and lets the
//! removed ones drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::{proxy, serve};

use super::StartError;

/// A listener, by what it is for and the address configured for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    Forward(SocketAddr),
    Dedicated(String, SocketAddr),
}

impl Key {
    fn addr(&self) -> SocketAddr {
        match self {
            Key::Forward(a) | Key::Dedicated(_, a) => *a,
        }
    }

    /// Every listener `config` asks for, with the key that names it.
    fn all(config: &Config) -> Vec<(Key, String)> {
        let mut keys = vec![(Key::Forward(config.proxy.listen), "proxy.listen".to_owned())];
        for (i, r) in config.routes.iter().enumerate() {
            if let Some(addr) = r.listen {
                keys.push((
                    Key::Dedicated(r.label.clone(), addr),
                    format!("routes[{i}].listen"),
                ));
            }
        }
        keys
    }
}

struct Running {
    bound: SocketAddr,
    /// A duplicate of the listening socket, so that a reload which gives
    /// this address another role hands the socket over instead of binding
    /// the address a second time.
    socket: std::net::TcpListener,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Sockets bound for a config, not yet serving.
pub(super) struct Bound(Vec<(Key, std::net::TcpListener)>);

/// The listeners serving now, and the removed ones still draining.
#[derive(Default)]
pub(super) struct Listeners {
    running: HashMap<Key, Running>,
    draining: Vec<JoinHandle<()>>,
}

/// Binds `addr` non-blocking, naming `key` on failure.
pub(super) fn bind(key: String, addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind {
        key: key.clone(),
        addr,
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| StartError::Bind { key, addr, source })?;
    Ok(l)
}

impl Listeners {
    /// Binds every listener of `config` that is not bound already.
    pub(super) fn prepare(&self, config: &Config) -> Result<Bound, StartError> {
        let mut bound = Vec::new();
        for (key, name) in Key::all(config) {
            if self.running.contains_key(&key) {
                continue;
            }
            let addr = key.addr();
            // The same fixed address in another role (a renamed route, ports
            // swapped): take over the open socket; binding again would fail.
            let held = (addr.port() != 0)
                .then(|| self.running.iter().find(|(k, _)| k.addr() == addr))
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
        Ok(Bound(bound))
    }

    /// Stops the listeners `config` no longer has (they drain) and serves
    /// the newly bound ones.
    pub(super) fn commit(
        &mut self,
        config: &Config,
        bound: Bound,
        proxy: &Arc<ArcSwap<proxy::Proxy>>,
        connections: &Arc<serve::Connections>,
    ) {
        let wanted: Vec<Key> = Key::all(config).into_iter().map(|(k, _)| k).collect();
        let stale: Vec<Key> = self
            .running
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        self.draining.retain(|t| !t.is_finished());
        for key in stale {
            if let Some(l) = self.running.remove(&key) {
                let handed_over = bound
                    .0
                    .iter()
                    .any(|(k, _)| k.addr() == key.addr() && key.addr().port() != 0);
                if handed_over {
                    tracing::info!(addr = %l.bound, "listener takes a new role from the config");
                } else {
                    tracing::info!(addr = %l.bound, "closing listener removed from the config");
                }
                let _ = l.stop.send(true);
                self.draining.push(l.task);
            }
        }
        for (key, std_listener) in bound.0 {
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
                Key::Forward(_) => proxy::Entry::Forward,
                Key::Dedicated(label, _) => proxy::Entry::Dedicated(Arc::from(label.as_str())),
            };
            let (stop, rx) = watch::channel(false);
            let task = tokio::spawn(serve::accept_loop(
                listener,
                Arc::clone(proxy),
                entry,
                rx,
                config.proxy.drain_timeout,
                Arc::clone(connections),
            ));
            self.running.insert(
                key,
                Running {
                    bound,
                    socket,
                    stop,
                    task,
                },
            );
        }
    }

    /// The bound address of the forward listener.
    pub(super) fn forward_addr(&self) -> Option<SocketAddr> {
        self.running
            .iter()
            .find(|(k, _)| matches!(k, Key::Forward(_)))
            .map(|(_, l)| l.bound)
    }

    /// The bound address of the dedicated listener of the route `host`.
    pub(super) fn route_addr(&self, host: &str) -> Option<SocketAddr> {
        self.running
            .iter()
            .find(|(k, _)| matches!(k, Key::Dedicated(h, _) if h == host))
            .map(|(_, l)| l.bound)
    }

    /// Stops accepting everywhere; returns the tasks to wait for (each
    /// drains its connections within `proxy.drain_timeout`).
    pub(super) fn stop_all(&mut self) -> Vec<JoinHandle<()>> {
        let mut tasks: Vec<JoinHandle<()>> = self.draining.drain(..).collect();
        for (_, l) in self.running.drain() {
            let _ = l.stop.send(true);
            tasks.push(l.task);
        }
        tasks
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for l in self.running.values() {
            let _ = l.stop.send(true);
            l.task.abort();
        }
        for t in &self.draining {
            t.abort();
        }
    }
}
