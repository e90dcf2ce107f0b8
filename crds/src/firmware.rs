//! What a firmware signature covers, defined once for the CLI that signs, the webhook that checks
//! at admission, the operator, and the device that checks again before installing.
//!
//! The signed message is a versioned, length-prefixed encoding of every manifest field except the
//! artifact URL (which may move) and the signature value itself. Length prefixes make the encoding
//! unambiguous whatever the field contents; the key ID is included so a signature cannot be
//! replayed under another key's name.

use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::{group::TrustedKey, rollout::FirmwareManifest};

/// First line of every signed message; bump it if the encoding ever changes.
pub const CANONICAL_FORMAT: &str = "fleetwarden-firmware-manifest-v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error(
        "firmware is signed with key {0:?}, which is not among the group's firmware.trustedKeys; add the key to the DeviceGroup or re-sign with a trusted key"
    )]
    UnknownKey(String),
    #[error(
        "trusted key {0:?} is not a base64 32-byte Ed25519 public key; fix firmware.trustedKeys"
    )]
    BadPublicKey(String),
    #[error("firmware.signature.value is not a base64 64-byte Ed25519 signature")]
    MalformedSignature,
    #[error(
        "firmware signature does not verify with key {0:?}: the manifest was changed after signing or signed with another key; re-sign it with `kubectl fleet sign`"
    )]
    Invalid(String),
}

/// The exact bytes the Ed25519 signature covers.
pub fn canonical_bytes(manifest: &FirmwareManifest) -> Vec<u8> {
    let mut models: Vec<&str> = manifest
        .hardware_models
        .iter()
        .map(String::as_str)
        .collect();
    models.sort_unstable();
    models.dedup();
    let expires = jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", manifest.expires.0)
        .unwrap_or_else(|_| manifest.expires.0.to_string());

    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(CANONICAL_FORMAT.as_bytes());
    out.push(b'\n');
    let mut field = |name: &str, value: &str| {
        out.extend_from_slice(format!("{name}={}:", value.len()).as_bytes());
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    };
    field("keyId", &manifest.signature.key_id);
    field("version", &manifest.version);
    field("securityVersion", &manifest.security_version.to_string());
    field("sha256", &manifest.sha256);
    field("sizeBytes", &manifest.size_bytes.to_string());
    field("hardwareModels", &models.len().to_string());
    for model in models {
        field("hardwareModel", model);
    }
    field("expires", &expires);
    out
}

/// Signs the manifest in place: sets `signature.keyId` and `signature.value`.
pub fn sign(manifest: &mut FirmwareManifest, key_id: &str, key: &SigningKey) {
    manifest.signature.key_id = key_id.to_string();
    let signature = key.sign(&canonical_bytes(manifest));
    manifest.signature.value = STANDARD.encode(signature.to_bytes());
}

/// Base64 of the raw public key, as `TrustedKey.publicKey` holds it.
pub fn public_key_base64(key: &VerifyingKey) -> String {
    STANDARD.encode(key.to_bytes())
}

