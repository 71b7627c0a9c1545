// Command syncbench measures two things side by side in one run.
//
// Anti-entropy: two replicator nodes on loopback share N records (1k, 10k,
// 100k; one bbolt file copied) and differ in 100 (50 keys only one has, 50
// keys the other holds a newer version of). They meet; the bench prints the
// metadata (hashes, key listings, wants) both sent until they agree, for
// the tree exchange and for the digest exchange of earlier releases
// (Config.DigestExchangeOnly), the size of a full listing of every key and
// version, and the time from meeting to agreement.
//
// Put throughput: a single node (Replicas 1) and a 3-node circle (Replicas
// 2), with 1 and with W concurrent writers, with one transaction per write
// (Config.SerialCommit) and with group commit, alternating, medians of
// several rounds. Every write is fsynced before Put returns in both.
//
// Garbage collection: one node deletes 100k records, its clock moves past
// the horizon, and the bench measures Put latency while the background
// collector removes the tombstones, against Put latency before.
//
//	go run ./bench/syncbench [-differ 100] [-writers 16] [-writes 2000] [-rounds 3] [-only ae|put|gc]
package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/homecircle/circle/bench/internal/ports"
	"github.com/homecircle/circle/replicator"
)

var secret = func() []byte { b := make([]byte, 32); rand.Read(b); return b }()

func main() {
	differ := flag.Int("differ", 100, "records that differ between the two nodes")
	writers := flag.Int("writers", 16, "concurrent writers")
	writes := flag.Int("writes", 2000, "writes per throughput measurement")
	rounds := flag.Int("rounds", 3, "throughput rounds (serial and group alternate; medians are printed)")
	only := flag.String("only", "", "run one part: ae, put or gc (default: all)")
	flag.Parse()
	if err := run(*only, *differ, *writers, *writes, *rounds); err != nil {
		fmt.Fprintln(os.Stderr, "syncbench:", err)
		os.Exit(1)
	}
}

func run(only string, differ, writers, writes, rounds int) error {
	for _, part := range []struct {
		name string
		run  func() error
	}{
		{"ae", func() error { return antiEntropyPart(differ) }},
		{"put", func() error { return putPart(writers, writes, rounds) }},
		{"gc", gcPart},
	} {
		if only == "" || only == part.name {
			if err := part.run(); err != nil {
				return err
			}
			fmt.Println()
		}
	}
	return nil
}

func antiEntropyPart(differ int) error {
	fmt.Printf("anti-entropy, %d differing records: metadata sent by both nodes until they agree\n", differ)
	fmt.Printf("%-8s %18s %18s %13s %8s %9s %8s %8s\n", "records", "tree", "digest", "full listing", "digest/", "listing/", "tree", "digest")
	fmt.Printf("%-8s %18s %18s %13s %8s %9s %8s %8s\n", "", "bytes (keys) [ex]", "bytes (keys) [ex]", "bytes", "tree", "tree", "time", "time")
	for _, n := range []int{1000, 10_000, 100_000} {
		tree, digest, listing, err := antiEntropy(n, differ)
		if err != nil {
			return err
		}
		fmt.Printf("%-8d %18s %18s %13d %8.1f %9.1f %8v %8v\n", n,
			fmt.Sprintf("%d (%d) [%d]", tree.bytes, tree.keys, tree.exchanges), fmt.Sprintf("%d (%d) [%d]", digest.bytes, digest.keys, digest.exchanges), listing,
			float64(digest.bytes)/float64(tree.bytes), float64(listing)/float64(tree.bytes),
			tree.took.Round(time.Millisecond), digest.took.Round(time.Millisecond))
	}
	fmt.Println("[ex]: completed exchanges (each node starts one when they meet; they may overlap)")
	return nil
}

func putPart(writers, writes, rounds int) error {
	fmt.Printf("Put throughput (fsync before every ack), %d writes, median of %d rounds\n", writes, rounds)
	fmt.Printf("%-22s %8s %14s %14s %8s\n", "", "writers", "serial /s", "group /s", "group/serial")
	for _, c := range []struct {
		name     string
		size     int
		replicas int
	}{{"1 node, replicas 1", 1, 1}, {"3 nodes, replicas 2", 3, 2}} {
		for _, w := range []int{1, writers} {
			var ss, gs []float64
			for r := range rounds {
				for _, serial := range []bool{r%2 == 0, r%2 != 0} { // alternate which goes first
					v, err := throughput(c.size, c.replicas, w, writes, serial)
					if err != nil {
						return err
					}
					if serial {
						ss = append(ss, v)
					} else {
						gs = append(gs, v)
					}
				}
			}
			serial, group := median(ss), median(gs)
			fmt.Printf("%-22s %8d %14.0f %14.0f %8.2f\n", c.name, w, serial, group, group/serial)
		}
	}
	return nil
}

