//! A strict DPoP resource server for tests (RFC 9449 §4.3, §7, §9): a
//! [`Verifier`] that runs every check §4.3 lists on a request's `DPoP` proof
//! and `Authorization: DPoP` token, and an HTTP/1.1 + HTTP/2 server
//! ([`start`]) that answers 200 to a valid proof, the RFC's 401 challenge to
//! anything else, and records every request in a [`Log`].
//!
//! Signatures are checked with ring and thumbprints computed here, not with
//! the proxy's own DPoP code, so the two cannot share a mistake.

// A fixture for several test modules; each uses part of it.
#![allow(dead_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::header::{AUTHORIZATION, DATE, HOST};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::signature::{self, UnparsedPublicKey};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::{BoxBody, full};

/// The algorithms accepted, as the challenge's `algs` names them.
pub const ALGS: &str = "ES256 EdDSA PS256 RS256";

/// JWK members that only a private key has (RFC 7518 §6); `k` is a
/// symmetric key's.
const PRIVATE: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// How the server asks for nonces (RFC 9449 §9).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nonce {
    /// Proofs need no nonce.
    None,
    /// Proofs must carry this nonce ([`Verifier::rotate_nonce`] replaces it).
    Require(String),
    /// Every proof is answered with a demand for a fresh nonce.
    AlwaysNew,
}

/// Why a request was refused: one variant per check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("no Authorization header")]
    NoToken,
    #[error("Authorization is not one `DPoP <token>`")]
    AuthScheme,
    #[error("no DPoP header")]
    NoProof,
    #[error("more than one DPoP header")]
    MultipleProofs,
    #[error("DPoP proof is not a JWS in compact serialization with JSON parts")]
    NotJws,
    #[error("typ is not dpop+jwt")]
    Typ,
    #[error("alg {0:?} is not one of {ALGS}")]
    Alg(String),
    #[error("no jwk in the header")]
    NoJwk,
    #[error("jwk holds private key members")]
    PrivateJwk,
    #[error("jwk is malformed or does not fit alg")]
    BadJwk,
    #[error("signature does not verify with the header's jwk")]
    BadSignature,
    #[error("no jti")]
    NoJti,
    #[error("jti already used")]
    ReplayedJti,
    #[error("htm {got:?} is not the request's method {want:?}")]
    Htm { got: Option<String>, want: String },
    #[error("htu {got:?} is not the request's URL {want:?}")]
    Htu { got: Option<String>, want: String },
    #[error("no nonce; use {nonce}")]
    NonceMissing { nonce: String },
    #[error("nonce {got:?} is not the current one")]
    NonceStale { got: String, nonce: String },
    #[error("no iat")]
    IatMissing,
    #[error("iat {iat} is older than the window around {now}")]
    IatTooOld { iat: i64, now: i64 },
    #[error("iat {iat} is in the future beyond the window around {now}")]
    IatInFuture { iat: i64, now: i64 },
    #[error("no ath though a token was presented")]
    AthMissing,
    #[error("ath is not the hash of the presented token")]
    AthMismatch,
    #[error("access token not accepted")]
    UnknownToken,
    #[error("token is bound to jkt {want}, the proof's key is {got}")]
    Binding { want: String, got: String },
}

