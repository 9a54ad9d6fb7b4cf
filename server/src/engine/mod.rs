//! Storage engines: one small ordered key/value interface, two implementations.
//!
//! Every shard owns exactly one engine instance and uses it from its own
//! thread (hence `Rc<dyn Engine>` and interior mutability instead of locks).
//! Several users share that instance — the shard's own state and the MVCC
//! store (the raft log has its own WAL, `crate::wal`) — and each keeps to
//! its own key namespace, a single leading byte listed in [`keyspace`].
//! Because the engine is shared, nothing above it may assume it is the only
//! writer of the engine, only of its own namespace.
//!
//! # Invariants
//!
//! * **Ordering.** Keys are arbitrary byte strings compared lexicographically
//!   as unsigned bytes (the order of `[u8]`'s `Ord`, which is also RocksDB's
//!   default bytewise comparator). [`Engine::scan`] yields pairs in that order,
//!   [`Engine::scan_rev`] in the reverse order.
//! * **Ranges.** Every range is half-open, `[start, end)`. An empty `end`
//!   means "to the end of the keyspace" (there is no key greater than every
//!   key, so the empty string — which sorts first — is free to mean that).
//!   This holds for scans and for [`BatchOp::DeleteRange`] alike.
//! * **Atomicity.** [`Engine::write`] applies a whole [`WriteBatch`] or none of
//!   it, in order (a later op in the batch wins over an earlier one on the
//!   same key). Readers never observe half a batch: the engine is used from
//!   one thread, and RocksDB write batches are atomic even across crashes.
//! * **Durability.** A write is durable once [`Engine::sync`] (or the job
//!   from [`Engine::sync_job`]) has run after it, or if it was made with
//!   `sync = true`; the RocksDB engine then has it in SST files (it writes
//!   no WAL of its own: a shard's raft WAL is the durable record, see
//!   `engine::rocksdb`). Until then a crash, even of the process alone,
//!   may lose it, but only with every write after it: what survives is a
//!   prefix of the writes. A clean close keeps everything. The memory
//!   engine is never durable; it keeps everything in RAM and says so
//!   through [`EngineKind::Memory`].
//! * **Callbacks.** A scan callback must not write to the same engine (the
//!   memory engine holds a borrow of its map for the whole scan).
//!
//! The engine knows nothing about revisions, raft or etcd: it is a sorted map
//! with atomic batches. Everything that must behave identically on both
//! engines (MVCC, watch events, raft apply) lives above this trait, so no
//! engine can get it wrong on its own.

pub mod buffered;
pub mod memory;
pub mod rocksdb;
mod small_bytes;

pub use small_bytes::SmallBytes;

use std::fmt;
use std::ops::Bound;
use std::path::Path;
use std::rc::Rc;
use std::str::FromStr;

/// The leading byte of every key, per user of the shared engine.
///
/// A user must only read and write keys that start with its own byte(s);
/// ranges over a namespace are `[&[PREFIX], &[PREFIX + 1])`.
pub mod keyspace {
    /// Raft log entries: `L` + index (u64 big-endian). Only data
    /// directories from before the raft WAL have these; the raft log moves
    /// them into its WAL on open (`crate::raftlog`).
    pub const RAFT_LOG: u8 = b'L';
    /// Raft hard state and other raft metadata, as `RAFT_LOG`.
    pub const RAFT_HARD_STATE: u8 = b'H';
    /// Shard state: applied index, configuration, and the like.
    pub const SHARD_STATE: u8 = b'S';
    /// Shard state: prepared cross-shard transaction intents.
    pub const SHARD_INTENT: u8 = b'I';
    /// Shard state: recorded cross-shard transaction decisions.
    pub const SHARD_DECISION: u8 = b'D';
    /// MVCC versions: `v` + revision (main, sub; big-endian) → record.
    pub const MVCC_VERSION: u8 = b'v';
    /// MVCC metadata: compacted revision, current revision.
    pub const MVCC_META: u8 = b'm';

