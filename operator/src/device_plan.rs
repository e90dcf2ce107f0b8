//! What the device identity controller should do, decided from plain values: the Device, its
//! DeviceGroup, the cert-manager objects it controls, and the time. No I/O happens here; the
//! reconciler in `device.rs` gathers these inputs from caches and carries the plan out.
//!
//! The rules, in short: a CSR in `status.enrollment` that passes `csr_policy::check` gets a
//! CertificateRequest named after the device and the CSR hash, which Fleetwarden approves itself;
//! a CSR that fails is denied with its reason. An issued certificate is copied into
//! `status.identity` only after checking it names the device and carries the CSR's key. A
//! request approved by anyone else is reported, never trusted. Retiring clears the identity,
//! removes the cert-manager objects and records the serial as revoked.

use std::{collections::BTreeSet, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use crds::{
    Device, DeviceGroup, MANAGED_BY_LABEL,
    certmanager::{
        self, Certificate, CertificatePrivateKey, CertificateRequest, CertificateRequestSpec,
        CertificateSpec, USAGE_CLIENT_AUTH, USAGE_DIGITAL_SIGNATURE,
    },
    compliance,
    conditions::{Desired, types},
    csr_policy::{self, Policy},
    device::{DevicePhase, IdentityMode, IdentityStatus, Lifecycle},
    hex_sha256,
    identity::{self, pem_encode},
};
use jiff::Timestamp;
use kube::{Resource, api::ObjectMeta};

/// Reason Fleetwarden writes on the Approved/Denied conditions it sets; an approval with any
/// other reason was made by someone else.
pub const APPROVAL_REASON: &str = "fleetwarden.io";
/// Label on CertificateRequests naming the Device (by uid: names can exceed label limits).
pub const DEVICE_UID_LABEL: &str = "fleetwarden.io/device-uid";
pub const DEVICE_ANNOTATION: &str = "fleetwarden.io/device";
pub const CSR_SHA256_ANNOTATION: &str = "fleetwarden.io/csr-sha256";

/// Everything the decision needs.
pub struct Inputs<'a> {
    pub device: &'a Device,
    pub group: Option<&'a DeviceGroup>,
    /// CertificateRequests this Device controls (DeviceKey mode).
    pub requests: Vec<&'a CertificateRequest>,
    /// ManagedKey: the Certificate this Device controls.
    pub certificate: Option<&'a Certificate>,
    /// ManagedKey: the CertificateRequests cert-manager created for that Certificate.
    pub certificate_requests: Vec<&'a CertificateRequest>,
    /// ManagedKey: `tls.crt` and `ca.crt` of the Certificate's Secret, when it had to be read
    /// (see [`needs_managed_secret`]).
    pub managed_secret: Option<(String, Option<String>)>,
    pub now: Timestamp,
}

/// An approval or denial to write on a CertificateRequest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub request: String,
    pub message: String,
    /// For denials: the policy reason (metrics); `Approved` for approvals.
    pub policy_reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The operator-owned part of the Device status.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusPlan {
    pub phase: DevicePhase,
    pub identity: Option<IdentityStatus>,
    pub conditions: Vec<Desired<'static>>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub create_request: Option<CertificateRequest>,
    /// ManagedKey: the Certificate as it should be (applied when it differs).
    pub apply_certificate: Option<Certificate>,
    pub approve: Vec<Verdict>,
    pub deny: Vec<Verdict>,
    pub delete_requests: Vec<String>,
    /// Delete the ManagedKey Certificate and its Secret.
    pub delete_certificate: bool,
    /// Serial of a certificate to record as revoked in the DeviceGroup status.
    pub revoke_serial: Option<String>,
    pub status: Option<StatusPlan>,
    pub events: Vec<PlannedEvent>,
    /// Come back at this time even if nothing changes (expiry, renewal window).
    pub requeue_after: Option<Duration>,
    /// For metrics: a CSR denied by policy in this pass, and its reason.
    pub csr_denied: Option<&'static str>,
    /// For metrics: whether the certificate is inside its renewal window.
    pub expiring: bool,
}

/// Deterministic, bounded object names derived from the device name.
pub fn request_name(device: &str, csr_sha256: &str) -> String {
    format!(
        "{}-{}",
        name_prefix(device, 240),
        &csr_sha256[..csr_sha256.len().min(12)]
    )
}

pub fn managed_certificate_name(device: &str) -> String {
    format!("{}-identity", name_prefix(device, 240))
}

pub fn managed_secret_name(device: &str) -> String {
    format!("{}-identity-tls", name_prefix(device, 236))
}

fn name_prefix(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].trim_end_matches(['-', '.'])
}

/// ManagedKey devices: whether the reconciler must read the Certificate's Secret before planning
/// (the Certificate is Ready and the identity does not reflect its current issuance).
pub fn needs_managed_secret(device: &Device, certificate: Option<&Certificate>) -> bool {
    if device.spec.identity.mode != IdentityMode::ManagedKey
        || device.spec.lifecycle == Lifecycle::Retired
    {
        return false;
    }
    let Some(status) = certificate.and_then(|c| c.status.as_ref()) else {
        return false;
    };
    if !certmanager::condition_true(&status.conditions, certmanager::condition::READY) {
        return false;
    }
    let identity = device.status.as_ref().and_then(|s| s.identity.as_ref());
    identity.is_none_or(|id| Some(&id.not_after) != status.not_after.as_ref())
}

fn request_approval(cr: &CertificateRequest) -> Approval<'_> {
    let conditions = cr
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if let Some(c) = certmanager::find_condition(conditions, certmanager::condition::DENIED)
        .filter(|c| c.status == "True")
    {
        return Approval::Denied(c.message.as_deref().unwrap_or(""));
    }
    match certmanager::find_condition(conditions, certmanager::condition::APPROVED)
        .filter(|c| c.status == "True")
    {
        Some(c) if c.reason.as_deref() == Some(APPROVAL_REASON) => Approval::ByUs,
        Some(c) => Approval::BySomeoneElse(c.reason.as_deref().unwrap_or("unknown")),
        None => Approval::Pending,
    }
}

