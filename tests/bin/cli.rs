//! The binary as operators run it: `check`, `--version`, and `run` stopped
//! by SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_token-injector");

#[test]
fn version_prints_the_crate_version() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!("token-injector {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_the_shipped_examples() {
    for file in [
        "config/example.toml",
        "config/client-secret-post.toml",
        "config/google-service-account.toml",
    ] {
        let out = Command::new(BIN)
            .args(["check", "--config", file])
            .env("REPORTING_CLIENT_SECRET", "placeholder")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_reports_one_line_per_problem_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[proxy]
unmatched = "maybe"

[profiles.billing]
token_url = "https://idp.test/token"
client_id = "billing"
client_secret_file = "/nonexistent/secret"
auth_method = "client_secret"

[[routes]]
host = "api.test"
profile = "nobody"
"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("proxy.unmatched: unknown value \"maybe\""))
    );
    assert!(lines.iter().any(|l| l.starts_with(
        "profiles.billing.auth_method: unknown value \"client_secret\"; expected one of client_secret_basic"
    )));
    assert!(lines.iter().any(|l| {
        l.starts_with("profiles.billing.client_secret_file: cannot read /nonexistent/secret")
    }));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("routes[0].profile: no profile named \"nobody\""))
    );
}

#[test]
fn check_reports_a_missing_file() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/config.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config file /nonexistent/config.toml")
    );
}

#[test]
fn run_exits_64_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[proxy]\nlisten = \"nope\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("proxy.listen"));
}

#[test]
fn run_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "x\n").unwrap();
    let path = dir.path().join("ok.toml");
    // The token endpoint is unreachable: start-up must not fail because of it.
    std::fs::write(
        &path,
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
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("TOKEN_INJECTOR_WORKERS", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the "listening" log line: the event that says it is up.
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
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
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let code = child.wait().unwrap();
    assert_eq!(code.code(), Some(0), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}
