//! Local fakes of the two Google endpoints workload identity federation
//! uses, a server for `url` credential sources, and `external_account`
//! files as `gcloud iam workload-identity-pools create-cred-config` writes
//! them.
//!
//! These are fakes of the *documented shapes*, not Google:
//!
//! - **STS** (cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token),
//!   `POST https://localhost:PORT/v1/token`, `application/x-www-form-urlencoded`
//!   with `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`,
//!   `audience` (the workload identity pool provider's resource name,
//!   `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/R`),
//!   `scope`, `requested_token_type=urn:ietf:params:oauth:token-type:access_token`,
//!   `subject_token` and `subject_token_type`, and no client authentication.
//!   A valid request gets `{"access_token":"…","issued_token_type":
//!   "urn:ietf:params:oauth:token-type:access_token","token_type":"Bearer",
//!   "expires_in":3600}`; a refusal is an OAuth error
//!   `{"error":"invalid_grant","error_description":"…"}` (400).
//! - **IAM credentials** (cloud.google.com/iam/docs/reference/credentials/rest/v1/projects.serviceAccounts/generateAccessToken),
//!   `POST https://localhost:PORT/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`
//!   with `Authorization: Bearer <a token the STS fake issued, unexpired>`
//!   and a JSON body `{"scope":[…],"lifetime":"3600s"}` (`lifetime` a
//!   protobuf Duration, default 3600 s, at most 43200 s). A valid request
//!   gets `{"accessToken":"ya29.…","expireTime":"2026-12-03T16:01:23Z"}`
//!   (RFC 3339, UTC, whole seconds) with `expireTime` = now + the lifetime
//!   (or the shorter lifetime a test sets, [`IamServer::cap_lifetime`]); a
//!   refusal is Google's JSON error `{"error":{"code":403,"message":"…",
//!   "status":"PERMISSION_DENIED"}}`.
//!
//! Every check is made here with serde_json and form_urlencoded, not with
//! the proxy's code. Where Google's wording is known (`invalid_target` for
//! an unknown provider, `PERMISSION_DENIED` on `iam.serviceAccounts.getAccessToken`,
//! `UNAUTHENTICATED` for a bad bearer, "Unknown name … Cannot find field")
//! the fake uses it; where Google documents nothing the fake is stricter
//! than Google is known to be and says so in its own wording, starting
//! `fake:` — every STS parameter above is required exactly once and nothing
//! else may be sent (Google also takes `options`, unused here), `scope`
//! must be what the test expects when it says so, the body must be JSON
//! with only `scope` and `lifetime` (no `delegates`), and the project in
//! the IAM path must be the `-` wildcard Google requires.
//!
//! Both fakes record every request and their answer, and count them on a
//! watch channel, so tests wait without polling. The tokens they issue are
//! remembered with what they were issued for, so a token an upstream saw
//! can be traced back to the subject token it came from.

// A fixture for several tests; each uses part of it.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{Request, Response};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{BoxBody, Pki, full, header_of, random, read_body, serve, wait_on};

/// RFC 8693's grant type, as STS wants it.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The only `requested_token_type` STS issues.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The subject token type of an OIDC provider (a Kubernetes token).
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Another subject token type gcloud can write.
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
/// A third scope, so profile scopes differ from what STS is asked for.
pub const BIGQUERY_READ: &str = "https://www.googleapis.com/auth/bigquery.readonly";

/// The pool provider the tests federate through (a made-up project number).
pub const AUDIENCE: &str = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/k8s-pool/providers/k8s-provider";
/// The service account impersonated.
pub const SERVICE_ACCOUNT: &str = "wif-runner@fake-project.iam.gserviceaccount.com";
/// A second one.
pub const SERVICE_ACCOUNT_2: &str = "wif-reader@fake-project.iam.gserviceaccount.com";

/// Google's answers, as its endpoints word them.
pub const INVALID_TARGET: &str = "The target service indicated by the \"audience\" parameters is invalid. This might either be because the pool or provider is disabled or deleted or because it doesn't exist.";
pub const IAM_DENIED: &str =
    "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).";
pub const IAM_UNAUTHENTICATED: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
/// What a fake refusal of a subject token says.
pub const BAD_SUBJECT_TOKEN: &str =
    "fake: the subject token is not one the identity provider issued (or it was revoked)";

/// The longest `lifetime` generateAccessToken takes (with the org policy
/// that allows more than an hour).
pub const MAX_LIFETIME_SECS: f64 = 43200.0;

