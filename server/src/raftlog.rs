//! `RaftLog`: raft-rs's `Storage` for one shard, in memory, made durable
//! by a [`Wal`].
//!
//! raft-rs does no I/O itself: it asks its `Storage` for log entries and
//! the persisted hard state, and the shard loop ([`crate::shard`]) persists
//! what each `Ready` hands it. Like etcd (`MemoryStorage` + WAL), the
//! entries raft may still ask for are held in memory, and a durable shard
//! also pushes every entry, hard state and conf state to its write-ahead
//! log ([`crate::wal`]), which is replayed into memory on open. A memory
//! shard has no log file: nothing it holds survives the process anyway.
//!
//! Invariants:
//! * Entries held are exactly `first_index()..=last_index()`; appending at
//!   index i first removes every entry >= i (a new leader's log wins), in
//!   memory now and on replay, since the WAL records the append as made.
//! * `append`, `set_hard_state` and `set_commit` only push records; nothing
//!   is durable until [`RaftLog::sync`] (or a [`SyncJob`] run), which the
//!   shard loop does before it applies or acknowledges anything appended.
//! * Truncation ([`RaftLog::truncation_index`]) drops applied entries from
//!   memory only: it keeps the last [`LOG_KEEP`] applied entries, and no
//!   more than [`LOG_KEEP_BYTES`] of them, and drops at most
//!   [`TRUNCATE_MAX`] per tick. It is decided by how far the log has grown,
//!   not by where the applied index happens to stand when a tick fires, so
//!   a burst of writes cannot leave a backlog that one later tick removes
//!   all at once.
//! * The WAL's segments are released ([`RaftLog::release_before`]) only
//!   once the engine has made durable everything the released entries did
//!   (the caller syncs it first): on restart the engine's applied index is
//!   never below the first entry the WAL still has.
//! * A data directory from before the WAL (log kept in the engine under
//!   `L`/`H` keys) is moved into a new WAL on first open, then those keys
//!   are deleted: no acknowledged entry is lost in the upgrade.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::engine::{keyspace, Engine, WriteBatch};
use crate::wal::{Record, SyncJob, Wal, WalError, SEGMENT_BYTES};

/// Applied entries kept when the log is truncated ...
pub const LOG_KEEP: u64 = 10_000;
/// ... and at most this many bytes of them (entries are held in memory).
pub const LOG_KEEP_BYTES: u64 = 16 << 20;
/// The log is truncated once this many entries beyond [`LOG_KEEP`] have
/// accumulated, so a truncation is a batch, not one removal per write.
pub const TRUNCATE_STEP: u64 = 1_000;
/// At most this many entries are dropped by one truncation; a larger
/// backlog (after a restart, say) goes over several ticks.
pub const TRUNCATE_MAX: u64 = 10_000;

/// The index to truncate before (by count alone) for a log whose first
/// entry is `first` and whose applied index is `applied`, or `None` while
/// the backlog is under [`TRUNCATE_STEP`].
pub fn truncation_point(first: u64, applied: u64) -> Option<u64> {
    let keep_from = applied.checked_sub(LOG_KEEP)?;
    (keep_from >= first + TRUNCATE_STEP).then(|| keep_from.min(first + TRUNCATE_MAX))
}

/// What an entry costs to hold, for [`LOG_KEEP_BYTES`].
fn held_bytes(e: &Entry) -> u64 {
    (e.data.len() + e.context.len()) as u64 + 32
}

fn store_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl From<WalError> for raft::Error {
    fn from(e: WalError) -> raft::Error {
        store_err(e)
    }
}

/// Where a durable shard's WAL lives, and the size of its segments.
#[derive(Clone, Debug)]
pub struct WalOptions {
    pub dir: PathBuf,
    pub segment_bytes: u64,
}

impl WalOptions {
    /// `dir` with the default segment size ([`SEGMENT_BYTES`]).
    pub fn new(dir: impl Into<PathBuf>) -> WalOptions {
        WalOptions {
            dir: dir.into(),
            segment_bytes: SEGMENT_BYTES,
        }
    }
}

