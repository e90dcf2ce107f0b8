//! The Device status fields the gateway owns (`enrollment`, `reported`, `lastSeen`, `update`)
//! and when they are written. Steady heartbeats must not become etcd writes: a check-in writes
//! only when what the device reports changed, or when `lastSeen` is older than its refresh
//! interval (`Heartbeat`). Every write is a server-side apply of all four fields under the
//! `fleetwarden-gateway` field manager (applying fewer would delete the others).
//!
//! Writes for one device are serialised, and the last written value stands in for the watch
//! cache until the cache shows it, so back-to-back requests neither undo each other nor repeat a
//! write: while the cache still shows the version the write was computed from, or has moved only
//! by other writers' changes (the operator's) with the gateway's fields as they were. Once the
//! cache shows our write, or another gateway replica's write of these fields, it is trusted again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crds::{
    Device,
    device::{DeviceStatus, EnrollmentStatus, ReportedState, UpdateProgress},
    group::DeviceGroupSpec,
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use serde::Serialize;

use crate::metrics::Metrics;

pub const FIELD_MANAGER: &str = "fleetwarden-gateway";

/// How long a remembered write stands in for the cache at most.
const MEMO_TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Owned {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<EnrollmentStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported: Option<ReportedState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateProgress>,
}

impl Owned {
    pub fn of(status: Option<&DeviceStatus>) -> Self {
        let Some(s) = status else {
            return Self::default();
        };
        Self {
            enrollment: s.enrollment.clone(),
            reported: s.reported.clone(),
            last_seen: s.last_seen.clone(),
            update: s.update.clone(),
        }
    }

    fn seen_within(&self, now: Timestamp, interval: Duration) -> bool {
        self.last_seen.as_ref().is_some_and(|t| {
            now.duration_since(t.0)
                .try_into()
                .is_ok_and(|elapsed: Duration| elapsed < interval)
        })
    }
}

/// How often an unchanged device's `lastSeen` is refreshed. `lastSeen` only has to be fresh
/// enough for the group's `maxOffline` judgement (online/offline, the Offline compliance
/// failure), so a device that checks in often need not write each time its refresh is due:
///
///   refresh = min(max(minimum, check_ins x the group's checkInInterval), maxOffline / 4)
///
/// so steady check-ins cost at most one write per `check_ins` of them, while a device that
/// stops checking in is still judged Offline no more than a quarter of `maxOffline` late.
/// `check_ins = 0` refreshes every `minimum`.
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat {
    pub minimum: Duration,
    pub check_ins: u32,
}

impl Heartbeat {
    pub fn refresh(&self, group: Option<&DeviceGroupSpec>) -> Duration {
        let Some(group) = group else {
            return self.minimum;
        };
        let budget = group.check_in_interval.get().saturating_mul(self.check_ins);
        self.minimum
            .max(budget)
            .min(group.compliance.max_offline.get() / 4)
    }
}

/// What a check-in changes, if anything.
pub fn after_checkin(
    current: &Owned,
    reported: &ReportedState,
    now: Timestamp,
    interval: Duration,
) -> Option<Owned> {
    let changed = current.reported.as_ref() != Some(reported);
    if !changed && current.seen_within(now, interval) {
        return None;
    }
    Some(Owned {
        reported: Some(reported.clone()),
        last_seen: Some(Time(now)),
        ..current.clone()
    })
}

/// What an enrollment request changes: a new CSR is recorded, a repeated one (the device
/// polling for its certificate) is not.
pub fn after_enroll(current: &Owned, enrollment: EnrollmentStatus) -> Option<Owned> {
    let same = current
        .enrollment
        .as_ref()
        .is_some_and(|e| e.csr_sha256 == enrollment.csr_sha256 && e.method == enrollment.method);
    if same {
        return None;
    }
    Some(Owned {
        enrollment: Some(enrollment),
        ..current.clone()
    })
}

/// What an update-progress report changes (the timestamp alone is not a change).
pub fn after_update(
    current: &Owned,
    update: &UpdateProgress,
    now: Timestamp,
    interval: Duration,
) -> Option<Owned> {
    let same = current.update.as_ref().is_some_and(|u| {
        u.rollout == update.rollout
            && u.version == update.version
            && u.state == update.state
            && u.progress_percent == update.progress_percent
            && u.message == update.message
    });
    if same && current.seen_within(now, interval) {
        return None;
    }
    Some(Owned {
        update: Some(if same {
            current.update.clone().unwrap_or_else(|| update.clone())
        } else {
            update.clone()
        }),
        last_seen: Some(Time(now)),
        ..current.clone()
    })
}

/// The gateway's last status write for a device.
#[derive(Clone, Debug)]
struct Memo {
    /// The resourceVersion of the cached Device it was computed from.
    from: Option<String>,
    /// The gateway's fields as they were in that Device.
    base: Owned,
    written: Owned,
    at: Instant,
}

