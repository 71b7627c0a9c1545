package replicator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// leaseCluster opens size nodes on a faultNet (each joining the first),
// mod adjusting each config, and one Leases with ttl on each.
func leaseCluster(t *testing.T, f *faultNet, size int, ttl time.Duration, mod func(i int, c *Config)) ([]*Node, []*Leases, []chan string) {
	t.Helper()
	dir := t.TempDir()
	var nodes []*Node
	for i := range size {
		cfg := f.config(t, dir, fmt.Sprintf("n%d", i))
		if i > 0 {
			cfg.Join = []string{nodes[0].Addr()}
		}
		if mod != nil {
			mod(i, &cfg)
		}
		nodes = append(nodes, open(t, cfg))
	}
	waitConverged(t, nodes...)
	var ls []*Leases
	var lost []chan string
	for _, n := range nodes {
		ch := make(chan string, 16)
		l := NewLeases(n, LeaseConfig{TTL: ttl, Poll: 20 * time.Millisecond, OnLost: func(name string, err error) {
			select {
			case ch <- name:
			default:
			}
		}})
		t.Cleanup(l.Close)
		ls = append(ls, l)
		lost = append(lost, ch)
	}
	return nodes, ls, lost
}

// rejoin makes the nodes meet again after f.Heal.
func rejoin(t *testing.T, nodes []*Node) {
	t.Helper()
	for _, n := range nodes[1:] {
		n.ml.Load().Join([]string{nodes[0].Addr()})
	}
	waitConverged(t, nodes...)
}

// TestLeaseFreshSplit: two nodes are cut apart before either notices; both
// try the same lock. At most one may hold it (with two known members
// neither side has a majority, so neither should).
func TestLeaseFreshSplit(t *testing.T) {
	f := newFaultNet()
	_, ls, _ := leaseCluster(t, f, 2, 3*time.Second, nil)
	f.Cut([]string{"n0"}, []string{"n1"})
	var wins atomic.Int32
	var wg sync.WaitGroup
	for _, l := range ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := l.TryLock(ctxT(t), "issue_cert_x")
			if err != nil {
				t.Log(err)
			}
			if ok {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if w := wins.Load(); w > 1 {
		t.Fatalf("%d holders of one lock on the two sides of a fresh split", w)
	}
}

// TestLeaseMinorityRefused: a node cut off from the majority of the circle
// cannot take a lock; the majority side can.
func TestLeaseMinorityRefused(t *testing.T) {
	f := newFaultNet()
	nodes, ls, _ := leaseCluster(t, f, 3, time.Second, nil)
	f.Isolate("n0")
	waitFor(t, 15*time.Second, "n0 alone", func() bool { return aliveCount(nodes[0]) == 1 && aliveCount(nodes[1]) == 2 })
	if ok, _ := ls[0].TryLock(ctxT(t), "m"); ok {
		t.Fatal("a node cut off from the majority took a lock")
	}
	if ok, err := ls[1].TryLock(ctxT(t), "m"); !ok || err != nil {
		t.Fatalf("majority side TryLock = %v, %v", ok, err)
	}
}

// TestLeaseLostAndRenew: the holder is cut off; it must learn that it lost
// the lease before the majority side gives it to another, and after the
// heal its Renew is an error that leaves the new holder's lease alone.
func TestLeaseLostAndRenew(t *testing.T) {
	f := newFaultNet()
	const ttl = time.Second
	nodes, ls, lost := leaseCluster(t, f, 3, ttl, nil)
	if ok, err := ls[0].TryLock(ctxT(t), "x"); !ok || err != nil {
		t.Fatalf("TryLock = %v, %v", ok, err)
	}
	f.Isolate("n0")
	start := time.Now()
	waitFor(t, 20*time.Second, "n1 takes the lock from the cut-off holder", func() bool {
		ok, _ := ls[1].TryLock(ctxT(t), "x")
		if ok && ls[0].Held("x") {
			t.Fatalf("n1 took the lock while n0 still believes it holds it")
		}
		return ok
	})
	t.Logf("taken over %v after the cut", time.Since(start))
	select {
	case name := <-lost[0]:
		if name != "x" {
			t.Fatalf("lost %q", name)
		}
	default:
		t.Fatal("the holder was not told it lost the lease")
	}
	f.Heal()
	rejoin(t, nodes)
	if err := ls[0].Renew(ctxT(t), "x", time.Minute); err == nil {
		t.Fatal("Renew of a lease another holder took succeeded")
	} else if !errors.Is(err, ErrLeaseNotHeld) && !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Renew of a lost lease: %v", err)
	}
	if err := ls[0].Unlock(ctxT(t), "x"); err == nil {
		t.Fatal("Unlock of a lease another holder took succeeded")
	}
	if err := ls[2].Renew(ctxT(t), "x", time.Minute); !errors.Is(err, ErrLeaseNotHeld) {
		t.Fatalf("Renew by a holder that never had the lease: %v", err)
	}
	holdsFor(t, 3*ttl, "n1 keeps the lock", func() bool {
		ok, _ := ls[2].TryLock(ctxT(t), "x")
		return ls[1].Held("x") && !ok
	})
	if err := ls[1].Renew(ctxT(t), "x", 2*ttl); err != nil {
		t.Fatalf("the holder's Renew: %v", err)
	}
	if err := ls[1].Unlock(ctxT(t), "x"); err != nil {
		t.Fatal(err)
	}
	// The release reaches the other acceptors in the background.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ls[2].Lock(ctx, "x"); err != nil {
		t.Fatalf("Lock after Unlock: %v", err)
	}
}

