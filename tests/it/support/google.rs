//! A local HTTPS fake of Google's OAuth 2.0 token endpoint for service
//! accounts, and a Google-API stand-in that accepts only its tokens.
//!
//! This is a fake of the *documented shape*, not Google. It follows
//! "Using OAuth 2.0 for Server to Server Applications"
//! (developers.google.com/identity/protocols/oauth2/service-account, "HTTP/REST"):
//! the client POSTs `application/x-www-form-urlencoded`
//! `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>`;
//! the JWT's header is `{"alg":"RS256","typ":"JWT"}` with `kid` = the key
//! file's `private_key_id`; its claims are `iss` (the service account's
//! email), `scope` (space-delimited), `aud` (the token endpoint, the key
//! file's `token_uri`), `iat` and `exp` (at most one hour after `iat`),
//! and `sub` only for domain-wide delegation; it is signed RS256 with the
//! service account's private key. A valid request gets
//! `{"access_token":"ya29.…","expires_in":3599,"token_type":"Bearer"}`.
//!
//! Every check is made here with ring and serde_json, not with the proxy's
//! code. Refusals carry the `error` / `error_description` strings Google is
//! seen answering (400 `invalid_grant` "Invalid JWT Signature.", the
//! "short-lived token (60 minutes)" text, "Invalid grant: account not
//! found", 400 `invalid_scope` "Invalid OAuth scope or ID token audience
//! provided."). Where Google documents nothing the fake is stricter than
//! Google is known to be, and says so in its own wording: a `kid` is
//! required and must name a key of the account; `typ` must be `JWT`; `iat`
//! must be within five minutes of now; any form parameter besides
//! `grant_type` and `assertion`, and any `Authorization` header, is refused
//! (a service account assertion is the only credential).
//!
//! The fake records every request and what it answered ([`Received`]) and
//! counts them on a watch channel, so tests wait without polling.

// A fixture for several test modules; each uses part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64_STD, URL_SAFE_NO_PAD as B64};
use http::{Request, Response};
use hyper::body::Incoming;
use ring::signature::{self, KeyPair as _, UnparsedPublicKey};
use serde_json::Value;
use tokio::sync::watch;

use super::{BoxBody, Pki, full, header_of, random, read_body, serve, wait_on};

/// The grant type Google's service account flow uses (RFC 7523 §2.1).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The scope most Google Cloud APIs accept.
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// A second scope, to see the claim space-delimited.
pub const STORAGE_READ: &str = "https://www.googleapis.com/auth/devstorage.read_only";
/// The service account the tests use (a made-up project).
pub const CLIENT_EMAIL: &str = "token-injector-test@fake-project.iam.gserviceaccount.com";

/// Google's answers, as its token endpoint words them.
pub const BAD_SIGNATURE: &str = "Invalid JWT Signature.";
pub const BAD_TIMEFRAME: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the assertion and use a clock with skew to account for clock differences between systems.";
pub const UNKNOWN_ACCOUNT: &str = "Invalid grant: account not found";
pub const BAD_SCOPE: &str = "Invalid OAuth scope or ID token audience provided.";
pub const BAD_AUDIENCE: &str = "Invalid JWT: Failed audience check.";
pub const BAD_SUBJECT: &str = "Invalid email or User ID";

/// How far `iat` may be from the fake's clock.
pub const IAT_SKEW_SECS: i64 = 300;
/// The longest assertion Google accepts: `exp` - `iat`.
pub const MAX_ASSERTION_SECS: i64 = 3600;

/// A fixed RSA-2048 test key (made with `openssl genpkey -algorithm RSA
/// -pkeyopt rsa_keygen_bits:2048` for these tests only; it guards nothing)
/// and the `private_key_id` Google would give it.
pub struct Key {
    pub private_key_id: &'static str,
    /// PKCS#8 PEM, as in a key file's `private_key`.
    pub pem: &'static str,
}

