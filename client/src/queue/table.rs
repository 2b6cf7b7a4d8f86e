//! A table from item ids to small copyable values, for the remembered
//! completions (up to [`COMPLETED_RETAINED_MAX`](crate::defaults::COMPLETED_RETAINED_MAX)
//! of them, one insertion and, once full, one removal per completed item).
//!
//! Why not a `HashMap`: item ids are generated here (a random per-instance
//! prefix and a counter; restore only brings ids another instance
//! generated), so a multiplicative hash spreads them well and nobody can pick
//! colliding ids. Open addressing with linear probing, kept at most half
//! full, then usually reads a single bucket, and backward-shift deletion
//! leaves no tombstones, so a table that sees one insertion and one removal
//! per completion never pauses to clean up (a `HashMap` under that churn
//! rebuilds itself every few thousand removals). The price is memory: twice
//! the buckets of a table filled to seven eighths.

use crate::ids::ItemId;

/// Open addressing from item ids to `V`; see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct IdTable<V> {
    buckets: Vec<Option<(ItemId, V)>>,
    len: usize,
    /// `64 - log2(buckets.len())`: the hash's top bits pick the bucket.
    shift: u32,
}

/// Buckets of a table's first allocation.
const FIRST_BUCKETS: usize = 16;

impl<V: Copy> Default for IdTable<V> {
    fn default() -> Self {
        Self { buckets: Vec::new(), len: 0, shift: 64 }
    }
}

impl<V: Copy> IdTable<V> {
    /// The home bucket of `id` (Fibonacci hashing of the folded id).
    #[inline]
    fn home(&self, id: ItemId) -> usize {
        let value = id.as_u128();
        let folded = (value as u64) ^ ((value >> 64) as u64).rotate_left(29);
        (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// How many ids the table holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The value of `id`.
    #[inline]
    pub(crate) fn get(&self, id: ItemId) -> Option<V> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut at = self.home(id);
        loop {
            match &self.buckets[at] {
                None => return None,
                Some((key, value)) if *key == id => return Some(*value),
                Some(_) => at = (at + 1) & mask,
            }
        }
    }

    /// Sets the value of `id`; returns the one it replaced.
    #[inline]
    pub(crate) fn insert(&mut self, id: ItemId, value: V) -> Option<V> {
        if (self.len + 1) * 2 > self.buckets.len() {
            self.grow();
        }
        let mask = self.mask();
        let mut at = self.home(id);
        loop {
            match &mut self.buckets[at] {
                slot @ None => {
                    *slot = Some((id, value));
                    self.len += 1;
                    return None;
                }
                Some((key, old)) if *key == id => return Some(std::mem::replace(old, value)),
                Some(_) => at = (at + 1) & mask,
            }
        }
    }

    /// Removes `id`; returns its value.
    #[inline]
    pub(crate) fn remove(&mut self, id: ItemId) -> Option<V> {
        if self.len == 0 {
            return None;
        }
        let mask = self.mask();
        let mut at = self.home(id);
        let value = loop {
            match &self.buckets[at] {
                None => return None,
                Some((key, value)) if *key == id => break *value,
                Some(_) => at = (at + 1) & mask,
            }
        };
        self.buckets[at] = None;
        self.len -= 1;
        // Backward shift: an id further along the run moves into the hole
        // unless its home lies between the hole and where it sits, so every
        // id stays reachable from its home without crossing an empty bucket.
        let mut hole = at;
        let mut next = (at + 1) & mask;
        while let Some((key, _)) = self.buckets[next] {
            let home = self.home(key);
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
        let old = std::mem::replace(&mut self.buckets, vec![None; buckets]);
        self.shift = 64 - buckets.trailing_zeros();
        self.len = 0;
        for (id, value) in old.into_iter().flatten() {
            self.insert(id, value);
        }
    }

    /// Every id and value, in no particular order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (ItemId, V)> + '_ {
        self.buckets.iter().flatten().copied()
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
        Remove(u8),
        Get(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u8>(), any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
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
                    Op::Remove(k) => prop_assert_eq!(table.remove(id(k)), model.remove(&id(k))),
                    Op::Get(k) => prop_assert_eq!(table.get(id(k)), model.get(&id(k)).copied()),
                }
                prop_assert_eq!(table.len(), model.len());
                for (key, value) in &model {
                    prop_assert_eq!(table.get(*key), Some(*value));
                }
                let mut listed: Vec<_> = table.iter().collect();
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
            assert_eq!(table.remove(ItemId::from_u128((7 << 64) | n)), Some(n as u64));
        }
        for n in 0..1000u128 {
            let expected = (!n.is_multiple_of(2)).then_some(n as u64);
            assert_eq!(table.get(ItemId::from_u128((7 << 64) | n)), expected);
        }
    }
}
