package replicator

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// faultNet is an in-process network of loopback transports that tests can
// partition: a cut between two nodes drops their packets and refuses their
// dials in both directions (at the sender), and closes the streams already
// open between them. Nodes are registered by name when their transport is
// made (node) and known by address once they listen (learn).
type faultNet struct {
	mu     sync.Mutex                      // guards the following
	nameOf map[string]string               // address -> node name
	cut    map[[2]string]bool              // ordered pairs of names that cannot talk
	conns  map[[2]string]map[net.Conn]bool // open dialed streams by (from, to)
}

func newFaultNet() *faultNet {
	return &faultNet{nameOf: map[string]string{}, cut: map[[2]string]bool{}, conns: map[[2]string]map[net.Conn]bool{}}
}

// config returns testConfig for name with a transport of this network.
func (f *faultNet) config(t testing.TB, dir, name string) Config {
	t.Helper()
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, dir, name)
	cfg.Transport = &faultTransport{NetTransport: nt, net: f, self: name}
	f.mu.Lock()
	f.nameOf[fmt.Sprintf("127.0.0.1:%d", nt.GetAutoBindPort())] = name
	f.mu.Unlock()
	return cfg
}

// Cut partitions every node of a from every node of b.
func (f *faultNet) Cut(a, b []string) {
	f.mu.Lock()
	var doomed []net.Conn
	for _, x := range a {
		for _, y := range b {
			for _, p := range [][2]string{{x, y}, {y, x}} {
				f.cut[p] = true
				for c := range f.conns[p] {
					doomed = append(doomed, c)
				}
				delete(f.conns, p)
			}
		}
	}
	f.mu.Unlock()
	for _, c := range doomed {
		c.Close()
	}
}

// Heal removes every cut.
func (f *faultNet) Heal() {
	f.mu.Lock()
	f.cut = map[[2]string]bool{}
	f.mu.Unlock()
}

// Isolate cuts name from every other registered node.
func (f *faultNet) Isolate(name string) {
	f.mu.Lock()
	var others []string
	for _, n := range f.nameOf {
		if n != name {
			others = append(others, n)
		}
	}
	f.mu.Unlock()
	f.Cut([]string{name}, others)
}

var errCut = errors.New("faultnet: partitioned")

// blocked reports whether from cannot reach the node at addr.
func (f *faultNet) blocked(from, addr string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	to := f.nameOf[addr]
	return to, f.cut[[2]string{from, to}]
}

// faultTransport is one node's transport on a faultNet.
type faultTransport struct {
	*memberlist.NetTransport
	net  *faultNet
	self string
}

func (t *faultTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if _, cut := t.net.blocked(t.self, addr); cut {
		return time.Now(), nil // lost on the way, as UDP is
	}
	return t.NetTransport.WriteTo(b, addr)
}

func (t *faultTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	return t.WriteTo(b, a.Addr)
}

func (t *faultTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	to, cut := t.net.blocked(t.self, addr)
	if cut {
		return nil, fmt.Errorf("dialing %s: %w", addr, errCut)
	}
	c, err := t.NetTransport.DialTimeout(addr, timeout)
	if err != nil {
		return nil, err
	}
	key := [2]string{t.self, to}
	t.net.mu.Lock()
	if t.net.cut[key] { // cut while dialing
		t.net.mu.Unlock()
		c.Close()
		return nil, fmt.Errorf("dialing %s: %w", addr, errCut)
	}
	if t.net.conns[key] == nil {
		t.net.conns[key] = map[net.Conn]bool{}
	}
	t.net.conns[key][c] = true
	t.net.mu.Unlock()
	return c, nil
}

func (t *faultTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(a.Addr, timeout)
}

var _ memberlist.NodeAwareTransport = (*faultTransport)(nil)

// TestFaultNet: a cut stops replication both ways and a heal lets it
// resume (the harness itself works).
func TestFaultNet(t *testing.T) {
	f := newFaultNet()
	dir := t.TempDir()
	a := open(t, f.config(t, dir, "a"))
	cfg := f.config(t, dir, "b")
	cfg.Join = []string{a.Addr()}
	b := open(t, cfg)
	waitConverged(t, a, b)
	f.Cut([]string{"a"}, []string{"b"})
	waitFor(t, 15*time.Second, "a and b see each other dead", func() bool {
		return aliveCount(a) == 1 && aliveCount(b) == 1
	})
	if err := a.Put(ctxT(t), "x", "k", []byte("during")); err != nil {
		t.Fatal(err)
	}
	holdsFor(t, time.Second, "b does not get a's write", func() bool { return absent(b, "x", "k") })
	f.Heal()
	if _, err := b.ml.Load().Join([]string{a.Addr()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "b gets a's write after the heal", func() bool { return valueIs(b, "x", "k", "during") })
}
