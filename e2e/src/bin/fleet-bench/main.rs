//! `fleet-bench`: Fleetwarden's scale figures, measured against the local control plane in one
//! run and written to `docs/benchmarks.md`.
//!
//!   cargo build --release --workspace --bins
//!   FLEETWARDEN_E2E_PROFILE=release cargo run --release -p e2e --bin fleet-bench -- \
//!       --devices 1000,10000 --out docs/benchmarks.md
//!
//! For each fleet size it starts an operator, a gateway and the test issuer, provisions the
//! Devices, runs the fleet simulator (real keys, real CSRs, mutual TLS with session resumption)
//! and measures: enrollment convergence against its floor (the same number of API writes issued
//! directly at the API server's measured write throughput), steady-state check-ins, a four-wave
//! rollout with zero soak, idle writes, and peak memory of the operator and the gateway.

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use crds::{Device, DeviceGroup, UpdateRollout, conditions, firmware, rollout::RolloutPhase};
use e2e::{
    Env, Gateway, Operator, Process, artifacts::ArtifactServer, eventually, fleet, http_get,
};
use ed25519_dalek::SigningKey;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde_json::{Value, json};

mod replay;

const TRUST_DOMAIN: &str = "fleet.bench";
const MODEL: &str = "acme-pressctl-v3";
const OLD: &str = "4.1.3";
const NEW: &str = "4.2.0";
/// Devices per DeviceGroup (and per enrollment-token Secret).
const GROUP_SIZE: usize = 2500;

