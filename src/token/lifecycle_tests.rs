//! A token's whole life in paused time: the refresh loop driven by a
//! scripted [`Source`], with requests reading the [`Store`] as the proxy
//! does. Timings here are exact tokio time, not wall-clock time on a busy
//! machine; each scenario runs under many jitter seeds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::response::Parsed;
use super::{FetchError, Policy, Source, Store};
use crate::config;
use crate::secret::Secret;

/// What the scripted token endpoint answers at a time since the start.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A new token with this lifetime.
    Issue(Duration),
    /// HTTP 500.
    Fail,
    /// HTTP 429 with `Retry-After`.
    RetryAfter(Duration),
    /// The same token every time, said to live this long from now.
    Same(Duration),
}

struct Scripted {
    start: Instant,
    script: Box<dyn Fn(Duration) -> Answer + Send + Sync>,
    /// When each attempt came, since the start.
    attempts: Mutex<Vec<Duration>>,
}

impl Source for Scripted {
    async fn fetch(&self, _: super::source::Attempt) -> Result<Parsed, FetchError> {
        let t = self.start.elapsed();
        let n = {
            let mut a = self.attempts.lock().unwrap();
            a.push(t);
            a.len()
        };
        match (self.script)(t) {
            Answer::Issue(lifetime) => Ok(Parsed {
                access_token: Secret::new(format!("tok-{n}")),
                lifetime,
                scope: None,
                issued: None,
                dpop: None,
            }),
            Answer::Same(lifetime) => Ok(Parsed {
                access_token: Secret::new("tok-same".into()),
                lifetime,
                scope: None,
                issued: None,
                dpop: None,
            }),
            Answer::Fail => Err(rejected(500, None)),
            Answer::RetryAfter(ra) => Err(rejected(429, Some(ra))),
        }
    }
}

fn rejected(status: u16, retry_after: Option<Duration>) -> FetchError {
    FetchError::Rejected {
        status,
        error: None,
        description: None,
        retry_after,
    }
}

