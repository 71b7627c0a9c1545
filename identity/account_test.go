package identity

import (
	"context"
	"errors"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestDefaultConfig(t *testing.T) {
	c := DefaultConfig()
	if c.Argon2Memory != 19456 || c.Argon2Time != 2 || c.Argon2Threads != 1 {
		t.Errorf("argon2 defaults m=%d t=%d p=%d, want 19456/2/1", c.Argon2Memory, c.Argon2Time, c.Argon2Threads)
	}
	if c.SessionTTL != 30*24*time.Hour || c.KeyRotation != 7*24*time.Hour || c.CacheSize != 10000 ||
		c.IPFailures != 20 || c.AccountFailures != 10 || c.ThrottleWindow != 5*time.Minute ||
		c.MaxConcurrentHashes != runtime.NumCPU() || c.Logger == nil || c.Now == nil {
		t.Errorf("defaults: %+v", c)
	}
	// Zero fields take the defaults.
	s, err := New(NewMemStore(), Config{Domain: "Example.NET.", Secret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	if s.cfg.Argon2Memory != 19456 || s.cfg.SessionTTL != DefaultSessionTTL || s.Issuer() != "https://example.net" {
		t.Errorf("withDefaults: %+v issuer %s", s.cfg, s.Issuer())
	}
}

func TestNewErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store Store
		cfg   Config
	}{
		{"nil store", nil, Config{Domain: "x.net", Secret: testSecret}},
		{"no domain", NewMemStore(), Config{Secret: testSecret}},
		{"bad domain", NewMemStore(), Config{Domain: "https://x.net", Secret: testSecret}},
		{"no secret", NewMemStore(), Config{Domain: "x.net"}},
		{"short secret", NewMemStore(), Config{Domain: "x.net", Secret: testSecret[:16]}},
		{"negative ttl", NewMemStore(), Config{Domain: "x.net", Secret: testSecret, SessionTTL: -1}},
		{"negative hashes", NewMemStore(), Config{Domain: "x.net", Secret: testSecret, MaxConcurrentHashes: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.store, tc.cfg); !errors.Is(err, ErrInvalidInput) {
				t.Fatalf("err = %v, want ErrInvalidInput", err)
			}
		})
	}
}

