package identity

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// pair is two nodes of a circle as two Services on separate MemStores, with
// their own clocks; sync does what the replicated store does for a key of
// a merge bucket: both sides end with the join of the two values.
type pair struct {
	a, b           *Service
	sa, sb         *MemStore
	clockA, clockB *fakeClock
}

func newPair(t *testing.T) *pair {
	t.Helper()
	p := &pair{sa: NewMemStore(), sb: NewMemStore(), clockA: newClock(), clockB: newClock()}
	p.a = newTestService(t, p.sa, p.clockA, func(c *Config) { c.Node = "a" })
	p.b = newTestService(t, p.sb, p.clockB, func(c *Config) { c.Node = "b" })
	return p
}

// copyTo copies bucket/key from one store to the other, as replication
// before a split does.
func copyTo(t *testing.T, from, to *MemStore, bucket, key string) {
	t.Helper()
	v, err := from.Get(bucket, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := to.Put(context.Background(), bucket, key, v); err != nil {
		t.Fatal(err)
	}
}

// sync joins bucket/key of both stores and stores the join on both.
func (p *pair) sync(t *testing.T, bucket, key string) []byte {
	t.Helper()
	va, errA := p.sa.Get(bucket, key)
	vb, errB := p.sb.Get(bucket, key)
	if errA != nil || errB != nil {
		t.Fatalf("sync %s/%s: %v, %v", bucket, key, errA, errB)
	}
	m, err := MergeFuncs()[bucket](va, vb)
	if err != nil {
		t.Fatalf("merge %s/%s: %v", bucket, key, err)
	}
	if m2, _ := MergeFuncs()[bucket](vb, va); !bytes.Equal(m, m2) {
		t.Fatalf("merge of %s/%s is not commutative:\n%s\n%s", bucket, key, m, m2)
	}
	for _, s := range []*MemStore{p.sa, p.sb} {
		if err := s.Put(context.Background(), bucket, key, m); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

// carol creates carol on a with groups and copies her to b.
func (p *pair) carol(t *testing.T, groups ...string) Account {
	t.Helper()
	c := mustCreate(t, p.a, "carol", "carol-password-1", groups...)
	copyTo(t, p.sa, p.sb, bucketAccounts, c.ID)
	copyTo(t, p.sa, p.sb, bucketUsernames, "carol")
	eventually(t, "carol on b", func() bool { _, err := p.b.Account(c.ID); return err == nil })
	return c
}

func mustAccount(t *testing.T, s *Service, id string) Account {
	t.Helper()
	a, err := s.Account(id)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestAccountMergeDisable checks the security-monotone rules: a disable
// survives a concurrent password change and a concurrent enable that did
// not see it; an enable that saw the disable enables.
func TestAccountMergeDisable(t *testing.T) {
	ctx := context.Background()
	t.Run("disable vs later password change", func(t *testing.T) {
		p := newPair(t)
		c := p.carol(t)
		if err := p.a.SetDisabled(ctx, c.ID, true); err != nil {
			t.Fatal(err)
		}
		p.clockB.Advance(2 * time.Second)
		if err := p.b.ChangePassword(ctx, c.ID, "carol-password-1", "carol-password-2"); err != nil {
			t.Fatal(err)
		}
		p.sync(t, bucketAccounts, c.ID)
		for _, s := range []*Service{p.a, p.b} {
			if !mustAccount(t, s, c.ID).Disabled {
				t.Errorf("%s: carol enabled after the merge", s.cfg.Node)
			}
			for _, pw := range []string{"carol-password-1", "carol-password-2"} {
				if _, err := s.Login(ctx, "carol", pw, "192.0.2.1"); err == nil {
					t.Errorf("%s: %s logs in", s.cfg.Node, pw)
				}
			}
		}
		// The explicit enable after the merge enables, with the new password.
		if err := p.b.SetDisabled(ctx, c.ID, false); err != nil {
			t.Fatal(err)
		}
		p.sync(t, bucketAccounts, c.ID)
		for _, s := range []*Service{p.a, p.b} {
			if _, err := s.Login(ctx, "carol", "carol-password-2", "192.0.2.1"); err != nil {
				t.Errorf("%s: new password after the enable: %v", s.cfg.Node, err)
			}
		}
	})
	t.Run("disable vs concurrent enable", func(t *testing.T) {
		p := newPair(t)
		c := p.carol(t)
		// Disabled before the split; then a enables while b disables again.
		if err := p.a.SetDisabled(ctx, c.ID, true); err != nil {
			t.Fatal(err)
		}
		p.sync(t, bucketAccounts, c.ID)
		if err := p.b.SetDisabled(ctx, c.ID, true); err != nil {
			t.Fatal(err)
		}
		p.clockA.Advance(time.Minute) // the enable even has the later clock
		if err := p.a.SetDisabled(ctx, c.ID, false); err != nil {
			t.Fatal(err)
		}
		p.sync(t, bucketAccounts, c.ID)
		if !mustAccount(t, p.a, c.ID).Disabled {
			t.Error("a concurrent enable undid b's disable")
		}
	})
	t.Run("enable after disable", func(t *testing.T) {
		p := newPair(t)
		c := p.carol(t)
		if err := p.a.SetDisabled(ctx, c.ID, true); err != nil {
			t.Fatal(err)
		}
		stale, _ := p.sa.Get(bucketAccounts, c.ID)
		if err := p.a.SetDisabled(ctx, c.ID, false); err != nil {
			t.Fatal(err)
		}
		// b receives the disabled record late, after the enable.
		if err := p.sb.Put(ctx, bucketAccounts, c.ID, stale); err != nil {
			t.Fatal(err)
		}
		p.sync(t, bucketAccounts, c.ID)
		if mustAccount(t, p.b, c.ID).Disabled {
			t.Error("a stale disabled record undid the enable made after it")
		}
	})
}

// TestAccountMergeFields: concurrent edits of different fields and groups
// all survive; the same field keeps the later edit.
func TestAccountMergeFields(t *testing.T) {
	ctx := context.Background()
	p := newPair(t)
	c := p.carol(t, "family", "admins")
	if err := p.a.SetGroups(ctx, c.ID, []string{"family", "admins", "music"}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.a.UpdateProfile(ctx, c.ID, "Carol A", "a@example.com"); err != nil {
		t.Fatal(err)
	}
	p.clockB.Advance(time.Second)
	if err := p.b.SetGroups(ctx, c.ID, []string{"family", "books"}); err != nil { // removes admins
		t.Fatal(err)
	}
	if _, err := p.b.UpdateProfile(ctx, c.ID, "Carol B", "b@example.com"); err != nil {
		t.Fatal(err)
	}
	if err := p.b.SetPassword(ctx, c.ID, "carol-password-b"); err != nil {
		t.Fatal(err)
	}
	p.sync(t, bucketAccounts, c.ID)
	for _, s := range []*Service{p.a, p.b} {
		got := mustAccount(t, s, c.ID)
		if want := []string{"books", "family", "music"}; !slices.Equal(got.Groups, want) {
			t.Errorf("%s: groups %v, want %v", s.cfg.Node, got.Groups, want)
		}
		if got.Name != "Carol B" || got.Email != "b@example.com" {
			t.Errorf("%s: profile %q %q, want b's later edit", s.cfg.Node, got.Name, got.Email)
		}
		if _, err := s.Login(ctx, "carol", "carol-password-b", "192.0.2.1"); err != nil {
			t.Errorf("%s: b's password: %v", s.cfg.Node, err)
		}
	}
	// Concurrent add and remove of one group: the later stamp wins.
	if err := p.a.SetGroups(ctx, c.ID, []string{"family", "books", "music", "admins"}); err != nil {
		t.Fatal(err)
	}
	p.clockB.Advance(time.Second)
	if err := p.b.SetGroups(ctx, c.ID, []string{"books", "music"}); err != nil { // removes family
		t.Fatal(err)
	}
	p.sync(t, bucketAccounts, c.ID)
	if got, want := mustAccount(t, p.a, c.ID).Groups, []string{"admins", "books", "music"}; !slices.Equal(got, want) {
		t.Errorf("groups %v, want %v", got, want)
	}
}

// legacyAccount is an account record as the release before stamps wrote
// it.
func legacyAccount(t *testing.T, id string, disabled bool, groups ...string) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{
		"v": 1, "id": id, "username": "dave", "groups": groups, "disabled": disabled,
		"password_hash": "$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
		"created":       "2030-01-02T03:04:05Z", "updated": "2030-01-02T03:04:05Z",
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestAccountMergeLegacy: records without stamps read and merge; their
// disable is kept; a stamped edit wins over their fields.
func TestAccountMergeLegacy(t *testing.T) {
	ctx := context.Background()
	st := NewMemStore()
	s := newTestService(t, st, newClock())
	id := strings.Repeat("ab", 16)
	old := legacyAccount(t, id, true, "family")
	if err := st.Put(ctx, bucketAccounts, id, old); err != nil {
		t.Fatal(err)
	}
	if got := mustAccount(t, s, id); !got.Disabled || !slices.Equal(got.Groups, []string{"family"}) {
		t.Fatalf("legacy record reads as %+v", got)
	}
	m, err := mergeAccounts(old, old)
	if err != nil {
		t.Fatal(err)
	}
	if m2, _ := mergeAccounts(m, old); !bytes.Equal(m, m2) {
		t.Errorf("merge with a legacy record not idempotent:\n%s\n%s", m, m2)
	}
	// Stamped edits made on top of it, then merged with the legacy record
	// (a node that missed them): the edits win, the disable stays.
	if err := s.SetGroups(ctx, id, []string{"books"}); err != nil {
		t.Fatal(err)
	}
	cur, _ := st.Get(bucketAccounts, id)
	m, err = mergeAccounts(old, cur)
	if err != nil {
		t.Fatal(err)
	}
	var got accountRecord
	if err := json.Unmarshal(m, &got); err != nil {
		t.Fatal(err)
	}
	if !got.Disabled || !slices.Equal(got.Groups, []string{"books"}) {
		t.Errorf("legacy + stamped: disabled %v groups %v, want true [books]", got.Disabled, got.Groups)
	}
	// An enable lifts the legacy disable, also against the legacy record.
	if err := s.SetDisabled(ctx, id, false); err != nil {
		t.Fatal(err)
	}
	cur, _ = st.Get(bucketAccounts, id)
	if m, _ = mergeAccounts(cur, old); bytes.Contains(m, []byte(`"disabled":true`)) {
		t.Errorf("legacy disable came back after an enable: %s", m)
	}
	if _, err := mergeAccounts(old, legacyAccount(t, strings.Repeat("cd", 16), false)); err == nil {
		t.Error("merging two accounts' records: no error")
	}
	if _, err := mergeAccounts(old, []byte("{")); err == nil {
		t.Error("merging a bad record: no error")
	}
}

// TestInviteMergeConcurrentUse: an invite used on both sides of a split
// stays used after the merge, owned by the earliest use; both uses are
// kept; a released use does not count.
func TestInviteMergeConcurrentUse(t *testing.T) {
	ctx := context.Background()
	p := newPair(t)
	tok, err := p.a.CreateInvite(ctx, []string{"family"}, 0, "admin")
	if err != nil {
		t.Fatal(err)
	}
	key, _ := inviteKey(tok)
	copyTo(t, p.sa, p.sb, bucketInvites, key)
	first, err := p.a.Register(ctx, tok, NewAccount{Username: "erin", Password: "erin-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	p.clockB.Advance(time.Second)
	second, err := p.b.Register(ctx, tok, NewAccount{Username: "frank", Password: "frank-password-1"})
	if err != nil {
		t.Fatal(err)
	}
	m := p.sync(t, bucketInvites, key)
	var rec inviteRecord
	if err := json.Unmarshal(m, &rec); err != nil {
		t.Fatal(err)
	}
	if !rec.Used || rec.UsedBy != first.ID || len(rec.Uses) != 2 {
		t.Errorf("merged invite: used %v by %s, %d uses; want used by %s (the earliest), 2 uses", rec.Used, rec.UsedBy, len(rec.Uses), first.ID)
	}
	if !slices.ContainsFunc(rec.Uses, func(u inviteUse) bool { return u.Account == second.ID }) {
		t.Error("the second use was dropped")
	}
	for _, s := range []*Service{p.a, p.b} {
		if _, err := s.CheckInvite(tok); err == nil {
			t.Errorf("%s: the invite is usable after the merge", s.cfg.Node)
		}
	}
	// A stale unused copy does not make it usable again.
	fresh, _ := encodeInvite(inviteRecord{Groups: rec.Groups, Expires: rec.Expires, CreatedBy: rec.CreatedBy, Created: rec.Created})
	if m2, _ := mergeInvites(fresh, m); !bytes.Equal(m2, m) {
		t.Errorf("merging the unused invite changed the used one:\n%s\n%s", m2, m)
	}
}

// TestInviteReleasedAfterFailedRegistrationMerges: the failed registration's
// release survives a merge with the record that holds the use (a node
// that got the use but not the release).
func TestInviteReleasedAfterFailedRegistrationMerges(t *testing.T) {
	ctx := context.Background()
	fs := newFaultStore()
	s := newTestService(t, fs, nil)
	tok, err := s.CreateInvite(ctx, nil, 0, "admin")
	if err != nil {
		t.Fatal(err)
	}
	var usedVal []byte
	fs.mu.Lock()
	fs.onPut = func(bucket, key string, v []byte) {
		if bucket == bucketInvites && usedVal == nil && bytes.Contains(v, []byte(`"used":true`)) {
			usedVal = v
		}
	}
	fs.mu.Unlock()
	fs.setFail(bucketAccounts, errors.New("no quorum"))
	if _, err := s.Register(ctx, tok, NewAccount{Username: "gina", Password: "gina-password-1"}); err == nil {
		t.Fatal("registration succeeded")
	}
	key, _ := inviteKey(tok)
	back, _ := fs.Get(bucketInvites, key)
	if usedVal == nil {
		t.Fatal("the invite was never marked used")
	}
	m, err := mergeInvites(usedVal, back)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(m, []byte(`"used":true`)) {
		t.Errorf("the released use counts after a merge: %s", m)
	}
}

// TestMergeSemilattice: over records produced by random edits on three
// nodes (merged now and then), the merge functions are commutative,
// associative and idempotent, byte for byte.
func TestMergeSemilattice(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	stores := []*MemStore{NewMemStore(), NewMemStore(), NewMemStore()}
	var svcs []*Service
	var clocks []*fakeClock
	for i, st := range stores {
		clocks = append(clocks, newClock())
		svcs = append(svcs, newTestService(t, st, clocks[i], func(c *Config) { c.Node = fmt.Sprint("n", i) }))
	}
	c := mustCreate(t, svcs[0], "carol", "carol-password-1", "family")
	tok, err := svcs[0].CreateInvite(ctx, nil, 0, "admin")
	if err != nil {
		t.Fatal(err)
	}
	ikey, _ := inviteKey(tok)
	for _, st := range stores[1:] {
		copyTo(t, stores[0], st, bucketAccounts, c.ID)
		copyTo(t, stores[0], st, bucketInvites, ikey)
	}
	seen := map[string][][]byte{}
	record := func(st *MemStore) {
		for _, b := range []string{bucketAccounts, bucketInvites} {
			k := c.ID
			if b == bucketInvites {
				k = ikey
			}
			v, _ := st.Get(b, k)
			seen[b] = append(seen[b], v)
		}
	}
	groups := []string{"family", "music", "books", "admins"}
	for step := range 60 {
		i := rng.IntN(3)
		s, st := svcs[i], stores[i]
		// Clocks a second apart per step, skewed by -2..+3 s, so stamps
		// often disagree with the order of the edits.
		clocks[i].mu.Lock()
		clocks[i].t = newClock().Now().Add(time.Duration(step)*time.Second + time.Duration(rng.IntN(5000)-2000)*time.Millisecond)
		clocks[i].mu.Unlock()
		switch rng.IntN(6) {
		case 0:
			_ = s.SetDisabled(ctx, c.ID, rng.IntN(2) == 0)
		case 1:
			_ = s.SetPassword(ctx, c.ID, fmt.Sprint("password-", step))
		case 2:
			var g []string
			for _, x := range groups {
				if rng.IntN(2) == 0 {
					g = append(g, x)
				}
			}
			_ = s.SetGroups(ctx, c.ID, g)
		case 3:
			_, _ = s.UpdateProfile(ctx, c.ID, fmt.Sprint("Carol ", step), "")
		case 4:
			_, _ = s.Register(ctx, tok, NewAccount{Username: fmt.Sprint("u", step), Password: "password-123"})
		case 5: // merge with another node
			j := (i + 1 + rng.IntN(2)) % 3
			for _, b := range []string{bucketAccounts, bucketInvites} {
				k := c.ID
				if b == bucketInvites {
					k = ikey
				}
				va, _ := st.Get(b, k)
				vb, _ := stores[j].Get(b, k)
				m, err := MergeFuncs()[b](va, vb)
				if err != nil {
					t.Fatal(err)
				}
				_ = st.Put(ctx, b, k, m)
				_ = stores[j].Put(ctx, b, k, m)
			}
		}
		record(st)
	}
	for b, vals := range seen {
		merge := MergeFuncs()[b]
		mustMerge := func(x, y []byte) []byte {
			m, err := merge(x, y)
			if err != nil {
				t.Fatal(err)
			}
			return m
		}
		for range 300 {
			x, y, z := vals[rng.IntN(len(vals))], vals[rng.IntN(len(vals))], vals[rng.IntN(len(vals))]
			xy := mustMerge(x, y)
			if !bytes.Equal(xy, mustMerge(y, x)) {
				t.Fatalf("%s: not commutative:\n%s\n%s", b, x, y)
			}
			if !bytes.Equal(mustMerge(x, x), x) {
				t.Fatalf("%s: not idempotent on a stored value:\n%s\n%s", b, x, mustMerge(x, x))
			}
			if !bytes.Equal(mustMerge(xy, x), xy) {
				t.Fatalf("%s: join does not absorb its part", b)
			}
			if !bytes.Equal(mustMerge(xy, z), mustMerge(x, mustMerge(y, z))) {
				t.Fatalf("%s: not associative:\n%s\n%s\n%s", b, x, y, z)
			}
		}
	}
}

// TestMergeCoversEveryField fails when a field is added to a merged record
// type without a merge rule: mergeAccounts and mergeInvites build their
// result field by field, so a new field would be dropped by every merge.
// Add its rule (a counter such as a session generation merges by max),
// then add it here.
func TestMergeCoversEveryField(t *testing.T) {
	for _, tc := range []struct {
		typ  reflect.Type
		want []string
	}{
		{reflect.TypeFor[accountRecord](), []string{"V", "ID", "Username", "Name", "Email", "Groups", "Disabled", "MustRename", "PasswordHash", "Created", "Updated", "Stamps", "SessionGen"}},
		{reflect.TypeFor[accountStamps](), []string{"Username", "Profile", "Password", "Groups", "Disables", "Lifted"}},
		{reflect.TypeFor[inviteRecord](), []string{"V", "Groups", "Expires", "CreatedBy", "Created", "Used", "UsedBy", "UsedAt", "Uses"}},
		{reflect.TypeFor[inviteUse](), []string{"stamp", "Account", "At", "Released"}},
	} {
		var got []string
		for i := range tc.typ.NumField() {
			got = append(got, tc.typ.Field(i).Name)
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s has fields %v; the merge handles %v", tc.typ, got, tc.want)
		}
	}
}

// TestMergeSessionGenByMax: a revoke-all on either side of a split is kept
// (the session generation only grows), whatever the order of the merge.
func TestMergeSessionGenByMax(t *testing.T) {
	a, err := encodeAccount(accountRecord{ID: "acct1", Username: "carol", SessionGen: 3})
	if err != nil {
		t.Fatal(err)
	}
	b, err := encodeAccount(accountRecord{ID: "acct1", Username: "carol", SessionGen: 5})
	if err != nil {
		t.Fatal(err)
	}
	for _, pair := range [][2][]byte{{a, b}, {b, a}} {
		m, err := mergeAccounts(pair[0], pair[1])
		if err != nil {
			t.Fatal(err)
		}
		var r accountRecord
		if err := decodeJSON("account", m, &r); err != nil {
			t.Fatal(err)
		}
		if r.SessionGen != 5 {
			t.Fatalf("merged session generation %d, want 5", r.SessionGen)
		}
	}
}
