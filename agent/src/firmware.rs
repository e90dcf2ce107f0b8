//! Installing offered firmware, trusting nothing the network says. Before a single byte is
//! downloaded the manifest must be unexpired, for this hardware, not below the installed
//! security version (anti-rollback) and signed by a key pinned on the device. While downloading,
//! more bytes than declared abort the transfer (endless-data attacks); afterwards size and
//! SHA-256 must match. The image goes to the inactive slot of an A/B layout, and only a complete,
//! verified image switches the active slot.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use crds::{
    device::BootSlot,
    firmware::{self, SignatureError},
    group::TrustedKey,
    rollout::FirmwareManifest,
};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirmwareError {
    #[error("the manifest expired at {0}")]
    Expired(Timestamp),
    #[error("the firmware is for {models:?}, not this device's {model:?}")]
    WrongHardware { model: String, models: Vec<String> },
    #[error("security version {offered} is below the installed {installed} (anti-rollback)")]
    Rollback { offered: i64, installed: i64 },
    #[error("signature: {0}")]
    Signature(#[from] SignatureError),
    #[error("the download sent more than the declared {declared} bytes")]
    TooLarge { declared: i64 },
    #[error("the download has {got} bytes, the manifest declares {declared}")]
    SizeMismatch { got: u64, declared: i64 },
    #[error("the download's SHA-256 {got} is not the manifest's {expected}")]
    DigestMismatch { got: String, expected: String },
    #[error("download failed: {0}")]
    Download(String),
    #[error("writing the slot failed: {0}")]
    Storage(String),
}

impl FirmwareError {
    /// CamelCase reason the device reports.
    pub fn reason(&self) -> &'static str {
        match self {
            FirmwareError::Expired(_) => "ManifestExpired",
            FirmwareError::WrongHardware { .. } => "WrongHardware",
            FirmwareError::Rollback { .. } => "SecurityVersionRollback",
            FirmwareError::Signature(SignatureError::UnknownKey(_)) => "UnknownSigningKey",
            FirmwareError::Signature(_) => "BadSignature",
            FirmwareError::TooLarge { .. } => "DownloadTooLarge",
            FirmwareError::SizeMismatch { .. } => "SizeMismatch",
            FirmwareError::DigestMismatch { .. } => "DigestMismatch",
            FirmwareError::Download(_) => "DownloadFailed",
            FirmwareError::Storage(_) => "StorageFailed",
        }
    }
}

/// What is installed, as the device reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Installed {
    pub active: BootSlot,
    pub version: String,
    pub security_version: i64,
}

/// Everything checkable before downloading.
pub fn check_manifest(
    manifest: &FirmwareManifest,
    pinned_keys: &[TrustedKey],
    hardware_model: &str,
    installed: &Installed,
    now: Timestamp,
) -> Result<(), FirmwareError> {
    firmware::verify(manifest, pinned_keys)?;
    if now >= manifest.expires.0 {
        return Err(FirmwareError::Expired(manifest.expires.0));
    }
    if !manifest.hardware_models.iter().any(|m| m == hardware_model) {
        return Err(FirmwareError::WrongHardware {
            model: hardware_model.to_string(),
            models: manifest.hardware_models.clone(),
        });
    }
    if manifest.security_version < installed.security_version {
        return Err(FirmwareError::Rollback {
            offered: manifest.security_version,
            installed: installed.security_version,
        });
    }
    Ok(())
}

/// Accumulates a download, refusing to grow past the declared size.
pub struct Receiver {
    declared: i64,
    got: u64,
    digest: Sha256,
    out: Box<dyn Write + Send>,
}

impl Receiver {
    pub fn new(declared: i64, out: Box<dyn Write + Send>) -> Self {
        Self {
            declared,
            got: 0,
            digest: Sha256::new(),
            out,
        }
    }

