//! The device side of the gateway API (`crds::wire`): one HTTPS client per device identity, with
//! keep-alive connections and TLS session resumption, and typed results for every call.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use crds::wire::{self, CheckInResponse, ErrorBody, ReportedState, UpdateReport};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, body::Bytes, header};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

/// Where the gateway is and which CA signs its certificate.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// e.g. `https://gateway.fleet.example:8443`
    pub base: String,
    pub roots: Arc<RootCertStore>,
}

impl Endpoint {
    pub fn new(base: &str, ca_pem: &str) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.context("the gateway CA bundle is not PEM")?)?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "the gateway CA bundle holds no certificate"
        );
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            roots: Arc::new(roots),
        })
    }
}

/// A certificate chain and key the device authenticates with.
#[derive(Clone)]
pub struct Identity {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Result of an enrollment call.
#[derive(Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// The certificate chain (PEM).
    Issued(String),
    /// Still being issued; ask again after this long.
    Pending(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("refused by the gateway ({status}): {}: {}", .body.error, .body.message)]
    Refused { status: StatusCode, body: ErrorBody },
    #[error("transport: {0}")]
    Transport(String),
    #[error("unexpected answer ({status}): {text}")]
    Unexpected { status: StatusCode, text: String },
}

impl CallError {
    /// Worth retrying later: the gateway was unreachable or overloaded, not a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            // A device powered on before its Device object reached the gateway's cache is
            // retried too (slowly, with backoff): provisioning races are normal.
            CallError::Refused { status, body } => {
                status.is_server_error() || status.as_u16() == 429 || body.error == "UnknownDevice"
            }
            CallError::Unexpected { status, .. } => {
                status.is_server_error() || status.as_u16() == 429
            }
        }
    }

    /// The gateway's refusal reason, or a transport class, for statistics.
    pub fn reason(&self) -> String {
        match self {
            CallError::Refused { body, .. } => body.error.clone(),
            CallError::Transport(_) => "Transport".into(),
            CallError::Unexpected { status, .. } => format!("Http{}", status.as_u16()),
        }
    }
}

#[derive(Clone)]
pub struct GatewayClient {
    endpoint: Endpoint,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl GatewayClient {
    /// A client presenting `identity` (or no client certificate).
    pub fn new(endpoint: &Endpoint, identity: Option<&Identity>) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(endpoint.roots.clone());
        let config = match identity {
            Some(id) => {
                let chain = CertificateDer::pem_slice_iter(id.chain_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .context("the device certificate is not PEM")?;
                let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())
                    .context("the device key is not PEM")?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_max_idle_per_host(1)
            .build(https);
        Ok(Self {
            endpoint: endpoint.clone(),
            http,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> Result<(StatusCode, hyper::HeaderMap, Bytes), CallError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.endpoint.base))
            .header(header::CONTENT_TYPE, content_type);
        if let Some(t) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CallError::Transport(e.to_string()))?;
        let response = tokio::time::timeout(Duration::from_secs(30), self.http.request(request))
            .await
            .map_err(|_| CallError::Transport("request timed out".into()))?
            .map_err(|e| CallError::Transport(format!("{e:#}")))?;
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| CallError::Transport(e.to_string()))?
            .to_bytes();
        if parts.status.is_client_error() {
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                error: format!("Http{}", parts.status.as_u16()),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
            return Err(CallError::Refused {
                status: parts.status,
                body,
            });
        }
        Ok((parts.status, parts.headers, bytes))
    }

    async fn enroll_at(
        &self,
        path: &str,
        csr_pem: &str,
        token: Option<&str>,
    ) -> Result<Enrollment, CallError> {
        let (status, headers, body) = self
            .call(
                Method::POST,
                path,
                "application/pkcs10",
                csr_pem.as_bytes().to_vec(),
                token,
            )
            .await?;
        match status {
            StatusCode::OK => Ok(Enrollment::Issued(
                String::from_utf8_lossy(&body).into_owned(),
            )),
            StatusCode::ACCEPTED => {
                let secs = headers
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(5);
                Ok(Enrollment::Pending(Duration::from_secs(secs)))
            }
            other => Err(CallError::Unexpected {
                status: other,
                text: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    /// First enrollment, with a token (no client certificate) or with the manufacturer
    /// certificate this client was built with.
    pub async fn simple_enroll(
        &self,
        csr_pem: &str,
        token: Option<&str>,
    ) -> Result<Enrollment, CallError> {
        self.enroll_at(wire::SIMPLE_ENROLL, csr_pem, token).await
    }

    /// Renewal with the current certificate.
    pub async fn simple_reenroll(&self, csr_pem: &str) -> Result<Enrollment, CallError> {
        self.enroll_at(wire::SIMPLE_REENROLL, csr_pem, None).await
    }

    pub async fn check_in(&self, report: &ReportedState) -> Result<CheckInResponse, CallError> {
        let body = serde_json::to_vec(report).map_err(|e| CallError::Transport(e.to_string()))?;
        let (_, _, bytes) = self
            .call(Method::POST, wire::CHECK_IN, "application/json", body, None)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| CallError::Unexpected {
            status: StatusCode::OK,
            text: format!("check-in answer is not JSON: {e}"),
        })
    }

    pub async fn report(&self, report: &UpdateReport) -> Result<(), CallError> {
        let body = serde_json::to_vec(report).map_err(|e| CallError::Transport(e.to_string()))?;
        self.call(Method::POST, wire::STATUS, "application/json", body, None)
            .await?;
        Ok(())
    }

    /// Fetches the fleet CA chain (`/.well-known/est/cacerts`).
    pub async fn cacerts(&self) -> Result<String, CallError> {
        let (_, _, body) = self
            .call(Method::GET, wire::CACERTS, "text/plain", Vec::new(), None)
            .await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
