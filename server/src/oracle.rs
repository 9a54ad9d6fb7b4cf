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

use std::path::{Path, PathBuf};
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
    /// Where the ceiling lives (`None`: in memory only).
    file: Option<Mutex<PathBuf>>,
    /// The ceiling file was missing or empty in a data directory that
    /// holds revisions (see [`RevisionOracle::observe`]).
    unknown_past: bool,
}

impl RevisionOracle {
    /// An oracle kept in memory only (for the memory engine: nothing
    /// survives a restart, so revisions may start over).
    pub fn in_memory() -> Self {
        RevisionOracle {
            last: AtomicI64::new(INITIAL_REVISION),
            ceiling: AtomicI64::new(i64::MAX),
            file: None,
            unknown_past: false,
        }
    }

    /// An oracle whose ceiling lives in `path`; the first revision handed
    /// out is above the stored ceiling. The file is replaced whole
    /// ([`crate::durable_file`]), so it is never seen half written; one
    /// that cannot be read as a revision is refused. A missing or
    /// empty one (a new data directory, or one written by a version that
    /// rewrote the file in place and crashed doing it) is taken as "the
    /// past is unknown": see [`RevisionOracle::observe`].
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let text = text.trim();
        let stored = if text.is_empty() {
            INITIAL_REVISION
        } else {
            text.parse::<i64>()
                .map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("revision oracle ceiling {}: {e}", path.display()),
                    )
                })?
                .max(INITIAL_REVISION)
        };
        Ok(RevisionOracle {
            last: AtomicI64::new(stored),
            ceiling: AtomicI64::new(stored),
            file: Some(Mutex::new(path.to_path_buf())),
            unknown_past: text.is_empty(),
        })
    }

    /// Makes sure revisions handed out from now on are above `rev` (called
    /// at startup with the largest revision found in any shard's log),
    /// persisting a ceiling above it. When the stored ceiling was unknown
    /// and the shards hold revisions, clients may have seen revisions
    /// above every stored one (a write that changed nothing, a read's
    /// header): the oracle then starts two ceiling steps above, as no
    /// revision was handed out more than a step above a stored one.
    pub fn observe(&self, rev: i64) {
        let rev = if self.unknown_past && rev > INITIAL_REVISION {
            rev + 2 * CEILING_STEP
        } else {
            rev
        };
        if rev > self.ceiling.load(Ordering::SeqCst) {
            self.raise_ceiling(rev);
        }
        self.last.fetch_max(rev, Ordering::SeqCst);
    }

    /// The newest revision handed out (`INITIAL_REVISION` before any).
    /// Never above the durable ceiling: while an allocation raises it, the
    /// revisions past it are in flight, and none may be shown before the
    /// ceiling covering it is on disk.
    pub fn current(&self) -> i64 {
        self.last
            .load(Ordering::SeqCst)
            .min(self.ceiling.load(Ordering::SeqCst))
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
        let Some(path) = &self.file else { return };
        let path = path.lock().expect("oracle ceiling lock poisoned");
        if rev <= self.ceiling.load(Ordering::SeqCst) {
            return; // another shard raised it meanwhile
        }
        let ceiling = rev + CEILING_STEP;
        // Handing out a revision above an unpersisted ceiling could repeat
        // it after a crash; stopping is the only safe answer.
        crate::durable_file::replace(&path, format!("{ceiling}\n").as_bytes())
            .expect("cannot persist the revision oracle's ceiling");
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

    /// A ceiling file found empty (an older version crashed rewriting it
    /// in place) in a directory that holds revisions: the oracle starts
    /// well above anything it could have handed out. One that is garbled
    /// is refused.
    #[test]
    fn an_empty_ceiling_file_starts_above_any_revision_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oracle");
        let handed_out = {
            let o = RevisionOracle::open(&path).unwrap();
            (0..10).map(|_| o.allocate()).max().unwrap()
        };
        std::fs::File::create(&path).unwrap();
        let o = RevisionOracle::open(&path).unwrap();
        // The shards' logs hold only some of what was handed out.
        o.observe(handed_out - 5);
        assert!(o.allocate() > handed_out + CEILING_STEP);
        // A new directory has no past to skip.
        let fresh = RevisionOracle::open(&dir.path().join("new")).unwrap();
        fresh.observe(INITIAL_REVISION);
        assert_eq!(fresh.allocate(), INITIAL_REVISION + 1);
        std::fs::write(&path, "12x\n").unwrap();
        assert!(RevisionOracle::open(&path).is_err());
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
