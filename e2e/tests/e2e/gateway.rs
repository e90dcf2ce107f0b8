//! The device gateway against the real API server: the reference agent enrolling by token and by
//! manufacturer certificate, `curl` and `openssl` enrolling by hand, every refusal with its
//! reason, quarantine, lastSeen write throttling, and a thousand simulated devices.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, bail, ensure};
use crds::{Device, DeviceGroup, conditions, device::EnrollmentMethod};
use e2e::{Env, Gateway, Operator, eventually, fleet, issuer::TestIssuer};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::process::Command;

const TRUST_DOMAIN: &str = "fleet.e2e";
const MODEL: &str = "acme-pressctl-v3";

struct Fixture {
    env: Arc<Env>,
    ns: String,
    _operator: Operator,
    issuer: TestIssuer,
    gateway: Gateway,
    devices: Api<Device>,
    dir: std::path::PathBuf,
}

async fn setup(
    env: &Arc<Env>,
    test: &str,
    group_extra: Value,
    gateway_args: &[&str],
) -> anyhow::Result<Fixture> {
    let ns = env.namespace(test).await?;
    let issuer = e2e::issuer::start(env.client.clone(), &ns, "e2e-ca")?;
    let mut spec = json!({
        "certificates": {"issuerRef": issuer.issuer_ref(), "trustDomain": TRUST_DOMAIN},
        "enrollment": {"tokenSecretRef": {"name": "cell-tokens"}},
        "checkInInterval": "30s"
    });
    if let (Some(s), Value::Object(extra)) = (spec.as_object_mut(), group_extra) {
        for (k, v) in extra {
            if let (Some(Value::Object(base)), Value::Object(more)) = (s.get_mut(&k), v.clone()) {
                base.extend(more);
            } else {
                s.insert(k, v);
            }
        }
    }
    let group: DeviceGroup = serde_json::from_value(json!({
        "apiVersion": "fleetwarden.io/v1alpha1", "kind": "DeviceGroup", "metadata": {"name": "cell"}, "spec": spec
    }))?;
    Api::<DeviceGroup>::namespaced(env.client.clone(), &ns)
        .create(&PostParams::default(), &group)
        .await?;
    let operator = env.start_operator(&ns, "operator").await?;
    let gateway = env.start_gateway(&ns, &issuer.ca_pem, gateway_args).await?;
    let dir = env.scratch.join(&ns);
    std::fs::create_dir_all(&dir)?;
    Ok(Fixture {
        devices: Api::namespaced(env.client.clone(), &ns),
        env: env.clone(),
        ns,
        _operator: operator,
        issuer,
        gateway,
        dir,
    })
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

impl Fixture {
    fn spiffe(&self, device: &str) -> String {
        crds::device::spiffe_id(TRUST_DOMAIN, &self.ns, device)
    }

    async fn provision(&self, names: &[&str]) -> anyhow::Result<Vec<fleet::Provisioned>> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        fleet::provision(
            &self.env.client,
            &self.ns,
            "cell",
            MODEL,
            "cell-tokens",
            &names,
        )
        .await
    }

    /// `fleetwarden-agent run --once`: enroll if needed, check in once; stdout or the error.
    async fn agent_once(
        &self,
        device: &str,
        state: &str,
        extra: &[&str],
    ) -> anyhow::Result<String> {
        let state_dir = self.dir.join(state);
        let url = self.gateway.url();
        let mut args = vec![
            "run",
            "--once",
            "--gateway",
            &url,
            "--gateway-ca",
            path(&self.gateway.ca_file),
            "--trust-domain",
            TRUST_DOMAIN,
            "--namespace",
            &self.ns,
            "--name",
            device,
            "--state-dir",
            path(&state_dir),
            "--firmware-version",
            "4.1.3",
            "--security-version",
            "12",
        ];
        args.extend_from_slice(extra);
        let out = Command::new(self.env.binary("fleetwarden-agent"))
            .args(&args)
            .env("FLEETWARDEN_LOG", "warn")
            .output()
            .await?;
        if !out.status.success() {
            bail!("agent failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `curl` against the gateway: (HTTP status, body).
    async fn curl(&self, path: &str, args: &[&str]) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.gateway.url());
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "--cacert",
                self.gateway.ca_file.to_str().unwrap_or_default(),
            ])
            .args(args)
            .arg(&url)
            .output()
            .await
            .context("cannot run curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        Ok((code.trim().parse().unwrap_or(0), body.to_string()))
    }

    /// A check-in by curl with a client certificate: (status, body).
    async fn curl_checkin(
        &self,
        cert: &Path,
        key: &Path,
        report: &Value,
    ) -> anyhow::Result<(u16, String)> {
        let body = report.to_string();
        self.curl(
            crds::wire::CHECK_IN,
            &[
                "--cert",
                path(cert),
                "--key",
                path(key),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
            ],
        )
        .await
    }

    fn write(&self, file: &str, contents: &str) -> anyhow::Result<std::path::PathBuf> {
        let p = self.dir.join(file);
        std::fs::write(&p, contents)?;
        Ok(p)
    }

    async fn device(&self, name: &str) -> anyhow::Result<Device> {
        Ok(self.devices.get(name).await?)
    }
}

