package faults

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/homecircle/circle/integration/netlab"
)

// nodeBin is the faultnode binary, built once by TestMain; nextWireBin is
// the same built with -tags circle_nextwire, a node that speaks the next
// wire version (replicator/version_build_next.go).
var nodeBin, nextWireBin string

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

// defaultParallel is how many scenarios run at once unless -parallel is
// given: their processes mostly wait on timers and the network, so four
// fit on 2 cores, and the CI set stays well inside go test's default
// 10 minute timeout.
const defaultParallel = "4"

func runMain(m *testing.M) int {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		flag.Set("test.parallel", defaultParallel)
	}
	dir, err := os.MkdirTemp("", "circle-faults-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "temp dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	nodeBin = filepath.Join(dir, "faultnode")
	nextWireBin = filepath.Join(dir, "faultnode-nextwire")
	for _, b := range [][]string{{"-o", nodeBin}, {"-tags", "circle_nextwire", "-o", nextWireBin}} {
		build := exec.Command("go", append(append([]string{"build"}, b...), "github.com/homecircle/circle/integration/faults/faultnode")...)
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building faultnode:", err)
			return 1
		}
	}
	return m.Run()
}

// Topology: every node is a host on one internet bridge, 198.18.0.0/24,
// alpha at .11, beta at .12 and so on; its mesh listens on 0.0.0.0:7946
// and is known as <name>.circle.test in every node's hosts file.
const (
	meshPort   = 7946
	hostDomain = "circle.test"
)

var nodeNames = []string{"alpha", "beta", "gamma", "delta", "epsilon"}

// seedKind says how nodes name their join seeds.
type seedKind int

const (
	ipSeeds   seedKind = iota // join 198.18.0.11:7946 ...
	hostSeeds                 // join alpha.circle.test:7946 ... (per-namespace hosts files)
)

func (s seedKind) String() string {
	if s == hostSeeds {
		return "host names"
	}
	return "IPs"
}

// clusterOpts chooses the circle a scenario runs on.
type clusterOpts struct {
	nodes int      // 3 to 5
	seeds seedKind // how join seeds are written
	// firstNoJoin: alpha has no join (a circle of one that the others
	// joined), the others join alpha only. Otherwise every node joins every
	// other node.
	firstNoJoin bool
	replicas    int // default 2
	// tombstoneHorizon is the nodes' replicator TombstoneHorizon (0: the
	// default, 72 h).
	tombstoneHorizon time.Duration
	// nextWire names the nodes that run the faultnode built with
	// -tags circle_nextwire (the next wire version).
	nextWire []string
}

// cluster is one lab with its faultnode processes and the run's history.
type cluster struct {
	t      *testing.T
	lab    *netlab.Lab
	inet   *netlab.Node
	opts   clusterOpts
	nodes  []*fnode
	secret string // path of the secret file
	out    string // kept artifacts directory (logs, history, verdict)
	hist   *history

	mu    sync.Mutex // guards parts and wiped
	parts [][2]*fnode
	wiped map[string]time.Time // node -> when its data dir was wiped
}

// fnode is one faultnode process (and its namespace).
type fnode struct {
	c    *cluster
	name string
	ns   *netlab.Node
	dir  string // data dir
	sock string // control socket
	log  *os.File

	mu      sync.Mutex // guards the following
	ip      netip.Addr
	cmd     *exec.Cmd
	done    chan struct{}
	killed  bool // we killed it (an exit is expected)
	crashed string
	offset  time.Duration
}

