//! `omnirelay sink <kind>` and `omnirelay tail <shard>`: sinks as processes.
//!
//! `sink` runs one of the client's sinks on a hub subscription
//! ([`omnirelay_client::sink::Subscriber`]) until SIGINT or SIGTERM, then
//! flushes and commits its checkpoint. Progress (events applied, each
//! shard's position, checkpoint and lag) goes to stderr every few seconds,
//! or to stdout as JSON lines with `--output json`; `--metrics-listen`
//! serves the runtime's Prometheus metrics.
//!
//! `tail` prints a shard's events as they are appended (from now, or after
//! a sequence), verified like a sink's, and commits nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use omnirelay_client::ShardId;
use omnirelay_client::replication::{HubEndpoint, HubTls};
use omnirelay_client::sink::chain::ShardChain;
use omnirelay_client::sink::projection::ProjectionSink;
use omnirelay_client::sink::projection::lineage::LineageSink;
use omnirelay_client::sink::webhook::{WebhookConfig, WebhookSink};
use omnirelay_client::sink::{
    FsyncPolicy, NdjsonConfig, NdjsonSink, ReplicationSink, Selection, SinkEvent, Subscriber, SubscriberConfig,
    SubscriberProgress, json,
};
use omnirelay_client::{Sequence, sink};
use omnirelay_hub::config::{DatabaseTls, DatabaseTlsMode, DatabaseUrl};
use omnirelay_proto::hub::v1 as pb;
use omnirelay_proto::limits::MAX_MESSAGE_BYTES;
use tokio_util::sync::CancellationToken;

/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where the hub is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct HubArgs {
    /// Hub endpoints (`http://host:7400` or `https://...`; repeat, or
    /// comma-separate), tried in order.
    #[arg(long = "hub", env = "OMNIRELAY_HUB", value_delimiter = ',', required = true)]
    pub hub: Vec<String>,
    /// CA bundle (PEM) that signs the hub's certificate (https endpoints).
    #[arg(long, env = "OMNIRELAY_HUB_CA")]
    pub hub_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS to the hub.
    #[arg(long, env = "OMNIRELAY_HUB_CERT", requires = "hub_key")]
    pub hub_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS to the hub.
    #[arg(long, env = "OMNIRELAY_HUB_KEY", requires = "hub_cert")]
    pub hub_key: Option<PathBuf>,
    /// Name to verify the hub's certificate against, when it differs from
    /// the endpoints' host names.
    #[arg(long, env = "OMNIRELAY_HUB_DOMAIN")]
    pub hub_domain: Option<String>,
}

impl HubArgs {
    fn endpoints(&self) -> Vec<HubEndpoint> {
        self.hub.iter().map(HubEndpoint::new).collect()
    }

    /// A gRPC client of the first endpoint (connected on first use), for
    /// the operator commands that read the hub.
    pub fn client(&self) -> anyhow::Result<pb::hub_client::HubClient<tonic::transport::Channel>> {
        let endpoint = self.endpoints().into_iter().next().context("--hub: name at least one endpoint")?;
        hub_client(&endpoint, self.tls()?.as_ref())
    }

    /// A hub replicator on these endpoints, for replaying a shard's log.
    pub fn replicator(&self) -> anyhow::Result<omnirelay_client::replication::HubReplicator> {
        let mut config = omnirelay_client::replication::HubReplicatorConfig::new(self.endpoints());
        config.tls = self.tls()?;
        Ok(omnirelay_client::replication::HubReplicator::new(config)?)
    }