    pub fn accept(&mut self, chunk: &[u8]) -> Result<(), FirmwareError> {
        self.got += chunk.len() as u64;
        if self.got > u64::try_from(self.declared).unwrap_or(0) {
            return Err(FirmwareError::TooLarge {
                declared: self.declared,
            });
        }
        self.digest.update(chunk);
        self.out
            .write_all(chunk)
            .map_err(|e| FirmwareError::Storage(e.to_string()))
    }

    /// Checks size and digest once the download ended.
    pub fn finish(mut self, expected_sha256: &str) -> Result<(), FirmwareError> {
        self.out
            .flush()
            .map_err(|e| FirmwareError::Storage(e.to_string()))?;
        if i64::try_from(self.got).ok() != Some(self.declared) {
            return Err(FirmwareError::SizeMismatch {
                got: self.got,
                declared: self.declared,
            });
        }
        let got: String = self
            .digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !got.eq_ignore_ascii_case(expected_sha256) {
            return Err(FirmwareError::DigestMismatch {
                got,
                expected: expected_sha256.to_string(),
            });
        }
        Ok(())
    }
}

/// An A/B slot layout in a directory: `slot-a.bin`, `slot-b.bin`, `state.json`.
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    /// Opens the layout, recording `initial` as installed if it is new.
    pub fn open(dir: &Path, initial: Installed) -> Result<Self, FirmwareError> {
        std::fs::create_dir_all(dir).map_err(|e| FirmwareError::Storage(e.to_string()))?;
        let slots = Self {
            dir: dir.to_path_buf(),
        };
        if !slots.state_path().exists() {
            slots.save(&initial)?;
        }
        Ok(slots)
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn slot_path(&self, slot: BootSlot) -> PathBuf {
        self.dir.join(match slot {
            BootSlot::A => "slot-a.bin",
            BootSlot::B => "slot-b.bin",
        })
    }

    pub fn installed(&self) -> Result<Installed, FirmwareError> {
        let text = std::fs::read_to_string(self.state_path())
            .map_err(|e| FirmwareError::Storage(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| FirmwareError::Storage(e.to_string()))
    }

    fn save(&self, installed: &Installed) -> Result<(), FirmwareError> {
        let tmp = self.dir.join("state.json.tmp");
        let json = serde_json::to_vec_pretty(installed)
            .map_err(|e| FirmwareError::Storage(e.to_string()))?;
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, self.state_path()))
            .map_err(|e| FirmwareError::Storage(e.to_string()))
    }

    /// A writer for the inactive slot.
    pub fn inactive_writer(&self) -> Result<(BootSlot, Box<dyn Write + Send>), FirmwareError> {
        let target = match self.installed()?.active {
            BootSlot::A => BootSlot::B,
            BootSlot::B => BootSlot::A,
        };
        let file = std::fs::File::create(self.slot_path(target))
            .map_err(|e| FirmwareError::Storage(e.to_string()))?;
        Ok((target, Box::new(std::io::BufWriter::new(file))))
    }

    /// Makes the freshly written slot active (the "reboot into B" of a real device).
    pub fn activate(
        &self,
        slot: BootSlot,
        manifest: &FirmwareManifest,
    ) -> Result<Installed, FirmwareError> {
        let installed = Installed {
            active: slot,
            version: manifest.version.clone(),
            security_version: manifest.security_version,
        };
        self.save(&installed)?;
        Ok(installed)
    }
}

/// Downloads firmware artifacts over HTTPS, trusting only the configured CA bundle.
#[derive(Clone)]
pub struct ArtifactClient {
    http: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Empty<hyper::body::Bytes>,
    >,
    timeout: std::time::Duration,
}

