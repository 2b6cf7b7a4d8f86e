//! The effect coordinator: runs a side effect under an effect id, records
//! its result, and answers replays with the recorded result.
//!
//! **Effect ids** come from an [`EffectIdPolicy`] and a version:
//! `{change_id}/v{version}/seq/{sequence}` (one effect per log event: the
//! natural id when a workflow is driven by a shard's log) or
//! `{change_id}/v{version}/resource/{resource_type}/{resource_id}` (one
//! effect per resource per change). Changing the policy (or bumping the
//! version, which starts every effect afresh) goes through a **dual-write
//! window**: nodes list the other version in [`EffectIds::window`] while
//! both run, so every claim and every record is made under the ids of all
//! listed versions, in ascending version order. Two nodes on different
//! versions then meet on the lowest id they share and cannot both run an
//! effect; once every node runs the new version, the old one is dropped
//! from the window (records made during the window are under both ids).
//!
//! **What a crash costs** (the exact guarantee, per effect id, for any
//! number of replays, restarts and duplicate deliveries, as long as the
//! store keeps its records):
//!
//! - [`EffectMode::AtMostOnce`]: the effect is *claimed* (an atomic
//!   `try_add` of a pending record) before it runs and its result recorded
//!   after. It runs **at most once**. A crash after the claim and before the
//!   record leaves the effect *in doubt*: every later attempt answers
//!   [`EffectError::InDoubt`] and never runs it again, until an operator or
//!   a reconciliation step records the outcome with
//!   [`EffectCoordinator::resolve`]. With no such crash it runs exactly
//!   once and every replay returns its recorded result.
//! - [`EffectMode::AtLeastOnce`]: the effect runs, then its result is
//!   recorded with `try_add`. It runs **at least once**, and again only
//!   after a crash between running and recording (each such crash adds one
//!   run), or when two callers race on an id neither has recorded (the
//!   first record wins and both callers get it). Use it for idempotent
//!   effects, where a second run is harmless but a lost one is not.
//!
//! No mode gives exactly-once across a crash between an effect and its
//! record: no store can make an outside effect and a write to itself one
//! atomic step. Exactly-once needs the effect's own system to take the
//! effect id (an idempotency key), or to store the record in the same
//! transaction as the effect.

use std::future::Future;

use bytes::Bytes;

use super::{DeterministicRecord, DeterministicStateStore, RecordKind, StateStoreError};
use crate::clock::{Clock, SystemClock};
use crate::ids::Sequence;

/// How an effect id is derived from an [`EffectScope`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectIdPolicy {
    /// `{change_id}/v{version}/seq/{sequence}`: one effect per log event.
    PerSequence,
    /// `{change_id}/v{version}/resource/{resource_type}/{resource_id}`: one
    /// effect per resource per change.
    PerResource,
}

/// A policy at a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionedPolicy {
    /// The version, part of every id it makes.
    pub version: u32,
    /// How ids are made.
    pub policy: EffectIdPolicy,
}

/// The effect ids a coordinator uses: the current policy, plus the
/// versions of the dual-write window (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectIds {
    /// The policy this node runs.
    pub current: VersionedPolicy,
    /// Other versions still in use by some node, claimed and recorded too.
    pub window: Vec<VersionedPolicy>,
}

impl EffectIds {
    /// One policy at one version, no window.
    pub fn new(version: u32, policy: EffectIdPolicy) -> Self {
        Self { current: VersionedPolicy { version, policy }, window: Vec::new() }
    }

    /// Adds `version` of `policy` to the dual-write window.
    #[must_use]
    pub fn with_window(mut self, version: u32, policy: EffectIdPolicy) -> Self {
        self.window.push(VersionedPolicy { version, policy });
        self
    }

    /// The ids of `scope`, one per listed version, lowest version first.
    pub fn keys(&self, scope: &EffectScope) -> Vec<(u32, String)> {
        let mut versions: Vec<VersionedPolicy> =
            std::iter::once(self.current).chain(self.window.iter().copied()).collect();
        versions.sort_by_key(|v| v.version);
        versions.dedup_by_key(|v| v.version);
        versions.into_iter().map(|v| (v.version, scope.key(v))).collect()
    }
}

