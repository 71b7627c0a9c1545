package relay_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/homecircle/circle/relay"
)

func newMesh(t *testing.T, name string, secret []byte) *relay.Mesh {
	t.Helper()
	m, err := relay.NewMesh(relay.MeshConfig{Name: name, Secret: secret, Conn: listenUDP(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// serveEcho echoes every stream of service on m until the listener closes.
func serveEcho(t *testing.T, m *relay.Mesh, service string) {
	t.Helper()
	l, err := m.Listen(service)
	if err != nil {
		t.Fatal(err)
	}
	wait := echoAll(l, 0)
	t.Cleanup(func() { l.Close(); m.Close(); wait() })
}

// echoAll echoes every stream l accepts (each for at most limit, if
// limit > 0) until l is closed; wait returns once the accept loop and
// every handler have ended.
func echoAll(l net.Listener, limit time.Duration) (wait func()) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if limit > 0 {
					c.SetDeadline(time.Now().Add(limit))
				}
				io.Copy(c, c)
			}()
		}
	}()
	return wg.Wait
}

func echoOnce(t *testing.T, m *relay.Mesh, peer, service string, msg []byte) {
	t.Helper()
	ctx := ctxT(t, 5*time.Second)
	c, err := m.Dial(ctx, peer, service)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("echo differs")
	}
}

func TestMeshStreamsAndPaths(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	serveEcho(t, b, "echo")
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("circle "), 100000)
	echoOnce(t, a, "bob", "echo", big)

	pa := a.Paths()
	if len(pa) != 1 || pa[0].Peer != "bob" || pa[0].Kind != relay.PathDirect || !pa[0].Dialed ||
		pa[0].BytesSent < uint64(len(big)) || pa[0].RTT <= 0 || pa[0].Since.IsZero() {
		t.Fatalf("alice's paths: %+v", pa)
	}
	eventually(t, 5*time.Second, "bob to see alice", func() bool {
		pb := b.Paths()
		return len(pb) == 1 && pb[0].Peer == "alice" && !pb[0].Dialed && pb[0].BytesReceived >= uint64(len(big))
	})
	// Connect again is a no-op.
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	if n := len(a.Paths()); n != 1 {
		t.Fatalf("%d paths after a second Connect", n)
	}

	// Unknown service: the stream is refused.
	if _, err := a.Dial(ctxT(t, 5*time.Second), "bob", "nothing"); !errors.Is(err, relay.ErrNoService) {
		t.Fatalf("dial unknown service: %v", err)
	}

	if _, err := a.Dial(ctxT(t, time.Second), "carol", "echo"); !errors.Is(err, relay.ErrNoPeer) {
		t.Fatalf("dial unknown peer: %v", err)
	}
}

func TestMeshWrongSecret(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	evil := newMesh(t, "mallory", []byte("not the circle secret, 32 bytes."))
	if err := evil.Connect(ctxT(t, 5*time.Second), "", a.Addr()); !errors.Is(err, relay.ErrAuth) {
		t.Fatalf("connect without the secret: %v, want ErrAuth", err)
	}
	if err := a.Connect(ctxT(t, 5*time.Second), "", evil.Addr()); !errors.Is(err, relay.ErrAuth) {
		t.Fatalf("connect to a node without the secret: %v, want ErrAuth", err)
	}
	if p := a.Paths(); len(p) != 0 {
		t.Fatalf("alice has paths: %+v", p)
	}
	if p := evil.Paths(); len(p) != 0 {
		t.Fatalf("mallory has paths: %+v", p)
	}
}

func TestMeshWrongName(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	if err := a.Connect(ctxT(t, 5*time.Second), "carol", b.Addr()); !errors.Is(err, relay.ErrAuth) {
		t.Fatalf("connect to bob as carol: %v, want ErrAuth", err)
	}
	if err := a.Connect(ctxT(t, 5*time.Second), "", b.Addr()); err != nil {
		t.Fatalf("connect to whoever: %v", err)
	}
	if p := a.Peers(); len(p) != 1 || p[0] != "bob" {
		t.Fatalf("peers %v", p)
	}
}

func TestMeshCloseIdempotentAndRefuses(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b.Close()
	// CONNECTION_CLOSE tells alice at once; were it lost, the idle
	// timeout (20 s) would.
	eventually(t, 25*time.Second, "alice to notice bob left", func() bool { return len(a.Paths()) == 0 })
	if _, err := b.Listen("x"); !errors.Is(err, relay.ErrClosed) {
		t.Fatalf("listen on closed mesh: %v", err)
	}
}

