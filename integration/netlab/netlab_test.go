package netlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// topo is the acceptance topology of issue 4: R (plus a second internet host
// S) on the internet, A behind a cone NAT, B behind another cone NAT, C behind
// a symmetric NAT.
type topo struct {
	lab                  *Lab
	inet, r, s           *Node
	rtA, rtB, rtC        *Node
	a, b, c              *Node
	rStun, rStun2, sStun netip.AddrPort
}

func newTopo(t *testing.T) *topo {
	t.Helper()
	start := time.Now()
	lab := New(t)
	tp := &topo{lab: lab}
	tp.inet = lab.Internet("198.18.0.0/24")
	tp.r = lab.Host(tp.inet, "r", "198.18.0.10")
	tp.s = lab.Host(tp.inet, "s", "198.18.0.11")
	tp.rtA = lab.Router(tp.inet, "homeA", "198.18.0.20", "100.64.1.0/24", Cone)
	tp.rtB = lab.Router(tp.inet, "homeB", "198.18.0.21", "100.64.2.0/24", Cone)
	tp.rtC = lab.Router(tp.inet, "homeC", "198.18.0.30", "100.64.3.0/24", Symmetric)
	tp.a = lab.Host(tp.rtA, "a", "100.64.1.2")
	tp.b = lab.Host(tp.rtB, "b", "100.64.2.2")
	tp.c = lab.Host(tp.rtC, "c", "100.64.3.2")
	tp.rStun = stunServer(t, tp.r, 3478)
	tp.rStun2 = stunServer(t, tp.r, 3479)
	tp.sStun = stunServer(t, tp.s, 3478)
	t.Logf("topology built in %v", time.Since(start).Round(time.Millisecond))
	return tp
}

// stunServer is a STUN-like UDP echo: it answers every datagram with
// "<observed source addr:port> <payload>".
func stunServer(t *testing.T, n *Node, port int) netip.AddrPort {
	t.Helper()
	c := n.ListenPacket(t, "udp4", fmt.Sprintf("%s:%d", n.Addr, port))
	go func() {
		buf := make([]byte, 2048)
		for {
			k, from, err := c.ReadFrom(buf)
			if err != nil {
				return // closed at cleanup
			}
			c.WriteTo(append([]byte(from.String()+" "), buf[:k]...), from)
		}
	}()
	return netip.AddrPortFrom(n.Addr, uint16(port))
}

func udpAddr(ap netip.AddrPort) *net.UDPAddr { return net.UDPAddrFromAddrPort(ap) }

// mapped asks a STUN-like server which address c's packets come from
// (bounded: 10 tries of 200 ms). It returns false if no answer came.
func mapped(c net.PacketConn, server netip.AddrPort) (netip.AddrPort, bool) {
	return mappedN(c, server, 10)
}

func mappedN(c net.PacketConn, server netip.AddrPort, tries int) (netip.AddrPort, bool) {
	buf := make([]byte, 2048)
	for range tries {
		c.WriteTo([]byte("?"), udpAddr(server))
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		for range 10 {
			k, from, err := c.ReadFrom(buf)
			if err != nil {
				break
			}
			if from.String() != server.String() {
				continue
			}
			f := strings.Fields(string(buf[:k]))
			if len(f) == 0 {
				continue
			}
			ap, err := netip.ParseAddrPort(f[0])
			if err == nil {
				c.SetReadDeadline(time.Time{})
				return ap, true
			}
		}
	}
	c.SetReadDeadline(time.Time{})
	return netip.AddrPort{}, false
}

func mustMapped(t *testing.T, c net.PacketConn, server netip.AddrPort) netip.AddrPort {
	t.Helper()
	ap, ok := mapped(c, server)
	if !ok {
		t.Fatalf("no answer from %s to %s", server, c.LocalAddr())
	}
	return ap
}

func localPort(c net.PacketConn) uint16 { return uint16(c.LocalAddr().(*net.UDPAddr).Port) }