impl Memo {
    /// Whether the write still stands in for the cache, which has not shown it yet: the cache is
    /// still at the version the write was computed from, or it has moved only by other writers'
    /// changes (the operator's finalizer or status) and shows the gateway's fields as they were.
    /// Once the cache shows this write, or another replica's write of these fields, the cache
    /// is trusted again.
    fn stands_in(&self, cached_rv: &Option<String>, cached: &Owned, now: Instant) -> bool {
        now.saturating_duration_since(self.at) < MEMO_TTL
            && (self.from == *cached_rv || *cached == self.base)
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Memo>>>;

/// Serialises and remembers the gateway's status writes, per device.
#[derive(Clone)]
pub struct Writer {
    client: Client,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
#[error("writing the status of device {device}: {source}")]
pub struct WriteError {
    device: String,
    #[source]
    source: kube::Error,
}

impl Writer {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            slots: Arc::default(),
            metrics,
        }
    }

    fn slot(&self, uid: &str) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(uid.to_string()).or_default().clone()
    }

    /// The freshest view of the fields the gateway owns: our own last write while the cache has
    /// not shown it yet, else the cache.
    pub async fn freshest(&self, device: &Device) -> Owned {
        let slot = self.slot(&device.uid().unwrap_or_default());
        let memo = slot.lock().await;
        let cached = Owned::of(device.status.as_ref());
        match memo.as_ref() {
            Some(m) if m.stands_in(&device.resource_version(), &cached, Instant::now()) => {
                m.written.clone()
            }
            _ => cached,
        }
    }

