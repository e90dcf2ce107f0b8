//! The device-facing endpoints (see `crds::wire` for the contract). Each handler authorises from
//! the caches (`authz`), does its one job, and answers; refusals are 4xx JSON bodies with a reason
//! that is also counted. Nothing a client sends can make a handler panic: bodies are read with a
//! size cap and parsed defensively.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use crds::{
    Device, DeviceGroup, conditions,
    csr_policy::{self, Denial},
    device::{
        DeviceId, EnrollmentMethod, EnrollmentStatus, Lifecycle, UpdateProgress, parse_spiffe_id,
    },
    enrollment_token, hex_sha256,
    identity::pem_encode,
    waves,
    wire::{self, CheckInResponse, ErrorBody, FirmwareOffer, ReportedState, UpdateReport},
};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{
    authz::{self, PeerCertificate, Refusal},
    cache::Caches,
    metrics::Metrics,
    server::Peer,
    status::{self, Writer},
};

pub struct AppState {
    pub caches: Caches,
    pub writer: Writer,
    pub metrics: Arc<Metrics>,
    pub fleet_ca_pem: Option<String>,
    pub max_body: usize,
    pub heartbeat: status::Heartbeat,
    pub retry_after: Duration,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(wire::CACERTS, get(cacerts))
        .route(wire::SIMPLE_ENROLL, post(simple_enroll))
        .route(wire::SIMPLE_REENROLL, post(simple_reenroll))
        .route(wire::CHECK_IN, post(check_in))
        .route(wire::STATUS, post(report_status))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(ErrorBody {
                    error: "NotFound".into(),
                    message: "no such endpoint".into(),
                }),
            )
        })
        .with_state(state)
}

/// A handler's outcome, turned into a response and counted.
type Outcome = Result<Response, Refusal>;

fn finish(
    state: &AppState,
    endpoint: &'static str,
    started: std::time::Instant,
    outcome: Outcome,
) -> Response {
    let response = match outcome {
        Ok(r) => r,
        Err(refusal) => {
            state.metrics.refusal(refusal.reason());
            tracing::debug!(endpoint, reason = refusal.reason(), %refusal, "refused");
            let body = ErrorBody {
                error: refusal.reason().to_string(),
                message: refusal.to_string(),
            };
            (refusal.status(), axum::Json(body)).into_response()
        }
    };
    state
        .metrics
        .request(endpoint, response.status().as_u16(), started.elapsed());
    response
}

fn peer_of(request: &Request) -> Peer {
    request.extensions().get::<Peer>().cloned().unwrap_or(Peer {
        leaf: None,
        chain: Arc::default(),
    })
}

async fn read_body(state: &AppState, request: Request) -> Result<(HeaderMap, Bytes), Refusal> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, state.max_body)
        .await
        .map_err(|_| Refusal::BodyTooLarge(state.max_body))?;
    Ok((parts.headers, bytes))
}

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(bytes)
        .map_err(|e| Refusal::BadRequest(format!("malformed JSON body: {e}")))
}

async fn cacerts(State(state): State<Arc<AppState>>) -> Response {
    let started = std::time::Instant::now();
    let outcome = match &state.fleet_ca_pem {
        Some(pem) => Ok(pem_response(StatusCode::OK, pem.clone())),
        None => Err(Refusal::BadRequest(
            "this gateway was started without --fleet-ca".into(),
        )),
    };
    finish(&state, "cacerts", started, outcome)
}

fn pem_response(status: StatusCode, pem: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/pem-certificate-chain")],
        pem,
    )
        .into_response()
}

/// A CSR as received: PEM, or base64 DER (RFC 7030).
struct ReceivedCsr {
    pem: String,
    sha256: String,
    device: DeviceId,
    public_key_sha256: String,
}

