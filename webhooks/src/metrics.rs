//! Webhook metrics (`fleetwarden_webhooks_*`): reviews by webhook, kind and verdict, how long
//! they took, and requests refused before a review could be read (oversized or malformed bodies,
//! TLS failures).

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub webhook: &'static str,
    pub kind: &'static str,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub webhook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub reviews: Family<ReviewLabels, Counter>,
    pub latency: Family<WebhookLabels, Histogram>,
    pub refused: Family<ReasonLabels, Counter>,
    pub certificate_reloads: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fleetwarden_webhooks");
        let reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "admission_reviews",
            "AdmissionReviews answered, by webhook, kind and verdict",
            reviews.clone(),
        );
        let latency = Family::<WebhookLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5])
        });
        registry.register(
            "admission_duration_seconds",
            "Time to answer an AdmissionReview",
            latency.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "requests_refused",
            "Requests refused before a review was read, by reason",
            refused.clone(),
        );
        let certificate_reloads = Counter::default();
        registry.register(
            "certificate_reloads",
            "Times the serving certificate was reloaded from disk",
            certificate_reloads.clone(),
        );
        Self {
            registry,
            reviews,
            latency,
            refused,
            certificate_reloads,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
