//! TLS for both PostgreSQL connections, through rustls, with libpq's
//! `sslmode` meanings:
//!
//! | sslmode | encryption | certificate checked | host name checked |
//! | --- | --- | --- | --- |
//! | `disable` | no | - | - |
//! | `allow`, `prefer` | if the server offers it | no | no |
//! | `require` | yes | no | no |
//! | `verify-ca` | yes | against `sslrootcert` | no |
//! | `verify-full` | yes | against `sslrootcert` | yes |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt`, as in libpq; a client
//! certificate comes from `sslcert` and `sslkey`. `sslrootcert=system` uses
//! the operating system's CAs and, as in libpq, requires `verify-full`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::config::{ConnectionConfig, SslMode};

/// A TLS setting walrelay cannot use as given.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error(
        "cannot read sslrootcert {path}: {reason}; point sslrootcert= at the CA certificate (PEM) that signed the server's certificate"
    )]
    RootCert { path: String, reason: String },
    #[error("cannot read the client certificate (sslcert {cert}, sslkey {key}): {reason}")]
    ClientCert {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("invalid TLS setting: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The rustls client configuration for `config`'s sslmode, or `None` for
/// `disable`.
pub fn client_config(
    config: &ConnectionConfig,
) -> Result<Option<Arc<ClientConfig>>, TlsConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match config.ssl_mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots = Arc::new(if config.uses_system_roots() {
                system_store()?
            } else {
                root_store(&config.root_cert_path())?
            });
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsConfigError::RootCert {
                    path: config.root_cert_path().display().to_string(),
                    reason: e.to_string(),
                })?;
            if config.ssl_mode == SslMode::VerifyFull {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            }
        }
    };
    let tls = match (&config.ssl_cert, &config.ssl_key) {
        (Some(cert), Some(key)) => {
            let client_error = |reason: String| TlsConfigError::ClientCert {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| client_error(e.to_string()))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| client_error(e.to_string()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| client_error(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(tls)))
}

/// The server name to check the certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(host.to_owned()).map_err(|e| {
        TlsConfigError::Rustls(rustls::Error::General(format!(
            "invalid host name {host:?}: {e}"
        )))
    })
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let error = |reason: String| TlsConfigError::RootCert {
        path: path.display().to_string(),
        reason,
    };
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))? {
        store
            .add(cert.map_err(|e| error(e.to_string()))?)
            .map_err(|e| error(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(error("no certificate in the file".into()));
    }
    Ok(store)
}

/// `sslrootcert=system`: the operating system's trusted CAs (as libpq,
/// through the platform's store; SSL_CERT_FILE and SSL_CERT_DIR are
/// honoured).
fn system_store() -> Result<RootCertStore, TlsConfigError> {
    let error = |reason: String| TlsConfigError::RootCert {
        path: "system".into(),
        reason,
    };
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no CA certificate found".into());
        return Err(error(format!(
            "{why}; install the system's CA certificates (ca-certificates) or set SSL_CERT_FILE"
        )));
    }
    Ok(store)
}

/// `prefer` and `require`: encrypt, check nothing (libpq's behaviour).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root certificate; the host name
/// is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
