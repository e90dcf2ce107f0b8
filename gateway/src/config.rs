//! Flags and environment. Defaults suit a production gateway; every limit is configurable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use plumbing::telemetry::LogFormat;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "fleetwarden-gateway",
    version,
    about = "Fleetwarden device gateway (mutual TLS)"
)]
pub struct Config {
    /// Device-facing HTTPS address.
    #[arg(
        long,
        env = "FLEETWARDEN_GATEWAY_LISTEN",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// Address for /metrics, /healthz and /readyz (plain HTTP, not for devices).
    #[arg(long, env = "FLEETWARDEN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// PEM certificate chain the gateway presents to devices.
    #[arg(long, env = "FLEETWARDEN_GATEWAY_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of that certificate.
    #[arg(long, env = "FLEETWARDEN_GATEWAY_TLS_KEY")]
    pub tls_key: PathBuf,

    /// PEM bundle served at /.well-known/est/cacerts (the CA that issues device certificates).
    #[arg(long, env = "FLEETWARDEN_GATEWAY_FLEET_CA")]
    pub fleet_ca: Option<PathBuf>,

    /// Serve only devices in this namespace (default: all namespaces).
    #[arg(long, env = "FLEETWARDEN_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Refresh an unchanged device's status.lastSeen at most this often.
    #[arg(long, env = "FLEETWARDEN_GATEWAY_LAST_SEEN_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub last_seen_interval: Duration,

    /// Refresh lastSeen at most once per this many check-in intervals of the device's group
    /// (never less often than a quarter of the group's maxOffline); 0 refreshes every
    /// --last-seen-interval.
    #[arg(
        long,
        env = "FLEETWARDEN_GATEWAY_LAST_SEEN_CHECK_INS",
        default_value_t = 120
    )]
    pub last_seen_check_ins: u32,

    /// Retry-After sent while a certificate is being issued.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub retry_after: Duration,

    /// Largest request body accepted.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,

    /// Largest request head (request line and headers).
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Open connections at most; further clients wait in the accept queue.
    #[arg(long, default_value_t = 20_000)]
    pub max_connections: usize,

    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Time a client has to send a request's headers (also closes idle keep-alive connections).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Connections are closed gracefully after this long, so clients rebalance.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// TLS sessions kept for resumption.
    #[arg(long, default_value_t = 65_536)]
    pub session_cache: usize,

    #[arg(
        long,
        env = "FLEETWARDEN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    #[arg(long, env = "FLEETWARDEN_LOG", default_value = "info")]
    pub log: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crds::common::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}
