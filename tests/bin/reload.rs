//! Hot reload and secret rotation, end to end.
//!
//! Config reloads go through the real binary: a child process with its
//! config file in a temp dir, observed through its admin `/metrics`
//! (`token_injector_config_reloads_total`) and its log. The token endpoint
//! and upstreams run in the test process. Secret rotation runs in-process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");
const WAIT: Duration = Duration::from_secs(15);
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

// ---------------------------------------------------------------------------
// Config text

/// The `[profiles.main]` lines after token_url/client_id/ca_file, as the
/// support fixture writes them.
const MAIN_SECRET: &str = r#"client_secret_file = "client-secret"
scopes = ["read", "write"]"#;

/// A config like `World::config`, with `main_auth` as the rest of profile
/// `main` (auth method, scopes) and `extra` appended (routes, profiles).
fn config(w: &World, main_auth: &str, extra: &str) -> String {
    format!(
        r#"{sections}
[profiles.main]
token_url = "{token_url}"
client_id = "{CLIENT_ID}"
ca_file = "ca.pem"
{main_auth}

[[routes]]
host = "api.test"
upstream = "{upstream}"
profile = "main"
ca_file = "ca.pem"

{extra}
"#,
        sections = test_sections("5s"),
        token_url = w.tokens.url(),
        upstream = w.upstream_url(),
    )
}

/// One `[[routes]]` table.
fn route(host: &str, upstream: &str, profile: &str, listen: Option<SocketAddr>) -> String {
    let listen = listen
        .map(|a| format!("listen = \"{a}\"\n"))
        .unwrap_or_default();
    format!(
        "\n[[routes]]\nhost = \"{host}\"\nupstream = \"{upstream}\"\nprofile = \"{profile}\"\nca_file = \"ca.pem\"\n{listen}"
    )
}

/// A loopback port nobody listens on right now (bound, then released).
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

// ---------------------------------------------------------------------------
// The binary as a child process