// newMember starts plain memberlist over m's transport.
func newMember(t *testing.T, m *relay.Mesh) *memberlist.Memberlist {
	t.Helper()
	tr, err := m.Transport()
	if err != nil {
		t.Fatal(err)
	}
	cfg := memberlist.DefaultLocalConfig()
	cfg.Name = m.Name()
	cfg.Transport = tr
	cfg.LogOutput = io.Discard
	ml, err := memberlist.Create(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ml.Shutdown() })
	return ml
}

func join(t *testing.T, ml *memberlist.Memberlist, seed *relay.Mesh) {
	t.Helper()
	if _, err := ml.Join([]string{seed.Name() + "/" + seed.Addr().String()}); err != nil {
		t.Fatal(err)
	}
}

func TestMemberlistOverMesh(t *testing.T) {
	meshes := []*relay.Mesh{newMesh(t, "a", testSecret), newMesh(t, "b", testSecret), newMesh(t, "c", testSecret)}
	var mls []*memberlist.Memberlist
	for _, m := range meshes {
		mls = append(mls, newMember(t, m))
	}
	join(t, mls[1], meshes[0])
	// c joins by address only: the transport learns the name on connect.
	if _, err := mls[2].Join([]string{meshes[1].Addr().String()}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "three members everywhere", func() bool {
		for _, ml := range mls {
			if ml.NumMembers() != 3 {
				return false
			}
		}
		return true
	})
	// a and c never met directly before; gossip made them connect.
	eventually(t, 15*time.Second, "a full mesh", func() bool {
		for _, m := range meshes {
			if len(m.Peers()) != 2 {
				return false
			}
		}
		return true
	})
}

func TestTransportLargePacket(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	ta, err := a.Transport()
	if err != nil {
		t.Fatal(err)
	}
	defer ta.Shutdown()
	tb, err := b.Transport()
	if err != nil {
		t.Fatal(err)
	}
	defer tb.Shutdown()
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int{10, 1100, 5000, 60000} {
		msg := bytes.Repeat([]byte{byte(size)}, size)
		if _, err := ta.WriteToAddress(msg, memberlist.Address{Name: "bob", Addr: b.Addr().String()}); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-tb.PacketCh():
			if !bytes.Equal(p.Buf, msg) || p.From.String() != a.Addr().String() {
				t.Fatalf("packet of %d bytes from %v: got %d bytes", size, p.From, len(p.Buf))
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("packet of %d bytes did not arrive", size)
		}
	}
}

// TestMemberlistThroughTURN: carol's only socket is a TURN allocation on a
// relay node's server; alice is reachable. They form a memberlist cluster
// over the relay, and both report the path as relayed via the relay node.
func TestMemberlistThroughTURN(t *testing.T) {
	env, alloc, carol := meshViaTURN(t, "carol", nil)
	alice := newMesh(t, "alice", testSecret)
	if carol.Addr().String() != alloc.RelayAddr().String() {
		t.Fatalf("carol advertises %v, relay address is %v", carol.Addr(), alloc.RelayAddr())
	}
	mlA := newMember(t, alice)
	mlC := newMember(t, carol)
	join(t, mlC, alice)
	eventually(t, 15*time.Second, "two members on both", func() bool {
		return mlA.NumMembers() == 2 && mlC.NumMembers() == 2
	})
	eventually(t, 5*time.Second, "both ends to report the relayed path", func() bool {
		pa, pc := alice.Paths(), carol.Paths()
		return len(pa) == 1 && pa[0].Peer == "carol" && pa[0].Kind == relay.PathRelayed && pa[0].Via == "relay1" &&
			pa[0].Remote == alloc.RelayAddr().String() &&
			len(pc) == 1 && pc[0].Peer == "alice" && pc[0].Kind == relay.PathRelayed && pc[0].Via == "relay1"
	})
	// A stream across the relay.
	serveEcho(t, alice, "echo")
	echoOnce(t, carol, "alice", "echo", bytes.Repeat([]byte("relayed "), 20000))
	if env.srv.Allocations() != 1 {
		t.Fatalf("%d allocations", env.srv.Allocations())
	}
}

