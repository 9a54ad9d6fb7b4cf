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
//!
//! # Layout
//!
//! A directory of segments `<seq:016x>.wal`, sequence numbers ascending.
//! A segment is a run of records, then zeros (the unwritten preallocated
//! rest). A record is `len: u32 LE | crc32(kind ‖ payload): u32 LE | kind:
//! u8 | payload` with `len` = 1 + payload length; a zero `len` ends the
//! segment. Every segment begins with [`Record::Start`] (index and term of
//! the entry before its first) and the hard and conf state current when it
//! was begun, so older segments can be deleted without losing either.
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
//! * **Release is the caller's promise.** [`Wal::release_before`] deletes
//!   whole segments whose entries are all below an index; the caller first
//!   makes everything those entries did durable elsewhere (the engine).
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

/// Appends one framed record of `kind` to `out`, its payload written by
/// `payload`.
fn frame(out: &mut Vec<u8>, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out[start + 8] = kind;
    payload(out);
    let len = (out.len() - start - 8) as u32;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_entry(e: &Entry, out: &mut Vec<u8>) {
    frame(out, KIND_ENTRY, |o| {
        e.write_to_vec(o).expect("encode entry")
    });
}

impl Record {
    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Record::Entry(e) => encode_entry(e, out),
            Record::HardState(hs) => frame(out, KIND_HARD_STATE, |o| {
                hs.write_to_vec(o).expect("encode hard state")
            }),
            Record::ConfState(cs) => frame(out, KIND_CONF_STATE, |o| {
                cs.write_to_vec(o).expect("encode conf state")
            }),
            Record::Start {
                prev_index,
                prev_term,
            } => frame(out, KIND_START, |o| {
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

/// Reads the records of one segment: the valid prefix, and the offset just
/// after it, plus whether it ended cleanly (zeros or the file's end).
fn read_segment(path: &Path) -> Result<(Vec<Record>, u64, bool), WalError> {
    let data = fs::read(path)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    loop {
        if at + 4 > data.len() {
            return Ok((records, at as u64, true));
        }
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            let clean = data[at..].iter().all(|b| *b == 0);
            return Ok((records, at as u64, clean));
        }
        let end = at + 8 + len;
        if end > data.len() {
            return Ok((records, at as u64, false));
        }
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let body = &data[at + 8..end];
        let record = (crc32fast::hash(body) == crc)
            .then(|| Record::decode(body[0], &body[1..]))
            .flatten();
        match record {
            Some(r) => records.push(r),
            None => return Ok((records, at as u64, false)),
        }
        at = end;
    }
}

struct Segment {
    seq: u64,
    /// Index of the entry before this segment's first (its `Start`).
    prev_index: u64,
}

/// The write side of the log; see the module docs.
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    /// Oldest first; the last is the one written to.
    segments: Vec<Segment>,
    file: Arc<File>,
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

impl Wal {
    /// Opens the log in `dir` (creating it if missing) and returns it with
    /// every record it holds, in write order. A new log is empty: its first
    /// segment begins with [`Wal::begin`].
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Wal, Vec<Record>), WalError> {
        fs::create_dir_all(dir)?;
        let mut seqs = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(hex) = name.strip_suffix(".wal") {
                if let Ok(seq) = u64::from_str_radix(hex, 16) {
                    seqs.push(seq);
                }
            } else if name.ends_with(".tmp") {
                // A segment whose creation did not finish: never used.
                let _ = fs::remove_file(dir.join(&*name));
            }
        }
        seqs.sort_unstable();
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: Vec::new(),
            file: Arc::new(File::open(dir)?),
            offset: 0,
            pending: Vec::new(),
            unsynced: false,
            segment_has_entry: false,
            last_entry: (0, 0),
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
        };
        let mut all = Vec::new();
        let mut torn = false;
        for (i, &seq) in seqs.iter().enumerate() {
            let newest = i + 1 == seqs.len();
            let path = segment_path(dir, seq);
            let (records, end, clean) = read_segment(&path)?;
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
                // A torn tail (power lost during an unsynced write): cut it
                // off, so the file ends cleanly, and go on in a new segment.
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(end)?;
                f.sync_all()?;
                torn = true;
            }
            for r in &records {
                wal.observe(r);
            }
            all.extend(records);
            wal.segments.push(Segment { seq, prev_index });
            if newest && !torn {
                wal.file = Arc::new(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(segment_path(dir, seq))?,
                );
                wal.offset = end;
                wal.segment_has_entry = true;
            }
        }
        if !all.is_empty() && (torn || wal.offset == 0) {
            wal.roll()?;
            wal.sync()?;
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
        self.roll()?;
        self.sync()
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
        r.encode_into(&mut self.pending);
    }

    /// Adds `r` to the log (written by the next `write` or `sync`). Begins
    /// a new segment first when `r` would not fit in the current one (a
    /// record larger than a segment gets one to itself, grown to fit).
    pub fn push(&mut self, r: &Record) -> Result<(), WalError> {
        let before = self.pending.len();
        r.encode_into(&mut self.pending);
        self.place(before, matches!(r, Record::Entry(_)))?;
        self.observe(r);
        Ok(())
    }

    /// `push(&Record::Entry(e.clone()))` without the clone.
    pub fn push_entry(&mut self, e: &Entry) -> Result<(), WalError> {
        let before = self.pending.len();
        encode_entry(e, &mut self.pending);
        self.place(before, true)?;
        self.last_entry = (e.index, e.term);
        Ok(())
    }

    /// Moves the record just encoded at `before` in `pending` to a new
    /// segment if it would not fit in the current one.
    fn place(&mut self, before: usize, entry: bool) -> Result<(), WalError> {
        let end = self.offset + self.pending.len() as u64;
        if end > self.segment_bytes && self.segment_has_entry {
            let encoded = self.pending.split_off(before);
            self.roll()?;
            self.pending.extend_from_slice(&encoded);
        }
        self.segment_has_entry |= entry;
        Ok(())
    }

    /// Syncs what the current segment holds and begins the next one with
    /// its start record and the current hard and conf state.
    fn roll(&mut self) -> Result<(), WalError> {
        if self.needs_sync() {
            self.sync()?;
        }
        let seq = self.segments.last().map(|s| s.seq + 1).unwrap_or(1);
        let file = create_segment(&self.dir, seq, self.segment_bytes)?;
        self.file = Arc::new(file);
        self.offset = 0;
        self.segment_has_entry = false;
        let (prev_index, prev_term) = self.last_entry;
        self.segments.push(Segment { seq, prev_index });
        let (hs, cs) = (self.hard_state.clone(), self.conf_state.clone());
        self.encode(&Record::Start {
            prev_index,
            prev_term,
        });
        self.encode(&Record::HardState(hs));
        self.encode(&Record::ConfState(cs));
        Ok(())
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

    /// Deletes every segment all of whose entries are below `index`; the
    /// newest segment is never deleted. The caller has made what those
    /// entries did durable elsewhere first.
    pub fn release_before(&mut self, index: u64) -> Result<usize, WalError> {
        let mut n = 0;
        while self.releasable(index) {
            let s = self.segments.remove(0);
            fs::remove_file(segment_path(&self.dir, s.seq))?;
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
            entry(4, 1, 50).encode_into(&mut torn);
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
        let first;
        {
            let (mut wal, _) = Wal::open(dir.path(), 2048).unwrap();
            wal.begin(0, 0).unwrap();
            for i in 1..=20 {
                wal.push(&entry(i, 1, 200)).unwrap();
            }
            wal.sync().unwrap();
            first = segment_path(dir.path(), wal.segments[0].seq);
        }
        let f = OpenOptions::new().write(true).open(&first).unwrap();
        f.write_all_at(&[0xee; 4], 40).unwrap();
        assert!(matches!(
            Wal::open(dir.path(), 2048),
            Err(WalError::Corrupt { .. })
        ));
    }

    #[test]
    fn release_deletes_only_segments_wholly_below_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 2048).unwrap();
        wal.begin(0, 0).unwrap();
        for i in 1..=30 {
            wal.push(&entry(i, 1, 200)).unwrap();
        }
        wal.sync().unwrap();
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
}
