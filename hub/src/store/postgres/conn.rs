//! A pooled connection lent to one operation, the deadline every operation
//! runs under, and the conversions of the rows it reads.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;

use super::failure::pool_error;
use crate::log::ids::InvalidInput;
use crate::store::{Elapsed, StoreError};

/// A pooled connection lent to one operation. [`Conn::release`] gives it
/// back once the operation finished with nothing in flight; dropped without
/// it (the operation's deadline passed mid-statement, so the future was
/// cancelled), it closes instead: whatever it was doing (a statement, a
/// half-sent transaction holding locks) is unknown, and it must not serve
/// anyone else in that state.
pub(crate) struct Conn(Option<deadpool_postgres::Object>);

impl Conn {
    /// Takes a connection from the pool (bounded by the pool's timeouts).
    pub(crate) async fn get(pool: &Pool) -> Result<Conn, StoreError> {
        pool.get().await.map(|client| Conn(Some(client))).map_err(pool_error)
    }

    /// Lends a connection already taken from the pool.
    pub(crate) fn lend(client: deadpool_postgres::Object) -> Conn {
        Conn(Some(client))
    }

    /// Returns the connection to the pool.
    pub(crate) fn release(mut self) {
        drop(self.0.take());
    }

    /// Closes the connection instead of pooling it.
    pub(crate) fn discard(self) {
        drop(self);
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("a connection is held until released")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("a connection is held until released")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Runs `operation` (which takes its own connection) with a deadline: past
/// `after` it is cancelled, its connection closed (see [`Conn`]), and the
/// caller told the store is unavailable ([`Elapsed`]).
pub(crate) async fn within<T>(
    what: &'static str,
    after: Duration,
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(after, operation).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Unavailable { what, source: Box::new(Elapsed { after }) }),
    }
}

/// Reads a column, turning a type or NULL mismatch into an internal error
/// instead of a panic.
pub(crate) fn col<'a, T: FromSql<'a>>(row: &'a Row, name: &'static str) -> Result<T, StoreError> {
    row.try_get(name).map_err(|err| StoreError::Internal { what: "decode a database row", source: Box::new(err) })
}

/// A counter as stored (bigint); values beyond `i64::MAX` cannot be stored.
pub(crate) fn to_db(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| InvalidInput::new(field, format!("{value} is out of range")).into())
}

/// A stored counter; the schema's checks keep them non-negative.
pub(crate) fn from_db(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Internal {
        what: "decode a database row",
        source: format!("negative counter {value}").into(),
    })
}