/// The defaults of `[tokens]`.
pub(super) fn tokens() -> config::Tokens {
    config::Tokens {
        request_timeout: secs(10.0),
        default_lifetime: secs(300.0),
        refresh_fraction: 0.75,
        refresh_margin: secs(60.0),
        expiry_skew: secs(5.0),
        retry_initial: secs(0.5),
        retry_max: secs(30.0),
        retry_max_without_token: secs(2.0),
        unauthorized_refresh_interval: secs(5.0),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// One request as the proxy sees it.
#[derive(Debug)]
struct Seen {
    at: Duration,
    /// The token's expiry, since the start, when one was served.
    served_until: Option<Duration>,
}

struct Run {
    attempts: Vec<Duration>,
    requests: Vec<Seen>,
    /// Each failure's state and last error, as `/readyz` shows them.
    last_errors: Vec<(Duration, bool)>,
}

/// Runs the refresh loop with `script` for `length`, with a request every
/// `every` (none if `None`), seeding the loop's jitter with `seed`.
async fn run(
    t: config::Tokens,
    script: impl Fn(Duration) -> Answer + Send + Sync + 'static,
    every: Option<Duration>,
    length: Duration,
    seed: u64,
) -> Run {
    fastrand::seed(seed);
    let start = Instant::now();
    let source = Arc::new(Scripted {
        start,
        script: Box::new(script),
        attempts: Mutex::new(Vec::new()),
    });
    let store = Arc::new(Store::new("p", t.unauthorized_refresh_interval));
    let metrics = crate::metrics::Metrics::new().tokens.profile("p");
    let task = tokio::spawn(super::refresh::run(
        Arc::clone(&store),
        Arc::clone(&source),
        Policy::try_new(&t).unwrap(),
        metrics,
    ));
    let mut requests = Vec::new();
    let mut last_errors = Vec::new();
    let wait = t.request_timeout + Duration::from_millis(500);
    match every {
        Some(every) => {
            let mut next = start;
            while next.duration_since(start) < length {
                tokio::time::sleep_until(next).await;
                let at = start.elapsed();
                let served_until = match store.get(wait).await {
                    Ok(token) => {
                        // What the proxy would send must not be expired.
                        assert!(token.usable_at(Instant::now()), "unusable token at {at:?}");
                        Some(token.expires_at().duration_since(start))
                    }
                    Err(_) => None,
                };
                requests.push(Seen { at, served_until });
                last_errors.push((at, store.last_error().is_some()));
                next += every;
            }
        }
        None => tokio::time::sleep(length).await,
    }
    task.abort();
    let attempts = source.attempts.lock().unwrap().clone();
    Run {
        attempts,
        requests,
        last_errors,
    }
}

fn gaps(v: &[Duration]) -> Vec<Duration> {
    v.windows(2).map(|w| w[1] - w[0]).collect()
}

/// The issue's scenario: 5 s tokens, an outage from before the first renewal
/// until 3 s after expiry, a request every 250 ms. Before this change the
/// pulled-forward retries walked the backoff to 30 s, and requests failed
/// for ~29 s after the endpoint came back.
#[tokio::test(start_paused = true)]
async fn outage_straddling_expiry_recovers_within_the_cap() {
    let t = tokens();
    let every = Duration::from_millis(250);
    let (down, up) = (secs(2.0), secs(8.0)); // the first token expires at 5 s
    for seed in 0..40 {
        let r = run(
            t.clone(),
            move |at| {
                if at >= down && at < up {
                    Answer::Fail
                } else {
                    Answer::Issue(secs(5.0))
                }
            },
            Some(every),
            secs(14.0),
            seed,
        )
        .await;
        // The held token serves until expiry minus the skew (a tenth of
        // 5 s), with no failure before.
        let first_failure = r.requests.iter().find(|s| s.served_until.is_none());
        let first_failure = first_failure.expect("the outage outlasted the token").at;
        assert!(
            first_failure >= secs(4.5),
            "seed {seed}: failed at {first_failure:?}"
        );
        // Back within retry_max_without_token + one request interval.
        let recovered = r
            .requests
            .iter()
            .find(|s| s.at >= up && s.served_until.is_some())
            .expect("never recovered")
            .at;
        assert!(
            recovered <= up + t.retry_max_without_token + every,
            "seed {seed}: first 200 at {recovered:?}, endpoint back at {up:?}; attempts {:?}",
            r.attempts
        );
        // And no failure after that.
        assert!(
            r.requests
                .iter()
                .filter(|s| s.at >= recovered)
                .all(|s| s.served_until.is_some()),
            "seed {seed}"
        );
        // No served token was past its expiry (checked per request above);
        // the status showed the outage while it lasted and cleared after.
        assert!(r.last_errors.iter().any(|&(at, e)| at < up && e));
        assert!(r.last_errors.iter().all(|&(at, e)| at < recovered || !e));
    }
}

/// Near expiry, no burst: the retries brought forward so that one comes
/// while the held token is usable are at least `retry_initial` apart
/// (before this change they came down to 50 ms apart). No request waits for
/// a token here, so only the ordinary backoff runs.
#[tokio::test(start_paused = true)]
async fn retries_brought_forward_before_expiry_are_retry_initial_apart() {
    let t = tokens();
    for seed in 0..40 {
        let r = run(
            t.clone(),
            |at| {
                if at < secs(1.0) {
                    Answer::Issue(secs(5.0))
                } else {
                    Answer::Fail
                }
            },
            None,
            secs(4.5), // the token is usable until 4.5 s
            seed,
        )
        .await;
        let failed: Vec<Duration> = r.attempts[1..].to_vec();
        assert!(failed.len() >= 3, "seed {seed}: {failed:?}");
        for gap in gaps(&failed) {
            // Equal jitter keeps any retry at least half of retry_initial
            // out, and a retry brought forward a whole one.
            assert!(gap >= t.retry_initial / 2, "seed {seed}: {failed:?}");
        }
        let last_second = failed.iter().filter(|&&a| a >= secs(3.5)).count();
        assert!(last_second <= 2, "seed {seed}: {failed:?}");
        // One attempt still came while the token was usable, late enough to
        // matter: in its last second.
        assert!(last_second >= 1, "seed {seed}: {failed:?}");
    }
}

/// A 10-minute outage. With requests waiting: at most one attempt per
/// `retry_max_without_token`, give or take its 10 % jitter, and never a gap
/// longer than it. Without requests: the ordinary backoff, up to `retry_max`.
#[tokio::test(start_paused = true)]
async fn long_outage_with_and_without_traffic() {
    let t = tokens();
    let outage = secs(600.0);
    let script = |at: Duration| {
        if at < Duration::from_millis(100) {
            Answer::Issue(secs(5.0))
        } else {
            Answer::Fail
        }
    };
    for seed in 0..3 {
        let busy = run(
            t.clone(),
            script,
            Some(Duration::from_millis(250)),
            outage,
            seed,
        )
        .await;
        // From the moment requests find no usable token (4.5 s).
        let waiting: Vec<Duration> = busy
            .attempts
            .iter()
            .copied()
            .filter(|&a| a >= secs(6.0))
            .collect();
        let span = waiting.last().unwrap().as_secs_f64() - waiting[0].as_secs_f64();
        let per_cap = span / t.retry_max_without_token.as_secs_f64();
        let n = (waiting.len() - 1) as f64;
        println!(
            "seed {seed}: {n} retries in {span:.1} s with requests waiting ({per_cap:.1} caps)"
        );
        assert!(
            n <= per_cap / 0.9 + 1.0,
            "seed {seed}: {n} attempts, {per_cap} caps"
        );
        assert!(
            n >= per_cap - 1.0,
            "seed {seed}: {n} attempts, {per_cap} caps"
        );
        for gap in gaps(&waiting) {
            assert!(gap <= t.retry_max_without_token, "seed {seed}: {gap:?}");
            assert!(
                gap >= t.retry_max_without_token.mul_f64(0.9),
                "seed {seed}: {gap:?}"
            );
        }

        let idle = run(t.clone(), script, None, outage, seed).await;
        let g = gaps(&idle.attempts[1..]);
        println!(
            "seed {seed}: {} attempts in 10 min without traffic, last gaps {:?}",
            idle.attempts.len(),
            &g[g.len() - 3..]
        );
        assert!(
            idle.attempts.len() <= 50,
            "seed {seed}: {}",
            idle.attempts.len()
        );
        assert!(g.iter().all(|&gap| gap <= t.retry_max), "seed {seed}");
        // Long into the outage, the delay is at retry_max (equal jitter).
        assert!(
            g[g.len() - 5..].iter().all(|&gap| gap >= t.retry_max / 2),
            "seed {seed}: {g:?}"
        );
    }
}

/// A 429 with `Retry-After: 20` while requests wait: the next attempt is at
/// least 20 s later, and with `retry_max = 10s` at least 10 s.
#[tokio::test(start_paused = true)]
async fn retry_after_wins_while_requests_wait() {
    for (retry_max, floor) in [(30.0, 20.0), (10.0, 10.0)] {
        let mut t = tokens();
        t.retry_max = secs(retry_max);
        for seed in 0..5 {
            let r = run(
                t.clone(),
                |at| {
                    if at < secs(1.0) {
                        Answer::Issue(secs(5.0))
                    } else {
                        Answer::RetryAfter(secs(20.0))
                    }
                },
                Some(Duration::from_millis(250)),
                secs(120.0),
                seed,
            )
            .await;
            let refused = &r.attempts[1..];
            assert!(refused.len() >= 3, "seed {seed}: {refused:?}");
            for gap in gaps(refused) {
                assert!(gap >= secs(floor), "retry_max {retry_max}: {refused:?}");
                assert!(
                    gap <= secs(floor.max(2.0) + 0.001),
                    "retry_max {retry_max}: {refused:?}"
                );
            }
        }
    }
}

/// An upstream 401 while a `Retry-After` holds: the refetch waits for it,
/// and the requests that asked for it get their answer at once instead of at
/// their timeout.
#[tokio::test(start_paused = true)]
async fn invalidation_during_retry_after_waits_for_it() {
    let t = tokens();
    let start = Instant::now();
    let source = Arc::new(Scripted {
        start,
        script: Box::new(|at| {
            if at < secs(1.0) {
                Answer::Issue(secs(60.0))
            } else {
                Answer::RetryAfter(secs(20.0))
            }
        }),
        attempts: Mutex::new(Vec::new()),
    });
    let store = Arc::new(Store::new("p", Duration::ZERO));
    let task = tokio::spawn(super::refresh::run(
        Arc::clone(&store),
        Arc::clone(&source),
        Policy::try_new(&t).unwrap(),
        crate::metrics::Metrics::new().tokens.profile("p"),
    ));
    let token = store.get(secs(1.0)).await.unwrap();
    // Renewal at 40.5–45 s fails with Retry-After: 20.
    tokio::time::sleep(secs(46.0)).await;
    assert_eq!(source.attempts.lock().unwrap().len(), 2);
    assert!(store.invalidate(&token) == super::store::Invalidated::Refetching);
    let asked = Instant::now();
    let answer = store.get(secs(10.5)).await;
    assert!(answer.is_err());
    assert!(asked.elapsed() < secs(0.1), "waited {:?}", asked.elapsed());
    tokio::time::sleep(secs(25.0)).await;
    let attempts = source.attempts.lock().unwrap().clone();
    assert!(attempts.len() >= 3, "{attempts:?}");
    assert!(attempts[2] - attempts[1] >= secs(20.0), "{attempts:?}");
    task.abort();
}

/// Renewal at the policy's time: 5 s tokens renew every 2.25–2.5 s (half
/// the lifetime, up to 10 % earlier), and no request ever waits or fails.
/// (End to end with a TLS token server: tests/it/proxy.rs.)
#[tokio::test(start_paused = true)]
async fn short_tokens_renew_at_half_their_life_and_no_request_fails() {
    for seed in 0..10 {
        let r = run(
            tokens(),
            |_| Answer::Issue(secs(5.0)),
            Some(Duration::from_millis(100)),
            secs(30.0),
            seed,
        )
        .await;
        assert!(
            r.requests.iter().all(|s| s.served_until.is_some()),
            "seed {seed}"
        );
        for gap in gaps(&r.attempts) {
            assert!(
                gap >= secs(2.25) && gap <= secs(2.5),
                "seed {seed}: {gap:?}"
            );
        }
        assert!(r.attempts.len() >= 12, "seed {seed}: {:?}", r.attempts);
    }
}

/// A server that answers every renewal with the token it already gave and
/// a fresh `expires_in`: the token is never sent past its first expiry
/// (minus the skew), and the task renews at half the time left instead of
/// trusting the new lifetime.
#[tokio::test(start_paused = true)]
async fn a_reissued_token_keeps_its_first_expiry() {
    let r = run(
        tokens(),
        |_| Answer::Same(secs(5.0)),
        Some(Duration::from_millis(50)),
        secs(8.0),
        7,
    )
    .await;
    // First issued at 0: expires at 5 s, usable until 4.5 s.
    for s in &r.requests {
        if let Some(until) = s.served_until {
            assert!(
                until <= secs(5.0),
                "served with expiry {until:?} at {:?}",
                s.at
            );
            assert!(s.at < secs(4.5), "served at {:?}", s.at);
        }
    }
    assert!(
        r.requests
            .iter()
            .any(|s| s.at >= secs(4.5) && s.served_until.is_none())
    );
    // Renewals came sooner than the fresh 5 s lifetime would say (2.25 s
    // after each), at half the time left.
    let g = gaps(&r.attempts);
    assert!(g.len() >= 3, "{:?}", r.attempts);
    assert!(g[1] < secs(2.25), "{:?}", r.attempts);
}

/// A source that answers with a token issued before the attempt (as the
/// shared cache does when another replica renewed) and records what the
/// loop told it at each attempt.
/// Per attempt: since the start, the held token's value, the refused one's.
type AttemptSeen = (Duration, Option<String>, Option<String>);

struct Adopting {
    start: Instant,
    seen: Mutex<Vec<AttemptSeen>>,
}

impl Source for Adopting {
    async fn fetch(&self, attempt: super::source::Attempt) -> Result<Parsed, FetchError> {
        let value = |t: &Option<Arc<super::Token>>| {
            t.as_ref()
                .map(|t| String::from_utf8_lossy(t.value().as_bytes()).into_owned())
        };
        let n = {
            let mut seen = self.seen.lock().unwrap();
            seen.push((
                self.start.elapsed(),
                value(&attempt.held),
                value(&attempt.refused),
            ));
            seen.len()
        };
        // Issued 3 s ago by another replica, 10 s lifetime: 7 s left.
        Ok(Parsed {
            access_token: Secret::new(format!("shared-{n}")),
            lifetime: secs(10.0),
            scope: None,
            issued: Some(Instant::now() - secs(3.0)),
            dpop: None,
        })
    }
}

/// An adopted token is renewed from its original lifetime, not from what
/// was left when it was adopted, and expires when it was first going to;
/// after an upstream 401 the next attempt is told which token was refused.
#[tokio::test(start_paused = true)]
async fn adopted_tokens_keep_their_issue_time_and_refusals_are_passed_on() {
    // Time starts far enough from the clock's origin for `now - 3 s`.
    tokio::time::advance(secs(60.0)).await;
    let store = Arc::new(Store::new("p", Duration::from_millis(1)));
    let source = Arc::new(Adopting {
        start: Instant::now(),
        seen: Mutex::new(Vec::new()),
    });
    let policy = Policy::try_new(&tokens()).unwrap();
    let task = tokio::spawn(super::refresh::run(
        Arc::clone(&store),
        Arc::clone(&source),
        policy,
        (),
    ));
    let first = store.get(secs(1.0)).await.unwrap();
    let now = Instant::now();
    // Expires 10 s after it was issued, 3 s ago: in 7 s (not in 10).
    let left = first.expires_at() - now;
    assert!(left <= secs(7.0) && left > secs(6.9), "{left:?}");
    // 10 s tokens renew at half their life (margin 60 s > lifetime), up to
    // 10 % earlier: 4.5..5 s after issue, so 1.5..2 s from now (counted
    // from the adoption it would be 4.5..5 s).
    let renew_in = first.refresh_at() - now;
    assert!(
        renew_in >= secs(1.4) && renew_in <= secs(2.0),
        "{renew_in:?}"
    );
    // The renewal happens and the loop says which token it held.
    tokio::time::sleep(secs(2.5)).await;
    let second = store.current().unwrap();
    assert_eq!(second.value().as_bytes(), b"shared-2");
    {
        let seen = source.seen.lock().unwrap();
        assert_eq!(seen[0].1, None, "nothing held at start");
        assert_eq!(seen[1].1.as_deref(), Some("shared-1"), "{seen:?}");
        assert_eq!(seen[1].2, None, "nothing refused");
    }
    // An upstream refuses the current token: the next attempt knows it.
    assert_eq!(
        store.invalidate(&second),
        super::store::Invalidated::Refetching
    );
    let third = store.get(secs(1.0)).await.unwrap();
    assert_eq!(third.value().as_bytes(), b"shared-3");
    let seen = source.seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2].1, None, "{seen:?}");
    assert_eq!(seen[2].2.as_deref(), Some("shared-2"), "{seen:?}");
    task.abort();
}

