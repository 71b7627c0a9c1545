package integration

// The NAT harness of issue 4: real caddy processes in network namespaces
// built by netlab (DESIGN.md section 6, "NAT").
//
//	internet 198.18.0.0/24
//	  r   198.18.0.10  reachable, `relay :3478`
//	  r2  198.18.0.11  reachable, `relay :3478` (natSpec.r2)
//	  x   198.18.0.99  a client (browser-less user, or an attacker)
//	  homeA 198.18.0.20 cone NAT      -> a 100.64.1.2
//	  homeB 198.18.0.21 cone NAT      -> b 100.64.2.2
//	  homeC 198.18.0.30 symmetric NAT -> c 100.64.3.2
//
// Every node listens on the standard ports inside its own namespace (HTTPS
// 443, mesh 7946) and serves its admin API on a unix socket, which the test
// process reaches whatever the namespace. HTTP clients that stand in a
// namespace (x on the internet, or a node's own namespace) dial their
// sockets inside it (dialIn).

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/homecircle/circle/integration/netlab"
)

const (
	natHTTPS  = 443
	natMesh   = 7946
	natTURN   = 3478
	natClient = "198.18.0.99"
)

// natSpec chooses the topology of a NAT test.
type natSpec struct {
	// members are the NATed nodes to run, among "a", "b", "c" (default all).
	members []string
	// r2 adds a second reachable relay r2 (198.18.0.11).
	r2 bool
	// whoami makes b host the "whoami" app (inside its namespace, on
	// 127.0.0.1) as `service whoami`, and gives every node the site
	// app.<domain> behind circle_auth proxying to it over the mesh.
	whoami bool
	// beforeStart runs after the namespaces exist, before any node starts.
	beforeStart func(l *natLab)
}

// natLab is one NAT topology with its caddy nodes.
type natLab struct {
	t          *testing.T
	lab        *netlab.Lab
	inet       *netlab.Node
	ns         map[string]*netlab.Node // namespaces by name: r, r2, x, a, b, c, homeA...
	secretFile string
	secret     []byte
	sockDir    string
	nodes      map[string]*natNode
	order      []string
	app        *natApp // b's whoami app (natSpec.whoami)
}

// natNode is one caddy process in a namespace.
type natNode struct {
	l          *natLab
	name       string
	ns         *netlab.Node
	dir        string
	sock       string // admin API unix socket
	secretFile string
	reachable  bool     // on the internet: advertises its address, runs a relay
	join       []string // mesh addresses (host:port) to join
	services   []string // "NAME UPSTREAM" lines
	app        bool     // serves the app.<domain> site proxying to the whoami service
	manual     bool     // not started by natLab.start (the test starts it)
	cmd        *exec.Cmd
	done       chan struct{}
	log        *syncBuffer
}

// natApp is the app hosted only on b: it answers with the identity headers
// it received and records them.
type natApp struct {
	addr string
	mu   sync.Mutex // guards last, hits
	last http.Header
	hits int
}

func (a *natApp) lastHeaders() (http.Header, int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.last.Clone(), a.hits
}

