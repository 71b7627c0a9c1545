package relay_test

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
	"go.uber.org/goleak"
)

// TestCloseLeavesNoGoroutines builds a TURN server, an allocation, a
// direct and a relayed mesh with memberlist on top and a few streams,
// closes everything and checks that no goroutine survives.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	opts := goleak.IgnoreCurrent()
	func() {
		pc := listenUDP(t)
		srv, err := relay.NewServer(relay.ServerConfig{
			Secret: testSecret, PacketConn: pc, RelayAddress: net.IPv4(127, 0, 0, 1),
			Peers: func() []netip.Addr { return []netip.Addr{netip.MustParseAddr("127.0.0.1")} },
		})
		if err != nil {
			t.Fatal(err)
		}
		srv.AllowLoopback()
		alloc, err := relay.Allocate(relay.AllocateConfig{
			Conn: listenUDP(t), Server: pc.LocalAddr().String(), Secret: testSecret, Node: "carol",
		})
		if err != nil {
			t.Fatal(err)
		}
		alice, err := relay.NewMesh(relay.MeshConfig{Name: "alice", Secret: testSecret, Conn: listenUDP(t)})
		if err != nil {
			t.Fatal(err)
		}
		carol, err := relay.NewMesh(relay.MeshConfig{Name: "carol", Secret: testSecret, Conn: alloc.PacketConn(), Via: "r"})
		if err != nil {
			t.Fatal(err)
		}
		l, err := alice.Listen("hold")
		if err != nil {
			t.Fatal(err)
		}
		if err := carol.Connect(ctxT(t, 5*time.Second), "alice", alice.Addr()); err != nil {
			t.Fatal(err)
		}
		// A stream left open on both sides, and one waiting in Accept.
		c, err := carol.Dial(ctxT(t, 5*time.Second), "alice", "hold")
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("x"))
		if _, err := l.Accept(); err != nil {
			t.Fatal(err)
		}
		c2, _ := carol.Dial(ctxT(t, 5*time.Second), "alice", "hold")
		if c2 != nil {
			c2.Write([]byte("y"))
		}
		mlA, mlC := newMember(t, alice), newMember(t, carol)
		join(t, mlC, alice)
		eventually(t, 10*time.Second, "two members", func() bool { return mlA.NumMembers() == 2 })

		mlA.Shutdown()
		mlC.Shutdown()
		carol.Close()
		alice.Close()
		alloc.Close()
		srv.Close()
	}()
	goleak.VerifyNone(t, opts)
}
