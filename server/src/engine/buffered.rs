//! `BufferedEngine`: holds a shard's unsynced writes in memory for the
//! length of one raft batch, then writes them as one engine batch.
//!
//! Applying a committed raft entry produces a small unsynced write (its MVCC
//! records and the applied index). Written one by one, a batch of N entries
//! costs N engine writes — on RocksDB N WAL records and N `write(2)` calls —
//! plus one more for raft's commit index. The shard's Ready loop instead
//! [`hold`](BufferedEngine::hold)s writes while it applies a batch and
//! [`flush`](BufferedEngine::flush)es once: one write per raft batch.
//! Keys every entry rewrites (the applied index, the MVCC current
//! revision) reach the engine once per flush, not once per entry: the held
//! writes are kept as their final value per key, which is what an atomic
//! batch of them leaves behind anyway.
//!
//! Nothing above the engine notices: reads look through the held writes
//! first (an overlay keyed like the engine), so the next entry's MVCC reads
//! see the previous entry's records, exactly as if they had been written.
//!
//! # Invariants
//!
//! * **Read-your-writes.** While writes are held, `get`, `scan` and
//!   `scan_rev` answer as the inner engine would after the held writes:
//!   the overlay's value (or deletion) wins over the inner engine's.
//! * **Order.** Held writes reach the inner engine before any later
//!   write: a synced write or a `DeleteRange` (which the overlay does not
//!   model) first takes everything held into the same engine batch, so it
//!   is atomic with them and never overtakes them. Within the held writes
//!   only the last per key is written (in key order): the batch is atomic,
//!   so no reader could have seen the ones it replaced.
//! * **Durability is unchanged.** Only unsynced writes are held, and an
//!   unsynced write promised nothing durable. The shard holds only the
//!   effects of applying raft entries that are already durable in the raft
//!   log (with the applied index in the same batch), so a crash before the
//!   flush loses nothing: restart re-applies the entries from the log.
//! * When not holding, every call goes straight to the inner engine. Over
//!   the memory engine it never holds (a held write would only add a second
//!   map insert to the one the write costs).
//!
//! The unit tests below drive the overlay over both engines (with holding
//! forced on), so it behaves the same whatever it wraps.

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::ops::Bound;
use std::rc::Rc;

use super::{
    map_bounds, BatchOp, Engine, EngineError, EngineKind, EngineSyncJob, SliceBounds, SmallBytes,
    WriteBatch,
};

/// A held write: its key, and the new value or `None` for a deletion.
type Held = (SmallBytes, Option<SmallBytes>);

/// The overlay's pairs in scan order.
type HeldPairs<'a> = Box<dyn Iterator<Item = &'a Held> + 'a>;

/// The latest held write per key, in key order: a sorted vector, not a
/// tree. Nearly every insert is an append or replaces a key already held:
/// version records are keyed by revision, which grows, and their keyspace
/// (`v`) sorts after every other; the keys that every entry rewrites (the
/// applied index, the current revision) are held from the first entry of
/// a flush on, at the vector's front. An append compares one key, a
/// replacement gallops from the front (a few comparisons), and nothing is
/// allocated once the vector has grown. Any other insert (a lease record,
/// a txn intent) moves the pairs after it: a few hundred at most, as the
/// shard flushes every 512 keys. Reads binary-search.
#[derive(Default)]
struct Overlay {
    pairs: Vec<Held>,
}

impl Overlay {
    fn insert(&mut self, key: SmallBytes, value: Option<SmallBytes>) {
        if self.pairs.last().is_none_or(|(last, _)| **last < *key) {
            self.pairs.push((key, value));
            return;
        }
        match self.position_from_front(&key) {
            Ok(i) => self.pairs[i].1 = value,
            Err(i) => self.pairs.insert(i, (key, value)),
        }
    }

