//! The lineage sink: who did what to which resource, as a PostgreSQL table
//! (feature `postgres`), kept exactly once like the projection.
//!
//! `omnirelay_lineage` has one row per event that concerns an item: its
//! shard and sequence, `recorded_at`, the `principal` and `peer_id` that
//! caused it, its `kind` (`enqueued`, `leased`, `completed`, ...), the
//! item, the item's `resource_type` and `resource_id` (from the item's
//! enqueue or restore, looked up for later events), the lease `owner` and
//! fencing token where the event has them, and the rest of the event's
//! fields as `detail` (JSON). Queue-level events (drains, backpressure)
//! have a row without an item. Indexed by resource and by principal:
//!
//! ```sql
//! SELECT recorded_at, principal, kind, owner FROM omnirelay_lineage
//!  WHERE lineage = 'default' AND resource_type = 'user' AND resource_id = '42'
//!  ORDER BY shard, sequence;
//! ```
//!
//! Each batch is one transaction with the lineage's checkpoint (in
//! `omnirelay_projection_checkpoints`, under the name `lineage/{name}`),
//! locked, so a batch handed over again adds no row twice.

use deadpool_postgres::Pool;
use omnirelay_proto::replication::v1::replication_event::Event as Kind;
use tokio_postgres::types::ToSql;

use super::{Conn, Statement, StatementSql, lock_checkpoint, pg, pipeline, sequence_param, store_checkpoint, time};
use crate::sink::{Delivery, ReplicationSink, SinkBatch, SinkCheckpoint, SinkError, SinkEvent, json};

const SCHEMA: &str = include_str!("lineage.sql");

/// Appends who-did-what rows, exactly once. See the [module docs](self).
pub struct LineageSink {
    projection: super::ProjectionSink,
    name: String,
}

impl std::fmt::Debug for LineageSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineageSink").field("name", &self.name).finish_non_exhaustive()
    }
}

impl LineageSink {
    /// A lineage named `name` on `pool`'s database; creates its tables if
    /// missing.
    pub async fn open(pool: Pool, name: impl Into<String>) -> Result<Self, SinkError> {
        let name = name.into();
        let projection = super::ProjectionSink::open(pool, format!("lineage/{name}")).await?;
        let client = projection.pool.get().await.map_err(|err| pg("connect to the lineage's database", err))?;
        client.batch_execute(SCHEMA).await.map_err(|err| pg("create the lineage table", err))?;
        Ok(Self { projection, name })
    }
}

impl ReplicationSink for LineageSink {
    fn delivery(&self) -> Delivery {
        Delivery::ExactlyOnce
    }

    async fn checkpoints(&mut self) -> Result<Vec<SinkCheckpoint>, SinkError> {
        self.projection.checkpoints().await
    }

    async fn deliver(&mut self, batch: &SinkBatch) -> Result<(), SinkError> {
        let mut client =
            self.projection.pool.get().await.map_err(|err| pg("connect to the lineage's database", err))?;
        let tx = client.transaction().await.map_err(|err| pg("begin a transaction", err))?;
        let stored = lock_checkpoint(Conn::of(&tx), &self.projection.projection, &batch.shard).await?;
        let fresh: Vec<&SinkEvent> = batch.events.iter().filter(|e| e.sequence > stored).collect();
        let Some(last) = fresh.last() else { return Ok(()) };
        let statements = fresh.iter().flat_map(|event| rows(&self.name, event)).collect();
        pipeline(Conn::of(&tx), statements, "record lineage").await?;
        store_checkpoint(Conn::of(&tx), &self.projection.projection, &batch.shard, last.sequence, &last.hash).await?;
        tx.commit().await.map_err(|err| pg("commit a batch", err))
    }

