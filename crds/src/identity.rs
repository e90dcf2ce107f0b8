//! Reading an issued device certificate: what goes into `status.identity`, and whether the
//! issuer gave us what was asked for. The operator never copies a certificate it has not checked
//! here: it must be a leaf, name the device's SPIFFE ID, and carry the key of the approved CSR.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{device::IdentityStatus, hex_sha256};

/// A checked certificate and its chain as the issuer returned them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub certificate_pem: String,
    pub serial_number: String,
    pub fingerprint_sha256: String,
    pub public_key_sha256: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssuedError {
    #[error("the issuer returned no PEM certificate")]
    NoCertificate,
    #[error("the issued certificate does not parse: {0}")]
    Unparsable(String),
    #[error("the issued certificate is a CA certificate")]
    IsCa,
    #[error("the issued certificate names {found:?}, not {expected}")]
    WrongIdentity {
        expected: String,
        found: Vec<String>,
    },
    #[error("the issued certificate carries a different public key than the approved CSR")]
    WrongKey,
}

impl IssuedError {
    pub fn reason(&self) -> &'static str {
        match self {
            IssuedError::NoCertificate | IssuedError::Unparsable(_) => {
                "IssuedCertificateUnreadable"
            }
            IssuedError::IsCa => "IssuedCertificateIsCa",
            IssuedError::WrongIdentity { .. } => "IssuedCertificateWrongIdentity",
            IssuedError::WrongKey => "IssuedCertificateWrongKey",
        }
    }
}

/// Parses the first certificate of a PEM bundle and checks it against the expected identity
/// and, when known, the expected public key (SHA-256 of the DER SubjectPublicKeyInfo).
pub fn inspect(
    pem: &str,
    spiffe_id: &str,
    public_key_sha256: Option<&str>,
) -> Result<Issued, IssuedError> {
    let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .find_map(|b| b.ok().filter(|b| b.label == "CERTIFICATE"))
        .ok_or(IssuedError::NoCertificate)?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&block.contents)
        .map_err(|e| IssuedError::Unparsable(e.to_string()))?;
    if cert.is_ca() {
        return Err(IssuedError::IsCa);
    }
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris.len() != 1 || uris[0] != spiffe_id {
        return Err(IssuedError::WrongIdentity {
            expected: spiffe_id.to_string(),
            found: uris,
        });
    }
    let key_sha = hex_sha256(cert.public_key().raw);
    if public_key_sha256.is_some_and(|k| !k.eq_ignore_ascii_case(&key_sha)) {
        return Err(IssuedError::WrongKey);
    }
    let ts = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp()).map_err(|e| IssuedError::Unparsable(e.to_string()))
    };
    Ok(Issued {
        certificate_pem: pem_encode("CERTIFICATE", &block.contents),
        serial_number: cert.raw_serial_as_string().replace(':', ""),
        fingerprint_sha256: hex_sha256(&block.contents),
        public_key_sha256: key_sha,
        not_before: ts(cert.validity().not_before)?,
        not_after: ts(cert.validity().not_after)?,
    })
}

impl Issued {
    /// The `status.identity` this certificate gives the device.
    pub fn to_status(&self, spiffe_id: &str, ca: Option<String>, source: &str) -> IdentityStatus {
        IdentityStatus {
            spiffe_id: spiffe_id.to_string(),
            certificate: self.certificate_pem.clone(),
            ca,
            serial_number: self.serial_number.clone(),
            fingerprint_sha256: self.fingerprint_sha256.clone(),
            not_before: Time(self.not_before),
            not_after: Time(self.not_after),
            source: Some(source.to_string()),
        }
    }
}

/// Standard PEM armour with 64-column lines.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, Issuer, KeyPair, PublicKeyData, SanType};

    const SPIFFE: &str = "spiffe://fleet.example/ns/plant/device/plc-1";

    fn ca() -> (KeyPair, CertificateParams) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (key, params)
    }

    fn leaf(uri: &str, key: &KeyPair) -> String {
        let (ca_key, ca_params) = ca();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.signed_by(key, &issuer).unwrap().pem()
    }

    #[test]
    fn a_matching_certificate_yields_its_identity() {
        let key = KeyPair::generate().unwrap();
        let pem = leaf(SPIFFE, &key);
        let spki = hex_sha256(&key.subject_public_key_info());
        let issued = inspect(&pem, SPIFFE, Some(&spki)).unwrap();
        assert_eq!(issued.public_key_sha256, spki);
        assert_eq!(issued.fingerprint_sha256.len(), 64);
        assert!(!issued.serial_number.is_empty() && !issued.serial_number.contains(':'));
        assert!(issued.not_after > issued.not_before);
        let status = issued.to_status(SPIFFE, None, "plc-1-abc");
        assert_eq!(status.spiffe_id, SPIFFE);
        assert_eq!(
            inspect(&status.certificate, SPIFFE, Some(&spki)).unwrap(),
            issued
        );
    }

    #[test]
    fn a_certificate_for_another_identity_or_key_is_refused() {
        let key = KeyPair::generate().unwrap();
        let other = leaf("spiffe://fleet.example/ns/plant/device/plc-2", &key);
        assert_eq!(
            inspect(&other, SPIFFE, None).unwrap_err().reason(),
            "IssuedCertificateWrongIdentity"
        );
        let pem = leaf(SPIFFE, &key);
        let wrong = "0".repeat(64);
        assert_eq!(
            inspect(&pem, SPIFFE, Some(&wrong)).unwrap_err(),
            IssuedError::WrongKey
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            inspect("nope", SPIFFE, None).unwrap_err(),
            IssuedError::NoCertificate
        );
        let bad = pem_encode("CERTIFICATE", b"\x30\x03\x02\x01\x01");
        assert_eq!(
            inspect(&bad, SPIFFE, None).unwrap_err().reason(),
            "IssuedCertificateUnreadable"
        );
    }
}
