//! Real `redis-server` and `redis-sentinel` processes for the fleet tests
//! (issue 16): each on 127.0.0.1 with a random free port and a temp dir of
//! its own, no persistence, killed when dropped. Readiness is awaited by
//! polling a connection and `PING`, never by a fixed sleep. The test side
//! talks to them through the `redis` crate (over TLS where the server only
//! speaks TLS). Also the fleet tests' small helpers shared by both test
//! binaries: key and secret files, the sum of a metric's series.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, RedisResult};

use super::Pki;

/// How long a server, a replica link or a failover may take.
pub const WAIT: Duration = Duration::from_secs(20);
/// Bound of one harness command.
const OP: Duration = Duration::from_secs(5);

/// The proxy's ACL user, as the fleet page names it.
pub const ACL_USER: &str = "token-injector";

/// The rules of the `ACL SETUSER` line on the docs' fleet page (between
/// `<!-- fleet-acl:begin -->` and `<!-- fleet-acl:end -->`), after
/// `on >PASSWORD`: the tests create the proxy's user with exactly what the
/// docs tell operators to run.
pub fn documented_acl_rules() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/src/fleet.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let begin = text
        .find("<!-- fleet-acl:begin -->")
        .expect("fleet-acl:begin marker");
    let end = text
        .find("<!-- fleet-acl:end -->")
        .expect("fleet-acl:end marker");
    let line = text[begin..end]
        .lines()
        .find(|l| l.starts_with("ACL SETUSER"))
        .expect("an ACL SETUSER line between the markers");
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words[..5],
        ["ACL", "SETUSER", ACL_USER, "on", ">PASSWORD"],
        "{line}"
    );
    words[5..].iter().map(|w| w.to_string()).collect()
}

pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A loopback port nobody listens on right now (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a file only its owner may read (the proxy warns about others).
pub fn write_private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// 32 random bytes, written as `openssl rand -base64 32` does (base64 and
/// a newline), readable by the owner only. Returns the raw key.
pub fn write_key(dir: &Path, name: &str) -> Vec<u8> {
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).unwrap();
    write_private(
        &dir.join(name),
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(key)
        )
        .as_bytes(),
    );
    key.to_vec()
}

/// A `[cache]` table: `target` (`redis_url = …` or the Sentinel keys),
/// `extra` lines, and the key file.
pub fn cache_table(target: &str, key_file: &str, extra: &str) -> String {
    format!("[cache]\n{target}\nencryption_key_file = \"{key_file}\"\n{extra}\n")
}

/// The `redis_url` line for the plain Redis `r`.
pub fn url_target(r: &Server) -> String {
    format!("redis_url = \"{}\"", r.url())
}

/// `token_injector_shared_cache_up`, if present.
pub fn up(text: &str) -> Option<f64> {
    super::metric_value(text, "token_injector_shared_cache_up ")
}

/// The fleet tests' profile `main`: its shared-cache reads with `result`.
pub fn reads(text: &str, result: &str) -> f64 {
    metric_sum(
        text,
        "token_injector_shared_cache_reads_total",
        &[("profile", "main"), ("result", result)],
    )
}

/// Profile `main`'s leases with `outcome`.
pub fn leases(text: &str, outcome: &str) -> f64 {
    metric_sum(
        text,
        "token_injector_shared_cache_leases_total",
        &[("profile", "main"), ("outcome", outcome)],
    )
}

/// Profile `main`'s fallbacks to fetching alone.
pub fn fallbacks(text: &str) -> f64 {
    metric_sum(
        text,
        "token_injector_shared_cache_fallbacks_total",
        &[("profile", "main")],
    )
}

/// Redis errors of `kind` (every kind when empty).
pub fn errors(text: &str, kind: &str) -> f64 {
    let labels: &[(&str, &str)] = if kind.is_empty() {
        &[]
    } else {
        &[("kind", kind)]
    };
    metric_sum(text, "token_injector_shared_cache_errors_total", labels)
}

/// The sum of every series of metric `name` whose labels include all of
/// `labels` (in any order); 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>()
        + 0.0 // (an empty float sum is -0)
}

