//! `token-injector demo`: everything needed to see a token injected, in one
//! process on 127.0.0.1, with nothing to set up.
//!
//! - a per-run CA (rcgen) and one leaf for `localhost` and `127.0.0.1`,
//!   used by both servers below;
//! - a token endpoint over HTTPS (client credentials, `client_secret_basic`)
//!   issuing HS256 JWTs that live `--token-lifetime` (20 s), so renewals
//!   show within a minute;
//! - an HTTPS echo upstream that answers every request with the request as
//!   it arrived, the bearer token shortened and its claims decoded;
//! - the proxy itself, started by [`crate::start`] from a TOML config the
//!   demo writes into a fresh temporary directory (with the CA and the
//!   client secret) and loads through [`crate::config::load`], exactly as
//!   `run` does. The directory is removed when the demo stops.
//!
//! The secret and the signing key are random per run and never logged; the
//! logs name tokens by their `jti` only.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The client the demo's token endpoint knows.
pub const CLIENT_ID: &str = "demo-client";
/// The profile in the demo config.
pub const PROFILE: &str = "demo";
/// The route used through the forward proxy (`curl -x`).
pub const FORWARD_HOST: &str = "echo.demo";
/// The route with its own listener (`--direct`).
pub const DIRECT_HOST: &str = "echo-direct.demo";
/// The `aud` claim of the demo's tokens.
pub const AUDIENCE: &str = "demo-echo";
/// The scope the demo profile asks for.
pub const SCOPE: &str = "echo.read";
/// Where the token endpoint answers.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// Shortest and longest `--token-lifetime`: the proxy refuses tokens living
/// under a second, and a JWT `exp` is in whole seconds.
const MIN_LIFETIME: Duration = Duration::from_secs(2);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long the banner waits for the first token before it prints anyway.
const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(10);
/// The most a demo server reads of a request body.
const MAX_BODY: usize = 1024 * 1024;
/// How many characters of a token the echo shows.
const SHOWN_TOKEN_CHARS: usize = 12;

/// The command line of `token-injector demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The proxy listener, for `curl -x` (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:4180")]
    pub listen: SocketAddr,
    /// The admin listener: /metrics, /healthz, /readyz (loopback only).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// The dedicated listener of the echo-direct.demo route (no proxy
    /// setting needed).
    #[arg(long, default_value = "127.0.0.1:4181")]
    pub direct: SocketAddr,
    /// How long the demo's tokens live ("20s", "1m"); the proxy renews them
    /// before they expire.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4180".parse().expect("valid address"),
            admin: "127.0.0.1:9090".parse().expect("valid address"),
            direct: "127.0.0.1:4181".parse().expect("valid address"),
            token_lifetime: Duration::from_secs(20),
        }
    }
}

impl Options {
    fn flags(&self) -> [(&'static str, SocketAddr); 3] {
        [
            ("--listen", self.listen),
            ("--admin", self.admin),
            ("--direct", self.direct),
        ]
    }

    /// What the config validator would refuse, said in terms of the flags.
    fn validate(&self) -> Result<(), Error> {
        if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&self.token_lifetime) {
            return Err(Error::Usage(format!(
                "--token-lifetime {} is out of range; expected 2s to 24h",
                humantime::format_duration(self.token_lifetime)
            )));
        }
        if !self.admin.ip().is_loopback() {
            return Err(Error::Usage(format!(
                "--admin {} is not a loopback address; the demo keeps the admin endpoints local",
                self.admin
            )));
        }
        let flags = self.flags();
        for (i, (flag, addr)) in flags.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = flags[..i].iter().find(|(_, a)| a == addr) {
                return Err(Error::Usage(format!(
                    "{flag} {addr} is the same address as {other}; give each its own port"
                )));
            }
        }
        Ok(())
    }
}

/// Why the demo could not start. Each is one line, naming the flag to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(
        "cannot listen on {addr} ({flag}): {reason}; choose another address with {flag}, \
         e.g. {flag} 127.0.0.1:0 for any free port"
    )]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        reason: String,
    },
    #[error("demo setup failed: {0}")]
    Setup(String),
    #[error("the demo config {path} was refused: {}", .problems.join("; "))]
    Config {
        path: PathBuf,
        problems: Vec<String>,
    },
    #[error("the proxy did not start: {0}")]
    Start(String),
}