fn decode_csr(body: &[u8]) -> Result<ReceivedCsr, Refusal> {
    let text =
        std::str::from_utf8(body).map_err(|_| Refusal::BadRequest("the CSR is not text".into()))?;
    let der = if text.contains("-----BEGIN") {
        csr_policy::decode_pem(text).map_err(|d: Denial| Refusal::BadRequest(d.to_string()))?
    } else {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        STANDARD.decode(compact).map_err(|_| {
            Refusal::BadRequest("the body is neither a PEM CSR nor base64 DER".into())
        })?
    };
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| Refusal::BadRequest(format!("the CSR is not valid PKCS#10: {e}")))?;
    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push(u.to_string());
                }
            }
        }
    }
    let device = match uris.as_slice() {
        [one] => parse_spiffe_id(one),
        _ => None,
    }
    .ok_or_else(|| {
        Refusal::BadRequest("the CSR must carry exactly one URI SAN spiffe://<trust-domain>/ns/<namespace>/device/<name>".into())
    })?;
    let public_key_sha256 = hex_sha256(csr.certification_request_info.subject_pki.raw);
    Ok(ReceivedCsr {
        pem: pem_encode("CERTIFICATE REQUEST", &der),
        sha256: hex_sha256(&der),
        device,
        public_key_sha256,
    })
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn device_and_group(
    state: &AppState,
    id: &DeviceId,
) -> (Option<Arc<Device>>, Option<Arc<DeviceGroup>>) {
    let device = state.caches.device(&id.namespace, &id.name);
    let group = device
        .as_ref()
        .and_then(|d| state.caches.group(&id.namespace, &d.spec.group));
    (device, group)
}

fn key(id: &DeviceId) -> String {
    format!("{}/{}", id.namespace, id.name)
}

async fn simple_enroll(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let outcome = enroll_first(&state, request).await;
    finish(&state, "simpleenroll", started, outcome)
}

async fn enroll_first(state: &AppState, request: Request) -> Outcome {
    let peer = peer_of(&request);
    let (headers, body) = read_body(state, request).await?;
    let csr = decode_csr(&body)?;
    let (device, group) = device_and_group(state, &csr.device);
    let name = key(&csr.device);
    let device = device.ok_or_else(|| Refusal::UnknownDevice(name.clone()))?;
    match device.spec.lifecycle {
        Lifecycle::Retired => return Err(Refusal::DeviceRetired(name)),
        Lifecycle::Suspended => return Err(Refusal::DeviceSuspended(name)),
        _ => {}
    }
    let group = group.ok_or_else(|| Refusal::GroupNotFound(device.spec.group.clone()))?;
    if csr.device.trust_domain != group.spec.certificates.trust_domain {
        return Err(Refusal::WrongTrustDomain {
            found: csr.device.trust_domain.clone(),
            expected: group.spec.certificates.trust_domain.clone(),
        });
    }
    let now = Timestamp::now();
    let has_identity = device.status.as_ref().is_some_and(|s| s.identity.is_some());
    let method = if let Some(token) = bearer_token(&headers) {
        if has_identity && !identity_matches(&device, &csr) {
            return Err(Refusal::TokenAlreadyUsed);
        }
        let secret_ref = group
            .spec
            .enrollment
            .token_secret_ref
            .as_ref()
            .ok_or_else(|| {
                Refusal::EnrollmentRefused(format!(
                    "DeviceGroup {} accepts no enrollment tokens",
                    device.spec.group
                ))
            })?;
        let secret = state
            .caches
            .secret(&csr.device.namespace, &secret_ref.name)
            .await
            .map_err(|e| {
                Refusal::EnrollmentRefused(format!("cannot read the token Secret: {e}"))
            })?;
        let record = secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(&csr.device.name))
            .map(|b| b.0.as_slice());
        enrollment_token::verify(record, &token, now).map_err(|e| {
            tracing::info!(device = %name, error = %e, "enrollment token refused");
            Refusal::BadToken
        })?;
        EnrollmentMethod::Token
    } else if let Some(leaf) = peer.leaf.as_deref() {
        verify_manufacturer_certificate(state, &device, &group, leaf, &peer.chain).await?;
        EnrollmentMethod::IDevID
    } else {
        return Err(Refusal::NoClientCertificate);
    };
    record_and_answer(state, &device, csr, method, now).await
}