/// An adopted token whose renewal time has already passed (adopted late in
/// its life) is renewed soon, but never in a tight loop.
#[tokio::test(start_paused = true)]
async fn adopting_a_token_past_its_renewal_time_does_not_spin() {
    tokio::time::advance(secs(60.0)).await;
    struct Late(Mutex<u32>);
    impl Source for Late {
        async fn fetch(&self, _: super::source::Attempt) -> Result<Parsed, FetchError> {
            let n = {
                let mut n = self.0.lock().unwrap();
                *n += 1;
                *n
            };
            // 10 s lifetime, issued 8 s ago: its renewal point (5 s) passed.
            Ok(Parsed {
                access_token: Secret::new(format!("late-{n}")),
                lifetime: secs(10.0),
                scope: None,
                issued: Some(Instant::now() - secs(8.0)),
                dpop: None,
            })
        }
    }
    let store = Arc::new(Store::new("p", Duration::from_millis(1)));
    let source = Arc::new(Late(Mutex::new(0)));
    let task = tokio::spawn(super::refresh::run(
        Arc::clone(&store),
        Arc::clone(&source),
        Policy::try_new(&tokens()).unwrap(),
        (),
    ));
    tokio::time::sleep(secs(1.0)).await;
    let n = *source.0.lock().unwrap();
    // At most one attempt per MIN_REFRESH (100 ms).
    assert!((2..=11).contains(&n), "{n} attempts in 1 s");
    task.abort();
}
