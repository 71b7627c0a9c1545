package meshbench

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/homecircle/circle/caddymodule/circlenode"
	"github.com/homecircle/circle/identity"
	"github.com/homecircle/circle/integration/netlab"
	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// nodeMain runs in a node's namespace: a mesh on MESHBENCH_ADDR:MESHBENCH_PORT
// named MESHBENCH_NAME under a relay.Manager (and, with MESHBENCH_TURN=1, a
// TURN server on :3478 that relays to the manager's PeerIPs), an "echo"
// service, and a prober that opens an echo stream to every member until one
// round trip works. It prints
//
//	ready <unix ns>                     once the mesh and manager run
//	reach <peer> <unix ns> <paths>      first echo round trip to peer
//	status <json>                       answer to "status"
//
// and reads commands on stdin: "members name=host:port ..." (the circle as
// the membership layer would report it; initially MESHBENCH_MEMBERS),
// "status". It exits when stdin closes (or after an hour). With
// MESHBENCH_GOSSIP=1 the node is a circlenode.Node, as caddymodule runs it:
// the members come from its replicator (memberlist over the mesh's
// Transport, joined through MESHBENCH_SEED, name/host:port), and "members"
// is ignored.
func nodeMain() error {
	secret, err := hex.DecodeString(os.Getenv("MESHBENCH_SECRET"))
	if err != nil {
		return err
	}
	name := os.Getenv("MESHBENCH_NAME")
	ip := os.Getenv("MESHBENCH_ADDR")
	port := os.Getenv("MESHBENCH_PORT")
	var logger *slog.Logger
	if dir := os.Getenv("MESHBENCH_LOGDIR"); dir != "" {
		f, err := os.Create(fmt.Sprintf("%s/%s.log", dir, name))
		if err != nil {
			return err
		}
		defer f.Close()
		logger = slog.New(slog.NewTextHandler(f, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	var out sync.Mutex
	say := func(format string, args ...any) {
		out.Lock()
		defer out.Unlock()
		fmt.Printf(format+"\n", args...)
	}
	var members atomic.Pointer[[]relay.Member]
	var repl atomic.Pointer[replicator.Node]
	gossip := os.Getenv("MESHBENCH_GOSSIP") == "1"
	memberList := func() []relay.Member {
		if !gossip {
			return *members.Load()
		}
		n := repl.Load()
		if n == nil {
			return nil
		}
		// As circlenode does: the replicator's alive and suspect members.
		var out []relay.Member
		for _, m := range n.Members() {
			if m.Name != name && (m.State == replicator.StateAlive || m.State == replicator.StateSuspect) {
				out = append(out, relay.Member{Name: m.Name, Addr: m.Addr})
			}
		}
		return out
	}
	setMembers := func(spec string) {
		var ms []relay.Member
		for _, f := range strings.Fields(spec) {
			if n, a, ok := strings.Cut(f, "="); ok && n != name {
				ms = append(ms, relay.Member{Name: n, Addr: a})
			}
		}
		members.Store(&ms)
	}
	setMembers(os.Getenv("MESHBENCH_MEMBERS"))

	var mesh *relay.Mesh
	var mgr *relay.Manager
	if gossip {
		// The node as caddymodule runs it (circlenode): mesh, TURN server,
		// replicator (memberlist over the mesh, joining through the seed),
		// path manager over the replicator's members, identity.
		dir, err := os.MkdirTemp("", "meshbench-"+name+"-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		rc := replicator.DefaultConfig()
		rc.Name, rc.DataDir, rc.Secret = name, dir, secret
		rc.BindAddr = net.JoinHostPort(ip, port)
		if seed := os.Getenv("MESHBENCH_SEED"); seed != "" {
			rc.Join = []string{seed}
		}
		circlenode.IdentityBuckets(&rc)
		if logger != nil {
			rc.Logger = logger
		}
		cfg := circlenode.Config{
			Replicator: rc,
			Identity:   identity.Config{Domain: "circle.test", Secret: secret, Logger: logger},
			Listen:     net.JoinHostPort(ip, port),
			Logger:     logger,
		}
		if os.Getenv("MESHBENCH_TURN") == "1" {
			cfg.Relay = net.JoinHostPort(ip, strconv.Itoa(turnPort))
		}
		node, err := circlenode.Open(cfg)
		if err != nil {
			return err
		}
		defer node.Close()
		repl.Store(node.Replicator())
		mesh, mgr = node.Mesh(), node.Manager()
	} else {
		mc, err := net.ListenPacket("udp4", net.JoinHostPort(ip, port))
		if err != nil {
			return err
		}
		cfg := relay.MeshConfig{Name: name, Secret: secret, Conn: mc, Logger: logger}
		var tc net.PacketConn
		if os.Getenv("MESHBENCH_TURN") == "1" {
			if tc, err = net.ListenPacket("udp4", net.JoinHostPort(ip, strconv.Itoa(turnPort))); err != nil {
				return err
			}
			cfg.TURN = tc.LocalAddr().String()
		}
		if mesh, err = relay.NewMesh(cfg); err != nil {
			return err
		}
		defer mesh.Close()
		if mgr, err = relay.NewManager(relay.ManagerConfig{
			Mesh: mesh, Secret: secret, Logger: logger,
			Members: memberList,
		}); err != nil {
			return err
		}
		defer mgr.Close()
		if tc != nil {
			srv, err := relay.NewServer(relay.ServerConfig{
				Secret: secret, PacketConn: tc, RelayAddress: net.ParseIP(ip), Peers: mgr.PeerIPs, Logger: logger,
			})
			if err != nil {
				return err
			}
			defer srv.Close()
		}
	}
	mesh.Handle("echo", func(c net.Conn) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.Copy(c, c)
	})
	say("ready %d", time.Now().UnixNano())

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	wg.Add(1)
	go func() {
		defer wg.Done()
		probe(ctx, mesh, memberList, say)
	}()

	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(os.Stdin)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	deadline := time.After(time.Hour)
	for {
		select {
		case <-deadline:
			return nil
		case line, ok := <-lines:
			if !ok {
				return nil
			}
			switch cmd, rest, _ := strings.Cut(line, " "); cmd {
			case "members":
				setMembers(rest)
			case "status":
				b, _ := json.Marshal(mgr.Status())
				say("status %s", b)
			}
		}
	}
}

// probe opens an echo stream to every member not reached yet, every 20 ms
// (one attempt per member at a time, 1 s each), and reports the first
// round trip that works. A member that leaves and comes back is probed
// again.
func probe(ctx context.Context, mesh *relay.Mesh, members func() []relay.Member, say func(string, ...any)) {
	var mu sync.Mutex
	reached, busy := map[string]bool{}, map[string]bool{}
	var wg sync.WaitGroup
	defer wg.Wait()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ms := members()
		mu.Lock()
		for n := range reached {
			if !slices.ContainsFunc(ms, func(m relay.Member) bool { return m.Name == n }) {
				delete(reached, n)
			}
		}
		for _, m := range ms {
			if reached[m.Name] || busy[m.Name] {
				continue
			}
			busy[m.Name] = true
			wg.Add(1)
			go func(peer string) {
				defer wg.Done()
				ok := echoOnce(ctx, mesh, peer)
				at := time.Now().UnixNano()
				mu.Lock()
				busy[peer] = false
				if ok && !reached[peer] {
					reached[peer] = true
					var kinds []string
					for _, p := range mesh.Paths() {
						if p.Peer == peer {
							k := string(p.Kind)
							if p.Via != "" {
								k += ":" + p.Via
							}
							kinds = append(kinds, k)
						}
					}
					say("reach %s %d %s", peer, at, strings.Join(kinds, ","))
				}
				mu.Unlock()
			}(m.Name)
		}
		mu.Unlock()
	}
}

func echoOnce(ctx context.Context, mesh *relay.Mesh, peer string) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	c, err := mesh.Dial(ctx, peer, "echo")
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte{1}); err != nil {
		return false
	}
	var b [1]byte
	_, err = io.ReadFull(c, b[:])
	return err == nil
}

