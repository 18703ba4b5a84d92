//! Property tests over the pure parts of the proxy: token-response parsing,
//! host patterns and lookup, hop-by-hop header removal, and config parsing.
//! Each property runs a modest number of cases so the file stays fast; the
//! `fuzz/` targets run the same code for longer.

use std::collections::BTreeMap;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use serde_json::json;

use token_injector::config;
use token_injector::proxy::headers::{inject, strip_hop_by_hop};
use token_injector::route::{Pattern, Table, normalize, split_host_port};
use token_injector::token::FetchError;
use token_injector::token::response::{MAX_LIFETIME, parse};

const CASES: u32 = 256;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig::with_cases(n)
}

// ---------------------------------------------------------------------------
// Token responses
// ---------------------------------------------------------------------------

/// A token that is not a JWT (no dots), made of header-safe characters.
fn opaque_token() -> impl Strategy<Value = String> {
    "[!-\\-/-~]{1,64}"
}

/// `expires_in` as a server may send it: absent, null, a number or a
/// numeric string, always positive.
#[derive(Debug, Clone)]
enum ExpiresIn {
    Absent,
    Null,
    Int(u64),
    Float(f64),
    Text(u64),
}

impl ExpiresIn {
    fn seconds(&self) -> Option<f64> {
        match self {
            ExpiresIn::Absent | ExpiresIn::Null => None,
            ExpiresIn::Int(n) | ExpiresIn::Text(n) => Some(*n as f64),
            ExpiresIn::Float(f) => Some(*f),
        }
    }
}

fn expires_in() -> impl Strategy<Value = ExpiresIn> {
    prop_oneof![
        Just(ExpiresIn::Absent),
        Just(ExpiresIn::Null),
        (1u64..=10_000_000).prop_map(ExpiresIn::Int),
        (0.001f64..1e9).prop_map(ExpiresIn::Float),
        (1u64..=10_000_000).prop_map(ExpiresIn::Text),
    ]
}

fn well_formed_body(token: &str, exp: &ExpiresIn, token_type: Option<&str>) -> Vec<u8> {
    let mut obj = serde_json::Map::new();
    obj.insert("access_token".into(), json!(token));
    match exp {
        ExpiresIn::Absent => {}
        ExpiresIn::Null => {
            obj.insert("expires_in".into(), serde_json::Value::Null);
        }
        ExpiresIn::Int(n) => {
            obj.insert("expires_in".into(), json!(n));
        }
        ExpiresIn::Float(f) => {
            obj.insert("expires_in".into(), json!(f));
        }
        ExpiresIn::Text(n) => {
            obj.insert("expires_in".into(), json!(n.to_string()));
        }
    }
    if let Some(t) = token_type {
        obj.insert("token_type".into(), json!(t));
    }
    obj.insert("scope".into(), json!("read write"));
    serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap()
}

/// A JSON value of any shape, a few levels deep.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(|b| json!(b)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,16}".prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JWT-shaped string whose payload is `claims`.
fn jwt_with(claims: &serde_json::Value) -> String {
    use base64::Engine;
    let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.sig",
        b(br#"{"alg":"none"}"#),
        b(&serde_json::to_vec(claims).unwrap())
    )
}

/// An object with the fields parsing looks at, each of any JSON type.
fn token_like_object() -> impl Strategy<Value = Vec<u8>> {
    let field = |name: &'static str| {
        prop::option::of(prop_oneof![
            any_json(),
            opaque_token().prop_map(|t| json!(t)),
            any_json().prop_map(|claims| json!(jwt_with(&json!({ "exp": claims })))),
        ])
        .prop_map(move |v| (name, v))
    };
    (
        field("access_token"),
        field("token_type"),
        field("expires_in"),
        field("scope"),
        field("error"),
        field("error_description"),
    )
        .prop_map(|fields| {
            let (a, b, c, d, e, f) = fields;
            let obj: serde_json::Map<String, serde_json::Value> = [a, b, c, d, e, f]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
                .collect();
            serde_json::to_vec(&obj).unwrap()
        })
}

