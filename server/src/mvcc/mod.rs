//! etcd's multi-version key/value store, for the keys of one shard.
//!
//! Every change to a key is kept as a new *version*, addressed by the
//! revision of the write that made it, so the store can answer "what did the
//! keyspace look like at revision R" until R is compacted away. This is
//! etcd's `mvcc` package rebuilt on the shared [`Engine`]:
//!
//! * **Version records** (the source of truth) live in the engine under the
//!   `v` namespace, keyed by revision (`codec` documents the layout). A put
//!   writes the full `KeyValue`; a delete writes a tombstone.
//! * **The key index** ([`key_index`]) maps each key to its list of
//!   revisions, so a read at R finds the right version with one binary
//!   search and one engine read. It is rebuilt by scanning the `v` records
//!   in revision order on [`Mvcc::open`].
//! * **The record cache** (`record_cache`) keeps the versions reads
//!   fetched, decoded, by revision, so lists that come back find them
//!   without the engine read. Records are immutable, so it never goes
//!   stale.
//! * **Meta** (`m` namespace) holds the compacted revision and the current
//!   revision (the latter because compaction may delete the newest records,
//!   e.g. when the last write was a delete).
//!
//! # Revisions
//!
//! Revisions are chosen *before* a write is proposed to raft, globally across
//! shards; this shard applies writes in raft order and sees an increasing but
//! sparse sequence (5, 9, 12...). Every change made through one
//! [`MvccWrite`] gets the same main revision, and a sub-revision (its
//! position within the write) orders changes inside it, exactly like etcd's
//! `revision{main, sub}`.
//!
//! Writes normally arrive in revision order, but not always: a cross-shard
//! txn commits on a participant at the revision its primary chose, and an
//! unrelated single-shard write with a higher revision may have been applied
//! there first (the txn's keys were locked by its intent, so none of *them*
//! moved). The store therefore requires monotonic revisions *per key*, not
//! per shard: a write at `rev` reads the state at `rev` (plus its own
//! changes), may change a key only if that key has no version at or above
//! `rev` (else [`MvccError::StaleRevision`], nothing changed), and when `rev`
//! is not above the current revision its sub-revisions continue after any
//! records already stored at `rev`, so version records never collide.
//!
//! # Invariants
//!
//! * Per key, versions are strictly increasing by revision; a tombstone ends
//!   the key's generation and the next put starts a new one (version 1,
//!   create revision = that put's revision).
//! * `compacted <= current`. Reads at `rev < compacted` fail with
//!   [`MvccError::Compacted`]; a read at exactly `compacted` works.
//! * A write that changes nothing (e.g. a delete of missing keys, a
//!   read-only txn) consumes no revision: `finish` returns an empty batch
//!   and `current_revision` stays.
//! * Nothing becomes visible to readers of [`Mvcc`] until
//!   [`MvccWrite::finish`]; until then the changes live in the write's
//!   overlay (which its own reads see, as an etcd txn sees its own writes).
//!   A dropped `MvccWrite` leaves no trace, and a [`MvccWrite::txn`] that
//!   fails half-way is rolled back out of the overlay.
//! * The store never writes to the engine itself: `finish` and `compact`
//!   return a [`WriteBatch`] that the caller must write (atomically with its
//!   own metadata, e.g. the raft applied index) *before the next read*,
//!   because the index already points at the records in it.
//! * Only keys in the `v` and `m` namespaces are used.
//!
//! # A write's events, and their `prev_kv`
//!
//! [`MvccWrite::finish_with_events`] returns every change as a
//! [`WriteEvent`] for the watch ring. A change replaces a version the write
//! has usually never read: a plain put takes the create revision, version
//! and lease it needs from the key index, and a delete its keys. So an
//! event's `prev_kv` is filled only when the write read the previous
//! version anyway (the request asked for `prev_kv`, `ignore_value`, or the
//! version was this write's own); otherwise the event names where it is
//! stored ([`StoredPrev`]) and [`Mvcc::read_prev`] reads it when a watcher
//! wants it. etcd does the same: it reads a watch event's previous version
//! when it sends the event, and sends the event without one if that
//! version has been compacted away meanwhile.
//!
//! # Shards
//!
//! One shard owns part of the keyspace. Reads, compares and multi-key
//! operations take an `owns` predicate and ignore every key it rejects, so
//! the gateway can merge per-shard answers: ranges, counts and deletions are
//! per-shard partial results, compares report a [`CompareOutcome`] that
//! `metastore_proto::txn::combine_outcomes` merges, and txn ops on keys this
//! shard does not own get empty responses of the right kind.

mod codec;
pub mod key_index;
mod record_cache;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::rc::Rc;

use metastore_proto::etcdserverpb::{
    compare, range_request, request_op, response_op, Compare, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseOp, TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};
use metastore_proto::range;
use metastore_proto::shardpb::CompareOutcome;
use prost::bytes::Bytes;

use crate::chunks::Chunks;
use crate::engine::{keyspace, Engine, EngineError, WriteBatch};
use key_index::{Entry, KeyHistory, KeyIndex, Revision};
use record_cache::RecordCache;

/// A revision (etcd's main revision).
pub type Rev = i64;

/// The key filter of a shard: true for keys this shard owns.
pub type Owns<'a> = &'a dyn Fn(&[u8]) -> bool;

/// Errors of the MVCC store. Messages follow etcd's where etcd has one.
#[derive(Debug, thiserror::Error)]
pub enum MvccError {
    /// The revision asked for is below the compacted revision.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The revision asked for has not happened yet (on this shard).
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// A put with `ignore_value`/`ignore_lease` of a key that does not exist.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A write at `rev` of a key that already has a version at revision
    /// `latest >= rev` (or a write at a revision <= 0).
    #[error("mvcc: write revision {rev} is not above the key's revision {latest}")]
    StaleRevision { rev: Rev, latest: Rev },
    /// A request the store cannot apply as asked (e.g. a write inside a
    /// read-only txn, or a txn path that does not fit the txn).
    #[error("mvcc: invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine holds something the store did not write.
    #[error("mvcc: corrupt store: {0}")]
    Corrupt(String),
}

/// A key range in etcd's terms.
#[derive(Debug, Clone, Copy)]
enum KeyRange<'a> {
    /// `range_end` empty: just `key`.
    Single(&'a [u8]),
    /// `[start, end)`; `None` = every key `>= start` (`range_end` "\0").
    Span(&'a [u8], Option<&'a [u8]>),
}