// newNATLab builds the namespaces of spec and prepares (does not start)
// the nodes: r (and r2) reachable relays; a, b, c behind their routers,
// joining every reachable node.
func newNATLab(t *testing.T, spec natSpec) *natLab {
	t.Helper()
	start := time.Now()
	l := newInternetLab(t)
	lab := l.lab
	l.ns["x"] = lab.Host(l.inet, "x", natClient)
	l.ns["r"] = lab.Host(l.inet, "r", "198.18.0.10")
	if spec.r2 {
		l.ns["r2"] = lab.Host(l.inet, "r2", "198.18.0.11")
	}
	members := spec.members
	if members == nil {
		members = []string{"a", "b", "c"}
	}
	homes := map[string]struct {
		router, pub, lan, addr string
		mode                   netlab.Mode
	}{
		"a": {"homeA", "198.18.0.20", "100.64.1.0/24", "100.64.1.2", netlab.Cone},
		"b": {"homeB", "198.18.0.21", "100.64.2.0/24", "100.64.2.2", netlab.Cone},
		"c": {"homeC", "198.18.0.30", "100.64.3.0/24", "100.64.3.2", netlab.Symmetric},
	}
	for _, m := range members {
		h, ok := homes[m]
		if !ok {
			t.Fatalf("unknown NATed member %q", m)
		}
		rt := lab.Router(l.inet, h.router, h.pub, h.lan, h.mode)
		l.ns[h.router] = rt
		l.ns[m] = lab.Host(rt, m, h.addr)
	}
	t.Logf("namespaces built in %v", time.Since(start).Round(time.Millisecond))

	var seeds []string
	l.addNode("r", true, l.secretFile)
	seeds = append(seeds, fmt.Sprintf("198.18.0.10:%d", natMesh))
	if spec.r2 {
		r2 := l.addNode("r2", true, l.secretFile)
		r2.join = []string{seeds[0]}
		seeds = append(seeds, fmt.Sprintf("198.18.0.11:%d", natMesh))
	}
	for _, m := range members {
		n := l.addNode(m, false, l.secretFile)
		n.join = append([]string(nil), seeds...)
	}
	if spec.whoami {
		l.app = l.startApp(l.ns["b"])
		l.nodes["b"].services = []string{"whoami " + l.app.addr}
		for _, n := range l.nodes {
			n.app = true
		}
	}
	if spec.beforeStart != nil {
		spec.beforeStart(l)
	}
	return l
}

// newInternetLab makes what every netlab topology of caddy nodes shares:
// the lab with its internet (198.18.0.0/24), the circle secret, the
// directory of the admin sockets, and the cleanups that dump every node's
// view and log if the test failed, then kill the nodes.
func newInternetLab(t *testing.T) *natLab {
	t.Helper()
	lab := netlab.New(t)
	l := &natLab{
		t: t, lab: lab, ns: map[string]*netlab.Node{}, nodes: map[string]*natNode{},
		secretFile: newSecretFile(t),
	}
	b, err := os.ReadFile(l.secretFile)
	if err != nil {
		t.Fatal(err)
	}
	if l.secret, err = base64.StdEncoding.DecodeString(strings.TrimSpace(string(b))); err != nil {
		t.Fatal(err)
	}
	// Unix socket paths are limited to 108 bytes: keep them short.
	if l.sockDir, err = os.MkdirTemp("", "natsock"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(l.sockDir) })
	// At the end: the nodes are killed (before the lab goes), after a dump
	// of every node's view and log if the test failed.
	t.Cleanup(l.killAll)
	t.Cleanup(l.dumpIfFailed)
	l.inet = lab.Internet("198.18.0.0/24")
	return l
}

// killAll kills every node still running.
func (l *natLab) killAll() {
	for _, n := range l.nodes {
		n.kill()
	}
}

// dumpIfFailed logs every node's status and log if the test failed.
func (l *natLab) dumpIfFailed() {
	t := l.t
	if !t.Failed() {
		return
	}
	for _, name := range l.order {
		n := l.nodes[name]
		if n.log == nil {
			continue
		}
		st := "(not running)"
		if n.cmd != nil {
			st = n.statusText()
		}
		t.Logf("---- %s: status ----\n%s\n---- %s: log ----\n%s", n.name, st, n.name, tail(quietLog(n.log.String()), 12000))
	}
}

// addNode prepares a node in the namespace of the same name.
func (l *natLab) addNode(name string, reachable bool, secretFile string) *natNode {
	ns := l.ns[name]
	if ns == nil {
		l.t.Fatalf("no namespace %q", name)
	}
	n := &natNode{
		l: l, name: name, ns: ns, dir: l.t.TempDir(), reachable: reachable,
		sock: filepath.Join(l.sockDir, name+".sock"), secretFile: secretFile,
	}
	l.nodes[name] = n
	l.order = append(l.order, name)
	return n
}