    /// Trimmed events left no lineage to record: the lineage continues from
    /// the snapshot's position, with a gap it cannot fill.
    async fn apply_snapshot(&mut self, snapshot: &crate::sink::SinkSnapshot) -> Result<(), SinkError> {
        tracing::warn!(shard = %snapshot.shard, sequence = %snapshot.sequence, "lineage starts after a snapshot: the trimmed events' lineage is not recorded");
        let mut client =
            self.projection.pool.get().await.map_err(|err| pg("connect to the lineage's database", err))?;
        let tx = client.transaction().await.map_err(|err| pg("begin a transaction", err))?;
        let stored = lock_checkpoint(Conn::of(&tx), &self.projection.projection, &snapshot.shard).await?;
        if stored < snapshot.sequence {
            store_checkpoint(
                Conn::of(&tx),
                &self.projection.projection,
                &snapshot.shard,
                snapshot.sequence,
                &snapshot.hash,
            )
            .await?;
        }
        tx.commit().await.map_err(|err| pg("commit the snapshot position", err))
    }
}

const INSERT: &str = include_str!("insert_lineage.sql");

/// An item an event concerns: (item, its resource when the event carries
/// it, the lease owner, the fencing token).
type Touched = (Option<String>, Option<(String, String)>, Option<String>, Option<u64>);

/// One row per item the event concerns (none: one row without an item).
fn rows(name: &str, event: &SinkEvent) -> Vec<Statement> {
    let value = json::event(event);
    let detail = value["data"].to_string();
    let kind = value["type"].as_str().unwrap_or("unknown").to_string();
    let mut items: Vec<Touched> = Vec::new();
    match &event.event.event {
        Some(Kind::Enqueued(e)) => {
            if let Some(item) = &e.item {
                let payload = item.payload.clone().unwrap_or_default();
                items.push((
                    Some(item.item_id.clone()),
                    Some((payload.resource_type, payload.resource_id)),
                    None,
                    None,
                ));
            }
        }
        Some(Kind::Restored(e)) => {
            for item in &e.items {
                let payload = item.payload.clone().unwrap_or_default();
                items.push((
                    Some(item.item_id.clone()),
                    Some((payload.resource_type, payload.resource_id)),
                    None,
                    None,
                ));
            }
        }
        Some(Kind::Leased(e)) => {
            items.push((Some(e.item_id.clone()), None, Some(e.owner.clone()), Some(event.sequence.get())));
        }
        Some(Kind::Heartbeat(e)) => items.push((Some(e.item_id.clone()), None, None, Some(e.fencing_token))),
        Some(Kind::Completed(e)) => items.push((Some(e.item_id.clone()), None, None, Some(e.fencing_token))),
        Some(Kind::Failed(e)) => items.push((Some(e.item_id.clone()), None, None, Some(e.fencing_token))),
        Some(Kind::Expired(e)) => {
            items.push((Some(e.item_id.clone()), None, Some(e.owner.clone()), Some(e.fencing_token)));
        }
        Some(Kind::Requeued(e)) => items.push((Some(e.item_id.clone()), None, None, None)),
        Some(Kind::DeadLettered(e)) => items.push((Some(e.item_id.clone()), None, None, None)),
        Some(Kind::Redriven(e)) => items.push((Some(e.item_id.clone()), None, None, None)),
        Some(Kind::DeadLettersPurged(e)) => {
            items.extend(e.item_ids.iter().map(|id| (Some(id.clone()), None, None, None)))
        }
        Some(Kind::DrainedPurged(e)) => items.extend(e.item_ids.iter().map(|id| (Some(id.clone()), None, None, None))),
        _ => {}
    }
    if items.is_empty() {
        items.push((None, None, None, None));
    }
    items
        .into_iter()
        .map(|(item, resource, owner, token)| {
            let (resource_type, resource_id) = resource.unzip();
            let params: Vec<Box<dyn ToSql + Sync + Send>> = vec![
                Box::new(name.to_string()),
                Box::new(event.shard.to_string()),
                Box::new(sequence_param(event.sequence)),
                Box::new(time(event.event.recorded_at.as_ref())),
                Box::new(event.event.principal.clone()),
                Box::new(event.event.peer_id.clone()),
                Box::new(kind.clone()),
                Box::new(item),
                Box::new(resource_type),
                Box::new(resource_id),
                Box::new(owner),
                Box::new(token.map(|t| i64::try_from(t).unwrap_or(i64::MAX))),
                Box::new(detail.clone()),
            ];
            Statement { sql: StatementSql::Text(INSERT), params }
        })
        .collect()
}