/// A shard's raft log and hard state; see the module docs.
pub struct RaftLog {
    hard_state: RefCell<HardState>,
    conf_state: RefCell<ConfState>,
    /// Index and term of the entry just before the first one held.
    truncated: Cell<(u64, u64)>,
    /// `first_index()..=last_index()`, in order.
    entries: RefCell<VecDeque<Entry>>,
    /// [`held_bytes`] of `entries`.
    bytes: Cell<u64>,
    /// The durable copy; `None` on a memory shard.
    wal: Option<RefCell<Wal>>,
}

impl RaftLog {
    /// A log that lives in memory only (the memory engine's).
    pub fn in_memory() -> RaftLog {
        RaftLog {
            hard_state: RefCell::default(),
            conf_state: RefCell::default(),
            truncated: Cell::new((0, 0)),
            entries: RefCell::default(),
            bytes: Cell::new(0),
            wal: None,
        }
    }

    /// Opens the durable log `wal` describes, replaying it. `engine` is the
    /// shard's engine, from which a log kept there by an older version is
    /// moved into the WAL.
    pub fn open(opts: &WalOptions, engine: &Rc<dyn Engine>) -> raft::Result<RaftLog> {
        let (mut wal, mut records) = Wal::open(&opts.dir, opts.segment_bytes)?;
        if !wal.is_new() && engine_has_log(engine.as_ref())? {
            // An open died moving the log: the engine's copy goes only
            // after the WAL holding all of it is synced, and nothing is
            // appended before, so this WAL holds at most that copy, maybe
            // part of it. Moved again, whole.
            drop(wal);
            std::fs::remove_dir_all(&opts.dir).map_err(store_err)?;
            (wal, records) = Wal::open(&opts.dir, opts.segment_bytes)?;
        }
        let mut migrated = false;
        if wal.is_new() {
            records = engine_log(engine.as_ref())?;
            migrated = !records.is_empty();
            let (prev_index, prev_term) = match records.first() {
                Some(Record::Start {
                    prev_index,
                    prev_term,
                }) => (*prev_index, *prev_term),
                _ => (0, 0),
            };
            wal.begin(prev_index, prev_term)?;
            for r in records.iter().skip(1) {
                wal.push(r)?;
            }
            wal.sync()?;
        }
        let mut log = RaftLog::in_memory();
        for r in records {
            match r {
                Record::Start {
                    prev_index,
                    prev_term,
                } => {
                    // Only the oldest segment's start says where the log
                    // begins; later ones restate a point already passed.
                    if log.entries.borrow().is_empty() && log.last_index_held() <= prev_index {
                        log.truncated.set((prev_index, prev_term));
                    }
                }
                Record::Entry(e) => log.hold(vec![e]),
                Record::HardState(hs) => *log.hard_state.borrow_mut() = hs,
                Record::ConfState(cs) => *log.conf_state.borrow_mut() = cs,
            }
        }
        if migrated {
            let (start, end) = keyspace::bounds(keyspace::RAFT_LOG);
            let (hs_start, hs_end) = keyspace::bounds(keyspace::RAFT_HARD_STATE);
            let mut b = WriteBatch::default();
            b.delete_range(start, end).delete_range(hs_start, hs_end);
            engine.write(b, true).map_err(store_err)?;
        }
        log.wal = Some(RefCell::new(wal));
        Ok(log)
    }

    fn last_index_held(&self) -> u64 {
        self.entries
            .borrow()
            .back()
            .map(|e| e.index)
            .unwrap_or(self.truncated.get().0)
    }

    /// Puts `entries` in memory, replacing any from the first one's index.
    fn hold(&self, new: Vec<Entry>) {
        let Some(first) = new.first().map(|e| e.index) else {
            return;
        };
        let mut entries = self.entries.borrow_mut();
        let mut bytes = self.bytes.get();
        while entries.back().is_some_and(|e| e.index >= first) {
            bytes -= held_bytes(&entries.pop_back().unwrap());
        }
        for e in new {
            bytes += held_bytes(&e);
            entries.push_back(e);
        }
        self.bytes.set(bytes);
    }

