//! A running replica: the server that opens the store and serves
//! (`server`, whose `Hub` the crate root exports), readiness ([`health`]), the admin HTTP server ([`admin`]) and
//! the graceful stop ([`shutdown`]).

pub mod admin;
pub mod health;
pub(crate) mod server;
pub mod shutdown;
