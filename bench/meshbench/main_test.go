package meshbench

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/homecircle/circle/integration/netlab"
	"github.com/homecircle/circle/relay"
)

// Child process roles: the test binary re-executes itself inside a node's
// namespace (ip netns exec) when code there opens sockets from goroutines
// it does not control. pion's TURN server binds each allocation's relay
// socket from its own read loop, which would run in the test process's
// (root) namespace, so the relay R runs as such a child.
const roleEnv = "MESHBENCH_ROLE"

func TestMain(m *testing.M) {
	// The relay conns are not *net.UDPConn; quic-go would warn.
	os.Setenv("QUIC_GO_DISABLE_RECEIVE_BUFFER_WARNING", "true")
	switch os.Getenv(roleEnv) {
	case "":
		os.Exit(m.Run())
	case "relay":
		if err := relayMain(); err != nil {
			fmt.Fprintln(os.Stderr, "meshbench relay:", err)
			os.Exit(1)
		}
		os.Exit(0)
	case "node":
		if err := nodeMain(); err != nil {
			fmt.Fprintln(os.Stderr, "meshbench node:", err)
			os.Exit(1)
		}
		os.Exit(0)
	default:
		fmt.Fprintln(os.Stderr, "meshbench: unknown role", os.Getenv(roleEnv))
		os.Exit(2)
	}
}

// gateBench skips the test unless MESHBENCH=1 (netlab itself skips unless
// root).
func gateBench(t *testing.T) {
	t.Helper()
	if os.Getenv("MESHBENCH") != "1" {
		t.Skip("benchmark: set MESHBENCH=1 to run (root, network namespaces)")
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func newSecret(t testing.TB) []byte {
	t.Helper()
	s := make([]byte, 32)
	if _, err := rand.Read(s); err != nil {
		t.Fatal(err)
	}
	return s
}

// Ports used on every node.
const (
	turnPort = 3478
	meshPort = 4000
)

// relayMain runs in R's namespace: a TURN server (relay.NewServer) on
// :3478 and a mesh node "r" on :4000 (the introducer for punching). It
// prints "ready" and runs until its stdin closes (or an hour passes).
// Environment: MESHBENCH_ADDR (R's address), MESHBENCH_SECRET (hex),
// MESHBENCH_PEERS (comma-separated IPs the relay may relay to),
// MESHBENCH_RELAY_PROFILE (a file for a CPU profile of the whole run).
func relayMain() error {
	if file := os.Getenv("MESHBENCH_RELAY_PROFILE"); file != "" {
		f, err := os.Create(file)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	secret, err := hex.DecodeString(os.Getenv("MESHBENCH_SECRET"))
	if err != nil {
		return err
	}
	ip := net.ParseIP(os.Getenv("MESHBENCH_ADDR"))
	if ip == nil {
		return fmt.Errorf("bad MESHBENCH_ADDR")
	}
	var peers []netip.Addr
	for _, s := range strings.Split(os.Getenv("MESHBENCH_PEERS"), ",") {
		if a, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil {
			peers = append(peers, a)
		}
	}
	tc, err := net.ListenPacket("udp4", net.JoinHostPort(ip.String(), strconv.Itoa(turnPort)))
	if err != nil {
		return err
	}
	srv, err := relay.NewServer(relay.ServerConfig{
		Secret: secret, PacketConn: tc, RelayAddress: ip,
		Peers: func() []netip.Addr { return peers },
	})
	if err != nil {
		return err
	}
	defer srv.Close()
	mc, err := net.ListenPacket("udp4", net.JoinHostPort(ip.String(), strconv.Itoa(meshPort)))
	if err != nil {
		return err
	}
	mesh, err := relay.NewMesh(relay.MeshConfig{
		Name: "r", Secret: secret, Conn: mc, TURN: tc.LocalAddr().String(),
	})
	if err != nil {
		return err
	}
	defer mesh.Close()
	fmt.Println("ready")
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Hour):
	}
	return nil
}

// child is a process of the test binary running in a node's namespace.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	ready string      // the rest of its "ready" line
	lines chan string // every line it prints after "ready", until it exits
	mu    sync.Mutex  // serialises send
}

