//! The hub's integration tests: one binary, one module per area. Tests that
//! need PostgreSQL get it from the harness (`omnirelay-tests`); none skips.

mod operations;
