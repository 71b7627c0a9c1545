package replicator

import (
	"encoding/binary"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Clock skew.
//
// Versions are hybrid logical clock timestamps, so a node whose wall clock
// is fast would win every conflict until the others' clocks caught up, and
// observing its timestamps would drag their clocks forward too. A node
// therefore refuses every remote version more than Config.MaxClockSkew
// ahead of its own wall clock:
//   - the record is not applied and the clock does not observe it;
//   - it is kept aside in memory (at most asideMax records, asideMaxBytes,
//     and only if it is less than asideHorizon ahead; one per key, the
//     winner) and applied by asideLoop once the local clock has come within
//     MaxClockSkew of it. A record that cannot be kept is not lost: its
//     writer still has it and anti-entropy offers it again every round;
//   - a replication stream acknowledges only the records it accepted, so the
//     writer's Put does not count a refusing node as a copy (it returns
//     ErrAckTimeout wrapping ErrClockSkew at once when the refusals make the
//     wanted count unreachable).
//
// Each node measures every peer's clock offset from memberlist's probes:
// the acker puts its wall time in the ack payload and the prober computes
// offset = their_time - (sent + rtt/2), keeping the sample with the
// smallest round trip of the last few that agree with the latest (older
// ones predate a step of the peer's clock), corrected for steps of our own
// clock since. Members reports it; a peer beyond the maximum is logged (at
// most once a minute per peer).
//
// "The local clock" above is circleNow, the circle's time as this node
// knows it:
//   - with three or more clocks measured recently (this node's and its
//     peers'), their median (lower middle for an even count). So a node
//     whose clock alone is wrong, slow or fast, follows the others: it
//     accepts their records and versions its own writes by their time,
//     instead of refusing everything current (slow) or having all its
//     writes refused (fast). A majority of wrong clocks wins. The circle's
//     time never goes back: when the median falls below the circle time
//     last known (carried forward by the monotonic clock), the latter is
//     kept, or records written in between would be ahead of everyone.
//   - with fewer (two nodes, or cut off from the circle), this node's wall
//     clock, unless it stepped away from the circle's time this node last
//     knew: the last circle time it measured (from a median, or from two
//     clocks that agreed) carried forward by the monotonic clock is used
//     while the wall clock differs from it by more than MaxClockSkew. So a
//     clock stepped 10 minutes forward while the node is cut off does not
//     version its writes 10 minutes ahead (they would win every conflict
//     after the heal). Between two nodes that disagree and were never
//     seen to agree, nobody can tell which is wrong: each keeps its own.
// Offsets in Members and the probe acks are wall clock offsets (what an
// admin must fix), not corrected ones.

const (
	asideMax      = 10000              // records kept aside
	asideMaxBytes = 32 << 20           // bytes of keys and values kept aside
	asideHorizon  = 7 * 24 * time.Hour // records further ahead are refused without being kept
	asideRetry    = time.Second        // how often kept records are checked
	skewWarnEvery = time.Minute        // per node, for refusal and offset warnings
	clockSamples  = 5                  // offset samples kept per peer
	clockFresh    = 30 * time.Second   // measurements older than this do not count in circleNow

	// pingClockV1 tags the probe ack payload: 1 byte 0x01, then the
	// acker's wall clock as int64 Unix nanoseconds, big-endian (9 bytes).
	// Other payloads (older nodes send none) are ignored.
	pingClockV1 = 1
)

// errSkewRefused: a peer acknowledged fewer records than it was sent,
// because it refused the others for clock skew.
var errSkewRefused = errors.New("peer refused the record: this node's clock is ahead of the peer's")

// skewState is a Node's clock-skew bookkeeping.
type skewState struct {
	// Node.mu guards aside and asideBytes.
	aside      map[[2]string]Record // refused records by bucket and key
	asideBytes int

	refused atomic.Uint64 // remote records refused (each offer counts)

	mu     sync.Mutex            // guards the following
	peers  map[string]*peerClock // offset measurements by peer name
	warned map[string]time.Time  // last refusal warning by writing node
	// The circle's time as last measured (circleNow): wall reading
	// without monotonic part, and the monotonic clock then.
	anchorWall, anchorMono time.Time
	hasAnchor              bool

	known atomic.Bool // the circle's time was measured at least once (circleKnown)
}

// peerClock is what a node measured of a peer's clock.
type peerClock struct {
	samples [clockSamples]clockSample
	n       int       // samples taken (the ring holds the last clockSamples)
	at      time.Time // last sample (monotonic)
	warned  time.Time // last offset warning
}

// clockSample is one measurement: the peer's clock minus ours, the probe's
// round trip (the error is at most half of it), and when it was taken by
// our wall clock (without monotonic reading) and by the monotonic clock.
type clockSample struct {
	offset, rtt time.Duration
	wall, mono  time.Time
}

// clockSlack is added to the error bound when samples are compared.
const clockSlack = 10 * time.Millisecond

// offset returns the peer's clock minus ours at wall time now (our Now
// without monotonic reading): the sample with the smallest round trip among
// those that agree with the latest, corrected for steps of our own clock
// since it was taken. Samples that disagree with the latest by more than
// their errors predate a step of the peer's clock. pc.n must be > 0.
func (pc *peerClock) offset(now time.Time) time.Duration {
	adj := func(s clockSample) time.Duration { // our steps since s shift the offset
		return s.offset - (now.Sub(s.wall) - time.Since(s.mono))
	}
	latest := pc.samples[(pc.n-1)%clockSamples]
	latestOff := adj(latest)
	best, bestOff := latest, latestOff
	for _, s := range pc.samples[:min(pc.n, clockSamples)] {
		o := adj(s)
		if s.rtt >= best.rtt || (o-latestOff).Abs() > (s.rtt+latest.rtt)/2+clockSlack {
			continue
		}
		best, bestOff = s, o
	}
	return bestOff
}

// newClock returns the node's clock starting at the stored timestamp last,
// unless that is further ahead of the wall clock than cfg.MaxClockSkew (a
// clock stepped back since, or a version stored by a build that did not
// refuse skewed records): then at the ceiling, so that new versions are
// ones peers accept.
func newClock(last uint64, cfg Config) hlc {
	c := hlc{now: cfg.Now, maxAhead: cfg.MaxClockSkew}
	if ceil := c.ceiling(); last > ceil {
		cfg.Logger.Warn("stored clock is ahead of the wall clock by more than the maximum skew; starting at the maximum",
			"ahead", time.Until(Version{Time: last}.WallTime()).Round(time.Millisecond), "max_clock_skew", cfg.MaxClockSkew)
		last = ceil
	}
	c.last = last
	return c
}

// screenLocked returns the records of recs that are not too far ahead of
// the local clock; it keeps the others aside. n.mu must be held.
func (n *Node) screenLocked(recs []Record) []Record {
	ceil := n.clock.ceiling()
	var out []Record
	for i := range recs {
		r := &recs[i]
		if r.Version.Time <= ceil {
			if out != nil {
				out = append(out, *r)
			}
			continue
		}
		if out == nil {
			out = append(make([]Record, 0, len(recs)), recs[:i]...)
		}
		n.skew.refused.Add(1)
		kept := n.keepAsideLocked(r)
		n.warnRefused(r, kept)
	}
	if out == nil {
		return recs
	}
	return out
}

// keepAsideLocked keeps r until the clock catches up with it; it reports
// false if r is too far ahead or there is no room. n.mu must be held.
func (n *Node) keepAsideLocked(r *Record) bool {
	if r.Version.Time>>16 > physical(n.cfg.Now().Add(asideHorizon))>>16 {
		return false
	}
	k := [2]string{r.Bucket, r.Key}
	size := len(r.Bucket) + len(r.Key) + len(r.Value) + len(r.Version.Node)
	old, ok := n.skew.aside[k]
	if ok {
		if !beats(n.fww[r.Bucket], r.meta(), old.meta()) {
			return true // the one kept wins over r anyway
		}
		n.skew.asideBytes -= len(old.Bucket) + len(old.Key) + len(old.Value) + len(old.Version.Node)
	} else if len(n.skew.aside) >= asideMax || n.skew.asideBytes+size > asideMaxBytes {
		return false
	}
	if n.skew.aside == nil {
		n.skew.aside = make(map[[2]string]Record)
	}
	n.skew.aside[k] = *r
	n.skew.asideBytes += size
	return true
}

// warnRefused logs a refused record, at most once per skewWarnEvery per
// writing node. Called with n.mu held.
func (n *Node) warnRefused(r *Record, kept bool) {
	now := time.Now()
	n.skew.mu.Lock()
	last, ok := n.skew.warned[r.Version.Node]
	if ok && now.Sub(last) < skewWarnEvery {
		n.skew.mu.Unlock()
		return
	}
	if n.skew.warned == nil {
		n.skew.warned = make(map[string]time.Time)
	}
	n.skew.warned[r.Version.Node] = now
	n.skew.mu.Unlock()
	ahead := r.Version.WallTime().Sub(n.clock.now()).Round(time.Millisecond) // saturates at ~292 years
	n.log.Warn("refused records versioned by a clock ahead of ours", "node", r.Version.Node, "ahead", ahead,
		"version", r.Version.String(), "max_clock_skew", n.cfg.MaxClockSkew, "kept_aside", kept, "bucket", r.Bucket)
}

// asideLoop applies kept-aside records once the local clock has caught up
// with them, until Close.
func (n *Node) asideLoop() {
	defer n.wg.Done()
	t := time.NewTicker(asideRetry)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
		n.mu.Lock()
		var due []Record
		if len(n.skew.aside) > 0 {
			ceil := n.clock.ceiling()
			for k, r := range n.skew.aside {
				if r.Version.Time <= ceil {
					due = append(due, r)
					delete(n.skew.aside, k)
					n.skew.asideBytes -= len(r.Bucket) + len(r.Key) + len(r.Value) + len(r.Version.Node)
				}
			}
		}
		n.mu.Unlock()
		if len(due) == 0 {
			continue
		}
		if err := n.applyRemote(due, false); err != nil {
			n.log.Error("storing records kept aside for clock skew (anti-entropy will offer them again)", "count", len(due), "error", err)
			continue
		}
		n.log.Info("applied records kept aside until our clock caught up", "count", len(due))
	}
}