func TestNormalizeUsername(t *testing.T) {
	for in, want := range map[string]string{
		"alice": "alice", "Alice": "alice", " BOB ": "bob", "a1": "a1", "x.y_z-w": "x.y_z-w",
		"0day": "0day", strings.Repeat("a", 32): strings.Repeat("a", 32),
	} {
		if got, err := NormalizeUsername(in); err != nil || got != want {
			t.Errorf("NormalizeUsername(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", "a", strings.Repeat("a", 33), "-abc", ".abc", "_abc", "a b", "a@b", "ali/ce",
		"\u212Aate", // Kelvin sign lowercases to ASCII k: refused, only ASCII is allowed
		"élise", "a\x00b", "a:b",
	} {
		if got, err := NormalizeUsername(in); !errors.Is(err, ErrInvalidUsername) {
			t.Errorf("NormalizeUsername(%q) = %q, %v; want ErrInvalidUsername", in, got, err)
		}
	}
}

func TestCreateAccountErrors(t *testing.T) {
	s := newTestService(t, nil, nil)
	mustCreate(t, s, "taken", "password1")
	for _, tc := range []struct {
		name string
		a    NewAccount
		want error
	}{
		{"invalid username", NewAccount{Username: "-x", Password: "password1"}, ErrInvalidUsername},
		{"short username", NewAccount{Username: "x", Password: "password1"}, ErrInvalidUsername},
		{"short password", NewAccount{Username: "ok", Password: "1234567"}, ErrWeakPassword},
		{"short multibyte password", NewAccount{Username: "ok", Password: "ééééééé"}, ErrWeakPassword}, // 14 bytes, 7 chars
		{"long password", NewAccount{Username: "ok", Password: strings.Repeat("p", 1025)}, ErrWeakPassword},
		{"taken", NewAccount{Username: "taken", Password: "password1"}, ErrUsernameTaken},
		{"taken other case", NewAccount{Username: "TAKEN", Password: "password1"}, ErrUsernameTaken},
		{"bad email", NewAccount{Username: "ok", Password: "password1", Email: "not an email"}, ErrInvalidInput},
		{"email with name", NewAccount{Username: "ok", Password: "password1", Email: "Bob <bob@example.com>"}, ErrInvalidInput},
		{"control char in name", NewAccount{Username: "ok", Password: "password1", Name: "a\nb"}, ErrInvalidInput},
		{"long name", NewAccount{Username: "ok", Password: "password1", Name: strings.Repeat("n", 129)}, ErrInvalidInput},
		{"bad group", NewAccount{Username: "ok", Password: "password1", Groups: []string{"a b"}}, ErrInvalidInput},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := s.CreateAccount(context.Background(), tc.a); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	// Boundaries that are fine.
	if _, err := s.CreateAccount(context.Background(), NewAccount{Username: "ok", Password: "éééééééé"}); err != nil {
		t.Fatalf("8-char multibyte password: %v", err)
	}
	if _, err := s.CreateAccount(context.Background(), NewAccount{Username: "ok2", Password: strings.Repeat("p", 1024)}); err != nil {
		t.Fatalf("1024-byte password: %v", err)
	}
	accts, _ := s.Accounts()
	if len(accts) != 3 {
		t.Fatalf("failed creations left records: %d accounts", len(accts))
	}
}

func TestCreateAccountRecord(t *testing.T) {
	store := NewMemStore()
	s := newTestService(t, store, nil)
	a := mustCreate(t, s, "Alice", "password1", "Family", "admins", "family")
	if !validAccountID(a.ID) || a.Username != "alice" || strings.Join(a.Groups, ",") != "admins,family" {
		t.Fatalf("account %+v", a)
	}
	raw, err := store.Get(bucketAccounts, a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`"password_hash":"\$argon2id\$v=19\$m=64,t=1,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}"`).Match(raw) {
		t.Fatalf("stored record lacks a PHC argon2id hash: %s", raw)
	}
	if strings.Contains(string(raw), "password1") {
		t.Fatal("plaintext password stored")
	}
	if idx, _ := store.Get(bucketUsernames, "alice"); string(idx) != a.ID {
		t.Fatalf("usernames index %q", idx)
	}
	for _, get := range []func() (Account, error){
		func() (Account, error) { return s.Account(a.ID) },
		func() (Account, error) { return s.AccountByUsername("ALICE") },
	} {
		if got, err := get(); err != nil || got.ID != a.ID || got.Email != a.Email {
			t.Fatalf("lookup: %+v %v", got, err)
		}
	}
	for _, id := range []string{"", "nope", strings.Repeat("0", 32), strings.Repeat("A", 32)} {
		if _, err := s.Account(id); !errors.Is(err, ErrNotFound) {
			t.Errorf("Account(%q): %v", id, err)
		}
	}
	for _, n := range []string{"bob", "", "!!"} {
		if _, err := s.AccountByUsername(n); !errors.Is(err, ErrNotFound) {
			t.Errorf("AccountByUsername(%q): %v", n, err)
		}
	}
}

// TestCreateAccountWriteOrder: the account record is written before the
// index; a lost race for the index leaves no account behind.
func TestCreateAccountWriteOrder(t *testing.T) {
	fs := newFaultStore()
	s := newTestService(t, fs, nil)
	a := mustCreate(t, s, "alice", "password1")
	log := fs.putLog()
	ai, ui := -1, -1
	for i, b := range log {
		if b == bucketAccounts && ai < 0 {
			ai = i
		}
		if b == bucketUsernames && ui < 0 {
			ui = i
		}
	}
	if ai < 0 || ui < 0 || ai > ui {
		t.Fatalf("write order %v: account must precede username index", log)
	}
	_ = a

	// Another node claims "bob" between our account write and our index
	// write: creation fails cleanly.
	intruder := strings.Repeat("e", 32)
	fs.mu.Lock()
	fs.onPut = func(bucket, key string, value []byte) {
		if bucket == bucketUsernames && key == "bob" {
			_ = fs.Store.PutAsync(bucketUsernames, "bob", []byte(intruder))
		}
	}
	fs.mu.Unlock()
	if _, err := s.CreateAccount(context.Background(), NewAccount{Username: "bob", Password: "password1"}); !errors.Is(err, ErrUsernameTaken) {
		t.Fatalf("lost index race: %v", err)
	}
	accts, _ := s.Accounts()
	if len(accts) != 1 {
		t.Fatalf("half-created account left behind: %+v", accts)
	}

	// A failing account write leaves no index entry.
	fs.mu.Lock()
	fs.onPut = nil
	fs.mu.Unlock()
	boom := errors.New("ack timeout")
	fs.setFail(bucketAccounts, boom)
	if _, err := s.CreateAccount(context.Background(), NewAccount{Username: "carol", Password: "password1"}); !errors.Is(err, boom) {
		t.Fatalf("failing store: %v", err)
	}
	if _, err := fs.Get(bucketUsernames, "carol"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("index written although the account write failed: %v", err)
	}
}

func TestCreateAccountConcurrentSameName(t *testing.T) {
	s := newTestService(t, nil, nil)
	var wg sync.WaitGroup
	var ok, taken atomic.Int32
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.CreateAccount(context.Background(), NewAccount{Username: "dup", Password: "password1"})
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, ErrUsernameTaken):
				taken.Add(1)
			default:
				t.Errorf("unexpected: %v", err)
			}
		}()
	}
	wg.Wait()
	accts, _ := s.Accounts()
	if ok.Load() != 1 || taken.Load() != 7 || len(accts) != 1 {
		t.Fatalf("ok=%d taken=%d accounts=%d", ok.Load(), taken.Load(), len(accts))
	}
}

