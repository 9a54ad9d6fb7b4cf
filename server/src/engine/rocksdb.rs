//! The RocksDB engine: one RocksDB database per shard directory.
//!
//! Invariants and choices:
//! * **One DB per shard, one thread per DB.** The shard thread is the only
//!   user, so the single-threaded `DB` flavour is enough; RocksDB's own
//!   background threads (flush, compaction) come from the process-wide
//!   default environment and are shared by every shard.
//! * **No RocksDB WAL; durable by atomic flushes.** Everything a shard
//!   writes here derives from raft entries already durable in its raft WAL
//!   (`crate::wal`), and a restart re-applies those entries past the
//!   applied index stored here. RocksDB's own WAL would write each put's
//!   data to disk a second time (with a software CRC32C), so writes skip
//!   it, and what is durable is what memtable flushes have written to SST
//!   files. Two rules keep that a consistent prefix of the write sequence:
//!   - `atomic_flush`: every flush, RocksDB's automatic ones included,
//!     switches both column families' memtables at one point of the write
//!     sequence, so a batch is flushed whole or not at all;
//!   - our own flush ([`flush_all`]) is a manual compaction of the default
//!     family, which under `atomic_flush` first flushes *every* family at
//!     one point. (RocksDB 7.9's C API flushes one family per call; two
//!     calls would leave a crash between them with one family ahead of the
//!     other, which replay cannot mend.)
//!
//!   A crash (or the server's exit, which does not close the DB) loses the
//!   memtables; the raft WAL still holds their entries, since its segments
//!   are deleted only after a flush that covers them ([`Engine::sync_job`],
//!   run off the shard's thread). A close flushes what is unflushed.
//! * **MVCC versions in a column family of their own.** Version records
//!   (`keyspace::MVCC_VERSION`) are keyed by revision, so they arrive in
//!   key order and each memtable flush covers a key range of its own. The
//!   shard's small, rewritten-every-batch keys (applied index, MVCC meta,
//!   leases, intents) live in the default family. Were they in one family,
//!   every flushed file would span from those keys to the newest revision,
//!   overlap all of level 1, and each L0→L1 compaction would rewrite the
//!   whole of level 1 (up to 256 MiB) for 12 MiB of new data: write
//!   amplification that grew with the store's age. The engine's callers
//!   see one ordered keyspace: a scan or range delete is cut at the
//!   namespace's bounds into at most three pieces, each in one family,
//!   taken in key order. A directory from before the split has its
//!   versions moved over on open ([`RocksEngine::adopt_versions`]).
//! * **Bounded memory.** Many instances live in one process (one per core,
//!   and tests open dozens): small memtables (16 MiB × 2 for versions,
//!   4 MiB × 2 for the rest), one block cache shared by both families
//!   (64 MiB by default, filled only as blocks are read: lists that span
//!   more than the record cache read their versions from it),
//!   bounded open files and info-log files.
//! * **Bounded iterators.** Scans set RocksDB's iterate lower/upper bounds,
//!   so a scan over one namespace never walks into (or pays for tombstones
//!   of) another.
//! * **Open-ended range deletes.** RocksDB's `DeleteRange` needs an end key;
//!   for an empty end ("to the end") the engine finds the last key at write
//!   time and deletes up to just past it. That is sound because this thread
//!   is the only writer.

use std::path::Path;
use std::sync::Arc;

use ::rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily, ColumnFamilyDescriptor,
    CompactOptions, DBCompressionType, Options, ReadOptions, WriteOptions, DB,
    DEFAULT_COLUMN_FAMILY_NAME,
};

use super::{keyspace, BatchOp, Engine, EngineError, EngineKind, EngineSyncJob, WriteBatch};

/// Block cache per instance, shared by its column families, unless the
/// caller asks for another size (`metastore-server --block-cache-mib`).
pub const DEFAULT_BLOCK_CACHE_BYTES: usize = 64 << 20;
/// Memtable size (and count) of the versions family.
const VERSIONS_WRITE_BUFFER_BYTES: usize = 16 << 20;
/// Memtable size of the default family: small keys, mostly rewritten.
const DEFAULT_WRITE_BUFFER_BYTES: usize = 4 << 20;
const MAX_WRITE_BUFFERS: i32 = 2;

