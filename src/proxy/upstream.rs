//! Upstream connections: the connector (TCP, then TLS with the route's
//! trust, ALPN and client certificate, under one time bound) and one pool
//! per distinct (CA file, protocol, client certificate). Web PKI roots plus
//! a route's `ca_file`; TLS session resumption (not with a client
//! certificate: see [`crate::tls::client_config_rotating`]). ALPN offers h2
//! and http/1.1 unless the route forces one. Routes with the same trust,
//! protocol and client certificate share one pool; a different client
//! certificate never shares a connection. The pool itself is
//! [`super::pool`].

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{self, ClientCert, UpstreamProtocol};

use super::pool::{self, Client};

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

impl Connector {
    /// The bound on TCP connect plus TLS handshake.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
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
                Ok(result) => result.map(Stream),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("TCP connect and TLS handshake took longer than {limit:?}"),
                )) as BoxError),
            }
        })
    }
}

/// An upstream connection, plain (passthrough to `http://`) or TLS.
pub struct Stream(MaybeHttpsStream<TokioIo<TcpStream>>);

impl Stream {
    /// Whether ALPN chose HTTP/2.
    pub fn is_h2(&self) -> bool {
        match &self.0 {
            MaybeHttpsStream::Http(_) => false,
            MaybeHttpsStream::Https(s) => s.inner().get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Why a pool could not be built, by the route key at fault.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Trust(crate::tls::Error),
    #[error(transparent)]
    ClientCert(crate::tls::Error),
}

impl PoolError {
    /// The route key to name in the error.
    pub fn key(&self) -> &'static str {
        match self {
            PoolError::Trust(_) => "ca_file",
            PoolError::ClientCert(_) => "client_cert_file",
        }
    }

    pub fn into_tls(self) -> crate::tls::Error {
        match self {
            PoolError::Trust(e) | PoolError::ClientCert(e) => e,
        }
    }
}

type PoolKey = (Option<PathBuf>, UpstreamProtocol, Option<ClientCert>);

/// One client per distinct (CA file, protocol, client certificate).
#[derive(Default)]
pub struct Pools {
    clients: HashMap<PoolKey, Client>,
}

impl Pools {
    /// The client for this trust, protocol and identity, built on first use.
    pub fn get(
        &mut self,
        ca_file: Option<&PathBuf>,
        protocol: UpstreamProtocol,
        client_cert: Option<&ClientCert>,
        settings: &config::Upstream,
    ) -> Result<Client, PoolError> {
        let key = (ca_file.cloned(), protocol, client_cert.cloned());
        if let Some(c) = self.clients.get(&key) {
            return Ok(c.clone());
        }
        let client = build(
            ca_file.map(|p| p.as_path()),
            protocol,
            client_cert,
            settings,
        )?;
        self.clients.insert(key, client.clone());
        Ok(client)
    }
}

fn build(
    ca_file: Option<&std::path::Path>,
    protocol: UpstreamProtocol,
    client_cert: Option<&ClientCert>,
    settings: &config::Upstream,
) -> Result<Client, PoolError> {
    let mut tls = match client_cert {
        None => crate::tls::client_config(ca_file, &[]).map_err(PoolError::Trust)?,
        Some(c) => {
            let identity = crate::tls::RotatingIdentity::load(&c.cert_file, &c.key_file)
                .map_err(PoolError::ClientCert)?;
            crate::tls::client_config_rotating(ca_file, Arc::new(identity))
                .map_err(PoolError::Trust)?
        }
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // ALPN: what the route allows. hyper-util reads the negotiated protocol
    // and speaks h2 on the connection when the server picked it. Offering
    // `http/1.1` alone (rather than nothing) lets servers that insist on
    // ALPN accept a route forced to HTTP/1.1.
    tls.alpn_protocols = match protocol {
        UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
    };
    // Not https-only: routes always use https (validated); plain http is
    // only for `unmatched = "passthrough"`, which sends no token.
    let inner = HttpsConnector::from((http, Arc::new(tls)));
    let connector = Connector {
        inner,
        limit: settings.connect_timeout + settings.tls_timeout,
    };
    let settings = pool::Settings {
        protocol: match protocol {
            UpstreamProtocol::Auto => pool::Protocol::Auto,
            UpstreamProtocol::Http1 => pool::Protocol::Http1,
            UpstreamProtocol::Http2 => pool::Protocol::Http2,
        },
        idle_timeout: settings.pool_idle_timeout,
        // On HTTP/1-only pools the proxy sets Host itself, to the upstream's
        // authority. A pool that may speak HTTP/2 leaves it to the pool,
        // which adds Host on HTTP/1 connections only: over HTTP/2 the
        // authority is `:authority`.
        set_host: protocol != UpstreamProtocol::Http1,
        max_header_bytes: settings.max_header_bytes,
        read_buffer_bytes: settings.read_buffer_bytes,
    };
    Ok(Client::new(connector, settings))
}
