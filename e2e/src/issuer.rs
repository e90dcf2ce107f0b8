//! A test-only certificate issuer for one namespace, standing in for cert-manager on a control
//! plane that has none. Like cert-manager's external issuers it signs a CertificateRequest for
//! its issuerRef only once the request is Approved, marks denied ones failed, and never approves
//! anything itself. It also plays cert-manager's Certificate controller for ManagedKey devices:
//! key generation, the CertificateRequest, and the Secret.
//!
//! It polls its namespace every 100 ms; that is plenty for tests and keeps it simple.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use base64::{Engine, engine::general_purpose::STANDARD};
use crds::{
    certmanager::{
        self, CERTIFICATE_NAME_ANNOTATION, CertManagerCondition, Certificate, CertificateRequest,
        CertificateRequestSpec, condition,
    },
    common::{IssuerKind, IssuerRef},
};
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::json;
use tokio::task::JoinHandle;

/// API group of the test issuer's issuerRefs; no such CRD exists, as with many external issuers
/// only the reference matters.
pub const ISSUER_GROUP: &str = "e2e.fleetwarden.io";
const MANAGER: &str = "e2e-ca-issuer";

pub struct TestIssuer {
    pub name: String,
    /// PEM of the CA that signs everything.
    pub ca_pem: String,
    paused: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl TestIssuer {
    /// Stops signing (approved requests wait), like an issuer that is down.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// The issuerRef a DeviceGroup uses to get certificates from this issuer.
    pub fn issuer_ref(&self) -> IssuerRef {
        IssuerRef {
            name: self.name.clone(),
            kind: IssuerKind::Issuer,
            group: ISSUER_GROUP.to_string(),
        }
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// Starts an issuer called `name` serving `namespace`.
pub fn start(client: Client, namespace: &str, name: &str) -> anyhow::Result<TestIssuer> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("e2e device CA {namespace}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key)?.pem();
    let ca = Ca {
        issuer: Issuer::new(params, key),
        pem: pem.clone(),
    };
    let ns = namespace.to_string();
    let issuer_name = name.to_string();
    let paused = Arc::new(AtomicBool::new(false));
    let is_paused = paused.clone();
    let task = tokio::spawn(async move {
        let mut keys: HashMap<String, KeyPair> = HashMap::new();
        loop {
            if is_paused.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            if let Err(e) = pass(&client, &ns, &issuer_name, &ca, &mut keys).await {
                eprintln!("e2e issuer {ns}/{issuer_name}: {e:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok(TestIssuer {
        name: name.to_string(),
        ca_pem: pem,
        paused,
        task,
    })
}

fn ours(r: &IssuerRef, name: &str) -> bool {
    r.name == name && r.group == ISSUER_GROUP && r.kind == IssuerKind::Issuer
}

async fn pass(
    client: &Client,
    ns: &str,
    name: &str,
    ca: &Ca,
    keys: &mut HashMap<String, KeyPair>,
) -> anyhow::Result<()> {
    let requests: Api<CertificateRequest> = Api::namespaced(client.clone(), ns);
    let certificates: Api<Certificate> = Api::namespaced(client.clone(), ns);
    let all_requests = requests.list(&ListParams::default()).await?.items;
    for cr in all_requests
        .iter()
        .filter(|cr| ours(&cr.spec.issuer_ref, name))
    {
        sign_if_approved(&requests, cr, ca).await?;
    }
    for cert in certificates
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|c| ours(&c.spec.issuer_ref, name))
    {
        manage_certificate(client, ns, cert, &all_requests, keys, ca).await?;
    }
    Ok(())
}

fn conditions(cr: &CertificateRequest) -> &[CertManagerCondition] {
    cr.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

async fn set_status(
    api: &Api<CertificateRequest>,
    cr: &CertificateRequest,
    status: serde_json::Value,
) -> anyhow::Result<()> {
    let body =
        json!({"apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest", "status": status});
    api.patch_status(
        &cr.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

async fn sign_if_approved(
    api: &Api<CertificateRequest>,
    cr: &CertificateRequest,
    ca: &Ca,
) -> anyhow::Result<()> {
    let conds = conditions(cr);
    if certmanager::find_condition(conds, condition::READY).is_some() {
        return Ok(());
    }
    let now = Time(Timestamp::now());
    if certmanager::condition_true(conds, condition::DENIED) {
        let ready = CertManagerCondition::new(
            condition::READY,
            false,
            "Denied",
            "The CertificateRequest was denied by an approval controller",
            now,
        );
        return set_status(api, cr, json!({"conditions": [ready]})).await;
    }
    if !certmanager::condition_true(conds, condition::APPROVED) {
        return Ok(());
    }
    let signed = STANDARD
        .decode(&cr.spec.request)
        .ok()
        .and_then(|pem| String::from_utf8(pem).ok())
        .context("request is not base64 PEM")
        .and_then(|pem| sign(&pem, cr, ca));
    match signed {
        Ok(cert_pem) => {
            let ready = CertManagerCondition::new(
                condition::READY,
                true,
                "Issued",
                "Certificate fetched from issuer successfully",
                now,
            );
            set_status(
                api,
                cr,
                json!({"conditions": [ready], "certificate": STANDARD.encode(cert_pem), "ca": STANDARD.encode(&ca.pem)}),
            )
            .await
        }
        Err(e) => {
            let ready = CertManagerCondition::new(
                condition::READY,
                false,
                "Failed",
                format!("signing failed: {e:#}"),
                now.clone(),
            );
            set_status(api, cr, json!({"conditions": [ready], "failureTime": now})).await
        }
    }
}

/// Signs like cert-manager's CA issuer: subject and SANs from the CSR, the requested duration
/// (default 90 days) and usages.
fn sign(csr_pem: &str, cr: &CertificateRequest, ca: &Ca) -> anyhow::Result<String> {
    let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let duration = cr
        .spec
        .duration
        .as_deref()
        .and_then(|d| d.parse::<crds::common::Duration>().ok())
        .map(|d| d.get())
        .unwrap_or(Duration::from_secs(90 * 24 * 3600));
    let now = time::OffsetDateTime::now_utc();
    let params = &mut csr.params;
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + duration;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let seed = format!(
        "{}{}",
        cr.uid().unwrap_or_default(),
        now.unix_timestamp_nanos()
    );
    let mut serial = crds::hex_sha256(seed.as_bytes()).as_bytes()[..16].to_vec();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(csr.signed_by(&ca.issuer)?.pem())
}

/// cert-manager's Certificate controller, reduced to what ManagedKey needs: generate a key,
/// request a certificate for it, and store both in the Secret once issued.
async fn manage_certificate(
    client: &Client,
    ns: &str,
    cert: &Certificate,
    all_requests: &[CertificateRequest],
    keys: &mut HashMap<String, KeyPair>,
    ca: &Ca,
) -> anyhow::Result<()> {
    let cert_name = cert.name_any();
    let ready = cert
        .status
        .as_ref()
        .is_some_and(|s| certmanager::condition_true(&s.conditions, condition::READY));
    if ready {
        return Ok(());
    }
    let requests: Api<CertificateRequest> = Api::namespaced(client.clone(), ns);
    let request_name = format!("{cert_name}-1");
    let Some(cr) = all_requests.iter().find(|r| r.name_any() == request_name) else {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = &cert.spec.common_name {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn.as_str());
        }
        params.subject_alt_names = cert
            .spec
            .uris
            .iter()
            .map(|u| Ok(SanType::URI(u.as_str().try_into()?)))
            .collect::<anyhow::Result<_>>()?;
        let csr_pem = params.serialize_request(&key)?.pem()?;
        keys.insert(cert_name.clone(), key);
        let cr = CertificateRequest {
            metadata: ObjectMeta {
                name: Some(request_name),
                namespace: Some(ns.to_string()),
                annotations: Some(
                    [(CERTIFICATE_NAME_ANNOTATION.to_string(), cert_name.clone())].into(),
                ),
                owner_references: Some(vec![OwnerReference {
                    api_version: "cert-manager.io/v1".into(),
                    kind: "Certificate".into(),
                    name: cert_name.clone(),
                    uid: cert.uid().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            spec: CertificateRequestSpec {
                request: STANDARD.encode(csr_pem),
                issuer_ref: cert.spec.issuer_ref.clone(),
                duration: cert.spec.duration.clone(),
                usages: cert.spec.usages.clone(),
                is_ca: false,
            },
            status: None,
        };
        requests.create(&PostParams::default(), &cr).await?;
        return Ok(());
    };
    let Some(status) = cr
        .status
        .as_ref()
        .filter(|s| certmanager::condition_true(&s.conditions, condition::READY))
    else {
        return Ok(());
    };
    let Some(key) = keys.get(&cert_name) else {
        return Ok(());
    };
    let decode = |b: &Option<String>| {
        b.as_deref()
            .and_then(|b| STANDARD.decode(b).ok())
            .unwrap_or_default()
    };
    let tls_crt = decode(&status.certificate);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(cert.spec.secret_name.clone()),
            namespace: Some(ns.to_string()),
            annotations: Some(
                [(CERTIFICATE_NAME_ANNOTATION.to_string(), cert_name.clone())].into(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt".to_string(), ByteString(tls_crt.clone())),
                (
                    "tls.key".to_string(),
                    ByteString(key.serialize_pem().into_bytes()),
                ),
                (
                    "ca.crt".to_string(),
                    ByteString(ca.pem.clone().into_bytes()),
                ),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    secrets
        .patch(
            &cert.spec.secret_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;
    let issued = crds::identity::inspect(
        &String::from_utf8_lossy(&tls_crt),
        cert.spec
            .uris
            .first()
            .map(String::as_str)
            .unwrap_or_default(),
        None,
    )?;
    let certificates: Api<Certificate> = Api::namespaced(client.clone(), ns);
    let ready = CertManagerCondition::new(
        condition::READY,
        true,
        "Ready",
        "Certificate is up to date and has not expired",
        Time(Timestamp::now()),
    );
    let body = json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "status": {
        "conditions": [ready], "notBefore": Time(issued.not_before), "notAfter": Time(issued.not_after), "revision": 1}});
    certificates
        .patch_status(
            &cert_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
    Ok(())
}
