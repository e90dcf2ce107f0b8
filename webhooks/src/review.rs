//! AdmissionReview in, AdmissionReview out. Any byte string is answered: a body that is not an
//! AdmissionReview gets an `invalid` response, an object that does not decode as its kind is
//! denied with the decoder's message, and nothing here panics (see the property tests).

use crds::{Device, DeviceGroup, DeviceGroupSpec, DeviceSpec, UpdateRollout, UpdateRolloutSpec};
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
};
use serde::de::DeserializeOwned;

use crate::{defaults, rules};

/// What the handler decided, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    Patched,
    Invalid,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Patched => "patched",
            Verdict::Invalid => "invalid",
        }
    }
}

/// The kinds we admit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Device,
    DeviceGroup,
    UpdateRollout,
}

impl Kind {
    fn of(req: &AdmissionRequest<DynamicObject>) -> Option<Self> {
        if req.kind.group != "fleetwarden.io" {
            return None;
        }
        match req.kind.kind.as_str() {
            "Device" => Some(Kind::Device),
            "DeviceGroup" => Some(Kind::DeviceGroup),
            "UpdateRollout" => Some(Kind::UpdateRollout),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Device => "Device",
            Kind::DeviceGroup => "DeviceGroup",
            Kind::UpdateRollout => "UpdateRollout",
        }
    }
}

/// A decided review: the response body, what was decided and about which kind.
pub struct Answer {
    pub review: AdmissionReview<DynamicObject>,
    pub verdict: Verdict,
    pub kind: Option<Kind>,
    pub message: Option<String>,
}

fn answer(response: AdmissionResponse, verdict: Verdict, kind: Option<Kind>) -> Answer {
    let message = (verdict == Verdict::Denied || verdict == Verdict::Invalid)
        .then(|| response.result.message.clone());
    Answer {
        review: response.into_review(),
        verdict,
        kind,
        message,
    }
}

fn parse(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, Box<Answer>> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(|e| {
        Box::new(answer(
            AdmissionResponse::invalid(format!("the body is not an AdmissionReview: {e}")),
            Verdict::Invalid,
            None,
        ))
    })?;
    review.try_into().map_err(|_| {
        Box::new(answer(
            AdmissionResponse::invalid("the AdmissionReview has no request"),
            Verdict::Invalid,
            None,
        ))
    })
}

fn decode<K: DeserializeOwned>(obj: &DynamicObject, kind: Kind, which: &str) -> Result<K, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    serde_json::from_value(value)
        .map_err(|e| format!("the {which} {} does not decode: {e}", kind.label()))
}

/// The validating webhook.
pub fn validate(body: &[u8], cluster: &rules::Cluster<'_>) -> Answer {
    let req = match parse(body) {
        Ok(r) => r,
        Err(a) => return *a,
    };
    let allowed = AdmissionResponse::from(&req);
    let Some(kind) = Kind::of(&req) else {
        // Not ours: never block what we were not meant to see.
        return answer(allowed, Verdict::Allowed, None);
    };
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return answer(allowed, Verdict::Allowed, Some(kind));
    }
    let Some(obj) = req.object.as_ref() else {
        return answer(
            allowed.deny("the request carries no object"),
            Verdict::Denied,
            Some(kind),
        );
    };
    let violations = match kind {
        Kind::Device => check::<Device>(obj, req.old_object.as_ref(), kind, |new, old| {
            rules::device(new, old)
        }),
        Kind::DeviceGroup => check::<DeviceGroup>(obj, req.old_object.as_ref(), kind, |new, _| {
            rules::group(new, cluster)
        }),
        Kind::UpdateRollout => {
            check::<UpdateRollout>(obj, req.old_object.as_ref(), kind, |new, old| {
                rules::rollout(new, old, cluster)
            })
        }
    };
    if violations.is_empty() {
        return answer(allowed, Verdict::Allowed, Some(kind));
    }
    let name = if req.name.is_empty() {
        obj.metadata.name.clone().unwrap_or_default()
    } else {
        req.name.clone()
    };
    let message = format!(
        "{} {name} is invalid: {}",
        kind.label(),
        violations.join("; ")
    );
    answer(allowed.deny(message), Verdict::Denied, Some(kind))
}

fn check<K: DeserializeOwned>(
    obj: &DynamicObject,
    old: Option<&DynamicObject>,
    kind: Kind,
    rules: impl FnOnce(&K, Option<&K>) -> Vec<String>,
) -> Vec<String> {
    let new: K = match decode(obj, kind, "submitted") {
        Ok(k) => k,
        Err(e) => return vec![e],
    };
    // An old object that no longer decodes (written by an older version) is not held against
    // the update.
    let old: Option<K> = old.and_then(|o| decode(o, kind, "stored").ok());
    rules(&new, old.as_ref())
}

/// The mutating (defaulting) webhook.
pub fn mutate(body: &[u8]) -> Answer {
    let req = match parse(body) {
        Ok(r) => r,
        Err(a) => return *a,
    };
    let allowed = AdmissionResponse::from(&req);
    let (Some(kind), Some(obj)) = (Kind::of(&req), req.object.as_ref()) else {
        return answer(allowed, Verdict::Allowed, Kind::of(&req));
    };
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return answer(allowed, Verdict::Allowed, Some(kind));
    }
    let Ok(value) = serde_json::to_value(obj) else {
        return answer(allowed, Verdict::Allowed, Some(kind));
    };
    let patch = match kind {
        Kind::Device => defaults::patch::<DeviceSpec>(&value),
        Kind::DeviceGroup => defaults::patch::<DeviceGroupSpec>(&value),
        Kind::UpdateRollout => defaults::patch::<UpdateRolloutSpec>(&value),
    };
    match patch {
        Some(p) if !p.0.is_empty() => match allowed.clone().with_patch(p) {
            Ok(patched) => answer(patched, Verdict::Patched, Some(kind)),
            Err(_) => answer(allowed, Verdict::Allowed, Some(kind)),
        },
        _ => answer(allowed, Verdict::Allowed, Some(kind)),
    }
}
