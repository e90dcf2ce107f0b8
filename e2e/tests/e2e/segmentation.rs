//! IT/OT segmentation against the real API server: the NetworkPolicies generated for two zones
//! and a conduit (accepted by the API server, rule for rule), isolation of quarantined and
//! non-compliant devices and their release, the audit (unisolated pods, undeclared IT-to-OT
//! paths, unknown conduit zones, overlapping device networks), and garbage collection.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context as _, bail, ensure};
use crds::{
    Device, DeviceGroup, conditions,
    group::FindingKind,
    segmentation::{GROUP_LABEL, ZONE_LABEL},
};
use e2e::{Env, Operator, eventually, tail};
use k8s_openapi::api::{
    core::v1::{Event, Pod},
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::process::Command;

const TRUST_DOMAIN: &str = "fleet.e2e";
const MODEL: &str = "acme-pressctl-v3";

/// The OT cell from `examples/device-group.yaml`, as a zone.
fn cell_segmentation() -> Value {
    json!({
        "zone": "press-line-3",
        "level": "OT",
        "workloadSelector": {"matchLabels": {ZONE_LABEL: "press-line-3"}},
        "deviceCIDRs": ["10.30.3.0/24"],
        "ports": [{"port": 4840}, {"port": 502}],
        "conduits": [{"name": "mes-to-cell", "zone": "plant-mes", "direction": "Ingress",
                      "ports": [{"port": 4840}]}],
        "allowDNS": true,
    })
}

/// The plant's MES, an IT zone that reads the cell over OPC UA.
fn mes_segmentation() -> Value {
    json!({
        "zone": "plant-mes",
        "level": "IT",
        "workloadSelector": {"matchLabels": {ZONE_LABEL: "plant-mes"}},
        "conduits": [{"name": "cell-opcua", "zone": "press-line-3", "direction": "Egress",
                      "ports": [{"port": 4840}]}],
        "allowDNS": false,
    })
}

struct Fixture {
    env: Arc<Env>,
    ns: String,
    operator: Operator,
    groups: Api<DeviceGroup>,
    devices: Api<Device>,
    policies: Api<NetworkPolicy>,
}

async fn setup(env: &Arc<Env>, test: &str) -> anyhow::Result<Fixture> {
    let ns = env.namespace(test).await?;
    let operator = env.start_operator(&ns, "operator").await?;
    Ok(Fixture {
        groups: Api::namespaced(env.client.clone(), &ns),
        devices: Api::namespaced(env.client.clone(), &ns),
        policies: Api::namespaced(env.client.clone(), &ns),
        env: env.clone(),
        ns,
        operator,
    })
}

impl Fixture {
    async fn create_group(&self, name: &str, extra: Value) -> anyhow::Result<()> {
        let mut spec =
            json!({"certificates": {"issuerRef": {"name": "e2e-ca"}, "trustDomain": TRUST_DOMAIN}});
        if let (Some(s), Value::Object(extra)) = (spec.as_object_mut(), extra) {
            s.extend(extra);
        }
        let group: DeviceGroup = serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        self.groups
            .create(&PostParams::default(), &group)
            .await
            .with_context(|| format!("creating DeviceGroup {name}"))?;
        Ok(())
    }

    async fn patch_group_spec(&self, name: &str, spec: Value) -> anyhow::Result<()> {
        self.groups
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await
            .with_context(|| format!("patching DeviceGroup {name}"))?;
        Ok(())
    }

    /// Generated policies of `group`, by name, as the API server stores them.
    async fn policies_of(&self, group: &str) -> anyhow::Result<BTreeMap<String, NetworkPolicy>> {
        Ok(self
            .policies
            .list(&ListParams::default().labels(&format!("{GROUP_LABEL}={group}")))
            .await?
            .items
            .into_iter()
            .map(|p| (p.name_any(), p))
            .collect())
    }

    async fn wait_condition(
        &self,
        group: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> anyhow::Result<DeviceGroup> {
        eventually(
            Duration::from_secs(20),
            &format!("{group} {type_}={status} ({reason})"),
            || async {
                let g = self.groups.get(group).await?;
                let ok = g.status.as_ref().is_some_and(|s| {
                    s.observed_generation == g.metadata.generation
                        && conditions::find(&s.conditions, type_)
                            .is_some_and(|c| c.status == status && c.reason == reason)
                });
                Ok(ok.then_some(g))
            },
        )
        .await
        .with_context(|| self.diagnostics(group))
    }

    fn diagnostics(&self, group: &str) -> String {
        format!(
            "group {group}; operator log tail:\n{}",
            tail(&self.operator.process.log(), 30)
        )
    }

    /// The except-list of the group's devices policy (all CIDRs), sorted.
    async fn excepted(&self, group: &str) -> anyhow::Result<Vec<String>> {
        let policy = self
            .policies
            .get(&format!("fw-{group}-devices"))
            .await
            .with_context(|| format!("reading fw-{group}-devices"))?;
        let mut out: Vec<String> = policy
            .spec
            .iter()
            .flat_map(|s| s.ingress.iter().flatten())
            .flat_map(|r| r.from.iter().flatten())
            .filter_map(|p| p.ip_block.as_ref())
            .flat_map(|b| b.except.iter().flatten().cloned())
            .collect();
        out.sort();
        Ok(out)
    }

    async fn wait_excepted(&self, group: &str, want: &[&str]) -> anyhow::Result<Duration> {
        let start = std::time::Instant::now();
        eventually(
            Duration::from_secs(30),
            &format!("the except-list of {group} to be {want:?}"),
            || async { Ok((self.excepted(group).await? == want).then_some(())) },
        )
        .await
        .with_context(|| self.diagnostics(group))?;
        Ok(start.elapsed())
    }

    /// Events about `name` (any kind): (reason, message).
    async fn events(&self, name: &str) -> anyhow::Result<Vec<(String, String)>> {
        let events: Api<Event> = Api::namespaced(self.env.client.clone(), &self.ns);
        Ok(events
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await?
            .items
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
            .collect())
    }

    async fn wait_event(&self, name: &str, reason: &str, contains: &str) -> anyhow::Result<()> {
        eventually(
            Duration::from_secs(20),
            &format!("a {reason} event on {name} mentioning {contains}"),
            || async {
                Ok(self
                    .events(name)
                    .await?
                    .iter()
                    .any(|(r, m)| r == reason && m.contains(contains))
                    .then_some(()))
            },
        )
        .await
    }

    async fn findings(&self, group: &str) -> anyhow::Result<Vec<(FindingKind, String, String)>> {
        let g = self.groups.get(group).await?;
        Ok(g.status
            .and_then(|s| s.segmentation)
            .map(|s| {
                s.findings
                    .into_iter()
                    .map(|f| (f.kind, f.subject, f.message))
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn wait_findings(
        &self,
        group: &str,
        what: &str,
        check: impl Fn(&[(FindingKind, String, String)]) -> bool,
    ) -> anyhow::Result<Vec<(FindingKind, String, String)>> {
        let check = &check;
        eventually(Duration::from_secs(20), what, || async move {
            let f = self.findings(group).await?;
            Ok(check(&f).then_some(f))
        })
        .await
        .with_context(|| self.diagnostics(group))
    }

    async fn set_lifecycle(&self, device: &str, lifecycle: &str) -> anyhow::Result<()> {
        self.devices
            .patch(
                device,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"lifecycle": lifecycle}})),
            )
            .await
            .with_context(|| format!("setting the lifecycle of {device}"))?;
        Ok(())
    }

    async fn create_pod(&self, name: &str, labels: Value) -> anyhow::Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.ns);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {"automountServiceAccountToken": false,
                     "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        }))?;
        // The namespace's default ServiceAccount appears a moment after the namespace does.
        eventually(
            Duration::from_secs(20),
            &format!("pod {name} to be created"),
            || async {
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => Ok(Some(())),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some(())),
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await
    }

    async fn create_policy(&self, policy: Value) -> anyhow::Result<()> {
        let policy: NetworkPolicy = serde_json::from_value(policy)?;
        self.policies
            .create(&PostParams::default(), &policy)
            .await
            .context("creating a NetworkPolicy")?;
        Ok(())
    }
}

/// The stored spec, without what the API server adds on its own.
fn spec_json(policy: &NetworkPolicy) -> anyhow::Result<Value> {
    Ok(serde_json::to_value(
        policy.spec.as_ref().context("policy without spec")?,
    )?)
}

pub async fn two_zones_with_a_conduit_get_exactly_the_expected_policies(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let f = setup(&env, "two-zones").await?;
    f.create_group("press-line-3", json!({"segmentation": cell_segmentation()}))
        .await?;
    f.create_group("mes", json!({"segmentation": mes_segmentation()}))
        .await?;
    let cell = f
        .wait_condition("press-line-3", "Isolated", "True", "PoliciesApplied")
        .await?;
    f.wait_condition("mes", "Isolated", "True", "PoliciesApplied")
        .await?;

    let cell_policies = f.policies_of("press-line-3").await?;
    let names: Vec<&str> = cell_policies.keys().map(String::as_str).collect();
    ensure!(
        names
            == [
                "fw-press-line-3-conduit-mes-to-cell",
                "fw-press-line-3-default-deny",
                "fw-press-line-3-devices",
                "fw-press-line-3-dns"
            ],
        "cell policies: {names:?}"
    );
    let workloads = json!({"matchLabels": {ZONE_LABEL: "press-line-3"}});
    let device_peer = json!([{"ipBlock": {"cidr": "10.30.3.0/24"}}]);
    let cell_ports = json!([{"port": 4840, "protocol": "TCP"}, {"port": 502, "protocol": "TCP"}]);
    let expected = BTreeMap::from([
        (
            "fw-press-line-3-default-deny",
            json!({"podSelector": workloads, "policyTypes": ["Ingress", "Egress"]}),
        ),
        (
            "fw-press-line-3-devices",
            json!({
                "podSelector": workloads, "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": device_peer, "ports": cell_ports}],
                "egress": [{"to": device_peer, "ports": cell_ports}],
            }),
        ),
        (
            "fw-press-line-3-conduit-mes-to-cell",
            json!({
                "podSelector": workloads, "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {ZONE_LABEL: "plant-mes"}}}],
                    "ports": [{"port": 4840, "protocol": "TCP"}],
                }],
            }),
        ),
        (
            "fw-press-line-3-dns",
            json!({
                "podSelector": workloads, "policyTypes": ["Egress"],
                "egress": [{
                    "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
                }],
            }),
        ),
    ]);
    let cell_uid = cell.uid().context("group without uid")?;
    for (name, want) in &expected {
        let stored = &cell_policies[*name];
        let got = spec_json(stored)?;
        ensure!(
            &got == want,
            "{name}: stored spec\n{}\nexpected\n{}",
            serde_json::to_string_pretty(&got)?,
            serde_json::to_string_pretty(want)?
        );
        let owner = stored
            .owner_references()
            .first()
            .context("policy without owner")?;
        ensure!(
            owner.kind == "DeviceGroup" && owner.uid == cell_uid && owner.controller == Some(true),
            "{name}: owner {owner:?}"
        );
        ensure!(
            stored
                .labels()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                == Some("fleetwarden"),
            "{name}: labels {:?}",
            stored.labels()
        );
    }

    let mes_policies = f.policies_of("mes").await?;
    let names: Vec<&str> = mes_policies.keys().map(String::as_str).collect();
    ensure!(
        names == ["fw-mes-conduit-cell-opcua", "fw-mes-default-deny"],
        "mes policies (no device networks, no DNS): {names:?}"
    );
    let got = spec_json(&mes_policies["fw-mes-conduit-cell-opcua"])?;
    let want = json!({
        "podSelector": {"matchLabels": {ZONE_LABEL: "plant-mes"}}, "policyTypes": ["Egress"],
        "egress": [{
            "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {ZONE_LABEL: "press-line-3"}}}],
            "ports": [{"port": 4840, "protocol": "TCP"}],
        }],
    });
    ensure!(got == want, "mes conduit: {got}");

    // Both sides declare the conduit and no pods exist: the audit is clean.
    f.wait_condition("press-line-3", "AuditClean", "True", "NoFindings")
        .await?;
    f.wait_condition("mes", "AuditClean", "True", "NoFindings")
        .await?;
    let status = f
        .groups
        .get("press-line-3")
        .await?
        .status
        .unwrap_or_default();
    let seg = status.segmentation.context("no segmentation status")?;
    ensure!(
        seg.policies.len() == 4 && seg.isolated_addresses == 0,
        "{seg:?}"
    );

    let out = f
        .env
        .kubectl_run(&["get", "networkpolicies", "-n", &f.ns, "-o", "yaml"])
        .await?;
    eprintln!("generated NetworkPolicies:\n{out}");

    // Converged: nothing to write while nothing changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = f
        .operator
        .metric("fleetwarden_operator_api_writes_total")
        .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let later = f
        .operator
        .metric("fleetwarden_operator_api_writes_total")
        .await?;
    ensure!(
        later == writes,
        "idle operator wrote {} times",
        later - writes
    );

    // Removing the conduit removes its policy, and the other side now sees a one-sided conduit.
    f.patch_group_spec("press-line-3", json!({"segmentation": {"conduits": null}}))
        .await?;
    eventually(
        Duration::from_secs(20),
        "the conduit policy to go",
        || async {
            Ok((!f
                .policies_of("press-line-3")
                .await?
                .contains_key("fw-press-line-3-conduit-mes-to-cell"))
            .then_some(()))
        },
    )
    .await
    .with_context(|| f.diagnostics("press-line-3"))?;
    let found = f
        .wait_findings("mes", "a one-sided conduit finding on mes", |f| {
            f.iter()
                .any(|(k, s, _)| *k == FindingKind::OneSidedConduit && s == "conduit/cell-opcua")
        })
        .await?;
    eprintln!("mes findings: {found:?}");

    // Deleting the group lets the garbage collector remove its policies.
    f.groups
        .delete("press-line-3", &DeleteParams::foreground())
        .await?;
    eventually(
        Duration::from_secs(60),
        "the garbage collector to delete the cell's policies",
        || async {
            Ok(f.policies_of("press-line-3")
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    f.wait_findings("mes", "mes to report its conduit zone is gone", |f| {
        f.iter()
            .any(|(k, s, _)| *k == FindingKind::UnknownConduitZone && s == "conduit/cell-opcua")
    })
    .await?;
    Ok(())
}

pub async fn quarantined_and_non_compliant_devices_are_isolated_and_released(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let f = setup(&env, "isolation").await?;
    let issuer = e2e::issuer::start(env.client.clone(), &f.ns, "e2e-ca")?;
    let issuer_ref = serde_json::to_value(issuer.issuer_ref())?;
    f.create_group(
        "press-line-3",
        json!({
            "certificates": {"issuerRef": issuer_ref, "trustDomain": TRUST_DOMAIN},
            "enrollment": {"tokenSecretRef": {"name": "cell-tokens"}},
            "firmware": {"minimumVersion": "4.0.0"},
            "segmentation": cell_segmentation(),
        }),
    )
    .await?;
    f.wait_condition("press-line-3", "Isolated", "True", "PoliciesApplied")
        .await?;
    ensure!(f.excepted("press-line-3").await?.is_empty());

    // A device known by its static address.
    let plc: Device = serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "metadata": {"name": "plc-11"},
        "spec": {"group": "press-line-3", "hardwareModel": MODEL, "addresses": ["10.30.3.11"]},
    }))?;
    f.devices.create(&PostParams::default(), &plc).await?;
    f.set_lifecycle("plc-11", "Quarantined").await?;
    let took = f.wait_excepted("press-line-3", &["10.30.3.11/32"]).await?;
    eprintln!("quarantine -> isolated in {:.2}s", took.as_secs_f64());
    f.wait_event(
        "plc-11",
        "Isolated",
        "10.30.3.11 cut off from zone press-line-3",
    )
    .await?;
    let g = f.groups.get("press-line-3").await?;
    let status = g.status.unwrap_or_default();
    ensure!(
        status.segmentation.as_ref().map(|s| s.isolated_addresses) == Some(1),
        "{:?}",
        status.segmentation
    );
    f.set_lifecycle("plc-11", "Active").await?;
    let took = f.wait_excepted("press-line-3", &[]).await?;
    eprintln!("release -> allowed in {:.2}s", took.as_secs_f64());
    f.wait_event("plc-11", "Released", "10.30.3.11").await?;

    // An enrolled device reporting its own address becomes non-compliant when the group's
    // minimum firmware moves past it, and is isolated by that alone.
    let gateway = env.start_gateway(&f.ns, &issuer.ca_pem, &[]).await?;
    let names = vec!["plc-21".to_string()];
    let provisioned = e2e::fleet::provision(
        &env.client,
        &f.ns,
        "press-line-3",
        MODEL,
        "cell-tokens",
        &names,
    )
    .await?;
    let state = env.scratch.join(&f.ns).join("plc-21");
    let gateway_url = gateway.url();
    let gateway_ca = gateway.ca_file.to_string_lossy().into_owned();
    let state_dir = state.to_string_lossy().into_owned();
    let run_agent = |token: Option<String>| {
        let mut cmd = Command::new(env.binary("fleetwarden-agent"));
        cmd.args([
            "run",
            "--once",
            "--gateway",
            &gateway_url,
            "--gateway-ca",
            &gateway_ca,
            "--trust-domain",
            TRUST_DOMAIN,
            "--namespace",
            &f.ns,
            "--name",
            "plc-21",
            "--state-dir",
            &state_dir,
            "--firmware-version",
            "4.1.3",
            "--security-version",
            "12",
            "--address",
            "10.30.3.21",
        ])
        .env("FLEETWARDEN_LOG", "warn");
        if let Some(t) = token {
            cmd.args(["--token", &t]);
        }
        cmd
    };
    let out = run_agent(Some(provisioned[0].token.clone()))
        .output()
        .await?;
    if !out.status.success() {
        bail!("agent failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    eventually(
        Duration::from_secs(20),
        "plc-21 to be compliant",
        || async {
            let d = f.devices.get("plc-21").await?;
            Ok(d.status
                .is_some_and(|s| conditions::is_true(&s.conditions, "Compliant"))
                .then_some(()))
        },
    )
    .await
    .with_context(|| f.diagnostics("press-line-3"))?;
    ensure!(
        f.excepted("press-line-3").await?.is_empty(),
        "compliant devices stay reachable"
    );

    f.patch_group_spec(
        "press-line-3",
        json!({"firmware": {"minimumVersion": "9.0.0"}}),
    )
    .await?;
    let took = f.wait_excepted("press-line-3", &["10.30.3.21/32"]).await?;
    eprintln!("non-compliant -> isolated in {:.2}s", took.as_secs_f64());
    f.wait_event("plc-21", "Isolated", "not compliant").await?;
    let g = f.groups.get("press-line-3").await?;
    let inv = g.status.and_then(|s| s.inventory).context("no inventory")?;
    ensure!(
        // plc-11 never reported a version, so it counts as out of date too.
        inv.total == 2 && inv.enrolled == 1 && inv.quarantined == 1 && inv.out_of_date == 2,
        "inventory: {inv:?}"
    );

    f.patch_group_spec(
        "press-line-3",
        json!({"firmware": {"minimumVersion": "4.0.0"}}),
    )
    .await?;
    f.wait_excepted("press-line-3", &[]).await?;
    f.wait_event("plc-21", "Released", "10.30.3.21").await?;
    drop(gateway);
    Ok(())
}