fn check_parse_result(
    r: &Result<token_injector::token::response::Parsed, FetchError>,
    status: u16,
    default: Duration,
) -> Result<(), TestCaseError> {
    match r {
        Ok(p) => {
            prop_assert!((200..300).contains(&status), "Ok for HTTP {status}");
            prop_assert!(p.lifetime > Duration::ZERO || default.is_zero());
            prop_assert!(p.lifetime <= MAX_LIFETIME);
            prop_assert!(!p.access_token.expose().is_empty());
            prop_assert!(
                p.access_token
                    .expose()
                    .bytes()
                    .all(|b| (0x21..=0x7e).contains(&b))
            );
        }
        Err(FetchError::Rejected { status: s, .. }) => {
            prop_assert_eq!(*s, status);
            prop_assert!(!(200..300).contains(&status));
        }
        Err(FetchError::InvalidResponse(_)) => {
            prop_assert!((200..300).contains(&status));
        }
        Err(other) => prop_assert!(false, "parse made a transport error: {other:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(CASES))]

    /// Arbitrary bytes with any status never panic, and the result's kind
    /// follows the status.
    #[test]
    fn token_response_arbitrary_bytes_never_panic(
        status in any::<u16>(),
        body in prop::collection::vec(any::<u8>(), 0..256),
        now in any::<u64>(),
        default_secs in 0u64..=200_000,
    ) {
        let default = Duration::from_secs(default_secs);
        let r = parse(status, &body, None, now, default);
        check_parse_result(&r, status, default)?;
    }

    /// Objects with the right field names but any types and values (JWTs
    /// with any `exp` included) never panic and keep the lifetime bounds.
    #[test]
    fn token_response_arbitrary_fields_never_panic(
        status in prop_oneof![Just(200u16), Just(201), Just(400), Just(401), Just(503), any::<u16>()],
        body in token_like_object(),
        now in prop_oneof![Just(1_800_000_000u64), any::<u64>()],
        default_secs in 1u64..=200_000,
    ) {
        let default = Duration::from_secs(default_secs);
        let r = parse(status, &body, Some(Duration::from_secs(1)), now, default);
        check_parse_result(&r, status, default)?;
    }

    /// Any well-formed success answer parses; the token comes back as sent;
    /// the lifetime is `expires_in` capped at 24 h, or the default when
    /// absent; always 0 < lifetime ≤ 24 h.
    #[test]
    fn token_response_well_formed_round_trips(
        token in opaque_token(),
        exp in expires_in(),
        token_type in prop::option::of(prop_oneof![Just("Bearer"), Just("bearer"), Just("BEARER")]),
        status in 200u16..300,
        default_secs in 1u64..=100_000,
    ) {
        let default = Duration::from_secs(default_secs);
        let body = well_formed_body(&token, &exp, token_type);
        let p = parse(status, &body, None, 1_800_000_000, default)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(p.access_token.expose(), token.as_str());
        prop_assert!(p.lifetime > Duration::ZERO);
        prop_assert!(p.lifetime <= MAX_LIFETIME);
        let want = match exp.seconds() {
            Some(s) => Duration::from_secs_f64(s.min(MAX_LIFETIME.as_secs_f64())),
            None => default.min(MAX_LIFETIME),
        };
        prop_assert_eq!(p.lifetime, want);
        prop_assert_eq!(p.scope.as_deref(), Some("read write"));
        // The token never shows in Debug output.
        let shown = format!("{p:?}");
        prop_assert!(!shown.contains(&token) || token.len() < 4, "{}", shown);
    }

    /// A JWT's `exp` bounds the lifetime: the shorter of `expires_in` and
    /// the time left; an `exp` already past is an invalid response.
    #[test]
    fn token_response_jwt_exp_bounds_lifetime(
        now in 1_000_000_000u64..4_000_000_000,
        left in -1000i64..200_000,
        exp_in in prop::option::of(1u64..200_000),
    ) {
        let exp = now.saturating_add_signed(left);
        let token = jwt_with(&json!({ "exp": exp, "sub": "x" }));
        let e = match exp_in { Some(n) => ExpiresIn::Int(n), None => ExpiresIn::Absent };
        let body = well_formed_body(&token, &e, Some("Bearer"));
        let r = parse(200, &body, None, now, Duration::from_secs(300));
        if exp <= now {
            prop_assert!(matches!(r, Err(FetchError::InvalidResponse(_))));
        } else {
            let p = r.map_err(|e| TestCaseError::fail(format!("{e}")))?;
            let mut want = Duration::from_secs(exp - now);
            if let Some(n) = exp_in {
                want = want.min(Duration::from_secs(n));
            }
            prop_assert_eq!(p.lifetime, want.min(MAX_LIFETIME));
        }
    }

    /// A non-positive, non-finite or non-numeric `expires_in` is refused,
    /// never turned into a token that lives zero seconds or forever.
    #[test]
    fn token_response_bad_expires_in_is_refused(
        token in opaque_token(),
        bad in prop_oneof![
            (-1e12f64..=0.0).prop_map(|f| json!(f)),
            (i64::MIN..=0).prop_map(|n| json!(n)),
            "[a-z ]{1,8}".prop_map(|s| json!(s)),
            Just(json!("-1")),
            Just(json!("NaN")),
            Just(json!("inf")),
            Just(json!([1])),
            Just(json!({"s": 1})),
            Just(json!(true)),
        ],
    ) {
        let body = serde_json::to_vec(&json!({ "access_token": token, "expires_in": bad })).unwrap();
        let r = parse(200, &body, None, 1_800_000_000, Duration::from_secs(300));
        prop_assert!(matches!(r, Err(FetchError::InvalidResponse(_))), "{:?}", r.map(|p| p.lifetime));
    }

    /// Whatever the server says around a token, a failed parse never
    /// repeats the token in its message.
    #[test]
    fn token_response_errors_never_echo_the_token(
        token in "[A-Za-z0-9]{16,32}",
        token_type in "[a-z]{1,8}",
        status in 200u16..300,
    ) {
        prop_assume!(!token_type.eq_ignore_ascii_case("bearer"));
        let body = serde_json::to_vec(&json!({ "access_token": token, "token_type": token_type, "expires_in": 60 })).unwrap();
        let e = parse(status, &body, None, 1_800_000_000, Duration::from_secs(300)).unwrap_err();
        let shown = format!("{e} {e:?}");
        prop_assert!(!shown.contains(&token), "{}", shown);
    }
}

// ---------------------------------------------------------------------------
// Hosts and routes
// ---------------------------------------------------------------------------

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?"
}

fn dns_name(max_labels: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..=max_labels).prop_map(|v| v.join("."))
}