    fn push(&self, r: &Record) -> raft::Result<()> {
        if let Some(wal) = &self.wal {
            wal.borrow_mut().push(r)?;
        }
        Ok(())
    }

    /// Makes `voters` the configuration of a log that has none yet (first
    /// start). Durable immediately.
    pub fn bootstrap(&self, voters: &[u64]) -> raft::Result<()> {
        if !self.conf_state.borrow().voters.is_empty() {
            return Ok(());
        }
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        self.push(&Record::ConfState(cs.clone()))?;
        self.sync()?;
        *self.conf_state.borrow_mut() = cs;
        Ok(())
    }

    /// Appends `entries`, replacing any existing entries from the first
    /// one's index on. Durable after the next sync.
    pub fn append(&self, entries: Vec<Entry>) -> raft::Result<()> {
        if let Some(wal) = &self.wal {
            let mut wal = wal.borrow_mut();
            for e in &entries {
                wal.push_entry(e)?;
            }
        }
        self.hold(entries);
        Ok(())
    }

    /// Sets the hard state. Durable after the next sync.
    pub fn set_hard_state(&self, hs: &HardState) -> raft::Result<()> {
        self.push(&Record::HardState(hs.clone()))?;
        *self.hard_state.borrow_mut() = hs.clone();
        Ok(())
    }

