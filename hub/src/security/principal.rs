//! The caller's identity: the identity layer's [`Principal`], shared with
//! the mesh node.
//!
//! Under mutual TLS a connection's principal is its client certificate's
//! single URI subject alternative name (a SPIFFE id such as
//! `spiffe://prod.example/ns/queues/sa/dispatcher`), never the subject's
//! common name: CNs are free text that CAs do not constrain, and RFC 6125
//! deprecates them as identities. A certificate without exactly one URI SAN
//! is refused at the handshake (see [`crate::security::transport`]). Bearer tokens and
//! trusted-proxy headers bind per request (see [`crate::security::access`]).

pub use omnirelay_identity::Principal;