fn refusal(status: u16, body: &str) -> (u16, String) {
    let reason = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.to_string());
    (status, reason)
}

fn report(fw: &str) -> Value {
    json!({"firmwareVersion": fw, "securityVersion": 12, "agentVersion": "curl"})
}

pub async fn the_agent_enrolls_with_a_token_and_checks_in(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "agent-token", json!({}), &[]).await?;
    let tokens = f.provision(&["plc-1"]).await?;
    let answer: Value = serde_json::from_str(
        &f.agent_once("plc-1", "plc-1", &["--token", &tokens[0].token])
            .await?,
    )?;
    ensure!(
        answer["device"] == json!(format!("{}/plc-1", f.ns)),
        "answer: {answer}"
    );
    ensure!(
        answer["checkInIntervalSeconds"] == json!(30),
        "the group's interval: {answer}"
    );

    let key = f.dir.join("plc-1/key.pem");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions()) & 0o777;
    ensure!(mode == 0o600, "key file mode {mode:o}");
    let d = f.device("plc-1").await?;
    let status = d.status.context("status")?;
    ensure!(
        conditions::is_true(&status.conditions, "Enrolled"),
        "not enrolled"
    );
    ensure!(status.enrollment.as_ref().map(|e| e.method) == Some(EnrollmentMethod::Token));
    ensure!(status.reported.and_then(|r| r.firmware_version).as_deref() == Some("4.1.3"));
    ensure!(status.last_seen.is_some(), "lastSeen not recorded");

    // The token is single-use: a second key cannot enroll with it.
    let reuse = f
        .agent_once("plc-1", "plc-1-again", &["--token", &tokens[0].token])
        .await;
    let err = reuse
        .err()
        .context("a used token enrolled a second key")?
        .to_string();
    ensure!(err.contains("TokenAlreadyUsed"), "{err}");
    // The enrolled device keeps working without its token, and reaches full scope once the
    // operator has judged it compliant.
    eventually(Duration::from_secs(20), "full scope", || async {
        let answer: Value = serde_json::from_str(&f.agent_once("plc-1", "plc-1", &[]).await?)?;
        Ok((answer["scope"] == "Full").then_some(()))
    })
    .await?;
    Ok(())
}

