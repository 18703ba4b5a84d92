//! The current token of one profile: written only by its refresh task, read
//! by the request path without locks or waiting while a usable token exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::{ArcSwapOption, Guard};
use tokio::sync::{Notify, watch};

use super::{FetchError, Token};

/// The profile has no usable token; says why, never what a token was.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token for profile {profile:?}: {reason}")]
pub struct Unavailable {
    pub profile: Arc<str>,
    pub reason: String,
}

/// What [`Store::invalidate`] did after an upstream 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidated {
    /// The token was dropped and a fresh one is being fetched.
    Refetching,
    /// Another token is already current: retry with it.
    AlreadyReplaced,
    /// A refetch for a 401 happened too recently: give the app the 401.
    RateLimited,
}

pub struct Store {
    profile: Arc<str>,
    current: ArcSwapOption<Token>,
    /// Bumped after every fetch attempt; waiters watch it.
    attempts: watch::Sender<u64>,
    fetching: AtomicBool,
    /// The last attempt failed and the task is waiting to retry.
    backing_off: AtomicBool,
    /// A request found no usable token since the last attempt began: the
    /// task retries sooner while this holds (see `refresh::Schedule`).
    waiting: AtomicBool,
    /// Unix milliseconds of the first failure of the current run of
    /// failures, 0 while the last attempt succeeded.
    failing_since_ms: AtomicU64,
    last_error: ArcSwapOption<String>,
    /// Set once a usable token was held: the readiness latch.
    ever_valid: AtomicBool,
    wake: Notify,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last 401-driven invalidation + 1.
    last_invalidation_ms: AtomicU64,
    unauthorized_interval: Duration,
    /// Counts requests that waited for a fetch already in flight.
    coalesced: Option<prometheus::IntCounter>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store with no token yet; the refresh task starts as "fetching" so
    /// the first requests wait for its first answer instead of failing.
    pub fn new(profile: &str, unauthorized_interval: Duration) -> Self {
        Self {
            profile: profile.into(),
            current: ArcSwapOption::empty(),
            attempts: watch::Sender::new(0),
            fetching: AtomicBool::new(true),
            backing_off: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            failing_since_ms: AtomicU64::new(0),
            last_error: ArcSwapOption::empty(),
            ever_valid: AtomicBool::new(false),
            wake: Notify::new(),
            epoch: Instant::now(),
            last_invalidation_ms: AtomicU64::new(0),
            unauthorized_interval,
            coalesced: None,
        }
    }

