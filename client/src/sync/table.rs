//! Open-addressing tables for the queue's hottest indexes: remembered
//! completion tokens by item id (up to
//! [`COMPLETED_RETAINED_MAX`](crate::defaults::COMPLETED_RETAINED_MAX), one
//! insertion and, once full, one removal per completed item) and the holder
//! of each leased resource (one insertion and one removal per lease).
//!
//! Why not a `HashMap`: the keys come pre-hashed (item ids are generated here,
//! a random per-instance prefix and a counter, and restore only brings ids
//! another instance generated; resources carry a hash keyed randomly per
//! queue), so a multiply spreads them and nobody can pick colliding keys.
//! Linear probing kept at most half full then usually reads a single bucket,
//! and backward-shift deletion leaves no tombstones, so a table that sees one
//! insertion and one removal per operation never pauses to clean up (a
//! `HashMap` under that churn rebuilds itself every few thousand removals).
//! The price is memory: twice the buckets of a table filled to seven eighths.

use crate::ids::ItemId;

/// A key with a well-spread 64-bit hash of its own.
pub(crate) trait TableKey: Eq {
    /// The key's hash.
    fn table_hash(&self) -> u64;
}

impl TableKey for ItemId {
    #[inline]
    fn table_hash(&self) -> u64 {
        let value = self.as_u128();
        (value as u64) ^ ((value >> 64) as u64).rotate_left(29)
    }
}

/// Open addressing from keys to `V`; see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Table<K, V> {
    buckets: Vec<Option<(K, V)>>,
    len: usize,
    /// `64 - log2(buckets.len())`: the mixed hash's top bits pick the bucket.
    shift: u32,
}

/// Item ids to values.
pub(crate) type IdTable<V> = Table<ItemId, V>;

/// Buckets of a table's first allocation.
const FIRST_BUCKETS: usize = 16;

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Self { buckets: Vec::new(), len: 0, shift: 64 }
    }
}

impl<K: TableKey, V: Copy> Table<K, V> {
    /// The home bucket of `key` (Fibonacci hashing).
    #[inline]
    fn home(&self, key: &K) -> usize {
        (key.table_hash().wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// How many keys the table holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the table is empty.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `key`.
    #[inline]
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut at = self.home(key);
        loop {
            match &self.buckets[at] {
                None => return None,
                Some((stored, value)) if stored == key => return Some(*value),
                Some(_) => at = (at + 1) & mask,
            }
        }
    }

    /// Whether `key` is in the table.
    #[inline]
    pub(crate) fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// Sets the value of `key`; returns the one it replaced.
    #[inline]
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.put(key, value, true)
    }

    /// Sets the value of `key` unless it has one; returns the value it had.
    #[inline]
    pub(crate) fn claim(&mut self, key: K, value: V) -> Option<V> {
        self.put(key, value, false)
    }

    /// Stores `value` under `key` if the key is new, or if `replace`;
    /// returns the value the key had. Inlined with a constant `replace`, so
    /// each caller gets its own branch-free probe.
    #[inline(always)]
    fn put(&mut self, key: K, value: V, replace: bool) -> Option<V> {
        if (self.len + 1) * 2 > self.buckets.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut at = self.home(&key);
        loop {
            match &mut self.buckets[at] {
                slot @ None => {
                    *slot = Some((key, value));
                    self.len += 1;
                    return None;
                }
                Some((stored, old)) if *stored == key => {
                    let had = *old;
                    if replace {
                        *old = value;
                    }
                    return Some(had);
                }
                Some(_) => at = (at + 1) & mask,
            }
        }
    }

