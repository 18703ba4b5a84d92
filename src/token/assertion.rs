//! JWT client assertions (RFC 7523 §2.2, OIDC Core §9): `private_key_jwt`
//! signed with the client's key, `client_secret_jwt` with an HMAC of the
//! client secret. Signing uses ring, the same crypto as TLS; a JWS compact
//! serialisation is three base64url parts and needs no more.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};

use crate::secret::Secret;

/// The keys and algorithms live in [`crate::keys`], which config validation
/// also uses; they are named here too, where assertions are made.
pub use crate::keys::{Alg, KeyError, SigningKey};

/// The `client_assertion_type` of every JWT client assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Assertions live this long: long enough for clock skew, short enough that
/// a leaked one is soon useless.
const LIFETIME_SECS: u64 = 60;

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
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
    });
    jwt(claims, LIFETIME_SECS, signer, alg, key_id)
}

/// Signs `claims` plus `iat`, `exp` (`lifetime` seconds later) and a fresh
/// random `jti` as a compact JWS (`typ` JWT, `kid` when given).
pub fn jwt(
    mut claims: serde_json::Value,
    lifetime: u64,
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
    claims["jti"] = B64.encode(jti).into();
    claims["iat"] = now.into();
    claims["exp"] = (now + lifetime).into();
    let mut header = serde_json::json!({ "alg": alg.as_str(), "typ": "JWT" });
    if let Some(kid) = key_id {
        header["kid"] = kid.into();
    }
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
    use ring::signature::{self, EcdsaKeyPair, KeyPair};

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
}
