package relay_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/homecircle/circle/integration/netlab"
	"github.com/homecircle/circle/relay"
)

// A circle of nodes with Managers in a netlab topology (namespaces): every
// node's Members are the other live nodes, with their advertised (LAN)
// addresses, as memberlist would report them.

const (
	meshPort = 7000
	turnPort = 3478
)

type circleNode struct {
	name string
	host *netlab.Node
	addr string // advertised mesh address
	mesh *relay.Mesh
	mgr  *relay.Manager
	srv  *relay.Server // relays only

	stopOnce sync.Once
}

type circle struct {
	t   *testing.T
	lab *netlab.Lab
	log *slog.Logger

	mu     sync.Mutex
	nodes  map[string]*circleNode // live members
	hidden map[string]*circleNode // live, but not members
}

// testLog is a slog handler writer into t.Log that goes quiet once the
// test is over (pion may log from goroutines that are just stopping).
type testLog struct {
	t    *testing.T
	done atomic.Bool
}

func (w *testLog) Write(p []byte) (int, error) {
	if !w.done.Load() {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// newCircle builds an empty lab with an internet 198.18.0.0/24 and marks
// the test parallel. Logs go to t.Log at Info level (Debug with
// RELAY_DEBUG=1).
func newCircle(t *testing.T) (*circle, *netlab.Node) {
	t.Helper()
	// Labs are independent (own namespaces); the tests mostly wait.
	t.Parallel()
	w := &testLog{t: t}
	t.Cleanup(func() { w.done.Store(true) }) // runs last
	lab := netlab.New(t)                     // safe to call concurrently
	level := slog.LevelInfo
	if os.Getenv("RELAY_DEBUG") != "" {
		level = slog.LevelDebug
	}
	c := &circle{
		t: t, lab: lab, nodes: map[string]*circleNode{}, hidden: map[string]*circleNode{},
		log: slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})),
	}
	return c, lab.Internet("198.18.0.0/24")
}

// listenIn returns a ListenPacket that opens sockets inside host's
// namespace.
func listenIn(t *testing.T, host *netlab.Node) func(network, addr string) (net.PacketConn, error) {
	return func(network, addr string) (net.PacketConn, error) {
		var pc net.PacketConn
		var err error
		host.Run(t, func() { pc, err = net.ListenPacket(network, addr) })
		return pc, err
	}
}

func (c *circle) members(self string) func() []relay.Member {
	return func() []relay.Member {
		c.mu.Lock()
		defer c.mu.Unlock()
		var out []relay.Member
		for name, n := range c.nodes {
			if name != self {
				out = append(out, relay.Member{Name: name, Addr: n.addr})
			}
		}
		return out
	}
}

type nodeOpts struct {
	relay  bool          // run a TURN server (and advertise it in hellos)
	ttl    time.Duration // ManagerConfig.CredentialTTL
	hidden bool          // not in the others' members (memberlist does not know it yet)
}

