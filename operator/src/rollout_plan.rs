//! What an UpdateRollout's status should be, decided from plain values: the rollout, the devices
//! of its target groups, those groups, whether an earlier rollout holds one of them, and the
//! time. Counts are recomputed from the devices every time (never accumulated), so an operator
//! restart resumes exactly where it was and nothing is counted twice; only wave start, completion
//! and soak instants are carried over from the stored status.

use std::time::Duration;

use crds::{
    Device, DeviceGroup, UpdateRollout,
    conditions::{Desired, types},
    firmware,
    rollout::{OnFailure, RolloutCounts, RolloutPhase, UpdateRolloutStatus, WaveStatus},
    waves::{self, Progress, WavePlan},
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

pub struct Inputs<'a> {
    pub rollout: &'a UpdateRollout,
    /// Devices of the target groups (eligibility is decided here).
    pub devices: Vec<&'a Device>,
    /// Target groups that exist.
    pub groups: Vec<&'a DeviceGroup>,
    /// An earlier active rollout sharing a target group, if any.
    pub blocked_by: Option<String>,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    /// 1-based wave the event is about; events of different waves are never merged.
    pub wave: Option<usize>,
    pub reason: &'static str,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Status without conditions; `conditions` are built by the caller (stable transitions).
    pub status: UpdateRolloutStatus,
    pub conditions: Vec<Desired<'static>>,
    pub events: Vec<PlannedEvent>,
    pub requeue_after: Option<Duration>,
}

/// Whether a phase stops offers for good.
pub fn terminal(phase: Option<RolloutPhase>) -> bool {
    matches!(
        phase,
        Some(RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::RolledBack)
    )
}

/// Whether a rollout holds its groups (other rollouts of those groups wait).
pub fn active(rollout: &UpdateRollout) -> bool {
    matches!(
        rollout.status.as_ref().and_then(|s| s.phase),
        Some(RolloutPhase::Progressing | RolloutPhase::Paused)
    )
}

fn secs_until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::from_secs(
        u64::try_from(at.as_second().saturating_sub(now.as_second()))
            .unwrap_or(0)
            .max(1),
    )
}

fn earliest(a: Option<Duration>, b: Duration) -> Option<Duration> {
    Some(a.map_or(b, |a| a.min(b)))
}

