//! How a route attaches its credential: a header and prefix per route, and
//! static credentials from a file (`grant = "static"`), end to end through
//! the proxy to a real TLS upstream that records what it saw.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use http::{Request, Response};
use hyper::body::Incoming;

/// The headers of one request, in order.
type Headers = Vec<(String, String)>;

/// A TLS upstream that answers 200 to everything (or 401 while `refuse`
/// holds) and records each request's headers.
struct Recording {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Headers>>>,
}

impl Recording {
    async fn start(pki: &Pki, refuse: Option<&'static str>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let addr = serve(
            Some(pki.server_config(&["localhost"])),
            move |req: Request<Incoming>| {
                let s = Arc::clone(&s);
                async move {
                    let headers: Headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
                        .collect();
                    let refused = refuse.is_some_and(|bad| {
                        headers.iter().any(|(k, v)| k == "x-api-key" && v == bad)
                    });
                    s.lock().unwrap().push(headers);
                    if refused {
                        json(401, r#"{"error":"invalid_key"}"#)
                    } else {
                        json(200, r#"{"ok":true}"#)
                    }
                }
            },
        )
        .await;
        Self { addr, seen }
    }

    /// Every value of header `name` in request `i`.
    fn values(&self, i: usize, name: &str) -> Vec<String> {
        self.seen.lock().unwrap()[i]
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn json(status: u16, body: &str) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(body.to_owned()))
        .unwrap()
}

#[tokio::test]
async fn a_route_puts_the_token_in_its_header_with_its_prefix() {
    let w = World::new(Mode::Issue(60.0)).await;
    let up = Recording::start(&w.pki, None).await;
    let text = w.config(
        "",
        &format!(
            r#"
[[routes]]
host = "key.test"
upstream = "https://localhost:{port}"
profile = "main"
ca_file = "ca.pem"
header = "X-Api-Key"
prefix = ""

[[routes]]
host = "token.test"
upstream = "https://localhost:{port}"
profile = "main"
ca_file = "ca.pem"
prefix = "Token "
"#,
            port = up.addr.port()
        ),
    );
    let app = w.start(&text).await;
    let client = proxied_client(app.proxy_addr());
    let r = client
        .get("http://key.test/")
        .header("x-api-key", "from-the-app")
        .header("authorization", "Basic YXBwOmFwcA==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get("http://token.test/")
        .header("authorization", "Bearer from-the-app")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // x-api-key: the bare token (one the endpoint issued), replacing the
    // app's; the app's own Authorization is not the route's header and
    // goes through.
    let keys = up.values(0, "x-api-key");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let token = &keys[0];
    assert!(w.tokens.state.valid(token), "{token}");
    assert_eq!(
        up.values(0, "authorization"),
        vec!["Basic YXBwOmFwcA==".to_owned()]
    );
    // A custom prefix in Authorization.
    assert_eq!(
        up.values(1, "authorization"),
        vec![format!("Token {token}")]
    );
    app.shutdown().await;
}

#[tokio::test]
async fn header_and_prefix_are_checked_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), "k\n").unwrap();
    let base = r#"
[profiles.p]
grant = "static"
credential_file = "key"

[[routes]]
host = "a.test"
profile = "p"
"#;
    for (extra, says) in [
        (
            "header = \"bad header\"",
            "routes[0].header: \"bad header\" is not a valid header name",
        ),
        (
            "header = \"Host\"",
            "routes[0].header: \"Host\" cannot carry a credential",
        ),
        (
            "prefix = \" x\"",
            "routes[0].prefix: must be printable ASCII",
        ),
        (
            "prefix = \"a\\nb\"",
            "routes[0].prefix: must be printable ASCII",
        ),
    ] {
        let text = format!("{base}{extra}\n");
        let err =
            token_injector::config::from_text(&text, dir.path(), Vec::<(String, String)>::new())
                .expect_err(extra);
        assert!(
            err.lines().iter().any(|l| l.starts_with(says)),
            "{extra}: {:?}",
            err.lines()
        );
    }
}

#[tokio::test]
async fn static_profiles_are_checked_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    std::fs::write(dir.path().join("two-newlines"), "key\n\n").unwrap();
    for (profile, says) in [
        ("grant = \"static\"", "profiles.p.credential_file: missing"),
        (
            "grant = \"static\"\ncredential_file = \"nope\"",
            "profiles.p.credential_file: cannot read secret file",
        ),
        (
            "grant = \"static\"\ncredential_file = \"empty\"",
            "profiles.p.credential_file: secret from file",
        ),
        (
            "grant = \"static\"\ncredential_file = \"empty\"\ntoken_url = \"https://idp.test/t\"",
            "profiles.p.token_url: not used by grant \"static\"",
        ),
        (
            "grant = \"static\"\ncredential_file = \"two-newlines\"",
            "profiles.p.credential_file: holds characters that cannot go in a header",
        ),
        (
            "grant = \"magic\"",
            "profiles.p.grant: unknown value \"magic\"",
        ),
        (
            "token_url = \"https://idp.test/t\"\nclient_id = \"c\"\nclient_secret_env = \"X\"\ncredential_file = \"empty\"",
            "profiles.p.credential_file: only used with grant = \"static\"",
        ),
    ] {
        let text =
            format!("[profiles.p]\n{profile}\n\n[[routes]]\nhost = \"a.test\"\nprofile = \"p\"\n");
        let err =
            token_injector::config::from_text(&text, dir.path(), Vec::<(String, String)>::new())
                .expect_err(profile);
        assert!(
            err.lines().iter().any(|l| l.starts_with(says)),
            "{profile}: {:?}",
            err.lines()
        );
    }
}

