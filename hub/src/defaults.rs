//! Every limit, size and timeout of the hub, with the reason for its value.

use std::time::Duration;

/// Longest shard, producer, subscriber or owner id. Ids travel in every
/// notification payload and metric label; 200 bytes fits any sensible
/// namespace with room to spare and keeps payloads far below PostgreSQL's
/// 8,000-byte NOTIFY limit.
pub const MAX_NAME_BYTES: usize = 200;

/// Most events in one append batch. Batches are the unit of idempotency and
/// of the acknowledgement; 10,000 keeps one batch's decode and hashing well
/// under a millisecond per thousand and bounds what one request can pin.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// Largest stored event: the contracts' one limit
/// ([`omnirelay_proto::limits::MAX_EVENT_BYTES`], 1.25 MiB), which leaves an
/// item body of 1 MiB (the client's limit) room for its envelope, so
/// nothing a node accepts is refused here.
pub const MAX_EVENT_BYTES: usize = omnirelay_proto::limits::MAX_EVENT_BYTES;

/// Largest snapshot ([`omnirelay_proto::limits::MAX_SNAPSHOT_BYTES`]). A
/// queue snapshot of a few hundred thousand items fits; it travels in one
/// gRPC message, so it also sets the message limit below.
pub const MAX_SNAPSHOT_BYTES: usize = omnirelay_proto::limits::MAX_SNAPSHOT_BYTES;

/// Largest gRPC message the hub encodes or decodes: a full snapshot plus its
/// frame, or a maximal batch ([`omnirelay_proto::limits::MAX_MESSAGE_BYTES`]).
/// Clients must raise their own limit to match.
pub const MAX_MESSAGE_BYTES: usize = omnirelay_proto::limits::MAX_MESSAGE_BYTES;

/// Most events one group commit writes. Large enough that 64 producers'
/// batches share a transaction (the point of group commit), small enough
/// that one transaction's insert stays in the tens of milliseconds, which
/// bounds the latency a batch waits behind the group before it.
pub const MAX_GROUP_EVENTS: usize = 20_000;

/// Most batches in one group commit (each batch costs a producer record).
pub const MAX_GROUP_BATCHES: usize = 2_000;

/// Group committers per replica, each with its own connection; shards are
/// spread over them by hash so one shard's batches keep their order. Two,
/// because two COPY connections already saturate a two-core database server
/// and more only add lock and WAL contention.
pub const COMMITTERS: usize = 2;

/// Most events queued for commit on one replica before appends are refused
/// with "overloaded": about a second of the target throughput, so a stalled
/// database shows up as fast errors rather than unbounded memory.
pub const MAX_PENDING_EVENTS: usize = 200_000;

/// Connections in the pool: the committers, the live-tail readers, catch-up
/// reads of subscribers, leases and checkpoints. Sixteen keeps a replica's
/// footprint small enough to run a dozen replicas under PostgreSQL's default
/// 100 connections.
pub const POOL_SIZE: usize = 16;

/// Longest wait for a pooled connection, and for a new connection, before a
/// request fails as unavailable. A healthy pool answers in microseconds; two
/// seconds means the database is down, and the caller should hear so fast.
pub const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline of one PostgreSQL operation once it holds a connection: a
/// statement, a read, or an append group's whole transaction. A healthy
/// database answers in milliseconds and a busy one well within a second;
/// five seconds without an answer means it is stalled (paused, partitioned,
/// out of I/O), and callers should hear UNAVAILABLE and fail over rather
/// than hang with it. An append answered so may still commit; its retry is
/// recognised by its producer sequence. Also bounds every call into the
/// embedded store's thread. `--database-timeout` overrides it for
/// PostgreSQL.
pub const DATABASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline of one shard's retention transaction, which may delete a large
/// backlog at once: generous, because a trim cut short is rolled back and
/// redone from scratch next time; bounded, so a stalled database does not
/// hold the retention task forever.
pub const RETENTION_TIMEOUT: Duration = Duration::from_secs(300);

/// Attempts for a transaction that failed with a serialization failure or a
/// deadlock. Both are transient by definition (PostgreSQL chose a victim);
/// three attempts clear them in practice, and a bound keeps a pathological
/// case from retrying forever.
pub const TRANSACTION_ATTEMPTS: u32 = 3;

/// Lease length when the caller gives none: long enough to survive a few
/// missed renewals at a renew-every-third-of-the-TTL cadence, short enough
/// that a dead owner's shard is taken over within seconds.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// Shortest lease: below this, renewals would be a meaningful share of the
/// database's load and clock jitter between a renewer and PostgreSQL would
/// expire leases by accident.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(200);