func TestLogin(t *testing.T) {
	ctx := context.Background()
	s := newTestService(t, nil, nil, func(c *Config) { c.AccountFailures, c.IPFailures = 1000, 1000 })
	a := mustCreate(t, s, "alice", "password1")
	d := mustCreate(t, s, "dave", "password1")
	if err := s.SetDisabled(ctx, d.ID, true); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, user, pw string
		want           error
	}{
		{"ok", "alice", "password1", nil},
		{"ok case and space", "  ALICE ", "password1", nil},
		{"wrong password", "alice", "password2", ErrBadCredentials},
		{"empty password", "alice", "", ErrBadCredentials},
		{"unknown user", "mallory", "password1", ErrBadCredentials},
		{"impossible username", "-!", "password1", ErrBadCredentials},
		{"huge username", strings.Repeat("a", 10000), "password1", ErrBadCredentials},
		{"oversized password", "alice", strings.Repeat("p", 2000), ErrBadCredentials},
		{"disabled", "dave", "password1", ErrBadCredentials},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := s.hasher.computed.Load()
			got, err := s.Login(ctx, tc.user, tc.pw, "192.0.2.7")
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if tc.want == nil && got.ID != a.ID {
				t.Fatalf("got %+v", got)
			}
			if tc.want != nil && err != ErrBadCredentials {
				t.Fatalf("failure must be exactly ErrBadCredentials (no hint), got %v", err)
			}
			// Every outcome costs exactly one argon2 hash: no timing oracle.
			if n := s.hasher.computed.Load() - before; n != 1 {
				t.Fatalf("%d hashes computed, want 1", n)
			}
		})
	}
}

func TestDummyHashUsesConfiguredCost(t *testing.T) {
	// The dummy hash must cost what a real one does: same parameters.
	s := newTestService(t, nil, nil, func(c *Config) { c.Argon2Memory, c.Argon2Time = 256, 3 })
	mustCreate(t, s, "alice", "password1")
	if _, err := s.Login(context.Background(), "nobody", "password1", "192.0.2.1"); !errors.Is(err, ErrBadCredentials) {
		t.Fatal(err)
	}
	p, err := parsePHC(mustHash(t, s.hasher, "x"))
	if err != nil || p.memory != 256 || p.time != 3 || s.hasher.memory != 256 || s.hasher.time != 3 {
		t.Fatalf("params %+v %v", p, err)
	}
}

func mustHash(t *testing.T, h *hasher, pw string) string {
	t.Helper()
	phc, err := h.hash(context.Background(), pw)
	if err != nil {
		t.Fatal(err)
	}
	return phc
}

