// metastore-goclient: put and range load from Go's etcd client library
// (go.etcd.io/etcd/clientv3, the one etcdctl and etcd's own benchmark tool
// link; Kubernetes links a later version of it), so that `bench/compare` can check its ratios with
// a client other than its own. Flags follow metastore-bench's (same names,
// same meaning, the same key layout); the workload is `--workload put` or
// `--workload range`. One JSON object goes to stdout at the end.
//
// Built in GOPATH mode against Debian's packaged client library
// (golang-etcd-server-dev, etcd 3.4); see build.sh.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/clientv3"
)

type config struct {
	workload    string
	endpoints   []string
	conns       int
	clients     int
	total       int64
	duration    time.Duration
	keySize     int
	valSize     int
	keySpace    int64
	sequential  bool
	keyPrefix   string
	rangeKey    string
	consistency string
	opTimeout   time.Duration
}

type latency struct {
	Count int64   `json:"count"`
	Mean  float64 `json:"mean"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	P999  float64 `json:"p999"`
	Max   float64 `json:"max"`
}

type result struct {
	Workload      string  `json:"workload"`
	Ops           int64   `json:"ops"`
	Errors        int64   `json:"errors"`
	ErrorSample   string  `json:"error_sample"`
	ElapsedSecs   float64 `json:"elapsed_secs"`
	Throughput    float64 `json:"throughput"`
	LatencyMs     latency `json:"latency_ms"`
	ClientCPUSecs float64 `json:"client_cpu_secs"`
}

func parse() (config, error) {
	var c config
	var endpoints string
	fs := flag.NewFlagSet("metastore-goclient", flag.ContinueOnError)
	fs.StringVar(&c.workload, "workload", "put", "put or range")
	fs.StringVar(&endpoints, "endpoints", "127.0.0.1:2379", "endpoints, comma-separated")
	fs.IntVar(&c.conns, "conns", 1, "gRPC connections (one clientv3.Client each)")
	fs.IntVar(&c.clients, "clients", 1, "concurrent clients, spread over the connections")
	fs.Int64Var(&c.total, "total", 0, "operations in all (0: bounded by --duration, else 10000)")
	fs.DurationVar(&c.duration, "duration", 0, "run for this long instead of --total")
	fs.IntVar(&c.keySize, "key-size", 8, "key size in bytes")
	fs.IntVar(&c.valSize, "val-size", 8, "value size in bytes")
	fs.Int64Var(&c.keySpace, "key-space-size", 1, "distinct keys written")
	fs.BoolVar(&c.sequential, "sequential-keys", false, "keys 0, 1, 2, ... instead of random ones")
	fs.StringVar(&c.keyPrefix, "key-prefix", "", "prefix of every generated key")
	fs.StringVar(&c.rangeKey, "key", "/bench/range/key", "the key a range reads")
	fs.StringVar(&c.consistency, "consistency", "l", "range consistency: l (linearizable) or s (serializable)")
	fs.DurationVar(&c.opTimeout, "op-timeout", 30*time.Second, "timeout of the warm-up requests (the measured ones have none, as in etcd's benchmark tool)")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	for _, e := range strings.Split(endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			c.endpoints = append(c.endpoints, e)
		}
	}
	switch {
	case c.workload != "put" && c.workload != "range":
		return c, fmt.Errorf("--workload must be put or range, not %q", c.workload)
	case c.consistency != "l" && c.consistency != "s":
		return c, fmt.Errorf("--consistency must be l or s, not %q", c.consistency)
	case c.conns < 1 || c.clients < 1 || c.keySpace < 1 || len(c.endpoints) == 0:
		return c, errors.New("--conns, --clients, --key-space-size and --endpoints must be positive")
	}
	if c.total == 0 && c.duration == 0 {
		c.total = 10000
	}
	return c, nil
}

// keyAt is metastore-bench's key layout: the prefix, then the index in
// hex, zero-padded to --key-size bytes.
func (c *config) keyAt(idx int64) string {
	width := c.keySize - len(c.keyPrefix)
	if width < 1 {
		width = 1
	}
	return fmt.Sprintf("%s%0*x", c.keyPrefix, width, idx)
}

func printable(n int) string {
	const chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
	b := make([]byte, n)
	for i := range b {
		b[i] = chars[rand.Intn(len(chars))]
	}
	return string(b)
}

func summarize(samples []time.Duration) latency {
	if len(samples) == 0 {
		return latency{}
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	at := func(q float64) float64 {
		i := int(q * float64(len(samples)))
		if i >= len(samples) {
			i = len(samples) - 1
		}
		return ms(samples[i])
	}
	var sum time.Duration
	for _, s := range samples {
		sum += s
	}
	return latency{
		Count: int64(len(samples)),
		Mean:  ms(sum) / float64(len(samples)),
		P50:   at(0.50),
		P90:   at(0.90),
		P99:   at(0.99),
		P999:  at(0.999),
		Max:   ms(samples[len(samples)-1]),
	}
}

func cpuSecs() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func run(c config) (result, error) {
	res := result{Workload: c.workload}
	conns := make([]*clientv3.Client, c.conns)
	for i := range conns {
		// Connections go to the endpoints round robin, as metastore-bench's.
		ep := c.endpoints[i%len(c.endpoints)]
		cl, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second})
		if err != nil {
			return res, fmt.Errorf("connecting to %s: %w", ep, err)
		}
		defer cl.Close()
		conns[i] = cl
	}
	value := printable(c.valSize)
	// Keys are formatted before the clock starts when there are not too
	// many of them, so that the client spends its time on requests.
	var keys []string
	if c.workload == "put" && c.keySpace <= 1<<20 {
		keys = make([]string, c.keySpace)
		for i := range keys {
			keys[i] = c.keyAt(int64(i))
		}
	}
	keyAt := func(idx int64) string {
		if keys != nil {
			return keys[idx]
		}
		return c.keyAt(idx)
	}
	var getOpts []clientv3.OpOption
	if c.consistency == "s" {
		getOpts = append(getOpts, clientv3.WithSerializable())
	}
	// Every connection answers once before the clock starts; a range's key
	// exists before it is read.
	for _, cl := range conns {
		ctx, cancel := context.WithTimeout(context.Background(), c.opTimeout)
		var err error
		if c.workload == "range" {
			_, err = cl.Put(ctx, c.rangeKey, value)
		} else {
			_, err = cl.Get(ctx, "/bench/warm-up", clientv3.WithSerializable())
		}
		cancel()
		if err != nil {
			return res, fmt.Errorf("warm-up: %w", err)
		}
	}

	var issued, next, errs int64
	var firstErr atomic.Value
	cpu0 := cpuSecs()
	start := time.Now()
	var deadline time.Time
	if c.duration > 0 {
		deadline = start.Add(c.duration)
	}
	samples := make([][]time.Duration, c.clients)
	var wg sync.WaitGroup
	for i := 0; i < c.clients; i++ {
		wg.Add(1)
		go func(i int, cl *clientv3.Client) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(i) + 1))
			for {
				if c.total > 0 && atomic.AddInt64(&issued, 1) > c.total {
					return
				}
				if !deadline.IsZero() && !time.Now().Before(deadline) {
					return
				}
				ctx := context.Background()
				t := time.Now()
				var err error
				if c.workload == "put" {
					var idx int64
					if c.sequential {
						idx = (atomic.AddInt64(&next, 1) - 1) % c.keySpace
					} else {
						idx = rng.Int63n(c.keySpace)
					}
					_, err = cl.Put(ctx, keyAt(idx), value)
				} else {
					var r *clientv3.GetResponse
					r, err = cl.Get(ctx, c.rangeKey, getOpts...)
					if err == nil && len(r.Kvs) != 1 {
						err = fmt.Errorf("range returned %d keys, expected 1", len(r.Kvs))
					}
				}
				d := time.Since(t)
				if err != nil {
					atomic.AddInt64(&errs, 1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				samples[i] = append(samples[i], d)
			}
		}(i, conns[i%len(conns)])
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, s := range samples {
		all = append(all, s...)
	}
	res.Ops = int64(len(all))
	res.Errors = errs
	if e, ok := firstErr.Load().(string); ok {
		res.ErrorSample = e
	}
	res.ElapsedSecs = elapsed
	if elapsed > 0 {
		res.Throughput = float64(res.Ops) / elapsed
	}
	res.LatencyMs = summarize(all)
	res.ClientCPUSecs = cpuSecs() - cpu0
	return res, nil
}

func main() {
	c, err := parse()
	if err != nil {
		fmt.Fprintln(os.Stderr, "metastore-goclient:", err)
		os.Exit(2)
	}
	res, err := run(c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "metastore-goclient:", err)
		os.Exit(1)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}
