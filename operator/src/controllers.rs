//! The controllers this operator runs while it leads. Each one lives in its own module, owns a
//! small `Context`, and is started here through `runner::task`.

use std::sync::Arc;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, runner::ControllerTask};

/// What every controller may use.
#[derive(Clone)]
pub struct Shared {
    pub client: Client,
    pub metrics: Arc<Metrics>,
}

/// Starts every controller; they stop when `shutdown` is cancelled.
pub fn all(shared: &Shared, shutdown: &CancellationToken) -> Vec<ControllerTask> {
    let _ = (shared, shutdown);
    Vec::new()
}
