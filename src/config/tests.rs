use std::time::Duration;

use super::*;
use crate::secret;

fn dir_with_secret() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    dir
}

const GOOD: &str = r#"
[proxy]
listen = "127.0.0.1:0"

[profiles.billing]
token_url = "https://idp.test/oauth2/token"
client_id = "billing-svc"
client_secret_file = "secret"
scopes = ["read", "write"]

[[routes]]
host = "api.example.com"
upstream = "https://api.example.com:8443/v1/"
profile = "billing"

[[routes]]
host = "*.example.org"
profile = "billing"
"#;

fn load(text: &str, dir: &tempfile::TempDir) -> Result<Config, Error> {
    from_text(text, dir.path(), Vec::<(String, String)>::new())
}

fn problems(text: &str) -> Vec<String> {
    let dir = dir_with_secret();
    match load(text, &dir) {
        Ok(_) => vec![],
        Err(e) => e.lines(),
    }
}

#[test]
fn good_config_is_typed() {
    let dir = dir_with_secret();
    let c = load(GOOD, &dir).unwrap();
    assert_eq!(c.proxy.listen.port(), 0);
    assert_eq!(c.proxy.unmatched, Unmatched::Deny);
    assert_eq!(c.tokens.request_timeout, Duration::from_secs(10));
    let p = &c.profiles["billing"];
    assert!(
        matches!(&p.auth, ClientAuth::SecretBasic(secret::Source::File(f)) if f == &dir.path().join("secret"))
    );
    assert_eq!(p.scopes, vec!["read", "write"]);
    match &c.routes[0].upstream {
        UpstreamTarget::Fixed {
            authority,
            base_path,
        } => {
            assert_eq!(authority.as_str(), "api.example.com:8443");
            assert_eq!(base_path, "/v1");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(c.routes[1].upstream, UpstreamTarget::SameHost));
    assert_eq!(c.profiles_in_use().count(), 1);
}

#[test]
fn env_overrides_apply_and_non_keys_are_ignored() {
    let dir = dir_with_secret();
    let env = vec![
        (
            "TOKEN_INJECTOR_PROXY__LISTEN".to_owned(),
            "127.0.0.1:4999".to_owned(),
        ),
        (
            "TOKEN_INJECTOR_PROXY__UNMATCHED".to_owned(),
            "passthrough".to_owned(),
        ),
        (
            "TOKEN_INJECTOR_TOKENS__REQUEST_TIMEOUT".to_owned(),
            "3s".to_owned(),
        ),
        (
            "TOKEN_INJECTOR_PROFILES__BILLING__CLIENT_ID".to_owned(),
            "other".to_owned(),
        ),
        ("TOKEN_INJECTOR_CONFIG".to_owned(), "/x.toml".to_owned()),
        ("TOKEN_INJECTOR_WORKERS".to_owned(), "1".to_owned()),
        ("TOKEN_INJECTOR_LOG_FORMAT".to_owned(), "json".to_owned()),
        ("UNRELATED".to_owned(), "1".to_owned()),
        // Injected by Kubernetes service links for a Service "token-injector".
        (
            "TOKEN_INJECTOR_SERVICE_HOST".to_owned(),
            "10.0.0.1".to_owned(),
        ),
        (
            "TOKEN_INJECTOR_PORT".to_owned(),
            "tcp://10.0.0.1:80".to_owned(),
        ),
    ];
    let c = from_text(GOOD, dir.path(), env).unwrap();
    assert_eq!(c.proxy.listen, "127.0.0.1:4999".parse().unwrap());
    assert_eq!(c.proxy.unmatched, Unmatched::Passthrough);
    assert_eq!(c.tokens.request_timeout, Duration::from_secs(3));
    assert_eq!(c.profiles["billing"].client_id, "other");
}

#[test]
fn unknown_method_names_key_and_choices() {
    let text = GOOD.replace(
        "client_id = \"billing-svc\"",
        "client_id = \"billing-svc\"\nauth_method = \"client_secret\"",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("profiles.billing.auth_method: unknown value \"client_secret\"; expected one of client_secret_basic, client_secret_post"),
        "{p:?}"
    );
}

#[test]
fn every_problem_is_reported_in_one_pass() {
    let text = r#"
[proxy]
listen = "nowhere"
unmatched = "allow"

[tokens]
request_timeout = "soon"

[profiles.a]
token_url = "http://idp.test/token"
client_id = "a"
client_secret_file = "missing-file"

[[routes]]
host = "a.test"
profile = "nope"

[[routes]]
host = "a.test"
upstream = "http://a.test"
profile = "a"

[[routes]]
host = "b.test"
profile = "a"
listen = "127.0.0.1:9090"
"#;
    let p = problems(text);
    let keys: Vec<&str> = p.iter().map(|l| l.split(':').next().unwrap()).collect();
    for want in [
        "proxy.listen",
        "proxy.unmatched",
        "tokens.request_timeout",
        "profiles.a.token_url",
        "profiles.a.client_secret_file",
        "routes[0].profile",
        "routes[1].upstream",
        "routes[2].listen",
    ] {
        assert!(keys.contains(&want), "missing {want} in {p:#?}");
    }
}

#[test]
fn structural_errors_name_the_key() {
    let p = problems("[proxy]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n");
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("proxy.lisen: unknown key"), "{p:?}");
    let p = problems("[proxy]\nlisten = 5\n");
    assert!(p[0].starts_with("proxy.listen:"), "{p:?}");
    let p = problems("[proxy\n");
    assert!(!p.is_empty());
}

#[test]
fn duplicate_hosts_and_missing_secret() {
    let text = r#"
[profiles.a]
token_url = "https://idp.test/token"
client_id = "a"

[[routes]]
host = "A.test"
profile = "a"

[[routes]]
host = "a.test."
profile = "a"
"#;
    let p = problems(text);
    assert!(
        p.iter()
            .any(|l| l.starts_with("profiles.a.client_secret_file: missing")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("routes[1].host: \"a.test\" is already the host of routes[0]")),
        "{p:?}"
    );
}

#[test]
fn stray_keys_of_other_methods_are_refused() {
    let text = GOOD.replace(
        "scopes = [\"read\", \"write\"]",
        "private_key_file = \"key.pem\"",
    );
    let p = problems(&text);
    assert_eq!(
        p,
        vec!["profiles.billing.private_key_file: not used by auth_method \"client_secret_basic\""]
    );
}

#[test]
fn non_loopback_admin_needs_allow_remote() {
    let text = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9090\"\n");
    let p = problems(&text);
    assert!(
        p[0].starts_with("admin.listen: 0.0.0.0:9090 is not a loopback address"),
        "{p:?}"
    );
    let text = format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9090\"\nallow_remote = true\n");
    assert!(problems(&text).is_empty());
}

