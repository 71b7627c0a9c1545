package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// caddyBin is the circle build of caddy, built once by TestMain.
var caddyBin string

// domain is the circle domain every test circle uses.
const domain = "circle.localhost"

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "circle-integration-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "temp dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	caddyBin = filepath.Join(dir, "caddy")
	build := exec.Command("go", "build", "-o", caddyBin, "github.com/homecircle/circle/cmd/caddy")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building caddy:", err)
		return 1
	}
	return m.Run()
}

// freePort returns a port that is free for both TCP and UDP on loopback
// (memberlist binds both on the gossip port).
func freePort(t *testing.T) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listen: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err != nil {
			continue
		}
		u.Close()
		return port
	}
	t.Fatal("no free port")
	return 0
}

// waitFor polls cond until it returns nil or the deadline passes.
func waitFor(t *testing.T, within time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v: %v", what, within, err)
}

// syncBuffer is a goroutine-safe log sink for a node's output.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// node is one caddy process of a test circle.
type node struct {
	c                                      *circle
	name                                   string
	dir                                    string
	adminPort, httpPort, httpsPort, gossip int
	secretFile                             string
	join                                   []int // gossip ports to join
	cmd                                    *exec.Cmd
	done                                   chan struct{}
	log                                    *syncBuffer
	rootPool                               *x509.CertPool // this node's CA root, fetched once
	// bin is the caddy binary the node runs; empty: caddyBin (the build
	// under test). The upgrade test runs older releases with it.
	bin string
	// caddyfileFn, when set, makes the node's whole Caddyfile instead of
	// the default one (tests with other global options or sites).
	caddyfileFn func(n *node) string
	// adaptFn, when set, runs the node on JSON: the Caddyfile adapted by
	// `caddy adapt`, passed through adaptFn (for settings that have no
	// Caddyfile syntax).
	adaptFn func(t *testing.T, cfgJSON []byte) []byte
	// gate, when set, holds the launched process back until gate reaches
	// EOF (a shell reads it, then execs caddy), so a test can start
	// several processes first and release them at the same instant.
	gate io.Reader
	// env is added to the process's environment (e.g. CIRCLE_CLOCK_OFFSET).
	env []string
}

// circle is a set of nodes sharing a secret, plus an upstream app that
// records the headers it receives.
type circle struct {
	t          *testing.T
	secretFile string
	nodes      map[string]*node
	order      []string
	app        *recordingApp
}

// recordingApp is the "self-hosted app" behind the gate: it records the
// identity headers of the last request and echoes them.
type recordingApp struct {
	srv  *http.Server
	addr string
	mu   sync.Mutex // guards last
	last http.Header
}

func newRecordingApp(t *testing.T) *recordingApp {
	a := &recordingApp{}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a.addr = l.Addr().String()
	a.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.last = r.Header.Clone()
		a.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{
			"user":   r.Header.Get("Remote-User"),
			"groups": r.Header.Get("Remote-Groups"),
			"name":   r.Header.Get("Remote-Name"),
			"email":  r.Header.Get("Remote-Email"),
		})
	})}
	go a.srv.Serve(l)
	t.Cleanup(func() { a.srv.Close() })
	return a
}

func (a *recordingApp) lastHeaders() http.Header {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.last.Clone()
}

