//! The strict DPoP resource server (support::dpop_server) is strict: a
//! good proof from the library's `ProofKey` passes, and each way a proof or
//! its token can be wrong (RFC 9449 §4.3, §7.1, §9), crafted here by hand,
//! is refused with its own reason and the RFC's challenge.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{HeaderMap, HeaderValue};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use serde_json::{Value, json};
use token_injector::dpop::{self, Claims, ProofKey};
use token_injector::keys::{Alg, SigningKey};

use crate::support::dpop_server::{self, Nonce, Proof, Reject, Verifier, http_date};
use crate::support::{Pki, direct_client};

const TOKEN: &str = "tok-123.abc_DEF";
const URL: &str = "https://api.example/v1/items";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A proof by `key` for `htm` `htu`, made `age` seconds ago.
fn proof_for(
    key: &ProofKey,
    htm: &str,
    htu: &str,
    age: i64,
    ath: Option<&str>,
    nonce: Option<&str>,
) -> String {
    let (mut out, mut scratch) = (String::new(), String::new());
    let iat = (now() - age) as u64;
    let claims = Claims {
        htm,
        htu,
        iat,
        ath,
        nonce,
    };
    key.proof(&mut out, &claims, &mut scratch).unwrap();
    out
}

/// A fresh proof by `key` for `GET URL` with TOKEN's ath.
fn good(key: &ProofKey) -> String {
    proof_for(key, "GET", URL, 0, Some(&dpop::ath(TOKEN.as_bytes())), None)
}

fn headers(authorization: Option<&str>, proofs: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(a) = authorization {
        h.append("authorization", HeaderValue::from_str(a).unwrap());
    }
    for p in proofs {
        h.append("dpop", HeaderValue::from_str(p).unwrap());
    }
    h
}

/// `GET URL` with `Authorization: DPoP TOKEN` and this proof.
fn check(v: &Verifier, proof: &str) -> Result<Proof, Reject> {
    v.check(
        "GET",
        URL,
        &headers(Some(&format!("DPoP {TOKEN}")), &[proof]),
    )
}

fn rejected(r: Result<Proof, Reject>) -> Reject {
    match r {
        Ok(p) => panic!("accepted: {:?}", p.claims),
        Err(e) => e,
    }
}

/// An ES256 key that signs whatever header and claims a test wants.
struct Hand {
    pair: EcdsaKeyPair,
    jwk: Value,
}

impl Hand {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..]),
        });
        Self { pair, jwk }
    }

    fn header(&self) -> Value {
        json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk })
    }

    fn claims() -> Value {
        json!({
            "jti": format!("{:016x}", fastrand::u64(..)), "htm": "GET", "htu": URL,
            "iat": now(), "ath": dpop::ath(TOKEN.as_bytes()),
        })
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let signed = format!("{}.{}", b64_json(header), b64_json(claims));
        let sig = self
            .pair
            .sign(&SystemRandom::new(), signed.as_bytes())
            .unwrap();
        format!("{signed}.{}", B64.encode(sig))
    }
}

fn b64_json(v: &Value) -> String {
    B64.encode(v.to_string())
}

#[test]
fn a_valid_es256_proof_is_accepted() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::new(TOKEN).jkt(key.thumbprint());
    let p = check(&v, &good(&key)).unwrap();
    assert_eq!(p.jkt, key.thumbprint(), "thumbprint computed independently");
    assert_eq!(p.token.as_deref(), Some(TOKEN));
    assert_eq!(p.claims["htu"], URL);
    // The scheme's name is case-insensitive.
    let h = headers(Some(&format!("dpop {TOKEN}")), &[&good(&key)]);
    v.check("GET", URL, &h).unwrap();
}

