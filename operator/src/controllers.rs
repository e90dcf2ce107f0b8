//! The controllers this operator runs while it leads. Each one lives in its own module, owns a
//! small `Context`, and is started here through `runner::task`.

use std::sync::Arc;

use kube::{Api, Client, Resource, ResourceExt, runtime::events::Reporter};
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

/// What the rollout and group controllers keep of a cached Device: no managedFields, CSR or
/// certificate PEM (their decisions never read them; a fleet's worth would dominate memory).
pub fn slim_device(d: &mut crds::Device) {
    d.managed_fields_mut().clear();
    if let Some(s) = d.status.as_mut() {
        s.enrollment = None;
        if let Some(i) = s.identity.as_mut() {
            i.certificate.clear();
            i.ca = None;
        }
    }
}

/// Starts every controller; they stop when `shutdown` is cancelled.
pub fn all(shared: &Shared, shutdown: &CancellationToken) -> Vec<ControllerTask> {
    vec![
        device::start(shared, shutdown),
        rollout::start(shared, shutdown),
        group::start(shared, shutdown),
    ]
}
