package identity

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestInvites(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	store := NewMemStore()
	s := newTestService(t, store, clock)
	tok, err := s.CreateInvite(ctx, []string{"Family"}, time.Hour, "admin")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := b64.DecodeString(tok)
	if err != nil || len(raw) != 32 || len(tok) != 43 {
		t.Fatalf("token %q: %v", tok, err)
	}
	sum := sha256.Sum256([]byte(tok))
	if _, err := store.Get(bucketInvites, hex.EncodeToString(sum[:])); err != nil {
		t.Fatalf("invite not stored under sha256(token): %v", err)
	}
	entries, _ := store.List(bucketInvites, "")
	for _, e := range entries {
		if strings.Contains(e.Key+string(e.Value), tok) {
			t.Fatal("invite token stored in the clear")
		}
	}
	inv, err := s.CheckInvite(tok)
	if err != nil || strings.Join(inv.Groups, ",") != "family" || inv.CreatedBy != "admin" || !inv.Expires.Equal(clock.Now().Add(time.Hour)) {
		t.Fatalf("CheckInvite: %+v %v", inv, err)
	}

	// Registration errors leave the invite usable.
	mustCreate(t, s, "taken", "password1")
	for _, tc := range []struct {
		name string
		a    NewAccount
		want error
	}{
		{"taken", NewAccount{Username: "taken", Password: "password1"}, ErrUsernameTaken},
		{"bad name", NewAccount{Username: "?", Password: "password1"}, ErrInvalidUsername},
		{"weak", NewAccount{Username: "newbie", Password: "x"}, ErrWeakPassword},
		{"bad email", NewAccount{Username: "newbie", Password: "password1", Email: "x"}, ErrInvalidInput},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := s.Register(ctx, tok, tc.a); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if _, err := s.CheckInvite(tok); err != nil {
				t.Fatalf("invite spent by a failed registration: %v", err)
			}
		})
	}

	a, err := s.Register(ctx, tok, NewAccount{Username: "Newbie", Password: "password1", Name: "New", Groups: []string{"admins"}})
	if err != nil {
		t.Fatal(err)
	}
	if a.Username != "newbie" || strings.Join(a.Groups, ",") != "family" {
		t.Fatalf("registered %+v (groups must come from the invite)", a)
	}
	if _, err := s.Login(ctx, "newbie", "password1", "192.0.2.1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Register(ctx, tok, NewAccount{Username: "second", Password: "password1"}); !errors.Is(err, ErrInvalidInvite) {
		t.Fatalf("second use: %v", err)
	}
	if _, err := s.CheckInvite(tok); !errors.Is(err, ErrInvalidInvite) {
		t.Fatalf("CheckInvite after use: %v", err)
	}

	// Expiry, with the injected clock.
	tok2, _ := s.CreateInvite(ctx, nil, time.Hour, "")
	clock.Advance(time.Hour - time.Second)
	if _, err := s.CheckInvite(tok2); err != nil {
		t.Fatalf("before expiry: %v", err)
	}
	clock.Advance(time.Second)
	if _, err := s.CheckInvite(tok2); !errors.Is(err, ErrInvalidInvite) {
		t.Fatalf("expired: %v", err)
	}
	if _, err := s.Register(ctx, tok2, NewAccount{Username: "late", Password: "password1"}); !errors.Is(err, ErrInvalidInvite) {
		t.Fatalf("register expired: %v", err)
	}

	// Unknown and malformed tokens.
	for _, bad := range []string{"", "x", strings.Repeat("A", 43), strings.Repeat("!", 43), tok + "A", "../../etc/passwd"} {
		if _, err := s.CheckInvite(bad); !errors.Is(err, ErrInvalidInvite) {
			t.Errorf("CheckInvite(%q): %v", bad, err)
		}
	}

	// Defaults and bad input.
	tok3, err := s.CreateInvite(ctx, nil, 0, "")
	if err != nil {
		t.Fatal(err)
	}
	if inv, _ := s.CheckInvite(tok3); !inv.Expires.Equal(clock.Now().Add(DefaultInviteTTL)) {
		t.Fatalf("default ttl: %v", inv.Expires)
	}
	if _, err := s.CreateInvite(ctx, nil, -time.Second, ""); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("negative ttl: %v", err)
	}
	if _, err := s.CreateInvite(ctx, []string{"bad group"}, 0, ""); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("bad group: %v", err)
	}
}

func TestInviteSingleUseConcurrent(t *testing.T) {
	ctx := context.Background()
	s := newTestService(t, nil, nil)
	tok, err := s.CreateInvite(ctx, nil, time.Hour, "")
	if err != nil {
		t.Fatal(err)
	}
	var ok atomic.Int32
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Register(ctx, tok, NewAccount{Username: "user" + string(rune('a'+i)), Password: "password1"})
			if err == nil {
				ok.Add(1)
			} else if !errors.Is(err, ErrInvalidInvite) {
				t.Errorf("unexpected: %v", err)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 1 {
		t.Fatalf("%d registrations with one invite", ok.Load())
	}
	if accts, _ := s.Accounts(); len(accts) != 1 {
		t.Fatalf("%d accounts", len(accts))
	}
}

func TestInviteRestoredWhenStoreFails(t *testing.T) {
	ctx := context.Background()
	fs := newFaultStore()
	s := newTestService(t, fs, nil)
	tok, err := s.CreateInvite(ctx, nil, time.Hour, "")
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("no quorum")
	fs.setFail(bucketAccounts, boom)
	if _, err := s.Register(ctx, tok, NewAccount{Username: "newbie", Password: "password1"}); !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
	if _, err := s.CheckInvite(tok); err != nil {
		t.Fatalf("invite lost after failed registration: %v", err)
	}
	fs.setFail(bucketAccounts, nil)
	if _, err := s.Register(ctx, tok, NewAccount{Username: "newbie", Password: "password1"}); err != nil {
		t.Fatalf("retry: %v", err)
	}
}
