//! [`Shared`]: a token [`Source`] in front of another (the grant client)
//! that shares its tokens with the fleet through Redis. One fetch from the
//! authorization server per renewal, fleet-wide:
//!
//! 1. read the entry: a usable token other than the one held (another
//!    replica renewed) is adopted; an entry still holding a token an
//!    upstream refused here is deleted (compare-and-delete);
//! 2. otherwise take the lease (`SET NX PX`, reading the entry in the same
//!    script), fetch, write the entry and release the lease
//!    (compare-and-delete) in one script;
//! 3. a replica that loses the lease polls for the winner's entry, and
//!    takes the lease over if it expires (the holder died), for at most
//!    twice `tokens.request_timeout` (the lease, then the taker's fetch);
//! 4. any Redis error, at any step: fetch alone, as without `[cache]`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::metrics::CacheMetrics;
use crate::token::response::Parsed;
use crate::token::{Attempt, FetchError, Policy, Source};

use super::entry::{Keys, Opened};
use super::redis::{Found, Redis};

/// Losers poll for the winner's entry, starting this often…
const POLL_FIRST: Duration = Duration::from_millis(25);
/// …and slowing down to this.
const POLL_MAX: Duration = Duration::from_millis(200);

/// What a profile's layer shares with every other: the connection, keys,
/// metrics, and this replica's lease id.
pub struct Backend {
    pub(super) redis: Redis,
    pub(super) keys: Keys,
    pub(super) metrics: CacheMetrics,
    pub(super) prefix: String,
    /// `host:pid:random`: who holds a lease, for an operator reading Redis.
    pub(super) node: String,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("prefix", &self.prefix)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// One profile's shared-cache layer over `inner`.
pub struct Shared<S> {
    inner: Arc<S>,
    backend: Arc<Backend>,
    profile: Arc<str>,
    /// What the entry's name is made of, for names made again when a DPoP
    /// key file changes: the profile and its binding beyond the DPoP key.
    identity: crate::config::Profile,
    binding: Vec<u8>,
    /// The entry and lease names for the DPoP key in use (or for none).
    names: arc_swap::ArcSwap<Names>,
    /// How long a lease lives and how long losers wait: a token request's
    /// own bound, `tokens.request_timeout`.
    lease_ttl: Duration,
    policy: Policy,
}

/// The Redis keys of one profile's entry and lease. A DPoP-bound token is
/// usable only with its key, so a DPoP profile's names include the key's
/// thumbprint: a rotated key meets only tokens bound to it.
struct Names {
    entry: String,
    lease: String,
    dpop: Option<Arc<crate::dpop::ProofKey>>,
}

/// What a read of the entry found.
enum Read {
    Hit(Parsed),
    /// Nothing there.
    Miss,
    /// The token held, a refused one, or one no longer usable.
    Stale,
    Undecryptable,
    Error,
}

impl<S: Source> Shared<S> {
    pub fn new(
        inner: Arc<S>,
        backend: Arc<Backend>,
        profile: &crate::config::Profile,
        lease_ttl: Duration,
        policy: Policy,
    ) -> Self {
        // A tls_client_auth token is bound to the client certificate
        // (RFC 8705): replicas with other certificates must not share it.
        let binding = match &profile.auth {
            crate::config::ClientAuth::TlsClientAuth { cert_file, .. } => std::fs::read(cert_file)
                .map(|pem| {
                    ring::digest::digest(&ring::digest::SHA256, &pem)
                        .as_ref()
                        .to_vec()
                })
                .unwrap_or_else(|_| cert_file.to_string_lossy().as_bytes().to_vec()),
            _ => Vec::new(),
        };
        let names = Self::make_names(&backend, profile, &binding, inner.dpop_key());
        Self {
            names: arc_swap::ArcSwap::from_pointee(names),
            identity: profile.clone(),
            binding,
            inner,
            backend,
            profile: profile.name.as_str().into(),
            lease_ttl,
            policy,
        }
    }

    fn make_names(
        backend: &Backend,
        profile: &crate::config::Profile,
        binding: &[u8],
        dpop: Option<Arc<crate::dpop::ProofKey>>,
    ) -> Names {
        let mut binding = binding.to_vec();
        if let Some(key) = &dpop {
            binding.extend_from_slice(b"\0dpop:");
            binding.extend_from_slice(key.thumbprint().as_bytes());
        }
        let id = backend.keys.entry_id(profile, &binding);
        Names {
            entry: format!("{}:token:{id}", backend.prefix),
            lease: format!("{}:lease:{id}", backend.prefix),
            dpop,
        }
    }

