//! Mutual TLS to upstreams: a route's `client_cert_file`/`client_key_file`
//! go upstream, follow a Kubernetes-style symlink rotation on the next new
//! connection, and together with `tls_client_auth` at the token endpoint
//! make certificate-bound tokens (RFC 8705 §3) work.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, BoxBody, Pki, error_kind, json, proxied_client};
use base64::Engine;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpListener;

/// The RFC 8705 thumbprint of the first certificate of a PEM text.
fn x5t(pem: &str) -> String {
    support::x5t_der(
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref(),
    )
}

/// A server config for `localhost` that requires a client certificate
/// issued by the test CA, offering HTTP/1.1.
fn mtls_server_config(pki: &Pki) -> Arc<rustls::ServerConfig> {
    let mut config = pki.mtls_server_config();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS server that requires client certificates and hands each request
/// the thumbprint of the connection's client certificate. Counts completed
/// handshakes and refused ones.
struct MtlsServer {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

async fn mtls_serve<F, Fut>(config: Arc<rustls::ServerConfig>, handler: F) -> MtlsServer
where
    F: Fn(String, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let (ok, bad) = (Arc::clone(&handshakes), Arc::clone(&refused));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            let (ok, bad) = (Arc::clone(&ok), Arc::clone(&bad));
            tokio::spawn(async move {
                let tls = match acceptor.accept(stream).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        bad.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                ok.fetch_add(1, Ordering::SeqCst);
                let thumb = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| {
                        let d = ring::digest::digest(&ring::digest::SHA256, c.as_ref());
                        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref())
                    })
                    .unwrap_or_default();
                let svc = service_fn(move |req| {
                    let (handler, thumb) = (handler.clone(), thumb.clone());
                    async move { Ok::<_, Infallible>(handler(thumb, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    MtlsServer {
        addr,
        handshakes,
        refused,
    }
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

fn config(token_url: &str, profile_auth: &str, routes: &str) -> String {
    format!(
        r#"{sections}
[profiles.main]
token_url = "{token_url}"
client_id = "svc"
ca_file = "ca.pem"
{profile_auth}

{routes}
"#,
        sections = support::test_sections("1s"),
    )
}

async fn start(dir: &Path, text: &str) -> token_injector::Running {
    support::start_in(dir, text).await
}

fn body_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn certificate_bound_token_works_when_the_same_certificate_goes_upstream() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_ca(dir.path());
    let (cert_a, key_a) = pki.leaf_pem(&["client-a.test"]);
    let (cert_b, key_b) = pki.leaf_pem(&["client-b.test"]);
    for (name, text) in [
        ("a.crt", &cert_a),
        ("a.key", &key_a),
        ("b.crt", &cert_b),
        ("b.key", &key_b),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }

    // The authorization server binds each token to the certificate the
    // client authenticated with (cnf.x5t#S256).
    let bound: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let issued = Arc::new(AtomicUsize::new(0));
    let (b, n) = (Arc::clone(&bound), Arc::clone(&issued));
    let idp = mtls_serve(mtls_server_config(&pki), move |thumb, _req| {
        let (b, n) = (Arc::clone(&b), Arc::clone(&n));
        async move {
            let token = format!("cb-{}", n.fetch_add(1, Ordering::SeqCst));
            b.lock().unwrap().insert(token.clone(), thumb);
            json(
                200,
                &format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":300}}"#),
            )
        }
    })
    .await;

    // The resource server accepts a token only from a connection that
    // presents the certificate the token is bound to.
    let b = Arc::clone(&bound);
    let api = mtls_serve(mtls_server_config(&pki), move |thumb, req| {
        let b = Arc::clone(&b);
        async move {
            let cnf = bearer(&req).and_then(|t| b.lock().unwrap().get(&t).cloned());
            let status = if cnf.as_deref() == Some(thumb.as_str()) {
                200
            } else {
                401
            };
            json(
                status,
                &serde_json::json!({ "x5t": thumb, "cnf": cnf }).to_string(),
            )
        }
    })
    .await;

    let upstream = format!("https://localhost:{}", api.addr.port());
    let text = config(
        &format!("https://localhost:{}/token", idp.addr.port()),
        "auth_method = \"tls_client_auth\"\nclient_cert_file = \"a.crt\"\nclient_key_file = \"a.key\"",
        &format!(
            r#"
[[routes]]
host = "bound.test"
upstream = "{upstream}"
profile = "main"
ca_file = "ca.pem"
client_cert_file = "a.crt"
client_key_file = "a.key"

[[routes]]
host = "other-cert.test"
upstream = "{upstream}"
profile = "main"
ca_file = "ca.pem"
client_cert_file = "b.crt"
client_key_file = "b.key"
"#
        ),
    );
    let running = start(dir.path(), &text).await;
    let client = proxied_client(running.proxy_addr());

    let r = client.get("http://bound.test/x").send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", error_kind(&r));
    let v = body_json(&r.text().await.unwrap());
    assert_eq!(v["x5t"], x5t(&cert_a));
    assert_eq!(v["cnf"], x5t(&cert_a), "token bound to certificate A");

    // Same token, another route's certificate: the binding fails, so the
    // upstream check is real and the two routes do not share a connection.
    let r = client.get("http://other-cert.test/x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v = body_json(&r.text().await.unwrap());
    assert_eq!(v["x5t"], x5t(&cert_b));
    assert_eq!(v["cnf"], x5t(&cert_a));
    assert_ne!(x5t(&cert_a), x5t(&cert_b));
    // One connection per certificate to the API; the proxy's keep-alive
    // reused A's for nothing else.
    assert_eq!(api.handshakes.load(Ordering::SeqCst), 2);
    assert_eq!(api.refused.load(Ordering::SeqCst), 0);
    running.shutdown().await;
}

#[tokio::test]
async fn upstream_demanding_a_client_certificate_refuses_a_route_without_one_until_a_reload_adds_it()
 {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_ca(dir.path());
    std::fs::write(dir.path().join("secret"), "s\n").unwrap();
    let tokens = support::TokenServer::start(&pki, support::Mode::Issue(300.0)).await;
    let api = mtls_serve(mtls_server_config(&pki), |thumb, _req| async move {
        json(200, &serde_json::json!({ "x5t": thumb }).to_string())
    })
    .await;
    let text = config(
        &tokens.url(),
        "client_secret_file = \"secret\"",
        &format!(
            "[[routes]]\nhost = \"api.test\"\nupstream = \"https://localhost:{}\"\nprofile = \"main\"\nca_file = \"ca.pem\"\n",
            api.addr.port()
        ),
    );
    let running = start(dir.path(), &text).await;
    let client = proxied_client(running.proxy_addr());
    let started = Instant::now();
    let r = client.get("http://api.test/x").send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 502);
    assert_eq!(error_kind(&r).as_deref(), Some("upstream_unreachable"));
    let body = r.text().await.unwrap();
    assert!(
        body.to_ascii_lowercase().contains("certificate"),
        "the error names the cause: {body}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(api.refused.load(Ordering::SeqCst) >= 1);
    eprintln!("refused in {took:?}: {body}");

    // A reload that gives the route a certificate fixes it for the next
    // request, and `check` would have refused half a pair.
    let (cert, key) = pki.leaf_pem(&["client.test"]);
    std::fs::write(dir.path().join("client.crt"), &cert).unwrap();
    std::fs::write(dir.path().join("client.key"), &key).unwrap();
    let half = format!("{text}client_cert_file = \"client.crt\"\n");
    let e = token_injector::config::from_text(&half, dir.path(), Vec::new()).unwrap_err();
    assert_eq!(
        e.lines(),
        vec![
            "routes[0].client_key_file: missing; mutual TLS to the upstream needs client_cert_file and client_key_file"
        ]
    );
    let whole = format!("{half}client_key_file = \"client.key\"\n");
    running
        .apply(token_injector::config::from_text(&whole, dir.path(), Vec::new()).unwrap())
        .unwrap();
    let r = client.get("http://api.test/x").send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", error_kind(&r));
    assert_eq!(body_json(&r.text().await.unwrap())["x5t"], x5t(&cert));
    running.shutdown().await;
}

/// A Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..vN`,
/// and an update swaps `..data` atomically.
struct SecretVolume {
    root: PathBuf,
    version: usize,
}

impl SecretVolume {
    fn new(root: &Path) -> Self {
        std::fs::create_dir_all(root).unwrap();
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
        }
        Self {
            root: root.to_owned(),
            version: 0,
        }
    }

    fn publish(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let dir = self.root.join(&version);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("..data")).unwrap();
    }
}

#[tokio::test]
async fn rotated_client_certificate_is_presented_on_the_next_new_connection() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_ca(dir.path());
    std::fs::write(dir.path().join("secret"), "s\n").unwrap();
    let (cert_a, key_a) = pki.leaf_pem(&["client-a.test"]);
    let (cert_b, key_b) = pki.leaf_pem(&["client-b.test"]);
    let (cert_c, _) = pki.leaf_pem(&["client-c.test"]);
    let mut volume = SecretVolume::new(&dir.path().join("mtls"));
    volume.publish(&cert_a, &key_a);

    let tokens = support::TokenServer::start(&pki, support::Mode::Issue(300.0)).await;
    let state = Arc::clone(&tokens.state);
    // Closes every connection after its response, so each request is a new
    // upstream connection and a new handshake.
    let api = mtls_serve(mtls_server_config(&pki), move |thumb, req| {
        let state = Arc::clone(&state);
        async move {
            let ok = bearer(&req).is_some_and(|t| state.valid(&t));
            let mut r = json(
                if ok { 200 } else { 401 },
                &serde_json::json!({ "x5t": thumb }).to_string(),
            );
            r.headers_mut()
                .insert("connection", http::HeaderValue::from_static("close"));
            r
        }
    })
    .await;
    let text = config(
        &tokens.url(),
        "client_secret_file = \"secret\"",
        &format!(
            r#"
[[routes]]
host = "api.test"
upstream = "https://localhost:{}"
profile = "main"
ca_file = "ca.pem"
client_cert_file = "mtls/tls.crt"
client_key_file = "mtls/tls.key"
"#,
            api.addr.port()
        ),
    );
    let running = start(dir.path(), &text).await;
    let client = proxied_client(running.proxy_addr());
    let seen = || {
        let client = client.clone();
        async move {
            let r = client.get("http://api.test/who").send().await.unwrap();
            assert_eq!(r.status(), 200, "{:?}", error_kind(&r));
            body_json(&r.text().await.unwrap())["x5t"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };

    assert_eq!(seen().await, x5t(&cert_a));
    assert_eq!(
        seen().await,
        x5t(&cert_a),
        "unchanged files: same certificate"
    );

    volume.publish(&cert_b, &key_b);
    assert_eq!(seen().await, x5t(&cert_b), "the next connection presents B");

    // A broken update (certificate and key that do not belong together)
    // keeps the last good pair in use rather than failing the connection.
    volume.publish(&cert_c, &key_b);
    assert_eq!(seen().await, x5t(&cert_b));

    volume.publish(&cert_a, &key_a);
    assert_eq!(seen().await, x5t(&cert_a), "a repaired update is picked up");
    assert_eq!(api.handshakes.load(Ordering::SeqCst), 5);
    running.shutdown().await;
}
