//! `Shard`: one core's raft group, state machine and request handling.
//!
//! A shard lives on one glommio executor and is shared by that executor's
//! tasks through an `Rc` (no locks: one thread). It owns a raft-rs
//! `RawNode` over a [`RaftLog`], the [`ShardState`] it applies committed
//! entries to, and the bookkeeping that turns the shared
//! [`RevisionOracle`] into this shard's *resolved watermark*.
//!
//! The write path: a request takes a revision from the oracle (except
//! prepares, aborts, compactions and participant commits, whose revision is
//! given or not needed) and is queued as a [`RaftCommand`] with a
//! [`Reply`]: a task waiting for the answer, or, for a single-shard write
//! from a connection, the connection itself (`submit_write`: no task per
//! write). The raft task drains the queue into one raft proposal
//! (`propose_queued`), handles `Ready`:
//! appends new entries and hard state to the raft log and syncs its WAL
//! (`crate::wal`; group commit: every proposal queued meanwhile shares that
//! fsync), then applies committed entries through `ShardState::apply`,
//! wakes the watch subscriptions their events concern, and answers them.
//! The leader applies its own proposals from the commands it proposed, kept
//! by log index and term, instead of decoding their entries again.
//! An answer to a connection leaves from the `run_answers` task, which runs
//! after those subscriptions, so a write's events are sent before its
//! acknowledgement. The apply writes (and raft's commit index) are
//! unsynced; the shard's [`BufferedEngine`] holds them and they reach the
//! engine together once enough are held or at the next tick. raft-rs does
//! no I/O; this loop owns it, and a 100 ms tick drives raft's timers, writes
//! what is still held, truncates the log (syncing the engine, off this
//! thread, before it deletes WAL segments: see `release_wal_before`), and
//! re-checks everything a lost wake-up could have left waiting. Before
//! serving (`start`), the shard applies its whole raft log past its applied
//! index: whatever a previous process had not written, or held when it
//! died, is re-applied from it.
//!
//! Resolved watermark: `resolved() = min(oracle.current(), every revision
//! this shard allocated and has not applied yet − 1, the floor of every
//! prepared cross-shard txn)`. A txn's floor is the oracle's value when its
//! prepare applied; its commit revision is allocated later, so it is above
//! the floor. Hence no write on this shard will ever get a revision <=
//! `resolved()`, and a read at revision R waits until `resolved() >= R` to
//! see exactly the writes <= R — the consistent cross-shard snapshot. The
//! value only grows, and an idle shard's watermark is the oracle's current
//! value at once.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use metastore_proto::etcdserverpb::{RangeRequest, ResponseHeader, TxnRequest};
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{
    raft_command::Op, shard_error::Code, shard_request, shard_response::Body, AbortRequest,
    CommitRequest, CompactRequest, CurrentRevisionResponse, ForgetDecisionsRequest,
    LeaseKeepAliveResponse, LeaseKeysResponse, LeaseListResponse, LeaseRevokeResponse,
    LeaseTimeToLiveResponse, PrepareRequest, RaftCommand, ResolveRequest, ResolveResponse,
    ShardError, ShardRequest, ShardResponse, StatusResponse, TopologyResponse, TxnEvaluateResponse,
    TxnReadResponse, WatchEventsResponse, WatchSubscribeRequest,
};
use metastore_proto::txn;
use prost::Message;
use raft::eraftpb::EntryType;
use raft::{Config, RawNode, Storage};

use crate::chunks::Chunks;
use crate::engine::buffered::BufferedEngine;
use crate::engine::Engine;
use crate::net::OutboxSender;
use crate::oracle::RevisionOracle;
use crate::raftlog::{RaftLog, WalOptions};
use crate::signal::Signal;
use crate::state::{mvcc_error, ShardState, StateError, TxnId};
use crate::watch::{Poll, Subscription, WatchRing, IDLE_RING_BATCHES, RING_BATCHES, RING_BYTES};

/// Held engine writes are flushed at once past this many keys, so a long
/// run of applies (entries committed in a burst, or many small batches
/// within one tick) does not grow the overlay until the next tick. Small
/// enough that a flush copies keys and values still in the CPU's caches
/// into RocksDB's batch (4,096 cost the shard server about 5% more CPU per
/// put at 1,000 clients: see TUNING), large enough that the keys every
/// entry rewrites (the applied index, the MVCC current revision) are
/// still written once per hundreds of entries.
const MAX_HELD_OPS: usize = 512;

/// The proposal queue keeps its buffer between passes up to this many
/// commands, so that a busy shard does not grow it again (a `realloc`
/// per doubling) on every pass; a larger burst's buffer is let go.
const KEPT_QUEUE_CAPACITY: usize = 2048;

/// Raft entries' data is encoded into [`Chunks`] of this size. A chunk is
/// freed when the last of its entries leaves the raft log's memory, which
/// keeps entries in the order they were proposed, so the chunks pin little
/// beyond the entries held anyway.
const ENTRY_CHUNK_BYTES: usize = 64 << 10;

/// How often raft ticks and waiting work is re-checked.
pub const TICK: Duration = Duration::from_millis(100);
/// A prepared txn older than this is resolved by the shard itself (the
/// coordinator is presumed gone).
pub const INTENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a primary keeps a txn's decision once made: far longer than
/// any participant can still ask for it (it asks after [`INTENT_TIMEOUT`],
/// and the coordinator retries a commit within its 10 s budget). A
/// participant asking after the decision was dropped would be told
/// "aborted" for a committed txn. After a restart every decision gets the
/// full time again.
pub const DECISION_TTL: Duration = Duration::from_secs(60);

/// What every shard of the process knows about the others.
pub struct Topology {
    pub shard_count: u32,
    /// `host:port` of each shard, set once all have bound.
    pub addrs: OnceLock<Vec<String>>,
    pub cluster_id: u64,
    pub member_id: u64,
    pub member_name: String,
    pub engine: String,
    /// Names this server's history (see `crate::history`).
    pub history_id: u64,
}

/// Errors that stop a shard.
#[derive(Debug, thiserror::Error)]
pub enum ShardFailure {
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("raft log sync: {0}")]
    Sync(#[from] std::io::Error),
    #[error("raft stopped committing the log at start: applied {applied} of {target}")]
    CatchUp { applied: u64, target: u64 },
}

/// Where a proposal's answer goes once it is applied.
pub enum Reply {
    /// A task waiting for it (`propose`).
    Waiter(oneshot::Sender<Body>),
    /// Straight onto a connection as the response to request `id`.
    Frame(u64, OutboxSender),
}

impl Reply {
    fn send(self, body: Body) {
        match self {
            Reply::Waiter(tx) => {
                let _ = tx.send(body);
            }
            Reply::Frame(id, out) => {
                out.send(&ShardResponse {
                    id,
                    body: Some(body),
                });
            }
        }
    }
}

/// Answers to applied proposals that go straight onto a connection, sent
/// by their own task (`run_answers`) so that they leave after the watch
/// events of the same entries: the subscriptions woken by an apply run
/// before this task does.
#[derive(Default)]
struct Answers {
    queued: RefCell<Vec<(Reply, Body)>>,
    ready: Signal,
}

