//! Who may do what, decided from plain values: the client certificate presented in the TLS
//! handshake (already proven to belong to the client: the handshake checked its signature), and
//! the Device and DeviceGroup as the watch caches hold them. No I/O, no API calls.
//!
//! A device certificate is authorised by identity, not by chain: its URI SAN names a Device,
//! and its SHA-256 fingerprint must equal the one the operator recorded in that Device's
//! `status.identity`. Rotating, retiring or clearing the identity therefore revokes the old
//! certificate on the very next request, without CRLs.

use axum::http::StatusCode;
use crds::{
    Device, DeviceGroup, conditions,
    device::{DeviceId, Lifecycle, parse_spiffe_id},
    hex_sha256,
};
use jiff::Timestamp;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

pub use crds::wire::Scope;

/// A client certificate as the gateway sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate {
    pub der: Vec<u8>,
    pub fingerprint_sha256: String,
    /// The device its URI SAN names, if it names one.
    pub device: Option<DeviceId>,
    pub not_after: Option<Timestamp>,
    /// Subject serialNumber, else CN: how a manufacturer certificate names its device.
    pub subject_serial: Option<String>,
    /// Whether the chain leads to the fleet CA; `None` when the gateway has no fleet CA
    /// configured (identity is then proven by the fingerprint alone).
    pub chains_to_fleet_ca: Option<bool>,
}

impl PeerCertificate {
    /// Reads the leaf certificate of a TLS peer. `None` when it does not parse (rustls accepted
    /// it as a certificate, so this is rare).
    pub fn parse(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
        let mut uris = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push(*u);
                }
            }
        }
        let device = match uris.as_slice() {
            [one] => parse_spiffe_id(one),
            _ => None,
        };
        let subject = cert.subject();
        let serial = subject
            .iter_attributes()
            .find(|a| a.attr_type() == &x509_parser::oid_registry::OID_X509_SERIALNUMBER)
            .or_else(|| subject.iter_common_name().next())
            .and_then(|a| a.as_str().ok())
            .map(str::to_string);
        Some(Self {
            chains_to_fleet_ca: None,
            der: der.to_vec(),
            fingerprint_sha256: hex_sha256(der),
            device,
            not_after: Timestamp::from_second(cert.validity().not_after.timestamp()).ok(),
            subject_serial: serial,
        })
    }
}

