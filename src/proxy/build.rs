//! The request path of a config: routes with their upstream pools and
//! credential, the route table, the passthrough pool and the tunnel policy,
//! built once per config (never per request) and swapped in whole.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, Config};
use crate::metrics::{ProxyMetrics, TokenMetrics};
use crate::{route, tls, token};

use super::{Proxy, Route, Settings, authorize, dpop, tunnel, upstream};

/// A route's upstream TLS settings that do not load.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {source}")]
pub struct Error {
    /// The config key at fault (`routes[2].client_cert_file`).
    pub key: String,
    pub source: tls::Error,
}

impl Proxy {
    /// Builds the request path of `config`; `stores` holds the store of
    /// every profile a route uses.
    pub fn build(
        config: &Config,
        stores: &BTreeMap<String, Arc<token::Store>>,
        metrics: &ProxyMetrics,
        token_metrics: &TokenMetrics,
    ) -> Result<Self, Error> {
        let mut pools = upstream::Pools::default();
        let mut pool = |key: String,
                        ca: Option<&std::path::PathBuf>,
                        protocol,
                        cert: Option<&config::ClientCert>| {
            pools
                .get(ca, protocol, cert, &config.upstream)
                .map_err(|e| Error {
                    key: format!("{key}{}", e.key()),
                    source: e.into_tls(),
                })
        };
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let key = format!("routes[{i}].");
            let cert = r.client_cert.as_ref();
            let client = pool(key.clone(), r.ca_file.as_ref(), r.protocol, cert)?;
            // Upgrades (WebSocket) exist only in HTTP/1.1: a pool that
            // speaks HTTP/1.1 alone, with the route's trust and identity.
            let upgrade_client = match r.protocol {
                config::UpstreamProtocol::Http1 => client.clone(),
                _ => pool(
                    key,
                    r.ca_file.as_ref(),
                    config::UpstreamProtocol::Http1,
                    cert,
                )?,
            };
            let route = Route::new(
                r.label.clone(),
                &r.upstream,
                Arc::clone(&stores[&r.profile]),
                client,
                metrics.route(&r.label),
            );
            let dpop = config
                .profiles
                .get(&r.profile)
                .is_some_and(|p| p.dpop.is_some());
            let route = if dpop {
                // Per route: each upstream has its own nonce and clock.
                route.with_authorize(dpop::Dpop::new(&r.label, token_metrics.dpop(&r.profile)))
            } else {
                route.with_authorize(authorize::Header::new(r.header.clone(), &r.prefix))
            };
            routes.push(
                route
                    .with_upgrade_client(upgrade_client)
                    .with_protocol(r.protocol),
            );
        }
        let passthrough = pools
            .get(None, config::UpstreamProtocol::Auto, None, &config.upstream)
            .map_err(|e| Error {
                key: "proxy".into(),
                source: e.into_tls(),
            })?;
        let settings = Settings {
            unmatched: config.proxy.unmatched,
            response_timeout: config.upstream.response_timeout,
            // A fetch under way ends within the request timeout; allow a little more.
            token_wait: config.tokens.request_timeout + Duration::from_millis(500),
            replay_buffer: config.upstream.replay_buffer,
        };
        let table = route::Table::new(config.routes.iter().map(|r| &r.host));
        Ok(
            Proxy::new(routes, table, settings, passthrough, metrics.route("-"))
                .with_tunnels(tunnel::Tunnels::new(config, metrics.tunnels.clone())),
        )
    }
}
