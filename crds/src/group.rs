//! `DeviceGroup`: a set of devices that share policy, and an IEC 62443 zone. The spec carries the
//! certificate issuer, the enrollment trust anchors, the firmware signing keys, the compliance
//! policy and the segmentation (zone, workloads, device CIDRs, conduits). The operator owns all of
//! `status`: inventory, segmentation results and audit findings, and revoked serials.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    ConfigMapKeyRef, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, Duration, IssuerRef, NamedCount,
    SHA256_HEX_PATTERN, SecretRef,
};

/// Shape of a CIDR (`10.20.0.0/16`, `fd00::/64`); the webhook parses it properly.
pub const CIDR_PATTERN: &str =
    r"^([0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}|[0-9a-fA-F:]*:[0-9a-fA-F:.]*/[0-9]{1,3})$";

/// Base64 of a raw 32-byte Ed25519 public key.
pub const ED25519_PUBLIC_KEY_PATTERN: &str = r"^[A-Za-z0-9+/]{43}=$";

/// Key identifiers name signing keys in firmware signatures.
pub const KEY_ID_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetwarden.io",
    version = "v1alpha1",
    kind = "DeviceGroup",
    namespaced,
    status = "DeviceGroupStatus",
    shortname = "dg",
    category = "fleet",
    doc = "A group of devices sharing identity, firmware and compliance policy; also a network zone.",
    derive = "PartialEq",
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.segmentation.zone"),
    printcolumn(
        name = "Devices",
        type_ = "integer",
        json_path = ".status.inventory.total"
    ),
    printcolumn(
        name = "Enrolled",
        type_ = "integer",
        json_path = ".status.inventory.enrolled"
    ),
    printcolumn(
        name = "Compliant",
        type_ = "integer",
        json_path = ".status.inventory.compliant"
    ),
    printcolumn(
        name = "Quarantined",
        type_ = "integer",
        json_path = ".status.inventory.quarantined"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceGroupSpec {
    /// How device certificates are issued.
    pub certificates: CertificatePolicy,

    /// Who may enroll for the first time. Without any method only renewals are possible.
    #[serde(default)]
    pub enrollment: EnrollmentPolicy,

    /// Keys trusted to sign firmware for this group, and the minimum acceptable firmware.
    #[serde(default)]
    pub firmware: FirmwarePolicy,

    /// What a device must satisfy to be Compliant.
    #[serde(default)]
    pub compliance: CompliancePolicy,

    /// The group as a network zone. Without it no NetworkPolicies are generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,

    /// How often devices check in. The gateway returns it to every device.
    #[serde(default = "default_check_in_interval")]
    pub check_in_interval: Duration,
}

fn default_check_in_interval() -> Duration {
    Duration::from_secs(5 * 60)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("self.keys.rsaMinBits <= self.keys.rsaMaxBits")
    .message("keys.rsaMinBits must not exceed keys.rsaMaxBits"))]
#[serde(rename_all = "camelCase")]
pub struct CertificatePolicy {
    /// The cert-manager issuer that signs device certificates. Its approver must be Fleetwarden:
    /// disable cert-manager's built-in approver for it.
    pub issuer_ref: IssuerRef,

    /// SPIFFE trust domain of the device IDs (`spiffe://<trustDomain>/ns/<ns>/device/<name>`).
    #[serde(default = "default_trust_domain")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub trust_domain: String,

    /// Requested certificate lifetime.
    #[serde(default = "default_cert_duration")]
    pub duration: Duration,

    /// Devices re-enroll, and `CertificateExpiring` is raised, when less than this remains.
    #[serde(default = "default_renew_before")]
    pub renew_before: Duration,

    /// Key algorithms and sizes a device CSR may use.
    #[serde(default)]
    pub keys: KeyPolicy,
}

fn default_trust_domain() -> String {
    "fleetwarden.io".to_string()
}

fn default_cert_duration() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}

fn default_renew_before() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyPolicy {
    #[serde(default = "default_key_algorithms")]
    #[schemars(length(min = 1, max = 4))]
    pub algorithms: Vec<KeyAlgorithm>,
    #[serde(default = "default_rsa_min_bits")]
    #[schemars(range(min = 2048, max = 8192))]
    pub rsa_min_bits: u32,
    #[serde(default = "default_rsa_max_bits")]
    #[schemars(range(min = 2048, max = 8192))]
    pub rsa_max_bits: u32,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            algorithms: default_key_algorithms(),
            rsa_min_bits: default_rsa_min_bits(),
            rsa_max_bits: default_rsa_max_bits(),
        }
    }
}

fn default_key_algorithms() -> Vec<KeyAlgorithm> {
    vec![
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa,
    ]
}

fn default_rsa_min_bits() -> u32 {
    2048
}

fn default_rsa_max_bits() -> u32 {
    4096
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum KeyAlgorithm {
    #[serde(rename = "ECDSA-P256")]
    EcdsaP256,
    #[serde(rename = "ECDSA-P384")]
    EcdsaP384,
    Ed25519,
    #[serde(rename = "RSA")]
    Rsa,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentPolicy {
    /// Manufacturer CA bundle (PEM) in a ConfigMap: a device presenting an IDevID certificate
    /// that chains to it may enroll.
    #[serde(
        default,
        rename = "manufacturerCA",
        skip_serializing_if = "Option::is_none"
    )]
    pub manufacturer_ca: Option<ConfigMapKeyRef>,

    /// Secret holding single-use enrollment tokens, stored as SHA-256 hashes with their expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretRef>,

    /// Let a device with a valid IDevID but no Device object register itself.
    #[serde(default)]
    pub auto_register: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirmwarePolicy {
    /// Ed25519 keys trusted to sign firmware manifests, by key ID. Several keys allow rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["keyId".into()]))]
    pub trusted_keys: Vec<TrustedKey>,

    /// Devices below this firmware version are out of date and non-compliant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub minimum_version: Option<String>,

    /// Devices below this security version are non-compliant; rollouts may not go below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub minimum_security_version: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustedKey {
    #[schemars(regex(pattern = KEY_ID_PATTERN))]
    pub key_id: String,
    /// Base64 of the raw 32-byte Ed25519 public key (`kubectl fleet keygen` prints it).
    #[schemars(regex(pattern = ED25519_PUBLIC_KEY_PATTERN))]
    pub public_key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("!self.requireMeasuredBoot || size(self.allowedBootMeasurements) > 0")
    .message("requireMeasuredBoot needs at least one entry in allowedBootMeasurements"))]