func gcPart() error {
	fmt.Printf("garbage collection of %d tombstones on one node, Put latency meanwhile\n", gcTombstones)
	idle, during, took, err := collect()
	if err != nil {
		return err
	}
	fmt.Printf("%-28s %10s %10s %10s\n", "", "p50", "p99", "max")
	fmt.Printf("%-28s %10v %10v %10v\n", "Put, no collection running", pct(idle, 50), pct(idle, 99), pct(idle, 100))
	fmt.Printf("%-28s %10v %10v %10v\n", "Put, collection running", pct(during, 50), pct(during, 99), pct(during, 100))
	fmt.Printf("collection took %v\n", took.Round(time.Millisecond))
	return nil
}

const gcTombstones = 100_000

func pct(d []time.Duration, p int) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return s[i].Round(10 * time.Microsecond)
}

// collect deletes gcTombstones records, moves the node's clock past the
// horizon and measures Put latency while the background collector removes
// them, and before.
func collect() (idle, during []time.Duration, took time.Duration, err error) {
	dir, err := os.MkdirTemp("", "syncbench-")
	if err != nil {
		return
	}
	defer os.RemoveAll(dir)
	var offset atomic.Int64
	cfg, err := config(dir, "solo", func(c *replicator.Config) {
		c.TombstoneHorizon = 10 * time.Minute // a pass every 25 s; the clock jump below ages the tombstones
		c.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	})
	if err != nil {
		return
	}
	node, err := replicator.Open(cfg)
	if err != nil {
		return
	}
	defer func() { node.Close() }()
	if err = load(node, gcTombstones); err != nil {
		return
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= gcTombstones {
					return
				}
				bucket := "accounts"
				if i%4 == 0 {
					bucket = "sessions"
				}
				if e := node.DeleteAsync(bucket, key(i)); e != nil {
					err = e
				}
			}
		}()
	}
	wg.Wait()
	if err != nil {
		return
	}
	put := func(i int) (time.Duration, error) {
		start := time.Now()
		e := node.Put(context.Background(), "other", fmt.Sprintf("p%d", i), []byte("v"))
		return time.Since(start), e
	}
	for i := range 300 {
		d, e := put(i)
		if e != nil {
			return nil, nil, 0, e
		}
		idle = append(idle, d)
	}
	// Move the clock past the horizon; the next pass collects, while the
	// bench keeps writing.
	offset.Store(int64(time.Hour))
	deadline := time.Now().Add(3 * time.Minute)
	var start time.Time
	for i := 300; node.Stats().Tombstones > 0; i++ {
		if time.Now().After(deadline) {
			return nil, nil, 0, fmt.Errorf("tombstones not collected within 3 min")
		}
		collecting := node.Stats().Tombstones < gcTombstones
		if collecting && start.IsZero() {
			start = time.Now()
		}
		d, e := put(i)
		if e != nil {
			return nil, nil, 0, e
		}
		if collecting {
			during = append(during, d)
		} else {
			time.Sleep(10 * time.Millisecond)
		}
	}
	took = time.Since(start)
	if len(during) == 0 {
		during = []time.Duration{0}
	}
	return idle, during, took, nil
}

type aeResult struct {
	bytes, keys, exchanges uint64
	took                   time.Duration
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
}

func config(dir, name string, mod func(*replicator.Config)) (replicator.Config, error) {
	port, err := ports.Free()
	if err != nil {
		return replicator.Config{}, err
	}
	cfg := replicator.DefaultConfig()
	cfg.Name = name
	cfg.DataDir = filepath.Join(dir, name)
	cfg.Secret = secret
	cfg.BindAddr = fmt.Sprintf("127.0.0.1:%d", port)
	cfg.Replicas = 1
	cfg.AntiEntropyInterval = time.Hour // only the exchanges when nodes meet
	cfg.Logger = logger()
	if mod != nil {
		mod(&cfg)
	}
	return cfg, nil
}

func key(i int) string { return fmt.Sprintf("key-%06d", i) }

// load writes n records with many concurrent writers.
func load(node *replicator.Node, n int) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	val := make([]byte, 100)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				bucket := "accounts"
				if i%4 == 0 {
					bucket = "sessions"
				}
				if err := node.PutAsync(bucket, key(i), val); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

func copyFile(from, to string) error {
	if err := os.MkdirAll(filepath.Dir(to), 0o700); err != nil {
		return err
	}
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}