enum Approval<'a> {
    Pending,
    ByUs,
    BySomeoneElse(&'a str),
    Denied(&'a str),
}

enum Issuance {
    Issued {
        certificate: String,
        ca: Option<String>,
    },
    Failed(String),
    Waiting,
}

fn issuance(cr: &CertificateRequest) -> Issuance {
    let Some(status) = cr.status.as_ref() else {
        return Issuance::Waiting;
    };
    let ready = certmanager::find_condition(&status.conditions, certmanager::condition::READY);
    let invalid =
        certmanager::condition_true(&status.conditions, certmanager::condition::INVALID_REQUEST);
    match (ready, status.certificate.as_deref()) {
        (Some(r), Some(cert)) if r.status == "True" => {
            let decode = |b: &str| {
                STANDARD
                    .decode(b)
                    .ok()
                    .and_then(|v| String::from_utf8(v).ok())
            };
            match decode(cert) {
                Some(certificate) => Issuance::Issued {
                    certificate,
                    ca: status.ca.as_deref().and_then(decode),
                },
                None => Issuance::Failed(
                    "the issuer returned a certificate that is not base64 PEM".into(),
                ),
            }
        }
        (Some(r), _)
            if r.status == "False"
                && matches!(
                    r.reason.as_deref(),
                    Some("Failed" | "Denied" | "InvalidRequest")
                ) =>
        {
            Issuance::Failed(r.message.clone().unwrap_or_default())
        }
        _ if invalid => Issuance::Failed("the issuer marked the request invalid".into()),
        _ => Issuance::Waiting,
    }
}

struct Enrollment {
    identity: Option<IdentityStatus>,
    enrolled: Desired<'static>,
    degraded: Option<Desired<'static>>,
    enrolling: bool,
}

pub fn plan(inp: &Inputs<'_>) -> Plan {
    let device = inp.device;
    let name = device.metadata.name.as_deref().unwrap_or_default();
    let status = device.status.clone().unwrap_or_default();
    let current_identity = status.identity.clone();
    let mut plan = Plan::default();

    if device.spec.lifecycle == Lifecycle::Retired {
        retire(inp, &mut plan);
        let message = "the device is retired; its identity is revoked".to_string();
        plan.status = Some(StatusPlan {
            phase: DevicePhase::Retired,
            identity: None,
            conditions: vec![
                Desired::new(types::READY, false, "Retired", message.clone()),
                Desired::new(types::ENROLLED, false, "Retired", message.clone()),
                Desired::new(types::COMPLIANT, false, "Retired", message),
                Desired::new(
                    types::CERTIFICATE_EXPIRING,
                    false,
                    "NoCertificate",
                    "no certificate",
                ),
                Desired::new(
                    types::DEGRADED,
                    false,
                    "AsExpected",
                    "nothing needs attention",
                ),
            ],
        });
        if current_identity.is_some() {
            plan.events.push(PlannedEvent {
                warning: false,
                reason: "IdentityRevoked",
                note: "device retired: certificate revoked and cert-manager objects removed".into(),
            });
        }
        return plan;
    }

    let enrollment = match inp.group {
        None => Enrollment {
            identity: current_identity.clone(),
            enrolled: Desired::new(
                types::ENROLLED,
                current_identity.is_some(),
                if current_identity.is_some() {
                    "Issued"
                } else {
                    "GroupNotFound"
                },
                format!("DeviceGroup {:?} not found", device.spec.group),
            ),
            degraded: Some(Desired::new(
                types::DEGRADED,
                true,
                "GroupNotFound",
                format!(
                    "DeviceGroup {:?} does not exist in this namespace; create it or fix spec.group",
                    device.spec.group
                ),
            )),
            enrolling: false,
        },
        Some(group) => match device.spec.identity.mode {
            IdentityMode::DeviceKey => enroll_device_key(inp, group, &mut plan),
            IdentityMode::ManagedKey => enroll_managed_key(inp, group, &mut plan),
        },
    };

    // Certificate validity and the renewal window.
    let renew_before = inp
        .group
        .map(|g| g.spec.certificates.renew_before.get())
        .unwrap_or_default();
    let (expiring, expired) = match &enrollment.identity {
        Some(id) => {
            let not_after = id.not_after.0;
            let renew_at = not_after
                .checked_sub(jiff::SignedDuration::try_from(renew_before).unwrap_or_default())
                .unwrap_or(not_after);
            let expired = inp.now >= not_after;
            let expiring = inp.now >= renew_at;
            let next = if !expiring {
                Some(renew_at)
            } else if !expired {
                Some(not_after)
            } else {
                None
            };
            plan.requeue_after = next.and_then(|t| {
                let secs = t.as_second().saturating_sub(inp.now.as_second()).max(1);
                Some(Duration::from_secs(u64::try_from(secs).ok()?))
            });
            (expiring, expired)
        }
        None => (false, false),
    };
    plan.expiring = expiring && !expired;

    let lifecycle = device.spec.lifecycle;
    let phase = match lifecycle {
        Lifecycle::Suspended => DevicePhase::Suspended,
        Lifecycle::Quarantined => DevicePhase::Quarantined,
        _ if enrollment.identity.is_some() && !expired => DevicePhase::Active,
        _ if enrollment.enrolling => DevicePhase::Enrolling,
        _ => DevicePhase::Pending,
    };
    let ready = match (&enrollment.identity, lifecycle) {
        (None, _) => Desired::new(
            types::READY,
            false,
            "NotEnrolled",
            enrollment.enrolled.message.clone(),
        ),
        (Some(_), _) if expired => Desired::new(
            types::READY,
            false,
            "CertificateExpired",
            "the device certificate has expired; the device must enroll again",
        ),
        (Some(_), Lifecycle::Suspended) => Desired::new(
            types::READY,
            false,
            "Suspended",
            "spec.lifecycle is Suspended: the gateway refuses the device",
        ),
        (Some(_), Lifecycle::Quarantined) => Desired::new(
            types::READY,
            false,
            "Quarantined",
            "spec.lifecycle is Quarantined: the device may only report status and fetch remediation firmware",
        ),
        (Some(_), _) => Desired::new(
            types::READY,
            true,
            "Active",
            "enrolled with a valid certificate",
        ),
    };
    let expiring_condition = match &enrollment.identity {
        None => Desired::new(
            types::CERTIFICATE_EXPIRING,
            false,
            "NoCertificate",
            "no certificate",
        ),
        Some(id) if expired => Desired::new(
            types::CERTIFICATE_EXPIRING,
            true,
            "Expired",
            format!(
                "certificate {} expired at {}",
                id.serial_number, id.not_after.0
            ),
        ),
        Some(id) if expiring => Desired::new(
            types::CERTIFICATE_EXPIRING,
            true,
            "RenewalDue",
            format!(
                "certificate {} expires at {}; the device should re-enroll now",
                id.serial_number, id.not_after.0
            ),
        ),
        Some(id) => Desired::new(
            types::CERTIFICATE_EXPIRING,
            false,
            "Valid",
            format!(
                "certificate {} is valid until {}",
                id.serial_number, id.not_after.0
            ),
        ),
    };
    let degraded = enrollment.degraded.unwrap_or_else(|| {
        Desired::new(
            types::DEGRADED,
            false,
            "AsExpected",
            "nothing needs attention",
        )
    });

    // Compliance, judged on the status as it will be after this pass.
    let compliant = match inp.group {
        None => Desired::new(
            types::COMPLIANT,
            false,
            "GroupNotFound",
            "no DeviceGroup to take a policy from",
        ),
        Some(group) => {
            let mut evaluated = status.clone();
            evaluated.identity = enrollment.identity.clone();
            let eval = compliance::evaluate(&evaluated, &group.spec, inp.now);
            if let Some(t) = eval.next_change {
                let secs = u64::try_from(t.as_second().saturating_sub(inp.now.as_second()).max(1))
                    .unwrap_or(1);
                let at = Duration::from_secs(secs);
                plan.requeue_after = Some(plan.requeue_after.map_or(at, |r| r.min(at)));
            }
            Desired::new(
                types::COMPLIANT,
                eval.compliant(),
                eval.reason(),
                eval.message(),
            )
        }
    };

    // Events on transitions only, so an unchanged Device produces none.
    let previous = |t: &str| {
        crds::conditions::find(&status.conditions, t).map(|c| (c.status.clone(), c.reason.clone()))
    };
    let became =
        |d: &Desired<'_>| previous(d.type_) != Some((status_str(d.status), d.reason.to_string()));
    // A device's first verdict after it enrolled and checked in is not news (its status shows
    // it); a change after that is.
    let first_verdict = crds::conditions::find(&status.conditions, types::COMPLIANT)
        .is_some_and(|c| compliance::judged_before_report(&c.message));
    if let Some((was, _)) = previous(types::COMPLIANT)
        && was != status_str(compliant.status)
        && !(compliant.status && first_verdict)
    {
        plan.events.push(PlannedEvent {
            warning: !compliant.status,
            reason: if compliant.status {
                "Compliant"
            } else {
                "NonCompliant"
            },
            note: compliant.message.clone(),
        });
    }
    if degraded.status && became(&degraded) {
        plan.events.push(PlannedEvent {
            warning: true,
            reason: degraded.reason,
            note: degraded.message.clone(),
        });
    }
    if !enrollment.enrolled.status && plan.csr_denied.is_some() && became(&enrollment.enrolled) {
        plan.events.push(PlannedEvent {
            warning: true,
            reason: "CsrDenied",
            note: enrollment.enrolled.message.clone(),
        });
    }
    let new_fingerprint = enrollment.identity.as_ref().map(|i| &i.fingerprint_sha256);
    if new_fingerprint.is_some()
        && new_fingerprint != current_identity.as_ref().map(|i| &i.fingerprint_sha256)
    {
        plan.events.push(PlannedEvent {
            warning: false,
            reason: if current_identity.is_some() {
                "CertificateRotated"
            } else {
                "CertificateIssued"
            },
            note: format!(
                "certificate {} issued to {name}",
                enrollment
                    .identity
                    .as_ref()
                    .map(|i| i.serial_number.as_str())
                    .unwrap_or_default()
            ),
        });
    }

    plan.status = Some(StatusPlan {
        phase,
        identity: enrollment.identity,
        conditions: vec![
            ready,
            enrollment.enrolled,
            compliant,
            expiring_condition,
            degraded,
        ],
    });
    if let Some(wait) = settling(inp, &plan, phase) {
        plan.status = None;
        plan.requeue_after = Some(plan.requeue_after.map_or(wait, |r| r.min(wait)));
    }
    plan
}

/// How long a CertificateRequest may take before its Device is shown as Enrolling.
pub const ENROLLING_SETTLE: Duration = Duration::from_secs(10);

/// A Device moving from Pending to Enrolling because its CertificateRequest was just created
/// usually becomes Active a second or two later, when the issuer signs. Writing the short-lived
/// Enrolling status in between costs every Device one more API write (and a watch event to
/// every watcher) during a mass enrollment, so it is written only if the request is still
/// unsigned after `ENROLLING_SETTLE`: returns how long to wait before looking again.
fn settling(inp: &Inputs<'_>, plan: &Plan, phase: DevicePhase) -> Option<Duration> {
    let current = inp.device.status.as_ref().and_then(|s| s.phase);
    if phase != DevicePhase::Enrolling || !matches!(current, None | Some(DevicePhase::Pending)) {
        return None;
    }
    if plan.create_request.is_some() {
        return Some(ENROLLING_SETTLE);
    }
    let newest = inp
        .requests
        .iter()
        .filter_map(|r| r.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
        .max()?;
    let settle = jiff::SignedDuration::try_from(ENROLLING_SETTLE).ok()?;
    let left = (newest + settle).duration_since(inp.now);
    (left > jiff::SignedDuration::ZERO)
        .then(|| Duration::try_from(left).ok())
        .flatten()
}

fn status_str(b: bool) -> String {
    if b { "True" } else { "False" }.to_string()
}

fn retire(inp: &Inputs<'_>, plan: &mut Plan) {
    plan.delete_requests = inp
        .requests
        .iter()
        .filter_map(|r| r.metadata.name.clone())
        .collect();
    plan.delete_certificate =
        inp.certificate.is_some() || inp.device.spec.identity.mode == IdentityMode::ManagedKey;
    plan.revoke_serial = inp
        .device
        .status
        .as_ref()
        .and_then(|s| s.identity.as_ref())
        .map(|i| i.serial_number.clone());
}

/// The cleanup a deleted Device needs (the finalizer's work): same as retiring.
pub fn cleanup(inp: &Inputs<'_>) -> Plan {
    let mut plan = Plan::default();
    retire(inp, &mut plan);
    plan
}

fn spiffe_id(device: &Device, group: &DeviceGroup) -> String {
    crds::device::spiffe_id(
        &group.spec.certificates.trust_domain,
        device.metadata.namespace.as_deref().unwrap_or_default(),
        device.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn enroll_device_key(inp: &Inputs<'_>, group: &DeviceGroup, plan: &mut Plan) -> Enrollment {
    let device = inp.device;
    let name = device.metadata.name.as_deref().unwrap_or_default();
    let status = device.status.clone().unwrap_or_default();
    let mut identity = status.identity.clone();
    let spiffe = spiffe_id(device, group);
    let policy = Policy {
        device_name: name,
        spiffe_id: &spiffe,
        keys: &group.spec.certificates.keys,
        pinned_public_key_sha256: device.spec.identity.public_key_sha256.as_deref(),
    };
    let mut keep: BTreeSet<String> = identity.iter().filter_map(|i| i.source.clone()).collect();
    let mut degraded = None;
    let has_identity = identity.is_some();
    let issued_reason = if has_identity {
        "Issued"
    } else {
        "AwaitingCsr"
    };
    let mut enrolled = Desired::new(
        types::ENROLLED,
        has_identity,
        issued_reason,
        if has_identity {
            "the device holds a certificate issued by Fleetwarden".to_string()
        } else {
            "no CSR yet: the device enrolls through the gateway".to_string()
        },
    );
    let mut enrolling = false;

    if let Some(enr) = &status.enrollment {
        match csr_policy::check(&enr.csr, &policy) {
            Err(denial) => {
                plan.csr_denied = Some(denial.reason());
                let message = format!("CSR denied ({}): {denial}", denial.reason());
                // A request made before the policy changed is denied too.
                if let Ok(der) = csr_policy::decode_pem(&enr.csr) {
                    let stale = request_name(name, &hex_sha256(&der));
                    if let Some(cr) = inp
                        .requests
                        .iter()
                        .find(|r| r.metadata.name.as_deref() == Some(&stale))
                        && matches!(request_approval(cr), Approval::Pending)
                    {
                        plan.deny.push(Verdict {
                            request: stale.clone(),
                            message: message.clone(),
                            policy_reason: denial.reason(),
                        });
                        keep.insert(stale);
                    }
                }
                if has_identity {
                    degraded = Some(Desired::new(
                        types::DEGRADED,
                        true,
                        denial.reason(),
                        format!("renewal {message}"),
                    ));
                } else {
                    enrolled = Desired::new(types::ENROLLED, false, denial.reason(), message);
                }
            }
            Ok(accepted) => {
                let cr_name = request_name(name, &accepted.sha256);
                keep.insert(cr_name.clone());
                let already_issued =
                    identity.as_ref().and_then(|i| i.source.as_deref()) == Some(cr_name.as_str());
                if !already_issued {
                    enrolling = true;
                    let waiting = |what: String| {
                        Desired::new(
                            types::ENROLLED,
                            has_identity,
                            if has_identity { "Issued" } else { "Issuing" },
                            what,
                        )
                    };
                    match inp
                        .requests
                        .iter()
                        .find(|r| r.metadata.name.as_deref() == Some(&cr_name))
                    {
                        None => {
                            plan.create_request =
                                Some(certificate_request(device, group, &cr_name, &accepted));
                            plan.approve.push(approval(&cr_name));
                            enrolled = waiting(format!(
                                "CertificateRequest {cr_name} created and approved; waiting for the issuer"
                            ));
                        }
                        Some(cr) => {
                            let request_matches = STANDARD
                                .decode(&cr.spec.request)
                                .ok()
                                .and_then(|pem| String::from_utf8(pem).ok())
                                .and_then(|pem| csr_policy::decode_pem(&pem).ok())
                                .is_some_and(|der| der == accepted.der);
                            match request_approval(cr) {
                                Approval::Denied(msg) => {
                                    let message =
                                        format!("CertificateRequest {cr_name} was denied: {msg}");
                                    if has_identity {
                                        degraded = Some(Desired::new(
                                            types::DEGRADED,
                                            true,
                                            "RenewalDenied",
                                            message,
                                        ));
                                    } else {
                                        enrolled = Desired::new(
                                            types::ENROLLED,
                                            false,
                                            "CsrDenied",
                                            message,
                                        );
                                    }
                                }
                                Approval::BySomeoneElse(by) => {
                                    degraded = Some(foreign_approval(&cr_name, by));
                                    enrolled = waiting(format!(
                                        "CertificateRequest {cr_name} was approved by someone else; its certificate is not trusted"
                                    ));
                                }
                                Approval::Pending if !request_matches => {
                                    degraded = Some(mismatch(&cr_name));
                                }
                                Approval::Pending => {
                                    plan.approve.push(approval(&cr_name));
                                    enrolled = waiting(format!(
                                        "CertificateRequest {cr_name} approved; waiting for the issuer"
                                    ));
                                }
                                Approval::ByUs => match issuance(cr) {
                                    Issuance::Waiting => {
                                        enrolled = waiting(format!(
                                            "waiting for issuer {} to sign CertificateRequest {cr_name}",
                                            group.spec.certificates.issuer_ref.name
                                        ));
                                    }
                                    Issuance::Failed(msg) => {
                                        let message = format!(
                                            "issuing CertificateRequest {cr_name} failed: {msg}"
                                        );
                                        if has_identity {
                                            degraded = Some(Desired::new(
                                                types::DEGRADED,
                                                true,
                                                "RenewalFailed",
                                                message,
                                            ));
                                        } else {
                                            enrolled = Desired::new(
                                                types::ENROLLED,
                                                false,
                                                "IssuanceFailed",
                                                message,
                                            );
                                        }
                                    }
                                    Issuance::Issued { certificate, ca } => {
                                        match identity::inspect(
                                            &certificate,
                                            &spiffe,
                                            Some(&accepted.public_key_sha256),
                                        ) {
                                            Ok(issued) => {
                                                identity =
                                                    Some(issued.to_status(&spiffe, ca, &cr_name));
                                                keep = [cr_name.clone()]
                                                    .into_iter()
                                                    .chain(keep)
                                                    .collect();
                                                enrolling = false;
                                                enrolled = Desired::new(
                                                    types::ENROLLED,
                                                    true,
                                                    "Issued",
                                                    "the device holds a certificate issued by Fleetwarden",
                                                );
                                            }
                                            Err(e) => {
                                                degraded = Some(Desired::new(
                                                    types::DEGRADED,
                                                    true,
                                                    e.reason(),
                                                    format!(
                                                        "CertificateRequest {cr_name}: {e}; not trusted"
                                                    ),
                                                ));
                                            }
                                        }
                                    }
                                },
                            }
                        }
                    }
                }
            }
        }
    }

    // Keep the request behind the identity in use and the one for the latest CSR; drop others.
    plan.delete_requests = inp
        .requests
        .iter()
        .filter_map(|r| r.metadata.name.clone())
        .filter(|n| !keep.contains(n))
        .collect();
    Enrollment {
        identity,
        enrolled,
        degraded,
        enrolling,
    }
}

fn enroll_managed_key(inp: &Inputs<'_>, group: &DeviceGroup, plan: &mut Plan) -> Enrollment {
    let device = inp.device;
    let name = device.metadata.name.as_deref().unwrap_or_default();
    let spiffe = spiffe_id(device, group);
    let cert_name = managed_certificate_name(name);
    let mut identity = device.status.as_ref().and_then(|s| s.identity.clone());
    let has_identity = identity.is_some();

    let desired = managed_certificate(device, group, &cert_name, &spiffe);
    if inp.certificate.map(|c| &c.spec) != Some(&desired.spec) {
        plan.apply_certificate = Some(desired);
    }

    let policy = Policy {
        device_name: name,
        spiffe_id: &spiffe,
        keys: &group.spec.certificates.keys,
        pinned_public_key_sha256: None,
    };
    let mut degraded = None;
    for cr in &inp.certificate_requests {
        let Some(cr_name) = cr.metadata.name.clone() else {
            continue;
        };
        match request_approval(cr) {
            Approval::Pending => {
                let pem = STANDARD
                    .decode(&cr.spec.request)
                    .ok()
                    .and_then(|p| String::from_utf8(p).ok())
                    .unwrap_or_default();
                match csr_policy::check(&pem, &policy) {
                    Ok(_) => plan.approve.push(approval(&cr_name)),
                    Err(denial) => {
                        plan.csr_denied = Some(denial.reason());
                        plan.deny.push(Verdict {
                            request: cr_name,
                            message: format!("CSR denied ({}): {denial}", denial.reason()),
                            policy_reason: denial.reason(),
                        });
                    }
                }
            }
            Approval::BySomeoneElse(by) => degraded = Some(foreign_approval(&cr_name, by)),
            Approval::ByUs | Approval::Denied(_) => {}
        }
    }

    let ready = inp
        .certificate
        .and_then(|c| c.status.as_ref())
        .is_some_and(|s| certmanager::condition_true(&s.conditions, certmanager::condition::READY));
    let mut enrolled = Desired::new(
        types::ENROLLED,
        has_identity,
        if has_identity { "Issued" } else { "Issuing" },
        if has_identity {
            format!(
                "the device holds the certificate of Certificate {cert_name} (ManagedKey: the key is in a Secret)"
            )
        } else {
            format!("waiting for cert-manager to issue Certificate {cert_name}")
        },
    );
    if degraded.is_none()
        && let Some((certificate, ca)) = inp.managed_secret.as_ref().filter(|_| ready)
    {
        match identity::inspect(certificate, &spiffe, None) {
            Ok(issued) => {
                identity = Some(issued.to_status(&spiffe, ca.clone(), &cert_name));
                enrolled = Desired::new(
                    types::ENROLLED,
                    true,
                    "Issued",
                    format!(
                        "the device holds the certificate of Certificate {cert_name} (ManagedKey: the key is in a Secret)"
                    ),
                );
            }
            Err(e) => {
                degraded = Some(Desired::new(
                    types::DEGRADED,
                    true,
                    e.reason(),
                    format!("Certificate {cert_name}: {e}; not trusted"),
                ));
            }
        }
    }
    Enrollment {
        identity: identity.clone(),
        enrolled,
        degraded,
        enrolling: identity.is_none(),
    }
}

fn approval(cr_name: &str) -> Verdict {
    Verdict {
        request: cr_name.to_string(),
        message: "approved by Fleetwarden: the CSR names the device's SPIFFE ID and meets the DeviceGroup key policy".into(),
        policy_reason: "Approved",
    }
}

fn foreign_approval(cr_name: &str, by: &str) -> Desired<'static> {
    Desired::new(
        types::DEGRADED,
        true,
        "ForeignApproval",
        format!(
            "CertificateRequest {cr_name} was approved by another approver (reason {by:?}), not by Fleetwarden; its certificate is not trusted. Disable cert-manager's built-in approver for device issuers"
        ),
    )
}

fn mismatch(cr_name: &str) -> Desired<'static> {
    Desired::new(
        types::DEGRADED,
        true,
        "CertificateRequestMismatch",
        format!(
            "CertificateRequest {cr_name} does not carry the device's CSR; delete it so Fleetwarden can recreate it"
        ),
    )
}

fn owner_meta(device: &Device, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: device.metadata.namespace.clone(),
        labels: Some(
            [
                (
                    MANAGED_BY_LABEL.0.to_string(),
                    MANAGED_BY_LABEL.1.to_string(),
                ),
                (
                    DEVICE_UID_LABEL.to_string(),
                    device.metadata.uid.clone().unwrap_or_default(),
                ),
            ]
            .into(),
        ),
        annotations: Some(
            [(
                DEVICE_ANNOTATION.to_string(),
                device.metadata.name.clone().unwrap_or_default(),
            )]
            .into(),
        ),
        owner_references: device.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

fn certificate_request(
    device: &Device,
    group: &DeviceGroup,
    cr_name: &str,
    csr: &csr_policy::Accepted,
) -> CertificateRequest {
    let mut metadata = owner_meta(device, cr_name);
    metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(CSR_SHA256_ANNOTATION.to_string(), csr.sha256.clone());
    CertificateRequest {
        metadata,
        spec: CertificateRequestSpec {
            request: STANDARD.encode(pem_encode("CERTIFICATE REQUEST", &csr.der)),
            issuer_ref: group.spec.certificates.issuer_ref.clone(),
            duration: Some(group.spec.certificates.duration.to_string()),
            usages: vec![
                USAGE_CLIENT_AUTH.to_string(),
                USAGE_DIGITAL_SIGNATURE.to_string(),
            ],
            is_ca: false,
        },
        status: None,
    }
}

fn managed_certificate(
    device: &Device,
    group: &DeviceGroup,
    cert_name: &str,
    spiffe: &str,
) -> Certificate {
    let certs = &group.spec.certificates;
    Certificate {
        metadata: owner_meta(device, cert_name),
        spec: CertificateSpec {
            secret_name: managed_secret_name(device.metadata.name.as_deref().unwrap_or_default()),
            issuer_ref: certs.issuer_ref.clone(),
            common_name: device.metadata.name.clone(),
            duration: Some(certs.duration.to_string()),
            renew_before: Some(certs.renew_before.to_string()),
            dns_names: Vec::new(),
            uris: vec![spiffe.to_string()],
            usages: vec![
                USAGE_CLIENT_AUTH.to_string(),
                USAGE_DIGITAL_SIGNATURE.to_string(),
            ],
            private_key: Some(CertificatePrivateKey {
                algorithm: Some("ECDSA".into()),
                size: Some(256),
                rotation_policy: Some("Always".into()),
            }),
        },
        status: None,
    }
}

#[cfg(test)]
mod tests {
    //! Scenarios: given a device, its group and its cert-manager objects, then this plan.
    use super::*;
    use crds::{
        certmanager::{CertificateRequestStatus, CertificateStatus},
        common::IssuerRef,
        conditions,
        device::{DeviceSpec, DeviceStatus, EnrollmentMethod, EnrollmentStatus, IdentitySpec},
        group::DeviceGroupSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};

    const NS: &str = "plant";
    const SPIFFE: &str = "spiffe://fleet.example/ns/plant/device/plc-1";

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn group() -> DeviceGroup {
        let mut spec: DeviceGroupSpec = serde_json::from_value(serde_json::json!({
            "certificates": {"issuerRef": {"name": "device-ca"}, "trustDomain": "fleet.example"}
        }))
        .unwrap();
        spec.certificates.issuer_ref = IssuerRef {
            name: "device-ca".into(),
            kind: Default::default(),
            group: "cert-manager.io".into(),
        };
        let mut g = DeviceGroup::new("cell", spec);
        g.metadata.namespace = Some(NS.into());
        g
    }

    fn device(status: Option<DeviceStatus>) -> Device {
        let mut d = Device::new(
            "plc-1",
            DeviceSpec {
                group: "cell".into(),
                hardware_model: "m".into(),
                serial_number: None,
                lifecycle: Lifecycle::Active,
                identity: IdentitySpec::default(),
                addresses: vec![],
                location: None,
            },
        );
        d.metadata.namespace = Some(NS.into());
        d.metadata.uid = Some("uid-1".into());
        d.metadata.generation = Some(1);
        d.status = status;
        d
    }

    fn csr_pem(key: &KeyPair, uri: &str) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn enrolling(csr: &str) -> DeviceStatus {
        DeviceStatus {
            enrollment: Some(EnrollmentStatus {
                csr: csr.into(),
                csr_sha256: hex_sha256(&csr_policy::decode_pem(csr).unwrap()),
                method: EnrollmentMethod::Token,
                requested_at: Time(now()),
            }),
            ..DeviceStatus::default()
        }
    }

    fn request(
        name: &str,
        csr: &str,
        approval: Option<(&str, &str)>,
        certificate: Option<&str>,
    ) -> CertificateRequest {
        let d = device(None);
        let mut cr = CertificateRequest {
            metadata: owner_meta(&d, name),
            spec: CertificateRequestSpec {
                request: STANDARD.encode(csr),
                issuer_ref: group().spec.certificates.issuer_ref,
                duration: None,
                usages: vec![],
                is_ca: false,
            },
            status: None,
        };
        let mut conditions = Vec::new();
        if let Some((type_, reason)) = approval {
            conditions.push(certmanager::CertManagerCondition::new(
                type_,
                true,
                reason,
                "",
                Time(now()),
            ));
        }
        if let Some(cert) = certificate {
            conditions.push(certmanager::CertManagerCondition::new(
                "Ready",
                true,
                "Issued",
                "",
                Time(now()),
            ));
            cr.status = Some(CertificateRequestStatus {
                conditions,
                certificate: Some(STANDARD.encode(cert)),
                ca: None,
                failure_time: None,
            });
        } else {
            cr.status = Some(CertificateRequestStatus {
                conditions,
                ..Default::default()
            });
        }
        cr
    }

    fn inputs<'a>(
        device: &'a Device,
        group: Option<&'a DeviceGroup>,
        requests: Vec<&'a CertificateRequest>,
    ) -> Inputs<'a> {
        Inputs {
            device,
            group,
            requests,
            certificate: None,
            certificate_requests: vec![],
            managed_secret: None,
            now: now(),
        }
    }

    fn condition<'a>(plan: &'a Plan, type_: &str) -> &'a Desired<'static> {
        plan.status
            .as_ref()
            .unwrap()
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    /// Writes the plan's status into the device as the API server would store it.
    fn stored(device: &Device, plan: &Plan) -> Device {
        let s = plan.status.as_ref().unwrap();
        let mut next = device.clone();
        let mut status = next.status.clone().unwrap_or_default();
        status.phase = Some(s.phase);
        status.identity = s.identity.clone();
        status.conditions = conditions::build_all(
            &status.conditions,
            s.conditions.clone(),
            Some(1),
            &Time(now()),
        );
        next.status = Some(status);
        next
    }

    #[test]
    fn a_device_without_a_csr_waits_for_enrollment() {
        let d = device(None);
        let g = group();
        let plan = plan(&inputs(&d, Some(&g), vec![]));
        assert_eq!(plan.status.as_ref().unwrap().phase, DevicePhase::Pending);
        assert_eq!(condition(&plan, types::ENROLLED).reason, "AwaitingCsr");
        assert!(plan.create_request.is_none() && plan.approve.is_empty() && plan.events.is_empty());
    }

    #[test]
    fn a_valid_csr_gets_a_deterministic_request_that_fleetwarden_approves() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_pem(&key, SPIFFE);
        let d = device(Some(enrolling(&csr)));
        let g = group();
        let plan = plan(&inputs(&d, Some(&g), vec![]));
        let cr = plan.create_request.as_ref().expect("a CertificateRequest");
        let sha = hex_sha256(&csr_policy::decode_pem(&csr).unwrap());
        assert_eq!(
            cr.metadata.name.as_deref(),
            Some(request_name("plc-1", &sha).as_str())
        );
        assert_eq!(cr.spec.usages, ["client auth", "digital signature"]);
        assert_eq!(cr.spec.issuer_ref.name, "device-ca");
        let owner = &cr.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Device", Some(true))
        );
        assert_eq!(plan.approve.len(), 1);
        // Enrolling is not written while the new request may still be signed promptly.
        assert!(plan.status.is_none());
        assert_eq!(plan.requeue_after, Some(ENROLLING_SETTLE));
        // Planning again from the same inputs plans the same (restart-safe, no duplicates).
        assert_eq!(
            plan.create_request,
            super::plan(&inputs(&d, Some(&g), vec![])).create_request
        );

        // Created a second ago and unsigned: still settling, look again when the time is up.
        let name = request_name("plc-1", &sha);
        let mut cr = request(&name, &csr, Some(("Approved", APPROVAL_REASON)), None);
        cr.metadata.creation_timestamp = Some(Time(now() - jiff::SignedDuration::from_secs(1)));
        let settling = super::plan(&inputs(&d, Some(&g), vec![&cr]));
        assert!(settling.status.is_none());
        assert_eq!(settling.requeue_after, Some(Duration::from_secs(9)));
        // Still unsigned after ENROLLING_SETTLE: the Device shows Enrolling.
        cr.metadata.creation_timestamp = Some(Time(now() - jiff::SignedDuration::from_secs(11)));
        let slow = super::plan(&inputs(&d, Some(&g), vec![&cr]));
        assert_eq!(slow.status.as_ref().unwrap().phase, DevicePhase::Enrolling);
        assert!(!condition(&slow, types::ENROLLED).status);
    }

    #[test]
    fn a_csr_for_another_device_is_denied_once_with_its_reason() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_pem(&key, "spiffe://fleet.example/ns/plant/device/plc-2");
        let d = device(Some(enrolling(&csr)));
        let g = group();
        let first = plan(&inputs(&d, Some(&g), vec![]));
        assert!(first.create_request.is_none() && first.approve.is_empty());
        assert_eq!(
            condition(&first, types::ENROLLED).reason,
            "SpiffeIdMismatch"
        );
        assert_eq!(first.csr_denied, Some("SpiffeIdMismatch"));
        assert_eq!(
            first.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["CsrDenied"]
        );
        let again = plan(&inputs(&stored(&d, &first), Some(&g), vec![]));
        assert!(
            again.events.is_empty(),
            "no repeated event: {:?}",
            again.events
        );
    }

    /// plc-1's request for `csr`, approved by Fleetwarden and signed.
    fn signed_request(csr: &str) -> (String, CertificateRequest) {
        let sha = hex_sha256(&csr_policy::decode_pem(csr).unwrap());
        let name = request_name("plc-1", &sha);
        let cert = rcgen_cert(csr);
        let cr = request(&name, csr, Some(("Approved", APPROVAL_REASON)), Some(&cert));
        (name, cr)
    }

    #[test]
    fn an_issued_certificate_becomes_the_identity_and_a_second_pass_changes_nothing() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_pem(&key, SPIFFE);
        let d = device(Some(enrolling(&csr)));
        let g = group();
        let (name, cr) = signed_request(&csr);
        let first = plan(&inputs(&d, Some(&g), vec![&cr]));
        let st = first.status.as_ref().unwrap();
        let identity = st.identity.as_ref().expect("identity");
        assert_eq!(identity.spiffe_id, SPIFFE);
        assert_eq!(identity.source.as_deref(), Some(name.as_str()));
        assert_eq!(st.phase, DevicePhase::Active);
        assert!(
            condition(&first, types::READY).status && condition(&first, types::ENROLLED).status
        );
        assert_eq!(
            first.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["CertificateIssued"]
        );

        let settled = stored(&d, &first);
        let second = plan(&inputs(&settled, Some(&g), vec![&cr]));
        assert_eq!(second.status, first.status);
        assert!(
            second.events.is_empty()
                && second.approve.is_empty()
                && second.create_request.is_none()
        );
        assert!(second.delete_requests.is_empty());
    }

    #[test]
    fn the_first_check_in_is_not_an_event_but_later_compliance_changes_are() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_pem(&key, SPIFFE);
        let d = device(Some(enrolling(&csr)));
        let g = group();
        let (_, cr) = signed_request(&csr);
        let enrolled = stored(&d, &plan(&inputs(&d, Some(&g), vec![&cr])));
        assert!(
            !condition(
                &plan(&inputs(&enrolled, Some(&g), vec![&cr])),
                types::COMPLIANT
            )
            .status
        );

        let seen = |d: &Device, at: Timestamp| {
            let mut d = d.clone();
            d.status.as_mut().unwrap().last_seen = Some(Time(at));
            d
        };
        // First check-in: Compliant turns True quietly.
        let first = seen(&enrolled, now());
        let p = plan(&inputs(&first, Some(&g), vec![&cr]));
        assert!(condition(&p, types::COMPLIANT).status);
        assert!(p.events.is_empty(), "{:?}", p.events);

        // Offline later: a Warning; back online: an Event.
        let offline_at = now() - jiff::SignedDuration::from_hours(24 * 30);
        let offline = seen(&stored(&first, &p), offline_at);
        let p = plan(&inputs(&offline, Some(&g), vec![&cr]));
        assert!(!condition(&p, types::COMPLIANT).status);
        assert_eq!(
            p.events
                .iter()
                .map(|e| (e.reason, e.warning))
                .collect::<Vec<_>>(),
            [("NonCompliant", true)]
        );
        let back = seen(&stored(&offline, &p), now());
        let p = plan(&inputs(&back, Some(&g), vec![&cr]));
        assert_eq!(
            p.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["Compliant"]
        );
    }

    #[test]
    fn a_request_approved_by_someone_else_is_reported_and_not_trusted() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_pem(&key, SPIFFE);
        let d = device(Some(enrolling(&csr)));
        let g = group();
        let name = request_name("plc-1", &hex_sha256(&csr_policy::decode_pem(&csr).unwrap()));
        let cert = rcgen_cert(&csr);
        let cr = request(
            &name,
            &csr,
            Some(("Approved", "cert-manager.io")),
            Some(&cert),
        );
        let plan = plan(&inputs(&d, Some(&g), vec![&cr]));
        assert!(plan.status.as_ref().unwrap().identity.is_none());
        let degraded = condition(&plan, types::DEGRADED);
        assert!(degraded.status);
        assert_eq!(degraded.reason, "ForeignApproval");
        assert!(degraded.message.contains("built-in approver"));
    }

    #[test]
    fn retiring_revokes_and_removes_every_owned_object() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_pem(&key, SPIFFE);
        let g = group();
        let name = request_name("plc-1", &hex_sha256(&csr_policy::decode_pem(&csr).unwrap()));
        let cr = request(
            &name,
            &csr,
            Some(("Approved", APPROVAL_REASON)),
            Some(&rcgen_cert(&csr)),
        );
        let enrolled = stored(
            &device(Some(enrolling(&csr))),
            &plan(&inputs(&device(Some(enrolling(&csr))), Some(&g), vec![&cr])),
        );
        let serial = enrolled
            .status
            .as_ref()
            .unwrap()
            .identity
            .as_ref()
            .unwrap()
            .serial_number
            .clone();
        let mut retired = enrolled.clone();
        retired.spec.lifecycle = Lifecycle::Retired;
        let plan = plan(&inputs(&retired, Some(&g), vec![&cr]));
        assert_eq!(plan.delete_requests, [name]);
        assert_eq!(plan.revoke_serial, Some(serial));
        let st = plan.status.as_ref().unwrap();
        assert!(st.identity.is_none());
        assert_eq!(st.phase, DevicePhase::Retired);
        assert!(!condition(&plan, types::READY).status);
    }

    #[test]
    fn suspended_and_quarantined_devices_keep_their_identity_but_are_not_ready() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_pem(&key, SPIFFE);
        let g = group();
        let name = request_name("plc-1", &hex_sha256(&csr_policy::decode_pem(&csr).unwrap()));
        let cr = request(
            &name,
            &csr,
            Some(("Approved", APPROVAL_REASON)),
            Some(&rcgen_cert(&csr)),
        );
        let d0 = device(Some(enrolling(&csr)));
        let enrolled = stored(&d0, &plan(&inputs(&d0, Some(&g), vec![&cr])));
        for (lifecycle, phase, reason) in [
            (Lifecycle::Suspended, DevicePhase::Suspended, "Suspended"),
            (
                Lifecycle::Quarantined,
                DevicePhase::Quarantined,
                "Quarantined",
            ),
        ] {
            let mut d = enrolled.clone();
            d.spec.lifecycle = lifecycle;
            let p = plan(&inputs(&d, Some(&g), vec![&cr]));
            let st = p.status.as_ref().unwrap();
            assert_eq!(st.phase, phase);
            assert!(st.identity.is_some(), "{lifecycle:?} keeps the identity");
            let ready = condition(&p, types::READY);
            assert!(!ready.status);
            assert_eq!(ready.reason, reason);
            assert!(condition(&p, types::ENROLLED).status);
            assert!(p.delete_requests.is_empty() && p.revoke_serial.is_none());
        }
    }

    #[test]
    fn renewal_replaces_the_identity_and_then_drops_the_old_request() {
        let g = group();
        let old_csr = csr_pem(&KeyPair::generate().unwrap(), SPIFFE);
        let old_name = request_name(
            "plc-1",
            &hex_sha256(&csr_policy::decode_pem(&old_csr).unwrap()),
        );
        let old_cr = request(
            &old_name,
            &old_csr,
            Some(("Approved", APPROVAL_REASON)),
            Some(&rcgen_cert(&old_csr)),
        );
        let d0 = device(Some(enrolling(&old_csr)));
        let enrolled = stored(&d0, &plan(&inputs(&d0, Some(&g), vec![&old_cr])));
        let old_fp = enrolled
            .status
            .as_ref()
            .unwrap()
            .identity
            .as_ref()
            .unwrap()
            .fingerprint_sha256
            .clone();

        // The device re-enrolls with a new key: a second request, the old one kept meanwhile.
        let new_csr = csr_pem(&KeyPair::generate().unwrap(), SPIFFE);
        let mut renewing = enrolled.clone();
        renewing.status.as_mut().unwrap().enrollment = enrolling(&new_csr).enrollment;
        let p = plan(&inputs(&renewing, Some(&g), vec![&old_cr]));
        assert!(p.create_request.is_some());
        assert!(p.delete_requests.is_empty());
        assert_eq!(
            p.status.as_ref().unwrap().phase,
            DevicePhase::Active,
            "still served while renewing"
        );

        let new_name = p
            .create_request
            .as_ref()
            .unwrap()
            .metadata
            .name
            .clone()
            .unwrap();
        let new_cr = request(
            &new_name,
            &new_csr,
            Some(("Approved", APPROVAL_REASON)),
            Some(&rcgen_cert(&new_csr)),
        );
        let p = plan(&inputs(&renewing, Some(&g), vec![&old_cr, &new_cr]));
        let new_identity = p.status.as_ref().unwrap().identity.clone().unwrap();
        assert_ne!(new_identity.fingerprint_sha256, old_fp);
        assert_eq!(
            p.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["CertificateRotated"]
        );
        let rotated = stored(&renewing, &p);
        let p = plan(&inputs(&rotated, Some(&g), vec![&old_cr, &new_cr]));
        assert_eq!(p.delete_requests, [old_name]);
    }

    #[test]
    fn a_certificate_inside_its_renewal_window_is_flagged_until_expiry() {
        let g = group();
        let csr = csr_pem(&KeyPair::generate().unwrap(), SPIFFE);
        let name = request_name("plc-1", &hex_sha256(&csr_policy::decode_pem(&csr).unwrap()));
        let cr = request(
            &name,
            &csr,
            Some(("Approved", APPROVAL_REASON)),
            Some(&rcgen_cert(&csr)),
        );
        let d0 = device(Some(enrolling(&csr)));
        let enrolled = stored(&d0, &plan(&inputs(&d0, Some(&g), vec![&cr])));
        let not_after = enrolled
            .status
            .as_ref()
            .unwrap()
            .identity
            .as_ref()
            .unwrap()
            .not_after
            .0;

        let mut later = inputs(&enrolled, Some(&g), vec![&cr]);
        later.now = not_after - jiff::SignedDuration::from_hours(24);
        let p = plan(&later);
        assert!(p.expiring);
        assert_eq!(
            condition(&p, types::CERTIFICATE_EXPIRING).reason,
            "RenewalDue"
        );
        assert!(condition(&p, types::READY).status, "still valid");
        assert_eq!(p.requeue_after, Some(Duration::from_secs(24 * 3600)));

        later.now = not_after + jiff::SignedDuration::from_secs(1);
        let p = plan(&later);
        assert_eq!(condition(&p, types::READY).reason, "CertificateExpired");
        assert_eq!(p.status.as_ref().unwrap().phase, DevicePhase::Pending);
    }

    #[test]
    fn a_missing_group_degrades_the_device_with_the_fix() {
        let d = device(None);
        let p = plan(&inputs(&d, None, vec![]));
        let degraded = condition(&p, types::DEGRADED);
        assert_eq!(degraded.reason, "GroupNotFound");
        assert!(degraded.message.contains("spec.group"));
    }

    #[test]
    fn managed_key_devices_get_a_certificate_whose_requests_fleetwarden_approves() {
        let g = group();
        let mut d = device(None);
        d.spec.identity.mode = IdentityMode::ManagedKey;
        let p = plan(&inputs(&d, Some(&g), vec![]));
        let cert = p.apply_certificate.clone().expect("a Certificate");
        assert_eq!(cert.spec.uris, [SPIFFE]);
        assert_eq!(cert.spec.secret_name, "plc-1-identity-tls");

        let key = KeyPair::generate().unwrap();
        let good = request("plc-1-identity-1", &csr_pem(&key, SPIFFE), None, None);
        let bad = request(
            "plc-1-identity-2",
            &csr_pem(&key, "spiffe://x/ns/y/device/z"),
            None,
            None,
        );
        let mut issued = cert.clone();
        issued.status = Some(CertificateStatus {
            conditions: vec![certmanager::CertManagerCondition::new(
                "Ready",
                true,
                "Ready",
                "",
                Time(now()),
            )],
            ..Default::default()
        });
        let mut inp = inputs(&d, Some(&g), vec![]);
        inp.certificate = Some(&issued);
        inp.certificate_requests = vec![&good, &bad];
        let p = plan(&inp);
        assert!(
            p.apply_certificate.is_none(),
            "an unchanged Certificate is not re-applied"
        );
        assert_eq!(
            p.approve
                .iter()
                .map(|v| v.request.as_str())
                .collect::<Vec<_>>(),
            ["plc-1-identity-1"]
        );
        assert_eq!(
            p.deny.iter().map(|v| v.policy_reason).collect::<Vec<_>>(),
            ["SpiffeIdMismatch"]
        );

        assert!(needs_managed_secret(&d, Some(&issued)));
        let csr = csr_pem(&key, SPIFFE);
        inp.managed_secret = Some((rcgen_cert(&csr), None));
        let p = plan(&inp);
        let id = p
            .status
            .as_ref()
            .unwrap()
            .identity
            .clone()
            .expect("identity from the Secret");
        assert_eq!(id.source.as_deref(), Some("plc-1-identity"));
    }

    /// Signs like cert-manager's CA issuer: the CSR's key and SANs, valid 2026-11-25 to
    /// 2027-02-23 (90 days), by a throwaway CA.
    fn rcgen_cert(csr: &str) -> String {
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = Issuer::new(params, KeyPair::generate().unwrap());
        let mut req = rcgen::CertificateSigningRequestParams::from_pem(csr).unwrap();
        req.params.not_before = rcgen::date_time_ymd(2026, 11, 25);
        req.params.not_after = rcgen::date_time_ymd(2027, 2, 23);
        req.signed_by(&ca).unwrap().pem()
    }
}
