package meshbench

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/homecircle/circle/integration/netlab"
	"github.com/homecircle/circle/relay"
)

const (
	bigSize   = 4 << 20 // body of a throughput GET
	smallSize = 100     // body of a latency GET
	appPort   = 8080
)

// pathsLab is the topology of TestMeshPaths: R on the internet (TURN
// server and introducer, a child process), A and B behind cone NATs, B's
// router forwarding appPort to B (the baseline only).
type pathsLab struct {
	inet, r, rtA, rtB, a, b *netlab.Node
	relay                   *child
}

func newPathsLab(t *testing.T, secret []byte) *pathsLab {
	t.Helper()
	lab := netlab.New(t)
	l := &pathsLab{}
	l.inet = lab.Internet("198.18.0.0/24")
	l.r = lab.Host(l.inet, "r", "198.18.0.10")
	l.rtA = lab.Router(l.inet, "homeA", "198.18.0.20", "100.64.1.0/24", netlab.Cone)
	l.rtB = lab.Router(l.inet, "homeB", "198.18.0.21", "100.64.2.0/24", netlab.Cone)
	l.a = lab.Host(l.rtA, "a", "100.64.1.2")
	l.b = lab.Host(l.rtB, "b", "100.64.2.2")
	portForward(t, l.rtB, appPort, netip.AddrPortFrom(l.b.Addr, appPort))
	l.relay = startChild(t, l.r, "relay",
		"MESHBENCH_ADDR="+l.r.Addr.String(),
		"MESHBENCH_SECRET="+hex.EncodeToString(secret),
		"MESHBENCH_PEERS="+l.rtA.Addr.String()+","+l.rtB.Addr.String())
	return l
}

func udp(ip netip.Addr, port int) *net.UDPAddr {
	return net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port)))
}

// app is the HTTP app on B: /big answers bigSize bytes, /small smallSize.
func app() http.Handler {
	big := bytes.Repeat([]byte("0123456789abcdef"), bigSize/16)
	small := bytes.Repeat([]byte("x"), smallSize)
	mux := http.NewServeMux()
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(big)))
		w.Write(big)
	})
	mux.HandleFunc("/small", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(small)))
		w.Write(small)
	})
	return mux
}

// config is one way of reaching the app from A.
type config struct {
	name   string
	client *http.Client
	base   string
	// received returns the bytes A received on the intended path to B and
	// fails if any live path to B is of another kind (nil for direct).
	received func() (uint64, error)

	mbps       []float64 // per round
	lat        []float64 // small GET latencies, ms, every round
	latP50     []float64 // per round
	cpuCores   []float64 // per round: CPU seconds (test process + relay) per second of the throughput phase
	cpuPerGB   []float64 // per round: CPU seconds per GiB moved
	relayPerGB []float64 // per round: of which the relay process
}

func httpClient(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:         dial,
		DisableCompression:  true,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     time.Minute,
	}}
}

// meshPaths checks that every live path of m to peer is of kind (via via,
// for relayed) and returns the bytes received on them.
func meshPaths(m *relay.Mesh, peer string, kind relay.PathKind, via string) (uint64, error) {
	var n uint64
	found := false
	for _, p := range m.Paths() {
		if p.Peer != peer {
			continue
		}
		if p.Kind != kind || p.Via != via {
			return 0, fmt.Errorf("%s has a %s path (via %q) to %s, want only %s", m.Name(), p.Kind, p.Via, peer, kind)
		}
		found = true
		n += p.BytesReceived
	}
	if !found {
		return 0, fmt.Errorf("%s has no path to %s", m.Name(), peer)
	}
	return n, nil
}

func get(ctx context.Context, c *http.Client, url string, want int) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	res, err := c.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	n, err := io.Copy(io.Discard, res.Body)
	if err != nil {
		return err
	}
	if res.StatusCode != http.StatusOK || n != int64(want) {
		return fmt.Errorf("GET %s: %s, %d bytes", url, res.Status, n)
	}
	return nil
}