impl Reject {
    /// The challenge's `error` (RFC 9449 §7.1, §9); none when the request
    /// carried no credentials at all (RFC 6750 §3.1).
    pub fn error(&self) -> Option<&'static str> {
        match self {
            Reject::NoToken => None,
            Reject::AuthScheme | Reject::UnknownToken | Reject::Binding { .. } => {
                Some("invalid_token")
            }
            Reject::NonceMissing { .. } | Reject::NonceStale { .. } => Some("use_dpop_nonce"),
            _ => Some("invalid_dpop_proof"),
        }
    }

    /// The nonce to send in `DPoP-Nonce`, if this is a nonce demand.
    pub fn nonce(&self) -> Option<&str> {
        match self {
            Reject::NonceMissing { nonce } | Reject::NonceStale { nonce, .. } => Some(nonce),
            _ => None,
        }
    }

    /// 401 with `WWW-Authenticate: DPoP error=…, algs=…` (and `DPoP-Nonce`).
    pub fn response(&self) -> Response<BoxBody> {
        // Proof values are the client's: keep them out of the quoted string.
        let description: String = self
            .to_string()
            .chars()
            .map(|c| {
                if c == '"' || c == '\\' || !(' '..='~').contains(&c) {
                    '?'
                } else {
                    c
                }
            })
            .collect();
        let challenge = match self.error() {
            Some(e) => {
                format!(r#"DPoP error="{e}", error_description="{description}", algs="{ALGS}""#)
            }
            None => format!(r#"DPoP algs="{ALGS}""#),
        };
        let body = serde_json::json!({ "error": self.error(), "error_description": description });
        let mut r = Response::builder()
            .status(401)
            .header("www-authenticate", challenge)
            .header("content-type", "application/json")
            .header("cache-control", "no-store");
        if let Some(n) = self.nonce() {
            r = r.header("dpop-nonce", n);
        }
        r.body(full(body.to_string())).unwrap()
    }
}

/// A proof that passed every check.
#[derive(Clone, Debug)]
pub struct Proof {
    pub header: Value,
    pub claims: Value,
    /// RFC 7638 thumbprint of the proof's `jwk`.
    pub jkt: String,
    /// The `Authorization: DPoP` token, if one came.
    pub token: Option<String>,
}

/// Checks proofs (RFC 9449 §4.3) and the tokens that go with them (§7.1).
pub struct Verifier {
    accept: Box<dyn Fn(&str) -> bool + Send + Sync>,
    require_token: bool,
    jkt: Option<String>,
    window: i64,
    skew: i64,
    nonce: Mutex<Nonce>,
    issued: AtomicU64,
    jtis: Mutex<HashSet<String>>,
}

impl Verifier {
    /// Accepts exactly `token`, which must come with every request.
    pub fn new(token: impl Into<String>) -> Self {
        let token = token.into();
        Self::tokens(move |t| t == token)
    }

    /// Accepts the tokens `accept` says yes to.
    pub fn tokens(accept: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            accept: Box::new(accept),
            require_token: true,
            jkt: None,
            window: 60,
            skew: 0,
            nonce: Mutex::new(Nonce::None),
            issued: AtomicU64::new(0),
            jtis: Mutex::default(),
        }
    }

    /// Proofs without a token (a token endpoint's view); a token that does
    /// come is still checked (ath, binding) and accepted.
    pub fn proof_only() -> Self {
        Self {
            require_token: false,
            ..Self::tokens(|_| true)
        }
    }

    /// The thumbprint a token is bound to when it is not a JWT with `cnf.jkt`.
    /// Without either, the binding is not checked.
    pub fn jkt(mut self, jkt: impl Into<String>) -> Self {
        self.jkt = Some(jkt.into());
        self
    }

    /// `iat` may be this many seconds before or after now (default 60).
    pub fn window(mut self, seconds: i64) -> Self {
        self.window = seconds;
        self
    }

    /// Shifts the server's clock (iat window and `Date`) by `seconds`.
    pub fn skew(mut self, seconds: i64) -> Self {
        self.skew = seconds;
        self
    }

    pub fn nonce(self, mode: Nonce) -> Self {
        *self.nonce.lock().unwrap() = mode;
        self
    }

    pub fn set_nonce(&self, mode: Nonce) {
        *self.nonce.lock().unwrap() = mode;
    }

    /// Requires a new nonce from now on (mid-traffic) and returns it.
    pub fn rotate_nonce(&self) -> String {
        let n = self.fresh_nonce();
        self.set_nonce(Nonce::Require(n.clone()));
        n
    }

    pub fn current_nonce(&self) -> Option<String> {
        match &*self.nonce.lock().unwrap() {
            Nonce::Require(n) => Some(n.clone()),
            _ => None,
        }
    }

    /// The server's Unix time, skew included.
    pub fn now(&self) -> i64 {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        t.as_secs() as i64 + self.skew
    }

    fn fresh_nonce(&self) -> String {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        format!("n-{n}-{:08x}", fastrand::u32(..))
    }

    /// Runs every check on a request: `method`, its full URL as received
    /// (`scheme://host[:port]/path?query`) and its headers.
    pub fn check(&self, method: &str, url: &str, headers: &HeaderMap) -> Result<Proof, Reject> {
        // The token first: `Bearer` with a proof is a downgrade, not a
        // proof problem; no credentials at all get a bare challenge.
        let mut auth = headers.get_all(AUTHORIZATION).iter();
        let token = match (auth.next(), auth.next()) {
            (None, _) if self.require_token => return Err(Reject::NoToken),
            (None, _) => None,
            (Some(v), None) => {
                let v = v.to_str().map_err(|_| Reject::AuthScheme)?;
                match v.split_once(' ') {
                    Some((s, t)) if s.eq_ignore_ascii_case("dpop") && valid_token68(t) => {
                        Some(t.to_owned())
                    }
                    _ => return Err(Reject::AuthScheme),
                }
            }
            (Some(_), Some(_)) => return Err(Reject::AuthScheme),
        };

        // §4.3 steps 1-7: one well-formed, signed proof with a public jwk.
        let mut proofs = headers.get_all("dpop").iter();
        let raw = proofs.next().ok_or(Reject::NoProof)?;
        if proofs.next().is_some() {
            return Err(Reject::MultipleProofs);
        }
        let raw = raw.to_str().map_err(|_| Reject::NotJws)?;
        let [h, p, s] = raw.split('.').collect::<Vec<_>>()[..] else {
            return Err(Reject::NotJws);
        };
        let (Some(header), Some(claims), Ok(sig)) = (json_part(h), json_part(p), B64.decode(s))
        else {
            return Err(Reject::NotJws);
        };
        if header["typ"] != "dpop+jwt" {
            return Err(Reject::Typ);
        }
        let alg = header["alg"].as_str().unwrap_or_default();
        if !ALGS.split(' ').any(|a| a == alg) {
            return Err(Reject::Alg(header["alg"].to_string()));
        }
        let jwk = header
            .get("jwk")
            .filter(|j| j.is_object())
            .ok_or(Reject::NoJwk)?;
        if PRIVATE.iter().any(|m| jwk.get(m).is_some()) {
            return Err(Reject::PrivateJwk);
        }
        let jkt = verify(alg, jwk, format!("{h}.{p}").as_bytes(), &sig)?;

        // Every signed jti is spent, accepted or not: a proof refused now
        // (a future iat, say) must not pass later.
        let jti = claims["jti"]
            .as_str()
            .filter(|j| !j.is_empty())
            .ok_or(Reject::NoJti)?;
        if !self.jtis.lock().unwrap().insert(jti.to_owned()) {
            return Err(Reject::ReplayedJti);
        }
        // Steps 8-9: the request the proof was made for.
        if claims["htm"] != method {
            let got = claims["htm"].as_str().map(str::to_owned);
            return Err(Reject::Htm {
                got,
                want: method.to_owned(),
            });
        }
        let want = normalise_htu(url).unwrap_or_else(|| url.to_owned());
        let got = claims["htu"].as_str().and_then(normalise_htu);
        if got.as_deref() != Some(want.as_str()) {
            return Err(Reject::Htu { got, want });
        }
        // Step 10: the nonce, if the server gave one.
        let sent = claims
            .get("nonce")
            .map(|n| n.as_str().unwrap_or("?").to_owned());
        let current = match &*self.nonce.lock().unwrap() {
            Nonce::None => None,
            Nonce::Require(n) => Some((n.clone(), sent.as_ref() == Some(n))),
            Nonce::AlwaysNew => Some((self.fresh_nonce(), false)),
        };
        match (current, sent) {
            (Some((nonce, false)), None) => return Err(Reject::NonceMissing { nonce }),
            (Some((nonce, false)), Some(got)) => return Err(Reject::NonceStale { got, nonce }),
            _ => {}
        }
        // Step 11: made recently.
        let iat = claims["iat"].as_f64().ok_or(Reject::IatMissing)? as i64;
        let now = self.now();
        if iat < now - self.window {
            return Err(Reject::IatTooOld { iat, now });
        }
        if iat > now + self.window {
            return Err(Reject::IatInFuture { iat, now });
        }
        // Step 12 and the binding (§7.1): the token this proof goes with.
        if let Some(token) = &token {
            let ath = claims.get("ath").ok_or(Reject::AthMissing)?;
            let want = B64.encode(ring::digest::digest(
                &ring::digest::SHA256,
                token.as_bytes(),
            ));
            if *ath != want.as_str() {
                return Err(Reject::AthMismatch);
            }
            if !(self.accept)(token) {
                return Err(Reject::UnknownToken);
            }
            if let Some(want) = cnf_jkt(token).or_else(|| self.jkt.clone()) {
                if want != jkt {
                    return Err(Reject::Binding { want, got: jkt });
                }
            }
        }
        Ok(Proof {
            header,
            claims,
            jkt,
            token,
        })
    }
}

