//! Whether a device meets its DeviceGroup's policy, from what Fleetwarden knows about it: its
//! certificate, what it last reported, and when it was last seen. The operator writes the result
//! as the `Compliant` condition (every failure listed); the gateway and the segmentation
//! controller act on it.

use std::cmp::Ordering;

use jiff::{SignedDuration, Timestamp};

use crate::{device::DeviceStatus, group::DeviceGroupSpec};

/// Failures that only say the device had not enrolled or checked in yet when it was judged.
pub const NOT_YET_REPORTED: &[&str] = &["NotEnrolled", "NeverSeen"];

/// Whether a `Compliant` condition message (every failure, `Reason: message; ...`) is a verdict
/// from before the device enrolled and checked in: such a verdict says nothing about the device
/// yet, and is replaced once the operator judges its first report.
pub fn judged_before_report(message: &str) -> bool {
    NOT_YET_REPORTED
        .iter()
        .any(|r| message.contains(&format!("{r}:")))
}

/// One failed check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// CamelCase reason, e.g. `Offline`.
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub failures: Vec<Failure>,
    /// When the result would change with time alone (a device going offline, a certificate
    /// entering overdue renewal or expiring), so the caller can look again then.
    pub next_change: Option<Timestamp>,
}

impl Evaluation {
    pub fn compliant(&self) -> bool {
        self.failures.is_empty()
    }

