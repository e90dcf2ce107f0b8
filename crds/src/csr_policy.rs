//! Which certificate signing requests a device may have signed. The operator approves a
//! CertificateRequest only when [`check`] accepts the CSR; every refusal has its own reason
//! (a CamelCase string used in conditions, Events and metrics) and a message that says what the
//! device or the DeviceGroup must change.
//!
//! The checks, in order: size, exactly one PEM CSR, parses, key algorithm and size allowed by
//! the group, signature algorithm not legacy, self-signature verifies (the requester holds the
//! key), optional key pin, URI SAN exactly the device's SPIFFE ID and no other names, subject
//! empty or the device's name, no CA, key usage at most digital signature, extended key usage at
//! most client auth, no other extensions.

use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ECDSA_WITH_SHA512, OID_SIG_ED25519,
    },
    prelude::FromDer,
    public_key::PublicKey,
};

use crate::{
    group::{KeyAlgorithm, KeyPolicy},
    hex_sha256,
};

/// Largest PEM text accepted (an RSA-4096 CSR with a SAN is about 1.7 KiB).
pub const MAX_CSR_PEM_BYTES: usize = 16 * 1024;

/// What the CSR must match.
#[derive(Clone, Copy, Debug)]
pub struct Policy<'a> {
    pub device_name: &'a str,
    pub spiffe_id: &'a str,
    pub keys: &'a KeyPolicy,
    /// `spec.identity.publicKeySha256`.
    pub pinned_public_key_sha256: Option<&'a str>,
}

/// A CSR that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub der: Vec<u8>,
    /// Lowercase hex SHA-256 of the CSR DER.
    pub sha256: String,
    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub public_key_sha256: String,
    pub algorithm: KeyAlgorithm,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("the CSR is {size} bytes; at most {MAX_CSR_PEM_BYTES} are accepted")]
    TooLarge { size: usize },
    #[error("no PEM \"CERTIFICATE REQUEST\" block found; send a PEM-encoded PKCS#10 CSR")]
    NotPem,
    #[error("expected exactly one CSR, found {0} PEM blocks; send one CSR per request")]
    NotExactlyOne(usize),
    #[error("the CSR is not valid PKCS#10: {0}")]
    Unparsable(String),
    #[error(
        "key algorithm {found} is not allowed by the DeviceGroup (allowed: {allowed}); generate a key of an allowed type"
    )]
    KeyAlgorithmNotAllowed { found: String, allowed: String },
    #[error("RSA key has {bits} bits; the DeviceGroup allows {min} to {max}")]
    RsaKeySizeNotAllowed { bits: usize, min: u32, max: u32 },
    #[error("signature algorithm {0} is not allowed; sign the CSR with SHA-256 or stronger")]
    SignatureAlgorithmNotAllowed(String),
    #[error(
        "the CSR's self-signature does not verify: the requester has not proven it holds the private key"
    )]
    BadSignature,
    #[error(
        "the CSR's public key (SHA-256 {actual}) is not the key pinned in spec.identity.publicKeySha256 ({expected})"
    )]
    PublicKeyPinMismatch { actual: String, expected: String },
    #[error("the URI SAN must be exactly {expected}; the CSR has {found:?}")]
    SpiffeIdMismatch {
        expected: String,
        found: Vec<String>,
    },
    #[error("only the SPIFFE ID URI SAN is allowed; the CSR also requests {0}")]
    ExtraSubjectAltNames(String),
    #[error("the subject must be empty or CN={expected}; the CSR has {found:?}")]
    SubjectNotAllowed { expected: String, found: String },
    #[error(
        "the CSR asks for a CA certificate (basicConstraints CA:TRUE); device certificates cannot sign"
    )]
    CaRequested,
    #[error("the CSR asks for key usages beyond digitalSignature ({0})")]
    KeyUsageNotAllowed(String),
    #[error("the CSR asks for extended key usages beyond clientAuth ({0})")]
    ExtendedKeyUsageNotAllowed(String),
    #[error("the CSR asks for extension {0}, which device certificates may not carry")]
    ExtensionNotAllowed(String),
}

