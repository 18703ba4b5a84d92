//! `token-injector demo` as a newcomer runs it: the real binary, its printed
//! curl lines, the injected token at the echo, a renewal in the metrics,
//! Ctrl-C, and a port already in use.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");

/// A demo process that a failing test stops too: SIGINT first, so it
/// removes its directory, SIGKILL if it does not exit.
struct Process(Child);

impl Process {
    fn id(&self) -> u32 {
        self.0.id()
    }

    fn interrupt(&self) {
        let sent = Command::new("kill")
            .args(["-INT", &self.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-INT", &self.id().to_string()])
                .status();
            if wait_with_deadline(&mut self.0, Duration::from_secs(5)).is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

/// A demo process and what it printed.
struct Demo {
    child: Process,
    banner: Vec<String>,
    stderr: Arc<Mutex<String>>,
    proxy: SocketAddr,
    direct: SocketAddr,
    admin: SocketAddr,
    /// `localhost:PORT`, from the banner's "echo upstream" line.
    echo_authority: String,
    config: PathBuf,
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("demo")
        .args(args)
        // The demo's own default log filter, whatever the caller's shell has.
        .env_remove("RUST_LOG")
        .env_remove("TOKEN_INJECTOR_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Collects a pipe into a string on a thread of its own.
fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    collect_joinable(pipe).0
}

/// The same, with the thread to join once the pipe has closed.
fn collect_joinable(
    pipe: impl Read + Send + 'static,
) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let out = Arc::new(Mutex::new(String::new()));
    let o = Arc::clone(&out);
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            o.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    (out, reader)
}

/// The address in `line` after `prefix`, up to the next `/` or space.
fn addr_after(line: &str, prefix: &str) -> SocketAddr {
    let rest = &line[line.find(prefix).unwrap() + prefix.len()..];
    let end = rest.find(['/', ' ']).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

impl Demo {
    /// Starts the demo on free ports and reads stdout until the banner ends.
    fn start() -> Demo {
        let mut child = command(&[
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--direct",
            "127.0.0.1:0",
            "--token-lifetime",
            "2s",
        ])
        .spawn()
        .unwrap();
        let stderr = collect(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let child = Process(child);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut banner = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains("Ctrl-C to stop");
                    banner.push(line);
                    if done {
                        break;
                    }
                }
                Err(e) => {
                    panic!(
                        "no banner ({e}); stdout so far: {banner:#?}\nstderr: {}",
                        stderr.lock().unwrap()
                    );
                }
            }
        }
        // The line that starts (after its indent) with `start`.
        let find = |start: &str| -> &String {
            banner
                .iter()
                .find(|l| l.trim_start().starts_with(start))
                .unwrap_or_else(|| panic!("no line starting {start:?} in {banner:#?}"))
        };
        let proxy = addr_after(find("curl -x http://"), "curl -x http://");
        assert!(find("curl -x").ends_with(" http://echo.demo/anything"));
        let direct_line = banner
            .iter()
            .find(|l| l.trim_start().starts_with("curl http://") && l.ends_with("/anything"))
            .unwrap_or_else(|| panic!("no direct curl line in {banner:#?}"));
        let direct = addr_after(direct_line, "curl http://");
        let admin = addr_after(find("curl -s http://"), "http://");
        assert!(find("curl -s http://").ends_with("/metrics | grep token_injector_token"));
        assert!(
            banner
                .iter()
                .any(|l| l.trim() == format!("curl http://{admin}/readyz"))
        );
        let echo_authority = find("echo upstream")
            .split_whitespace()
            .find_map(|w| w.strip_prefix("https://"))
            .unwrap()
            .to_owned();
        let config = PathBuf::from(
            find("config ")
                .split_whitespace()
                .last()
                .unwrap()
                .to_owned(),
        );
        Demo {
            child,
            banner,
            stderr,
            proxy,
            direct,
            admin,
            echo_authority,
            config,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

/// A GET over plain HTTP/1.1 with `Connection: close`: status and body.
fn get(addr: SocketAddr, target: &str, host: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// The value of `token_injector_token_fetch_total{..result="success"}`.
fn successful_fetches(admin: SocketAddr) -> f64 {
    let (status, body) = get(admin, "/metrics", "localhost");
    assert_eq!(status, 200);
    body.lines()
        .find(|l| {
            l.starts_with("token_injector_token_fetch_total{") && l.contains("result=\"success\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn wait_with_deadline(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Checks an echo answer: the token the proxy added, decoded, at the host
/// the route names.
fn assert_injected(demo: &Demo, status: u16, body: &str) -> Value {
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["host"], demo.echo_authority.as_str(), "{v:#}");
    assert_eq!(v["path"], "/anything?from=test", "{v:#}");
    let token = &v["token"];
    assert_eq!(token["claims"]["sub"], "demo-client", "{v:#}");
    assert_eq!(token["claims"]["scope"], "echo.read", "{v:#}");
    assert_eq!(token["signature_valid"], true, "{v:#}");
    assert!(token["expires_in_s"].as_i64().unwrap() <= 2, "{v:#}");
    let shown = v["headers"]["authorization"].as_str().unwrap();
    assert!(
        shown.starts_with("Bearer ") && shown.ends_with('…') && shown.chars().count() <= 20,
        "the echo shows the token shortened: {shown}"
    );
    v
}

#[test]
fn demo_injects_renews_and_stops_on_ctrl_c() {
    let mut demo = Demo::start();
    let dir = demo.config.parent().unwrap().to_owned();
    assert!(dir.is_dir(), "{}", dir.display());
    assert!(demo.config.is_file(), "the printed config exists");
    let secret = std::fs::read_to_string(dir.join("client-secret")).unwrap();
    let secret = secret.trim();
    assert!(secret.len() >= 32);

    // (1) Through the forward proxy, as `curl -x` sends it.
    let (status, body) = get(
        demo.proxy,
        "http://echo.demo/anything?from=test",
        "echo.demo",
    );
    let answer = assert_injected(&demo, status, &body);
    let jti = answer["token"]["claims"]["jti"]
        .as_str()
        .unwrap()
        .to_owned();

    // (2) The route's own listener: no proxy setting.
    let (status, body) = get(demo.direct, "/anything?from=test", &demo.direct.to_string());
    assert_injected(&demo, status, &body);

    // (3) A renewal shows in the metrics (tokens live 2 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = successful_fetches(demo.admin);
        if n >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no renewal within 15 s (fetches: {n}); stderr:\n{}",
            demo.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = get(demo.admin, "/readyz", "localhost");
    assert_eq!(status, 200, "{body}");

    // (4) The log tells tokens apart by jti, never shows one or the secret.
    let log = demo.stderr();
    assert!(log.contains(&format!("jti {jti}")), "{log}");
    assert!(log.contains("token fetched"), "{log}");
    assert!(!log.contains(secret), "the secret is in the log");
    // Every JWT part (a base64url JSON object) starts with "eyJ".
    assert!(!log.contains("eyJ"), "a token is in the log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");

    // (5) Ctrl-C: exit 0 within 10 s, the directory removed.
    demo.child.interrupt();
    let status = wait_with_deadline(&mut demo.child.0, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGINT:\n{}", demo.stderr()));
    assert_eq!(status.code(), Some(0), "{}", demo.stderr());
    assert!(!dir.exists(), "{} is left behind", dir.display());
    assert!(demo.banner.iter().any(|l| l.contains("Ctrl-C to stop")));
}

/// Directories a demo with this pid made under the temp dir.
fn dirs_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("token-injector-demo-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

fn assert_refused(args: &[&str], busy: SocketAddr, flag: &str) {
    let mut child = command(args).spawn().unwrap();
    let (stderr, reader) = collect_joinable(child.stderr.take().unwrap());
    let _stdout = collect(child.stdout.take().unwrap());
    let mut child = Process(child);
    let status = wait_with_deadline(&mut child.0, Duration::from_secs(10));
    let pid = child.id();
    drop(child);
    // The reader sees the pipe close with the process.
    reader.join().unwrap();
    let err = stderr.lock().unwrap().clone();
    let status =
        status.unwrap_or_else(|| panic!("{flag}: the demo started on a busy port:\n{err}"));
    assert!(!status.success(), "{flag}: {err}");
    assert!(!err.contains("panicked"), "{flag}: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{flag}: no error line in {err:?}"));
    assert!(line.contains(&busy.to_string()), "{line}");
    assert!(line.contains(flag), "{line}");
    assert!(line.contains("already in use"), "{line}");
    assert!(
        dirs_of(pid).is_empty(),
        "{flag}: the temp dir is left behind"
    );
}

#[test]
fn a_port_in_use_is_a_clear_error_naming_the_flag() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let a = addr.to_string();
    let any = "127.0.0.1:0";
    assert_refused(
        &["--listen", &a, "--admin", any, "--direct", any],
        addr,
        "--listen",
    );
    assert_refused(
        &["--listen", any, "--admin", &a, "--direct", any],
        addr,
        "--admin",
    );
    assert_refused(
        &["--listen", any, "--admin", any, "--direct", &a],
        addr,
        "--direct",
    );
}

#[test]
fn demo_help_lists_the_flags() {
    let out = Command::new(BIN).args(["demo", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in ["--listen", "--admin", "--direct", "--token-lifetime"] {
        assert!(help.contains(flag), "{help}");
    }
}
