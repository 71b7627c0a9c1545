package relay_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
	"github.com/pion/stun"
)

func TestCredentials(t *testing.T) {
	exp := time.Unix(2000000000, 0)
	u, p, err := relay.Credentials(testSecret, "alice", exp)
	if err != nil {
		t.Fatal(err)
	}
	if u != "2000000000:alice" {
		t.Fatalf("username %q", u)
	}
	u2, p2, _ := relay.Credentials(testSecret, "alice", exp)
	if u2 != u || p2 != p {
		t.Fatal("credentials are not deterministic")
	}
	_, p3, _ := relay.Credentials([]byte("another secret, 32 bytes long!!!"), "alice", exp)
	if p3 == p {
		t.Fatal("password does not depend on the secret")
	}
	if _, _, err := relay.Credentials([]byte("short"), "alice", exp); !errors.Is(err, relay.ErrInvalid) {
		t.Fatalf("short secret: %v", err)
	}
	if _, _, err := relay.Credentials(testSecret, "", exp); !errors.Is(err, relay.ErrInvalid) {
		t.Fatalf("empty node: %v", err)
	}
}

type turnEnv struct {
	srv   *relay.Server
	addr  string
	peers atomic.Pointer[[]netip.Addr]
}

// startTURN runs a TURN server on loopback whose peers are set with
// setPeers. wrap, if set, wraps the server's socket.
func startTURN(t *testing.T, loopback bool, wrap func(net.PacketConn) net.PacketConn) *turnEnv {
	t.Helper()
	env := &turnEnv{}
	env.peers.Store(&[]netip.Addr{})
	var pc net.PacketConn = listenUDP(t)
	env.addr = pc.LocalAddr().String()
	if wrap != nil {
		pc = wrap(pc)
	}
	srv, err := relay.NewServer(relay.ServerConfig{
		Secret:       testSecret,
		PacketConn:   pc,
		RelayAddress: net.IPv4(127, 0, 0, 1),
		Peers:        func() []netip.Addr { return *env.peers.Load() },
	})
	if err != nil {
		t.Fatal(err)
	}
	if loopback {
		srv.AllowLoopback()
	}
	env.srv = srv
	t.Cleanup(func() { srv.Close() })
	return env
}

func (e *turnEnv) setPeers(a ...netip.Addr) { e.peers.Store(&a) }

func allocate(t *testing.T, server string, secret []byte) (*relay.Allocation, error) {
	t.Helper()
	a, err := relay.Allocate(relay.AllocateConfig{
		Conn:   listenUDP(t),
		Server: server,
		Secret: secret,
		Node:   "client",
	})
	if err == nil {
		t.Cleanup(func() { a.Close() })
	}
	return a, err
}

func TestAllocateWrongSecretRefused(t *testing.T) {
	env := startTURN(t, true, nil)
	_, err := allocate(t, env.addr, []byte("not the circle secret, 32 bytes."))
	if !errors.Is(err, relay.ErrAuth) {
		t.Fatalf("allocate with wrong secret: %v, want ErrAuth", err)
	}
	if n := env.srv.Allocations(); n != 0 {
		t.Fatalf("%d allocations", n)
	}
}

func TestAllocateExpiredRefused(t *testing.T) {
	env := startTURN(t, true, nil)
	conn := listenUDP(t)
	// Credentials valid for a nanosecond have expired (second
	// resolution) by the time the server checks them.
	_, err := relay.Allocate(relay.AllocateConfig{
		Conn: conn, Server: env.addr, Secret: testSecret, Node: "client", TTL: time.Nanosecond,
	})
	if !errors.Is(err, relay.ErrAuth) {
		t.Fatalf("allocate with expired credentials: %v, want ErrAuth", err)
	}
}

func TestPermissionHandler(t *testing.T) {
	env := startTURN(t, false, nil)
	env.setPeers(netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("10.1.2.3"),
		netip.MustParseAddr("198.51.100.7"))
	for _, tc := range []struct {
		ip   string
		want bool
	}{
		{"198.51.100.7", true},        // a public circle peer
		{"10.1.2.3", true},            // a private circle peer, listed explicitly
		{"10.1.2.4", false},           // private, not a peer
		{"192.168.1.1", false},        // private, not a peer
		{"203.0.113.9", false},        // public, not a peer
		{"127.0.0.1", false},          // loopback, even though listed
		{"127.0.0.2", false},          // loopback
		{"0.0.0.0", false},            // unspecified
		{"169.254.1.1", false},        // link-local
		{"224.0.0.1", false},          // multicast
		{"::1", false},                // v6 loopback
		{"::ffff:198.51.100.7", true}, // v4-mapped peer
	} {
		if got := env.srv.Allowed(net.ParseIP(tc.ip)); got != tc.want {
			t.Errorf("allowed(%s) = %v, want %v", tc.ip, got, tc.want)
		}
	}
}