    /// [`Self::position`] for a key that likely sorts near the front, as
    /// every key but a version record's does: a galloping search from the
    /// first pair, a few comparisons for the keys rewritten each entry
    /// instead of a binary search's nine.
    fn position_from_front(&self, key: &[u8]) -> Result<usize, usize> {
        let mut end = 1;
        while end < self.pairs.len() && *self.pairs[end - 1].0 < *key {
            end *= 2;
        }
        let start = end / 2;
        let end = end.min(self.pairs.len());
        self.pairs[start..end]
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .map(|i| start + i)
            .map_err(|i| start + i)
    }

    fn position(&self, key: &[u8]) -> Result<usize, usize> {
        self.pairs.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    fn get(&self, key: &[u8]) -> Option<&Option<SmallBytes>> {
        self.position(key).ok().map(|i| &self.pairs[i].1)
    }

    /// The pairs within `bounds`, in key order.
    fn range(&self, (start, end): SliceBounds<'_>) -> &[Held] {
        let below = |b: &Bound<&[u8]>, k: &[u8]| match b {
            Bound::Included(b) => k < *b,
            Bound::Excluded(b) => k <= *b,
            Bound::Unbounded => false,
        };
        let from = self.pairs.partition_point(|(k, _)| below(&start, k));
        let to = match end {
            Bound::Unbounded => self.pairs.len(),
            Bound::Excluded(e) => self.pairs.partition_point(|(k, _)| **k < *e),
            Bound::Included(e) => self.pairs.partition_point(|(k, _)| **k <= *e),
        };
        &self.pairs[from..to.max(from)]
    }

    fn len(&self) -> usize {
        self.pairs.len()
    }

    fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

pub struct BufferedEngine {
    inner: Rc<dyn Engine>,
    holding: Cell<bool>,
    /// The latest held write per key: what reads see, and what `flush`
    /// writes.
    overlay: RefCell<Overlay>,
}

impl BufferedEngine {
    pub fn new(inner: Rc<dyn Engine>) -> Rc<BufferedEngine> {
        Rc::new(BufferedEngine {
            inner,
            holding: Cell::new(false),
            overlay: RefCell::new(Overlay::default()),
        })
    }

    /// From now until [`flush`](Self::flush), unsynced writes are held —
    /// on an engine where a write costs more than the overlay insert that
    /// holding it does. The memory engine's write *is* such an insert, so
    /// over it this does nothing and writes go straight through.
    pub fn hold(&self) {
        if self.inner.kind().is_persistent() {
            self.holding.set(true);
        }
    }

    #[cfg(test)]
    fn hold_always(&self) {
        self.holding.set(true);
    }

    /// Writes everything held as one unsynced batch and stops holding.
    pub fn flush(&self) -> Result<(), EngineError> {
        self.holding.set(false);
        self.write_held()
    }

    /// Writes what is held through to the inner engine (unsynced).
    fn write_held(&self) -> Result<(), EngineError> {
        let held = self.take_held();
        if held.is_empty() {
            return Ok(());
        }
        self.inner.write(held, false)
    }

    /// Number of keys held (for tests and diagnostics).
    pub fn held_len(&self) -> usize {
        self.overlay.borrow().len()
    }

    fn take_held(&self) -> WriteBatch {
        let mut overlay = self.overlay.borrow_mut();
        WriteBatch {
            ops: overlay
                .pairs
                .drain(..)
                .map(|(k, v)| match v {
                    Some(v) => BatchOp::Put(k, v),
                    None => BatchOp::Delete(k),
                })
                .collect(),
        }
    }

    /// Merges the inner engine's pairs with the overlay's in `[start,
    /// end)`. `order` is the direction of the scan: `Less` for ascending (a
    /// key that sorts before comes first), `Greater` for descending.
    fn merged_scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        order: Ordering,
    ) -> Result<(), EngineError> {
        let overlay = self.overlay.borrow();
        let inner_scan = |g: &mut dyn FnMut(&[u8], &[u8]) -> bool| {
            if order == Ordering::Less {
                self.inner.scan(start, end, g)
            } else {
                self.inner.scan_rev(start, end, g)
            }
        };
        if overlay.is_empty() {
            return inner_scan(f);
        }
        let Some(bounds) = map_bounds(start, end) else {
            return Ok(());
        };
        let range = overlay.range(bounds).iter();
        let mut held: HeldPairs<'_> = if order == Ordering::Less {
            Box::new(range)
        } else {
            Box::new(range.rev())
        };
        let mut next = held.next();
        let mut stopped = false;
        inner_scan(&mut |k, v| {
            // Overlay keys that come before `k` in scan order go first.
            while let Some((hk, hv)) = next {
                let c = (**hk).cmp(k);
                if c == order {
                    next = held.next();
                    if let Some(hv) = hv {
                        if !f(hk, hv) {
                            stopped = true;
                            return false;
                        }
                    }
                } else if c == Ordering::Equal {
                    // The held write shadows the inner engine's pair.
                    next = held.next();
                    if let Some(hv) = hv {
                        if !f(hk, hv) {
                            stopped = true;
                            return false;
                        }
                    }
                    return true;
                } else {
                    break;
                }
            }
            if !f(k, v) {
                stopped = true;
                return false;
            }
            true
        })?;
        while let (false, Some((hk, hv))) = (stopped, next) {
            if let Some(hv) = hv {
                if !f(hk, hv) {
                    break;
                }
            }
            next = held.next();
        }
        Ok(())
    }
}

