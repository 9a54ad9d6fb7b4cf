//! `RaftLog`: raft-rs's `Storage` over a shard's engine.
//!
//! raft-rs does no I/O itself: it asks its `Storage` for log entries and
//! the persisted hard state, and the shard loop ([`crate::shard`]) persists
//! what each `Ready` hands it. This module is that storage, kept in the same
//! engine as the shard's data so one engine write can carry both.
//!
//! Layout (prefix bytes from [`crate::engine::keyspace`]):
//! - `L` + index (8 bytes, big endian) → an `eraftpb::Entry`;
//! - `H` + `hs` → `HardState`, `H` + `cs` → `ConfState`,
//!   `H` + `trunc` → index and term of the last entry dropped by log
//!   truncation (raft needs the term of the entry before the first).
//!
//! Invariants: entries present are exactly `first_index()..=last_index()`;
//! appending at index i first removes every entry >= i (a new leader's log
//! wins); `append` and `set_hard_state` only add to a batch — nothing is
//! durable until the shard loop writes that batch with sync, which it does
//! before it applies or acknowledges anything in it.
//!
//! The newest entries are also kept in memory as appended (`tail`), so
//! raft reading each committed entry back to apply it costs no engine scan
//! and no decode; the tail is only ever a copy of the stored entries, and
//! reads it does not cover go to the engine.
//!
//! Truncation ([`truncation_point`]) keeps the last [`LOG_KEEP`] applied
//! entries and drops the rest in steps of at most [`TRUNCATE_MAX`] per
//! tick: it is decided by how far the log has grown, not by where the
//! applied index happens to stand when a tick fires, so a burst of writes
//! cannot leave a backlog that one later tick removes all at once (on the
//! memory engine that is one removal per entry, on the shard's thread).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::engine::{keyspace, Engine, WriteBatch};

/// Applied entries kept when the log is truncated.
pub const LOG_KEEP: u64 = 10_000;
/// The log is truncated once this many entries beyond [`LOG_KEEP`] have
/// accumulated, so a truncation is a batch, not one delete per write.
pub const TRUNCATE_STEP: u64 = 1_000;
/// At most this many entries are dropped by one truncation; a larger
/// backlog (after a restart, say) goes over several ticks.
pub const TRUNCATE_MAX: u64 = 10_000;

/// The index to truncate before (see [`RaftLog::truncate_before`]) for a
/// log whose first entry is `first` and whose applied index is `applied`,
/// or `None` while the backlog is under [`TRUNCATE_STEP`].
pub fn truncation_point(first: u64, applied: u64) -> Option<u64> {
    let keep_from = applied.checked_sub(LOG_KEEP)?;
    (keep_from >= first + TRUNCATE_STEP).then(|| keep_from.min(first + TRUNCATE_MAX))
}

/// At most this many of the newest entries are kept in memory ...
const TAIL_ENTRIES: usize = 4096;
/// ... and at most this many bytes of them (encoded).
const TAIL_BYTES: u64 = 16 << 20;

const HARD_STATE: &[u8] = b"Hhs";
const CONF_STATE: &[u8] = b"Hcs";
const TRUNCATED: &[u8] = b"Htrunc";

