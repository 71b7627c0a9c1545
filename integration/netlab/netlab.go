// Package netlab builds NAT topologies out of Linux network namespaces for
// integration tests (DESIGN.md section 6, "NAT").
//
// A Lab owns a set of namespaces whose names share a per-lab prefix
// ("cir" + pid%10000 + "l" + lab number, e.g. "cir4711l0n3"). Every namespace is
// deleted in t.Cleanup (after killing processes left inside it), and New sweeps
// namespaces of the same scheme left behind by crashed runs: an owner file in
// /run/netlab records the pid and start time of the process that created a
// prefix (written before its first namespace), and prefixes whose owner is
// gone are removed; namespaces without an owner file only once they are
// older than orphanGrace. Labs may be created concurrently, across
// processes too: claiming and sweeping hold an flock on /run/netlab/lock.
//
// Topology:
//
//	inet := lab.Internet("198.18.0.0/24") // namespace with a bridge; .1 is the gateway
//	r := lab.Host(inet, "r", "198.18.0.10")
//	rt := lab.Router(inet, "homeA", "198.18.0.20", "100.64.1.0/24", netlab.Cone)
//	a := lab.Host(rt, "a", "100.64.1.2") // default route via 100.64.1.1
//
// All links are veth pairs created directly inside the namespaces (never in
// the root namespace), so nothing outside the lab's namespaces is touched.
//
// NAT models (iptables, nf_tables backend):
//   - Cone: MASQUERADE, which keeps the source port when it is free, so a socket
//     gets the same public port for every destination (endpoint-independent
//     mapping; filtering is address-and-port dependent, as in most home
//     routers: a "port-restricted cone"). Hole punching works.
//   - Symmetric: MASQUERADE --random-fully, a fresh random port per destination.
//
// Routers drop unsolicited inbound traffic (INPUT and FORWARD from the uplink
// accept only ESTABLISHED,RELATED), like a home router's firewall; this also
// keeps an early punching packet from creating a conntrack entry on the peer's
// router that would force the peer onto another port.
//
// Impairments, all on a node's uplink ("eth0"); each adds to one direction,
// so a round trip through the node sees it once:
//   - Loss(n, p): iptables statistic match, each packet n sends upstream is
//     dropped with probability p.
//   - Delay(n, d): netem is missing from the kernel, so packets arriving at n
//     from upstream are queued (iptables NFQUEUE in the raw table, before
//     conntrack and NAT) to a small netlink client inside the test process
//     that accepts each packet d after it arrived. Round trips through n grow
//     by d. (Arrival rather than departure: see Delay.)
//   - Partition(x, y) / Heal(x, y): raw-table DROP rules in both namespaces for
//     the other side's addresses.
//
// Code can run inside a namespace either as a process (Node.Command, which uses
// "ip netns exec") or in the test process itself (Node.Run, which switches the
// calling OS thread into the namespace; sockets created there stay in that
// namespace and can then be used from any goroutine).
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
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Mode selects the NAT behaviour of a Router.
type Mode int

const (
	// Cone is port-preserving MASQUERADE (endpoint-independent mapping).
	Cone Mode = iota
	// Symmetric is MASQUERADE --random-fully (a new port per destination).
	Symmetric
)

func (m Mode) String() string {
	if m == Symmetric {
		return "symmetric"
	}
	return "cone"
}

type kind int

const (
	kindInternet kind = iota
	kindRouter
	kindHost
)

const (
	netnsDir = "/run/netns"
	ownerDir = "/run/netlab"
	lockName = "lock" // flock held while claiming a prefix and sweeping
	// shiftedBase is where ChangeMapping moves a cone router's ports.
	shiftedBase = 10000
	shiftedSize = 10000
)

var nsNameRE = regexp.MustCompile(`^(cir\d{4}l\d+)n\d+$`)

// Lab is a set of namespaces built for one test.
type Lab struct {
	t      testing.TB
	prefix string

	mu     sync.Mutex
	n      int
	nodes  []*Node
	parts  map[[2]*Node][]partRule // the DROP rules each Partition inserted
	queues []*delayQueue
}

// Node is a namespace in the lab: the internet hub, a home router or a host.
type Node struct {
	lab  *Lab
	kind kind
	// Name is the name given by the test; NS is the network namespace name.
	Name, NS string
	// Addr is the node's own address: the gateway of an Internet, the public
	// address of a Router, the address of a Host.
	Addr netip.Addr
	// Prefix is the node's subnet: the internet's for Internet nodes, Routers
	// and hosts on the internet; the LAN for hosts behind a router.
	Prefix netip.Prefix
	// LAN is a Router's home network and Gateway its address on it.
	LAN     netip.Prefix
	Gateway netip.Addr
	Mode    Mode
	Parent  *Node

	mu       sync.Mutex
	shift    int
	loss     float64
	delay    *delayQueue
	children int
}