fn setup(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Setup(format!("{what}: {e}"))
}

/// The flag that sets the listener of a config key.
fn flag_of(key: &str) -> &'static str {
    match key {
        "proxy.listen" => "--listen",
        "admin.listen" => "--admin",
        _ => "--direct",
    }
}

fn bind_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "the address is already in use (another demo or proxy running?)".into()
        }
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::AddrNotAvailable => "no such local address".into(),
        _ => e.to_string(),
    }
}

fn start_error(e: crate::StartError) -> Error {
    match e {
        crate::StartError::Bind { key, addr, source } => Error::Bind {
            flag: flag_of(&key),
            addr,
            reason: bind_reason(&source),
        },
        other => Error::Start(other.to_string()),
    }
}

/// A directory of our own under the system temp dir, mode 0700, removed
/// when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> Result<Self, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..8 {
            let path = base.join(format!(
                "token-injector-demo-{}-{}",
                std::process::id(),
                random_hex(4)?
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(Error::Setup(format!(
                        "cannot create a directory in {}: {e}",
                        base.display()
                    )));
                }
            }
        }
        Err(Error::Setup(format!(
            "cannot create a directory in {}: {}",
            base.display(),
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the demo directory");
        }
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut buf = [0u8; N];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| Error::Setup("the system random generator failed".into()))?;
    Ok(buf)
}

fn random_hex(n: usize) -> Result<String, Error> {
    let bytes = random_bytes::<32>()?;
    Ok(bytes[..n.min(32)]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The per-run CA and the servers' TLS settings.
struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn new() -> Result<Self, Error> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let ca_err = |e: rcgen::Error| setup("cannot make the demo CA", e);
        let leaf_err = |e: rcgen::Error| setup("cannot make the demo certificate", e);
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "token-injector demo CA (this run only)",
        );
        let ca_key = KeyPair::generate().map_err(ca_err)?;
        let issuer = CertifiedIssuer::self_signed(params, ca_key).map_err(ca_err)?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(leaf_err)?;
        let leaf_key = KeyPair::generate().map_err(leaf_err)?;
        let cert = leaf.signed_by(&leaf_key, &issuer).map_err(leaf_err)?;
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|e| setup("cannot use the demo key", e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.der().clone()], key_der)
            })
            .map_err(|e| setup("TLS setup failed", e))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem: issuer.pem(),
            server: Arc::new(server),
        })
    }
}

// ---------------------------------------------------------------------------
// JWTs: HS256 with ring's HMAC.

/// Signs `claims` as a compact HS256 JWT.
pub fn encode_jwt(key: &hmac::Key, claims: &Value) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": "demo"});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let tag = hmac::sign(key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// A JWT taken apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub header: Value,
    pub claims: Value,
    /// True when the header says HS256 and the HMAC under `key` matches.
    pub signature_valid: bool,
}

/// Decodes a compact JWT and checks its HS256 signature against `key`.
/// Does not judge `exp`: the echo shows it instead.
pub fn decode_jwt(token: &str, key: &hmac::Key) -> Result<Decoded, &'static str> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (expected three dot-separated parts)");
    };
    let part = |p: &str| -> Result<Value, &'static str> {
        let bytes = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "not a JWT (a part is not base64url)")?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err("not a JWT (a part is not a JSON object)"),
        }
    };
    let header = part(h)?;
    let claims = part(c)?;
    let signature_valid = header.get("alg").and_then(Value::as_str) == Some("HS256")
        && URL_SAFE_NO_PAD.decode(s).is_ok_and(|sig| {
            let input_len = h.len() + 1 + c.len();
            hmac::verify(key, &token.as_bytes()[..input_len], &sig).is_ok()
        });
    Ok(Decoded {
        header,
        claims,
        signature_valid,
    })
}

// ---------------------------------------------------------------------------
// The token endpoint.

/// What the token endpoint knows: the one client and the signing key.
struct Issuer {
    issuer: String,
    client_secret: String,
    key: hmac::Key,
    lifetime: Duration,
}

