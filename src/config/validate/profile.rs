//! `[profiles.*]`: a token endpoint profile (`client_credentials`) with its
//! client authentication, or a static credential (`grant = "static"`).

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue};

use crate::config::raw::RawProfile;
use crate::config::{
    BasicEncoding, CacheMode, ClientAuth, Dpop, Endpoint, GRANTS, METHODS, Profile, Static,
};
use crate::keys::{Alg, SigningKey};
use crate::secret;

use super::Validator;

impl Validator<'_> {
    /// Every profile, by grant: those that get tokens from an endpoint, and
    /// the static ones.
    pub(super) fn profiles(
        &mut self,
        raw: BTreeMap<String, RawProfile>,
        has_cache: bool,
    ) -> (BTreeMap<String, Profile>, BTreeMap<String, Static>) {
        let mut profiles = BTreeMap::new();
        let mut statics = BTreeMap::new();
        for (name, p) in raw {
            let grant = p.grant.clone();
            match grant.as_deref().unwrap_or("client_credentials") {
                kind @ ("client_credentials" | "jwt_bearer" | "token_exchange") => {
                    if p.credential_file.is_some() {
                        self.problem(
                            format!("profiles.{name}.credential_file"),
                            "only used with grant = \"static\"",
                        );
                    }
                    let cache = self.cache_mode(&name, p.cache.as_deref(), has_cache);
                    let dpop = self.dpop(&name, &p);
                    if let (Some(Some(d)), CacheMode::Shared) = (&dpop, cache)
                        && d.key_file.is_none()
                    {
                        self.problem(
                            format!("profiles.{name}.cache"),
                            "a DPoP token is usable only with its key, and a key generated at start is this replica's alone: set cache = \"local\", or give every replica the same dpop_key_file",
                        );
                    }
                    if let (Some(mut profile), Some(dpop)) = (self.profile(&name, p, kind), dpop) {
                        profile.cache = cache;
                        profile.dpop = dpop;
                        profiles.insert(name, profile);
                    }
                }
                "static" => {
                    if let Some(s) = self.static_profile(&name, p) {
                        statics.insert(name, s);
                    }
                }
                other => self.one_of(&format!("profiles.{name}.grant"), other, &GRANTS),
            }
        }
        (profiles, statics)
    }

    /// A `grant = "static"` profile: `credential_file`, and none of the
    /// token endpoint's keys (a set one would be silently ignored).
    fn static_profile(&mut self, name: &str, p: RawProfile) -> Option<Static> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let unused = [
            ("token_url", p.token_url.is_some()),
            ("issuer", p.issuer.is_some()),
            ("client_id", p.client_id.is_some()),
            ("client_secret_file", p.client_secret_file.is_some()),
            ("client_secret_env", p.client_secret_env.is_some()),
            ("auth_method", p.auth_method.is_some()),
            ("private_key_file", p.private_key_file.is_some()),
            ("key_id", p.key_id.is_some()),
            ("signing_alg", p.signing_alg.is_some()),
            ("assertion_audience", p.assertion_audience.is_some()),
            ("client_assertion_file", p.client_assertion_file.is_some()),
            ("client_cert_file", p.client_cert_file.is_some()),
            ("client_key_file", p.client_key_file.is_some()),
            ("scopes", p.scopes.is_some()),
            ("audience", p.audience.is_some()),
            ("resources", p.resources.is_some()),
            ("ca_file", p.ca_file.is_some()),
            ("extra_params", p.extra_params.is_some()),
            ("token_headers", p.token_headers.is_some()),
            ("basic_encoding", p.basic_encoding.is_some()),
            ("cache", p.cache.is_some()),
            ("dpop", p.dpop.is_some()),
            ("dpop_key_file", p.dpop_key_file.is_some()),
            ("dpop_alg", p.dpop_alg.is_some()),
            (
                "google_credentials_file",
                p.google_credentials_file.is_some(),
            ),
            ("assertion_issuer", p.assertion_issuer.is_some()),
            ("assertion_subject", p.assertion_subject.is_some()),
            ("assertion_file", p.assertion_file.is_some()),
            ("subject_token_file", p.subject_token_file.is_some()),
            ("subject_profile", p.subject_profile.is_some()),
            ("subject_token_type", p.subject_token_type.is_some()),
            ("actor_token_file", p.actor_token_file.is_some()),
            ("actor_token_type", p.actor_token_type.is_some()),
            ("requested_token_type", p.requested_token_type.is_some()),
        ];
        for (k, set) in unused {
            if set {
                self.problem(
                    key(k),
                    "not used by grant \"static\" (there is no token endpoint)",
                );
            }
        }
        let Some(file) = p.credential_file.as_deref() else {
            self.problem(
                key("credential_file"),
                "missing; grant = \"static\" needs it",
            );
            return None;
        };
        let credential_file = self.path(file);
        // Read now, so `check` says what is wrong with the file.
        match secret::Source::File(credential_file.clone()).read() {
            Err(e) => {
                self.problem(key("credential_file"), e.to_string());
                return None;
            }
            // It goes into a header as it is (one trailing newline trimmed).
            Ok(v) if http::HeaderValue::from_str(v.expose()).is_err() => {
                self.problem(
                    key("credential_file"),
                    "holds characters that cannot go in a header (a second trailing newline, a CR, a control character)",
                );
                return None;
            }
            Ok(_) => {}
        }
        Some(Static {
            name: name.to_owned(),
            credential_file,
        })
    }

    /// `cache`: `"shared"` (the default when `[cache]` exists) or `"local"`.
    fn cache_mode(&mut self, name: &str, value: Option<&str>, has_cache: bool) -> CacheMode {
        let key = format!("profiles.{name}.cache");
        match value {
            None if has_cache => CacheMode::Shared,
            None | Some("local") => CacheMode::Local,
            Some("shared") if has_cache => CacheMode::Shared,
            Some("shared") => {
                self.problem(
                    key,
                    "\"shared\" needs a [cache] table (the Redis to share through)",
                );
                CacheMode::Local
            }
            Some(other) => {
                self.one_of(&key, other, &["shared", "local"]);
                CacheMode::Local
            }
        }
    }

    /// `dpop`, `dpop_key_file`, `dpop_alg`: `Some(None)` for a profile
    /// without DPoP, `None` if a key has a problem. The key is loaded now,
    /// so `check` says what is wrong with it.
    fn dpop(&mut self, name: &str, p: &RawProfile) -> Option<Option<Dpop>> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        if p.dpop != Some(true) {
            let mut ok = true;
            for (k, set) in [
                ("dpop_key_file", p.dpop_key_file.is_some()),
                ("dpop_alg", p.dpop_alg.is_some()),
            ] {
                if set {
                    self.problem(key(k), "only used with dpop = true");
                    ok = false;
                }
            }
            return ok.then_some(None);
        }
        let alg = match p.dpop_alg.as_deref() {
            None => None,
            Some(a) => match Alg::parse(a).filter(|a| crate::dpop::ALGS.contains(&a.as_str())) {
                Some(a) => Some(a),
                None => {
                    self.one_of(&key("dpop_alg"), a, &crate::dpop::ALGS);
                    return None;
                }
            },
        };
        let key_file = p.dpop_key_file.as_deref().map(|f| self.path(f));
        match &key_file {
            Some(path) => {
                if let Err(e) = crate::dpop::ProfileKey::new(name, Some(path), alg) {
                    let at = if matches!(e, crate::keys::KeyError::AlgMismatch { .. }) {
                        "dpop_alg"
                    } else {
                        "dpop_key_file"
                    };
                    self.problem(key(at), e.to_string());
                    return None;
                }
            }
            None if matches!(alg, Some(Alg::PS256 | Alg::RS256)) => {
                self.problem(
                    key("dpop_alg"),
                    "an RSA key is not generated; set dpop_key_file to an RSA key, or use ES256 or EdDSA",
                );
                return None;
            }
            None => {}
        }
        Some(Some(Dpop { key_file, alg }))
    }

    fn secret_source(&mut self, name: &str, p: &RawProfile) -> Option<secret::Source> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        match (&p.client_secret_file, &p.client_secret_env) {
            (Some(f), None) => {
                let path = self.readable_file(&key("client_secret_file"), f);
                let src = secret::Source::File(path);
                if let Err(e @ secret::Error::Empty { .. }) = src.read() {
                    self.problem(key("client_secret_file"), e.to_string());
                }
                Some(src)
            }
            (None, Some(var)) => {
                let src = secret::Source::Env(var.clone());
                if let Err(e) = src.read() {
                    self.problem(key("client_secret_env"), e.to_string());
                }
                Some(src)
            }
            (Some(_), Some(_)) => {
                self.problem(
                    key("client_secret_file"),
                    "set either client_secret_file or client_secret_env, not both",
                );
                None
            }
            (None, None) => {
                let method = p.auth_method.as_deref().unwrap_or("client_secret_basic");
                self.problem(
                    key("client_secret_file"),
                    format!("missing; auth_method {method:?} needs client_secret_file or client_secret_env"),
                );
                None
            }
        }
    }

    pub(super) fn signing_alg(&mut self, key: &str, alg: Option<&str>) -> Result<Option<Alg>, ()> {
        match alg {
            None => Ok(None),
            Some(a) => match Alg::parse(a) {
                Some(alg) => Ok(Some(alg)),
                None => {
                    self.one_of(key, a, &Alg::ALL);
                    Err(())
                }
            },
        }
    }

    /// The client authentication of a profile: each method's own keys,
    /// present and valid; keys of other methods refused.
    fn client_auth(&mut self, name: &str, p: &RawProfile, kind: &str) -> Option<ClientAuth> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        // With an assertion or a subject token as the proof, no client
        // authentication unless a secret says otherwise.
        let default = match kind {
            "client_credentials" => "client_secret_basic",
            _ if p.client_secret_file.is_some() || p.client_secret_env.is_some() => {
                "client_secret_basic"
            }
            _ => "none",
        };
        let method = p.auth_method.as_deref().unwrap_or(default);
        // Which keys each method reads.
        let uses: &[&str] = match method {
            "none" if kind != "client_credentials" => &[],
            "none" => {
                self.problem(
                    key("auth_method"),
                    "\"none\" is only for grant = \"jwt_bearer\" or \"token_exchange\"; client credentials need client authentication",
                );
                return None;
            }
            "private_key_jwt" | "client_secret_jwt" if kind == "jwt_bearer" => {
                self.problem(
                    key("auth_method"),
                    format!("{method:?} is not offered with grant = \"jwt_bearer\", whose private_key_file, key_id, signing_alg and assertion_audience sign the grant's assertion; use \"none\", \"client_secret_basic\", \"client_secret_post\" or \"tls_client_auth\""),
                );
                return None;
            }
            "client_secret_basic" | "client_secret_post" => {
                &["client_secret_file", "client_secret_env"]
            }
            "client_secret_jwt" => &[
                "client_secret_file",
                "client_secret_env",
                "key_id",
                "signing_alg",
                "assertion_audience",
            ],
            "private_key_jwt" if p.client_assertion_file.is_some() => &["client_assertion_file"],
            "private_key_jwt" => &[
                "private_key_file",
                "key_id",
                "signing_alg",
                "assertion_audience",
            ],
            "tls_client_auth" => &["client_cert_file", "client_key_file"],
            other => {
                let mut allowed = METHODS.to_vec();
                if kind != "client_credentials" {
                    allowed.insert(0, "none");
                }
                self.one_of(&key("auth_method"), other, &allowed);
                // Still check a secret that is named: report everything at once.
                if p.client_secret_file.is_some() || p.client_secret_env.is_some() {
                    self.secret_source(name, p);
                }
                return None;
            }
        };
        let mut stray = false;
        for (k, set) in [
            ("client_secret_file", p.client_secret_file.is_some()),
            ("client_secret_env", p.client_secret_env.is_some()),
            ("private_key_file", p.private_key_file.is_some()),
            ("key_id", p.key_id.is_some()),
            ("signing_alg", p.signing_alg.is_some()),
            ("assertion_audience", p.assertion_audience.is_some()),
            ("client_assertion_file", p.client_assertion_file.is_some()),
            ("client_cert_file", p.client_cert_file.is_some()),
            ("client_key_file", p.client_key_file.is_some()),
        ] {
            if set && !uses.contains(&k) {
                let why = if method == "private_key_jwt" && p.client_assertion_file.is_some() {
                    format!("not used by auth_method {method:?} with client_assertion_file")
                } else {
                    format!("not used by auth_method {method:?}")
                };
                self.problem(key(k), why);
                stray = true;
            }
        }
        let auth = match method {
            "none" => Some(ClientAuth::None),
            "client_secret_basic" => self.secret_source(name, p).map(ClientAuth::SecretBasic),
            "client_secret_post" => self.secret_source(name, p).map(ClientAuth::SecretPost),
            "client_secret_jwt" => {
                let secret = self.secret_source(name, p);
                let alg = match self.signing_alg(&key("signing_alg"), p.signing_alg.as_deref()) {
                    Ok(Some(a)) if !a.is_hmac() => {
                        self.problem(
                            key("signing_alg"),
                            format!("{a} is not an HMAC algorithm; client_secret_jwt uses HS256, HS384 or HS512"),
                        );
                        None
                    }
                    Ok(a) => Some(a.unwrap_or(Alg::HS256)),
                    Err(()) => None,
                };
                Some(ClientAuth::SecretJwt {
                    secret: secret?,
                    alg: alg?,
                    key_id: p.key_id.clone(),
                })
            }
            "private_key_jwt" => match (&p.private_key_file, &p.client_assertion_file) {
                (_, Some(f)) => {
                    let path = self.readable_file(&key("client_assertion_file"), f);
                    Some(ClientAuth::ClientAssertion(secret::Source::File(path)))
                }
                (Some(f), None) => {
                    let path = self.path(f);
                    let alg = self.signing_alg(&key("signing_alg"), p.signing_alg.as_deref());
                    match (SigningKey::load(&path), alg) {
                        (Ok(k), Ok(alg)) => match k.alg(alg) {
                            Ok(_) => Some(ClientAuth::PrivateKeyJwt {
                                key_file: path,
                                alg,
                                key_id: p.key_id.clone(),
                            }),
                            Err(e) => {
                                self.problem(key("signing_alg"), e.to_string());
                                None
                            }
                        },
                        (Err(e), _) => {
                            self.problem(key("private_key_file"), e.to_string());
                            None
                        }
                        (_, Err(())) => None,
                    }
                }
                (None, None) => {
                    self.problem(
                        key("private_key_file"),
                        "missing; private_key_jwt needs private_key_file or client_assertion_file",
                    );
                    None
                }
            },
            "tls_client_auth" => match (&p.client_cert_file, &p.client_key_file) {
                (Some(c), Some(k)) => {
                    let (cert, key_file) = (self.path(c), self.path(k));
                    match crate::tls::load_identity(&cert, &key_file) {
                        Ok(_) => Some(ClientAuth::TlsClientAuth {
                            cert_file: cert,
                            key_file,
                        }),
                        Err(e) => {
                            self.problem(key("client_cert_file"), e.to_string());
                            None
                        }
                    }
                }
                (None, _) => {
                    self.problem(
                        key("client_cert_file"),
                        "missing; tls_client_auth needs client_cert_file and client_key_file",
                    );
                    None
                }
                (_, None) => {
                    self.problem(
                        key("client_key_file"),
                        "missing; tls_client_auth needs client_cert_file and client_key_file",
                    );
                    None
                }
            },
            _ => None,
        };
        auth.filter(|_| !stray)
    }

    fn profile(&mut self, name: &str, p: RawProfile, kind: &str) -> Option<Profile> {
        let key = |k: &str| format!("profiles.{name}.{k}");
        let mut ok = true;
        let (grant, google) = self.grant(name, &p, kind);
        let endpoint = match (&p.token_url, &p.issuer) {
            // A Google key file names its token endpoint.
            (None, None) if p.google_credentials_file.is_some() => {
                google.clone().map(|(uri, _)| Endpoint::TokenUrl(uri))
            }
            (Some(u), None) => self.https_url(&key("token_url"), u).map(Endpoint::TokenUrl),
            (None, Some(u)) => self.https_url(&key("issuer"), u).map(Endpoint::Issuer),
            (Some(_), Some(_)) => {
                self.problem(key("issuer"), "set either token_url or issuer, not both");
                None
            }
            (None, None) => {
                self.problem(
                    key("token_url"),
                    "missing; set token_url, or issuer for discovery",
                );
                None
            }
        };
        let client_id = match (&p.client_id, &google) {
            (Some(id), _) if !id.is_empty() => Some(id.clone()),
            (_, Some((_, email))) => Some(email.clone()),
            // Only client authentication needs an id.
            _ if kind != "client_credentials" => Some(String::new()),
            _ => {
                self.problem(key("client_id"), "missing");
                None
            }
        };
        // A jwt_bearer profile's key settings sign its assertion, not the
        // client authentication.
        let for_auth = if kind == "jwt_bearer" {
            RawProfile {
                private_key_file: None,
                key_id: None,
                signing_alg: None,
                assertion_audience: None,
                ..p.clone()
            }
        } else {
            p.clone()
        };
        let auth = self.client_auth(name, &for_auth, kind);
        if kind != "client_credentials"
            && p.client_id.as_deref().unwrap_or("").is_empty()
            && google.is_none()
            && auth.as_ref().is_some_and(|a| *a != ClientAuth::None)
        {
            self.problem(key("client_id"), "missing; client authentication needs it");
            ok = false;
        }
        let basic_encoding = match p.basic_encoding.as_deref().unwrap_or("form") {
            "form" => BasicEncoding::Form,
            "raw" => BasicEncoding::Raw,
            other => {
                self.one_of(&key("basic_encoding"), other, &["form", "raw"]);
                ok = false;
                BasicEncoding::Form
            }
        };
        let mut token_headers = Vec::new();
        for (h, v) in p.token_headers.unwrap_or_default() {
            match (
                HeaderName::try_from(h.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) {
                (Ok(n), Ok(v)) => token_headers.push((n, v)),
                _ => {
                    self.problem(
                        key(&format!("token_headers.{h}")),
                        "invalid header name or value",
                    );
                    ok = false;
                }
            }
        }
        for r in p.resources.iter().flatten() {
            if url::Url::parse(r).is_err() {
                self.problem(
                    key("resources"),
                    format!("{r:?} is not an absolute URI (RFC 8707)"),
                );
                ok = false;
            }
        }
        let ca_file = self.ca_file(&key("ca_file"), p.ca_file.as_deref());
        Some(Profile {
            name: name.to_owned(),
            endpoint: endpoint?,
            client_id: client_id?,
            auth: auth?,
            assertion_audience: p.assertion_audience,
            scopes: p.scopes.unwrap_or_default(),
            audience: p.audience,
            resources: p.resources.unwrap_or_default(),
            ca_file,
            extra_params: p.extra_params.unwrap_or_default().into_iter().collect(),
            token_headers,
            basic_encoding,
            cache: CacheMode::Local,
            dpop: None,
            grant: grant?,
        })
        .filter(|_| ok)
    }
}
