//! A running hub replica: the store, the live tail, the gRPC service and the
//! background retention, started and stopped together.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::defaults;
use crate::proto::hub::v1::hub_server::HubServer;
use crate::service::HubService;
use crate::store::postgres::{PgStore, PgStoreConfig};
use crate::store::{LogStore, RetentionPolicy};
use crate::subscribe::Subscriptions;
use crate::tail::Tail;
use crate::telemetry::HubCounters;

/// A hub replica, ready to serve.
pub struct Hub {
    store: Arc<dyn LogStore>,
    tail: Tail,
    counters: Arc<HubCounters>,
    config: Config,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Hub {
    /// Opens the PostgreSQL store named by the configuration (refusing a
    /// database whose schema is behind) and starts the live tail.
    pub async fn open(config: Config) -> anyhow::Result<Hub> {
        config.validate()?;
        let store = PgStore::open(PgStoreConfig {
            url: config.database_url.clone(),
            pool_size: config.pool_size,
            committers: config.committers,
        })
        .await
        .context("open the PostgreSQL log store")?;
        Ok(Hub::with_store(Arc::new(store), config))
    }

    /// A hub on an already opened store (any [`LogStore`]).
    pub fn with_store(store: Arc<dyn LogStore>, config: Config) -> Hub {
        let counters = Arc::new(HubCounters::default());
        let tail = Tail::start(store.clone(), counters.clone());
        Hub { store, tail, counters, config, cancel: CancellationToken::new(), tasks: TaskTracker::new() }
    }

    /// The replica's in-process counters (reads, deliveries).
    pub fn counters(&self) -> Arc<HubCounters> {
        self.counters.clone()
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
            cancel: self.cancel.clone(),
            tasks: self.tasks.clone(),
        };
        HubServer::new(HubService::new(
            self.store.clone(),
            self.counters.clone(),
            subscriptions,
            self.cancel.clone(),
            self.tasks.clone(),
        ))
        .max_decoding_message_size(defaults::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(defaults::MAX_MESSAGE_BYTES)
    }

    /// Serves on `listener` until `shutdown` resolves, then ends every
    /// stream (appends already queued still commit), stops background work
    /// and closes the store.
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let address = listener.local_addr().context("read the listening address")?;
        tracing::info!(%address, "hub serving");
        if let Some(interval) = self.config.retention_interval {
            let policy = RetentionPolicy { checkpoint_max_age: self.config.checkpoint_max_age };
            self.tasks.spawn(retention(self.store.clone(), interval, policy, self.cancel.clone()));
        }
        let cancel = self.cancel.clone();
        // No Nagle: acknowledgements are small frames that must leave at once
        // (with Nagle and delayed ACKs each would wait up to 40 ms).
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let served = tonic::transport::Server::builder()
            .add_service(self.service())
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                // Long-lived streams must end for the server to finish.
                cancel.cancel();
            })
            .await;
        self.close().await;
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
