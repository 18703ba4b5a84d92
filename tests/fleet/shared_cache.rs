//! The fleet (issue 16): proxy instances, in this process, sharing one
//! token per profile through a real `redis-server` (or a master behind
//! `redis-sentinel`s) started by the test on 127.0.0.1
//! (tests/it/support/redis.rs, shared with tests/it). One token endpoint counts the fleet's token
//! requests; one upstream checks every bearer token against what that
//! endpoint issued. The tests with separate processes of the binary (a
//! lease holder stopped mid-fetch, logs at trace level, a wrong Redis
//! password) are in tests/bin/fleet.rs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::support::redis::{
    Sentinels, Server, cache_table, errors, fallbacks, leases, metric_sum, reads, up, url_target,
    write_key, write_private,
};
use crate::support::*;

/// Bound of every wait for something that can be awaited.
const WAIT: Duration = Duration::from_secs(20);
/// Bound of the wait for `token_injector_shared_cache_up` to come back on
/// every instance after Redis does: the health probe starts its 5 s checks
/// as soon as Redis is marked down.
const UP_WAIT: Duration = Duration::from_secs(20);
/// The encryption key file every instance of a test reads (in the World's
/// dir, relative to it).
const KEY_FILE: &str = "cache-key";
/// Every shared entry, with the default `key_prefix`.
const ENTRIES: &str = "token-injector:token:*";

// ---------------------------------------------------------------------------
// Fixtures

/// `w.config` with a `[cache]` table on the plain Redis `r`.
fn fleet_config(w: &World, r: &Server) -> String {
    w.config("", &cache_table(&url_target(r), KEY_FILE, ""))
}

/// One proxy instance of the fleet, with a client that uses it as its
/// proxy and names the instance in an `x-instance` header (which the
/// upstream records).
struct Instance {
    run: token_injector::Running,
    client: reqwest::Client,
    n: usize,
}

impl Instance {
    async fn start(w: &World, text: &str, n: usize) -> Self {
        let run = w.start(text).await;
        let client = proxied_client(run.proxy_addr());
        Self { run, client, n }
    }

    /// A GET of `http://api.test/` through this instance: its status, or
    /// why there was none.
    async fn get(&self) -> Result<u16, String> {
        send(&self.client, self.n).await
    }

    async fn metrics(&self) -> String {
        scrape(self.run.admin_addr()).await
    }

    /// The token this instance holds for profile `main` now.
    fn token(&self) -> Option<String> {
        let store = self.run.store("main")?;
        let t = store.current()?;
        Some(t.value().to_str().unwrap().to_owned())
    }
}

async fn send(client: &reqwest::Client, n: usize) -> Result<u16, String> {
    let r = client
        .get("http://api.test/")
        .header("x-instance", n.to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("instance {n}: {e}"))?;
    let status = r.status().as_u16();
    if status != 200 {
        return Err(format!("instance {n}: {status} {:?}", error_kind(&r)));
    }
    Ok(status)
}

async fn start_fleet(w: &World, text: &str, n: usize) -> Vec<Instance> {
    let mut fleet = Vec::new();
    for i in 0..n {
        fleet.push(Instance::start(w, text, i).await);
    }
    fleet
}

/// Requests through every instance, each every `every`, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    /// The longest a request took, answered or not.
    slowest: Arc<std::sync::Mutex<Duration>>,
    tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
}