/// Upper-cases the letters where `mask` says so.
fn mixed_case(s: &str, mask: &[bool]) -> String {
    s.chars()
        .zip(mask.iter().copied().chain(std::iter::repeat(false)))
        .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
        .collect()
}

/// A host as a client may send it, relative to a wildcard's `suffix`:
/// under it, the apex itself, glued to it, above it, or unrelated.
fn host_near(suffix: String) -> impl Strategy<Value = String> {
    let s = suffix.clone();
    let under = dns_name(3).prop_map(move |p| format!("{p}.{s}"));
    let s = suffix.clone();
    let glued = label().prop_map(move |p| format!("{p}{s}"));
    let s = suffix.clone();
    let above = label().prop_map(move |p| format!("{s}.{p}"));
    let s = suffix.clone();
    let inner = label().prop_map(move |p| {
        // `a.example.com` → `a.example-x.com`: shares a suffix of the name, not of labels.
        match s.split_once('.') {
            Some((first, rest)) => format!("{first}-{p}.{rest}"),
            None => format!("{s}-{p}"),
        }
    });
    prop_oneof![
        3 => under,
        1 => Just(suffix),
        1 => glued,
        1 => above,
        1 => inner,
        1 => dns_name(4),
    ]
}

fn expected_wildcard_match(host: &str, suffix: &str) -> bool {
    let h = host.to_ascii_lowercase();
    let h = h.strip_suffix('.').unwrap_or(&h);
    let dotted = format!(".{suffix}");
    h.len() > dotted.len() && h.ends_with(&dotted)
}