    /// Sets the commit index of the hard state (from a `LightReady`).
    pub fn set_commit(&self, commit: u64) -> raft::Result<()> {
        let mut hs = self.hard_state.borrow().clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Raises the commit index to `applied` after a restart. The commit
    /// index is written unsynced (`set_commit`), and the engine's applied
    /// index too, each on its own schedule, so a crash can leave the engine
    /// ahead of the log's commit index; an applied entry was committed, and
    /// it is durable in the log (synced before it was applied), so raft may
    /// start from there.
    pub fn commit_applied(&self, applied: u64) -> raft::Result<()> {
        let last = self.last_index_held();
        if applied > last {
            return Err(store_err(format!(
                "the engine has applied index {applied}, past the raft log's last entry {last}"
            )));
        }
        let mut hs = self.hard_state.borrow_mut();
        hs.commit = hs.commit.max(applied);
        Ok(())
    }

    /// True if something pushed since the last sync is not yet durable.
    pub fn needs_sync(&self) -> bool {
        self.wal.as_ref().is_some_and(|w| w.borrow().needs_sync())
    }

    /// Makes everything pushed so far durable.
    pub fn sync(&self) -> raft::Result<()> {
        if let Some(wal) = &self.wal {
            wal.borrow_mut().sync()?;
        }
        Ok(())
    }

    /// What `sync` would do, to run on another thread (`None`: nothing to
    /// do). Nothing may be pushed until it has run.
    pub fn sync_job(&self) -> Option<SyncJob> {
        let wal = self.wal.as_ref()?;
        let mut wal = wal.borrow_mut();
        wal.needs_sync().then(|| wal.sync_job())
    }

    /// Writes what was pushed, without waiting for the disk (a tick's
    /// flush of unsynced state, like the commit index).
    pub fn write_unsynced(&self) -> raft::Result<()> {
        if let Some(wal) = &self.wal {
            wal.borrow_mut().write()?;
        }
        Ok(())
    }

    /// The index to truncate before, given the applied index: by count
    /// ([`truncation_point`]) or, past [`LOG_KEEP_BYTES`] held, by size.
    pub fn truncation_index(&self, applied: u64) -> Option<u64> {
        let first = self.truncated.get().0 + 1;
        let mut index = truncation_point(first, applied).unwrap_or(first);
        let mut bytes = self.bytes.get();
        if bytes > LOG_KEEP_BYTES {
            for e in self.entries.borrow().iter() {
                if bytes <= LOG_KEEP_BYTES || e.index >= applied || e.index >= first + TRUNCATE_MAX
                {
                    break;
                }
                bytes -= held_bytes(e);
                index = index.max(e.index + 1);
            }
        }
        (index > first).then_some(index)
    }

    /// Drops entries before `index` (all applied and no longer needed)
    /// from memory. The WAL keeps them until [`RaftLog::release_before`].
    pub fn truncate_before(&self, index: u64) -> raft::Result<()> {
        let (trunc, _) = self.truncated.get();
        if index <= trunc + 1 || index > self.last_index_held() {
            return Ok(());
        }
        let term = self.term(index - 1)?;
        let mut entries = self.entries.borrow_mut();
        let mut bytes = self.bytes.get();
        while entries.front().is_some_and(|e| e.index < index) {
            bytes -= held_bytes(&entries.pop_front().unwrap());
        }
        self.bytes.set(bytes);
        self.truncated.set((index - 1, term));
        Ok(())
    }

    /// True if [`RaftLog::release_before`] at `index` would delete a WAL
    /// segment (the caller then syncs its engine first).
    pub fn releasable(&self, index: u64) -> bool {
        self.wal
            .as_ref()
            .is_some_and(|w| w.borrow().releasable(index))
    }

    /// Deletes the WAL segments whose entries are all before `index`. The
    /// caller has made the engine durable through `index - 1` first.
    pub fn release_before(&self, index: u64) -> raft::Result<usize> {
        match &self.wal {
            Some(wal) => Ok(wal.borrow_mut().release_before(index)?),
            None => Ok(0),
        }
    }
}

/// True if the engine holds a log kept there by an older version (its
/// conf state was always written first).
fn engine_has_log(engine: &dyn Engine) -> raft::Result<bool> {
    let key = |k: &[u8]| [&[keyspace::RAFT_HARD_STATE][..], k].concat();
    Ok(engine.get(&key(b"cs")).map_err(store_err)?.is_some()
        || engine.get(&key(b"hs")).map_err(store_err)?.is_some())
}

/// The log an older version kept in the engine, as WAL records (start,
/// conf state, hard state, entries), or nothing if there is none.
fn engine_log(engine: &dyn Engine) -> raft::Result<Vec<Record>> {
    let key = |k: &[u8]| [&[keyspace::RAFT_HARD_STATE][..], k].concat();
    let hs = engine.get(&key(b"hs")).map_err(store_err)?;
    let cs = engine.get(&key(b"cs")).map_err(store_err)?;
    let trunc = engine.get(&key(b"trunc")).map_err(store_err)?;
    let mut entries = Vec::new();
    let mut err = None;
    let (start, end) = keyspace::bounds(keyspace::RAFT_LOG);
    engine
        .scan(&start, &end, &mut |_, v| match Entry::parse_from_bytes(v) {
            Ok(e) => {
                entries.push(Record::Entry(e));
                true
            }
            Err(e) => {
                err = Some(store_err(e));
                false
            }
        })
        .map_err(store_err)?;
    if let Some(e) = err {
        return Err(e);
    }
    if hs.is_none() && cs.is_none() && entries.is_empty() {
        return Ok(Vec::new());
    }
    let (prev_index, prev_term) = match trunc {
        Some(b) if b.len() == 16 => (
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..].try_into().unwrap()),
        ),
        _ => (0, 0),
    };
    let mut out = vec![Record::Start {
        prev_index,
        prev_term,
    }];
    if let Some(b) = cs {
        out.push(Record::ConfState(
            ConfState::parse_from_bytes(&b).map_err(store_err)?,
        ));
    }
    if let Some(b) = hs {
        out.push(Record::HardState(
            HardState::parse_from_bytes(&b).map_err(store_err)?,
        ));
    }
    out.extend(entries);
    Ok(out)
}