type Answer = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Answer {
    let mut text = serde_json::to_string_pretty(body).unwrap_or_default();
    text.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Answer {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Equality that takes the same time wherever the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks `Authorization: Basic` (RFC 6749 §2.3.1: id and secret each
/// form-url-encoded, then Base64) against the demo client.
fn basic_auth_ok(headers: &HeaderMap, client_id: &str, client_secret: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, b64)) = value.split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(raw) = STANDARD.decode(b64.trim()) else {
        return false;
    };
    let Some(colon) = raw.iter().position(|b| *b == b':') else {
        return false;
    };
    let decode = |b: &[u8]| -> String {
        form_urlencoded::parse(&[b"x=", b].concat())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (decode(&raw[..colon]), decode(&raw[colon + 1..]));
    // Both compared, always, so timing tells nothing about which failed.
    let id_ok = same(id.as_bytes(), client_id.as_bytes());
    let secret_ok = same(secret.as_bytes(), client_secret.as_bytes());
    id_ok & secret_ok
}

async fn token_endpoint(issuer: Arc<Issuer>, req: Request<Incoming>) -> Answer {
    if req.uri().path() != TOKEN_PATH {
        return oauth_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the demo token endpoint is /oauth2/token",
        );
    }
    if req.method() != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
    }
    if !basic_auth_ok(req.headers(), CLIENT_ID, &issuer.client_secret) {
        tracing::warn!("demo token endpoint refused a request: wrong client credentials");
        let mut resp = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"token-injector demo\""),
        );
        return resp;
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unreadable body",
            );
        }
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let param = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if param("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "the demo issues client_credentials tokens only",
        );
    }
    let scope = param("scope").unwrap_or(SCOPE).to_owned();
    let jti = match random_hex(8) {
        Ok(j) => j,
        Err(_) => {
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "no randomness",
            );
        }
    };
    let iat = now_unix();
    let lifetime = issuer.lifetime.as_secs();
    let claims = json!({
        "iss": issuer.issuer,
        "sub": CLIENT_ID,
        "aud": AUDIENCE,
        "scope": scope,
        "iat": iat,
        "exp": iat + lifetime,
        "jti": jti,
    });
    let token = encode_jwt(&issuer.key, &claims);
    tracing::info!("demo token endpoint issued a token (jti {jti}, expires in {lifetime} s)");
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }),
    )
}

// ---------------------------------------------------------------------------
// The echo upstream.

/// `Bearer <first 12 chars>…`: enough to tell tokens apart, not to use one.
/// Other schemes show only the scheme.
pub fn redact_authorization(value: &str) -> String {
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        // Never more than half of a short token.
        let n = SHOWN_TOKEN_CHARS.min(rest.chars().count() / 2);
        let shown: String = rest.chars().take(n).collect();
        format!("{scheme} {shown}…")
    } else {
        format!("{scheme} …")
    }
}

/// The bearer token of a request, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// The echo's answer, in the order a person reads it.
#[derive(Debug, serde::Serialize)]
pub struct EchoAnswer {
    pub upstream: &'static str,
    pub method: String,
    /// Path and query as the upstream received them.
    pub path: String,
    pub http_version: String,
    /// The `Host` header, else the request's authority (HTTP/2).
    pub host: Option<String>,
    /// Every header as received, `Authorization` shortened, cookies hidden.
    pub headers: Map<String, Value>,
    pub body_bytes: u64,
    pub token: TokenView,
}

/// The bearer token of an echoed request, decoded.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum TokenView {
    Decoded {
        header: Value,
        claims: Value,
        /// HS256 under the demo's signing key.
        signature_valid: bool,
        /// `exp` minus now, in seconds; negative once expired.
        expires_in_s: Option<i64>,
    },
    Undecodable {
        error: &'static str,
    },
    Missing {
        note: &'static str,
    },
}