/// Checks an IDevID: it chains to the group's manufacturer CA bundle and names this device's
/// serial number.
async fn verify_manufacturer_certificate(
    state: &AppState,
    device: &Device,
    group: &DeviceGroup,
    leaf: &PeerCertificate,
    chain: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<(), Refusal> {
    let group_name = device.spec.group.clone();
    let untrusted = |why: String| Refusal::UntrustedManufacturerCertificate {
        group: group_name.clone(),
        why,
    };
    let ca_ref = group
        .spec
        .enrollment
        .manufacturer_ca
        .as_ref()
        .ok_or_else(|| untrusted("the group names no spec.enrollment.manufacturerCA".into()))?;
    let ns = device.metadata.namespace.clone().unwrap_or_default();
    let bundle = state
        .caches
        .config_map(&ns, &ca_ref.name)
        .await
        .map_err(|e| untrusted(format!("cannot read ConfigMap {}: {e}", ca_ref.name)))?
        .and_then(|cm| cm.data.as_ref().and_then(|d| d.get(&ca_ref.key).cloned()))
        .ok_or_else(|| {
            untrusted(format!(
                "ConfigMap {} has no key {}",
                ca_ref.name, ca_ref.key
            ))
        })?;
    crate::idevid::verify_chain(&bundle, chain).map_err(untrusted)?;
    let expected = device.spec.serial_number.clone().unwrap_or_default();
    let found = leaf.subject_serial.clone().unwrap_or_default();
    if expected.is_empty() || found != expected {
        return Err(Refusal::ManufacturerSerialMismatch {
            device: format!(
                "{ns}/{}",
                device.metadata.name.as_deref().unwrap_or_default()
            ),
            found,
            expected,
        });
    }
    Ok(())
}

fn identity_matches(device: &Device, csr: &ReceivedCsr) -> bool {
    let Some(identity) = device.status.as_ref().and_then(|s| s.identity.as_ref()) else {
        return false;
    };
    crds::identity::inspect(
        &identity.certificate,
        &identity.spiffe_id,
        Some(&csr.public_key_sha256),
    )
    .is_ok()
}

/// Records the CSR (if new) and answers with the certificate once issued, the policy's refusal,
/// or 202 to come back later.
async fn record_and_answer(
    state: &AppState,
    device: &Device,
    csr: ReceivedCsr,
    method: EnrollmentMethod,
    now: Timestamp,
) -> Outcome {
    if identity_matches(device, &csr) {
        let identity = device
            .status
            .as_ref()
            .and_then(|s| s.identity.as_ref())
            .ok_or(Refusal::Overloaded)?;
        let chain = format!(
            "{}{}",
            identity.certificate,
            identity.ca.clone().unwrap_or_default()
        );
        return Ok(pem_response(StatusCode::OK, chain));
    }
    let status = device.status.as_ref();
    let recorded = status
        .and_then(|s| s.enrollment.as_ref())
        .is_some_and(|e| e.csr_sha256 == csr.sha256);
    if recorded
        && let Some(c) =
            status.and_then(|s| conditions::find(&s.conditions, conditions::types::ENROLLED))
        && c.status == conditions::FALSE
        && (Denial::REASONS.contains(&c.reason.as_str())
            || matches!(c.reason.as_str(), "CsrDenied" | "IssuanceFailed"))
    {
        return Err(Refusal::CsrDenied {
            reason: c.reason.clone(),
            message: c.message.clone(),
        });
    }
    let enrollment = EnrollmentStatus {
        csr: csr.pem,
        csr_sha256: csr.sha256,
        method,
        requested_at: Time(now),
    };
    state
        .writer
        .update(device, "enrollment", |current| {
            status::after_enroll(current, enrollment)
        })
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot record an enrollment");
            Refusal::Overloaded
        })?;
    let mut response = (StatusCode::ACCEPTED, "certificate pending; retry later\n").into_response();
    if let Ok(v) = HeaderValue::from_str(&state.retry_after.as_secs().max(1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Ok(response)
}

async fn simple_reenroll(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let outcome = reenroll(&state, request).await;
    finish(&state, "simplereenroll", started, outcome)
}

/// Authorises a request by its device certificate.
fn authorized(
    state: &AppState,
    peer: &Peer,
) -> Result<(Arc<Device>, DeviceId, authz::Scope), Refusal> {
    let id = peer.leaf.as_ref().and_then(|l| l.device.clone());
    let (device, group) = match &id {
        Some(id) => device_and_group(state, id),
        None => (None, None),
    };
    let (id, scope) = authz::authorize_device(
        peer.leaf.as_deref(),
        device.as_deref(),
        group.as_deref(),
        Timestamp::now(),
    )?;
    let device = device.ok_or_else(|| Refusal::UnknownDevice(key(&id)))?;
    Ok((device, id, scope))
}

async fn reenroll(state: &AppState, request: Request) -> Outcome {
    let peer = peer_of(&request);
    let authorization = authorized(state, &peer);
    let (_, body) = read_body(state, request).await?;
    let csr = decode_csr(&body)?;
    let (device, id) = match authorization {
        Ok((device, id, _scope)) => (device, id),
        // The renewal already went through, so the certificate the device polls with is no longer
        // current. It may still collect the new certificate for the CSR it sent: a certificate
        // is public, and useless without the new key only the requester holds.
        Err(Refusal::CertificateRevoked(name)) => {
            let fleet_cert_for_this_device = peer.leaf.as_ref().is_some_and(|l| {
                l.chains_to_fleet_ca != Some(false) && l.device.as_ref() == Some(&csr.device)
            });
            let device = state.caches.device(&csr.device.namespace, &csr.device.name);
            match device {
                Some(d) if fleet_cert_for_this_device && identity_matches(&d, &csr) => {
                    return record_and_answer(
                        state,
                        &d,
                        csr,
                        EnrollmentMethod::Renewal,
                        Timestamp::now(),
                    )
                    .await;
                }
                _ => return Err(Refusal::CertificateRevoked(name)),
            }
        }
        Err(refusal) => return Err(refusal),
    };
    if csr.device != id {
        return Err(Refusal::CsrForAnotherDevice {
            csr: key(&csr.device),
            cert: key(&id),
        });
    }
    record_and_answer(
        state,
        &device,
        csr,
        EnrollmentMethod::Renewal,
        Timestamp::now(),
    )
    .await
}

async fn check_in(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let outcome = check_in_inner(&state, request).await;
    finish(&state, "checkin", started, outcome)
}

/// Bounds what a device may claim, so a status write can never be refused by the schema.
fn validate_report(r: &ReportedState) -> Result<(), Refusal> {
    let too_long = |f: &Option<String>, max: usize| f.as_ref().is_some_and(|s| s.len() > max);
    if too_long(&r.firmware_version, 64)
        || too_long(&r.location, 128)
        || too_long(&r.agent_version, 64)
    {
        return Err(Refusal::BadRequest("a reported field is too long".into()));
    }
    if r.security_version.is_some_and(|v| v < 0) {
        return Err(Refusal::BadRequest(
            "securityVersion must not be negative".into(),
        ));
    }
    if r.addresses.len() > 8
        || r.addresses
            .iter()
            .any(|a| a.parse::<std::net::IpAddr>().is_err())
    {
        return Err(Refusal::BadRequest(
            "addresses must be at most 8 IP addresses".into(),
        ));
    }
    if let Some(d) = &r.boot_measurement_sha256
        && (d.len() != 64
            || !d
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        return Err(Refusal::BadRequest(
            "bootMeasurementSha256 must be lowercase hex SHA-256".into(),
        ));
    }
    Ok(())
}

async fn check_in_inner(state: &AppState, request: Request) -> Outcome {
    let peer = peer_of(&request);
    let (device, id, scope) = authorized(state, &peer)?;
    let (_, body) = read_body(state, request).await?;
    let reported: ReportedState = json(&body)?;
    validate_report(&reported)?;
    let now = Timestamp::now();
    let group = state.caches.group(&id.namespace, &device.spec.group);
    let refresh = state.heartbeat.refresh(group.as_ref().map(|g| &g.spec));
    state
        .writer
        .update(&device, "checkin", |current| {
            status::after_checkin(current, &reported, now, refresh)
        })
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot record a check-in");
            Refusal::Overloaded
        })?;
    state.metrics.checkins.inc();
    let identity = device.status.as_ref().and_then(|s| s.identity.as_ref());
    let renew_after = match (identity, group.as_ref()) {
        (Some(i), Some(g)) => i
            .not_after
            .0
            .checked_sub(
                jiff::SignedDuration::try_from(g.spec.certificates.renew_before.get())
                    .unwrap_or_default(),
            )
            .ok(),
        _ => None,
    };
    let response = CheckInResponse {
        device: key(&id),
        scope,
        check_in_interval_seconds: group
            .as_ref()
            .map_or(300, |g| g.spec.check_in_interval.get().as_secs().max(1)),
        renew_after,
        certificate_not_after: identity.map(|i| i.not_after.0),
        offer: match group.as_ref() {
            Some(g) => offer_for(state, &device, g, scope, now).await,
            None => None,
        },
    };
    Ok(axum::Json(response).into_response())
}

