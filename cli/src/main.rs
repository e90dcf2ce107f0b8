//! `kubectl-fleet`, used as `kubectl fleet ...` once on the PATH:
//!
//!   keygen --key-id ID --out FILE        new Ed25519 firmware signing key; prints the
//!                                        DeviceGroup trustedKeys entry
//!   sign --key FILE --key-id ID ... IMG  signed firmware stanza for an UpdateRollout
//!   rollout status NAME [--watch]        phase and a progress bar per wave
//!   rollout promote|pause|resume|abort NAME

mod actions;
mod sign;
mod status;

use std::{io::IsTerminal, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use crds::UpdateRollout;
use futures::StreamExt;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};

use crate::actions::Action;

/// Field manager of every change this tool makes.
const FIELD_MANAGER: &str = "kubectl-fleet";

#[derive(Parser)]
#[command(
    name = "kubectl-fleet",
    version,
    about = "Sign firmware and drive Fleetwarden rollouts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an Ed25519 firmware signing key (PKCS#8 PEM, mode 0600).
    Keygen {
        /// Name of the key in DeviceGroup firmware.trustedKeys, e.g. vendor-2026.
        #[arg(long)]
        key_id: String,
        /// Where to write the private key; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a firmware image: prints the firmware stanza to paste into an UpdateRollout.
    Sign {
        /// Private key (PKCS#8 PEM, from `keygen` or `openssl genpkey -algorithm ed25519`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        key_id: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        security_version: i64,
        /// Hardware model the image is built for (repeatable).
        #[arg(long = "hardware-model", required = true)]
        hardware_models: Vec<String>,
        /// Where devices download the image (https://).
        #[arg(long)]
        url: String,
        /// When devices stop accepting the manifest: an RFC 3339 instant or a duration (90d).
        #[arg(long, default_value = "90d")]
        expires: String,
        /// Print the stanza under this key (firmware, or rollbackFirmware).
        #[arg(long, default_value = "firmware", value_parser = ["firmware", "rollbackFirmware"])]
        field: String,
        /// The firmware image.
        image: PathBuf,
    },
    /// Inspect and steer an UpdateRollout.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
}

#[derive(clap::Args)]
struct Target {
    /// UpdateRollout name.
    name: String,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long)]
    namespace: Option<String>,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Phase, totals and a progress bar per wave.
    Status {
        #[command(flatten)]
        target: Target,
        /// Follow the rollout until it finishes (exit 0 on Succeeded, 1 on Failed/RolledBack).
        #[arg(short, long)]
        watch: bool,
        /// Give up watching after this long.
        #[arg(long, default_value = "24h")]
        timeout: String,
    },
    /// Approve the next wave that requires approval.
    Promote {
        #[command(flatten)]
        target: Target,
    },
    /// Stop new offers; devices already updating finish.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Resume offers after a pause.
    Resume {
        #[command(flatten)]
        target: Target,
    },
    /// End the rollout as failed (with onFailure: Rollback, updated devices roll back).
    Abort {
        #[command(flatten)]
        target: Target,
    },
}

fn yaml(value: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_norway::to_string(value)?)
}

async fn rollouts(namespace: Option<String>) -> anyhow::Result<(Api<UpdateRollout>, String)> {
    let config = kube::Config::infer()
        .await
        .context("no usable kubeconfig: set KUBECONFIG or configure kubectl")?;
    let ns = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)?;
    Ok((Api::namespaced(client, &ns), ns))
}

async fn get(api: &Api<UpdateRollout>, ns: &str, name: &str) -> anyhow::Result<UpdateRollout> {
    match api.get(name).await {
        Ok(r) => Ok(r),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "UpdateRollout {ns}/{name} not found: check the name and namespace (kubectl get updaterollouts -n {ns})"
        ),
        Err(e) => Err(e).with_context(|| format!("reading UpdateRollout {ns}/{name}")),
    }
}

