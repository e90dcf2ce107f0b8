//! Manufacturer (IDevID) certificates: a device without a Fleetwarden identity may enroll with
//! the certificate its manufacturer installed, if it chains to the CA bundle its DeviceGroup
//! trusts. The chain is checked with rustls' WebPKI verifier for client certificates (validity
//! period, signatures, client-auth usage where the certificate restricts usage).

use std::sync::Arc;

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// Checks `chain` (leaf first, as the client sent it) against the PEM `bundle`.
pub fn verify_chain(bundle: &str, chain: &[CertificateDer<'static>]) -> Result<(), String> {
    let (leaf, intermediates) = chain.split_first().ok_or("no client certificate")?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        let cert = cert.map_err(|e| format!("the manufacturer CA bundle is not PEM: {e}"))?;
        roots.add(cert).map_err(|e| {
            format!("the manufacturer CA bundle holds an unusable certificate: {e}")
        })?;
    }
    if roots.is_empty() {
        return Err("the manufacturer CA bundle holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("cannot use the manufacturer CA bundle: {e}"))?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = p.self_signed(&key).unwrap().pem();
        (pem, Issuer::new(p, key))
    }

    fn idevid(issuer: &Issuer<'static, KeyPair>) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "APC3-2291-0041");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.signed_by(&KeyPair::generate().unwrap(), issuer)
            .unwrap()
            .der()
            .clone()
    }

    #[test]
    fn a_certificate_from_the_trusted_manufacturer_is_accepted() {
        let (bundle, issuer) = ca("Acme IDevID CA");
        assert_eq!(verify_chain(&bundle, &[idevid(&issuer)]), Ok(()));
    }

    #[test]
    fn a_certificate_from_another_manufacturer_is_refused() {
        let (bundle, _) = ca("Acme IDevID CA");
        let (_, other) = ca("Mallory CA");
        assert!(verify_chain(&bundle, &[idevid(&other)]).is_err());
    }

    #[test]
    fn a_broken_bundle_says_so() {
        let (_, issuer) = ca("Acme IDevID CA");
        let err = verify_chain("garbage", &[idevid(&issuer)]).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        assert!(verify_chain("x", &[]).is_err());
    }
}
