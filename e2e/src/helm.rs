//! The real `helm`: `FLEETWARDEN_HELM`, else `helm` on the PATH, else the copy
//! `e2e/control-plane.sh helm` keeps in the cache. Rendering helpers for the chart tests.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use tokio::process::Command;

pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FLEETWARDEN_HELM") {
        return Ok(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("helm");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let cache = std::env::var_os("FLEETWARDEN_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fleetwarden")))
        .context("no HOME to find the helm cache in")?;
    let cached = cache.join("helm/helm");
    if cached.is_file() {
        return Ok(cached);
    }
    bail!("helm not found: run e2e/control-plane.sh helm (or set FLEETWARDEN_HELM)")
}

/// The chart directory.
pub fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/fleetwarden")
}

/// Runs helm with `args`; (success, stdout, stderr).
pub async fn run(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(binary()?)
        .args(args)
        .output()
        .await
        .context("running helm")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `helm template` of the chart with `--set` values; the manifests as JSON values.
pub async fn template(
    release: &str,
    namespace: &str,
    sets: &[&str],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let chart = chart();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    let mut args = vec!["template", release, chart, "--namespace", namespace];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, stdout, stderr) = run(&args).await?;
    if !ok {
        bail!("helm template failed: {stderr}");
    }
    parse(&stdout)
}

pub fn parse(stream: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(stream) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(doc).context("helm printed invalid YAML")?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}
