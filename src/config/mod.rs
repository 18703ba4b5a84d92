//! Configuration: figment layering (defaults → TOML → `TOKEN_INJECTOR_*`
//! environment) into a serde mirror ([`raw`]), then validated once into the
//! typed [`Config`]. Every problem is collected and reported together, each
//! naming its key, so `token-injector check` shows them all in one pass.

mod raw;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map};
use http::uri::Authority;
use http::{HeaderName, HeaderValue};

use crate::keys::{Alg, SigningKey};
use crate::route::Pattern;
use crate::secret;
use raw::{Raw, RawProfile, RawRoute};

/// Environment variables with this prefix override config keys; `__`
/// separates nesting levels (`TOKEN_INJECTOR_PROXY__LISTEN`).
pub const ENV_PREFIX: &str = "TOKEN_INJECTOR_";
/// Only variables naming a key under these tables are overrides; others
/// under the prefix (`TOKEN_INJECTOR_CONFIG`, `_WORKERS`, `_LOG_FORMAT`, or
/// the `TOKEN_INJECTOR_SERVICE_HOST` that Kubernetes service links inject)
/// are not config and are ignored.
const ENV_SECTIONS: &[&str] = &["proxy", "admin", "tokens", "upstream", "profiles", "routes"];
/// No configured duration may exceed this.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// `proxy.max_header_bytes`: hyper's HTTP/1 read buffer cannot be smaller
/// than 8 KiB; above 1 MiB a header flood costs more memory than it is worth.
const MIN_HEADER_BYTES: usize = 8 * 1024;
const MAX_HEADER_BYTES: usize = 1024 * 1024;
const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// `upstream.max_header_bytes`: haproxy's default buffer; hyper's own
/// default (~400 KiB) let each pooled connection's read buffer grow to that
/// size under large bodies (60-73 MiB at 128 connections with 64 KiB bodies).
const DEFAULT_UPSTREAM_HEADER_BYTES: usize = 16 * 1024;
/// hyper sizes its header array by `proxy.max_headers` for every request.
const MAX_HEADERS: usize = 1000;
const MAX_CONNECTIONS: usize = 1_000_000;

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
}

/// A profile whose credential is a file's content, attached as is: an API
/// key or a pre-issued token (`grant = "static"`). Re-read when it changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Static {
    pub name: String,
    pub credential_file: PathBuf,
}

/// The `grant` values, as `check` lists them.
pub const GRANTS: [&str; 2] = ["client_credentials", "static"];

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
    /// The largest upstream response head; also the ceiling of each
    /// upstream HTTP/1 connection's read buffer.
    pub max_header_bytes: usize,
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
}

/// Where the token endpoint is.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    TokenUrl(url::Url),
    /// Found through RFC 8414, then OpenID discovery, at the first fetch.
    Issuer(url::Url),
}

/// The `auth_method` values, as `check` lists them.
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

/// One problem in the configuration, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl Error {
    /// One line per problem, as `check` prints them.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Error::Invalid(problems) => problems.iter().map(|p| p.to_string()).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// Loads `path` with overrides from the process environment.
pub fn load(path: &Path) -> Result<Config, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    from_text(&text, base, std::env::vars())
}

/// Parses and validates TOML text with the given environment overrides.
/// Relative file paths in the config are resolved against `base_dir`.
pub fn from_text(
    text: &str,
    base_dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, Error> {
    let figment = Figment::new()
        .merge(Toml::string(text))
        .merge(EnvOverrides::new(env));
    let raw: Raw = figment
        .extract()
        .map_err(|e| Error::Invalid(figment_problems(e)))?;
    let mut v = Validator {
        problems: Vec::new(),
        base_dir,
    };
    let config = v.config(raw);
    match config {
        Some(c) if v.problems.is_empty() => Ok(c),
        _ => Err(Error::Invalid(v.problems)),
    }
}

fn figment_problems(err: figment::Error) -> Vec<Problem> {
    err.into_iter()
        .map(|e| {
            let mut key = e.path.join(".");
            let message = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    // figment's path already ends with the unknown field.
                    if !key.ends_with(field.as_str()) {
                        if !key.is_empty() {
                            key.push('.');
                        }
                        key.push_str(field);
                    }
                    format!("unknown key; expected one of {}", expected.join(", "))
                }
                kind => kind.to_string(),
            };
            if key.is_empty() {
                key = "(config)".into();
            }
            Problem { key, message }
        })
        .collect()
}