proptest! {
    #![proptest_config(cases(CASES))]

    /// `*.suffix` matches exactly the hosts that end in `.suffix` (any case,
    /// one trailing dot allowed), never the apex, with the port rule: a
    /// pattern with a port matches that port only.
    #[test]
    fn wildcard_matches_exactly_the_subdomains(
        (suffix, host) in dns_name(3).prop_flat_map(|s| (Just(s.clone()), host_near(s))),
        mask in prop::collection::vec(any::<bool>(), 0..64),
        trailing_dot in any::<bool>(),
        pattern_case in prop::collection::vec(any::<bool>(), 0..64),
        pattern_port in prop::option::of(prop_oneof![Just(443u16), Just(8443), any::<u16>()]),
        port in prop_oneof![Just(443u16), Just(8443), Just(80), any::<u16>()],
    ) {
        let mut written = format!("*.{}", mixed_case(&suffix, &pattern_case));
        if let Some(p) = pattern_port {
            written.push_str(&format!(":{p}"));
        }
        let pattern = Pattern::parse(&written).map_err(TestCaseError::fail)?;
        prop_assert!(pattern.is_wildcard());
        prop_assert_eq!(pattern.port(), pattern_port);
        let table = Table::new([&pattern]);
        let mut sent = mixed_case(&host, &mask);
        if trailing_dot {
            sent.push('.');
        }
        let want = expected_wildcard_match(&sent, &suffix)
            && pattern_port.is_none_or(|p| p == port);
        prop_assert_eq!(table.lookup(&sent, port).is_some(), want, "{} on {}:{}", written, sent, port);
        // Never the apex, in any spelling.
        let apex = format!("{}{}", mixed_case(&suffix, &mask), if trailing_dot { "." } else { "" });
        prop_assert_eq!(table.lookup(&apex, port), None);
    }

    /// An exact route matches its host in any case and with one trailing
    /// dot, on any port, and no other name.
    #[test]
    fn exact_route_matches_only_its_host(
        name in dns_name(3),
        other in dns_name(3),
        mask in prop::collection::vec(any::<bool>(), 0..64),
        trailing_dot in any::<bool>(),
        port in any::<u16>(),
    ) {
        let pattern = Pattern::parse(&name).map_err(TestCaseError::fail)?;
        let table = Table::new([&pattern]);
        let mut sent = mixed_case(&name, &mask);
        if trailing_dot {
            sent.push('.');
        }
        prop_assert_eq!(table.lookup(&sent, port), Some(0));
        prop_assert_eq!(table.lookup(&other, port).is_some(), other == name);
        prop_assert_eq!(table.lookup(&format!("x.{name}"), port), None);
    }

    /// Normalising twice changes nothing, for any input that does not end
    /// in two dots (see `normalize_is_not_idempotent_on_double_trailing_dot`),
    /// and a normalised name has no upper-case ASCII and no trailing dot.
    #[test]
    fn normalize_is_idempotent(s in prop_oneof![
        "\\PC{0,24}",
        "[a-zA-Z0-9.-]{0,24}",
        dns_name(3).prop_map(|n| format!("{}.", n.to_ascii_uppercase())),
    ]) {
        prop_assume!(!s.ends_with(".."));
        let once = normalize(&s).into_owned();
        let twice = normalize(&once).into_owned();
        prop_assert_eq!(&once, &twice);
        prop_assert!(!once.bytes().any(|b| b.is_ascii_uppercase()));
        prop_assert!(!once.ends_with('.'));
    }

    /// Looking up a host and looking up its normal form give the same route.
    #[test]
    fn lookup_is_invariant_under_normalisation(
        host in "[a-zA-Z0-9.-]{0,24}",
        port in any::<u16>(),
    ) {
        prop_assume!(!host.ends_with(".."));
        let pats: Vec<Pattern> = ["a.test", "*.a.test", "b.test:8443", "*.c.test:443"]
            .iter()
            .map(|p| Pattern::parse(p).unwrap())
            .collect();
        let table = Table::new(&pats);
        prop_assert_eq!(table.lookup(&host, port), table.lookup(&normalize(&host), port));
    }

    /// `split_host_port` never panics, and `host:port` splits back into its
    /// parts for names and bracketed IPv6 addresses.
    #[test]
    fn split_host_port_round_trips(
        junk in "\\PC{0,32}",
        name in dns_name(3),
        v6 in any::<[u16; 8]>(),
        port in any::<u16>(),
    ) {
        let _ = split_host_port(&junk);
        let with_port = format!("{name}:{port}");
        prop_assert_eq!(split_host_port(&with_port), Some((name.as_str(), Some(port))));
        prop_assert_eq!(split_host_port(&name), Some((name.as_str(), None)));
        let ip = std::net::Ipv6Addr::from(v6);
        let bracketed = format!("[{ip}]");
        let with_port = format!("{bracketed}:{port}");
        prop_assert_eq!(split_host_port(&with_port), Some((bracketed.as_str(), Some(port))));
        prop_assert_eq!(split_host_port(&bracketed), Some((bracketed.as_str(), None)));
        let bad_port = format!("{name}:{port}0000000");
        prop_assert_eq!(split_host_port(&bad_port), None);
    }

    /// Parsing any route host never panics; what parses prints back to a
    /// pattern that parses to the same value.
    #[test]
    fn pattern_parse_never_panics_and_round_trips(s in prop_oneof![
        "\\PC{0,32}",
        "(\\*\\.)?[a-zA-Z0-9._:\\[\\]-]{0,32}",
    ]) {
        if let Ok(p) = Pattern::parse(&s) {
            let again = Pattern::parse(&p.to_string()).map_err(TestCaseError::fail)?;
            prop_assert_eq!(again, p);
        }
    }
}

