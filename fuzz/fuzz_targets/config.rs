//! Config text and environment overrides: validation never panics and
//! every problem names a key. The input is TOML, then optionally a NUL
//! byte and `NAME=value` lines as the environment.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use token_injector::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Validation reads the files a config names; keep the fuzzer away from
    // device and kernel files (an endless /dev/zero is not a finding).
    // Relative paths resolve under a directory that does not exist, so
    // `../` cannot climb out of it.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    let (toml, env) = text.split_once('\0').unwrap_or((text, ""));
    let env: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let base = Path::new("/nonexistent-token-injector-fuzz");
    match config::from_text(toml, base, env) {
        Ok(c) => assert!(c.admin.allow_remote || c.admin.listen.ip().is_loopback()),
        Err(config::Error::Invalid(problems)) => {
            assert!(!problems.is_empty());
            for p in problems {
                assert!(!p.key.is_empty(), "{p:?}");
                assert!(!p.message.is_empty(), "{p:?}");
            }
        }
        Err(e) => panic!("not a validation error: {e}"),
    }
});