// New returns an empty lab. It skips the test unless it runs as root with
// working "ip netns", iptables and conntrack; with CI=true it fails instead.
//
// Labs may be created concurrently, in one process or several (go test
// runs packages in parallel): the owner file of a prefix is complete
// before any of its namespaces exists, and claiming and sweeping happen
// under an flock on /run/netlab/lock.
func New(t testing.TB) *Lab {
	t.Helper()
	gate(t, check())
	if err := os.MkdirAll(ownerDir, 0o755); err != nil {
		t.Fatalf("netlab: %v", err)
	}
	unlock, err := lockOwners()
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	sweepOnce.Do(func() { sweep(t) })
	l := &Lab{t: t, parts: map[[2]*Node][]partRule{}}
	l.prefix = claimPrefix(t)
	unlock()
	t.Cleanup(l.close)
	return l
}

// lockOwners takes an exclusive flock on /run/netlab/lock (against other
// processes and, as each call opens the file anew, other goroutines).
func lockOwners() (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(ownerDir, lockName), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("flock %s: %w", f.Name(), err)
	}
	return func() {
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		f.Close()
	}, nil
}

// gate skips (or, with CI=true, fails) the test if err is not nil.
func gate(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("netlab: %v (CI=true: network namespaces are required)", err)
		return
	}
	t.Skipf("netlab: %v", err)
}

func check() error {
	if os.Geteuid() != 0 {
		return errors.New("not root")
	}
	for _, b := range []string{"ip", "iptables", "conntrack"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%s not installed", b)
		}
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns list: %v: %s", err, out)
	}
	return nil
}

var sweepOnce sync.Once

// procStart returns the start time (in clock ticks since boot) of pid, or "".
func procStart(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// The command name (field 2) may contain spaces; fields after ")".
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return ""
	}
	return f[19] // field 22 overall
}

// ownerState tells whether prefix's owner file names a live process
// (alive), a dead one (dead), or is missing or unreadable (unknown).
type ownerState int

const (
	ownerUnknown ownerState = iota
	ownerAliveState
	ownerDead
)

func ownerOf(prefix string) ownerState {
	b, err := os.ReadFile(filepath.Join(ownerDir, prefix))
	if err != nil {
		return ownerUnknown
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return ownerUnknown
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return ownerUnknown
	}
	if procStart(pid) == f[1] {
		return ownerAliveState
	}
	return ownerDead
}

func ownerAlive(prefix string) bool { return ownerOf(prefix) == ownerAliveState }

// orphanGrace is how old a namespace (or owner file) of the scheme without
// a readable owner file must be before sweep removes it: a lab created by
// code that does not write its owner file first (or not under the lock)
// is left alone while it may still run.
var orphanGrace = 10 * time.Minute

// olderThan reports whether path exists and was last changed before d ago.
func olderThan(path string, d time.Duration) bool {
	fi, err := os.Stat(path)
	return err == nil && time.Since(fi.ModTime()) > d
}

// sweep deletes namespaces of the netlab scheme whose owning process is
// gone: their owner file names a dead process, or they have none and are
// older than orphanGrace. The caller holds the lock.
func sweep(t testing.TB) {
	ents, err := os.ReadDir(netnsDir)
	if err != nil {
		return
	}
	states := map[string]ownerState{}
	for _, e := range ents {
		m := nsNameRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		st, ok := states[m[1]]
		if !ok {
			st = ownerOf(m[1])
			states[m[1]] = st
		}
		if st == ownerDead || st == ownerUnknown && olderThan(filepath.Join(netnsDir, e.Name()), orphanGrace) {
			t.Logf("netlab: removing stale namespace %s", e.Name())
			deleteNS(e.Name())
		}
	}
	// Owner files of dead processes (their namespaces are gone now), and
	// old unreadable ones.
	if ents, err := os.ReadDir(ownerDir); err == nil {
		for _, e := range ents {
			if e.Name() == lockName || strings.HasPrefix(e.Name(), ".") {
				continue
			}
			path := filepath.Join(ownerDir, e.Name())
			switch ownerOf(e.Name()) {
			case ownerDead:
				os.Remove(path)
			case ownerUnknown:
				if olderThan(path, orphanGrace) {
					os.Remove(path)
				}
			}
		}
	}
}