impl<'a> KeyRange<'a> {
    fn new(key: &'a [u8], range_end: &'a [u8]) -> KeyRange<'a> {
        if range_end.is_empty() {
            KeyRange::Single(key)
        } else if range_end == [0] {
            KeyRange::Span(key, None)
        } else {
            KeyRange::Span(key, Some(range_end))
        }
    }

    fn contains(&self, k: &[u8]) -> bool {
        match *self {
            KeyRange::Single(key) => k == key,
            KeyRange::Span(start, end) => k >= start && end.is_none_or(|e| k < e),
        }
    }
}

/// A version replaced by a change and not read by the write: where its
/// record is, and the lease it was attached to (see "A write's events").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPrev {
    pub rev: Revision,
    pub lease: i64,
}

/// The version a change replaced, as far as the write learned it (see "A
/// write's events, and their `prev_kv`").
#[derive(Debug, Clone, PartialEq)]
pub enum Replaced {
    /// The key did not exist (or its latest version was a deletion).
    Nothing,
    /// The write read it: the request asked for `prev_kv` or
    /// `ignore_value`, or it was the write's own earlier change.
    Read(KeyValue),
    /// Known to the key index only: [`Mvcc::read_prev`] reads it.
    Stored(StoredPrev),
}

/// One change of a finished write, as a watch delivers it (see "A write's
/// events, and their `prev_kv`").
#[derive(Debug, Clone, PartialEq)]
pub struct WriteEvent {
    pub kind: EventType,
    /// The new version; for a deletion, the key at the deleting revision.
    pub kv: KeyValue,
    /// The version this change replaced (the key's lease attachments
    /// follow it).
    pub replaced: Replaced,
    /// For a key this write changed before (a txn may put a key and then
    /// delete it with a range ending in `\0`): what the write's first
    /// change of it replaced. A watch sends that as the `prev_kv`, as etcd
    /// reads an event's previous version at the revision before it.
    pub before_write: Option<Box<Replaced>>,
}

impl WriteEvent {
    /// The lease of the version this change replaced (0: none, or the key
    /// did not exist).
    pub fn prev_lease(&self) -> i64 {
        match &self.replaced {
            Replaced::Read(kv) => kv.lease,
            Replaced::Stored(p) => p.lease,
            Replaced::Nothing => 0,
        }
    }

    pub fn key(&self) -> &[u8] {
        &self.kv.key
    }

    /// The previous version a watch sends with this event (see
    /// `before_write`). etcd sends none with a put that creates its key
    /// (version 1), even when the same revision deleted an older one.
    pub fn watched_prev(&self) -> &Replaced {
        if self.kind == EventType::Put && self.kv.version == 1 {
            return &Replaced::Nothing;
        }
        self.before_write.as_deref().unwrap_or(&self.replaced)
    }

    pub fn revision(&self) -> i64 {
        self.kv.mod_revision
    }
}

/// Where a candidate version's full record is.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// In the engine, at this revision.
    Stored(Revision),
    /// In the overlay of the current write.
    Pending(&'a KeyValue),
}

/// A live version found by a read, with the metadata the index knows, so
/// that filters and most sorts need no engine read.
#[derive(Debug, Clone, Copy)]
struct Candidate<'a> {
    key: &'a [u8],
    create: Rev,
    modr: Rev,
    version: i64,
    lease: i64,
    source: Source<'a>,
}

impl<'a> Candidate<'a> {
    fn stored(key: &'a [u8], e: Entry) -> Candidate<'a> {
        Candidate {
            key,
            create: e.create,
            modr: e.rev.main,
            version: e.version,
            lease: e.lease,
            source: Source::Stored(e.rev),
        }
    }

    /// The version's `KeyValue` without its value (for `keys_only`): all
    /// of it is known without reading the record.
    fn without_value(&self) -> KeyValue {
        KeyValue {
            key: Bytes::copy_from_slice(self.key),
            create_revision: self.create,
            mod_revision: self.modr,
            version: self.version,
            lease: self.lease,
            value: Bytes::new(),
        }
    }

    fn pending(kv: &'a KeyValue) -> Candidate<'a> {
        Candidate {
            key: &kv.key,
            create: kv.create_revision,
            modr: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
            source: Source::Pending(kv),
        }
    }
}

/// The multi-version store of one shard.
pub struct Mvcc {
    engine: Rc<dyn Engine>,
    index: KeyIndex,
    current: Rev,
    compacted: Rev,
    /// Records reads fetched recently (see `record_cache`).
    cache: RefCell<RecordCache>,
    /// The emptied change vector of the last write, lent to the next one
    /// (see `SPARE_CHANGES`).
    spare_changes: Vec<Change>,
    /// Where writes encode their version records (see
    /// `RECORD_CHUNK_BYTES`).
    record_chunks: Chunks,
}

/// The largest change vector kept for the next write: a put's and a small
/// txn's fit, and a delete of a million keys does not keep its vector.
const SPARE_CHANGES: usize = 16;

/// Version records are encoded into [`Chunks`] of this size, so a record
/// costs no allocation of its own. A record lives until the engine has it
/// (the shard's held writes reach RocksDB within a tick), so a chunk does
/// not outlive its records by long.
const RECORD_CHUNK_BYTES: usize = 64 << 10;

/// The default bound of a store's record cache (`RecordCache`), in bytes.
pub const DEFAULT_RECORD_CACHE_BYTES: usize = 16 << 20;

impl std::fmt::Debug for Mvcc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mvcc")
            .field("engine", &self.engine.kind())
            .field("keys", &self.index.len())
            .field("current", &self.current)
            .field("compacted", &self.compacted)
            .finish()
    }
}