impl ArtifactClient {
    pub fn new(ca_pem: &str, timeout: std::time::Duration) -> anyhow::Result<Self> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "the artifact CA bundle holds no certificate"
        );
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https),
            timeout,
        })
    }

    /// Streams `url` into `receiver`, which refuses anything past the declared size.
    pub async fn download(&self, url: &str, receiver: &mut Receiver) -> Result<(), FirmwareError> {
        use http_body_util::BodyExt;
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| FirmwareError::Download(format!("bad URL {url}: {e}")))?;
        let fetch = async {
            let response = self
                .http
                .get(uri)
                .await
                .map_err(|e| FirmwareError::Download(format!("{e:#}")))?;
            if !response.status().is_success() {
                return Err(FirmwareError::Download(format!(
                    "{url} answered {}",
                    response.status()
                )));
            }
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| FirmwareError::Download(e.to_string()))?;
                if let Some(chunk) = frame.data_ref() {
                    receiver.accept(chunk)?;
                }
            }
            Ok(())
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .map_err(|_| {
                FirmwareError::Download(format!(
                    "download did not finish within {:?}",
                    self.timeout
                ))
            })?
    }
}

/// Where a device writes firmware: its A/B slots, or nowhere (a simulated device keeps only
/// what it installed).
pub enum Target<'a> {
    Slots(&'a Slots),
    Discard,
}

/// Everything a device needs to take an offer.
pub struct Updater {
    pub pinned_keys: Vec<TrustedKey>,
    pub hardware_model: String,
    pub artifacts: Option<ArtifactClient>,
}

impl Updater {
    /// Checks, downloads, verifies and installs `manifest`; returns what is installed after.
    pub async fn apply(
        &self,
        manifest: &FirmwareManifest,
        installed: &Installed,
        target: Target<'_>,
        now: Timestamp,
    ) -> Result<Installed, FirmwareError> {
        check_manifest(
            manifest,
            &self.pinned_keys,
            &self.hardware_model,
            installed,
            now,
        )?;
        let artifacts = self
            .artifacts
            .as_ref()
            .ok_or_else(|| FirmwareError::Download("no artifact CA configured".into()))?;
        match target {
            Target::Slots(slots) => {
                let (slot, out) = slots.inactive_writer()?;
                let mut receiver = Receiver::new(manifest.size_bytes, out);
                artifacts.download(&manifest.url, &mut receiver).await?;
                receiver.finish(&manifest.sha256)?;
                slots.activate(slot, manifest)
            }
            Target::Discard => {
                let mut receiver = Receiver::new(manifest.size_bytes, Box::new(std::io::sink()));
                artifacts.download(&manifest.url, &mut receiver).await?;
                receiver.finish(&manifest.sha256)?;
                let active = match installed.active {
                    BootSlot::A => BootSlot::B,
                    BootSlot::B => BootSlot::A,
                };
                Ok(Installed {
                    active,
                    version: manifest.version.clone(),
                    security_version: manifest.security_version,
                })
            }
        }
    }
}