/// A running `token-injector run`, killed when dropped. Its stderr (JSON
/// log lines) is collected by a thread.
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Proc {
    /// Starts the binary on `config` and waits until its admin port answers
    /// `/healthz` (the addresses come from the "listening" log line).
    async fn start(config: &Path) -> Self {
        let mut cmd = Command::new(BIN);
        // Overrides from the test's own environment must not leak in.
        for (name, _) in std::env::vars() {
            if name.starts_with("TOKEN_INJECTOR_") {
                cmd.env_remove(name);
            }
        }
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("TOKEN_INJECTOR_LOG_FORMAT", "json")
            .env("TOKEN_INJECTOR_WORKERS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let (proxy, admin) = loop {
            let found = log.lock().unwrap().iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                let f = &v["fields"];
                (f["message"] == "token-injector listening").then(|| {
                    let addr = |k: &str| f[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    (addr("proxy_addr"), addr("admin_addr"))
                })
            });
            if let Some(a) = found {
                break a;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "token-injector exited ({status}) before listening:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "not listening within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let p = Self {
            child,
            log,
            proxy,
            admin,
        };
        let client = direct_client();
        eventually(WAIT, || {
            let r = client.get(format!("http://{admin}/healthz")).send();
            async move { r.await.ok().filter(|r| r.status() == 200).map(|_| ()) }
        })
        .await;
        p
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// `token_injector_config_reloads_total{result=...}` now.
    async fn reloads(&self, result: &str) -> u64 {
        let text = direct_client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let prefix = format!("token_injector_config_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().parse::<f64>().unwrap() as u64)
            .unwrap_or_else(|| panic!("no {prefix} in /metrics:\n{text}"))
    }

    /// Waits until the reload counter for `result` reaches `n`, then checks
    /// it did not overshoot.
    async fn await_reloads(&self, result: &str, n: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.reloads(result).await;
            if got >= n {
                assert_eq!(got, n, "reloads_total{{result={result:?}}}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "reloads_total{{result={result:?}}} is {got}, not {n}, after {WAIT:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A GET through the forward proxy: (status, error kind).
    async fn get(&self, url: &str) -> (u16, Option<String>) {
        let r = proxied_client(self.proxy).get(url).send().await.unwrap();
        (r.status().as_u16(), error_kind(&r))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A World whose config file lives at `<dir>/config.toml`.
fn write_config(w: &World, text: &str) -> PathBuf {
    let path = w.dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The `Authorization` the upstream saw on its last request.
fn last_auth(u: &Upstream) -> String {
    u.seen().last().unwrap().authorization.clone().unwrap()
}

// ---------------------------------------------------------------------------
// Config reload through the binary

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_edit_adds_a_route_and_its_listener_keeping_the_token() {
    let w = World::new(Mode::Issue(60.0)).await;
    let path = write_config(&w, &config(&w, MAIN_SECRET, ""));
    let p = Proc::start(&path).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(p.get("http://api.test/").await.0, 200);
    let first_token = last_auth(&w.upstream);
    assert_eq!(
        p.get("http://new.test/").await,
        (403, Some("no_route".into())),
        "no route for new.test yet"
    );
    assert_eq!(p.reloads("success").await, 0);

    let listen = free_port();
    let extra = route("new.test", &w.upstream_url(), "main", Some(listen));
    std::fs::write(&path, config(&w, MAIN_SECRET, &extra)).unwrap();
    p.await_reloads("success", 1).await;
    assert_eq!(p.reloads("error").await, 0);

    // The new route, through the forward proxy and its own listener.
    assert_eq!(p.get("http://new.test/via-proxy").await.0, 200);
    assert_eq!(w.upstream.seen().last().unwrap().path, "/via-proxy");
    let r = direct_client()
        .get(format!("http://{listen}/via-listener"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(w.upstream.seen().last().unwrap().path, "/via-listener");
    assert_eq!(
        last_auth(&w.upstream),
        first_token,
        "unchanged profile kept its token"
    );
    assert_eq!(p.get("http://api.test/still").await.0, 200);
    assert_eq!(
        w.tokens.state.count(),
        1,
        "no token request for the unchanged profile"
    );
    assert!(p.logged("config reloaded"), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_is_counted_logged_and_the_old_config_stays() {
    let w = World::new(Mode::Issue(60.0)).await;
    let good = config(&w, MAIN_SECRET, "");
    let path = write_config(&w, &good);
    let p = Proc::start(&path).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(p.get("http://api.test/").await.0, 200);

    // A route naming a profile that does not exist.
    let unknown = route("bad.test", &w.upstream_url(), "nobody", None);
    std::fs::write(&path, config(&w, MAIN_SECRET, &unknown)).unwrap();
    p.await_reloads("error", 1).await;
    assert!(
        p.logged("routes[1].profile: no profile named"),
        "the check message names the key:\n{}",
        p.log_text()
    );
    assert!(p.logged("config reload refused"), "{}", p.log_text());
    assert_eq!(p.get("http://api.test/after-bad-profile").await.0, 200);
    assert_eq!(
        p.get("http://bad.test/").await,
        (403, Some("no_route".into()))
    );

    // Broken TOML.
    std::fs::write(&path, format!("{good}\n[[routes]\nhost = ")).unwrap();
    p.await_reloads("error", 2).await;
    assert_eq!(p.get("http://api.test/after-broken-toml").await.0, 200);
    assert_eq!(p.reloads("success").await, 0);
    assert_eq!(
        w.tokens.state.count(),
        1,
        "the running profile kept its token"
    );

    // A valid edit after the invalid ones still applies.
    let fixed = route("bad.test", &w.upstream_url(), "main", None);
    std::fs::write(&path, config(&w, MAIN_SECRET, &fixed)).unwrap();
    p.await_reloads("success", 1).await;
    assert_eq!(p.get("http://bad.test/").await.0, 200);
    assert_eq!(w.tokens.state.count(), 1);
}

/// An upstream that holds each request until released, and counts arrivals.
struct GatedUpstream {
    addr: SocketAddr,
    arrived: watch::Receiver<usize>,
    release: watch::Sender<bool>,
}

impl GatedUpstream {
    async fn start(pki: &Pki) -> Self {
        let (arrived_tx, arrived) = watch::channel(0usize);
        let (release, release_rx) = watch::channel(false);
        let arrived_tx = Arc::new(arrived_tx);
        let addr = serve(Some(pki.server_config(&["localhost"])), move |_req| {
            let arrived_tx = Arc::clone(&arrived_tx);
            let mut release_rx = release_rx.clone();
            async move {
                arrived_tx.send_modify(|n| *n += 1);
                let _ = release_rx.wait_for(|go| *go).await;
                json(200, r#"{"slow":"done"}"#)
            }
        })
        .await;
        Self {
            addr,
            arrived,
            release,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_listener_closes_but_its_in_flight_request_finishes() {
    let w = World::new(Mode::Issue(60.0)).await;
    let mut gated = GatedUpstream::start(&w.pki).await;
    let listen = free_port();
    let slow_route = route("slow.test", &gated.url(), "main", Some(listen));
    let path = write_config(&w, &config(&w, MAIN_SECRET, &slow_route));
    let p = Proc::start(&path).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;

    let in_flight = tokio::spawn(async move {
        let r = direct_client()
            .get(format!("http://{listen}/slow"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    tokio::time::timeout(WAIT, gated.arrived.wait_for(|n| *n >= 1))
        .await
        .expect("the request reached the upstream")
        .unwrap();

    std::fs::write(&path, config(&w, MAIN_SECRET, "")).unwrap();
    p.await_reloads("success", 1).await;
    eventually(WAIT, || async move {
        tokio::net::TcpStream::connect(listen)
            .await
            .err()
            .map(|_| ())
    })
    .await;
    assert!(
        p.logged("closing listener removed from the config"),
        "{}",
        p.log_text()
    );
    assert!(!in_flight.is_finished(), "the in-flight request was cut");
    // The rest of the proxy serves on.
    assert_eq!(p.get("http://api.test/").await.0, 200);

    gated.release.send_replace(true);
    let (status, body) = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("the in-flight request finished")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"slow":"done"}"#);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_is_seen() {
    use std::os::unix::fs::symlink;
    let w = World::new(Mode::Issue(60.0)).await;
    let dir = w.dir.path();
    // What the kubelet builds for a ConfigMap volume.
    std::fs::create_dir(dir.join("..2026_a")).unwrap();
    std::fs::write(
        dir.join("..2026_a/config.toml"),
        config(&w, MAIN_SECRET, ""),
    )
    .unwrap();
    symlink("..2026_a", dir.join("..data")).unwrap();
    symlink("..data/config.toml", dir.join("config.toml")).unwrap();
    let p = Proc::start(&dir.join("config.toml")).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(
        p.get("http://b.test/").await,
        (403, Some("no_route".into()))
    );

    // The update: a new timestamped dir, then an atomic swap of `..data`.
    std::fs::create_dir(dir.join("..2026_b")).unwrap();
    let extra = route("b.test", &w.upstream_url(), "main", None);
    std::fs::write(
        dir.join("..2026_b/config.toml"),
        config(&w, MAIN_SECRET, &extra),
    )
    .unwrap();
    symlink("..2026_b", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_a")).unwrap();

    p.await_reloads("success", 1).await;
    assert_eq!(p.get("http://b.test/").await.0, 200);
    assert_eq!(p.reloads("error").await, 0);
    assert_eq!(w.tokens.state.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editor_write_and_rename_is_seen() {
    let w = World::new(Mode::Issue(60.0)).await;
    let path = write_config(&w, &config(&w, MAIN_SECRET, ""));
    let p = Proc::start(&path).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(
        p.get("http://e.test/").await,
        (403, Some("no_route".into()))
    );

    let tmp = w.dir.path().join("config.toml.tmp");
    let extra = route("e.test", &w.upstream_url(), "main", None);
    std::fs::write(&tmp, config(&w, MAIN_SECRET, &extra)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();

    p.await_reloads("success", 1).await;
    assert_eq!(p.get("http://e.test/").await.0, 200);
    assert_eq!(p.reloads("error").await, 0);
    assert_eq!(
        w.tokens.state.count(),
        1,
        "unchanged profile kept its token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_an_unchanged_file() {
    let w = World::new(Mode::Issue(60.0)).await;
    let path = write_config(&w, &config(&w, MAIN_SECRET, ""));
    let p = Proc::start(&path).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(p.reloads("success").await, 0);

    let status = Command::new("kill")
        .args(["-HUP", &p.pid()])
        .status()
        .unwrap();
    assert!(status.success());
    p.await_reloads("success", 1).await;
    assert!(p.logged("SIGHUP received"), "{}", p.log_text());

    // A second one counts again: the content is not compared.
    let status = Command::new("kill")
        .args(["-HUP", &p.pid()])
        .status()
        .unwrap();
    assert!(status.success());
    p.await_reloads("success", 2).await;
    assert_eq!(p.get("http://api.test/").await.0, 200);
    assert_eq!(w.tokens.state.count(), 1, "nothing changed: token kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_profile_refetches_with_new_scopes_unchanged_one_does_not() {
    let w = World::new(Mode::Issue(60.0)).await;
    // A second profile at its own token endpoint, with its own upstream.
    let other_tokens = TokenServer::start(&w.pki, Mode::Issue(60.0)).await;
    let other_upstream = Upstream::start(&w.pki, Arc::clone(&other_tokens.state)).await;
    let other = format!(
        r#"
[profiles.other]
token_url = "{}"
client_id = "other"
client_secret_file = "client-secret"
ca_file = "ca.pem"
scopes = ["other"]
{}"#,
        other_tokens.url(),
        route(
            "other.test",
            &format!("https://localhost:{}", other_upstream.addr.port()),
            "other",
            None
        )
    );
    let path = write_config(&w, &config(&w, MAIN_SECRET, &other));
    let p = Proc::start(&path).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    other_tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(p.get("http://other.test/").await.0, 200);
    let other_token = last_auth(&other_upstream);

    let new_scopes = MAIN_SECRET.replace(r#"["read", "write"]"#, r#"["read", "write", "admin"]"#);
    std::fs::write(&path, config(&w, &new_scopes, &other)).unwrap();
    p.await_reloads("success", 1).await;
    w.tokens.state.wait_for_requests(2, WAIT).await;
    let form = w.tokens.state.last_form.lock().unwrap().clone();
    assert!(
        form.contains(&("scope".into(), "read write admin".into())),
        "{form:?}"
    );

    // Requests after the reload: main uses its new token, other its old one.
    assert_eq!(p.get("http://api.test/").await.0, 200);
    let main_token = last_auth(&w.upstream);
    assert!(main_token.starts_with("Bearer tok-2-"), "{main_token}");
    assert_eq!(p.get("http://other.test/").await.0, 200);
    assert_eq!(last_auth(&other_upstream), other_token);
    assert_eq!(
        other_tokens.state.count(),
        1,
        "unchanged profile made no token request"
    );
    assert_eq!(w.tokens.state.count(), 2);
}

/// Bytes the process has read so far, sockets included (Linux).
#[cfg(target_os = "linux")]
fn rchar(pid: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The watch must not wake itself: reading the file is an event in the
/// watched directory too (inotify reports opens).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watch_does_not_keep_reading_the_config() {
    let w = World::new(Mode::Issue(60.0)).await;
    // A large comment makes every read of the file show in the I/O counters.
    const PAD: usize = 256 * 1024;
    let text = format!("# {}\n{}", "x".repeat(PAD), config(&w, MAIN_SECRET, ""));
    let path = write_config(&w, &text);
    let p = Proc::start(&path).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    // A reload done means the watch task is past its start.
    let status = Command::new("kill")
        .args(["-HUP", &p.pid()])
        .status()
        .unwrap();
    assert!(status.success());
    p.await_reloads("success", 1).await;

    // Nothing happens for a while: nothing may be read.
    let before = rchar(&p.pid());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let read = rchar(&p.pid()) - before;
    assert!(
        read < PAD as u64,
        "{read} bytes read while idle: the config file is read again and again"
    );
    assert_eq!(p.reloads("success").await, 1);
}

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