/// One shard; see the module essay.
pub struct Shard {
    id: u32,
    router: ShardRouter,
    oracle: Arc<RevisionOracle>,
    topology: Arc<Topology>,
    /// The engine every part of this shard uses; the Ready loop holds its
    /// unsynced writes until enough are held or the tick (see `drive`).
    buffer: Rc<BufferedEngine>,
    /// Run the raft fsync inline on this core instead of the blocking pool.
    fsync_on_core: Cell<bool>,
    node: RefCell<RawNode<RaftLog>>,
    state: RefCell<ShardState>,
    queue: RefCell<Vec<RaftCommand>>,
    /// This leader's proposals not yet applied, as (index, term, command),
    /// in log order: applying one of them uses the command as proposed
    /// instead of decoding its entry again (same index and term, same
    /// entry). Entries that do not match are decoded as usual.
    proposed: RefCell<VecDeque<(u64, u64, RaftCommand)>>,
    waiters: RefCell<HashMap<u64, Reply>>,
    answers: Answers,
    next_proposal: Cell<u64>,
    /// Revisions allocated by this shard and not yet applied → proposal id.
    inflight: RefCell<BTreeMap<i64, u64>>,
    /// Floor revision and prepare time of each prepared txn.
    floors: RefCell<HashMap<TxnId, (i64, Instant)>>,
    /// This primary's decisions in the order made, with when: dropped
    /// through raft after [`DECISION_TTL`] (ids may repeat or be gone).
    decision_times: RefCell<VecDeque<(Instant, TxnId)>>,
    read_waiters: RefCell<Vec<(i64, oneshot::Sender<()>)>>,
    resolving: RefCell<std::collections::HashSet<TxnId>>,
    /// Proposals were queued: the raft task has work.
    wake: Signal,
    /// Where proposals' entry data is encoded (see `propose_queued`).
    entry_chunks: RefCell<Chunks>,
    /// Every applied event, for watch subscriptions.
    ring: RefCell<WatchRing>,
    /// Subscriptions waiting for new events or a moved watermark.
    watch_waiters: RefCell<Vec<oneshot::Sender<()>>>,
    /// Deadlines of the leases this shard is home of (leader-local, like
    /// etcd's lessor: refreshed by keep-alives, reset to a full TTL on
    /// start, acted on only through a replicated revocation).
    lease_deadlines: RefCell<HashMap<i64, Instant>>,
    /// Leases whose revocation is under way.
    revoking: RefCell<std::collections::HashSet<i64>>,
    /// An expiry pass is revoking expired leases (one at a time).
    expiring: Cell<bool>,
    /// The engine is being synced off this thread before WAL segments are
    /// released (`release_wal_before`; one at a time).
    releasing: Cell<bool>,
}

/// The connection's handle on one subscription: acks, progress requests
/// and cancellation arrive here from the connection's reader.
#[derive(Default)]
pub struct SubscriptionHandle {
    pub acked: Cell<u64>,
    pub progress: Cell<Option<i64>>,
    pub cancelled: Cell<bool>,
    waker: RefCell<Option<oneshot::Sender<()>>>,
}

impl SubscriptionHandle {
    /// Wakes the subscription's task if it is waiting.
    pub fn wake(&self) {
        if let Some(tx) = self.waker.borrow_mut().take() {
            let _ = tx.send(());
        }
    }
}

/// A shard's watch ring, empty above `applied_revision`: full-sized while a
/// subscription reads it, small while none does.
fn shard_ring(applied_revision: i64) -> WatchRing {
    WatchRing::new(applied_revision, RING_BATCHES, RING_BYTES).with_idle_batches(IDLE_RING_BATCHES)
}

pub(crate) fn error(code: Code, message: impl Into<String>) -> Body {
    Body::Error(ShardError {
        code: code as i32,
        message: message.into(),
    })
}

