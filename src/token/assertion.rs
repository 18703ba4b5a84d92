//! JWT client assertions (RFC 7523 §2.2, OIDC Core §9): `private_key_jwt`
//! signed with the client's key, `client_secret_jwt` with an HMAC of the
//! client secret. Signing uses ring, the same crypto as TLS; a JWS compact
//! serialisation is three base64url parts and needs no more.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// The `client_assertion_type` of every JWT client assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Assertions live this long: long enough for clock skew, short enough that
/// a leaked one is soon useless.
const LIFETIME_SECS: u64 = 60;

/// JWS algorithms we sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    RS256,
    PS256,
    ES256,
    ES384,
    EdDSA,
    HS256,
    HS384,
    HS512,
}

impl Alg {
    pub const ALL: [&'static str; 8] = [
        "RS256", "PS256", "ES256", "ES384", "EdDSA", "HS256", "HS384", "HS512",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Alg::RS256,
            "PS256" => Alg::PS256,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            "HS256" => Alg::HS256,
            "HS384" => Alg::HS384,
            "HS512" => Alg::HS512,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::PS256 => "PS256",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::EdDSA => "EdDSA",
            Alg::HS256 => "HS256",
            Alg::HS384 => "HS384",
            Alg::HS512 => "HS512",
        }
    }

    pub fn is_hmac(self) -> bool {
        matches!(self, Alg::HS256 | Alg::HS384 | Alg::HS512)
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A private key able to sign assertions. Debug names the kind only.
pub enum SigningKey {
    Rsa(RsaKeyPair),
    P256(EcdsaKeyPair),
    P384(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.kind())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM private key (expected PKCS#8, PKCS#1 RSA or SEC1 EC)")]
    NoKey { path: String },
    #[error(
        "{path}: unsupported or invalid key: {reason}; expected RSA, EC P-256/P-384 or Ed25519"
    )]
    Unsupported { path: String, reason: String },
    #[error("signing_alg {alg} does not fit a {kind} key; use one of {allowed}")]
    AlgMismatch {
        alg: Alg,
        kind: &'static str,
        allowed: String,
    },
    #[error("signing failed")]
    Sign,
}

