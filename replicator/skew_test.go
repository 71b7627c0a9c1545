package replicator

import (
	"math"
	"testing"
	"time"
)

// fastClock is a wall clock 10 minutes ahead of the real one (the issue's
// "+10 min" nemesis).
func fastClock() time.Time { return time.Now().Add(10 * time.Minute) }

// clockMillis returns the physical part of n's clock, in Unix milliseconds.
func clockMillis(n *Node) int64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return int64(n.clock.last >> 16)
}

// notDragged fails the test if n's clock or the version of bucket/key on n
// is more than a minute (the default maximum skew) ahead of real time.
func notDragged(t *testing.T, n *Node, bucket, key string) {
	t.Helper()
	limit := time.Now().Add(time.Minute + 5*time.Second).UnixMilli() // 5 s: slack for a slow test machine
	if c := clockMillis(n); c > limit {
		t.Errorf("%s: clock dragged %v ahead of real time", n.Name(), time.Duration(c-time.Now().UnixMilli())*time.Millisecond)
	}
	if r, err := n.Get(bucket, key); err == nil && int64(r.Version.Time>>16) > limit {
		t.Errorf("%s: %s/%s versioned %v ahead of real time (%v)", n.Name(), bucket, key, time.Until(r.Version.WallTime()), r.Version)
	}
}

// TestSkewFastNodeDoesNotWin: a node whose clock is 10 minutes fast writes
// a key while cut off; a correct node writes the same key afterwards. After
// the heal the correct nodes keep the later write and their clocks are not
// dragged forward.
func TestSkewFastNodeDoesNotWin(t *testing.T) {
	f := newFaultNet()
	dir := t.TempDir()
	var nodes []*Node
	for i, name := range []string{"c0", "c1", "fast"} {
		cfg := f.config(t, dir, name)
		if i > 0 {
			cfg.Join = []string{nodes[0].Addr()}
		}
		if name == "fast" {
			cfg.Now = fastClock
		}
		nodes = append(nodes, open(t, cfg))
	}
	waitConverged(t, nodes...)
	c0, c1, fast := nodes[0], nodes[1], nodes[2]

	f.Isolate("fast")
	if err := fast.PutAsync("x", "k", []byte("fast")); err != nil {
		t.Fatal(err)
	}
	// The correct node writes after the fast one, in real time.
	if err := c0.Put(ctxT(t), "x", "k", []byte("correct")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "c1 gets c0's write", func() bool { return valueIs(c1, "x", "k", "correct") })
	before := c0.Stats().RecordsReceived + c1.Stats().RecordsReceived
	f.Heal()
	if _, err := fast.ml.Load().Join([]string{c0.Addr()}); err != nil {
		t.Fatal(err)
	}
	waitConverged(t, nodes...)
	// The fast node's record reaches the correct nodes (gossip is gone, so
	// anti-entropy brings it: every 500 ms with a random peer).
	waitFor(t, 15*time.Second, "the correct nodes receive the fast node's record", func() bool {
		return c0.Stats().RecordsReceived+c1.Stats().RecordsReceived > before
	})
	holdsFor(t, 3*time.Second, "the correct nodes keep the later write", func() bool {
		return valueIs(c0, "x", "k", "correct") && valueIs(c1, "x", "k", "correct")
	})
	notDragged(t, c0, "x", "k")
	notDragged(t, c1, "x", "k")
	// A new write of a correct node is versioned by its own clock.
	if err := c1.Put(ctxT(t), "x", "k2", []byte("v")); err != nil {
		t.Fatal(err)
	}
	notDragged(t, c1, "x", "k2")
}

// TestSkewMaxVersionDoesNotPoison: a record versioned 2^64-1 (the largest
// version there is) neither makes its key permanent nor wraps the clock.
func TestSkewMaxVersionDoesNotPoison(t *testing.T) {
	n := cluster(t, 1, nil)[0]
	evil := Record{Bucket: "x", Key: "k", Value: []byte("forever"), Version: Version{Time: math.MaxUint64, Node: "evil"}}
	if err := n.applyRemote([]Record{evil}, false); err != nil {
		t.Fatalf("applyRemote: %v", err)
	}
	if err := n.Put(ctxT(t), "x", "k", []byte("mine")); err != nil {
		t.Fatal(err)
	}
	if !valueIs(n, "x", "k", "mine") {
		r, _ := n.Get("x", "k")
		t.Errorf("a later local write lost to the max version: %q %v", r.Value, r.Version)
	}
	if err := n.Delete(ctxT(t), "x", "k"); err != nil {
		t.Fatal(err)
	}
	if !absent(n, "x", "k") {
		t.Errorf("delete was a no-op")
	}
	if err := n.Put(ctxT(t), "x", "k2", []byte("v")); err != nil {
		t.Fatal(err)
	}
	r, err := n.Get("x", "k2")
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(r.Version.WallTime()); d > time.Minute || d < -time.Minute {
		t.Errorf("clock wrapped or dragged: a new write is versioned %v (%v from now)", r.Version, -d)
	}
	notDragged(t, n, "x", "k2")
}