// TestMeshSimultaneousConnect: both ends dial at once; one connection
// remains.
func TestMeshSimultaneousConnect(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	serveEcho(t, b, "echo")
	errs := make(chan error, 2)
	go func() { errs <- a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()) }()
	go func() { errs <- b.Connect(ctxT(t, 5*time.Second), "alice", a.Addr()) }()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 10*time.Second, "one connection on each side", func() bool {
		return len(a.Paths()) == 1 && len(b.Paths()) == 1
	})
	echoOnce(t, a, "bob", "echo", []byte("still works"))
}

// TestMeshReconnectReplacesOld: a peer that vanishes without a word (its
// socket gone) and comes back on the same address is reachable at once
// over the new connection; the stale one is retired.
func TestMeshReconnectReplacesOld(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	conn := listenUDP(t)
	addr := conn.LocalAddr()
	b1, err := relay.NewMesh(relay.MeshConfig{Name: "bob", Secret: testSecret, Conn: conn})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", addr); err != nil {
		t.Fatal(err)
	}
	conn.Close() // no CONNECTION_CLOSE reaches alice
	b1.Close()
	if n := len(a.Paths()); n != 1 {
		t.Fatalf("alice has %d paths", n)
	}
	conn2, err := net.ListenUDP("udp4", addr.(*net.UDPAddr))
	if err != nil {
		t.Skipf("port taken meanwhile: %v", err)
	}
	b2, err := relay.NewMesh(relay.MeshConfig{Name: "bob", Secret: testSecret, Conn: conn2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b2.Close() })
	serveEcho(t, b2, "echo")
	if err := b2.Connect(ctxT(t, 5*time.Second), "alice", a.Addr()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "alice to accept bob's new connection", func() bool { return len(a.Paths()) == 2 })
	echoOnce(t, a, "bob", "echo", []byte("back"))
	eventually(t, 10*time.Second, "the stale connection to be retired", func() bool { return len(a.Paths()) == 1 })
	echoOnce(t, a, "bob", "echo", []byte("still"))
}

// TestMeshRestartedPeerOnOtherSide: the node with the larger name keeps
// no stale connection to a restarted peer with the smaller name either.
func TestMeshRestartedPeerOnOtherSide(t *testing.T) {
	z := newMesh(t, "zoe", testSecret) // larger name: does not retire duplicates
	conn := listenUDP(t)
	a1, err := relay.NewMesh(relay.MeshConfig{Name: "alice", Secret: testSecret, Conn: conn})
	if err != nil {
		t.Fatal(err)
	}
	if err := a1.Connect(ctxT(t, 5*time.Second), "zoe", z.Addr()); err != nil {
		t.Fatal(err)
	}
	// Wait for alice's hello too: a connection whose peer vanished before
	// its hello arrived has no known incarnation, so it is left to its idle
	// timeout instead of being closed when the peer's next run appears.
	eventually(t, 5*time.Second, "zoe to see alice", func() bool { return len(z.Paths()) == 1 && z.HelloFrom("alice") })
	conn.Close() // vanish without a word
	a1.Close()
	a2 := newMesh(t, "alice", testSecret)
	if err := a2.Connect(ctxT(t, 5*time.Second), "zoe", z.Addr()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "zoe to drop the stale connection", func() bool {
		p := z.Paths()
		return len(p) == 1 && p[0].Remote == a2.Addr().String()
	})
}

// TestTransportShutdownEndsDial: memberlist's Shutdown ends a stream dial
// that is still handshaking with a silent address (the replicator's heal
// attempts to a dead member must not hold up its Close for the handshake
// timeout).
func TestTransportShutdownEndsDial(t *testing.T) {
	a := newMesh(t, "alice", testSecret)
	ta, err := a.Transport()
	if err != nil {
		t.Fatal(err)
	}
	silent := listenUDP(t) // never answers
	defer silent.Close()
	errc := make(chan error, 1)
	go func() {
		_, err := ta.DialAddressTimeout(memberlist.Address{Addr: silent.LocalAddr().String()}, 10*time.Second)
		errc <- err
	}()
	buf := make([]byte, 2048)
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := silent.ReadFrom(buf); err != nil { // the handshake's first packet: the dial is in flight
		t.Fatalf("no handshake packet: %v", err)
	}
	start := time.Now()
	ta.Shutdown()
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("dial to a silent address succeeded")
		}
		t.Logf("dial ended %v after Shutdown: %v", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(2 * time.Second): // the handshake timeout is 5 s
		t.Fatal("Shutdown did not end the dial in flight")
	}
}