/// What an effect is about: the change (workflow, migration, deployment)
/// driving it and the event or resource it acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectScope {
    /// The change the effect belongs to.
    pub change_id: String,
    /// The log sequence of the event that causes it ([`EffectIdPolicy::PerSequence`]).
    pub sequence: Sequence,
    /// The resource it acts on ([`EffectIdPolicy::PerResource`]).
    pub resource_type: String,
    /// The resource it acts on ([`EffectIdPolicy::PerResource`]).
    pub resource_id: String,
}

impl EffectScope {
    /// The effect caused by event `sequence` of change `change_id`.
    pub fn sequence(change_id: impl Into<String>, sequence: Sequence) -> Self {
        Self { change_id: change_id.into(), sequence, resource_type: String::new(), resource_id: String::new() }
    }

    /// The effect of change `change_id` on a resource.
    pub fn resource(
        change_id: impl Into<String>,
        resource_type: impl Into<String>,
        resource_id: impl Into<String>,
    ) -> Self {
        Self {
            change_id: change_id.into(),
            sequence: Sequence::ZERO,
            resource_type: resource_type.into(),
            resource_id: resource_id.into(),
        }
    }

    fn key(&self, policy: VersionedPolicy) -> String {
        match policy.policy {
            EffectIdPolicy::PerSequence => format!("{}/v{}/seq/{}", self.change_id, policy.version, self.sequence),
            EffectIdPolicy::PerResource => {
                format!("{}/v{}/resource/{}/{}", self.change_id, policy.version, self.resource_type, self.resource_id)
            }
        }
    }
}

/// What a coordinator does around an effect. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectMode {
    /// Claim, run, record: never runs twice; a crash in between leaves the
    /// effect in doubt.
    AtMostOnce,
    /// Run, record: never lost; a crash in between runs it again.
    AtLeastOnce,
}

/// The result of [`EffectCoordinator::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectOutcome {
    /// The effect's result.
    pub payload: Bytes,
    /// True when the effect did not run now: the result is the recorded one.
    pub replayed: bool,
    /// The effect id it is recorded under (the current version's).
    pub key: String,
}

/// Why an effect's outcome is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EffectError {
    /// The effect was claimed but its result never recorded (its runner
    /// died in between): it may or may not have happened. It is not run
    /// again; record its outcome with [`EffectCoordinator::resolve`].
    #[error("effect {key} is in doubt: it was claimed but its result was never recorded")]
    InDoubt {
        /// The effect id.
        key: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StateStoreError),
}

/// Runs effects at most or at least once per effect id. See the
/// [module docs](self).
pub struct EffectCoordinator<S: ?Sized = dyn DeterministicStateStore> {
    ids: EffectIds,
    mode: EffectMode,
    clock: std::sync::Arc<dyn Clock>,
    store: std::sync::Arc<S>,
}

impl<S: DeterministicStateStore + ?Sized> std::fmt::Debug for EffectCoordinator<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EffectCoordinator").field("ids", &self.ids).field("mode", &self.mode).finish_non_exhaustive()
    }
}

impl<S: DeterministicStateStore + ?Sized> EffectCoordinator<S> {
    /// A coordinator recording in `store` under `ids`.
    pub fn new(store: std::sync::Arc<S>, ids: EffectIds, mode: EffectMode) -> Self {
        Self { ids, mode, clock: std::sync::Arc::new(SystemClock), store }
    }

    /// Runs `effect` for `scope` unless its result is recorded, and returns
    /// the result (see the [module docs](self) for what each mode
    /// guarantees).
    pub async fn run<F, Fut>(&self, scope: &EffectScope, effect: F) -> Result<EffectOutcome, EffectError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Bytes>,
    {
        let keys = self.ids.keys(scope);
        let key = scope.key(self.ids.current);
        if let Some(recorded) = self.recorded(&keys).await? {
            return self.answer(recorded, key);
        }
        let version = self.ids.current.version;
        if self.mode == EffectMode::AtMostOnce {
            let claim = DeterministicRecord::pending(version, self.clock.now());
            for (_, id) in &keys {
                if !self.store.try_add(id, &claim).await? {
                    // Someone else claimed (or recorded) it first.
                    let recorded = self
                        .store
                        .get(id)
                        .await?
                        .ok_or_else(|| StateStoreError::Corrupt(format!("{id} was claimed but reads as absent")))?;
                    return self.answer(recorded, key);
                }
            }
        }
        let payload = effect().await;
        let record = DeterministicRecord::completed(version, payload, self.clock.now());
        match self.mode {
            EffectMode::AtMostOnce => {
                for (_, id) in &keys {
                    self.store.set(id, &record).await?;
                }
            }
            EffectMode::AtLeastOnce => {
                for (_, id) in &keys {
                    if !self.store.try_add(id, &record).await? {
                        // A concurrent run recorded first: its result is the
                        // one every replay sees.
                        if let Some(recorded) = self.store.get(id).await? {
                            return self.answer(recorded, key);
                        }
                    }
                }
            }
        }
        Ok(EffectOutcome { payload: record.payload, replayed: false, key })
    }