impl Denial {
    /// Stable CamelCase reason for conditions, Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::TooLarge { .. } => "CsrTooLarge",
            Denial::NotPem => "CsrNotPem",
            Denial::NotExactlyOne(_) => "CsrNotExactlyOne",
            Denial::Unparsable(_) => "CsrUnparsable",
            Denial::KeyAlgorithmNotAllowed { .. } => "KeyAlgorithmNotAllowed",
            Denial::RsaKeySizeNotAllowed { .. } => "RsaKeySizeNotAllowed",
            Denial::SignatureAlgorithmNotAllowed(_) => "SignatureAlgorithmNotAllowed",
            Denial::BadSignature => "BadCsrSignature",
            Denial::PublicKeyPinMismatch { .. } => "PublicKeyPinMismatch",
            Denial::SpiffeIdMismatch { .. } => "SpiffeIdMismatch",
            Denial::ExtraSubjectAltNames(_) => "ExtraSubjectAltNames",
            Denial::SubjectNotAllowed { .. } => "SubjectNotAllowed",
            Denial::CaRequested => "CaRequested",
            Denial::KeyUsageNotAllowed(_) => "KeyUsageNotAllowed",
            Denial::ExtendedKeyUsageNotAllowed(_) => "ExtendedKeyUsageNotAllowed",
            Denial::ExtensionNotAllowed(_) => "ExtensionNotAllowed",
        }
    }

    /// Every reason [`Denial::reason`] can return, for metrics that pre-register them.
    pub const REASONS: &'static [&'static str] = &[
        "CsrTooLarge",
        "CsrNotPem",
        "CsrNotExactlyOne",
        "CsrUnparsable",
        "KeyAlgorithmNotAllowed",
        "RsaKeySizeNotAllowed",
        "SignatureAlgorithmNotAllowed",
        "BadCsrSignature",
        "PublicKeyPinMismatch",
        "SpiffeIdMismatch",
        "ExtraSubjectAltNames",
        "SubjectNotAllowed",
        "CaRequested",
        "KeyUsageNotAllowed",
        "ExtendedKeyUsageNotAllowed",
        "ExtensionNotAllowed",
    ];
}

/// Decodes exactly one PEM CSR block into DER.
pub fn decode_pem(pem: &str) -> Result<Vec<u8>, Denial> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(Denial::TooLarge { size: pem.len() });
    }
    let mut blocks = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        match block {
            Ok(b) => blocks.push(b),
            Err(_) if blocks.is_empty() => return Err(Denial::NotPem),
            Err(_) => break,
        }
    }
    match blocks.len() {
        0 => Err(Denial::NotPem),
        1 if matches!(
            blocks[0].label.as_str(),
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
        ) =>
        {
            Ok(blocks.remove(0).contents)
        }
        1 => Err(Denial::NotPem),
        n => Err(Denial::NotExactlyOne(n)),
    }
}

/// Checks a PEM CSR against the policy.
pub fn check(pem: &str, policy: &Policy<'_>) -> Result<Accepted, Denial> {
    let der = decode_pem(pem)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| Denial::Unparsable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Denial::Unparsable("trailing bytes after the CSR".into()));
    }
    let info = &csr.certification_request_info;

    let algorithm = key_algorithm(&info.subject_pki, policy.keys)?;
    let sig_oid = &csr.signature_algorithm.algorithm;
    let strong = [
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ECDSA_WITH_SHA512,
        OID_SIG_ED25519,
    ];
    if !strong.contains(sig_oid) {
        return Err(Denial::SignatureAlgorithmNotAllowed(sig_oid.to_id_string()));
    }
    csr.verify_signature().map_err(|_| Denial::BadSignature)?;

    let public_key_sha256 = hex_sha256(info.subject_pki.raw);
    if let Some(expected) = policy.pinned_public_key_sha256
        && !expected.eq_ignore_ascii_case(&public_key_sha256)
    {
        return Err(Denial::PublicKeyPinMismatch {
            actual: public_key_sha256,
            expected: expected.to_string(),
        });
    }

    check_extensions(&csr, policy)?;
    check_subject(&csr, policy)?;

    Ok(Accepted {
        sha256: hex_sha256(&der),
        der,
        public_key_sha256,
        algorithm,
    })
}

