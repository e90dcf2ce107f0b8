//! One device's life with the gateway: generate a key locally, enroll (token or manufacturer
//! certificate), check in, and renew with a fresh key before the certificate expires. The key
//! never leaves the device; only CSRs do. Used by the single-device agent (with its state on
//! disk) and by the simulator (thousands of these in one process, in memory).

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use crds::wire::{CheckInResponse, ReportedState, UpdateReport};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use crate::client::{CallError, Endpoint, Enrollment, GatewayClient, Identity};

/// Who the device is.
#[derive(Clone, Debug)]
pub struct Name {
    pub trust_domain: String,
    pub namespace: String,
    pub name: String,
}

impl Name {
    pub fn spiffe_id(&self) -> String {
        crds::device::spiffe_id(&self.trust_domain, &self.namespace, &self.name)
    }
}

/// How the device proves it may enroll the first time.
#[derive(Clone)]
pub enum Credential {
    Token(String),
    /// Manufacturer certificate and key.
    Manufacturer(Identity),
}

/// Where a device keeps its key and certificate. `None` keeps them in memory (simulator).
#[derive(Clone, Debug)]
pub struct Storage {
    pub dir: Option<PathBuf>,
}

impl Storage {
    fn path(&self, file: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(file))
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.path(file)?).ok()
    }

    /// Writes a file readable by the owner only (keys).
    fn write_private(&self, file: &str, contents: &str) -> anyhow::Result<()> {
        let Some(path) = self.path(file) else {
            return Ok(());
        };
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

pub struct Device {
    pub name: Name,
    endpoint: Endpoint,
    storage: Storage,
    key_pem: String,
    /// The first-enrollment CSR for `key_pem` (key, CSR), made once and kept with the key. An
    /// ECDSA signature differs every time a CSR is signed, so a CSR made again for a retry
    /// would be a new request: the operator would replace the one in progress, and one already
    /// issued would leave the device holding a spent token.
    enroll_csr: Option<(String, String)>,
    identity: Option<Identity>,
    client: Option<GatewayClient>,
    /// Longest time to wait for a certificate to be issued.
    pub issue_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("the certificate was not issued within {0:?}")]
    IssueTimeout(Duration),
    #[error("not enrolled")]
    NotEnrolled,
    #[error("{0:#}")]
    Local(#[from] anyhow::Error),
}

impl DeviceError {
    /// Worth retrying with backoff (see [`CallError::is_transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            DeviceError::Call(c) => c.is_transient(),
            DeviceError::IssueTimeout(_) => true,
            DeviceError::NotEnrolled | DeviceError::Local(_) => false,
        }
    }

    pub fn reason(&self) -> String {
        match self {
            DeviceError::Call(c) => c.reason(),
            DeviceError::IssueTimeout(_) => "IssueTimeout".into(),
            DeviceError::NotEnrolled => "NotEnrolled".into(),
            DeviceError::Local(_) => "Local".into(),
        }
    }
}

/// Where the first-enrollment CSR is kept, next to `key.pem`.
const ENROLL_CSR: &str = "enroll-csr.pem";

/// A new P-256 key, generated here.
fn new_key() -> anyhow::Result<String> {
    Ok(KeyPair::generate()?.serialize_pem())
}

impl Device {
    /// Loads the device's key and certificate from storage, generating a key if there is none.
    pub fn load(name: Name, endpoint: Endpoint, storage: Storage) -> anyhow::Result<Self> {
        let (key_pem, enroll_csr) = match storage.read("key.pem") {
            Some(k) => {
                let csr = storage.read(ENROLL_CSR).map(|c| (k.clone(), c));
                (k, csr)
            }
            None => {
                let k = new_key()?;
                storage.write_private("key.pem", &k)?;
                (k, None)
            }
        };
        let identity = storage.read("cert.pem").map(|chain_pem| Identity {
            chain_pem,
            key_pem: key_pem.clone(),
        });
        let client = identity
            .as_ref()
            .map(|id| GatewayClient::new(&endpoint, Some(id)))
            .transpose()?;
        Ok(Self {
            name,
            endpoint,
            storage,
            key_pem,
            enroll_csr,
            identity,
            client,
            issue_timeout: Duration::from_secs(600),
        })
    }

    pub fn is_enrolled(&self) -> bool {
        self.identity.is_some()
    }