/// The form's parameters STS gets from this flow, each exactly once.
pub const STS_PARAMS: [&str; 6] = [
    "grant_type",
    "audience",
    "scope",
    "requested_token_type",
    "subject_token",
    "subject_token_type",
];

/// The `Content-Type`'s media type, lowercased.
fn media_type(content_type: Option<&str>) -> Option<String> {
    Some(content_type?.split(';').next()?.trim().to_ascii_lowercase())
}

/// A JSON answer with the headers Google's endpoints send.
fn google_json(status: u16, body: Value) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .header(
            "cache-control",
            "no-cache, no-store, max-age=0, must-revalidate",
        )
        .body(full(body.to_string()))
        .unwrap()
}

// ---------------------------------------------------------------------------
// STS

/// What the STS fake does with a request that passed every check.
#[derive(Clone, Debug)]
pub enum StsAnswer {
    /// Issue a token with this `expires_in`.
    Issue(u64),
    /// Refuse anyway (a provider's attribute condition, a disabled pool):
    /// this status, `error` and `error_description`.
    Refuse {
        status: u16,
        error: &'static str,
        description: &'static str,
    },
}

/// What the STS fake answered one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StsOutcome {
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

/// One request STS received, and its answer.
#[derive(Clone, Debug)]
pub struct StsReceived {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    /// The form, in order, repeats kept.
    pub form: Vec<(String, String)>,
    pub outcome: StsOutcome,
}

impl StsReceived {
    pub fn accepted(&self) -> bool {
        matches!(self.outcome, StsOutcome::Issued { .. })
    }

    pub fn form_value(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn subject_token(&self) -> Option<&str> {
        self.form_value("subject_token")
    }

    /// The parameter names, sorted.
    pub fn form_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.form.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// The token issued, when one was.
    pub fn access_token(&self) -> Option<&str> {
        match &self.outcome {
            StsOutcome::Issued { access_token, .. } => Some(access_token),
            StsOutcome::Refused { .. } => None,
        }
    }
}

/// A federated token STS issued.
#[derive(Clone, Debug)]
pub struct StsIssued {
    pub expires: Instant,
    pub subject_token: String,
    pub audience: String,
    pub scope: String,
}

pub struct StsState {
    audiences: Mutex<HashSet<String>>,
    subject_token_type: Mutex<String>,
    /// The exact `scope` expected, when the test says.
    expect_scope: Mutex<Option<String>>,
    subject_tokens: Mutex<HashSet<String>>,
    answer: Mutex<StsAnswer>,
    received: Mutex<Vec<StsReceived>>,
    issued: Mutex<HashMap<String, StsIssued>>,
    count: watch::Sender<usize>,
}

impl StsState {
    pub fn valid(&self, token: &str) -> bool {
        self.issued
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|i| Instant::now() < i.expires)
    }
}

/// The STS fake: `POST https://localhost:PORT/v1/token`.
pub struct StsServer {
    pub addr: SocketAddr,
    pub state: Arc<StsState>,
}

impl StsServer {
    /// Starts the fake with TLS from `pki` for `localhost`: provider
    /// [`AUDIENCE`], subject tokens of type [`JWT_TOKEN_TYPE`], none accepted
    /// yet ([`Self::accept_subject`]), any non-empty scope, 3600-second
    /// tokens.
    pub async fn start(pki: &Pki) -> Self {
        let state = Arc::new(StsState {
            audiences: Mutex::new(HashSet::from([AUDIENCE.to_owned()])),
            subject_token_type: Mutex::new(JWT_TOKEN_TYPE.to_owned()),
            expect_scope: Mutex::default(),
            subject_tokens: Mutex::default(),
            answer: Mutex::new(StsAnswer::Issue(3600)),
            received: Mutex::default(),
            issued: Mutex::default(),
            count: watch::Sender::new(0),
        });
        let s = Arc::clone(&state);
        let addr = serve(Some(pki.server_config(&["localhost"])), move |req| {
            let s = Arc::clone(&s);
            async move { sts_handle(s, req).await }
        })
        .await;
        Self { addr, state }
    }

    /// The file's `token_url`.
    pub fn token_url(&self) -> String {
        format!("https://localhost:{}/v1/token", self.addr.port())
    }

    /// Accepts `subject_token` (the identity provider issued it).
    pub fn accept_subject(&self, subject_token: &str) {
        self.state
            .subject_tokens
            .lock()
            .unwrap()
            .insert(subject_token.to_owned());
    }

