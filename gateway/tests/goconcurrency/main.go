// goconcurrency: etcd's own recipes (go.etcd.io/etcd/clientv3/concurrency:
// Session, Mutex, Election, STM), unchanged, against one MetaStore
// endpoint. Run by gateway/tests/go_concurrency.rs on both storage engines.
//
//	goconcurrency http://127.0.0.1:PORT [SCENARIO...]
//
// runs every scenario, or only the ones named (to debug one of them).
// Every scenario checks what it sees and prints one line, "ok <name>: ...";
// the first failed check prints "FAIL <name>: ..." to stderr and exits 1.
// A nil header where the recipes dereference one (e.g. an op response of a
// Txn without its header) makes the library itself panic: exit status 2
// and a Go stack trace on stderr.
//
// Lines "spread <group> <key>..." name keys that must live on different
// shards for the scenario to mean what it says; the Rust test checks them
// with the real router (metastore_proto::router).
//
// Waiting is on channels, watches and the library's own blocking calls,
// never on sleeps; every scenario runs under its own deadline.
//
// Built in GOPATH mode against Debian's packaged client library
// (golang-etcd-server-dev, etcd 3.4.23); see build.sh.
package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/concurrency"
	pb "go.etcd.io/etcd/etcdserver/etcdserverpb"
	"go.etcd.io/etcd/mvcc/mvccpb"
	"golang.org/x/sync/errgroup"
)

// scenarioTimeout bounds one scenario; each takes a few seconds.
const scenarioTimeout = 30 * time.Second

// sessionTTL is the lease TTL of every session: long enough that no lease
// expires during a scenario (the keep-alives renew it), short enough that
// a crashed run's leases go away soon.
const sessionTTL = 10

var endpoint string

func main() {
	if len(os.Args) < 2 || !strings.HasPrefix(os.Args[1], "http://") {
		fmt.Fprintln(os.Stderr, "usage: goconcurrency http://HOST:PORT [SCENARIO...]")
		os.Exit(64)
	}
	endpoint = os.Args[1]
	only := map[string]bool{}
	for _, name := range os.Args[2:] {
		only[name] = true
	}
	scenarios := []struct {
		name string
		run  func(ctx context.Context) (string, error)
	}{
		// The plain Txn check first: when it fails, the recipes would too,
		// with a less telling message.
		{"txn-op-headers", txnOpHeaders},
		{"mutex", mutexContention},
		{"mutex-handover", mutexHandoverOnClose},
		{"election", election},
		{"stm-isolation", stmIsolation},
		{"stm-transfers", stmTransfers},
	}
	for name := range only {
		known := false
		for _, sc := range scenarios {
			known = known || sc.name == name
		}
		if !known {
			fmt.Fprintf(os.Stderr, "unknown scenario %q\n", name)
			os.Exit(64)
		}
	}
	for _, sc := range scenarios {
		if len(only) != 0 && !only[sc.name] {
			continue
		}
		started := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), scenarioTimeout)
		detail, err := sc.run(ctx)
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "FAIL %s: %v\n", sc.name, err)
			os.Exit(1)
		}
		fmt.Printf("ok %s: %s (%.2f s)\n", sc.name, detail, time.Since(started).Seconds())
	}
}

// newClient dials the endpoint: one client (one gRPC connection) per
// simulated process, as separate lock holders or candidates would have.
func newClient() (*clientv3.Client, error) {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{endpoint},
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", endpoint, err)
	}
	return cli, nil
}

// newClients dials n clients; close them with closeAll.
func newClients(n int) ([]*clientv3.Client, error) {
	clis := make([]*clientv3.Client, 0, n)
	for i := 0; i < n; i++ {
		cli, err := newClient()
		if err != nil {
			closeAll(clis)
			return nil, err
		}
		clis = append(clis, cli)
	}
	return clis, nil
}

func closeAll(clis []*clientv3.Client) {
	for _, c := range clis {
		c.Close()
	}
}

// spread announces a group of keys that must span the shards.
func spread(group string, keys ...string) {
	fmt.Printf("spread %s %s\n", group, strings.Join(keys, " "))
}

func getInt(ctx context.Context, cli *clientv3.Client, key string) (int64, error) {
	resp, err := cli.Get(ctx, key)
	if err != nil {
		return 0, fmt.Errorf("get %s: %w", key, err)
	}
	if len(resp.Kvs) != 1 {
		return 0, fmt.Errorf("get %s: %d kvs, want 1", key, len(resp.Kvs))
	}
	n, err := strconv.ParseInt(string(resp.Kvs[0].Value), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("get %s: value %q is not a number", key, resp.Kvs[0].Value)
	}
	return n, nil
}

// ---------------------------------------------------------------------------
// 4 (run first). What the STM relies on: a Txn's op responses carry headers.
// ---------------------------------------------------------------------------