#[test]
fn bad_ca_file_is_reported() {
    let dir = dir_with_secret();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let text = GOOD.replace("scopes = [\"read\", \"write\"]", "ca_file = \"ca.pem\"");
    let e = load(&text, &dir).unwrap_err().lines();
    assert!(e[0].starts_with("profiles.billing.ca_file:"), "{e:?}");
}

#[test]
fn wildcard_route_with_listener_needs_upstream() {
    let text = format!(
        "{GOOD}\n[[routes]]\nhost = \"*.x.test\"\nprofile = \"billing\"\nlisten = \"127.0.0.1:0\"\n"
    );
    assert_eq!(
        problems(&text),
        vec![
            "routes[2].upstream: a wildcard route with its own listen port needs an explicit upstream"
        ]
    );
}

#[test]
fn durations_are_bounded_and_token_url_has_no_userinfo() {
    let text = GOOD.replace(
        "token_url = \"https://idp.test/oauth2/token\"",
        "token_url = \"https://id:pw@idp.test/oauth2/token\"",
    ) + "\n[tokens]\nretry_max = \"300000000y\"\n";
    let p = problems(&text);
    assert!(
        p.iter()
            .any(|l| l.starts_with("tokens.retry_max: \"300000000y\" is too long")),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.starts_with("profiles.billing.token_url: must not contain user information")), "{p:?}");
    assert!(
        !p.iter().any(|l| l.contains("pw")),
        "the password must not be echoed: {p:?}"
    );
}

#[test]
fn wildcard_route_with_port_needs_upstream() {
    let text = format!("{GOOD}\n[[routes]]\nhost = \"*.p.test:8443\"\nprofile = \"billing\"\n");
    assert_eq!(
        problems(&text),
        vec!["routes[2].upstream: a wildcard route with a port needs an explicit upstream"]
    );
}

fn with_auth(dir: &tempfile::TempDir, auth: &str) -> Vec<String> {
    let text = GOOD.replace("client_secret_file = \"secret\"\n", &format!("{auth}\n"));
    match load(&text, dir) {
        Ok(_) => vec![],
        Err(e) => e.lines(),
    }
}

fn write_key(
    dir: &tempfile::TempDir,
    name: &str,
    alg: &'static rcgen::SignatureAlgorithm,
) -> rcgen::KeyPair {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    std::fs::write(dir.path().join(name), kp.serialize_pem()).unwrap();
    kp
}