func TestMapping(t *testing.T) {
	tp := newTopo(t)

	// Cone: one socket, three destinations, one public address:port, and it
	// is the socket's own port (port-preserving).
	ca := tp.a.ListenPacket(t, "udp4", ":0")
	m1 := mustMapped(t, ca, tp.rStun)
	m2 := mustMapped(t, ca, tp.rStun2)
	m3 := mustMapped(t, ca, tp.sStun)
	t.Logf("a %s: via r:3478 %s, r:3479 %s, s:3478 %s", ca.LocalAddr(), m1, m2, m3)
	if m1.Addr() != tp.a.Public() || m1 != m2 || m1 != m3 {
		t.Errorf("cone NAT: mapping depends on destination: %s %s %s", m1, m2, m3)
	}
	if m1.Port() != localPort(ca) {
		t.Errorf("cone NAT: port not preserved: local %d, public %d", localPort(ca), m1.Port())
	}

	// Symmetric: a different random port per destination. A random port can
	// collide with another by chance (~1/64k), so a fresh socket is tried
	// (bounded) before failing.
	var ok bool
	for try := range 3 {
		cc := tp.c.ListenPacket(t, "udp4", ":0")
		n1 := mustMapped(t, cc, tp.rStun)
		n2 := mustMapped(t, cc, tp.rStun2)
		n3 := mustMapped(t, cc, tp.sStun)
		t.Logf("c %s (try %d): via r:3478 %s, r:3479 %s, s:3478 %s", cc.LocalAddr(), try, n1, n2, n3)
		if n1.Addr() != tp.rtC.Addr || n2.Addr() != tp.rtC.Addr || n3.Addr() != tp.rtC.Addr {
			t.Fatalf("symmetric NAT: wrong public address")
		}
		if n1 != n2 && n1 != n3 && n2 != n3 {
			ok = true
			break
		}
	}
	if !ok {
		t.Errorf("symmetric NAT: mapping did not differ per destination")
	}

	// A mapping is also a filter: a third party cannot reach a through it.
	s := tp.s.ListenPacket(t, "udp4", ":0")
	s.WriteTo([]byte("unsolicited"), udpAddr(m1))
	ca.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, from, err := ca.ReadFrom(make([]byte, 100)); err == nil {
		t.Errorf("unsolicited packet from %s went through the cone NAT", from)
	}
}

// punch has x and y send to each other's public address every 50 ms for at
// most d, and reports whether each received a packet from the other.
func punch(x, y net.PacketConn, xPub, yPub netip.AddrPort, d time.Duration) (xGot, yGot bool) {
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[net.PacketConn]bool{}
	both := func() bool { mu.Lock(); defer mu.Unlock(); return got[x] && got[y] }
	side := func(c net.PacketConn, peer netip.AddrPort) {
		defer wg.Done()
		buf := make([]byte, 2048)
		for time.Now().Before(deadline) && !both() {
			c.WriteTo([]byte("punch"), udpAddr(peer))
			c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			k, from, err := c.ReadFrom(buf)
			if err == nil && string(buf[:k]) == "punch" && from.String() == peer.String() {
				mu.Lock()
				got[c] = true
				mu.Unlock()
			}
		}
		// Keep answering briefly so the peer's last packets find an open path.
		c.WriteTo([]byte("punch"), udpAddr(peer))
		c.SetReadDeadline(time.Time{})
	}
	wg.Add(2)
	go side(x, yPub)
	go side(y, xPub)
	wg.Wait()
	return got[x], got[y]
}