// send writes one command line to the child's stdin.
func (c *child) send(line string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, err := io.WriteString(c.stdin, line+"\n")
	return err
}

// stop closes the child's stdin (it exits) and waits for it, killing it
// after 5 s.
func (c *child) stop() {
	c.mu.Lock()
	c.stdin.Close()
	c.mu.Unlock()
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		fmt.Fprintf(os.Stderr, "meshbench: child %d did not exit within 5 s of its stdin closing; killed\n", c.cmd.Process.Pid)
		c.cmd.Process.Kill()
		<-done
	}
}

// startChild runs the test binary with role inside n's namespace and waits
// (at most 20 s) for it to print "ready". It is stopped in t.Cleanup.
func startChild(t *testing.T, n *netlab.Node, role string, env ...string) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := n.Command(context.Background(), exe, "-test.run=^$")
	cmd.Env = append(append(os.Environ(), roleEnv+"="+role), env...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, stdin: stdin, lines: make(chan string, 4096)}
	var once sync.Once
	t.Cleanup(func() { once.Do(c.stop) })
	ready := make(chan error, 1)
	go func() {
		defer close(c.lines)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), "ready"); ok {
				c.ready = strings.TrimSpace(rest)
				ready <- nil
				break
			}
		}
		for sc.Scan() {
			select {
			case c.lines <- sc.Text():
			default: // nobody reads this child's lines
			}
		}
		select {
		case ready <- fmt.Errorf("%s exited before it was ready", role):
		default:
		}
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("%s not ready after 20 s", role)
	}
	return c
}

// cpu returns the CPU time (user + system) the child used so far.
func (c *child) cpu() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)       // utime, field 14 overall
	s, _ := strconv.ParseInt(f[12], 10, 64)       // stime, field 15
	return time.Duration(u+s) * time.Second / 100 // USER_HZ
}

// selfCPU returns this process's CPU time (user + system).
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// iptables runs iptables inside n's namespace.
func iptables(t *testing.T, n *netlab.Node, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := n.Command(ctx, "iptables", append([]string{"-w"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("iptables %s in %s: %v: %s", strings.Join(args, " "), n.Name, err, out)
	}
}

// portForward adds a TCP port forward (DNAT) on router rt from its public
// port to a host on its LAN, with the firewall hole for it. Only this
// benchmark's topology has one: it is the "reached directly" baseline. The
// rules go away with the namespace.
func portForward(t *testing.T, rt *netlab.Node, port int, to netip.AddrPort) {
	t.Helper()
	p := strconv.Itoa(port)
	iptables(t, rt, "-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-p", "tcp", "--dport", p,
		"-j", "DNAT", "--to-destination", to.String())
	iptables(t, rt, "-I", "FORWARD", "1", "-i", "eth0", "-p", "tcp", "-d", to.Addr().String(),
		"--dport", strconv.Itoa(int(to.Port())), "-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT")
}

// newMesh opens a mesh on conn; closed in t.Cleanup.
func newMesh(t *testing.T, cfg relay.MeshConfig) *relay.Mesh {
	t.Helper()
	m, err := relay.NewMesh(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// eventually polls cond every 20 ms until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func sorted(d []float64) []float64 {
	s := append([]float64(nil), d...)
	sort.Float64s(s)
	return s
}

// pct returns the p-th percentile (nearest rank) of d.
func pct(d []float64, p int) float64 {
	if len(d) == 0 {
		return 0
	}
	s := sorted(d)
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return s[i]
}

func median(d []float64) float64 {
	if len(d) == 0 {
		return 0
	}
	s := sorted(d)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
