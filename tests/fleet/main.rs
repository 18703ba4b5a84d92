//! The fleet tests: proxy instances in this process sharing tokens through
//! a real `redis-server` / `redis-sentinel` started on 127.0.0.1. A binary
//! of their own, so that twenty instances do not weigh on the memory and
//! timing measurements of the other in-process tests (tests/it), whose
//! fixtures this binary shares.

// Only part of the fixtures serve the tests here.
#[allow(dead_code)]
#[path = "../it/support/mod.rs"]
mod support;

mod shared_cache;
