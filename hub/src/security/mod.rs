//! Who is calling and what they may do: TLS ([`tls`]), accepted connections
//! with their principal ([`transport`], [`principal`]), the access table and
//! protected mode ([`access`]), and per-principal stream limits ([`quota`]).

pub mod access;
pub mod principal;
pub mod quota;
pub mod tls;
pub mod transport;
