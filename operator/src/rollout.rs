//! UpdateRollout controller. Owns the rollout's `status` (phase, current wave, per-wave and total
//! counts, conditions) and its Events. Reads the Devices and DeviceGroups of the target groups
//! from watch caches; the decision is `rollout_plan::plan`. Offers themselves are made by the
//! gateway from the same derived wave membership.
//!
//! Counts change whenever devices report, so count-only status updates are written at most every
//! `COUNT_WRITE_INTERVAL`; phase and wave changes are written at once.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crds::{Device, DeviceGroup, UpdateRollout, conditions};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    FIELD_MANAGER,
    controllers::{DeviceFeed, Shared},
    rollout_plan::{self, Inputs},
    runner::{self, ControllerTask, ReconcileError},
};

pub const CONTROLLER: &str = "rollout";
/// Count-only status updates are written at most this often per rollout.
pub const COUNT_WRITE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one reconcile waits for the device and group caches to fill at start-up.
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(5);
/// A rollout waiting for another one looks again this often.
const BLOCKED_RECHECK: Duration = Duration::from_secs(10);

pub struct Context {
    client: Client,
    devices: Store<Device>,
    groups: Store<DeviceGroup>,
    rollouts: Store<UpdateRollout>,
    recorder: Recorder,
    shared: Shared,
    last_write: Mutex<HashMap<String, Instant>>,
    /// Our last status write per rollout uid, with the resourceVersion it was computed from. It
    /// stands in for the cached status until the watch shows a newer version, so a reconcile
    /// that runs before our write is observed neither restarts a wave nor repeats its events.
    written: Mutex<HashMap<String, (Option<String>, crds::UpdateRolloutStatus)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{object}: {action} failed: {source}")]
    Kube {
        object: String,
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("{0}: the object has no namespace")]
    NoNamespace(String),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube_api",
            Error::NoNamespace(_) => "invalid_object",
        }
    }
}

/// Rollouts in `namespace` that target `group`.
fn rollouts_of(
    store: &Store<UpdateRollout>,
    namespace: Option<String>,
    group: &str,
) -> Vec<ObjectRef<UpdateRollout>> {
    store
        .state()
        .into_iter()
        .filter(|r| r.namespace() == namespace && r.spec.target.groups.iter().any(|g| g == group))
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

pub fn start(
    shared: &Shared,
    feed: &mut DeviceFeed,
    shutdown: &CancellationToken,
) -> ControllerTask {
    let client = shared.client.clone();
    let devices = feed.store();
    let device_events = feed.subscribe();
    let (groups, group_writer) = reflector::store();
    let group_events = watcher(shared.api::<DeviceGroup>(), watcher::Config::default())
        .default_backoff()
        .modify(|g: &mut DeviceGroup| g.managed_fields_mut().clear())
        .reflect(group_writer)
        .touched_objects();
    let controller = Controller::new(shared.api::<UpdateRollout>(), watcher::Config::default());
    let rollouts = controller.store();
    let (by_device, by_group) = (rollouts.clone(), rollouts.clone());
    let controller = controller
        .watches_shared_stream(device_events, move |d: Arc<Device>| {
            rollouts_of(&by_device, d.namespace(), &d.spec.group)
        })
        .watches_stream(group_events, move |g: DeviceGroup| {
            rollouts_of(&by_group, g.namespace(), &g.name_any())
        });
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), shared.reporter(CONTROLLER)),
        client,
        devices,
        groups,
        rollouts,
        shared: shared.clone(),
        last_write: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
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

fn created(r: &UpdateRollout) -> (Option<Timestamp>, String) {
    (
        r.metadata.creation_timestamp.as_ref().map(|t| t.0),
        r.name_any(),
    )
}

