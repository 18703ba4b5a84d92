//! The typed configuration: what [`super::load`] and [`super::from_text`]
//! return once every key has been validated. Durations are `Duration`,
//! addresses `SocketAddr`, URLs parsed, files resolved against the config's
//! directory and checked to load.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::Authority;
use http::{HeaderName, HeaderValue};

use crate::keys::Alg;
use crate::route::Pattern;
use crate::secret;

/// The validated configuration. Built only by [`load`] or [`from_text`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub proxy: Proxy,
    pub admin: Admin,
    pub tokens: Tokens,
    pub upstream: Upstream,
    /// Profiles that get tokens from a token endpoint.
    pub profiles: BTreeMap<String, Profile>,
    /// Profiles with `grant = "static"`: a credential from a file.
    pub statics: BTreeMap<String, Static>,
    pub routes: Vec<Route>,
    /// `[cache]`: tokens shared by a fleet through Redis.
    pub cache: Option<Cache>,
}

/// `[cache]`: where the fleet's shared tokens live and how to reach them.
#[derive(Debug, Clone, PartialEq)]
pub struct Cache {
    pub target: RedisTarget,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// TLS to Redis: `rediss://`, or Sentinel with `ca_file` set.
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<ClientCert>,
    pub encryption_key_file: PathBuf,
    pub key_prefix: String,
    pub operation_timeout: Duration,
}

/// A Redis server, or a master found through Sentinel.
#[derive(Debug, Clone, PartialEq)]
pub enum RedisTarget {
    /// `redis://` or `rediss://host:port/db`, without user information.
    Url(url::Url),
    Sentinel {
        /// `host:port` of each sentinel.
        sentinels: Vec<(String, u16)>,
        master_name: String,
        db: i64,
    },
}

/// Per profile: whether its tokens are shared through `[cache]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    Shared,
    Local,
}

/// A profile whose credential is a file's content, attached as is: an API
/// key or a pre-issued token (`grant = "static"`). Re-read when it changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Static {
    pub name: String,
    pub credential_file: PathBuf,
}

/// The `grant` values, as `check` lists them.
pub const GRANTS: [&str; 4] = [
    "client_credentials",
    "jwt_bearer",
    "token_exchange",
    "static",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Proxy {
    pub listen: SocketAddr,
    pub unmatched: Unmatched,
    pub connect_allow: Vec<String>,
    /// How long in-flight requests may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// From a new connection, or the first byte of a request after an idle
    /// spell, until the whole request head has arrived (slowloris bound).
    pub header_read_timeout: Duration,
    /// How long a client connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// How long a CONNECT tunnel or upgraded connection may carry no byte
    /// either way before it is closed.
    pub tunnel_idle_timeout: Duration,
    /// From a request head until the response head is sent: token wait,
    /// reading a replayable body, the upstream exchange and its 401 retry.
    pub request_timeout: Duration,
    /// The largest request head (start line and headers), in bytes.
    pub max_header_bytes: usize,
    /// The most header fields in one HTTP/1 request head.
    pub max_headers: usize,
    /// Open client connections across all proxy listeners; more are closed
    /// as soon as they are accepted.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Deny,
    Passthrough,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    pub allow_remote: bool,
}

/// Token lifetime and renewal policy, shared by all profiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub request_timeout: Duration,
    pub default_lifetime: Duration,
    pub refresh_fraction: f64,
    pub refresh_margin: Duration,
    pub expiry_skew: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// The retry cap while a profile has no usable token and requests wait.
    pub retry_max_without_token: Duration,
    pub unauthorized_refresh_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub connect_timeout: Duration,
    /// The TLS handshake after the TCP connect.
    pub tls_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    /// A response body that makes no progress for this long is cut off.
    pub body_idle_timeout: Duration,
    /// Request bodies up to this size are buffered so a 401 can be retried.
    pub replay_buffer: usize,
    /// The largest upstream response head.
    pub max_header_bytes: usize,
    /// The ceiling of an upstream HTTP/1.1 connection's read buffer (the
    /// larger of this and `max_header_bytes` applies).
    pub read_buffer_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: String,
    pub endpoint: Endpoint,
    pub client_id: String,
    pub auth: ClientAuth,
    /// The `aud` of JWT client assertions; default: the token endpoint URL.
    pub assertion_audience: Option<String>,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub resources: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub extra_params: Vec<(String, String)>,
    pub token_headers: Vec<(HeaderName, HeaderValue)>,
    pub basic_encoding: BasicEncoding,
    /// `Shared` only when `[cache]` exists.
    pub cache: CacheMode,
    /// Sender-constrained tokens (RFC 9449), when `dpop = true`.
    pub dpop: Option<Dpop>,
    /// How the token is obtained (`grant`).
    pub grant: Grant,
}