#[test]
fn eddsa_ps256_and_rs256_proofs_are_accepted() {
    let rng = SystemRandom::new();
    let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let ed = SigningKey::Ed25519(Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap());
    let rsa = || {
        use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};
        let der = PrivateKeyDer::from_pem_slice(RSA_KEY.as_bytes()).unwrap();
        SigningKey::Rsa(RsaKeyPair::from_pkcs8(der.secret_der()).unwrap())
    };
    let keys = [
        (ProofKey::new(ed, None).unwrap(), "EdDSA"),
        (ProofKey::new(rsa(), Some(Alg::PS256)).unwrap(), "PS256"),
        (ProofKey::new(rsa(), Some(Alg::RS256)).unwrap(), "RS256"),
    ];
    for (key, alg) in keys {
        let v = Verifier::new(TOKEN).jkt(key.thumbprint());
        let p = check(&v, &good(&key)).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(p.header["alg"], alg);
        assert_eq!(p.jkt, key.thumbprint(), "{alg}");
    }
}

#[test]
fn a_missing_dpop_header_is_refused() {
    let v = Verifier::new(TOKEN);
    let h = headers(Some(&format!("DPoP {TOKEN}")), &[]);
    assert_eq!(v.check("GET", URL, &h).unwrap_err(), Reject::NoProof);
    // Without a token either: a bare challenge (RFC 6750 §3.1).
    let r = v.check("GET", URL, &HeaderMap::new()).unwrap_err();
    assert_eq!(r, Reject::NoToken);
    let challenge = r.response().headers()["www-authenticate"].clone();
    assert_eq!(challenge, r#"DPoP algs="ES256 EdDSA PS256 RS256""#);
}

#[test]
fn two_dpop_headers_are_refused() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::new(TOKEN);
    let h = headers(Some(&format!("DPoP {TOKEN}")), &[&good(&key), &good(&key)]);
    assert_eq!(v.check("GET", URL, &h).unwrap_err(), Reject::MultipleProofs);
}

#[test]
fn a_proof_that_is_not_a_jws_is_refused() {
    let key = ProofKey::generate().unwrap();
    let proof = good(&key);
    let (signed, _) = proof.rsplit_once('.').unwrap();
    let v = Verifier::new(TOKEN);
    for bad in [
        "abc".to_owned(),
        signed.to_owned(),
        format!("{proof}.x"),
        format!("{signed}.not*base64"),
        format!("{}.{signed}", B64.encode("not json")),
        format!("{}.e30.AA", B64.encode("[1]")),
    ] {
        assert_eq!(rejected(check(&v, &bad)), Reject::NotJws, "{bad}");
    }
}

