//! No client secret, private key, client assertion or token in any log line,
//! at any level (SPEC: "Behaviour users rely on").
//!
//! The real binary runs as a child with `RUST_LOG=trace`, once with text and
//! once with JSON logs, against a recording token endpoint and the fixture
//! upstream, with one profile per client authentication method: basic, post
//! (its secret file rotated the Kubernetes way, by swapping a symlink),
//! client_secret_jwt, private_key_jwt (EC P-256 PKCS#8 key), a federated
//! client assertion file, tls_client_auth (the token endpoint verifies the
//! client certificate against the test CA), a DPoP profile (RFC 9449, its
//! key in a PEM file that is rotated, once to a file that does not load),
//! a DPoP profile whose token endpoint ignores the proof, and a profile whose
//! token endpoint refuses with an `error_description`. Requests go through
//! the proxy for every route, including upstream 401s that make the proxy
//! fetch again and routes to an HTTP/2 upstream (h2's frame and HPACK
//! tracing). Then every secret the token endpoint received, every token it
//! issued, every DPoP proof and every Authorization value the upstreams saw
//! is looked for in everything the process wrote to stderr, in the error
//! answers the app got, and in the admin listener's `/metrics` and `/readyz`.
//!
//! `LOGS_TEST_KEEP=1` keeps the captured logs of a passing run; a failing
//! run always keeps them and names the file.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{mpsc, watch};

use crate::support::{
    self, BoxBody, Pki, TokenState, Upstream, error_kind, json, proxied_client, serve,
};

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");

/// Long enough that no renewal runs during the test: every fetch the test
/// sees is one it caused.
const LIFETIME_S: u64 = 3600;

const FAIL_DESCRIPTION: &str = "client authentication failed: unknown client (test)";

/// The environment variable the `failing` profile reads its secret from.
const FAILING_SECRET_ENV: &str = "LOGS_TEST_FAILING_CLIENT_SECRET";

/// The token endpoint path that answers `token_type: "Bearer"` even to a
/// request with a DPoP proof (a server that ignores DPoP).
const IGNORES_DPOP: &str = "/ignores-dpop";

/// One token request as the token endpoint received it.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    authorization: Option<String>,
    /// The `DPoP` proof header.
    dpop: Option<String>,
    form: Vec<(String, String)>,
}

impl Received {
    fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A token endpoint that records every request (the fixture keeps only the
/// last one), issues tokens into a fixture [`TokenState`] so the fixture
/// upstream accepts them, `token_type` `DPoP` to a request with a DPoP
/// proof (except at [`IGNORES_DPOP`]), and answers `/fail` with an OAuth
/// error.
struct Idp {
    tokens: Arc<TokenState>,
    received: Mutex<Vec<Received>>,
    /// Requests to `/fail` so far.
    failures: watch::Sender<usize>,
    /// Requests to [`IGNORES_DPOP`] so far.
    ignored_dpop: watch::Sender<usize>,
    /// The tokens issued as `DPoP`.
    dpop_tokens: Mutex<Vec<String>>,
}

impl Idp {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            tokens: Arc::new(TokenState::default()),
            received: Mutex::new(Vec::new()),
            failures: watch::Sender::new(0),
            ignored_dpop: watch::Sender::new(0),
            dpop_tokens: Mutex::new(Vec::new()),
        })
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn issued(&self) -> Vec<String> {
        self.tokens.issued.lock().unwrap().keys().cloned().collect()
    }

    /// The requests made by the profile with `client_id`.
    fn by_client(&self, client_id: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| {
                r.param("client_id") == Some(client_id)
                    || r.authorization
                        .as_deref()
                        .filter(|a| a.starts_with("Basic "))
                        .is_some_and(|a| support::decode_basic(a).0 == client_id)
            })
            .collect()
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<BoxBody> {
        let path = req.uri().path().to_owned();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("?").to_owned())
        };
        let authorization = header("authorization");
        let dpop = header("dpop");
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let form = form_urlencoded::parse(&body).into_owned().collect();
        let n = {
            let mut received = self.received.lock().unwrap();
            received.push(Received {
                path: path.clone(),
                authorization,
                dpop: dpop.clone(),
                form,
            });
            received.len()
        };
        if path == "/fail" {
            self.failures.send_modify(|n| *n += 1);
            return json(
                400,
                &serde_json::json!({
                    "error": "invalid_client",
                    "error_description": FAIL_DESCRIPTION,
                })
                .to_string(),
            );
        }
        let token = format!(
            "tok-{n}-{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        self.tokens.issued.lock().unwrap().insert(
            token.clone(),
            Instant::now() + Duration::from_secs(LIFETIME_S),
        );
        let token_type = if path == IGNORES_DPOP {
            self.ignored_dpop.send_modify(|n| *n += 1);
            "Bearer"
        } else if dpop.is_some() {
            self.dpop_tokens.lock().unwrap().push(token.clone());
            "DPoP"
        } else {
            "Bearer"
        };
        json(
            200,
            &format!(
                r#"{{"access_token":"{token}","token_type":"{token_type}","expires_in":{LIFETIME_S}}}"#
            ),
        )
    }
}

/// A server config for `localhost` that requires a client certificate
/// issued by the test CA (tls_client_auth, RFC 8705 §2).
fn mtls_server_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .unwrap();
    let (cert, key) = pki.leaf_pem(&["localhost"]);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// What the HTTP/2 upstream received.
