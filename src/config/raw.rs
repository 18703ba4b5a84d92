//! The serde mirror of the TOML file: every key the spec names, all optional,
//! unknown keys refused. Nothing here is trusted; `super::validate` turns it
//! into the typed [`super::Config`].

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub tokens: RawTokens,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    pub cache: Option<RawCache>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub redis_url: Option<String>,
    pub sentinels: Option<Vec<String>>,
    pub master_name: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    pub encryption_key_file: Option<String>,
    pub key_prefix: Option<String>,
    pub operation_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub listen: Option<String>,
    pub unmatched: Option<String>,
    pub connect_allow: Option<Vec<String>>,
    pub drain_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub tunnel_idle_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub max_header_bytes: Option<u64>,
    pub max_headers: Option<u64>,
    pub max_connections: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub allow_remote: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub request_timeout: Option<String>,
    pub default_lifetime: Option<String>,
    pub refresh_fraction: Option<f64>,
    pub refresh_margin: Option<String>,
    pub expiry_skew: Option<String>,
    pub retry_initial: Option<String>,
    pub retry_max: Option<String>,
    pub retry_max_without_token: Option<String>,
    pub unauthorized_refresh_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub connect_timeout: Option<String>,
    pub tls_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
    pub body_idle_timeout: Option<String>,
    pub replay_buffer: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub read_buffer_bytes: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub grant: Option<String>,
    pub cache: Option<String>,
    pub credential_file: Option<String>,
    pub dpop: Option<bool>,
    pub dpop_key_file: Option<String>,
    pub dpop_alg: Option<String>,
    pub google_credentials_file: Option<String>,
    pub assertion_issuer: Option<String>,
    pub assertion_subject: Option<String>,
    pub assertion_file: Option<String>,
    pub subject_token_file: Option<String>,
    pub subject_profile: Option<String>,
    pub subject_token_type: Option<String>,
    pub actor_token_file: Option<String>,
    pub actor_token_type: Option<String>,
    pub requested_token_type: Option<String>,
    pub token_url: Option<String>,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<String>,
    pub client_secret_env: Option<String>,
    pub auth_method: Option<String>,
    pub private_key_file: Option<String>,
    pub key_id: Option<String>,
    pub signing_alg: Option<String>,
    pub assertion_audience: Option<String>,
    pub client_assertion_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub audience: Option<String>,
    pub resources: Option<Vec<String>>,
    pub ca_file: Option<String>,
    pub extra_params: Option<BTreeMap<String, String>>,
    pub token_headers: Option<BTreeMap<String, String>>,
    pub basic_encoding: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub host: Option<String>,
    pub upstream: Option<String>,
    pub profile: Option<String>,
    pub listen: Option<String>,
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    pub upstream_protocol: Option<String>,
    pub allow_connect: Option<bool>,
    pub header: Option<String>,
    pub prefix: Option<String>,
}