// TestMeshPaths: HTTP throughput (sequential 4 MiB GETs on one keep-alive
// connection) and latency (sequential small GETs) from A to one app on B,
// reached directly (TCP through a port forward), over a punched QUIC path
// and over a TURN relay on R; interleaved rounds with the order rotated
// every round. Prints the ratios to direct.
func TestMeshPaths(t *testing.T) {
	gateBench(t)
	rounds := envInt("MESHBENCH_ROUNDS", 7)
	nBig := envInt("MESHBENCH_BIG", 6)
	nSmall := envInt("MESHBENCH_SMALL", 200)
	secret := newSecret(t)
	start := time.Now()
	l := newPathsLab(t, secret)
	rMesh := udp(l.r.Addr, meshPort)
	rTURN := netip.AddrPortFrom(l.r.Addr, turnPort).String()

	// The app on B: one HTTP server on three listeners.
	srv := &http.Server{Handler: app(), ReadHeaderTimeout: 10 * time.Second}
	t.Cleanup(func() { srv.Close() })
	serve := func(ln net.Listener) { go srv.Serve(ln) }
	serve(l.b.Listen(t, "tcp4", netip.AddrPortFrom(l.b.Addr, appPort).String()))

	// Punched: A1 and B1 know R directly; R introduces them.
	a1 := newMesh(t, relay.MeshConfig{Name: "a", Secret: secret, Conn: l.a.ListenPacket(t, "udp4", udp(l.a.Addr, meshPort).String())})
	b1 := newMesh(t, relay.MeshConfig{Name: "b", Secret: secret, Conn: l.b.ListenPacket(t, "udp4", udp(l.b.Addr, meshPort).String())})
	for _, m := range []*relay.Mesh{a1, b1} {
		if err := m.Connect(ctxFor(t, 10*time.Second), "r", rMesh); err != nil {
			t.Fatalf("%s to r: %v", m.Name(), err)
		}
	}
	var err error
	for i := range 5 {
		if err = a1.PunchVia(ctxFor(t, 10*time.Second), "b", "r"); err == nil {
			break
		}
		t.Logf("punch attempt %d: %v", i+1, err)
		time.Sleep(200 * time.Millisecond) // r may not have registered b's connection yet
	}
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a punched path on both ends", func() bool {
		_, ea := meshPaths(a1, "b", relay.PathPunched, "")
		_, eb := meshPaths(b1, "a", relay.PathPunched, "")
		return ea == nil && eb == nil
	})
	ln1, err := b1.Listen("svc")
	if err != nil {
		t.Fatal(err)
	}
	serve(ln1)

	// Relayed: A2 runs on an allocation on R (MeshConfig.Via); B2 connects
	// to A2's relayed address from its own socket. A2 first writes to B2's
	// public address, which installs the TURN permission (B's router drops
	// that packet); B2's connection attempt then opens B's NAT towards the
	// relayed address.
	alloc, err := relay.Allocate(relay.AllocateConfig{
		Conn:   l.a.ListenPacket(t, "udp4", udp(l.a.Addr, meshPort+100).String()),
		Server: rTURN, Secret: secret, Node: "a",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { alloc.Close() })
	b2Public := udp(l.rtB.Addr, meshPort+1) // cone NAT: the port is preserved
	if _, err := alloc.PacketConn().WriteTo([]byte("permission"), b2Public); err != nil {
		t.Fatal(err)
	}
	a2 := newMesh(t, relay.MeshConfig{Name: "a", Secret: secret, Conn: alloc.PacketConn(), Via: "r"})
	b2 := newMesh(t, relay.MeshConfig{Name: "b", Secret: secret, Conn: l.b.ListenPacket(t, "udp4", udp(l.b.Addr, meshPort+1).String())})
	if err := b2.Connect(ctxFor(t, 10*time.Second), "a", alloc.RelayAddr()); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a relayed path on both ends", func() bool {
		_, ea := meshPaths(a2, "b", relay.PathRelayed, "r")
		_, eb := meshPaths(b2, "a", relay.PathRelayed, "r")
		return ea == nil && eb == nil
	})
	ln2, err := b2.Listen("svc")
	if err != nil {
		t.Fatal(err)
	}
	serve(ln2)
	t.Logf("lab, punch and allocation ready in %v", time.Since(start).Round(time.Millisecond))

	direct := &config{name: "direct", base: "http://" + netip.AddrPortFrom(l.rtB.Addr, appPort).String(),
		client: httpClient(func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			var err error
			l.a.Run(t, func() { c, err = (&net.Dialer{}).DialContext(ctx, network, addr) })
			return c, err
		})}
	punched := &config{name: "punched", base: "http://svc",
		client: httpClient(func(ctx context.Context, _, _ string) (net.Conn, error) {
			return a1.Dial(ctx, "b", "svc")
		}),
		received: func() (uint64, error) { return meshPaths(a1, "b", relay.PathPunched, "") }}
	relayed := &config{name: "relayed", base: "http://svc",
		client: httpClient(func(ctx context.Context, _, _ string) (net.Conn, error) {
			return a2.Dial(ctx, "b", "svc")
		}),
		received: func() (uint64, error) { return meshPaths(a2, "b", relay.PathRelayed, "r") }}
	configs := []*config{direct, punched, relayed}
	ctx := ctxFor(t, 30*time.Minute)

	// Warm up: connections, QUIC congestion windows, TCP.
	for _, c := range configs {
		for range 2 {
			if err := get(ctx, c.client, c.base+"/big", bigSize); err != nil {
				t.Fatalf("%s warm-up: %v", c.name, err)
			}
		}
	}
	var results []string
	results = append(results, measurePaths(t, ctx, l, configs, "no bandwidth limit", rounds, nBig, nSmall)...)
	for _, rate := range uplinks() {
		// B's home upload: everything B sends to the internet leaves
		// through its router's uplink, whatever the path.
		ctx2, cancel := context.WithTimeout(ctx, 20*time.Second)
		out, err := l.rtB.Command(ctx2, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
			"rate", rate, "burst", tbfBurst(rate), "latency", "50ms").CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("tc in %s: %v: %s", l.rtB.Name, err, out)
		}
		for _, c := range configs {
			c.reset()
		}
		results = append(results, measurePaths(t, ctx, l, configs, "B's uplink "+rate+" (tbf)", rounds, nBig, nSmall)...)
	}
	fmt.Println()
	for _, s := range results {
		fmt.Println("meshbench:", s)
	}
	// What carried the traffic (every round checked the mesh paths).
	for _, m := range []*relay.Mesh{a1, a2} {
		for _, p := range m.Paths() {
			if p.Peer == "b" {
				t.Logf("%s(%s) -> b: %s via %q remote %s rtt %v received %d MB", m.Name(), m.Addr(), p.Kind, p.Via,
					p.Remote, p.RTT, p.BytesReceived/1e6)
			}
		}
	}
}

