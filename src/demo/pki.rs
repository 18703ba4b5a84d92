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

/// A certificate authority made for one run, issuing leaves for local
/// servers. The demo uses one; the end-to-end tests' fixtures use the same
/// (tests/it/support), so the two cannot drift apart.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pem: String,
}

/// A leaf certificate and its key, in DER and PEM.
pub struct Leaf {
    pub cert: rustls::pki_types::CertificateDer<'static>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A new CA named `common_name`, allowed to issue leaves only.
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let pem = issuer.pem();
        Ok(Self { issuer, pem })
    }

    /// The CA certificate, PEM: what clients trust.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf for `names` (DNS names or IP addresses) with a fresh key.
    pub fn leaf(&self, names: &[&str]) -> Result<Leaf, rcgen::Error> {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: key_der,
        })
    }

    /// Server settings with a leaf for `names`, offering `alpn`, asking no
    /// client certificate.
    pub fn server_config(
        &self,
        names: &[&str],
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let leaf = self.leaf(names).map_err(|e| e.to_string())?;
        let mut server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![leaf.cert], leaf.key)
            })
            .map_err(|e| e.to_string())?;
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(server))
    }
}

/// The per-run CA and the servers' TLS settings.
pub(super) struct Pki {
    pub(super) ca_pem: String,
    pub(super) server: Arc<rustls::ServerConfig>,
}

impl Pki {
    pub(super) fn new() -> Result<Self, Error> {
        let ca = Ca::new("token-injector demo CA (this run only)")
            .map_err(|e| setup("cannot make the demo CA", e))?;
        let server = ca
            .server_config(&["localhost", "127.0.0.1"], &[b"h2", b"http/1.1"])
            .map_err(|e| setup("cannot make the demo certificate", e))?;
        Ok(Self {
            ca_pem: ca.pem().to_owned(),
            server,
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
                    // Small request/response exchanges: without it a token
                    // request can wait ~40 ms on delayed ACKs.
                    let _ = stream.set_nodelay(true);
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