/// The echo's answer: the request as the upstream received it, the
/// `Authorization` value shortened and its token decoded.
pub fn echo_answer(
    method: &Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &HeaderMap,
    body_bytes: u64,
    key: &hmac::Key,
    now_unix: u64,
) -> EchoAnswer {
    let mut shown = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| {
                let text = String::from_utf8_lossy(v.as_bytes());
                Value::String(match *name {
                    header::AUTHORIZATION => redact_authorization(&text),
                    header::PROXY_AUTHORIZATION | header::COOKIE => "[redacted]".to_owned(),
                    _ => text.into_owned(),
                })
            })
            .collect();
        let value = match <[Value; 1]>::try_from(values) {
            Ok([one]) => one,
            Err(many) => Value::Array(many),
        };
        shown.insert(name.as_str().to_owned(), value);
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()));
    let token = match bearer(headers) {
        None => TokenView::Missing {
            note: "no bearer token: this request did not come through token-injector",
        },
        Some(t) => match decode_jwt(t, key) {
            Ok(d) => TokenView::Decoded {
                expires_in_s: d
                    .claims
                    .get("exp")
                    .and_then(Value::as_i64)
                    .map(|e| e.saturating_sub(now_unix as i64)),
                header: d.header,
                claims: d.claims,
                signature_valid: d.signature_valid,
            },
            Err(error) => TokenView::Undecodable { error },
        },
    };
    EchoAnswer {
        upstream: "token-injector demo echo",
        method: method.as_str().to_owned(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned(),
        http_version: format!("{version:?}"),
        host,
        headers: shown,
        body_bytes,
        token,
    }
}

async fn echo(key: Arc<hmac::Key>, req: Request<Incoming>) -> Answer {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    let answer = echo_answer(
        &parts.method,
        &parts.uri,
        parts.version,
        &parts.headers,
        body_bytes,
        &key,
        now_unix(),
    );
    let (jti, left) = match &answer.token {
        TokenView::Decoded {
            claims,
            expires_in_s,
            ..
        } => (
            claims.get("jti").and_then(Value::as_str).unwrap_or("-"),
            expires_in_s.map_or_else(|| "-".to_owned(), |s| format!("{s} s")),
        ),
        _ => ("-", "-".to_owned()),
    };
    tracing::info!(
        "demo echo answered {} {} (token jti {jti}, expires in {left})",
        parts.method,
        parts.uri.path()
    );
    json_response(StatusCode::OK, &answer)
}

// ---------------------------------------------------------------------------
// Serving.

/// Returns once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here.
    let _ = stop.wait_for(|s| *s).await.map(drop);
}

/// Serves HTTP/1.1 and HTTP/2 over TLS on `listener` until `stop` turns
/// true (or its sender is gone), then drops every connection.
async fn serve_tls<F, Fut>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: F,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let acceptor = acceptor.clone();
                    let handler = handler.clone();
                    conns.spawn(async move {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        let svc = service_fn(move |req| {
                            let handler = handler.clone();
                            async move { Ok::<_, Infallible>(handler(req).await) }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    conns.shutdown().await;
}

// ---------------------------------------------------------------------------
// The demo as a whole.

/// The config the demo runs the proxy with; paths relative to its directory.
fn config_text(opts: &Options, token_url: &str, echo_authority: &str) -> String {
    format!(
        r#"# token-injector config written by `token-injector demo` for this run.
# The directory holding it is removed when the demo stops; copy it to keep it.
# Check it with:  token-injector check --config <this file>
#
# The token endpoint and the echo upstream are part of the demo process; their
# certificate comes from a CA made for this run (ca.pem, beside this file).
# Relative paths are resolved against this file's directory.

[proxy]
# Apps set HTTP_PROXY=http://{listen} and call plain http:// URLs.
listen = "{listen}"
# Short, so Ctrl-C stops the demo quickly.
drain_timeout = "2s"

[admin]
# /metrics, /healthz and /readyz.
listen = "{admin}"

# Who the proxy is at the (demo) authorization server.
[profiles.{PROFILE}]
token_url = "{token_url}"
client_id = "{CLIENT_ID}"
auth_method = "client_secret_basic"
# Random for this run, mode 0600.
client_secret_file = "client-secret"
scopes = ["{SCOPE}"]
ca_file = "ca.pem"

# Through the proxy:  http://{FORWARD_HOST}/anything -> https://{echo_authority}/anything
[[routes]]
host = "{FORWARD_HOST}"
upstream = "https://{echo_authority}"
profile = "{PROFILE}"
ca_file = "ca.pem"

# Its own listener, no proxy setting:  http://{direct}/anything -> https://{echo_authority}/anything
[[routes]]
host = "{DIRECT_HOST}"
upstream = "https://{echo_authority}"
profile = "{PROFILE}"
listen = "{direct}"
ca_file = "ca.pem"
"#,
        listen = opts.listen,
        admin = opts.admin,
        direct = opts.direct,
    )
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::Setup(format!("cannot write {}: {e}", path.display())))
}

async fn bind_local() -> Result<(TcpListener, u16), Error> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::Setup(format!("cannot listen on 127.0.0.1: {e}")))?;
    let port = l
        .local_addr()
        .map_err(|e| Error::Setup(e.to_string()))?
        .port();
    Ok((l, port))
}