#[derive(Clone, Debug, Default)]
struct H2Seen {
    /// Every Authorization value.
    authorization: Vec<String>,
    /// Every `DPoP` proof.
    dpop: Vec<String>,
}

/// An HTTP/2-only TLS upstream (ALPN `h2`) that accepts the tokens in
/// `tokens` (`Bearer` or `DPoP`) and records every Authorization value and
/// DPoP proof it receives: the fixture upstream speaks HTTP/1.1 only, and
/// h2's frame and HPACK tracing is where a header could leak at trace level.
async fn h2_upstream(pki: &Pki, tokens: Arc<TokenState>) -> (SocketAddr, Arc<Mutex<H2Seen>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = pki.leaf_pem(&["localhost"]);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(H2Seen::default()));
    let recorded = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&recorded);
            let tokens = Arc::clone(&tokens);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .map(|v| v.to_str().unwrap_or("?").to_owned())
                    };
                    let authorization = header("authorization");
                    let dpop = header("dpop");
                    let valid = authorization
                        .as_deref()
                        .and_then(|a| {
                            a.strip_prefix("Bearer ")
                                .or_else(|| a.strip_prefix("DPoP "))
                        })
                        .is_some_and(|t| tokens.valid(t));
                    let mut seen = seen.lock().unwrap();
                    seen.authorization.extend(authorization);
                    seen.dpop.extend(dpop);
                    drop(seen);
                    let answer = if valid {
                        json(200, &format!(r#"{{"version":"{:?}"}}"#, req.version()))
                    } else {
                        json(401, r#"{"error":"invalid_token"}"#)
                    };
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
            });
        }
    });
    (addr, seen)
}

fn random_hex() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// A secret with characters that form encoding changes.
fn secret(name: &str) -> String {
    format!("{name}:S3cr+/%& {}", random_hex())
}

/// Something shaped like a projected ServiceAccount token.
fn fake_federated_jwt() -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"cluster-key-1","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"iss":"https://oidc.cluster.test","sub":"system:serviceaccount:shop:checkout","aud":"api://AzureADTokenExchange","jti":"{}"}}"#,
        random_hex()
    ));
    let signature: Vec<u8> = (0..256).map(|_| fastrand::u8(..)).collect();
    format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Writes `value` as the `client-secret` key of a Kubernetes-style Secret
/// volume at `dir`: `client-secret -> ..data/client-secret`, `..data ->
/// ..<generation>`; a new generation swaps `..data` atomically.
fn write_secret_volume(dir: &Path, generation: u32, value: &str) {
    let data = dir.join(format!("..{generation}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("client-secret"), format!("{value}\n")).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("client-secret");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/client-secret", &link).unwrap();
    }
}

/// Writes `contents` to `path` with owner-only permissions, atomically (a
/// file beside it renamed over it), as a rotated key file appears.
fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    drop(file);
    std::fs::rename(&tmp, path).unwrap();
}

/// A new EC P-256 key as a PKCS#8 PEM (what a DPoP key file holds).
fn p256_pem() -> String {
    let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    pem
}

/// The private scalar of an EC P-256 PKCS#8 PEM key: what a JWK's `d`
/// holds.
fn p256_private_scalar(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = STANDARD.decode(body).unwrap();
    // ECPrivateKey (RFC 5915): version 1, then privateKey, a 32-byte OCTET
    // STRING.
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an ECPrivateKey in the PKCS#8 key")
        + 5;
    der[at..at + 32].to_vec()
}

/// The public key's `x` of an EC P-256 PKCS#8 PEM key (which holds the
/// public key too), as a JWK has it.
fn p256_public_x(pem: &str) -> String {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = STANDARD.decode(body).unwrap();
    // publicKey [1]: BIT STRING, 66 bytes: no unused bits, 04, x, y.
    let at = der
        .windows(4)
        .position(|w| w == [0x03, 0x42, 0x00, 0x04])
        .expect("a public key in the PKCS#8 key")
        + 4;
    URL_SAFE_NO_PAD.encode(&der[at..at + 32])
}

/// The header and claims of a JWS, decoded (not verified).
fn jws_parts(jws: &str) -> (serde_json::Value, serde_json::Value) {
    let mut parts = jws.split('.');
    let mut decode = |what: &str| -> serde_json::Value {
        let segment = parts.next().unwrap_or_else(|| panic!("no {what} in {jws}"));
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
    };
    let header = decode("header");
    let claims = decode("claims");
    (header, claims)
}

/// Checks one DPoP proof: a `dpop+jwt` with a public key only, for
/// `htm` and `htu`, and (`token`) for the token it goes with (`ath`).
fn check_proof(proof: &str, htm: &str, htu: &str, token: Option<&str>) {
    let (header, claims) = jws_parts(proof);
    assert_eq!(header["typ"], "dpop+jwt", "{header}");
    assert_eq!(header["jwk"]["kty"], "EC", "{header}");
    assert!(
        header["jwk"].get("d").is_none(),
        "a private key in {header}"
    );
    assert_eq!(claims["htm"], htm, "{claims}");
    assert_eq!(claims["htu"], htu, "{claims}");
    assert!(
        claims["jti"].is_string() && claims["iat"].is_number(),
        "{claims}"
    );
    match token {
        Some(token) => {
            let ath = URL_SAFE_NO_PAD.encode(ring::digest::digest(
                &ring::digest::SHA256,
                token.as_bytes(),
            ));
            assert_eq!(claims["ath"], ath.as_str(), "{claims}");
        }
        None => assert!(claims.get("ath").is_none(), "{claims}"),
    }
}