func TestDefaultArgon2Params(t *testing.T) {
	h := newHasher(mustDefaults(t))
	phc := mustHash(t, h, "password1")
	if !strings.HasPrefix(phc, "$argon2id$v=19$m=19456,t=2,p=1$") {
		t.Fatalf("default PHC %s", phc)
	}
	if ok, err := h.verify(context.Background(), "password1", phc); !ok || err != nil {
		t.Fatalf("verify: %v %v", ok, err)
	}
}

func mustDefaults(t *testing.T) Config {
	c, err := Config{Domain: "x.net", Secret: testSecret}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestParsePHCErrors(t *testing.T) {
	good := "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
	if _, err := parsePHC(good); err != nil {
		t.Fatalf("good: %v", err)
	}
	for _, bad := range []string{
		"", "plain", "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=16$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=99999999,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=0,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=1,p=0$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=1,p=1$!!$aGFzaGhhc2hoYXNoaGFzaA",
		"$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$x",
		"$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA$extra",
	} {
		if _, err := parsePHC(bad); !errors.Is(err, ErrInvalidInput) {
			t.Errorf("parsePHC(%q) = %v", bad, err)
		}
	}
	// A corrupt stored hash still costs one hash and never matches.
	h := newHasher(testConfig(newClock()))
	before := h.computed.Load()
	if ok, err := h.verify(context.Background(), "x", "garbage"); ok || err == nil {
		t.Fatalf("verify garbage: %v %v", ok, err)
	}
	if h.computed.Load()-before != 1 {
		t.Fatal("corrupt hash did not cost a hash")
	}
}

func TestHashConcurrencyBound(t *testing.T) {
	const limit = 2
	s := newTestService(t, nil, nil, func(c *Config) {
		c.MaxConcurrentHashes = limit
		c.IPFailures, c.AccountFailures = 1000, 1000
	})
	mustCreate(t, s, "alice", "password1")
	release := make(chan struct{})
	var entered atomic.Int32
	s.hasher.testHook = func() {
		entered.Add(1)
		<-release
	}
	const n = 10
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			user := "alice"
			if i%2 == 1 {
				user = "unknown" // dummy hashes count against the bound too
			}
			_, _ = s.Login(context.Background(), user, "password1", "192.0.2.1")
		}()
	}
	eventually(t, "the hashing slots to fill", func() bool { return entered.Load() == limit })
	if got := s.hasher.inFlight.Load(); got != limit {
		t.Fatalf("in flight %d, want %d", got, limit)
	}
	// A login whose context ends while waiting for a slot gives up.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := s.Login(ctx, "alice", "password1", "192.0.2.9"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("login with expired context: %v", err)
	}
	close(release)
	wg.Wait()
	if got := s.hasher.maxInFlight.Load(); got != limit {
		t.Fatalf("max in flight %d, want %d", got, limit)
	}
	if got := entered.Load(); got != n {
		t.Fatalf("%d hashes, want %d", got, n)
	}
}

