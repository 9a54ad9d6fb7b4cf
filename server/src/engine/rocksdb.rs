//! The RocksDB engine: one RocksDB database per shard directory.
//!
//! Invariants and choices:
//! * **One DB per shard, one thread per DB.** The shard thread is the only
//!   user, so the single-threaded `DB` flavour is enough; RocksDB's own
//!   background threads (flush, compaction) come from the process-wide
//!   default environment and are shared by every shard.
//! * **WAL always on.** Every batch goes to the write-ahead log; `sync`
//!   decides whether the WAL is fsync'd before `write` returns. A batch is
//!   atomic in the WAL too, so recovery never exposes half a batch.
//! * **Modest memory.** Many instances live in one process (one per core,
//!   and tests open dozens): small memtables (16 MiB × 2), a small private
//!   block cache, bounded open files and info-log files.
//! * **Bounded iterators.** Scans set RocksDB's iterate lower/upper bounds,
//!   so a scan over one namespace never walks into (or pays for tombstones
//!   of) another.
//! * **Open-ended range deletes.** RocksDB's `DeleteRange` needs an end key;
//!   for an empty end ("to the end") the engine finds the last key at write
//!   time and deletes up to just past it. That is sound because this thread
//!   is the only writer.

use std::path::Path;

use ::rocksdb::{
    BlockBasedOptions, Cache, DBCompressionType, Options, ReadOptions, WriteOptions, DB,
};

use super::{BatchOp, Engine, EngineError, EngineKind, WriteBatch};

/// Block cache per instance.
const BLOCK_CACHE_BYTES: usize = 8 << 20;
/// Memtable size (and count) per instance.
const WRITE_BUFFER_BYTES: usize = 16 << 20;
const MAX_WRITE_BUFFERS: i32 = 2;

pub struct RocksEngine {
    db: DB,
}

impl RocksEngine {
    /// Opens (creating if missing) the database in `dir`.
    pub fn open(dir: &Path) -> Result<RocksEngine, EngineError> {
        std::fs::create_dir_all(dir)?;
        let db = DB::open(&Self::options()?, dir)?;
        Ok(RocksEngine { db })
    }

    fn options() -> Result<Options, EngineError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_write_buffer_size(WRITE_BUFFER_BYTES);
        opts.set_max_write_buffer_number(MAX_WRITE_BUFFERS);
        opts.set_max_background_jobs(2);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        opts.set_max_total_wal_size(64 << 20);
        // No WAL recycling: RocksDB (7.x) turns `recycle_log_file_num` off
        // under point-in-time WAL recovery (its default: recovery stops at
        // the first damaged record, so what survives is a prefix of what
        // was written). So every RocksDB WAL fsync is that of an appended
        // file, which also commits the file's size through the journal.
        // That is why the raft log is not kept here but in its own
        // preallocated segments (`crate::wal`), and the shard's writes here
        // are unsynced: RocksDB's WAL is fsync'd only before raft WAL
        // segments are deleted (`Engine::sync`).
        opts.set_compression_type(DBCompressionType::Snappy);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(BLOCK_CACHE_BYTES)?);
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        Ok(opts)
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

    /// The last key `>= start`, if any.
    fn last_key_from(&self, start: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        let mut it = self.db.raw_iterator_opt(Self::read_options(start, &[]));
        it.seek_to_last();
        let key = if it.valid() {
            it.key().map(|k| k.to_vec())
        } else {
            None
        };
        it.status()?;
        Ok(key)
    }
}

impl Engine for RocksEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.db.get_pinned(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        if !end.is_empty() && start >= end {
            return Ok(());
        }
        let mut it = self.db.raw_iterator_opt(Self::read_options(start, end));
        it.seek(start);
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !f(k, v) {
                return Ok(());
            }
            it.next();
        }
        it.status()?;
        Ok(())
    }

    fn scan_rev(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        if !end.is_empty() && start >= end {
            return Ok(());
        }
        let mut it = self.db.raw_iterator_opt(Self::read_options(start, end));
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
                return Ok(());
            }
            it.prev();
        }
        it.status()?;
        Ok(())
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        let wb = self.rocks_batch(batch)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }

    fn sync(&self) -> Result<(), EngineError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        let prop = |name| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        prop(::rocksdb::properties::TOTAL_SST_FILES_SIZE)
            + prop(::rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES)
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
        let mut max_put: Option<&Vec<u8>> = None;
        for op in &batch.ops {
            match op {
                BatchOp::Put(k, v) => {
                    if open_ended && max_put.is_none_or(|m| k > m) {
                        max_put = Some(k);
                    }
                    wb.put(k, v)
                }
                BatchOp::Delete(k) => wb.delete(k),
                BatchOp::DeleteRange(start, end) => {
                    if end.is_empty() {
                        let stored = self.last_key_from(start)?;
                        let pending = max_put.filter(|m| *m >= start).cloned();
                        if let Some(mut last) = stored.max(pending) {
                            last.push(0);
                            wb.delete_range(start, &last);
                        }
                    } else if start < end {
                        wb.delete_range(start, end);
                    }
                }
            }
        }
        Ok(wb)
    }
}
