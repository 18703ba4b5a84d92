//! Config text shared by the reload tests of both binaries: those that run
//! the binary (tests/bin/reload.rs) and the in-process ones
//! (tests/it/reload.rs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{CLIENT_ID, World, test_sections};

pub const WAIT: Duration = Duration::from_secs(15);

/// The `[profiles.main]` lines after token_url/client_id/ca_file, as the
/// support fixture writes them.
pub const MAIN_SECRET: &str = r#"client_secret_file = "client-secret"
scopes = ["read", "write"]"#;

/// A config like `World::config`, with `main_auth` as the rest of profile
/// `main` (auth method, scopes) and `extra` appended (routes, profiles).
pub fn config(w: &World, main_auth: &str, extra: &str) -> String {
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
pub fn route(host: &str, upstream: &str, profile: &str, listen: Option<SocketAddr>) -> String {
    let listen = listen
        .map(|a| format!("listen = \"{a}\"\n"))
        .unwrap_or_default();
    format!(
        "\n[[routes]]\nhost = \"{host}\"\nupstream = \"{upstream}\"\nprofile = \"{profile}\"\nca_file = \"ca.pem\"\n{listen}"
    )
}

/// A loopback port nobody listens on right now (bound, then released).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A World whose config file lives at `<dir>/config.toml`.
pub fn write_config(w: &World, text: &str) -> PathBuf {
    let path = w.dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}
