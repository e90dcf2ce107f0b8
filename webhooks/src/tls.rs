//! The serving certificate, reloaded when its files change: in a cluster it comes from a
//! cert-manager Certificate mounted from a Secret, which cert-manager renews in place.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Hands out the current certificate to every handshake.
#[derive(Debug)]
pub struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

fn load(provider: &CryptoProvider, cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificates from {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the private key in {}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .context("the serving certificate and key do not match")?;
    Ok(certified)
}

fn modified(paths: &[&Path]) -> Option<Vec<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// A TLS configuration whose certificate follows the files at `cert` and `key`, checked every
/// `interval` until `shutdown`.
pub fn server_config(
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(Reloading {
        current: RwLock::new(Arc::new(load(&provider, &cert, &key)?)),
    });
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio::spawn(async move {
        let mut seen = modified(&[&cert, &key]);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let now = modified(&[&cert, &key]);
            if now == seen {
                continue;
            }
            match load(&provider, &cert, &key) {
                Ok(fresh) => {
                    if let Ok(mut current) = resolver.current.write() {
                        *current = Arc::new(fresh);
                    }
                    seen = now;
                    metrics.certificate_reloads.inc();
                    tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                }
                // A half-written pair during rotation: keep the old one and try again.
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot reload the serving certificate yet"
                ),
            }
        }
    });
    Ok(Arc::new(config))
}
