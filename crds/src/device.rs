//! `Device`: one physical device. `spec` is the user's (Git); `status` is split between two
//! writers, each with its own server-side-apply field manager:
//!
//! - the gateway (`fleetwarden-gateway`) owns `enrollment`, `reported`, `lastSeen` and `update`:
//!   what the device said;
//! - the operator (`fleetwarden-operator`) owns `observedGeneration`, `phase`, `identity` and the
//!   conditions: what Fleetwarden concluded.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_SUBDOMAIN_PATTERN, SHA256_HEX_PATTERN};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetwarden.io",
    version = "v1alpha1",
    kind = "Device",
    namespaced,
    status = "DeviceStatus",
    shortname = "dev",
    category = "fleet",
    doc = "A device of the fleet: its identity, lifecycle and what it last reported.",
    derive = "PartialEq",
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.group"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Firmware",
        type_ = "string",
        json_path = ".status.reported.firmwareVersion"
    ),
    printcolumn(
        name = "Compliant",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Compliant\")].status"
    ),
    printcolumn(name = "Last Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(
        name = "Model",
        type_ = "string",
        priority = 1,
        json_path = ".spec.hardwareModel"
    ),
    printcolumn(
        name = "Serial",
        type_ = "string",
        priority = 1,
        json_path = ".status.identity.serialNumber"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.lifecycle) || oldSelf.lifecycle != 'Retired' || self.lifecycle == 'Retired'"
).message("lifecycle Retired is terminal: a retired device cannot be reactivated; create a new Device to re-provision it"))]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// DeviceGroup in the same namespace this device belongs to. The group supplies the
    /// certificate issuer, enrollment trust, firmware keys, compliance policy and network zone.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub group: String,

    /// Hardware model, matched against `UpdateRollout.spec.firmware.hardwareModels`.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub hardware_model: String,

    /// Manufacturer serial number, informational (the identity is the certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub serial_number: Option<String>,

    /// Active devices are served; Suspended ones are refused; Quarantined ones may only report and
    /// fetch remediation firmware; Retired is terminal and revokes the identity.
    #[serde(default)]
    pub lifecycle: Lifecycle,

    /// How the device's identity is issued.
    #[serde(default)]
    pub identity: IdentitySpec,

    /// Static IP addresses of the device. The segmentation controller isolates these when the
    /// device is quarantined. Addresses the device reports are used in addition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 2, max = 45), regex(pattern = IP_PATTERN)))]
    pub addresses: Vec<String>,

    /// Where the device is installed (site, line, cell). Compared with the group's allowed
    /// locations when the device reports its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub location: Option<String>,
}

/// Syntactic shape of an IPv4 or IPv6 address; the webhook parses it properly.
pub const IP_PATTERN: &str = r"^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:.]*)$";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Lifecycle {
    #[default]
    Active,
    Suspended,
    Quarantined,
    Retired,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new(
    "!(self.mode == 'ManagedKey' && has(self.publicKeySha256))"
).message("publicKeySha256 pins a key generated on the device; it cannot be used with mode ManagedKey, where cert-manager generates the key"))]
#[serde(rename_all = "camelCase")]
pub struct IdentitySpec {
    /// `DeviceKey` (default): the device generates its key and sends a CSR; the key never leaves
    /// it. `ManagedKey`: cert-manager generates the key into a Secret, for devices without a
    /// secure element; weaker, because the key exists outside the device.
    #[serde(default)]
    pub mode: IdentityMode,

