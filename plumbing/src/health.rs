//! The probe and metrics endpoint every process serves on its own port: `/metrics` (OpenMetrics
//! text from the process's registry), `/healthz` (the process is alive) and `/readyz` (the
//! process says it can do its job; 503 with the reason otherwise).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renders the metrics exposition.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;
/// `Ok` when ready, otherwise why not.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: MetricsFn,
    ready: ReadyFn,
}

pub fn router(metrics: MetricsFn, ready: ReadyFn) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, ready })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        (s.metrics)(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match (s.ready)() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Binds the address, failing early with the address and the flag in the message.
pub async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (see {flag})"))?;
    Ok(listener)
}

/// Serves the endpoint until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: MetricsFn,
    ready: ReadyFn,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(metrics, ready))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// The probe endpoint of a process that becomes ready once, after a start-up step (e.g. its
/// caches syncing): `/readyz` answers 503 with `waiting_for` until [`Started::ready`].
pub struct Started {
    ready: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Started {
    /// Binds `addr` (named `flag` in errors) and serves `/metrics`, `/healthz` and `/readyz`.
    pub async fn serve(
        addr: SocketAddr,
        flag: &str,
        metrics: MetricsFn,
        waiting_for: &'static str,
    ) -> anyhow::Result<Self> {
        let listener = bind(addr, flag).await?;
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ready.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            metrics,
            Arc::new(move || {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err(waiting_for.to_string())
                }
            }),
            stop.clone(),
        ));
        Ok(Self { ready, stop, task })
    }

    pub fn ready(&self) {
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops serving the endpoint (last, after the process's own work has drained).
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