impl Traffic {
    fn start(fleet: &[Instance], every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let tasks = fleet
            .iter()
            .map(|i| {
                let client = i.client.clone();
                let n = i.n;
                let stop = Arc::clone(&stop);
                let slowest = Arc::clone(&slowest);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let sent = Instant::now();
                        let r = send(&client, n).await;
                        let took = sent.elapsed();
                        let mut max = slowest.lock().unwrap();
                        *max = (*max).max(took);
                        drop(max);
                        match r {
                            Ok(_) => ok += 1,
                            Err(e) => failures.push(e),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Self {
            stop,
            slowest,
            tasks,
        }
    }

    /// The longest a request took since the last call.
    fn slowest(&self) -> Duration {
        std::mem::take(&mut *self.slowest.lock().unwrap())
    }

    /// Stops; the requests answered 200 and every failure.
    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failures) = (0, Vec::new());
        for t in self.tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}

/// Every instance's `/metrics`.
async fn scrape_all(fleet: &[Instance]) -> Vec<String> {
    let mut out = Vec::new();
    for i in fleet {
        out.push(i.metrics().await);
    }
    out
}

fn total(texts: &[String], f: impl Fn(&str) -> f64) -> f64 {
    texts.iter().map(|t| f(t)).sum::<f64>() + 0.0 // (an empty float sum is -0)
}

/// A one-line account of the fleet's shared-cache metrics.
fn account(texts: &[String]) -> String {
    format!(
        "reads hit {} miss {} stale {} undecryptable {} error {}; leases won {} waited {} taken_over {}; fallbacks {}; errors {}",
        total(texts, |t| reads(t, "hit")),
        total(texts, |t| reads(t, "miss")),
        total(texts, |t| reads(t, "stale")),
        total(texts, |t| reads(t, "undecryptable")),
        total(texts, |t| reads(t, "error")),
        total(texts, |t| leases(t, "won")),
        total(texts, |t| leases(t, "waited")),
        total(texts, |t| leases(t, "taken_over")),
        total(texts, fallbacks),
        total(texts, |t| errors(t, "")),
    )
}

/// The bearer tokens the upstream saw from each instance, in order, from
/// its request number `from` on.
fn tokens_by_instance(w: &World, from: usize) -> BTreeMap<usize, Vec<String>> {
    let mut out: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for s in w.upstream.seen().into_iter().skip(from) {
        let n = s
            .headers
            .iter()
            .find(|(k, _)| k == "x-instance")
            .and_then(|(_, v)| v.parse().ok());
        let token = s
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::to_owned);
        if let (Some(n), Some(t)) = (n, token) {
            out.entry(n).or_default().push(t);
        }
    }
    out
}

/// The only entry key in `r` (waits for it).
async fn the_entry(r: &Server) -> String {
    eventually(WAIT, || async {
        let keys = r.keys(ENTRIES).await;
        (keys.len() == 1).then(|| keys[0].clone())
    })
    .await
}

/// The earliest a 2 s token is renewed after it was issued: at half its
/// life (the floor when `refresh_margin` exceeds the lifetime), up to 10 %
/// earlier by jitter. One fetch per renewal fleet-wide means at most one
/// fetch per this much time.
fn renewal_period(lifetime: f64) -> f64 {
    lifetime * 0.5 * 0.9
}

// ---------------------------------------------------------------------------
// The harness

/// The harness itself: a key set and read back with its TTL, raw bytes,
/// a kill and an empty restart on the same port, a paused server, TLS, the
/// documented ACL line, and a failover by killing the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_redis_restart_tls_and_failover() {
    let mut r = Server::start().await;
    r.set_px("k", &[0, 159, 146, 150], Duration::from_secs(30))
        .await;
    assert_eq!(r.get("k").await.unwrap(), vec![0, 159, 146, 150]);
    let ttl = r.pttl("k").await;
    assert!((1..=30_000).contains(&ttl), "{ttl}");
    assert_eq!(r.keys("*").await, vec!["k".to_owned()]);
    let port = r.port;
    r.kill();
    assert!(r.try_conn(Duration::from_millis(300)).await.is_err());
    r.restart().await;
    assert_eq!(r.port, port);
    assert!(r.dump_all().await.is_empty(), "restarted empty");
    r.pause();
    assert!(r.try_query::<String>(&::redis::cmd("PING")).await.is_err());
    r.resume();
    assert_eq!(r.query::<String>(&::redis::cmd("PING")).await, "PONG");

    let pki = Pki::new();
    let t = Server::start_tls(&pki).await;
    assert!(t.url().starts_with("rediss://localhost:"));
    let rules = t.create_user("pw").await;
    assert!(rules.iter().any(|r| r == "+get"), "{rules:?}");

    let mut s = Sentinels::start("tokens").await;
    let old = s.master.port;
    s.master
        .set_px("before", b"x", Duration::from_secs(30))
        .await;
    let new = s.kill_master().await;
    assert_ne!(old, new);
    assert_eq!(s.master.port, new);
    assert_eq!(s.master.get("before").await.unwrap(), b"x", "replicated");
    for sentinel in &s.sentinels {
        assert_eq!(s.reported_master(sentinel).await, Some(new));
    }
}

// ---------------------------------------------------------------------------
// One token per renewal for the fleet

