//! What a token request carries for its grant, beyond client
//! authentication: nothing for client credentials; a signed, read or
//! Google-shaped assertion for the JWT bearer grant (RFC 7523 §2.1); the
//! subject (and actor) token for a token exchange (RFC 8693 §2.1), read
//! from a file or taken from another profile's store (a chain). A new grant
//! is a new arm here, not an edit through the token client or the loop.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, Assertion, Exchange, Subject};
use crate::secret::Secret;

use super::assertion::{Signer, SigningKey, jwt};
use super::{FetchError, Store};

pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// Assertions the proxy signs live this long (Google allows at most 1 h;
/// RFC 7523 asks for a limited lifetime).
const ASSERTION_LIFETIME_SECS: u64 = 300;

/// A profile's grant at run time.
#[derive(Debug)]
pub enum Grant {
    ClientCredentials,
    JwtBearer(Assertion),
    TokenExchange {
        exchange: Exchange,
        /// The store of the subject profile, for a chain.
        subject: Option<Arc<Store>>,
    },
    /// Not a single form request: see [`super::federation`].
    GoogleFederation(std::path::PathBuf),
}

/// The grant's parameters for one request, and for a chain when the
/// subject token stops being usable (the exchanged token never outlives it).
pub struct Prepared {
    pub params: Vec<(&'static str, Secret)>,
    pub subject_expires: Option<tokio::time::Instant>,
}

impl Grant {
    pub fn new(grant: &config::Grant) -> Self {
        match grant {
            config::Grant::ClientCredentials => Grant::ClientCredentials,
            config::Grant::JwtBearer(a) => Grant::JwtBearer(a.clone()),
            config::Grant::TokenExchange(x) => Grant::TokenExchange {
                exchange: x.clone(),
                subject: None,
            },
            config::Grant::GoogleFederation(p) => Grant::GoogleFederation(p.clone()),
        }
    }

    /// Gives a chain its subject profile's store.
    pub fn with_subject(mut self, store: Arc<Store>) -> Self {
        if let Grant::TokenExchange { subject, .. } = &mut self {
            *subject = Some(store);
        }
        self
    }

    /// A chain's subject store.
    pub fn subject_store(&self) -> Option<&Arc<Store>> {
        match self {
            Grant::TokenExchange { subject, .. } => subject.as_ref(),
            _ => None,
        }
    }

    pub fn grant_type(&self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::JwtBearer(_) => JWT_BEARER,
            Grant::TokenExchange { .. } | Grant::GoogleFederation(_) => TOKEN_EXCHANGE,
        }
    }

    /// Whether `scope` goes in the form: not for Google, which wants it in
    /// the assertion.
    pub fn scope_in_form(&self) -> bool {
        !matches!(self, Grant::JwtBearer(Assertion::Google(_)))
    }

    /// For a token exchange, the `issued_token_type` the answer must have
    /// (RFC 8693 §2.2.1): the one asked for, if any.
    pub fn exchange(&self) -> Option<Option<&str>> {
        match self {
            Grant::TokenExchange { exchange, .. } => Some(exchange.requested_token_type.as_deref()),
            _ => None,
        }
    }

    /// The grant's parameters for a request to `token_url`: files read,
    /// assertions signed, a chain's subject token waited for (at most
    /// `wait`). `scopes` is the profile's, space-joined.
    pub async fn prepare(
        &self,
        token_url: &str,
        scopes: &str,
        wait: Duration,
    ) -> Result<Prepared, FetchError> {
        let mut params = Vec::new();
        let mut subject_expires = None;
        match self {
            Grant::ClientCredentials | Grant::GoogleFederation(_) => {}
            Grant::JwtBearer(a) => params.push(("assertion", assertion(a, token_url, scopes)?)),
            Grant::TokenExchange { exchange, subject } => {
                let token = match (&exchange.subject, subject) {
                    (Subject::File(path), _) => read(path, "subject_token_file")?,
                    (Subject::Profile(name), Some(store)) => {
                        let token = store.get(wait).await.map_err(|e| {
                            FetchError::Subject(format!(
                                "subject profile {name:?} has no token: {}",
                                e.reason
                            ))
                        })?;
                        subject_expires = Some(token.expires_at());
                        let value = token.value().to_str().map_err(|_| {
                            FetchError::Subject(format!(
                                "subject profile {name:?} holds a token that is not visible ASCII"
                            ))
                        })?;
                        Secret::new(value.to_owned())
                    }
                    (Subject::Profile(name), None) => {
                        return Err(FetchError::Subject(format!(
                            "subject profile {name:?} is not running"
                        )));
                    }
                };
                params.push(("subject_token", token));
                params.push((
                    "subject_token_type",
                    Secret::new(exchange.subject_token_type.clone()),
                ));
                if let Some((path, kind)) = &exchange.actor {
                    params.push(("actor_token", read(path, "actor_token_file")?));
                    params.push(("actor_token_type", Secret::new(kind.clone())));
                }
                if let Some(t) = &exchange.requested_token_type {
                    params.push(("requested_token_type", Secret::new(t.clone())));
                }
            }
        }
        Ok(Prepared {
            params,
            subject_expires,
        })
    }
}

fn read(path: &std::path::Path, key: &str) -> Result<Secret, FetchError> {
    crate::secret::Source::File(path.to_owned())
        .read()
        .map_err(|e| FetchError::Secret(format!("{key}: {e}")))
}

/// The assertion of a JWT bearer grant.
fn assertion(a: &Assertion, token_url: &str, scopes: &str) -> Result<Secret, FetchError> {
    match a {
        Assertion::File(path) => read(path, "assertion_file"),
        Assertion::Signed {
            key_file,
            alg,
            key_id,
            issuer,
            subject,
            audience,
        } => {
            let key_error =
                |e: crate::keys::KeyError| FetchError::Secret(format!("private key: {e}"));
            let key = SigningKey::load(key_file).map_err(key_error)?;
            let alg = key.alg(*alg).map_err(key_error)?;
            let claims = serde_json::json!({
                "iss": issuer,
                "sub": subject,
                "aud": audience.as_deref().unwrap_or(token_url),
            });
            jwt(
                claims,
                ASSERTION_LIFETIME_SECS,
                Signer::Key(&key),
                alg,
                key_id.as_deref(),
            )
            .map_err(key_error)
        }
        Assertion::Google(path) => {
            // Read at every request: a rotated key file is used at once.
            let sa = crate::google::service_account(path)
                .map_err(|e| FetchError::Secret(format!("google_credentials_file: {e}")))?;
            // Google's documented claims: iss, scope, aud, iat, exp; the
            // key id as `kid`; RS256.
            let claims = serde_json::json!({
                "iss": sa.client_email,
                "scope": scopes,
                "aud": token_url,
            });
            jwt(
                claims,
                ASSERTION_LIFETIME_SECS,
                Signer::Key(&sa.key),
                crate::keys::Alg::RS256,
                Some(&sa.private_key_id),
            )
            .map_err(|e| FetchError::Secret(format!("google_credentials_file: {e}")))
        }
    }
}
