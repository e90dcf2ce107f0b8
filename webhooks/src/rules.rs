//! The admission rules, as pure functions of the object, its previous version and what the
//! webhook's caches know about the cluster. Each violation names the field and says what to do.
//! The CRD schema already checks shapes (enums, ranges, patterns); these rules cover what it
//! cannot: other objects, cryptography, and the CEL rules API servers older than 1.25 ignore.

use std::collections::{BTreeMap, BTreeSet};

use crds::{
    Device, DeviceGroup, UpdateRollout,
    device::Lifecycle,
    firmware,
    rollout::{FirmwareManifest, OnFailure, RolloutPhase},
    segmentation::Cidr,
};
use jiff::Timestamp;

/// Everything the rules may consult besides the object itself.
pub struct Cluster<'a> {
    pub groups: Vec<&'a DeviceGroup>,
    pub rollouts: Vec<&'a UpdateRollout>,
    pub now: Timestamp,
}

fn same(a: &Option<String>, b: &Option<String>) -> bool {
    a.is_some() && a == b
}

pub fn device(new: &Device, old: Option<&Device>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in new.spec.addresses.iter().enumerate() {
        if a.parse::<std::net::IpAddr>().is_err() {
            out.push(format!(
                "spec.addresses[{i}]: {a:?} is not an IPv4 or IPv6 address"
            ));
        }
    }
    if new.spec.identity.mode == crds::device::IdentityMode::ManagedKey
        && new.spec.identity.public_key_sha256.is_some()
    {
        out.push(
            "spec.identity.publicKeySha256 pins a key generated on the device; remove it or use \
             mode DeviceKey (with ManagedKey, cert-manager generates the key)"
                .into(),
        );
    }
    if let Some(old) = old {
        if old.spec.lifecycle == Lifecycle::Retired && new.spec.lifecycle != Lifecycle::Retired {
            out.push(
                "spec.lifecycle: Retired is terminal and its certificate is revoked; create a new \
                 Device to re-provision the hardware"
                    .into(),
            );
        }
        let enrolled = old.status.as_ref().is_some_and(|s| s.identity.is_some());
        if enrolled && new.spec.identity != old.spec.identity {
            out.push(
                "spec.identity cannot change once the device is enrolled (the pinned key and mode \
                 are what its certificate was issued for); retire it and create a new Device"
                    .into(),
            );
        }
        if new.spec.group != old.spec.group && enrolled {
            out.push(format!(
                "spec.group: an enrolled device cannot move from {:?} to {:?} (its certificate, \
                 policy and zone come from the group); retire it and create a new Device",
                old.spec.group, new.spec.group
            ));
        }
    }
    out
}

