//! What every Fleetwarden process needs besides its own job: structured logs (`telemetry`), an
//! HTTP endpoint for `/metrics`, `/healthz` and `/readyz` (`health`), and SIGTERM handling
//! (`shutdown`). Kept apart so the operator, gateway and webhooks behave the same way.

pub mod health;
pub mod shutdown;
pub mod telemetry;