#[test]
fn private_key_jwt_checks_key_and_alg() {
    let dir = dir_with_secret();
    write_key(&dir, "ec.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    std::fs::write(dir.path().join("junk.pem"), "junk").unwrap();
    let ok = with_auth(
        &dir,
        "auth_method = \"private_key_jwt\"\nprivate_key_file = \"ec.pem\"\nkey_id = \"k1\"\nassertion_audience = \"https://idp.test\"",
    );
    assert!(ok.is_empty(), "{ok:?}");
    let p = with_auth(
        &dir,
        "auth_method = \"private_key_jwt\"\nprivate_key_file = \"ec.pem\"\nsigning_alg = \"RS256\"",
    );
    assert_eq!(
        p,
        vec![
            "profiles.billing.signing_alg: signing_alg RS256 does not fit a EC P-256 key; use one of ES256"
        ]
    );
    let p = with_auth(
        &dir,
        "auth_method = \"private_key_jwt\"\nprivate_key_file = \"junk.pem\"",
    );
    assert!(
        p[0].starts_with("profiles.billing.private_key_file:")
            && p[0].contains("no PEM private key"),
        "{p:?}"
    );
    let p = with_auth(&dir, "auth_method = \"private_key_jwt\"");
    assert_eq!(
        p,
        vec![
            "profiles.billing.private_key_file: missing; private_key_jwt needs private_key_file or client_assertion_file"
        ]
    );
    let p = with_auth(
        &dir,
        "auth_method = \"private_key_jwt\"\nprivate_key_file = \"ec.pem\"\nsigning_alg = \"XS1\"",
    );
    assert!(
        p[0].starts_with(
            "profiles.billing.signing_alg: unknown value \"XS1\"; expected one of RS256"
        ),
        "{p:?}"
    );
}

#[test]
fn federated_assertion_needs_only_its_file() {
    let dir = dir_with_secret();
    std::fs::write(dir.path().join("sa-token"), "eyJ.x.y\n").unwrap();
    assert!(
        with_auth(
            &dir,
            "auth_method = \"private_key_jwt\"\nclient_assertion_file = \"sa-token\""
        )
        .is_empty()
    );
    let p = with_auth(
        &dir,
        "auth_method = \"private_key_jwt\"\nclient_assertion_file = \"sa-token\"\nkey_id = \"x\"",
    );
    assert_eq!(
        p,
        vec![
            "profiles.billing.key_id: not used by auth_method \"private_key_jwt\" with client_assertion_file"
        ]
    );
    let p = with_auth(
        &dir,
        "auth_method = \"private_key_jwt\"\nclient_assertion_file = \"missing\"",
    );
    assert!(
        p[0].starts_with("profiles.billing.client_assertion_file: cannot read"),
        "{p:?}"
    );
}

#[test]
fn client_secret_jwt_needs_an_hmac_alg_and_a_secret() {
    let dir = dir_with_secret();
    assert!(with_auth(&dir, "auth_method = \"client_secret_jwt\"\nclient_secret_file = \"secret\"\nsigning_alg = \"HS512\"").is_empty());
    let p = with_auth(
        &dir,
        "auth_method = \"client_secret_jwt\"\nclient_secret_file = \"secret\"\nsigning_alg = \"ES256\"",
    );
    assert_eq!(
        p,
        vec![
            "profiles.billing.signing_alg: ES256 is not an HMAC algorithm; client_secret_jwt uses HS256, HS384 or HS512"
        ]
    );
    let p = with_auth(&dir, "auth_method = \"client_secret_jwt\"");
    assert!(
        p[0].starts_with("profiles.billing.client_secret_file: missing"),
        "{p:?}"
    );
}

#[test]
fn tls_client_auth_checks_the_pair() {
    let dir = dir_with_secret();
    let key = write_key(&dir, "client.key", &rcgen::PKCS_ECDSA_P256_SHA256);
    write_key(&dir, "other.key", &rcgen::PKCS_ECDSA_P256_SHA256);
    let cert = rcgen::CertificateParams::new(vec!["client.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("client.crt"), cert.pem()).unwrap();
    let auth = |k: &str| {
        format!(
            "auth_method = \"tls_client_auth\"\nclient_cert_file = \"client.crt\"\nclient_key_file = \"{k}\""
        )
    };
    assert!(with_auth(&dir, &auth("client.key")).is_empty());
    let p = with_auth(&dir, &auth("other.key"));
    assert!(
        p[0].starts_with("profiles.billing.client_cert_file: client certificate"),
        "{p:?}"
    );
    assert!(p[0].contains("do not belong together"), "{p:?}");
    let p = with_auth(
        &dir,
        "auth_method = \"tls_client_auth\"\nclient_cert_file = \"client.crt\"",
    );
    assert!(
        p[0].starts_with("profiles.billing.client_key_file: missing"),
        "{p:?}"
    );
    let p = with_auth(
        &dir,
        &format!("{}\nclient_secret_file = \"secret\"", auth("client.key")),
    );
    assert_eq!(
        p,
        vec!["profiles.billing.client_secret_file: not used by auth_method \"tls_client_auth\""]
    );
}

#[test]
fn issuer_instead_of_token_url() {
    let dir = dir_with_secret();
    let text = GOOD.replace(
        "token_url = \"https://idp.test/oauth2/token\"",
        "issuer = \"https://idp.test/realms/x\"",
    );
    let c = load(&text, &dir).unwrap();
    assert!(
        matches!(&c.profiles["billing"].endpoint, Endpoint::Issuer(u) if u.as_str() == "https://idp.test/realms/x")
    );
    let text = GOOD.replace(
        "token_url = \"https://idp.test/oauth2/token\"",
        "token_url = \"https://idp.test/t\"\nissuer = \"https://idp.test\"",
    );
    assert_eq!(
        problems(&text),
        vec!["profiles.billing.issuer: set either token_url or issuer, not both"]
    );
}

#[test]
fn limits_have_safe_defaults() {
    let dir = dir_with_secret();
    let c = load(GOOD, &dir).unwrap();
    assert_eq!(c.proxy.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.proxy.idle_timeout, Duration::from_secs(120));
    assert_eq!(c.proxy.tunnel_idle_timeout, Duration::from_secs(3600));
    assert_eq!(c.proxy.request_timeout, Duration::from_secs(120));
    assert_eq!(c.proxy.max_header_bytes, 64 * 1024);
    assert_eq!(c.proxy.max_headers, 100);
    assert_eq!(c.proxy.max_connections, 4096);
    assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(300));
    assert_eq!(c.upstream.max_header_bytes, 16 * 1024);
}

#[test]
fn limits_are_read_from_toml_and_environment() {
    let dir = dir_with_secret();
    let text = format!("{GOOD}\n[upstream]\nbody_idle_timeout = \"1m\"\nmax_header_bytes = 32768\n").replace(
        "[proxy]\n",
        "[proxy]\nheader_read_timeout = \"2s\"\nidle_timeout = \"90s\"\ntunnel_idle_timeout = \"10m\"\nrequest_timeout = \"30s\"\nmax_header_bytes = 16384\nmax_headers = 50\n",
    );
    let env = vec![(
        "TOKEN_INJECTOR_PROXY__MAX_CONNECTIONS".to_owned(),
        "12".to_owned(),
    )];
    let c = from_text(&text, dir.path(), env).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.proxy.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.proxy.idle_timeout, Duration::from_secs(90));
    assert_eq!(c.proxy.tunnel_idle_timeout, Duration::from_secs(600));
    assert_eq!(c.proxy.request_timeout, Duration::from_secs(30));
    assert_eq!(c.proxy.max_header_bytes, 16384);
    assert_eq!(c.proxy.max_headers, 50);
    assert_eq!(c.proxy.max_connections, 12);
    assert_eq!(c.upstream.body_idle_timeout, Duration::from_secs(60));
    assert_eq!(c.upstream.max_header_bytes, 32768);
}

#[test]
fn bad_limits_are_all_reported_by_key() {
    let text = format!(
        "{GOOD}\n[upstream]\nbody_idle_timeout = \"0s\"\nmax_header_bytes = 100\n"
    )
    .replace(
        "[proxy]\n",
        "[proxy]\nheader_read_timeout = \"0s\"\nidle_timeout = \"soon\"\nrequest_timeout = \"48h\"\nmax_header_bytes = 4096\nmax_headers = 0\nmax_connections = 0\n",
    );
    let p = problems(&text);
    for want in [
        "proxy.header_read_timeout: must be greater than zero",
        "proxy.idle_timeout: invalid duration \"soon\"",
        "proxy.request_timeout: \"48h\" is too long",
        "proxy.max_header_bytes: 4096 is out of range; expected 8192 to 1048576",
        "proxy.max_headers: 0 is out of range; expected 1 to 1000",
        "proxy.max_connections: 0 is out of range; expected 1 to 1000000",
        "upstream.body_idle_timeout: must be greater than zero",
        "upstream.max_header_bytes: 100 is out of range; expected 8192 to 1048576",
    ] {
        assert!(
            p.iter().any(|l| l.starts_with(want)),
            "{want:?} not in {p:#?}"
        );
    }
    assert_eq!(p.len(), 8, "{p:#?}");
}

#[test]
fn the_upstream_read_buffer_ceiling_has_a_default_a_key_and_a_range() {
    let dir = dir_with_secret();
    assert_eq!(
        load(GOOD, &dir).unwrap().upstream.read_buffer_bytes,
        68 * 1024
    );
    let text = format!("{GOOD}\n[upstream]\nread_buffer_bytes = 32768\n");
    let c = from_text(&text, dir.path(), vec![]).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.upstream.read_buffer_bytes, 32768);
    let env = vec![(
        "TOKEN_INJECTOR_UPSTREAM__READ_BUFFER_BYTES".to_owned(),
        "16384".to_owned(),
    )];
    let c = from_text(GOOD, dir.path(), env).unwrap();
    assert_eq!(c.upstream.read_buffer_bytes, 16384);
    for bad in ["4096", "2000000"] {
        let p = problems(&format!("{GOOD}\n[upstream]\nread_buffer_bytes = {bad}\n"));
        let want =
            format!("upstream.read_buffer_bytes: {bad} is out of range; expected 8192 to 1048576");
        assert!(
            p.iter().any(|l| l.starts_with(&want)),
            "{want:?} not in {p:#?}"
        );
    }
}

