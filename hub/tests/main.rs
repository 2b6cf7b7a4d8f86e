//! The hub's integration tests, against real PostgreSQL from the harness
//! (`omnirelay-tests`): one binary, one module per area.

mod support;

mod append;
mod contract;
mod ha;
mod hostile;
mod integrity;
mod operations;
mod restart;
mod schema;
mod security;
mod stall;
mod subscribe;