/// Why a request was refused. Every refusal is a 4xx with this reason in the body and in the
/// `fleetwarden_gateway_refusals_total` metric.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no client certificate: present the device certificate issued at enrollment")]
    NoClientCertificate,
    #[error(
        "the client certificate names no device (expected one URI SAN spiffe://<trust-domain>/ns/<namespace>/device/<name>)"
    )]
    NotADeviceCertificate,
    #[error("device {0} is unknown")]
    UnknownDevice(String),
    #[error("device {0} is retired")]
    DeviceRetired(String),
    #[error("device {0} is suspended")]
    DeviceSuspended(String),
    #[error("device {0} has no identity yet; enroll first")]
    NotEnrolled(String),
    #[error("this certificate is not the current certificate of device {0} (rotated or revoked)")]
    CertificateRevoked(String),
    #[error("the client certificate has expired; enroll again")]
    CertificateExpired,
    #[error("the client certificate is not issued by the fleet CA")]
    UntrustedCertificate,
    #[error("the certificate's trust domain {found:?} is not the DeviceGroup's {expected:?}")]
    WrongTrustDomain { found: String, expected: String },
    #[error("DeviceGroup {0} of the device is missing")]
    GroupNotFound(String),
    #[error(
        "restricted scope: the device is quarantined or non-compliant and may only report status and fetch remediation firmware"
    )]
    Restricted,
    #[error("{0}")]
    BadRequest(String),
    #[error("enrollment refused: {0}")]
    EnrollmentRefused(String),
    #[error("invalid or expired enrollment token")]
    BadToken,
    #[error(
        "the enrollment token was already used: this device has an identity; re-enroll with its certificate at /.well-known/est/simplereenroll"
    )]
    TokenAlreadyUsed,
    #[error("the manufacturer certificate is not trusted by DeviceGroup {group}: {why}")]
    UntrustedManufacturerCertificate { group: String, why: String },
    #[error(
        "the manufacturer certificate names serial {found:?}, but device {device} has serial {expected:?}"
    )]
    ManufacturerSerialMismatch {
        device: String,
        found: String,
        expected: String,
    },
    #[error("the CSR names device {csr}, but the certificate authenticates {cert}")]
    CsrForAnotherDevice { csr: String, cert: String },
    #[error("CSR denied by policy ({reason}): {message}")]
    CsrDenied { reason: String, message: String },
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("too many requests; retry later")]
    Overloaded,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoClientCertificate => "NoClientCertificate",
            Refusal::NotADeviceCertificate => "NotADeviceCertificate",
            Refusal::UnknownDevice(_) => "UnknownDevice",
            Refusal::DeviceRetired(_) => "DeviceRetired",
            Refusal::DeviceSuspended(_) => "DeviceSuspended",
            Refusal::NotEnrolled(_) => "NotEnrolled",
            Refusal::CertificateRevoked(_) => "CertificateRevoked",
            Refusal::CertificateExpired => "CertificateExpired",
            Refusal::UntrustedCertificate => "UntrustedCertificate",
            Refusal::WrongTrustDomain { .. } => "WrongTrustDomain",
            Refusal::GroupNotFound(_) => "GroupNotFound",
            Refusal::Restricted => "Restricted",
            Refusal::BadRequest(_) => "BadRequest",
            Refusal::EnrollmentRefused(_) => "EnrollmentRefused",
            Refusal::BadToken => "BadToken",
            Refusal::TokenAlreadyUsed => "TokenAlreadyUsed",
            Refusal::UntrustedManufacturerCertificate { .. } => "UntrustedManufacturerCertificate",
            Refusal::ManufacturerSerialMismatch { .. } => "ManufacturerSerialMismatch",
            Refusal::CsrForAnotherDevice { .. } => "CsrForAnotherDevice",
            Refusal::CsrDenied { .. } => "CsrDenied",
            Refusal::BodyTooLarge(_) => "BodyTooLarge",
            Refusal::Overloaded => "Overloaded",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoClientCertificate
            | Refusal::NotADeviceCertificate
            | Refusal::CertificateRevoked(_)
            | Refusal::CertificateExpired
            | Refusal::UntrustedCertificate
            | Refusal::BadToken => StatusCode::UNAUTHORIZED,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Refusal::UnknownDevice(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

fn key(id: &DeviceId) -> String {
    format!("{}/{}", id.namespace, id.name)
}

/// Authorises a request made with a device certificate, returning what the device may do.
pub fn authorize_device(
    peer: Option<&PeerCertificate>,
    device: Option<&Device>,
    group: Option<&DeviceGroup>,
    now: Timestamp,
) -> Result<(DeviceId, Scope), Refusal> {
    let peer = peer.ok_or(Refusal::NoClientCertificate)?;
    let id = peer.device.clone().ok_or(Refusal::NotADeviceCertificate)?;
    let name = key(&id);
    let device = device.ok_or_else(|| Refusal::UnknownDevice(name.clone()))?;
    match device.spec.lifecycle {
        Lifecycle::Retired => return Err(Refusal::DeviceRetired(name)),
        Lifecycle::Suspended => return Err(Refusal::DeviceSuspended(name)),
        Lifecycle::Active | Lifecycle::Quarantined => {}
    }
    if peer.chains_to_fleet_ca == Some(false) {
        return Err(Refusal::UntrustedCertificate);
    }
    if peer.not_after.is_some_and(|t| now >= t) {
        return Err(Refusal::CertificateExpired);
    }
    let status = device.status.as_ref();
    let identity = status
        .and_then(|s| s.identity.as_ref())
        .ok_or_else(|| Refusal::NotEnrolled(name.clone()))?;
    if !identity
        .fingerprint_sha256
        .eq_ignore_ascii_case(&peer.fingerprint_sha256)
    {
        return Err(Refusal::CertificateRevoked(name));
    }
    let group = group.ok_or_else(|| Refusal::GroupNotFound(device.spec.group.clone()))?;
    let expected = &group.spec.certificates.trust_domain;
    if &id.trust_domain != expected {
        return Err(Refusal::WrongTrustDomain {
            found: id.trust_domain.clone(),
            expected: expected.clone(),
        });
    }
    let compliant = status
        .and_then(|s| conditions::find(&s.conditions, conditions::types::COMPLIANT))
        .is_none_or(|c| c.status == conditions::TRUE);
    let quarantine_enforced = group.spec.compliance.quarantine_non_compliant;
    let scope =
        if device.spec.lifecycle == Lifecycle::Quarantined || (quarantine_enforced && !compliant) {
            Scope::Restricted
        } else {
            Scope::Full
        };
    Ok((id, scope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::device::{DeviceSpec, DeviceStatus, IdentityStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn id() -> DeviceId {
        DeviceId {
            trust_domain: "fleet.example".into(),
            namespace: "plant".into(),
            name: "plc-1".into(),
        }
    }

    fn peer(fp: &str) -> PeerCertificate {
        PeerCertificate {
            der: vec![],
            fingerprint_sha256: fp.into(),
            device: Some(id()),
            not_after: Some(now() + jiff::SignedDuration::from_hours(24)),
            subject_serial: None,
            chains_to_fleet_ca: Some(true),
        }
    }

    fn group() -> DeviceGroup {
        let spec = serde_json::from_value(serde_json::json!({
            "certificates": {"issuerRef": {"name": "ca"}, "trustDomain": "fleet.example"}
        }))
        .unwrap();
        DeviceGroup::new("cell", spec)
    }

    fn device(lifecycle: Lifecycle, compliant: Option<bool>) -> Device {
        let spec: DeviceSpec =
            serde_json::from_value(serde_json::json!({"group": "cell", "hardwareModel": "m"}))
                .unwrap();
        let mut d = Device::new("plc-1", DeviceSpec { lifecycle, ..spec });
        d.status = Some(DeviceStatus {
            identity: Some(IdentityStatus {
                spiffe_id: String::new(),
                certificate: String::new(),
                ca: None,
                serial_number: "01".into(),
                fingerprint_sha256: "aa".repeat(32),
                not_before: Time(now()),
                not_after: Time(now()),
                source: None,
            }),
            conditions: compliant
                .map(|c| {
                    vec![Condition {
                        type_: "Compliant".into(),
                        status: if c { "True" } else { "False" }.into(),
                        reason: "x".into(),
                        message: "x".into(),
                        last_transition_time: Time(now()),
                        observed_generation: None,
                    }]
                })
                .unwrap_or_default(),
            ..DeviceStatus::default()
        });
        d
    }

    fn reason(r: Result<(DeviceId, Scope), Refusal>) -> &'static str {
        r.unwrap_err().reason()
    }

    #[test]
    fn the_current_certificate_of_a_compliant_device_gets_full_scope() {
        let (d, g) = (device(Lifecycle::Active, Some(true)), group());
        let (who, scope) =
            authorize_device(Some(&peer(&"aa".repeat(32))), Some(&d), Some(&g), now()).unwrap();
        assert_eq!(who, id());
        assert_eq!(scope, Scope::Full);
    }

    #[test]
    fn quarantined_or_non_compliant_devices_are_restricted() {
        let g = group();
        let fp = "aa".repeat(32);
        for d in [
            device(Lifecycle::Quarantined, Some(true)),
            device(Lifecycle::Active, Some(false)),
        ] {
            let (_, scope) = authorize_device(Some(&peer(&fp)), Some(&d), Some(&g), now()).unwrap();
            assert_eq!(scope, Scope::Restricted);
        }
        let mut lenient = group();
        lenient.spec.compliance.quarantine_non_compliant = false;
        let d = device(Lifecycle::Active, Some(false));
        let (_, scope) =
            authorize_device(Some(&peer(&fp)), Some(&d), Some(&lenient), now()).unwrap();
        assert_eq!(
            scope,
            Scope::Full,
            "quarantineNonCompliant: false leaves non-compliant devices their scope"
        );
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let g = group();
        let fp = "aa".repeat(32);
        let active = device(Lifecycle::Active, Some(true));
        assert_eq!(
            reason(authorize_device(None, Some(&active), Some(&g), now())),
            "NoClientCertificate"
        );
        let mut anonymous = peer(&fp);
        anonymous.device = None;
        assert_eq!(
            reason(authorize_device(
                Some(&anonymous),
                Some(&active),
                Some(&g),
                now()
            )),
            "NotADeviceCertificate"
        );
        assert_eq!(
            reason(authorize_device(Some(&peer(&fp)), None, Some(&g), now())),
            "UnknownDevice"
        );
        assert_eq!(
            reason(authorize_device(
                Some(&peer(&fp)),
                Some(&device(Lifecycle::Retired, None)),
                Some(&g),
                now()
            )),
            "DeviceRetired"
        );
        assert_eq!(
            reason(authorize_device(
                Some(&peer(&fp)),
                Some(&device(Lifecycle::Suspended, None)),
                Some(&g),
                now()
            )),
            "DeviceSuspended"
        );
        let mut fresh = device(Lifecycle::Active, None);
        fresh.status = None;
        assert_eq!(
            reason(authorize_device(
                Some(&peer(&fp)),
                Some(&fresh),
                Some(&g),
                now()
            )),
            "NotEnrolled"
        );
        assert_eq!(
            reason(authorize_device(
                Some(&peer(&"bb".repeat(32))),
                Some(&active),
                Some(&g),
                now()
            )),
            "CertificateRevoked"
        );
        let mut old = peer(&fp);
        old.not_after = Some(now());
        assert_eq!(
            reason(authorize_device(Some(&old), Some(&active), Some(&g), now())),
            "CertificateExpired"
        );
        assert_eq!(
            reason(authorize_device(
                Some(&peer(&fp)),
                Some(&active),
                None,
                now()
            )),
            "GroupNotFound"
        );
        let mut foreign = peer(&fp);
        foreign.chains_to_fleet_ca = Some(false);
        assert_eq!(
            reason(authorize_device(
                Some(&foreign),
                Some(&active),
                Some(&g),
                now()
            )),
            "UntrustedCertificate"
        );
        let mut other_domain = peer(&fp);
        other_domain.device.as_mut().unwrap().trust_domain = "evil.example".into();
        assert_eq!(
            reason(authorize_device(
                Some(&other_domain),
                Some(&active),
                Some(&g),
                now()
            )),
            "WrongTrustDomain"
        );
    }

    #[test]
    fn refusals_are_client_errors() {
        for r in [
            Refusal::NoClientCertificate,
            Refusal::CertificateRevoked("x".into()),
            Refusal::DeviceRetired("x".into()),
            Refusal::BodyTooLarge(1),
            Refusal::UnknownDevice("x".into()),
            Refusal::Overloaded,
        ] {
            assert!(r.status().is_client_error(), "{r:?}");
        }
    }
}
