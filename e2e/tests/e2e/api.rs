//! The API itself: CRDs install, the examples are accepted, bad objects are refused by the real
//! API server with messages that say what to fix, and status is written the GitOps-safe way.

use std::sync::Arc;

use anyhow::{Context as _, bail, ensure};
use crds::{Device, DeviceGroup, UpdateRollout};
use e2e::Env;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

pub async fn crds_install_and_become_established(env: Arc<Env>) -> anyhow::Result<()> {
    // Installing again over the harness's install must be a clean update.
    let names = env.install_crds().await?;
    for ours in [
        "devicegroups.fleetwarden.io",
        "devices.fleetwarden.io",
        "updaterollouts.fleetwarden.io",
    ] {
        ensure!(
            names.iter().any(|n| n == ours),
            "{ours} not installed: {names:?}"
        );
    }
    let api: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    for (name, short, columns) in [
        (
            "devices.fleetwarden.io",
            "dev",
            &["Phase", "Firmware", "Compliant", "Last Seen"][..],
        ),
        (
            "devicegroups.fleetwarden.io",
            "dg",
            &["Zone", "Devices", "Compliant", "Quarantined"][..],
        ),
        (
            "updaterollouts.fleetwarden.io",
            "rollout",
            &["Phase", "Wave", "Succeeded", "Failed"][..],
        ),
    ] {
        let crd = api.get(name).await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            ensure!(
                conditions
                    .iter()
                    .any(|c| c.type_ == wanted && c.status == "True"),
                "{name}: condition {wanted} is not True: {conditions:?}"
            );
        }
        ensure!(crd.spec.scope == "Namespaced", "{name} is not namespaced");
        ensure!(
            crd.spec.names.short_names.as_deref() == Some(&[short.to_string()][..]),
            "{name}: short names {:?}",
            crd.spec.names.short_names
        );
        ensure!(
            crd.spec.names.categories.as_deref() == Some(&["fleet".to_string()][..]),
            "{name}: categories {:?}",
            crd.spec.names.categories
        );
        let version = &crd.spec.versions[0];
        ensure!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name}: no status subresource"
        );
        let printed: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        for column in columns {
            ensure!(
                printed.contains(column),
                "{name}: printer column {column} missing: {printed:?}"
            );
        }
    }
    // The real kubectl discovers the kinds by short name and category.
    let resources = env
        .kubectl_run(&["api-resources", "--api-group=fleetwarden.io", "-o", "wide"])
        .await?;
    for needle in [
        "devices",
        "dev",
        "devicegroups",
        "dg",
        "updaterollouts",
        "rollout",
        "fleet",
    ] {
        ensure!(
            resources.contains(needle),
            "kubectl api-resources lacks {needle}:\n{resources}"
        );
    }
    Ok(())
}

pub async fn examples_apply_with_kubectl(env: Arc<Env>) -> anyhow::Result<()> {
    let ns = env.namespace("examples").await?;
    let examples = env.root.join("examples");
    let out = env
        .kubectl_run(&["apply", "-n", &ns, "-f", &examples.to_string_lossy()])
        .await?;
    ensure!(
        out.matches(" created").count() == 7,
        "kubectl apply output:\n{out}"
    );

    let listed = env
        .kubectl_run(&["get", "fleet", "-n", &ns, "-o", "name"])
        .await?;
    ensure!(listed.lines().count() == 7, "kubectl get fleet:\n{listed}");
    let table = env.kubectl_run(&["get", "devices", "-n", &ns]).await?;
    ensure!(
        table.starts_with("NAME") && table.contains("GROUP") && table.contains("COMPLIANT"),
        "printer columns missing:\n{table}"
    );

    // The API server's schema defaults must equal the Rust defaults: a spec read back from the
    // server is the spec of the file with serde's defaults filled in.
    let groups: Api<DeviceGroup> = Api::namespaced(env.client.clone(), &ns);
    let from_file: Vec<DeviceGroup> = e2e::read_yaml_file(&examples.join("device-group.yaml"))?;
    let stored = groups.get("press-line-3").await?;
    ensure!(
        stored.spec == from_file[0].spec,
        "server defaults differ from Rust defaults:\nserver: {:#?}\nfile: {:#?}",
        stored.spec,
        from_file[0].spec
    );

    let devices: Api<Device> = Api::namespaced(env.client.clone(), &ns);
    let from_file: Vec<Device> = e2e::read_yaml_file(&examples.join("devices.yaml"))?;
    for device in &from_file {
        let name = device
            .meta()
            .name
            .as_deref()
            .context("example device without name")?;
        let stored = devices.get(name).await?;
        ensure!(
            stored.spec == device.spec,
            "device {name}: stored spec differs: {:#?}",
            stored.spec
        );
    }

    // The example rollout is really signed by the example group's key.
    let rollouts: Api<UpdateRollout> = Api::namespaced(env.client.clone(), &ns);
    let rollout = rollouts.get("pressctl-4.2.0").await?;
    let keys = &stored.spec.firmware.trusted_keys;
    crds::firmware::verify(&rollout.spec.firmware, keys)?;
    if let Some(rollback) = &rollout.spec.rollback_firmware {
        crds::firmware::verify(rollback, keys)?;
    }
    ensure!(
        rollout.spec.waves.len() == 4,
        "example rollout should have 4 waves"
    );
    Ok(())
}

