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
//!
//! The pieces, one file each: `pki` (the CA, the servers' TLS settings and
//! the accept loop serving over them), `token_endpoint` (the HS256 issuer,
//! JWT encoding and decoding, the endpoint's handler) and `echo` (the echo
//! upstream and its answer). This file holds the command line, the errors,
//! the config the demo writes, and [`Demo`], which starts and stops it all.
//!
//! The library builds it only with the cargo feature `demo` (on by
//! default); `--no-default-features` leaves it out, and rcgen with it.

mod echo;
pub mod pki;
mod token_endpoint;

pub use echo::{EchoAnswer, TokenView, echo_answer, redact_authorization};
pub use token_endpoint::{Decoded, decode_jwt, encode_jwt};

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use echo::echo;
use pki::{Pki, serve_tls};
use token_endpoint::{Issuer, token_endpoint};

/// The log target of every demo log line, from whichever file: the one
/// `RUST_LOG=token_injector::demo=…` selects and the log lines show.
const LOG_TARGET: &str = module_path!();

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

/// What the demo's servers answer with.
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
