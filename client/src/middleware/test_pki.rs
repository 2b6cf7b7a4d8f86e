//! A throwaway PKI for tests: a CA, client certificates with chosen SANs and
//! a server certificate, all generated with rcgen. Shared by the unit tests
//! and the TLS integration tests (`#[path]`-included there).

#![allow(dead_code, unreachable_pub)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::CertificateDer;

/// A test certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, DER.
    pub cert_der: CertificateDer<'static>,
}

/// A certificate with its private key.
pub struct TestCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// A subject alternative name of a test certificate.
pub enum San<'a> {
    /// A URI SAN (a SPIFFE id).
    Uri(&'a str),
    /// A DNS SAN.
    Dns(&'a str),
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("self-sign CA");
        Self { cert_pem: cert.pem(), cert_der: cert.der().clone(), issuer: Issuer::new(params, key) }
    }

    /// A client certificate with the given SANs and a CN that must never be
    /// used as the identity.
    pub fn client(&self, sans: &[San<'_>]) -> TestCert {
        self.issue(sans, "cn-is-not-the-principal", ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A server certificate for `dns`.
    pub fn server(&self, dns: &str) -> TestCert {
        self.issue(&[San::Dns(dns)], dns, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn issue(&self, sans: &[San<'_>], cn: &str, usage: ExtendedKeyUsagePurpose) -> TestCert {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san {
                San::Uri(uri) => SanType::URI((*uri).try_into().expect("ASCII URI")),
                San::Dns(dns) => SanType::DnsName((*dns).try_into().expect("ASCII DNS name")),
            })
            .collect();
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        TestCert { cert_pem: cert.pem(), cert_der: cert.der().clone(), key_pem: key.serialize_pem() }
    }
}
