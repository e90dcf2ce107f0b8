//! What every Fleetwarden process needs besides its own job: structured logs (`telemetry`), an
//! HTTP endpoint for `/metrics`, `/healthz` and `/readyz` (`health`), SIGTERM handling
//! (`shutdown`) and, with feature `kube`, the Kubernetes client (`kube_client`). Kept apart so
//! the operator, gateway and webhooks behave the same way.

pub mod health;
#[cfg(feature = "kube")]
pub mod kube_client;
pub mod shutdown;
pub mod telemetry;
