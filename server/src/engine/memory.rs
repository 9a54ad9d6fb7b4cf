//! The in-memory engine: a `BTreeMap` behind a `RefCell`.
//!
//! It exists for speed and for deployments that rely on raft replication
//! alone: nothing is ever written to disk, so a restarted node starts empty
//! and catches up from its peers. `sync` is therefore meaningless and
//! ignored.
//!
//! Invariants:
//! * The map is only borrowed mutably inside [`Engine::write`], which cannot
//!   fail half-way, so a batch is applied entirely (atomicity for free on
//!   one thread).
//! * `size` is always the sum of `key.len() + value.len()` over the map; it
//!   is maintained incrementally so `size_bytes` is O(1).
//! * Scans hold a shared borrow for their whole duration: a scan callback
//!   that writes to this engine panics (documented on the trait).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use super::{map_bounds, BatchOp, Engine, EngineError, EngineKind, EngineSyncJob, WriteBatch};

#[derive(Debug, Default)]
pub struct MemoryEngine {
    map: RefCell<BTreeMap<Vec<u8>, Vec<u8>>>,
    size: Cell<u64>,
}

impl MemoryEngine {
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }
}

impl Engine for MemoryEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.map.borrow().get(key).cloned())
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        let Some(bounds) = map_bounds(start, end) else {
            return Ok(());
        };
        let map = self.map.borrow();
        for (k, v) in map.range::<[u8], _>(bounds) {
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn scan_rev(
        &self,
        start: &[u8],
        end: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), EngineError> {
        let Some(bounds) = map_bounds(start, end) else {
            return Ok(());
        };
        let map = self.map.borrow();
        for (k, v) in map.range::<[u8], _>(bounds).rev() {
            if !f(k, v) {
                break;
            }
        }
        Ok(())
    }

    fn sync_job(&self) -> Result<Option<EngineSyncJob>, EngineError> {
        // Nothing here is durable.
        Ok(None)
    }

    fn write(&self, batch: WriteBatch, _sync: bool) -> Result<(), EngineError> {
        let mut map = self.map.borrow_mut();
        let mut size = self.size.get();
        for op in batch.ops {
            match op {
                BatchOp::Put(k, v) => {
                    size += (k.len() + v.len()) as u64;
                    // A key written again keeps its stored copy.
                    if let Some(old) = map.get_mut(&*k) {
                        size -= (k.len() + old.len()) as u64;
                        *old = v.into_vec();
                    } else {
                        map.insert(k.into_vec(), v.into_vec());
                    }
                }
                BatchOp::Delete(k) => {
                    if let Some(old) = map.remove(&*k) {
                        size -= (k.len() + old.len()) as u64;
                    }
                }
                BatchOp::DeleteRange(start, end) => {
                    let Some(bounds) = map_bounds(&start, &end) else {
                        continue;
                    };
                    // Key by key: O(removed · log n). (Splitting the range
                    // off and appending the rest back would be O(n):
                    // `BTreeMap::append` rebuilds the whole map, which made
                    // every range delete stall writes for tens of
                    // milliseconds once the map held millions of entries.)
                    let doomed: Vec<Vec<u8>> = map
                        .range::<[u8], _>(bounds)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        if let Some(old) = map.remove(&k) {
                            size -= (k.len() + old.len()) as u64;
                        }
                    }
                }
            }
        }
        self.size.set(size);
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.size.get()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Memory
    }
}