struct Args {
    sizes: Vec<usize>,
    out: Option<PathBuf>,
    interval: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        sizes: vec![1000, 10_000],
        out: None,
        interval: Duration::from_secs(5),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--devices" => {
                a.sizes = it
                    .next()
                    .context("--devices needs a list, e.g. 1000,10000")?
                    .split(',')
                    .map(|n| n.trim().parse().context("--devices: not a number"))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--out" => a.out = Some(it.next().context("--out needs a path")?.into()),
            "--check-in-interval" => {
                let d: crds::common::Duration = it
                    .next()
                    .context("--check-in-interval needs a duration")?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--check-in-interval: {e}"))?;
                a.interval = d.get();
            }
            "-h" | "--help" => {
                eprintln!(
                    "usage: fleet-bench [--devices 1000,10000] [--check-in-interval 5s] [--out docs/benchmarks.md]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    Ok(a)
}

fn say(msg: impl AsRef<str>) {
    eprintln!("fleet-bench: {}", msg.as_ref());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let started = Instant::now();
    let env = Arc::new(Env::start().await?);
    let result = run(&env, &args).await;
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => say("environment still in use; control plane left running"),
    }
    let report = result?;
    say(format!(
        "finished in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
        say(format!("wrote {}", out.display()));
    }
    Ok(())
}

/// CPU time (seconds) of every process on the machine that takes part in a run.
#[derive(Clone, Copy, Default, Debug)]
struct Cpu {
    api_server: f64,
    etcd: f64,
    controller_manager: f64,
    operator: f64,
    gateway: f64,
    simulator: f64,
    /// This process (mostly the test issuer).
    benchmark: f64,
}

impl Cpu {
    /// Now; a simulator not started yet counts as zero.
    fn now(env: &Env, operator: &Process, gateway: &Process, simulator: Option<&Process>) -> Self {
        let nan = f64::NAN;
        let of = |p: &Process| p.pid().and_then(e2e::cpu_seconds).unwrap_or(nan);
        Cpu {
            api_server: env
                .control_plane_cpu_seconds("kube-apiserver")
                .unwrap_or(nan),
            etcd: env.control_plane_cpu_seconds("etcd").unwrap_or(nan),
            controller_manager: env
                .control_plane_cpu_seconds("kube-controller-manager")
                .unwrap_or(nan),
            operator: of(operator),
            gateway: of(gateway),
            simulator: simulator.map_or(0.0, of),
            benchmark: e2e::cpu_seconds(std::process::id()).unwrap_or(nan),
        }
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            api_server: self.api_server - start.api_server,
            etcd: self.etcd - start.etcd,
            controller_manager: self.controller_manager - start.controller_manager,
            operator: self.operator - start.operator,
            gateway: self.gateway - start.gateway,
            simulator: self.simulator - start.simulator,
            benchmark: self.benchmark - start.benchmark,
        }
    }
}

fn enrolled(d: &Device) -> bool {
    d.status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Enrolled"))
}

#[derive(Default, Debug)]
struct Figures {
    devices: usize,
    enroll_seconds: f64,
    enroll_writes: f64,
    floor_seconds: f64,
    /// The floor at the small-object write rate measured first.
    small_floor_seconds: f64,
    floor_timings: replay::Timings,
    /// API server CPU seconds used during the floor replay.
    floor_api_cpu: f64,
    /// CPU seconds each process used during the enrollment.
    enroll_cpu: Cpu,
    checkins_per_second: f64,
    offered_per_second: f64,
    checkin_p50_ms: f64,
    checkin_p99_ms: f64,
    writes_per_1000_checkins: f64,
    rollout_seconds: f64,
    rollout_operator_writes: f64,
    rollout_gateway_writes: f64,
    idle_writes_per_minute: f64,
    operator_peak_rss: u64,
    gateway_peak_rss: u64,
    simulator: Value,
}

async fn run(env: &Arc<Env>, args: &Args) -> anyhow::Result<String> {
    let throughput = write_throughput(env).await?;
    say(format!(
        "API server: {:.0} creates/s, {:.0} patches/s",
        throughput.0, throughput.1
    ));
    let mut all = Vec::new();
    for &n in &args.sizes {
        let f = fleet(env, n, args.interval, throughput).await?;
        say(format!("{n} devices: {f:?}"));
        all.push(f);
        // Keep what is measured so far, should a larger size not finish.
        if let Some(out) = &args.out {
            std::fs::write(out, render(args, throughput, &all))?;
        }
    }
    Ok(render(args, throughput, &all))
}

/// The API server's write throughput on this machine: 2000 small creates and 2000 server-side
/// apply patches, 64 in flight (the concurrency our processes use).
async fn write_throughput(env: &Env) -> anyhow::Result<(f64, f64)> {
    let ns = env.namespace("bench-throughput").await?;
    let api: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    const N: usize = 2000;
    let start = Instant::now();
    futures::stream::iter(0..N)
        .map(|i| {
            let api = api.clone();
            async move {
                let cm: ConfigMap = serde_json::from_value(json!({
                    "metadata": {"name": format!("w-{i}")}, "data": {"state": "a"}
                }))?;
                api.create(&PostParams::default(), &cm).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let creates = N as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    futures::stream::iter(0..N)
        .map(|i| {
            let api = api.clone();
            async move {
                api.patch(
                    &format!("w-{i}"),
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(
                        json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"state": "b"}}),
                    ),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    let patches = N as f64 / start.elapsed().as_secs_f64();
    Ok((creates, patches))
}

/// The operator's API writes so far, by resource.
async fn writes_by_resource(port: u16) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let (_, body) = http_get(port, "/metrics").await?;
    let mut out = std::collections::BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| l.starts_with("fleetwarden_operator_api_writes_total{"))
    {
        let resource = line
            .split("resource=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .context("a write metric without a resource")?;
        let value: f64 = line
            .rsplit_once(' ')
            .context("malformed metric")?
            .1
            .trim()
            .parse()?;
        *out.entry(resource.to_string()).or_insert(0.0) += value;
    }
    Ok(out)
}

async fn metric(port: u16, prefix: &str) -> anyhow::Result<f64> {
    let (status, body) = http_get(port, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}");
    Ok(e2e::sum_metric(&body, prefix))
}

/// Cumulative histogram buckets (`le` -> count) of the series of `name` carrying `label`.
async fn buckets(port: u16, name: &str, label: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    let (_, body) = http_get(port, "/metrics").await?;
    let prefix = format!("{name}_bucket{{");
    let mut out = Vec::new();
    for line in body
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
    {
        let (labels, value) = line.rsplit_once(' ').context("malformed bucket")?;
        let le = labels
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .context("bucket without le")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        out.push((le, value.trim().parse()?));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(out)
}

/// The bucket bound below which `q` of the observations between two scrapes fall.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let prev = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - prev)
        })
        .collect();
    let total = deltas.last().map_or(0.0, |(_, c)| *c);
    deltas
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::NAN, |(le, _)| *le)
}

/// Where enrollment time goes, from the objects' timestamps (second resolution): Device
/// created -> CSR recorded by the gateway -> CertificateRequest created -> issued -> Enrolled.
async fn stages(env: &Env, ns: &str, devices: &[Arc<Device>]) {
    use crds::certmanager::CertificateRequest;
    let requests: Api<CertificateRequest> = Api::namespaced(env.client.clone(), ns);
    let Ok(list) = requests.list(&Default::default()).await else {
        return;
    };
    let by_owner: std::collections::HashMap<String, &CertificateRequest> = list
        .items
        .iter()
        .filter_map(|cr| {
            let owner = cr.metadata.owner_references.as_ref()?.first()?;
            Some((owner.name.clone(), cr))
        })
        .collect();
    let mut gaps: [Vec<i64>; 4] = Default::default();
    for d in devices {
        let name = d.metadata.name.clone().unwrap_or_default();
        let (Some(created), Some(status), Some(cr)) = (
            d.metadata.creation_timestamp.as_ref(),
            d.status.as_ref(),
            by_owner.get(&name),
        ) else {
            continue;
        };
        let csr = status.enrollment.as_ref().map(|e| e.requested_at.0);
        let cr_created = cr.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let issued = cr
            .status
            .as_ref()
            .and_then(|s| crds::certmanager::find_condition(&s.conditions, "Ready"))
            .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0));
        let enrolled =
            conditions::find(&status.conditions, "Enrolled").map(|c| c.last_transition_time.0);
        let points = [Some(created.0), csr, cr_created, issued, enrolled];
        for (i, gap) in gaps.iter_mut().enumerate() {
            if let (Some(a), Some(b)) = (points[i], points[i + 1]) {
                gap.push(b.as_second() - a.as_second());
            }
        }
    }
    let describe = |v: &mut Vec<i64>| {
        v.sort_unstable();
        if v.is_empty() {
            return "-".to_string();
        }
        format!(
            "p50 {}s p99 {}s",
            v[v.len() / 2],
            v[(v.len() * 99 / 100).min(v.len() - 1)]
        )
    };
    let [a, b, c, d] = &mut gaps;
    say(format!(
        "enrollment stages: created->CSR {}, CSR->CertificateRequest {}, ->issued {}, ->Enrolled {}",
        describe(a),
        describe(b),
        describe(c),
        describe(d)
    ));
}

