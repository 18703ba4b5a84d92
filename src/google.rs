//! Google Cloud credential files (`google_credentials_file`): the JSON a
//! user downloads for a service account key (`type: service_account`),
//! which drives a JWT bearer grant (RFC 7523 §2.1) the way Google
//! documents it, or the file `gcloud iam workload-identity-pools
//! create-cred-config` writes (`type: external_account`), which drives
//! workload identity federation: an STS token exchange, then, when named,
//! service account impersonation. Read again at every token request, so a
//! rotated file is used at once.
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
    #[error("{path}: \"type\" is {kind:?}; expected \"service_account\" or \"external_account\"")]
    Type { path: String, kind: String },
    #[error("{path}: \"type\" is \"external_account\" here, where a service account key is needed")]
    External { path: String },
    #[error(
        "{path}: \"type\" is \"service_account\" here, where an external_account file is needed"
    )]
    NotExternal { path: String },
    #[error("{path}: {field:?} is not an https:// URL")]
    NotHttps { path: String, field: &'static str },
    #[error("{path}: \"credential_source\": {why}")]
    Source { path: String, why: String },
    #[error(
        "{path}: \"service_account_impersonation\": \"token_lifetime_seconds\" must be a whole number from 600 to 43200"
    )]
    Lifetime { path: String },
    #[error("{path}: {field:?} is missing or not a string")]
    Missing { path: String, field: &'static str },
    #[error("{path}: \"token_uri\" is not an https:// URL")]
    TokenUri { path: String },
    #[error("{path}: \"private_key\": {source}")]
    Key { path: String, source: KeyError },
    #[error("{path}: \"private_key\" is a {kind} key; Google service account keys are RSA")]
    NotRsa { path: String, kind: &'static str },
}

/// What a credentials file is, read and checked.
pub enum Credentials {
    ServiceAccount(ServiceAccount),
    External(ExternalAccount),
}

/// Workload identity federation (`type: external_account`).
#[derive(Debug, Clone)]
pub struct ExternalAccount {
    /// The workload identity pool provider, the STS `audience`.
    pub audience: String,
    pub subject_token_type: String,
    /// Google's STS token endpoint.
    pub token_url: url::Url,
    pub source: CredentialSource,
    /// `…/serviceAccounts/EMAIL:generateAccessToken`, to impersonate.
    pub impersonation_url: Option<url::Url>,
    /// The impersonated token's lifetime.
    pub lifetime: std::time::Duration,
}

/// Where the workload's own token (the STS subject token) comes from.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// A file, read at each request (a projected ServiceAccount token).
    File {
        path: std::path::PathBuf,
        format: Format,
    },
    /// An HTTP(S) GET with headers (a metadata server).
    Url {
        url: url::Url,
        headers: Vec<(String, String)>,
        format: Format,
    },
}

/// How the subject token is held in its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Text,
    /// A JSON object; the token is this field.
    Json(String),
}

/// Reads and checks a credentials file of either type.
pub fn read(path: &Path) -> Result<Credentials, Error> {
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
        "external_account" => return external(&json, &shown).map(Credentials::External),
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
    Ok(Credentials::ServiceAccount(ServiceAccount {
        client_email,
        private_key_id,
        token_uri,
        key,
    }))
}

/// Reads a service account key file (what a JWT bearer assertion needs).
pub fn service_account(path: &Path) -> Result<ServiceAccount, Error> {
    match read(path)? {
        Credentials::ServiceAccount(sa) => Ok(sa),
        Credentials::External(_) => Err(Error::External {
            path: path.display().to_string(),
        }),
    }
}

/// Reads an `external_account` file (what federation needs).
pub fn external_account(path: &Path) -> Result<ExternalAccount, Error> {
    match read(path)? {
        Credentials::External(x) => Ok(x),
        Credentials::ServiceAccount(_) => Err(Error::NotExternal {
            path: path.display().to_string(),
        }),
    }
}

fn external(
    json: &serde_json::Map<String, serde_json::Value>,
    shown: &str,
) -> Result<ExternalAccount, Error> {
    use serde_json::Value;
    let field = |name: &'static str| {
        json.get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Error::Missing {
                path: shown.to_owned(),
                field: name,
            })
    };
    let https = |name: &'static str, v: &str| {
        url::Url::parse(v)
            .ok()
            .filter(|u| u.scheme() == "https")
            .ok_or_else(|| Error::NotHttps {
                path: shown.to_owned(),
                field: name,
            })
    };
    let audience = field("audience")?.to_owned();
    let subject_token_type = field("subject_token_type")?.to_owned();
    let token_url = https("token_url", field("token_url")?)?;
    let impersonation_url = match json.get("service_account_impersonation_url") {
        None | Some(Value::Null) => None,
        Some(v) => Some(https(
            "service_account_impersonation_url",
            v.as_str().unwrap_or_default(),
        )?),
    };
    let lifetime = match json
        .get("service_account_impersonation")
        .and_then(|v| v.get("token_lifetime_seconds"))
    {
        None => 3600,
        Some(v) => v
            .as_u64()
            .filter(|s| (600..=43200).contains(s))
            .ok_or_else(|| Error::Lifetime {
                path: shown.to_owned(),
            })?,
    };
    let source_error = |why: &str| Error::Source {
        path: shown.to_owned(),
        why: why.to_owned(),
    };
    let source = json
        .get("credential_source")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Missing {
            path: shown.to_owned(),
            field: "credential_source",
        })?;
    let format = match source.get("format") {
        None => Format::Text,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            None | Some("text") => Format::Text,
            Some("json") => Format::Json(
                f.get("subject_token_field_name")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        source_error("\"format\" json needs \"subject_token_field_name\"")
                    })?
                    .to_owned(),
            ),
            Some(_) => {
                return Err(source_error(
                    "\"format\" \"type\" must be \"text\" or \"json\"",
                ));
            }
        },
    };
    // AWS sources carry a `url` too: recognise them first.
    if source.contains_key("environment_id") {
        return Err(source_error(
            "AWS (\"environment_id\") sources are not supported; use a file or url source",
        ));
    }
    if source.contains_key("executable") {
        return Err(source_error(
            "\"executable\" sources are not supported; use a file or url source",
        ));
    }
    let source = if let Some(file) = source.get("file").and_then(Value::as_str) {
        CredentialSource::File {
            path: file.into(),
            format,
        }
    } else if let Some(u) = source.get("url").and_then(Value::as_str) {
        let url = url::Url::parse(u)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| source_error("\"url\" is not an http(s) URL"))?;
        let headers = source
            .get("headers")
            .and_then(Value::as_object)
            .map(|h| {
                h.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        CredentialSource::Url {
            url,
            headers,
            format,
        }
    } else {
        return Err(source_error("needs \"file\" or \"url\""));
    };
    Ok(ExternalAccount {
        audience,
        subject_token_type,
        token_url,
        source,
        impersonation_url,
        lifetime: std::time::Duration::from_secs(lifetime),
    })
}