// startApp serves the whoami app inside ns on 127.0.0.1 (reachable only
// from that namespace).
func (l *natLab) startApp(ns *netlab.Node) *natApp {
	a := &natApp{}
	ln := ns.Listen(l.t, "tcp4", "127.0.0.1:0")
	a.addr = ln.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.last = r.Header.Clone()
		a.hits++
		a.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{
			"app":    "whoami on b",
			"user":   r.Header.Get("Remote-User"),
			"groups": r.Header.Get("Remote-Groups"),
			"name":   r.Header.Get("Remote-Name"),
			"email":  r.Header.Get("Remote-Email"),
		})
	})}
	go srv.Serve(ln)
	l.t.Cleanup(func() { srv.Close() })
	return a
}

func (n *natNode) caddyfile() string {
	var circle []string
	add := func(format string, args ...any) { circle = append(circle, fmt.Sprintf(format, args...)) }
	add("name %s", n.name)
	add("domain %s", domain)
	add("secret_file %s", n.secretFile)
	add("data_dir %s", filepath.Join(n.dir, "data"))
	add("listen 0.0.0.0:%d", natMesh)
	if n.reachable {
		add("advertise %s:%d", n.ns.Addr, natMesh)
	}
	if len(n.join) > 0 {
		add("join %s", strings.Join(n.join, " "))
	}
	add("replicas 2")
	if n.reachable {
		add("relay :%d", natTURN)
	}
	for _, s := range n.services {
		add("service %s", s)
	}
	sites := fmt.Sprintf("%s {\n\tcircle_portal\n}\n", domain)
	if n.app {
		sites += fmt.Sprintf(`
app.%s {
	circle_auth
	reverse_proxy whoami {
		transport circle
	}
}
`, domain)
	}
	return fmt.Sprintf(`{
	admin unix/%s
	http_port 80
	https_port %d
	local_certs
	skip_install_trust
	storage circle
	circle {
		%s
	}
}

%s`, n.sock, natHTTPS, strings.Join(circle, "\n\t\t"), sites)
}