#[test]
fn oversized_and_negative_counts_are_refused() {
    let p = problems(&GOOD.replace(
        "[proxy]\n",
        "[proxy]\nmax_header_bytes = 99999999999\nmax_headers = 1001\n",
    ));
    assert!(
        p.iter()
            .any(|l| l.starts_with("proxy.max_header_bytes: 99999999999 is out of range")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|l| l.starts_with("proxy.max_headers: 1001 is out of range")),
        "{p:?}"
    );
    let p = problems(&GOOD.replace("[proxy]\n", "[proxy]\nmax_connections = -5\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("proxy.max_connections: "), "{p:?}");
}

#[test]
fn default_lifetime_under_a_second_is_refused() {
    let with = |v: &str| {
        let text = format!("{GOOD}\n[tokens]\ndefault_lifetime = \"{v}\"\n");
        problems(&text)
    };
    let p = with("500ms");
    assert!(
        p.iter()
            .any(|l| l == "tokens.default_lifetime: must be at least 1s"),
        "{p:?}"
    );
    assert!(with("1s").is_empty(), "{:?}", with("1s"));
}

#[test]
fn route_client_certificate_is_checked_at_load() {
    let dir = dir_with_secret();
    let key = write_key(&dir, "client.key", &rcgen::PKCS_ECDSA_P256_SHA256);
    write_key(&dir, "other.key", &rcgen::PKCS_ECDSA_P256_SHA256);
    let cert = rcgen::CertificateParams::new(vec!["client.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.path().join("client.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("junk.key"), "not a key").unwrap();
    let route = |lines: &str| {
        let text = GOOD.replacen(
            "profile = \"billing\"\n",
            &format!("profile = \"billing\"\n{lines}\n"),
            1,
        );
        match load(&text, &dir) {
            Ok(c) => Ok(c),
            Err(e) => Err(e.lines()),
        }
    };
    let c = route("client_cert_file = \"client.crt\"\nclient_key_file = \"client.key\"").unwrap();
    assert_eq!(
        c.routes[0].client_cert,
        Some(ClientCert {
            cert_file: dir.path().join("client.crt"),
            key_file: dir.path().join("client.key"),
        })
    );
    assert_eq!(c.routes[1].client_cert, None);

    let p = route("client_cert_file = \"client.crt\"").unwrap_err();
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("routes[0].client_key_file: missing"),
        "{p:?}"
    );
    let p = route("client_key_file = \"client.key\"").unwrap_err();
    assert!(
        p[0].starts_with("routes[0].client_cert_file: missing"),
        "{p:?}"
    );
    let p =
        route("client_cert_file = \"client.crt\"\nclient_key_file = \"other.key\"").unwrap_err();
    assert!(p[0].starts_with("routes[0].client_cert_file: "), "{p:?}");
    assert!(p[0].contains("do not belong together"), "{p:?}");
    let p = route("client_cert_file = \"client.crt\"\nclient_key_file = \"junk.key\"").unwrap_err();
    assert!(
        p[0].starts_with("routes[0].client_key_file: ") && p[0].contains("no PEM private key"),
        "{p:?}"
    );
    let p = route("client_cert_file = \"client.crt\"\nclient_key_file = \"gone.key\"").unwrap_err();
    assert!(
        p[0].starts_with("routes[0].client_key_file: cannot read"),
        "{p:?}"
    );
    let p = route("client_cert_file = \"gone.crt\"\nclient_key_file = \"client.key\"").unwrap_err();
    assert!(
        p[0].starts_with("routes[0].client_cert_file: cannot read"),
        "{p:?}"
    );
    // No key material in any message.
    let pem = std::fs::read_to_string(dir.path().join("client.key")).unwrap();
    let body = pem.lines().nth(1).unwrap();
    assert!(p.iter().all(|l| !l.contains(body)));
}

#[test]
fn allow_connect_needs_a_connect_allow_entry_covering_the_route() {
    let with = |allow: &str, route: &str| {
        GOOD.replace(
            "listen = \"127.0.0.1:0\"\n",
            &format!("listen = \"127.0.0.1:0\"\nconnect_allow = [{allow}]\n"),
        ) + &format!("\n[[routes]]\n{route}\nprofile = \"billing\"\nallow_connect = true\n")
    };
    // Covered: exact by wildcard, wildcard by a host under it, any port.
    for (allow, route) in [
        ("\"*.corp.test:443\"", "host = \"api.corp.test\""),
        ("\"a.b.corp.test:8443\"", "host = \"*.corp.test\""),
        (
            "\"API.corp.test.:443\"",
            "host = \"api.corp.test:8080\"\nupstream = \"https://api.corp.test\"",
        ),
        ("\"*.corp.test:443\"", "host = \"*.x.corp.test\""),
    ] {
        let dir = dir_with_secret();
        let c =
            load(&with(allow, route), &dir).unwrap_or_else(|e| panic!("{allow} / {route}: {e}"));
        assert!(c.routes[2].allow_connect);
        assert!(!c.routes[0].allow_connect, "off by default");
    }
    // Not covered: nothing listed, another host, a name that only ends alike.
    for (allow, route, host) in [
        ("", "host = \"api.corp.test\"", "api.corp.test"),
        (
            "\"other.test:443\"",
            "host = \"api.corp.test\"",
            "api.corp.test",
        ),
        (
            "\"xcorp.test:443\"",
            "host = \"*.corp.test\"",
            "*.corp.test",
        ),
        ("\"corp.test:443\"", "host = \"*.corp.test\"", "*.corp.test"),
    ] {
        assert_eq!(
            problems(&with(allow, route)),
            vec![format!(
                "routes[2].allow_connect: has no effect: no proxy.connect_allow entry covers {host}; add e.g. \"{host}:443\" there"
            )],
            "{allow} / {route}"
        );
    }
    let p = problems(&format!(
        "{GOOD}\n[[routes]]\nhost = \"x.test\"\nprofile = \"billing\"\nallow_connect = \"yes\"\n"
    ));
    assert!(
        p.iter()
            .any(|l| l.starts_with("routes.2.allow_connect") || l.contains("allow_connect")),
        "{p:?}"
    );
}

#[test]
fn connect_allow_entries_need_a_port() {
    let text = GOOD.replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nconnect_allow = [\"ok.test:443\", \"*.w.test:443\", \"noport.test\", \"bad host:443\"]\n",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("proxy.connect_allow[2]: \"noport.test\" needs a port"),
        "{p:?}"
    );
    assert!(p[1].starts_with("proxy.connect_allow[3]: "), "{p:?}");
}

#[test]
fn retry_max_without_token_defaults_and_is_bounded_by_retry_initial() {
    let dir = dir_with_secret();
    let config = load(GOOD, &dir).unwrap();
    assert_eq!(
        config.tokens.retry_max_without_token,
        Duration::from_secs(2)
    );
    let text = format!("{GOOD}\n[tokens]\nretry_initial = \"3s\"\n");
    assert_eq!(
        problems(&text),
        vec!["tokens.retry_max_without_token: must not be less than tokens.retry_initial"]
    );
    let text = format!("{GOOD}\n[tokens]\nretry_max_without_token = \"250ms\"\n");
    assert_eq!(
        problems(&text),
        vec!["tokens.retry_max_without_token: must not be less than tokens.retry_initial"]
    );
    let text = format!("{GOOD}\n[tokens]\nretry_max_without_token = \"5s\"\n");
    let config = load(&text, &dir).unwrap();
    assert_eq!(
        config.tokens.retry_max_without_token,
        Duration::from_secs(5)
    );
}

fn dir_with_cache_files() -> tempfile::TempDir {
    let dir = dir_with_secret();
    // What `openssl rand -base64 32` writes.
    std::fs::write(
        dir.path().join("token-key"),
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("redis-password"), "pw\n").unwrap();
    dir
}

fn cache_problems(cache: &str, profile_extra: &str) -> Vec<String> {
    let dir = dir_with_cache_files();
    let text = GOOD.replace(
        "scopes = [\"read\", \"write\"]",
        &format!("scopes = [\"read\", \"write\"]\n{profile_extra}"),
    );
    match load(&format!("{text}\n[cache]\n{cache}\n"), &dir) {
        Ok(_) => vec![],
        Err(e) => e.lines(),
    }
}

#[test]
fn cache_table_is_typed_and_profiles_share_by_default() {
    let dir = dir_with_cache_files();
    let text = format!(
        "{GOOD}\n[cache]\nredis_url = \"redis://127.0.0.1:6379/2\"\nusername = \"ti\"\n\
         password_file = \"redis-password\"\nencryption_key_file = \"token-key\"\n"
    );
    let c = load(&text, &dir).unwrap();
    let cache = c.cache.as_ref().unwrap();
    assert!(
        matches!(&cache.target, RedisTarget::Url(u) if u.as_str() == "redis://127.0.0.1:6379/2")
    );
    assert!(!cache.tls);
    assert_eq!(cache.key_prefix, "token-injector");
    assert_eq!(cache.operation_timeout, Duration::from_millis(250));
    assert_eq!(cache.username.as_deref(), Some("ti"));
    assert_eq!(c.profiles["billing"].cache, CacheMode::Shared);
    // The key and password files are secrets: their permissions are checked.
    let files: Vec<String> = c.secret_files().into_iter().map(|(k, _)| k).collect();
    assert!(
        files.contains(&"cache.encryption_key_file".to_owned()),
        "{files:?}"
    );
    assert!(
        files.contains(&"cache.password_file".to_owned()),
        "{files:?}"
    );
    // Without [cache], nothing is shared.
    assert_eq!(
        load(GOOD, &dir).unwrap().profiles["billing"].cache,
        CacheMode::Local
    );
    assert!(load(GOOD, &dir).unwrap().cache.is_none());
    // Sentinel.
    let text = format!(
        "{GOOD}\n[cache]\nsentinels = [\"127.0.0.1:26379\", \"[::1]:26380\"]\nmaster_name = \"tokens\"\n\
         encryption_key_file = \"token-key\"\nkey_prefix = \"ti:prod\"\noperation_timeout = \"1s\"\n"
    );
    let c = load(&text, &dir).unwrap();
    let cache = c.cache.unwrap();
    match &cache.target {
        RedisTarget::Sentinel {
            sentinels,
            master_name,
            ..
        } => {
            assert_eq!(
                sentinels,
                &vec![("127.0.0.1".to_owned(), 26379), ("::1".to_owned(), 26380)]
            );
            assert_eq!(master_name, "tokens");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cache.key_prefix, "ti:prod");
    // A profile can opt out.
    assert!(
        cache_problems(
            "redis_url = \"redis://127.0.0.1:6379\"\nencryption_key_file = \"token-key\"",
            "cache = \"local\""
        )
        .is_empty()
    );
}

#[test]
fn cache_keys_take_environment_overrides() {
    let dir = dir_with_cache_files();
    let text = format!(
        "{GOOD}\n[cache]\nredis_url = \"redis://127.0.0.1:6379\"\nencryption_key_file = \"token-key\"\n"
    );
    let env = vec![(
        "TOKEN_INJECTOR_CACHE__REDIS_URL".to_owned(),
        "rediss://redis.example:6380/1".to_owned(),
    )];
    let c = from_text(&text, dir.path(), env).unwrap();
    let cache = c.cache.unwrap();
    assert!(cache.tls);
    assert!(
        matches!(&cache.target, RedisTarget::Url(u) if u.as_str() == "rediss://redis.example:6380/1")
    );
}

#[test]
fn cache_problems_name_their_key() {
    let key = "encryption_key_file = \"token-key\"";
    let cases: &[(&str, &str, &str)] = &[
        (
            "redis_url = \"redis://127.0.0.1:6379\"",
            "",
            "cache.encryption_key_file: missing",
        ),
        ("", key, "cache.redis_url: missing"),
        (
            "redis_url = \"redis://:hunter2@127.0.0.1:6379\"",
            key,
            "cache.redis_url: must not contain a password",
        ),
        (
            "redis_url = \"http://127.0.0.1:6379\"",
            key,
            "cache.redis_url: \"http://127.0.0.1:6379\": expected redis://",
        ),
        (
            "redis_url = \"redis://127.0.0.1:6379/x\"",
            key,
            "cache.redis_url: \"x\" is not a database number",
        ),
        (
            "redis_url = \"redis://h:1\"\nsentinels = [\"h:2\"]\nmaster_name = \"m\"",
            key,
            "cache.redis_url: set together with sentinels",
        ),
        ("sentinels = [\"h:2\"]", key, "cache.master_name: missing"),
        (
            "sentinels = [\"h\"]\nmaster_name = \"m\"",
            key,
            "cache.sentinels[0]: \"h\": expected HOST:PORT",
        ),
        (
            "redis_url = \"redis://h:1\"\nencryption_key_file = \"secret\"",
            "",
            "cache.encryption_key_file:",
        ),
        (
            "redis_url = \"redis://h:1\"\nencryption_key_file = \"nope\"",
            "",
            "cache.encryption_key_file: cannot read",
        ),
        (
            "redis_url = \"redis://h:1\"\npassword_file = \"nope\"",
            key,
            "cache.password_file: cannot read",
        ),
        (
            "redis_url = \"redis://h:1\"\nkey_prefix = \"a b\"",
            key,
            "cache.key_prefix:",
        ),
        (
            "redis_url = \"redis://h:1\"\noperation_timeout = \"20s\"",
            key,
            "cache.operation_timeout: out of range",
        ),
        (
            "redis_url = \"redis://h:1\"\nusername = \"\"",
            key,
            "cache.username:",
        ),
        (
            "redis_url = \"redis://h:1\"\nusername = \"ti\"",
            key,
            "cache.username: set without password_file",
        ),
        (
            "redis_url = \"redis://h:1/0#insecure\"",
            key,
            "cache.redis_url:",
        ),
        (
            "redis_url = \"redis://h:1\"\nclient_cert_file = \"secret\"",
            key,
            "cache.client_key_file: missing",
        ),
        (
            "redis_url = \"redis://h:1\"\nredis_port = 1",
            key,
            "redis_port",
        ),
    ];
    for (cache, extra, want) in cases {
        let got = cache_problems(&format!("{cache}\n{extra}"), "");
        assert!(
            got.iter().any(|p| p.contains(want)),
            "[cache] {cache:?}: want a problem containing {want:?}, got {got:?}"
        );
    }
    // The secret in a refused URL is not repeated.
    let got = cache_problems("redis_url = \"redis://:hunter2@127.0.0.1:6379\"", key).join("\n");
    assert!(!got.contains("hunter2"), "{got}");
    // Per profile.
    let got = cache_problems(
        &format!("redis_url = \"redis://h:1\"\n{key}"),
        "cache = \"fleet\"",
    );
    assert!(
        got.iter()
            .any(|p| p.contains("profiles.billing.cache: unknown value \"fleet\"")),
        "{got:?}"
    );
    let got = problems(&GOOD.replace("scopes = [\"read\", \"write\"]", "cache = \"shared\""));
    assert!(
        got.iter()
            .any(|p| p.contains("profiles.billing.cache: \"shared\" needs a [cache] table")),
        "{got:?}"
    );
}

/// The secret and key files a config names, and the warning about those
/// group or others may read (`Config::secret_files`, `secret::warn_exposed`).
mod secret_files {
    use std::path::Path;

    use crate::secret;

    /// A subscriber that writes formatted events into a buffer.
    fn capture() -> (
        impl tracing::Subscriber + Send + Sync,
        std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    ) {
        #[derive(Clone)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = Buf(buf.clone());
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        (sub, buf)
    }

    fn config_with(dir: &Path, profiles: &str) -> crate::config::Config {
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n{profiles}\n\
             [[routes]]\nhost = \"a.test\"\nprofile = \"basic\"\n"
        );
        crate::config::from_text(&text, dir, Vec::<(String, String)>::new()).unwrap()
    }

    #[test]
    fn group_or_world_readable_secret_files_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open-secret");
        let closed = dir.path().join("closed-secret");
        let group = dir.path().join("group-secret");
        for (p, mode) in [(&open, 0o644), (&closed, 0o600), (&group, 0o640)] {
            std::fs::write(p, "s3cret-value\n").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let config = config_with(
            dir.path(),
            "[profiles.basic]\ntoken_url = \"https://idp.test/t\"\nclient_id = \"c\"\n\
             client_secret_file = \"open-secret\"\n\
             [profiles.post]\ntoken_url = \"https://idp.test/t\"\nclient_id = \"c\"\n\
             auth_method = \"client_secret_post\"\nclient_secret_file = \"closed-secret\"\n\
             [profiles.jwt]\ntoken_url = \"https://idp.test/t\"\nclient_id = \"c\"\n\
             auth_method = \"client_secret_jwt\"\nclient_secret_file = \"group-secret\"\n",
        );
        let (sub, buf) = capture();
        let exposed =
            tracing::subscriber::with_default(sub, || secret::warn_exposed(&config.secret_files()));
        let keys: Vec<(&str, u32)> = exposed.iter().map(|e| (e.key.as_str(), e.mode)).collect();
        assert_eq!(
            keys,
            vec![
                ("profiles.basic.client_secret_file", 0o644),
                ("profiles.jwt.client_secret_file", 0o640),
            ]
        );
        let log = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(lines[0].contains("WARN"), "{log}");
        assert!(
            lines[0].contains("profiles.basic.client_secret_file"),
            "{log}"
        );
        assert!(lines[0].contains(&open.display().to_string()), "{log}");
        assert!(lines[0].contains("mode=0644"), "{log}");
        assert!(lines[1].contains("mode=0640"), "{log}");
        assert!(!log.contains("closed-secret"), "{log}");
        assert!(!log.contains("s3cret-value"), "{log}");

        // Fixed: no warning any more.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o400)).unwrap();
        let (sub, buf) = capture();
        let exposed =
            tracing::subscriber::with_default(sub, || secret::warn_exposed(&config.secret_files()));
        assert!(exposed.is_empty(), "{exposed:?}");
        assert!(buf.lock().unwrap().is_empty());
    }

    #[test]
    fn a_routes_upstream_client_key_is_checked_too() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("up.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("up.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("secret"), "s\n").unwrap();
        for (f, mode) in [("up.key", 0o644), ("secret", 0o600)] {
            std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        let config = config_with(
            dir.path(),
            "[profiles.basic]\ntoken_url = \"https://idp.test/t\"\nclient_id = \"c\"\n\
             client_secret_file = \"secret\"\n\
             [[routes]]\nhost = \"api.test\"\nprofile = \"basic\"\n\
             client_cert_file = \"up.crt\"\nclient_key_file = \"up.key\"\n",
        );
        let (sub, _buf) = capture();
        let exposed =
            tracing::subscriber::with_default(sub, || secret::warn_exposed(&config.secret_files()));
        let keys: Vec<&str> = exposed.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["routes[0].client_key_file"]);
    }
}

#[test]
fn dpop_keys_are_checked_and_shape_the_routes() {
    let dir = dir_with_secret();
    write_key(&dir, "ec.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    write_key(&dir, "ed.pem", &rcgen::PKCS_ED25519);
    write_key(&dir, "p384.pem", &rcgen::PKCS_ECDSA_P384_SHA384);
    std::fs::write(dir.path().join("junk.pem"), "junk").unwrap();
    let with = |keys: &str| {
        GOOD.replace(
            "client_secret_file = \"secret\"\n",
            &format!("client_secret_file = \"secret\"\n{keys}\n"),
        )
    };
    // Generated key (ES256); the routes default to `DPoP `.
    let c = load(&with("dpop = true"), &dir).unwrap();
    let d = c.profiles["billing"].dpop.as_ref().unwrap();
    assert_eq!((d.key_file.as_ref(), d.alg), (None, None));
    assert!(c.routes.iter().all(|r| r.prefix == "DPoP "));
    // A key file, its own algorithm or a fitting one.
    let c = load(&with("dpop = true\ndpop_key_file = \"ed.pem\""), &dir).unwrap();
    assert!(
        c.profiles["billing"]
            .dpop
            .as_ref()
            .unwrap()
            .key_file
            .is_some()
    );
    assert!(
        c.secret_files()
            .iter()
            .any(|(k, _)| k == "profiles.billing.dpop_key_file")
    );
    let ok = problems_in(
        &dir,
        &with("dpop = true\ndpop_key_file = \"ec.pem\"\ndpop_alg = \"ES256\""),
    );
    assert!(ok.is_empty(), "{ok:?}");
    let cases = [
        (
            "dpop = true\ndpop_key_file = \"ec.pem\"\ndpop_alg = \"EdDSA\"",
            "profiles.billing.dpop_alg: signing_alg EdDSA does not fit a EC P-256 key",
        ),
        (
            "dpop = true\ndpop_key_file = \"junk.pem\"",
            "profiles.billing.dpop_key_file:",
        ),
        (
            "dpop = true\ndpop_key_file = \"missing.pem\"",
            "profiles.billing.dpop_key_file:",
        ),
        (
            "dpop = true\ndpop_key_file = \"p384.pem\"",
            "profiles.billing.dpop_alg:",
        ),
        (
            "dpop = true\ndpop_alg = \"HS256\"",
            "profiles.billing.dpop_alg: unknown value \"HS256\"; expected one of ES256, EdDSA, PS256, RS256",
        ),
        (
            "dpop = true\ndpop_alg = \"PS256\"",
            "profiles.billing.dpop_alg: an RSA key is not generated",
        ),
        (
            "dpop_key_file = \"ec.pem\"",
            "profiles.billing.dpop_key_file: only used with dpop = true",
        ),
    ];
    for (keys, want) in cases {
        let p = problems_in(&dir, &with(keys));
        assert!(p.len() == 1 && p[0].starts_with(want), "{keys}: {p:?}");
    }
    // The token and its proof go in Authorization: DPoP.
    let text = with("dpop = true").replace(
        "profile = \"billing\"\n\n[[routes]]",
        "profile = \"billing\"\nheader = \"x-api-key\"\nprefix = \"Bearer \"\n\n[[routes]]",
    );
    let p = problems_in(&dir, &text);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].starts_with("routes[0].header: a DPoP profile's token goes in Authorization"));
    assert!(p[1].starts_with("routes[0].prefix: a DPoP profile's token goes after \"DPoP \""));
    // A static profile has no DPoP.
    let p = problems_in(
        &dir,
        "[profiles.k]\ngrant = \"static\"\ncredential_file = \"secret\"\ndpop = true\n\
         [[routes]]\nhost = \"a.test\"\nprofile = \"k\"\n",
    );
    assert!(
        p[0].starts_with("profiles.k.dpop: not used by grant \"static\""),
        "{p:?}"
    );
}

