package identity

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// fakeClock is a settable clock for Config.Now.
type fakeClock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

var testSecret = bytes.Repeat([]byte{7}, 32)

// testConfig uses tiny argon2 parameters so tests are fast.
func testConfig(clock *fakeClock) Config {
	cfg := DefaultConfig()
	cfg.Domain = "ourcircle.net"
	cfg.Secret = testSecret
	cfg.Argon2Memory = 64
	cfg.Argon2Time = 1
	cfg.Now = clock.Now
	cfg.Logger = slog.New(slog.DiscardHandler)
	return cfg
}

// newTestService starts a Service on store (a new MemStore if nil).
func newTestService(t testing.TB, store Store, clock *fakeClock, mod ...func(*Config)) *Service {
	t.Helper()
	if store == nil {
		store = NewMemStore()
	}
	if clock == nil {
		clock = newClock()
	}
	cfg := testConfig(clock)
	for _, m := range mod {
		m(&cfg)
	}
	s, err := New(store, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mustCreate(t testing.TB, s *Service, username, password string, groups ...string) Account {
	t.Helper()
	a, err := s.CreateAccount(context.Background(), NewAccount{Username: username, Password: password, Name: "N " + username, Email: username + "@example.com", Groups: groups})
	if err != nil {
		t.Fatalf("CreateAccount(%s): %v", username, err)
	}
	return a
}

func mustIssue(t testing.TB, s *Service, a Account) (string, Session) {
	t.Helper()
	tok, sess, err := s.IssueSession(context.Background(), a, "test-agent", "192.0.2.1")
	if err != nil {
		t.Fatalf("IssueSession: %v", err)
	}
	return tok, sess
}

// eventually polls cond until it is true or the deadline passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond) // polling interval, not synchronisation
	}
}