impl Mvcc {
    /// Opens the store over `engine`, rebuilding the key index from the
    /// version records and reading the meta revisions.
    pub fn open(engine: Rc<dyn Engine>) -> Result<Mvcc, MvccError> {
        let compacted = match engine.get(&codec::meta_compact_key())? {
            Some(v) => codec::decode_rev_value(&v)?,
            None => 0,
        };
        let mut current = match engine.get(&codec::meta_current_key())? {
            Some(v) => codec::decode_rev_value(&v)?,
            None => 0,
        };
        let mut index = KeyIndex::new();
        let mut failure = None;
        let (start, end) = keyspace::bounds(keyspace::MVCC_VERSION);
        engine.scan(&start, &end, &mut |k, v| {
            let decoded = codec::decode_version_key(k)
                .and_then(|rev| codec::decode_record(v).map(|(t, kv)| (rev, t, kv)));
            match decoded {
                Ok((rev, tombstone, kv)) => {
                    let entry = Entry {
                        rev,
                        create: if tombstone { 0 } else { kv.create_revision },
                        version: if tombstone { 0 } else { kv.version },
                        lease: if tombstone { 0 } else { kv.lease },
                        tombstone,
                    };
                    index.push(&kv.key, entry);
                    current = current.max(rev.main);
                    true
                }
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(Mvcc {
            engine,
            index,
            current: current.max(compacted),
            compacted,
            cache: RefCell::new(RecordCache::new(DEFAULT_RECORD_CACHE_BYTES)),
            spare_changes: Vec::new(),
            record_chunks: Chunks::new(RECORD_CHUNK_BYTES),
        })
    }

    /// Bounds the cache of recently read version records to `bytes` (0
    /// turns it off), emptying it.
    pub fn set_record_cache_bytes(&mut self, bytes: usize) {
        self.cache = RefCell::new(RecordCache::new(bytes));
    }

    /// The highest revision that changed anything on this shard (or the
    /// floor set by [`Mvcc::set_current_revision`]); 0 initially.
    pub fn current_revision(&self) -> Rev {
        self.current
    }

    pub fn compacted_revision(&self) -> Rev {
        self.compacted
    }

    /// Raises the current revision to `rev` (no-op if not higher) without
    /// changing any key, e.g. so a compaction at a global revision this
    /// shard has not written at is not refused as a future revision.
    /// Returns the meta update for the caller to persist.
    pub fn set_current_revision(&mut self, rev: Rev) -> WriteBatch {
        let mut batch = WriteBatch::new();
        if rev > self.current {
            self.current = rev;
            batch.put(codec::meta_current_key(), codec::encode_rev_value(rev));
        }
        batch
    }

    /// The number of keys with any history (live or not) in the index.
    pub fn key_count(&self) -> usize {
        self.index.len()
    }

    /// The engine this store reads from.
    pub fn engine(&self) -> &Rc<dyn Engine> {
        &self.engine
    }

    fn check_read_rev(&self, rev: Rev) -> Result<Rev, MvccError> {
        if rev <= 0 {
            return Ok(Rev::MAX);
        }
        if rev < self.compacted {
            return Err(MvccError::Compacted);
        }
        Ok(rev)
    }

    /// Reads the full version record at `rev` of `key`, from the record
    /// cache or else the engine (then caching it).
    fn fetch(&self, key: &[u8], rev: Revision) -> Result<KeyValue, MvccError> {
        if let Some(kv) = self.cache.borrow_mut().get(rev) {
            return Ok(kv);
        }
        let bytes = self.engine.get(&codec::version_key(rev))?.ok_or_else(|| {
            MvccError::Corrupt(format!(
                "missing version record {}.{} of key {key:?}",
                rev.main, rev.sub
            ))
        })?;
        let (tombstone, kv) = codec::decode_record_owned(Bytes::from(bytes))?;
        if tombstone || kv.key != key {
            return Err(MvccError::Corrupt(format!(
                "version record {}.{} does not hold key {key:?}",
                rev.main, rev.sub
            )));
        }
        self.cache.borrow_mut().insert(rev, kv.clone());
        Ok(kv)
    }

    /// The replaced version an event names (see "A write's events"), or
    /// `None` if it is gone (compacted since), as etcd sends such an event
    /// without its `prev_kv`.
    pub fn read_prev(&self, key: &[u8], prev: &StoredPrev) -> Option<KeyValue> {
        match self.fetch(key, prev.rev) {
            Ok(kv) => Some(kv),
            Err(MvccError::Engine(e)) => {
                tracing::warn!(error = %e, "reading a watch event's previous version failed");
                None
            }
            Err(_) => None,
        }
    }

    fn materialize(&self, c: &Candidate<'_>) -> Result<KeyValue, MvccError> {
        match c.source {
            Source::Stored(rev) => self.fetch(c.key, rev),
            Source::Pending(kv) => Ok(kv.clone()),
        }
    }

    /// Every live, owned key of `range` at `rev`, in key order.
    fn candidates_at<'a>(
        &'a self,
        range: KeyRange<'_>,
        rev: Rev,
        owns: Owns<'_>,
    ) -> Vec<Candidate<'a>> {
        self.counted_candidates_at(range, rev, owns, usize::MAX).0
    }

    /// The first `keep` of [`Mvcc::candidates_at`], and how many there are
    /// in all (a list's `count` visits every key; its page needs only the
    /// first ones).
    fn counted_candidates_at<'a>(
        &'a self,
        range: KeyRange<'_>,
        rev: Rev,
        owns: Owns<'_>,
        keep: usize,
    ) -> (Vec<Candidate<'a>>, usize) {
        let mut out = Vec::new();
        let mut count = 0;
        let mut visit = |k: &'a [u8], h: &'a KeyHistory| {
            if owns(k) {
                if let Some(e) = h.live_at(rev) {
                    if count < keep {
                        out.push(Candidate::stored(k, e));
                    }
                    count += 1;
                }
            }
        };
        match range {
            KeyRange::Single(key) => {
                if let Some((k, h)) = self.index.get_key_value(key) {
                    visit(k, h);
                }
            }
            KeyRange::Span(start, end) => self.index.range(start, end, &mut |k, h| {
                visit(k, h);
                true
            }),
        }
        (out, count)
    }

    /// etcd's Range for the keys this shard owns, at revision `rev` (the
    /// caller resolves `req.revision`; `rev <= 0` reads the latest state).
    /// `rev` below the compacted revision fails with `Compacted`; future
    /// revisions are the caller's to refuse. `header` is left `None`.
    pub fn range(
        &self,
        req: &RangeRequest,
        rev: Rev,
        owns: Owns<'_>,
    ) -> Result<RangeResponse, MvccError> {
        let rev = self.check_read_rev(rev)?;
        let (cands, count) = self.counted_candidates_at(
            KeyRange::new(&req.key, &req.range_end),
            rev,
            owns,
            candidates_needed(req),
        );
        build_range(self, req, cands, count)
    }