/// Waits until `store` holds a usable token, at most `within`. Watches the
/// fetch attempts rather than calling `Store::get`, which would count as a
/// request waiting for a token in the metrics.
async fn first_token(store: &crate::token::Store, within: Duration) -> Result<(), String> {
    let mut attempts = store.attempts();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if store.current().is_some() {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, attempts.changed())
            .await
            .is_err()
        {
            return Err(store
                .last_error()
                .unwrap_or_else(|| format!("no token after {within:?}")));
        }
    }
}

/// A running demo: the proxy, the token endpoint, the echo upstream and
/// the directory holding the config.
pub struct Demo {
    running: Option<crate::Running>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    dir: Option<TempDir>,
    config_path: PathBuf,
    token_url: String,
    echo_url: String,
    lifetime: Duration,
    first_token: Result<(), String>,
}

impl Demo {
    /// Makes the CA, the secret and the config, starts both servers and
    /// the proxy, and waits (briefly) for the first token.
    pub async fn start(opts: Options) -> Result<Demo, Error> {
        opts.validate()?;
        let dir = TempDir::create()?;
        let pki = Pki::new()?;
        write_file(&dir.path().join("ca.pem"), &pki.ca_pem, 0o644)?;
        let client_secret = random_hex(24)?;
        write_file(
            &dir.path().join("client-secret"),
            &format!("{client_secret}\n"),
            0o600,
        )?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &random_bytes::<32>()?);

        let (token_listener, token_port) = bind_local().await?;
        let (echo_listener, echo_port) = bind_local().await?;
        let token_url = format!("https://localhost:{token_port}{TOKEN_PATH}");
        let echo_authority = format!("localhost:{echo_port}");
        let config_path = dir.path().join("token-injector.toml");
        write_file(
            &config_path,
            &config_text(&opts, &token_url, &echo_authority),
            0o644,
        )?;
        let config = crate::config::load(&config_path).map_err(|e| Error::Config {
            path: config_path.clone(),
            problems: e.lines(),
        })?;