    fn tls(&self) -> anyhow::Result<Option<HubTls>> {
        let Some(ca) = &self.hub_ca else { return Ok(None) };
        let read = |path: &PathBuf| std::fs::read(path).with_context(|| format!("read {}", path.display()));
        let identity = match (&self.hub_cert, &self.hub_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        Ok(Some(HubTls { ca_pem: read(ca)?, identity, domain: self.hub_domain.clone() }))
    }
}

/// What every sink shares: the hub, the subscription and its pacing.
#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// The hub.
    #[command(flatten)]
    pub hub: HubArgs,
    /// Subscriber id: hub checkpoints are stored under it (one per sink).
    #[arg(long, env = "OMNIRELAY_SINK_SUBSCRIBER")]
    pub subscriber: String,
    /// Shards to follow (repeat, or comma-separate).
    #[arg(long = "shard", env = "OMNIRELAY_SINK_SHARDS", value_delimiter = ',', conflicts_with = "pattern")]
    pub shards: Vec<String>,
    /// Follow every shard matching this pattern, e.g. `resourcelease.*`
    /// (shards created later included).
    #[arg(long, env = "OMNIRELAY_SINK_PATTERN")]
    pub pattern: Option<String>,
    /// Events between two checkpoint commits.
    #[arg(long, env = "OMNIRELAY_SINK_CHECKPOINT_EVENTS", default_value_t = sink::defaults::CHECKPOINT_EVENTS)]
    pub checkpoint_events: u64,
    /// Longest wait of delivered events for their checkpoint, in milliseconds.
    #[arg(long, env = "OMNIRELAY_SINK_CHECKPOINT_MS", default_value_t = sink::defaults::CHECKPOINT_INTERVAL.as_millis() as u64)]
    pub checkpoint_ms: u64,
    /// Serve Prometheus metrics on this address (`/metrics`).
    #[arg(long, env = "OMNIRELAY_SINK_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl SinkArgs {
    fn config(&self) -> anyhow::Result<SubscriberConfig> {
        let selection = match (&self.pattern, self.shards.is_empty()) {
            (Some(pattern), _) => Selection::Pattern(pattern.clone()),
            (None, false) => Selection::Shards(self.shards.iter().map(|s| ShardId::from(s.as_str())).collect()),
            (None, true) => anyhow::bail!("name the shards to follow with --shard or --pattern"),
        };
        let mut config = SubscriberConfig::new(self.subscriber.clone(), self.hub.endpoints(), selection);
        config.tls = self.hub.tls()?;
        config.checkpoint_events = self.checkpoint_events;
        config.checkpoint_interval = Duration::from_millis(self.checkpoint_ms.max(1));
        Ok(config)
    }
}

/// The sinks `omnirelay sink` runs.
#[derive(Debug, Subcommand)]
pub enum SinkCommand {
    /// Appends every event as a JSON line to rotated files (at least once).
    Ndjson {
        /// The subscription.
        #[command(flatten)]
        common: SinkArgs,
        /// Directory of the files.
        #[arg(long, env = "OMNIRELAY_SINK_DIR")]
        dir: PathBuf,
        /// File name prefix.
        #[arg(long, env = "OMNIRELAY_SINK_PREFIX", default_value = "events")]
        prefix: String,
        /// Size at which a file is rotated, in bytes.
        #[arg(long, env = "OMNIRELAY_SINK_ROTATE_BYTES", default_value_t = sink::defaults::NDJSON_ROTATE_BYTES)]
        rotate_bytes: u64,
        /// When lines are synced to disk.
        #[arg(long, env = "OMNIRELAY_SINK_FSYNC", value_enum, default_value_t = Fsync::OnCheckpoint)]
        fsync: Fsync,
    },
    /// Keeps a PostgreSQL table of every queue's current items (exactly once).
    Postgres {
        /// The subscription.
        #[command(flatten)]
        common: SinkArgs,
        /// The projection's database, and TLS to it.
        #[command(flatten)]
        database: DatabaseArgs,
        /// Name of the projection (several may share a database).
        #[arg(long, env = "OMNIRELAY_SINK_PROJECTION", default_value = "default")]
        projection: String,
    },
    /// Records who did what to which resource in a PostgreSQL table
    /// (exactly once).
    Lineage {
        /// The subscription.
        #[command(flatten)]
        common: SinkArgs,
        /// The lineage's database, and TLS to it.
        #[command(flatten)]
        database: DatabaseArgs,
        /// Name of the lineage (several may share a database).
        #[arg(long, env = "OMNIRELAY_SINK_LINEAGE", default_value = "default")]
        lineage: String,
    },
    /// POSTs each batch as JSON to an HTTP endpoint, with retries and a
    /// dead-letter file (at least once).
    Webhook {
        /// The subscription.
        #[command(flatten)]
        common: SinkArgs,
        /// The endpoint, `http://...` or `https://...`.
        #[arg(long, env = "OMNIRELAY_SINK_URL")]
        url: String,
        /// File (NDJSON) of the batches the endpoint refused.
        #[arg(long, env = "OMNIRELAY_SINK_DEAD_LETTER")]
        dead_letter: PathBuf,
        /// Extra header, `name: value` (repeat).
        #[arg(long = "header", env = "OMNIRELAY_SINK_HEADERS", value_delimiter = '\n', hide_env_values = true)]
        headers: Vec<String>,
        /// CA bundle (PEM) for an https endpoint (the system's roots when absent).
        #[arg(long, env = "OMNIRELAY_SINK_CA_FILE")]
        ca_file: Option<PathBuf>,
        /// POSTs per batch before the runtime backs off and tries again later.
        #[arg(long, env = "OMNIRELAY_SINK_ATTEMPTS", default_value_t = sink::webhook::ATTEMPTS)]
        attempts: u32,
    },
}