    /// The names for the DPoP key the next token is bound to.
    fn names(&self) -> Arc<Names> {
        let names = self.names.load_full();
        let Some(key) = self.inner.dpop_key() else {
            return names;
        };
        if names.dpop.as_ref().map(|k| k.thumbprint()) == Some(key.thumbprint()) {
            return names;
        }
        let fresh = Arc::new(Self::make_names(
            &self.backend,
            &self.identity,
            &self.binding,
            Some(key),
        ));
        self.names.store(Arc::clone(&fresh));
        fresh
    }

    /// The entry's Redis key (tests, logs).
    pub fn entry_key(&self) -> String {
        self.names.load().entry.clone()
    }

    async fn read(&self, n: &Names, attempt: &Attempt) -> Read {
        let read = match self.backend.redis.get(&n.entry).await {
            Err(_) => Read::Error,
            Ok(value) => self.open(n, value, attempt).await,
        };
        self.count(&read);
        read
    }

    /// What an entry's value (or its absence) holds for this attempt.
    async fn open(&self, n: &Names, found: Option<Found>, attempt: &Attempt) -> Read {
        let Some(Found { value: raw, ttl }) = found else {
            return Read::Miss;
        };
        match self.backend.keys.open(&n.entry, &raw) {
            Err(why) => {
                tracing::warn!(
                    profile = %self.profile,
                    entry = %n.entry,
                    reason = %why,
                    "shared cache entry ignored"
                );
                Read::Undecryptable
            }
            Ok(opened) => self.judge(n, opened, ttl, attempt, &raw).await,
        }
    }

    fn count(&self, read: &Read) {
        let result = match read {
            Read::Hit(_) => "hit",
            Read::Miss => "miss",
            Read::Stale => "stale",
            Read::Undecryptable => "undecryptable",
            Read::Error => "error",
        };
        self.backend.metrics.read(&self.profile, result);
    }

    /// Whether an opened entry holds a token to adopt.
    async fn judge(
        &self,
        n: &Names,
        opened: Opened,
        ttl: Option<Duration>,
        attempt: &Attempt,
        raw: &[u8],
    ) -> Read {
        let token = opened.token.expose().as_bytes();
        if let Some(refused) = &attempt.refused
            && refused.value().as_bytes() == token
        {
            // An upstream refused it here: no replica should adopt it again.
            // Only if it is still there: another may have renewed already.
            let _ = self.backend.redis.delete_if("delete", &n.entry, raw).await;
            return Read::Stale;
        }
        if attempt.knows(token) {
            // Nobody renewed yet: this replica's turn.
            return Read::Stale;
        }
        // Its age on the wall clock (a future `issued`, from a replica whose
        // clock runs ahead, counts as new), but never younger than its Redis
        // TTL says: the TTL was set from the writer's monotonic clock, so a
        // writer whose wall clock runs ahead cannot make it live longer.
        let mut age = SystemTime::now()
            .duration_since(opened.issued)
            .unwrap_or(Duration::ZERO);
        if let Some(ttl) = ttl {
            age = age.max(opened.lifetime.saturating_sub(ttl));
        }
        let now = Instant::now();
        let (issued, lifetime) = match now.checked_sub(age) {
            Some(issued) => (issued, opened.lifetime),
            None => (now, opened.lifetime.saturating_sub(age)),
        };
        let usable_for = lifetime.saturating_sub(self.policy.skew(lifetime));
        if issued + usable_for <= now + POLL_MAX || lifetime < crate::token::refresh::MIN_LIFETIME {
            return Read::Stale;
        }
        // Older than the token in hand (a holder that resumed late wrote
        // it): not a renewal.
        if let Some(held) = &attempt.held
            && held.usable_at(now)
            && issued + lifetime <= held.expires_at()
        {
            return Read::Stale;
        }
        Read::Hit(Parsed {
            access_token: opened.token,
            lifetime,
            scope: None,
            issued: Some(issued),
            dpop: n.dpop.clone(),
        })
    }

