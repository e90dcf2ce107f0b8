//! `UpdateRollout`: a signed firmware release staged over a group's devices in waves. The user
//! (or `kubectl fleet rollout promote`) writes `spec`, including `approvedWaves`; the operator
//! owns `status`, which holds counts only, never per-device lists, so a rollout over 100 000
//! devices is still one small object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, Duration, SHA256_HEX_PATTERN};
use crate::group::KEY_ID_PATTERN;

/// Base64 of a 64-byte Ed25519 signature.
pub const ED25519_SIGNATURE_PATTERN: &str = r"^[A-Za-z0-9+/]{86}==$";

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetwarden.io",
    version = "v1alpha1",
    kind = "UpdateRollout",
    namespaced,
    status = "UpdateRolloutStatus",
    shortname = "rollout",
    category = "fleet",
    doc = "A signed firmware release rolled out to device groups in waves.",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Firmware",
        type_ = "string",
        json_path = ".spec.firmware.version"
    ),
    printcolumn(name = "Wave", type_ = "integer", json_path = ".status.currentWave"),
    printcolumn(
        name = "Waves",
        type_ = "integer",
        priority = 1,
        json_path = ".status.waveCount"
    ),
    printcolumn(
        name = "Eligible",
        type_ = "integer",
        priority = 1,
        json_path = ".status.totals.eligible"
    ),
    printcolumn(
        name = "Succeeded",
        type_ = "integer",
        json_path = ".status.totals.succeeded"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.totals.failed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.onFailure != 'Rollback' || has(self.rollbackFirmware)")
    .message("onFailure: Rollback needs rollbackFirmware: the previous signed firmware stanza to offer"))]
#[x_kube(validation = Rule::new("self.approvedWaves <= size(self.waves)")
    .message("approvedWaves cannot exceed the number of waves"))]
#[serde(rename_all = "camelCase")]
pub struct UpdateRolloutSpec {
    /// Which devices the rollout is for.
    pub target: RolloutTarget,

    /// The signed firmware manifest to offer.
    pub firmware: FirmwareManifest,

    /// The previous signed firmware, offered to updated devices if the rollout fails and
    /// `onFailure` is `Rollback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_firmware: Option<FirmwareManifest>,

    /// Ordered waves; each one's share is cumulative (a 20% wave after a 5% one covers 20% of the
    /// fleet in total). The last wave should reach 100%. Default: 5%, 20% and 50%, each soaking
    /// an hour, then 100%.
    #[serde(default = "default_waves")]
    #[schemars(length(min = 1, max = 16))]
    pub waves: Vec<Wave>,

    /// A wave is complete when this percentage of its devices succeeded.
    #[serde(default = "default_success_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub success_threshold_percent: u8,

    /// The rollout halts when more than this percentage of offered devices failed.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 0, max = 100))]
    pub failure_threshold_percent: u8,

    /// A device that has not finished this long after the offer counts as failed.
    #[serde(default = "default_device_timeout")]
    pub device_timeout: Duration,

    /// Number of leading waves approved to start. Waves with `requiresApproval` wait until this
    /// covers them (`kubectl fleet rollout promote`, or a commit in Git).
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub approved_waves: u32,

    /// When offers may be made. Without it offers are made at any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindow>,

    /// What happens when the failure threshold is crossed.
    #[serde(default)]
    pub on_failure: OnFailure,

    /// Stop making new offers; devices already updating finish.
    #[serde(default)]
    pub paused: bool,

    /// Stop the rollout for good, as a failure (`kubectl fleet rollout abort`); with
    /// `onFailure: Rollback` the rollback firmware is offered.
    #[serde(default)]
    pub abort: bool,
}

fn default_success_threshold() -> u8 {
    95
}

fn default_failure_threshold() -> u8 {
    10
}

