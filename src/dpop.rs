//! DPoP proofs (RFC 9449): a key pair whose public half travels in every
//! proof's header, and a proof per request bound to its method and URL
//! (and, at a resource server, to the token by `ath`).
//!
//! Built for the request path: the key is parsed once, the JWS header (with
//! the public JWK) is encoded once, and each proof is written into a
//! caller's reused buffer: one signature and no parsing per request.
//! [`ProfileKey`] is a profile's key over time (generated, or read from
//! `dpop_key_file` and re-read when it changes); [`Server`] is what one
//! server (a token endpoint, an upstream origin) told us about proofs: its
//! nonce and its clock.
//!
//! Nothing here logs; a [`ProofKey`]'s Debug names the algorithm and the
//! key's thumbprint, which is public.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, KeyPair as _};

use crate::keys::{Alg, KeyError, SigningKey};

/// A DPoP key pair with its pre-encoded JWS header.
pub struct ProofKey {
    key: SigningKey,
    alg: Alg,
    /// base64url of `{"typ":"dpop+jwt","alg":…,"jwk":{…}}`.
    header: String,
    /// RFC 7638 thumbprint of the public key (base64url SHA-256), what a
    /// server puts in the token's `cnf.jkt`.
    thumbprint: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofKey")
            .field("alg", &self.alg.as_str())
            .field("jkt", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// The algorithms a DPoP key signs with (`dpop_alg`).
pub const ALGS: [&str; 4] = ["ES256", "EdDSA", "PS256", "RS256"];

impl ProofKey {
    /// A fresh EC P-256 key (ES256), held in memory only.
    pub fn generate() -> Result<Self, KeyError> {
        Self::generate_for(Alg::ES256)
    }

    /// A fresh key for `alg`, held in memory only: EC P-256 for ES256,
    /// Ed25519 for EdDSA. RSA keys are not generated (too slow, and ring
    /// cannot); they come from a file.
    pub fn generate_for(alg: Alg) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        if alg == Alg::EdDSA {
            let pkcs8 =
                signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Sign)?;
            let pair = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .map_err(|_| KeyError::Sign)?;
            return Self::new(SigningKey::Ed25519(pair), Some(Alg::EdDSA));
        }
        if alg != Alg::ES256 {
            return Err(KeyError::AlgMismatch {
                alg,
                kind: "generated",
                allowed: "ES256, EdDSA (an RSA key must come from dpop_key_file)".into(),
            });
        }
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Sign)?;
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .map_err(|_| KeyError::Sign)?;
        Self::new(SigningKey::P256(pair), Some(Alg::ES256))
    }

    /// Wraps a loaded key, checking that `alg` (default: the key's own)
    /// fits it and is one DPoP allows.
    pub fn new(key: SigningKey, alg: Option<Alg>) -> Result<Self, KeyError> {
        let alg = key.alg(alg)?;
        if !ALGS.contains(&alg.as_str()) {
            return Err(KeyError::AlgMismatch {
                alg,
                kind: key.kind(),
                allowed: ALGS.join(", "),
            });
        }
        let jwk = Jwk::of(&key);
        let header = format!(
            r#"{{"typ":"dpop+jwt","alg":"{}","jwk":{}}}"#,
            alg.as_str(),
            jwk.json()
        );
        Ok(Self {
            header: B64.encode(header),
            thumbprint: jwk.thumbprint(),
            key,
            alg,
            rng: SystemRandom::new(),
        })
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The RFC 7638 thumbprint of the public key (`cnf.jkt`).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// Writes a proof for a request with method `htm` to `htu` (see
    /// [`htu`]) into `out` (cleared first): `iat` in Unix seconds, `ath`
    /// for the access token it carries (see [`ath`]), `nonce` if the server
    /// gave one. A fresh random `jti` each time.
    pub fn proof(
        &self,
        out: &mut String,
        claims: &Claims<'_>,
        scratch: &mut String,
    ) -> Result<(), KeyError> {
        let mut jti = [0u8; 16];
        self.rng.fill(&mut jti).map_err(|_| KeyError::Sign)?;
        scratch.clear();
        scratch.push_str(r#"{"jti":""#);
        B64.encode_string(jti, scratch);
        scratch.push_str(r#"","htm":"#);
        json_string(scratch, claims.htm);
        scratch.push_str(r#","htu":"#);
        json_string(scratch, claims.htu);
        let _ = write!(scratch, r#","iat":{}"#, claims.iat);
        if let Some(ath) = claims.ath {
            scratch.push_str(r#","ath":"#);
            json_string(scratch, ath);
        }
        if let Some(nonce) = claims.nonce {
            scratch.push_str(r#","nonce":"#);
            json_string(scratch, nonce);
        }
        scratch.push('}');
        out.clear();
        out.push_str(&self.header);
        out.push('.');
        B64.encode_string(scratch.as_bytes(), out);
        let signature = self.key.sign(self.alg, out.as_bytes())?;
        out.push('.');
        B64.encode_string(signature, out);
        Ok(())
    }
}

/// What a proof says about the request it goes with.
#[derive(Debug, Clone, Copy)]
pub struct Claims<'a> {
    pub htm: &'a str,
    pub htu: &'a str,
    pub iat: u64,
    pub ath: Option<&'a str>,
    pub nonce: Option<&'a str>,
}

/// Nonces are opaque strings chosen by a server; longer ones are ignored
/// rather than echoed into every proof.
pub const MAX_NONCE: usize = 512;

/// Whether a `DPoP-Nonce` value may go into proofs: RFC 9449 §8's NQCHAR
/// (printable ASCII but `"` and `\`), not empty, at most [`MAX_NONCE`].
pub fn valid_nonce(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_NONCE
        && v.bytes()
            .all(|b| (0x21..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// `ath`: base64url of the SHA-256 of the access token (RFC 9449 §4.2).
pub fn ath(access_token: &[u8]) -> String {
    B64.encode(ring::digest::digest(&ring::digest::SHA256, access_token))
}

/// `htu` (RFC 9449 §4.2): the request's URI without query and fragment, the
/// port only if it is not the scheme's default, scheme and host in lower
/// case.
pub fn htu(scheme: &str, host: &str, port: Option<u16>, path: &str) -> String {
    let mut out = String::new();
    write_htu(&mut out, scheme, host, port, path);
    out
}

/// [`htu`] into `out` (cleared first), for a reused buffer.
pub fn write_htu(out: &mut String, scheme: &str, host: &str, port: Option<u16>, path: &str) {
    out.clear();
    out.push_str(scheme);
    out.make_ascii_lowercase();
    let default = match out.as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    out.push_str("://");
    let h = out.len();
    out.push_str(host);
    out[h..].make_ascii_lowercase();
    if let Some(p) = port.filter(|p| Some(*p) != default) {
        let _ = write!(out, ":{p}");
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    out.push_str(if path.is_empty() { "/" } else { path });
}

/// Appends `s` as a JSON string literal.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    // The usual case (methods, URLs, base64url, nonces): nothing to escape.
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A public key as a JWK, members in the lexicographic order RFC 7638
/// wants for the thumbprint (and fine for the header too).
enum Jwk {
    Ec { x: String, y: String },
    Okp { x: String },
    Rsa { e: String, n: String },
}

impl Jwk {
    fn of(key: &SigningKey) -> Self {
        match key {
            SigningKey::P256(k) | SigningKey::P384(k) => {
                // Uncompressed point: 0x04 | X | Y.
                let p = k.public_key().as_ref();
                let half = (p.len() - 1) / 2;
                Jwk::Ec {
                    x: B64.encode(&p[1..1 + half]),
                    y: B64.encode(&p[1 + half..]),
                }
            }
            SigningKey::Ed25519(k) => Jwk::Okp {
                x: B64.encode(k.public_key().as_ref()),
            },
            SigningKey::Rsa(k) => {
                let c: ring::rsa::PublicKeyComponents<Vec<u8>> = k.public().into();
                Jwk::Rsa {
                    e: B64.encode(&c.e),
                    n: B64.encode(&c.n),
                }
            }
        }
    }

    /// The required members only, sorted, no whitespace (RFC 7638 §3).
    fn json(&self) -> String {
        match self {
            Jwk::Ec { x, y } => {
                let crv = if x.len() > 43 { "P-384" } else { "P-256" };
                format!(r#"{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
            Jwk::Okp { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            Jwk::Rsa { e, n } => format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#),
        }
    }

    fn thumbprint(&self) -> String {
        B64.encode(ring::digest::digest(
            &ring::digest::SHA256,
            self.json().as_bytes(),
        ))
    }
}

/// A profile's DPoP key over time: generated at start (memory only), or
/// read from `dpop_key_file`. The file is looked at before each token
/// request, so a rotated key binds the next token; a file that no longer
/// loads keeps the key in use (logged once per change). Tokens carry the
/// key they are bound to, so requests sign with the right one throughout.
pub struct ProfileKey {
    file: Option<std::path::PathBuf>,
    alg: Option<Alg>,
    profile: String,
    /// The key in use and the SHA-256 of the file it came from (and of a
    /// file last seen not to load, so that is logged once).
    current: std::sync::Mutex<(Arc<ProofKey>, Option<ring::digest::Digest>)>,
}

impl std::fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileKey")
            .field("file", &self.file)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl ProfileKey {
    /// Loads `file` (or generates a key for `alg`, default ES256).
    pub fn new(
        profile: &str,
        file: Option<&std::path::Path>,
        alg: Option<Alg>,
    ) -> Result<Self, KeyError> {
        let (key, digest) = match file {
            Some(path) => {
                let (key, digest) = load(path, alg)?;
                (key, Some(digest))
            }
            None => (ProofKey::generate_for(alg.unwrap_or(Alg::ES256))?, None),
        };
        Ok(Self {
            file: file.map(Into::into),
            alg,
            profile: profile.to_owned(),
            current: std::sync::Mutex::new((Arc::new(key), digest)),
        })
    }

    /// The key to bind the next token to: the file's if it changed and
    /// loads, else the one in use. Called per token request, never per
    /// proxied request.
    pub fn current(&self) -> Arc<ProofKey> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.file else {
            return Arc::clone(&current.0);
        };
        // The file's state: the hash of its bytes, or of none when it
        // cannot be read, so an unreadable file is also logged once.
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).unwrap_or_default());
        let digest = Some(ring::digest::digest(&ring::digest::SHA256, &bytes));
        let changed = match (&digest, &current.1) {
            (Some(d), Some(c)) => d.as_ref() != c.as_ref(),
            _ => true,
        };
        if changed {
            match load(path, self.alg) {
                Ok((key, d)) => {
                    tracing::info!(profile = %self.profile, jkt = %key.thumbprint(), "DPoP key file changed; the next tokens are bound to the new key");
                    *current = (Arc::new(key), Some(d));
                }
                Err(e) => {
                    tracing::warn!(profile = %self.profile, error = %e, "dpop_key_file does not load; the key in use stays");
                    current.1 = digest;
                }
            }
        }
        Arc::clone(&current.0)
    }
}

fn load(
    path: &std::path::Path,
    alg: Option<Alg>,
) -> Result<(ProofKey, ring::digest::Digest), KeyError> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?);
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let key = ProofKey::new(SigningKey::load(path)?, alg)?;
    Ok((key, digest))
}

/// Below this, a server's clock is taken to agree with ours: `Date` has a
/// one-second resolution and servers allow some leeway anyway.
const SKEW_TOLERANCE: i64 = 5;

/// What one server (a token endpoint, or an upstream origin) told us about
/// proofs: its latest `DPoP-Nonce`, and how far its clock is from ours
/// (learned from its `Date` when it refused a proof). Read per request
/// without locks.
#[derive(Debug, Default)]
pub struct Server {
    nonce: ArcSwapOption<String>,
    skew: AtomicI64,
}

impl Server {
    /// Keeps a `DPoP-Nonce` value from a response (success or error).
    /// Whether it changed; a malformed one is ignored.
    pub fn note_nonce(&self, value: Option<&[u8]>) -> bool {
        let Some(v) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
            return false;
        };
        if !valid_nonce(v) || self.nonce.load().as_deref().map(String::as_str) == Some(v) {
            return false;
        }
        self.nonce.store(Some(Arc::new(v.to_owned())));
        true
    }

    /// The nonce for the next proof, if the server gave one.
    pub fn nonce(&self) -> arc_swap::Guard<Option<Arc<String>>> {
        self.nonce.load()
    }

    /// `iat` for a proof to this server: now on its clock, as far as known.
    pub fn iat(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        (now + self.skew.load(Ordering::Relaxed)).max(0) as u64
    }

    /// The server refused a proof for `why`, answering with `nonce` and
    /// `date` (its `DPoP-Nonce` and `Date`): keeps what it said, and says
    /// whether a new proof can pass: it gave a nonce to use, or its clock is
    /// far from ours (and is used from now on). Callers resend a request
    /// at most once, so requests refused together all resend, and none
    /// loops.
    pub fn refused(
        &self,
        why: Refusal,
        nonce: Option<&[u8]>,
        date: Option<&[u8]>,
        who: &str,
    ) -> bool {
        let changed = self.note_nonce(nonce);
        let given = nonce
            .and_then(|n| std::str::from_utf8(n).ok())
            .is_some_and(valid_nonce);
        match why {
            Refusal::UseNonce => given,
            Refusal::InvalidProof => changed || self.learn_skew(date, who),
        }
    }

    /// A refused proof's `Date`: when far from our clock, the server's
    /// clock is used for its later proofs (logged when the offset changes).
    /// Whether it is far.
    fn learn_skew(&self, date: Option<&[u8]>, who: &str) -> bool {
        let Some(at) = date
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
        else {
            return false;
        };
        let now = SystemTime::now();
        let skew = match at.duration_since(now) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(behind) => -(behind.duration().as_secs() as i64),
        };
        let off = skew.abs() >= SKEW_TOLERANCE;
        let learned = if off { skew } else { 0 };
        let old = self.skew.swap(learned, Ordering::Relaxed);
        if (learned - old).abs() >= SKEW_TOLERANCE {
            tracing::warn!(server = %who, skew_s = learned, "a DPoP proof was refused and the server's clock differs from ours; proofs to it use its clock");
        }
        off
    }
}

/// Why a server refused a proof (RFC 9449 §5, §7.1, §8, §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `use_dpop_nonce`: the proof needs the server's nonce.
    UseNonce,
    /// `invalid_dpop_proof`.
    InvalidProof,
}

impl Refusal {
    /// From an OAuth error code.
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "use_dpop_nonce" => Some(Refusal::UseNonce),
            "invalid_dpop_proof" => Some(Refusal::InvalidProof),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UseNonce => "use_dpop_nonce",
            Refusal::InvalidProof => "invalid_dpop_proof",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(proof: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>, String) {
        let mut it = proof.split('.');
        let (h, p, s) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        assert!(it.next().is_none());
        let header = serde_json::from_slice(&B64.decode(h).unwrap()).unwrap();
        let payload = serde_json::from_slice(&B64.decode(p).unwrap()).unwrap();
        (header, payload, B64.decode(s).unwrap(), format!("{h}.{p}"))
    }

    /// Verifies a proof's signature with the key in its own header, as a
    /// resource server does (RFC 9449 §4.3 step 6).
    fn verify(proof: &str) -> (serde_json::Value, serde_json::Value) {
        let (header, payload, sig, signed) = parts(proof);
        assert_eq!(header["typ"], "dpop+jwt");
        let jwk = &header["jwk"];
        let b = |k: &str| B64.decode(jwk[k].as_str().unwrap()).unwrap();
        let ok = match (
            header["alg"].as_str().unwrap(),
            jwk["kty"].as_str().unwrap(),
        ) {
            ("ES256", "EC") => {
                let mut point = vec![4];
                point.extend(b("x"));
                point.extend(b("y"));
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed.as_bytes(), &sig)
            }
            ("EdDSA", "OKP") => signature::UnparsedPublicKey::new(&signature::ED25519, b("x"))
                .verify(signed.as_bytes(), &sig),
            (alg, "RSA") => {
                let params = if alg == "PS256" {
                    &signature::RSA_PSS_2048_8192_SHA256
                } else {
                    &signature::RSA_PKCS1_2048_8192_SHA256
                };
                ring::rsa::PublicKeyComponents {
                    n: b("n"),
                    e: b("e"),
                }
                .verify(params, signed.as_bytes(), &sig)
            }
            other => panic!("{other:?}"),
        };
        assert!(ok.is_ok(), "signature does not verify");
        // No private member leaks into the header's JWK.
        assert!(jwk.get("d").is_none() && jwk.get("p").is_none());
        (header, payload)
    }

    fn claims<'a>(ath: Option<&'a str>, nonce: Option<&'a str>) -> Claims<'a> {
        Claims {
            htm: "GET",
            htu: "https://api.example/v1/items",
            iat: 1_700_000_000,
            ath,
            nonce,
        }
    }

    #[test]
    fn rfc9449_ath_and_rfc7638_thumbprint_vectors() {
        // RFC 9449 §7.1's example access token and its ath.
        assert_eq!(
            ath(b"Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
        // RFC 9449 §4.1's example key and the jkt §6.1 gives for it.
        let jwk = Jwk::Ec {
            x: "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs".into(),
            y: "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA".into(),
        };
        assert_eq!(
            jwk.thumbprint(),
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
        );
    }

    #[test]
    fn generated_es256_proofs_verify_and_carry_the_claims() {
        let key = ProofKey::generate().unwrap();
        assert_eq!(key.alg(), Alg::ES256);
        let (mut out, mut scratch) = (String::new(), String::new());
        let token_ath = ath(b"the-token");
        key.proof(
            &mut out,
            &claims(Some(&token_ath), Some("n-1")),
            &mut scratch,
        )
        .unwrap();
        let (header, payload) = verify(&out);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["jwk"]["crv"], "P-256");
        assert_eq!(payload["htm"], "GET");
        assert_eq!(payload["htu"], "https://api.example/v1/items");
        assert_eq!(payload["iat"], 1_700_000_000u64);
        assert_eq!(payload["ath"], token_ath.as_str());
        assert_eq!(payload["nonce"], "n-1");
        // The header's key is the one the thumbprint names.
        let jwk = header["jwk"].clone();
        let rebuilt = Jwk::Ec {
            x: jwk["x"].as_str().unwrap().into(),
            y: jwk["y"].as_str().unwrap().into(),
        };
        assert_eq!(rebuilt.thumbprint(), key.thumbprint());
        // Without a token or nonce (a token request): no such claims.
        key.proof(&mut out, &claims(None, None), &mut scratch)
            .unwrap();
        let (_, payload) = verify(&out);
        assert!(payload.get("ath").is_none() && payload.get("nonce").is_none());
    }

    #[test]
    fn every_proof_has_its_own_jti() {
        let key = ProofKey::generate().unwrap();
        let (mut out, mut scratch) = (String::new(), String::new());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            key.proof(&mut out, &claims(None, None), &mut scratch)
                .unwrap();
            let (_, payload, _, _) = parts(&out);
            assert!(seen.insert(payload["jti"].as_str().unwrap().to_owned()));
        }
    }

    #[test]
    fn ed25519_keys_sign_with_eddsa_and_p384_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, key: &rcgen::KeyPair| {
            let path = dir.path().join(name);
            std::fs::write(&path, key.serialize_pem()).unwrap();
            SigningKey::load(&path).unwrap()
        };
        let ed = write(
            "ed",
            &rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        );
        let ed = ProofKey::new(ed, None).unwrap();
        assert_eq!(ed.alg(), Alg::EdDSA);
        let (mut out, mut scratch) = (String::new(), String::new());
        ed.proof(&mut out, &claims(None, None), &mut scratch)
            .unwrap();
        let (header, _) = verify(&out);
        assert_eq!(header["jwk"]["kty"], "OKP");
        // A P-384 key is refused for DPoP (ES384 is not a DPoP algorithm
        // here), naming what is allowed.
        let p384 = write(
            "p384",
            &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        );
        let e = ProofKey::new(p384, None).unwrap_err().to_string();
        assert!(e.contains("ES256, EdDSA, PS256, RS256"), "{e}");
    }

    #[test]
    fn htu_is_normalised() {
        assert_eq!(
            htu("HTTPS", "API.Example", Some(443), "/v1/x?q=1#f"),
            "https://api.example/v1/x"
        );
        assert_eq!(
            htu("https", "api.example", Some(8443), "/v1"),
            "https://api.example:8443/v1"
        );
        assert_eq!(htu("http", "h", Some(80), ""), "http://h/");
        assert_eq!(htu("https", "h", None, "/a"), "https://h/a");
    }

    #[test]
    fn claims_are_json_escaped() {
        let key = ProofKey::generate().unwrap();
        let (mut out, mut scratch) = (String::new(), String::new());
        let c = Claims {
            htm: "GET",
            htu: "https://h/a\"b\\c",
            iat: 1,
            ath: None,
            nonce: Some("n\u{1}"),
        };
        key.proof(&mut out, &c, &mut scratch).unwrap();
        let (_, payload) = verify(&out);
        assert_eq!(payload["htu"], "https://h/a\"b\\c");
        assert_eq!(payload["nonce"], "n\u{1}");
    }

    #[test]
    fn a_profile_key_follows_its_file_and_keeps_the_last_good_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dpop.pem");
        let write = |alg| {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            std::fs::write(&path, kp.serialize_pem()).unwrap();
        };
        write(&rcgen::PKCS_ECDSA_P256_SHA256);
        let key = ProfileKey::new("p", Some(&path), None).unwrap();
        let first = key.current();
        assert_eq!(first.alg(), Alg::ES256);
        assert_eq!(
            key.current().thumbprint(),
            first.thumbprint(),
            "unchanged file"
        );
        write(&rcgen::PKCS_ED25519);
        let second = key.current();
        assert_eq!(second.alg(), Alg::EdDSA);
        assert_ne!(second.thumbprint(), first.thumbprint());
        std::fs::write(&path, "not a key").unwrap();
        assert_eq!(
            key.current().thumbprint(),
            second.thumbprint(),
            "a bad file keeps the key"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            key.current().thumbprint(),
            second.thumbprint(),
            "so does a missing one"
        );
        // Without a file: generated once, for the algorithm asked.
        let generated = ProfileKey::new("p", None, Some(Alg::EdDSA)).unwrap();
        assert_eq!(generated.current().alg(), Alg::EdDSA);
        assert_eq!(
            generated.current().thumbprint(),
            generated.current().thumbprint()
        );
        assert!(ProofKey::generate_for(Alg::PS256).is_err());
    }
}