// uplinks are the rates of B's uplink in the scenarios after the first
// (tc syntax; MESHBENCH_UPLINK, comma-separated, default "1gbit,100mbit";
// "off" runs only the unlimited scenario).
func uplinks() []string {
	v := os.Getenv("MESHBENCH_UPLINK")
	switch v {
	case "":
		v = "1gbit,100mbit"
	case "off", "0":
		return nil
	}
	return strings.Split(v, ",")
}

// tbfBurst is the token bucket size for rate: 4 ms at that rate (tbf
// needs at least one timer tick's worth), at least 64 KiB.
func tbfBurst(rate string) string {
	mult := map[string]float64{"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
	for suf, m := range mult {
		if num, ok := strings.CutSuffix(rate, suf); ok {
			if f, err := strconv.ParseFloat(num, 64); err == nil {
				return strconv.Itoa(max(64<<10, int(f*m/8*0.004)))
			}
		}
	}
	return strconv.Itoa(256 << 10)
}

func (c *config) reset() {
	c.mbps, c.lat, c.latP50, c.cpuCores, c.cpuPerGB, c.relayPerGB = nil, nil, nil, nil, nil, nil
}

// measurePaths runs the interleaved rounds over configs (configs[0] is the
// baseline), prints them and a summary, and returns summary lines.
func measurePaths(t *testing.T, ctx context.Context, l *pathsLab, configs []*config, scenario string, rounds, nBig, nSmall int) []string {
	t.Helper()
	base := configs[0]
	fmt.Printf("\nmeshbench, %s: %d rounds, %d x %d MiB GETs and %d small GETs per configuration and round\n",
		scenario, rounds, nBig, bigSize>>20, nSmall)
	fmt.Printf("%-6s %-8s %10s %10s %10s %10s %8s\n", "round", "config", "MB/s", "p50 ms", "p99 ms", "cpu s/GiB", "cores")
	for r := range rounds {
		for i := range configs {
			c := configs[(r+i)%len(configs)]
			var before uint64
			var err error
			if c.received != nil {
				if before, err = c.received(); err != nil {
					t.Fatalf("round %d %s: %v", r, c.name, err)
				}
			}
			prof := startProfile(t, c.name, r)
			cpu0, rcpu0, t0 := selfCPU(), l.relay.cpu(), time.Now()
			for range nBig {
				if err := get(ctx, c.client, c.base+"/big", bigSize); err != nil {
					t.Fatalf("round %d %s: %v", r, c.name, err)
				}
			}
			wall := time.Since(t0)
			rcpu := l.relay.cpu() - rcpu0
			cpu := selfCPU() - cpu0 + rcpu
			prof()
			moved := float64(nBig * bigSize)
			gib := moved / (1 << 30)
			if c.received != nil {
				after, err := c.received()
				if err != nil {
					t.Fatalf("round %d %s: %v", r, c.name, err)
				}
				if after-before < uint64(moved) {
					t.Fatalf("round %d %s: %d bytes on the path for %v bytes of bodies", r, c.name, after-before, moved)
				}
			}
			c.mbps = append(c.mbps, moved/wall.Seconds()/1e6)
			c.cpuCores = append(c.cpuCores, cpu.Seconds()/wall.Seconds())
			c.cpuPerGB = append(c.cpuPerGB, cpu.Seconds()/gib)
			c.relayPerGB = append(c.relayPerGB, rcpu.Seconds()/gib)
			var lat []float64
			for range nSmall {
				t1 := time.Now()
				if err := get(ctx, c.client, c.base+"/small", smallSize); err != nil {
					t.Fatalf("round %d %s: %v", r, c.name, err)
				}
				lat = append(lat, float64(time.Since(t1).Microseconds())/1000)
			}
			c.lat = append(c.lat, lat...)
			c.latP50 = append(c.latP50, pct(lat, 50))
			fmt.Printf("%-6d %-8s %10.1f %10.3f %10.3f %10.2f %8.2f\n", r+1, c.name, c.mbps[r], pct(lat, 50), pct(lat, 99),
				c.cpuPerGB[r], c.cpuCores[r])
		}
	}

	fmt.Printf("\n%-8s %9s %7s %7s %8s %8s %7s %9s %9s %6s\n", "config", "MB/s med", "ratio", "rnd-rat",
		"p50 ms", "p99 ms", "p50 rat", "cpu s/GiB", "relay cpu", "cores")
	ratios := func(c *config, f func(*config) []float64) (float64, float64) {
		var per []float64
		for r := range f(c) {
			per = append(per, f(c)[r]/f(base)[r])
		}
		return median(f(c)) / median(f(base)), median(per)
	}
	var summary []string
	tput := map[string]float64{}
	for _, c := range configs {
		tr, trr := ratios(c, func(c *config) []float64 { return c.mbps })
		tput[c.name] = tr
		lr := pct(c.lat, 50) / pct(base.lat, 50)
		fmt.Printf("%-8s %9.1f %7.3f %7.3f %8.3f %8.3f %7.2f %9.2f %9.2f %6.2f\n", c.name, median(c.mbps), tr, trr,
			pct(c.lat, 50), pct(c.lat, 99), lr, median(c.cpuPerGB), median(c.relayPerGB), median(c.cpuCores))
		if c != base {
			summary = append(summary, fmt.Sprintf("%s: %s/%s throughput %.3f (median per-round ratio %.3f), p50 latency x%.2f",
				scenario, c.name, base.name, tr, trr, lr))
		}
	}
	summary = append(summary, fmt.Sprintf("%s: aim punched >= 0.8 (%s), relayed >= 0.5 (%s)", scenario,
		verdict(tput["punched"] >= 0.8), verdict(tput["relayed"] >= 0.5)))
	return summary
}

// startProfile starts a CPU profile of this process for the throughput
// phase of config name in round r if MESHBENCH_PROFILE is "name:file"
// (first round only, r == 0 of the first scenario); it returns the stop
// function.
func startProfile(t *testing.T, name string, r int) func() {
	spec := os.Getenv("MESHBENCH_PROFILE")
	cfg, file, ok := strings.Cut(spec, ":")
	if !ok || cfg != name || r != 0 || profiled[name] {
		return func() {}
	}
	profiled[name] = true
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		t.Fatal(err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }
}

var profiled = map[string]bool{}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
}
