//! The per-profile refresh task and the pure functions that time it.
//!
//! The task fetches at start, publishes each token to the [`Store`], sleeps
//! until the token's renewal time (a fraction of its lifetime, jittered), and
//! on failure keeps the current token and retries with a backoff that grows
//! with the length of the outage ([`Schedule`]). An invalidation (an upstream
//! 401) wakes it early; so does a request that finds no usable token, which
//! brings the next retry forward to at most `retry_max_without_token`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config;

use super::{Observe, Source, Store, Token};

/// Renewals are never scheduled closer together than this, so a server that
/// returns an almost-expired token cannot make the task spin.
pub(crate) const MIN_REFRESH: Duration = Duration::from_millis(100);

/// Tokens said to live less than this are refused: by the time the answer
/// is parsed and published, such a token is dead or nearly so, and taking it
/// would renew in a tight loop.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// When to renew and when a token stops being usable. Valid by construction.
#[derive(Debug, Clone)]
pub struct Policy {
    fraction: f64,
    margin: Duration,
    skew: Duration,
    default_lifetime: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    retry_max_without_token: Duration,
}

impl Policy {
    /// Checks the ranges the config validator promises, again, so a bad
    /// policy cannot exist whatever builds it.
    pub fn try_new(t: &config::Tokens) -> Result<Self, String> {
        if !(0.1..=0.95).contains(&t.refresh_fraction) {
            return Err(format!(
                "refresh fraction {} out of 0.1..=0.95",
                t.refresh_fraction
            ));
        }
        if t.retry_initial.is_zero() || t.retry_max < t.retry_initial {
            return Err("retry_initial must be > 0 and <= retry_max".into());
        }
        if t.retry_max_without_token < t.retry_initial {
            return Err("retry_max_without_token must be >= retry_initial".into());
        }
        if t.default_lifetime.is_zero() {
            return Err("default_lifetime must be > 0".into());
        }
        Ok(Self {
            fraction: t.refresh_fraction,
            margin: t.refresh_margin,
            skew: t.expiry_skew,
            default_lifetime: t.default_lifetime,
            retry_initial: t.retry_initial,
            retry_max: t.retry_max,
            retry_max_without_token: t.retry_max_without_token,
        })
    }

    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self {
            fraction: 0.75,
            margin: Duration::from_secs(60),
            skew: Duration::from_secs(5),
            default_lifetime: Duration::from_secs(300),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            retry_max_without_token: Duration::from_secs(2),
        }
    }

    pub fn default_lifetime(&self) -> Duration {
        self.default_lifetime
    }

    /// How long before expiry a token stops being sent: the configured skew,
    /// but at most a tenth of the lifetime so short tokens stay useful.
    pub fn skew(&self, lifetime: Duration) -> Duration {
        self.skew.min(lifetime / 10)
    }

    /// How long after the request was sent to renew a token of `lifetime`:
    /// at `fraction` of it, or `margin` before expiry if that is earlier, but
    /// not before half of it (or `fraction`, if smaller); then up to 10 %
    /// earlier by `jitter` in `[0, 1)` so a fleet does not renew in step.
    pub fn refresh_in(&self, lifetime: Duration, jitter: f64) -> Duration {
        let by_fraction = lifetime.mul_f64(self.fraction);
        let by_margin = lifetime.saturating_sub(self.margin);
        let floor = lifetime.mul_f64(self.fraction.min(0.5));
        let at = by_fraction.min(by_margin).max(floor);
        let at = at.mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0));
        at.max(MIN_REFRESH)
    }

    /// The ordinary delay before the next retry, `outage` after the first
    /// failed attempt of a run: as long as the outage has lasted so far, at
    /// least `retry_initial` and at most `retry_max`, with "equal jitter"
    /// (half fixed, half random) so retries spread without collapsing to
    /// zero. Each retry roughly doubles the time since the outage began, so
    /// the backoff is exponential in time, and extra attempts (brought
    /// forward before expiry, or for waiting requests) do not escalate it.
    pub fn retry_in(&self, outage: Duration, jitter: f64) -> Duration {
        let d = outage.clamp(self.retry_initial, self.retry_max);
        d / 2 + (d / 2).mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The delay before the next retry while requests find no usable token:
    /// `retry_max_without_token`, up to 10 % earlier by `jitter` in `[0, 1)`
    /// (as renewals are), so a fleet that failed together drifts apart.
    pub fn retry_in_without_token(&self, jitter: f64) -> Duration {
        self.retry_max_without_token
            .mul_f64(1.0 - 0.1 * jitter.clamp(0.0, 1.0))
    }
}

