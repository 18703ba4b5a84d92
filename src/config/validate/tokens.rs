//! `[tokens]`: token lifetime and renewal policy, shared by all profiles.

use std::time::Duration;

use crate::config::Tokens;
use crate::config::raw::RawTokens;

use super::Validator;

impl Validator<'_> {
    pub(super) fn tokens(&mut self, t: RawTokens) -> Tokens {
        let tokens = Tokens {
            request_timeout: self.duration("tokens.request_timeout", t.request_timeout, "10s"),
            default_lifetime: self.duration("tokens.default_lifetime", t.default_lifetime, "5m"),
            refresh_fraction: t.refresh_fraction.unwrap_or(0.75),
            refresh_margin: self.duration("tokens.refresh_margin", t.refresh_margin, "1m"),
            expiry_skew: self.duration("tokens.expiry_skew", t.expiry_skew, "5s"),
            retry_initial: self.duration("tokens.retry_initial", t.retry_initial, "500ms"),
            retry_max: self.duration("tokens.retry_max", t.retry_max, "30s"),
            retry_max_without_token: self.duration(
                "tokens.retry_max_without_token",
                t.retry_max_without_token,
                "2s",
            ),
            unauthorized_refresh_interval: self.duration(
                "tokens.unauthorized_refresh_interval",
                t.unauthorized_refresh_interval,
                "5s",
            ),
        };
        if !(0.1..=0.95).contains(&tokens.refresh_fraction) {
            self.problem(
                "tokens.refresh_fraction",
                format!(
                    "{} is out of range; expected 0.1 to 0.95",
                    tokens.refresh_fraction
                ),
            );
        }
        for (key, d) in [
            ("tokens.request_timeout", tokens.request_timeout),
            ("tokens.default_lifetime", tokens.default_lifetime),
            ("tokens.retry_initial", tokens.retry_initial),
        ] {
            if d.is_zero() {
                self.problem(key, "must be greater than zero");
            }
        }
        // Tokens living under a second are refused (see token::refresh).
        if !tokens.default_lifetime.is_zero() && tokens.default_lifetime < Duration::from_secs(1) {
            self.problem("tokens.default_lifetime", "must be at least 1s");
        }
        if tokens.retry_max < tokens.retry_initial {
            self.problem(
                "tokens.retry_max",
                "must not be less than tokens.retry_initial",
            );
        }
        if tokens.retry_max_without_token < tokens.retry_initial {
            self.problem(
                "tokens.retry_max_without_token",
                "must not be less than tokens.retry_initial",
            );
        }
        tokens
    }
}