async fn reconcile(rollout: Arc<UpdateRollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let object = runner::describe(rollout.as_ref());
    // Counting over a half-filled cache would undercount, and an empty one would make every
    // wave look complete: decide nothing until both caches have listed everything once.
    let synced = tokio::time::timeout(CACHE_SYNC_WAIT, async {
        ctx.devices.wait_until_ready().await.is_ok() && ctx.groups.wait_until_ready().await.is_ok()
    })
    .await;
    if synced != Ok(true) {
        tracing::debug!(rollout = %object, "device and group caches not synced yet");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let uid = rollout.uid().unwrap_or_default();
    let memo = ctx.written.lock().ok().and_then(|m| m.get(&uid).cloned());
    let rollout = match memo {
        Some((rv, status)) if rv == rollout.resource_version() => {
            let mut fresher = rollout.as_ref().clone();
            fresher.status = Some(status);
            Arc::new(fresher)
        }
        _ => rollout,
    };
    let ns = rollout
        .namespace()
        .ok_or_else(|| Error::NoNamespace(object.clone()))?;
    let targets: HashSet<&str> = rollout
        .spec
        .target
        .groups
        .iter()
        .map(String::as_str)
        .collect();
    let devices: Vec<Arc<Device>> = ctx
        .devices
        .state()
        .into_iter()
        .filter(|d| {
            d.namespace().as_deref() == Some(ns.as_str()) && targets.contains(d.spec.group.as_str())
        })
        .collect();
    let groups: Vec<Arc<DeviceGroup>> = targets
        .iter()
        .filter_map(|g| ctx.groups.get(&ObjectRef::new(g).within(&ns)))
        .collect();
    // One active rollout per group. A rollout that is already active keeps its groups; among
    // the others, the earliest created goes first.
    let is_active = rollout_plan::active(&rollout);
    let blocked_by = ctx
        .rollouts
        .state()
        .into_iter()
        .filter(|o| o.namespace().as_deref() == Some(ns.as_str()) && o.uid() != rollout.uid())
        .filter(|o| {
            o.spec
                .target
                .groups
                .iter()
                .any(|g| targets.contains(g.as_str()))
        })
        .filter(|o| !rollout_plan::terminal(o.status.as_ref().and_then(|s| s.phase)))
        .filter(|o| {
            let earlier = created(o) < created(&rollout);
            if is_active {
                rollout_plan::active(o) && earlier
            } else {
                rollout_plan::active(o) || earlier
            }
        })
        .map(|o| o.name_any())
        .next();
    let plan = rollout_plan::plan(&Inputs {
        rollout: &rollout,
        devices: devices.iter().map(AsRef::as_ref).collect(),
        groups: groups.iter().map(AsRef::as_ref).collect(),
        blocked_by: blocked_by.clone(),
        now: Timestamp::now(),
    });

    let current = rollout.status.clone().unwrap_or_default();
    let now = Time(Timestamp::now());
    let conditions = conditions::build_all(
        &current.conditions,
        plan.conditions.clone(),
        rollout.metadata.generation,
        &now,
    );
    let mut desired = plan.status.clone();
    desired.conditions = conditions;
    let mut action = match plan.requeue_after {
        Some(after) => Action::requeue(after),
        None if blocked_by.is_some() => Action::requeue(BLOCKED_RECHECK),
        None => Action::await_change(),
    };
    if desired != current {
        let shape_changed = current.phase != desired.phase
            || current.current_wave != desired.current_wave
            || current.observed_generation != desired.observed_generation
            || current
                .waves
                .iter()
                .map(|w| (&w.started_at, &w.completed_at))
                .ne(desired
                    .waves
                    .iter()
                    .map(|w| (&w.started_at, &w.completed_at)))
            || current
                .conditions
                .iter()
                .map(|c| (&c.type_, &c.status, &c.reason))
                .ne(desired
                    .conditions
                    .iter()
                    .map(|c| (&c.type_, &c.status, &c.reason)));
        let since_last = ctx
            .last_write
            .lock()
            .ok()
            .and_then(|m| m.get(&uid).map(Instant::elapsed));
        match since_last {
            Some(elapsed) if !shape_changed && elapsed < COUNT_WRITE_INTERVAL => {
                action = Action::requeue(COUNT_WRITE_INTERVAL - elapsed);
            }
            _ => {
                write_status(&rollout, &ctx, &desired).await?;
                if let Ok(mut m) = ctx.last_write.lock() {
                    m.insert(uid.clone(), Instant::now());
                }
                if let Ok(mut m) = ctx.written.lock() {
                    m.insert(uid, (rollout.resource_version(), desired.clone()));
                }
                for event in &plan.events {
                    publish(&ctx, &rollout, event).await;
                }
            }
        }
    }
    Ok(action)
}

async fn write_status(
    rollout: &UpdateRollout,
    ctx: &Context,
    status: &crds::UpdateRolloutStatus,
) -> Result<(), Error> {
    let api: Api<UpdateRollout> =
        Api::namespaced(ctx.client.clone(), &rollout.namespace().unwrap_or_default());
    let mut body = BTreeMap::new();
    body.insert("apiVersion", json!("fleetwarden.io/v1alpha1"));
    body.insert("kind", json!("UpdateRollout"));
    body.insert("status", json!(status));
    ctx.shared.metrics.write("updaterollouts/status", "apply");
    api.patch_status(
        &rollout.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|source| Error::Kube {
        object: runner::describe(rollout),
        action: "writing status",
        source,
    })?;
    Ok(())
}

/// Records one planned event. The recorder folds events with the same reason and action into
/// one series, so the action names the wave: each wave's start and completion stays visible.
async fn publish(ctx: &Context, rollout: &UpdateRollout, planned: &rollout_plan::PlannedEvent) {
    let event = Event {
        type_: if planned.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: planned.reason.to_string(),
        note: Some(planned.note.chars().take(1024).collect()),
        action: planned
            .wave
            .map_or_else(|| "Rollout".to_string(), |w| format!("Wave{w}")),
        secondary: None,
    };
    ctx.shared.metrics.write("events", "create");
    if let Err(e) = ctx.recorder.publish(&event, &rollout.object_ref(&())).await {
        tracing::debug!(rollout = %runner::describe(rollout), error = %e, "could not record event");
    }
}
