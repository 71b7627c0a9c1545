package relay_test

import (
	"net"
	"sync"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
)

// rebinding is a socket whose source port can change under it, like a
// home router that drops its NAT mapping and picks a new public port.
type rebinding struct {
	mu  sync.Mutex // guards cur
	cur net.PacketConn
}

func (r *rebinding) current() net.PacketConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cur
}

func (r *rebinding) rebind(t *testing.T) {
	nc := listenUDP(t)
	r.mu.Lock()
	old := r.cur
	r.cur = nc
	r.mu.Unlock()
	old.Close()
}

func (r *rebinding) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		c := r.current()
		n, addr, err := c.ReadFrom(p)
		if err != nil && c != r.current() {
			continue // rebound meanwhile: read the new socket
		}
		return n, addr, err
	}
}

func (r *rebinding) WriteTo(p []byte, addr net.Addr) (int, error) {
	return r.current().WriteTo(p, addr)
}
func (r *rebinding) Close() error                       { return r.current().Close() }
func (r *rebinding) LocalAddr() net.Addr                { return r.current().LocalAddr() }
func (r *rebinding) SetDeadline(t time.Time) error      { return r.current().SetDeadline(t) }
func (r *rebinding) SetReadDeadline(t time.Time) error  { return r.current().SetReadDeadline(t) }
func (r *rebinding) SetWriteDeadline(t time.Time) error { return r.current().SetWriteDeadline(t) }

// TestMeshSurvivesNATRebinding: bob's public port changes mid-run; the QUIC
// connection migrates to the new address (no reconnect).
func TestMeshSurvivesNATRebinding(t *testing.T) {
	alice := newMesh(t, "alice", testSecret)
	serveEcho(t, alice, "echo")
	sock := &rebinding{cur: listenUDP(t)}
	bob, err := relay.NewMesh(relay.MeshConfig{
		Name: "bob", Secret: testSecret, Conn: sock, KeepAlive: 200 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bob.Close() })
	if err := bob.Connect(ctxT(t, 5*time.Second), "alice", alice.Addr()); err != nil {
		t.Fatal(err)
	}
	echoOnce(t, bob, "alice", "echo", []byte("before"))
	since := bob.Paths()[0].Since
	sock.rebind(t)
	newAddr := sock.LocalAddr().String()
	echoOnce(t, bob, "alice", "echo", []byte("after"))
	eventually(t, 10*time.Second, "alice to follow bob to his new port", func() bool {
		p := alice.Paths()
		return len(p) == 1 && p[0].Remote == newAddr
	})
	if p := bob.Paths(); len(p) != 1 || !p[0].Since.Equal(since) {
		t.Fatalf("bob's connection was replaced: %+v", p)
	}
}
