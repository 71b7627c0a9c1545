package integration

// Acceptance tests of issue 4 (the mesh: hole punching, TURN relays, apps
// reachable from every node), on the NAT harness (natharness_test.go): real
// caddy processes in network namespaces, r reachable on the simulated
// internet with `relay :3478`, a and b behind cone NATs, c behind a
// symmetric NAT, no port forwards.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/homecircle/circle/relay"
)

// acceptancePaths is what issue 4 asks `caddy circle status` to report on
// the full topology: a and b punched to each other, c relayed through r's
// TURN server to both, everyone direct to r (reachable).
var acceptancePaths = map[string]map[string]string{
	"a": {"r": "direct", "b": "punched", "c": "relayed via r"},
	"b": {"r": "direct", "a": "punched", "c": "relayed via r"},
	"c": {"r": "direct", "a": "relayed via r", "b": "relayed via r"},
	"r": {"a": "direct", "b": "direct", "c": "direct"},
}

// TestNATCircleForms: all four nodes form one circle over the mesh, with
// exactly the paths the issue asks for, reported by the admin API and by
// `caddy circle status`.
func TestNATCircleForms(t *testing.T) {
	l := newNATLab(t, natSpec{})
	l.start()
	took := l.waitPaths(45*time.Second, acceptancePaths)
	t.Logf("paths as required %v after the circle formed", took.Round(time.Millisecond))

	for viewer, peers := range acceptancePaths {
		n := l.nodes[viewer]
		st := n.mustStatus()
		if st.Mesh == nil {
			t.Fatalf("%s: no mesh section in the status", viewer)
		}
		t.Logf("%s: nat %q public %q relays %v", viewer, st.Mesh.NAT, st.Mesh.Public, st.Mesh.Relays)
		for peer := range peers {
			p := st.peer(peer)
			if p == nil {
				t.Fatalf("%s: no mesh peer %s", viewer, peer)
			}
			if p.Since == "" {
				t.Errorf("%s->%s: no since", viewer, peer)
			}
			if p.BytesSent == 0 || p.BytesReceived == 0 {
				t.Errorf("%s->%s: bytes sent %d received %d, want traffic both ways", viewer, peer, p.BytesSent, p.BytesReceived)
			}
			if p.RTTms <= 0 {
				t.Errorf("%s->%s: rtt_ms %v, want a measured round trip", viewer, peer, p.RTTms)
			}
		}
		// What the NAT probe found out.
		switch viewer {
		case "r":
			if st.Mesh.NAT != "none" {
				t.Errorf("r: nat %q, want none (reachable)", st.Mesh.NAT)
			}
		case "a", "b":
			if st.Mesh.NAT != "cone" {
				t.Errorf("%s: nat %q, want cone", viewer, st.Mesh.NAT)
			}
		case "c":
			if st.Mesh.NAT != "symmetric" {
				t.Errorf("c: nat %q, want symmetric", st.Mesh.NAT)
			}
		}

		// The same through `caddy circle status`: a line per peer with
		// its path, round-trip time and since when.
		out, err := n.cli("", "status")
		if err != nil {
			t.Fatalf("caddy circle status on %s: %v\n%s", viewer, err, out)
		}
		if viewer == "c" {
			t.Logf("caddy circle status on c:\n%s", out)
		}
		for peer, path := range peers {
			if !hasPeerLine(out, peer, path) {
				t.Errorf("caddy circle status on %s: no line with %q, %q, an RTT in ms and a since time:\n%s", viewer, peer, path, out)
			}
		}
	}
	// c holds an allocation on r's TURN server.
	st := l.nodes["c"].mustStatus()
	onR := false
	for _, a := range st.Mesh.Allocations {
		onR = onR || a.Relay == "r"
	}
	if !onR {
		t.Errorf("c: allocations %+v, want one on r", st.Mesh.Allocations)
	}
	for _, n := range []string{"a", "b", "c"} {
		if got := l.nodes[n].mustStatus().Mesh.Relays["r"]; got != fmt.Sprintf("198.18.0.10:%d", natTURN) {
			t.Errorf("%s knows r's relay at %q, want 198.18.0.10:%d", n, got, natTURN)
		}
	}
}

