//! Signed OTA rollouts against the real API server: firmware signed with `kubectl fleet sign`,
//! rollouts applied with `kubectl`, simulated devices that download over HTTPS and verify
//! everything, the operator counting waves, and `kubectl fleet` steering.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail, ensure};
use crds::{Device, DeviceGroup, UpdateRollout, rollout::RolloutPhase};
use e2e::{Env, Gateway, Operator, Process, artifacts::ArtifactServer, eventually, fleet, tail};
use k8s_openapi::api::core::v1::Event;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::process::Command;

const TRUST_DOMAIN: &str = "fleet.e2e";
const MODEL: &str = "acme-pressctl-v3";
const OLD: &str = "4.1.3";
const NEW: &str = "4.2.0";

struct Rig {
    env: Arc<Env>,
    ns: String,
    _issuer: e2e::issuer::TestIssuer,
    operator: Operator,
    gateway: Gateway,
    artifacts: ArtifactServer,
    dir: PathBuf,
    /// The vendor's signing key file and its trustedKeys entry.
    vendor_key: PathBuf,
    vendor_trusted: Value,
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Deterministic image bytes of `len` (xorshift), different per `seed`.
fn image(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn rig(env: &Arc<Env>, test: &str) -> anyhow::Result<Rig> {
    let ns = env.namespace(test).await?;
    let issuer = e2e::issuer::start(env.client.clone(), &ns, "e2e-ca")?;
    let dir = env.scratch.join(&ns);
    std::fs::create_dir_all(&dir)?;
    let artifacts = ArtifactServer::start(&dir.join("artifacts-pki")).await?;
    let operator = env.start_operator(&ns, "operator-a").await?;
    let gateway = env.start_gateway(&ns, &issuer.ca_pem, &[]).await?;
    let vendor_key = dir.join("vendor.pem");
    let vendor_trusted = keygen(env, "vendor-2026", &vendor_key).await?;
    Ok(Rig {
        env: env.clone(),
        ns,
        _issuer: issuer,
        operator,
        gateway,
        artifacts,
        dir,
        vendor_key,
        vendor_trusted,
    })
}

/// `kubectl-fleet` with arguments; stdout, or the error with stderr.
async fn fleet_cli(env: &Env, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env.binary("kubectl-fleet"))
        .args(args)
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "kubectl-fleet {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl fleet keygen`: the trustedKeys entry it prints.
async fn keygen(env: &Env, key_id: &str, out: &std::path::Path) -> anyhow::Result<Value> {
    let printed = fleet_cli(env, &["keygen", "--key-id", key_id, "--out", path(out)]).await?;
    let entries: Vec<Value> =
        serde_norway::from_str(&printed).context("keygen printed no trustedKeys list")?;
    entries
        .into_iter()
        .next()
        .context("keygen printed an empty list")
}

impl Rig {
    /// A DeviceGroup trusting `keys`, with its own token Secret.
    async fn group(&self, name: &str, keys: Vec<Value>) -> anyhow::Result<()> {
        let group: DeviceGroup = serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": name},
            "spec": {
                "certificates": {"issuerRef": self._issuer.issuer_ref(), "trustDomain": TRUST_DOMAIN},
                "enrollment": {"tokenSecretRef": {"name": format!("{name}-tokens")}},
                "firmware": {"trustedKeys": keys},
                "checkInInterval": "2s"
            }
        }))?;
        Api::<DeviceGroup>::namespaced(self.env.client.clone(), &self.ns)
            .create(&PostParams::default(), &group)
            .await
            .with_context(|| format!("creating DeviceGroup {name}"))?;
        Ok(())
    }

    async fn provision(
        &self,
        group: &str,
        count: usize,
    ) -> anyhow::Result<Vec<fleet::Provisioned>> {
        let names: Vec<String> = (0..count).map(|i| format!("{group}-{i:03}")).collect();
        fleet::provision(
            &self.env.client,
            &self.ns,
            group,
            MODEL,
            &format!("{group}-tokens"),
            &names,
        )
        .await
    }

    /// Puts `bytes` on the artifact server and signs a manifest for `signed_bytes` (usually the
    /// same) with `kubectl fleet sign`; returns the stanza printed under `field`.
    #[allow(clippy::too_many_arguments)]
    async fn sign(
        &self,
        key: &std::path::Path,
        key_id: &str,
        version: &str,
        security_version: i64,
        served: (&str, Vec<u8>),
        signed_bytes: &[u8],
        extra: &[&str],
    ) -> anyhow::Result<Value> {
        let url = self.artifacts.put(served.0, served.1);
        let file = self
            .dir
            .join(format!("image-{version}-{}", served.0.replace('/', "_")));
        std::fs::write(&file, signed_bytes)?;
        let sv = security_version.to_string();
        let mut args = vec![
            "sign",
            "--key",
            path(key),
            "--key-id",
            key_id,
            "--version",
            version,
            "--security-version",
            &sv,
            "--hardware-model",
            MODEL,
            "--url",
            &url,
        ];
        args.extend_from_slice(extra);
        args.push(path(&file));
        let printed = fleet_cli(&self.env, &args).await?;
        let stanza: Value = serde_norway::from_str(&printed).context("sign printed no YAML")?;
        stanza
            .as_object()
            .and_then(|o| o.values().next().cloned())
            .context("sign printed an empty stanza")
    }

    /// Writes the rollout as YAML and applies it with `kubectl`.
    async fn apply_rollout(&self, name: &str, spec: Value) -> anyhow::Result<()> {
        let doc = json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout",
            "metadata": {"name": name, "namespace": self.ns}, "spec": spec
        });
        let file = self.dir.join(format!("rollout-{name}.yaml"));
        std::fs::write(&file, serde_norway::to_string(&doc)?)?;
        self.env.kubectl_run(&["apply", "-f", path(&file)]).await?;
        Ok(())
    }

    /// Starts `fleetwarden-agent simulate` for `devices`, trusting only `pinned` firmware keys.
    fn simulate(
        &self,
        tag: &str,
        devices: &[fleet::Provisioned],
        pinned: &[&Value],
        interval: &str,
    ) -> anyhow::Result<Process> {
        let list = self.dir.join(format!("{tag}-devices.json"));
        std::fs::write(&list, serde_json::to_string(devices)?)?;
        let keys: Vec<String> = pinned
            .iter()
            .map(|k| {
                format!(
                    "{}={}",
                    k["keyId"].as_str().unwrap_or_default(),
                    k["publicKey"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let url = self.gateway.url();
        let mut args = vec![
            "simulate",
            "--gateway",
            &url,
            "--gateway-ca",
            path(&self.gateway.ca_file),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            path(&list),
            "--duration",
            "30m",
            "--check-in-interval",
            interval,
            "--enroll-concurrency",
            "50",
            "--firmware-version",
            OLD,
            "--security-version",
            "12",
            "--hardware-model",
            MODEL,
            "--artifact-ca",
            path(&self.artifacts.ca_file),
        ];
        for k in &keys {
            args.extend_from_slice(&["--firmware-key", k]);
        }
        self.env.spawn(
            "fleetwarden-agent",
            &format!("{}-{tag}-sim", self.ns),
            &args,
        )
    }

    fn rollouts(&self) -> Api<UpdateRollout> {
        Api::namespaced(self.env.client.clone(), &self.ns)
    }

    fn devices(&self) -> Api<Device> {
        Api::namespaced(self.env.client.clone(), &self.ns)
    }

    /// Waits until `check` holds for the rollout; the error shows its last status.
    async fn until<F>(
        &self,
        name: &str,
        secs: u64,
        what: &str,
        check: F,
    ) -> anyhow::Result<UpdateRollout>
    where
        F: Fn(&UpdateRollout) -> bool,
    {
        let api = self.rollouts();
        let result = eventually(Duration::from_secs(secs), what, || async {
            let r = api.get(name).await?;
            Ok(check(&r).then_some(r))
        })
        .await;
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                let r = api.get(name).await.ok();
                let status = r.and_then(|r| r.status).map(|s| json!(s));
                bail!(
                    "{e:#}\nlast status: {}\noperator log tail:\n{}",
                    status.unwrap_or(Value::Null),
                    tail(&self.operator.process.log(), 30)
                )
            }
        }
    }

    /// Events recorded for `rollout`: reason -> notes.
    async fn events(&self, rollout: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        let events: Api<Event> = Api::namespaced(self.env.client.clone(), &self.ns);
        let list = events
            .list(&ListParams::default().fields(&format!("involvedObject.name={rollout}")))
            .await?;
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in list.items {
            let note = e.message.unwrap_or_default();
            for _ in 0..e.count.unwrap_or(1).max(1) {
                out.entry(e.reason.clone().unwrap_or_default())
                    .or_default()
                    .push(note.clone());
            }
        }
        Ok(out)
    }
}

fn phase(r: &UpdateRollout) -> Option<RolloutPhase> {
    r.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(
    r: &'a UpdateRollout,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Stops a simulator with SIGTERM and returns the JSON report it printed.
async fn sim_report(mut sim: Process) -> anyhow::Result<Value> {
    sim.terminate(Duration::from_secs(30)).await?;
    sim.simulator_report()
        .context("the simulator printed no report")
}

fn reported_version(d: &Device) -> Option<&str> {
    d.status
        .as_ref()?
        .reported
        .as_ref()?
        .firmware_version
        .as_deref()
}

fn waves_spec() -> Value {
    json!([
        {"name": "canary", "percent": 5, "soak": "4s"},
        {"name": "early", "percent": 20},
        {"name": "half", "percent": 50, "requiresApproval": true},
        {"name": "all", "percent": 100}
    ])
}

pub async fn two_hundred_devices_update_in_four_waves_through_soak_approval_and_an_operator_kill(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    const N: usize = 200;
    let mut rig = rig(&env, "rollout-waves").await?;
    rig.group("cell", vec![rig.vendor_trusted.clone()]).await?;
    let devices = rig.provision("cell", N).await?;
    let sim = rig.simulate("cell", &devices, &[&rig.vendor_trusted], "2s")?;
    let new_image = image(42, 256 * 1024);
    let firmware = rig
        .sign(
            &rig.vendor_key,
            "vendor-2026",
            NEW,
            12,
            ("/fw/4.2.0.bin", new_image.clone()),
            &new_image,
            &[],
        )
        .await?;
    rig.apply_rollout(
        "pressctl-4-2",
        json!({
            "target": {"groups": ["cell"]},
            "firmware": firmware,
            "waves": waves_spec(),
            "successThresholdPercent": 100,
            "failureThresholdPercent": 5
        }),
    )
    .await?;

    // Waves 1 and 2 run; wave 3 waits for approval.
    let gated = rig
        .until(
            "pressctl-4-2",
            180,
            "the rollout to wait for approval of wave 3",
            |r| {
                condition(r, "Waiting")
                    .is_some_and(|c| c.status == "True" && c.reason == "AwaitingApproval")
                    && r.status.as_ref().is_some_and(|s| s.current_wave == 2)
            },
        )
        .await?;
    let s = gated.status.clone().context("no status")?;
    let planned: Vec<u32> = s.waves.iter().map(|w| w.planned).collect();
    ensure!(planned == [10, 30, 60, 100], "waves planned {planned:?}");
    ensure!(
        s.waves[0].succeeded == 10 && s.waves[1].succeeded == 30,
        "waves 1-2 should be complete: {:?}",
        s.waves
    );
    let soak_until = s.waves[0]
        .soak_until
        .clone()
        .context("wave 1 has no soak")?
        .0;
    let wave2_started = s.waves[1]
        .started_at
        .clone()
        .context("wave 2 not started")?
        .0;
    ensure!(
        wave2_started >= soak_until,
        "wave 2 started at {wave2_started}, before wave 1's soak ended at {soak_until}"
    );
    // The gate holds: nothing beyond the first two waves is offered while it waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let list = rig.devices().list(&Default::default()).await?.items;
    let updated = list
        .iter()
        .filter(|d| reported_version(d) == Some(NEW))
        .count();
    let touched = list
        .iter()
        .filter(|d| d.status.as_ref().is_some_and(|s| s.update.is_some()))
        .count();
    ensure!(
        updated == 40 && touched == 40,
        "while waiting for approval {updated} devices run {NEW} and {touched} were offered it; expected 40"
    );
    let status_text =
        fleet_cli(&env, &["rollout", "status", "pressctl-4-2", "-n", &rig.ns]).await?;
    ensure!(
        status_text.contains("AwaitingApproval") && status_text.contains("(needs approval)"),
        "rollout status does not show the gate:\n{status_text}"
    );

    let promoted = fleet_cli(&env, &["rollout", "promote", "pressctl-4-2", "-n", &rig.ns]).await?;
    ensure!(promoted.contains("promoted"), "{promoted}");

    // Kill the operator as soon as wave 3 has started. Devices of wave 3 keep updating while no
    // operator runs; the next one must count them once and go on to wave 4.
    rig.until("pressctl-4-2", 120, "wave 3 to start", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.current_wave == 3 && s.waves[2].completed_at.is_none())
    })
    .await?;
    rig.operator.process.kill().await?;
    let mid = rig.rollouts().get("pressctl-4-2").await?;
    let mid = mid.status.context("no status")?;
    eprintln!(
        "operator killed in wave {} ({}/60 of wave 3 counted, complete: {})",
        mid.current_wave,
        mid.waves[2].succeeded,
        mid.waves[2].completed_at.is_some()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    rig.operator = env.start_operator(&rig.ns, "operator-b").await?;

    let watch = fleet_cli(
        &env,
        &[
            "rollout",
            "status",
            "pressctl-4-2",
            "-n",
            &rig.ns,
            "--watch",
            "--timeout",
            "4m",
        ],
    )
    .await?;
    ensure!(watch.contains("Succeeded"), "{watch}");

    let done = rig.rollouts().get("pressctl-4-2").await?;
    let s = done.status.clone().context("no status")?;
    let totals = s.totals.clone().context("no totals")?;
    ensure!(
        totals.eligible == 200
            && totals.offered == 200
            && totals.succeeded == 200
            && totals.failed == 0,
        "totals {totals:?}"
    );
    for (i, w) in s.waves.iter().enumerate() {
        ensure!(
            w.succeeded == w.planned
                && w.offered == w.planned
                && w.failed == 0
                && w.completed_at.is_some(),
            "wave {} counts {w:?}",
            i + 1
        );
    }
    ensure!(
        condition(&done, "Ready").is_some_and(|c| c.status == "True"),
        "Ready is not True: {:?}",
        s.conditions
    );
    let list = rig.devices().list(&Default::default()).await?.items;
    let updated = list
        .iter()
        .filter(|d| reported_version(d) == Some(NEW))
        .count();
    ensure!(updated == N, "only {updated} of {N} devices report {NEW}");

    let events = rig.events("pressctl-4-2").await?;
    let count = |reason: &str| events.get(reason).map_or(0, Vec::len);
    ensure!(
        count("WaveStarted") == 4 && count("WaveCompleted") == 4 && count("Succeeded") == 1,
        "events: {events:?}"
    );

    let report = sim_report(sim).await?;
    ensure!(
        report["updatesInstalled"] == json!({NEW: N}) && report["updatesFailed"] == json!({}),
        "simulator: {report}"
    );
    ensure!(
        rig.artifacts.hits("/fw/4.2.0.bin") == N,
        "{} downloads for {N} devices",
        rig.artifacts.hits("/fw/4.2.0.bin")
    );
    Ok(())
}

pub async fn failing_canaries_halt_the_first_wave_and_roll_back(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    const N: usize = 60;
    let rig = rig(&env, "rollout-canary").await?;
    rig.group("line", vec![rig.vendor_trusted.clone()]).await?;
    let mut devices = rig.provision("line", N).await?;
    // Ten canaries by label, three of which fail every install (30% of the canary wave).
    for d in devices.iter_mut().take(10) {
        rig.devices()
            .patch(
                &d.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"ring": "canary"}}})),
            )
            .await?;
    }
    for d in devices.iter_mut().take(3) {
        d.fail_updates = true;
    }
    let sim = rig.simulate("line", &devices, &[&rig.vendor_trusted], "1s")?;
    let (new_image, old_image) = (image(1, 64 * 1024), image(2, 64 * 1024));
    let firmware = rig
        .sign(
            &rig.vendor_key,
            "vendor-2026",
            NEW,
            12,
            ("/fw/new.bin", new_image.clone()),
            &new_image,
            &[],
        )
        .await?;
    let rollback = rig
        .sign(
            &rig.vendor_key,
            "vendor-2026",
            OLD,
            12,
            ("/fw/old.bin", old_image.clone()),
            &old_image,
            &[],
        )
        .await?;
    rig.apply_rollout(
        "line-4-2",
        json!({
            "target": {"groups": ["line"]},
            "firmware": firmware,
            "rollbackFirmware": rollback,
            "onFailure": "Rollback",
            "waves": [
                {"name": "canary", "count": 10, "canarySelector": {"matchLabels": {"ring": "canary"}}},
                {"percent": 50},
                {"percent": 100}
            ],
            "failureThresholdPercent": 20
        }),
    )
    .await?;
    let rolled_back = rig
        .until("line-4-2", 120, "the rollout to roll back", |r| {
            phase(r) == Some(RolloutPhase::RolledBack)
        })
        .await?;
    let s = rolled_back.status.clone().context("no status")?;
    ensure!(
        s.current_wave == 1,
        "halted at wave {}, not 1",
        s.current_wave
    );
    ensure!(s.waves[0].failed >= 3, "wave 1 counts {:?}", s.waves[0]);
    ensure!(
        s.waves[1..].iter().all(|w| w.offered == 0),
        "later waves were offered: {:?}",
        s.waves
    );
    let degraded = condition(&rolled_back, "Degraded").context("no Degraded condition")?;
    ensure!(degraded.status == "True", "{degraded:?}");

    // Every canary that took the new firmware is offered the previous one and goes back.
    let list = eventually(
        Duration::from_secs(60),
        "every device back on the previous firmware",
        || async {
            let list = rig.devices().list(&Default::default()).await?.items;
            Ok(list
                .iter()
                .all(|d| reported_version(d) == Some(OLD))
                .then_some(list))
        },
    )
    .await?;
    let canaries: Vec<&str> = devices.iter().take(10).map(|d| d.name.as_str()).collect();
    for d in &list {
        let name = d.metadata.name.as_deref().unwrap_or_default();
        // Canaries that had not checked in yet when the rollout halted are never offered it.
        let offered = d.status.as_ref().is_some_and(|s| s.update.is_some());
        ensure!(
            !offered || canaries.contains(&name),
            "device {name} outside the canary wave was offered firmware"
        );
    }
    rig.until(
        "line-4-2",
        30,
        "Degraded to say every device is off the new firmware",
        |r| {
            condition(r, "Degraded")
                .is_some_and(|c| c.message.contains("every device is off the new firmware"))
        },
    )
    .await?;
    let events = rig.events("line-4-2").await?;
    ensure!(events.contains_key("RollingBack"), "events: {events:?}");

    let report = sim_report(sim).await?;
    let installed = &report["updatesInstalled"];
    ensure!(
        installed[NEW].as_u64().is_some_and(|n| n >= 1) && installed[NEW] == installed[OLD],
        "every device that installed {NEW} must have rolled back: {report}"
    );
    ensure!(
        report["updatesFailed"] == json!({"InstallFailed": 3}),
        "{report}"
    );
    ensure!(
        rig.artifacts.hits("/fw/new.bin") <= 10,
        "non-canaries downloaded the new firmware"
    );
    Ok(())
}

