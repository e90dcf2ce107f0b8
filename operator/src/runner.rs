//! Runs kube-runtime controllers while this replica leads: each reconciler is wrapped so every
//! reconciliation is timed and counted, failures are logged with the object they concern and
//! retried with backoff, and all controllers stop together, finishing in-flight reconciliations,
//! when leadership is lost or the process shuts down.

use std::{fmt::Debug, future::Future, hash::Hash, sync::Arc, time::Duration};

use futures::{StreamExt, future::BoxFuture};
use kube::{
    Resource,
    runtime::{Controller, controller::Action},
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Reconciler error types name their kind for the `reconcile_errors` metric.
pub trait ReconcileError: std::error::Error + Send + Sync + 'static {
    /// Short snake_case label, e.g. `kube_api`, `invalid_spec`.
    fn metric_label(&self) -> &'static str;
}

/// A started controller, ready to be awaited alongside the others.
pub type ControllerTask = BoxFuture<'static, ()>;

/// How long a failed reconciliation waits before it is retried.
pub const ERROR_REQUEUE: Duration = Duration::from_secs(5);

struct Wrapped<C, F> {
    name: &'static str,
    ctx: Arc<C>,
    reconcile: F,
    metrics: Arc<Metrics>,
}

/// Turns a configured `Controller` and its reconcile function into a task that runs until
/// `shutdown` is cancelled.
pub fn task<K, C, E, F, Fut>(
    name: &'static str,
    controller: Controller<K>,
    ctx: Arc<C>,
    reconcile: F,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> ControllerTask
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Debug + Unpin + Send + Sync,
    C: Send + Sync + 'static,
    E: ReconcileError,
    F: Fn(Arc<K>, Arc<C>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    let wrapped = Arc::new(Wrapped {
        name,
        ctx,
        reconcile,
        metrics,
    });
    Box::pin(async move {
        tracing::info!(controller = name, "controller starting");
        controller
            .graceful_shutdown_on(shutdown.cancelled_owned())
            .run(
                |obj: Arc<K>, w: Arc<Wrapped<C, F>>| {
                    let start = std::time::Instant::now();
                    let fut = (w.reconcile)(obj, w.ctx.clone());
                    async move {
                        let result = fut.await;
                        w.metrics.observe_reconcile(
                            w.name,
                            start.elapsed(),
                            result.as_ref().err().map(ReconcileError::metric_label),
                        );
                        result
                    }
                },
                |obj: Arc<K>, error: &E, w: Arc<Wrapped<C, F>>| {
                    tracing::warn!(
                        controller = w.name,
                        object = %describe(obj.as_ref()),
                        error = %error,
                        "reconcile failed; retrying"
                    );
                    Action::requeue(ERROR_REQUEUE)
                },
                wrapped,
            )
            .for_each(|result| async move {
                if let Err(e) = result {
                    // Reconciler errors were logged by the error policy; these are watch and
                    // queue errors (e.g. the API server restarting), retried by kube-runtime.
                    if !matches!(e, kube::runtime::controller::Error::ReconcilerFailed(..)) {
                        tracing::debug!(controller = name, error = %e, "controller stream error");
                    }
                }
            })
            .await;
        tracing::info!(controller = name, "controller stopped");
    })
}

/// `namespace/name` of an object, for logs.
pub fn describe<K: Resource>(obj: &K) -> String {
    let meta = obj.meta();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{}", meta.name.as_deref().unwrap_or("?")),
        None => meta.name.clone().unwrap_or_else(|| "?".into()),
    }
}

/// Runs the controller tasks until `shutdown` is cancelled and all of them have finished.
pub async fn run_all(tasks: Vec<ControllerTask>, shutdown: CancellationToken) {
    let started = tasks.len();
    futures::future::join_all(tasks).await;
    if started > 0 && !shutdown.is_cancelled() {
        tracing::error!("controllers ended without being asked to; waiting for shutdown");
    }
    shutdown.cancelled().await;
}