/// What a server is: which program, how the harness connects.
#[derive(Clone)]
enum Kind {
    Plain,
    /// TLS only (`--port 0`); the harness trusts this CA.
    Tls {
        ca_pem: Vec<u8>,
    },
    /// `redis-sentinel` watching `master_name` at this port.
    Sentinel {
        master_name: String,
        master_port: u16,
    },
}

/// One `redis-server` or `redis-sentinel` child.
pub struct Server {
    pub port: u16,
    kind: Kind,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra arguments after the generated ones (`--replicaof …`).
    extra: Vec<String>,
    /// Generations started so far (each has its own log file).
    starts: u32,
}

impl Server {
    /// A plain `redis-server`.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A plain `redis-server` with extra arguments (`--requirepass`,
    /// `--replicaof`).
    pub async fn start_with(extra: &[&str]) -> Self {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Self::launch(Kind::Plain, extra, tempfile::tempdir().unwrap()).await
    }

    /// A `redis-server` that speaks only TLS, with a certificate for
    /// `localhost` and `127.0.0.1` from `pki`; clients are not asked for
    /// certificates.
    pub async fn start_tls(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pki.leaf_pem(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.path().join("redis.crt"), cert).unwrap();
        write_private(&dir.path().join("redis.key"), key.as_bytes());
        pki.write_ca(dir.path());
        let kind = Kind::Tls {
            ca_pem: pki.ca_pem.as_bytes().to_vec(),
        };
        Self::launch(kind, Vec::new(), dir).await
    }

    /// A `redis-sentinel` watching `master_name` at `master_port` on
    /// 127.0.0.1, with quorum 2 and short timers.
    async fn start_sentinel(master_name: &str, master_port: u16) -> Self {
        let kind = Kind::Sentinel {
            master_name: master_name.to_owned(),
            master_port,
        };
        Self::launch(kind, Vec::new(), tempfile::tempdir().unwrap()).await
    }

    /// Starts a child of `kind` on a fresh port, trying another port if the
    /// one picked was taken in the meantime.
    async fn launch(kind: Kind, extra: Vec<String>, dir: tempfile::TempDir) -> Self {
        install_provider();
        let mut s = Self {
            port: 0,
            kind,
            dir,
            child: None,
            extra,
            starts: 0,
        };
        let mut last = String::new();
        for _ in 0..5 {
            s.port = free_port();
            match s.spawn_and_wait().await {
                Ok(()) => return s,
                Err(log) => last = log,
            }
        }
        panic!("{} did not start:\n{last}", s.program());
    }