func TestProfileAndPasswords(t *testing.T) {
	ctx := context.Background()
	s := newTestService(t, nil, nil, func(c *Config) { c.AccountFailures, c.IPFailures = 1000, 1000 })
	a := mustCreate(t, s, "alice", "password1")
	missing := strings.Repeat("f", 32)

	got, err := s.UpdateProfile(ctx, a.ID, " Alice A. ", "alice@example.org")
	if err != nil || got.Name != "Alice A." || got.Email != "alice@example.org" {
		t.Fatalf("UpdateProfile: %+v %v", got, err)
	}
	if _, err := s.UpdateProfile(ctx, a.ID, "x", "bad@"); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("bad email: %v", err)
	}
	if _, err := s.UpdateProfile(ctx, missing, "x", ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing: %v", err)
	}

	for _, tc := range []struct {
		name           string
		id, old, newPw string
		want           error
	}{
		{"wrong old", a.ID, "nope-nope", "password2", ErrBadCredentials},
		{"weak new", a.ID, "password1", "short", ErrWeakPassword},
		{"missing account", missing, "password1", "password2", ErrNotFound},
		{"ok", a.ID, "password1", "password2", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := s.ChangePassword(ctx, tc.id, tc.old, tc.newPw); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := s.Login(ctx, "alice", "password2", "192.0.2.1"); err != nil {
		t.Fatalf("login with changed password: %v", err)
	}
	if err := s.SetPassword(ctx, a.ID, "password3"); err != nil {
		t.Fatal(err)
	}
	if err := s.SetPassword(ctx, a.ID, "x"); !errors.Is(err, ErrWeakPassword) {
		t.Fatalf("SetPassword weak: %v", err)
	}
	if err := s.SetPassword(ctx, missing, "password9"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetPassword missing: %v", err)
	}
	if _, err := s.Login(ctx, "alice", "password2", "192.0.2.1"); !errors.Is(err, ErrBadCredentials) {
		t.Fatalf("old password after reset: %v", err)
	}
	if _, err := s.Login(ctx, "alice", "password3", "192.0.2.1"); err != nil {
		t.Fatalf("login after reset: %v", err)
	}

	if err := s.SetGroups(ctx, a.ID, []string{"B", "a", "b"}); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Account(a.ID); strings.Join(got.Groups, ",") != "a,b" {
		t.Fatalf("groups %v", got.Groups)
	}
	if err := s.SetGroups(ctx, a.ID, []string{"no spaces"}); !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("bad group: %v", err)
	}
	if err := s.SetGroups(ctx, missing, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetGroups missing: %v", err)
	}
	if err := s.SetDisabled(ctx, missing, true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetDisabled missing: %v", err)
	}
}

func TestRename(t *testing.T) {
	ctx := context.Background()
	store := NewMemStore()
	s := newTestService(t, store, nil)
	a := mustCreate(t, s, "alice", "password1")
	mustCreate(t, s, "bob", "password1")
	for _, tc := range []struct {
		name, to string
		want     error
	}{
		{"invalid", "!", ErrInvalidUsername},
		{"taken", "BOB", ErrUsernameTaken},
		{"same", "alice", nil},
		{"ok", "Alicia", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := s.Rename(ctx, a.ID, tc.to); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := s.Rename(ctx, strings.Repeat("f", 32), "zed"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("missing: %v", err)
	}
	if _, err := store.Get(bucketUsernames, "zed"); !errors.Is(err, ErrNotFound) {
		t.Fatal("rename of a missing account claimed the name")
	}
	if _, err := store.Get(bucketUsernames, "alice"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("old name not released: %v", err)
	}
	if _, err := s.Login(ctx, "alicia", "password1", "192.0.2.1"); err != nil {
		t.Fatalf("login by new name: %v", err)
	}
	if _, err := s.AccountByUsername("alice"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("old name still resolves: %v", err)
	}
	mustCreate(t, s, "alice", "password1") // the old name is free again
}

// ackStore stores writes but reports that they were not acknowledged, like
// the replicated store when peers do not answer in time.
type ackStore struct {
	Store
	fail map[string]bool
}

var errNoAck = errors.New("ack timeout")

func (s ackStore) Put(ctx context.Context, bucket, key string, value []byte) error {
	if err := s.Store.Put(ctx, bucket, key, value); err != nil {
		return err
	}
	if s.fail[bucket] {
		return errNoAck
	}
	return nil
}

func TestCreateAccountNotAcknowledged(t *testing.T) {
	ctx := context.Background()
	for _, bucket := range []string{bucketAccounts, bucketUsernames} {
		t.Run(bucket, func(t *testing.T) {
			store := ackStore{Store: NewMemStore(), fail: map[string]bool{}}
			s := newTestService(t, store, nil)
			store.fail[bucket] = true
			a, err := s.CreateAccount(ctx, NewAccount{Username: "alice", Password: "password1"})
			if !errors.Is(err, errNoAck) || a.ID == "" {
				t.Fatalf("CreateAccount = %+v, %v; want the account and the ack error", a, err)
			}
			if got, err := s.AccountByUsername("alice"); err != nil || got.ID != a.ID {
				t.Fatalf("account not whole: %+v %v", got, err)
			}
			if _, err := s.Login(ctx, "alice", "password1", "192.0.2.1"); err != nil {
				t.Fatal(err)
			}
		})
	}
}
