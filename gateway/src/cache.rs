//! What the gateway knows, fed by watches: every Device and DeviceGroup in scope. Authorising a
//! request reads these and nothing else. Enrollment-only inputs (token Secrets, manufacturer CA
//! ConfigMaps) are read from the API on demand and kept for a short time, so a burst of
//! enrollments costs one read per object, not one per request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crds::{Device, DeviceGroup, UpdateRollout, waves::WavePlan};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};

/// A wave plan, when it was computed, and the rollout resourceVersion it was computed for.
type CachedPlan = (Instant, Option<String>, Arc<WavePlan>);

#[derive(Clone)]
pub struct Caches {
    pub devices: Store<Device>,
    pub groups: Store<DeviceGroup>,
    pub rollouts: Store<UpdateRollout>,
    plans: Arc<Mutex<HashMap<String, CachedPlan>>>,
    secrets: Ttl<Secret>,
    config_maps: Ttl<ConfigMap>,
    client: Client,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope> + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

impl Caches {
    /// Starts the watches (running until `shutdown`) and returns the caches they fill.
    pub fn start(
        client: Client,
        namespace: Option<&str>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let (devices, device_writer) = reflector::store();
        let (groups, group_writer) = reflector::store();
        let (rollouts, rollout_writer) = reflector::store();
        let rollout_stream = watcher(
            api::<UpdateRollout>(&client, namespace),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|r: &mut UpdateRollout| r.managed_fields_mut().clear())
        .reflect(rollout_writer)
        .for_each(|_| futures::future::ready(()));
        let stop_rollouts = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! { _ = rollout_stream => {}, _ = stop_rollouts.cancelled() => {} }
        });
        let device_stream = watcher(
            api::<Device>(&client, namespace),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|d: &mut Device| {
            d.managed_fields_mut().clear();
            d.annotations_mut()
                .remove("kubectl.kubernetes.io/last-applied-configuration");
        })
        .reflect(device_writer)
        .for_each(|_| futures::future::ready(()));
        let group_stream = watcher(
            api::<DeviceGroup>(&client, namespace),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|g: &mut DeviceGroup| g.managed_fields_mut().clear())
        .reflect(group_writer)
        .for_each(|_| futures::future::ready(()));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! { _ = device_stream => {}, _ = stop.cancelled() => {} }
        });
        tokio::spawn(async move {
            tokio::select! { _ = group_stream => {}, _ = shutdown.cancelled() => {} }
        });
        Self {
            devices,
            groups,
            rollouts,
            plans: Arc::default(),
            secrets: Ttl::new(Duration::from_secs(10)),
            config_maps: Ttl::new(Duration::from_secs(10)),
            client,
        }
    }

    /// Waits until both caches hold a full list.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.devices.wait_until_ready().await?;
        self.groups.wait_until_ready().await?;
        self.rollouts.wait_until_ready().await?;
        Ok(())
    }

    pub fn device(&self, namespace: &str, name: &str) -> Option<Arc<Device>> {
        self.devices.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn group(&self, namespace: &str, name: &str) -> Option<Arc<DeviceGroup>> {
        self.groups.get(&ObjectRef::new(name).within(namespace))
    }

    /// Rollouts of the device's namespace that target its group and may make offers.
    pub fn rollouts_for(&self, device: &Device) -> Vec<Arc<UpdateRollout>> {
        use crds::rollout::RolloutPhase;
        self.rollouts
            .state()
            .into_iter()
            .filter(|r| r.metadata.namespace == device.metadata.namespace)
            .filter(|r| r.spec.target.groups.contains(&device.spec.group))
            .filter(|r| {
                matches!(
                    r.status.as_ref().and_then(|s| s.phase),
                    Some(RolloutPhase::Progressing | RolloutPhase::RolledBack)
                )
            })
            .collect()
    }

    /// The wave membership of a rollout over the cached devices, rebuilt when the rollout
    /// changes and at most every `PLAN_TTL` as devices change (the operator counts from the same
    /// function, so both agree once their caches do).
    pub fn plan(&self, rollout: &UpdateRollout) -> Arc<WavePlan> {
        let uid = rollout.metadata.uid.clone().unwrap_or_default();
        let rv = rollout.metadata.resource_version.clone();
        if let Ok(plans) = self.plans.lock()
            && let Some((at, seen_rv, plan)) = plans.get(&uid)
            && *seen_rv == rv
            && at.elapsed() < PLAN_TTL
        {
            return plan.clone();
        }
        let groups: std::collections::HashSet<&str> = rollout
            .spec
            .target
            .groups
            .iter()
            .map(String::as_str)
            .collect();
        let devices = self.devices.state();
        let plan = Arc::new(WavePlan::build(
            rollout,
            devices.iter().map(AsRef::as_ref).filter(|d| {
                d.metadata.namespace == rollout.metadata.namespace
                    && groups.contains(d.spec.group.as_str())
            }),
        ));
        if let Ok(mut plans) = self.plans.lock() {
            plans.retain(|_, (at, _, _)| at.elapsed() < PLAN_TTL * 10);
            plans.insert(uid, (Instant::now(), rv, plan.clone()));
        }
        plan
    }

    pub async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<Secret>>, kube::Error> {
        self.secrets
            .get(namespace, name, || async {
                Api::<Secret>::namespaced(self.client.clone(), namespace)
                    .get_opt(name)
                    .await
            })
            .await
    }

    pub async fn config_map(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<ConfigMap>>, kube::Error> {
        self.config_maps
            .get(namespace, name, || async {
                Api::<ConfigMap>::namespaced(self.client.clone(), namespace)
                    .get_opt(name)
                    .await
            })
            .await
    }
}

/// How stale a cached wave plan may get while devices change.
const PLAN_TTL: Duration = Duration::from_secs(2);

/// Held by the one request fetching a key; the others wait on it.
type Gate = Arc<tokio::sync::Mutex<()>>;

type TtlMap<K> = HashMap<(String, String), (Instant, Option<Arc<K>>)>;

/// Objects read on demand, remembered for `ttl`.
#[derive(Clone)]
struct Ttl<K> {
    ttl: Duration,
    entries: Arc<Mutex<TtlMap<K>>>,
    /// One fetch per key at a time: a burst of enrollments that all miss the cache waits for a
    /// single read instead of each reading the (possibly large) token Secret.
    fetching: Arc<Mutex<HashMap<(String, String), Gate>>>,
}

impl<K> Ttl<K> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::default(),
            fetching: Arc::default(),
        }
    }

    fn fresh(&self, key: &(String, String)) -> Option<Option<Arc<K>>> {
        let entries = self.entries.lock().ok()?;
        let (at, value) = entries.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    async fn get<F, Fut>(
        &self,
        namespace: &str,
        name: &str,
        fetch: F,
    ) -> Result<Option<Arc<K>>, kube::Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<K>, kube::Error>>,
    {
        let key = (namespace.to_string(), name.to_string());
        if let Some(value) = self.fresh(&key) {
            return Ok(value);
        }
        let gate = self
            .fetching
            .lock()
            .map(|mut f| f.entry(key.clone()).or_default().clone())
            .unwrap_or_default();
        let _turn = gate.lock().await;
        // Whoever held the gate before us may have just fetched it.
        if let Some(value) = self.fresh(&key) {
            return Ok(value);
        }
        let value = fetch().await?.map(Arc::new);
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            entries.insert(key, (Instant::now(), value.clone()));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_misses_fetches_once() {
        let ttl: Ttl<String> = Ttl::new(Duration::from_secs(10));
        let fetches = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (ttl, fetches) = (ttl.clone(), fetches.clone());
                tokio::spawn(async move {
                    ttl.get("ns", "tokens", || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Some("secret".to_string()))
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            let got = t.await.unwrap().unwrap();
            assert_eq!(got.as_deref().map(String::as_str), Some("secret"));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Another key is fetched on its own.
        let other = ttl.get("ns", "other", || async { Ok(None) }).await.unwrap();
        assert!(other.is_none());
    }
}