    /// Computes the change from the freshest view of the device (the cache, or our own last
    /// write if the cache has not shown it yet) and applies it. Returns whether it wrote.
    pub async fn update(
        &self,
        device: &Device,
        kind: &'static str,
        change: impl FnOnce(&Owned) -> Option<Owned>,
    ) -> Result<bool, WriteError> {
        let uid = device.uid().unwrap_or_default();
        let slot = self.slot(&uid);
        let mut memo = slot.lock().await;
        let cached = Owned::of(device.status.as_ref());
        let rv = device.resource_version();
        let current = match memo.as_ref() {
            Some(m) if m.stands_in(&rv, &cached, Instant::now()) => m.written.clone(),
            _ => {
                // The cache has caught up (or the memo is old): drop the copy.
                *memo = None;
                cached.clone()
            }
        };
        let Some(next) = change(&current) else {
            return Ok(false);
        };
        let body = serde_json::json!({
            "apiVersion": "fleetwarden.io/v1alpha1",
            "kind": "Device",
            "status": next,
        });
        let ns = device.namespace().unwrap_or_default();
        let api: Api<Device> = Api::namespaced(self.client.clone(), &ns);
        self.metrics.status_write(kind);
        api.patch_status(
            &device.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| WriteError {
            device: format!("{ns}/{}", device.name_any()),
            source,
        })?;
        *memo = Some(Memo {
            from: rv,
            base: cached,
            written: next,
            at: Instant::now(),
        });
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::device::{BootSlot, EnrollmentMethod, UpdateState};

    const FIVE_MIN: Duration = Duration::from_secs(300);

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn reported(fw: &str) -> ReportedState {
        ReportedState {
            firmware_version: Some(fw.into()),
            security_version: Some(12),
            boot_slot: Some(BootSlot::A),
            ..ReportedState::default()
        }
    }

    fn group(check_in: &str, max_offline: &str) -> DeviceGroupSpec {
        serde_json::from_value(serde_json::json!({
            "certificates": {"issuerRef": {"name": "ca"}, "trustDomain": "fleet.example"},
            "checkInInterval": check_in,
            "compliance": {"maxOffline": max_offline},
        }))
        .unwrap()
    }

    #[test]
    fn a_write_stands_in_for_the_cache_until_the_cache_shows_it_or_another_replicas() {
        let t0 = Instant::now();
        let base = Owned::default();
        let enrollment = EnrollmentStatus {
            csr: "csr".into(),
            csr_sha256: "ab".repeat(32),
            method: EnrollmentMethod::Token,
            requested_at: Time(t("2026-01-01T00:00:00Z")),
        };
        let written = after_enroll(&base, enrollment).unwrap();
        let memo = Memo {
            from: Some("10".into()),
            base: base.clone(),
            written: written.clone(),
            at: t0,
        };
        let rv = |v: &str| Some(v.to_string());
        // The cache still shows the Device the write was computed from.
        assert!(memo.stands_in(&rv("10"), &base, t0));
        // The operator wrote meanwhile (its event arrived first): the gateway's fields are
        // unchanged, so the write has not arrived yet and still stands in.
        assert!(memo.stands_in(&rv("11"), &base, t0));
        // The cache shows the write: trusted again.
        assert!(!memo.stands_in(&rv("12"), &written, t0));
        // Another replica wrote the gateway's fields: its write is newer, trusted.
        let other = after_checkin(
            &base,
            &reported("1.0.0"),
            t("2026-01-01T00:00:01Z"),
            FIVE_MIN,
        )
        .unwrap();
        assert!(!memo.stands_in(&rv("13"), &other, t0));
        // A memo never outlives its TTL.
        assert!(!memo.stands_in(&rv("10"), &base, t0 + MEMO_TTL));
    }

    #[test]
    fn the_refresh_interval_follows_the_check_in_budget_within_max_offline() {
        let h = Heartbeat {
            minimum: FIVE_MIN,
            check_ins: 120,
        };
        let mins = |m: u64| Duration::from_secs(m * 60);
        // No group: the minimum.
        assert_eq!(h.refresh(None), FIVE_MIN);
        // Every 5 s: one write per 120 check-ins, 10 minutes.
        assert_eq!(h.refresh(Some(&group("5s", "24h"))), mins(10));
        // Every second: the minimum still holds.
        assert_eq!(h.refresh(Some(&group("1s", "24h"))), FIVE_MIN);
        // Every 5 minutes: 10 hours would be too late for maxOffline 24h; a quarter of it.
        assert_eq!(h.refresh(Some(&group("5m", "24h"))), mins(6 * 60));
        // A tight maxOffline wins over both.
        assert_eq!(h.refresh(Some(&group("5s", "8m"))), mins(2));
        // check_ins 0: every minimum, within maxOffline.
        let fixed = Heartbeat {
            minimum: Duration::from_secs(4),
            check_ins: 0,
        };
        assert_eq!(
            fixed.refresh(Some(&group("5m", "24h"))),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn steady_heartbeats_write_only_once_per_interval() {
        let first = after_checkin(
            &Owned::default(),
            &reported("4.1.3"),
            t("2026-11-25T12:00:00Z"),
            FIVE_MIN,
        )
        .expect("the first check-in records what the device reports");
        // Same report within the interval: nothing to write.
        for secs in [1, 60, 299] {
            let now = t("2026-11-25T12:00:00Z") + jiff::SignedDuration::from_secs(secs);
            assert_eq!(
                after_checkin(&first, &reported("4.1.3"), now, FIVE_MIN),
                None,
                "{secs}s"
            );
        }
        // After the interval, lastSeen is refreshed.
        let later = after_checkin(
            &first,
            &reported("4.1.3"),
            t("2026-11-25T12:05:00Z"),
            FIVE_MIN,
        )
        .unwrap();
        assert_eq!(later.last_seen, Some(Time(t("2026-11-25T12:05:00Z"))));
        assert_eq!(later.reported, first.reported);
    }

    #[test]
    fn a_changed_report_is_written_at_once() {
        let first = after_checkin(
            &Owned::default(),
            &reported("4.1.3"),
            t("2026-11-25T12:00:00Z"),
            FIVE_MIN,
        )
        .unwrap();
        let next = after_checkin(
            &first,
            &reported("4.2.0"),
            t("2026-11-25T12:00:01Z"),
            FIVE_MIN,
        )
        .unwrap();
        assert_eq!(
            next.reported.unwrap().firmware_version.as_deref(),
            Some("4.2.0")
        );
    }

    #[test]
    fn every_write_carries_all_gateway_fields() {
        let enrollment = EnrollmentStatus {
            csr: "csr".into(),
            csr_sha256: "ab".repeat(32),
            method: EnrollmentMethod::Token,
            requested_at: Time(t("2026-11-25T11:00:00Z")),
        };
        let enrolled = after_enroll(&Owned::default(), enrollment.clone()).unwrap();
        let checked_in = after_checkin(
            &enrolled,
            &reported("4.1.3"),
            t("2026-11-25T12:00:00Z"),
            FIVE_MIN,
        )
        .unwrap();
        assert_eq!(
            checked_in.enrollment,
            Some(enrollment.clone()),
            "a check-in must not drop the enrollment"
        );
        // Polling with the same CSR is not a change.
        assert_eq!(after_enroll(&checked_in, enrollment), None);
    }

    #[test]
    fn update_reports_write_on_progress_not_on_repetition() {
        let now = t("2026-11-25T12:00:00Z");
        let base = after_checkin(&Owned::default(), &reported("4.1.3"), now, FIVE_MIN).unwrap();
        let progress = |pct| UpdateProgress {
            rollout: "r".into(),
            version: "4.2.0".into(),
            state: UpdateState::Downloading,
            progress_percent: Some(pct),
            message: None,
            updated_at: Time(now),
        };
        let a = after_update(&base, &progress(10), now, FIVE_MIN).unwrap();
        assert_eq!(
            after_update(
                &a,
                &progress(10),
                now + jiff::SignedDuration::from_secs(5),
                FIVE_MIN
            ),
            None
        );
        assert!(after_update(&a, &progress(50), now, FIVE_MIN).is_some());
    }
}