/// The column family of the MVCC version records.
const VERSIONS_CF: &str = "versions";
/// The versions namespace: `[VERSIONS_START, VERSIONS_END)`.
const VERSIONS_START: &[u8] = &[keyspace::MVCC_VERSION];
const VERSIONS_END: &[u8] = &[keyspace::MVCC_VERSION + 1];
/// How many version records one batch of [`RocksEngine::adopt_versions`]
/// moves.
const ADOPT_BATCH: usize = 4096;

/// One of the engine's two column families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Default,
    Versions,
}

impl Family {
    fn of(key: &[u8]) -> Family {
        if key.first() == Some(&keyspace::MVCC_VERSION) {
            Family::Versions
        } else {
            Family::Default
        }
    }
}

/// `k < end`, where an empty `end` is past every key.
fn below(k: &[u8], end: &[u8]) -> bool {
    end.is_empty() || k < end
}

/// `[start, end)` (empty `end` = to the end) cut into its pieces in each
/// family, in key order: the keys before the versions namespace, those in
/// it, and those after it. Empty pieces are left out; only the last piece
/// can be open-ended.
fn pieces<'a>(
    start: &'a [u8],
    end: &'a [u8],
) -> impl DoubleEndedIterator<Item = (Family, &'a [u8], &'a [u8])> {
    let parts: [(Family, &'a [u8], &'a [u8]); 3] = [
        (Family::Default, b"", VERSIONS_START),
        (Family::Versions, VERSIONS_START, VERSIONS_END),
        (Family::Default, VERSIONS_END, b""),
    ];
    parts.into_iter().filter_map(|(family, lo, hi)| {
        let from = start.max(lo);
        let to = match (end.is_empty(), hi.is_empty()) {
            (true, _) => hi,
            (false, true) => end,
            (false, false) => end.min(hi),
        };
        below(from, to).then_some((family, from, to))
    })
}

pub struct RocksEngine {
    /// Shared with flushes running off the shard's thread
    /// ([`Engine::sync_job`]).
    db: Arc<DB>,
}