// peerLine matches what a peer's line in `caddy circle status` must
// carry besides its name and path: a round-trip time and a since time.
var peerLine = regexp.MustCompile(`\d ms\b.*\d{4}-\d\d-\d\d \d\d:\d\d`)

// hasPeerLine reports whether a line of out starts with the word name and
// has path, a round-trip time and a since time.
func hasPeerLine(out, name, path string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && f[0] == name && strings.Contains(line, " "+path+" ") && peerLine.MatchString(line) {
			return true
		}
	}
	return false
}

// TestNATLoginAndServiceAcrossNAT: an account created on c (behind the
// symmetric NAT) logs in at r's public address, and with that cookie a
// client on the internet opens an app hosted only on b (behind NAT, bound
// to b's loopback) through r's gate, with identity headers.
func TestNATLoginAndServiceAcrossNAT(t *testing.T) {
	l := newNATLab(t, natSpec{whoami: true})
	l.start()
	r, c := l.nodes["r"], l.nodes["c"]

	// The account, created on c with the CLI, in c's namespace.
	out, err := c.cli("correct horse battery\n", "user", "add", "--username", "carol",
		"--groups", "family,friends", "--name", "Carol", "--email", "carol@example.com", "--password-stdin")
	if err != nil {
		t.Fatalf("caddy circle user add on c: %v\n%s", err, out)
	}
	took := r.waitAccounts(20*time.Second, 1)
	t.Logf("carol reached r %v after creation on c", took.Round(time.Millisecond))

	web := r.publicWeb()
	cookie := loginOnce(t, web, "r's public address", "carol", "correct horse battery")

	// Without a session the gate refuses (the app is behind it).
	status, _, _, err := web.get(webURL("app", "/whoami"), nil, map[string]string{"Accept": "application/json"})
	if err != nil {
		t.Fatal(err)
	}
	if status == http.StatusOK {
		t.Fatalf("app without a session: status 200")
	}
	if _, hits := l.app.lastHeaders(); hits != 0 {
		t.Fatalf("the app was reached without a session (%d hits)", hits)
	}

	// With the cookie, through r, over the mesh to b; forged identity
	// headers must not get through.
	var body string
	waitEvery(t, 30*time.Second, 500*time.Millisecond, "app on b through r", func() error {
		st, b, _, err := web.get(webURL("app", "/whoami"), cookie, map[string]string{
			"Accept": "application/json", "Remote-User": "mallory", "Remote-Groups": "admins",
		})
		if err != nil {
			return err
		}
		if st != http.StatusOK {
			return fmt.Errorf("status %d: %s", st, b)
		}
		body = b
		return nil
	})
	var got map[string]string
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("app body %q: %v", body, err)
	}
	if got["app"] != "whoami on b" || got["user"] != "carol" {
		t.Fatalf("app answered %v, want b's app seeing carol", got)
	}
	h, _ := l.app.lastHeaders()
	if v := h.Values("Remote-User"); len(v) != 1 || v[0] != "carol" {
		t.Errorf("app saw Remote-User %v, want exactly [carol]", v)
	}
	if g := h.Get("Remote-Groups"); strings.Contains(g, "admins") || !strings.Contains(g, "family") {
		t.Errorf("app saw Remote-Groups %q, want carol's groups only", g)
	}
	if h.Get("Remote-Email") != "carol@example.com" {
		t.Errorf("app saw Remote-Email %q", h.Get("Remote-Email"))
	}
	if strings.Contains(strings.Join(h.Values("Cookie"), ";"), "circle_session") {
		t.Errorf("the circle session cookie reached the app: %v", h.Values("Cookie"))
	}
	// The request went r -> b over the mesh: r has a path to b.
	if st := r.mustStatus(); !st.connected("b") {
		t.Errorf("r has no mesh path to b: %s", st.meshSummary())
	}
}

