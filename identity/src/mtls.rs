//! Identity from a client certificate: its SAN URI, never its CN.

use rustls::pki_types::CertificateDer;
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::connection::ClientCertChain;
use crate::error::CredentialError;

/// Reads the principal of a verified client certificate: its single URI
/// subject alternative name (a SPIFFE ID such as
/// `spiffe://omnirelay.example/worker/7`). The subject CN is never used: it
/// is free text that CAs fill inconsistently, while the SAN URI is the
/// identity the CA vouched for.
pub fn san_uri(chain: &ClientCertChain) -> Result<String, CredentialError> {
    let leaf = chain.leaf().ok_or(CredentialError::ClientCertificateRequired)?;
    certificate_san_uri(leaf)
}

/// [`san_uri`] of one certificate (the leaf a TLS acceptor verified).
pub fn certificate_san_uri(leaf: &CertificateDer<'_>) -> Result<String, CredentialError> {
    let certificate = Certificate::from_der(leaf.as_ref()).map_err(|_| CredentialError::ClientCertificateUnparsable)?;
    let san = certificate
        .tbs_certificate
        .get::<SubjectAltName>()
        .map_err(|_| CredentialError::ClientCertificateUnparsable)?;
    let mut uris = san.iter().flat_map(|(_critical, SubjectAltName(names))| names.iter()).filter_map(|name| {
        if let GeneralName::UniformResourceIdentifier(uri) = name { Some(uri.as_str()) } else { None }
    });
    let uri = uris.next().ok_or(CredentialError::NoSanUri)?;
    if uris.next().is_some() {
        return Err(CredentialError::SeveralSanUris);
    }
    Ok(uri.to_string())
}

/// SHA-256 of the leaf certificate's DER, lowercase hex: the same thumbprint a
/// TLS-terminating proxy sends in `x-mtls-thumbprint`.
pub fn thumbprint(chain: &ClientCertChain) -> Option<String> {
    let leaf = chain.leaf()?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    Some(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}
