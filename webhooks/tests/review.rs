//! The AdmissionReview decoder and handlers: whole reviews in, answers out, and property tests
//! that no input (random bytes, random JSON in every position, truncations) makes them panic.

use crds::firmware;
use ed25519_dalek::SigningKey;
use jiff::Timestamp;
use proptest::prelude::*;
use serde_json::{Value, json};
use webhooks::{
    review::{self, Verdict},
    rules::Cluster,
};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[3; 32])
}

fn group() -> crds::DeviceGroup {
    serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup",
        "metadata": {"name": "cell", "namespace": "plant", "uid": "g1"},
        "spec": {"certificates": {"issuerRef": {"name": "ca"}},
                 "firmware": {"trustedKeys": [{"keyId": "vendor",
                    "publicKey": firmware::public_key_base64(&key().verifying_key())}]}},
    }))
    .unwrap()
}

fn rollout_object() -> Value {
    let mut manifest: crds::rollout::FirmwareManifest = serde_json::from_value(json!({
        "version": "4.2.0", "securityVersion": 12, "sha256": "b".repeat(64), "sizeBytes": 4096,
        "hardwareModels": ["m1"], "expires": "2030-01-01T00:00:00Z", "url": "https://fw/x.bin",
        "signature": {"keyId": "", "value": ""}
    }))
    .unwrap();
    firmware::sign(&mut manifest, "vendor", &key());
    json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "UpdateRollout",
        "metadata": {"name": "r", "namespace": "plant"},
        "spec": {"target": {"groups": ["cell"]}, "firmware": manifest,
                 "waves": [{"percent": 10}, {"percent": 100}]},
    })
}

fn review_of(kind: &str, object: Value, old: Value, operation: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "7c5b1b9e-0000-4000-8000-000000000001",
            "kind": {"group": "fleetwarden.io", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "fleetwarden.io", "version": "v1alpha1", "resource": "updaterollouts"},
            "name": "r", "namespace": "plant", "operation": operation,
            "userInfo": {"username": "alice"},
            "object": object, "oldObject": old,
        }
    })
}

fn validate(body: &[u8]) -> review::Answer {
    let groups = [group()];
    review::validate(
        body,
        &Cluster {
            groups: groups.iter().collect(),
            rollouts: Vec::new(),
            now: "2026-11-25T12:00:00Z".parse::<Timestamp>().unwrap(),
        },
    )
}

fn response(answer: &review::Answer) -> Value {
    serde_json::to_value(&answer.review).unwrap()["response"].clone()
}

#[test]
fn a_signed_rollout_is_allowed_and_the_uid_is_echoed() {
    let body = review_of("UpdateRollout", rollout_object(), Value::Null, "CREATE");
    let answer = validate(&serde_json::to_vec(&body).unwrap());
    assert_eq!(answer.verdict, Verdict::Allowed);
    let r = response(&answer);
    assert_eq!(r["allowed"], true);
    assert_eq!(r["uid"], "7c5b1b9e-0000-4000-8000-000000000001");
    let review = serde_json::to_value(&answer.review).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
}

#[test]
fn a_tampered_rollout_is_denied_with_what_to_fix() {
    let mut object = rollout_object();
    object["spec"]["firmware"]["sizeBytes"] = json!(4097);
    let body = review_of("UpdateRollout", object, Value::Null, "CREATE");
    let answer = validate(&serde_json::to_vec(&body).unwrap());
    assert_eq!(answer.verdict, Verdict::Denied);
    let message = response(&answer)["status"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with("UpdateRollout r is invalid: spec.firmware.signature (DeviceGroup cell): firmware signature does not verify with key \"vendor\""),
        "{message}"
    );
    assert!(message.contains("kubectl fleet sign"), "{message}");
}

