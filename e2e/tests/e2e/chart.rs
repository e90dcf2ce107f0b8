//! The Helm chart against the real API server: `helm install` creates every object and
//! `helm uninstall` removes them; and the operator and the gateway, each running with nothing but
//! the chart's RBAC for its ServiceAccount (by impersonation), still enroll a device, segment
//! its zone, roll out firmware and retire it, while actions outside their roles are forbidden.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail, ensure};
use crds::{Device, DeviceGroup, UpdateRollout, conditions, firmware, rollout::RolloutPhase};
use e2e::{Env, eventually, helm, tail};
use ed25519_dalek::SigningKey;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Event, ServiceAccount},
    networking::v1::NetworkPolicy,
    rbac::v1::ClusterRole,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::process::Command;

const TRUST_DOMAIN: &str = "fleet.e2e";
const MODEL: &str = "acme-pressctl-v3";

/// `helm install` into `ns` with the webhooks scoped to no namespace (these tests run next to
/// others on one API server, and no webhook pod can run without a kubelet).
async fn install(env: &Env, ns: &str, extra: &[&str]) -> anyhow::Result<String> {
    let release = ns.to_string();
    let chart = helm::chart();
    let kubeconfig = env.kubeconfig.to_string_lossy().into_owned();
    let mut args = vec![
        "install",
        &release,
        chart.to_str().context("chart path")?,
        "--namespace",
        ns,
        "--kubeconfig",
        &kubeconfig,
        "--skip-crds",
        "--set",
        "webhooks.namespaceSelector.matchLabels.fleetwarden\\.io/e2e-no-such-label=x",
    ];
    for e in extra {
        args.extend(["--set", e]);
    }
    let (ok, stdout, stderr) = helm::run(&args).await?;
    if !ok {
        bail!("helm install failed:\n{stdout}\n{stderr}");
    }
    Ok(release)
}

async fn uninstall(env: &Env, ns: &str, release: &str) -> anyhow::Result<()> {
    let kubeconfig = env.kubeconfig.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = helm::run(&[
        "uninstall",
        release,
        "--namespace",
        ns,
        "--kubeconfig",
        &kubeconfig,
    ])
    .await?;
    ensure!(ok, "helm uninstall failed:\n{stdout}\n{stderr}");
    Ok(())
}

pub async fn helm_installs_and_uninstalls_the_chart(env: Arc<Env>) -> anyhow::Result<()> {
    let ns = env.namespace("helm").await?;
    let release = install(&env, &ns, &[]).await?;
    let full = format!("{release}-fleetwarden");
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let names: Vec<String> = deployments
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|d| d.metadata.name)
        .collect();
    for component in ["operator", "webhooks", "gateway"] {
        let name = format!("{full}-{component}");
        ensure!(names.contains(&name), "{name} not installed: {names:?}");
    }
    let operator = deployments.get(&format!("{full}-operator")).await?;
    ensure!(operator.spec.and_then(|s| s.replicas) == Some(2));
    let roles: Api<ClusterRole> = Api::all(env.client.clone());
    ensure!(roles.get_opt(&format!("{full}-gateway")).await?.is_some());
    let out = env
        .kubectl_run(&[
            "get", "validatingwebhookconfiguration,mutatingwebhookconfiguration,certificates,issuers,poddisruptionbudgets,serviceaccounts,services",
            "-n", &ns, "-l", &format!("app.kubernetes.io/instance={release}"), "-o", "name",
        ])
        .await?;
    for want in [
        format!("validatingwebhookconfiguration.admissionregistration.k8s.io/{full}-webhooks"),
        format!("mutatingwebhookconfiguration.admissionregistration.k8s.io/{full}-webhooks"),
        format!("certificate.cert-manager.io/{full}-webhooks"),
        format!("issuer.cert-manager.io/{full}-webhooks-selfsigned"),
        format!("poddisruptionbudget.policy/{full}-operator"),
        format!("serviceaccount/{full}-gateway"),
        format!("service/{full}-gateway"),
    ] {
        ensure!(out.lines().any(|l| l == want), "{want} missing:\n{out}");
    }
    uninstall(&env, &ns, &release).await?;
    eventually(
        Duration::from_secs(30),
        "uninstall to remove everything",
        || async {
            let left = deployments.list(&ListParams::default()).await?.items.len();
            let role = roles.get_opt(&format!("{full}-operator")).await?;
            Ok((left == 0 && role.is_none()).then_some(()))
        },
    )
    .await
}

