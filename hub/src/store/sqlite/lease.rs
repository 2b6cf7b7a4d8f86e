//! Shard leases: acquire, renew and release, judged by this process's clock.

use std::time::{Duration, SystemTime};

use rusqlite::{Connection, TransactionBehavior, params};

use super::rows::{duration_micros, micros, read_state, sql_error, to_db};
use crate::log::event::ChainHash;
use crate::log::ids::{Epoch, OwnerId, ShardId};
use crate::security::principal::Principal;
use crate::store::{LeaseGrant, ShardLease, StoreError, lease_failure};

const SQL_ACQUIRE_NEW: &str = include_str!("sql/acquire_new.sql");
const SQL_ACQUIRE_PRINCIPAL: &str = include_str!("sql/acquire_principal.sql");
const SQL_ACQUIRE_TAKE: &str = include_str!("sql/acquire_take.sql");
const SQL_RENEW_SHARD: &str = include_str!("sql/renew_shard.sql");
const SQL_RELEASE_SHARD: &str = include_str!("sql/release_shard.sql");

/// Grants the shard to `owner` when it is free, expired, or already held by
/// `owner` under the same principal; answers with the lease either way.
pub(super) fn acquire(
    db: &mut Connection,
    shard: ShardId,
    owner: OwnerId,
    principal: Option<Principal>,
    ttl: Duration,
) -> Result<LeaseGrant, StoreError> {
    let principal = principal.as_ref().map(Principal::as_str);
    let what = "acquire a shard";
    let sql = |e| sql_error(what, e);
    let now = micros(SystemTime::now());
    let expires = now.saturating_add(duration_micros(ttl)?);
    let txn = db.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
    let granted = match read_state(&txn, &shard)? {
        None => {
            txn.prepare_cached(SQL_ACQUIRE_NEW)
                .map_err(sql)?
                .execute(params![
                    shard.as_str(),
                    owner.as_str(),
                    expires,
                    &ChainHash::ZERO.as_bytes()[..],
                    now,
                    principal
                ])
                .map_err(sql)?;
            true
        }
        Some(state) => {
            // The same rule as acquire_shard.sql: a live lease goes
            // again to its owner id only under the principal that
            // took it (or when it records none).
            let taken_by: Option<String> = txn
                .prepare_cached(SQL_ACQUIRE_PRINCIPAL)
                .and_then(|mut s| s.query_row(params![shard.as_str()], |row| row.get(0)))
                .map_err(sql)?;
            let same_principal = taken_by.is_none() || taken_by.as_deref() == principal;
            let free = match (&state.lease.owner, state.lease.expires_at) {
                (None, _) | (_, None) => true,
                (Some(holder), Some(expires_at)) => (holder == &owner && same_principal) || micros(expires_at) <= now,
            };
            if free {
                txn.prepare_cached(SQL_ACQUIRE_TAKE)
                    .map_err(sql)?
                    .execute(params![shard.as_str(), owner.as_str(), expires, principal])
                    .map_err(sql)?;
            }
            free
        }
    };
    let state = read_state(&txn, &shard)?
        .ok_or_else(|| StoreError::Internal { what, source: "the shard vanished after its row was written".into() })?;
    txn.commit().map_err(sql)?;
    Ok(LeaseGrant { granted, lease: state.lease })
}

/// Extends `owner`'s lease at `epoch` by `ttl` from now.
pub(super) fn renew(
    db: &mut Connection,
    shard: ShardId,
    owner: OwnerId,
    principal: Option<Principal>,
    epoch: Epoch,
    ttl: Duration,
) -> Result<ShardLease, StoreError> {
    let what = "renew a shard";
    let principal = principal.as_ref().map(Principal::as_str);
    let expires = micros(SystemTime::now()).saturating_add(duration_micros(ttl)?);
    let renewed = db
        .prepare_cached(SQL_RENEW_SHARD)
        .map_err(|e| sql_error(what, e))?
        .execute(params![shard.as_str(), owner.as_str(), to_db("epoch", epoch.0)?, expires, principal])
        .map_err(|e| sql_error(what, e))?;
    if renewed == 1 {
        read_state(db, &shard)?
            .map(|state| state.lease)
            .ok_or_else(|| StoreError::Internal { what, source: "the renewed shard vanished".into() })
    } else {
        Err(lease_failure(read_state(db, &shard), shard, epoch))
    }
}

/// Gives up `owner`'s lease at `epoch`; reports whether it held it.
pub(super) fn release(
    db: &mut Connection,
    shard: ShardId,
    owner: OwnerId,
    principal: Option<Principal>,
    epoch: Epoch,
) -> Result<bool, StoreError> {
    let principal = principal.as_ref().map(Principal::as_str);
    let released = db
        .prepare_cached(SQL_RELEASE_SHARD)
        .map_err(|e| sql_error("release a shard", e))?
        .execute(params![shard.as_str(), owner.as_str(), to_db("epoch", epoch.0)?, principal])
        .map_err(|e| sql_error("release a shard", e))?;
    Ok(released == 1)
}