#[test]
fn a_shared_dpop_profile_needs_a_key_every_replica_has() {
    let cache = "redis_url = \"redis://127.0.0.1:6379\"\nencryption_key_file = \"token-key\"";
    let p = cache_problems(cache, "dpop = true");
    assert!(
        p.len() == 1
            && p[0].starts_with("profiles.billing.cache: a DPoP token is usable only with its key"),
        "{p:?}"
    );
    let p = cache_problems(cache, "dpop = true\ncache = \"local\"");
    assert!(p.is_empty(), "{p:?}");
    // With a key file (the same on every replica) it shares.
    let dir = dir_with_cache_files();
    write_key(&dir, "ec.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    let text = GOOD.replace(
        "scopes = [\"read\", \"write\"]",
        "scopes = [\"read\", \"write\"]\ndpop = true\ndpop_key_file = \"ec.pem\"",
    );
    let c = load(&format!("{text}\n[cache]\n{cache}\n"), &dir).unwrap();
    assert_eq!(c.profiles["billing"].cache, CacheMode::Shared);
}

fn problems_in(dir: &tempfile::TempDir, text: &str) -> Vec<String> {
    match load(text, dir) {
        Ok(_) => vec![],
        Err(e) => e.lines(),
    }
}

/// A config with one profile `p` (its keys `keys`) and a route to it.
fn grant_config(keys: &str) -> String {
    format!("[profiles.p]\n{keys}\n\n[[routes]]\nhost = \"api.example.com\"\nprofile = \"p\"\n")
}

