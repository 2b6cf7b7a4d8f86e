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
mod http;
mod mesh;
mod names;
mod objectstore;
mod ops;
mod recovery;
mod sinks;
