//! Device identity controller. Owns: the Device's `status.phase`, `status.identity`, the Ready,
//! Enrolled, CertificateExpiring and Degraded conditions, the CertificateRequests (DeviceKey) or
//! Certificate (ManagedKey) of each Device, their approval, and the revoked-serial record of the
//! DeviceGroup. Reads the gateway's `status.enrollment`. Never writes `spec`.
//!
//! Inputs come from watch-fed caches (Devices, DeviceGroups, CertificateRequests, Certificates);
//! the only reads are a ManagedKey device's Secret when its certificate changes. The decision is
//! `device_plan::plan`; this file gathers its inputs and carries it out.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crds::{
    Device, DeviceGroup,
    certmanager::{
        self, CERTIFICATE_NAME_ANNOTATION, CertManagerCondition, Certificate, CertificateRequest,
    },
    conditions,
    device::DeviceStatus,
    group::RevokedSerial,
};
use jiff::Timestamp;
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder},
        finalizer::{self, finalizer},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    FIELD_MANAGER,
    controllers::{DeviceFeed, Shared},
    device_plan::{self, Inputs, Plan, StatusPlan, managed_certificate_name, managed_secret_name},
    index::Index,
    runner::{self, ControllerTask, ReconcileError},
};
use futures::StreamExt;

pub const CONTROLLER: &str = "device";
pub const FINALIZER: &str = "fleetwarden.io/device-identity";
/// Revoked serials kept in a DeviceGroup's status (newest first).
pub const MAX_REVOKED_SERIALS: usize = 256;

pub struct Context {
    pub client: Client,
    pub groups: Store<DeviceGroup>,
    pub requests: Store<CertificateRequest>,
    /// CertificateRequests by controlling Device uid, and by `cert:<ns>/<Certificate>`.
    request_index: Arc<Index<CertificateRequest>>,
    pub certificates: Store<Certificate>,
    pub recorder: Recorder,
    pub shared: Shared,
    expiring: Mutex<HashSet<(String, String)>>,
    memo: Mutex<Memo>,
}

/// What this controller wrote that the watch caches may not show yet. A reconcile can start
/// before the watch event of the previous one's write arrives (the cache may even deliver an
/// older version of the Device first); without this it would plan from the stale object and
/// repeat the write, its Event and its metric. The operator is the only writer of its status
/// fields, so what it last wrote is their current value until the cache agrees.
#[derive(Default)]
struct Memo {
    /// Device uid -> (when, the operator-owned status fields we last wrote).
    status: HashMap<String, (Instant, OwnedStatus)>,
    /// CertificateRequests (namespace, name) we created or gave a verdict, and when.
    requests: HashMap<(String, String), Instant>,
    /// When `requests` was last swept of expired entries.
    swept: Option<Instant>,
}

impl Memo {
    /// Whether the request named `key` was written within [`MEMO_TTL`] of `now`. Expired entries
    /// are swept at most once per [`MEMO_TTL`], not on every lookup: during a mass enrollment the
    /// map holds one entry per device in flight and lookups come once per reconcile.
    fn recent_request(&mut self, key: &(String, String), now: Instant) -> bool {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < MEMO_TTL;
        if self
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= MEMO_TTL)
        {
            self.requests.retain(|_, at| fresh(at));
            self.swept = Some(now);
        }
        self.requests.get(key).is_some_and(fresh)
    }
}

/// The Device status fields the operator owns.
#[derive(Clone, Debug, PartialEq)]
struct OwnedStatus {
    observed_generation: Option<i64>,
    phase: Option<crds::device::DevicePhase>,
    identity: Option<crds::device::IdentityStatus>,
    conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

impl OwnedStatus {
    fn of(status: &DeviceStatus, types: &HashSet<String>) -> Self {
        Self {
            observed_generation: status.observed_generation,
            phase: status.phase,
            identity: status.identity.clone(),
            conditions: status
                .conditions
                .iter()
                .filter(|c| types.contains(&c.type_))
                .cloned()
                .collect(),
        }
    }