#[test]
fn jwt_bearer_grants_are_checked_and_typed() {
    let dir = dir_with_secret();
    write_key(&dir, "ec.pem", &rcgen::PKCS_ECDSA_P256_SHA256);
    std::fs::write(dir.path().join("assertion"), "a.b.c\n").unwrap();
    let c = load(
        &grant_config(
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"svc\"\nprivate_key_file = \"ec.pem\"\nkey_id = \"k1\"\nassertion_subject = \"user-7\"\nscopes = [\"a\"]",
        ),
        &dir,
    )
    .unwrap();
    let p = &c.profiles["p"];
    assert_eq!(
        p.auth,
        ClientAuth::None,
        "no secret: no client authentication"
    );
    match &p.grant {
        Grant::JwtBearer(Assertion::Signed {
            issuer,
            subject,
            key_id,
            audience,
            ..
        }) => {
            assert_eq!((issuer.as_str(), subject.as_str()), ("svc", "user-7"));
            assert_eq!((key_id.as_deref(), audience), (Some("k1"), &None));
        }
        other => panic!("{other:?}"),
    }
    // With a secret: client_secret_basic by default.
    let c = load(
        &grant_config(
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"svc\"\nclient_secret_file = \"secret\"\nassertion_file = \"assertion\"",
        ),
        &dir,
    )
    .unwrap();
    assert!(matches!(c.profiles["p"].auth, ClientAuth::SecretBasic(_)));
    assert!(matches!(
        c.profiles["p"].grant,
        Grant::JwtBearer(Assertion::File(_))
    ));
    let cases = [
        (
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"",
            "profiles.p.private_key_file: missing; grant = \"jwt_bearer\" needs",
        ),
        (
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nprivate_key_file = \"ec.pem\"",
            "profiles.p.assertion_issuer: missing",
        ),
        (
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"c\"\nprivate_key_file = \"ec.pem\"\nsigning_alg = \"RS256\"",
            "profiles.p.signing_alg: signing_alg RS256 does not fit",
        ),
        (
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"c\"\nassertion_file = \"assertion\"\nprivate_key_file = \"ec.pem\"",
            "profiles.p.private_key_file: set one of",
        ),
        (
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"c\"\nassertion_file = \"assertion\"\nkey_id = \"k\"",
            "profiles.p.key_id: not used with assertion_file",
        ),
        (
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"c\"\nassertion_file = \"assertion\"\nauth_method = \"private_key_jwt\"",
            "profiles.p.auth_method: \"private_key_jwt\" is not offered with grant = \"jwt_bearer\"",
        ),
        (
            "grant = \"jwt_bearer\"\ntoken_url = \"https://idp.test/token\"\nclient_id = \"c\"\nassertion_file = \"assertion\"\nsubject_token_file = \"assertion\"",
            "profiles.p.subject_token_file: only used with grant = \"token_exchange\"",
        ),
        (
            "token_url = \"https://idp.test/token\"\nclient_id = \"c\"\nauth_method = \"none\"",
            "profiles.p.auth_method: \"none\" is only for grant",
        ),
        (
            "token_url = \"https://idp.test/token\"\nclient_id = \"c\"\nclient_secret_file = \"secret\"\nassertion_file = \"assertion\"",
            "profiles.p.assertion_file: only used with grant = \"jwt_bearer\"",
        ),
    ];
    for (keys, want) in cases {
        let p = problems_in(&dir, &grant_config(keys));
        assert!(!p.is_empty() && p[0].starts_with(want), "{keys}: {p:?}");
    }
}

