//! `ShardRouter`: the one place that decides which shard owns a key.
//!
//! Placement is by hash: `shard = jump_consistent_hash(fnv1a64(key), n)`.
//! Hashing spreads writes to random (and to sequential) keys evenly over
//! every shard and core, which is what a thread-per-core server needs; the
//! price is that every range or prefix request is a scatter-gather over all
//! shards (see docs/ARCHITECTURE.md, "Routing"). Jump consistent hash keeps
//! the movement minimal if the shard count ever changes; today the count is
//! fixed when a data directory is created.
//!
//! Invariants:
//! - the function is pure and stable across versions and processes: the
//!   gateway and every shard compute the same owner for the same key;
//! - a single key (no range end) lives on exactly one shard; a key range
//!   (non-empty range end) may hold keys of every shard.

/// Decides the owning shard of every key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardRouter {
    shards: u32,
}

impl ShardRouter {
    /// A router over `shards` shards (at least one).
    pub fn new(shards: u32) -> Self {
        assert!(shards > 0, "a router needs at least one shard");
        ShardRouter { shards }
    }

    /// The number of shards.
    pub fn shard_count(&self) -> u32 {
        self.shards
    }

    /// The shard owning `key`.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        jump_consistent_hash(fnv1a64(key), self.shards)
    }

    /// Whether `shard` owns `key`.
    pub fn owns(&self, shard: u32, key: &[u8]) -> bool {
        self.shard_of(key) == shard
    }

    /// The shards that may hold keys of the etcd range `[key, range_end)`:
    /// one shard for a single key (empty `range_end`), every shard otherwise.
    pub fn shards_for_range(&self, key: &[u8], range_end: &[u8]) -> Vec<u32> {
        if range_end.is_empty() {
            vec![self.shard_of(key)]
        } else {
            (0..self.shards).collect()
        }
    }
}

/// 64-bit FNV-1a. Not cryptographic; stable and fast for short keys.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Lamping and Veach's jump consistent hash: maps `key` to a bucket in
/// `0..buckets`, moving only `1/n` of keys when a bucket is added.
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The routing key of a lease: its home shard is `shard_of(lease_key(id))`.
pub fn lease_key(id: i64) -> Vec<u8> {
    let mut k = b"\x00lease/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_shard_owns_everything() {
        let r = ShardRouter::new(1);
        for i in 0..100u32 {
            assert_eq!(r.shard_of(format!("k{i}").as_bytes()), 0);
        }
    }

    #[test]
    fn random_and_sequential_keys_spread_over_all_shards() {
        for n in [2u32, 3, 4, 8] {
            let r = ShardRouter::new(n);
            let mut counts = vec![0u32; n as usize];
            for i in 0..10_000u32 {
                counts[r.shard_of(format!("/registry/pods/{i}").as_bytes()) as usize] += 1;
            }
            let expected = 10_000 / n;
            for c in &counts {
                assert!(
                    *c > expected * 8 / 10 && *c < expected * 12 / 10,
                    "uneven spread over {n} shards: {counts:?}"
                );
            }
        }
    }

    #[test]
    fn owner_is_stable() {
        // Pinned values: changing the hash would strand existing data.
        let r = ShardRouter::new(2);
        let owners: Vec<u32> = ["a", "b", "foo", "/registry/x", ""]
            .iter()
            .map(|k| r.shard_of(k.as_bytes()))
            .collect();
        assert_eq!(owners, vec![1, 0, 1, 1, 1]);
        let r = ShardRouter::new(4);
        let owners: Vec<u32> = ["a", "b", "foo", "/registry/x", ""]
            .iter()
            .map(|k| r.shard_of(k.as_bytes()))
            .collect();
        assert_eq!(owners, vec![2, 3, 1, 3, 1]);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn ranges_cover_all_shards_single_keys_one() {
        let r = ShardRouter::new(4);
        assert_eq!(r.shards_for_range(b"k", b"").len(), 1);
        assert_eq!(r.shards_for_range(b"k", b"l"), vec![0, 1, 2, 3]);
    }
}
