package identity

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestRevokeAllSkewedClocks: "log out everywhere" on a node whose clock is
// off revokes the sessions issued a moment earlier on a node with a correct
// clock, and does not revoke sessions issued after it. Two Services on one
// store stand for two nodes of a circle (replication is instant).
func TestRevokeAllSkewedClocks(t *testing.T) {
	for _, tc := range []struct {
		name   string
		offset time.Duration // of the revoking node's clock
	}{
		{"slow", -10 * time.Minute},
		{"fast", 10 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			store := NewMemStore()
			good := newClock()
			skewed := &fakeClock{t: good.Now().Add(tc.offset)}
			x := newTestService(t, store, good)
			y := newTestService(t, store, skewed)
			a := mustCreate(t, x, "carol", "password1")
			eventually(t, "y knows carol", func() bool { _, err := y.Account(a.ID); return err == nil })

			good.Advance(2 * time.Second)
			skewed.Advance(2 * time.Second)
			old, _ := mustIssue(t, x, a)
			if _, err := x.Verify(old); err != nil {
				t.Fatalf("fresh token: %v", err)
			}
			good.Advance(time.Second)
			skewed.Advance(time.Second)
			if err := y.RevokeAll(ctx, a.ID); err != nil {
				t.Fatal(err)
			}
			eventually(t, "the earlier session is revoked on the correct node", func() bool {
				_, err := x.Verify(old)
				return errors.Is(err, ErrRevoked)
			})
			if got, _ := x.Sessions(a.ID); len(got) != 0 {
				t.Errorf("sessions after revoke-all: %v", got)
			}

			good.Advance(time.Second)
			skewed.Advance(time.Second)
			fresh, _ := mustIssue(t, x, a)
			if _, err := x.Verify(fresh); err != nil {
				t.Errorf("session issued after the revoke-all: %v", err)
			}
			if got, _ := x.Sessions(a.ID); len(got) != 1 {
				t.Errorf("sessions after a new login: %v", got)
			}
		})
	}
}

// TestRevokeAllGenerationHolds: the session generation does not go back
// when a whole-record account write that had not seen the increment wins
// (until account records merge per field), and a revoke-all by a node that
// does not know the sessions yet still revokes them by generation.
func TestRevokeAllGenerationHolds(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	s := newTestService(t, store, nil)
	a := mustCreate(t, s, "dave", "password1")
	stale, err := store.Get(bucketAccounts, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	tok, sess := mustIssue(t, s, a)
	// The session record has not reached the revoking node: only the
	// generation revokes the token.
	if err := store.Delete(ctx, bucketSessions, sess.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.RevokeAll(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(tok); !errors.Is(err, ErrRevoked) {
		t.Fatalf("token of an unlisted session after revoke-all: %v", err)
	}
	if err := store.Put(ctx, bucketAccounts, a.ID, stale); err != nil { // a concurrent write that won
		t.Fatal(err)
	}
	if _, err := s.Verify(tok); !errors.Is(err, ErrRevoked) {
		t.Fatalf("token after a stale account write: %v", err)
	}
	fresh, _ := mustIssue(t, s, a)
	if _, err := s.Verify(fresh); err != nil {
		t.Fatalf("new session: %v", err)
	}
	if err := s.RevokeAll(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(fresh); !errors.Is(err, ErrRevoked) {
		t.Fatalf("second revoke-all: %v", err)
	}
	rec, err := s.loadAccount(a.ID)
	if err != nil || rec.SessionGen != 2 {
		t.Fatalf("stored generation %d (%v), want 2", rec.SessionGen, err)
	}
}