#[test]
fn google_key_files_are_checked_naming_the_field() {
    let dir = dir_with_secret();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let write = |name: &str, json: serde_json::Value| {
        std::fs::write(dir.path().join(name), json.to_string()).unwrap();
    };
    let base = serde_json::json!({
        "type": "service_account",
        "client_email": "svc@p.iam.gserviceaccount.com",
        "private_key_id": "kid1",
        "private_key": kp.serialize_pem(),
        "token_uri": "https://oauth2.googleapis.com/token",
    });
    let with = |f: &str| {
        grant_config(&format!(
            "grant = \"jwt_bearer\"\ngoogle_credentials_file = \"{f}\""
        ))
    };
    // An EC key is not a Google key; every other field problem is named.
    write("ec.json", base.clone());
    let p = problems_in(&dir, &with("ec.json"));
    assert!(
        p[0].contains("Google service account keys are RSA"),
        "{p:?}"
    );
    for (field, name) in [
        ("client_email", "no-email.json"),
        ("private_key", "no-key.json"),
        ("token_uri", "no-uri.json"),
    ] {
        let mut j = base.clone();
        j.as_object_mut().unwrap().remove(field);
        write(name, j);
        let p = problems_in(&dir, &with(name));
        assert!(
            p.len() == 1
                && p[0].starts_with("profiles.p.google_credentials_file:")
                && p[0].contains(&format!("{field:?} is missing")),
            "{field}: {p:?}"
        );
    }
    let mut j = base.clone();
    j["type"] = "authorized_user".into();
    write("user.json", j);
    let p = problems_in(&dir, &with("user.json"));
    assert!(p[0].contains("\"type\" is \"authorized_user\""), "{p:?}");
    let mut j = base.clone();
    j["type"] = "external_account".into();
    write("wif.json", j);
    // An external_account file is read for its own fields.
    let p = problems_in(&dir, &with("wif.json"));
    assert!(p[0].contains("\"audience\" is missing"), "{p:?}");
    std::fs::write(dir.path().join("junk.json"), "{not json").unwrap();
    let p = problems_in(&dir, &with("junk.json"));
    assert!(p[0].contains("is not a JSON object"), "{p:?}");
    // No error shows the key.
    for f in ["ec.json", "no-email.json", "user.json", "junk.json"] {
        let text = problems_in(&dir, &with(f)).join("\n");
        assert!(!text.contains("PRIVATE KEY") && !text.contains(&kp.serialize_pem()[30..60]));
    }
}