/// When to retry after a failed attempt: a pure function of what the task
/// knows when the attempt ends, unit-tested per state.
///
/// | state | next attempt after |
/// |---|---|
/// | token in hand, usable | the ordinary delay, brought forward so that one retry still comes while the token is usable (never closer than `retry_initial`) |
/// | no usable token, no requests | the ordinary delay |
/// | no usable token, requests arriving | the smaller of the ordinary delay and `retry_max_without_token` (up to 10 % earlier) |
/// | `Retry-After` given | never sooner than it says (capped at `retry_max`), in every state |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// When to retry if no request is waiting.
    pub ordinary: Instant,
    /// When to retry once requests find no usable token.
    pub without_token: Instant,
    /// Nothing before this: the server's `Retry-After`.
    pub not_before: Instant,
}

impl Schedule {
    /// `outage` is the time since the run of failures began; `usable_until`
    /// when the token in hand stops being usable, if there is one;
    /// `jitter` two values in `[0, 1)`.
    pub fn after_failure(
        policy: &Policy,
        now: Instant,
        outage: Duration,
        usable_until: Option<Instant>,
        retry_after: Option<Duration>,
        jitter: (f64, f64),
    ) -> Self {
        let mut ordinary = policy.retry_in(outage, jitter.0);
        let floor = retry_after.map_or(Duration::ZERO, |ra| ra.min(policy.retry_max));
        if let Some(until) = usable_until {
            // A short outage must not outlast the token in hand just
            // because the backoff overshot its end (a Retry-After still
            // holds: the floor below).
            ordinary = before_unusable(ordinary, until, now, policy.retry_initial);
        }
        let without_token = policy.retry_in_without_token(jitter.1).min(ordinary);
        Self {
            ordinary: now + ordinary.max(floor),
            without_token: now + without_token.max(floor),
            not_before: now + floor,
        }
    }

    /// The next attempt, given whether requests are waiting for a token.
    pub fn due(&self, requests_waiting: bool) -> Instant {
        if requests_waiting {
            self.without_token
        } else {
            self.ordinary
        }
    }
}

