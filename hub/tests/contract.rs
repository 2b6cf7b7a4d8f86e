//! The log-store contract suite, run against PostgreSQL.

omnirelay_hub::log_store_contract!(crate::support::fresh_store);
