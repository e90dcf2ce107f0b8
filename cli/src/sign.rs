//! `keygen` and `sign`: firmware signing keys (Ed25519, PKCS#8 PEM, so `openssl genpkey
//! -algorithm ed25519` keys work too) and the signed firmware stanza of an UpdateRollout.

use std::{io::Read, path::Path};

use anyhow::Context as _;
use crds::{
    firmware,
    group::TrustedKey,
    rollout::{FirmwareManifest, FirmwareSignature},
};
use ed25519_dalek::{
    SigningKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sha2::{Digest, Sha256};

/// A fresh signing key from the operating system's randomness.
pub fn generate() -> anyhow::Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes the key as PKCS#8 PEM, readable by its owner only; refuses to overwrite a key.
pub fn write_key(key: &SigningKey, path: &Path) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("cannot encode the key: {e}"))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (an existing key is never overwritten)",
                path.display()
            )
        })?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

pub fn read_key(path: &Path) -> anyhow::Result<SigningKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read signing key {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an Ed25519 PKCS#8 PEM private key ({e}); make one with `kubectl fleet keygen`",
            path.display()
        )
    })
}

/// The DeviceGroup `firmware.trustedKeys` entry for `key`.
pub fn trusted_key(key_id: &str, key: &SigningKey) -> TrustedKey {
    TrustedKey {
        key_id: key_id.to_string(),
        public_key: firmware::public_key_base64(&key.verifying_key()),
    }
}

/// SHA-256 (lowercase hex) and size of a file, streamed.
pub fn digest_file(path: &Path) -> anyhow::Result<(String, i64)> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot open firmware image {}", path.display()))?;
    let mut digest = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size: u64 = 0;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        size += n as u64;
    }
    anyhow::ensure!(size > 0, "{} is empty", path.display());
    let hex = digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, i64::try_from(size)?))
}

/// What `sign` needs besides the image and the key.
pub struct Release {
    pub version: String,
    pub security_version: i64,
    pub hardware_models: Vec<String>,
    pub url: String,
    pub expires: jiff::Timestamp,
}

/// A signed manifest for an image with the given digest and size.
pub fn manifest(
    release: Release,
    sha256: String,
    size_bytes: i64,
    key_id: &str,
    key: &SigningKey,
) -> anyhow::Result<FirmwareManifest> {
    anyhow::ensure!(
        release.url.starts_with("https://"),
        "--url must be an https:// URL (devices download only over HTTPS)"
    );
    anyhow::ensure!(
        !release.hardware_models.is_empty(),
        "name at least one --hardware-model"
    );
    anyhow::ensure!(
        release.security_version >= 0,
        "--security-version must not be negative"
    );
    let mut m = FirmwareManifest {
        version: release.version,
        security_version: release.security_version,
        sha256,
        size_bytes,
        hardware_models: release.hardware_models,
        expires: Time(release.expires),
        url: release.url,
        signature: FirmwareSignature {
            key_id: String::new(),
            value: String::new(),
        },
    };
    firmware::sign(&mut m, key_id, key);
    Ok(m)
}

/// `expires` given as an instant (RFC 3339) or a duration from now (`90d`, `720h`).
pub fn parse_expiry(s: &str, now: jiff::Timestamp) -> anyhow::Result<jiff::Timestamp> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let days = s.strip_suffix('d').and_then(|d| d.parse::<i64>().ok());
    let span = match days {
        Some(d) => jiff::SignedDuration::from_hours(d * 24),
        None => {
            let d = s.parse::<crds::common::Duration>().map_err(|e| {
                anyhow::anyhow!(
                    "--expires {s:?}: give an RFC 3339 instant or a duration like 90d or 720h ({e})"
                )
            })?;
            jiff::SignedDuration::try_from(d.get())?
        }
    };
    anyhow::ensure!(span.is_positive(), "--expires must be in the future");
    Ok(now + span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_manifest_verifies_and_any_change_breaks_it() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let release = Release {
            version: "4.2.0".into(),
            security_version: 12,
            hardware_models: vec!["pressctl-v3".into()],
            url: "https://fw.example/4.2.0.bin".into(),
            expires: "2027-01-01T00:00:00Z".parse().unwrap(),
        };
        let m = manifest(release, "ab".repeat(32), 1024, "vendor-2026", &key).unwrap();
        let trusted = [trusted_key("vendor-2026", &key)];
        assert_eq!(firmware::verify(&m, &trusted), Ok(()));
        let mut moved = m.clone();
        moved.url = "https://mirror.example/4.2.0.bin".into();
        assert_eq!(
            firmware::verify(&moved, &trusted),
            Ok(()),
            "the URL is not signed"
        );
        let mut bigger = m;
        bigger.size_bytes += 1;
        assert!(firmware::verify(&bigger, &trusted).is_err());
    }

    #[test]
    fn keys_round_trip_through_pkcs8_pem_and_are_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("fleet-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("signing.pem");
        let key = generate().unwrap();
        write_key(&key, &path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_key(&path).unwrap().to_bytes(), key.to_bytes());
        assert!(write_key(&generate().unwrap(), &path).is_err());
        std::fs::write(dir.join("junk.pem"), "not a key").unwrap();
        let err = read_key(&dir.join("junk.pem")).unwrap_err().to_string();
        assert!(err.contains("kubectl fleet keygen"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn expiry_accepts_instants_and_durations() {
        let now: jiff::Timestamp = "2026-11-25T00:00:00Z".parse().unwrap();
        assert_eq!(
            parse_expiry("90d", now).unwrap(),
            "2027-02-23T00:00:00Z".parse().unwrap()
        );
        assert_eq!(
            parse_expiry("2027-01-01T00:00:00Z", now).unwrap(),
            "2027-01-01T00:00:00Z".parse().unwrap()
        );
        assert!(parse_expiry("soon", now).is_err());
    }

    #[test]
    fn the_digest_covers_every_byte() {
        let path = std::env::temp_dir().join(format!("fleet-img-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        let (hex, size) = digest_file(&path).unwrap();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(size, 3);
        let _ = std::fs::remove_file(&path);
    }
}