/// Connections a PostgreSQL sink keeps: one per batch in flight
/// (`PROJECTION_BATCHES_IN_FLIGHT`, two: a batch is written while the one
/// before writes and commits; see the projection's docs), and one for the
/// runtime's reads of the sink's positions.
const SINK_POOL_SIZE: usize = sink::defaults::PROJECTION_BATCHES_IN_FLIGHT + 1;

/// Application name of a PostgreSQL sink's sessions (in `pg_stat_activity`),
/// unless the URL sets one.
const SINK_APPLICATION_NAME: &str = "omnirelay-sink";

/// A PostgreSQL sink's database: its URL and TLS to it, with the hub's
/// `--database-tls` modes (rustls, as the hub's own connections).
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The database (URL or key=value connection string).
    #[arg(long, env = "OMNIRELAY_SINK_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// TLS to the database: `disable`, `prefer` (TLS when the server offers
    /// it, unverified), `require` (TLS, unverified), `verify-full` (TLS,
    /// the certificate must chain to `--database-ca-file` and name the host).
    #[arg(long, env = "OMNIRELAY_SINK_DATABASE_TLS", value_enum, default_value_t = DatabaseTlsMode::Prefer)]
    pub database_tls: DatabaseTlsMode,
    /// PEM file of the CA that signed the database's certificate; required
    /// by, and only allowed with, `verify-full`.
    #[arg(long, env = "OMNIRELAY_SINK_DATABASE_CA_FILE", value_name = "PATH")]
    pub database_ca_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The sink's connection pool; connections open on first use.
    async fn pool(&self) -> anyhow::Result<deadpool_postgres::Pool> {
        let tls = DatabaseTls::from_flags(self.database_tls, self.database_ca_file.as_deref())?;
        let url = DatabaseUrl::parse(&self.database_url).context("--database-url")?;
        let mut config = url.to_pg_config();
        config.connect_timeout(sink::defaults::REQUEST_TIMEOUT);
        omnirelay_hub::store::postgres::pool::apply_tls_mode(&mut config, &tls);
        if config.get_application_name().is_none() {
            config.application_name(SINK_APPLICATION_NAME);
        }
        let connector = omnirelay_hub::store::postgres::pool::tls_connector(&tls).await?;
        Ok(ProjectionSink::pool_with_tls(config, connector, SINK_POOL_SIZE, sink::defaults::REQUEST_TIMEOUT)?)
    }
}

/// `--fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fsync {
    /// After every batch.
    EveryBatch,
    /// Before every checkpoint commit.
    OnCheckpoint,
    /// Never (the OS decides).
    Never,
}

/// Runs a sink until `stop` resolves; `json` prints progress as JSON lines
/// on stdout instead of text on stderr.
pub async fn run(command: SinkCommand, json: bool, stop: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    match command {
        SinkCommand::Ndjson { common, dir, prefix, rotate_bytes, fsync } => {
            let files = NdjsonConfig {
                dir,
                prefix,
                rotate_bytes,
                fsync: match fsync {
                    Fsync::EveryBatch => FsyncPolicy::EveryBatch,
                    Fsync::OnCheckpoint => FsyncPolicy::OnCheckpoint,
                    Fsync::Never => FsyncPolicy::Never,
                },
            };
            let sink = NdjsonSink::open(files).await.context("open the NDJSON files")?;
            drive(&common, sink, json, stop).await
        }
        SinkCommand::Lineage { common, database, lineage } => {
            let pool = database.pool().await?;
            let sink = LineageSink::open(pool, lineage).await.context("open the lineage")?;
            drive(&common, sink, json, stop).await
        }
        SinkCommand::Webhook { common, url, dead_letter, headers, ca_file, attempts } => {
            let mut config = WebhookConfig::new(url, dead_letter);
            config.attempts = attempts;
            for header in headers {
                let (name, value) =
                    header.split_once(':').with_context(|| format!("--header {header:?}: use `name: value`"))?;
                config.headers.push((name.trim().to_string(), value.trim().to_string()));
            }
            if config.url.starts_with("https://") {
                config.tls = Some(std::sync::Arc::new(webhook_tls(ca_file.as_deref())?));
            }
            let sink = WebhookSink::new(config)?;
            drive(&common, sink, json, stop).await
        }
        SinkCommand::Postgres { common, database, projection } => {
            let pool = database.pool().await?;
            let sink = ProjectionSink::open(pool, projection).await.context("open the projection")?;
            drive(&common, sink, json, stop).await
        }
    }
}