#[test]
fn a_wrong_typ_is_refused() {
    let hand = Hand::new();
    let v = Verifier::new(TOKEN);
    for typ in [json!("jwt"), json!("DPoP+jwt "), Value::Null] {
        let mut header = hand.header();
        header["typ"] = typ;
        let r = rejected(check(&v, &hand.sign(&header, &Hand::claims())));
        assert_eq!(r, Reject::Typ);
        assert!(
            r.response().headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with(r#"DPoP error="invalid_dpop_proof""#)
        );
    }
}

#[test]
fn alg_none_is_refused() {
    let hand = Hand::new();
    let mut header = hand.header();
    header["alg"] = json!("none");
    let unsigned = format!("{}.{}.", b64_json(&header), b64_json(&Hand::claims()));
    let v = Verifier::new(TOKEN);
    assert_eq!(
        rejected(check(&v, &unsigned)),
        Reject::Alg(r#""none""#.into())
    );
}

#[test]
fn alg_hs256_is_refused() {
    // Signed with the access token as an HMAC key: a classic confusion.
    let hand = Hand::new();
    let mut header = hand.header();
    header["alg"] = json!("HS256");
    let signed = format!("{}.{}", b64_json(&header), b64_json(&Hand::claims()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, TOKEN.as_bytes());
    let mac = ring::hmac::sign(&key, signed.as_bytes());
    let proof = format!("{signed}.{}", B64.encode(mac));
    let v = Verifier::new(TOKEN);
    assert_eq!(
        rejected(check(&v, &proof)),
        Reject::Alg(r#""HS256""#.into())
    );
}

#[test]
fn a_private_member_in_the_jwk_is_refused() {
    let hand = Hand::new();
    let mut header = hand.header();
    header["jwk"]["d"] = json!(B64.encode([7u8; 32]));
    let v = Verifier::new(TOKEN);
    let r = rejected(check(&v, &hand.sign(&header, &Hand::claims())));
    assert_eq!(r, Reject::PrivateJwk);
}

#[test]
fn a_tampered_payload_is_refused() {
    let key = ProofKey::generate().unwrap();
    let proof = good(&key);
    let parts: Vec<&str> = proof.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    claims["htm"] = json!("POST");
    let forged = format!("{}.{}.{}", parts[0], b64_json(&claims), parts[2]);
    let v = Verifier::new(TOKEN);
    assert_eq!(
        rejected(v.check(
            "POST",
            URL,
            &headers(Some(&format!("DPoP {TOKEN}")), &[&forged])
        )),
        Reject::BadSignature
    );
    // The untouched proof still passes: the signature check is what failed.
    check(&v, &proof).unwrap();
}

#[test]
fn a_jwk_of_another_key_than_the_signer_is_refused() {
    let (signer, other) = (Hand::new(), Hand::new());
    let proof = signer.sign(&other.header(), &Hand::claims());
    let v = Verifier::new(TOKEN);
    assert_eq!(rejected(check(&v, &proof)), Reject::BadSignature);
    // A jwk that does not fit the alg is refused before any signature.
    let mut header = signer.header();
    header["alg"] = json!("EdDSA");
    let r = rejected(check(&v, &signer.sign(&header, &Hand::claims())));
    assert_eq!(r, Reject::BadJwk);
}

#[test]
fn a_missing_jti_is_refused() {
    let hand = Hand::new();
    let mut claims = Hand::claims();
    claims.as_object_mut().unwrap().remove("jti");
    let v = Verifier::new(TOKEN);
    assert_eq!(
        rejected(check(&v, &hand.sign(&hand.header(), &claims))),
        Reject::NoJti
    );
}

#[test]
fn a_replayed_jti_is_refused() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::new(TOKEN);
    let proof = good(&key);
    check(&v, &proof).unwrap();
    assert_eq!(rejected(check(&v, &proof)), Reject::ReplayedJti);
    // Also with the same jti in another, validly signed proof.
    let hand = Hand::new();
    let mut claims = Hand::claims();
    claims["jti"] = json!("fixed-jti");
    check(&v, &hand.sign(&hand.header(), &claims)).unwrap();
    claims["iat"] = json!(now() - 1);
    let r = rejected(check(&v, &hand.sign(&hand.header(), &claims)));
    assert_eq!(r, Reject::ReplayedJti);
}

#[test]
fn a_wrong_htm_is_refused() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::new(TOKEN);
    let ath = dpop::ath(TOKEN.as_bytes());
    let proof = proof_for(&key, "POST", URL, 0, Some(&ath), None);
    let r = rejected(check(&v, &proof));
    assert_eq!(
        r,
        Reject::Htm {
            got: Some("POST".into()),
            want: "GET".into()
        }
    );
}

#[test]
fn a_wrong_htu_is_refused_but_query_port_and_case_are_normalised() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::new(TOKEN);
    let ath = dpop::ath(TOKEN.as_bytes());
    let at = |htu: &str, url: &str| {
        let proof = proof_for(&key, "GET", htu, 0, Some(&ath), None);
        v.check(
            "GET",
            url,
            &headers(Some(&format!("DPoP {TOKEN}")), &[&proof]),
        )
    };
    for (htu, url) in [
        ("https://api.example/v1/other", URL),
        ("https://evil.example/v1/items", URL),
        ("http://api.example/v1/items", URL),
        ("https://api.example:8443/v1/items", URL),
        (
            "https://api.example/v1/items",
            "https://api.example:8443/v1/items",
        ),
    ] {
        assert!(
            matches!(at(htu, url), Err(Reject::Htu { .. })),
            "{htu} for {url}"
        );
    }
    for (htu, url) in [
        // The query (and fragment) are not part of htu.
        (URL, "https://api.example/v1/items?page=2&q=x"),
        ("https://api.example/v1/items?page=2#f", URL),
        // Default ports, either side, and case of scheme and host.
        ("https://api.example:443/v1/items", URL),
        (URL, "https://api.example:443/v1/items"),
        ("HTTPS://API.Example/v1/items", URL),
        ("http://h:80/p", "http://h/p"),
    ] {
        at(htu, url).unwrap_or_else(|e| panic!("{htu} for {url}: {e}"));
    }
}

#[test]
fn an_old_iat_is_refused() {
    let key = ProofKey::generate().unwrap();
    let ath = dpop::ath(TOKEN.as_bytes());
    let v = Verifier::new(TOKEN);
    let r = rejected(check(
        &v,
        &proof_for(&key, "GET", URL, 120, Some(&ath), None),
    ));
    assert!(matches!(r, Reject::IatTooOld { .. }), "{r:?}");
    check(&v, &proof_for(&key, "GET", URL, 30, Some(&ath), None)).unwrap();
    // A wider window takes the same age.
    let v = Verifier::new(TOKEN).window(300);
    check(&v, &proof_for(&key, "GET", URL, 120, Some(&ath), None)).unwrap();
}

#[test]
fn an_iat_in_the_future_beyond_the_window_is_refused() {
    let key = ProofKey::generate().unwrap();
    let ath = dpop::ath(TOKEN.as_bytes());
    let v = Verifier::new(TOKEN);
    let r = rejected(check(
        &v,
        &proof_for(&key, "GET", URL, -120, Some(&ath), None),
    ));
    assert!(matches!(r, Reject::IatInFuture { .. }), "{r:?}");
    check(&v, &proof_for(&key, "GET", URL, -30, Some(&ath), None)).unwrap();
    // Missing altogether.
    let hand = Hand::new();
    let mut claims = Hand::claims();
    claims.as_object_mut().unwrap().remove("iat");
    assert_eq!(
        rejected(check(&v, &hand.sign(&hand.header(), &claims))),
        Reject::IatMissing
    );
}

#[test]
fn a_missing_or_wrong_ath_is_refused() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::new(TOKEN);
    let r = rejected(check(&v, &proof_for(&key, "GET", URL, 0, None, None)));
    assert_eq!(r, Reject::AthMissing);
    let other = dpop::ath(b"another-token");
    let r = rejected(check(
        &v,
        &proof_for(&key, "GET", URL, 0, Some(&other), None),
    ));
    assert_eq!(r, Reject::AthMismatch);
}

