//! The pooled upstream client: hyper-util's client over rustls, keep-alive
//! and TLS session resumption, web PKI roots plus a route's `ca_file`.
//! Routes with the same trust and protocol share one pool.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{self, UpstreamProtocol};

use super::Body;

pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Body>;

/// One client per distinct (CA file, protocol).
#[derive(Default)]
pub struct Pools {
    clients: HashMap<(Option<PathBuf>, UpstreamProtocol), HttpsClient>,
}

impl Pools {
    /// The client for this trust and protocol, built on first use.
    pub fn get(
        &mut self,
        ca_file: Option<&PathBuf>,
        protocol: UpstreamProtocol,
        settings: &config::Upstream,
    ) -> Result<HttpsClient, crate::tls::Error> {
        let key = (ca_file.cloned(), protocol);
        if let Some(c) = self.clients.get(&key) {
            return Ok(c.clone());
        }
        let client = build(ca_file.map(|p| p.as_path()), protocol, settings)?;
        self.clients.insert(key, client.clone());
        Ok(client)
    }
}

fn build(
    ca_file: Option<&std::path::Path>,
    protocol: UpstreamProtocol,
    settings: &config::Upstream,
) -> Result<HttpsClient, crate::tls::Error> {
    let tls = crate::tls::client_config(ca_file, &[])?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // https_or_http: routes always use https (validated); plain http is only
    // for `unmatched = "passthrough"`, which sends no token.
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = match protocol {
        UpstreamProtocol::Auto => builder.enable_all_versions().wrap_connector(http),
        UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
        UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
    };
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        // The proxy sets Host itself, to the upstream's authority.
        .set_host(false);
    if protocol == UpstreamProtocol::Http2 {
        client.http2_only(true);
    }
    Ok(client.build(connector))
}