fn key_algorithm(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
    keys: &KeyPolicy,
) -> Result<KeyAlgorithm, Denial> {
    let oid = &spki.algorithm.algorithm;
    let (algorithm, name) = if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => {
                (Some(KeyAlgorithm::EcdsaP256), "ECDSA-P256".to_string())
            }
            Some(c) if c == OID_NIST_EC_P384 => {
                (Some(KeyAlgorithm::EcdsaP384), "ECDSA-P384".to_string())
            }
            Some(c) => (None, format!("ECDSA on curve {}", c.to_id_string())),
            None => (None, "ECDSA without a named curve".to_string()),
        }
    } else if *oid == OID_SIG_ED25519 {
        (Some(KeyAlgorithm::Ed25519), "Ed25519".to_string())
    } else if *oid == OID_PKCS1_RSAENCRYPTION {
        (Some(KeyAlgorithm::Rsa), "RSA".to_string())
    } else {
        (None, oid.to_id_string())
    };
    let allowed_names = || {
        keys.algorithms
            .iter()
            .map(|a| {
                serde_json::to_value(a)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(algorithm) = algorithm.filter(|a| keys.algorithms.contains(a)) else {
        return Err(Denial::KeyAlgorithmNotAllowed {
            found: name,
            allowed: allowed_names(),
        });
    };
    if algorithm == KeyAlgorithm::Rsa {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa_bits(rsa.modulus),
            _ => return Err(Denial::Unparsable("RSA public key does not parse".into())),
        };
        if bits < keys.rsa_min_bits as usize || bits > keys.rsa_max_bits as usize {
            return Err(Denial::RsaKeySizeNotAllowed {
                bits,
                min: keys.rsa_min_bits,
                max: keys.rsa_max_bits,
            });
        }
    }
    Ok(algorithm)
}

/// Bit length of a big-endian modulus.
fn rsa_bits(modulus: &[u8]) -> usize {
    let significant: &[u8] = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    (significant.len() - 1) * 8 + (8 - significant[0].leading_zeros() as usize)
}

fn check_extensions(csr: &X509CertificationRequest<'_>, policy: &Policy<'_>) -> Result<(), Denial> {
    let mut uris = Vec::new();
    let mut others = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(uri) => uris.push(uri.to_string()),
                        GeneralName::DNSName(d) => others.push(format!("DNS:{d}")),
                        GeneralName::RFC822Name(e) => others.push(format!("email:{e}")),
                        GeneralName::IPAddress(ip) => others.push(format!("IP:{}", ip_text(ip))),
                        other => others.push(format!("{other:?}")),
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(Denial::CaRequested),
            ParsedExtension::BasicConstraints(_) => {}
            ParsedExtension::KeyUsage(ku) => {
                let beyond = ku.flags & !1; // bit 0 is digitalSignature
                if beyond != 0 {
                    return Err(Denial::KeyUsageNotAllowed(ku.to_string()));
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let mut extra = Vec::new();
                for (set, name) in [
                    (eku.any, "anyExtendedKeyUsage"),
                    (eku.server_auth, "serverAuth"),
                    (eku.code_signing, "codeSigning"),
                    (eku.email_protection, "emailProtection"),
                    (eku.time_stamping, "timeStamping"),
                    (eku.ocsp_signing, "OCSPSigning"),
                ] {
                    if set {
                        extra.push(name.to_string());
                    }
                }
                extra.extend(eku.other.iter().map(|o| o.to_id_string()));
                if !extra.is_empty() {
                    return Err(Denial::ExtendedKeyUsageNotAllowed(extra.join(", ")));
                }
            }
            ParsedExtension::SubjectKeyIdentifier(_) => {}
            ParsedExtension::UnsupportedExtension { oid } => {
                return Err(Denial::ExtensionNotAllowed(oid.to_id_string()));
            }
            other => {
                return Err(Denial::ExtensionNotAllowed(
                    format!("{other:?}").chars().take(60).collect(),
                ));
            }
        }
    }
    if uris.len() != 1 || uris[0] != policy.spiffe_id {
        return Err(Denial::SpiffeIdMismatch {
            expected: policy.spiffe_id.to_string(),
            found: uris,
        });
    }
    if !others.is_empty() {
        return Err(Denial::ExtraSubjectAltNames(others.join(", ")));
    }
    Ok(())
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        _ => format!("{bytes:02x?}"),
    }
}

