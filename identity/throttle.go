package identity

import (
	"context"
	"encoding/json"
	"net/netip"
	"sync"
	"time"
)

// Login throttling.
//
// Failures are counted per IP address ("ip:<addr>", IPv6 by /64) and per
// username ("acct:<normalised username>", also for names that do not exist,
// so throttling reveals nothing about which accounts exist), in fixed
// windows of ThrottleWindow starting at the first failure. When either
// count reaches its limit, Login returns a *ThrottledError until the window
// ends, without hashing. Attempts rejected as throttled are not counted, so
// an attacker can lock a username (for everyone) or an IP only until the
// end of the window in which the limit was reached; a successful login
// resets the username's counter.
//
// Counters live in memory and are replicated best-effort through the
// throttle bucket (PutAsync of the window, JSON {"v":1,"start","count"}); a node
// merges a remote window by taking the larger count of the same window, so
// an attacker spreading attempts over nodes gains at most a factor of the
// number of nodes, and usually much less. Records whose window is over are
// deleted by sweepThrottle (the replicated store then collects their
// tombstones after its horizon), so typed names do not pile up.

// throttleRecord is the value of throttle/<key>, as JSON.
type throttleRecord struct {
	V     int       `json:"v"` // format version, 1
	Start time.Time `json:"start"`
	Count int       `json:"count"`
}

type throttler struct {
	window time.Duration

	mu sync.Mutex // guards m
	m  map[string]throttleRecord
}

func newThrottler(cfg Config) *throttler {
	return &throttler{window: cfg.ThrottleWindow, m: make(map[string]throttleRecord)}
}

// ipThrottleKey reduces an address to what is counted: the address itself
// for IPv4, its /64 for IPv6 (one host usually has a whole /64).
func ipThrottleKey(ip string) string {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		if ap, err2 := netip.ParseAddrPort(ip); err2 == nil {
			a, err = ap.Addr(), nil
		}
	}
	if err != nil {
		return truncateUTF8(ip, maxIP)
	}
	a = a.Unmap().WithZone("")
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.String()
	}
	return a.String()
}

// check returns a *ThrottledError if key1 has reached limit1 or key2 has
// reached limit2 in their current windows.
func (t *throttler) check(now time.Time, key1 string, limit1 int, key2 string, limit2 int) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var retry time.Duration
	for _, kl := range [2]struct {
		key   string
		limit int
	}{{key1, limit1}, {key2, limit2}} {
		r, ok := t.m[kl.key]
		if !ok || kl.limit <= 0 || r.Count < kl.limit {
			continue
		}
		end := r.Start.Add(t.window)
		if !now.Before(end) {
			continue
		}
		retry = max(retry, end.Sub(now))
	}
	if retry == 0 {
		return nil
	}
	retry = (retry + time.Second - 1).Truncate(time.Second)
	return &ThrottledError{RetryAfter: retry}
}

// fail counts a failure for each key and replicates the new counts.
func (t *throttler) fail(store Store, now time.Time, keys ...string) {
	recs := make([]throttleRecord, len(keys))
	t.mu.Lock()
	for i, k := range keys {
		r, ok := t.m[k]
		if !ok || !now.Before(r.Start.Add(t.window)) || now.Before(r.Start) {
			r = throttleRecord{V: 1, Start: now.UTC()}
		}
		r.Count++
		t.m[k] = r
		recs[i] = r
	}
	t.mu.Unlock()
	for i, k := range keys {
		b, _ := json.Marshal(recs[i])
		_ = store.PutAsync(bucketThrottle, k, b) // best effort
	}
}

// reset clears key's counter here and, best-effort, elsewhere.
func (t *throttler) reset(store Store, key string) {
	t.mu.Lock()
	_, ok := t.m[key]
	delete(t.m, key)
	t.mu.Unlock()
	if ok {
		b, _ := json.Marshal(throttleRecord{V: 1})
		_ = store.PutAsync(bucketThrottle, key, b)
	}
}

// merge applies a counter from another node (or our own echo).
func (t *throttler) merge(key string, r throttleRecord, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.m[key]
	switch {
	case r.Count <= 0:
		// A reset (after a successful login somewhere): only usernames.
		if ok && len(key) > 5 && key[:5] == "acct:" {
			delete(t.m, key)
		}
	case !now.Before(r.Start.Add(t.window)) || r.Start.After(now.Add(maxClockSkew)):
		// Stale or bogus window.
	case !ok || !now.Before(cur.Start.Add(t.window)):
		t.m[key] = r
	case r.Count > cur.Count:
		cur.Count = r.Count
		t.m[key] = cur
	}
}

// prune drops finished windows.
func (t *throttler) prune(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, r := range t.m {
		if !now.Before(r.Start.Add(t.window)) {
			delete(t.m, k)
		}
	}
}

// onThrottleEvent is the throttle bucket watch callback.
func (s *Service) onThrottleEvent(key string, value []byte, deleted bool) {
	if deleted {
		return
	}
	var r throttleRecord
	if err := json.Unmarshal(value, &r); err != nil {
		return
	}
	s.thr.merge(key, r, s.cfg.Now())
}

// sweepThrottle deletes, at most every half ThrottleWindow and
// maxPrunePerRun at a time, the throttle records whose window is over
// (and resets and undecodable values): anyone on the internet creates one
// per typed username or IP. Deleted, they become tombstones that the
// replicated store collects after its horizon. Every node sweeps; a record
// deleted twice is harmless.
func (s *Service) sweepThrottle(ctx context.Context, now time.Time) {
	s.pruneMu.Lock()
	due := s.lastSweep.IsZero() || !now.Before(s.lastSweep.Add(s.cfg.ThrottleWindow/2)) || now.Before(s.lastSweep)
	if due {
		s.lastSweep = now
	}
	s.pruneMu.Unlock()
	if !due {
		return
	}
	entries, err := s.store.List(bucketThrottle, "")
	if err != nil {
		s.log.Warn("listing throttle records", "error", err)
		return
	}
	n := 0
	for _, e := range entries {
		var r throttleRecord
		if err := json.Unmarshal(e.Value, &r); err == nil && r.Count > 0 && now.Before(r.Start.Add(s.cfg.ThrottleWindow)) {
			continue // a window still counting
		}
		if n++; n > maxPrunePerRun || ctx.Err() != nil {
			return
		}
		if err := s.store.Delete(ctx, bucketThrottle, e.Key); err != nil {
			s.log.Warn("deleting a stale throttle record", "key", e.Key, "error", err)
		}
	}
}
