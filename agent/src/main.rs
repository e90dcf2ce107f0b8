//! `fleetwarden-agent`:
//!
//! - `run`: one device. Keeps its key (mode 0600) and certificate in `--state-dir`, enrolls with
//!   a token or a manufacturer certificate, checks in on the interval the gateway asks for, and
//!   renews with a new key when the gateway says it is time.
//! - `simulate`: many virtual devices in one process (see `agent::simulate`), printing a JSON
//!   report of what it measured.

use std::{path::PathBuf, time::Duration};

use agent::{
    client::{Endpoint, Identity},
    device::{Credential, Device, Name, Storage, renewal_due},
    firmware::{self, ArtifactClient, Installed, Slots, Target, Updater},
    simulate::{self, Plan, SimDevice},
};
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use crds::wire::ReportedState;
use plumbing::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "fleetwarden-agent",
    version,
    about = "Fleetwarden device agent and fleet simulator"
)]
struct Cli {
    #[arg(
        long,
        env = "FLEETWARDEN_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[arg(long, env = "FLEETWARDEN_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct GatewayArgs {
    /// Gateway base URL, e.g. https://gateway.fleet.example:8443
    #[arg(long, env = "FLEETWARDEN_GATEWAY")]
    gateway: String,
    /// PEM CA bundle that signs the gateway's certificate.
    #[arg(long, env = "FLEETWARDEN_GATEWAY_CA")]
    gateway_ca: PathBuf,
    /// SPIFFE trust domain of the device certificates.
    #[arg(long, env = "FLEETWARDEN_TRUST_DOMAIN")]
    trust_domain: String,
}

#[derive(Args, Clone)]
struct FirmwareArgs {
    /// Firmware signing key the device trusts, `keyId=base64-public-key` (repeatable; pin the
    /// next key before rotating to it).
    #[arg(long = "firmware-key", value_parser = firmware::parse_pinned_key)]
    firmware_keys: Vec<crds::group::TrustedKey>,
    /// This device's hardware model; firmware for other models is refused.
    #[arg(long, default_value = "sim-v1")]
    hardware_model: String,
    /// PEM CA bundle for firmware downloads (HTTPS); without it, offers cannot be downloaded.
    #[arg(long)]
    artifact_ca: Option<PathBuf>,
    /// Longest time a firmware download may take.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    download_timeout: Duration,
}

impl FirmwareArgs {
    fn updater(&self) -> anyhow::Result<Updater> {
        let artifacts = match &self.artifact_ca {
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --artifact-ca {}", path.display()))?;
                Some(ArtifactClient::new(&pem, self.download_timeout)?)
            }
            None => None,
        };
        if self.firmware_keys.is_empty() {
            tracing::warn!("no --firmware-key pinned: every firmware offer will be refused");
        }
        Ok(Updater {
            pinned_keys: self.firmware_keys.clone(),
            hardware_model: self.hardware_model.clone(),
            artifacts,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run one device.
    Run {
        #[command(flatten)]
        gateway: GatewayArgs,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        name: String,
        /// Where the key, certificate and firmware state live.
        #[arg(long)]
        state_dir: PathBuf,
        /// Single-use enrollment token (first enrollment). Tokens are URL-safe base64, so one in
        /// 64 starts with '-'; it is taken as the value all the same.
        #[arg(
            long,
            env = "FLEETWARDEN_ENROLLMENT_TOKEN",
            conflicts_with = "idevid_cert",
            allow_hyphen_values = true
        )]
        token: Option<String>,
        /// Manufacturer certificate (PEM) for the first enrollment, with --idevid-key.
        #[arg(long, requires = "idevid_key")]
        idevid_cert: Option<PathBuf>,
        #[arg(long)]
        idevid_key: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0")]
        firmware_version: String,
        #[arg(long, default_value_t = 0)]
        security_version: i64,
        #[arg(long)]
        location: Option<String>,
        /// An IP address of the device, reported at check-in (repeatable). The segmentation
        /// controller isolates reported addresses along with the static ones.
        #[arg(long = "address")]
        addresses: Vec<std::net::IpAddr>,
        #[command(flatten)]
        firmware: FirmwareArgs,
        /// Enroll, check in once, print the answer and exit.
        #[arg(long)]
        once: bool,
    },
    /// Run many virtual devices.
    Simulate {
        #[command(flatten)]
        gateway: GatewayArgs,
        /// JSON list of {namespace, name, token}.
        #[arg(long)]
        devices: PathBuf,
        /// How long each device keeps checking in after it enrolled.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        /// Check-in interval, instead of the one the gateway asks for.
        #[arg(long, value_parser = parse_duration)]
        check_in_interval: Option<Duration>,
        #[arg(long, default_value_t = 64)]
        enroll_concurrency: usize,
        /// Share of check-ins that report a changed state (0..1).
        #[arg(long, default_value_t = 0.0)]
        report_change_rate: f64,
        #[arg(long, default_value = "4.1.3")]
        firmware_version: String,
        #[arg(long, default_value_t = 12)]
        security_version: i64,
        #[arg(long)]
        location: Option<String>,
        #[command(flatten)]
        firmware: FirmwareArgs,
        /// Print progress every 5 seconds.
        #[arg(long)]
        progress: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<crds::common::Duration>()
        .map(|d| d.get())
        .map_err(|e| e.to_string())
}

fn endpoint(args: &GatewayArgs) -> anyhow::Result<Endpoint> {
    let ca = std::fs::read_to_string(&args.gateway_ca)
        .with_context(|| format!("cannot read --gateway-ca {}", args.gateway_ca.display()))?;
    Endpoint::new(&args.gateway, &ca)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log)?;
    match cli.command {
        Command::Run {
            gateway,
            namespace,
            name,
            state_dir,
            token,
            idevid_cert,
            idevid_key,
            firmware_version,
            security_version,
            location,
            addresses,
            firmware,
            once,
        } => {
            let updater = firmware.updater()?;
            std::fs::create_dir_all(&state_dir)
                .with_context(|| format!("cannot create --state-dir {}", state_dir.display()))?;
            let name = Name {
                trust_domain: gateway.trust_domain.clone(),
                namespace,
                name,
            };
            let slots = Slots::open(
                &state_dir.join("firmware"),
                Installed {
                    active: crds::device::BootSlot::A,
                    version: firmware_version,
                    security_version,
                },
            )?;
            let mut device = Device::load(
                name,
                endpoint(&gateway)?,
                Storage {
                    dir: Some(state_dir),
                },
            )?;
            if !device.is_enrolled() {
                let credential = match (token, idevid_cert, idevid_key) {
                    (Some(t), _, _) => Credential::Token(t),
                    (None, Some(cert), Some(key)) => Credential::Manufacturer(Identity {
                        chain_pem: std::fs::read_to_string(&cert).with_context(|| {
                            format!("cannot read --idevid-cert {}", cert.display())
                        })?,
                        key_pem: std::fs::read_to_string(&key).with_context(|| {
                            format!("cannot read --idevid-key {}", key.display())
                        })?,
                    }),
                    _ => anyhow::bail!(
                        "not enrolled yet: pass --token or --idevid-cert and --idevid-key for the first enrollment"
                    ),
                };
                tracing::info!(device = %device.name.spiffe_id(), "enrolling");
                device.enroll(&credential).await?;
                tracing::info!("enrolled");
            }
            let mut backoff =
                agent::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
            loop {
                let installed = slots.installed()?;
                let report = ReportedState {
                    firmware_version: Some(installed.version.clone()),
                    security_version: Some(installed.security_version),
                    boot_slot: Some(installed.active),
                    location: location.clone(),
                    addresses: addresses.iter().map(ToString::to_string).collect(),
                    agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
                    ..ReportedState::default()
                };
                match device.check_in(&report).await {
                    Ok(answer) => {
                        backoff.succeeded();
                        if once {
                            println!("{}", serde_json::to_string_pretty(&answer)?);
                            return Ok(());
                        }
                        if let Some(offer) = &answer.offer {
                            match simulate::take_offer(
                                &device,
                                offer,
                                &installed,
                                false,
                                &updater,
                                Target::Slots(&slots),
                            )
                            .await
                            {
                                Ok(now) => {
                                    tracing::info!(version = %now.version, slot = ?now.active, "firmware installed");
                                    continue;
                                }
                                Err(reason) => {
                                    tracing::warn!(%reason, version = %offer.manifest.version, "firmware refused")
                                }
                            }
                        }
                        if renewal_due(&answer, jiff::Timestamp::now()) {
                            tracing::info!("renewing the certificate with a new key");
                            if let Err(e) = device.renew().await {
                                tracing::warn!(error = %e, "renewal failed; retrying at the next check-in");
                            }
                        }
                        // +-10%, so devices that came back together drift apart again.
                        let interval = Duration::from_secs(answer.check_in_interval_seconds.max(1));
                        let spread = 0.9 + 0.2 * agent::backoff::jitter(std::process::id().into());
                        tokio::time::sleep(interval.mul_f64(spread)).await;
                    }
                    Err(e) => {
                        if once {
                            return Err(e.into());
                        }
                        let wait =
                            backoff.failed(agent::backoff::jitter(std::process::id().into()));
                        tracing::warn!(error = %e, retry_in = ?wait, "check-in failed");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        Command::Simulate {
            gateway,
            devices,
            duration,
            check_in_interval,
            enroll_concurrency,
            report_change_rate,
            firmware_version,
            security_version,
            location,
            firmware,
            progress,
        } => {
            let updater = std::sync::Arc::new(firmware.updater()?);
            let list: Vec<SimDevice> = serde_json::from_slice(
                &std::fs::read(&devices)
                    .with_context(|| format!("cannot read --devices {}", devices.display()))?,
            )
            .with_context(|| {
                format!(
                    "{} is not a JSON list of {{namespace, name, token}}",
                    devices.display()
                )
            })?;
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(plumbing::shutdown::watch_signals(stop.clone(), "simulate"));
            let report = simulate::run(Plan {
                endpoint: endpoint(&gateway)?,
                trust_domain: gateway.trust_domain,
                devices: list,
                duration,
                check_in_interval,
                enroll_concurrency,
                report_change_rate,
                firmware_version,
                security_version,
                location,
                progress,
                updater,
                stop,
            })
            .await;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_starting_with_a_hyphen_is_a_value() {
        let cli = Cli::try_parse_from([
            "fleetwarden-agent",
            "run",
            "--gateway",
            "https://gw:8443",
            "--gateway-ca",
            "ca.pem",
            "--trust-domain",
            "fleet.example",
            "--namespace",
            "plant",
            "--name",
            "plc-1",
            "--state-dir",
            "/tmp/plc-1",
            "--token",
            "-zX3k_token",
        ])
        .expect("the token is parsed as a value");
        let Command::Run { token, .. } = cli.command else {
            panic!("not the run command");
        };
        assert_eq!(token.as_deref(), Some("-zX3k_token"));
    }
}
