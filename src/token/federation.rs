//! Google workload identity federation, as an `external_account` file
//! describes it: the workload's own token (a projected ServiceAccount
//! token, read from a file or a URL at each request) is exchanged at
//! Google's STS (RFC 8693-shaped), and when the file names a service
//! account to impersonate, the STS token buys that account's access token
//! from the IAM credentials API (`generateAccessToken`). A failure names
//! its step.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::google::{CredentialSource, ExternalAccount, Format};
use crate::secret::Secret;

use super::client::{read_body, transport_error};
use super::grant::TOKEN_EXCHANGE;
use super::response::{self, Expect, FetchError, Parsed};

const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The scope the STS token needs to impersonate (Google's documentation).
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// One federated token request.
pub struct Steps<'a> {
    pub http: &'a reqwest::Client,
    /// The STS endpoint: the file's `token_url`, or the profile's.
    pub sts_url: &'a url::Url,
    pub file: &'a Path,
    /// The profile's scopes, space-joined.
    pub scopes: &'a str,
    pub timeout: Duration,
    pub default_lifetime: Duration,
}

fn step(step: &'static str) -> impl Fn(FetchError) -> FetchError {
    move |e| FetchError::Step {
        step,
        source: Box::new(e),
    }
}

impl Steps<'_> {
    pub async fn fetch(&self) -> Result<Parsed, FetchError> {
        // Read at every request: a rotated file is used at once.
        let x = crate::google::external_account(self.file)
            .map_err(|e| FetchError::Secret(format!("google_credentials_file: {e}")))?;
        let subject = self
            .subject_token(&x.source)
            .await
            .map_err(step("reading the workload's token"))?;
        let sts = self
            .exchange(&x, &subject)
            .await
            .map_err(step("STS exchange"))?;
        match &x.impersonation_url {
            None => Ok(sts),
            Some(url) => self
                .impersonate(url, &sts.access_token, x.lifetime)
                .await
                .map_err(step("service account impersonation")),
        }
    }

    async fn subject_token(&self, source: &CredentialSource) -> Result<Secret, FetchError> {
        let (raw, format) = match source {
            CredentialSource::File { path, format } => {
                let raw = crate::secret::Source::File(path.clone())
                    .read()
                    .map_err(|e| FetchError::Secret(format!("credential_source file: {e}")))?;
                (raw, format)
            }
            CredentialSource::Url {
                url,
                headers,
                format,
            } => {
                let mut request = self.http.get(url.clone());
                for (name, value) in headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let response = request
                    .send()
                    .await
                    .map_err(|e| transport_error(self.timeout, e))?;
                let status = response.status().as_u16();
                let body = read_body(response, self.timeout).await?;
                if !(200..300).contains(&status) {
                    return Err(FetchError::Rejected {
                        status,
                        error: None,
                        description: Some("credential_source url".into()),
                        retry_after: None,
                    });
                }
                let text = String::from_utf8(body).map_err(|_| {
                    FetchError::InvalidResponse("credential_source url: not UTF-8".into())
                })?;
                (Secret::new(text.trim().to_owned()), format)
            }
        };
        match format {
            Format::Text => Ok(raw),
            Format::Json(field) => serde_json::from_str::<serde_json::Value>(raw.expose())
                .ok()
                .and_then(|v| Some(Secret::new(v.get(field)?.as_str()?.to_owned())))
                .ok_or_else(|| {
                    FetchError::InvalidResponse(format!(
                        "credential_source: no string field {field:?} in its JSON"
                    ))
                }),
        }
    }

    /// Google's STS token exchange (documented form, no client
    /// authentication).
    async fn exchange(&self, x: &ExternalAccount, subject: &Secret) -> Result<Parsed, FetchError> {
        // To impersonate, the STS token needs cloud-platform; otherwise
        // it is the token the API gets, with the profile's scopes.
        // Google's STS wants a scope; cloud-platform, as Google's own
        // libraries default to, when the profile has none.
        let scope = if x.impersonation_url.is_some() || self.scopes.is_empty() {
            CLOUD_PLATFORM
        } else {
            self.scopes
        };
        // The serializer is not Send: finished before any await.
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", TOKEN_EXCHANGE)
                .append_pair("audience", &x.audience)
                .append_pair("requested_token_type", ACCESS_TOKEN)
                .append_pair("subject_token", subject.expose())
                .append_pair("subject_token_type", &x.subject_token_type);
            form.append_pair("scope", scope);
            form.finish()
        };
        let response = self
            .http
            .post(self.sts_url.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| transport_error(self.timeout, e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| super::client::parse_retry_after(v, SystemTime::now()));
        let body = read_body(response, self.timeout).await?;
        response::parse_as(
            status,
            &body,
            retry_after,
            now_unix(),
            self.default_lifetime,
            Expect {
                dpop: false,
                exchange: Some(Some(ACCESS_TOKEN)),
            },
        )
    }

    /// `generateAccessToken` with the STS token as bearer.
    async fn impersonate(
        &self,
        url: &url::Url,
        sts_token: &Secret,
        lifetime: Duration,
    ) -> Result<Parsed, FetchError> {
        let scopes: Vec<&str> = if self.scopes.is_empty() {
            vec![CLOUD_PLATFORM]
        } else {
            self.scopes.split(' ').collect()
        };
        let body = serde_json::json!({
            "scope": scopes,
            "lifetime": format!("{}s", lifetime.as_secs()),
        });
        let mut bearer = http::HeaderValue::from_str(&format!("Bearer {}", sts_token.expose()))
            .map_err(|_| {
                FetchError::InvalidResponse("the STS token is not a header value".into())
            })?;
        bearer.set_sensitive(true);
        let response = self
            .http
            .post(url.clone())
            .header("authorization", bearer)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| transport_error(self.timeout, e))?;
        let status = response.status().as_u16();
        let body = read_body(response, self.timeout).await?;
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !(200..300).contains(&status) {
            // Google's error shape: {"error": {"code", "message", "status"}}.
            let error = json.as_ref().and_then(|j| j.get("error"));
            let text = |k: &str| {
                error
                    .and_then(|e| e.get(k))
                    .and_then(serde_json::Value::as_str)
                    .map(|s| s.chars().filter(|c| !c.is_control()).take(200).collect())
            };
            return Err(FetchError::Rejected {
                status,
                error: text("status"),
                description: text("message"),
                retry_after: None,
            });
        }
        let field = |k: &str| json.as_ref()?.get(k)?.as_str().map(str::to_owned);
        let token = field("accessToken")
            .filter(|t| !t.is_empty() && t.bytes().all(|b| (0x21..=0x7e).contains(&b)))
            .ok_or_else(|| FetchError::InvalidResponse("no usable accessToken".into()))?;
        let expires = field("expireTime")
            .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
            .ok_or_else(|| {
                FetchError::InvalidResponse("expireTime is missing or not RFC 3339".into())
            })?;
        let lifetime = expires
            .duration_since(SystemTime::now())
            .map_err(|_| FetchError::InvalidResponse("expireTime is already past".into()))?
            .min(response::MAX_LIFETIME);
        Ok(Parsed {
            access_token: Secret::new(token),
            lifetime,
            scope: None,
            issued: None,
            dpop: None,
        })
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
