//! Request headers, one `name: value` per line. Stripping never panics and
//! leaves no hop-by-hop header, no `Proxy-*` header and none the
//! `Connection` header names; the Authorization injected afterwards is the
//! only one.
#![no_main]

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use token_injector::proxy::headers::{inject, strip_hop_by_hop};

fuzz_target!(|data: &[u8]| {
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(value[1..].trim_ascii()),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    // Every Connection line names headers to remove.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    strip_hop_by_hop(&mut h);
    for n in &named {
        assert!(!h.contains_key(n), "{n} named by Connection survived");
    }
    for n in [
        "connection",
        "keep-alive",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(!h.contains_key(n), "{n} survived");
    }
    assert!(h.keys().all(|k| !k.as_str().starts_with("proxy-")));
    if let Some(te) = h.get(header::TE) {
        assert!(te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    }
    let once = h.clone();
    strip_hop_by_hop(&mut h);
    assert_eq!(h, once);
    let mut token = HeaderValue::from_static("Bearer fuzz");
    token.set_sensitive(true);
    inject(&mut h, &token);
    let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
    assert_eq!(all, vec![&token]);
});
