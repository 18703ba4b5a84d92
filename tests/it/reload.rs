//! Hot reload and secret rotation, in-process: the reload task itself,
//! reloads applied to a running proxy, and rotated credential files used
//! by the next token request. Reloads through the real binary are in
//! tests/bin/reload.rs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ring::signature;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::support::reload::{MAIN_SECRET, WAIT, config, free_port, route, write_config};
use crate::support::*;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

// ---------------------------------------------------------------------------
// In-process: the reload task itself

/// A change landing after the config was loaded for start-up but before the
/// watcher exists must not be lost (main.rs loads, starts, then watches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_during_start_up_is_not_lost() {
    let w = World::new(Mode::Issue(60.0)).await;
    let path = write_config(&w, &config(&w, MAIN_SECRET, ""));
    let loaded = token_injector::config::load(&path).unwrap();
    let running = Arc::new(token_injector::start(loaded).await.unwrap());
    let extra = route("late.test", &w.upstream_url(), "main", None);
    std::fs::write(&path, config(&w, MAIN_SECRET, &extra)).unwrap();

    let (_hup, hup_rx) = tokio::sync::mpsc::channel(1);
    let task = token_injector::reload::spawn(Arc::clone(&running), path.clone(), hup_rx).unwrap();
    let reloads = running.metrics().config_reloads.clone();
    eventually(WAIT, || {
        let n = reloads.with_label_values(&["success"]).get();
        async move { (n >= 1).then_some(()) }
    })
    .await;
    let r = proxied_client(running.proxy_addr())
        .get("http://late.test/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // After the catch-up the watch works as usual: the next change reloads
    // once more.
    let probe = route("probe.test", &w.upstream_url(), "main", None);
    std::fs::write(&path, config(&w, MAIN_SECRET, &format!("{extra}{probe}"))).unwrap();
    eventually(WAIT, || {
        let n = reloads.with_label_values(&["success"]).get();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    assert_eq!(reloads.with_label_values(&["success"]).get(), 2);
    assert_eq!(reloads.with_label_values(&["error"]).get(), 0);
    task.abort();
    let _ = task.await;
    if let Ok(r) = Arc::try_unwrap(running) {
        r.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// Secret rotation, in-process

/// The decoded JSON of part `i` of a compact JWS.
fn jws_part(jws: &str, i: usize) -> serde_json::Value {
    serde_json::from_slice(&B64.decode(jws.split('.').nth(i).unwrap()).unwrap()).unwrap()
}

/// Whether `jws` is an ES256 signature by the P-256 key `public` (SEC1 point).
fn es256_verifies(jws: &str, public: &[u8]) -> bool {
    let (msg, sig) = jws.rsplit_once('.').unwrap();
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, public)
        .verify(msg.as_bytes(), &B64.decode(sig).unwrap())
        .is_ok()
}

fn form_value(state: &TokenState, name: &str) -> Option<String> {
    state
        .last_form
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Makes the upstream refuse the current token once, so the next proxied
/// request needs a token request; returns when that request succeeded.
async fn force_next_token_request(app: &token_injector::Running, w: &World, path: &str) {
    w.upstream.state.force_401.store(1, Ordering::SeqCst);
    let r = proxied_client(app.proxy_addr())
        .get(format!("http://api.test{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Replaces `path` atomically, as Kubernetes and careful tools do.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn rotated_private_key_signs_the_next_assertion_held_token_stays() {
    let w = World::new(Mode::Issue(60.0)).await;
    let key_path = w.dir.path().join("key.pem");
    let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&key_path, old.serialize_pem()).unwrap();
    let auth = r#"auth_method = "private_key_jwt"
private_key_file = "key.pem"
key_id = "k1""#;
    let app = w.start(&config(&w, auth, "")).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    let first = form_value(&w.tokens.state, "client_assertion").unwrap();
    assert!(es256_verifies(&first, old.public_key_raw()));
    assert_eq!(
        form_value(&w.tokens.state, "client_assertion_type").as_deref(),
        Some(JWT_BEARER)
    );

    let new = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    replace_file(&key_path, &new.serialize_pem());
    // The held token stays in use: no token request because a file changed.
    let r = proxied_client(app.proxy_addr())
        .get("http://api.test/after-rotation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(w.tokens.state.count(), 1, "no token request on rotation");

    force_next_token_request(&app, &w, "/refused-once").await;
    assert_eq!(w.tokens.state.count(), 2);
    let second = form_value(&w.tokens.state, "client_assertion").unwrap();
    assert!(
        es256_verifies(&second, new.public_key_raw()),
        "signed with the new key"
    );
    assert!(
        !es256_verifies(&second, old.public_key_raw()),
        "not with the old key"
    );
    assert_eq!(jws_part(&second, 0)["alg"], "ES256");
    assert_eq!(jws_part(&second, 0)["kid"], "k1");
    let claims = jws_part(&second, 1);
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], CLIENT_ID);
    assert_eq!(claims["aud"], w.tokens.url());
    assert_ne!(claims["jti"], jws_part(&first, 1)["jti"]);
    app.shutdown().await;
}

#[tokio::test]
async fn rotated_client_assertion_file_is_sent_by_the_next_token_request() {
    let w = World::new(Mode::Issue(60.0)).await;
    let file = w.dir.path().join("assertion.jwt");
    std::fs::write(&file, "assertion.one.sig\n").unwrap();
    let auth = r#"auth_method = "private_key_jwt"
client_assertion_file = "assertion.jwt""#;
    let app = w.start(&config(&w, auth, "")).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(
        form_value(&w.tokens.state, "client_assertion").as_deref(),
        Some("assertion.one.sig")
    );

    replace_file(&file, "assertion.two.sig\n");
    let r = proxied_client(app.proxy_addr())
        .get("http://api.test/after-rotation")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(w.tokens.state.count(), 1, "no token request on rotation");

    force_next_token_request(&app, &w, "/refused-once").await;
    assert_eq!(w.tokens.state.count(), 2);
    let form = w.tokens.state.last_form.lock().unwrap().clone();
    assert!(
        form.contains(&("client_assertion".into(), "assertion.two.sig".into())),
        "{form:?}"
    );
    assert!(form.contains(&("client_assertion_type".into(), JWT_BEARER.into())));
    assert!(form.contains(&("client_id".into(), CLIENT_ID.into())));
    app.shutdown().await;
}

/// A token endpoint that requires a client certificate from the test CA and
/// records, per token request, the certificate the client presented.
struct MtlsTokenServer {
    addr: SocketAddr,
    state: Arc<TokenState>,
    peers: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl MtlsTokenServer {
    async fn start(pki: &Pki) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&provider),
        )
        .build()
        .unwrap();
        let (cert_pem, key_pem) = pki.leaf_pem(&["localhost"]);
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let state = Arc::new(TokenState::default());
        *state.counter.lock().unwrap() = Some(watch::Sender::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (s, p) = (Arc::clone(&state), Arc::clone(&peers));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, s, p) = (acceptor.clone(), Arc::clone(&s), Arc::clone(&p));
                tokio::spawn(async move {
                    // A handshake without an acceptable certificate fails here.
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec())
                        .unwrap_or_default();
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, p, peer) = (Arc::clone(&s), Arc::clone(&p), peer.clone());
                        async move { Ok::<_, std::convert::Infallible>(issue(&s, &p, peer, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self { addr, state, peers }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/oauth2/token", self.addr.port())
    }

    fn last_peer(&self) -> Vec<u8> {
        self.peers.lock().unwrap().last().cloned().unwrap()
    }
}

/// Issues a 60 s token, recorded in `state` as the support endpoint does.
async fn issue(
    state: &TokenState,
    peers: &Mutex<Vec<Vec<u8>>>,
    peer: Vec<u8>,
    req: Request<Incoming>,
) -> Response<BoxBody> {
    use http_body_util::BodyExt;
    let body = req.into_body().collect().await.unwrap().to_bytes();
    *state.last_form.lock().unwrap() = form_urlencoded::parse(&body).into_owned().collect();
    peers.lock().unwrap().push(peer);
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("mtls-{n}-{:016x}", fastrand::u64(..));
    state
        .issued
        .lock()
        .unwrap()
        .insert(token.clone(), Instant::now() + Duration::from_secs(60));
    if let Some(tx) = state.counter.lock().unwrap().as_ref() {
        tx.send_replace(n);
    }
    json(
        200,
        &format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":60}}"#),
    )
}

/// The DER of the first certificate of a PEM text.
fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn rotated_client_certificate_is_presented_by_the_next_token_request() {
    let pki = Pki::new();
    let tokens = MtlsTokenServer::start(&pki).await;
    let upstream = Upstream::start(&pki, Arc::clone(&tokens.state)).await;
    let dir = tempfile::tempdir().unwrap();
    pki.write_ca(dir.path());
    let (old_cert, old_key) = pki.leaf_pem(&["client-old"]);
    std::fs::write(dir.path().join("client.crt"), &old_cert).unwrap();
    std::fs::write(dir.path().join("client.key"), &old_key).unwrap();
    let text = format!(
        r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[tokens]
request_timeout = "2s"
retry_initial = "50ms"
retry_max = "200ms"
unauthorized_refresh_interval = "1s"

[profiles.main]
token_url = "{}"
client_id = "{CLIENT_ID}"
auth_method = "tls_client_auth"
client_cert_file = "client.crt"
client_key_file = "client.key"
ca_file = "ca.pem"

[[routes]]
host = "api.test"
upstream = "https://localhost:{}"
profile = "main"
ca_file = "ca.pem"
"#,
        tokens.url(),
        upstream.addr.port()
    );
    let config = token_injector::config::from_text(&text, dir.path(), Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let app = token_injector::start(config).await.unwrap();
    tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(tokens.last_peer(), der_of(&old_cert));
    assert_eq!(
        form_value(&tokens.state, "client_id").as_deref(),
        Some(CLIENT_ID)
    );

    // Rotate: key first, then certificate, each replaced atomically.
    let (new_cert, new_key) = pki.leaf_pem(&["client-new"]);
    replace_file(&dir.path().join("client.key"), &new_key);
    replace_file(&dir.path().join("client.crt"), &new_cert);
    let client = proxied_client(app.proxy_addr());
    let r = client.get("http://api.test/after").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(tokens.state.count(), 1, "no token request on rotation");

    upstream.state.force_401.store(1, Ordering::SeqCst);
    let r = client.get("http://api.test/refused").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(tokens.state.count(), 2);
    let presented = tokens.last_peer();
    assert_eq!(presented, der_of(&new_cert), "the new certificate");
    assert_ne!(presented, der_of(&old_cert));
    app.shutdown().await;
}

/// Renaming a route's host while keeping its dedicated listen address.
#[tokio::test]
async fn renamed_route_keeps_its_dedicated_port() {
    let w = World::new(Mode::Issue(60.0)).await;
    let listen = free_port();
    let a = route("a.test", &w.upstream_url(), "main", Some(listen));
    let app = w.start(&config(&w, MAIN_SECRET, &a)).await;
    let b = route("b.test", &w.upstream_url(), "main", Some(listen));
    let renamed =
        token_injector::config::from_text(&config(&w, MAIN_SECRET, &b), w.dir.path(), Vec::new())
            .unwrap();
    app.apply(renamed).expect("reload applies");
    let r = direct_client()
        .get(format!("http://{listen}/renamed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    app.shutdown().await;
}

/// Two routes swap their dedicated ports in one reload: each port serves
/// the other route from then on.
#[tokio::test]
async fn routes_swapping_ports_take_over_each_others_socket() {
    let w = World::new(Mode::Issue(60.0)).await;
    let (p1, p2) = (free_port(), free_port());
    let up = w.upstream_url();
    let before = format!(
        "{}\n{}",
        route("a.test", &format!("{up}/a"), "main", Some(p1)),
        route("b.test", &format!("{up}/b"), "main", Some(p2))
    );
    let app = w.start(&config(&w, MAIN_SECRET, &before)).await;
    let after = format!(
        "{}\n{}",
        route("a.test", &format!("{up}/a"), "main", Some(p2)),
        route("b.test", &format!("{up}/b"), "main", Some(p1))
    );
    let swapped = token_injector::config::from_text(
        &config(&w, MAIN_SECRET, &after),
        w.dir.path(),
        Vec::new(),
    )
    .unwrap();
    app.apply(swapped).expect("reload applies");
    for (port, want) in [(p1, "/b/x"), (p2, "/a/x")] {
        let r = direct_client()
            .get(format!("http://{port}/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{port}");
        let seen = w.upstream.seen();
        assert_eq!(seen.last().unwrap().path, want, "{port}");
    }
    app.shutdown().await;
}
