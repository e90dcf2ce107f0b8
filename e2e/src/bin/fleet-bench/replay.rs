//! The enrollment floor: the writes an enrollment made, issued again directly at the API server
//! with nothing in between (no watch, no queue, no TLS handshake, no signing), so the time they
//! take is what the API server needs for them on this machine.
//!
//! Each kind of write is replayed with the payloads the real run produced (the Devices' final
//! status, the real CertificateRequests and their answers, Events like the operator's), as
//! many times as the run made it, 64 in flight, into a namespace of its own.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use anyhow::Context as _;
use crds::{Device, certmanager::CertificateRequest};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{core::v1::Secret, events::v1::Event};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// How many writes of each kind the real enrollment made.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub device_creates: usize,
    pub secret_creates: usize,
    /// Metadata patches (the operator's finalizer).
    pub device_patches: usize,
    /// Device status writes by the operator and the gateway (and the few small status writes
    /// of other kinds, replayed as Device status writes).
    pub device_status: usize,
    pub request_creates: usize,
    /// CertificateRequest status writes: verdicts and the issuer's answers.
    pub request_status: usize,
    pub events: usize,
}

impl Counts {
    pub fn total(&self) -> usize {
        self.device_creates
            + self.secret_creates
            + self.device_patches
            + self.device_status
            + self.request_creates
            + self.request_status
            + self.events
    }
}

/// Per kind: (writes, seconds).
pub type Timings = BTreeMap<&'static str, (usize, f64)>;

const IN_FLIGHT: usize = 64;