func TestHolePunch(t *testing.T) {
	tp := newTopo(t)
	ca := tp.a.ListenPacket(t, "udp4", ":0")
	cb := tp.b.ListenPacket(t, "udp4", ":0")
	cc := tp.c.ListenPacket(t, "udp4", ":0")
	pa := mustMapped(t, ca, tp.rStun)
	pb := mustMapped(t, cb, tp.rStun)
	pc := mustMapped(t, cc, tp.rStun)

	// Cone to cone: both send to the other's reflexive address; traffic flows.
	start := time.Now()
	ga, gb := punch(ca, cb, pa, pb, 3*time.Second)
	if !ga || !gb {
		t.Fatalf("a<->b punch failed: a got %v, b got %v", ga, gb)
	}
	t.Logf("a (%s) <-> b (%s) punched in %v", pa, pb, time.Since(start).Round(time.Millisecond))
	// And it keeps flowing on the punched path.
	for i := range 5 {
		cb.WriteTo(fmt.Appendf(nil, "data %d", i), udpAddr(pa))
	}
	ca.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 100)
	for {
		k, _, err := ca.ReadFrom(buf)
		if err != nil {
			t.Fatalf("a got no data from b after punching: %v", err)
		}
		if bytes.HasPrefix(buf[:k], []byte("data")) {
			break
		}
	}

	// Cone to symmetric with the reflexive address seen by r: c's packets to
	// a leave from another port than the one a targets and allows, so the
	// punch times out (bounded).
	ga, gc := punch(ca, cc, pa, pc, 1500*time.Millisecond)
	if ga || gc {
		t.Errorf("a<->c punch unexpectedly worked: a got %v, c got %v", ga, gc)
	}
	pc2 := mustMapped(t, cc, tp.sStun)
	if pc2 == pc {
		t.Errorf("c's mapping is the same for r and s: %s", pc)
	}
}

// reachable reports whether c gets an answer from server within 4 tries of
// 200 ms.
func reachable(c net.PacketConn, server netip.AddrPort) bool {
	_, ok := mappedN(c, server, 4)
	return ok
}

func TestPartitionHeal(t *testing.T) {
	tp := newTopo(t)
	ca := tp.a.ListenPacket(t, "udp4", ":0")
	cs := tp.s.ListenPacket(t, "udp4", ":0")
	if !reachable(ca, tp.rStun) || !reachable(cs, tp.rStun) {
		t.Fatal("no baseline connectivity")
	}

	// A host behind NAT and an internet host.
	tp.lab.Partition(tp.a, tp.r)
	if reachable(ca, tp.rStun) {
		t.Error("a reaches r across a partition")
	}
	if !reachable(ca, tp.sStun) {
		t.Error("partition a|r also cut a from s")
	}
	tp.lab.Heal(tp.a, tp.r)
	if !reachable(ca, tp.rStun) {
		t.Error("a does not reach r after Heal")
	}

	// Two internet hosts on the same bridge.
	tp.lab.Partition(tp.s, tp.r)
	if reachable(cs, tp.rStun) {
		t.Error("s reaches r across a partition")
	}
	tp.lab.Heal(tp.s, tp.r)
	if !reachable(cs, tp.rStun) {
		t.Error("s does not reach r after Heal")
	}

	// A whole home (its router) and the internet host.
	tp.lab.Partition(tp.rtA, tp.r)
	if reachable(ca, tp.rStun) {
		t.Error("a reaches r across a partition of its router")
	}
	tp.lab.Heal(tp.rtA, tp.r)
	if !reachable(ca, tp.rStun) {
		t.Error("a does not reach r after healing its router")
	}
}

// burst sends n numbered datagrams from c to the echo server and counts the
// distinct answers that arrive within 1 s after the last one.
func burst(c net.PacketConn, server netip.AddrPort, n int) int {
	seen := map[string]bool{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		c.SetReadDeadline(time.Now().Add(time.Duration(n)*time.Millisecond + time.Second))
		for range 10 * n {
			k, _, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			if f := strings.Fields(string(buf[:k])); len(f) == 2 && strings.HasPrefix(f[1], "seq") {
				seen[f[1]] = true
			}
		}
	}()
	for i := range n {
		c.WriteTo(fmt.Appendf(nil, "seq%d", i), udpAddr(server))
		time.Sleep(500 * time.Microsecond)
	}
	<-done
	c.SetReadDeadline(time.Time{})
	return len(seen)
}

