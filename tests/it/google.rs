//! Google service account key files (`google_credentials_file`, issue 18):
//! the proxy against a local fake of Google's token endpoint that checks
//! the documented request shape (support/google.rs: a fake of the shape,
//! not Google), a key rotated on disk, malformed files at `check`, and
//! Google's refusals surfaced per profile. The fake itself is tested first,
//! against assertions signed here, so its checks are known to bite.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::google::*;
use crate::support::*;

const KEY_FILE: &str = "service-account.json";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A CA, the fake token endpoint trusting `trusted` keys of
/// [`CLIENT_EMAIL`], a Google-API stand-in, and a directory with the CA
/// and a key file for `file_key` whose `token_uri` is the fake.
struct Google {
    pki: Pki,
    fake: GoogleTokenServer,
    api: GoogleApi,
    dir: tempfile::TempDir,
}

impl Google {
    async fn new(trusted: &[&Key], file_key: &Key) -> Self {
        let pki = Pki::new();
        let fake = GoogleTokenServer::start(&pki).await;
        for key in trusted {
            fake.trust(CLIENT_EMAIL, key);
        }
        let api = GoogleApi::start(&pki, &fake).await;
        let dir = tempfile::tempdir().unwrap();
        pki.write_ca(dir.path());
        let g = Self {
            pki,
            fake,
            api,
            dir,
        };
        g.write_key(file_key);
        g
    }

    fn key_path(&self) -> std::path::PathBuf {
        self.dir.path().join(KEY_FILE)
    }

    /// (Re)writes the key file for `key`, as a rotation lands.
    fn write_key(&self, key: &Key) {
        write_atomically(
            &self.key_path(),
            &key_file(key, CLIENT_EMAIL, &self.fake.token_uri()),
        );
    }

    /// Profile `google` from the key file, two scopes, trusting the test
    /// CA; route `storage.googleapis.com` → the API stand-in.
    fn config(&self) -> String {
        format!(
            r#"{sections}
[profiles.google]
grant = "jwt_bearer"
google_credentials_file = "{KEY_FILE}"
scopes = ["{CLOUD_PLATFORM}", "{STORAGE_READ}"]
ca_file = "ca.pem"

[[routes]]
host = "storage.googleapis.com"
upstream = "{api}"
profile = "google"
ca_file = "ca.pem"
"#,
            sections = test_sections("5s"),
            api = self.api.url(),
        )
    }

    async fn start(&self) -> token_injector::Running {
        start_in(self.dir.path(), &self.config()).await
    }

    /// A client for the fake itself (trusting the test CA).
    fn client(&self) -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([reqwest::Certificate::from_pem(self.pki.ca_pem.as_bytes()).unwrap()])
            .build()
            .unwrap()
    }
}

async fn admin_json(admin: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let r = direct_client()
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap(),
    )
}

// ---------------------------------------------------------------------------
// The fake, against assertions signed here.

fn header(kid: &str) -> Value {
    json!({"alg": "RS256", "typ": "JWT", "kid": kid})
}

fn claims(aud: &str, now: i64) -> Value {
    json!({
        "iss": CLIENT_EMAIL,
        "scope": CLOUD_PLATFORM,
        "aud": aud,
        "iat": now,
        "exp": now + 3600,
    })
}

/// One request to the fake.
struct Post<'a> {
    content_type: &'a str,
    form: Vec<(&'a str, String)>,
    authorization: Option<&'a str>,
}

impl<'a> Post<'a> {
    fn assertion(jwt: String) -> Self {
        Self {
            content_type: "application/x-www-form-urlencoded",
            form: vec![("grant_type", JWT_BEARER.to_owned()), ("assertion", jwt)],
            authorization: None,
        }
    }

    async fn send(self, client: &reqwest::Client, url: &str) -> (u16, Value) {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(self.form.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        let mut req = client
            .post(url)
            .header("content-type", self.content_type)
            .body(body);
        if let Some(a) = self.authorization {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
        )
    }
}

#[tokio::test]
async fn the_fake_refuses_what_google_refuses() {
    let g = Google::new(&[&KEY_A], &KEY_A).await;
    let client = g.client();
    let uri = g.fake.token_uri();
    let now = unix_now();
    let a = KEY_A.private_key_id;
    let signed = |h: Value, c: Value| KEY_A.sign(&h, &c);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims(&uri, now);
        f(&mut c);
        KEY_A.sign(&header(a), &c)
    };

