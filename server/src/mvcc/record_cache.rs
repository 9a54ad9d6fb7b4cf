//! `RecordCache`: the versions reads fetched recently, by revision.
//!
//! A list reads one version record per key it returns, a point read of the
//! engine by revision (see `codec`). On RocksDB that read walks the
//! memtable's skip list before anything else, and on a node that has
//! taken writes for a while the memtable is megabytes of cold memory: each
//! read costs a few microseconds of cache misses, which made a 100-key page
//! about twice as expensive on an aged node as on a fresh one
//! (`bench/results/TUNING.md`). Lists of the same prefix come back again
//! and again (controllers relisting, paginated lists, watch `prev_kv`), so
//! the versions a read fetched are kept here, decoded, and the next read of
//! them is a hash lookup and a clone of two `Bytes` handles.
//!
//! # Invariants
//!
//! * **A cached version is the engine's record, decoded.** It is the
//!   `KeyValue` decoded from the record (its key and value share the
//!   record's buffer), checked against the key that names it before it is
//!   inserted, so a hit is neither decoded nor checked again. A version
//!   record is written once under its revision and never rewritten: the
//!   store gives every change a fresh `{main, sub}` (sub-revisions of a
//!   revision written again continue after the stored ones), so there is
//!   nothing to invalidate. Compaction deletes records; [`Mvcc::compact`]
//!   removes them here too, so a read of a compacted version (a watch
//!   event's `prev_kv`) misses as it would in the engine.
//! * **Read-through only.** Writes do not fill the cache: a write costs
//!   nothing more, and a record is cached only once something read it.
//! * **Bounded.** The versions' keys and values plus a fixed per-entry
//!   overhead stay within the capacity; a version larger than an eighth of
//!   it is not cached (a few large values would otherwise evict everything
//!   else). Capacity 0 caches nothing.
//! * **Eviction is CLOCK** (second chance): entries sit in a ring in
//!   insertion order; a hit marks its entry, and eviction passes over a
//!   marked entry once (clearing the mark) before it takes it. Records
//!   read again and again stay; records read once leave first.
//! * **Revisions are hashed cheaply** ([`RevisionHasher`]): they are
//!   assigned by the store, not chosen by clients, so the map needs no
//!   defence against crafted collisions, and SipHash was a tenth of the
//!   cost of a cached read.
//!
//! [`Mvcc::compact`]: super::Mvcc::compact

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use metastore_proto::mvccpb::KeyValue;

use super::key_index::Revision;

/// What an entry costs beyond its key and value: its map slot (revision,
/// `KeyValue`, mark), the record's flag and metadata, and its place in
/// the ring, rounded up.
const ENTRY_OVERHEAD: usize = 128;

/// A multiply-rotate hash (as in Firefox's FxHash) of the two integers of
/// a [`Revision`].
#[derive(Default)]
pub struct RevisionHasher(u64);

const SEED: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for RevisionHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(SEED);
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }
}

#[derive(Debug)]
struct Slot {
    kv: KeyValue,
    referenced: bool,
}

#[derive(Debug)]
pub struct RecordCache {
    capacity: usize,
    used: usize,
    map: HashMap<Revision, Slot, BuildHasherDefault<RevisionHasher>>,
    /// Revisions in insertion order (the CLOCK's hand is the front). May
    /// hold revisions no longer in `map` (removed by compaction); they are
    /// skipped when reached and purged when they outnumber the live ones.
    ring: VecDeque<Revision>,
}

impl RecordCache {
    /// A cache of at most `capacity` bytes (records plus overhead).
    pub fn new(capacity: usize) -> RecordCache {
        RecordCache {
            capacity,
            used: 0,
            map: HashMap::default(),
            ring: VecDeque::new(),
        }
    }

    fn cost(kv: &KeyValue) -> usize {
        kv.key.len() + kv.value.len() + ENTRY_OVERHEAD
    }

    /// The version stored at `rev`, if cached (and marks it as used).
    pub fn get(&mut self, rev: Revision) -> Option<KeyValue> {
        let slot = self.map.get_mut(&rev)?;
        slot.referenced = true;
        Some(slot.kv.clone())
    }