#[test]
fn a_bearer_scheme_or_unknown_token_is_refused() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::new(TOKEN);
    for auth in [
        format!("Bearer {TOKEN}"),
        format!("DPoP  {TOKEN}"),
        "DPoP".into(),
    ] {
        let r = v
            .check("GET", URL, &headers(Some(&auth), &[&good(&key)]))
            .unwrap_err();
        assert_eq!(r, Reject::AuthScheme, "{auth}");
        let challenge = r.response().headers()["www-authenticate"].clone();
        assert!(
            challenge
                .to_str()
                .unwrap()
                .starts_with(r#"DPoP error="invalid_token""#)
        );
    }
    let v = Verifier::new("another-token");
    assert_eq!(rejected(check(&v, &good(&key))), Reject::UnknownToken);
}

#[test]
fn a_token_bound_to_another_key_is_refused() {
    let (key, other) = (ProofKey::generate().unwrap(), ProofKey::generate().unwrap());
    // Bound by configuration (an opaque token).
    let v = Verifier::new(TOKEN).jkt(other.thumbprint());
    let r = rejected(check(&v, &good(&key)));
    let want = Reject::Binding {
        want: other.thumbprint().into(),
        got: key.thumbprint().into(),
    };
    assert_eq!(r, want);
    // Bound by the token's own cnf.jkt (a JWT), which wins over the setting.
    let jwt = |jkt: &str| {
        let claims = json!({ "sub": "svc", "cnf": { "jkt": jkt } });
        format!(
            "{}.{}.c2ln",
            b64_json(&json!({ "alg": "ES256" })),
            b64_json(&claims)
        )
    };
    let v = Verifier::tokens(|_| true).jkt(key.thumbprint());
    for (token, ok) in [
        (jwt(other.thumbprint()), false),
        (jwt(key.thumbprint()), true),
    ] {
        let ath = dpop::ath(token.as_bytes());
        let proof = proof_for(&key, "GET", URL, 0, Some(&ath), None);
        let r = v.check(
            "GET",
            URL,
            &headers(Some(&format!("DPoP {token}")), &[&proof]),
        );
        assert_eq!(r.is_ok(), ok, "{r:?}");
    }
}