#[test]
fn other_kinds_deletes_and_garbage_are_handled() {
    let pod = review_of(
        "Pod",
        json!({"apiVersion": "v1", "kind": "Pod"}),
        Value::Null,
        "CREATE",
    );
    let mut pod = pod;
    pod["request"]["kind"]["group"] = json!("");
    assert_eq!(
        validate(&serde_json::to_vec(&pod).unwrap()).verdict,
        Verdict::Allowed
    );

    let delete = review_of("UpdateRollout", Value::Null, rollout_object(), "DELETE");
    assert_eq!(
        validate(&serde_json::to_vec(&delete).unwrap()).verdict,
        Verdict::Allowed
    );

    let garbage = validate(b"{not json");
    assert_eq!(garbage.verdict, Verdict::Invalid);
    assert!(garbage.message.unwrap().contains("not an AdmissionReview"));
    let no_request = validate(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#);
    assert_eq!(no_request.verdict, Verdict::Invalid);

    let mut wrong_type = rollout_object();
    wrong_type["spec"]["waves"] = json!("all at once");
    let answer = validate(
        &serde_json::to_vec(&review_of(
            "UpdateRollout",
            wrong_type,
            Value::Null,
            "CREATE",
        ))
        .unwrap(),
    );
    assert_eq!(answer.verdict, Verdict::Denied);
    assert!(answer.message.unwrap().contains("does not decode"));
}

#[test]
fn the_defaulting_webhook_returns_an_idempotent_json_patch() {
    let device = json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device",
        "metadata": {"name": "plc"}, "spec": {"group": "cell", "hardwareModel": "m1"}});
    let body = review_of("Device", device.clone(), Value::Null, "CREATE");
    let answer = review::mutate(&serde_json::to_vec(&body).unwrap());
    assert_eq!(answer.verdict, Verdict::Patched);
    let r = response(&answer);
    assert_eq!(r["patchType"], "JSONPatch");
    let bytes: Vec<u8> = serde_json::from_value(r["patch"].clone()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = device;
    json_patch::patch(&mut patched, &patch).unwrap();
    assert_eq!(patched["spec"]["lifecycle"], "Active");
    let again = review::mutate(
        &serde_json::to_vec(&review_of("Device", patched, Value::Null, "UPDATE")).unwrap(),
    );
    assert_eq!(again.verdict, Verdict::Allowed, "nothing left to default");
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("spec".to_string()),
                    Just("firmware".to_string()),
                    Just("waves".to_string()),
                    Just("percent".to_string()),
                    Just("segmentation".to_string()),
                    Just("deviceCIDRs".to_string()),
                    Just("lifecycle".to_string()),
                    ".{0,8}".prop_map(|s| s)
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replaces the value at a random path of `base` with `with`.
fn graft(base: &mut Value, path: &[usize], with: Value) {
    let Some((step, rest)) = path.split_first() else {
        *base = with;
        return;
    };
    match base {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(step % m.len()).cloned().unwrap_or_default();
            if let Some(next) = m.get_mut(&key) {
                graft(next, rest, with);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let len = a.len();
            graft(&mut a[step % len], rest, with);
        }
        other => *other = with,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let a = validate(&bytes);
        prop_assert!(matches!(a.verdict, Verdict::Invalid | Verdict::Allowed | Verdict::Denied));
        let _ = review::mutate(&bytes);
    }

    #[test]
    fn random_json_anywhere_in_a_review_never_panics(
        kind in prop_oneof![Just("Device"), Just("DeviceGroup"), Just("UpdateRollout")],
        op in prop_oneof![Just("CREATE"), Just("UPDATE"), Just("DELETE"), Just("CONNECT")],
        path in prop::collection::vec(any::<usize>(), 0..8),
        junk in arb_json(),
    ) {
        let mut body = review_of(kind, rollout_object(), rollout_object(), op);
        graft(&mut body, &path, junk);
        let bytes = serde_json::to_vec(&body).unwrap();
        let answer = validate(&bytes);
        // Whatever was decided is a well-formed review.
        let out = serde_json::to_value(&answer.review).unwrap();
        prop_assert!(out["response"]["allowed"].is_boolean());
        let _ = review::mutate(&bytes);
        // Truncated bodies too.
        let cut = bytes.len() / 2;
        prop_assert_eq!(validate(&bytes[..cut]).verdict, Verdict::Invalid);
    }
}
