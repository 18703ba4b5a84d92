//! What a shared entry is called and what it holds.
//!
//! The name is an HMAC of what makes two profiles interchangeable (token
//! endpoint, client, auth method, scopes, audience, resources, extra
//! params, token endpoint headers; never a secret), keyed by the encryption
//! key, so identical
//! profiles on every replica meet at one name and someone who reads Redis
//! without the key cannot even confirm a guess of the client id.
//!
//! The value is `0x01 | nonce (12) | AES-256-GCM(issued_ms | lifetime_ms |
//! token)` with the entry's full name as associated data, so an entry
//! copied under another name does not open.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::config::{ClientAuth, Endpoint, Profile};
use crate::secret::Secret;

const VERSION: u8 = 1;
const HEADER: usize = 1 + NONCE_LEN;
const TIMES: usize = 16;

/// The keys derived from `cache.encryption_key_file`. Debug shows nothing.
pub struct Keys {
    aead: LessSafeKey,
    names: hmac::Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys([redacted])")
    }
}

/// A token read back from an entry.
#[derive(Debug)]
pub struct Opened {
    pub token: Secret,
    pub issued: SystemTime,
    pub lifetime: Duration,
}

/// Why an entry's value could not be used. Says nothing of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Undecryptable {
    #[error("the entry is too short or of an unknown version")]
    Malformed,
    #[error("the entry does not open with this key under this name")]
    Unauthentic,
    #[error("the entry's token is not a valid header value")]
    BadToken,
}

impl Keys {
    pub fn new(key: &[u8; 32]) -> Self {
        // The entry names use a key of their own, derived one way from the
        // encryption key, so the two uses never share a key.
        let derive = hmac::Key::new(hmac::HMAC_SHA256, key);
        let names_key = Zeroizing::new(
            hmac::sign(&derive, b"token-injector entry names v1")
                .as_ref()
                .to_vec(),
        );
        Self {
            aead: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"),
            ),
            names: hmac::Key::new(hmac::HMAC_SHA256, &names_key),
            rng: SystemRandom::new(),
        }
    }

    /// The id of `profile`'s entry: 32 hex digits. `binding` is what a
    /// token is bound to beyond the profile (the client certificate of
    /// `tls_client_auth`, whose tokens only that certificate can use);
    /// empty for none.
    pub fn entry_id(&self, profile: &Profile, binding: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.names);
        ctx.update(identity(profile).as_bytes());
        ctx.update(binding);
        let tag = ctx.sign();
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Encrypts `token` for the entry called `name`.
    pub fn seal(&self, name: &str, issued: SystemTime, lifetime: Duration, token: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        // The system RNG does not fail on Linux; a zero nonce would be unsafe,
        // so a failure stops the write instead of sealing.
        self.rng.fill(&mut nonce).expect("system random source");
        let issued_ms = issued
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut out = Vec::with_capacity(HEADER + TIMES + token.len() + AES_256_GCM.tag_len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&issued_ms.to_be_bytes());
        out.extend_from_slice(&(lifetime.as_millis() as u64).to_be_bytes());
        out.extend_from_slice(token.as_bytes());
        let mut body = Zeroizing::new(out.split_off(HEADER));
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut *body,
            )
            .expect("sealing fits in memory");
        out.extend_from_slice(&body);
        out
    }

    /// Decrypts the entry called `name`.
    pub fn open(&self, name: &str, value: &[u8]) -> Result<Opened, Undecryptable> {
        if value.len() < HEADER + TIMES + AES_256_GCM.tag_len() || value[0] != VERSION {
            return Err(Undecryptable::Malformed);
        }
        let nonce = Nonce::try_assume_unique_for_key(&value[1..HEADER])
            .map_err(|_| Undecryptable::Malformed)?;
        let mut body = Zeroizing::new(value[HEADER..].to_vec());
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| Undecryptable::Unauthentic)?;
        let issued_ms = u64::from_be_bytes(plain[..8].try_into().expect("8 bytes"));
        let lifetime_ms = u64::from_be_bytes(plain[8..16].try_into().expect("8 bytes"));
        let token = std::str::from_utf8(&plain[16..]).map_err(|_| Undecryptable::BadToken)?;
        if token.is_empty() || http::HeaderValue::from_str(token).is_err() {
            return Err(Undecryptable::BadToken);
        }
        Ok(Opened {
            token: Secret::new(token.to_owned()),
            issued: UNIX_EPOCH + Duration::from_millis(issued_ms),
            lifetime: Duration::from_millis(lifetime_ms),
        })
    }
}

