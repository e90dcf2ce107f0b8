//! Device identity against the real API server: CSRs made by `openssl` (a client nobody here
//! wrote), Fleetwarden's approval policy, a test issuer that signs only approved requests, and
//! the certificates checked with `openssl verify`.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, bail, ensure};
use crds::{
    Device, DeviceGroup,
    certmanager::{Certificate, CertificateRequest},
    conditions,
    device::DevicePhase,
};
use e2e::{Env, Operator, eventually, issuer::TestIssuer, tail};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::process::Command;

const TRUST_DOMAIN: &str = "fleet.e2e";

struct Fixture {
    env: Arc<Env>,
    ns: String,
    operator: Operator,
    issuer: TestIssuer,
    devices: Api<Device>,
    requests: Api<CertificateRequest>,
    dir: std::path::PathBuf,
}

async fn setup(env: &Arc<Env>, test: &str) -> anyhow::Result<Fixture> {
    let ns = env.namespace(test).await?;
    let issuer = e2e::issuer::start(env.client.clone(), &ns, "e2e-ca")?;
    let groups: Api<DeviceGroup> = Api::namespaced(env.client.clone(), &ns);
    let group: DeviceGroup = serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": "cell"},
        "spec": {"certificates": {"issuerRef": issuer.issuer_ref(), "trustDomain": TRUST_DOMAIN, "duration": "720h", "renewBefore": "240h"}}
    }))?;
    groups.create(&PostParams::default(), &group).await?;
    let operator = env.start_operator(&ns, "operator").await?;
    let dir = env.scratch.join(&ns);
    std::fs::create_dir_all(&dir)?;
    Ok(Fixture {
        devices: Api::namespaced(env.client.clone(), &ns),
        requests: Api::namespaced(env.client.clone(), &ns),
        env: env.clone(),
        ns,
        operator,
        issuer,
        dir,
    })
}

impl Fixture {
    fn spiffe(&self, device: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/ns/{}/device/{device}", self.ns)
    }

    async fn create_device(
        &self,
        name: &str,
        extra_spec: serde_json::Value,
    ) -> anyhow::Result<Device> {
        let mut spec = json!({"group": "cell", "hardwareModel": "acme-pressctl-v3"});
        merge(&mut spec, extra_spec);
        let device: Device = serde_json::from_value(json!({
            "apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "metadata": {"name": name}, "spec": spec
        }))?;
        Ok(self.devices.create(&PostParams::default(), &device).await?)
    }

    /// What the gateway does when a device enrolls: record the CSR in status.enrollment.
    async fn submit_csr(&self, device: &str, csr: &str) -> anyhow::Result<()> {
        let sha = crds::csr_policy::decode_pem(csr)
            .map(|der| crds::hex_sha256(&der))
            .unwrap_or_else(|_| crds::hex_sha256(csr.as_bytes()));
        let body = json!({"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device", "status": {"enrollment": {
            "csr": csr, "csrSha256": sha, "method": "Token", "requestedAt": jiff::Timestamp::now().to_string()}}});
        self.devices
            .patch_status(
                device,
                &PatchParams::apply("fleetwarden-gateway").force(),
                &Patch::Apply(body),
            )
            .await?;
        Ok(())
    }