func TestOwnAddressRefused(t *testing.T) {
	// The relay address is the server's own address: refused even when
	// listed as a peer.
	pc := listenUDP(t)
	own := net.IPv4(198, 51, 100, 1)
	srv, err := relay.NewServer(relay.ServerConfig{
		Secret: testSecret, PacketConn: pc, RelayAddress: own, RelayBindAddress: "127.0.0.1",
		Peers: func() []netip.Addr { return []netip.Addr{netip.MustParseAddr("198.51.100.1")} },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if srv.Allowed(own) {
		t.Fatal("server relays to its own address")
	}
}

// echo answers every packet on pc with the same bytes until pc closes.
func echo(t *testing.T, pc net.PacketConn) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	t.Cleanup(func() { pc.Close(); wg.Wait() })
}

// roundTrip sends msg through rc to peer and waits for the echo.
func roundTrip(rc net.PacketConn, peer net.Addr, msg []byte, d time.Duration) error {
	deadline := time.Now().Add(d)
	buf := make([]byte, 2048)
	for time.Now().Before(deadline) {
		if _, err := rc.WriteTo(msg, peer); err != nil {
			return err
		}
		rc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, _, err := rc.ReadFrom(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			return err
		}
		if bytes.Equal(buf[:n], msg) {
			return nil
		}
	}
	return errors.New("no echo")
}

func TestRelayToPeer(t *testing.T) {
	env := startTURN(t, true, nil)
	peer := listenUDP(t)
	echo(t, peer)
	env.setPeers(netip.MustParseAddr("127.0.0.1"))
	a, err := allocate(t, env.addr, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(a.PacketConn(), peer.LocalAddr(), []byte("hello"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestRelayRefusesNonPeer(t *testing.T) {
	env := startTURN(t, true, nil) // loopback allowed, but no peers at all
	peer := listenUDP(t)
	echo(t, peer)
	a, err := allocate(t, env.addr, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(a.PacketConn(), peer.LocalAddr(), []byte("hello"), time.Second); err == nil {
		t.Fatal("relayed to a target that is not a circle peer")
	}
}

func TestRelayRefusesLoopback(t *testing.T) {
	env := startTURN(t, false, nil) // the production rule: never loopback
	peer := listenUDP(t)
	echo(t, peer)
	env.setPeers(netip.MustParseAddr("127.0.0.1"))
	a, err := allocate(t, env.addr, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(a.PacketConn(), peer.LocalAddr(), []byte("hello"), time.Second); err == nil {
		t.Fatal("relayed to loopback")
	}
}

func TestReflexive(t *testing.T) {
	env := startTURN(t, false, nil)
	c := listenUDP(t)
	defer c.Close()
	got, err := relay.Reflexive(c, env.addr)
	if err != nil {
		t.Fatal(err)
	}
	want := c.LocalAddr().(*net.UDPAddr).AddrPort()
	if got != want {
		t.Fatalf("reflexive %v, want %v", got, want)
	}
}

// shortLifetime wraps a TURN server's socket and rewrites the LIFETIME of
// Allocate success responses to 2 s. pion's client does not check response
// integrity, so it believes it; it then refreshes every second asking for
// 2 s, which the server grants: the allocation really lives on refreshes.
type shortLifetime struct {
	net.PacketConn
	refreshes atomic.Int32
}

func (s *shortLifetime) WriteTo(b []byte, addr net.Addr) (int, error) {
	m := &stun.Message{Raw: append([]byte(nil), b...)}
	if stun.IsMessage(b) && m.Decode() == nil {
		switch m.Type {
		case stun.NewType(stun.MethodAllocate, stun.ClassSuccessResponse):
			setLifetime(m.Raw, 2)
			b = m.Raw
		case stun.NewType(stun.MethodRefresh, stun.ClassSuccessResponse):
			s.refreshes.Add(1)
		}
	}
	return s.PacketConn.WriteTo(b, addr)
}

// setLifetime overwrites the LIFETIME attribute's value in a raw STUN
// message.
func setLifetime(raw []byte, seconds uint32) {
	for off := 20; off+4 <= len(raw); {
		typ := binary.BigEndian.Uint16(raw[off:])
		n := int(binary.BigEndian.Uint16(raw[off+2:]))
		if stun.AttrType(typ) == stun.AttrLifetime && n == 4 {
			binary.BigEndian.PutUint32(raw[off+4:], seconds)
			return
		}
		off += 4 + (n+3)&^3
	}
}

func TestAllocationSurvivesRefresh(t *testing.T) {
	var shim *shortLifetime
	env := startTURN(t, true, func(pc net.PacketConn) net.PacketConn {
		shim = &shortLifetime{PacketConn: pc}
		return shim
	})
	peer := listenUDP(t)
	echo(t, peer)
	env.setPeers(netip.MustParseAddr("127.0.0.1"))
	a, err := allocate(t, env.addr, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(a.PacketConn(), peer.LocalAddr(), []byte("before"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// Three refreshes at 2 s lifetime: without them the server would have
	// dropped the allocation.
	eventually(t, 10*time.Second, "three allocation refreshes", func() bool { return shim.refreshes.Load() >= 3 })
	if err := roundTrip(a.PacketConn(), peer.LocalAddr(), []byte("after"), 5*time.Second); err != nil {
		t.Fatalf("relay after refreshes: %v", err)
	}
	if !strings.Contains(a.RelayAddr().String(), "127.0.0.1:") {
		t.Fatalf("relay address %v", a.RelayAddr())
	}
}

func TestMeshReflexive(t *testing.T) {
	env := startTURN(t, false, nil)
	a := newMesh(t, "alice", testSecret)
	b := newMesh(t, "bob", testSecret)
	serveEcho(t, b, "echo")
	if err := a.Connect(ctxT(t, 5*time.Second), "bob", b.Addr()); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		got, err := a.Reflexive(ctxT(t, 5*time.Second), env.addr)
		if err != nil {
			t.Fatal(err)
		}
		if got.String() != a.Addr().String() {
			t.Fatalf("reflexive %v, want %v", got, a.Addr())
		}
		// The mesh keeps working on the same socket.
		echoOnce(t, a, "bob", "echo", []byte("after stun"))
	}
}

// countBindings counts STUN Binding requests a server receives.
type countBindings struct {
	net.PacketConn
	n atomic.Int32
}

func (c *countBindings) ReadFrom(b []byte) (int, net.Addr, error) {
	n, addr, err := c.PacketConn.ReadFrom(b)
	if err == nil && stun.IsMessage(b[:n]) {
		m := &stun.Message{Raw: append([]byte(nil), b[:n]...)}
		if m.Decode() == nil && m.Type == stun.BindingRequest {
			c.n.Add(1)
		}
	}
	return n, addr, err
}

func TestAllocationKeepAlive(t *testing.T) {
	var counter *countBindings
	env := startTURN(t, true, func(pc net.PacketConn) net.PacketConn {
		counter = &countBindings{PacketConn: pc}
		return counter
	})
	a, err := relay.Allocate(relay.AllocateConfig{
		Conn: listenUDP(t), Server: env.addr, Secret: testSecret, Node: "client",
		KeepAlive: 50 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	eventually(t, 5*time.Second, "keep-alive binding requests", func() bool { return counter.n.Load() >= 3 })
}

// meshViaTURN starts a TURN server (its socket wrapped by wrap when not nil)
// that relays for loopback peers, allocates on it with the circle secret and
// opens a mesh named name whose only socket is that allocation ("relay1").
func meshViaTURN(t *testing.T, name string, wrap func(net.PacketConn) net.PacketConn) (*turnEnv, *relay.Allocation, *relay.Mesh) {
	t.Helper()
	env := startTURN(t, true, wrap)
	env.setPeers(netip.MustParseAddr("127.0.0.1"))
	alloc, err := allocate(t, env.addr, testSecret)
	if err != nil {
		t.Fatal(err)
	}
	m, err := relay.NewMesh(relay.MeshConfig{Name: name, Secret: testSecret, Conn: alloc.PacketConn(), Via: "relay1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return env, alloc, m
}
