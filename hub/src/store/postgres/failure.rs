//! PostgreSQL failures, classified once by SQLSTATE into what the store does
//! about them.
//!
//! Only the append path retries ([`Failure::Retry`], a bounded number of
//! times): it is the one transaction that locks several rows. Every other
//! statement runs at READ COMMITTED (no serialization failures) and locks at
//! most one shard row, so it cannot deadlock; its outages are reported as
//! unavailable and left to the caller's retry.

use tokio_postgres::error::SqlState;

use crate::store::StoreError;

/// What a failed statement means for the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// PostgreSQL aborted the transaction to resolve a conflict (serialization
    /// failure, deadlock): running it again is expected to succeed.
    Retry,
    /// The server or the connection is gone or refusing work (shutdown,
    /// connection loss, too many connections): the caller should retry later.
    Unavailable,
    /// Anything else: a bug, a constraint the code should have prevented, or
    /// a schema mismatch. Not retried.
    Fatal,
}

/// Classifies a driver error.
pub(crate) fn classify(err: &tokio_postgres::Error) -> Failure {
    match err.code() {
        Some(code) => classify_state(code),
        None if is_connection_failure(err) => Failure::Unavailable,
        // Parameter or column conversions, row counts: bugs, not outages.
        None => Failure::Fatal,
    }
}

/// Errors without a SQLSTATE are outages when the connection closed, I/O
/// failed, or connecting failed or timed out. The driver does not expose its
/// error kind, so the kinds are told apart by their fixed descriptions.
fn is_connection_failure(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    let kind = err.to_string();
    [
        "error communicating with the server",
        "error connecting to server",
        "timeout waiting for server",
        "error performing TLS handshake",
        "unexpected message from server",
        "error parsing response from server",
    ]
    .iter()
    .any(|prefix| kind.starts_with(prefix))
}

fn classify_state(code: &SqlState) -> Failure {
    if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
        return Failure::Retry;
    }
    // A server in read-only mode (a standby after a failover that the
    // connection string still points at): an outage of the writable
    // database, not a bug.
    if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        return Failure::Unavailable;
    }
    let class = &code.code()[..2];
    match class {
        // 08: connection exception; 57: operator intervention (admin or crash
        // shutdown, cannot connect now); 53: insufficient resources (too many
        // connections, out of memory or disk); 58: system error (I/O).
        "08" | "57" | "53" | "58" => Failure::Unavailable,
        _ => Failure::Fatal,
    }
}

/// Converts a driver error into a store error for `what`.
pub(crate) fn store_error(what: &'static str, err: tokio_postgres::Error) -> StoreError {
    match classify(&err) {
        Failure::Retry | Failure::Unavailable => StoreError::Unavailable { what, source: Box::new(err) },
        Failure::Fatal => StoreError::Internal { what, source: Box::new(err) },
    }
}

/// Converts a pool error (timeout, failed connect) into a store error.
pub(crate) fn pool_error(err: deadpool_postgres::PoolError) -> StoreError {
    match err {
        deadpool_postgres::PoolError::Backend(err) => store_error("connect to PostgreSQL", err),
        other => StoreError::Unavailable { what: "get a PostgreSQL connection", source: Box::new(other) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicts_retry_outages_are_unavailable_and_the_rest_is_fatal() {
        assert_eq!(classify_state(&SqlState::T_R_SERIALIZATION_FAILURE), Failure::Retry);
        assert_eq!(classify_state(&SqlState::T_R_DEADLOCK_DETECTED), Failure::Retry);
        assert_eq!(classify_state(&SqlState::ADMIN_SHUTDOWN), Failure::Unavailable);
        assert_eq!(classify_state(&SqlState::CANNOT_CONNECT_NOW), Failure::Unavailable);
        assert_eq!(classify_state(&SqlState::TOO_MANY_CONNECTIONS), Failure::Unavailable);
        assert_eq!(classify_state(&SqlState::CONNECTION_FAILURE), Failure::Unavailable);
        assert_eq!(classify_state(&SqlState::DISK_FULL), Failure::Unavailable);
        assert_eq!(classify_state(&SqlState::READ_ONLY_SQL_TRANSACTION), Failure::Unavailable);
        assert_eq!(classify_state(&SqlState::UNIQUE_VIOLATION), Failure::Fatal);
        assert_eq!(classify_state(&SqlState::UNDEFINED_TABLE), Failure::Fatal);
    }
}