// txnOpHeaders checks the op-level ResponseHeader of Txn responses on all
// three of the gateway's txn paths (one shard; several shards read-only;
// several shards with writes), and that the revision an op header reports
// can be read at.
//
// The STM takes its snapshot revision from
// Responses[0].GetResponseRange().Header.Revision (stm.go: stmSerializable.Get
// and readSet.first), so a missing op header is a nil dereference inside
// the library. In etcd 3.4 (etcdserver/apply.go, Range and Txn) every op
// response has a header; a Range op's header revision is the store's
// current revision as the txn sees it: for a read-only txn the same as the
// txn's header revision; a Put op's is the revision the txn writes at.
func txnOpHeaders(ctx context.Context) (string, error) {
	cli, err := newClient()
	if err != nil {
		return "", err
	}
	defer cli.Close()
	const ka, kb = "/goconc/txn/a", "/goconc/txn/b"
	spread("txn-op-headers", ka, kb)
	if _, err := cli.Put(ctx, ka, "a0"); err != nil {
		return "", fmt.Errorf("put %s: %w", ka, err)
	}
	if _, err := cli.Put(ctx, kb, "b0"); err != nil {
		return "", fmt.Errorf("put %s: %w", kb, err)
	}

	// Read-only txns, on one shard and on both: every Range op's header
	// revision equals the txn's.
	var readRev int64
	for _, keys := range [][]string{{ka}, {ka, kb}} {
		ops := make([]clientv3.Op, len(keys))
		for i, k := range keys {
			ops[i] = clientv3.OpGet(k)
		}
		resp, err := cli.Txn(ctx).Then(ops...).Commit()
		if err != nil {
			return "", fmt.Errorf("txn get %v: %w", keys, err)
		}
		if resp.Header == nil || resp.Header.Revision <= 0 {
			return "", fmt.Errorf("txn get %v: txn header %v, want a revision > 0", keys, resp.Header)
		}
		if len(resp.Responses) != len(keys) {
			return "", fmt.Errorf("txn get %v: %d op responses, want %d", keys, len(resp.Responses), len(keys))
		}
		for i, k := range keys {
			rr := resp.Responses[i].GetResponseRange()
			if rr == nil {
				return "", fmt.Errorf("txn get %v: op %d is %T, want a range response", keys, i, resp.Responses[i].Response)
			}
			if rr.Header == nil {
				return "", fmt.Errorf("txn get %v: Responses[%d].GetResponseRange().Header is nil (etcd sets it; the STM dereferences it)", keys, i)
			}
			if rr.Header.Revision != resp.Header.Revision {
				return "", fmt.Errorf("txn get %v: op %d header revision %d, txn header revision %d; etcd 3.4 gives a read-only txn's range ops the txn's revision",
					keys, i, rr.Header.Revision, resp.Header.Revision)
			}
			if len(rr.Kvs) != 1 || string(rr.Kvs[0].Key) != k {
				return "", fmt.Errorf("txn get %v: op %d returned %v, want key %s", keys, i, rr.Kvs, k)
			}
			if rr.Kvs[0].ModRevision > rr.Header.Revision {
				return "", fmt.Errorf("txn get %v: op %d: key mod revision %d above its header revision %d", keys, i, rr.Kvs[0].ModRevision, rr.Header.Revision)
			}
		}
		readRev = resp.Responses[0].GetResponseRange().Header.Revision
	}

	// A write in between, so that reading at readRev really is a read of
	// the past; then read both keys at readRev the way stmSerializable
	// does (WithRev + WithSerializable, here also on plain Gets).
	if _, err := cli.Put(ctx, ka, "a1"); err != nil {
		return "", fmt.Errorf("put %s: %w", ka, err)
	}
	for _, k := range []string{ka, kb} {
		want := map[string]string{ka: "a0", kb: "b0"}[k]
		for _, opts := range [][]clientv3.OpOption{
			{clientv3.WithRev(readRev)},
			{clientv3.WithRev(readRev), clientv3.WithSerializable()},
		} {
			resp, err := cli.Get(ctx, k, opts...)
			if err != nil {
				return "", fmt.Errorf("get %s at the op header's revision %d: %w", k, readRev, err)
			}
			if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != want {
				return "", fmt.Errorf("get %s at revision %d: %v, want value %q", k, readRev, resp.Kvs, want)
			}
		}
		// The same read inside a Txn, the STM's own path.
		tresp, err := cli.Txn(ctx).Then(clientv3.OpGet(k, clientv3.WithRev(readRev), clientv3.WithSerializable())).Commit()
		if err != nil {
			return "", fmt.Errorf("txn get %s at revision %d: %w", k, readRev, err)
		}
		rr := tresp.Responses[0].GetResponseRange()
		if rr.Header == nil || rr.Header.Revision <= 0 {
			return "", fmt.Errorf("txn get %s at revision %d: op header %v", k, readRev, rr.Header)
		}
		if len(rr.Kvs) != 1 || string(rr.Kvs[0].Value) != want {
			return "", fmt.Errorf("txn get %s at revision %d: %v, want value %q", k, readRev, rr.Kvs, want)
		}
	}

	// A txn writing on both shards (the gateway's two-phase commit), with
	// a compare, puts and the gets the STM's commit puts in its Else
	// branch: both branches' op responses carry headers.
	for _, succeed := range []bool{true, false} {
		want := "b0"
		if !succeed {
			want = "nope"
		}
		resp, err := cli.Txn(ctx).
			If(clientv3.Compare(clientv3.Value(kb), "=", want)).
			Then(clientv3.OpPut(ka, "a2"), clientv3.OpPut(kb, "b2")).
			Else(clientv3.OpGet(ka), clientv3.OpGet(kb)).
			Commit()
		if err != nil {
			return "", fmt.Errorf("2-shard txn (then=%v): %w", succeed, err)
		}
		if resp.Header == nil || resp.Header.Revision <= 0 {
			return "", fmt.Errorf("2-shard txn: txn header %v", resp.Header)
		}
		if resp.Succeeded != succeed {
			return "", fmt.Errorf("2-shard txn: succeeded=%v, want %v", resp.Succeeded, succeed)
		}
		for i, op := range resp.Responses {
			var hdrRev int64
			switch r := op.Response.(type) {
			case *pb.ResponseOp_ResponsePut:
				if r.ResponsePut.Header == nil {
					return "", fmt.Errorf("2-shard txn: put op %d has no header", i)
				}
				hdrRev = r.ResponsePut.Header.Revision
			case *pb.ResponseOp_ResponseRange:
				if r.ResponseRange.Header == nil {
					return "", fmt.Errorf("2-shard txn (else branch): range op %d has no header", i)
				}
				hdrRev = r.ResponseRange.Header.Revision
			default:
				return "", fmt.Errorf("2-shard txn: op %d is %T", i, op.Response)
			}
			// A Put op's revision is the one the txn writes at (etcd:
			// storeTxnWrite.Put returns beginRev+1); the Else branch is
			// read-only, so its ranges report the txn's revision too.
			if hdrRev != resp.Header.Revision {
				return "", fmt.Errorf("2-shard txn (then=%v): op %d header revision %d, txn revision %d",
					succeed, i, hdrRev, resp.Header.Revision)
			}
		}
	}
	return fmt.Sprintf("op headers on 1-shard, 2-shard read-only and 2-shard write txns; read at op revision %d", readRev), nil
}

