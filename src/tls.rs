//! TLS client settings shared by the upstream pool and the token client:
//! web PKI roots plus an optional extra CA file, the ring provider, and
//! verification that is never turned off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificates { path: PathBuf },
    #[error("{path} is not a valid PEM certificate file: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("certificate in {path} was refused as a trust root: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error("client certificate {cert} and key {key} do not belong together: {reason}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads every certificate of a PEM file; an empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let data = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Web PKI roots plus the certificates of `ca_file`, if any.
pub fn root_store(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|e| Error::Root {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        }
    }
    Ok(roots)
}

/// The crypto provider everywhere in this program.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client certificate chain and its key, read from PEM files.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Reads a client certificate and key and checks that they match.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, Error> {
    let certs = load_certs(cert)?;
    let data = zeroize::Zeroizing::new(std::fs::read(key).map_err(|source| Error::Read {
        path: key.to_owned(),
        source,
    })?);
    let key_der = PrivateKeyDer::from_pem_slice(&data).map_err(|_| Error::NoKey {
        path: key.to_owned(),
    })?;
    let identity = Identity {
        certs,
        key: key_der,
    };
    // Building a config checks that the key fits the certificate.
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(identity.certs.clone(), identity.key.clone_key())
        .map_err(|e| Error::Identity {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(identity)
}

/// A client config trusting `ca_file` beside the web PKI, offering `alpn`.
pub fn client_config(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, Error> {
    client_config_with(ca_file, alpn, None)
}

/// As [`client_config`], presenting `identity` when the server asks.
pub fn client_config_with(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
    identity: Option<Identity>,
) -> Result<rustls::ClientConfig, Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_file)?);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.certs, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
