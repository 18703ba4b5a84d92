//! Private keys and the JWS algorithms they sign with: a PEM key file is
//! read and parsed ([`SigningKey::load`]), and [`SigningKey::alg`] says
//! whether a `signing_alg` fits it. Config validation uses this to check a
//! `private_key_file` at load, `token::assertion` to sign with it; neither
//! depends on the other. Nothing here depends on the rest of the crate.

use std::fmt;
use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use zeroize::Zeroizing;

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

    /// Parses a PEM key held in memory (`shown` names where it came from,
    /// for errors: a file and a field, never the key).
    pub fn from_pem(pem: &[u8], shown: &str) -> Result<Self, KeyError> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| KeyError::NoKey {
            path: shown.to_owned(),
        })?;
        Self::from_der(&der).map_err(|reason| KeyError::Unsupported {
            path: shown.to_owned(),
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

    /// Signs `msg` with `alg`, which [`SigningKey::alg`] has checked fits.
    pub(crate) fn sign(&self, alg: Alg, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_must_fit_the_key() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), kp.serialize_pem()).unwrap();
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
