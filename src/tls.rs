//! TLS client settings shared by the upstream pool and the token client:
//! web PKI roots plus an optional extra CA file, the ring provider, and
//! verification that is never turned off. Client certificates for mutual
//! TLS to upstreams come from [`RotatingIdentity`], which follows the files
//! as they are rotated.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::secret::FileStamp;
use zeroize::Zeroizing;

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

/// A client certificate chain and its key, read from PEM files. The key is
/// zeroed when dropped and never printed.
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: Zeroizing<PrivateKeyDer<'static>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.certs.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl Error {
    /// Whether the problem lies with the private key file rather than the
    /// certificate (for naming the config key).
    pub fn is_about_key(&self, key: &Path) -> bool {
        match self {
            Error::NoKey { path } | Error::Read { path, .. } => path == key,
            _ => false,
        }
    }
}

/// Reads a client certificate and key and checks that they match.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, Error> {
    let certs = load_certs(cert)?;
    let data = Zeroizing::new(std::fs::read(key).map_err(|source| Error::Read {
        path: key.to_owned(),
        source,
    })?);
    let key_der =
        Zeroizing::new(
            PrivateKeyDer::from_pem_slice(&data).map_err(|_| Error::NoKey {
                path: key.to_owned(),
            })?,
        );
    let identity = Identity {
        certs,
        key: key_der,
    };
    identity.certified(cert, key)?;
    Ok(identity)
}

impl Identity {
    /// The signing form rustls uses; fails unless the key fits the
    /// certificate.
    fn certified(&self, cert: &Path, key: &Path) -> Result<CertifiedKey, Error> {
        CertifiedKey::from_der(self.certs.clone(), self.key.clone_key(), &provider()).map_err(|e| {
            Error::Identity {
                cert: cert.to_owned(),
                key: key.to_owned(),
                reason: e.to_string(),
            }
        })
    }
}

/// The RFC 8705 §3.1 thumbprint of a certificate: base64url (no padding)
/// of the SHA-256 of its DER, as in a token's `cnf.x5t#S256`. Public data.
pub fn thumbprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

type Stamp = (Option<FileStamp>, Option<FileStamp>);

/// A client certificate and key from files, presented when an upstream asks
/// for one. At each full handshake (a new upstream connection, never per
/// request) the files' metadata is compared with what was loaded; when it
/// changed, both are read again. A pair that does not load (a rotation
/// caught half-way, a missing file) is logged once and the previous
/// certificate stays in use.
pub struct RotatingIdentity {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    stamp: Stamp,
    current: Arc<CertifiedKey>,
    /// The stamp of a pair that failed to load, so it is not retried (and
    /// logged) at every handshake until the files change again.
    failed: Option<Stamp>,
}

impl RotatingIdentity {
    /// Loads the pair now; an error here is a configuration error.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        let stamp = (FileStamp::of(cert), FileStamp::of(key));
        let current = Arc::new(load_identity(cert, key)?.certified(cert, key)?);
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: Mutex::new(Loaded {
                stamp,
                current,
                failed: None,
            }),
        })
    }

    /// The certificate to present now, re-read first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        // Stat before reading: a change during the read shows up as a
        // different stamp next time, never as a missed one.
        let stamp = (FileStamp::of(&self.cert), FileStamp::of(&self.key));
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if stamp == state.stamp || Some(stamp) == state.failed {
            return Arc::clone(&state.current);
        }
        let loaded =
            load_identity(&self.cert, &self.key).and_then(|id| id.certified(&self.cert, &self.key));
        match loaded {
            Ok(key) => {
                let thumbprint = key.end_entity_cert().map(thumbprint).unwrap_or_default();
                tracing::info!(
                    cert = %self.cert.display(),
                    x5t_s256 = %thumbprint,
                    "upstream client certificate changed on disk; new connections present the new one"
                );
                *state = Loaded {
                    stamp,
                    current: Arc::new(key),
                    failed: None,
                };
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot reload the upstream client certificate; still presenting the previous one"
                );
                state.failed = Some(stamp);
            }
        }
        Arc::clone(&state.current)
    }
}

impl fmt::Debug for RotatingIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingIdentity")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ResolvesClientCert for RotatingIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
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
        Some(id) => builder.with_client_auth_cert(id.certs.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client config for mutual TLS whose certificate follows its files.
/// Session resumption is off: a resumed TLS 1.3 session carries the
/// identity of the connection that made the ticket, so after a rotation
/// the upstream would keep seeing the old certificate. Upstream connections
/// are pooled, so full handshakes stay rare.
pub fn client_config_rotating(
    ca_file: Option<&Path>,
    identity: Arc<RotatingIdentity>,
) -> Result<rustls::ClientConfig, Error> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_file)?)
        .with_client_cert_resolver(identity);
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![format!("{name}.test")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, key.serialize_pem())
    }

    fn presented(id: &RotatingIdentity) -> String {
        thumbprint(id.current().end_entity_cert().unwrap())
    }

    #[test]
    fn rotating_identity_follows_the_files_and_keeps_the_last_good_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (a_crt, a_key, key_pem) = pair(dir.path(), "a");
        let (b_crt, b_key, _) = pair(dir.path(), "b");
        let (live_crt, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
        std::fs::copy(&a_crt, &live_crt).unwrap();
        std::fs::copy(&a_key, &live_key).unwrap();
        let thumb = |p: &Path| thumbprint(&load_certs(p).unwrap()[0]);

        let id = RotatingIdentity::load(&live_crt, &live_key).unwrap();
        assert_eq!(presented(&id), thumb(&a_crt));
        // Unchanged files: the loaded key is handed out again, not re-read.
        assert!(Arc::ptr_eq(&id.current(), &id.current()));

        // Replaced by rename (a new inode), as a Secret volume update does.
        let tmp = dir.path().join("tmp");
        std::fs::copy(&b_crt, &tmp).unwrap();
        std::fs::rename(&tmp, &live_crt).unwrap();
        // Half-way: B's certificate with A's key is refused, A stays.
        assert_eq!(presented(&id), thumb(&a_crt));
        std::fs::copy(&b_key, &tmp).unwrap();
        std::fs::rename(&tmp, &live_key).unwrap();
        assert_eq!(presented(&id), thumb(&b_crt));

        // A missing file keeps the last good pair too.
        std::fs::remove_file(&live_key).unwrap();
        assert_eq!(presented(&id), thumb(&b_crt));

        // Neither Debug form shows key material.
        let shown = format!("{id:?} {:?}", load_identity(&a_crt, &a_key).unwrap());
        let body = key_pem.lines().nth(1).unwrap();
        assert!(
            !shown.contains(body) && shown.contains("[redacted]"),
            "{shown}"
        );
    }

    #[test]
    fn thumbprint_is_base64url_sha256_of_the_der() {
        let der = CertificateDer::from(b"not really a certificate".to_vec());
        // printf 'not really a certificate' | openssl dgst -sha256 -binary | basenc --base64url
        assert_eq!(
            thumbprint(&der),
            "1hgiVeVznVX8l4F1nHqCPU3_PSt9F5SecIXufAzCKs8"
        );
    }
}
