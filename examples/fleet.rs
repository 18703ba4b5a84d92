//! The fleet benchmark's driver (`bench/fleet.sh`, issue 16): N replicas of
//! token-injector's token side in one process, sharing one real Redis.
//!
//! Each replica is what a proxy process holds for its tokens: its own
//! [`Profiles`] (so its own HTTP client, its own `[cache]` backend and
//! Redis connection) and its own [`Metrics`] registry, built from one config
//! text with one `client_credentials` profile against a local HTTPS token
//! endpoint (which counts the requests it answers) and one route using it.
//! No proxy listeners are started: requests only ever read the local store,
//! so only the token side matters for these numbers.
//!
//! Phases: start (every replica at once, until each holds a usable token),
//! steady (`--duration`: renewals only; every 50 ms a sampler checks that
//! every replica holds a usable token), and with `--rolling-restart` a
//! restart of every replica, one at a time, while the others keep running:
//! its `Profiles` is dropped and a new one built ("time to first token" is
//! from the start of `Profiles::prepare` to a usable token in the new store;
//! a process's own start-up is not in it). It prints one JSON line.
//!
//! ```text
//! cargo run --release --example fleet -- --replicas 100 --redis redis://127.0.0.1:6379 \
//!     --token-lifetime 60s --duration 10m --rolling-restart
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use token_injector::app::profiles::Profiles;
use token_injector::config::{self, Config};
use token_injector::metrics::Metrics;
use token_injector::token::Store;

const PROFILE: &str = "fleet";
const TOKEN_PATH: &str = "/oauth2/token";
/// The length of every issued token: about what a JWT from a real
/// authorization server is (bench/run.sh uses the same).
const TOKEN_BYTES: usize = 900;
/// How often the sampler checks that every replica holds a usable token.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(about = "N token-injector replicas (token side only) sharing one Redis")]
struct Args {
    /// Replicas in the fleet.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// `expires_in` of every token (whole seconds, at least 2s).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    token_lifetime: Duration,
    /// Length of the steady phase.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Redis URL for `[cache]` (`redis://127.0.0.1:PORT`).
    #[arg(
        long,
        required_unless_present = "no_redis",
        conflicts_with = "no_redis"
    )]
    redis: Option<String>,
    /// The same fleet without `[cache]`: every replica fetches its own tokens.
    #[arg(long)]
    no_redis: bool,
    /// After the steady phase, restart every replica one by one.
    #[arg(long)]
    rolling_restart: bool,
}

// ---------------------------------------------------------------------------
// The token endpoint: HTTPS (the demo's CA), HTTP/1.1, counts what it issues.

struct Endpoint {
    lifetime_s: u64,
    requests: AtomicU64,
    /// When each request came, to group them into renewal rounds.
    times: std::sync::Mutex<Vec<Instant>>,
}

type Answer = Response<Full<Bytes>>;