/// What makes two profiles' tokens interchangeable, as one unambiguous
/// string (JSON). Lists whose order does not matter are sorted.
fn identity(p: &Profile) -> String {
    let endpoint = match &p.endpoint {
        Endpoint::TokenUrl(u) => ("token_url", u.as_str()),
        Endpoint::Issuer(u) => ("issuer", u.as_str()),
    };
    let method = match &p.auth {
        ClientAuth::SecretBasic(_) => "client_secret_basic",
        ClientAuth::SecretPost(_) => "client_secret_post",
        ClientAuth::SecretJwt { .. } => "client_secret_jwt",
        ClientAuth::PrivateKeyJwt { .. } => "private_key_jwt",
        ClientAuth::ClientAssertion(_) => "client_assertion",
        ClientAuth::TlsClientAuth { .. } => "tls_client_auth",
        ClientAuth::None => "none",
    };
    let mut scopes = p.scopes.clone();
    scopes.sort();
    scopes.dedup();
    let mut resources = p.resources.clone();
    resources.sort();
    let mut extra = p.extra_params.clone();
    extra.sort();
    // Headers sent to the token endpoint can select a tenant or a key; the
    // name is an HMAC, so a secret among them is not exposed by it.
    let mut headers: Vec<(&str, &[u8])> = p
        .token_headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    headers.sort();
    let mut id = serde_json::json!([
        "v1",
        endpoint,
        p.client_id,
        method,
        scopes,
        p.audience,
        resources,
        extra,
        headers
    ]);
    // Another grant gets another token for the same client: its settings
    // (files by path, issuer, subject, token types; never a secret) are
    // part of the name. Client credentials keep the names they had.
    if let (Some(grant), Some(a)) = (grant_identity(&p.grant), id.as_array_mut()) {
        a.push(grant);
    }
    id.to_string()
}