fn entry_key(index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(keyspace::RAFT_LOG);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn other(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

/// A shard's raft log and hard state, stored in its engine.
pub struct RaftLog {
    engine: Rc<dyn Engine>,
    hard_state: RefCell<HardState>,
    conf_state: RefCell<ConfState>,
    /// Index and term of the entry just before the first one kept.
    truncated: Cell<(u64, u64)>,
    last: Cell<u64>,
    /// The newest entries as appended: raft asks for every committed
    /// entry again to apply it, and for the terms of recent ones, and these
    /// are answered from here instead of an engine scan and a decode.
    tail: RefCell<EntryTail>,
}

/// A contiguous run of the newest entries, each with its encoded size,
/// ending at the log's `last` (or empty: after `open`, or once evicted),
/// trimmed from the front to [`TAIL_ENTRIES`] and [`TAIL_BYTES`].
#[derive(Default)]
struct EntryTail {
    entries: VecDeque<(Entry, u64)>,
    bytes: u64,
}

impl EntryTail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index)
    }

    /// Makes room for entries appended from `index` on: drops those they
    /// replace, and everything if the run would not stay contiguous.
    fn truncate_from(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.index >= index) {
            let (_, n) = self.entries.pop_back().unwrap();
            self.bytes -= n;
        }
        if self
            .entries
            .back()
            .is_some_and(|(e, _)| e.index + 1 != index)
        {
            self.entries.clear();
            self.bytes = 0;
        }
    }

    fn push(&mut self, entry: Entry, size: u64) {
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > TAIL_ENTRIES || self.bytes > TAIL_BYTES {
            self.drop_front();
        }
    }

    /// Drops the entries before `index`.
    fn drop_before(&mut self, index: u64) {
        while self.first_index().is_some_and(|i| i < index) {
            self.drop_front();
        }
    }

    fn drop_front(&mut self) {
        if let Some((_, n)) = self.entries.pop_front() {
            self.bytes -= n;
        }
    }

    /// `entries(low, high, max_size)`, if the run holds `low` (it holds
    /// everything after it up to `last`).
    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if low < first || (high - first) as usize > self.entries.len() {
            return None;
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        for (e, n) in self
            .entries
            .range((low - first) as usize..(high - first) as usize)
        {
            size += n;
            if matches!(max_size, Some(m) if size > m && !out.is_empty()) {
                break;
            }
            out.push(e.clone());
        }
        Some(out)
    }

    /// The term of entry `index`, if the run holds it.
    fn term(&self, index: u64) -> Option<u64> {
        let at = index.checked_sub(self.first_index()?)?;
        self.entries.get(at as usize).map(|(e, _)| e.term)
    }
}

impl RaftLog {
    /// Loads the log from `engine`.
    pub fn open(engine: Rc<dyn Engine>) -> raft::Result<Self> {
        let mut hard_state = HardState::default();
        if let Some(b) = engine.get(HARD_STATE).map_err(other)? {
            hard_state.merge_from_bytes(&b).map_err(other)?;
        }
        let mut conf_state = ConfState::default();
        if let Some(b) = engine.get(CONF_STATE).map_err(other)? {
            conf_state.merge_from_bytes(&b).map_err(other)?;
        }
        let truncated = match engine.get(TRUNCATED).map_err(other)? {
            Some(b) if b.len() == 16 => (
                u64::from_be_bytes(b[..8].try_into().unwrap()),
                u64::from_be_bytes(b[8..].try_into().unwrap()),
            ),
            _ => (0, 0),
        };
        let mut last = truncated.0;
        engine
            .scan_rev(&entry_key(0), &entry_key(u64::MAX), &mut |k, _| {
                last = u64::from_be_bytes(k[1..9].try_into().unwrap());
                false
            })
            .map_err(other)?;
        Ok(RaftLog {
            engine,
            hard_state: RefCell::new(hard_state),
            conf_state: RefCell::new(conf_state),
            truncated: Cell::new(truncated),
            last: Cell::new(last),
            tail: RefCell::new(EntryTail::default()),
        })
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
        let mut batch = WriteBatch::default();
        batch.put(CONF_STATE.to_vec(), cs.write_to_bytes().map_err(other)?);
        self.engine.write(batch, true).map_err(other)?;
        *self.conf_state.borrow_mut() = cs;
        Ok(())
    }