/// Makes every write to `db` so far durable: both families' memtables
/// flushed to SST files at one point of the write sequence (see the module
/// docs). RocksDB's C API reports no error from a manual compaction, so
/// whether the flush worked is told from the database's state after it
/// ([`flush_outcome`]).
fn flush_all(db: &DB) -> Result<(), EngineError> {
    let errors = || {
        db.property_int_value(::rocksdb::properties::BACKGROUND_ERRORS)
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let before = errors();
    let default = db
        .cf_handle(DEFAULT_COLUMN_FAMILY_NAME)
        .expect("the default family is always open");
    let mut opts = CompactOptions::default();
    // The flush is what is wanted; the default family's few small files
    // above its last level may be merged, its last level is left alone, and
    // RocksDB's own compactions go on meanwhile.
    opts.set_exclusive_manual_compaction(false);
    opts.set_bottommost_level_compaction(BottommostLevelCompaction::Skip);
    db.compact_range_cf_opt(default, None::<&[u8]>, None::<&[u8]>, &opts);
    let unflushed: u64 = [DEFAULT_COLUMN_FAMILY_NAME, VERSIONS_CF]
        .iter()
        .filter_map(|name| db.cf_handle(name))
        .map(|cf| {
            db.property_int_value_cf(&cf, ::rocksdb::properties::NUM_IMMUTABLE_MEM_TABLE)
                .ok()
                .flatten()
                // Unknown: assume the worst.
                .unwrap_or(1)
        })
        .sum();
    let after = errors();
    // After a background error, whether the database takes writes now: one
    // that an error stopped refuses every write until it recovers, and then
    // a manual flush may not even have switched its memtable. A probe key
    // of the shard-state namespace, written as every write is but without
    // waiting out a write stall (a stall is no health either).
    let takes_writes = after == 0 || {
        let mut wo = RocksEngine::write_options();
        wo.set_no_slowdown(true);
        let stopped = db
            .property_int_value(::rocksdb::properties::IS_WRITE_STOPPED)
            .ok()
            .flatten()
            .unwrap_or(1);
        stopped == 0 && db.put_opt(FLUSH_PROBE_KEY, b"", &wo).is_ok()
    };
    flush_outcome(before, after, unflushed, takes_writes)
}

/// The key [`flush_all`]'s health probe writes (never read).
const FLUSH_PROBE_KEY: &[u8] = &[keyspace::SHARD_STATE, b'~', b'f', b'l', b'u', b's', b'h'];

/// Whether a flush made everything before it durable, from RocksDB's
/// background-error count before and after it, the immutable memtables
/// left unflushed after it, and whether the database takes writes.
///
/// A failed flush raises the error count, but not always during ours: once
/// an earlier background error (a full disk, say) has stopped the
/// database, a manual flush fails without counting again, and the memtable
/// whose flush failed stays, immutable and unflushed, or the flush fails
/// before it switches the memtable at all. So after any background error,
/// a flush counts only if no immutable memtable is left and the database
/// takes writes again. (A memtable being flushed right then for newer
/// writes fails this check too; the caller tries again later.) Without an
/// error the count alone is trusted, so a busy node's flushes of newer
/// writes never hold up the raft log's release.
fn flush_outcome(
    errors_before: u64,
    errors_after: u64,
    unflushed: u64,
    takes_writes: bool,
) -> Result<(), EngineError> {
    if errors_after > errors_before || (errors_after > 0 && (unflushed > 0 || !takes_writes)) {
        return Err(EngineError::FlushFailed);
    }
    Ok(())
}

impl RocksEngine {
    /// Opens (creating if missing) the database in `dir`, with a block
    /// cache of `block_cache_bytes`.
    pub fn open(dir: &Path, block_cache_bytes: usize) -> Result<RocksEngine, EngineError> {
        std::fs::create_dir_all(dir)?;
        let cache = Cache::new_lru_cache(block_cache_bytes)?;
        let mut db_opts = Self::options(&cache, DEFAULT_WRITE_BUFFER_BYTES);
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        let families = [
            ColumnFamilyDescriptor::new(
                DEFAULT_COLUMN_FAMILY_NAME,
                Self::options(&cache, DEFAULT_WRITE_BUFFER_BYTES),
            ),
            ColumnFamilyDescriptor::new(
                VERSIONS_CF,
                Self::options(&cache, VERSIONS_WRITE_BUFFER_BYTES),
            ),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, dir, families)?);
        let engine = RocksEngine { db };
        engine.adopt_versions()?;
        Ok(engine)
    }

    fn options(cache: &Cache, write_buffer_bytes: usize) -> Options {
        let mut opts = Options::default();
        opts.set_write_buffer_size(write_buffer_bytes);
        opts.set_max_write_buffer_number(MAX_WRITE_BUFFERS);
        opts.set_max_background_jobs(2);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        // Writes skip the WAL (see the module docs), so every flush must
        // take both families at one point of the write sequence.
        opts.set_atomic_flush(true);
        opts.set_compression_type(DBCompressionType::Snappy);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(cache);
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        opts
    }

    fn family(&self, family: Family) -> &ColumnFamily {
        let name = match family {
            Family::Default => DEFAULT_COLUMN_FAMILY_NAME,
            Family::Versions => VERSIONS_CF,
        };
        self.db
            .cf_handle(name)
            .expect("both column families are opened with the DB")
    }

    /// Moves version records that a directory from before the versions
    /// family keeps in the default family into the versions family. Each
    /// batch moves its records and deletes them from the default family
    /// atomically, so a crash part-way leaves every record in exactly one
    /// family, and the next open carries on.
    fn adopt_versions(&self) -> Result<(), EngineError> {
        let (default, versions) = (self.family(Family::Default), self.family(Family::Versions));
        let mut moved = false;
        loop {
            let mut wb = ::rocksdb::WriteBatch::default();
            let mut last: Option<Vec<u8>> = None;
            let mut first: Option<Vec<u8>> = None;
            let mut it = self
                .db
                .raw_iterator_cf_opt(default, Self::read_options(VERSIONS_START, VERSIONS_END));
            it.seek(VERSIONS_START);
            while it.valid() && wb.len() < ADOPT_BATCH {
                let (Some(k), Some(v)) = (it.key(), it.value()) else {
                    break;
                };
                wb.put_cf(versions, k, v);
                first.get_or_insert_with(|| k.to_vec());
                last = Some(k.to_vec());
                it.next();
            }
            it.status()?;
            drop(it);
            let (Some(first), Some(mut last)) = (first, last) else {
                break;
            };
            last.push(0);
            wb.delete_range_cf(default, &first, &last);
            self.db.write_opt(wb, &Self::write_options())?;
            moved = true;
        }
        if moved {
            flush_all(&self.db)?;
        }
        Ok(())
    }

    /// Every write skips RocksDB's WAL (see the module docs).
    fn write_options() -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        wo
    }

    fn read_options(start: &[u8], end: &[u8]) -> ReadOptions {
        let mut ro = ReadOptions::default();
        if !start.is_empty() {
            ro.set_iterate_lower_bound(start.to_vec());
        }
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        ro
    }

    /// The last key `>= start` in `family`, if any.
    fn last_key_from(&self, family: Family, start: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.family(family), Self::read_options(start, &[]));
        it.seek_to_last();
        let key = if it.valid() {
            it.key().map(|k| k.to_vec())
        } else {
            None
        };
        it.status()?;
        Ok(key)
    }

    /// Scans one piece (see [`pieces`]); false once `f` has asked to stop.
    fn scan_piece(
        &self,
        (family, start, end): (Family, &[u8], &[u8]),
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<bool, EngineError> {
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.family(family), Self::read_options(start, end));
        it.seek(start);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !f(k, v) {
                return Ok(false);
            }
            it.next();
        }
        it.status()?;
        Ok(true)
    }

    /// [`scan_piece`](Self::scan_piece) backwards.
    fn scan_piece_rev(
        &self,
        (family, start, end): (Family, &[u8], &[u8]),
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<bool, EngineError> {
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.family(family), Self::read_options(start, end));
        // With an upper bound set, seek_to_last lands on the last key < end.
        it.seek_to_last();
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if k < start {
                break;
            }
            if !f(k, v) {
                return Ok(false);
            }
            it.prev();
        }
        it.status()?;
        Ok(true)
    }
}

