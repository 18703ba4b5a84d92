//! The connection to Redis (a server, or the master Sentinel names): made
//! on first use, reused by every profile (one multiplexed connection), and
//! dropped after a connection-level error so the next operation reconnects
//! (and, with Sentinel, asks again who the master is). Every operation is
//! bounded by `cache.operation_timeout`; none is on the request path.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use redis::{ClientTlsConfig, ErrorKind, RedisError, TlsCertificates};
use tokio::sync::Mutex;

use crate::config::{self, RedisTarget};
use crate::metrics::CacheMetrics;

/// Compare-and-delete: removes KEYS[1] only while it holds ARGV[1] (a
/// lease we own, an entry holding a refused token).
const DELETE_IF_EQUAL: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Takes the lease KEYS[1] (value ARGV[1], ARGV[2] ms) if it is free, and
/// reads the entry KEYS[2] in the same step, so a replica that finds the
/// lease free also sees a token its holder wrote just before releasing it.
const LEASE_AND_READ: &str = "local won = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) \
     local v = redis.pcall('GET', KEYS[2]) if type(v) == 'table' then v = '' end \
     return {won and 1 or 0, v, redis.call('PTTL', KEYS[2])}";

/// Reads the entry KEYS[1] and its remaining TTL in one round trip. A value
/// of another type (not a string) reads as empty: garbage, which a renewal
/// then overwrites.
const READ: &str = "local v = redis.pcall('GET', KEYS[1]) if type(v) == 'table' then v = '' end \
     return {v, redis.call('PTTL', KEYS[1])}";

/// Writes the entry KEYS[1] (ARGV[1], ARGV[2] ms) and releases the lease
/// KEYS[2], only while the lease still holds ARGV[3]: a holder that was
/// stopped past its lease must not overwrite the token of the replica
/// that took over.
const WRITE_AND_RELEASE: &str = "if redis.call('GET', KEYS[2]) == ARGV[3] then \
     redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) redis.call('DEL', KEYS[2]) return 1 end return 0";

/// An entry's value and its remaining Redis TTL (`None`: no TTL).
#[derive(Debug)]
pub struct Found {
    pub value: Vec<u8>,
    pub ttl: Option<Duration>,
}

/// `[value, pttl]` as the scripts return them.
fn found(value: Option<Vec<u8>>, pttl: i64) -> Option<Found> {
    value.map(|value| Found {
        value,
        ttl: u64::try_from(pttl).ok().map(Duration::from_millis),
    })
}

/// Why the config's `[cache]` cannot be used at all (bad files). Redis being
/// down is not one: that is a fallback at run time.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cache.{key}: {message}")]
    File { key: &'static str, message: String },
    #[error("cache: {0}")]
    Client(String),
}

/// A failed Redis operation. Its text is the client's, which never holds
/// the password or a value.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind} error from Redis: {message}")]
pub struct OpError {
    pub kind: &'static str,
    pub message: String,
}

enum Target {
    Server(Client),
    Sentinel(Mutex<redis::sentinel::SentinelClient>),
}

/// Sharing state, for "log once per state change".
const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

pub struct Redis {
    target: Target,
    conn: Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
    metrics: CacheMetrics,
    state: AtomicU8,
    /// When the last operation ended, for skipping probes while busy.
    last_op: std::sync::Mutex<Option<Instant>>,
    /// Told when sharing becomes degraded, so the health check starts its
    /// frequent probes at once.
    went_down: std::sync::Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").finish_non_exhaustive()
    }
}

fn file(key: &'static str, path: &std::path::Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|e| BuildError::File {
        key,
        message: format!("cannot read {}: {e}", path.display()),
    })
}