pub async fn the_operator_and_gateway_work_with_the_charts_rbac_only(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let ns = env.namespace("rbac").await?;
    let issuer = e2e::issuer::start(env.client.clone(), &ns, "e2e-ca")?;
    let release = install(
        &env,
        &ns,
        &[
            "certManager.approvedIssuers[0].kind=Issuer",
            &format!("certManager.approvedIssuers[0].namespace={ns}"),
            "certManager.approvedIssuers[0].name=e2e-ca",
        ],
    )
    .await?;
    let full = format!("{release}-fleetwarden");
    let sas: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &ns);
    for c in ["operator", "gateway"] {
        ensure!(
            sas.get_opt(&format!("{full}-{c}")).await?.is_some(),
            "no ServiceAccount for {c}"
        );
    }
    let as_operator = env.kubeconfig_as_service_account(&ns, &format!("{full}-operator"))?;
    let as_gateway = env.kubeconfig_as_service_account(&ns, &format!("{full}-gateway"))?;

    // The group, as an admin (Git) would create it.
    let key = SigningKey::from_bytes(&[5; 32]);
    let groups: Api<DeviceGroup> = Api::namespaced(env.client.clone(), &ns);
    let group: DeviceGroup = serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": "cell"},
        "spec": {
            "certificates": {"issuerRef": issuer.issuer_ref(), "trustDomain": TRUST_DOMAIN},
            "enrollment": {"tokenSecretRef": {"name": "cell-tokens"}},
            "firmware": {"trustedKeys": [{"keyId": "vendor", "publicKey": firmware::public_key_base64(&key.verifying_key())}]},
            "segmentation": {"zone": format!("zone-{ns}"), "workloadSelector": {"matchLabels": {"app": "scada"}},
                             "deviceCIDRs": ["10.88.0.0/24"]},
        }
    }))?;
    groups.create(&PostParams::default(), &group).await?;

    let operator = env.start_operator_as(&as_operator, &ns, "operator").await?;
    let gateway = env
        .start_gateway_as(&as_gateway, &ns, &issuer.ca_pem, &[])
        .await?;
    let result = flows(&env, &ns, &full, &key, &gateway).await;
    let logs = format!(
        "operator log:\n{}\ngateway log:\n{}",
        tail(&operator.process.log(), 40),
        tail(&gateway.process.log(), 20)
    );
    result.context(logs.clone())?;
    for (who, log) in [
        ("operator", operator.process.log()),
        ("gateway", gateway.process.log()),
    ] {
        ensure!(
            !log.contains("forbidden") && !log.contains("Forbidden"),
            "the {who} hit an RBAC refusal:\n{logs}"
        );
    }
    drop(issuer);
    Ok(())
}

