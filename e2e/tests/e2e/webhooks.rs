//! The admission webhooks called by the real API server: registered by URL with their CA bundle,
//! they reject a tampered rollout, a revived retired device and an overlapping zone with our
//! messages (through `kubectl` too), admit what is valid, and default what is left out.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use crds::{Device, DeviceGroup, UpdateRollout, firmware};
use e2e::{Env, eventually};
use ed25519_dalek::SigningKey;
use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    core::v1::Namespace,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const SCOPE_LABEL: &str = "fleetwarden.io/e2e-webhooks";

fn webhook(name: &str, url: String, ca: &str, ns: &str, failure: &str) -> Value {
    json!({
        "name": name,
        "clientConfig": {"url": url, "caBundle": base64::engine::general_purpose::STANDARD.encode(ca)},
        "rules": [{"apiGroups": ["fleetwarden.io"], "apiVersions": ["v1alpha1"],
                   "operations": ["CREATE", "UPDATE"],
                   "resources": ["devices", "devicegroups", "updaterollouts"], "scope": "Namespaced"}],
        "namespaceSelector": {"matchLabels": {SCOPE_LABEL: ns}},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 5,
        "failurePolicy": failure,
    })
}

async fn create_or_fail<K>(api: &Api<K>, object: Value) -> anyhow::Result<Result<K, String>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let typed: K = serde_json::from_value(object)?;
    match api.create(&PostParams::default(), &typed).await {
        Ok(k) => Ok(Ok(k)),
        Err(kube::Error::Api(s)) => Ok(Err(s.message)),
        Err(e) => Err(e.into()),
    }
}

pub async fn the_api_server_calls_our_webhooks_and_shows_their_messages(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let ns = env.namespace("webhooks").await?;
    let hooks = env.start_webhooks(&ns).await?;
    // Only this test's namespace is sent to these webhooks.
    Api::<Namespace>::all(env.client.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {SCOPE_LABEL: ns}}})),
        )
        .await?;
    let config_name = format!("fleetwarden-{ns}");
    let validating: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": config_name},
        "webhooks": [webhook("validate.fleetwarden.io", hooks.url("/validate"), &hooks.ca_pem, &ns, "Fail")],
    }))?;
    let mutating: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": config_name},
        "webhooks": [webhook("default.fleetwarden.io", hooks.url("/mutate"), &hooks.ca_pem, &ns, "Fail")],
    }))?;
    let vapi: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let mapi: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    vapi.create(&PostParams::default(), &validating).await?;
    mapi.create(&PostParams::default(), &mutating).await?;
    let result = exercise(&env, &ns, &hooks).await;
    let _ = vapi.delete(&config_name, &DeleteParams::default()).await;
    let _ = mapi.delete(&config_name, &DeleteParams::default()).await;
    result.with_context(|| format!("webhooks log:\n{}", hooks.process.log()))
}