    /// Optional pin: lowercase hex SHA-256 of the DER SubjectPublicKeyInfo the device must enroll
    /// with (for keys provisioned at manufacture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256_HEX_PATTERN))]
    pub public_key_sha256: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum IdentityMode {
    #[default]
    DeviceKey,
    ManagedKey,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// One-word summary for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DevicePhase>,

    /// Ready, Enrolled, Compliant, CertificateExpiring, Degraded.
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The pending enrollment request (written by the gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<EnrollmentStatus>,

    /// The current identity (written by the operator once the certificate is issued).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityStatus>,

    /// What the device last reported (written by the gateway when it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<ReportedState>,

    /// Last authenticated check-in, refreshed at a coarse interval (gateway): by default at most
    /// once per 120 check-ins and at least every quarter of the group's compliance.maxOffline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,

    /// Progress of the firmware update the device is applying (gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdateProgress>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum DevicePhase {
    /// Known, never enrolled.
    Pending,
    /// A CSR is being processed.
    Enrolling,
    /// Enrolled and served.
    Active,
    Suspended,
    Quarantined,
    Retired,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentStatus {
    /// PEM PKCS#10 certificate signing request, generated on the device.
    #[schemars(length(min = 1, max = 16384))]
    pub csr: String,
    /// Lowercase hex SHA-256 of the CSR's DER bytes; names the CertificateRequest.
    #[schemars(regex(pattern = SHA256_HEX_PATTERN))]
    pub csr_sha256: String,
    /// How the device authenticated this request.
    pub method: EnrollmentMethod,
    pub requested_at: Time,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum EnrollmentMethod {
    /// Single-use enrollment token.
    Token,
    /// Manufacturer certificate chaining to the group's trusted bundle.
    IDevID,
    /// The device's current Fleetwarden certificate.
    Renewal,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityStatus {
    /// `spiffe://<trust-domain>/ns/<namespace>/device/<name>`.
    pub spiffe_id: String,
    /// PEM certificate issued to the device.
    pub certificate: String,
    /// PEM CA certificate(s) the issuer reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Certificate serial number, lowercase hex.
    pub serial_number: String,
    /// Lowercase hex SHA-256 of the certificate's DER bytes; the gateway matches client
    /// certificates against it, so rotating or clearing it revokes the old certificate at once.
    #[schemars(regex(pattern = SHA256_HEX_PATTERN))]
    pub fingerprint_sha256: String,
    pub not_before: Time,
    pub not_after: Time,
    /// The CertificateRequest (or Certificate, for ManagedKey) it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportedState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub firmware_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub security_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_slot: Option<BootSlot>,
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 8), inner(length(max = 45)))]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub location: Option<String>,
    /// Measured-boot digest (lowercase hex SHA-256), compared with the group's allowed set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHA256_HEX_PATTERN))]
    pub boot_measurement_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub agent_version: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BootSlot {
    A,
    B,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateProgress {
    /// UpdateRollout that offered the firmware.
    pub rollout: String,
    /// Firmware version being applied.
    pub version: String,
    pub state: UpdateState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub progress_percent: Option<u8>,
    /// Why it failed, in the device's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    pub updated_at: Time,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum UpdateState {
    Offered,
    Downloading,
    Installing,
    Succeeded,
    Failed,
}

impl Device {
    /// The device's SPIFFE ID in the given trust domain.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        spiffe_id(
            trust_domain,
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

/// `spiffe://<trust-domain>/ns/<namespace>/device/<name>`: the name every device certificate
/// carries as its URI SAN and the gateway resolves back to a Device.
pub fn spiffe_id(trust_domain: &str, namespace: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/device/{name}")
}

/// A SPIFFE ID parsed back into the Device it names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId {
    pub trust_domain: String,
    pub namespace: String,
    pub name: String,
}

/// Parses `spiffe://<trust-domain>/ns/<namespace>/device/<name>`; anything else is `None`.
pub fn parse_spiffe_id(uri: &str) -> Option<DeviceId> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (trust_domain, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    let (Some("ns"), Some(namespace), Some("device"), Some(name), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let valid = |s: &str| {
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        !s.is_empty()
            && s.len() <= 253
            && s.bytes().all(|b| alnum(b) || b == b'-' || b == b'.')
            && s.bytes().next().is_some_and(alnum)
            && s.bytes().last().is_some_and(alnum)
    };
    if trust_domain.is_empty() || !valid(namespace) || !valid(name) {
        return None;
    }
    Some(DeviceId {
        trust_domain: trust_domain.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_back_into_devices() {
        let id = spiffe_id("fleet.example", "plant-a", "press-01");
        assert_eq!(
            parse_spiffe_id(&id),
            Some(DeviceId {
                trust_domain: "fleet.example".into(),
                namespace: "plant-a".into(),
                name: "press-01".into()
            })
        );
        for bad in [
            "https://fleet.example/ns/a/device/b",
            "spiffe://fleet.example/ns/a/device/b/extra",
            "spiffe://fleet.example/ns/a/workload/b",
            "spiffe://fleet.example/ns//device/b",
            "spiffe://fleet.example/ns/A/device/b",
            "spiffe:///ns/a/device/b",
            "spiffe://fleet.example/ns/a/device/../x",
            "spiffe://fleet.example/ns/a/device/..",
            "spiffe://fleet.example/ns/a/device/-b",
        ] {
            assert_eq!(parse_spiffe_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn spiffe_ids_name_namespace_and_device() {
        assert_eq!(
            spiffe_id("fleet.example.com", "plant-a", "press-01"),
            "spiffe://fleet.example.com/ns/plant-a/device/press-01"
        );
    }

    #[test]
    fn minimal_device_gets_safe_defaults() {
        let spec: DeviceSpec =
            serde_json::from_value(serde_json::json!({"group": "cell-1", "hardwareModel": "x1"}))
                .unwrap();
        assert_eq!(spec.lifecycle, Lifecycle::Active);
        assert_eq!(spec.identity.mode, IdentityMode::DeviceKey);
        assert!(spec.identity.public_key_sha256.is_none());
    }
}