impl SigningKey {
    /// Reads and parses a PEM key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let data = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?);
        let der = PrivateKeyDer::from_pem_slice(&data).map_err(|_| KeyError::NoKey {
            path: shown.clone(),
        })?;
        Self::from_der(&der).map_err(|reason| KeyError::Unsupported {
            path: shown,
            reason,
        })
    }

    fn from_der(der: &PrivateKeyDer<'_>) -> Result<Self, String> {
        match der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der())
                .map(SigningKey::Rsa)
                .map_err(|e| e.to_string()),
            PrivateKeyDer::Sec1(k) => {
                let sec1 = k.secret_sec1_der();
                let rng = SystemRandom::new();
                // ring reads EC keys from PKCS#8: wrap the SEC1 key, trying each curve.
                for (oid, alg, p384) in [
                    (OID_P256, &signature::ECDSA_P256_SHA256_FIXED_SIGNING, false),
                    (OID_P384, &signature::ECDSA_P384_SHA384_FIXED_SIGNING, true),
                ] {
                    let pkcs8 = Zeroizing::new(sec1_to_pkcs8(sec1, oid));
                    if let Ok(k) = EcdsaKeyPair::from_pkcs8(alg, &pkcs8, &rng) {
                        return Ok(if p384 {
                            SigningKey::P384(k)
                        } else {
                            SigningKey::P256(k)
                        });
                    }
                }
                Err("not a P-256 or P-384 EC key with its public key".into())
            }
            PrivateKeyDer::Pkcs8(k) => {
                let pkcs8 = k.secret_pkcs8_der();
                let rng = SystemRandom::new();
                if let Ok(k) = RsaKeyPair::from_pkcs8(pkcs8) {
                    return Ok(SigningKey::Rsa(k));
                }
                if let Ok(k) = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    pkcs8,
                    &rng,
                ) {
                    return Ok(SigningKey::P256(k));
                }
                if let Ok(k) = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                    pkcs8,
                    &rng,
                ) {
                    return Ok(SigningKey::P384(k));
                }
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
                    .map(SigningKey::Ed25519)
                    .map_err(|e| e.to_string())
            }
            _ => Err("unknown private key encoding".into()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SigningKey::Rsa(_) => "RSA",
            SigningKey::P256(_) => "EC P-256",
            SigningKey::P384(_) => "EC P-384",
            SigningKey::Ed25519(_) => "Ed25519",
        }
    }

    fn allowed(&self) -> &'static [Alg] {
        match self {
            SigningKey::Rsa(_) => &[Alg::RS256, Alg::PS256],
            SigningKey::P256(_) => &[Alg::ES256],
            SigningKey::P384(_) => &[Alg::ES384],
            SigningKey::Ed25519(_) => &[Alg::EdDSA],
        }
    }

    /// `wanted`, if this key can sign with it, else the key's default.
    pub fn alg(&self, wanted: Option<Alg>) -> Result<Alg, KeyError> {
        let allowed = self.allowed();
        match wanted {
            None => Ok(allowed[0]),
            Some(a) if allowed.contains(&a) => Ok(a),
            Some(a) => Err(KeyError::AlgMismatch {
                alg: a,
                kind: self.kind(),
                allowed: allowed
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn sign(&self, alg: Alg, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        let rng = SystemRandom::new();
        match self {
            SigningKey::Rsa(k) => {
                let padding: &dyn signature::RsaEncoding = match alg {
                    Alg::PS256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(padding, &rng, msg, &mut sig)
                    .map_err(|_| KeyError::Sign)?;
                Ok(sig)
            }
            SigningKey::P256(k) | SigningKey::P384(k) => k
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Sign),
            SigningKey::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
        }
    }
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// PKCS#8 PrivateKeyInfo around a SEC1 ECPrivateKey (RFC 5208, RFC 5915).
fn sec1_to_pkcs8(sec1: &[u8], curve_oid: &[u8]) -> Vec<u8> {
    let mut algorithm = OID_EC_PUBLIC_KEY.to_vec();
    algorithm.extend_from_slice(curve_oid);
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(der(0x30, &algorithm));
    body.extend(der(0x04, sec1));
    der(0x30, &body)
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// What signs an assertion.
pub enum Signer<'a> {
    Key(&'a SigningKey),
    Secret(&'a Secret),
}

/// Builds a signed client assertion: `iss` = `sub` = the client id, `aud`
/// as given, a fresh random `jti`, `iat`, and an `exp` one minute later.
pub fn client_assertion(
    client_id: &str,
    audience: &str,
    signer: Signer<'_>,
    alg: Alg,
    key_id: Option<&str>,
) -> Result<Secret, KeyError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut jti = [0u8; 16];
    SystemRandom::new()
        .fill(&mut jti)
        .map_err(|_| KeyError::Sign)?;
    let mut header = serde_json::json!({ "alg": alg.as_str(), "typ": "JWT" });
    if let Some(kid) = key_id {
        header["kid"] = kid.into();
    }
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": B64.encode(jti),
        "iat": now,
        "exp": now + LIFETIME_SECS,
    });
    let mut jws = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = match signer {
        Signer::Key(key) => key.sign(alg, jws.as_bytes())?,
        Signer::Secret(secret) => {
            let algorithm = match alg {
                Alg::HS384 => ring::hmac::HMAC_SHA384,
                Alg::HS512 => ring::hmac::HMAC_SHA512,
                _ => ring::hmac::HMAC_SHA256,
            };
            let key = ring::hmac::Key::new(algorithm, secret.expose().as_bytes());
            ring::hmac::sign(&key, jws.as_bytes()).as_ref().to_vec()
        }
    };
    jws.push('.');
    jws.push_str(&B64.encode(sig));
    Ok(Secret::new(jws))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn decode_part(jws: &str, i: usize) -> serde_json::Value {
        let part = jws.split('.').nth(i).unwrap();
        serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
    }

    fn verify(jws: &str, alg: &'static dyn signature::VerificationAlgorithm, public: &[u8]) {
        let (msg, sig) = jws.rsplit_once('.').unwrap();
        signature::UnparsedPublicKey::new(alg, public)
            .verify(msg.as_bytes(), &B64.decode(sig).unwrap())
            .expect("signature verifies");
    }

    fn pkcs8_key(alg: &'static rcgen::SignatureAlgorithm) -> (tempfile::NamedTempFile, Vec<u8>) {
        let kp = rcgen::KeyPair::generate_for(alg).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), kp.serialize_pem()).unwrap();
        (file, kp.public_key_raw().to_vec())
    }

    #[test]
    fn ec_and_ed25519_assertions_verify_and_carry_the_claims() {
        for (rc_alg, alg, verify_alg) in [
            (
                &rcgen::PKCS_ECDSA_P256_SHA256,
                Alg::ES256,
                &signature::ECDSA_P256_SHA256_FIXED as &dyn signature::VerificationAlgorithm,
            ),
            (
                &rcgen::PKCS_ECDSA_P384_SHA384,
                Alg::ES384,
                &signature::ECDSA_P384_SHA384_FIXED,
            ),
            (&rcgen::PKCS_ED25519, Alg::EdDSA, &signature::ED25519),
        ] {
            let (file, public) = pkcs8_key(rc_alg);
            let key = SigningKey::load(file.path()).unwrap();
            assert_eq!(key.alg(None).unwrap(), alg);
            let jws = client_assertion(
                "cid",
                "https://idp.test/token",
                Signer::Key(&key),
                alg,
                Some("k1"),
            )
            .unwrap();
            let jws = jws.expose();
            verify(jws, verify_alg, &public);
            let header = decode_part(jws, 0);
            assert_eq!(header["alg"], alg.as_str());
            assert_eq!(header["kid"], "k1");
            let claims = decode_part(jws, 1);
            assert_eq!(claims["iss"], "cid");
            assert_eq!(claims["sub"], "cid");
            assert_eq!(claims["aud"], "https://idp.test/token");
            assert_eq!(
                claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
                60
            );
            assert!(claims["jti"].as_str().unwrap().len() >= 22);
        }
    }

    #[test]
    fn jti_is_fresh_each_time() {
        let (file, _) = pkcs8_key(&rcgen::PKCS_ECDSA_P256_SHA256);
        let key = SigningKey::load(file.path()).unwrap();
        let a = client_assertion("c", "a", Signer::Key(&key), Alg::ES256, None).unwrap();
        let b = client_assertion("c", "a", Signer::Key(&key), Alg::ES256, None).unwrap();
        assert_ne!(
            decode_part(a.expose(), 1)["jti"],
            decode_part(b.expose(), 1)["jti"]
        );
        assert!(decode_part(a.expose(), 0).get("kid").is_none());
    }

    #[test]
    fn hmac_assertion_verifies_with_the_secret() {
        let secret = Secret::new("a-long-client-secret-of-32-bytes!!".into());
        let jws = client_assertion("c", "aud", Signer::Secret(&secret), Alg::HS256, None).unwrap();
        let (msg, sig) = jws.expose().rsplit_once('.').unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose().as_bytes());
        ring::hmac::verify(&key, msg.as_bytes(), &B64.decode(sig).unwrap()).unwrap();
        assert_eq!(decode_part(jws.expose(), 0)["alg"], "HS256");
    }

    #[test]
    fn sec1_ec_keys_are_accepted() {
        // A SEC1 ("BEGIN EC PRIVATE KEY") P-256 key as `openssl ecparam -genkey` writes it.
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = kp.serialize_der();
        // The SEC1 key is the OCTET STRING at the end of the PKCS#8 structure.
        let ring_kp = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &SystemRandom::new(),
        )
        .unwrap();
        let sec1 = extract_sec1(&pkcs8);
        let pem = format!(
            "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(sec1)
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), pem).unwrap();
        let key = SigningKey::load(file.path()).unwrap();
        assert_eq!(key.kind(), "EC P-256");
        let jws = client_assertion("c", "a", Signer::Key(&key), Alg::ES256, None).unwrap();
        verify(
            jws.expose(),
            &signature::ECDSA_P256_SHA256_FIXED,
            ring_kp.public_key().as_ref(),
        );
    }

    /// Splits one DER TLV: (tag, content, rest).
    fn tlv(d: &[u8]) -> (u8, &[u8], &[u8]) {
        let (len, hdr) = match d[1] {
            n if n < 0x80 => (n as usize, 2),
            0x81 => (d[2] as usize, 3),
            0x82 => (((d[2] as usize) << 8) | d[3] as usize, 4),
            _ => panic!("unexpected DER length"),
        };
        (d[0], &d[hdr..hdr + len], &d[hdr + len..])
    }

    /// The privateKey OCTET STRING of a PKCS#8 EC key: the SEC1 key.
    fn extract_sec1(pkcs8: &[u8]) -> Vec<u8> {
        let (_, body, _) = tlv(pkcs8);
        let (_, _, rest) = tlv(body); // version
        let (_, _, rest) = tlv(rest); // algorithm
        let (tag, sec1, _) = tlv(rest);
        assert_eq!(tag, 0x04);
        sec1.to_vec()
    }

    #[test]
    fn alg_must_fit_the_key() {
        let (file, _) = pkcs8_key(&rcgen::PKCS_ECDSA_P256_SHA256);
        let key = SigningKey::load(file.path()).unwrap();
        let e = key.alg(Some(Alg::RS256)).unwrap_err().to_string();
        assert_eq!(
            e,
            "signing_alg RS256 does not fit a EC P-256 key; use one of ES256"
        );
    }

    #[test]
    fn bad_key_files_say_why() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "not a key").unwrap();
        assert!(matches!(
            SigningKey::load(file.path()),
            Err(KeyError::NoKey { .. })
        ));
        assert!(matches!(
            SigningKey::load(Path::new("/nonexistent/key.pem")),
            Err(KeyError::Read { .. })
        ));
        assert!(!format!("{:?}", SigningKey::load(file.path())).contains("not a key"));
    }
}