    /// The live value of `key` at `rev` (`rev <= 0` = latest), ignoring
    /// ownership. A convenience over [`Mvcc::range`].
    pub fn get(&self, key: &[u8], rev: Rev) -> Result<Option<KeyValue>, MvccError> {
        let rev = self.check_read_rev(rev)?;
        self.get_unchecked(key, rev)
    }

    /// [`Mvcc::get`] without the compaction check (a write reads the keys
    /// it changes even below the compacted revision: their newest version is
    /// never compacted away).
    fn get_unchecked(&self, key: &[u8], rev: Rev) -> Result<Option<KeyValue>, MvccError> {
        match self
            .index
            .get_key_value(key)
            .and_then(|(k, h)| h.live_at(rev).map(|e| (k, e)))
        {
            Some((k, e)) => Ok(Some(self.fetch(k, e.rev)?)),
            None => Ok(None),
        }
    }

    /// Calls `f` with every live key/value at the latest revision whose key
    /// is in `[start, end)` (etcd range-end conventions: empty `end` = the
    /// single key, "\0" = to the end), in key order, until it returns false.
    /// Useful to rebuild derived state such as lease attachments.
    pub fn for_each_live(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(KeyValue) -> bool,
    ) -> Result<(), MvccError> {
        for c in self.candidates_at(KeyRange::new(start, end), Rev::MAX, &|_| true) {
            if !f(self.materialize(&c)?) {
                break;
            }
        }
        Ok(())
    }

    /// Evaluates every compare of the txn tree, in
    /// `metastore_proto::txn::canonical_compares` order, at `rev` (`<= 0` =
    /// latest) over the keys this shard owns.
    pub fn evaluate_compares(
        &self,
        txn: &TxnRequest,
        rev: Rev,
        owns: Owns<'_>,
    ) -> Result<Vec<CompareOutcome>, MvccError> {
        let rev = self.check_read_rev(rev)?;
        metastore_proto::txn::canonical_compares(txn)
            .into_iter()
            .map(|c| {
                let cands = self.candidates_at(KeyRange::new(&c.key, &c.range_end), rev, owns);
                compare_outcome(self, c, &cands)
            })
            .collect()
    }

    /// Applies a read-only txn along `path` at `rev` (`<= 0` = latest): the
    /// cross-shard read path. A Range op's own `revision` wins over `rev`
    /// when set, as in etcd. A write op on the path is refused.
    pub fn txn_read(
        &self,
        txn: &TxnRequest,
        path: &[bool],
        rev: Rev,
        owns: Owns<'_>,
    ) -> Result<TxnResponse, MvccError> {
        let mut apply = |op: &RequestOp| -> Result<response_op::Response, MvccError> {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    let at = if r.revision > 0 { r.revision } else { rev };
                    Ok(response_op::Response::ResponseRange(
                        self.range(r, at, owns)?,
                    ))
                }
                _ => Err(MvccError::InvalidRequest(
                    "write operation in a read-only txn".into(),
                )),
            }
        };
        walk_txn(txn, path, &mut apply).map(|(resp, _)| resp)
    }

    /// Begins the write at revision `rev`. See [`MvccWrite`]. `rev` is
    /// normally above [`Mvcc::current_revision`]; a lower one is accepted as
    /// long as every key it changes has no version at or above `rev` (see
    /// the module docs), and it reads the state at `rev`.
    pub fn write(&mut self, rev: Rev) -> MvccWrite<'_> {
        // Below the current revision, records at `rev` may already exist
        // (another part of the same revision): continue their sub-revisions.
        let sub_base = if rev <= self.current && rev > 0 {
            self.next_sub(rev)
        } else {
            Ok(0)
        };
        let (sub_base, broken) = match sub_base {
            Ok(s) => (s, None),
            Err(e) => (0, Some(e)),
        };
        let changes = std::mem::take(&mut self.spare_changes);
        MvccWrite {
            mvcc: self,
            rev,
            sub_base,
            broken,
            changes,
            latest: None,
        }
    }

    /// The first free sub-revision of revision `rev` in the engine.
    fn next_sub(&self, rev: Rev) -> Result<i64, MvccError> {
        let start = codec::version_key(Revision { main: rev, sub: 0 });
        let end = codec::version_key(Revision {
            main: rev + 1,
            sub: 0,
        });
        let mut last = None;
        self.engine.scan_rev(&start, &end, &mut |k, _| {
            last = Some(k.to_vec());
            false
        })?;
        match last {
            Some(k) => Ok(codec::decode_version_key(&k)?.sub + 1),
            None => Ok(0),
        }
    }

    /// Compacts history at `rev`: per key, keeps the newest version below
    /// `rev` if it is live and still read at `rev`, and every change at
    /// `rev` or above (a watch from `rev` replays `rev`'s changes, a delete
    /// included, kept with the version it ended until a compaction above
    /// it; see `KeyHistory::compact`), drops everything older. Afterwards
    /// reads below `rev` fail with `Compacted`. Returns the engine deletions
    /// and the meta update for the caller to write.
    pub fn compact(&mut self, rev: Rev) -> Result<WriteBatch, MvccError> {
        if rev > self.current {
            return Err(MvccError::FutureRevision);
        }
        if rev <= self.compacted {
            return Err(MvccError::Compacted);
        }
        let mut batch = WriteBatch::new();
        let cache = self.cache.get_mut();
        self.index.compact(rev, &mut |_, r| {
            batch.delete(codec::version_key(r));
            cache.remove(r);
        });
        self.compacted = rev;
        batch.put(codec::meta_compact_key(), codec::encode_rev_value(rev));
        Ok(batch)
    }

    /// Replays history: calls `f` with every event (a put or a delete) of
    /// revision `>= from`, in revision order, until it returns false. With
    /// `with_prev`, each event carries its `prev_kv` when the previous
    /// version is still present. `from` below the compacted revision fails
    /// with `Compacted` (etcd answers such a watch with its compact
    /// revision).
    pub fn history(
        &self,
        from: Rev,
        with_prev: bool,
        f: &mut dyn FnMut(Event) -> bool,
    ) -> Result<(), MvccError> {
        if from < self.compacted {
            return Err(MvccError::Compacted);
        }
        let start = codec::version_key(Revision {
            main: from.max(0),
            sub: 0,
        });
        let (_, end) = keyspace::bounds(keyspace::MVCC_VERSION);
        let mut records = Vec::new();
        let mut failure = None;
        // Decode in batches so `f` (which may be slow) does not run while
        // the engine is being iterated.
        let mut next = start;
        loop {
            records.clear();
            self.engine.scan(&next, &end, &mut |k, v| {
                match codec::decode_version_key(k)
                    .and_then(|rev| codec::decode_record(v).map(|(t, kv)| (rev, t, kv)))
                {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
                records.len() < 256
            })?;
            if let Some(e) = failure.take() {
                return Err(e);
            }
            let Some(&(last, _, _)) = records.last() else {
                return Ok(());
            };
            let full = records.len() == 256;
            for (rev, tombstone, kv) in records.drain(..) {
                // The version before the event's revision, as etcd reads it
                // (also for a key changed twice in one revision).
                let before = Revision {
                    main: rev.main,
                    sub: 0,
                };
                // etcd sends none with a put that creates its key.
                let creates = !tombstone && kv.version == 1;
                let prev_kv = match self
                    .index
                    .get_key_value(&kv.key)
                    .and_then(|(k, h)| h.live_before(before).map(|e| (k, e)))
                {
                    Some((k, e)) if with_prev && !creates => Some(self.fetch(k, e.rev)?),
                    _ => None,
                };
                let event = Event {
                    r#type: if tombstone {
                        EventType::Delete
                    } else {
                        EventType::Put
                    } as i32,
                    kv: Some(kv),
                    prev_kv,
                };
                if !f(event) {
                    return Ok(());
                }
            }
            if !full {
                return Ok(());
            }
            next = codec::version_key(Revision {
                main: last.main,
                sub: last.sub + 1,
            });
        }
    }
}

