//! The fleet (issue 16) through the real binary: instances as child
//! processes sharing a real `redis-server` (tests/it/support/redis.rs),
//! for what needs a process of its own: a lease holder stopped (SIGSTOP)
//! in the middle of its fetch, the logs at `RUST_LOG=trace`, and the log
//! of a wrong Redis password. The in-process fleet tests are in
//! tests/it/fleet.rs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::support::redis::{
    Server, cache_table, leases, metric_sum, reads, signal, url_target, write_key, write_private,
};
use crate::support::reload::write_config;
use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");
const WAIT: Duration = Duration::from_secs(20);
const KEY_FILE: &str = "cache-key";
const LEASES: &str = "token-injector:lease:*";
/// `tokens.request_timeout` of the test config: the lease's life.
const LEASE_TTL: Duration = Duration::from_secs(2);

/// `token-injector run` as a child, JSON logs; stdout and stderr are both
/// collected line by line. Killed (after a SIGCONT) when dropped.
struct Proc {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Proc {
    async fn start(config: &Path, rust_log: &str) -> Self {
        let mut cmd = Command::new(BIN);
        for (name, _) in std::env::vars() {
            if name.starts_with("TOKEN_INJECTOR_") || name.to_lowercase().ends_with("_proxy") {
                cmd.env_remove(name);
            }
        }
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .env("TOKEN_INJECTOR_LOG_FORMAT", "json")
            .env("TOKEN_INJECTOR_WORKERS", "2")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for raw in BufReader::new(stream).split(b'\n') {
                    let Ok(raw) = raw else { break };
                    sink.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&raw).into_owned());
                }
            });
        }
        let deadline = Instant::now() + WAIT;
        let (proxy, admin) = loop {
            let found = lines.lock().unwrap().iter().find_map(|l| {
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
                    lines.lock().unwrap().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "not listening within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self {
            child: Some(child),
            lines,
            proxy,
            admin,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    async fn metrics(&self) -> String {
        scrape(self.admin).await
    }

    /// SIGKILL (after SIGCONT, should it be stopped) and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), rustix::process::Signal::CONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A GET of `http://api.test/` through `proxy`, naming instance `n`.
async fn get(proxy: SocketAddr, n: usize) -> Result<(), String> {
    let r = proxied_client(proxy)
        .get("http://api.test/")
        .header("x-instance", n.to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("instance {n}: {e}"))?;
    match r.status().as_u16() {
        200 => Ok(()),
        s => Err(format!("instance {n}: {s} {:?}", error_kind(&r))),
    }
}

/// Requests through each `(proxy, n)` every 100 ms until stopped; returns
/// the failures.
fn traffic(
    targets: Vec<(SocketAddr, usize)>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let tasks: Vec<_> = targets
            .into_iter()
            .map(|(proxy, n)| {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut tick = tokio::time::interval(Duration::from_millis(100));
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        if let Err(e) = get(proxy, n).await {
                            failures.push(e);
                        }
                    }
                    failures
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    })
}

/// The bearer tokens the upstream saw from instance `n`, in order.
fn tokens_of(w: &World, n: usize) -> Vec<String> {
    w.upstream
        .seen()
        .into_iter()
        .filter(|s| {
            s.headers
                .iter()
                .any(|(k, v)| k == "x-instance" && *v == n.to_string())
        })
        .filter_map(|s| Some(s.authorization?.strip_prefix("Bearer ")?.to_owned()))
        .collect()
}

fn cache_config(w: &World, r: &Server, extra: &str) -> String {
    w.config("", &cache_table(&url_target(r), KEY_FILE, extra))
}

/// Three instances share 10 s tokens. At the first renewal the token
/// endpoint hangs; the instance that took the lease is found from the
/// lease's value (`host:pid:random`) and SIGSTOPped in the middle of its
/// fetch. Another instance takes the lease over when it expires (after
/// `tokens.request_timeout`), fetches, and the third adopts its token. No
/// request to the two fails; the stopped one serves again after SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holder_stopped_mid_fetch_is_taken_over() {
    const N: usize = 3;
    let w = World::new(Mode::Issue(10.0)).await;
    let redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    let text = cache_config(&w, &redis, "");
    assert!(text.contains("request_timeout = \"2s\""), "{text}");
    let path = write_config(&w, &text);
    let mut procs = Vec::new();
    for _ in 0..N {
        procs.push(Proc::start(&path, "info").await);
    }
    w.tokens.state.wait_for_requests(1, WAIT).await;
    for (n, p) in procs.iter().enumerate() {
        assert_eq!(get(p.proxy, n).await, Ok(()));
    }
    assert_eq!(w.tokens.state.count(), 1, "one token for the three");

    // The renewal's fetch hangs at the token endpoint.
    *w.tokens.state.delay.lock().unwrap() = Duration::from_secs(6);
    let (lease, value) = eventually(WAIT, || async {
        for k in redis.keys(LEASES).await {
            if let Some(v) = redis.get(&k).await {
                return Some((k, String::from_utf8(v).unwrap()));
            }
        }
        None
    })
    .await;
    let taken = Instant::now();
    let parts: Vec<&str> = value.split(':').collect();
    assert_eq!(parts.len(), 3, "lease value {value:?}: host:pid:random");
    let pid: u32 = parts[1].parse().unwrap();
    let holder = procs
        .iter()
        .position(|p| p.pid() == pid)
        .unwrap_or_else(|| panic!("lease {value:?} held by none of ours"));
    w.tokens.state.wait_for_requests(2, WAIT).await;
    signal(pid, rustix::process::Signal::STOP);
    *w.tokens.state.delay.lock().unwrap() = Duration::ZERO;
    let ttl = redis.pttl(&lease).await;
    assert!(
        (1..=LEASE_TTL.as_millis() as i64).contains(&ttl),
        "lease PTTL {ttl}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let others: Vec<(SocketAddr, usize)> = procs
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != holder)
        .map(|(n, p)| (p.proxy, n))
        .collect();
    let load = traffic(others.clone(), Arc::clone(&stop));

    w.tokens.state.wait_for_requests(3, WAIT).await;
    let took_over_in = taken.elapsed();
    let old = w
        .tokens
        .state
        .issued
        .lock()
        .unwrap()
        .keys()
        .find(|t| t.starts_with("tok-1-"))
        .cloned()
        .unwrap();
    // Both others serve a renewed token, a few times each.
    eventually(WAIT, || async {
        others
            .iter()
            .all(|(_, n)| {
                let t = tokens_of(&w, *n);
                t.len() >= 3 && t[t.len() - 3..].iter().all(|t| *t != old)
            })
            .then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    let fetched = w.tokens.state.count();

    let mut texts = Vec::new();
    for (n, _) in procs.iter().enumerate().filter(|(n, _)| *n != holder) {
        texts.push((n, procs[n].metrics().await));
    }
    let taken_over: f64 = texts.iter().map(|(_, t)| leases(t, "taken_over")).sum();
    let fallbacks: f64 = texts
        .iter()
        .map(|(_, t)| {
            metric_sum(
                t,
                "token_injector_shared_cache_fallbacks_total",
                &[("profile", "main")],
            )
        })
        .sum();
    println!(
        "lease of {value:?} (instance {holder}) stopped; taken over after {took_over_in:.2?}; \
         {fetched} token requests; leases taken_over {taken_over}, waited {}, won {}; \
         fallbacks {fallbacks}",
        texts.iter().map(|(_, t)| leases(t, "waited")).sum::<f64>() + 0.0,
        texts.iter().map(|(_, t)| leases(t, "won")).sum::<f64>() + 0.0,
    );
    for (n, p) in procs.iter().enumerate().filter(|(n, _)| *n != holder) {
        for l in p
            .log()
            .lines()
            .filter(|l| l.contains("lease") || l.contains("shared"))
        {
            println!("instance {n}: {l}");
        }
    }
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(
        took_over_in <= LEASE_TTL + Duration::from_millis(1000),
        "taken over {took_over_in:?} after the lease was taken"
    );
    assert_eq!(taken_over, 1.0, "exactly one instance took the lease over");
    assert_eq!(fetched, 3, "the third instance fetched instead of adopting");
    assert_eq!(w.upstream.state.rejected.load(Ordering::SeqCst), 0);

    // The stopped one comes back and serves.
    signal(pid, rustix::process::Signal::CONT);
    assert!(procs[holder].alive());
    eventually(WAIT, || async {
        get(procs[holder].proxy, holder).await.ok()
    })
    .await;
}

/// What must never be in a log, named.
struct Forbidden(Vec<(String, String)>);

impl Forbidden {
    fn add(&mut self, what: &str, value: impl Into<String>) {
        let value = value.into();
        assert!(value.len() >= 8, "{what} too short to look for");
        self.0.push((what.to_owned(), value));
    }

    fn leaks(&self, log: &str) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|(what, value)| {
                let at = log.find(value.as_str())?;
                let line = log[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = log[at..].find('\n').map_or(log.len(), |i| at + i);
                Some(format!("{what} in: {}", &log[line..end]))
            })
            .collect()
    }
}

/// Two instances with `RUST_LOG=trace` share 2 s tokens through Redis as
/// an ACL user with a password (fetch, write, adopt, lease, release). No
/// token, client secret, encryption key or Redis password is in their
/// stdout or stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_at_trace() {
    let w = World::new(Mode::Issue(2.0)).await;
    let redis = Server::start().await;
    let password = format!("{:032x}", fastrand::u128(..));
    redis.create_user(&password).await;
    write_private(
        &w.dir.path().join("redis-password"),
        format!("{password}\n").as_bytes(),
    );
    let key = write_key(w.dir.path(), KEY_FILE);
    let path = write_config(
        &w,
        &cache_config(
            &w,
            &redis,
            "username = \"token-injector\"\npassword_file = \"redis-password\"",
        ),
    );
    let mut procs = vec![
        Proc::start(&path, "trace").await,
        Proc::start(&path, "trace").await,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let targets = procs
        .iter()
        .enumerate()
        .map(|(n, p)| (p.proxy, n))
        .collect();
    let load = traffic(targets, Arc::clone(&stop));
    // A few renewals: fetched by one, adopted by the other.
    eventually(WAIT, || async {
        let mut hits = 0.0;
        let mut won = 0.0;
        for p in &procs {
            let m = p.metrics().await;
            hits += reads(&m, "hit");
            won += leases(&m, "won");
        }
        (hits >= 3.0 && won >= 3.0).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let failures = load.await.unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    for p in &mut procs {
        p.kill();
    }
    let log: String = procs.iter().map(|p| p.log() + "\n").collect();
    assert!(
        log.lines().count() > 200,
        "only {} lines: is RUST_LOG=trace in effect?",
        log.lines().count()
    );
    assert!(
        log.contains("token adopted from the shared cache"),
        "no adoption logged"
    );

    let mut f = Forbidden(Vec::new());
    let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    f.add("the client secret", SECRET);
    f.add("the client secret, form-encoded", form(SECRET));
    for plain in [
        format!("{}:{}", form(CLIENT_ID), form(SECRET)),
        format!("{CLIENT_ID}:{SECRET}"),
    ] {
        f.add(
            "the client secret in Basic credentials",
            STANDARD.encode(plain).trim_end_matches('='),
        );
    }
    f.add("the Redis password", password.clone());
    f.add("the encryption key, base64", STANDARD.encode(&key));
    f.add(
        "the encryption key, hex",
        key.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    );
    f.add(
        "the encryption key, as a byte list",
        format!("{:?}", &key[..8]).trim_end_matches(']').to_owned(),
    );
    f.add(
        "the encryption key, raw",
        String::from_utf8_lossy(&key).into_owned(),
    );
    let issued: Vec<String> = w
        .tokens
        .state
        .issued
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(issued.len() >= 3, "{issued:?}");
    for t in &issued {
        f.add("a token", t.clone());
        f.add("a token's random part", t.rsplit('-').next().unwrap());
    }
    let leaks = f.leaks(&log);
    assert!(leaks.is_empty(), "{leaks:#?}");
}

/// The proxy's Redis user exists, but its password file holds another
/// password: a clear error at start naming authentication, a fallback to
/// fetching alone, ready and serving, no crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_error_and_a_fallback() {
    let w = World::new(Mode::Issue(60.0)).await;
    let redis = Server::start_tls(&w.pki).await;
    let right = format!("{:032x}", fastrand::u128(..));
    let wrong = format!("{:032x}", fastrand::u128(..));
    redis.create_user(&right).await;
    write_private(
        &w.dir.path().join("redis-password"),
        format!("{wrong}\n").as_bytes(),
    );
    write_key(w.dir.path(), KEY_FILE);
    let path = write_config(
        &w,
        &cache_config(
            &w,
            &redis,
            "username = \"token-injector\"\npassword_file = \"redis-password\"\nca_file = \"ca.pem\"",
        ),
    );
    let mut p = Proc::start(&path, "info").await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(get(p.proxy, 0).await, Ok(()), "fetched alone, serving");
    let ready = direct_client()
        .get(format!("http://{}/readyz", p.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ready without Redis");
    let m = p.metrics().await;
    let auth = metric_sum(
        &m,
        "token_injector_shared_cache_errors_total",
        &[("kind", "auth")],
    );
    let fallbacks = metric_sum(
        &m,
        "token_injector_shared_cache_fallbacks_total",
        &[("profile", "main")],
    );
    assert!(auth >= 1.0, "errors_total{{kind=\"auth\"}} {auth}");
    assert!(fallbacks >= 1.0, "fallbacks {fallbacks}");
    assert_eq!(
        metric_value(&m, "token_injector_shared_cache_up "),
        Some(0.0)
    );
    let log = p.log();
    let line = log
        .lines()
        .find(|l| (l.contains("\"WARN\"") || l.contains("\"ERROR\"")) && l.contains("Redis"))
        .unwrap_or_else(|| panic!("no warning about Redis:\n{log}"));
    println!("{line}");
    let lower = line.to_lowercase();
    assert!(
        lower.contains("auth") && (lower.contains("password") || lower.contains("authentication")),
        "the error does not name authentication: {line}"
    );
    assert!(
        !log.contains(&wrong) && !log.contains(&right),
        "a password in the log"
    );
    assert!(p.alive(), "crashed");
    assert!(
        redis
            .clients()
            .await
            .lines()
            .all(|l| !l.contains("user=token-injector"))
    );
}
