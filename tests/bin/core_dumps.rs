//! The binary turns core dumps off before it reads a secret, unless the
//! operator opts out with `TOKEN_INJECTOR_ALLOW_CORE_DUMPS=1`.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");

/// A config whose token endpoint is a closed port: the proxy starts anyway.
fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        r#"
[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[profiles.p]
token_url = "https://127.0.0.1:1/token"
client_id = "p"
client_secret_file = "secret"

[[routes]]
host = "api.test"
profile = "p"
"#,
    )
    .unwrap();
    dir
}

/// Starts `run` through `sh`, which first raises the soft core limit to
/// the hard one: the child inherits a limit that allows dumps, so only the
/// binary itself can have turned them off. Returns once it listens.
fn start(dir: &tempfile::TempDir, allow: Option<&str>) -> (Child, Lines<BufReader<ChildStderr>>) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -S -c "$(ulimit -H -c)" && exec "$0" "$@""#)
        .arg(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("config.toml"))
        .env("RUST_LOG", "info")
        .env("TOKEN_INJECTOR_WORKERS", "1")
        .env_remove("TOKEN_INJECTOR_ALLOW_CORE_DUMPS")
        .stderr(Stdio::piped());
    if let Some(v) = allow {
        cmd.env("TOKEN_INJECTOR_ALLOW_CORE_DUMPS", v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = lines
            .next()
            .expect("process ended before listening")
            .unwrap();
        if line.contains("token-injector listening") {
            break;
        }
        assert!(Instant::now() < deadline, "not listening in time");
    }
    (child, lines)
}

/// Soft and hard "Max core file size" from /proc/PID/limits.
fn core_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core line in {limits}"));
    let mut fields = line["Max core file size".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

fn stop(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

fn hard_limit_of_this_process() -> String {
    core_limits(std::process::id()).1
}

#[test]
fn run_sets_the_core_limit_to_zero() {
    let dir = config_dir();
    let (child, _lines) = start(&dir, None);
    assert_eq!(
        core_limits(child.id()),
        ("0".to_owned(), "0".to_owned()),
        "a running proxy must not be able to dump core"
    );
    stop(child);
}

#[test]
fn opt_out_keeps_the_inherited_core_limit() {
    let hard = hard_limit_of_this_process();
    let dir = config_dir();
    let (child, mut lines) = start(&dir, Some("1"));
    // The wrapper raised the soft limit to the hard one; the binary kept it.
    assert_eq!(core_limits(child.id()), (hard.clone(), hard));
    stop(child);
    let _ = lines.by_ref().count();
}

#[test]
fn opt_out_is_logged_as_a_warning() {
    let dir = config_dir();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"])
        .arg(dir.path().join("config.toml"))
        .env("RUST_LOG", "info")
        .env("TOKEN_INJECTOR_WORKERS", "1")
        .env("TOKEN_INJECTOR_ALLOW_CORE_DUMPS", "true")
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut warned = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        warned |= line.contains("WARN") && line.contains("TOKEN_INJECTOR_ALLOW_CORE_DUMPS");
        if line.contains("token-injector listening") {
            break;
        }
    }
    assert!(warned, "no warning about the opt-out");
    stop(child);
}