/// 20 instances with 2 s tokens under traffic for 20 s: the token endpoint
/// sees about one request per renewal period, not one per instance, and
/// every request carries a valid token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_20_shares_one_token_per_renewal() {
    const N: usize = 20;
    const LIFETIME: f64 = 2.0;
    const RUN: Duration = Duration::from_secs(20);
    let w = World::new(Mode::Issue(LIFETIME)).await;
    let redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    let text = fleet_config(&w, &redis);

    let began = Instant::now();
    let fleet = start_fleet(&w, &text, N).await;
    let started_in = began.elapsed();
    let at_start = w.tokens.state.count();
    let traffic = Traffic::start(&fleet, Duration::from_millis(100));
    // The measurement window (traffic runs meanwhile), not a wait.
    tokio::time::sleep(RUN).await;
    let (ok, failures) = traffic.stop().await;
    let elapsed = began.elapsed().as_secs_f64();
    let fetched = w.tokens.state.count();
    let texts = scrape_all(&fleet).await;

    // One fetch per renewal period, plus the first, and some slack for
    // timers that fire late on a loaded machine (the measured count is
    // about elapsed / 0.91 + 2). Without sharing it would be about one per
    // instance per period; two per period would already exceed the bound.
    let bound = (elapsed / renewal_period(LIFETIME)).ceil() as usize + 5;
    let alone = (N as f64 * elapsed / (LIFETIME * 0.5)) as usize;
    println!(
        "fleet of {N}, {LIFETIME} s tokens, {elapsed:.1} s (start {started_in:.1?}): \
         {fetched} token requests ({at_start} while starting; bound {bound}; \
         about {alone} without sharing); {ok} requests answered 200; {}",
        account(&texts)
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(
        ok as f64 >= N as f64 * RUN.as_secs_f64() * 10.0 * 0.5,
        "{ok}"
    );
    assert_eq!(
        w.upstream
            .state
            .rejected
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "an invalid or expired token reached the upstream"
    );
    for s in w.upstream.seen() {
        let t = s.authorization.unwrap();
        assert!(
            w.tokens
                .state
                .was_issued(t.strip_prefix("Bearer ").unwrap())
        );
    }
    assert!(at_start <= 2, "{at_start} token requests for a cold fleet");
    assert!(
        fetched <= bound,
        "{fetched} token requests in {elapsed:.1} s: more than one per renewal ({bound})"
    );
    assert!(total(&texts, |t| reads(t, "hit")) > 0.0);
    assert_eq!(
        total(&texts, |t| leases(t, "taken_over")),
        0.0,
        "a lease \"taken over\" while every holder was alive: {}",
        account(&texts)
    );
    assert_eq!(
        total(&texts, fallbacks),
        0.0,
        "fell back with Redis up: {}",
        account(&texts)
    );
    for t in &texts {
        assert_eq!(up(t), Some(1.0));
    }
}

/// A new instance starting while a valid entry is there is ready, and
/// answers its first request, without a token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_entry_cold_start_needs_no_token_request() {
    let w = World::new(Mode::Issue(60.0)).await;
    let redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    let text = fleet_config(&w, &redis);

    let first = Instance::start(&w, &text, 0).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    let entry = the_entry(&redis).await;
    // The entry lives as long as the token: its TTL is the token's
    // remaining life.
    let ttl = redis.pttl(&entry).await;
    assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");
    assert_eq!(first.get().await, Ok(200));
    let token = first.token().unwrap();

    let before = w.tokens.state.count();
    let second = Instance::start(&w, &text, 1).await;
    assert_eq!(second.get().await, Ok(200), "first request of the second");
    assert_eq!(
        w.tokens.state.count(),
        before,
        "the second asked for a token"
    );
    assert_eq!(second.token().as_deref(), Some(token.as_str()));
    let seen = tokens_by_instance(&w, 0);
    assert_eq!(seen[&1], vec![token.clone()]);
    let ready = direct_client()
        .get(format!("http://{}/readyz", second.run.admin_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let m = second.metrics().await;
    assert_eq!(
        reads(&m, "hit"),
        1.0,
        "{}",
        account(std::slice::from_ref(&m))
    );
    assert_eq!(leases(&m, "won"), 0.0);
    assert_eq!(
        metric_sum(
            &m,
            "token_injector_token_fetch_total",
            &[("profile", "main")]
        ),
        0.0,
        "an adopted token is not a fetch"
    );
    assert!(
        metric_value(
            &m,
            "token_injector_token_expiry_timestamp_seconds{profile=\"main\"} "
        )
        .is_some_and(|v| v > 0.0),
        "the expiry gauge is set for an adopted token"
    );
}

// ---------------------------------------------------------------------------
// Redis failing

/// Redis SIGKILLed under traffic: no request fails, every instance falls
/// back to fetching alone and says so in its metrics; Redis restarted empty:
/// sharing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_falls_back_then_resumes() {
    const N: usize = 3;
    let w = World::new(Mode::Issue(2.0)).await;
    let mut redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    let text = fleet_config(&w, &redis);
    let fleet = start_fleet(&w, &text, N).await;
    let traffic = Traffic::start(&fleet, Duration::from_millis(100));

    // Sharing: renewals adopted, every instance has talked to Redis.
    eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        (total(&texts, |t| reads(t, "hit")) >= N as f64 && texts.iter().all(|t| up(t) == Some(1.0)))
            .then_some(())
    })
    .await;

    redis.kill();
    let killed_at = w.tokens.state.count();
    let texts = eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        texts
            .iter()
            .all(|t| fallbacks(t) >= 1.0 && up(t) == Some(0.0) && errors(t, "connect") >= 1.0)
            .then_some(texts)
    })
    .await;
    let during = w.tokens.state.count() - killed_at;
    println!("Redis down: {during} token requests; {}", account(&texts));
    assert!(during >= N, "each instance fetched alone: {during}");

    redis.restart().await;
    let hits_before = total(&scrape_all(&fleet).await, |t| reads(t, "hit"));
    let restarted_at = w.tokens.state.count();
    let restarted = Instant::now();
    // Sharing again: a new entry, renewals adopted from it.
    let texts = eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        let entry = !redis.keys(ENTRIES).await.is_empty();
        (entry && total(&texts, |t| reads(t, "hit")) >= hits_before + N as f64).then_some(texts)
    })
    .await;
    println!(
        "Redis back: sharing again after {:.1?} and {} token requests; {}",
        restarted.elapsed(),
        w.tokens.state.count() - restarted_at,
        account(&texts)
    );
    // And every instance says so: the gauge comes back at the instance's
    // next write to Redis (a lease it wins, or its health probe).
    eventually(UP_WAIT, || async {
        let texts = scrape_all(&fleet).await;
        texts.iter().all(|t| up(t) == Some(1.0)).then_some(())
    })
    .await;
    println!(
        "Redis back: up on every instance after {:.1?}",
        restarted.elapsed()
    );
    let (ok, failures) = traffic.stop().await;
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(ok > 0);
    assert_eq!(w.upstream.state.rejected.load(Ordering::SeqCst), 0);
}