// launch starts the node's process in its namespace without waiting.
func (n *natNode) launch() {
	t := n.l.t
	t.Helper()
	cfg := filepath.Join(n.dir, "Caddyfile")
	if err := os.WriteFile(cfg, []byte(n.caddyfile()), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Remove(n.sock) // left behind by a killed process
	if n.log == nil {
		n.log = &syncBuffer{}
	} else {
		fmt.Fprintf(n.log, "\n======== restart at %s ========\n", time.Now().Format("15:04:05.000"))
	}
	cmd := n.ns.Command(context.Background(), caddyBin, "run", "--config", cfg, "--adapter", "caddyfile")
	n.done = startCaddy(t, n.name, cmd, n.dir, n.log)
	n.cmd = cmd
}

// waitUp waits until the launched node's admin API answers /circle/status.
func (n *natNode) waitUp() {
	t := n.l.t
	t.Helper()
	waitFor(t, 30*time.Second, n.name+" admin API up", func() error {
		select {
		case <-n.done:
			return fmt.Errorf("process exited: %s", tail(n.log.String(), 2000))
		default:
		}
		_, err := n.status()
		return err
	})
}

// kill sends SIGKILL and waits for the process to be gone.
func (n *natNode) kill() {
	if n.cmd == nil || n.cmd.Process == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.done
	n.cmd = nil
}

// restart launches a killed node again on the same data dir.
func (n *natNode) restart() {
	n.l.t.Helper()
	n.kill()
	n.launch()
	n.waitUp()
}

// start launches every node: the first added (r in the NAT topologies)
// first, alone, so that exactly one local CA root is created and shared;
// then the others together. It waits until every node sees every other
// alive.
func (l *natLab) start() {
	t := l.t
	t.Helper()
	start := time.Now()
	r := l.nodes[l.order[0]]
	r.launch()
	r.waitUp()
	waitFor(t, 20*time.Second, r.name+"'s CA root", func() error {
		_, err := r.rootCA()
		return err
	})
	var rest []*natNode
	names := []string{r.name}
	for _, name := range l.order[1:] {
		n := l.nodes[name]
		if n.manual {
			continue
		}
		n.launch()
		rest = append(rest, n)
		names = append(names, name)
	}
	for _, n := range rest {
		n.waitUp()
	}
	t.Logf("processes up in %v", time.Since(start).Round(time.Millisecond))
	l.waitAlive(45*time.Second, names...)
	t.Logf("circle of %d formed in %v", len(names), time.Since(start).Round(time.Millisecond))
}

// waitAlive waits until each of the named nodes sees exactly the named
// nodes alive.
func (l *natLab) waitAlive(within time.Duration, names ...string) {
	l.t.Helper()
	want := append([]string(nil), names...)
	sort.Strings(want)
	waitEvery(l.t, within, 250*time.Millisecond, fmt.Sprintf("%v see each other alive", want), func() error {
		var bad []string
		for _, name := range names {
			st, err := l.nodes[name].status()
			if err != nil {
				return err
			}
			if got := st.alive(); strings.Join(got, ",") != strings.Join(want, ",") {
				bad = append(bad, fmt.Sprintf("%s sees %v", name, got))
			}
		}
		if len(bad) > 0 {
			return fmt.Errorf("%s", strings.Join(bad, "; "))
		}
		return nil
	})
}

// ---- status ----

// natStatus is the part of GET /circle/status the NAT tests read.
type natStatus struct {
	Name     string `json:"name"`
	Accounts int    `json:"accounts"`
	Members  []struct {
		Name  string `json:"name"`
		Addr  string `json:"addr"`
		State string `json:"state"`
		Path  string `json:"path"`
	} `json:"members"`
	Mesh *struct {
		NAT         string            `json:"nat"`
		Public      string            `json:"public"`
		Relays      map[string]string `json:"relays"` // node name -> TURN address
		Allocations []struct {
			Relay  string `json:"relay"`
			Server string `json:"server"`
		} `json:"allocations"`
		Peers []meshPeer `json:"peers"`
	} `json:"mesh"`
	raw []byte
}

// meshPeer is this node's path to one peer.
type meshPeer struct {
	Name          string  `json:"name"`
	Path          string  `json:"path"` // direct | punched | relayed via X | none
	Remote        string  `json:"remote"`
	RTTms         float64 `json:"rtt_ms"`
	BytesSent     uint64  `json:"bytes_sent"`
	BytesReceived uint64  `json:"bytes_received"`
	Since         string  `json:"since"`
	LastError     string  `json:"last_error"`
}

// alive lists the members seen alive (this node included), sorted.
func (s *natStatus) alive() []string {
	var out []string
	for _, m := range s.Members {
		if m.State == "alive" {
			out = append(out, m.Name)
		}
	}
	sort.Strings(out)
	return out
}

// state is the member state of name ("" if not a member).
func (s *natStatus) state(name string) string {
	for _, m := range s.Members {
		if m.Name == name {
			return m.State
		}
	}
	return ""
}

// peer returns the mesh view of name (nil if not listed).
func (s *natStatus) peer(name string) *meshPeer {
	if s.Mesh == nil {
		return nil
	}
	for i := range s.Mesh.Peers {
		if s.Mesh.Peers[i].Name == name {
			return &s.Mesh.Peers[i]
		}
	}
	return nil
}

// path is the mesh path to name: "" when there is no mesh section or the
// peer is not listed.
func (s *natStatus) path(name string) string {
	if p := s.peer(name); p != nil {
		return p.Path
	}
	return ""
}

// connected reports whether name is alive with a live mesh path.
func (s *natStatus) connected(name string) bool {
	p := s.path(name)
	return s.state(name) == "alive" && p != "" && p != "none"
}

// cutOff reports whether this node shows name as gone: not a live member
// (dead or left), or alive without any mesh path.
func (s *natStatus) cutOff(name string) bool {
	switch s.state(name) {
	case "alive", "suspect":
		return s.path(name) == "none"
	}
	return true
}

func (n *natNode) status() (*natStatus, error) {
	var raw json.RawMessage
	if err := n.admin("GET", "/circle/status", nil, &raw); err != nil {
		return nil, err
	}
	st := &natStatus{raw: raw}
	if err := json.Unmarshal(raw, st); err != nil {
		return nil, fmt.Errorf("status of %s: %v: %s", n.name, err, raw)
	}
	return st, nil
}

func (n *natNode) mustStatus() *natStatus {
	n.l.t.Helper()
	st, err := n.status()
	if err != nil {
		n.l.t.Fatalf("status of %s: %v", n.name, err)
	}
	return st
}

// statusText is the node's status JSON, indented, for logs.
func (n *natNode) statusText() string {
	var raw json.RawMessage
	if err := n.admin("GET", "/circle/status", nil, &raw); err != nil {
		return err.Error()
	}
	var buf bytes.Buffer
	if json.Indent(&buf, raw, "", "  ") != nil {
		return string(raw)
	}
	return buf.String()
}

// meshSummary is "peer=path" for every mesh peer and member state, for
// error messages.
func (s *natStatus) meshSummary() string {
	var parts []string
	for _, m := range s.Members {
		if m.Name == s.Name {
			continue
		}
		parts = append(parts, fmt.Sprintf("%s=%s/%q", m.Name, m.State, s.path(m.Name)))
	}
	if s.Mesh == nil {
		parts = append(parts, "(no mesh section)")
	} else {
		for _, p := range s.Mesh.Peers {
			if s.state(p.Name) == "" {
				parts = append(parts, fmt.Sprintf("%s=(not a member)/%q", p.Name, p.Path))
			}
		}
	}
	return s.Name + ": " + strings.Join(parts, " ")
}

// waitPaths waits until every viewer's status shows the wanted path to
// each peer (want[viewer][peer] = path).
func (l *natLab) waitPaths(within time.Duration, want map[string]map[string]string) time.Duration {
	l.t.Helper()
	start := time.Now()
	waitEvery(l.t, within, 250*time.Millisecond, "paths", func() error {
		var bad []string
		for viewer, peers := range want {
			st, err := l.nodes[viewer].status()
			if err != nil {
				return err
			}
			for peer, path := range peers {
				if got := st.path(peer); got != path || st.state(peer) != "alive" {
					bad = append(bad, fmt.Sprintf("%s->%s: %q (%s), want %q (alive)", viewer, peer, got, st.state(peer), path))
				}
			}
		}
		if len(bad) > 0 {
			sort.Strings(bad)
			return fmt.Errorf("%s", strings.Join(bad, "; "))
		}
		return nil
	})
	return time.Since(start)
}

// ---- admin API over the unix socket ----

func (n *natNode) adminClient() *http.Client {
	sock := n.sock
	return &http.Client{
		Timeout: 15 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
			DisableKeepAlives: true,
		},
	}
}