fn slog_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Shard {
    /// Opens shard `id` over `engine`, replaying its raft log (from the
    /// WAL `wal` describes if the engine is persistent; a memory shard's log
    /// lives in memory). Returns the shard and the largest revision found
    /// in its log or data (the oracle must start above it).
    pub fn open(
        id: u32,
        router: ShardRouter,
        engine: Rc<dyn Engine>,
        wal: &WalOptions,
        oracle: Arc<RevisionOracle>,
        topology: Arc<Topology>,
    ) -> Result<(Rc<Shard>, i64), ShardFailure> {
        // Everyone shares the buffered engine: what the Ready loop holds
        // back is visible to every reader (see `engine::buffered`).
        let persistent = engine.kind().is_persistent();
        let buffer = BufferedEngine::new(engine);
        let engine: Rc<dyn Engine> = buffer.clone();
        let log = if persistent {
            RaftLog::open(wal, &engine)?
        } else {
            RaftLog::in_memory()
        };
        log.bootstrap(&[1])?;
        let state = ShardState::open(id, router, engine.clone())?;
        // Entries past the state's applied index are applied by `start`
        // (`catch_up`); the oracle must start above their revisions too.
        let mut max_rev = state.mvcc().current_revision();
        let last = log.last_index()?;
        let from = state.applied_index() + 1;
        if from <= last {
            let entries =
                log.entries(from, last + 1, None, raft::GetEntriesContext::empty(false))?;
            for cmd in entries.iter().filter_map(decode_entry) {
                max_rev = max_rev.max(cmd.revision);
            }
        }
        let applied = state.applied_index();
        log.commit_applied(applied)?;
        let config = Config {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 3,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        config.validate()?;
        let mut node = RawNode::new(&config, log, &slog_logger())?;
        // One voter: campaigning makes it leader at once.
        node.campaign()?;
        let shard = Rc::new(Shard {
            id,
            router,
            oracle,
            topology,
            buffer,
            fsync_on_core: Cell::new(true),
            node: RefCell::new(node),
            state: RefCell::new(state),
            queue: RefCell::new(Vec::new()),
            proposed: RefCell::new(VecDeque::new()),
            waiters: RefCell::new(HashMap::new()),
            next_proposal: Cell::new(1),
            inflight: RefCell::new(BTreeMap::new()),
            floors: RefCell::new(HashMap::new()),
            decision_times: RefCell::new(VecDeque::new()),
            read_waiters: RefCell::new(Vec::new()),
            resolving: RefCell::new(Default::default()),
            wake: Signal::default(),
            entry_chunks: RefCell::new(Chunks::new(ENTRY_CHUNK_BYTES)),
            answers: Answers::default(),
            ring: RefCell::new(shard_ring(max_rev)),
            watch_waiters: RefCell::new(Vec::new()),
            lease_deadlines: RefCell::new(HashMap::new()),
            revoking: RefCell::new(Default::default()),
            expiring: Cell::new(false),
            releasing: Cell::new(false),
        });
        Ok((shard, max_rev))
    }

    /// Called once the oracle has been set above every shard's revisions,
    /// before anything is served: applies the whole raft log (see
    /// `catch_up`), then gives txns prepared before a restart their floor.
    pub async fn start(&self) -> Result<(), ShardFailure> {
        self.catch_up().await?;
        // Like etcd after a restart or leader change: every lease gets its
        // full TTL again rather than expiring all at once.
        let started = Instant::now();
        let mut deadlines = self.lease_deadlines.borrow_mut();
        for lease in self.state.borrow().leases().values().filter(|l| l.home) {
            deadlines.insert(lease.id, started + ttl_duration(lease.ttl));
        }
        drop(deadlines);
        // The oracle is past every revision now, the commit revision a
        // primary may have recorded for these txns included: each keeps
        // the floor its prepare's entry carries.
        let mut floors = self.floors.borrow_mut();
        for (id, prepare) in self.state.borrow().intents() {
            floors.insert(id.clone(), (prepare.floor, Instant::now()));
        }
        let mut times = self.decision_times.borrow_mut();
        for id in self.state.borrow().decision_ids() {
            times.push_back((Instant::now(), id.clone()));
        }
        Ok(())
    }

    /// Applies every entry of the raft log before the shard serves.
    ///
    /// The state's applied index and raft's commit index are written
    /// unsynced, and the last batch of them may have been held in memory
    /// when the process died (`engine::buffered`): the durable log can hold
    /// acknowledged entries past both. Raft hands over the entries its
    /// persisted commit index covers, and commits the rest again with the
    /// no-op entry of the leader's new term (at once, with one voter); all
    /// are applied here, so no read or watch is ever served from a state
    /// that lacks an acknowledged write. Their events are served from
    /// history, like everything before startup: the watch ring starts
    /// afresh above them.
    async fn catch_up(&self) -> Result<(), ShardFailure> {
        let target = self.node.borrow().raft.raft_log.last_index();
        while self.state.borrow().applied_index() < target {
            if !self.node.borrow().has_ready() {
                return Err(ShardFailure::CatchUp {
                    applied: self.state.borrow().applied_index(),
                    target,
                });
            }
            self.drive().await?;
        }
        self.buffer.flush().map_err(StateError::from)?;
        *self.ring.borrow_mut() = shard_ring(self.oracle.current());
        Ok(())
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Chooses where raft's fsync runs (see `persist`).
    pub fn set_fsync_on_core(&self, on_core: bool) {
        self.fsync_on_core.set(on_core);
    }

    /// Bounds the cache of recently read version records (see
    /// `mvcc::record_cache`); 0 turns it off.
    pub fn set_record_cache_bytes(&self, bytes: usize) {
        self.state
            .borrow_mut()
            .mvcc_mut()
            .set_record_cache_bytes(bytes);
    }

    fn owns_fn(&self) -> impl Fn(&[u8]) -> bool {
        let (shard, router) = (self.id, self.router);
        move |k: &[u8]| router.owns(shard, k)
    }

    fn term(&self) -> u64 {
        self.node.borrow().raft.term
    }

    /// This shard's resolved watermark (see the module essay).
    pub fn resolved(&self) -> i64 {
        let mut r = self.oracle.current();
        if let Some((rev, _)) = self.inflight.borrow().iter().next() {
            r = r.min(rev - 1);
        }
        for (floor, _) in self.floors.borrow().values() {
            r = r.min(*floor);
        }
        r
    }

    async fn wait_resolved(&self, rev: i64) {
        while self.resolved() < rev {
            let (tx, rx) = oneshot::channel();
            self.read_waiters.borrow_mut().push((rev, tx));
            // Woken after applies; the tick re-checks in case of a miss.
            let _ = rx.await;
        }
    }

    fn notify_readers(&self) {
        let resolved = self.resolved();
        let mut waiters = self.read_waiters.borrow_mut();
        let mut i = 0;
        while i < waiters.len() {
            if waiters[i].0 <= resolved || waiters[i].1.is_canceled() {
                let (_, tx) = waiters.swap_remove(i);
                let _ = tx.send(());
            } else {
                i += 1;
            }
        }
    }

    /// Queues `op` for raft at `revision` (`None`: allocate one now) and
    /// waits for it to be applied.
    async fn propose(&self, op: Op, revision: Option<i64>) -> Body {
        let (tx, rx) = oneshot::channel();
        self.queue_proposal(op, revision, Reply::Waiter(tx));
        rx.await
            .unwrap_or_else(|_| error(Code::Unavailable, "shard stopped"))
    }

    /// Proposes a cross-shard prepare, with its floor (see
    /// `PrepareRequest::floor`) taken now: the primary takes the commit
    /// revision only after this prepare is applied and answered.
    async fn propose_prepare(&self, mut p: PrepareRequest) -> Body {
        p.floor = self.oracle.current();
        self.propose(Op::Prepare(p), Some(0)).await
    }

    /// Queues `op` for raft at `revision` (`None`: allocate one now); its
    /// answer goes to `reply` once applied.
    fn queue_proposal(&self, op: Op, revision: Option<i64>, reply: Reply) {
        let (rev, allocated) = match revision {
            Some(r) => (r, false),
            None => (self.oracle.allocate(), true),
        };
        let id = self.next_proposal.get();
        self.next_proposal.set(id + 1);
        if allocated {
            self.inflight.borrow_mut().insert(rev, id);
        }
        self.waiters.borrow_mut().insert(id, reply);
        self.queue.borrow_mut().push(RaftCommand {
            revision: rev,
            proposal_id: id,
            op: Some(op),
        });
        self.wake.notify();
    }

    /// Starts a single-shard write (Put, DeleteRange or Txn) without a
    /// task of its own: it is checked and queued now, and `reply` gets
    /// the answer (an error at once, or the result once applied).
    pub fn submit_write(&self, req: shard_request::Body, reply: Reply) {
        match self.write_op(req) {
            Ok(op) => self.queue_proposal(op, None, reply),
            Err(why) => reply.send(error(Code::InvalidArgument, why)),
        }
    }

    /// The raft op of a single-shard write, or why it is refused
    /// (`InvalidArgument`: the gateway routes writes to their shard).
    fn write_op(&self, req: shard_request::Body) -> Result<Op, &'static str> {
        use shard_request::Body as R;
        match req {
            R::Put(p) if !self.router.owns(self.id, &p.key) => Err("key belongs to another shard"),
            R::Put(p) => Ok(Op::Put(p)),
            R::DeleteRange(d)
                if self.router.shard_count() > 1
                    && (!d.range_end.is_empty() || !self.router.owns(self.id, &d.key)) =>
            {
                Err("delete spans other shards")
            }
            R::DeleteRange(d) => Ok(Op::DeleteRange(d)),
            R::Txn(t) if !self.state.borrow().owns_all(&t) => {
                Err("txn touches keys of other shards")
            }
            R::Txn(t) => Ok(Op::Txn(t)),
            _ => Err("not a single-shard write"),
        }
    }

    /// The raft task: runs until the process ends.
    pub async fn run_raft(self: Rc<Self>) {
        glommio::spawn_local(self.clone().run_answers()).detach();
        let mut next_tick = Instant::now() + TICK;
        loop {
            let now = Instant::now();
            if now >= next_tick {
                // Writes held since the last flush (see `drive`), and the
                // log's unsynced records (the commit index).
                if let Err(e) = self.buffer.flush() {
                    eprintln!("shard {}: fatal: {e}", self.id);
                    std::process::exit(1);
                }
                if let Err(e) = self.node.borrow().store().write_unsynced() {
                    eprintln!("shard {}: fatal: {e}", self.id);
                    std::process::exit(1);
                }
                self.node.borrow_mut().tick();
                next_tick = now + TICK;
                self.on_tick();
            } else {
                let sleep = glommio::timer::sleep(next_tick - now);
                futures::pin_mut!(sleep);
                let _ = futures::future::select(std::pin::pin!(self.wake.wait()), sleep).await;
                // Let other tasks queue more proposals: one fsync for all.
                futures_lite_yield().await;
            }
            self.wake.take();
            if let Err(e) = self.drive().await {
                eprintln!("shard {}: fatal: {e}", self.id);
                std::process::exit(1);
            }
        }
    }

    /// Proposes `queued` (emptied) to raft as one message, the way
    /// `RawNode::propose` proposes one command: the leader appends them as
    /// its last entries, in order, or drops them all. Each entry's data is
    /// cut from the shard's `entry_chunks`, so neither
    /// encoding it nor raft's copies of the entry allocate.
    fn propose_queued(&self, queued: &mut Vec<RaftCommand>) {
        let mut entries = Vec::with_capacity(queued.len());
        {
            let mut chunks = self.entry_chunks.borrow_mut();
            for cmd in queued.iter() {
                let data = chunks.cut(cmd.encoded_len(), |buf| {
                    metastore_proto::encode::raft_command_raw(cmd, buf)
                });
                entries.push(raft::eraftpb::Entry {
                    data,
                    ..Default::default()
                });
            }
        }
        let count = entries.len() as u64;
        let mut node = self.node.borrow_mut();
        let mut msg = raft::eraftpb::Message::default();
        msg.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
        msg.from = node.raft.id;
        msg.set_entries(entries.into());
        match node.step(msg) {
            Ok(()) => {
                let (last, term) = (node.raft.raft_log.last_index(), node.raft.term);
                let mut proposed = self.proposed.borrow_mut();
                for (index, cmd) in (last + 1 - count..).zip(queued.drain(..)) {
                    proposed.push_back((index, term, cmd));
                }
            }
            Err(e) => {
                drop(node);
                let message = format!("propose: {e}");
                for cmd in queued.drain(..) {
                    self.finish_proposal(&cmd, error(Code::NotLeader, message.clone()));
                }
            }
        }
    }

    /// Sends the answers of applied proposals (see [`Answers`]).
    async fn run_answers(self: Rc<Self>) {
        let mut batch = Vec::new();
        loop {
            self.answers.ready.wait().await;
            std::mem::swap(&mut batch, &mut *self.answers.queued.borrow_mut());
            for (reply, body) in batch.drain(..) {
                reply.send(body);
            }
        }
    }

    async fn drive(&self) -> Result<(), ShardFailure> {
        let mut queued: Vec<RaftCommand> = std::mem::take(&mut *self.queue.borrow_mut());
        if !queued.is_empty() {
            self.propose_queued(&mut queued);
        }
        {
            let mut queue = self.queue.borrow_mut();
            if queue.is_empty() && queued.capacity() <= KEPT_QUEUE_CAPACITY {
                *queue = queued;
            }
        }
        // Applying entries makes unsynced engine writes: they are held and
        // go to the engine together, once MAX_HELD_OPS keys are held or at
        // the next tick. Readers see them at once; the raft WAL has every
        // entry they came from.
        self.buffer.hold();
        loop {
            // No RefCell borrow lives across the await below: reads, watch
            // subscriptions and new proposals keep being served meanwhile.
            let (rd, committed, must_sync) = {
                let mut node = self.node.borrow_mut();
                if !node.has_ready() {
                    break;
                }
                let mut rd = node.ready();
                let committed = rd.take_committed_entries();
                // New entries, or a new term or vote (not a commit index
                // alone: that is rebuilt after a restart).
                let must_sync = rd.must_sync();
                node.store().append(rd.take_entries())?;
                if let Some(hs) = rd.hs() {
                    node.store().set_hard_state(hs)?;
                }
                (rd, committed, must_sync)
            };
            // Entries committed by an earlier Ready are durable already.
            self.apply_entries(committed)?;
            if must_sync {
                self.persist().await?;
            }
            let more = {
                let mut node = self.node.borrow_mut();
                let mut light = node.advance(rd);
                if let Some(commit) = light.commit_index() {
                    // Unsynced: it rides with the next sync, or the tick's
                    // write; a restart commits the log again anyway.
                    node.store().set_commit(commit)?;
                }
                light.take_committed_entries()
            };
            self.apply_entries(more)?;
            self.node.borrow_mut().advance_apply();
        }
        if self.buffer.held_len() >= MAX_HELD_OPS {
            self.buffer.flush().map_err(StateError::from)?;
        }
        self.notify_readers();
        self.notify_watchers();
        Ok(())
    }

    /// Makes raft's new entries and hard state durable (the raft WAL's
    /// `fdatasync`) before anything in them is applied or acknowledged. One
    /// fsync covers everything proposed since the last one (group commit),
    /// and proposals queued during it form the next group. By default the
    /// fsync runs inline on this core (`--fsync core`: least CPU per
    /// write); with `--fsync blocking-pool` the write and its fsync run on
    /// glommio's blocking pool and this core keeps serving reads and
    /// watches meanwhile (nothing else pushes to the log until it is done:
    /// only this task does). A memory shard's log has nothing to sync.
    async fn persist(&self) -> Result<(), ShardFailure> {
        if self.fsync_on_core.get() {
            self.node.borrow().store().sync()?;
            return Ok(());
        }
        let Some(job) = self.node.borrow().store().sync_job() else {
            return Ok(());
        };
        glommio::executor()
            .spawn_blocking(move || job.run())
            .await?;
        Ok(())
    }

    /// Deletes the raft WAL segments whose entries are all before `index`
    /// (at most the applied index), once the engine holds, durably,
    /// everything those entries did: restart replays the log from the
    /// engine's applied index. Making it durable (RocksDB: flushing its
    /// memtables) runs on glommio's blocking pool, so this core goes on
    /// serving; the segments go when it is done. One at a time.
    fn release_wal_before(self: &Rc<Self>, index: u64) {
        let release = move |shard: &Shard| {
            let released = shard.node.borrow().store().release_before(index);
            if let Err(e) = released {
                eprintln!("shard {}: raft log release: {e}", shard.id);
            }
        };
        match self.buffer.sync_job() {
            Err(e) => eprintln!("shard {}: engine sync before WAL release: {e}", self.id),
            Ok(None) => release(self),
            Ok(Some(job)) => {
                self.releasing.set(true);
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let synced = glommio::executor().spawn_blocking(job).await;
                    shard.releasing.set(false);
                    match synced {
                        Ok(()) => release(&shard),
                        Err(e) => {
                            eprintln!("shard {}: engine sync before WAL release: {e}", shard.id)
                        }
                    }
                })
                .detach();
            }
        }
    }

    fn notify_watchers(&self) {
        for tx in self.watch_waiters.borrow_mut().drain(..) {
            let _ = tx.send(());
        }
    }

    /// Streams one watch subscription (see `crate::watch`) to `send` until
    /// it is cancelled, compacted away, or the connection goes.
    pub async fn run_subscription(
        self: Rc<Self>,
        req: WatchSubscribeRequest,
        handle: Rc<SubscriptionHandle>,
        send: &dyn Fn(WatchEventsResponse) -> bool,
    ) {
        if req.expect_history != 0 && req.expect_history != self.topology.history_id {
            // The revisions asked for are from a history this server no
            // longer has (see `crate::history`): end it as compacted, at
            // the oldest revision this history can serve.
            let oldest = self.state.borrow().mvcc().compacted_revision().max(1);
            send(WatchEventsResponse {
                seq: 1,
                compact_revision: oldest,
                history: self.topology.history_id,
                ..Default::default()
            });
            return;
        }
        /// Counts the subscription as the ring's reader while it lives.
        struct Reader<'a>(&'a RefCell<WatchRing>);
        impl Drop for Reader<'_> {
            fn drop(&mut self) {
                self.0.borrow_mut().reader_left();
            }
        }
        self.ring.borrow_mut().reader_joined();
        let _reader = Reader(&self.ring);
        let mut sub = Subscription::new(
            req.key,
            req.range_end,
            req.start_revision,
            req.prev_kv,
            u64::from(req.window),
            self.oracle.current(),
            &self.ring.borrow(),
        );
        loop {
            if handle.cancelled.get() {
                return;
            }
            sub.ack(handle.acked.get());
            if let Some(rev) = handle.progress.take() {
                sub.want_progress(rev);
            }
            let poll = {
                let ring = self.ring.borrow();
                let state = self.state.borrow();
                sub.poll(&ring, state.mvcc(), self.resolved(), Instant::now())
            };
            match poll {
                Poll::Frame(f) => {
                    if !send(f) {
                        return;
                    }
                    glommio::yield_if_needed().await;
                }
                Poll::Compacted(f) => {
                    send(f);
                    return;
                }
                Poll::More => glommio::yield_if_needed().await,
                Poll::Idle => {
                    let (tx, rx) = oneshot::channel();
                    let (tx2, rx2) = oneshot::channel();
                    self.watch_waiters.borrow_mut().push(tx);
                    *handle.waker.borrow_mut() = Some(tx2);
                    let sleep = glommio::timer::sleep(crate::watch::HEARTBEAT);
                    futures::pin_mut!(sleep);
                    let woken = futures::future::select(rx, rx2);
                    let _ = futures::future::select(woken, sleep).await;
                }
            }
        }
    }

    fn apply_entries(&self, entries: Vec<raft::eraftpb::Entry>) -> Result<(), ShardFailure> {
        for e in entries {
            let cmd = if e.get_entry_type() == EntryType::EntryNormal {
                take_proposed(&mut self.proposed.borrow_mut(), e.index, e.term)
                    .or_else(|| decode_entry(&e))
            } else {
                None
            };
            let Some(cmd) = cmd else {
                self.state.borrow_mut().apply_noop(e.index)?;
                continue;
            };
            let (body, pushed) = {
                let mut state = self.state.borrow_mut();
                let body = state.apply(e.index, &cmd)?;
                (body, self.ring.borrow_mut().push(state.take_events()))
            };
            if pushed {
                // Watchers are woken before the writer is answered: an event
                // should not trail the acknowledgement of its own write.
                self.notify_watchers();
            }
            match &cmd.op {
                Some(Op::Prepare(p)) if !matches!(body, Body::Error(_)) => {
                    self.floors
                        .borrow_mut()
                        .entry(p.txn_id.clone())
                        .or_insert((self.oracle.current(), Instant::now()));
                }
                Some(Op::Commit(CommitRequest { txn_id, .. }))
                | Some(Op::Abort(AbortRequest { txn_id }))
                    if !self.state.borrow().intents().contains_key(txn_id) =>
                {
                    self.floors.borrow_mut().remove(txn_id);
                    if self.state.borrow().decision(txn_id).is_some() {
                        self.decision_times
                            .borrow_mut()
                            .push_back((Instant::now(), txn_id.clone()));
                    }
                }
                Some(Op::LeaseRegister(r)) if r.home && !matches!(body, Body::Error(_)) => {
                    self.lease_deadlines
                        .borrow_mut()
                        .insert(r.id, Instant::now() + ttl_duration(r.ttl));
                }
                _ => {}
            }
            self.finish_proposal(&cmd, body);
        }
        Ok(())
    }

    fn finish_proposal(&self, cmd: &RaftCommand, body: Body) {
        {
            let mut inflight = self.inflight.borrow_mut();
            if inflight.get(&cmd.revision) == Some(&cmd.proposal_id) {
                inflight.remove(&cmd.revision);
            }
        }
        let reply = self.waiters.borrow_mut().remove(&cmd.proposal_id);
        if let Some(reply) = reply {
            let body = match body {
                Body::Put(mut r) => {
                    r.header = self.header(r.header);
                    Body::Put(r)
                }
                Body::DeleteRange(mut r) => {
                    r.header = self.header(r.header);
                    Body::DeleteRange(r)
                }
                Body::Txn(mut r) => {
                    r.header = self.header(r.header);
                    Body::Txn(r)
                }
                other => other,
            };
            match reply {
                // The waiting task runs after the subscriptions woken
                // before it anyway.
                Reply::Waiter(_) => reply.send(body),
                Reply::Frame(..) => {
                    self.answers.queued.borrow_mut().push((reply, body));
                    self.answers.ready.notify();
                }
            }
        }
    }

    fn header(&self, h: Option<ResponseHeader>) -> Option<ResponseHeader> {
        let mut h = h.unwrap_or_default();
        if h.revision == 0 {
            h.revision = self.oracle.current();
        }
        h.raft_term = self.term();
        h.cluster_id = self.topology.cluster_id;
        h.member_id = self.topology.member_id;
        Some(h)
    }

    /// Periodic work: wake readers, truncate the log, resolve stale txns.
    fn on_tick(self: &Rc<Self>) {
        self.notify_readers();
        self.notify_watchers();
        self.expire_leases();
        let applied = self.state.borrow().applied_index();
        let node = self.node.borrow();
        let log = node.store();
        if let Some(index) = log.truncation_index(applied) {
            if let Err(e) = log.truncate_before(index) {
                eprintln!("shard {}: raft log truncation: {e}", self.id);
            } else if log.releasable(index) && !self.releasing.get() {
                self.release_wal_before(index);
            }
        }
        drop(node);
        self.forget_old_decisions();
        let stale: Vec<(TxnId, u32)> = {
            let floors = self.floors.borrow();
            let state = self.state.borrow();
            state
                .intents()
                .iter()
                .filter(|(id, _)| {
                    floors
                        .get(*id)
                        .map(|(_, t)| t.elapsed() > INTENT_TIMEOUT)
                        .unwrap_or(false)
                })
                .map(|(id, p)| (id.clone(), p.primary))
                .collect()
        };
        for (id, primary) in stale {
            if !self.resolving.borrow_mut().insert(id.clone()) {
                continue;
            }
            let shard = self.clone();
            glommio::spawn_local(async move {
                shard.resolve_stale(id.clone(), primary).await;
                shard.resolving.borrow_mut().remove(&id);
            })
            .detach();
        }
    }

    /// Settles a txn whose coordinator went silent: the primary aborts it
    /// unless decided; a participant asks the primary and follows it.
    async fn resolve_stale(self: &Rc<Self>, id: TxnId, primary: u32) {
        let decision = if primary == self.id {
            self.resolve(&id).await
        } else {
            let Some(addr) = self
                .topology
                .addrs
                .get()
                .and_then(|a| a.get(primary as usize).cloned())
            else {
                return;
            };
            let req = ShardRequest {
                id: 1,
                body: Some(shard_request::Body::Resolve(ResolveRequest {
                    txn_id: id.clone(),
                })),
            };
            match crate::net::call(&addr, &req).await {
                Ok(resp) => match resp.body {
                    Some(Body::Resolve(r)) => r,
                    _ => return,
                },
                Err(_) => return,
            }
        };
        if decision.committed {
            self.propose(
                Op::Commit(CommitRequest {
                    txn_id: id,
                    path: decision.path,
                    revision: decision.revision,
                }),
                Some(decision.revision),
            )
            .await;
        } else {
            self.propose(Op::Abort(AbortRequest { txn_id: id }), Some(0))
                .await;
        }
    }

    /// The primary's answer for `id`: its decision, deciding abort first if
    /// there is none yet.
    async fn resolve(&self, id: &[u8]) -> ResolveResponse {
        let known = |s: &Self| {
            s.state.borrow().decision(id).map(|d| ResolveResponse {
                committed: d.committed,
                revision: d.revision,
                path: d.path.clone(),
            })
        };
        if let Some(r) = known(self) {
            return r;
        }
        self.propose(
            Op::Abort(AbortRequest {
                txn_id: id.to_vec(),
            }),
            Some(0),
        )
        .await;
        known(self).unwrap_or_default()
    }

    /// Starts an expiry pass unless one is running: it revokes the home
    /// leases whose deadline passed, one batch of at most
    /// [`LEASE_REVOKE_BATCH`] after the other, until none is left. One
    /// batch at a time bounds what a storm puts in front of other writes
    /// (a write waits for one batch to apply, not for a pile of them),
    /// and going on without waiting for the next tick keeps it short.
    fn expire_leases(self: &Rc<Self>) {
        const SCAN: usize = LEASE_REVOKE_BATCH * 16;
        if self.expiring.get() {
            return;
        }
        let mut expired = self.expired_leases(SCAN);
        if expired.is_empty() {
            return;
        }
        self.expiring.set(true);
        let shard = self.clone();
        glommio::spawn_local(async move {
            while !expired.is_empty() {
                let mut failed = false;
                for batch in expired.chunks(LEASE_REVOKE_BATCH) {
                    // A keep-alive may have come in since the scan; from
                    // here until the revocation marks them there is no
                    // await, so none can come in after this check.
                    let batch = shard.still_expired(batch);
                    if batch.is_empty() {
                        continue;
                    }
                    // On failure the leases stay expired and the next tick
                    // starts another pass.
                    if shard.revoke_leases(batch).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed {
                    break;
                }
                expired = shard.expired_leases(SCAN);
            }
            shard.expiring.set(false);
        })
        .detach();
    }

    /// Those of `ids` still past their deadline and not being revoked.
    fn still_expired(&self, ids: &[i64]) -> Vec<i64> {
        let deadlines = self.lease_deadlines.borrow();
        let expired = self.expired_at(Instant::now());
        ids.iter()
            .copied()
            .filter(|id| deadlines.get(id).is_some_and(|d| expired(*id, *d)))
            .collect()
    }

    /// Up to `max` home leases past their deadline and not being revoked.
    fn expired_leases(&self, max: usize) -> Vec<i64> {
        let expired = self.expired_at(Instant::now());
        self.lease_deadlines
            .borrow()
            .iter()
            .filter(|(id, d)| expired(**id, **d))
            .map(|(id, _)| *id)
            .take(max)
            .collect()
    }

    /// Whether a home lease with `deadline` is due for revocation at `now`:
    /// past it, and not being revoked already.
    fn expired_at(&self, now: Instant) -> impl Fn(i64, Instant) -> bool + '_ {
        let revoking = self.revoking.borrow();
        move |id, deadline| deadline <= now && !revoking.contains(&id)
    }

    /// Revokes `ids` (home leases of this shard) everywhere: a cross-shard
    /// transaction, coordinated by this shard as its primary, that deletes
    /// every attached key on every shard at one revision. Returns that
    /// revision.
    pub async fn revoke_leases(self: &Rc<Self>, ids: Vec<i64>) -> Result<i64, Body> {
        {
            let mut revoking = self.revoking.borrow_mut();
            if ids.iter().any(|id| revoking.contains(id)) {
                return Err(error(Code::Conflict, "lease revocation already under way"));
            }
            revoking.extend(ids.iter().copied());
        }
        let result = self.revoke_leases_2pc(&ids).await;
        let mut revoking = self.revoking.borrow_mut();
        let mut deadlines = self.lease_deadlines.borrow_mut();
        for id in &ids {
            revoking.remove(id);
            // A home lease is only ever revoked here (this shard is the
            // primary of its revocation), so this is where its deadline
            // goes — not a scan of every deadline on each applied commit.
            if result.is_ok() {
                deadlines.remove(id);
            }
        }
        result
    }

    /// Proposes dropping the decisions older than [`DECISION_TTL`].
    fn forget_old_decisions(&self) {
        let mut times = self.decision_times.borrow_mut();
        let mut txn_ids = Vec::new();
        while let Some((at, _)) = times.front() {
            if at.elapsed() < DECISION_TTL || txn_ids.len() >= 10_000 {
                break;
            }
            txn_ids.push(times.pop_front().unwrap().1);
        }
        drop(times);
        if !txn_ids.is_empty() {
            let (tx, _) = oneshot::channel();
            self.queue_proposal(
                Op::ForgetDecisions(ForgetDecisionsRequest { txn_ids }),
                Some(0),
                Reply::Waiter(tx),
            );
        }
    }

    async fn revoke_leases_2pc(self: &Rc<Self>, ids: &[i64]) -> Result<i64, Body> {
        let shards: Vec<u32> = (0..self.router.shard_count()).collect();
        let mut backoff = Duration::from_millis(1);
        for _ in 0..200 {
            let txn_id: Vec<u8> = (0..16).map(|_| rand::random::<u8>()).collect();
            let prepare = PrepareRequest {
                txn_id: txn_id.clone(),
                primary: self.id,
                participants: shards.clone(),
                txn: Some(TxnRequest::default()),
                revoke_leases: ids.to_vec(),
                // Each shard sets its own as it proposes.
                floor: 0,
                revoke_grants: ids
                    .iter()
                    .map(|id| self.state.borrow().leases().get(id).map_or(0, |l| l.grant))
                    .collect(),
            };
            let answers = futures::future::join_all(
                shards
                    .iter()
                    .map(|&s| self.call_shard(s, shard_request::Body::Prepare(prepare.clone()))),
            )
            .await;
            if answers.iter().all(|b| matches!(b, Body::Prepare(_))) {
                let commit = CommitRequest {
                    txn_id: txn_id.clone(),
                    path: vec![true],
                    revision: 0,
                };
                let revision = match self.propose(Op::Commit(commit.clone()), None).await {
                    Body::Commit(c) => c.revision,
                    other => return Err(other),
                };
                let others = shards.iter().filter(|&&s| s != self.id).map(|&s| {
                    let commit = CommitRequest {
                        revision,
                        ..commit.clone()
                    };
                    async move {
                        // The decision is durable here; a participant that
                        // misses this also resolves it by itself.
                        for _ in 0..20 {
                            if let Body::Commit(_) = self
                                .call_shard(s, shard_request::Body::Commit(commit.clone()))
                                .await
                            {
                                return;
                            }
                            glommio::timer::sleep(Duration::from_millis(5)).await;
                        }
                    }
                });
                futures::future::join_all(others).await;
                return Ok(revision);
            }
            // Someone holds a lock: undo the prepares and try again.
            let abort = AbortRequest { txn_id };
            futures::future::join_all(
                shards
                    .iter()
                    .map(|&s| self.call_shard(s, shard_request::Body::Abort(abort.clone()))),
            )
            .await;
            glommio::timer::sleep(backoff.mul_f64(0.5 + rand::random::<f64>())).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
        Err(error(Code::Unavailable, "etcdserver: request timed out"))
    }

    /// One request to shard `shard`: this one directly, others over TCP.
    async fn call_shard(self: &Rc<Self>, shard: u32, body: shard_request::Body) -> Body {
        if shard == self.id {
            return match body {
                shard_request::Body::Prepare(p) => self.propose_prepare(p).await,
                shard_request::Body::Abort(a) => self.propose(Op::Abort(a), Some(0)).await,
                shard_request::Body::Commit(c) => {
                    let rev = (c.revision != 0).then_some(c.revision);
                    self.propose(Op::Commit(c), rev).await
                }
                _ => error(Code::Internal, "unsupported local call"),
            };
        }
        let Some(addr) = self
            .topology
            .addrs
            .get()
            .and_then(|a| a.get(shard as usize).cloned())
        else {
            return error(Code::Unavailable, "shard addresses unknown");
        };
        let req = ShardRequest {
            id: 1,
            body: Some(body),
        };
        match crate::net::call(&addr, &req).await {
            Ok(resp) => resp
                .body
                .unwrap_or_else(|| error(Code::Internal, "empty response")),
            Err(e) => error(Code::Unavailable, format!("shard {shard}: {e}")),
        }
    }

    /// Answers one request of the shard protocol (not a single-shard write,
    /// which goes through [`Shard::submit_write`], nor a watch message,
    /// which belongs to its connection).
    pub async fn handle(self: &Rc<Self>, req: shard_request::Body) -> Body {
        use shard_request::Body as R;
        match req {
            R::Topology(_) => Body::Topology(TopologyResponse {
                shard_count: self.topology.shard_count,
                shard_id: self.id,
                shard_addrs: self.topology.addrs.get().cloned().unwrap_or_default(),
                cluster_id: self.topology.cluster_id,
                member_id: self.topology.member_id,
                engine: self.topology.engine.clone(),
                member_name: self.topology.member_name.clone(),
                history_id: self.topology.history_id,
            }),
            R::CurrentRevision(_) => Body::CurrentRevision(CurrentRevisionResponse {
                revision: self.oracle.current(),
                raft_term: self.term(),
                history_id: self.topology.history_id,
                compacted_revision: self.state.borrow().mvcc().compacted_revision(),
            }),
            R::Range(r) => self.range(r).await,
            // Queued without a task of their own: `submit_write`.
            R::Put(_) | R::DeleteRange(_) | R::Txn(_) => error(
                Code::InvalidArgument,
                "single-shard writes are submitted per connection",
            ),
            R::TxnEvaluate(e) => {
                let t = e.txn.unwrap_or_default();
                match self.read_at(e.revision).await {
                    Err(b) => b,
                    Ok(rev) => {
                        let owns = self.owns_fn();
                        let state = self.state.borrow();
                        match state.mvcc().evaluate_compares(&t, rev, &owns) {
                            Ok(outcomes) => Body::TxnEvaluate(TxnEvaluateResponse {
                                outcomes,
                                compacted_revision: state.mvcc().compacted_revision(),
                            }),
                            Err(e) => mvcc_error(e).unwrap_or_else(internal),
                        }
                    }
                }
            }
            R::TxnRead(r) => {
                let t = r.txn.unwrap_or_default();
                if txn::may_write(&t) {
                    return error(Code::InvalidArgument, "txn_read carries writes");
                }
                match self.read_at(r.revision).await {
                    Err(b) => b,
                    Ok(rev) => {
                        let owns = self.owns_fn();
                        let state = self.state.borrow();
                        match state.mvcc().txn_read(&t, &r.path, rev, &owns) {
                            Ok(mut resp) => {
                                resp.header = self.header(None);
                                Body::TxnRead(TxnReadResponse { txn: Some(resp) })
                            }
                            Err(e) => mvcc_error(e).unwrap_or_else(internal),
                        }
                    }
                }
            }
            R::Prepare(p) => self.propose_prepare(p).await,
            R::Commit(c) => {
                let revision = if c.revision == 0 {
                    None
                } else {
                    Some(c.revision)
                };
                self.propose(Op::Commit(c), revision).await
            }
            R::Abort(a) => self.propose(Op::Abort(a), Some(0)).await,
            R::Resolve(r) => Body::Resolve(self.resolve(&r.txn_id).await),
            R::Compact(CompactRequest { revision }) => {
                if revision > self.oracle.current() {
                    return error(
                        Code::FutureRevision,
                        "etcdserver: mvcc: required revision is a future revision",
                    );
                }
                self.propose(Op::Compact(CompactRequest { revision }), Some(0))
                    .await
            }
            // A new grant of an id whose revocation is still being applied
            // waits for it (the gateway retries CONFLICT): registered now,
            // its deadline would go with the old grant's revocation.
            R::LeaseRegister(r) if r.home && self.revoking.borrow().contains(&r.id) => {
                error(Code::Conflict, "lease revocation under way")
            }
            R::LeaseRegister(r) => self.propose(Op::LeaseRegister(r), Some(0)).await,
            R::LeaseRevoke(r) => {
                let known = self
                    .state
                    .borrow()
                    .leases()
                    .get(&r.id)
                    .is_some_and(|l| l.home);
                if !known {
                    return lease_not_found();
                }
                match self.revoke_leases(vec![r.id]).await {
                    Ok(revision) => Body::LeaseRevoke(LeaseRevokeResponse { revision }),
                    Err(e) => e,
                }
            }
            R::LeaseKeepAlive(k) => {
                let ttl = self
                    .state
                    .borrow()
                    .leases()
                    .get(&k.id)
                    .filter(|l| l.home)
                    .map(|l| l.ttl);
                let (revision, raft_term) = (self.oracle.current(), self.term());
                let ttl = match ttl {
                    Some(ttl) if !self.revoking.borrow().contains(&k.id) => {
                        self.lease_deadlines
                            .borrow_mut()
                            .insert(k.id, Instant::now() + ttl_duration(ttl));
                        ttl
                    }
                    _ => 0,
                };
                Body::LeaseKeepAlive(LeaseKeepAliveResponse {
                    ttl,
                    revision,
                    raft_term,
                })
            }
            R::LeaseTimeToLive(t) => {
                let state = self.state.borrow();
                match state.leases().get(&t.id).filter(|l| l.home) {
                    Some(l) => {
                        let left = self
                            .lease_deadlines
                            .borrow()
                            .get(&t.id)
                            .map(|d| d.saturating_duration_since(Instant::now()))
                            .unwrap_or_default();
                        Body::LeaseTimeToLive(LeaseTimeToLiveResponse {
                            found: true,
                            // etcd rounds the remaining time down to seconds.
                            ttl: left.as_secs() as i64,
                            granted_ttl: l.ttl,
                        })
                    }
                    None => Body::LeaseTimeToLive(LeaseTimeToLiveResponse::default()),
                }
            }
            R::LeaseKeys(k) => Body::LeaseKeys(LeaseKeysResponse {
                keys: self.state.borrow().lease_keys(k.id),
            }),
            R::LeaseList(_) => {
                let deadlines = self.lease_deadlines.borrow();
                let now = Instant::now();
                let (ids, remaining_micros) = self
                    .state
                    .borrow()
                    .leases()
                    .values()
                    .filter(|l| l.home)
                    .map(|l| {
                        // No deadline yet: last, as etcd's `Remaining`
                        // of a lease without an expiry is the largest.
                        let left = deadlines.get(&l.id).map_or(u64::MAX, |d| {
                            d.saturating_duration_since(now).as_micros() as u64
                        });
                        (l.id, left)
                    })
                    .unzip();
                Body::LeaseList(LeaseListResponse {
                    ids,
                    remaining_micros,
                })
            }
            R::WatchSubscribe(_) | R::WatchAck(_) | R::WatchProgress(_) | R::WatchCancel(_) => {
                error(
                    Code::InvalidArgument,
                    "watch requests are handled per connection",
                )
            }
            R::Status(_) => {
                let node = self.node.borrow();
                let state = self.state.borrow();
                Body::Status(StatusResponse {
                    raft_index: node.store().last_index().unwrap_or(0),
                    raft_term: node.raft.term,
                    raft_applied_index: state.applied_index(),
                    db_size: state.engine().size_bytes() as i64,
                    leader: self.topology.member_id,
                    revision: self.oracle.current(),
                    compact_revision: state.mvcc().compacted_revision(),
                })
            }
        }
    }

    /// Maps a requested read revision (0 = current) to the revision to read
    /// at, after checking it and waiting until it is resolved here.
    async fn read_at(&self, requested: i64) -> Result<i64, Body> {
        let current = self.oracle.current();
        let rev = if requested <= 0 { current } else { requested };
        if rev > current {
            return Err(error(
                Code::FutureRevision,
                "etcdserver: mvcc: required revision is a future revision",
            ));
        }
        self.wait_resolved(rev).await;
        Ok(rev.max(1))
    }

    /// A range over this shard's keys.
    async fn range(&self, r: RangeRequest) -> Body {
        let requested = r.revision;
        let rev = match self.read_at(requested).await {
            Ok(rev) => rev,
            Err(b) => return b,
        };
        // No ownership filter: this shard's store holds only keys it owns
        // (every write is filtered by ownership, and a data directory keeps
        // its shard count), so hashing each key of a span again would change
        // nothing — and it cost a tenth of the shard's CPU on prefix lists.
        let result = self.state.borrow().mvcc().range(&r, rev, &|_| true);
        match result {
            Ok(mut resp) => {
                // Revision 0 reads report their snapshot revision; explicit
                // ones the current revision, as etcd does.
                let header_rev = if requested <= 0 {
                    rev
                } else {
                    self.oracle.current()
                };
                resp.header = self.header(Some(ResponseHeader {
                    revision: header_rev,
                    ..Default::default()
                }));
                Body::Range(resp)
            }
            Err(e) => mvcc_error(e).unwrap_or_else(internal),
        }
    }
}

