//! The log-store contract suite, run against every store: PostgreSQL and
//! the embedded SQLite store pass the same cases.

mod postgres {
    omnirelay_hub::log_store_contract!(crate::support::fresh_store);
}

mod sqlite {
    omnirelay_hub::log_store_contract!(crate::support::fresh_sqlite_store);
}
