//! `local-fleet`: what the local demo needs around Fleetwarden on a control plane without
//! cert-manager. Test and demo tooling only, never part of a deployment.
//!
//!   local-fleet issuer --namespace NS --name NAME --ca-out FILE
//!       run the test CA issuer for NS (signs approved CertificateRequests) until SIGTERM,
//!       writing its CA certificate to FILE first
//!   local-fleet gateway-pki --dir DIR
//!       write a CA and a server certificate for 127.0.0.1 / localhost into DIR
//!   local-fleet provision --namespace NS --group G --model M --secret S --count N --out FILE
//!       create N Devices (NAME-PREFIX-0000...) with enrollment tokens; write the token list
//!   local-fleet artifacts --dir DIR --serve URLPATH=FILE [--serve ...] --url-out FILE
//!       serve firmware files over HTTPS (own CA in DIR) until SIGTERM; writes the base URL

use std::path::PathBuf;

use anyhow::Context as _;

fn arg(args: &[String], flag: &str) -> anyhow::Result<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .with_context(|| format!("missing {flag}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: local-fleet issuer|gateway-pki|provision|artifacts ... (see the source header)";
    match args.first().map(String::as_str) {
        Some("gateway-pki") => {
            let dir = PathBuf::from(arg(&args, "--dir")?);
            e2e::fleet::ServerPki::generate(&dir)?;
            eprintln!("local-fleet: gateway certificates in {}", dir.display());
        }
        Some("issuer") => {
            let ns = arg(&args, "--namespace")?;
            let name = arg(&args, "--name")?;
            let ca_out = PathBuf::from(arg(&args, "--ca-out")?);
            let client = kube::Client::try_default().await?;
            let issuer = e2e::issuer::start(client, &ns, &name)?;
            std::fs::write(&ca_out, &issuer.ca_pem)?;
            eprintln!(
                "local-fleet: issuer {name} serving {ns}; CA in {}",
                ca_out.display()
            );
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
            drop(issuer);
        }
        Some("provision") => {
            let ns = arg(&args, "--namespace")?;
            let group = arg(&args, "--group")?;
            let model = arg(&args, "--model")?;
            let secret = arg(&args, "--secret")?;
            let prefix = arg(&args, "--prefix").unwrap_or_else(|_| "sim".into());
            let count: usize = arg(&args, "--count")?
                .parse()
                .context("--count is not a number")?;
            let out = PathBuf::from(arg(&args, "--out")?);
            let client = kube::Client::try_default().await?;
            let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i:04}")).collect();
            let tokens =
                e2e::fleet::provision(&client, &ns, &group, &model, &secret, &names).await?;
            std::fs::write(&out, serde_json::to_string(&tokens)?)?;
            eprintln!(
                "local-fleet: {count} devices in {ns}, tokens in {}",
                out.display()
            );
        }
        Some("artifacts") => {
            let dir = PathBuf::from(arg(&args, "--dir")?);
            let url_out = PathBuf::from(arg(&args, "--url-out")?);
            let server = e2e::artifacts::ArtifactServer::start(&dir).await?;
            for pair in args.windows(2).filter(|w| w[0] == "--serve").map(|w| &w[1]) {
                let (path, file) = pair
                    .split_once('=')
                    .with_context(|| format!("--serve {pair}: expected /url/path=FILE"))?;
                let bytes = std::fs::read(file).with_context(|| format!("cannot read {file}"))?;
                eprintln!("local-fleet: serving {}", server.put(path, bytes));
            }
            std::fs::write(&url_out, &server.base_url)?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        }
        _ => anyhow::bail!("{usage}"),
    }
    Ok(())
}
