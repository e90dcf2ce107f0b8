//! The TLS accept loop. Bounded everywhere a device-facing server must be: a cap on open
//! connections, a handshake timeout, a header read timeout and header size limit, a maximum
//! connection age, and graceful draining on shutdown. The client certificate of each connection
//! is parsed once and handed to every request on it.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper::{Request, body::Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::{
    CertificateError, RootCertStore,
    pki_types::{CertificateDer, UnixTime, pem::PemObject},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{authz::PeerCertificate, metrics::Metrics};

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connection_age: Duration,
}

/// The CA that issues device certificates. Checked once per connection, so a certificate from
/// anywhere else is refused with its own reason even before the fingerprint comparison.
pub struct FleetCa {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl FleetCa {
    pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert?)?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "the fleet CA bundle holds no certificate"
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        Ok(Self { verifier })
    }

    /// Whether the chain (leaf first) leads to the fleet CA. Validity is judged separately.
    pub fn verifies(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        match self
            .verifier
            .verify_client_cert(leaf, rest, UnixTime::now())
        {
            Ok(_) => true,
            // An expired certificate from the fleet CA is still the fleet's: expiry has its own
            // refusal reason.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => true,
            Err(_) => false,
        }
    }
}

/// The TLS client certificate of the connection a request came on, if any: the leaf, parsed,
/// and the whole chain as presented (for manufacturer certificates).
#[derive(Clone, Debug)]
pub struct Peer {
    pub leaf: Option<Arc<PeerCertificate>>,
    pub chain: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

/// Serves `app` on `listener` until `shutdown`, then stops accepting and lets open connections
/// finish their current request (up to `drain`).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    fleet_ca: Option<Arc<FleetCa>>,
    app: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, limits, metrics, shutdown, fleet_ca) = (
            acceptor.clone(),
            app.clone(),
            limits.clone(),
            metrics.clone(),
            shutdown.clone(),
            fleet_ca.clone(),
        );
        tracker.spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    metrics.tls_failures.inc();
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    metrics.tls_failures.inc();
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let chain: Vec<_> = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                .unwrap_or_default();
            let leaf = chain.first().and_then(|c| PeerCertificate::parse(c)).map(|mut leaf| {
                leaf.chains_to_fleet_ca = fleet_ca.as_ref().map(|ca| ca.verifies(&chain));
                Arc::new(leaf)
            });
            let peer = Peer {
                leaf,
                chain: Arc::new(chain),
            };
            metrics.connections.inc();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192));
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            let age = tokio::time::sleep(limits.max_connection_age);
            tokio::pin!(age);
            let mut closing = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%remote, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = &mut age, if !closing => { conn.as_mut().graceful_shutdown(); closing = true; }
                    _ = shutdown.cancelled(), if !closing => { conn.as_mut().graceful_shutdown(); closing = true; }
                }
            }
            metrics.connections.dec();
        });
    }
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open after {drain:?}; closing them");
    }
}