/// TLS for an https webhook: the CA file's roots, else the system's.
fn webhook_tls(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("read --ca-file {}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(cert.with_context(|| format!("--ca-file {}: not PEM", path.display()))?)?;
            }
            anyhow::ensure!(!roots.is_empty(), "--ca-file {}: no certificate in it", path.display());
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

async fn drive<S: ReplicationSink>(
    args: &SinkArgs,
    sink: S,
    json: bool,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    if let Some(address) = args.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(address)
            .install()
            .with_context(|| format!("serve metrics on {address}"))?;
    }
    let subscriber = Subscriber::new(args.config()?, sink)?;
    let mut progress = subscriber.progress();
    let cancel = CancellationToken::new();
    let mut run = tokio::spawn(subscriber.run(cancel.clone()));
    let mut ticks = tokio::time::interval(PROGRESS_EVERY);
    tokio::pin!(stop);
    let mut stopping = false;
    let ended = loop {
        tokio::select! {
            ended = &mut run => break ended,
            // Polled once only: a finished future must not be polled again.
            () = &mut stop, if !stopping => {
                stopping = true;
                cancel.cancel();
            }
            _ = ticks.tick() => report(&progress.borrow_and_update(), json),
        }
    };
    report(&progress.borrow(), json);
    ended.context("the subscriber task panicked")?.context("the sink stopped")?;
    Ok(())
}

fn report(progress: &SubscriberProgress, json: bool) {
    if json {
        write_line(&serde_json::to_string(progress).unwrap_or_default());
        return;
    }
    let mut line = format!(
        "{} delivered {} (reconnects {})",
        if progress.connected { "connected" } else { "connecting" },
        progress.delivered,
        progress.reconnects
    );
    for (shard, p) in &progress.shards {
        line.push_str(&format!(
            "; {shard}: at {} of {}, checkpoint {} (lag {} events, {:.1}s)",
            p.position, p.head, p.committed, p.lag_events, p.lag_seconds
        ));
    }
    eprintln!("{line}");
}

/// Where `tail` starts.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// The hub.
    #[command(flatten)]
    pub hub: HubArgs,
    /// The shard.
    pub shard: String,
    /// Start after this sequence (0: from the first event) instead of with
    /// the next event appended.
    #[arg(long)]
    pub after: Option<u64>,
}

/// Prints the shard's events until `stop` resolves.
pub async fn tail(args: TailArgs, json: bool, stop: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let endpoints = args.hub.endpoints();
    let tls = args.hub.tls()?;
    let shard = ShardId::from(args.shard.as_str());
    let mut position = args.after.map(|after| ShardChain::new(shard.clone(), Sequence::new(after), None));
    let mut current = 0;
    let mut backoff = sink::defaults::BACKOFF_MIN;
    tokio::pin!(stop);
    loop {
        let endpoint = &endpoints[current % endpoints.len()];
        let outcome = tokio::select! {
            () = &mut stop => return Ok(()),
            outcome = tail_session(endpoint, tls.as_ref(), &shard, &mut position, json) => outcome,
        };
        match outcome {
            Ok(()) => backoff = sink::defaults::BACKOFF_MIN,
            Err(TailError::Fatal(err)) => return Err(err),
            Err(TailError::Broken(reason)) => {
                tracing::warn!(endpoint = %endpoint.url, reason = %reason, "tail stream ended; reconnecting")
            }
        }
        current += 1;
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(sink::defaults::BACKOFF_MAX);
    }
}

enum TailError {
    Broken(String),
    Fatal(anyhow::Error),
}

