//! Defaulting: the fields a user may leave out, filled in by the mutating webhook so what is
//! stored (and what Git diffs against) says what Fleetwarden will do. The defaults are the ones
//! the API types declare (`serde` defaults), so the operator, the gateway and the webhook agree.
//!
//! The patch only ever adds missing fields: applying it twice changes nothing the second time.

use json_patch::{AddOperation, Patch, PatchOperation, jsonptr::PointerBuf};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// JSON Patch operations that add to `spec` every field its typed form defaults and the
/// submitted object leaves out. `None` when the spec does not decode (the schema and the
/// validating webhook report why).
pub fn patch<Spec>(object: &Value) -> Option<Patch>
where
    Spec: DeserializeOwned + Serialize,
{
    let submitted = object.get("spec")?;
    let typed: Spec = serde_json::from_value(submitted.clone()).ok()?;
    let defaulted = serde_json::to_value(typed).ok()?;
    let mut ops = Vec::new();
    additions(
        submitted,
        &defaulted,
        &mut PointerBuf::from_tokens(["spec"]),
        &mut ops,
    );
    Some(Patch(ops))
}

/// Recursively: fields of `defaulted` that `submitted` lacks. Arrays are compared element by
/// element only when they have the same length (defaults inside list items, e.g. a wave's soak).
fn additions(
    submitted: &Value,
    defaulted: &Value,
    at: &mut PointerBuf,
    ops: &mut Vec<PatchOperation>,
) {
    match (submitted, defaulted) {
        (Value::Object(have), Value::Object(want)) => {
            for (key, value) in want {
                at.push_back(key.as_str());
                match have.get(key) {
                    None => ops.push(PatchOperation::Add(AddOperation {
                        path: at.clone(),
                        value: value.clone(),
                    })),
                    Some(existing) => additions(existing, value, at, ops),
                }
                at.pop_back();
            }
        }
        (Value::Array(have), Value::Array(want)) if have.len() == want.len() => {
            for (i, (h, w)) in have.iter().zip(want).enumerate() {
                at.push_back(i);
                additions(h, w, at, ops);
                at.pop_back();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{DeviceGroupSpec, DeviceSpec, UpdateRolloutSpec};
    use serde_json::json;

    fn apply(object: &Value, patch: &Patch) -> Value {
        let mut out = object.clone();
        json_patch::patch(&mut out, patch).unwrap();
        out
    }

    #[test]
    fn a_minimal_device_gets_its_defaults_once() {
        let device = json!({"spec": {"group": "cell", "hardwareModel": "m"}});
        let p = patch::<DeviceSpec>(&device).unwrap();
        let patched = apply(&device, &p);
        assert_eq!(patched["spec"]["lifecycle"], "Active");
        assert_eq!(patched["spec"]["identity"]["mode"], "DeviceKey");
        // Idempotent: nothing left to add.
        assert!(patch::<DeviceSpec>(&patched).unwrap().0.is_empty());
    }

    #[test]
    fn user_values_are_never_replaced() {
        let group = json!({"spec": {
            "certificates": {"issuerRef": {"name": "ca"}, "duration": "48h"},
            "checkInInterval": "1m",
        }});
        let p = patch::<DeviceGroupSpec>(&group).unwrap();
        let paths: Vec<String> =
            p.0.iter()
                .map(|op| match op {
                    PatchOperation::Add(a) => a.path.to_string(),
                    other => panic!("only additions expected, got {other:?}"),
                })
                .collect();
        assert!(
            paths.contains(&"/spec/certificates/renewBefore".to_string()),
            "{paths:?}"
        );
        assert!(
            !paths
                .iter()
                .any(|p| p == "/spec/certificates/duration" || p == "/spec/checkInInterval")
        );
        let patched = apply(&group, &p);
        assert_eq!(patched["spec"]["certificates"]["duration"], "48h");
        assert_eq!(
            patched["spec"]["certificates"]["trustDomain"],
            "fleetwarden.io"
        );
        assert_eq!(
            patched["spec"]["compliance"]["quarantineNonCompliant"],
            true
        );
    }

    #[test]
    fn defaults_reach_into_list_items() {
        let rollout = json!({"spec": {
            "target": {"groups": ["cell"]},
            "firmware": {"version": "1", "securityVersion": 1, "sha256": "0".repeat(64),
                "sizeBytes": 1, "hardwareModels": ["m"], "expires": "2030-01-01T00:00:00Z",
                "url": "https://x/y", "signature": {"keyId": "k", "value": "v"}},
            "waves": [{"percent": 10}, {"percent": 100, "soak": "1h"}],
        }});
        let p = patch::<UpdateRolloutSpec>(&rollout).unwrap();
        let patched = apply(&rollout, &p);
        assert_eq!(patched["spec"]["waves"][0]["soak"], "0s");
        assert_eq!(patched["spec"]["waves"][1]["soak"], "1h");
        assert!(patched["spec"]["successThresholdPercent"].is_number());
        assert!(patch::<UpdateRolloutSpec>(&patched).unwrap().0.is_empty());
    }

    #[test]
    fn a_rollout_without_waves_gets_four_cautious_ones() {
        let rollout = json!({"spec": {
            "target": {"groups": ["cell"]},
            "firmware": {"version": "1", "securityVersion": 1, "sha256": "0".repeat(64),
                "sizeBytes": 1, "hardwareModels": ["m"], "expires": "2030-01-01T00:00:00Z",
                "url": "https://x/y", "signature": {"keyId": "k", "value": "v"}},
        }});
        let patched = apply(&rollout, &patch::<UpdateRolloutSpec>(&rollout).unwrap());
        let waves = patched["spec"]["waves"].as_array().unwrap();
        let shares: Vec<_> = waves
            .iter()
            .map(|w| w["percent"].as_u64().unwrap())
            .collect();
        assert_eq!(shares, [5, 20, 50, 100]);
        assert_eq!(waves[0]["soak"], "1h");
        assert!(patched["spec"]["deviceTimeout"].is_string());
    }

    #[test]
    fn undecodable_specs_get_no_patch() {
        assert!(patch::<DeviceSpec>(&json!({"spec": {"group": 7}})).is_none());
        assert!(patch::<DeviceSpec>(&json!({"metadata": {}})).is_none());
    }
}
