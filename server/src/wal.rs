//! `Wal`: a shard's raft write-ahead log, in preallocated segment files.
//!
//! The durable record of a RocksDB shard is its raft log: an entry is
//! fsync'd here before it is applied or acknowledged, and the engine's own
//! writes (the applied state) are unsynced, recovered by replaying this log
//! from the engine's applied index. That is etcd's split (WAL + backend),
//! and it is why the log is not kept in RocksDB: a RocksDB WAL grows with
//! every write, so each fsync also commits the file's new size through the
//! file system's journal, and RocksDB will not recycle WAL files under the
//! point-in-time recovery a raft log needs. Here each segment is allocated
//! to its full size when created (`fallocate`), so a commit writes data
//! into space the file already has and its `fdatasync` changes no size.
//! Released segments are reused (see "Recycled segments").
//!
//! # Layout
//!
//! A directory of segments `<seq:016x>.wal`, sequence numbers ascending,
//! and spares `<seq:016x>.spare` (released segments kept for reuse). A
//! segment is a run of records, then zeros (the unwritten preallocated
//! rest) or an earlier use's records. A record is `len: u32 LE |
//! crc32(seq ‖ kind ‖ payload): u32 LE | kind: u8 | payload` with `len`
//! the payload's length plus one and `seq` the segment's number (u64 LE):
//! the checksum is *sealed* with the segment it was written to. A zero
//! `len` ends the segment.
//!
//! A segment begins with [`sealed_mark`], one unsealed record that
//! versions before sealing read as valid but not a start record, so they
//! refuse the log rather than misread it. Then comes [`Record::Start`]
//! (index and term of the entry before the segment's first) and the hard
//! and conf state current when it was begun, so older segments can be
//! retired without losing either. Segments written before segments were
//! reused have no mark and unsealed checksums (`crc32(kind ‖ payload)`);
//! they are read as before and never reused.
//!
//! # Recycled segments
//!
//! `fallocate` reserves a segment's space as *unwritten* extents. The
//! first write into each block must convert it, and that is a metadata
//! change the next `fdatasync` writes too: on this project's VM (ext4
//! without a journal), a 36 KiB write and `fdatasync` into fallocated
//! space took 170 µs at p50 and 70 µs of CPU, against 99–109 µs and 42 µs
//! into space written before (bench/results/TUNING.md). So a released
//! segment is not deleted but renamed to a spare (at most [`MAX_SPARES`]),
//! and the next segment is a spare renamed back when there is one, as
//! RocksDB recycles WAL files and TiKV's raft engine its log files. Its
//! old records stay in the file past the new ones, and must never be read
//! as part of the log:
//! * the new records' checksums are sealed with the new number, so an old
//!   record (sealed with another, or unsealed) fails its checksum and reads
//!   as the segment's end — also when a crash comes before the new start
//!   record is written (the segment reads as never written);
//! * a segment is cut to the end of its records when the next one begins
//!   (before the next exists), so an older segment ends cleanly;
//! * on open, a newest segment followed by anything but zeros is cut the
//!   same way, and writing goes on in a new segment.
//!
//! # Invariants
//!
//! * **Prefix durability.** Records are written in order and `sync` returns
//!   only after `fdatasync`; a crash can lose only records after the last
//!   sync. Replay stops at the first record whose length runs past the file,
//!   whose kind is unknown or whose checksum fails: a torn tail. That is
//!   only legal in the newest segment: an older one was synced whole before
//!   the next was begun, so damage there is an error, not a tail.
//! * **Replay = what was written.** [`Wal::open`] returns every record in
//!   write order; the caller (the raft log) rebuilds its state by the same
//!   rules it wrote them by (an entry at index i replaces entries >= i).
//! * **Release is the caller's promise.** [`Wal::release_before`] retires
//!   whole segments whose entries are all below an index (to spares, or
//!   deleted); the caller first makes everything those entries did durable
//!   elsewhere (the engine).
//!
//! No async and no raft logic: the shard's Ready loop decides when to sync
//! and runs the `fdatasync` inline or on a blocking thread ([`SyncJob`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState};

/// Size a segment is allocated to (etcd's WAL uses the same).
pub const SEGMENT_BYTES: u64 = 64 << 20;

