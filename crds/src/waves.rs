//! What a rollout means for each device, derived and never stored: who is eligible, which wave
//! a device falls in, whether the maintenance window is open, how far a device has got, and what
//! it should be offered now. The operator uses this to count, the gateway to offer; both compute
//! the same answers from the same inputs, so a rollout over 100 000 devices is still one small
//! object with counts.
//!
//! Wave membership: eligible devices are ordered by a stable hash of (rollout uid, device uid),
//! canaries (devices matching any wave's `canarySelector`) first; wave k covers the first
//! ceil(cumulative share x N) of that order.

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp, tz::TimeZone};
use sha2::{Digest, Sha256};

use crate::{
    Device, DeviceGroup, UpdateRollout,
    compliance::compare_versions,
    device::{Lifecycle, UpdateState},
    rollout::{FirmwareManifest, MaintenanceWindow, RolloutPhase, Weekday},
    selector,
};

/// Whether a device is part of a rollout's population: in a targeted group, selected, Active,
/// of a compatible model, and able to install the target (its reported security version is not
/// above the target's). Devices already on the target version stay in the population and count
/// as succeeded, so the population does not shrink as the rollout progresses.
pub fn eligible(device: &Device, rollout: &UpdateRollout) -> bool {
    let spec = &rollout.spec;
    if device.metadata.namespace != rollout.metadata.namespace
        || !spec.target.groups.contains(&device.spec.group)
        || device.spec.lifecycle != Lifecycle::Active
        || !spec
            .firmware
            .hardware_models
            .contains(&device.spec.hardware_model)
    {
        return false;
    }
    if let Some(selector) = &spec.target.selector
        && !selector::matches(
            selector,
            device
                .metadata
                .labels
                .as_ref()
                .unwrap_or(&Default::default()),
        )
    {
        return false;
    }
    let reported_sv = device
        .status
        .as_ref()
        .and_then(|s| s.reported.as_ref())
        .and_then(|r| r.security_version);
    reported_sv.is_none_or(|sv| sv <= spec.firmware.security_version)
}