    /// `openssl req` with a fresh key; returns (key path, CSR PEM).
    async fn openssl_csr(
        &self,
        file: &str,
        key_args: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<(std::path::PathBuf, String)> {
        let key = self.dir.join(format!("{file}.key"));
        let csr = self.dir.join(format!("{file}.csr"));
        let mut args: Vec<&str> = vec!["req", "-new", "-nodes"];
        args.extend(key_args);
        args.extend(["-keyout", path(&key), "-out", path(&csr)]);
        args.extend(extra);
        run("openssl", &args).await?;
        Ok((key, std::fs::read_to_string(&csr)?))
    }

    async fn device_csr(
        &self,
        device: &str,
        file: &str,
    ) -> anyhow::Result<(std::path::PathBuf, String)> {
        let san = format!("subjectAltName=URI:{}", self.spiffe(device));
        let subj = format!("/CN={device}");
        self.openssl_csr(
            file,
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            &["-subj", &subj, "-addext", &san],
        )
        .await
    }

    async fn wait_condition(
        &self,
        device: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> anyhow::Result<Device> {
        let what = format!("{device}: {type_}={status} ({reason})");
        let devices = self.devices.clone();
        eventually(Duration::from_secs(30), &what, || {
            let devices = devices.clone();
            async move {
                let d = devices.get(device).await?;
                let found = d
                    .status
                    .as_ref()
                    .and_then(|s| conditions::find(&s.conditions, type_))
                    .is_some_and(|c| {
                        c.status == status && (reason.is_empty() || c.reason == reason)
                    });
                Ok(found.then_some(d))
            }
        })
        .await
        .with_context(|| format!("operator log:\n{}", tail(&self.operator.process.log(), 30)))
    }

    async fn requests_of(&self, device: &Device) -> anyhow::Result<Vec<CertificateRequest>> {
        let selector = format!(
            "fleetwarden.io/device-uid={}",
            device.uid().unwrap_or_default()
        );
        Ok(self
            .requests
            .list(&ListParams::default().labels(&selector))
            .await?
            .items)
    }

    async fn writes(&self) -> anyhow::Result<f64> {
        self.operator
            .metric("fleetwarden_operator_api_writes_total")
            .await
    }
}

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(b), serde_json::Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The issued certificate, checked by openssl: chains to the issuer's CA, names the device,
/// and carries the key the device generated.
async fn verify_with_openssl(
    f: &Fixture,
    device: &Device,
    key: &Path,
    file: &str,
) -> anyhow::Result<()> {
    let identity = device
        .status
        .as_ref()
        .and_then(|s| s.identity.as_ref())
        .context("no identity")?;
    let cert = f.dir.join(format!("{file}.crt"));
    let ca = f.dir.join("ca.crt");
    std::fs::write(&cert, &identity.certificate)?;
    std::fs::write(&ca, &f.issuer.ca_pem)?;
    let verified = run("openssl", &["verify", "-CAfile", path(&ca), path(&cert)]).await?;
    ensure!(
        verified.trim().ends_with("OK"),
        "openssl verify: {verified}"
    );
    let san = run(
        "openssl",
        &[
            "x509",
            "-in",
            path(&cert),
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    )
    .await?;
    let name = device.name_any();
    ensure!(
        san.contains(&format!("URI:{}", f.spiffe(&name))) && !san.contains("DNS:"),
        "SAN: {san}"
    );
    let cert_key = run(
        "openssl",
        &["x509", "-in", path(&cert), "-noout", "-pubkey"],
    )
    .await?;
    let device_key = run("openssl", &["pkey", "-in", path(key), "-pubout"]).await?;
    ensure!(
        cert_key == device_key,
        "the certificate does not carry the device's key"
    );
    let fingerprint = run(
        "openssl",
        &[
            "x509",
            "-in",
            path(&cert),
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    )
    .await?;
    let hex: String = fingerprint
        .split('=')
        .nth(1)
        .unwrap_or_default()
        .trim()
        .replace(':', "")
        .to_lowercase();
    ensure!(
        hex == identity.fingerprint_sha256,
        "fingerprint {hex} != status {}",
        identity.fingerprint_sha256
    );
    ensure!(identity.spiffe_id == f.spiffe(&name));
    Ok(())
}

pub async fn a_device_enrolls_with_an_openssl_csr_and_renews(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "enroll").await?;
    f.create_device("plc-1", json!({})).await?;
    f.wait_condition("plc-1", "Enrolled", "False", "AwaitingCsr")
        .await?;

    let (key, csr) = f.device_csr("plc-1", "plc-1-a").await?;
    let started = std::time::Instant::now();
    f.submit_csr("plc-1", &csr).await?;
    let device = f
        .wait_condition("plc-1", "Enrolled", "True", "Issued")
        .await?;
    eprintln!(
        "enrolled in {:.2}s from CSR to Enrolled=True",
        started.elapsed().as_secs_f64()
    );
    verify_with_openssl(&f, &device, &key, "plc-1-a").await?;
    let status = device.status.clone().context("status")?;
    ensure!(
        status.phase == Some(DevicePhase::Active),
        "phase {:?}",
        status.phase
    );
    ensure!(conditions::is_true(&status.conditions, "Ready"));
    ensure!(status.observed_generation == device.metadata.generation);

    // The real kubectl agrees: `kubectl wait --for=condition=Ready` works on Devices.
    f.env
        .kubectl_run(&[
            "wait",
            "-n",
            &f.ns,
            "--for=condition=Ready",
            "--timeout=10s",
            "device/plc-1",
        ])
        .await?;
    let requests = f.requests_of(&device).await?;
    ensure!(
        requests.len() == 1,
        "{} CertificateRequests",
        requests.len()
    );
    let approved = requests[0]
        .status
        .as_ref()
        .and_then(|s| crds::certmanager::find_condition(&s.conditions, "Approved"))
        .context("no Approved condition")?;
    ensure!(
        approved.reason.as_deref() == Some("fleetwarden.io"),
        "approved by {:?}",
        approved.reason
    );
    let owner = &requests[0].owner_references()[0];
    ensure!(
        owner.kind == "Device"
            && owner.controller == Some(true)
            && owner.uid == device.uid().unwrap_or_default()
    );
    ensure!(
        requests[0]
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("fleetwarden")
    );
    ensure!(
        f.operator
            .metric(
                "fleetwarden_operator_enrollments_total{result=\"approved\",reason=\"Approved\"}"
            )
            .await?
            >= 1.0
    );
    let identities = |change: &'static str| {
        let operator = &f.operator;
        async move {
            operator
                .metric(&format!(
                    "fleetwarden_operator_identities_written_total{{change=\"{change}\"}}"
                ))
                .await
        }
    };
    let issued = identities("issued").await?;
    ensure!(issued == 1.0, "{issued} identities counted as issued");

    // Renewal: a new key and CSR; the identity rotates and the old request goes away.
    let old = status.identity.clone().context("identity")?;
    let (new_key, new_csr) = f.device_csr("plc-1", "plc-1-b").await?;
    f.submit_csr("plc-1", &new_csr).await?;
    let devices = f.devices.clone();
    let rotated = eventually(Duration::from_secs(30), "the identity to rotate", || {
        let devices = devices.clone();
        let old_fp = old.fingerprint_sha256.clone();
        async move {
            let d = devices.get("plc-1").await?;
            let fp = d
                .status
                .as_ref()
                .and_then(|s| s.identity.as_ref())
                .map(|i| i.fingerprint_sha256.clone());
            Ok((fp.is_some() && fp != Some(old_fp)).then_some(d))
        }
    })
    .await?;
    verify_with_openssl(&f, &rotated, &new_key, "plc-1-b").await?;
    let new = rotated
        .status
        .as_ref()
        .and_then(|s| s.identity.clone())
        .context("identity")?;
    ensure!(
        new.serial_number != old.serial_number,
        "serial did not change"
    );
    let counted = (identities("issued").await?, identities("rotated").await?);
    ensure!(
        counted == (1.0, 1.0),
        "identities counted (issued, rotated): {counted:?}; want 1 and 1"
    );
    let device = rotated.clone();
    eventually(
        Duration::from_secs(20),
        "the old CertificateRequest to be removed",
        || async { Ok((f.requests_of(&device).await?.len() == 1).then_some(())) },
    )
    .await?;
    Ok(())
}

pub async fn bad_csrs_are_denied_with_their_reasons(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "deny").await?;
    let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

    // Wrong SAN: the device asks for another device's identity.
    f.create_device("wrong-san", json!({})).await?;
    let other = format!("subjectAltName=URI:{}", f.spiffe("someone-else"));
    let (_, csr) = f
        .openssl_csr(
            "wrong-san",
            &p256,
            &["-subj", "/CN=wrong-san", "-addext", &other],
        )
        .await?;
    f.submit_csr("wrong-san", &csr).await?;

    // Pinned key: the Device pins one key, the CSR carries another.
    f.create_device(
        "pinned",
        json!({"identity": {"publicKeySha256": "ab".repeat(32)}}),
    )
    .await?;
    let (_, csr) = f.device_csr("pinned", "pinned").await?;
    f.submit_csr("pinned", &csr).await?;

    // RSA-1024.
    f.create_device("rsa-1024", json!({})).await?;
    let san = format!("subjectAltName=URI:{}", f.spiffe("rsa-1024"));
    let (_, csr) = f
        .openssl_csr(
            "rsa-1024",
            &["-newkey", "rsa:1024"],
            &["-subj", "/CN=rsa-1024", "-addext", &san],
        )
        .await?;
    f.submit_csr("rsa-1024", &csr).await?;

    // CA=true.
    f.create_device("wants-ca", json!({})).await?;
    let san = format!("subjectAltName=URI:{}", f.spiffe("wants-ca"));
    let (_, csr) = f
        .openssl_csr(
            "wants-ca",
            &p256,
            &[
                "-subj",
                "/CN=wants-ca",
                "-addext",
                &san,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        )
        .await?;
    f.submit_csr("wants-ca", &csr).await?;

    // Garbage PEM.
    f.create_device("garbage", json!({})).await?;
    f.submit_csr("garbage", "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZSBpbiwgZ2FyYmFnZSBvdXQ=\n-----END CERTIFICATE REQUEST-----\n")
        .await?;

    for (device, reason) in [
        ("wrong-san", "SpiffeIdMismatch"),
        ("pinned", "PublicKeyPinMismatch"),
        ("rsa-1024", "RsaKeySizeNotAllowed"),
        ("wants-ca", "CaRequested"),
        ("garbage", "CsrUnparsable"),
    ] {
        let d = f
            .wait_condition(device, "Enrolled", "False", reason)
            .await?;
        let status = d.status.clone().context("status")?;
        ensure!(status.identity.is_none(), "{device} got an identity");
        ensure!(
            f.requests_of(&d).await?.is_empty(),
            "{device} got a CertificateRequest"
        );
        let message = &conditions::find(&status.conditions, "Enrolled")
            .context("Enrolled")?
            .message;
        ensure!(
            message.contains(reason),
            "{device}: message {message:?} does not name {reason}"
        );
        let counted = f
            .operator
            .metric(&format!(
                "fleetwarden_operator_enrollments_total{{result=\"denied\",reason=\"{reason}\"}}"
            ))
            .await?;
        ensure!(counted == 1.0, "{device}: denial counted {counted} times");
    }
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(f.env.client.clone(), &f.ns);
    let denied = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("CsrDenied"))
        .count();
    ensure!(
        denied == 5,
        "{denied} CsrDenied events for 5 denied devices"
    );
    Ok(())
}

pub async fn a_request_approved_by_someone_else_is_not_trusted(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let mut f = setup(&env, "foreign").await?;
    let device = f.create_device("plc-foreign", json!({})).await?;
    let (_, csr) = f.device_csr("plc-foreign", "plc-foreign").await?;
    // cert-manager's built-in approver wins the race: while the operator is down, the CSR
    // arrives and its CertificateRequest is approved by someone else.
    f.operator
        .process
        .terminate(Duration::from_secs(15))
        .await?;
    f.submit_csr("plc-foreign", &csr).await?;
    let der = crds::csr_policy::decode_pem(&csr)?;
    let name = format!("plc-foreign-{}", &crds::hex_sha256(&der)[..12]);
    let cr: CertificateRequest = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest",
        "metadata": {"name": name, "ownerReferences": [{"apiVersion": "fleetwarden.io/v1alpha1", "kind": "Device",
            "name": "plc-foreign", "uid": device.uid(), "controller": true}]},
        "spec": {"request": base64_encode(&csr), "issuerRef": f.issuer.issuer_ref(), "usages": ["client auth"]}
    }))?;
    f.requests.create(&PostParams::default(), &cr).await?;
    let approved = json!({"apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest", "status": {"conditions": [
        {"type": "Approved", "status": "True", "reason": "cert-manager.io", "message": "Certificate request has been approved by cert-manager.io",
         "lastTransitionTime": jiff::Timestamp::now().to_string()}]}});
    f.requests
        .patch_status(
            &name,
            &PatchParams::apply("cert-manager-certificaterequests-approver"),
            &Patch::Apply(approved),
        )
        .await?;
    f.operator = f.env.start_operator(&f.ns, "operator-2").await?;

    let d = f
        .wait_condition("plc-foreign", "Degraded", "True", "ForeignApproval")
        .await?;
    // The issuer signs approved requests, so a certificate exists, but the device must not get it.
    let issued = eventually(Duration::from_secs(15), "the issuer to sign", || async {
        let cr = f.requests.get(&name).await?;
        Ok(cr.status.and_then(|s| s.certificate))
    })
    .await?;
    ensure!(!issued.is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = f.devices.get(&d.name_any()).await?;
    ensure!(
        d.status
            .as_ref()
            .and_then(|s| s.identity.as_ref())
            .is_none(),
        "a foreign-approved certificate was trusted"
    );
    ensure!(!conditions::is_true(
        &d.status.as_ref().context("status")?.conditions,
        "Ready"
    ));
    Ok(())
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub async fn retire_and_delete_clean_up_every_owned_object(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "retire").await?;
    let groups: Api<DeviceGroup> = Api::namespaced(f.env.client.clone(), &f.ns);

    // Device-generated key: retire, then delete.
    f.create_device("plc-old", json!({})).await?;
    let (_, csr) = f.device_csr("plc-old", "plc-old").await?;
    f.submit_csr("plc-old", &csr).await?;
    let enrolled = f
        .wait_condition("plc-old", "Enrolled", "True", "Issued")
        .await?;
    let serial = enrolled
        .status
        .as_ref()
        .and_then(|s| s.identity.as_ref())
        .context("identity")?
        .serial_number
        .clone();
    f.devices
        .patch(
            "plc-old",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"lifecycle": "Retired"}})),
        )
        .await?;
    let retired = f
        .wait_condition("plc-old", "Ready", "False", "Retired")
        .await?;
    let status = retired.status.clone().context("status")?;
    ensure!(status.identity.is_none(), "identity kept after retirement");
    ensure!(status.phase == Some(DevicePhase::Retired));
    eventually(
        Duration::from_secs(15),
        "the CertificateRequests to be deleted",
        || async { Ok(f.requests_of(&retired).await?.is_empty().then_some(())) },
    )
    .await?;
    let group = groups.get("cell").await?;
    let revoked = group.status.map(|s| s.revoked_serials).unwrap_or_default();
    ensure!(
        revoked.first().map(|r| r.serial_number.as_str()) == Some(serial.as_str()),
        "revokedSerials: {revoked:?}"
    );
    ensure!(revoked[0].device == "plc-old");
    // Retired is terminal for the operator too: reactivating is refused by the webhook (later),
    // and deleting works.
    f.devices
        .delete("plc-old", &DeleteParams::default())
        .await?;
    eventually(
        Duration::from_secs(15),
        "the Device to be deleted",
        || async { Ok(f.devices.get_opt("plc-old").await?.is_none().then_some(())) },
    )
    .await?;

    // ManagedKey: Certificate and Secret exist, then deleting the Device removes them.
    f.create_device("hmi-1", json!({"identity": {"mode": "ManagedKey"}}))
        .await?;
    let hmi = f
        .wait_condition("hmi-1", "Enrolled", "True", "Issued")
        .await?;
    let identity = hmi
        .status
        .as_ref()
        .and_then(|s| s.identity.as_ref())
        .context("identity")?;
    ensure!(
        identity.spiffe_id == f.spiffe("hmi-1")
            && identity.source.as_deref() == Some("hmi-1-identity")
    );
    let certs: Api<Certificate> = Api::namespaced(f.env.client.clone(), &f.ns);
    let secrets: Api<Secret> = Api::namespaced(f.env.client.clone(), &f.ns);
    ensure!(certs.get_opt("hmi-1-identity").await?.is_some());
    ensure!(secrets.get_opt("hmi-1-identity-tls").await?.is_some());
    f.devices.delete("hmi-1", &DeleteParams::default()).await?;
    eventually(
        Duration::from_secs(15),
        "the ManagedKey Device and its objects to be deleted",
        || async {
            let gone = f.devices.get_opt("hmi-1").await?.is_none()
                && certs.get_opt("hmi-1-identity").await?.is_none()
                && secrets.get_opt("hmi-1-identity-tls").await?.is_none();
            Ok(gone.then_some(()))
        },
    )
    .await?;
    let group = groups.get("cell").await?;
    let revoked = group.status.map(|s| s.revoked_serials).unwrap_or_default();
    ensure!(
        revoked.first().map(|r| r.device.as_str()) == Some("hmi-1"),
        "ManagedKey serial not recorded: {revoked:?}"
    );

    // A Device whose cert-manager objects are already gone is still deleted (no stuck finalizer).
    f.create_device("plc-gone", json!({})).await?;
    let (_, csr) = f.device_csr("plc-gone", "plc-gone").await?;
    f.submit_csr("plc-gone", &csr).await?;
    let d = f
        .wait_condition("plc-gone", "Enrolled", "True", "Issued")
        .await?;
    for cr in f.requests_of(&d).await? {
        f.requests
            .delete(&cr.name_any(), &DeleteParams::default())
            .await?;
    }
    f.devices
        .delete("plc-gone", &DeleteParams::default())
        .await?;
    eventually(
        Duration::from_secs(15),
        "the Device with no cert-manager objects left to be deleted",
        || async { Ok(f.devices.get_opt("plc-gone").await?.is_none().then_some(())) },
    )
    .await?;
    Ok(())
}

