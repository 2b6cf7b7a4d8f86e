//! Backpressure: how a queue tells the rest of the node to slow down.
//!
//! A queue turns its signal on when pending items reach the high watermark
//! and off when they fall to the low watermark (hysteresis), records each
//! flip as a `BackpressureChanged` event, and then calls every registered
//! [`BackpressureListener`]. Two listeners ship here:
//!
//! - [`BackpressureDiagnostics`] keeps the latest signal and a bounded stream
//!   of transitions, for `/omnirelay/control/backpressure` and CLI watchers;
//! - [`BackpressureAwareConcurrencyLimiter`] swaps a tower concurrency limit between
//!   a normal and a backpressure budget
//!   ([`BackpressureAwareConcurrencyLimitLayer`]).

mod diagnostics;
mod limiter;

pub use diagnostics::{BackpressureDiagnostics, BackpressureTransitions, Lagged};
pub use limiter::{
    BackpressureAwareConcurrencyLimit, BackpressureAwareConcurrencyLimitLayer, BackpressureAwareConcurrencyLimiter,
};

use crate::clock::Timestamp;
use crate::ids::ShardId;

/// Backpressure state of a queue, as listeners and rejected producers see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackpressureSignal {
    /// True while enqueues are shed: pending reached `high` and has not yet
    /// fallen to `low`.
    pub active: bool,
    /// Pending items when observed.
    pub pending: u64,
    /// High watermark.
    pub high: u64,
    /// Low watermark.
    pub low: u64,
    /// When observed.
    pub observed_at: Timestamp,
    /// Queue the signal belongs to.
    pub shard: ShardId,
}

/// Receives a queue's backpressure transitions.
///
/// Called synchronously by the queue right after it applied a
/// `BackpressureChanged` event, while the shard is still locked: an
/// implementation must return quickly and never block (hand the signal to a
/// channel or flip an atomic).
pub trait BackpressureListener: Send + Sync + 'static {
    /// Called once per transition, in log order.
    fn on_signal(&self, signal: &BackpressureSignal);
}