/// Creates an arbitrary JSON object of one of our kinds; returns the API server's refusal.
async fn create_raw<K: Resource<DynamicType = ()>>(
    env: &Env,
    ns: &str,
    body: Value,
) -> anyhow::Result<String> {
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), ns, &ar);
    let obj: DynamicObject = serde_json::from_value(body)?;
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => bail!("the API server accepted an invalid {}", ar.kind),
        Err(kube::Error::Api(s)) if s.code == 422 => Ok(s.message),
        Err(e) => Err(e.into()),
    }
}

fn device(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "metadata": {"name": name}, "spec": spec})
}

pub async fn invalid_objects_are_rejected_with_useful_messages(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let ns = env.namespace("invalid").await?;

    let msg = create_raw::<Device>(
        &env,
        &ns,
        device(
            "bad-enum",
            json!({"group": "g", "hardwareModel": "m", "lifecycle": "Decommissioned"}),
        ),
    )
    .await?;
    ensure!(
        msg.contains("spec.lifecycle")
            && msg.contains("Decommissioned")
            && msg.contains("\"Retired\""),
        "bad enum message should name the field and the allowed values: {msg}"
    );

    let msg = create_raw::<Device>(&env, &ns, device("no-model", json!({"group": "g"}))).await?;
    ensure!(
        msg.contains("spec.hardwareModel") && msg.contains("Required value"),
        "missing field message should name the field: {msg}"
    );

    let msg = create_raw::<Device>(
        &env,
        &ns,
        device(
            "bad-pin",
            json!({"group": "g", "hardwareModel": "m", "identity": {"publicKeySha256": "XYZ"}}),
        ),
    )
    .await?;
    ensure!(
        msg.contains("spec.identity.publicKeySha256"),
        "pattern message should name the field: {msg}"
    );

    let mut rollout: Value = serde_norway::from_str(&std::fs::read_to_string(
        env.root.join("examples/update-rollout.yaml"),
    )?)?;
    rollout["metadata"]["name"] = json!("negative-percent");
    rollout["spec"]["waves"][1]["percent"] = json!(-5);
    let msg = create_raw::<UpdateRollout>(&env, &ns, rollout.clone()).await?;
    ensure!(
        msg.contains("percent") && msg.contains("greater than or equal to 1"),
        "negative percent message should say the minimum: {msg}"
    );

    rollout["spec"]["waves"][1]["percent"] = json!(20);
    rollout["spec"]["deviceTimeout"] = json!("1 hour");
    let msg = create_raw::<UpdateRollout>(&env, &ns, rollout.clone()).await?;
    ensure!(
        msg.contains("spec.deviceTimeout"),
        "duration message should name the field: {msg}"
    );

    let group = json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup",
        "metadata": {"name": "bad-cidr"},
        "spec": {"certificates": {"issuerRef": {"name": "ca"}},
                 "segmentation": {"zone": "z", "workloadSelector": {}, "deviceCIDRs": ["10.0.0.0"]}}});
    let msg = create_raw::<DeviceGroup>(&env, &ns, group).await?;
    ensure!(
        msg.contains("deviceCIDRs"),
        "CIDR message should name the field: {msg}"
    );

    // Nothing was stored, and a corrected object is accepted (the refusals were about content).
    let devices: Api<Device> = Api::namespaced(env.client.clone(), &ns);
    ensure!(
        devices.list(&Default::default()).await?.items.is_empty(),
        "a rejected Device was stored"
    );
    rollout["spec"]["deviceTimeout"] = json!("1h");
    let ar = ApiResource::erase::<UpdateRollout>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &ns, &ar);
    api.create(&PostParams::default(), &serde_json::from_value(rollout)?)
        .await
        .context("the corrected rollout should be accepted")?;
    Ok(())
}

fn status_patch(status: Value) -> Patch<Value> {
    Patch::Apply(
        json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "status": status}),
    )
}