async fn token_endpoint(ep: Arc<Endpoint>, req: Request<Incoming>) -> Answer {
    let ok_path = req.method() == http::Method::POST && req.uri().path() == TOKEN_PATH;
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let grant_ok = body.as_ref().is_ok_and(|b| {
        form_urlencoded::parse(b).any(|(k, v)| k == "grant_type" && v == "client_credentials")
    });
    if !ok_path || !grant_ok {
        let mut r = Response::new(Full::new(Bytes::from_static(
            br#"{"error":"invalid_request"}"#,
        )));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    }
    ep.requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut t) = ep.times.lock() {
        t.push(Instant::now());
    }
    let token: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(TOKEN_BYTES)
        .collect();
    let body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ep.lifetime_s,
    })
    .to_string();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn serve_endpoint(listener: TcpListener, tls: Arc<rustls::ServerConfig>, ep: Arc<Endpoint>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        // Without it, the TLS records of one answer wait on the client's
        // delayed ACK: ~40 ms per token request on loopback.
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ep = Arc::clone(&ep);
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let svc = service_fn(move |req| {
                let ep = Arc::clone(&ep);
                async move { Ok::<_, Infallible>(token_endpoint(ep, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

// ---------------------------------------------------------------------------
// The config every replica is built from.

fn write(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// `[tokens]` scaled to the lifetime, the same shape at 6 s or 60 s: renew
/// at 3/4 of it (the default fraction; the default 1m margin would renew a
/// 60 s token at half its life), stop sending a token 1/12 of it before
/// expiry (5 s of 60 s, the default), and bound a token request (and so
/// the renewal lease) by 1/6 of it, at most the default 10 s.
fn config_text(lifetime: Duration, token_port: u16, redis: Option<&str>, prefix: &str) -> String {
    let request_timeout = (lifetime / 6).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let mut text = format!(
        r#"[proxy]
listen = "127.0.0.1:0"

[tokens]
refresh_fraction = 0.75
refresh_margin = "{margin}"
expiry_skew = "{skew}"
request_timeout = "{request_timeout}"

[profiles.{PROFILE}]
token_url = "https://127.0.0.1:{token_port}{TOKEN_PATH}"
client_id = "fleet-client"
client_secret_file = "client-secret"
ca_file = "ca.pem"
scopes = ["fleet.read"]

[[routes]]
host = "api.fleet.test"
upstream = "https://api.fleet.test/"
profile = "{PROFILE}"
"#,
        margin = ms(lifetime / 4),
        skew = ms(lifetime / 12),
        request_timeout = ms(request_timeout),
    );
    if let Some(url) = redis {
        text.push_str(&format!(
            "\n[cache]\nredis_url = \"{url}\"\nencryption_key_file = \"token-key\"\nkey_prefix = \"{prefix}\"\n"
        ));
    }
    text
}

// ---------------------------------------------------------------------------
// Replicas.

struct Replica {
    metrics: Metrics,
    profiles: Profiles,
    store: Arc<Store>,
}

fn build(config: &Config, metrics: &Metrics) -> Result<(Profiles, Arc<Store>), String> {
    let mut profiles = Profiles::default();
    let prepared = profiles
        .prepare(config, &metrics.tokens, &metrics.cache)
        .map_err(|e| e.to_string())?;
    profiles.commit(prepared, &metrics.tokens, &metrics.cache);
    let store = profiles
        .store(PROFILE)
        .ok_or_else(|| "the profile has no store".to_owned())?;
    Ok((profiles, store))
}

/// Waits until `store` holds a usable token (at most `limit`).
async fn usable(store: &Store, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if store.current().is_some() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // Returns at the task's next attempt (success or failure).
        let _ = store.get(left.min(Duration::from_secs(1))).await;
    }
}

// ---------------------------------------------------------------------------
// Metrics, read back from each replica's /metrics text.

/// Sums of the series of interest over every replica.
#[derive(Debug, Default, Clone)]
struct Totals {
    /// Redis operations by op (`..._operation_duration_seconds_count`).
    redis_ops: BTreeMap<String, f64>,
    reads: BTreeMap<String, f64>,
    leases: BTreeMap<String, f64>,
    errors: BTreeMap<String, f64>,
    fallbacks: f64,
    /// `token_injector_token_fetch_total` by result: requests the replicas
    /// made (cross-checks the endpoint's count).
    fetches: BTreeMap<String, f64>,
}

fn label<'a>(labels: &'a str, name: &str) -> &'a str {
    labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
        .unwrap_or("")
}

impl Totals {
    fn add(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let slot = match name {
                "token_injector_shared_cache_operation_duration_seconds_count" => {
                    Some((&mut self.redis_ops, "op"))
                }
                "token_injector_shared_cache_reads_total" => Some((&mut self.reads, "result")),
                "token_injector_shared_cache_leases_total" => Some((&mut self.leases, "outcome")),
                "token_injector_shared_cache_errors_total" => Some((&mut self.errors, "kind")),
                "token_injector_token_fetch_total" => Some((&mut self.fetches, "result")),
                "token_injector_shared_cache_fallbacks_total" => {
                    self.fallbacks += value;
                    None
                }
                _ => None,
            };
            if let Some((map, key)) = slot {
                *map.entry(label(labels, key).to_owned()).or_default() += value;
            }
        }
    }

    fn of(replicas: &[Replica]) -> Self {
        let mut t = Self::default();
        for r in replicas {
            t.add(&r.metrics.render());
        }
        t
    }

    /// `self - before`, series by series.
    fn since(&self, before: &Self) -> Self {
        fn diff(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
            a.iter()
                .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0)))
                .collect()
        }
        Self {
            redis_ops: diff(&self.redis_ops, &before.redis_ops),
            reads: diff(&self.reads, &before.reads),
            leases: diff(&self.leases, &before.leases),
            errors: diff(&self.errors, &before.errors),
            fallbacks: self.fallbacks - before.fallbacks,
            fetches: diff(&self.fetches, &before.fetches),
        }
    }

    fn redis_ops_total(&self) -> f64 {
        self.redis_ops.values().sum()
    }

    fn json(&self) -> serde_json::Value {
        let ints = |m: &BTreeMap<String, f64>| -> serde_json::Value {
            m.iter()
                .map(|(k, v)| (k.clone(), json!(v.round() as u64)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        json!({
            "redis_ops": self.redis_ops_total().round() as u64,
            "redis_ops_by_op": ints(&self.redis_ops),
            "reads": ints(&self.reads),
            "leases": ints(&self.leases),
            "errors": ints(&self.errors),
            "fallbacks": self.fallbacks.round() as u64,
            "replica_fetches": ints(&self.fetches),
        })
    }
}

/// Token requests between `from` and `to`, grouped into renewal rounds: a
/// request less than `gap` after the previous one belongs to its round. A
/// sharing fleet renews once per round (rounds are at least 0.675 of a
/// lifetime apart); more requests than rounds are fetches the lease did not
/// prevent. Returns (rounds, the most requests in one round).
fn rounds(ep: &Endpoint, from: Instant, to: Instant, gap: Duration) -> (u64, u64) {
    let mut times: Vec<Instant> = ep
        .times
        .lock()
        .map(|t| {
            t.iter()
                .copied()
                .filter(|t| (from..to).contains(t))
                .collect()
        })
        .unwrap_or_default();
    times.sort();
    let (mut rounds, mut most, mut this, mut last) = (0u64, 0u64, 0u64, None::<Instant>);
    for t in times {
        if last.is_none_or(|l| t.duration_since(l) >= gap) {
            rounds += 1;
            this = 0;
        }
        this += 1;
        most = most.max(this);
        last = Some(t);
    }
    (rounds, most)
}

/// Nearest-rank percentile of sorted `v`, in ms.
fn pct(v: &[Duration], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(round3(v[rank.min(v.len()) - 1].as_secs_f64() * 1000.0))
}

fn round3(x: f64) -> f64 {
    // `+ 0.0` turns a -0.0 into 0.0.
    (x * 1000.0).round() / 1000.0 + 0.0
}

/// 32 random bytes, base64.
fn random_base64_32() -> String {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .unwrap_or_else(|_| fail("no randomness"));
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("fleet: {msg}");
    std::process::exit(1)
}

fn log(started: Instant, msg: impl std::fmt::Display) {
    eprintln!("[fleet {:>7.1}s] {msg}", started.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let lifetime_s = args.token_lifetime.as_secs();
    if args.token_lifetime.subsec_nanos() != 0 || lifetime_s < 2 {
        fail("--token-lifetime must be whole seconds, at least 2s");
    }
    if args.replicas == 0 || args.duration.is_zero() {
        fail("--replicas and --duration must be positive");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t0 = Instant::now();

    // The token endpoint and the files every replica's config names.
    let dir = tempfile::tempdir().unwrap_or_else(|e| fail(format!("temp dir: {e}")));
    let ca = token_injector::demo::pki::Ca::new("token-injector fleet bench CA (this run only)")
        .unwrap_or_else(|e| fail(format!("CA: {e}")));
    let server = ca
        .server_config(&["localhost", "127.0.0.1"], &[b"http/1.1"])
        .unwrap_or_else(|e| fail(format!("certificate: {e}")));
    let files = [
        ("ca.pem", ca.pem().to_owned(), 0o644),
        (
            "client-secret",
            format!("{:032x}\n", fastrand::u128(..)),
            0o600,
        ),
        // What `openssl rand -base64 32` writes.
        ("token-key", format!("{}\n", random_base64_32()), 0o600),
    ];
    for (name, text, mode) in &files {
        write(&dir.path().join(name), text, *mode).unwrap_or_else(|e| fail(format!("{name}: {e}")));
    }
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| fail(format!("bind: {e}")));
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let endpoint = Arc::new(Endpoint {
        lifetime_s,
        requests: AtomicU64::new(0),
        times: std::sync::Mutex::new(Vec::new()),
    });
    tokio::spawn(serve_endpoint(listener, server, Arc::clone(&endpoint)));

    // A prefix of its own per run: runs never see each other's entries.
    let prefix = format!("fleet-bench-{:08x}", fastrand::u32(..));
    let text = config_text(
        args.token_lifetime,
        port,
        args.redis.as_deref().filter(|_| !args.no_redis),
        &prefix,
    );
    write(&dir.path().join("token-injector.toml"), &text, 0o644)
        .unwrap_or_else(|e| fail(format!("config: {e}")));
    let config = config::from_text(&text, dir.path(), Vec::<(String, String)>::new())
        .unwrap_or_else(|e| fail(format!("config: {}", e.lines().join("; "))));
    let shared = config.cache.is_some();
    let n = args.replicas;
    let requests = || endpoint.requests.load(Ordering::Relaxed);

    // Start: every replica at once.
    log(
        t0,
        format!(
            "starting {n} replicas ({}), tokens live {lifetime_s}s",
            if shared {
                "shared through Redis"
            } else {
                "no [cache]"
            }
        ),
    );
    let start = Instant::now();
    let mut fleet = Vec::with_capacity(n);
    for _ in 0..n {
        let metrics = Metrics::new();
        let (profiles, store) = build(&config, &metrics).unwrap_or_else(|e| fail(e));
        fleet.push(Replica {
            metrics,
            profiles,
            store,
        });
    }
    let limit = Duration::from_secs(30).max(args.token_lifetime);
    let waits = fleet.iter().map(|r| {
        let store = Arc::clone(&r.store);
        async move { usable(&store, limit).await }
    });
    let ready = futures_util::future::join_all(waits).await;
    if ready.iter().any(|ok| !ok) {
        fail(format!(
            "{} of {n} replicas hold no token after {limit:?}",
            ready.iter().filter(|ok| !**ok).count()
        ));
    }
    let startup = start.elapsed();
    let startup_requests = requests();
    let at_start = Totals::of(&fleet);
    log(
        t0,
        format!(
            "all {n} hold a token after {:.3}s; {startup_requests} token requests",
            startup.as_secs_f64()
        ),
    );

    // Steady phase, with the sampler.
    let stores: Arc<Vec<Arc<Store>>> =
        Arc::new(fleet.iter().map(|r| Arc::clone(&r.store)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stores = Arc::clone(&stores);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut samples, mut without) = (0u64, 0u64);
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for s in stores.iter() {
                    samples += 1;
                    if s.current().is_none() {
                        without += 1;
                    }
                }
            }
            (samples, without)
        })
    };
    let steady_from = requests();
    let steady_start = Instant::now();
    let mut next_report = args.duration.min(Duration::from_secs(60));
    while steady_start.elapsed() < args.duration {
        let left = args.duration.saturating_sub(steady_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        if steady_start.elapsed() >= next_report && steady_start.elapsed() < args.duration {
            log(
                t0,
                format!(
                    "steady {:.0}s: {} token requests",
                    steady_start.elapsed().as_secs_f64(),
                    requests() - steady_from
                ),
            );
            next_report += Duration::from_secs(60);
        }
    }
    let steady = steady_start.elapsed();
    let steady_requests = requests() - steady_from;
    let (steady_rounds, most_in_round) = rounds(
        &endpoint,
        steady_start,
        Instant::now(),
        args.token_lifetime / 4,
    );
    stop.store(true, Ordering::Relaxed);
    let (samples, samples_without_token) = sampler.await.unwrap_or((0, 0));
    let at_steady = Totals::of(&fleet);
    let in_steady = at_steady.since(&at_start);
    let lifetimes = steady.as_secs_f64() / args.token_lifetime.as_secs_f64();
    log(
        t0,
        format!(
            "steady phase over: {steady_requests} token requests in {:.1}s ({:.2} lifetimes)",
            steady.as_secs_f64(),
            lifetimes
        ),
    );

    let mut out = json!({
        "replicas": n,
        "shared": shared,
        "lifetime_s": lifetime_s,
        "duration_s": round3(steady.as_secs_f64()),
        "token_requests": steady_requests,
        // Meaningful with sharing only: without it, replicas renew apart
        // and their requests merge into rounds by chance.
        "renewal_rounds": steady_rounds,
        "as_requests_per_round": (steady_rounds > 0)
            .then(|| round3(steady_requests as f64 / steady_rounds as f64)),
        "most_requests_in_a_round": most_in_round,
        "lifetimes": round3(lifetimes),
        "as_requests_per_lifetime": round3(steady_requests as f64 / lifetimes),
        "redis_ops_per_replica_per_lifetime":
            round3(in_steady.redis_ops_total() / n as f64 / lifetimes),
        "fallbacks": in_steady.fallbacks.round() as u64,
        "leases": in_steady.json()["leases"].clone(),
        "reads": in_steady.json()["reads"].clone(),
        "steady": in_steady.json(),
        "samples": samples,
        "samples_without_token": samples_without_token,
        "startup_s": round3(startup.as_secs_f64()),
        "startup_token_requests": startup_requests,
        "startup": at_start.json(),
        "tokens": {
            "refresh_fraction": config.tokens.refresh_fraction,
            "refresh_margin_ms": config.tokens.refresh_margin.as_millis() as u64,
            "expiry_skew_ms": config.tokens.expiry_skew.as_millis() as u64,
            "request_timeout_ms": config.tokens.request_timeout.as_millis() as u64,
        },
        "proxy_listeners": false,
        "note": "token side only: each replica is its own Profiles (HTTP client, [cache] backend, Redis connection) and Metrics; no proxy listeners, requests only read the local store",
    });

    if args.rolling_restart {
        log(
            t0,
            format!("rolling restart of {n} replicas, one at a time"),
        );
        let from = requests();
        let restart_start = Instant::now();
        let mut ttft = Vec::with_capacity(n);
        let mut failed = 0u64;
        for r in &mut fleet {
            // The old replica goes: its task, HTTP client and Redis connection.
            drop(std::mem::take(&mut r.profiles));
            let t = Instant::now();
            let (profiles, store) = build(&config, &r.metrics).unwrap_or_else(|e| fail(e));
            r.profiles = profiles;
            r.store = store;
            if usable(&r.store, limit).await {
                ttft.push(t.elapsed());
            } else {
                failed += 1;
            }
        }
        let restart = restart_start.elapsed();
        let restart_requests = requests() - from;
        let at_end = Totals::of(&fleet);
        let in_restart = at_end.since(&at_steady);
        ttft.sort();
        log(
            t0,
            format!(
                "restart done in {:.2}s: {restart_requests} token requests, ttft p50 {:?} ms p99 {:?} ms",
                restart.as_secs_f64(),
                pct(&ttft, 50.0),
                pct(&ttft, 99.0)
            ),
        );
        out["restart"] = json!({
            "ttft_p50_ms": pct(&ttft, 50.0),
            "ttft_p99_ms": pct(&ttft, 99.0),
            "ttft_max_ms": ttft.last().map(|d| round3(d.as_secs_f64() * 1000.0)),
            "ttft_min_ms": ttft.first().map(|d| round3(d.as_secs_f64() * 1000.0)),
            "restarted": ttft.len(),
            "without_token_after_limit": failed,
            "token_requests": restart_requests,
            "duration_s": round3(restart.as_secs_f64()),
            "cache": in_restart.json(),
        });
    }
    println!("{out}");
    drop(fleet);
}
