//! A test-only certificate issuer for one namespace, standing in for cert-manager on a control
//! plane that has none. Like cert-manager's external issuers it signs a CertificateRequest for
//! its issuerRef only once the request is Approved, marks denied ones failed, and never approves
//! anything itself. It also plays cert-manager's Certificate controller for ManagedKey devices:
//! key generation, the CertificateRequest, and the Secret.
//!
//! It polls its namespace every 100 ms; that is plenty for tests and keeps it simple.

use std::{
    collections::{HashMap, HashSet},
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
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::json;
use tokio::task::JoinHandle;

/// Status writes all test issuers made (answers to CertificateRequests), for write accounting
/// in benchmarks. Counts a request that already had an answer too, so it is an upper bound.
pub static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// API group of the test issuer's issuerRefs; no such CRD exists, as with many external issuers
/// only the reference matters.
pub const ISSUER_GROUP: &str = "e2e.fleetwarden.io";
const MANAGER: &str = "e2e-ca-issuer";

pub struct TestIssuer {
    pub name: String,
    /// PEM of the CA that signs everything.
    pub ca_pem: String,
    ca: Arc<Ca>,
    paused: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl TestIssuer {
    /// Signs a certificate for `uri` directly with this issuer's CA, valid from `not_before` to
    /// `not_after` (seconds relative to now): for tests that need certificates the fleet CA
    /// issued but Fleetwarden never recorded. Returns (certificate PEM, key PEM).
    pub fn issue(
        &self,
        uri: &str,
        not_before: i64,
        not_after: i64,
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(not_before);
        params.not_after = now + time::Duration::seconds(not_after);
        Ok((
            params.signed_by(&key, &self.ca.issuer)?.pem(),
            key.serialize_pem(),
        ))
    }

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
    let ca = Arc::new(Ca {
        issuer: Issuer::new(params, key),
        pem: pem.clone(),
    });
    let task_ca = ca.clone();
    let ns = namespace.to_string();
    let issuer_name = name.to_string();
    let paused = Arc::new(AtomicBool::new(false));
    let is_paused = paused.clone();
    let task = tokio::spawn(async move {
        let (requests, requests_writer) = reflector::store();
        let (certificates, certificates_writer) = reflector::store();
        let watch_requests = watcher(
            Api::<CertificateRequest>::namespaced(client.clone(), &ns),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(requests_writer)
        .for_each(|_| futures::future::ready(()));
        let watch_certificates = watcher(
            Api::<Certificate>::namespaced(client.clone(), &ns),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(certificates_writer)
        .for_each(|_| futures::future::ready(()));
        tokio::spawn(watch_requests);
        tokio::spawn(watch_certificates);
        let mut work = Work::default();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if is_paused.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = pass(
                &client,
                &ns,
                &issuer_name,
                &task_ca,
                &requests,
                &certificates,
                &mut work,
            )
            .await
            {
                eprintln!("e2e issuer {ns}/{issuer_name}: {e:#}");
            }
        }
    });
    Ok(TestIssuer {
        name: name.to_string(),
        ca_pem: pem,
        ca,
        paused,
        task,
    })
}

fn ours(r: &IssuerRef, name: &str) -> bool {
    r.name == name && r.group == ISSUER_GROUP && r.kind == IssuerKind::Issuer
}

/// What the issuer has done, so a stale cache never makes it act twice.
#[derive(Default)]
struct Work {
    /// CertificateRequests (by uid) signed or failed.
    answered: HashSet<String>,
    /// Certificates (by uid) whose Secret was written.
    stored: HashSet<String>,
    /// Certificate name -> the key generated for it.
    keys: HashMap<String, KeyPair>,
}

async fn pass(
    client: &Client,
    ns: &str,
    name: &str,
    ca: &Ca,
    requests: &Store<CertificateRequest>,
    certificates: &Store<Certificate>,
    work: &mut Work,
) -> anyhow::Result<()> {
    let api: Api<CertificateRequest> = Api::namespaced(client.clone(), ns);
    let all = requests.state();
    // Answer the open requests concurrently, as a real issuer with several workers does.
    let open: Vec<Arc<CertificateRequest>> = all
        .iter()
        .filter(|cr| ours(&cr.spec.issuer_ref, name))
        .filter(|cr| !work.answered.contains(&cr.uid().unwrap_or_default()))
        .cloned()
        .collect();
    let answered: Vec<anyhow::Result<Option<String>>> = futures::stream::iter(open)
        .map(move |cr: Arc<CertificateRequest>| {
            let api = api.clone();
            async move {
                let done = sign_if_approved(&api, &cr, ca).await?;
                if done {
                    WRITES.fetch_add(1, Ordering::Relaxed);
                }
                Ok(done.then(|| cr.uid().unwrap_or_default()))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for result in answered {
        if let Some(uid) = result? {
            work.answered.insert(uid);
        }
    }
    let all_requests: Vec<CertificateRequest> = all
        .iter()
        .filter(|cr| {
            cr.annotations()
                .contains_key(certmanager::CERTIFICATE_NAME_ANNOTATION)
        })
        .map(|r| (**r).clone())
        .collect();
    for cert in certificates
        .state()
        .iter()
        .filter(|c| ours(&c.spec.issuer_ref, name))
    {
        let uid = cert.uid().unwrap_or_default();
        if !work.stored.contains(&uid)
            && manage_certificate(client, ns, cert, &all_requests, &mut work.keys, ca).await?
        {
            work.stored.insert(uid);
        }
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

/// Answers a request that has a verdict; `Ok(true)` when it wrote the answer.
async fn sign_if_approved(
    api: &Api<CertificateRequest>,
    cr: &CertificateRequest,
    ca: &Ca,
) -> anyhow::Result<bool> {
    let conds = conditions(cr);
    if certmanager::find_condition(conds, condition::READY).is_some() {
        return Ok(true);
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
        return set_status(api, cr, json!({"conditions": [ready]}))
            .await
            .map(|_| true);
    }
    if !certmanager::condition_true(conds, condition::APPROVED) {
        return Ok(false);
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
            .map(|_| true)
        }
        Err(e) => {
            let ready = CertManagerCondition::new(
                condition::READY,
                false,
                "Failed",
                format!("signing failed: {e:#}"),
                now.clone(),
            );
            set_status(api, cr, json!({"conditions": [ready], "failureTime": now}))
                .await
                .map(|_| true)
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
) -> anyhow::Result<bool> {
    let cert_name = cert.name_any();
    let ready = cert
        .status
        .as_ref()
        .is_some_and(|s| certmanager::condition_true(&s.conditions, condition::READY));
    if ready {
        return Ok(true);
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
        match requests.create(&PostParams::default(), &cr).await {
            Ok(_) => {
                keys.insert(cert_name.clone(), key);
            }
            // Created in an earlier pass the cache has not shown yet; keep that key.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(false);
    };
    let Some(status) = cr
        .status
        .as_ref()
        .filter(|s| certmanager::condition_true(&s.conditions, condition::READY))
    else {
        return Ok(false);
    };
    let Some(key) = keys.get(&cert_name) else {
        return Ok(false);
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
    Ok(true)
}
