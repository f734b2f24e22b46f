//! TLS material: PEM files turned into rustls configurations, once, at start.
//!
//! Inputs are the paths of the configuration (`broker.tls_*` for the device listener,
//! `upstream.ca_file`, `upstream.client_cert`, `upstream.client_key` for the upstream
//! connection); outputs are a [`rustls::ServerConfig`] for [`crate::broker::tls_listener`]
//! and a [`rustls::ClientConfig`] for the forwarder (rumqttc's `TlsConfiguration::Rustls`).
//!
//! Invariants:
//! - every problem names the file and says what is wrong with it (missing, unreadable,
//!   no certificate, no private key, key not matching the certificate, not a CA), so the
//!   configuration check can report it and exit 64 before anything starts;
//! - nothing here is read again after start: certificate rotation means a restart;
//! - the crypto provider is rustls' aws-lc-rs, the one rumqttc already brings; TLS 1.2
//!   and 1.3 only, with rustls' default cipher suites.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors of loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\"){}", path.display(), detail(.reason))]
    NoCertificate { path: PathBuf, reason: String },
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1){}", path.display(), detail(.reason))]
    NoKey { path: PathBuf, reason: String },
    #[error("{} has a certificate rustls cannot use as a trust anchor: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("the operating system's certificate store has no usable CA certificate{}", detail(.0))]
    NoSystemRoots(String),
    #[error("certificate {} and key {} do not make a usable pair: {reason}", cert.display(), key.display())]
    BadPair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

fn detail(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}

/// Certificates of a PEM file, in order (a chain: leaf first); at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
            reason: String::new(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::NoKey {
        path: path.to_owned(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => String::new(),
            e => e.to_string(),
        },
    })
}

/// A trust store of every certificate in a PEM file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The operating system's trust store (`/etc/ssl/certs` and the like).
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors = found
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(TlsError::NoSystemRoots(errors));
    }
    Ok(roots)
}

/// Server side of the device listener: certificate chain and key, and, with
/// `client_ca`, client certificates required and verified against that CA.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs(cert)?;
    let private_key = load_key(key)?;
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(load_roots(ca)?))
                .build()
                .map_err(|e| TlsError::BadCa {
                    path: ca.to_owned(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, private_key)
        .map_err(|e| TlsError::BadPair {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(config))
}

/// Client side of the upstream connection: the server is verified against `ca` (the
/// system trust store when `None`); `client` is a certificate chain and key for mutual
/// TLS. The server name checked is the host of `upstream.url` (rumqttc passes it).
pub fn client_config(
    ca: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca {
        Some(path) => load_roots(path)?,
        None => system_roots()?,
    };
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| TlsError::BadPair {
                cert: cert.to_owned(),
                key: key.to_owned(),
                reason: e.to_string(),
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap(), key)
    }

    fn leaf(ca: &(rcgen::Certificate, rcgen::KeyPair)) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca.0, &ca.1).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn good_files_load_into_server_and_client_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let (cert, key) = leaf(&ca);
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.pem"), ca.0.pem()).unwrap();
        std::fs::write(p("cert.pem"), cert).unwrap();
        std::fs::write(p("key.pem"), key).unwrap();
        // Whether client certificates are then required is shown by the listener tests.
        server_config(&p("cert.pem"), &p("key.pem"), Some(&p("ca.pem"))).unwrap();
        server_config(&p("cert.pem"), &p("key.pem"), None).unwrap();
        let client = client_config(Some(&p("ca.pem")), Some((&p("cert.pem"), &p("key.pem"))));
        assert!(client.unwrap().client_auth_cert_resolver.has_certs());
        assert!(!client_config(Some(&p("ca.pem")), None)
            .unwrap()
            .client_auth_cert_resolver
            .has_certs());
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        let (cert, key) = leaf(&ca);
        let (_, other_key) = leaf(&ca);
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("cert.pem"), &cert).unwrap();
        std::fs::write(p("key.pem"), &key).unwrap();
        std::fs::write(p("other-key.pem"), other_key).unwrap();
        std::fs::write(p("garbage.pem"), "not a PEM file\n").unwrap();

        let e = server_config(&p("missing.pem"), &p("key.pem"), None).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");

        let e = server_config(&p("garbage.pem"), &p("key.pem"), None).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        assert!(e.to_string().contains("garbage.pem"), "{e}");

        // A certificate where the key should be.
        let e = server_config(&p("cert.pem"), &p("cert.pem"), None).unwrap_err();
        assert!(e.to_string().contains("no PEM private key"), "{e}");

        let e = server_config(&p("cert.pem"), &p("other-key.pem"), None).unwrap_err();
        assert!(matches!(e, TlsError::BadPair { .. }), "{e}");

        let e = client_config(Some(&p("garbage.pem")), None).unwrap_err();
        assert!(e.to_string().contains("garbage.pem"), "{e}");
    }
}