// burstOrder sends n numbered datagrams and returns the numbers of the
// answers in arrival order (1 s after the last send at most).
func burstOrder(c net.PacketConn, server netip.AddrPort, n int) []int {
	var got []int
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		c.SetReadDeadline(time.Now().Add(time.Duration(n)*time.Millisecond + time.Second))
		for range n {
			k, _, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			var i int
			if f := strings.Fields(string(buf[:k])); len(f) == 2 {
				if _, err := fmt.Sscanf(f[1], "seq%d", &i); err == nil {
					got = append(got, i)
				}
			}
		}
	}()
	for i := range n {
		c.WriteTo(fmt.Appendf(nil, "seq%d", i), udpAddr(server))
		time.Sleep(500 * time.Microsecond)
	}
	<-done
	c.SetReadDeadline(time.Time{})
	return got
}

func TestLoss(t *testing.T) {
	tp := newTopo(t)
	ca := tp.a.ListenPacket(t, "udp4", ":0")
	const n = 400
	if got := burst(ca, tp.rStun, n); got < n*95/100 {
		t.Fatalf("baseline: %d/%d answered", got, n)
	}
	tp.lab.Loss(tp.a, 0.3)
	got := burst(ca, tp.rStun, n)
	t.Logf("loss 0.3 on a: %d/%d answered", got, n)
	// Expected 280; the binomial standard deviation is ~9, so this is > 8 sigma.
	if got < n*50/100 || got > n*90/100 {
		t.Errorf("loss 0.3: %d/%d answered, want 50%%..90%%", got, n)
	}
	// Loss on a router hits its whole home.
	tp.lab.Loss(tp.a, 0)
	tp.lab.Loss(tp.rtA, 0.5)
	got = burst(ca, tp.rStun, n)
	t.Logf("loss 0.5 on homeA: %d/%d answered", got, n)
	if got < n*30/100 || got > n*70/100 {
		t.Errorf("loss 0.5 on router: %d/%d answered, want 30%%..70%%", got, n)
	}
	tp.lab.Loss(tp.rtA, 0)
	if got := burst(ca, tp.rStun, n); got < n*95/100 {
		t.Errorf("loss removed: %d/%d answered", got, n)
	}
}