/// Convenience for the single-shard fast path: evaluates the txn's compares
/// at `rev` on this shard alone and returns etcd's compare path.
pub fn compute_path(
    mvcc: &Mvcc,
    txn: &TxnRequest,
    rev: Rev,
    owns: Owns<'_>,
) -> Result<Vec<bool>, MvccError> {
    let outcomes = mvcc.evaluate_compares(txn, rev, owns)?;
    let results = metastore_proto::txn::combine_outcomes(&[outcomes]);
    Ok(metastore_proto::txn::path(txn, &results))
}

/// One change in a write's overlay.
#[derive(Debug, Clone)]
struct Change {
    /// The new version (for a tombstone: key and mod revision only).
    kv: KeyValue,
    tombstone: bool,
    /// The live version this change replaced.
    prev: Prev,
    /// For a key this write changed before: what its first change replaced
    /// (the event's `WriteEvent::before_write`). Set by `push_change`.
    before_write: Option<Prev>,
}

/// The live version a change replaced (see "A write's events").
#[derive(Debug, Clone)]
enum Prev {
    /// The key did not exist.
    None,
    /// Read by the write (or its own change).
    Read(KeyValue),
    /// Known to the index only.
    Stored {
        rev: Revision,
        create: Rev,
        version: i64,
        lease: i64,
    },
}

impl Prev {
    fn exists(&self) -> bool {
        !matches!(self, Prev::None)
    }
    fn create_and_version(&self) -> Option<(Rev, i64)> {
        match self {
            Prev::None => None,
            Prev::Read(kv) => Some((kv.create_revision, kv.version)),
            Prev::Stored {
                create, version, ..
            } => Some((*create, *version)),
        }
    }
    fn lease(&self) -> i64 {
        match self {
            Prev::None => 0,
            Prev::Read(kv) => kv.lease,
            Prev::Stored { lease, .. } => *lease,
        }
    }
}

/// One write revision in progress (see [`Mvcc::write`]). Changes are kept in
/// an overlay, visible to this write's own reads, until [`MvccWrite::finish`].
pub struct MvccWrite<'a> {
    mvcc: &'a mut Mvcc,
    rev: Rev,
    /// The sub-revision of the first change (non-zero only when records of
    /// `rev` already exist).
    sub_base: i64,
    /// An engine error met in `Mvcc::write`, reported by the first change.
    broken: Option<MvccError>,
    /// In sub-revision order (sub = sub_base + position).
    changes: Vec<Change>,
    /// Key → position of its newest change in `changes`, once there are
    /// more than `LATEST_BY_SCAN` changes. Up to that many (a put, a
    /// delete of a key or two, a small txn: most writes) the newest change
    /// of a key is found by scanning `changes` itself, with no map to
    /// allocate and no key to copy (see `MvccWrite::latest_of`).
    latest: Option<BTreeMap<Vec<u8>, usize>>,
}

/// Changes a write scans instead of indexing them by key.
const LATEST_BY_SCAN: usize = 8;