fn default_device_timeout() -> Duration {
    Duration::from_secs(3600)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTarget {
    /// DeviceGroups (same namespace) whose devices are eligible.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN)))]
    pub groups: Vec<String>,
    /// Further narrows the devices by their labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A firmware release as the vendor signed it. The Ed25519 signature covers the canonical bytes
/// of every field but `url` and `signature`, so the artifact may move without re-signing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareManifest {
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")
    )]
    pub version: String,
    /// Monotonic anti-rollback counter: devices refuse firmware below what they run.
    #[schemars(range(min = 0))]
    pub security_version: i64,
    /// Lowercase hex SHA-256 of the artifact.
    #[schemars(regex(pattern = SHA256_HEX_PATTERN))]
    pub sha256: String,
    /// Exact artifact size; devices stop downloading past it.
    #[schemars(range(min = 1))]
    pub size_bytes: i64,
    /// Hardware models this firmware is built for.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 128)))]
    pub hardware_models: Vec<String>,
    /// After this instant devices refuse the manifest (protection against freeze attacks).
    pub expires: Time,
    /// Where devices download the artifact (HTTPS).
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https://"))]
    pub url: String,
    pub signature: FirmwareSignature,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareSignature {
    /// Which of the group's `firmware.trustedKeys` signed it.
    #[schemars(regex(pattern = KEY_ID_PATTERN))]
    pub key_id: String,
    /// Base64 Ed25519 signature.
    #[schemars(regex(pattern = ED25519_SIGNATURE_PATTERN))]
    pub value: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.percent) != has(self.count)")
    .message("set exactly one of percent or count"))]
#[serde(rename_all = "camelCase")]
pub struct Wave {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: Option<String>,
    /// Cumulative share of eligible devices covered once this wave completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: Option<u8>,
    /// Cumulative number of eligible devices covered once this wave completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub count: Option<u32>,
    /// Devices matching this selector are taken first (canaries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_selector: Option<LabelSelector>,
    /// Wait this long after the wave completes before the next one starts.
    #[serde(default = "default_soak")]
    pub soak: Duration,
    /// The wave starts only when `approvedWaves` covers it.
    #[serde(default)]
    pub requires_approval: bool,
}

fn default_waves() -> Vec<Wave> {
    [
        ("canary", 5, 3600),
        ("early", 20, 3600),
        ("half", 50, 3600),
        ("all", 100, 0),
    ]
    .into_iter()
    .map(|(name, percent, soak)| Wave {
        name: Some(name.to_string()),
        percent: Some(percent),
        count: None,
        canary_selector: None,
        soak: Duration::from_secs(soak),
        requires_approval: false,
    })
    .collect()
}

fn default_soak() -> Duration {
    Duration::from_secs(0)
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// Days the window opens on; all days when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub days: Vec<Weekday>,
    /// Local opening time, `HH:MM` (24 h).
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// How long the window stays open.
    pub duration: Duration,
    /// IANA time zone of `start`.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
}

fn default_time_zone() -> String {
    "UTC".to_string()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum OnFailure {
    /// Stop offering; devices keep what they have.
    #[default]
    Halt,
    /// Stop offering the new firmware and offer `rollbackFirmware` to devices that took it.
    Rollback,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpdateRolloutStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,

    /// 1-based index of the wave being offered; 0 before the first starts.
    #[serde(default)]
    pub current_wave: u32,

    /// Number of waves in the spec, for `kubectl get -o wide`.
    #[serde(default)]
    pub wave_count: u32,

    /// Ready, Progressing, Degraded, Waiting (another rollout holds the group).
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<RolloutCounts>,

    /// One entry per spec wave, in order.
    #[serde(
        default,
        deserialize_with = "crate::common::null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 16))]
    pub waves: Vec<WaveStatus>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RolloutPhase {
    Pending,
    Progressing,
    Paused,
    Succeeded,
    Failed,
    RolledBack,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutCounts {
    pub eligible: u32,
    pub offered: u32,
    pub in_progress: u32,
    pub succeeded: u32,
    pub failed: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaveStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Devices in this wave (derived from the cumulative share, not stored per device).
    pub planned: u32,
    pub offered: u32,
    pub in_progress: u32,
    pub succeeded: u32,
    pub failed: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// The next wave may start after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak_until: Option<Time>,
}
