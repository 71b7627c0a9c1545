package replicator

import (
	"errors"
	"fmt"
	"math"
	"sync/atomic"
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

// settableClock is a wall clock at a settable offset from the real one.
type settableClock struct{ off atomic.Int64 }

func (c *settableClock) Now() time.Time        { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *settableClock) Set(off time.Duration) { c.off.Store(int64(off)) }

// TestSkewKeptAsideThenApplied: a record too far ahead is refused, kept
// aside without moving the clock, and applied once the clock catches up.
func TestSkewKeptAsideThenApplied(t *testing.T) {
	var clk settableClock
	n := cluster(t, 1, func(c *Config) { c.Now = clk.Now })[0]
	ahead := time.Now().Add(5 * time.Minute)
	rec := Record{Bucket: "x", Key: "k", Value: []byte("later"), Version: Version{Time: physical(ahead), Node: "peer"}}
	held, err := n.applyRemoteHeld([]Record{rec}, false)
	if err != nil || held != 0 {
		t.Fatalf("applyRemoteHeld = %d, %v; want 0 held", held, err)
	}
	older := rec
	older.Value, older.Version.Time = []byte("older"), physical(ahead.Add(-time.Second))
	if err := n.applyRemote([]Record{older}, false); err != nil {
		t.Fatal(err)
	}
	if !absent(n, "x", "k") {
		t.Fatal("a record 5 min ahead was applied")
	}
	if st := n.Stats(); st.SkewRefused != 2 || st.KeptAside != 1 {
		t.Fatalf("stats: refused %d, kept aside %d; want 2, 1", st.SkewRefused, st.KeptAside)
	}
	notDragged(t, n, "x", "k")
	clk.Set(5 * time.Minute)
	waitFor(t, 5*time.Second, "the kept record is applied once the clock caught up", func() bool { return valueIs(n, "x", "k", "later") })
	if st := n.Stats(); st.KeptAside != 0 {
		t.Fatalf("still kept aside: %d", st.KeptAside)
	}
}

// TestSkewAsideBounded: records kept aside are bounded in number; more are
// refused without being kept, and records beyond the horizon are not kept.
func TestSkewAsideBounded(t *testing.T) {
	n := cluster(t, 1, nil)[0]
	base := physical(time.Now().Add(time.Hour))
	recs := make([]Record, asideMax+10)
	for i := range recs {
		recs[i] = Record{Bucket: "x", Key: fmt.Sprintf("k%05d", i), Value: []byte("v"), Version: Version{Time: base + uint64(i), Node: "peer"}}
	}
	if err := n.applyRemote(recs, false); err != nil {
		t.Fatal(err)
	}
	far := Record{Bucket: "x", Key: "far", Value: []byte("v"), Version: Version{Time: physical(time.Now().Add(asideHorizon + time.Hour)), Node: "peer"}}
	if err := n.applyRemote([]Record{far}, false); err != nil {
		t.Fatal(err)
	}
	if st := n.Stats(); st.KeptAside != asideMax || st.SkewRefused != asideMax+11 || st.Records != 0 {
		t.Fatalf("stats %+v; want %d kept aside, %d refused, no records", st, asideMax, asideMax+11)
	}
}

// TestSkewFastWriterIsTold: a Put on a node whose clock is ahead of its
// peers' returns ErrClockSkew (and ErrAckTimeout) instead of counting the
// refusing peers as copies; the peers apply the record once their clocks
// catch up; each side measures the other's offset.
func TestSkewFastWriterIsTold(t *testing.T) {
	var slow settableClock
	nodes := cluster(t, 2, func(c *Config) {
		if c.Name == "n0" {
			c.Now = slow.Now
		} else {
			c.Now = fastClock
		}
	})
	n0, fast := nodes[0], nodes[1]
	start := time.Now()
	err := fast.Put(ctxT(t), "x", "k", []byte("v"))
	if !errors.Is(err, ErrClockSkew) || !errors.Is(err, ErrAckTimeout) {
		t.Fatalf("Put on the fast node: %v", err)
	}
	if d := time.Since(start); d >= DefaultAckTimeout {
		t.Errorf("Put took %v: the refusal should end the wait", d)
	}
	if !valueIs(fast, "x", "k", "v") || !absent(n0, "x", "k") {
		t.Fatal("the record must be stored on the writer and not yet on the refusing peer")
	}
	offsetNear := func(n *Node, peer string, want time.Duration) bool {
		for _, m := range n.Members() {
			if m.Name == peer && m.ClockMeasured {
				d := m.ClockOffset - want
				return d > -5*time.Second && d < 5*time.Second // 5 s: half a round trip on a busy machine is far less
			}
		}
		return false
	}
	waitFor(t, 10*time.Second, "offsets measured", func() bool {
		return offsetNear(n0, "n1", 10*time.Minute) && offsetNear(fast, "n0", -10*time.Minute)
	})
	slow.Set(10 * time.Minute) // n0's clock steps forward and catches up
	if !offsetNear(n0, "n1", 0) {
		t.Errorf("n0's offset to n1 does not follow n0's own step at once: %+v", n0.Members())
	}
	waitFor(t, 5*time.Second, "n0 applies the kept record", func() bool { return valueIs(n0, "x", "k", "v") })
}

func TestHLCBounds(t *testing.T) {
	now := time.UnixMilli(1_000_000)
	c := hlc{now: func() time.Time { return now }, maxAhead: time.Minute}
	if c.observe(physical(now.Add(time.Minute + time.Millisecond))) {
		t.Fatal("observed a timestamp beyond the maximum skew")
	}
	if !c.observe(physical(now.Add(time.Minute)) | 0xffff) {
		t.Fatal("refused a timestamp at the maximum skew")
	}
	if c.observe(math.MaxUint64) || c.last == math.MaxUint64 {
		t.Fatal("observed the largest timestamp")
	}
	c = hlc{now: func() time.Time { return now }, last: math.MaxUint64}
	if got := c.next(); got != math.MaxUint64 {
		t.Fatalf("clock wrapped: %x", got)
	}
	if physical(time.Unix(1<<50, 0)) != maxMillis<<16 || physical(time.Unix(-5, 0)) != 0 {
		t.Fatal("physical does not clamp")
	}
	cfg, _ := testConfig(t, t.TempDir(), "x").withDefaults()
	cfg.Now = func() time.Time { return now }
	if c := newClock(math.MaxUint64, cfg); c.last != c.ceiling() {
		t.Fatalf("stored clock not capped: %x", c.last)
	}
	if c := newClock(5, cfg); c.last != 5 {
		t.Fatalf("stored clock changed: %x", c.last)
	}
}

// TestSkewSlowNodeFollowsTheCircle: a node whose clock alone is 10 minutes
// slow takes the circle's median time: it applies the others' writes at
// once (instead of keeping them aside for 10 minutes) and its own later
// writes win over earlier ones of the others.
func TestSkewSlowNodeFollowsTheCircle(t *testing.T) {
	nodes := cluster(t, 3, func(c *Config) {
		if c.Name == "n2" {
			c.Now = func() time.Time { return time.Now().Add(-10 * time.Minute) }
		}
	})
	c0, slow := nodes[0], nodes[2]
	waitFor(t, 10*time.Second, "the slow node measures both peers", func() bool {
		k := 0
		for _, m := range slow.Members() {
			if m.ClockMeasured {
				k++
			}
		}
		return k == 2
	})
	if err := c0.Put(ctxT(t), "x", "k", []byte("c0")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the slow node applies c0's write", func() bool { return valueIs(slow, "x", "k", "c0") })
	if err := slow.Put(ctxT(t), "x", "k", []byte("slow")); err != nil {
		t.Fatalf("Put on the slow node: %v", err)
	}
	for _, n := range nodes {
		waitFor(t, 5*time.Second, n.Name()+" has the slow node's later write", func() bool { return valueIs(n, "x", "k", "slow") })
		notDragged(t, n, "x", "k")
	}
	if d := time.Until(slow.Now()); d.Abs() > 5*time.Second { // 5 s: far above a loopback measurement's error
		t.Errorf("the slow node's circle time is %v off", d)
	}
	if st := slow.Stats(); st.SkewRefused != 0 {
		t.Errorf("the slow node refused %d records", st.SkewRefused)
	}
}

// TestPeerClockSteps: the offset estimate follows a step of either clock at
// once instead of keeping an older sample with a shorter round trip.
func TestPeerClockSteps(t *testing.T) {
	wall := time.Now().Round(0)
	mono := time.Now()
	var pc peerClock
	add := func(off, rtt time.Duration) {
		pc.samples[pc.n%clockSamples] = clockSample{offset: off, rtt: rtt, wall: wall, mono: mono}
		pc.n++
	}
	near := func(got, want time.Duration) bool { return (got - want).Abs() < 20*time.Millisecond } // the test's own run time
	add(100*time.Millisecond, time.Millisecond)
	add(150*time.Millisecond, 100*time.Millisecond) // agrees within the errors (rtt/2 each)
	if got := pc.offset(wall); !near(got, 100*time.Millisecond) {
		t.Fatalf("offset %v, want the short round trip's 100ms", got)
	}
	add(10*time.Minute, 100*time.Millisecond) // the peer's clock stepped forward
	if got := pc.offset(wall); !near(got, 10*time.Minute) {
		t.Fatalf("after the peer's step: %v, want 10m", got)
	}
	// Our own clock steps back 10 minutes: every sample shifts.
	if got := pc.offset(wall.Add(-10 * time.Minute)); !near(got, 20*time.Minute) {
		t.Fatalf("after our step back: %v, want 20m", got)
	}
}

// threeWithClock starts c0, c1 and g (g on clk) on f and waits until g has
// measured both peers' clocks.
func threeWithClock(t *testing.T, f *faultNet, clk *settableClock) (c0, c1, g *Node) {
	t.Helper()
	dir := t.TempDir()
	var nodes []*Node
	for i, name := range []string{"c0", "c1", "g"} {
		cfg := f.config(t, dir, name)
		if i > 0 {
			cfg.Join = []string{nodes[0].Addr()}
		}
		if name == "g" {
			cfg.Now = clk.Now
		}
		nodes = append(nodes, open(t, cfg))
	}
	waitConverged(t, nodes...)
	g = nodes[2]
	waitFor(t, 15*time.Second, "g measures both peers' clocks", func() bool {
		measured := 0
		for _, m := range g.Members() {
			if m.ClockMeasured {
				measured++
			}
		}
		return measured == 2
	})
	return nodes[0], nodes[1], g
}

// TestSkewStepWhileCutOff: g's clock steps 10 minutes forward while g is
// cut off from the circle. Its writes then must not be versioned 10
// minutes ahead: a write made later, in real time, on a correct node wins
// everywhere after the heal (fault suite: clock/plus-10m-during-split).
func TestSkewStepWhileCutOff(t *testing.T) {
	f := newFaultNet()
	var clk settableClock
	c0, c1, g := threeWithClock(t, f, &clk)
	f.Isolate("g")
	waitFor(t, 15*time.Second, "g sees the others gone", func() bool { return aliveCount(g) == 1 })
	clk.Set(10 * time.Minute)
	if err := g.Put(ctxT(t), "x", "k", []byte("on-g")); err != nil {
		t.Fatalf("g alone: %v", err)
	}
	r, _ := g.Get("x", "k")
	if ahead := time.Until(r.Version.WallTime()); ahead > time.Minute {
		t.Errorf("g versioned its write %v ahead of real time", ahead.Round(time.Second))
	}
	if err := c0.Put(ctxT(t), "x", "k", []byte("later-on-c0")); err != nil {
		t.Fatal(err)
	}
	f.Heal()
	if _, err := g.ml.Load().Join([]string{c0.Addr()}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*Node{c0, c1, g} {
		waitFor(t, 15*time.Second, "the later write everywhere ("+n.Name()+")", func() bool { return valueIs(n, "x", "k", "later-on-c0") })
	}
}

// TestSkewFastNodeFollowsTheCircle: g's clock is 10 minutes fast from the
// start. Once it has measured the others, it versions its writes by the
// circle's time: they are accepted at once, not kept aside for 10 minutes.
func TestSkewFastNodeFollowsTheCircle(t *testing.T) {
	f := newFaultNet()
	var clk settableClock
	clk.Set(10 * time.Minute)
	c0, _, g := threeWithClock(t, f, &clk)
	if err := g.Put(ctxT(t), "x", "k2", []byte("from-g")); err != nil {
		t.Fatalf("Put on the fast node after it measured the circle: %v", err)
	}
	waitFor(t, 5*time.Second, "c0 holds g's write", func() bool { return valueIs(c0, "x", "k2", "from-g") })
	if m := g.Now().Sub(time.Now()).Abs(); m > time.Minute {
		t.Errorf("g.Now is %v away from the circle's time", m.Round(time.Second))
	}
}