/// Longest lease: a dead owner blocks its shard until the lease lapses.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(600);

/// Leases a `ListShardLeases` page holds when the request names no limit:
/// a mesh's member leases and shard owners fit in one page.
pub const LIST_LEASES_LIMIT: usize = 1_000;

/// Most leases one `ListShardLeases` page may hold (about 1 MB of answer at
/// 100-byte ids).
pub const MAX_LIST_LEASES_LIMIT: usize = 10_000;

/// Events a `ReadRange` returns when the request names no limit.
pub const READ_RANGE_LIMIT: usize = 1_000;

/// Most events one `ReadRange` may return (about a 10 MB response at
/// typical sizes).
pub const MAX_READ_RANGE_LIMIT: usize = 10_000;

/// Events per catch-up read of a subscription. Large, so a subscriber far
/// behind costs few queries; bounded, so one read's rows stay few.
pub const CATCH_UP_BATCH: usize = 2_000;

/// Room a subscription reserves in its queue (and in the replica's budget)
/// before one catch-up read; the read asks the store for half of it in
/// bodies, leaving the rest for the frames' own fields (sequence, epoch,
/// hashes: about a hundred bytes an event). A megabyte keeps a subscriber
/// far behind at a few reads per megabyte of log, and a catch-up read's
/// memory small.
pub const CATCH_UP_BYTES: usize = 1024 * 1024;

/// Live-tail chunks (one per commit touching the shard) a feed announces
/// to its subscribers before a subscriber that has not looked falls behind
/// and catches up from the store. The announcements are small: the events
/// themselves live in the feed's recent-events cache
/// ([`TAIL_RING_BYTES`]).
pub const TAIL_BUFFER_CHUNKS: usize = 1_024;

/// Bytes of recent events each shard's live tail keeps for its subscribers
/// (drawn from the subscription memory budget, and dropped first when it
/// runs short). Four megabytes covers a few seconds of a busy shard, enough
/// for subscribers that keep up; one further behind reads the store.
pub const TAIL_RING_BYTES: usize = 4 * 1024 * 1024;

/// Bytes of bodies one live-tail read fetches at most (besides
/// [`TAIL_READ_BATCH`] events), so a feed catching up on another replica's
/// large commit holds little at a time.
pub const TAIL_READ_BYTES: usize = 4 * 1024 * 1024;

/// Default of `--subscription-memory`: the bytes one replica may hold for
/// all its subscriptions together (queued frames, their streams' HTTP/2
/// buffers, catch-up reads, the live tails' recent events). A quarter of a
/// gigabyte fits a modest pod beside the rest of the hub, holds about 500
/// idle subscriptions or some fifty stalled ones before anyone is ended, and any
/// snapshot ([`MAX_SNAPSHOT_BYTES`]) with room to spare.
pub const SUBSCRIPTION_MEMORY: usize = 256 * 1024 * 1024;

/// Smallest `--subscription-memory` accepted: a few subscriptions and one
/// large frame. Snapshots larger than the budget cannot be streamed.
pub const MIN_SUBSCRIPTION_MEMORY: usize = 8 * 1024 * 1024;

/// What one open subscription costs outside its queue, held from the budget
/// while it is open: its stream's HTTP/2 send buffer (hyper buffers up to
/// 400 KiB per stream for a client that does not read), its tasks and
/// channels. Decides how many subscriptions a replica admits.
pub const SUBSCRIPTION_OVERHEAD_BYTES: usize = 512 * 1024;

/// What each followed shard adds to a subscription's cost (a task, a
/// live-tail receiver, a lag gauge), held from the budget like
/// [`SUBSCRIPTION_OVERHEAD_BYTES`].
pub const FOLLOWER_OVERHEAD_BYTES: usize = 16 * 1024;