    // The documented request: 200 with exactly Google's three members.
    let (status, body) = Post::assertion(signed(header(a), claims(&uri, now)))
        .send(&client, &uri)
        .await;
    assert_eq!(status, 200, "{body}");
    let members: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        members,
        ["access_token", "expires_in", "token_type"],
        "{body}"
    );
    let token = body["access_token"].as_str().unwrap();
    assert!(token.starts_with("ya29."), "{body}");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["token_type"], "Bearer");
    assert!(g.fake.valid(token));
    assert_eq!(g.fake.issued(token).unwrap().kid, a);
    // Domain-wide delegation: a `sub` that is an email is accepted.
    let (status, body) = Post::assertion(with(&|c| c["sub"] = json!("user@example.com")))
        .send(&client, &uri)
        .await;
    assert_eq!(status, 200, "{body}");

    // Each refusal: (what, request, status, error, description or None).
    let tampered = {
        let jwt = signed(header(a), claims(&uri, now));
        let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
        let mut c = claims(&uri, now);
        c["scope"] = json!("https://www.googleapis.com/auth/admin");
        parts[1] = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            c.to_string(),
        );
        parts.join(".")
    };
    let key_mismatch = KEY_B.sign(&header(a), &claims(&uri, now));
    let unknown_kid = KEY_B.sign(&header(KEY_B.private_key_id), &claims(&uri, now));
    let mut extra = Post::assertion(signed(header(a), claims(&uri, now)));
    extra.form.push(("client_id", "12345".into()));
    let mut basic = Post::assertion(signed(header(a), claims(&uri, now)));
    basic.authorization = Some("Basic Y2xpZW50OnNlY3JldA==");
    let mut json_body = Post::assertion(signed(header(a), claims(&uri, now)));
    json_body.content_type = "application/json";
    let mut wrong_grant = Post::assertion(signed(header(a), claims(&uri, now)));
    wrong_grant.form[0].1 = "client_credentials".into();
    let no_assertion = Post {
        content_type: "application/x-www-form-urlencoded",
        form: vec![("grant_type", JWT_BEARER.to_owned())],
        authorization: None,
    };
    let cases: Vec<(&str, Post, u16, &str, Option<&str>)> = vec![
        (
            "signed by another key",
            Post::assertion(key_mismatch),
            400,
            "invalid_grant",
            Some(BAD_SIGNATURE),
        ),
        (
            "a kid Google does not know",
            Post::assertion(unknown_kid),
            400,
            "invalid_grant",
            Some(BAD_SIGNATURE),
        ),
        (
            "claims changed after signing",
            Post::assertion(tampered),
            400,
            "invalid_grant",
            Some(BAD_SIGNATURE),
        ),
        (
            "no kid",
            Post::assertion(signed(
                json!({"alg": "RS256", "typ": "JWT"}),
                claims(&uri, now),
            )),
            400,
            "invalid_grant",
            None,
        ),
        (
            "alg not RS256",
            Post::assertion(signed(
                json!({"alg": "PS256", "typ": "JWT", "kid": a}),
                claims(&uri, now),
            )),
            400,
            "invalid_grant",
            None,
        ),
        (
            "typ not JWT",
            Post::assertion(signed(
                json!({"alg": "RS256", "typ": "at+jwt", "kid": a}),
                claims(&uri, now),
            )),
            400,
            "invalid_grant",
            None,
        ),
        (
            "longer than an hour",
            Post::assertion(with(&|c| c["exp"] = json!(now + 3601))),
            400,
            "invalid_grant",
            Some(BAD_TIMEFRAME),
        ),
        (
            "issued ten minutes ahead",
            Post::assertion(with(&|c| {
                c["iat"] = json!(now + 600);
                c["exp"] = json!(now + 1200);
            })),
            400,
            "invalid_grant",
            Some(BAD_TIMEFRAME),
        ),
        (
            "expired",
            Post::assertion(with(&|c| {
                c["iat"] = json!(now - 200);
                c["exp"] = json!(now - 100);
            })),
            400,
            "invalid_grant",
            Some(BAD_TIMEFRAME),
        ),
        (
            "iat as a string",
            Post::assertion(with(&|c| c["iat"] = json!(now.to_string()))),
            400,
            "invalid_grant",
            Some(BAD_TIMEFRAME),
        ),
        (
            "an empty scope",
            Post::assertion(with(&|c| c["scope"] = json!(""))),
            400,
            "invalid_scope",
            Some(BAD_SCOPE),
        ),
        (
            "no scope",
            Post::assertion(with(&|c| {
                c.as_object_mut().unwrap().remove("scope");
            })),
            400,
            "invalid_scope",
            Some(BAD_SCOPE),
        ),
        (
            "aud is Google's real endpoint, not this one",
            Post::assertion(with(&|c| {
                c["aud"] = json!("https://oauth2.googleapis.com/token")
            })),
            400,
            "invalid_grant",
            Some(BAD_AUDIENCE),
        ),
        (
            "an unknown service account",
            Post::assertion(with(&|c| {
                c["iss"] = json!("someone-else@fake-project.iam.gserviceaccount.com")
            })),
            400,
            "invalid_grant",
            Some(UNKNOWN_ACCOUNT),
        ),
        (
            "sub not an email",
            Post::assertion(with(&|c| c["sub"] = json!("not-an-email"))),
            400,
            "invalid_grant",
            Some(BAD_SUBJECT),
        ),
        (
            "a client_id besides the assertion",
            extra,
            400,
            "invalid_request",
            None,
        ),
        ("client authentication", basic, 400, "invalid_request", None),
        ("a JSON body", json_body, 400, "invalid_request", None),
        (
            "another grant type",
            wrong_grant,
            400,
            "unsupported_grant_type",
            None,
        ),
        (
            "no assertion",
            no_assertion,
            400,
            "invalid_request",
            Some("Missing required parameter: assertion"),
        ),
        (
            "not a JWT",
            Post::assertion("not.a-jwt".into()),
            400,
            "invalid_grant",
            None,
        ),
    ];
    let n = cases.len();
    for (what, post, want_status, want_error, want_description) in cases {
        let (status, body) = post.send(&client, &uri).await;
        assert_eq!(status, want_status, "{what}: {body}");
        assert_eq!(body["error"], want_error, "{what}: {body}");
        assert!(body["error_description"].is_string(), "{what}: {body}");
        if let Some(d) = want_description {
            assert_eq!(body["error_description"], d, "{what}: {body}");
        }
        assert!(body.get("access_token").is_none(), "{what}: {body}");
    }
    // Everything was recorded, with its answer.
    let received = g.fake.received();
    assert_eq!(received.len(), n + 2);
    assert_eq!(
        received.iter().filter(|r| r.accepted()).count(),
        2,
        "{received:#?}"
    );
    // A configured refusal comes after the checks.
    g.fake.set_answer(Answer::Refuse {
        status: 403,
        error: "access_denied",
        description: "fake: refused by the test",
    });
    let (status, body) = Post::assertion(signed(header(a), claims(&uri, now)))
        .send(&client, &uri)
        .await;
    assert_eq!((status, &body["error"]), (403, &json!("access_denied")));

    // The key file is the console's shape, parsed back.
    let file: Value = serde_json::from_str(&key_file(&KEY_A, CLIENT_EMAIL, &uri)).unwrap();
    let fields: Vec<&String> = file.as_object().unwrap().keys().collect();
    let mut want = [
        "auth_provider_x509_cert_url",
        "auth_uri",
        "client_email",
        "client_id",
        "client_x509_cert_url",
        "private_key",
        "private_key_id",
        "project_id",
        "token_uri",
        "type",
        "universe_domain",
    ];
    want.sort();
    assert_eq!(fields, want);
    assert_eq!(file["type"], "service_account");
    assert_eq!(file["private_key"], KEY_A.pem);
    assert!(KEY_A.pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert_eq!(file["token_uri"], uri.as_str());
    assert_eq!(file["project_id"], "fake-project");
}

