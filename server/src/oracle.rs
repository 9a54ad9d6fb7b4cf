//! `RevisionOracle`: the one source of revisions for every shard.
//!
//! etcd gives each write transaction one revision, unique and increasing in
//! real time across the whole keyspace. With one raft group per shard there
//! is no single log to number writes, so a timestamp oracle numbers them
//! instead (as Percolator/TiKV's PD do): an atomic counter shared by the
//! shards of this process.
//!
//! Invariants:
//! - `allocate` never returns the same revision twice, across restarts too:
//!   before handing out a revision above the durable *ceiling*, the ceiling
//!   is raised by [`CEILING_STEP`] and fsync'd; a restarted oracle starts
//!   above the old ceiling (and above every revision found in the shards'
//!   logs). Revisions need not be dense, so skipping the unused rest of a
//!   batch is harmless.
//! - real-time order: a revision allocated after another allocation
//!   returned is larger (one atomic `fetch_add`).
//! - `current` is at least every revision allocated so far, so a reader
//!   that takes `current` after a write completed reads at or above that
//!   write's revision.
//!
//! Like etcd, an empty store is at revision 1 and the first write gets 2:
//! `current` is never 0, so "revision 0" can keep meaning "the current
//! revision" everywhere in the protocol.
//!
//! A shard allocates a revision immediately before proposing an entry and
//! records it as *in flight* until the entry is applied; see
//! [`crate::shard`] for how that yields each shard's resolved watermark.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

/// The revision of an empty store (etcd's too).
pub const INITIAL_REVISION: i64 = 1;

/// How far the durable ceiling moves each time it is raised.
pub const CEILING_STEP: i64 = 100_000;

/// Hands out revisions; shared by all shards of a process.
pub struct RevisionOracle {
    last: AtomicI64,
    ceiling: AtomicI64,
    file: Option<Mutex<File>>,
}

impl RevisionOracle {
    /// An oracle kept in memory only (for the memory engine: nothing
    /// survives a restart, so revisions may start over).
    pub fn in_memory() -> Self {
        RevisionOracle {
            last: AtomicI64::new(INITIAL_REVISION),
            ceiling: AtomicI64::new(i64::MAX),
            file: None,
        }
    }

    /// An oracle whose ceiling lives in `path`; the first revision handed
    /// out is above the stored ceiling.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let stored: i64 = text.trim().parse().unwrap_or(0).max(INITIAL_REVISION);
        Ok(RevisionOracle {
            last: AtomicI64::new(stored),
            ceiling: AtomicI64::new(stored),
            file: Some(Mutex::new(file)),
        })
    }

    /// Makes sure revisions handed out from now on are above `rev` (called
    /// at startup with the largest revision found in any shard's log).
    pub fn observe(&self, rev: i64) {
        self.last.fetch_max(rev, Ordering::SeqCst);
    }

    /// The newest revision handed out (`INITIAL_REVISION` before any).
    pub fn current(&self) -> i64 {
        self.last.load(Ordering::SeqCst)
    }

    /// A fresh revision, larger than every revision handed out before.
    pub fn allocate(&self) -> i64 {
        let rev = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        if rev > self.ceiling.load(Ordering::SeqCst) {
            self.raise_ceiling(rev);
        }
        rev
    }

    fn raise_ceiling(&self, rev: i64) {
        let Some(file) = &self.file else { return };
        let mut file = file.lock().expect("oracle ceiling lock poisoned");
        if rev <= self.ceiling.load(Ordering::SeqCst) {
            return; // another shard raised it meanwhile
        }
        let ceiling = rev + CEILING_STEP;
        let text = format!("{ceiling}\n");
        let persist = (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(text.as_bytes())?;
            file.sync_data()
        })();
        // Handing out a revision above an unpersisted ceiling could repeat
        // it after a crash; stopping is the only safe answer.
        persist.expect("cannot persist the revision oracle's ceiling");
        self.ceiling.store(ceiling, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_unique_and_increasing() {
        let o = RevisionOracle::in_memory();
        let a = o.allocate();
        assert_eq!(a, INITIAL_REVISION + 1);
        let b = o.allocate();
        assert!(b > a);
        assert_eq!(o.current(), b);
        o.observe(100);
        assert_eq!(o.allocate(), 101);
        o.observe(50); // never goes back
        assert_eq!(o.allocate(), 102);
    }

    #[test]
    fn restarted_oracle_starts_above_everything_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oracle");
        let handed_out = {
            let o = RevisionOracle::open(&path).unwrap();
            (0..10).map(|_| o.allocate()).max().unwrap()
        };
        let o = RevisionOracle::open(&path).unwrap();
        assert!(o.allocate() > handed_out);
        assert!(o.current() > handed_out);
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let o = std::sync::Arc::new(RevisionOracle::in_memory());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let o = o.clone();
                std::thread::spawn(move || (0..1000).map(|_| o.allocate()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<i64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 4000);
    }
}
