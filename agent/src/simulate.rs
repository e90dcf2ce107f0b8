//! Many virtual devices in one process, sharing one runtime: each generates its own key, enrolls
//! with its own token, and checks in over its own mutual-TLS connection, exactly as a real agent
//! would. Used for demos, end-to-end tests and benchmarks; prints what it measured.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crds::wire::ReportedState;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::{
    backoff::Backoff,
    client::Endpoint,
    device::{Credential, Device, Name, Storage},
    firmware::{Installed, Target, Updater},
};
use crds::{
    device::BootSlot,
    wire::{FirmwareOffer, UpdateReport},
};

/// One virtual device, as the provisioning step hands them out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimDevice {
    pub namespace: String,
    pub name: String,
    pub token: String,
    /// This device fails every firmware install (after verifying and downloading it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_updates: bool,
}

#[derive(Clone)]
pub struct Plan {
    pub endpoint: Endpoint,
    pub trust_domain: String,
    pub devices: Vec<SimDevice>,
    /// How long each device keeps checking in after it enrolled.
    pub duration: Duration,
    /// Overrides the interval the gateway asks for.
    pub check_in_interval: Option<Duration>,
    /// Enrollments in flight at once.
    pub enroll_concurrency: usize,
    /// Probability that a check-in reports something new (a different agent version).
    pub report_change_rate: f64,
    pub firmware_version: String,
    pub security_version: i64,
    pub location: Option<String>,
    pub progress: bool,
    /// How devices take firmware offers.
    pub updater: Arc<crate::firmware::Updater>,
    /// Ends the run early (SIGTERM); the report covers what happened until then.
    pub stop: tokio_util::sync::CancellationToken,
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub devices: usize,
    pub enrolled: usize,
    pub enroll_p50_ms: f64,
    pub enroll_p99_ms: f64,
    pub enroll_errors: BTreeMap<String, usize>,
    pub checkins: usize,
    pub checkin_errors: BTreeMap<String, usize>,
    pub checkin_p50_ms: f64,
    pub checkin_p99_ms: f64,
    /// Check-ins per second over the check-in phase (first to last check-in).
    pub checkins_per_second: f64,
    pub restricted_answers: usize,
    /// Firmware installed, by version.
    pub updates_installed: BTreeMap<String, usize>,
    /// Firmware refused or failed, by reason.
    pub updates_failed: BTreeMap<String, usize>,
    pub wall_seconds: f64,
}

#[derive(Default)]
struct Tally {
    enrolled: usize,
    enroll_ms: Vec<f64>,
    enroll_errors: BTreeMap<String, usize>,
    checkin_ms: Vec<f64>,
    checkin_errors: BTreeMap<String, usize>,
    restricted: usize,
    updates_installed: BTreeMap<String, usize>,
    updates_failed: BTreeMap<String, usize>,
    first_checkin: Option<Instant>,
    last_checkin: Option<Instant>,
}

/// A tiny deterministic generator per device (no shared RNG, no extra dependency).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let i = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[i.min(values.len() - 1)]
}