/// The firmware this device should install now, from the rollouts targeting its group.
/// Decided on the device as it just reported itself (the watch cache may not show that yet), so
/// a device that installed or refused the firmware is not offered it again.
async fn offer_for(
    state: &AppState,
    device: &Device,
    group: &DeviceGroup,
    scope: authz::Scope,
    now: Timestamp,
) -> Option<FirmwareOffer> {
    let rollouts = state.caches.rollouts_for(device);
    if rollouts.is_empty() {
        return None;
    }
    let fresh = state.writer.freshest(device).await;
    let mut device = device.clone();
    let status = device.status.get_or_insert_with(Default::default);
    status.reported = fresh.reported;
    status.update = fresh.update;
    let device = &device;
    rollouts.into_iter().find_map(|rollout| {
        let plan = state.caches.plan(&rollout);
        let manifest = waves::offer(
            device,
            group,
            &rollout,
            &plan,
            scope == authz::Scope::Restricted,
            now,
        )?;
        Some(FirmwareOffer {
            rollout: rollout.metadata.name.clone().unwrap_or_default(),
            manifest: manifest.clone(),
        })
    })
}

async fn report_status(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let outcome = report_status_inner(&state, request).await;
    finish(&state, "status", started, outcome)
}

async fn report_status_inner(state: &AppState, request: Request) -> Outcome {
    let peer = peer_of(&request);
    let (device, id, _scope) = authorized(state, &peer)?;
    let (_, body) = read_body(state, request).await?;
    let report: UpdateReport = json(&body)?;
    if report.rollout.len() > 253
        || report.version.len() > 64
        || report.message.as_ref().is_some_and(|m| m.len() > 1024)
    {
        return Err(Refusal::BadRequest("a reported field is too long".into()));
    }
    if report.progress_percent.is_some_and(|p| p > 100) {
        return Err(Refusal::BadRequest("progressPercent must be 0..100".into()));
    }
    let now = Timestamp::now();
    let update = UpdateProgress {
        rollout: report.rollout,
        version: report.version,
        state: report.state,
        progress_percent: report.progress_percent,
        message: report.message,
        updated_at: Time(now),
    };
    let group = state.caches.group(&id.namespace, &device.spec.group);
    let refresh = state.heartbeat.refresh(group.as_ref().map(|g| &g.spec));
    state
        .writer
        .update(&device, "status", |current| {
            status::after_update(current, &update, now, refresh)
        })
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot record an update report");
            Refusal::Overloaded
        })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
