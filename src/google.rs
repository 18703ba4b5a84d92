//! Google Cloud credential files (`google_credentials_file`): the JSON a
//! user downloads for a service account key (`type: service_account`),
//! which drives a JWT bearer grant (RFC 7523 §2.1) the way Google
//! documents it. Read again at every token request, so a rotated key file
//! is used at once. `external_account` files (workload identity
//! federation) are recognised and refused until their flow lands.
//!
//! Nothing here logs; errors name the file and the field, never a value.

use std::path::Path;

use zeroize::Zeroizing;

use crate::keys::{KeyError, SigningKey};

/// A service account key, as Google Cloud's console or `gcloud iam
/// service-accounts keys create` writes it (the fields used here).
pub struct ServiceAccount {
    /// The assertion's `iss`.
    pub client_email: String,
    /// The JWS `kid`.
    pub private_key_id: String,
    /// The assertion's `aud` and where it is posted, unless `token_url`
    /// overrides it.
    pub token_uri: url::Url,
    pub key: SigningKey,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .finish_non_exhaustive()
    }
}

/// Why a credentials file cannot be used. Names the field, never a value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a JSON object ({reason})")]
    NotJson { path: String, reason: String },
    #[error(
        "{path}: \"type\" is {kind:?}; expected \"service_account\" (or \"external_account\", not supported yet)"
    )]
    Type { path: String, kind: String },
    #[error(
        "{path}: \"type\" is \"external_account\" (workload identity federation), which is not supported yet; use a service account key file, or a token_exchange profile"
    )]
    External { path: String },
    #[error("{path}: {field:?} is missing or not a string")]
    Missing { path: String, field: &'static str },
    #[error("{path}: \"token_uri\" is not an https:// URL")]
    TokenUri { path: String },
    #[error("{path}: \"private_key\": {source}")]
    Key { path: String, source: KeyError },
    #[error("{path}: \"private_key\" is a {kind} key; Google service account keys are RSA")]
    NotRsa { path: String, kind: &'static str },
}

/// Reads and checks a service account key file.
pub fn service_account(path: &Path) -> Result<ServiceAccount, Error> {
    let shown = path.display().to_string();
    let data = Zeroizing::new(std::fs::read(path).map_err(|source| Error::Read {
        path: shown.clone(),
        source,
    })?);
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&data)
        .map_err(|e| Error::NotJson {
            path: shown.clone(),
            // serde_json's message says where, not what: no value leaks.
            reason: format!("line {}, column {}", e.line(), e.column()),
        })?;
    // The key leaves the map into memory that is wiped when dropped.
    let pem = match json.remove("private_key") {
        Some(serde_json::Value::String(k)) => Some(Zeroizing::new(k)),
        _ => None,
    };
    let field = |name: &'static str| {
        json.get(name)
            .and_then(serde_json::Value::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::Missing {
                path: shown.clone(),
                field: name,
            })
    };
    match field("type")? {
        "service_account" => {}
        "external_account" => return Err(Error::External { path: shown }),
        other => {
            return Err(Error::Type {
                path: shown,
                kind: other.chars().take(40).collect(),
            });
        }
    }
    let client_email = field("client_email")?.to_owned();
    let private_key_id = field("private_key_id")?.to_owned();
    let token_uri = url::Url::parse(field("token_uri")?)
        .ok()
        .filter(|u| u.scheme() == "https")
        .ok_or_else(|| Error::TokenUri {
            path: shown.clone(),
        })?;
    let pem = pem
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Error::Missing {
            path: shown.clone(),
            field: "private_key",
        })?;
    let key = SigningKey::from_pem(pem.as_bytes(), "the PEM").map_err(|source| Error::Key {
        path: shown.clone(),
        source,
    })?;
    if key.kind() != "RSA" {
        return Err(Error::NotRsa {
            path: shown,
            kind: key.kind(),
        });
    }
    Ok(ServiceAccount {
        client_email,
        private_key_id,
        token_uri,
        key,
    })
}