    /// Records `payload` as the outcome of an effect left in doubt (after
    /// checking what really happened), under every listed version.
    pub async fn resolve(&self, scope: &EffectScope, payload: Bytes) -> Result<(), EffectError> {
        let record = DeterministicRecord::completed(self.ids.current.version, payload, self.clock.now());
        for (_, id) in self.ids.keys(scope) {
            self.store.set(&id, &record).await?;
        }
        Ok(())
    }

    /// The first record among `keys`, completed ones first.
    async fn recorded(&self, keys: &[(u32, String)]) -> Result<Option<DeterministicRecord>, EffectError> {
        let mut pending = None;
        for (_, id) in keys {
            match self.store.get(id).await? {
                Some(record) if record.kind == RecordKind::Completed => return Ok(Some(record)),
                Some(record) => pending = pending.or(Some(record)),
                None => {}
            }
        }
        Ok(pending)
    }

    fn answer(&self, recorded: DeterministicRecord, key: String) -> Result<EffectOutcome, EffectError> {
        match recorded.kind {
            RecordKind::Completed => Ok(EffectOutcome { payload: recorded.payload, replayed: true, key }),
            RecordKind::Pending => Err(EffectError::InDoubt { key }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::effects::{FileSystemStateStore, InMemoryStateStore};

    fn scope() -> EffectScope {
        EffectScope::sequence("invoice-run-7", Sequence::new(42))
    }

    /// Runs the counted effect for `scope()` and then, before the
    /// coordinator can record it, "crashes": the task is aborted while the
    /// effect's future waits after having done its work.
    async fn crash_after_the_effect(coordinator: Arc<EffectCoordinator>, runs: Arc<AtomicU32>) {
        let (done, effect_ran) = tokio::sync::oneshot::channel();
        let worker = tokio::spawn(async move {
            let _ = coordinator
                .run(&scope(), || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = done.send(());
                    // The process dies here: the result is never returned.
                    std::future::pending::<Bytes>().await
                })
                .await;
        });
        effect_ran.await.expect("the effect ran");
        worker.abort();
        assert!(worker.await.expect_err("aborted").is_cancelled());
    }

    fn counted(runs: &Arc<AtomicU32>) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Bytes> + Send>> {
        let runs = Arc::clone(runs);
        move || {
            Box::pin(async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                Bytes::from(format!("charged, run {n}"))
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_crash_an_effect_runs_once_and_replays_return_its_result() {
        for mode in [EffectMode::AtMostOnce, EffectMode::AtLeastOnce] {
            let store: Arc<dyn DeterministicStateStore> = Arc::new(InMemoryStateStore::new());
            let runs = Arc::new(AtomicU32::new(0));
            let ids = EffectIds::new(1, EffectIdPolicy::PerSequence);
            let coordinator = EffectCoordinator::new(Arc::clone(&store), ids.clone(), mode);
            let first = coordinator.run(&scope(), counted(&runs)).await.expect("run");
            assert_eq!((first.replayed, first.key.as_str()), (false, "invoice-run-7/v1/seq/42"));
            for _ in 0..2 {
                // A replay on another coordinator (a restarted worker).
                let replay = EffectCoordinator::new(Arc::clone(&store), ids.clone(), mode);
                let again = replay.run(&scope(), counted(&runs)).await.expect("replay");
                assert!(again.replayed);
                assert_eq!(again.payload, first.payload, "a replay returns the recorded result");
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1, "{mode:?}: the effect ran exactly once");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_between_effect_and_record_costs_what_the_mode_says() {
        let dir = tempfile::tempdir().expect("temporary directory");
        for mode in [EffectMode::AtMostOnce, EffectMode::AtLeastOnce] {
            let path = dir.path().join(format!("{mode:?}"));
            let ids = EffectIds::new(1, EffectIdPolicy::PerSequence);
            let open = || -> Arc<EffectCoordinator> {
                let store: Arc<dyn DeterministicStateStore> =
                    Arc::new(FileSystemStateStore::open(&path).expect("open"));
                Arc::new(EffectCoordinator::new(store, ids.clone(), mode))
            };
            let runs = Arc::new(AtomicU32::new(0));
            crash_after_the_effect(open(), Arc::clone(&runs)).await;
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            // Two replays, each by a fresh worker on the same store.
            let first = open().run(&scope(), counted(&runs)).await;
            let second = open().run(&scope(), counted(&runs)).await;
            match mode {
                EffectMode::AtMostOnce => {
                    // Never again: both replays are told the effect is in doubt.
                    assert_eq!(runs.load(Ordering::SeqCst), 1, "at most once");
                    assert!(matches!(first, Err(EffectError::InDoubt { .. })), "{first:?}");
                    assert!(matches!(second, Err(EffectError::InDoubt { .. })), "{second:?}");
                    // An operator checks and records the outcome; replays return it.
                    open().resolve(&scope(), Bytes::from_static(b"charged, checked")).await.expect("resolve");
                    let resolved = open().run(&scope(), counted(&runs)).await.expect("replay");
                    assert_eq!((resolved.replayed, resolved.payload.as_ref()), (true, b"charged, checked".as_slice()));
                    assert_eq!(runs.load(Ordering::SeqCst), 1);
                }
                EffectMode::AtLeastOnce => {
                    // Once more, by the first replay; the second returns its result.
                    assert_eq!(runs.load(Ordering::SeqCst), 2, "the crashed run plus one");
                    let (first, second) = (first.expect("first replay"), second.expect("second replay"));
                    assert!(!first.replayed && second.replayed);
                    assert_eq!(second.payload, first.payload);
                }
            }
        }
    }

    #[tokio::test]
    async fn a_dual_write_window_lets_two_policy_versions_share_effects() {
        let store: Arc<dyn DeterministicStateStore> = Arc::new(InMemoryStateStore::new());
        let runs = Arc::new(AtomicU32::new(0));
        let old = EffectIds::new(1, EffectIdPolicy::PerSequence);
        let new = EffectIds::new(2, EffectIdPolicy::PerResource).with_window(1, EffectIdPolicy::PerSequence);
        let resource_scope = EffectScope {
            resource_type: "invoice".into(),
            resource_id: "inv-9".into(),
            ..EffectScope::sequence("invoice-run-7", Sequence::new(42))
        };
        let old_node = EffectCoordinator::new(Arc::clone(&store), old.clone(), EffectMode::AtMostOnce);
        let new_node = EffectCoordinator::new(Arc::clone(&store), new.clone(), EffectMode::AtMostOnce);
        // Recorded by a node on the old version, seen by one on the new.
        let recorded = old_node.run(&resource_scope, counted(&runs)).await.expect("run");
        let seen = new_node.run(&resource_scope, counted(&runs)).await.expect("replay");
        assert!(seen.replayed && seen.payload == recorded.payload);
        // Recorded by the new node under both ids, seen by the old.
        let other = EffectScope { sequence: Sequence::new(43), ..resource_scope.clone() };
        let other = EffectScope { resource_id: "inv-10".into(), ..other };
        let recorded = new_node.run(&other, counted(&runs)).await.expect("run");
        assert_eq!(recorded.key, "invoice-run-7/v2/resource/invoice/inv-10");
        assert!(old_node.run(&other, counted(&runs)).await.expect("replay").replayed);
        // Once the window closes, the new version alone still finds it.
        let closed = EffectCoordinator::new(
            Arc::clone(&store),
            EffectIds::new(2, EffectIdPolicy::PerResource),
            EffectMode::AtMostOnce,
        );
        assert!(closed.run(&other, counted(&runs)).await.expect("replay").replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 2, "each effect ran once across the versions");
    }
}