/// The proxy child; killed (by its own pid) if the test fails before it
/// was stopped.
struct Proxy {
    child: Option<Child>,
    lines: mpsc::UnboundedReceiver<String>,
    reader: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Text,
    Json,
}

impl Proxy {
    /// Starts `token-injector run` with trace logging; stderr is copied line
    /// by line to `log_file` and to the test.
    fn spawn(config: &Path, format: Format, failing_secret: &str, log_file: &Path) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "trace")
            .env("TOKEN_INJECTOR_WORKERS", "2")
            .env(FAILING_SECRET_ENV, failing_secret)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in [
            "TOKEN_INJECTOR_LOG_FORMAT",
            "TOKEN_INJECTOR_CONFIG",
            "NO_COLOR",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "no_proxy",
        ] {
            cmd.env_remove(var);
        }
        if format == Format::Json {
            cmd.env("TOKEN_INJECTOR_LOG_FORMAT", "json");
        }
        let mut child = cmd.spawn().expect("start token-injector");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let mut file = std::fs::File::create(log_file).unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            for raw in BufReader::new(stderr).split(b'\n') {
                let Ok(raw) = raw else { break };
                let _ = file.write_all(&raw);
                let _ = file.write_all(b"\n");
                let line = String::from_utf8_lossy(&raw).into_owned();
                let _ = tx.send(line.clone());
                all.push(line);
            }
            all
        });
        Self {
            child: Some(child),
            lines,
            reader: Some(reader),
        }
    }

    /// Waits for the "listening" line and returns the proxy and admin
    /// addresses from it.
    async fn listening(&mut self, format: Format) -> (SocketAddr, SocketAddr) {
        let wait = async {
            while let Some(line) = self.lines.recv().await {
                if !line.contains("token-injector listening") {
                    continue;
                }
                let addr = |key: &str| -> SocketAddr {
                    let value = match format {
                        Format::Json => {
                            let v: serde_json::Value = serde_json::from_str(&line)
                                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                            v["fields"][key]
                                .as_str()
                                .unwrap_or_else(|| panic!("no fields.{key}: {line}"))
                                .to_owned()
                        }
                        Format::Text => {
                            let plain = strip_ansi(&line);
                            let prefix = format!("{key}=");
                            let at = plain
                                .find(&prefix)
                                .unwrap_or_else(|| panic!("no {key}: {plain}"));
                            plain[at + prefix.len()..]
                                .split_whitespace()
                                .next()
                                .unwrap()
                                .to_owned()
                        }
                    };
                    value.parse().unwrap()
                };
                return (addr("proxy_addr"), addr("admin_addr"));
            }
            panic!("token-injector exited before listening");
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .expect("token-injector did not log \"listening\" within 20 s")
    }

    /// SIGTERM, then the exit status and every line written to stderr.
    async fn stop(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let mut child = self.child.take().unwrap();
        let pid = child.id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let waited = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::task::spawn_blocking(move || {
                let status = child.wait();
                (child, status)
            }),
        )
        .await;
        let status = match waited {
            Ok(joined) => joined.unwrap().1.unwrap(),
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                panic!("token-injector did not stop within 20 s of SIGTERM");
            }
        };
        // The pipe closes when the process is gone: the reader ends.
        let lines = self.reader.take().unwrap().join().unwrap();
        (status, lines)
    }
}

/// Removes ANSI escape sequences (`ESC [ … final`), as the text format
/// colours field names.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What must never be logged, with a name for the report.
#[derive(Default)]
struct Forbidden {
    strings: Vec<(String, String)>,
    /// Every 40-byte window of every private key's base64 body.
    key_windows: HashSet<Vec<u8>>,
}

const KEY_WINDOW: usize = 40;

impl Forbidden {
    fn add(&mut self, what: &str, value: &str) {
        assert!(value.len() >= 8, "{what}: too short to look for: {value:?}");
        self.strings.push((what.to_owned(), value.to_owned()));
    }

    fn secret(&mut self, what: &str, client_id: &str, secret: &str) {
        let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        self.add(what, secret);
        self.add(&format!("{what} (form-url-encoded)"), &form(secret));
        for (how, plain) in [
            ("form", format!("{}:{}", form(client_id), form(secret))),
            ("raw", format!("{client_id}:{secret}")),
        ] {
            let b64 = STANDARD.encode(plain);
            self.add(
                &format!("{what} (Basic, {how} encoding)"),
                b64.trim_end_matches('='),
            );
        }
    }

    /// A JWS (a client assertion, a DPoP proof): whole, and each segment.
    /// A DPoP proof's first segment, its JWS header, holds only the public
    /// key, the same in every proof of a key; it is searched too, as that
    /// encoding of it exists only in proofs.
    fn assertion(&mut self, what: &str, jwt: &str) {
        self.add(what, jwt);
        for (i, segment) in jwt.split('.').enumerate() {
            if segment.len() >= 16 {
                self.add(&format!("{what} (JWT segment {i})"), segment);
            }
        }
    }

    /// A DPoP key: its PEM, and its private scalar the way a JWK (`d`), a
    /// Debug dump or a hex dump would show it.
    fn dpop_key(&mut self, what: &str, pem: &str) {
        self.private_key(pem);
        let d = p256_private_scalar(pem);
        self.add(&format!("{what} (JWK d)"), &URL_SAFE_NO_PAD.encode(&d));
        self.add(
            &format!("{what} (base64)"),
            STANDARD.encode(&d).trim_end_matches('='),
        );
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        self.add(&format!("{what} (hex)"), &hex);
    }

