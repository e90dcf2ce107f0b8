//! TLS for devices. Client certificates are requested but optional at the TLS layer: a device
//! enrolling with a token has none yet, one enrolling with a manufacturer certificate presents
//! that, and an enrolled device presents its Fleetwarden certificate. The handshake proves the
//! client holds the key of the certificate it presents (its signature is verified); *which*
//! certificates are acceptable is decided per request in `authz`, against the live Device
//! records, so that revocation needs no CRL and no TLS reconfiguration.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use rustls::{
    DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        ParsedCertificate, ServerConfig, ServerSessionMemoryCache,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

/// Accepts any well-formed client certificate whose key the client proves it holds.
#[derive(Debug)]
pub struct ProofOfPossessionOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ProofOfPossessionOnly {
    pub fn new(provider: &CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for ProofOfPossessionOnly {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // Must at least be an X.509 certificate with a usable key.
        ParsedCertificate::try_from(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Reads a PEM certificate chain.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

/// The server configuration: our certificate, optional client certificates, TLS 1.2 and 1.3,
/// session resumption by cache and tickets (devices reconnect often; full handshakes are the
/// expensive part of a check-in).
pub fn server_config(
    cert: &Path,
    key: &Path,
    session_cache: usize,
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the private key in {}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ProofOfPossessionOnly::new(&provider)))
        .with_single_cert(chain, key)
        .context("the server certificate and key do not match")?;
    config.session_storage = ServerSessionMemoryCache::new(session_cache);
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
