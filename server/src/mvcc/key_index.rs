//! The in-memory key index: for every key, its history of revisions.
//!
//! This plays the role of etcd's `treeIndex` of `keyIndex`es. etcd keeps, per
//! key, a list of *generations*: a generation starts when the key is created
//! and ends with a tombstone (delete). Here a key's history is one flat list
//! of [`Entry`]s sorted by revision, in which a tombstone entry closes a
//! generation; the next put after it opens the next generation. The two are
//! equivalent, and the flat list makes the one query that matters — "the
//! newest entry at or below revision R" — a single binary search, or none
//! at all when R is at or past the newest entry, which [`KeyHistory`] keeps
//! inline in the map's nodes.
//!
//! Invariants:
//! * Per key, entries are strictly increasing by [`Revision`] (main, then
//!   sub). A key never has two entries with the same revision.
//! * A key's list is never empty (a key whose history is all compacted away
//!   is removed from the map), and never starts with a tombstone (a
//!   tombstone is only kept while a live version before it is kept too, and
//!   compaction removes both together).
//! * Each entry carries the metadata of its version (create revision,
//!   version, lease) so filters, most sorts and a plain put need no engine
//!   read; only values live solely in the engine's version records.
//! * The newest entry is stored whole; the older ones are stored as their
//!   revisions plus runs of shared metadata ([`Older`]), 16 bytes a revision
//!   where a whole entry takes 48 (etcd's index also keeps 16). The
//!   encoding is lossless for any history: an entry that does not fit the
//!   run before it starts a new run.
//! * The index is derived state: [`super::Mvcc::open`] rebuilds it from the
//!   engine's version records, which are the source of truth.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::Rev;
use crate::engine::SmallBytes;

/// A revision with its sub-revision: the position of one change inside the
/// write revision `main` (etcd's `revision{main, sub}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: Rev,
    pub sub: i64,
}

/// One version of a key, as the index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rev: Revision,
    /// The generation's create revision (0 for a tombstone).
    pub create: Rev,
    /// The key's version in its generation (0 for a tombstone).
    pub version: i64,
    /// The lease the version is attached to (0: none, and for a tombstone).
    pub lease: i64,
    pub tombstone: bool,
}

/// The history of one key: its newest entry, held inline, and the older
/// ones.
///
/// The newest entry is what almost every read wants (reads of the latest
/// state, a list's `count`, a put's previous version), so it sits in the
/// index's own nodes: counting a range of N keys walks N nodes' slots, not
/// N separate allocations. The older entries are behind one pointer, `None`
/// until the key is written again, so a key written once costs no
/// allocation for its history and its slot stays small (B-tree nodes
/// reserve room for eleven slots; a wide slot costs in every free one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHistory {
    /// Entries before `newest`, oldest first; `None` rather than empty.
    older: Option<Box<Older>>,
    newest: Entry,
}

/// An older entry as [`Older`] keeps it: its revision and whether it is a
/// tombstone; the rest of its metadata comes from its [`Run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slim {
    main: Rev,
    /// The sub-revision, or `-1 - sub` for a tombstone (sub-revisions are
    /// never negative).
    sub: i64,
}

impl Slim {
    fn of(e: &Entry) -> Slim {
        debug_assert!(e.rev.sub >= 0);
        Slim {
            main: e.rev.main,
            sub: if e.tombstone {
                -1 - e.rev.sub
            } else {
                e.rev.sub
            },
        }
    }

    fn tombstone(self) -> bool {
        self.sub < 0
    }

    fn rev(self) -> Revision {
        Revision {
            main: self.main,
            sub: if self.sub < 0 {
                -1 - self.sub
            } else {
                self.sub
            },
        }
    }
}

/// A run of older entries that share a create revision and a lease and
/// whose versions rise by one from `version`: the first entry of the run
/// is at `start` in [`Older::entries`] with version `version`, the next has
/// `version + 1`, and so on. Tombstones (metadata all zero) may end a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: usize,
    create: Rev,
    version: i64,
    lease: i64,
}