    /// Removes `key`; returns its value.
    #[inline]
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut at = self.home(key);
        let value = loop {
            match &self.buckets[at] {
                None => return None,
                Some((stored, value)) if stored == key => break *value,
                Some(_) => at = (at + 1) & mask,
            }
        };
        self.buckets[at] = None;
        self.len -= 1;
        // Backward shift: a key further along the run moves into the hole
        // unless its home lies between the hole and where it sits, so every
        // key stays reachable from its home without crossing an empty bucket.
        let mut hole = at;
        let mut next = (at + 1) & mask;
        loop {
            let home = match &self.buckets[next] {
                None => break,
                Some((stored, _)) => self.home(stored),
            };
            if (next.wrapping_sub(home) & mask) >= (next.wrapping_sub(hole) & mask) {
                self.buckets[hole] = self.buckets[next].take();
                hole = next;
            }
            next = (next + 1) & mask;
        }
        Some(value)
    }

    #[cold]
    fn grow(&mut self) {
        let buckets = (self.buckets.len() * 2).max(FIRST_BUCKETS);
        let old = std::mem::replace(&mut self.buckets, (0..buckets).map(|_| None).collect());
        self.shift = 64 - buckets.trailing_zeros();
        // The keys are distinct and there is room: each goes to the first
        // free bucket from its home, with no comparisons.
        let mask = self.mask();
        for (key, value) in old.into_iter().flatten() {
            let mut at = self.home(&key);
            while self.buckets[at].is_some() {
                at = (at + 1) & mask;
            }
            self.buckets[at] = Some((key, value));
        }
    }

    /// Every key and value, in no particular order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, V)> + '_ {
        self.buckets.iter().flatten().map(|(key, value)| (key, *value))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u16),
        Claim(u8, u16),
        Remove(u8),
        Get(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
            (any::<u8>(), any::<u16>()).prop_map(|(k, v)| Op::Claim(k, v)),
            any::<u8>().prop_map(Op::Remove),
            any::<u8>().prop_map(Op::Get),
        ]
    }

    /// Ids as queues make them (one prefix, a counter) and from a second
    /// instance, so runs of neighbouring homes and wrap-around both happen.
    fn id(key: u8) -> ItemId {
        let prefix = if key.is_multiple_of(7) { 0xfeed_u128 } else { 0x5eed_u128 };
        ItemId::from_u128((prefix << 64) | u128::from(key / 2))
    }

    proptest! {
        #[test]
        fn the_table_agrees_with_a_hash_map(ops in prop::collection::vec(op(), 1..400)) {
            let mut table = IdTable::<u16>::default();
            let mut model = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(table.insert(id(k), v), model.insert(id(k), v)),
                    Op::Claim(k, v) => {
                        let had = model.get(&id(k)).copied();
                        model.entry(id(k)).or_insert(v);
                        prop_assert_eq!(table.claim(id(k), v), had);
                    }
                    Op::Remove(k) => prop_assert_eq!(table.remove(&id(k)), model.remove(&id(k))),
                    Op::Get(k) => prop_assert_eq!(table.get(&id(k)), model.get(&id(k)).copied()),
                }
                prop_assert_eq!(table.len(), model.len());
                prop_assert_eq!(table.is_empty(), model.is_empty());
                for (key, value) in &model {
                    prop_assert_eq!(table.get(key), Some(*value));
                    prop_assert!(table.contains_key(key));
                }
                let mut listed: Vec<_> = table.iter().map(|(key, value)| (*key, value)).collect();
                listed.sort();
                let mut expected: Vec<_> = model.iter().map(|(key, value)| (*key, *value)).collect();
                expected.sort();
                prop_assert_eq!(listed, expected);
            }
        }
    }

    #[test]
    fn a_table_stays_at_most_half_full() {
        let mut table = IdTable::default();
        for n in 0..1000u128 {
            table.insert(ItemId::from_u128((7 << 64) | n), n as u64);
            assert!(table.len() * 2 <= table.buckets.len());
        }
        for n in (0..1000u128).step_by(2) {
            assert_eq!(table.remove(&ItemId::from_u128((7 << 64) | n)), Some(n as u64));
        }
        for n in 0..1000u128 {
            let expected = (!n.is_multiple_of(2)).then_some(n as u64);
            assert_eq!(table.get(&ItemId::from_u128((7 << 64) | n)), expected);
        }
    }
}
