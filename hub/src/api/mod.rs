//! The gRPC surface: the Hub service's handlers ([`service`]), the one pb <->
//! domain conversion ([`wire`]), the one mapping of errors to statuses
//! ([`error`]), and the layer that answers undecodable requests
//! INVALID_ARGUMENT ([`decoding`]).

pub mod decoding;
pub mod error;
pub mod service;
pub mod wire;
