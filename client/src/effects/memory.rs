//! The in-memory state store: records in a map, gone with the process.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{DeterministicRecord, DeterministicStateStore, StateFuture, check_key};

/// A [`DeterministicStateStore`] in process memory, for tests and examples.
#[derive(Debug, Default)]
pub struct InMemoryStateStore {
    records: Mutex<HashMap<String, DeterministicRecord>>,
}

impl InMemoryStateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, DeterministicRecord>> {
        // Every mutation is a single insert: a panic cannot leave it half done.
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl DeterministicStateStore for InMemoryStateStore {
    fn get(&self, key: &str) -> StateFuture<'_, Option<DeterministicRecord>> {
        let result = check_key(key).map(|()| self.records().get(key).cloned());
        Box::pin(std::future::ready(result))
    }

    fn set(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, ()> {
        let result = check_key(key).map(|()| {
            self.records().insert(key.to_string(), record.clone());
        });
        Box::pin(std::future::ready(result))
    }

    fn try_add(&self, key: &str, record: &DeterministicRecord) -> StateFuture<'_, bool> {
        let result = check_key(key).map(|()| {
            let mut records = self.records();
            if records.contains_key(key) {
                false
            } else {
                records.insert(key.to_string(), record.clone());
                true
            }
        });
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_state_store_contract() {
        crate::effects::contract::check(&InMemoryStateStore::new(), "").await;
    }
}
