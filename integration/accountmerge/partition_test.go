// Package accountmerge_test runs identity on the replicated store, two
// nodes in one process, and checks what concurrent account edits made on
// the two sides of a partition become after the heal (issue 8, "No lost
// updates on accounts").
package accountmerge_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/homecircle/circle/caddymodule/circlenode"
	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/replicator"
)

var secret = bytes.Repeat([]byte{7}, 32)

// cutTransport is a memberlist transport that a test can cut off: while
// cut, its packets are dropped and its dials refused, and cutting closes
// the streams it dialed (the peer's streams to it close with them). A
// split cuts both nodes' transports.
type cutTransport struct {
	*memberlist.NetTransport
	cut atomic.Bool

	mu    sync.Mutex // guards conns
	conns map[net.Conn]bool
}

func newCutTransport(t *testing.T) *cutTransport {
	t.Helper()
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	return &cutTransport{NetTransport: nt, conns: map[net.Conn]bool{}}
}

// setCut cuts the transport off (true) or reconnects it (false).
func (c *cutTransport) setCut(on bool) {
	c.cut.Store(on)
	if !on {
		return
	}
	c.mu.Lock()
	conns := c.conns
	c.conns = map[net.Conn]bool{}
	c.mu.Unlock()
	for conn := range conns {
		conn.Close()
	}
}

func (c *cutTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if c.cut.Load() {
		return time.Now(), nil // lost, as UDP is
	}
	return c.NetTransport.WriteTo(b, addr)
}

func (c *cutTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	return c.WriteTo(b, a.Addr)
}

func (c *cutTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if c.cut.Load() {
		return nil, errors.New("cut")
	}
	conn, err := c.NetTransport.DialTimeout(addr, timeout)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.conns[conn] = true
	c.mu.Unlock()
	return conn, nil
}

func (c *cutTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return c.DialTimeout(a.Addr, timeout)
}

// node is a replicator node with an identity service on it.
type node struct {
	name string
	repl *replicator.Node
	id   *identity.Service
	tr   *cutTransport
}

// startNode opens a replicator node (joining seeds) and starts identity on
// it, both configured as caddymodule configures them; now is its clock.
func startNode(t *testing.T, dir, name string, now func() time.Time, seeds ...string) *node {
	t.Helper()
	tr := newCutTransport(t)
	rc := replicator.DefaultConfig()
	rc.Name = name
	rc.DataDir = filepath.Join(dir, name)
	rc.Secret = secret
	rc.BindAddr = fmt.Sprintf("127.0.0.1:%d", tr.GetAutoBindPort())
	rc.Join = seeds
	rc.AntiEntropyInterval = 500 * time.Millisecond
	circlenode.IdentityBuckets(&rc)
	rc.Now = now
	rc.Transport = tr
	if testing.Verbose() {
		rc.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil)).With("node", name)
	}
	repl, err := replicator.Open(rc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { repl.Close() })
	ic := identity.DefaultConfig()
	ic.Domain = "ourcircle.net"
	ic.Secret = secret
	ic.Argon2Memory = 64 // tiny argon2 parameters: the test is not about hashing
	ic.Argon2Time = 1
	ic.Now = now
	ic.Node = name
	id, err := identity.New(circlenode.IdentityStore(repl), ic)
	if err != nil {
		t.Fatal(err)
	}
	if err := id.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { id.Close() })
	return &node{name: name, repl: repl, id: id, tr: tr}
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond) // polling interval
	}
}

// alive is the number of alive nodes n sees, itself included.
func alive(n *node) int { return n.repl.Stats().AliveMembers }