/// Documents a known gap: `normalize` strips one trailing dot, so
/// `a.test..` normalises to `a.test.` and again to `a.test`. The request
/// path normalises once, so a host with two trailing dots finds no route,
/// which is the safe outcome (403, no token).
#[test]
fn normalize_is_not_idempotent_on_double_trailing_dot() {
    assert_eq!(normalize("a.test.."), "a.test.");
    assert_eq!(normalize(&normalize("a.test..")), "a.test");
    let pats = [
        Pattern::parse("a.test").unwrap(),
        Pattern::parse("*.a.test").unwrap(),
    ];
    let table = Table::new(&pats);
    assert_eq!(table.lookup("a.test..", 443), None);
    assert_eq!(table.lookup("x.a.test..", 443), None);
}

// ---------------------------------------------------------------------------
// Hop-by-hop headers
// ---------------------------------------------------------------------------

const FIXED_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "accept",
            "authorization",
            "cookie",
            "content-type",
            "x-forwarded-for",
            "x-a",
            "x-b",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
            "proxy-connection",
            "proxy-x",
        ])
        .prop_map(str::to_owned),
        "x-[a-z]{1,4}",
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~][ -~]{0,11}",
        Just("trailers".to_owned()),
        Just("TRAILERS".to_owned()),
    ]
}

/// One token of a `Connection` header value: a name in any case with
/// spaces around it, or junk that is not a header name.
fn connection_token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (header_name(), prop::collection::vec(any::<bool>(), 0..24), " {0,2}", " {0,2}")
            .prop_map(|(n, mask, a, b)| format!("{a}{}{b}", mixed_case(&n, &mask))),
        1 => Just("".to_owned()),
        1 => Just("bad name".to_owned()),
        1 => Just("close".to_owned()),
    ]
}

fn headers() -> impl Strategy<Value = (Vec<(String, String)>, Option<Vec<String>>)> {
    (
        prop::collection::vec((header_name(), header_value()), 0..12),
        prop::option::of(prop::collection::vec(connection_token(), 0..6)),
    )
}

