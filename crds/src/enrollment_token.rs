//! Single-use enrollment tokens. A token is a random secret handed to one device; only its
//! SHA-256 is stored, in the Secret a DeviceGroup names (`spec.enrollment.tokenSecretRef`), under
//! a key equal to the Device name, as JSON `{"sha256": "<hex>", "expires": "<RFC 3339>"}`. The
//! gateway accepts it until the device holds an identity, which makes it single-use.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::hex_sha256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub sha256: String,
    pub expires: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no enrollment token is on record for this device")]
    NotOnRecord,
    #[error("the token record for this device is malformed")]
    Malformed,
    #[error("the enrollment token does not match")]
    Mismatch,
    #[error("the enrollment token expired at {0}")]
    Expired(Timestamp),
}

impl TokenRecord {
    /// The record for a new token valid until `expires`.
    pub fn for_token(token: &str, expires: Timestamp) -> Self {
        Self {
            sha256: hex_sha256(token.as_bytes()),
            expires,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Checks a presented token against the stored record bytes (the Secret value).
pub fn verify(record: Option<&[u8]>, token: &str, now: Timestamp) -> Result<(), TokenError> {
    let record: TokenRecord = serde_json::from_slice(record.ok_or(TokenError::NotOnRecord)?)
        .map_err(|_| TokenError::Malformed)?;
    let presented = hex_sha256(token.as_bytes());
    if !constant_time_eq(
        presented.as_bytes(),
        record.sha256.to_ascii_lowercase().as_bytes(),
    ) {
        return Err(TokenError::Mismatch);
    }
    if now >= record.expires {
        return Err(TokenError::Expired(record.expires));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_recorded_token_is_accepted_until_it_expires() {
        let record = TokenRecord::for_token("s3cret", t("2026-12-01T00:00:00Z")).to_json();
        assert_eq!(
            verify(Some(record.as_bytes()), "s3cret", t("2026-11-30T23:59:59Z")),
            Ok(())
        );
        assert_eq!(
            verify(Some(record.as_bytes()), "s3cret", t("2026-12-01T00:00:00Z")),
            Err(TokenError::Expired(t("2026-12-01T00:00:00Z")))
        );
    }

    #[test]
    fn wrong_missing_or_malformed_records_are_refused() {
        let record = TokenRecord::for_token("s3cret", t("2026-12-01T00:00:00Z")).to_json();
        let now = t("2026-11-25T00:00:00Z");
        assert_eq!(
            verify(Some(record.as_bytes()), "guess", now),
            Err(TokenError::Mismatch)
        );
        assert_eq!(verify(None, "s3cret", now), Err(TokenError::NotOnRecord));
        assert_eq!(
            verify(Some(b"not json"), "s3cret", now),
            Err(TokenError::Malformed)
        );
        assert!(!record.contains("s3cret"), "only the hash is stored");
    }
}
