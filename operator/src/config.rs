//! Command line and environment configuration. Every flag has an environment variable, so the
//! same binary is configured by flags on a workstation and by env in the Helm chart.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

use plumbing::telemetry::LogFormat;

use crate::leader::LeaderConfig;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "fleetwarden-operator",
    version,
    about = "Fleetwarden operator: device identity, groups and rollouts"
)]
pub struct Config {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "FLEETWARDEN_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Log format.
    #[arg(
        long,
        env = "FLEETWARDEN_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `operator=debug,kube=warn`.
    #[arg(long, env = "FLEETWARDEN_LOG", default_value = "info")]
    pub log: String,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "FLEETWARDEN_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Name of the Lease used for leader election.
    #[arg(
        long,
        env = "FLEETWARDEN_LEASE_NAME",
        default_value = "fleetwarden-operator"
    )]
    pub lease_name: String,

    /// Namespace of the Lease; defaults to the pod's namespace, else the kubeconfig's.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's identity in the Lease; defaults to the pod name, else host and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long the lease stays valid without renewal (standbys take over after it).
    #[arg(long, env = "FLEETWARDEN_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// A leader unable to renew for this long stops its controllers.
    #[arg(long, env = "FLEETWARDEN_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,

    /// How often standbys check the lease.
    #[arg(long, env = "FLEETWARDEN_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crds::common::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

impl Config {
    pub fn leader_config(&self, default_namespace: &str) -> Result<LeaderConfig, String> {
        let identity = self.identity.clone().unwrap_or_else(default_identity);
        let cfg = LeaderConfig {
            lease_name: self.lease_name.clone(),
            namespace: self
                .lease_namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_string()),
            identity,
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        };
        cfg.validate().map_err(|e| {
            format!("leader election: {e} (see --lease-duration, --renew-deadline, --retry-period)")
        })?;
        Ok(cfg)
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "operator".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_production_timings() {
        let c = Config::parse_from(["fleetwarden-operator"]);
        let l = c.leader_config("fleetwarden-system").unwrap();
        assert_eq!(l.lease_duration, Duration::from_secs(15));
        assert_eq!(l.namespace, "fleetwarden-system");
        assert!(!l.identity.is_empty());
    }

    #[test]
    fn bad_durations_name_the_flag_syntax() {
        let err = Config::try_parse_from(["x", "--lease-duration", "15 seconds"]).unwrap_err();
        assert!(err.to_string().contains("write it like"), "{err}");
    }

    #[test]
    fn inconsistent_lease_timings_are_refused() {
        let c = Config::parse_from(["x", "--lease-duration", "5s", "--renew-deadline", "10s"]);
        assert!(
            c.leader_config("ns")
                .unwrap_err()
                .contains("--renew-deadline")
        );
    }
}