/// Redis hangs (SIGSTOP: connections stay open, nothing answers): every
/// Redis operation gives up after `operation_timeout`, each instance falls
/// back, and no request waits on Redis. After SIGCONT sharing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hanging_is_a_timeout_never_a_slow_request() {
    const N: usize = 3;
    let w = World::new(Mode::Issue(2.0)).await;
    let redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    let text = fleet_config(&w, &redis);
    let fleet = start_fleet(&w, &text, N).await;
    let traffic = Traffic::start(&fleet, Duration::from_millis(50));
    eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        (total(&texts, |t| reads(t, "hit")) >= N as f64).then_some(())
    })
    .await;
    let before = traffic.slowest();

    redis.pause();
    let paused = Instant::now();
    let texts = eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        texts
            .iter()
            .all(|t| fallbacks(t) >= 1.0 && errors(t, "timeout") >= 1.0 && up(t) == Some(0.0))
            .then_some(texts)
    })
    .await;
    let hung_for = paused.elapsed();
    let slowest = traffic.slowest();
    redis.resume();
    let hits = total(&scrape_all(&fleet).await, |t| reads(t, "hit"));
    eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        (total(&texts, |t| reads(t, "hit")) >= hits + N as f64).then_some(())
    })
    .await;
    let (ok, failures) = traffic.stop().await;
    println!(
        "Redis hung {hung_for:.1?}: slowest request meanwhile {slowest:.0?} (before: {before:.0?}); {}",
        account(&texts)
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(ok > 0);
    // operation_timeout is 250 ms: a request that waited on Redis would
    // take that much longer than the slowest one before the hang.
    assert!(
        slowest < before + Duration::from_millis(200),
        "a request took {slowest:?} while Redis hung (before: {before:?})"
    );
    assert_eq!(w.upstream.state.rejected.load(Ordering::SeqCst), 0);
}

/// A token the authorization server revoked: the upstream refuses it. The
/// first instance to learn it deletes the entry and fetches once for the
/// fleet; the others adopt that token after their own 401; nobody sends the
/// refused token again, and nobody adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_401_costs_the_fleet_one_fetch() {
    const N: usize = 4;
    let w = World::new(Mode::Issue(60.0)).await;
    let redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    let text = fleet_config(&w, &redis);
    let fleet = start_fleet(&w, &text, N).await;
    for i in &fleet {
        assert_eq!(i.get().await, Ok(200));
    }
    assert_eq!(w.tokens.state.count(), 1, "one token for the fleet");
    let refused = fleet[0].token().unwrap();
    for i in &fleet {
        assert_eq!(i.token().as_deref(), Some(refused.as_str()));
    }

    // Revoked: the upstream answers 401 to it from now on.
    w.tokens.state.issued.lock().unwrap().remove(&refused);
    let from = w.upstream.seen().len();
    assert_eq!(fleet[0].get().await, Ok(200), "retried with a fresh token");
    assert_eq!(w.tokens.state.count(), 2, "one new token request");
    let fresh = fleet[0].token().unwrap();
    assert_ne!(fresh, refused);
    let entry = the_entry(&redis).await;
    assert!(redis.get(&entry).await.is_some(), "the new token is shared");
    for round in 0..2 {
        for i in &fleet {
            assert_eq!(i.get().await, Ok(200), "round {round}, instance {}", i.n);
        }
    }
    assert_eq!(
        w.tokens.state.count(),
        2,
        "the other instances fetched instead of adopting"
    );
    let late = Instance::start(&w, &text, N).await;
    assert_eq!(late.get().await, Ok(200));
    assert_eq!(w.tokens.state.count(), 2);

    let seen = tokens_by_instance(&w, from);
    for (n, tokens) in &seen {
        // Each instance sends the revoked token at most once (the request
        // that taught it), as its first request after the revocation.
        let sent = tokens.iter().filter(|t| **t == refused).count();
        assert!(
            sent <= 1,
            "instance {n} sent the refused token {sent} times"
        );
        assert!(
            tokens[1..].iter().all(|t| *t == fresh),
            "instance {n}: {tokens:?}"
        );
    }
    assert_eq!(seen[&N], vec![fresh.clone()], "the late instance");
    for i in fleet.iter().chain([&late]) {
        assert_eq!(
            i.token().as_deref(),
            Some(fresh.as_str()),
            "instance {}",
            i.n
        );
    }
    let texts = scrape_all(&fleet).await;
    println!("after the 401: {}", account(&texts));
    assert_eq!(leases(&texts[0], "won"), 2.0, "start and after the 401");
    for t in &texts[1..] {
        assert!(
            reads(t, "hit") >= 2.0,
            "{}",
            account(std::slice::from_ref(t))
        );
        assert_eq!(leases(t, "won"), 0.0);
    }
}