fn peak_rss(process: &Process) -> u64 {
    process
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn fleet(
    env: &Arc<Env>,
    n: usize,
    interval: Duration,
    throughput: (f64, f64),
) -> anyhow::Result<Figures> {
    let mut f = Figures {
        devices: n,
        ..Figures::default()
    };
    let ns = env.namespace(&format!("bench-{n}")).await?;
    let dir = env.scratch.join(&ns);
    std::fs::create_dir_all(&dir)?;
    let issuer = e2e::issuer::start(env.client.clone(), &ns, "bench-ca")?;
    let vendor = SigningKey::from_bytes(&[77; 32]);
    let groups: Api<DeviceGroup> = Api::namespaced(env.client.clone(), &ns);
    // A token Secret holds at most about 4000 tokens (Secrets are limited to 1 MiB), so large
    // fleets are split into groups of GROUP_SIZE, each with its own Secret; the first group is
    // also a zone.
    let group_count = n.div_ceil(GROUP_SIZE);
    let group_names: Vec<String> = (0..group_count).map(|g| format!("plant-{g}")).collect();
    for (g, name) in group_names.iter().enumerate() {
        let mut spec = json!({
            "certificates": {"issuerRef": issuer.issuer_ref(), "trustDomain": TRUST_DOMAIN},
            "enrollment": {"tokenSecretRef": {"name": format!("{name}-tokens")}},
            "firmware": {"trustedKeys": [{"keyId": "vendor", "publicKey": firmware::public_key_base64(&vendor.verifying_key())}]},
            "checkInInterval": format!("{}s", interval.as_secs().max(1)),
        });
        if g == 0 {
            spec["segmentation"] = json!({"zone": format!("z-{ns}"), "workloadSelector": {"matchLabels": {"app": "scada"}},
                             "deviceCIDRs": ["10.90.0.0/16"], "ports": [{"port": 4840}]});
        }
        let group: DeviceGroup = serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": name},
            "spec": spec,
        }))?;
        groups.create(&PostParams::default(), &group).await?;
    }
    let operator: Operator = env.start_operator(&ns, "operator").await?;
    let gateway: Gateway = env.start_gateway(&ns, &issuer.ca_pem, &[]).await?;
    let artifacts = ArtifactServer::start(&dir.join("artifacts")).await?;

    // Enrollment: from the first Device created to the last one Enrolled=True. The operator
    // counts the certificates it writes to Device status (with Enrolled=True), and its /metrics
    // is read locally: a Device watch here would be one more watcher the API server sends every
    // change to, and decoding them would take CPU from the processes being measured.
    let devices: Api<Device> = Api::namespaced(env.client.clone(), &ns);
    const ISSUED: &str = "fleetwarden_operator_identities_written_total{change=\"issued\"}";
    let issued0 = metric(operator.port, ISSUED).await?;
    let by_kind0 = writes_by_resource(operator.port).await?;
    let (op0, gw0, is0) = (
        metric(operator.port, "fleetwarden_operator_api_writes_total").await?,
        metric(
            gateway.metrics_port,
            "fleetwarden_gateway_status_writes_total",
        )
        .await?,
        e2e::issuer::WRITES.load(Ordering::Relaxed) as f64,
    );
    let names: Vec<String> = (0..n).map(|i| format!("dev-{i:05}")).collect();
    say(format!("{n}: provisioning"));
    let cpu0 = Cpu::now(env, &operator.process, &gateway.process, None);
    let t0 = Instant::now();
    let mut provisioned = Vec::with_capacity(n);
    for (chunk, group) in names.chunks(GROUP_SIZE).zip(&group_names) {
        provisioned.extend(
            fleet::provision(
                &env.client,
                &ns,
                group,
                MODEL,
                &format!("{group}-tokens"),
                chunk,
            )
            .await?,
        );
    }
    let list = dir.join("devices.json");
    std::fs::write(&list, serde_json::to_string(&provisioned)?)?;
    let gateway_url = gateway.url();
    let interval_arg = format!("{}s", interval.as_secs().max(1));
    // A mass enrollment: up to a thousand devices at once, as when a site is commissioned.
    let concurrency = n.min(1000).to_string();
    let key_arg = format!(
        "vendor={}",
        firmware::public_key_base64(&vendor.verifying_key())
    );
    // The simulated devices' keys, CSRs and TLS clients run on the devices in a real fleet, not
    // on the control-plane host: here they only get CPU that the API server, etcd, the operator,
    // the gateway and the issuer leave idle.
    let sim = env.spawn_low_priority(
        "fleetwarden-agent",
        &format!("{ns}-sim"),
        &[
            "simulate",
            "--gateway",
            &gateway_url,
            "--gateway-ca",
            gateway.ca_file.to_str().unwrap_or_default(),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            list.to_str().unwrap_or_default(),
            "--duration",
            "2h",
            "--check-in-interval",
            &interval_arg,
            "--enroll-concurrency",
            &concurrency,
            "--firmware-version",
            OLD,
            "--security-version",
            "12",
            "--hardware-model",
            MODEL,
            "--firmware-key",
            &key_arg,
            "--artifact-ca",
            artifacts.ca_file.to_str().unwrap_or_default(),
            "--progress",
        ],
    )?;
    let mut last_report = Instant::now();
    loop {
        let done = (metric(operator.port, ISSUED).await? - issued0).round() as usize;
        if done >= n {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            say(format!(
                "{n}: {done} enrolled after {:.0}s",
                t0.elapsed().as_secs_f64()
            ));
            last_report = Instant::now();
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("{n}: only {done} devices enrolled within an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f.enroll_seconds = t0.elapsed().as_secs_f64();
    f.enroll_cpu = Cpu::now(env, &operator.process, &gateway.process, Some(&sim)).since(cpu0);
    let (op1, gw1, is1) = (
        metric(operator.port, "fleetwarden_operator_api_writes_total").await?,
        metric(
            gateway.metrics_port,
            "fleetwarden_gateway_status_writes_total",
        )
        .await?,
        e2e::issuer::WRITES.load(Ordering::Relaxed) as f64,
    );
    // From here on the benchmark follows the Devices through a watch. Its first list confirms
    // the operator's count: every Device is Enrolled=True.
    let (store, writer) = reflector::store();
    let watch = tokio::spawn(
        watcher(devices.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .for_each(|_| futures::future::ready(())),
    );
    store
        .wait_until_ready()
        .await
        .context("listing the enrolled Devices")?;
    eventually(
        Duration::from_secs(60),
        "every Device to show Enrolled=True, as the operator counted",
        || async {
            let count = store.state().iter().filter(|d| enrolled(d)).count();
            Ok((count == n).then_some(()))
        },
    )
    .await?;
    stages(env, &ns, &store.state()).await;
    if let Ok((_, body)) = http_get(operator.port, "/metrics").await {
        let lines: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("fleetwarden_operator_api_writes_total"))
            .collect();
        say(format!("{n}: operator writes by resource: {lines:?}"));
    }
    // Device creates, the token Secrets, and every write the components made.
    let creates = (n + group_count) as f64;
    let patches = (op1 - op0) + (gw1 - gw0) + (is1 - is0);
    f.enroll_writes = creates + patches;
    f.small_floor_seconds = creates / throughput.0 + patches / throughput.1;
    let by_kind = writes_by_resource(operator.port).await?;
    let delta = |resource: &str| {
        let d = by_kind.get(resource).copied().unwrap_or(0.0)
            - by_kind0.get(resource).copied().unwrap_or(0.0);
        d.max(0.0).round() as usize
    };
    let known = [
        "devices",
        "devices/status",
        "certificaterequests",
        "certificaterequests/status",
        "events",
    ];
    let other: f64 = by_kind
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| v - by_kind0.get(k).copied().unwrap_or(0.0))
        .sum();
    let counts = replay::Counts {
        device_creates: n,
        secret_creates: group_count,
        device_patches: delta("devices"),
        device_status: delta("devices/status")
            + (gw1 - gw0).round() as usize
            + other.round() as usize,
        request_creates: delta("certificaterequests"),
        request_status: delta("certificaterequests/status") + (is1 - is0).round() as usize,
        events: delta("events"),
    };
    say(format!(
        "{n}: enrolled in {:.1}s with {:.0} writes ({:?}; at the small-object rate {:.1}s)",
        f.enroll_seconds, f.enroll_writes, counts, f.small_floor_seconds
    ));
    say(format!(
        "{n}: CPU seconds during the enrollment: {:?}",
        f.enroll_cpu
    ));

    // Steady state: wait for every device to report, then measure a window of check-ins.
    eventually(
        Duration::from_secs(600),
        "every device to report its firmware",
        || async {
            Ok((store
                .state()
                .iter()
                .filter(|d| {
                    d.status
                        .as_ref()
                        .and_then(|s| s.reported.as_ref())
                        .is_some()
                })
                .count()
                == n)
                .then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(interval * 2).await;
    let window = Duration::from_secs(30).max(interval * 4);
    let labels = "endpoint=\"checkin\"";
    let hist = "fleetwarden_gateway_request_duration_seconds";
    let (c0, w0, b0) = (
        metric(gateway.metrics_port, "fleetwarden_gateway_checkins_total").await?,
        metric(
            gateway.metrics_port,
            "fleetwarden_gateway_status_writes_total",
        )
        .await?,
        buckets(gateway.metrics_port, hist, labels).await?,
    );
    let w_start = Instant::now();
    tokio::time::sleep(window).await;
    let (c1, w1, b1) = (
        metric(gateway.metrics_port, "fleetwarden_gateway_checkins_total").await?,
        metric(
            gateway.metrics_port,
            "fleetwarden_gateway_status_writes_total",
        )
        .await?,
        buckets(gateway.metrics_port, hist, labels).await?,
    );
    let secs = w_start.elapsed().as_secs_f64();
    f.checkins_per_second = (c1 - c0) / secs;
    f.offered_per_second = n as f64 / interval.as_secs_f64();
    f.writes_per_1000_checkins = if c1 > c0 {
        (w1 - w0) * 1000.0 / (c1 - c0)
    } else {
        f64::NAN
    };
    f.checkin_p50_ms = quantile(&b0, &b1, 0.50) * 1000.0;
    f.checkin_p99_ms = quantile(&b0, &b1, 0.99) * 1000.0;
    say(format!(
        "{n}: {:.0} check-ins/s (offered {:.0}/s), p50 <= {} ms, p99 <= {} ms, {:.2} writes per 1000",
        f.checkins_per_second,
        f.offered_per_second,
        f.checkin_p50_ms,
        f.checkin_p99_ms,
        f.writes_per_1000_checkins
    ));

    // Rollout: four waves, zero soak.
    let image: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let url = artifacts.put("/fw/4.2.0.bin", image.clone());
    let mut manifest: crds::rollout::FirmwareManifest = serde_json::from_value(json!({
        "version": NEW, "securityVersion": 12, "sha256": crds::hex_sha256(&image),
        "sizeBytes": image.len(), "hardwareModels": [MODEL],
        "expires": (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24)).to_string(),
        "url": url, "signature": {"keyId": "", "value": ""}
    }))?;
    firmware::sign(&mut manifest, "vendor", &vendor);
    let rollouts: Api<UpdateRollout> = Api::namespaced(env.client.clone(), &ns);
    let rollout: UpdateRollout = serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout", "metadata": {"name": "to-4-2"},
        "spec": {"target": {"groups": group_names}, "firmware": manifest, "successThresholdPercent": 100,
                 "deviceTimeout": "30m",
                 "waves": [{"percent": 5}, {"percent": 20}, {"percent": 50}, {"percent": 100}]}
    }))?;
    let (op0, gw0) = (
        metric(operator.port, "fleetwarden_operator_api_writes_total").await?,
        metric(
            gateway.metrics_port,
            "fleetwarden_gateway_status_writes_total",
        )
        .await?,
    );
    let t0 = Instant::now();
    rollouts.create(&PostParams::default(), &rollout).await?;
    loop {
        let r = rollouts.get("to-4-2").await?;
        let status = r.status.unwrap_or_default();
        match status.phase {
            Some(RolloutPhase::Succeeded) => break,
            Some(RolloutPhase::Failed | RolloutPhase::RolledBack) => {
                bail!(
                    "{n}: the rollout ended {:?}: {:?}",
                    status.phase,
                    status.totals
                )
            }
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("{n}: rollout not done within an hour: {:?}", status.totals);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f.rollout_seconds = t0.elapsed().as_secs_f64();
    f.rollout_operator_writes =
        metric(operator.port, "fleetwarden_operator_api_writes_total").await? - op0;
    f.rollout_gateway_writes = metric(
        gateway.metrics_port,
        "fleetwarden_gateway_status_writes_total",
    )
    .await?
        - gw0;
    say(format!(
        "{n}: rollout Succeeded in {:.1}s; {:.0} operator writes, {:.0} gateway writes",
        f.rollout_seconds, f.rollout_operator_writes, f.rollout_gateway_writes
    ));

    // Idle: a converged fleet that keeps checking in, with nothing changing.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let i0 = metric(operator.port, "fleetwarden_operator_api_writes_total").await?;
    tokio::time::sleep(Duration::from_secs(60)).await;
    f.idle_writes_per_minute =
        metric(operator.port, "fleetwarden_operator_api_writes_total").await? - i0;

    f.operator_peak_rss = peak_rss(&operator.process);
    f.gateway_peak_rss = peak_rss(&gateway.process);
    let mut sim = sim;
    sim.terminate(Duration::from_secs(60)).await?;
    f.simulator = sim.simulator_report().unwrap_or(Value::Null);
    // The floor, with the fleet, the operator and the gateway stopped so nothing competes
    // with the replay.
    let devices_now = store.state();
    watch.abort();
    drop((operator, gateway, issuer, artifacts));
    {
        use crds::certmanager::CertificateRequest;
        let requests: Api<CertificateRequest> = Api::namespaced(env.client.clone(), &ns);
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(env.client.clone(), &ns);
        let mut token_secrets = Vec::new();
        for g in &group_names {
            token_secrets.push(secrets.get(&format!("{g}-tokens")).await?);
        }
        let requests = requests.list(&Default::default()).await?.items;
        let floor_ns = env.namespace(&format!("bench-floor-{n}")).await?;
        say(format!(
            "{n}: replaying {} writes for the floor",
            counts.total()
        ));
        let cpu0 = env
            .control_plane_cpu_seconds("kube-apiserver")
            .unwrap_or(f64::NAN);
        f.floor_timings = replay::run(
            &env.client,
            &floor_ns,
            &counts,
            &devices_now,
            &requests,
            &token_secrets,
        )
        .await
        .context("replaying the enrollment's writes")?;
        f.floor_api_cpu = env
            .control_plane_cpu_seconds("kube-apiserver")
            .unwrap_or(f64::NAN)
            - cpu0;
        let _ = env
            .kubectl_run(&["delete", "namespace", &floor_ns, "--wait=false"])
            .await;
    }
    f.floor_seconds = f.floor_timings.values().map(|(_, s)| s).sum();
    say(format!(
        "{n}: enrollment floor {:.1}s ({:.2}x): {:?}",
        f.floor_seconds,
        f.enroll_seconds / f.floor_seconds,
        f.floor_timings
    ));
    // The namespace goes with the run; delete the devices now so the next size starts clean.
    let _ = env
        .kubectl_run(&["delete", "namespace", &ns, "--wait=false"])
        .await;
    Ok(f)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cores();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0),
        );
    format!("{cores} cores ({cpu}), {mem} RAM")
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / 1024.0 / 1024.0)
}

