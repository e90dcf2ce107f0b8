//! The device-facing HTTP API between the gateway and device agents: paths and JSON bodies.
//! Enrollment follows EST (RFC 7030) paths and semantics; check-in and status reports are JSON.
//!
//! - `GET  /.well-known/est/cacerts`: the fleet CA chain (PEM).
//! - `POST /.well-known/est/simpleenroll`: first enrollment; body a PKCS#10 CSR (PEM, or base64
//!   DER as RFC 7030 sends it); authenticated by `Authorization: Bearer <token>` or a
//!   manufacturer (IDevID) client certificate. 200 with the certificate chain (PEM), or 202 with
//!   `Retry-After` while it is being issued.
//! - `POST /.well-known/est/simplereenroll`: renewal, authenticated by the current certificate.
//! - `POST /v1/checkin`: body [`ReportedState`], answer [`CheckInResponse`].
//! - `POST /v1/status`: body [`UpdateReport`] (update progress), answer 204.
//!
//! Refusals are 4xx with an [`ErrorBody`].

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use crate::device::ReportedState;
use crate::{device::UpdateState, rollout::FirmwareManifest};

pub const CACERTS: &str = "/.well-known/est/cacerts";
pub const SIMPLE_ENROLL: &str = "/.well-known/est/simpleenroll";
pub const SIMPLE_REENROLL: &str = "/.well-known/est/simplereenroll";
pub const CHECK_IN: &str = "/v1/checkin";
pub const STATUS: &str = "/v1/status";

/// What an authorised device may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Check in, report, receive any firmware offer.
    Full,
    /// Quarantined or non-compliant: report status and receive remediation firmware only.
    Restricted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckInResponse {
    /// `namespace/name` of the Device the certificate authenticated.
    pub device: String,
    pub scope: Scope,
    /// When to check in next.
    pub check_in_interval_seconds: u64,
    /// Re-enroll (renew) after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_after: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<Timestamp>,
    /// Firmware the device should install now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<FirmwareOffer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareOffer {
    /// The UpdateRollout making the offer.
    pub rollout: String,
    /// Signed manifest; the device verifies it against its pinned keys before anything else.
    pub manifest: FirmwareManifest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateReport {
    pub rollout: String,
    pub version: String,
    pub state: UpdateState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// CamelCase reason, also the `reason` label of the gateway's refusal metric.
    pub error: String,
    pub message: String,
}