pub const KEY_A: Key = Key {
    private_key_id: "2f0fc49a759902ae555146806e52af3fc69a91c1",
    pem: "-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQCelQWFQ3axDIc/
zz5gv90239LXCLrhZye17D6J0DigAiLht4XtNjyXpnLzJJ00mj8axqiLZby/nsZu
trZf4J2ipXmtoVqQ+G9ZWR6r06pstoEeVsw6BHX7GrLxk/VQdGJ5DW4qkEUKvKDY
n6rrPXh8sy9XWcJTdM4jjAW9jKfJgEGRC2FMkCExsDLqdF1VNZOX6G2ZlCp6iRfl
Ssk6baNh19fo5dOzP0bixDVuHQGuDNqqaruhZiLulQS7PTkcWDb5p8NVrcDu9klH
9WMgXt+faeRGAGOfU2W9sJ07ecjIHPoYfwtp2YdFzShUoK+8wE9x8xhJWMv2dUXt
jIPcmmZVAgMBAAECggEAQw8uZfOo4eaz3NJlBOGtiJJupLsO19lYzA/qRDnWcCdn
G78RNcXdKp3a9yGxDrj5XXfLdyMfBYL9U30VMwcXcdt60GculqZP498RXsTjyRQG
Fs/KjfAr+fMI36pbLtoAeEMrJnmakJdCh0hBrTdx132oU85jpAn9T7/a/5RWsZjN
9wOwik5cC+kn7K7OGKnKwsaayN+xD7JgXWw/7+ws8jtyn02065yJ0S74bqId2IHw
3Za5IRbb/J573Oa3TYIWlhm01Erh/S8hr3xnKuZjY5Vpg3/nINAiKUsTwQBgjPx8
OLedKhf1Hnfq4udRy5NdYS75V7xbMM1uIeXamWyUUwKBgQDLWUkJ0p4tPTPRYJ89
Byt+Qmec3CZfkK+NGojO4NN/lK72DBfhQ1G4GEmILYMM8eRgmKokwYVAYikrpkaW
M29gs7G64vWQsZCHF0vyS48l0u0Rbs9ehxJLeuFKElH+9NQagIxEocyB6jaerAP/
kSqJQOVKJhxoVpMrBKgqosplgwKBgQDHpG95Az7rjRcNmr+n7HTv99sdYySbAm0n
o8/YMqWlbisKYUPxdIKUlKoKU8JepRzildm+zgguF4uweuWqWTM3KZE55oIOCIDP
uMToGymq3LlfqkoUaIeAOBxcCFRGbMgjsbjeVIlOzzdviEngvJnjzTQw3pA7nbKN
PNnCBqGVRwKBgQCpJ+PHJQppzZCuarbsOGuowyqX5NaTBrPSKDGIDqRBa/jDOroe
rDZtct6wRlPOz+XPqQ9YNhdXwJBI/C+ZwL207qY5NZVbQSpeBjYqH0q8ByMoLkqY
crn4Sgbg7C6DbTyHs0l7yjBqHeBDzAojbam5tV9HeD6HWQVhcqVFmlfNawKBgQCz
n1IgafgxjMcCGYp49rmbssB1Z19nDD7TnIKDvcXl2wJkm3C7DR3zuvJmykemSh58
C2FXWB5qAgtP5LNAmnMHHaIpmyjGoYXr3w1i3BWYQnGTDi8Kv6WyikmR0HiqyHMm
EmAHwb2sp6nz8oat6mL3YAimM4lH6jHc+7Pc64R0PwKBgQCxxYixgeNSHVwJC5IZ
7GGNwZX9/ZEslkgJyc1lMX657eUMprf8PxsW4NMWoBPKlStdZ4jZFB7EzGRbZrWM
MkJ8WJDbdaGZRCMy18NrUtOtuiKrWsfKTKb7ipGcEfXw79YS4BVq4sOmoYczrc+o
G/Kpr81YtGXoetB+K33xtIgmmg==
-----END PRIVATE KEY-----
",
};