/// Bytes of frames one subscription may have queued for its client. A
/// reader this far behind stops taking live events (which it would hold)
/// and, once it drains, catches up from the store; four megabytes keeps a
/// fast reader's pipe full across a network hiccup.
pub const SUBSCRIPTION_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Largest frame built for a subscriber that is behind (frames are queued
/// for it already): small frames let a slow reader's queue, and what its
/// connection holds, stay small, while a reader that keeps up gets up to
/// [`MAX_FRAME_BYTES`].
pub const LAGGING_FRAME_BYTES: usize = 64 * 1024;

/// How long a subscription may have frames waiting that its client does
/// not take before it is ended (UNAVAILABLE; the client resumes from its
/// checkpoint): a minute tolerates long pauses of a healthy consumer, and
/// frees what a dead or wedged one holds.
pub const SUBSCRIBER_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a subscription asking for budget waits for the bytes of a
/// subscription the budget just ended before judging again.
pub const BUDGET_RETRY: Duration = Duration::from_millis(100);

/// Bytes of bodies one `ReadRange` returns at most (besides its event
/// limit; at least one event), so the answer stays well under the gRPC
/// message limit whatever the events' sizes.
pub const READ_RANGE_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of bodies one page of `omnirelay-hub verify` reads at most.
pub const VERIFY_READ_BYTES: usize = 16 * 1024 * 1024;

/// Idle time after which a subscription gets a progress frame when the
/// request names none: often enough to detect a dead stream within a few
/// seconds, rare enough to cost nothing.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Shortest progress interval a subscriber may ask for.
pub const MIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// How often a pattern subscription looks for shards created since it
/// started, besides the notifications that normally announce them.
pub const PATTERN_RESCAN: Duration = Duration::from_secs(5);

/// Changes buffered for the live tail; a tail that falls further behind
/// resynchronises from the database.
pub const CHANGES_BUFFER: usize = 4_096;

/// Pause before reconnecting the notification listener after it lost its
/// connection, doubled up to [`LISTEN_RETRY_MAX`].
pub const LISTEN_RETRY: Duration = Duration::from_millis(100);

/// Longest pause between notification listener reconnects.
pub const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// Batches one append stream may have awaiting acknowledgement: enough to
/// keep a producer's pipe full across a group commit, few enough that one
/// stream cannot flood the committers.
pub const APPEND_STREAM_IN_FLIGHT: usize = 128;

/// How often a serving replica applies retention to every shard.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// Age after which a checkpoint no longer holds back retention (its
/// subscriber is presumed gone and will get snapshot plus tail).
pub const CHECKPOINT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// PostgreSQL notification channel on which commits announce new heads.
pub const NOTIFY_CHANNEL: &str = "omnirelay_log";

/// Advisory-lock key serialising `omnirelay-hub migrate` runs (ASCII
/// "omnirly" as a number, unlikely to collide with other users' keys).
pub const MIGRATION_LOCK_KEY: i64 = 0x006f_6d6e_6972_6c79;

// Operations: listeners, TLS, health, shutdown, the embedded store.

/// Address the gRPC service listens on when `--listen` is not given.
/// Loopback, so a hub started on a laptop is not reachable from the network
/// by accident; deployments (the Helm chart) set `0.0.0.0:7400`.
pub const LISTEN: &str = "127.0.0.1:7400";

/// Address of the HTTP admin server (`/healthz`, `/readyz`, `/metrics`). The
/// port next to the gRPC one, on loopback for the same reason.
pub const ADMIN_LISTEN: &str = "127.0.0.1:7401";

/// File of the embedded SQLite store used when no database URL is given:
/// in the working directory, so `cargo run -p omnirelay-hub` works anywhere
/// and the file is easy to find (and to delete).
pub const SQLITE_PATH: &str = "omnirelay-hub.db";

/// Upper bound accepted for `--database-pool-size`: more connections than
/// this per replica only add lock contention in PostgreSQL.
pub const POOL_SIZE_MAX: usize = 512;

/// Upper bound accepted for `--committers`: each holds a connection and
/// commits in parallel with the others; beyond a few, they only contend for
/// the same WAL.
pub const COMMITTERS_MAX: usize = 64;

/// How long the server waits for a client's TLS handshake to finish. Slow
/// or silent clients (or port scanners) must not hold an accept slot.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in flight at once; beyond this, new connections wait in
/// the kernel's accept queue. Bounds the memory a connection flood can take.
pub const TLS_HANDSHAKES_IN_FLIGHT: usize = 256;

/// Pause after a failed `accept` (for example EMFILE, too many open files)
/// before trying again, so the loop does not spin a core while the process
/// is out of descriptors.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// How often the health monitor probes the store to keep the gRPC health
/// status current. Kubernetes probes every 10 s by default; probing twice as
/// often flips NOT_SERVING before the next probe sees a stale answer.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// Bound of one readiness probe (a query and the schema-version check): a
/// database that takes longer is not ready for appends either.
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one append failing because the store cannot write (a full disk,
/// a read-only store, an I/O error) keeps the replica not ready when no
/// later append succeeds: long enough for load balancers to act on it (two
/// failed 5 s probes), short enough that a replica whose disk was freed
/// takes traffic again within half a minute, even if nothing could reach it
/// to prove it. Another failing append starts the hold again.
pub const WRITE_FAULT_HOLD: Duration = Duration::from_secs(30);

/// How long shutdown waits for in-flight calls and open streams after the
/// hub stopped accepting connections. Kubernetes' default
/// `terminationGracePeriodSeconds` is 30 s; 20 s leaves time to close the
/// pool and flush logs before SIGKILL.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Default tracing filter: lifecycle at INFO, nothing per request.
pub const LOG_FILTER: &str = "info";
/// Events one live-tail read fetches: a commit rarely adds more, and a tail
/// that fell behind catches up in few queries.
pub const TAIL_READ_BATCH: usize = 5_000;

/// Pause before a live-tail reader retries after the store failed it; short,
/// because subscribers wait on it, and the store's own timeouts already
/// bound how often a dead database is asked.
pub const TAIL_RETRY: Duration = Duration::from_millis(200);

/// Largest events frame sent to a subscriber, under the 4 MiB that gRPC
/// clients accept by default, so subscribers need no special settings.
pub const MAX_FRAME_BYTES: usize = 3 * 1024 * 1024;

/// Events from which a group commit writes its events with binary COPY
/// instead of one array INSERT. COPY costs one more round trip but less
/// server work per row, which pays off from a few hundred rows.
pub const COPY_MIN_EVENTS: usize = 500;

/// Shards whose head a group committer remembers to predict its next group
/// (see the committer module). Past it the memory is cleared: a forgotten
/// shard costs one locking transaction, so the bound only caps memory (a
/// few hundred bytes per shard).
pub const PREDICTED_SHARDS: usize = 16_384;

/// Producers whose latest sequence a group committer remembers, for the
/// same prediction and with the same reasoning as [`PREDICTED_SHARDS`].
pub const PREDICTED_PRODUCERS: usize = 65_536;

/// Most shards one subscription follows (its list plus what its pattern
/// matches, now and later). Each costs a task, a live-tail receiver and a
/// catch-up cursor on the replica; past this, a prefix is better split over
/// several streams (and replicas). A subscription that would exceed it is
/// refused, or ended when its pattern later grows past it, with
/// RESOURCE_EXHAUSTED, never left silently short of a matched shard.
pub const MAX_FOLLOWED_SHARDS: usize = 4_096;

/// How long a live-tail feed that no subscriber holds stays up before its
/// reader retires it: long enough that a subscriber reconnecting after a
/// blip finds it warm, short enough that feeds track the shards in use.
pub const FEED_IDLE_RETIRE: Duration = Duration::from_secs(60);

/// Longest wait for a new live-tail feed to read its shard's head before a
/// subscription fails as unavailable: twice the pool timeout, so one slow
/// connection attempt does not fail it.
pub const FEED_START_TIMEOUT: Duration = Duration::from_secs(4);

/// Append streams one principal may hold open on one replica. A node opens
/// one per hub endpoint it writes through; 256 leaves room for many
/// processes sharing an identity while stopping one caller from holding
/// thousands of streams (each with its in-flight window) on a replica.
pub const MAX_APPEND_STREAMS_PER_PRINCIPAL: usize = 256;

/// Subscriptions one principal may hold open on one replica. Each takes
/// at least `SUBSCRIPTION_OVERHEAD_BYTES` of the shared subscription
/// memory; 256 of them is half the default budget, so one principal cannot
/// starve every other subscriber of the replica.
pub const MAX_SUBSCRIPTIONS_PER_PRINCIPAL: usize = 256;

/// Events per second one principal may append through one replica (a token
/// bucket refilled at this rate). One replica committed 200,000 to 350,000
/// events/s on two cores in the append benchmark (`bench/README.md`); half of
/// the lower figure lets one busy node write as fast as it ever needs while
/// a runaway or hostile producer cannot take the whole replica from others.
pub const APPEND_RATE_PER_PRINCIPAL: f64 = 100_000.0;

/// Events one principal may append at once above its rate (the bucket's
/// size): two seconds at [`APPEND_RATE_PER_PRINCIPAL`], twenty batches of
/// [`MAX_BATCH_EVENTS`], enough for a node catching up after a pause.
pub const APPEND_BURST_PER_PRINCIPAL: u64 = 200_000;

/// Principals whose append buckets are kept before full ones are dropped. A
/// full bucket is the same as no bucket, so dropping it changes nothing; the
/// bound keeps memory flat however many principals come and go.
pub const APPEND_RATE_BUCKETS: usize = 4_096;

/// Checkpoints in one `GetCheckpoints` answer when the caller names no page
/// size: about 100 KiB of response, far below the message limit.
pub const CHECKPOINTS_PAGE: usize = 1_000;

/// Most checkpoints in one `GetCheckpoints` answer, whatever the caller
/// asks: about 1 MiB of response.
pub const MAX_CHECKPOINTS_PAGE: usize = 10_000;