pub async fn the_agent_enrolls_with_a_manufacturer_certificate(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    let f = setup(
        &env,
        "agent-idevid",
        json!({"enrollment": {"manufacturerCA": {"name": "acme-idevid-ca", "key": "ca.crt"}}}),
        &[],
    )
    .await?;
    let (ca_pem, acme) = fleet::new_ca("Acme IDevID CA")?;
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("acme-idevid-ca".into()),
            ..ObjectMeta::default()
        },
        data: Some([("ca.crt".to_string(), ca_pem)].into()),
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(f.env.client.clone(), &f.ns)
        .create(&PostParams::default(), &cm)
        .await?;
    f.provision(&["plc-7", "plc-8"]).await?;

    // Right manufacturer, right serial.
    let (cert, key) = fleet::idevid(&acme, "SN-plc-7")?;
    let (cert, key) = (
        f.write("idevid-7.pem", &cert)?,
        f.write("idevid-7.key", &key)?,
    );
    f.agent_once(
        "plc-7",
        "plc-7",
        &["--idevid-cert", path(&cert), "--idevid-key", path(&key)],
    )
    .await?;
    let d = f.device("plc-7").await?;
    ensure!(
        d.status.and_then(|s| s.enrollment).map(|e| e.method) == Some(EnrollmentMethod::IDevID)
    );

    // Another manufacturer's certificate.
    let (_, mallory) = fleet::new_ca("Mallory CA")?;
    let (cert, key) = fleet::idevid(&mallory, "SN-plc-8")?;
    let (cert, key) = (
        f.write("mallory.pem", &cert)?,
        f.write("mallory.key", &key)?,
    );
    let err = f
        .agent_once(
            "plc-8",
            "plc-8-m",
            &["--idevid-cert", path(&cert), "--idevid-key", path(&key)],
        )
        .await;
    ensure!(
        err.err()
            .context("an untrusted manufacturer certificate enrolled")?
            .to_string()
            .contains("UntrustedManufacturerCertificate")
    );

    // The right manufacturer, but the certificate of another device.
    let (cert, key) = fleet::idevid(&acme, "SN-plc-7")?;
    let (cert, key) = (
        f.write("idevid-7b.pem", &cert)?,
        f.write("idevid-7b.key", &key)?,
    );
    let err = f
        .agent_once(
            "plc-8",
            "plc-8-x",
            &["--idevid-cert", path(&cert), "--idevid-key", path(&key)],
        )
        .await;
    ensure!(
        err.err()
            .context("another device's certificate enrolled")?
            .to_string()
            .contains("ManufacturerSerialMismatch")
    );
    ensure!(
        f.device("plc-8")
            .await?
            .status
            .and_then(|s| s.enrollment)
            .is_none(),
        "a refused enrollment was recorded"
    );
    Ok(())
}

/// Enrolls by hand: `openssl req` for the key and CSR, `curl` for EST; returns (cert, key) paths.
async fn enroll_by_hand(
    f: &Fixture,
    device: &str,
    token: &str,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let key = f.dir.join(format!("{device}.key"));
    let csr = f.dir.join(format!("{device}.csr"));
    let san = format!("subjectAltName=URI:{}", f.spiffe(device));
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            path(&key),
            "-out",
            path(&csr),
        ])
        .args(["-subj", &format!("/CN={device}"), "-addext", &san])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let auth = format!("Authorization: Bearer {token}");
    let data = format!("@{}", path(&csr));
    let cert = eventually(Duration::from_secs(30), "the certificate", || async {
        let (status, body) = f
            .curl(
                crds::wire::SIMPLE_ENROLL,
                &[
                    "-H",
                    &auth,
                    "-H",
                    "Content-Type: application/pkcs10",
                    "--data-binary",
                    &data,
                ],
            )
            .await?;
        match status {
            200 => Ok(Some(body)),
            202 => Ok(None),
            other => bail!("simpleenroll answered {other}: {body}"),
        }
    })
    .await?;
    ensure!(
        cert.contains("BEGIN CERTIFICATE"),
        "not a certificate: {cert}"
    );
    Ok((f.write(&format!("{device}.crt"), &cert)?, key))
}

pub async fn curl_and_openssl_enroll_and_check_in_by_hand(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "curl", json!({}), &[]).await?;
    let tokens = f.provision(&["plc-2"]).await?;
    let (cacerts_status, cacerts) = f.curl(crds::wire::CACERTS, &[]).await?;
    ensure!(
        cacerts_status == 200 && cacerts == f.issuer.ca_pem,
        "cacerts answered {cacerts_status}"
    );
    let (cert, key) = enroll_by_hand(&f, "plc-2", &tokens[0].token).await?;
    let (status, body) = f.curl_checkin(&cert, &key, &report("4.1.3")).await?;
    ensure!(status == 200, "check-in answered {status}: {body}");
    let answer: Value = serde_json::from_str(&body)?;
    ensure!(answer["device"] == json!(format!("{}/plc-2", f.ns)));
    ensure!(
        answer["renewAfter"].is_string() && answer["certificateNotAfter"].is_string(),
        "{answer}"
    );
    Ok(())
}