#[test]
fn a_missing_nonce_is_answered_with_one() {
    let key = ProofKey::generate().unwrap();
    let ath = dpop::ath(TOKEN.as_bytes());
    let v = Verifier::new(TOKEN).nonce(Nonce::Require("n-first".into()));
    let r = rejected(check(&v, &good(&key)));
    assert_eq!(
        r,
        Reject::NonceMissing {
            nonce: "n-first".into()
        }
    );
    let response = r.response();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["dpop-nonce"], "n-first");
    let challenge = response.headers()["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with(r#"DPoP error="use_dpop_nonce""#),
        "{challenge}"
    );
    check(
        &v,
        &proof_for(&key, "GET", URL, 0, Some(&ath), Some("n-first")),
    )
    .unwrap();
}

#[test]
fn a_stale_nonce_after_rotation_is_refused() {
    let key = ProofKey::generate().unwrap();
    let ath = dpop::ath(TOKEN.as_bytes());
    let v = Verifier::new(TOKEN).nonce(Nonce::Require("n-first".into()));
    let with = |nonce: &str| check(&v, &proof_for(&key, "GET", URL, 0, Some(&ath), Some(nonce)));
    with("n-first").unwrap();
    let next = v.rotate_nonce();
    assert_ne!(next, "n-first");
    assert_eq!(v.current_nonce().as_deref(), Some(next.as_str()));
    let r = rejected(with("n-first"));
    assert_eq!(
        r,
        Reject::NonceStale {
            got: "n-first".into(),
            nonce: next.clone()
        }
    );
    assert_eq!(r.response().headers()["dpop-nonce"], next.as_str());
    with(&next).unwrap();
}

#[test]
fn always_new_demands_a_new_nonce_every_time() {
    let key = ProofKey::generate().unwrap();
    let ath = dpop::ath(TOKEN.as_bytes());
    let v = Verifier::new(TOKEN).nonce(Nonce::AlwaysNew);
    let mut nonce: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let proof = proof_for(&key, "GET", URL, 0, Some(&ath), nonce.as_deref());
        let r = rejected(check(&v, &proof));
        assert_eq!(r.error(), Some("use_dpop_nonce"));
        let fresh = r.nonce().unwrap().to_owned();
        assert!(seen.insert(fresh.clone()), "nonce {fresh} repeated");
        nonce = Some(fresh);
    }
}

#[test]
fn proof_only_accepts_a_proof_without_a_token() {
    let key = ProofKey::generate().unwrap();
    let v = Verifier::proof_only();
    let proof = proof_for(&key, "POST", URL, 0, None, None);
    let p = v.check("POST", URL, &headers(None, &[&proof])).unwrap();
    assert_eq!(p.token, None);
    assert_eq!(
        rejected(v.check("POST", URL, &headers(None, &[]))),
        Reject::NoProof
    );
}

#[test]
fn http_dates_are_imf_fixdate() {
    // RFC 9110 §5.6.7's example.
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
}

/// Whether `date` is the server's clock (now + `skew`) within a few seconds.
fn near(date: &str, skew: i64) -> bool {
    let t = now() + skew;
    (t - 3..=t + 1).any(|t| http_date(t) == date)
}