impl MvccWrite<'_> {
    /// The revision of this write.
    pub fn revision(&self) -> Rev {
        self.rev
    }

    /// Nothing changed (yet).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Whether this write may change `key`: the write is sound and the key
    /// has no stored version at or above this write's revision.
    fn check_writable(&mut self, key: &[u8]) -> Result<(), MvccError> {
        if let Some(e) = self.broken.take() {
            return Err(e);
        }
        if self.rev <= 0 {
            return Err(MvccError::StaleRevision {
                rev: self.rev,
                latest: 0,
            });
        }
        if self.latest_of(key).is_some() {
            return Ok(());
        }
        match self.mvcc.index.get(key).map(|h| h.newest()) {
            Some(e) if e.rev.main >= self.rev => Err(MvccError::StaleRevision {
                rev: self.rev,
                latest: e.rev.main,
            }),
            _ => Ok(()),
        }
    }

    /// The live version of `key` as this write sees it, read from the
    /// engine only if `read` (a version of this write's own is always at
    /// hand).
    fn latest_prev(&self, key: &[u8], read: bool) -> Result<Prev, MvccError> {
        if let Some(i) = self.latest_of(key) {
            let c = &self.changes[i];
            return Ok(if c.tombstone {
                Prev::None
            } else {
                Prev::Read(c.kv.clone())
            });
        }
        let Some((k, e)) = self
            .mvcc
            .index
            .get_key_value(key)
            .and_then(|(k, h)| h.live_at(self.rev).map(|e| (k, e)))
        else {
            return Ok(Prev::None);
        };
        Ok(if read {
            Prev::Read(self.mvcc.fetch(k, e.rev)?)
        } else {
            Prev::Stored {
                rev: e.rev,
                create: e.create,
                version: e.version,
                lease: e.lease,
            }
        })
    }

    /// Position of the newest change of `key` in `changes`, if any.
    fn latest_of(&self, key: &[u8]) -> Option<usize> {
        match &self.latest {
            Some(map) => map.get(key).copied(),
            None => self.changes.iter().rposition(|c| c.kv.key == key),
        }
    }

    /// The newest change of every key changed, as (key, position), in key
    /// order.
    fn latest_in_key_order(&self) -> Vec<(&[u8], usize)> {
        match &self.latest {
            Some(map) => map.iter().map(|(k, &i)| (k.as_slice(), i)).collect(),
            None => {
                let mut newest: Vec<(&[u8], usize)> = self
                    .changes
                    .iter()
                    .enumerate()
                    .filter(|&(i, c)| self.latest_of(&c.kv.key) == Some(i))
                    .map(|(i, c)| (&c.kv.key[..], i))
                    .collect();
                newest.sort_unstable_by(|a, b| a.0.cmp(b.0));
                newest
            }
        }
    }

    /// Indexes `changes` by key once there are too many to scan.
    fn index_latest(&mut self) {
        self.latest = (self.changes.len() > LATEST_BY_SCAN).then(|| {
            let mut map = BTreeMap::new();
            for (i, c) in self.changes.iter().enumerate() {
                map.insert(c.kv.key.to_vec(), i);
            }
            map
        });
    }

    fn push_change(&mut self, mut change: Change) {
        if let Some(j) = self.latest_of(&change.kv.key) {
            let first = &self.changes[j];
            change.before_write = Some(first.before_write.clone().unwrap_or(first.prev.clone()));
        }
        let i = self.changes.len();
        if let Some(map) = &mut self.latest {
            map.insert(change.kv.key.to_vec(), i);
        }
        self.changes.push(change);
        if self.latest.is_none() && self.changes.len() > LATEST_BY_SCAN {
            self.index_latest();
        }
    }

    /// Drops every change from position `len` on (rollback of a failed txn).
    fn truncate(&mut self, len: usize) {
        if len >= self.changes.len() {
            return;
        }
        self.changes.truncate(len);
        self.index_latest();
    }

    /// Every live, owned key of `range` as this write sees it, in key order.
    fn candidates(&self, range: KeyRange<'_>, owns: Owns<'_>) -> Vec<Candidate<'_>> {
        // Stored versions of keys this write has not touched.
        let mut histories: Vec<(&[u8], &KeyHistory)> = Vec::new();
        match range {
            KeyRange::Single(key) => histories.extend(self.mvcc.index.get_key_value(key)),
            KeyRange::Span(start, end) => self.mvcc.index.range(start, end, &mut |k, h| {
                histories.push((k, h));
                true
            }),
        }
        let mut cands: Vec<Candidate<'_>> = histories
            .into_iter()
            .filter(|(k, _)| owns(k) && self.latest_of(k).is_none())
            .filter_map(|(k, h)| h.live_at(self.rev).map(|e| Candidate::stored(k, e)))
            .collect();
        let stored_count = cands.len();
        for (k, i) in self.latest_in_key_order() {
            let c = &self.changes[i];
            if !c.tombstone && range.contains(k) && owns(k) {
                cands.push(Candidate::pending(&c.kv));
            }
        }
        if stored_count > 0 && cands.len() > stored_count {
            cands.sort_by(|a, b| a.key.cmp(b.key));
        }
        cands
    }

    /// etcd's Put at this write's revision. The caller checks ownership.
    /// `ignore_value`/`ignore_lease` on a missing key fail with
    /// `KeyNotFound`, changing nothing.
    pub fn put(&mut self, req: &PutRequest) -> Result<PutResponse, MvccError> {
        self.check_writable(&req.key)?;
        let prev = self.latest_prev(&req.key, req.prev_kv || req.ignore_value)?;
        if (req.ignore_value || req.ignore_lease) && !prev.exists() {
            return Err(MvccError::KeyNotFound);
        }
        let value = match (&prev, req.ignore_value) {
            (Prev::Read(p), true) => p.value.clone(),
            _ => req.value.clone(),
        };
        let lease = if req.ignore_lease {
            prev.lease()
        } else {
            req.lease
        };
        let (create_revision, version) = match prev.create_and_version() {
            Some((create, version)) => (create, version + 1),
            None => (self.rev, 1),
        };
        let kv = KeyValue {
            key: req.key.clone(),
            value,
            create_revision,
            mod_revision: self.rev,
            version,
            lease,
        };
        let prev_kv = match &prev {
            Prev::Read(p) if req.prev_kv => Some(p.clone()),
            _ => None,
        };
        self.push_change(Change {
            kv,
            tombstone: false,
            prev,
            before_write: None,
        });
        Ok(PutResponse {
            header: None,
            prev_kv,
        })
    }

    /// etcd's DeleteRange over the owned keys at this write's revision.
    /// Deleting nothing changes nothing (and consumes no revision).
    pub fn delete_range(
        &mut self,
        req: &DeleteRangeRequest,
        owns: Owns<'_>,
    ) -> Result<DeleteRangeResponse, MvccError> {
        let range = KeyRange::new(&req.key, &req.range_end);
        // The versions deleted: read only if the response returns them.
        let prevs = {
            let cands = self.candidates(range, owns);
            cands
                .iter()
                .map(|c| {
                    Ok(match c.source {
                        Source::Stored(rev) if !req.prev_kv => Prev::Stored {
                            rev,
                            create: c.create,
                            version: c.version,
                            lease: c.lease,
                        },
                        _ => Prev::Read(self.mvcc.materialize(c)?),
                    })
                    .map(|prev| (c.key.to_vec().into(), prev))
                })
                .collect::<Result<Vec<(prost::bytes::Bytes, Prev)>, MvccError>>()?
        };
        for (key, _) in &prevs {
            self.check_writable(key)?;
        }
        let deleted = prevs.len() as i64;
        let mut prev_kvs = Vec::new();
        for (key, prev) in prevs {
            if let (true, Prev::Read(kv)) = (req.prev_kv, &prev) {
                prev_kvs.push(kv.clone());
            }
            self.push_change(Change {
                kv: KeyValue {
                    key,
                    mod_revision: self.rev,
                    ..Default::default()
                },
                tombstone: true,
                prev,
                before_write: None,
            });
        }
        Ok(DeleteRangeResponse {
            header: None,
            deleted,
            prev_kvs,
        })
    }

    /// etcd's Range as seen by this write: at its revision, including its
    /// own earlier changes. A `req.revision` below this write's revision
    /// reads that (committed) revision instead, as etcd does inside a txn.
    /// The write's own revision and above are future revisions: etcd's
    /// `checkRequestRange` compares with the store's revision before the
    /// txn, which no client can have seen as this write's.
    pub fn range(&self, req: &RangeRequest, owns: Owns<'_>) -> Result<RangeResponse, MvccError> {
        if req.revision >= self.rev {
            return Err(MvccError::FutureRevision);
        }
        if req.revision > 0 && req.revision < self.rev {
            return self.mvcc.range(req, req.revision, owns);
        }
        let cands = self.candidates(KeyRange::new(&req.key, &req.range_end), owns);
        let count = cands.len();
        build_range(self.mvcc, req, cands, count)
    }

    /// Applies the txn's ops along `path` (etcd's compare path, see
    /// `metastore_proto::txn::path`). Ops on keys this shard does not own
    /// produce empty responses of the right kind. Nested txns produce
    /// `ResponseTxn` with their own `succeeded` and responses. On error
    /// every change of this txn is rolled back (earlier changes of the
    /// same write stay).
    pub fn txn(
        &mut self,
        txn: &TxnRequest,
        path: &[bool],
        owns: Owns<'_>,
    ) -> Result<TxnResponse, MvccError> {
        let mark = self.changes.len();
        let mut apply = |op: &RequestOp| -> Result<response_op::Response, MvccError> {
            use response_op::Response as R;
            Ok(match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    R::ResponseRange(self.range(r, owns)?)
                }
                Some(request_op::Request::RequestPut(p)) => {
                    if owns(&p.key) {
                        R::ResponsePut(self.put(p)?)
                    } else {
                        R::ResponsePut(PutResponse::default())
                    }
                }
                Some(request_op::Request::RequestDeleteRange(d)) => {
                    R::ResponseDeleteRange(self.delete_range(d, owns)?)
                }
                Some(request_op::Request::RequestTxn(_)) | None => {
                    return Err(MvccError::InvalidRequest("empty request op".into()))
                }
            })
        };
        match walk_txn(txn, path, &mut apply) {
            Ok((resp, _)) => Ok(resp),
            Err(e) => {
                self.truncate(mark);
                Err(e)
            }
        }
    }

    /// Finishes the revision: the engine batch (version records and the
    /// current-revision meta), with the changes now visible in the index.
    /// If nothing changed the batch is empty and nothing moves.
    pub fn finish(self) -> WriteBatch {
        self.finish_with_events().0
    }

    /// [`MvccWrite::finish`], also returning the write's events in
    /// sub-revision order, as a watch delivers them (each with its previous
    /// version, read or named: see "A write's events").
    pub fn finish_with_events(self) -> (WriteBatch, Vec<WriteEvent>) {
        let mut batch = WriteBatch::new();
        let mut events = Vec::new();
        self.finish_into(&mut batch, &mut events);
        (batch, events)
    }

    /// [`MvccWrite::finish_with_events`] into the caller's batch and
    /// events, appended after what they hold.
    pub fn finish_into(self, batch: &mut WriteBatch, events: &mut Vec<WriteEvent>) {
        let MvccWrite {
            mvcc,
            rev,
            sub_base,
            mut changes,
            ..
        } = self;
        if changes.is_empty() {
            // Nothing written (a read-only txn): the vector goes back.
            if changes.capacity() <= SPARE_CHANGES {
                mvcc.spare_changes = changes;
            }
            return;
        }
        events.reserve(changes.len());
        for (sub, c) in changes.drain(..).enumerate() {
            let r = Revision {
                main: rev,
                sub: sub_base + sub as i64,
            };
            let record = mvcc.record_chunks.cut(codec::record_len(&c.kv), |buf| {
                codec::encode_record_into(&c.kv, c.tombstone, buf)
            });
            batch.put(codec::version_key(r), record);
            mvcc.index.push(
                &c.kv.key,
                Entry {
                    rev: r,
                    create: if c.tombstone { 0 } else { c.kv.create_revision },
                    version: if c.tombstone { 0 } else { c.kv.version },
                    lease: if c.tombstone { 0 } else { c.kv.lease },
                    tombstone: c.tombstone,
                },
            );
            events.push(WriteEvent {
                kind: if c.tombstone {
                    EventType::Delete
                } else {
                    EventType::Put
                },
                kv: c.kv,
                replaced: replaced_of(c.prev),
                before_write: c.before_write.map(|p| Box::new(replaced_of(p))),
            });
        }
        if changes.capacity() <= SPARE_CHANGES {
            mvcc.spare_changes = changes;
        }
        mvcc.current = mvcc.current.max(rev);
        batch.put(
            codec::meta_current_key(),
            codec::encode_rev_value(mvcc.current),
        );
    }
}