/// A key's older entries, stored as revisions plus the runs that give their
/// metadata.
///
/// An entry's create revision, version and lease are the same for every
/// entry of a generation but the version, which rises by one per put — so a
/// generation written with one lease is one [`Run`], and each entry costs
/// only its revision (16 bytes, against 48 for a whole [`Entry`]). An entry
/// that does not continue the run before it (a new generation, another
/// lease, or any history that breaks the arithmetic) starts a run of its
/// own: the encoding never loses metadata, it is only smaller when the
/// history is regular, which every history MVCC writes is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Older {
    /// Oldest first, strictly increasing by revision.
    entries: Vec<Slim>,
    /// The run starting at entry 0 (inline: most keys have one run).
    first: Run,
    /// Runs after `first`, by increasing `start`; empty (no allocation)
    /// for a key with one generation and one lease.
    more: Vec<Run>,
    /// Whether the last entry is a tombstone: known here, a push need not
    /// read the end of `entries` (on a large index, a cache miss).
    ends_in_tombstone: bool,
}

impl Older {
    fn new(e: &Entry) -> Older {
        Older {
            entries: vec![Slim::of(e)],
            first: Run {
                start: 0,
                create: e.create,
                version: e.version,
                lease: e.lease,
            },
            more: Vec::new(),
            ends_in_tombstone: e.tombstone,
        }
    }

    fn last_run(&self) -> &Run {
        self.more.last().unwrap_or(&self.first)
    }

    fn run_of(&self, i: usize) -> &Run {
        match self.more.partition_point(|r| r.start <= i) {
            0 => &self.first,
            n => &self.more[n - 1],
        }
    }

    fn push(&mut self, e: &Entry) {
        let i = self.entries.len();
        let continues = if e.tombstone {
            debug_assert!(e.create == 0 && e.version == 0 && e.lease == 0);
            true
        } else {
            let r = self.last_run();
            !self.ends_in_tombstone
                && e.create == r.create
                && e.lease == r.lease
                && Some(e.version) == r.version.checked_add((i - r.start) as i64)
        };
        if !continues {
            self.more.push(Run {
                start: i,
                create: e.create,
                version: e.version,
                lease: e.lease,
            });
        }
        self.entries.push(Slim::of(e));
        self.ends_in_tombstone = e.tombstone;
    }

    fn get(&self, i: usize) -> Entry {
        let s = self.entries[i];
        if s.tombstone() {
            return Entry {
                rev: s.rev(),
                create: 0,
                version: 0,
                lease: 0,
                tombstone: true,
            };
        }
        let r = self.run_of(i);
        Entry {
            rev: s.rev(),
            create: r.create,
            version: r.version + (i - r.start) as i64,
            lease: r.lease,
            tombstone: false,
        }
    }

    /// Drops the first `n` entries (fewer than all), rebasing the runs.
    fn drop_first(&mut self, n: usize, removed: &mut dyn FnMut(Revision)) {
        for s in self.entries.drain(..n) {
            removed(s.rev());
        }
        // The run holding the new first entry becomes `first`.
        let mut first = *self.run_of(n);
        let gone = self.more.partition_point(|r| r.start <= n);
        self.more.drain(..gone);
        first.version += (n - first.start) as i64;
        first.start = 0;
        self.first = first;
        for r in &mut self.more {
            r.start -= n;
        }
    }
}

impl KeyHistory {
    /// A history of one entry.
    pub fn new(entry: Entry) -> KeyHistory {
        KeyHistory {
            older: None,
            newest: entry,
        }
    }

    /// The newest entry (live or a tombstone).
    pub fn newest(&self) -> &Entry {
        &self.newest
    }

    /// The entries, oldest first.
    #[cfg(test)]
    pub fn entries(&self) -> Vec<Entry> {
        let older = self.older.as_deref();
        let n = older.map_or(0, |o| o.entries.len());
        (0..n)
            .map(|i| older.unwrap().get(i))
            .chain(std::iter::once(self.newest))
            .collect()
    }

    /// The newest entry with `main <= rev`, if it is a live version.
    pub fn live_at(&self, rev: Rev) -> Option<Entry> {
        let e = if self.newest.rev.main <= rev {
            self.newest
        } else {
            let older = self.older.as_deref()?;
            let i = older.entries.partition_point(|s| s.main <= rev);
            older.get(i.checked_sub(1)?)
        };
        (!e.tombstone).then_some(e)
    }

