//! The operator commands that read or repair queues and logs:
//!
//! - [`queue`]: against a node, over its HTTP/JSON surface and diagnostics:
//!   `dead-letters list|show|redrive|purge` and `queue show`;
//! - [`log`]: against the hub, over gRPC: `subscribers lag`, `verify`,
//!   `snapshot show` and `inspect --at` (time travel: a queue's state at a
//!   point of its log, replayed with the client's own recovery).
//!
//! Every command returns an [`Outcome`]: the JSON document `--output json`
//! prints, the text printed otherwise, and the exit status.

pub mod log;
pub mod queue;

use std::io::IsTerminal as _;

use serde_json::Value;

/// What a command prints and how it exits.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The `--output json` document.
    pub json: Value,
    /// The text form.
    pub text: String,
    /// The process exit status (0: success).
    pub code: u8,
}

impl Outcome {
    /// A successful outcome.
    pub fn ok(json: Value, text: String) -> Self {
        Self { json, text, code: 0 }
    }
}

/// A progress bar on stderr for `len` steps, drawn only when stderr is a
/// terminal (scripts, pipes and tests see nothing).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let target = if std::io::stderr().is_terminal() {
        indicatif::ProgressDrawTarget::stderr()
    } else {
        indicatif::ProgressDrawTarget::hidden()
    };
    let bar = indicatif::ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}

/// An RFC 3339 time (UTC) of a timestamp in nanoseconds since the epoch.
pub fn rfc3339(nanos: u64) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .ok()
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

/// A JSON string field, or `""`.
fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}
