//! Test fleets: the gateway's server certificate, DeviceGroups and Devices with single-use
//! enrollment tokens, and manufacturer (IDevID) certificates, made the way an operator of a real
//! fleet would provision them.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use crds::{Device, enrollment_token::TokenRecord};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use serde::{Deserialize, Serialize};

/// A CA and a server certificate for 127.0.0.1 / localhost, written as PEM files.
pub struct ServerPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerPki {
    /// The PKI a previous [`ServerPki::generate`] wrote into `dir`, if complete.
    pub fn existing(dir: &Path) -> Option<Self> {
        let pki = Self {
            ca: dir.join("gateway-ca.pem"),
            cert: dir.join("gateway.pem"),
            key: dir.join("gateway-key.pem"),
        };
        (pki.ca.is_file() && pki.cert.is_file() && pki.key.is_file()).then_some(pki)
    }

    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (ca_pem, issuer) = new_ca("e2e gateway CA")?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse()?));
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetwarden-gateway");
        let cert = params.signed_by(&key, &issuer)?;
        let pki = Self {
            ca: dir.join("gateway-ca.pem"),
            cert: dir.join("gateway.pem"),
            key: dir.join("gateway-key.pem"),
        };
        std::fs::write(&pki.ca, ca_pem)?;
        std::fs::write(&pki.cert, cert.pem())?;
        std::fs::write(&pki.key, key.serialize_pem())?;
        Ok(pki)
    }
}

/// A self-signed CA: its PEM and the issuer that signs with it.
pub fn new_ca(name: &str) -> anyhow::Result<(String, Issuer<'static, KeyPair>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key)?.pem();
    Ok((pem, Issuer::new(params, key)))
}

/// A manufacturer certificate naming `serial`, signed by `issuer`: (certificate PEM, key PEM).
pub fn idevid(issuer: &Issuer<'static, KeyPair>, serial: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, serial);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
}

/// One provisioned device and its token, in the shape `fleetwarden-agent simulate --devices` reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Provisioned {
    pub namespace: String,
    pub name: String,
    pub token: String,
    /// The simulated device fails every firmware install.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_updates: bool,
}

/// A fresh random token (256 bits, URL-safe).
pub fn new_token() -> anyhow::Result<String> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Creates `names` as Devices of `group` (model `model`) and records a token for each in the
/// Secret `secret` (only hashes are stored). Returns the tokens to hand to the devices.
pub async fn provision(
    client: &Client,
    namespace: &str,
    group: &str,
    model: &str,
    secret: &str,
    names: &[String],
) -> anyhow::Result<Vec<Provisioned>> {
    let devices: Api<Device> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(names.iter().cloned().map(|name| {
        let devices = devices.clone();
        async move {
            let device: Device = serde_json::from_value(serde_json::json!({
                "apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device",
                "metadata": {"name": name},
                "spec": {"group": group, "hardwareModel": model, "serialNumber": format!("SN-{name}")}
            }))?;
            devices
                .create(&PostParams::default(), &device)
                .await
                .with_context(|| format!("creating Device {name}"))?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(32)
    .try_collect::<Vec<_>>()
    .await?;

    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    let mut out = Vec::with_capacity(names.len());
    let mut data = std::collections::BTreeMap::new();
    for name in names {
        let token = new_token()?;
        data.insert(
            name.clone(),
            ByteString(
                TokenRecord::for_token(&token, expires)
                    .to_json()
                    .into_bytes(),
            ),
        );
        out.push(Provisioned {
            namespace: namespace.to_string(),
            name: name.clone(),
            token,
            fail_updates: false,
        });
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..Secret::default()
    };
    secrets
        .patch(
            secret.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::apply("e2e-provisioner"),
            &Patch::Apply(&secret),
        )
        .await
        .context("writing the token Secret")?;
    Ok(out)
}