// TestLeaseSlowWriterClock: the holder's wall clock is 10 minutes slow.
// Expiry must not compare its clock with the reader's: the lease is held
// and refreshed, so nobody else gets it.
func TestLeaseSlowWriterClock(t *testing.T) {
	f := newFaultNet()
	const ttl = time.Second
	_, ls, _ := leaseCluster(t, f, 2, ttl, func(i int, c *Config) {
		// The store refuses records from a clock more than MaxClockSkew
		// away ("Clocks"); admit this one, so that the test is about lease
		// timing alone: leases must not depend on wall clocks at any
		// offset the store admits.
		c.MaxClockSkew = 20 * time.Minute
		if i == 0 {
			c.Now = func() time.Time { return time.Now().Add(-10 * time.Minute) }
		}
	})
	if ok, err := ls[0].TryLock(ctxT(t), "x"); !ok || err != nil {
		t.Fatalf("TryLock = %v, %v", ok, err)
	}
	holdsFor(t, 3*ttl, "the slow holder keeps its lock", func() bool {
		ok, _ := ls[1].TryLock(ctxT(t), "x")
		return !ok && ls[0].Held("x")
	})
}

// TestLeaseFastWriterClockCrash: the holder's clock is 10 minutes fast and
// it crashes holding the lock. Its lease must expire after about the TTL,
// not 10 minutes later.
func TestLeaseFastWriterClockCrash(t *testing.T) {
	f := newFaultNet()
	const ttl = time.Second
	nodes, ls, _ := leaseCluster(t, f, 3, ttl, func(i int, c *Config) {
		// The store refuses records from a clock more than MaxClockSkew
		// away ("Clocks"); admit this one, so that the test is about lease
		// timing alone: leases must not depend on wall clocks at any
		// offset the store admits.
		c.MaxClockSkew = 20 * time.Minute
		if i == 0 {
			c.Now = func() time.Time { return time.Now().Add(10 * time.Minute) }
		}
	})
	if ok, err := ls[0].TryLock(ctxT(t), "x"); !ok || err != nil {
		t.Fatalf("TryLock = %v, %v", ok, err)
	}
	ls[0].Close()
	if err := nodes[0].shutdown(false); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// Bound: the TTL as measured by the others, plus failure detection of
	// the crashed node (a few seconds with fastMemberlist), with slack for
	// a loaded machine; far below the 10 minutes of skew.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ls[1].Lock(ctx, "x"); err != nil {
		t.Fatalf("Lock after the fast holder crashed: %v (waited %v)", err, time.Since(start))
	}
	t.Logf("taken over %v after the crash", time.Since(start))
}

// TestLeaseOneHolder: takers on three nodes race for the same locks; never
// two holders at once (no partition), and every lock is eventually taken.
func TestLeaseOneHolder(t *testing.T) {
	f := newFaultNet()
	_, ls, _ := leaseCluster(t, f, 3, 2*time.Second, nil)
	var inside, most atomic.Int32
	var wg sync.WaitGroup
	for _, l := range ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 4 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				err := l.Lock(ctx, "shared")
				cancel()
				if err != nil {
					t.Error(err)
					return
				}
				v := inside.Add(1)
				for {
					m := most.Load()
					if v <= m || most.CompareAndSwap(m, v) {
						break
					}
				}
				time.Sleep(20 * time.Millisecond) // holding the lock: the work of the critical section
				inside.Add(-1)
				if err := l.Unlock(context.Background(), "shared"); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if most.Load() != 1 {
		t.Fatalf("%d holders at once", most.Load())
	}
}

