//! The per-profile refresh task and the pure functions that time it.
//!
//! The task fetches at start, publishes each token to the [`Store`], sleeps
//! until the token's renewal time (a fraction of its lifetime, jittered), and
//! on failure keeps the current token and retries with exponential backoff
//! and jitter. An invalidation (an upstream 401) wakes it early.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config;

use super::{Client, Store, Token};

/// Renewals are never scheduled closer together than this, so a server that
/// returns an almost-expired token cannot make the task spin.
const MIN_REFRESH: Duration = Duration::from_millis(100);

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

    /// The delay before retry number `attempt` (1-based): exponential from
    /// `retry_initial`, capped at `retry_max`, with "equal jitter" (half
    /// fixed, half random) so retries spread without collapsing to zero.
    pub fn retry_in(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        let d = self.retry_initial.mul_f64(exp).min(self.retry_max);
        d / 2 + (d / 2).mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Runs the refresh loop for one profile until the task is aborted.
pub async fn run(
    store: Arc<Store>,
    client: Arc<Client>,
    policy: Policy,
    metrics: crate::metrics::ProfileMetrics,
) {
    let mut failures: u32 = 0;
    loop {
        store.begin_fetch();
        let sent = Instant::now();
        let result = client.fetch().await;
        let elapsed = sent.elapsed();
        let next = match result.and_then(|parsed| {
            if parsed.lifetime < MIN_LIFETIME {
                return Err(super::FetchError::InvalidResponse(format!(
                    "the token lives {:?}, less than the minimum {MIN_LIFETIME:?}",
                    parsed.lifetime
                )));
            }
            let held = store.peek();
            let lifetime = same_token_lifetime(held.as_deref(), &parsed, sent);
            let mut token = Token::new(
                &parsed.access_token,
                sent,
                lifetime,
                &policy,
                fastrand::f64(),
            )?;
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
                let next = token.refresh_at();
                tracing::info!(
                    profile = %store.profile(),
                    duration_ms = elapsed.as_millis() as u64,
                    lifetime_s = lifetime.as_secs_f64(),
                    renew_in_s = next.saturating_duration_since(Instant::now()).as_secs_f64(),
                    result = "success",
                    "token fetched"
                );
                let expires_unix = token
                    .expires_unix()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                metrics.fetched(elapsed.as_secs_f64(), expires_unix);
                store.publish(Arc::new(token));
                next
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let mut delay = policy.retry_in(failures, fastrand::f64());
                if let Some(ra) = error.retry_after() {
                    // Honour the server's Retry-After, within our own cap.
                    delay = delay.max(ra.min(policy.retry_max));
                } else if let Some(held) = store.peek() {
                    // A short outage must not outlast the token in hand just
                    // because the backoff overshot its end.
                    delay = before_unusable(delay, held.usable_until(), Instant::now());
                }
                tracing::warn!(
                    profile = %store.profile(),
                    duration_ms = elapsed.as_millis() as u64,
                    result = "error",
                    reason = error.reason(),
                    consecutive_failures = failures,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %error,
                    "token fetch failed"
                );
                metrics.failed(elapsed.as_secs_f64(), error.reason(), failures);
                store.fail(&error);
                Instant::now() + delay
            }
        };
        // Sleep until the next renewal. A wake that finds no usable token (an
        // upstream 401, rate-limited by the store) fetches at once.
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => break,
                _ = store.woken() => {
                    if store.current().is_none() {
                        break;
                    }
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
/// token in hand is usable: up to half a second before `until`, never sooner
/// than 50 ms from now. Unchanged when the retry already comes in time or
/// the token is no longer usable.
fn before_unusable(delay: Duration, until: Instant, now: Instant) -> Duration {
    let left = until.saturating_duration_since(now);
    if left.is_zero() || delay < left {
        return delay;
    }
    let early = (left / 2).min(Duration::from_millis(500));
    (left - early).max(Duration::from_millis(50))
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
    fn retry_backs_off_exponentially_with_cap() {
        let p = Policy::for_tests(); // 500 ms .. 30 s
        assert_eq!(p.retry_in(1, 1.0), secs(0.5));
        assert_eq!(p.retry_in(1, 0.0), secs(0.25));
        assert_eq!(p.retry_in(2, 1.0), secs(1.0));
        assert_eq!(p.retry_in(4, 1.0), secs(4.0));
        assert_eq!(p.retry_in(20, 1.0), secs(30.0));
        assert_eq!(p.retry_in(u32::MAX, 0.0), secs(15.0));
    }

    #[test]
    fn policy_rejects_bad_values() {
        let mut t = config::Tokens {
            request_timeout: secs(10.0),
            default_lifetime: secs(300.0),
            refresh_fraction: 0.75,
            refresh_margin: secs(60.0),
            expiry_skew: secs(5.0),
            retry_initial: secs(0.5),
            retry_max: secs(30.0),
            unauthorized_refresh_interval: secs(5.0),
        };
        assert!(Policy::try_new(&t).is_ok());
        t.refresh_fraction = 1.0;
        assert!(Policy::try_new(&t).is_err());
        t.refresh_fraction = 0.75;
        t.retry_max = secs(0.1);
        assert!(Policy::try_new(&t).is_err());
    }

    #[test]
    fn retries_are_brought_forward_before_the_held_token_runs_out() {
        use super::before_unusable;
        let now = Instant::now();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // In time already: unchanged.
        assert_eq!(before_unusable(ms(800), now + s(2), now), ms(800));
        // Would overshoot: half a second before the end.
        assert_eq!(before_unusable(s(4), now + s(2), now), ms(1500));
        // Little time left: half of it, but not sooner than 50 ms.
        assert_eq!(before_unusable(s(4), now + ms(400), now), ms(200));
        assert_eq!(before_unusable(s(4), now + ms(60), now), ms(50));
        // Already unusable: normal backoff.
        assert_eq!(before_unusable(s(4), now, now), s(4));
    }
}