#[test]
fn token_exchange_and_chains_are_checked() {
    let dir = dir_with_secret();
    std::fs::write(dir.path().join("sa-token"), "eyJ.a.b\n").unwrap();
    let text = "[profiles.a]\ntoken_url = \"https://idp.test/token\"\nclient_id = \"a\"\nclient_secret_file = \"secret\"\n\n\
        [profiles.b]\ngrant = \"token_exchange\"\ntoken_url = \"https://sts.test/token\"\nsubject_profile = \"a\"\naudience = \"https://api\"\n\n\
        [profiles.c]\ngrant = \"token_exchange\"\ntoken_url = \"https://sts.test/token\"\nsubject_token_file = \"sa-token\"\n\
        subject_token_type = \"urn:ietf:params:oauth:token-type:jwt\"\nrequested_token_type = \"urn:ietf:params:oauth:token-type:access_token\"\n\n\
        [[routes]]\nhost = \"b.test\"\nprofile = \"b\"\n";
    let c = load(text, &dir).unwrap();
    // `a` has no route, but `b` exchanges its token: both are in use.
    let used: Vec<&str> = c.profiles_in_use().map(|p| p.name.as_str()).collect();
    assert_eq!(used, ["a", "b"]);
    match &c.profiles["b"].grant {
        Grant::TokenExchange(x) => {
            assert_eq!(x.subject, Subject::Profile("a".into()));
            assert_eq!(
                x.subject_token_type,
                "urn:ietf:params:oauth:token-type:access_token"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.profiles["b"].auth, ClientAuth::None);
    let cycle = "[profiles.x]\ngrant = \"token_exchange\"\ntoken_url = \"https://sts.test/t\"\nsubject_profile = \"y\"\n\
        [profiles.y]\ngrant = \"token_exchange\"\ntoken_url = \"https://sts.test/t\"\nsubject_profile = \"x\"\n\
        [[routes]]\nhost = \"x.test\"\nprofile = \"x\"\n";
    let p = problems_in(&dir, cycle);
    assert!(
        p.iter().any(|l| l
            .starts_with("profiles.x.subject_profile: the chain comes back to itself: x → y → x")),
        "{p:?}"
    );
    let cases = [
        (
            "subject_profile = \"nope\"",
            "profiles.p.subject_profile: no profile named \"nope\"",
        ),
        (
            "subject_profile = \"p\"",
            "profiles.p.subject_profile: a profile cannot exchange its own token",
        ),
        (
            "subject_token_file = \"sa-token\"",
            "profiles.p.subject_token_type: missing",
        ),
        (
            "subject_token_file = \"sa-token\"\nsubject_token_type = \"jwt\"",
            "profiles.p.subject_token_type: \"jwt\" is not a token type",
        ),
        (
            "subject_token_file = \"sa-token\"\nsubject_token_type = \"urn:ietf:params:oauth:token-type:jwt\"\nactor_token_file = \"sa-token\"",
            "profiles.p.actor_token_type: missing",
        ),
        ("", "profiles.p.subject_token_file: missing"),
        (
            "subject_token_file = \"missing\"\nsubject_token_type = \"urn:ietf:params:oauth:token-type:jwt\"",
            "profiles.p.subject_token_file:",
        ),
    ];
    for (keys, want) in cases {
        let p = problems_in(
            &dir,
            &grant_config(&format!(
                "grant = \"token_exchange\"\ntoken_url = \"https://sts.test/token\"\n{keys}"
            )),
        );
        assert!(!p.is_empty() && p[0].starts_with(want), "{keys}: {p:?}");
    }
}

#[test]
fn google_files_refuse_what_they_would_ignore() {
    let dir = dir_with_secret();
    let wif = serde_json::json!({
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": { "file": "/var/run/secrets/tokens/gcp" },
    });
    std::fs::write(dir.path().join("wif.json"), wif.to_string()).unwrap();
    let base = "grant = \"jwt_bearer\"\ngoogle_credentials_file = \"wif.json\"";
    assert!(problems_in(&dir, &grant_config(base)).is_empty());
    for (extra, key) in [
        ("dpop = true", "profiles.p.dpop:"),
        ("audience = \"x\"", "profiles.p.audience:"),
        (
            "client_secret_file = \"secret\"",
            "profiles.p.client_secret_file:",
        ),
    ] {
        let p = problems_in(&dir, &grant_config(&format!("{base}\n{extra}")));
        assert!(
            p.iter()
                .any(|l| l.starts_with(key) && l.contains("not used with an external_account")),
            "{extra}: {p:?}"
        );
    }
    let mut bad = wif.clone();
    bad["credential_source"] = serde_json::json!({ "executable": { "command": "x" } });
    std::fs::write(dir.path().join("exec.json"), bad.to_string()).unwrap();
    let p = problems_in(
        &dir,
        &grant_config("grant = \"jwt_bearer\"\ngoogle_credentials_file = \"exec.json\""),
    );
    assert!(
        p[0].contains("\"executable\" sources are not supported"),
        "{p:?}"
    );
}