// admin calls the node's admin API; a non-2xx status is an error.
func (n *natNode) admin(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://127.0.0.1"+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := n.adminClient().Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s on %s: %d %s", method, path, n.name, resp.StatusCode, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// addUser adds an account through the node's admin API.
func (n *natNode) addUser(username, password string, groups ...string) error {
	return n.admin("POST", "/circle/users", map[string]any{
		"username": username, "password": password, "groups": groups,
		"name": strings.ToUpper(username[:1]) + username[1:], "email": username + "@example.com",
	}, nil)
}

// cli runs `caddy circle ARGS --address unix/<sock>` inside the node's
// namespace, with stdin.
func (n *natNode) cli(stdin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args = append(append([]string{"circle"}, args...), "--address", "unix/"+n.sock)
	cmd := n.ns.Command(ctx, caddyBin, args...)
	cmd.SysProcAttr = dieWithTest()
	cmd.Env = append(os.Environ(), "HOME="+filepath.Join(n.dir, "home"))
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// rootCA fetches the node's local CA root.
func (n *natNode) rootCA() (*x509.Certificate, error) { return fetchRootCA(n.admin) }

// ---- clients inside namespaces ----

// inNS runs fn on an OS thread switched into the network namespace ns.
// Sockets fn creates stay in ns. (A fresh goroutine: if the thread cannot
// switch back it stays locked and dies with it.)
func inNS(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		err = fn()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// dialIn dials addr from inside the namespace ns.
func dialIn(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNS(ns, func() error {
		var err error
		c, err = (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// webClient is a browser-less HTTPS client standing in namespace from,
// whose every connection goes to target (host:port) whatever the URL's
// host, which gives the SNI and Host. It trusts only root, does not
// follow redirects and keeps cookies.
type webClient struct {
	*http.Client
}

func newWebClient(from *netlab.Node, target string, root *x509.Certificate) *webClient {
	pool := x509.NewCertPool()
	pool.AddCert(root)
	ns := from.NS
	return &webClient{&http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return dialIn(ctx, ns, network, target)
			},
			DisableKeepAlives: true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

// webURL is https://<sub.>domain<path> (the standard port).
func webURL(sub, path string) string {
	host := domain
	if sub != "" {
		host = sub + "." + domain
	}
	return "https://" + host + path
}

// login logs in through /api/login and returns the session cookie.
func (c *webClient) login(username, password string) (*http.Cookie, int, error) {
	b, _ := json.Marshal(map[string]string{"username": username, "password": password})
	req, _ := http.NewRequest("POST", webURL("", "/api/login"), bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	for _, ck := range resp.Cookies() {
		if ck.Name == "circle_session" && ck.Value != "" {
			return ck, resp.StatusCode, nil
		}
	}
	return nil, resp.StatusCode, fmt.Errorf("login %s: status %d, no session cookie", username, resp.StatusCode)
}

// get requests u with the cookie (if any) and headers.
func (c *webClient) get(u string, cookie *http.Cookie, hdr map[string]string) (int, string, http.Header, error) {
	return getWith(c.Client, u, cookie, hdr)
}

// localWeb is a client in the node's own namespace, to its own HTTPS
// port, trusting its own CA root.
func (n *natNode) localWeb() *webClient {
	n.l.t.Helper()
	root, err := n.rootCA()
	if err != nil {
		n.l.t.Fatalf("root CA of %s: %v", n.name, err)
	}
	return newWebClient(n.ns, fmt.Sprintf("%s:%d", n.ns.Addr, natHTTPS), root)
}

// publicWeb is a client on the internet (host x) to node n's public HTTPS
// address (n must be reachable).
func (n *natNode) publicWeb() *webClient {
	n.l.t.Helper()
	root, err := n.rootCA()
	if err != nil {
		n.l.t.Fatalf("root CA of %s: %v", n.name, err)
	}
	return newWebClient(n.l.ns["x"], fmt.Sprintf("%s:%d", n.ns.Addr, natHTTPS), root)
}

// waitAccounts waits until n's store holds at least want accounts.
func (n *natNode) waitAccounts(within time.Duration, want int) time.Duration {
	n.l.t.Helper()
	start := time.Now()
	waitEvery(n.l.t, within, 200*time.Millisecond, fmt.Sprintf("%s holds %d accounts", n.name, want), func() error {
		st, err := n.status()
		if err != nil {
			return err
		}
		if st.Accounts < want {
			return fmt.Errorf("%d accounts", st.Accounts)
		}
		return nil
	})
	return time.Since(start)
}

// loginOnce logs in with c, which must succeed.
func loginOnce(t *testing.T, c *webClient, where, user, pass string) *http.Cookie {
	t.Helper()
	ck, status, err := c.login(user, pass)
	if err != nil {
		t.Fatalf("login %s at %s: %d %v", user, where, status, err)
	}
	return ck
}

// shIn runs a command in the root namespace (ip -n ...), failing the test
// on error.
func shIn(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// quietLog drops the admin API's request lines (the tests poll the status).
func quietLog(s string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, `"logger":"admin.api","msg":"received request"`) {
			continue
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}