#[serde(rename_all = "camelCase")]
pub struct CompliancePolicy {
    /// A device not seen for longer is non-compliant (offline).
    #[serde(default = "default_max_offline")]
    pub max_offline: Duration,

    /// When set, a device must report one of these locations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 128)))]
    pub allowed_locations: Vec<String>,

    /// Require a measured-boot digest from `allowedBootMeasurements`.
    #[serde(default)]
    pub require_measured_boot: bool,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = SHA256_HEX_PATTERN)))]
    pub allowed_boot_measurements: Vec<String>,

    /// Isolate non-compliant devices in the network and restrict them at the gateway.
    #[serde(default = "default_true")]
    pub quarantine_non_compliant: bool,
}

impl Default for CompliancePolicy {
    fn default() -> Self {
        Self {
            max_offline: default_max_offline(),
            allowed_locations: Vec::new(),
            require_measured_boot: false,
            allowed_boot_measurements: Vec::new(),
            quarantine_non_compliant: true,
        }
    }
}

fn default_max_offline() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_true() -> bool {
    true
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Segmentation {
    /// Zone name; other zones' conduits refer to it. Unique per cluster.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub zone: String,

    /// IT, OT or DMZ. IT-to-OT paths without a declared conduit are reported as leaks.
    #[serde(default)]
    pub level: ZoneLevel,

    /// The zone's workloads (pods in this namespace): they get default-deny plus the allowed flows.
    pub workload_selector: LabelSelector,

    /// Networks the zone's devices live in.
    #[serde(default, rename = "deviceCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = CIDR_PATTERN)))]
    pub device_cidrs: Vec<String>,

    /// Ports the workloads and devices talk on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ports: Vec<PortSpec>,

    /// Allowed flows to or from other zones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub conduits: Vec<Conduit>,

    /// Allow the zone's workloads to reach cluster DNS.
    #[serde(default = "default_true", rename = "allowDNS")]
    pub allow_dns: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ZoneLevel {
    IT,
    #[default]
    OT,
    DMZ,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.endPort) || self.endPort >= self.port")
    .message("endPort must be greater than or equal to port"))]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Conduit {
    /// Name of the conduit, unique in the group.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// The other zone (its `segmentation.zone`), in any namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub zone: String,
    /// Egress: this zone's workloads may open connections to the other zone. Ingress: the other
    /// zone's workloads may connect to this one.
    pub direction: ConduitDirection,
    #[schemars(length(min = 1, max = 32))]
    pub ports: Vec<PortSpec>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ConduitDirection {
    Ingress,
    Egress,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Degraded, Isolated (segmentation applied), AuditClean.
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<Inventory>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<SegmentationStatus>,

    /// Serials of certificates of retired or deleted devices, newest first, bounded.
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 256))]
    pub revoked_serials: Vec<RevokedSerial>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub total: u32,
    /// Device count per phase.
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub by_phase: Vec<NamedCount>,
    pub enrolled: u32,
    pub compliant: u32,
    pub quarantined: u32,
    pub retired: u32,
    /// Seen within `compliance.maxOffline`.
    pub online: u32,
    /// Below the group minimum or behind the newest succeeded rollout.
    pub out_of_date: u32,
    /// Certificates inside their renewBefore window.
    pub certificates_expiring: u32,
    /// Most common firmware versions, then `other`.
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub firmware_versions: Vec<NamedCount>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SegmentationStatus {
    /// Names of the NetworkPolicies generated for the zone.
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub policies: Vec<String>,
    /// Device addresses currently excluded from the zone's allowed device networks.
    pub isolated_addresses: u32,
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 100))]
    pub findings: Vec<AuditFinding>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditFinding {
    pub kind: FindingKind,
    /// The object or zone the finding is about.
    pub subject: String,
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum FindingKind {
    UnisolatedWorkload,
    UnknownConduitZone,
    OverlappingDeviceCIDR,
    UndeclaredITtoOTPath,
    /// A conduit the zone at its other end does not declare, so its policies block the flow.
    OneSidedConduit,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokedSerial {
    pub serial_number: String,
    pub device: String,
    pub revoked_at: Time,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_group_gets_production_defaults() {
        let spec: DeviceGroupSpec = serde_json::from_value(serde_json::json!({
            "certificates": {"issuerRef": {"name": "devices-ca"}}
        }))
        .unwrap();
        let certs = &spec.certificates;
        assert_eq!(certs.issuer_ref.group, "cert-manager.io");
        assert_eq!(certs.duration.get().as_secs(), 90 * 24 * 3600);
        assert_eq!(certs.renew_before.get().as_secs(), 30 * 24 * 3600);
        assert_eq!(certs.keys.rsa_min_bits, 2048);
        assert_eq!(certs.keys.algorithms.len(), 4);
        assert!(spec.compliance.quarantine_non_compliant);
        assert_eq!(spec.check_in_interval.as_str(), "5m");
        assert!(spec.segmentation.is_none());
    }
}
