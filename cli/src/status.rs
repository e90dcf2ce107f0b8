//! `rollout status`: a rollout's phase, what it waits for, and one progress bar per wave.

use crds::{
    UpdateRollout,
    conditions::types,
    rollout::{RolloutPhase, WaveStatus},
};

const BAR: usize = 30;

/// A progress bar: `#` succeeded, `x` failed, `>` in progress, `.` not yet.
fn bar(w: &WaveStatus) -> String {
    let planned = w.planned.max(1) as usize;
    let cells = |n: u32| (n as usize * BAR).div_ceil(planned).min(BAR);
    let ok = cells(w.succeeded);
    let failed = cells(w.failed).min(BAR - ok);
    let busy = cells(w.in_progress).min(BAR - ok - failed);
    format!(
        "[{}{}{}{}]",
        "#".repeat(ok),
        "x".repeat(failed),
        ">".repeat(busy),
        ".".repeat(BAR - ok - failed - busy)
    )
}

fn wave_state(index: usize, current: usize, w: &WaveStatus) -> &'static str {
    if w.completed_at.is_some() {
        "complete"
    } else if index < current {
        "in progress"
    } else {
        "not started"
    }
}

/// Whether the rollout reached a phase it will not leave.
pub fn finished(r: &UpdateRollout) -> Option<RolloutPhase> {
    r.status.as_ref().and_then(|s| s.phase).filter(|p| {
        matches!(
            p,
            RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::RolledBack
        )
    })
}

pub fn render(r: &UpdateRollout) -> String {
    let name = r.metadata.name.as_deref().unwrap_or_default();
    let spec = &r.spec;
    let Some(status) = r.status.as_ref() else {
        return format!(
            "rollout {name}: firmware {} — no status yet (is the operator running?)\n",
            spec.firmware.version
        );
    };
    let phase = status
        .phase
        .map_or("Pending".to_string(), |p| format!("{p:?}"));
    let mut out = format!(
        "rollout {name}: firmware {} (securityVersion {}) — {phase}, wave {} of {}\n",
        spec.firmware.version,
        spec.firmware.security_version,
        status.current_wave,
        spec.waves.len()
    );
    if let Some(t) = &status.totals {
        out.push_str(&format!(
            "  {} eligible, {} offered, {} in progress, {} succeeded, {} failed\n",
            t.eligible, t.offered, t.in_progress, t.succeeded, t.failed
        ));
    }
    let current = status.current_wave as usize;
    for (i, wave) in spec.waves.iter().enumerate() {
        let w = status.waves.get(i).cloned().unwrap_or_default();
        let label = wave
            .name
            .clone()
            .unwrap_or_else(|| format!("wave-{}", i + 1));
        let share = match (wave.percent, wave.count) {
            (Some(p), _) => format!("{p}%"),
            (None, Some(c)) => format!("{c} dev"),
            _ => "-".into(),
        };
        let gate = if wave.requires_approval && spec.approved_waves < (i as u32 + 1) {
            "  (needs approval)"
        } else {
            ""
        };
        out.push_str(&format!(
            "  {:>2} {label:<12} {share:>7} {} {:>5}/{:<5} ok {:>4} failed  {}{gate}\n",
            i + 1,
            bar(&w),
            w.succeeded,
            w.planned,
            w.failed,
            wave_state(i, current, &w),
        ));
    }
    for c in &status.conditions {
        let interesting = match c.type_.as_str() {
            t if t == types::WAITING || t == types::DEGRADED => c.status == "True",
            _ => false,
        };
        if interesting {
            out.push_str(&format!("  {}: {} — {}\n", c.type_, c.reason, c.message));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> UpdateRollout {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout",
            "metadata": {"name": "pressctl-4-2"},
            "spec": {
                "target": {"groups": ["cell"]},
                "firmware": {"version": "4.2.0", "securityVersion": 12, "sha256": "ab".repeat(32),
                    "sizeBytes": 10, "hardwareModels": ["m"], "expires": "2027-01-01T00:00:00Z",
                    "url": "https://x/fw", "signature": {"keyId": "k", "value": "v"}},
                "waves": [{"name": "canary", "percent": 5}, {"percent": 100, "requiresApproval": true}]
            },
            "status": {
                "phase": "Progressing", "currentWave": 1, "waveCount": 2,
                "totals": {"eligible": 200, "offered": 10, "inProgress": 2, "succeeded": 7, "failed": 1},
                "waves": [
                    {"name": "canary", "planned": 10, "offered": 10, "inProgress": 2, "succeeded": 7, "failed": 1},
                    {"planned": 190, "offered": 0, "inProgress": 0, "succeeded": 0, "failed": 0}
                ],
                "conditions": [{"type": "Waiting", "status": "True", "reason": "AwaitingApproval",
                    "message": "wave 2 needs approval", "lastTransitionTime": "2026-11-25T00:00:00Z"}]
            }
        }))
        .unwrap()
    }

    #[test]
    fn each_wave_gets_a_bar_with_its_counts() {
        let text = render(&rollout());
        assert!(text.contains("Progressing, wave 1 of 2"), "{text}");
        assert!(
            text.contains(
                "[#####################xxx>>>>>>]     7/10    ok    1 failed  in progress"
            ),
            "{text}"
        );
        assert!(text.contains("0/190"), "{text}");
        assert!(text.contains("(needs approval)"), "{text}");
        assert!(text.contains("Waiting: AwaitingApproval"), "{text}");
        assert_eq!(finished(&rollout()), None);
    }

    #[test]
    fn an_empty_wave_still_renders() {
        let w = WaveStatus::default();
        assert_eq!(bar(&w), format!("[{}]", ".".repeat(BAR)));
    }
}