func newSecretFile(t *testing.T) string {
	b := make([]byte, 32)
	rand.Read(b)
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, []byte(base64.StdEncoding.EncodeToString(b)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// newCircle prepares (does not start) nodes with the given names; every
// node joins all the others.
func newCircle(t *testing.T, names ...string) *circle {
	c := &circle{t: t, secretFile: newSecretFile(t), nodes: map[string]*node{}, app: newRecordingApp(t)}
	var gossips []int
	for _, name := range names {
		n := c.addNode(name, c.secretFile)
		gossips = append(gossips, n.gossip)
	}
	for _, n := range c.nodes {
		for _, g := range gossips {
			if g != n.gossip {
				n.join = append(n.join, g)
			}
		}
	}
	return c
}

func (c *circle) addNode(name, secretFile string) *node {
	n := &node{
		c: c, name: name, dir: c.t.TempDir(), secretFile: secretFile,
		adminPort: freePort(c.t), httpPort: freePort(c.t), httpsPort: freePort(c.t), gossip: freePort(c.t),
	}
	c.nodes[name] = n
	c.order = append(c.order, name)
	return n
}

func (n *node) caddyfile() string {
	if n.caddyfileFn != nil {
		return n.caddyfileFn(n)
	}
	var join []string
	for _, p := range n.join {
		join = append(join, fmt.Sprintf("127.0.0.1:%d", p))
	}
	joinLine := ""
	if len(join) > 0 {
		joinLine = "join " + strings.Join(join, " ")
	}
	return fmt.Sprintf(`{
	admin 127.0.0.1:%[1]d
	http_port %[2]d
	https_port %[3]d
	local_certs
	skip_install_trust
	storage circle
	circle {
		name %[4]s
		domain %[5]s
		secret_file %[6]s
		data_dir %[7]s
		listen 127.0.0.1:%[8]d
		%[9]s
		replicas 2
	}
}

%[5]s:%[3]d {
	circle_portal
}

app.%[5]s:%[3]d {
	circle_auth
	reverse_proxy %[10]s
}

family.%[5]s:%[3]d {
	circle_auth {
		allow group family
	}
	reverse_proxy %[10]s
}
`, n.adminPort, n.httpPort, n.httpsPort, n.name, domain, n.secretFile,
		filepath.Join(n.dir, "data"), n.gossip, joinLine, n.c.app.addr)
}

// start launches the node's process and waits until its admin API
// answers /circle/status.
func (n *node) start() {
	n.c.t.Helper()
	n.launch()
	n.waitUp()
}

// launch starts the node's process without waiting for it.
func (n *node) launch() {
	t := n.c.t
	t.Helper()
	cfg := filepath.Join(n.dir, "Caddyfile")
	if err := os.WriteFile(cfg, []byte(n.caddyfile()), 0o600); err != nil {
		t.Fatal(err)
	}
	if n.log == nil {
		n.log = &syncBuffer{}
	}
	bin := n.bin
	if bin == "" {
		bin = caddyBin
	}
	args := []string{"run", "--config", cfg, "--adapter", "caddyfile"}
	if n.adaptFn != nil {
		out, err := exec.Command(bin, "adapt", "--config", cfg, "--adapter", "caddyfile").Output()
		if err != nil {
			t.Fatalf("adapting the Caddyfile of %s: %v", n.name, err)
		}
		js := filepath.Join(n.dir, "caddy.json")
		if err := os.WriteFile(js, n.adaptFn(t, out), 0o600); err != nil {
			t.Fatal(err)
		}
		args = []string{"run", "--config", js}
	}
	cmd := exec.Command(bin, args...)
	if n.gate != nil {
		cmd = exec.Command("sh", append([]string{"-c", `read -r _; exec "$0" "$@"`, bin}, args...)...)
		cmd.Stdin = n.gate
	}
	cmd.Env = n.env
	n.done = startCaddy(t, n.name, cmd, n.dir, n.log)
	n.cmd = cmd
	t.Cleanup(func() {
		n.kill()
		if t.Failed() {
			t.Logf("---- log of %s ----\n%s", n.name, tail(n.log.String(), 6000))
		}
	})
}

// waitUp waits until the launched node's admin API answers /circle/status.
func (n *node) waitUp() {
	t := n.c.t
	t.Helper()
	waitFor(t, 30*time.Second, n.name+" admin API up", func() error {
		select {
		case <-n.done:
			return fmt.Errorf("process exited: %s", tail(n.log.String(), 2000))
		default:
		}
		var st map[string]any
		return n.admin("GET", "/circle/status", nil, &st)
	})
}

// kill sends SIGKILL and waits for the process to be gone.
func (n *node) kill() {
	if n.cmd == nil || n.cmd.Process == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.done
	n.cmd = nil
}

func tail(s string, max int) string {
	if len(s) > max {
		return "..." + s[len(s)-max:]
	}
	return s
}

// admin calls the node's admin API; a non-2xx status is an error.
func (n *node) admin(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", n.adminPort, path), rd)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// startCaddy starts cmd, a caddy process, so that it dies with the test,
// with its own HOME and XDG directories under dir and its output in log.
// cmd.Env, if set, is added to this process's environment.
// The returned channel closes when it has exited.
func startCaddy(t testing.TB, name string, cmd *exec.Cmd, dir string, log io.Writer) chan struct{} {
	t.Helper()
	cmd.SysProcAttr = dieWithTest()
	home := filepath.Join(dir, "home")
	cmd.Env = append(append(os.Environ(), cmd.Env...), "HOME="+home, "XDG_DATA_HOME="+filepath.Join(home, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(home, "config"))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	return done
}

// rootCA fetches the local CA root from the node's admin API.
func (n *node) rootCA() (*x509.Certificate, error) { return fetchRootCA(n.admin) }

// fetchRootCA fetches Caddy's local CA root through an admin API call.
func fetchRootCA(admin func(method, path string, body, out any) error) (*x509.Certificate, error) {
	root, _, err := fetchCA(admin)
	return root, err
}

// fetchCA fetches Caddy's local CA root and intermediate (the first
// certificate of its chain) through an admin API call.
func fetchCA(admin func(method, path string, body, out any) error) (root, inter *x509.Certificate, err error) {
	var ca struct {
		Root  string `json:"root_certificate"`
		Inter string `json:"intermediate_certificate"`
	}
	if err := admin("GET", "/pki/ca/local", nil, &ca); err != nil {
		return nil, nil, err
	}
	parse := func(p string) (*x509.Certificate, error) {
		block, _ := pem.Decode([]byte(p))
		if block == nil {
			return nil, fmt.Errorf("no PEM block in %q", p)
		}
		return x509.ParseCertificate(block.Bytes)
	}
	if root, err = parse(ca.Root); err != nil {
		return nil, nil, err
	}
	if inter, err = parse(ca.Inter); err != nil {
		return nil, nil, err
	}
	return root, inter, nil
}

// client returns an HTTPS client that reaches every circle host name on
// this node's HTTPS port, trusting only the circle's root, not following
// redirects, with its own cookie jar.
func (n *node) client() *http.Client {
	t := n.c.t
	t.Helper()
	if n.rootPool == nil {
		root, err := n.rootCA()
		if err != nil {
			t.Fatalf("root CA from %s: %v", n.name, err)
		}
		n.rootPool = x509.NewCertPool()
		n.rootPool.AddCert(root)
	}
	jar, _ := cookiejar.New(nil)
	port := n.httpsPort
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Client{
		Jar:     jar,
		Timeout: 15 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: n.rootPool},
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				return dialer.DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", port))
			},
			DisableKeepAlives: true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// url builds an https URL for host (a subdomain label or "" for the
// portal) on this node's HTTPS port.
func (n *node) url(sub, path string) string {
	host := domain
	if sub != "" {
		host = sub + "." + domain
	}
	return fmt.Sprintf("https://%s:%d%s", host, n.httpsPort, path)
}

// addUser adds an account through the node's admin API.
func (n *node) addUser(username, password string, groups ...string) error {
	return n.admin("POST", "/circle/users", map[string]any{
		"username": username, "password": password, "groups": groups, "name": strings.ToUpper(username[:1]) + username[1:],
		"email": username + "@example.com",
	}, nil)
}

// apiLogin logs in through /api/login and returns the session cookie.
func (n *node) apiLogin(username, password string) (*http.Cookie, int, error) {
	b, _ := json.Marshal(map[string]string{"username": username, "password": password})
	req, _ := http.NewRequest("POST", n.url("", "/api/login"), bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	resp, err := n.client().Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	for _, c := range resp.Cookies() {
		if c.Name == "circle_session" && c.Value != "" {
			return c, resp.StatusCode, nil
		}
	}
	return nil, resp.StatusCode, fmt.Errorf("login %s on %s: status %d, no session cookie", username, n.name, resp.StatusCode)
}

// get requests url on this node with the session cookie (if any) and
// extra headers, returning status and body.
func (n *node) get(u string, cookie *http.Cookie, hdr map[string]string) (int, string, http.Header, error) {
	return getWith(n.client(), u, cookie, hdr)
}

// getWith requests u through c with the session cookie (if any) and extra
// headers, returning status, body and headers.
func getWith(c *http.Client, u string, cookie *http.Cookie, hdr map[string]string) (int, string, http.Header, error) {
	req, err := http.NewRequest("GET", u, nil)
	if err != nil {
		return 0, "", nil, err
	}
	if cookie != nil {
		req.AddCookie(&http.Cookie{Name: cookie.Name, Value: cookie.Value})
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header, nil
}

// members returns the member names this node sees alive.
func (n *node) aliveMembers() ([]string, error) {
	var st struct {
		Members []struct {
			Name  string `json:"name"`
			State string `json:"state"`
		} `json:"members"`
	}
	if err := n.admin("GET", "/circle/status", nil, &st); err != nil {
		return nil, err
	}
	var alive []string
	for _, m := range st.Members {
		if m.State == "alive" {
			alive = append(alive, m.Name)
		}
	}
	return alive, nil
}

// waitMembers waits until node sees exactly want alive members.
func (n *node) waitMembers(want int) {
	n.c.t.Helper()
	waitFor(n.c.t, 20*time.Second, n.name+" sees members", func() error {
		alive, err := n.aliveMembers()
		if err != nil {
			return err
		}
		if len(alive) != want {
			return fmt.Errorf("alive %v, want %d", alive, want)
		}
		return nil
	})
}

// startAll starts the nodes in order (the first alone, so that exactly one
// local CA root is created and shared) and waits until they all see each
// other.
func (c *circle) startAll() {
	c.t.Helper()
	for i, name := range c.order {
		n := c.nodes[name]
		n.start()
		if i == 0 {
			waitFor(c.t, 20*time.Second, "first node's CA root", func() error {
				_, err := n.rootCA()
				return err
			})
		}
	}
	for _, name := range c.order {
		c.nodes[name].waitMembers(len(c.order))
	}
}

// dieWithTest makes a child process die with the test binary, even when
// `go test` kills it on a timeout before any cleanup runs.
func dieWithTest() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
