//! Operations: TLS and mutual TLS, TLS to PostgreSQL, health and readiness,
//! the admin endpoints, graceful shutdown, and the embedded SQLite store.

mod binary;
mod database_tls;
mod pki;
mod serving;
mod shutdown;
mod sqlite;
mod tls;
