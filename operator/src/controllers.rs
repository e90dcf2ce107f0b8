//! The controllers this operator runs while it leads. Each one lives in its own module, owns a
//! small `Context`, and is started here through `runner::task`.

use std::sync::Arc;

use crds::Device;
use futures::{Stream, StreamExt, channel::mpsc};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        events::Reporter,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{device, group, metrics::Metrics, rollout, runner::ControllerTask};

/// What every controller may use.
#[derive(Clone)]
pub struct Shared {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// Watch only this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// This replica's identity, reported on Events.
    pub identity: String,
}

impl Shared {
    /// An API handle scoped to the watched namespace(s).
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + DeserializeOwned,
        K::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    pub fn reporter(&self, controller: &str) -> Reporter {
        Reporter {
            controller: format!("fleetwarden-operator/{controller}"),
            instance: Some(self.identity.clone()),
        }
    }
}

/// One watch of Devices for the whole operator. The device, rollout and group controllers all
/// react to Device changes; with a watch each, every Device write was sent, decoded and cached
/// three times. They share this one cache (kept without managedFields) and each subscribe to
/// its changes.
pub struct DeviceFeed {
    store: Store<Device>,
    writer: Writer<Device>,
    /// Deletions, which the shared store's subscriptions do not carry (a subscriber is handed
    /// objects looked up in the store, and a deleted one is gone from it).
    deleted: Vec<mpsc::UnboundedSender<Arc<Device>>>,
}

/// How many changes a slow subscriber may lag behind before the watch waits for it.
const FEED_BUFFER: usize = 4096;

impl DeviceFeed {
    pub fn new() -> Self {
        let (store, writer) = reflector::store_shared(FEED_BUFFER);
        Self {
            store,
            writer,
            deleted: Vec::new(),
        }
    }

    /// The shared cache.
    pub fn store(&self) -> Store<Device> {
        self.store.clone()
    }

    /// Every Device that is created, changes or is deleted from now on (and each cached one
    /// once when the watch has listed them).
    pub fn subscribe(&mut self) -> impl Stream<Item = Arc<Device>> + Send + 'static {
        let (tx, rx) = mpsc::unbounded();
        self.deleted.push(tx);
        let changes = self
            .writer
            .subscribe()
            .expect("a shared store always has a dispatcher");
        futures::stream::select(changes, rx)
    }

    /// Drives the watch until `shutdown` is cancelled.
    pub fn run(self, api: Api<Device>, shutdown: &CancellationToken) -> ControllerTask {
        let shutdown = shutdown.clone();
        let deleted = self.deleted;
        let feed = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|d: &mut Device| d.managed_fields_mut().clear())
            .inspect(move |event| {
                if let Ok(watcher::Event::Delete(d)) = event {
                    let d = Arc::new(d.clone());
                    for tx in &deleted {
                        let _ = tx.unbounded_send(d.clone());
                    }
                }
            })
            .reflect_shared(self.writer)
            .for_each(|_| futures::future::ready(()));
        Box::pin(async move {
            tokio::select! {
                () = feed => tracing::error!("the Device watch ended"),
                () = shutdown.cancelled() => {}
            }
        })
    }
}

impl Default for DeviceFeed {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts every controller; they stop when `shutdown` is cancelled.
pub fn all(shared: &Shared, shutdown: &CancellationToken) -> Vec<ControllerTask> {
    let mut devices = DeviceFeed::new();
    let tasks = vec![
        device::start(shared, &mut devices, shutdown),
        rollout::start(shared, &mut devices, shutdown),
        group::start(shared, &mut devices, shutdown),
    ];
    let feed = devices.run(shared.api(), shutdown);
    tasks.into_iter().chain([feed]).collect()
}