pub async fn run(plan: Plan) -> Report {
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let enroll_slots = Arc::new(Semaphore::new(plan.enroll_concurrency.max(1)));
    let plan = Arc::new(plan);
    let progress = plan.progress.then(|| {
        let tally = tally.clone();
        let total = plan.devices.len();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if let Ok(t) = tally.lock() {
                    let errors: usize = t
                        .enroll_errors
                        .values()
                        .chain(t.checkin_errors.values())
                        .sum();
                    eprintln!(
                        "simulate: {}/{total} enrolled, {} check-ins, {errors} errors, {:.0}s",
                        t.enrolled,
                        t.checkin_ms.len(),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        })
    });

    let mut tasks = Vec::with_capacity(plan.devices.len());
    for (index, sim) in plan.devices.iter().cloned().enumerate() {
        let (plan, tally, slots) = (plan.clone(), tally.clone(), enroll_slots.clone());
        tasks.push(tokio::spawn(async move {
            simulate_one(index, sim, &plan, &tally, &slots).await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    if let Some(p) = progress {
        p.abort();
    }

    let mut t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    let phase = match (t.first_checkin, t.last_checkin) {
        (Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    Report {
        devices: plan.devices.len(),
        enrolled: t.enrolled,
        enroll_p50_ms: percentile(&mut t.enroll_ms, 0.50),
        enroll_p99_ms: percentile(&mut t.enroll_ms, 0.99),
        enroll_errors: t.enroll_errors,
        checkins: t.checkin_ms.len(),
        checkin_errors: t.checkin_errors,
        checkin_p50_ms: percentile(&mut t.checkin_ms, 0.50),
        checkin_p99_ms: percentile(&mut t.checkin_ms, 0.99),
        checkins_per_second: if phase > 0.0 {
            t.checkin_ms.len() as f64 / phase
        } else {
            0.0
        },
        restricted_answers: t.restricted,
        updates_installed: t.updates_installed,
        updates_failed: t.updates_failed,
        wall_seconds: started.elapsed().as_secs_f64(),
    }
}

async fn simulate_one(
    index: usize,
    sim: SimDevice,
    plan: &Plan,
    tally: &Mutex<Tally>,
    slots: &Semaphore,
) {
    let bump =
        |map: &mut BTreeMap<String, usize>, reason: String| *map.entry(reason).or_default() += 1;
    let name = Name {
        trust_domain: plan.trust_domain.clone(),
        namespace: sim.namespace.clone(),
        name: sim.name.clone(),
    };
    let mut device = match Device::load(name, plan.endpoint.clone(), Storage { dir: None }) {
        Ok(d) => d,
        Err(e) => {
            if let Ok(mut t) = tally.lock() {
                bump(&mut t.enroll_errors, format!("Local: {e}"));
            }
            return;
        }
    };
    let mut rng = Rng::new(index as u64 + 1);
    let enrolled = {
        let _slot = slots.acquire().await;
        let start = Instant::now();
        // A gateway that is unreachable or overloaded is retried with jittered backoff, as a
        // real device does; refusals are final.
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let give_up = tokio::time::Instant::now() + plan.duration;
        let result = loop {
            let result = device.enroll(&Credential::Token(sim.token.clone())).await;
            match &result {
                Err(e)
                    if e.is_transient()
                        && !plan.stop.is_cancelled()
                        && tokio::time::Instant::now() < give_up =>
                {
                    tracing::debug!(device = %sim.name, error = %e, "enrollment failed; retrying");
                    tokio::time::sleep(backoff.failed(rng.next_f64())).await;
                }
                _ => break result,
            }
        };
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                t.enrolled += 1;
                t.enroll_ms.push(start.elapsed().as_secs_f64() * 1000.0);
                true
            }
            Err(e) => {
                tracing::debug!(device = %sim.name, error = %e, "enrollment failed");
                bump(&mut t.enroll_errors, e.reason());
                false
            }
        }
    };
    if !enrolled {
        return;
    }
    let deadline = tokio::time::Instant::now() + plan.duration;

    let mut installed = Installed {
        active: BootSlot::A,
        version: plan.firmware_version.clone(),
        security_version: plan.security_version,
    };
    let mut report = ReportedState {
        firmware_version: Some(installed.version.clone()),
        security_version: Some(installed.security_version),
        boot_slot: Some(installed.active),
        location: plan.location.clone(),
        agent_version: Some("sim-1".into()),
        ..ReportedState::default()
    };
    // Until the gateway names an interval, assume a short one: the first check-in follows the
    // enrollment closely, spread out so a mass enrollment does not become a thundering herd.
    let mut interval = plan.check_in_interval.unwrap_or(Duration::from_secs(5));
    let first = interval.mul_f64(rng.next_f64());
    let stop = &plan.stop;
    let nap = |until: tokio::time::Instant| async move {
        tokio::select! {
            _ = tokio::time::sleep_until(until.min(deadline)) => {}
            _ = stop.cancelled() => {}
        }
    };
    nap(tokio::time::Instant::now() + first).await;
    let mut generation = 1u64;
    // After a failed check-in (gateway restarting, network down) retry with growing, jittered
    // waits instead of all devices returning on the same tick.
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    while tokio::time::Instant::now() < deadline && !stop.is_cancelled() {
        if rng.next_f64() < plan.report_change_rate {
            generation += 1;
            report.agent_version = Some(format!("sim-{generation}"));
        }
        let start = Instant::now();
        let result = device.check_in(&report).await;
        let took = start.elapsed();
        {
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            match &result {
                Ok(answer) => {
                    t.checkin_ms.push(took.as_secs_f64() * 1000.0);
                    if answer.scope == crds::wire::Scope::Restricted {
                        t.restricted += 1;
                    }
                    t.first_checkin.get_or_insert(start);
                    t.last_checkin = Some(Instant::now());
                }
                Err(e) => bump(&mut t.checkin_errors, e.reason()),
            }
        }
        if result.is_err() {
            let wait = backoff.failed(rng.next_f64());
            nap(tokio::time::Instant::now() + wait).await;
            continue;
        }
        backoff.succeeded();
        if let Ok(answer) = &result
            && plan.check_in_interval.is_none()
        {
            interval = Duration::from_secs(answer.check_in_interval_seconds.max(1));
        }
        if let Some(offer) = result.ok().and_then(|a| a.offer) {
            let outcome = take_offer(
                &device,
                &offer,
                &installed,
                sim.fail_updates,
                &plan.updater,
                Target::Discard,
            )
            .await;
            let installed_now = outcome.is_ok();
            let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
            match outcome {
                Ok(now_installed) => {
                    *t.updates_installed
                        .entry(now_installed.version.clone())
                        .or_default() += 1;
                    installed = now_installed;
                    report.firmware_version = Some(installed.version.clone());
                    report.security_version = Some(installed.security_version);
                    report.boot_slot = Some(installed.active);
                }
                Err(reason) => *t.updates_failed.entry(reason).or_default() += 1,
            }
            drop(t);
            if installed_now {
                // Report the new version right away, as a device does after rebooting into it.
                continue;
            }
        }
        // +-10% per interval: devices that came back together (after an outage) drift apart
        // instead of checking in in lockstep forever.
        nap(tokio::time::Instant::now() + interval.mul_f64(0.9 + 0.2 * rng.next_f64())).await;
    }
}

/// Takes one firmware offer the way a real device does, reporting each step; `Err` carries the
/// refusal or failure reason. `fail` simulates an install that fails after verification.
pub async fn take_offer(
    device: &Device,
    offer: &FirmwareOffer,
    installed: &Installed,
    fail: bool,
    updater: &Updater,
    target: Target<'_>,
) -> Result<Installed, String> {
    let manifest = &offer.manifest;
    let report = |state, message: Option<String>| UpdateReport {
        rollout: offer.rollout.clone(),
        version: manifest.version.clone(),
        state,
        progress_percent: None,
        message,
    };
    use crds::device::UpdateState;
    let _ = device.report(&report(UpdateState::Downloading, None)).await;
    let result = match updater
        .apply(manifest, installed, target, jiff::Timestamp::now())
        .await
    {
        Ok(_) if fail => Err((
            "InstallFailed".to_string(),
            "InstallFailed: simulated install failure".to_string(),
        )),
        Ok(now_installed) => Ok(now_installed),
        Err(e) => Err((e.reason().to_string(), format!("{}: {e}", e.reason()))),
    };
    match result {
        Ok(now_installed) => {
            let _ = device.report(&report(UpdateState::Succeeded, None)).await;
            Ok(now_installed)
        }
        Err((reason, message)) => {
            let _ = device
                .report(&report(UpdateState::Failed, Some(message)))
                .await;
            Err(reason)
        }
    }
}
