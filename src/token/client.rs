//! The token request of one profile: client credentials grant, with the
//! profile's client authentication, over its own TLS trust.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};
use zeroize::Zeroizing;

use crate::config::{BasicEncoding, ClientAuth, Endpoint, Profile};
use crate::errors;

use super::assertion::{self, Signer, SigningKey};

use super::response::{self, FetchError, Parsed};

/// Token responses larger than this are refused without reading further.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Client {
    profile: String,
    /// Shared, pooled client; `None` for tls_client_auth, whose client is
    /// built per request so a rotated certificate is used at once.
    http: Option<reqwest::Client>,
    ca_file: Option<PathBuf>,
    endpoint: Endpoint,
    /// The token endpoint found by issuer discovery, once found.
    discovered: OnceLock<url::Url>,
    client_id: String,
    auth: ClientAuth,
    assertion_audience: Option<String>,
    basic_encoding: BasicEncoding,
    /// The form parameters that do not change between requests.
    params: Vec<(String, String)>,
    headers: HeaderMap,
    timeout: Duration,
    default_lifetime: Duration,
    /// DPoP (RFC 9449): the key that proves possession, what the token
    /// endpoint said about proofs (nonce, clock), and the counters.
    dpop: Option<Dpop>,
    /// What the grant adds to each request (an assertion, a subject token).
    grant: super::grant::Grant,
    /// The profile's scopes, space-joined (Google wants them as a claim).
    scopes: String,
    /// A chain: when the subject token used by the last token request
    /// expires, to tell a renewed subject from it.
    subject_used: std::sync::Mutex<Option<tokio::time::Instant>>,
}

#[derive(Debug)]
struct Dpop {
    key: Arc<crate::dpop::ProfileKey>,
    server: crate::dpop::Server,
    metrics: crate::metrics::DpopMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("profiles.{profile}.ca_file: {source}")]
    Tls {
        profile: String,
        source: crate::tls::Error,
    },
    #[error("profiles.{profile}: cannot build the HTTP client: {source}")]
    Http {
        profile: String,
        source: reqwest::Error,
    },
}

