package replicator

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// offsetClock is a wall clock that tests move forward (all nodes sharing
// one stay within the skew bound of each other).
type offsetClock struct{ off atomic.Int64 }

func (c *offsetClock) now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *offsetClock) advance(d time.Duration) { c.off.Add(int64(d)) }
func (c *offsetClock) set(cfg *Config) *Config { cfg.Now = c.now; return cfg }
func pastHorizon(cfg Config) time.Duration     { return horizonOf(cfg) + time.Hour }
func horizonOf(cfg Config) time.Duration       { c, _ := cfg.withDefaults(); return c.tombstoneHorizon() }

// TestTombstonesAreCollected: a tombstone older than the horizon is removed
// from disk and index; a younger one stays.
func TestTombstonesAreCollected(t *testing.T) {
	clock := &offsetClock{}
	cfg := testConfig(t, t.TempDir(), "solo")
	clock.set(&cfg)
	n := open(t, cfg)
	ctx := ctxT(t)
	for i := range 10 {
		if err := n.Put(ctx, "b", fmt.Sprintf("old-%d", i), []byte("v")); err != nil {
			t.Fatal(err)
		}
		if err := n.Delete(ctx, "b", fmt.Sprintf("old-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	clock.advance(pastHorizon(cfg))
	if err := n.Delete(ctx, "b", "young"); err != nil {
		t.Fatal(err)
	}
	if err := n.Put(ctx, "b", "live", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if got := n.Stats().Tombstones; got != 11 {
		t.Fatalf("tombstones before collection: %d, want 11", got)
	}
	removed, err := n.collectGarbage()
	if err != nil {
		t.Fatal(err)
	}
	st := n.Stats()
	if removed != 10 || st.Tombstones != 1 || st.Records != 1 {
		t.Fatalf("collected %d; tombstones %d (want 1), records %d (want 1): tombstones older than the horizon are still stored", removed, st.Tombstones, st.Records)
	}
	// Gone from disk too: a reopened node loads the same.
	n.shutdown(false)
	n2 := open(t, cfg)
	if st := n2.Stats(); st.Tombstones != 1 || st.Records != 1 {
		t.Fatalf("after reopening: tombstones %d, records %d", st.Tombstones, st.Records)
	}
	if !absent(n2, "b", "old-3") || !absent(n2, "b", "young") || !valueIs(n2, "b", "live", "v") {
		t.Fatal("collection changed what is visible")
	}
}

// TestReturnAfterHorizonDoesNotResurrect: b is away for longer than the
// horizon while a deletes a record and a and c collect its tombstone. When
// b returns, the record b still holds must not come back; a record b wrote
// while away must reach the others, and what they wrote must reach b.
func TestReturnAfterHorizonDoesNotResurrect(t *testing.T) {
	clock := &offsetClock{}
	dir := t.TempDir()
	ca, cb, cc := testConfig(t, dir, "a"), testConfig(t, dir, "b"), testConfig(t, dir, "c")
	for _, c := range []*Config{&ca, &cb, &cc} {
		clock.set(c)
		c.AntiEntropyInterval = 200 * time.Millisecond
	}
	a := open(t, ca)
	cb.Join, cc.Join = []string{a.Addr()}, []string{a.Addr()}
	b, c := open(t, cb), open(t, cc)
	waitConverged(t, a, b, c)
	ctx := ctxT(t)
	if err := a.PutAll(ctx, "acct", "doomed", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if err := a.PutAll(ctx, "acct", "kept", []byte("v")); err != nil {
		t.Fatal(err)
	}
	// Let b complete exchanges that include both records.
	rounds := b.Stats().AntiEntropyRounds
	waitFor(t, 10*time.Second, "b's anti-entropy rounds", func() bool { return b.Stats().AntiEntropyRounds >= rounds+4 })
	b.shutdown(false)
	waitFor(t, 10*time.Second, "b dead", func() bool { return aliveCount(a) == 2 && aliveCount(c) == 2 })

	if err := a.Delete(ctx, "acct", "doomed"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "tombstone on c", func() bool { return absent(c, "acct", "doomed") })
	clock.advance(pastHorizon(ca))
	if err := a.Put(ctx, "acct", "new-on-a", []byte("v")); err != nil {
		t.Fatal(err)
	}
	// The tombstone is collected once a and c have exchanged after it.
	collectAfterExchanges(t, a, c)

	// b comes back, writing before it meets anyone.
	cb.Join = []string{a.Addr()}
	cb.AntiEntropyInterval = time.Hour // only the exchanges on meeting
	b2, err := Open(cb)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b2.Close() })
	if err := b2.PutAsync("acct", "new-on-b", []byte("v")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "b caught up", func() bool {
		return valueIs(b2, "acct", "new-on-a", "v") && valueIs(a, "acct", "new-on-b", "v") && valueIs(c, "acct", "new-on-b", "v")
	})
	rounds = b2.Stats().AntiEntropyRounds
	waitFor(t, 20*time.Second, "more exchanges", func() bool { return b2.Stats().AntiEntropyRounds >= rounds+3 })
	for _, n := range []*Node{a, b2, c} {
		if !absent(n, "acct", "doomed") {
			t.Fatalf("%s: the record deleted (and collected) while b was away is back", n.Name())
		}
		if !valueIs(n, "acct", "kept", "v") {
			t.Fatalf("%s: lost a record b had synced before leaving", n.Name())
		}
	}
}

// TestCollectorRunsInBackground: with a short horizon the background pass
// collects without being called.
func TestCollectorRunsInBackground(t *testing.T) {
	cfg := testConfig(t, t.TempDir(), "solo")
	cfg.TombstoneHorizon = 2 * time.Second
	n := open(t, cfg)
	if err := n.Delete(ctxT(t), "b", "k"); err != nil {
		t.Fatal(err)
	}
	if n.Stats().Tombstones != 1 {
		t.Fatal("no tombstone")
	}
	// Horizon 2 s, pass every second (the first one after a second too).
	waitFor(t, 15*time.Second, "the tombstone collected", func() bool {
		st := n.Stats()
		return st.Tombstones == 0 && st.TombstonesCollected == 1
	})
}

// collectAfterExchanges waits until each of nodes has completed two more
// anti-entropy exchanges, then collects garbage on each and requires that
// no tombstone is left (they are past the horizon).
func collectAfterExchanges(t *testing.T, nodes ...*Node) {
	t.Helper()
	for _, n := range nodes {
		rounds := n.Stats().AntiEntropyRounds
		waitFor(t, 10*time.Second, "an exchange after the delete", func() bool { return n.Stats().AntiEntropyRounds >= rounds+2 })
	}
	for _, n := range nodes {
		if _, err := n.collectGarbage(); err != nil {
			t.Fatal(err)
		}
		if st := n.Stats(); st.Tombstones != 0 {
			t.Fatalf("%s: %d tombstones left after the horizon (GC missing)", n.Name(), st.Tombstones)
		}
	}
}