    /// Counts requests that share an in-flight fetch on `counter`.
    pub fn with_coalesced_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.coalesced = Some(counter);
        self
    }

    pub fn profile(&self) -> &Arc<str> {
        &self.profile
    }

    /// The current token if it is usable now. The hot path: one atomic load.
    #[inline]
    pub fn current(&self) -> Option<Arc<Token>> {
        let guard: Guard<Option<Arc<Token>>> = self.current.load();
        match &*guard {
            Some(t) if t.usable_at(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// The current token, or waits (at most `wait`) for the fetch in flight.
    /// Never starts a second fetch: all waiters share the task's one request.
    pub async fn get(&self, wait: Duration) -> Result<Arc<Token>, Unavailable> {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        let mut rx = self.attempts.subscribe();
        // Re-check after subscribing so a publish in between is not missed.
        if let Some(t) = self.current() {
            return Ok(t);
        }
        // Only requests that find no usable token get here: tell the task
        // that someone is waiting, so its retries come sooner.
        let first_waiting = !self.waiting.swap(true, Ordering::AcqRel);
        if !self.fetching.load(Ordering::Acquire) {
            if self.backing_off.load(Ordering::Acquire) {
                // The endpoint is failing: answer now. The first such request
                // since the last attempt wakes the task to bring its next
                // retry forward (never past a Retry-After); later ones could
                // not move it again.
                if first_waiting {
                    self.wake.notify_one();
                }
                return Err(self.unavailable());
            }
            self.wake.notify_one();
        } else if let Some(c) = &self.coalesced {
            c.inc();
        }
        match tokio::time::timeout(wait, rx.changed()).await {
            Ok(_) => self.current().ok_or_else(|| self.unavailable()),
            Err(_) => Err(Unavailable {
                profile: self.profile.clone(),
                reason: format!("no token after waiting {wait:?}"),
            }),
        }
    }

    fn unavailable(&self) -> Unavailable {
        let reason = match &*self.last_error.load() {
            Some(e) => e.as_str().to_owned(),
            None if self.current.load().is_some() => "the token expired".to_owned(),
            None => "no token fetched yet".to_owned(),
        };
        Unavailable {
            profile: self.profile.clone(),
            reason,
        }
    }

    /// After an upstream 401 with `used`: drop it (only if it is still the
    /// current one) and wake the task, at most once per interval.
    pub fn invalidate(&self, used: &Arc<Token>) -> Invalidated {
        let current = self.current.load();
        match &*current {
            Some(c) if Arc::ptr_eq(c, used) => {}
            _ => return Invalidated::AlreadyReplaced,
        }
        let now_ms = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_invalidation_ms.load(Ordering::Acquire);
        if last != 0 && now_ms.saturating_sub(last) < self.unauthorized_interval.as_millis() as u64
        {
            return Invalidated::RateLimited;
        }
        // Losing this race means another request is invalidating the same
        // token right now; dropping it here too is harmless and makes sure
        // neither request retries with the refused token.
        let _ = self.last_invalidation_ms.compare_exchange(
            last,
            now_ms,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let prev = self.current.compare_and_swap(&*current, None::<Arc<Token>>);
        if !matches!(&*prev, Some(p) if Arc::ptr_eq(p, used)) {
            // Replaced by a fresh token already, or dropped by the other request.
            if self.current().is_some() {
                return Invalidated::AlreadyReplaced;
            }
        }
        // Mark the fetch as under way before waking the task, so requests
        // arriving now wait for it rather than answer 503.
        self.fetching.store(true, Ordering::Release);
        self.wake.notify_one();
        Invalidated::Refetching
    }

    // ---- the refresh task's side ----

    pub(super) fn begin_fetch(&self) {
        self.waiting.store(false, Ordering::Release);
        self.fetching.store(true, Ordering::Release);
    }

    /// Whether a request found no usable token since the last attempt began.
    pub(super) fn requests_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) && self.current().is_none()
    }

    /// Whether an upstream 401 asked for a fetch that has not begun yet.
    pub(super) fn fetch_requested(&self) -> bool {
        self.fetching.load(Ordering::Acquire)
    }

    /// A requested fetch must wait (the server's `Retry-After`): requests
    /// waiting for it get their answer now instead of at their timeout.
    pub(super) fn defer_fetch(&self) {
        self.end_fetch();
    }

    pub(super) fn publish(&self, token: Arc<Token>) {
        self.current.store(Some(token));
        self.last_error.store(None);
        self.ever_valid.store(true, Ordering::Release);
        self.backing_off.store(false, Ordering::Release);
        self.failing_since_ms.store(0, Ordering::Release);
        self.end_fetch();
    }

    pub(super) fn fail(&self, error: &FetchError) {
        self.last_error.store(Some(Arc::new(error.to_string())));
        self.backing_off.store(true, Ordering::Release);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis().max(1) as u64);
        let _ =
            self.failing_since_ms
                .compare_exchange(0, now_ms, Ordering::AcqRel, Ordering::Acquire);
        self.end_fetch();
    }

    fn end_fetch(&self) {
        self.fetching.store(false, Ordering::Release);
        self.attempts.send_modify(|n| *n += 1);
    }

    pub(super) async fn woken(&self) {
        self.wake.notified().await
    }

    // ---- status, for readiness and admin pages ----

    /// Whether this profile has ever held a usable token.
    pub fn ever_valid(&self) -> bool {
        self.ever_valid.load(Ordering::Acquire)
    }

    /// The message of the last failed attempt, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.load().as_deref().cloned()
    }

    /// When the current run of failed attempts began (wall clock), if the
    /// last attempt failed.
    pub fn failing_since(&self) -> Option<std::time::SystemTime> {
        match self.failing_since_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// The current token whether or not usable, for status display.
    pub fn peek(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// A receiver that changes after each fetch attempt (tests, readiness).
    pub fn attempts(&self) -> watch::Receiver<u64> {
        self.attempts.subscribe()
    }
}