/// Parses `--firmware-key keyId=base64`.
pub fn parse_pinned_key(s: &str) -> Result<TrustedKey, String> {
    let (id, key) = s
        .split_once('=')
        .ok_or("expected keyId=base64-public-key")?;
    Ok(TrustedKey {
        key_id: id.to_string(),
        public_key: key.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::rollout::FirmwareSignature;
    use ed25519_dalek::SigningKey;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const IMAGE: &[u8] = b"pressctl firmware 4.2.0 image bytes";

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().unwrap()
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn pinned() -> Vec<TrustedKey> {
        vec![TrustedKey {
            key_id: "vendor".into(),
            public_key: firmware::public_key_base64(&key().verifying_key()),
        }]
    }

    fn manifest(security_version: i64) -> FirmwareManifest {
        let mut m = FirmwareManifest {
            version: "4.2.0".into(),
            security_version,
            sha256: crds::hex_sha256(IMAGE),
            size_bytes: IMAGE.len() as i64,
            hardware_models: vec!["pressctl-v3".into()],
            expires: Time("2027-01-01T00:00:00Z".parse().unwrap()),
            url: "https://fw.example/4.2.0.bin".into(),
            signature: FirmwareSignature {
                key_id: String::new(),
                value: String::new(),
            },
        };
        firmware::sign(&mut m, "vendor", &key());
        m
    }

    fn installed(sv: i64) -> Installed {
        Installed {
            active: BootSlot::A,
            version: "4.1.3".into(),
            security_version: sv,
        }
    }

    fn check(m: &FirmwareManifest, sv: i64) -> Result<(), FirmwareError> {
        check_manifest(m, &pinned(), "pressctl-v3", &installed(sv), now())
    }

    #[test]
    fn a_signed_current_manifest_for_this_hardware_passes() {
        assert_eq!(check(&manifest(12), 12), Ok(()));
    }

    #[test]
    fn each_bad_manifest_is_refused_with_its_reason() {
        let mut tampered = manifest(12);
        tampered.sha256 = crds::hex_sha256(b"other image");
        assert_eq!(check(&tampered, 12).unwrap_err().reason(), "BadSignature");

        let mut other_key = manifest(12);
        firmware::sign(&mut other_key, "vendor", &SigningKey::from_bytes(&[9; 32]));
        assert_eq!(check(&other_key, 12).unwrap_err().reason(), "BadSignature");

        let mut unknown = manifest(12);
        firmware::sign(&mut unknown, "mallory", &key());
        assert_eq!(
            check(&unknown, 12).unwrap_err().reason(),
            "UnknownSigningKey"
        );

        assert_eq!(
            check(&manifest(11), 12).unwrap_err().reason(),
            "SecurityVersionRollback"
        );

        let expired = manifest(12);
        let late = check_manifest(
            &expired,
            &pinned(),
            "pressctl-v3",
            &installed(12),
            "2027-01-01T00:00:00Z".parse().unwrap(),
        );
        assert_eq!(late.unwrap_err().reason(), "ManifestExpired");

        let wrong_hw = check_manifest(&manifest(12), &pinned(), "hmi-12", &installed(12), now());
        assert_eq!(wrong_hw.unwrap_err().reason(), "WrongHardware");
    }

    #[test]
    fn a_download_past_the_declared_size_is_cut_off() {
        let mut r = Receiver::new(IMAGE.len() as i64, Box::new(std::io::sink()));
        r.accept(IMAGE).unwrap();
        assert_eq!(
            r.accept(b"x"),
            Err(FirmwareError::TooLarge {
                declared: IMAGE.len() as i64
            })
        );
    }

    #[test]
    fn a_short_or_altered_download_is_refused() {
        let mut r = Receiver::new(IMAGE.len() as i64, Box::new(std::io::sink()));
        r.accept(&IMAGE[..10]).unwrap();
        assert_eq!(
            r.finish(&crds::hex_sha256(IMAGE)).unwrap_err().reason(),
            "SizeMismatch"
        );

        let mut altered = IMAGE.to_vec();
        altered[0] ^= 1;
        let mut r = Receiver::new(IMAGE.len() as i64, Box::new(std::io::sink()));
        r.accept(&altered).unwrap();
        assert_eq!(
            r.finish(&crds::hex_sha256(IMAGE)).unwrap_err().reason(),
            "DigestMismatch"
        );
    }

    #[test]
    fn a_verified_image_goes_to_the_inactive_slot_and_becomes_active() {
        let dir = std::env::temp_dir().join(format!("fw-slots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let slots = Slots::open(&dir, installed(12)).unwrap();
        let m = manifest(12);
        let (slot, out) = slots.inactive_writer().unwrap();
        assert_eq!(slot, BootSlot::B);
        let mut r = Receiver::new(m.size_bytes, out);
        r.accept(IMAGE).unwrap();
        r.finish(&m.sha256).unwrap();
        let now_installed = slots.activate(slot, &m).unwrap();
        assert_eq!(
            now_installed,
            Installed {
                active: BootSlot::B,
                version: "4.2.0".into(),
                security_version: 12
            }
        );
        assert_eq!(std::fs::read(dir.join("slot-b.bin")).unwrap(), IMAGE);
        assert_eq!(
            Slots::open(&dir, installed(0))
                .unwrap()
                .installed()
                .unwrap(),
            now_installed,
            "state survives reopening"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