func TestChangeMapping(t *testing.T) {
	tp := newTopo(t)
	ca := tp.a.ListenPacket(t, "udp4", ":0")
	prev := mustMapped(t, ca, tp.rStun)
	if prev.Port() != localPort(ca) {
		t.Fatalf("cone port not preserved before the change: %s", prev)
	}
	for i := range 3 {
		tp.rtA.ChangeMapping()
		m1 := mustMapped(t, ca, tp.rStun)
		m2 := mustMapped(t, ca, tp.sStun)
		t.Logf("after change %d: %s (r), %s (s)", i+1, m1, m2)
		if m1.Port() == prev.Port() {
			t.Errorf("change %d: public port unchanged (%d)", i+1, m1.Port())
		}
		if m1 != m2 {
			t.Errorf("change %d: mapping no longer endpoint-independent: %s vs %s", i+1, m1, m2)
		}
		prev = m1
	}
	// Other protocols keep working through the router (plain MASQUERADE rule).
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ln := tp.r.Listen(t, "tcp4", tp.r.Addr.String()+":8080")
	go func() {
		for range 5 {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()
	var conn net.Conn
	var err error
	tp.a.Run(t, func() {
		conn, err = (&net.Dialer{}).DialContext(ctx, "tcp4", ln.Addr().String())
	})
	if err != nil {
		t.Fatalf("tcp through changed router: %v", err)
	}
	line := make([]byte, 100)
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	k, _ := conn.Read(line)
	conn.Close()
	t.Logf("tcp from a seen by r as %s", strings.TrimSpace(string(line[:k])))
	if !strings.HasPrefix(string(line[:k]), tp.rtA.Addr.String()+":") {
		t.Errorf("tcp from a seen as %q", line[:k])
	}

	// Symmetric router: flushing conntrack alone gives new random ports.
	cc := tp.c.ListenPacket(t, "udp4", ":0")
	before := mustMapped(t, cc, tp.rStun)
	changed := false
	for range 3 { // a random port may repeat by chance (~1/64k)
		tp.rtC.ChangeMapping()
		if after := mustMapped(t, cc, tp.rStun); after != before {
			changed = true
			break
		}
	}
	if !changed {
		t.Errorf("symmetric router kept mapping %s", before)
	}
}

// rtt measures the median round trip to the echo server over 5 probes.
func rtt(t *testing.T, c net.PacketConn, server netip.AddrPort) time.Duration {
	t.Helper()
	var d []time.Duration
	for range 5 {
		start := time.Now()
		mustMapped(t, c, server)
		d = append(d, time.Since(start))
	}
	slices.Sort(d)
	return d[len(d)/2]
}

func TestDelay(t *testing.T) {
	tp := newTopo(t)
	ca := tp.a.ListenPacket(t, "udp4", ":0")
	base := rtt(t, ca, tp.rStun)
	tp.lab.Delay(tp.a, 50*time.Millisecond)
	d := rtt(t, ca, tp.rStun)
	t.Logf("rtt a->r: %v, with 50ms delay on a: %v", base, d)
	if d < 50*time.Millisecond || d > base+150*time.Millisecond {
		t.Errorf("with 50ms delay on a: rtt %v", d)
	}
	// Nothing is lost or reordered by the delay queue.
	seqs := burstOrder(ca, tp.rStun, 300)
	if len(seqs) != 300 || !slices.IsSorted(seqs) {
		t.Errorf("with delay: %d/300 answered, in order %v", len(seqs), slices.IsSorted(seqs))
	}
	tp.lab.Delay(tp.a, 0)
	if d := rtt(t, ca, tp.rStun); d > base+30*time.Millisecond {
		t.Errorf("delay removed: rtt %v", d)
	}
	// On a router: the whole home.
	tp.lab.Delay(tp.rtA, 80*time.Millisecond)
	d = rtt(t, ca, tp.rStun)
	t.Logf("with 80ms delay on homeA: %v", d)
	if d < 80*time.Millisecond || d > base+180*time.Millisecond {
		t.Errorf("with 80ms delay on homeA: rtt %v", d)
	}
	// Hosts on the internet can be delayed too.
	tp.lab.Delay(tp.rtA, 0)
	tp.lab.Delay(tp.r, 40*time.Millisecond)
	d = rtt(t, ca, tp.rStun)
	t.Logf("with 40ms delay on r: %v", d)
	if d < 40*time.Millisecond {
		t.Errorf("with 40ms delay on r: rtt %v", d)
	}
}

func netnsOf(t *testing.T, path string) string {
	t.Helper()
	s, err := os.Readlink(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestRunAndCommand(t *testing.T) {
	lab := New(t)
	inet := lab.Internet("198.18.0.0/24")
	r := lab.Host(inet, "r", "198.18.0.10")
	root := netnsOf(t, "/proc/thread-self/ns/net")
	var inside string
	r.Run(t, func() { inside = netnsOf(t, "/proc/thread-self/ns/net") })
	if inside == root {
		t.Errorf("Run did not switch namespaces (%s)", inside)
	}
	if after := netnsOf(t, "/proc/thread-self/ns/net"); after != root {
		t.Errorf("thread not switched back: %s", after)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := r.Command(ctx, "ip", "-4", "-o", "addr", "show", "dev", "eth0").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "198.18.0.10/24") {
		t.Errorf("ip addr in r: %v: %s", err, out)
	}
}

func rootVeths(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show", "type", "veth").Output()
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(l); len(f) > 1 {
			s = append(s, strings.TrimSuffix(f[1], ":"))
		}
	}
	slices.Sort(s)
	return s
}

func netnsList(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

func TestCleanup(t *testing.T) {
	New(t) // skip early unless namespaces work
	vethsBefore := rootVeths(t)
	var names []string
	var prefix string
	var sleeper *exec.Cmd
	t.Run("lab", func(t *testing.T) {
		lab := New(t)
		inet := lab.Internet("198.18.0.0/24")
		rt := lab.Router(inet, "home", "198.18.0.20", "100.64.1.0/24", Cone)
		a := lab.Host(rt, "a", "100.64.1.2")
		lab.Delay(a, 10*time.Millisecond)
		lab.Loss(rt, 0.1)
		lab.Partition(a, inet)
		sleeper = a.Command(context.Background(), "sleep", "30")
		if err := sleeper.Start(); err != nil {
			t.Fatal(err)
		}
		names, prefix = lab.Namespaces(), lab.Prefix()
		if _, err := os.Stat(filepath.Join(ownerDir, prefix)); err != nil {
			t.Errorf("owner file: %v", err)
		}
	})
	waited := make(chan error, 1)
	go func() { waited <- sleeper.Wait() }()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Errorf("process left in a namespace still runs after cleanup")
	}
	list := netnsList(t)
	for _, n := range names {
		if strings.Contains(list, n) {
			t.Errorf("namespace %s left behind", n)
		}
	}
	if _, err := os.Stat(filepath.Join(ownerDir, prefix)); err == nil {
		t.Errorf("owner file %s left behind", prefix)
	}
	if after := rootVeths(t); !slices.Equal(after, vethsBefore) {
		t.Errorf("veths in the root namespace changed: %v -> %v", vethsBefore, after)
	}

	// A crashed run: namespaces with the scheme's names whose owner is dead
	// (pid 0 never matches a live process) are swept; a live lab's are not.
	live := New(t)
	liveInet := live.Internet("198.18.0.0/24")
	stale := fmt.Sprintf("cir9999l%d", 1000000+os.Getpid()) // never a real lab's

	if err := os.WriteFile(filepath.Join(ownerDir, stale), []byte("0 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{stale + "n0", stale + "n1"} {
		if out, err := exec.Command("ip", "netns", "add", n).CombinedOutput(); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "delete", n).Run() })
	}
	sweep(t)
	list = netnsList(t)
	if strings.Contains(list, stale) {
		t.Errorf("stale namespaces not swept: %s", list)
	}
	if !strings.Contains(list, liveInet.NS) {
		t.Errorf("sweep removed a live lab's namespace %s", liveInet.NS)
	}
	if _, err := os.Stat(filepath.Join(ownerDir, stale)); err == nil {
		t.Errorf("stale owner file left")
	}
}

type fakeTB struct {
	testing.TB
	skipped, failed bool
}

func (f *fakeTB) Helper()               {}
func (f *fakeTB) Skipf(string, ...any)  { f.skipped = true }
func (f *fakeTB) Fatalf(string, ...any) { f.failed = true }

// TestGate: without namespaces a test is skipped, but in CI it fails.
func TestGate(t *testing.T) {
	for _, ci := range []string{"", "true"} {
		t.Setenv("CI", ci)
		f := &fakeTB{}
		gate(f, errors.New("not root"))
		if f.skipped != (ci == "") || f.failed != (ci == "true") {
			t.Errorf("CI=%q: skipped %v, failed %v", ci, f.skipped, f.failed)
		}
		f = &fakeTB{}
		gate(f, nil)
		if f.skipped || f.failed {
			t.Errorf("CI=%q: gate stopped a test without an error", ci)
		}
	}
}

// TestConcurrentNew: labs created at the same time, in one process (and,
// with go test ./..., in several), get distinct prefixes, and none
// sweeps another's namespaces.
func TestConcurrentNew(t *testing.T) {
	New(t) // skip early unless namespaces work
	const n = 8
	var mu sync.Mutex
	prefixes := map[string]int{}
	t.Run("group", func(t *testing.T) {
		for i := range n {
			t.Run(fmt.Sprint(i), func(t *testing.T) {
				t.Parallel()
				lab := New(t)
				inet := lab.Internet("198.18.0.0/24")
				mu.Lock()
				prefixes[lab.Prefix()]++ // live labs only
				p := lab.Prefix()
				t.Cleanup(func() { mu.Lock(); prefixes[p]--; mu.Unlock() })
				mu.Unlock()
				time.Sleep(500 * time.Millisecond) // let the others start
				// This lab's namespace still exists, and its prefix is its own.
				if !strings.Contains(netnsList(t), inet.NS) {
					t.Errorf("namespace %s of a live lab is gone", inet.NS)
				}
				mu.Lock()
				defer mu.Unlock()
				if prefixes[lab.Prefix()] != 1 {
					t.Errorf("prefix %s claimed %d times", lab.Prefix(), prefixes[lab.Prefix()])
				}
			})
		}
	})
}

// TestSweepOrphans: a namespace of the scheme without an owner file is
// only swept once it is older than orphanGrace (a lab being created by
// another process may not have written its owner file yet).
func TestSweepOrphans(t *testing.T) {
	New(t)                                                     // skip early unless namespaces work
	orphan := fmt.Sprintf("cir9998l%dn0", 1000000+os.Getpid()) // never a real lab's
	if out, err := exec.Command("ip", "netns", "add", orphan).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "delete", orphan).Run() })
	unlock, err := lockOwners()
	if err != nil {
		t.Fatal(err)
	}
	sweep(t)
	unlock()
	if !strings.Contains(netnsList(t), orphan) {
		t.Fatalf("sweep removed a young namespace without owner file")
	}
	old := orphanGrace
	orphanGrace = 0
	defer func() { orphanGrace = old }()
	time.Sleep(10 * time.Millisecond)
	unlock, err = lockOwners()
	if err != nil {
		t.Fatal(err)
	}
	sweep(t)
	unlock()
	if strings.Contains(netnsList(t), orphan) {
		t.Errorf("sweep kept an old namespace without owner file")
	}
}