/// The stable position key of a device in a rollout.
pub fn order_key(rollout_uid: &str, device_uid: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(rollout_uid.as_bytes())
        .chain_update([0u8])
        .chain_update(device_uid.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The waves of one rollout over its current population.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WavePlan {
    /// Device uid -> 0-based wave index.
    members: HashMap<String, usize>,
    /// Devices per wave.
    pub planned: Vec<u32>,
    /// Size of the population.
    pub eligible: u32,
}

impl WavePlan {
    pub fn build<'a>(
        rollout: &UpdateRollout,
        devices: impl IntoIterator<Item = &'a Device>,
    ) -> Self {
        let rollout_uid = rollout.metadata.uid.as_deref().unwrap_or_default();
        let canary_selectors: Vec<_> = rollout
            .spec
            .waves
            .iter()
            .filter_map(|w| w.canary_selector.as_ref())
            .collect();
        let empty = Default::default();
        let mut order: Vec<(bool, u64, &str)> = devices
            .into_iter()
            .filter(|d| eligible(d, rollout))
            .map(|d| {
                let labels = d.metadata.labels.as_ref().unwrap_or(&empty);
                let canary = canary_selectors
                    .iter()
                    .any(|s| selector::matches(s, labels));
                let uid = d.metadata.uid.as_deref().unwrap_or_default();
                (!canary, order_key(rollout_uid, uid), uid)
            })
            .collect();
        order.sort_unstable();
        let n = order.len();
        let mut cumulative = Vec::with_capacity(rollout.spec.waves.len());
        let mut previous = 0usize;
        for wave in &rollout.spec.waves {
            let target = match (wave.percent, wave.count) {
                (Some(p), _) => (usize::from(p) * n).div_ceil(100),
                (None, Some(c)) => usize::try_from(c).unwrap_or(usize::MAX),
                (None, None) => n,
            };
            let cum = target.min(n).max(previous);
            cumulative.push(cum);
            previous = cum;
        }
        let mut members = HashMap::with_capacity(n);
        let mut wave = 0usize;
        for (position, (_, _, uid)) in order.iter().enumerate() {
            while wave < cumulative.len() && position >= cumulative[wave] {
                wave += 1;
            }
            if wave == cumulative.len() {
                break;
            }
            members.insert(uid.to_string(), wave);
        }
        let mut planned = Vec::with_capacity(cumulative.len());
        let mut before = 0usize;
        for cum in cumulative {
            planned.push(u32::try_from(cum - before).unwrap_or(u32::MAX));
            before = cum;
        }
        Self {
            members,
            planned,
            eligible: u32::try_from(n).unwrap_or(u32::MAX),
        }
    }

    /// The 0-based wave of a device, if it is in one.
    pub fn wave_of(&self, device_uid: &str) -> Option<usize> {
        self.members.get(device_uid).copied()
    }
}

/// Whether offers may be made at `now`. No window means always. An unknown time zone keeps the
/// window closed (and the operator reports it).
pub fn window_open(window: Option<&MaintenanceWindow>, now: Timestamp) -> bool {
    let Some(w) = window else { return true };
    let Ok(tz) = TimeZone::get(&w.time_zone) else {
        return false;
    };
    let Some((hour, minute)) = w
        .start
        .split_once(':')
        .and_then(|(h, m)| Some((h.parse::<i8>().ok()?, m.parse::<i8>().ok()?)))
    else {
        return false;
    };
    let length = SignedDuration::try_from(w.duration.get()).unwrap_or(SignedDuration::ZERO);
    let local = now.to_zoned(tz);
    // The window that opened today or on one of the previous days may still be open.
    let max_days_back = length.as_secs() / 86_400 + 1;
    (0..=max_days_back).any(|days_back| {
        let Ok(day) = local.date().checked_sub(jiff::Span::new().days(days_back)) else {
            return false;
        };
        let weekday = match day.weekday() {
            jiff::civil::Weekday::Monday => Weekday::Mon,
            jiff::civil::Weekday::Tuesday => Weekday::Tue,
            jiff::civil::Weekday::Wednesday => Weekday::Wed,
            jiff::civil::Weekday::Thursday => Weekday::Thu,
            jiff::civil::Weekday::Friday => Weekday::Fri,
            jiff::civil::Weekday::Saturday => Weekday::Sat,
            jiff::civil::Weekday::Sunday => Weekday::Sun,
        };
        if !w.days.is_empty() && !w.days.contains(&weekday) {
            return false;
        }
        let Ok(opens) = day
            .at(hour, minute, 0, 0)
            .to_zoned(local.time_zone().clone())
        else {
            return false;
        };
        let opens = opens.timestamp();
        opens <= now && now < opens + length
    })
}

/// How far a device has got with a rollout's firmware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Not started (not offered yet, or offered and not yet taken up).
    Pending,
    InProgress,
    Succeeded,
    /// The device refused or failed; the message says why.
    Failed(String),
}

/// The firmware version the device last reported at check-in, if any.
pub fn reported_firmware(device: &Device) -> Option<&str> {
    device
        .status
        .as_ref()
        .and_then(|s| s.reported.as_ref())
        .and_then(|r| r.firmware_version.as_deref())
}

/// A device's progress with `manifest`, offered by the rollout named `rollout`.
pub fn progress(device: &Device, rollout: &str, manifest: &FirmwareManifest) -> Progress {
    if reported_firmware(device) == Some(manifest.version.as_str()) {
        return Progress::Succeeded;
    }
    match device.status.as_ref().and_then(|s| s.update.as_ref()) {
        Some(u) if u.rollout == rollout && u.version == manifest.version => match u.state {
            UpdateState::Failed => Progress::Failed(u.message.clone().unwrap_or_default()),
            UpdateState::Succeeded => Progress::Succeeded,
            UpdateState::Offered | UpdateState::Downloading | UpdateState::Installing => {
                Progress::InProgress
            }
        },
        _ => Progress::Pending,
    }
}