// antiEntropy measures the tree and the digest exchange for n shared
// records and differ differences, and returns the size of a full listing.
func antiEntropy(n, differ int) (tree, digest aeResult, listing int, err error) {
	dir, err := os.MkdirTemp("", "syncbench-")
	if err != nil {
		return
	}
	defer os.RemoveAll(dir)
	cfg, err := config(dir, "seed", nil)
	if err != nil {
		return
	}
	seed, err := replicator.Open(cfg)
	if err != nil {
		return
	}
	err = load(seed, n)
	seed.Close()
	if err != nil {
		return
	}
	for i := range n {
		listing += 1 + len(key(i)) + 8 + 1 + len("seed") + 1 // str key | u64 time | str node | u8 flags
	}
	listing += binary.MaxVarintLen64
	seedFile := filepath.Join(dir, "seed", replicator.DBFile)
	if tree, err = meet(dir, "tree", seedFile, differ, false); err != nil {
		return
	}
	digest, err = meet(dir, "digest", seedFile, differ, true)
	return
}

// meet copies the seed file to two nodes, makes them differ, lets them
// meet and measures until they agree.
func meet(dir, run, seedFile string, differ int, digestOnly bool) (aeResult, error) {
	var cfgs [2]replicator.Config
	for i, name := range []string{"a", "b"} {
		c, err := config(filepath.Join(dir, run), name, func(c *replicator.Config) { c.DigestExchangeOnly = digestOnly })
		if err != nil {
			return aeResult{}, err
		}
		if err := copyFile(seedFile, filepath.Join(c.DataDir, replicator.DBFile)); err != nil {
			return aeResult{}, err
		}
		cfgs[i] = c
	}
	// The differences, written while apart; the nodes are reopened so no
	// queued gossip carries them.
	for i := range cfgs {
		node, err := replicator.Open(cfgs[i])
		if err != nil {
			return aeResult{}, err
		}
		for j := range differ / 2 {
			k, v := fmt.Sprintf("only-a-%d", j), []byte("new")
			if i == 1 {
				k, v = key(1+4*j*7), []byte("newer")
			}
			if err := node.PutAsync("accounts", k, v); err != nil {
				node.Close()
				return aeResult{}, err
			}
		}
		node.Close()
	}
	a, err := replicator.Open(cfgs[0])
	if err != nil {
		return aeResult{}, err
	}
	defer a.Close()
	cfgs[1].Join = []string{a.Addr()}
	start := time.Now()
	b, err := replicator.Open(cfgs[1])
	if err != nil {
		return aeResult{}, err
	}
	defer b.Close()
	deadline := time.Now().Add(2 * time.Minute)
	for !agree(a, b, differ) {
		if time.Now().After(deadline) {
			return aeResult{}, fmt.Errorf("%s: nodes did not agree within 2 min", run)
		}
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(start)
	// Both nodes start an exchange when they meet; let both finish.
	for a.Stats().AntiEntropyRounds < 2 || b.Stats().AntiEntropyRounds < 2 {
		if time.Now().After(deadline) {
			return aeResult{}, fmt.Errorf("%s: exchanges did not finish", run)
		}
		time.Sleep(5 * time.Millisecond)
	}
	sa, sb := a.Stats(), b.Stats()
	return aeResult{bytes: sa.AntiEntropyMetaBytes + sb.AntiEntropyMetaBytes, keys: sa.AntiEntropyMetaKeys + sb.AntiEntropyMetaKeys,
		exchanges: (sa.AntiEntropyRounds + sb.AntiEntropyRounds) / 2, took: took}, nil
}

func agree(a, b *replicator.Node, differ int) bool {
	for j := range differ / 2 {
		if _, err := b.Get("accounts", fmt.Sprintf("only-a-%d", j)); err != nil {
			return false
		}
		if r, err := a.Get("accounts", key(1+4*j*7)); err != nil || string(r.Value) != "newer" {
			return false
		}
	}
	return true
}

// throughput measures Puts per second on the first node of a circle.
func throughput(size, replicas, writers, writes int, serial bool) (float64, error) {
	dir, err := os.MkdirTemp("", "syncbench-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	var nodes []*replicator.Node
	defer func() {
		for _, n := range nodes {
			n.Close()
		}
	}()
	for i := range size {
		cfg, err := config(dir, fmt.Sprintf("n%d", i), func(c *replicator.Config) {
			c.Replicas = replicas
			c.SerialCommit = serial
		})
		if err != nil {
			return 0, err
		}
		if i > 0 {
			cfg.Join = []string{nodes[0].Addr()}
		}
		n, err := replicator.Open(cfg)
		if err != nil {
			return 0, err
		}
		nodes = append(nodes, n)
	}
	deadline := time.Now().Add(30 * time.Second)
	for nodes[0].Stats().AliveMembers != size {
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("%d nodes did not meet", size)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	val := make([]byte, 200)
	start := time.Now()
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= writes {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := nodes[0].Put(ctx, "bench", key(i), val)
				cancel()
				if err != nil {
					failed.Store(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if err, _ := failed.Load().(error); err != nil {
		return 0, err
	}
	return float64(writes) / took.Seconds(), nil
}