/// RFC 6750 §2.1's token68, which a DPoP token also is.
fn valid_token68(t: &str) -> bool {
    let body = t.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// A base64url JSON object, or None.
fn json_part(part: &str) -> Option<Value> {
    let v: Value = serde_json::from_slice(&B64.decode(part).ok()?).ok()?;
    v.is_object().then_some(v)
}

/// `cnf.jkt` of a JWT access token (unverified: the test issued it).
fn cnf_jkt(token: &str) -> Option<String> {
    let claims = json_part(token.split('.').nth(1)?)?;
    Some(claims["cnf"]["jkt"].as_str()?.to_owned())
}

/// Verifies the signature over `signed` with `jwk` under `alg` and returns
/// the jwk's RFC 7638 thumbprint.
fn verify(alg: &str, jwk: &Value, signed: &[u8], sig: &[u8]) -> Result<String, Reject> {
    let s = |m: &str| jwk.get(m).and_then(Value::as_str).ok_or(Reject::BadJwk);
    let b = |m: &str| B64.decode(s(m)?).map_err(|_| Reject::BadJwk);
    let (members, ok): (&[&str], _) = match (alg, s("kty")?) {
        ("ES256", "EC") => {
            let (x, y) = (b("x")?, b("y")?);
            if s("crv")? != "P-256" || x.len() != 32 || y.len() != 32 {
                return Err(Reject::BadJwk);
            }
            let point = [&[4u8][..], &x, &y].concat();
            let key = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point);
            (&["crv", "kty", "x", "y"], key.verify(signed, sig))
        }
        ("EdDSA", "OKP") => {
            if s("crv")? != "Ed25519" {
                return Err(Reject::BadJwk);
            }
            let key = UnparsedPublicKey::new(&signature::ED25519, b("x")?);
            (&["crv", "kty", "x"], key.verify(signed, sig))
        }
        ("PS256" | "RS256", "RSA") => {
            let params = match alg {
                "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                _ => &signature::RSA_PKCS1_2048_8192_SHA256,
            };
            let key = signature::RsaPublicKeyComponents {
                n: b("n")?,
                e: b("e")?,
            };
            (&["e", "kty", "n"], key.verify(params, signed, sig))
        }
        _ => return Err(Reject::BadJwk),
    };
    ok.map_err(|_| Reject::BadSignature)?;
    // RFC 7638 §3: the required members, sorted, no whitespace.
    let mut canonical = String::from("{");
    for (i, m) in members.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        canonical += &format!("{sep}\"{m}\":{}", Value::from(s(m)?));
    }
    canonical.push('}');
    Ok(B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    )))
}

