//! OmniRelay's integration suite: one test binary, one module per area.
//!
//! Every test provisions what it needs through the harness in `src/`
//! (throwaway PostgreSQL and Redis); none skips when a server is missing.

mod cli;
mod drill;
mod durable;
mod effects;
mod forward;
mod harness;
mod mesh;
mod names;
mod objectstore;
mod ops;
mod recovery;
mod sinks;

// HTTP/1.1 over a raw socket, from the harness (its sidecars probe with it).
use omnirelay_tests::http;
