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

// TestUnknownKidReload: a key whose watch event has not arrived (here: a
// record written behind the watch's back) is found by one store lookup.
func TestUnknownKidReload(t *testing.T) {
	store := NewMemStore()
	clock := newClock()
	s1 := newTestService(t, store, clock)
	a := mustCreate(t, s1, "alice", "password1")
	s2 := newTestService(t, store, clock)
	if _, err := s1.RotateKey(context.Background()); err != nil {
		t.Fatal(err)
	}
	tok, _ := mustIssue(t, s1, a)
	kid := headerKID(t, tok)
	s2.removeKey(kid) // as if the event were still in flight
	if _, err := s2.Verify(tok); err != nil {
		t.Fatalf("unknown kid not reloaded: %v", err)
	}
	s2.keysMu.RLock()
	_, ok := s2.keys[kid]
	s2.keysMu.RUnlock()
	if !ok {
		t.Fatal("reloaded key not kept")
	}
}

func TestPruning(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	store := NewMemStore()
	s := newTestService(t, store, clock)
	a := mustCreate(t, s, "alice", "password1")
	mustIssue(t, s, a)
	_, revoked := mustIssue(t, s, a)
	if err := s.RevokeSession(ctx, revoked.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateInvite(ctx, nil, time.Hour, ""); err != nil {
		t.Fatal(err)
	}
	count := func(bucket string) int {
		e, _ := store.List(bucket, "")
		return len(e)
	}
	s.maintain(ctx)
	if count(bucketSessions) != 1 || count(bucketRevocations) != 1 || count(bucketInvites) != 1 {
		t.Fatalf("pruned live records: sessions=%d revocations=%d invites=%d",
			count(bucketSessions), count(bucketRevocations), count(bucketInvites))
	}
	clock.Advance(DefaultSessionTTL + time.Hour)
	s.maintain(ctx)
	if count(bucketSessions) != 0 || count(bucketRevocations) != 0 || count(bucketInvites) != 0 {
		t.Fatalf("expired records kept: sessions=%d revocations=%d invites=%d",
			count(bucketSessions), count(bucketRevocations), count(bucketInvites))
	}
	s.stateMu.RLock()
	n := len(s.revokedSIDs)
	s.stateMu.RUnlock()
	if n != 0 {
		t.Fatal("revoked sid kept in memory")
	}
}

// TestCorruptRecords: bad records from the store are skipped and logged,
// never fatal.
func TestCorruptRecords(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	for _, b := range []string{bucketAccounts, bucketKeys, bucketRevocations, bucketThrottle, bucketSessions, bucketInvites} {
		_ = store.Put(ctx, b, "ffffffffffffffffffffffffffffffff", []byte("{not json"))
	}
	s := newTestService(t, store, nil)
	a := mustCreate(t, s, "alice", "password1")
	if accts, err := s.Accounts(); err != nil || len(accts) != 1 {
		t.Fatalf("Accounts: %v %v", accts, err)
	}
	if _, err := s.Account("ffffffffffffffffffffffffffffffff"); err == nil {
		t.Fatal("corrupt account returned")
	}
	if _, err := s.Session("ffffffffffffffffffffffffffffffff"); err == nil {
		t.Fatal("corrupt session returned")
	}
	tok, _ := mustIssue(t, s, a)
	if _, err := s.Verify(tok); err != nil {
		t.Fatal(err)
	}
	// Corrupt records arriving through the watches.
	for _, b := range []string{bucketAccounts, bucketKeys, bucketRevocations, bucketThrottle} {
		_ = store.Put(ctx, b, "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee", []byte("[]"))
	}
	if _, err := s.Verify(tok); err != nil {
		t.Fatal(err)
	}
	s.maintain(ctx)
	if got := FirstWriterWinsBuckets(); len(got) != 1 || got[0] != "usernames" {
		t.Fatalf("FirstWriterWinsBuckets %v", got)
	}
}
