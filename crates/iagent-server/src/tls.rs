//! Optional TLS, for operators without a proxy in front: a certificate chain and a private key
//! in PEM files, served with rustls (ring provider, TLS 1.2 and 1.3).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, crypto::ring};

use crate::ServerError;
use crate::config::Tls;

/// The acceptor for the configured certificate, or `None` when TLS is off.
pub(crate) fn acceptor(tls: &Tls) -> Result<Option<TlsAcceptor>, ServerError> {
    if !tls.enabled() {
        return Ok(None);
    }
    let read_error = |what: &str, path: &Path, err: &dyn std::fmt::Display| {
        ServerError::Tls(format!("cannot read the {what} {}: {err}", path.display()))
    };
    let chain = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| read_error("certificate", &tls.cert_file, &err))?;
    if chain.is_empty() {
        return Err(read_error(
            "certificate",
            &tls.cert_file,
            &"no certificate in the file",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|err| read_error("private key", &tls.key_file, &err))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|err| ServerError::Tls(err.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|err| {
                ServerError::Tls(format!(
                    "the certificate and key do not work together: {err}"
                ))
            })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}