const HEADER: usize = 9;
const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
const KIND_START: u8 = 4;
/// Released segments kept for reuse, at most.
pub const MAX_SPARES: usize = 2;

/// What a segment with sealed records begins with: an unsealed record of
/// kind 2 with an empty payload (an empty hard state). A version before
/// sealing reads it as a valid record that is not a start record, and so
/// refuses to open the log, instead of reading the sealed start record
/// after it as a torn tail and dropping the segment.
fn sealed_mark() -> Vec<u8> {
    let mut mark = Vec::with_capacity(HEADER);
    frame(&mut mark, KIND_HARD_STATE, None, |_| {});
    mark
}

/// One record of the log.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Entry(Entry),
    HardState(HardState),
    ConfState(ConfState),
    /// First in every segment: the index and term of the entry before the
    /// segment's first entry.
    Start {
        prev_index: u64,
        prev_term: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal i/o: {0}")]
    Io(#[from] io::Error),
    #[error("wal segment {path}: damaged record at offset {offset} (not the newest segment)")]
    Corrupt { path: PathBuf, offset: u64 },
    #[error("wal segment {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// The checksum of a record's body (kind and payload), sealed with its
/// segment's sequence number, or not (`None`: segments written before
/// segments were recycled).
fn checksum(body: &[u8], seal: Option<u64>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(seq) = seal {
        h.update(&seq.to_le_bytes());
    }
    h.update(body);
    h.finalize()
}

/// Appends one framed record of `kind` to `out`, its payload written by
/// `payload`, its checksum sealed with `seal`.
fn frame(out: &mut Vec<u8>, kind: u8, seal: Option<u64>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out[start + 8] = kind;
    payload(out);
    let len = (out.len() - start - 8) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    reseal(&mut out[start..], seal);
}

/// Recomputes the checksum of the one framed record in `record`.
fn reseal(record: &mut [u8], seal: Option<u64>) {
    let crc = checksum(&record[8..], seal);
    record[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_entry(e: &Entry, out: &mut Vec<u8>, seal: Option<u64>) {
    frame(out, KIND_ENTRY, seal, |o| {
        e.write_to_vec(o).expect("encode entry")
    });
}

impl Record {
    fn encode_into(&self, out: &mut Vec<u8>, seal: Option<u64>) {
        match self {
            Record::Entry(e) => encode_entry(e, out, seal),
            Record::HardState(hs) => frame(out, KIND_HARD_STATE, seal, |o| {
                hs.write_to_vec(o).expect("encode hard state")
            }),
            Record::ConfState(cs) => frame(out, KIND_CONF_STATE, seal, |o| {
                cs.write_to_vec(o).expect("encode conf state")
            }),
            Record::Start {
                prev_index,
                prev_term,
            } => frame(out, KIND_START, seal, |o| {
                o.extend_from_slice(&prev_index.to_le_bytes());
                o.extend_from_slice(&prev_term.to_le_bytes());
            }),
        }
    }

    fn decode(kind: u8, payload: &[u8]) -> Option<Record> {
        Some(match kind {
            KIND_ENTRY => Record::Entry(Entry::parse_from_bytes(payload).ok()?),
            KIND_HARD_STATE => Record::HardState(HardState::parse_from_bytes(payload).ok()?),
            KIND_CONF_STATE => Record::ConfState(ConfState::parse_from_bytes(payload).ok()?),
            KIND_START if payload.len() == 16 => Record::Start {
                prev_index: u64::from_le_bytes(payload[..8].try_into().unwrap()),
                prev_term: u64::from_le_bytes(payload[8..].try_into().unwrap()),
            },
            _ => return None,
        })
    }
}

/// What [`read_segment`] found.
struct SegmentRead {
    /// The valid prefix.
    records: Vec<Record>,
    /// The offset just after it.
    end: u64,
    /// Nothing but zeros or the file's end follows it.
    clean: bool,
    /// Its records are sealed.
    sealed: bool,
}

/// Reads the records of segment `seq`: the valid prefix, and the offset
/// just after it, plus whether it ended cleanly (zeros or the file's end).
/// A segment that begins with [`sealed_mark`] is read with every checksum
/// sealed with `seq`, so whatever an earlier use of the file left after
/// the valid prefix reads as its end, never as records.
fn read_segment(path: &Path, seq: u64) -> Result<SegmentRead, WalError> {
    let data = fs::read(path)?;
    let mark = sealed_mark();
    let sealed = data.starts_with(&mark);
    let seal = sealed.then_some(seq);
    let mut records = Vec::new();
    let mut at = if sealed { mark.len() } else { 0 };
    let done = |records, at: usize, clean| {
        Ok(SegmentRead {
            records,
            end: at as u64,
            clean,
            sealed: seal.is_some(),
        })
    };
    loop {
        if at + 4 > data.len() {
            return done(records, at, at == data.len() || seal.is_none());
        }
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            let clean = data[at..].iter().all(|b| *b == 0);
            return done(records, at, clean);
        }
        let end = at + 8 + len;
        if end > data.len() {
            return done(records, at, false);
        }
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let body = &data[at + 8..end];
        let record = (checksum(body, seal) == crc)
            .then(|| Record::decode(body[0], &body[1..]))
            .flatten();
        match record {
            Some(r) => records.push(r),
            None => return done(records, at, false),
        }
        at = end;
    }
}

struct Segment {
    seq: u64,
    /// Index of the entry before this segment's first (its `Start`).
    prev_index: u64,
    /// Its records are sealed with `seq` (false: written by a version
    /// before segments were recycled; such a file is never reused).
    sealed: bool,
}

/// The write side of the log; see the module docs.
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Oldest first; the last is the one written to.
    segments: Vec<Segment>,
    /// Released segment files kept for reuse (see "Recycled segments").
    spares: Vec<PathBuf>,
    file: Arc<File>,
    /// `file` is the newest segment (not yet: a placeholder).
    file_is_segment: bool,
    /// Where the next write goes in `file`.
    offset: u64,
    /// Encoded records not yet written.
    pending: Vec<u8>,
    /// Written but not yet synced.
    unsynced: bool,
    /// The current segment holds an entry (it rolls only once it does).
    segment_has_entry: bool,
    /// What a new segment starts with.
    last_entry: (u64, u64),
    hard_state: HardState,
    conf_state: ConfState,
}

/// A write and its `fdatasync`, to run off the shard's thread.
pub struct SyncJob {
    file: Arc<File>,
    offset: u64,
    bytes: Vec<u8>,
}

impl SyncJob {
    pub fn run(self) -> io::Result<()> {
        if !self.bytes.is_empty() {
            self.file.write_all_at(&self.bytes, self.offset)?;
        }
        self.file.sync_data()
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

fn spare_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.spare"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates segment `seq`, allocated to `bytes`, durable (file and name)
/// before it is used.
fn create_segment(dir: &Path, seq: u64, bytes: u64) -> io::Result<File> {
    let path = segment_path(dir, seq);
    let tmp = path.with_extension("tmp");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    if rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes).is_err() {
        // A file system without fallocate: zero-fill instead, which gives
        // the same "no size change on commit" property.
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < bytes {
            let n = zeros.len().min((bytes - at) as usize);
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
    }
    file.sync_all()?;
    fs::rename(&tmp, &path)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Makes the released segment file `spare` segment `seq`, at least
/// `bytes` long, its new name durable before it is used. Its old records
/// stay until overwritten; sealed with another number, they read as the
/// segment's end.
fn reuse_segment(dir: &Path, spare: &Path, seq: u64, bytes: u64) -> io::Result<File> {
    let path = segment_path(dir, seq);
    fs::rename(spare, &path)?;
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    if file.metadata()?.len() < bytes {
        // Cut short when it was retired (or a larger segment size now).
        let _ = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes);
        file.sync_all()?;
    }
    sync_dir(dir)?;
    Ok(file)
}

impl Wal {
    /// Opens the log in `dir` (creating it if missing) and returns it with
    /// every record it holds, in write order. A new log is empty: its first
    /// segment begins with [`Wal::begin`].
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Wal, Vec<Record>), WalError> {
        fs::create_dir_all(dir)?;
        let mut seqs = Vec::new();
        let mut spares = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".wal") {
                if let Ok(seq) = u64::from_str_radix(hex, 16) {
                    seqs.push(seq);
                }
            } else if name.ends_with(".spare") {
                spares.push(dir.join(&*name));
            } else if name.ends_with(".tmp") {
                // A segment whose creation did not finish: never used.
                let _ = fs::remove_file(dir.join(&*name));
            }
        }
        seqs.sort_unstable();
        spares.sort_unstable();
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: Vec::new(),
            spares,
            file: Arc::new(File::open(dir)?),
            file_is_segment: false,
            offset: 0,
            pending: Vec::new(),
            unsynced: false,
            segment_has_entry: false,
            last_entry: (0, 0),
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
        };
        let mut all = Vec::new();
        let mut go_on = false;
        for (i, &seq) in seqs.iter().enumerate() {
            let newest = i + 1 == seqs.len();
            let path = segment_path(dir, seq);
            let SegmentRead {
                records,
                end,
                clean,
                sealed,
            } = read_segment(&path, seq)?;
            if !newest && !clean {
                return Err(WalError::Corrupt { path, offset: end });
            }
            if newest && records.is_empty() {
                // Created but never written (a crash right after): the
                // next segment is created afresh.
                fs::remove_file(&path)?;
                break;
            }
            let Some(&Record::Start { prev_index, .. }) = records.first() else {
                return Err(WalError::Invalid {
                    path,
                    what: "does not begin with a start record".into(),
                });
            };
            if newest && !clean {
                // A torn tail (power lost during an unsynced write), or
                // what an earlier use of a recycled file left: cut it off,
                // so the file ends cleanly.
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(end)?;
                f.sync_all()?;
            }
            for r in &records {
                wal.observe(r);
            }
            all.extend(records);
            wal.segments.push(Segment {
                seq,
                prev_index,
                sealed,
            });
            if newest {
                wal.file = Arc::new(OpenOptions::new().read(true).write(true).open(&path)?);
                wal.file_is_segment = true;
                wal.offset = end;
                wal.segment_has_entry = true;
                go_on = clean && sealed;
            }
        }
        // Writing goes on in the newest segment only if nothing but zeros
        // follows its records and they are sealed; else in a new one (after
        // a torn tail, in a recycled file, or after a segment of an
        // earlier version, whose records were not sealed).
        if !all.is_empty() && !go_on {
            wal.roll()?;
        }
        Ok((wal, all))
    }

    /// True until the first segment has been begun.
    pub fn is_new(&self) -> bool {
        self.segments.is_empty()
    }

    /// Begins a new log whose first entry will follow `(prev_index,
    /// prev_term)`: its first segment. Durable on return.
    pub fn begin(&mut self, prev_index: u64, prev_term: u64) -> Result<(), WalError> {
        assert!(self.is_new(), "the log has begun already");
        self.last_entry = (prev_index, prev_term);
        self.roll()
    }

    fn observe(&mut self, r: &Record) {
        match r {
            Record::Entry(e) => self.last_entry = (e.index, e.term),
            Record::HardState(hs) => self.hard_state = hs.clone(),
            Record::ConfState(cs) => self.conf_state = cs.clone(),
            Record::Start {
                prev_index,
                prev_term,
            } => self.last_entry = (*prev_index, *prev_term),
        }
    }

    fn encode(&mut self, r: &Record) {
        self.observe(r);
        let seal = self.seal();
        r.encode_into(&mut self.pending, seal);
    }

    /// The seal of the records written now: the newest segment's number.
    fn seal(&self) -> Option<u64> {
        Some(self.segments.last().map_or(0, |s| s.seq))
    }

    /// Adds `r` to the log (written by the next `write` or `sync`). Begins
    /// a new segment first when `r` would not fit in the current one (a
    /// record larger than a segment gets one to itself, grown to fit).
    pub fn push(&mut self, r: &Record) -> Result<(), WalError> {
        let before = self.pending.len();
        let seal = self.seal();
        r.encode_into(&mut self.pending, seal);
        self.place(before, matches!(r, Record::Entry(_)))?;
        self.observe(r);
        Ok(())
    }

    /// `push(&Record::Entry(e.clone()))` without the clone.
    pub fn push_entry(&mut self, e: &Entry) -> Result<(), WalError> {
        let before = self.pending.len();
        let seal = self.seal();
        encode_entry(e, &mut self.pending, seal);
        self.place(before, true)?;
        self.last_entry = (e.index, e.term);
        Ok(())
    }

    /// Moves the record just encoded at `before` in `pending` to a new
    /// segment if it would not fit in the current one.
    fn place(&mut self, before: usize, entry: bool) -> Result<(), WalError> {
        let end = self.offset + self.pending.len() as u64;
        if end > self.segment_bytes && self.segment_has_entry {
            let mut encoded = self.pending.split_off(before);
            self.roll()?;
            reseal(&mut encoded, self.seal());
            self.pending.extend_from_slice(&encoded);
        }
        self.segment_has_entry |= entry;
        Ok(())
    }

    /// Syncs what the current segment holds and begins the next one with
    /// its start record and the current hard and conf state, synced.
    fn roll(&mut self) -> Result<(), WalError> {
        if self.needs_sync() {
            self.sync()?;
        }
        if self.file_is_segment {
            // The segment ends where its records do: an older segment must
            // end cleanly, and a recycled file holds an earlier use's
            // records past that point. Durable before the next segment
            // exists.
            self.file.set_len(self.offset)?;
            self.file.sync_all()?;
        }
        let seq = self.segments.last().map(|s| s.seq + 1).unwrap_or(1);
        let file = match self.spares.pop() {
            Some(spare) => reuse_segment(&self.dir, &spare, seq, self.segment_bytes)?,
            None => create_segment(&self.dir, seq, self.segment_bytes)?,
        };
        self.file = Arc::new(file);
        self.file_is_segment = true;
        self.offset = 0;
        self.segment_has_entry = false;
        let (prev_index, prev_term) = self.last_entry;
        self.segments.push(Segment {
            seq,
            prev_index,
            sealed: true,
        });
        let (hs, cs) = (self.hard_state.clone(), self.conf_state.clone());
        self.pending.extend_from_slice(&sealed_mark());
        self.encode(&Record::Start {
            prev_index,
            prev_term,
        });
        self.encode(&Record::HardState(hs));
        self.encode(&Record::ConfState(cs));
        // Durable now: once this segment exists, the older ones may be
        // released, and these records are all that then holds the states.
        self.sync()
    }

    /// True if records were pushed and not yet synced.
    pub fn needs_sync(&self) -> bool {
        !self.pending.is_empty() || self.unsynced
    }

    /// Writes pushed records without waiting for the disk.
    pub fn write(&mut self) -> Result<(), WalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.pending, self.offset)?;
        self.offset += self.pending.len() as u64;
        self.pending.clear();
        self.unsynced = true;
        Ok(())
    }

    /// Writes pushed records and makes everything written durable.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.sync_job().run()?;
        Ok(())
    }

    /// The write and `fdatasync` that `sync` would do, to run elsewhere;
    /// the log counts it written at once (nothing else writes meanwhile:
    /// the caller awaits the job before pushing more).
    pub fn sync_job(&mut self) -> SyncJob {
        let bytes = std::mem::take(&mut self.pending);
        let job = SyncJob {
            file: self.file.clone(),
            offset: self.offset,
            bytes,
        };
        self.offset += job.bytes.len() as u64;
        self.unsynced = false;
        job
    }

    /// True if [`Wal::release_before`] at `index` would delete a segment.
    pub fn releasable(&self, index: u64) -> bool {
        self.segments.len() > 1 && self.segments[1].prev_index < index
    }

    /// Retires every segment all of whose entries are below `index`: kept
    /// as a spare (sealed ones, up to [`MAX_SPARES`]) or deleted. The
    /// newest segment is never retired. The caller has made what those
    /// entries did durable elsewhere first.
    pub fn release_before(&mut self, index: u64) -> Result<usize, WalError> {
        let mut n = 0;
        while self.releasable(index) {
            let s = self.segments.remove(0);
            let path = segment_path(&self.dir, s.seq);
            if s.sealed && self.spares.len() < MAX_SPARES {
                let spare = spare_path(&self.dir, s.seq);
                fs::rename(&path, &spare)?;
                self.spares.push(spare);
            } else {
                fs::remove_file(path)?;
            }
            n += 1;
        }
        if n > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(n)
    }

    /// Number of segment files (for tests and diagnostics).
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, len: usize) -> Record {
        Record::Entry(Entry {
            index,
            term,
            data: vec![index as u8; len].into(),
            ..Default::default()
        })
    }

    fn entries(records: &[Record]) -> Vec<u64> {
        records
            .iter()
            .filter_map(|r| match r {
                Record::Entry(e) => Some(e.index),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let hs = HardState {
            term: 2,
            vote: 1,
            commit: 7,
            ..Default::default()
        };
        {
            let (mut wal, records) = Wal::open(dir.path(), 4096).unwrap();
            assert!(records.is_empty() && wal.is_new());
            wal.begin(5, 1).unwrap();
            wal.push(&Record::ConfState(ConfState {
                voters: vec![1],
                ..Default::default()
            }))
            .unwrap();
            for i in 6..=40 {
                wal.push(&entry(i, 2, 300)).unwrap();
                if i % 7 == 0 {
                    wal.push(&Record::HardState(hs.clone())).unwrap();
                    wal.sync().unwrap();
                }
            }
            wal.sync().unwrap();
            assert!(
                wal.segment_count() > 2,
                "300-byte entries roll 4 KiB segments"
            );
        }
        let (wal, records) = Wal::open(dir.path(), 4096).unwrap();
        assert!(!wal.is_new());
        assert_eq!(
            records[0],
            Record::Start {
                prev_index: 5,
                prev_term: 1
            }
        );
        assert_eq!(entries(&records), (6..=40).collect::<Vec<_>>());
        // Every later segment restates where it starts and the states.
        let starts: Vec<u64> = records
            .iter()
            .filter_map(|r| match r {
                Record::Start { prev_index, .. } => Some(*prev_index),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), wal.segment_count());
        assert!(starts.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            records.iter().rev().find_map(|r| match r {
                Record::HardState(h) => Some(h.clone()),
                _ => None,
            }),
            Some(hs)
        );
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_writing_goes_on_in_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path;
        {
            let (mut wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
            wal.begin(0, 0).unwrap();
            for i in 1..=3 {
                wal.push(&entry(i, 1, 50)).unwrap();
            }
            wal.sync().unwrap();
            path = segment_path(dir.path(), wal.segments[0].seq);
            // A fourth record half on disk: its length, and garbage.
            let mut torn = Vec::new();
            entry(4, 1, 50).encode_into(&mut torn, wal.seal());
            let at = wal.offset;
            wal.file.write_all_at(&torn[..30], at).unwrap();
            wal.file.write_all_at(&[0xff; 5], at + 30).unwrap();
        }
        let (mut wal, records) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(entries(&records), vec![1, 2, 3]);
        // The torn segment is cut to its valid prefix and a new one begun.
        assert_eq!(wal.segment_count(), 2);
        let cut = fs::metadata(&path).unwrap().len();
        assert!(cut < 1 << 20);
        wal.push(&entry(4, 2, 10)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, records) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(entries(&records), vec![1, 2, 3, 4]);
        assert_eq!(fs::metadata(&path).unwrap().len(), cut);
    }

    #[test]
    fn damage_in_an_older_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let first = segment_path(
            dir.path(),
            log_with(dir.path(), 2048, 20, 200).segments[0].seq,
        );
        let f = OpenOptions::new().write(true).open(&first).unwrap();
        f.write_all_at(&[0xee; 4], 40).unwrap();
        assert!(matches!(
            Wal::open(dir.path(), 2048),
            Err(WalError::Corrupt { .. })
        ));
    }

    /// A new log in `dir` holding entries 1..=`last` of `size` bytes
    /// (term 1), synced.
    fn log_with(dir: &Path, segment_bytes: u64, last: u64, size: usize) -> Wal {
        let (mut wal, _) = Wal::open(dir, segment_bytes).unwrap();
        wal.begin(0, 0).unwrap();
        for i in 1..=last {
            wal.push(&entry(i, 1, size)).unwrap();
        }
        wal.sync().unwrap();
        wal
    }

    /// Appends entries `from..=to` (term `term`, 200 bytes) to `wal`,
    /// syncs, and returns the entries a reopened log holds.
    fn extend_and_reopen(dir: &Path, mut wal: Wal, from: u64, to: u64, term: u64) -> Vec<u64> {
        for i in from..=to {
            wal.push(&entry(i, term, 200)).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        entries(&Wal::open(dir, 2048).unwrap().1)
    }

    fn files(dir: &Path, suffix: &str) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(suffix)
            })
            .count()
    }

    #[test]
    fn released_segments_are_reused_and_their_old_records_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = log_with(dir.path(), 2048, 80, 100);
        assert!(wal.segment_count() > 4);
        // Keep the last two segments; the released ones become spares, up
        // to MAX_SPARES, and the rest are deleted.
        let keep = wal.segments[wal.segment_count() - 2].prev_index + 1;
        wal.release_before(keep).unwrap();
        assert_eq!(wal.segment_count(), 2);
        assert_eq!(files(dir.path(), ".spare"), MAX_SPARES);
        // New segments take the spares first: no new file until they are
        // used up, and each reused file still holds old records past the
        // new ones (it was cut only to its old records' end).
        let before = files(dir.path(), ".wal");
        // Larger records than before: a reused file's new records end
        // before its old ones did, and old records follow them.
        for i in 81..=84 {
            wal.push(&entry(i, 2, 400)).unwrap();
        }
        wal.sync().unwrap();
        assert_eq!(files(dir.path(), ".spare"), MAX_SPARES - 1);
        assert_eq!(files(dir.path(), ".wal"), before + 1);
        let reused = segment_path(dir.path(), wal.segments.last().unwrap().seq);
        assert!(fs::metadata(&reused).unwrap().len() > wal.offset);
        for i in 85..=100 {
            wal.push(&entry(i, 2, 400)).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        // Reopened: exactly what was written since the kept segments
        // began, once each, in order; none of the reused files' old
        // records (entries below `keep` again, in term 1).
        let (wal, records) = Wal::open(dir.path(), 2048).unwrap();
        assert_eq!(entries(&records), (keep..=100).collect::<Vec<_>>());
        let got = extend_and_reopen(dir.path(), wal, 101, 105, 3);
        assert_eq!(got, (keep..=105).collect::<Vec<_>>());
    }

    #[test]
    fn a_reused_segment_never_written_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = log_with(dir.path(), 2048, 30, 200);
        let keep = wal.segments.last().unwrap().prev_index + 1;
        wal.release_before(keep).unwrap();
        // A crash right after a spare was renamed into place as the next
        // segment, before its start record was written: the file holds
        // only an earlier use's records.
        let next = wal.segments.last().unwrap().seq + 1;
        let spare = wal.spares.pop().unwrap();
        drop(reuse_segment(dir.path(), &spare, next, 2048).unwrap());
        drop(wal);
        let (wal, records) = Wal::open(dir.path(), 2048).unwrap();
        assert_eq!(entries(&records), (keep..=30).collect::<Vec<_>>());
        let got = extend_and_reopen(dir.path(), wal, 31, 31, 2);
        assert_eq!(got, (keep..=31).collect::<Vec<_>>());
    }

    /// A version before sealing must refuse a log with sealed segments, not
    /// read the first sealed record as a torn tail and drop the segment:
    /// it reads the mark as a valid record that is not a start record.
    #[test]
    fn a_sealed_segment_begins_with_a_record_older_versions_refuse() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 4096, 1, 10));
        let data = fs::read(segment_path(dir.path(), 1)).unwrap();
        assert_eq!(data[..HEADER], sealed_mark());
        let first = Record::decode(data[8], &data[HEADER..HEADER]);
        assert_eq!(first, Some(Record::HardState(HardState::default())));
        // What follows is not readable unsealed.
        let len = u32::from_le_bytes(data[HEADER..HEADER + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[HEADER + 4..HEADER + 8].try_into().unwrap());
        assert_ne!(crc32fast::hash(&data[HEADER + 8..HEADER + 8 + len]), crc);
    }

    #[test]
    fn a_log_of_an_earlier_version_is_read_and_continued_sealed() {
        let dir = tempfile::tempdir().unwrap();
        // Segments as versions before recycling wrote them: checksums not
        // sealed, no mark, zeros after the records.
        let mut old = Vec::new();
        for r in [
            Record::Start {
                prev_index: 0,
                prev_term: 0,
            },
            Record::HardState(HardState::default()),
            entry(1, 1, 100),
            entry(2, 1, 100),
        ] {
            r.encode_into(&mut old, None);
        }
        let first = segment_path(dir.path(), 1);
        fs::write(&first, [&old[..], &[0; 512]].concat()).unwrap();
        let mut old = Vec::new();
        for r in [
            Record::Start {
                prev_index: 2,
                prev_term: 1,
            },
            entry(3, 1, 100),
        ] {
            r.encode_into(&mut old, None);
        }
        fs::write(segment_path(dir.path(), 2), [&old[..], &[0; 512]].concat()).unwrap();
        let (mut wal, records) = Wal::open(dir.path(), 2048).unwrap();
        assert_eq!(entries(&records), vec![1, 2, 3]);
        // Writing goes on in a new, sealed segment.
        assert_eq!(wal.segment_count(), 3);
        wal.push(&entry(4, 2, 100)).unwrap();
        wal.sync().unwrap();
        // An old segment is deleted when released, never reused.
        wal.release_before(3).unwrap();
        assert!(!first.exists());
        assert_eq!(files(dir.path(), ".spare"), 0);
        drop(wal);
        let (_, records) = Wal::open(dir.path(), 2048).unwrap();
        assert_eq!(entries(&records), vec![3, 4]);
    }

    #[test]
    fn release_retires_only_segments_wholly_below_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = log_with(dir.path(), 2048, 30, 200);
        let starts: Vec<u64> = wal.segments.iter().map(|s| s.prev_index).collect();
        let n = wal.segment_count();
        // Releasing below the second segment's first entry keeps the first
        // (its last entry is still needed).
        assert_eq!(wal.release_before(starts[1]).unwrap(), 0);
        assert_eq!(wal.release_before(starts[1] + 1).unwrap(), 1);
        assert_eq!(wal.release_before(u64::MAX).unwrap(), n - 2);
        assert_eq!(wal.segment_count(), 1);
        drop(wal);
        let (_, records) = Wal::open(dir.path(), 2048).unwrap();
        let got = entries(&records);
        assert_eq!(got.first().copied(), Some(starts[n - 1] + 1));
        assert_eq!(got.last().copied(), Some(30));
        assert!(
            matches!(records[0], Record::Start { prev_index, .. } if prev_index == starts[n - 1])
        );
    }

    /// A segment is retired only once the next one's start and restated
    /// states are durable: a crash after the release (before the pushes
    /// that began the new segment were synced) must not leave the log
    /// empty, its acknowledged hard and conf state gone.
    #[test]
    fn a_release_right_after_a_roll_keeps_the_acknowledged_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = log_with(dir.path(), 2048, 30, 200);
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 30,
            ..Default::default()
        };
        wal.push(&Record::HardState(hs.clone())).unwrap();
        wal.sync().unwrap();
        // Entries until one begins a new segment (the older ones synced by
        // the roll), and the engine durable through them: release all but
        // the new segment, then crash before the next sync.
        let n = wal.segment_count();
        let mut i = 31;
        while wal.segment_count() == n {
            wal.push(&entry(i, 3, 200)).unwrap();
            i += 1;
        }
        let keep = wal.segments.last().unwrap().prev_index + 1;
        assert_eq!(wal.release_before(keep).unwrap(), n);
        drop(wal);
        let (wal, records) = Wal::open(dir.path(), 2048).unwrap();
        assert!(!wal.is_new());
        assert_eq!(
            records[0],
            Record::Start {
                prev_index: keep - 1,
                prev_term: 3
            }
        );
        assert_eq!(
            records.iter().rev().find_map(|r| match r {
                Record::HardState(h) => Some(h.clone()),
                _ => None,
            }),
            Some(hs)
        );
    }
}
