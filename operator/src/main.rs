//! `fleetwarden-operator`: connects to the API server, campaigns for the leader lease, runs the
//! controllers while it leads, serves /metrics and probes, and shuts down cleanly on SIGTERM
//! (controllers finish in-flight work, then the lease is released for a standby).

use std::sync::Arc;

use clap::Parser;
use operator::{
    config::Config,
    controllers::{self, Shared},
    leader::LeaderElector,
    metrics::Metrics,
    readiness::Readiness,
    runner,
};
use plumbing::{health, telemetry};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long stopping controllers may take to finish in-flight reconciliations.
const CONTROLLER_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Watch events decode into many short-lived allocations on every worker thread; with glibc's
/// allocator, allocating and freeing them took about a third of the operator's CPU during a mass
/// enrollment, CPU the API server on the same machine needs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(config.log_format, &config.log)?;
    if let Err(e) = run(config).await {
        tracing::error!(error = format!("{e:#}"), "operator failed");
        return Err(e);
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let client = plumbing::kube_client::connect("fleetwarden-operator").await?;
    let leader_config = config
        .leader_config(client.default_namespace())
        .map_err(anyhow::Error::msg)?;
    tracing::info!(
        identity = %leader_config.identity,
        lease = %format!("{}/{}", leader_config.namespace, leader_config.lease_name),
        "starting"
    );

    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(plumbing::shutdown::watch_signals(
        shutdown.clone(),
        "stopping controllers and releasing the lease",
    ));

    let listener = health::bind(config.metrics_addr, "--metrics-addr").await?;
    let http_stop = CancellationToken::new();
    let (m, r) = (metrics.clone(), readiness.clone());
    let http_task = tokio::spawn(health::serve(
        listener,
        Arc::new(move || m.encode()),
        Arc::new(move || r.check().map_err(String::from)),
        http_stop.clone(),
    ));

    // The elector stops only after the controllers have, so the lease is never released while
    // this replica still writes.
    let elector_stop = CancellationToken::new();
    let (leading_tx, mut leading) = watch::channel(false);
    let identity = leader_config.identity.clone();
    let elector = LeaderElector::new(client.clone(), leader_config);
    let ready_api = readiness.clone();
    let elector_task = tokio::spawn(elector.run(
        leading_tx,
        move |ok| ready_api.set_api_reachable(ok),
        elector_stop.clone(),
    ));

    let shared = Shared {
        client,
        metrics: metrics.clone(),
        namespace: config.watch_namespace.clone(),
        identity,
    };
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
        metrics.leader.set(1);
        metrics.leader_transitions.inc();
        readiness.set_leader(true);
        let term = shutdown.child_token();
        let tasks = controllers::all(&shared, &term);
        readiness.set_controllers_started(true);
        tracing::info!(controllers = tasks.len(), "leading: controllers started");
        let mut run = Box::pin(runner::run_all(tasks, term.clone()));
        // Stop on lost leadership or shutdown; either way the controllers get CONTROLLER_DRAIN
        // to finish what they are doing (a controller stopped before its first list completes
        // would otherwise wait for a cache that never fills).
        let finished = tokio::select! {
            _ = &mut run => true,
            r = leading.wait_for(|l| !*l) => { let _ = r; false }
            _ = shutdown.cancelled() => false,
        };
        term.cancel();
        if !finished && tokio::time::timeout(CONTROLLER_DRAIN, run).await.is_err() {
            tracing::warn!(
                "controllers did not finish in-flight reconciliations within {CONTROLLER_DRAIN:?}; stopping anyway"
            );
        }
        readiness.set_controllers_started(false);
        readiness.set_leader(false);
        metrics.leader.set(0);
        if shutdown.is_cancelled() {
            break;
        }
        metrics.leader_transitions.inc();
        tracing::warn!("controllers stopped after losing leadership; campaigning again");
    }

    elector_stop.cancel();
    let _ = elector_task.await;
    http_stop.cancel();
    match http_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(e.into()),
    }
    tracing::info!("shut down cleanly");
    Ok(())
}