    /// Reason for a condition: the first failure's, or `Compliant`.
    pub fn reason(&self) -> &'static str {
        self.failures.first().map_or("Compliant", |f| f.reason)
    }

    /// Every failure, `Reason: message; Reason: message`.
    pub fn message(&self) -> String {
        if self.failures.is_empty() {
            return "all compliance checks pass".to_string();
        }
        self.failures
            .iter()
            .map(|f| format!("{}: {}", f.reason, f.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Evaluates every check of the group's compliance policy against a device's status.
pub fn evaluate(status: &DeviceStatus, group: &DeviceGroupSpec, now: Timestamp) -> Evaluation {
    let reported = status.reported.clone().unwrap_or_default();
    let policy = &group.compliance;
    let mut failures = Vec::new();
    let mut next_change: Option<Timestamp> = None;
    let mut at = |t: Timestamp| {
        if t > now {
            next_change = Some(next_change.map_or(t, |n| n.min(t)));
        }
    };

    // Certificate: present, not expired, and renewed before half its renewal window is gone.
    match &status.identity {
        None => failures.push(Failure {
            reason: "NotEnrolled",
            message: "the device has no certificate".into(),
        }),
        Some(id) => {
            let not_after = id.not_after.0;
            let half_window = signed(group.certificates.renew_before.get()) / 2;
            let overdue_at = not_after.checked_sub(half_window).unwrap_or(not_after);
            if now >= not_after {
                failures.push(Failure {
                    reason: "CertificateExpired",
                    message: format!("certificate expired at {not_after}"),
                });
            } else if now >= overdue_at {
                failures.push(Failure {
                    reason: "CertificateRenewalOverdue",
                    message: format!("certificate expires at {not_after} and has not been renewed"),
                });
                at(not_after);
            } else {
                at(overdue_at);
            }
        }
    }

    if let Some(minimum) = &group.firmware.minimum_version {
        match reported.firmware_version.as_deref() {
            None => failures.push(Failure {
                reason: "FirmwareUnknown",
                message: format!(
                    "no firmware version reported; the group requires {minimum} or later"
                ),
            }),
            Some(v) if compare_versions(v, minimum) == Ordering::Less => failures.push(Failure {
                reason: "FirmwareTooOld",
                message: format!("firmware {v} is below the group minimum {minimum}"),
            }),
            Some(_) => {}
        }
    }
    if let Some(minimum) = group.firmware.minimum_security_version {
        match reported.security_version {
            None => failures.push(Failure {
                reason: "SecurityVersionUnknown",
                message: format!(
                    "no security version reported; the group requires {minimum} or higher"
                ),
            }),
            Some(v) if v < minimum => failures.push(Failure {
                reason: "SecurityVersionTooLow",
                message: format!("security version {v} is below the group minimum {minimum}"),
            }),
            Some(_) => {}
        }
    }

    let max_offline = signed(policy.max_offline.get());
    match status.last_seen.as_ref().map(|t| t.0) {
        None => failures.push(Failure {
            reason: "NeverSeen",
            message: "the device has never checked in".into(),
        }),
        Some(seen) => {
            let offline_at = seen.checked_add(max_offline).unwrap_or(seen);
            if now >= offline_at {
                failures.push(Failure {
                    reason: "Offline",
                    message: format!(
                        "last seen at {seen}, longer ago than maxOffline {}",
                        policy.max_offline
                    ),
                });
            } else {
                at(offline_at);
            }
        }
    }

    if !policy.allowed_locations.is_empty() {
        match reported.location.as_deref() {
            None => failures.push(Failure {
                reason: "LocationUnknown",
                message: "the device reports no location; the group restricts locations".into(),
            }),
            Some(l) if !policy.allowed_locations.iter().any(|a| a == l) => failures.push(Failure {
                reason: "LocationNotAllowed",
                message: format!("location {l:?} is not among the group's allowed locations"),
            }),
            Some(_) => {}
        }
    }

    if policy.require_measured_boot {
        match reported.boot_measurement_sha256.as_deref() {
            None => failures.push(Failure {
                reason: "BootMeasurementMissing",
                message: "the group requires a measured-boot digest and the device reports none"
                    .into(),
            }),
            Some(d)
                if !policy
                    .allowed_boot_measurements
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(d)) =>
            {
                failures.push(Failure {
                    reason: "BootMeasurementNotAllowed",
                    message: format!("measured-boot digest {d} is not in the group's allowed set"),
                })
            }
            Some(_) => {}
        }
    }

    Evaluation {
        failures,
        next_change,
    }
}

fn signed(d: std::time::Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// Orders firmware versions: dot- or dash-separated parts, numeric parts compared as numbers,
/// others as text, a missing part counting as 0 and a number sorting above text, so
/// `4.10.0` > `4.9.2` and `4.2.0` > `4.2.0-rc1`.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<String> {
        s.trim_start_matches(['v', 'V'])
            .split(['.', '-', '+', '_'])
            .map(str::to_string)
            .collect()
    };
    let (pa, pb) = (parts(a), parts(b));
    for i in 0..pa.len().max(pb.len()) {
        let x = pa.get(i).map(String::as_str).unwrap_or("0");
        let y = pb.get(i).map(String::as_str).unwrap_or("0");
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            (Ok(_), Err(_)) => Ordering::Greater,
            (Err(_), Ok(_)) => Ordering::Less,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{IdentityStatus, ReportedState};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn group(policy: serde_json::Value) -> DeviceGroupSpec {
        let mut spec = serde_json::json!({"certificates": {"issuerRef": {"name": "ca"}, "renewBefore": "240h"}});
        spec.as_object_mut()
            .unwrap()
            .extend(policy.as_object().unwrap().clone());
        serde_json::from_value(spec).unwrap()
    }

    fn healthy() -> DeviceStatus {
        DeviceStatus {
            identity: Some(IdentityStatus {
                spiffe_id: "spiffe://x/ns/y/device/plc-1".into(),
                certificate: String::new(),
                ca: None,
                serial_number: "01".into(),
                fingerprint_sha256: "ab".repeat(32),
                not_before: Time(now() - SignedDuration::from_hours(24)),
                not_after: Time(now() + SignedDuration::from_hours(60 * 24)),
                source: None,
            }),
            reported: Some(ReportedState {
                firmware_version: Some("4.2.0".into()),
                security_version: Some(12),
                location: Some("berlin/hall-2".into()),
                boot_measurement_sha256: Some("aa".repeat(32)),
                ..ReportedState::default()
            }),
            last_seen: Some(Time(now() - SignedDuration::from_mins(3))),
            ..DeviceStatus::default()
        }
    }

    fn strict() -> DeviceGroupSpec {
        group(serde_json::json!({
            "firmware": {"minimumVersion": "4.1.0", "minimumSecurityVersion": 11},
            "compliance": {"maxOffline": "1h", "allowedLocations": ["berlin/hall-2"],
                "requireMeasuredBoot": true, "allowedBootMeasurements": ["aa".repeat(32)]}
        }))
    }

    fn reasons(e: &Evaluation) -> Vec<&'static str> {
        e.failures.iter().map(|f| f.reason).collect()
    }

    #[test]
    fn a_healthy_device_is_compliant_until_it_would_go_offline() {
        let e = evaluate(&healthy(), &strict(), now());
        assert!(e.compliant(), "{:?}", e.failures);
        assert_eq!(e.reason(), "Compliant");
        assert_eq!(
            e.next_change,
            Some(now() - SignedDuration::from_mins(3) + SignedDuration::from_hours(1))
        );
    }

    #[test]
    fn every_failing_check_is_listed() {
        let mut d = healthy();
        let s = &mut d;
        s.reported = Some(ReportedState {
            firmware_version: Some("4.0.9".into()),
            security_version: Some(10),
            location: Some("lisbon".into()),
            boot_measurement_sha256: Some("bb".repeat(32)),
            ..ReportedState::default()
        });
        s.last_seen = Some(Time(now() - SignedDuration::from_hours(2)));
        let e = evaluate(&d, &strict(), now());
        assert_eq!(
            reasons(&e),
            [
                "FirmwareTooOld",
                "SecurityVersionTooLow",
                "Offline",
                "LocationNotAllowed",
                "BootMeasurementNotAllowed"
            ]
        );
        let message = e.message();
        for r in reasons(&e) {
            assert!(message.contains(r), "{message}");
        }
    }

    #[test]
    fn missing_reports_fail_the_checks_that_need_them() {
        let mut d = healthy();
        let s = &mut d;
        s.reported = None;
        s.last_seen = None;
        s.identity = None;
        let e = evaluate(&d, &strict(), now());
        assert_eq!(
            reasons(&e),
            [
                "NotEnrolled",
                "FirmwareUnknown",
                "SecurityVersionUnknown",
                "NeverSeen",
                "LocationUnknown",
                "BootMeasurementMissing"
            ]
        );
    }

    #[test]
    fn a_certificate_fails_only_when_renewal_is_overdue_or_it_expired() {
        // Offline checks must not interfere while time moves on by days.
        let g = group(serde_json::json!({"compliance": {"maxOffline": "1000h"}}));
        let mut d = healthy();
        let not_after = now() + SignedDuration::from_hours(7 * 24);
        d.identity.as_mut().unwrap().not_after = Time(not_after);
        // 7 days left of a 10-day window: renewing is due but not overdue.
        assert!(evaluate(&d, &g, now()).compliant());
        // 4 days left: more than half the window gone.
        let later = not_after - SignedDuration::from_hours(4 * 24);
        assert_eq!(
            reasons(&evaluate(&d, &g, later)),
            ["CertificateRenewalOverdue"]
        );
        assert_eq!(
            reasons(&evaluate(&d, &g, not_after)),
            ["CertificateExpired"]
        );
    }

    #[test]
    fn a_lenient_group_checks_only_certificate_and_presence() {
        let e = evaluate(&healthy(), &group(serde_json::json!({})), now());
        assert!(e.compliant());
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("4.10.0", "4.9.2"), Ordering::Greater);
        assert_eq!(compare_versions("4.2", "4.2.0"), Ordering::Equal);
        assert_eq!(compare_versions("v4.2.1", "4.2.0"), Ordering::Greater);
        assert_eq!(compare_versions("4.2.0", "4.2.0-rc1"), Ordering::Greater);
        assert_eq!(compare_versions("1.0.0", "1.0.0"), Ordering::Equal);
    }
}
