package relay_test

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
)

// blackhole is a socket that can be cut: while cut, it sends nothing and
// discards what it reads.
type blackhole struct {
	net.PacketConn
	cut atomic.Bool
}

func (b *blackhole) WriteTo(p []byte, addr net.Addr) (int, error) {
	if b.cut.Load() {
		return len(p), nil
	}
	return b.PacketConn.WriteTo(p, addr)
}

func (b *blackhole) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		n, addr, err := b.PacketConn.ReadFrom(p)
		if err != nil || !b.cut.Load() {
			return n, addr, err
		}
	}
}

func pathOf(ps []relay.PathInfo, kind relay.PathKind) *relay.PathInfo {
	for i := range ps {
		if ps[i].Kind == kind {
			return &ps[i]
		}
	}
	return nil
}

// TestRelayedThenPunchedThenFallback: carol reaches alice through a TURN
// relay first, then both punch a direct path, which carries the traffic
// from then on; when the punched path dies, traffic falls back to the
// relay, which stayed up.
func TestRelayedThenPunchedThenFallback(t *testing.T) {
	env := startTURN(t, true, nil)
	env.setPeers(netip.MustParseAddr("127.0.0.1"))
	alloc, err := allocate(t, env.addr, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	fast := func(name string, conn net.PacketConn) *relay.Mesh {
		m, err := relay.NewMesh(relay.MeshConfig{
			Name: name, Secret: testSecret, Conn: conn,
			KeepAlive: 200 * time.Millisecond, IdleTimeout: time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	alice := fast("alice", listenUDP(t))
	serveEcho(t, alice, "echo")
	hole := &blackhole{PacketConn: listenUDP(t)}
	carol := fast("carol", hole)
	if err := carol.ConnectVia(ctxT(t, time.Second), "alice", "r1", alice.Addr()); !errors.Is(err, relay.ErrInvalid) {
		t.Fatalf("connect via an unknown relay: %v", err)
	}
	if err := carol.AddRelay("r1", alloc.PacketConn()); err != nil {
		t.Fatal(err)
	}
	if err := carol.ConnectVia(ctxT(t, 5*time.Second), "alice", "r1", alice.Addr()); err != nil {
		t.Fatal(err)
	}
	echoOnce(t, carol, "alice", "echo", []byte("relayed"))
	eventually(t, 5*time.Second, "alice to see the relayed path", func() bool {
		p := alice.Paths()
		return len(p) == 1 && p[0].Kind == relay.PathRelayed && p[0].Via == "r1"
	})

	// Both punch at once (on loopback there is no NAT to open, but the
	// dance is the same).
	errs := make(chan error, 2)
	go func() { errs <- alice.Punch(ctxT(t, 5*time.Second), "carol", carol.Addr()) }()
	go func() { errs <- carol.Punch(ctxT(t, 5*time.Second), "alice", alice.Addr()) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 10*time.Second, "one punched and one relayed path on each side", func() bool {
		for _, m := range []*relay.Mesh{alice, carol} {
			p := m.Paths()
			if len(p) != 2 || pathOf(p, relay.PathPunched) == nil || pathOf(p, relay.PathRelayed) == nil {
				return false
			}
		}
		return true
	})
	sent := func(kind relay.PathKind) (n uint64) {
		for _, p := range carol.Paths() {
			if p.Kind == kind {
				n += p.BytesSent
			}
		}
		return n
	}
	before := sent(relay.PathRelayed)
	big := bytes.Repeat([]byte("punched "), 50000)
	echoOnce(t, carol, "alice", "echo", big)
	if after := sent(relay.PathRelayed); after-before >= uint64(len(big)) {
		t.Fatalf("the relayed path carried %d bytes of a %d byte stream after the punch", after-before, len(big))
	}

	// The punched path dies; the relay carries on.
	hole.cut.Store(true)
	eventually(t, 10*time.Second, "only the relayed path left", func() bool {
		pa, pc := alice.Paths(), carol.Paths()
		return len(pa) == 1 && pa[0].Kind == relay.PathRelayed && len(pc) == 1 && pc[0].Kind == relay.PathRelayed
	})
	echoOnce(t, carol, "alice", "echo", []byte("fell back"))

	if err := carol.RemoveRelay("r1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "no path left", func() bool { return len(carol.Paths()) == 0 })
}

// filtering is a socket behind a simulated address-restricted NAT filter:
// it only receives packets from addresses it has sent to.
type filtering struct {
	net.PacketConn
	mu   sync.Mutex // guards sent
	sent map[string]bool
}

func (f *filtering) WriteTo(p []byte, addr net.Addr) (int, error) {
	f.mu.Lock()
	f.sent[addr.String()] = true
	f.mu.Unlock()
	return f.PacketConn.WriteTo(p, addr)
}

func (f *filtering) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		n, addr, err := f.PacketConn.ReadFrom(p)
		if err != nil {
			return n, addr, err
		}
		f.mu.Lock()
		ok := f.sent[addr.String()]
		f.mu.Unlock()
		if ok {
			return n, addr, nil
		}
	}
}

// TestPunchThroughFilteringNATs: two nodes behind address-restricted
// filters cannot connect one-sidedly, but can when both punch at once.
func TestPunchThroughFilteringNATs(t *testing.T) {
	mk := func(name string) *relay.Mesh {
		m, err := relay.NewMesh(relay.MeshConfig{
			Name: name, Secret: testSecret,
			Conn: &filtering{PacketConn: listenUDP(t), sent: map[string]bool{}},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	alice, bob := mk("alice"), mk("bob")
	if err := alice.Connect(ctxT(t, 500*time.Millisecond), "bob", bob.Addr()); err == nil {
		t.Fatal("connected through bob's filter without punching")
	}
	serveEcho(t, bob, "echo")
	errs := make(chan error, 2)
	go func() { errs <- alice.Punch(ctxT(t, 5*time.Second), "bob", bob.Addr()) }()
	go func() { errs <- bob.Punch(ctxT(t, 5*time.Second), "alice", alice.Addr()) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	echoOnce(t, alice, "bob", "echo", []byte("through the holes"))
	eventually(t, 10*time.Second, "one punched path on each side", func() bool {
		pa, pb := alice.Paths(), bob.Paths()
		return len(pa) == 1 && pa[0].Kind == relay.PathPunched && len(pb) == 1 && pb[0].Kind == relay.PathPunched
	})
}

// TestPunchViaIntroducer: alice and bob, each behind a filtering NAT, both
// reach r; r introduces them and they punch a direct path.
func TestPunchViaIntroducer(t *testing.T) {
	mk := func(name string) *relay.Mesh {
		m, err := relay.NewMesh(relay.MeshConfig{
			Name: name, Secret: testSecret,
			Conn: &filtering{PacketConn: listenUDP(t), sent: map[string]bool{}},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	r := newMesh(t, "r", testSecret)
	alice, bob := mk("alice"), mk("bob")
	serveEcho(t, bob, "echo")
	if err := alice.PunchVia(ctxT(t, 5*time.Second), "bob", "r"); !errors.Is(err, relay.ErrNoPeer) {
		t.Fatalf("punch via a node alice has no path to: %v", err)
	}
	for _, m := range []*relay.Mesh{alice, bob} {
		if err := m.Connect(ctxT(t, 5*time.Second), "r", r.Addr()); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 5*time.Second, "r to see both", func() bool { return len(r.Peers()) == 2 })
	if err := alice.PunchVia(ctxT(t, 5*time.Second), "carol", "r"); err == nil {
		t.Fatal("introduced to a node r does not know")
	}
	if err := alice.PunchVia(ctxT(t, 10*time.Second), "bob", "r"); err != nil {
		t.Fatal(err)
	}
	echoOnce(t, alice, "bob", "echo", []byte("introduced"))
	eventually(t, 10*time.Second, "one punched path between alice and bob", func() bool {
		pa, pb := pathOf(alice.Paths(), relay.PathPunched), pathOf(bob.Paths(), relay.PathPunched)
		return pa != nil && pa.Peer == "bob" && pb != nil && pb.Peer == "alice" &&
			len(alice.Paths()) == 2 && len(bob.Paths()) == 2
	})
}
