//! The tests that run the built `token-injector` binary as a child process
//! (`env!("CARGO_BIN_EXE_token-injector")`), one binary. The in-process
//! end-to-end tests live in `tests/it/`, whose fixtures this binary shares.

// Only part of the fixtures serve the tests here.
#[allow(dead_code)]
#[path = "../it/support/mod.rs"]
mod support;

mod cli;
mod core_dumps;
mod demo;
mod deploy;
mod fleet;
mod logs;
mod reload;