    /// The current certificate chain (PEM), once enrolled.
    pub fn certificate(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.chain_pem.as_str())
    }

    /// A CSR for `key_pem` naming this device (CN = name, URI SAN = SPIFFE ID).
    pub fn csr(&self, key_pem: &str) -> anyhow::Result<String> {
        let key = KeyPair::from_pem(key_pem)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.name.name.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(self.name.spiffe_id().try_into()?)];
        Ok(params.serialize_request(&key)?.pem()?)
    }

    async fn await_issue<F, Fut>(&self, mut ask: F) -> Result<String, DeviceError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Enrollment, CallError>>,
    {
        let deadline = tokio::time::Instant::now() + self.issue_timeout;
        let mut attempt = 0;
        loop {
            match ask().await? {
                Enrollment::Issued(chain) => return Ok(chain),
                Enrollment::Pending(hint) => {
                    let wait = next_poll(attempt, hint);
                    if tokio::time::Instant::now() + wait > deadline {
                        return Err(DeviceError::IssueTimeout(self.issue_timeout));
                    }
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    fn adopt(&mut self, chain_pem: String, key_pem: String) -> anyhow::Result<()> {
        self.storage.write_private("key.pem", &key_pem)?;
        self.storage.write_private("cert.pem", &chain_pem)?;
        let identity = Identity {
            chain_pem,
            key_pem: key_pem.clone(),
        };
        self.client = Some(GatewayClient::new(&self.endpoint, Some(&identity))?);
        self.identity = Some(identity);
        self.key_pem = key_pem;
        Ok(())
    }

    /// The CSR of the first enrollment: the same one on every attempt for this key.
    fn enrollment_csr(&mut self) -> anyhow::Result<String> {
        if let Some((key, csr)) = &self.enroll_csr
            && *key == self.key_pem
        {
            return Ok(csr.clone());
        }
        let csr = self.csr(&self.key_pem)?;
        self.storage.write_private(ENROLL_CSR, &csr)?;
        self.enroll_csr = Some((self.key_pem.clone(), csr.clone()));
        Ok(csr)
    }

    /// First enrollment. Waits (polling) until the certificate is issued. A retry after a
    /// failure sends the same CSR, so it continues the same request.
    pub async fn enroll(&mut self, credential: &Credential) -> Result<(), DeviceError> {
        let csr = self.enrollment_csr()?;
        let (client, token) = match credential {
            Credential::Token(t) => (GatewayClient::new(&self.endpoint, None)?, Some(t.clone())),
            Credential::Manufacturer(id) => (GatewayClient::new(&self.endpoint, Some(id))?, None),
        };
        let chain = self
            .await_issue(|| client.simple_enroll(&csr, token.as_deref()))
            .await?;
        let key = self.key_pem.clone();
        self.adopt(chain, key)?;
        Ok(())
    }

    /// Renewal: a fresh key, a CSR authenticated by the current certificate, and the switch once
    /// the new certificate is issued. The old key is kept until then.
    pub async fn renew(&mut self) -> Result<(), DeviceError> {
        let client = self.client.clone().ok_or(DeviceError::NotEnrolled)?;
        let next_key = new_key()?;
        self.storage.write_private("next-key.pem", &next_key)?;
        let csr = self.csr(&next_key)?;
        let chain = self.await_issue(|| client.simple_reenroll(&csr)).await?;
        self.adopt(chain, next_key)?;
        if let Some(p) = self.storage.path("next-key.pem") {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    pub async fn check_in(&self, report: &ReportedState) -> Result<CheckInResponse, DeviceError> {
        let client = self.client.as_ref().ok_or(DeviceError::NotEnrolled)?;
        Ok(client.check_in(report).await?)
    }

    pub async fn report(&self, report: &UpdateReport) -> Result<(), DeviceError> {
        let client = self.client.as_ref().ok_or(DeviceError::NotEnrolled)?;
        Ok(client.report(report).await?)
    }
}

/// The first wait for a certificate being issued: issuance usually takes well under a second.
const FIRST_POLL: Duration = Duration::from_millis(500);

/// How long to wait before asking again for a certificate after `attempt` answers of "not yet"
/// (counted from 0): soon at first, doubling up to the gateway's Retry-After `hint`, which is
/// then honoured. A fleet enrolling at once (a site being commissioned) polls the gateway at
/// the rate it asked for, not twice a second per device.
fn next_poll(attempt: u32, hint: Duration) -> Duration {
    FIRST_POLL.saturating_mul(1 << attempt.min(16)).min(hint)
}

/// Whether it is time to renew, given the gateway's `renewAfter`.
pub fn renewal_due(answer: &CheckInResponse, now: jiff::Timestamp) -> bool {
    answer.renew_after.is_some_and(|t| now >= t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(storage: Storage) -> Device {
        let ca = rcgen::CertificateParams::new(vec!["gw.example".to_string()])
            .unwrap()
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let name = Name {
            trust_domain: "fleet.example".into(),
            namespace: "plant".into(),
            name: "plc-1".into(),
        };
        Device::load(
            name,
            Endpoint::new("https://gw.example:8443", &ca).unwrap(),
            storage,
        )
        .unwrap()
    }

    #[test]
    fn polls_for_a_certificate_soon_at_first_then_at_the_gateways_pace() {
        let ms = |n| Duration::from_millis(n);
        let waits = |hint| (0..7).map(|a| next_poll(a, hint)).collect::<Vec<_>>();
        assert_eq!(
            waits(ms(5000)),
            [
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(5000),
                ms(5000),
                ms(5000)
            ]
        );
        assert_eq!(waits(ms(1000))[..3], [ms(500), ms(1000), ms(1000)]);
        // A hint shorter than the first poll is followed as given.
        assert_eq!(next_poll(0, ms(200)), ms(200));
        // Far into a long wait the doubling does not overflow.
        assert_eq!(next_poll(u32::MAX, ms(5000)), ms(5000));
    }

    #[test]
    fn a_retried_enrollment_sends_the_same_csr() {
        let mut d = device(Storage { dir: None });
        // Signing again gives a different CSR for the same key ...
        let key = d.key_pem.clone();
        assert_ne!(d.csr(&key).unwrap(), d.csr(&key).unwrap());
        // ... so the enrollment CSR is made once.
        let first = d.enrollment_csr().unwrap();
        assert_eq!(d.enrollment_csr().unwrap(), first);
    }

    #[test]
    fn the_enrollment_csr_survives_a_restart_with_the_key() {
        let dir = std::env::temp_dir().join(format!("fw-agent-csr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let storage = Storage {
            dir: Some(dir.clone()),
        };
        let first = device(storage.clone()).enrollment_csr().unwrap();
        let again = device(storage).enrollment_csr().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(again, first);
    }
}