    fn types(&self) -> HashSet<String> {
        self.conditions.iter().map(|c| c.type_.clone()).collect()
    }

    /// Replaces the owned fields of `status` with these, keeping the gateway's.
    fn overlay(&self, status: &mut DeviceStatus) {
        let types = self.types();
        status.observed_generation = self.observed_generation;
        status.phase = self.phase;
        status.identity = self.identity.clone();
        status.conditions.retain(|c| !types.contains(&c.type_));
        status.conditions.extend(self.conditions.iter().cloned());
    }
}

/// Condition types this controller writes on Devices.
const OWNED_CONDITIONS: &[&str] = &[
    conditions::types::READY,
    conditions::types::ENROLLED,
    conditions::types::COMPLIANT,
    conditions::types::CERTIFICATE_EXPIRING,
    conditions::types::DEGRADED,
];

/// How long a remembered write stands in for the cache at most.
const MEMO_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{object}: {action} failed: {source}")]
    Kube {
        object: String,
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{object}: {source}")]
    Finalizer {
        object: String,
        #[source]
        source: Box<finalizer::Error<Error>>,
    },
    #[error("{0}: the object has no namespace")]
    NoNamespace(String),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::Finalizer { .. } => "finalizer",
            Error::NoNamespace(_) => "invalid_object",
        }
    }
}

fn kube_err(object: &str, action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    let object = object.to_string();
    move |source| Error::Kube {
        object,
        action,
        source,
    }
}

/// Starts the controller. It watches Devices, and the DeviceGroups, CertificateRequests and
/// Certificates that affect them, in `shared.namespace` (or all namespaces).
pub fn start(
    shared: &Shared,
    devices: &mut DeviceFeed,
    shutdown: &CancellationToken,
) -> ControllerTask {
    let client = shared.client.clone();
    let (groups, groups_writer) = reflector::store();
    let (requests, requests_writer) = reflector::store();
    let (certificates, certificates_writer) = reflector::store();

    // A group's spec (policy, issuer) matters to its devices; its status (inventory, revoked
    // serials, rewritten every few seconds on a busy fleet) does not. Only spec changes and
    // deletions fan out to the group's devices.
    let generations: Arc<Mutex<HashMap<String, Option<i64>>>> = Arc::default();
    let group_events = watcher(shared.api::<DeviceGroup>(), watcher::Config::default())
        .default_backoff()
        .modify(|g: &mut DeviceGroup| g.managed_fields_mut().clear())
        .reflect(groups_writer)
        .filter_map(move |event| {
            let generations = generations.clone();
            async move {
                let mut seen = generations.lock().ok()?;
                match event {
                    Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g)) => {
                        let uid = g.uid().unwrap_or_default();
                        let changed =
                            seen.insert(uid, g.metadata.generation) != Some(g.metadata.generation);
                        changed.then_some(Ok(g))
                    }
                    Ok(watcher::Event::Delete(g)) => {
                        seen.remove(&g.uid().unwrap_or_default());
                        Some(Ok(g))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                }
            }
        });
    let request_index = Index::new(request_keys);
    let indexer = request_index.clone();
    let request_events = watcher(
        shared.api::<CertificateRequest>(),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(slim_request)
    .reflect(requests_writer)
    .inspect(move |event| {
        if let Ok(e) = event {
            indexer.observe(e);
        }
    })
    .touched_objects();
    let certificate_events = watcher(shared.api::<Certificate>(), watcher::Config::default())
        .default_backoff()
        .modify(|c: &mut Certificate| c.managed_fields_mut().clear())
        .reflect(certificates_writer)
        .touched_objects();

    let device_store = devices.store();
    let controller = Controller::for_shared_stream(devices.subscribe(), devices.store());
    let certs_for_mapping = certificates.clone();
    let controller = controller
        .watches_stream(group_events, move |group: DeviceGroup| {
            let ns = group.namespace();
            let name = group.name_any();
            device_store
                .state()
                .into_iter()
                .filter(|d| d.namespace() == ns && d.spec.group == name)
                .map(|d| ObjectRef::from_obj(d.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(request_events, move |cr: CertificateRequest| {
            owning_device(&cr, &certs_for_mapping)
        })
        .watches_stream(certificate_events, |cert: Certificate| {
            controller_device(cert.meta(), cert.namespace())
        });

    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), shared.reporter(CONTROLLER)),
        client,
        groups,
        requests,
        request_index,
        certificates,
        shared: shared.clone(),
        expiring: Mutex::new(HashSet::new()),
        memo: Mutex::new(Memo::default()),
    });
    runner::task(
        CONTROLLER,
        controller,
        ctx,
        reconcile,
        shared.metrics.clone(),
        shutdown.clone(),
    )
}