impl Engine for BufferedEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        if let Some(held) = self.overlay.borrow().get(key) {
            return Ok(held.as_deref().map(<[u8]>::to_vec));
        }
        self.inner.get(key)
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        self.merged_scan(start, end, f, Ordering::Less)
    }

    fn scan_rev(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        self.merged_scan(start, end, f, Ordering::Greater)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        let holdable = || {
            !batch
                .ops
                .iter()
                .any(|op| matches!(op, BatchOp::DeleteRange(..)))
        };
        if self.holding.get() && !sync && holdable() {
            let mut overlay = self.overlay.borrow_mut();
            for op in batch.ops {
                match op {
                    BatchOp::Put(k, v) => overlay.insert(k, Some(v)),
                    BatchOp::Delete(k) => overlay.insert(k, None),
                    BatchOp::DeleteRange(..) => unreachable!("not holdable"),
                };
            }
            return Ok(());
        }
        let mut all = self.take_held();
        if all.is_empty() {
            return self.inner.write(batch, sync);
        }
        all.extend(batch);
        self.inner.write(all, sync)
    }

    fn sync_job(&self) -> Result<Option<EngineSyncJob>, EngineError> {
        self.write_held()?;
        self.inner.sync_job()
    }

    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::each_engine;

    /// The sorted-vector overlay against a `BTreeMap` given the same
    /// inserts (appends, replacements, inserts in the middle, deletions):
    /// same latest write per key, same pairs in every range.
    #[test]
    fn the_overlay_keeps_the_latest_write_per_key_in_key_order() {
        use std::collections::BTreeMap;
        let mut overlay = Overlay::default();
        let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let mut x: u32 = 7;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for i in 0..2_000u32 {
            let r = next();
            // Mostly growing keys, as version records are; some anywhere.
            let key = if r % 4 == 0 {
                vec![b'a' + (r % 7) as u8, (r >> 8) as u8 % 5]
            } else {
                [&b"v"[..], &i.to_be_bytes()].concat()
            };
            let value = (r % 5 != 0).then(|| r.to_be_bytes().to_vec());
            overlay.insert(key.clone().into(), value.clone().map(Into::into));
            model.insert(key, value);
        }
        let flat = |pairs: &[Held]| -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_vec(), v.as_deref().map(<[u8]>::to_vec)))
                .collect()
        };
        assert_eq!(
            flat(&overlay.pairs),
            model.clone().into_iter().collect::<Vec<_>>()
        );
        for (k, v) in &model {
            assert_eq!(
                overlay.get(k).map(|v| v.as_deref().map(<[u8]>::to_vec)),
                Some(v.clone())
            );
        }
        assert!(overlay.get(b"zz").is_none());
        let edges: [&[u8]; 7] = [b"", b"a", b"a\x02", b"c", b"g", b"v\x00\x00\x03", b"w"];
        for start in edges {
            for end in edges {
                let Some(bounds) = map_bounds(start, end) else {
                    continue;
                };
                let want: Vec<_> = model
                    .range::<[u8], _>(bounds)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(flat(overlay.range(bounds)), want, "{start:?}..{end:?}");
            }
        }
    }

    /// Up to `limit` pairs of `[start, end)`, descending if `rev`.
    fn read(
        e: &dyn Engine,
        start: &[u8],
        end: &[u8],
        limit: usize,
        rev: bool,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut f = |k: &[u8], v: &[u8]| {
            out.push((k.to_vec(), v.to_vec()));
            out.len() < limit
        };
        if rev {
            e.scan_rev(start, end, &mut f).unwrap();
        } else {
            e.scan(start, end, &mut f).unwrap();
        }
        out
    }

    /// A scripted mix of direct and held writes: every read through the
    /// buffered engine must match a plain engine that got the same writes
    /// directly, on both engines, for every scan window and limit.
    #[test]
    fn reads_match_a_plain_engine_while_holding_and_after_flush() {
        for ((_d1, _, inner), (_d2, _, plain)) in each_engine().into_iter().zip(each_engine()) {
            let kind = inner.kind();
            let buffered = BufferedEngine::new(inner.clone());
            let mut base = WriteBatch::new();
            for k in [&b"a"[..], b"c", b"e", b"g"] {
                base.put(k, [k, b"0"].concat());
            }
            buffered.write(base.clone(), false).unwrap();
            plain.write(base, false).unwrap();

            buffered.hold_always();
            let mut steps = Vec::new();
            let mut b = WriteBatch::new();
            b.put(&b"b"[..], &b"b1"[..]).delete(&b"c"[..]);
            steps.push(b);
            let mut b = WriteBatch::new();
            b.put(&b"e"[..], &b"e1"[..]).put(&b"h"[..], &b"h1"[..]);
            steps.push(b);
            let mut b = WriteBatch::new();
            b.delete(&b"b"[..])
                .put(&b"0"[..], &b"01"[..])
                .put(&b"b"[..], &b"b2"[..]);
            steps.push(b);
            for step in steps {
                buffered.write(step.clone(), false).unwrap();
                plain.write(step, false).unwrap();
                // Held, not written through.
                assert!(buffered.held_len() > 0, "{kind}");
                for (s, e) in [
                    (&b""[..], &b""[..]),
                    (b"b", b"f"),
                    (b"c", b"d"),
                    (b"d", b""),
                ] {
                    for limit in 1..8 {
                        assert_eq!(
                            read(&*buffered, s, e, limit, false),
                            read(&*plain, s, e, limit, false),
                            "{kind} scan {s:?}..{e:?} limit {limit}"
                        );
                        assert_eq!(
                            read(&*buffered, s, e, limit, true),
                            read(&*plain, s, e, limit, true),
                            "{kind} scan_rev {s:?}..{e:?} limit {limit}"
                        );
                    }
                }
                for k in [&b"0"[..], b"a", b"b", b"c", b"e", b"h", b"z"] {
                    assert_eq!(buffered.get(k).unwrap(), plain.get(k).unwrap(), "{kind}");
                }
            }
            // The inner engine has not seen the held writes yet.
            assert_eq!(inner.get(b"h").unwrap(), None, "{kind}");
            buffered.flush().unwrap();
            assert_eq!(buffered.held_len(), 0);
            assert_eq!(
                read(&*inner, b"", b"", 100, false),
                read(&*plain, b"", b"", 100, false),
                "{kind}"
            );
        }
    }

    /// A key rewritten by every held write (as the applied index is by
    /// every applied entry) is written once per flush, with its last value;
    /// a key put and then deleted is written as the deletion.
    #[test]
    fn a_flush_writes_each_held_key_once_with_its_last_value() {
        for (_dir, _, inner) in each_engine() {
            let buffered = BufferedEngine::new(inner.clone());
            let mut base = WriteBatch::new();
            base.put(&b"gone"[..], &b"0"[..]);
            inner.write(base, false).unwrap();
            buffered.hold_always();
            for i in 1..=50u8 {
                let mut b = WriteBatch::new();
                b.put(vec![b'v', i], vec![i])
                    .put(&b"applied"[..], vec![i])
                    .put(&b"gone"[..], vec![i]);
                buffered.write(b, false).unwrap();
            }
            let mut b = WriteBatch::new();
            b.delete(&b"gone"[..]);
            buffered.write(b, false).unwrap();
            // 50 records, the applied index and the deleted key.
            let held = buffered.take_held();
            assert_eq!(held.len(), 52);
            let last = |key: &[u8]| {
                held.ops.iter().find_map(|op| match op {
                    BatchOp::Put(k, v) if k == key => Some(Some(v.clone())),
                    BatchOp::Delete(k) if k == key => Some(None),
                    _ => None,
                })
            };
            assert_eq!(last(b"applied"), Some(Some(SmallBytes::from(&[50]))));
            assert_eq!(last(b"gone"), Some(None));
            inner.write(held, false).unwrap();
            assert_eq!(inner.get(b"applied").unwrap(), Some(vec![50]));
            assert_eq!(inner.get(b"gone").unwrap(), None);
            assert_eq!(inner.get(&[b'v', 7]).unwrap(), Some(vec![7]));
        }
    }

    /// A synced write or a DeleteRange takes the held writes with it, in
    /// order, and later unsynced writes go straight through once flushed.
    #[test]
    fn synced_writes_and_delete_ranges_carry_what_is_held() {
        for (_dir, _, inner) in each_engine() {
            let kind = inner.kind();
            let buffered = BufferedEngine::new(inner.clone());
            buffered.hold_always();
            let mut b = WriteBatch::new();
            b.put(&b"k1"[..], &b"v1"[..]);
            buffered.write(b, false).unwrap();
            let mut b = WriteBatch::new();
            b.put(&b"k2"[..], &b"v2"[..]);
            buffered.write(b, true).unwrap();
            assert_eq!(inner.get(b"k1").unwrap(), Some(b"v1".to_vec()), "{kind}");
            assert_eq!(inner.get(b"k2").unwrap(), Some(b"v2".to_vec()), "{kind}");

            let mut b = WriteBatch::new();
            b.put(&b"k3"[..], &b"v3"[..]);
            buffered.write(b, false).unwrap();
            let mut b = WriteBatch::new();
            b.delete_range(&b"k"[..], &b"k3"[..]);
            buffered.write(b, false).unwrap();
            assert_eq!(
                read(&*inner, b"", b"", 10, false),
                vec![(b"k3".to_vec(), b"v3".to_vec())]
            );

            let mut b = WriteBatch::new();
            b.put(&b"k4"[..], &b"v4"[..]);
            buffered.write(b, false).unwrap();
            buffered.sync().unwrap();
            assert_eq!(inner.get(b"k4").unwrap(), Some(b"v4".to_vec()), "{kind}");

            buffered.flush().unwrap();
            let mut b = WriteBatch::new();
            b.put(&b"k5"[..], &b"v5"[..]);
            buffered.write(b, false).unwrap();
            assert_eq!(inner.get(b"k5").unwrap(), Some(b"v5".to_vec()), "{kind}");
        }
    }
}