async fn steer(target: Target, action: Action) -> anyhow::Result<()> {
    let (api, ns) = rollouts(target.namespace).await?;
    let name = target.name;
    let current = get(&api, &ns, &name).await?;
    let patch = actions::patch(&current, action).map_err(anyhow::Error::msg)?;
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let updated = match api.patch(&name, &params, &Patch::Merge(&patch)).await {
        Ok(r) => r,
        Err(kube::Error::Api(s)) if s.code == 409 => {
            anyhow::bail!("UpdateRollout {ns}/{name} changed while this ran; run the command again")
        }
        Err(e) => return Err(e).with_context(|| format!("updating UpdateRollout {ns}/{name}")),
    };
    println!("{}", actions::done(&updated, action));
    Ok(())
}

async fn status(target: Target, watch: bool, timeout: &str) -> anyhow::Result<()> {
    let (api, ns) = rollouts(target.namespace).await?;
    let name = target.name;
    let first = get(&api, &ns, &name).await?;
    if !watch {
        print!("{}", status::render(&first));
        return Ok(());
    }
    let timeout: Duration = timeout
        .parse::<crds::common::Duration>()
        .map_err(|e| anyhow::anyhow!("--timeout {timeout:?}: {e}"))?
        .get();
    let tty = std::io::stdout().is_terminal();
    let mut shown = String::new();
    let mut show = |r: &UpdateRollout| {
        let text = status::render(r);
        if text != shown {
            if tty && !shown.is_empty() {
                // Redraw in place.
                print!("\x1b[{}A\x1b[J", shown.lines().count());
            }
            print!("{text}");
            shown = text;
        }
    };
    show(&first);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api.clone(), config)
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = first;
    loop {
        if let Some(phase) = status::finished(&last) {
            return match phase {
                crds::rollout::RolloutPhase::Succeeded => Ok(()),
                other => anyhow::bail!("rollout {ns}/{name} ended {other:?}"),
            };
        }
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => anyhow::bail!("rollout {ns}/{name} did not finish within {timeout:?}"),
            Ok(None) => anyhow::bail!("the watch on rollout {ns}/{name} ended"),
            Ok(Some(Err(e))) => {
                eprintln!("watch error (retrying): {e}");
            }
            Ok(Some(Ok(r))) => {
                show(&r);
                last = r;
            }
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen { key_id, out } => {
            let key = sign::generate()?;
            sign::write_key(&key, &out)?;
            eprintln!(
                "kubectl-fleet: private key written to {} (keep it offline); add this to the DeviceGroup's spec.firmware.trustedKeys:",
                out.display()
            );
            print!("{}", yaml(&vec![sign::trusted_key(&key_id, &key)])?);
        }
        Command::Sign {
            key,
            key_id,
            version,
            security_version,
            hardware_models,
            url,
            expires,
            field,
            image,
        } => {
            let signing = sign::read_key(&key)?;
            let (sha256, size) = sign::digest_file(&image)?;
            let release = sign::Release {
                version,
                security_version,
                hardware_models,
                url,
                expires: sign::parse_expiry(&expires, jiff::Timestamp::now())?,
            };
            let manifest = sign::manifest(release, sha256, size, &key_id, &signing)?;
            let mut stanza = serde_json::Map::new();
            stanza.insert(field, serde_json::to_value(&manifest)?);
            print!("{}", yaml(&stanza)?);
        }
        Command::Rollout { command } => match command {
            RolloutCommand::Status {
                target,
                watch,
                timeout,
            } => status(target, watch, &timeout).await?,
            RolloutCommand::Promote { target } => steer(target, Action::Promote).await?,
            RolloutCommand::Pause { target } => steer(target, Action::Pause).await?,
            RolloutCommand::Resume { target } => steer(target, Action::Resume).await?,
            RolloutCommand::Abort { target } => steer(target, Action::Abort).await?,
        },
    }
    Ok(())
}
