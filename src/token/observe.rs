//! What a profile's credential task reports after each attempt, apart from
//! the task's logic: the metrics are one [`Observe`]r (in the spirit of
//! linkerd2-proxy's `WithCertMetrics`), tested alone, and tests of the
//! refresh loop can pass `()`.

use std::time::{Duration, UNIX_EPOCH};

use super::{FetchError, Token};

/// Told the outcome of every attempt to obtain a credential.
pub trait Observe: Send + Sync + 'static {
    /// A credential was obtained and published, `elapsed` after the
    /// attempt began.
    fn fetched(&self, elapsed: Duration, token: &Token);
    /// The attempt failed; `consecutive` counts this run of failures.
    fn failed(&self, elapsed: Duration, error: &FetchError, consecutive: u32);
    /// A token another replica fetched was adopted from the shared cache and
    /// published: no request went to the authorization server.
    fn adopted(&self, _token: &Token) {}
}

/// Observes nothing.
impl Observe for () {
    fn fetched(&self, _: Duration, _: &Token) {}
    fn failed(&self, _: Duration, _: &FetchError, _: u32) {}
}

/// A static credential has no expiry: the gauge stays 0, which the expiry
/// alert ignores.
fn expires_unix(token: &Token) -> f64 {
    if token.is_permanent() {
        0.0
    } else {
        token
            .expires_unix()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

/// `token_injector_token_fetch_*`, the expiry gauge and the failure gauge.
impl Observe for crate::metrics::ProfileMetrics {
    fn fetched(&self, elapsed: Duration, token: &Token) {
        crate::metrics::ProfileMetrics::fetched(self, elapsed.as_secs_f64(), expires_unix(token));
    }

    fn adopted(&self, token: &Token) {
        crate::metrics::ProfileMetrics::adopted(self, expires_unix(token));
    }

    fn failed(&self, elapsed: Duration, error: &FetchError, consecutive: u32) {
        crate::metrics::ProfileMetrics::failed(
            self,
            elapsed.as_secs_f64(),
            error.reason(),
            consecutive,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn series(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn profile_metrics_record_each_outcome() {
        let metrics = crate::metrics::Metrics::new();
        let p = metrics.tokens.profile("billing");
        let policy = super::super::Policy::for_tests();
        let token = Token::new(
            &Secret::new("t".into()),
            tokio::time::Instant::now(),
            Duration::from_secs(60),
            &policy,
            0.0,
        )
        .unwrap();
        let error = FetchError::Timeout(Duration::from_secs(10));
        Observe::failed(&p, Duration::from_millis(5), &error, 1);
        Observe::failed(&p, Duration::from_millis(5), &error, 2);
        let text = metrics.render();
        assert_eq!(
            series(
                &text,
                "token_injector_token_fetch_total{profile=\"billing\",result=\"error\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            series(
                &text,
                "token_injector_token_fetch_consecutive_failures{profile=\"billing\"}"
            ),
            Some(2.0),
            "{text}"
        );
        Observe::fetched(&p, Duration::from_millis(5), &token);
        let text = metrics.render();
        let expiry = series(
            &text,
            "token_injector_token_expiry_timestamp_seconds{profile=\"billing\"}",
        )
        .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((expiry - (now + 60.0)).abs() < 5.0, "{expiry} vs {now}");
        assert_eq!(
            series(
                &text,
                "token_injector_token_fetch_consecutive_failures{profile=\"billing\"}"
            ),
            Some(0.0)
        );
        // A static credential leaves the expiry gauge at 0.
        let fixed = Token::permanent(&Secret::new("k".into())).unwrap();
        Observe::fetched(&p, Duration::ZERO, &fixed);
        let text = metrics.render();
        assert_eq!(
            series(
                &text,
                "token_injector_token_expiry_timestamp_seconds{profile=\"billing\"}"
            ),
            Some(0.0)
        );
    }
}