/// Environment overrides as a figment provider over an explicit list of
/// variables, so tests never touch the process environment.
struct EnvOverrides(Dict);

impl EnvOverrides {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut dict = Dict::new();
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase();
            match key.split_once("__") {
                Some((section, _)) if ENV_SECTIONS.contains(&section) => {}
                _ => continue,
            }
            let path: Vec<&str> = key.split("__").collect();
            if path.iter().any(|k| k.is_empty()) {
                continue;
            }
            // Values parse as figment's Env does: "true", "8", "[\"a\"]".
            let value: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
            insert_path(&mut dict, &path, value);
        }
        Self(dict)
    }
}

fn insert_path(dict: &mut Dict, path: &[&str], value: figment::value::Value) {
    use figment::value::Value;
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry((*first).to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

impl figment::Provider for EnvOverrides {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("TOKEN_INJECTOR_ environment variables")
    }
    fn data(&self) -> Result<Map<figment::Profile, Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

struct Validator<'a> {
    problems: Vec<Problem>,
    base_dir: &'a Path,
}

fn dur(default: &str) -> Duration {
    humantime::parse_duration(default).expect("valid default duration")
}

impl Validator<'_> {
    fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn config(&mut self, raw: Raw) -> Option<Config> {
        let proxy = Proxy {
            listen: self.addr(
                "proxy.listen",
                raw.proxy.listen.as_deref(),
                "127.0.0.1:4180",
            ),
            unmatched: match raw.proxy.unmatched.as_deref().unwrap_or("deny") {
                "deny" => Unmatched::Deny,
                "passthrough" => Unmatched::Passthrough,
                other => {
                    self.one_of("proxy.unmatched", other, &["deny", "passthrough"]);
                    Unmatched::Deny
                }
            },
            connect_allow: raw.proxy.connect_allow.unwrap_or_default(),
            drain_timeout: self.duration("proxy.drain_timeout", raw.proxy.drain_timeout, "20s"),
            header_read_timeout: self.duration(
                "proxy.header_read_timeout",
                raw.proxy.header_read_timeout,
                "10s",
            ),
            // Above the 90 s idle timeout of Go's and reqwest's pools, so
            // the app drops an idle connection before the proxy closes it.
            idle_timeout: self.duration("proxy.idle_timeout", raw.proxy.idle_timeout, "120s"),
            tunnel_idle_timeout: self.duration(
                "proxy.tunnel_idle_timeout",
                raw.proxy.tunnel_idle_timeout,
                "1h",
            ),
            // Above token wait + upstream.response_timeout at their defaults.
            request_timeout: self.duration(
                "proxy.request_timeout",
                raw.proxy.request_timeout,
                "2m",
            ),
            max_header_bytes: self.count(
                "proxy.max_header_bytes",
                raw.proxy.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES,
                MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
            ),
            max_headers: self.count(
                "proxy.max_headers",
                raw.proxy.max_headers,
                100,
                1..=MAX_HEADERS,
            ),
            max_connections: self.count(
                "proxy.max_connections",
                raw.proxy.max_connections,
                4096,
                1..=MAX_CONNECTIONS,
            ),
        };
        for (key, d) in [
            ("proxy.header_read_timeout", proxy.header_read_timeout),
            ("proxy.idle_timeout", proxy.idle_timeout),
            ("proxy.tunnel_idle_timeout", proxy.tunnel_idle_timeout),
            ("proxy.request_timeout", proxy.request_timeout),
        ] {
            if d.is_zero() {
                self.problem(key, "must be greater than zero");
            }
        }
        for (i, entry) in proxy.connect_allow.iter().enumerate() {
            match Pattern::parse(entry) {
                Ok(p) if entry.rsplit_once(':').is_some() && !entry.ends_with(']') => drop(p),
                Ok(_) => self.problem(
                    format!("proxy.connect_allow[{i}]"),
                    format!("{entry:?} needs a port, e.g. \"{entry}:443\""),
                ),
                Err(e) => self.problem(format!("proxy.connect_allow[{i}]"), e),
            }
        }
        let admin = Admin {
            listen: self.addr(
                "admin.listen",
                raw.admin.listen.as_deref(),
                "127.0.0.1:9090",
            ),
            allow_remote: raw.admin.allow_remote.unwrap_or(false),
        };
        if !admin.allow_remote && !admin.listen.ip().is_loopback() {
            self.problem(
                "admin.listen",
                format!(
                    "{} is not a loopback address; set admin.allow_remote = true to expose the admin endpoints",
                    admin.listen
                ),
            );
        }
        let t = raw.tokens;
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
        let u = raw.upstream;
        let upstream = Upstream {
            connect_timeout: self.duration("upstream.connect_timeout", u.connect_timeout, "5s"),
            tls_timeout: self.duration("upstream.tls_timeout", u.tls_timeout, "10s"),
            response_timeout: self.duration("upstream.response_timeout", u.response_timeout, "60s"),
            pool_idle_timeout: self.duration(
                "upstream.pool_idle_timeout",
                u.pool_idle_timeout,
                "90s",
            ),
            body_idle_timeout: self.duration(
                "upstream.body_idle_timeout",
                u.body_idle_timeout,
                "5m",
            ),
            replay_buffer: u
                .replay_buffer
                .unwrap_or(64 * 1024)
                .try_into()
                .unwrap_or(usize::MAX),
            max_header_bytes: self.count(
                "upstream.max_header_bytes",
                u.max_header_bytes,
                DEFAULT_UPSTREAM_HEADER_BYTES,
                MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
            ),
        };
        for (key, d) in [
            ("upstream.connect_timeout", upstream.connect_timeout),
            ("upstream.tls_timeout", upstream.tls_timeout),
            ("upstream.response_timeout", upstream.response_timeout),
            ("upstream.body_idle_timeout", upstream.body_idle_timeout),
        ] {
            if d.is_zero() {
                self.problem(key, "must be greater than zero");
            }
        }

        // Routes are checked against the declared names, so a profile with
        // its own problems does not also fail every route that uses it.
        let declared: Vec<String> = raw.profiles.keys().cloned().collect();
        let mut profiles = BTreeMap::new();
        let mut statics = BTreeMap::new();
        for (name, p) in raw.profiles {
            match p.grant.as_deref().unwrap_or("client_credentials") {
                "client_credentials" => {
                    if p.credential_file.is_some() {
                        self.problem(
                            format!("profiles.{name}.credential_file"),
                            "only used with grant = \"static\"",
                        );
                    }
                    if let Some(profile) = self.profile(&name, p) {
                        profiles.insert(name, profile);
                    }
                }
                "static" => {
                    if let Some(s) = self.static_profile(&name, p) {
                        statics.insert(name, s);
                    }
                }
                other => self.one_of(&format!("profiles.{name}.grant"), other, &GRANTS),
            }
        }

        let mut routes = Vec::new();
        let mut hosts: HashMap<String, usize> = HashMap::new();
        let mut route_listens = Vec::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            let profile_known = r.profile.as_ref().is_some_and(|p| declared.contains(p));
            if let Some(route) = self.route(i, r, profile_known) {
                if route.allow_connect {
                    self.allow_connect(i, &route.host, &proxy.connect_allow);
                }
                let key = route.host.to_string();
                if let Some(first) = hosts.insert(key.clone(), i) {
                    self.problem(
                        format!("routes[{i}].host"),
                        format!("{key:?} is already the host of routes[{first}]"),
                    );
                }
                if let Some(addr) = route.listen {
                    route_listens.push((format!("routes[{i}].listen"), addr));
                }
                routes.push(route);
            }
        }

        // Every listener address must be distinct (port 0 asks for any port).
        let mut listeners: Vec<(String, SocketAddr)> = vec![
            ("proxy.listen".into(), proxy.listen),
            ("admin.listen".into(), admin.listen),
        ];
        listeners.extend(route_listens);
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| a == addr) {
                self.problem(key.clone(), format!("{addr} is already used by {other}"));
            }
        }

        Some(Config {
            proxy,
            admin,
            tokens,
            upstream,
            profiles,
            statics,
            routes,
        })
    }

    /// A `grant = "static"` profile: `credential_file`, and none of the
    /// token endpoint's keys (a set one would be silently ignored).
    fn static_profile(&mut self, name: &str, p: RawProfile) -> Option<Static> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let unused = [
            ("token_url", p.token_url.is_some()),
            ("issuer", p.issuer.is_some()),
            ("client_id", p.client_id.is_some()),
            ("client_secret_file", p.client_secret_file.is_some()),
            ("client_secret_env", p.client_secret_env.is_some()),
            ("auth_method", p.auth_method.is_some()),
            ("private_key_file", p.private_key_file.is_some()),
            ("key_id", p.key_id.is_some()),
            ("signing_alg", p.signing_alg.is_some()),
            ("assertion_audience", p.assertion_audience.is_some()),
            ("client_assertion_file", p.client_assertion_file.is_some()),
            ("client_cert_file", p.client_cert_file.is_some()),
            ("client_key_file", p.client_key_file.is_some()),
            ("scopes", p.scopes.is_some()),
            ("audience", p.audience.is_some()),
            ("resources", p.resources.is_some()),
            ("ca_file", p.ca_file.is_some()),
            ("extra_params", p.extra_params.is_some()),
            ("token_headers", p.token_headers.is_some()),
            ("basic_encoding", p.basic_encoding.is_some()),
        ];
        for (k, set) in unused {
            if set {
                self.problem(
                    key(k),
                    "not used by grant \"static\" (there is no token endpoint)",
                );
            }
        }
        let Some(file) = p.credential_file.as_deref() else {
            self.problem(
                key("credential_file"),
                "missing; grant = \"static\" needs it",
            );
            return None;
        };
        let credential_file = self.path(file);
        // Read now, so `check` says what is wrong with the file.
        if let Err(e) = secret::Source::File(credential_file.clone()).read() {
            self.problem(key("credential_file"), e.to_string());
            return None;
        }
        Some(Static {
            name: name.to_owned(),
            credential_file,
        })
    }

    fn one_of(&mut self, key: &str, value: &str, allowed: &[&str]) {
        self.problem(
            key,
            format!(
                "unknown value {value:?}; expected one of {}",
                allowed.join(", ")
            ),
        );
    }

    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let value = value.unwrap_or(default);
        value.parse().unwrap_or_else(|_| {
            self.problem(
                key,
                format!("invalid address {value:?}; expected IP:PORT such as \"127.0.0.1:4180\""),
            );
            default.parse().expect("valid default address")
        })
    }

    /// A whole number within `range`, or `default` when unset.
    fn count(
        &mut self,
        key: &str,
        value: Option<u64>,
        default: usize,
        range: std::ops::RangeInclusive<usize>,
    ) -> usize {
        let Some(v) = value else {
            return default;
        };
        match usize::try_from(v) {
            Ok(n) if range.contains(&n) => n,
            _ => {
                self.problem(
                    key,
                    format!(
                        "{v} is out of range; expected {} to {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn duration(&mut self, key: &str, value: Option<String>, default: &str) -> Duration {
        match value {
            None => dur(default),
            Some(v) => match humantime::parse_duration(&v) {
                // A bound keeps every timer and sum of durations far from overflow.
                Ok(d) if d > MAX_DURATION => {
                    self.problem(key, format!("{v:?} is too long; at most 24h"));
                    dur(default)
                }
                Ok(d) => d,
                Err(_) => {
                    self.problem(
                        key,
                        format!(
                            "invalid duration {v:?}; expected e.g. \"10s\", \"500ms\" or \"5m\""
                        ),
                    );
                    dur(default)
                }
            },
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        let path = PathBuf::from(p);
        if path.is_absolute() {
            path
        } else {
            self.base_dir.join(path)
        }
    }

    /// A file that must exist and be readable now.
    fn readable_file(&mut self, key: &str, p: &str) -> PathBuf {
        let path = self.path(p);
        if let Err(e) = std::fs::File::open(&path) {
            self.problem(key, format!("cannot read {}: {e}", path.display()));
        }
        path
    }

    fn ca_file(&mut self, key: &str, p: Option<&str>) -> Option<PathBuf> {
        let p = p?;
        let path = self.path(p);
        if let Err(e) = crate::tls::load_certs(&path) {
            self.problem(key, e.to_string());
        }
        Some(path)
    }

    fn https_url(&mut self, key: &str, u: &str) -> Option<url::Url> {
        match url::Url::parse(u) {
            Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                self.problem(
                    key,
                    "must not contain user information; use client_secret_file or client_secret_env",
                );
                None
            }
            Ok(url) if url.scheme() == "https" && url.host().is_some() => Some(url),
            Ok(_) => {
                self.problem(key, format!("{u:?} must be an https:// URL"));
                None
            }
            Err(e) => {
                self.problem(key, format!("invalid URL {u:?}: {e}"));
                None
            }
        }
    }

    fn secret_source(&mut self, name: &str, p: &RawProfile) -> Option<secret::Source> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        match (&p.client_secret_file, &p.client_secret_env) {
            (Some(f), None) => {
                let path = self.readable_file(&key("client_secret_file"), f);
                let src = secret::Source::File(path);
                if let Err(e @ secret::Error::Empty { .. }) = src.read() {
                    self.problem(key("client_secret_file"), e.to_string());
                }
                Some(src)
            }
            (None, Some(var)) => {
                let src = secret::Source::Env(var.clone());
                if let Err(e) = src.read() {
                    self.problem(key("client_secret_env"), e.to_string());
                }
                Some(src)
            }
            (Some(_), Some(_)) => {
                self.problem(
                    key("client_secret_file"),
                    "set either client_secret_file or client_secret_env, not both",
                );
                None
            }
            (None, None) => {
                let method = p.auth_method.as_deref().unwrap_or("client_secret_basic");
                self.problem(
                    key("client_secret_file"),
                    format!("missing; auth_method {method:?} needs client_secret_file or client_secret_env"),
                );
                None
            }
        }
    }

    fn signing_alg(&mut self, key: &str, alg: Option<&str>) -> Result<Option<Alg>, ()> {
        match alg {
            None => Ok(None),
            Some(a) => match Alg::parse(a) {
                Some(alg) => Ok(Some(alg)),
                None => {
                    self.one_of(key, a, &Alg::ALL);
                    Err(())
                }
            },
        }
    }

    /// The client authentication of a profile: each method's own keys,
    /// present and valid; keys of other methods refused.
    fn client_auth(&mut self, name: &str, p: &RawProfile) -> Option<ClientAuth> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let method = p.auth_method.as_deref().unwrap_or("client_secret_basic");
        // Which keys each method reads.
        let uses: &[&str] = match method {
            "client_secret_basic" | "client_secret_post" => {
                &["client_secret_file", "client_secret_env"]
            }
            "client_secret_jwt" => &[
                "client_secret_file",
                "client_secret_env",
                "key_id",
                "signing_alg",
                "assertion_audience",
            ],
            "private_key_jwt" if p.client_assertion_file.is_some() => &["client_assertion_file"],
            "private_key_jwt" => &[
                "private_key_file",
                "key_id",
                "signing_alg",
                "assertion_audience",
            ],
            "tls_client_auth" => &["client_cert_file", "client_key_file"],
            other => {
                self.one_of(&key("auth_method"), other, &METHODS);
                // Still check a secret that is named: report everything at once.
                if p.client_secret_file.is_some() || p.client_secret_env.is_some() {
                    self.secret_source(name, p);
                }
                return None;
            }
        };
        let mut stray = false;
        for (k, set) in [
            ("client_secret_file", p.client_secret_file.is_some()),
            ("client_secret_env", p.client_secret_env.is_some()),
            ("private_key_file", p.private_key_file.is_some()),
            ("key_id", p.key_id.is_some()),
            ("signing_alg", p.signing_alg.is_some()),
            ("assertion_audience", p.assertion_audience.is_some()),
            ("client_assertion_file", p.client_assertion_file.is_some()),
            ("client_cert_file", p.client_cert_file.is_some()),
            ("client_key_file", p.client_key_file.is_some()),
        ] {
            if set && !uses.contains(&k) {
                let why = if method == "private_key_jwt" && p.client_assertion_file.is_some() {
                    format!("not used by auth_method {method:?} with client_assertion_file")
                } else {
                    format!("not used by auth_method {method:?}")
                };
                self.problem(key(k), why);
                stray = true;
            }
        }
        let auth = match method {
            "client_secret_basic" => self.secret_source(name, p).map(ClientAuth::SecretBasic),
            "client_secret_post" => self.secret_source(name, p).map(ClientAuth::SecretPost),
            "client_secret_jwt" => {
                let secret = self.secret_source(name, p);
                let alg = match self.signing_alg(&key("signing_alg"), p.signing_alg.as_deref()) {
                    Ok(Some(a)) if !a.is_hmac() => {
                        self.problem(
                            key("signing_alg"),
                            format!("{a} is not an HMAC algorithm; client_secret_jwt uses HS256, HS384 or HS512"),
                        );
                        None
                    }
                    Ok(a) => Some(a.unwrap_or(Alg::HS256)),
                    Err(()) => None,
                };
                Some(ClientAuth::SecretJwt {
                    secret: secret?,
                    alg: alg?,
                    key_id: p.key_id.clone(),
                })
            }
            "private_key_jwt" => match (&p.private_key_file, &p.client_assertion_file) {
                (_, Some(f)) => {
                    let path = self.readable_file(&key("client_assertion_file"), f);
                    Some(ClientAuth::ClientAssertion(secret::Source::File(path)))
                }
                (Some(f), None) => {
                    let path = self.path(f);
                    let alg = self.signing_alg(&key("signing_alg"), p.signing_alg.as_deref());
                    match (SigningKey::load(&path), alg) {
                        (Ok(k), Ok(alg)) => match k.alg(alg) {
                            Ok(_) => Some(ClientAuth::PrivateKeyJwt {
                                key_file: path,
                                alg,
                                key_id: p.key_id.clone(),
                            }),
                            Err(e) => {
                                self.problem(key("signing_alg"), e.to_string());
                                None
                            }
                        },
                        (Err(e), _) => {
                            self.problem(key("private_key_file"), e.to_string());
                            None
                        }
                        (_, Err(())) => None,
                    }
                }
                (None, None) => {
                    self.problem(
                        key("private_key_file"),
                        "missing; private_key_jwt needs private_key_file or client_assertion_file",
                    );
                    None
                }
            },
            "tls_client_auth" => match (&p.client_cert_file, &p.client_key_file) {
                (Some(c), Some(k)) => {
                    let (cert, key_file) = (self.path(c), self.path(k));
                    match crate::tls::load_identity(&cert, &key_file) {
                        Ok(_) => Some(ClientAuth::TlsClientAuth {
                            cert_file: cert,
                            key_file,
                        }),
                        Err(e) => {
                            self.problem(key("client_cert_file"), e.to_string());
                            None
                        }
                    }
                }
                (None, _) => {
                    self.problem(
                        key("client_cert_file"),
                        "missing; tls_client_auth needs client_cert_file and client_key_file",
                    );
                    None
                }
                (_, None) => {
                    self.problem(
                        key("client_key_file"),
                        "missing; tls_client_auth needs client_cert_file and client_key_file",
                    );
                    None
                }
            },
            _ => None,
        };
        auth.filter(|_| !stray)
    }

    fn profile(&mut self, name: &str, p: RawProfile) -> Option<Profile> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let mut ok = true;
        let endpoint = match (&p.token_url, &p.issuer) {
            (Some(u), None) => self.https_url(&key("token_url"), u).map(Endpoint::TokenUrl),
            (None, Some(u)) => self.https_url(&key("issuer"), u).map(Endpoint::Issuer),
            (Some(_), Some(_)) => {
                self.problem(key("issuer"), "set either token_url or issuer, not both");
                None
            }
            (None, None) => {
                self.problem(
                    key("token_url"),
                    "missing; set token_url, or issuer for discovery",
                );
                None
            }
        };
        let client_id = match &p.client_id {
            Some(id) if !id.is_empty() => Some(id.clone()),
            _ => {
                self.problem(key("client_id"), "missing");
                None
            }
        };
        let auth = self.client_auth(name, &p);
        let basic_encoding = match p.basic_encoding.as_deref().unwrap_or("form") {
            "form" => BasicEncoding::Form,
            "raw" => BasicEncoding::Raw,
            other => {
                self.one_of(&key("basic_encoding"), other, &["form", "raw"]);
                ok = false;
                BasicEncoding::Form
            }
        };
        let mut token_headers = Vec::new();
        for (h, v) in p.token_headers.unwrap_or_default() {
            match (
                HeaderName::try_from(h.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                (Ok(n), Ok(v)) => token_headers.push((n, v)),
                _ => {
                    self.problem(
                        key(&format!("token_headers.{h}")),
                        "invalid header name or value",
                    );
                    ok = false;
                }
            }
        }
        for r in p.resources.iter().flatten() {
            if url::Url::parse(r).is_err() {
                self.problem(
                    key("resources"),
                    format!("{r:?} is not an absolute URI (RFC 8707)"),
                );
                ok = false;
            }
        }
        let ca_file = self.ca_file(&key("ca_file"), p.ca_file.as_deref());
        Some(Profile {
            name: name.to_owned(),
            endpoint: endpoint?,
            client_id: client_id?,
            auth: auth?,
            assertion_audience: p.assertion_audience,
            scopes: p.scopes.unwrap_or_default(),
            audience: p.audience,
            resources: p.resources.unwrap_or_default(),
            ca_file,
            extra_params: p.extra_params.unwrap_or_default().into_iter().collect(),
            token_headers,
            basic_encoding,
        })
        .filter(|_| ok)
    }

    fn route(&mut self, i: usize, r: RawRoute, profile_known: bool) -> Option<Route> {
        let key = |k: &str| format!("routes[{i}].{k}");
        let host = match r.host.as_deref() {
            None => {
                self.problem(key("host"), "missing");
                None
            }
            Some(h) => Pattern::parse(h)
                .map_err(|e| self.problem(key("host"), e))
                .ok(),
        };
        let profile = match r.profile {
            None => {
                self.problem(key("profile"), "missing");
                None
            }
            Some(p) if !profile_known => {
                self.problem(
                    key("profile"),
                    format!("no profile named {p:?} (profiles.{p})"),
                );
                None
            }
            Some(p) => Some(p),
        };
        let upstream = match (&r.upstream, &host) {
            (Some(u), _) => self.upstream_url(&key("upstream"), u),
            (None, Some(h)) if h.is_wildcard() => Some(UpstreamTarget::SameHost),
            (None, Some(h)) => self.upstream_url(&key("host"), &format!("https://{h}")),
            (None, None) => None,
        };
        let listen = r
            .listen
            .as_deref()
            .map(|l| self.addr(&key("listen"), Some(l), "127.0.0.1:0"));
        if matches!(upstream, Some(UpstreamTarget::SameHost))
            && host.as_ref().is_some_and(|h| h.port().is_some())
        {
            // The upstream would be the request host on 443, not the port the
            // pattern names: say where to go instead of guessing.
            self.problem(
                key("upstream"),
                "a wildcard route with a port needs an explicit upstream",
            );
        }
        if listen.is_some() && matches!(upstream, Some(UpstreamTarget::SameHost)) {
            // On its own port the app's Host header would pick the upstream,
            // and the token could go anywhere.
            self.problem(
                key("upstream"),
                "a wildcard route with its own listen port needs an explicit upstream",
            );
        }
        let protocol = match r.upstream_protocol.as_deref().unwrap_or("auto") {
            "auto" => UpstreamProtocol::Auto,
            "http1" => UpstreamProtocol::Http1,
            "http2" => UpstreamProtocol::Http2,
            other => {
                self.one_of(
                    &key("upstream_protocol"),
                    other,
                    &["auto", "http1", "http2"],
                );
                UpstreamProtocol::Auto
            }
        };
        let client_cert = self.client_cert(
            i,
            r.client_cert_file.as_deref(),
            r.client_key_file.as_deref(),
        );
        let ca_file = self.ca_file(&key("ca_file"), r.ca_file.as_deref());
        let header = self.credential_header(&key("header"), r.header.as_deref());
        let prefix = r.prefix.unwrap_or_else(|| "Bearer ".to_owned());
        if prefix.starts_with([' ', '\t']) || !prefix.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            self.problem(
                key("prefix"),
                "must be printable ASCII and must not start with a space",
            );
        }
        let host = host?;
        Some(Route {
            label: r.host.unwrap_or_default(),
            host,
            upstream: upstream?,
            profile: profile?,
            listen,
            ca_file,
            client_cert: client_cert.ok()?,
            protocol,
            allow_connect: r.allow_connect.unwrap_or(false),
            header: header?,
            prefix,
        })
    }

    /// A route's `header`: a valid name that is not part of the message's
    /// framing or routing, which the proxy sets itself.
    fn credential_header(&mut self, key: &str, name: Option<&str>) -> Option<HeaderName> {
        let Some(name) = name else {
            return Some(http::header::AUTHORIZATION);
        };
        let Ok(parsed) = HeaderName::try_from(name.to_ascii_lowercase()) else {
            self.problem(key, format!("{name:?} is not a valid header name"));
            return None;
        };
        const RESERVED: [&str; 11] = [
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "upgrade",
            "te",
            "trailer",
            "proxy-authorization",
            "proxy-connection",
            "content-type",
        ];
        if RESERVED.contains(&parsed.as_str()) {
            self.problem(key, format!("{name:?} cannot carry a credential"));
            return None;
        }
        Some(parsed)
    }

    /// A route's `client_cert_file` and `client_key_file`: both or
    /// neither, readable, and a key that fits the certificate. `Err` when
    /// a problem was reported.
    fn client_cert(
        &mut self,
        i: usize,
        cert: Option<&str>,
        key_file: Option<&str>,
    ) -> Result<Option<ClientCert>, ()> {
        let key = |k: &str| format!("routes[{i}].{k}");
        match (cert, key_file) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) => {
                let (cert_file, key_file) = (self.path(c), self.path(k));
                match crate::tls::load_identity(&cert_file, &key_file) {
                    Ok(_) => Ok(Some(ClientCert {
                        cert_file,
                        key_file,
                    })),
                    Err(e) => {
                        let name = if e.is_about_key(&key_file) {
                            "client_key_file"
                        } else {
                            "client_cert_file"
                        };
                        self.problem(key(name), e.to_string());
                        Err(())
                    }
                }
            }
            (Some(_), None) => {
                self.problem(
                    key("client_key_file"),
                    "missing; mutual TLS to the upstream needs client_cert_file and client_key_file",
                );
                Err(())
            }
            (None, Some(_)) => {
                self.problem(
                    key("client_cert_file"),
                    "missing; mutual TLS to the upstream needs client_cert_file and client_key_file",
                );
                Err(())
            }
        }
    }

    /// `allow_connect` on a route whose host no `proxy.connect_allow` entry
    /// covers would do nothing: say so rather than let it look effective.
    fn allow_connect(&mut self, i: usize, host: &Pattern, connect_allow: &[String]) {
        let covered = connect_allow
            .iter()
            .filter_map(|e| Pattern::parse(e).ok())
            .any(|a| hosts_overlap(host, &a));
        if !covered {
            let bare = bare_host(host);
            let example = if host.is_wildcard() {
                format!("*.{}:443", bare.1)
            } else {
                format!("{}:443", bare.1)
            };
            self.problem(
                format!("routes[{i}].allow_connect"),
                format!(
                    "has no effect: no proxy.connect_allow entry covers {host}; add e.g. {example:?} there"
                ),
            );
        }
    }

    fn upstream_url(&mut self, key: &str, u: &str) -> Option<UpstreamTarget> {
        let url = match url::Url::parse(u) {
            Ok(url) => url,
            Err(e) => {
                self.problem(key, format!("invalid URL {u:?}: {e}"));
                return None;
            }
        };
        if url.scheme() != "https" {
            self.problem(
                key,
                format!("{u:?} must be an https:// URL: tokens never travel in clear text"),
            );
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.problem(key, "must not contain user information");
            return None;
        }
        if url.query().is_some() || url.fragment().is_some() {
            self.problem(key, "must not contain a query or fragment");
            return None;
        }
        let host = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let authority = match Authority::try_from(authority.as_str()) {
            Ok(a) => a,
            Err(e) => {
                self.problem(key, format!("invalid authority {authority:?}: {e}"));
                return None;
            }
        };
        let base_path = url.path().trim_end_matches('/').to_owned();
        Some(UpstreamTarget::Fixed {
            authority,
            base_path,
        })
    }
}