    /// The `[start, end)` scan bounds covering every key with `prefix`.
    pub fn bounds(prefix: u8) -> (Vec<u8>, Vec<u8>) {
        // No namespace uses 0xff, so prefix + 1 never overflows in practice;
        // an empty end (to the end of the keyspace) covers that case anyway.
        match prefix.checked_add(1) {
            Some(next) => (vec![prefix], vec![next]),
            None => (vec![prefix], Vec::new()),
        }
    }
}

/// Errors from a storage engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// RocksDB reported an error (I/O, corruption, ...).
    #[error("rocksdb: {0}")]
    RocksDb(#[from] ::rocksdb::Error),
    /// Filesystem error outside RocksDB (e.g. creating the directory).
    #[error("engine I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A flush raised RocksDB's background-error count (the manual
    /// compaction that flushes reports no error of its own).
    #[error("rocksdb: a flush failed; see the DB's LOG")]
    FlushFailed,
    /// An engine name that is neither `memory` nor `rocksdb`.
    #[error("unknown engine {0:?} (expected \"memory\" or \"rocksdb\")")]
    UnknownKind(String),
}

/// Work that makes an engine's earlier writes durable, run off the
/// shard's thread ([`Engine::sync_job`]).
pub type EngineSyncJob = Box<dyn FnOnce() -> Result<(), EngineError> + Send>;

/// Which engine implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// RAM only: fast, replicated by raft, lost when the process exits.
    Memory,
    /// RocksDB on local disk, WAL enabled.
    RocksDb,
}

impl EngineKind {
    /// The name used on the command line and in status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            EngineKind::Memory => "memory",
            EngineKind::RocksDb => "rocksdb",
        }
    }

    /// Whether acknowledged writes survive a process restart.
    pub fn is_persistent(&self) -> bool {
        matches!(self, EngineKind::RocksDb)
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EngineKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "memory" | "mem" => Ok(EngineKind::Memory),
            "rocksdb" | "rocks" => Ok(EngineKind::RocksDb),
            _ => Err(EngineError::UnknownKind(s.to_string())),
        }
    }
}

/// One operation of a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Sets `key` to `value`.
    Put(SmallBytes, SmallBytes),
    /// Removes `key` (no error if absent).
    Delete(SmallBytes),
    /// Removes every key in `[start, end)`; an empty `end` = to the end.
    DeleteRange(SmallBytes, SmallBytes),
}

/// An ordered list of operations applied atomically by [`Engine::write`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    pub fn put(&mut self, key: impl Into<SmallBytes>, value: impl Into<SmallBytes>) -> &mut Self {
        self.ops.push(BatchOp::Put(key.into(), value.into()));
        self
    }

    pub fn delete(&mut self, key: impl Into<SmallBytes>) -> &mut Self {
        self.ops.push(BatchOp::Delete(key.into()));
        self
    }

    pub fn delete_range(
        &mut self,
        start: impl Into<SmallBytes>,
        end: impl Into<SmallBytes>,
    ) -> &mut Self {
        self.ops
            .push(BatchOp::DeleteRange(start.into(), end.into()));
        self
    }

    /// Appends every op of `other` (which then apply after this batch's).
    pub fn extend(&mut self, other: WriteBatch) -> &mut Self {
        if self.ops.is_empty() {
            // Nothing to keep: take `other`'s vector rather than copy it.
            self.ops = other.ops;
        } else {
            self.ops.extend(other.ops);
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// An ordered key/value store with atomic batches (see the module docs).
pub trait Engine {
    /// The value of `key`, if present.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;

    /// Ordered scan of `[start, end)` (empty `end` = to the end); calls `f`
    /// per pair until it returns false.
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError>;

    /// Reverse-ordered scan of `[start, end)`, from the end backwards; calls
    /// `f` per pair until it returns false.
    fn scan_rev(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError>;

    /// Applies the batch atomically; with `sync` it is durable before
    /// returning, with every write before it.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError>;

    /// Makes every write so far durable (RocksDB: flushes its memtables),
    /// on this thread: [`sync_job`](Self::sync_job), run here. An engine
    /// with nothing durable has nothing to do.
    fn sync(&self) -> Result<(), EngineError> {
        match self.sync_job()? {
            Some(job) => job(),
            None => Ok(()),
        }
    }

    /// [`sync`](Self::sync) as a job for another thread: running it makes
    /// every write issued before this call durable, while this thread goes
    /// on writing. The shard runs one before it deletes raft WAL segments
    /// whose entries its unsynced writes came from, off its own thread, so
    /// a flush of the memtables does not stall it. `None`: nothing to do
    /// (an engine with nothing durable).
    fn sync_job(&self) -> Result<Option<EngineSyncJob>, EngineError>;

    /// Approximate on-disk (or in-RAM) size of the data, in bytes.
    fn size_bytes(&self) -> u64;

    fn kind(&self) -> EngineKind;
}

/// `[start, end)` as std range bounds.
pub(crate) type SliceBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The std range bounds of `[start, end)` for an in-memory `BTreeMap`, or
/// None if the range is empty (`BTreeMap::range` panics on inverted
/// bounds).
pub(crate) fn map_bounds<'a>(start: &'a [u8], end: &'a [u8]) -> Option<SliceBounds<'a>> {
    if end.is_empty() {
        Some((Bound::Included(start), Bound::Unbounded))
    } else if start < end {
        Some((Bound::Included(start), Bound::Excluded(end)))
    } else {
        None
    }
}

/// How an engine is opened. Only RocksDB has anything to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// RocksDB's block cache (uncompressed blocks), in bytes.
    pub block_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            block_cache_bytes: rocksdb::DEFAULT_BLOCK_CACHE_BYTES,
        }
    }
}