#[tokio::test]
async fn over_http_a_nonce_demand_has_the_rfc_shape() {
    let verifier = Arc::new(Verifier::new(TOKEN).nonce(Nonce::Require("n-http".into())));
    let (addr, log) = dpop_server::start(None, Arc::clone(&verifier)).await;
    let key = ProofKey::generate().unwrap();
    let ath = dpop::ath(TOKEN.as_bytes());
    let htu = format!("http://{addr}/v1/items");
    let client = direct_client();
    let send = |proof: String| {
        client
            .get(format!("{htu}?page=2"))
            .header("authorization", format!("DPoP {TOKEN}"))
            .header("dpop", proof)
            .send()
    };

    let r = send(proof_for(&key, "GET", &htu, 0, Some(&ath), None))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let h = r.headers();
    assert_eq!(
        h["www-authenticate"].to_str().unwrap(),
        r#"DPoP error="use_dpop_nonce", error_description="no nonce; use n-http", algs="ES256 EdDSA PS256 RS256""#
    );
    assert_eq!(h["dpop-nonce"], "n-http");
    assert!(near(h["date"].to_str().unwrap(), 0), "{:?}", h["date"]);

    let r = send(proof_for(&key, "GET", &htu, 0, Some(&ath), Some("n-http")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("date"));

    let entries = log.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(entries[0].url, format!("{htu}?page=2"));
    assert_eq!(entries[0].version, http::Version::HTTP_11);
    assert_eq!(
        log.rejections(),
        [Reject::NonceMissing {
            nonce: "n-http".into()
        }]
    );
    assert_eq!(log.accepted().len(), 1);
    assert_eq!(log.accepted()[0]["nonce"], "n-http");
    let jtis = log.jtis();
    assert!(jtis.len() == 2 && jtis[0] != jtis[1], "{jtis:?}");
}

#[tokio::test]
async fn over_tls_and_h2_the_htu_has_the_authority() {
    let pki = Pki::new();
    let mut tls = Arc::unwrap_or_clone(pki.server_config(&["localhost"]));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let verifier = Arc::new(Verifier::new(TOKEN));
    let (addr, log) = dpop_server::start(Some(Arc::new(tls)), verifier).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let key = ProofKey::generate().unwrap();
    let htu = format!("https://localhost:{}/v1/items", addr.port());
    let proof = proof_for(
        &key,
        "PUT",
        &htu,
        0,
        Some(&dpop::ath(TOKEN.as_bytes())),
        None,
    );
    let r = client
        .put(&htu)
        .header("authorization", format!("DPoP {TOKEN}"))
        .header("dpop", proof)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200, "{:?}", log.rejections());
    let entries = log.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(entries[0].version, http::Version::HTTP_2);
    assert_eq!(entries[0].url, htu);
    assert_eq!(entries[0].method, "PUT");
}

#[tokio::test]
async fn a_skewed_server_clock_moves_the_window_and_the_date() {
    const SKEW: i64 = 3600;
    let verifier = Arc::new(Verifier::new(TOKEN).skew(SKEW));
    let (addr, log) = dpop_server::start(None, verifier).await;
    let key = ProofKey::generate().unwrap();
    let ath = dpop::ath(TOKEN.as_bytes());
    let htu = format!("http://{addr}/");
    let client = direct_client();
    for (age, status) in [(0, 401), (-SKEW, 200)] {
        let r = client
            .get(&htu)
            .header("authorization", format!("DPoP {TOKEN}"))
            .header("dpop", proof_for(&key, "GET", &htu, age, Some(&ath), None))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "iat {age} s from now");
        let date = r.headers()["date"].to_str().unwrap();
        assert!(near(date, SKEW), "{date}");
    }
    log.wait_for(2, Duration::from_secs(5)).await;
    assert!(
        matches!(log.rejections()[..], [Reject::IatTooOld { .. }]),
        "{:?}",
        log.rejections()
    );
}