fn replaced_of(prev: Prev) -> Replaced {
    match prev {
        Prev::None => Replaced::Nothing,
        Prev::Read(kv) => Replaced::Read(kv),
        Prev::Stored { rev, lease, .. } => Replaced::Stored(StoredPrev { rev, lease }),
    }
}

/// Walks a txn along `path`, answering each leaf op with `apply` and each
/// nested txn with its own `TxnResponse`. Returns the response and how many
/// path entries it consumed.
fn walk_txn(
    txn: &TxnRequest,
    path: &[bool],
    apply: &mut dyn FnMut(&RequestOp) -> Result<response_op::Response, MvccError>,
) -> Result<(TxnResponse, usize), MvccError> {
    let succeeded = *path
        .first()
        .ok_or_else(|| MvccError::InvalidRequest("txn path is shorter than the txn".into()))?;
    let mut used = 1;
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(request_op::Request::RequestTxn(nested)) => {
                let (resp, n) = walk_txn(nested, &path[used..], apply)?;
                used += n;
                response_op::Response::ResponseTxn(resp)
            }
            _ => apply(op)?,
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    Ok((
        TxnResponse {
            header: None,
            succeeded,
            responses,
        },
        used,
    ))
}

/// etcd's Range post-processing (v3.5 `applierV3backend.Range`) over the
/// live, owned keys of the range in key order.
/// How many of a range's candidates (in key order) [`build_range`] needs:
/// none for `count_only`, `limit + 1` for a limited range in key order
/// without filters (the page, and one more to learn `more`), else all.
fn candidates_needed(req: &RangeRequest) -> usize {
    use range_request::{SortOrder, SortTarget};
    let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let key_order =
        order == SortOrder::None || (order == SortOrder::Ascend && target == SortTarget::Key);
    if req.count_only {
        0
    } else if key_order && !range::revision_filtered(req) && req.limit > 0 {
        usize::try_from(req.limit).map_or(usize::MAX, |l| l.saturating_add(1))
    } else {
        usize::MAX
    }
}

