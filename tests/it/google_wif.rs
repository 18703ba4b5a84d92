//! Google workload identity federation from an `external_account` file
//! (`google_credentials_file`, issue 18): the proxy against local fakes of
//! STS and IAM credentials shaped as Google documents them
//! (support/google_sts.rs: fakes of the shapes, not Google), driven by a
//! file like the one `gcloud iam workload-identity-pools create-cred-config`
//! writes. The fakes are tested first, so their checks are known to bite.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::support::google::{CLOUD_PLATFORM, STORAGE_READ, lines_about};
use crate::support::google_sts::*;
use crate::support::{
    Pki, direct_client, error_kind, eventually, proxied_client, scrape, start_in, test_sections,
    write_atomically,
};

const CREDS: &str = "gcp-wif.json";
const TOKEN_FILE: &str = "k8s-token";

/// A CA, the STS and IAM fakes, a Google-API stand-in taking their tokens,
/// and a directory with the CA.
struct Wif {
    pki: Pki,
    sts: StsServer,
    iam: IamServer,
    api: CloudApi,
    dir: tempfile::TempDir,
}

impl Wif {
    async fn new() -> Self {
        let pki = Pki::new();
        let sts = StsServer::start(&pki).await;
        let iam = IamServer::start(&pki, &sts).await;
        let api = CloudApi::start(&pki, &sts, &iam).await;
        let dir = tempfile::tempdir().unwrap();
        pki.write_ca(dir.path());
        Self {
            pki,
            sts,
            iam,
            api,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// (Re)writes a file in the directory, as the kubelet rotates one.
    fn write(&self, name: &str, text: &str) {
        write_atomically(&self.path(name), text);
    }

    fn write_credentials(&self, name: &str, account: &ExternalAccount) {
        self.write(name, &account.to_json());
    }

    /// An `external_account` reading the text subject token file `name`
    /// (an absolute path), exchanged at the STS fake.
    fn file_account(&self, name: &str) -> ExternalAccount {
        ExternalAccount::new(
            &self.sts.token_url(),
            file_source(&self.path(name), Format::Text),
        )
    }

    /// A fresh subject token in `TOKEN_FILE`, accepted by STS.
    fn new_subject(&self, tag: &str) -> String {
        let token = k8s_token(tag);
        self.sts.accept_subject(&token);
        self.write(TOKEN_FILE, &token);
        token
    }

    async fn start(&self, profiles: &str) -> token_injector::Running {
        start_in(
            self.dir.path(),
            &format!("{}\n{profiles}", test_sections("5s")),
        )
        .await
    }

    /// A client for the fakes themselves (trusting the test CA).
    fn client(&self) -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([reqwest::Certificate::from_pem(self.pki.ca_pem.as_bytes()).unwrap()])
            .build()
            .unwrap()
    }

    /// The subject token an API request's bearer came from, and the
    /// service account when it was impersonated.
    fn trace(&self, bearer: &str) -> Option<(String, Option<String>)> {
        match self.iam.issued(bearer) {
            Some(i) => Some((self.sts.issued(&i.sts_token)?.subject_token, Some(i.email))),
            None => Some((self.sts.issued(bearer)?.subject_token, None)),
        }
    }
}

/// Profile `name` from `creds`, with `scopes`, trusting the test CA, and a
/// route `host` → the API stand-in.
fn profile(w: &Wif, name: &str, creds: &str, scopes: &[&str], host: &str) -> String {
    format!(
        r#"
[profiles.{name}]
grant = "jwt_bearer"
google_credentials_file = "{creds}"
scopes = {scopes}
ca_file = "ca.pem"

[[routes]]
host = "{host}"
upstream = "{api}"
profile = "{name}"
ca_file = "ca.pem"
"#,
        scopes = Value::from(scopes.to_vec()),
        api = w.api.url(),
    )
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client
        .get(url)
        .header("authorization", "Bearer from-the-app")
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

async fn readyz(admin: std::net::SocketAddr) -> (u16, Value) {
    let r = direct_client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap(),
    )
}

/// Waits until the profile's `/readyz` `last_error` satisfies `done`.
async fn last_error_until(
    admin: std::net::SocketAddr,
    profile: &str,
    done: impl Fn(&str) -> bool + Clone,
) -> String {
    eventually(Duration::from_secs(15), || {
        let done = done.clone();
        async move {
            let (_, v) = readyz(admin).await;
            let e = v["profiles"][profile]["last_error"].as_str()?.to_owned();
            done(&e).then_some(e)
        }
    })
    .await
}

/// The STS request of this flow, checked parameter by parameter.
fn assert_sts_request(r: &StsReceived, subject: &str, scope: &str) {
    assert!(r.accepted(), "STS refused: {r:#?}");
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/token"));
    assert_eq!(
        r.content_type
            .as_deref()
            .and_then(|c| c.split(';').next())
            .map(str::trim),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(r.authorization, None, "no client authentication");
    let mut want = STS_PARAMS.to_vec();
    want.sort_unstable();
    assert_eq!(r.form_names(), want, "{r:#?}");
    assert_eq!(r.form_value("grant_type"), Some(TOKEN_EXCHANGE));
    assert_eq!(r.form_value("audience"), Some(AUDIENCE));
    assert_eq!(r.form_value("scope"), Some(scope));
    assert_eq!(
        r.form_value("requested_token_type"),
        Some(ACCESS_TOKEN_TYPE)
    );
    assert_eq!(r.form_value("subject_token"), Some(subject));
    assert_eq!(r.form_value("subject_token_type"), Some(JWT_TOKEN_TYPE));
}

// ---------------------------------------------------------------------------
// The fakes, against requests made here.

/// (what, form, `Authorization`, the `error` STS answers)
type StsCase = (
    String,
    Vec<(&'static str, String)>,
    Option<&'static str>,
    &'static str,
);
/// (what, account, bearer, body, the error's `code` and `status`)
type IamCase = (
    &'static str,
    &'static str,
    Option<String>,
    Value,
    u16,
    &'static str,
);

#[tokio::test]
async fn the_fakes_check_the_documented_shapes() {
    let w = Wif::new().await;
    let client = w.client();
    let subject = k8s_token("fake-test");
    w.sts.accept_subject(&subject);
    let sts_url = w.sts.token_url();
    let good_form = || -> Vec<(&'static str, String)> {
        vec![
            ("grant_type", TOKEN_EXCHANGE.into()),
            ("audience", AUDIENCE.into()),
            ("scope", CLOUD_PLATFORM.into()),
            ("requested_token_type", ACCESS_TOKEN_TYPE.into()),
            ("subject_token", subject.clone()),
            ("subject_token_type", JWT_TOKEN_TYPE.into()),
        ]
    };
    let post_form = |form: Vec<(&'static str, String)>, auth: Option<&'static str>| {
        let client = client.clone();
        let url = sts_url.clone();
        async move {
            let body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
                .finish();
            let mut req = client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (status, v)
        }
    };

    // STS: the documented request gets exactly the documented members.
    let (status, body) = post_form(good_form(), None).await;
    assert_eq!(status, 200, "{body}");
    let members: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        members,
        [
            "access_token",
            "expires_in",
            "issued_token_type",
            "token_type"
        ]
    );
    assert_eq!(body["issued_token_type"], ACCESS_TOKEN_TYPE);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let sts_token = body["access_token"].as_str().unwrap().to_owned();
    assert!(w.sts.valid(&sts_token));
    assert_eq!(w.sts.issued(&sts_token).unwrap().subject_token, subject);

    let edit = |name: &str, value: &str| {
        let mut f = good_form();
        f.iter_mut().find(|(k, _)| *k == name).unwrap().1 = value.to_owned();
        f
    };
    let without = |name: &str| {
        let mut f = good_form();
        f.retain(|(k, _)| *k != name);
        f
    };
    let mut extra = good_form();
    extra.push(("client_id", "x".into()));
    let mut twice = good_form();
    twice.push(("scope", CLOUD_PLATFORM.into()));
    let mut cases: Vec<StsCase> = vec![
        (
            "another provider".into(),
            edit("audience", &AUDIENCE.replace("k8s-provider", "other")),
            None,
            "invalid_target",
        ),
        (
            "a subject token the provider did not issue".into(),
            edit("subject_token", &k8s_token("stranger")),
            None,
            "invalid_grant",
        ),
        (
            "another grant".into(),
            edit("grant_type", "client_credentials"),
            None,
            "unsupported_grant_type",
        ),
        (
            "an id_token asked for".into(),
            edit(
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:id_token",
            ),
            None,
            "invalid_request",
        ),
        (
            "another subject token type".into(),
            edit("subject_token_type", ID_TOKEN_TYPE),
            None,
            "invalid_request",
        ),
        (
            "an empty scope".into(),
            edit("scope", ""),
            None,
            "invalid_scope",
        ),
        (
            "client authentication".into(),
            good_form(),
            Some("Basic Y2xpZW50OnNlY3JldA=="),
            "invalid_request",
        ),
        (
            "a parameter besides the six".into(),
            extra,
            None,
            "invalid_request",
        ),
        ("scope twice".into(), twice, None, "invalid_request"),
    ];
    for name in STS_PARAMS {
        cases.push((format!("no {name}"), without(name), None, "invalid_request"));
    }
    for (what, form, auth, want) in cases {
        let (status, body) = post_form(form, auth).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert_eq!(body["error"], want, "{what}: {body}");
        assert!(body["error_description"].is_string(), "{what}: {body}");
    }
    // A scope other than the expected one, when a test expects one.
    w.sts.expect_scope(CLOUD_PLATFORM);
    let (status, body) = post_form(edit("scope", STORAGE_READ), None).await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_scope")));
    // A JSON body.
    let r = client
        .post(&sts_url)
        .header("content-type", "application/json")
        .body(json!({"grant_type": TOKEN_EXCHANGE}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A configured refusal comes after the checks.
    w.sts.set_answer(StsAnswer::Refuse {
        status: 400,
        error: "invalid_grant",
        description: "fake: refused by the test",
    });
    let (status, body) = post_form(good_form(), None).await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_grant")));
    // A token that is already expired, for IAM below.
    w.sts.set_answer(StsAnswer::Issue(0));
    let (_, body) = post_form(good_form(), None).await;
    let expired = body["access_token"].as_str().unwrap().to_owned();
    assert!(!w.sts.valid(&expired));
    w.sts.set_answer(StsAnswer::Issue(3600));

    // IAM credentials.
    let iam = |email: &str, bearer: Option<String>, body: Value| {
        let client = client.clone();
        let url = w.iam.impersonation_url(email);
        async move {
            let mut req = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(b) = bearer {
                req = req.header("authorization", format!("Bearer {b}"));
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (status, v)
        }
    };
    let good_body = json!({"scope": [CLOUD_PLATFORM], "lifetime": "1800s"});
    let before = SystemTime::now();
    let (status, body) = iam(SERVICE_ACCOUNT, Some(sts_token.clone()), good_body.clone()).await;
    let after = SystemTime::now();
    assert_eq!(status, 200, "{body}");
    let members: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(members, ["accessToken", "expireTime"]);
    let token = body["accessToken"].as_str().unwrap();
    assert!(token.starts_with("ya29.c."));
    let issued = w.iam.issued(token).unwrap();
    assert_eq!(
        (issued.email.as_str(), issued.sts_token.as_str()),
        (SERVICE_ACCOUNT, sts_token.as_str())
    );
    let expire = body["expireTime"].as_str().unwrap();
    assert!(expire.ends_with('Z') && expire.len() == 20, "{expire}");
    let expire = humantime::parse_rfc3339(expire).unwrap();
    let lo = before + Duration::from_secs(1799);
    let hi = after + Duration::from_secs(1800);
    assert!(lo <= expire && expire <= hi, "{body}");
    // Without a lifetime: an hour.
    let (status, _) = iam(
        SERVICE_ACCOUNT,
        Some(sts_token.clone()),
        json!({"scope": [CLOUD_PLATFORM]}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(matches!(
        w.iam.received().last().unwrap().outcome,
        IamOutcome::Issued { lifetime, .. } if lifetime == 3600.0
    ));
    // Capped by the test.
    w.iam.cap_lifetime(Duration::from_secs(3));
    let (_, body) = iam(SERVICE_ACCOUNT, Some(sts_token.clone()), good_body.clone()).await;
    let expire = humantime::parse_rfc3339(body["expireTime"].as_str().unwrap()).unwrap();
    assert!(
        expire <= SystemTime::now() + Duration::from_secs(3),
        "{body}"
    );

    let cases: Vec<IamCase> = vec![
        (
            "no bearer",
            SERVICE_ACCOUNT,
            None,
            good_body.clone(),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "a bearer STS did not issue",
            SERVICE_ACCOUNT,
            Some("ya29.d.made-up".into()),
            good_body.clone(),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "an expired STS token",
            SERVICE_ACCOUNT,
            Some(expired),
            good_body.clone(),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "an account that does not trust the pool",
            "someone@fake-project.iam.gserviceaccount.com",
            Some(sts_token.clone()),
            good_body.clone(),
            403,
            "PERMISSION_DENIED",
        ),
        (
            "no scope",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"lifetime": "3600s"}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "scope as a string",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"scope": CLOUD_PLATFORM}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "an empty scope list",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"scope": []}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "lifetime as a number",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"scope": [CLOUD_PLATFORM], "lifetime": 3600}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "lifetime without its unit",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"scope": [CLOUD_PLATFORM], "lifetime": "3600"}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "lifetime over twelve hours",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"scope": [CLOUD_PLATFORM], "lifetime": "43201s"}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "an unknown member",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"scope": [CLOUD_PLATFORM], "scopes": [CLOUD_PLATFORM]}),
            400,
            "INVALID_ARGUMENT",
        ),
        (
            "delegates",
            SERVICE_ACCOUNT,
            Some(sts_token.clone()),
            json!({"scope": [CLOUD_PLATFORM], "delegates": []}),
            400,
            "INVALID_ARGUMENT",
        ),
    ];
    for (what, email, bearer, body, want_code, want_status) in cases {
        let (code, v) = iam(email, bearer, body).await;
        assert_eq!(code, want_code, "{what}: {v}");
        assert_eq!(v["error"]["code"], want_code, "{what}: {v}");
        assert_eq!(v["error"]["status"], want_status, "{what}: {v}");
        assert!(v["error"]["message"].is_string(), "{what}: {v}");
    }
    // A project ID instead of the wildcard; a form body.
    let url = w
        .iam
        .impersonation_url(SERVICE_ACCOUNT)
        .replace("/projects/-/", "/projects/fake-project/");
    let r = client
        .post(url)
        .bearer_auth(&sts_token)
        .header("content-type", "application/json")
        .body(good_body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(w.iam.impersonation_url(SERVICE_ACCOUNT))
        .bearer_auth(&sts_token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("scope=x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A configured refusal.
    w.iam.set_answer(IamAnswer::permission_denied());
    let (code, v) = iam(SERVICE_ACCOUNT, Some(sts_token.clone()), good_body).await;
    assert_eq!(
        (code, &v["error"]["status"]),
        (403, &json!("PERMISSION_DENIED"))
    );
    assert_eq!(v["error"]["message"], IAM_DENIED);

    // The URL source server.
    let md = SubjectTokenServer::start(Some(("Metadata-Flavor", "Google"))).await;
    md.set_text("/identity", "tok");
    let plain = direct_client();
    let r = plain
        .get(md.url("/identity?audience=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = plain
        .get(md.url("/identity?audience=x"))
        .header("metadata-flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tok");
    let r = plain
        .get(md.url("/other"))
        .header("metadata-flavor", "Google")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let seen = md.received();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].path, "/identity?audience=x");

    // The file: gcloud's fields in gcloud's order.
    let account = w
        .file_account(TOKEN_FILE)
        .impersonating(&w.iam.impersonation_url(SERVICE_ACCOUNT));
    let account = ExternalAccount {
        token_lifetime_seconds: Some(1800),
        ..account
    };
    let text = account.to_json();
    let order = [
        "\"universe_domain\"",
        "\"type\"",
        "\"audience\"",
        "\"subject_token_type\"",
        "\"token_url\"",
        "\"credential_source\"",
        "\"service_account_impersonation_url\"",
        "\"service_account_impersonation\"",
    ];
    let at: Vec<usize> = order.iter().map(|k| text.find(k).unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    let v = account.to_value();
    assert_eq!(v["type"], "external_account");
    assert_eq!(v["credential_source"]["format"]["type"], "text");
    assert_eq!(
        v["credential_source"]["file"],
        w.path(TOKEN_FILE).to_str().unwrap()
    );
    assert_eq!(
        v["service_account_impersonation"]["token_lifetime_seconds"],
        1800
    );
    assert!(text.starts_with("{\n  \"universe_domain\": \"googleapis.com\",\n"));
}

// ---------------------------------------------------------------------------
// The proxy.

#[tokio::test]
async fn wif_with_impersonation_end_to_end() {
    let w = Wif::new().await;
    let subject = w.new_subject("billing");
    w.sts.expect_scope(CLOUD_PLATFORM);
    let scopes = [STORAGE_READ, BIGQUERY_READ];
    // Profile `gcp`: the default lifetime; profile `gcp2`: another account,
    // a lifetime from the file.
    w.write_credentials(
        CREDS,
        &w.file_account(TOKEN_FILE)
            .impersonating(&w.iam.impersonation_url(SERVICE_ACCOUNT)),
    );
    w.write_credentials(
        "gcp-wif-2.json",
        &ExternalAccount {
            token_lifetime_seconds: Some(1800),
            ..w.file_account(TOKEN_FILE)
                .impersonating(&w.iam.impersonation_url(SERVICE_ACCOUNT_2))
        },
    );
    let app = w
        .start(&format!(
            "{}{}",
            profile(&w, "gcp", CREDS, &scopes, "storage.googleapis.com"),
            profile(
                &w,
                "gcp2",
                "gcp-wif-2.json",
                &[CLOUD_PLATFORM],
                "bigquery.googleapis.com"
            ),
        ))
        .await;
    let client = proxied_client(app.proxy_addr());
    let (status, body) = get(
        &client,
        "http://storage.googleapis.com/storage/v1/b?project=fake-project",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(
        &client,
        "http://bigquery.googleapis.com/bigquery/v2/projects",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // STS: one exchange per profile, each exactly the documented request,
    // the scope cloud-platform (impersonation follows).
    let sts = w.sts.received();
    assert_eq!(sts.len(), 2, "one token an hour per profile: {sts:#?}");
    for r in &sts {
        assert_sts_request(r, &subject, CLOUD_PLATFORM);
    }

    // IAM: the STS token as bearer, the profile's scopes, the lifetime.
    let iam = w.iam.received();
    assert_eq!(iam.len(), 2, "{iam:#?}");
    let sts_tokens: Vec<&str> = sts.iter().filter_map(|r| r.access_token()).collect();
    let by_email = |email: &str| {
        iam.iter()
            .find(|r| r.email.as_deref() == Some(email))
            .unwrap()
    };
    for (email, want_body) in [
        (
            SERVICE_ACCOUNT,
            json!({"scope": scopes, "lifetime": "3600s"}),
        ),
        (
            SERVICE_ACCOUNT_2,
            json!({"scope": [CLOUD_PLATFORM], "lifetime": "1800s"}),
        ),
    ] {
        let r = by_email(email);
        assert!(r.accepted(), "IAM refused: {r:#?}");
        assert_eq!(r.method, "POST");
        assert_eq!(
            r.path,
            format!("/v1/projects/-/serviceAccounts/{email}:generateAccessToken")
        );
        assert!(
            r.bearer().is_some_and(|b| sts_tokens.contains(&b)),
            "the bearer is an STS token: {r:#?}"
        );
        assert_eq!(
            r.content_type
                .as_deref()
                .and_then(|c| c.split(';').next())
                .map(str::trim),
            Some("application/json")
        );
        assert_eq!(r.json.as_ref(), Some(&want_body), "{}", r.body);
    }
    // Each profile's STS token went to its own IAM call.
    assert_ne!(
        by_email(SERVICE_ACCOUNT).bearer(),
        by_email(SERVICE_ACCOUNT_2).bearer()
    );

    // The APIs saw the impersonated tokens, not the STS ones nor the app's.
    let seen = w.api.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    for (s, email) in seen.iter().zip([SERVICE_ACCOUNT, SERVICE_ACCOUNT_2]) {
        let bearer = s.bearer().unwrap();
        assert_eq!(Some(bearer), by_email(email).access_token(), "{s:#?}");
        assert!(bearer.starts_with("ya29.c."));
        assert_eq!(
            w.trace(bearer),
            Some((subject.clone(), Some(email.to_owned())))
        );
    }
    assert_eq!(seen[0].path, "/storage/v1/b?project=fake-project");

    // Cached: more requests, no more exchanges.
    for _ in 0..3 {
        let (status, _) = get(&client, "http://storage.googleapis.com/storage/v1/b").await;
        assert_eq!(status, 200);
    }
    assert_eq!((w.sts.count(), w.iam.count()), (2, 2));

    let (status, ready) = readyz(app.admin_addr()).await;
    assert_eq!(status, 200, "{ready}");
    for p in ["gcp", "gcp2"] {
        assert_eq!(ready["profiles"][p]["state"], "valid", "{ready}");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn wif_without_impersonation_uses_the_sts_token() {
    let w = Wif::new().await;
    let subject = w.new_subject("reader");
    let scopes = [STORAGE_READ, BIGQUERY_READ];
    let joined = scopes.join(" ");
    w.sts.expect_scope(&joined);
    w.sts.set_answer(StsAnswer::Issue(3599));
    w.write_credentials(CREDS, &w.file_account(TOKEN_FILE));
    let app = w
        .start(&profile(
            &w,
            "gcp",
            CREDS,
            &scopes,
            "storage.googleapis.com",
        ))
        .await;
    let client = proxied_client(app.proxy_addr());
    let (status, body) = get(&client, "http://storage.googleapis.com/storage/v1/b").await;
    assert_eq!(status, 200, "{body}");

    let sts = w.sts.received();
    assert_eq!(sts.len(), 1, "{sts:#?}");
    assert_sts_request(&sts[0], &subject, &joined);
    assert_eq!(w.iam.count(), 0, "no impersonation URL, no IAM call");
    let seen = w.api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].bearer(), sts[0].access_token());
    assert_eq!(w.trace(seen[0].bearer().unwrap()), Some((subject, None)));
    let (status, ready) = readyz(app.admin_addr()).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["profiles"]["gcp"]["state"], "valid", "{ready}");
    app.shutdown().await;
}

#[tokio::test]
async fn subject_token_file_rotation_is_read_at_each_request() {
    let w = Wif::new().await;
    let old = w.new_subject("rotating");
    // Three-second impersonated tokens: renewals every second or two.
    w.iam.cap_lifetime(Duration::from_secs(3));
    w.write_credentials(
        CREDS,
        &w.file_account(TOKEN_FILE)
            .impersonating(&w.iam.impersonation_url(SERVICE_ACCOUNT)),
    );
    let app = w
        .start(&profile(
            &w,
            "gcp",
            CREDS,
            &[CLOUD_PLATFORM],
            "storage.googleapis.com",
        ))
        .await;
    let client = proxied_client(app.proxy_addr());
    w.iam
        .wait_for(Duration::from_secs(10), "a first impersonated token", |r| {
            r.iter().any(IamReceived::accepted)
        })
        .await;
    let (status, body) = get(&client, "http://storage.googleapis.com/storage/v1/b").await;
    assert_eq!(status, 200, "{body}");
    let first = w.api.seen()[0].bearer().unwrap().to_owned();
    assert_eq!(w.trace(&first).unwrap().0, old);

    // The kubelet rotates the projected token.
    let rotated_at = w.sts.count();
    let new = w.new_subject("rotating-2");
    w.sts
        .wait_for(
            Duration::from_secs(15),
            "an exchange of the new subject token",
            |r| {
                r[rotated_at..]
                    .iter()
                    .any(|r| r.accepted() && r.subject_token() == Some(new.as_str()))
            },
        )
        .await;
    let sts = w.sts.received();
    let subjects: Vec<&str> = sts.iter().map(|r| r.subject_token().unwrap()).collect();
    let first_new = subjects.iter().position(|s| *s == new).unwrap();
    assert!(
        subjects[first_new..].iter().all(|s| *s == new),
        "the old subject token was sent again after the new one"
    );
    // At most the one exchange under way when the file changed used the
    // old token.
    assert!(first_new <= rotated_at + 1, "the new token came late");
    assert!(
        sts.iter().all(StsReceived::accepted),
        "every exchange accepted: {sts:#?}"
    );

    // Two impersonations from the new subject: the proxy stored the first
    // before asking for the second, so a request now carries a token that
    // came from the new subject token.
    let iam_mark = w.iam.count();
    let sts_state = &w.sts;
    w.iam
        .wait_for(
            Duration::from_secs(15),
            "two impersonations from the new subject",
            |r| {
                r[iam_mark..]
                    .iter()
                    .filter(|r| {
                        r.accepted()
                            && r.bearer()
                                .and_then(|b| sts_state.issued(b))
                                .is_some_and(|i| i.subject_token == new)
                    })
                    .count()
                    >= 2
            },
        )
        .await;
    let (status, body) = get(&client, "http://storage.googleapis.com/storage/v1/b").await;
    assert_eq!(status, 200, "{body}");
    let last = w.api.seen().last().unwrap().bearer().unwrap().to_owned();
    assert_eq!(
        w.trace(&last),
        Some((new.clone(), Some(SERVICE_ACCOUNT.to_owned())))
    );
    // Each impersonation followed its own exchange: the STS token is not
    // kept across renewals (the subject token is read each time).
    let iam = w.iam.received();
    let bearers: Vec<&str> = iam.iter().filter_map(IamReceived::bearer).collect();
    let mut unique = bearers.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), bearers.len(), "an STS token reused: {iam:#?}");
    app.shutdown().await;
}

#[tokio::test]
async fn json_format_and_url_credential_sources() {
    let w = Wif::new().await;
    // A file holding JSON (a token helper's output), the token in
    // access_token, a decoy beside it.
    let file_tok = k8s_token("file-json");
    w.write(
        "token.json",
        &json!({"token_type": "Bearer", "access_token": file_tok, "id_token": "decoy-1"})
            .to_string(),
    );
    // GCE-style metadata: text, Metadata-Flavor: Google.
    let md = SubjectTokenServer::start(Some(("Metadata-Flavor", "Google"))).await;
    let md_path = "/computeMetadata/v1/instance/service-accounts/default/identity";
    let md_query = format!(
        "?audience={}&format=full",
        form_urlencoded::byte_serialize(AUDIENCE.as_bytes()).collect::<String>()
    );
    let md_tok = k8s_token("url-text");
    md.set_text(md_path, &md_tok);
    // Azure-IMDS-style: JSON, Metadata: True, the token in a named member.
    let imds = SubjectTokenServer::start(Some(("Metadata", "True"))).await;
    let imds_path = "/metadata/identity/oauth2/token";
    let imds_query = "?api-version=2018-02-01&resource=api://gcp-federation";
    let imds_tok = k8s_token("url-json");
    imds.set_json(
        imds_path,
        json!({"access_token": "decoy-2", "id_token": imds_tok, "expires_in": "86399"}),
    );
    for t in [&file_tok, &md_tok, &imds_tok] {
        w.sts.accept_subject(t);
    }
    let sts_url = w.sts.token_url();
    w.write_credentials(
        "file-json.json",
        &ExternalAccount::new(
            &sts_url,
            file_source(&w.path("token.json"), Format::Json("access_token")),
        )
        .impersonating(&w.iam.impersonation_url(SERVICE_ACCOUNT)),
    );
    w.write_credentials(
        "url-text.json",
        &ExternalAccount::new(
            &sts_url,
            url_source(
                &md.url(&format!("{md_path}{md_query}")),
                &[("Metadata-Flavor", "Google")],
                Format::Text,
            ),
        ),
    );
    w.write_credentials(
        "url-json.json",
        &ExternalAccount::new(
            &sts_url,
            url_source(
                &imds.url(&format!("{imds_path}{imds_query}")),
                &[("Metadata", "True")],
                Format::Json("id_token"),
            ),
        )
        .impersonating(&w.iam.impersonation_url(SERVICE_ACCOUNT_2)),
    );
    let app = w
        .start(&format!(
            "{}{}{}",
            profile(
                &w,
                "file-json",
                "file-json.json",
                &[STORAGE_READ],
                "storage.googleapis.com"
            ),
            profile(
                &w,
                "url-text",
                "url-text.json",
                &[CLOUD_PLATFORM],
                "pubsub.googleapis.com"
            ),
            profile(
                &w,
                "url-json",
                "url-json.json",
                &[BIGQUERY_READ],
                "bigquery.googleapis.com"
            ),
        ))
        .await;
    let client = proxied_client(app.proxy_addr());
    for (host, subject, email) in [
        ("storage", &file_tok, Some(SERVICE_ACCOUNT)),
        ("pubsub", &md_tok, None),
        ("bigquery", &imds_tok, Some(SERVICE_ACCOUNT_2)),
    ] {
        let (status, body) = get(&client, &format!("http://{host}.googleapis.com/v1/x")).await;
        assert_eq!(status, 200, "{host}: {body}");
        let seen = w.api.seen();
        let bearer = seen.last().unwrap().bearer().unwrap().to_owned();
        assert_eq!(
            w.trace(&bearer),
            Some((subject.clone(), email.map(str::to_owned))),
            "{host}"
        );
    }
    // Every exchange carried one of the three tokens, never a decoy.
    let sts = w.sts.received();
    assert!(sts.iter().all(StsReceived::accepted), "{sts:#?}");
    // The URL sources were read with GET, their headers, their queries.
    for (server, path, (k, v)) in [
        (
            &md,
            format!("{md_path}{md_query}"),
            ("Metadata-Flavor", "Google"),
        ),
        (
            &imds,
            format!("{imds_path}{imds_query}"),
            ("Metadata", "True"),
        ),
    ] {
        let got = server.received();
        assert!(!got.is_empty());
        for r in &got {
            assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", path.as_str()));
            assert_eq!(r.header(k), Some(v), "{r:#?}");
            assert_eq!(r.status, 200, "{r:#?}");
        }
    }
    let (status, ready) = readyz(app.admin_addr()).await;
    assert_eq!(status, 200, "{ready}");
    app.shutdown().await;
}

#[tokio::test]
async fn token_url_overrides_the_files_token_url() {
    let w = Wif::new().await;
    let subject = w.new_subject("override");
    // The file names an STS nothing listens on (port 1, loopback).
    let mut account = w.file_account(TOKEN_FILE);
    account.token_url = "https://localhost:1/v1/token".into();
    w.write_credentials(CREDS, &account);
    let text = profile(
        &w,
        "gcp",
        CREDS,
        &[CLOUD_PLATFORM],
        "storage.googleapis.com",
    )
    .replace(
        "[profiles.gcp]\n",
        &format!("[profiles.gcp]\ntoken_url = \"{}\"\n", w.sts.token_url()),
    );
    let app = w.start(&text).await;
    let (status, body) = get(
        &proxied_client(app.proxy_addr()),
        "http://storage.googleapis.com/storage/v1/b",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sts = w.sts.received();
    assert_eq!(sts.len(), 1);
    assert_sts_request(&sts[0], &subject, CLOUD_PLATFORM);
    app.shutdown().await;
}

#[tokio::test]
async fn a_failing_step_is_named() {
    let w = Wif::new().await;
    let subject = w.new_subject("failing");
    w.write_credentials(
        CREDS,
        &w.file_account(TOKEN_FILE)
            .impersonating(&w.iam.impersonation_url(SERVICE_ACCOUNT)),
    );
    // The provider's attribute condition refuses the workload.
    w.sts.set_answer(StsAnswer::Refuse {
        status: 400,
        error: "invalid_grant",
        description: "The given credential is rejected by the attribute condition.",
    });
    let app = w
        .start(&profile(
            &w,
            "gcp",
            CREDS,
            &[CLOUD_PLATFORM],
            "storage.googleapis.com",
        ))
        .await;
    let admin = app.admin_addr();
    let client = proxied_client(app.proxy_addr());
    w.sts
        .wait_for(Duration::from_secs(10), "a first exchange", |r| {
            !r.is_empty()
        })
        .await;
    let r = client
        .get("http://storage.googleapis.com/storage/v1/b")
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_kind(&r).as_deref(), Some("token_unavailable"));
    let body_503 = r.text().await.unwrap();
    assert!(
        body_503.contains("\"gcp\""),
        "names the profile: {body_503}"
    );
    let sts_error = last_error_until(admin, "gcp", |e| {
        e.contains("STS exchange") && e.contains("invalid_grant")
    })
    .await;
    assert_eq!(w.iam.count(), 0, "no impersonation without an STS token");
    let (status, ready) = readyz(admin).await;
    assert_eq!(status, 503, "{ready}");

    // STS now answers; the service account does not let the pool in.
    w.iam.set_answer(IamAnswer::permission_denied());
    w.sts.set_answer(StsAnswer::Issue(3600));
    let iam_error = last_error_until(admin, "gcp", |e| {
        e.contains("service account impersonation")
            && (e.contains("PERMISSION_DENIED") || e.contains("403"))
    })
    .await;
    assert!(
        !iam_error.contains("STS exchange"),
        "the failing step only: {iam_error}"
    );
    assert!(w.api.seen().is_empty(), "nothing forwarded without a token");
    let metrics = scrape(admin).await;
    let (_, ready) = readyz(admin).await;

    // Neither the subject token nor an STS token shows anywhere.
    let sts_tokens: Vec<String> = w
        .sts
        .received()
        .iter()
        .filter_map(|r| r.access_token().map(str::to_owned))
        .collect();
    assert!(!sts_tokens.is_empty());
    for shown in [
        &body_503,
        &sts_error,
        &iam_error,
        &ready.to_string(),
        &metrics,
    ] {
        assert!(!shown.contains(&subject), "the subject token leaked");
        for t in &sts_tokens {
            assert!(!shown.contains(t.as_str()), "an STS token leaked");
        }
    }

    // Access granted: tokens flow, the error clears.
    w.iam.set_answer(IamAnswer::Issue);
    eventually(Duration::from_secs(15), || {
        let client = client.clone();
        async move {
            let r = client
                .get("http://storage.googleapis.com/storage/v1/b")
                .send()
                .await
                .unwrap();
            (r.status() == 200).then_some(())
        }
    })
    .await;
    let (status, ready) = readyz(admin).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["profiles"]["gcp"]["state"], "valid", "{ready}");
    assert!(ready["profiles"]["gcp"]["last_error"].is_null(), "{ready}");
    app.shutdown().await;
}

#[tokio::test]
async fn malformed_external_account_files_are_check_errors() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join(TOKEN_FILE);
    std::fs::write(&token_path, k8s_token("check")).unwrap();
    let iam_url = "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/x@p.iam.gserviceaccount.com:generateAccessToken";
    let good = ExternalAccount {
        token_lifetime_seconds: Some(1800),
        ..ExternalAccount::new(
            "https://sts.googleapis.com/v1/token",
            file_source(&token_path, Format::Text),
        )
        .impersonating(iam_url)
    }
    .to_value();
    let url_good = ExternalAccount::new(
        "https://sts.googleapis.com/v1/token",
        url_source(
            "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/identity?audience=x",
            &[("Metadata-Flavor", "Google")],
            Format::Json("access_token"),
        ),
    )
    .to_value();
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
    let source = |s: Value| {
        edited(&|m| {
            m.insert("credential_source".into(), s.clone());
        })
    };
    // (what, file, what a line must contain: the field's name)
    let cases: Vec<(&str, String, &str)> = vec![
        ("no audience", without("audience"), "\"audience\""),
        ("no token_url", without("token_url"), "\"token_url\""),
        (
            "no credential_source",
            without("credential_source"),
            "\"credential_source\"",
        ),
        (
            "no subject_token_type",
            without("subject_token_type"),
            "\"subject_token_type\"",
        ),
        (
            "audience not a string",
            edited(&|m| {
                m.insert("audience".into(), json!(42));
            }),
            "\"audience\"",
        ),
        (
            "an executable source",
            source(json!({"executable": {
                "command": "/usr/bin/print-token --audience=x",
                "timeout_millis": 5000,
                "output_file": "/tmp/token.json",
            }})),
            "executable",
        ),
        (
            "an AWS source",
            source(json!({
                "environment_id": "aws1",
                "region_url": "http://169.254.169.254/latest/meta-data/placement/availability-zone",
                "url": "http://169.254.169.254/latest/meta-data/iam/security-credentials",
                "regional_cred_verification_url": "https://sts.{region}.amazonaws.com?Action=GetCallerIdentity&Version=2011-06-15",
                "imdsv2_session_token_url": "http://169.254.169.254/latest/api/token",
            })),
            "environment_id",
        ),
        (
            "a source with neither file nor url",
            source(json!({"format": {"type": "text"}})),
            "credential_source",
        ),
        (
            "a JSON format without its field name",
            source(json!({"file": token_path, "format": {"type": "json"}})),
            "subject_token_field_name",
        ),
        (
            "an unknown format",
            source(json!({"file": token_path, "format": {"type": "xml"}})),
            "format",
        ),
        (
            "a token lifetime under ten minutes",
            edited(&|m| {
                m.insert(
                    "service_account_impersonation".into(),
                    json!({"token_lifetime_seconds": 100}),
                );
            }),
            "token_lifetime_seconds",
        ),
    ];
    let config = format!(
        r#"{sections}
[profiles.gcp]
grant = "jwt_bearer"
google_credentials_file = "{CREDS}"
scopes = ["{CLOUD_PLATFORM}"]

[[routes]]
host = "storage.googleapis.com"
profile = "gcp"
"#,
        sections = test_sections("5s"),
    );
    let load =
        || token_injector::config::from_text(&config, dir.path(), Vec::<(String, String)>::new());
    let path = dir.path().join(CREDS);

    // The good files pass, so each failure below is its own edit's.
    for good in [&good, &url_good] {
        std::fs::write(&path, good.to_string()).unwrap();
        if let Err(e) = load() {
            panic!("a good file was refused:\n{e}\n{good:#}");
        }
    }

    let mut failures = Vec::new();
    for (what, text, field) in cases {
        std::fs::write(&path, &text).unwrap();
        let err = match load() {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                continue;
            }
            Err(e) => e,
        };
        let lines = err.lines();
        let named = lines_about(
            &mut failures,
            what,
            &lines,
            "profiles.gcp.google_credentials_file:",
        );
        if !named.iter().any(|l| l.contains(field)) {
            failures.push(format!("{what}: no line names {field}:\n{lines:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