    fn private_key(&mut self, pem: &str) {
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        assert!(body.len() > KEY_WINDOW, "private key body too short");
        for w in body.as_bytes().windows(KEY_WINDOW) {
            self.key_windows.insert(w.to_vec());
        }
    }

    /// Every leak in `log`, described.
    fn leaks(&self, log: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (what, value) in &self.strings {
            if let Some(at) = log.find(value.as_str()) {
                found.push(format!("{what} {value:?} in: {}", line_at(log, at)));
            }
        }
        if log.contains("PRIVATE KEY-----") {
            found.push(format!(
                "a PEM private key header in: {}",
                line_at(log, log.find("PRIVATE KEY-----").unwrap())
            ));
        }
        let bytes = log.as_bytes();
        if let Some(at) = bytes
            .windows(KEY_WINDOW)
            .position(|w| self.key_windows.contains(w))
        {
            found.push(format!(
                "40 characters of a private key in: {}",
                line_at(log, at)
            ));
        }
        found
    }
}

/// The log line around byte `at`.
fn line_at(log: &str, at: usize) -> &str {
    let start = log[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = log[at..].find('\n').map_or(log.len(), |i| at + i);
    &log[start..end]
}

const PROFILES_OK: [&str; 7] = ["basic", "post", "jwt", "pkjwt", "federated", "mtls", "dpop"];

fn client_id(profile: &str) -> String {
    format!("{profile} client")
}

/// Drives every token flow through the binary with `format` logs and checks
/// that none of the credentials appears in them.
async fn run_scenario(format: Format) {
    let pki = Pki::new();
    let idp = Idp::new();
    let tls_idp = Arc::clone(&idp);
    let idp_addr = serve(Some(pki.server_config(&["localhost"])), move |req| {
        Arc::clone(&tls_idp).handle(req)
    })
    .await;
    let mtls_idp = Arc::clone(&idp);
    let mtls_addr = serve(Some(mtls_server_config(&pki)), move |req| {
        Arc::clone(&mtls_idp).handle(req)
    })
    .await;
    let upstream = Upstream::start(&pki, Arc::clone(&idp.tokens)).await;
    let (h2_addr, h2_seen) = h2_upstream(&pki, Arc::clone(&idp.tokens)).await;

    let mut dir = tempfile::Builder::new()
        .prefix("token-injector-logs-")
        .tempdir()
        .unwrap();
    // Kept when the test fails, for the log file; removed when it passes.
    dir.disable_cleanup(true);
    // Config and credentials in a directory of their own: the proxy watches
    // the config file's directory, and a log file written there would feed
    // its trace-level inotify events back into the log.
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let d = conf.as_path();
    pki.write_ca(d);
    let basic_secret = secret("basic");
    let post_secret_old = secret("post-old");
    let post_secret_new = secret("post-new");
    let jwt_secret = secret("jwt");
    let failing_secret = secret("failing");
    std::fs::write(d.join("basic-secret"), format!("{basic_secret}\n")).unwrap();
    std::fs::write(d.join("jwt-secret"), format!("{jwt_secret}\n")).unwrap();
    let post_volume = d.join("post");
    write_secret_volume(&post_volume, 1, &post_secret_old);
    let signing_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signing_pem = signing_key.serialize_pem();
    assert!(signing_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    std::fs::write(d.join("pkjwt.pem"), &signing_pem).unwrap();
    let federated = fake_federated_jwt();
    std::fs::write(d.join("assertion.jwt"), format!("{federated}\n")).unwrap();
    let (client_cert, client_key) = pki.leaf_pem(&["mtls-client.test"]);
    std::fs::write(d.join("mtls.crt"), &client_cert).unwrap();
    std::fs::write(d.join("mtls.key"), &client_key).unwrap();
    let dpop_secret = secret("dpop");
    std::fs::write(d.join("dpop-secret"), format!("{dpop_secret}\n")).unwrap();
    let dpop_pem = p256_pem();
    let dpop_key_path = d.join("dpop.pem");
    write_private(&dpop_key_path, &dpop_pem);
    // What the key file is rotated to: a key that does not load (the next
    // key cut short: valid PEM, truncated DER), then that key whole.
    let dpop_pem_next = p256_pem();
    let dpop_pem_cut = {
        let lines: Vec<&str> = dpop_pem_next.lines().collect();
        format!("{}\n{}\n{}\n", lines[0], lines[1], lines[lines.len() - 1])
    };

    let token_url = format!("https://localhost:{}/oauth2/token", idp_addr.port());
    let mtls_url = format!("https://localhost:{}/oauth2/token", mtls_addr.port());
    let fail_url = format!("https://localhost:{}/fail", idp_addr.port());
    let ignores_dpop_url = format!("https://localhost:{}{IGNORES_DPOP}", idp_addr.port());
    let upstream_url = format!("https://localhost:{}", upstream.addr.port());
    let mut config = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
drain_timeout = "5s"

[admin]
listen = "127.0.0.1:0"

[tokens]
request_timeout = "5s"
retry_initial = "50ms"
retry_max = "200ms"
unauthorized_refresh_interval = "1s"

[upstream]
connect_timeout = "2s"
response_timeout = "5s"

[profiles.basic]
token_url = "{token_url}"
client_id = "basic client"
auth_method = "client_secret_basic"
client_secret_file = "basic-secret"
ca_file = "ca.pem"
scopes = ["read", "write"]

[profiles.post]
token_url = "{token_url}"
client_id = "post client"
auth_method = "client_secret_post"
client_secret_file = "post/client-secret"
ca_file = "ca.pem"

[profiles.jwt]
token_url = "{token_url}"
client_id = "jwt client"
auth_method = "client_secret_jwt"
client_secret_file = "jwt-secret"
signing_alg = "HS256"
ca_file = "ca.pem"

[profiles.pkjwt]
token_url = "{token_url}"
client_id = "pkjwt client"
auth_method = "private_key_jwt"
private_key_file = "pkjwt.pem"
key_id = "logs-test-key"
ca_file = "ca.pem"

[profiles.federated]
token_url = "{token_url}"
client_id = "federated client"
auth_method = "private_key_jwt"
client_assertion_file = "assertion.jwt"
ca_file = "ca.pem"

[profiles.mtls]
token_url = "{mtls_url}"
client_id = "mtls client"
auth_method = "tls_client_auth"
client_cert_file = "mtls.crt"
client_key_file = "mtls.key"
ca_file = "ca.pem"

[profiles.failing]
token_url = "{fail_url}"
client_id = "failing client"
auth_method = "client_secret_post"
client_secret_env = "{FAILING_SECRET_ENV}"
ca_file = "ca.pem"

[profiles.dpop]
token_url = "{token_url}"
client_id = "dpop client"
auth_method = "client_secret_post"
client_secret_file = "dpop-secret"
ca_file = "ca.pem"
dpop = true
dpop_key_file = "dpop.pem"

[profiles.dpop_ignored]
token_url = "{ignores_dpop_url}"
client_id = "dpop_ignored client"
auth_method = "client_secret_basic"
client_secret_file = "dpop-secret"
ca_file = "ca.pem"
dpop = true
dpop_key_file = "dpop.pem"
"#
    );
    for profile in PROFILES_OK.iter().chain(&["failing"]) {
        config.push_str(&format!(
            "\n[[routes]]\nhost = \"{profile}.test\"\nupstream = \"{upstream_url}\"\nprofile = \"{profile}\"\nca_file = \"ca.pem\"\n"
        ));
    }
    // Second routes of the basic and dpop profiles, to an HTTP/2 upstream
    // (ALPN).
    for (host, profile) in [("h2.test", "basic"), ("dpop-h2.test", "dpop")] {
        config.push_str(&format!(
            "\n[[routes]]\nhost = \"{host}\"\nupstream = \"https://localhost:{}\"\nprofile = \"{profile}\"\nca_file = \"ca.pem\"\n",
            h2_addr.port()
        ));
    }
    // The DPoP profile whose token endpoint ignores the proof.
    config.push_str(&format!(
        "\n[[routes]]\nhost = \"dpop-ignored.test\"\nupstream = \"{upstream_url}\"\nprofile = \"dpop_ignored\"\nca_file = \"ca.pem\"\n"
    ));
    let config_path = d.join("token-injector.toml");
    std::fs::write(&config_path, config).unwrap();

    let log_file = dir.path().join("stderr.log");
    let mut proxy = Proxy::spawn(&config_path, format, &failing_secret, &log_file);
    let (proxy_addr, admin_addr) = proxy.listening(format).await;
    let client = proxied_client(proxy_addr);

    // A request on every route: each waits for its profile's first token.
    for profile in PROFILES_OK {
        let r = client
            .get(format!("http://{profile}.test/hello/{profile}"))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 200, "{profile}: {body}");
        assert!(body.contains(&format!("/hello/{profile}")), "{body}");
    }

    for host in ["h2.test", "dpop-h2.test"] {
        let r = client
            .get(format!("http://{host}/over-h2"))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 200, "{host}: {body}");
        assert!(
            body.contains("HTTP/2.0"),
            "{host}: not forwarded over HTTP/2: {body}"
        );
    }

    // The DPoP route again, with a body and a query (not in htu).
    let r = client
        .post("http://dpop.test/items/42?q=1")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // What the app got back when no token was to be had: searched too.
    let mut answers: Vec<(String, String)> = Vec::new();
    let mut answer = async |what: &str, r: reqwest::Response| {
        let headers = format!("{:?}", r.headers());
        let body = r.text().await.unwrap();
        answers.push((what.to_owned(), format!("{headers}\n{body}")));
    };

    // The failing profile: 503, after the endpoint refused at least twice
    // (so the failure and a retry are logged).
    let r = client.get("http://failing.test/x").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_kind(&r).as_deref(), Some("token_unavailable"));
    answer("failing profile's 503", r).await;
    let mut failures = idp.failures.subscribe();
    tokio::time::timeout(Duration::from_secs(20), failures.wait_for(|n| *n >= 2))
        .await
        .expect("the failing profile did not retry")
        .unwrap();

    // The DPoP profile whose token endpoint answers Bearer: refused, 503,
    // retried (the refusal is logged with the key in use).
    let r = client
        .get("http://dpop-ignored.test/x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_kind(&r).as_deref(), Some("token_unavailable"));
    answer("dpop_ignored profile's 503", r).await;
    let mut ignored = idp.ignored_dpop.subscribe();
    tokio::time::timeout(Duration::from_secs(20), ignored.wait_for(|n| *n >= 2))
        .await
        .expect("the dpop_ignored profile did not retry")
        .unwrap();

    // An upstream 401: the proxy drops the token, fetches another, retries.
    let before = idp.by_client("basic client").len();
    upstream
        .state
        .force_401
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let r = client
        .get("http://basic.test/after-401")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(idp.by_client("basic client").len(), before + 1);
    let seen: Vec<_> = upstream
        .seen()
        .into_iter()
        .filter(|s| s.path == "/after-401")
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(seen[0].authorization, seen[1].authorization);

    // Rotation: a new generation of the post Secret volume, used by the
    // next token request (made here by a 401).
    write_secret_volume(&post_volume, 2, &post_secret_new);
    upstream
        .state
        .force_401
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let r = client
        .get("http://post.test/after-rotation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let post = idp.by_client("post client");
    assert_eq!(
        post.last().unwrap().param("client_secret"),
        Some(post_secret_new.as_str())
    );

    // DPoP: an upstream 401 (no DPoP challenge) drops the token; the next
    // one is fetched with a new proof and the request resent with another.
    // Then the key file is rotated: first to a file that does not load (the
    // key in use stays), then to a new key, each used by the token request
    // a 401 causes.
    let dpop_get = async |path: &str| {
        let before = idp.by_client("dpop client").len();
        upstream
            .state
            .force_401
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let r = client
            .get(format!("http://dpop.test{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(idp.by_client("dpop client").len(), before + 1, "{path}");
    };
    // A 401 refetches at most once per unauthorized_refresh_interval (1 s).
    let refetch_interval = Duration::from_millis(1100);
    dpop_get("/after-401").await;
    write_private(&dpop_key_path, &dpop_pem_cut);
    tokio::time::sleep(refetch_interval).await;
    dpop_get("/after-bad-key").await;
    write_private(&dpop_key_path, &dpop_pem_next);
    tokio::time::sleep(refetch_interval).await;
    dpop_get("/after-key-rotation").await;

    // ---- what the admin listener shows ----
    let admin = support::direct_client();
    let mut admin_pages: Vec<(String, String)> = Vec::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        let r = admin
            .get(format!("http://{admin_addr}{path}"))
            .send()
            .await
            .unwrap();
        let headers = format!("{:?}", r.headers());
        let body = r.text().await.unwrap();
        admin_pages.push((format!("admin {path}"), format!("{headers}\n{body}")));
    }
    let dpop_proofs = support::metric_value(
        &admin_pages[0].1,
        r#"token_injector_dpop_proofs_total{profile="dpop"}"#,
    );
    assert!(
        dpop_proofs.is_some_and(|n| n >= 10.0),
        "dpop_proofs_total {dpop_proofs:?}:\n{}",
        admin_pages[0].1
    );
    assert!(
        admin_pages[1].1.contains(r#""dpop""#),
        "{}",
        admin_pages[1].1
    );

    let (status, lines) = proxy.stop().await;
    assert!(
        status.success(),
        "exit {status}; log in {}",
        log_file.display()
    );

    // ---- what was sent, so the search below cannot be vacuous ----
    let received = idp.received();
    let one = |profile: &str| -> Received {
        idp.by_client(&client_id(profile))
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("no token request from {profile}: {received:?}"))
    };
    let basic = one("basic");
    assert_eq!(
        support::decode_basic(basic.authorization.as_deref().unwrap()),
        ("basic client".to_owned(), basic_secret.clone())
    );
    assert_eq!(
        one("post").param("client_secret"),
        Some(post_secret_old.as_str())
    );
    for profile in ["jwt", "pkjwt"] {
        let a = one(profile)
            .param("client_assertion")
            .unwrap_or_else(|| panic!("{profile}: no client_assertion"))
            .to_owned();
        assert_eq!(a.split('.').count(), 3, "{profile}: {a}");
    }
    assert_eq!(
        one("federated").param("client_assertion"),
        Some(federated.as_str())
    );
    let mtls = one("mtls");
    assert!(mtls.authorization.is_none() && mtls.param("client_secret").is_none());
    assert_eq!(
        one("failing").param("client_secret"),
        Some(failing_secret.as_str())
    );
    assert!(
        received
            .iter()
            .filter(|r| r.path == "/fail")
            .all(|r| r.param("client_id") == Some("failing client"))
    );
    let issued = idp.issued();
    assert!(issued.len() >= PROFILES_OK.len() + 2, "{issued:?}");
    let upstream_seen = upstream.seen();
    let upstream_auth: Vec<String> = upstream_seen
        .iter()
        .filter_map(|s| s.authorization.clone())
        .collect();
    assert!(upstream_auth.len() >= PROFILES_OK.len() + 4);
    let h2 = h2_seen.lock().unwrap().clone();
    assert_eq!(h2.authorization.len(), 2, "{h2:?}");

    // DPoP was in use: proofs at the token endpoint (the ignoring one too),
    // DPoP tokens, and each request of the DPoP routes with Authorization:
    // DPoP and a proof for it, signed with the key of the file.
    let jwk_x = |proof: &str| jws_parts(proof).0["jwk"]["x"].as_str().unwrap().to_owned();
    let (x_first, x_next) = (p256_public_x(&dpop_pem), p256_public_x(&dpop_pem_next));
    let dpop_fetches = idp.by_client("dpop client");
    assert_eq!(dpop_fetches.len(), 4, "{dpop_fetches:?}");
    for (i, r) in dpop_fetches.iter().enumerate() {
        let proof = r
            .dpop
            .as_deref()
            .unwrap_or_else(|| panic!("a DPoP token request without a proof: {r:?}"));
        check_proof(proof, "POST", &token_url, None);
        let want = if i == 3 { &x_next } else { &x_first };
        assert_eq!(
            &jwk_x(proof),
            want,
            "token request {i}: not the key file's key"
        );
    }
    let ignored: Vec<&Received> = received.iter().filter(|r| r.path == IGNORES_DPOP).collect();
    assert!(ignored.len() >= 2, "{ignored:?}");
    for r in &ignored {
        check_proof(r.dpop.as_deref().unwrap(), "POST", &ignores_dpop_url, None);
    }
    let dpop_tokens = idp.dpop_tokens.lock().unwrap().clone();
    assert_eq!(dpop_tokens.len(), 4, "{dpop_tokens:?}");
    let upstream_dpop: Vec<(String, String, &support::Seen)> = upstream_seen
        .iter()
        .filter_map(|s| {
            let token = s.authorization.as_deref()?.strip_prefix("DPoP ")?;
            let proof = s.headers.iter().find(|(k, _)| k == "dpop").map(|(_, v)| v);
            let proof = proof.unwrap_or_else(|| panic!("DPoP token without a proof: {s:?}"));
            Some((token.to_owned(), proof.clone(), s))
        })
        .collect();
    let dpop_paths: Vec<&str> = upstream_dpop
        .iter()
        .map(|(_, _, s)| s.path.as_str())
        .collect();
    assert_eq!(
        dpop_paths,
        [
            "/hello/dpop",
            "/items/42?q=1",
            "/after-401",
            "/after-401",
            "/after-bad-key",
            "/after-bad-key",
            "/after-key-rotation",
            "/after-key-rotation",
        ],
        "the requests of the DPoP route, each with Authorization: DPoP"
    );
    for (i, (token, proof, seen)) in upstream_dpop.iter().enumerate() {
        assert!(dpop_tokens.contains(token), "{token} not issued as DPoP");
        let path = seen.path.split('?').next().unwrap();
        check_proof(
            proof,
            &seen.method,
            &format!("{upstream_url}{path}"),
            Some(token),
        );
        let want = if i == upstream_dpop.len() - 1 {
            &x_next
        } else {
            &x_first
        };
        assert_eq!(&jwk_x(proof), want, "{}: not the key file's key", seen.path);
    }
    assert!(
        upstream_seen
            .iter()
            .filter(|s| !s
                .authorization
                .as_deref()
                .unwrap_or("")
                .starts_with("DPoP "))
            .all(|s| s.headers.iter().all(|(k, _)| k != "dpop")),
        "a DPoP proof on a Bearer route"
    );
    let h2_dpop = h2
        .authorization
        .iter()
        .find_map(|a| a.strip_prefix("DPoP "))
        .unwrap_or_else(|| panic!("no DPoP request over HTTP/2: {h2:?}"));
    assert_eq!(h2.dpop.len(), 1, "{h2:?}");
    check_proof(
        &h2.dpop[0],
        "GET",
        &format!("https://localhost:{}/over-h2", h2_addr.port()),
        Some(h2_dpop),
    );

    // ---- what must not be logged ----
    let mut forbidden = Forbidden::default();
    forbidden.secret("basic client secret", "basic client", &basic_secret);
    forbidden.secret("post client secret", "post client", &post_secret_old);
    forbidden.secret(
        "rotated post client secret",
        "post client",
        &post_secret_new,
    );
    forbidden.secret("client_secret_jwt secret", "jwt client", &jwt_secret);
    forbidden.secret("failing client secret", "failing client", &failing_secret);
    forbidden.assertion("federated assertion file", &federated);
    forbidden.private_key(&signing_pem);
    forbidden.private_key(&client_key);
    forbidden.secret("dpop client secret", "dpop client", &dpop_secret);
    forbidden.secret(
        "dpop_ignored client secret",
        "dpop_ignored client",
        &dpop_secret,
    );
    // The cut key is the first lines of the next one: covered by it.
    forbidden.dpop_key("DPoP key", &dpop_pem);
    forbidden.dpop_key("rotated DPoP key", &dpop_pem_next);
    for r in &received {
        if let Some(proof) = &r.dpop {
            forbidden.assertion("DPoP proof sent to the token endpoint", proof);
        }
        if let Some(a) = &r.authorization {
            forbidden.add("Authorization sent to the token endpoint", a);
            if let Some(b64) = a.strip_prefix("Basic ") {
                forbidden.add("Basic credentials", b64.trim_end_matches('='));
            }
        }
        for (k, v) in &r.form {
            match k.as_str() {
                "client_assertion" => forbidden.assertion("client_assertion sent", v),
                "client_secret" => forbidden.add("client_secret sent", v),
                _ => {}
            }
        }
    }
    for token in &issued {
        forbidden.add("access token issued", token);
    }
    for auth in upstream_auth.iter().chain(&h2.authorization) {
        forbidden.add("Authorization seen upstream", auth);
    }
    for token in &dpop_tokens {
        forbidden.add("DPoP-bound access token", token);
        forbidden.add("DPoP Authorization", &format!("DPoP {token}"));
    }
    for (_, proof, _) in &upstream_dpop {
        forbidden.assertion("DPoP proof seen upstream", proof);
    }
    for proof in &h2.dpop {
        forbidden.assertion("DPoP proof seen upstream over HTTP/2", proof);
    }

    let log = lines.join("\n");
    let plain = strip_ansi(&log);
    let mut leaks = forbidden.leaks(&log);
    leaks.extend(forbidden.leaks(&plain));
    assert!(
        leaks.is_empty(),
        "{format:?} logs leak credentials (full log: {}):\n{}",
        log_file.display(),
        leaks.join("\n")
    );
    for (what, text) in answers.iter().chain(&admin_pages) {
        let leaks = forbidden.leaks(text);
        assert!(
            leaks.is_empty(),
            "{what} leaks credentials:\n{}\n---\n{text}",
            leaks.join("\n")
        );
    }

    // ---- the logs are the real thing ----
    assert!(
        lines.len() > 50,
        "only {} log lines: is RUST_LOG=trace in effect?",
        lines.len()
    );
    struct Line {
        level: String,
        message: String,
        text: String,
    }
    let parsed: Vec<Line> = match format {
        Format::Json => lines
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"));
                Line {
                    level: v["level"].as_str().unwrap_or("").to_owned(),
                    message: v["fields"]["message"].as_str().unwrap_or("").to_owned(),
                    text: l.clone(),
                }
            })
            .collect(),
        Format::Text => plain
            .lines()
            .map(|l| Line {
                level: l.split_whitespace().nth(1).unwrap_or("").to_owned(),
                message: String::new(),
                text: l.to_owned(),
            })
            .collect(),
    };
    let has = |level: &str, message: &str, also: &[&str]| {
        parsed.iter().any(|l| {
            l.level == level
                && (l.message == message || (format == Format::Text && l.text.contains(message)))
                && also.iter().all(|a| l.text.contains(a))
        })
    };
    let field = |k: &str, v: &str| match format {
        Format::Json => format!("\"{k}\":\"{v}\""),
        Format::Text => format!("{k}={v}"),
    };
    for profile in PROFILES_OK {
        assert!(
            has("INFO", "token fetched", &[&field("profile", profile)]),
            "no \"token fetched\" line for profile {profile} in {}",
            log_file.display()
        );
    }
    assert!(
        has(
            "WARN",
            "token fetch failed",
            &[&field("profile", "failing"), FAIL_DESCRIPTION]
        ),
        "no \"token fetch failed\" line naming the error_description in {}",
        log_file.display()
    );
    assert!(
        has(
            "WARN",
            "token fetch failed",
            &[
                &field("profile", "dpop_ignored"),
                "token_type is not DPoP although a DPoP proof was sent"
            ]
        ),
        "no \"token fetch failed\" line for the DPoP token a server did not bind in {}",
        log_file.display()
    );
    assert!(
        has(
            "WARN",
            "dpop_key_file does not load; the key in use stays",
            &[&field("profile", "dpop")]
        ),
        "no line for the DPoP key file that does not load in {}",
        log_file.display()
    );
    assert!(
        has(
            "INFO",
            "DPoP key file changed; the next tokens are bound to the new key",
            &[&field("profile", "dpop")]
        ),
        "no line for the rotated DPoP key in {}",
        log_file.display()
    );
    assert!(
        has(
            "DEBUG",
            "upstream answered 401; retrying with a fresh token",
            &[]
        ),
        "no 401 retry line in {}",
        log_file.display()
    );
    assert!(
        parsed.iter().any(|l| l.level == "TRACE"),
        "no TRACE line in {}",
        log_file.display()
    );
    assert!(has("INFO", "stopped", &[]), "no \"stopped\" line");
    // LOGS_TEST_KEEP=1 keeps the logs of a passing run too, to read them.
    if std::env::var_os("LOGS_TEST_KEEP").is_none() {
        dir.disable_cleanup(false);
    } else {
        eprintln!("{format:?} log kept: {}", log_file.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_hold_no_credentials() {
    run_scenario(Format::Text).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_hold_no_credentials() {
    run_scenario(Format::Json).await;
}

/// The search itself: each form of each credential is found, so a clean
/// result above means clean logs, not a blind search.
#[test]
fn leak_search_finds_every_form() {
    let mut f = Forbidden::default();
    f.secret("secret", "my client", "a:b+c/d%e&f g-0123456789");
    let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    f.private_key(&key);
    let dpop_key = p256_pem();
    f.dpop_key("dpop key", &dpop_key);
    let jwt = fake_federated_jwt();
    f.assertion("assertion", &jwt);
    f.add("token", "tok-1-00112233445566778899aabbccddeeff");
    let clean = "INFO token fetched profile=basic client_id=\"my client\"\nDEBUG request";
    assert!(f.leaks(clean).is_empty(), "{:?}", f.leaks(clean));
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let basic = STANDARD.encode("my+client:a%3Ab%2Bc%2Fd%25e%26f+g-0123456789");
    let payload = jwt.split('.').nth(1).unwrap();
    for leak in [
        "error=a:b+c/d%e&f g-0123456789".to_owned(),
        "body=client_secret=a%3Ab%2Bc%2Fd%25e%26f+g-0123456789&x=1".to_owned(),
        format!("headers={{\"authorization\": \"Basic {basic}\"}}"),
        format!("key=...{}...", &body[37..37 + KEY_WINDOW]),
        format!("claims {payload}"),
        "Bearer tok-1-00112233445566778899aabbccddeeff".to_owned(),
        format!(
            r#"jwk={{"kty":"EC","d":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(p256_private_scalar(&dpop_key))
        ),
    ] {
        let log = format!("{clean}\nTRACE something: {leak}\nINFO stopped");
        assert!(!f.leaks(&log).is_empty(), "not found: {leak}");
    }
}