/// Index keys of a CertificateRequest: its controller's uid, and the ManagedKey Certificate
/// cert-manager made it for.
fn request_keys(cr: &CertificateRequest) -> Vec<String> {
    let mut keys: Vec<String> = cr
        .owner_references()
        .iter()
        .filter(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
        .collect();
    if let (Some(ns), Some(cert)) = (
        cr.namespace(),
        cr.annotations().get(CERTIFICATE_NAME_ANNOTATION),
    ) {
        keys.push(format!("cert:{ns}/{cert}"));
    }
    keys
}

/// Cached CertificateRequests keep what decisions need: the CSR only while a verdict is
/// pending, never managedFields.
fn slim_request(cr: &mut CertificateRequest) {
    cr.managed_fields_mut().clear();
    let conditions = cr
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let decided = certmanager::condition_true(conditions, certmanager::condition::APPROVED)
        || certmanager::condition_true(conditions, certmanager::condition::DENIED);
    if decided {
        cr.spec.request.clear();
    }
}

fn controller_device(
    meta: &kube::api::ObjectMeta,
    ns: Option<String>,
) -> Option<ObjectRef<Device>> {
    let owner = meta.owner_references.iter().flatten().find(|o| {
        o.controller == Some(true)
            && o.kind == "Device"
            && o.api_version == "fleetwarden.io/v1alpha1"
    })?;
    Some(ObjectRef::new(&owner.name).within(ns.as_deref()?))
}

/// The Device a CertificateRequest belongs to: its controller, or, for requests cert-manager
/// made for a ManagedKey Certificate, that Certificate's controller.
fn owning_device(
    cr: &CertificateRequest,
    certificates: &Store<Certificate>,
) -> Option<ObjectRef<Device>> {
    let ns = cr.namespace()?;
    if let Some(device) = controller_device(cr.meta(), Some(ns.clone())) {
        return Some(device);
    }
    let cert_name = cr.annotations().get(CERTIFICATE_NAME_ANNOTATION)?;
    let cert = certificates.get(&ObjectRef::new(cert_name).within(&ns))?;
    controller_device(cert.meta(), Some(ns))
}

fn describe(device: &Device) -> String {
    runner::describe(device)
}

async fn reconcile(device: Arc<Device>, ctx: Arc<Context>) -> Result<Action, Error> {
    let object = describe(&device);
    let ns = device
        .namespace()
        .ok_or_else(|| Error::NoNamespace(object.clone()))?;
    let api: Api<Device> = Api::namespaced(ctx.client.clone(), &ns);
    // The finalizer helper adds or removes our finalizer with a patch of its own.
    let has_finalizer = device.finalizers().iter().any(|f| f == FINALIZER);
    if has_finalizer == device.metadata.deletion_timestamp.is_some() {
        ctx.shared.metrics.write("devices", "patch");
    }
    finalizer(&api, FINALIZER, device, |event| async {
        match event {
            finalizer::Event::Apply(d) => apply(&d, &ctx).await,
            finalizer::Event::Cleanup(d) => cleanup(&d, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer {
        object,
        source: Box::new(e),
    })
}

/// Collects the plan's inputs from the caches (and a Secret, for ManagedKey renewals).
async fn gather<'a>(
    device: &'a Device,
    ctx: &Context,
    group: &'a Option<Arc<DeviceGroup>>,
    requests: &'a [Arc<CertificateRequest>],
    certificate: &'a Option<Arc<Certificate>>,
    certificate_requests: &'a [Arc<CertificateRequest>],
) -> Result<Inputs<'a>, Error> {
    let ns = device.namespace().unwrap_or_default();
    let name = device.name_any();
    let managed_secret = if device_plan::needs_managed_secret(device, certificate.as_deref()) {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let secret_name = managed_secret_name(&name);
        let secret = secrets
            .get_opt(&secret_name)
            .await
            .map_err(kube_err(&describe(device), "reading the ManagedKey Secret"))?;
        secret.and_then(|s| {
            let data = s.data.unwrap_or_default();
            let text = |k: &str| {
                data.get(k)
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
            };
            Some((text("tls.crt")?, text("ca.crt")))
        })
    } else {
        None
    };
    Ok(Inputs {
        device,
        group: group.as_deref(),
        requests: requests.iter().map(AsRef::as_ref).collect(),
        certificate: certificate.as_deref(),
        certificate_requests: certificate_requests.iter().map(AsRef::as_ref).collect(),
        managed_secret,
        now: Timestamp::now(),
    })
}

struct Cached {
    group: Option<Arc<DeviceGroup>>,
    requests: Vec<Arc<CertificateRequest>>,
    certificate: Option<Arc<Certificate>>,
    certificate_requests: Vec<Arc<CertificateRequest>>,
}

fn cached(device: &Device, ctx: &Context) -> Cached {
    let ns = device.namespace().unwrap_or_default();
    let uid = device.uid().unwrap_or_default();
    let controlled_by_device = |meta: &kube::api::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.uid == uid)
    };
    let group = ctx
        .groups
        .get(&ObjectRef::new(&device.spec.group).within(&ns));
    let cert_name = managed_certificate_name(&device.name_any());
    let certificate = ctx
        .certificates
        .get(&ObjectRef::new(&cert_name).within(&ns))
        .filter(|c| controlled_by_device(c.meta()));
    let lookup = |key: &str| -> Vec<Arc<CertificateRequest>> {
        ctx.request_index
            .get(key)
            .iter()
            .filter_map(|r| ctx.requests.get(r))
            .filter(|cr| cr.namespace().as_deref() == Some(ns.as_str()))
            .collect()
    };
    let requests: Vec<_> = lookup(&uid)
        .into_iter()
        .filter(|cr| controlled_by_device(cr.meta()))
        .collect();
    let certificate_requests: Vec<_> = if certificate.is_some() {
        lookup(&format!("cert:{ns}/{cert_name}"))
            .into_iter()
            .filter(|cr| !controlled_by_device(cr.meta()))
            .collect()
    } else {
        Vec::new()
    };
    Cached {
        group,
        requests,
        certificate,
        certificate_requests,
    }
}