// newCluster builds the lab and starts the circle: alpha first, then the
// others together; it returns once every node sees every other alive.
func newCluster(t *testing.T, opts clusterOpts) *cluster {
	t.Helper()
	if opts.replicas == 0 {
		opts.replicas = 2
	}
	c := &cluster{t: t, opts: opts}
	c.out = keptDir(t)
	c.hist = newHistory(filepath.Join(c.out, "history.jsonl"))
	sec := make([]byte, 32)
	rand.Read(sec)
	c.secret = filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(c.secret, []byte(base64.StdEncoding.EncodeToString(sec)), 0o600); err != nil {
		t.Fatal(err)
	}
	data := t.TempDir()
	c.lab = netlab.New(t)
	// Cleanups run last-in first-out: the processes stop first, then the
	// namespaces go, then the data dirs.
	t.Cleanup(func() { c.finish() })
	c.inet = c.lab.Internet("198.18.0.0/24")
	for i := range opts.nodes {
		name := nodeNames[i]
		ip := fmt.Sprintf("198.18.0.%d", 11+i)
		lf, err := os.Create(filepath.Join(c.out, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		n := &fnode{c: c, name: name, ns: c.lab.Host(c.inet, name, ip), ip: netip.MustParseAddr(ip),
			dir: filepath.Join(data, name), sock: filepath.Join(data, name+".sock"), log: lf}
		c.nodes = append(c.nodes, n)
	}
	c.writeHosts()
	start := time.Now()
	c.nodes[0].launch()
	c.nodes[0].waitUp()
	for _, n := range c.nodes[1:] {
		n.launch()
	}
	for _, n := range c.nodes[1:] {
		n.waitUp()
	}
	c.waitAllAlive(45 * time.Second)
	c.hist.note("cluster", fmt.Sprintf("%d nodes, seeds as %s, first without join: %v, formed in %v",
		opts.nodes, opts.seeds, opts.firstNoJoin, time.Since(start).Round(time.Millisecond)))
	return c
}

// keptDir makes the artifacts directory of a test under os.TempDir (kept
// when the test fails, removed when it passes).
func keptDir(t *testing.T) string {
	base := filepath.Join(os.TempDir(), "circle-faults")
	os.MkdirAll(base, 0o755)
	name := regexp.MustCompile(`[^A-Za-z0-9_.-]+`).ReplaceAllString(t.Name(), "_")
	dir, err := os.MkdirTemp(base, name+"-"+time.Now().Format("150405")+"-")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// finish stops every process and keeps or removes the artifacts.
func (c *cluster) finish() {
	for _, n := range c.nodes {
		n.kill()
		n.log.Close()
	}
	c.hist.close()
	if c.t.Failed() {
		c.t.Logf("fault-suite artifacts (history.jsonl, <node>.log, verdict.txt) kept in %s", c.out)
		return
	}
	os.RemoveAll(c.out)
}

// verdict appends text to verdict.txt in the artifacts directory.
func (c *cluster) verdict(format string, args ...any) {
	f, err := os.OpenFile(filepath.Join(c.out, "verdict.txt"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	fmt.Fprintf(f, format+"\n", args...)
	f.Close()
}

// node returns the node called name.
func (c *cluster) node(name string) *fnode {
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	c.t.Fatalf("no node %s", name)
	return nil
}

func (n *fnode) addr() netip.Addr {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ip
}

// seed is how other nodes name n in their join lists.
func (n *fnode) seed() string {
	if n.c.opts.seeds == hostSeeds {
		return fmt.Sprintf("%s.%s:%d", n.name, hostDomain, meshPort)
	}
	return fmt.Sprintf("%s:%d", n.addr(), meshPort)
}

// join is n's join list.
func (n *fnode) join() []string {
	var out []string
	for _, o := range n.c.nodes {
		switch {
		case o == n:
		case n.c.opts.firstNoJoin && n != n.c.nodes[0] && o == n.c.nodes[0]:
			out = append(out, o.seed())
		case n.c.opts.firstNoJoin:
		default:
			out = append(out, o.seed())
		}
	}
	return out
}

// writeHosts gives every node's namespace a hosts file with every node's
// current address.
func (c *cluster) writeHosts() {
	entries := map[string]netip.Addr{}
	for _, n := range c.nodes {
		entries[n.name+"."+hostDomain] = n.addr()
	}
	for _, n := range c.nodes {
		n.ns.SetHosts(entries)
	}
}

// launch starts n's process (not waiting for it).
func (n *fnode) launch() {
	t := n.c.t
	t.Helper()
	os.Remove(n.sock)
	n.mu.Lock()
	off := n.offset
	n.mu.Unlock()
	args := []string{"-name", n.name, "-dir", n.dir, "-secret-file", n.c.secret,
		"-listen", fmt.Sprintf("0.0.0.0:%d", meshPort), "-join", strings.Join(n.join(), ","),
		"-replicas", fmt.Sprint(n.c.opts.replicas), "-ctl", n.sock, "-offset", off.String()}
	if h := n.c.opts.tombstoneHorizon; h > 0 {
		args = append(args, "-tombstone-horizon", h.String())
	}
	bin := nodeBin
	if slices.Contains(n.c.opts.nextWire, n.name) {
		bin = nextWireBin
	}
	fmt.Fprintf(n.log, "======== start at %s: %s %s ========\n", time.Now().Format("15:04:05.000"), filepath.Base(bin), strings.Join(args, " "))
	cmd := n.ns.Command(context.Background(), bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stdout, cmd.Stderr = n.log, n.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", n.name, err)
	}
	done := make(chan struct{})
	n.mu.Lock()
	n.cmd, n.done, n.killed = cmd, done, false
	n.mu.Unlock()
	go func() {
		err := cmd.Wait()
		n.mu.Lock()
		if !n.killed {
			n.crashed = fmt.Sprintf("exited by itself at %s: %v", time.Now().Format("15:04:05.000"), err)
		}
		n.mu.Unlock()
		close(done)
	}()
}

// waitUp waits until n's control API answers.
func (n *fnode) waitUp() {
	n.c.t.Helper()
	waitFor(n.c.t, 40*time.Second, n.name+" control API up", func() error {
		n.mu.Lock()
		done := n.done
		n.mu.Unlock()
		select {
		case <-done:
			return fmt.Errorf("process exited; see %s", n.log.Name())
		default:
		}
		var h map[string]any
		return n.get("/health", &h)
	})
}

// kill SIGKILLs n and waits until it is gone.
func (n *fnode) kill() {
	n.mu.Lock()
	cmd, done := n.cmd, n.done
	n.killed = true
	n.cmd = nil
	n.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGKILL)
	<-done
	fmt.Fprintf(n.log, "======== SIGKILL at %s ========\n", time.Now().Format("15:04:05.000"))
}

// running reports whether n's process is up (launched and not killed).
func (n *fnode) running() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.cmd != nil
}

// crashes returns the nodes that exited without being killed.
func (c *cluster) crashes() []string {
	var out []string
	for _, n := range c.nodes {
		n.mu.Lock()
		if n.crashed != "" {
			out = append(out, n.name+": "+n.crashed)
		}
		n.mu.Unlock()
	}
	return out
}

// ---- control API client ----

func (n *fnode) client(timeout time.Duration) *http.Client {
	sock := n.sock
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
			DisableKeepAlives: true,
		},
	}
}

// errNotSent marks a control call that never reached the node (its
// process is down): the operation certainly did not happen.
var errNotSent = errors.New("node not reachable")

// call posts body to path on n's control API and decodes the answer into
// out. Errors wrapping errNotSent mean the request was never delivered.
func (n *fnode) call(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://faultnode"+path, rd)
	if err != nil {
		return err
	}
	resp, err := n.client(25 * time.Second).Do(req)
	if err != nil {
		var op *net.OpError
		if errors.As(err, &op) && op.Op == "dial" {
			return fmt.Errorf("%w: %s: %v", errNotSent, n.name, err)
		}
		return fmt.Errorf("%s %s on %s: %w", method, path, n.name, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s on %s: %d %s", method, path, n.name, resp.StatusCode, bytes.TrimSpace(b))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (n *fnode) get(path string, out any) error        { return n.call("GET", path, nil, out) }
func (n *fnode) post(path string, body, out any) error { return n.call("POST", path, body, out) }

// member is a replicator.Member as the control API reports it.
type member struct {
	Name  string `json:"Name"`
	Addr  string `json:"Addr"`
	State string `json:"State"`
}

// alive returns the names n sees alive (itself included), sorted.
func (n *fnode) alive() ([]string, error) {
	var ms []member
	if err := n.get("/members", &ms); err != nil {
		return nil, err
	}
	var out []string
	for _, m := range ms {
		if m.State == "alive" {
			out = append(out, m.Name)
		}
	}
	sort.Strings(out)
	return out, nil
}

// waitAllAlive waits until every running node sees every running node alive.
func (c *cluster) waitAllAlive(within time.Duration) {
	c.t.Helper()
	var want []string
	for _, n := range c.nodes {
		if n.running() {
			want = append(want, n.name)
		}
	}
	sort.Strings(want)
	waitFor(c.t, within, "every node alive on every node", func() error {
		for _, n := range c.nodes {
			if !n.running() {
				continue
			}
			got, err := n.alive()
			if err != nil {
				return err
			}
			if !slices.Equal(got, want) {
				return fmt.Errorf("%s sees %v alive, want %v", n.name, got, want)
			}
		}
		return nil
	})
}

// waitFor polls cond every 200 ms until it returns nil or within passes.
func waitFor(t *testing.T, within time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