/// Home leases revoked by one expiry transaction at most.
pub const LEASE_REVOKE_BATCH: usize = 100;

fn ttl_duration(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

fn lease_not_found() -> Body {
    error(Code::LeaseNotFound, "etcdserver: requested lease not found")
}

fn internal(e: StateError) -> Body {
    error(Code::Internal, e.to_string())
}

async fn futures_lite_yield() {
    glommio::yield_if_needed().await;
}

/// Takes the command proposed as the entry at `index` in `term` from
/// `proposed` (index, term, command; in log order), if it is there.
/// Proposals at lower indexes are dropped: the log moved past them, so a
/// later leader's entries replaced them (and are decoded, if they commit).
fn take_proposed(
    proposed: &mut VecDeque<(u64, u64, RaftCommand)>,
    index: u64,
    term: u64,
) -> Option<RaftCommand> {
    while let Some(&(at, in_term, _)) = proposed.front() {
        if at > index {
            return None;
        }
        let (_, _, cmd) = proposed.pop_front()?;
        if at == index && in_term == term {
            return Some(cmd);
        }
    }
    None
}

fn decode_entry(e: &raft::eraftpb::Entry) -> Option<RaftCommand> {
    if e.data.is_empty() {
        return None;
    }
    RaftCommand::decode(&e.data[..]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(proposal_id: u64) -> RaftCommand {
        RaftCommand {
            proposal_id,
            ..Default::default()
        }
    }

    fn ids(proposed: &VecDeque<(u64, u64, RaftCommand)>) -> Vec<u64> {
        proposed.iter().map(|(_, _, c)| c.proposal_id).collect()
    }

    #[test]
    fn an_applied_proposal_is_taken_as_proposed() {
        let mut proposed = VecDeque::from([(5, 2, cmd(50)), (6, 2, cmd(60))]);
        assert_eq!(take_proposed(&mut proposed, 5, 2), Some(cmd(50)));
        assert_eq!(ids(&proposed), [60]);
        assert_eq!(take_proposed(&mut proposed, 6, 2), Some(cmd(60)));
        assert!(proposed.is_empty());
    }

    #[test]
    fn an_entry_before_the_first_proposal_leaves_them_all() {
        // The new leader's empty entry, or a follower's entries.
        let mut proposed = VecDeque::from([(5, 2, cmd(50))]);
        assert_eq!(take_proposed(&mut proposed, 4, 2), None);
        assert_eq!(ids(&proposed), [50]);
    }

    #[test]
    fn a_replaced_proposal_is_dropped_and_its_entry_decoded() {
        // Entries 5 and 6 were proposed in term 2; another leader's term-3
        // entries took their places. Nothing of term 2 is used for them.
        let mut proposed = VecDeque::from([(5, 2, cmd(50)), (6, 2, cmd(60)), (9, 4, cmd(90))]);
        assert_eq!(take_proposed(&mut proposed, 5, 3), None);
        assert_eq!(ids(&proposed), [60, 90]);
        assert_eq!(take_proposed(&mut proposed, 7, 3), None);
        assert_eq!(ids(&proposed), [90]);
        assert_eq!(take_proposed(&mut proposed, 9, 4), Some(cmd(90)));
    }
}
