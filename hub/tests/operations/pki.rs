//! A throwaway certificate authority, generated with rcgen at test time.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// A certificate and its key, in PEM.
pub(super) struct Issued {
    pub(super) cert_pem: String,
    pub(super) key_pem: String,
}

/// A CA that issues leaf certificates, and a directory to write PEM files to.
pub(super) struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Pki {
    pub(super) fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key generation should work");
        let ca = CertifiedIssuer::self_signed(params, key).expect("CA self-signing should work");
        Self { ca, dir: tempfile::tempdir().expect("temporary directory") }
    }

    pub(super) fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf certificate with these subject alternative names and common name.
    pub(super) fn issue(&self, common_name: &str, sans: Vec<SanType>) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("leaf key generation should work");
        let cert = params.signed_by(&key, &self.ca).expect("signing should work");
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// A leaf certificate like [`Pki::issue`] that expired in 2001.
    pub(super) fn issue_expired(&self, sans: Vec<SanType>) -> Issued {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "expired");
        params.subject_alt_names = sans;
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let key = KeyPair::generate().expect("leaf key generation should work");
        let cert = params.signed_by(&key, &self.ca).expect("signing should work");
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub(super) fn server(&self) -> Issued {
        self.issue("hub-server", vec![dns("localhost"), SanType::IpAddress([127, 0, 0, 1].into())])
    }

    /// Writes `contents` to a file in the PKI's directory.
    pub(super) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("writing a PEM file should work");
        path
    }
}

pub(super) fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("valid DNS name"))
}

pub(super) fn uri(name: &str) -> SanType {
    SanType::URI(name.try_into().expect("valid URI"))
}