    /// Fetches with the lease held, writes the entry and releases the lease
    /// (one round trip), or only releases it if the fetch failed.
    async fn fetch_and_share(
        &self,
        n: &Names,
        attempt: Attempt,
        lease: &str,
    ) -> Result<Parsed, FetchError> {
        let sent_wall = SystemTime::now();
        let sent = Instant::now();
        let result = self.inner.fetch(attempt).await;
        let b = &self.backend;
        let left = match &result {
            Ok(parsed) => parsed.lifetime.saturating_sub(sent.elapsed()),
            Err(_) => Duration::ZERO,
        };
        // Bound to another DPoP key than the names say (the key file
        // changed meanwhile): not this entry's to hold.
        let same_key = |p: &Parsed| {
            p.dpop.as_ref().map(|k| k.thumbprint()) == n.dpop.as_ref().map(|k| k.thumbprint())
        };
        match &result {
            Ok(parsed) if !left.is_zero() && same_key(parsed) => {
                let value = b.keys.seal(
                    &n.entry,
                    sent_wall,
                    parsed.lifetime,
                    parsed.access_token.expose(),
                );
                // The Redis TTL is the token's remaining life.
                let _ = b
                    .redis
                    .write_and_release(&n.entry, &value, left, &n.lease, lease)
                    .await;
            }
            _ => {
                let _ = b
                    .redis
                    .delete_if("release", &n.lease, lease.as_bytes())
                    .await;
            }
        }
        result
    }

    /// Fetches without the fleet: Redis could not be used.
    async fn alone(&self, attempt: Attempt) -> Result<Parsed, FetchError> {
        self.backend.metrics.fallback(&self.profile);
        self.inner.fetch(attempt).await
    }
}

impl<S: Source> Source for Shared<S> {
    fn dpop_key(&self) -> Option<Arc<crate::dpop::ProofKey>> {
        self.inner.dpop_key()
    }

    fn renew_early(&self) -> impl std::future::Future<Output = ()> + Send {
        self.inner.renew_early()
    }

    async fn fetch(&self, attempt: Attempt) -> Result<Parsed, FetchError> {
        let b = &self.backend;
        let n = &*self.names();
        match self.read(n, &attempt).await {
            Read::Hit(parsed) => return Ok(parsed),
            Read::Error => return self.alone(attempt).await,
            Read::Miss | Read::Stale | Read::Undecryptable => {}
        }
        let lease = format!("{}:{:016x}", b.node, fastrand::u64(..));
        // Another replica may be fetching: wait for its entry, or for its
        // lease to lapse if it died, and then for the replica that takes
        // it over: twice the lease at most while a usable token is held. Each turn takes the lease if
        // it is free and reads the entry in the same round trip, so a
        // token written just before the lease was released is adopted,
        // never fetched again.
        // Without a usable token in hand requests are waiting: one lease
        // at most, then take it over or fetch alone.
        let holding = attempt
            .held
            .as_ref()
            .is_some_and(|t| t.usable_at(Instant::now()));
        let wait = if holding {
            self.lease_ttl * 2
        } else {
            self.lease_ttl
        };
        let deadline = Instant::now() + wait;
        let mut pause = POLL_FIRST;
        let mut waited = false;
        loop {
            let (won, entry) = match b
                .redis
                .lease_and_read(&n.lease, &lease, self.lease_ttl, &n.entry)
                .await
            {
                Ok(r) => r,
                Err(_) => return self.alone(attempt).await,
            };
            let read = self.open(n, entry, &attempt).await;
            self.count(&read);
            match (read, won) {
                (Read::Hit(parsed), won) => {
                    if won {
                        let _ = b
                            .redis
                            .delete_if("release", &n.lease, lease.as_bytes())
                            .await;
                    }
                    b.metrics.lease(&self.profile, "waited");
                    return Ok(parsed);
                }
                (_, true) => {
                    if waited {
                        tracing::info!(
                            profile = %self.profile,
                            "the replica holding the renewal lease did not finish; taking it over"
                        );
                        b.metrics.lease(&self.profile, "taken_over");
                    } else {
                        b.metrics.lease(&self.profile, "won");
                    }
                    return self.fetch_and_share(n, attempt, &lease).await;
                }
                (_, false) => {}
            }
            waited = true;
            let now = Instant::now();
            if now >= deadline {
                tracing::info!(
                    profile = %self.profile,
                    waited_ms = wait.as_millis() as u64,
                    "no shared token after waiting for the replica holding the lease; fetching alone"
                );
                return self.alone(attempt).await;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 3 / 2).min(POLL_MAX);
        }
    }
}