// node is a node child as the test sees it.
type node struct {
	*child
	name  string
	addr  string // mesh address host:port
	start time.Time

	mu     sync.Mutex
	reach  map[string]time.Time // peer -> first echo round trip
	kinds  map[string]string    // peer -> its paths then
	status chan string
}

func startNode(t *testing.T, n *netlab.Node, secret []byte, name string, port int, turn bool, members, seed string) *node {
	t.Helper()
	env := []string{
		"MESHBENCH_NAME=" + name, "MESHBENCH_ADDR=" + n.Addr.String(), "MESHBENCH_PORT=" + strconv.Itoa(port),
		"MESHBENCH_SECRET=" + hex.EncodeToString(secret), "MESHBENCH_MEMBERS=" + members,
	}
	if seed != "" || members == "" {
		env = append(env, "MESHBENCH_GOSSIP=1", "MESHBENCH_SEED="+seed)
	}
	if turn {
		env = append(env, "MESHBENCH_TURN=1")
	}
	c := startChild(t, n, "node", env...)
	ns, err := strconv.ParseInt(c.ready, 10, 64)
	if err != nil {
		t.Fatalf("%s: ready line %q", name, c.ready)
	}
	nd := &node{child: c, name: name, addr: netip.AddrPortFrom(n.Addr, uint16(port)).String(),
		start: time.Unix(0, ns), reach: map[string]time.Time{}, kinds: map[string]string{},
		status: make(chan string, 1)}
	go func() {
		for line := range c.lines {
			f := strings.Fields(line)
			switch {
			case len(f) >= 3 && f[0] == "reach":
				at, _ := strconv.ParseInt(f[2], 10, 64)
				nd.mu.Lock()
				nd.reach[f[1]] = time.Unix(0, at)
				if len(f) > 3 {
					nd.kinds[f[1]] = f[3]
				}
				nd.mu.Unlock()
			case len(f) >= 2 && f[0] == "status":
				select {
				case nd.status <- strings.TrimPrefix(line, "status "):
				default:
				}
			}
		}
	}()
	return nd
}