/// Whether firmware fixes what makes a device non-compliant on firmware grounds: it is below
/// the group's minimum (security) version and the firmware meets it.
pub fn is_remediation(device: &Device, group: &DeviceGroup, manifest: &FirmwareManifest) -> bool {
    let policy = &group.spec.firmware;
    let reported = device.status.as_ref().and_then(|s| s.reported.as_ref());
    let sv = reported.and_then(|r| r.security_version);
    let version = reported.and_then(|r| r.firmware_version.as_deref());
    let below_sv = policy
        .minimum_security_version
        .is_some_and(|min| sv.is_none_or(|v| v < min));
    let below_version = policy
        .minimum_version
        .as_deref()
        .is_some_and(|min| version.is_none_or(|v| compare_versions(v, min).is_lt()));
    let fixes_sv = policy
        .minimum_security_version
        .is_none_or(|min| manifest.security_version >= min);
    let fixes_version = policy
        .minimum_version
        .as_deref()
        .is_none_or(|min| !compare_versions(&manifest.version, min).is_lt());
    (below_sv || below_version) && fixes_sv && fixes_version
}

/// Number of waves that have started (the gateway offers to devices in those).
pub fn started_waves(rollout: &UpdateRollout) -> usize {
    rollout
        .status
        .as_ref()
        .map_or(0, |s| s.current_wave as usize)
}