// ---------------------------------------------------------------------------
// What Redis holds cannot be trusted

/// Values written straight into the entry: garbage, truncated, of another
/// version, sealed with another key, sealed under another entry's name,
/// and one whose token has expired (but whose Redis TTL has not). Each time
/// a fresh instance ignores it, counts it, fetches its own token, and
/// nothing of it reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_wrong_key_and_expired_entries_are_ignored() {
    let w = World::new(Mode::Issue(60.0)).await;
    let redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    write_key(w.dir.path(), "cache-key-other");
    let main = fleet_config(&w, &redis);
    let other_key = w.config("", &cache_table(&url_target(&redis), "cache-key-other", ""));
    let other_scopes = main.replace(r#"scopes = ["read", "write"]"#, r#"scopes = ["admin"]"#);
    assert_ne!(other_scopes, main);

    // A real entry made by an instance running `text`: its name and value.
    let made = |text: String| {
        let w = &w;
        let redis = &redis;
        async move {
            let before = redis.keys(ENTRIES).await;
            let n = w.tokens.state.count();
            let i = Instance::start(w, &text, 99).await;
            w.tokens.state.wait_for_requests(n + 1, WAIT).await;
            let name = eventually(WAIT, || async {
                let now = redis.keys(ENTRIES).await;
                now.into_iter().find(|k| !before.contains(k))
            })
            .await;
            let token = i.token().unwrap();
            i.run.shutdown().await;
            let value = redis.get(&name).await.unwrap();
            (name, value, token)
        }
    };
    let (entry, real, _) = made(main.clone()).await;
    let (other_name, sealed_other_key, _) = made(other_key).await;
    assert_ne!(other_name, entry, "the name depends on the key");
    let (third_name, sealed_other_name, _) = made(other_scopes).await;
    assert_ne!(third_name, entry, "the name depends on the scopes");
    // The design's format: version, nonce, ciphertext and tag.
    assert_eq!(real[0], 1, "version byte");
    assert!(real.len() > 1 + 12 + 16 + 16, "{} bytes", real.len());

    // An expired one: a 1 s token, kept until it has expired.
    w.tokens.state.set_mode(Mode::Issue(1.0));
    redis.del(&entry).await;
    let (name, expired, expired_token) = made(main.clone()).await;
    assert_eq!(name, entry);
    eventually(WAIT, || async {
        (!w.tokens.state.valid(&expired_token)).then_some(())
    })
    .await;
    w.tokens.state.set_mode(Mode::Issue(60.0));

    let mut garbage = vec![0u8; 80];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut garbage).unwrap();
    let mut other_version = real.clone();
    other_version[0] = 2;
    let mut flipped = real.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", garbage, "undecryptable"),
        ("empty", Vec::new(), "undecryptable"),
        ("another version", other_version, "undecryptable"),
        (
            "truncated to its nonce",
            real[..13].to_vec(),
            "undecryptable",
        ),
        (
            "truncated by one byte",
            real[..real.len() - 1].to_vec(),
            "undecryptable",
        ),
        ("one bit of its tag flipped", flipped, "undecryptable"),
        ("sealed with another key", sealed_other_key, "undecryptable"),
        (
            "another entry's, under this name",
            sealed_other_name,
            "undecryptable",
        ),
        ("expired", expired, "stale"),
    ];
    let from = w.upstream.seen().len();
    for (n, (what, value, result)) in cases.into_iter().enumerate() {
        redis.set_px(&entry, &value, Duration::from_secs(60)).await;
        let before = w.tokens.state.count();
        let i = Instance::start(&w, &main, n).await;
        w.tokens.state.wait_for_requests(before + 1, WAIT).await;
        assert_eq!(i.get().await, Ok(200), "{what}");
        let own = i.token().unwrap();
        assert!(
            own.starts_with(&format!("tok-{}-", before + 1)),
            "{what}: holds {own}, not the token it fetched"
        );
        let m = i.metrics().await;
        assert!(
            reads(&m, result) >= 1.0,
            "{what}: {}",
            account(std::slice::from_ref(&m))
        );
        assert_eq!(reads(&m, "hit"), 0.0, "{what}: adopted");
        assert_eq!(leases(&m, "won"), 1.0, "{what}");
        let now = redis.get(&entry).await.unwrap();
        assert_ne!(
            now, value,
            "{what}: not replaced by the instance's own entry"
        );
        i.run.shutdown().await;
        assert_eq!(w.tokens.state.count(), before + 1, "{what}");
    }
    // Not a string at all (a list): reads as garbage, and the instance's
    // own write replaces it, so sharing is not stuck on WRONGTYPE.
    redis.del(&entry).await;
    let _: i64 = redis
        .query(::redis::cmd("RPUSH").arg(&entry).arg("not-a-token"))
        .await;
    let before = w.tokens.state.count();
    let i = Instance::start(&w, &main, 50).await;
    w.tokens.state.wait_for_requests(before + 1, WAIT).await;
    assert_eq!(i.get().await, Ok(200), "a list at the entry");
    let m = i.metrics().await;
    assert!(
        reads(&m, "undecryptable") >= 1.0,
        "{}",
        account(std::slice::from_ref(&m))
    );
    assert_eq!(leases(&m, "won"), 1.0);
    let now = redis.get(&entry).await;
    assert!(
        now.is_some_and(|v| v.first() == Some(&1)),
        "replaced by an entry"
    );
    i.run.shutdown().await;
    for (n, tokens) in tokens_by_instance(&w, from) {
        for t in tokens {
            assert!(w.tokens.state.valid(&t), "case {n} sent {t:?}");
            assert_ne!(t, expired_token, "case {n} sent the expired token");
        }
    }
    assert_eq!(w.upstream.state.rejected.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------
// TLS, ACL

/// Redis over TLS only, the proxy as an ACL user (the line from the docs)
/// whose password comes from a file: the fleet shares through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_acl_user_with_password_file() {
    let w = World::new(Mode::Issue(60.0)).await;
    let redis = Server::start_tls(&w.pki).await;
    let password = format!("{:032x}", fastrand::u128(..));
    redis.create_user(&password).await;
    write_private(
        &w.dir.path().join("redis-password"),
        format!("{password}\n").as_bytes(),
    );
    write_key(w.dir.path(), KEY_FILE);
    let cache = cache_table(
        &url_target(&redis),
        KEY_FILE,
        "username = \"token-injector\"\npassword_file = \"redis-password\"\nca_file = \"ca.pem\"",
    );
    assert!(cache.contains("rediss://localhost:"), "{cache}");
    let text = w.config("", &cache);

    let first = Instance::start(&w, &text, 0).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    assert_eq!(first.get().await, Ok(200));
    let entry = the_entry(&redis).await;
    let ttl = redis.pttl(&entry).await;
    assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");
    let second = Instance::start(&w, &text, 1).await;
    assert_eq!(second.get().await, Ok(200));
    assert_eq!(w.tokens.state.count(), 1, "the second adopted over TLS");
    assert_eq!(second.token(), first.token());

    let clients = redis.clients().await;
    let as_user = clients
        .lines()
        .filter(|l| l.contains(" user=token-injector "))
        .count();
    assert!(
        as_user >= 2,
        "one connection per instance as the user:\n{clients}"
    );
    let texts = scrape_all(&[first, second]).await;
    println!("TLS + ACL: {}", account(&texts));
    for t in &texts {
        assert_eq!(up(t), Some(1.0));
        assert_eq!(errors(t, ""), 0.0, "{}", account(&texts));
        assert_eq!(fallbacks(t), 0.0);
    }
    assert_eq!(total(&texts, |t| reads(t, "hit")), 1.0);
}

