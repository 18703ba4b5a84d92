//! Hot reload through the real binary: a child process with its config
//! file in a temp dir, observed through its admin `/metrics`
//! (`token_injector_config_reloads_total`) and its log. The token endpoint
//! and upstreams run in the test process. The in-process reload and secret
//! rotation tests are in tests/it/reload.rs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::support::reload::{MAIN_SECRET, WAIT, config, free_port, route, write_config};
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");

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
