//! What the DeviceGroup controller decides, without I/O: the inventory figures, which devices
//! are isolated and which isolations or releases an update brings, and the group's conditions.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use crds::{
    Device, DeviceGroup, UpdateRollout,
    common::NamedCount,
    compliance::compare_versions,
    conditions::{Desired, types},
    device::{DevicePhase, Lifecycle},
    group::{AuditFinding, Inventory},
    rollout::RolloutPhase,
    segmentation::{self, IsolationReason},
};
use jiff::{SignedDuration, Timestamp};

/// Firmware versions listed by name in the inventory; the rest are summed as `other`.
pub const TOP_FIRMWARE_VERSIONS: usize = 10;

/// The inventory, and when it would change with time alone (a device going offline or a
/// certificate entering its renewal window).
pub fn inventory(
    group: &DeviceGroup,
    devices: &[&Device],
    newest_succeeded: Option<&UpdateRollout>,
    now: Timestamp,
) -> (Inventory, Option<Timestamp>) {
    let spec = &group.spec;
    let max_offline = signed(spec.compliance.max_offline.get());
    let renew_before = signed(spec.certificates.renew_before.get());
    let mut inv = Inventory {
        total: count(devices.len()),
        ..Inventory::default()
    };
    let mut phases: BTreeMap<String, u32> = BTreeMap::new();
    let mut versions: HashMap<String, u32> = HashMap::new();
    let mut next: Option<Timestamp> = None;
    let mut at = |t: Timestamp| {
        if t > now {
            next = Some(next.map_or(t, |n: Timestamp| n.min(t)));
        }
    };
    for device in devices {
        let status = device.status.as_ref();
        let phase = status.and_then(|s| s.phase).unwrap_or(DevicePhase::Pending);
        *phases.entry(format!("{phase:?}")).or_default() += 1;
        let identity = status.and_then(|s| s.identity.as_ref());
        if identity.is_some() {
            inv.enrolled += 1;
        }
        if status.is_some_and(|s| crds::conditions::is_true(&s.conditions, types::COMPLIANT)) {
            inv.compliant += 1;
        }
        match segmentation::isolation(device, spec) {
            Some(IsolationReason::Quarantined | IsolationReason::NonCompliant) => {
                inv.quarantined += 1
            }
            Some(IsolationReason::Retired) => inv.retired += 1,
            _ => {}
        }
        if let Some(seen) = status.and_then(|s| s.last_seen.as_ref()) {
            let offline_at = seen.0.checked_add(max_offline).unwrap_or(seen.0);
            if now < offline_at {
                inv.online += 1;
                at(offline_at);
            }
        }
        if let Some(id) = identity {
            let window = id
                .not_after
                .0
                .checked_sub(renew_before)
                .unwrap_or(id.not_after.0);
            if now >= window {
                inv.certificates_expiring += 1;
            } else {
                at(window);
            }
        }
        let reported = status
            .and_then(|s| s.reported.as_ref())
            .and_then(|r| r.firmware_version.clone());
        if device.spec.lifecycle != Lifecycle::Retired
            && out_of_date(device, reported.as_deref(), group, newest_succeeded)
        {
            inv.out_of_date += 1;
        }
        *versions
            .entry(reported.unwrap_or_else(|| "unknown".into()))
            .or_default() += 1;
    }
    inv.by_phase = phases
        .into_iter()
        .map(|(name, count)| NamedCount { name, count })
        .collect();
    inv.firmware_versions = histogram(versions);
    (inv, next)
}

/// Below the group minimum, or behind the newest succeeded rollout the device is compatible
/// with. A device that never reported a version is out of date whenever there is a reference.
fn out_of_date(
    device: &Device,
    version: Option<&str>,
    group: &DeviceGroup,
    newest_succeeded: Option<&UpdateRollout>,
) -> bool {
    let below =
        |target: &str| version.is_none_or(|v| compare_versions(v, target) == Ordering::Less);
    if group
        .spec
        .firmware
        .minimum_version
        .as_deref()
        .is_some_and(below)
    {
        return true;
    }
    newest_succeeded.is_some_and(|r| {
        r.spec
            .firmware
            .hardware_models
            .contains(&device.spec.hardware_model)
            && below(&r.spec.firmware.version)
    })
}