// TestDisableSurvivesConcurrentPasswordChange is the issue's case: during a
// split an admin disables carol on one side; two seconds later carol
// changes her password on the other side. Both calls succeed. After the
// heal carol must be disabled on every node, no password may log her in and
// her old sessions must be refused everywhere. An explicit enable made
// after the heal enables her again, with the new password.
func TestDisableSurvivesConcurrentPasswordChange(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	// b's clock is 2 s ahead: its password change is "two seconds later"
	// than a's disable without the test sleeping for it.
	a := startNode(t, dir, "a", time.Now)
	b := startNode(t, dir, "b", func() time.Time { return time.Now().Add(2 * time.Second) }, a.repl.Addr())
	nodes := []*node{a, b}
	// Memberlist's failure detection and the rejoin backoff set these
	// bounds; they are generous, not tuned.
	const detect, heal = 30 * time.Second, 60 * time.Second
	waitFor(t, detect, "a and b to see each other", func() bool { return alive(a) == 2 && alive(b) == 2 })

	const oldPW, newPW = "carol-old-password", "carol-new-password"
	carol, err := a.id.CreateAccount(ctx, identity.NewAccount{Username: "carol", Password: oldPW})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, detect, "carol on b", func() bool { _, err := b.id.AccountByUsername("carol"); return err == nil })
	var tokens []string
	for _, n := range nodes {
		acct, err := n.id.Login(ctx, "carol", oldPW, "192.0.2.1")
		if err != nil {
			t.Fatalf("login on %s before the split: %v", n.name, err)
		}
		tok, _, err := n.id.IssueSession(ctx, acct, "test", "192.0.2.1")
		if err != nil {
			t.Fatal(err)
		}
		tokens = append(tokens, tok)
	}
	waitFor(t, detect, "both sessions valid on both nodes", func() bool {
		for _, n := range nodes {
			for _, tok := range tokens {
				if _, err := n.id.Verify(tok); err != nil {
					return false
				}
			}
		}
		return true
	})

	// The split.
	a.tr.setCut(true)
	b.tr.setCut(true)
	waitFor(t, detect, "a and b to see each other gone", func() bool { return alive(a) == 1 && alive(b) == 1 })
	if err := a.id.SetDisabled(ctx, carol.ID, true); err != nil {
		t.Fatalf("disable on a: %v", err)
	}
	if err := b.id.ChangePassword(ctx, carol.ID, oldPW, newPW); err != nil {
		t.Fatalf("password change on b: %v", err)
	}

	// The heal: b rejoins its seed a by itself.
	a.tr.setCut(false)
	b.tr.setCut(false)
	waitFor(t, heal, "a and b together again with the same account record", func() bool {
		if alive(a) != 2 || alive(b) != 2 {
			return false
		}
		ra, errA := a.repl.Get("accounts", carol.ID)
		rb, errB := b.repl.Get("accounts", carol.ID)
		return errA == nil && errB == nil && ra.Version == rb.Version && bytes.Equal(ra.Value, rb.Value)
	})
	// The revocation written with the disable replicates on its own.
	waitFor(t, heal, "a's revocations on b", func() bool {
		ra, _ := a.repl.List("revocations", "")
		rb, _ := b.repl.List("revocations", "")
		return len(ra) > 0 && len(ra) == len(rb)
	})
	for _, n := range nodes {
		acct, err := n.id.Account(carol.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !acct.Disabled {
			t.Errorf("%s: carol is enabled after the heal; the disable made on a was lost", n.name)
		}
		for _, pw := range []string{oldPW, newPW} {
			if _, err := n.id.Login(ctx, "carol", pw, "192.0.2.2"); !errors.Is(err, identity.ErrBadCredentials) {
				t.Errorf("%s: login with %q after the heal: %v, want ErrBadCredentials", n.name, pw, err)
			}
		}
		for i, tok := range tokens {
			if _, err := n.id.Verify(tok); err == nil {
				t.Errorf("%s: session %d from before the split still verifies", n.name, i)
			}
		}
	}
	if t.Failed() {
		return
	}

	// An explicit enable after the heal enables, and the password change
	// made during the split was not lost either.
	if err := a.id.SetDisabled(ctx, carol.ID, false); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		waitFor(t, detect, "carol enabled on "+n.name, func() bool {
			acct, err := n.id.Account(carol.ID)
			return err == nil && !acct.Disabled
		})
		if _, err := n.id.Login(ctx, "carol", newPW, "192.0.2.3"); err != nil {
			t.Errorf("%s: login with the new password after the enable: %v", n.name, err)
		}
		if _, err := n.id.Login(ctx, "carol", oldPW, "192.0.2.3"); !errors.Is(err, identity.ErrBadCredentials) {
			t.Errorf("%s: login with the old password after the enable: %v, want ErrBadCredentials", n.name, err)
		}
	}
}

// TestUsernameCollisionWithMerges: both sides of a split create dave, b
// later than a. After the heal the usernames index (first writer wins) keeps a's claim;
// b's dave is renamed "dave-<6 hex of its id>" with MustRename (both nodes
// may do it; the account merge joins their renames), and nothing else of
// either account is lost: a group added to b's dave on b during the split
// stays.
func TestUsernameCollisionWithMerges(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	a := startNode(t, dir, "a", time.Now)
	b := startNode(t, dir, "b", func() time.Time { return time.Now().Add(2 * time.Second) }, a.repl.Addr())
	const detect, heal = 30 * time.Second, 60 * time.Second
	waitFor(t, detect, "a and b to see each other", func() bool { return alive(a) == 2 && alive(b) == 2 })
	a.tr.setCut(true)
	b.tr.setCut(true)
	waitFor(t, detect, "a and b to see each other gone", func() bool { return alive(a) == 1 && alive(b) == 1 })
	daveA, err := a.id.CreateAccount(ctx, identity.NewAccount{Username: "dave", Password: "dave-a-password"})
	if err != nil {
		t.Fatal(err)
	}
	daveB, err := b.id.CreateAccount(ctx, identity.NewAccount{Username: "dave", Password: "dave-b-password"})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.id.SetGroups(ctx, daveB.ID, []string{"family"}); err != nil {
		t.Fatal(err)
	}
	a.tr.setCut(false)
	b.tr.setCut(false)
	renamed := "dave-" + daveB.ID[:6]
	for _, n := range []*node{a, b} {
		waitFor(t, heal, "the collision resolved on "+n.name, func() bool {
			x, errA := n.id.Account(daveA.ID)
			y, errB := n.id.Account(daveB.ID)
			return errA == nil && errB == nil && x.Username == "dave" && y.Username == renamed
		})
	}
	waitFor(t, heal, "same records on both nodes", func() bool {
		for _, id := range []string{daveA.ID, daveB.ID} {
			ra, errA := a.repl.Get("accounts", id)
			rb, errB := b.repl.Get("accounts", id)
			if errA != nil || errB != nil || ra.Version != rb.Version {
				return false
			}
		}
		return true
	})
	for _, n := range []*node{a, b} {
		y, _ := n.id.Account(daveB.ID)
		if !y.MustRename || len(y.Groups) != 1 || y.Groups[0] != "family" {
			t.Errorf("%s: b's dave after the heal: must rename %v, groups %v; want true, [family]", n.name, y.MustRename, y.Groups)
		}
		if _, err := n.id.Login(ctx, renamed, "dave-b-password", "192.0.2.1"); err != nil {
			t.Errorf("%s: b's dave logs in as %s: %v", n.name, renamed, err)
		}
		if acct, err := n.id.Login(ctx, "dave", "dave-a-password", "192.0.2.1"); err != nil || acct.ID != daveA.ID {
			t.Errorf("%s: a's dave logs in as dave: %v", n.name, err)
		}
	}
}