pub async fn refused_requests_say_why(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "refusals", json!({}), &[]).await?;
    let tokens = f.provision(&["plc-3", "plc-4"]).await?;
    let (cert, key) = enroll_by_hand(&f, "plc-3", &tokens[0].token).await?;
    let ok = f.curl_checkin(&cert, &key, &report("4.1.3")).await?;
    ensure!(ok.0 == 200, "baseline check-in: {ok:?}");

    let pair = |name: &str,
                (c, k): (String, String)|
     -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
        Ok((
            f.write(&format!("{name}.crt"), &c)?,
            f.write(&format!("{name}.key"), &k)?,
        ))
    };
    let mut cases: Vec<(&str, u16, &str, Vec<String>)> = Vec::new();
    let args = |(c, k): &(std::path::PathBuf, std::path::PathBuf)| {
        vec![
            "--cert".to_string(),
            path(c).to_string(),
            "--key".to_string(),
            path(k).to_string(),
        ]
    };

    let unknown = pair("ghost", f.issuer.issue(&f.spiffe("ghost"), -60, 3600)?)?;
    cases.push(("unknown device", 404, "UnknownDevice", args(&unknown)));
    let (_, other_ca) = fleet::new_ca("Other CA")?;
    let foreign = {
        let k = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = vec![rcgen::SanType::URI(f.spiffe("plc-3").as_str().try_into()?)];
        pair(
            "foreign",
            (p.signed_by(&k, &other_ca)?.pem(), k.serialize_pem()),
        )?
    };
    cases.push(("wrong CA", 401, "UntrustedCertificate", args(&foreign)));
    let expired = pair("expired", f.issuer.issue(&f.spiffe("plc-3"), -7200, -3600)?)?;
    cases.push((
        "expired certificate",
        401,
        "CertificateExpired",
        args(&expired),
    ));
    let unrecorded = pair("unrecorded", f.issuer.issue(&f.spiffe("plc-3"), -60, 3600)?)?;
    cases.push((
        "fingerprint mismatch",
        401,
        "CertificateRevoked",
        args(&unrecorded),
    ));
    cases.push(("no client certificate", 401, "NoClientCertificate", vec![]));
    let not_enrolled = pair(
        "not-enrolled",
        f.issuer.issue(&f.spiffe("plc-4"), -60, 3600)?,
    )?;
    cases.push((
        "device without identity",
        403,
        "NotEnrolled",
        args(&not_enrolled),
    ));

    for (what, status, reason, extra) in &cases {
        let body = report("4.1.3").to_string();
        let mut a: Vec<&str> = extra.iter().map(String::as_str).collect();
        a.extend([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &body,
        ]);
        let (got, text) = f.curl(crds::wire::CHECK_IN, &a).await?;
        ensure!(
            refusal(got, &text) == (*status, reason.to_string()),
            "{what}: got {got} {text}"
        );
    }

    // Bodies the gateway will not read.
    let big = "x".repeat(100 * 1024);
    let mut a = args(&(cert.clone(), key.clone()));
    a.extend(["--data-binary".into(), big]);
    let (got, text) = f
        .curl(
            crds::wire::CHECK_IN,
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await?;
    ensure!(
        refusal(got, &text) == (413, "BodyTooLarge".into()),
        "oversized: {got} {text}"
    );
    let mut a = args(&(cert.clone(), key.clone()));
    a.extend(["--data-binary".into(), "{not json".into()]);
    let (got, text) = f
        .curl(
            crds::wire::CHECK_IN,
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await?;
    ensure!(
        refusal(got, &text) == (400, "BadRequest".into()),
        "malformed: {got} {text}"
    );

    // Rotation revokes the old certificate at once.
    let new_key = f.dir.join("plc-3-new.key");
    let new_csr = f.dir.join("plc-3-new.csr");
    let san = format!("subjectAltName=URI:{}", f.spiffe("plc-3"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            path(&new_key),
            "-out",
            path(&new_csr),
            "-subj",
            "/CN=plc-3",
            "-addext",
            &san,
        ])
        .output()
        .await?;
    ensure!(out.status.success());
    let data = format!("@{}", path(&new_csr));
    let new_cert = eventually(
        Duration::from_secs(30),
        "the renewed certificate",
        || async {
            let (status, body) = f
                .curl(
                    crds::wire::SIMPLE_REENROLL,
                    &[
                        "--cert",
                        path(&cert),
                        "--key",
                        path(&key),
                        "--data-binary",
                        &data,
                    ],
                )
                .await?;
            match status {
                200 => Ok(Some(body)),
                202 => Ok(None),
                other => bail!("simplereenroll answered {other}: {body}"),
            }
        },
    )
    .await?;
    let new_cert = f.write("plc-3-new.crt", &new_cert)?;
    let (got, text) = f.curl_checkin(&cert, &key, &report("4.1.3")).await?;
    ensure!(
        refusal(got, &text) == (401, "CertificateRevoked".into()),
        "rotated-out certificate: {got} {text}"
    );
    ensure!(
        f.curl_checkin(&new_cert, &new_key, &report("4.1.3"))
            .await?
            .0
            == 200,
        "the new certificate works"
    );

    // Suspended, then retired.
    let lifecycle = |l: &'static str| Patch::Merge(json!({"spec": {"lifecycle": l}}));
    f.devices
        .patch("plc-3", &PatchParams::default(), &lifecycle("Suspended"))
        .await?;
    eventually(
        Duration::from_secs(10),
        "the suspension to reach the gateway",
        || async {
            let (got, text) = f
                .curl_checkin(&new_cert, &new_key, &report("4.1.3"))
                .await?;
            Ok((refusal(got, &text) == (403, "DeviceSuspended".into())).then_some(()))
        },
    )
    .await?;
    f.devices
        .patch("plc-3", &PatchParams::default(), &lifecycle("Retired"))
        .await?;
    eventually(
        Duration::from_secs(10),
        "the retirement to reach the gateway",
        || async {
            let (got, text) = f
                .curl_checkin(&new_cert, &new_key, &report("4.1.3"))
                .await?;
            Ok((refusal(got, &text) == (403, "DeviceRetired".into())).then_some(()))
        },
    )
    .await?;

    for reason in [
        "UnknownDevice",
        "UntrustedCertificate",
        "CertificateExpired",
        "CertificateRevoked",
        "NoClientCertificate",
        "BodyTooLarge",
        "DeviceRetired",
    ] {
        let n = f
            .gateway
            .metric(&format!(
                "fleetwarden_gateway_refusals_total{{reason=\"{reason}\"}}"
            ))
            .await?;
        ensure!(n >= 1.0, "refusal {reason} not counted");
    }
    Ok(())
}

pub async fn a_quarantined_device_may_only_report(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(&env, "quarantine", json!({}), &[]).await?;
    let tokens = f.provision(&["plc-5"]).await?;
    let (cert, key) = enroll_by_hand(&f, "plc-5", &tokens[0].token).await?;
    f.devices
        .patch(
            "plc-5",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"lifecycle": "Quarantined"}})),
        )
        .await?;
    let answer: Value = eventually(Duration::from_secs(10), "restricted scope", || async {
        let (status, body) = f.curl_checkin(&cert, &key, &report("4.1.3")).await?;
        ensure!(
            status == 200,
            "a quarantined device may still check in: {status} {body}"
        );
        let v: Value = serde_json::from_str(&body)?;
        Ok((v["scope"] == "Restricted").then_some(v))
    })
    .await?;
    ensure!(
        answer.get("offer").is_none(),
        "no regular firmware offer in restricted scope"
    );
    let progress = json!({"rollout": "pressctl-4.1.4-fix", "version": "4.1.4", "state": "Downloading", "progressPercent": 40});
    let (status, body) = f
        .curl(
            crds::wire::STATUS,
            &[
                "--cert",
                path(&cert),
                "--key",
                path(&key),
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &progress.to_string(),
            ],
        )
        .await?;
    ensure!(status == 204, "status report answered {status}: {body}");
    let d = f.device("plc-5").await?;
    let update = d
        .status
        .and_then(|s| s.update)
        .context("the report was not recorded")?;
    ensure!(update.version == "4.1.4" && update.progress_percent == Some(40));
    Ok(())
}