impl Engine for RocksEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self
            .db
            .get_pinned_cf(self.family(Family::of(key)), key)?
            .map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        for piece in pieces(start, end) {
            if !self.scan_piece(piece, f)? {
                break;
            }
        }
        Ok(())
    }

    fn scan_rev(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        for piece in pieces(start, end).rev() {
            if !self.scan_piece_rev(piece, f)? {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        let wb = self.rocks_batch(batch)?;
        self.db.write_opt(wb, &Self::write_options())?;
        if sync {
            flush_all(&self.db)?;
        }
        Ok(())
    }

    fn sync_job(&self) -> Result<Option<EngineSyncJob>, EngineError> {
        let db = self.db.clone();
        Ok(Some(Box::new(move || flush_all(&db))))
    }

    fn size_bytes(&self) -> u64 {
        [Family::Default, Family::Versions]
            .into_iter()
            .map(|family| {
                let prop = |name| {
                    self.db
                        .property_int_value_cf(self.family(family), name)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                };
                prop(::rocksdb::properties::TOTAL_SST_FILES_SIZE)
                    + prop(::rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES)
            })
            .sum()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::RocksDb
    }
}

impl RocksEngine {
    /// Translates `batch`, resolving open-ended range deletes against the
    /// current contents (on the shard's thread, the only writer).
    fn rocks_batch(&self, batch: WriteBatch) -> Result<::rocksdb::WriteBatch, EngineError> {
        let mut wb = ::rocksdb::WriteBatch::default();
        // The largest key put so far by this batch: an open-ended range
        // delete must cover it too, and the DB cannot see it yet. Tracked
        // only when the batch has such a delete (rare; most batches are
        // thousands of puts).
        let open_ended = batch
            .ops
            .iter()
            .any(|op| matches!(op, BatchOp::DeleteRange(_, end) if end.is_empty()));
        let mut max_put: Option<&[u8]> = None;
        let (default, versions) = (self.family(Family::Default), self.family(Family::Versions));
        let handle = |family| match family {
            Family::Default => default,
            Family::Versions => versions,
        };
        for op in &batch.ops {
            match op {
                BatchOp::Put(k, v) => {
                    if open_ended && max_put.is_none_or(|m| &**k > m) {
                        max_put = Some(k);
                    }
                    wb.put_cf(handle(Family::of(k)), k, v)
                }
                BatchOp::Delete(k) => wb.delete_cf(handle(Family::of(k)), k),
                BatchOp::DeleteRange(start, end) => {
                    for (family, from, to) in pieces(start, end) {
                        if to.is_empty() {
                            // Only the last piece is open-ended, and it
                            // starts past the versions namespace: every
                            // key `>= from` is in its family.
                            let stored = self.last_key_from(family, from)?;
                            let pending = max_put.filter(|m| *m >= from).map(<[u8]>::to_vec);
                            if let Some(mut last) = stored.max(pending) {
                                last.push(0);
                                wb.delete_range_cf(handle(family), from, &last);
                            }
                        } else {
                            wb.delete_range_cf(handle(family), from, to);
                        }
                    }
                }
            }
        }
        Ok(wb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    const V: u8 = keyspace::MVCC_VERSION;

    #[test]
    fn a_flush_counts_only_if_nothing_failed_or_is_left() {
        let ok = |before, after, unflushed, takes_writes| {
            flush_outcome(before, after, unflushed, takes_writes).is_ok()
        };
        // No background error ever: the count is trusted.
        assert!(ok(0, 0, 0, true));
        assert!(ok(0, 0, 1, true));
        // The flush itself failed.
        assert!(!ok(0, 1, 0, true));
        assert!(!ok(2, 3, 0, true));
        // An earlier error stopped the database: the failed memtable is
        // still there, or the flush never switched the memtable (writes
        // refused or stalled), though the count did not move.
        assert!(!ok(1, 1, 1, true));
        assert!(!ok(1, 1, 0, false));
        // After an earlier error the database recovered and flushed all.
        assert!(ok(1, 1, 0, true));
    }

    #[test]
    fn a_flush_of_a_healthy_database_counts() {
        let dir = TempDir::new().unwrap();
        let engine = RocksEngine::open(dir.path(), 1 << 20).unwrap();
        let mut batch = WriteBatch::new();
        batch.put(b"k".to_vec(), b"v".to_vec());
        engine.write(batch, false).unwrap();
        flush_all(&engine.db).unwrap();
    }

    #[test]
    fn pieces_cut_a_range_at_the_versions_namespace() {
        use Family::{Default as D, Versions as Vs};
        fn cut<'a>(start: &'a [u8], end: &'a [u8]) -> Vec<(Family, &'a [u8], &'a [u8])> {
            pieces(start, end).collect()
        }
        let (v, w) = (&[V][..], &[V + 1][..]);
        assert_eq!(
            cut(b"", b""),
            vec![(D, &b""[..], v), (Vs, v, w), (D, w, &b""[..])]
        );
        assert_eq!(cut(b"a", b"b"), vec![(D, &b"a"[..], &b"b"[..])]);
        assert_eq!(cut(&[V, 1], &[V, 2]), vec![(Vs, &[V, 1][..], &[V, 2][..])]);
        assert_eq!(
            cut(&[V, 1], b""),
            vec![(Vs, &[V, 1][..], w), (D, w, &b""[..])]
        );
        assert_eq!(
            cut(b"a", &[V, 0]),
            vec![(D, &b"a"[..], v), (Vs, v, &[V, 0][..])]
        );
        assert_eq!(cut(b"a", v), vec![(D, &b"a"[..], v)]);
        assert_eq!(cut(w, b""), vec![(D, w, &b""[..])]);
        assert!(cut(b"b", b"a").is_empty());
        assert!(cut(&[V, 1], &[V, 1]).is_empty());
    }

    /// The keys of `family`, read straight from RocksDB.
    fn family_keys(e: &RocksEngine, family: Family) -> Vec<Vec<u8>> {
        let mut it = e.db.raw_iterator_cf(e.family(family));
        it.seek_to_first();
        let mut out = Vec::new();
        while it.valid() {
            out.push(it.key().unwrap().to_vec());
            it.next();
        }
        out
    }

    #[test]
    fn version_records_live_in_their_own_family() {
        let dir = TempDir::new().unwrap();
        let e = RocksEngine::open(dir.path(), DEFAULT_BLOCK_CACHE_BYTES).unwrap();
        let mut b = WriteBatch::new();
        b.put(vec![V, 1], b"one".to_vec())
            .put(b"Sapplied".to_vec(), b"1".to_vec())
            .put(b"mcurrent".to_vec(), b"1".to_vec());
        e.write(b, true).unwrap();
        assert_eq!(family_keys(&e, Family::Versions), vec![vec![V, 1]]);
        assert_eq!(
            family_keys(&e, Family::Default),
            vec![b"Sapplied".to_vec(), b"mcurrent".to_vec()]
        );
    }

    /// Entries in `family`'s memtables, mutable and immutable.
    fn memtable_entries(e: &RocksEngine, family: Family) -> u64 {
        let cf = e.family(family);
        [
            ::rocksdb::properties::NUM_ENTRIES_ACTIVE_MEM_TABLE,
            ::rocksdb::properties::NUM_ENTRIES_IMM_MEM_TABLES,
        ]
        .into_iter()
        .map(|p| e.db.property_int_value_cf(cf, p).unwrap().unwrap())
        .sum()
    }

    /// Writes skip RocksDB's WAL, so what survives a crash is what flushes
    /// wrote. A sync job, run on another thread as the shard runs it, must
    /// flush both families at once: a copy of the directory taken while the
    /// DB is still open (what a crash leaves) holds every write before the
    /// job, in both families, and none after it.
    #[test]
    fn a_sync_job_flushes_both_families_and_a_crash_keeps_what_it_flushed() {
        let dir = TempDir::new().unwrap();
        let e = RocksEngine::open(dir.path(), DEFAULT_BLOCK_CACHE_BYTES).unwrap();
        let mut b = WriteBatch::new();
        b.put(vec![V, 1], b"one".to_vec())
            .put(b"Sapplied".to_vec(), b"1".to_vec());
        e.write(b, false).unwrap();
        for family in [Family::Default, Family::Versions] {
            assert!(memtable_entries(&e, family) > 0, "{family:?}");
        }
        let job = e.sync_job().unwrap().expect("rocksdb has work to sync");
        std::thread::spawn(job).join().unwrap().unwrap();
        for family in [Family::Default, Family::Versions] {
            assert_eq!(memtable_entries(&e, family), 0, "{family:?}");
        }
        let mut b = WriteBatch::new();
        b.put(vec![V, 2], b"two".to_vec())
            .put(b"Sapplied".to_vec(), b"2".to_vec());
        e.write(b, false).unwrap();

        let crashed = TempDir::new().unwrap();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let f = f.unwrap();
            if f.file_name() != "LOCK" {
                std::fs::copy(f.path(), crashed.path().join(f.file_name())).unwrap();
            }
        }
        let after = RocksEngine::open(crashed.path(), DEFAULT_BLOCK_CACHE_BYTES).unwrap();
        assert_eq!(family_keys(&after, Family::Versions), vec![vec![V, 1]]);
        assert_eq!(after.get(b"Sapplied").unwrap(), Some(b"1".to_vec()));
        // The live DB still has the later write; a close flushes it.
        assert_eq!(e.get(b"Sapplied").unwrap(), Some(b"2".to_vec()));
        drop(e);
        let reopened = RocksEngine::open(dir.path(), DEFAULT_BLOCK_CACHE_BYTES).unwrap();
        assert_eq!(
            family_keys(&reopened, Family::Versions),
            vec![vec![V, 1], vec![V, 2]]
        );
    }

    /// A directory written before the versions family existed keeps its
    /// version records in the default family; opening it moves them, in
    /// more than one batch, and every key still reads back in order.
    #[test]
    fn open_adopts_versions_from_the_default_family() {
        let dir = TempDir::new().unwrap();
        let n = ADOPT_BATCH * 2 + 7;
        let version = |i: usize| [&[V][..], &(i as u64).to_be_bytes()].concat();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            let old = DB::open(&opts, dir.path()).unwrap();
            let mut wb = ::rocksdb::WriteBatch::default();
            for i in 0..n {
                wb.put(version(i), i.to_string());
            }
            wb.put(b"Sapplied", b"9");
            wb.put(b"zz", b"after");
            old.write(wb).unwrap();
        }
        for _ in 0..2 {
            let e = RocksEngine::open(dir.path(), DEFAULT_BLOCK_CACHE_BYTES).unwrap();
            assert_eq!(
                family_keys(&e, Family::Default),
                vec![b"Sapplied".to_vec(), b"zz".to_vec()]
            );
            assert_eq!(family_keys(&e, Family::Versions).len(), n);
            let mut seen = Vec::new();
            e.scan(b"", b"", &mut |k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                true
            })
            .unwrap();
            assert_eq!(seen.len(), n + 2);
            assert_eq!(seen[0].0, b"Sapplied");
            for (i, (k, v)) in seen[1..=n].iter().enumerate() {
                assert_eq!((k, v), (&version(i), &i.to_string().into_bytes()));
            }
            assert_eq!(seen[n + 1].0, b"zz");
        }
    }
}
