package relay_test

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/homecircle/circle/integration/netlab"
	"github.com/homecircle/circle/relay"
	"go.uber.org/goleak"
)

// fullMeshWithin bounds how long the base topology may take to settle.
const fullMeshWithin = 30 * time.Second

// checkNAT waits (briefly: a measurement whose observation failed is
// redone a second later) for the NAT kinds.
func checkNAT(t *testing.T, c *circle, kinds map[string]relay.NATKind) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for name, k := range kinds {
		n := c.node(name)
		for {
			st := n.mgr.Status()
			if st.NAT == k {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: NAT %s, want %s (public %s)", name, st.NAT, k, st.Public)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// TestManagerNATLab: the topology. a and b (cone NATs) punch a
// path to each other, c (symmetric NAT) is relayed through r to both,
// everyone reaches r directly; streams work over every path.
func TestManagerNATLab(t *testing.T) {
	c, inet := newCircle(t)
	start := time.Now()
	hosts := baseTopology(c, inet, nil, nil)
	took := c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	t.Logf("full mesh %v after the managers started (%v with the lab)", took, time.Since(start))
	checkNAT(t, c, map[string]relay.NATKind{"r": relay.NATNone, "a": relay.NATCone, "b": relay.NATCone, "c": relay.NATSymmetric})
	st := c.nodes["c"].mgr.Status()
	if len(st.Allocations) != 1 || st.Allocations[0].Relay != "r" || st.Relays["r"] != "198.18.0.10:3478" {
		t.Errorf("c: relays %v, allocations %+v", st.Relays, st.Allocations)
	}
	for _, name := range []string{"a", "b", "r"} {
		if al := c.nodes[name].mgr.Status().Allocations; len(al) != 0 {
			t.Errorf("%s holds allocations: %+v", name, al)
		}
	}
	if pub := c.nodes["a"].mgr.Status().Public; pub != "198.18.0.20:7000" {
		t.Errorf("a's public address %q", pub)
	}
	c.echoAll(basePaths("r"))

	// r's TURN server relays to exactly the circle's public addresses.
	ips := map[netip.Addr]bool{}
	for _, ip := range c.nodes["r"].mgr.PeerIPs() {
		ips[ip] = true
	}
	for _, h := range []string{"homeA", "homeB", "homeC"} {
		if !ips[hosts[h].Addr] {
			t.Errorf("r's PeerIPs %v lack %s", ips, hosts[h].Addr)
		}
	}
	// Status reports every member, best path first.
	for _, ps := range c.nodes["a"].mgr.Status().Peers {
		if !ps.Connected || len(ps.Paths) == 0 {
			t.Errorf("a: %+v", ps)
		}
	}
}

// TestManagerRelayFailover: c holds allocations on two relays; when the
// one carrying its paths goes away, its paths to a and b come back
// through the other.
func TestManagerRelayFailover(t *testing.T) {
	c, inet := newCircle(t)
	baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))

	r2 := c.lab.Host(inet, "r2", "198.18.0.11")
	c.add("r2", r2, nodeOpts{relay: true})
	eventually(t, 20*time.Second, "c to hold allocations on r and r2", func() bool {
		return len(c.nodes["c"].mgr.Status().Allocations) == 2
	})
	c.waitPaths(10*time.Second, "everyone direct to r2", []want{
		{"a", "r2", relay.PathDirect, ""}, {"b", "r2", relay.PathDirect, ""}, {"c", "r2", relay.PathDirect, ""},
	})
	c.echoAll(basePaths("r"))

	start := time.Now()
	c.remove(c.nodes["r"])
	took := c.waitPaths(20*time.Second, "c relayed via r2", []want{
		{"c", "a", relay.PathRelayed, "r2"},
		{"c", "b", relay.PathRelayed, "r2"},
		{"a", "b", relay.PathPunched, ""},
	})
	t.Logf("failover to r2 took %v", took)
	c.echoAll([]want{{"c", "a", relay.PathRelayed, "r2"}, {"c", "b", relay.PathRelayed, "r2"}})
	eventually(t, 10*time.Second, "c to release its allocation on r", func() bool {
		st := c.nodes["c"].mgr.Status()
		return len(st.Allocations) == 1 && st.Allocations[0].Relay == "r2"
	})
	t.Logf("failover complete (streams checked, allocation released) after %v", time.Since(start))
}

// TestManagerRelayKilled: like TestManagerRelayFailover, but r vanishes
// without a word (all its traffic dropped, as if killed): c notices that
// r's STUN server stopped answering and moves its paths to r2 well before
// the dead connections time out.
func TestManagerRelayKilled(t *testing.T) {
	c, inet := newCircle(t)
	hosts := baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	r2 := c.lab.Host(inet, "r2", "198.18.0.11")
	c.add("r2", r2, nodeOpts{relay: true})
	eventually(t, 20*time.Second, "c to hold allocations on r and r2", func() bool {
		return len(c.nodes["c"].mgr.Status().Allocations) == 2
	})

	for _, other := range []*netlab.Node{hosts["homeA"], hosts["homeB"], hosts["homeC"], r2} {
		c.lab.Partition(hosts["r"], other)
	}
	took := c.waitPaths(relay.DefaultIdleTimeout, "c relayed via r2", []want{
		{"c", "a", relay.PathRelayed, "r2"},
		{"c", "b", relay.PathRelayed, "r2"},
		{"a", "b", relay.PathPunched, ""},
	})
	t.Logf("failover to r2 took %v (the mesh idle timeout is %v)", took, relay.DefaultIdleTimeout)
	c.echoAll([]want{{"c", "a", relay.PathRelayed, "r2"}, {"c", "b", relay.PathRelayed, "r2"}})
}

// TestManagerRelayReturns: r goes away and comes back (a new process on
// the same address) before the membership layer knows it is alive again:
// the NATed nodes, which r cannot dial, reconnect to it on their own and
// c relays through it again.
func TestManagerRelayReturns(t *testing.T) {
	c, inet := newCircle(t)
	hosts := baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	c.remove(c.nodes["r"])
	eventually(t, 10*time.Second, "c to release its allocation on r", func() bool {
		return len(c.nodes["c"].mgr.Status().Allocations) == 0
	})
	time.Sleep(2 * time.Second) // the others' direct attempts to r fail meanwhile

	start := time.Now()
	c.add("r", hosts["r"], nodeOpts{relay: true, hidden: true})
	took := c.waitPaths(45*time.Second, "back to the base paths", basePaths("r"))
	t.Logf("base paths again %v after r returned (%v since start)", took, time.Since(start))
	c.echoAll(basePaths("r"))
	for _, name := range []string{"a", "b"} {
		if al := c.nodes[name].mgr.Status().Allocations; len(al) != 0 {
			t.Errorf("%s holds allocations: %+v", name, al)
		}
	}
}

// TestManagerRelayRestarts: r dies without a word (like SIGKILL: no
// close reaches anybody) and a new run of it (new TURN server, new mesh
// incarnation) connects to c before c's path to the old run timed out.
// c's allocation died with the old run: c notices the new incarnation,
// drops the allocation, allocates anew and is relayed again within 10 s.
func TestManagerRelayRestarts(t *testing.T) {
	c, inet := newCircle(t)
	hosts := baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	cn := c.nodes["c"]
	old := c.nodes["r"]
	toC, ok := old.best("c")
	if !ok {
		t.Fatal("r has no path to c")
	}
	homes := []string{"homeA", "homeB", "homeC"}
	for _, h := range homes {
		c.lab.Partition(hosts["r"], hosts[h])
	}
	c.remove(old)
	for _, h := range homes {
		c.lab.Heal(hosts["r"], hosts[h])
	}

	start := time.Now()
	r := c.add("r", hosts["r"], nodeOpts{relay: true})
	// The new run reaches c through the mapping c's symmetric router keeps
	// for c's (not yet timed out) path to the old run.
	addr, err := net.ResolveUDPAddr("udp4", toC.Remote)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.mesh.Connect(ctx, "c", addr); err != nil {
		t.Fatalf("new r to c: %v", err)
	}
	eventually(t, 3*time.Second, "c to replace its allocation on r", func() bool {
		st := cn.mgr.Status()
		return len(st.Allocations) == 1 && st.Allocations[0].Since.After(start)
	})
	t.Logf("c allocated on r's new run %v after it started", time.Since(start))
}

// TestManagerRelayBackSoon: r dies without a word and returns (new TURN
// server, new mesh) before anybody's path to it timed out. Nobody gets a
// word from the new run (it cannot dial nodes behind NAT); c notices that
// r's STUN server answers again while its path to r does not, redials,
// and is relayed again within 12 s.
func TestManagerRelayBackSoon(t *testing.T) {
	c, inet := newCircle(t)
	hosts := baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	homes := []string{"homeA", "homeB", "homeC"}
	for _, h := range homes {
		c.lab.Partition(hosts["r"], hosts[h])
	}
	c.remove(c.nodes["r"])
	// c checks r's STUN server every 5 s; paths time out after 20 s.
	time.Sleep(8 * time.Second)
	for _, h := range homes {
		c.lab.Heal(hosts["r"], hosts[h])
	}
	c.add("r", hosts["r"], nodeOpts{relay: true})
	relayed := []want{
		{"c", "a", relay.PathRelayed, "r"},
		{"c", "b", relay.PathRelayed, "r"},
	}
	// (c's old relayed paths look alive until they time out: echo.)
	start := time.Now()
	cn := c.nodes["c"]
	eventually(t, 12*time.Second, "c relayed through r's new run", func() bool {
		for _, peer := range []string{"a", "b"} {
			if tryEcho(cn.mesh, peer, []byte("back soon")) != nil ||
				tryEcho(c.nodes[peer].mesh, "c", []byte("back soon")) != nil {
				return false
			}
		}
		return c.check(relayed) == ""
	})
	t.Logf("c relayed again %v after r's restart", time.Since(start))
}

// TestManagerRelayDownLong: r dies without a word and stays away until
// everybody's path to it timed out (their direct attempts back off
// meanwhile, to relayRedial at most); nodes behind NAT redial it soon
// after it returns, and c is relayed again within 12 s.
func TestManagerRelayDownLong(t *testing.T) {
	c, inet := newCircle(t)
	hosts := baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	homes := []string{"homeA", "homeB", "homeC"}
	for _, h := range homes {
		c.lab.Partition(hosts["r"], hosts[h])
	}
	c.remove(c.nodes["r"])
	eventually(t, 40*time.Second, "nobody to have a path to r", func() bool {
		for _, n := range []string{"a", "b", "c"} {
			if _, ok := c.nodes[n].best("r"); ok {
				return false
			}
		}
		return true
	})
	time.Sleep(20 * time.Second) // direct attempts to r back off
	for _, h := range homes {
		c.lab.Heal(hosts["r"], hosts[h])
	}
	c.add("r", hosts["r"], nodeOpts{relay: true})
	// (b or a may reach r punched rather than direct for a while.)
	relayed := []want{
		{"c", "a", relay.PathRelayed, "r"},
		{"c", "b", relay.PathRelayed, "r"},
	}
	took := c.waitPaths(12*time.Second, "c relayed through r's new run", relayed)
	t.Logf("c relayed again %v after r's restart", took)
	c.echoAll(relayed)
}

// TestManagerPortChange: a's home router forgets its mappings and hands
// out new public ports; a is reconnected to b (punched again) and c
// within 30 s.
func TestManagerPortChange(t *testing.T) {
	c, inet := newCircle(t)
	hosts := baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	a := c.nodes["a"]
	before := a.mgr.Status().Public

	start := time.Now()
	hosts["homeA"].ChangeMapping()
	var after string
	eventually(t, 30*time.Second, "a reconnected to b and c at its new public address", func() bool {
		after = a.mgr.Status().Public
		if after == before || after == "" {
			return false
		}
		if c.check(basePaths("r")) != "" {
			return false
		}
		// b's punched path to a goes to a's new address.
		p, _ := c.nodes["b"].best("a")
		if p.Remote != after {
			return false
		}
		for _, peer := range []string{"b", "c"} {
			if tryEcho(a.mesh, peer, []byte("after the port change")) != nil ||
				tryEcho(c.nodes[peer].mesh, "a", []byte("after the port change")) != nil {
				return false
			}
		}
		return true
	})
	t.Logf("a's public address %s -> %s; reconnected after %v", before, after, time.Since(start))
}

// TestManagerSymmetricPortChange: c's symmetric router forgets its
// mappings: c's allocation is lost with them (TURN knows it by c's
// address); c notices its public address changed, allocates again and
// moves its relayed paths to a and b within 30 s.
func TestManagerSymmetricPortChange(t *testing.T) {
	c, inet := newCircle(t)
	hosts := baseTopology(c, inet, nil, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	cn := c.nodes["c"]
	before := cn.mgr.Status()

	start := time.Now()
	hosts["homeC"].ChangeMapping()
	eventually(t, 30*time.Second, "c relayed again through a new allocation", func() bool {
		st := cn.mgr.Status()
		if st.Public == before.Public || len(st.Allocations) != 1 ||
			st.Allocations[0].RelayAddr == before.Allocations[0].RelayAddr {
			return false
		}
		if c.check(basePaths("r")) != "" {
			return false
		}
		for _, peer := range []string{"a", "b"} {
			if tryEcho(cn.mesh, peer, []byte("after the port change")) != nil ||
				tryEcho(c.nodes[peer].mesh, "c", []byte("after the port change")) != nil {
				return false
			}
		}
		return true
	})
	t.Logf("c's public address %s -> %s; relayed again after %v", before.Public, cn.mgr.Status().Public, time.Since(start))
}

// TestManagerCredentialRenewal: with 8 s credentials c replaces its
// allocation every 6 s; its relayed paths survive, streams keep working.
func TestManagerCredentialRenewal(t *testing.T) {
	c, inet := newCircle(t)
	ttl := 8 * time.Second
	baseTopology(c, inet, map[string]nodeOpts{"c": {ttl: ttl}}, nil)
	c.waitPaths(fullMeshWithin, "full mesh", basePaths("r"))
	cn := c.nodes["c"]
	first := cn.mgr.Status().Allocations[0]
	seen := map[string]bool{first.RelayAddr: true}
	deadline := time.Now().Add(3 * ttl)
	for len(seen) < 3 {
		if time.Now().After(deadline) {
			c.dump()
			t.Fatalf("only %d allocations in %v", len(seen), 3*ttl)
		}
		for _, peer := range []string{"a", "b"} {
			// One retry: a stream may start on the old allocation's
			// connection just as it is released.
			if err := tryEcho(cn.mesh, peer, []byte("renewal")); err != nil {
				if err := tryEcho(cn.mesh, peer, []byte("renewal")); err != nil {
					c.dump()
					t.Fatalf("c -> %s during renewal: %v", peer, err)
				}
			}
		}
		for _, al := range cn.mgr.Status().Allocations {
			seen[al.RelayAddr] = true
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.waitPaths(10*time.Second, "relayed paths after renewals", basePaths("r"))
	c.echoAll([]want{{"c", "a", relay.PathRelayed, "r"}, {"c", "b", relay.PathRelayed, "r"}})
	st := cn.mgr.Status()
	if len(st.Allocations) != 1 || st.Allocations[0].Since.Equal(first.Since) {
		t.Fatalf("allocations %+v", st.Allocations)
	}
}

// TestManagerPunchFallbackAndUpgrade: a and b cannot punch (their homes
// cannot reach each other, though both reach r), so after failed punches
// they relay through r; once the homes can reach each other they keep
// punching until the pair upgrades to a punched path.
func TestManagerPunchFallbackAndUpgrade(t *testing.T) {
	c, inet := newCircle(t)
	var hosts map[string]*netlab.Node
	baseTopology(c, inet, nil, func(h map[string]*netlab.Node) {
		hosts = h
		c.lab.Partition(h["homeA"], h["homeB"])
	})
	paths := basePaths("r")
	paths[3] = want{"a", "b", relay.PathRelayed, "r"}
	took := c.waitPaths(45*time.Second, "a and b relayed", paths)
	t.Logf("a and b relayed through r %v after the start", took)
	c.echoAll(paths[3:4])

	c.lab.Heal(hosts["homeA"], hosts["homeB"])
	took = c.waitPaths(45*time.Second, "a and b punched", basePaths("r"))
	t.Logf("a and b upgraded to a punched path %v after the heal", took)
	c.echoAll(basePaths("r")[3:4])
}

// TestManagerBothSymmetric: c and d, each behind a symmetric NAT, get a
// relayed path (the TURN permission is per IP, so d's fresh port towards
// the relay does not matter).
func TestManagerBothSymmetric(t *testing.T) {
	c, inet := newCircle(t)
	c.add("r", c.lab.Host(inet, "r", "198.18.0.10"), nodeOpts{relay: true})
	homeC := c.lab.Router(inet, "homeC", "198.18.0.40", "100.64.3.0/24", netlab.Symmetric)
	homeD := c.lab.Router(inet, "homeD", "198.18.0.50", "100.64.4.0/24", netlab.Symmetric)
	c.add("c", c.lab.Host(homeC, "c", "100.64.3.2"), nodeOpts{})
	c.add("d", c.lab.Host(homeD, "d", "100.64.4.2"), nodeOpts{})
	paths := []want{
		{"c", "r", relay.PathDirect, ""},
		{"d", "r", relay.PathDirect, ""},
		{"c", "d", relay.PathRelayed, "r"},
	}
	took := c.waitPaths(fullMeshWithin, "c and d relayed", paths)
	t.Logf("c and d relayed %v after the start", took)
	checkNAT(t, c, map[string]relay.NATKind{"c": relay.NATSymmetric, "d": relay.NATSymmetric})
	c.echoAll(paths)
}

// TestManagerLoopback: two nodes on loopback, one a relay: direct path,
// NAT none on both, Close is idempotent and leaves no goroutines.
func TestManagerLoopback(t *testing.T) {
	opts := goleak.IgnoreCurrent()
	func() {
		turnPC := listenUDP(t)
		rMesh, err := relay.NewMesh(relay.MeshConfig{Name: "r", Secret: testSecret, Conn: listenUDP(t), TURN: turnPC.LocalAddr().String()})
		if err != nil {
			t.Fatal(err)
		}
		aMesh, err := relay.NewMesh(relay.MeshConfig{Name: "a", Secret: testSecret, Conn: listenUDP(t)})
		if err != nil {
			t.Fatal(err)
		}
		rMgr, err := relay.NewManager(relay.ManagerConfig{Mesh: rMesh, Secret: testSecret, Interval: 100 * time.Millisecond,
			Members: func() []relay.Member { return []relay.Member{{Name: "a", Addr: aMesh.Addr().String()}} }})
		if err != nil {
			t.Fatal(err)
		}
		srv, err := relay.NewServer(relay.ServerConfig{Secret: testSecret, PacketConn: turnPC, RelayAddress: net.IPv4(127, 0, 0, 1), Peers: rMgr.PeerIPs})
		if err != nil {
			t.Fatal(err)
		}
		aMgr, err := relay.NewManager(relay.ManagerConfig{Mesh: aMesh, Secret: testSecret, Interval: 100 * time.Millisecond,
			Members: func() []relay.Member { return []relay.Member{{Name: "r", Addr: rMesh.Addr().String()}} }})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "direct path and NAT none", func() bool {
			p, ok := bestOf(aMgr, "r")
			st := aMgr.Status()
			return ok && p.Kind == relay.PathDirect && st.NAT == relay.NATNone && st.Public == aMesh.Addr().String() &&
				st.Relays["r"] == turnPC.LocalAddr().String() && rMgr.Status().NAT == relay.NATNone
		})
		if ips := rMgr.PeerIPs(); len(ips) != 1 || ips[0] != netip.MustParseAddr("127.0.0.1") {
			t.Errorf("r's PeerIPs %v", ips)
		}
		for _, m := range []*relay.Manager{aMgr, rMgr} {
			m.Close()
			m.Close()
		}
		srv.Close()
		aMesh.Close()
		rMesh.Close()
	}()
	goleak.VerifyNone(t, opts)
}

func bestOf(m *relay.Manager, peer string) (relay.PathInfo, bool) {
	for _, ps := range m.Status().Peers {
		if ps.Name == peer {
			return ps.Path, ps.Connected
		}
	}
	return relay.PathInfo{}, false
}