pub async fn an_unchanged_enrolled_device_costs_zero_writes(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "idle").await?;
    f.create_device("plc-idle", json!({})).await?;
    let (_, csr) = f.device_csr("plc-idle", "plc-idle").await?;
    f.submit_csr("plc-idle", &csr).await?;
    f.wait_condition("plc-idle", "Enrolled", "True", "Issued")
        .await?;
    // Let the enrollment's own follow-up reconciles settle: no new writes for a full second.
    let mut writes = f.writes().await?;
    let settle_deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = f.writes().await?;
        if now == writes {
            break;
        }
        ensure!(
            std::time::Instant::now() < settle_deadline,
            "the operator kept writing for 20s"
        );
        writes = now;
    }
    let before = f.devices.get("plc-idle").await?;
    let reconciles = f
        .operator
        .metric("fleetwarden_operator_reconciles_total{controller=\"device\"}")
        .await?;

    // Touch the Device (a label the operator does not care about) to force reconciles.
    for i in 0..5 {
        f.devices
            .patch(
                "plc-idle",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"touch": i.to_string()}}})),
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually(
        Duration::from_secs(10),
        "reconciles of the touched Device",
        || async {
            let now = f
                .operator
                .metric("fleetwarden_operator_reconciles_total{controller=\"device\"}")
                .await?;
            Ok((now >= reconciles + 5.0).then_some(now))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_writes = f.writes().await?;
    let after = f.devices.get("plc-idle").await?;
    eprintln!(
        "5 reconciles of an unchanged enrolled Device: {} API writes",
        after_writes - writes
    );
    ensure!(
        after_writes == writes,
        "reconciling an unchanged Device made {} writes",
        after_writes - writes
    );
    ensure!(after.status == before.status, "status changed");
    Ok(())
}

pub async fn an_operator_restarted_mid_enrollment_converges_without_duplicates(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let mut f = setup(&env, "restart").await?;
    const N: usize = 100;
    let mut csrs = Vec::new();
    for i in 0..N {
        let name = format!("plc-{i:02}");
        f.create_device(&name, json!({})).await?;
        csrs.push((name.clone(), f.device_csr(&name, &name).await?.1));
    }
    // All CSRs arrive while the operator is down, so the next one starts with a backlog; the
    // issuer is down too, so requests stay approved but unsigned across the restart.
    f.operator
        .process
        .terminate(Duration::from_secs(15))
        .await?;
    f.issuer.pause();
    for (name, csr) in &csrs {
        f.submit_csr(name, csr).await?;
    }
    f.operator = f.env.spawn_operator(&f.ns, "operator-1")?;
    // Kill the operator as soon as it has begun creating CertificateRequests.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while f
        .requests
        .list(&ListParams::default().limit(1))
        .await?
        .items
        .is_empty()
    {
        ensure!(
            std::time::Instant::now() < deadline,
            "no CertificateRequest within 20s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.operator.process.kill().await?;
    let before_restart = f.requests.list(&ListParams::default()).await?.items.len();
    eprintln!("operator killed with {before_restart}/{N} CertificateRequests created");
    f.operator = f.env.start_operator(&f.ns, "operator-2").await?;
    f.issuer.resume();
    for (name, _) in &csrs {
        f.wait_condition(name, "Enrolled", "True", "Issued").await?;
    }
    for (name, _) in &csrs {
        let d = f.devices.get(name).await?;
        let requests = f.requests_of(&d).await?;
        ensure!(
            requests.len() == 1,
            "{name} has {} CertificateRequests",
            requests.len()
        );
    }
    let all = f.requests.list(&ListParams::default()).await?.items.len();
    ensure!(all == N, "{all} CertificateRequests for {N} devices");
    Ok(())
}

pub async fn a_certificate_inside_its_renewal_window_is_flagged(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let f = setup(&env, "expiring").await?;
    let groups: Api<DeviceGroup> = Api::namespaced(f.env.client.clone(), &f.ns);
    let short: DeviceGroup = serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": "short-lived"},
        "spec": {"certificates": {"issuerRef": f.issuer.issuer_ref(), "trustDomain": TRUST_DOMAIN, "duration": "70s", "renewBefore": "60s"}}
    }))?;
    groups.create(&PostParams::default(), &short).await?;
    f.create_device("sensor-1", json!({"group": "short-lived"}))
        .await?;
    let (_, csr) = f.device_csr("sensor-1", "sensor-1").await?;
    f.submit_csr("sensor-1", &csr).await?;
    let d = f
        .wait_condition("sensor-1", "CertificateExpiring", "True", "RenewalDue")
        .await?;
    let status = d.status.context("status")?;
    ensure!(
        conditions::is_true(&status.conditions, "Ready"),
        "an expiring certificate is still valid"
    );
    let identity = status.identity.context("identity")?;
    let lifetime = identity.not_after.0.duration_since(identity.not_before.0);
    ensure!(
        lifetime.as_secs() <= 135,
        "issued for {lifetime:?}, not the group's 70s (plus 1m backdating)"
    );
    let gauge = f
        .operator
        .metric("fleetwarden_operator_certificates_expiring")
        .await?;
    ensure!(gauge == 1.0, "certificates_expiring gauge is {gauge}");
    Ok(())
}
