//! The pooled upstream client: hyper-util's client over rustls, keep-alive
//! and TLS session resumption, web PKI roots plus a route's `ca_file`.
//! Routes with the same trust and protocol share one pool.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{self, UpstreamProtocol};

use super::Body;

pub type HttpsClient = Client<Connector, Body>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The HTTPS connector with one bound on TCP connect plus TLS handshake. A
/// server that accepts TCP and never finishes the handshake would otherwise
/// hold the request until `upstream.response_timeout`. Runs once per new
/// upstream connection, not per request.
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<HttpConnector>,
    limit: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TCP connect and TLS handshake took longer than {limit:?}"),
                )) as BoxError),
            }
        })
    }
}

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
    let inner = match protocol {
        UpstreamProtocol::Auto => builder.enable_all_versions().wrap_connector(http),
        UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
        UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
    };
    let connector = Connector {
        inner,
        limit: settings.connect_timeout + settings.tls_timeout,
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