// claimPrefix reserves a prefix by creating its owner file exclusively
// and complete: written to a temporary file, then hard-linked into place
// (link fails if the name exists). A prefix whose owner is dead is
// cleaned and taken over. The caller holds the lock.
func claimPrefix(t testing.TB) string {
	pid := os.Getpid()
	owner := fmt.Sprintf("%d %s\n", pid, procStart(pid))
	tmp, err := os.CreateTemp(ownerDir, ".claim-*")
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.WriteString(owner)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	for i := range 1000 {
		p := fmt.Sprintf("cir%04dl%d", pid%10000, i)
		err := os.Link(tmp.Name(), filepath.Join(ownerDir, p))
		if errors.Is(err, os.ErrExist) {
			if ownerOf(p) != ownerDead {
				continue
			}
			// Stale prefix (owner died): clean it and take it over.
			removePrefix(p)
			err = os.Link(tmp.Name(), filepath.Join(ownerDir, p))
			if err != nil {
				continue
			}
		} else if err != nil {
			t.Fatalf("netlab: %v", err)
		}
		return p
	}
	t.Fatalf("netlab: no free namespace prefix")
	return ""
}

func removePrefix(p string) {
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if m := nsNameRE.FindStringSubmatch(e.Name()); m != nil && m[1] == p {
				deleteNS(e.Name())
			}
		}
	}
	os.Remove(filepath.Join(ownerDir, p))
}

// deleteNS kills processes left in ns (never this process) and deletes it.
func deleteNS(ns string) {
	self := os.Getpid()
	for range 20 {
		out, err := exec.Command("ip", "netns", "pids", ns).Output()
		if err != nil {
			break
		}
		var pids []int
		for _, f := range strings.Fields(string(out)) {
			if pid, err := strconv.Atoi(f); err == nil && pid != self {
				pids = append(pids, pid)
			}
		}
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	exec.Command("ip", "netns", "delete", ns).Run()
	removeEtc(ns)
}

func (l *Lab) close() {
	l.mu.Lock()
	nodes := l.nodes
	queues := l.queues
	l.mu.Unlock()
	for _, q := range queues {
		q.stop()
	}
	for i := len(nodes) - 1; i >= 0; i-- {
		deleteNS(nodes[i].NS)
	}
	os.Remove(filepath.Join(ownerDir, l.prefix))
}

// Namespaces returns the names of the lab's namespaces.
func (l *Lab) Namespaces() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var s []string
	for _, n := range l.nodes {
		s = append(s, n.NS)
	}
	return s
}

// Prefix is the lab's namespace name prefix.
func (l *Lab) Prefix() string { return l.prefix }

func (l *Lab) fatalf(format string, args ...any) {
	l.t.Helper()
	l.t.Fatalf("netlab: "+format, args...)
}

