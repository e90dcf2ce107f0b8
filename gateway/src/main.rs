//! `fleetwarden-gateway`: loads its TLS material, fills its caches from watches, then serves
//! devices until SIGTERM, when it stops accepting and drains open connections.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use gateway::{
    api::{self, AppState},
    cache::Caches,
    config::Config,
    metrics::Metrics,
    server::{self, Limits},
    status::{Heartbeat, Writer},
    tls,
};
use plumbing::{health, telemetry};
use tokio_util::sync::CancellationToken;

/// TLS records, HTTP requests and watch events make many short-lived allocations on every worker
/// thread; glibc's allocator spent about a fifth of the gateway's CPU on them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log_format, &config.log)?;
    if let Err(e) = run(config).await {
        tracing::error!(error = format!("{e:#}"), "gateway failed");
        return Err(e);
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let tls_config = tls::server_config(&config.tls_cert, &config.tls_key, config.session_cache)?;
    let fleet_ca_pem = match &config.fleet_ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --fleet-ca {}", path.display()))?,
        ),
        None => None,
    };
    let client = plumbing::kube_client::connect("fleetwarden-gateway").await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(plumbing::shutdown::watch_signals(
        shutdown.clone(),
        "draining device connections",
    ));
    let metrics = Arc::new(Metrics::new());
    let caches = Caches::start(
        client.clone(),
        config.watch_namespace.as_deref(),
        shutdown.clone(),
    );

    let m = metrics.clone();
    let health = health::Started::serve(
        config.metrics_addr,
        "--metrics-addr",
        Arc::new(move || m.encode()),
        "caches not synced yet",
    )
    .await?;

    // Devices are only served once the caches hold the full picture.
    tokio::select! {
        r = caches.ready() => r.context("the Device and DeviceGroup watches failed")?,
        _ = shutdown.cancelled() => return Ok(()),
    }
    health.ready();
    tracing::info!(
        devices = caches.devices.state().len(),
        groups = caches.groups.state().len(),
        "caches synced"
    );

    let state = Arc::new(AppState {
        writer: Writer::new(client.clone(), metrics.clone()),
        caches,
        metrics: metrics.clone(),
        fleet_ca_pem: fleet_ca_pem.clone(),
        max_body: config.max_body_bytes,
        heartbeat: Heartbeat {
            minimum: config.last_seen_interval,
            check_ins: config.last_seen_check_ins,
        },
        retry_after: config.retry_after,
    });
    let listener = health::bind(config.listen, "--listen").await?;
    tracing::info!(addr = %listener.local_addr()?, "serving devices over mutual TLS");
    let fleet_ca = fleet_ca_pem
        .as_deref()
        .map(server::FleetCa::from_pem)
        .transpose()
        .context("--fleet-ca")?
        .map(Arc::new);
    server::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(tls_config),
        fleet_ca,
        api::router(state),
        Limits {
            max_connections: config.max_connections,
            handshake_timeout: config.handshake_timeout,
            header_timeout: config.header_timeout,
            max_header_bytes: config.max_header_bytes,
            max_connection_age: config.max_connection_age,
        },
        metrics,
        shutdown,
        Duration::from_secs(20),
    )
    .await;

    health.stop().await;
    tracing::info!("shut down cleanly");
    Ok(())
}
