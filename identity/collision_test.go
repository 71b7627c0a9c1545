package identity

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// putForeignAccount writes an account record as if it had been created on
// another node and replicated here.
func putForeignAccount(t *testing.T, store Store, s *Service, id, username, password string, created time.Time) {
	t.Helper()
	phc := mustHash(t, s.hasher, password)
	b, _ := json.Marshal(accountRecord{V: 1, ID: id, Username: username, PasswordHash: phc, Created: created, Updated: created})
	if err := store.Put(context.Background(), bucketAccounts, id, b); err != nil {
		t.Fatal(err)
	}
}

func waitRenamed(t *testing.T, s *Service, id, want string) Account {
	t.Helper()
	var a Account
	eventually(t, "rename of "+id, func() bool {
		var err error
		a, err = s.Account(id)
		return err == nil && a.Username == want
	})
	return a
}

// TestCollisionAccountArrives: the index already names the winner when the
// loser's record arrives (accounts watch).
func TestCollisionAccountArrives(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s := newTestService(t, store, clock)
	winner := mustCreate(t, s, "bob", "winner-pass")
	loserID := "abcdef0123456789abcdef0123456789"
	putForeignAccount(t, store, s, loserID, "bob", "loser-pass", clock.Now().Add(time.Second))
	// The other node's index write loses (first writer wins).
	_ = store.Put(ctx, bucketUsernames, "bob", []byte(loserID))

	l := waitRenamed(t, s, loserID, "bob-abcdef")
	if !l.MustRename {
		t.Fatal("MustRename not set")
	}
	if w, _ := s.Account(winner.ID); w.Username != "bob" || w.MustRename {
		t.Fatalf("winner changed: %+v", w)
	}
	if accts, _ := s.Accounts(); len(accts) != 2 {
		t.Fatalf("accounts %d: something was deleted", len(accts))
	}
	got, err := s.Login(ctx, "bob-abcdef", "loser-pass", "192.0.2.1")
	if err != nil || got.ID != loserID || !got.MustRename {
		t.Fatalf("login by new name: %+v %v", got, err)
	}
	if got, err := s.Login(ctx, "bob", "winner-pass", "192.0.2.1"); err != nil || got.ID != winner.ID {
		t.Fatalf("winner login: %+v %v", got, err)
	}
	if _, err := s.Login(ctx, "bob", "loser-pass", "192.0.2.1"); !errors.Is(err, ErrBadCredentials) {
		t.Fatalf("loser by old name after rename: %v", err)
	}
	// The member picks a new name.
	r, err := s.Rename(ctx, loserID, "robert")
	if err != nil || r.MustRename || r.Username != "robert" {
		t.Fatalf("Rename: %+v %v", r, err)
	}
	if _, err := store.Get(bucketUsernames, "bob-abcdef"); !errors.Is(err, ErrNotFound) {
		t.Fatal("generated name not released")
	}
	if idx, _ := store.Get(bucketUsernames, "bob"); string(idx) != winner.ID {
		t.Fatal("winner's index entry touched")
	}
}

// TestCollisionIndexMerges: this node gave the name to its own account;
// the replicated index then switches to the other node's earlier claim
// (usernames watch).
func TestCollisionIndexMerges(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s := newTestService(t, store, clock)
	local := mustCreate(t, s, "bob", "local-pass")
	remoteID := "0123456789abcdef0123456789abcdef"
	putForeignAccount(t, store, s, remoteID, "bob", "remote-pass", clock.Now().Add(-time.Hour))
	// Anti-entropy: the earlier claim wins the index.
	_ = store.Delete(ctx, bucketUsernames, "bob")
	_ = store.Put(ctx, bucketUsernames, "bob", []byte(remoteID))

	l := waitRenamed(t, s, local.ID, "bob-"+local.ID[:6])
	if !l.MustRename {
		t.Fatal("MustRename not set")
	}
	if r, _ := s.Account(remoteID); r.Username != "bob" {
		t.Fatalf("winner renamed: %+v", r)
	}
	if _, err := s.Login(ctx, l.Username, "local-pass", "192.0.2.1"); err != nil {
		t.Fatalf("login by new name: %v", err)
	}
}

// TestCollisionOnStartAndLogin: the collision happened while the service
// was down; Start's scan (or, failing that, Login) resolves it.
func TestCollisionOnStartAndLogin(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s := newTestService(t, store, clock)
	winner := mustCreate(t, s, "carol", "winner-pass")
	s.Close()
	loserID := "fedcba9876543210fedcba9876543210"
	putForeignAccount(t, store, s, loserID, "carol", "loser-pass", clock.Now().Add(time.Second))

	// Login-time check: the service is not running, so no watch saw it; the
	// loser logs in with the old name and their own password.
	s.applyAccount(loserID, mustLoad(t, s, loserID)) // what Start's load would have noted
	got, err := s.Login(ctx, "carol", "loser-pass", "192.0.2.1")
	if err != nil || got.ID != loserID || got.Username != "carol-fedcba" || !got.MustRename {
		t.Fatalf("login of the loser: %+v %v", got, err)
	}
	if got, err := s.Login(ctx, "carol", "winner-pass", "192.0.2.1"); err != nil || got.ID != winner.ID {
		t.Fatalf("winner: %+v %v", got, err)
	}

	// Start's scan.
	loser2 := "aaaaaa9876543210fedcba9876543210"
	putForeignAccount(t, store, s, loser2, "carol", "pw-pw-pw-pw", clock.Now().Add(time.Second))
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitRenamed(t, s, loser2, "carol-aaaaaa")
}

func mustLoad(t *testing.T, s *Service, id string) *accountRecord {
	t.Helper()
	r, err := s.loadAccount(id)
	if err != nil {
		t.Fatal(err)
	}
	return &r
}

// TestCollisionNameTaken: if "<name>-<6 hex>" is taken, more hex is used.
func TestCollisionNameTaken(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s := newTestService(t, store, clock)
	mustCreate(t, s, "dan", "password1")
	mustCreate(t, s, "dan-123456", "password1")
	loser := "1234567890abcdef1234567890abcdef"
	putForeignAccount(t, store, s, loser, "dan", "password1", clock.Now().Add(time.Second))
	l := waitRenamed(t, s, loser, "dan-12345678")
	if !strings.HasPrefix(l.Username, "dan-") || !l.MustRename {
		t.Fatalf("%+v", l)
	}
	if _, err := s.Login(ctx, "dan-12345678", "password1", "192.0.2.1"); err != nil {
		t.Fatal(err)
	}
}

// TestIndexNotYetReplicated: an account record arrived, its usernames entry
// has not: the name is taken and the member can log in.
func TestIndexNotYetReplicated(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	clock := newClock()
	s := newTestService(t, store, clock)
	id := "00112233445566778899aabbccddeeff"
	putForeignAccount(t, store, s, id, "erin", "password1", clock.Now())
	if _, err := s.CreateAccount(ctx, NewAccount{Username: "erin", Password: "password1"}); !errors.Is(err, ErrUsernameTaken) {
		t.Fatalf("CreateAccount: %v", err)
	}
	if got, err := s.Login(ctx, "erin", "password1", "192.0.2.1"); err != nil || got.ID != id || got.MustRename {
		t.Fatalf("Login: %+v %v", got, err)
	}
}