async fn flows(
    env: &Env,
    ns: &str,
    full: &str,
    key: &SigningKey,
    gateway: &e2e::Gateway,
) -> anyhow::Result<()> {
    let devices: Api<Device> = Api::namespaced(env.client.clone(), ns);
    let provisioned = e2e::fleet::provision(
        &env.client,
        ns,
        "cell",
        MODEL,
        "cell-tokens",
        &["plc-1".to_string()],
    )
    .await?;
    let state = env.scratch.join(ns).join("plc-1");
    let agent = |token: Option<&str>| {
        let mut cmd = Command::new(env.binary("fleetwarden-agent"));
        cmd.args([
            "run",
            "--once",
            "--gateway",
            &gateway.url(),
            "--gateway-ca",
            gateway.ca_file.to_str().unwrap_or_default(),
            "--trust-domain",
            TRUST_DOMAIN,
            "--namespace",
            ns,
            "--name",
            "plc-1",
            "--state-dir",
            state.to_str().unwrap_or_default(),
            "--firmware-version",
            "4.1.3",
            "--security-version",
            "12",
            "--address",
            "10.88.0.7",
        ])
        .env("FLEETWARDEN_LOG", "warn");
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd
    };

    // Enrollment: gateway records the CSR, operator approves, the issuer signs, operator copies.
    let out = agent(Some(&provisioned[0].token)).output().await?;
    ensure!(
        out.status.success(),
        "enrollment failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = devices.get("plc-1").await?;
    let status = d.status.context("no status")?;
    ensure!(status.identity.is_some() && conditions::is_true(&status.conditions, "Enrolled"));
    ensure!(
        status
            .reported
            .as_ref()
            .is_some_and(|r| r.addresses == ["10.88.0.7"]),
        "check-in recorded"
    );

    // Segmentation: the operator owns the zone's NetworkPolicies.
    let policies: Api<NetworkPolicy> = Api::namespaced(env.client.clone(), ns);
    eventually(Duration::from_secs(20), "the zone's policies", || async {
        Ok((policies.list(&ListParams::default()).await?.items.len() >= 3).then_some(()))
    })
    .await?;

    // A rollout: the operator writes its status and Events, the gateway offers the firmware.
    let mut manifest: crds::rollout::FirmwareManifest = serde_json::from_value(json!({
        "version": "4.2.0", "securityVersion": 12, "sha256": "e".repeat(64), "sizeBytes": 1024,
        "hardwareModels": [MODEL], "expires": "2030-01-01T00:00:00Z",
        "url": "https://fw.example/fw.bin", "signature": {"keyId": "", "value": ""}
    }))?;
    firmware::sign(&mut manifest, "vendor", key);
    let rollouts: Api<UpdateRollout> = Api::namespaced(env.client.clone(), ns);
    let rollout: UpdateRollout = serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout", "metadata": {"name": "to-4-2"},
        "spec": {"target": {"groups": ["cell"]}, "firmware": manifest, "waves": [{"percent": 100}]}
    }))?;
    rollouts.create(&PostParams::default(), &rollout).await?;
    eventually(
        Duration::from_secs(20),
        "the rollout to progress",
        || async {
            let r = rollouts.get("to-4-2").await?;
            Ok((r.status.and_then(|s| s.phase) == Some(RolloutPhase::Progressing)).then_some(()))
        },
    )
    .await?;
    let answer: Value = eventually(Duration::from_secs(20), "an offer at check-in", || async {
        let out = agent(None).output().await?;
        ensure!(
            out.status.success(),
            "check-in failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: Value = serde_json::from_slice(&out.stdout)?;
        Ok(answer.get("offer").is_some().then_some(answer))
    })
    .await?;
    ensure!(
        answer["offer"]["manifest"]["version"] == "4.2.0",
        "{answer}"
    );
    let events: Api<Event> = Api::namespaced(env.client.clone(), ns);
    eventually(
        Duration::from_secs(20),
        "the operator's rollout Events",
        || async {
            let list = events
                .list(&ListParams::default().fields("involvedObject.name=to-4-2"))
                .await?;
            Ok(list
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("WaveStarted"))
                .then_some(()))
        },
    )
    .await?;

    // Retirement: the operator revokes, deletes the CertificateRequests, records the serial.
    devices
        .patch(
            "plc-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"lifecycle": "Retired"}})),
        )
        .await?;
    let groups: Api<DeviceGroup> = Api::namespaced(env.client.clone(), ns);
    eventually(
        Duration::from_secs(20),
        "the retired serial in the group",
        || async {
            let g = groups.get("cell").await?;
            Ok(g.status
                .is_some_and(|s| !s.revoked_serials.is_empty())
                .then_some(()))
        },
    )
    .await?;

    // Outside the roles: the gateway may not delete or edit Devices, the operator may not
    // delete them or read other Secrets' lists.
    for (sa, args) in [
        ("gateway", vec!["delete", "device", "plc-1"]),
        (
            "gateway",
            vec![
                "patch",
                "device",
                "plc-1",
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"lifecycle":"Active"}}"#,
            ],
        ),
        (
            "gateway",
            vec!["create", "secret", "generic", "x", "--from-literal=a=b"],
        ),
        ("operator", vec!["delete", "device", "plc-1"]),
        ("operator", vec!["get", "secrets"]),
    ] {
        let user = format!("system:serviceaccount:{ns}:{full}-{sa}");
        let out = env
            .kubectl()
            .args(["-n", ns, "--as", &user])
            .args(&args)
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.to_lowercase().contains("forbidden"),
            "{sa} was allowed to {args:?}: {stderr}"
        );
    }
    ensure!(
        devices.get_opt("plc-1").await?.is_some(),
        "the device is still there"
    );
    Ok(())
}
