//! The Fleetwarden gateway: the only endpoint devices talk to. HTTPS with optional client
//! certificates, EST-style enrollment, check-in and status reports, every request authorised
//! against the watch-fed Device cache. It writes only the Device status fields it owns.

pub mod api;
pub mod authz;
pub mod cache;
pub mod config;
pub mod idevid;
pub mod metrics;
pub mod server;
pub mod status;
pub mod tls;
