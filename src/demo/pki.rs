//! TLS for the demo's two servers: the per-run CA and its one leaf (rcgen),
//! the rustls server settings both servers share, and [`serve_tls`], the
//! accept loop that serves a handler over them (tokio-rustls). The only file
//! of the demo that uses those two crates.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Answer, Error, setup};

/// The per-run CA and the servers' TLS settings.
pub(super) struct Pki {
    pub(super) ca_pem: String,
    pub(super) server: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub(super) fn new() -> Result<Self, Error> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let ca_err = |e: rcgen::Error| setup("cannot make the demo CA", e);
        let leaf_err = |e: rcgen::Error| setup("cannot make the demo certificate", e);
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca_err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "token-injector demo CA (this run only)",
        );
        let ca_key = KeyPair::generate().map_err(ca_err)?;
        let issuer = CertifiedIssuer::self_signed(params, ca_key).map_err(ca_err)?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(leaf_err)?;
        let leaf_key = KeyPair::generate().map_err(leaf_err)?;
        let cert = leaf.signed_by(&leaf_key, &issuer).map_err(leaf_err)?;
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
            .map_err(|e| setup("cannot use the demo key", e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.der().clone()], key_der)
            })
            .map_err(|e| setup("TLS setup failed", e))?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            ca_pem: issuer.pem(),
            server: Arc::new(server),
        })
    }
}

/// Returns once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here.
    let _ = stop.wait_for(|s| *s).await.map(drop);
}

/// Serves HTTP/1.1 and HTTP/2 over TLS on `listener` until `stop` turns
/// true (or its sender is gone), then drops every connection.
pub(super) async fn serve_tls<F, Fut>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: F,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let acceptor = acceptor.clone();
                    let handler = handler.clone();
                    conns.spawn(async move {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        let svc = service_fn(move |req| {
                            let handler = handler.clone();
                            async move { Ok::<_, Infallible>(handler(req).await) }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    conns.shutdown().await;
}