// ---------------------------------------------------------------------------
// 1. Mutex
// ---------------------------------------------------------------------------

// mutexContention: 6 workers, each its own client and session, take one
// Mutex 15 times each and increment a counter with a plain Get + Put in
// the critical section. A lost update or an overlap means the lock let two
// holders in.
func mutexContention(ctx context.Context) (string, error) {
	const workers, rounds = 6, 15
	const lockPfx, counterKey = "/goconc/mutex/lock", "/goconc/mutex/counter"
	clis, err := newClients(workers + 1)
	if err != nil {
		return "", err
	}
	defer closeAll(clis)
	admin := clis[workers]
	if _, err := admin.Put(ctx, counterKey, "0"); err != nil {
		return "", fmt.Errorf("put %s: %w", counterKey, err)
	}

	var holders int32 // goroutines inside the critical section
	var done int64    // increments completed, counted in-process
	// errgroup cancels gctx on the first error, so a failing worker (which
	// may still hold the lock) never leaves the others waiting until the
	// deadline.
	g, gctx := errgroup.WithContext(ctx)
	for w := 0; w < workers; w++ {
		cli := clis[w]
		w := w
		g.Go(func() error {
			// WithContext: the session's keep-alive stops with the
			// scenario, and so does Close's revoke (a session closed
			// after its context ended leaves its lease to expire).
			sess, err := concurrency.NewSession(cli, concurrency.WithTTL(sessionTTL), concurrency.WithContext(gctx))
			if err != nil {
				return fmt.Errorf("worker %d: new session: %w", w, err)
			}
			defer sess.Close()
			m := concurrency.NewMutex(sess, lockPfx)
			for i := 0; i < rounds; i++ {
				if err := m.Lock(gctx); err != nil {
					return fmt.Errorf("worker %d round %d: lock: %w", w, i, err)
				}
				if n := atomic.AddInt32(&holders, 1); n != 1 {
					return fmt.Errorf("worker %d round %d: %d holders of the lock at once", w, i, n)
				}
				if h := m.Header(); h == nil || h.Revision <= 0 {
					return fmt.Errorf("worker %d: Mutex.Header() after Lock is %v", w, h)
				}
				v, err := getInt(gctx, cli, counterKey)
				if err != nil {
					return fmt.Errorf("worker %d: %w", w, err)
				}
				// The holder must see every increment before its own: a
				// smaller value is a lost update in the making.
				if want := atomic.LoadInt64(&done); v != want {
					return fmt.Errorf("worker %d round %d: counter reads %d inside the lock, %d increments done", w, i, v, want)
				}
				if _, err := cli.Put(gctx, counterKey, strconv.FormatInt(v+1, 10)); err != nil {
					return fmt.Errorf("worker %d: put counter: %w", w, err)
				}
				atomic.AddInt64(&done, 1)
				// IsOwner() is the fencing compare etcd documents for
				// writes under the lock (create revision of our key ==
				// the revision Lock recorded).
				own, err := cli.Txn(gctx).If(m.IsOwner()).Commit()
				if err != nil {
					return fmt.Errorf("worker %d: txn If(IsOwner): %w", w, err)
				}
				if !own.Succeeded {
					return fmt.Errorf("worker %d round %d: If(m.IsOwner()) failed while holding the lock (key %s)", w, i, m.Key())
				}
				atomic.AddInt32(&holders, -1)
				if err := m.Unlock(gctx); err != nil {
					return fmt.Errorf("worker %d round %d: unlock: %w", w, i, err)
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return "", err
	}
	v, err := getInt(ctx, admin, counterKey)
	if err != nil {
		return "", err
	}
	if v != workers*rounds {
		return "", fmt.Errorf("counter is %d after %d locked increments", v, workers*rounds)
	}
	// Every holder unlocked and closed its session: no lock key is left.
	left, err := admin.Get(ctx, lockPfx+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return "", fmt.Errorf("count lock keys: %w", err)
	}
	if left.Count != 0 {
		return "", fmt.Errorf("%d lock keys left under %s/", left.Count, lockPfx)
	}
	return fmt.Sprintf("%d workers x %d rounds, counter %d, never two holders", workers, rounds, v), nil
}

// mutexHandoverOnClose: A holds the lock, B waits on it; A's session is
// closed (Session.Close revokes its lease, which deletes A's lock key) and
// B's Lock returns, at a revision where A's key is gone.
func mutexHandoverOnClose(ctx context.Context) (string, error) {
	const lockPfx = "/goconc/mutex/handover"
	clis, err := newClients(2)
	if err != nil {
		return "", err
	}
	defer closeAll(clis)
	cliA, cliB := clis[0], clis[1]
	sessA, err := concurrency.NewSession(cliA, concurrency.WithTTL(sessionTTL), concurrency.WithContext(ctx))
	if err != nil {
		return "", fmt.Errorf("session A: %w", err)
	}
	sessB, err := concurrency.NewSession(cliB, concurrency.WithTTL(sessionTTL), concurrency.WithContext(ctx))
	if err != nil {
		return "", fmt.Errorf("session B: %w", err)
	}
	defer sessB.Close()
	mA := concurrency.NewMutex(sessA, lockPfx)
	mB := concurrency.NewMutex(sessB, lockPfx)
	if err := mA.Lock(ctx); err != nil {
		return "", fmt.Errorf("A: lock: %w", err)
	}
	keyA := mA.Key()

	// Mutex keys are "<pfx>/<lease id in hex>"; B's appears when B joins
	// the queue. Watch for it from now on, before B starts.
	keyB := fmt.Sprintf("%s/%x", lockPfx, sessB.Lease())
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	wch := cliA.Watch(wctx, keyB, clientv3.WithRev(mA.Header().Revision+1))

	var closing int32 // set just before A's session is closed
	type lockResult struct {
		err          error
		beforeClosed bool
	}
	acquired := make(chan lockResult, 1)
	go func() {
		err := mB.Lock(ctx)
		acquired <- lockResult{err, atomic.LoadInt32(&closing) == 0}
	}()

	// Wait (on the watch) until B's key is in the queue.
	queued := false
	for !queued {
		select {
		case wr, ok := <-wch:
			if !ok || wr.Err() != nil {
				return "", fmt.Errorf("watch %s: closed (%v) before B queued", keyB, wr.Err())
			}
			for _, ev := range wr.Events {
				if ev.Type == mvccpb.PUT {
					queued = true
				}
			}
		case r := <-acquired:
			return "", fmt.Errorf("B's Lock returned (err %v) while A holds the lock", r.err)
		case <-ctx.Done():
			return "", fmt.Errorf("B's lock key %s never appeared: %w", keyB, ctx.Err())
		}
	}
	wcancel()
	// B is queued behind A and must still be waiting.
	select {
	case r := <-acquired:
		return "", fmt.Errorf("B's Lock returned (err %v) while A holds the lock", r.err)
	default:
	}

	atomic.StoreInt32(&closing, 1)
	if err := sessA.Close(); err != nil {
		return "", fmt.Errorf("A: session close (lease revoke): %w", err)
	}
	var r lockResult
	select {
	case r = <-acquired:
	case <-ctx.Done():
		return "", fmt.Errorf("B's Lock did not return after A's session was closed: %w", ctx.Err())
	}
	if r.err != nil {
		return "", fmt.Errorf("B: lock: %w", r.err)
	}
	if r.beforeClosed {
		return "", errors.New("B's Lock returned before A's session was closed")
	}
	if mB.Key() != keyB {
		return "", fmt.Errorf("B holds key %q, want %q", mB.Key(), keyB)
	}
	// At the revision B's Lock saw (Mutex.Header), A's key no longer
	// exists: the revoke deleted it.
	hdr := mB.Header()
	if hdr == nil {
		return "", errors.New("B: Mutex.Header() is nil after Lock")
	}
	atB, err := cliB.Get(ctx, keyA, clientv3.WithRev(hdr.Revision))
	if err != nil {
		return "", fmt.Errorf("get %s at revision %d: %w", keyA, hdr.Revision, err)
	}
	if len(atB.Kvs) != 0 {
		return "", fmt.Errorf("at B's lock revision %d, A's key %s still exists", hdr.Revision, keyA)
	}
	// The oldest key of the lock prefix is B's, and the fencing compare holds.
	owner, err := cliB.Get(ctx, lockPfx+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("get lock owner: %w", err)
	}
	if len(owner.Kvs) != 1 || string(owner.Kvs[0].Key) != keyB {
		return "", fmt.Errorf("lock owner is %v, want %s", owner.Kvs, keyB)
	}
	own, err := cliB.Txn(ctx).If(mB.IsOwner()).Commit()
	if err != nil {
		return "", fmt.Errorf("txn If(IsOwner): %w", err)
	}
	if !own.Succeeded {
		return "", errors.New("B: If(m.IsOwner()) failed after acquiring")
	}
	if err := mB.Unlock(ctx); err != nil {
		return "", fmt.Errorf("B: unlock: %w", err)
	}
	return fmt.Sprintf("waiter acquired after the holder's session closed (revision %d)", hdr.Revision), nil
}

// ---------------------------------------------------------------------------
// 2. Election
// ---------------------------------------------------------------------------

// election: 3 candidates (own client and session each) campaign; an
// observer watches. One leader at a time; Leader and Observe agree with it;
// Proclaim changes what they report; Resign hands over to the next.
func election(ctx context.Context) (string, error) {
	const pfx, candidates = "/goconc/election/e", 3
	clis, err := newClients(candidates + 1)
	if err != nil {
		return "", err
	}
	defer closeAll(clis)

	obsSess, err := concurrency.NewSession(clis[candidates], concurrency.WithTTL(sessionTTL), concurrency.WithContext(ctx))
	if err != nil {
		return "", fmt.Errorf("observer session: %w", err)
	}
	defer obsSess.Close()
	observer := concurrency.NewElection(obsSess, pfx)
	if _, err := observer.Leader(ctx); err != concurrency.ErrElectionNoLeader {
		return "", fmt.Errorf("Leader before any campaign: err %v, want ErrElectionNoLeader", err)
	}
	// Observe before anyone campaigns: it waits (on a prefix watch) for
	// the first put, which is the first leader's.
	octx, ocancel := context.WithCancel(ctx)
	defer ocancel()
	// Observe "will not necessarily fetch all historical leader updates"
	// (only the latest value is guaranteed), so each change below waits for
	// its report before the next change is made; then every report is
	// exactly predictable.
	observed := observer.Observe(octx)
	nextObserved := func(want string) error {
		select {
		case resp, ok := <-observed:
			if !ok {
				return fmt.Errorf("Observe channel closed, waiting for %q", want)
			}
			if len(resp.Kvs) != 1 {
				return fmt.Errorf("Observe sent %d kvs", len(resp.Kvs))
			}
			if got := string(resp.Kvs[0].Value); got != want {
				return fmt.Errorf("Observe reported %q, want %q", got, want)
			}
			if resp.Header == nil || resp.Header.Revision < resp.Kvs[0].ModRevision {
				return fmt.Errorf("Observe's header %v is behind its kv (mod revision %d)", resp.Header, resp.Kvs[0].ModRevision)
			}
			return nil
		case <-ctx.Done():
			return fmt.Errorf("Observe never reported %q: %w", want, ctx.Err())
		}
	}

	elections := make([]*concurrency.Election, candidates)
	sessions := make([]*concurrency.Session, candidates)
	for i := range elections {
		s, err := concurrency.NewSession(clis[i], concurrency.WithTTL(sessionTTL), concurrency.WithContext(ctx))
		if err != nil {
			return "", fmt.Errorf("candidate %d session: %w", i, err)
		}
		defer s.Close()
		sessions[i] = s
		elections[i] = concurrency.NewElection(s, pfx)
	}
	value := func(i int) string { return fmt.Sprintf("candidate-%d", i) }

	var leaders int32 // candidates whose Campaign returned and who have not resigned
	won := make(chan int, candidates)
	errc := make(chan error, candidates)
	for i := range elections {
		i := i
		go func() {
			// Campaign blocks until this candidate is the leader.
			if err := elections[i].Campaign(ctx, value(i)); err != nil {
				errc <- fmt.Errorf("candidate %d: campaign: %w", i, err)
				return
			}
			if n := atomic.AddInt32(&leaders, 1); n != 1 {
				errc <- fmt.Errorf("candidate %d won while %d others lead", i, n-1)
				return
			}
			won <- i
		}()
	}
	nextWinner := func() (int, error) {
		select {
		case i := <-won:
			return i, nil
		case err := <-errc:
			return -1, err
		case <-ctx.Done():
			return -1, fmt.Errorf("no candidate won: %w", ctx.Err())
		}
	}
	checkLeader := func(i int, want string) error {
		resp, err := observer.Leader(ctx)
		if err != nil {
			return fmt.Errorf("Leader: %w", err)
		}
		kv := resp.Kvs[0]
		if string(kv.Key) != elections[i].Key() || kv.CreateRevision != elections[i].Rev() {
			return fmt.Errorf("Leader is %s (created %d), winner %d has %s (created %d)",
				kv.Key, kv.CreateRevision, i, elections[i].Key(), elections[i].Rev())
		}
		if string(kv.Value) != want {
			return fmt.Errorf("Leader value %q, want %q", kv.Value, want)
		}
		if clientv3.LeaseID(kv.Lease) != sessions[i].Lease() {
			return fmt.Errorf("leader key's lease %x, winner's session lease %x", kv.Lease, sessions[i].Lease())
		}
		return nil
	}

	var order []string
	prev := -1
	for round := 0; round < candidates; round++ {
		w, err := nextWinner()
		if err != nil {
			return "", err
		}
		if w == prev {
			return "", fmt.Errorf("candidate %d won twice", w)
		}
		if h := elections[w].Header(); h == nil || h.Revision <= 0 {
			return "", fmt.Errorf("winner %d: Election.Header() %v", w, h)
		}
		if err := checkLeader(w, value(w)); err != nil {
			return "", fmt.Errorf("round %d: %w", round, err)
		}
		if err := nextObserved(value(w)); err != nil {
			return "", fmt.Errorf("round %d: %w", round, err)
		}
		// Proclaim: a new value under the same leadership.
		proclaimed := value(w) + "-proclaimed"
		if err := elections[w].Proclaim(ctx, proclaimed); err != nil {
			return "", fmt.Errorf("candidate %d: proclaim: %w", w, err)
		}
		if err := nextObserved(proclaimed); err != nil {
			return "", fmt.Errorf("round %d, after Proclaim: %w", round, err)
		}
		if err := checkLeader(w, proclaimed); err != nil {
			return "", fmt.Errorf("round %d, after Proclaim: %w", round, err)
		}
		// Nobody else has won meanwhile.
		select {
		case i := <-won:
			return "", fmt.Errorf("candidate %d won while %d leads", i, w)
		case err := <-errc:
			return "", err
		default:
		}
		order = append(order, strconv.Itoa(w))
		atomic.AddInt32(&leaders, -1)
		if err := elections[w].Resign(ctx); err != nil {
			return "", fmt.Errorf("candidate %d: resign: %w", w, err)
		}
		prev = w
	}
	// Everyone resigned: no leader, and no candidate is left waiting.
	if _, err := observer.Leader(ctx); err != concurrency.ErrElectionNoLeader {
		return "", fmt.Errorf("Leader after every candidate resigned: err %v, want ErrElectionNoLeader", err)
	}
	ocancel()
	for range observed {
		// Observe closes its channel once its context is cancelled.
	}
	return fmt.Sprintf("leaders in turn: %s; Leader/Observe/Proclaim agreed each time", strings.Join(order, ", ")), nil
}

// ---------------------------------------------------------------------------
// 3. STM
// ---------------------------------------------------------------------------

// isolationLevel runs one STM transaction at one isolation level. (The
// library's option type is unexported, so each level is a closure.)
type isolationLevel struct {
	name string
	run  func(ctx context.Context, cli *clientv3.Client, apply func(concurrency.STM) error) (*clientv3.TxnResponse, error)
}

var isolationLevels = []isolationLevel{
	{"default (SerializableSnapshot)", func(ctx context.Context, cli *clientv3.Client, apply func(concurrency.STM) error) (*clientv3.TxnResponse, error) {
		// WithAbortContext: without it the STM retries on the client's
		// context, which never ends.
		return concurrency.NewSTM(cli, apply, concurrency.WithAbortContext(ctx))
	}},
	{"Serializable", func(ctx context.Context, cli *clientv3.Client, apply func(concurrency.STM) error) (*clientv3.TxnResponse, error) {
		return concurrency.NewSTM(cli, apply, concurrency.WithAbortContext(ctx), concurrency.WithIsolation(concurrency.Serializable))
	}},
	{"RepeatableReads", func(ctx context.Context, cli *clientv3.Client, apply func(concurrency.STM) error) (*clientv3.TxnResponse, error) {
		return concurrency.NewSTM(cli, apply, concurrency.WithAbortContext(ctx), concurrency.WithIsolation(concurrency.RepeatableReads))
	}},
}

func checkCommitted(level string, resp *clientv3.TxnResponse, err error) error {
	if err != nil {
		return fmt.Errorf("%s: NewSTM: %w", level, err)
	}
	if resp == nil || !resp.Succeeded || resp.Header == nil || resp.Header.Revision <= 0 {
		return fmt.Errorf("%s: NewSTM returned %v, want a succeeded txn with a header", level, resp)
	}
	return nil
}

// stmIsolation pins down, deterministically, what each isolation level
// promises, by writing from outside in the middle of a transaction's first
// attempt (keys x and y on different shards, out on y's; the commits are
// two-shard transactions):
//
//   - snapshot reads: x is read, then y is overwritten from outside, then y
//     is read. SerializableSnapshot and Serializable read y at x's
//     revision (WithRev of the first read's op header), see the old y,
//     fail their commit compare and retry, the retry's reads coming from
//     the failed commit's Else branch (stmSerializable's prefetch).
//     RepeatableReads reads y as it is now and commits at once.
//   - write conflicts: out is written from outside after the first read,
//     and the STM writes out without reading it. Only SerializableSnapshot
//     checks writes (ModRevision(out) < first read revision + 1) and retries.
func stmIsolation(ctx context.Context) (string, error) {
	const kx, ky, kout = "/goconc/stm/x", "/goconc/stm/z", "/goconc/stm/result"
	spread("stm-isolation-reads", kx, ky)
	spread("stm-isolation-writes", kx, kout)
	clis, err := newClients(2)
	if err != nil {
		return "", err
	}
	defer closeAll(clis)
	cli, outside := clis[0], clis[1]
	put := func(k, v string) error {
		if _, err := outside.Put(ctx, k, v); err != nil {
			return fmt.Errorf("put %s: %w", k, err)
		}
		return nil
	}
	get := func(k string) (string, error) {
		resp, err := outside.Get(ctx, k)
		if err != nil {
			return "", fmt.Errorf("get %s: %w", k, err)
		}
		if len(resp.Kvs) != 1 {
			return "", fmt.Errorf("get %s: %d kvs", k, len(resp.Kvs))
		}
		return string(resp.Kvs[0].Value), nil
	}

	var summary []string
	for _, lvl := range isolationLevels {
		snapshot := lvl.name != "RepeatableReads"

		// Snapshot reads.
		for _, kv := range [][2]string{{kx, "x0"}, {ky, "y0"}, {kout, "-"}} {
			if err := put(kv[0], kv[1]); err != nil {
				return "", err
			}
		}
		attempts := 0
		var seen []string
		resp, err := lvl.run(ctx, cli, func(s concurrency.STM) error {
			attempts++
			xv := s.Get(kx)
			if attempts == 1 {
				if err := put(ky, "y1"); err != nil {
					return err
				}
			}
			yv := s.Get(ky)
			seen = append(seen, yv)
			s.Put(kout, xv+"+"+yv)
			return nil
		})
		if err := checkCommitted(lvl.name, resp, err); err != nil {
			return "", err
		}
		wantSeen := []string{"y1"}
		if snapshot {
			wantSeen = []string{"y0", "y1"}
		}
		if strings.Join(seen, ",") != strings.Join(wantSeen, ",") {
			return "", fmt.Errorf("%s: attempts read y as %v, want %v", lvl.name, seen, wantSeen)
		}
		if out, err := get(kout); err != nil {
			return "", err
		} else if out != "x0+y1" {
			return "", fmt.Errorf("%s: committed %q, want %q", lvl.name, out, "x0+y1")
		}

		// Write conflicts.
		if err := put(kout, "-"); err != nil {
			return "", err
		}
		wattempts := 0
		resp, err = lvl.run(ctx, cli, func(s concurrency.STM) error {
			wattempts++
			xv := s.Get(kx)
			if wattempts == 1 {
				if err := put(kout, "outside"); err != nil {
					return err
				}
			}
			s.Put(kout, "stm:"+xv)
			return nil
		})
		if err := checkCommitted(lvl.name, resp, err); err != nil {
			return "", err
		}
		wantAttempts := 1
		if lvl.name == isolationLevels[0].name {
			wantAttempts = 2
		}
		if wattempts != wantAttempts {
			return "", fmt.Errorf("%s: %d attempts with a blind write racing an outside write, want %d", lvl.name, wattempts, wantAttempts)
		}
		if out, err := get(kout); err != nil {
			return "", err
		} else if out != "stm:x0" {
			return "", fmt.Errorf("%s: committed %q, want %q", lvl.name, out, "stm:x0")
		}
		summary = append(summary, fmt.Sprintf("%s %d+%d attempts", lvl.name, attempts, wattempts))
	}
	return strings.Join(summary, "; "), nil
}

// stmTransfers: 10 accounts of 100 on both shards; per isolation level, 8
// goroutines make 25 transfers each. Every 5th transfer reads all accounts
// with one multi-key STM Get (one Txn of 10 range ops over both shards),
// checks the total inside the transaction and evens out the richest and
// poorest; the others move a random amount between two random accounts.
// After each batch the total is unchanged and no balance is negative.
func stmTransfers(ctx context.Context) (string, error) {
	const accounts, initial, goroutines, transfers = 10, 100, 8, 25
	const total = accounts * initial
	keys := make([]string, accounts)
	for i := range keys {
		keys[i] = fmt.Sprintf("/goconc/stm/acct/%d", i)
	}
	spread("stm-accounts", keys...)
	clis, err := newClients(goroutines)
	if err != nil {
		return "", err
	}
	defer closeAll(clis)
	admin := clis[0]
	for _, k := range keys {
		if _, err := admin.Put(ctx, k, strconv.Itoa(initial)); err != nil {
			return "", fmt.Errorf("put %s: %w", k, err)
		}
	}
	balance := func(s concurrency.STM, k string) (int, error) {
		v := s.Get(k)
		n, err := strconv.Atoi(v)
		if err != nil {
			return 0, fmt.Errorf("account %s holds %q", k, v)
		}
		return n, nil
	}

	var summary []string
	for _, lvl := range isolationLevels {
		var attempts, commits int64
		g, gctx := errgroup.WithContext(ctx)
		for gi := 0; gi < goroutines; gi++ {
			cli := clis[gi]
			rng := rand.New(rand.NewSource(int64(gi + 1)))
			gi := gi
			g.Go(func() error {
				for t := 0; t < transfers; t++ {
					sweep := t%5 == 4
					from, to := rng.Intn(accounts), rng.Intn(accounts-1)
					if to >= from {
						to++
					}
					amount := 1 + rng.Intn(30)
					resp, err := lvl.run(gctx, cli, func(s concurrency.STM) error {
						atomic.AddInt64(&attempts, 1)
						if sweep {
							// One Get of many keys fetches them all in one
							// Txn and returns the first key's value; the
							// later single-key Gets come from the read set.
							s.Get(keys...)
							bal := make([]int, accounts)
							sum := 0
							for i, k := range keys {
								b, err := balance(s, k)
								if err != nil {
									return err
								}
								if b < 0 {
									return fmt.Errorf("account %s is %d inside a transaction", k, b)
								}
								bal[i] = b
								sum += b
							}
							// The multi-key Get is one Txn: one revision,
							// so its reads always add up, at every level.
							if sum != total {
								return fmt.Errorf("multi-key Get read a total of %d, want %d (balances %v)", sum, total, bal)
							}
							idx := make([]int, accounts)
							for i := range idx {
								idx[i] = i
							}
							sort.Slice(idx, func(a, b int) bool { return bal[idx[a]] < bal[idx[b]] })
							poor, rich := idx[0], idx[accounts-1]
							move := (bal[rich] - bal[poor]) / 2
							s.Put(keys[rich], strconv.Itoa(bal[rich]-move))
							s.Put(keys[poor], strconv.Itoa(bal[poor]+move))
							return nil
						}
						fb, err := balance(s, keys[from])
						if err != nil {
							return err
						}
						tb, err := balance(s, keys[to])
						if err != nil {
							return err
						}
						move := amount
						if move > fb {
							move = fb
						}
						s.Put(keys[from], strconv.Itoa(fb-move))
						s.Put(keys[to], strconv.Itoa(tb+move))
						return nil
					})
					if err := checkCommitted(lvl.name, resp, err); err != nil {
						return fmt.Errorf("goroutine %d transfer %d: %w", gi, t, err)
					}
					atomic.AddInt64(&commits, 1)
				}
				return nil
			})
		}
		if err := g.Wait(); err != nil {
			return "", err
		}
		resp, err := admin.Get(ctx, "/goconc/stm/acct/", clientv3.WithPrefix())
		if err != nil {
			return "", fmt.Errorf("%s: get accounts: %w", lvl.name, err)
		}
		if len(resp.Kvs) != accounts {
			return "", fmt.Errorf("%s: %d accounts, want %d", lvl.name, len(resp.Kvs), accounts)
		}
		sum := 0
		for _, kv := range resp.Kvs {
			n, err := strconv.Atoi(string(kv.Value))
			if err != nil || n < 0 {
				return "", fmt.Errorf("%s: account %s holds %q", lvl.name, kv.Key, kv.Value)
			}
			sum += n
		}
		if sum != total {
			return "", fmt.Errorf("%s: accounts total %d after the batch, want %d", lvl.name, sum, total)
		}
		if commits != goroutines*transfers {
			return "", fmt.Errorf("%s: %d commits, want %d", lvl.name, commits, goroutines*transfers)
		}
		summary = append(summary, fmt.Sprintf("%s %d commits in %d attempts", lvl.name, commits, attempts))
	}
	return fmt.Sprintf("total %d kept; %s", total, strings.Join(summary, "; ")), nil
}