pub async fn the_audit_reports_unisolated_pods_leaks_unknown_zones_and_overlaps(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let f = setup(&env, "audit").await?;
    let mut cell = cell_segmentation();
    cell["conduits"] = json!([]);
    f.create_group("press-line-3", json!({"segmentation": cell}))
        .await?;
    let mut office = mes_segmentation();
    office["zone"] = json!("office");
    office["workloadSelector"] = json!({"matchLabels": {ZONE_LABEL: "office"}});
    office["deviceCIDRs"] = json!(["10.30.0.0/16"]);
    office["conduits"] = json!([{"name": "historian", "zone": "historian", "direction": "Egress",
                                 "ports": [{"port": 443}]}]);
    f.create_group("office", json!({"segmentation": office}))
        .await?;
    f.wait_condition("press-line-3", "Isolated", "True", "PoliciesApplied")
        .await?;
    f.wait_condition("office", "Isolated", "True", "PoliciesApplied")
        .await?;

    // The zones' workloads, and one pod nobody isolates.
    f.create_pod("opcua-gateway", json!({ZONE_LABEL: "press-line-3"}))
        .await?;
    f.create_pod("erp", json!({ZONE_LABEL: "office"})).await?;
    f.create_pod("debug-shell", json!({"app": "debug"})).await?;

    let found = f
        .wait_findings("press-line-3", "the cell's findings", |f| {
            let unisolated: Vec<&str> = f
                .iter()
                .filter(|(k, _, _)| *k == FindingKind::UnisolatedWorkload)
                .map(|(_, s, _)| s.as_str())
                .collect();
            unisolated == ["pod/debug-shell"]
                && f.iter()
                    .any(|(k, _, _)| *k == FindingKind::OverlappingDeviceCIDR)
        })
        .await?;
    let unisolated: Vec<&str> = found
        .iter()
        .filter(|(k, _, _)| *k == FindingKind::UnisolatedWorkload)
        .map(|(_, s, _)| s.as_str())
        .collect();
    ensure!(
        unisolated == ["pod/debug-shell"],
        "unisolated: {unisolated:?}"
    );
    ensure!(
        !found
            .iter()
            .any(|(k, _, _)| *k == FindingKind::UndeclaredITtoOTPath),
        "both zones are default-deny, so no path: {found:?}"
    );
    let overlap = found
        .iter()
        .find(|(k, _, _)| *k == FindingKind::OverlappingDeviceCIDR)
        .map(|(_, _, m)| m.clone())
        .unwrap_or_default();
    ensure!(
        overlap.contains("10.30.3.0/24 overlaps 10.30.0.0/16"),
        "overlap: {overlap}"
    );
    let g = f
        .wait_condition("press-line-3", "AuditClean", "False", "FindingsReported")
        .await?;
    let msg = g
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, "AuditClean"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        msg.contains("1 UnisolatedWorkload"),
        "AuditClean message: {msg}"
    );
    f.wait_findings("office", "the office's unknown conduit zone", |f| {
        f.iter().any(|(k, s, m)| {
            *k == FindingKind::UnknownConduitZone
                && s == "conduit/historian"
                && m.contains("\"historian\"")
        })
    })
    .await?;

    // Someone opens the cell to everything and lets the office out to everything: a leak.
    f.create_policy(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "vendor-remote-access"},
        "spec": {"podSelector": {"matchLabels": {ZONE_LABEL: "press-line-3"}}, "ingress": [{}]},
    }))
    .await?;
    f.create_policy(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "office-egress-any"},
        "spec": {"podSelector": {"matchLabels": {ZONE_LABEL: "office"}},
                 "policyTypes": ["Egress"], "egress": [{}]},
    }))
    .await?;
    let found = f
        .wait_findings("press-line-3", "an undeclared IT-to-OT path", |f| {
            f.iter()
                .any(|(k, _, _)| *k == FindingKind::UndeclaredITtoOTPath)
        })
        .await?;
    let leak = found
        .iter()
        .find(|(k, _, _)| *k == FindingKind::UndeclaredITtoOTPath)
        .context("no leak")?;
    ensure!(
        leak.1 == "zone/office->zone/press-line-3" && leak.2.contains("erp -> pod"),
        "leak: {leak:?}"
    );
    f.wait_findings("office", "the office to see the same leak", |f| {
        f.iter()
            .any(|(k, _, _)| *k == FindingKind::UndeclaredITtoOTPath)
    })
    .await?;

    // Closing the hole (or declaring a conduit) clears the finding.
    f.policies
        .delete("vendor-remote-access", &DeleteParams::default())
        .await?;
    f.wait_findings("press-line-3", "the leak to be gone", |f| {
        !f.iter()
            .any(|(k, _, _)| *k == FindingKind::UndeclaredITtoOTPath)
    })
    .await?;
    Ok(())
}