// TestHostsAndSetAddr: a program started in a namespace resolves the names
// given with SetHosts (also after a rewrite), and SetAddr moves a host to a
// new address that its peers reach.
func TestHostsAndSetAddr(t *testing.T) {
	l := New(t)
	inet := l.Internet("198.18.0.0/24")
	a := l.Host(inet, "a", "198.18.0.10")
	b := l.Host(inet, "b", "198.18.0.11")
	a.SetHosts(map[string]netip.Addr{"bee.example": b.Addr})
	resolve := func() string {
		out, err := a.Command(context.Background(), "getent", "hosts", "bee.example").CombinedOutput()
		if err != nil {
			t.Fatalf("getent: %v: %s", err, out)
		}
		return strings.Fields(string(out))[0]
	}
	if got := resolve(); got != "198.18.0.11" {
		t.Fatalf("bee.example resolves to %s, want 198.18.0.11", got)
	}
	b.SetAddr("198.18.0.12")
	if b.Addr.String() != "198.18.0.12" {
		t.Fatalf("b.Addr = %s", b.Addr)
	}
	a.SetHosts(map[string]netip.Addr{"bee.example": b.Addr})
	if got := resolve(); got != "198.18.0.12" {
		t.Fatalf("after SetAddr bee.example resolves to %s, want 198.18.0.12", got)
	}
	ln := b.Listen(t, "tcp", "198.18.0.12:9000")
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
	var got []byte
	a.Run(t, func() {
		c, err := net.DialTimeout("tcp", "198.18.0.12:9000", 3*time.Second)
		if err != nil {
			t.Errorf("dial new address: %v", err)
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		got, _ = io.ReadAll(c)
	})
	if string(got) != "ok" {
		t.Fatalf("read %q from b's new address", got)
	}
}

// TestHealAfterSetAddr: Heal removes the rules Partition inserted even when
// a host moved to another address in between (the fault suite changes a
// node's IP while it is cut off).
func TestHealAfterSetAddr(t *testing.T) {
	l := New(t)
	inet := l.Internet("198.18.0.0/24")
	a := l.Host(inet, "a", "198.18.0.10")
	b := l.Host(inet, "b", "198.18.0.11")
	l.Partition(a, b)
	b.SetAddr("198.18.0.12")
	l.Heal(a, b)
	for _, n := range []*Node{a, b} {
		out, err := exec.Command("ip", "netns", "exec", n.NS, "iptables", "-w", "-t", "raw", "-S").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables -S in %s: %v: %s", n.Name, err, out)
		}
		if strings.Contains(string(out), "DROP") {
			t.Errorf("partition rules left in %s after Heal:\n%s", n.Name, out)
		}
	}
}