    /// Caches `kv`, the version the engine's record at `rev` holds (the
    /// caller has checked it), evicting others as needed. Versions too
    /// large for the cache are ignored.
    pub fn insert(&mut self, rev: Revision, kv: KeyValue) {
        let cost = Self::cost(&kv);
        if cost > self.capacity / 8 || self.map.contains_key(&rev) {
            return;
        }
        while self.used + cost > self.capacity {
            if !self.evict_one() {
                return;
            }
        }
        self.used += cost;
        self.map.insert(
            rev,
            Slot {
                kv,
                referenced: false,
            },
        );
        self.ring.push_back(rev);
    }

    /// Takes one entry out by CLOCK; false if there is none.
    fn evict_one(&mut self) -> bool {
        while let Some(rev) = self.ring.pop_front() {
            let Some(slot) = self.map.get_mut(&rev) else {
                continue; // removed by compaction
            };
            if slot.referenced {
                slot.referenced = false;
                self.ring.push_back(rev);
                continue;
            }
            let slot = self.map.remove(&rev).expect("present");
            self.used -= Self::cost(&slot.kv);
            return true;
        }
        false
    }

    /// Forgets the record at `rev` (compaction deleted it).
    pub fn remove(&mut self, rev: Revision) {
        if let Some(slot) = self.map.remove(&rev) {
            self.used -= Self::cost(&slot.kv);
            if self.ring.len() > 2 * self.map.len() + 64 {
                let map = &self.map;
                self.ring.retain(|r| map.contains_key(r));
            }
        }
    }

    /// Bytes accounted to the cached records.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used
    }

    /// Number of cached records.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(main: i64) -> Revision {
        Revision { main, sub: 0 }
    }

    /// A version whose key and value hold `len` bytes.
    fn record(len: usize) -> KeyValue {
        KeyValue {
            value: vec![7u8; len].into(),
            ..Default::default()
        }
    }

    #[test]
    fn hit_returns_the_inserted_record() {
        let mut c = RecordCache::new(10_000);
        assert!(c.get(rev(1)).is_none());
        let kv = KeyValue {
            key: "k".into(),
            value: "abc".into(),
            mod_revision: 1,
            ..Default::default()
        };
        c.insert(rev(1), kv.clone());
        assert_eq!(c.get(rev(1)), Some(kv));
        assert!(c.get(Revision { main: 1, sub: 1 }).is_none());
    }

    #[test]
    fn capacity_bounds_the_accounted_bytes() {
        let per = 100 + ENTRY_OVERHEAD;
        let mut c = RecordCache::new(10 * per);
        for i in 0..100 {
            c.insert(rev(i), record(100));
            assert!(c.used() <= 10 * per);
        }
        assert_eq!(c.len(), 10);
        // Plain insertion order without hits: the newest ten remain.
        for i in 90..100 {
            assert!(c.get(rev(i)).is_some(), "rev {i}");
        }
    }

    #[test]
    fn records_read_again_survive_eviction() {
        let per = 100 + ENTRY_OVERHEAD;
        let mut c = RecordCache::new(10 * per);
        for i in 0..10 {
            c.insert(rev(i), record(100));
        }
        // 0..5 are hot: read before every insertion that evicts.
        for i in 10..40 {
            for h in 0..5 {
                assert!(c.get(rev(h)).is_some(), "hot rev {h} evicted by {i}");
            }
            c.insert(rev(i), record(100));
        }
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn large_records_and_zero_capacity_cache_nothing() {
        let mut c = RecordCache::new(8_000);
        c.insert(rev(1), record(2_000));
        assert!(c.get(rev(1)).is_none());
        let mut z = RecordCache::new(0);
        z.insert(rev(1), record(1));
        assert!(z.get(rev(1)).is_none());
        assert_eq!(z.used(), 0);
    }

    #[test]
    fn removed_records_miss_and_free_their_bytes() {
        let mut c = RecordCache::new(1 << 20);
        for i in 0..1_000 {
            c.insert(rev(i), record(10));
        }
        for i in 0..990 {
            c.remove(rev(i));
        }
        assert_eq!(c.len(), 10);
        assert_eq!(c.used(), 10 * (10 + ENTRY_OVERHEAD));
        assert!(c.get(rev(5)).is_none());
        assert!(c.get(rev(995)).is_some());
        // The ring was purged of most removed revisions along the way.
        assert!(c.ring.len() <= 2 * c.len() + 64);
        // Removing an absent revision is harmless.
        c.remove(rev(5));
        assert_eq!(c.len(), 10);
    }
}