fn build(pairs: &[(String, String)], connection: Option<&[String]>) -> HeaderMap {
    let mut m = HeaderMap::new();
    if let Some(tokens) = connection {
        m.append(header::CONNECTION, tokens.join(",").parse().unwrap());
    }
    for (k, v) in pairs {
        m.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

fn sensitive_token(t: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {t}")).unwrap();
    v.set_sensitive(true);
    v
}

proptest! {
    #![proptest_config(cases(CASES))]

    /// After stripping: no hop-by-hop header, no `Proxy-*` header, none that
    /// `Connection` names; `TE` only as `trailers`; every other header kept
    /// with all its values in order. Stripping again changes nothing.
    #[test]
    fn strip_removes_exactly_the_hop_by_hop_headers((pairs, connection) in headers()) {
        let mut h = build(&pairs, connection.as_deref());
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        let named: Vec<HeaderName> = connection
            .iter()
            .flatten()
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in &named {
            prop_assert!(!h.contains_key(n), "{} named by Connection survived", n);
        }
        for n in FIXED_HOP {
            prop_assert!(!h.contains_key(n), "{} survived", n);
        }
        prop_assert!(h.keys().all(|k| !k.as_str().starts_with("proxy-")));
        if let Some(te) = h.get(header::TE) {
            prop_assert!(te.as_bytes().eq_ignore_ascii_case(b"trailers"));
        }
        for name in before.keys() {
            let hop = FIXED_HOP.contains(&name.as_str())
                || name.as_str().starts_with("proxy-")
                || named.contains(name)
                || name == header::TE;
            if !hop {
                let want: Vec<_> = before.get_all(name).iter().collect();
                let got: Vec<_> = h.get_all(name).iter().collect();
                prop_assert_eq!(got, want, "{} changed", name);
            }
        }
        let once = h.clone();
        strip_hop_by_hop(&mut h);
        prop_assert_eq!(h, once);
    }

    /// The request path strips, then injects: the injected Authorization is
    /// always the one and only Authorization value, marked sensitive, even
    /// when the app's `Connection` header names `authorization`.
    #[test]
    fn injected_authorization_survives_stripping(
        (pairs, connection) in headers(),
        token in "[A-Za-z0-9._~+/-]{1,40}",
        names_authorization in any::<bool>(),
    ) {
        let mut connection = connection.unwrap_or_default();
        if names_authorization {
            connection.push("Authorization".into());
        }
        let mut h = build(&pairs, Some(&connection));
        let v = sensitive_token(&token);
        strip_hop_by_hop(&mut h);
        inject(&mut h, &v);
        let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        prop_assert_eq!(all, vec![&v]);
        prop_assert!(h[header::AUTHORIZATION].is_sensitive());
    }

    /// Arbitrary bytes in a `Connection` header never panic.
    #[test]
    fn strip_never_panics_on_odd_connection_values(raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&raw) {
            h.append(header::CONNECTION, v);
        }
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        prop_assert!(!h.contains_key(header::CONNECTION));
    }
}

/// RFC 9110 §5.3 allows a field to be sent as several lines; a header named
/// in a second `Connection` line must go too.
#[test]
fn strip_honours_every_connection_line() {
    let mut h = HeaderMap::new();
    h.append(header::CONNECTION, HeaderValue::from_static("close"));
    h.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
    h.append("x-hop", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    assert!(!h.contains_key("x-hop"), "x-hop survived: {h:?}");
}

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

const SECTIONS: [&str; 6] = ["proxy", "admin", "tokens", "upstream", "profiles", "routes"];

const KEYS: [&str; 48] = [
    "listen",
    "header_read_timeout",
    "idle_timeout",
    "max_header_bytes",
    "max_headers",
    "max_connections",
    "tls_timeout",
    "body_idle_timeout",
    "unmatched",
    "connect_allow",
    "drain_timeout",
    "allow_remote",
    "request_timeout",
    "default_lifetime",
    "refresh_fraction",
    "refresh_margin",
    "expiry_skew",
    "retry_initial",
    "retry_max",
    "retry_max_without_token",
    "unauthorized_refresh_interval",
    "connect_timeout",
    "response_timeout",
    "pool_idle_timeout",
    "replay_buffer",
    "token_url",
    "issuer",
    "client_id",
    "client_secret_file",
    "client_secret_env",
    "auth_method",
    "private_key_file",
    "key_id",
    "signing_alg",
    "client_assertion_file",
    "client_cert_file",
    "client_key_file",
    "scopes",
    "audience",
    "resources",
    "ca_file",
    "extra_params",
    "token_headers",
    "basic_encoding",
    "host",
    "upstream",
    "profile",
    "upstream_protocol",
];

/// A TOML value literal: mostly plausible, sometimes the wrong type.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "\"127.0.0.1:0\"",
            "\"0.0.0.0:9090\"",
            "\"[::1]:0\"",
            "\"deny\"",
            "\"passthrough\"",
            "\"10s\"",
            "\"0s\"",
            "\"25h\"",
            "\"1ms\"",
            "0.5",
            "1.5",
            "-1",
            "0",
            "99999999999",
            "true",
            "false",
            "[]",
            "[\"a\", \"b\"]",
            "[1, \"a\"]",
            "{ a = \"b\" }",
            "{ \"X-Client\" = \"x\" }",
            "{ \"bad header\" = \"x\" }",
            "\"https://idp.test/oauth2/token\"",
            "\"https://user:pw@idp.test/token\"",
            "\"http://idp.test/token\"",
            "\"https://api.test/v1/\"",
            "\"api.test\"",
            "\"*.example.com\"",
            "\"*.\"",
            "\"api.test:99999\"",
            "\"p\"",
            "\"q\"",
            "\"secret\"",
            "\"missing-file\"",
            "\"/dev/null\"",
            "\"client_secret_basic\"",
            "\"client_secret_post\"",
            "\"client_secret_jwt\"",
            "\"private_key_jwt\"",
            "\"tls_client_auth\"",
            "\"client_secret\"",
            "\"ES256\"",
            "\"form\"",
            "\"raw\"",
            "\"http2\"",
            "\"auto\"",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z0-9 .:/*_-]{0,20}".prop_map(|s| format!("\"{s}\"")),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

/// A syntactically valid TOML document built from the config's own
/// sections and keys with arbitrary values, plus an unknown key now and
/// then.
fn toml_document() -> impl Strategy<Value = (String, Vec<String>)> {
    let header = prop::sample::select(vec![
        "[proxy]",
        "[admin]",
        "[tokens]",
        "[upstream]",
        "[profiles.p]",
        "[profiles.q]",
        "[[routes]]",
        "[[routes]]",
        "[bogus]",
    ]);
    let key = prop_oneof![
        20 => prop::sample::select(KEYS.to_vec()),
        1 => Just("nonsense"),
    ];
    let body = prop::collection::btree_map(key, toml_value(), 0..8);
    prop::collection::vec((header, body), 0..7).prop_map(|sections| {
        let mut seen = Vec::new();
        let mut roots = Vec::new();
        let mut text = String::new();
        for (h, body) in sections {
            // A table may be defined once; arrays of tables repeat.
            if !h.starts_with("[[") {
                if seen.contains(&h) {
                    continue;
                }
                seen.push(h);
            }
            let root = h.trim_matches(['[', ']']).split('.').next().unwrap_or("");
            roots.push(root.to_owned());
            text.push_str(h);
            text.push('\n');
            for (k, v) in body {
                text.push_str(&format!("{k} = {v}\n"));
            }
            text.push('\n');
        }
        (text, roots)
    })
}

fn env_override() -> impl Strategy<Value = (String, String)> {
    (
        prop::sample::select(SECTIONS.to_vec()),
        prop::sample::select(KEYS.to_vec()),
        "[ -~]{0,16}",
    )
        .prop_map(|(s, k, v)| {
            (
                format!("TOKEN_INJECTOR_{}__{}", s.to_uppercase(), k.to_uppercase()),
                v,
            )
        })
}

/// The first segment of a problem's key: `profiles.p.client_id` →
/// `profiles`, `routes[0].host` → `routes`.
fn key_root(key: &str) -> &str {
    key.split(['.', '[']).next().unwrap_or("")
}

fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    dir
}

proptest! {
    #![proptest_config(cases(CASES))]

    /// Any text at all never panics, and every problem names a key (the
    /// pseudo-key `(config)` for text that is not TOML) with a message.
    #[test]
    fn config_arbitrary_text_never_panics(text in prop_oneof![
        "\\PC{0,200}",
        "(\\[[a-z.]{0,12}\\]\n)?([a-z_]{1,12} = [\"a-z0-9\\[\\]{}=., ]{0,16}\n){0,6}",
    ]) {
        let dir = config_dir();
        if let Err(e) = config::from_text(&text, dir.path(), Vec::<(String, String)>::new()) {
            let config::Error::Invalid(problems) = e else {
                return Err(TestCaseError::fail(format!("not a validation error: {e}")));
            };
            prop_assert!(!problems.is_empty());
            for p in &problems {
                prop_assert!(!p.key.is_empty(), "{p:?}");
                prop_assert!(!p.message.is_empty(), "{p:?}");
            }
        }
    }

    /// Valid TOML over the config's own vocabulary, with environment
    /// overrides: never panics, and every problem names a key under a
    /// section of the document or of the config.
    #[test]
    fn config_problems_name_a_key(
        (text, roots) in toml_document(),
        env in prop::collection::vec(env_override(), 0..3),
    ) {
        let dir = config_dir();
        match config::from_text(&text, dir.path(), env.clone()) {
            Ok(c) => {
                prop_assert!(c.admin.allow_remote || c.admin.listen.ip().is_loopback());
            }
            Err(config::Error::Invalid(problems)) => {
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    let root = key_root(&p.key);
                    prop_assert!(
                        SECTIONS.contains(&root) || roots.iter().any(|r| r == root),
                        "problem does not name a key: {p:?}\n--- text\n{text}\n--- env {env:?}"
                    );
                    prop_assert!(!p.message.is_empty(), "{p:?}");
                }
            }
            Err(e) => return Err(TestCaseError::fail(format!("not a validation error: {e}"))),
        }
    }
}

const MINIMAL: &str = r#"
[proxy]
listen = "127.0.0.1:0"

[profiles.p]
token_url = "https://idp.test/token"
client_id = "c"
client_secret_file = "secret"

[[routes]]
host = "api.test"
profile = "p"
"#;

proptest! {
    #![proptest_config(cases(64))]

    /// The admin listener takes a non-loopback address only with
    /// `admin.allow_remote = true`, whether the address comes from the file
    /// or from `TOKEN_INJECTOR_ADMIN__LISTEN`; the refusal names the key.
    #[test]
    fn admin_listen_is_loopback_unless_allow_remote(
        ip in prop_oneof![
            any::<[u8; 4]>().prop_map(std::net::IpAddr::from),
            any::<[u16; 8]>().prop_map(std::net::IpAddr::from),
            Just(std::net::IpAddr::from([127, 0, 0, 1])),
            Just(std::net::IpAddr::from([127, 9, 9, 9])),
            Just(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
            Just(std::net::IpAddr::from([0, 0, 0, 0])),
        ],
        port in 1u16..,
        allow_remote in prop::option::of(any::<bool>()),
        from_env in any::<bool>(),
    ) {
        let addr = std::net::SocketAddr::new(ip, port);
        let mut text = MINIMAL.to_owned();
        let mut env = Vec::new();
        if from_env {
            env.push(("TOKEN_INJECTOR_ADMIN__LISTEN".to_owned(), addr.to_string()));
        }
        text.push_str("\n[admin]\n");
        if !from_env {
            text.push_str(&format!("listen = \"{addr}\"\n"));
        }
        if let Some(a) = allow_remote {
            text.push_str(&format!("allow_remote = {a}\n"));
        }
        let dir = config_dir();
        let allowed = ip.is_loopback() || allow_remote == Some(true);
        match config::from_text(&text, dir.path(), env) {
            Ok(c) => {
                prop_assert!(allowed, "{addr} accepted without allow_remote");
                prop_assert_eq!(c.admin.listen, addr);
            }
            Err(e) => {
                let lines = e.lines();
                prop_assert!(!allowed, "{addr} refused: {lines:?}");
                prop_assert!(lines.len() == 1 && lines[0].starts_with("admin.listen: "), "{lines:?}");
            }
        }
    }
}

/// A listing of problems for one well-known bad document, as a fixed point
/// for the generated cases above: every line starts with its key.
#[test]
fn config_problem_lines_start_with_their_key() {
    let dir = config_dir();
    let text = r#"
[proxy]
listen = "nope"
[admin]
listen = "0.0.0.0:9090"
[profiles.p]
token_url = "http://idp.test/token"
client_id = "c"
client_secret_file = "secret"
auth_method = "client_secret"
[[routes]]
host = "*."
profile = "missing"
"#;
    let e = config::from_text(text, dir.path(), Vec::<(String, String)>::new()).unwrap_err();
    let lines = e.lines();
    let keys: BTreeMap<&str, usize> = lines.iter().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(key_root(l.split(':').next().unwrap())).or_default() += 1;
        m
    });
    for line in &lines {
        let root = key_root(line.split(':').next().unwrap());
        assert!(SECTIONS.contains(&root), "{line}");
    }
    for want in ["proxy", "admin", "profiles", "routes"] {
        assert!(
            keys.contains_key(want),
            "no problem under {want}: {lines:?}"
        );
    }
}

/// A request head made of header lines, some of which may be the framing
/// headers or end in a bare LF.
fn request_head() -> impl Strategy<Value = (Vec<u8>, bool, bool)> {
    let line = prop_oneof![
        Just(("Content-Length: 4".to_string(), 1u8)),
        Just(("transfer-encoding: chunked".to_string(), 2u8)),
        "[A-Za-z-]{1,20}: [ -~]{0,30}".prop_map(|l| (l, 0u8)),
    ];
    (proptest::collection::vec((line, any::<bool>()), 0..12)).prop_map(|lines| {
        let mut head = b"POST / HTTP/1.1\r\n".to_vec();
        let (mut cl, mut te, mut bare) = (false, false, false);
        for ((text, kind), lf_only) in lines {
            // Names that only look like the framing headers do not count.
            let lower = text.to_ascii_lowercase();
            cl |= kind == 1 || lower.starts_with("content-length:");
            te |= kind == 2 || lower.starts_with("transfer-encoding:");
            bare |= lf_only;
            head.extend_from_slice(text.as_bytes());
            head.extend_from_slice(if lf_only { b"\n" } else { b"\r\n" });
        }
        head.extend_from_slice(b"\r\n");
        (head, cl && te, bare)
    })
}

proptest! {
    #![proptest_config(cases(256))]

    /// The wire-level head check finds both framings and bare LF however
    /// the head is split across reads, and nothing else.
    #[test]
    fn head_scan_verdict_is_split_invariant((head, both, bare) in request_head(), split in any::<prop::sample::Index>()) {
        use token_injector::head::{Fed, Refusal, Scan};
        let want = if both {
            Some(Refusal::ContentLengthWithTransferEncoding)
        } else if bare {
            Some(Refusal::BareLf)
        } else {
            None
        };
        prop_assert_eq!(Scan::new().feed(&head), Fed::Ended(want));
        let at = split.index(head.len());
        let mut s = Scan::new();
        let first = s.feed(&head[..at]);
        let verdict = match first {
            Fed::Ended(v) => v,
            Fed::More => match s.feed(&head[at..]) {
                Fed::Ended(v) => v,
                Fed::More => panic!("head did not end"),
            },
        };
        prop_assert_eq!(verdict, want);
    }

    /// Arbitrary bytes never panic the head check.
    #[test]
    fn head_scan_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = token_injector::head::Scan::new().feed(&bytes);
    }
}
