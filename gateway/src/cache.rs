//! What the gateway knows, fed by watches: every Device and DeviceGroup in scope. Authorising a
//! request reads these and nothing else. Enrollment-only inputs (token Secrets, manufacturer CA
//! ConfigMaps) are read from the API on demand and kept for a short time, so a burst of
//! enrollments costs one read per object, not one per request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crds::{Device, DeviceGroup};
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

#[derive(Clone)]
pub struct Caches {
    pub devices: Store<Device>,
    pub groups: Store<DeviceGroup>,
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
            secrets: Ttl::new(Duration::from_secs(10)),
            config_maps: Ttl::new(Duration::from_secs(10)),
            client,
        }
    }

    /// Waits until both caches hold a full list.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.devices.wait_until_ready().await?;
        self.groups.wait_until_ready().await?;
        Ok(())
    }

    pub fn device(&self, namespace: &str, name: &str) -> Option<Arc<Device>> {
        self.devices.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn group(&self, namespace: &str, name: &str) -> Option<Arc<DeviceGroup>> {
        self.groups.get(&ObjectRef::new(name).within(namespace))
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

type TtlMap<K> = HashMap<(String, String), (Instant, Option<Arc<K>>)>;

/// Objects read on demand, remembered for `ttl`.
#[derive(Clone)]
struct Ttl<K> {
    ttl: Duration,
    entries: Arc<Mutex<TtlMap<K>>>,
}

impl<K> Ttl<K> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::default(),
        }
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
        if let Ok(entries) = self.entries.lock()
            && let Some((at, value)) = entries.get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(value.clone());
        }
        let value = fetch().await?.map(Arc::new);
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            entries.insert(key, (Instant::now(), value.clone()));
        }
        Ok(value)
    }
}