async fn apply(device: &Device, ctx: &Context) -> Result<Action, Error> {
    let device = &ctx.with_written_status(device);
    let c = cached(device, ctx);
    let inputs = gather(
        device,
        ctx,
        &c.group,
        &c.requests,
        &c.certificate,
        &c.certificate_requests,
    )
    .await?;
    let plan = device_plan::plan(&inputs);
    execute(device, ctx, &plan).await?;
    if let Some(status) = &plan.status {
        write_status(device, ctx, status).await?;
    }
    ctx.set_expiring(device, plan.expiring);
    Ok(match plan.requeue_after {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

async fn cleanup(device: &Device, ctx: &Context) -> Result<Action, Error> {
    let c = cached(device, ctx);
    let inputs = gather(
        device,
        ctx,
        &c.group,
        &c.requests,
        &c.certificate,
        &c.certificate_requests,
    )
    .await?;
    let plan = device_plan::cleanup(&inputs);
    execute(device, ctx, &plan).await?;
    ctx.set_expiring(device, false);
    if let Ok(mut memo) = ctx.memo.lock() {
        memo.status.remove(&device.uid().unwrap_or_default());
    }
    Ok(Action::await_change())
}

impl Context {
    /// The Device as it is after our last status write, when the cache has not caught up.
    fn with_written_status(&self, device: &Device) -> Device {
        let mut device = device.clone();
        let Ok(mut memo) = self.memo.lock() else {
            return device;
        };
        let uid = device.uid().unwrap_or_default();
        let Some((at, written)) = memo.status.get(&uid) else {
            return device;
        };
        let mut status = device.status.clone().unwrap_or_default();
        let cached = OwnedStatus::of(&status, &written.types());
        if cached == *written || at.elapsed() >= MEMO_TTL {
            memo.status.remove(&uid);
        } else {
            written.overlay(&mut status);
            device.status = Some(status);
        }
        device
    }

    fn remember_status(&self, device: &Device, written: &Device) {
        let (Ok(mut memo), Some(status)) = (self.memo.lock(), written.status.as_ref()) else {
            return;
        };
        let types = device
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .chain(status.conditions.iter())
            .map(|c| c.type_.clone())
            .filter(|t| OWNED_CONDITIONS.contains(&t.as_str()))
            .collect();
        memo.status.insert(
            device.uid().unwrap_or_default(),
            (Instant::now(), OwnedStatus::of(status, &types)),
        );
    }

    /// Whether we wrote to this CertificateRequest recently (the cache may not show it yet).
    fn recently_written(&self, ns: &str, name: &str) -> bool {
        let Ok(mut memo) = self.memo.lock() else {
            return false;
        };
        memo.recent_request(&(ns.to_string(), name.to_string()), Instant::now())
    }

    fn remember_request(&self, ns: &str, name: &str) {
        if let Ok(mut memo) = self.memo.lock() {
            memo.requests
                .insert((ns.to_string(), name.to_string()), Instant::now());
        }
    }

    fn set_expiring(&self, device: &Device, expiring: bool) {
        let key = (device.namespace().unwrap_or_default(), device.name_any());
        if let Ok(mut set) = self.expiring.lock() {
            if expiring {
                set.insert(key);
            } else {
                set.remove(&key);
            }
            self.shared
                .metrics
                .certificates_expiring
                .set(set.len() as i64);
        }
    }
}

/// Carries out everything but the status write, in an order that is safe to repeat: create,
/// approve or deny, then delete, then record revocations.
async fn execute(device: &Device, ctx: &Context, plan: &Plan) -> Result<(), Error> {
    let ns = device.namespace().unwrap_or_default();
    let object = describe(device);
    let metrics = &ctx.shared.metrics;
    let requests: Api<CertificateRequest> = Api::namespaced(ctx.client.clone(), &ns);

    if let Some(cr) = plan
        .create_request
        .as_ref()
        .filter(|cr| !ctx.recently_written(&ns, &cr.name_any()))
    {
        metrics.write("certificaterequests", "create");
        match requests.create(&PostParams::default(), cr).await {
            Ok(_) => {}
            // Created by an earlier pass (e.g. before a restart): deterministic names make
            // this the same request.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err(&object, "creating the CertificateRequest")(e)),
        }
        ctx.remember_request(&ns, &cr.name_any());
    }
    if let Some(cert) = &plan.apply_certificate {
        let certs: Api<Certificate> = Api::namespaced(ctx.client.clone(), &ns);
        metrics.write("certificates", "apply");
        certs
            .patch(
                &cert.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(cert),
            )
            .await
            .map_err(kube_err(&object, "applying the ManagedKey Certificate"))?;
    }
    for (verdicts, approved) in [(&plan.approve, true), (&plan.deny, false)] {
        for verdict in verdicts {
            if ctx.recently_written(&ns, &format!("{}#verdict", verdict.request)) {
                continue;
            }
            let condition_type = if approved {
                certmanager::condition::APPROVED
            } else {
                certmanager::condition::DENIED
            };
            let body = json!({
                "apiVersion": "cert-manager.io/v1",
                "kind": "CertificateRequest",
                "status": {"conditions": [CertManagerCondition::new(
                    condition_type, true, device_plan::APPROVAL_REASON, verdict.message.clone(), Time(Timestamp::now()),
                )]},
            });
            metrics.write("certificaterequests/status", "apply");
            // Not forced: if another approver already owns the condition, the conflict is the
            // signal, and the next pass reports the foreign approval.
            match requests
                .patch_status(
                    &verdict.request,
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Apply(body),
                )
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::warn!(device = %object, request = %verdict.request, "another approver owns this CertificateRequest's verdict");
                }
                Err(e) => return Err(kube_err(&object, "approving the CertificateRequest")(e)),
            }
            // A reconcile that runs before the watch shows this verdict must not repeat it
            // (nor its Event).
            ctx.remember_request(&ns, &format!("{}#verdict", verdict.request));
            metrics.enrollment(approved, verdict.policy_reason);
            // A denial is a Warning on the Device. An approval is recorded where cert-manager
            // looks for it, the request's Approved condition (with our reason and message), and
            // the Device gets one Event when the certificate arrives: at fleet scale an Event
            // per step is an API write per step.
            if approved {
                tracing::info!(device = %object, request = %verdict.request, "CertificateRequest approved");
            } else {
                publish(
                    ctx,
                    device,
                    true,
                    "CsrDenied",
                    &format!("{}: {}", verdict.request, verdict.message),
                )
                .await;
            }
        }
    }
    if let Some(reason) = plan.csr_denied.filter(|_| plan.deny.is_empty()) {
        // Denied before any CertificateRequest existed: count it once, when the condition changes.
        if plan.events.iter().any(|e| e.reason == "CsrDenied") {
            tracing::info!(device = %object, reason, resource_version = ?device.metadata.resource_version, "enrollment CSR denied");
            metrics.enrollment(false, reason);
        }
    }
    for name in &plan.delete_requests {
        metrics.write("certificaterequests", "delete");
        delete_ignoring_absent(&requests, name)
            .await
            .map_err(kube_err(&object, "deleting an old CertificateRequest"))?;
    }
    if plan.delete_certificate {
        let dev_name = device.name_any();
        let certs: Api<Certificate> = Api::namespaced(ctx.client.clone(), &ns);
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        metrics.write("certificates", "delete");
        delete_ignoring_absent(&certs, &managed_certificate_name(&dev_name))
            .await
            .map_err(kube_err(&object, "deleting the ManagedKey Certificate"))?;
        metrics.write("secrets", "delete");
        delete_ignoring_absent(&secrets, &managed_secret_name(&dev_name))
            .await
            .map_err(kube_err(&object, "deleting the ManagedKey Secret"))?;
    }
    if let Some(serial) = &plan.revoke_serial {
        record_revocation(device, ctx, serial).await?;
    }
    for event in &plan.events {
        publish(ctx, device, event.warning, event.reason, &event.note).await;
    }
    Ok(())
}

/// Deletes an object; absent objects, and kinds whose CRDs are not installed, count as deleted,
/// so a finalizer never sticks because cert-manager's objects are already gone.
async fn delete_ignoring_absent<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Adds the serial to the DeviceGroup's `revokedSerials` (newest first, bounded). A merge patch
/// carrying the resourceVersion read, so concurrent writers conflict instead of losing entries;
/// a missing group has nothing to record into.
async fn record_revocation(device: &Device, ctx: &Context, serial: &str) -> Result<(), Error> {
    let ns = device.namespace().unwrap_or_default();
    let groups: Api<DeviceGroup> = Api::namespaced(ctx.client.clone(), &ns);
    let object = describe(device);
    let Some(group) = groups
        .get_opt(&device.spec.group)
        .await
        .map_err(kube_err(&object, "reading the DeviceGroup"))?
    else {
        return Ok(());
    };
    let mut revoked = group.status.map(|s| s.revoked_serials).unwrap_or_default();
    if revoked.iter().any(|r| r.serial_number == serial) {
        return Ok(());
    }
    revoked.insert(
        0,
        RevokedSerial {
            serial_number: serial.to_string(),
            device: device.name_any(),
            revoked_at: Time(Timestamp::now()),
        },
    );
    revoked.truncate(MAX_REVOKED_SERIALS);
    let patch = json!({
        "metadata": {"resourceVersion": group.metadata.resource_version},
        "status": {"revokedSerials": revoked},
    });
    ctx.shared.metrics.write("devicegroups/status", "merge");
    groups
        .patch_status(
            &device.spec.group,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..PatchParams::default()
            },
            &Patch::Merge(patch),
        )
        .await
        .map_err(kube_err(
            &object,
            "recording the revoked serial in the DeviceGroup",
        ))?;
    Ok(())
}

