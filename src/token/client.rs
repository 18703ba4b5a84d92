//! The token request of one profile: client credentials grant, with the
//! profile's client authentication, over its own TLS trust.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};
use zeroize::Zeroizing;

use crate::config::{BasicEncoding, ClientAuth, Profile};

use super::response::{self, FetchError, Parsed};

/// Token responses larger than this are refused without reading further.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    url: url::Url,
    client_id: String,
    auth: ClientAuth,
    basic_encoding: BasicEncoding,
    /// The form parameters that do not change between requests.
    params: Vec<(String, String)>,
    headers: HeaderMap,
    timeout: Duration,
    default_lifetime: Duration,
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

impl Client {
    pub fn new(
        profile: &Profile,
        timeout: Duration,
        default_lifetime: Duration,
    ) -> Result<Self, BuildError> {
        let tls = crate::tls::client_config(profile.ca_file.as_deref(), &[b"http/1.1"]).map_err(
            |source| BuildError::Tls {
                profile: profile.name.clone(),
                source,
            },
        )?;
        let http = reqwest::Client::builder()
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
            .map_err(|source| BuildError::Http {
                profile: profile.name.clone(),
                source,
            })?;
        let mut params = vec![("grant_type".to_owned(), "client_credentials".to_owned())];
        if !profile.scopes.is_empty() {
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
            http,
            url: profile.token_url.clone(),
            client_id: profile.client_id.clone(),
            auth: profile.auth.clone(),
            basic_encoding: profile.basic_encoding,
            params,
            headers,
            timeout,
            default_lifetime,
        })
    }

    /// Makes one token request. Secrets are read now, so a rotated file is
    /// used at once; nothing secret reaches the error.
    pub async fn fetch(&self) -> Result<Parsed, FetchError> {
        let mut request = self
            .http
            .post(self.url.clone())
            .headers(self.headers.clone());
        // The serializer is not Send: build the body before any await.
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.extend_pairs(self.params.iter());
            match &self.auth {
                ClientAuth::SecretBasic(source) => {
                    let secret = source
                        .read()
                        .map_err(|e| FetchError::Secret(e.to_string()))?;
                    let value = basic_auth(&self.client_id, secret.expose(), self.basic_encoding);
                    request = request.header(AUTHORIZATION, value);
                }
                ClientAuth::SecretPost(source) => {
                    let secret = source
                        .read()
                        .map_err(|e| FetchError::Secret(e.to_string()))?;
                    form.append_pair("client_id", &self.client_id);
                    form.append_pair("client_secret", secret.expose());
                }
            }
            form.finish()
        };
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_bounded(response, MAX_BODY)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => {
                    FetchError::InvalidResponse(format!("body larger than {MAX_BODY} bytes"))
                }
                ReadError::Transport(e) => self.transport_error(e),
            })?;
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        response::parse(status, &body, retry_after, now_unix, self.default_lifetime)
    }

    /// Without the URL: the error reaches 503 bodies, and the app is not
    /// to learn the token endpoint.
    fn transport_error(&self, e: reqwest::Error) -> FetchError {
        if e.is_timeout() {
            FetchError::Timeout(self.timeout)
        } else {
            FetchError::Connect(error_chain(&e.without_url()))
        }
    }
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

/// An error and its sources on one line: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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
    fn basic_auth_raw_keeps_bytes() {
        let v = basic_auth("id", "a:b+c", BasicEncoding::Raw);
        assert_eq!(decode(&v), "id:a:b+c");
    }
}