// reached returns when nd first reached peer (zero if not yet) and over
// which paths.
func (nd *node) reached(peer string) (time.Time, string) {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	return nd.reach[peer], nd.kinds[peer]
}

// getStatus asks the node for its Manager status.
func (nd *node) getStatus(t *testing.T) relay.ManagerStatus {
	t.Helper()
	var st relay.ManagerStatus
	if err := nd.send("status"); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-nd.status:
		if err := json.Unmarshal([]byte(s), &st); err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no status", nd.name)
	}
	return st
}

func memberSpec(nodes ...*node) string {
	var s []string
	for _, n := range nodes {
		s = append(s, n.name+"="+n.addr)
	}
	return strings.Join(s, " ")
}

// waitReach waits (at most d) until every observer reached every target
// other than itself; it returns false on timeout.
func waitReach(observers, targets []*node, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		all := true
		for _, o := range observers {
			for _, x := range targets {
				if o != x {
					if at, _ := o.reached(x.name); at.IsZero() {
						all = false
					}
				}
			}
		}
		if all {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMeshJoin: R (reachable, TURN server), A and B (cone NATs) run under
// relay.Managers; a new node behind a cone NAT, then one behind a
// symmetric NAT, starts (a fresh process, name and port every run, NAT
// mappings flushed) and is announced to the others as a member at once;
// measured: time from the new node's mesh running until every other node
// has opened an echo stream to it (and it to every other node), median
// over the runs.
//
// Two ways the others learn about the new node, each in its own lab:
// "announced" tells every node the new member list at once (the path
// policy alone), "gossip" runs the replicator (memberlist over the mesh)
// on every node as caddymodule does, the new node joining through R, so
// the time includes membership gossip. MESHBENCH_JOIN_MODES selects
// (default "announced,gossip"), MESHBENCH_JOIN_RUNS sets the runs per NAT
// kind (default 5), MESHBENCH_JOIN_LIMIT the bound per run in seconds
// (default 60).
func TestMeshJoin(t *testing.T) {
	gateBench(t)
	modes := os.Getenv("MESHBENCH_JOIN_MODES")
	if modes == "" {
		modes = "announced,gossip"
	}
	for _, mode := range strings.Split(modes, ",") {
		if mode != "announced" && mode != "gossip" {
			t.Fatalf("unknown join mode %q", mode)
		}
		t.Run(mode, func(t *testing.T) { joinBench(t, mode == "gossip") })
	}
}

func joinBench(t *testing.T, gossip bool) {
	runs := envInt("MESHBENCH_JOIN_RUNS", 5)
	limit := time.Duration(envInt("MESHBENCH_JOIN_LIMIT", 60)) * time.Second
	secret := newSecret(t)
	mode := "announced"
	if gossip {
		mode = "gossip"
	}
	lab := netlab.New(t)
	inet := lab.Internet("198.18.0.0/24")
	hr := lab.Host(inet, "r", "198.18.0.10")
	rtA := lab.Router(inet, "homeA", "198.18.0.20", "100.64.1.0/24", netlab.Cone)
	rtB := lab.Router(inet, "homeB", "198.18.0.21", "100.64.2.0/24", netlab.Cone)
	rtD := lab.Router(inet, "homeD", "198.18.0.22", "100.64.4.0/24", netlab.Cone)
	rtE := lab.Router(inet, "homeE", "198.18.0.30", "100.64.3.0/24", netlab.Symmetric)
	ha := lab.Host(rtA, "a", "100.64.1.2")
	hb := lab.Host(rtB, "b", "100.64.2.2")
	hd := lab.Host(rtD, "d", "100.64.4.2")
	he := lab.Host(rtE, "e", "100.64.3.2")

	spec := "r=198.18.0.10:4000 a=100.64.1.2:4000 b=100.64.2.2:4000"
	members, seed := spec, ""
	if gossip {
		members, seed = "", "r/198.18.0.10:4000"
	}
	t0 := time.Now()
	r := startNode(t, hr, secret, "r", meshPort, true, members, "")
	a := startNode(t, ha, secret, "a", meshPort, false, members, seed)
	b := startNode(t, hb, secret, "b", meshPort, false, members, seed)
	core := []*node{r, a, b}
	if !waitReach(core, core, limit) {
		for _, n := range core {
			t.Logf("%s: %+v", n.name, n.getStatus(t))
		}
		t.Fatalf("r, a and b did not reach each other within %v", limit)
	}
	formed := time.Since(t0)
	fmt.Printf("\nmeshjoin (%s): r, a, b started together: all reach each other after %v\n", mode, formed.Round(time.Millisecond))
	for _, n := range core {
		for _, x := range core {
			if x != n {
				_, k := n.reached(x.name)
				fmt.Printf("  %s -> %s: %s\n", n.name, x.name, k)
			}
		}
	}

	type result struct {
		kind        string
		all, joiner []float64 // seconds: every other node reached it / it reached every other node
		failed      int
		paths       map[string]int
	}
	var results []*result
	for _, tc := range []struct {
		kind   string
		host   *netlab.Node
		router *netlab.Node
		prefix string
	}{{"cone", hd, rtD, "d"}, {"symmetric", he, rtE, "e"}} {
		res := &result{kind: tc.kind, paths: map[string]int{}}
		results = append(results, res)
		fmt.Printf("\nmeshjoin (%s): new node behind a %s NAT, %d runs\n", mode, tc.kind, runs)
		for run := 1; run <= runs; run++ {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			out, err := tc.router.Command(ctx, "conntrack", "-F").CombinedOutput()
			cancel()
			if err != nil {
				t.Fatalf("conntrack -F in %s: %v: %s", tc.router.Name, err, out)
			}
			name := fmt.Sprintf("%s%d", tc.prefix, run)
			port := meshPort + 100 + run
			all := spec + " " + name + "=" + netip.AddrPortFrom(tc.host.Addr, uint16(port)).String()
			if gossip {
				all = ""
			}
			n := startNode(t, tc.host, secret, name, port, false, all, seed)
			for _, c := range core {
				if err := c.send("members " + all); !gossip && err != nil {
					t.Fatal(err)
				}
			}
			ok := waitReach(core, []*node{n}, limit) && waitReach([]*node{n}, core, limit)
			var line []string
			var last, lastJ time.Time
			for _, c := range core {
				at, k := c.reached(name)
				line = append(line, fmt.Sprintf("%s %v (%s)", c.name, at.Sub(n.start).Round(time.Millisecond), k))
				if at.After(last) {
					last = at
				}
				res.paths[c.name+" "+strings.Split(k, ",")[0]]++
				at, _ = n.reached(c.name)
				if at.After(lastJ) {
					lastJ = at
				}
			}
			if !ok {
				res.failed++
				st := n.getStatus(t)
				fmt.Printf("  run %d: NOT reachable from all within %v: %s; status %+v\n", run, limit, strings.Join(line, ", "), st)
			} else {
				res.all = append(res.all, last.Sub(n.start).Seconds())
				res.joiner = append(res.joiner, lastJ.Sub(n.start).Seconds())
				st := n.getStatus(t)
				fmt.Printf("  run %d: all reach %s after %v (%s); %s reaches all after %v; its NAT: %s\n", run, name,
					last.Sub(n.start).Round(time.Millisecond), strings.Join(line, ", "), name,
					lastJ.Sub(n.start).Round(time.Millisecond), st.NAT)
			}
			n.stop()
			for _, c := range core {
				if err := c.send("members " + spec); !gossip && err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	fmt.Printf("\nmeshjoin (%s):\n%-10s %5s %8s %12s %12s %12s %14s\n", mode, "new node", "runs", "failed", "all->it med", "all->it min", "all->it max", "it->all med")
	for _, res := range results {
		if len(res.all) == 0 {
			fmt.Printf("%-10s %5d %8d %12s %12s %12s %14s\n", res.kind, runs, res.failed, "-", "-", "-", "-")
			continue
		}
		fmt.Printf("%-10s %5d %8d %11.2fs %11.2fs %11.2fs %13.2fs\n", res.kind, runs, res.failed,
			median(res.all), sorted(res.all)[0], pct(res.all, 100), median(res.joiner))
	}
	for _, res := range results {
		var ks []string
		for k, v := range res.paths {
			ks = append(ks, fmt.Sprintf("%s x%d", k, v))
		}
		slices.Sort(ks)
		fmt.Printf("meshjoin (%s): %s: paths to the new node when first reached: %s\n", mode, res.kind, strings.Join(ks, ", "))
	}
}