/// Applies the operator's part of the Device status when it differs from what is stored.
async fn write_status(device: &Device, ctx: &Context, desired: &StatusPlan) -> Result<(), Error> {
    let current = device.status.clone().unwrap_or_default();
    let now = Time(Timestamp::now());
    let generation = device.metadata.generation;
    let ours: HashSet<&str> = desired.conditions.iter().map(|c| c.type_).collect();
    let previous: Vec<_> = current
        .conditions
        .iter()
        .filter(|c| ours.contains(c.type_.as_str()))
        .cloned()
        .collect();
    let conditions = conditions::build_all(&previous, desired.conditions.clone(), generation, &now);
    let unchanged = current.observed_generation == generation
        && current.phase == Some(desired.phase)
        && current.identity == desired.identity
        && previous == conditions;
    if unchanged {
        return Ok(());
    }
    let mut status = BTreeMap::new();
    status.insert("observedGeneration", json!(generation));
    status.insert("phase", json!(desired.phase));
    status.insert("conditions", json!(conditions));
    if let Some(identity) = &desired.identity {
        status.insert("identity", json!(identity));
    }
    let body = json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "status": status});
    let api: Api<Device> =
        Api::namespaced(ctx.client.clone(), &device.namespace().unwrap_or_default());
    ctx.shared.metrics.write("devices/status", "apply");
    let written = api
        .patch_status(
            &device.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(kube_err(&describe(device), "writing status"))?;
    tracing::debug!(
        device = %describe(device),
        from = ?device.metadata.resource_version,
        to = ?written.metadata.resource_version,
        "status written"
    );
    ctx.remember_status(device, &written);
    if let Some(identity) = &desired.identity {
        let before = current.identity.as_ref();
        if before.map(|i| &i.fingerprint_sha256) != Some(&identity.fingerprint_sha256) {
            ctx.shared.metrics.identity_written(before.is_some());
        }
    }
    Ok(())
}

