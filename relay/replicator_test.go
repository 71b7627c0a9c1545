package relay_test

import (
	"bytes"
	"net"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// TestReplicatorOverRelayedMesh runs two replicator nodes whose only link
// is a mesh path through a TURN relay: gossip, acknowledged writes (the
// replicator's own 0xC7 streams) and reads all cross the relay.
func TestReplicatorOverRelayedMesh(t *testing.T) {
	_, _, carol := meshViaTURN(t, "carol", nil)
	alice := newMesh(t, "alice", testSecret)

	open := func(m *relay.Mesh, join []string) *replicator.Node {
		tr, err := m.Transport()
		if err != nil {
			t.Fatal(err)
		}
		cfg := replicator.DefaultConfig()
		cfg.Name = m.Name()
		cfg.DataDir = t.TempDir()
		cfg.Secret = testSecret
		cfg.Transport = tr
		cfg.Join = join
		n, err := replicator.Open(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		return n
	}
	na := open(alice, nil)
	nc := open(carol, []string{alice.Addr().String()})
	eventually(t, 15*time.Second, "two members on both", func() bool {
		return len(na.Members()) == 2 && len(nc.Members()) == 2
	})
	val := bytes.Repeat([]byte("v"), 100000) // too big for a broadcast: goes on a stream
	if err := nc.Put(ctxT(t, 10*time.Second), "files", "k", val); err != nil {
		t.Fatal(err)
	}
	r, err := na.Get("files", "k")
	if err != nil || !bytes.Equal(r.Value, val) {
		t.Fatalf("alice reads %d bytes, %v", len(r.Value), err)
	}
	if p := alice.Paths(); len(p) != 1 || p[0].Kind != relay.PathRelayed {
		t.Fatalf("alice's paths %+v", p)
	}
}

// TestMeshOverTURNSurvivesRefresh keeps one QUIC connection over a TURN
// allocation whose lifetime is 2 s on the wire through several refreshes.
func TestMeshOverTURNSurvivesRefresh(t *testing.T) {
	var shim *shortLifetime
	_, _, carol := meshViaTURN(t, "carol", func(pc net.PacketConn) net.PacketConn {
		shim = &shortLifetime{PacketConn: pc}
		return shim
	})
	alice := newMesh(t, "alice", testSecret)
	serveEcho(t, alice, "echo")
	if err := carol.Connect(ctxT(t, 5*time.Second), "alice", alice.Addr()); err != nil {
		t.Fatal(err)
	}
	echoOnce(t, carol, "alice", "echo", []byte("before"))
	since := carol.Paths()[0].Since
	eventually(t, 10*time.Second, "three allocation refreshes", func() bool { return shim.refreshes.Load() >= 3 })
	echoOnce(t, carol, "alice", "echo", []byte("after"))
	if p := carol.Paths(); len(p) != 1 || !p[0].Since.Equal(since) {
		t.Fatalf("the connection was replaced: %+v", p)
	}
}