fn http_client(
    tls: rustls::ClientConfig,
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        // A redirect could carry credentials elsewhere; token endpoints
        // answer directly.
        .redirect(reqwest::redirect::Policy::none())
        // The sidecar's own HTTP_PROXY, if any, must not capture this.
        .no_proxy()
        .user_agent(concat!("token-injector/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Token endpoint clients shared by the profiles that trust the same CA
/// file: one connection pool and TLS setup for many profiles, instead of
/// one each (which cost ~60 KiB per profile with thousands of profiles).
pub struct HttpClients {
    timeout: Duration,
    clients: HashMap<Option<PathBuf>, reqwest::Client>,
}

impl HttpClients {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            clients: HashMap::new(),
        }
    }

    fn get(&mut self, profile: &Profile) -> Result<reqwest::Client, BuildError> {
        if let Some(c) = self.clients.get(&profile.ca_file) {
            return Ok(c.clone());
        }
        let tls = crate::tls::client_config(profile.ca_file.as_deref(), &[b"http/1.1"]).map_err(
            |source| BuildError::Tls {
                profile: profile.name.clone(),
                source,
            },
        )?;
        let client = http_client(tls, self.timeout).map_err(|source| BuildError::Http {
            profile: profile.name.clone(),
            source,
        })?;
        self.clients.insert(profile.ca_file.clone(), client.clone());
        Ok(client)
    }
}

impl Client {
    /// The token client of `profile`; its HTTP client comes from `clients`
    /// (shared per CA file), except for tls_client_auth.
    pub fn new(
        profile: &Profile,
        clients: &mut HttpClients,
        default_lifetime: Duration,
    ) -> Result<Self, BuildError> {
        let timeout = clients.timeout;
        let http = match profile.auth {
            ClientAuth::TlsClientAuth { .. } => None,
            _ => Some(clients.get(profile)?),
        };
        let grant = super::grant::Grant::new(&profile.grant);
        let mut params = vec![("grant_type".to_owned(), grant.grant_type().to_owned())];
        if !profile.scopes.is_empty() && grant.scope_in_form() {
            params.push(("scope".into(), profile.scopes.join(" ")));
        }
        if let Some(aud) = &profile.audience {
            params.push(("audience".into(), aud.clone()));
        }
        for r in &profile.resources {
            params.push(("resource".into(), r.clone()));
        }
        params.extend(profile.extra_params.iter().cloned());
        let mut headers = HeaderMap::new();
        for (n, v) in &profile.token_headers {
            headers.insert(n.clone(), v.clone());
        }
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        Ok(Self {
            profile: profile.name.clone(),
            http,
            ca_file: profile.ca_file.clone(),
            endpoint: profile.endpoint.clone(),
            discovered: OnceLock::new(),
            client_id: profile.client_id.clone(),
            auth: profile.auth.clone(),
            assertion_audience: profile.assertion_audience.clone(),
            basic_encoding: profile.basic_encoding,
            params,
            headers,
            timeout,
            default_lifetime,
            dpop: None,
            grant,
            scopes: profile.scopes.join(" "),
            subject_used: std::sync::Mutex::new(None),
        })
    }

    /// A chain: the store of the profile whose token this one exchanges.
    pub fn with_subject(mut self, store: Arc<super::Store>) -> Self {
        self.grant = self.grant.with_subject(store);
        self
    }

    /// For a chain, resolves once the subject profile holds another token
    /// than the one last exchanged; never for other grants.
    pub async fn subject_renewed(&self) {
        let Some(store) = self.grant.subject_store() else {
            return std::future::pending().await;
        };
        let mut attempts = store.attempts();
        // The subject token the held token came from: the one this replica
        // exchanged, or (a token adopted from the shared cache) the one in
        // the subject's store now.
        let used = *self
            .subject_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| {
                store
                    .current()
                    .map_or_else(tokio::time::Instant::now, |t| t.expires_at())
            });
        loop {
            if let Some(t) = store.current()
                && t.expires_at() != used
            {
                // Fired once per subject token, whoever renews after it.
                *self.subject_used.lock().unwrap_or_else(|p| p.into_inner()) = Some(t.expires_at());
                return;
            }
            if attempts.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Asks for DPoP-bound tokens, proving possession of `key` (RFC 9449
    /// §5): a proof on every token request, and a `token_type` other than
    /// `DPoP` in the answer is an error. Each token carries the key it was
    /// bound to.
    pub fn with_dpop(
        mut self,
        key: Arc<crate::dpop::ProfileKey>,
        metrics: crate::metrics::DpopMetrics,
    ) -> Self {
        self.dpop = Some(Dpop {
            key,
            server: crate::dpop::Server::default(),
            metrics,
        });
        self
    }

    /// The DPoP key the next token will be bound to (the key file is looked
    /// at now), for a DPoP profile.
    pub fn dpop_key(&self) -> Option<Arc<crate::dpop::ProofKey>> {
        self.dpop.as_ref().map(|d| d.key.current())
    }

    /// A DPoP proof for a token request to `url`, with the server's nonce.
    fn dpop_proof(
        &self,
        dpop: &Dpop,
        key: &crate::dpop::ProofKey,
        url: &url::Url,
    ) -> Result<String, FetchError> {
        let htu = crate::dpop::htu(
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.port_or_known_default(),
            url.path(),
        );
        let nonce = dpop.server.nonce();
        let (mut out, mut scratch) = (String::new(), String::new());
        key.proof(
            &mut out,
            &crate::dpop::Claims {
                htm: "POST",
                htu: &htu,
                iat: dpop.server.iat(),
                ath: None,
                nonce: nonce.as_deref().map(String::as_str),
            },
            &mut scratch,
        )
        .map_err(|e| {
            dpop.metrics.error("signing");
            FetchError::Secret(format!("DPoP proof: {e}"))
        })?;
        dpop.metrics.proofs.inc();
        Ok(out)
    }

    /// The HTTP client for this request: the shared one, or for
    /// tls_client_auth one built now from the certificate files.
    fn http(&self) -> Result<reqwest::Client, FetchError> {
        if let Some(c) = &self.http {
            return Ok(c.clone());
        }
        let ClientAuth::TlsClientAuth {
            cert_file,
            key_file,
        } = &self.auth
        else {
            unreachable!("only tls_client_auth builds its client per request");
        };
        let identity = crate::tls::load_identity(cert_file, key_file)
            .map_err(|e| FetchError::Secret(format!("client certificate: {e}")))?;
        let tls =
            crate::tls::client_config_with(self.ca_file.as_deref(), &[b"http/1.1"], Some(identity))
                .map_err(|e| FetchError::Secret(format!("client certificate: {e}")))?;
        http_client(tls, self.timeout)
            .map_err(|e| FetchError::Connect(errors::chain(&e.without_url())))
    }

    /// The token endpoint: configured, or discovered from the issuer.
    async fn token_url(&self, http: &reqwest::Client) -> Result<url::Url, FetchError> {
        match &self.endpoint {
            Endpoint::TokenUrl(u) => Ok(u.clone()),
            Endpoint::Issuer(issuer) => {
                if let Some(u) = self.discovered.get() {
                    return Ok(u.clone());
                }
                let url = discover(http, issuer).await?;
                tracing::info!(profile = %self.profile, token_endpoint = %url, "issuer discovery done");
                Ok(self.discovered.get_or_init(|| url).clone())
            }
        }
    }

    /// Makes one token request. Secrets and keys are read now, so rotated
    /// files are used at once; nothing secret reaches the error.
    pub async fn fetch(&self) -> Result<Parsed, FetchError> {
        let http = self.http()?;
        let url = self.token_url(&http).await?;
        if let super::grant::Grant::GoogleFederation(file) = &self.grant {
            let steps = super::federation::Steps {
                http: &http,
                sts_url: &url,
                file,
                scopes: &self.scopes,
                timeout: self.timeout,
                default_lifetime: self.default_lifetime,
            };
            return steps.fetch().await;
        }
        let key = self.dpop_key();
        let (result, retry) = self.fetch_once(&http, &url, key.as_deref()).await;
        let result = match (retry, &self.dpop) {
            // RFC 9449 §8: the server wants a nonce in the proof and gave
            // one, or refused the proof and its clock differs from ours.
            // Once, so a server that always asks again cannot make the
            // task loop.
            (true, Some(dpop)) => {
                dpop.metrics.nonce_token_endpoint.inc();
                tracing::info!(profile = %self.profile, "token endpoint refused the DPoP proof with a nonce or clock to use; retrying once");
                self.fetch_once(&http, &url, key.as_deref()).await.0
            }
            _ => result,
        };
        if let (Some(dpop), Err(FetchError::Rejected { error: Some(e), .. })) =
            (&self.dpop, &result)
            && (e == "use_dpop_nonce" || e == "invalid_dpop_proof")
        {
            dpop.metrics.error(e);
        }
        result.map(|mut parsed| {
            parsed.dpop = key;
            parsed
        })
    }

    /// One token request; with it, whether a second may succeed where this
    /// one's DPoP proof was refused (a new nonce, or the server's clock).
    async fn fetch_once(
        &self,
        http: &reqwest::Client,
        url: &url::Url,
        key: Option<&crate::dpop::ProofKey>,
    ) -> (Result<Parsed, FetchError>, bool) {
        match self.request(http, url, key).await {
            Ok((status, headers, body, subject_expires)) => {
                let now_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let retry_after = headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let result = response::parse_as(
                    status,
                    &body,
                    retry_after,
                    now_unix,
                    self.default_lifetime,
                    response::Expect {
                        dpop: self.dpop.is_some(),
                        exchange: self.grant.exchange(),
                    },
                )
                .map(|mut parsed| {
                    // An exchanged token never outlives its subject: it is
                    // renewed, at the latest, before the subject expires.
                    if let Some(until) = subject_expires {
                        let left = until.saturating_duration_since(tokio::time::Instant::now());
                        parsed.lifetime = parsed.lifetime.min(left);
                        *self.subject_used.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
                    }
                    parsed
                });
                let nonce = headers.get("dpop-nonce").map(|v| v.as_bytes());
                let retry = match (&self.dpop, &result) {
                    (
                        Some(dpop),
                        Err(FetchError::Rejected {
                            status: 400 | 401,
                            error: Some(e),
                            ..
                        }),
                    ) => match crate::dpop::Refusal::from_code(e) {
                        Some(why) => dpop.server.refused(
                            why,
                            nonce,
                            headers.get(http::header::DATE).map(|v| v.as_bytes()),
                            &self.profile,
                        ),
                        None => {
                            dpop.server.note_nonce(nonce);
                            false
                        }
                    },
                    (Some(dpop), _) => {
                        dpop.server.note_nonce(nonce);
                        false
                    }
                    (None, _) => false,
                };
                (result, retry)
            }
            Err(e) => (Err(e), false),
        }
    }

    /// Sends the token request: the status, headers and (bounded) body.
    async fn request(
        &self,
        http: &reqwest::Client,
        url: &url::Url,
        key: Option<&crate::dpop::ProofKey>,
    ) -> Result<
        (
            u16,
            reqwest::header::HeaderMap,
            Vec<u8>,
            Option<tokio::time::Instant>,
        ),
        FetchError,
    > {
        let prepared = self
            .grant
            .prepare(url.as_str(), &self.scopes, self.timeout)
            .await?;
        let mut request = http.post(url.clone()).headers(self.headers.clone());
        if let (Some(dpop), Some(key)) = (&self.dpop, key) {
            request = request.header("dpop", self.dpop_proof(dpop, key, url)?);
        }
        // The serializer is not Send: build the body before any await.
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.extend_pairs(self.params.iter());
            for (name, value) in &prepared.params {
                form.append_pair(name, value.expose());
            }
            let secret_error = |e: crate::secret::Error| FetchError::Secret(e.to_string());
            let audience = self.assertion_audience.as_deref().unwrap_or(url.as_str());
            let assertion = match &self.auth {
                ClientAuth::None => {
                    // An unauthenticated client may still say who it is
                    // (RFC 6749 §3.2.1); a Google key file's request has
                    // exactly grant_type and assertion.
                    if !self.client_id.is_empty() && self.grant.scope_in_form() {
                        form.append_pair("client_id", &self.client_id);
                    }
                    None
                }
                ClientAuth::SecretBasic(source) => {
                    let secret = source.read().map_err(secret_error)?;
                    let value = basic_auth(&self.client_id, secret.expose(), self.basic_encoding);
                    request = request.header(AUTHORIZATION, value);
                    None
                }
                ClientAuth::SecretPost(source) => {
                    let secret = source.read().map_err(secret_error)?;
                    form.append_pair("client_id", &self.client_id);
                    form.append_pair("client_secret", secret.expose());
                    None
                }
                ClientAuth::SecretJwt {
                    secret,
                    alg,
                    key_id,
                } => {
                    let secret = secret.read().map_err(secret_error)?;
                    Some(
                        assertion::client_assertion(
                            &self.client_id,
                            audience,
                            Signer::Secret(&secret),
                            *alg,
                            key_id.as_deref(),
                        )
                        .map_err(|e| FetchError::Secret(e.to_string()))?,
                    )
                }
                ClientAuth::PrivateKeyJwt {
                    key_file,
                    alg,
                    key_id,
                } => {
                    let key_error =
                        |e: assertion::KeyError| FetchError::Secret(format!("private key: {e}"));
                    let key = SigningKey::load(key_file).map_err(key_error)?;
                    let alg = key.alg(*alg).map_err(key_error)?;
                    Some(
                        assertion::client_assertion(
                            &self.client_id,
                            audience,
                            Signer::Key(&key),
                            alg,
                            key_id.as_deref(),
                        )
                        .map_err(key_error)?,
                    )
                }
                ClientAuth::ClientAssertion(source) => Some(source.read().map_err(secret_error)?),
                ClientAuth::TlsClientAuth { .. } => {
                    form.append_pair("client_id", &self.client_id);
                    None
                }
            };
            if let Some(assertion) = assertion {
                form.append_pair("client_id", &self.client_id);
                form.append_pair("client_assertion_type", assertion::JWT_BEARER);
                form.append_pair("client_assertion", assertion.expose());
            }
            form.finish()
        };
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = read_body(response, self.timeout).await?;
        Ok((status, headers, body, prepared.subject_expires))
    }

    /// Without the URL: the error reaches 503 bodies, and the app is not
    /// to learn the token endpoint.
    fn transport_error(&self, e: reqwest::Error) -> FetchError {
        transport_error(self.timeout, e)
    }
}

/// A failed exchange with a token endpoint (or a step of one), without the
/// URL: the error reaches 503 bodies, and the app is not to learn it.
pub(super) fn transport_error(timeout: Duration, e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout(timeout)
    } else {
        FetchError::Connect(errors::chain(&e.without_url()))
    }
}

/// A response body, refused past [`MAX_BODY`].
pub(super) async fn read_body(
    response: reqwest::Response,
    timeout: Duration,
) -> Result<Vec<u8>, FetchError> {
    read_bounded(response, MAX_BODY).await.map_err(|e| match e {
        ReadError::TooLarge => {
            FetchError::InvalidResponse(format!("body larger than {MAX_BODY} bytes"))
        }
        ReadError::Transport(e) if e.is_timeout() => FetchError::Timeout(timeout),
        ReadError::Transport(e) => FetchError::Interrupted(errors::chain(&e.without_url())),
    })
}

/// A `Retry-After` value (RFC 9110 §10.2.3): delay-seconds, or an HTTP
/// date (IMF-fixdate, or the obsolete forms RFC 9110 §5.6.7 says to accept)
/// taken relative to `now` (a date already past is no delay). Anything else
/// is ignored, as if the header were absent.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits to fit is still "a long time"; the caller caps it.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The metadata URLs to try for `issuer`: RFC 8414 first (the well-known
/// segment goes between host and path), then OpenID Connect Discovery.
pub fn discovery_urls(issuer: &url::Url) -> Vec<url::Url> {
    let path = issuer.path().trim_end_matches('/');
    let mut rfc8414 = issuer.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    for u in [&mut rfc8414, &mut oidc] {
        u.set_query(None);
        u.set_fragment(None);
    }
    vec![rfc8414, oidc]
}

/// Finds the token endpoint of `issuer`. The document's `issuer` must be
/// the configured one (RFC 8414 §3.3), and its token endpoint https.
async fn discover(http: &reqwest::Client, issuer: &url::Url) -> Result<url::Url, FetchError> {
    let mut tried = Vec::new();
    for url in discovery_urls(issuer) {
        let response = match http
            .get(url.clone())
            .header(ACCEPT, "application/json")
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tried.push(format!(
                    "{}: {}",
                    url.path(),
                    errors::chain(&e.without_url())
                ));
                continue;
            }
        };
        let status = response.status();
        let body = match read_bounded(response, MAX_BODY).await {
            Ok(b) => b,
            Err(_) => {
                tried.push(format!("{}: unreadable body", url.path()));
                continue;
            }
        };
        if !status.is_success() {
            tried.push(format!("{}: HTTP {}", url.path(), status.as_u16()));
            continue;
        }
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| FetchError::Discovery(format!("{} is not JSON", url.path())))?;
        let found = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or("");
        if found.trim_end_matches('/') != issuer.as_str().trim_end_matches('/') {
            return Err(FetchError::Discovery(format!(
                "{} names issuer {:?}, not the configured one",
                url.path(),
                found.chars().take(200).collect::<String>()
            )));
        }
        let endpoint = doc
            .get("token_endpoint")
            .and_then(|v| v.as_str())
            .and_then(|s| url::Url::parse(s).ok())
            .filter(|u| u.scheme() == "https")
            .ok_or_else(|| {
                FetchError::Discovery(format!("{} has no https token_endpoint", url.path()))
            })?;
        return Ok(endpoint);
    }
    Err(FetchError::Discovery(format!(
        "no metadata found ({})",
        tried.join("; ")
    )))
}