    /// The newest entry, if it is a live version.
    pub fn live_latest(&self) -> Option<&Entry> {
        Some(&self.newest).filter(|e| !e.tombstone)
    }

    /// The live version just before `rev` (the previous version of the
    /// change at `rev`), if any.
    pub fn live_before(&self, rev: Revision) -> Option<Entry> {
        let e = if self.newest.rev < rev {
            self.newest
        } else {
            let older = self.older.as_deref()?;
            let i = older.entries.partition_point(|s| s.rev() < rev);
            older.get(i.checked_sub(1)?)
        };
        (!e.tombstone).then_some(e)
    }

    /// Appends `entry`, which the caller guarantees is newer than every
    /// entry (checked in debug builds).
    fn push(&mut self, entry: Entry) {
        debug_assert!(self.newest.rev < entry.rev);
        let previous = std::mem::replace(&mut self.newest, entry);
        match &mut self.older {
            Some(o) => o.push(&previous),
            None => self.older = Some(Box::new(Older::new(&previous))),
        }
    }

    /// Drops every entry that neither a read at `>= rev` nor a watch from
    /// `rev` needs: the entries below `rev`, except the newest of them when
    /// it is live and either a read at `rev` sees it (no entry at `rev`) or
    /// the first entry kept is a tombstone (which must not start a list).
    /// Every entry at `rev` itself stays: its events are history a watch
    /// from `rev` replays. A delete at exactly `rev` is therefore kept, with
    /// the version it ended, until a compaction above it; etcd dropped it
    /// and lost the event (etcd-io/etcd#18089), also when the key was
    /// deleted and put again in that revision (etcd-io/etcd#22376). Calls
    /// `removed` with each dropped revision. False if nothing is left (the
    /// newest entry was a tombstone below `rev`): the key must go.
    #[must_use]
    pub fn compact(&mut self, rev: Rev, removed: &mut dyn FnMut(Revision)) -> bool {
        if self.newest.rev.main < rev {
            for s in self.older.take().into_iter().flat_map(|o| o.entries) {
                removed(s.rev());
            }
            if self.newest.tombstone {
                removed(self.newest.rev);
                return false;
            }
            return true;
        }
        let newest = (self.newest.rev.main, self.newest.tombstone);
        let Some(older) = self.older.as_mut() else {
            return true;
        };
        // The first entry at or above `rev`, and the one before it.
        let j = older.entries.partition_point(|s| s.main < rev);
        if j == 0 {
            return true;
        }
        let (first_main, first_tombstone) = older
            .entries
            .get(j)
            .map_or(newest, |s| (s.main, s.tombstone()));
        let keep_before =
            !older.entries[j - 1].tombstone() && (first_main > rev || first_tombstone);
        let keep_from = if keep_before { j - 1 } else { j };
        if keep_from == older.entries.len() {
            for s in self.older.take().into_iter().flat_map(|o| o.entries) {
                removed(s.rev());
            }
        } else if keep_from > 0 {
            older.drop_first(keep_from, removed);
        }
        true
    }
}

/// Every key's history, ordered by key.
#[derive(Debug, Clone, Default)]
pub struct KeyIndex {
    /// Keys up to 38 bytes (`small_bytes::INLINE`) are held in the map's
    /// nodes themselves, so a lookup among short keys compares without
    /// following a pointer per key, and such a key takes no allocation of
    /// its own.
    keys: BTreeMap<SmallBytes, KeyHistory>,
}

impl KeyIndex {
    pub fn new() -> KeyIndex {
        KeyIndex::default()
    }

    pub fn get(&self, key: &[u8]) -> Option<&KeyHistory> {
        self.keys.get(key)
    }

    /// The key as stored in the index (borrowable for as long as the index)
    /// with its history.
    pub fn get_key_value(&self, key: &[u8]) -> Option<(&[u8], &KeyHistory)> {
        self.keys.get_key_value(key).map(|(k, h)| (&**k, h))
    }