impl Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.borrow().clone(),
            conf_state: self.conf_state.borrow().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let (trunc, _) = self.truncated.get();
        if low <= trunc {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index_held() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        let entries = self.entries.borrow();
        let mut out = Vec::new();
        let mut size = 0u64;
        for e in entries.range((low - trunc - 1) as usize..(high - trunc - 1) as usize) {
            size += e.compute_size() as u64;
            if matches!(max_size, Some(m) if size > m && !out.is_empty()) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (trunc, trunc_term) = self.truncated.get();
        if idx == trunc {
            return Ok(trunc_term);
        }
        if idx < trunc {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index_held() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries.borrow()[(idx - trunc - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.get().0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_held())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // One voter per group today: no follower ever needs a snapshot.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::{open, EngineKind};

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 100].into(),
            ..Default::default()
        }
    }

    fn run(from: u64, to: u64, term: u64) -> Vec<Entry> {
        (from..=to).map(|i| entry(i, term)).collect()
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn summary(es: Vec<Entry>) -> Vec<(u64, u64)> {
        es.iter().map(|e| (e.index, e.term)).collect()
    }

    fn memory_engine() -> Rc<dyn Engine> {
        open(EngineKind::Memory, Path::new("unused")).unwrap()
    }

    /// A log over a WAL in `dir` with small segments, so tests roll them.
    fn durable(dir: &Path) -> RaftLog {
        let wal = WalOptions {
            dir: dir.to_path_buf(),
            segment_bytes: 16 << 10,
        };
        RaftLog::open(&wal, &memory_engine()).unwrap()
    }

    #[test]
    fn append_overwrite_truncate_in_memory_and_durable() {
        let dir = tempfile::tempdir().unwrap();
        for log in [RaftLog::in_memory(), durable(dir.path())] {
            assert_eq!(log.first_index().unwrap(), 1);
            assert_eq!(log.last_index().unwrap(), 0);
            log.append(run(1, 3, 1)).unwrap();
            log.sync().unwrap();
            // A new leader overwrites from index 2.
            log.append(vec![entry(2, 2)]).unwrap();
            log.sync().unwrap();
            assert_eq!(log.last_index().unwrap(), 2);
            assert_eq!(log.term(2).unwrap(), 2);
            let got = log.entries(1, 3, None, ctx()).unwrap();
            assert_eq!(summary(got), vec![(1, 1), (2, 2)]);
            assert!(log.entries(1, 4, None, ctx()).is_err());
            // A size limit still returns one entry.
            assert_eq!(log.entries(1, 3, Some(0), ctx()).unwrap().len(), 1);
            log.truncate_before(2).unwrap();
            assert_eq!(log.first_index().unwrap(), 2);
            assert_eq!(log.term(1).unwrap(), 1);
            assert!(log.entries(1, 2, None, ctx()).is_err());
            assert!(log.term(0).is_err());
        }
    }

    /// Whatever the log went through, replaying its WAL gives the same
    /// answers: entries, size limits and terms (the reopened log may start
    /// earlier: truncation drops entries from memory only).
    #[test]
    fn a_reopened_log_answers_as_the_live_one_did() {
        let dir = tempfile::tempdir().unwrap();
        let log = durable(dir.path());
        let hs = HardState {
            term: 2,
            vote: 1,
            commit: 4600,
            ..Default::default()
        };
        log.append(run(1, 3000, 1)).unwrap();
        log.sync().unwrap();
        log.append(run(3001, 5000, 1)).unwrap();
        log.append(run(4500, 4600, 2)).unwrap();
        log.set_hard_state(&hs).unwrap();
        log.sync().unwrap();
        log.append(run(4601, 4700, 2)).unwrap();
        log.sync().unwrap();
        log.truncate_before(1000).unwrap();
        assert!(log.wal.as_ref().unwrap().borrow().segment_count() > 10);

        let reopened = durable(dir.path());
        assert_eq!(reopened.initial_state().unwrap().hard_state, hs);
        assert_eq!(reopened.first_index().unwrap(), 1);
        assert_eq!(reopened.last_index().unwrap(), 4700);
        for (low, high) in [
            (1000, 4701),
            (1000, 1001),
            (4000, 4701),
            (4600, 4601),
            (4699, 4701),
        ] {
            for max in [None, Some(0), Some(1000), Some(u64::MAX)] {
                assert_eq!(
                    summary(log.entries(low, high, max, ctx()).unwrap()),
                    summary(reopened.entries(low, high, max, ctx()).unwrap()),
                    "{low}..{high} {max:?}"
                );
            }
        }
        for idx in [999, 1000, 4499, 4500, 4700] {
            assert_eq!(log.term(idx).unwrap(), reopened.term(idx).unwrap(), "{idx}");
        }
        assert!(reopened.term(4701).is_err());
    }

    #[test]
    fn only_synced_or_written_records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = durable(dir.path());
            log.bootstrap(&[1]).unwrap();
            log.append(run(1, 2, 1)).unwrap();
            log.set_hard_state(&HardState {
                term: 1,
                vote: 1,
                commit: 2,
                ..Default::default()
            })
            .unwrap();
            assert!(log.needs_sync());
            log.sync().unwrap();
            assert!(!log.needs_sync());
            // Written (a tick's write) but not synced: in the page cache,
            // so a process crash keeps it.
            log.set_commit(3).unwrap();
            log.append(vec![entry(3, 1)]).unwrap();
            log.write_unsynced().unwrap();
            // Pushed only: lost with the process.
            log.append(vec![entry(4, 1)]).unwrap();
        }
        let log = durable(dir.path());
        let st = log.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1]);
        assert_eq!(st.hard_state.commit, 3);
        assert_eq!(log.last_index().unwrap(), 3);
    }

    /// The engine's applied index may be on disk ahead of the log's
    /// (unsynced) commit index; raft starts from the applied one, and an
    /// applied index past the log's end is refused.
    #[test]
    fn a_restart_commits_what_the_engine_applied() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = durable(dir.path());
            log.append(run(1, 3, 1)).unwrap();
            log.sync().unwrap();
            log.set_commit(3).unwrap();
        }
        let log = durable(dir.path());
        assert_eq!(log.initial_state().unwrap().hard_state.commit, 0);
        log.commit_applied(2).unwrap();
        assert_eq!(log.initial_state().unwrap().hard_state.commit, 2);
        log.commit_applied(1).unwrap();
        assert_eq!(log.initial_state().unwrap().hard_state.commit, 2);
        assert!(log.commit_applied(4).is_err());
    }

    #[test]
    fn released_segments_are_gone_and_the_log_restarts_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = durable(dir.path());
        log.append(run(1, 1000, 3)).unwrap();
        log.sync().unwrap();
        log.truncate_before(700).unwrap();
        assert!(log.releasable(700));
        let before = log.wal.as_ref().unwrap().borrow().segment_count();
        let released = log.release_before(700).unwrap();
        assert!(released > 0 && released < before);
        assert!(!log.releasable(700));
        drop(log);
        let log = durable(dir.path());
        let first = log.first_index().unwrap();
        assert!(first > 1 && first <= 700, "{first}");
        assert_eq!(log.term(first - 1).unwrap(), 3);
        assert_eq!(log.last_index().unwrap(), 1000);
        let got = log.entries(first, 1001, None, ctx()).unwrap();
        assert_eq!(summary(got), summary(run(first, 1000, 3)));
    }

    #[test]
    fn a_log_kept_in_the_engine_moves_into_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(EngineKind::RocksDb, &dir.path().join("db")).unwrap();
        let key = |p: u8, k: &[u8]| [&[p][..], k].concat();
        let hs = HardState {
            term: 4,
            vote: 1,
            commit: 12,
            ..Default::default()
        };
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        let mut b = WriteBatch::default();
        for e in run(11, 13, 4) {
            b.put(
                key(keyspace::RAFT_LOG, &e.index.to_be_bytes()),
                e.write_to_bytes().unwrap(),
            );
        }
        b.put(
            key(keyspace::RAFT_HARD_STATE, b"hs"),
            hs.write_to_bytes().unwrap(),
        );
        b.put(
            key(keyspace::RAFT_HARD_STATE, b"cs"),
            cs.write_to_bytes().unwrap(),
        );
        let trunc = [10u64.to_be_bytes(), 4u64.to_be_bytes()].concat();
        b.put(key(keyspace::RAFT_HARD_STATE, b"trunc"), trunc);
        engine.write(b.clone(), true).unwrap();

        let old_keys = b;
        let wal_dir = dir.path().join("wal");
        for round in 0..3 {
            if round == 2 {
                // As if the first open had died part way through the move:
                // the engine's copy is still there, the WAL holds only its
                // start. The whole copy is moved again.
                engine.write(old_keys.clone(), true).unwrap();
                std::fs::remove_dir_all(&wal_dir).unwrap();
                let (mut partial, _) = Wal::open(&wal_dir, SEGMENT_BYTES).unwrap();
                partial.begin(10, 4).unwrap();
            }
            // Moved on the first open; read from the WAL on the second.
            let log = RaftLog::open(&WalOptions::new(&wal_dir), &engine).unwrap();
            let st = log.initial_state().unwrap();
            assert_eq!((st.hard_state, st.conf_state), (hs.clone(), cs.clone()));
            assert_eq!(log.first_index().unwrap(), 11);
            assert_eq!(log.term(10).unwrap(), 4);
            let got = log.entries(11, 14, None, ctx()).unwrap();
            assert_eq!(summary(got), vec![(11, 4), (12, 4), (13, 4)]);
            for p in [keyspace::RAFT_LOG, keyspace::RAFT_HARD_STATE] {
                let (start, end) = keyspace::bounds(p);
                let mut left = 0;
                engine
                    .scan(&start, &end, &mut |_, _| {
                        left += 1;
                        true
                    })
                    .unwrap();
                assert_eq!(left, 0, "old keys are deleted");
            }
        }
    }

    #[test]
    fn truncation_follows_the_backlog_in_bounded_steps() {
        // Nothing while fewer than LOG_KEEP entries are applied, or the
        // backlog beyond them is under one step.
        assert_eq!(truncation_point(1, LOG_KEEP), None);
        assert_eq!(truncation_point(1, LOG_KEEP + TRUNCATE_STEP), None);
        assert_eq!(
            truncation_point(1, LOG_KEEP + TRUNCATE_STEP + 1),
            Some(TRUNCATE_STEP + 1)
        );
        // Whatever the applied index's remainder: a tick after a burst
        // truncates, however the burst ended.
        for applied in (LOG_KEEP + 2 * TRUNCATE_STEP)..(LOG_KEEP + 3 * TRUNCATE_STEP) {
            assert_eq!(truncation_point(1, applied), Some(applied - LOG_KEEP));
        }
        // A large backlog goes in steps of TRUNCATE_MAX, each keeping
        // LOG_KEEP entries at least, until it is under one step.
        let applied = 1_000_000;
        let mut first = 1;
        let mut steps = 0;
        while let Some(index) = truncation_point(first, applied) {
            assert!(index - first <= TRUNCATE_MAX);
            assert!(index <= applied - LOG_KEEP);
            first = index;
            steps += 1;
        }
        assert_eq!(first, applied - LOG_KEEP);
        assert_eq!(steps, (applied - LOG_KEEP - 1).div_ceil(TRUNCATE_MAX));
    }

    /// Entries are held in memory, so large ones are truncated by size
    /// too: at most LOG_KEEP_BYTES of applied entries are kept (never an
    /// unapplied one, nor the last applied).
    #[test]
    fn held_bytes_are_bounded_as_well_as_entries() {
        let log = RaftLog::in_memory();
        let big = |i: u64| Entry {
            index: i,
            term: 1,
            data: vec![0u8; 1 << 20].into(),
            ..Default::default()
        };
        let n = LOG_KEEP_BYTES / (1 << 20) + 10;
        log.append((1..=n).map(big).collect()).unwrap();
        // Nothing applied: nothing to drop, whatever the size.
        assert_eq!(log.truncation_index(0), None);
        let index = log.truncation_index(n).unwrap();
        log.truncate_before(index).unwrap();
        assert!(log.bytes.get() <= LOG_KEEP_BYTES);
        assert!(log.bytes.get() > LOG_KEEP_BYTES - (2 << 20));
        assert_eq!(log.last_index().unwrap(), n);
        // Applied only up to 5: only entries before 5 may go.
        let log = RaftLog::in_memory();
        log.append((1..=n).map(big).collect()).unwrap();
        assert_eq!(log.truncation_index(5), Some(5));
    }
}
