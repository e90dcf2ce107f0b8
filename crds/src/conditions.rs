//! Status conditions as the Kubernetes API conventions define them, built by one helper so that
//! `lastTransitionTime` only moves when a condition's status actually changes. That stability is
//! what lets a second reconcile of unchanged input produce an identical status and make no write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Condition types used across the three kinds.
pub mod types {
    /// Summary: the object is doing what its spec asks. `kubectl wait --for=condition=Ready`.
    pub const READY: &str = "Ready";
    /// Something needs a human: misconfiguration, a foreign approval, a halted rollout.
    pub const DEGRADED: &str = "Degraded";
    pub const ENROLLED: &str = "Enrolled";
    pub const COMPLIANT: &str = "Compliant";
    pub const CERTIFICATE_EXPIRING: &str = "CertificateExpiring";
    pub const PROGRESSING: &str = "Progressing";
    /// Something outside the object must happen first (approval, another rollout, a window).
    pub const WAITING: &str = "Waiting";
    /// A DeviceGroup's zone policies are applied.
    pub const ISOLATED: &str = "Isolated";
    /// A DeviceGroup's segmentation audit found nothing.
    pub const AUDIT_CLEAN: &str = "AuditClean";
}

/// A condition about to be written. `reason` is CamelCase, `message` is for humans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: String,
}

impl<'a> Desired<'a> {
    pub fn new(type_: &'a str, status: bool, reason: &'a str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

fn status_str(status: bool) -> &'static str {
    if status { TRUE } else { FALSE }
}

/// Returns the condition to store: the desired one, keeping the previous `lastTransitionTime`
/// when the status did not change (reason or message changes are not transitions).
pub fn build(
    previous: &[Condition],
    desired: Desired<'_>,
    observed_generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = status_str(desired.status);
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == desired.type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    // An empty message would be stored as null by server-side apply on older API servers and
    // then fail validation, so a condition always says something.
    let message = if desired.message.is_empty() {
        desired.reason.to_string()
    } else {
        desired.message
    };
    Condition {
        type_: desired.type_.to_string(),
        status: status.to_string(),
        reason: desired.reason.to_string(),
        message,
        observed_generation,
        last_transition_time,
    }
}

/// Builds a whole condition list in the given order (see [`build`]).
pub fn build_all(
    previous: &[Condition],
    desired: Vec<Desired<'_>>,
    observed_generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|d| build(previous, d, observed_generation, now))
        .collect()
}

/// Finds a condition by type.
pub fn find<'c>(conditions: &'c [Condition], type_: &str) -> Option<&'c Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition exists with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn a_new_condition_transitions_now() {
        let c = build(
            &[],
            Desired::new(types::READY, true, "Enrolled", "ok"),
            Some(3),
            &at(100),
        );
        assert_eq!(c.status, TRUE);
        assert_eq!(c.last_transition_time, at(100));
        assert_eq!(c.observed_generation, Some(3));
    }

    #[test]
    fn unchanged_status_keeps_its_transition_time_even_when_the_message_changes() {
        let first = build(
            &[],
            Desired::new(types::READY, false, "Pending", "waiting"),
            Some(1),
            &at(100),
        );
        let second = build(
            std::slice::from_ref(&first),
            Desired::new(types::READY, false, "CsrDenied", "bad SAN"),
            Some(1),
            &at(200),
        );
        assert_eq!(second.last_transition_time, at(100));
        assert_eq!(second.reason, "CsrDenied");
    }

    #[test]
    fn a_status_flip_is_a_transition() {
        let first = build(
            &[],
            Desired::new(types::READY, false, "Pending", ""),
            None,
            &at(100),
        );
        let second = build(
            &[first],
            Desired::new(types::READY, true, "Enrolled", ""),
            None,
            &at(200),
        );
        assert_eq!(second.last_transition_time, at(200));
        assert!(is_true(&[second], types::READY));
    }

    #[test]
    fn a_condition_always_has_a_message() {
        let c = build(
            &[],
            Desired::new(types::DEGRADED, false, "AsExpected", ""),
            None,
            &at(1),
        );
        assert_eq!(c.message, "AsExpected");
    }

    #[test]
    fn build_all_is_stable_for_identical_input() {
        let desired = || {
            vec![
                Desired::new(types::ENROLLED, true, "Issued", "serial 1"),
                Desired::new(types::READY, true, "Active", "ok"),
            ]
        };
        let once = build_all(&[], desired(), Some(2), &at(10));
        let twice = build_all(&once, desired(), Some(2), &at(99));
        assert_eq!(once, twice);
    }
}