    fn program(&self) -> &'static str {
        match self.kind {
            Kind::Sentinel { .. } => "redis-sentinel",
            _ => "redis-server",
        }
    }

    fn args(&self) -> Vec<String> {
        let dir = self.dir.path().display().to_string();
        let port = self.port.to_string();
        let mut args: Vec<String> = match &self.kind {
            Kind::Plain => vec!["--port".into(), port],
            Kind::Tls { .. } => {
                let file = |n: &str| self.dir.path().join(n).display().to_string();
                vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port,
                    "--tls-cert-file".into(),
                    file("redis.crt"),
                    "--tls-key-file".into(),
                    file("redis.key"),
                    "--tls-ca-cert-file".into(),
                    file("ca.pem"),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            }
            Kind::Sentinel {
                master_name,
                master_port,
            } => {
                // Sentinel rewrites its config file: one per generation.
                let conf = self
                    .dir
                    .path()
                    .join(format!("sentinel-{}.conf", self.starts));
                let text = format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\ndir \"{dir}\"\n\
                     sentinel resolve-hostnames no\n\
                     sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 5000\n\
                     sentinel parallel-syncs {master_name} 1\n"
                );
                std::fs::write(&conf, text).unwrap();
                return vec![conf.display().to_string()];
            }
        };
        args.extend(
            [
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                // A replica's first sync starts at once (the default waits 5 s).
                "--repl-diskless-sync-delay",
                "0",
            ]
            .map(String::from),
        );
        args.extend(self.extra.iter().cloned());
        args
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join(format!("log-{}.txt", self.starts))
    }

    /// The log of the current (or last) generation.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns the child and waits until it answers `PING`; on failure the
    /// child is gone and the error is its log.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(self.program())
            .args(self.args())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.program()));
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("exited ({status}):\n{}", self.log()));
            }
            if let Ok(mut c) = self.try_conn(Duration::from_millis(500)).await {
                let pong: RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("no PONG within {WAIT:?}:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://localhost:PORT` for a TLS
    /// server (the name its certificate carries).
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Tls { .. } => format!("rediss://localhost:{}", self.port),
            _ => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not running").id()
    }

    /// A new connection as the default user, bounded by `within`.
    pub async fn try_conn(&self, within: Duration) -> RedisResult<MultiplexedConnection> {
        let client = match &self.kind {
            Kind::Tls { ca_pem } => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca_pem.clone()),
                },
            )?,
            _ => redis::Client::open(self.url())?,
        };
        match tokio::time::timeout(within, client.get_multiplexed_async_connection()).await {
            Ok(c) => c,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }

    /// A new connection; panics if there is none within a few seconds.
    pub async fn conn(&self) -> MultiplexedConnection {
        self.try_conn(OP)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url()))
    }

    /// Runs `cmd`, or says why not.
    pub async fn try_query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> RedisResult<T> {
        let mut c = self.try_conn(OP).await?;
        match tokio::time::timeout(OP, cmd.query_async(&mut c)).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "command timed out",
            ))),
        }
    }

    /// Runs `cmd`; panics on an error.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        self.try_query(cmd)
            .await
            .unwrap_or_else(|e| panic!("{:?} on port {}: {e}", cmd_name(cmd), self.port))
    }

    // ---- processes ----

    /// SIGKILL, and reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// After [`Server::kill`]: the same server again on the same port,
    /// empty (nothing is persisted). Waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + WAIT;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                // The port may linger a moment after the kill.
                Err(log) if Instant::now() < deadline => {
                    let _ = log;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(log) => panic!(
                    "{} did not restart on {}:\n{log}",
                    self.program(),
                    self.port
                ),
            }
        }
    }

    /// SIGSTOP: the process stays, answers nothing.
    pub fn pause(&self) {
        signal(self.pid(), rustix::process::Signal::STOP);
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&self) {
        signal(self.pid(), rustix::process::Signal::CONT);
    }

    // ---- data ----

    /// Every key that matches `pattern` (SCAN, so nothing blocks).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .unwrap();
            out.extend(batch);
            if next == 0 {
                out.sort();
                out.dedup();
                return out;
            }
            cursor = next;
        }
    }

    /// Every key with its value: a string's bytes (GET), the serialized
    /// form (DUMP) of anything else.
    pub async fn dump_all(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        for key in self.keys("*").await {
            let kind: String = self.query(redis::cmd("TYPE").arg(&key)).await;
            let value: Option<Vec<u8>> = match kind.as_str() {
                "string" => self.query(redis::cmd("GET").arg(&key)).await,
                "none" => continue, // expired since the scan
                _ => self.query(redis::cmd("DUMP").arg(&key)).await,
            };
            out.push((key.into_bytes(), value.unwrap_or_default()));
        }
        out
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// `SET key value PX ttl`.
    pub async fn set_px(&self, key: &str, value: &[u8], ttl: Duration) {
        let _: () = self
            .query(
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
            )
            .await;
    }

    /// `PTTL`: milliseconds left, -1 without expiry, -2 when absent.
    pub async fn pttl(&self, key: &str) -> i64 {
        self.query(redis::cmd("PTTL").arg(key)).await
    }

    pub async fn del(&self, key: &str) {
        let _: i64 = self.query(redis::cmd("DEL").arg(key)).await;
    }

    /// `CLIENT LIST`.
    pub async fn clients(&self) -> String {
        self.query(redis::cmd("CLIENT").arg("LIST")).await
    }

    /// Creates the proxy's ACL user ([`ACL_USER`]) with `password` and
    /// the documented rules; returns the rules.
    pub async fn create_user(&self, password: &str) -> Vec<String> {
        let rules = documented_acl_rules();
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER")
            .arg(ACL_USER)
            .arg("on")
            .arg(format!(">{password}"));
        for r in &rules {
            cmd.arg(r);
        }
        self.try_query::<()>(&cmd)
            .await
            .unwrap_or_else(|e| panic!("the documented ACL line {rules:?}: {e}"));
        rules
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused process would keep its port: wake it for the kill.
            signal(child.id(), rustix::process::Signal::CONT);
        }
        self.kill();
    }
}