/// A grant's part of the name, spelled out so that it stays the same from
/// one version to the next; `None` for client credentials.
fn grant_identity(grant: &crate::config::Grant) -> Option<serde_json::Value> {
    use crate::config::{Assertion, Grant, Subject};
    use serde_json::json;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    Some(match grant {
        Grant::ClientCredentials => return None,
        Grant::JwtBearer(Assertion::Signed {
            key_file,
            alg,
            key_id,
            issuer,
            subject,
            audience,
        }) => json!([
            "jwt_bearer",
            "signed",
            path(key_file),
            alg.map(|a| a.as_str()),
            key_id,
            issuer,
            subject,
            audience
        ]),
        Grant::JwtBearer(Assertion::File(f)) => json!(["jwt_bearer", "file", path(f)]),
        Grant::JwtBearer(Assertion::Google(f)) => json!(["jwt_bearer", "google", path(f)]),
        Grant::GoogleFederation(f) => json!(["google_federation", path(f)]),
        Grant::TokenExchange(x) => {
            let subject = match &x.subject {
                Subject::File(f) => json!(["file", path(f)]),
                Subject::Profile(name) => json!(["profile", name]),
            };
            json!([
                "token_exchange",
                subject,
                x.subject_token_type,
                x.actor.as_ref().map(|(f, t)| json!([path(f), t])),
                x.requested_token_type
            ])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(text: &str) -> Profile {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "secret").unwrap();
        let config = crate::config::from_text(
            &format!(
                "[profiles.p]\ntoken_url = \"https://as.example/token\"\nclient_id = \"c\"\nclient_secret_file = \"s\"\n{text}\n\
                 [[routes]]\nhost = \"api.example\"\nprofile = \"p\"\n"
            ),
            dir.path(),
            std::iter::empty(),
        )
        .unwrap();
        config.profiles["p"].clone()
    }

    #[test]
    fn names_follow_what_makes_profiles_interchangeable() {
        let keys = Keys::new(&[7; 32]);
        let base = keys.entry_id(&profile("scopes = [\"a\", \"b\"]"), &[]);
        assert_eq!(base.len(), 32);
        // Same profile, scopes in another order: the same entry.
        assert_eq!(
            base,
            keys.entry_id(&profile("scopes = [\"b\", \"a\"]"), &[])
        );
        // Bound to another client certificate: another entry.
        assert_ne!(
            base,
            keys.entry_id(&profile("scopes = [\"a\", \"b\"]"), b"cert")
        );
        // A changed scope, audience or extra param: another entry.
        for other in [
            "scopes = [\"a\"]",
            "scopes = [\"a\", \"b\"]\naudience = \"x\"",
            "scopes = [\"a\", \"b\"]\nextra_params = { tenant = \"t\" }",
            "scopes = [\"a\", \"b\"]\nauth_method = \"client_secret_post\"",
            "scopes = [\"a\", \"b\"]\ntoken_headers = { x-tenant = \"t\" }",
        ] {
            assert_ne!(base, keys.entry_id(&profile(other), &[]), "{other}");
        }
        // Another key: another name, so a rotation never meets old entries.
        assert_ne!(
            base,
            Keys::new(&[8; 32]).entry_id(&profile("scopes = [\"a\", \"b\"]"), &[])
        );
    }

    #[test]
    fn other_grants_have_names_of_their_own() {
        let keys = Keys::new(&[7; 32]);
        let base = keys.entry_id(&profile(""), &[]);
        let exchange = |t: &str| {
            profile(&format!(
                "grant = \"token_exchange\"\nsubject_token_file = \"s\"\nsubject_token_type = \"urn:ietf:params:oauth:token-type:{t}\""
            ))
        };
        let (jwt, access) = (exchange("jwt"), exchange("access_token"));
        let ids = [
            keys.entry_id(&jwt, &[]),
            keys.entry_id(&access, &[]),
            keys.entry_id(
                &profile("grant = \"jwt_bearer\"\nassertion_file = \"s\""),
                &[],
            ),
        ];
        for id in &ids {
            assert_ne!(*id, base);
        }
        assert_ne!(ids[0], ids[1], "another subject token type");
        // Spelled out, not Debug: the names do not follow the code's types.
        assert!(!identity(&jwt).contains("TokenExchange"));
        assert!(identity(&jwt).contains("urn:ietf:params:oauth:token-type:jwt"));
    }

    #[test]
    fn sealed_entries_open_only_under_their_name_and_key() {
        let keys = Keys::new(&[1; 32]);
        let issued = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let value = keys.seal("p:token:a", issued, Duration::from_secs(60), "tok.en");
        assert!(!value.windows(6).any(|w| w == b"tok.en"), "no plaintext");
        let opened = keys.open("p:token:a", &value).unwrap();
        assert_eq!(opened.token.expose(), "tok.en");
        assert_eq!(opened.issued, issued);
        assert_eq!(opened.lifetime, Duration::from_secs(60));
        // Another name (a replayed entry), another key, a flipped bit, a
        // truncation, garbage: refused, and nothing panics.
        assert_eq!(
            keys.open("p:token:b", &value).unwrap_err(),
            Undecryptable::Unauthentic
        );
        assert_eq!(
            Keys::new(&[2; 32]).open("p:token:a", &value).unwrap_err(),
            Undecryptable::Unauthentic
        );
        let mut flipped = value.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(keys.open("p:token:a", &flipped).is_err());
        for n in 0..value.len() {
            assert!(keys.open("p:token:a", &value[..n]).is_err());
        }
        assert_eq!(
            keys.open("p:token:a", b"garbage").unwrap_err(),
            Undecryptable::Malformed
        );
        // Two seals of one token differ (fresh nonces).
        assert_ne!(
            value,
            keys.seal("p:token:a", issued, Duration::from_secs(60), "tok.en")
        );
    }
}