// clockPayload is this node's probe ack payload (see pingClockV1).
func (n *Node) clockPayload() []byte {
	b := make([]byte, 9)
	b[0] = pingClockV1
	binary.BigEndian.PutUint64(b[1:], uint64(n.cfg.Now().UnixNano()))
	return b
}

// noteClock records a peer's clock from a probe ack received now (rtt
// after the probe was sent). Called from memberlist's probe goroutine.
func (n *Node) noteClock(peer string, rtt time.Duration, payload []byte) {
	if len(payload) != 9 || payload[0] != pingClockV1 || rtt < 0 {
		return
	}
	theirs := time.Unix(0, int64(binary.BigEndian.Uint64(payload[1:])))
	mono, now := time.Now(), n.cfg.Now().Round(0)
	offset := theirs.Sub(now.Add(-rtt / 2))
	n.skew.mu.Lock()
	if n.skew.peers == nil {
		n.skew.peers = make(map[string]*peerClock)
	}
	pc := n.skew.peers[peer]
	if pc == nil {
		pc = &peerClock{}
		n.skew.peers[peer] = pc
	}
	pc.samples[pc.n%clockSamples] = clockSample{offset: offset, rtt: rtt, wall: now, mono: mono}
	pc.n++
	pc.at = time.Now()
	est := pc.offset(now)
	warn := (est > n.cfg.MaxClockSkew || est < -n.cfg.MaxClockSkew) && time.Since(pc.warned) >= skewWarnEvery
	if warn {
		pc.warned = time.Now()
	}
	n.skew.mu.Unlock()
	if !warn {
		return
	}
	n.log.Warn("a peer's clock differs from ours by more than the maximum skew (the records of the one ahead wait until the other catches up)", "node", peer, "offset", est.Round(time.Millisecond), "max_clock_skew", n.cfg.MaxClockSkew)
}

