package identity

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

func throttled(t *testing.T, err error) *ThrottledError {
	t.Helper()
	var te *ThrottledError
	if !errors.As(err, &te) || !errors.Is(err, ErrThrottled) {
		t.Fatalf("err = %v, want *ThrottledError", err)
	}
	return te
}

func TestThrottlePerAccount(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	s := newTestService(t, nil, clock, func(c *Config) { c.AccountFailures, c.IPFailures = 3, 100 })
	mustCreate(t, s, "alice", "password1")
	for i := range 3 {
		if _, err := s.Login(ctx, "alice", "wrong-pass", fmt.Sprintf("192.0.2.%d", i)); !errors.Is(err, ErrBadCredentials) {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	// Locked from every IP, even with the right password, without hashing.
	clock.Advance(time.Minute)
	before := s.hasher.computed.Load()
	_, err := s.Login(ctx, "ALICE", "password1", "198.51.100.1")
	te := throttled(t, err)
	if te.RetryAfter != 4*time.Minute {
		t.Fatalf("RetryAfter %v, want 4m", te.RetryAfter)
	}
	if te.Error() == "" || s.hasher.computed.Load() != before {
		t.Fatal("throttled login hashed")
	}
	// Other accounts are unaffected.
	mustCreate(t, s, "bob", "password1")
	if _, err := s.Login(ctx, "bob", "password1", "192.0.2.0"); err != nil {
		t.Fatalf("other account: %v", err)
	}
	// Attempts while throttled do not extend the lockout beyond the window.
	for range 10 {
		clock.Advance(20 * time.Second)
		_, err := s.Login(ctx, "alice", "wrong-pass", "203.0.113.1")
		throttled(t, err)
	}
	clock.Advance(4*time.Minute - 200*time.Second)
	if _, err := s.Login(ctx, "alice", "password1", "203.0.113.1"); err != nil {
		t.Fatalf("after the window: %v", err)
	}
}

func TestThrottleSuccessResets(t *testing.T) {
	ctx := context.Background()
	s := newTestService(t, nil, nil, func(c *Config) { c.AccountFailures, c.IPFailures = 3, 100 })
	mustCreate(t, s, "alice", "password1")
	for round := range 3 {
		for range 2 {
			if _, err := s.Login(ctx, "alice", "wrong-pass", "192.0.2.1"); !errors.Is(err, ErrBadCredentials) {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if _, err := s.Login(ctx, "alice", "password1", "192.0.2.1"); err != nil {
			t.Fatalf("round %d success: %v", round, err)
		}
	}
}

func TestThrottlePerIP(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	s := newTestService(t, nil, clock, func(c *Config) { c.AccountFailures, c.IPFailures = 100, 3 })
	mustCreate(t, s, "alice", "password1")
	for i := range 3 {
		// Different (even unknown) usernames from one IP.
		if _, err := s.Login(ctx, fmt.Sprintf("user%d", i), "password1", "192.0.2.1"); !errors.Is(err, ErrBadCredentials) {
			t.Fatal(err)
		}
	}
	_, err := s.Login(ctx, "alice", "password1", "192.0.2.1")
	throttled(t, err)
	if _, err := s.Login(ctx, "alice", "password1", "192.0.2.2"); err != nil {
		t.Fatalf("other IP: %v", err)
	}
	// A successful login does not reset the IP counter.
	_, err = s.Login(ctx, "alice", "password1", "192.0.2.1")
	throttled(t, err)

	// IPv6: the whole /64 counts as one.
	for i := range 3 {
		_, _ = s.Login(ctx, "nobody", "password1", fmt.Sprintf("2001:db8:1:2::%d", i+1))
	}
	_, err = s.Login(ctx, "alice", "password1", "[2001:db8:1:2:ffff::1]:443")
	throttled(t, err)
	if _, err := s.Login(ctx, "alice", "password1", "2001:db8:1:3::1"); err != nil {
		t.Fatalf("other /64: %v", err)
	}
	clock.Advance(DefaultThrottleWindow)
	if _, err := s.Login(ctx, "alice", "password1", "192.0.2.1"); err != nil {
		t.Fatalf("after window: %v", err)
	}
}

// TestThrottleReplicated: counters are shared through the throttle bucket.
func TestThrottleReplicated(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	mod := func(c *Config) { c.AccountFailures, c.IPFailures = 4, 100 }
	s1 := newTestService(t, store, clock, mod)
	s2 := newTestService(t, store, clock, mod)
	mustCreate(t, s1, "alice", "password1")
	for range 2 {
		_, _ = s1.Login(ctx, "alice", "wrong-pass", "192.0.2.1")
	}
	for range 2 {
		_, _ = s2.Login(ctx, "alice", "wrong-pass", "192.0.2.2")
	}
	_, err := s1.Login(ctx, "alice", "password1", "192.0.2.3")
	throttled(t, err)
	_, err = s2.Login(ctx, "alice", "password1", "192.0.2.3")
	throttled(t, err)
	clock.Advance(DefaultThrottleWindow)
	if _, err := s2.Login(ctx, "alice", "password1", "192.0.2.3"); err != nil {
		t.Fatal(err)
	}
	// The reset on success replicates too.
	for range 3 {
		_, _ = s1.Login(ctx, "alice", "wrong-pass", "192.0.2.1")
	}
	if _, err := s2.Login(ctx, "alice", "password1", "192.0.2.3"); err != nil {
		t.Fatal(err)
	}
	if _, err := s1.Login(ctx, "alice", "wrong-pass", "192.0.2.1"); !errors.Is(err, ErrBadCredentials) {
		t.Fatalf("reset did not reach node 1: %v", err)
	}
}

func TestThrottleMergeAndPrune(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	th := newThrottler(Config{ThrottleWindow: time.Minute})
	th.merge("ip:x", throttleRecord{Start: now.Add(-2 * time.Minute), Count: 50}, now) // stale
	th.merge("ip:y", throttleRecord{Start: now.Add(time.Hour), Count: 50}, now)        // from the future
	if len(th.m) != 0 {
		t.Fatalf("merged bogus windows: %v", th.m)
	}
	th.merge("ip:z", throttleRecord{Start: now, Count: 2}, now)
	th.merge("ip:z", throttleRecord{Start: now, Count: 1}, now)
	th.merge("ip:z", throttleRecord{}, now) // resets apply to usernames only
	if th.m["ip:z"].Count != 2 {
		t.Fatalf("merge %v", th.m)
	}
	th.prune(now.Add(time.Minute))
	if len(th.m) != 0 {
		t.Fatalf("prune left %v", th.m)
	}
	for in, want := range map[string]string{
		"192.0.2.1": "192.0.2.1", "192.0.2.1:8080": "192.0.2.1", "::ffff:192.0.2.1": "192.0.2.1",
		"2001:db8::1": "2001:db8::/64", "fe80::1%eth0": "fe80::/64", "junk": "junk",
	} {
		if got := ipThrottleKey(in); got != want {
			t.Errorf("ipThrottleKey(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestThrottleRecordsExpire: throttle records (one per typed username or
// IP, from anyone on the internet) are removed from the store once their
// window is over, so they become tombstones the replicator collects.
func TestThrottleRecordsExpire(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	store := NewMemStore()
	s := newTestService(t, store, clock, func(c *Config) { c.AccountFailures, c.IPFailures = 100, 100 })
	for i := range 5 {
		if _, err := s.Login(ctx, fmt.Sprintf("nobody-%d", i), "wrong-pass", fmt.Sprintf("192.0.2.%d", i)); !errors.Is(err, ErrBadCredentials) {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	recs, err := store.List(bucketThrottle, "")
	if err != nil || len(recs) != 10 {
		t.Fatalf("throttle records before expiry: %d, %v (want 10)", len(recs), err)
	}
	// Within the window they stay.
	clock.Advance(s.cfg.ThrottleWindow / 2)
	s.maintain(ctx)
	if recs, _ := store.List(bucketThrottle, ""); len(recs) != 10 {
		t.Fatalf("%d throttle records inside the window, want 10", len(recs))
	}
	clock.Advance(s.cfg.ThrottleWindow)
	s.maintain(ctx)
	if recs, _ := store.List(bucketThrottle, ""); len(recs) != 0 {
		t.Fatalf("%d throttle records left after their window ended (never removed)", len(recs))
	}
}