pub async fn last_seen_writes_are_throttled(env: Arc<Env>) -> anyhow::Result<()> {
    let f = setup(
        &env,
        "throttle",
        json!({}),
        &["--last-seen-interval", "4s", "--last-seen-check-ins", "0"],
    )
    .await?;
    let tokens = f.provision(&["plc-6"]).await?;
    let (cert, key) = enroll_by_hand(&f, "plc-6", &tokens[0].token).await?;
    ensure!(f.curl_checkin(&cert, &key, &report("4.1.3")).await?.0 == 200);
    let writes = || {
        f.gateway
            .metric("fleetwarden_gateway_status_writes_total{kind=\"checkin\"}")
    };
    let before = writes().await?;
    for _ in 0..20 {
        ensure!(f.curl_checkin(&cert, &key, &report("4.1.3")).await?.0 == 200);
    }
    ensure!(
        writes().await? == before,
        "unchanged heartbeats wrote status"
    );
    // A changed report is written at once.
    ensure!(f.curl_checkin(&cert, &key, &report("4.1.4")).await?.0 == 200);
    ensure!(
        writes().await? == before + 1.0,
        "a changed report was not written"
    );
    // After the interval, one heartbeat refreshes lastSeen.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seen_before = f
        .device("plc-6")
        .await?
        .status
        .and_then(|s| s.last_seen)
        .context("lastSeen")?;
    for _ in 0..5 {
        ensure!(f.curl_checkin(&cert, &key, &report("4.1.4")).await?.0 == 200);
    }
    ensure!(
        writes().await? == before + 2.0,
        "expected exactly one lastSeen refresh"
    );
    let seen_after = eventually(Duration::from_secs(5), "lastSeen to move", || async {
        let seen = f.device("plc-6").await?.status.and_then(|s| s.last_seen);
        Ok(seen.filter(|s| *s > seen_before))
    })
    .await?;
    eprintln!(
        "lastSeen moved from {} to {} after the 4s interval",
        seen_before.0, seen_after.0
    );
    Ok(())
}