/// A static API key: attached as is, ready without a token endpoint,
/// redacted on the admin page, re-read when the file is replaced (as a
/// Kubernetes Secret update does), and the last good key kept while the
/// file is broken.
#[tokio::test]
async fn a_static_credential_is_attached_and_follows_its_file() {
    let pki = Pki::new();
    let up = Recording::start(&pki, None).await;
    let dir = tempfile::tempdir().unwrap();
    pki.write_ca(dir.path());
    let key = dir.path().join("api-key");
    std::fs::write(&key, "sk_live_first\n").unwrap();
    let text = format!(
        r#"{sections}
[profiles.stripe]
grant = "static"
credential_file = "api-key"

[[routes]]
host = "api.stripe.test"
upstream = "https://localhost:{port}"
profile = "stripe"
ca_file = "ca.pem"
header = "x-api-key"
prefix = ""

[[routes]]
host = "bearer.test"
upstream = "https://localhost:{port}"
profile = "stripe"
ca_file = "ca.pem"
"#,
        sections = test_sections("5s"),
        port = up.addr.port()
    );
    let app = start_in(dir.path(), &text).await;
    let client = proxied_client(app.proxy_addr());
    let admin = app.admin_addr();
    let ready = direct_client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body = ready.text().await.unwrap();
    assert!(!body.contains("sk_live"), "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["profiles"]["stripe"]["state"], "valid", "{body}");
    assert!(
        status["profiles"]["stripe"]["valid_until"].is_null(),
        "{body}"
    );

    let r = client
        .get("http://api.stripe.test/v1/charges")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.values(0, "x-api-key"), vec!["sk_live_first".to_owned()]);
    // The default header and prefix of another route on the same profile.
    let r = client.get("http://bearer.test/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.values(1, "authorization"),
        vec!["Bearer sk_live_first".to_owned()]
    );

    // Rotation the Kubernetes way: a new file renamed over the old one.
    let next = dir.path().join("api-key.new");
    std::fs::write(&next, "sk_live_second\n").unwrap();
    std::fs::rename(&next, &key).unwrap();
    let n = eventually(Duration::from_secs(10), || {
        let client = client.clone();
        let up = &up;
        async move {
            let r = client.get("http://api.stripe.test/").send().await.unwrap();
            assert_eq!(r.status(), 200);
            let i = up.count() - 1;
            (up.values(i, "x-api-key") == vec!["sk_live_second".to_owned()]).then_some(i)
        }
    })
    .await;
    assert!(n >= 2);

    // A broken rotation (an empty file): the last good key stays in use,
    // and the status says why.
    std::fs::write(&key, "").unwrap();
    eventually(Duration::from_secs(10), || async {
        let body = direct_client()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        body.contains("is empty").then_some(())
    })
    .await;
    let r = client.get("http://api.stripe.test/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let i = up.count() - 1;
    assert_eq!(up.values(i, "x-api-key"), vec!["sk_live_second".to_owned()]);
    app.shutdown().await;
}

/// An upstream that refuses a static key gets the key read again (it may
/// have just been rotated) and the request retried once; the key is never
/// dropped for good, so the next request still carries one.
#[tokio::test]
async fn a_refused_static_credential_is_reread_not_dropped() {
    let pki = Pki::new();
    let up = Recording::start(&pki, Some("old-key")).await;
    let dir = tempfile::tempdir().unwrap();
    pki.write_ca(dir.path());
    std::fs::write(dir.path().join("api-key"), "old-key").unwrap();
    let text = format!(
        r#"{sections}
[profiles.k]
grant = "static"
credential_file = "api-key"

[[routes]]
host = "api.test"
upstream = "https://localhost:{port}"
profile = "k"
ca_file = "ca.pem"
header = "x-api-key"
prefix = ""
"#,
        sections = test_sections("5s"),
        port = up.addr.port()
    );
    let app = start_in(dir.path(), &text).await;
    let client = proxied_client(app.proxy_addr());
    // Refused, re-read (still the old key), retried once, refused again:
    // the app sees the upstream's 401.
    let r = client.get("http://api.test/").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(up.count(), 2);
    assert_eq!(up.values(1, "x-api-key"), vec!["old-key".to_owned()]);
    // The key is still there for the next request.
    let r = client.get("http://api.test/").send().await.unwrap();
    assert_eq!(error_kind(&r), None);
    assert_eq!(up.values(2, "x-api-key"), vec!["old-key".to_owned()]);
    app.shutdown().await;
}