async fn exercise(env: &Env, ns: &str, hooks: &e2e::Webhooks) -> anyhow::Result<()> {
    let key = SigningKey::from_bytes(&[42; 32]);
    let groups: Api<DeviceGroup> = Api::namespaced(env.client.clone(), ns);
    let group = json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": "cell"},
        "spec": {
            "certificates": {"issuerRef": {"name": "ca"}},
            "firmware": {"trustedKeys": [{"keyId": "vendor-2026",
                "publicKey": firmware::public_key_base64(&key.verifying_key())}],
                "minimumSecurityVersion": 10},
            "segmentation": {"zone": format!("cell-{ns}"), "workloadSelector": {},
                             "deviceCIDRs": ["10.77.3.0/24"]},
        }
    });
    // Registration takes a moment to reach the API server's webhook cache.
    let created = eventually(
        Duration::from_secs(20),
        "the group to be admitted through the webhooks",
        || async {
            match create_or_fail(&groups, group.clone()).await? {
                Ok(g) => Ok(Some(g)),
                Err(e) if e.contains("already exists") => Ok(Some(groups.get("cell").await?)),
                Err(e) => bail!("the valid group was refused: {e}"),
            }
        },
    )
    .await?;
    eventually(
        Duration::from_secs(20),
        "the webhooks to be called",
        || async {
            Ok((hooks
                .metric("fleetwarden_webhooks_admission_reviews_total{webhook=\"validate\"")
                .await?
                > 0.0)
                .then_some(()))
        },
    )
    .await?;
    ensure!(created.spec.check_in_interval.as_str() == "5m");

    // A second zone overlapping the first one's devices.
    let overlapping = json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": "cell-b"},
        "spec": {"certificates": {"issuerRef": {"name": "ca"}},
                 "segmentation": {"zone": format!("cell-b-{ns}"), "workloadSelector": {},
                                  "deviceCIDRs": ["10.77.0.0/16"]}}
    });
    let refused = create_or_fail(&groups, overlapping)
        .await?
        .err()
        .context("an overlapping zone was admitted")?;
    ensure!(
        refused.contains("admission webhook \"validate.fleetwarden.io\" denied the request")
            && refused.contains("10.77.0.0/16 overlaps 10.77.3.0/24"),
        "{refused}"
    );

    // A signed rollout is admitted; the same rollout with one byte changed is not.
    let mut manifest: crds::rollout::FirmwareManifest = serde_json::from_value(json!({
        "version": "4.2.0", "securityVersion": 12, "sha256": "c".repeat(64), "sizeBytes": 1048576,
        "hardwareModels": ["acme-pressctl-v3"], "expires": "2030-01-01T00:00:00Z",
        "url": "https://fw.example/pressctl-4.2.0.bin", "signature": {"keyId": "", "value": ""}
    }))?;
    firmware::sign(&mut manifest, "vendor-2026", &key);
    let rollouts: Api<UpdateRollout> = Api::namespaced(env.client.clone(), ns);
    let rollout = |name: &str, m: &crds::rollout::FirmwareManifest| {
        json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout", "metadata": {"name": name},
            "spec": {"target": {"groups": ["cell"]}, "firmware": m,
                     "waves": [{"percent": 5}, {"percent": 20}, {"percent": 50}, {"percent": 100}]}
        })
    };
    let mut tampered = manifest.clone();
    tampered.sha256.replace_range(0..1, "d");
    let tampered_yaml = serde_json::to_string(&rollout("tampered", &tampered))?;
    let path = env.scratch.join(format!("{ns}-tampered.json"));
    std::fs::write(&path, tampered_yaml)?;
    let out = env
        .kubectl()
        .args(["apply", "-n", ns, "-f"])
        .arg(&path)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "kubectl applied a tampered rollout");
    ensure!(
        stderr.contains("denied the request: UpdateRollout tampered is invalid: spec.firmware.signature (DeviceGroup cell): firmware signature does not verify with key \"vendor-2026\""),
        "kubectl said: {stderr}"
    );
    eprintln!("kubectl apply of a tampered rollout:\n{stderr}");
    ensure!(
        rollouts.get_opt("tampered").await?.is_none(),
        "nothing was stored"
    );

    let low = {
        let mut m = manifest.clone();
        m.security_version = 9;
        firmware::sign(&mut m, "vendor-2026", &key);
        m
    };
    let refused = create_or_fail(&rollouts, rollout("too-low", &low))
        .await?
        .err()
        .context("a rollout below the group's minimum security version was admitted")?;
    ensure!(
        refused.contains(
            "securityVersion (9) is below DeviceGroup cell's firmware.minimumSecurityVersion (10)"
        ),
        "{refused}"
    );

    let admitted = create_or_fail(&rollouts, rollout("pressctl-4-2", &manifest))
        .await?
        .map_err(|e| anyhow::anyhow!("the signed rollout was refused: {e}"))?;
    ensure!(admitted.spec.success_threshold_percent > 0);
    // Only one active rollout per group.
    let refused = create_or_fail(&rollouts, rollout("second", &manifest))
        .await?
        .err();
    // The first rollout has no status yet (no operator here), so it counts as active.
    let refused = refused.context("a second rollout for the same group was admitted")?;
    ensure!(
        refused.contains("UpdateRollout pressctl-4-2 is still active for cell"),
        "{refused}"
    );

    // Retired is terminal (CEL would say so on 1.25+; this API server relies on the webhook).
    let devices: Api<Device> = Api::namespaced(env.client.clone(), ns);
    create_or_fail(
        &devices,
        json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "metadata": {"name": "plc-1"},
               "spec": {"group": "cell", "hardwareModel": "acme-pressctl-v3", "lifecycle": "Retired"}}),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("device refused: {e}"))?;
    let revive = devices
        .patch(
            "plc-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"lifecycle": "Active"}})),
        )
        .await;
    match revive {
        Err(kube::Error::Api(s)) => {
            ensure!(s.message.contains("Retired is terminal"), "{}", s.message)
        }
        other => bail!("reviving a retired device was not refused: {other:?}"),
    }
    let stored = devices.get("plc-1").await?;
    ensure!(stored.spec.identity.mode == crds::device::IdentityMode::DeviceKey);
    let mutated = hooks
        .metric("fleetwarden_webhooks_admission_reviews_total{webhook=\"mutate\"")
        .await?;
    ensure!(mutated > 0.0, "the defaulting webhook was never called");
    let denied = hooks
        .metric("fleetwarden_webhooks_admission_reviews_total{webhook=\"validate\",kind=\"UpdateRollout\",verdict=\"denied\"}")
        .await?;
    ensure!(denied >= 3.0, "denied rollouts counted: {denied}");
    Ok(())
}