async fn publish(ctx: &Context, device: &Device, warning: bool, reason: &str, note: &str) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        note: Some(note.chars().take(1024).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.shared.metrics.write("events", "create");
    if let Err(e) = ctx.recorder.publish(&event, &device.object_ref(&())).await {
        tracing::debug!(device = %describe(device), error = %e, "could not record event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> (String, String) {
        ("ns".to_string(), name.to_string())
    }

    #[test]
    fn a_request_is_recent_for_the_memo_ttl_and_expired_entries_are_swept() {
        let t0 = Instant::now();
        let mut memo = Memo::default();
        memo.requests.insert(key("a"), t0);
        assert!(memo.recent_request(&key("a"), t0));
        assert!(!memo.recent_request(&key("b"), t0));
        memo.requests.insert(key("b"), t0 + MEMO_TTL / 2);
        // Just before the sweep is due: "a" is still recent, both are kept.
        let late = t0 + MEMO_TTL - Duration::from_millis(1);
        assert!(memo.recent_request(&key("a"), late));
        assert_eq!(memo.requests.len(), 2);
        // "a" has expired: it is no longer recent even though no sweep has run since t0.
        assert!(!memo.recent_request(&key("a"), t0 + MEMO_TTL));
        // The sweep at t0 + TTL removed "a" and kept "b".
        assert_eq!(memo.requests.len(), 1);
        assert!(memo.recent_request(&key("b"), t0 + MEMO_TTL));
        assert!(!memo.recent_request(&key("b"), t0 + MEMO_TTL * 2));
    }
}