/// A token endpoint profile's grant.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 7523 §2.1: an assertion for a token.
    JwtBearer(Assertion),
    /// RFC 8693: a subject token (and maybe an actor token) for a token.
    TokenExchange(Exchange),
    /// Google workload identity federation from an `external_account`
    /// file: an STS exchange, then service account impersonation if named.
    GoogleFederation(PathBuf),
}

/// Where a JWT bearer grant's assertion comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Assertion {
    /// Signed by the proxy at each token request with `key_file` (read
    /// then, so a rotated key is used at once).
    Signed {
        key_file: PathBuf,
        alg: Option<Alg>,
        key_id: Option<String>,
        issuer: String,
        subject: String,
        /// Default: the token endpoint URL.
        audience: Option<String>,
    },
    /// A ready assertion from a file, read at each token request.
    File(PathBuf),
    /// A Google service account key file: signed RS256 with its key, `kid`
    /// its key id, `iss` its client email, `scope` as a claim.
    Google(PathBuf),
}

/// A token exchange's tokens (RFC 8693 §2.1).
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    /// A file read at each token request (a projected ServiceAccount token).
    File(PathBuf),
    /// Another profile's current token: a chain.
    Profile(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub subject: Subject,
    pub subject_token_type: String,
    /// `actor_token_file` and `actor_token_type`.
    pub actor: Option<(PathBuf, String)>,
    pub requested_token_type: Option<String>,
}

/// A profile's DPoP settings: its key comes from `key_file` (checked to
/// load), or is generated at start for `alg` (ES256 or EdDSA).
#[derive(Debug, Clone, PartialEq)]
pub struct Dpop {
    pub key_file: Option<PathBuf>,
    /// `dpop_alg`; unset: the key's own (ES256 for a generated key).
    pub alg: Option<Alg>,
}

/// Where the token endpoint is.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    TokenUrl(url::Url),
    /// Found through RFC 8414, then OpenID discovery, at the first fetch.
    Issuer(url::Url),
}

/// The `auth_method` values, as `check` lists them; `none` too with
/// `jwt_bearer` and `token_exchange`.
pub const METHODS: [&str; 5] = [
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
];