async fn example_device(env: &Env, ns: &str, name: &str) -> anyhow::Result<(Api<Device>, Device)> {
    let api: Api<Device> = Api::namespaced(env.client.clone(), ns);
    let created = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(device(
                name,
                json!({"group": "press-line-3", "hardwareModel": "acme-pressctl-v3"}),
            ))?,
        )
        .await?;
    Ok((api, created))
}

pub async fn status_is_written_by_server_side_apply_without_touching_spec(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let ns = env.namespace("status-ssa").await?;
    let (api, created) = example_device(&env, &ns, "plc-1").await?;
    let operator = PatchParams::apply("fleetwarden-operator").force();

    let patched = api
        .patch_status(
            "plc-1",
            &operator,
            &status_patch(json!({
                "observedGeneration": 1,
                "phase": "Pending",
                "conditions": [{"type": "Ready", "status": "False", "reason": "NotEnrolled",
                    "message": "waiting for the device's first CSR", "lastTransitionTime": "2026-11-25T00:00:00Z",
                    "observedGeneration": 1}],
            })),
        )
        .await?;
    let status = patched
        .status
        .clone()
        .context("status missing after apply")?;
    ensure!(
        status.phase == Some(crds::device::DevicePhase::Pending),
        "phase not written: {status:?}"
    );
    ensure!(status.conditions.len() == 1 && status.conditions[0].reason == "NotEnrolled");
    ensure!(
        patched.spec == created.spec,
        "spec changed by a status write"
    );
    ensure!(
        patched.metadata.generation == created.metadata.generation,
        "generation bumped by a status write"
    );
    let managers: Vec<String> = patched
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    ensure!(
        managers == ["fleetwarden-operator"],
        "apply managers: {managers:?}"
    );

    // Sneaking a spec change into a status-subresource apply is ignored by the API server.
    let sneaky = Patch::Apply(
        json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device",
        "spec": {"group": "press-line-3", "hardwareModel": "acme-pressctl-v3", "lifecycle": "Retired"},
        "status": {"observedGeneration": 1, "phase": "Pending"}}),
    );
    let after = api.patch_status("plc-1", &operator, &sneaky).await?;
    ensure!(
        after.spec.lifecycle == crds::device::Lifecycle::Active,
        "spec was changed through the status subresource"
    );
    ensure!(after.metadata.generation == created.metadata.generation);
    Ok(())
}

pub async fn status_writers_do_not_clobber_each_other(env: Arc<Env>) -> anyhow::Result<()> {
    let ns = env.namespace("status-owners").await?;
    let (api, _) = example_device(&env, &ns, "plc-2").await?;
    let operator = PatchParams::apply("fleetwarden-operator").force();
    let gateway = PatchParams::apply("fleetwarden-gateway").force();

    api.patch_status(
        "plc-2",
        &gateway,
        &status_patch(json!({
        "reported": {"firmwareVersion": "4.1.3", "securityVersion": 12, "bootSlot": "A"},
        "lastSeen": "2026-11-25T01:00:00Z"})),
    )
    .await?;
    api.patch_status(
        "plc-2",
        &operator,
        &status_patch(json!({
        "observedGeneration": 1, "phase": "Active",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Enrolled", "message": "ok",
            "lastTransitionTime": "2026-11-25T01:00:00Z"}]})),
    )
    .await?;
    // The operator re-applies its fields without `reported`: the gateway's fields stay.
    api.patch_status("plc-2", &operator, &status_patch(json!({
        "observedGeneration": 1, "phase": "Quarantined",
        "conditions": [{"type": "Ready", "status": "False", "reason": "Quarantined", "message": "isolated",
            "lastTransitionTime": "2026-11-25T01:05:00Z"}]})))
        .await?;
    // The gateway reports a new firmware: the operator's fields stay.
    let last = api
        .patch_status(
            "plc-2",
            &gateway,
            &status_patch(json!({
        "reported": {"firmwareVersion": "4.2.0", "securityVersion": 12, "bootSlot": "B"},
        "lastSeen": "2026-11-25T01:10:00Z"})),
        )
        .await?;
    let status = last.status.context("status missing")?;
    let reported = status
        .reported
        .context("gateway's reported state was clobbered")?;
    ensure!(reported.firmware_version.as_deref() == Some("4.2.0"));
    ensure!(
        status.phase == Some(crds::device::DevicePhase::Quarantined),
        "operator's phase clobbered"
    );
    ensure!(
        status.conditions.len() == 1 && status.conditions[0].reason == "Quarantined",
        "operator's conditions clobbered: {:?}",
        status.conditions
    );
    ensure!(status.last_seen.is_some());
    Ok(())
}