// sh runs a command in the root namespace (only "ip" with -n or netns verbs).
func (l *Lab) sh(name string, args ...string) {
	l.t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		l.fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

func (l *Lab) newNode(k kind, name string) *Node {
	l.t.Helper()
	l.mu.Lock()
	ns := fmt.Sprintf("%sn%d", l.prefix, l.n)
	l.n++
	n := &Node{lab: l, kind: k, Name: name, NS: ns}
	l.nodes = append(l.nodes, n)
	l.mu.Unlock()
	l.sh("ip", "netns", "add", ns)
	l.sh("ip", "-n", ns, "link", "set", "lo", "up")
	return n
}

// ipt runs iptables inside the node's namespace.
func (n *Node) ipt(args ...string) {
	n.lab.t.Helper()
	n.lab.sh("ip", append([]string{"netns", "exec", n.NS, "iptables", "-w"}, args...)...)
}

func (n *Node) sysctl(key, val string) {
	n.lab.t.Helper()
	n.lab.sh("ip", "netns", "exec", n.NS, "sysctl", "-qw", key+"="+val)
}

func mustPrefix(l *Lab, s string) netip.Prefix {
	p, err := netip.ParsePrefix(s)
	if err != nil || !p.Addr().Is4() {
		l.fatalf("bad prefix %q: %v", s, err)
	}
	p = p.Masked()
	if !allowed(p.Addr()) {
		l.fatalf("prefix %s outside 198.18.0.0/15 and 100.64.0.0/10", p)
	}
	return p
}

var (
	inetRange = netip.MustParsePrefix("198.18.0.0/15")
	lanRange  = netip.MustParsePrefix("100.64.0.0/10")
)

func allowed(a netip.Addr) bool { return inetRange.Contains(a) || lanRange.Contains(a) }

func mustAddr(l *Lab, s string, in netip.Prefix) netip.Addr {
	a, err := netip.ParseAddr(s)
	if err != nil || !in.Contains(a) {
		l.fatalf("address %q not in %s", s, in)
	}
	return a
}

// Internet creates the simulated internet: a namespace with a bridge that
// holds the first address of prefix (the default gateway of its hosts).
func (l *Lab) Internet(prefix string) *Node {
	l.t.Helper()
	p := mustPrefix(l, prefix)
	if !inetRange.Contains(p.Addr()) {
		l.fatalf("internet %s must be inside %s", p, inetRange)
	}
	n := l.newNode(kindInternet, "internet")
	n.Prefix = p
	n.Addr = p.Addr().Next()
	l.sh("ip", "-n", n.NS, "link", "add", "br0", "type", "bridge")
	l.sh("ip", "-n", n.NS, "addr", "add", netip.PrefixFrom(n.Addr, p.Bits()).String(), "dev", "br0")
	l.sh("ip", "-n", n.NS, "link", "set", "br0", "up")
	n.sysctl("net.ipv4.ip_forward", "1")
	return n
}

// attach creates a veth pair: "eth0" in child, and a port of parent's bridge.
func (l *Lab) attach(parent, child *Node, addr netip.Addr) {
	l.t.Helper()
	if parent.kind == kindHost {
		l.fatalf("%s is a host; attach to an Internet or a Router", parent.Name)
	}
	parent.mu.Lock()
	parent.children++
	port := fmt.Sprintf("p%d", parent.children)
	parent.mu.Unlock()
	bridge := "br0"
	pfx, gw := parent.Prefix, parent.Addr
	if parent.kind == kindRouter {
		bridge = "lan0"
		pfx, gw = parent.LAN, parent.Gateway
	}
	if addr == gw {
		l.fatalf("%s is the gateway address", addr)
	}
	l.sh("ip", "-n", child.NS, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", parent.NS)
	l.sh("ip", "-n", parent.NS, "link", "set", port, "master", bridge, "up")
	l.sh("ip", "-n", child.NS, "addr", "add", netip.PrefixFrom(addr, pfx.Bits()).String(), "dev", "eth0")
	l.sh("ip", "-n", child.NS, "link", "set", "eth0", "up")
	l.sh("ip", "-n", child.NS, "route", "add", "default", "via", gw.String())
	child.Parent = parent
	child.Prefix = pfx
	child.Addr = addr
}

// Host creates a host attached to parent (an Internet or a Router) with the
// given address; its default route goes via the parent.
func (l *Lab) Host(parent *Node, name, addr string) *Node {
	l.t.Helper()
	pfx := parent.Prefix
	if parent.kind == kindRouter {
		pfx = parent.LAN
	}
	a := mustAddr(l, addr, pfx)
	n := l.newNode(kindHost, name)
	l.attach(parent, n, a)
	return n
}

// Router creates a home router on inet with public address pub, NATing the
// LAN lan (whose first address is the router's) with the given mode.
func (l *Lab) Router(inet *Node, name, pub, lan string, mode Mode) *Node {
	l.t.Helper()
	if inet.kind != kindInternet {
		l.fatalf("router %s must be attached to an Internet", name)
	}
	a := mustAddr(l, pub, inet.Prefix)
	lp := mustPrefix(l, lan)
	if !lanRange.Contains(lp.Addr()) {
		l.fatalf("LAN %s must be inside %s", lp, lanRange)
	}
	n := l.newNode(kindRouter, name)
	n.Mode = mode
	n.LAN = lp
	n.Gateway = lp.Addr().Next()
	l.attach(inet, n, a)
	l.sh("ip", "-n", n.NS, "link", "add", "lan0", "type", "bridge")
	l.sh("ip", "-n", n.NS, "addr", "add", netip.PrefixFrom(n.Gateway, lp.Bits()).String(), "dev", "lan0")
	l.sh("ip", "-n", n.NS, "link", "set", "lan0", "up")
	n.sysctl("net.ipv4.ip_forward", "1")
	// Firewall: nothing unsolicited from the uplink.
	for _, chain := range []string{"INPUT", "FORWARD"} {
		n.ipt("-A", chain, "-i", "eth0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
		n.ipt("-A", chain, "-i", "eth0", "-j", "DROP")
	}
	n.ipt(append([]string{"-t", "nat", "-A", "POSTROUTING"}, n.natRule()...)...)
	return n
}

func (n *Node) natRule() []string {
	r := []string{"-s", n.LAN.String(), "-o", "eth0"}
	switch {
	case n.Mode == Symmetric:
		return append(r, "-j", "MASQUERADE", "--random-fully")
	case n.shift == 0:
		return append(r, "-j", "MASQUERADE")
	default:
		// Shifted port map: public port = lo + (source port - base) mod size,
		// still independent of the destination.
		lo := shiftedBase + (n.shift%5)*shiftedSize/5
		return append(r, "-j", "SNAT", "--to-source",
			fmt.Sprintf("%s:%d-%d/%d", n.Addr, lo, lo+shiftedSize/5-1, n.shift))
	}
}

// ChangeMapping makes the router forget its NAT mappings (conntrack -F) so
// the next packet of every flow gets a new public port. For a Cone router the
// NAT rule is also rewritten (port-preserving MASQUERADE would otherwise hand
// out the same ports again): TCP and UDP are then SNATed with a shifted port
// map, so ports stay endpoint-independent but differ from before. Each call
// moves to a different port block.
func (n *Node) ChangeMapping() {
	n.lab.t.Helper()
	if n.kind != kindRouter {
		n.lab.fatalf("ChangeMapping: %s is not a router", n.Name)
	}
	if n.Mode == Cone {
		n.mu.Lock()
		old := n.natRule()
		n.shift++
		rules := [][]string{n.natRule()}
		n.mu.Unlock()
		// Insert the new rules first, then drop the old one.
		for _, proto := range []string{"udp", "tcp"} {
			r := append([]string{"-t", "nat", "-I", "POSTROUTING", "1", "-p", proto}, rules[0]...)
			n.ipt(r...)
		}
		if len(old) > 0 && n.shift > 1 {
			for _, proto := range []string{"udp", "tcp"} {
				n.ipt(append([]string{"-t", "nat", "-D", "POSTROUTING", "-p", proto}, old...)...)
			}
		}
	}
	n.lab.sh("ip", "netns", "exec", n.NS, "conntrack", "-F")
}

// Command returns a command that runs inside the node's namespace.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.NS, name}, args...)...)
}

// Run calls fn with the calling goroutine locked to an OS thread that is
// switched into the node's namespace. Sockets opened by fn belong to the
// namespace and keep working after Run returns, from any goroutine.
// Goroutines started by fn do NOT run in the namespace.
func (n *Node) Run(t testing.TB, fn func()) {
	t.Helper()
	if err := n.run(fn); err != nil {
		t.Fatalf("netlab: run in %s: %v", n.Name, err)
	}
}

func (n *Node) run(fn func()) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open(filepath.Join(netnsDir, n.NS))
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer func() {
		// If the thread cannot go back it stays locked and dies with the goroutine.
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
	}()
	fn()
	return nil
}

// ListenPacket opens a packet socket inside the node's namespace.
func (n *Node) ListenPacket(t testing.TB, network, addr string) net.PacketConn {
	t.Helper()
	return openIn(t, n, func() (net.PacketConn, error) { return net.ListenPacket(network, addr) })
}

// Listen opens a stream listener inside the node's namespace.
func (n *Node) Listen(t testing.TB, network, addr string) net.Listener {
	t.Helper()
	return openIn(t, n, func() (net.Listener, error) { return net.Listen(network, addr) })
}

// openIn runs open inside n's namespace and closes what it opened when the
// test ends. (A socket keeps the namespace it was created in.)
func openIn[T io.Closer](t testing.TB, n *Node, open func() (T, error)) T {
	t.Helper()
	var c T
	var err error
	n.Run(t, func() { c, err = open() })
	if err != nil {
		t.Fatalf("netlab: listen in %s: %v", n.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Public is the address the internet sees for n: a host behind a router has
// its router's; everything else its own.
func (n *Node) Public() netip.Addr {
	if n.kind == kindHost && n.Parent != nil && n.Parent.kind == kindRouter {
		return n.Parent.Addr
	}
	return n.Addr
}

// addrs are the addresses traffic of n carries as seen by its neighbours.
func (n *Node) addrs() []netip.Addr {
	s := []netip.Addr{n.Addr}
	if n.kind == kindRouter {
		s = append(s, n.Gateway)
	}
	return s
}

func partRules(other *Node) [][]string {
	var r [][]string
	for _, a := range other.addrs() {
		s := a.String()
		r = append(r,
			[]string{"PREROUTING", "-s", s},
			[]string{"PREROUTING", "-d", s},
			[]string{"OUTPUT", "-d", s},
		)
	}
	return r
}

// partRule is one raw-table DROP rule that Partition inserted in a
// namespace (kept so that Heal deletes exactly it, even after SetAddr).
type partRule struct {
	in   *Node
	rule []string
}

// Partition drops all traffic between x and y (raw-table DROP rules in both
// namespaces for the other's addresses). A router's address covers the whole
// home behind it. The rules name the addresses x and y have now: after a
// SetAddr the other side's rules no longer match the moved host (its own
// rules still cut it off), and Heal removes the rules Partition inserted.
func (l *Lab) Partition(x, y *Node) {
	l.t.Helper()
	key := pairKey(x, y)
	l.mu.Lock()
	_, done := l.parts[key]
	if !done {
		l.parts[key] = nil
	}
	l.mu.Unlock()
	if done {
		return
	}
	var rules []partRule
	for _, p := range [][2]*Node{{x, y}, {y, x}} {
		for _, r := range partRules(p[1]) {
			p[0].ipt(append(append([]string{"-t", "raw", "-I"}, r...), "-j", "DROP")...)
			rules = append(rules, partRule{in: p[0], rule: r})
		}
	}
	l.mu.Lock()
	l.parts[key] = rules
	l.mu.Unlock()
}

// pairKey is the order-independent key of a partition between x and y.
func pairKey(x, y *Node) [2]*Node {
	if x.NS > y.NS {
		return [2]*Node{y, x}
	}
	return [2]*Node{x, y}
}

// Heal removes a Partition between x and y.
func (l *Lab) Heal(x, y *Node) {
	l.t.Helper()
	key := pairKey(x, y)
	l.mu.Lock()
	rules, done := l.parts[key]
	delete(l.parts, key)
	l.mu.Unlock()
	if !done {
		return
	}
	for _, r := range rules {
		r.in.ipt(append(append([]string{"-t", "raw", "-D"}, r.rule...), "-j", "DROP")...)
	}
}

// Loss drops each packet n sends on its uplink with probability p (0 removes
// the loss). For a router that is all traffic from its home to the internet.
func (l *Lab) Loss(n *Node, p float64) {
	l.t.Helper()
	if n.kind == kindInternet {
		l.fatalf("Loss: use a host or router, not the internet hub")
	}
	if p < 0 || p > 1 {
		l.fatalf("Loss: probability %v", p)
	}
	n.mu.Lock()
	old := n.loss
	n.loss = p
	n.mu.Unlock()
	rule := func(op string, p float64) {
		n.ipt("-t", "mangle", op, "POSTROUTING", "-o", "eth0", "-m", "statistic",
			"--mode", "random", "--probability", strconv.FormatFloat(p, 'f', 6, 64), "-j", "DROP")
	}
	if old > 0 {
		rule("-D", old)
	}
	if p > 0 {
		rule("-A", p)
	}
}

// Delay adds d of latency to every packet n receives on its uplink (for a
// router: everything the internet sends to its home, and to itself), so
// round trips through n grow by d. d == 0 removes the delay. See delayQueue.
func (l *Lab) Delay(n *Node, d time.Duration) {
	l.t.Helper()
	if n.kind == kindInternet {
		l.fatalf("Delay: use a host or router, not the internet hub")
	}
	n.mu.Lock()
	q := n.delay
	n.mu.Unlock()
	if q == nil {
		if d <= 0 {
			return
		}
		var err error
		n.Run(l.t, func() { q, err = newDelayQueue(0) })
		if err != nil {
			l.fatalf("Delay: nfqueue in %s: %v", n.Name, err)
		}
		l.mu.Lock()
		l.queues = append(l.queues, q)
		l.mu.Unlock()
		n.mu.Lock()
		n.delay = q
		n.mu.Unlock()
		q.setDelay(d)
		q.start()
		// Queue what arrives on the uplink, in the raw table (before conntrack
		// and NAT see the packet). Delaying on arrival rather than on departure
		// matters for TCP: a packet held in its sender's own stack counts
		// against TCP small queues and throttles the sender to a few packets
		// per delay; once it crossed the veth into this namespace it is
		// orphaned. --queue-bypass: if the queue went away, packets pass.
		n.ipt("-t", "raw", "-A", "PREROUTING", "-i", "eth0", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass")
		return
	}
	q.setDelay(d)
}