/// Most common versions first (ties by version, newest first), the rest as `other`.
fn histogram(versions: HashMap<String, u32>) -> Vec<NamedCount> {
    let mut all: Vec<(String, u32)> = versions.into_iter().collect();
    all.sort_by(|(va, ca), (vb, cb)| cb.cmp(ca).then_with(|| compare_versions(vb, va)));
    let mut out: Vec<NamedCount> = all
        .iter()
        .take(TOP_FIRMWARE_VERSIONS)
        .map(|(name, count)| NamedCount {
            name: name.clone(),
            count: *count,
        })
        .collect();
    let rest: u32 = all
        .iter()
        .skip(TOP_FIRMWARE_VERSIONS)
        .map(|(_, c)| *c)
        .sum();
    if rest > 0 {
        out.push(NamedCount {
            name: "other".into(),
            count: rest,
        });
    }
    out
}

/// The newest rollout that targets the group and Succeeded.
pub fn newest_succeeded<'r>(
    group: &DeviceGroup,
    rollouts: impl IntoIterator<Item = &'r UpdateRollout>,
) -> Option<&'r UpdateRollout> {
    let name = group.metadata.name.as_deref().unwrap_or_default();
    rollouts
        .into_iter()
        .filter(|r| r.metadata.namespace == group.metadata.namespace)
        .filter(|r| r.spec.target.groups.iter().any(|g| g == name))
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(RolloutPhase::Succeeded))
        .max_by_key(|r| {
            r.status
                .as_ref()
                .and_then(|s| s.completed_at.as_ref())
                .map(|t| t.0)
        })
}

/// A device cut off from its zone, with the addresses it is known by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Isolated {
    pub device: String,
    pub reason: IsolationReason,
    pub addresses: BTreeSet<IpAddr>,
}

/// Every isolated device of the group, by name.
pub fn isolated(group: &DeviceGroup, devices: &[&Device]) -> Vec<Isolated> {
    let mut out: Vec<Isolated> = devices
        .iter()
        .filter_map(|d| {
            segmentation::isolation(d, &group.spec).map(|reason| Isolated {
                device: d.metadata.name.clone().unwrap_or_default(),
                reason,
                addresses: segmentation::addresses(d),
            })
        })
        .collect();
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// A change of one device's network isolation, for an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The device concerned, when one is known by the address.
    pub device: Option<String>,
    pub isolated: bool,
    pub addresses: Vec<IpAddr>,
    pub note: String,
}

/// Isolations and releases between the addresses excepted before and after an update, grouped
/// by device.
pub fn transitions(
    zone: &str,
    before: &BTreeSet<IpAddr>,
    after: &BTreeSet<IpAddr>,
    isolated: &[Isolated],
    devices: &[&Device],
) -> Vec<Transition> {
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    for d in devices {
        for a in segmentation::addresses(d) {
            owner
                .entry(a)
                .or_insert_with(|| d.metadata.name.clone().unwrap_or_default());
        }
    }
    let reason_of: HashMap<&str, IsolationReason> = isolated
        .iter()
        .map(|i| (i.device.as_str(), i.reason))
        .collect();
    let mut grouped: BTreeMap<(bool, Option<String>), Vec<IpAddr>> = BTreeMap::new();
    for a in after.difference(before) {
        grouped
            .entry((true, owner.get(a).cloned()))
            .or_default()
            .push(*a);
    }
    for a in before.difference(after) {
        grouped
            .entry((false, owner.get(a).cloned()))
            .or_default()
            .push(*a);
    }
    grouped
        .into_iter()
        .map(|((isolated, device), addresses)| {
            let list = addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let note = if isolated {
                let why = device
                    .as_deref()
                    .and_then(|d| reason_of.get(d))
                    .map_or_else(|| "isolated".to_string(), ToString::to_string);
                format!("{list} cut off from zone {zone}'s workloads ({why})")
            } else {
                format!("{list} allowed to reach zone {zone}'s workloads again")
            };
            Transition {
                device,
                isolated,
                addresses,
                note,
            }
        })
        .collect()
}

/// How applying the zone's policies went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The group declares no segmentation.
    NotSegmented,
    Applied {
        policies: usize,
        isolated_addresses: usize,
    },
    /// Policies of ours could not be written because objects we do not own hold their names.
    Conflict(Vec<String>),
}

