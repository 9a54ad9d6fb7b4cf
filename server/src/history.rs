//! The server's history id: a name for "these revisions and their events".
//!
//! Clients of the shard protocol (the gateway's watch feeds) resume a
//! subscription from the revision after the last one they received. That is
//! only sound while the server still has the history those revisions came
//! from. A durable engine keeps it across restarts; a non-durable one
//! (memory) starts over at revision 1 on every start, so a resumed
//! subscription would wait for revisions the new history reuses and skip
//! them without a trace.
//!
//! So every server names its history with a random 64-bit id, reported in
//! the topology and checked on each subscription (`expect_history`):
//! - **rocksdb**: created once, with the data directory, in the file
//!   `history-id` (written to a temporary file, synced, renamed, and the
//!   directory synced), and read back on every later start;
//! - **memory**: a new id on every start.
//!
//! The id is never 0 (0 means "unknown" on the wire).

use std::fs;
use std::io;
use std::path::Path;

use crate::engine::EngineKind;

/// File name of the id in the data directory (durable engines).
pub const FILE: &str = "history-id";

/// The history id for a server on `kind` with data in `data_dir`.
pub fn history_id(kind: EngineKind, data_dir: &Path) -> io::Result<u64> {
    match kind {
        EngineKind::Memory => Ok(fresh()),
        EngineKind::RocksDb => durable(data_dir),
    }
}

fn fresh() -> u64 {
    rand::random::<u64>() | 1
}

fn durable(dir: &Path) -> io::Result<u64> {
    let path = dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|id| *id != 0)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: not a history id: {text:?}", path.display()),
                )
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = fresh();
            crate::durable_file::replace(&path, format!("{id}\n").as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_ids_persist_and_memory_ids_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let a = history_id(EngineKind::RocksDb, dir.path()).unwrap();
        let b = history_id(EngineKind::RocksDb, dir.path()).unwrap();
        assert_eq!(a, b, "a durable history keeps its name across starts");
        assert_ne!(a, 0);
        let m1 = history_id(EngineKind::Memory, dir.path()).unwrap();
        let m2 = history_id(EngineKind::Memory, dir.path()).unwrap();
        assert_ne!(m1, m2, "a memory history is new on every start");
        assert_ne!(m1, 0);
    }

    #[test]
    fn a_damaged_id_file_is_an_error_not_a_new_history() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), "garbage\n").unwrap();
        assert!(history_id(EngineKind::RocksDb, dir.path()).is_err());
        fs::write(dir.path().join(FILE), "0\n").unwrap();
        assert!(history_id(EngineKind::RocksDb, dir.path()).is_err());
    }
}
