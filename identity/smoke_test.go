package identity

import (
	"context"
	"errors"
	"testing"
)

func TestSmoke(t *testing.T) {
	ctx := context.Background()
	s := newTestService(t, nil, nil)
	a := mustCreate(t, s, "Alice", "correct horse", "family")
	if a.Username != "alice" {
		t.Fatalf("username %q", a.Username)
	}
	got, err := s.Login(ctx, "ALICE", "correct horse", "192.0.2.1")
	if err != nil || got.ID != a.ID {
		t.Fatalf("Login: %v %v", got, err)
	}
	if _, err := s.Login(ctx, "alice", "wrong password", "192.0.2.1"); !errors.Is(err, ErrBadCredentials) {
		t.Fatalf("wrong password: %v", err)
	}
	tok, sess := mustIssue(t, s, got)
	c, err := s.Verify(tok)
	if err != nil || c.Subject != a.ID || c.SessionID != sess.ID || c.Username != "alice" || len(c.Groups) != 1 {
		t.Fatalf("Verify: %+v %v", c, err)
	}
	if err := s.RevokeSession(ctx, sess.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(tok); !errors.Is(err, ErrRevoked) {
		t.Fatalf("after revoke: %v", err)
	}
	t.Logf("jwks %s", s.JWKS())
	t.Logf("token %s", tok)
}