/// (wildcard, name) of a host pattern, without its port.
fn bare_host(p: &Pattern) -> (bool, String) {
    let text = p.to_string();
    let text = match p.port() {
        Some(port) => text
            .strip_suffix(&format!(":{port}"))
            .unwrap_or(&text)
            .to_owned(),
        None => text,
    };
    match text.strip_prefix("*.") {
        Some(name) => (true, name.to_owned()),
        None => (false, text),
    }
}

/// Whether some host matches both patterns, whatever the ports.
fn hosts_overlap(a: &Pattern, b: &Pattern) -> bool {
    let ((aw, an), (bw, bn)) = (bare_host(a), bare_host(b));
    let under = |name: &str, suffix: &str| {
        name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
    };
    match (aw, bw) {
        (false, false) => an == bn,
        (true, false) => under(&bn, &an),
        (false, true) => under(&an, &bn),
        (true, true) => an == bn || under(&an, &bn) || under(&bn, &an),
    }
}

impl Config {
    /// Names of profiles that at least one route uses: only these fetch tokens.
    pub fn profiles_in_use(&self) -> impl Iterator<Item = &Profile> {
        self.profiles
            .values()
            .filter(|p| self.routes.iter().any(|r| r.profile == p.name))
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
                | ClientAuth::ClientAssertion(Source::Env(_)) => {}
            }
        }
        for (name, s) in &self.statics {
            out.push((
                format!("profiles.{name}.credential_file"),
                s.credential_file.clone(),
            ));
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

#[cfg(test)]
mod tests;