/// The group's conditions: Ready, Degraded, Isolated and AuditClean.
pub fn conditions<'a>(
    zone: Option<&str>,
    applied: &Applied,
    findings: &[AuditFinding],
    total_findings: usize,
) -> Vec<Desired<'a>> {
    let isolated = match applied {
        Applied::NotSegmented => Desired::new(
            types::ISOLATED,
            false,
            "NoSegmentation",
            "spec.segmentation is not set: no NetworkPolicies are generated",
        ),
        Applied::Applied {
            policies,
            isolated_addresses,
        } => Desired::new(
            types::ISOLATED,
            true,
            "PoliciesApplied",
            format!(
                "{policies} NetworkPolicies enforce zone {}; {isolated_addresses} device \
                 addresses isolated",
                zone.unwrap_or_default()
            ),
        ),
        Applied::Conflict(names) => Desired::new(
            types::ISOLATED,
            false,
            "PolicyNameConflict",
            conflict_message(names),
        ),
    };
    let audit = if matches!(applied, Applied::NotSegmented) {
        Desired::new(
            types::AUDIT_CLEAN,
            true,
            "NoSegmentation",
            "the group is not a zone; nothing to audit",
        )
    } else if total_findings == 0 {
        Desired::new(
            types::AUDIT_CLEAN,
            true,
            "NoFindings",
            "every workload in the namespace is isolated, conduits match, no undeclared IT-to-OT path",
        )
    } else {
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for f in findings {
            *by_kind.entry(format!("{:?}", f.kind)).or_default() += 1;
        }
        let kinds = by_kind
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let shown = if total_findings > findings.len() {
            format!(
                " (first {} listed in status.segmentation.findings)",
                findings.len()
            )
        } else {
            " (see status.segmentation.findings)".to_string()
        };
        Desired::new(
            types::AUDIT_CLEAN,
            false,
            "FindingsReported",
            format!("{total_findings} audit findings: {kinds}{shown}"),
        )
    };
    let (degraded, ready) = match applied {
        Applied::Conflict(names) => (
            Desired::new(
                types::DEGRADED,
                true,
                "PolicyNameConflict",
                conflict_message(names),
            ),
            Desired::new(
                types::READY,
                false,
                "PolicyNameConflict",
                "segmentation is not fully enforced",
            ),
        ),
        _ => (
            Desired::new(
                types::DEGRADED,
                false,
                "AsExpected",
                "nothing needs attention",
            ),
            Desired::new(
                types::READY,
                true,
                if matches!(applied, Applied::NotSegmented) {
                    "Reconciled"
                } else {
                    "ZoneEnforced"
                },
                "inventory is current and the zone's policies are applied",
            ),
        ),
    };
    vec![ready, degraded, isolated, audit]
}