/// An `htu` or request URL as compared (RFC 9449 §4.3, RFC 3986 §6.2.2-3):
/// scheme and host lower case, no default port, dot segments resolved, an
/// empty path as `/`, no query, no fragment. None if it is no http(s) URL.
pub fn normalise_htu(url: &str) -> Option<String> {
    let mut u = url::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return None;
    }
    u.set_query(None);
    u.set_fragment(None);
    Some(u.into())
}

/// RFC 9110 §5.6.7's IMF-fixdate of a Unix time.
pub fn http_date(unix: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Days to a civil date (H. Hinnant's algorithm); 1970-01-01 was a Thursday.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days + 4).rem_euclid(7) as usize],
        MONTHS[month as usize - 1],
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub method: String,
    /// The URL as reconstructed for `htu`, query included.
    pub url: String,
    pub version: Version,
    /// The first proof's payload, decoded without any check.
    pub claims: Option<Value>,
    pub outcome: Result<Proof, Reject>,
}

/// Every request the server answered, in order.
#[derive(Default)]
pub struct Log {
    entries: Mutex<Vec<Entry>>,
    changed: Notify,
}

impl Log {
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }

    /// The claims of the accepted proofs.
    pub fn accepted(&self) -> Vec<Value> {
        let entries = self.entries.lock().unwrap();
        entries
            .iter()
            .filter_map(|e| Some(e.outcome.as_ref().ok()?.claims.clone()))
            .collect()
    }

    pub fn rejections(&self) -> Vec<Reject> {
        let entries = self.entries.lock().unwrap();
        entries
            .iter()
            .filter_map(|e| e.outcome.clone().err())
            .collect()
    }

    /// The `jti` of every proof that had one, accepted or not.
    pub fn jtis(&self) -> Vec<String> {
        let entries = self.entries.lock().unwrap();
        let jti = |e: &Entry| Some(e.claims.as_ref()?["jti"].as_str()?.to_owned());
        entries.iter().filter_map(jti).collect()
    }

    /// Waits until `n` requests have been answered; panics after `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Entry> {
        let wait = async {
            loop {
                // Registered before the check, so no push is missed.
                let changed = self.changed.notified();
                if self.entries.lock().unwrap().len() >= n {
                    return self.entries();
                }
                changed.await;
            }
        };
        tokio::time::timeout(within, wait)
            .await
            .unwrap_or_else(|_| {
                let seen = self.entries.lock().unwrap().len();
                panic!("DPoP server saw {seen} of {n} requests within {within:?}")
            })
    }

    fn push(&self, e: Entry) {
        self.entries.lock().unwrap().push(e);
        self.changed.notify_waiters();
    }
}

