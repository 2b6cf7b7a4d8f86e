//! Limits and timeouts of the mesh node, each with the reason for its value.

use std::time::Duration;

/// Time a lease long-poll or a waiting drain leaves before the call's
/// deadline to write its answer. Without it the deadline would cut the call
/// right as the queue granted an item, and the item would stay leased to a
/// worker that never heard of it until the lease expires.
pub const REPLY_MARGIN: Duration = Duration::from_millis(250);

/// Longest slice of a lease long-poll between two liveness marks of the
/// waiting worker. A worker blocked in a 20 s long-poll is alive; marking it
/// every few seconds keeps it well inside the default 15 s heartbeat grace.
/// The slice is also capped at a third of the configured grace.
pub const LEASE_POLL_SLICE: Duration = Duration::from_secs(5);

/// Longest lease owner a worker may name, in bytes. The node stores owners
/// qualified by the caller's principal (up to 512 bytes) in every lease
/// event; 256 more fits any worker id, host name or UUID.
pub const MAX_OWNER_BYTES: usize = 256;

/// Concurrent calls per namespace while its queue is not under backpressure.
/// Far above what one queue's shard lock can serve at once, so it only stops
/// a stampede from piling up unbounded work.
pub const CONCURRENCY_LIMIT_NORMAL: usize = 1024;

/// Concurrent calls per namespace while its queue is under backpressure: the
/// queue is already shedding enqueues, so the node keeps enough concurrency
/// for workers to drain it and holds the rest back.
pub const CONCURRENCY_LIMIT_BACKPRESSURE: usize = 64;

/// Longest TLS handshake. Real clients finish in a few round trips; a
/// connection that has not finished after this long is a slow-loris.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in flight at once. Each costs a signature; the bound keeps
/// a connection flood from starving the calls already served.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// How long a stopping node waits for calls in flight before it cuts their
/// connections: a lease long-poll is bounded by its deadline, and a drain by
/// the grace operators expect from a rolling restart.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Pause after a failed `accept` (out of file descriptors, say) before the
/// next one, so the accept loop does not spin on a persistent error.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Interval of keep-alive comments on the backpressure event stream, so
/// proxies with idle timeouts (often 60 s) keep the stream open.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// HTTP/2 keepalive ping interval on served connections: a client that
/// vanished without closing (a killed pod) is noticed and its long-polls
/// stop holding queue waiters.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a keepalive ping may go unanswered before the connection is
/// closed.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls one session runs at once; further messages wait, unread, until one
/// is answered (HTTP/2 flow control then holds the client back). As many as
/// the unary calls one HTTP/2 connection may run at once (hyper's default of
/// 200 concurrent streams), so a session never holds fewer calls than the
/// same connection could as unary RPCs, and a session's memory stays bounded
/// by this many messages of the request size limit. Waiting lease
/// long-polls count: a client keeping more than this many waiting opens
/// more sessions.
pub const MAX_SESSION_IN_FLIGHT: usize = 200;