/// A 2048-bit RSA key for the PS256 and RS256 cases (ring cannot make one).
const RSA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQDJSBAeyWWMlkCd
21Bu5wqxO0Vr01EkJJG4Fd1X0SZt6ryDs3AcE12AT+rcx6BICclKNvfsXxn5eAAw
tgG6OgfQbzDQLmf8zFzi0l0MngdPdlZU5RQtOFYjWLjEKJOMgp1dO80g20f5aEs7
k43E7pRcxEVvtvuHQ88lFdr1459+erK2TPtS5zyyC43vprje7sQUYddIMOoJTVvA
HxgghU6UrLALSG6WZd6HXwe6x+vCmc9Ty0y2SQdFCyUW+uPn2EMLeKXIWS8+Ii8C
RfOf0oaALqtFV5y27YDccdi4sUgeUpgT72B2vtaZ0DwJ9FmUTdSxRINpOajLhUj4
3qy6v1t5AgMBAAECggEADPhn8oXtlWk+vXVbGeRpQdm1C+FUgJjbK4K8Lksf1/Qp
BO8YjbSZQToVIzg5bb70scO4RurrbnITSBBIbPbNl1q86WNeJ9IG98ZQwO4DgFU6
s7KF0fKoCVPPpzNKq8Kkb5Q5kBEVUp7r/ykvWOX7WT18EHp4+6LM28HMZ+0ss06J
Rz5JvL/nx6qdiPpioaJVJ0zzfi8bs4FZag1UCX4TFANvG2TkGGikggHX5OaYjL40
f2buLHDwJKd47pxET9LJc5vcLQ7PsmBxoRgLK0uuLTiRfpWihHwwl3fWeQhoOB1n
EejTGLLmIh1QOeFVMtiwoJz0hBum5QG1gaktXaccEQKBgQDomsF5xDXeSQHT7RSo
1zZKz1nID7JEKkI8kRNQq55Z6uNQqfyBjS3+T/ZkXwfk8PSP28IObo7LZaCjsC5/
RkxONJAVtHf//QP0yYBPM8DvaMN8k9DGJA3eMTZTjYn0SUMQqOqcpv3qS0tp7yd+
i4FzBVTmmSqqqI/JDzknb/w6UQKBgQDdhshn/y1cxO1QhynYUgqMja8jCte/xXG1
YzVy8zOt8E7c1UhpImvSz4ZoaDsGWfBHeLzSQ/4fIkdo3mT7gVwclNC1D1tSwBUz
1PAW9KLszfrCet8GRfde2307/p0hzjAvAnU4OmmPIKQvdAUJZZEXLPr+Uk9qPYDv
1IKE9hwcqQKBgQDhv1hpClHRo39/pAe5+ez6XBVhwkIcP/s69v4M/BLaZ8ooPmIP
heqOeCLEtSpfOq/QctL62LgDlWV7mAD4i0yBVihEuHsCWhgd2faKZ8snT8DyRi+I
LfO7on18R9EM4pGROK9CTBwA6QSPEol9Gn4PGKyWhS7QpHmwA/NPYDMmkQKBgQDD
CF46iUQDz/DrnARwSlK1SixuWqZ2VTv2KWEuUgYm1lJoRHLa9Q4e7Mx18YY94kMU
ea0sJeZ+vKxIHLylXU+ebjqNnfaWFTzVhFzYqQskF3j1bj4ahND0N6O7hUAMOj7b
tHtFRNAYzfEfQjMJAd3KnLRh4k++xmVVQTCkJRW8+QKBgQCY/NJ6lK+qtfZ6GJ5V
h683giLjkbQWaGHyX3gF8xIbdhjJvRVrAOMQAgxDJfgQnDedcNap2yG0rGXIrfi1
n10lr4rEnkwwSBn/MTvVBgCjupH/J0a00Fvzq61Ezkd+33iN6alzfY01fCRxNfFV
KM8O9wPDizc/2+NjTXNijGhVmw==
-----END PRIVATE KEY-----
";