/// Serves `verifier` on 127.0.0.1, over TLS or plain, HTTP/1.1 and HTTP/2
/// (by ALPN: give `tls` `alpn_protocols` with `h2`; plain: prior knowledge).
/// A valid proof gets 200 `{"ok":true,…}`; every answer has a `Date`.
pub async fn start(
    tls: Option<Arc<rustls::ServerConfig>>,
    verifier: Arc<Verifier>,
) -> (SocketAddr, Arc<Log>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Log::default());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let l = Arc::clone(&log);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, v, l) = (acceptor.clone(), Arc::clone(&verifier), Arc::clone(&l));
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (v, l) = (Arc::clone(&v), Arc::clone(&l));
                    async move {
                        // The whole request body is read before the answer:
                        // an answer sent over unread body bytes makes the
                        // close a reset, which could reach the proxy before
                        // the answer (a race in the test, not what it checks).
                        let (parts, body) = req.into_parts();
                        let _ = http_body_util::BodyExt::collect(body).await;
                        let response = handle(scheme, &v, &l, Request::from_parts(parts, ()));
                        Ok::<_, Infallible>(response)
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match acceptor {
                    Some(a) => match a.accept(stream).await {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), svc).await,
                        Err(_) => return,
                    },
                    None => builder.serve_connection(TokioIo::new(stream), svc).await,
                };
            });
        }
    });
    (addr, log)
}

fn handle(scheme: &str, v: &Verifier, log: &Log, req: Request<()>) -> Response<BoxBody> {
    // h2's :authority, else (HTTP/1.1 origin-form) the Host header.
    let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| {
        let host = req.headers().get(HOST)?;
        host.to_str().ok().map(str::to_owned)
    });
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{scheme}://{}{path}", authority.unwrap_or_default());
    let outcome = v.check(req.method().as_str(), &url, req.headers());
    let mut response = match &outcome {
        Ok(p) => {
            let body = serde_json::json!({ "ok": true, "htu": p.claims["htu"], "jkt": p.jkt });
            Response::builder()
                .header("content-type", "application/json")
                .body(full(body.to_string()))
                .unwrap()
        }
        Err(r) => r.response(),
    };
    let date = HeaderValue::from_str(&http_date(v.now())).unwrap();
    response.headers_mut().insert(DATE, date);
    let claims = req.headers().get("dpop").and_then(|p| {
        let p = p.to_str().ok()?;
        json_part(p.split('.').nth(1)?)
    });
    log.push(Entry {
        method: req.method().to_string(),
        url,
        version: req.version(),
        claims,
        outcome,
    });
    response
}