// TestLeaseLoneNode: a circle of one is its own majority.
func TestLeaseLoneNode(t *testing.T) {
	n := open(t, testConfig(t, t.TempDir(), "solo"))
	l := NewLeases(n, LeaseConfig{TTL: time.Second})
	defer l.Close()
	if ok, err := l.TryLock(ctxT(t), "x"); !ok || err != nil {
		t.Fatalf("TryLock = %v, %v", ok, err)
	}
	if err := l.Renew(ctxT(t), "x", time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.Unlock(ctxT(t), "x"); err != nil {
		t.Fatal(err)
	}
}

// TestLeaseNoOverlapUnderPartitions: takers on four nodes loop on one lock
// while the network is cut in different ways (one node alone, 2+2, one
// node alone again) and healed. Every hold interval (from Lock's return to
// the last moment the holder saw Held true) must be disjoint from every
// other: no two holders, also under partitions. Locks are taken in the
// healthy phases and on a majority side.
func TestLeaseNoOverlapUnderPartitions(t *testing.T) {
	f := newFaultNet()
	const ttl = time.Second
	nodes, ls, _ := leaseCluster(t, f, 4, ttl, nil)
	type interval struct {
		who        int
		start, end time.Time
	}
	var mu sync.Mutex
	var held []interval
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, l := range ls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				err := l.Lock(ctx, "x")
				cancel()
				if err != nil {
					continue
				}
				start := time.Now()
				last := start
				for range 10 { // the critical section: 100 ms, watching the lease
					if !l.Held("x") {
						break
					}
					last = time.Now()
					time.Sleep(10 * time.Millisecond)
				}
				mu.Lock()
				held = append(held, interval{i, start, last})
				mu.Unlock()
				l.Unlock(context.Background(), "x")
			}
		}()
	}
	names := []string{"n0", "n1", "n2", "n3"}
	phase := func(what string, cut func()) {
		cut()
		time.Sleep(2 * time.Second) // the partition lasts: part of the schedule, not synchronisation
		f.Heal()
		rejoin(t, nodes)
		time.Sleep(time.Second) // a healthy phase
		mu.Lock()
		t.Logf("after %s: %d holds", what, len(held))
		mu.Unlock()
	}
	time.Sleep(time.Second)
	phase("n0 alone", func() { f.Isolate("n0") })
	phase("2+2", func() { f.Cut(names[:2], names[2:]) })
	phase("n3 alone", func() { f.Isolate("n3") })
	close(stop)
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	if len(held) < 4 {
		t.Fatalf("only %d holds in 10 s", len(held))
	}
	sort.Slice(held, func(i, j int) bool { return held[i].start.Before(held[j].start) })
	for i := 1; i < len(held); i++ {
		for j := 0; j < i; j++ {
			if held[j].end.After(held[i].start) {
				t.Fatalf("n%d held the lock %v..%v while n%d held it from %v",
					held[j].who, held[j].start.Format("15:04:05.000"), held[j].end.Format("15:04:05.000"),
					held[i].who, held[i].start.Format("15:04:05.000"))
			}
		}
	}
}

// TestLeaseAcceptorRestart: an acceptor that restarts keeps the grants it
// stored and counts them as given at the restart. The holder is cut off
// and one of the two other nodes restarts at once: the third node must not
// get the lock while the cut-off holder may still believe it holds it
// (with the grant forgotten, the restarted node would vote for it at once).
func TestLeaseAcceptorRestart(t *testing.T) {
	f := newFaultNet()
	const ttl = 2 * time.Second
	nodes, ls, _ := leaseCluster(t, f, 3, ttl, nil)
	if ok, err := ls[0].TryLock(ctxT(t), "x"); !ok || err != nil {
		t.Fatalf("TryLock = %v, %v", ok, err)
	}
	waitFor(t, 5*time.Second, "n1 grants the lock to n0", func() bool {
		g, live := nodes[1].acceptor.current("x")
		return live && g.Owner == ls[0].Owner()
	})
	f.Isolate("n0")
	addr := nodes[1].Addr()
	ls[1].Close()
	if err := nodes[1].shutdown(false); err != nil { // a crash
		t.Fatal(err)
	}
	_, portStr, _ := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}, BindPort: port})
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, nodes[1].cfg.DataDir[:len(nodes[1].cfg.DataDir)-len("/n1")], "n1")
	cfg.Transport = &faultTransport{NetTransport: nt, net: f, self: "n1"}
	cfg.Join = []string{nodes[2].Addr()}
	back := open(t, cfg)
	restarted := time.Now()
	if g, live := back.acceptor.current("x"); !live || g.Owner != ls[0].Owner() {
		t.Fatalf("restarted acceptor's grant of x = %+v (live %v), want n0's", g, live)
	}
	waitFor(t, 20*time.Second, "n2 takes the lock", func() bool {
		ok, _ := ls[2].TryLock(ctxT(t), "x")
		if ok && ls[0].Held("x") {
			t.Fatal("n2 took the lock while the cut-off n0 still holds it")
		}
		return ok
	})
	if took := time.Since(restarted); took < ttl-ttl/10 {
		t.Fatalf("n2 took the lock %v after n1 restarted, before the TTL %v", took, ttl)
	}
}