/// `Basic base64(id:secret)`, with id and secret form-url-encoded first
/// unless the profile asks for the raw form. Marked sensitive.
pub fn basic_auth(id: &str, secret: &str, encoding: BasicEncoding) -> HeaderValue {
    let plain = Zeroizing::new(match encoding {
        BasicEncoding::Form => format!(
            "{}:{}",
            form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>(),
            Zeroizing::new(form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>())
                .as_str()
        ),
        BasicEncoding::Raw => format!("{id}:{secret}"),
    });
    let encoded = Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(plain.as_bytes())
    ));
    // Base64 output is always a valid header value.
    let mut value = HeaderValue::from_str(&encoded).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

enum ReadError {
    TooLarge,
    Transport(reqwest::Error),
}

async fn read_bounded(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, ReadError> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > max {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(v: &HeaderValue) -> String {
        let b64 = v.to_str().unwrap().strip_prefix("Basic ").unwrap();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn basic_auth_form_encodes_per_rfc6749() {
        let v = basic_auth("my client", "a:b+c%d/e&f g", BasicEncoding::Form);
        assert!(v.is_sensitive());
        assert_eq!(decode(&v), "my+client:a%3Ab%2Bc%25d%2Fe%26f+g");
    }

    #[test]
    fn discovery_urls_follow_rfc8414_then_oidc() {
        let urls = |i: &str| -> Vec<String> {
            discovery_urls(&url::Url::parse(i).unwrap())
                .into_iter()
                .map(|u| u.to_string())
                .collect()
        };
        assert_eq!(
            urls("https://idp.test"),
            vec![
                "https://idp.test/.well-known/oauth-authorization-server",
                "https://idp.test/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            urls("https://idp.test/realms/x/"),
            vec![
                "https://idp.test/.well-known/oauth-authorization-server/realms/x",
                "https://idp.test/realms/x/.well-known/openid-configuration"
            ]
        );
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        // 2026-11-26T02:00:00Z
        let now = UNIX_EPOCH + Duration::from_secs(1_795_658_400);
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            (" 7 ", Some(7)),
            ("99999999999999999999999", Some(u64::MAX)),
            ("Thu, 26 Nov 2026 02:00:30 GMT", Some(30)),
            ("Sat, 28 Nov 2026 02:00:00 GMT", Some(2 * 86_400)),
            ("Fri, 01 Jan 2027 00:00:00 GMT", Some(3_103_200)),
            ("Thu, 26 Nov 2026 01:00:00 GMT", Some(0)), // past: no delay
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(0)),
            ("", None),
            ("-5", None),
            ("1.5", None),
            ("soon", None),
            ("Thu, 26 Nov 2026 02:00:30 UTC", None),
            // RFC 850's obsolete form, which recipients must still accept.
            ("Thursday, 26-Nov-26 02:00:30 GMT", Some(30)),
            ("Thu, 26 Foo 2026 02:00:30 GMT", None),
            ("Thu, 26 Nov 2026 25:00:30 GMT", None),
            ("Thu, 26 Nov 2026 02:00 GMT", None),
            ("Thu, 99 Nov 2026 02:00:30 GMT", None),
            ("Thu, +1 Nov 2026 02:00:30 GMT", None),
        ];
        for (value, want) in cases {
            assert_eq!(
                parse_retry_after(value, now),
                want.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    #[test]
    fn basic_auth_raw_keeps_bytes() {
        let v = basic_auth("id", "a:b+c", BasicEncoding::Raw);
        assert_eq!(decode(&v), "id:a:b+c");
    }
}
