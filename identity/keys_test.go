package identity

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func headerKID(t testing.TB, tok string) string {
	t.Helper()
	kid, _ := decodePart(t, tok, 0)["kid"].(string)
	return kid
}

func jwksKIDs(t testing.TB, s *Service) []string {
	t.Helper()
	var doc struct {
		Keys []struct {
			KID string `json:"kid"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(s.JWKS(), &doc); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, k := range doc.Keys {
		out = append(out, k.KID)
	}
	return out
}

func TestKeySealedAtRest(t *testing.T) {
	store := NewMemStore()
	s := newTestService(t, store, nil)
	entries, _ := store.List(bucketKeys, "")
	if len(entries) != 1 {
		t.Fatalf("%d keys after Start, want 1", len(entries))
	}
	var rec keyRecord
	if err := json.Unmarshal(entries[0].Value, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.V != 1 || rec.Alg != "EdDSA" || len(rec.Public) != 32 || rec.KID != entries[0].Key ||
		!rec.NotAfter.Equal(rec.Created.Add(DefaultKeyRotation+DefaultSessionTTL)) {
		t.Fatalf("key record %+v", rec)
	}
	// The private seed is not in the record in the clear.
	seed := s.mustSeed(t, rec)
	if bytes.Contains(entries[0].Value, seed) || strings.Contains(string(entries[0].Value), b64.EncodeToString(seed)) {
		t.Fatal("private key stored in the clear")
	}

	// A node with another secret can verify with the public key but not
	// sign with it: it makes its own key on Start.
	other := testConfig(newClock())
	other.Secret = bytes.Repeat([]byte{9}, 32)
	o, err := New(store, other)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if k, _ := o.signingKey(); k == nil || k.kid == rec.KID {
		t.Fatal("foreign-secret node signs with a key it cannot unseal")
	}
	// Moving a sealed key to another kid fails to unseal (AAD binds kid).
	rec2 := rec
	rec2.KID = "0123456789abcdef"
	b, _ := json.Marshal(rec2)
	k, err := s.parseKey(rec2.KID, b)
	if err != nil || k.signer != nil {
		t.Fatalf("re-kid'd key: signer=%v err=%v", k != nil && k.signer != nil, err)
	}
	// Inconsistent records are refused.
	for _, bad := range []string{`{`, `{"v":2}`, `{"v":1,"kid":"x","alg":"HS256"}`} {
		if _, err := s.parseKey("x", []byte(bad)); err == nil {
			t.Errorf("parseKey(%s) accepted", bad)
		}
	}
}

// mustSeed unseals rec (test helper).
func (s *Service) mustSeed(t *testing.T, rec keyRecord) []byte {
	t.Helper()
	ns := s.seal.NonceSize()
	seed, err := s.seal.Open(nil, rec.Sealed[:ns], rec.Sealed[ns:], sealAAD(rec.KID))
	if err != nil {
		t.Fatal(err)
	}
	return seed
}

// TestKeyRotationTwoNodes: two Services on one store stand for two nodes
// sharing the replicated store.
func TestKeyRotationTwoNodes(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s1 := newTestService(t, store, clock)
	s2 := newTestService(t, store, clock)
	if len(jwksKIDs(t, s1)) != 1 || len(jwksKIDs(t, s2)) != 1 {
		t.Fatalf("second node made its own key: %v %v", jwksKIDs(t, s1), jwksKIDs(t, s2))
	}
	a := mustCreate(t, s1, "alice", "password1")
	old, _ := mustIssue(t, s1, a)
	oldKID := headerKID(t, old)

	clock.Advance(time.Minute)
	kid, err := s1.RotateKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if kid == oldKID {
		t.Fatal("rotation reused the kid")
	}
	tok1, _ := mustIssue(t, s1, a)
	if headerKID(t, tok1) != kid {
		t.Fatalf("node 1 signs with %s, want new %s", headerKID(t, tok1), kid)
	}
	if _, err := s2.Verify(tok1); err != nil {
		t.Fatalf("node 2 cannot verify the new key's token: %v", err)
	}
	tok2, _ := mustIssue(t, s2, a)
	if headerKID(t, tok2) != kid {
		t.Fatal("node 2 does not sign with the newest key")
	}
	for _, s := range []*Service{s1, s2} {
		if _, err := s.Verify(old); err != nil {
			t.Fatalf("old token no longer verifies: %v", err)
		}
		if got := jwksKIDs(t, s); len(got) != 2 {
			t.Fatalf("jwks %v", got)
		}
	}
}

func TestKeyRotationWhileDown(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s1 := newTestService(t, store, clock)
	s2 := newTestService(t, store, clock)
	a := mustCreate(t, s1, "alice", "password1")
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s2.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
	kid, err := s1.RotateKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := mustIssue(t, s1, a)
	// A closed node refuses to verify: its revocation state may be stale.
	if _, err := s2.Verify(tok); !errors.Is(err, ErrInvalidToken) || !errors.Is(err, ErrNotStarted) {
		t.Fatalf("closed node: %v", err)
	}
	kid2, err := s1.RotateKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	tok2, _ := mustIssue(t, s1, a)
	if headerKID(t, tok2) != kid2 {
		t.Fatal("s1 not signing with newest")
	}
	for _, tk := range []string{tok, tok2} {
		if _, err := s2.Verify(tk); err != nil {
			t.Fatalf("restarted node: %v", err)
		}
	}
	if k, _ := s2.signingKey(); k.kid != kid2 || k.kid == kid {
		t.Fatalf("restarted node signs with %s, want %s", k.kid, kid2)
	}
	// And a brand-new Service on the same store.
	s3 := newTestService(t, store, clock)
	if _, err := s3.Verify(tok2); err != nil {
		t.Fatalf("new node: %v", err)
	}
	if err := s2.Start(ctx); err == nil {
		t.Fatal("double Start accepted")
	}
}

func TestMaintainRotatesAndRetires(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	store := NewMemStore()
	s := newTestService(t, store, clock)
	a := mustCreate(t, s, "alice", "password1")
	first, _ := s.signingKey()
	old, _ := mustIssue(t, s, a)

	s.maintain(ctx)
	if k, _ := s.signingKey(); k.kid != first.kid {
		t.Fatal("rotated a fresh key")
	}
	clock.Advance(DefaultKeyRotation)
	s.maintain(ctx)
	second, _ := s.signingKey()
	if second.kid == first.kid {
		t.Fatal("did not rotate a key older than KeyRotation")
	}
	if _, err := s.Verify(old); err != nil {
		t.Fatalf("old token after rotation: %v", err)
	}
	// A token signed just before the rotation lives SessionTTL; the key
	// verifies until created+KeyRotation+SessionTTL.
	clock.Advance(DefaultSessionTTL - time.Second)
	s.maintain(ctx)
	if got := jwksKIDs(t, s); len(got) < 2 {
		t.Fatalf("first key retired too early: %v", got)
	}
	clock.Advance(time.Second)
	s.maintain(ctx)
	for _, kid := range jwksKIDs(t, s) {
		if kid == first.kid {
			t.Fatal("retired key still published")
		}
	}
	if _, err := store.Get(bucketKeys, first.kid); !errors.Is(err, ErrNotFound) {
		t.Fatalf("retired key record not deleted: %v", err)
	}
	if _, err := s.Verify(old); err == nil {
		t.Fatal("token of a retired key verified")
	}
}

func TestStartRotatesStaleKey(t *testing.T) {
	clock := newClock()
	store := NewMemStore()
	s1 := newTestService(t, store, clock)
	k1, _ := s1.signingKey()
	s1.Close()
	clock.Advance(DefaultKeyRotation + time.Hour) // everyone was down
	s2 := newTestService(t, store, clock)
	k2, _ := s2.signingKey()
	if k2.kid == k1.kid {
		t.Fatal("Start kept signing with an overdue key")
	}
}

// TestTokenNeverOutlivesKey: if rotation lagged, the token's expiry is
// capped at the key's not_after so every issued token verifies until exp.
func TestTokenNeverOutlivesKey(t *testing.T) {
	clock := newClock()
	s := newTestService(t, nil, clock)
	a := mustCreate(t, s, "alice", "password1")
	k, _ := s.signingKey()
	clock.Advance(DefaultKeyRotation + 10*24*time.Hour) // no maintenance ran
	tok, _ := mustIssue(t, s, a)
	c, err := s.Verify(tok)
	if err != nil {
		t.Fatal(err)
	}
	if c.Expiry.After(k.notAfter) {
		t.Fatalf("token expiry %v after key not_after %v", c.Expiry, k.notAfter)
	}
}
