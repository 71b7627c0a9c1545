package identity

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestStartCloseNoLeaks(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	store := NewMemStore()
	s, err := New(store, testConfig(newClock()))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 { // a closed Service can be started again
		if err := s.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Watches are cancelled: writes after Close reach no callback.
	s.stateMu.RLock()
	n := len(s.accounts)
	s.stateMu.RUnlock()
	other := newTestService(t, store, nil)
	mustCreate(t, other, "zed", "password1")
	s.stateMu.RLock()
	defer s.stateMu.RUnlock()
	if len(s.accounts) != n {
		t.Fatal("closed service still watching")
	}
	other.Close()
}

// stallStore makes Put block until its context ends, like a replicated
// store waiting for acknowledgements that never come.
type stallStore struct{ Store }

func (s stallStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	<-ctx.Done()
	return ctx.Err()
}

func TestStartFailsWithoutKey(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	s, err := New(stallStore{NewMemStore()}, testConfig(newClock()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.Start(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start: %v", err)
	}
	if _, err := s.signingKey(); !errors.Is(err, ErrNotStarted) {
		t.Fatal("key usable although never stored")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestMaintenanceLoopRuns: the loop started by Start rotates on its own
// (KeyRotation short enough for the one-second tick).
func TestMaintenanceLoopRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for a real one-second tick")
	}
	clock := newClock()
	s := newTestService(t, nil, clock, func(c *Config) { c.KeyRotation = 2 * time.Second })
	first, _ := s.signingKey()
	clock.Advance(time.Hour)
	eventually(t, "the maintenance loop to rotate", func() bool {
		k, err := s.signingKey()
		return err == nil && k.kid != first.kid
	})
}