/// What a device should be offered now by `rollout`, if anything: the rollout's firmware while
/// it progresses and the device's wave has started, or the rollback firmware after a failure
/// for a device that took the new firmware. `restricted` devices get remediation only.
pub fn offer<'r>(
    device: &Device,
    group: &DeviceGroup,
    rollout: &'r UpdateRollout,
    plan: &WavePlan,
    restricted: bool,
    now: Timestamp,
) -> Option<&'r FirmwareManifest> {
    let name = rollout.metadata.name.as_deref().unwrap_or_default();
    let spec = &rollout.spec;
    if !window_open(spec.maintenance_window.as_ref(), now) {
        return None;
    }
    let phase = rollout.status.as_ref().and_then(|s| s.phase);
    match phase {
        Some(RolloutPhase::Progressing) => {
            let wave = plan.wave_of(device.metadata.uid.as_deref()?)?;
            if wave >= started_waves(rollout) {
                return None;
            }
            if !matches!(
                progress(device, name, &spec.firmware),
                Progress::Pending | Progress::InProgress
            ) {
                return None;
            }
            if restricted && !is_remediation(device, group, &spec.firmware) {
                return None;
            }
            Some(&spec.firmware)
        }
        Some(RolloutPhase::RolledBack) => {
            let rollback = spec.rollback_firmware.as_ref()?;
            let on_new = reported_firmware(device) == Some(spec.firmware.version.as_str());
            if !on_new || matches!(progress(device, name, rollback), Progress::Failed(_)) {
                return None;
            }
            Some(rollback)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        device::{DeviceSpec, DeviceStatus, ReportedState, UpdateProgress},
        rollout::{UpdateRolloutSpec, UpdateRolloutStatus},
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn rollout(waves: serde_json::Value) -> UpdateRollout {
        let spec: UpdateRolloutSpec = serde_json::from_value(serde_json::json!({
            "target": {"groups": ["cell"]},
            "firmware": {"version": "4.2.0", "securityVersion": 12, "sha256": "ab".repeat(32), "sizeBytes": 10,
                "hardwareModels": ["m1"], "expires": "2027-01-01T00:00:00Z", "url": "https://x/fw",
                "signature": {"keyId": "k", "value": format!("{}==", "A".repeat(86))}},
            "waves": waves,
        }))
        .unwrap();
        let mut r = UpdateRollout::new("fw", spec);
        r.metadata.uid = Some("rollout-uid".into());
        r.metadata.namespace = Some("plant".into());
        r
    }

    fn device(i: usize, canary: bool) -> Device {
        let spec: DeviceSpec =
            serde_json::from_value(serde_json::json!({"group": "cell", "hardwareModel": "m1"}))
                .unwrap();
        let mut d = Device::new(&format!("d{i}"), spec);
        d.metadata.uid = Some(format!("uid-{i}"));
        d.metadata.namespace = Some("plant".into());
        if canary {
            d.metadata.labels = Some([("canary".to_string(), "true".to_string())].into());
        }
        d
    }

    fn fleet(n: usize) -> Vec<Device> {
        (0..n).map(|i| device(i, false)).collect()
    }

    #[test]
    fn waves_cover_the_first_ceil_of_each_cumulative_share() {
        let r = rollout(
            serde_json::json!([{"percent": 5}, {"percent": 20}, {"percent": 50}, {"percent": 100}]),
        );
        let devices = fleet(200);
        let plan = WavePlan::build(&r, &devices);
        assert_eq!(plan.eligible, 200);
        assert_eq!(plan.planned, [10, 30, 60, 100]);
        let mut per_wave = [0u32; 4];
        for d in &devices {
            per_wave[plan.wave_of(d.metadata.uid.as_deref().unwrap()).unwrap()] += 1;
        }
        assert_eq!(per_wave, [10, 30, 60, 100]);
        let odd = WavePlan::build(&r, &fleet(7));
        assert_eq!(
            odd.planned,
            [1, 1, 2, 3],
            "ceil(0.05*7)=1, ceil(0.2*7)=2, ceil(0.5*7)=4, 7"
        );
    }

    #[test]
    fn membership_is_stable_and_independent_of_listing_order() {
        let r = rollout(serde_json::json!([{"percent": 10}, {"percent": 100}]));
        let devices = fleet(50);
        let mut reversed = devices.clone();
        reversed.reverse();
        let (a, b) = (
            WavePlan::build(&r, &devices),
            WavePlan::build(&r, &reversed),
        );
        assert_eq!(a, b);
        let mut other = r.clone();
        other.metadata.uid = Some("another-rollout".into());
        assert_ne!(
            a,
            WavePlan::build(&other, &devices),
            "another rollout shuffles differently"
        );
    }

    #[test]
    fn canaries_go_first_and_counts_cap_at_the_population() {
        let r = rollout(serde_json::json!([
            {"count": 3, "canarySelector": {"matchLabels": {"canary": "true"}}},
            {"count": 1000}
        ]));
        let mut devices = fleet(20);
        devices.extend((20..23).map(|i| device(i, true)));
        let plan = WavePlan::build(&r, &devices);
        assert_eq!(plan.planned, [3, 20]);
        for i in 20..23 {
            assert_eq!(
                plan.wave_of(&format!("uid-{i}")),
                Some(0),
                "canary d{i} is in the first wave"
            );
        }
    }

    #[test]
    fn eligibility_excludes_other_groups_models_lifecycles_and_newer_security() {
        let r = rollout(serde_json::json!([{"percent": 100}]));
        assert!(eligible(&device(0, false), &r));
        let mut other_group = device(1, false);
        other_group.spec.group = "other".into();
        let mut other_model = device(2, false);
        other_model.spec.hardware_model = "m2".into();
        let mut quarantined = device(3, false);
        quarantined.spec.lifecycle = Lifecycle::Quarantined;
        let mut newer = device(4, false);
        newer.status = Some(DeviceStatus {
            reported: Some(ReportedState {
                security_version: Some(13),
                ..Default::default()
            }),
            ..Default::default()
        });
        for d in [other_group, other_model, quarantined, newer] {
            assert!(
                !eligible(&d, &r),
                "{:?} should not be eligible",
                d.metadata.name
            );
        }
    }

    #[test]
    fn progress_follows_what_the_device_reports() {
        let r = rollout(serde_json::json!([{"percent": 100}]));
        let mut d = device(0, false);
        assert_eq!(progress(&d, "fw", &r.spec.firmware), Progress::Pending);
        let update = |state| UpdateProgress {
            rollout: "fw".into(),
            version: "4.2.0".into(),
            state,
            progress_percent: None,
            message: Some("DigestMismatch: ...".into()),
            updated_at: Time(Timestamp::UNIX_EPOCH),
        };
        d.status = Some(DeviceStatus {
            update: Some(update(UpdateState::Downloading)),
            ..Default::default()
        });
        assert_eq!(progress(&d, "fw", &r.spec.firmware), Progress::InProgress);
        d.status.as_mut().unwrap().update = Some(update(UpdateState::Failed));
        assert_eq!(
            progress(&d, "fw", &r.spec.firmware),
            Progress::Failed("DigestMismatch: ...".into())
        );
        d.status.as_mut().unwrap().reported = Some(ReportedState {
            firmware_version: Some("4.2.0".into()),
            ..Default::default()
        });
        assert_eq!(progress(&d, "fw", &r.spec.firmware), Progress::Succeeded);
    }

    #[test]
    fn offers_follow_phase_wave_and_window() {
        let mut r = rollout(serde_json::json!([{"percent": 50}, {"percent": 100}]));
        let devices = fleet(10);
        let plan = WavePlan::build(&r, &devices);
        let group: DeviceGroup = DeviceGroup::new(
            "cell",
            serde_json::from_value(
                serde_json::json!({"certificates": {"issuerRef": {"name": "ca"}}}),
            )
            .unwrap(),
        );
        let now: Timestamp = "2026-11-25T12:00:00Z".parse().unwrap();
        let offered = |r: &UpdateRollout| {
            devices
                .iter()
                .filter(|d| offer(d, &group, r, &plan, false, now).is_some())
                .count()
        };
        assert_eq!(offered(&r), 0, "no offers before the rollout progresses");
        r.status = Some(UpdateRolloutStatus {
            phase: Some(RolloutPhase::Progressing),
            current_wave: 1,
            ..Default::default()
        });
        assert_eq!(offered(&r), 5, "only the first wave");
        r.status.as_mut().unwrap().current_wave = 2;
        assert_eq!(offered(&r), 10);
        r.status.as_mut().unwrap().phase = Some(RolloutPhase::Paused);
        assert_eq!(offered(&r), 0, "a paused rollout offers nothing");
        r.status.as_mut().unwrap().phase = Some(RolloutPhase::Progressing);
        r.spec.maintenance_window = serde_json::from_value(serde_json::json!({
            "days": ["Wed"], "start": "22:00", "duration": "4h", "timeZone": "Europe/Berlin"}))
        .unwrap();
        assert_eq!(
            offered(&r),
            0,
            "2026-11-25 13:00 in Berlin is outside Wed 22:00+4h"
        );
        assert!(
            devices
                .iter()
                .all(|d| offer(d, &group, &r, &plan, true, now).is_none()),
            "restricted devices get no regular firmware"
        );
    }

    #[test]
    fn maintenance_windows_respect_days_time_zones_and_midnight() {
        let w: MaintenanceWindow = serde_json::from_value(serde_json::json!({
            "days": ["Wed"], "start": "22:00", "duration": "4h", "timeZone": "Europe/Berlin"}))
        .unwrap();
        let at = |s: &str| window_open(Some(&w), s.parse().unwrap());
        // 2026-11-25 is a Wednesday; Berlin is UTC+1 in November.
        assert!(!at("2026-11-25T20:59:00Z"), "21:59 Berlin");
        assert!(at("2026-11-25T21:00:00Z"), "22:00 Berlin");
        assert!(
            at("2026-11-26T00:30:00Z"),
            "01:30 Thursday, still Wednesday's window"
        );
        assert!(!at("2026-11-26T01:00:00Z"), "02:00 Thursday: closed");
        assert!(
            !at("2026-11-26T21:30:00Z"),
            "Thursday 22:30: not a window day"
        );
        let bad: MaintenanceWindow = serde_json::from_value(serde_json::json!({
            "start": "22:00", "duration": "4h", "timeZone": "Mars/Olympus"}))
        .unwrap();
        assert!(!window_open(
            Some(&bad),
            "2026-11-25T21:30:00Z".parse().unwrap()
        ));
        assert!(window_open(None, Timestamp::UNIX_EPOCH));
    }
}