// ---------------------------------------------------------------------------
// The proxy.

#[tokio::test]
async fn google_service_account_file_gets_a_token_the_documented_way() {
    let g = Google::new(&[&KEY_A], &KEY_A).await;
    let app = g.start().await;
    let client = proxied_client(app.proxy_addr());
    let r = client
        .get("http://storage.googleapis.com/storage/v1/b?project=fake-project")
        .header("authorization", "Bearer from-the-app")
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "{body}");

    // The token request: exactly what Google documents.
    let received = g.fake.received();
    assert_eq!(received.len(), 1, "one token for an hour: {received:#?}");
    let req = &received[0];
    assert!(req.accepted(), "the fake refused: {req:#?}");
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/token"));
    assert!(
        req.content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded")),
        "{req:#?}"
    );
    assert_eq!(req.authorization, None, "no client authentication");
    let mut names = req.form_names();
    names.sort();
    assert_eq!(names, ["assertion", "grant_type"], "{req:#?}");
    assert_eq!(req.form_value("grant_type"), Some(JWT_BEARER));
    assert_eq!(
        req.header.as_ref().unwrap(),
        &json!({"alg": "RS256", "typ": "JWT", "kid": KEY_A.private_key_id}),
        "the JWS header"
    );
    let token_uri = g.fake.token_uri();
    assert_eq!(req.claim("iss"), Some(&json!(CLIENT_EMAIL)));
    assert_eq!(
        req.claim("scope"),
        Some(&json!(format!("{CLOUD_PLATFORM} {STORAGE_READ}"))),
        "scopes space-delimited"
    );
    assert_eq!(req.claim("aud"), Some(&json!(token_uri)));
    assert_eq!(req.claim("sub"), None, "no domain-wide delegation asked");
    let iat = req.claim("iat").and_then(Value::as_i64).unwrap();
    let exp = req.claim("exp").and_then(Value::as_i64).unwrap();
    assert!((iat - req.now).abs() <= 5, "iat {iat}, now {}", req.now);
    assert!(
        exp > iat && exp - iat <= MAX_ASSERTION_SECS,
        "iat {iat}, exp {exp}"
    );

    // The API saw the fake's token, not the app's.
    let Outcome::Issued { access_token, .. } = &req.outcome else {
        unreachable!()
    };
    let seen = g.api.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {access_token}").as_str())
    );
    assert!(access_token.starts_with("ya29."));
    assert_eq!(seen[0].path, "/storage/v1/b?project=fake-project");

    let (status, ready) = admin_json(app.admin_addr(), "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["profiles"]["google"]["state"], "valid", "{ready}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_rotated_key_file_is_used_at_the_next_request() {
    let g = Google::new(&[&KEY_A, &KEY_B], &KEY_A).await;
    // Two-second tokens: renewals come every second or so.
    g.fake.set_answer(Answer::Issue(2));
    let app = g.start().await;
    let client = proxied_client(app.proxy_addr());
    let a = KEY_A.private_key_id;
    let b = KEY_B.private_key_id;
    g.fake
        .wait_for(Duration::from_secs(10), "a token for key A", |r| {
            r.iter().any(|r| r.accepted() && r.kid() == Some(a))
        })
        .await;
    let r = client
        .get("http://storage.googleapis.com/storage/v1/b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token_kid = |seen: &ApiSeen| {
        let token = seen.authorization.as_deref()?.strip_prefix("Bearer ")?;
        Some(g.fake.issued(token)?.kid)
    };
    assert_eq!(token_kid(&g.api.seen()[0]).as_deref(), Some(a));

    // The Secret is updated with a new key file: key B, its own id.
    g.write_key(&KEY_B);
    let rotated_at = g.fake.count();
    g.fake
        .wait_for(Duration::from_secs(15), "two tokens for key B", |r| {
            r[rotated_at..]
                .iter()
                .filter(|r| r.accepted() && r.kid() == Some(b))
                .count()
                >= 2
        })
        .await;
    let received = g.fake.received();
    assert!(
        received.iter().all(Received::accepted),
        "every assertion verified: {received:#?}"
    );
    let kids: Vec<&str> = received.iter().map(|r| r.kid().unwrap()).collect();
    let first_b = kids.iter().position(|k| *k == b).unwrap();
    assert!(
        kids[first_b..].iter().all(|k| *k == b),
        "key A used again after key B: {kids:?}"
    );
    // At most the one request already under way when the file changed
    // went out with key A.
    assert!(first_b <= rotated_at + 1, "key B came late: {kids:?}");
    assert!(first_b > 0);

    // The proxy stored a key-B token before asking for the next one, so a
    // request now carries one.
    let r = client
        .get("http://storage.googleapis.com/storage/v1/b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = g.api.seen();
    assert_eq!(token_kid(seen.last().unwrap()).as_deref(), Some(b));
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_files_are_check_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let uri = "https://oauth2.googleapis.com/token";
    let good: Value = serde_json::from_str(&key_file(&KEY_A, CLIENT_EMAIL, uri)).unwrap();
    let edited = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = good.clone();
        f(v.as_object_mut().unwrap());
        v.to_string()
    };
    let without = |field: &'static str| {
        edited(&|m| {
            m.remove(field);
        })
    };
    // A PEM whose base64 is fine but whose DER lost its middle.
    let lines = KEY_A.body_lines();
    let truncated = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n{}\n-----END PRIVATE KEY-----\n",
        lines[..4].join("\n"),
        lines[lines.len() - 2..].join("\n")
    );
    // An EC P-256 key, PKCS#8 PEM: not what Google issues.
    let ec_pem = {
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, doc.as_ref());
        let body: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            body.join("\n")
        )
    };
    let ec_lines: Vec<String> = ec_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect();
    // A user's gcloud credentials: a refresh token and a client secret.
    let authorized_user = r#"{
  "account": "",
  "client_id": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
  "client_secret": "d-FL95Q19q7MQmFpd7hHD0Ty",
  "quota_project_id": "fake-project",
  "refresh_token": "1//0fake-refresh-token-never-shown",
  "type": "authorized_user",
  "universe_domain": "googleapis.com"
}"#;
    // (what, file contents or None for no file, the field the error names)
    let cases: Vec<(&str, Option<String>, Option<&str>)> = vec![
        (
            "no client_email",
            Some(without("client_email")),
            Some("client_email"),
        ),
        (
            "no private_key",
            Some(without("private_key")),
            Some("private_key"),
        ),
        (
            "no private_key_id",
            Some(without("private_key_id")),
            Some("private_key_id"),
        ),
        (
            "no token_uri",
            Some(without("token_uri")),
            Some("token_uri"),
        ),
        ("no type", Some(without("type")), Some("type")),
        (
            "client_email not a string",
            Some(edited(&|m| {
                m.insert("client_email".into(), json!(42));
            })),
            Some("client_email"),
        ),
        (
            "an empty client_email",
            Some(edited(&|m| {
                m.insert("client_email".into(), json!(""));
            })),
            Some("client_email"),
        ),
        (
            "token_uri not https",
            Some(edited(&|m| {
                m.insert(
                    "token_uri".into(),
                    json!("http://oauth2.googleapis.com/token"),
                );
            })),
            Some("token_uri"),
        ),
        (
            "a truncated private key",
            Some(edited(&|m| {
                m.insert("private_key".into(), json!(truncated));
            })),
            Some("private_key"),
        ),
        (
            "a private key that is not PEM",
            Some(edited(&|m| {
                m.insert("private_key".into(), json!(lines.concat()));
            })),
            Some("private_key"),
        ),
        (
            "an EC private key",
            Some(edited(&|m| {
                m.insert("private_key".into(), json!(ec_pem));
            })),
            Some("private_key"),
        ),
        (
            "an authorized_user file",
            Some(authorized_user.to_owned()),
            Some("type"),
        ),
        ("not JSON", Some("private_key = nope\n".to_owned()), None),
        ("an empty file", Some(String::new()), None),
        ("a JSON array", Some("[]".to_owned()), None),
        ("no file", None, None),
    ];
    let config = format!(
        r#"{sections}
[profiles.google]
grant = "jwt_bearer"
google_credentials_file = "{KEY_FILE}"
scopes = ["{CLOUD_PLATFORM}"]

[[routes]]
host = "storage.googleapis.com"
profile = "google"
"#,
        sections = test_sections("5s"),
    );
    let load =
        || token_injector::config::from_text(&config, dir.path(), Vec::<(String, String)>::new());
    let path = dir.path().join(KEY_FILE);

    // The good file passes, so each failure below is its own edit's.
    std::fs::write(&path, good.to_string()).unwrap();
    if let Err(e) = load() {
        panic!("the good file was refused:\n{e}");
    }

    let secrets: Vec<&str> = lines
        .iter()
        .copied()
        .chain(ec_lines.iter().map(String::as_str))
        .chain([
            "PRIVATE KEY",
            "d-FL95Q19q7MQmFpd7hHD0Ty",
            "1//0fake-refresh-token-never-shown",
        ])
        .collect();
    // Every case is tried; the failures are listed together.
    let mut failures = Vec::new();
    for (what, contents, field) in cases {
        match &contents {
            Some(text) => std::fs::write(&path, text).unwrap(),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        let err = match load() {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                continue;
            }
            Err(e) => e,
        };
        let lines = err.lines();
        // One problem, one line: a broken file is not also a missing
        // token_url (the file's token_uri could not be read).
        let named = lines_about(
            &mut failures,
            what,
            &lines,
            "profiles.google.google_credentials_file:",
        );
        if let Some(field) = field {
            let quoted = format!("\"{field}\"");
            if !named.iter().any(|l| l.contains(&quoted)) {
                failures.push(format!("{what}: no line names {quoted}:\n{lines:#?}"));
            }
        }
        let text = err.to_string();
        for secret in &secrets {
            if text.contains(secret) {
                failures.push(format!(
                    "{what}: the error shows secret material {secret:?}:\n{text}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn google_errors_name_the_profile_and_reason() {
    // The file's private_key_id names key A, which Google has, but its
    // private_key is key B's (a key pasted from another file): Google
    // answers 400 invalid_grant "Invalid JWT Signature.".
    let mismatched = Key {
        private_key_id: KEY_A.private_key_id,
        pem: KEY_B.pem,
    };
    let g = Google::new(&[&KEY_A], &mismatched).await;
    let app = g.start().await;
    let client = proxied_client(app.proxy_addr());
    g.fake.wait_for_requests(1, Duration::from_secs(10)).await;
    let received = g.fake.received();
    assert_eq!(
        received[0].outcome,
        Outcome::Refused {
            status: 400,
            error: "invalid_grant".into(),
            description: BAD_SIGNATURE.into(),
        },
        "{received:#?}"
    );
    let assertion = received[0].form_value("assertion").unwrap().to_owned();

    let r = client
        .get("http://storage.googleapis.com/storage/v1/b")
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_kind(&r).as_deref(), Some("token_unavailable"));
    let body = r.text().await.unwrap();
    assert!(body.contains("\"google\""), "names the profile: {body}");
    assert!(body.contains("invalid_grant"), "names the reason: {body}");
    assert!(g.api.seen().is_empty(), "nothing forwarded without a token");

    let admin = app.admin_addr();
    let (status, ready) = eventually(Duration::from_secs(10), move || async move {
        let (status, v) = admin_json(admin, "/readyz").await;
        v["profiles"]["google"]["last_error"]
            .is_string()
            .then_some((status, v))
    })
    .await;
    assert_eq!(status, 503, "{ready}");
    let google = &ready["profiles"]["google"];
    assert_eq!(google["state"], "pending", "{ready}");
    let last_error = google["last_error"].as_str().unwrap();
    assert!(last_error.contains("invalid_grant"), "{last_error}");
    assert!(
        last_error.contains(BAD_SIGNATURE),
        "Google's description is the operator's clue: {last_error}"
    );

    // Neither the key nor the signed assertion shows anywhere.
    let metrics = scrape(admin).await;
    for shown in [&body, &ready.to_string(), &metrics] {
        assert!(!shown.contains(&assertion), "the assertion leaked");
        for line in KEY_B.body_lines() {
            assert!(!shown.contains(line), "the private key leaked");
        }
    }

    // The key is fixed (the right file lands): tokens flow, the error clears.
    g.write_key(&KEY_A);
    let r = eventually(Duration::from_secs(15), || {
        let client = client.clone();
        async move {
            let r = client
                .get("http://storage.googleapis.com/storage/v1/b")
                .send()
                .await
                .unwrap();
            (r.status() == 200).then_some(r)
        }
    })
    .await;
    assert_eq!(r.status(), 200);
    let (_, ready) = admin_json(admin, "/readyz").await;
    assert_eq!(ready["profiles"]["google"]["state"], "valid", "{ready}");
    assert!(
        ready["profiles"]["google"]["last_error"].is_null(),
        "{ready}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn token_url_overrides_the_files_token_uri() {
    let g = Google::new(&[&KEY_A], &KEY_A).await;
    // The file names an endpoint nothing listens on (port 1, loopback);
    // token_url points at the fake, and is the assertion's aud.
    write_atomically(
        &g.key_path(),
        &key_file(&KEY_A, CLIENT_EMAIL, "https://localhost:1/token"),
    );
    let text = g.config().replace(
        "[profiles.google]\n",
        &format!(
            "[profiles.google]\ntoken_url = \"{}\"\n",
            g.fake.token_uri()
        ),
    );
    let app = start_in(g.dir.path(), &text).await;
    let r = proxied_client(app.proxy_addr())
        .get("http://storage.googleapis.com/storage/v1/b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let received = g.fake.received();
    assert_eq!(received.len(), 1, "{received:#?}");
    assert!(received[0].accepted(), "{received:#?}");
    assert_eq!(
        received[0].claim("aud"),
        Some(&json!(g.fake.token_uri())),
        "aud follows token_url"
    );
    app.shutdown().await;
}