/// Another key of the same account (a rotation).
pub const KEY_B: Key = Key {
    private_key_id: "af98a56a4bd7dec165b89c78986fdf6d29849c7b",
    pem: "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDX5BUy6D1RZIr9
uPNAV0mKDqITBgywu86rYDBWadEpBUZfE0gATFlcxd018MlfP1W9DaTJkB/Ixl7a
vFVf3gUNGzKVuXTAhHiVVay9kfsfehX0YYz1WOBvWQ0jXl70MXFgSLi9m6OjDPN7
rXzHUIMbiACfXgcRlVXiF2gN5itxGMeJQy9UR+sLO7IZhXYo9evFv4fQIy+GgfB3
rHwICBU1uW9jMsKZDHVcDAeR5hv4CqSXBklADyKdZC2h7Q6cxtiI8+GarHu5xvS+
C+MSlJ79opI9P8Un/Y5IQk0T58NAjRdhpieGj3qSW/mzNeHPo/TPoqY8JLqi3DHr
cv3+9GoLAgMBAAECggEAUAmCZG+d//VW5A5zvBhALrsTEhtti/3sdjOAaCDtxpfq
iWfkCxxDCvZd9tfwR+v6lM6gl4tjhTMpyk0FF7f/RmcdX020f4T9EVwEYPlkULyZ
tBKQSAstlYo9qS2c5UoJPslnGABB77pm8CSWvGvYV1YZ6PtagoXLI7lKvdBlrZT0
W/sduIywZrGGM5lkyG+cU+1LR6ohPtxXyvlx9I6Wr4XrPWdcJ9iKqgo4Ctl8cfmj
ErUUvwiq8h6ezFwpgf65/2ZchbXUbTcNeB0uqvGELjGply0FCqxpQz7nvF2wksgH
paozoH+3hISZBK8HeIBpqpTHt4ZMuqN6OqO3e3r+rQKBgQDubc0K2rsIxcC35TCD
0VPiqM6m2G54gkwq/trWy/X0/wY3ddgF715FyAonxcd9IYIaixlWct6FgTZY2SrY
3i1U2v05R36DjBaxaAxtfW/G610jbpvS2nDOJQYLOFkqoP7Kfk/HIAGnhoyBCie3
1PLINZTkGZDmnclykQu8Jj/9XwKBgQDnzRSsKCQarKz1VdOLPT16TmXhDr6y/dmv
oF7UeZp97JHHMvUd+cmN5mdp30T3Bg1V4cyN8ekWQBuX54//6XL6KpiP6T3uSMMk
emD6FT6lh+Wl10zdhd4tYN3p5Wd22qYSSYmqR8innhOt0GSRIEArJHzyZO+mrpJZ
4qwkv3Wm1QKBgDh4ZRHnEFlZjPWBIOZ3k6ihVqCJrlB4e9XLGsW49P4b0Lsd/BYb
xXY9lLoqy77FSu1CeLPS7QUtv1N3zAAlTxND8qm4VyyM52sJO7hK90hjwmF79wgP
mJwahL3vkJ7aFr6bAAYnfHzTD0AYyaNumjn1BtinfXxBbs7lr6PWY119AoGBAJPB
jw7aG4GBVlKgXdMgu0JuHNTj4D0aQRuJP0lzJj5kgNwYKFTuN0MjfgHnlv9bNT7s
SsakUC6luLEQoyK+fVLnug3p4Fc2vGVROOXQivla8dDPt6hxP5lvaKVCXLxPTZLU
m1MWpNnrkqG195TmmOCnRpoAKx71okZ3jcFy5ZztAoGBAL+5l1D/CeullE4UUtWS
KoWu5cP/DNs4ISX5vEAOxUDMvndoBLYtEnFxWt5nHxp+1Z6ArrN8cqRViTaRRZbu
YAZ4u4VzjAJQYaaEIUDaRQYcjE8dCzrxXyDiJA9VkcSQqEtNeDUi0iv4BKH5ZIlp
a3F+b8jYQK5+vJuQZDD+zy6x
-----END PRIVATE KEY-----
",
};

