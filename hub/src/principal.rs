//! The caller's identity, taken from its verified TLS client certificate.
//!
//! The rule: the first URI
//! subject alternative name (a SPIFFE id such as
//! `spiffe://prod.example/ns/queues/sa/dispatcher`), else the first DNS
//! subject alternative name. Never the subject's common name: CNs are free
//! text that CAs do not constrain, and RFC 6125 deprecates them as
//! identities. A certificate with neither kind of name has no principal, and
//! the hub refuses the connection (see [`crate::transport`]). The mesh node
//! is stricter with its callers (exactly one URI SAN; see the client's
//! principal binding), since its principals key authorization rules; both
//! read certificates with the same parser, `x509-cert`.

use std::fmt;

use rustls::pki_types::CertificateDer;
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

/// An authenticated caller, e.g. `spiffe://prod.example/sa/dispatcher`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal(String);

/// Why no principal could be taken from a certificate.
#[derive(Debug, thiserror::Error)]
pub enum PrincipalError {
    /// The certificate does not decode (rustls verified its signature, so
    /// this means an encoding x509-cert does not support).
    #[error("the client certificate does not decode")]
    Malformed(#[source] x509_cert::der::Error),
    /// The certificate has no URI or DNS subject alternative name.
    #[error("the client certificate has no URI or DNS subject alternative name")]
    NoSubjectAltName,
}

impl Principal {
    /// A principal from a known name (tests, internal callers).
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The principal's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Takes the principal from a (verified) certificate: the first URI SAN,
    /// else the first DNS SAN.
    pub fn from_certificate(certificate: &CertificateDer<'_>) -> Result<Self, PrincipalError> {
        let certificate = Certificate::from_der(certificate.as_ref()).map_err(PrincipalError::Malformed)?;
        let names = match certificate.tbs_certificate.get::<SubjectAltName>().map_err(PrincipalError::Malformed)? {
            Some((_critical, SubjectAltName(names))) => names,
            None => return Err(PrincipalError::NoSubjectAltName),
        };
        let first = |want_uri: bool| {
            names.iter().find_map(|name| match name {
                GeneralName::UniformResourceIdentifier(uri) if want_uri => Some(uri.as_str()),
                GeneralName::DnsName(dns) if !want_uri => Some(dns.as_str()),
                _ => None,
            })
        };
        first(true)
            .or_else(|| first(false))
            .filter(|name| !name.is_empty())
            .map(|name| Self(name.to_string()))
            .ok_or(PrincipalError::NoSubjectAltName)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn certificate(common_name: &str, sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("key generation should work");
        params.self_signed(&key).expect("self-signing should work").der().clone()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().expect("valid IA5 string"))
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().expect("valid IA5 string"))
    }

    #[test]
    fn uri_san_wins_over_dns_san() {
        let cert =
            certificate("ignored-cn", vec![dns("dispatcher.example"), uri("spiffe://prod.example/sa/dispatcher")]);
        let principal = Principal::from_certificate(&cert).expect("should have a principal");
        assert_eq!(principal.as_str(), "spiffe://prod.example/sa/dispatcher");
    }

    #[test]
    fn dns_san_is_used_without_uri_san() {
        let cert = certificate("ignored-cn", vec![dns("dispatcher.example"), dns("second.example")]);
        assert_eq!(Principal::from_certificate(&cert).expect("principal").as_str(), "dispatcher.example");
    }

    #[test]
    fn common_name_is_never_the_principal() {
        let cert = certificate("dispatcher", vec![]);
        assert!(matches!(Principal::from_certificate(&cert), Err(PrincipalError::NoSubjectAltName)));
        let cert = certificate("dispatcher", vec![SanType::IpAddress([127, 0, 0, 1].into())]);
        assert!(matches!(Principal::from_certificate(&cert), Err(PrincipalError::NoSubjectAltName)));
    }

    #[test]
    fn garbage_is_malformed() {
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x01, 0xff]);
        assert!(matches!(Principal::from_certificate(&garbage), Err(PrincipalError::Malformed(_))));
    }
}