/// A trusted key's `publicKey`: base64 of a raw 32-byte Ed25519 public key.
pub fn parse_public_key(b64: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = STANDARD.decode(b64).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Checks the manifest's signature against the trusted key its `keyId` names.
pub fn verify(manifest: &FirmwareManifest, trusted: &[TrustedKey]) -> Result<(), SignatureError> {
    let key_id = &manifest.signature.key_id;
    let trusted_key = trusted
        .iter()
        .find(|k| &k.key_id == key_id)
        .ok_or_else(|| SignatureError::UnknownKey(key_id.clone()))?;
    let public = parse_public_key(&trusted_key.public_key)
        .ok_or_else(|| SignatureError::BadPublicKey(key_id.clone()))?;
    let signature: [u8; 64] = STANDARD
        .decode(&manifest.signature.value)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureError::MalformedSignature)?;
    public
        .verify_strict(
            &canonical_bytes(manifest),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| SignatureError::Invalid(key_id.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::FirmwareSignature;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn manifest() -> FirmwareManifest {
        FirmwareManifest {
            version: "4.2.0".into(),
            security_version: 7,
            sha256: "ab".repeat(32),
            size_bytes: 1_048_576,
            hardware_models: vec!["press-ctl-v2".into(), "press-ctl-v3".into()],
            expires: Time("2027-06-01T00:00:00Z".parse().unwrap()),
            url: "https://firmware.example.com/press/4.2.0.bin".into(),
            signature: FirmwareSignature {
                key_id: String::new(),
                value: String::new(),
            },
        }
    }

    fn trusted(id: &str, k: &SigningKey) -> TrustedKey {
        TrustedKey {
            key_id: id.into(),
            public_key: public_key_base64(&k.verifying_key()),
        }
    }

    #[test]
    fn a_signed_manifest_verifies_with_its_key() {
        let mut m = manifest();
        sign(&mut m, "vendor-2026", &key(1));
        assert_eq!(verify(&m, &[trusted("vendor-2026", &key(1))]), Ok(()));
    }

    #[test]
    fn the_url_may_move_without_resigning() {
        let mut m = manifest();
        sign(&mut m, "vendor-2026", &key(1));
        m.url = "https://mirror.example.org/4.2.0.bin".into();
        assert_eq!(verify(&m, &[trusted("vendor-2026", &key(1))]), Ok(()));
    }

    #[test]
    fn every_signed_field_is_covered() {
        let mut signed = manifest();
        sign(&mut signed, "vendor-2026", &key(1));
        let keys = [trusted("vendor-2026", &key(1))];
        type Tamper = Box<dyn Fn(&mut FirmwareManifest)>;
        let tampers: Vec<(&str, Tamper)> = vec![
            ("version", Box::new(|m| m.version = "4.2.1".into())),
            ("securityVersion", Box::new(|m| m.security_version = 6)),
            ("sha256", Box::new(|m| m.sha256 = "cd".repeat(32))),
            ("sizeBytes", Box::new(|m| m.size_bytes += 1)),
            (
                "hardwareModels",
                Box::new(|m| m.hardware_models.push("other".into())),
            ),
            (
                "expires",
                Box::new(|m| m.expires = Time("2030-01-01T00:00:00Z".parse().unwrap())),
            ),
        ];
        for (field, tamper) in tampers {
            let mut m = signed.clone();
            tamper(&mut m);
            assert_eq!(
                verify(&m, &keys),
                Err(SignatureError::Invalid("vendor-2026".into())),
                "changing {field} must break the signature"
            );
        }
    }

    #[test]
    fn hardware_model_order_does_not_matter() {
        let mut m = manifest();
        sign(&mut m, "k", &key(1));
        m.hardware_models.reverse();
        assert_eq!(verify(&m, &[trusted("k", &key(1))]), Ok(()));
    }

    #[test]
    fn length_prefixes_prevent_field_splicing() {
        let mut a = manifest();
        a.hardware_models = vec!["ab".into(), "c".into()];
        let mut b = manifest();
        b.hardware_models = vec!["a".into(), "bc".into()];
        assert_ne!(canonical_bytes(&a), canonical_bytes(&b));
    }

    #[test]
    fn wrong_or_unknown_keys_are_refused_with_distinct_errors() {
        let mut m = manifest();
        sign(&mut m, "vendor-2026", &key(1));
        assert_eq!(
            verify(&m, &[trusted("vendor-2026", &key(2))]),
            Err(SignatureError::Invalid("vendor-2026".into()))
        );
        assert_eq!(
            verify(&m, &[trusted("vendor-2025", &key(1))]),
            Err(SignatureError::UnknownKey("vendor-2026".into()))
        );
        let bad_key = TrustedKey {
            key_id: "vendor-2026".into(),
            public_key: "bm90IGEga2V5".into(),
        };
        assert_eq!(
            verify(&m, &[bad_key]),
            Err(SignatureError::BadPublicKey("vendor-2026".into()))
        );
        m.signature.value = "AAAA".into();
        assert_eq!(
            verify(&m, &[trusted("vendor-2026", &key(1))]),
            Err(SignatureError::MalformedSignature)
        );
    }

    #[test]
    fn key_rotation_accepts_any_listed_key() {
        let mut m = manifest();
        sign(&mut m, "vendor-2027", &key(3));
        let keys = [
            trusted("vendor-2026", &key(1)),
            trusted("vendor-2027", &key(3)),
        ];
        assert_eq!(verify(&m, &keys), Ok(()));
    }
}