// ---------------------------------------------------------------------------
// Sentinel

/// One master, one replica, three sentinels; the master is killed under
/// traffic. The sentinels promote the replica, the fleet finds it through
/// them, and goes on sharing there (one fetch per renewal, not one per
/// instance). No request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_sharing() {
    const N: usize = 3;
    const LIFETIME: f64 = 2.0;
    let w = World::new(Mode::Issue(LIFETIME)).await;
    let mut s = Sentinels::start("tokens").await;
    write_key(w.dir.path(), KEY_FILE);
    let sentinels = s
        .addrs()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let target = format!("sentinels = [{sentinels}]\nmaster_name = \"tokens\"");
    let text = w.config("", &cache_table(&target, KEY_FILE, ""));
    let fleet = start_fleet(&w, &text, N).await;
    let traffic = Traffic::start(&fleet, Duration::from_millis(100));

    eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        (total(&texts, |t| reads(t, "hit")) >= N as f64).then_some(())
    })
    .await;
    let entry = the_entry(&s.master).await;

    let killed = Instant::now();
    s.kill_master().await;
    let promoted_in = killed.elapsed();
    // The entry the replica had, and then one written on the new master.
    let replicated = s.master.get(&entry).await;
    let hits_before = total(&scrape_all(&fleet).await, |t| reads(t, "hit"));
    let texts = eventually(WAIT, || async {
        let texts = scrape_all(&fleet).await;
        let rewritten = s
            .master
            .get(&entry)
            .await
            .is_some_and(|v| Some(&v) != replicated.as_ref());
        (rewritten
            && texts.iter().all(|t| up(t) == Some(1.0))
            && total(&texts, |t| reads(t, "hit")) >= hits_before + N as f64)
            .then_some(texts)
    })
    .await;
    println!(
        "failover: promoted in {promoted_in:.1?}, sharing again {:.1?} after the kill; {}",
        killed.elapsed(),
        account(&texts)
    );

    // Sharing as before: about one fetch per renewal period.
    let count = w.tokens.state.count();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await; // a measurement window
    let fetched = w.tokens.state.count() - count;
    let elapsed = window.elapsed().as_secs_f64();
    let bound = (elapsed / renewal_period(LIFETIME)).ceil() as usize + 1;
    println!("after the failover: {fetched} token requests in {elapsed:.1} s (bound {bound})");
    assert!(fetched <= bound, "{fetched} > {bound}: not shared");

    let (ok, failures) = traffic.stop().await;
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert!(ok > 0);
    assert_eq!(w.upstream.state.rejected.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------
// Nothing secret in Redis

/// After a run with renewals, adoptions and leases, every key and value in
/// Redis (scanned while it runs and at the end) holds nothing of a token,
/// the client secret, the client id or the encryption key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_in_redis() {
    const N: usize = 3;
    let w = World::new(Mode::Issue(2.0)).await;
    let redis = Server::start().await;
    let key = write_key(w.dir.path(), KEY_FILE);
    let text = fleet_config(&w, &redis);
    let fleet = start_fleet(&w, &text, N).await;
    let traffic = Traffic::start(&fleet, Duration::from_millis(100));

    let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut leases_seen = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let snapshot = redis.dump_all().await;
        leases_seen += snapshot
            .iter()
            .filter(|(k, _)| k.starts_with(b"token-injector:lease:"))
            .count();
        seen.extend(snapshot);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, failures) = traffic.stop().await;
    assert!(failures.is_empty(), "{failures:#?}");
    seen.extend(redis.dump_all().await);
    let texts = scrape_all(&fleet).await;
    println!(
        "{} snapshots of keys, {leases_seen} with a lease; {}",
        seen.len(),
        account(&texts)
    );
    assert!(
        total(&texts, |t| reads(t, "hit")) > 0.0,
        "nothing was shared"
    );
    assert!(
        seen.iter()
            .any(|(k, _)| k.starts_with(b"token-injector:token:")),
        "no entry seen"
    );

    let mut forbidden: Vec<(String, Vec<u8>)> = vec![
        ("the client secret".into(), SECRET.as_bytes().to_vec()),
        (
            "the client secret, form-encoded".into(),
            form_urlencoded::byte_serialize(SECRET.as_bytes())
                .collect::<String>()
                .into_bytes(),
        ),
        ("the client id".into(), CLIENT_ID.as_bytes().to_vec()),
        ("a token's prefix".into(), b"tok-".to_vec()),
        ("the encryption key".into(), key.clone()),
        (
            "the encryption key, base64".into(),
            STANDARD.encode(&key).into_bytes(),
        ),
        (
            "the encryption key, hex".into(),
            key.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        ),
    ];
    for window in key.windows(8) {
        forbidden.push(("8 bytes of the encryption key".into(), window.to_vec()));
    }
    let issued: Vec<String> = w
        .tokens
        .state
        .issued
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(issued.len() >= 2);
    for t in issued {
        // The token and its random part.
        let tail = t.rsplit('-').next().unwrap().to_owned();
        forbidden.push((format!("token {t}"), t.into_bytes()));
        forbidden.push(("a token's random part".into(), tail.into_bytes()));
    }
    for (k, v) in &seen {
        for (what, needle) in &forbidden {
            for (part, hay) in [("key", k), ("value", v)] {
                assert!(
                    !hay.windows(needle.len()).any(|w| w == &needle[..]),
                    "{what} in the {part} of {:?}",
                    String::from_utf8_lossy(k)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// DPoP (issue 17)

/// The RFC 7638 thumbprint of the EC `jwk` in a DPoP proof's header, and
/// the proof's claims.
fn proof_parts(proof: &str) -> (String, serde_json::Value) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let mut parts = proof.split('.');
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap();
    let claims = serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap();
    let jwk = &header["jwk"];
    assert_eq!(jwk["kty"], "EC", "{header}");
    let canonical = format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap(),
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap()
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    (B64.encode(digest), claims)
}

/// A fresh EC P-256 key in `dir/name`; its thumbprint.
fn write_dpop_key(dir: &std::path::Path, name: &str) -> String {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    write_private(&dir.join(name), kp.serialize_pem().as_bytes());
    let key = token_injector::keys::SigningKey::load(&dir.join(name)).unwrap();
    token_injector::dpop::ProofKey::new(key, None)
        .unwrap()
        .thumbprint()
        .to_owned()
}

/// Replicas with the same `dpop_key_file` share one DPoP-bound token: the
/// second adopts it without a token request, and both sign its proofs with
/// that key. A rotated key file binds the next renewal's token to the new
/// key under an entry of its own, and no token is ever sent with proofs of
/// two keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_tokens_are_shared_only_with_the_key_they_are_bound_to() {
    let w = World::new(Mode::Issue(3.0)).await;
    let redis = Server::start().await;
    write_key(w.dir.path(), KEY_FILE);
    let first_key = write_dpop_key(w.dir.path(), "dpop.pem");
    let text = fleet_config(&w, &redis).replace(
        "scopes = [\"read\", \"write\"]\n",
        "scopes = [\"read\", \"write\"]\ndpop = true\ndpop_key_file = \"dpop.pem\"\n",
    );
    let a = Instance::start(&w, &text, 0).await;
    w.tokens.state.wait_for_requests(1, WAIT).await;
    let before = w.tokens.state.count();
    let b = Instance::start(&w, &text, 1).await;
    assert_eq!(a.get().await, Ok(200));
    assert_eq!(b.get().await, Ok(200));
    assert_eq!(
        w.tokens.state.count(),
        before,
        "the second adopted the token"
    );
    assert_eq!(a.token(), b.token());
    let first_entry = the_entry(&redis).await;

    // Rotate the key: the next renewal (a 3 s token renews within 1.5 s)
    // binds its token to the new key, and both replicas sign with it.
    let second_key = write_dpop_key(w.dir.path(), "dpop.pem");
    assert_ne!(first_key, second_key);
    eventually(WAIT, || async {
        let (ra, rb) = (a.get().await, b.get().await);
        let seen = w.upstream.seen();
        let last = |n: usize| {
            seen.iter()
                .rev()
                .find(|s| {
                    s.headers
                        .iter()
                        .any(|(k, v)| k == "x-instance" && *v == n.to_string())
                })
                .and_then(|s| {
                    s.headers
                        .iter()
                        .find(|(k, _)| k == "dpop")
                        .map(|(_, v)| proof_parts(v).0)
                })
        };
        (ra == Ok(200)
            && rb == Ok(200)
            && last(0).as_ref() == Some(&second_key)
            && last(1).as_ref() == Some(&second_key))
        .then_some(())
    })
    .await;
    let entries = redis.keys(ENTRIES).await;
    assert!(
        entries.iter().any(|e| *e != first_entry),
        "the new key's tokens have an entry of their own: {entries:?}"
    );

    // Every request: `Authorization: DPoP`, a proof whose `ath` is its
    // token's, and each token with one key only.
    let mut key_of: BTreeMap<String, String> = BTreeMap::new();
    let seen = w.upstream.seen();
    assert!(seen.len() >= 4);
    for s in &seen {
        let token = s
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("DPoP "))
            .unwrap_or_else(|| panic!("not a DPoP request: {:?}", s.authorization));
        let proof = &s.headers.iter().find(|(k, _)| k == "dpop").unwrap().1;
        let (jkt, claims) = proof_parts(proof);
        assert_eq!(claims["ath"], token_injector::dpop::ath(token.as_bytes()));
        assert!(jkt == first_key || jkt == second_key, "{jkt}");
        let bound = key_of
            .entry(token.to_owned())
            .or_insert_with(|| jkt.clone());
        assert_eq!(*bound, jkt, "a token was sent with proofs of two keys");
    }
    assert_eq!(
        w.upstream
            .state
            .rejected
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