// TestNATRelayDown: with r killed, a and b keep replicating over their
// punched path; c, which reached them only through r's relay, is cut off
// and shown so; when r returns, c catches up on what it missed.
func TestNATRelayDown(t *testing.T) {
	l := newNATLab(t, natSpec{})
	l.start()
	r, a, b, c := l.nodes["r"], l.nodes["a"], l.nodes["b"], l.nodes["c"]
	l.waitPaths(45*time.Second, acceptancePaths)
	if err := a.addUser("ana", "correct horse battery"); err != nil {
		t.Fatal(err)
	}
	c.waitAccounts(20*time.Second, 1)

	killed := time.Now()
	r.kill()

	// c is reported cut off (dead, or no path), on a and b and on c.
	waitEvery(t, 45*time.Second, 250*time.Millisecond, "c reported cut off", func() error {
		for _, pair := range [][2]*natNode{{a, c}, {b, c}, {c, a}, {c, b}} {
			st, err := pair[0].status()
			if err != nil {
				return err
			}
			if !st.cutOff(pair[1].name) {
				return fmt.Errorf("%s", st.meshSummary())
			}
		}
		return nil
	})
	t.Logf("c reported cut off %v after r was killed", time.Since(killed).Round(time.Millisecond))
	for _, n := range []*natNode{a, b, c} {
		t.Logf("r down: %s", n.mustStatus().meshSummary())
	}

	// a and b still talk over their punched path, and replicate.
	l.waitPaths(20*time.Second, map[string]map[string]string{"a": {"b": "punched"}, "b": {"a": "punched"}})
	if err := a.addUser("bob", "correct horse battery"); err != nil {
		t.Fatalf("write on a with r down: %v", err)
	}
	b.waitAccounts(10*time.Second, 2)
	loginOnce(t, b.localWeb(), "b", "bob", "correct horse battery")
	if st := c.mustStatus(); st.Accounts != 1 {
		t.Fatalf("c, cut off, has %d accounts, want 1", st.Accounts)
	}

	// r returns: c catches up, and the circle is whole again.
	back := time.Now()
	r.restart()
	c.waitAccounts(60*time.Second, 2)
	t.Logf("c caught up %v after r was restarted", time.Since(back).Round(time.Millisecond))
	loginOnce(t, c.localWeb(), "c", "bob", "correct horse battery")
	// c's relayed paths need a new allocation on the new r (the old one
	// went with r's old process; c allocates anew within a second of
	// reaching it) and a and b must see c alive again through memberlist.
	// The issue sets no bound here; about 36 s is seen, most of it
	// membership, and this bound leaves room for a loaded CI machine.
	l.waitPaths(90*time.Second, acceptancePaths)
	t.Logf("all paths as required %v after r was restarted", time.Since(back).Round(time.Millisecond))
}

// TestNATRelayFailover: with two relays, killing the one c's paths go
// through moves them to the other, and replication to c goes on.
func TestNATRelayFailover(t *testing.T) {
	l := newNATLab(t, natSpec{r2: true})
	l.start()
	a, c := l.nodes["a"], l.nodes["c"]

	// c reaches a and b through one relay (either).
	var via string
	waitEvery(t, 60*time.Second, 250*time.Millisecond, "c relayed to a and b", func() error {
		st, err := c.status()
		if err != nil {
			return err
		}
		pa, pb := st.path("a"), st.path("b")
		if !strings.HasPrefix(pa, "relayed via ") || !strings.HasPrefix(pb, "relayed via ") {
			return fmt.Errorf("%s", st.meshSummary())
		}
		via = strings.TrimPrefix(pa, "relayed via ")
		return nil
	})
	if via != "r" && via != "r2" {
		t.Fatalf("c relayed via %q", via)
	}
	other := map[string]string{"r": "r2", "r2": "r"}[via]
	if err := a.addUser("ana", "correct horse battery"); err != nil {
		t.Fatal(err)
	}
	c.waitAccounts(20*time.Second, 1)
	t.Logf("c relays via %s; killing it", via)

	l.nodes[via].kill()
	want := "relayed via " + other
	took := l.waitPaths(60*time.Second, map[string]map[string]string{
		"c": {"a": want, "b": want, other: "direct"},
		"a": {"c": want},
		"b": {"c": want},
	})
	t.Logf("c's paths moved to %s %v after %s was killed", other, took.Round(time.Millisecond), via)

	if err := a.addUser("bob", "correct horse battery"); err != nil {
		t.Fatalf("write on a after the failover: %v", err)
	}
	took = c.waitAccounts(20*time.Second, 2)
	t.Logf("a write on a reached c %v later", took.Round(time.Millisecond))
	loginOnce(t, c.localWeb(), "c", "bob", "correct horse battery")
}