        let (stop, stop_rx) = watch::channel(false);
        let issuer = Arc::new(Issuer {
            issuer: format!("https://localhost:{token_port}"),
            client_secret,
            key: key.clone(),
            lifetime: opts.token_lifetime,
        });
        let key = Arc::new(key);
        let servers = vec![
            tokio::spawn(serve_tls(
                token_listener,
                Arc::clone(&pki.server),
                move |req| token_endpoint(Arc::clone(&issuer), req),
                stop_rx.clone(),
            )),
            tokio::spawn(serve_tls(
                echo_listener,
                Arc::clone(&pki.server),
                move |req| echo(Arc::clone(&key), req),
                stop_rx,
            )),
        ];
        let running = match crate::start(config).await {
            Ok(r) => r,
            Err(e) => {
                let _ = stop.send(true);
                for s in servers {
                    let _ = s.await;
                }
                return Err(start_error(e));
            }
        };
        let first_token = match running.store(PROFILE) {
            Some(store) => first_token(&store, FIRST_TOKEN_WAIT).await,
            None => Err("the demo profile is not in use".into()),
        };
        Ok(Demo {
            running: Some(running),
            stop,
            servers,
            dir: Some(dir),
            config_path,
            token_url,
            echo_url: format!("https://{echo_authority}"),
            lifetime: opts.token_lifetime,
            first_token,
        })
    }

    /// The config file the proxy was started from.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    fn running(&self) -> &crate::Running {
        self.running.as_ref().expect("running until shutdown")
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.running().proxy_addr()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.running().admin_addr()
    }

    pub fn direct_addr(&self) -> Option<SocketAddr> {
        self.running().route_addr(DIRECT_HOST)
    }

    /// What to print once started: what runs where, the commands to try.
    pub fn banner(&self) -> String {
        let proxy = self.proxy_addr();
        let admin = self.admin_addr();
        let mut b = String::new();
        b.push_str("token-injector demo: a token endpoint, an HTTPS echo upstream and the proxy, all on this machine.\n\n");
        b.push_str(&format!(
            "  token endpoint  {}  (client {CLIENT_ID}, tokens live {})\n",
            self.token_url,
            humantime::format_duration(self.lifetime)
        ));
        b.push_str(&format!(
            "  echo upstream   {}  (answers with the request as it arrived, token decoded)\n",
            self.echo_url
        ));
        b.push_str(&format!("  proxy           http://{proxy}\n"));
        b.push_str(&format!(
            "  config          {}\n",
            self.config_path.display()
        ));
        if let Err(why) = &self.first_token {
            b.push_str(&format!(
                "\n  No token yet ({why}); requests wait for one or get 503. See the log.\n"
            ));
        }
        b.push_str(
            "\nTry (your request carries no token; the echo shows the one the proxy added):\n",
        );
        b.push_str(&format!(
            "  curl -x http://{proxy} http://{FORWARD_HOST}/anything\n"
        ));
        if let Some(direct) = self.direct_addr() {
            b.push_str(&format!("  curl http://{direct}/anything\n"));
        }
        b.push_str(&format!(
            "  curl -s http://{admin}/metrics | grep token_injector_token\n"
        ));
        b.push_str(&format!("  curl http://{admin}/readyz\n"));
        b.push_str("\nThe log below shows each token issued and renewed. Ctrl-C to stop.\n");
        b
    }

    /// Stops the proxy (draining in-flight requests), then both servers,
    /// and removes the config directory.
    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let _ = self.stop.send(true);
        for s in self.servers.drain(..) {
            let _ = s.await;
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_owned();
            drop(dir);
            tracing::info!(dir = %path.display(), "demo stopped; its directory is removed");
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for s in &self.servers {
            s.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[b; 32])
    }

    fn echo(
        method: &Method,
        uri: &http::Uri,
        version: http::Version,
        headers: &HeaderMap,
        body_bytes: u64,
        key: &hmac::Key,
        now_unix: u64,
    ) -> Value {
        serde_json::to_value(echo_answer(
            method, uri, version, headers, body_bytes, key, now_unix,
        ))
        .unwrap()
    }

    fn claims() -> Value {
        json!({"iss": "https://localhost:1", "sub": CLIENT_ID, "aud": AUDIENCE,
               "scope": SCOPE, "iat": 100, "exp": 120, "jti": "abc"})
    }

    #[test]
    fn jwt_round_trip_verifies() {
        let k = key(1);
        let t = encode_jwt(&k, &claims());
        assert_eq!(t.split('.').count(), 3);
        let d = decode_jwt(&t, &k).unwrap();
        assert_eq!(d.claims, claims());
        assert_eq!(d.header["alg"], "HS256");
        assert!(d.signature_valid);
        // The proxy reads exp from it, as from any JWT.
        assert_eq!(crate::token::response::jwt_exp(&t), Some(120));
    }

    #[test]
    fn jwt_with_another_key_or_changed_claims_does_not_verify() {
        let t = encode_jwt(&key(1), &claims());
        assert!(!decode_jwt(&t, &key(2)).unwrap().signature_valid);

        let parts: Vec<&str> = t.split('.').collect();
        let mut forged = claims();
        forged["sub"] = json!("someone-else");
        let body = URL_SAFE_NO_PAD.encode(forged.to_string());
        let tampered = format!("{}.{}.{}", parts[0], body, parts[2]);
        let d = decode_jwt(&tampered, &key(1)).unwrap();
        assert_eq!(d.claims["sub"], "someone-else");
        assert!(!d.signature_valid);

        // alg "none" with an empty signature is never valid.
        let none = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
        let unsigned = format!("{none}.{}.", parts[1]);
        assert!(!decode_jwt(&unsigned, &key(1)).unwrap().signature_valid);
    }

    #[test]
    fn non_jwts_are_refused() {
        for t in [
            "opaque",
            "a.b",
            "a.b.c.d",
            "!!.??.x",
            "eyJhIjoxfQ.bm90IGpzb24.x",
        ] {
            assert!(decode_jwt(t, &key(1)).is_err(), "{t}");
        }
    }

    #[test]
    fn authorization_is_shortened() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJl";
        let shown = redact_authorization(&format!("Bearer {token}"));
        assert_eq!(shown, "Bearer eyJhbGciOiJI…");
        assert!(!shown.contains(token));
        // A short token: never more than half of it.
        assert_eq!(redact_authorization("Bearer abcdefgh"), "Bearer abcd…");
        assert_eq!(redact_authorization("Basic dXNlcjpwYXNz"), "Basic …");
        assert_eq!(redact_authorization("Bearer"), "Bearer …");
    }

    #[test]
    fn echo_shows_the_request_and_decodes_the_token_without_showing_it() {
        let k = key(7);
        let token = encode_jwt(&k, &claims());
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "localhost:8443".parse().unwrap());
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers.insert(header::COOKIE, "session=s3cr3t".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", "b".parse().unwrap());
        let uri: http::Uri = "/anything?x=1".parse().unwrap();
        let v = echo(
            &Method::GET,
            &uri,
            http::Version::HTTP_11,
            &headers,
            0,
            &k,
            105,
        );
        let text = v.to_string();
        assert!(!text.contains(&token), "{text}");
        assert!(!text.contains(token.split('.').nth(2).unwrap()), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert_eq!(v["path"], "/anything?x=1");
        assert_eq!(v["host"], "localhost:8443");
        assert_eq!(
            v["headers"]["authorization"],
            redact_authorization(&format!("Bearer {token}"))
        );
        assert_eq!(v["headers"]["x-multi"], json!(["a", "b"]));
        assert_eq!(v["token"]["claims"]["sub"], CLIENT_ID);
        assert_eq!(v["token"]["signature_valid"], true);
        assert_eq!(v["token"]["expires_in_s"], 15);
    }

    #[test]
    fn echo_without_a_token_says_so() {
        let v = echo(
            &Method::POST,
            &"/x".parse().unwrap(),
            http::Version::HTTP_2,
            &HeaderMap::new(),
            3,
            &key(1),
            0,
        );
        assert!(
            v["token"]["note"]
                .as_str()
                .unwrap()
                .contains("no bearer token")
        );
        assert_eq!(v["body_bytes"], 3);
    }

    #[test]
    fn basic_auth_checks_id_and_secret() {
        let mut h = HeaderMap::new();
        let set = |h: &mut HeaderMap, id: &str, secret: &str| {
            let v = format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")));
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
        };
        set(&mut h, CLIENT_ID, "s3cret");
        assert!(basic_auth_ok(&h, CLIENT_ID, "s3cret"));
        assert!(!basic_auth_ok(&h, CLIENT_ID, "s3cre"));
        set(&mut h, "other", "s3cret");
        assert!(!basic_auth_ok(&h, CLIENT_ID, "s3cret"));
        // Form-url-encoded parts, as RFC 6749 §2.3.1 sends them.
        set(&mut h, "demo%2Dclient", "a+b");
        assert!(basic_auth_ok(&h, "demo-client", "a b"));
        assert!(!basic_auth_ok(&HeaderMap::new(), CLIENT_ID, "s3cret"));
    }

    #[test]
    fn options_name_the_flag_to_change() {
        let refused = |o: Options| o.validate().unwrap_err().to_string();
        assert!(Options::default().validate().is_ok());
        let e = refused(Options {
            admin: Options::default().listen,
            ..Options::default()
        });
        assert!(e.contains("--admin") && e.contains("--listen"), "{e}");
        let e = refused(Options {
            token_lifetime: Duration::from_millis(500),
            ..Options::default()
        });
        assert!(e.contains("--token-lifetime"), "{e}");
        let e = refused(Options {
            admin: "0.0.0.0:9090".parse().unwrap(),
            ..Options::default()
        });
        assert!(e.contains("--admin") && e.contains("loopback"), "{e}");
        // Port 0 twice is fine: each gets its own port.
        let o = Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            direct: "127.0.0.1:0".parse().unwrap(),
            ..Options::default()
        };
        assert!(o.validate().is_ok());
    }

    #[test]
    fn the_demo_config_is_valid() {
        let dir = TempDir::create().unwrap();
        std::fs::write(dir.path().join("client-secret"), "x\n").unwrap();
        std::fs::write(dir.path().join("ca.pem"), Pki::new().unwrap().ca_pem).unwrap();
        let text = config_text(
            &Options::default(),
            "https://localhost:1/oauth2/token",
            "localhost:2",
        );
        let c = crate::config::from_text(&text, dir.path(), Vec::new()).unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.profiles[PROFILE].client_id, CLIENT_ID);
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
    }
}