/// Runs the refresh loop for one profile until the task is aborted.
pub async fn run<S: Source, O: Observe>(
    store: Arc<Store>,
    source: Arc<S>,
    policy: Policy,
    observe: O,
) {
    let mut failures: u32 = 0;
    // When the first failed attempt of the current run ended.
    let mut outage_since: Option<Instant> = None;
    // The last token published: if the store no longer has it, an upstream
    // refused it.
    let mut published: Option<Arc<Token>> = None;
    loop {
        store.begin_fetch();
        let held = store.peek();
        let attempt = super::Attempt {
            refused: published.clone().filter(|_| held.is_none()),
            held,
        };
        let sent = Instant::now();
        let result = source.fetch(attempt).await;
        let elapsed = sent.elapsed();
        let mut adopted = false;
        match result.and_then(|parsed| {
            if parsed.lifetime < MIN_LIFETIME {
                return Err(super::FetchError::InvalidResponse(format!(
                    "the token lives {:?}, less than the minimum {MIN_LIFETIME:?}",
                    parsed.lifetime
                )));
            }
            // A token adopted from the shared cache lives from when another
            // replica fetched it.
            adopted = parsed.issued.is_some();
            let start = parsed.issued.unwrap_or(sent);
            let held = store.peek();
            let lifetime = same_token_lifetime(held.as_deref(), &parsed, start);
            let mut token = Token::new(
                &parsed.access_token,
                start,
                lifetime,
                &policy,
                fastrand::f64(),
            )?
            .bound_to(parsed.dpop.clone());
            if let Some(held) = held.filter(|h| h.header() == token.header()) {
                token.cap_to(&held, Instant::now());
            }
            if !token.usable_at(Instant::now()) {
                // Treated as a failure so that retries back off instead of
                // every request asking for the same dying token again.
                return Err(super::FetchError::InvalidResponse(
                    "the token endpoint returned a token that is expired or about to expire".into(),
                ));
            }
            Ok((token, lifetime))
        }) {
            Ok((token, lifetime)) => {
                failures = 0;
                outage_since = None;
                let next = token.refresh_at();
                let renew_in_s = next.saturating_duration_since(Instant::now()).as_secs_f64();
                if adopted {
                    tracing::info!(
                        profile = %store.profile(),
                        lifetime_s = lifetime.as_secs_f64(),
                        renew_in_s,
                        "token adopted from the shared cache"
                    );
                    observe.adopted(&token);
                } else {
                    tracing::info!(
                        profile = %store.profile(),
                        duration_ms = elapsed.as_millis() as u64,
                        lifetime_s = lifetime.as_secs_f64(),
                        renew_in_s,
                        result = "success",
                        "token fetched"
                    );
                    observe.fetched(elapsed, &token);
                }
                let token = Arc::new(token);
                published = Some(Arc::clone(&token));
                store.publish(token);
                until_renewal(&store, next, source.renew_early()).await;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let now = Instant::now();
                let since = *outage_since.get_or_insert(now);
                let schedule = Schedule::after_failure(
                    &policy,
                    now,
                    now - since,
                    store.current().map(|t| t.usable_until()),
                    error.retry_after(),
                    (fastrand::f64(), fastrand::f64()),
                );
                let waiting = store.requests_waiting();
                tracing::warn!(
                    profile = %store.profile(),
                    duration_ms = elapsed.as_millis() as u64,
                    result = "error",
                    reason = error.reason(),
                    consecutive_failures = failures,
                    outage_ms = (now - since).as_millis() as u64,
                    requests_waiting = waiting,
                    retry_in_ms = schedule.due(waiting).saturating_duration_since(now).as_millis() as u64,
                    error = %error,
                    "token fetch failed"
                );
                observe.failed(elapsed, &error, failures);
                store.fail(&error);
                until_retry(&store, &schedule).await;
            }
        }
    }
}

/// Sleeps until the renewal time, or until the source says to renew early
/// (a chain's subject was renewed). A wake that finds no usable token (an
/// upstream 401, rate-limited by the store) fetches at once.
async fn until_renewal(store: &Store, at: Instant, early: impl Future<Output = ()>) {
    let mut early = std::pin::pin!(early);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(at) => return,
            _ = &mut early => return,
            _ = store.woken() => {
                if store.current().is_none() {
                    return;
                }
            }
        }
    }
}

/// Sleeps until the retry `schedule` says, re-reading it whenever the store
/// wakes the task: a request that found no usable token brings the retry
/// forward, an upstream 401 asks for it now; neither before `not_before`.
async fn until_retry(store: &Store, schedule: &Schedule) {
    let mut due = schedule.due(store.requests_waiting());
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => return,
            _ = store.woken() => {
                if store.current().is_some() {
                    continue;
                }
                if store.fetch_requested() {
                    if Instant::now() >= schedule.not_before {
                        return;
                    }
                    // Retry-After still holds: answer the waiting requests
                    // now, and fetch when the server allows.
                    store.defer_fetch();
                    due = schedule.not_before;
                } else {
                    due = due.min(schedule.due(store.requests_waiting()));
                }
            }
        }
    }
}

/// Some servers answer a renewal with the token they already gave, and a
/// fresh `expires_in`. That token still dies when it was first going to:
/// count its lifetime from what we already know, so renewals are scheduled
/// by the real expiry.
fn same_token_lifetime(
    held: Option<&Token>,
    parsed: &super::response::Parsed,
    sent: Instant,
) -> Duration {
    let same = held.filter(|h| {
        h.header().as_bytes().get(7..) == Some(parsed.access_token.expose().as_bytes())
    });
    match same {
        Some(h) => parsed
            .lifetime
            .min(h.expires_at().saturating_duration_since(sent)),
        None => parsed.lifetime,
    }
}