    /// Accepts only these subject tokens from now on.
    pub fn accept_only(&self, subject_tokens: &[&str]) {
        *self.state.subject_tokens.lock().unwrap() =
            subject_tokens.iter().map(|t| t.to_string()).collect();
    }

    /// Knows one more pool provider.
    pub fn add_audience(&self, audience: &str) {
        self.state
            .audiences
            .lock()
            .unwrap()
            .insert(audience.to_owned());
    }

    pub fn set_subject_token_type(&self, t: &str) {
        *self.state.subject_token_type.lock().unwrap() = t.to_owned();
    }

    /// Refuses (`invalid_scope`) any `scope` but exactly this one.
    pub fn expect_scope(&self, scope: &str) {
        *self.state.expect_scope.lock().unwrap() = Some(scope.to_owned());
    }

    pub fn set_answer(&self, answer: StsAnswer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    pub fn received(&self) -> Vec<StsReceived> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until the requests received so far satisfy `done`.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&[StsReceived]) -> bool,
    ) {
        wait_on(
            "STS fake",
            &self.state.count,
            &self.state.received,
            within,
            what,
            done,
        )
        .await;
    }

    pub fn issued(&self, token: &str) -> Option<StsIssued> {
        self.state.issued.lock().unwrap().get(token).cloned()
    }

    pub fn valid(&self, token: &str) -> bool {
        self.state.valid(token)
    }
}

fn sts_refused(status: u16, error: &str, description: &str) -> StsOutcome {
    StsOutcome::Refused {
        status,
        error: error.to_owned(),
        description: description.to_owned(),
    }
}

fn sts_invalid_request(description: &str) -> StsOutcome {
    sts_refused(400, "invalid_request", description)
}

