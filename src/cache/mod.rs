//! The token cache a fleet of replicas shares through Redis (`[cache]`).
//!
//! A layer, not a change to the refresh loop: [`Shared`] is a token
//! [`crate::token::Source`] wrapped around the grant client. The loop still
//! decides when to renew; the layer decides whether renewing means adopting
//! another replica's token or fetching one for the fleet. Requests never
//! reach this module: they read the local store, as without `[cache]`.
//!
//! - [`entry`]: the entry's name and its encrypted value;
//! - [`redis`]: the connection, timeouts, error kinds and the up/down state;
//! - [`shared`]: the read / lease / fetch / write flow per profile.

pub mod entry;
pub mod redis;
pub mod shared;

use std::sync::Arc;
use std::time::Duration;

pub use redis::BuildError;
pub use shared::{Backend, Shared};

use crate::config;
use crate::metrics::CacheMetrics;

impl Backend {
    /// The connection, keys and lease id for `[cache]`; connects nothing.
    pub fn new(c: &config::Cache, metrics: CacheMetrics) -> Result<Arc<Self>, BuildError> {
        let key = crate::secret::read_key32(&c.encryption_key_file).map_err(|message| {
            BuildError::File {
                key: "encryption_key_file",
                message,
            }
        })?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        let backend = Arc::new(Self {
            redis: redis::Redis::new(c, metrics.clone())?,
            keys: entry::Keys::new(&key),
            metrics,
            prefix: c.key_prefix.clone(),
            node: format!("{host}:{}", std::process::id()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(health(
                Arc::downgrade(&backend),
                backend.redis.down_signal(),
            ));
        }
        Ok(backend)
    }
}

/// How often Redis is checked between renewals while sharing works…
const PROBE_UP: Duration = Duration::from_secs(30);
/// …and while it is degraded, to notice the recovery soon.
const PROBE_DOWN: Duration = Duration::from_secs(5);

/// Keeps `token_injector_shared_cache_up` current between renewals; ends
/// when the backend is dropped (a reload that changed `[cache]`, shutdown).
async fn health(backend: std::sync::Weak<Backend>, went_down: Arc<tokio::sync::Notify>) {
    let mut pause = PROBE_UP;
    loop {
        // Only the signal is held while waiting, never the backend, so a
        // dropped backend ends the task at its next turn.
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = went_down.notified() => {}
        }
        let Some(b) = backend.upgrade() else { return };
        let key = format!("{}:probe:{}", b.prefix, b.node);
        b.redis.probe(&key, PROBE_DOWN * 2, PROBE_UP).await;
        pause = if b.redis.is_down() {
            PROBE_DOWN
        } else {
            PROBE_UP
        };
    }
}
