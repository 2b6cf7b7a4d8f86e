//! A running hub replica: the store (PostgreSQL or the embedded SQLite
//! file), the live tail, the gRPC service with TLS and the standard health
//! service, the admin HTTP server, background retention, and the graceful
//! shutdown, started and stopped together.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::service::HubService;
use crate::config::{Config, StoreConfig};
use crate::defaults;
use crate::fanout::budget::Budget;
use crate::fanout::subscribe::Subscriptions;
use crate::fanout::tail::Tail;
use crate::proto::hub::v1::hub_server::HubServer;
use crate::replica::admin;
use crate::replica::health::{Health, Probe, WriteHealth};
use crate::replica::shutdown::{self, GrpcServing};
use crate::security::access::Guard;
use crate::security::tls::ServerTls;
use crate::store::metered::Metered;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{LogStore, RetentionPolicy};
use crate::telemetry::{self, HubCounters};

/// A hub replica, ready to serve.
pub struct Hub {
    store: Arc<dyn LogStore>,
    probe: Arc<dyn Probe>,
    tls: Option<Arc<ServerTls>>,
    tail: Tail,
    counters: Arc<HubCounters>,
    /// What the appends say about whether the store can write (readiness).
    writes: Arc<WriteHealth>,
    /// What all subscriptions of the replica may hold.
    budget: Budget,
    config: Config,
    /// Who may call what; protected mode without an identity.
    guard: Arc<Guard>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Hub {
    /// Opens the store the configuration names, PostgreSQL (refusing a
    /// database whose schema is behind) or the embedded SQLite file
    /// (refusing a file another hub holds), and starts the live tail.
    pub async fn open(config: Config) -> anyhow::Result<Hub> {
        // Certificates first: a bad file should stop the start before the
        // database is touched.
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(ServerTls::load(files).await.context("load the gRPC TLS files")?)),
            None => None,
        };
        let (store, probe): (Arc<dyn LogStore>, Arc<dyn Probe>) = match &config.store {
            StoreConfig::Postgres(postgres) => {
                let store = PgStore::open(postgres.store_config()).await.context("open the PostgreSQL log store")?;
                let store = Arc::new(store);
                (store.clone(), store)
            }
            StoreConfig::Sqlite { path } => {
                let store = SqliteStore::open(path).await.context("open the embedded SQLite log store")?;
                let store = Arc::new(store);
                (store.clone(), store)
            }
        };
        let mut hub = Hub::with_store(store, probe, config);
        hub.tls = tls;
        Ok(hub)
    }

    /// A hub on an already opened store (any [`LogStore`]), whose readiness
    /// `probe` judges. TLS files in `config` are not loaded here; use
    /// [`Hub::open`] for that.
    pub fn with_store(store: Arc<dyn LogStore>, probe: Arc<dyn Probe>, config: Config) -> Hub {
        // Every store operation the hub makes is timed, whatever the store.
        let store: Arc<dyn LogStore> = Arc::new(Metered::new(store));
        let counters = Arc::new(HubCounters::default());
        let budget = Budget::new(config.subscription_memory);
        let tail = Tail::start(store.clone(), counters.clone(), &budget);
        let mutual_tls = config.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some());
        let guard = Arc::new(Guard::new(config.access.clone(), mutual_tls));
        Hub {
            guard,
            store,
            probe,
            tls: None,
            tail,
            counters,
            writes: Arc::new(WriteHealth::default()),
            budget,
            config,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// The replica's in-process counters (reads, deliveries).
    pub fn counters(&self) -> Arc<HubCounters> {
        self.counters.clone()
    }

    /// The replica's subscription memory: what it holds now, the most it
    /// ever held, and its limit (`--subscription-memory`).
    pub fn subscription_memory(&self) -> SubscriptionMemory {
        SubscriptionMemory(self.budget.clone())
    }

    /// The store the replica serves.
    pub fn store(&self) -> Arc<dyn LogStore> {
        self.store.clone()
    }

    /// The gRPC service, to mount on a tonic router (with health, reflection
    /// or other services beside it).
    pub fn service(&self) -> HubServer<HubService> {
        let subscriptions = Subscriptions {
            store: self.store.clone(),
            tail: self.tail.clone(),
            counters: self.counters.clone(),
            budget: self.budget.clone(),
            cancel: self.cancel.clone(),
            tasks: self.tasks.clone(),
        };
        HubServer::new(HubService::new(
            self.store.clone(),
            self.counters.clone(),
            self.writes.clone(),
            subscriptions,
            self.cancel.clone(),
            self.tasks.clone(),
            self.guard.clone(),
        ))
        .max_decoding_message_size(defaults::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(defaults::MAX_MESSAGE_BYTES)
    }

    /// Serves until `shutdown` resolves: gRPC on `listener` (with TLS as
    /// configured, and the standard health service), the admin HTTP server
    /// on `--admin-listen`, background retention; then shuts down in the
    /// order [`crate::replica::shutdown`] describes and closes the store.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let admin = match TcpListener::bind(self.config.admin_listen).await {
            Ok(admin) => admin,
            Err(err) => {
                let address = self.config.admin_listen;
                self.close().await;
                return Err(err).with_context(|| format!("listen on {address} (--admin-listen)"));
            }
        };
        self.serve_on(listener, admin, shutdown).await
    }

    /// [`Hub::serve`] with the admin listener bound by the caller (tests bind
    /// `127.0.0.1:0` and read the port).
    pub async fn serve_on(
        self,
        listener: TcpListener,
        admin: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let grpc_address = listener.local_addr().context("read the gRPC listening address")?;
        let admin_address = admin.local_addr().context("read the admin listening address")?;
        if let Err(err) = self.guard.check_listen(grpc_address) {
            self.close().await;
            return Err(err).context("start serving");
        }
        let tls = match &self.tls {
            None => "off",
            Some(tls) if tls.is_mutual() => "mutual",
            Some(_) => "server",
        };
        tracing::info!(grpc = %grpc_address, admin = %admin_address, tls, "hub serving");

        let health = Arc::new(Health::with_writes(self.probe.clone(), self.writes.clone()).await);
        // The admin server and the health monitor outlive the gRPC drain, so
        // /readyz answers "shutting down" until the very end.
        let operations = CancellationToken::new();
        let operation_tasks = TaskTracker::new();
        operation_tasks.spawn({
            let (health, stop, interval) = (health.clone(), operations.clone(), self.config.health_interval);
            async move { health.monitor(interval, stop).await }
        });
        operation_tasks.spawn({
            let (health, stop) = (health.clone(), operations.clone());
            async move {
                if let Err(err) = admin::serve(admin, health, telemetry::prometheus(), stop).await {
                    tracing::error!(error = %err, "the admin server failed; /readyz and /metrics are down");
                }
            }
        });
        operation_tasks.close();
        if let Some(interval) = self.config.retention_interval {
            let policy = RetentionPolicy { checkpoint_max_age: self.config.checkpoint_max_age };
            self.tasks.spawn(retention(self.store.clone(), interval, policy, self.cancel.clone()));
        }

        let serving = GrpcServing {
            listener,
            tls: self.tls.clone(),
            health,
            // Cancelling the hub's token ends its streams (appends already
            // queued still commit).
            draining: self.cancel.clone(),
            grace: self.config.shutdown_grace,
        };
        let served = shutdown::serve_grpc(tonic::service::Routes::new(self.service()), serving, shutdown).await;
        self.close().await;
        operations.cancel();
        operation_tasks.wait().await;
        tracing::info!("hub stopped");
        served.context("serve gRPC")
    }

    /// Stops background work and closes the store.
    pub async fn close(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.tail.close().await;
        if let Err(err) = self.store.close().await {
            tracing::warn!(error = %err, "failed to close the log store cleanly");
        }
    }
}

