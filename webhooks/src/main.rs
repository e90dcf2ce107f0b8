//! `fleetwarden-webhooks`: fills its caches from watches, then answers the API server's
//! AdmissionReviews over TLS until SIGTERM, when it finishes in-flight reviews and exits.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use plumbing::{health, telemetry, telemetry::LogFormat};
use tokio_util::sync::CancellationToken;
use webhooks::{
    metrics::Metrics,
    server::{self, AppState, Caches},
    tls,
};

#[derive(Parser, Debug)]
#[command(
    name = "fleetwarden-webhooks",
    version,
    about = "Fleetwarden admission webhooks (validating and defaulting)"
)]
struct Config {
    /// HTTPS address the API server calls.
    #[arg(
        long,
        env = "FLEETWARDEN_WEBHOOKS_LISTEN",
        default_value = "0.0.0.0:9443"
    )]
    listen: SocketAddr,
    /// Address for /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long, env = "FLEETWARDEN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// PEM certificate chain (e.g. tls.crt of the cert-manager Secret); reloaded when it changes.
    #[arg(long, env = "FLEETWARDEN_WEBHOOKS_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key of that certificate (tls.key).
    #[arg(long, env = "FLEETWARDEN_WEBHOOKS_TLS_KEY")]
    tls_key: PathBuf,
    /// Largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
    #[arg(long, default_value_t = 3 * 1024 * 1024)]
    max_body_bytes: usize,
    #[arg(long, env = "FLEETWARDEN_LOG", default_value = "info")]
    log: String,
    #[arg(
        long,
        env = "FLEETWARDEN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log_format, &config.log)?;
    if let Err(e) = run(config).await {
        tracing::error!(error = format!("{e:#}"), "webhooks failed");
        return Err(e);
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(plumbing::shutdown::watch_signals(
        shutdown.clone(),
        "finishing in-flight admission reviews",
    ));
    let metrics = Arc::new(Metrics::new());
    let tls_config = tls::server_config(
        config.tls_cert.clone(),
        config.tls_key.clone(),
        Duration::from_secs(10),
        metrics.clone(),
        shutdown.clone(),
    )?;
    let client = plumbing::kube_client::connect("fleetwarden-webhooks").await?;
    let caches = Caches::start(client, shutdown.clone());

    let m = metrics.clone();
    let health = health::Started::serve(
        config.metrics_addr,
        "--metrics-addr",
        Arc::new(move || m.encode()),
        "DeviceGroup and UpdateRollout caches not synced yet",
    )
    .await?;
    // Reviews that consult other objects must see all of them.
    tokio::select! {
        r = caches.ready() => r.context("the DeviceGroup and UpdateRollout watches failed")?,
        _ = shutdown.cancelled() => return Ok(()),
    }
    health.ready();

    let listener = health::bind(config.listen, "--listen").await?;
    tracing::info!(addr = %listener.local_addr()?, "serving admission reviews");
    server::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(tls_config),
        server::router(
            AppState {
                caches,
                metrics: metrics.clone(),
            },
            config.max_body_bytes,
        ),
        metrics,
        shutdown,
        Duration::from_secs(10),
    )
    .await;
    health.stop().await;
    tracing::info!("stopped");
    Ok(())
}