// fillClockOffsets sets the measured clock offsets of ms (Members).
func (n *Node) fillClockOffsets(ms []Member) {
	now := n.cfg.Now().Round(0)
	n.skew.mu.Lock()
	defer n.skew.mu.Unlock()
	for i := range ms {
		if pc := n.skew.peers[ms[i].Name]; pc != nil && ms[i].Name != n.cfg.Name {
			ms[i].ClockOffset, ms[i].ClockMeasured = pc.offset(now), true
		}
	}
}

// Now returns the circle's time as this node knows it (see the top of
// this file): the median of the circle's clocks, or this node's wall clock
// (Config.Now) unless it stepped away from the circle's time last known. It
// is the time versions are made and judged by; services on top of the
// store (identity) use it so that a node whose clock alone is wrong follows
// the circle there too. Safe for concurrent use; cheap.
func (n *Node) Now() time.Time { return n.circleNow() }

// circleNow implements Now (see the top of this file).
func (n *Node) circleNow() time.Time {
	now := n.cfg.Now()
	wall := now.Round(0)
	var buf [16]time.Duration
	offsets := append(buf[:0], 0)
	n.skew.mu.Lock()
	for _, pc := range n.skew.peers {
		if time.Since(pc.at) < clockFresh {
			offsets = append(offsets, pc.offset(wall))
		}
	}
	n.skew.mu.Unlock()
	var t time.Time
	measured := false
	switch {
	case len(offsets) >= 3:
		slices.Sort(offsets)
		t, measured = now.Add(offsets[(len(offsets)-1)/2]), true
	case len(offsets) == 2 && offsets[1].Abs() <= n.cfg.MaxClockSkew:
		t, measured = now, true // two clocks that agree: ours is the circle's
	}
	a, ok := n.skew.anchored()
	switch {
	case !ok && !measured:
		return now // the circle's time was never measured: our own clock
	case !ok:
		// first measurement
	case !measured:
		// Only our own clock: follow it unless it stepped away from the
		// circle's time we last knew (back, or ahead by more than the
		// maximum).
		if now.Before(a) || now.Sub(a) > n.cfg.MaxClockSkew {
			return a
		}
		t = now
	case t.Before(a):
		// The circle's time never goes back: a median that falls (a clock
		// stepped back, or a node with another clock became the middle
		// one) would leave every record written since ahead of it.
		t = a
	}
	n.skew.anchor(t)
	return t
}

// circleKnown reports whether the last circleNow came from the circle's
// clocks (now or as last measured) rather than from this node's wall
// clock alone: only then may the HLC come back from timestamps that ran
// ahead (hlc.next).
func (n *Node) circleKnown() bool { return n.skew.known.Load() }

// anchor records t as the circle's time now.
func (s *skewState) anchor(t time.Time) {
	s.mu.Lock()
	s.anchorWall, s.anchorMono, s.hasAnchor = t.Round(0), time.Now(), true
	s.mu.Unlock()
	s.known.Store(true)
}

// anchored returns the last anchored circle time carried forward by the
// monotonic clock; ok is false if there is none.
func (s *skewState) anchored() (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.hasAnchor {
		return time.Time{}, false
	}
	return s.anchorWall.Add(time.Since(s.anchorMono)), true
}
