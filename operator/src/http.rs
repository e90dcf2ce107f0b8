//! The operator's own HTTP endpoint: `/metrics`, `/healthz` (the process is alive and its loops
//! are turning) and `/readyz` (it can reach the API server and, when leading, its controllers have
//! started). A standby replica is ready: it is healthy and able to take over.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Readiness facts, set by the loops that know them.
#[derive(Default, Debug)]
pub struct Readiness {
    api_reachable: AtomicBool,
    leader: AtomicBool,
    controllers_started: AtomicBool,
}

impl Readiness {
    pub fn set_api_reachable(&self, v: bool) {
        self.api_reachable.store(v, Ordering::Relaxed);
    }

    pub fn set_leader(&self, v: bool) {
        self.leader.store(v, Ordering::Relaxed);
    }

    pub fn set_controllers_started(&self, v: bool) {
        self.controllers_started.store(v, Ordering::Relaxed);
    }

    /// `Ok` when ready, otherwise why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.api_reachable.load(Ordering::Relaxed) {
            return Err("the Kubernetes API server has not answered yet");
        }
        if self.leader.load(Ordering::Relaxed) && !self.controllers_started.load(Ordering::Relaxed)
        {
            return Err("leading, controllers starting");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

pub fn router(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.readiness.check() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Binds the metrics and probe address, failing early with the address in the message.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} for /metrics and probes: {e} (see --metrics-addr)")
    })?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    Ok(listener)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(metrics, readiness))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_replica_is_ready_once_the_api_answers() {
        let r = Readiness::default();
        assert!(r.check().is_err());
        r.set_api_reachable(true);
        assert_eq!(r.check(), Ok(()));
    }

    #[test]
    fn a_leader_is_ready_only_after_its_controllers_start() {
        let r = Readiness::default();
        r.set_api_reachable(true);
        r.set_leader(true);
        assert_eq!(r.check(), Err("leading, controllers starting"));
        r.set_controllers_started(true);
        assert_eq!(r.check(), Ok(()));
    }
}