fn render(args: &Args, throughput: (f64, f64), all: &[Figures]) -> String {
    let mut s = String::new();
    let profile = std::env::var("FLEETWARDEN_E2E_PROFILE").unwrap_or_else(|_| "debug".into());
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Measured by `fleet-bench` against the local control plane (kube-apiserver 1.20.2 built \
         from Debian's sources, etcd 3.4, on loopback), with the operator, the gateway, the test \
         issuer, the fleet simulator (at nice 19) and the API server all sharing one machine: {}. Binaries: \
         `{profile}` profile. Check-in interval {}s.\n",
        machine(),
        args.interval.as_secs()
    );
    let _ = writeln!(
        s,
        "Reproduce:\n\n```sh\ncargo build --release --workspace --bins\nFLEETWARDEN_E2E_PROFILE=release cargo run --release -p e2e --bin fleet-bench -- \\\n  --devices {} --out docs/benchmarks.md\n```\n",
        args.sizes
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    let _ = writeln!(
        s,
        "API server write throughput on this machine (64 in flight): {:.0} creates/s, {:.0} \
         server-side-apply patches/s.\n",
        throughput.0, throughput.1
    );
    let _ = writeln!(
        s,
        "| figure | {} |",
        all.iter()
            .map(|f| format!("{} devices", f.devices))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(all.len()));
    let row = |s: &mut String, name: &str, cell: &dyn Fn(&Figures) -> String| {
        let _ = writeln!(
            s,
            "| {name} | {} |",
            all.iter().map(cell).collect::<Vec<_>>().join(" | ")
        );
    };
    row(&mut s, "enrollment: created to all Enrolled=True", &|f| {
        format!(
            "{:.1} s ({:.0}/s)",
            f.enroll_seconds,
            f.devices as f64 / f.enroll_seconds
        )
    });
    row(
        &mut s,
        "enrollment: API writes (creates, gateway, operator, issuer)",
        &|f| {
            format!(
                "{:.0} ({:.1} per device)",
                f.enroll_writes,
                f.enroll_writes / f.devices as f64
            )
        },
    );
    row(
        &mut s,
        "enrollment floor: the same writes replayed directly",
        &|f| format!("{:.1} s", f.floor_seconds),
    );
    row(&mut s, "enrollment / floor", &|f| {
        format!("{:.2}x", f.enroll_seconds / f.floor_seconds)
    });
    row(
        &mut s,
        "API server CPU, enrollment / floor (cores used on average)",
        &|f| {
            format!(
                "{:.0} s ({:.2}) / {:.0} s ({:.2})",
                f.enroll_cpu.api_server,
                f.enroll_cpu.api_server / f.enroll_seconds,
                f.floor_api_cpu,
                f.floor_api_cpu / f.floor_seconds
            )
        },
    );
    row(
        &mut s,
        "CPU during enrollment, seconds: API server / etcd / controller manager / operator / \
        gateway / simulator / benchmark (issuer)",
        &|f| {
            let c = f.enroll_cpu;
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0} / {:.0} / {:.0} / {:.0} (of {:.0})",
                c.api_server,
                c.etcd,
                c.controller_manager,
                c.operator,
                c.gateway,
                c.simulator,
                c.benchmark,
                f.enroll_seconds * cores() as f64
            )
        },
    );
    row(
        &mut s,
        "as many writes at the small-object rate above; enrollment / that",
        &|f| {
            format!(
                "{:.1} s; {:.2}x",
                f.small_floor_seconds,
                f.enroll_seconds / f.small_floor_seconds
            )
        },
    );
    row(&mut s, "check-ins per second (offered)", &|f| {
        format!("{:.0} ({:.0})", f.checkins_per_second, f.offered_per_second)
    });
    row(
        &mut s,
        "check-in latency at the gateway, p50 / p99 (bucket bound)",
        &|f| format!("<= {} ms / <= {} ms", f.checkin_p50_ms, f.checkin_p99_ms),
    );
    row(
        &mut s,
        "check-in latency at the devices over the run, p50 / p99",
        &|f| {
            format!(
                "{:.1} ms / {:.1} ms",
                f.simulator["checkinP50Ms"].as_f64().unwrap_or(f64::NAN),
                f.simulator["checkinP99Ms"].as_f64().unwrap_or(f64::NAN)
            )
        },
    );
    row(&mut s, "steady-state API writes per 1000 check-ins", &|f| {
        format!("{:.2}", f.writes_per_1000_checkins)
    });
    row(
        &mut s,
        "rollout, 4 waves, zero soak: start to Succeeded",
        &|f| format!("{:.1} s", f.rollout_seconds),
    );
    row(&mut s, "rollout API writes: operator / gateway", &|f| {
        format!(
            "{:.0} / {:.0} ({:.2} per device)",
            f.rollout_operator_writes,
            f.rollout_gateway_writes,
            f.rollout_gateway_writes / f.devices as f64
        )
    });
    row(&mut s, "idle operator API writes per minute", &|f| {
        format!("{:.0}", f.idle_writes_per_minute)
    });
    row(&mut s, "peak RSS: operator", &|f| {
        format!(
            "{} ({:.1} KiB/device)",
            mib(f.operator_peak_rss),
            f.operator_peak_rss as f64 / 1024.0 / f.devices as f64
        )
    });
    row(&mut s, "peak RSS: gateway", &|f| {
        format!(
            "{} ({:.1} KiB/device)",
            mib(f.gateway_peak_rss),
            f.gateway_peak_rss as f64 / 1024.0 / f.devices as f64
        )
    });
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Definitions: enrollment runs the real path (device key and CSR in the simulator, EST \
        enrollment through the gateway with a single-use token, CSR policy and approval in the operator, \
        signing by the test issuer, identity copied to status) with up to 1000 enrollments in flight; \
        its end is when the operator's count of certificates written to Device status reaches the \
        fleet's size (its /metrics, read locally), confirmed by the Devices' own conditions. Its floor \
        is the same writes issued directly at the API server, 64 in flight, after the run: as many Device \
        creates, finalizer patches, Device status writes (alternately the operator's and the gateway's part \
        of each Device's final status), CertificateRequest creates (the real requests) and status writes \
        (verdict, then the issuer's answer) and Events as the run made, into a namespace of their own. \
        The small-object figure prices the same number of writes at the ConfigMap rates measured first; \
        Devices and CertificateRequests are custom resources several kilobytes large, and every write of \
        them goes through server-side apply and schema validation, so they cost the API server more. \
        The simulated fleet runs at the lowest CPU priority (nice 19): on a real fleet its key \
        generation, CSRs and TLS clients run on the devices, so here it gets only the CPU that the API \
        server, etcd, the operator, the gateway and the issuer leave idle. \
        Check-ins run over mutual TLS with session resumption; the \
        offered rate is devices / interval, so the achieved rate equals it unless the gateway (sharing the \
        CPU with the simulator's TLS clients) saturates. Writes per 1000 check-ins count Device status \
        writes by the gateway over a 30 s window after every device has reported once; in steady state \
        they are only `lastSeen` refreshes, due once per 120 check-ins of a device (the gateway's \
        default, here every 10 minutes), so the long-run figure is 1000 / 120 = 8.3 and a window less \
        than 10 minutes after the fleet enrolled sees none. Idle writes are counted over 60 s \
        with the fleet converged and still checking in. Peak RSS is VmHWM of each process. API server \
        CPU is the kube-apiserver process's user and system time over the enrollment and over the \
        floor replay: the enrollment's extra (the fleet's watchers: operator, gateway and the \
        controller manager's garbage collector, each sent every Device change) and the share \
        of the two cores it gets while the other processes run. The CPU row splits the enrollment's \
        CPU time among the processes on the machine (the last figure is wall time times cores).\n"
    );
    let _ = writeln!(s, "Floor replay, writes and seconds per kind:\n");
    for f in all {
        let kinds: Vec<String> = f
            .floor_timings
            .iter()
            .map(|(k, (n, secs))| format!("{k} {n} in {secs:.1} s"))
            .collect();
        let _ = writeln!(s, "- {} devices: {}", f.devices, kinds.join(", "));
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "Simulator reports (client side, whole run):\n");
    for f in all {
        let _ = writeln!(s, "- {} devices: `{}`", f.devices, f.simulator);
    }
    s
}