impl Redis {
    /// Builds the client; connects nothing yet.
    pub fn new(c: &config::Cache, metrics: CacheMetrics) -> Result<Self, BuildError> {
        // redis-rs builds its rustls config with the process default provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let password = match &c.password_file {
            Some(p) => Some(crate::secret::Source::File(p.clone()).read().map_err(|e| {
                BuildError::File {
                    key: "password_file",
                    message: e.to_string(),
                }
            })?),
            None => None,
        };
        let certificates = if c.tls {
            Some(TlsCertificates {
                client_tls: match &c.client_cert {
                    Some(cert) => Some(ClientTlsConfig {
                        client_cert: file("client_cert_file", &cert.cert_file)?,
                        client_key: file("client_key_file", &cert.key_file)?,
                    }),
                    None => None,
                },
                root_cert: match &c.ca_file {
                    Some(p) => Some(file("ca_file", p)?),
                    None => None,
                },
            })
        } else {
            None
        };
        let client_error = |e: RedisError| BuildError::Client(e.to_string());
        let target = match &c.target {
            RedisTarget::Url(url) => {
                let mut info: ConnectionInfo =
                    url.as_str().into_connection_info().map_err(client_error)?;
                let mut settings = info.redis_settings().clone();
                if let Some(user) = &c.username {
                    settings = settings.set_username(user);
                }
                if let Some(p) = &password {
                    settings = settings.set_password(p.expose());
                }
                info = info.set_redis_settings(settings);
                let client = match certificates {
                    Some(certs) => Client::build_with_tls(info, certs),
                    None => Client::open(info),
                }
                .map_err(client_error)?;
                Target::Server(client)
            }
            RedisTarget::Sentinel {
                sentinels,
                master_name,
                db,
            } => {
                use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
                let addrs = sentinels
                    .iter()
                    .map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p));
                let mut b =
                    SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)
                        .map_err(client_error)?
                        .set_client_to_redis_db(*db);
                if let Some(user) = &c.username {
                    b = b.set_client_to_redis_username(user);
                }
                if let Some(p) = &password {
                    b = b.set_client_to_redis_password(p.expose());
                }
                if let Some(certs) = certificates {
                    b = b
                        .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                        .set_client_to_redis_certificates(certs.clone())
                        .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
                        .set_client_to_sentinel_certificates(certs);
                }
                Target::Sentinel(Mutex::new(b.build().map_err(client_error)?))
            }
        };
        Ok(Self {
            target,
            conn: Mutex::new(None),
            timeout: c.operation_timeout,
            metrics,
            state: AtomicU8::new(UNKNOWN),
            last_op: std::sync::Mutex::new(None),
            went_down: Default::default(),
        })
    }

    /// The shared connection, and whether it was made just now.
    async fn connection(&self) -> Result<(MultiplexedConnection, bool), RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = &*slot {
            return Ok((c.clone(), false));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connect = async {
            match &self.target {
                Target::Server(client) => {
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                }
                Target::Sentinel(sentinel) => {
                    sentinel
                        .lock()
                        .await
                        .get_async_connection_with_config(&config)
                        .await
                }
            }
        };
        // Connecting through Sentinel is two hops: give it twice the bound.
        let conn = tokio::time::timeout(self.timeout * 2, connect)
            .await
            .map_err(|_| RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    /// Runs one command, bounded by the operation timeout, and records it.
    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, OpError> {
        // A read that works says little about sharing (a full Redis still
        // answers GET): only a write brings the state back up after a
        // failure. The first answer at all, or a PING while up, keeps it.
        let write = !matches!(op, "get" | "ping");
        let health_check = matches!(op, "ping" | "probe");
        if self.is_down() && !health_check {
            // While sharing is degraded only the health check talks to
            // Redis: a renewal falls back at once instead of each one
            // waiting for a timeout, and sharing resumes once a probe
            // succeeds (every few seconds).
            return Err(OpError {
                kind: "unavailable",
                message: "sharing is degraded until a health check succeeds".into(),
            });
        }
        let started = Instant::now();
        let timed_out = || RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let attempt = async {
            // A connection the server dropped (a restart, a failover) is
            // made again once, within the same bound.
            let mut retried = false;
            loop {
                let (mut conn, fresh) = self.connection().await?;
                match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
                    Ok(Err(e))
                        if !fresh && !retried && (e.is_connection_dropped() || e.is_io_error()) =>
                    {
                        retried = true;
                        *self.conn.lock().await = None;
                    }
                    Ok(r) => return r,
                    Err(_) => return Err(timed_out()),
                }
            }
        };
        // One bound over waiting for the connection, connecting (twice the
        // operation timeout, for Sentinel's two hops) and the command.
        let result = tokio::time::timeout(self.timeout * 4, attempt)
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        self.metrics.operation(op, started.elapsed().as_secs_f64());
        if let Ok(mut last) = self.last_op.lock() {
            *last = Some(Instant::now());
        }
        match result {
            Ok(v) => {
                self.mark_up(write);
                Ok(v)
            }
            Err(e) => {
                let kind = kind(&e);
                if kind == "wrongtype" {
                    // Data, not availability: the caller treats the value
                    // as garbage.
                    return Err(OpError {
                        kind,
                        message: e.to_string(),
                    });
                }
                if !matches!(kind, "response") {
                    // The connection may be dead, or point at a demoted
                    // master: the next operation connects again.
                    *self.conn.lock().await = None;
                }
                let error = OpError {
                    kind,
                    message: e.to_string(),
                };
                self.metrics.error(kind);
                self.mark_down(&error);
                Err(error)
            }
        }
    }

    fn mark_up(&self, write: bool) {
        let was = self.state.load(Ordering::Acquire);
        if was == UP || (was == DOWN && !write) {
            return;
        }
        if self.state.swap(UP, Ordering::AcqRel) != UP {
            self.metrics.set_up(true);
            tracing::info!("shared cache (Redis) available: tokens are shared with the fleet");
        }
    }

    /// Notified when sharing becomes degraded (a permit is kept if no one
    /// was waiting).
    pub fn down_signal(&self) -> std::sync::Arc<tokio::sync::Notify> {
        std::sync::Arc::clone(&self.went_down)
    }

    /// Whether the last operations left sharing degraded.
    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Acquire) == DOWN
    }

    /// Checks Redis between renewals so the up/down state (and its alert)
    /// follows an outage and a recovery even with long-lived tokens: a PING
    /// while up, a small expiring write under `probe_key` while down (a
    /// full Redis still answers PING).
    pub async fn probe(&self, probe_key: &str, ttl: Duration, idle: Duration) {
        let busy = self
            .last_op
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|at| at.elapsed() < idle);
        if busy && !self.is_down() {
            // Renewals are talking to Redis: they keep the state current.
            return;
        }
        let _ = if self.is_down() {
            let ms = ttl.as_millis().max(1) as u64;
            self.run::<()>(
                "probe",
                redis::cmd("SET").arg(probe_key).arg(1).arg("PX").arg(ms),
            )
            .await
        } else {
            self.run::<()>("ping", &redis::cmd("PING")).await
        };
    }

    fn mark_down(&self, error: &OpError) {
        if self.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            self.went_down.notify_one();
            self.metrics.set_up(false);
            tracing::warn!(
                kind = error.kind,
                error = %error,
                "shared cache (Redis) unavailable: each replica fetches its own tokens until it answers"
            );
        }
    }

    /// The entry at `key` with its remaining TTL; a value of another type
    /// reads as empty (garbage).
    pub async fn get(&self, key: &str) -> Result<Option<Found>, OpError> {
        let (value, pttl): (Option<Vec<u8>>, i64) = self
            .run("get", redis::cmd("EVAL").arg(READ).arg(1).arg(key))
            .await?;
        Ok(found(value, pttl))
    }

    /// Takes the lease `lease` (`SET NX PX ttl`) and reads `entry`, in one
    /// round trip: whether the lease was taken, and the entry's value.
    pub async fn lease_and_read(
        &self,
        lease: &str,
        value: &str,
        ttl: Duration,
        entry: &str,
    ) -> Result<(bool, Option<Found>), OpError> {
        let ms = ttl.as_millis().max(1) as u64;
        let (won, value, pttl): (i64, Option<Vec<u8>>, i64) = self
            .run(
                "lease",
                redis::cmd("EVAL")
                    .arg(LEASE_AND_READ)
                    .arg(2)
                    .arg(lease)
                    .arg(entry)
                    .arg(value)
                    .arg(ms),
            )
            .await?;
        Ok((won == 1, found(value, pttl)))
    }

    /// `SET entry value PX ttl`, then releases `lease` if it still holds
    /// `mine`, in one round trip.
    pub async fn write_and_release(
        &self,
        entry: &str,
        value: &[u8],
        ttl: Duration,
        lease: &str,
        mine: &str,
    ) -> Result<(), OpError> {
        let ms = ttl.as_millis().max(1) as u64;
        self.run::<()>(
            "set",
            redis::cmd("EVAL")
                .arg(WRITE_AND_RELEASE)
                .arg(2)
                .arg(entry)
                .arg(lease)
                .arg(value)
                .arg(ms)
                .arg(mine),
        )
        .await
    }

    /// Deletes `key` if it still holds `value`; `op` names it in metrics.
    pub async fn delete_if(
        &self,
        op: &'static str,
        key: &str,
        value: &[u8],
    ) -> Result<bool, OpError> {
        let n: i64 = self
            .run(
                op,
                redis::cmd("EVAL")
                    .arg(DELETE_IF_EQUAL)
                    .arg(1)
                    .arg(key)
                    .arg(value),
            )
            .await?;
        Ok(n == 1)
    }
}

/// A bounded label for `token_injector_shared_cache_errors_total`.
fn kind(e: &RedisError) -> &'static str {
    if e.is_timeout() {
        return "timeout";
    }
    match e.code() {
        Some("WRONGPASS" | "NOAUTH" | "NOPERM") => return "auth",
        Some("READONLY" | "MASTERDOWN") => return "readonly",
        Some("WRONGTYPE") => return "wrongtype",
        _ => {}
    }
    match e.kind() {
        ErrorKind::AuthenticationFailed => "auth",
        ErrorKind::Io => "connect",
        ErrorKind::MasterNameNotFoundBySentinel
        | ErrorKind::NoValidReplicasFoundBySentinel
        | ErrorKind::EmptySentinelList => "connect",
        ErrorKind::Server(_) => "response",
        _ if e.is_connection_dropped() || e.is_connection_refusal() => "connect",
        _ => "other",
    }
}