async fn sts_handle(s: Arc<StsState>, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = read_body(body).await;
    let mut rec = StsReceived {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        content_type: header_of(&parts.headers, "content-type"),
        authorization: header_of(&parts.headers, "authorization"),
        form: form_urlencoded::parse(&body).into_owned().collect(),
        outcome: sts_invalid_request("unchecked"),
    };
    let outcome = match sts_check(&s, &rec) {
        Err(refusal) => refusal,
        Ok(()) => match s.answer.lock().unwrap().clone() {
            StsAnswer::Issue(expires_in) => {
                let access_token = format!("ya29.d.{}", random(100));
                s.issued.lock().unwrap().insert(
                    access_token.clone(),
                    StsIssued {
                        expires: Instant::now() + Duration::from_secs(expires_in),
                        subject_token: rec.subject_token().unwrap().to_owned(),
                        audience: rec.form_value("audience").unwrap().to_owned(),
                        scope: rec.form_value("scope").unwrap().to_owned(),
                    },
                );
                StsOutcome::Issued {
                    access_token,
                    expires_in,
                }
            }
            StsAnswer::Refuse {
                status,
                error,
                description,
            } => sts_refused(status, error, description),
        },
    };
    rec.outcome = outcome.clone();
    let response = match &outcome {
        StsOutcome::Issued {
            access_token,
            expires_in,
        } => google_json(
            200,
            json!({
                "access_token": access_token,
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "token_type": "Bearer",
                "expires_in": expires_in,
            }),
        ),
        StsOutcome::Refused {
            status,
            error,
            description,
        } => google_json(
            *status,
            json!({ "error": error, "error_description": description }),
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

/// Every check, in the order a request meets them.
fn sts_check(s: &StsState, rec: &StsReceived) -> Result<(), StsOutcome> {
    if rec.path != "/v1/token" {
        return Err(sts_refused(404, "not_found", "fake: no such endpoint"));
    }
    if rec.method != "POST" {
        return Err(sts_refused(
            405,
            "invalid_request",
            "fake: the token endpoint takes POST",
        ));
    }
    if media_type(rec.content_type.as_deref()).as_deref()
        != Some("application/x-www-form-urlencoded")
    {
        return Err(sts_invalid_request(
            "fake: the body must be application/x-www-form-urlencoded",
        ));
    }
    if rec.authorization.is_some() {
        return Err(sts_invalid_request(
            "fake: no client authentication: the subject token is the credential",
        ));
    }
    for name in STS_PARAMS {
        match rec.form.iter().filter(|(k, _)| k == name).count() {
            0 => {
                return Err(sts_invalid_request(&format!(
                    "fake: missing required parameter: {name}"
                )));
            }
            1 => {}
            _ => {
                return Err(sts_invalid_request(&format!(
                    "fake: {name} sent more than once"
                )));
            }
        }
    }
    if let Some((extra, _)) = rec
        .form
        .iter()
        .find(|(k, _)| !STS_PARAMS.contains(&k.as_str()))
    {
        return Err(sts_invalid_request(&format!(
            "fake: unexpected parameter {extra:?}: this flow sends only {STS_PARAMS:?}"
        )));
    }
    let value = |name: &str| rec.form_value(name).unwrap();
    if value("grant_type") != TOKEN_EXCHANGE {
        return Err(sts_refused(
            400,
            "unsupported_grant_type",
            &format!("Invalid value for \"grant_type\": {}", value("grant_type")),
        ));
    }
    if value("requested_token_type") != ACCESS_TOKEN_TYPE {
        return Err(sts_invalid_request(
            "fake: requested_token_type must be urn:ietf:params:oauth:token-type:access_token",
        ));
    }
    let want_type = s.subject_token_type.lock().unwrap().clone();
    if value("subject_token_type") != want_type {
        return Err(sts_invalid_request(&format!(
            "fake: subject_token_type must be {want_type} for this provider"
        )));
    }
    if !s.audiences.lock().unwrap().contains(value("audience")) {
        return Err(sts_refused(400, "invalid_target", INVALID_TARGET));
    }
    let scope = value("scope");
    let scope_ok = match &*s.expect_scope.lock().unwrap() {
        Some(want) => scope == want,
        None => scope.split(' ').any(|s| !s.is_empty()),
    };
    if !scope_ok {
        return Err(sts_refused(
            400,
            "invalid_scope",
            "fake: the scope is not the one this test expects",
        ));
    }
    if !s
        .subject_tokens
        .lock()
        .unwrap()
        .contains(value("subject_token"))
    {
        return Err(sts_refused(400, "invalid_grant", BAD_SUBJECT_TOKEN));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// IAM credentials

/// What the IAM fake does with a request that passed every check.
#[derive(Clone, Debug)]
pub enum IamAnswer {
    Issue,
    /// Refuse with Google's error shape.
    Refuse {
        code: u16,
        status: &'static str,
        message: &'static str,
    },
}

impl IamAnswer {
    /// The service account lacks `roles/iam.workloadIdentityUser` for the
    /// federated principal.
    pub fn permission_denied() -> Self {
        IamAnswer::Refuse {
            code: 403,
            status: "PERMISSION_DENIED",
            message: IAM_DENIED,
        }
    }
}

/// What the IAM fake answered one request.
#[derive(Clone, Debug, PartialEq)]
pub enum IamOutcome {
    Issued {
        access_token: String,
        expire_time: String,
        /// The lifetime given, after the test's cap (seconds).
        lifetime: f64,
    },
    Refused {
        code: u16,
        status: String,
        message: String,
    },
}

/// One request IAM received, and its answer.
#[derive(Clone, Debug)]
pub struct IamReceived {
    pub method: String,
    pub path: String,
    /// The service account named in the path (percent-decoded).
    pub email: Option<String>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
    /// The body, when it parsed as JSON.
    pub json: Option<Value>,
    pub outcome: IamOutcome,
}

impl IamReceived {
    pub fn accepted(&self) -> bool {
        matches!(self.outcome, IamOutcome::Issued { .. })
    }

    pub fn bearer(&self) -> Option<&str> {
        self.authorization.as_deref()?.strip_prefix("Bearer ")
    }

    pub fn access_token(&self) -> Option<&str> {
        match &self.outcome {
            IamOutcome::Issued { access_token, .. } => Some(access_token),
            IamOutcome::Refused { .. } => None,
        }
    }
}

/// An access token IAM issued.
#[derive(Clone, Debug)]
pub struct IamIssued {
    pub expires: Instant,
    pub email: String,
    /// The STS token it was asked with.
    pub sts_token: String,
    pub scope: Vec<String>,
}

pub struct IamState {
    sts: Arc<StsState>,
    accounts: Mutex<HashSet<String>>,
    cap: Mutex<Option<Duration>>,
    answer: Mutex<IamAnswer>,
    received: Mutex<Vec<IamReceived>>,
    issued: Mutex<HashMap<String, IamIssued>>,
    count: watch::Sender<usize>,
}

impl IamState {
    pub fn valid(&self, token: &str) -> bool {
        self.issued
            .lock()
            .unwrap()
            .get(token)
            .is_some_and(|i| Instant::now() < i.expires)
    }
}

/// The IAM credentials fake: `POST https://localhost:PORT/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`.
pub struct IamServer {
    pub addr: SocketAddr,
    pub state: Arc<IamState>,
}

impl IamServer {
    /// Starts the fake with TLS from `pki`, taking bearer tokens `sts`
    /// issued, knowing [`SERVICE_ACCOUNT`] and [`SERVICE_ACCOUNT_2`] (both
    /// grant the federated principal `roles/iam.workloadIdentityUser`).
    pub async fn start(pki: &Pki, sts: &StsServer) -> Self {
        let state = Arc::new(IamState {
            sts: Arc::clone(&sts.state),
            accounts: Mutex::new(HashSet::from([
                SERVICE_ACCOUNT.to_owned(),
                SERVICE_ACCOUNT_2.to_owned(),
            ])),
            cap: Mutex::default(),
            answer: Mutex::new(IamAnswer::Issue),
            received: Mutex::default(),
            issued: Mutex::default(),
            count: watch::Sender::new(0),
        });
        let s = Arc::clone(&state);
        let addr = serve(Some(pki.server_config(&["localhost"])), move |req| {
            let s = Arc::clone(&s);
            async move { iam_handle(s, req).await }
        })
        .await;
        Self { addr, state }
    }

    /// The file's `service_account_impersonation_url` for `email`.
    pub fn impersonation_url(&self, email: &str) -> String {
        format!(
            "https://localhost:{}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
            self.addr.port()
        )
    }

    /// Issues tokens of at most `cap`, whatever `lifetime` asks (renewal
    /// tests; Google itself gives what is asked).
    pub fn cap_lifetime(&self, cap: Duration) {
        *self.state.cap.lock().unwrap() = Some(cap);
    }

    pub fn set_answer(&self, answer: IamAnswer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    pub fn received(&self) -> Vec<IamReceived> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until the requests received so far satisfy `done`.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&[IamReceived]) -> bool,
    ) {
        wait_on(
            "IAM credentials fake",
            &self.state.count,
            &self.state.received,
            within,
            what,
            done,
        )
        .await;
    }

    pub fn issued(&self, token: &str) -> Option<IamIssued> {
        self.state.issued.lock().unwrap().get(token).cloned()
    }

    pub fn valid(&self, token: &str) -> bool {
        self.state.valid(token)
    }
}

fn iam_refused(code: u16, status: &str, message: &str) -> IamOutcome {
    IamOutcome::Refused {
        code,
        status: status.to_owned(),
        message: message.to_owned(),
    }
}

fn invalid_argument(message: &str) -> IamOutcome {
    iam_refused(400, "INVALID_ARGUMENT", message)
}

/// The service account in `/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`,
/// or why the path is not one.
fn iam_email(path: &str) -> Result<String, IamOutcome> {
    let not_found = || iam_refused(404, "NOT_FOUND", "fake: no such method");
    let rest = path.strip_prefix("/v1/projects/").ok_or_else(not_found)?;
    let (project, rest) = rest.split_once("/serviceAccounts/").ok_or_else(not_found)?;
    let email = rest
        .strip_suffix(":generateAccessToken")
        .ok_or_else(not_found)?;
    if project != "-" {
        return Err(invalid_argument(
            "fake: the project must be the - wildcard; a project ID there is invalid",
        ));
    }
    let email: String = form_urlencoded::parse(format!("e={email}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if email.is_empty() || email.contains('/') {
        return Err(not_found());
    }
    Ok(email)
}

/// A protobuf Duration in JSON: `"3600s"`, `"1.5s"`.
pub fn parse_duration(text: &str) -> Option<f64> {
    let n = text.strip_suffix('s')?;
    let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (n.contains('.') && frac.is_empty())
    {
        return None;
    }
    n.parse().ok()
}

/// RFC 3339 in UTC with whole seconds, as `expireTime` is written.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn iam_handle(s: Arc<IamState>, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = read_body(body).await;
    let mut rec = IamReceived {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        email: None,
        content_type: header_of(&parts.headers, "content-type"),
        authorization: header_of(&parts.headers, "authorization"),
        body: String::from_utf8_lossy(&body).into_owned(),
        json: serde_json::from_slice(&body).ok(),
        outcome: invalid_argument("unchecked"),
    };
    let outcome = match iam_check(&s, &mut rec) {
        Err(refusal) => refusal,
        Ok((lifetime, scope)) => match s.answer.lock().unwrap().clone() {
            IamAnswer::Issue => {
                let lifetime = match *s.cap.lock().unwrap() {
                    Some(cap) => lifetime.min(cap.as_secs_f64()),
                    None => lifetime,
                };
                let access_token = format!("ya29.c.{}", random(150));
                let expire_time = rfc3339(SystemTime::now() + Duration::from_secs_f64(lifetime));
                s.issued.lock().unwrap().insert(
                    access_token.clone(),
                    IamIssued {
                        expires: Instant::now() + Duration::from_secs_f64(lifetime),
                        email: rec.email.clone().unwrap(),
                        sts_token: rec.bearer().unwrap().to_owned(),
                        scope,
                    },
                );
                IamOutcome::Issued {
                    access_token,
                    expire_time,
                    lifetime,
                }
            }
            IamAnswer::Refuse {
                code,
                status,
                message,
            } => iam_refused(code, status, message),
        },
    };
    rec.outcome = outcome.clone();
    let response = match &outcome {
        IamOutcome::Issued {
            access_token,
            expire_time,
            ..
        } => google_json(
            200,
            json!({ "accessToken": access_token, "expireTime": expire_time }),
        ),
        IamOutcome::Refused {
            code,
            status,
            message,
        } => google_json(
            *code,
            json!({ "error": { "code": code, "message": message, "status": status } }),
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

/// Every check, in order; returns the lifetime asked for (seconds) and the
/// scopes.
fn iam_check(s: &IamState, rec: &mut IamReceived) -> Result<(f64, Vec<String>), IamOutcome> {
    let email = iam_email(&rec.path)?;
    rec.email = Some(email.clone());
    if rec.method != "POST" {
        return Err(iam_refused(
            405,
            "METHOD_NOT_ALLOWED",
            "fake: generateAccessToken takes POST",
        ));
    }
    let authenticated = rec.bearer().is_some_and(|t| s.sts.valid(t));
    if !authenticated {
        return Err(iam_refused(401, "UNAUTHENTICATED", IAM_UNAUTHENTICATED));
    }
    if media_type(rec.content_type.as_deref()).as_deref() != Some("application/json") {
        return Err(invalid_argument("fake: the body must be application/json"));
    }
    let Some(Value::Object(body)) = &rec.json else {
        return Err(invalid_argument(
            "Invalid JSON payload received. Expected an object.",
        ));
    };
    if let Some(name) = body.keys().find(|k| *k != "scope" && *k != "lifetime") {
        return Err(invalid_argument(&if name == "delegates" {
            "fake: this flow sends no delegates".to_owned()
        } else {
            format!("Invalid JSON payload received. Unknown name \"{name}\": Cannot find field.")
        }));
    }
    let scope: Option<Vec<String>> = match body.get("scope") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
            .collect(),
        _ => None,
    };
    let Some(scope) = scope.filter(|s| !s.is_empty()) else {
        return Err(invalid_argument(
            "fake: \"scope\" must be a non-empty array of scopes",
        ));
    };
    let lifetime = match body.get("lifetime") {
        None => 3600.0,
        Some(Value::String(text)) => match parse_duration(text) {
            Some(secs) if secs > 0.0 && secs <= MAX_LIFETIME_SECS => secs,
            Some(_) => {
                return Err(invalid_argument(
                    "fake: \"lifetime\" must be more than 0s and at most 43200s",
                ));
            }
            None => {
                return Err(invalid_argument(&format!(
                    "Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration), {}",
                    Value::from(text.as_str())
                )));
            }
        },
        Some(other) => {
            return Err(invalid_argument(&format!(
                "Invalid value at 'lifetime' (type.googleapis.com/google.protobuf.Duration), {other}"
            )));
        }
    };
    if !s.accounts.lock().unwrap().contains(&email) {
        return Err(iam_refused(403, "PERMISSION_DENIED", IAM_DENIED));
    }
    Ok((lifetime, scope))
}

// ---------------------------------------------------------------------------
// A Google API stand-in

/// What the API stand-in saw of one request.
#[derive(Clone, Debug)]
pub struct ApiSeen {
    pub host: Option<String>,
    pub path: String,
    pub authorization: Option<String>,
}

impl ApiSeen {
    pub fn bearer(&self) -> Option<&str> {
        self.authorization.as_deref()?.strip_prefix("Bearer ")
    }
}

/// A TLS "Google API" for `localhost`: 200 to a bearer token either fake
/// issued and is still valid (impersonated, or federated used directly),
/// Google's 401 otherwise; records every request.
pub struct CloudApi {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<ApiSeen>>>,
}

impl CloudApi {
    pub async fn start(pki: &Pki, sts: &StsServer, iam: &IamServer) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let sts = Arc::clone(&sts.state);
        let iam = Arc::clone(&iam.state);
        let addr = serve(
            Some(pki.server_config(&["localhost"])),
            move |req: Request<Incoming>| {
                let s = Arc::clone(&s);
                let sts = Arc::clone(&sts);
                let iam = Arc::clone(&iam);
                async move {
                    let seen = ApiSeen {
                        host: header_of(req.headers(), "host"),
                        path: req.uri().to_string(),
                        authorization: header_of(req.headers(), "authorization"),
                    };
                    let ok = seen.bearer().is_some_and(|t| iam.valid(t) || sts.valid(t));
                    s.lock().unwrap().push(seen);
                    if ok {
                        google_json(200, json!({"kind": "storage#buckets"}))
                    } else {
                        google_json(
                            401,
                            json!({"error": {
                                "code": 401,
                                "message": IAM_UNAUTHENTICATED,
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

// ---------------------------------------------------------------------------
// `url` credential sources

/// One request the subject token server received.
#[derive(Clone, Debug)]
pub struct UrlReceived {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub status: u16,
}

impl UrlReceived {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct UrlState {
    /// A header every request must carry (name lowercase, value), like the
    /// metadata servers' `Metadata-Flavor: Google` or Azure's `Metadata: True`.
    required: Option<(String, String)>,
    /// path → (content type, body).
    routes: Mutex<HashMap<String, (&'static str, String)>>,
    received: Mutex<Vec<UrlReceived>>,
    count: watch::Sender<usize>,
}

/// A plain-HTTP server on 127.0.0.1 for `credential_source.url`: answers
/// GET on the paths it was given with a subject token, as text or as a
/// JSON document; 403 (as a metadata server does) when the required
/// header is missing or wrong, 404 for other paths, 405 for other methods.
pub struct SubjectTokenServer {
    pub addr: SocketAddr,
    pub state: Arc<UrlState>,
}

impl SubjectTokenServer {
    pub async fn start(required: Option<(&str, &str)>) -> Self {
        let state = Arc::new(UrlState {
            required: required.map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned())),
            routes: Mutex::default(),
            received: Mutex::default(),
            count: watch::Sender::new(0),
        });
        let s = Arc::clone(&state);
        let addr = serve(None, move |req: Request<Incoming>| {
            let s = Arc::clone(&s);
            async move { url_handle(s, req) }
        })
        .await;
        Self { addr, state }
    }

    /// `http://127.0.0.1:PORT{path}` (`path` may carry a query).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Serves `token` as `text/plain` at `path` (path only, no query).
    pub fn set_text(&self, path: &str, token: &str) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_owned(), ("text/plain", token.to_owned()));
    }

    /// Serves `doc` as `application/json` at `path`.
    pub fn set_json(&self, path: &str, doc: Value) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_owned(), ("application/json", doc.to_string()));
    }

    pub fn received(&self) -> Vec<UrlReceived> {
        self.state.received.lock().unwrap().clone()
    }
}

fn url_handle(s: Arc<UrlState>, req: Request<Incoming>) -> Response<BoxBody> {
    let mut rec = UrlReceived {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect(),
        status: 0,
    };
    let route = s.routes.lock().unwrap().get(req.uri().path()).cloned();
    let header_ok = s
        .required
        .as_ref()
        .is_none_or(|(k, v)| rec.header(k) == Some(v.as_str()));
    let (status, content_type, body) = if req.method() != http::Method::GET {
        (405, "text/plain", "fake: GET only".to_owned())
    } else if !header_ok {
        let (k, v) = s.required.as_ref().unwrap();
        (403, "text/plain", format!("Missing {k}:{v} header."))
    } else if let Some((content_type, body)) = route {
        (200, content_type, body)
    } else {
        (404, "text/plain", "fake: no such path".to_owned())
    };
    rec.status = status;
    let n = {
        let mut received = s.received.lock().unwrap();
        received.push(rec);
        received.len()
    };
    s.count.send_replace(n);
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(full(body))
        .unwrap()
}

// ---------------------------------------------------------------------------
// `external_account` files

/// `credential_source.format`.
#[derive(Clone, Debug)]
pub enum Format {
    Text,
    /// JSON, the token in this member.
    Json(&'static str),
}

/// A JSON value whose members keep the order they are written in (gcloud
/// writes its files in a fixed order).
#[derive(Clone, Debug)]
pub enum J {
    Str(String),
    Num(u64),
    Obj(Vec<(String, J)>),
}

impl J {
    fn obj(members: &[(&str, J)]) -> J {
        J::Obj(
            members
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    fn str(s: &str) -> J {
        J::Str(s.to_owned())
    }

    /// Pretty-printed with two spaces, as Python's `json.dumps(indent=2)`.
    fn render(&self, depth: usize, out: &mut String) {
        match self {
            J::Str(s) => out.push_str(&Value::from(s.as_str()).to_string()),
            J::Num(n) => out.push_str(&n.to_string()),
            J::Obj(members) if members.is_empty() => out.push_str("{}"),
            J::Obj(members) => {
                out.push_str("{\n");
                for (i, (k, v)) in members.iter().enumerate() {
                    out.push_str(&"  ".repeat(depth + 1));
                    out.push_str(&Value::from(k.as_str()).to_string());
                    out.push_str(": ");
                    v.render(depth + 1, out);
                    if i + 1 < members.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&"  ".repeat(depth));
                out.push('}');
            }
        }
    }
}

fn format_j(format: &Format) -> J {
    match format {
        Format::Text => J::obj(&[("type", J::str("text"))]),
        Format::Json(field) => J::obj(&[
            ("type", J::str("json")),
            ("subject_token_field_name", J::str(field)),
        ]),
    }
}

/// `credential_source` for a file (`--credential-source-file`).
pub fn file_source(path: &Path, format: Format) -> J {
    J::obj(&[
        ("file", J::str(path.to_str().unwrap())),
        ("format", format_j(&format)),
    ])
}

/// `credential_source` for a URL (`--credential-source-url`,
/// `--credential-source-headers`).
pub fn url_source(url: &str, headers: &[(&str, &str)], format: Format) -> J {
    let mut members = vec![("url", J::str(url))];
    if !headers.is_empty() {
        members.push((
            "headers",
            J::Obj(
                headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), J::str(v)))
                    .collect(),
            ),
        ));
    }
    members.push(("format", format_j(&format)));
    J::obj(&members)
}

/// An `external_account` file's contents.
#[derive(Clone, Debug)]
pub struct ExternalAccount {
    pub audience: String,
    pub subject_token_type: String,
    pub token_url: String,
    pub credential_source: J,
    pub impersonation_url: Option<String>,
    /// `service_account_impersonation.token_lifetime_seconds`
    /// (`--service-account-token-lifetime-seconds`), written only when set.
    pub token_lifetime_seconds: Option<u64>,
}

impl ExternalAccount {
    /// A file for provider [`AUDIENCE`] and JWT subject tokens.
    pub fn new(token_url: &str, credential_source: J) -> Self {
        Self {
            audience: AUDIENCE.to_owned(),
            subject_token_type: JWT_TOKEN_TYPE.to_owned(),
            token_url: token_url.to_owned(),
            credential_source,
            impersonation_url: None,
            token_lifetime_seconds: None,
        }
    }

    pub fn impersonating(mut self, url: &str) -> Self {
        self.impersonation_url = Some(url.to_owned());
        self
    }

    /// The file as gcloud writes it: its fields in gcloud's order,
    /// pretty-printed with two spaces.
    pub fn to_json(&self) -> String {
        let mut members = vec![
            ("universe_domain", J::str("googleapis.com")),
            ("type", J::str("external_account")),
            ("audience", J::str(&self.audience)),
            ("subject_token_type", J::str(&self.subject_token_type)),
            ("token_url", J::str(&self.token_url)),
            ("credential_source", self.credential_source.clone()),
        ];
        if let Some(url) = &self.impersonation_url {
            members.push(("service_account_impersonation_url", J::str(url)));
        }
        if let Some(secs) = self.token_lifetime_seconds {
            members.push((
                "service_account_impersonation",
                J::obj(&[("token_lifetime_seconds", J::Num(secs))]),
            ));
        }
        let mut out = String::new();
        J::obj(&members).render(0, &mut out);
        out.push('\n');
        out
    }

    /// The file as a JSON value, to edit.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(&self.to_json()).unwrap()
    }
}

/// A made-up "Kubernetes ServiceAccount token": JWT-shaped, unsigned, only
/// ever compared as a string.
pub fn k8s_token(tag: &str) -> String {
    use base64::Engine as _;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        b64(json!({"alg": "RS256", "kid": "k8s-test"})),
        b64(json!({
            "aud": [AUDIENCE],
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:default:{tag}"),
        })),
        random(43)
    )
}