/// The retry delay, brought forward so that a retry still happens while the
/// token in hand is usable: up to half a second before `until`, but never
/// sooner than `min_gap` (`retry_initial`) from now, so the last moments of
/// a token see no burst of attempts. Unchanged when the retry already comes
/// in time or the token is no longer usable.
fn before_unusable(delay: Duration, until: Instant, now: Instant, min_gap: Duration) -> Duration {
    let left = until.saturating_duration_since(now);
    if left.is_zero() || delay < left {
        return delay;
    }
    let early = (left / 2).min(Duration::from_millis(500));
    (left - early).max(min_gap).min(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn refresh_in_table() {
        let p = Policy::for_tests(); // fraction 0.75, margin 60 s
        let cases: &[(f64, f64, f64)] = &[
            // lifetime, jitter, expected
            (3600.0, 0.0, 2700.0), // fraction wins
            (3600.0, 1.0, 2430.0), // 10 % earlier at full jitter
            (120.0, 0.0, 60.0),    // margin wins, floor equal
            (100.0, 0.0, 50.0),    // margin would be 40: floor at half
            (5.0, 0.0, 2.5),       // short tokens renew at half
            (1.0, 0.0, 0.5),
            (0.1, 0.0, 0.1), // never below MIN_REFRESH
        ];
        for &(life, jitter, want) in cases {
            let got = p.refresh_in(secs(life), jitter);
            assert!(
                (got.as_secs_f64() - want).abs() < 1e-6,
                "lifetime {life}: got {got:?}, want {want}"
            );
        }
    }

    #[test]
    fn renewal_comes_before_the_token_stops_being_usable() {
        let p = Policy::for_tests();
        for life in [0.5, 1.0, 2.0, 5.0, 30.0, 61.0, 300.0, 3600.0, 86400.0] {
            let l = secs(life);
            for jitter in [0.0, 0.5, 0.999] {
                assert!(p.refresh_in(l, jitter) < l - p.skew(l), "lifetime {life}");
            }
        }
    }

    #[test]
    fn skew_is_bounded_by_a_tenth() {
        let p = Policy::for_tests();
        assert_eq!(p.skew(secs(3600.0)), secs(5.0));
        assert_eq!(p.skew(secs(1.0)), secs(0.1));
    }

    #[test]
    fn retry_grows_with_the_outage_not_the_attempt_count() {
        let p = Policy::for_tests(); // 500 ms .. 30 s
        // At the first failure: retry_initial, half of it fixed.
        assert_eq!(p.retry_in(secs(0.0), 1.0), secs(0.5));
        assert_eq!(p.retry_in(secs(0.0), 0.0), secs(0.25));
        // Then as long as the outage has lasted: about doubling per retry.
        assert_eq!(p.retry_in(secs(1.0), 1.0), secs(1.0));
        assert_eq!(p.retry_in(secs(4.0), 1.0), secs(4.0));
        assert_eq!(p.retry_in(secs(4.0), 0.0), secs(2.0));
        // Capped at retry_max, however long.
        assert_eq!(p.retry_in(secs(600.0), 1.0), secs(30.0));
        assert_eq!(p.retry_in(Duration::MAX, 0.0), secs(15.0));
        // Many attempts within 2 s of outage stay near 2 s: nothing counts
        // attempts, so extra ones cannot walk the delay up to retry_max.
        assert!(p.retry_in(secs(2.0), 0.999) <= secs(2.0));
    }

    #[test]
    fn retry_without_token_is_the_cap_up_to_a_tenth_earlier() {
        let p = Policy::for_tests(); // retry_max_without_token 2 s
        assert_eq!(p.retry_in_without_token(0.0), secs(2.0));
        assert_eq!(p.retry_in_without_token(1.0), secs(1.8));
        assert_eq!(p.retry_in_without_token(0.5), secs(1.9));
    }

    #[test]
    fn schedule_table_per_state() {
        let p = Policy::for_tests(); // 500 ms .. 30 s, 2 s without a token
        let now = Instant::now();
        let at = |d: f64| now + secs(d);
        struct Case {
            what: &'static str,
            outage: f64,
            usable_for: Option<f64>,
            retry_after: Option<f64>,
            // (ordinary, without_token, not_before), seconds from now
            want: (f64, f64, f64),
        }
        let cases = [
            Case {
                what: "first failure, no token",
                outage: 0.0,
                usable_for: None,
                retry_after: None,
                want: (0.5, 0.5, 0.0),
            },
            Case {
                what: "long outage, no token: backoff; requests waiting: 2 s",
                outage: 600.0,
                usable_for: None,
                retry_after: None,
                want: (30.0, 2.0, 0.0),
            },
            Case {
                what: "token usable long enough: ordinary delay",
                outage: 3.0,
                usable_for: Some(60.0),
                retry_after: None,
                want: (3.0, 2.0, 0.0),
            },
            Case {
                what: "token runs out before the retry: brought forward",
                outage: 10.0,
                usable_for: Some(2.0),
                retry_after: None,
                want: (1.5, 1.5, 0.0),
            },
            Case {
                what: "token nearly gone: no sooner than retry_initial",
                outage: 10.0,
                usable_for: Some(0.3),
                retry_after: None,
                want: (0.5, 0.5, 0.0),
            },
            Case {
                what: "Retry-After wins over waiting requests",
                outage: 600.0,
                usable_for: None,
                retry_after: Some(20.0),
                want: (30.0, 20.0, 20.0),
            },
            Case {
                what: "Retry-After capped by retry_max",
                outage: 0.0,
                usable_for: None,
                retry_after: Some(3600.0),
                want: (30.0, 30.0, 30.0),
            },
            Case {
                what: "a short Retry-After does not stop the bring-forward",
                outage: 600.0,
                usable_for: Some(5.0),
                retry_after: Some(1.0),
                want: (4.5, 2.0, 1.0),
            },
            Case {
                what: "Retry-After wins over the token running out",
                outage: 0.0,
                usable_for: Some(1.0),
                retry_after: Some(5.0),
                want: (5.0, 5.0, 5.0),
            },
        ];
        for c in cases {
            let got = Schedule::after_failure(
                &p,
                now,
                secs(c.outage),
                c.usable_for.map(at),
                c.retry_after.map(secs),
                (1.0, 0.0),
            );
            let want = Schedule {
                ordinary: at(c.want.0),
                without_token: at(c.want.1),
                not_before: at(c.want.2),
            };
            assert_eq!(got, want, "{}", c.what);
            assert_eq!(got.due(false), got.ordinary, "{}", c.what);
            assert_eq!(got.due(true), got.without_token, "{}", c.what);
        }
    }

    #[test]
    fn policy_rejects_bad_values() {
        // The defaults of `[tokens]`.
        let mut t = super::super::lifecycle_tests::tokens();
        assert!(Policy::try_new(&t).is_ok());
        t.refresh_fraction = 1.0;
        assert!(Policy::try_new(&t).is_err());
        t.refresh_fraction = 0.75;
        t.retry_max_without_token = secs(0.1);
        assert!(Policy::try_new(&t).is_err());
        t.retry_max_without_token = secs(2.0);
        t.retry_max = secs(0.1);
        assert!(Policy::try_new(&t).is_err());
    }

    #[test]
    fn retries_are_brought_forward_before_the_held_token_runs_out() {
        use super::before_unusable;
        let now = Instant::now();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let gap = ms(50);
        // In time already: unchanged.
        assert_eq!(before_unusable(ms(800), now + s(2), now, gap), ms(800));
        // Would overshoot: half a second before the end.
        assert_eq!(before_unusable(s(4), now + s(2), now, gap), ms(1500));
        // Little time left: half of it, but not sooner than the gap.
        assert_eq!(before_unusable(s(4), now + ms(400), now, gap), ms(200));
        assert_eq!(before_unusable(s(4), now + ms(60), now, gap), ms(50));
        assert_eq!(before_unusable(s(4), now + ms(400), now, ms(500)), ms(500));
        // Never later than the backoff itself.
        assert_eq!(
            before_unusable(ms(450), now + ms(400), now, ms(500)),
            ms(450)
        );
        // Already unusable: normal backoff.
        assert_eq!(before_unusable(s(4), now, now, gap), s(4));
    }
}