impl Key {
    /// The PKCS#8 DER inside the PEM.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        let b64: String = self
            .pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        B64_STD.decode(b64).unwrap()
    }

    fn pair(&self) -> signature::RsaKeyPair {
        signature::RsaKeyPair::from_pkcs8(&self.pkcs8_der()).unwrap()
    }

    /// The public key as a DER `RSAPublicKey` (RFC 8017), what ring verifies with.
    pub fn public_der(&self) -> Vec<u8> {
        self.pair().public_key().as_ref().to_vec()
    }

    /// The base64 lines of the PEM body: none may ever show in a log or an
    /// error.
    pub fn body_lines(&self) -> Vec<&'static str> {
        self.pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect()
    }

    /// A compact JWS of `header` and `claims`, signed RS256 with this key
    /// (for tests of the fake itself; the proxy signs its own).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let pair = self.pair();
        let mut sig = vec![0; pair.public().modulus_len()];
        pair.sign(
            &signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut sig,
        )
        .unwrap();
        format!("{input}.{}", B64.encode(sig))
    }
}

/// A service account key file as Google Cloud's console (or `gcloud iam
/// service-accounts keys create`) downloads it: every field, in its order,
/// pretty-printed with two spaces, the key's newlines escaped.
pub fn key_file(key: &Key, client_email: &str, token_uri: &str) -> String {
    let project = client_email
        .split_once('@')
        .and_then(|(_, d)| d.split_once('.'))
        .map(|(p, _)| p)
        .unwrap_or("fake-project");
    // A 21-digit numeric id, stable per email.
    let digest = ring::digest::digest(&ring::digest::SHA256, client_email.as_bytes());
    let n = u64::from_be_bytes(digest.as_ref()[..8].try_into().unwrap()) % 100_000_000_000_000;
    let client_id = format!("1{n:020}");
    let cert_url = format!(
        "https://www.googleapis.com/robot/v1/metadata/x509/{}",
        client_email.replace('@', "%40")
    );
    let fields: [(&str, &str); 11] = [
        ("type", "service_account"),
        ("project_id", project),
        ("private_key_id", key.private_key_id),
        ("private_key", key.pem),
        ("client_email", client_email),
        ("client_id", &client_id),
        ("auth_uri", "https://accounts.google.com/o/oauth2/auth"),
        ("token_uri", token_uri),
        (
            "auth_provider_x509_cert_url",
            "https://www.googleapis.com/oauth2/v1/certs",
        ),
        ("client_x509_cert_url", &cert_url),
        ("universe_domain", "googleapis.com"),
    ];
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("  {}: {}", Value::from(*k), Value::from(*v)))
        .collect();
    format!("{{\n{}\n}}\n", body.join(",\n"))
}

/// What the fake does with an assertion that passed every check.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Issue a token with this `expires_in` (Google: 3599).
    Issue(u64),
    /// Refuse it anyway (a key disabled or deleted at Google, an account
    /// without permission): this status, `error` and `error_description`.
    Refuse {
        status: u16,
        error: &'static str,
        description: &'static str,
    },
}

/// What the fake answered one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Issued {
        access_token: String,
        expires_in: u64,
    },
    Refused {
        status: u16,
        error: String,
        description: String,
    },
}

/// One request the fake received, as it saw it, and its answer.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    /// The form, in order, repeats kept.
    pub form: Vec<(String, String)>,
    /// The assertion's header and claims, when it decoded as a JWT.
    pub header: Option<Value>,
    pub claims: Option<Value>,
    /// The fake's clock when the request arrived (Unix seconds).
    pub now: i64,
    pub outcome: Outcome,
}

impl Received {
    pub fn accepted(&self) -> bool {
        matches!(self.outcome, Outcome::Issued { .. })
    }

    pub fn kid(&self) -> Option<&str> {
        self.header.as_ref()?.get("kid")?.as_str()
    }

    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.claims.as_ref()?.get(name)
    }

    /// The form's parameter names, in order.
    pub fn form_names(&self) -> Vec<&str> {
        self.form.iter().map(|(k, _)| k.as_str()).collect()
    }

    pub fn form_value(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A token the fake issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub expires: Instant,
    /// The `kid` of the assertion it was issued for.
    pub kid: String,
    pub client_email: String,
}

pub struct State {
    /// client_email → kid → DER RSAPublicKey.
    accounts: Mutex<HashMap<String, HashMap<String, Vec<u8>>>>,
    answer: Mutex<Answer>,
    received: Mutex<Vec<Received>>,
    issued: Mutex<HashMap<String, Issued>>,
    count: watch::Sender<usize>,
    token_uri: Mutex<String>,
}