pub fn plan(inp: &Inputs<'_>) -> Plan {
    let r = inp.rollout;
    let spec = &r.spec;
    let name = r.metadata.name.as_deref().unwrap_or_default();
    let previous = r.status.clone().unwrap_or_default();
    let now = inp.now;
    let mut events = Vec::new();
    let mut requeue = None;

    // Counts, from the devices.
    let population = WavePlan::build(r, inp.devices.iter().copied());
    let mut waves: Vec<WaveStatus> = spec
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let before = previous.waves.get(i);
            WaveStatus {
                name: w.name.clone(),
                planned: population.planned.get(i).copied().unwrap_or(0),
                started_at: before.and_then(|b| b.started_at.clone()),
                completed_at: before.and_then(|b| b.completed_at.clone()),
                soak_until: before.and_then(|b| b.soak_until.clone()),
                ..WaveStatus::default()
            }
        })
        .collect();
    let mut current = (previous.current_wave as usize).min(spec.waves.len());
    let timeout =
        SignedDuration::try_from(spec.device_timeout.get()).unwrap_or(SignedDuration::MAX);
    // What a device runs is what it last reported. Its update record may still say it installed
    // the new firmware after it has gone back to the rollback firmware (the record is the last
    // update it reported, the report is every check-in).
    let mut on_new_firmware: u32 = 0;
    // Each device's wave and outcome, computed once; counts are tallied from these for whatever
    // waves have started (again after a wave starts in this pass).
    let outcomes: Vec<(usize, Progress)> = inp
        .devices
        .iter()
        .filter_map(|d| {
            let wave = population.wave_of(d.metadata.uid.as_deref()?)?;
            if waves::reported_firmware(d) == Some(spec.firmware.version.as_str()) {
                on_new_firmware = on_new_firmware.saturating_add(1);
            }
            Some((wave, waves::progress(d, name, &spec.firmware)))
        })
        .collect();
    let tally = |waves: &mut [WaveStatus], current: usize| -> Option<Duration> {
        let mut next_timeout = None;
        for w in waves.iter_mut() {
            (w.offered, w.in_progress, w.succeeded, w.failed) = (0, 0, 0, 0);
        }
        for (wave, outcome) in &outcomes {
            let w = &mut waves[*wave];
            let started = *wave < current;
            if started {
                w.offered += 1;
            }
            match outcome {
                Progress::Succeeded => w.succeeded += 1,
                Progress::Failed(_) => w.failed += 1,
                Progress::InProgress | Progress::Pending if started => {
                    match w.started_at.as_ref().map(|t| t.0 + timeout) {
                        Some(deadline) if now >= deadline => w.failed += 1,
                        deadline => {
                            if *outcome == Progress::InProgress {
                                w.in_progress += 1;
                            }
                            if let Some(d) = deadline {
                                next_timeout = earliest(next_timeout, secs_until(now, d));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        next_timeout
    };
    let totals_of = |waves: &[WaveStatus]| RolloutCounts {
        eligible: population.eligible,
        offered: waves.iter().map(|w| w.offered).sum(),
        in_progress: waves.iter().map(|w| w.in_progress).sum(),
        succeeded: waves.iter().map(|w| w.succeeded).sum(),
        failed: waves.iter().map(|w| w.failed).sum(),
    };
    tally(&mut waves, current);
    let totals = totals_of(&waves);

    // The phase.
    let mut phase = previous.phase.unwrap_or(RolloutPhase::Pending);
    let mut waiting: Option<(&'static str, String)> = None;
    let mut degraded: Option<(&'static str, String)> = None;
    let target_groups: Vec<&str> = spec.target.groups.iter().map(String::as_str).collect();
    let missing: Vec<&str> = target_groups
        .iter()
        .copied()
        .filter(|g| {
            !inp.groups
                .iter()
                .any(|x| x.metadata.name.as_deref() == Some(*g))
        })
        .collect();
    let bad_signature = inp
        .groups
        .iter()
        .find_map(|g| {
            firmware::verify(&spec.firmware, &g.spec.firmware.trusted_keys)
                .err()
                .map(|e| (g, e))
        })
        .or_else(|| {
            let rollback = spec.rollback_firmware.as_ref()?;
            inp.groups.iter().find_map(|g| {
                firmware::verify(rollback, &g.spec.firmware.trusted_keys)
                    .err()
                    .map(|e| (g, e))
            })
        });
    let fail = |phase: &mut RolloutPhase, events: &mut Vec<PlannedEvent>, why: String| {
        let rollback = spec.on_failure == OnFailure::Rollback && spec.rollback_firmware.is_some();
        *phase = if rollback {
            RolloutPhase::RolledBack
        } else {
            RolloutPhase::Failed
        };
        events.push(PlannedEvent {
            warning: true,
            wave: None,
            reason: if rollback { "RollingBack" } else { "Halted" },
            note: why,
        });
    };

    if terminal(Some(phase)) {
        // Nothing moves any more; counts keep being reported.
    } else if !missing.is_empty() {
        phase = RolloutPhase::Pending;
        degraded = Some((
            "GroupNotFound",
            format!("target DeviceGroups not found: {}", missing.join(", ")),
        ));
    } else if let Some((group, error)) = bad_signature {
        phase = RolloutPhase::Pending;
        degraded = Some((
            "InvalidSignature",
            format!(
                "DeviceGroup {}: {error}",
                group.metadata.name.as_deref().unwrap_or_default()
            ),
        ));
    } else if spec.abort {
        fail(&mut phase, &mut events, "aborted: spec.abort is set".into());
    } else if totals.offered > 0
        && u64::from(totals.failed) * 100
            > u64::from(spec.failure_threshold_percent) * u64::from(totals.offered)
    {
        fail(
            &mut phase,
            &mut events,
            format!(
                "{} of {} offered devices failed, above the {}% threshold",
                totals.failed, totals.offered, spec.failure_threshold_percent
            ),
        );
    } else if let Some(other) = &inp.blocked_by {
        phase = RolloutPhase::Pending;
        waiting = Some((
            "GroupBusy",
            format!("UpdateRollout {other} is active on a target group; this one starts after it"),
        ));
    } else if spec.paused {
        phase = RolloutPhase::Paused;
        waiting = Some(("Paused", "spec.paused is set: no new offers".into()));
    } else if population.eligible == 0 {
        // Never complete (let alone succeed) over nobody: wait for devices to become eligible.
        waiting = Some((
            "NoEligibleDevices",
            format!(
                "no Active device of {} (model {}) is eligible; check the target groups, selector and hardwareModels",
                target_groups.join(", "),
                spec.firmware.hardware_models.join(", ")
            ),
        ));
        requeue = earliest(requeue, Duration::from_secs(30));
    } else {
        phase = RolloutPhase::Progressing;
        let approved = spec.approved_waves as usize;
        loop {
            if current == 0 {
                if spec.waves.first().is_some_and(|w| w.requires_approval) && approved < 1 {
                    waiting = Some(("AwaitingApproval", "wave 1 needs approval: raise spec.approvedWaves (kubectl fleet rollout promote)".into()));
                    break;
                }
                current = 1;
                waves[0].started_at = Some(Time(now));
                tally(&mut waves, current);
                events.push(PlannedEvent {
                    warning: false,
                    wave: Some(1),
                    reason: "WaveStarted",
                    note: wave_note(&spec.waves, 0, &waves[0]),
                });
                continue;
            }
            let w = &mut waves[current - 1];
            let complete = u64::from(w.succeeded) * 100
                >= u64::from(spec.success_threshold_percent) * u64::from(w.planned);
            if !complete {
                break;
            }
            if w.completed_at.is_none() {
                w.completed_at = Some(Time(now));
                let soak = SignedDuration::try_from(spec.waves[current - 1].soak.get())
                    .unwrap_or_default();
                w.soak_until = Some(Time(now + soak));
                events.push(PlannedEvent {
                    warning: false,
                    wave: Some(current),
                    reason: "WaveCompleted",
                    note: format!(
                        "wave {current}: {} of {} devices succeeded",
                        w.succeeded, w.planned
                    ),
                });
            }
            let soak_until = w.soak_until.as_ref().map_or(now, |t| t.0);
            if now < soak_until {
                waiting = Some((
                    "Soaking",
                    format!("wave {current} soaks until {soak_until}"),
                ));
                requeue = earliest(requeue, secs_until(now, soak_until));
                break;
            }
            if current == spec.waves.len() {
                phase = RolloutPhase::Succeeded;
                events.push(PlannedEvent {
                    warning: false,
                    wave: None,
                    reason: "Succeeded",
                    note: format!(
                        "{} of {} devices run {}",
                        totals.succeeded, totals.eligible, spec.firmware.version
                    ),
                });
                break;
            }
            let next = current + 1;
            if spec.waves[next - 1].requires_approval && approved < next {
                waiting = Some((
                    "AwaitingApproval",
                    format!(
                        "wave {next} needs approval: raise spec.approvedWaves to {next} (kubectl fleet rollout promote)"
                    ),
                ));
                break;
            }
            current = next;
            waves[current - 1].started_at = Some(Time(now));
            tally(&mut waves, current);
            events.push(PlannedEvent {
                warning: false,
                wave: Some(current),
                reason: "WaveStarted",
                note: wave_note(&spec.waves, current - 1, &waves[current - 1]),
            });
        }
        if phase == RolloutPhase::Progressing
            && waiting.is_none()
            && !waves::window_open(spec.maintenance_window.as_ref(), now)
        {
            waiting = Some((
                "OutsideMaintenanceWindow",
                "offers resume when the maintenance window opens".into(),
            ));
            requeue = earliest(requeue, Duration::from_secs(60));
        }
    }

    if let Some(t) = tally(&mut waves, current) {
        requeue = earliest(requeue, t);
    }
    let totals = totals_of(&waves);

    if phase == RolloutPhase::RolledBack && degraded.is_none() {
        let remaining = on_new_firmware;
        degraded = Some((
            "RolledBack",
            if remaining == 0 {
                "the rollout failed; every device is off the new firmware".to_string()
            } else {
                format!(
                    "the rollout failed; {remaining} devices still run {} and are offered the rollback firmware",
                    spec.firmware.version
                )
            },
        ));
    } else if phase == RolloutPhase::Failed && degraded.is_none() {
        degraded = Some((
            "Halted",
            format!(
                "the rollout failed and halted: {} of {} offered devices failed",
                totals.failed, totals.offered
            ),
        ));
    }
    if previous.phase != Some(phase)
        && !matches!(
            phase,
            RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::RolledBack
        )
    {
        events.push(PlannedEvent {
            warning: false,
            wave: None,
            reason: "PhaseChanged",
            note: format!("phase {phase:?}"),
        });
    }

    let conditions = vec![
        Desired::new(
            types::READY,
            phase == RolloutPhase::Succeeded,
            match phase {
                RolloutPhase::Succeeded => "Succeeded",
                RolloutPhase::Failed | RolloutPhase::RolledBack => "Failed",
                _ => "InProgress",
            },
            format!(
                "{} of {} devices run {}",
                totals.succeeded, totals.eligible, spec.firmware.version
            ),
        ),
        Desired::new(
            types::PROGRESSING,
            phase == RolloutPhase::Progressing,
            if phase == RolloutPhase::Progressing {
                "WaveInProgress"
            } else {
                "NotProgressing"
            },
            format!("wave {current} of {}", spec.waves.len()),
        ),
        match &degraded {
            Some((reason, message)) => Desired::new(types::DEGRADED, true, reason, message.clone()),
            None => Desired::new(
                types::DEGRADED,
                false,
                "AsExpected",
                "nothing needs attention",
            ),
        },
        match &waiting {
            Some((reason, message)) => Desired::new(types::WAITING, true, reason, message.clone()),
            None => Desired::new(types::WAITING, false, "NotWaiting", "nothing to wait for"),
        },
    ];

    let started_at = previous
        .started_at
        .clone()
        .or_else(|| (current > 0).then_some(Time(now)));
    let completed_at = if terminal(Some(phase)) {
        previous.completed_at.clone().or(Some(Time(now)))
    } else {
        None
    };
    Plan {
        status: UpdateRolloutStatus {
            observed_generation: r.metadata.generation,
            phase: Some(phase),
            current_wave: u32::try_from(current).unwrap_or(u32::MAX),
            wave_count: u32::try_from(spec.waves.len()).unwrap_or(u32::MAX),
            conditions: Vec::new(),
            totals: Some(totals),
            waves,
            started_at,
            completed_at,
        },
        conditions,
        events,
        requeue_after: requeue,
    }
}

fn wave_note(spec: &[crds::rollout::Wave], index: usize, w: &WaveStatus) -> String {
    let name = spec[index]
        .name
        .clone()
        .unwrap_or_else(|| format!("{}", index + 1));
    format!("wave {} ({name}) started: {} devices", index + 1, w.planned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{
        device::{DeviceSpec, DeviceStatus, ReportedState, UpdateProgress, UpdateState},
        group::TrustedKey,
        rollout::{FirmwareManifest, FirmwareSignature, UpdateRolloutSpec},
    };
    use ed25519_dalek::SigningKey;

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn signed(version: &str, sv: i64) -> FirmwareManifest {
        let mut m = FirmwareManifest {
            version: version.into(),
            security_version: sv,
            sha256: "ab".repeat(32),
            size_bytes: 10,
            hardware_models: vec!["m1".into()],
            expires: Time("2027-06-01T00:00:00Z".parse().unwrap()),
            url: "https://fw.example/x".into(),
            signature: FirmwareSignature {
                key_id: String::new(),
                value: String::new(),
            },
        };
        firmware::sign(&mut m, "vendor", &key());
        m
    }

    fn group() -> DeviceGroup {
        let mut g = DeviceGroup::new(
            "cell",
            serde_json::from_value(
                serde_json::json!({"certificates": {"issuerRef": {"name": "ca"}}}),
            )
            .unwrap(),
        );
        g.spec.firmware.trusted_keys = vec![TrustedKey {
            key_id: "vendor".into(),
            public_key: firmware::public_key_base64(&key().verifying_key()),
        }];
        g
    }

    fn rollout(waves: serde_json::Value, extra: serde_json::Value) -> UpdateRollout {
        let mut spec = serde_json::json!({
            "target": {"groups": ["cell"]},
            "firmware": signed("4.2.0", 12),
            "waves": waves,
        });
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let spec: UpdateRolloutSpec = serde_json::from_value(spec).unwrap();
        let mut r = UpdateRollout::new("fw", spec);
        r.metadata.uid = Some("r-uid".into());
        r.metadata.namespace = Some("plant".into());
        r.metadata.generation = Some(1);
        r
    }

    fn fleet(n: usize) -> Vec<Device> {
        (0..n)
            .map(|i| {
                let spec: DeviceSpec = serde_json::from_value(
                    serde_json::json!({"group": "cell", "hardwareModel": "m1"}),
                )
                .unwrap();
                let mut d = Device::new(&format!("d{i}"), spec);
                d.metadata.uid = Some(format!("uid-{i}"));
                d.metadata.namespace = Some("plant".into());
                d.status = Some(DeviceStatus {
                    reported: Some(ReportedState {
                        firmware_version: Some("4.1.3".into()),
                        security_version: Some(12),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
                d
            })
            .collect()
    }

    /// Devices in the first `waves` waves report `outcome` for the rollout's firmware.
    fn settle(devices: &mut [Device], r: &UpdateRollout, waves: usize, failing: usize) {
        let plan = WavePlan::build(r, devices.iter());
        let mut failed = 0;
        for d in devices.iter_mut() {
            if plan
                .wave_of(d.metadata.uid.as_deref().unwrap())
                .is_some_and(|w| w < waves)
            {
                let status = d.status.get_or_insert_with(Default::default);
                if failed < failing {
                    failed += 1;
                    status.update = Some(UpdateProgress {
                        rollout: "fw".into(),
                        version: "4.2.0".into(),
                        state: UpdateState::Failed,
                        progress_percent: None,
                        message: Some("DigestMismatch".into()),
                        updated_at: Time(now()),
                    });
                } else {
                    status.reported.as_mut().unwrap().firmware_version = Some("4.2.0".into());
                }
            }
        }
    }

    fn step(r: &mut UpdateRollout, devices: &[Device], g: &DeviceGroup, at: Timestamp) -> Plan {
        let p = plan(&Inputs {
            rollout: r,
            devices: devices.iter().collect(),
            groups: vec![g],
            blocked_by: None,
            now: at,
        });
        r.status = Some(p.status.clone());
        p
    }

    fn reason_of(p: &Plan, type_: &str) -> (bool, &'static str) {
        let c = p.conditions.iter().find(|c| c.type_ == type_).unwrap();
        (c.status, c.reason)
    }

    #[test]
    fn a_rollout_over_nobody_waits_instead_of_succeeding() {
        let g = group();
        let mut r = rollout(
            serde_json::json!([{"percent": 50}, {"percent": 100}]),
            serde_json::json!({}),
        );
        let p = step(&mut r, &[], &g, now());
        assert_eq!(p.status.phase, Some(RolloutPhase::Pending));
        assert_eq!(p.status.current_wave, 0);
        assert_eq!(reason_of(&p, "Waiting"), (true, "NoEligibleDevices"));
        // Mid-rollout, an empty device list (say, a cache that has not filled) stops nothing
        // from being counted as done either.
        let mut devices = fleet(20);
        step(&mut r, &devices, &g, now());
        settle(&mut devices, &r, 1, 0);
        let p = step(&mut r, &devices, &g, now());
        assert_eq!(
            (p.status.phase, p.status.current_wave),
            (Some(RolloutPhase::Progressing), 2)
        );
        let p = step(&mut r, &[], &g, now());
        assert_eq!(
            (p.status.phase, p.status.current_wave),
            (Some(RolloutPhase::Progressing), 2)
        );
    }

    #[test]
    fn a_rollout_advances_wave_by_wave_through_soak_and_approval_to_success() {
        let g = group();
        let mut devices = fleet(200);
        let mut r = rollout(
            serde_json::json!([{"percent": 5}, {"percent": 20, "soak": "10m"}, {"percent": 50, "requiresApproval": true}, {"percent": 100}]),
            serde_json::json!({"approvedWaves": 2}),
        );
        let p = step(&mut r, &devices, &g, now());
        assert_eq!(
            (p.status.phase, p.status.current_wave),
            (Some(RolloutPhase::Progressing), 1)
        );
        assert_eq!(
            p.status.waves.iter().map(|w| w.planned).collect::<Vec<_>>(),
            [10, 30, 60, 100]
        );
        assert_eq!(
            p.events
                .iter()
                .filter(|e| e.reason == "WaveStarted")
                .count(),
            1
        );

        settle(&mut devices, &r, 1, 0);
        let p = step(&mut r, &devices, &g, now());
        assert_eq!(
            p.status.current_wave, 2,
            "wave 1 complete, no soak: wave 2 starts"
        );
        settle(&mut devices, &r, 2, 0);
        let p = step(&mut r, &devices, &g, now());
        assert_eq!(reason_of(&p, "Waiting"), (true, "Soaking"));
        assert_eq!(p.requeue_after, Some(Duration::from_secs(600)));
        let p = step(&mut r, &devices, &g, now() + SignedDuration::from_mins(10));
        assert_eq!(
            (p.status.current_wave, reason_of(&p, "Waiting")),
            (2, (true, "AwaitingApproval"))
        );

        r.spec.approved_waves = 3;
        let p = step(&mut r, &devices, &g, now() + SignedDuration::from_mins(11));
        assert_eq!(p.status.current_wave, 3);
        settle(&mut devices, &r, 4, 0);
        let p = step(&mut r, &devices, &g, now() + SignedDuration::from_mins(12));
        assert_eq!(p.status.phase, Some(RolloutPhase::Succeeded));
        assert_eq!(p.status.totals.as_ref().unwrap().succeeded, 200);
        assert!(reason_of(&p, "Ready").0);
        // Terminal: another pass changes nothing.
        let again = step(&mut r, &devices, &g, now() + SignedDuration::from_mins(13));
        assert_eq!(again.status, p.status);
        assert!(again.events.is_empty());
    }

    #[test]
    fn failures_above_the_threshold_halt_or_roll_back() {
        let g = group();
        for (extra, expected) in [
            (serde_json::json!({}), RolloutPhase::Failed),
            (
                serde_json::json!({"onFailure": "Rollback", "rollbackFirmware": signed("4.1.3", 12)}),
                RolloutPhase::RolledBack,
            ),
        ] {
            let mut devices = fleet(200);
            let mut r = rollout(serde_json::json!([{"percent": 5}, {"percent": 100}]), extra);
            step(&mut r, &devices, &g, now());
            settle(&mut devices, &r, 1, 3); // 3 of 10 canaries fail: 30% > 10%
            let p = step(&mut r, &devices, &g, now());
            assert_eq!(p.status.phase, Some(expected));
            assert_eq!(p.status.current_wave, 1, "halted in wave 1");
            assert!(reason_of(&p, "Degraded").0);
            assert_eq!(p.status.totals.as_ref().unwrap().failed, 3);
        }
    }

    #[test]
    fn a_rolled_back_device_is_off_the_new_firmware_by_its_report() {
        let g = group();
        let mut devices = fleet(200);
        let mut r = rollout(
            serde_json::json!([{"percent": 5}, {"percent": 100}]),
            serde_json::json!({"onFailure": "Rollback", "rollbackFirmware": signed("4.1.3", 12)}),
        );
        step(&mut r, &devices, &g, now());
        settle(&mut devices, &r, 1, 3); // 7 canaries take 4.2.0, 3 fail: rolled back
        let p = step(&mut r, &devices, &g, now());
        assert_eq!(p.status.phase, Some(RolloutPhase::RolledBack));
        let degraded = |p: &Plan| {
            p.conditions
                .iter()
                .find(|c| c.type_ == "Degraded")
                .map(|c| c.message.clone())
                .unwrap_or_default()
        };
        assert!(
            degraded(&p).contains("7 devices still run 4.2.0"),
            "{}",
            degraded(&p)
        );
        // They go back to 4.1.3; their update records still say they installed 4.2.0.
        for d in devices.iter_mut() {
            let status = d.status.as_mut().unwrap();
            if status
                .reported
                .as_ref()
                .unwrap()
                .firmware_version
                .as_deref()
                == Some("4.2.0")
            {
                status.update = Some(UpdateProgress {
                    rollout: "fw".into(),
                    version: "4.2.0".into(),
                    state: UpdateState::Succeeded,
                    progress_percent: None,
                    message: None,
                    updated_at: Time(now()),
                });
                status.reported.as_mut().unwrap().firmware_version = Some("4.1.3".into());
            }
        }
        let p = step(&mut r, &devices, &g, now());
        assert!(
            degraded(&p).contains("every device is off the new firmware"),
            "{}",
            degraded(&p)
        );
    }

    #[test]
    fn devices_that_time_out_count_as_failed() {
        let g = group();
        let devices = fleet(20);
        let mut r = rollout(
            serde_json::json!([{"percent": 100}]),
            serde_json::json!({"deviceTimeout": "30m"}),
        );
        let p = step(&mut r, &devices, &g, now());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(1800)));
        let p = step(&mut r, &devices, &g, now() + SignedDuration::from_mins(31));
        assert_eq!(p.status.totals.as_ref().unwrap().failed, 20);
        assert_eq!(p.status.phase, Some(RolloutPhase::Failed));
    }

    #[test]
    fn a_restart_recomputes_the_same_counts() {
        let g = group();
        let mut devices = fleet(100);
        let mut r = rollout(
            serde_json::json!([{"percent": 50}, {"percent": 100}]),
            serde_json::json!({}),
        );
        step(&mut r, &devices, &g, now());
        settle(&mut devices, &r, 1, 0);
        let first = step(&mut r, &devices, &g, now());
        // A new operator process sees the stored status and the same devices.
        let again = plan(&Inputs {
            rollout: &r,
            devices: devices.iter().collect(),
            groups: vec![&g],
            blocked_by: None,
            now: now(),
        });
        assert_eq!(again.status, first.status, "no double counting");
        assert!(again.events.is_empty());
    }

    #[test]
    fn blocked_paused_unsigned_and_aborted_rollouts() {
        let g = group();
        let devices = fleet(10);
        let r = rollout(serde_json::json!([{"percent": 100}]), serde_json::json!({}));
        let blocked = plan(&Inputs {
            rollout: &r,
            devices: devices.iter().collect(),
            groups: vec![&g],
            blocked_by: Some("older".into()),
            now: now(),
        });
        assert_eq!(
            (blocked.status.phase, reason_of(&blocked, "Waiting")),
            (Some(RolloutPhase::Pending), (true, "GroupBusy"))
        );

        let mut paused = r.clone();
        paused.spec.paused = true;
        let p = plan(&Inputs {
            rollout: &paused,
            devices: devices.iter().collect(),
            groups: vec![&g],
            blocked_by: None,
            now: now(),
        });
        assert_eq!(p.status.phase, Some(RolloutPhase::Paused));

        let mut tampered = r.clone();
        tampered.spec.firmware.size_bytes += 1;
        let p = plan(&Inputs {
            rollout: &tampered,
            devices: devices.iter().collect(),
            groups: vec![&g],
            blocked_by: None,
            now: now(),
        });
        assert_eq!(
            (p.status.phase, reason_of(&p, "Degraded")),
            (Some(RolloutPhase::Pending), (true, "InvalidSignature"))
        );

        let mut aborted = r.clone();
        aborted.spec.abort = true;
        let p = plan(&Inputs {
            rollout: &aborted,
            devices: devices.iter().collect(),
            groups: vec![&g],
            blocked_by: None,
            now: now(),
        });
        assert_eq!(p.status.phase, Some(RolloutPhase::Failed));

        let p = plan(&Inputs {
            rollout: &r,
            devices: devices.iter().collect(),
            groups: vec![],
            blocked_by: None,
            now: now(),
        });
        assert_eq!(reason_of(&p, "Degraded"), (true, "GroupNotFound"));
    }
}