// TestNATAttacker: a host on the internet without the circle secret can
// neither allocate on r's TURN server nor join the circle; and even with a
// valid allocation the relay does not reach r's loopback or LAN.
func TestNATAttacker(t *testing.T) {
	const lanAddr = "100.64.9.1" // r's "LAN": a veth pair inside r
	var loEcho, lanEcho net.PacketConn
	l := newNATLab(t, natSpec{members: []string{"a"}, beforeStart: func(l *natLab) {
		r := l.ns["r"]
		shIn(l.t, "ip", "-n", r.NS, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
		shIn(l.t, "ip", "-n", r.NS, "addr", "add", lanAddr+"/24", "dev", "lan0")
		shIn(l.t, "ip", "-n", r.NS, "link", "set", "lan0", "up")
		shIn(l.t, "ip", "-n", r.NS, "link", "set", "lan1", "up")
		loEcho = r.ListenPacket(l.t, "udp4", "127.0.0.1:0")
		lanEcho = r.ListenPacket(l.t, "udp4", lanAddr+":0")
	}})
	for _, pc := range []net.PacketConn{loEcho, lanEcho} {
		go udpEcho(pc)
	}
	// A node on the internet (host x) with another secret, joining r.
	rogue := l.addNode("x", false, newSecretFile(t))
	rogue.name, rogue.manual = "mallory", true
	rogue.join = []string{fmt.Sprintf("198.18.0.10:%d", natMesh)}
	l.start()
	r := l.nodes["r"]
	if err := r.addUser("ana", "correct horse battery"); err != nil {
		t.Fatal(err)
	}
	turnAddr := fmt.Sprintf("198.18.0.10:%d", natTURN)
	x := l.ns["x"]

	// With the circle's secret an allocation works and relays to a circle
	// peer's public address (a's router, with a port opened for the
	// purpose: the control), but neither to r's loopback nor to r's LAN,
	// although both answer from inside r.
	alloc, err := relay.Allocate(relay.AllocateConfig{
		Conn: x.ListenPacket(t, "udp4", natClient+":0"), Server: turnAddr, Secret: l.secret, Node: "x",
	})
	if err != nil {
		t.Fatalf("allocation with the circle secret: %v", err)
	}
	defer alloc.Close()
	homeA := l.ns["homeA"]
	peerEcho := homeA.ListenPacket(t, "udp4", homeA.Addr.String()+":0")
	go udpEcho(peerEcho)
	port := fmt.Sprint(peerEcho.LocalAddr().(*net.UDPAddr).Port)
	shIn(t, "ip", "netns", "exec", homeA.NS, "iptables", "-w", "-I", "INPUT", "1", "-i", "eth0", "-p", "udp", "--dport", port, "-j", "ACCEPT")
	waitEvery(t, 10*time.Second, 200*time.Millisecond, "relaying to a circle peer's address", func() error {
		return udpRoundTrip(alloc.PacketConn(), peerEcho.LocalAddr(), time.Second)
	})
	for _, target := range []net.PacketConn{loEcho, lanEcho} {
		addr := target.LocalAddr().String()
		var direct net.PacketConn
		r.ns.Run(t, func() { direct, err = net.ListenPacket("udp4", "127.0.0.1:0") })
		if err != nil {
			t.Fatal(err)
		}
		if err := udpRoundTrip(direct, target.LocalAddr(), time.Second); err != nil {
			t.Fatalf("echo at %s does not answer from inside r: %v", addr, err)
		}
		direct.Close()
		if err := udpRoundTrip(alloc.PacketConn(), target.LocalAddr(), 2*time.Second); err == nil {
			t.Errorf("r's relay reached %s for an allocation", addr)
		}
	}

	// Without the secret: refused.
	wrong := make([]byte, 32)
	copy(wrong, "not the circle secret, not at all")
	_, err = relay.Allocate(relay.AllocateConfig{
		Conn: x.ListenPacket(t, "udp4", natClient+":0"), Server: turnAddr, Secret: wrong, Node: "mallory",
	})
	if !errors.Is(err, relay.ErrAuth) {
		t.Errorf("allocation with another secret: err %v, want relay.ErrAuth", err)
	}

	// A caddy node with another secret joining r never becomes a member
	// and gets no account.
	rogue.launch()
	rogue.waitUp()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, n := range []*natNode{r, l.nodes["a"]} {
			st := n.mustStatus()
			if st.state("mallory") != "" || st.peer("mallory") != nil {
				t.Fatalf("mallory is a member on %s: %s", n.name, st.meshSummary())
			}
		}
		st := rogue.mustStatus()
		if st.Accounts != 0 || len(st.alive()) != 1 {
			t.Fatalf("mallory sees %v and %d accounts", st.alive(), st.Accounts)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if _, status, err := rogue.localWeb().login("ana", "correct horse battery"); err == nil {
		t.Fatalf("ana logged in on mallory's node (status %d)", status)
	}
}

// udpEcho answers every datagram on pc with the same bytes until pc closes.
func udpEcho(pc net.PacketConn) {
	buf := make([]byte, 2048)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		pc.WriteTo(buf[:n], from)
	}
}

// udpRoundTrip sends through pc to peer until an echo comes back.
func udpRoundTrip(pc net.PacketConn, peer net.Addr, d time.Duration) error {
	msg := []byte(fmt.Sprintf("ping %d", time.Now().UnixNano()))
	deadline := time.Now().Add(d)
	buf := make([]byte, 2048)
	for time.Now().Before(deadline) {
		if _, err := pc.WriteTo(msg, peer); err != nil {
			return err
		}
		pc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, _, err := pc.ReadFrom(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue
		}
		if err != nil {
			return err
		}
		if bytes.Equal(buf[:n], msg) {
			pc.SetReadDeadline(time.Time{})
			return nil
		}
	}
	pc.SetReadDeadline(time.Time{})
	return errors.New("no echo")
}

// TestNATPortChange: a's home router forgets its mappings and moves a to
// new public ports mid-run; a is back in the circle within 30 s: b and c
// show it connected, and a write on a reaches c.
//
// Two measures: how long until a first write on a reaches b and c (the
// connections may have survived the change, or may look alive while they
// are not yet timed out); and, once every connection that lost its mapping
// must have timed out (the mesh's idle timeout, 20 s), whether a is
// connected and a new write on a reaches b and c by the 30 s mark.
func TestNATPortChange(t *testing.T) {
	l := newNATLab(t, natSpec{})
	l.start()
	a, b, c := l.nodes["a"], l.nodes["b"], l.nodes["c"]
	l.waitPaths(45*time.Second, acceptancePaths)
	before := a.mustStatus().Mesh.Public

	changed := time.Now()
	l.ns["homeA"].ChangeMapping()

	// writeReaches writes user on a (retried until a accepts it) and
	// waits until b and c hold want accounts and show a connected.
	writeReaches := func(user string, want int, deadline time.Time) time.Duration {
		t.Helper()
		written := false
		var at time.Duration
		waitEvery(t, time.Until(deadline), 250*time.Millisecond, user+" from a on b and c, a connected", func() error {
			if !written {
				if err := a.addUser(user, "correct horse battery"); err != nil && !strings.Contains(err.Error(), ": 409 ") {
					return fmt.Errorf("write on a: %v", err)
				}
				written = true
			}
			for _, n := range []*natNode{b, c} {
				st, err := n.status()
				if err != nil {
					return err
				}
				if st.Accounts < want {
					return fmt.Errorf("%s has not got %s", n.name, user)
				}
				if !st.connected("a") {
					return fmt.Errorf("%s", st.meshSummary())
				}
			}
			at = time.Since(changed)
			return nil
		})
		return at
	}
	first := writeReaches("moved1", 1, changed.Add(30*time.Second))
	t.Logf("a first write on a reached b and c %v after a's public port changed", first.Round(time.Millisecond))

	// No stale connection can pass for a live one any more.
	time.Sleep(time.Until(changed.Add(21 * time.Second)))
	back := writeReaches("moved2", 2, changed.Add(30*time.Second))
	after := a.mustStatus().Mesh.Public
	t.Logf("a back in the circle: a write made %v after the change reached b and c at %v (public %q before, %q after)",
		(21 * time.Second), back.Round(time.Millisecond), before, after)
	if after == before {
		t.Errorf("a's status still shows its old public address %q", before)
	}
	if p := b.mustStatus().peer("a"); p != nil {
		t.Logf("b reaches a at %s (%s)", p.Remote, p.Path)
	}
	for _, n := range []*natNode{a, b, c} {
		t.Logf("after the port change: %s", n.mustStatus().meshSummary())
	}
}
