//! The in-memory key index: for every key, its history of revisions.
//!
//! This plays the role of etcd's `treeIndex` of `keyIndex`es. etcd keeps, per
//! key, a list of *generations*: a generation starts when the key is created
//! and ends with a tombstone (delete). Here a key's history is one flat list
//! of [`Entry`]s sorted by revision, in which a tombstone entry closes a
//! generation; the next put after it opens the next generation. The two are
//! equivalent, and the flat list makes the one query that matters — "the
//! newest entry at or below revision R" — a single binary search.
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
//! * The index is derived state: [`super::Mvcc::open`] rebuilds it from the
//!   engine's version records, which are the source of truth.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::Rev;

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

/// The history of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyHistory {
    pub entries: Vec<Entry>,
}

impl KeyHistory {
    /// The newest entry with `main <= rev`, if it is a live version.
    pub fn live_at(&self, rev: Rev) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.rev.main <= rev);
        if i == 0 {
            return None;
        }
        let e = &self.entries[i - 1];
        (!e.tombstone).then_some(e)
    }

    /// The newest entry, if it is a live version.
    pub fn live_latest(&self) -> Option<&Entry> {
        self.entries.last().filter(|e| !e.tombstone)
    }

    /// The live version just before `rev` (the previous version of the
    /// change at `rev`), if any.
    pub fn live_before(&self, rev: Revision) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.rev < rev);
        if i == 0 {
            return None;
        }
        let e = &self.entries[i - 1];
        (!e.tombstone).then_some(e)
    }

    /// Drops, as etcd's compaction does, every entry that no read at
    /// `>= rev` can see: everything older than the newest entry at or below
    /// `rev`, and that entry itself if it is a tombstone. Calls `removed`
    /// with each dropped revision.
    pub fn compact(&mut self, rev: Rev, removed: &mut dyn FnMut(Revision)) {
        let i = self.entries.partition_point(|e| e.rev.main <= rev);
        if i == 0 {
            return;
        }
        let keep_from = if self.entries[i - 1].tombstone {
            i
        } else {
            i - 1
        };
        for e in self.entries.drain(..keep_from) {
            removed(e.rev);
        }
    }
}

/// Every key's history, ordered by key.
#[derive(Debug, Clone, Default)]
pub struct KeyIndex {
    keys: BTreeMap<Vec<u8>, KeyHistory>,
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
        self.keys.get_key_value(key).map(|(k, h)| (k.as_slice(), h))
    }

    /// Appends `entry` to `key`'s history. The caller guarantees it is newer
    /// than every entry of that key (checked in debug builds).
    pub fn push(&mut self, key: &[u8], entry: Entry) {
        if let Some(h) = self.keys.get_mut(key) {
            debug_assert!(h.entries.last().is_none_or(|l| l.rev < entry.rev));
            h.entries.push(entry);
        } else if !entry.tombstone {
            self.keys.insert(
                key.to_vec(),
                KeyHistory {
                    entries: vec![entry],
                },
            );
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
        self.keys.retain(|k, h| {
            h.compact(rev, &mut |r| removed(k, r));
            !h.entries.is_empty()
        });
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
        KeyHistory {
            entries: vec![put(3, 3, 1), put(7, 3, 2), tomb(8), put(20, 20, 1)],
        }
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
        h.compact(7, &mut |r| removed.push(r.main));
        assert_eq!(removed, vec![3]);
        assert_eq!(h.entries.len(), 3);
        // The tombstone at 8 goes together with the version it ended.
        h.compact(10, &mut |r| removed.push(r.main));
        assert_eq!(removed, vec![3, 7, 8]);
        assert_eq!(h.entries, vec![put(20, 20, 1)]);
        h.compact(30, &mut |r| removed.push(r.main));
        assert_eq!(h.entries, vec![put(20, 20, 1)]);
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
        idx.compact(4, &mut |k, r| removed.push((k.to_vec(), r.main)));
        assert_eq!(removed, vec![(b"b".to_vec(), 1), (b"b".to_vec(), 4)]);
        assert_eq!(idx.len(), 2);
        assert!(idx.get(b"b").is_none());
    }
}