/// Replays `counts` into namespace `ns`, taking payloads from the real run's objects. Returns
/// the time per kind; the floor is their sum.
pub async fn run(
    client: &Client,
    ns: &str,
    counts: &Counts,
    devices: &[Arc<Device>],
    requests: &[CertificateRequest],
    secrets: &[Secret],
) -> anyhow::Result<Timings> {
    anyhow::ensure!(!devices.is_empty(), "no Devices to take payloads from");
    anyhow::ensure!(
        !requests.is_empty() || counts.request_creates == 0,
        "no CertificateRequests to take payloads from"
    );
    let mut timings = Timings::new();
    let device_api: Api<Device> = Api::namespaced(client.clone(), ns);
    let names: Vec<String> = (0..counts.device_creates)
        .map(|i| format!("floor-{i:05}"))
        .collect();

    let t = Instant::now();
    each(counts.device_creates, |i| {
        let api = device_api.clone();
        let real = &devices[i % devices.len()];
        let device: anyhow::Result<Device> = serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device",
            "metadata": {"name": names[i]}, "spec": real.spec,
        }))
        .context("a Device payload");
        async move {
            api.create(&PostParams::default(), &device?).await?;
            anyhow::Ok(())
        }
    })
    .await?;
    timings.insert(
        "Device creates",
        (counts.device_creates, t.elapsed().as_secs_f64()),
    );

    let t = Instant::now();
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), ns);
    each(counts.secret_creates, |i| {
        let api = secret_api.clone();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(format!("floor-tokens-{i}")),
                ..ObjectMeta::default()
            },
            data: secrets
                .get(i % secrets.len().max(1))
                .and_then(|s| s.data.clone()),
            ..Secret::default()
        };
        async move {
            api.create(&PostParams::default(), &secret).await?;
            anyhow::Ok(())
        }
    })
    .await?;
    timings.insert(
        "token Secret creates",
        (counts.secret_creates, t.elapsed().as_secs_f64()),
    );

    let t = Instant::now();
    each(counts.device_patches, |i| {
        let api = device_api.clone();
        let name = names[i % names.len()].clone();
        async move {
            // The same kind of metadata merge patch as adding the operator's finalizer, as an
            // annotation: a finalizer would keep the floor's Devices, and their namespace, from
            // ever being deleted.
            let body =
                json!({"metadata": {"annotations": {"fleetwarden.io/floor": i.to_string()}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(body))
                .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    timings.insert(
        "Device metadata patches",
        (counts.device_patches, t.elapsed().as_secs_f64()),
    );

    // In the order a Device's status is written during enrollment: the operator's Pending status
    // (no identity yet), the gateway's CSR record, then alternately the operator's part and the
    // gateway's part of the Device's final status. Each write changes a field, so none is a
    // no-op.
    let t = Instant::now();
    each(counts.device_status, |i| {
        let api = device_api.clone();
        let name = names[i % names.len()].clone();
        let real = &devices[i % devices.len()];
        let round = i / names.len();
        let status = serde_json::to_value(&real.status).unwrap_or(Value::Null);
        let (manager, part) = match round {
            0 => {
                let mut part = operator_part(&status, round);
                if let Some(p) = part.as_object_mut() {
                    p.remove("identity");
                }
                ("floor-operator", part)
            }
            1 => (
                "floor-gateway",
                json!({"enrollment": status.get("enrollment").cloned().unwrap_or(Value::Null)}),
            ),
            r if r.is_multiple_of(2) => ("floor-operator", operator_part(&status, round)),
            _ => ("floor-gateway", gateway_part(&status, round)),
        };
        async move {
            let body =
                json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "status": part});
            api.patch_status(
                &name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(body),
            )
            .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    timings.insert(
        "Device status writes",
        (counts.device_status, t.elapsed().as_secs_f64()),
    );

    let request_api: Api<CertificateRequest> = Api::namespaced(client.clone(), ns);
    let request_names: Vec<String> = (0..counts.request_creates)
        .map(|i| format!("floor-{i:05}"))
        .collect();
    let t = Instant::now();
    each(counts.request_creates, |i| {
        let api = request_api.clone();
        let real = &requests[i % requests.len()];
        let cr: anyhow::Result<CertificateRequest> = serde_json::from_value(json!({
            "apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest",
            "metadata": {"name": request_names[i], "labels": real.labels(), "annotations": real.annotations()},
            "spec": real.spec,
        }))
        .context("a CertificateRequest payload");
        async move {
            api.create(&PostParams::default(), &cr?).await?;
            anyhow::Ok(())
        }
    })
    .await?;
    timings.insert(
        "CertificateRequest creates",
        (counts.request_creates, t.elapsed().as_secs_f64()),
    );

    // First the verdict, then the issuer's answer (the real request's final status).
    let t = Instant::now();
    each(counts.request_status, |i| {
        let api = request_api.clone();
        let target = request_names.len().max(1);
        let name = request_names
            .get(i % target)
            .cloned()
            .unwrap_or_else(|| "floor-00000".into());
        let real = &requests[i % requests.len()];
        let (manager, status) = if (i / target).is_multiple_of(2) {
            let approved = real
                .status
                .as_ref()
                .and_then(|s| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == crds::certmanager::condition::APPROVED)
                })
                .cloned();
            ("floor-operator", json!({"conditions": approved.into_iter().collect::<Vec<_>>()}))
        } else {
            let mut status = serde_json::to_value(&real.status).unwrap_or(Value::Null);
            if let Some(c) = status.get_mut("conditions").and_then(Value::as_array_mut) {
                c.retain(|c| c["type"] != crds::certmanager::condition::APPROVED);
            }
            ("floor-issuer", status)
        };
        async move {
            let body = json!({"apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest", "status": status});
            api.patch_status(&name, &PatchParams::apply(manager).force(), &Patch::Apply(body))
                .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    timings.insert(
        "CertificateRequest status writes",
        (counts.request_status, t.elapsed().as_secs_f64()),
    );

    let event_api: Api<Event> = Api::namespaced(client.clone(), ns);
    let t = Instant::now();
    each(counts.events, |i| {
        let api = event_api.clone();
        let name = names[i % names.len()].clone();
        let event: anyhow::Result<Event> = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}.floor{i}")},
            "eventTime": jiff::Timestamp::now().to_string(),
            "reportingController": "fleetwarden-operator/device",
            "reportingInstance": "floor",
            "action": "Reconcile",
            "reason": "CertificateIssued",
            "type": "Normal",
            "note": format!("certificate 4f1c0de5a1b2c3d4e5f60718293a4b5c issued to {name}"),
            "regarding": {"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "name": name, "namespace": ns},
        }))
        .context("an Event payload");
        async move {
            api.create(&PostParams::default(), &event?).await?;
            anyhow::Ok(())
        }
    })
    .await?;
    timings.insert("Event creates", (counts.events, t.elapsed().as_secs_f64()));
    Ok(timings)
}

/// Runs `n` writes, `IN_FLIGHT` at a time.
async fn each<F, Fut>(n: usize, mut write: F) -> anyhow::Result<()>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let writes: Vec<Fut> = (0..n).map(&mut write).collect();
    futures::stream::iter(writes)
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// The status fields the operator owns, one condition message marked with `round`.
fn operator_part(status: &Value, round: usize) -> Value {
    let mut part = json!({});
    for key in ["observedGeneration", "phase", "identity", "conditions"] {
        if let Some(v) = status.get(key) {
            part[key] = v.clone();
        }
    }
    if let Some(first) = part
        .get_mut("conditions")
        .and_then(Value::as_array_mut)
        .and_then(|c| c.first_mut())
    {
        let message = first["message"].as_str().unwrap_or_default().to_string();
        first["message"] = json!(format!("{message} ({round})"));
    }
    part
}

/// The status fields the gateway owns, `lastSeen` moved by `round` seconds.
fn gateway_part(status: &Value, round: usize) -> Value {
    let mut part = json!({});
    for key in ["enrollment", "reported", "lastSeen"] {
        if let Some(v) = status.get(key) {
            part[key] = v.clone();
        }
    }
    let seen = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(round as i64);
    part["lastSeen"] = json!(seen.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    part
}
