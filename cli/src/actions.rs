//! `rollout promote|pause|resume|abort`: each is a small JSON merge patch of the rollout's
//! `spec`, sent with the rollout's resourceVersion so that two people promoting at once cannot
//! both succeed against the same state.

use crds::{UpdateRollout, rollout::RolloutPhase};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Promote,
    Pause,
    Resume,
    Abort,
}

/// The merge patch for `action`, or why it makes no sense now.
pub fn patch(r: &UpdateRollout, action: Action) -> Result<Value, String> {
    let name = r.metadata.name.as_deref().unwrap_or_default();
    let phase = r.status.as_ref().and_then(|s| s.phase);
    if let Some(p @ (RolloutPhase::Succeeded | RolloutPhase::Failed | RolloutPhase::RolledBack)) =
        phase
    {
        return Err(format!(
            "rollout {name} is {p:?}: it has finished; create a new UpdateRollout instead"
        ));
    }
    let rv = r.metadata.resource_version.clone();
    let spec = match action {
        Action::Promote => {
            let approved = r.spec.approved_waves as usize;
            let next = r
                .spec
                .waves
                .iter()
                .enumerate()
                .skip(approved)
                .find(|(_, w)| w.requires_approval)
                .map(|(i, _)| i + 1)
                .ok_or_else(|| {
                    format!(
                        "nothing to promote: no wave of rollout {name} after the {approved} approved needs approval"
                    )
                })?;
            json!({"approvedWaves": next})
        }
        Action::Pause if r.spec.paused => {
            return Err(format!("rollout {name} is already paused"));
        }
        Action::Pause => json!({"paused": true}),
        Action::Resume if !r.spec.paused => {
            return Err(format!("rollout {name} is not paused"));
        }
        Action::Resume => json!({"paused": false}),
        Action::Abort => json!({"abort": true}),
    };
    Ok(json!({"metadata": {"resourceVersion": rv}, "spec": spec}))
}

/// What the user is told after the patch landed.
pub fn done(r: &UpdateRollout, action: Action) -> String {
    let name = r.metadata.name.as_deref().unwrap_or_default();
    match action {
        Action::Promote => format!(
            "rollout {name} promoted: waves 1..{} approved",
            r.spec.approved_waves
        ),
        Action::Pause => format!("rollout {name} paused: no new offers until resumed"),
        Action::Resume => format!("rollout {name} resumed"),
        Action::Abort => format!(
            "rollout {name} aborted: no new offers{}",
            if r.spec.on_failure == crds::rollout::OnFailure::Rollback {
                "; updated devices are offered the rollback firmware"
            } else {
                ""
            }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(approved: u32, phase: &str) -> UpdateRollout {
        serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout",
            "metadata": {"name": "fw", "resourceVersion": "42"},
            "spec": {
                "target": {"groups": ["cell"]},
                "firmware": {"version": "4.2.0", "securityVersion": 12, "sha256": "ab".repeat(32),
                    "sizeBytes": 10, "hardwareModels": ["m"], "expires": "2027-01-01T00:00:00Z",
                    "url": "https://x/fw", "signature": {"keyId": "k", "value": "v"}},
                "waves": [{"percent": 5}, {"percent": 20, "requiresApproval": true}, {"percent": 50},
                    {"percent": 100, "requiresApproval": true}],
                "approvedWaves": approved
            },
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn promote_approves_up_to_the_next_gated_wave() {
        assert_eq!(
            patch(&rollout(0, "Progressing"), Action::Promote).unwrap(),
            json!({"metadata": {"resourceVersion": "42"}, "spec": {"approvedWaves": 2}})
        );
        assert_eq!(
            patch(&rollout(2, "Progressing"), Action::Promote).unwrap()["spec"],
            json!({"approvedWaves": 4})
        );
        let err = patch(&rollout(4, "Progressing"), Action::Promote).unwrap_err();
        assert!(err.contains("nothing to promote"), "{err}");
    }

    #[test]
    fn finished_rollouts_and_no_op_actions_are_refused() {
        let err = patch(&rollout(0, "Succeeded"), Action::Abort).unwrap_err();
        assert!(err.contains("create a new UpdateRollout"), "{err}");
        assert!(patch(&rollout(0, "Progressing"), Action::Resume).is_err());
        assert_eq!(
            patch(&rollout(0, "Progressing"), Action::Pause).unwrap()["spec"],
            json!({"paused": true})
        );
    }
}