    /// Appends `entry` to `key`'s history. The caller guarantees it is newer
    /// than every entry of that key (checked in debug builds).
    pub fn push(&mut self, key: &[u8], entry: Entry) {
        if let Some(h) = self.keys.get_mut(key) {
            h.push(entry);
        } else if !entry.tombstone {
            self.keys
                .insert(SmallBytes::from(key), KeyHistory::new(entry));
        }
        // A tombstone for a key with no history has nothing to end: it can
        // only come from a record whose live version was compacted away,
        // which compaction never leaves behind; ignore it.
    }

    /// Visits the histories of the keys in `[start, end)` in key order
    /// (`end` empty = to the end) until `f` returns false.
    pub fn range<'a>(
        &'a self,
        start: &[u8],
        end: Option<&[u8]>,
        f: &mut dyn FnMut(&'a [u8], &'a KeyHistory) -> bool,
    ) {
        let upper = match end {
            None => Bound::Unbounded,
            Some(e) if e <= start => return,
            Some(e) => Bound::Excluded(e),
        };
        for (k, h) in self.keys.range::<[u8], _>((Bound::Included(start), upper)) {
            if !f(k, h) {
                break;
            }
        }
    }

    /// Compacts every key at `rev` (see [`KeyHistory::compact`]), removing
    /// keys left without history. Calls `removed` for each dropped version.
    pub fn compact(&mut self, rev: Rev, removed: &mut dyn FnMut(&[u8], Revision)) {
        self.keys
            .retain(|k, h| h.compact(rev, &mut |r| removed(k, r)));
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(main: Rev, create: Rev, version: i64) -> Entry {
        Entry {
            rev: Revision { main, sub: 0 },
            create,
            version,
            lease: 0,
            tombstone: false,
        }
    }
    fn tomb(main: Rev) -> Entry {
        Entry {
            rev: Revision { main, sub: 0 },
            create: 0,
            version: 0,
            lease: 0,
            tombstone: true,
        }
    }

    fn history() -> KeyHistory {
        let mut h = KeyHistory::new(put(3, 3, 1));
        for e in [put(7, 3, 2), tomb(8), put(20, 20, 1)] {
            h.push(e);
        }
        h
    }

    fn entries(h: &KeyHistory) -> Vec<Entry> {
        h.entries()
    }

    #[test]
    fn live_at_follows_generations() {
        let h = history();
        assert_eq!(h.live_at(2), None);
        assert_eq!(h.live_at(3).unwrap().version, 1);
        assert_eq!(h.live_at(6).unwrap().version, 1);
        assert_eq!(h.live_at(7).unwrap().version, 2);
        assert_eq!(h.live_at(8), None);
        assert_eq!(h.live_at(19), None);
        assert_eq!(h.live_at(20).unwrap().create, 20);
        assert_eq!(h.live_latest().unwrap().rev.main, 20);
        assert_eq!(
            h.live_before(Revision { main: 8, sub: 0 })
                .unwrap()
                .rev
                .main,
            7
        );
        assert_eq!(h.live_before(Revision { main: 20, sub: 0 }), None);
        assert_eq!(h.live_before(Revision { main: 3, sub: 0 }), None);
    }

    #[test]
    fn compact_keeps_newest_live_version() {
        let mut removed = Vec::new();
        let mut h = history();
        assert!(h.compact(7, &mut |r| removed.push(r.main)));
        assert_eq!(removed, vec![3]);
        assert_eq!(entries(&h).len(), 3);
        // The tombstone at 8 goes together with the version it ended.
        assert!(h.compact(10, &mut |r| removed.push(r.main)));
        assert_eq!(removed, vec![3, 7, 8]);
        assert_eq!(entries(&h), vec![put(20, 20, 1)]);
        assert!(h.compact(30, &mut |r| removed.push(r.main)));
        assert_eq!(entries(&h), vec![put(20, 20, 1)]);
        // A tombstone at the compaction revision stays, with the version it
        // ended: a watch from 31 must see the delete.
        h.push(tomb(31));
        assert!(h.compact(31, &mut |r| removed.push(r.main)));
        assert_eq!(entries(&h), vec![put(20, 20, 1), tomb(31)]);
        // A newest tombstone below the compaction goes, and the key with it.
        assert!(!h.compact(32, &mut |r| removed.push(r.main)));
        assert_eq!(removed, vec![3, 7, 8, 20, 31]);
    }

    #[test]
    fn compact_keeps_every_change_at_its_revision() {
        let at = |main: Rev, sub: i64, e: Entry| Entry {
            rev: Revision { main, sub },
            ..e
        };
        // Deleted and put again within revision 40 (a txn's delete, then
        // put): both changes stay for a watch from 40, and so does the
        // version the delete ended (a list never starts with a tombstone).
        let mut h = KeyHistory::new(put(10, 10, 1));
        h.push(at(40, 0, tomb(0)));
        h.push(at(40, 1, put(0, 40, 1)));
        let mut removed = Vec::new();
        assert!(h.compact(40, &mut |r| removed.push((r.main, r.sub))));
        assert_eq!(removed, vec![]);
        assert_eq!(entries(&h).len(), 3);
        // Put and deleted within revision 50: both stay, and nothing before
        // them (the put's previous version is not given to a watch from 50
        // by etcd either, and no read at 50 sees it).
        h.push(at(50, 0, put(0, 40, 2)));
        h.push(at(50, 1, tomb(0)));
        let mut removed = Vec::new();
        assert!(h.compact(50, &mut |r| removed.push((r.main, r.sub))));
        assert_eq!(removed, vec![(10, 0), (40, 0), (40, 1)]);
        assert_eq!(
            entries(&h),
            vec![at(50, 0, put(0, 40, 2)), at(50, 1, tomb(0))]
        );
        assert!(!h.compact(51, &mut |r| removed.push((r.main, r.sub))));
    }

    #[test]
    fn index_range_and_compaction() {
        let mut idx = KeyIndex::new();
        idx.push(b"b", put(1, 1, 1));
        idx.push(b"a", put(2, 2, 1));
        idx.push(b"c", put(3, 3, 1));
        idx.push(b"b", tomb(4));
        idx.push(b"zz", tomb(5)); // nothing to end: ignored
        assert_eq!(idx.len(), 3);
        let mut seen = Vec::new();
        idx.range(b"a", Some(b"c"), &mut |k, _| {
            seen.push(k.to_vec());
            true
        });
        assert_eq!(seen, vec![b"a".to_vec(), b"b".to_vec()]);
        let mut seen = 0;
        idx.range(b"b", None, &mut |_, _| {
            seen += 1;
            true
        });
        assert_eq!(seen, 2);
        idx.range(b"c", Some(b"a"), &mut |_, _| panic!("inverted range"));
        let mut removed = Vec::new();
        // b's delete at 4 stays for a watch from 4; compacting above it
        // takes the key.
        idx.compact(4, &mut |k, r| removed.push((k.to_vec(), r.main)));
        assert_eq!(removed, vec![]);
        assert_eq!(idx.len(), 3);
        idx.compact(5, &mut |k, r| removed.push((k.to_vec(), r.main)));
        assert_eq!(removed, vec![(b"b".to_vec(), 1), (b"b".to_vec(), 4)]);
        assert_eq!(idx.len(), 2);
        assert!(idx.get(b"b").is_none());
    }

    /// The model: a plain list of whole entries, and etcd's rules on it.
    fn model_live_at(es: &[Entry], rev: Rev) -> Option<Entry> {
        let i = es.partition_point(|e| e.rev.main <= rev);
        es.get(i.checked_sub(1)?).filter(|e| !e.tombstone).copied()
    }

    fn model_live_before(es: &[Entry], rev: Revision) -> Option<Entry> {
        let i = es.partition_point(|e| e.rev < rev);
        es.get(i.checked_sub(1)?).filter(|e| !e.tombstone).copied()
    }

    fn model_compact(es: &mut Vec<Entry>, rev: Rev) -> Vec<Revision> {
        let j = es.partition_point(|e| e.rev.main < rev);
        if j == 0 {
            return Vec::new();
        }
        let keep_before =
            !es[j - 1].tombstone && es.get(j).is_none_or(|f| f.rev.main > rev || f.tombstone);
        let keep_from = if keep_before { j - 1 } else { j };
        es.drain(..keep_from).map(|e| e.rev).collect()
    }

    /// Random histories, regular (as MVCC writes them: versions rising by
    /// one within a generation, a tombstone ending it) and irregular (any
    /// create, version and lease), read and compacted at every revision:
    /// the compact encoding answers exactly as a plain list of entries.
    #[test]
    fn compact_encoding_matches_plain_entries() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..400 {
            let irregular = round % 4 == 3;
            let mut model: Vec<Entry> = Vec::new();
            let mut main = 0;
            let len = rng.gen_range(1..40);
            while model.len() < len {
                main += rng.gen_range(1..4);
                let sub = if rng.gen_bool(0.2) {
                    rng.gen_range(0..3)
                } else {
                    0
                };
                let rev = Revision { main, sub };
                let last = model.last().filter(|e| !e.tombstone).copied();
                let e = if last.is_some() && rng.gen_bool(0.15) {
                    Entry {
                        rev,
                        create: 0,
                        version: 0,
                        lease: 0,
                        tombstone: true,
                    }
                } else if irregular {
                    Entry {
                        rev,
                        create: rng.gen_range(1..=main),
                        version: rng.gen_range(1..5),
                        lease: rng.gen_range(0..2),
                        tombstone: false,
                    }
                } else {
                    let lease = if rng.gen_bool(0.1) { 9 } else { 0 };
                    match last {
                        Some(l) => Entry {
                            rev,
                            create: l.create,
                            version: l.version + 1,
                            lease,
                            tombstone: false,
                        },
                        None => Entry {
                            rev,
                            create: main,
                            version: 1,
                            lease,
                            tombstone: false,
                        },
                    }
                };
                model.push(e);
            }
            let mut h = KeyHistory::new(model[0]);
            for e in &model[1..] {
                h.push(*e);
            }
            // Compact a few times, checking every read in between.
            let mut floor = 0;
            loop {
                assert_eq!(h.entries(), model, "round {round}");
                for r in 0..=main + 1 {
                    assert_eq!(
                        h.live_at(r),
                        model_live_at(&model, r),
                        "round {round} at {r}"
                    );
                    for sub in 0..3 {
                        let rev = Revision { main: r, sub };
                        assert_eq!(h.live_before(rev), model_live_before(&model, rev));
                    }
                }
                if floor > main {
                    break;
                }
                floor += rng.gen_range(1..6);
                let mut removed = Vec::new();
                let kept = h.compact(floor, &mut |r| removed.push(r));
                assert_eq!(removed, model_compact(&mut model, floor), "round {round}");
                if !kept {
                    // The newest entry was a tombstone: all of it went.
                    assert!(model.is_empty());
                    break;
                }
                // Keep writing after a compaction, as a live key does.
                if rng.gen_bool(0.5) {
                    main += 1;
                    let e = match model.last().filter(|e| !e.tombstone) {
                        Some(l) => Entry {
                            rev: Revision { main, sub: 0 },
                            version: l.version + 1,
                            ..*l
                        },
                        None => Entry {
                            rev: Revision { main, sub: 0 },
                            create: main,
                            version: 1,
                            lease: 0,
                            tombstone: false,
                        },
                    };
                    h.push(e);
                    model.push(e);
                }
            }
        }
    }

    #[test]
    fn regular_history_is_one_run() {
        let mut h = KeyHistory::new(put(1, 1, 1));
        for v in 2..=100 {
            h.push(put(v, 1, v));
        }
        let older = h.older.as_deref().unwrap();
        assert_eq!(older.entries.len(), 99);
        assert!(older.more.is_empty());
        assert_eq!(std::mem::size_of::<Slim>(), 16);
        // A delete and a new generation: one more run.
        h.push(tomb(101));
        h.push(put(102, 102, 1));
        h.push(put(103, 102, 2));
        assert_eq!(h.older.as_deref().unwrap().more.len(), 1);
        assert_eq!(h.live_at(50).unwrap(), put(50, 1, 50));
        assert_eq!(h.live_at(102).unwrap(), put(102, 102, 1));
    }
}