/// A view of a replica's subscription memory budget (see
/// [`Hub::subscription_memory`]); it stays valid after the hub is served.
#[derive(Clone)]
pub struct SubscriptionMemory(Budget);

impl SubscriptionMemory {
    /// Bytes held for subscriptions now.
    pub fn used(&self) -> usize {
        self.0.used()
    }

    /// The most bytes held at once since the replica started.
    pub fn peak(&self) -> usize {
        self.0.peak()
    }

    /// The limit, `--subscription-memory`.
    pub fn limit(&self) -> usize {
        self.0.limit()
    }
}

/// Applies retention to every shard, every `interval`.
async fn retention(
    store: Arc<dyn LogStore>,
    interval: std::time::Duration,
    policy: RetentionPolicy,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let shards = match store.list_shards(String::new()).await {
            Ok(shards) => shards,
            Err(err) => {
                tracing::warn!(error = %err, "failed to list shards for retention");
                continue;
            }
        };
        for state in shards {
            if cancel.is_cancelled() {
                return;
            }
            match store.apply_retention(state.lease.shard.clone(), policy).await {
                Ok(outcome) if outcome.deleted > 0 => {
                    tracing::info!(shard = %state.lease.shard, deleted = outcome.deleted, low = %outcome.low, "trimmed events");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(shard = %state.lease.shard, error = %err, "failed to apply retention"),
            }
        }
    }
}

/// Runs a hub replica: opens the store, serves on `listener` until
/// `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    Hub::open(config).await?.serve(listener, shutdown).await
}