/// etcd's Range answer from `cands` (in key order; at least the first
/// [`candidates_needed`] of the `count` live keys in range).
fn build_range(
    mvcc: &Mvcc,
    req: &RangeRequest,
    mut cands: Vec<Candidate<'_>>,
    count: usize,
) -> Result<RangeResponse, MvccError> {
    use range_request::{SortOrder, SortTarget};
    let count = count as i64;
    if req.count_only {
        return Ok(RangeResponse {
            header: None,
            kvs: Vec::new(),
            more: false,
            count,
        });
    }
    let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    // etcd fetches everything when sorting or filtering (decided on the
    // *requested* order), otherwise limit + 1 keys to learn `more`.
    if range::reads_first_page_only(req) {
        cands.truncate(req.limit.saturating_add(1) as usize);
    }
    cands.retain(|c| {
        !(req.max_mod_revision != 0 && c.modr > req.max_mod_revision
            || req.min_mod_revision != 0 && c.modr < req.min_mod_revision
            || req.max_create_revision != 0 && c.create > req.max_create_revision
            || req.min_create_revision != 0 && c.create < req.min_create_revision)
    });
    // A non-KEY target with no order sorts ascending (results are already
    // in ascending key order otherwise).
    let order = if target != SortTarget::Key && order == SortOrder::None {
        SortOrder::Ascend
    } else {
        order
    };
    let directed = |o: Ordering| {
        if order == SortOrder::Descend {
            o.reverse()
        } else {
            o
        }
    };
    let mut kvs: Vec<KeyValue>;
    let mut more = false;
    if target == SortTarget::Value && order != SortOrder::None {
        kvs = cands
            .iter()
            .map(|c| mvcc.materialize(c))
            .collect::<Result<_, _>>()?;
        kvs.sort_by(|a, b| directed(a.value.cmp(&b.value)));
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
            more = true;
        }
    } else {
        if order != SortOrder::None {
            fn key_of<'a>(c: &Candidate<'a>, target: SortTarget) -> (i64, &'a [u8]) {
                match target {
                    SortTarget::Version => (c.version, &[]),
                    SortTarget::Create => (c.create, &[]),
                    SortTarget::Mod => (c.modr, &[]),
                    _ => (0, c.key),
                }
            }
            // Stable: ties stay in ascending key order.
            cands.sort_by(|a, b| directed(key_of(a, target).cmp(&key_of(b, target))));
        }
        if req.limit > 0 && cands.len() > req.limit as usize {
            cands.truncate(req.limit as usize);
            more = true;
        }
        // Everything but the value is in the key index: keys only reads
        // no record.
        kvs = cands
            .iter()
            .map(|c| {
                if req.keys_only {
                    Ok(c.without_value())
                } else {
                    mvcc.materialize(c)
                }
            })
            .collect::<Result<_, _>>()?;
    }
    if req.keys_only {
        // Values read for sorting by value.
        for kv in &mut kvs {
            kv.value = Default::default();
        }
    }
    Ok(RangeResponse {
        header: None,
        kvs,
        more,
        count,
    })
}

/// One compare's outcome over the live, owned keys it covers.
fn compare_outcome(
    mvcc: &Mvcc,
    c: &Compare,
    cands: &[Candidate<'_>],
) -> Result<CompareOutcome, MvccError> {
    let target = compare::CompareTarget::try_from(c.target).ok();
    let needs_record = matches!(
        target,
        Some(compare::CompareTarget::Value) | Some(compare::CompareTarget::Lease)
    );
    let mut all_true = true;
    for cand in cands {
        let kv = if needs_record {
            mvcc.materialize(cand)?
        } else {
            KeyValue {
                key: cand.key.to_vec().into(),
                create_revision: cand.create,
                mod_revision: cand.modr,
                version: cand.version,
                ..Default::default()
            }
        };
        if !compare_kv(c, &kv) {
            all_true = false;
            break;
        }
    }
    Ok(CompareOutcome {
        matched: !cands.is_empty(),
        all_true,
        // etcd: a value compare against missing keys always fails; any other
        // target compares against a zero KeyValue.
        zero_result: target != Some(compare::CompareTarget::Value)
            && compare_kv(c, &KeyValue::default()),
    })
}

/// etcd's `compareKV`: a target value of the wrong union variant counts as
/// zero (or empty); an unknown result is true.
fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use compare::{CompareResult, CompareTarget, TargetUnion};
    let int = |want: Option<i64>, have: i64| have.cmp(&want.unwrap_or(0));
    let ord = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value[..].cmp(want)
        }
        Ok(CompareTarget::Create) => int(
            match c.target_union {
                Some(TargetUnion::CreateRevision(r)) => Some(r),
                _ => None,
            },
            kv.create_revision,
        ),
        Ok(CompareTarget::Mod) => int(
            match c.target_union {
                Some(TargetUnion::ModRevision(r)) => Some(r),
                _ => None,
            },
            kv.mod_revision,
        ),
        Ok(CompareTarget::Version) => int(
            match c.target_union {
                Some(TargetUnion::Version(v)) => Some(v),
                _ => None,
            },
            kv.version,
        ),
        Ok(CompareTarget::Lease) => int(
            match c.target_union {
                Some(TargetUnion::Lease(l)) => Some(l),
                _ => None,
            },
            kv.lease,
        ),
        Err(_) => Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord == Ordering::Equal,
        Ok(CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(CompareResult::Greater) => ord == Ordering::Greater,
        Ok(CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}