/// The fake token endpoint: `POST https://localhost:PORT/token`.
pub struct GoogleTokenServer {
    pub addr: std::net::SocketAddr,
    pub state: Arc<State>,
}

impl GoogleTokenServer {
    /// Starts the fake with TLS from `pki` for `localhost`, knowing no
    /// account yet ([`Self::trust`]), issuing 3599-second tokens.
    pub async fn start(pki: &Pki) -> Self {
        let state = Arc::new(State {
            accounts: Mutex::default(),
            answer: Mutex::new(Answer::Issue(3599)),
            received: Mutex::default(),
            issued: Mutex::default(),
            count: watch::Sender::new(0),
            token_uri: Mutex::default(),
        });
        let s = Arc::clone(&state);
        let addr = serve(Some(pki.server_config(&["localhost"])), move |req| {
            let s = Arc::clone(&s);
            async move { handle(s, req).await }
        })
        .await;
        *state.token_uri.lock().unwrap() = format!("https://localhost:{}/token", addr.port());
        Self { addr, state }
    }

    /// The token endpoint's URL: a key file's `token_uri`, and the `aud`
    /// the assertion must carry.
    pub fn token_uri(&self) -> String {
        self.state.token_uri.lock().unwrap().clone()
    }

    /// Registers `key` (its public half, under its `private_key_id`) as a
    /// key of the service account `client_email`.
    pub fn trust(&self, client_email: &str, key: &Key) {
        self.state
            .accounts
            .lock()
            .unwrap()
            .entry(client_email.to_owned())
            .or_default()
            .insert(key.private_key_id.to_owned(), key.public_der());
    }

    /// Forgets a key (deleted in the console).
    pub fn revoke(&self, client_email: &str, key: &Key) {
        if let Some(keys) = self.state.accounts.lock().unwrap().get_mut(client_email) {
            keys.remove(key.private_key_id);
        }
    }

    pub fn set_answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until the requests received so far satisfy `done`, checking
    /// at each new request, at most `within`.
    pub async fn wait_for(&self, within: Duration, what: &str, done: impl Fn(&[Received]) -> bool) {
        wait_on(
            "Google token fake",
            &self.state.count,
            &self.state.received,
            within,
            what,
            done,
        )
        .await;
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) {
        self.wait_for(within, &format!("{n} requests"), |r| r.len() >= n)
            .await;
    }

    /// The token, if the fake issued it.
    pub fn issued(&self, token: &str) -> Option<Issued> {
        self.state.issued.lock().unwrap().get(token).cloned()
    }

    /// Whether `token` was issued here and has not expired.
    pub fn valid(&self, token: &str) -> bool {
        self.state.valid(token)
    }
}

impl State {
    fn valid(&self, token: &str) -> bool {
        self.issued
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|i| Instant::now() < i.expires)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn refused(status: u16, error: &str, description: &str) -> Outcome {
    Outcome::Refused {
        status,
        error: error.to_owned(),
        description: description.to_owned(),
    }
}

fn invalid_grant(description: &str) -> Outcome {
    refused(400, "invalid_grant", description)
}

fn invalid_request(description: &str) -> Outcome {
    refused(400, "invalid_request", description)
}

async fn handle(s: Arc<State>, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = read_body(body).await;
    let header = |n: &str| header_of(&parts.headers, n);
    let mut rec = Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        content_type: header("content-type"),
        authorization: header("authorization"),
        form: form_urlencoded::parse(&body).into_owned().collect(),
        header: None,
        claims: None,
        now: unix_now(),
        outcome: invalid_request("unchecked"),
    };
    let outcome = match check(&s, &mut rec) {
        Err(refusal) => refusal,
        Ok((client_email, kid)) => {
            let answer = s.answer.lock().unwrap().clone();
            match answer {
                Answer::Issue(expires_in) => {
                    let access_token = format!("ya29.c.{}", random(120));
                    s.issued.lock().unwrap().insert(
                        access_token.clone(),
                        Issued {
                            expires: Instant::now() + Duration::from_secs(expires_in),
                            kid,
                            client_email,
                        },
                    );
                    Outcome::Issued {
                        access_token,
                        expires_in,
                    }
                }
                Answer::Refuse {
                    status,
                    error,
                    description,
                } => refused(status, error, description),
            }
        }
    };
    rec.outcome = outcome.clone();
    let response = match &outcome {
        Outcome::Issued {
            access_token,
            expires_in,
        } => google_json(
            200,
            serde_json::json!({
                "access_token": access_token,
                "expires_in": expires_in,
                "token_type": "Bearer",
            }),
        ),
        Outcome::Refused {
            status,
            error,
            description,
        } => google_json(
            *status,
            serde_json::json!({ "error": error, "error_description": description }),
        ),
    };
    let n = {
        let mut received = s.received.lock().unwrap();
        received.push(rec);
        received.len()
    };
    s.count.send_replace(n);
    response
}