fn conflict_message(names: &[String]) -> String {
    format!(
        "NetworkPolicies {} exist but are not managed by this DeviceGroup: delete or rename them \
         so the zone's policies can be applied",
        names.join(", ")
    )
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn signed(d: std::time::Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn group() -> DeviceGroup {
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup",
            "metadata": {"name": "cell", "namespace": "plant", "uid": "g"},
            "spec": {
                "certificates": {"issuerRef": {"name": "ca"}, "renewBefore": "720h"},
                "firmware": {"minimumVersion": "4.0.0"},
                "compliance": {"maxOffline": "2h"},
                "segmentation": {"zone": "cell", "workloadSelector": {}, "deviceCIDRs": ["10.0.0.0/24"]},
            }
        }))
        .unwrap()
    }

    struct D<'a> {
        name: &'a str,
        lifecycle: &'a str,
        phase: &'a str,
        version: Option<&'a str>,
        compliant: Option<bool>,
        last_seen: Option<&'a str>,
        not_after: Option<&'a str>,
        address: &'a str,
    }

    impl Default for D<'_> {
        fn default() -> Self {
            Self {
                name: "d",
                lifecycle: "Active",
                phase: "Active",
                version: Some("4.1.0"),
                compliant: Some(true),
                last_seen: Some("2026-11-25T11:30:00Z"),
                not_after: Some("2027-06-01T00:00:00Z"),
                address: "10.0.0.1",
            }
        }
    }

    fn device(d: D<'_>) -> Device {
        let mut status = json!({"phase": d.phase, "reported": {"firmwareVersion": d.version}});
        if let Some(t) = d.last_seen {
            status["lastSeen"] = json!(t);
        }
        if let Some(na) = d.not_after {
            status["identity"] = json!({"spiffeId": "s", "certificate": "", "serialNumber": "1",
                "fingerprintSha256": "f", "notBefore": "2026-01-01T00:00:00Z", "notAfter": na});
        }
        if let Some(c) = d.compliant {
            status["conditions"] = json!([{"type": "Compliant", "status": if c {"True"} else {"False"},
                "reason": "R", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]);
        }
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device",
            "metadata": {"name": d.name, "namespace": "plant"},
            "spec": {"group": "cell", "hardwareModel": "m1", "lifecycle": d.lifecycle,
                     "addresses": [d.address]},
            "status": status,
        }))
        .unwrap()
    }

    fn rollout(version: &str, phase: &str, completed: &str) -> UpdateRollout {
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout",
            "metadata": {"name": format!("to-{version}"), "namespace": "plant"},
            "spec": {
                "target": {"groups": ["cell"]},
                "firmware": {"version": version, "securityVersion": 1, "sha256": "0".repeat(64),
                    "sizeBytes": 1, "hardwareModels": ["m1"], "expires": "2027-01-01T00:00:00Z",
                    "url": "https://x/fw", "signature": {"keyId": "k", "value": format!("{}==", "A".repeat(86))}},
                "waves": [{"percent": 100}],
            },
            "status": {"phase": phase, "completedAt": completed},
        }))
        .unwrap()
    }

    #[test]
    fn the_inventory_counts_every_figure() {
        let devices = [
            device(D {
                name: "a",
                ..D::default()
            }),
            device(D {
                name: "b",
                version: Some("4.2.0"),
                ..D::default()
            }),
            device(D {
                name: "c",
                version: Some("3.9.0"),
                compliant: Some(false),
                ..D::default()
            }),
            device(D {
                name: "d",
                lifecycle: "Quarantined",
                phase: "Quarantined",
                ..D::default()
            }),
            device(D {
                name: "e",
                lifecycle: "Retired",
                phase: "Retired",
                not_after: None,
                compliant: None,
                last_seen: None,
                version: Some("1.0.0"),
                ..D::default()
            }),
            device(D {
                name: "f",
                phase: "Pending",
                not_after: None,
                compliant: None,
                last_seen: Some("2026-11-25T09:00:00Z"),
                version: None,
                ..D::default()
            }),
            device(D {
                name: "g",
                not_after: Some("2026-12-10T00:00:00Z"),
                ..D::default()
            }),
        ];
        let refs: Vec<&Device> = devices.iter().collect();
        let done = rollout("4.2.0", "Succeeded", "2026-11-20T00:00:00Z");
        let (inv, next) = inventory(&group(), &refs, Some(&done), now());
        assert_eq!(inv.total, 7);
        assert_eq!(inv.enrolled, 5);
        assert_eq!(inv.compliant, 4);
        assert_eq!(
            inv.quarantined, 2,
            "lifecycle Quarantined and auto-quarantined c"
        );
        assert_eq!(inv.retired, 1);
        assert_eq!(
            inv.online, 5,
            "e never seen, f seen 3h ago with maxOffline 2h"
        );
        assert_eq!(inv.certificates_expiring, 1, "g expires within 720h");
        // Behind 4.2.0: a, c, d, f (unknown), g; b is current; e is retired.
        assert_eq!(inv.out_of_date, 5);
        let phases: Vec<_> = inv
            .by_phase
            .iter()
            .map(|n| (n.name.as_str(), n.count))
            .collect();
        assert_eq!(
            phases,
            [
                ("Active", 4),
                ("Pending", 1),
                ("Quarantined", 1),
                ("Retired", 1)
            ]
        );
        let versions: Vec<_> = inv
            .firmware_versions
            .iter()
            .map(|n| (n.name.as_str(), n.count))
            .collect();
        assert_eq!(
            versions,
            [
                ("4.1.0", 3),
                ("4.2.0", 1),
                ("3.9.0", 1),
                ("1.0.0", 1),
                ("unknown", 1)
            ]
        );
        // The next change with time alone: the devices seen at 11:30 go offline at 13:30.
        assert_eq!(next, Some("2026-11-25T13:30:00Z".parse().unwrap()));

        // Without a succeeded rollout only the group minimum (4.0.0) counts.
        let (inv, _) = inventory(&group(), &refs, None, now());
        assert_eq!(inv.out_of_date, 2, "c (3.9.0) and f (unknown)");
    }

    #[test]
    fn long_tails_of_versions_fold_into_other() {
        let names: Vec<String> = (0..15).map(|i| format!("5.{i}.0")).collect();
        let devices: Vec<Device> = names
            .iter()
            .enumerate()
            .flat_map(|(i, v)| (0..=i).map(move |_| v.clone()))
            .map(|v| {
                device(D {
                    version: Some(Box::leak(v.into_boxed_str())),
                    ..D::default()
                })
            })
            .collect();
        let refs: Vec<&Device> = devices.iter().collect();
        let (inv, _) = inventory(&group(), &refs, None, now());
        assert_eq!(inv.firmware_versions.len(), TOP_FIRMWARE_VERSIONS + 1);
        assert_eq!(inv.firmware_versions[0].name, "5.14.0");
        assert_eq!(inv.firmware_versions[0].count, 15);
        let other = inv.firmware_versions.last().unwrap();
        assert_eq!(
            (other.name.as_str(), other.count),
            ("other", 1 + 2 + 3 + 4 + 5)
        );
        let sum: u32 = inv.firmware_versions.iter().map(|n| n.count).sum();
        assert_eq!(sum, inv.total);
    }

    #[test]
    fn the_newest_succeeded_rollout_is_the_reference() {
        let old = rollout("4.1.0", "Succeeded", "2026-10-01T00:00:00Z");
        let new = rollout("4.2.0", "Succeeded", "2026-11-01T00:00:00Z");
        let running = rollout("4.3.0", "Progressing", "2026-11-24T00:00:00Z");
        let pick = newest_succeeded(&group(), [&old, &new, &running]).unwrap();
        assert_eq!(pick.spec.firmware.version, "4.2.0");
        assert!(newest_succeeded(&group(), [&running]).is_none());
    }

    #[test]
    fn isolations_and_releases_are_reported_per_device() {
        let q = device(D {
            name: "q",
            lifecycle: "Quarantined",
            address: "10.0.0.7",
            ..D::default()
        });
        let ok = device(D {
            name: "ok",
            address: "10.0.0.8",
            ..D::default()
        });
        let devices = [&q, &ok];
        let iso = isolated(&group(), &devices);
        assert_eq!(iso.len(), 1);
        assert_eq!(iso[0].device, "q");
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let before = BTreeSet::from([ip("10.0.0.8"), ip("10.0.0.99")]);
        let after = BTreeSet::from([ip("10.0.0.7")]);
        let t = transitions("cell", &before, &after, &iso, &devices);
        assert_eq!(t.len(), 3);
        let isolated_q = t.iter().find(|t| t.isolated).unwrap();
        assert_eq!(isolated_q.device.as_deref(), Some("q"));
        assert_eq!(
            isolated_q.note,
            "10.0.0.7 cut off from zone cell's workloads (lifecycle Quarantined)"
        );
        let released: Vec<_> = t
            .iter()
            .filter(|t| !t.isolated)
            .map(|t| t.device.clone())
            .collect();
        assert_eq!(
            released,
            [None, Some("ok".to_string())],
            "an address no device has any more is released too"
        );
        assert!(transitions("cell", &after, &after, &iso, &devices).is_empty());
    }

    #[test]
    fn conditions_summarise_segmentation_and_audit() {
        let c = conditions(Some("cell"), &Applied::NotSegmented, &[], 0);
        assert_eq!((c[0].type_, c[0].status), (types::READY, true));
        assert_eq!(
            (c[2].type_, c[2].status, c[2].reason),
            (types::ISOLATED, false, "NoSegmentation")
        );

        let applied = Applied::Applied {
            policies: 4,
            isolated_addresses: 1,
        };
        let finding = AuditFinding {
            kind: crds::group::FindingKind::UnisolatedWorkload,
            subject: "pod/x".into(),
            message: "m".into(),
        };
        let c = conditions(Some("cell"), &applied, std::slice::from_ref(&finding), 1);
        assert!(c[0].status && !c[1].status && c[2].status);
        assert_eq!(
            c[2].message,
            "4 NetworkPolicies enforce zone cell; 1 device addresses isolated"
        );
        assert_eq!(
            (c[3].type_, c[3].status, c[3].reason),
            (types::AUDIT_CLEAN, false, "FindingsReported")
        );
        assert!(
            c[3].message
                .starts_with("1 audit findings: 1 UnisolatedWorkload")
        );
        let c = conditions(Some("cell"), &applied, &[finding], 150);
        assert!(c[3].message.contains("first 1 listed"));

        let c = conditions(
            Some("cell"),
            &Applied::Conflict(vec!["fw-cell-dns".into()]),
            &[],
            0,
        );
        assert!(!c[0].status && c[1].status);
        assert!(c[1].message.contains("fw-cell-dns") && c[1].message.contains("delete or rename"));
    }
}