pub fn group(new: &DeviceGroup, cluster: &Cluster<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &new.spec;
    let keys = &spec.certificates.keys;
    if keys.rsa_min_bits > keys.rsa_max_bits {
        out.push(format!(
            "spec.certificates.keys: rsaMinBits ({}) exceeds rsaMaxBits ({})",
            keys.rsa_min_bits, keys.rsa_max_bits
        ));
    }
    let mut algorithms = BTreeSet::new();
    for a in &keys.algorithms {
        if !algorithms.insert(format!("{a:?}")) {
            out.push(format!(
                "spec.certificates.keys.algorithms lists {a:?} twice"
            ));
        }
    }
    if spec.certificates.renew_before.get() >= spec.certificates.duration.get() {
        out.push(format!(
            "spec.certificates.renewBefore ({}) must be shorter than duration ({}), or devices \
             would renew continuously",
            spec.certificates.renew_before.as_str(),
            spec.certificates.duration.as_str()
        ));
    }
    let mut key_ids = BTreeSet::new();
    for (i, k) in spec.firmware.trusted_keys.iter().enumerate() {
        if !key_ids.insert(k.key_id.as_str()) {
            out.push(format!(
                "spec.firmware.trustedKeys[{i}]: keyId {:?} is listed twice",
                k.key_id
            ));
        }
        if firmware::parse_public_key(&k.public_key).is_none() {
            out.push(format!(
                "spec.firmware.trustedKeys[{i}].publicKey is not a base64 32-byte Ed25519 public \
                 key (`kubectl fleet keygen` prints one)"
            ));
        }
    }
    if spec.compliance.require_measured_boot && spec.compliance.allowed_boot_measurements.is_empty()
    {
        out.push(
            "spec.compliance.requireMeasuredBoot needs at least one entry in \
             allowedBootMeasurements"
                .into(),
        );
    }
    if let Some(seg) = &spec.segmentation {
        let mut cidrs = Vec::new();
        for (i, c) in seg.device_cidrs.iter().enumerate() {
            match c.parse::<Cidr>() {
                Ok(cidr) => {
                    if cidr.to_string() != *c {
                        out.push(format!(
                            "spec.segmentation.deviceCIDRs[{i}]: {c:?} has host bits set; write \
                             the network address {cidr}"
                        ));
                    }
                    cidrs.push(cidr);
                }
                Err(e) => out.push(format!("spec.segmentation.deviceCIDRs[{i}]: {e}")),
            }
        }
        for (i, p) in seg.ports.iter().enumerate() {
            if p.end_port.is_some_and(|e| e < p.port) {
                out.push(format!(
                    "spec.segmentation.ports[{i}]: endPort must be greater than or equal to port"
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, c) in seg.conduits.iter().enumerate() {
            if !names.insert(c.name.as_str()) {
                out.push(format!(
                    "spec.segmentation.conduits[{i}]: name {:?} is used twice",
                    c.name
                ));
            }
            if !is_dns_label(&c.zone) {
                out.push(format!(
                    "spec.segmentation.conduits[{i}].zone: {:?} is not a zone name (a DNS label)",
                    c.zone
                ));
            }
            if c.zone == seg.zone {
                out.push(format!(
                    "spec.segmentation.conduits[{i}]: a conduit connects two zones; {:?} is this \
                     group's own zone",
                    c.zone
                ));
            }
            for (j, p) in c.ports.iter().enumerate() {
                if p.end_port.is_some_and(|e| e < p.port) {
                    out.push(format!(
                        "spec.segmentation.conduits[{i}].ports[{j}]: endPort must be greater than \
                         or equal to port"
                    ));
                }
            }
        }
        for other in &cluster.groups {
            if same(&other.metadata.uid, &new.metadata.uid)
                || (other.metadata.name == new.metadata.name
                    && other.metadata.namespace == new.metadata.namespace)
            {
                continue;
            }
            let Some(theirs) = &other.spec.segmentation else {
                continue;
            };
            let who = format!(
                "DeviceGroup {}/{}",
                other.metadata.namespace.as_deref().unwrap_or_default(),
                other.metadata.name.as_deref().unwrap_or_default()
            );
            if theirs.zone == seg.zone {
                out.push(format!(
                    "spec.segmentation.zone: zone {:?} is already declared by {who}; zone names \
                     are unique in the cluster",
                    seg.zone
                ));
            }
            for t in theirs
                .device_cidrs
                .iter()
                .filter_map(|c| c.parse::<Cidr>().ok())
            {
                if let Some(mine) = cidrs.iter().find(|m| m.overlaps(&t)) {
                    out.push(format!(
                        "spec.segmentation.deviceCIDRs: {mine} overlaps {t} of zone {:?} \
                         ({who}); a device address must belong to one zone",
                        theirs.zone
                    ));
                }
            }
        }
    }
    out
}

/// A DNS label (RFC 1123), as zone names must be.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn terminal(r: &UpdateRollout) -> bool {
    matches!(
        r.status.as_ref().and_then(|s| s.phase),
        Some(RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::RolledBack)
    )
}

pub fn rollout(
    new: &UpdateRollout,
    old: Option<&UpdateRollout>,
    cluster: &Cluster<'_>,
) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &new.spec;
    let ns = new.metadata.namespace.clone();

    // Waves: cumulative, strictly growing, at most 100%, percent or count.
    let mut last_percent = 0u8;
    let mut last_count = 0u32;
    for (i, w) in spec.waves.iter().enumerate() {
        match (w.percent, w.count) {
            (Some(_), Some(_)) | (None, None) => out.push(format!(
                "spec.waves[{i}]: set exactly one of percent or count"
            )),
            (Some(p), None) => {
                if p > 100 || p == 0 {
                    out.push(format!("spec.waves[{i}].percent must be 1..100, not {p}"));
                } else if p <= last_percent {
                    out.push(format!(
                        "spec.waves[{i}].percent ({p}) must be greater than the previous wave's \
                         ({last_percent}): waves are cumulative"
                    ));
                }
                last_percent = last_percent.max(p);
            }
            (None, Some(c)) => {
                if c <= last_count {
                    out.push(format!(
                        "spec.waves[{i}].count ({c}) must be greater than the previous wave's \
                         ({last_count}): waves are cumulative"
                    ));
                }
                last_count = last_count.max(c);
            }
        }
    }
    if spec
        .waves
        .last()
        .is_some_and(|w| w.percent.is_some_and(|p| p < 100))
    {
        out.push(format!(
            "spec.waves: the last wave covers {last_percent}%; end with percent: 100 so every \
             eligible device is updated"
        ));
    }
    if spec.approved_waves as usize > spec.waves.len() {
        out.push(format!(
            "spec.approvedWaves ({}) cannot exceed the number of waves ({})",
            spec.approved_waves,
            spec.waves.len()
        ));
    }
    if spec.success_threshold_percent == 0 || spec.success_threshold_percent > 100 {
        out.push("spec.successThresholdPercent must be 1..100".into());
    }
    if spec.failure_threshold_percent > 100 {
        out.push("spec.failureThresholdPercent must be 0..100".into());
    }
    if spec.on_failure == OnFailure::Rollback && spec.rollback_firmware.is_none() {
        out.push(
            "spec.onFailure: Rollback needs spec.rollbackFirmware: the previous signed firmware \
             stanza to offer"
                .into(),
        );
    }

    // The firmware, against every target group.
    let manifests: Vec<(&str, &FirmwareManifest)> =
        std::iter::once(("spec.firmware", &spec.firmware))
            .chain(
                spec.rollback_firmware
                    .iter()
                    .map(|m| ("spec.rollbackFirmware", m)),
            )
            .collect();
    let creating_or_changed = old.is_none_or(|o| o.spec.firmware != spec.firmware);
    if creating_or_changed && spec.firmware.expires.0 <= cluster.now {
        out.push(format!(
            "spec.firmware.expires ({}) is in the past: devices refuse expired manifests; sign it \
             again with a later --expires",
            spec.firmware.expires.0
        ));
    }
    if let Some(rb) = &spec.rollback_firmware
        && rb.security_version < spec.firmware.security_version
    {
        out.push(format!(
            "spec.rollbackFirmware.securityVersion ({}) is below spec.firmware.securityVersion \
             ({}): devices that installed the new firmware refuse to go back to it \
             (anti-rollback); roll back to a build with securityVersion {} or higher",
            rb.security_version, spec.firmware.security_version, spec.firmware.security_version
        ));
    }
    let by_name: BTreeMap<&str, &DeviceGroup> = cluster
        .groups
        .iter()
        .filter(|g| g.metadata.namespace == ns)
        .filter_map(|g| g.metadata.name.as_deref().map(|n| (n, *g)))
        .collect();
    for (i, name) in spec.target.groups.iter().enumerate() {
        let Some(group) = by_name.get(name.as_str()) else {
            out.push(format!(
                "spec.target.groups[{i}]: DeviceGroup {name:?} does not exist in namespace {}; \
                 create it first (the firmware is verified against its trusted keys)",
                ns.as_deref().unwrap_or_default()
            ));
            continue;
        };
        for (field, manifest) in &manifests {
            if let Err(e) = firmware::verify(manifest, &group.spec.firmware.trusted_keys) {
                out.push(format!("{field}.signature (DeviceGroup {name}): {e}"));
            }
        }
        if let Some(min) = group.spec.firmware.minimum_security_version {
            for (field, manifest) in &manifests {
                if manifest.security_version < min {
                    out.push(format!(
                        "{field}.securityVersion ({}) is below DeviceGroup {name}'s \
                         firmware.minimumSecurityVersion ({min})",
                        manifest.security_version
                    ));
                }
            }
        }
    }

    // One active rollout per group, decided when the rollout is created.
    if old.is_none() {
        let targets: BTreeSet<&str> = spec.target.groups.iter().map(String::as_str).collect();
        for other in &cluster.rollouts {
            if other.metadata.namespace != ns
                || other.metadata.name == new.metadata.name
                || terminal(other)
            {
                continue;
            }
            let shared: Vec<&str> = other
                .spec
                .target
                .groups
                .iter()
                .map(String::as_str)
                .filter(|g| targets.contains(g))
                .collect();
            if !shared.is_empty() {
                out.push(format!(
                    "spec.target.groups: UpdateRollout {} is still active for {}; one rollout per \
                     group at a time: wait for it to finish or abort it \
                     (`kubectl fleet rollout abort {}`)",
                    other.metadata.name.as_deref().unwrap_or_default(),
                    shared.join(", "),
                    other.metadata.name.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use serde_json::{Value, json};

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn group(name: &str, extra: Value) -> DeviceGroup {
        let mut spec = json!({
            "certificates": {"issuerRef": {"name": "ca"}},
            "firmware": {"trustedKeys": [{"keyId": "vendor-2026",
                "publicKey": firmware::public_key_base64(&key().verifying_key())}],
                "minimumSecurityVersion": 10},
        });
        if let (Some(s), Value::Object(e)) = (spec.as_object_mut(), extra) {
            s.extend(e);
        }
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup",
            "metadata": {"name": name, "namespace": "plant", "uid": format!("uid-{name}")},
            "spec": spec,
        }))
        .unwrap()
    }

    fn manifest(version: &str, sv: i64) -> FirmwareManifest {
        let mut m: FirmwareManifest = serde_json::from_value(json!({
            "version": version, "securityVersion": sv, "sha256": "a".repeat(64), "sizeBytes": 1024,
            "hardwareModels": ["m1"], "expires": "2027-06-01T00:00:00Z",
            "url": "https://fw.example/x.bin", "signature": {"keyId": "", "value": ""}
        }))
        .unwrap();
        firmware::sign(&mut m, "vendor-2026", &key());
        m
    }

    fn rollout(name: &str, spec: Value) -> UpdateRollout {
        let mut base = json!({
            "target": {"groups": ["cell"]},
            "firmware": manifest("4.2.0", 12),
            "waves": [{"percent": 5}, {"percent": 20}, {"percent": 50}, {"percent": 100}],
        });
        if let (Some(s), Value::Object(e)) = (base.as_object_mut(), spec) {
            s.extend(e);
        }
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout",
            "metadata": {"name": name, "namespace": "plant"}, "spec": base,
        }))
        .unwrap()
    }

    fn cluster<'a>(groups: &'a [DeviceGroup], rollouts: &'a [UpdateRollout]) -> Cluster<'a> {
        Cluster {
            groups: groups.iter().collect(),
            rollouts: rollouts.iter().collect(),
            now: now(),
        }
    }

    #[test]
    fn a_signed_rollout_for_an_existing_group_is_admitted() {
        let groups = [group("cell", json!({}))];
        assert_eq!(rollout("r", json!({})).spec.waves.len(), 4);
        assert!(super::rollout(&rollout("r", json!({})), None, &cluster(&groups, &[])).is_empty());
    }

    #[test]
    fn tampered_unknown_key_and_low_security_version_firmware_is_refused() {
        let groups = [group("cell", json!({}))];
        let c = cluster(&groups, &[]);
        let mut tampered = rollout("r", json!({}));
        tampered.spec.firmware.size_bytes += 1;
        let v = super::rollout(&tampered, None, &c);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].starts_with(
                "spec.firmware.signature (DeviceGroup cell): firmware signature does not verify"
            ),
            "{v:?}"
        );

        let mut foreign = manifest("4.2.0", 12);
        firmware::sign(
            &mut foreign,
            "someone-else",
            &SigningKey::from_bytes(&[9; 32]),
        );
        let v = super::rollout(&rollout("r", json!({"firmware": foreign})), None, &c);
        assert!(
            v[0].contains("not among the group's firmware.trustedKeys"),
            "{v:?}"
        );

        let v = super::rollout(
            &rollout("r", json!({"firmware": manifest("4.2.0", 9)})),
            None,
            &c,
        );
        assert_eq!(
            v,
            [
                "spec.firmware.securityVersion (9) is below DeviceGroup cell's firmware.minimumSecurityVersion (10)"
            ]
        );

        let v = super::rollout(
            &rollout("r", json!({"target": {"groups": ["nope"]}})),
            None,
            &c,
        );
        assert!(
            v[0].contains("DeviceGroup \"nope\" does not exist in namespace plant"),
            "{v:?}"
        );
    }

    #[test]
    fn waves_thresholds_rollback_and_expiry_are_checked() {
        let groups = [group("cell", json!({}))];
        let c = cluster(&groups, &[]);
        let bad = rollout(
            "r",
            json!({
                "waves": [{"percent": 20}, {"percent": 10}, {"percent": 50, "count": 3}, {"percent": 90}],
                "approvedWaves": 5,
                "onFailure": "Rollback",
            }),
        );
        let v = super::rollout(&bad, None, &c);
        let joined = v.join("\n");
        assert!(
            joined.contains(
                "spec.waves[1].percent (10) must be greater than the previous wave's (20)"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("spec.waves[2]: set exactly one of percent or count"),
            "{joined}"
        );
        assert!(joined.contains("the last wave covers 90%"), "{joined}");
        assert!(
            joined.contains("spec.approvedWaves (5) cannot exceed the number of waves (4)"),
            "{joined}"
        );
        assert!(
            joined.contains("onFailure: Rollback needs spec.rollbackFirmware"),
            "{joined}"
        );

        let mut expired = manifest("4.2.0", 12);
        expired.expires = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-01-01T00:00:00Z".parse().unwrap(),
        );
        firmware::sign(&mut expired, "vendor-2026", &key());
        let stale = rollout("r", json!({"firmware": expired}));
        let v = super::rollout(&stale, None, &c);
        assert!(
            v[0].contains("is in the past") && v[0].contains("sign it again"),
            "{v:?}"
        );
        // An existing rollout whose manifest has since expired can still be paused or aborted.
        let mut paused = stale.clone();
        paused.spec.paused = true;
        assert!(super::rollout(&paused, Some(&stale), &c).is_empty());

        let down = rollout(
            "r",
            json!({"onFailure": "Rollback", "rollbackFirmware": manifest("4.1.0", 11)}),
        );
        let v = super::rollout(&down, None, &c);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("anti-rollback"), "{v:?}");
        let ok = rollout(
            "r",
            json!({"onFailure": "Rollback", "rollbackFirmware": manifest("4.1.0", 12)}),
        );
        assert!(super::rollout(&ok, None, &c).is_empty());
    }

    #[test]
    fn one_active_rollout_per_group() {
        let groups = [group("cell", json!({})), group("other", json!({}))];
        let mut active = rollout("first", json!({}));
        active.status = serde_json::from_value(json!({"phase": "Progressing"})).unwrap();
        let mut done = rollout("older", json!({}));
        done.status = serde_json::from_value(json!({"phase": "Succeeded"})).unwrap();
        let rollouts = [active, done];
        let c = cluster(&groups, &rollouts);
        let v = super::rollout(&rollout("second", json!({})), None, &c);
        assert_eq!(v.len(), 1);
        assert!(
            v[0].contains("UpdateRollout first is still active for cell")
                && v[0].contains("rollout abort first"),
            "{v:?}"
        );
        // Other groups are free; updates of the rollout itself are not re-judged.
        assert!(
            super::rollout(
                &rollout("second", json!({"target": {"groups": ["other"]}})),
                None,
                &c
            )
            .is_empty()
        );
        let second = rollout("second", json!({}));
        assert!(super::rollout(&second, Some(&second), &c).is_empty());
    }

    #[test]
    fn zones_must_be_unique_disjoint_and_well_formed() {
        let seg = |zone: &str, cidrs: Value, conduits: Value| {
            json!({"segmentation": {
            "zone": zone, "workloadSelector": {}, "deviceCIDRs": cidrs, "conduits": conduits}})
        };
        let existing = [group(
            "mes",
            seg("plant-mes", json!(["10.40.0.0/16"]), json!([])),
        )];
        let c = cluster(&existing, &[]);
        let fresh = group(
            "cell",
            seg(
                "press-line-3",
                json!(["10.30.3.0/24"]),
                json!([{"name": "mes", "zone": "plant-mes", "direction": "Ingress", "ports": [{"port": 4840}]}]),
            ),
        );
        assert!(super::group(&fresh, &c).is_empty());

        let clash = group(
            "cell",
            seg(
                "plant-mes",
                json!(["10.40.3.0/24", "10.30.3.1/24", "10.0.0.0/33"]),
                json!([{"name": "x", "zone": "plant-mes", "direction": "Ingress", "ports": [{"port": 1}]},
                   {"name": "x", "zone": "Bad_Zone", "direction": "Egress", "ports": [{"port": 2, "endPort": 1}]}]),
            ),
        );
        let v = super::group(&clash, &c).join("\n");
        for needle in [
            "zone \"plant-mes\" is already declared by DeviceGroup plant/mes",
            "10.40.3.0/24 overlaps 10.40.0.0/16 of zone \"plant-mes\"",
            "deviceCIDRs[1]: \"10.30.3.1/24\" has host bits set; write the network address 10.30.3.0/24",
            "deviceCIDRs[2]: \"10.0.0.0/33\" is not a CIDR",
            "conduits[1]: name \"x\" is used twice",
            "conduits[1].zone: \"Bad_Zone\" is not a zone name",
            "conduits[0]: a conduit connects two zones",
            "conduits[1].ports[0]: endPort must be greater than or equal to port",
        ] {
            assert!(v.contains(needle), "missing {needle:?} in\n{v}");
        }
        // A group is never compared with itself on update.
        let me = [existing[0].clone()];
        assert!(super::group(&existing[0], &cluster(&me, &[])).is_empty());
    }

    #[test]
    fn group_keys_and_policies_are_checked() {
        let g = group(
            "cell",
            json!({
                "certificates": {"issuerRef": {"name": "ca"}, "duration": "24h", "renewBefore": "48h",
                                 "keys": {"rsaMinBits": 4096, "rsaMaxBits": 2048}},
                "firmware": {"trustedKeys": [{"keyId": "a", "publicKey": "A".repeat(43) + "="},
                                             {"keyId": "a", "publicKey": "not a key"}]},
                "compliance": {"requireMeasuredBoot": true},
            }),
        );
        let v = super::group(&g, &cluster(&[], &[])).join("\n");
        for needle in [
            "rsaMinBits (4096) exceeds rsaMaxBits (2048)",
            "renewBefore (48h) must be shorter than duration (24h)",
            "trustedKeys[1]: keyId \"a\" is listed twice",
            "trustedKeys[1].publicKey is not a base64 32-byte Ed25519 public key",
            "requireMeasuredBoot needs at least one entry",
        ] {
            assert!(v.contains(needle), "missing {needle:?} in\n{v}");
        }
    }

    fn device(spec: Value, enrolled: bool) -> Device {
        let mut d = json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device",
            "metadata": {"name": "plc", "namespace": "plant"},
            "spec": {"group": "cell", "hardwareModel": "m1"}});
        if let (Some(s), Value::Object(e)) = (d["spec"].as_object_mut(), spec) {
            s.extend(e);
        }
        if enrolled {
            d["status"] = json!({"identity": {"spiffeId": "s", "certificate": "c", "serialNumber": "1",
                "fingerprintSha256": "f", "notBefore": "2026-01-01T00:00:00Z", "notAfter": "2027-01-01T00:00:00Z"}});
        }
        serde_json::from_value(d).unwrap()
    }

    #[test]
    fn device_rules() {
        let pin = "ab".repeat(32);
        assert!(
            super::device(
                &device(json!({"addresses": ["10.0.0.1", "fd00::1"]}), false),
                None
            )
            .is_empty()
        );
        let v = super::device(&device(json!({"addresses": ["10.0.0.300"]}), false), None);
        assert_eq!(
            v,
            ["spec.addresses[0]: \"10.0.0.300\" is not an IPv4 or IPv6 address"]
        );

        let retired = device(json!({"lifecycle": "Retired"}), false);
        let revived = device(json!({"lifecycle": "Active"}), false);
        assert!(super::device(&revived, Some(&retired))[0].contains("Retired is terminal"));
        assert!(super::device(&retired, Some(&revived)).is_empty());

        let enrolled = device(json!({}), true);
        let pinned = device(json!({"identity": {"publicKeySha256": pin}}), true);
        assert!(
            super::device(&pinned, Some(&enrolled))[0]
                .contains("spec.identity cannot change once the device is enrolled")
        );
        let not_yet = device(json!({}), false);
        assert!(
            super::device(&pinned, Some(&not_yet)).is_empty(),
            "a pin may be set before enrollment"
        );
        let moved = device(json!({"group": "other"}), true);
        assert!(super::device(&moved, Some(&enrolled))[0].contains("cannot move"));
        let managed = device(
            json!({"identity": {"mode": "ManagedKey", "publicKeySha256": pin}}),
            false,
        );
        assert!(super::device(&managed, None)[0].contains("mode DeviceKey"));
    }
}