/// Opens an engine of `kind` with default options. RocksDB keeps its files
/// in `dir` (created if missing); the memory engine ignores `dir`.
pub fn open(kind: EngineKind, dir: &Path) -> Result<Rc<dyn Engine>, EngineError> {
    open_with(kind, dir, EngineOptions::default())
}

/// [`open`] with `options`.
pub fn open_with(
    kind: EngineKind,
    dir: &Path,
    options: EngineOptions,
) -> Result<Rc<dyn Engine>, EngineError> {
    Ok(match kind {
        EngineKind::Memory => Rc::new(memory::MemoryEngine::new()),
        EngineKind::RocksDb => Rc::new(rocksdb::RocksEngine::open(dir, options.block_cache_bytes)?),
    })
}

/// One open engine of every kind, each in its own temporary directory
/// (kept alive with it): the matrix every engine-level test runs on.
///
/// The directory comes first, so that a pattern binding all three, like
/// `(_dir, kind, e)`, drops the engine before the directory (bindings drop
/// in reverse): a RocksDB engine flushes its memtables as it closes, and
/// would otherwise retry into a directory already deleted.
#[cfg(test)]
pub(crate) fn each_engine() -> Vec<(tempfile::TempDir, EngineKind, Rc<dyn Engine>)> {
    [EngineKind::Memory, EngineKind::RocksDb]
        .into_iter()
        .map(|kind| {
            let dir = tempfile::TempDir::new().unwrap();
            let engine = open(kind, dir.path()).unwrap();
            (dir, kind, engine)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    fn collect(e: &dyn Engine, start: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        e.scan(start, end, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            true
        })
        .unwrap();
        out
    }

    fn collect_rev(e: &dyn Engine, start: &[u8], end: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        e.scan_rev(start, end, &mut |k, _| {
            out.push(k.to_vec());
            true
        })
        .unwrap();
        out
    }

    fn keys(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
        pairs.iter().map(|(k, _)| k.clone()).collect()
    }

    fn sample() -> WriteBatch {
        let mut b = WriteBatch::new();
        for k in [&b"b"[..], b"a", b"\xff\x00", b"\x00", b"ab", b"c", b"\xff"] {
            b.put(k, [k, b"-v"].concat());
        }
        b
    }

    #[test]
    fn kind_parses_and_displays() {
        assert_eq!("memory".parse::<EngineKind>().unwrap(), EngineKind::Memory);
        assert_eq!(
            "RocksDB".parse::<EngineKind>().unwrap(),
            EngineKind::RocksDb
        );
        assert!(matches!(
            "bolt".parse::<EngineKind>(),
            Err(EngineError::UnknownKind(_))
        ));
        assert_eq!(EngineKind::RocksDb.to_string(), "rocksdb");
        assert_eq!(EngineKind::Memory.to_string(), "memory");
        assert!(!EngineKind::Memory.is_persistent());
    }

    #[test]
    fn get_put_delete() {
        for (_dir, kind, e) in each_engine() {
            assert_eq!(e.kind(), kind);
            assert_eq!(e.get(b"a").unwrap(), None, "{kind}");
            e.write(sample(), false).unwrap();
            assert_eq!(e.get(b"a").unwrap(), Some(b"a-v".to_vec()), "{kind}");
            assert_eq!(e.get(b"\x00").unwrap(), Some(b"\x00-v".to_vec()), "{kind}");
            let mut b = WriteBatch::new();
            b.delete(b"a").delete(b"nope");
            e.write(b, true).unwrap();
            assert_eq!(e.get(b"a").unwrap(), None, "{kind}");
            assert_eq!(e.get(b"b").unwrap(), Some(b"b-v".to_vec()), "{kind}");
        }
    }

    #[test]
    fn scan_is_ordered_and_bounded() {
        for (_dir, kind, e) in each_engine() {
            e.write(sample(), false).unwrap();
            let all = collect(&*e, b"", b"");
            let expect: Vec<Vec<u8>> = vec![
                b"\x00".to_vec(),
                b"a".to_vec(),
                b"ab".to_vec(),
                b"b".to_vec(),
                b"c".to_vec(),
                b"\xff".to_vec(),
                b"\xff\x00".to_vec(),
            ];
            assert_eq!(keys(&all), expect, "{kind}");
            assert_eq!(all[1].1, b"a-v".to_vec(), "{kind}");
            assert_eq!(
                keys(&collect(&*e, b"a", b"b")),
                vec![b"a".to_vec(), b"ab".to_vec()],
                "{kind}"
            );
            assert_eq!(keys(&collect(&*e, b"ab", b"")).len(), 5, "{kind}");
            assert!(collect(&*e, b"b", b"b").is_empty(), "{kind}");
            assert!(collect(&*e, b"c", b"b").is_empty(), "{kind}");
            // Early stop.
            let mut n = 0;
            e.scan(b"", b"", &mut |_, _| {
                n += 1;
                n < 3
            })
            .unwrap();
            assert_eq!(n, 3, "{kind}");
        }
    }

    #[test]
    fn scan_rev_is_reverse_ordered_and_bounded() {
        for (_dir, kind, e) in each_engine() {
            e.write(sample(), false).unwrap();
            let mut all = keys(&collect(&*e, b"", b""));
            all.reverse();
            assert_eq!(collect_rev(&*e, b"", b""), all, "{kind}");
            assert_eq!(
                collect_rev(&*e, b"a", b"b"),
                vec![b"ab".to_vec(), b"a".to_vec()],
                "{kind}"
            );
            assert_eq!(collect_rev(&*e, b"a", b"ab"), vec![b"a".to_vec()], "{kind}");
            assert_eq!(
                collect_rev(&*e, b"c", b""),
                vec![b"\xff\x00".to_vec(), b"\xff".to_vec(), b"c".to_vec()],
                "{kind}"
            );
            assert!(collect_rev(&*e, b"d", b"e").is_empty(), "{kind}");
            // The last raft log entry: the first pair of a reverse scan.
            let mut b = WriteBatch::new();
            for i in 1u64..=20 {
                b.put(
                    [&[keyspace::RAFT_LOG][..], &i.to_be_bytes()].concat(),
                    vec![i as u8],
                );
            }
            e.write(b, false).unwrap();
            let (s, end) = keyspace::bounds(keyspace::RAFT_LOG);
            let mut last = None;
            e.scan_rev(&s, &end, &mut |_, v| {
                last = Some(v[0]);
                false
            })
            .unwrap();
            assert_eq!(last, Some(20), "{kind}");
        }
    }

    #[test]
    fn delete_range() {
        for (_dir, kind, e) in each_engine() {
            e.write(sample(), false).unwrap();
            let mut b = WriteBatch::new();
            b.delete_range(b"a", b"b");
            e.write(b, false).unwrap();
            assert_eq!(
                keys(&collect(&*e, b"", b"")),
                vec![
                    b"\x00".to_vec(),
                    b"b".to_vec(),
                    b"c".to_vec(),
                    b"\xff".to_vec(),
                    b"\xff\x00".to_vec()
                ],
                "{kind}"
            );
            // Open-ended.
            let mut b = WriteBatch::new();
            b.delete_range(b"c", b"");
            e.write(b, false).unwrap();
            assert_eq!(
                keys(&collect(&*e, b"", b"")),
                vec![b"\x00".to_vec(), b"b".to_vec()],
                "{kind}"
            );
            // Empty and inverted ranges are no-ops.
            let mut b = WriteBatch::new();
            b.delete_range(b"z", b"a")
                .delete_range(b"b", b"b")
                .delete_range(b"q", b"");
            e.write(b, false).unwrap();
            assert_eq!(keys(&collect(&*e, b"", b"")).len(), 2, "{kind}");
        }
    }

    #[test]
    fn batch_applies_in_order() {
        for (_dir, kind, e) in each_engine() {
            let mut b = WriteBatch::new();
            b.put(b"k1", b"1")
                .put(b"k2", b"2")
                .delete(b"k1")
                .put(b"k3", b"3")
                .delete_range(b"k2", b"k3")
                .put(b"k2", b"again");
            let mut other = WriteBatch::new();
            other.put(b"k4", b"4");
            b.extend(other);
            assert_eq!(b.len(), 7);
            e.write(b, true).unwrap();
            assert_eq!(
                collect(&*e, b"", b""),
                vec![
                    (b"k2".to_vec(), b"again".to_vec()),
                    (b"k3".to_vec(), b"3".to_vec()),
                    (b"k4".to_vec(), b"4".to_vec())
                ],
                "{kind}"
            );
            e.write(WriteBatch::new(), true).unwrap();
            assert!(e.size_bytes() > 0 || kind == EngineKind::RocksDb, "{kind}");
        }
    }

    #[test]
    fn open_ended_delete_range_covers_keys_put_in_the_same_batch() {
        for (_dir, kind, e) in each_engine() {
            e.write(sample(), false).unwrap();
            let mut b = WriteBatch::new();
            b.put(b"\xff\xff\xff", b"new")
                .put(b"0", b"zero")
                .delete_range(b"c", b"")
                .put(b"d", b"after");
            e.write(b, false).unwrap();
            assert_eq!(
                keys(&collect(&*e, b"", b"")),
                vec![
                    b"\x00".to_vec(),
                    b"0".to_vec(),
                    b"a".to_vec(),
                    b"ab".to_vec(),
                    b"b".to_vec(),
                    b"d".to_vec()
                ],
                "{kind}"
            );
        }
    }

    /// The RocksDB engine keeps the MVCC versions namespace in a column
    /// family of its own; scans, reverse scans, early stops and range
    /// deletes across its bounds must still see one ordered keyspace.
    #[test]
    fn scans_and_deletes_cross_the_versions_namespace() {
        let v = keyspace::MVCC_VERSION;
        let all: Vec<Vec<u8>> = vec![
            b"\x00".to_vec(),
            vec![v - 1, 0xff],
            vec![v],
            vec![v, 0],
            vec![v, 9, 9],
            vec![v, 0xff, 0xff],
            vec![v + 1],
            vec![v + 1, 0],
            b"\xff".to_vec(),
        ];
        for (_dir, kind, e) in each_engine() {
            let mut b = WriteBatch::new();
            for k in all.iter().rev() {
                b.put(k.clone(), [&k[..], b"-v"].concat());
            }
            e.write(b, false).unwrap();
            assert_eq!(keys(&collect(&*e, b"", b"")), all, "{kind}");
            let mut rev = all.clone();
            rev.reverse();
            assert_eq!(collect_rev(&*e, b"", b""), rev, "{kind}");
            // Bounds inside, straddling, and around the namespace.
            assert_eq!(
                keys(&collect(&*e, &[v, 0], &[v, 0xff])),
                all[3..5],
                "{kind}"
            );
            assert_eq!(keys(&collect(&*e, &[v - 1], &[v, 1])), all[1..4], "{kind}");
            assert_eq!(
                keys(&collect(&*e, &[v, 1], &[v + 1, 1])),
                all[4..8],
                "{kind}"
            );
            assert_eq!(collect_rev(&*e, &[v, 1], &[v + 1, 1]), rev[1..5], "{kind}");
            assert_eq!(keys(&collect(&*e, &[v, 1], b"")), all[4..], "{kind}");
            assert_eq!(e.get(&[v, 9, 9]).unwrap(), Some(vec![v, 9, 9, b'-', b'v']));
            // An early stop in one piece ends the whole scan.
            let mut seen = Vec::new();
            e.scan(b"", b"", &mut |k, _| {
                seen.push(k.to_vec());
                k[0] != v
            })
            .unwrap();
            assert_eq!(seen, all[..3], "{kind}");
            let mut seen = Vec::new();
            e.scan_rev(b"", b"", &mut |k, _| {
                seen.push(k.to_vec());
                k[0] != v
            })
            .unwrap();
            assert_eq!(seen, rev[..4], "{kind}");
            // A range delete across the lower bound, then an open-ended one
            // from inside the namespace (with a key put in the same batch).
            let mut b = WriteBatch::new();
            b.delete_range(vec![v - 1], vec![v, 1]);
            e.write(b, false).unwrap();
            assert_eq!(
                keys(&collect(&*e, b"", b"")),
                [&all[..1], &all[4..]].concat(),
                "{kind}"
            );
            let mut b = WriteBatch::new();
            b.put(b"\xff\xff".to_vec(), b"new".to_vec())
                .put(vec![v, 5], b"in".to_vec())
                .delete_range(vec![v, 5], b"")
                .put(vec![v + 2], b"after".to_vec());
            e.write(b, false).unwrap();
            assert_eq!(
                keys(&collect(&*e, b"", b"")),
                vec![all[0].clone(), vec![v + 2]],
                "{kind}"
            );
        }
    }

    #[test]
    fn memory_size_tracks_contents() {
        let e = memory::MemoryEngine::new();
        e.write(sample(), false).unwrap();
        let full = e.size_bytes();
        assert!(full > 0);
        let mut b = WriteBatch::new();
        b.delete_range(b"", b"");
        e.write(b, false).unwrap();
        assert_eq!(e.size_bytes(), 0);
    }

    #[test]
    fn rocksdb_persists_across_reopen() {
        let dir = TempDir::new().unwrap();
        {
            let e = open(EngineKind::RocksDb, dir.path()).unwrap();
            e.write(sample(), true).unwrap();
            let mut b = WriteBatch::new();
            b.delete(b"b").delete_range(b"\xff", b"");
            e.write(b, true).unwrap();
        }
        let e = open(EngineKind::RocksDb, dir.path()).unwrap();
        assert_eq!(
            keys(&collect(&*e, b"", b"")),
            vec![
                b"\x00".to_vec(),
                b"a".to_vec(),
                b"ab".to_vec(),
                b"c".to_vec()
            ]
        );
        assert_eq!(e.get(b"ab").unwrap(), Some(b"ab-v".to_vec()));
        assert!(e.size_bytes() > 0);
    }

    #[test]
    fn rocksdb_open_creates_nested_dir() {
        let dir = TempDir::new().unwrap();
        let nested = dir.path().join("a").join("shard-0");
        let e = open(EngineKind::RocksDb, &nested).unwrap();
        e.write(sample(), false).unwrap();
        assert!(nested.exists());
    }
}
