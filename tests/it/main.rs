//! The in-process end-to-end tests, one binary: each module starts the
//! proxy (or calls the library) inside the test process. Tests that run the
//! built `token-injector` binary as a child live in `tests/bin/`.

mod support;

mod alerts;
mod broken_upstreams;
mod connect;
mod credentials;
mod docs_reference;
mod dpop;
mod dpop_proxy;
mod dpop_server;
mod google;
mod google_wif;
mod grants;
mod grpc;
mod hostile_requests;
mod hostile_tokens;
mod interop;
mod interop_dpop;
mod interop_grants;
mod limits;
mod ops;
mod pool;
mod properties;
mod proxy;
mod reload;
mod streaming;
mod upstream_h2;
mod upstream_mtls;
mod websocket;