pub async fn devices_refuse_bad_firmware_and_report_why(env: Arc<Env>) -> anyhow::Result<()> {
    let rig = rig(&env, "rollout-refusals").await?;
    let rogue_key = rig.dir.join("rogue.pem");
    let rogue_trusted = keygen(&env, "rogue", &rogue_key).await?;
    let good = image(7, 128 * 1024);
    let mut tampered = good.clone();
    tampered[4096] ^= 0x01;
    let mut oversized = good.clone();
    oversized.extend_from_slice(&[0u8; 4096]);

    // One group per case, each with its own rollout and one device (the first refusal fails
    // the rollout, so a second device would not be offered anything).
    struct Case {
        group: &'static str,
        reason: &'static str,
        firmware: Value,
        downloads: bool,
    }
    let vendor = |served: (&'static str, Vec<u8>), extra: &'static [&'static str]| {
        let good = good.clone();
        let rig = &rig;
        async move {
            rig.sign(
                &rig.vendor_key,
                "vendor-2026",
                NEW,
                12,
                served,
                &good,
                extra,
            )
            .await
        }
    };
    let cases = vec![
        Case {
            group: "tampered",
            reason: "DigestMismatch",
            firmware: vendor(("/fw/tampered.bin", tampered), &[]).await?,
            downloads: true,
        },
        Case {
            group: "oversized",
            reason: "DownloadTooLarge",
            firmware: vendor(("/fw/oversized.bin", oversized), &[]).await?,
            downloads: true,
        },
        Case {
            group: "expired",
            reason: "ManifestExpired",
            firmware: vendor(
                ("/fw/expired.bin", good.clone()),
                &["--expires", "2020-01-01T00:00:00Z"],
            )
            .await?,
            downloads: false,
        },
        Case {
            group: "wrongkey",
            reason: "UnknownSigningKey",
            firmware: rig
                .sign(
                    &rogue_key,
                    "rogue",
                    NEW,
                    12,
                    ("/fw/wrongkey.bin", good.clone()),
                    &good,
                    &[],
                )
                .await?,
            downloads: false,
        },
    ];
    let mut devices = Vec::new();
    for case in &cases {
        // The group (and so the operator) trusts the rogue key too; the devices do not.
        rig.group(
            case.group,
            vec![rig.vendor_trusted.clone(), rogue_trusted.clone()],
        )
        .await?;
        devices.extend(rig.provision(case.group, 1).await?);
    }
    // Anti-rollback: devices that took security version 13 are offered a rollback to 12.
    rig.group("antirollback", vec![rig.vendor_trusted.clone()])
        .await?;
    devices.extend(rig.provision("antirollback", 2).await?);
    let sim = rig.simulate("refusals", &devices, &[&rig.vendor_trusted], "1s")?;

    for case in &cases {
        rig.apply_rollout(
            case.group,
            json!({"target": {"groups": [case.group]}, "firmware": case.firmware, "waves": [{"percent": 100}]}),
        )
        .await?;
    }
    let sv13 = rig
        .sign(
            &rig.vendor_key,
            "vendor-2026",
            "4.3.0",
            13,
            ("/fw/sv13.bin", good.clone()),
            &good,
            &[],
        )
        .await?;
    let sv12 = rig
        .sign(
            &rig.vendor_key,
            "vendor-2026",
            OLD,
            12,
            ("/fw/sv12.bin", good.clone()),
            &good,
            &[],
        )
        .await?;
    rig.apply_rollout(
        "antirollback",
        json!({
            "target": {"groups": ["antirollback"]}, "firmware": sv13, "rollbackFirmware": sv12,
            "onFailure": "Rollback",
            "waves": [{"percent": 50}, {"percent": 100, "requiresApproval": true}]
        }),
    )
    .await?;

    for case in &cases {
        let r = rig
            .until(
                case.group,
                90,
                &format!("rollout {} to fail", case.group),
                |r| phase(r) == Some(RolloutPhase::Failed),
            )
            .await?;
        let degraded = condition(&r, "Degraded").context("no Degraded")?;
        ensure!(
            degraded.status == "True" && degraded.reason == "Halted",
            "{degraded:?}"
        );
        {
            let name = format!("{}-000", case.group);
            let d = rig.devices().get(&name).await?;
            let update = d
                .status
                .as_ref()
                .and_then(|s| s.update.clone())
                .with_context(|| format!("{name} reported nothing"))?;
            ensure!(
                update.state == crds::device::UpdateState::Failed
                    && update
                        .message
                        .as_deref()
                        .is_some_and(|m| m.starts_with(case.reason)),
                "{name}: expected a {} refusal, got {update:?}",
                case.reason
            );
            ensure!(
                reported_version(&d) == Some(OLD),
                "{name} runs {:?}",
                reported_version(&d)
            );
        }
        let path = format!("/fw/{}.bin", case.group);
        let hits = rig.artifacts.hits(&path);
        ensure!(
            (hits > 0) == case.downloads,
            "{}: {hits} downloads; refused {} the download",
            case.group,
            if case.downloads { "after" } else { "before" }
        );
    }

    // Wave 1 (one device) takes 4.3.0; abort; the rollback to security version 12 is refused.
    rig.until(
        "antirollback",
        90,
        "wave 1 of antirollback to complete",
        |r| {
            condition(r, "Waiting").is_some_and(|c| c.reason == "AwaitingApproval")
                && r.status.as_ref().is_some_and(|s| s.current_wave == 1)
        },
    )
    .await?;
    let aborted = fleet_cli(&env, &["rollout", "abort", "antirollback", "-n", &rig.ns]).await?;
    ensure!(aborted.contains("aborted"), "{aborted}");
    rig.until("antirollback", 30, "antirollback to roll back", |r| {
        phase(r) == Some(RolloutPhase::RolledBack)
    })
    .await?;
    let refused = eventually(
        Duration::from_secs(60),
        "the rollback to be refused",
        || async {
            let list = rig.devices().list(&ListParams::default()).await?.items;
            Ok(list.into_iter().find(|d| {
                d.spec.group == "antirollback"
                    && d.status
                        .as_ref()
                        .and_then(|s| s.update.as_ref())
                        .is_some_and(|u| {
                            u.version == OLD
                                && u.message
                                    .as_deref()
                                    .is_some_and(|m| m.starts_with("SecurityVersionRollback"))
                        })
            }))
        },
    )
    .await?;
    ensure!(
        reported_version(&refused) == Some("4.3.0"),
        "{:?}",
        refused.status
    );
    ensure!(
        rig.artifacts.hits("/fw/sv12.bin") == 0,
        "the rollback image was downloaded"
    );

    let report = sim_report(sim).await?;
    ensure!(
        report["updatesFailed"]
            == json!({"DigestMismatch": 1, "DownloadTooLarge": 1, "ManifestExpired": 1, "UnknownSigningKey": 1, "SecurityVersionRollback": 1}),
        "simulator: {report}"
    );
    ensure!(
        report["updatesInstalled"] == json!({"4.3.0": 1}),
        "simulator: {report}"
    );
    Ok(())
}

/// Measurement: a thousand devices, four waves, no soak. Prints the time from creating the
/// rollout to Succeeded and the API writes it took.
pub async fn a_thousand_devices_roll_out_with_zero_soak(env: Arc<Env>) -> anyhow::Result<()> {
    const N: usize = 1000;
    let rig = rig(&env, "rollout-1000").await?;
    rig.group("plant", vec![rig.vendor_trusted.clone()]).await?;
    let devices = rig.provision("plant", N).await?;
    let interval =
        std::env::var("FLEETWARDEN_E2E_ROLLOUT_INTERVAL").unwrap_or_else(|_| "5s".into());
    let sim = rig.simulate("plant", &devices, &[&rig.vendor_trusted], &interval)?;
    let api = rig.devices();
    eventually(
        Duration::from_secs(300),
        "all devices enrolled and reporting",
        || async {
            let list = api.list(&Default::default()).await?.items;
            Ok((list
                .iter()
                .filter(|d| reported_version(d) == Some(OLD))
                .count()
                == N)
                .then_some(()))
        },
    )
    .await
    .with_context(|| format!("simulator log tail:\n{}", tail(&sim.log(), 20)))?;
    let new_image = image(9, 256 * 1024);
    let firmware = rig
        .sign(
            &rig.vendor_key,
            "vendor-2026",
            NEW,
            12,
            ("/fw/plant.bin", new_image.clone()),
            &new_image,
            &[],
        )
        .await?;
    let operator_writes = || rig.operator.metric("fleetwarden_operator_api_writes_total");
    let gateway_writes = || {
        rig.gateway
            .metric("fleetwarden_gateway_status_writes_total")
    };
    let rollout_writes = || {
        rig.operator
            .metric("fleetwarden_operator_api_writes_total{resource=\"updaterollouts/status\"")
    };
    let group_writes = || {
        rig.operator
            .metric("fleetwarden_operator_api_writes_total{resource=\"devicegroups/status\"")
    };
    let (op0, gw0, ro0, gr0) = (
        operator_writes().await?,
        gateway_writes().await?,
        rollout_writes().await?,
        group_writes().await?,
    );
    let started = std::time::Instant::now();
    rig.apply_rollout(
        "plant-4-2",
        json!({
            "target": {"groups": ["plant"]},
            "firmware": firmware,
            "waves": [{"percent": 5}, {"percent": 20}, {"percent": 50}, {"percent": 100}],
            "successThresholdPercent": 100
        }),
    )
    .await?;
    let done = rig
        .until("plant-4-2", 600, "the rollout to succeed", |r| {
            phase(r) == Some(RolloutPhase::Succeeded)
        })
        .await?;
    let took = started.elapsed().as_secs_f64();
    let (op1, gw1) = (operator_writes().await?, gateway_writes().await?);
    let rollout_status_writes = rollout_writes().await? - ro0;
    let group_status_writes = group_writes().await? - gr0;
    let totals = done.status.and_then(|s| s.totals).context("no totals")?;
    eprintln!(
        "{N} devices, 4 waves, soak 0, check-in every {interval}: rollout start to Succeeded in {took:.1}s; \
         operator API writes {:.0} ({rollout_status_writes:.0} rollout status, \
         {group_status_writes:.0} group inventory, rest events); \
         gateway device-status writes {:.0} ({:.2} per device)",
        op1 - op0,
        gw1 - gw0,
        (gw1 - gw0) / N as f64
    );
    ensure!(
        totals.succeeded == N as u32 && totals.failed == 0,
        "{totals:?}"
    );
    let report = sim_report(sim).await?;
    ensure!(
        report["updatesInstalled"] == json!({NEW: N}),
        "simulator: {report}"
    );
    Ok(())
}

/// Fault: the API server goes away for 30 s in the middle of a rollout. The operator, gateway
/// and devices ride it out; afterwards the rollout finishes with every device counted once, no
/// wave started twice, and the time from the API server's return to Succeeded is printed.
pub async fn an_api_server_outage_mid_rollout_loses_and_double_counts_nothing(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    const N: usize = 100;
    let rig = rig(&env, "rollout-apiserver-outage").await?;
    rig.group("cell", vec![rig.vendor_trusted.clone()]).await?;
    let devices = rig.provision("cell", N).await?;
    let sim = rig.simulate("cell", &devices, &[&rig.vendor_trusted], "2s")?;
    let api = rig.devices();
    eventually(
        Duration::from_secs(180),
        "all devices reporting",
        || async {
            let list = api.list(&Default::default()).await?.items;
            Ok((list
                .iter()
                .filter(|d| reported_version(d) == Some(OLD))
                .count()
                == N)
                .then_some(()))
        },
    )
    .await?;
    let new_image = image(77, 128 * 1024);
    let firmware = rig
        .sign(
            &rig.vendor_key,
            "vendor-2026",
            NEW,
            12,
            ("/fw/outage.bin", new_image.clone()),
            &new_image,
            &[],
        )
        .await?;
    rig.apply_rollout(
        "outage",
        json!({
            "target": {"groups": ["cell"]}, "firmware": firmware, "successThresholdPercent": 100,
            "waves": [{"percent": 10, "soak": "3s"}, {"percent": 40, "soak": "3s"}, {"percent": 70}, {"percent": 100}]
        }),
    )
    .await?;
    rig.until("outage", 120, "wave 2 to start", |r| {
        r.status.as_ref().is_some_and(|s| s.current_wave >= 2)
    })
    .await?;

    env.apiserver_stop().await?;
    let down = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    env.apiserver_start().await?;
    let back = std::time::Instant::now();
    eprintln!(
        "API server down for {:.1}s",
        back.duration_since(down).as_secs_f64()
    );

    let done = rig
        .until(
            "outage",
            300,
            "the rollout to succeed after the outage",
            |r| phase(r) == Some(RolloutPhase::Succeeded),
        )
        .await?;
    eprintln!(
        "API server back -> rollout Succeeded in {:.1}s",
        back.elapsed().as_secs_f64()
    );
    let s = done.status.context("no status")?;
    let totals = s.totals.context("no totals")?;
    ensure!(
        totals.succeeded == N as u32 && totals.failed == 0 && totals.eligible == N as u32,
        "{totals:?}"
    );
    let planned: Vec<u32> = s.waves.iter().map(|w| w.planned).collect();
    ensure!(planned == [10, 30, 30, 30], "{planned:?}");
    let events = rig.events("outage").await?;
    for reason in ["WaveStarted", "WaveCompleted"] {
        let n = events.get(reason).map_or(0, Vec::len);
        ensure!(
            n == 4,
            "{n} {reason} events, expected one per wave: {events:?}"
        );
    }
    let list = api.list(&Default::default()).await?.items;
    let updated = list
        .iter()
        .filter(|d| reported_version(d) == Some(NEW))
        .count();
    ensure!(updated == N, "{updated}/{N} devices report {NEW}");
    let report = sim_report(sim).await?;
    ensure!(
        report["updatesInstalled"] == json!({NEW: N}),
        "each device installed once: {report}"
    );
    Ok(())
}