async fn tail_session(
    endpoint: &HubEndpoint,
    tls: Option<&HubTls>,
    shard: &ShardId,
    position: &mut Option<ShardChain>,
    json: bool,
) -> Result<(), TailError> {
    let mut client = hub_client(endpoint, tls).map_err(TailError::Fatal)?;
    let start = match position {
        Some(chain) => pb::start_position::Position::AfterSequence(chain.position().get()),
        None => pb::start_position::Position::Latest(true),
    };
    let request = pb::SubscribeRequest {
        subscriber_id: format!("omnirelay-tail-{}", std::process::id()),
        shard_ids: vec![shard.to_string()],
        start: Some(pb::StartPosition { position: Some(start) }),
        progress_interval: Some(omnirelay_client::wire::duration(sink::defaults::PROGRESS_INTERVAL)),
        ..Default::default()
    };
    let opened = tokio::time::timeout(
        sink::defaults::CONNECT_TIMEOUT + sink::defaults::REQUEST_TIMEOUT,
        client.subscribe(request),
    )
    .await
    .map_err(|_| TailError::Broken("opening the subscription timed out".into()))?;
    let mut stream = opened.map_err(status_error)?.into_inner();
    let silence = sink::defaults::PROGRESS_INTERVAL * sink::defaults::SILENCE_FACTOR;
    loop {
        let frame = tokio::time::timeout(silence, stream.message())
            .await
            .map_err(|_| TailError::Broken(format!("the stream was silent for {silence:?}")))?
            .map_err(status_error)?
            .ok_or_else(|| TailError::Broken("the hub ended the stream".into()))?;
        match frame.frame {
            Some(pb::subscribe_response::Frame::Events(batch)) => {
                let chain = position.get_or_insert_with(|| {
                    let first = batch.events.first().and_then(|e| e.decode().ok()).map_or(0, |e| e.sequence);
                    ShardChain::new(shard.clone(), Sequence::new(first.saturating_sub(1)), None)
                });
                let events = chain.admit(&batch.events).map_err(|err| TailError::Fatal(err.into()))?;
                print_events(&events, json);
            }
            Some(pb::subscribe_response::Frame::Snapshot(frame)) => {
                if let Some(snapshot) = frame.snapshot {
                    let chain = position.get_or_insert_with(|| ShardChain::new(shard.clone(), Sequence::ZERO, None));
                    chain
                        .admit_snapshot(Sequence::new(snapshot.sequence), snapshot.hash.clone())
                        .map_err(|err| TailError::Fatal(err.into()))?;
                    let line = serde_json::json!({ "shard": shard.as_str(), "type": "snapshot", "sequence": snapshot.sequence });
                    write_line(&if json {
                        line.to_string()
                    } else {
                        format!("{shard} {:>8} snapshot (events before it were trimmed)", snapshot.sequence)
                    });
                }
            }
            Some(pb::subscribe_response::Frame::Progress(_)) | None => {}
        }
    }
}

/// A gRPC client of one hub endpoint, over TLS when `tls` is given,
/// connected on first use.
fn hub_client(
    endpoint: &HubEndpoint,
    tls: Option<&HubTls>,
) -> anyhow::Result<pb::hub_client::HubClient<tonic::transport::Channel>> {
    let mut built = tonic::transport::Endpoint::from_shared(endpoint.url.clone())
        .map_err(|err| anyhow::anyhow!("--hub {:?} is not a valid URL: {err}", endpoint.url))?
        .connect_timeout(sink::defaults::CONNECT_TIMEOUT)
        .http2_keep_alive_interval(sink::defaults::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(sink::defaults::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        built = built.tls_config(config)?;
    }
    Ok(pb::hub_client::HubClient::new(built.connect_lazy()).max_decoding_message_size(MAX_MESSAGE_BYTES))
}

fn print_events(events: &[SinkEvent], as_json: bool) {
    for event in events {
        let value = json::event(event);
        write_line(&if as_json {
            value.to_string()
        } else {
            format!(
                "{} {:>8} {:<20} {} {}",
                value["recorded_at"].as_str().unwrap_or("-"),
                event.sequence,
                value["type"].as_str().unwrap_or("?"),
                value["principal"].as_str().unwrap_or(""),
                value["data"]
            )
        });
    }
}

fn status_error(status: tonic::Status) -> TailError {
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded
        | tonic::Code::ResourceExhausted
        | tonic::Code::Aborted => TailError::Broken(status.to_string()),
        _ => TailError::Fatal(anyhow::anyhow!("{} ({:?})", status.message(), status.code())),
    }
}

/// Writes one line to stdout; a reader that went away (`| head`) ends the
/// process quietly, as for any Unix filter.
fn write_line(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(err) => {
            eprintln!("error: write the output: {err}");
            std::process::exit(1);
        }
    }
}