fn cmd_name(cmd: &redis::Cmd) -> String {
    cmd.args_iter()
        .next()
        .map(|a| match a {
            redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
            _ => "?".into(),
        })
        .unwrap_or_default()
}

/// Sends `sig` to `pid` (a child of this test).
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    let _ = rustix::process::kill_process(pid, sig);
}

// ---------------------------------------------------------------------------
// Sentinel: one master, one replica, three sentinels

pub struct Sentinels {
    pub master_name: String,
    /// The current master and replica (swapped by [`Sentinels::kill_master`]).
    pub master: Server,
    pub replica: Server,
    pub sentinels: Vec<Server>,
}

impl Sentinels {
    /// Master, a replica in sync with it, and three sentinels that know
    /// both and each other.
    pub async fn start(master_name: &str) -> Self {
        let master = Server::start().await;
        let replicaof = format!("127.0.0.1 {}", master.port);
        let replica = Server::start_with(&["--replicaof", &replicaof]).await;
        wait_until("the replica is in sync", || async {
            let info: String = replica.query(redis::cmd("INFO").arg("replication")).await;
            info.contains("master_link_status:up")
        })
        .await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Server::start_sentinel(master_name, master.port).await);
        }
        let s = Self {
            master_name: master_name.to_owned(),
            master,
            replica,
            sentinels,
        };
        for sentinel in &s.sentinels {
            wait_until(
                "each sentinel knows the replica and the two others",
                || async {
                    let replicas: Vec<redis::Value> = sentinel
                        .query(redis::cmd("SENTINEL").arg("REPLICAS").arg(master_name))
                        .await;
                    let others: Vec<redis::Value> = sentinel
                        .query(redis::cmd("SENTINEL").arg("SENTINELS").arg(master_name))
                        .await;
                    replicas.len() == 1 && others.len() == 2
                },
            )
            .await;
        }
        s
    }

    /// `127.0.0.1:PORT` of each sentinel.
    pub fn addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(Server::addr).collect()
    }

    /// The master port one sentinel reports.
    pub async fn reported_master(&self, sentinel: &Server) -> Option<u16> {
        let addr: Option<(String, String)> = sentinel
            .try_query(
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master_name),
            )
            .await
            .ok()
            .flatten();
        addr.and_then(|(_, port)| port.parse().ok())
    }

    /// SIGKILLs the master and waits until the sentinels have promoted the
    /// replica (quorum 2, down after 1 s). Returns the new master port.
    pub async fn kill_master(&mut self) -> u16 {
        let new_port = self.replica.port;
        self.master.kill();
        self.await_master(new_port).await;
        std::mem::swap(&mut self.master, &mut self.replica);
        new_port
    }

    async fn await_master(&self, port: u16) {
        for sentinel in &self.sentinels {
            wait_until("every sentinel reports the new master", || async {
                self.reported_master(sentinel).await == Some(port)
            })
            .await;
        }
        let new = &self.replica;
        wait_until("the new master says ROLE master", || async {
            role(new).await.as_deref() == Some("master")
        })
        .await;
    }
}

/// The first element of `ROLE`: master, slave, sentinel.
pub async fn role(s: &Server) -> Option<String> {
    let v: redis::Value = s.try_query(&redis::cmd("ROLE")).await.ok()?;
    match v {
        redis::Value::Array(items) => items
            .into_iter()
            .next()
            .and_then(|first| String::from_redis_value(first).ok()),
        _ => None,
    }
}

/// Polls `check` every 20 ms until it holds, at most [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