// add starts node name on host: mesh on port 7000, Manager, and for a
// relay a TURN server on port 3478 whose peers are the Manager's PeerIPs.
func (c *circle) add(name string, host *netlab.Node, o nodeOpts) *circleNode {
	t := c.t
	t.Helper()
	ip := host.Addr.String()
	n := &circleNode{name: name, host: host, addr: net.JoinHostPort(ip, fmt.Sprint(meshPort))}
	conn := host.ListenPacket(t, "udp4", n.addr)
	mc := relay.MeshConfig{Name: name, Secret: testSecret, Conn: conn, Logger: c.log}
	if o.relay {
		mc.TURN = net.JoinHostPort(ip, fmt.Sprint(turnPort))
	}
	var err error
	if n.mesh, err = relay.NewMesh(mc); err != nil {
		t.Fatal(err)
	}
	listen := listenIn(t, host)
	n.mgr, err = relay.NewManager(relay.ManagerConfig{
		Mesh: n.mesh, Secret: testSecret, Members: c.members(name), Logger: c.log,
		CredentialTTL: o.ttl,
		ListenPacket:  func() (net.PacketConn, error) { return listen("udp4", net.JoinHostPort(ip, "0")) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if o.relay {
		pc := host.ListenPacket(t, "udp4", mc.TURN)
		n.srv, err = relay.NewServer(relay.ServerConfig{
			Secret: testSecret, PacketConn: pc, RelayAddress: net.IP(host.Addr.AsSlice()),
			Peers: n.mgr.PeerIPs, ListenPacket: listen, Logger: c.log,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	serveEchoOn(t, n.mesh)
	t.Cleanup(n.stop)
	c.mu.Lock()
	if o.hidden {
		c.hidden[name] = n
	} else {
		c.nodes[name] = n
	}
	c.mu.Unlock()
	return n
}

// node returns the live node name (member or hidden).
func (c *circle) node(name string) *circleNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := c.nodes[name]; n != nil {
		return n
	}
	return c.hidden[name]
}

// remove stops a node and takes it out of everyone's members.
func (c *circle) remove(n *circleNode) {
	c.mu.Lock()
	delete(c.nodes, n.name)
	c.mu.Unlock()
	n.stop()
}

func (n *circleNode) stop() {
	n.stopOnce.Do(func() {
		if n.srv != nil {
			n.srv.Close()
		}
		n.mgr.Close()
		n.mesh.Close()
	})
}

// serveEchoOn serves the "echo" service on m until the test ends.
func serveEchoOn(t *testing.T, m *relay.Mesh) {
	l, err := m.Listen("echo")
	if err != nil {
		t.Fatal(err)
	}
	wait := echoAll(l, 10*time.Second)
	t.Cleanup(func() { l.Close(); wait() })
}

// tryEcho sends msg over an "echo" stream from m to peer and checks the
// answer.
func tryEcho(m *relay.Mesh, peer string, msg []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := m.Dial(ctx, peer, "echo")
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return errors.New("echo differs")
	}
	return nil
}

// best returns n's best path to peer: the one its Manager's Status
// reports for a member, else the best of its mesh's paths (same order:
// direct, punched, relayed; newest first).
func (n *circleNode) best(peer string) (relay.PathInfo, bool) {
	for _, ps := range n.mgr.Status().Peers {
		if ps.Name == peer {
			return ps.Path, ps.Connected
		}
	}
	rank := map[relay.PathKind]int{relay.PathDirect: 0, relay.PathPunched: 1, relay.PathRelayed: 2}
	var best *relay.PathInfo
	paths := n.mesh.Paths()
	for i := range paths {
		p := &paths[i]
		if p.Peer == peer && (best == nil || rank[p.Kind] < rank[best.Kind] ||
			rank[p.Kind] == rank[best.Kind] && !p.Since.Before(best.Since)) {
			best = p
		}
	}
	if best == nil {
		return relay.PathInfo{}, false
	}
	return *best, true
}

// want is an expected best path between two nodes, checked at both ends.
type want struct {
	x, y string
	kind relay.PathKind
	via  string
}

// check reports what in ws does not hold yet ("" if everything does).
func (c *circle) check(ws []want) string {
	c.mu.Lock()
	nodes := maps.Clone(c.nodes)
	maps.Copy(nodes, c.hidden)
	c.mu.Unlock()
	var bad []string
	for _, w := range ws {
		for _, end := range [][2]string{{w.x, w.y}, {w.y, w.x}} {
			n := nodes[end[0]]
			if n == nil {
				bad = append(bad, end[0]+" gone")
				continue
			}
			p, ok := n.best(end[1])
			if !ok || p.Kind != w.kind || p.Via != w.via {
				bad = append(bad, fmt.Sprintf("%s->%s: %s/%s (want %s/%s)", end[0], end[1], p.Kind, p.Via, w.kind, w.via))
			}
		}
	}
	sort.Strings(bad)
	return strings.Join(bad, "; ")
}

// waitPaths waits up to d for ws to hold and returns how long it took.
func (c *circle) waitPaths(d time.Duration, what string, ws []want) time.Duration {
	c.t.Helper()
	start := time.Now()
	deadline := start.Add(d)
	for {
		bad := c.check(ws)
		if bad == "" {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			c.dump()
			c.t.Fatalf("%s: not after %v: %s", what, d, bad)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// dump logs every node's status.
func (c *circle) dump() {
	c.mu.Lock()
	nodes := maps.Clone(c.nodes)
	maps.Copy(nodes, c.hidden)
	c.mu.Unlock()
	for name, n := range nodes {
		st := n.mgr.Status()
		c.t.Logf("%s: nat=%s public=%s relays=%v allocations=%d", name, st.NAT, st.Public, st.Relays, len(st.Allocations))
		for _, p := range st.Peers {
			var paths []string
			for _, pi := range p.Paths {
				paths = append(paths, fmt.Sprintf("%s/%s@%s", pi.Kind, pi.Via, pi.Remote))
			}
			c.t.Logf("  %s -> %s: %v %v err=%q", name, p.Name, p.Connected, paths, p.LastError)
		}
	}
}

// echoAll checks a stream both ways between every pair in ws.
func (c *circle) echoAll(ws []want) {
	c.t.Helper()
	for _, w := range ws {
		for _, end := range [][2]string{{w.x, w.y}, {w.y, w.x}} {
			n := c.node(end[0])
			if err := tryEcho(n.mesh, end[1], []byte(fmt.Sprintf("%s to %s over %s", end[0], end[1], w.kind))); err != nil {
				c.t.Fatalf("echo %s -> %s: %v", end[0], end[1], err)
			}
		}
	}
}

// baseTopology is the topology: r reachable on the internet
// (a relay), a and b behind cone routers, c behind a symmetric router.
// It returns the lab nodes by name (routers as "homeA" etc.).
// before, if not nil, runs before the nodes start.
func baseTopology(c *circle, inet *netlab.Node, o map[string]nodeOpts, before func(map[string]*netlab.Node)) map[string]*netlab.Node {
	lab := c.lab
	hosts := map[string]*netlab.Node{}
	hosts["r"] = lab.Host(inet, "r", "198.18.0.10")
	hosts["homeA"] = lab.Router(inet, "homeA", "198.18.0.20", "100.64.1.0/24", netlab.Cone)
	hosts["homeB"] = lab.Router(inet, "homeB", "198.18.0.30", "100.64.2.0/24", netlab.Cone)
	hosts["homeC"] = lab.Router(inet, "homeC", "198.18.0.40", "100.64.3.0/24", netlab.Symmetric)
	hosts["a"] = lab.Host(hosts["homeA"], "a", "100.64.1.2")
	hosts["b"] = lab.Host(hosts["homeB"], "b", "100.64.2.2")
	hosts["c"] = lab.Host(hosts["homeC"], "c", "100.64.3.2")
	if before != nil {
		before(hosts)
	}
	ro := o["r"]
	ro.relay = true
	c.add("r", hosts["r"], ro)
	for _, name := range []string{"a", "b", "c"} {
		c.add(name, hosts[name], o[name])
	}
	return hosts
}

// basePaths are the paths the base topology must settle on.
func basePaths(relayName string) []want {
	return []want{
		{"a", "r", relay.PathDirect, ""},
		{"b", "r", relay.PathDirect, ""},
		{"c", "r", relay.PathDirect, ""},
		{"a", "b", relay.PathPunched, ""},
		{"c", "a", relay.PathRelayed, relayName},
		{"c", "b", relay.PathRelayed, relayName},
	}
}