/// How the client proves itself at the token endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientAuth {
    /// No client authentication (`jwt_bearer`, `token_exchange`): the
    /// assertion or the subject token is the proof.
    None,
    /// HTTP Basic with the form-url-encoded id and secret (RFC 6749 §2.3.1).
    SecretBasic(secret::Source),
    /// `client_id` and `client_secret` in the form body.
    SecretPost(secret::Source),
    /// An assertion signed with an HMAC of the client secret.
    SecretJwt {
        secret: secret::Source,
        alg: Alg,
        key_id: Option<String>,
    },
    /// An assertion signed with the client's private key, read at each request.
    PrivateKeyJwt {
        key_file: PathBuf,
        alg: Option<Alg>,
        key_id: Option<String>,
    },
    /// A ready-made assertion from a file (a projected ServiceAccount token,
    /// workload identity federation), read at each request.
    ClientAssertion(secret::Source),
    /// Mutual TLS with a client certificate (RFC 8705 §2).
    TlsClientAuth {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

impl ClientAuth {
    pub fn method_name(&self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::SecretBasic(_) => "client_secret_basic",
            ClientAuth::SecretPost(_) => "client_secret_post",
            ClientAuth::SecretJwt { .. } => "client_secret_jwt",
            ClientAuth::PrivateKeyJwt { .. } | ClientAuth::ClientAssertion(_) => "private_key_jwt",
            ClientAuth::TlsClientAuth { .. } => "tls_client_auth",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicEncoding {
    /// RFC 6749 §2.3.1: form-url-encode id and secret before Base64.
    Form,
    /// Id and secret as they are, for servers that do not decode.
    Raw,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub host: Pattern,
    /// The `host` value as written, used as the metrics label.
    pub label: String,
    pub upstream: UpstreamTarget,
    pub profile: String,
    pub listen: Option<SocketAddr>,
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS to the upstream; the files are re-read when they change.
    pub client_cert: Option<ClientCert>,
    pub protocol: UpstreamProtocol,
    /// CONNECT tunnels to this route's host are allowed (when
    /// `proxy.connect_allow` lists them); they carry no token.
    pub allow_connect: bool,
    /// The header the credential goes in (default `authorization`).
    pub header: HeaderName,
    /// What goes before the credential (default `Bearer `).
    pub prefix: String,
}

/// A route's client certificate and key files (PEM), checked to load and
/// match when the config is validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Where a route's requests go.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamTarget {
    /// `https://authority/base_path` from `upstream` (or `https://<host>`).
    Fixed {
        authority: Authority,
        /// Without a trailing slash; empty for none.
        base_path: String,
    },
    /// A wildcard route without `upstream`: `https://<the request's host>`.
    SameHost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    Auto,
    Http1,
    Http2,
}

impl Config {
    /// Names of profiles that at least one route uses: only these fetch tokens.
    /// A profile that another in use takes its subject token from
    /// (`subject_profile`) is in use too.
    pub fn profiles_in_use(&self) -> impl Iterator<Item = &Profile> {
        let mut used: std::collections::BTreeSet<&str> =
            self.routes.iter().map(|r| r.profile.as_str()).collect();
        // Chains are short and acyclic (checked): follow them to the end.
        loop {
            let more: Vec<&str> = used
                .iter()
                .filter_map(|n| self.subject_of(n))
                .filter(|s| !used.contains(s))
                .collect();
            if more.is_empty() {
                break;
            }
            used.extend(more);
        }
        self.profiles
            .values()
            .filter(move |p| used.contains(p.name.as_str()))
    }

    /// The profile whose token `profile` exchanges, if it is a chain.
    pub fn subject_of(&self, profile: &str) -> Option<&str> {
        match &self.profiles.get(profile)?.grant {
            Grant::TokenExchange(Exchange {
                subject: Subject::Profile(s),
                ..
            }) => Some(s),
            _ => None,
        }
    }

    /// Static-credential profiles that at least one route uses.
    pub fn statics_in_use(&self) -> impl Iterator<Item = &Static> {
        self.statics
            .values()
            .filter(|p| self.routes.iter().any(|r| r.profile == p.name))
    }

    /// The secret and key files this config names, by key: client secrets,
    /// private keys, client assertions and TLS client keys. Certificates and
    /// CA files are public and not listed; secrets from the environment have
    /// no file. [`secret::warn_exposed`] checks their permissions.
    pub fn secret_files(&self) -> Vec<(String, PathBuf)> {
        use secret::Source;
        let mut out = Vec::new();
        for (name, profile) in &self.profiles {
            let key = |k: &str| format!("profiles.{name}.{k}");
            match &profile.auth {
                ClientAuth::SecretBasic(Source::File(p))
                | ClientAuth::SecretPost(Source::File(p))
                | ClientAuth::SecretJwt {
                    secret: Source::File(p),
                    ..
                } => out.push((key("client_secret_file"), p.clone())),
                ClientAuth::PrivateKeyJwt { key_file, .. } => {
                    out.push((key("private_key_file"), key_file.clone()))
                }
                ClientAuth::ClientAssertion(Source::File(p)) => {
                    out.push((key("client_assertion_file"), p.clone()))
                }
                ClientAuth::TlsClientAuth { key_file, .. } => {
                    out.push((key("client_key_file"), key_file.clone()))
                }
                ClientAuth::SecretBasic(Source::Env(_))
                | ClientAuth::SecretPost(Source::Env(_))
                | ClientAuth::SecretJwt { .. }
                | ClientAuth::ClientAssertion(Source::Env(_))
                | ClientAuth::None => {}
            }
            match &profile.grant {
                Grant::JwtBearer(Assertion::Signed { key_file, .. }) => {
                    out.push((key("private_key_file"), key_file.clone()))
                }
                Grant::JwtBearer(Assertion::File(p)) => {
                    out.push((key("assertion_file"), p.clone()))
                }
                Grant::JwtBearer(Assertion::Google(p)) | Grant::GoogleFederation(p) => {
                    out.push((key("google_credentials_file"), p.clone()))
                }
                Grant::TokenExchange(x) => {
                    if let Subject::File(p) = &x.subject {
                        out.push((key("subject_token_file"), p.clone()));
                    }
                    if let Some((p, _)) = &x.actor {
                        out.push((key("actor_token_file"), p.clone()));
                    }
                }
                Grant::ClientCredentials => {}
            }
            if let Some(Dpop {
                key_file: Some(f), ..
            }) = &profile.dpop
            {
                out.push((key("dpop_key_file"), f.clone()));
            }
        }
        for (name, s) in &self.statics {
            out.push((
                format!("profiles.{name}.credential_file"),
                s.credential_file.clone(),
            ));
        }
        if let Some(cache) = &self.cache {
            out.push((
                "cache.encryption_key_file".into(),
                cache.encryption_key_file.clone(),
            ));
            if let Some(p) = &cache.password_file {
                out.push(("cache.password_file".into(), p.clone()));
            }
            if let Some(cert) = &cache.client_cert {
                out.push(("cache.client_key_file".into(), cert.key_file.clone()));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(cert) = &route.client_cert {
                out.push((
                    format!("routes[{i}].client_key_file"),
                    cert.key_file.clone(),
                ));
            }
        }
        out
    }
}
