//! Prometheus metrics of the operator process, served on `/metrics` in the OpenMetrics text
//! format. Controllers record into the shared reconcile families, labelled by controller.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileErrorLabels {
    pub controller: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub resource: &'static str,
    pub verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnrollmentLabels {
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// `issued` (the device's first certificate) or `rotated` (a renewal or re-enrollment).
    pub change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    pub leader_transitions: Counter,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub reconcile_errors: Family<ReconcileErrorLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    /// Every write request the operator sends to the API server.
    pub api_writes: Family<WriteLabels, Counter>,
    pub enrollments: Family<EnrollmentLabels, Counter>,
    /// New certificates written to Device status (the device is Enrolled with it from then on).
    pub identities: Family<IdentityLabels, Counter>,
    /// Devices whose certificate is inside its renewal window.
    pub certificates_expiring: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetwarden_operator");
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build);

        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let leader_transitions = Counter::default();
        registry.register(
            "leader_transitions",
            "Times this replica gained or lost leadership",
            leader_transitions.clone(),
        );
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciliations run, by controller",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ReconcileErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by controller and error kind",
            reconcile_errors.clone(),
        );
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
            });
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            reconcile_duration.clone(),
        );
        let api_writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "api_writes",
            "Write requests sent to the Kubernetes API, by resource and verb",
            api_writes.clone(),
        );
        let enrollments = Family::<EnrollmentLabels, Counter>::default();
        registry.register(
            "enrollments",
            "Enrollment CSRs approved or denied, by policy reason",
            enrollments.clone(),
        );
        let identities = Family::<IdentityLabels, Counter>::default();
        registry.register(
            "identities_written",
            "New device certificates written to Device status, first (issued) or rotated",
            identities.clone(),
        );
        let certificates_expiring = Gauge::default();
        registry.register(
            "certificates_expiring",
            "Devices whose certificate is inside its renewal window",
            certificates_expiring.clone(),
        );
        Self {
            registry,
            api_writes,
            enrollments,
            identities,
            certificates_expiring,
            leader,
            leader_transitions,
            reconciles,
            reconcile_errors,
            reconcile_duration,
        }
    }

    /// Records one finished reconciliation.
    pub fn observe_reconcile(
        &self,
        controller: &'static str,
        took: Duration,
        error: Option<&'static str>,
    ) {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        self.reconcile_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(error) = error {
            self.reconcile_errors
                .get_or_create(&ReconcileErrorLabels { controller, error })
                .inc();
        }
    }

    /// Counts one write request to the API server.
    pub fn write(&self, resource: &'static str, verb: &'static str) {
        self.api_writes
            .get_or_create(&WriteLabels { resource, verb })
            .inc();
    }

    /// Counts an enrollment verdict.
    pub fn enrollment(&self, approved: bool, reason: &'static str) {
        let result = if approved { "approved" } else { "denied" };
        self.enrollments
            .get_or_create(&EnrollmentLabels { result, reason })
            .inc();
    }

    /// Counts a new certificate written to a Device's status.
    pub fn identity_written(&self, rotated: bool) {
        let change = if rotated { "rotated" } else { "issued" };
        self.identities
            .get_or_create(&IdentityLabels { change })
            .inc();
    }

    /// Registers further metrics (a controller's own) under the same prefix.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_outcomes_are_exposed_by_controller_and_error() {
        let m = Metrics::new();
        m.observe_reconcile("device", Duration::from_millis(3), None);
        m.observe_reconcile("device", Duration::from_millis(4), Some("kube_api"));
        let text = m.encode();
        assert!(text.contains("fleetwarden_operator_reconciles_total{controller=\"device\"} 2"));
        assert!(text.contains(
            "fleetwarden_operator_reconcile_errors_total{controller=\"device\",error=\"kube_api\"} 1"
        ));
        assert!(text.contains("fleetwarden_operator_build_info{version="));
        assert!(text.ends_with("# EOF\n"));
    }
}
