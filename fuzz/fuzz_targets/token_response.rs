//! Token endpoint answers: any status, any body, any clock. Parsing never
//! panics; a success is 2xx with a header-safe token living at most 24 h;
//! an error keeps the status.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use token_injector::token::FetchError;
use token_injector::token::response::{MAX_LIFETIME, parse};

fuzz_target!(|data: &[u8]| {
    if data.len() < 14 {
        return;
    }
    let (head, body) = data.split_at(14);
    let status = u16::from_le_bytes([head[0], head[1]]);
    let now = u64::from_le_bytes(head[2..10].try_into().unwrap());
    let default = Duration::from_secs(u64::from(u32::from_le_bytes(
        head[10..14].try_into().unwrap(),
    )));
    // Half the runs as a success, so the body is looked at closely.
    let status = if status & 1 == 0 { 200 } else { status };
    match parse(status, body, None, now, default) {
        Ok(p) => {
            assert!((200..300).contains(&status));
            assert!(p.lifetime <= MAX_LIFETIME.max(default));
            assert!(p.lifetime <= MAX_LIFETIME);
            let t = p.access_token.expose();
            assert!(!t.is_empty());
            assert!(t.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            assert!(!format!("{p:?}").contains(t) || t.len() < 4);
        }
        Err(FetchError::Rejected { status: s, .. }) => {
            assert_eq!(s, status);
            assert!(!(200..300).contains(&status));
        }
        Err(FetchError::InvalidResponse(_)) => assert!((200..300).contains(&status)),
        Err(other) => panic!("parse made a transport error: {other:?}"),
    }
});
