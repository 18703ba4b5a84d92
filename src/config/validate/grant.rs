//! A token endpoint profile's `grant`: the keys of each grant (client
//! credentials, JWT bearer with a key, an assertion file or a Google key
//! file, token exchange with a subject file or another profile), each
//! refused where another grant owns it.

use crate::config::raw::RawProfile;
use crate::config::{Assertion, Exchange, Grant, Subject};
use crate::keys::SigningKey;

use super::Validator;

/// RFC 8693 §3's token type identifiers, for `check` to catch typos; other
/// absolute URIs are accepted too (a server's own types).
const TOKEN_TYPES: [&str; 6] = [
    "urn:ietf:params:oauth:token-type:access_token",
    "urn:ietf:params:oauth:token-type:refresh_token",
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:saml1",
    "urn:ietf:params:oauth:token-type:saml2",
    "urn:ietf:params:oauth:token-type:jwt",
];

/// The access token type, the default subject type of a chain.
pub const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

impl Validator<'_> {
    /// The grant of profile `name` (`kind` is its `grant`), and for a
    /// Google key file its token endpoint and client email.
    pub(super) fn grant(
        &mut self,
        name: &str,
        p: &RawProfile,
        kind: &str,
    ) -> (Option<Grant>, Option<(url::Url, String)>) {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let jwt_keys = [
            (
                "google_credentials_file",
                p.google_credentials_file.is_some(),
            ),
            ("assertion_issuer", p.assertion_issuer.is_some()),
            ("assertion_subject", p.assertion_subject.is_some()),
            ("assertion_file", p.assertion_file.is_some()),
        ];
        let exchange_keys = [
            ("subject_token_file", p.subject_token_file.is_some()),
            ("subject_profile", p.subject_profile.is_some()),
            ("subject_token_type", p.subject_token_type.is_some()),
            ("actor_token_file", p.actor_token_file.is_some()),
            ("actor_token_type", p.actor_token_type.is_some()),
            ("requested_token_type", p.requested_token_type.is_some()),
        ];
        let mut stray = false;
        for (owner, keys) in [
            ("jwt_bearer", &jwt_keys[..]),
            ("token_exchange", &exchange_keys[..]),
        ] {
            if owner == kind {
                continue;
            }
            for (k, set) in keys {
                if *set {
                    self.problem(key(k), format!("only used with grant = \"{owner}\""));
                    stray = true;
                }
            }
        }
        let grant = match kind {
            "jwt_bearer" => return self.jwt_bearer(name, p, stray),
            "token_exchange" => self.exchange(name, p).map(Grant::TokenExchange),
            _ => Some(Grant::ClientCredentials),
        };
        (grant.filter(|_| !stray), None)
    }

    fn jwt_bearer(
        &mut self,
        name: &str,
        p: &RawProfile,
        stray: bool,
    ) -> (Option<Grant>, Option<(url::Url, String)>) {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let sources = [
            (
                "google_credentials_file",
                p.google_credentials_file.is_some(),
            ),
            ("assertion_file", p.assertion_file.is_some()),
            ("private_key_file", p.private_key_file.is_some()),
        ];
        let set: Vec<&str> = sources
            .iter()
            .filter(|(_, s)| *s)
            .map(|(k, _)| *k)
            .collect();
        if set.len() > 1 {
            self.problem(
                key(set[1]),
                format!("set one of google_credentials_file, assertion_file or private_key_file, not both {} and {}", set[0], set[1]),
            );
            return (None, None);
        }
        // The keys only a signed assertion reads.
        let signing_keys = [
            ("key_id", p.key_id.is_some()),
            ("signing_alg", p.signing_alg.is_some()),
            ("assertion_audience", p.assertion_audience.is_some()),
            ("assertion_issuer", p.assertion_issuer.is_some()),
            ("assertion_subject", p.assertion_subject.is_some()),
        ];
        let refuse_signing_keys = |v: &mut Self, why: &str| {
            let mut any = false;
            for (k, s) in signing_keys {
                if s {
                    v.problem(key(k), why.to_owned());
                    any = true;
                }
            }
            any
        };
        match set.first().copied() {
            Some("google_credentials_file") => {
                let stray = refuse_signing_keys(
                    self,
                    "not used with google_credentials_file (the file names the key, its id and the client email)",
                ) || stray;
                let path = self.path(p.google_credentials_file.as_deref().unwrap_or_default());
                match crate::google::read(&path) {
                    Ok(crate::google::Credentials::ServiceAccount(sa)) => {
                        let mut stray = stray;
                        if p.scopes.as_ref().is_none_or(|s| s.is_empty()) {
                            self.problem(
                                key("scopes"),
                                "missing; Google gives a service account's token only for the scopes asked",
                            );
                            stray = true;
                        }
                        (
                            Some(Grant::JwtBearer(Assertion::Google(path))).filter(|_| !stray),
                            Some((sa.token_uri, sa.client_email)),
                        )
                    }
                    Ok(crate::google::Credentials::External(x)) => {
                        // The file says all the two steps send; a key that
                        // would be silently ignored is refused.
                        let mut stray = stray;
                        for (k, set) in [
                            ("auth_method", p.auth_method.is_some()),
                            ("client_id", p.client_id.is_some()),
                            ("client_secret_file", p.client_secret_file.is_some()),
                            ("client_secret_env", p.client_secret_env.is_some()),
                            ("client_cert_file", p.client_cert_file.is_some()),
                            ("audience", p.audience.is_some()),
                            ("resources", p.resources.is_some()),
                            ("extra_params", p.extra_params.is_some()),
                            ("token_headers", p.token_headers.is_some()),
                            ("dpop", p.dpop == Some(true)),
                        ] {
                            if set {
                                self.problem(
                                    key(k),
                                    "not used with an external_account google_credentials_file (the file says what each step sends; Google's tokens are not DPoP-bound)",
                                );
                                stray = true;
                            }
                        }
                        (
                            Some(Grant::GoogleFederation(path)).filter(|_| !stray),
                            Some((x.token_url, String::new())),
                        )
                    }
                    Err(e) => {
                        self.problem(key("google_credentials_file"), e.to_string());
                        (None, None)
                    }
                }
            }
            Some("assertion_file") => {
                let stray = refuse_signing_keys(
                    self,
                    "not used with assertion_file (the assertion is ready-made)",
                ) || stray;
                let path = self.readable_file(
                    &key("assertion_file"),
                    p.assertion_file.as_deref().unwrap_or_default(),
                );
                (
                    Some(Grant::JwtBearer(Assertion::File(path))).filter(|_| !stray),
                    None,
                )
            }
            Some(_) => {
                let path = self.path(p.private_key_file.as_deref().unwrap_or_default());
                let alg = self.signing_alg(&key("signing_alg"), p.signing_alg.as_deref());
                let key_ok = match (SigningKey::load(&path), &alg) {
                    (Ok(k), Ok(a)) => match k.alg(*a) {
                        Ok(a) if a.is_hmac() => unreachable!("a private key never signs with HMAC"),
                        Ok(_) => true,
                        Err(e) => {
                            self.problem(key("signing_alg"), e.to_string());
                            false
                        }
                    },
                    (Err(e), _) => {
                        self.problem(key("private_key_file"), e.to_string());
                        false
                    }
                    (_, Err(())) => false,
                };
                let issuer = p
                    .assertion_issuer
                    .clone()
                    .or_else(|| p.client_id.clone().filter(|c| !c.is_empty()));
                let subject = p
                    .assertion_subject
                    .clone()
                    .or_else(|| p.client_id.clone().filter(|c| !c.is_empty()));
                let (Some(issuer), Some(subject)) = (issuer, subject) else {
                    self.problem(
                        key("assertion_issuer"),
                        "missing; the assertion's iss and sub default to client_id: set client_id, or assertion_issuer and assertion_subject",
                    );
                    return (None, None);
                };
                let grant = Grant::JwtBearer(Assertion::Signed {
                    key_file: path,
                    alg: alg.ok().flatten(),
                    key_id: p.key_id.clone(),
                    issuer,
                    subject,
                    audience: p.assertion_audience.clone(),
                });
                (Some(grant).filter(|_| key_ok && !stray), None)
            }
            None => {
                self.problem(
                    key("private_key_file"),
                    "missing; grant = \"jwt_bearer\" needs private_key_file (the proxy signs the assertion), assertion_file or google_credentials_file",
                );
                (None, None)
            }
        }
    }

    fn exchange(&mut self, name: &str, p: &RawProfile) -> Option<Exchange> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let subject = match (&p.subject_token_file, &p.subject_profile) {
            (Some(f), None) => Some(Subject::File(
                self.readable_file(&key("subject_token_file"), f),
            )),
            (None, Some(s)) if s == name => {
                self.problem(
                    key("subject_profile"),
                    "a profile cannot exchange its own token",
                );
                None
            }
            (None, Some(s)) => Some(Subject::Profile(s.clone())),
            (Some(_), Some(_)) => {
                self.problem(
                    key("subject_profile"),
                    "set either subject_token_file or subject_profile, not both",
                );
                None
            }
            (None, None) => {
                self.problem(
                    key("subject_token_file"),
                    "missing; grant = \"token_exchange\" needs subject_token_file or subject_profile",
                );
                None
            }
        };
        let subject_token_type = match (&p.subject_token_type, &subject) {
            (Some(t), _) => self.token_type(&key("subject_token_type"), t),
            (None, Some(Subject::Profile(_))) => Some(ACCESS_TOKEN.to_owned()),
            (None, _) => {
                self.problem(
                    key("subject_token_type"),
                    "missing; with subject_token_file say what the token is, e.g. \"urn:ietf:params:oauth:token-type:jwt\"",
                );
                None
            }
        };
        let actor = match (&p.actor_token_file, &p.actor_token_type) {
            (Some(f), Some(t)) => {
                let path = self.readable_file(&key("actor_token_file"), f);
                self.token_type(&key("actor_token_type"), t)
                    .map(|t| Some((path, t)))
            }
            (None, None) => Some(None),
            (Some(_), None) => {
                self.problem(
                    key("actor_token_type"),
                    "missing; actor_token_file needs it (RFC 8693 §2.1)",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(key("actor_token_type"), "only used with actor_token_file");
                None
            }
        };
        let requested = match &p.requested_token_type {
            Some(t) => Some(self.token_type(&key("requested_token_type"), t)?),
            None => None,
        };
        Some(Exchange {
            subject: subject?,
            subject_token_type: subject_token_type?,
            actor: actor?,
            requested_token_type: requested,
        })
    }

    /// A token type: one of RFC 8693's, or another absolute URI.
    fn token_type(&mut self, key: &str, t: &str) -> Option<String> {
        if TOKEN_TYPES.contains(&t) {
            return Some(t.to_owned());
        }
        if t.starts_with("urn:ietf:params:oauth:token-type:") || url::Url::parse(t).is_err() {
            self.problem(
                key,
                format!(
                    "{t:?} is not a token type; expected one of {} or another absolute URI",
                    TOKEN_TYPES.join(", ")
                ),
            );
            return None;
        }
        Some(t.to_owned())
    }

    /// Chains: each `subject_profile` names a token endpoint profile, and
    /// no chain comes back to where it started.
    pub(super) fn chains(
        &mut self,
        profiles: &std::collections::BTreeMap<String, crate::config::Profile>,
        declared: &[String],
    ) {
        for (name, p) in profiles {
            let Grant::TokenExchange(Exchange {
                subject: Subject::Profile(first),
                ..
            }) = &p.grant
            else {
                continue;
            };
            let key = format!("profiles.{name}.subject_profile");
            if !declared.contains(first) {
                self.problem(key, format!("no profile named {first:?}"));
                continue;
            }
            let mut seen = vec![name.as_str()];
            let mut at = first.as_str();
            loop {
                if seen.contains(&at) {
                    seen.push(at);
                    self.problem(
                        key,
                        format!("the chain comes back to itself: {}", seen.join(" → ")),
                    );
                    break;
                }
                seen.push(at);
                match profiles.get(at).map(|p| &p.grant) {
                    Some(Grant::TokenExchange(Exchange {
                        subject: Subject::Profile(next),
                        ..
                    })) => at = next,
                    _ => break,
                }
            }
        }
    }
}
