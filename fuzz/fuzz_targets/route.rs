//! Route patterns and request hosts. The first line holds comma-separated
//! patterns, each further line a host as a request may carry it. Parsing
//! never panics; a parsed pattern prints back to itself; lookup gives the
//! same answer for a host and its normal form; a wildcard never matches
//! its apex.
#![no_main]

use libfuzzer_sys::fuzz_target;
use token_injector::route::{Pattern, Table, normalize, split_host_port};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    let patterns: Vec<Pattern> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|p| Pattern::parse(p).ok())
        .collect();
    for p in &patterns {
        assert_eq!(Pattern::parse(&p.to_string()).as_ref(), Ok(p));
    }
    let table = Table::new(&patterns);
    for (i, line) in lines.enumerate() {
        let port = 443u16.wrapping_add(i as u16);
        let (host, port) = match split_host_port(line) {
            Some((h, Some(p))) => (h, p),
            Some((h, None)) => (h, port),
            None => (line, port),
        };
        let found = table.lookup(host, port);
        let normal = normalize(host);
        if !host.ends_with("..") {
            // One trailing dot is stripped; `x..` is refused before routing.
            assert_eq!(normalize(&normal), normal);
            assert_eq!(table.lookup(&normal, port), found);
        }
        if let Some(i) = found {
            let p = &patterns[i];
            assert!(p.port().is_none_or(|pp| pp == port));
            if p.is_wildcard() {
                let suffix = &p.to_string()[2..];
                let suffix = suffix.split(':').next().unwrap_or(suffix);
                let n = normal.strip_suffix('.').unwrap_or(&normal);
                assert!(n.len() > suffix.len() + 1 && n.ends_with(&format!(".{suffix}")));
            }
        }
    }
});