pub async fn a_thousand_simulated_devices_enroll_and_check_in(env: Arc<Env>) -> anyhow::Result<()> {
    const N: usize = 1000;
    let f = setup(&env, "fleet-1000", json!({}), &[]).await?;
    let names: Vec<String> = (0..N).map(|i| format!("sim-{i:04}")).collect();
    let started = std::time::Instant::now();
    let tokens =
        fleet::provision(&f.env.client, &f.ns, "cell", MODEL, "cell-tokens", &names).await?;
    eprintln!(
        "provisioned {N} devices in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let list = f.write("devices.json", &serde_json::to_string(&tokens)?)?;
    // FLEETWARDEN_E2E_SIM_INTERVAL=0s makes every device check in back to back (a throughput
    // measurement rather than a realistic fleet).
    let interval = std::env::var("FLEETWARDEN_E2E_SIM_INTERVAL").unwrap_or_else(|_| "5s".into());
    let out = Command::new(f.env.binary("fleetwarden-agent"))
        .args([
            "simulate",
            "--gateway",
            &f.gateway.url(),
            "--gateway-ca",
            path(&f.gateway.ca_file),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            path(&list),
            "--duration",
            "20s",
            "--check-in-interval",
            &interval,
            "--enroll-concurrency",
            "100",
            "--progress",
        ])
        .env("FLEETWARDEN_LOG", "warn")
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_slice(&out.stdout).context("simulate printed no JSON report")?;
    eprintln!("simulate: {report}");
    ensure!(
        report["enrolled"] == json!(N),
        "not all devices enrolled: {report}"
    );
    ensure!(
        report["enrollErrors"]
            .as_object()
            .is_some_and(|m| m.is_empty()),
        "{report}"
    );
    ensure!(
        report["checkinErrors"]
            .as_object()
            .is_some_and(|m| m.is_empty()),
        "{report}"
    );
    let checkins = report["checkins"].as_f64().unwrap_or_default();
    ensure!(checkins >= N as f64, "only {checkins} check-ins");
    let devices = f.devices.list(&Default::default()).await?.items;
    let reporting = devices
        .iter()
        .filter(|d| {
            d.status
                .as_ref()
                .and_then(|s| s.reported.as_ref())
                .and_then(|r| r.firmware_version.as_deref())
                == Some("4.1.3")
        })
        .count();
    let seen = devices
        .iter()
        .filter(|d| d.status.as_ref().is_some_and(|s| s.last_seen.is_some()))
        .count();
    ensure!(
        reporting == N && seen == N,
        "{reporting} devices have their report recorded, {seen} a lastSeen, of {N}"
    );
    // Every device's first check-in records what it reports; after that, unchanged heartbeats
    // within the 5 minute lastSeen interval write nothing.
    let writes = f
        .gateway
        .metric("fleetwarden_gateway_status_writes_total{kind=\"checkin\"}")
        .await?;
    let served = f
        .gateway
        .metric("fleetwarden_gateway_checkins_total")
        .await?;
    let steady_writes = writes - N as f64;
    let steady_checkins = served - N as f64;
    let per_1000 = if steady_checkins > 0.0 {
        steady_writes * 1000.0 / steady_checkins
    } else {
        f64::NAN
    };
    eprintln!(
        "{N} devices: {served} check-ins, {writes} check-in writes; steady state {per_1000:.2} API writes per 1000 check-ins; {:.0} check-ins/s, p50 {:.1} ms, p99 {:.1} ms",
        report["checkinsPerSecond"].as_f64().unwrap_or_default(),
        report["checkinP50Ms"].as_f64().unwrap_or_default(),
        report["checkinP99Ms"].as_f64().unwrap_or_default(),
    );
    ensure!(
        steady_checkins > 0.0 && per_1000 <= 10.0,
        "steady state wrote {per_1000} per 1000 check-ins"
    );
    Ok(())
}

/// Fault: the gateway restarts under a thousand connected devices. They retry with growing,
/// jittered waits, so the new gateway sees them come back spread out rather than all at once;
/// prints the time until every device checked in again and the peak request rate against the
/// steady one.
pub async fn a_gateway_restart_under_a_thousand_devices_brings_them_back_without_a_herd(
    env: Arc<Env>,
) -> anyhow::Result<()> {
    const N: usize = 1000;
    let mut f = setup(&env, "gateway-restart", json!({}), &[]).await?;
    let names: Vec<String> = (0..N).map(|i| format!("sim-{i:04}")).collect();
    let tokens =
        fleet::provision(&f.env.client, &f.ns, "cell", MODEL, "cell-tokens", &names).await?;
    let list = f.write("devices.json", &serde_json::to_string(&tokens)?)?;
    let url = f.gateway.url();
    let mut sim = env.spawn(
        "fleetwarden-agent",
        &format!("{}-sim", f.ns),
        &[
            "simulate",
            "--gateway",
            &url,
            "--gateway-ca",
            path(&f.gateway.ca_file),
            "--trust-domain",
            TRUST_DOMAIN,
            "--devices",
            path(&list),
            "--duration",
            "10m",
            "--check-in-interval",
            "5s",
            "--enroll-concurrency",
            "100",
        ],
    )?;
    let checkins = "fleetwarden_gateway_checkins_total";
    let attempts = "fleetwarden_gateway_requests_total{endpoint=\"checkin\"";
    eventually(
        Duration::from_secs(300),
        "every device enrolled and reporting",
        || async {
            let list = f.devices.list(&Default::default()).await?.items;
            let reporting = list
                .iter()
                .filter(|d| d.status.as_ref().is_some_and(|s| s.reported.is_some()))
                .count();
            Ok((reporting == N).then_some(()))
        },
    )
    .await
    .with_context(|| format!("simulator log:\n{}", sim.log()))?;
    let a0 = f.gateway.metric(attempts).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let steady = (f.gateway.metric(attempts).await? - a0) / 10.0;

    let port = f.gateway.port;
    f.gateway.process.terminate(Duration::from_secs(25)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    f.gateway = env
        .start_gateway_on(&env.kubeconfig, &f.ns, &f.issuer.ca_pem, &[], Some(port))
        .await?;
    let back = std::time::Instant::now();
    let mut per_second = Vec::new();
    let mut last = f.gateway.metric(attempts).await?;
    let mut recovered = None;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = f.gateway.metric(attempts).await?;
        per_second.push(now - last);
        last = now;
        if recovered.is_none() && f.gateway.metric(checkins).await? >= N as f64 {
            recovered = Some(back.elapsed());
        }
    }
    let peak = per_second.iter().copied().fold(0.0, f64::max);
    let recovered = recovered.context("devices did not all come back within 30 s")?;
    eprintln!(
        "gateway restart under {N} devices: back to {N} check-ins {:.1}s after the new gateway \
         was ready; steady {steady:.0} check-ins/s, peak {peak:.0}/s ({:.1}x); per second: {per_second:?}",
        recovered.as_secs_f64(),
        peak / steady
    );
    ensure!(
        peak < N as f64 / 2.0,
        "a thundering herd: {peak:.0} of {N} devices came back within one second ({steady:.0}/s steady)"
    );
    sim.terminate(Duration::from_secs(30)).await?;
    let report = sim
        .simulator_report()
        .context("the simulator printed no report")?;
    ensure!(report["enrolled"] == json!(N), "{report}");
    ensure!(
        report["enrollErrors"]
            .as_object()
            .is_some_and(|m| m.is_empty()),
        "{report}"
    );
    Ok(())
}