/// A JSON answer with the headers Google's token endpoint sends.
fn google_json(status: u16, body: Value) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .header(
            "cache-control",
            "no-cache, no-store, max-age=0, must-revalidate",
        )
        .header("pragma", "no-cache")
        .body(full(body.to_string()))
        .unwrap()
}

/// Every check, in the order a request meets them. Fills in the decoded
/// header and claims as it goes; returns the account and `kid`.
fn check(s: &State, rec: &mut Received) -> Result<(String, String), Outcome> {
    if rec.path != "/token" {
        return Err(refused(404, "not_found", "no such endpoint"));
    }
    if rec.method != "POST" {
        return Err(refused(
            405,
            "invalid_request",
            "the token endpoint takes POST",
        ));
    }
    let form_type = rec.content_type.as_deref().is_some_and(|c| {
        c.split(';').next().is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    if !form_type {
        return Err(invalid_request(
            "fake: the body must be application/x-www-form-urlencoded",
        ));
    }
    for name in ["grant_type", "assertion"] {
        match rec.form.iter().filter(|(k, _)| k == name).count() {
            0 => {
                return Err(invalid_request(&format!(
                    "Missing required parameter: {name}"
                )));
            }
            1 => {}
            _ => {
                return Err(invalid_request(&format!(
                    "fake: {name} sent more than once"
                )));
            }
        }
    }
    if let Some((extra, _)) = rec
        .form
        .iter()
        .find(|(k, _)| k != "grant_type" && k != "assertion")
    {
        return Err(invalid_request(&format!(
            "fake: unexpected parameter {extra:?}: a service account sends only grant_type and assertion"
        )));
    }
    if rec.authorization.is_some() {
        return Err(invalid_request(
            "fake: no client authentication: the assertion is the credential",
        ));
    }
    let grant_type = rec.form_value("grant_type").unwrap();
    if grant_type != JWT_BEARER {
        return Err(refused(
            400,
            "unsupported_grant_type",
            &format!("Invalid grant_type: {grant_type}"),
        ));
    }
    let assertion = rec.form_value("assertion").unwrap().to_owned();
    let malformed = || invalid_grant("fake: the assertion is not a compact JWS with JSON parts");
    let mut parts = assertion.split('.');
    let (Some(h64), Some(c64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let decode = |p: &str| -> Option<Value> {
        let v: Value = serde_json::from_slice(&B64.decode(p).ok()?).ok()?;
        v.is_object().then_some(v)
    };
    let (Some(header), Some(claims), Ok(sig)) = (decode(h64), decode(c64), B64.decode(s64)) else {
        return Err(malformed());
    };
    rec.header = Some(header.clone());
    rec.claims = Some(claims.clone());

    // The header: RS256 only, typ JWT, and the kid of a key of the account.
    if header["alg"] != "RS256" {
        return Err(invalid_grant("fake: alg must be RS256"));
    }
    if header["typ"] != "JWT" {
        return Err(invalid_grant("fake: typ must be JWT"));
    }
    let Some(kid) = header["kid"].as_str() else {
        return Err(invalid_grant(
            "fake: the header has no kid (private_key_id)",
        ));
    };
    let Some(iss) = claims["iss"].as_str() else {
        return Err(invalid_grant(UNKNOWN_ACCOUNT));
    };
    let public = {
        let accounts = s.accounts.lock().unwrap();
        let Some(keys) = accounts.get(iss) else {
            return Err(invalid_grant(UNKNOWN_ACCOUNT));
        };
        keys.get(kid).cloned()
    };
    // An unknown kid is a key Google does not have: its signature cannot
    // verify.
    let Some(public) = public else {
        return Err(invalid_grant(BAD_SIGNATURE));
    };
    let signed = format!("{h64}.{c64}");
    if UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &public)
        .verify(signed.as_bytes(), &sig)
        .is_err()
    {
        return Err(invalid_grant(BAD_SIGNATURE));
    }

    // The claims.
    let token_uri = s.token_uri.lock().unwrap().clone();
    if claims["aud"].as_str() != Some(token_uri.as_str()) {
        return Err(invalid_grant(BAD_AUDIENCE));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return Err(invalid_grant(BAD_TIMEFRAME));
    };
    let now = rec.now;
    if (iat - now).abs() > IAT_SKEW_SECS
        || exp <= now
        || exp <= iat
        || exp - iat > MAX_ASSERTION_SECS
    {
        return Err(invalid_grant(BAD_TIMEFRAME));
    }
    if let Some(sub) = claims.get("sub") {
        if !sub.as_str().is_some_and(|s| s.contains('@')) {
            return Err(invalid_grant(BAD_SUBJECT));
        }
    }
    let scope_given = claims["scope"]
        .as_str()
        .is_some_and(|s| s.split(' ').any(|s| !s.is_empty()));
    if !scope_given {
        return Err(refused(400, "invalid_scope", BAD_SCOPE));
    }
    Ok((iss.to_owned(), kid.to_owned()))
}

/// What the Google-API stand-in saw of one request.
#[derive(Clone, Debug)]
pub struct ApiSeen {
    pub path: String,
    pub authorization: Option<String>,
}

/// A TLS "Google API" for `localhost`: 200 to a request whose bearer token
/// the fake issued and is still valid, Google's 401 otherwise; records
/// every request.
pub struct GoogleApi {
    pub addr: std::net::SocketAddr,
    pub seen: Arc<Mutex<Vec<ApiSeen>>>,
}

impl GoogleApi {
    pub async fn start(pki: &Pki, tokens: &GoogleTokenServer) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let state = Arc::clone(&tokens.state);
        let addr = serve(
            Some(pki.server_config(&["localhost"])),
            move |req: Request<Incoming>| {
                let s = Arc::clone(&s);
                let state = Arc::clone(&state);
                async move {
                    let authorization = req
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap_or("?").to_owned());
                    s.lock().unwrap().push(ApiSeen {
                        path: req.uri().to_string(),
                        authorization: authorization.clone(),
                    });
                    let ok = authorization
                        .as_deref()
                        .and_then(|a| a.strip_prefix("Bearer "))
                        .is_some_and(|t| state.valid(t));
                    if ok {
                        google_json(200, serde_json::json!({"kind": "storage#buckets"}))
                    } else {
                        google_json(
                            401,
                            serde_json::json!({"error": {
                                "code": 401,
                                "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                                "status": "UNAUTHENTICATED",
                            }}),
                        )
                    }
                }
            },
        )
        .await;
        Self { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    pub fn seen(&self) -> Vec<ApiSeen> {
        self.seen.lock().unwrap().clone()
    }
}

/// The lines of a config error (`lines`, for test case `what`) that start
/// with `prefix` (the key of a credentials file); notes in `failures` if
/// none does, or if other lines are about other keys (one problem, one
/// line).
pub fn lines_about<'a>(
    failures: &mut Vec<String>,
    what: &str,
    lines: &'a [String],
    prefix: &str,
) -> Vec<&'a String> {
    let named: Vec<&String> = lines.iter().filter(|l| l.starts_with(prefix)).collect();
    if named.is_empty() {
        failures.push(format!("{what}: no line starts with {prefix}\n{lines:#?}"));
    }
    if named.len() != lines.len() {
        failures.push(format!(
            "{what}: lines about other keys than the file:\n{lines:#?}"
        ));
    }
    named
}