fn check_subject(csr: &X509CertificationRequest<'_>, policy: &Policy<'_>) -> Result<(), Denial> {
    let subject = &csr.certification_request_info.subject;
    let mut attributes = subject.iter_attributes();
    let only_cn = match (attributes.next(), attributes.next()) {
        (None, _) => return Ok(()),
        (Some(first), None)
            if first.attr_type() == &x509_parser::oid_registry::OID_X509_COMMON_NAME =>
        {
            first.as_str().ok()
        }
        _ => None,
    };
    match only_cn {
        Some(cn) if cn == policy.device_name || cn == policy.spiffe_id => Ok(()),
        _ => Err(Denial::SubjectNotAllowed {
            expected: policy.device_name.to_string(),
            found: subject.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
        PKCS_ED25519, PKCS_RSA_SHA256, PublicKeyData, SanType,
    };

    const SPIFFE: &str = "spiffe://fleet.example/ns/plant/device/plc-1";

    fn keys() -> KeyPolicy {
        KeyPolicy::default()
    }

    fn policy<'a>(keys: &'a KeyPolicy, pin: Option<&'a str>) -> Policy<'a> {
        Policy {
            device_name: "plc-1",
            spiffe_id: SPIFFE,
            keys,
            pinned_public_key_sha256: pin,
        }
    }

    fn params(sans: Vec<SanType>, cn: Option<&str>) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        p.distinguished_name = dn;
        p
    }

    fn spiffe_san() -> Vec<SanType> {
        vec![SanType::URI(SPIFFE.try_into().unwrap())]
    }

    fn csr(p: &CertificateParams, key: &KeyPair) -> String {
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn ec_key() -> KeyPair {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
    }

    #[test]
    fn a_well_formed_device_csr_is_accepted_for_every_default_algorithm() {
        let k = keys();
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let pem = csr(&params(spiffe_san(), Some("plc-1")), &key);
            let accepted = check(&pem, &policy(&k, None)).unwrap();
            assert_eq!(
                accepted.public_key_sha256,
                hex_sha256(&key.subject_public_key_info())
            );
            assert_eq!(accepted.sha256.len(), 64);
        }
    }

    #[test]
    fn the_pinned_key_must_match() {
        let k = keys();
        let key = ec_key();
        let pem = csr(&params(spiffe_san(), None), &key);
        let right = hex_sha256(&key.subject_public_key_info());
        assert!(check(&pem, &policy(&k, Some(&right))).is_ok());
        let wrong = "0".repeat(64);
        let denial = check(&pem, &policy(&k, Some(&wrong))).unwrap_err();
        assert_eq!(denial.reason(), "PublicKeyPinMismatch");
    }

    #[test]
    fn a_csr_for_another_device_or_with_extra_names_is_denied() {
        let k = keys();
        let other = vec![SanType::URI(
            "spiffe://fleet.example/ns/plant/device/plc-2"
                .try_into()
                .unwrap(),
        )];
        let d = check(&csr(&params(other, None), &ec_key()), &policy(&k, None)).unwrap_err();
        assert_eq!(d.reason(), "SpiffeIdMismatch");
        assert!(d.to_string().contains(SPIFFE), "{d}");

        let none = check(
            &csr(&params(vec![], Some("plc-1")), &ec_key()),
            &policy(&k, None),
        )
        .unwrap_err();
        assert_eq!(none.reason(), "SpiffeIdMismatch");

        let mut sans = spiffe_san();
        sans.push(SanType::DnsName("evil.example.com".try_into().unwrap()));
        let d = check(&csr(&params(sans, None), &ec_key()), &policy(&k, None)).unwrap_err();
        assert_eq!(d.reason(), "ExtraSubjectAltNames");
        assert!(d.to_string().contains("DNS:evil.example.com"));
    }

    #[test]
    fn the_subject_may_only_name_the_device() {
        let k = keys();
        let d = check(
            &csr(&params(spiffe_san(), Some("plc-2")), &ec_key()),
            &policy(&k, None),
        )
        .unwrap_err();
        assert_eq!(d.reason(), "SubjectNotAllowed");
        let mut p = params(spiffe_san(), Some("plc-1"));
        p.distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        let d = check(&csr(&p, &ec_key()), &policy(&k, None)).unwrap_err();
        assert_eq!(d.reason(), "SubjectNotAllowed");
        assert!(
            check(
                &csr(&params(spiffe_san(), Some(SPIFFE)), &ec_key()),
                &policy(&k, None)
            )
            .is_ok()
        );
    }

    #[test]
    fn ca_and_extra_usages_are_denied() {
        let k = keys();
        let mut p = params(spiffe_san(), None);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(
            check(&csr(&p, &ec_key()), &policy(&k, None))
                .unwrap_err()
                .reason(),
            "CaRequested"
        );

        let mut p = params(spiffe_san(), None);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        assert_eq!(
            check(&csr(&p, &ec_key()), &policy(&k, None))
                .unwrap_err()
                .reason(),
            "KeyUsageNotAllowed"
        );

        let mut p = params(spiffe_san(), None);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let d = check(&csr(&p, &ec_key()), &policy(&k, None)).unwrap_err();
        assert_eq!(d.reason(), "ExtendedKeyUsageNotAllowed");
        assert!(d.to_string().contains("serverAuth"));

        let mut p = params(spiffe_san(), None);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        assert!(check(&csr(&p, &ec_key()), &policy(&k, None)).is_ok());
    }

    #[test]
    fn key_algorithms_follow_the_group_policy() {
        let only_p384 = KeyPolicy {
            algorithms: vec![KeyAlgorithm::EcdsaP384],
            ..KeyPolicy::default()
        };
        let d = check(
            &csr(&params(spiffe_san(), None), &ec_key()),
            &policy(&only_p384, None),
        )
        .unwrap_err();
        assert_eq!(d.reason(), "KeyAlgorithmNotAllowed");
        assert!(
            d.to_string().contains("ECDSA-P256") && d.to_string().contains("allowed: ECDSA-P384"),
            "{d}"
        );
    }

    #[test]
    fn rsa_keys_must_be_within_the_allowed_size() {
        let k = keys();
        // rcgen cannot generate RSA keys; this RSA-2048 key was made with `openssl genrsa 2048`.
        let key = KeyPair::from_pem_and_sign_algo(RSA_2048_KEY, &PKCS_RSA_SHA256).unwrap();
        let pem = csr(&params(spiffe_san(), None), &key);
        assert_eq!(
            check(&pem, &policy(&k, None)).unwrap().algorithm,
            KeyAlgorithm::Rsa
        );
        let strict = KeyPolicy {
            rsa_min_bits: 3072,
            ..KeyPolicy::default()
        };
        let d = check(&pem, &policy(&strict, None)).unwrap_err();
        assert_eq!(
            d,
            Denial::RsaKeySizeNotAllowed {
                bits: 2048,
                min: 3072,
                max: 4096
            }
        );
    }

    #[test]
    fn malformed_input_is_denied_without_panicking() {
        let k = keys();
        let p = policy(&k, None);
        assert_eq!(check("hello", &p).unwrap_err().reason(), "CsrNotPem");
        assert_eq!(
            check(&"A".repeat(MAX_CSR_PEM_BYTES + 1), &p)
                .unwrap_err()
                .reason(),
            "CsrTooLarge"
        );
        let garbage =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAECAwQF\n-----END CERTIFICATE REQUEST-----\n";
        assert_eq!(check(garbage, &p).unwrap_err().reason(), "CsrUnparsable");
        let one = csr(&params(spiffe_san(), None), &ec_key());
        assert_eq!(
            check(&format!("{one}{one}"), &p).unwrap_err().reason(),
            "CsrNotExactlyOne"
        );
        let cert_block = one.replace("CERTIFICATE REQUEST", "CERTIFICATE");
        assert_eq!(check(&cert_block, &p).unwrap_err().reason(), "CsrNotPem");
        // Every prefix of a valid CSR is refused, never accepted and never a panic.
        let der = decode_pem(&one).unwrap();
        for len in 0..der.len() {
            let pem = pem_of(&der[..len]);
            assert!(check(&pem, &p).is_err(), "prefix of {len} bytes accepted");
        }
    }

    #[test]
    fn a_tampered_csr_fails_proof_of_possession() {
        let k = keys();
        let pem = csr(&params(spiffe_san(), Some("plc-1")), &ec_key());
        let mut der = decode_pem(&pem).unwrap();
        // Flip one bit in the subject CN ("plc-1" -> "plc-0"): still parses, signature breaks.
        let pos = der.windows(5).position(|w| w == b"plc-1").unwrap();
        der[pos + 4] = b'0';
        let tampered = pem_of(&der);
        let policy = Policy {
            device_name: "plc-0",
            ..policy(&k, None)
        };
        assert_eq!(
            check(&tampered, &policy).unwrap_err().reason(),
            "BadCsrSignature"
        );
    }

    #[test]
    fn every_denial_has_a_distinct_listed_reason() {
        let all = [
            Denial::TooLarge { size: 0 },
            Denial::NotPem,
            Denial::NotExactlyOne(2),
            Denial::Unparsable(String::new()),
            Denial::KeyAlgorithmNotAllowed {
                found: String::new(),
                allowed: String::new(),
            },
            Denial::RsaKeySizeNotAllowed {
                bits: 0,
                min: 0,
                max: 0,
            },
            Denial::SignatureAlgorithmNotAllowed(String::new()),
            Denial::BadSignature,
            Denial::PublicKeyPinMismatch {
                actual: String::new(),
                expected: String::new(),
            },
            Denial::SpiffeIdMismatch {
                expected: String::new(),
                found: vec![],
            },
            Denial::ExtraSubjectAltNames(String::new()),
            Denial::SubjectNotAllowed {
                expected: String::new(),
                found: String::new(),
            },
            Denial::CaRequested,
            Denial::KeyUsageNotAllowed(String::new()),
            Denial::ExtendedKeyUsageNotAllowed(String::new()),
            Denial::ExtensionNotAllowed(String::new()),
        ];
        let reasons: std::collections::HashSet<_> = all.iter().map(Denial::reason).collect();
        assert_eq!(reasons.len(), all.len(), "two denials share a reason");
        let listed: std::collections::HashSet<_> = Denial::REASONS.iter().copied().collect();
        assert_eq!(reasons, listed, "Denial::REASONS is out of date");
    }

    fn pem_of(der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let body: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            body.join("\n")
        )
    }

    const RSA_2048_KEY: &str = include_str!("../testdata/rsa-2048.key");
}