    /// Adds `entries` to `batch`, replacing any existing entries from the
    /// first one's index on.
    pub fn append(&self, entries: &[Entry], batch: &mut WriteBatch) -> raft::Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.last.get() {
            batch.delete_range(entry_key(first.index), entry_key(self.last.get() + 1));
        }
        let mut tail = self.tail.borrow_mut();
        tail.truncate_from(first.index);
        for e in entries {
            let encoded = e.write_to_bytes().map_err(other)?;
            let n = encoded.len() as u64;
            batch.put(entry_key(e.index), encoded);
            tail.push(e.clone(), n);
        }
        self.last.set(entries.last().unwrap().index);
        Ok(())
    }

    /// Adds the hard state to `batch`.
    pub fn set_hard_state(&self, hs: &HardState, batch: &mut WriteBatch) -> raft::Result<()> {
        batch.put(HARD_STATE.to_vec(), hs.write_to_bytes().map_err(other)?);
        *self.hard_state.borrow_mut() = hs.clone();
        Ok(())
    }

    /// Sets the commit index of the hard state (from a `LightReady`).
    pub fn set_commit(&self, commit: u64, batch: &mut WriteBatch) -> raft::Result<()> {
        let mut hs = self.hard_state.borrow().clone();
        hs.commit = commit;
        self.set_hard_state(&hs, batch)
    }

    /// Drops entries before `index` (all applied and no longer needed).
    pub fn truncate_before(&self, index: u64, batch: &mut WriteBatch) -> raft::Result<()> {
        let (trunc, _) = self.truncated.get();
        if index <= trunc + 1 || index > self.last.get() {
            return Ok(());
        }
        let term = self.term(index - 1)?;
        batch.delete_range(entry_key(trunc + 1), entry_key(index));
        self.tail.borrow_mut().drop_before(index);
        let mut v = (index - 1).to_be_bytes().to_vec();
        v.extend_from_slice(&term.to_be_bytes());
        batch.put(TRUNCATED.to_vec(), v);
        self.truncated.set((index - 1, term));
        Ok(())
    }

    fn entry(&self, index: u64) -> raft::Result<Entry> {
        let b = self
            .engine
            .get(&entry_key(index))
            .map_err(other)?
            .ok_or(raft::Error::Store(StorageError::Unavailable))?;
        let mut e = Entry::default();
        e.merge_from_bytes(&b).map_err(other)?;
        Ok(e)
    }
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
        if low <= self.truncated.get().0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last.get() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        if let Some(out) = self.tail.borrow().entries(low, high, max_size) {
            return Ok(out);
        }
        let mut out = Vec::new();
        let mut size = 0u64;
        let mut err = None;
        self.engine
            .scan(&entry_key(low), &entry_key(high), &mut |_, v| {
                let mut e = Entry::default();
                if let Err(x) = e.merge_from_bytes(v) {
                    err = Some(other(x));
                    return false;
                }
                size += v.len() as u64;
                let over = matches!(max_size, Some(m) if size > m && !out.is_empty());
                if over {
                    return false;
                }
                out.push(e);
                true
            })
            .map_err(other)?;
        if let Some(e) = err {
            return Err(e);
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
        if idx > self.last.get() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if let Some(term) = self.tail.borrow().term(idx) {
            return Ok(term);
        }
        Ok(self.entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.get().0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last.get())
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
    use super::*;
    use crate::engine::{open, EngineKind};

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8].into(),
            ..Default::default()
        }
    }

    #[test]
    fn append_overwrite_truncate_on_both_engines() {
        for (_, engine, _dir) in crate::engine::each_engine() {
            let log = RaftLog::open(engine.clone()).unwrap();
            assert_eq!(log.first_index().unwrap(), 1);
            assert_eq!(log.last_index().unwrap(), 0);
            let mut b = WriteBatch::default();
            log.append(&[entry(1, 1), entry(2, 1), entry(3, 1)], &mut b)
                .unwrap();
            engine.write(b, true).unwrap();
            // A new leader overwrites from index 2.
            let mut b = WriteBatch::default();
            log.append(&[entry(2, 2)], &mut b).unwrap();
            engine.write(b, true).unwrap();
            assert_eq!(log.last_index().unwrap(), 2);
            assert_eq!(log.term(2).unwrap(), 2);
            let got = log
                .entries(1, 3, None, GetEntriesContext::empty(false))
                .unwrap();
            assert_eq!(got.iter().map(|e| e.term).collect::<Vec<_>>(), vec![1, 2]);
            let mut b = WriteBatch::default();
            log.truncate_before(2, &mut b).unwrap();
            engine.write(b, true).unwrap();
            assert_eq!(log.first_index().unwrap(), 2);
            assert_eq!(log.term(1).unwrap(), 1);
            assert!(log
                .entries(1, 2, None, GetEntriesContext::empty(false))
                .is_err());
        }
    }

    /// Whatever the log went through, its in-memory tail answers reads as
    /// the engine does: the same log reopened (no tail) must agree on every
    /// range, size limit and term.
    #[test]
    fn the_tail_answers_as_the_engine_does() {
        for (_, engine, _dir) in crate::engine::each_engine() {
            let log = RaftLog::open(engine.clone()).unwrap();
            let write = |entries: &[Entry]| {
                let mut b = WriteBatch::default();
                log.append(entries, &mut b).unwrap();
                engine.write(b, true).unwrap();
            };
            let run = |from: u64, to: u64, term: u64| {
                (from..=to).map(|i| entry(i, term)).collect::<Vec<_>>()
            };
            write(&run(1, 3000, 1));
            write(&run(3001, 5000, 1));
            // Past the entry bound the oldest left the tail (it holds
            // 905..=5000); then overwritten from 4500 by a new term, and
            // truncated into.
            assert_eq!(log.tail.borrow().entries.len(), TAIL_ENTRIES);
            write(&run(4500, 4600, 2));
            write(&run(4601, 4700, 2));
            let mut b = WriteBatch::default();
            log.truncate_before(1000, &mut b).unwrap();
            engine.write(b, true).unwrap();
            let tail = log.tail.borrow();
            assert_eq!(
                (
                    tail.first_index().unwrap(),
                    tail.entries.back().unwrap().0.index
                ),
                (1000, 4700)
            );
            drop(tail);

            let reopened = RaftLog::open(engine.clone()).unwrap();
            assert_eq!(reopened.tail.borrow().entries.len(), 0);
            let ctx = || GetEntriesContext::empty(false);
            let summary = |es: Vec<Entry>| es.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>();
            for (low, high) in [
                (700, 4701),
                (604, 700),
                (4000, 4701),
                (4600, 4601),
                (4699, 4701),
            ] {
                for max in [None, Some(0), Some(100), Some(u64::MAX)] {
                    let (a, b) = (
                        log.entries(low, high, max, ctx()),
                        reopened.entries(low, high, max, ctx()),
                    );
                    match (a, b) {
                        (Ok(a), Ok(b)) => {
                            assert_eq!(summary(a), summary(b), "{low}..{high} {max:?}")
                        }
                        (a, b) => assert_eq!(a.is_err(), b.is_err(), "{low}..{high} {max:?}"),
                    }
                }
            }
            for idx in [998, 999, 1000, 4499, 4500, 4700, 4701] {
                assert_eq!(
                    log.term(idx).map_err(|e| e.to_string()),
                    reopened.term(idx).map_err(|e| e.to_string()),
                    "term {idx}"
                );
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

    #[test]
    fn state_survives_reopen_on_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = open(EngineKind::RocksDb, dir.path()).unwrap();
            let log = RaftLog::open(engine.clone()).unwrap();
            log.bootstrap(&[1]).unwrap();
            let mut b = WriteBatch::default();
            log.append(&[entry(1, 1), entry(2, 1)], &mut b).unwrap();
            let hs = HardState {
                term: 1,
                vote: 1,
                commit: 2,
                ..Default::default()
            };
            log.set_hard_state(&hs, &mut b).unwrap();
            engine.write(b, true).unwrap();
        }
        let engine = open(EngineKind::RocksDb, dir.path()).unwrap();
        let log = RaftLog::open(engine).unwrap();
        let st = log.initial_state().unwrap();
        assert_eq!(st.hard_state.commit, 2);
        assert_eq!(st.conf_state.voters, vec![1]);
        assert_eq!(log.last_index().unwrap(), 2);
    }
}
